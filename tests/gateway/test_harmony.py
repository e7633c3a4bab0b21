"""gpt-oss's harmony format through openai-harmony: the vocabulary written from a tokenizer.json
passes harmony's own hash check; prompts render as harmony expects; completions shaped like
gpt-oss's real output (reasoning, a tool call, a final answer; encoded by harmony itself) parse
into canonical events token by token.

tests/gateway/data/o200k_base.tiktoken.gz is OpenAI's published o200k_base vocabulary (MIT,
via tiktoken); harmony refuses any file whose SHA-256 differs from the published one."""

from __future__ import annotations

import base64
import gzip
import json
from dataclasses import replace
from pathlib import Path

import pytest
from openai_harmony import HarmonyEncoding

from control_plane import harmony
from control_plane.canonical import (
    ChatRequest,
    Event,
    Finished,
    FinishReason,
    Message,
    ReasoningDelta,
    TextDelta,
    Tool,
    ToolCall,
    ToolCallDelta,
    ToolCallStart,
)
from control_plane.output import Output
from control_plane.prompting import ModelTokenizer, StopMatcher
from control_plane.tool_calls import parser_for
from cortex.neuron_api import TokenizerFiles

DATA = Path(__file__).parent / "data" / "o200k_base.tiktoken.gz"
WEATHER = Tool(
    "get_weather",
    "The weather in a city.",
    {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
)


@pytest.fixture(scope="module")
def encoding(tmp_path_factory: pytest.TempPathFactory) -> HarmonyEncoding:
    """The vocabulary as the gateway writes it: from a gpt-oss tokenizer.json's byte-level
    vocabulary (made here from the published file, GPT-2's alphabet)."""
    encoder = {byte: character for character, byte in harmony._byte_decoder().items()}
    vocabulary = {}
    for line in gzip.decompress(DATA.read_bytes()).decode().splitlines():
        token, rank = line.split()
        text = "".join(encoder[b] for b in base64.b64decode(token))
        vocabulary[text] = int(rank)
    vocabulary["<|return|>"] = 200002  # harmony's own tokens sit above the base ones
    tokenizer_json = json.dumps({"model": {"type": "BPE", "vocab": vocabulary}})
    folder = tmp_path_factory.mktemp("harmony-vocab")
    harmony.write_vocabulary(tokenizer_json, folder)
    return harmony.encoding(folder)


def completion(encoding: HarmonyEncoding, text: str) -> list[int]:
    """Token ids of a completion as gpt-oss writes it (after the prompt's <|start|>assistant)."""
    return list(encoding.encode(text, allowed_special="all"))


TOOL_TURN = (
    "<|channel|>analysis<|message|>The user wants the weather in Oslo. I should call "
    "get_weather.<|end|><|start|>assistant<|channel|>commentary to=functions.get_weather "
    '<|constrain|>json<|message|>{"city":"Oslo"}<|call|>'
)
ANSWER_TURN = (
    "<|channel|>analysis<|message|>It is 3 °C and cloudy; answer briefly.<|end|>"
    "<|start|>assistant<|channel|>final<|message|>Oslo: 3 °C and cloudy — bring a coat.<|return|>"
)


def parse(encoding: HarmonyEncoding, ids: list[int], **options: int) -> list[object]:
    parser = harmony.HarmonyParser(encoding, **options)
    events: list[object] = []
    for token in ids:  # as the engine streams them, one at a time
        events.extend(parser.feed([token]))
    return events + parser.finish()


def test_a_tool_turn_gives_reasoning_then_one_checked_call(encoding: HarmonyEncoding) -> None:
    ids = completion(encoding, TOOL_TURN)
    assert ids[-1] in harmony.stop_token_ids(encoding)  # <|call|> ends the completion
    events = parse(encoding, ids)
    reasoning = "".join(e.text for e in events if isinstance(e, ReasoningDelta))
    assert reasoning == "The user wants the weather in Oslo. I should call get_weather."
    starts = [e for e in events if isinstance(e, ToolCallStart)]
    assert [(s.index, s.name) for s in starts] == [(0, "get_weather")]
    arguments = "".join(e.arguments for e in events if isinstance(e, ToolCallDelta))
    assert json.loads(arguments) == {"city": "Oslo"}
    assert not [e for e in events if isinstance(e, TextDelta)]


def test_an_answer_turn_streams_reasoning_and_the_final_text(encoding: HarmonyEncoding) -> None:
    events = parse(encoding, completion(encoding, ANSWER_TURN))
    kinds = [type(e).__name__ for e in events]
    # Reasoning first, then the answer, each as several deltas (UTF-8 kept whole).
    assert kinds.index("TextDelta") > max(i for i, k in enumerate(kinds) if k == "ReasoningDelta")
    text = "".join(e.text for e in events if isinstance(e, TextDelta))
    assert text == "Oslo: 3 °C and cloudy — bring a coat."
    assert kinds.count("TextDelta") > 1


def test_broken_call_arguments_come_back_as_text(encoding: HarmonyEncoding) -> None:
    broken = TOOL_TURN.replace('{"city":"Oslo"}', '{"city": Oslo')
    events = parse(encoding, completion(encoding, broken))
    assert not [e for e in events if isinstance(e, ToolCallStart)]
    assert [e.text for e in events if isinstance(e, TextDelta)] == ['{"city": Oslo']


def test_with_parallel_calls_off_only_the_first_call_is_kept(encoding: HarmonyEncoding) -> None:
    second = TOOL_TURN.replace("<|call|>", "<|end|>") + (
        "<|start|>assistant<|channel|>commentary to=functions.get_weather "
        '<|constrain|>json<|message|>{"city":"Bergen"}<|call|>'
    )
    events = parse(encoding, completion(encoding, second), max_calls=1)
    assert [e.name for e in events if isinstance(e, ToolCallStart)] == ["get_weather"]
    assert "Bergen" not in "".join(e.arguments for e in events if isinstance(e, ToolCallDelta))


def test_the_prompt_renders_instructions_tools_calls_and_results(encoding: HarmonyEncoding) -> None:
    request = ChatRequest(
        model="gpt-oss-20b",
        messages=(
            Message("system", "You are terse."),
            Message("user", "Weather in Oslo?"),
            Message("assistant", "", (ToolCall("c1", "get_weather", '{"city":"Oslo"}'),)),
            Message("tool", '{"temperature": 3}', tool_call_id="c1"),
        ),
        tools=(WEATHER,),
    )
    text = encoding.decode(harmony.render(encoding, request))
    assert text.startswith("<|start|>system<|message|>")
    assert "Reasoning: medium" in text
    assert "<|start|>developer<|message|># Instructions\n\nYou are terse." in text
    assert "namespace functions {" in text and "type get_weather = (_: {" in text
    assert "<|start|>user<|message|>Weather in Oslo?<|end|>" in text
    assert (
        "<|start|>assistant to=functions.get_weather<|channel|>commentary <|constrain|>json"
        '<|message|>{"city":"Oslo"}<|call|>'
    ) in text
    assert (
        "<|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>"
        '{"temperature": 3}<|end|>'
    ) in text
    assert text.endswith("<|start|>assistant")


def test_a_result_for_no_call_is_refused_naming_the_field(encoding: HarmonyEncoding) -> None:
    from control_plane.errors import InvalidRequest

    request = ChatRequest(
        model="gpt-oss-20b",
        messages=(Message("user", "hi"), Message("tool", "42", tool_call_id="nope")),
    )
    with pytest.raises(InvalidRequest, match=r"^messages: a tool result answers no tool call"):
        harmony.render(encoding, request)


def test_a_vocabulary_that_is_not_o200k_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TIKTOKEN_ENCODINGS_BASE", "")  # restored after: the fixture's folder
    harmony.write_vocabulary(json.dumps({"model": {"vocab": {"a": 0, "b": 1}}}), tmp_path)
    with pytest.raises(RuntimeError, match="hash mismatch"):
        harmony.encoding(tmp_path)


@pytest.fixture
def gpt_oss_tokenizer(tiny_model: Path, encoding: HarmonyEncoding) -> ModelTokenizer:
    """A gateway tokenizer for a harmony model (its own, not the shared fixture: harmony adds
    end ids). Its vocabulary comes from $TIKTOKEN_ENCODINGS_BASE, which `encoding` set."""
    names = ("tokenizer.json", "tokenizer_config.json")
    files = {n: (tiny_model / n).read_text() for n in names}
    return ModelTokenizer(
        TokenizerFiles(
            model="gpt-oss", files=files, context_length=8192, eos_token_ids=[2], pad_token_id=0
        )
    )


def output_of(tokenizer: ModelTokenizer, ids: list[int], stop: tuple[str, ...] = ()) -> list[Event]:
    """What the gateway's output pipeline makes of a harmony model's ids, streamed one by one."""
    parser = parser_for("harmony", tools_offered=True, harmony=tokenizer.harmony())
    output = Output(tokenizer.stream_decoder(), StopMatcher(stop), parser, 40, 512)
    events: list[Event] = []
    for token in ids:
        events.extend(output.feed([token]))
        if output.done:
            break
    return events + output.finish()


def test_a_harmony_model_renders_through_harmony_and_ends_on_its_tokens(
    gpt_oss_tokenizer: ModelTokenizer, encoding: HarmonyEncoding
) -> None:
    request = ChatRequest(model="gpt-oss", messages=(Message("user", "Weather in Oslo?"),))
    assert gpt_oss_tokenizer.render(request, harmony=True) == harmony.render(encoding, request)
    # <|return|> and <|call|> end a completion: the engine is told to stop on them.
    assert {200002, 200012} <= set(gpt_oss_tokenizer.eos_token_ids)


def test_the_output_pipeline_turns_a_tool_turn_into_a_call(
    gpt_oss_tokenizer: ModelTokenizer, encoding: HarmonyEncoding
) -> None:
    events = output_of(gpt_oss_tokenizer, completion(encoding, TOOL_TURN))
    assert [e.name for e in events if isinstance(e, ToolCallStart)] == ["get_weather"]
    finished = events[-1]
    assert isinstance(finished, Finished) and finished.reason is FinishReason.TOOL_CALLS
    assert finished.usage.completion_tokens == len(completion(encoding, TOOL_TURN))


def test_stop_strings_apply_to_the_answer_not_the_reasoning(
    gpt_oss_tokenizer: ModelTokenizer, encoding: HarmonyEncoding
) -> None:
    # "briefly" is in the reasoning, "bring" in the answer: only the answer's stops it.
    events = output_of(gpt_oss_tokenizer, completion(encoding, ANSWER_TURN), ("briefly", "bring"))
    text = "".join(e.text for e in events if isinstance(e, TextDelta))
    assert text == "Oslo: 3 °C and cloudy — "
    finished = events[-1]
    assert isinstance(finished, Finished) and finished.reason is FinishReason.STOP_SEQUENCE
    assert finished.stop_sequence == "bring"


def test_the_analysis_channel_is_counted_as_reasoning_tokens(
    gpt_oss_tokenizer: ModelTokenizer, encoding: HarmonyEncoding
) -> None:
    events = output_of(gpt_oss_tokenizer, completion(encoding, ANSWER_TURN))
    finished = events[-1]
    assert isinstance(finished, Finished)
    # The analysis message's text and the <|message|> that opens it; not the rest of its
    # header, not the final message.
    analysis = completion(encoding, "<|message|>It is 3 °C and cloudy; answer briefly.")
    assert finished.usage.reasoning_tokens == len(analysis)
    assert finished.usage.completion_tokens == len(completion(encoding, ANSWER_TURN))


def test_echoed_reasoning_is_kept_before_a_call_and_dropped_before_an_answer(
    encoding: HarmonyEncoding,
) -> None:
    thought = "The user wants the weather in Oslo. I should call get_weather."
    call = ToolCall("c1", "get_weather", '{"city":"Oslo"}')
    in_the_loop = (
        Message("user", "Weather in Oslo?"),
        Message("assistant", "", (call,), reasoning=thought),
        Message("tool", '{"temperature": 3}', tool_call_id="c1"),
    )
    request = ChatRequest(model="gpt-oss-20b", messages=in_the_loop, tools=(WEATHER,))
    text = encoding.decode(harmony.render(encoding, request))
    # As gpt-oss wrote it (TOOL_TURN): its chain of thought before the call it led to.
    assert f"<|start|>assistant<|channel|>analysis<|message|>{thought}<|end|>" in text
    answered = (
        *in_the_loop,
        Message("assistant", "Oslo: 3 °C.", reasoning="It is 3 °C; answer briefly."),
        Message("user", "And tomorrow?"),
    )
    text = encoding.decode(harmony.render(encoding, replace(request, messages=answered)))
    assert "answer briefly" not in text and thought not in text  # a finished turn's is dropped
    assert "<|channel|>final<|message|>Oslo: 3 °C.<|end|>" in text
