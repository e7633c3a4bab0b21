"""POST /v1/responses through real fleets, with the official openai SDK's `client.responses`:
the embedded fleet (real tritonserver, torch engine, its small models) for plain answers, and the
replay fleet (tests/gateway/conftest.py) for a full function-call round trip, keep-alives,
failures after the stream started, refusals, metrics and the request log."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai.types.responses import (
    CustomToolParam,
    EasyInputMessageParam,
    ResponseCompletedEvent,
    ResponseFunctionToolCall,
    ResponseIncompleteEvent,
)

from tests.conftest import Embedded
from tests.gateway.conftest import ReplayFleet

# Plain JSON: the SDK's FunctionToolParam requires `strict`, which clients may leave out.
WEATHER_TOOL: Any = {
    "type": "function",
    "name": "get_weather",
    "description": "Current weather in a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}, "unit": {"type": "string"}},
        "required": ["city"],
    },
}
TOOL_RESULT = "22 degrees and sunny"


# ---- the embedded fleet ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(embedded: Embedded) -> openai.OpenAI:
    return openai.OpenAI(base_url=embedded.base_url, api_key="unused", max_retries=0)


def test_non_streamed_response_on_the_embedded_fleet(tiny: openai.OpenAI) -> None:
    response = tiny.responses.create(
        model="gpt-5-codex",  # an alias (gpt-*) of the embedded default's small model
        instructions="Be brief.",
        input="What is a tuple?",
        max_output_tokens=12,
        store=True,
    )
    assert response.object == "response" and response.id.startswith("resp_")
    assert response.model == "gpt-5-codex"  # the requested name is echoed
    # (`store` is no field of the SDK's Response; its models keep unknown fields.)
    assert response.store is False  # type: ignore[attr-defined]  # cortex keeps nothing
    assert response.status in ("completed", "incomplete")
    assert response.output_text
    assert response.usage is not None and 1 <= response.usage.output_tokens <= 12
    if response.status == "incomplete":
        assert response.incomplete_details is not None
        assert response.incomplete_details.reason == "max_output_tokens"
    # The same conversation through Chat, to the same model, is the same prompt.
    chat = tiny.chat.completions.create(
        model="gpt-5-codex",
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What is a tuple?"},
        ],
        max_tokens=1,
    )
    assert chat.usage is not None and response.usage.input_tokens == chat.usage.prompt_tokens


def test_streamed_response_matches_non_streamed(tiny: openai.OpenAI) -> None:
    request: dict[str, Any] = {
        "model": "codex-mini-latest",  # codex-*
        "input": [{"role": "user", "content": [{"type": "input_text", "text": "Name a color."}]}],
        "max_output_tokens": 10,
    }
    whole = tiny.responses.create(**request)
    with tiny.responses.stream(**request) as stream:
        events = list(stream)
    kinds = [event.type for event in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed" if whole.status == "completed" else "response.incomplete",
    ]
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == whole.output_text  # greedy decoding: the same answer
    assert isinstance(events[-1], ResponseCompletedEvent | ResponseIncompleteEvent)
    final = events[-1].response
    assert final.output_text == whole.output_text and final.status == whole.status
    assert final.usage is not None and whole.usage is not None
    assert final.usage.input_tokens == whole.usage.input_tokens
    assert final.usage.output_tokens == whole.usage.output_tokens


# ---- the replay fleet -----------------------------------------------------------------------


def events_of(client: openai.OpenAI, **request: Any) -> list[Any]:
    return list(client.responses.create(stream=True, **request))


def test_streamed_function_call_round_trip(oai: openai.OpenAI) -> None:
    question: EasyInputMessageParam = {"role": "user", "content": "What is the weather in Paris?"}
    events = events_of(oai, model="replay-hermes", input=[question], tools=[WEATHER_TOOL])
    assert [e.sequence_number for e in events] == list(range(len(events)))
    added = [e for e in events if e.type == "response.output_item.added"]
    assert [e.item.type for e in added] == ["function_call"]  # no stray text item
    call = added[0].item
    assert call.call_id.startswith("call_") and call.name == "get_weather"
    deltas = [e for e in events if e.type == "response.function_call_arguments.delta"]
    assert len(deltas) > 1  # the arguments came as fragments
    arguments = "".join(e.delta for e in deltas)
    assert json.loads(arguments) == {"city": "Paris", "unit": "celsius"}
    (done,) = [e for e in events if e.type == "response.output_item.done"]
    assert done.item.call_id == call.call_id and done.item.id == call.id  # stable ids
    assert done.item.arguments == arguments
    completed = events[-1]
    assert completed.type == "response.completed"
    assert [item.call_id for item in completed.response.output] == [call.call_id]

    # The client runs the tool and sends the whole conversation back (store: false, as Codex).
    answer = oai.responses.create(
        model="replay-hermes",
        input=[
            question,
            done.item.model_dump(exclude_none=True),
            {"type": "function_call_output", "call_id": call.call_id, "output": TOOL_RESULT},
        ],
        tools=[WEATHER_TOOL],
        store=False,
    )
    assert answer.status == "completed"
    assert TOOL_RESULT in answer.output_text


def test_custom_tool_calls_come_back_as_custom_items(oai: openai.OpenAI) -> None:
    """A custom tool (Codex's freeform apply_patch is one) is called like a function by the
    model, and its call reaches the client as a custom_tool_call item, streamed or not."""
    custom: CustomToolParam = {
        "type": "custom",
        "name": "get_weather",
        "description": "The weather, as text",
    }
    request: dict[str, Any] = {
        "model": "replay-hermes",
        "input": "What is the weather in Paris?",
        "tools": [custom],
    }
    whole = oai.responses.create(**request)
    (item,) = whole.output
    assert item.type == "custom_tool_call" and item.name == "get_weather"
    # The fake writes function arguments; with no `input` string in them, they are the input.
    assert json.loads(item.input) == {"city": "Paris", "unit": "celsius"}
    events = events_of(oai, **request)
    kinds = [e.type for e in events]
    assert "response.custom_tool_call_input.done" in kinds
    assert "response.function_call_arguments.delta" not in kinds
    assert events[-1].response.output[0].input == item.input


def test_non_streamed_parallel_calls(oai: openai.OpenAI) -> None:
    response = oai.responses.create(
        model="replay-hermes",
        input="Compare the weather in two cities",
        tools=[WEATHER_TOOL],
    )
    assert [item.type for item in response.output] == ["message", "function_call", "function_call"]
    assert response.output_text == "Checking both."
    calls = [c for c in response.output[1:] if isinstance(c, ResponseFunctionToolCall)]
    assert [json.loads(c.arguments)["city"] for c in calls] == ["Paris", "Oslo"]
    assert len({c.call_id for c in calls}) == 2
    single = oai.responses.create(
        model="replay-hermes",
        input="Compare the weather in two cities",
        tools=[WEATHER_TOOL],
        parallel_tool_calls=False,
    )
    assert [item.type for item in single.output] == ["message", "function_call"]


def test_cut_off_answer_is_incomplete(oai: openai.OpenAI) -> None:
    response = oai.responses.create(
        model="replay-hermes", input="Please echo the prompt back", max_output_tokens=2
    )
    assert response.status == "incomplete"
    assert response.incomplete_details is not None
    assert response.incomplete_details.reason == "max_output_tokens"
    assert response.usage is not None and response.usage.output_tokens == 2
    events = events_of(
        oai, model="replay-hermes", input="Please echo the prompt back", max_output_tokens=2
    )
    assert events[-1].type == "response.incomplete"


def test_keep_alives_while_the_model_thinks(oai: openai.OpenAI) -> None:
    events = events_of(oai, model="replay-hermes", input="Please take your time")
    kinds = [e.type for e in events]
    first_output = kinds.index("response.output_item.added")
    # created, in_progress, then in_progress again every ping interval until the first token
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[2:first_output].count("response.in_progress") >= 2
    assert events[-1].type == "response.completed"
    assert events[-1].response.output_text == "Ready now."


def test_failure_after_the_stream_started(oai: openai.OpenAI) -> None:
    events = events_of(oai, model="replay-hermes", input="Please break mid-stream")
    assert [e.type for e in events[-2:]] == ["error", "response.failed"]
    assert "illegal memory access" in events[-2].message
    failed = events[-1].response
    assert failed.status == "failed" and failed.error is not None
    assert failed.error.code == "server_error"
    assert failed.output[0].status == "incomplete"  # what was said before it broke
    assert failed.output[0].content[0].text


@pytest.mark.parametrize(
    ("request_body", "param"),
    [
        ({"previous_response_id": "resp_abc"}, "previous_response_id"),
        ({"tools": [{"type": "local_shell"}]}, "tools[0].type"),
        ({"input": [{"type": "function_call", "name": "f"}]}, "input[0].call_id"),
        ({"max_output_tokens": 0}, "max_output_tokens"),
    ],
)
def test_refusals_are_400s_naming_the_field(
    oai: openai.OpenAI, request_body: dict[str, Any], param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        oai.responses.create(**{"model": "replay-hermes", "input": "hi", **request_body})
    assert caught.value.status_code == 400
    assert caught.value.param == param
    assert caught.value.type == "invalid_request_error"


CODEX_DEFAULT = json.loads(
    (Path(__file__).parent / "fixtures" / "codex_default_request.json").read_text()
)


def test_codex_default_request_gets_an_answer_naming_the_dropped_tool(
    replay_fleet: ReplayFleet, oai: openai.OpenAI
) -> None:
    body: Any = {k: v for k, v in CODEX_DEFAULT.items() if k not in ("//", "stream")}
    body["model"] = "replay-hermes"
    with oai.responses.with_streaming_response.create(**body, stream=True) as raw:
        assert raw.status_code == 200
        assert raw.headers["cortex-dropped-tools"] == "web_search"
        events = list(raw.parse())
    assert events[-1].type == "response.completed"
    assert events[-1].response.output_text == "Hello from the replay fake."
    whole = oai.responses.with_raw_response.create(**body)
    assert whole.headers["cortex-dropped-tools"] == "web_search"
    assert whole.parse().output_text == "Hello from the replay fake."
    # The same tools through Chat (there, a hosted tool is a bare {"type": ...}).
    tools: Any = [
        {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}},
        {"type": "web_search"},
        {"type": "code_interpreter"},
    ]
    chat = oai.chat.completions.with_raw_response.create(
        model="replay-hermes", messages=[{"role": "user", "content": "hi"}], tools=tools
    )
    assert chat.headers["cortex-dropped-tools"] == "code_interpreter, web_search"
    assert chat.parse().choices[0].message.content == "Hello from the replay fake."
    plain = oai.chat.completions.with_raw_response.create(
        model="replay-hermes", messages=[{"role": "user", "content": "hi"}]
    )
    assert "cortex-dropped-tools" not in plain.headers
    # Logged once for this client, not once per request.
    log = replay_fleet.gateway_log.read_text()
    assert log.count("hosted tools left out of requests from") == 2  # two sets of tools
    # Forcing a hosted tool still fails, naming the field, in both dialects.
    forced: Any = {**body, "tool_choice": {"type": "web_search"}}
    with pytest.raises(openai.BadRequestError) as caught:
        oai.responses.create(**forced)
    assert caught.value.param == "tool_choice.type" and "web_search" in caught.value.message
    with pytest.raises(openai.BadRequestError) as caught:
        oai.chat.completions.create(
            model="replay-hermes",
            messages=[{"role": "user", "content": "hi"}],
            tools=tools[1:2],
            tool_choice=forced["tool_choice"],
        )
    assert caught.value.param == "tool_choice.type"


def test_unknown_model_auth_and_stored_routes(
    replay_fleet: ReplayFleet, oai: openai.OpenAI
) -> None:
    with pytest.raises(openai.NotFoundError) as missing:
        oai.responses.create(model="no-such-model", input="hi")
    assert missing.value.code == "model_not_found"
    anonymous = openai.OpenAI(base_url=replay_fleet.openai_url, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as denied:
        anonymous.responses.create(model="replay-hermes", input="hi")
    assert denied.value.code == "invalid_api_key"
    with pytest.raises(openai.NotFoundError) as stored:
        oai.responses.retrieve("resp_abc")
    assert "stores no responses" in stored.value.message


def test_input_tokens_metrics_and_request_log(
    replay_fleet: ReplayFleet, oai: openai.OpenAI
) -> None:
    request: dict[str, Any] = {
        "model": "replay-hermes",
        "input": "Count me",
        "instructions": "Be brief.",
    }
    counted = oai.responses.input_tokens.count(**request)
    response = oai.responses.create(**request)
    assert response.usage is not None
    assert counted.input_tokens == response.usage.input_tokens
    metrics = httpx.get(replay_fleet.metrics_url).text
    assert (
        'cortex_requests_total{api="responses",model="replay-hermes",node="replay-node",outcome="ok"}'
        in metrics
    )
    request_id = response.id.removeprefix("resp_")
    lines = [
        line for line in replay_fleet.gateway_log.read_text().splitlines() if request_id in line
    ]
    assert any("api=responses" in line and "outcome=ok" in line for line in lines)
