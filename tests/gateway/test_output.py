"""The output pipeline (control_plane/output.py): token ids in, canonical events out, with no
server. Ids stand for text through a fixed vocabulary, some of whose pieces are half of a
character, so what the decoder holds back and releases at the end is exercised too."""

from __future__ import annotations

import itertools
import json

from hypothesis import given
from hypothesis import strategies as st

from control_plane.canonical import (
    Event,
    Finished,
    FinishReason,
    TextDelta,
    ToolCallDelta,
    ToolCallStart,
    Usage,
)
from control_plane.output import Output
from control_plane.prompting import StopMatcher
from control_plane.tool_calls import parser_for


class ByteDecoder:
    """A decoder over a vocabulary of byte strings: text comes out once a character is whole,
    as `tokenizers.decoders.DecodeStream` does; `finish` flushes a broken tail as U+FFFD."""

    def __init__(self, vocabulary: list[bytes]) -> None:
        self.vocabulary = vocabulary
        self.pending = b""

    def step(self, token_id: int) -> str:
        self.pending += self.vocabulary[token_id]
        try:
            text = self.pending.decode("utf-8")
        except UnicodeDecodeError:
            return ""
        self.pending = b""
        return text

    def finish(self) -> str:
        text, self.pending = self.pending.decode("utf-8", errors="replace"), b""
        return text


def tokens_of(text: str) -> tuple[list[bytes], list[int]]:
    """One id per byte: every multi-byte character arrives split."""
    data = text.encode("utf-8")
    vocabulary = [bytes([b]) for b in range(256)]
    return vocabulary, list(data)


def pipeline(
    text: str, stops: tuple[str, ...] = (), tools: str = "none", max_tokens: int = 10_000
) -> tuple[Output, list[int]]:
    vocabulary, ids = tokens_of(text)
    output = Output(
        ByteDecoder(vocabulary),
        StopMatcher(stops),
        parser_for(tools, tools != "none"),
        7,
        max_tokens,
    )
    return output, ids


def run(output: Output, batches: list[list[int]]) -> list[Event]:
    events: list[Event] = []
    for batch in batches:
        events.extend(output.feed(batch))
        if output.done:
            break
    events.extend(output.finish())
    return events


def text_of(events: list[Event]) -> str:
    return "".join(e.text for e in events if isinstance(e, TextDelta))


def batched(ids: list[int], cuts: list[int]) -> list[list[int]]:
    points = [0, *sorted(c % (len(ids) + 1) for c in cuts), len(ids)]
    return [ids[a:b] for a, b in itertools.pairwise(points)]


@given(st.lists(st.integers(0, 10_000), max_size=8))
def test_text_arrives_whole_and_ends_with_a_stop(cuts: list[int]) -> None:
    output, ids = pipeline("Grüße — ok ✓")
    events = run(output, batched(ids, cuts))
    assert text_of(events) == "Grüße — ok ✓"
    assert events[-1] == Finished(FinishReason.STOP, Usage(7, len(ids)))


def test_running_out_of_tokens_is_length() -> None:
    output, ids = pipeline("abcdef", max_tokens=6)
    events = run(output, [ids])
    assert events[-1] == Finished(FinishReason.LENGTH, Usage(7, 6))


def test_a_broken_last_character_is_flushed_at_the_end() -> None:
    output, ids = pipeline("ab✓")
    events = run(output, [ids[:-1]])  # the engine stopped inside the check mark's three bytes
    assert text_of(events) == "ab\ufffd"


@given(st.lists(st.integers(0, 10_000), max_size=8))
def test_a_stop_string_cuts_the_text_and_names_itself(cuts: list[int]) -> None:
    output, ids = pipeline("one two STOP three", stops=("STOP", "never"))
    events = run(output, batched(ids, cuts))
    assert text_of(events) == "one two "
    finished = events[-1]
    assert isinstance(finished, Finished)
    assert finished.reason is FinishReason.STOP_SEQUENCE
    assert finished.stop_sequence == "STOP"
    assert output.done


def test_a_stop_string_that_never_completes_is_given_back() -> None:
    output, ids = pipeline("the end is ST", stops=("STOP",))
    events = run(output, [ids])
    assert text_of(events) == "the end is ST"
    assert events[-1] == Finished(FinishReason.STOP, Usage(7, len(ids)))


def test_tool_calls_decide_the_reason_even_before_a_stop_string() -> None:
    call = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
    output, ids = pipeline(
        f"Looking.<tool_call>{call}</tool_call> STOP after", stops=("STOP",), tools="hermes"
    )
    events = run(output, [ids])
    assert text_of(events) == "Looking."
    starts = [e for e in events if isinstance(e, ToolCallStart)]
    assert [s.name for s in starts] == ["get_weather"]
    arguments = "".join(e.arguments for e in events if isinstance(e, ToolCallDelta))
    assert json.loads(arguments) == {"city": "Paris"}
    finished = events[-1]
    assert isinstance(finished, Finished)
    assert finished.reason is FinishReason.TOOL_CALLS
    assert finished.stop_sequence is None
