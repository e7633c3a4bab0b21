"""Graceful shutdown of a gateway (its own process, in front of the replay fleet's neuron): on
SIGTERM an answer in flight finishes; one that outlives the drain timeout is cut, and its
stream says so with an error event in either dialect, never with a normal stop."""

from __future__ import annotations

import contextlib
import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from cortex.launch import Gateway, loopback_gateway, running_gateway
from tests.gateway.conftest import API_KEY, ReplayFleet


@contextlib.contextmanager
def own_gateway(folder: Path, fleet: ReplayFleet, drain_timeout_s: float) -> Iterator[Gateway]:
    """A gateway of its own, to stop; the model is made ready first (no cold load in a test)."""
    httpx.post(
        fleet.openai_url + "/chat/completions",
        json={
            "model": "replay-hermes",
            "max_tokens": 2,
            "messages": [{"role": "user", "content": "hi"}],
        },
        headers={"authorization": f"Bearer {API_KEY}"},
        timeout=120,
    ).raise_for_status()
    config = loopback_gateway(
        {"replay-node": fleet.neuron_url},
        api_keys=(API_KEY,),
        poll_interval_s=0.5,
        request_timeout_s=30,
        ping_interval_s=0.3,
        drain_timeout_s=drain_timeout_s,
    )
    with running_gateway(folder / "cortex.toml", config) as gateway:
        # Ready once it has polled the neuron and sees the model loaded.
        deadline = time.monotonic() + 30
        while (
            httpx.get(f"{gateway.url}/v1/models", headers={"x-api-key": API_KEY}).json()["data"][0][
                "loaded_on"
            ]
            == []
            and time.monotonic() < deadline
        ):
            time.sleep(0.2)
        yield gateway


def stream_lines(url: str, path: str, body: dict[str, object]) -> Iterator[str]:
    headers = {"x-api-key": API_KEY, "anthropic-version": "2023-06-01"}
    with httpx.stream("POST", url + path, json=body, headers=headers, timeout=30) as response:
        assert response.status_code == 200, response.read()
        yield from response.iter_lines()


def test_sigterm_lets_the_answer_in_flight_finish(
    replay_fleet: ReplayFleet, tmp_path: Path
) -> None:
    with own_gateway(tmp_path, replay_fleet, drain_timeout_s=15) as gateway:
        process, url, log = gateway.process, gateway.url, gateway.log
        body = {
            "model": "replay-hermes",
            "stream": True,
            "max_tokens": 20,
            "messages": [{"role": "user", "content": "take your time"}],  # 1 s to its first token
        }
        lines = stream_lines(url, "/v1/chat/completions", body)
        first = next(line for line in lines if line.startswith("data:"))
        assert '"role":"assistant"' in first  # the stream is open, no token yet
        process.send_signal(signal.SIGTERM)
        rest = [line.removeprefix("data: ") for line in lines if line.startswith("data:")]
        assert rest[-1] == "[DONE]"
        chunks = [json.loads(line) for line in rest[:-1]]
        assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == (
            "Ready now."
        )
        assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
        # New requests during the drain are refused with Retry-After; then the process ends.
        assert process.wait(30) == 0, log.read_text()[-2000:]


def test_a_stream_that_outlives_the_drain_is_cut_with_an_error(
    replay_fleet: ReplayFleet, tmp_path: Path
) -> None:
    with own_gateway(tmp_path, replay_fleet, drain_timeout_s=1.0) as gateway:
        process, url, log = gateway.process, gateway.url, gateway.log
        slow = [{"role": "user", "content": "never finish"}]  # 4 s to its first token
        chat = stream_lines(
            url,
            "/v1/chat/completions",
            {"model": "replay-hermes", "stream": True, "max_tokens": 20, "messages": slow},
        )
        message = stream_lines(
            url,
            "/v1/messages",
            {"model": "replay-hermes", "stream": True, "max_tokens": 20, "messages": slow},
        )
        assert '"role":"assistant"' in next(line for line in chat if line.startswith("data:"))
        assert next(line for line in message if line.startswith("event:")) == (
            "event: message_start"
        )
        process.send_signal(signal.SIGTERM)
        chat_rest = [line for line in chat if line.startswith("data:")]
        assert chat_rest[-1] == "data: [DONE]"
        error = json.loads(chat_rest[-2].removeprefix("data: "))
        assert "cut before it was complete" in error["error"]["message"]
        assert not any('"finish_reason":"' in line for line in chat_rest)
        message_rest = list(message)
        events = [line for line in message_rest if line.startswith("event:")]
        assert events[-1] == "event: error", message_rest
        assert "event: message_stop" not in events
        assert "cut before it was complete" in message_rest[-2] + message_rest[-1]
        assert process.wait(30) == 0, log.read_text()[-2000:]
