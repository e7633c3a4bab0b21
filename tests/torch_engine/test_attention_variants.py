"""Sliding-window layers and attention sinks (Gemma 3, gpt-oss) in decode attention: the Triton
kernel (under Triton's interpreter) against the plain-PyTorch reference, and the reference
against attention written out by hand."""

from __future__ import annotations

import os

import pytest
import torch

from neuron_agent.torch_engine.kernels import reference

assert os.environ.get("TRITON_INTERPRET") == "1", "tests/conftest.py sets it before imports"
# Without the Triton compiler there is nothing to run; but the project's own kernel module must
# import wherever Triton does: an ImportError in it is a failure, never a silent skip.
pytest.importorskip("triton")
from neuron_agent.torch_engine.kernels import triton_kernels  # noqa: E402

BLOCK, KV_HEADS, GROUP, DIM = 16, 2, 4, 32
TABLES = torch.tensor([[5, 2, 9, 0, 0], [1, 11, 3, 7, 4], [8, 0, 0, 0, 0]])
LENS = torch.tensor([40, 77, 1], dtype=torch.int32)


def _inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    k_cache = torch.randn(12 * BLOCK, KV_HEADS, DIM, generator=g)
    v_cache = torch.randn(12 * BLOCK, KV_HEADS, DIM, generator=g)
    q = torch.randn(3, KV_HEADS * GROUP, DIM, generator=g)
    sinks = torch.randn(KV_HEADS * GROUP, generator=g) * 2
    return q, k_cache, v_cache, sinks


@pytest.mark.parametrize("splits", [1, 4])
@pytest.mark.parametrize(("window", "with_sinks"), [(0, True), (20, False), (20, True)])
def test_decode_kernel_honours_windows_and_sinks(
    splits: int, window: int, with_sinks: bool
) -> None:
    q, k_cache, v_cache, sinks = _inputs()
    chosen = sinks if with_sinks else None
    args = (q, k_cache, v_cache, TABLES, LENS, BLOCK, DIM**-0.5)
    got = triton_kernels.paged_decode_attention(*args, splits, None, None, window, chosen)
    expected = reference.paged_decode_attention(*args, None, None, window, chosen)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_the_reference_is_attention_over_the_window_with_a_sink() -> None:
    q, k_cache, v_cache, sinks = _inputs()
    window = 20
    got = reference.paged_decode_attention(
        q, k_cache, v_cache, TABLES, LENS, BLOCK, DIM**-0.5, None, None, window, sinks
    )
    for seq, length in enumerate(LENS.tolist()):
        positions = torch.arange(max(0, length - window), length)
        slots = TABLES[seq, positions // BLOCK] * BLOCK + positions % BLOCK
        for head in range(KV_HEADS * GROUP):
            keys, values = k_cache[slots, head // GROUP], v_cache[slots, head // GROUP]
            scores = keys @ q[seq, head] * DIM**-0.5
            exponentials = torch.exp(scores)
            expected = exponentials @ values / (exponentials.sum() + torch.exp(sinks[head]))
            torch.testing.assert_close(got[seq, head], expected, rtol=1e-5, atol=1e-5)
