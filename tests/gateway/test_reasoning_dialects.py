"""A reasoning model's reasoning in every dialect, and Qwen3-Coder's XML calls, through the replay
fake: Chat Completions `reasoning_content`, Anthropic `thinking` blocks (only when asked for),
Responses `reasoning` items, reasoning tokens in the usage. The official SDKs are the clients and
their own stream accumulators read the streams; tokenization and parsing are all real."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import anthropic
import openai

from tests.gateway.conftest import ANSWER, THOUGHT

REASONER = "replay-qwen3"
CODER = "replay-qwen3-coder"
ASK: list[Any] = [{"role": "user", "content": "Please think about the capital of France."}]
WEATHER = {
    "name": "get_weather",
    "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
}
FORECAST = {
    "name": "get_forecast",
    "description": "The forecast for a city",
    "parameters": {
        "type": "object",
        "properties": {
            "city": {"type": "string"},
            "days": {"type": "integer"},
            "hourly": {"type": "boolean"},
            "fields": {"type": "array", "items": {"type": "string"}},
        },
        "required": ["city"],
    },
}
FORECAST_INPUT = {"city": "São Paulo", "days": 3, "hourly": True, "fields": ["temp", "wind"]}
THINKING: Any = {"type": "enabled", "budget_tokens": 1024}


def test_chat_completions_reasoning_content(oai: openai.OpenAI) -> None:
    completion = oai.chat.completions.create(
        model=REASONER,
        messages=ASK,
        tools=[{"type": "function", "function": WEATHER}],  # type: ignore[typeddict-item]
    )
    message = completion.choices[0].message
    assert message.content == ANSWER
    assert getattr(message, "reasoning_content", None) == THOUGHT
    # The <tool_call> inside the reasoning is no call.
    assert message.tool_calls is None and completion.choices[0].finish_reason == "stop"
    usage = completion.usage
    assert usage is not None and usage.completion_tokens_details is not None
    reasoning_tokens = usage.completion_tokens_details.reasoning_tokens or 0
    assert 0 < reasoning_tokens < usage.completion_tokens


def test_chat_completions_streams_reasoning_before_the_answer(oai: openai.OpenAI) -> None:
    stream = oai.chat.completions.create(
        model=REASONER,
        messages=ASK,
        stream=True,
        stream_options={"include_usage": True},
    )
    order, reasoning, content, usage = [], "", "", None
    for chunk in stream:
        usage = chunk.usage or usage
        for choice in chunk.choices:
            piece = getattr(choice.delta, "reasoning_content", None)
            if piece:
                reasoning += piece
                order.append("reasoning")
            if choice.delta.content:
                content += choice.delta.content
                order.append("content")
    assert (reasoning, content) == (THOUGHT, ANSWER)
    assert order == sorted(order, reverse=True)  # all reasoning, then all content
    assert usage is not None and usage.completion_tokens_details is not None
    assert (usage.completion_tokens_details.reasoning_tokens or 0) > 0


def test_a_call_after_the_reasoning_is_a_call(oai: openai.OpenAI) -> None:
    completion = oai.chat.completions.create(
        model=REASONER,
        messages=[{"role": "user", "content": "Please think, then call the tool."}],
        tools=[{"type": "function", "function": WEATHER}],  # type: ignore[typeddict-item]
    )
    message = completion.choices[0].message
    assert getattr(message, "reasoning_content", None) == THOUGHT
    assert message.tool_calls is not None
    assert [json.loads(c.function.arguments) for c in message.tool_calls] == [{"city": "Paris"}]  # type: ignore[union-attr]
    assert completion.choices[0].finish_reason == "tool_calls"


def signature(thinking: str) -> str:
    return "cortex-sha256:" + hashlib.sha256(thinking.encode()).hexdigest()


def test_anthropic_thinking_block_streamed_when_asked_for(claude: anthropic.Anthropic) -> None:
    with claude.messages.stream(
        model=REASONER,
        max_tokens=200,
        messages=ASK,
        thinking=THINKING,
    ) as stream:
        events = list(stream)
        message = stream.get_final_message()
    assert [block.type for block in message.content] == ["thinking", "text"]
    thinking, text = message.content
    assert thinking.type == "thinking" and text.type == "text"
    assert (thinking.thinking, text.text) == (THOUGHT, ANSWER)
    assert thinking.signature == signature(THOUGHT)
    # The signature is the thinking block's last delta, right before the block stops.
    kinds = [
        event.delta.type if event.type == "content_block_delta" else event.type
        for event in events
        if event.type in ("content_block_start", "content_block_delta", "content_block_stop")
    ]
    first_stop = kinds.index("content_block_stop")
    assert kinds[first_stop - 1] == "signature_delta"
    assert set(kinds[1 : first_stop - 1]) == {"thinking_delta"}
    assert message.usage.output_tokens > 0


def test_anthropic_thinking_block_in_a_whole_message(claude: anthropic.Anthropic) -> None:
    message = claude.messages.create(
        model=REASONER,
        max_tokens=200,
        messages=ASK,
        thinking=THINKING,
    )
    assert [block.type for block in message.content] == ["thinking", "text"]
    assert message.content[0].thinking == THOUGHT  # type: ignore[union-attr]
    assert message.content[0].signature == signature(THOUGHT)  # type: ignore[union-attr]
    assert message.content[1].text == ANSWER  # type: ignore[union-attr]


def test_anthropic_without_thinking_gets_only_the_answer(claude: anthropic.Anthropic) -> None:
    message = claude.messages.create(model=REASONER, max_tokens=200, messages=ASK)
    assert [(b.type, getattr(b, "text", None)) for b in message.content] == [("text", ANSWER)]
    with claude.messages.stream(model=REASONER, max_tokens=200, messages=ASK) as stream:
        streamed = stream.get_final_message()
    assert [(b.type, getattr(b, "text", None)) for b in streamed.content] == [("text", ANSWER)]


def test_responses_reasoning_item_before_the_message(oai: openai.OpenAI) -> None:
    whole = oai.responses.create(model=REASONER, input=ASK)
    with oai.responses.stream(model=REASONER, input=ASK) as stream:
        deltas = [e.delta for e in stream if e.type == "response.reasoning_text.delta"]
        streamed = stream.get_final_response()
    assert "".join(deltas) == THOUGHT
    for response in (whole, streamed):
        assert [item.type for item in response.output] == ["reasoning", "message"]
        reasoning = response.output[0]
        assert reasoning.type == "reasoning" and reasoning.content is not None
        assert [part.text for part in reasoning.content] == [THOUGHT]
        assert response.output_text == ANSWER
        assert response.usage is not None
        reasoning_tokens = response.usage.output_tokens_details.reasoning_tokens
        assert 0 < reasoning_tokens < response.usage.output_tokens


# ---- Qwen3-Coder's XML calls --------------------------------------------------------------------

FORECAST_ASK: list[Any] = [{"role": "user", "content": "What is the forecast for São Paulo?"}]


def test_qwen3_coder_call_streamed_with_typed_arguments(oai: openai.OpenAI) -> None:
    stream = oai.chat.completions.create(
        model=CODER,
        messages=FORECAST_ASK,
        tools=[{"type": "function", "function": FORECAST}],  # type: ignore[typeddict-item]
        stream=True,
    )
    content, arguments, names, finish = "", "", [], None
    for chunk in stream:
        for choice in chunk.choices:  # type: ignore[union-attr]
            content += choice.delta.content or ""
            for call in choice.delta.tool_calls or []:
                if call.function and call.function.name:
                    names.append(call.function.name)
                arguments += (call.function and call.function.arguments) or ""
            finish = choice.finish_reason or finish
    assert content == "Let me look that up."
    assert names == ["get_forecast"] and json.loads(arguments) == FORECAST_INPUT
    assert finish == "tool_calls"


def test_qwen3_coder_call_in_anthropic_and_responses(
    claude: anthropic.Anthropic, oai: openai.OpenAI
) -> None:
    message = claude.messages.create(
        model=CODER,
        max_tokens=200,
        messages=FORECAST_ASK,
        tools=[
            {
                "name": FORECAST["name"],  # type: ignore[typeddict-item]
                "description": FORECAST["description"],  # type: ignore[typeddict-item]
                "input_schema": FORECAST["parameters"],  # type: ignore[typeddict-item]
            }
        ],
    )
    assert message.stop_reason == "tool_use"
    uses = [b for b in message.content if b.type == "tool_use"]
    assert [(b.name, b.input) for b in uses] == [("get_forecast", FORECAST_INPUT)]
    response = oai.responses.create(
        model=CODER,
        input=FORECAST_ASK,
        tools=[{"type": "function", **FORECAST}],  # type: ignore[list-item]
    )
    calls = [item for item in response.output if item.type == "function_call"]
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_forecast", FORECAST_INPUT)]


def test_without_the_qwen3_coder_format_the_call_stays_text(oai: openai.OpenAI) -> None:
    completion = oai.chat.completions.create(
        model="replay-hermes",
        messages=FORECAST_ASK,
        tools=[{"type": "function", "function": FORECAST}],  # type: ignore[typeddict-item]
    )
    assert completion.choices[0].message.tool_calls is None
    assert "<function=get_forecast>" in (completion.choices[0].message.content or "")
