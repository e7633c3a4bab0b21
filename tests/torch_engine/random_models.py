"""Small random checkpoints for the tensor-parallel tests: written by transformers itself, and
copies of them in ModelOpt's Hugging Face export layouts (FP8, INT4-AWQ) built by hand from the
format facts that tests/build_engines/test_build_engine_torch_export.py checks against ModelOpt."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

# Four layers; widths that tp = 2 divides and int4 groups of 32 fit in every shard.
SHAPE: dict[str, Any] = dict(
    vocab_size=512,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=4,
    num_attention_heads=4,
    max_position_embeddings=2048,
)
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def write_random_model(kind: str, folder: Path, kv_heads: int = 2) -> Path:
    """A random `qwen2` (q/k/v biases) or `llama` checkpoint with non-trivial norms and biases."""
    if (folder / "config.json").exists():
        return folder
    torch.manual_seed(0)
    config_type = Qwen2Config if kind == "qwen2" else LlamaConfig
    config = config_type(**SHAPE, num_key_value_heads=kv_heads)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                parameter.add_(torch.randn_like(parameter) * 0.1)
    model.save_pretrained(folder)
    return folder


def _linear_names(tensors: dict[str, torch.Tensor]) -> list[str]:
    return [
        n[: -len(".weight")] for n in tensors if n.endswith(tuple(f"{p}.weight" for p in LINEARS))
    ]


def _write_export(
    source: Path, folder: Path, tensors: dict[str, torch.Tensor], quantization: dict[str, Any]
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "model.safetensors"))
    config = json.loads((source / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "modelopt", **quantization}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "hf_quant_config.json").write_text(json.dumps({"quantization": quantization}))
    return folder


def write_fp8_export(source: Path, folder: Path) -> Path:
    """FP8: float8_e4m3fn weights with one 0-dim float32 `weight_scale` per linear."""
    tensors = load_file(str(source / "model.safetensors"))
    for name in _linear_names(tensors):
        weight = tensors[f"{name}.weight"]
        scale = weight.abs().amax() / 448.0
        tensors[f"{name}.weight"] = (weight / scale).to(torch.float8_e4m3fn)
        tensors[f"{name}.weight_scale"] = scale.float().reshape(())
        tensors[f"{name}.input_scale"] = torch.tensor(1.0)
    return _write_export(source, folder, tensors, {"quant_algo": "FP8"})


def write_int4_awq_export(source: Path, folder: Path, group: int) -> Path:
    """INT4-AWQ: uint8 [out/2, in] holding output rows 2i (low nibble) and 2i+1 (high), signed;
    float32 `weight_scale` [out, in/group]; `pre_quant_scale` [in] on o_proj and down_proj."""
    tensors = load_file(str(source / "model.safetensors"))
    generator = torch.Generator().manual_seed(3)
    for name in _linear_names(tensors):
        weight = tensors[f"{name}.weight"].float()
        out_features, in_features = weight.shape
        grouped = weight.reshape(out_features, in_features // group, group)
        scale = grouped.abs().amax(dim=2).clamp(min=1e-8) / 7.0
        values = torch.round(grouped / scale[:, :, None]).clamp(-8, 7).to(torch.int16)
        nibbles = (values.reshape(out_features, in_features) & 0xF).to(torch.uint8)
        tensors[f"{name}.weight"] = nibbles[0::2] | (nibbles[1::2] << 4)
        tensors[f"{name}.weight_scale"] = scale
        if name.endswith(("o_proj", "down_proj")):
            tensors[f"{name}.pre_quant_scale"] = 0.5 + torch.rand(in_features, generator=generator)
    return _write_export(source, folder, tensors, {"quant_algo": "W4A16_AWQ", "group_size": group})
