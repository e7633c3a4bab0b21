"""Full tool round trips in both dialects, through the replay fake: the model asks for a tool, the
client runs it and sends the result back, the model continues with what the tool said. The
official SDKs are the clients; tokenization, templates, parsing and translation are all real."""

from __future__ import annotations

import json

import anthropic
import openai

WEATHER_TOOL = {
    "name": "get_weather",
    "description": "Current weather in a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}, "unit": {"type": "string"}},
        "required": ["city"],
    },
}
OPENAI_TOOLS = [{"type": "function", "function": WEATHER_TOOL}]
ANTHROPIC_TOOLS = [
    {
        "name": WEATHER_TOOL["name"],
        "description": WEATHER_TOOL["description"],
        "input_schema": WEATHER_TOOL["parameters"],
    }
]
TOOL_RESULT = "22 degrees and sunny"


def test_openai_streamed_tool_round_trip(oai: openai.OpenAI) -> None:
    messages: list[dict[str, object]] = [
        {"role": "user", "content": "What is the weather in Paris?"}
    ]
    stream = oai.chat.completions.create(
        model="replay-hermes",
        messages=messages,
        tools=OPENAI_TOOLS,
        stream=True,  # type: ignore[arg-type]
    )
    content, calls, finish, chunks = "", {}, None, 0
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
        tools=OPENAI_TOOLS,  # type: ignore[arg-type]
    )
    assert reply.choices[0].finish_reason == "stop"
    assert TOOL_RESULT in (reply.choices[0].message.content or "")


def test_openai_non_streamed_tool_call(oai: openai.OpenAI) -> None:
    reply = oai.chat.completions.create(
        model="replay-hermes",
        messages=[{"role": "user", "content": "Tell me the weather in Paris"}],
        tools=OPENAI_TOOLS,  # type: ignore[list-item]
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    calls = choice.message.tool_calls or []
    assert len(calls) == 1
    assert calls[0].function.name == "get_weather"  # type: ignore[union-attr]
    assert json.loads(calls[0].function.arguments)["city"] == "Paris"  # type: ignore[union-attr]


def test_anthropic_streamed_tool_round_trip(claude: anthropic.Anthropic) -> None:
    messages: list[dict[str, object]] = [
        {"role": "user", "content": "What is the weather in Paris?"}
    ]
    with claude.messages.stream(
        model="claude-sonnet-4-5",
        max_tokens=200,
        messages=messages,
        tools=ANTHROPIC_TOOLS,  # type: ignore[arg-type]
    ) as stream:
        events = [event.type for event in stream]
        message = stream.get_final_message()
    assert message.stop_reason == "tool_use"
    assert message.model == "claude-sonnet-4-5"  # the requested name is echoed
    assert [block.type for block in message.content] == ["tool_use"]
    tool_use = message.content[0]
    assert tool_use.type == "tool_use"
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
        tools=ANTHROPIC_TOOLS,  # type: ignore[arg-type]
    )
    assert final.stop_reason == "end_turn"
    assert final.content[0].type == "text"
    assert TOOL_RESULT in final.content[0].text


def test_anthropic_non_streamed_tool_use_and_parallel_calls(claude: anthropic.Anthropic) -> None:
    message = claude.messages.create(
        model="replay-hermes",
        max_tokens=200,
        messages=[{"role": "user", "content": "Compare the weather in two cities"}],
        tools=ANTHROPIC_TOOLS,  # type: ignore[list-item]
    )
    assert message.stop_reason == "tool_use"
    assert [b.type for b in message.content] == ["text", "tool_use", "tool_use"]
    assert message.content[0].text == "Checking both."  # type: ignore[union-attr]
    cities = [b.input["city"] for b in message.content[1:]]  # type: ignore[union-attr,index]
    assert cities == ["Paris", "Oslo"]
    ids = {b.id for b in message.content[1:]}  # type: ignore[union-attr]
    assert len(ids) == 2

    single = claude.messages.create(
        model="replay-hermes",
        max_tokens=200,
        messages=[{"role": "user", "content": "Compare the weather in two cities"}],
        tools=ANTHROPIC_TOOLS,  # type: ignore[list-item]
        tool_choice={"type": "auto", "disable_parallel_tool_use": True},
    )
    assert [b.type for b in single.content] == ["text", "tool_use"]
    assert single.stop_reason == "tool_use"


def test_llama3_json_format_through_openai(oai: openai.OpenAI) -> None:
    reply = oai.chat.completions.create(
        model="replay-llama3",
        messages=[{"role": "user", "content": "What is the weather in Rome?"}],
        tools=OPENAI_TOOLS,  # type: ignore[list-item]
        parallel_tool_calls=False,
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    calls = choice.message.tool_calls or []
    assert [json.loads(c.function.arguments) for c in calls] == [{"city": "Rome"}]  # type: ignore[union-attr]
