"""The decode step's padding to a CUDA-graph bucket, run eagerly on CPU: padded rows must not
change a real row's logits nor any cache slot but the scratch one (the GPU replays the same
inputs through a captured graph)."""

from __future__ import annotations

from pathlib import Path

import torch

from neuron_agent.torch_engine.graphs import decode_buckets
from neuron_agent.torch_engine.loader import EngineOptions, build_engine
from neuron_agent.torch_engine.scheduler import Engine


def test_buckets_cover_every_batch_size_up_to_the_largest() -> None:
    assert decode_buckets(8) == [1, 2, 4, 8]
    assert decode_buckets(100)[:9] == [1, 2, 4, 8, 16, 24, 32, 40, 48]
    assert decode_buckets(100)[-3:] == [80, 96, 100]
    assert decode_buckets(3) == [1, 2, 3]


def test_padding_to_a_bucket_changes_no_real_row_and_no_real_slot(tiny_model: Path) -> None:
    assert_padding_changes_nothing(
        build_engine(EngineOptions(tiny_model, kv_cache_tokens=512, max_batch_size=4))
    )


def assert_padding_changes_nothing(engine: Engine) -> None:
    """Two real rows decoded alone and padded to a bucket of 4: the same logits, the same
    cache slots written, nothing else touched."""
    pool, runner = engine.pool, engine.decoder
    generator = torch.Generator().manual_seed(0)
    for k_cache, v_cache, *_ in pool.layers:
        k_cache.copy_(torch.randn(k_cache.shape, generator=generator))
        v_cache.copy_(torch.randn(v_cache.shape, generator=generator))
    start = [(k.clone(), v.clone()) for k, v, *_ in pool.layers]
    tables, positions, tokens = [[3, 7], [5]], [20, 9], [11, 12]
    slots = [pool.slot(t, p) for t, p in zip(tables, positions, strict=True)]

    def step(pad_to: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        for (k_cache, v_cache, *_), (k, v) in zip(pool.layers, start, strict=True):
            k_cache.copy_(k)
            v_cache.copy_(v)
        runner.inputs.write(tokens, positions, slots, tables, pad_to, pool.scratch_slot)
        with torch.inference_mode():
            logits, _ = runner._forward(pad_to)
        real = slice(0, pool.scratch_slot)  # every slot but the scratch block's
        return logits[: len(tokens)], [k[real].clone() for k, *_ in pool.layers]

    unpadded_logits, unpadded_cache = step(len(tokens))
    padded_logits, padded_cache = step(4)
    # Matmuls of 2 and of 4 rows may round differently (the CPU's kernels differ by row count).
    torch.testing.assert_close(padded_logits, unpadded_logits)
    untouched = torch.ones(pool.scratch_slot, dtype=torch.bool)
    untouched[slots] = False
    for padded, unpadded, (k, _) in zip(padded_cache, unpadded_cache, start, strict=True):
        torch.testing.assert_close(padded[slots], unpadded[slots])
        assert torch.equal(padded[untouched], k[: pool.scratch_slot][untouched])
