"""Write a Hugging Face Llama checkpoint of a realistic shape with random weights.

Speed does not depend on the weights' values, and no real weights can be downloaded here, so
GPU benchmarks build these on the device:

    python benchmarks/random_checkpoint.py --shape llama-3.1-8b --out /tmp/llama8b
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

SHAPES: dict[str, dict[str, Any]] = {
    "llama-3.1-8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        max_position_embeddings=131072,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    ),
    "llama-3.2-1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        max_position_embeddings=131072,
        rope_theta=500000.0,
        tie_word_embeddings=True,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    ),
}


def write(shape: str, out: Path, device: str) -> None:
    spec = SHAPES[shape]
    out.mkdir(parents=True, exist_ok=True)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "torch_dtype": "bfloat16",
        "rms_norm_eps": 1e-5,
        "bos_token_id": 128000,
        "eos_token_id": 128001,
        "tie_word_embeddings": False,
        **spec,
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    hidden, inter = spec["hidden_size"], spec["intermediate_size"]
    heads, kv_heads = spec["num_attention_heads"], spec["num_key_value_heads"]
    head_dim = hidden // heads
    generator = torch.Generator(device=device).manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        scale = shape[-1] ** -0.5
        tensor: torch.Tensor = (
            (torch.randn(*shape, generator=generator, device=device) * scale)
            .to(torch.bfloat16)
            .cpu()
        )
        return tensor

    shard: dict[str, torch.Tensor] = {
        "model.embed_tokens.weight": rand(spec["vocab_size"], hidden),
        "model.norm.weight": torch.ones(hidden, dtype=torch.bfloat16),
    }
    if not config["tie_word_embeddings"]:
        shard["lm_head.weight"] = rand(spec["vocab_size"], hidden)
    save_file(shard, str(out / "model-embed.safetensors"))
    weight_map = dict.fromkeys(shard, "model-embed.safetensors")
    for layer in range(spec["num_hidden_layers"]):
        p = f"model.layers.{layer}"
        tensors = {
            f"{p}.self_attn.q_proj.weight": rand(heads * head_dim, hidden),
            f"{p}.self_attn.k_proj.weight": rand(kv_heads * head_dim, hidden),
            f"{p}.self_attn.v_proj.weight": rand(kv_heads * head_dim, hidden),
            f"{p}.self_attn.o_proj.weight": rand(hidden, heads * head_dim),
            f"{p}.mlp.gate_proj.weight": rand(inter, hidden),
            f"{p}.mlp.up_proj.weight": rand(inter, hidden),
            f"{p}.mlp.down_proj.weight": rand(hidden, inter),
            f"{p}.input_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16),
            f"{p}.post_attention_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16),
        }
        save_file(tensors, str(out / f"model-layer{layer:03d}.safetensors"))
        weight_map.update(dict.fromkeys(tensors, f"model-layer{layer:03d}.safetensors"))
    # The index transformers looks for beside sharded weights (the peer in benchmarks/gpu).
    index = {"metadata": {}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama-3.1-8b")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    write(args.shape, args.out, args.device)


if __name__ == "__main__":
    main()
