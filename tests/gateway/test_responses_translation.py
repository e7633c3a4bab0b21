"""Responses translation, as plain functions and as properties against the Chat dialect.

Requests: one conversation written as a Chat request and as a Responses request (system text
as `instructions` or as a system/developer item, text turns, function calls and their outputs,
tools, tool choice, stop, max tokens, temperature, top_p) becomes the same canonical request.
Responses: one canonical event stream, encoded in both OpenAI dialects and read back by the
openai SDK's own accumulators (`ChatCompletionStreamState`, `ResponseStreamState`, with every
event validated by the SDK's types), gives the same text, calls, finish and usage — and the
same as the non-streamed response object.
"""

from __future__ import annotations

import json
import typing
from pathlib import Path
from typing import Any

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from openai._types import omit
from openai.lib.streaming.chat import ChatCompletionStreamState
from openai.lib.streaming.responses._responses import ResponseStreamState
from openai.types.chat import ChatCompletionChunk
from openai.types.responses import Response, ResponseStreamEvent

from control_plane.canonical import (
    ChatRequest,
    Event,
    Finished,
    FinishReason,
    Message,
    TextDelta,
    ToolCall,
    ToolCallDelta,
    ToolCallStart,
    ToolChoice,
    Waiting,
)
from control_plane.errors import InvalidRequest
from control_plane.openai import translate as chat_translate
from control_plane.openai.protocol import ChatCompletionRequest
from control_plane.prompting import JSON_MODE_INSTRUCTION, fold_system_messages
from control_plane.responses import translate
from control_plane.responses.protocol import ResponsesRequest, field_path
from control_plane.responses.stream import ResponseStreamEncoder
from tests.gateway.test_translation_properties import (
    comparable,
    conversations,
    event_streams,
    openai_body,
    sse_payloads,
)

# The SDK's event class for each `type`, to validate each event strictly (and fast).
EVENT_TYPES: dict[str, Any] = {
    cls.model_fields["type"].annotation.__args__[0]: cls
    for cls in typing.get_args(typing.get_args(ResponseStreamEvent)[0])
}
# What a plain request's responses repeat of it (the SDK's Response requires some of it).
SETTINGS = translate.echo(ResponsesRequest.model_validate({"model": "m", "input": "x"}))


def translated(**body: Any) -> ChatRequest:
    return translate.chat_request(ResponsesRequest.model_validate({"model": "m", **body}), "r")


# ---- requests, as plain functions -------------------------------------------------------------


def test_codex_turns_become_chat_turns() -> None:
    """What Codex sends on its second request: instructions, a developer item, the user's
    turn, replayed reasoning, the call it ran and its output."""
    request = translated(
        instructions="You are Codex.",
        input=[
            {
                "type": "message",
                "role": "developer",
                "content": [{"type": "input_text", "text": "Sandbox: on."}],
            },
            {
                "type": "message",
                "role": "user",
                "content": [{"type": "input_text", "text": "list files"}],
            },
            {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": "opaque"},
            {
                "type": "message",
                "role": "assistant",
                "content": [{"type": "output_text", "text": "Running ls."}],
            },
            {
                "type": "function_call",
                "call_id": "call_1",
                "name": "shell",
                "arguments": '{"command":["ls"]}',
            },
            {"type": "function_call_output", "call_id": "call_1", "output": "README.md"},
        ],
        tools=[
            {"type": "function", "name": "shell", "parameters": {"type": "object"}, "strict": False}
        ],
        store=True,
        include=["reasoning.encrypted_content"],
        reasoning={"effort": "medium", "summary": "auto"},
        prompt_cache_key="session-1",
        stream=True,
    )
    assert request.messages == (
        Message(role="system", content="You are Codex."),
        Message(role="system", content="Sandbox: on."),
        Message(role="user", content="list files"),
        Message(
            role="assistant",
            content="Running ls.",
            tool_calls=(ToolCall("call_1", "shell", '{"command":["ls"]}'),),
        ),
        Message(role="tool", content="README.md", tool_call_id="call_1", name="shell"),
    )
    assert [t.name for t in request.tools] == ["shell"]


def test_namespaced_functions_have_one_name_in_the_prompt_and_two_on_the_wire() -> None:
    """Codex sends each MCP server's tools as a namespace; the model sees one name per
    function, and its calls come back as the function's name and its namespace."""
    body = {
        "input": [
            {"role": "user", "content": "look it up"},
            {
                "type": "function_call",
                "call_id": "call_1",
                "namespace": "mcp__docs",
                "name": "lookup",
                "arguments": "{}",
            },
            {
                "type": "function_call_output",
                "call_id": "call_1",
                "output": [{"type": "input_text", "text": "found"}],
            },
        ],
        "tools": [
            {"type": "function", "name": "shell"},
            {
                "type": "namespace",
                "name": "mcp__docs",
                "description": "Project docs",
                "tools": [
                    {
                        "type": "function",
                        "name": "lookup",
                        "description": "Find a page",
                        "parameters": {"type": "object"},
                    }
                ],
            },
        ],
    }
    request = translated(**body)
    assert [t.name for t in request.tools] == ["shell", "mcp__docs__lookup"]
    assert request.messages[1].tool_calls == (ToolCall("call_1", "mcp__docs__lookup", "{}"),)
    assert request.messages[2] == Message(
        role="tool", content="found", tool_call_id="call_1", name="mcp__docs__lookup"
    )
    names = translate.call_names(ResponsesRequest.model_validate({"model": "m", **body}))
    assert names == translate.CallNames({"mcp__docs__lookup": ("mcp__docs", "lookup")})
    item = translate.call_item("x", "mcp__docs__lookup", "{}", "completed", names)
    assert (item["namespace"], item["name"], item["call_id"]) == ("mcp__docs", "lookup", "call_x")
    plain = translate.call_item("y", "shell", "{}", "completed", names)
    assert "namespace" not in plain and plain["name"] == "shell"


APPLY_PATCH = {
    "type": "custom",
    "name": "apply_patch",
    "description": "Edit files.",
    "format": {
        "type": "grammar",
        "syntax": "lark",
        "definition": "start: begin_patch hunk+ end_patch",
    },
}
PATCH = "*** Begin Patch\n*** Add File: a.txt\n+hi\n*** End Patch"


def test_custom_tools_are_functions_of_one_string_in_the_prompt() -> None:
    """Codex's freeform apply_patch: a custom tool whose input is plain text in a grammar."""
    body = {
        "input": [
            {"role": "user", "content": "add a.txt"},
            {
                "type": "custom_tool_call",
                "call_id": "call_1",
                "name": "apply_patch",
                "input": PATCH,
            },
            {"type": "custom_tool_call_output", "call_id": "call_1", "output": "Done!"},
        ],
        "tools": [APPLY_PATCH, {"type": "function", "name": "shell"}],
    }
    request = translated(**body)
    patch_tool = request.tools[0]
    assert patch_tool.name == "apply_patch"
    assert patch_tool.description.startswith("Edit files.")
    assert "lark grammar:\nstart: begin_patch hunk+ end_patch" in patch_tool.description
    assert patch_tool.parameters == translate.CUSTOM_SCHEMA
    (call,) = request.messages[1].tool_calls
    assert (call.id, call.name, json.loads(call.arguments)) == (
        "call_1",
        "apply_patch",
        {"input": PATCH},
    )
    assert request.messages[2] == Message(
        role="tool", content="Done!", tool_call_id="call_1", name="apply_patch"
    )

    names = translate.call_names(ResponsesRequest.model_validate({"model": "m", **body}))
    assert names.custom == {"apply_patch"}
    item = translate.call_item("x", "apply_patch", json.dumps({"input": PATCH}), "completed", names)
    assert item == {
        "id": "ctc_x",
        "type": "custom_tool_call",
        "call_id": "call_x",
        "name": "apply_patch",
        "input": PATCH,
    }
    # What the model wrote when it did not follow the one-string shape is passed on as it is.
    assert translate.custom_input('{"patch": 1}') == '{"patch": 1}'
    assert translate.custom_input("*** Begin Patch") == "*** Begin Patch"


def test_string_input_instructions_and_json_format() -> None:
    request = translated(
        input="Give me JSON",
        instructions="Be brief.",
        text={"format": {"type": "json_schema", "name": "x", "schema": {"type": "object"}}},
        max_output_tokens=5,
        stop="END",
    )
    assert request.messages == (
        Message(role="system", content="Be brief."),
        Message(role="user", content="Give me JSON"),
    )
    assert request.json_mode and request.max_tokens == 5 and request.stop == ("END",)
    assert JSON_MODE_INSTRUCTION in fold_system_messages(request)[0].content
    assert not translated(input="x", text={"format": {"type": "text"}}).json_mode


def test_tool_choice_forms() -> None:
    tools = [
        {"type": "function", "name": "a", "parameters": {"type": "object"}},
        {"type": "function", "name": "b"},
    ]
    named = translated(input="x", tools=tools, tool_choice={"type": "function", "name": "b"})
    assert named.tool_choice is ToolChoice.NAMED and [t.name for t in named.tools] == ["b"]
    assert named.tools[0].parameters == {"type": "object", "properties": {}}
    allowed = translated(
        input="x",
        tools=tools,
        tool_choice={
            "type": "allowed_tools",
            "mode": "required",
            "tools": [{"type": "function", "name": "a"}],
        },
    )
    assert allowed.tool_choice is ToolChoice.REQUIRED and [t.name for t in allowed.tools] == ["a"]
    assert translated(input="x", tools=tools, tool_choice="none").tools == ()
    assert (
        translated(input="x", tools=tools, parallel_tool_calls=False).parallel_tool_calls is False
    )


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({"previous_response_id": "resp_1"}, "previous_response_id", "keeps no responses"),
        ({"input": [], "instructions": "Be brief."}, "input", "at least one turn"),
        ({"input": [{"type": "reasoning", "summary": []}]}, "input", "at least one turn"),
        ({"conversation": "conv_1"}, "conversation", "keeps no responses"),
        ({"background": True}, "background", "background"),
        ({"tools": [{"type": "local_shell"}]}, "tools[0].type", "'local_shell'"),
        (
            {
                "tools": [
                    {
                        "type": "namespace",
                        "name": "n",
                        "tools": [
                            {"type": "function", "name": "f"},
                            {"type": "local_shell"},
                        ],
                    }
                ]
            },
            "tools[0].tools[1].type",
            "'local_shell'",
        ),
        ({"tool_choice": {"type": "web_search"}}, "tool_choice.type", "hosted tool 'web_search'"),
        (
            {"tool_choice": {"type": "web_search_preview_2025_03_11"}},
            "tool_choice.type",
            "hosted tool",
        ),
        ({"tool_choice": {"type": "mcp", "server_label": "g"}}, "tool_choice.type", "'mcp'"),
        ({"tool_choice": "sometimes"}, "tool_choice", "tool_choice must be"),
        (
            {
                "input": [
                    {"role": "user", "content": [{"type": "input_image", "image_url": "data:"}]}
                ]
            },
            "input[0].content[0]",
            "'input_image'",
        ),
        (
            {"input": [{"type": "item_reference", "id": "msg_1"}]},
            "input[0].type",
            "'item_reference'",
        ),
        (
            {
                "input": [
                    {
                        "type": "function_call_output",
                        "call_id": "c",
                        "output": [{"type": "input_file"}],
                    }
                ]
            },
            "input[0].output[0]",
            "'input_file'",
        ),
    ],
)
def test_what_cortex_cannot_do_is_a_400_naming_the_field(
    body: dict[str, Any], param: str, words: str
) -> None:
    with pytest.raises(InvalidRequest) as caught:
        translated(**{"input": "x", **body})
    assert caught.value.param == param
    assert words in caught.value.message


def test_validation_errors_name_the_field_as_openai_spells_it() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as caught:
        ResponsesRequest.model_validate(
            {
                "model": "m",
                "input": [{"role": "user", "content": "a"}, {"type": "function_call", "name": "f"}],
            }
        )
    assert field_path(tuple(caught.value.errors()[0]["loc"])) == "input[1].call_id"
    with pytest.raises(ValidationError) as caught:
        ResponsesRequest.model_validate(
            {"model": "m", "input": "a", "tools": [{"type": "function"}]}
        )
    assert field_path(tuple(caught.value.errors()[0]["loc"])) == "tools[0].name"


def test_echo_says_store_false_whatever_was_asked() -> None:
    body = ResponsesRequest.model_validate(
        {
            "model": "m",
            "input": "x",
            "store": True,
            "instructions": "I",
            "tools": [{"type": "function", "name": "f", "parameters": {"type": "object"}}],
            "tool_choice": "required",
            "max_output_tokens": 9,
            "metadata": {"k": "v"},
        }
    )
    echo = translate.echo(body)
    assert echo["store"] is False and echo["previous_response_id"] is None
    assert echo["instructions"] == "I" and echo["max_output_tokens"] == 9
    assert echo["tools"] == [{"type": "function", "name": "f", "parameters": {"type": "object"}}]
    assert echo["tool_choice"] == "required" and echo["metadata"] == {"k": "v"}


# ---- requests, as a property against Chat -----------------------------------------------------


def responses_body(c: dict[str, Any], system_form: str, text_form: str) -> dict[str, Any]:
    """The conversation as a Responses request; `system_form` and `text_form` pick among the
    equivalent spellings the dialect allows."""

    def content(text: str, kind: str) -> Any:
        return text if text_form == "string" else [{"type": kind, "text": text}]

    items: list[dict[str, Any]] = []
    body: dict[str, Any] = {"model": "m"}
    if c["system"]:
        if system_form == "instructions":
            body["instructions"] = c["system"]
        else:
            items.append(
                {
                    "type": "message",
                    "role": system_form,
                    "content": content(c["system"], "input_text"),
                }
            )
    for turn in c["turns"]:
        if turn["role"] == "assistant":
            if turn["text"] is not None or not turn["calls"]:
                text = turn["text"] or ""
                items.append({"role": "assistant", "content": content(text, "output_text")})
            items += [
                {
                    "type": "function_call",
                    "call_id": call["id"],
                    "name": call["name"],
                    "arguments": json.dumps(call["input"]),
                }
                for call in turn["calls"]
            ]
            continue
        items += [
            {
                "type": "function_call_output",
                "call_id": call["id"],
                "output": c["result_text"][call["id"]],
            }
            for call in turn["results"]
        ]
        if turn["text"] is not None:
            items.append({"role": "user", "content": content(turn["text"], "input_text")})
    body.update(
        input=items,
        max_output_tokens=c["max_tokens"],
        stop=c["stop"],
        temperature=c["temperature"],
        top_p=c["top_p"],
    )
    if c["tools"]:
        body["tools"] = [
            {
                "type": "function",
                "name": t["name"],
                "description": t["description"],
                "parameters": t["schema"],
            }
            for t in c["tools"]
        ]
        choice: Any = c["choice"]
        body["tool_choice"] = (
            {"type": "function", "name": c["named"]} if choice == "named" else choice
        )
        body["parallel_tool_calls"] = c["parallel"]
    return body


@settings(max_examples=80, deadline=None)
@given(
    conversations(),
    st.sampled_from(["instructions", "system", "developer"]),
    st.sampled_from(["string", "parts"]),
)
def test_chat_and_responses_give_the_same_canonical_request(
    conversation: dict[str, Any], system_form: str, text_form: str
) -> None:
    from_chat = chat_translate.chat_request(
        ChatCompletionRequest.model_validate(openai_body(conversation)), "a"
    )
    from_responses = translate.chat_request(
        ResponsesRequest.model_validate(responses_body(conversation, system_form, text_form)), "b"
    )
    assert comparable(from_responses) == comparable(from_chat)
    assert from_responses.max_tokens == conversation["max_tokens"]


# ---- responses, as a property against Chat ----------------------------------------------------


def response_stream(events: list[Event]) -> bytes:
    encoder = ResponseStreamEncoder("resp_x", "m", SETTINGS, "msg_x")
    return b"".join(encoder.event(e) for e in events)


def read_responses_stream(stream: bytes) -> tuple[Any, Any]:
    """The SDK's accumulated snapshot (from the deltas) and the terminal event's response."""
    state = ResponseStreamState(input_tools=omit, text_format=omit)
    terminal: Any = None
    sequence = []
    for frame in stream.decode().split("\n\n")[:-1]:
        name, data = frame.split("\n", 1)
        payload = json.loads(data.removeprefix("data: "))
        assert name == f"event: {payload['type']}"  # the event line names the data's type
        sequence.append(payload["sequence_number"])
        event = EVENT_TYPES[payload["type"]].model_validate(payload)  # the SDK's types, strictly
        state.handle_event(event)
        if payload["type"] in ("response.completed", "response.incomplete"):
            terminal = event.response
    assert sequence == list(range(len(sequence)))
    # The accumulated snapshot is private to the SDK's state (its stream reads it the same way).
    return state._ResponseStreamState__current_snapshot, terminal  # type: ignore[attr-defined]


def chat_answer(events: list[Event]) -> Any:
    encoder = chat_translate.ChunkEncoder("chatcmpl-x", "m", include_usage=True)
    stream = encoder.start() + b"".join(
        encoder.keep_alive() if isinstance(e, Waiting) else encoder.event(e) for e in events
    )
    state = ChatCompletionStreamState()
    for payload in sse_payloads(stream):
        state.handle_chunk(ChatCompletionChunk.model_validate(payload))
    return state.current_completion_snapshot


def responses_view(output: list[Any]) -> tuple[str, list[tuple[str, str, Any]]]:
    text = "".join(part.text for item in output if item.type == "message" for part in item.content)
    calls = [
        (item.call_id, item.name, json.loads(item.arguments or "{}"))
        for item in output
        if item.type == "function_call"
    ]
    return text, calls


@settings(max_examples=80, deadline=None)
@given(event_streams())
def test_chat_and_responses_tell_the_sdk_the_same_answer(events: list[Event]) -> None:
    finished = events[-1]
    assert isinstance(finished, Finished)
    ids = [e.id for e in events if isinstance(e, ToolCallStart)]
    assume(len(set(ids)) == len(ids))  # the parser makes each call's id afresh
    completion = chat_answer(events)
    chat_message = completion.choices[0].message
    chat_calls = [
        (c.id, c.function.name, json.loads(c.function.arguments or "{}"))
        for c in chat_message.tool_calls or []
    ]

    snapshot, terminal = read_responses_stream(response_stream(events))
    for output in (snapshot.output, terminal.output):  # what the deltas and the end say
        assert responses_view(output) == (chat_message.content or "", chat_calls)
    cut = finished.reason is FinishReason.LENGTH
    assert terminal.status == ("incomplete" if cut else "completed")
    assert (terminal.incomplete_details is not None) == cut
    assert completion.choices[0].finish_reason == (
        "length" if cut else chat_translate.FINISH_REASONS[finished.reason]
    )
    assert terminal.usage.input_tokens == completion.usage.prompt_tokens
    assert terminal.usage.output_tokens == completion.usage.completion_tokens
    assert terminal.usage.total_tokens == completion.usage.total_tokens
    assert terminal.usage.input_tokens_details.cached_tokens == 0

    # The non-streamed response object says the same, and is one the SDK accepts.
    text = "".join(e.text for e in events if isinstance(e, TextDelta))
    calls: dict[int, list[str]] = {}
    for event in events:
        if isinstance(event, ToolCallStart):
            calls[event.index] = [event.id, event.name, ""]
        elif isinstance(event, ToolCallDelta):
            calls[event.index][2] += event.arguments
    collected = [(i, n, a) for i, n, a in calls.values()]
    body = translate.response_body("resp_x", "m", 1, SETTINGS, "msg_x", text, collected, finished)
    whole = Response.model_validate(body)
    assert responses_view(whole.output) == (chat_message.content or "", chat_calls)
    assert whole.status == terminal.status
    assert whole.output_text == (chat_message.content or "")


CODEX_DEFAULT = json.loads(
    (Path(__file__).parent / "fixtures" / "codex_default_request.json").read_text()
)


def test_hosted_tools_are_left_out_of_what_the_model_sees() -> None:
    body = {k: v for k, v in CODEX_DEFAULT.items() if k != "//"}
    request = ResponsesRequest.model_validate(body)
    chat = translate.chat_request(request, "r")
    names = [tool.name for tool in chat.tools]
    assert "web_search" not in names and len(names) == 8  # every tool the client runs stays
    assert "apply_patch" in names and any(name.endswith("search") for name in names)
    assert translate.hosted_tools(request) == ["web_search"]
    # Every hosted type and its preview and dated names, inside namespaces too.
    hosted = [
        {"type": kind}
        for kind in (
            "web_search_preview",
            "web_search_preview_2025_03_11",
            "file_search",
            "code_interpreter",
            "image_generation",
            "computer_use_preview",
            "mcp",
        )
    ]
    tools: list[dict[str, Any]] = [{"type": "function", "name": "f"}, *hosted]
    tools.append({"type": "namespace", "name": "n", "tools": [{"type": "mcp"}]})
    chat = translated(input="x", tools=tools)
    assert [tool.name for tool in chat.tools] == ["f"]
    openai_chat = ChatCompletionRequest.model_validate(
        {
            "model": "m",
            "messages": [{"role": "user", "content": "x"}],
            "tools": [
                {"type": "web_search"},
                {"type": "function", "function": {"name": "f"}},
                {"type": "file_search"},
            ],
        }
    )
    assert [t.name for t in chat_translate.chat_request(openai_chat, "r").tools] == ["f"]
    assert chat_translate.hosted_tools(openai_chat) == ["web_search", "file_search"]


@pytest.mark.parametrize(
    ("tools", "tool_choice", "param"),
    [
        ([{"type": "retrieval"}], None, "tools[0].type"),
        ([{"type": "function"}], None, "tools[0].function"),
        ([{"type": "web_search"}], {"type": "web_search"}, "tool_choice.type"),
    ],
)
def test_chat_tools_the_gateway_cannot_offer_are_400s_naming_the_field(
    tools: list[dict[str, Any]], tool_choice: dict[str, Any] | None, param: str
) -> None:
    body: dict[str, Any] = {
        "model": "m",
        "messages": [{"role": "user", "content": "x"}],
        "tools": tools,
    }
    if tool_choice is not None:
        body["tool_choice"] = tool_choice
    with pytest.raises(InvalidRequest) as caught:
        chat_translate.chat_request(ChatCompletionRequest.model_validate(body), "r")
    assert caught.value.param == param
