"""Logprobs through the embedded fleet (real tritonserver, the torch engine on cortex-tiny) in
all three OpenAI-style shapes, streamed and not, against transformers' log-softmax."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import openai
import pytest
import torch
from openai.types.responses import ResponseOutputMessage, ResponseOutputText
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.conftest import Embedded

MODEL = "cortex-tiny"
PROMPT = "def read_lines(path):"
# Both a chat message list and a Responses input, whose SDK types differ: plain JSON.
ASK: list[Any] = [{"role": "user", "content": "What is a list?"}]


@pytest.fixture(scope="module")
def oai(embedded: Embedded) -> openai.OpenAI:
    return openai.OpenAI(base_url=embedded.base_url, api_key="unused", max_retries=0)


def test_completion_logprobs_are_transformers_log_softmax(
    oai: openai.OpenAI, tiny_model: Path
) -> None:
    reply = oai.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=8, logprobs=3, temperature=0
    )
    logprobs = reply.choices[0].logprobs
    assert logprobs is not None and logprobs.tokens and logprobs.token_logprobs
    assert "".join(logprobs.tokens) == reply.choices[0].text
    assert logprobs.text_offset == [
        sum(len(t) for t in logprobs.tokens[:i]) for i in range(len(logprobs.tokens))
    ]
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    reference = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    prompt = tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        generated = reference.generate(
            torch.tensor([prompt]), max_new_tokens=len(logprobs.tokens), do_sample=False
        )[0].tolist()
        expected = torch.log_softmax(reference(torch.tensor([generated])).logits[0], dim=-1)
    for position, (token, value, tops) in enumerate(
        zip(logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs or [], strict=True)
    ):
        row = expected[len(prompt) - 1 + position]
        token_id = generated[len(prompt) + position]
        assert token == tokenizer.decode([token_id], skip_special_tokens=True)
        assert value == pytest.approx(row[token_id].item(), abs=2e-3)
        assert len(tops) <= 3 and max(tops.values()) == pytest.approx(row.max().item(), abs=2e-3)


def test_chat_and_responses_logprobs_streamed_and_not(oai: openai.OpenAI) -> None:
    whole = oai.chat.completions.create(
        model=MODEL,
        messages=ASK,
        max_tokens=8,
        logprobs=True,
        top_logprobs=2,
    )
    assert whole.choices[0].logprobs is not None
    content = whole.choices[0].logprobs.content
    assert content and all(len(entry.top_logprobs) == 2 for entry in content)
    assert all(entry.top_logprobs[0].logprob >= entry.logprob - 1e-6 for entry in content)
    assert "".join(entry.token for entry in content) == whole.choices[0].message.content
    streamed = [
        entry
        for chunk in oai.chat.completions.create(
            model=MODEL,
            messages=ASK,
            max_tokens=8,
            logprobs=True,
            top_logprobs=2,
            stream=True,
        )
        if chunk.choices and chunk.choices[0].logprobs
        for entry in chunk.choices[0].logprobs.content or []
    ]
    assert [(e.token, round(e.logprob, 4)) for e in streamed] == [
        (e.token, round(e.logprob, 4)) for e in content
    ]
    plain = oai.chat.completions.create(model=MODEL, messages=ASK, max_tokens=4)
    assert plain.choices[0].logprobs is None

    response = oai.responses.create(
        model=MODEL,
        input=ASK,
        max_output_tokens=8,
        top_logprobs=2,
        include=["message.output_text.logprobs"],
    )
    assert isinstance(response.output[0], ResponseOutputMessage)
    part = response.output[0].content[0]
    assert isinstance(part, ResponseOutputText) and part.logprobs is not None
    assert [round(e.logprob, 4) for e in part.logprobs] == [round(e.logprob, 4) for e in content]
    deltas = [
        entry
        for event in oai.responses.create(
            model=MODEL,
            input=ASK,
            max_output_tokens=8,
            include=["message.output_text.logprobs"],
            stream=True,
        )
        if event.type == "response.output_text.delta"
        for entry in event.logprobs
    ]
    assert [round(e.logprob, 4) for e in deltas] == [round(e.logprob, 4) for e in content]


def test_top_logprobs_over_20_or_without_logprobs_is_a_400(oai: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        oai.chat.completions.create(
            model=MODEL,
            messages=ASK,
            max_tokens=2,
            logprobs=True,
            top_logprobs=21,
        )
    assert "top_logprobs" in str(raised.value)
    with pytest.raises(openai.BadRequestError) as raised:
        oai.chat.completions.create(model=MODEL, messages=ASK, max_tokens=2, top_logprobs=2)
    assert raised.value.param == "top_logprobs"
