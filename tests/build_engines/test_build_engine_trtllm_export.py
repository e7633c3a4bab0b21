"""ModelOpt FP8 and INT4-AWQ on the tiny model, for real, exported as TensorRT-LLM checkpoints."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

from build_engines import quantize, trtllm
from tests.build_engines.helpers import ROPE_THETA, Quantized, with_tp

QKV = "transformer.layers.0.attention.qkv.weight"


def export(quantized: Quantized, tp: int, folder: Path, pp: int = 1) -> dict[str, Any]:
    request = replace(with_tp(quantized, tp), pp=pp)
    details = quantize.export_trtllm_checkpoint(
        request, quantized.info, quantized.quant_dir, folder
    )
    assert trtllm.check_pretrained_config(details["config"], request, quantized.info) == []
    config: dict[str, Any] = json.loads((folder / "config.json").read_text())
    return config


def rank_tensor(folder: Path, rank: int, name: str) -> torch.Tensor:
    with safe_open(str(folder / f"rank{rank}.safetensors"), framework="pt") as handle:
        tensor: torch.Tensor = handle.get_tensor(name)
        return tensor


@pytest.mark.parametrize("tp", [1, 2])
def test_fp8_checkpoint_says_what_was_asked(fp8_trtllm: Quantized, tp: int, tmp_path: Path) -> None:
    config = export(fp8_trtllm, tp, tmp_path)
    info = fp8_trtllm.info
    assert config["mapping"] == {"world_size": tp, "tp_size": tp, "pp_size": 1}
    assert config["quantization"]["quant_algo"] == "FP8"
    assert config["quantization"]["kv_cache_quant_algo"] == "FP8"
    assert config["rotary_base"] == ROPE_THETA
    assert config["dtype"] == "bfloat16"
    assert sorted(p.name for p in tmp_path.glob("rank*.safetensors")) == [
        f"rank{rank}.safetensors" for rank in range(tp)
    ]
    qkv = rank_tensor(tmp_path, tp - 1, QKV)
    assert qkv.dtype == torch.float8_e4m3fn
    # q, k and v fused, each split over the ranks.
    rows = (info.num_heads + 2 * info.num_kv_heads) * info.head_dim // tp
    assert tuple(qkv.shape) == (rows, info.hidden_size)
    assert (tmp_path / "tokenizer.json").exists()


@pytest.mark.parametrize("tp", [1, 2])
def test_int4_awq_checkpoint_says_what_was_asked(
    int4_trtllm: Quantized, tp: int, tmp_path: Path
) -> None:
    config = export(int4_trtllm, tp, tmp_path)
    assert config["mapping"] == {"world_size": tp, "tp_size": tp, "pp_size": 1}
    quantization = config["quantization"]
    assert quantization["quant_algo"] == "W4A16_AWQ"
    assert quantization["group_size"] == 8
    assert quantization["has_zero_point"] is False
    assert quantization["pre_quant_scale"] is True
    assert quantization["kv_cache_quant_algo"] is None
    assert config["rotary_base"] == ROPE_THETA
    assert len(list(tmp_path.glob("rank*.safetensors"))) == tp
    assert rank_tensor(tmp_path, 0, QKV).dtype == torch.int8  # two int4 values per byte


def test_fp8_checkpoint_with_pipeline_parallelism(fp8_trtllm: Quantized, tmp_path: Path) -> None:
    config = export(fp8_trtllm, 1, tmp_path, pp=2)
    assert config["mapping"] == {"world_size": 2, "tp_size": 1, "pp_size": 2}
    assert len(list(tmp_path.glob("rank*.safetensors"))) == 2


def test_the_rope_fix_is_needed(fp8_trtllm: Quantized, tmp_path: Path) -> None:
    """ModelOpt alone loses rope_theta under transformers 5 (modelopt_notes pitfall 2): the
    checkpoint would run at TensorRT-LLM's default 10000. When this starts failing, ModelOpt
    fixed it and `quantize._fix_rope_config` can go."""
    import modelopt.torch.export as mte

    model = quantize.restore_quantized(fp8_trtllm.info, fp8_trtllm.quant_dir, "cpu")
    with quantize.captured_output():
        mte.export_tensorrt_llm_checkpoint(
            model,
            decoder_type="llama",
            dtype=torch.bfloat16,
            export_dir=tmp_path,
            inference_tensor_parallel=1,
        )
    config = json.loads((tmp_path / "config.json").read_text())
    assert config.get("rotary_base", 10000.0) != ROPE_THETA


def test_a_wrong_checkpoint_config_is_caught(fp8_trtllm: Quantized) -> None:
    request = with_tp(fp8_trtllm, 2)
    config = {
        "mapping": {"world_size": 1, "tp_size": 1, "pp_size": 1},
        "dtype": "bfloat16",
        "quantization": {"quant_algo": "FP8", "kv_cache_quant_algo": None},
        "num_hidden_layers": fp8_trtllm.info.num_layers,
        "vocab_size": fp8_trtllm.info.vocab_size,
    }
    problems = trtllm.check_pretrained_config(config, request, fp8_trtllm.info)
    assert any(p.startswith("mapping.tp_size is 1") for p in problems)
    assert any(p.startswith("kv_cache_quant_algo is None") for p in problems)
    assert any(p.startswith("rotary_base is None") for p in problems)
    unchanged = replace(request, tp=1)
    assert not any(
        "tp_size" in p for p in trtllm.check_pretrained_config(config, unchanged, fp8_trtllm.info)
    )
