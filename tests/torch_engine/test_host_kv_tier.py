"""The prefix cache's host tier (issue 31), on CPU: blocks the device pool reclaims are copied to
host memory under their chain keys and copied back for a later request with that prefix.

On the pool alone: a reclaimed block's keys and values come back bit for bit, and the tier
never holds more than its budget. On the engine (cortex-tiny): a prompt whose prefix was
evicted to host and read back decodes the same greedy tokens as one that never left, and the
reuse is reported as cached tokens, split by tier.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import openai
import pytest
import torch

from cortex.config import EngineKind, ModelProfile
from cortex.launch import loopback_gateway, loopback_neuron, running_gateway, running_neuron
from neuron_agent.repository import render
from neuron_agent.torch_engine.checkpoint import ModelSpec, read_spec
from neuron_agent.torch_engine.kv_cache import BlockPool
from neuron_agent.torch_engine.loader import EngineOptions, build_engine
from tests.torch_engine.test_prefix_cache import BLOCK, finish, submit, text_ids


@pytest.fixture(scope="module")
def spec(tiny_model: Path) -> ModelSpec:
    return read_spec(tiny_model)


def block_bytes(pool: BlockPool) -> int:
    return sum(layer.nbytes() for layer in pool.layers) // (pool.num_blocks + 1)


def fill(pool: BlockPool, tokens: list[int], seed: int) -> list[bytes]:
    """Take blocks for `tokens`, write recognisable keys and values, register and release them."""
    blocks, keys = pool.lookup(tokens)
    assert pool.grow(blocks, len(tokens))
    generator = torch.Generator().manual_seed(seed)
    for layer in pool.layers:
        for block in blocks:
            rows = slice(block * BLOCK, (block + 1) * BLOCK)
            layer.keys[rows] = torch.randn(layer.keys[rows].shape, generator=generator)
            layer.values[rows] = torch.randn(layer.values[rows].shape, generator=generator)
    pool.commit(blocks, keys, tokens, len(tokens))
    pool.release(blocks)
    return keys


def contents(pool: BlockPool, blocks: list[int]) -> list[torch.Tensor]:
    return [
        torch.cat([t[b * BLOCK : (b + 1) * BLOCK] for b in blocks])
        for layer in pool.layers
        for t in (layer.keys, layer.values)
    ]


def test_a_reclaimed_block_comes_back_from_host_bit_for_bit(spec: ModelSpec) -> None:
    probe = BlockPool(spec, 4 * BLOCK, torch.float32, torch.device("cpu"), BLOCK)
    pool = BlockPool(
        spec,
        4 * BLOCK,
        torch.float32,
        torch.device("cpu"),
        BLOCK,
        host_cache_bytes=8 * block_bytes(probe),
    )
    first = text_ids(3 * BLOCK + 1, seed=1)
    fill(pool, first, seed=1)
    blocks, _ = pool.lookup(first)
    expected = contents(pool, blocks)
    pool.release(blocks)
    fill(pool, text_ids(4 * BLOCK, seed=2), seed=2)  # reclaims all three: they go to host
    assert pool.evictions == 3 and pool.host is not None and len(pool.host) == 3
    assert pool.lookup(first[: BLOCK + 1])[0] != []  # the first block alone, back from host
    hit = pool.lookup_tiers(first)
    assert len(hit.blocks) == 3 and hit.from_host == 2  # the first is on the device again
    assert all(torch.equal(a, b) for a, b in zip(contents(pool, hit.blocks), expected, strict=True))
    pool.release(hit.blocks)


def test_the_host_tier_never_holds_more_than_its_budget(spec: ModelSpec) -> None:
    probe = BlockPool(spec, 4 * BLOCK, torch.float32, torch.device("cpu"), BLOCK)
    budget = 5 * block_bytes(probe) + block_bytes(probe) // 2  # room for 5 blocks, not 6
    pool = BlockPool(
        spec, 4 * BLOCK, torch.float32, torch.device("cpu"), BLOCK, host_cache_bytes=budget
    )
    assert pool.host is not None
    assert pool.host.nbytes() <= budget and pool.host.capacity_blocks == 5
    for seed in range(12):  # 48 blocks of distinct prefixes through a 4-block pool
        fill(pool, text_ids(4 * BLOCK, seed=100 + seed), seed=seed)
        assert len(pool.host) <= 5
        assert pool.host.nbytes() <= budget
    assert pool.host.stored == pool.evictions == 44
    # The newest evictions are what it kept: the last prefix's blocks are on the device, the
    # one before it in host memory, older ones gone.
    last_but_one = text_ids(4 * BLOCK, seed=110)
    hit = pool.lookup_tiers(last_but_one)
    assert hit.from_host == len(hit.blocks) == 4
    pool.release(hit.blocks)
    assert pool.lookup_tiers(text_ids(4 * BLOCK, seed=100)).blocks == []


def test_without_a_budget_there_is_no_host_tier(spec: ModelSpec) -> None:
    pool = BlockPool(spec, 4 * BLOCK, torch.float32, torch.device("cpu"), BLOCK)
    assert pool.host is None
    off = BlockPool(
        spec, 4 * BLOCK, torch.float32, torch.device("cpu"), BLOCK, False, "auto", 2**20
    )
    assert off.host is None  # no prefix caching, nothing to keep


def test_a_prefix_read_back_from_host_decodes_as_if_it_never_left(tiny_model: Path) -> None:
    """A 512-token pool: conversation A's prompt is evicted by two others; with a host tier
    its prefix comes back from host memory and is reported as cached, and the greedy output
    is the one A got when nothing was cached at all (and the same as with no tier)."""
    prompts = [text_ids(380, seed=60 + i) for i in range(3)]
    tiered = build_engine(
        EngineOptions(
            tiny_model, kv_cache_tokens=512, max_batch_size=1, host_kv_cache_bytes=64 * 2**20
        )
    )
    plain = build_engine(EngineOptions(tiny_model, kv_cache_tokens=512, max_batch_size=1))
    hits: list[tuple[int, int]] = []
    tiered.on_prefix_hit = lambda gpu, host: hits.append((gpu, host))
    tiered.start()
    plain.start()
    try:
        outputs = {}
        for name, engine in (("tiered", tiered), ("plain", plain)):
            runs = []
            for ids in [*prompts, prompts[0]]:
                collector = submit(engine, ids, 24, end=False)
                finish(collector)
                runs.append(collector)
            outputs[name] = runs
        first, again = outputs["tiered"][0], outputs["tiered"][3]
        assert first.reused == 0
        assert again.tokens == first.tokens == outputs["plain"][0].tokens
        assert again.reused == (len(prompts[0]) - 1) // BLOCK * BLOCK  # all of it: cached
        assert outputs["plain"][3].reused is not None and again.reused is not None
        assert outputs["plain"][3].reused < again.reused  # without the tier it was gone
        assert hits[3][1] > 0 and sum(hits[3]) == again.reused  # split by tier
        stats = tiered.stats()
        assert stats["prefix_hit_tokens_host"] == hits[3][1] and stats["host_kv_blocks"] > 0
    finally:
        tiered.stop()
        plain.stop()


def test_the_setting_reaches_both_engines_templates(tiny_model: Path, tmp_path: Path) -> None:
    """`host_kv_cache_gib` becomes the torch model's host tier and TensorRT-LLM's
    `kv_cache_host_memory_bytes` (KvCacheConfig's host cache)."""
    torch_profile = ModelProfile(name="m", source=str(tiny_model), host_kv_cache_gib=1.5)
    config = render(torch_profile, tiny_model, [], False, tmp_path / "s.json")["config.pbtxt"]
    line = next(x for x in config.decode().splitlines() if '"host_kv_cache_bytes"' in x)
    assert f'string_value: "{int(1.5 * 2**30)}"' in line
    engine_dir = tmp_path / "engine"
    engine_dir.mkdir()
    trt = ModelProfile(
        name="t", source=str(engine_dir), engine=EngineKind.TRTLLM, host_kv_cache_gib=2
    )
    files = render(trt, engine_dir, [0], True, tmp_path / "t.json")
    text = files["config.pbtxt"].decode()
    line = next(x for x in text.splitlines() if '"kv_cache_host_memory_bytes"' in x)
    assert f'string_value: "{2 * 2**30}"' in line


def test_a_host_tier_hit_is_reported_as_cached_through_the_gateway(
    tiny_model: Path, tmp_path: Path
) -> None:
    """A real neuron (tritonserver, the torch engine on CPU) and gateway, the official SDK as
    the client: a conversation whose prefix the pool evicted comes back from the host tier, the
    usage the client reads counts it as cached, and the neuron's metrics say it came from host."""
    words = ["harbour", "lamp", "tide", "rope", "gull", "anchor", "sail", "mast", "keel", "deck"]
    texts = [" ".join(words[(i + s) % len(words)] for i in range(110)) for s in range(3)]
    profile = ModelProfile(
        name="tiny-tiered",
        source=str(tiny_model),
        kv_cache_tokens=512,
        max_batch_size=1,
        host_kv_cache_gib=0.0625,
    )
    node = loopback_neuron(tmp_path / "node", "node", [profile])
    with running_neuron(node) as neuron:
        config = loopback_gateway({"node": neuron.url}, poll_interval_s=0.5)
        with running_gateway(tmp_path / "cortex.toml", config, neurons_up=True) as gateway:
            client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="-", max_retries=0)
            usages = []
            for text in [*texts, texts[0]]:
                reply = client.chat.completions.create(
                    model="tiny-tiered",
                    messages=[{"role": "user", "content": text}],
                    max_tokens=4,
                    temperature=0,
                )
                assert reply.usage is not None and reply.usage.prompt_tokens_details is not None
                usages.append(reply.usage)
            metrics = httpx.get(f"{neuron.url}/metrics").text
    first, again = usages[0], usages[3]
    assert first.prompt_tokens_details is not None and again.prompt_tokens_details is not None
    assert 250 < first.prompt_tokens < 400 and first.prompt_tokens_details.cached_tokens == 0
    assert again.prompt_tokens_details.cached_tokens == (first.prompt_tokens - 1) // BLOCK * BLOCK
    host = [
        line
        for line in metrics.splitlines()
        if line.startswith("cortex_engine_cached_prompt_tokens") and 'tier="host"' in line
    ]
    assert host and float(host[0].rsplit(" ", 1)[1]) > 0, metrics[-2000:]
