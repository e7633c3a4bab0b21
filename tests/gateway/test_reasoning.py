"""Reasoning written inline (`control_plane/reasoning.py`): Qwen3's `<think>…</think>` split from
the answer however the output is streamed, before the stop strings and the tool-call parser; its
tokens counted. Completions are shaped like Qwen3's own (a line break inside each tag, a blank
line before the answer)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from hypothesis import given

from control_plane.anthropic.protocol import MessagesRequest
from control_plane.anthropic.translate import chat_request as anthropic_request
from control_plane.canonical import (
    ChatRequest,
    Event,
    Finished,
    Message,
    ReasoningDelta,
    TextDelta,
    ToolCallStart,
)
from control_plane.generation import think_splitter
from control_plane.openai.protocol import ChatCompletionRequest
from control_plane.openai.translate import chat_request as openai_request
from control_plane.output import Output
from control_plane.prompting import ModelTokenizer, StopMatcher
from control_plane.reasoning import Phase, ThinkSplitter, prompt_opens_reasoning, template_reasons
from control_plane.responses.protocol import ResponsesRequest
from control_plane.responses.translate import chat_request as responses_request
from control_plane.tool_calls import parser_for
from cortex.config import ModelProfile, ReasoningFormat
from cortex.neuron_api import CatalogueEntry, TokenizerFiles
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


# ---- whether a model reasons, from its template and the request --------------------------------

# Qwen3's chat template, cut to what decides reasoning: hybrid models open an empty block when
# asked not to think; thinking-only models (…-Thinking-2507) always open one.
QWEN3_TEMPLATE = (
    "{%- for m in messages %}{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}{%- endif %}"
)
THINKING_TEMPLATE = QWEN3_TEMPLATE.replace(
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}",
    "{{- '<think>\\n' }}",
)


def tokenizer_with(tiny_model: Path, template: str) -> ModelTokenizer:
    files = {n: (tiny_model / n).read_text() for n in ("tokenizer.json", "tokenizer_config.json")}
    config = json.loads(files["tokenizer_config.json"])
    config["chat_template"] = template
    files["tokenizer_config.json"] = json.dumps(config)
    return ModelTokenizer(
        TokenizerFiles(
            model="qwen3", files=files, context_length=4096, eos_token_ids=[2], pad_token_id=0
        )
    )


def entry(reasoning: ReasoningFormat = ReasoningFormat.AUTO) -> CatalogueEntry:
    profile = ModelProfile(name="qwen3", source="/models/qwen3", reasoning=reasoning)
    return CatalogueEntry(profile=profile, estimated_bytes=1, context_length=4096)


def test_a_hybrid_model_told_not_to_reason_gets_an_empty_block(tiny_model: Path) -> None:
    tokenizer = tokenizer_with(tiny_model, QWEN3_TEMPLATE)
    asked = ChatRequest("qwen3", (Message("user", "Hi"),))
    for reasoning, ending in ((None, "assistant\n"), (False, "<think>\n\n</think>\n\n")):
        request = replace(asked, reasoning=reasoning)
        prompt = tokenizer.render(request)
        assert tokenizer.decode(prompt).endswith(ending)
        splitter = think_splitter(entry(), tokenizer, request, prompt)
        assert splitter is not None and splitter.state is Phase.START  # the template knows it


def test_a_thinking_only_model_starts_inside_its_reasoning(tiny_model: Path) -> None:
    tokenizer = tokenizer_with(tiny_model, THINKING_TEMPLATE)
    request = ChatRequest("qwen3", (Message("user", "Hi"),), reasoning=False)
    prompt = tokenizer.render(request)
    splitter = think_splitter(entry(), tokenizer, request, prompt)
    assert splitter is not None and splitter.state is Phase.INSIDE


def test_the_catalogue_decides_over_the_template(tiny_model: Path) -> None:
    plain = tokenizer_with(tiny_model, "{{ messages[0].content }}")
    request = ChatRequest("qwen3", (Message("user", "Hi"),))
    prompt = plain.render(request)
    assert think_splitter(entry(), plain, request, prompt) is None
    assert think_splitter(entry(ReasoningFormat.THINK), plain, request, prompt) is not None
    qwen3 = tokenizer_with(tiny_model, QWEN3_TEMPLATE)
    assert think_splitter(entry(ReasoningFormat.NONE), qwen3, request, prompt) is None


def test_each_dialect_says_whether_the_model_should_reason() -> None:
    def anthropic(**body: Any) -> bool | None:
        request = {"model": "m", "max_tokens": 9, "messages": [{"role": "user", "content": "x"}]}
        return anthropic_request(MessagesRequest.model_validate({**request, **body}), "r").reasoning

    assert anthropic() is False  # as on Anthropic's API: no thinking unless asked
    assert anthropic(thinking={"type": "disabled"}) is False
    assert anthropic(thinking={"type": "adaptive"}) is True

    def chat(**body: Any) -> bool | None:
        request = {"model": "m", "messages": [{"role": "user", "content": "x"}], **body}
        return openai_request(ChatCompletionRequest.model_validate(request), "r").reasoning

    assert (chat(), chat(reasoning_effort="none"), chat(reasoning_effort="low")) == (
        None,
        False,
        True,
    )

    def responses(**body: Any) -> bool | None:
        request = ResponsesRequest.model_validate({"model": "m", "input": "x", **body})
        return responses_request(request, "r").reasoning

    assert responses() is None
    assert responses(reasoning={"effort": "none"}) is False
    assert responses(reasoning={"effort": "high", "summary": "auto"}) is True


# Qwen3's template renders an assistant turn's `reasoning_content` inside a tool loop.
ECHO_TEMPLATE = (
    "{%- for m in messages %}{{- '<|im_start|>' + m.role + '\\n' }}"
    "{%- if m.reasoning_content %}{{- '<think>\\n' + m.reasoning_content + '\\n</think>\\n\\n' }}"
    "{%- endif %}{{- m.content + '<|im_end|>\\n' }}{%- endfor %}"
)


def test_reasoning_sent_back_reaches_the_template(tiny_model: Path) -> None:
    history = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "Checking.", "reasoning_content": THOUGHT},
    ]
    chat = openai_request(
        ChatCompletionRequest.model_validate({"model": "m", "messages": history}), "r"
    )
    thinking = {"type": "thinking", "thinking": THOUGHT, "signature": "cortex-sha256:00"}
    turns = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": [thinking, {"type": "text", "text": "Checking."}]},
        {"role": "assistant", "content": [{"type": "redacted_thinking", "data": "opaque"}]},
        {"role": "user", "content": "Go on."},
    ]
    claude = anthropic_request(
        MessagesRequest.model_validate({"model": "m", "max_tokens": 9, "messages": turns}), "r"
    )
    assert chat.messages[1].reasoning == THOUGHT
    assert [(m.role, m.reasoning) for m in claude.messages[:2]] == [
        ("user", ""),
        ("assistant", THOUGHT),
    ]
    tokenizer = tokenizer_with(tiny_model, ECHO_TEMPLATE)
    rendered = tokenizer.decode(tokenizer.render(chat))
    assert f"assistant\n<think>\n{THOUGHT}\n</think>\n\nChecking." in rendered


def test_a_reasoning_item_sent_back_belongs_to_the_turn_after_it() -> None:
    items = [
        {"type": "message", "role": "user", "content": "Weather in Paris?"},
        {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": "opaque"},
        {
            "type": "reasoning",
            "id": "rs_2",
            "summary": [],
            "content": [{"type": "reasoning_text", "text": THOUGHT}],
        },
        {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
        {"type": "message", "role": "assistant", "content": "Sunny."},
    ]
    request = responses_request(
        ResponsesRequest.model_validate({"model": "m", "input": items}), "r"
    )
    assert [(m.role, m.reasoning) for m in request.messages] == [
        ("user", ""),
        ("assistant", THOUGHT),
        ("tool", ""),
        ("assistant", ""),
    ]
