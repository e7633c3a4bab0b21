"""Plain-PyTorch versions of every kernel the engine runs: the CPU path, and the oracle the
Triton kernels are tested against. Each keeps the rounding points of the model's reference
implementation (normalise in float32, scale in the model's dtype)."""

from __future__ import annotations

from dataclasses import dataclass

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


def silu_and_mul(
    gate_up: torch.Tensor, activation: str = "silu", alpha: float = 1.702, limit: float = 7.0
) -> torch.Tensor:
    """activation(gate) · up for gate_up = [gate | up]: SiLU, GELU-tanh (Gemma), or gpt-oss's
    clamped SwiGLU ("swiglu_oai": gate · sigmoid(alpha · gate) · (up + 1), clamped to limit)."""
    gate, up = gate_up.chunk(2, dim=-1)
    if activation == "gelu_tanh":
        return F.gelu(gate, approximate="tanh") * up
    if activation == "swiglu_oai":
        gate = gate.clamp(max=limit)
        up = up.clamp(min=-limit, max=limit)
        return gate * torch.sigmoid(gate * alpha) * (up + 1)
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
    window: int = 0,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """One query per sequence, q [B, H, D], over the first seq_lens[b] cached positions of each
    sequence (its last `window` when a sliding-window layer's `window` > 0), read through its
    block table [B, W]. `sinks` [H]: a learnt logit per head in the softmax's denominator
    (gpt-oss). Returns [B, H, D] in q's dtype."""
    longest = int(seq_lens.max())
    positions = torch.arange(longest, device=q.device)
    slots = block_tables[:, positions // block_size] * block_size + positions % block_size  # [B, L]
    keys = dequantize_cache(k_cache, k_scales, slots, q.dtype).permute(0, 2, 1, 3)  # [B, KVH, L, D]
    values = dequantize_cache(v_cache, v_scales, slots, q.dtype).permute(0, 2, 1, 3)
    lens = seq_lens[:, None].to(positions.dtype)
    valid = positions[None, :] < lens  # [B, L]
    if window > 0:
        valid &= positions[None, :] >= lens - window
    mask = valid[:, None, None, :]
    return attend(q[:, :, None, :], keys, values, mask, scale, sinks)[:, :, 0, :]


def attend(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    scale: float,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of query [B, H, Q, D] over keys and values [B, KVH, K, D] where the boolean
    `mask` allows; with `sinks` [H], each head's sink logit joins the softmax (its value is
    zero), which SDPA cannot express, so the scores are materialised then."""
    heads, kv_heads = query.shape[1], keys.shape[1]
    if sinks is None:
        return F.scaled_dot_product_attention(
            query, keys, values, attn_mask=mask, scale=scale, enable_gqa=heads != kv_heads
        )
    if heads != kv_heads:
        keys = keys.repeat_interleave(heads // kv_heads, dim=1)
        values = values.repeat_interleave(heads // kv_heads, dim=1)
    scores = (query.float() @ keys.float().transpose(-1, -2)) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    sink = sinks.float()[None, :, None, None].expand(*scores.shape[:-1], 1)
    weights = torch.softmax(torch.cat((scores, sink), dim=-1), dim=-1)[..., :-1]
    return (weights @ values.float()).to(query.dtype)


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


# ----------------------------------------------------------------------------- mixture of experts


def route_experts(
    logits: torch.Tensor, top_k: int, normalize: bool, softmax_after: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token's `top_k` experts from its router logits [T, E]: (weights [T, k] float32,
    expert ids [T, k] int32), best first. Softmax over every expert in float32, the top k kept,
    renormalised to sum to one when `normalize` (Mixtral; Qwen3-MoE's `norm_topk_prob`); or,
    `softmax_after` (gpt-oss), the top k logits and a softmax over them alone."""
    if softmax_after:
        values, ids = torch.topk(logits.float(), top_k, dim=-1)
        return torch.softmax(values, dim=-1), ids.to(torch.int32)
    probabilities = torch.softmax(logits.float(), dim=-1)
    weights, ids = torch.topk(probabilities, top_k, dim=-1)
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids.to(torch.int32)


def sort_by_expert(
    ids: torch.Tensor, num_experts: int, block: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows of `ids` [T, k] (flattened: row t·k + j is token t's j-th expert) grouped by
    expert, each expert's group padded to a multiple of `block` with the row count R = T·k
    (no row), in a buffer sized for the worst case so its shape depends on T alone (CUDA
    graphs): (rows [P], each block's expert [P / block], -1 past the last used block).
    Within an expert, rows keep their order."""
    flat = ids.reshape(-1).long()
    count = flat.numel()
    capacity = _sorted_capacity(count, num_experts, block)
    # Not bincount: its output size depends on the largest id, a device sync.
    counts = torch.zeros(num_experts, dtype=torch.long, device=ids.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block - 1) // block * block
    padded_ends = torch.cumsum(padded, 0)
    order = torch.argsort(flat, stable=True)
    experts_in_order = flat[order]
    first_of_expert = torch.cumsum(counts, 0) - counts
    rank = torch.arange(count, device=ids.device) - first_of_expert[experts_in_order]
    destination = (padded_ends - padded)[experts_in_order] + rank
    rows = torch.full((capacity,), count, dtype=torch.int32, device=ids.device)
    rows[destination] = order.to(torch.int32)
    block_starts = torch.arange(0, capacity, block, device=ids.device)
    block_experts = torch.searchsorted(padded_ends, block_starts, right=True).to(torch.int32)
    block_experts = torch.where(block_starts < padded_ends[-1], block_experts, -1)
    return rows, block_experts


def _sorted_capacity(count: int, num_experts: int, block: int) -> int:
    """Rows a sorted layout may need: every row, plus each expert's padding, in whole blocks."""
    padded = count + min(num_experts, count) * (block - 1)
    return (padded + block - 1) // block * block


@dataclass(frozen=True)
class ExpertWeights:
    """Every expert's gated MLP as stored: gate and up fused [E, 2I, H], down [E, H, I], each
    plain (scale None), int8/fp8 with a float scale per row ([E, N]), int4 two values a byte
    along K ([E, N, K/2]) with a float scale per row and group ([E, N, K/group]), or MXFP4
    (gpt-oss: e2m1 values two a byte, a uint8 power-of-two exponent per 32, [E, N, K/32]);
    optional biases [E, N]; the activation between them (`silu_and_mul`)."""

    gate_up: torch.Tensor
    gate_up_scale: torch.Tensor | None
    down: torch.Tensor
    down_scale: torch.Tensor | None
    group_size: int = 128
    gate_up_bias: torch.Tensor | None = None
    down_bias: torch.Tensor | None = None
    activation: str = "silu"
    alpha: float = 1.702
    limit: float = 7.0


# e2m1 (MXFP4's elements): the value of each 4-bit code.
FP4_VALUES = (
    0.0,
    0.5,
    1.0,
    1.5,
    2.0,
    3.0,
    4.0,
    6.0,
    -0.0,
    -0.5,
    -1.0,
    -1.5,
    -2.0,
    -3.0,
    -4.0,
    -6.0,
)


def expert_weight(
    weight: torch.Tensor,
    scale: torch.Tensor | None,
    expert: int,
    group_size: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Expert `expert`'s matrix [N, K] in `dtype` from its stored form (`ExpertWeights`)."""
    stored = weight[expert]
    if scale is None:
        return stored.to(dtype)
    if stored.dtype == torch.uint8 and scale.dtype == torch.uint8:  # MXFP4
        codes = torch.stack([stored & 0xF, stored >> 4], dim=-1).reshape(stored.shape[0], -1)
        values = torch.tensor(FP4_VALUES, device=stored.device)[codes.long()]
        exponents = scale[expert].float().repeat_interleave(32, dim=1) - 127.0
        return (values * torch.exp2(exponents)).to(dtype)
    if stored.dtype == torch.uint8:
        low = (stored & 0xF).to(torch.int8)
        high = ((stored >> 4) & 0xF).to(torch.int8)
        values = torch.stack([low, high], dim=-1).reshape(stored.shape[0], -1)
        values = torch.where(values > 7, values - 16, values).float()
        scales = scale[expert].float().repeat_interleave(group_size, dim=1)[:, : values.shape[1]]
        return (values * scales).to(dtype)
    return (stored.float() * scale[expert].float()[:, None]).to(dtype)


def expert_matmul(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor | None,
    ids: torch.Tensor,
    fan_out: int,
    group_size: int = 128,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Row r of the result is x[r // fan_out] @ expert ids[r]'s matrixᵀ (+ its bias [E, N]):
    [R, N] for R = ids' elements, float32 accumulation, in x's dtype. Only the experts some
    row chose are read."""
    flat = ids.reshape(-1).long()
    out = torch.empty((flat.numel(), weight.shape[1]), dtype=x.dtype, device=x.device)
    for expert in torch.unique(flat).tolist():
        rows = (flat == expert).nonzero()[:, 0]
        matrix = expert_weight(weight, scale, expert, group_size, torch.float32)
        product = x[rows // fan_out].float() @ matrix.T
        if bias is not None:
            product = product + bias[expert].float()
        out[rows] = product.to(x.dtype)
    return out


def experts_mlp(
    x: torch.Tensor, experts: ExpertWeights, weights: torch.Tensor, ids: torch.Tensor
) -> torch.Tensor:
    """Σ_j weights[t, j] · down_e(act(gate_e(x_t)) · up_e(x_t)) over each token's experts
    e = ids[t, j]: x [T, H] → [T, H]."""
    tokens, top_k = ids.shape
    group = experts.group_size
    hidden = expert_matmul(
        x, experts.gate_up, experts.gate_up_scale, ids, top_k, group, experts.gate_up_bias
    )
    activated = silu_and_mul(hidden, experts.activation, experts.alpha, experts.limit)
    out = expert_matmul(
        activated, experts.down, experts.down_scale, ids, 1, group, experts.down_bias
    )
    weighted = out.view(tokens, top_k, -1).float() * weights[..., None]
    return weighted.sum(dim=1).to(x.dtype)
