# mypy: disable-error-code="no-untyped-def"
"""Triton kernels for the engine's GPU path; `reference.py` holds the plain-PyTorch version of
each, and the tests hold one to the other (on CPU through Triton's interpreter).

Imported only where a kernel runs on a CUDA tensor (or the interpreter is asked for), so the CPU
engine never needs the `triton` package."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from neuron_agent.torch_engine.kernels.reference import ExpertWeights

# ----------------------------------------------------------------------------- RMSNorm


@triton.jit
def _add_rms_norm_kernel(
    X,
    R,
    W,
    OUT,
    RES_OUT,
    stride_x,
    stride_r,
    stride_o,
    stride_ro,
    width,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < width
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        # Round the sum to the model's dtype first: the residual stream is kept in it.
        x = x + tl.load(R + row * stride_r + cols, mask=mask, other=0.0)
        tl.store(RES_OUT + row * stride_ro + cols, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / width + eps)
    normed = (xf * rstd).to(x.dtype)
    weight = tl.load(W + cols, mask=mask, other=0.0)
    tl.store(OUT + row * stride_o + cols, normed * weight, mask=mask)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    width = x.shape[-1]
    rows = x.numel() // width
    flat = x.reshape(rows, width)
    out = torch.empty_like(flat)
    if residual is None:
        summed = x
        res_flat, res_out = flat, flat
    else:
        res_flat = residual.reshape(rows, width)
        res_out = torch.empty_like(flat)
        summed = res_out.view(x.shape)
    _add_rms_norm_kernel[(rows,)](
        flat,
        res_flat,
        weight,
        out,
        res_out,
        flat.stride(0),
        res_flat.stride(0),
        out.stride(0),
        res_out.stride(0),
        width,
        eps,
        HAS_RESIDUAL=residual is not None,
        BLOCK=triton.next_power_of_2(width),
    )
    return out.view(x.shape), summed


# ----------------------------------------------------------------------------- rotary + cache


@triton.jit
def _rotary_and_cache_kernel(
    Q,
    K,
    V,
    COS_SIN,
    POSITIONS,
    K_CACHE,
    V_CACHE,
    SLOTS,
    K_SCALES,
    V_SCALES,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_cs,
    stride_ct,
    stride_ch,
    stride_st,
    HEADS: tl.constexpr,
    KV_HEADS: tl.constexpr,
    HALF: tl.constexpr,
    HEADS_PAD: tl.constexpr,
    FP8: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    position = tl.load(POSITIONS + token)
    slot = tl.load(SLOTS + token)
    d = tl.arange(0, HALF)
    cos = tl.load(COS_SIN + position * stride_cs + d)
    sin = tl.load(COS_SIN + position * stride_cs + HALF + d)
    h = tl.arange(0, HEADS_PAD)

    qmask = h[:, None] < HEADS
    q_ptr = Q + token * stride_qt + h[:, None] * stride_qh + d[None, :]
    q1 = tl.load(q_ptr, mask=qmask, other=0.0)
    q2 = tl.load(q_ptr + HALF, mask=qmask, other=0.0)
    q1f, q2f = q1.to(tl.float32), q2.to(tl.float32)
    tl.store(q_ptr, (q1f * cos - q2f * sin).to(q1.dtype), mask=qmask)
    tl.store(q_ptr + HALF, (q2f * cos + q1f * sin).to(q1.dtype), mask=qmask)

    kmask = h[:, None] < KV_HEADS
    k_ptr = K + token * stride_kt + h[:, None] * stride_kh + d[None, :]
    k1 = tl.load(k_ptr, mask=kmask, other=0.0).to(tl.float32)
    k2 = tl.load(k_ptr + HALF, mask=kmask, other=0.0).to(tl.float32)
    c_ptr = K_CACHE + slot * stride_ct + h[:, None] * stride_ch + d[None, :]
    k1r = k1 * cos - k2 * sin
    k2r = k2 * cos + k1 * sin
    v_ptr = V + token * stride_vt + h[:, None] * stride_vh + d[None, :]
    vc_ptr = V_CACHE + slot * stride_ct + h[:, None] * stride_ch + d[None, :]
    v1 = tl.load(v_ptr, mask=kmask, other=0.0)
    v2 = tl.load(v_ptr + HALF, mask=kmask, other=0.0)
    if FP8:
        scale_ptr = slot * stride_st + h
        k1r, k2r = _scale_to_fp8(k1r, k2r, K_SCALES + scale_ptr, h < KV_HEADS)
        v1, v2 = _scale_to_fp8(v1, v2, V_SCALES + scale_ptr, h < KV_HEADS)
    tl.store(c_ptr, k1r.to(K_CACHE.dtype.element_ty), mask=kmask)
    tl.store(c_ptr + HALF, k2r.to(K_CACHE.dtype.element_ty), mask=kmask)
    tl.store(vc_ptr, v1.to(V_CACHE.dtype.element_ty), mask=kmask)
    tl.store(vc_ptr + HALF, v2.to(V_CACHE.dtype.element_ty), mask=kmask)


@triton.jit
def _scale_to_fp8(first, second, SCALE_PTR, mask):
    """Both halves of each head's vector divided by its own scale (amax / 448, stored)."""
    first, second = first.to(tl.float32), second.to(tl.float32)
    amax = tl.maximum(tl.max(tl.abs(first), axis=1), tl.max(tl.abs(second), axis=1))
    scale = tl.maximum(amax, 1e-12) / 448.0
    tl.store(SCALE_PTR, scale, mask=mask)
    first = tl.clamp(first / scale[:, None], -448.0, 448.0)
    second = tl.clamp(second / scale[:, None], -448.0, 448.0)
    return first, second


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
    """Rotates q in place; k is rotated on its way into the cache (v copied beside it)."""
    tokens, heads, head_dim = q.shape
    kv_heads = k.shape[1]
    fp8 = k_scales is not None and v_scales is not None
    _rotary_and_cache_kernel[(tokens,)](
        q,
        k,
        v,
        cos_sin,
        positions,
        k_cache,
        v_cache,
        write_slots,
        k_scales if fp8 else write_slots,
        v_scales if fp8 else write_slots,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        cos_sin.stride(0),
        k_cache.stride(0),
        k_cache.stride(1),
        k_scales.stride(0) if k_scales is not None else 0,
        HEADS=heads,
        KV_HEADS=kv_heads,
        HALF=head_dim // 2,
        HEADS_PAD=triton.next_power_of_2(max(heads, kv_heads)),
        FP8=fp8,
    )
    return q


# ----------------------------------------------------------------------------- SiLU · up


@triton.jit
def _silu_and_mul_kernel(
    GATE_UP,
    OUT,
    stride_in,
    stride_out,
    width,
    alpha,
    limit,
    ACTIVATION: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """ACTIVATION 0: SiLU(gate) · up; 1: GELU-tanh(gate) · up (Gemma); 2: gpt-oss's clamped
    SwiGLU, gate · sigmoid(alpha · gate) · (up + 1) with gate ≤ limit and |up| ≤ limit."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < width
    gate = tl.load(GATE_UP + row * stride_in + cols, mask=mask, other=0.0)
    up = tl.load(GATE_UP + row * stride_in + width + cols, mask=mask, other=0.0)
    gf = gate.to(tl.float32)
    if ACTIVATION == 0:
        activated = (gf / (1.0 + tl.exp(-gf))).to(gate.dtype)
        out = activated * up
    elif ACTIVATION == 1:
        inner = tl.minimum(
            tl.maximum(0.7978845608028654 * (gf + 0.044715 * gf * gf * gf), -20.0), 20.0
        )
        tanh = 2.0 / (1.0 + tl.exp(-2.0 * inner)) - 1.0
        out = (0.5 * gf * (1.0 + tanh)).to(gate.dtype) * up
    else:
        gf = tl.minimum(gf, limit)
        uf = tl.minimum(tl.maximum(up.to(tl.float32), -limit), limit)
        out = (gf / (1.0 + tl.exp(-alpha * gf)) * (uf + 1.0)).to(gate.dtype)
    tl.store(OUT + row * stride_out + cols, out, mask=mask)


ACTIVATIONS = {"silu": 0, "gelu_tanh": 1, "swiglu_oai": 2}


def silu_and_mul(
    gate_up: torch.Tensor, activation: str = "silu", alpha: float = 1.702, limit: float = 7.0
) -> torch.Tensor:
    width = gate_up.shape[-1] // 2
    rows = gate_up.numel() // (2 * width)
    flat = gate_up.reshape(rows, 2 * width)
    out = torch.empty((rows, width), dtype=gate_up.dtype, device=gate_up.device)
    block = 1024
    _silu_and_mul_kernel[(rows, triton.cdiv(width, block))](
        flat, out, flat.stride(0), out.stride(0), width, alpha, limit,
        ACTIVATION=ACTIVATIONS[activation], BLOCK=block,
    )  # fmt: skip
    return out.view(*gate_up.shape[:-1], width)


# ----------------------------------------------------------------------------- FP8 activations


@triton.jit
def _quantize_fp8_rows_kernel(X, OUT, SCALE, stride_x, stride_o, width, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < width
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    scale = tl.maximum(tl.max(tl.abs(x), axis=0), 1e-12) / 448.0
    tl.store(SCALE + row, scale)
    quantized = tl.clamp(x / scale, -448.0, 448.0)
    tl.store(OUT + row * stride_o + cols, quantized.to(OUT.dtype.element_ty), mask=mask)


def quantize_fp8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    rows, width = x.shape
    out = torch.empty((rows, width), dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty((rows, 1), dtype=torch.float32, device=x.device)
    block = triton.next_power_of_2(width)
    _quantize_fp8_rows_kernel[(rows,)](
        x,
        out,
        scale,
        x.stride(0),
        out.stride(0),
        width,
        BLOCK=block,
        num_warps=8 if block > 4096 else 4,
    )
    return out, scale


@triton.jit
def _weight_matmul_kernel(
    X,
    W,
    SCALE,
    OUT,
    rows,
    out_features,
    in_features,
    stride_x,
    stride_w,
    stride_o,
    HAS_SCALE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """out[M, N] = x[M, K] @ (W[N, K] · scale[N])ᵀ for a few rows: decoding is bound by
    reading W, and one byte a weight is the whole gain of FP8, so the weights are widened to
    x's dtype in registers and the activations stay as they are. The second grid axis tiles
    the rows (batch-invariant use: every row through BLOCK_M-row tiles in the same order)."""
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    k = tl.arange(0, BLOCK_K)
    n_mask = n < out_features
    m_mask = m < rows
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for start in range(0, in_features, BLOCK_K):
        k_mask = (start + k) < in_features  # a width that is no multiple of BLOCK_K ends short
        x = tl.load(
            X + m[:, None] * stride_x + (start + k)[None, :],
            mask=m_mask[:, None] & k_mask[None, :],
            other=0.0,
        )
        w = tl.load(
            W + n[:, None].to(tl.int64) * stride_w + (start + k)[None, :],
            mask=n_mask[:, None] & k_mask[None, :],
            other=0.0,
        )
        acc += tl.dot(x, tl.trans(w.to(x.dtype)))
    if HAS_SCALE:
        acc = acc * tl.load(SCALE + n, mask=n_mask, other=0.0)[None, :]
    tl.store(
        OUT + m[:, None] * stride_o + n[None, :],
        acc.to(OUT.dtype.element_ty),
        mask=m_mask[:, None] & n_mask[None, :],
    )


@triton.jit
def _weight_vector_kernel(
    X,
    W,
    SCALE,
    OUT,
    out_features,
    in_features,
    stride_w,
    HAS_SCALE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """One row: out[N] = x[K] @ (W[N, K] · scale[N])ᵀ with multiply-adds on the CUDA cores (a
    matrix instruction would pad the row to 16 and do 16 times the work)."""
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k = tl.arange(0, BLOCK_K)
    n_mask = n < out_features
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    rows = W + n[:, None].to(tl.int64) * stride_w
    for start in range(0, in_features, BLOCK_K):
        x = tl.load(X + start + k).to(tl.float32)
        w = tl.load(rows + (start + k)[None, :], mask=n_mask[:, None], other=0.0)
        acc += tl.sum(w.to(tl.float32) * x[None, :], axis=1)
    if HAS_SCALE:
        acc = acc * tl.load(SCALE + n, mask=n_mask, other=0.0)
    tl.store(OUT + n, acc.to(OUT.dtype.element_ty), mask=n_mask)


# Tile shapes of the one-row kernel by the weight's bytes an element, as engine_bench.py's micro
# section chose them on an H200 (graph-timed over the 8B decoder's four shapes; BENCHMARKS.md):
# two output rows a program, so that enough programs stream the matrix at once.
GEMV_CONFIGS = {
    1: {"BLOCK_N": 2, "BLOCK_K": 1024, "num_warps": 1},  # FP8
    2: {"BLOCK_N": 2, "BLOCK_K": 2048, "num_warps": 2},  # bf16 / fp16
}


def gemv_config(weight: torch.Tensor) -> dict[str, int]:
    return GEMV_CONFIGS.get(weight.element_size(), GEMV_CONFIGS[2])


def weight_vector(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor | None,
    config: dict[str, int] | None = None,
) -> torch.Tensor:
    out_features, in_features = weight.shape
    chosen = config or gemv_config(weight)
    if in_features % chosen["BLOCK_K"]:
        raise ValueError(f"input width {in_features} is not a multiple of {chosen['BLOCK_K']}")
    out = torch.empty((1, out_features), dtype=x.dtype, device=x.device)
    _weight_vector_kernel[(triton.cdiv(out_features, chosen["BLOCK_N"]),)](
        x,
        weight,
        weight if scale is None else scale,
        out,
        out_features,
        in_features,
        weight.stride(0),
        HAS_SCALE=scale is not None,
        BLOCK_N=chosen["BLOCK_N"],
        BLOCK_K=chosen["BLOCK_K"],
        num_warps=chosen["num_warps"],
        num_stages=chosen.get("num_stages", 3),
    )
    return out


# The batch-invariant tile: fixed whatever the row count, so each row meets the same matrix
# instructions over the same slices of K in the same order.
# Of the tiles engine_bench.py swept on an H200 (per 8B layer: one row / 32 rows / a 2048-row
# prefill), 32 × 32 × 128 is the middle way: 151 / 142 / 7,027 µs, against 126 / 204 / 12,330
# for 16 × 32 × 256 and 196 / 192 / 3,229 for 64 × 64 × 64 (cuBLAS: ~110 / 117 / 1,257).
INVARIANT_TILE = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 128, "num_warps": 4, "num_stages": 4}


def weight_matmul(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor | None,
    batch_invariant: bool = False,
    invariant_tile: dict[str, int] | None = None,
) -> torch.Tensor:
    rows, in_features = x.shape
    out_features = weight.shape[0]
    if batch_invariant:
        tile = invariant_tile or INVARIANT_TILE
    elif rows == 1 and in_features % gemv_config(weight)["BLOCK_K"] == 0 and x.is_contiguous():
        return weight_vector(x, weight, scale)
    else:  # a few decode rows in one tile of rows
        tile = {
            "BLOCK_M": max(16, triton.next_power_of_2(rows)),
            "BLOCK_N": 32,
            "BLOCK_K": 256,
            "num_warps": 4,
            "num_stages": 4 if rows <= 32 else 3,
        }
    out = torch.empty((rows, out_features), dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(out_features, tile["BLOCK_N"]), triton.cdiv(rows, tile["BLOCK_M"]))
    _weight_matmul_kernel[grid](
        x,
        weight,
        weight if scale is None else scale,
        out,
        rows,
        out_features,
        in_features,
        x.stride(0),
        weight.stride(0),
        out.stride(0),
        HAS_SCALE=scale is not None,
        **tile,
    )
    return out


# ----------------------------------------------------------------------------- decode attention


@triton.jit
def _decode_split_kernel(
    Q,
    K_CACHE,
    V_CACHE,
    TABLES,
    LENS,
    K_SCALES,
    V_SCALES,
    PART_ACC,
    PART_MAX,
    PART_SUM,
    stride_qb,
    stride_qh,
    stride_cs,
    stride_ch,
    stride_tb,
    stride_ss,
    scale,
    window,
    HEADS: tl.constexpr,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SPLITS: tl.constexpr,
    FP8: tl.constexpr,
):
    """One (sequence, kv head, split): the query heads of that kv head against one slice of
    the sequence's keys, read through its block table. Writes the slice's unnormalised output,
    running max and sum (flash-decoding), which `_decode_reduce_kernel` merges.

    An FP8 cache's per-vector scales apply outside the dots (a key's scale to its scores, a
    value's to its softmax weights), which then run in float16: float8 widens to it in one
    instruction.

    A sliding-window layer (`window` > 0) reads only the last `window` positions: the splits
    share those, not the whole sequence."""
    seq = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    length = tl.load(LENS + seq)
    # One type on every path (the compiler wants it): a tensor, 0 without a window.
    first = tl.where(window > 0, tl.maximum(length - window, 0), 0)
    per_split = tl.cdiv(tl.cdiv(length - first, SPLITS), BLOCK_N) * BLOCK_N
    start = first + split * per_split
    end = tl.minimum(start + per_split, length)

    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, HEAD_DIM)
    heads = kv_head * GROUP + g
    head_mask = g < GROUP
    q = tl.load(
        Q + seq * stride_qb + heads[:, None] * stride_qh + d[None, :],
        mask=head_mask[:, None],
        other=0.0,
    )
    if FP8:
        # A bfloat16 query fits float16 exactly (more mantissa; the range of any real query).
        q = q.to(tl.float16)
    running_max = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
    running_sum = tl.zeros([GROUP_PAD], dtype=tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], dtype=tl.float32)
    for first in range(start, end, BLOCK_N):
        positions = first + tl.arange(0, BLOCK_N)
        valid = positions < end
        block = tl.load(TABLES + seq * stride_tb + positions // BLOCK_SIZE, mask=valid, other=0)
        slots = block.to(tl.int64) * BLOCK_SIZE + positions % BLOCK_SIZE
        offsets = slots[:, None] * stride_cs + kv_head * stride_ch + d[None, :]
        keys = tl.load(K_CACHE + offsets, mask=valid[:, None], other=0.0).to(q.dtype)
        scores = tl.dot(q, tl.trans(keys)) * scale
        if FP8:
            vector = slots * stride_ss + kv_head
            scores = scores * tl.load(K_SCALES + vector, mask=valid, other=0.0)[None, :]
        scores = tl.where(valid[None, :], scores, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(scores, axis=1))
        correction = tl.exp(running_max - new_max)
        weights = tl.exp(scores - new_max[:, None])
        running_sum = running_sum * correction + tl.sum(weights, axis=1)
        values = tl.load(V_CACHE + offsets, mask=valid[:, None], other=0.0).to(q.dtype)
        if FP8:
            # Scaled by each value's amax (its scale × 448) rather than its scale, so that the
            # float16 weights stay clear of float16's subnormals; the 448 comes off at the end.
            v_amax = tl.load(V_SCALES + vector, mask=valid, other=0.0) * 448.0
            weights = weights * v_amax[None, :]
        acc = acc * correction[:, None] + tl.dot(weights.to(q.dtype), values)
        running_max = new_max
    if FP8:
        acc = acc / 448.0
    part = (seq * HEADS + heads) * SPLITS + split
    tl.store(PART_ACC + part[:, None] * HEAD_DIM + d[None, :], acc, mask=head_mask[:, None])
    tl.store(PART_MAX + part, running_max, mask=head_mask)
    tl.store(PART_SUM + part, running_sum, mask=head_mask)


@triton.jit
def _decode_reduce_kernel(
    PART_ACC,
    PART_MAX,
    PART_SUM,
    SINKS,
    OUT,
    stride_ob,
    stride_oh,
    HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    SPLITS: tl.constexpr,
    HAS_SINKS: tl.constexpr,
):
    """Merges the splits; an attention sink (gpt-oss: one learnt logit per head) joins the
    softmax's denominator and adds nothing to its output."""
    seq = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    s = tl.arange(0, SPLITS)
    d = tl.arange(0, HEAD_DIM)
    part = (seq * HEADS + head) * SPLITS + s
    maxima = tl.load(PART_MAX + part)
    overall = tl.max(maxima, axis=0)
    weights = tl.exp(maxima - overall)  # an empty split has max -inf: weight 0
    total = tl.sum(tl.load(PART_SUM + part) * weights, axis=0)
    if HAS_SINKS:
        total += tl.exp(tl.load(SINKS + head).to(tl.float32) - overall)
    acc = tl.load(PART_ACC + part[:, None] * HEAD_DIM + d[None, :])
    out = tl.sum(acc * weights[:, None], axis=0) / total
    tl.store(OUT + seq * stride_ob + head * stride_oh + d, out.to(OUT.dtype.element_ty))


def decode_splits(batch: int, kv_heads: int, multiprocessors: int) -> int:
    """How many slices each sequence's keys are cut into: enough programs to fill the GPU
    twice over at small batches, one slice once the batch alone fills it."""
    wanted = max(1, (2 * multiprocessors) // max(1, batch * kv_heads))
    return min(32, triton.next_power_of_2(wanted))


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    block_size: int,
    scale: float,
    splits: int,
    k_scales: torch.Tensor | None = None,
    v_scales: torch.Tensor | None = None,
    window: int = 0,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    batch, heads, head_dim = q.shape
    fp8 = k_scales is not None and v_scales is not None
    kv_heads = k_cache.shape[1]
    group = heads // kv_heads
    part_acc = torch.empty((batch, heads, splits, head_dim), dtype=torch.float32, device=q.device)
    part_max = torch.empty((batch, heads, splits), dtype=torch.float32, device=q.device)
    part_sum = torch.empty((batch, heads, splits), dtype=torch.float32, device=q.device)
    _decode_split_kernel[(batch, kv_heads, splits)](
        q,
        k_cache,
        v_cache,
        block_tables,
        seq_lens,
        k_scales if fp8 else seq_lens,
        v_scales if fp8 else seq_lens,
        part_acc,
        part_max,
        part_sum,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        block_tables.stride(0),
        k_scales.stride(0) if k_scales is not None else 0,
        scale,
        window,
        HEADS=heads,
        GROUP=group,
        GROUP_PAD=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size,
        BLOCK_N=64,
        SPLITS=splits,
        FP8=fp8,
        num_warps=4,
        num_stages=2,
    )
    out = torch.empty_like(q)
    _decode_reduce_kernel[(batch, heads)](
        part_acc,
        part_max,
        part_sum,
        part_sum if sinks is None else sinks,
        out,
        out.stride(0),
        out.stride(1),
        HEADS=heads,
        HEAD_DIM=head_dim,
        SPLITS=splits,
        HAS_SINKS=sinks is not None,
    )
    return out


# ----------------------------------------------------------------------------- mixture of experts


@triton.jit
def _route_experts_kernel(
    LOGITS,
    WEIGHTS,
    IDS,
    experts,
    stride_l,
    TOP_K: tl.constexpr,
    NORMALIZE: tl.constexpr,
    SOFTMAX_AFTER: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """One token: softmax over its router logits in float32, then the top k by repeated
    arg-max (k is small), renormalised when asked; or (SOFTMAX_AFTER, gpt-oss) the top k
    logits first, then a softmax over those alone."""
    token = tl.program_id(0).to(tl.int64)
    columns = tl.arange(0, BLOCK_E)
    logits = tl.load(
        LOGITS + token * stride_l + columns, mask=columns < experts, other=-float("inf")
    ).to(tl.float32)
    if SOFTMAX_AFTER:
        probabilities = logits
        floor = -float("inf")
    else:
        exponentials = tl.exp(logits - tl.max(logits, axis=0))
        probabilities = exponentials / tl.sum(exponentials, axis=0)
        floor = -1.0
    picks = tl.arange(0, BLOCK_K)
    chosen_weights = tl.zeros([BLOCK_K], dtype=tl.float32)
    chosen_ids = tl.zeros([BLOCK_K], dtype=tl.int32)
    remaining = tl.where(columns < experts, probabilities, floor)
    for j in tl.static_range(TOP_K):
        best = tl.argmax(remaining, axis=0)
        value = tl.max(remaining, axis=0)
        chosen_weights = tl.where(picks == j, value, chosen_weights)
        chosen_ids = tl.where(picks == j, best.to(tl.int32), chosen_ids)
        remaining = tl.where(columns == best, floor, remaining)
    if SOFTMAX_AFTER:  # the first pick is the largest logit
        top = tl.max(tl.where(picks < TOP_K, chosen_weights, -float("inf")), axis=0)
        exponentials = tl.where(picks < TOP_K, tl.exp(chosen_weights - top), 0.0)
        chosen_weights = exponentials / tl.sum(exponentials, axis=0)
    elif NORMALIZE:
        chosen_weights = chosen_weights / tl.sum(tl.where(picks < TOP_K, chosen_weights, 0.0))
    tl.store(WEIGHTS + token * TOP_K + picks, chosen_weights, mask=picks < TOP_K)
    tl.store(IDS + token * TOP_K + picks, chosen_ids, mask=picks < TOP_K)


def route_experts(
    logits: torch.Tensor, top_k: int, normalize: bool, softmax_after: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    tokens, experts = logits.shape
    weights = torch.empty((tokens, top_k), dtype=torch.float32, device=logits.device)
    ids = torch.empty((tokens, top_k), dtype=torch.int32, device=logits.device)
    _route_experts_kernel[(tokens,)](
        logits,
        weights,
        ids,
        experts,
        logits.stride(0),
        TOP_K=top_k,
        NORMALIZE=normalize,
        SOFTMAX_AFTER=softmax_after,
        BLOCK_E=triton.next_power_of_2(experts),
        BLOCK_K=triton.next_power_of_2(top_k),
    )
    return weights, ids


@triton.jit
def _load_expert_tile(
    W,
    SCALE,
    expert,
    n,
    n_mask,
    start,
    in_features,
    stride_we,
    stride_wn,
    stride_se,
    stride_sn,
    PACKED: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Expert `expert`'s weight rows n, columns [start, start + BLOCK_K), as stored (int8, fp8,
    plain) or, packed two a byte (PACKED 1: int4 with a float scale per group; 2: MXFP4, e2m1
    values with a power-of-two scale byte per 32), unpacked and scaled (one group a tile)."""
    base = W + expert.to(tl.int64) * stride_we + n[:, None].to(tl.int64) * stride_wn
    if PACKED == 2:
        pairs = start // 2 + tl.arange(0, BLOCK_K // 2)
        packed = tl.load(
            base + pairs[None, :],
            mask=n_mask[:, None] & (pairs[None, :] < in_features // 2),
            other=0,
        )
        values = tl.reshape(tl.join(packed & 0xF, (packed >> 4) & 0xF), (BLOCK_N, BLOCK_K))
        # e2m1: sign, two exponent bits, one mantissa bit; exponent 0 is subnormal (0, 0.5).
        exponent = ((values >> 1) & 3).to(tl.float32)
        mantissa = (values & 1).to(tl.float32)
        magnitude = tl.where(
            exponent == 0, 0.5 * mantissa, (1.0 + 0.5 * mantissa) * tl.exp2(exponent - 1.0)
        )
        decoded = tl.where((values & 8) != 0, -magnitude, magnitude)
        scale_bits = tl.load(
            SCALE + expert.to(tl.int64) * stride_se + n * stride_sn + start // GROUP,
            mask=n_mask,
            other=127,
        )
        return decoded * tl.exp2(scale_bits.to(tl.float32) - 127.0)[:, None]
    if PACKED == 1:
        pairs = start // 2 + tl.arange(0, BLOCK_K // 2)
        packed = tl.load(
            base + pairs[None, :],
            mask=n_mask[:, None] & (pairs[None, :] < in_features // 2),
            other=0,
        )
        low = (packed & 0xF).to(tl.int8)
        high = ((packed >> 4) & 0xF).to(tl.int8)
        low = tl.where(low > 7, low - 16, low)
        high = tl.where(high > 7, high - 16, high)
        values = tl.reshape(tl.join(low, high), (BLOCK_N, BLOCK_K)).to(tl.float32)
        scale = tl.load(
            SCALE + expert.to(tl.int64) * stride_se + n * stride_sn + start // GROUP,
            mask=n_mask,
            other=0.0,
        )
        return values * scale[:, None]
    k = start + tl.arange(0, BLOCK_K)
    return tl.load(base + k[None, :], mask=n_mask[:, None] & (k[None, :] < in_features), other=0.0)


@triton.jit
def _expert_matmul_kernel(
    X,
    W,
    SCALE,
    BIAS,
    OUT,
    ROWS,
    BLOCK_EXPERTS,
    row_count,
    out_features,
    in_features,
    fan_out,
    stride_x,
    stride_we,
    stride_wn,
    stride_se,
    stride_sn,
    stride_o,
    HAS_SCALE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    PACKED: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """The grouped matmul (prefill): rows sorted by expert (`sort_by_expert`), one block of
    BLOCK_M rows of one expert a program, so each expert's tile is read once for its rows.
    Output row r = X[r // fan_out] @ W[expert]ᵀ, written where r belongs (no unsort)."""
    block = tl.program_id(0)
    expert = tl.load(BLOCK_EXPERTS + block)
    if expert >= 0:
        rows = tl.load(ROWS + block * BLOCK_M + tl.arange(0, BLOCK_M))
        valid = rows < row_count
        x_rows = (rows // fan_out).to(tl.int64)
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = n < out_features
        k = tl.arange(0, BLOCK_K)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for start in range(0, in_features, BLOCK_K):
            x = tl.load(
                X + x_rows[:, None] * stride_x + (start + k)[None, :],
                mask=valid[:, None] & ((start + k)[None, :] < in_features),
                other=0.0,
            )
            w = _load_expert_tile(
                W, SCALE, expert, n, n_mask, start, in_features, stride_we, stride_wn,
                stride_se, stride_sn, PACKED, GROUP, BLOCK_N, BLOCK_K,
            )  # fmt: skip
            acc += tl.dot(x, tl.trans(w.to(x.dtype)))
        if HAS_SCALE and PACKED == 0:
            scale = tl.load(
                SCALE + expert.to(tl.int64) * stride_se + n * stride_sn, mask=n_mask, other=0.0
            )
            acc = acc * scale[None, :]
        if HAS_BIAS:
            bias = tl.load(BIAS + expert.to(tl.int64) * out_features + n, mask=n_mask, other=0.0)
            acc = acc + bias.to(tl.float32)[None, :]
        tl.store(
            OUT + rows[:, None].to(tl.int64) * stride_o + n[None, :],
            acc.to(OUT.dtype.element_ty),
            mask=valid[:, None] & n_mask[None, :],
        )


@triton.jit
def _expert_vector_kernel(
    X,
    W,
    SCALE,
    BIAS,
    OUT,
    IDS,
    out_features,
    in_features,
    fan_out,
    stride_x,
    stride_we,
    stride_wn,
    stride_se,
    stride_sn,
    stride_o,
    HAS_SCALE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    PACKED: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Decode: one (token, chosen expert) row a program column, reading only that expert's
    rows n: the bytes a decode step must read are the chosen experts', no more."""
    row = tl.program_id(1)
    expert = tl.load(IDS + row)
    x_row = (row // fan_out).to(tl.int64)
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n < out_features
    k = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for start in range(0, in_features, BLOCK_K):
        x = tl.load(X + x_row * stride_x + start + k, mask=(start + k) < in_features, other=0.0)
        w = _load_expert_tile(
            W, SCALE, expert, n, n_mask, start, in_features, stride_we, stride_wn,
            stride_se, stride_sn, PACKED, GROUP, BLOCK_N, BLOCK_K,
        )  # fmt: skip
        acc += tl.sum(w.to(tl.float32) * x.to(tl.float32)[None, :], axis=1)
    if HAS_SCALE and PACKED == 0:
        acc = acc * tl.load(
            SCALE + expert.to(tl.int64) * stride_se + n * stride_sn, mask=n_mask, other=0.0
        )
    if HAS_BIAS:
        bias = tl.load(BIAS + expert.to(tl.int64) * out_features + n, mask=n_mask, other=0.0)
        acc = acc + bias.to(tl.float32)
    tl.store(OUT + row.to(tl.int64) * stride_o + n, acc.to(OUT.dtype.element_ty), mask=n_mask)


# (token, expert) rows up to which decode reads expert rows one program each; beyond, rows
# are sorted by expert so each expert's tile is read once for all of its rows.
EXPERT_VECTOR_MAX_ROWS = 16
EXPERT_BLOCK_M = 16


def sort_by_expert(
    ids: torch.Tensor, num_experts: int, block: int
) -> tuple[torch.Tensor, torch.Tensor]:
    # Fixed-shape torch operations (stable argsort, cumulative sums, searchsorted): they run as
    # GPU kernels without a host sync, so a CUDA graph can hold them.
    from neuron_agent.torch_engine.kernels import reference

    return reference.sort_by_expert(ids, num_experts, block)


def expert_matmul(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor | None,
    ids: torch.Tensor,
    fan_out: int,
    group_size: int = 128,
    layout: tuple[torch.Tensor, torch.Tensor] | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    rows = ids.numel()
    _experts, out_features, stored_in = weight.shape
    packed = 0
    if weight.dtype == torch.uint8:  # int4 scales are floats, MXFP4's are exponent bytes
        packed = 2 if scale is not None and scale.dtype == torch.uint8 else 1
    in_features = stored_in * 2 if packed else stored_in
    out = torch.empty((rows, out_features), dtype=x.dtype, device=x.device)
    block_k = min(64, group_size) if packed else 64
    if packed and group_size % block_k:
        raise ValueError(f"packed experts need a group size that is a multiple of {block_k}")
    scale_strides = (0, 0) if scale is None else (scale.stride(0), scale.stride(1))
    common = dict(
        HAS_SCALE=scale is not None,
        HAS_BIAS=bias is not None,
        PACKED=packed,
        GROUP=group_size,
        BLOCK_K=block_k,
    )
    x = x.contiguous()
    flat_ids = ids.reshape(-1)
    scale_or_any = weight if scale is None else scale
    bias_or_any = weight if bias is None else bias
    if layout is None:
        # Unpacked weights stream as the dense one-row kernel's tuned tiles do (GEMV_CONFIGS:
        # two rows a program, a long slice of K); packed ones need one scale group a tile.
        if packed:
            tile = {"BLOCK_N": 32, "num_warps": 4}
        else:
            tuned = gemv_config(weight)
            common["BLOCK_K"] = min(tuned["BLOCK_K"], triton.next_power_of_2(in_features))
            # (Under the interpreter, wider tiles: its cost is per program.)
            rows_per_program = tuned["BLOCK_N"] if weight.is_cuda else 16
            tile = {"BLOCK_N": rows_per_program, "num_warps": tuned["num_warps"]}
        grid = (triton.cdiv(out_features, tile["BLOCK_N"]), rows)
        _expert_vector_kernel[grid](
            x, weight, scale_or_any, bias_or_any, out, flat_ids,
            out_features, in_features, fan_out, x.stride(0), weight.stride(0),
            weight.stride(1), *scale_strides, out.stride(0), **tile, **common,
        )  # fmt: skip
        return out
    sorted_rows, block_experts = layout
    grid = (block_experts.numel(), triton.cdiv(out_features, 64))
    _expert_matmul_kernel[grid](
        x, weight, scale_or_any, bias_or_any, out, sorted_rows, block_experts,
        rows, out_features, in_features, fan_out, x.stride(0), weight.stride(0),
        weight.stride(1), *scale_strides, out.stride(0), BLOCK_M=EXPERT_BLOCK_M, BLOCK_N=64,
        **common,
    )  # fmt: skip
    return out


def experts_mlp(
    x: torch.Tensor,
    experts: ExpertWeights,
    weights: torch.Tensor,
    ids: torch.Tensor,
    grouped: bool = False,
) -> torch.Tensor:
    tokens, top_k = ids.shape
    layout = None
    if grouped or ids.numel() > EXPERT_VECTOR_MAX_ROWS:
        layout = sort_by_expert(ids, experts.gate_up.shape[0], EXPERT_BLOCK_M)
    group = experts.group_size
    hidden = expert_matmul(
        x, experts.gate_up, experts.gate_up_scale, ids, top_k, group, layout, experts.gate_up_bias
    )
    activated = silu_and_mul(hidden, experts.activation, experts.alpha, experts.limit)
    out = expert_matmul(
        activated, experts.down, experts.down_scale, ids, 1, group, layout, experts.down_bias
    )
    weighted = out.view(tokens, top_k, -1).float() * weights[..., None]
    return weighted.sum(dim=1).to(x.dtype)
