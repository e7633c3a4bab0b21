"""Stream behaviour through the replay fake: keep-alives while the first token is slow, a node
failing mid-stream, stop sequences, and inline system messages reaching the model in place."""

from __future__ import annotations

import json
import time
from typing import Any

import anthropic
import httpx
import openai
import pytest
from anthropic.types import TextBlock

from tests.gateway.conftest import ReplayFleet


def raw_stream(fleet: ReplayFleet, path: str, body: dict[str, object]) -> list[str]:
    headers = {"x-api-key": fleet.api_key, "anthropic-version": "2023-06-01"}
    # A generous timeout: the first request to a fresh gateway builds the model's tokenizer
    # before its response starts (~10 s on a loaded 2-core machine; httpx's default is 5 s).
    with httpx.stream(
        "POST", fleet.root_url + path, json=body, headers=headers, timeout=60
    ) as response:
        assert response.status_code == 200
        return list(response.iter_lines())


def events_of(lines: list[str]) -> list[str]:
    return [line.removeprefix("event: ") for line in lines if line.startswith("event: ")]


def test_anthropic_pings_while_the_first_token_is_slow(replay_fleet: ReplayFleet) -> None:
    body = {
        "model": "replay-hermes",
        "max_tokens": 20,
        "stream": True,
        "messages": [{"role": "user", "content": "take your time"}],
    }
    names = events_of(raw_stream(replay_fleet, "/v1/messages", body))
    assert names[0] == "message_start"
    first_block = names.index("content_block_start")
    assert names[1:first_block].count("ping") >= 2
    assert names[-1] == "message_stop"


def test_openai_keep_alives_while_the_first_token_is_slow(
    replay_fleet: ReplayFleet, oai: openai.OpenAI
) -> None:
    body = {
        "model": "replay-hermes",
        "stream": True,
        "messages": [{"role": "user", "content": "take your time"}],
    }
    lines = [line for line in raw_stream(replay_fleet, "/v1/chat/completions", body) if line]
    assert lines.count(": keep-alive") >= 2
    assert lines[-1] == "data: [DONE]"
    # The SDK skips the comments and gets the answer.
    stream = oai.chat.completions.create(
        model="replay-hermes",
        messages=[{"role": "user", "content": "take your time"}],
        stream=True,
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == "Ready now."


def test_anthropic_node_failure_mid_stream_ends_with_an_error_event(
    replay_fleet: ReplayFleet, claude: anthropic.Anthropic
) -> None:
    body = {
        "model": "replay-hermes",
        "max_tokens": 50,
        "stream": True,
        "messages": [{"role": "user", "content": "break mid-stream please"}],
    }
    lines = raw_stream(replay_fleet, "/v1/messages", body)
    names = events_of(lines)
    assert names[0] == "message_start" and "content_block_delta" in names
    assert names[-1] == "error" and "message_stop" not in names
    error_at = lines.index("event: error") + 1
    error = json.loads(lines[error_at].removeprefix("data: "))
    assert error["type"] == "error" and error["error"]["type"] == "api_error"
    assert "illegal memory access" in error["error"]["message"]

    with (
        pytest.raises(anthropic.APIStatusError) as caught,
        claude.messages.stream(
            model="replay-hermes",
            max_tokens=50,
            messages=[{"role": "user", "content": "break mid-stream please"}],
        ) as stream,
    ):
        for _ in stream:
            pass
    assert isinstance(caught.value.body, dict)
    assert caught.value.body["error"]["type"] == "api_error"


def test_openai_node_failure_mid_stream_ends_with_an_error_chunk(
    replay_fleet: ReplayFleet, oai: openai.OpenAI
) -> None:
    body = {
        "model": "replay-hermes",
        "stream": True,
        "messages": [{"role": "user", "content": "break mid-stream please"}],
    }
    lines = [line for line in raw_stream(replay_fleet, "/v1/chat/completions", body) if line]
    assert lines[-1] == "data: [DONE]"
    error = json.loads(lines[-2].removeprefix("data: "))
    assert error["error"]["type"] == "server_error"
    assert "illegal memory access" in error["error"]["message"]
    with pytest.raises(openai.APIError):
        for _ in oai.chat.completions.create(
            model="replay-hermes",
            messages=[{"role": "user", "content": "break mid-stream please"}],
            stream=True,
        ):
            pass


def test_stop_sequences_in_both_dialects(oai: openai.OpenAI, claude: anthropic.Anthropic) -> None:
    messages: list[Any] = [{"role": "user", "content": "count with a stop"}]  # both SDKs: JSON
    message = claude.messages.create(
        model="replay-hermes",
        max_tokens=50,
        messages=messages,
        stop_sequences=["STOP", "zzz"],
    )
    assert message.stop_reason == "stop_sequence" and message.stop_sequence == "STOP"
    assert isinstance(message.content[0], TextBlock)
    assert message.content[0].text == "one two three "
    with claude.messages.stream(
        model="replay-hermes",
        max_tokens=50,
        messages=messages,
        stop_sequences=["STOP"],
    ) as stream:
        streamed = stream.get_final_message()
    assert streamed.stop_reason == "stop_sequence" and streamed.stop_sequence == "STOP"
    assert isinstance(streamed.content[0], TextBlock)
    assert streamed.content[0].text == "one two three "

    reply = oai.chat.completions.create(model="replay-hermes", messages=messages, stop="STOP")
    assert reply.choices[0].finish_reason == "stop"
    assert reply.choices[0].message.content == "one two three "
    without = claude.messages.create(model="replay-hermes", max_tokens=50, messages=messages)
    assert without.stop_reason == "end_turn" and without.stop_sequence is None


def test_max_tokens_reached(claude: anthropic.Anthropic) -> None:
    message = claude.messages.create(
        model="replay-hermes",
        max_tokens=2,
        messages=[{"role": "user", "content": "count with a stop"}],
    )
    assert message.stop_reason == "max_tokens" and message.usage.output_tokens == 2


def test_inline_system_message_is_folded_into_the_next_user_turn(
    claude: anthropic.Anthropic, oai: openai.OpenAI
) -> None:
    # Both SDKs, and a system turn inline that Anthropic's types do not allow: plain JSON.
    messages: list[Any] = [
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": "first answer"},
        {"role": "system", "content": "Remember: be brief."},
        {"role": "user", "content": "echo the prompt"},
    ]
    message = claude.messages.create(model="replay-hermes", max_tokens=100, messages=messages)
    assert isinstance(message.content[0], TextBlock)
    assert message.content[0].text == "Remember: be brief.\n\necho the prompt"
    reply = oai.chat.completions.create(model="replay-hermes", messages=messages)
    assert reply.choices[0].message.content == "Remember: be brief.\n\necho the prompt"


def cancelled_count(fleet: ReplayFleet) -> float:
    for line in httpx.get(fleet.metrics_url).text.splitlines():
        labels = ('api="anthropic"', 'outcome="cancelled"')
        if line.startswith("cortex_requests_total{") and all(x in line for x in labels):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_a_client_that_goes_away_cancels_its_request(replay_fleet: ReplayFleet) -> None:
    """The gateway counts the request cancelled, and the cancellation reaches the engine through
    Triton (the replay fake logs the requests Triton reports cancelled)."""
    before = cancelled_count(replay_fleet)
    body = {
        "model": "replay-hermes",
        "max_tokens": 20,
        "stream": True,
        "messages": [{"role": "user", "content": "leave before the answer"}],
    }
    headers = {"x-api-key": replay_fleet.api_key, "anthropic-version": "2023-06-01"}
    with httpx.stream(
        "POST", replay_fleet.root_url + "/v1/messages", json=body, headers=headers
    ) as response:
        for line in response.iter_lines():
            if line == "event: ping":
                break  # gone while the model is still "prefilling"
    deadline = time.monotonic() + 10
    while cancelled_count(replay_fleet) <= before:
        assert time.monotonic() < deadline, "the request was not cancelled"
        time.sleep(0.1)
    engine_log = replay_fleet.replay_source / "cancelled.log"
    while not engine_log.exists() or "leave before the answer" not in engine_log.read_text():
        assert time.monotonic() < deadline, "the engine never saw the request cancelled"
        time.sleep(0.1)
