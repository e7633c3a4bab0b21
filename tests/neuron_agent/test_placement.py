"""The neuron's pure parts, without a server: the catalogue's estimates and context lengths from
a real checkpoint's shape, and placement over devices given by hand."""

from __future__ import annotations

from pathlib import Path

import pytest

from cortex.config import ModelProfile
from cortex.neuron_api import GpuInfo
from neuron_agent.catalogue import RUNTIME_OVERHEAD_BYTES, context_length, estimate_bytes
from neuron_agent.errors import NodeError
from neuron_agent.placement import held_by_device, place
from neuron_agent.torch_engine.checkpoint import read_spec

GIB = 2**30


def profile(**fields: object) -> ModelProfile:
    return ModelProfile.model_validate({"name": "m", "source": "/nowhere", **fields})


def device(index: int, free_gib: float, total_gib: float = 80) -> GpuInfo:
    free = int(free_gib * GIB)
    total = int(total_gib * GIB)
    return GpuInfo(
        index=index,
        uuid=f"GPU-{index}",
        name="test",
        memory_total_bytes=total,
        memory_used_bytes=total - free,
        memory_free_bytes=free,
    )


def test_estimate_is_weights_plus_kv_plus_overhead(tiny_model: Path) -> None:
    spec = read_spec(tiny_model)
    plain = profile(kv_cache_tokens=1000)
    # By hand from config.json: 2 (K and V) × layers × kv heads × head dim × element bytes.
    kv_per_token = 2 * spec.num_layers * spec.num_kv_heads * spec.head_dim
    on_cpu = estimate_bytes(plain, spec, has_gpu=False)
    on_gpu = estimate_bytes(plain, spec, has_gpu=True)
    params = spec.parameter_count()
    assert on_cpu == params * 4 + 1000 * kv_per_token * 4 + RUNTIME_OVERHEAD_BYTES
    assert on_gpu == params * 2 + 1000 * kv_per_token * 2 + RUNTIME_OVERHEAD_BYTES
    int8 = estimate_bytes(profile(kv_cache_tokens=1000, quantization="int8"), spec, True)
    assert RUNTIME_OVERHEAD_BYTES < int8 < on_gpu
    assert estimate_bytes(plain, None, has_gpu=False) == 0  # unreadable: no claim


def test_trtllm_estimate_counts_the_engine_files() -> None:
    engine = profile(engine="trtllm", kv_cache_tokens=16)  # no shape known: no KV claim
    assert estimate_bytes(engine, None, True, engine_bytes=7 * GIB) == 7 * GIB + (
        RUNTIME_OVERHEAD_BYTES
    )


def test_context_is_the_checkpoints_capped_by_the_profile(tiny_model: Path) -> None:
    spec = read_spec(tiny_model)
    assert context_length(profile(), spec) == spec.context_length
    assert context_length(profile(context_length=100), spec) == 100
    assert context_length(profile(), None) == 4096


def test_placement_takes_the_emptiest_devices_that_fit() -> None:
    devices = [device(0, 10), device(1, 50), device(2, 30), device(3, 5)]
    assert place(profile(), 20 * GIB, devices, None, 0) == [1]
    assert place(profile(tp=2), 40 * GIB, devices, None, 0) == [1, 2]
    assert place(profile(), 8 * GIB, devices, [0, 3], 0) == [0]


def test_a_model_that_does_not_fit_is_refused_with_the_numbers() -> None:
    with pytest.raises(NodeError) as caught:
        place(profile(tp=2), 60 * GIB, [device(0, 50), device(1, 20)], None, 0)
    assert caught.value.status == 409
    assert caught.value.detail["needed_bytes_per_device"] == 30 * GIB
    assert "0: 50.00 GiB, 1: 20.00 GiB" in str(caught.value)


def test_without_devices_host_memory_decides() -> None:
    assert place(profile(), 2 * GIB, [], None, host_available=3 * GIB) == []
    with pytest.raises(NodeError) as caught:
        place(profile(), 4 * GIB, [], None, host_available=3 * GIB)
    assert caught.value.detail == {"needed_bytes": 4 * GIB, "free_bytes": 3 * GIB}


def test_held_memory_is_the_larger_of_estimate_and_measure_split_over_devices() -> None:
    held = held_by_device([([0, 1], 10 * GIB, 4 * GIB), ([1], 1 * GIB, 3 * GIB), ([], 5, 5)])
    assert held == {0: 5 * GIB, 1: 8 * GIB}


def test_the_prefix_caches_host_tier_counts_as_host_memory() -> None:
    """host_kv_cache_gib is host memory on a GPU node too, and adds to a CPU node's estimate."""
    devices = [device(0, 50)]
    assert place(profile(host_kv_cache_gib=2), 20 * GIB, devices, None, 3 * GIB) == [0]
    with pytest.raises(NodeError) as caught:
        place(profile(host_kv_cache_gib=4), 20 * GIB, devices, None, 3 * GIB)
    assert caught.value.detail == {"needed_bytes": 4 * GIB, "free_bytes": 3 * GIB}
    assert "host_kv_cache_gib 4" in str(caught.value)
    with pytest.raises(NodeError):
        place(profile(host_kv_cache_gib=1.5), 2 * GIB, [], None, host_available=3 * GIB)
