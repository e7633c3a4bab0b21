"""Structured outputs through the embedded fleet (real tritonserver, the torch engine on
cortex-tiny, a random-weight model that never writes JSON by itself) with the official SDKs:
every constrained answer must parse and validate with the `jsonschema` package."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

import anthropic
import jsonschema
import openai
import pytest
from openai.types.chat import ChatCompletionMessageFunctionToolCall, ChatCompletionMessageParam
from openai.types.shared_params import ResponseFormatJSONSchema

from control_plane.canonical import ChatRequest, Message, OutputFormat
from control_plane.errors import InvalidRequest
from control_plane.structured import check, check_logprobs, guide_for
from cortex.config import EngineKind
from cortex.guides import GuideType
from tests.conftest import Embedded

MODEL = "cortex-tiny"
WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 10},
        "unit": {"enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "unit", "days"],
    "additionalProperties": False,
}
LISTING = {
    "type": "object",
    "properties": {
        "items": {
            "type": "array",
            "items": {"type": "object", "properties": {"ok": {"type": "boolean"}}},
            "maxItems": 2,
        },
        "kind": {"anyOf": [{"type": "integer"}, {"type": "null"}]},
    },
    "required": ["items", "kind"],
    "additionalProperties": False,
}
ASK: list[ChatCompletionMessageParam] = [
    {"role": "user", "content": "What is the weather in Paris? Answer in JSON."}
]


@pytest.fixture(scope="module")
def oai(embedded: Embedded) -> openai.OpenAI:
    return openai.OpenAI(base_url=embedded.base_url, api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def claude(embedded: Embedded) -> anthropic.Anthropic:
    return anthropic.Anthropic(
        base_url=embedded.base_url.removesuffix("/v1"), api_key="unused", max_retries=0
    )


def schema_format(schema: dict[str, Any]) -> ResponseFormatJSONSchema:
    return {
        "type": "json_schema",
        "json_schema": {"name": "answer", "schema": schema, "strict": True},
    }


@pytest.mark.parametrize("schema", [WEATHER, LISTING])
def test_chat_json_schema_streamed_and_not(oai: openai.OpenAI, schema: dict[str, Any]) -> None:
    reply = oai.chat.completions.create(
        model=MODEL,
        messages=ASK,
        max_tokens=120,
        response_format=schema_format(schema),
    )
    assert reply.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(reply.choices[0].message.content or ""), schema)
    chunks = oai.chat.completions.create(
        model=MODEL,
        messages=ASK,
        max_tokens=120,
        temperature=1.0,
        seed=5,
        stream=True,
        response_format=schema_format(schema),
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    jsonschema.validate(json.loads(text), schema)


def test_json_object_regex_grammar_and_completions(oai: openai.OpenAI) -> None:
    any_json = oai.chat.completions.create(
        model=MODEL,
        messages=ASK,
        max_tokens=200,
        response_format={"type": "json_object"},
    )
    assert isinstance(json.loads(any_json.choices[0].message.content or ""), dict)
    regex = oai.chat.completions.create(
        model=MODEL,
        messages=ASK,
        max_tokens=20,
        extra_body={
            "response_format": {
                "type": "grammar",
                "grammar": {"syntax": "regex", "definition": "[0-9]{2}-[A-Z]{3}"},
            }
        },
    )
    assert re.fullmatch("[0-9]{2}-[A-Z]{3}", regex.choices[0].message.content or "")
    ebnf = oai.completions.create(
        model=MODEL,
        prompt="Is it raining?",
        max_tokens=20,
        extra_body={
            "response_format": {
                "type": "grammar",
                "grammar": {"syntax": "ebnf", "definition": 'root ::= ("yes" | "no") "."'},
            }
        },
    )
    assert ebnf.choices[0].text in ("yes.", "no.")


def test_responses_text_format_and_anthropic_output_config(
    oai: openai.OpenAI, claude: anthropic.Anthropic
) -> None:
    response = oai.responses.create(
        model=MODEL,
        input="The weather, in JSON",
        max_output_tokens=120,
        text={"format": {"type": "json_schema", "name": "w", "schema": WEATHER, "strict": True}},
    )
    jsonschema.validate(json.loads(response.output_text), WEATHER)
    message = claude.messages.create(
        model=MODEL,
        max_tokens=120,
        messages=[{"role": "user", "content": "The weather, in JSON"}],
        output_config={"format": {"type": "json_schema", "schema": WEATHER}},
    )
    text = "".join(block.text for block in message.content if block.type == "text")
    jsonschema.validate(json.loads(text), WEATHER)
    beta = claude.messages.create(
        model=MODEL,
        max_tokens=120,
        messages=[{"role": "user", "content": "The weather, in JSON"}],
        extra_body={"output_format": {"type": "json_schema", "schema": LISTING}},
    )
    text = "".join(block.text for block in beta.content if block.type == "text")
    jsonschema.validate(json.loads(text), LISTING)


def test_strict_tools_in_all_three_dialects(
    oai: openai.OpenAI, claude: anthropic.Anthropic
) -> None:
    chat = oai.chat.completions.create(
        model=MODEL,
        messages=ASK,
        max_tokens=150,
        tools=[
            {
                "type": "function",
                "function": {"name": "weather", "parameters": WEATHER, "strict": True},
            }
        ],
        tool_choice="required",
        parallel_tool_calls=False,
    )
    calls = chat.choices[0].message.tool_calls or []
    assert len(calls) == 1 and isinstance(calls[0], ChatCompletionMessageFunctionToolCall)
    assert calls[0].function.name == "weather"
    jsonschema.validate(json.loads(calls[0].function.arguments), WEATHER)

    response = oai.responses.create(
        model=MODEL,
        input="The weather?",
        max_output_tokens=150,
        tools=[{"type": "function", "name": "weather", "parameters": WEATHER, "strict": True}],
        tool_choice="required",
        parallel_tool_calls=False,
    )
    made = [item for item in response.output if item.type == "function_call"]
    assert len(made) == 1
    jsonschema.validate(json.loads(made[0].arguments), WEATHER)

    message = claude.messages.create(
        model=MODEL,
        max_tokens=150,
        messages=[{"role": "user", "content": "The weather?"}],
        tools=[{"name": "weather", "input_schema": WEATHER, "strict": True}],
        tool_choice={"type": "any", "disable_parallel_tool_use": True},
    )
    uses = [block for block in message.content if block.type == "tool_use"]
    assert len(uses) == 1 and message.stop_reason == "tool_use"
    jsonschema.validate(uses[0].input, WEATHER)


def test_a_mixed_batch_keeps_free_answers_as_they_were(oai: openai.OpenAI) -> None:
    def free() -> str:
        reply = oai.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Tell me about rivers"}],
            max_tokens=24,
        )
        return reply.choices[0].message.content or ""

    def constrained() -> str:
        reply = oai.chat.completions.create(
            model=MODEL,
            messages=ASK,
            max_tokens=120,
            response_format=schema_format(WEATHER),
        )
        return reply.choices[0].message.content or ""

    alone = free()
    with ThreadPoolExecutor(6) as pool:
        frees = [pool.submit(free) for _ in range(3)]
        guided = [pool.submit(constrained) for _ in range(3)]
        assert [f.result() for f in frees] == [alone] * 3
        for future in guided:
            jsonschema.validate(json.loads(future.result()), WEATHER)
    assert not alone.lstrip().startswith("{")


def test_a_schema_that_does_not_compile_is_a_400_naming_the_field(oai: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        oai.chat.completions.create(
            model=MODEL,
            messages=ASK,
            max_tokens=5,
            response_format=schema_format({"type": 5}),
        )
    assert raised.value.param == "response_format"
    with pytest.raises(openai.BadRequestError) as raised:
        # A format no SDK type allows: the point of the test.
        oai.chat.completions.create(  # type: ignore[call-overload]
            model=MODEL,
            messages=ASK,
            max_tokens=5,
            response_format={"type": "yaml"},
        )
    assert raised.value.param == "response_format.type"


@pytest.mark.parametrize("engine", [EngineKind.TRTLLM])
def test_an_engine_that_cannot_constrain_refuses_naming_the_field(engine: EngineKind) -> None:
    request = ChatRequest(
        MODEL,
        (Message("user", "x"),),
        output_format=OutputFormat(GuideType.JSON, "", "text.format"),
    )
    guide = guide_for(request, "hermes")
    assert guide is not None
    check(guide, EngineKind.TORCH, MODEL)
    with pytest.raises(InvalidRequest) as raised:
        check(guide, engine, MODEL)
    assert raised.value.param == "text.format"
    check_logprobs(replace(request, top_logprobs=3), EngineKind.TORCH, MODEL)
    with pytest.raises(InvalidRequest) as raised:
        check_logprobs(replace(request, top_logprobs=3), engine, MODEL)
    assert raised.value.param == "logprobs"
