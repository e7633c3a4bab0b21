"""Anthropic request translation and system-message folding, as plain functions."""

from __future__ import annotations

import json
from typing import Any

import pytest

from control_plane.anthropic.protocol import CountTokensRequest, MessagesRequest
from control_plane.anthropic.translate import (
    MessageStreamEncoder,
    Thinking,
    chat_request,
    message_body,
    signature_for,
)
from control_plane.canonical import (
    ChatRequest,
    Finished,
    FinishReason,
    Message,
    ReasoningDelta,
    Started,
    TextDelta,
    ToolCall,
    ToolChoice,
    Usage,
)
from control_plane.errors import InvalidRequest
from control_plane.prompting import TOOL_REQUIRED_INSTRUCTION, fold_system_messages


def translate(**body: Any) -> ChatRequest:
    return chat_request(
        MessagesRequest.model_validate({"model": "m", "max_tokens": 9, **body}), "r"
    )


def test_claude_code_system_blocks_and_tool_turns() -> None:
    request = translate(
        system=[
            {"type": "text", "text": "x-anthropic-billing-header: cc_version=2.1; cch=00;"},
            {
                "type": "text",
                "text": "You are Claude Code.",
                "cache_control": {"type": "ephemeral"},
            },
            {"type": "text", "text": "Be careful."},
        ],
        messages=[
            {"role": "user", "content": "list files"},
            {
                "role": "assistant",
                "content": [
                    {"type": "redacted_thinking", "data": "opaque"},
                    {"type": "text", "text": "Running ls."},
                    {
                        "type": "tool_use",
                        "id": "toolu_1",
                        "name": "Bash",
                        "input": {"command": "ls"},
                    },
                    {"type": "tool_use", "id": "toolu_2", "name": "Glob", "input": {}},
                ],
            },
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "(interrupting)"},
                    {
                        "type": "tool_result",
                        "tool_use_id": "toolu_1",
                        "content": [{"type": "text", "text": "a.py"}],
                    },
                    {
                        "type": "tool_result",
                        "tool_use_id": "toolu_2",
                        "content": "denied",
                        "is_error": True,
                    },
                ],
            },
        ],
        tools=[
            {"name": "Bash", "input_schema": {"type": "object"}, "defer_loading": False},
            {"name": "Glob", "description": "glob", "input_schema": {"type": "object"}},
            {"type": "web_search_20250305", "name": "web_search"},
        ],
        tool_choice={"type": "any", "disable_parallel_tool_use": True},
        thinking={"type": "enabled", "budget_tokens": 2048},
    )
    assert request.messages == (
        Message(role="system", content="You are Claude Code.\n\nBe careful."),
        Message(role="user", content="list files"),
        Message(
            role="assistant",
            content="Running ls.",
            tool_calls=(
                ToolCall("toolu_1", "Bash", '{"command":"ls"}'),
                ToolCall("toolu_2", "Glob", "{}"),
            ),
        ),
        Message(role="tool", content="a.py", tool_call_id="toolu_1", name="Bash"),
        Message(role="tool", content="Error: denied", tool_call_id="toolu_2", name="Glob"),
        Message(role="user", content="(interrupting)"),
    )
    assert [t.name for t in request.tools] == ["Bash", "Glob"]  # the server tool is left out
    assert request.tool_choice is ToolChoice.REQUIRED and request.parallel_tool_calls is False
    assert not request.continue_final
    folded = fold_system_messages(request)
    assert folded[0].content.endswith(TOOL_REQUIRED_INSTRUCTION)


def test_same_role_turns_merge_and_a_final_assistant_turn_is_a_prefill() -> None:
    request = translate(
        messages=[
            {"role": "user", "content": "one"},
            {
                "role": "user",
                "content": [{"type": "text", "text": "two"}, {"type": "text", "text": "three"}],
            },
            {"role": "assistant", "content": "{"},
        ],
    )
    assert request.messages == (
        Message(role="user", content="one\n\ntwo\n\nthree"),
        Message(role="assistant", content="{"),
    )
    assert request.continue_final


def test_documents_become_text_and_images_are_refused_with_their_path() -> None:
    request = translate(
        messages=[
            {
                "role": "user",
                "content": [
                    {
                        "type": "document",
                        "title": "notes",
                        "source": {"type": "text", "media_type": "text/plain", "data": "abc"},
                    },
                    {"type": "search_result", "source": "x", "title": "t", "content": []},
                ],
            }
        ]
    )
    assert request.messages == (Message(role="user", content="notes\n\nabc"),)
    with pytest.raises(InvalidRequest) as caught:
        translate(
            messages=[
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "yes"},
                {
                    "role": "user",
                    "content": [{"type": "image", "source": {"type": "url", "url": "http://x"}}],
                },
            ]
        )
    assert caught.value.param == "messages.2.content.0"


def test_count_tokens_request_translates_like_a_message_request() -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "system": "s"}
    counted = chat_request(CountTokensRequest.model_validate(body), "r")
    created = translate(**{k: v for k, v in body.items() if k != "model"})
    assert counted.messages == created.messages and counted.tools == created.tools


def folded(*messages: Message) -> list[Message]:
    return fold_system_messages(ChatRequest(model="m", messages=messages))


def test_inline_system_messages_fold_in_place() -> None:
    user, assistant = Message(role="user", content="u"), Message(role="assistant", content="a")
    note = Message(role="system", content="note")
    assert folded(Message(role="system", content="s"), user, assistant, note, user) == [
        Message(role="system", content="s"),
        user,
        assistant,
        Message(role="user", content="note\n\nu"),
    ]
    # Never between a call and its result: the note waits for the next user turn.
    call = Message(role="assistant", tool_calls=(ToolCall("1", "f", "{}"),))
    result = Message(role="tool", content="r", tool_call_id="1")
    assert folded(user, call, note, result, user) == [
        user,
        call,
        result,
        Message(role="user", content="note\n\nu"),
    ]
    # With no user turn after it, the previous one takes it; with none at all, the system prompt.
    assert folded(user, assistant, note) == [Message(role="user", content="u\n\nnote"), assistant]
    assert folded(note, note) == [Message(role="system", content="note\n\nnote")]


def test_omitted_thinking_is_a_signed_block_without_its_text() -> None:
    thinking = Thinking.asked({"type": "adaptive", "display": "omitted"})
    encoder = MessageStreamEncoder("msg_1", "m", thinking)
    out = encoder.event(Started("m", 3)) + encoder.event(ReasoningDelta("secret plan"))
    out += encoder.event(TextDelta("Hi.")) + encoder.event(Finished(FinishReason.STOP, Usage(3, 4)))
    payloads = [json.loads(f.split("data: ", 1)[1]) for f in out.decode().split("\n\n")[:-1]]
    deltas = [p["delta"]["type"] for p in payloads if p["type"] == "content_block_delta"]
    assert deltas == ["signature_delta", "text_delta"]  # no thinking_delta
    signed = {"type": "thinking", "thinking": "", "signature": signature_for("secret plan")}
    assert payloads[1]["content_block"] == {"type": "thinking", "thinking": "", "signature": ""}
    assert payloads[2]["delta"] == {"type": "signature_delta", "signature": signed["signature"]}
    whole = message_body(
        "msg_1", "m", "Hi.", [], Finished(FinishReason.STOP, Usage(3, 4)), "secret plan", thinking
    )
    assert whole["content"] == [signed, {"type": "text", "text": "Hi."}]
