"""Speculative decoding: the proposers on plain token lists, the verification rules against
their exact distributions, and the engine with speculation on against itself with it off (the
same greedy tokens on cortex-tiny and on SmolLM2-135M's real weights; sampled tokens
distributed as the model's logits say; the verify pass's logits equal decoding one token at a
time)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from scipy.stats import chisquare
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from cortex.demo.smollm2 import gguf_path
from neuron_agent.torch_engine import checkpoint, loader
from neuron_agent.torch_engine.kv_cache import BlockPool
from neuron_agent.torch_engine.loader import EngineOptions, build_engine
from neuron_agent.torch_engine.parallel import Shard
from neuron_agent.torch_engine.sampling import SamplingParams, distribution
from neuron_agent.torch_engine.scheduler import Engine, GenerationRequest
from neuron_agent.torch_engine.speculation import (
    NO_MATCH,
    LengthControl,
    Match,
    OutputHistory,
    PromptLookup,
    SpeculationMethod,
    SpeculationSettings,
    propose,
    verify_greedy,
    verify_sampled,
)
from tests.torch_engine.test_engine import Collector

# ---------------------------------------------------------------------------- proposers


def test_prompt_lookup_reads_on_after_the_latest_longest_match() -> None:
    tokens = [1, 2, 3, 9, 9, 7, 2, 3, 4, 5, 6, 0, 1, 2, 3]
    lookup = PromptLookup(tokens, min_ngram=2, max_ngram=3)
    # [1, 2, 3] occurred once before (followed by 9 9 7); the 2-gram [2, 3] later, followed by
    # 4 5 6: the longer match wins.
    assert lookup.propose(3) == Match(3, (9, 9, 7))
    tokens.append(8)  # the lookup reads the list it was given as it grows
    assert lookup.propose(3) == NO_MATCH
    tokens.extend([2, 3])
    # The latest occurrence of [2, 3] with something after it: positions 13-14 (then 8).
    assert lookup.propose(2) == Match(2, (8, 2))


def test_prompt_lookup_never_matches_the_ngram_it_ends_with() -> None:
    assert PromptLookup([5, 6], 2, 4).propose(4) == NO_MATCH
    # A repeating pattern reads on into its own latest copy.
    assert PromptLookup([1, 2, 1, 2, 1], 2, 2).propose(3) == Match(2, (2, 1))


def test_output_history_matches_recent_outputs_within_its_budget() -> None:
    history = OutputHistory(min_ngram=2, max_ngram=3, capacity_tokens=10)
    history.add([10, 11, 12, 13, 14])
    assert history.propose([0, 11, 12], 2) == Match(2, (13, 14))
    history.add([20, 11, 12, 99, 98])  # a later output with the same 2-gram
    assert history.propose([0, 11, 12], 2) == Match(2, (99, 98))
    assert history.tokens == 10
    history.add([30, 31, 32])  # over budget: the oldest output goes
    assert len(history) == 2 and history.tokens == 8
    assert history.propose([12, 13], 1) == NO_MATCH  # only the first output had it
    assert history.propose([0, 11, 12], 2) == Match(2, (99, 98))  # the later one stays
    history.add([40, 41, 42, 43, 44, 45])
    assert history.propose([0, 11, 12], 2) == NO_MATCH


def test_the_longer_match_of_sequence_and_history_is_proposed() -> None:
    history = OutputHistory(2, 4)
    history.add([7, 8, 9, 50, 51])
    own = PromptLookup([8, 9, 60, 1, 7, 8, 9], 2, 4)
    assert propose(own, history, 2) == Match(3, (50, 51))
    assert propose(own, None, 2) == Match(2, (60, 1))


def test_length_control_grows_on_success_shrinks_on_failure_and_pauses() -> None:
    control = LengthControl(max_tokens=8, length=2)
    control.record(2, 2)
    assert control.wanted() == 4
    control.record(4, 1)
    assert control.wanted() == 3
    control.record(3, 0)
    control.record(2, 0)
    assert control.wanted() == 1
    control.record(1, 0)  # nothing accepted at one: two steps without guessing
    assert [control.wanted() for _ in range(3)] == [0, 0, 1]
    control.record(1, 0)  # again: four
    assert [control.wanted() for _ in range(5)] == [0, 0, 0, 0, 1]
    control.record(1, 1)
    assert control.wanted() == 3


# ---------------------------------------------------------------------------- verification


def test_greedy_verification_keeps_the_agreeing_prefix_and_the_models_token() -> None:
    assert verify_greedy([5, 6, 7], [5, 6]) == [5, 6, 7]
    assert verify_greedy([5, 0, 7], [5, 6]) == [5, 0]
    assert verify_greedy([1, 6, 7], [5, 6]) == [1]
    assert verify_greedy([4], []) == [4]


def _p_value(observed: Counter[int], expected: torch.Tensor) -> float:
    """Chi-square goodness of fit over the tokens with an expected count of at least 5."""
    total = sum(observed.values())
    expected = expected.double() / expected.double().sum()
    keep = [t for t in range(expected.shape[0]) if expected[t] * total >= 5]
    counts = [observed[t] for t in keep] + [total - sum(observed[t] for t in keep)]
    wanted = [float(expected[t]) * total for t in keep]
    wanted.append(total - sum(wanted))
    if wanted[-1] < 1e-6:
        counts, wanted = counts[:-1], wanted[:-1]
    return float(chisquare(counts, wanted).pvalue)


def test_sampled_verification_is_distributed_as_sampling_one_token_at_a_time() -> None:
    """Every emitted token, given the ones before it, follows its row's distribution: the
    first always, the second where the first was the candidate, the third where both were."""
    rows = torch.tensor(
        [
            [0.50, 0.20, 0.20, 0.10, 0.00],  # the first candidate (0) is likely
            [0.05, 0.15, 0.40, 0.30, 0.10],  # the second (1) is not
            [0.25, 0.25, 0.25, 0.15, 0.10],
        ]
    )
    candidates = [0, 1]
    generator = torch.Generator().manual_seed(7)
    first: Counter[int] = Counter()
    second: Counter[int] = Counter()
    third: Counter[int] = Counter()
    for _ in range(12000):
        emitted = verify_sampled(rows, candidates, generator)
        first[emitted[0]] += 1
        if emitted[0] == candidates[0]:
            second[emitted[1]] += 1
            if emitted[1] == candidates[1]:
                third[emitted[2]] += 1
    assert sum(third.values()) > 300  # every branch ran often enough to be judged
    for observed, row in ((first, rows[0]), (second, rows[1]), (third, rows[2])):
        assert _p_value(observed, row) > 1e-3, (observed, row)


# ---------------------------------------------------------------------------- the engine


def submit(engine: Engine, ids: list[int], max_new: int, **kwargs: Any) -> Collector:
    collector = Collector()
    kwargs.setdefault("end_ids", frozenset(engine.model.spec.eos_token_ids))
    engine.submit(
        GenerationRequest(
            prompt=list(ids),
            max_new_tokens=max_new,
            emit=collector.emit,
            fail=collector.fail,
            **kwargs,
        )
    )
    return collector


def generate_all(engine: Engine, prompts: list[list[int]], max_new: int) -> list[list[int]]:
    """Every prompt at once (they share the batch), greedy."""
    collectors = [submit(engine, ids, max_new) for ids in prompts]
    for collector in collectors:
        assert collector.done.wait(300)
        assert collector.error is None
    return [c.tokens for c in collectors]


CODE = """def parse(line: str) -> dict[str, str]:
    key, _, value = line.partition("=")
    return {key.strip(): value.strip()}


def parse_all(lines: list[str]) -> dict[str, str]:
    result: dict[str, str] = {}
    for line in lines:
        result.update(parse(line))
    return result
"""


def chat_prompt(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return list(
        tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, return_dict=False
        )
    )


def prompts_for(tokenizer: PreTrainedTokenizerBase) -> list[list[int]]:
    return [
        chat_prompt(tokenizer, f"Rewrite this file with parse renamed to split:\n\n{CODE}"),
        chat_prompt(tokenizer, "What is a list?"),
        tokenizer(CODE + CODE[:80])["input_ids"],  # a plain continuation of repeated text
    ]


def tiny_engine(tiny_model: Path, settings: SpeculationSettings, block_size: int = 16) -> Engine:
    """cortex-tiny's engine with these speculation settings (and KV blocks of `block_size`)."""
    options = EngineOptions(tiny_model, kv_cache_tokens=4096, max_batch_size=4)
    model, _ = loader.load_shard(options, loader.plan(options), Shard())
    pool = BlockPool(model.spec, 4096, model.dtype, model.device, block_size=block_size)
    return Engine(model, pool, max_batch_size=4, speculation=settings)


@pytest.fixture(scope="module")
def tiny_engines(tiny_model: Path) -> Iterator[tuple[Engine, Engine]]:
    off = build_engine(EngineOptions(tiny_model, kv_cache_tokens=4096, max_batch_size=4))
    # Blocks of two tokens: guesses often reach into a block of their own, which a rejection
    # must give back, and the prefix cache registers blocks written by verify passes.
    on = tiny_engine(tiny_model, SpeculationSettings(SpeculationMethod.NGRAM, 4, 4), 2)
    for engine in (off, on):
        engine.start()
    yield off, on
    for engine in (off, on):
        engine.stop()


def test_greedy_output_is_the_same_with_speculation_on_cortex_tiny(
    tiny_engines: tuple[Engine, Engine], tiny_model: Path
) -> None:
    off, on = tiny_engines
    prompts = prompts_for(AutoTokenizer.from_pretrained(tiny_model))
    expected = generate_all(off, prompts, 48)
    # One at a time (batch 1) and all together (a mixed verify pass).
    alone = [generate_all(on, [ids], 48)[0] for ids in prompts]
    together = generate_all(on, prompts, 48)
    assert alone == expected
    assert together == expected
    # A next turn reuses the blocks those passes registered in the prefix cache: they must
    # hold the accepted tokens' keys, not a rejected guess's, and be found: every whole block
    # of prompt and output but the last token (never fed) is reused.
    turns = [ids + out + ids[-8:] for ids, out in zip(prompts, expected, strict=True)]
    hits = on.stats()["prefix_hit_tokens"]
    assert generate_all(on, turns, 24) == generate_all(off, turns, 24)
    reusable = sum(
        (len(ids) + len(out) - 1) // 2 * 2 for ids, out in zip(prompts, expected, strict=True)
    )
    assert on.stats()["prefix_hit_tokens"] - hits >= reusable
    stats = on.stats()
    assert stats["speculative_accepted_tokens"] > 0, str(stats)
    assert stats["speculative_proposed_tokens"] > stats["speculative_accepted_tokens"], str(stats)
    assert off.stats()["speculative_verify_steps"] == 0
    # Every block went back: none was lost to a rejected guess.
    assert on.pool.free_blocks == on.pool.num_blocks


def test_the_verify_pass_computes_the_logits_of_one_token_at_a_time(tiny_model: Path) -> None:
    engine = build_engine(
        EngineOptions(tiny_model, kv_cache_tokens=1024, max_batch_size=2, speculation="ngram")
    )  # not started: the test drives its steps
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    submit(engine, chat_prompt(tokenizer, "Describe the import system"), 16)
    engine.step()  # admitted, prefilled, its first token chosen
    (sequence,) = engine._running
    candidates = [17, 230, 1000, 5]
    length = len(sequence.tokens)
    assert engine.pool.grow(sequence.blocks, length + len(candidates))
    verified, _ = engine._verify_logits([sequence], [candidates])
    fed = [sequence.tokens[-1], *candidates]
    for row, token in enumerate(fed):
        position = length - 1 + row
        one, _ = engine.decoder.run(
            tokens=[token],
            positions=[position],
            slots=[engine.pool.slot(sequence.blocks, position)],
            tables=[sequence.blocks],
        )
        torch.testing.assert_close(verified[row], one[0], atol=2e-4, rtol=1e-4)
    engine.stop()


def test_sampled_tokens_are_distributed_as_the_models_logits_say(tiny_model: Path) -> None:
    """The first two tokens of many seeded samples, the second chosen by a verify pass, against
    their exact joint probability from the model's own logits.

    The guesses must not be samples of the model (the model's earlier outputs are): accepting
    a sample of p always, or redrawing from p after a rejection, still yields p. So the one
    proposer is prompt lookup down to single tokens: after " the" it always guesses " the"
    (what followed the prompt's last " the"), which the model gives about 0.3."""
    options = EngineOptions(tiny_model, kv_cache_tokens=8192, max_batch_size=8)
    model, pool = loader.load_shard(options, loader.plan(options), Shard())
    settings = SpeculationSettings(
        SpeculationMethod.NGRAM, max_tokens=4, max_batch=8, min_ngram=1, history_tokens=0
    )
    engine = Engine(model, pool, max_batch_size=8, speculation=settings)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    prompt = tokenizer("the module and the class and the module and the class and the")["input_ids"]
    params: dict[str, Any] = {"temperature": 1.0, "top_k": 4}
    engine.start()
    samples = 1200
    pairs: Counter[tuple[int, int]] = Counter()
    for start in range(0, samples, 200):
        collectors = [
            # Three tokens: the second then comes from a verify pass with one candidate.
            submit(
                engine,
                prompt,
                3,
                sampling=SamplingParams(**params, seed=seed),
                end_ids=frozenset(),
            )
            for seed in range(start, start + 200)
        ]
        for collector in collectors:
            assert collector.done.wait(120) and collector.error is None
            pairs[(collector.tokens[0], collector.tokens[1])] += 1
    stats = engine.stats()
    engine.stop()
    # Guesses were made, some kept, some rejected: both branches of the rule ran.
    assert stats["speculative_sequence_steps"] > samples // 5, stats
    assert 0 < stats["speculative_accepted_tokens"] < stats["speculative_proposed_tokens"], stats
    sampling = SamplingParams(**params)
    first = distribution(engine.prompt_logits(prompt)[-1], sampling)
    exact: dict[tuple[int, int], float] = {}
    for token in torch.nonzero(first).view(-1).tolist():
        second = distribution(engine.prompt_logits([*prompt, token])[-1], sampling)
        for following in torch.nonzero(second).view(-1).tolist():
            exact[(token, following)] = float(first[token] * second[following])
    assert set(pairs) <= set(exact)
    order = sorted(exact)
    observed = Counter({i: pairs[pair] for i, pair in enumerate(order)})
    probabilities = torch.tensor([exact[pair] for pair in order], dtype=torch.float64)
    assert _p_value(observed, probabilities) > 1e-3


@pytest.fixture(scope="module")
def smollm2_engines(smollm2_model: Path) -> Iterator[tuple[Engine, Engine]]:
    path = gguf_path(smollm2_model)
    spec, tensors = checkpoint.read_spec(path), checkpoint.read_tensors(path)
    engines = []
    with pytest.MonkeyPatch.context() as patch:  # the GGUF read once for both
        patch.setattr(loader, "read_spec", lambda _path: spec)
        patch.setattr(loader, "read_tensors", lambda _path: tensors)
        for speculation in ("off", "ngram"):
            engine = loader.build_engine(
                EngineOptions(path, kv_cache_tokens=2048, max_batch_size=4, speculation=speculation)
            )
            engine.start()
            engines.append(engine)
    yield engines[0], engines[1]
    for engine in engines:
        engine.stop()


def test_greedy_output_is_the_same_with_speculation_on_smollm2(
    smollm2_engines: tuple[Engine, Engine], smollm2_model: Path
) -> None:
    off, on = smollm2_engines
    prompts = prompts_for(AutoTokenizer.from_pretrained(smollm2_model))
    expected = generate_all(off, prompts, 32)
    assert generate_all(on, prompts, 32) == expected
    assert on.stats()["speculative_accepted_tokens"] > 0  # acceptance: benchmarks/speculation.py
