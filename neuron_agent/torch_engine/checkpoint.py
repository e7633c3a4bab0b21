"""Read a checkpoint: config.json → ModelSpec, safetensors → tensors, from a Hugging Face folder;
or both from one GGUF file (`gguf.py`: a source path ending in `.gguf`).

Also recognises NVIDIA ModelOpt exports (`quantization_config.quant_method == "modelopt"`,
FP8 or INT4-AWQ) so they are served as exported, without re-quantizing.

This module imports no torch: the neuron agent reads specs with it to estimate memory.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

from cortex.hf_config import ConfigError, Dimensions, Rope, read_shape
from neuron_agent.torch_engine.errors import UnsupportedCheckpoint
from neuron_agent.torch_engine.gguf import is_gguf, read_gguf_spec, read_gguf_tensors

# Architecture → the switches that distinguish it from plain Llama.
ARCHITECTURES: dict[str, dict[str, bool]] = {
    "Gemma3ForCausalLM": {"qkv_bias": False, "qk_norm": True},
    "GptOssForCausalLM": {"qkv_bias": True, "qk_norm": False},
    "LlamaForCausalLM": {"qkv_bias": False, "qk_norm": False},
    "MistralForCausalLM": {"qkv_bias": False, "qk_norm": False},
    "MixtralForCausalLM": {"qkv_bias": False, "qk_norm": False},
    "Qwen2ForCausalLM": {"qkv_bias": True, "qk_norm": False},
    "Qwen3ForCausalLM": {"qkv_bias": False, "qk_norm": True},
    "Qwen3MoeForCausalLM": {"qkv_bias": False, "qk_norm": True},
}


@dataclass(frozen=True)
class ExpertLayout:
    """Where a mixture-of-experts checkpoint keeps its router and experts (per layer prefix):
    `{mlp}.{router}.weight`, `{mlp}.experts.{e}.{gate|up|down}.weight`."""

    mlp: str
    router: str
    gate: str
    up: str
    down: str


# Mixture-of-experts architectures: their tensor names. Both route the same way (softmax over
# every expert, the top k kept; Mixtral always renormalises them, Qwen3-MoE when
# `norm_topk_prob`).
EXPERT_LAYOUTS: dict[str, ExpertLayout] = {
    "MixtralForCausalLM": ExpertLayout("block_sparse_moe", "gate", "w1", "w3", "w2"),
    "Qwen3MoeForCausalLM": ExpertLayout("mlp", "gate", "gate_proj", "up_proj", "down_proj"),
}

DTYPE_NAMES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class RopeSpec:
    theta: float
    kind: str = "default"  # default | linear | llama3 | yarn
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192
    # YaRN (gpt-oss): the ramp between interpolated and extrapolated frequencies, and the
    # factor cos and sin are scaled by (None: 0.1 · ln(factor) + 1).
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    truncate: bool = True
    attention_factor: float | None = None


@dataclass(frozen=True)
class ModelSpec(Dimensions):
    architecture: str
    rms_norm_eps: float
    context_length: int
    rope: RopeSpec
    qkv_bias: bool
    qk_norm: bool
    tie_word_embeddings: bool
    torch_dtype: str
    eos_token_ids: tuple[int, ...]
    # "modelopt_fp8" | "modelopt_int4_awq" | None: how the stored weights are quantized.
    stored_quantization: str | None = None
    quant_group_size: int = 128
    # Mixture of experts (0 experts: a dense model): how many, how many each token uses, each
    # one's MLP width, whether the chosen ones' weights are renormalised to sum to one, and the
    # layers that keep a dense MLP of `intermediate_size` instead.
    num_experts: int = 0
    experts_per_token: int = 0
    expert_intermediate_size: int = 0
    normalize_expert_weights: bool = True
    dense_layers: tuple[int, ...] = ()
    # Per layer, the sliding window it attends over (0: every position; empty: none has one),
    # and the rotary embedding of the windowed layers when it differs (Gemma 3).
    layer_windows: tuple[int, ...] = ()
    local_rope: RopeSpec | None = None
    # gpt-oss: a learnt sink logit per attention head.
    attention_sinks: bool = False
    # The attention's score scale (0: head_dim ** -0.5).
    query_scale: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def window_of(self, layer: int) -> int:
        return self.layer_windows[layer] if self.layer_windows else 0

    @property
    def mixture_of_experts(self) -> bool:
        return self.num_experts > 0

    def is_expert_layer(self, index: int) -> bool:
        return self.mixture_of_experts and index not in self.dense_layers

    def parameter_count(self, experts: int | None = None) -> int:
        """Every parameter; with `experts`, counting only that many experts per layer (the
        active parameters of one token: `experts_per_token`)."""
        attention = self.hidden_size * self.head_dim * (2 * self.num_heads + 2 * self.num_kv_heads)
        dense = 3 * self.hidden_size * self.intermediate_size
        counted = self.num_experts if experts is None else experts
        moe = (
            3 * self.hidden_size * self.expert_intermediate_size * counted
            + self.hidden_size * self.num_experts  # the router
        )
        expert_layers = sum(self.is_expert_layer(i) for i in range(self.num_layers))
        mlp = expert_layers * moe + (self.num_layers - expert_layers) * dense
        embeddings = self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * attention + mlp + embeddings

    def kv_bytes_per_token(self, element_bytes: int, scale_bytes: int = 0) -> int:
        """Keys and values of one token in every layer; `scale_bytes` per vector (FP8)."""
        per_vector = self.head_dim * element_bytes + scale_bytes
        return 2 * self.num_layers * self.num_kv_heads * per_vector


def _rope(rope: Rope) -> RopeSpec:
    kind = rope.kind
    if kind not in ("default", "linear", "llama3", "yarn"):
        raise UnsupportedCheckpoint(
            f"rope scaling type {kind!r} is not supported by the torch engine "
            "(supported: default, linear, llama3, yarn)"
        )
    merged = rope.scaling or {}
    attention_factor = merged.get("attention_factor")
    if kind == "yarn" and (merged.get("mscale") or merged.get("mscale_all_dim")):
        raise UnsupportedCheckpoint("yarn rope with mscale is not supported by the torch engine")
    return RopeSpec(
        theta=rope.theta,
        kind=kind,
        factor=float(merged.get("factor") or 1.0),
        low_freq_factor=float(merged.get("low_freq_factor", 1.0)),
        high_freq_factor=float(merged.get("high_freq_factor", 4.0)),
        original_max_position=int(merged.get("original_max_position_embeddings", 8192)),
        beta_fast=float(merged.get("beta_fast") or 32.0),
        beta_slow=float(merged.get("beta_slow") or 1.0),
        truncate=bool(merged.get("truncate", True)),
        attention_factor=None if attention_factor is None else float(attention_factor),
    )


def _layer_types(config: dict[str, Any], layers: int, pattern: int) -> list[str]:
    """Each layer's "sliding_attention" or "full_attention"; older configs name a pattern
    (every `pattern`-th layer full) instead of listing them."""
    types = config.get("layer_types")
    if types:
        return [str(t) for t in types]
    pattern = int(config.get("sliding_window_pattern") or pattern)
    return [
        "full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(layers)
    ]


def _attention_variant(
    architecture: str, config: dict[str, Any], shape_rope: Rope, layers: int
) -> dict[str, Any]:
    """Gemma 3's and gpt-oss's attention: which layers slide over a window, Gemma's two rotary
    embeddings and query scale, gpt-oss's sinks ({} for the others)."""
    if architecture not in ("Gemma3ForCausalLM", "GptOssForCausalLM"):
        return {}
    if config.get("attn_logit_softcapping") or config.get("final_logit_softcapping"):
        raise UnsupportedCheckpoint("logit soft-capping is not supported by the torch engine")
    window = int(config.get("sliding_window") or 0)
    types = _layer_types(config, layers, 6 if architecture == "Gemma3ForCausalLM" else 2)
    windows = tuple(window if t == "sliding_attention" else 0 for t in types)
    if architecture == "GptOssForCausalLM":
        return {"layer_windows": windows, "attention_sinks": True}
    parameters = config.get("rope_parameters") or {}
    if "full_attention" in parameters:  # transformers 5: one set per layer type
        full, local = parameters["full_attention"], parameters.get("sliding_attention", {})
        global_rope = Rope(float(full.get("rope_theta", 1_000_000.0)), full)
        local_rope = Rope(float(local.get("rope_theta", 10_000.0)), local)
    else:  # the published configs: rope_theta + rope_scaling, rope_local_base_freq
        global_rope = Rope(float(config.get("rope_theta", 1_000_000.0)), shape_rope.scaling)
        local_rope = Rope(float(config.get("rope_local_base_freq", 10_000.0)), None)
    return {
        "layer_windows": windows,
        "query_scale": float(config.get("query_pre_attn_scalar") or 256) ** -0.5,
        "rope": _rope(global_rope),
        "local_rope": _rope(local_rope),
    }


def read_spec(folder: Path) -> ModelSpec:
    """The spec of a Hugging Face checkpoint folder or of a GGUF file."""
    if is_gguf(folder):
        return read_gguf_spec(folder)
    config_path = folder / "config.json"
    if not folder.is_dir():
        raise UnsupportedCheckpoint(f"checkpoint folder {folder} does not exist")
    try:
        config, shape = read_shape(folder)
    except ConfigError as error:
        raise UnsupportedCheckpoint(str(error)) from None
    architecture = shape.architecture
    if architecture not in ARCHITECTURES:
        raise UnsupportedCheckpoint(
            f"architecture {architecture} is not supported by the torch engine "
            f"(supported: {', '.join(sorted(ARCHITECTURES))})"
        )
    switches = ARCHITECTURES[architecture]
    try:
        context = shape.max_position_embeddings
        sliding = config.get("sliding_window")
        attention = _attention_variant(architecture, config, shape.rope, shape.num_layers)
        windowed = "layer_windows" in attention
        if (
            sliding
            and not windowed
            and config.get("use_sliding_window", True)
            and int(sliding) < context
        ):
            # No sliding-window attention here: serve the window it was trained for, no more.
            context = int(sliding)
        eos = config.get("eos_token_id")
        eos_ids = tuple(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if shape.dtype not in DTYPE_NAMES:
            raise UnsupportedCheckpoint(f"{config_path}: dtype {shape.dtype} is not supported")
        stored, group = _stored_quantization(folder, config)
        experts = _experts(architecture, config, shape.num_layers)
        if experts and stored not in (None, "mxfp4"):
            raise UnsupportedCheckpoint(
                f"{config_path}: stored ({stored}) mixture-of-experts weights are not supported "
                "(serve the unquantized checkpoint with in-situ quantization)"
            )
        return ModelSpec(
            **shape.dimensions(),
            architecture=architecture,
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            context_length=context,
            rope=attention.pop("rope", None) or _rope(shape.rope),
            qkv_bias=bool(config.get("attention_bias", switches["qkv_bias"])),
            qk_norm=switches["qk_norm"],
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            torch_dtype=shape.dtype,
            eos_token_ids=tuple(int(i) for i in eos_ids),
            stored_quantization=stored,
            quant_group_size=group,
            **experts,
            **attention,
        )
    except KeyError as error:
        raise UnsupportedCheckpoint(f"{config_path} lacks {error.args[0]}") from None


def _experts(architecture: str, config: dict[str, Any], layers: int) -> dict[str, Any]:
    """ModelSpec's mixture-of-experts fields from config.json ({} for a dense model)."""
    if architecture == "MixtralForCausalLM":
        return {
            "num_experts": int(config["num_local_experts"]),
            "experts_per_token": int(config["num_experts_per_tok"]),
            "expert_intermediate_size": int(config["intermediate_size"]),
        }
    if architecture == "GptOssForCausalLM":
        return {
            "num_experts": int(config["num_local_experts"]),
            "experts_per_token": int(config["num_experts_per_tok"]),
            "expert_intermediate_size": int(config["intermediate_size"]),
            "extra": {
                "swiglu": (
                    float(config.get("swiglu_alpha", 1.702)),
                    float(config.get("swiglu_limit", 7.0)),
                )
            },
        }
    if architecture == "Qwen3MoeForCausalLM":
        step = int(config.get("decoder_sparse_step") or 1)
        only_dense = {int(i) for i in config.get("mlp_only_layers") or []}
        return {
            # Qwen's own configs say num_experts; transformers 5 writes num_local_experts.
            "num_experts": int(config.get("num_experts") or config["num_local_experts"]),
            "experts_per_token": int(config["num_experts_per_tok"]),
            "expert_intermediate_size": int(config["moe_intermediate_size"]),
            "normalize_expert_weights": bool(config.get("norm_topk_prob", False)),
            "dense_layers": tuple(i for i in range(layers) if i in only_dense or (i + 1) % step),
        }
    return {}


def _stored_quantization(folder: Path, config: dict[str, Any]) -> tuple[str | None, int]:
    quant = config.get("quantization_config")
    if not quant:
        return None, 128
    method = quant.get("quant_method")
    if method == "mxfp4":  # gpt-oss: its experts' weights, four bits and a scale per 32
        return "mxfp4", 32
    if method != "modelopt":
        raise UnsupportedCheckpoint(
            f"checkpoint quantization {method!r} is not supported "
            "(supported: ModelOpt FP8 and INT4-AWQ exports)"
        )
    algo = str(quant.get("quant_algo") or "")
    group = int(quant.get("group_size") or 128)
    hf_quant = folder / "hf_quant_config.json"
    if hf_quant.exists():
        details = json.loads(hf_quant.read_text(encoding="utf-8")).get("quantization", {})
        algo = str(details.get("quant_algo") or algo)
        group = int(details.get("group_size") or group)
    if algo.upper() == "FP8":
        return "modelopt_fp8", group
    if algo.upper() in ("W4A16_AWQ", "INT4_AWQ"):
        return "modelopt_int4_awq", group
    raise UnsupportedCheckpoint(f"ModelOpt quantization {algo!r} is not supported")


def read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of the checkpoint under Hugging Face names: memory-mapped safetensors, or a
    GGUF file's tensors dequantized."""
    from safetensors import safe_open

    if is_gguf(folder):
        return read_gguf_tensors(folder)

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise UnsupportedCheckpoint(
            f"{folder} has no .safetensors files (other formats: a .gguf file as the source)"
        )
    tensors: dict[str, torch.Tensor] = {}
    for path in files:
        with safe_open(str(path), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
                tensors[name] = handle.get_tensor(name)
    return tensors


def shard_spec(spec: ModelSpec, tp: int) -> ModelSpec:
    """The sizes one of `tp` tensor-parallel ranks holds: its share of the attention heads and
    of the MLP width (every expert's too: each rank holds a slice of every expert), and its kv heads — divided across ranks, or, when there are fewer kv heads
    than ranks, one kv head per rank, each replicated on tp / kv_heads ranks."""
    if tp == 1:
        return spec
    problems = []
    if spec.num_heads % tp:
        problems.append(f"its {spec.num_heads} attention heads")
    if spec.num_kv_heads % tp and tp % spec.num_kv_heads:
        problems.append(f"its {spec.num_kv_heads} kv heads (nor do they divide tp)")
    dense = not spec.mixture_of_experts or spec.dense_layers
    if dense and spec.intermediate_size % tp:
        problems.append(f"its MLP width {spec.intermediate_size}")
    if spec.expert_intermediate_size % tp:
        problems.append(f"its experts' MLP width {spec.expert_intermediate_size}")
    if problems:
        raise UnsupportedCheckpoint(f"tp = {tp} does not divide " + " or ".join(problems))
    return replace(
        spec,
        num_heads=spec.num_heads // tp,
        num_kv_heads=max(1, spec.num_kv_heads // tp),
        intermediate_size=spec.intermediate_size // tp if dense else spec.intermediate_size,
        expert_intermediate_size=spec.expert_intermediate_size // tp,
    )


def estimate_weight_bytes(spec: ModelSpec, quantization: str, dtype_bytes: int, tp: int = 1) -> int:
    """Bytes the weights take once loaded with the given in-situ quantization; at tp > 1, on
    rank 0, the largest rank (each holds its shard of the linear layers and the whole
    embedding; rank 0 also holds the output head)."""
    spec = shard_spec(spec, tp)
    params = spec.parameter_count()
    embeddings = spec.vocab_size * spec.hidden_size * (1 if spec.tie_word_embeddings else 2)
    linear = params - embeddings
    per_weight = {"none": dtype_bytes, "int8": 1, "fp8": 1, "int4": 0.5, "int4_awq": 0.5}
    stored = spec.stored_quantization
    if stored == "modelopt_fp8":
        quantization = "fp8"
    elif stored == "modelopt_int4_awq":
        quantization = "int4"
    factor = per_weight.get(quantization, dtype_bytes)
    if stored == "mxfp4":
        # gpt-oss: the experts as stored (4 bits and a byte of scale per 32), the rest plain.
        experts = params - spec.parameter_count(experts=0)
        return math.ceil(experts * 17 / 32 + (params - experts) * dtype_bytes)
    return math.ceil(linear * factor + embeddings * dtype_bytes)
