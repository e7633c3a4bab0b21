"""Plain-PyTorch versions of every kernel the engine runs: the CPU path, and the oracle the
Triton kernels are tested against. Each keeps the rounding points of the model's reference
implementation (normalise in float32, scale in the model's dtype)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(normed, new residual): residual ← x + residual (in x's dtype), normed ← RMSNorm of it."""
    summed = x if residual is None else x + residual
    normed = F.rms_norm(summed.float(), (summed.shape[-1],), eps=eps).to(summed.dtype)
    return weight * normed, summed


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
    """Rotate q [T, H, D] and k [T, KVH, D] by their positions (NeoX halves), write k and v into
    their cache slots, return the rotated q.

    `cos_sin` [max_positions, D] holds cos of each frequency in its first half and sin in its
    second, in float32. With `k_scales`/`v_scales` [slots, KVH] the cache is FP8: each vector is
    stored scaled to its own largest magnitude."""
    half = q.shape[-1] // 2
    table = cos_sin[positions]
    cos = table[:, None, :half].repeat(1, 1, 2).to(q.dtype)
    sin = table[:, None, half:].repeat(1, 1, 2).to(q.dtype)
    q = q * cos + _rotate_half(q) * sin
    k = k * cos + _rotate_half(k) * sin
    # Plain index writes: a boolean mask here cost a device sync per layer on GPUs.
    if k_scales is None or v_scales is None:
        k_cache[write_slots] = k.to(k_cache.dtype)
        v_cache[write_slots] = v.to(v_cache.dtype)
        return q
    k_cache[write_slots], k_scales[write_slots] = quantize_fp8_vectors(k)
    v_cache[write_slots], v_scales[write_slots] = quantize_fp8_vectors(v)
    return q


def quantize_fp8_vectors(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float8 e4m3 of x [..., D] with one float32 scale per vector (amax / 448), [...]."""
    scale = x.float().abs().amax(dim=-1).clamp(min=1e-12) / FP8_MAX
    quantized = (x.float() / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return quantized, scale


def dequantize_cache(
    cache: torch.Tensor, scales: torch.Tensor | None, slots: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """cache[slots] in `dtype` ([..., KVH, D]), scaled back when the cache is FP8."""
    gathered = cache[slots]
    if scales is None:
        return gathered.to(dtype)
    return (gathered.float() * scales[slots][..., None]).to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    block_size: int,
    scale: float,
    k_scales: torch.Tensor | None = None,
    v_scales: torch.Tensor | None = None,
) -> torch.Tensor:
    """One query per sequence, q [B, H, D], over the first seq_lens[b] cached positions of each
    sequence, read through its block table [B, W]. Returns [B, H, D] in q's dtype."""
    heads, kv_heads = q.shape[1], k_cache.shape[1]
    longest = int(seq_lens.max())
    positions = torch.arange(longest, device=q.device)
    slots = block_tables[:, positions // block_size] * block_size + positions % block_size  # [B, L]
    keys = dequantize_cache(k_cache, k_scales, slots, q.dtype).permute(0, 2, 1, 3)  # [B, KVH, L, D]
    values = dequantize_cache(v_cache, v_scales, slots, q.dtype).permute(0, 2, 1, 3)
    valid = positions[None, :] < seq_lens[:, None].to(positions.dtype)  # [B, L]
    attended = F.scaled_dot_product_attention(
        q[:, :, None, :],
        keys,
        values,
        attn_mask=valid[:, None, None, :],
        scale=scale,
        enable_gqa=heads != kv_heads,
    )
    return attended[:, :, 0, :]


FP8_MAX = 448.0


def quantize_fp8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float8 e4m3 rows of x [M, K] and each row's scale [M, 1] (amax / 448)."""
    quantized, scale = quantize_fp8_vectors(x)
    return quantized, scale[:, None]


def weight_matmul(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None
) -> torch.Tensor:
    """x [M, K] @ (weight [N, K] · scale [N])ᵀ, float32 accumulation, in x's dtype."""
    out = x.float() @ weight.float().T
    return (out if scale is None else out * scale.float()[None, :]).to(x.dtype)
