"""Full tool round trips in both dialects, through the replay fake: the model asks for a tool, the
client runs it and sends the result back, the model continues with what the tool said. The
official SDKs are the clients; tokenization, templates, parsing and translation are all real."""

from __future__ import annotations

import json
from typing import Any

import anthropic
import openai
from anthropic.types import TextBlock, ToolParam, ToolUseBlock
from openai.types.chat import ChatCompletionMessageFunctionToolCall, ChatCompletionToolParam
from openai.types.shared_params import FunctionDefinition

WEATHER_TOOL: FunctionDefinition = {
    "name": "get_weather",
    "description": "Current weather in a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}, "unit": {"type": "string"}},
        "required": ["city"],
    },
}
OPENAI_TOOLS: list[ChatCompletionToolParam] = [{"type": "function", "function": WEATHER_TOOL}]
ANTHROPIC_TOOLS: list[ToolParam] = [
    {
        "name": WEATHER_TOOL["name"],
        "description": WEATHER_TOOL["description"],
        "input_schema": WEATHER_TOOL["parameters"],
    }
]
TOOL_RESULT = "22 degrees and sunny"


def test_openai_streamed_tool_round_trip(oai: openai.OpenAI) -> None:
    messages: list[Any] = [  # grows with JSON built from the replies
        {"role": "user", "content": "What is the weather in Paris?"}
    ]
    stream = oai.chat.completions.create(
        model="replay-hermes",
        messages=messages,
        tools=OPENAI_TOOLS,
        stream=True,
    )
    content, finish, chunks = "", None, 0
    calls: dict[int, dict[str, Any]] = {}
    for chunk in stream:
        chunks += 1
        for choice in chunk.choices:
            content += choice.delta.content or ""
            for delta in choice.delta.tool_calls or []:
                call = calls.setdefault(delta.index, {"id": None, "name": "", "arguments": ""})
                if delta.id:
                    assert call["id"] is None, "id sent twice for one call"
                    call["id"] = delta.id
                if delta.function and delta.function.name:
                    call["name"] += delta.function.name
                if delta.function and delta.function.arguments:
                    call["arguments"] += delta.function.arguments
            finish = choice.finish_reason or finish
    assert finish == "tool_calls"
    assert "<tool_call>" not in content and content.strip() == ""
    assert list(calls) == [0]
    call = calls[0]
    assert call["name"] == "get_weather"
    assert str(call["id"]).startswith("call_")
    assert json.loads(str(call["arguments"])) == {"city": "Paris", "unit": "celsius"}
    assert chunks > 3  # the arguments came as fragments

    messages += [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": call["id"],
                    "type": "function",
                    "function": {"name": call["name"], "arguments": call["arguments"]},
                }
            ],
        },
        {"role": "tool", "tool_call_id": call["id"], "content": TOOL_RESULT},
    ]
    reply = oai.chat.completions.create(
        model="replay-hermes",
        messages=messages,
        tools=OPENAI_TOOLS,
    )
    assert reply.choices[0].finish_reason == "stop"
    assert TOOL_RESULT in (reply.choices[0].message.content or "")


def test_openai_non_streamed_tool_call(oai: openai.OpenAI) -> None:
    reply = oai.chat.completions.create(
        model="replay-hermes",
        messages=[{"role": "user", "content": "Tell me the weather in Paris"}],
        tools=OPENAI_TOOLS,
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    calls = choice.message.tool_calls or []
    assert len(calls) == 1
    assert isinstance(calls[0], ChatCompletionMessageFunctionToolCall)
    assert calls[0].function.name == "get_weather"
    assert json.loads(calls[0].function.arguments)["city"] == "Paris"


def test_anthropic_streamed_tool_round_trip(claude: anthropic.Anthropic) -> None:
    messages: list[Any] = [  # grows with JSON built from the replies
        {"role": "user", "content": "What is the weather in Paris?"}
    ]
    with claude.messages.stream(
        model="claude-sonnet-4-5",
        max_tokens=200,
        messages=messages,
        tools=ANTHROPIC_TOOLS,
    ) as stream:
        events = [event.type for event in stream]
        message = stream.get_final_message()
    assert message.stop_reason == "tool_use"
    assert message.model == "claude-sonnet-4-5"  # the requested name is echoed
    assert [block.type for block in message.content] == ["tool_use"]
    tool_use = message.content[0]
    assert isinstance(tool_use, ToolUseBlock)
    assert tool_use.id.startswith("toolu_")
    assert tool_use.name == "get_weather"
    assert tool_use.input == {"city": "Paris", "unit": "celsius"}
    assert events.count("input_json") > 1  # fragments, not one blob

    messages += [
        {"role": "assistant", "content": [block.model_dump() for block in message.content]},
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": tool_use.id, "content": TOOL_RESULT}
            ],
        },
    ]
    final = claude.messages.create(
        model="claude-sonnet-4-5",
        max_tokens=200,
        messages=messages,
        tools=ANTHROPIC_TOOLS,
    )
    assert final.stop_reason == "end_turn"
    assert isinstance(final.content[0], TextBlock)
    assert TOOL_RESULT in final.content[0].text


def test_anthropic_non_streamed_tool_use_and_parallel_calls(claude: anthropic.Anthropic) -> None:
    message = claude.messages.create(
        model="replay-hermes",
        max_tokens=200,
        messages=[{"role": "user", "content": "Compare the weather in two cities"}],
        tools=ANTHROPIC_TOOLS,
    )
    assert message.stop_reason == "tool_use"
    assert [b.type for b in message.content] == ["text", "tool_use", "tool_use"]
    assert isinstance(message.content[0], TextBlock)
    assert message.content[0].text == "Checking both."
    uses = [b for b in message.content[1:] if isinstance(b, ToolUseBlock)]
    cities = [b.input["city"] for b in uses]
    assert cities == ["Paris", "Oslo"]
    ids = {b.id for b in uses}
    assert len(ids) == 2

    single = claude.messages.create(
        model="replay-hermes",
        max_tokens=200,
        messages=[{"role": "user", "content": "Compare the weather in two cities"}],
        tools=ANTHROPIC_TOOLS,
        tool_choice={"type": "auto", "disable_parallel_tool_use": True},
    )
    assert [b.type for b in single.content] == ["text", "tool_use"]
    assert single.stop_reason == "tool_use"


def test_llama3_json_format_through_openai(oai: openai.OpenAI) -> None:
    reply = oai.chat.completions.create(
        model="replay-llama3",
        messages=[{"role": "user", "content": "What is the weather in Rome?"}],
        tools=OPENAI_TOOLS,
        parallel_tool_calls=False,
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    calls = choice.message.tool_calls or []
    assert all(isinstance(c, ChatCompletionMessageFunctionToolCall) for c in calls)
    functions = [c.function for c in calls if isinstance(c, ChatCompletionMessageFunctionToolCall)]
    assert [json.loads(f.arguments) for f in functions] == [{"city": "Rome"}]
