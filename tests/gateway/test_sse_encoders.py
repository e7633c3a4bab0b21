"""Byte-level tests of both SSE encoders: the exact bytes a client receives for one answer with
text and a tool call, a keep-alive, and a failure after the stream started."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from control_plane.anthropic.translate import MessageStreamEncoder
from control_plane.canonical import (
    Finished,
    FinishReason,
    Started,
    TextDelta,
    ToolCallDelta,
    ToolCallStart,
    Usage,
    Waiting,
)
from control_plane.errors import Overloaded, UpstreamFailed, anthropic_body, openai_body
from control_plane.openai.translate import ChunkEncoder

EVENTS = [
    Started("m", 12, 8),
    Waiting(),
    TextDelta("Let me check."),
    ToolCallStart(0, "abc", "get_weather"),
    ToolCallDelta(0, '{"city":'),
    ToolCallDelta(0, '"Paris"}'),
    Finished(FinishReason.TOOL_CALLS, Usage(12, 9, 8)),
]


def anthropic_stream(events: list[object]) -> bytes:
    encoder = MessageStreamEncoder("msg_1", "claude-x")
    return b"".join(encoder.event(e) for e in events)


def test_anthropic_stream_bytes() -> None:
    assert anthropic_stream(EVENTS) == (
        b"event: message_start\n"
        b'data: {"type":"message_start","message":{"id":"msg_1","type":"message",'
        b'"role":"assistant","model":"claude-x","content":[],"stop_reason":null,'
        b'"stop_sequence":null,"usage":{"input_tokens":4,"output_tokens":0,'
        b'"cache_creation_input_tokens":0,"cache_read_input_tokens":8}}}\n\n'
        b"event: ping\n"
        b'data: {"type":"ping"}\n\n'
        b"event: content_block_start\n"
        b'data: {"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}\n\n'
        b"event: content_block_delta\n"
        b'data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Let me check."}}\n\n'
        b"event: content_block_stop\n"
        b'data: {"type":"content_block_stop","index":0}\n\n'
        b"event: content_block_start\n"
        b'data: {"type":"content_block_start","index":1,"content_block":{"type":"tool_use",'
        b'"id":"toolu_abc","name":"get_weather","input":{}}}\n\n'
        b"event: content_block_delta\n"
        b'data: {"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta",'
        b'"partial_json":"{\\"city\\":"}}\n\n'
        b"event: content_block_delta\n"
        b'data: {"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta",'
        b'"partial_json":"\\"Paris\\"}"}}\n\n'
        b"event: content_block_stop\n"
        b'data: {"type":"content_block_stop","index":1}\n\n'
        b"event: message_delta\n"
        b'data: {"type":"message_delta","delta":{"stop_reason":"tool_use","stop_sequence":null},'
        b'"usage":{"input_tokens":4,"output_tokens":9,"cache_creation_input_tokens":0,'
        b'"cache_read_input_tokens":8}}\n\n'
        b"event: message_stop\n"
        b'data: {"type":"message_stop"}\n\n'
    )


def test_anthropic_stop_sequence_and_consecutive_text_share_one_block() -> None:
    out = anthropic_stream(
        [
            Started("m", 3),
            TextDelta("a"),
            TextDelta(""),
            TextDelta("é"),
            Finished(FinishReason.STOP_SEQUENCE, Usage(3, 2), "END"),
        ]
    )
    assert out.count(b"event: content_block_start") == 1
    assert (
        'data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"é"}}'.encode()
        in out
    )
    assert out.endswith(
        b"event: message_delta\n"
        b'data: {"type":"message_delta","delta":{"stop_reason":"stop_sequence","stop_sequence":"END"},'
        b'"usage":{"input_tokens":3,"output_tokens":2,"cache_creation_input_tokens":0,'
        b'"cache_read_input_tokens":0}}\n\n'
        b"event: message_stop\n"
        b'data: {"type":"message_stop"}\n\n'
    )


def test_anthropic_error_event_bytes() -> None:
    body = anthropic_body(UpstreamFailed("node a failed"), "req_1")
    assert MessageStreamEncoder.error(body) == (
        b"event: error\n"
        b'data: {"type":"error","error":{"type":"api_error","message":"node a failed"},'
        b'"request_id":"req_1"}\n\n'
    )


def test_openai_stream_bytes() -> None:
    encoder = ChunkEncoder("chatcmpl-1", "m", include_usage=True, created=1700000000)
    head = b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1700000000,"model":"m","system_fingerprint":null,'
    out = encoder.start() + b"".join(
        ChunkEncoder.keep_alive() if isinstance(e, Waiting) else encoder.event(e) for e in EVENTS
    )
    out += ChunkEncoder.done()
    assert out == (
        head + b'"choices":[{"index":0,"delta":{"role":"assistant","content":""},'
        b'"logprobs":null,"finish_reason":null}],"usage":null}\n\n'
        b": keep-alive\n\n"
        + head
        + b'"choices":[{"index":0,"delta":{"content":"Let me check."},"logprobs":null,'
        b'"finish_reason":null}],"usage":null}\n\n'
        + head
        + b'"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"id":"call_abc",'
        b'"type":"function","function":{"name":"get_weather","arguments":""}}]},'
        b'"logprobs":null,"finish_reason":null}],"usage":null}\n\n'
        + head
        + b'"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":'
        b'{"arguments":"{\\"city\\":"}}]},"logprobs":null,"finish_reason":null}],"usage":null}\n\n'
        + head
        + b'"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":'
        b'{"arguments":"\\"Paris\\"}"}}]},"logprobs":null,"finish_reason":null}],"usage":null}\n\n'
        + head
        + b'"choices":[{"index":0,"delta":{},"logprobs":null,"finish_reason":"tool_calls"}],'
        b'"usage":null}\n\n'
        + head
        + b'"choices":[],"usage":{"prompt_tokens":12,"completion_tokens":9,"total_tokens":21,'
        b'"prompt_tokens_details":{"cached_tokens":8},'
        b'"completion_tokens_details":{"reasoning_tokens":0}}}\n\n'
        b"data: [DONE]\n\n"
    )


def test_openai_without_usage_has_no_usage_key() -> None:
    encoder = ChunkEncoder("chatcmpl-2", "m", include_usage=False, created=1)
    out = encoder.event(TextDelta("hi")) + encoder.event(Finished(FinishReason.STOP, Usage(1, 1)))
    assert out == (
        b'data: {"id":"chatcmpl-2","object":"chat.completion.chunk","created":1,"model":"m",'
        b'"system_fingerprint":null,"choices":[{"index":0,"delta":{"content":"hi"},'
        b'"logprobs":null,"finish_reason":null}]}\n\n'
        b'data: {"id":"chatcmpl-2","object":"chat.completion.chunk","created":1,"model":"m",'
        b'"system_fingerprint":null,"choices":[{"index":0,"delta":{},"logprobs":null,'
        b'"finish_reason":"stop"}]}\n\n'
    )


def test_openai_error_line_bytes() -> None:
    body = openai_body(Overloaded("busy", retry_after=7))
    assert ChunkEncoder.error(body) == (
        b'data: {"error":{"message":"busy","type":"server_error","param":null,'
        b'"code":"overloaded"}}\n\n'
    )


@given(text=st.text(min_size=1), include_usage=st.booleans())
def test_openai_text_chunks_are_the_generic_chunk(text: str, include_usage: bool) -> None:
    """Text chunks are written from bytes made once per stream; they must stay exactly what the
    generic chunk writer makes for the same delta."""
    encoder = ChunkEncoder('chatcmpl-"1"', "m\u00e9", include_usage, created=7)
    choice = {"index": 0, "delta": {"content": text}, "logprobs": None, "finish_reason": None}
    assert encoder.event(TextDelta(text)) == encoder._chunk([choice])


@given(text=st.text(min_size=1), index=st.integers(0, 1000))
def test_anthropic_text_deltas_are_the_generic_delta(text: str, index: int) -> None:
    generic = MessageStreamEncoder._delta(index, {"type": "text_delta", "text": text})
    assert MessageStreamEncoder._text_delta(index, text) == generic
