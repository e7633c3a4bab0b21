"""The torch engine against transformers' own generate, on cortex-tiny (float32 on CPU)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedTokenizerBase,
)

from neuron_agent.torch_engine.errors import RequestRejected
from neuron_agent.torch_engine.loader import EngineOptions, build_engine
from neuron_agent.torch_engine.sampling import SamplingParams
from neuron_agent.torch_engine.scheduler import Engine, GenerationRequest

QUESTIONS = [
    "What is a list?",
    "Explain the with statement and the context manager protocol in detail",
    "hello",
    "How do I open a file and read every line of it?",
    "Describe how the import system finds modules on sys.path",
    "lambda",
]


class Collector:
    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.done = threading.Event()
        self.error: str | None = None
        self.responses = 0

    def emit(self, tokens: list[int], final: bool) -> None:
        self.tokens.extend(tokens)
        self.responses += 1
        if final:
            self.done.set()

    def fail(self, message: str) -> None:
        self.error = message
        self.done.set()


@pytest.fixture(scope="module")
def tokenizer(tiny_model: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(tiny_model)


@pytest.fixture(scope="module")
def reference(tiny_model: Path) -> Any:
    return AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def engine(tiny_model: Path) -> Iterator[Engine]:
    built = build_engine(EngineOptions(tiny_model, kv_cache_tokens=4096, max_batch_size=4))
    built.start()
    yield built
    built.stop()


def prompt_ids(tokenizer: PreTrainedTokenizerBase, question: str) -> list[int]:
    return list(
        tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, return_dict=False
        )
    )


def reference_greedy(
    reference: Any, tokenizer: PreTrainedTokenizerBase, ids: list[int], max_new: int
) -> tuple[list[int], list[float]]:
    """transformers' greedy tokens (end token dropped) and, per step, the top-2 logit gap."""
    with torch.no_grad():
        out = reference.generate(
            torch.tensor([ids]),
            max_new_tokens=max_new,
            do_sample=False,
            output_scores=True,
            return_dict_in_generate=True,
        )
    tokens = out.sequences[0][len(ids) :].tolist()
    gaps = [float((s[0].topk(2).values[0] - s[0].topk(2).values[1]).item()) for s in out.scores]
    if tokens and tokens[-1] == tokenizer.eos_token_id:
        tokens = tokens[:-1]
    return tokens, gaps


def assert_same_or_tied(got: list[int], expected: list[int], gaps: list[float]) -> None:
    """Equal token for token; where they first differ, the reference's top-2 logits must have
    been tied within 1e-5 (float rounding between batch shapes may flip a near tie)."""
    for index, (a, b) in enumerate(zip(got, expected, strict=False)):
        if a != b:
            assert gaps[index] < 1e-5, f"token {index} differs with logit gap {gaps[index]}"
            return
    assert len(got) == len(expected)


def run(engine: Engine, ids: list[int], max_new: int, **kwargs: Any) -> Collector:
    collector = Collector()
    engine.submit(
        GenerationRequest(
            prompt=ids,
            max_new_tokens=max_new,
            emit=collector.emit,
            fail=collector.fail,
            end_ids=frozenset({engine.model.spec.eos_token_ids[0]}),
            **kwargs,
        )
    )
    return collector


def test_single_request_matches_transformers(
    engine: Engine, reference: Any, tokenizer: PreTrainedTokenizerBase
) -> None:
    ids = prompt_ids(tokenizer, QUESTIONS[0])
    expected, gaps = reference_greedy(reference, tokenizer, ids, 48)
    collector = run(engine, ids, 48)
    assert collector.done.wait(60)
    assert collector.error is None
    assert_same_or_tied(collector.tokens, expected, gaps)


def test_concurrent_staggered_requests_match_transformers(
    engine: Engine, reference: Any, tokenizer: PreTrainedTokenizerBase
) -> None:
    # Different prompt lengths, admitted at different moments, more requests than batch slots.
    cases = [prompt_ids(tokenizer, q) for q in QUESTIONS]
    expected = [reference_greedy(reference, tokenizer, ids, 40) for ids in cases]
    collectors = []
    for ids in cases:
        collectors.append(run(engine, ids, 40))
        time.sleep(0.02)
    for collector, (tokens, gaps) in zip(collectors, expected, strict=True):
        assert collector.done.wait(120)
        assert collector.error is None
        assert_same_or_tied(collector.tokens, tokens, gaps)


def test_streaming_sends_tokens_step_by_step(
    engine: Engine, tokenizer: PreTrainedTokenizerBase
) -> None:
    collector = run(engine, prompt_ids(tokenizer, "hello"), 20, stream=True)
    assert collector.done.wait(60)
    assert collector.responses >= min(len(collector.tokens), 2)
    single = run(engine, prompt_ids(tokenizer, "hello"), 20, stream=False)
    assert single.done.wait(60)
    assert single.responses == 1
    assert single.tokens == collector.tokens


def test_seeded_sampling_is_reproducible(
    engine: Engine, tokenizer: PreTrainedTokenizerBase
) -> None:
    ids = prompt_ids(tokenizer, QUESTIONS[1])
    params = SamplingParams(temperature=1.0, top_k=50, top_p=0.95, seed=1234)
    first = run(engine, ids, 32, sampling=params)
    second = run(engine, ids, 32, sampling=params)
    other = run(
        engine, ids, 32, sampling=SamplingParams(temperature=1.0, top_k=50, top_p=0.95, seed=99)
    )
    for c in (first, second, other):
        assert c.done.wait(60)
    assert first.tokens == second.tokens
    assert first.tokens != other.tokens


def test_cancellation_frees_the_slot(engine: Engine, tokenizer: PreTrainedTokenizerBase) -> None:
    cancelled = threading.Event()
    ids = prompt_ids(tokenizer, QUESTIONS[1])
    free_before = engine.pool.free_blocks
    collector = run(engine, ids, 2000, is_cancelled=cancelled.is_set)
    deadline = time.monotonic() + 30
    while not collector.tokens and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.stats()["running"] >= 1
    cancelled.set()
    assert collector.done.wait(10)
    assert len(collector.tokens) < 2000
    deadline = time.monotonic() + 5
    while engine.pool.free_blocks != free_before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.pool.free_blocks == free_before
    assert engine.stats()["running"] == 0


def test_the_last_counts_told_are_the_idle_ones(
    engine: Engine, tokenizer: PreTrainedTokenizerBase
) -> None:
    """The submitting thread and the engine thread both tell the counts; a slow telling of the
    submit's (0 running, 1 waiting) must not land after the engine's final (0, 0): the neuron
    would report an idle model busy until its next request (routing sent turns elsewhere)."""
    told: list[tuple[int, int]] = []
    submitter = threading.get_ident()

    def on_change(running: int, waiting: int) -> None:
        if threading.get_ident() == submitter and not told:
            time.sleep(0.5)  # the engine runs the whole request meanwhile
        told.append((running, waiting))

    engine.on_change = on_change
    try:
        collector = run(engine, prompt_ids(tokenizer, QUESTIONS[2]), 2)
        assert collector.done.wait(30) and collector.error is None
        deadline = time.monotonic() + 5
        while (not told or told[-1] != (0, 0)) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert told[-1] == (0, 0), told
    finally:
        engine.on_change = None


def test_request_larger_than_the_kv_budget_is_refused(
    engine: Engine, tokenizer: PreTrainedTokenizerBase
) -> None:
    with pytest.raises(RequestRejected, match="KV budget"):
        run(engine, prompt_ids(tokenizer, "hi"), 100_000)


def test_ids_outside_the_vocabulary_are_refused_and_the_batch_goes_on(
    engine: Engine, tokenizer: PreTrainedTokenizerBase
) -> None:
    """An id past the embedding table would fail the step of every request in the batch; it is
    refused at the door instead, naming the tensor."""
    running = run(engine, prompt_ids(tokenizer, "Count to ten."), 24)
    for ids in ([1, engine.model.spec.vocab_size], [-1, 2]):
        with pytest.raises(RequestRejected, match="input_ids"):
            run(engine, ids, 4)
    assert running.done.wait(60) and running.error is None


def test_full_queue_is_refused_with_a_clear_error(
    tiny_model: Path, tokenizer: PreTrainedTokenizerBase
) -> None:
    small = build_engine(
        EngineOptions(tiny_model, kv_cache_tokens=256, max_batch_size=1, max_queue_size=1)
    )
    # Not started: nothing leaves the queue.
    run(small, prompt_ids(tokenizer, "hi"), 8)
    with pytest.raises(RequestRejected, match="queue is full"):
        run(small, prompt_ids(tokenizer, "hi"), 8)
    small.stop()


# cortex-tiny's MLP width (688) takes int4 groups of 16, not the usual 128.
@pytest.mark.parametrize(("mode", "bound"), [("int8", 0.02), ("int4", 0.12)])
def test_weight_only_quantization_stays_close(
    tiny_model: Path, tokenizer: PreTrainedTokenizerBase, mode: str, bound: float
) -> None:
    """Relative L2 error of the last-position logits vs. the unquantized engine."""

    def logits(engine: Engine, ids: list[int]) -> torch.Tensor:
        return engine.prompt_logits(ids)[-1]

    plain = build_engine(EngineOptions(tiny_model, kv_cache_tokens=512))
    quantized = build_engine(
        EngineOptions(tiny_model, kv_cache_tokens=512, quantization=mode, group_size=16)
    )
    assert all(layer.qkv.mode == mode for layer in quantized.model.layers)
    for question in QUESTIONS[:3]:
        ids = prompt_ids(tokenizer, question)
        a, b = logits(plain, ids), logits(quantized, ids)
        error = float((a - b).norm() / a.norm())
        assert error < bound, f"{mode}: relative logit error {error:.4f} ≥ {bound}"


def test_an_fp8_kv_cache_decodes_like_transformers_up_to_a_near_tie(
    tiny_model: Path, reference: Any, tokenizer: PreTrainedTokenizerBase
) -> None:
    """Keys and values rounded to float8 (3 mantissa bits, one scale per vector) move logits
    by about 1 %: greedy tokens equal the float32 reference's until the first step whose top-2
    logits were within 0.05 of each other."""
    fp8 = build_engine(
        EngineOptions(tiny_model, kv_cache_tokens=4096, max_batch_size=4, kv_cache_dtype="fp8")
    )
    # What the neuron's memory estimate counts (a byte an element, a float32 scale a vector)
    # is what the pool holds, with its one scratch block.
    slots = fp8.pool.capacity_tokens + fp8.pool.block_size
    assert fp8.pool.nbytes() == slots * fp8.model.spec.kv_bytes_per_token(1, scale_bytes=4)
    fp8.start()
    try:
        for question in QUESTIONS[:4]:
            ids = prompt_ids(tokenizer, question)
            expected, gaps = reference_greedy(reference, tokenizer, ids, 40)
            collector = run(fp8, ids, 40)
            assert collector.done.wait(60) and collector.error is None
            near_tie = next((i for i, gap in enumerate(gaps) if gap < 0.05), len(gaps))
            assert collector.tokens[:near_tie] == expected[:near_tie], question
    finally:
        fp8.stop()
