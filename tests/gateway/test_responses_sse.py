"""Byte-level tests of the Responses SSE encoder: the exact bytes a client receives for one
answer with text and a function call, a keep-alive, a cut-off answer, and a failure after the
stream started; the per-token fast path equals the generic event writer."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st
from openai.types.responses import (
    ResponseCustomToolCallInputDeltaEvent,
    ResponseCustomToolCallInputDoneEvent,
    ResponseOutputItemAddedEvent,
    ResponseOutputItemDoneEvent,
    ResponseReasoningItem,
    ResponseStreamEvent,
)
from pydantic import BaseModel, TypeAdapter

from control_plane.canonical import (
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
from control_plane.errors import Overloaded, UpstreamFailed
from control_plane.responses.stream import ResponseStreamEncoder, sse
from control_plane.responses.translate import CallNames

EVENTS = [
    Started("m", 12),
    Waiting(),
    TextDelta("Let me check."),
    ToolCallStart(0, "abc", "get_weather"),
    ToolCallDelta(0, '{"city":'),
    ToolCallDelta(0, '"Paris"}'),
    Finished(FinishReason.TOOL_CALLS, Usage(12, 9)),
]
# The settings a response repeats from its request, cut to one for readable bytes.
SETTINGS = {"store": False}


def encoder() -> ResponseStreamEncoder:
    return ResponseStreamEncoder("resp_1", "gpt-x", SETTINGS, "msg_1", created_at=7)


def snapshot(
    status: str, output: str | bytes = "[]", usage: str = "null", error: str = "null"
) -> bytes:
    output = output.decode() if isinstance(output, bytes) else output
    incomplete = '{"reason":"max_output_tokens"}' if status == "incomplete" else "null"
    return (
        f'{{"id":"resp_1","object":"response","created_at":7,"status":"{status}",'
        f'"background":false,"error":{error},"incomplete_details":{incomplete},'
        f'"model":"gpt-x","output":{output},"store":false,"usage":{usage}}}'
    ).encode()


MESSAGE_DONE = (
    b'{"id":"msg_1","type":"message","status":"completed","role":"assistant",'
    b'"content":[{"type":"output_text","text":"Let me check.","annotations":[]}]}'
)
CALL_DONE = (
    b'{"id":"fc_abc","type":"function_call","status":"completed",'
    b'"arguments":"{\\"city\\":\\"Paris\\"}","call_id":"call_abc","name":"get_weather"}'
)


def test_stream_bytes() -> None:
    stream = encoder()
    out = b"".join(stream.event(e) for e in EVENTS)
    usage = (
        '{"input_tokens":12,"input_tokens_details":{"cached_tokens":0,"cache_write_tokens":0},'
        '"output_tokens":9,"output_tokens_details":{"reasoning_tokens":0},"total_tokens":21}'
    )
    assert out == (
        b"event: response.created\n"
        b'data: {"type":"response.created","response":'
        + snapshot("in_progress")
        + b',"sequence_number":0}\n\n'
        b"event: response.in_progress\n"
        b'data: {"type":"response.in_progress","response":'
        + snapshot("in_progress")
        + b',"sequence_number":1}\n\n'
        # the keep-alive
        b"event: response.in_progress\n"
        b'data: {"type":"response.in_progress","response":'
        + snapshot("in_progress")
        + b',"sequence_number":2}\n\n'
        b"event: response.output_item.added\n"
        b'data: {"type":"response.output_item.added","output_index":0,"item":{"id":"msg_1",'
        b'"type":"message","status":"in_progress","role":"assistant","content":[]},'
        b'"sequence_number":3}\n\n'
        b"event: response.content_part.added\n"
        b'data: {"type":"response.content_part.added","item_id":"msg_1","output_index":0,'
        b'"content_index":0,"part":{"type":"output_text","text":"","annotations":[]},'
        b'"sequence_number":4}\n\n'
        b"event: response.output_text.delta\n"
        b'data: {"type":"response.output_text.delta","item_id":"msg_1","output_index":0,'
        b'"content_index":0,"delta":"Let me check.","logprobs":[],"sequence_number":5}\n\n'
        b"event: response.output_text.done\n"
        b'data: {"type":"response.output_text.done","item_id":"msg_1","output_index":0,'
        b'"content_index":0,"text":"Let me check.","logprobs":[],"sequence_number":6}\n\n'
        b"event: response.content_part.done\n"
        b'data: {"type":"response.content_part.done","item_id":"msg_1","output_index":0,'
        b'"content_index":0,"part":{"type":"output_text","text":"Let me check.",'
        b'"annotations":[]},"sequence_number":7}\n\n'
        b"event: response.output_item.done\n"
        b'data: {"type":"response.output_item.done","output_index":0,"item":'
        + MESSAGE_DONE
        + b',"sequence_number":8}\n\n'
        b"event: response.output_item.added\n"
        b'data: {"type":"response.output_item.added","output_index":1,"item":{"id":"fc_abc",'
        b'"type":"function_call","status":"in_progress","arguments":"","call_id":"call_abc",'
        b'"name":"get_weather"},"sequence_number":9}\n\n'
        b"event: response.function_call_arguments.delta\n"
        b'data: {"type":"response.function_call_arguments.delta","item_id":"fc_abc",'
        b'"output_index":1,"delta":"{\\"city\\":","sequence_number":10}\n\n'
        b"event: response.function_call_arguments.delta\n"
        b'data: {"type":"response.function_call_arguments.delta","item_id":"fc_abc",'
        b'"output_index":1,"delta":"\\"Paris\\"}","sequence_number":11}\n\n'
        b"event: response.function_call_arguments.done\n"
        b'data: {"type":"response.function_call_arguments.done","item_id":"fc_abc",'
        b'"output_index":1,"name":"get_weather","arguments":"{\\"city\\":\\"Paris\\"}",'
        b'"sequence_number":12}\n\n'
        b"event: response.output_item.done\n"
        b'data: {"type":"response.output_item.done","output_index":1,"item":'
        + CALL_DONE
        + b',"sequence_number":13}\n\n'
        b"event: response.completed\n"
        b'data: {"type":"response.completed","response":'
        + snapshot("completed", b"[" + MESSAGE_DONE + b"," + CALL_DONE + b"]", usage)
        + b',"sequence_number":14}\n\n'
    )


def test_cut_off_answer_ends_incomplete() -> None:
    stream = encoder()
    out = stream.event(Started("m", 3)) + stream.event(TextDelta("a"))
    out += stream.event(TextDelta("")) + stream.event(TextDelta("é"))
    out += stream.event(Finished(FinishReason.LENGTH, Usage(3, 2)))
    assert out.count(b"event: response.output_item.added") == 1  # both deltas, one item
    assert (
        'data: {"type":"response.output_text.delta","item_id":"msg_1","output_index":0,'
        '"content_index":0,"delta":"é","logprobs":[],"sequence_number":5}'.encode()
        in out
    )
    last = out.split(b"\n\n")[-2]
    assert last.startswith(b"event: response.incomplete\n")
    body = json.loads(last.split(b"data: ", 1)[1])
    assert body["response"]["status"] == "incomplete"
    assert body["response"]["incomplete_details"] == {"reason": "max_output_tokens"}
    assert body["response"]["output"][0]["content"][0]["text"] == "aé"


def test_failure_after_start_is_error_then_failed() -> None:
    stream = encoder()
    stream.event(Started("m", 3))
    stream.event(TextDelta("Half"))
    assert stream.error(UpstreamFailed("node a failed")) == (
        b"event: error\n"
        b'data: {"type":"error","code":null,"message":"node a failed","param":null,'
        b'"sequence_number":5}\n\n'
        b"event: response.failed\n"
        b'data: {"type":"response.failed","response":'
        + snapshot(
            "failed",
            '[{"id":"msg_1","type":"message","status":"incomplete","role":"assistant",'
            '"content":[{"type":"output_text","text":"Half","annotations":[]}]}]',
            error='{"code":"server_error","message":"node a failed"}',
        )
        + b',"sequence_number":6}\n\n'
    )


def test_overload_after_start_tells_codex_to_retry_later() -> None:
    stream = encoder()
    stream.event(Started("m", 3))
    out = stream.error(Overloaded("no room to load m", retry_after=7))
    failed = json.loads(out.split(b"\n\n")[1].split(b"data: ", 1)[1])
    assert failed["response"]["error"]["code"] == "rate_limit_exceeded"
    assert failed["response"]["output"] == []


def test_namespaced_call_names_its_namespace_in_every_event() -> None:
    names = CallNames({"mcp__docs__lookup": ("mcp__docs", "lookup")})
    stream = ResponseStreamEncoder("resp_1", "m", SETTINGS, "msg_1", 7, names)
    out = stream.event(Started("m", 1)) + stream.event(ToolCallStart(0, "abc", "mcp__docs__lookup"))
    out += stream.event(ToolCallDelta(0, "{}"))
    out += stream.event(Finished(FinishReason.TOOL_CALLS, Usage(1, 1)))
    payloads = [json.loads(f.split(b"data: ", 1)[1]) for f in out.split(b"\n\n")[:-1]]
    items = [p["item"] for p in payloads if "item" in p]
    items.append(payloads[-1]["response"]["output"][0])
    assert [(i["namespace"], i["name"]) for i in items] == [("mcp__docs", "lookup")] * 3
    done = [p for p in payloads if p["type"] == "response.function_call_arguments.done"]
    assert done[0]["name"] == "lookup"


def test_custom_tool_call_events() -> None:
    """A custom tool's input is the string inside the arguments the model wrote, so it is
    sent once the call is whole; the SDK's own event types accept every event."""
    stream = ResponseStreamEncoder(
        "resp_1", "m", SETTINGS, "msg_1", 7, CallNames(custom=frozenset({"apply_patch"}))
    )
    stream.event(Started("m", 1))
    out = stream.event(ToolCallStart(0, "abc", "apply_patch"))
    out += stream.event(ToolCallDelta(0, '{"input": "*** Begin'))
    out += stream.event(ToolCallDelta(0, ' Patch"}'))
    out += stream.event(Finished(FinishReason.TOOL_CALLS, Usage(1, 4)))
    frames = out.split(b"\n\n")[:-1]
    item = (
        b'{"id":"ctc_abc","type":"custom_tool_call","call_id":"call_abc","name":"apply_patch",'
        b'"input":"*** Begin Patch"}'
    )
    assert frames[:4] == [
        b"event: response.output_item.added\n"
        b'data: {"type":"response.output_item.added","output_index":0,"item":{"id":"ctc_abc",'
        b'"type":"custom_tool_call","call_id":"call_abc","name":"apply_patch","input":""},'
        b'"sequence_number":2}',
        b"event: response.custom_tool_call_input.delta\n"
        b'data: {"type":"response.custom_tool_call_input.delta","item_id":"ctc_abc",'
        b'"output_index":0,"delta":"*** Begin Patch","sequence_number":3}',
        b"event: response.custom_tool_call_input.done\n"
        b'data: {"type":"response.custom_tool_call_input.done","item_id":"ctc_abc",'
        b'"output_index":0,"input":"*** Begin Patch","sequence_number":4}',
        b"event: response.output_item.done\n"
        b'data: {"type":"response.output_item.done","output_index":0,"item":'
        + item
        + b',"sequence_number":5}',
    ]
    assert frames[4].startswith(b"event: response.completed\n")
    assert item in frames[4]
    kinds: dict[str, type[BaseModel]] = {
        "response.output_item.added": ResponseOutputItemAddedEvent,
        "response.custom_tool_call_input.delta": ResponseCustomToolCallInputDeltaEvent,
        "response.custom_tool_call_input.done": ResponseCustomToolCallInputDoneEvent,
        "response.output_item.done": ResponseOutputItemDoneEvent,
    }
    for frame in frames[:4]:
        payload = json.loads(frame.split(b"data: ", 1)[1])
        kinds[payload["type"]].model_validate(payload)


@given(texts=st.lists(st.text(min_size=1), min_size=1, max_size=4), index=st.integers(0, 3))
def test_text_deltas_are_the_generic_event(texts: list[str], index: int) -> None:
    """Text deltas are written from bytes made when their item opens; they must stay exactly
    what the generic event writer makes for the same delta."""
    stream = ResponseStreamEncoder('resp_"1"', "m\u00e9", {}, 'msg_"1"', created_at=1)
    stream.event(Started("m", 1))
    for number in range(index):  # a few items before, so the output index is not 0
        stream.event(ToolCallStart(number, f"c{number}", "f"))
    for text in texts:
        out = stream.event(TextDelta(text))
        fast = out.split(b"\n\n")[-2] + b"\n\n"
        generic = sse(
            "response.output_text.delta",
            stream.sequence - 1,
            {
                "item_id": 'msg_"1"',
                "output_index": index,
                "content_index": 0,
                "delta": text,
                "logprobs": [],
            },
        )
        assert fast == generic


def test_reasoning_item_events_are_the_sdk_types_and_come_first() -> None:
    stream = encoder()
    out = stream.event(Started("m", 3)) + stream.event(ReasoningDelta("Think"))
    out += stream.event(ReasoningDelta(" more.")) + stream.event(TextDelta("Done."))
    out += stream.event(Finished(FinishReason.STOP, Usage(3, 5, reasoning_tokens=3)))
    payloads = [json.loads(f.split(b"data: ", 1)[1]) for f in out.split(b"\n\n")[:-1]]
    assert [p["sequence_number"] for p in payloads] == list(range(len(payloads)))
    # The item events parse as the SDK's own types for them (the response snapshots around
    # them repeat only part of a request's settings here, so they are read as JSON).
    items = [TypeAdapter(ResponseStreamEvent).validate_python(p) for p in payloads[2:-1]]
    assert [p.type for p in items] == [
        "response.output_item.added",
        "response.content_part.added",
        "response.reasoning_text.delta",
        "response.reasoning_text.delta",
        "response.reasoning_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
    ]
    done = payloads[-1]["response"]
    assert payloads[-1]["type"] == "response.completed"
    first, second = done["output"]
    reasoning = ResponseReasoningItem.model_validate(first)
    assert reasoning.id == "rs_1" and reasoning.content is not None
    assert [part.text for part in reasoning.content] == ["Think more."]
    assert second["type"] == "message" and second["content"][0]["text"] == "Done."
    assert done["usage"]["output_tokens_details"]["reasoning_tokens"] == 3


def test_failure_while_reasoning_keeps_the_reasoning_so_far() -> None:
    stream = encoder()
    stream.event(Started("m", 3))
    stream.event(ReasoningDelta("Half a thought"))
    out = stream.error(UpstreamFailed("node a failed"))
    failed = json.loads(out.split(b"\n\n")[1].split(b"data: ", 1)[1])
    assert failed["response"]["output"] == [
        {
            "id": "rs_1",
            "type": "reasoning",
            "summary": [],
            "content": [{"type": "reasoning_text", "text": "Half a thought"}],
            "status": "incomplete",
        }
    ]
