"""Input that cannot be built gets one line on stderr and exit code 2, before any work."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from tests.build_engines.helpers import link_or_copy


def variant(tiny_model: Path, folder: Path, change: Callable[[dict[str, Any]], None]) -> Path:
    folder.mkdir()
    for path in tiny_model.iterdir():
        if path.is_file() and path.name != "config.json":
            link_or_copy(path, folder / path.name)
    config = json.loads((tiny_model / "config.json").read_text())
    change(config)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


CASES: dict[str, tuple[Callable[[Path, Path], list[str]], str]] = {
    "missing folder": (
        lambda model, tmp: [str(tmp / "nope"), "--quant", "fp8"],
        "checkpoint folder {tmp}/nope does not exist",
    ),
    "not a checkpoint": (
        lambda model, tmp: [str(tmp), "--quant", "fp8"],
        "{tmp} has no config.json: not a Hugging Face checkpoint folder",
    ),
    "unsupported architecture": (
        lambda model, tmp: [
            str(variant(model, tmp / "gpt2", lambda c: c.update(architectures=["GPT2LMHeadModel"]))),
            "--quant", "fp8",
        ],
        "architecture GPT2LMHeadModel is not supported (supported: LlamaForCausalLM, "
        "MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM)",
    ),
    "torch-only architecture for trtllm": (
        lambda model, tmp: [
            str(variant(model, tmp / "q3", lambda c: c.update(architectures=["Qwen3ForCausalLM"]))),
            "--quant", "fp8",
        ],
        "architecture Qwen3ForCausalLM can be served by the torch engine only (use --engine torch)",
    ),
    "tp does not divide the heads": (
        lambda model, tmp: [str(model), "--quant", "fp8", "--tp", "3"],
        "--tp 3 does not divide the model's 8 attention heads",
    ),
    "tp and kv heads": (
        lambda model, tmp: [
            str(variant(model, tmp / "kv3", lambda c: c.update(num_key_value_heads=3, num_attention_heads=6, head_dim=32))),
            "--quant", "fp8", "--tp", "2",
        ],
        "--tp 2 and the model's 3 KV heads do not divide one another",
    ),
    "int4 group size vs width per gpu": (
        lambda model, tmp: [str(model), "--quant", "int4_awq", "--tp", "2", "--awq-group-size", "64"],
        "INT4-AWQ group size 64 does not divide the intermediate_size / tp = 344 "
        "(try another --awq-group-size or another --tp)",
    ),
    "int4 group size trtllm cannot run": (
        lambda model, tmp: [str(model), "--quant", "int4_awq", "--awq-group-size", "8"],
        "INT4-AWQ group size 8 cannot be built: TensorRT-LLM's W4A16 kernels take only 64 or 128",
    ),
    "torch engine on two gpus": (
        lambda model, tmp: [str(model), "--quant", "fp8", "--engine", "torch", "--tp", "2"],
        "the torch engine serves a model on one device: use --tp 1 --pp 1 with --engine torch "
        "(got tp 2, pp 1)",
    ),
    "sequence longer than the context": (
        lambda model, tmp: [str(model), "--quant", "fp8", "--max-seq-len", "65536"],
        "--max-seq-len 65536 exceeds the model's context length 32768",
    ),
    "already quantized": (
        lambda model, tmp: [
            str(variant(model, tmp / "q", lambda c: c.update(quantization_config={"quant_method": "modelopt"}))),
            "--quant", "fp8",
        ],
        "{tmp}/q is already quantized (modelopt); pass the unquantized checkpoint",
    ),
    "no tokenizer": (
        lambda model, tmp: [str(_without_tokenizer(model, tmp)), "--quant", "fp8"],
        "{tmp}/bare has no tokenizer.json or tokenizer.model: the gateway tokenizes with them",
    ),
    "missing calibration folder": (
        lambda model, tmp: [str(model), "--quant", "fp8", "--calib-dataset", str(tmp / "texts")],
        "calibration dataset folder {tmp}/texts does not exist",
    ),
    "bad name": (
        lambda model, tmp: [str(model), "--quant", "fp8", "--name", "../escape"],
        "--name '../escape' must start with a letter or digit and hold only letters, digits, "
        "'.', '_' and '-'",
    ),
}  # fmt: skip


def _without_tokenizer(model: Path, tmp: Path) -> Path:
    folder = tmp / "bare"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy2(model / name, folder / name)
    return folder


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_gets_one_clear_line(
    case: str, cli: typer.Typer, tiny_model: Path, tmp_path: Path, no_trtllm: None
) -> None:
    make_args, expected = CASES[case]
    store = tmp_path / "store"
    args = [*make_args(tiny_model, tmp_path), "-o", str(store)]
    result = CliRunner().invoke(cli, ["build-engine", *args])
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    assert result.stderr.splitlines() == [f"error: {expected.format(tmp=tmp_path)}"]
    assert not store.exists()  # refused before any work
