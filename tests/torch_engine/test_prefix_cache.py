"""Automatic prefix caching and lazy allocation with preemption, in the torch engine.

The block pool's invariants are checked on the pool alone (random operation sequences); the
engine's on cortex-tiny: greedy output is the same with the cache on and off (and under
preemption), the reported reuse is the shared prefix in whole blocks, cached blocks are
reclaimed before a request is refused, and agent-shaped requests (long prompts, huge
`max_tokens`) run side by side where reserving `max_tokens` up front would refuse them.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cortex.config import ModelProfile
from neuron_agent.repository import render
from neuron_agent.torch_engine.checkpoint import ModelSpec, read_spec
from neuron_agent.torch_engine.kv_cache import BlockPool
from neuron_agent.torch_engine.loader import EngineOptions, build_engine
from neuron_agent.torch_engine.scheduler import Engine, GenerationRequest

BLOCK = 16


class Collector:
    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.done = threading.Event()
        self.error: str | None = None
        self.reused: int | None = None

    def emit(self, tokens: list[int], final: bool) -> None:
        self.tokens.extend(tokens)
        if final:
            self.done.set()

    def fail(self, message: str) -> None:
        self.error = message
        self.done.set()

    def admitted(self, cached: int) -> None:
        assert self.reused is None, "admitted twice"
        self.reused = cached


def submit(engine: Engine, ids: list[int], max_new: int, end: bool = True) -> Collector:
    collector = Collector()
    engine.submit(
        GenerationRequest(
            prompt=list(ids),
            max_new_tokens=max_new,
            emit=collector.emit,
            fail=collector.fail,
            end_ids=frozenset(engine.model.spec.eos_token_ids) if end else frozenset(),
            admitted=collector.admitted,
        )
    )
    return collector


def finish(*collectors: Collector, timeout: float = 120) -> None:
    for collector in collectors:
        assert collector.done.wait(timeout), "request did not finish"
        assert collector.error is None, collector.error


def text_ids(count: int, seed: int) -> list[int]:
    """`count` token ids of cortex-tiny's vocabulary past its special tokens."""
    generator = random.Random(seed)
    return [generator.randrange(8, 4000) for _ in range(count)]


# ---------------------------------------------------------------------------- the pool alone


@pytest.fixture(scope="module")
def spec(tiny_model: Path) -> ModelSpec:
    return read_spec(tiny_model)


def small_pool(spec: ModelSpec, blocks: int, caching: bool = True) -> BlockPool:
    return BlockPool(spec, blocks * BLOCK, torch.float32, torch.device("cpu"), BLOCK, caching)


def test_released_blocks_stay_cached_and_come_back_by_prefix(spec: ModelSpec) -> None:
    pool = small_pool(spec, 8)
    tokens = text_ids(3 * BLOCK + 5, seed=1)
    blocks, keys = pool.lookup(tokens)
    assert (blocks, keys) == ([], [])
    assert pool.grow(blocks, len(tokens))
    pool.commit(blocks, keys, tokens, len(tokens))
    assert len(keys) == 3  # full blocks only
    first = list(blocks)
    pool.release(blocks)
    assert pool.cached_blocks == 3 and pool.free_blocks == 8
    # Same first two blocks, different third: two blocks come back, the very same ones.
    other = tokens[: 2 * BLOCK] + text_ids(BLOCK + 3, seed=2)
    reused, reused_keys = pool.lookup(other)
    assert reused == first[:2] and reused_keys == keys[:2]
    assert all(pool.references(b) == 1 for b in reused)
    # A block equal to a cached one at another position is another prefix: keys chain.
    shifted = tokens[BLOCK : 2 * BLOCK] + tokens[BLOCK : 3 * BLOCK]
    assert pool.lookup(shifted) == ([], [])


def test_caching_off_reuses_nothing(spec: ModelSpec) -> None:
    pool = small_pool(spec, 4, caching=False)
    tokens = text_ids(2 * BLOCK, seed=1)
    blocks: list[int] = []
    keys: list[bytes] = []
    assert pool.grow(blocks, len(tokens))
    pool.commit(blocks, keys, tokens, len(tokens))
    pool.release(blocks)
    assert pool.cached_blocks == 0 and pool.free_blocks == 4
    assert pool.lookup(tokens) == ([], [])


def test_cached_blocks_are_reclaimed_oldest_first_and_never_while_referenced(
    spec: ModelSpec,
) -> None:
    pool = small_pool(spec, 6)
    held_tokens, old_tokens = text_ids(2 * BLOCK, seed=1), text_ids(2 * BLOCK, seed=2)
    for tokens in (old_tokens, held_tokens):
        blocks: list[int] = []
        keys: list[bytes] = []
        assert pool.grow(blocks, len(tokens))
        pool.commit(blocks, keys, tokens, len(tokens))
        pool.release(blocks)
    held, _ = pool.lookup(held_tokens)  # in use again
    assert len(held) == 2 and pool.cached_blocks == 2
    fresh: list[int] = []
    assert pool.grow(fresh, 3 * BLOCK)  # 2 never-used blocks, then the older cached prefix
    assert pool.evictions == 1 and not set(fresh) & set(held)
    # A sequence's last block is reclaimed first (the least likely to be shared).
    survivor, _ = pool.lookup(old_tokens)
    assert len(survivor) == 1
    pool.release(survivor)
    assert not pool.grow(fresh, 5 * BLOCK)  # only one cached block is left, and held is held
    assert len(fresh) == 3 and all(pool.references(b) == 1 for b in held)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(1, 5 * BLOCK)), max_size=40))
def test_pool_invariants_hold_under_any_sequence_of_operations(
    spec: ModelSpec,
    operations: list[tuple[int, int]],
) -> None:
    """Every block is free, cached or referenced, never two of these; a referenced block is
    never handed out again; no more blocks than the budget are ever in use."""
    pool = small_pool(spec, 10)
    prefixes = [text_ids(6 * BLOCK, seed=s) for s in range(3)]
    users: list[tuple[list[int], list[bytes], list[int]]] = []
    for kind, size in operations:
        if kind < 3 or not users:  # a new user of one of three prefixes, `size` tokens long
            tokens = prefixes[kind % 3][:size]
            blocks, keys = pool.lookup(tokens[:-1])
            if pool.grow(blocks, len(tokens)):
                pool.commit(blocks, keys, tokens, len(tokens))
                users.append((blocks, keys, tokens))
            else:
                assert len(blocks) + pool.free_blocks < pool.blocks_for(len(tokens))
                pool.release(blocks)
        else:
            blocks, _, _ = users.pop(size % len(users))
            pool.release(blocks)
        in_use = [b for blocks, _, _ in users for b in blocks]
        for block in range(pool.num_blocks):
            assert pool.references(block) == in_use.count(block)
        free, cached = set(pool._free), set(pool._cached)
        assert not free & cached and not (free | cached) & set(in_use)
        assert len(free) + len(cached) + len(set(in_use)) == pool.num_blocks
        assert pool.used_blocks == len(set(in_use)) <= pool.num_blocks


# ---------------------------------------------------------------------------- the engine


@pytest.fixture(scope="module")
def engines(tiny_model: Path) -> Iterator[tuple[Engine, Engine]]:
    on = build_engine(EngineOptions(tiny_model, kv_cache_tokens=4096, max_batch_size=4))
    off = build_engine(
        EngineOptions(tiny_model, kv_cache_tokens=4096, max_batch_size=4, prefix_caching=False)
    )
    on.start()
    off.start()
    yield on, off
    on.stop()
    off.stop()


def test_greedy_output_is_the_same_with_the_cache_on_and_off(
    engines: tuple[Engine, Engine],
) -> None:
    on, off = engines
    shared = text_ids(300, seed=10)  # a system prompt every conversation shares
    turns = [shared + text_ids(40, seed=11)]
    turns.append(turns[0] + text_ids(70, seed=12))  # turn 2 appends to turn 1
    turns.append(shared + text_ids(55, seed=13))  # another conversation, same system prompt
    for ids in turns:
        with_cache, without = submit(on, ids, 24, end=False), submit(off, ids, 24, end=False)
        finish(with_cache, without)
        assert with_cache.tokens == without.tokens
        assert without.reused == 0
    # Turn 2 reused turn 1's prompt (and its generated tokens' full blocks); the other
    # conversation reused the shared system prompt, both in whole blocks.
    assert on.stats()["prefix_hit_tokens"] > 0


def test_reported_reuse_is_the_shared_prefix_in_whole_blocks(
    engines: tuple[Engine, Engine],
) -> None:
    on, _ = engines
    first = text_ids(13 * BLOCK, seed=20)  # whole blocks: the last one is recomputed
    finish(submit(on, first, 4))
    # Shares 170 tokens with `first`: 10 whole blocks.
    second = first[:170] + text_ids(60, seed=21)
    collector = submit(on, second, 4)
    finish(collector)
    assert collector.reused == 170 // BLOCK * BLOCK
    # Exactly a cached prompt again: every block but the one holding the last token.
    again = submit(on, first, 4)
    finish(again)
    assert again.reused == (len(first) - 1) // BLOCK * BLOCK


def test_cached_blocks_go_before_a_request_is_refused(tiny_model: Path) -> None:
    engine = build_engine(EngineOptions(tiny_model, kv_cache_tokens=512, max_batch_size=2))
    engine.start()
    try:
        for seed in range(4):  # each leaves ~400 tokens of cached prefix in a 512-token pool
            collector = submit(engine, text_ids(380, seed=30 + seed), 8)
            finish(collector)
            assert collector.reused == 0
        assert engine.pool.evictions > 0
        assert engine.pool.cached_blocks > 0
    finally:
        engine.stop()


def test_preempted_sequences_resume_with_the_same_output(tiny_model: Path) -> None:
    """Three requests whose prompts fit the pool together but whose generations do not: the
    youngest is preempted and recomputed, and every output equals running it alone."""
    prompts = [text_ids(150, seed=40 + i) for i in range(3)]
    alone = build_engine(EngineOptions(tiny_model, kv_cache_tokens=1024, max_batch_size=1))
    alone.start()
    try:
        expected = []
        for ids in prompts:
            collector = submit(alone, ids, 120, end=False)
            finish(collector)
            expected.append(collector.tokens)
    finally:
        alone.stop()
    tight = build_engine(EngineOptions(tiny_model, kv_cache_tokens=640, max_batch_size=3))
    tight.start()
    try:
        collectors = [submit(tight, ids, 120, end=False) for ids in prompts]
        finish(*collectors)
        assert tight.preemptions > 0
        assert [c.tokens for c in collectors] == expected
        assert tight.pool.used_blocks == 0
    finally:
        tight.stop()


def test_agent_shaped_requests_run_together_without_reserving_max_tokens(
    tiny_model: Path,
) -> None:
    """Four Claude-Code-shaped conversations on a budget that reserving prompt + max_tokens
    would fill with two. The issue's numbers (21k-token prompts, max_tokens 32,000, a
    131,072-token budget) scaled by 1/32 for CPU time, ratios kept: 656-token prompts sharing a
    531-token system prefix, max_tokens 1,000, a 4,096-token budget. (Generating past the
    budget preempts and resumes: test_preempted_sequences_resume_with_the_same_output.)"""
    budget, max_tokens = 131_072 // 32, 32_000 // 32
    system = text_ids(17_000 // 32, seed=50)
    prompts = [system + text_ids(21_000 // 32 - len(system), seed=51 + i) for i in range(4)]
    assert 2 * (len(prompts[0]) + max_tokens) <= budget < 3 * (len(prompts[0]) + max_tokens)
    engine = build_engine(EngineOptions(tiny_model, kv_cache_tokens=budget, max_batch_size=4))
    engine.start()
    try:
        # The first conversation's prompt is in the cache before the others arrive.
        collectors = [submit(engine, prompts[0], max_tokens, end=False)]
        deadline = time.monotonic() + 60
        while not collectors[0].tokens and time.monotonic() < deadline:
            time.sleep(0.01)
        collectors += [submit(engine, ids, max_tokens, end=False) for ids in prompts[1:]]
        while engine.stats()["running"] < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.stats()["running"] == 4, "all four must run at once"
        assert [c.reused for c in collectors[1:]] == [len(system) // BLOCK * BLOCK] * 3
        # The shared system prompt is held once, not four times.
        assert engine.pool.used_blocks * BLOCK < 4 * len(prompts[0])
        while min(len(c.tokens) for c in collectors) < 64 and time.monotonic() < deadline:
            assert engine.pool.used_blocks <= engine.pool.num_blocks
            time.sleep(0.02)
        assert min(len(c.tokens) for c in collectors) >= 64
        assert not any(c.error or c.done.is_set() for c in collectors)
    finally:
        engine.stop()


@pytest.mark.parametrize("caching", [True, False])
def test_the_profile_switch_reaches_the_model_config(
    tiny_model: Path, tmp_path: Path, caching: bool
) -> None:
    """`prefix_caching` in models.toml reaches the torch model's config.pbtxt (the benchmark's
    cache-off model, served from such a profile, reports no reuse)."""
    profile = ModelProfile(name="m", source=str(tiny_model), prefix_caching=caching)
    config = render(profile, tiny_model, [], False, tmp_path / "stats.json")["config.pbtxt"]
    line = next(x for x in config.decode().splitlines() if '"prefix_caching"' in x)
    assert f'string_value: "{str(caching).lower()}"' in line
    assert 'name: "cached_prompt_tokens"' in config.decode()
