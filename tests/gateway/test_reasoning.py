"""Reasoning written inline (`control_plane/reasoning.py`): Qwen3's `<think>…</think>` split from
the answer however the output is streamed, before the stop strings and the tool-call parser; its
tokens counted. Completions are shaped like Qwen3's own (a line break inside each tag, a blank
line before the answer)."""

from __future__ import annotations

from hypothesis import given

from control_plane.canonical import Event, Finished, ReasoningDelta, TextDelta, ToolCallStart
from control_plane.output import Output
from control_plane.prompting import StopMatcher
from control_plane.reasoning import ThinkSplitter, prompt_opens_reasoning, template_reasons
from control_plane.tool_calls import parser_for
from tests.gateway.test_output import ByteDecoder, tokens_of
from tests.gateway.test_tool_calls import splits

THOUGHT = "The user wants France's capital.\nA <tool_call> written here is no call."
ANSWER = "The capital of France is Paris."
QWEN3 = f"<think>\n{THOUGHT}\n</think>\n\n{ANSWER}"
# A thinking-only model (Qwen3-…-Thinking-2507): its prompt opened the tag.
THINKING_ONLY = f"{THOUGHT}\n</think>\n\n{ANSWER}"


def split(splitter: ThinkSplitter, pieces: list[str]) -> tuple[str, str]:
    events: list[Event] = []
    for piece in pieces:
        events.extend(splitter.feed(piece))
    events.extend(splitter.finish())
    reasoning = "".join(e.text for e in events if isinstance(e, ReasoningDelta))
    answer = "".join(e.text for e in events if isinstance(e, TextDelta))
    # Reasoning comes first, then the answer: never interleaved.
    kinds = [type(e) for e in events]
    assert kinds == sorted(kinds, key=lambda kind: kind is TextDelta)
    return reasoning, answer


@given(splits(QWEN3))
def test_reasoning_and_answer_whatever_the_streamed_pieces(pieces: list[str]) -> None:
    assert split(ThinkSplitter(), pieces) == (THOUGHT, ANSWER)


@given(splits(THINKING_ONLY))
def test_a_prompt_that_opened_the_tag_starts_inside_the_reasoning(pieces: list[str]) -> None:
    assert split(ThinkSplitter(starts_inside=True), pieces) == (THOUGHT, ANSWER)


@given(splits(f"  {ANSWER} <think>not at the start</think>"))
def test_an_answer_without_reasoning_is_kept_exactly(pieces: list[str]) -> None:
    assert split(ThinkSplitter(), pieces) == ("", f"  {ANSWER} <think>not at the start</think>")


def test_reasoning_cut_short_by_the_token_limit_stays_reasoning() -> None:
    assert split(ThinkSplitter(), ["<think>\nFirst, ", "the"]) == ("First, the", "")


def test_an_empty_reasoning_block_gives_only_the_answer() -> None:
    # Qwen3 with enable_thinking off writes an empty block itself when asked to reason briefly.
    assert split(ThinkSplitter(), ["<think>\n\n</think>\n\n", ANSWER]) == ("", ANSWER)


def test_the_template_and_the_prompt_say_whether_a_model_reasons() -> None:
    qwen3 = "{%- if '</think>' in content %}{%- set content = content.split('</think>')[-1] %}"
    assert template_reasons(qwen3)
    assert not template_reasons("{{ '<|im_start|>assistant\\n' }}")
    assert prompt_opens_reasoning("<|im_start|>assistant\n<think>\n")
    assert not prompt_opens_reasoning("<|im_start|>assistant\n<think>\n\n</think>\n\n")


def pipeline(text: str, stops: tuple[str, ...] = (), starts_inside: bool = False) -> list[Event]:
    """The output pipeline of a `<think>` model offered tools, fed a byte a token."""
    vocabulary, ids = tokens_of(text)
    output = Output(
        ByteDecoder(vocabulary),
        StopMatcher(stops),
        parser_for("hermes", True),
        7,
        10_000,
        ThinkSplitter(starts_inside),
    )
    events: list[Event] = []
    for token in ids:
        events.extend(output.feed([token]))
        if output.done:
            break
    return events + output.finish()


CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def test_a_call_tag_inside_the_reasoning_is_no_call_and_one_after_it_is() -> None:
    events = pipeline(f"<think>\n{THOUGHT}\n</think>\n\n{CALL}")
    assert "".join(e.text for e in events if isinstance(e, ReasoningDelta)) == THOUGHT
    assert [e.name for e in events if isinstance(e, ToolCallStart)] == ["get_weather"]
    assert not [e for e in events if isinstance(e, TextDelta) and e.text]


def test_stop_strings_cut_the_answer_not_the_reasoning() -> None:
    events = pipeline(QWEN3, stops=("capital",))
    assert "".join(e.text for e in events if isinstance(e, ReasoningDelta)) == THOUGHT
    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == "The "


def test_reasoning_tokens_are_the_tokens_up_to_the_closing_tag() -> None:
    events = pipeline(QWEN3)
    finished = events[-1]
    assert isinstance(finished, Finished)
    thinking_bytes = len(f"<think>\n{THOUGHT}\n</think>".encode())
    # A byte a token: every byte of the block (tags included) is a reasoning token.
    assert finished.usage.reasoning_tokens == thinking_bytes
    assert finished.usage.completion_tokens == len(QWEN3.encode())
