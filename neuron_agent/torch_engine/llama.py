"""A compact Llama-family decoder over a paged KV cache.

Llama, Mistral, Qwen2 and Qwen3 differ here only in switches from `ModelSpec` (bias on q/k/v,
RMSNorm on q and k). Weights load straight from safetensors; every projection is a `QuantLinear`
so in-situ quantization is a load-time choice. q/k/v and gate/up are fused into one matmul each.

The forward pass takes a padded batch of sequences, each with some new tokens (one when
decoding, a chunk when prefilling), writes their keys and values into cache slots, and attends
over the slots the batch's `gather` index names.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from neuron_agent.torch_engine.checkpoint import ModelSpec, RopeSpec, shard_spec
from neuron_agent.torch_engine.errors import UnsupportedCheckpoint
from neuron_agent.torch_engine.parallel import (
    RowParallelLinear,
    Shard,
    head_rows,
    kv_head_rows,
    mlp_rows,
)
from neuron_agent.torch_engine.quant import QuantLinear, pack_int4, row_amax, unpack_int4_rows


@dataclass
class AttentionBatch:
    """Where a forward pass reads and writes the KV cache.

    tokens [S, Q] and positions [S, Q]: every sequence brings Q new tokens (one each when
    decoding; one sequence's chunk when prefilling), so there is no padding among them.
    `write_slots` [S, Q] is each token's cache slot.
    `gather` [S, K] lists each sequence's cache slots in position order, `key_valid` [S, K] marks
    real ones (None when all are real and Q is 1: decoding sequences of one length). `fresh` means no sequence has earlier tokens in the cache: attention is then
    plain causal over the new tokens and needs no gather (the memory-efficient path for long
    prompts).
    """

    positions: torch.Tensor
    write_slots: torch.Tensor
    gather: torch.Tensor | None
    key_valid: torch.Tensor | None
    fresh: bool


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


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class RMSNorm(nn.Module):
    def __init__(self, weight: torch.Tensor, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32, scale in the model's dtype: as the reference implementations do.
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)
        return self.weight * normed


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

    def forward(
        self,
        hidden: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        batch: AttentionBatch,
    ) -> torch.Tensor:
        spec = self.spec
        sequences, queries, _ = hidden.shape
        residual = hidden
        qkv = self.qkv(self.input_norm(hidden))
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(sequences, queries, spec.num_heads, spec.head_dim)
        k = k.view(sequences, queries, spec.num_kv_heads, spec.head_dim)
        v = v.view(sequences, queries, spec.num_kv_heads, spec.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin

        # Plain index writes: a boolean mask here cost a device sync per layer on GPUs.
        slots = batch.write_slots.reshape(-1)
        k_cache[slots] = k.reshape(-1, spec.num_kv_heads, spec.head_dim).to(k_cache.dtype)
        v_cache[slots] = v.reshape(-1, spec.num_kv_heads, spec.head_dim).to(v_cache.dtype)

        groups = spec.num_heads // spec.num_kv_heads
        query = q.transpose(1, 2)  # [S, H, Q, D]
        if batch.fresh:
            keys, values = k.transpose(1, 2), v.transpose(1, 2)
            attended = F.scaled_dot_product_attention(
                query, keys, values, is_causal=True, enable_gqa=groups > 1
            )
        else:
            assert batch.gather is not None
            keys = k_cache[batch.gather].to(q.dtype).permute(0, 2, 1, 3)  # [S, KVH, K, D]
            values = v_cache[batch.gather].to(q.dtype).permute(0, 2, 1, 3)
            if batch.key_valid is None:
                # One new token per sequence and every gathered key is real: no mask, which
                # lets SDPA take its fused kernels (a mask with GQA forces the math path).
                attended = F.scaled_dot_product_attention(
                    query, keys, values, enable_gqa=groups > 1
                )
            else:
                # Query i of a sequence sees keys at positions ≤ its own.
                key_positions = torch.arange(keys.shape[2], device=hidden.device)
                mask = (key_positions[None, None, :] <= batch.positions[:, :, None]) & (
                    batch.key_valid[:, None, :]
                )
                attended = F.scaled_dot_product_attention(
                    query, keys, values, attn_mask=mask[:, None], enable_gqa=groups > 1
                )
        attended = attended.transpose(1, 2).reshape(sequences, queries, self.q_size)
        hidden = residual + self.o_proj(attended)

        residual = hidden
        gate, up = self.gate_up(self.post_norm(hidden)).chunk(2, dim=-1)
        return residual + self.down(F.silu(gate) * up)


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
        self.norm = RMSNorm(loader.plain("model.norm.weight"), spec.rms_norm_eps)
        head_name = "model.embed_tokens.weight" if spec.tie_word_embeddings else "lm_head.weight"
        if head_name not in tensors:
            head_name = "model.embed_tokens.weight"
        self.lm_head = loader.head(head_name)
        self.register_buffer(
            "inv_freq",
            rope_inverse_frequencies(spec.rope, spec.head_dim).to(device),
            persistent=False,
        )

    def forward(
        self,
        tokens: torch.Tensor,
        batch: AttentionBatch,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        logits_index: torch.Tensor,
    ) -> torch.Tensor:
        """Run the batch; return float32 logits of the rows `logits_index` picks from [S*Q]."""
        hidden = F.embedding(tokens, self.embed)
        inv_freq: torch.Tensor = self.inv_freq  # type: ignore[assignment]
        freqs = batch.positions.float()[..., None] * inv_freq  # [S, Q, D/2]
        angles = torch.cat((freqs, freqs), dim=-1)[:, :, None, :]
        cos, sin = angles.cos().to(self.dtype), angles.sin().to(self.dtype)
        for layer, (k_cache, v_cache) in zip(self.layers, kv_caches, strict=True):
            hidden = layer(hidden, cos, sin, k_cache, v_cache, batch)
        picked = hidden.reshape(-1, hidden.shape[-1])[logits_index]
        return self.lm_head(self.norm(picked)).float()


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
        spec, shard, eps = self.spec, self.shard, self.spec.rms_norm_eps
        heads, kv_heads, width = (
            head_rows(spec, shard),
            kv_head_rows(spec, shard),
            mlp_rows(spec, shard),
        )
        modules: dict[str, nn.Module] = {
            "input_layernorm": RMSNorm(self.plain(f"{prefix}.input_layernorm.weight"), eps),
            "post_attention_layernorm": RMSNorm(
                self.plain(f"{prefix}.post_attention_layernorm.weight"), eps
            ),
            "qkv": self.linear(
                [
                    (f"{attention}.q_proj", heads),
                    (f"{attention}.k_proj", kv_heads),
                    (f"{attention}.v_proj", kv_heads),
                ]
            ),
            "o_proj": self.linear([(f"{attention}.o_proj", heads)], row_parallel=True),
            "gate_up": self.linear([(f"{mlp}.gate_proj", width), (f"{mlp}.up_proj", width)]),
            "down_proj": self.linear([(f"{mlp}.down_proj", width)], row_parallel=True),
        }
        if spec.qk_norm:  # per head_dim: the same on every rank
            modules["q_norm"] = RMSNorm(self.plain(f"{attention}.q_norm.weight"), eps)
            modules["k_norm"] = RMSNorm(self.plain(f"{attention}.k_norm.weight"), eps)
        return DecoderLayer(shard_spec(spec, shard.world), modules)
