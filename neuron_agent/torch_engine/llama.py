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

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.bias import causal_lower_right

from neuron_agent.torch_engine import kernels
from neuron_agent.torch_engine.checkpoint import ModelSpec, RopeSpec
from neuron_agent.torch_engine.errors import UnsupportedCheckpoint
from neuron_agent.torch_engine.quant import QuantLinear, pack_int4, unpack_int4_rows


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
    names its chunks instead; attention runs per chunk over the chunk and what precedes it.
    """

    positions: torch.Tensor
    write_slots: torch.Tensor
    block_size: int = 16
    block_tables: torch.Tensor | None = None
    seq_lens: torch.Tensor | None = None
    decode_splits: int = 1
    chunks: tuple[PrefillChunk, ...] = ()

    @property
    def decoding(self) -> bool:
        return self.block_tables is not None


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
    return inv_freq.float()


def rope_table(rope: RopeSpec, head_dim: int, positions: int) -> torch.Tensor:
    """[positions, head_dim] float32: cos of each frequency, then sin (the rotary kernels' table)."""
    angles = torch.arange(positions).float()[:, None] * rope_inverse_frequencies(rope, head_dim)
    return torch.cat((angles.cos(), angles.sin()), dim=-1)


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


def _prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    batch: ForwardBatch,
    groups: int,
) -> torch.Tensor:
    """Causal attention of each chunk's queries over its own keys and the cached ones before it.
    q [T, H, D] → [T, H, D]. Compute-bound, so keys are gathered per chunk (flash kernels need
    them contiguous); chunks that all start their sequences and have one length go in one call."""
    chunks = batch.chunks
    if all(c.key_slots is None for c in chunks) and len({c.length for c in chunks}) == 1:
        count, length = len(chunks), chunks[0].length
        keys = k_cache[batch.write_slots].to(q.dtype)
        values = v_cache[batch.write_slots].to(q.dtype)
        shape = (count, length, *q.shape[1:])
        kv_shape = (count, length, *keys.shape[1:])
        attended = F.scaled_dot_product_attention(
            q.view(shape).transpose(1, 2),
            keys.view(kv_shape).transpose(1, 2),
            values.view(kv_shape).transpose(1, 2),
            is_causal=True,
            enable_gqa=groups > 1,
        )
        return attended.transpose(1, 2).reshape(q.shape)
    out = torch.empty_like(q)
    for chunk in chunks:
        rows = slice(chunk.start, chunk.start + chunk.length)
        slots = batch.write_slots[rows] if chunk.key_slots is None else chunk.key_slots
        keys = k_cache[slots].to(q.dtype).transpose(0, 1)[None]  # [1, KVH, K, D]
        values = v_cache[slots].to(q.dtype).transpose(0, 1)[None]
        query = q[rows].transpose(0, 1)[None]  # [1, H, Q, D]
        if chunk.key_slots is None:
            attended = F.scaled_dot_product_attention(
                query, keys, values, is_causal=True, enable_gqa=groups > 1
            )
        else:
            # The chunk's last query sees every key; earlier ones one fewer each (lower right).
            keys = keys.repeat_interleave(groups, dim=1)
            values = values.repeat_interleave(groups, dim=1)
            mask = causal_lower_right(query.shape[2], keys.shape[2])
            attended = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask)
        out[rows] = attended[0].transpose(0, 1)
    return out


class DecoderLayer(nn.Module):
    def __init__(self, spec: ModelSpec, weights: dict[str, nn.Module]) -> None:
        super().__init__()
        self.spec = spec
        self.input_norm = weights["input_layernorm"]
        self.post_norm = weights["post_attention_layernorm"]
        self.qkv = weights["qkv"]
        self.o_proj = weights["o_proj"]
        self.gate_up = weights["gate_up"]
        self.down = weights["down_proj"]
        self.q_norm = weights.get("q_norm")
        self.k_norm = weights.get("k_norm")
        self.q_size = spec.num_heads * spec.head_dim
        self.kv_size = spec.num_kv_heads * spec.head_dim
        self.scale = spec.head_dim**-0.5

    def forward(
        self,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        cos_sin: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
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
            q, k, v, cos_sin, batch.positions, k_cache, v_cache, batch.write_slots
        )
        groups = spec.num_heads // spec.num_kv_heads
        if batch.decoding:
            assert batch.block_tables is not None and batch.seq_lens is not None
            attended = kernels.paged_decode_attention(
                q,
                k_cache,
                v_cache,
                batch.block_tables,
                batch.seq_lens,
                batch.block_size,
                self.scale,
                batch.decode_splits,
            )
        else:
            attended = _prefill_attention(q, k_cache, v_cache, batch, groups)
        attention_out = self.o_proj(attended.reshape(tokens, self.q_size))
        normed, residual = self.post_norm(attention_out, residual)
        return self.down(kernels.silu_and_mul(self.gate_up(normed))), residual


class LlamaModel(nn.Module):
    def __init__(
        self,
        spec: ModelSpec,
        tensors: dict[str, torch.Tensor],
        quantization: str,
        dtype: torch.dtype,
        device: torch.device,
        group_size: int = 128,
    ) -> None:
        super().__init__()
        self.spec = spec
        self.dtype = dtype
        self.device = device
        loader = _WeightLoader(spec, tensors, quantization, dtype, device, group_size)
        self.embed = nn.Parameter(loader.plain("model.embed_tokens.weight"), requires_grad=False)
        self.layers = nn.ModuleList(loader.layer(i) for i in range(spec.num_layers))
        self.norm = RMSNorm(loader.plain("model.norm.weight"), spec.rms_norm_eps)
        head_name = "model.embed_tokens.weight" if spec.tie_word_embeddings else "lm_head.weight"
        if head_name not in tensors:
            head_name = "model.embed_tokens.weight"
        # The output head stays unquantized: it is small next to the body and sets the logits.
        self.lm_head = QuantLinear.from_weight(loader.plain(head_name), None, "none", dtype)
        self.register_buffer(
            "cos_sin",
            rope_table(spec.rope, spec.head_dim, spec.context_length).to(device),
            persistent=False,
        )

    def forward(
        self,
        tokens: torch.Tensor,
        batch: ForwardBatch,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        logits_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run the batch; return float32 logits of the rows `logits_index` picks from [T] (every
        row when None)."""
        hidden = F.embedding(tokens, self.embed)
        residual: torch.Tensor | None = None
        cos_sin: torch.Tensor = self.cos_sin  # type: ignore[assignment]
        for layer, (k_cache, v_cache) in zip(self.layers, kv_caches, strict=True):
            hidden, residual = layer(hidden, residual, cos_sin, k_cache, v_cache, batch)
        assert residual is not None
        if logits_index is not None:
            hidden, residual = hidden[logits_index], residual[logits_index]
        normed, _ = self.norm(hidden, residual)
        return self.lm_head(normed).float()


class _WeightLoader:
    """Turns checkpoint tensors into modules, quantizing or reading stored quantization."""

    def __init__(
        self,
        spec: ModelSpec,
        tensors: dict[str, torch.Tensor],
        quantization: str,
        dtype: torch.dtype,
        device: torch.device,
        group_size: int,
    ) -> None:
        self.spec = spec
        self.tensors = tensors
        self.quantization = quantization
        self.dtype = dtype
        self.device = device
        self.group_size = group_size

    def _get(self, name: str) -> torch.Tensor:
        try:
            return self.tensors[name]
        except KeyError:
            raise UnsupportedCheckpoint(f"the checkpoint lacks tensor {name}") from None

    def plain(self, name: str) -> torch.Tensor:
        tensor = self._get(name)
        if tensor.dtype in (torch.float8_e4m3fn, torch.uint8, torch.int8):
            raise UnsupportedCheckpoint(f"tensor {name} is quantized where a plain one is expected")
        return tensor.to(device=self.device, dtype=self.dtype)

    def _optional(self, name: str) -> torch.Tensor | None:
        tensor = self.tensors.get(name)
        return None if tensor is None else tensor.to(self.device)

    def linear(self, prefixes: list[str]) -> QuantLinear:
        """One QuantLinear for the concatenation of the named projections (fused q/k/v etc.)."""
        stored = self.spec.stored_quantization
        biases = [self._optional(f"{p}.bias") for p in prefixes]
        bias = None if any(b is None for b in biases) else torch.cat(biases)  # type: ignore[arg-type]
        if stored == "modelopt_fp8":
            weights = [self._get(f"{p}.weight").to(self.device) for p in prefixes]
            scales = [
                self._get(f"{p}.weight_scale").float().to(self.device).expand(w.shape[0])
                for p, w in zip(prefixes, weights, strict=True)
            ]
            return QuantLinear("fp8", torch.cat(weights), torch.cat(scales), bias, self.dtype)
        if stored == "modelopt_int4_awq":
            weights = [self._get(f"{p}.weight").to(self.device) for p in prefixes]
            scales = [self._get(f"{p}.weight_scale").float().to(self.device) for p in prefixes]
            pre_scales = [self._optional(f"{p}.pre_quant_scale") for p in prefixes]
            pre_scale = pre_scales[0]
            if any(
                (s is None) != (pre_scale is None)
                or (s is not None and pre_scale is not None and not torch.equal(s, pre_scale))
                for s in pre_scales
            ):
                raise UnsupportedCheckpoint(
                    f"{prefixes}: fused projections with different AWQ scales"
                )
            # ModelOpt packs pairs of output rows; ours packs pairs along the input.
            packed = pack_int4(torch.cat([unpack_int4_rows(w) for w in weights]))
            return QuantLinear(
                "int4", packed, torch.cat(scales), bias, self.dtype, self.group_size, pre_scale
            )
        weight = torch.cat([self.plain(f"{p}.weight") for p in prefixes])
        mode = {"int4_awq": "int4"}.get(self.quantization, self.quantization)
        return QuantLinear.from_weight(weight, bias, mode, self.dtype, self.group_size)

    def layer(self, index: int) -> DecoderLayer:
        prefix = f"model.layers.{index}"
        attention, mlp = f"{prefix}.self_attn", f"{prefix}.mlp"
        eps = self.spec.rms_norm_eps
        modules: dict[str, nn.Module] = {
            "input_layernorm": RMSNorm(self.plain(f"{prefix}.input_layernorm.weight"), eps),
            "post_attention_layernorm": RMSNorm(
                self.plain(f"{prefix}.post_attention_layernorm.weight"), eps
            ),
            "qkv": self.linear(
                [f"{attention}.q_proj", f"{attention}.k_proj", f"{attention}.v_proj"]
            ),
            "o_proj": self.linear([f"{attention}.o_proj"]),
            "gate_up": self.linear([f"{mlp}.gate_proj", f"{mlp}.up_proj"]),
            "down_proj": self.linear([f"{mlp}.down_proj"]),
        }
        if self.spec.qk_norm:
            modules["q_norm"] = RMSNorm(self.plain(f"{attention}.q_norm.weight"), eps)
            modules["k_norm"] = RMSNorm(self.plain(f"{attention}.k_norm.weight"), eps)
        return DecoderLayer(self.spec, modules)
