"""One log line per request, with the request id, on the gateway; the id reaches the neuron's log.

The embedded fleet logs text; a second gateway (`cortex serve --config`, log_format = "json",
an API key) in front of the same embedded neuron logs JSON lines."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest

from cortex.launch import loopback_gateway, running_gateway
from tests.conftest import Embedded
from tests.observability.conftest import NODE

API_KEY = "sk-observability-secret"
WAIT_S = 10.0


def wait_for_line(log: Path, match: Callable[[str], bool]) -> str:
    deadline = time.monotonic() + WAIT_S
    while True:
        for line in log.read_text(errors="replace").splitlines():
            if match(line):
                return line
        if time.monotonic() > deadline:
            raise AssertionError(f"no such line in {log}:\n{log.read_text()[-3000:]}")
        time.sleep(0.1)


def fields(line: str) -> dict[str, str]:
    """key=value pairs of a text log line."""
    return dict(part.split("=", 1) for part in line.split() if "=" in part)


def neuron_log(embedded: Embedded) -> Path:
    # tests/conftest.py points CORTEX_STATE_DIR at state/ beside the serve log.
    return embedded.log.parent / "state" / "embedded" / "neuron.log"


def test_text_line_per_request_with_the_client_request_id(embedded: Embedded) -> None:
    client = openai.OpenAI(base_url=embedded.base_url, api_key="unused", max_retries=0)
    reply = client.chat.completions.create(
        model="cortex-tiny",
        messages=[{"role": "user", "content": "Say hello"}],
        max_tokens=5,
        extra_headers={"x-request-id": "test-123"},
    )
    assert reply.usage is not None
    line = wait_for_line(embedded.log, lambda line: "request_id=test-123 " in line)
    assert "cortex.requests" in line
    logged = fields(line)
    assert logged["model"] == "cortex-tiny" and logged["node"] == NODE
    assert logged["api"] == "openai" and logged["outcome"] == "ok"
    assert int(logged["prompt_tokens"]) == reply.usage.prompt_tokens
    assert int(logged["completion_tokens"]) == reply.usage.completion_tokens
    assert 0 < float(logged["ttft_s"]) <= float(logged["duration_s"])


def test_streams_of_both_dialects_are_logged_once(embedded: Embedded) -> None:
    client = anthropic.Anthropic(
        base_url=embedded.base_url.removesuffix("/v1"), api_key="unused", max_retries=0
    )
    with client.messages.stream(
        model="cortex-tiny",
        max_tokens=6,
        messages=[{"role": "user", "content": "Hi"}],
        extra_headers={"x-request-id": "test-anthropic-stream"},
    ) as stream:
        message = stream.get_final_message()
    line = wait_for_line(embedded.log, lambda line: "request_id=test-anthropic-stream " in line)
    logged = fields(line)
    assert logged["api"] == "anthropic" and logged["outcome"] == "ok"
    assert int(logged["completion_tokens"]) == message.usage.output_tokens
    time.sleep(0.2)
    text = embedded.log.read_text(errors="replace")
    assert text.count("request_id=test-anthropic-stream ") == 1


def refused_count(embedded: Embedded, api: str, outcome: str) -> float:
    prefix = f'cortex_requests_refused_total{{api="{api}",outcome="{outcome}"}} '
    for line in httpx.get(embedded.metrics_url).text.splitlines():
        if line.startswith(prefix):
            return float(line.removeprefix(prefix))
    return 0.0


def test_a_request_for_an_unknown_model_is_logged_and_counted(embedded: Embedded) -> None:
    before = refused_count(embedded, "openai", "not_found_error")
    client = openai.OpenAI(base_url=embedded.base_url, api_key="unused", max_retries=0)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(
            model="no such model",
            messages=[{"role": "user", "content": "Hi"}],
            max_tokens=5,
            extra_headers={"x-request-id": "test-unknown-model"},
        )
    line = wait_for_line(embedded.log, lambda line: "request_id=test-unknown-model " in line)
    logged = fields(line)
    assert logged["model"] == "no_such_model" and logged["node"] == "-"
    assert logged["api"] == "openai" and logged["outcome"] == "not_found_error"
    assert logged["completion_tokens"] == "0"
    assert refused_count(embedded, "openai", "not_found_error") == before + 1


@dataclass
class JsonGateway:
    base_url: str
    log: Path


@pytest.fixture(scope="module")
def json_gateway(
    embedded: Embedded, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[JsonGateway]:
    folder = tmp_path_factory.mktemp("json-gateway")
    config = loopback_gateway({}, log_format="json", api_keys=(API_KEY,))
    config = config.model_copy(update={"neurons": (embedded.neuron_ref(NODE),)})
    with running_gateway(folder / "cortex.toml", config) as gateway:
        yield JsonGateway(f"{gateway.url}/v1", gateway.log)


def json_lines(log: Path) -> list[dict[str, Any]]:
    lines = []
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            lines.append(json.loads(line))
    return lines


def test_json_lines_carry_the_request_id_as_a_field(json_gateway: JsonGateway) -> None:
    client = openai.OpenAI(base_url=json_gateway.base_url, api_key=API_KEY, max_retries=0)
    stream = client.chat.completions.create(
        model="cortex-tiny",
        messages=[{"role": "user", "content": "Hello"}],
        max_tokens=4,
        stream=True,
        stream_options={"include_usage": True},
        extra_headers={"x-request-id": "test-json-456"},
    )
    [usage] = [chunk.usage for chunk in stream if chunk.usage is not None]
    wait_for_line(json_gateway.log, lambda line: '"test-json-456"' in line)
    [entry] = [e for e in json_lines(json_gateway.log) if e.get("logger") == "cortex.requests"]
    assert entry["request_id"] == "test-json-456"
    assert entry["model"] == "cortex-tiny" and entry["node"] == NODE
    assert entry["api"] == "openai" and entry["outcome"] == "ok"
    assert entry["prompt_tokens"] == usage.prompt_tokens
    assert entry["completion_tokens"] == usage.completion_tokens
    assert isinstance(entry["ttft_s"], float) and isinstance(entry["duration_s"], float)
    assert API_KEY not in json_gateway.log.read_text()


def test_the_request_id_reaches_the_neuron(json_gateway: JsonGateway, embedded: Embedded) -> None:
    # A fresh gateway fetches the model's tokenizer from the neuron for its first request: that
    # call is made for this request and names it. (The module's first request, whichever.)
    client = openai.OpenAI(base_url=json_gateway.base_url, api_key=API_KEY, max_retries=0)
    client.chat.completions.create(
        model="cortex-tiny",
        messages=[{"role": "user", "content": "Hello"}],
        max_tokens=2,
        extra_headers={"x-request-id": "test-json-neuron"},
    )
    gateway_ids = {
        e["request_id"]
        for e in json_lines(json_gateway.log)
        if e.get("logger") == "cortex.requests"
    }
    line = wait_for_line(
        neuron_log(embedded),
        lambda line: (
            "/models/cortex-tiny/tokenizer 200" in line
            and fields(line).get("request_id") in gateway_ids
        ),
    )
    assert line.split("cortex.neuron.api: ")[1].startswith("GET /models/cortex-tiny/tokenizer")
