"""Llama, Mistral, Qwen2, Qwen3 and the mixture-of-experts Qwen3-MoE and Mixtral checkpoints:
the engine's logits equal transformers' own forward pass (float32, random small models written
by transformers itself), and a checkpoint it cannot serve fails with one sentence."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    GptOssConfig,
    LlamaConfig,
    MistralConfig,
    MixtralConfig,
    PretrainedConfig,
    Qwen2Config,
    Qwen3Config,
    Qwen3MoeConfig,
)

from neuron_agent.torch_engine.errors import UnsupportedCheckpoint
from neuron_agent.torch_engine.loader import EngineOptions, build_engine

SHAPE: dict[str, Any] = dict(
    vocab_size=512,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=2048,
)
CONFIGS: dict[str, Callable[[], PretrainedConfig]] = {
    # transformers 5 takes `rope_scaling` through **kwargs (its typed field is rope_parameters).
    "llama": lambda: LlamaConfig(  # type: ignore[call-arg]
        **SHAPE,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 256,
        },
    ),
    "mistral": lambda: MistralConfig(**SHAPE, sliding_window=None),
    "qwen2": lambda: Qwen2Config(**SHAPE, tie_word_embeddings=True),
    "qwen3": lambda: Qwen3Config(**SHAPE, head_dim=48),
    # Eight experts, two a token; Qwen3-MoE's layer 1 keeps a dense MLP (mlp_only_layers).
    # (`head_dim` goes through **kwargs: transformers' typed Qwen3MoeConfig lacks it.)
    "qwen3_moe": lambda: Qwen3MoeConfig(  # type: ignore[call-arg]
        **SHAPE,
        head_dim=48,
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=64,
        norm_topk_prob=True,
        mlp_only_layers=[1],
    ),
    "mixtral": lambda: MixtralConfig(**SHAPE, num_local_experts=4, num_experts_per_tok=2),
    # A window of 8 on the first layer (the prompts are 40 long), its own rope there, the
    # global one linearly scaled; √hidden embeddings, four norms a layer, GELU-tanh.
    "gemma3": lambda: Gemma3TextConfig(
        **SHAPE,
        head_dim=32,
        sliding_window=8,
        layer_types=["sliding_attention", "full_attention"],
        rope_parameters={
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
        },
    ),
    # Sinks, a window of 8 on layer 0, YaRN rope, biased attention, router and experts.
    "gpt_oss": lambda: GptOssConfig(
        **SHAPE, head_dim=32, num_local_experts=4, num_experts_per_tok=2, sliding_window=8
    ),
}


def write_model(kind: str, folder: Path) -> Path:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(CONFIGS[kind](), dtype=torch.float32)
    with torch.no_grad():  # non-trivial norms and biases, so every switch matters
        for name, parameter in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                parameter.add_(torch.randn_like(parameter) * 0.1)
            elif "sinks" in name:
                parameter.add_(torch.randn_like(parameter))
            elif "experts" in name or name.endswith(("gate.weight", "router.weight")):
                # Routers with clear preferences and experts that move the logits: at the
                # initial scale the expert outputs hid inside the tolerance.
                parameter.mul_(8.0)
    model.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_engine_logits_equal_transformers(kind: str, tmp_path: Path) -> None:
    folder = write_model(kind, tmp_path / kind)
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    prompt = torch.randint(
        0, SHAPE["vocab_size"], (40,), generator=torch.Generator().manual_seed(1)
    ).tolist()
    with torch.no_grad():
        expected = reference(torch.tensor([prompt])).logits[0]
    engine = build_engine(EngineOptions(folder, kv_cache_tokens=256))
    got = engine.prompt_logits(prompt)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_unknown_architecture_is_one_sentence(tmp_path: Path) -> None:
    folder = write_model("llama", tmp_path / "gpt")
    config = json.loads((folder / "config.json").read_text())
    config["architectures"] = ["GPTNeoXForCausalLM"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        UnsupportedCheckpoint,
        match=r"^architecture GPTNeoXForCausalLM is not supported by the torch engine \(supported: ",
    ):
        build_engine(EngineOptions(folder))


def test_missing_weights_are_named(tmp_path: Path) -> None:
    folder = write_model("llama", tmp_path / "nofiles")
    for path in folder.glob("*.safetensors"):
        path.unlink()
    with pytest.raises(UnsupportedCheckpoint, match=r"has no \.safetensors files"):
        build_engine(EngineOptions(folder))
