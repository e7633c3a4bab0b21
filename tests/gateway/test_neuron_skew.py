"""Version skew between gateway and neuron: a newer neuron's /status, with fields this gateway
has never heard of at every level, is read as it is; a body that does not fit at all is the
neuron's failure in the gateway's exception tree, not a pydantic error that escapes the poll.

The newer neuron is a fake (a plain HTTP server replaying a real neuron's /status with extra
fields): a future version cannot run here."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest

from control_plane.errors import UpstreamFailed
from control_plane.node_client import NeuronClient
from cortex.config import NeuronRef
from tests.conftest import Embedded


class Replay:
    body: Any = None


def serve(replay: type[Replay]) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            data = json.dumps(replay.body).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture(scope="module")
def newer_neuron() -> Iterator[tuple[type[Replay], str]]:
    class Body(Replay):
        pass

    server = serve(Body)
    yield Body, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def status_of(url: str) -> Any:
    client = NeuronClient(NeuronRef(name="newer", endpoint=url), timeout=5)

    async def read() -> Any:
        try:
            return await client.status(timeout=5)
        finally:
            await client.close()

    return asyncio.run(read())


def test_unknown_fields_from_a_newer_neuron_are_ignored(
    embedded: Embedded, newer_neuron: tuple[type[Replay], str]
) -> None:
    load = httpx.post(
        f"{embedded.neuron_url}/models/load",
        json={"model": "cortex-tiny"},
        headers=embedded.neuron_headers,
        timeout=180,
    )
    assert load.status_code == 200, load.text
    body = httpx.get(
        f"{embedded.neuron_url}/status", headers=embedded.neuron_headers, timeout=10
    ).json()
    assert body["catalogue"] and body["loaded"], "the embedded neuron serves cortex-tiny"
    body["added_in_v9"] = {"x": 1}
    body["triton"]["new_state_detail"] = "fine"
    for entry in body["catalogue"]:
        entry["profile"]["speculative_decoding"] = {"draft": "tiny"}
        entry["new_estimate"] = 1
    for model in body["loaded"]:
        model["kv_cache_hit_rate"] = 0.5
    for gpu in body["gpus"]:
        gpu["temperature_c"] = 40
    newer_neuron[0].body = body
    status = status_of(newer_neuron[1])
    # The embedded neuron's catalogue (cortex-tiny, and smollm2-135m where it could be fetched).
    assert [e.profile.name for e in status.catalogue] == [
        e["profile"]["name"] for e in body["catalogue"]
    ]
    assert "cortex-tiny" in [e.profile.name for e in status.catalogue]
    assert [m.name for m in status.loaded] == [m["name"] for m in body["loaded"]]
    assert "cortex-tiny" in [m.name for m in status.loaded]


def test_a_body_that_does_not_fit_is_an_upstream_failure(
    newer_neuron: tuple[type[Replay], str],
) -> None:
    newer_neuron[0].body = {"name": "newer", "catalogue": "not a list"}
    with pytest.raises(UpstreamFailed, match="unexpected body"):
        status_of(newer_neuron[1])
