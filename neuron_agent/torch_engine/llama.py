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

from neuron_agent.torch_engine.checkpoint import ModelSpec, RopeSpec
from neuron_agent.torch_engine.errors import UnsupportedCheckpoint
from neuron_agent.torch_engine.quant import QuantLinear, pack_int4, unpack_int4_rows


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
