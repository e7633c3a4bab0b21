"""A compact Llama-family decoder over a paged KV cache.

Llama, Mistral, Qwen2 and Qwen3 differ here only in switches from `ModelSpec` (bias on q/k/v,
RMSNorm on q and k). Weights load straight from safetensors; every projection is a `QuantLinear`
so in-situ quantization is a load-time choice. q/k/v and gate/up are fused into one matmul each.

The forward pass takes the new tokens of a batch of sequences flat (one each when decoding, a
chunk each when prefilling), writes their keys and values into cache slots, and attends over the
cache: decoding reads it through each sequence's block table (`kernels.paged_decode_attention`),
prefilling attends per chunk. The fused operations (norm + residual, rotary + cache write,
SiLU · up, decode attention) live in `kernels`, a Triton kernel on GPUs and plain PyTorch on CPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from neuron_agent.torch_engine import kernels
from neuron_agent.torch_engine.checkpoint import EXPERT_LAYOUTS, ModelSpec, RopeSpec, shard_spec
from neuron_agent.torch_engine.errors import UnsupportedCheckpoint
from neuron_agent.torch_engine.kernels.reference import attend, dequantize_cache
from neuron_agent.torch_engine.kv_cache import LayerCache
from neuron_agent.torch_engine.moe import SparseMoe, load_gpt_oss_experts, load_sparse_moe
from neuron_agent.torch_engine.parallel import (
    RowParallelLinear,
    Shard,
    head_rows,
    kv_head_rows,
    mlp_rows,
    split,
)
from neuron_agent.torch_engine.quant import QuantLinear, pack_int4, row_amax, unpack_int4_rows


@dataclass(frozen=True)
class PrefillChunk:
    """One sequence's new tokens in a prefill pass: rows [start, start + length) of the batch.
    `key_slots` lists the cache slots of all its positions up to the chunk's end when earlier
    positions are already cached (a continued prompt); None when the chunk starts the sequence."""

    start: int
    length: int
    key_slots: torch.Tensor | None = None


@dataclass
class ForwardBatch:
    """Where a forward pass reads and writes the KV cache. Tokens come flat, [T].

    Every token has a position and a cache slot to write. A decode pass has one token per
    sequence and names each sequence's blocks (`block_tables` [B, W]) and cached length after
    this token (`seq_lens` [B]); attention reads the cache through the table. A prefill pass
    names its chunks instead (`prefill`); attention runs per chunk over the chunk and what
    precedes it. Fields are tensors, numbers and tuples of ints only: a tensor-parallel step
    sends them to the other ranks as they are (`ranks.py`).
    """

    positions: torch.Tensor
    write_slots: torch.Tensor
    block_size: int = 16
    block_tables: torch.Tensor | None = None
    seq_lens: torch.Tensor | None = None
    decode_splits: int = 1
    # Prefill: each chunk's new tokens (in row order), how many positions it attends to when
    # earlier ones are cached (0 when it starts its sequence), and those positions' slots.
    chunk_lengths: tuple[int, ...] = ()
    key_lengths: tuple[int, ...] = ()
    key_slots: torch.Tensor | None = None

    @classmethod
    def prefill(
        cls,
        positions: torch.Tensor,
        write_slots: torch.Tensor,
        block_size: int,
        chunks: list[PrefillChunk],
    ) -> ForwardBatch:
        continued = [c.key_slots for c in chunks if c.key_slots is not None]
        return cls(
            positions=positions,
            write_slots=write_slots,
            block_size=block_size,
            chunk_lengths=tuple(c.length for c in chunks),
            key_lengths=tuple(0 if c.key_slots is None else len(c.key_slots) for c in chunks),
            key_slots=torch.cat(continued) if continued else None,
        )

    @property
    def decoding(self) -> bool:
        return self.block_tables is not None

    @property
    def chunks(self) -> list[PrefillChunk]:
        chunks, row, key = [], 0, 0
        for length, keys in zip(self.chunk_lengths, self.key_lengths, strict=True):
            slots = None
            if keys:
                assert self.key_slots is not None
                slots = self.key_slots[key : key + keys]
            chunks.append(PrefillChunk(row, length, slots))
            row, key = row + length, key + keys
        return chunks


def rope_inverse_frequencies(rope: RopeSpec, head_dim: int) -> torch.Tensor:
    inv_freq = 1.0 / (rope.theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    if rope.kind == "linear":
        inv_freq = inv_freq / rope.factor
    elif rope.kind == "llama3":
        low_wavelen = rope.original_max_position / rope.low_freq_factor
        high_wavelen = rope.original_max_position / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
        smooth = (rope.original_max_position / wavelen - rope.low_freq_factor) / (
            rope.high_freq_factor - rope.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv_freq = torch.where(medium, smoothed, scaled)
    elif rope.kind == "yarn":
        inv_freq = _yarn(rope, head_dim, inv_freq)
    return inv_freq.float()


def _yarn(rope: RopeSpec, head_dim: int, extrapolated: torch.Tensor) -> torch.Tensor:
    """YaRN: high frequencies kept, low ones interpolated by the factor, a linear ramp between
    the dimensions that turn `beta_fast` and `beta_slow` times over the original context."""

    def dimension(rotations: float) -> float:
        return (
            head_dim
            * math.log(rope.original_max_position / (rotations * 2 * math.pi))
            / (2 * math.log(rope.theta))
        )

    low, high = dimension(rope.beta_fast), dimension(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp
    return extrapolated / rope.factor * (1 - keep) + extrapolated * keep


def rope_table(rope: RopeSpec, head_dim: int, positions: int) -> torch.Tensor:
    """[positions, head_dim] float32: cos of each frequency, then sin (the rotary kernels' table);
    YaRN scales both by its attention factor."""
    angles = torch.arange(positions).float()[:, None] * rope_inverse_frequencies(rope, head_dim)
    table = torch.cat((angles.cos(), angles.sin()), dim=-1)
    if rope.kind == "yarn":
        factor = rope.attention_factor
        if factor is None:
            factor = 0.1 * math.log(rope.factor) + 1.0 if rope.factor > 1 else 1.0
        table = table * factor
    return table


class RMSNorm(nn.Module):
    def __init__(self, weight: torch.Tensor, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.eps = eps

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(normed, x + residual). Normalise in float32, scale in the model's dtype: as the
        reference implementations do."""
        return kernels.add_rms_norm(x, residual, self.weight, self.eps)


def lower_right_mask(queries: int, keys: int) -> Any:
    """torch's lower-right causal bias. Imported here, not with the module: its import pulls in
    torch._dynamo, ~2.7 s of CPU that every Triton stub paid at start whether or not it ever
    continued a cached prompt (a GPU engine imports it at load: `preload_attention`)."""
    from torch.nn.attention.bias import causal_lower_right

    return causal_lower_right(queries, keys)


def preload_attention() -> None:
    """Pay the lower-right bias's import now (at load on a GPU) rather than in the first
    request that continues a cached prompt."""
    lower_right_mask(1, 1)


def _prefill_attention(
    q: torch.Tensor,
    cache: LayerCache,
    batch: ForwardBatch,
    groups: int,
    uniform: bool = False,
    scale: float | None = None,
    window: int = 0,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of each chunk's queries over its own keys and the cached ones before it.
    q [T, H, D] → [T, H, D]. Compute-bound, so keys are gathered per chunk (flash kernels need
    them contiguous); chunks that all start their sequences and have one length go in one call.

    `uniform`: every chunk through the one kernel that serves a continued chunk (lower-right
    causal), however the pass groups them (batch-invariant mode). A prompt whose prefix came
    from the cache is still prefilled as a shorter chunk, which can round otherwise: on an H200
    its tokens differed from a fresh prefill's (BENCHMARKS.md).

    A sliding-window layer (`window` > 0: each query sees itself and the window - 1 positions
    before it) or one with attention sinks goes chunk by chunk through `_masked_attention`."""
    chunks = batch.chunks
    fresh = all(c.key_slots is None for c in chunks)
    if window or sinks is not None:
        return _masked_attention(q, cache, batch, scale, window, sinks)
    if not uniform and fresh and len({c.length for c in chunks}) == 1:
        count, length = len(chunks), chunks[0].length
        keys = dequantize_cache(cache.keys, cache.key_scales, batch.write_slots, q.dtype)
        values = dequantize_cache(cache.values, cache.value_scales, batch.write_slots, q.dtype)
        shape = (count, length, *q.shape[1:])
        kv_shape = (count, length, *keys.shape[1:])
        attended = F.scaled_dot_product_attention(
            q.view(shape).transpose(1, 2),
            keys.view(kv_shape).transpose(1, 2),
            values.view(kv_shape).transpose(1, 2),
            is_causal=True,
            scale=scale,
            enable_gqa=groups > 1,
        )
        return attended.transpose(1, 2).reshape(q.shape)
    out = torch.empty_like(q)
    for chunk in chunks:
        rows = slice(chunk.start, chunk.start + chunk.length)
        slots = batch.write_slots[rows] if chunk.key_slots is None else chunk.key_slots
        keys = dequantize_cache(cache.keys, cache.key_scales, slots, q.dtype)
        values = dequantize_cache(cache.values, cache.value_scales, slots, q.dtype)
        keys, values = keys.transpose(0, 1)[None], values.transpose(0, 1)[None]  # [1, KVH, K, D]
        query = q[rows].transpose(0, 1)[None]  # [1, H, Q, D]
        if chunk.key_slots is None and not uniform:
            attended = F.scaled_dot_product_attention(
                query, keys, values, is_causal=True, scale=scale, enable_gqa=groups > 1
            )
        else:
            # The chunk's last query sees every key; earlier ones one fewer each (lower right).
            # The kv heads are shared by their query groups in the kernel: repeating them took
            # 23 % of a cached 600-token turn's prefill on an H200 (BENCHMARKS.md).
            mask = lower_right_mask(query.shape[2], keys.shape[2])
            attended = F.scaled_dot_product_attention(
                query, keys, values, attn_mask=mask, scale=scale, enable_gqa=groups > 1
            )
        out[rows] = attended[0].transpose(0, 1)
    return out


# Queries a masked-attention call takes at once: its scores are heads × this × keys floats.
MASKED_QUERY_BLOCK = 256


def _masked_attention(
    q: torch.Tensor,
    cache: LayerCache,
    batch: ForwardBatch,
    scale: float | None,
    window: int,
    sinks: torch.Tensor | None,
) -> torch.Tensor:
    """Prefill attention with a sliding window and/or sinks, chunk by chunk and in blocks of
    queries (the scores are materialised: SDPA has no sinks)."""
    out = torch.empty_like(q)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    for chunk in batch.chunks:
        rows = slice(chunk.start, chunk.start + chunk.length)
        slots = batch.write_slots[rows] if chunk.key_slots is None else chunk.key_slots
        keys = dequantize_cache(cache.keys, cache.key_scales, slots, q.dtype)
        values = dequantize_cache(cache.values, cache.value_scales, slots, q.dtype)
        keys, values = keys.transpose(0, 1)[None], values.transpose(0, 1)[None]  # [1, KVH, K, D]
        key_count = keys.shape[2]
        key_positions = torch.arange(key_count, device=q.device)
        for first in range(0, chunk.length, MASKED_QUERY_BLOCK):
            last = min(first + MASKED_QUERY_BLOCK, chunk.length)
            # Query i of the chunk sits at key position key_count - length + i (lower right).
            positions = torch.arange(first, last, device=q.device) + key_count - chunk.length
            mask = key_positions[None, :] <= positions[:, None]
            if window:
                mask &= key_positions[None, :] > positions[:, None] - window
            query = q[chunk.start + first : chunk.start + last].transpose(0, 1)[None]
            attended = attend(query, keys, values, mask[None, None], scale, sinks)
            out[chunk.start + first : chunk.start + last] = attended[0].transpose(0, 1)
    return out


class DecoderLayer(nn.Module):
    def __init__(
        self,
        spec: ModelSpec,
        weights: dict[str, nn.Module],
        window: int = 0,
        sinks: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.spec = spec
        self.input_norm = weights["input_layernorm"]
        self.post_norm = weights["post_attention_layernorm"]
        # Gemma: the attention's and the MLP's outputs are normed before they join the
        # residual stream, and the MLP's input has a norm of its own.
        self.pre_mlp_norm = weights.get("pre_feedforward_layernorm")
        self.post_mlp_norm = weights.get("post_feedforward_layernorm")
        self.activation = "gelu_tanh" if self.pre_mlp_norm is not None else "silu"
        self.window = window
        self.sinks = None if sinks is None else nn.Parameter(sinks, requires_grad=False)
        self.qkv = weights["qkv"]
        self.o_proj = weights["o_proj"]
        # A dense layer's gated MLP, or a mixture-of-experts layer's (`moe.SparseMoe`).
        self.gate_up = weights.get("gate_up")
        self.down = weights.get("down_proj")
        self.experts = weights.get("experts")
        self.q_norm = weights.get("q_norm")
        self.k_norm = weights.get("k_norm")
        self.q_size = spec.num_heads * spec.head_dim
        self.kv_size = spec.num_kv_heads * spec.head_dim
        self.scale = spec.query_scale or spec.head_dim**-0.5
        self.uniform_prefill = False  # LlamaModel.make_batch_invariant

    def forward(
        self,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        cos_sin: torch.Tensor,
        cache: LayerCache,
        batch: ForwardBatch,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(this layer's MLP output, the residual stream before it is added): the next layer's
        first norm adds them in one kernel."""
        spec = self.spec
        tokens = hidden.shape[0]
        normed, residual = self.input_norm(hidden, residual)
        qkv = self.qkv(normed)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(tokens, spec.num_heads, spec.head_dim)
        k = k.view(tokens, spec.num_kv_heads, spec.head_dim)
        v = v.view(tokens, spec.num_kv_heads, spec.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q)[0], self.k_norm(k)[0]
        q = kernels.rotary_and_cache(
            q, k, v, cos_sin, batch.positions, *cache[:2], batch.write_slots, *cache[2:]
        )
        groups = spec.num_heads // spec.num_kv_heads
        if batch.decoding:
            assert batch.block_tables is not None and batch.seq_lens is not None
            attended = kernels.paged_decode_attention(
                q,
                cache.keys,
                cache.values,
                batch.block_tables,
                batch.seq_lens,
                batch.block_size,
                self.scale,
                batch.decode_splits,
                cache.key_scales,
                cache.value_scales,
                self.window,
                self.sinks,
            )
        else:
            attended = _prefill_attention(
                q, cache, batch, groups, self.uniform_prefill, self.scale, self.window, self.sinks
            )
        attention_out = self.o_proj(attended.reshape(tokens, self.q_size))
        if self.pre_mlp_norm is not None and self.post_mlp_norm is not None:
            attention_out = self.post_norm(attention_out)[0]
            normed, residual = self.pre_mlp_norm(attention_out, residual)
            return self.post_mlp_norm(self._mlp(normed))[0], residual
        normed, residual = self.post_norm(attention_out, residual)
        return self._mlp(normed), residual

    def _mlp(self, normed: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor
        if self.experts is not None:
            out = self.experts(normed)
            return out
        assert self.gate_up is not None and self.down is not None
        out = self.down(kernels.silu_and_mul(self.gate_up(normed), self.activation))
        return out


class LlamaModel(nn.Module):
    def __init__(
        self,
        spec: ModelSpec,
        tensors: dict[str, torch.Tensor],
        quantization: str,
        dtype: torch.dtype,
        device: torch.device,
        group_size: int = 128,
        shard: Shard | None = None,
    ) -> None:
        super().__init__()
        shard = shard or Shard()
        # This rank's sizes (its heads, kv heads, MLP slice): what its layers and cache hold.
        self.spec = shard_spec(spec, shard.world)
        self.dtype = dtype
        self.device = device
        loader = _WeightLoader(spec, tensors, quantization, dtype, device, group_size, shard)
        self.embed = nn.Parameter(loader.plain("model.embed_tokens.weight"), requires_grad=False)
        self.layers = nn.ModuleList(loader.layer(i) for i in range(spec.num_layers))
        self.norm = loader.norm("model.norm.weight")
        head_name = "model.embed_tokens.weight" if spec.tie_word_embeddings else "lm_head.weight"
        if head_name not in tensors:
            head_name = "model.embed_tokens.weight"
        self.lm_head = loader.head(head_name)
        self.register_buffer(
            "cos_sin",
            rope_table(spec.rope, spec.head_dim, spec.context_length).to(device),
            persistent=False,
        )
        # Gemma 3's windowed layers rotate with a rope of their own.
        local = spec.local_rope
        self.local_layers = [
            local is not None and spec.window_of(i) > 0 for i in range(spec.num_layers)
        ]
        self.register_buffer(
            "local_cos_sin",
            None
            if local is None
            else rope_table(local, spec.head_dim, spec.context_length).to(device),
            persistent=False,
        )
        # Gemma scales its embeddings by √hidden, rounded to the model's dtype first.
        self.embed_scale = (
            float(torch.tensor(spec.hidden_size**0.5, dtype=dtype))
            if spec.architecture == "Gemma3ForCausalLM"
            else None
        )

    def make_batch_invariant(self) -> None:
        """Every projection (and the head) through the fixed-tile kernel on the GPU, and every
        prompt chunk through one attention kernel: a row's logits then do not depend on the
        other rows of its batch (a cache hit can still change them: `_prefill_attention`).
        Decode attention already splits every sequence the same way at every batch size, and
        the norms and the rotation work row by row; experts go through the grouped matmul at
        every batch size."""
        for module in self.modules():
            if isinstance(module, QuantLinear):
                module.batch_invariant = True
            elif isinstance(module, DecoderLayer):
                module.uniform_prefill = True
            elif isinstance(module, SparseMoe):
                module.batch_invariant = True

    def forward(
        self,
        tokens: torch.Tensor,
        batch: ForwardBatch,
        kv_caches: list[LayerCache],
        logits_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run the batch; return float32 logits of the rows `logits_index` picks from [T] (every
        row when None)."""
        hidden = F.embedding(tokens, self.embed)
        if self.embed_scale is not None:
            hidden = hidden * self.embed_scale
        residual: torch.Tensor | None = None
        tables: tuple[torch.Tensor, torch.Tensor] = (self.cos_sin, self.local_cos_sin)  # type: ignore[assignment]
        for layer, cache, local in zip(self.layers, kv_caches, self.local_layers, strict=True):
            hidden, residual = layer(hidden, residual, tables[local], cache, batch)
        assert residual is not None
        if logits_index is not None:
            hidden, residual = hidden[logits_index], residual[logits_index]
        normed, _ = self.norm(hidden, residual)
        logits: torch.Tensor = self.lm_head(normed)
        return logits.float()


class _WeightLoader:
    """Turns checkpoint tensors into modules, quantizing or reading stored quantization.

    At tp > 1 it reads only this rank's rows (column-parallel) or columns (row-parallel) of each
    projection from the memory-mapped checkpoint; `parallel` says which part is whose."""

    def __init__(
        self,
        spec: ModelSpec,
        tensors: dict[str, torch.Tensor],
        quantization: str,
        dtype: torch.dtype,
        device: torch.device,
        group_size: int,
        shard: Shard | None = None,
    ) -> None:
        self.spec = spec
        self.tensors = tensors
        self.quantization = quantization
        self.dtype = dtype
        self.device = device
        self.group_size = group_size
        self.shard = shard or Shard()

    def _get(self, name: str) -> torch.Tensor:
        try:
            return self.tensors[name]
        except KeyError:
            raise UnsupportedCheckpoint(f"the checkpoint lacks tensor {name}") from None

    def plain(self, name: str) -> torch.Tensor:
        return self._plain(name, self._get(name))

    def _plain(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        if tensor.dtype in (torch.float8_e4m3fn, torch.uint8, torch.int8):
            raise UnsupportedCheckpoint(f"tensor {name} is quantized where a plain one is expected")
        return tensor.to(device=self.device, dtype=self.dtype)

    def _optional(self, name: str) -> torch.Tensor | None:
        tensor = self.tensors.get(name)
        return None if tensor is None else tensor.to(self.device)

    def head(self, name: str) -> QuantLinear:
        """The output head, unquantized (small next to the body, and it sets the logits). Only
        rank 0 samples: the other ranks hold an empty one."""
        if self.shard.rank != 0:
            empty = torch.empty((0, self.spec.hidden_size), dtype=self.dtype, device=self.device)
            return QuantLinear("none", empty, None, None, self.dtype)
        return QuantLinear.from_weight(self.plain(name), None, "none", self.dtype)

    def linear(
        self, parts: list[tuple[str, slice]], row_parallel: bool = False
    ) -> QuantLinear | RowParallelLinear:
        """One QuantLinear for the concatenation of the named projections (fused q/k/v etc.),
        each cut to this rank's rows `part` (column-parallel) or, with `row_parallel`, to its
        input columns (the one projection's partial output is then summed over the ranks)."""
        stored = self.spec.stored_quantization
        prefixes = [prefix for prefix, _ in parts]
        cuts = [cut for _, cut in parts]

        def shard(tensor: torch.Tensor, cut: slice) -> torch.Tensor:
            return tensor[:, cut] if row_parallel else tensor[cut]

        biases = [self.tensors.get(f"{p}.bias") for p in prefixes]
        bias = None
        if all(b is not None for b in biases):
            pieces = [
                b if row_parallel else b[c]
                for b, c in zip(biases, cuts, strict=True)
                if b is not None
            ]
            bias = torch.cat(pieces).to(self.device)
        parallel_bias = None
        if row_parallel and self.shard.parallel:
            parallel_bias, bias = bias, None  # added once, after the partial outputs are summed
        if stored == "modelopt_fp8":
            weights, scales = [], []
            for prefix, cut in parts:
                weight = shard(self._get(f"{prefix}.weight"), cut).to(self.device)
                scale = self._get(f"{prefix}.weight_scale").float().reshape(-1)
                if scale.numel() > 1 and not row_parallel:
                    scale = scale[cut]  # per-channel scales go with their rows
                weights.append(weight)
                scales.append(scale.to(self.device).expand(weight.shape[0]))
            linear = QuantLinear("fp8", torch.cat(weights), torch.cat(scales), bias, self.dtype)
        elif stored == "modelopt_int4_awq":
            linear = self._awq(parts, row_parallel, bias)
        else:
            weight = torch.cat(
                [self._plain(f"{p}.weight", shard(self._get(f"{p}.weight"), c)) for p, c in parts]
            )
            mode = {"int4_awq": "int4"}.get(self.quantization, self.quantization)
            amax = None
            if row_parallel and self.shard.parallel and mode in ("int8", "fp8"):
                amax = self.shard.all_reduce_max(row_amax(weight))
            linear = QuantLinear.from_weight(weight, bias, mode, self.dtype, self.group_size, amax)
        if row_parallel and self.shard.parallel:
            return RowParallelLinear(linear, parallel_bias, self.shard)
        return linear

    def _awq(
        self, parts: list[tuple[str, slice]], row_parallel: bool, bias: torch.Tensor | None
    ) -> QuantLinear:
        group = self.group_size
        weights, scales, pre_scales = [], [], []
        for prefix, cut in parts:
            # ModelOpt packs pairs of output rows: rows [a, b) are packed rows [a/2, b/2).
            packed = self._get(f"{prefix}.weight")
            scale = self._get(f"{prefix}.weight_scale")
            pre_scale = self.tensors.get(f"{prefix}.pre_quant_scale")
            if row_parallel:
                if cut.start % group or (cut.stop - cut.start) % group:
                    raise UnsupportedCheckpoint(
                        f"{prefix}: int4 groups of {group} would straddle its tp shards"
                    )
                packed = packed[:, cut]
                scale = scale[:, cut.start // group : cut.stop // group]
                pre_scale = None if pre_scale is None else pre_scale[cut]
            else:
                if cut.start % 2 or cut.stop % 2:
                    raise UnsupportedCheckpoint(
                        f"{prefix}: its tp shards split a pair of packed int4 rows"
                    )
                packed = packed[cut.start // 2 : cut.stop // 2]
                scale = scale[cut]
            weights.append(unpack_int4_rows(packed.to(self.device)))
            scales.append(scale.float().to(self.device))
            pre_scales.append(None if pre_scale is None else pre_scale.to(self.device))
        pre_scale = pre_scales[0]
        if any(
            (s is None) != (pre_scale is None)
            or (s is not None and pre_scale is not None and not torch.equal(s, pre_scale))
            for s in pre_scales
        ):
            raise UnsupportedCheckpoint(
                f"{[p for p, _ in parts]}: fused projections with different AWQ scales"
            )
        # Ours packs pairs along the input.
        return QuantLinear(
            "int4",
            pack_int4(torch.cat(weights)),
            torch.cat(scales),
            bias,
            self.dtype,
            group,
            pre_scale,
        )

    def layer(self, index: int) -> DecoderLayer:
        prefix = f"model.layers.{index}"
        attention, mlp = f"{prefix}.self_attn", f"{prefix}.mlp"
        spec, shard = self.spec, self.shard
        heads, kv_heads = head_rows(spec, shard), kv_head_rows(spec, shard)
        modules: dict[str, nn.Module] = {
            "input_layernorm": self.norm(f"{prefix}.input_layernorm.weight"),
            "post_attention_layernorm": self.norm(f"{prefix}.post_attention_layernorm.weight"),
            "qkv": self.linear(
                [
                    (f"{attention}.q_proj", heads),
                    (f"{attention}.k_proj", kv_heads),
                    (f"{attention}.v_proj", kv_heads),
                ]
            ),
            "o_proj": self.linear([(f"{attention}.o_proj", heads)], row_parallel=True),
        }
        gemma = spec.architecture == "Gemma3ForCausalLM"
        if gemma:
            for name in ("pre_feedforward_layernorm", "post_feedforward_layernorm"):
                modules[name] = self.norm(f"{prefix}.{name}.weight")
        if spec.architecture == "GptOssForCausalLM":
            modules["experts"] = load_gpt_oss_experts(
                spec,
                prefix,
                self.tensors,
                self.quantization,
                self.dtype,
                self.device,
                self.group_size,
                spec.extra["swiglu"],
                shard,
            )
        elif spec.is_expert_layer(index):
            modules["experts"] = load_sparse_moe(
                spec,
                EXPERT_LAYOUTS[spec.architecture],
                prefix,
                self.tensors,
                self.quantization,
                self.dtype,
                self.device,
                self.group_size,
                shard,
            )
        else:
            width = mlp_rows(spec, shard)
            modules["gate_up"] = self.linear(
                [(f"{mlp}.gate_proj", width), (f"{mlp}.up_proj", width)]
            )
            modules["down_proj"] = self.linear([(f"{mlp}.down_proj", width)], row_parallel=True)
        if spec.qk_norm:  # per head_dim: the same on every rank
            modules["q_norm"] = self.norm(f"{attention}.q_norm.weight")
            modules["k_norm"] = self.norm(f"{attention}.k_norm.weight")
        sinks = None
        if spec.attention_sinks:  # one per query head: this rank's heads'
            sinks = self.plain(f"{attention}.sinks")[split(spec.num_heads, shard, "heads")].float()
        return DecoderLayer(shard_spec(spec, shard.world), modules, spec.window_of(index), sinks)

    def norm(self, name: str) -> RMSNorm:
        """An RMSNorm; Gemma's scale by 1 + its weight."""
        weight = self.plain(name)
        if self.spec.architecture == "Gemma3ForCausalLM":
            weight = (1.0 + self._get(name).float()).to(self.dtype)
        return RMSNorm(weight.to(self.device), self.spec.rms_norm_eps)
