"""`trtllm-build`: the exact command, running it, and checking what it (or the export) wrote.

Every flag that changed its default between TensorRT-LLM releases is passed explicitly (paged
KV cache, tokens per block, paged/FP8 context FMHA, plugins, logits dtype), so an engine built
from the same request is the same engine on every 1.x release. Tensor and pipeline parallelism
are not `trtllm-build` flags: they come from the checkpoint's `mapping`.
"""

from __future__ import annotations

import shlex
import subprocess
from collections import deque
from pathlib import Path
from typing import Any

from build_engines.checkpoint import CheckpointInfo
from build_engines.errors import NeedsTensorRTLLM, StageFailed
from build_engines.progress import Progress
from build_engines.request import BuildRequest, Quantization
from build_engines.versions import TargetVersions, find_trtllm_build, package_version
from cortex.config import TRTLLM_TOKENS_PER_BLOCK

QUANT_ALGOS: dict[Quantization, str | None] = {
    Quantization.FP8: "FP8",
    Quantization.INT4_AWQ: "W4A16_AWQ",
    Quantization.NONE: None,
}
TOKENS_PER_BLOCK = TRTLLM_TOKENS_PER_BLOCK  # the gateway counts reused blocks with it
LOGITS_DTYPE = "float32"  # the tensorrt_llm template's logits_datatype is TYPE_FP32 to match


def build_command(
    request: BuildRequest, checkpoint_dir: Path, engine_dir: Path, executable: str = "trtllm-build"
) -> list[str]:
    fp8_fmha = request.quant is Quantization.FP8 and request.kv_cache_fp8
    return [
        executable,
        "--checkpoint_dir", str(checkpoint_dir),
        "--output_dir", str(engine_dir),
        "--max_batch_size", str(request.max_batch_size),
        "--max_input_len", str(request.max_input_len),
        "--max_seq_len", str(request.max_seq_len),
        "--max_num_tokens", str(request.max_num_tokens),
        "--max_beam_width", "1",
        "--kv_cache_type", "paged",
        "--tokens_per_block", str(TOKENS_PER_BLOCK),
        "--gpt_attention_plugin", "auto",
        "--gemm_plugin", "auto",
        "--nccl_plugin", "auto",
        "--context_fmha", "enable",
        "--use_paged_context_fmha", "enable",
        "--use_fp8_context_fmha", "enable" if fp8_fmha else "disable",
        "--remove_input_padding", "enable",
        "--use_fused_mlp", "enable",
        "--multiple_profiles", "disable",
        "--logits_dtype", LOGITS_DTYPE,
        "--workers", str(request.world_size),
        "--log_level", "info",
    ]  # fmt: skip


def needs_image_sentence(target: TargetVersions, command: list[str]) -> str:
    return (
        f"TensorRT-LLM is not installed here, so the build stops before `trtllm-build`: rerun "
        f"this command inside {target.triton_image} (TensorRT-LLM {target.tensorrt_llm}, the "
        f"store mounted at the same path), which reuses the finished stages, or run "
        f"`{shlex.join(command)}` there and rerun this command here to verify and publish."
    )


def check_trtllm(target: TargetVersions) -> tuple[Path | None, str | None]:
    """(trtllm-build, its version) when usable here; raises NeedsTensorRTLLM for a wrong version.

    Returns (None, None) when TensorRT-LLM is absent (the caller decides whether an engine
    built elsewhere can stand in).
    """
    executable = find_trtllm_build()
    if executable is None:
        return None, None
    version = package_version("tensorrt-llm", "tensorrt_llm")
    if version is not None and version != target.tensorrt_llm:
        raise NeedsTensorRTLLM(
            f"TensorRT-LLM {version} is installed here but the serving image "
            f"{target.triton_image} runs {target.tensorrt_llm}, and engines only load under the "
            f"version that built them: build inside that image"
        )
    return executable, version


def engine_built(engine_dir: Path, world_size: int) -> bool:
    return (engine_dir / "config.json").exists() and all(
        (engine_dir / f"rank{rank}.engine").exists() for rank in range(world_size)
    )


def run_build(command: list[str], log_path: Path, progress: Progress) -> None:
    """Run trtllm-build, its output to `log_path`; a failure raises with its last lines."""
    tail: deque[str] = deque(maxlen=5)
    with log_path.open("w", encoding="utf-8") as log, progress.task("trtllm-build", None):
        log.write(f"$ {shlex.join(command)}\n")
        log.flush()
        process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace"
        )
        assert process.stdout is not None
        for line in process.stdout:
            log.write(line)
            if line.strip():
                tail.append(line.strip())
        code = process.wait()
    if code != 0:
        last = tail[-1] if tail else "no output"
        raise StageFailed(f"trtllm-build exited with {code}: {last} (full log: {log_path})")


def _expect(problems: list[str], what: str, got: Any, wanted: Any) -> None:
    if got != wanted:
        problems.append(f"{what} is {got!r}, asked {wanted!r}")


def check_pretrained_config(
    config: dict[str, Any], request: BuildRequest, info: CheckpointInfo
) -> list[str]:
    """Mismatches between a TensorRT-LLM checkpoint / engine pretrained config and the request."""
    problems: list[str] = []
    mapping = config.get("mapping") or {}
    _expect(problems, "mapping.tp_size", mapping.get("tp_size"), request.tp)
    _expect(problems, "mapping.pp_size", mapping.get("pp_size"), request.pp)
    _expect(problems, "mapping.world_size", mapping.get("world_size"), request.world_size)
    _expect(problems, "dtype", config.get("dtype"), request.dtype.value)
    quantization = config.get("quantization") or {}
    _expect(problems, "quant_algo", quantization.get("quant_algo"), QUANT_ALGOS[request.quant])
    kv = "FP8" if request.kv_cache_fp8 else None
    _expect(problems, "kv_cache_quant_algo", quantization.get("kv_cache_quant_algo"), kv)
    if request.quant is Quantization.INT4_AWQ:
        _expect(problems, "group_size", quantization.get("group_size"), request.awq_group_size)
    # Missing rotary_base runs at TensorRT-LLM's default 10000 whatever the model was trained at.
    _expect(problems, "rotary_base", config.get("rotary_base"), info.rope_theta)
    if info.rope_scaling:
        scaling = config.get("rotary_scaling") or {}
        kind = info.rope_scaling.get("rope_type", info.rope_scaling.get("type"))
        _expect(
            problems, "rotary_scaling type", scaling.get("type", scaling.get("rope_type")), kind
        )
    _expect(problems, "num_hidden_layers", config.get("num_hidden_layers"), info.num_layers)
    _expect(problems, "vocab_size", config.get("vocab_size"), info.vocab_size)
    return problems


def check_engine_config(
    config: dict[str, Any], request: BuildRequest, info: CheckpointInfo, target: TargetVersions
) -> list[str]:
    """Mismatches between a built engine's config.json and the request."""
    problems = check_pretrained_config(config.get("pretrained_config") or {}, request, info)
    build = config.get("build_config") or {}
    for key in ("max_batch_size", "max_input_len", "max_seq_len", "max_num_tokens"):
        _expect(problems, f"build_config.{key}", build.get(key), getattr(request, key))
    _expect(problems, "version", config.get("version"), target.tensorrt_llm)
    return problems
