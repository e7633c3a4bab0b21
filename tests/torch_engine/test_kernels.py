"""Each Triton kernel against its plain-PyTorch reference, run on CPU by Triton's interpreter
(the GPU runs the same kernel code compiled)."""

from __future__ import annotations

import os
from types import ModuleType

import pytest
import torch

from neuron_agent.torch_engine.kernels import reference

assert os.environ.get("TRITON_INTERPRET") == "1", "tests/conftest.py sets it before imports"
# Without the Triton compiler there is nothing to run; but the project's own kernel module must
# import wherever Triton does: an ImportError in it is a failure, never a silent skip.
pytest.importorskip("triton")
from neuron_agent.torch_engine.kernels import triton_kernels  # noqa: E402


def _generator() -> torch.Generator:
    return torch.Generator().manual_seed(0)


@pytest.mark.parametrize("with_residual", [False, True])
def test_add_rms_norm_matches_the_reference(with_residual: bool) -> None:
    g = _generator()
    x = torch.randn(5, 96, generator=g)
    residual = torch.randn(5, 96, generator=g) if with_residual else None
    weight = torch.randn(96, generator=g)
    out, summed = triton_kernels.add_rms_norm(x, residual, weight, 1e-5)
    expected_out, expected_sum = reference.add_rms_norm(x, residual, weight, 1e-5)
    torch.testing.assert_close(out, expected_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(summed, expected_sum)


def test_rotary_and_cache_matches_the_reference() -> None:
    g = _generator()
    tokens, heads, kv_heads, dim = 6, 4, 2, 16
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim, generator=g)
    positions = torch.tensor([0, 1, 2, 7, 8, 30])
    slots = torch.tensor([3, 4, 5, 17, 18, 40])
    angles = torch.arange(64)[:, None].float() * torch.rand(dim // 2, generator=g)
    cos_sin = torch.cat([angles.cos(), angles.sin()], dim=-1)

    def run(module: ModuleType) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = qkv.clone().split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
        q = q.view(tokens, heads, dim)
        k = k.view(tokens, kv_heads, dim)
        v = v.view(tokens, kv_heads, dim)
        k_cache = torch.zeros(64, kv_heads, dim)
        v_cache = torch.zeros(64, kv_heads, dim)
        rotated = module.rotary_and_cache(q, k, v, cos_sin, positions, k_cache, v_cache, slots)
        return rotated.clone(), k_cache, v_cache

    for got, expected in zip(run(triton_kernels), run(reference), strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_silu_and_mul_matches_the_reference() -> None:
    gate_up = torch.randn(3, 2 * 1500, generator=_generator())
    torch.testing.assert_close(
        triton_kernels.silu_and_mul(gate_up), reference.silu_and_mul(gate_up)
    )


@pytest.mark.parametrize("splits", [1, 4])
def test_paged_decode_attention_reads_the_block_table(splits: int) -> None:
    g = _generator()
    block_size, blocks, kv_heads, group, dim = 16, 12, 2, 4, 32
    heads = kv_heads * group
    k_cache = torch.randn(blocks * block_size, kv_heads, dim, generator=g)
    v_cache = torch.randn(blocks * block_size, kv_heads, dim, generator=g)
    # Sequences of different lengths over scattered blocks; unused table entries are junk.
    tables = torch.tensor([[5, 2, 9, 0, 0], [1, 11, 3, 7, 4], [8, 0, 0, 0, 0]])
    lens = torch.tensor([40, 77, 1], dtype=torch.int32)
    q = torch.randn(3, heads, dim, generator=g)
    got = triton_kernels.paged_decode_attention(
        q, k_cache, v_cache, tables, lens, block_size, dim**-0.5, splits
    )
    expected = reference.paged_decode_attention(
        q, k_cache, v_cache, tables, lens, block_size, dim**-0.5
    )
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_fp8_row_scales_match_the_reference() -> None:
    x = torch.randn(3, 700, generator=_generator()) * torch.tensor([[0.01], [1.0], [300.0]])
    _, got_scale = triton_kernels.quantize_fp8_rows(x)
    _, expected_scale = reference.quantize_fp8_rows(x)
    # Only the scales: Triton 3.6's interpreter mis-converts some values to float8 (-125.9 to
    # -64), so the cast itself is compared on the GPU (benchmarks/gpu/engine_check.py).
    torch.testing.assert_close(got_scale, expected_scale)


# One row at widths the one-row kernel takes (FP8 1024-wide slices, bf16 2048), then the
# matrix-instruction path.
@pytest.mark.parametrize(
    ("rows", "fp8", "width"), [(1, True, 1024), (1, False, 2048), (5, False, 512), (20, True, 512)]
)
def test_weight_matmul_matches_the_reference(rows: int, fp8: bool, width: int) -> None:
    g = _generator()
    x = torch.randn(rows, width, generator=g)
    weight = torch.randn(96, width, generator=g) * 20
    scale = None
    if fp8:
        weight, scale = weight.to(torch.float8_e4m3fn), torch.rand(96, generator=g) + 0.5
    torch.testing.assert_close(
        triton_kernels.weight_matmul(x, weight, scale),
        reference.weight_matmul(x, weight, scale),
        rtol=1e-4,
        atol=1e-3,
    )


def _interpreter_fp8_equal(got: torch.Tensor, expected: torch.Tensor) -> torch.Tensor:
    """Which float8 values agree, forgiving the interpreter's one known fault: a value that
    rounds up to a power of two is stored one binade low (-128 as -64; the GPU rounds right and
    benchmarks/gpu/engine_bench.py compares it exactly)."""
    got, expected = got.float(), expected.float()
    power_of_two = expected.abs().log2() == expected.abs().log2().round()
    return (got == expected) | (power_of_two & (got == expected / 2))


def test_rotary_and_cache_writes_an_fp8_cache_with_per_vector_scales() -> None:
    g = _generator()
    tokens, heads, kv_heads, dim = 6, 4, 2, 16
    # Keys of the usual size, values two orders smaller: per-vector scales keep both in range.
    q = torch.randn(tokens, heads, dim, generator=g)
    k = torch.randn(tokens, kv_heads, dim, generator=g) * 8
    v = torch.randn(tokens, kv_heads, dim, generator=g) * 0.02
    positions = torch.tensor([0, 1, 2, 7, 8, 30])
    slots = torch.tensor([3, 4, 5, 17, 18, 40])
    angles = torch.arange(64)[:, None].float() * torch.rand(dim // 2, generator=g)
    cos_sin = torch.cat([angles.cos(), angles.sin()], dim=-1)

    def run(module: ModuleType) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        caches = [torch.zeros(64, kv_heads, dim, dtype=torch.float8_e4m3fn) for _ in range(2)]
        scales = [torch.ones(64, kv_heads) for _ in range(2)]
        module.rotary_and_cache(
            q.clone(), k.clone(), v.clone(), cos_sin, positions, *caches, slots, *scales
        )
        return caches, scales

    (got_k, got_v), got_scales = run(triton_kernels)
    (want_k, want_v), want_scales = run(reference)
    for got_scale, want_scale in zip(got_scales, want_scales, strict=True):
        torch.testing.assert_close(got_scale, want_scale)
    for got, want in ((got_k, want_k), (got_v, want_v)):
        agree = _interpreter_fp8_equal(got, want)
        assert bool(agree.all()), f"{int((~agree).sum())} of {agree.numel()} cache values differ"
    # Each vector's largest element is stored at full range, the rest relative to it.
    assert float(want_k[slots].float().abs().amax(-1).min()) == 448.0
    restored = want_v[slots].float() * want_scales[1][slots][..., None]
    torch.testing.assert_close(restored, v, rtol=0.07, atol=1e-6)


@pytest.mark.parametrize("splits", [1, 4])
def test_paged_decode_attention_over_an_fp8_cache(splits: int) -> None:
    g = _generator()
    block_size, blocks, kv_heads, group, dim = 16, 12, 2, 4, 32
    keys = torch.randn(blocks * block_size, kv_heads, dim, generator=g) * 3
    values = torch.randn(blocks * block_size, kv_heads, dim, generator=g) * 0.02
    k_cache, k_scales = reference.quantize_fp8_vectors(keys)
    v_cache, v_scales = reference.quantize_fp8_vectors(values)
    tables = torch.tensor([[5, 2, 9, 0, 0], [1, 11, 3, 7, 4], [8, 0, 0, 0, 0]])
    lens = torch.tensor([40, 77, 1], dtype=torch.int32)
    q = torch.randn(3, kv_heads * group, dim, generator=g)
    args = (tables, lens, block_size, dim**-0.5)
    got = triton_kernels.paged_decode_attention(
        q, k_cache, v_cache, *args, splits, k_scales, v_scales
    )
    expected = reference.paged_decode_attention(q, k_cache, v_cache, *args, k_scales, v_scales)
    # The kernel's dots run in float16: exact for a bfloat16 query (the GPU's), not for this
    # float32 one.
    torch.testing.assert_close(got, expected, rtol=2e-3, atol=2e-5)
    # And close to attention over the unrounded cache: 3 mantissa bits, scaled per vector.
    exact = reference.paged_decode_attention(q, keys, values, *args)
    assert float((got - exact).abs().max()) < 0.1 * float(exact.abs().max())


@pytest.mark.parametrize(("width", "fp8"), [(576, False), (1024, True)])
def test_batch_invariant_matmul_gives_each_row_the_same_bits_in_any_batch(
    width: int, fp8: bool
) -> None:
    g = _generator()
    # 576: SmolLM2's width, no multiple of the kernel's K slice; 1024: one the one-row kernel
    # would take.
    x = torch.randn(40, width, generator=g)
    weight = torch.randn(80, width, generator=g)
    scale = None
    if fp8:
        weight, scale = weight.to(torch.float8_e4m3fn), torch.rand(80, generator=g) + 0.5
    whole = triton_kernels.weight_matmul(x, weight, scale, batch_invariant=True)
    torch.testing.assert_close(
        whole, reference.weight_matmul(x, weight, scale), rtol=1e-4, atol=1e-3
    )
    for rows in (1, 5, 17):
        part = triton_kernels.weight_matmul(x[:rows], weight, scale, batch_invariant=True)
        assert torch.equal(part, whole[:rows]), f"rows differ in a batch of {rows}"
