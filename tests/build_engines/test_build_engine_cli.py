"""`cortex build-engine` end to end through its typer command: stopping before the build,
resuming after an interruption, the dry-run plan, and publishing (with a FAKE trtllm-build,
since TensorRT-LLM cannot be installed here)."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import typer
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2
from typer.testing import CliRunner

from build_engines import quantize
from build_engines.versions import target_versions
from cortex.config import ModelsFile
from tests.build_engines.helpers import FAKE_TRTLLM_BUILD, ROPE_THETA

FAST = ["--calib-size", "4", "--calib-seq-len", "32"]


def invoke(app: typer.Typer, *args: str | Path) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, ["build-engine", *map(str, args)])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def records(work: Path) -> dict[str, dict[str, Any]]:
    return {p.stem: json.loads(p.read_text()) for p in sorted(work.glob("*.json"))}


@pytest.mark.usefixtures("no_trtllm")
def test_stops_before_the_build_naming_the_image(
    cli: typer.Typer, tiny_model_rope: Path, tmp_path: Path
) -> None:
    code, stdout, stderr = invoke(
        cli, tiny_model_rope, "--quant", "fp8", "--tp", "2", "-o", tmp_path, *FAST
    )
    assert code == 3
    lines = stderr.strip().splitlines()
    assert lines[-1].startswith("stopped: TensorRT-LLM is not installed here")
    assert target_versions().triton_image in lines[-1]
    assert "Traceback" not in stderr and stdout == ""
    work = tmp_path / ".work" / "cortex-tiny-rope-fp8-tp2"
    assert set(records(work)) == {"inspect", "quantize", "export"}
    config = json.loads((work / "export" / "config.json").read_text())
    assert config["mapping"]["tp_size"] == 2 and config["rotary_base"] == ROPE_THETA
    assert not (tmp_path / "cortex-tiny-rope-fp8-tp2").exists()  # nothing half-published


@pytest.mark.usefixtures("no_trtllm")
def test_an_interrupted_build_resumes(
    cli: typer.Typer, tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    args: list[str | Path] = [
        tiny_model,
        "--quant",
        "fp8",
        "--engine",
        "torch",
        "-o",
        tmp_path,
        *FAST,
    ]
    work = tmp_path / ".work" / f"{tiny_model.name}-fp8-tp1-torch"
    real_export = quantize.export_hf_checkpoint

    def interrupted(request: object, info: object, quant_dir: object, out_dir: Path) -> None:
        (out_dir / "model.safetensors").write_bytes(b"half written")
        raise KeyboardInterrupt

    monkeypatch.setattr(quantize, "export_hf_checkpoint", interrupted)
    code, _, stderr = invoke(cli, *args)
    assert code == 130 and "rerun the same command to resume" in stderr
    assert set(records(work)) == {"inspect", "quantize"}
    quantized_at = records(work)["quantize"]["finished_at"]

    def must_not_run(*_args: object) -> None:
        raise AssertionError("the quantize stage ran again")

    monkeypatch.setattr(quantize, "export_hf_checkpoint", real_export)
    monkeypatch.setattr(quantize, "calibrate_and_quantize", must_not_run)
    code, stdout, stderr = invoke(cli, *args)
    assert code == 0, stderr
    assert "quantize Quantize with ModelOpt (fp8, KV cache none) up to date, skipped" in stderr
    done = records(work)
    assert done["quantize"]["finished_at"] == quantized_at
    assert done["export"]["status"] == "ran"
    assert (work / "export" / "model.safetensors").stat().st_size > 1000  # not the torn file
    published = tmp_path / f"{tiny_model.name}-fp8-tp1-torch"
    assert stdout.startswith("# models.toml entry")
    entry = ModelsFile.model_validate(tomllib.loads((published / "models.toml").read_text()))
    assert entry.models[0].source == str(published / "checkpoint")
    manifest = json.loads((published / "manifest.json").read_text())
    assert manifest["quantization"] == "fp8" and len(manifest["source"]["sha256"]) == 64
    assert manifest["versions"]["modelopt"] == "0.47.0"

    shutil.rmtree(work)  # the work folder may go once a model is published
    code, _, stderr = invoke(cli, *args)  # a third run has nothing left to do
    assert code == 0 and stderr.strip().endswith("(already up to date)"), stderr
    assert not work.exists()


def expected_build_command(work: Path) -> str:
    return shlex.join(
        [
            "trtllm-build",
            "--checkpoint_dir", str(work / "export"),
            "--output_dir", str(work / "build"),
            "--max_batch_size", "32",
            "--max_input_len", "1024",
            "--max_seq_len", "2048",
            "--max_num_tokens", "4096",
            "--max_beam_width", "1",
            "--kv_cache_type", "paged",
            "--tokens_per_block", "32",
            "--gpt_attention_plugin", "auto",
            "--gemm_plugin", "auto",
            "--nccl_plugin", "auto",
            "--context_fmha", "enable",
            "--use_paged_context_fmha", "enable",
            "--use_fp8_context_fmha", "enable",
            "--remove_input_padding", "enable",
            "--use_fused_mlp", "enable",
            "--multiple_profiles", "disable",
            "--logits_dtype", "float32",
            "--workers", "2",
            "--log_level", "info",
        ]
    )  # fmt: skip


@pytest.mark.usefixtures("no_trtllm")
def test_dry_run_prints_every_stage(cli: typer.Typer, tiny_model: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    code, stdout, _ = invoke(
        cli, tiny_model, "--quant", "fp8", "--tp", "2", "-o", store, "--name", "tiny-fp8",
        "--max-batch-size", "32", "--max-input-len", "1024", "--max-seq-len", "2048",
        "--max-num-tokens", "4096", "--dry-run",
    )  # fmt: skip
    assert code == 0
    assert not store.exists()  # a dry run writes nothing
    work = store.resolve() / ".work" / "tiny-fp8"
    lines = stdout.splitlines()
    stages = [line.split()[1] for line in lines if line[:1].isdigit()]
    assert stages == ["inspect", "quantize", "export", "build", "verify", "publish"]
    calls = {
        stage: lines[lines.index(line) + 1].strip()
        for stage, line in zip(stages, [line for line in lines if line[:1].isdigit()], strict=True)
    }
    assert calls["build"] == expected_build_command(work)
    assert "4. build [stops here: needs TensorRT-LLM]" in stdout
    assert calls["quantize"].startswith(
        "modelopt.torch.quantization.quantize(model, mtq.FP8_DEFAULT_CFG + mtq.FP8_KV_CFG, "
        "forward_loop=<512 windows × 512 tokens of "
    )
    assert calls["export"] == (
        "modelopt.torch.export.export_tensorrt_llm_checkpoint(model, decoder_type='llama', "
        f"dtype=torch.bfloat16, export_dir='{work / 'export'}', inference_tensor_parallel=2, "
        "inference_pipeline_parallel=1)"
    )
    assert str(store.resolve() / "tiny-fp8") in calls["publish"]


def test_fake_trtllm_build_then_verify_and_publish(
    cli: typer.Typer, tiny_model: Path, tmp_path: Path, fake_trtllm: Path
) -> None:
    code, _, stderr = invoke(
        cli, tiny_model, "--quant", "fp8", "--tp", "2", "-o", tmp_path, "--name", "tiny",
        "--max-seq-len", "2048", *FAST,
    )  # fmt: skip
    assert code == 0, stderr
    published = tmp_path / "tiny"
    assert sorted(p.name for p in (published / "engine").iterdir()) == [
        "config.json",
        "rank0.engine",
        "rank1.engine",
    ]
    assert (published / "tokenizer" / "tokenizer.json").exists()
    model_config = model_config_pb2.ModelConfig()
    text_format.Parse((published / "triton" / "tiny" / "config.pbtxt").read_text(), model_config)
    parameters = {key: value.string_value for key, value in model_config.parameters.items()}
    assert parameters["gpt_model_path"] == str(published / "engine")
    assert parameters["tokenizer_dir"] == str(published / "tokenizer")
    assert parameters["gpu_device_ids"] == "0,1"
    assert model_config.model_transaction_policy.decoupled
    entry = ModelsFile.model_validate(
        tomllib.loads((published / "models.toml").read_text())
    ).models[0]
    assert (entry.engine.value, entry.quantization.value, entry.tp) == ("trtllm", "fp8", 2)
    assert entry.source == str(published / "engine") and entry.context_length == 2048
    manifest = json.loads((published / "manifest.json").read_text())
    assert manifest["build"]["command"][0] == str(fake_trtllm)
    assert manifest["versions"]["target_tensorrt_llm"] == "1.2.1"
    assert not list((tmp_path / ".staging").iterdir())  # nothing left behind


def test_verify_refuses_an_engine_of_another_version(
    cli: typer.Typer,
    tiny_model: Path,
    tmp_path: Path,
    fake_trtllm: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FAKE_TRTLLM_VERSION", "1.3.0")
    code, _, stderr = invoke(cli, tiny_model, "--quant", "none", "-o", tmp_path, "--name", "v")
    assert code == 2
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "version is '1.3.0', asked '1.2.1'" in last
    assert not (tmp_path / "v").exists()


def test_an_engine_built_in_the_image_is_adopted(
    cli: typer.Typer,
    tiny_model: Path,
    tmp_path: Path,
    no_trtllm: None,
) -> None:
    args: list[str | Path] = [
        tiny_model,
        "--quant",
        "fp8",
        "-o",
        tmp_path,
        "--name",
        "elsewhere",
        *FAST,
    ]
    code, _, stderr = invoke(cli, *args)
    assert code == 3
    command = shlex.split(stderr.split("or run `", 1)[1].split("`", 1)[0])
    assert command[0] == "trtllm-build"
    # What the operator does inside the NGC image (here: the FAKE tool, same flags).
    subprocess.run([sys.executable, str(FAKE_TRTLLM_BUILD), *command[1:]], check=True)
    code, _, stderr = invoke(cli, *args)
    assert code == 0, stderr
    record = json.loads((tmp_path / ".work" / "elsewhere" / "build.json").read_text())
    assert record["status"] == "adopted"
    assert (tmp_path / "elsewhere" / "engine" / "rank0.engine").exists()
