"""The engine's fused operations, each with a Triton kernel for CUDA tensors and a plain-PyTorch
reference (`reference.py`) that the CPU runs and the tests compare against.

Where each runs is decided per call by the tensor's device, so model code calls these and never
asks which path is active. `CORTEX_TRITON_INTERPRET=1` sends CPU tensors through the Triton
kernels under Triton's interpreter (tests only)."""

from __future__ import annotations

import os
from functools import cache
from types import ModuleType

import torch

from neuron_agent.torch_engine.kernels import reference
from neuron_agent.torch_engine.kernels.reference import ExpertWeights


@cache
def _kernels() -> ModuleType:
    if os.environ.get("CORTEX_TRITON_INTERPRET") == "1":
        os.environ["TRITON_INTERPRET"] = "1"
    from neuron_agent.torch_engine.kernels import triton_kernels

    return triton_kernels


def _on_triton(tensor: torch.Tensor) -> bool:
    return tensor.is_cuda or os.environ.get("CORTEX_TRITON_INTERPRET") == "1"


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMSNorm(x + residual) · weight, x + residual); residual None means x alone."""
    if _on_triton(x):
        return _kernels().add_rms_norm(x, residual, weight, eps)
    return reference.add_rms_norm(x, residual, weight, eps)


def rotary_and_cache(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos_sin: torch.Tensor,
    positions: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    write_slots: torch.Tensor,
    k_scales: torch.Tensor | None = None,
    v_scales: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rotary embedding of q and k at `positions`; k and v written to `write_slots` of the
    cache (an FP8 one when the scales [slots, KVH] are given). Returns the rotated q (k is only
    needed from the cache from here on)."""
    module = _kernels() if _on_triton(q) else reference
    return module.rotary_and_cache(
        q, k, v, cos_sin, positions, k_cache, v_cache, write_slots, k_scales, v_scales
    )


def silu_and_mul(
    gate_up: torch.Tensor, activation: str = "silu", alpha: float = 1.702, limit: float = 7.0
) -> torch.Tensor:
    """SiLU(gate) · up for gate_up = [gate | up] along the last dimension; or GELU-tanh
    (`activation` "gelu_tanh", Gemma), or gpt-oss's clamped SwiGLU ("swiglu_oai")."""
    if _on_triton(gate_up):
        return _kernels().silu_and_mul(gate_up, activation, alpha, limit)
    return reference.silu_and_mul(gate_up, activation, alpha, limit)


def quantize_fp8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (per-token) FP8 activations for `torch._scaled_mm`: (x_fp8 [M, K], scale [M, 1])."""
    if _on_triton(x):
        return _kernels().quantize_fp8_rows(x)
    return reference.quantize_fp8_rows(x)


WEIGHT_MATMUL_MAX_ROWS = 16


def weight_matmul(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor | None = None,
    batch_invariant: bool = False,
) -> torch.Tensor:
    """x [M, K] @ (weight [N, K] · per-row scale [N])ᵀ, the weight (FP8, int8 or the compute
    dtype) widened in registers: the decode path for up to WEIGHT_MATMUL_MAX_ROWS rows, where
    reading the weight is all the time (beyond, `_scaled_mm` pays).

    `batch_invariant`: any number of rows, each computed by the same tiles in the same order
    whatever the others are, so a row's result does not depend on its batch (the one-row
    kernel and cuBLAS, which picks kernels by row count, are not used)."""
    if _on_triton(x):
        return _kernels().weight_matmul(x, weight, scale, batch_invariant)
    return reference.weight_matmul(x, weight, scale)


def decode_splits(batch: int, kv_heads: int, device: torch.device) -> int:
    """Slices per sequence for split-KV decode attention at this batch size (a constant of each
    captured CUDA graph)."""
    if device.type != "cuda":
        return 1
    multiprocessors = torch.cuda.get_device_properties(device).multi_processor_count
    return _kernels().decode_splits(batch, kv_heads, multiprocessors)


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    block_size: int,
    scale: float,
    splits: int = 1,
    k_scales: torch.Tensor | None = None,
    v_scales: torch.Tensor | None = None,
    window: int = 0,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of one new query per sequence (q [B, H, D]) over its first seq_lens[b] cached
    positions, read straight through its block table [B, W]: no gathered copy of the keys. An
    FP8 cache comes with its scales [slots, KVH]. A sliding-window layer (`window` > 0) reads
    only each sequence's last `window` positions; `sinks` [H] (gpt-oss) adds a learnt logit
    per head to the softmax's denominator."""
    if _on_triton(q):
        return _kernels().paged_decode_attention(
            q, k_cache, v_cache, block_tables, seq_lens, block_size, scale, splits,
            k_scales, v_scales, window, sinks,
        )  # fmt: skip
    return reference.paged_decode_attention(
        q, k_cache, v_cache, block_tables, seq_lens, block_size, scale, k_scales, v_scales,
        window, sinks,
    )  # fmt: skip


def route_experts(
    logits: torch.Tensor, top_k: int, normalize: bool, softmax_after: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixture of experts: each token's `top_k` experts from its router logits [T, E] —
    softmax over all of them, the best k kept, renormalised when `normalize`; or with
    `softmax_after` (gpt-oss) the best k logits, softmaxed alone — as (weights [T, k]
    float32, expert ids [T, k] int32)."""
    if _on_triton(logits):
        return _kernels().route_experts(logits, top_k, normalize, softmax_after)
    return reference.route_experts(logits, top_k, normalize, softmax_after)


def sort_by_expert(
    ids: torch.Tensor, num_experts: int, block: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The (token, expert) rows of `ids` [T, k] grouped by expert in blocks of `block` rows:
    (rows, each block's expert). The grouped matmul reads each expert once per block."""
    if _on_triton(ids):
        return _kernels().sort_by_expert(ids, num_experts, block)
    return reference.sort_by_expert(ids, num_experts, block)


def experts_mlp(
    x: torch.Tensor,
    experts: ExpertWeights,
    weights: torch.Tensor,
    ids: torch.Tensor,
    grouped: bool = False,
) -> torch.Tensor:
    """The experts' gated MLP of each token x [T, H], summed with its routing weights [T, k]
    over its chosen experts ids [T, k]: only those experts' weights are read, as stored
    (`ExpertWeights`: plain, int8, fp8, int4 or MXFP4, dequantized inside the kernel). On a
    GPU a few rows (decode) go one program per (token, expert) row; more are sorted by expert
    for a grouped matmul (prefill); `grouped` sends every batch through the grouped matmul,
    whose rows do not depend on each other (batch-invariant mode)."""
    if _on_triton(x):
        return _kernels().experts_mlp(x, experts, weights, ids, grouped)
    return reference.experts_mlp(x, experts, weights, ids)
