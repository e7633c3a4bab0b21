"""The engine's logprobs against transformers' log-softmax on the same model (cortex-tiny,
float32 on CPU), for greedy and sampled tokens, with the top alternatives."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from neuron_agent.torch_engine.errors import RequestRejected
from neuron_agent.torch_engine.loader import EngineOptions, build_engine
from neuron_agent.torch_engine.sampling import SamplingParams, TokenLogprob
from neuron_agent.torch_engine.scheduler import Engine, GenerationRequest


class Collector:
    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.logprobs: list[TokenLogprob] = []
        self.aligned = True  # every emit brought exactly its tokens' logprobs
        self.done = threading.Event()

    def take(self, entries: list[TokenLogprob]) -> None:
        self.logprobs.extend(entries)

    def emit(self, tokens: list[int], final: bool) -> None:
        self.tokens.extend(tokens)
        self.aligned = self.aligned and len(self.logprobs) == len(self.tokens)
        if final:
            self.done.set()


@pytest.fixture(scope="module")
def engine(tiny_model: Path) -> Iterator[Engine]:
    built = build_engine(EngineOptions(tiny_model, kv_cache_tokens=4096, max_batch_size=4))
    built.start()
    yield built
    built.stop()


def run(engine: Engine, prompt: list[int], top: int, sampling: SamplingParams) -> Collector:
    collector = Collector()
    engine.submit(
        GenerationRequest(
            prompt=prompt,
            max_new_tokens=12,
            emit=collector.emit,
            fail=lambda message: pytest.fail(message),
            sampling=sampling,
            top_logprobs=top,
            logprobs=collector.take,
        )
    )
    assert collector.done.wait(60)
    return collector


@pytest.mark.parametrize(
    "sampling",
    [SamplingParams(), SamplingParams(temperature=1.3, seed=11)],
    ids=["greedy", "sampled"],
)
def test_logprobs_match_transformers(
    engine: Engine, tiny_model: Path, sampling: SamplingParams
) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    reference = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    prompt = tokenizer.encode("def read_lines(path):")
    got = run(engine, prompt, 5, sampling)
    assert got.tokens and got.aligned and len(got.logprobs) == len(got.tokens)
    with torch.no_grad():
        logits = reference(torch.tensor([prompt + got.tokens])).logits[0].float()
    expected = torch.log_softmax(logits, dim=-1)[len(prompt) - 1 : -1]
    for position, (token, entry) in enumerate(zip(got.tokens, got.logprobs, strict=True)):
        row = expected[position]
        assert entry.logprob == pytest.approx(row[token].item(), abs=2e-3)
        values, _ = torch.topk(row, 5)
        assert list(entry.top_logprobs) == pytest.approx(values.tolist(), abs=2e-3)
        assert [row[i].item() for i in entry.top_ids] == pytest.approx(values.tolist(), abs=2e-3)


def test_without_top_alternatives_and_the_limit(engine: Engine, tiny_model: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    got = run(engine, tokenizer.encode("hello"), 0, SamplingParams())
    assert got.logprobs and all(e.top_ids == () and e.logprob <= 0 for e in got.logprobs)
    with pytest.raises(RequestRejected, match="num_top_logprobs"):
        run(engine, tokenizer.encode("hello"), 21, SamplingParams())
