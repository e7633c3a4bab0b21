"""Property-based tests: translation keeps what both dialects can express.

Requests: one conversation written in both dialects (system, text turns, tool calls and their
results, tools, tool choice, stop, max_tokens, temperature, top_p) becomes the same canonical
request. Responses: one canonical event stream, encoded in both dialects and read back by each
official SDK's own stream accumulator, gives the same text, calls, stop reason and usage — and
the same as the non-streamed bodies.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import replace
from typing import Any

from anthropic.lib.streaming._messages import accumulate_event
from anthropic.types import ParsedMessage
from hypothesis import given, settings
from hypothesis import strategies as st
from openai.lib.streaming.chat import ChatCompletionStreamState
from openai.types.chat import ChatCompletionChunk

from control_plane.anthropic import translate as anthropic_translate
from control_plane.anthropic.protocol import MessagesRequest
from control_plane.canonical import (
    ChatRequest,
    Event,
    Finished,
    FinishReason,
    ReasoningDelta,
    Started,
    TextDelta,
    ToolCallDelta,
    ToolCallStart,
    Usage,
    Waiting,
)
from control_plane.openai import translate as openai_translate
from control_plane.openai.protocol import ChatCompletionRequest

# What each dialect calls the canonical reasons, written from their API references (OpenAI's
# `finish_reason`, Anthropic's `stop_reason`), not taken from the encoders under test.
OPENAI_FINISH = {
    FinishReason.STOP: "stop",
    FinishReason.STOP_SEQUENCE: "stop",
    FinishReason.LENGTH: "length",
    FinishReason.TOOL_CALLS: "tool_calls",
}
ANTHROPIC_STOP = {
    FinishReason.STOP: "end_turn",
    FinishReason.STOP_SEQUENCE: "stop_sequence",
    FinishReason.LENGTH: "max_tokens",
    FinishReason.TOOL_CALLS: "tool_use",
}

text = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=1, max_size=30)
names = st.from_regex(r"[a-zA-Z][a-zA-Z0-9_-]{0,15}", fullmatch=True)
ids = st.from_regex(r"[a-zA-Z0-9_-]{1,24}", fullmatch=True)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**6), 10**6) | text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(names, inner, max_size=3),
    max_leaves=6,
)
arguments = st.dictionaries(names, json_values, max_size=4)


@st.composite
def conversations(draw: st.DrawFn) -> dict[str, Any]:
    """A conversation as plain data, in no dialect yet."""
    tool_names = draw(st.lists(names, min_size=0, max_size=3, unique=True))
    turns: list[dict[str, Any]] = []
    for number in range(draw(st.integers(0, 3))):
        turns.append(
            {"role": "user", "text": draw(text), "results": turns[-1]["calls"] if turns else []}
        )
        calls = (
            [
                {"id": f"{draw(ids)}{number}{index}", "name": name, "input": draw(arguments)}
                for index, name in enumerate(
                    draw(st.lists(st.sampled_from(tool_names), max_size=2))
                )
            ]
            if tool_names
            else []
        )
        turns.append({"role": "assistant", "text": draw(st.none() | text), "calls": calls})
    results = turns[-1]["calls"] if turns else []
    turns.append(
        {
            "role": "user",
            "text": draw(st.none() | text) if results else draw(text),
            "results": results,
        }
    )
    choice = draw(
        st.sampled_from(["auto", "required", "none", "named"]) if tool_names else st.just("auto")
    )
    return {
        "system": draw(st.none() | text.filter(lambda t: not t.startswith("x-anthropic"))),
        "turns": turns,
        "tools": [
            {"name": n, "description": draw(text), "schema": {"type": "object", "properties": {}}}
            for n in tool_names
        ],
        "choice": choice,
        "named": draw(st.sampled_from(tool_names)) if choice == "named" else None,
        "parallel": draw(st.booleans()),
        "stop": draw(st.lists(text, max_size=4)),
        "max_tokens": draw(st.integers(1, 100_000)),
        "temperature": draw(st.none() | st.floats(0, 1)),
        "top_p": draw(st.none() | st.floats(0.01, 1)),
        "result_text": {
            c["id"]: draw(text) for t in turns if t["role"] == "assistant" for c in t["calls"]
        },
    }


def openai_body(c: dict[str, Any]) -> dict[str, Any]:
    messages: list[dict[str, Any]] = (
        [{"role": "system", "content": c["system"]}] if c["system"] else []
    )
    for turn in c["turns"]:
        if turn["role"] == "assistant":
            message: dict[str, Any] = {"role": "assistant", "content": turn["text"]}
            if turn["calls"]:
                message["tool_calls"] = [
                    {
                        "id": call["id"],
                        "type": "function",
                        "function": {"name": call["name"], "arguments": json.dumps(call["input"])},
                    }
                    for call in turn["calls"]
                ]
            messages.append(message)
            continue
        for call in turn["results"]:
            messages.append(
                {
                    "role": "tool",
                    "tool_call_id": call["id"],
                    "content": c["result_text"][call["id"]],
                }
            )
        if turn["text"] is not None:
            messages.append({"role": "user", "content": turn["text"]})
    choice: Any = c["choice"]
    if choice == "named":
        choice = {"type": "function", "function": {"name": c["named"]}}
    body = {
        "model": "m",
        "messages": messages,
        "max_completion_tokens": c["max_tokens"],
        "stop": c["stop"],
        "temperature": c["temperature"],
        "top_p": c["top_p"],
    }
    if c["tools"]:
        body["tools"] = [
            {
                "type": "function",
                "function": {
                    "name": t["name"],
                    "description": t["description"],
                    "parameters": t["schema"],
                },
            }
            for t in c["tools"]
        ]
        body["tool_choice"] = choice
        body["parallel_tool_calls"] = c["parallel"]  # Anthropic says it only with tools
    return body


def anthropic_body(c: dict[str, Any]) -> dict[str, Any]:
    messages = []
    for turn in c["turns"]:
        blocks: list[dict[str, Any]] = []
        if turn["role"] == "assistant":
            if turn["text"] is not None:
                blocks.append({"type": "text", "text": turn["text"]})
            blocks += [
                {"type": "tool_use", "id": x["id"], "name": x["name"], "input": x["input"]}
                for x in turn["calls"]
            ]
        else:
            blocks += [
                {
                    "type": "tool_result",
                    "tool_use_id": x["id"],
                    "content": c["result_text"][x["id"]],
                }
                for x in turn["results"]
            ]
            if turn["text"] is not None:
                blocks.append({"type": "text", "text": turn["text"]})
        messages.append({"role": turn["role"], "content": blocks})
    body: dict[str, Any] = {
        "model": "m",
        "messages": messages,
        "max_tokens": c["max_tokens"],
        "stop_sequences": c["stop"],
        "temperature": c["temperature"],
        "top_p": c["top_p"],
    }
    if c["system"]:
        body["system"] = c["system"]
    if c["tools"]:
        body["tools"] = [
            {"name": t["name"], "description": t["description"], "input_schema": t["schema"]}
            for t in c["tools"]
        ]
        kind = {"auto": "auto", "required": "any", "none": "none", "named": "tool"}[c["choice"]]
        body["tool_choice"] = {"type": kind, "disable_parallel_tool_use": not c["parallel"]}
        if kind == "tool":
            body["tool_choice"]["name"] = c["named"]
    return body


def comparable(request: ChatRequest) -> ChatRequest:
    """Arguments as values (each dialect spells JSON its own way); tool messages without the
    name only one dialect carries; no ids of the HTTP request; no reasoning switch (without a
    field asking, Anthropic's API does not think and OpenAI's leaves it to the model)."""
    messages = tuple(
        replace(
            m,
            tool_calls=tuple(replace(t, arguments=json.loads(t.arguments)) for t in m.tool_calls),
            name=None,
        )
        for m in request.messages
    )
    return replace(request, messages=messages, request_id="", reasoning=None)


@settings(max_examples=150, deadline=None)
@given(conversations())
def test_both_dialects_give_the_same_canonical_request(conversation: dict[str, Any]) -> None:
    from_openai = openai_translate.chat_request(
        ChatCompletionRequest.model_validate(openai_body(conversation)), "a"
    )
    from_anthropic = anthropic_translate.chat_request(
        MessagesRequest.model_validate(anthropic_body(conversation)), "b"
    )
    assert comparable(from_openai) == comparable(from_anthropic)
    assert from_openai.max_tokens == conversation["max_tokens"]
    assert from_openai.stop == tuple(conversation["stop"])
    assert from_anthropic.continue_final is False  # the conversation ends with the user
    assert (from_openai.reasoning, from_anthropic.reasoning) == (None, False)


# ---- responses ----------------------------------------------------------------------------------


@st.composite
def event_streams(draw: st.DrawFn) -> list[Event]:
    prompt = draw(st.integers(0, 10_000))
    events: list[Event] = [Started("m", prompt)]
    # A reasoning model's reasoning comes first, before any answer or call.
    events.extend(ReasoningDelta(piece) for piece in draw(st.lists(text, max_size=3)))
    calls = 0
    for _ in range(draw(st.integers(0, 5))):
        if draw(st.booleans()):
            events.append(Waiting())
        if draw(st.booleans()):
            events.extend(
                TextDelta(piece) for piece in draw(st.lists(text, min_size=1, max_size=3))
            )
        else:
            serialised = json.dumps(draw(arguments), ensure_ascii=False, separators=(",", ":"))
            cuts = sorted(draw(st.lists(st.integers(0, len(serialised)), max_size=4)))
            bounds = [0, *cuts, len(serialised)]
            events.append(ToolCallStart(calls, draw(ids), draw(names)))
            events.extend(
                ToolCallDelta(calls, serialised[a:b])
                for a, b in itertools.pairwise(bounds)
                if b > a
            )
            calls += 1
    if calls:
        reason, sequence = FinishReason.TOOL_CALLS, None
    else:
        reason = draw(
            st.sampled_from([FinishReason.STOP, FinishReason.LENGTH, FinishReason.STOP_SEQUENCE])
        )
        sequence = draw(text) if reason is FinishReason.STOP_SEQUENCE else None
    completion = draw(st.integers(0, 10_000))
    usage = Usage(prompt, completion, reasoning_tokens=draw(st.integers(0, completion)))
    events.append(Finished(reason, usage, sequence))
    return events


def sse_payloads(stream: bytes) -> list[dict[str, Any]]:
    payloads = []
    for frame in stream.decode().split("\n\n"):
        for line in frame.split("\n"):
            if line.startswith("data: ") and line != "data: [DONE]":
                payloads.append(json.loads(line.removeprefix("data: ")))
    return payloads


@settings(max_examples=150, deadline=None)
@given(event_streams())
def test_both_encoders_tell_the_sdks_the_same_answer(events: list[Event]) -> None:
    finished = events[-1]
    assert isinstance(finished, Finished)
    text = "".join(e.text for e in events if isinstance(e, TextDelta))
    reasoning = "".join(e.text for e in events if isinstance(e, ReasoningDelta))
    calls: dict[int, list[str]] = {}
    for event in events:
        if isinstance(event, ToolCallStart):
            calls[event.index] = [event.id, event.name, ""]
        elif isinstance(event, ToolCallDelta):
            calls[event.index][2] += event.arguments
    expected_calls = [(i, n, json.loads(a or "{}")) for i, n, a in calls.values()]

    encoder = openai_translate.ChunkEncoder("chatcmpl-x", "m", include_usage=True)
    stream = encoder.start() + b"".join(
        encoder.keep_alive() if isinstance(e, Waiting) else encoder.event(e) for e in events
    )
    state = ChatCompletionStreamState()
    for payload in sse_payloads(stream):
        state.handle_chunk(ChatCompletionChunk.model_validate(payload))
    completion = state.current_completion_snapshot  # (the final parse refuses "length")
    message = completion.choices[0].message
    assert (message.content or "") == text
    assert [
        (c.id.removeprefix("call_"), c.function.name, json.loads(c.function.arguments or "{}"))
        for c in message.tool_calls or []
    ] == expected_calls
    assert completion.choices[0].finish_reason == OPENAI_FINISH[finished.reason]
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == finished.usage.prompt_tokens
    assert completion.usage.completion_tokens == finished.usage.completion_tokens
    assert completion.usage.completion_tokens_details is not None
    details = completion.usage.completion_tokens_details
    assert details.reasoning_tokens == finished.usage.reasoning_tokens
    assert (getattr(message, "reasoning_content", None) or "") == reasoning

    thinking = anthropic_translate.Thinking.asked({"type": "enabled", "budget_tokens": 1024})
    anthropic_encoder = anthropic_translate.MessageStreamEncoder("msg_x", "m", thinking)
    snapshot: ParsedMessage[None] | None = None
    buffers: dict[int, bytes] = {}
    for payload in sse_payloads(b"".join(anthropic_encoder.event(e) for e in events)):
        if payload["type"] != "ping":
            # accumulate_event builds the event from the raw JSON itself, as the SDK's stream does.
            snapshot = accumulate_event(event=payload, current_snapshot=snapshot, json_bufs=buffers)  # type: ignore[arg-type]
    assert snapshot is not None
    assert "".join(b.text for b in snapshot.content if b.type == "text") == text
    thought = [b for b in snapshot.content if b.type == "thinking"]
    assert [(b.thinking, b.signature) for b in thought] == (
        [(reasoning, anthropic_translate.signature_for(reasoning))] if reasoning else []
    )
    assert snapshot.content[: len(thought)] == thought  # before the text and the calls
    assert [
        (b.id.removeprefix("toolu_"), b.name, b.input)
        for b in snapshot.content
        if b.type == "tool_use"
    ] == expected_calls
    assert snapshot.stop_reason == ANTHROPIC_STOP[finished.reason]
    assert snapshot.stop_sequence == finished.stop_sequence
    assert snapshot.usage.input_tokens == finished.usage.prompt_tokens
    assert snapshot.usage.output_tokens == finished.usage.completion_tokens

    # The non-streamed bodies say the same.
    collected = [(i, n, a) for i, n, a in calls.values()]
    body = openai_translate.chat_completion(
        "chatcmpl-x", "m", text, collected, finished, reasoning=reasoning
    )
    assert (body["choices"][0]["message"]["content"] or "") == text
    assert body["choices"][0]["message"].get("reasoning_content", "") == reasoning
    assert len(body["choices"][0]["message"].get("tool_calls", [])) == len(calls)
    whole = anthropic_translate.message_body(
        "msg_x", "m", text, collected, finished, reasoning, thinking
    )
    assert [b for b in whole["content"] if b["type"] == "thinking"] == [
        b.model_dump() for b in thought
    ]
    assert [b.get("input") for b in whole["content"] if b["type"] == "tool_use"] == [
        c[2] for c in expected_calls
    ]
    assert whole["stop_reason"] == snapshot.stop_reason
