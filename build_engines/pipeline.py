"""The plan: which stages a request needs, their exact calls, and running them.

`make_plan` is pure apart from reading the checkpoint's config and file listing; it imports
neither torch nor ModelOpt, so `--dry-run` answers in a moment. `run_plan` executes it.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from build_engines import calibration, publish, quantize, trtllm
from build_engines.checkpoint import CheckpointInfo, hash_checkpoint, inspect_checkpoint, validate
from build_engines.errors import InvalidRequest, NeedsTensorRTLLM, StageFailed
from build_engines.progress import Progress
from build_engines.request import BuildRequest, Quantization, resolve
from build_engines.stages import Stage, StageContext, StagePreview, StageResult, execute, preview
from build_engines.versions import TargetVersions, installed_versions, target_versions
from cortex.config import EngineKind

HF_QUANT_ALGOS = {Quantization.FP8: "FP8", Quantization.INT4_AWQ: "W4A16_AWQ"}


@dataclass(frozen=True)
class BuildPlan:
    request: BuildRequest  # resolved: every default filled
    info: CheckpointInfo
    target: TargetVersions
    work_dir: Path
    publish_dir: Path
    stages: list[Stage]
    trtllm_build: Path | None  # the executable, when this machine can build

    def preview(self) -> list[StagePreview]:
        return preview(self.stages, self.work_dir, self.request.force)


def make_plan(raw: BuildRequest) -> BuildPlan:
    info = inspect_checkpoint(raw.checkpoint)
    request = resolve(raw, info)
    validate(request, info)
    target = target_versions()
    executable: Path | None = None
    if request.engine is EngineKind.TRTLLM:
        executable, _ = trtllm.check_trtllm(target)
    assert request.name is not None
    work_dir = request.output / ".work" / request.name
    plan = BuildPlan(
        request, info, target, work_dir, publish.published_dir(request), [], executable
    )
    stages = [_inspect_stage(plan)]
    if request.quantized:
        stages.append(_quantize_stage(plan))
    stages.append(_export_stage(plan))
    if request.engine is EngineKind.TRTLLM:
        stages.append(_build_stage(plan))
    stages += [_verify_stage(plan), _publish_stage(plan)]
    plan.stages.extend(stages)
    return plan


def run_plan(plan: BuildPlan, progress: Progress, on_start: Any = None) -> dict[str, StageResult]:
    """Run the stages; nothing runs when the published copy was built from these inputs
    (so `STORE/.work/` may be deleted once a model is published)."""
    existing = publish.published_hash(plan.publish_dir)
    previews = plan.preview()
    if not plan.request.force and existing == previews[-1].inputs_hash:
        return {
            item.stage.key: StageResult(
                item.stage.key, "skipped", item.inputs_hash, plan.work_dir / item.stage.key, 0.0
            )
            for item in previews
        }
    if plan.publish_dir.exists() and not plan.request.force:
        raise InvalidRequest(
            f"{plan.publish_dir} already holds a model built from other inputs: "
            "pass --force to replace it, or choose another --name"
        )
    return execute(plan.stages, plan.work_dir, progress, plan.request.force, on_start)


# --------------------------------------------------------------------------------- stages


def _inspect_stage(plan: BuildPlan) -> Stage:
    info = plan.info

    def run(context: StageContext) -> dict[str, Any]:
        with context.progress.task("hashing the checkpoint", info_bytes(info), True) as step:
            digest = hash_checkpoint(info, step)
        return {"sha256": digest, "summary": info.summary()}

    return Stage(
        key="inspect",
        title=f"Inspect {info.architecture}, {_count(info.parameter_count)} parameters",
        call=f"build_engines.checkpoint.hash_checkpoint({str(info.path)!r})  "
        f"# sha256 of {len(info.files)} files, {info_bytes(info) / 2**30:.2f} GiB",
        inputs={"checkpoint": str(info.path), "fingerprint": info.fingerprint()},
        run=run,
    )


def _count(parameters: int) -> str:
    return f"{parameters / 1e9:.1f} B" if parameters >= 1e9 else f"{parameters / 1e6:.1f} M"


def info_bytes(info: CheckpointInfo) -> int:
    return sum(item.size for item in info.files)


def _calibration_dir(request: BuildRequest) -> Path:
    return request.calib_dataset or calibration.SHIPPED_DIR


def _quantize_stage(plan: BuildPlan) -> Stage:
    request = plan.request
    dataset = _calibration_dir(request)
    inputs: dict[str, Any] = {
        "quant": request.quant.value,
        "kv_cache": request.kv_cache.value,
        "calib_dataset": dataset_fingerprint_or_fail(dataset),
        "calib_size": request.calib_size,
        "calib_seq_len": request.calib_seq_len,
    }
    if request.quant is Quantization.INT4_AWQ:
        inputs["awq_group_size"] = request.awq_group_size
    return Stage(
        key="quantize",
        title=f"Quantize with ModelOpt ({request.quant.value}, KV cache {request.kv_cache.value})",
        call=(
            f"modelopt.torch.quantization.quantize(model, {quantize.quant_config_call(request)}, "
            f"forward_loop=<{request.calib_size} windows × {request.calib_seq_len} tokens "
            f"of {dataset}>)"
        ),
        inputs=inputs,
        run=lambda context: quantize.calibrate_and_quantize(
            request, plan.info, context.out, context.progress
        ),
    )


def dataset_fingerprint_or_fail(folder: Path) -> str:
    calibration.read_documents(folder)  # refuses an empty or unreadable folder up front
    return calibration.dataset_fingerprint(folder)


def _quant_dir(plan: BuildPlan) -> Path | None:
    return plan.work_dir / "quantize" if plan.request.quantized else None


def _export_stage(plan: BuildPlan) -> Stage:
    request, info = plan.request, plan.info
    out = plan.work_dir / "export"
    if request.engine is EngineKind.TRTLLM:

        def run_trtllm(context: StageContext) -> dict[str, Any]:
            with context.progress.task("loading the model and exporting", None):
                details = quantize.export_trtllm_checkpoint(
                    request, info, _quant_dir(plan), context.out
                )
            problems = trtllm.check_pretrained_config(details["config"], request, info)
            if problems:
                raise StageFailed(f"the exported checkpoint's config.json: {'; '.join(problems)}")
            return details

        return Stage(
            key="export",
            title=f"Export a TensorRT-LLM checkpoint (tp {request.tp}, pp {request.pp})",
            call=quantize.export_trtllm_call(request, info, out),
            inputs={
                "engine": "trtllm",
                "tp": request.tp,
                "pp": request.pp,
                "dtype": request.dtype.value,
                "decoder_type": info.decoder_type,
            },
            run=run_trtllm,
        )
    if request.quantized:
        quant_dir = _quant_dir(plan)
        assert quant_dir is not None
        return Stage(
            key="export",
            title="Export a quantized Hugging Face checkpoint for the torch engine",
            call=quantize.export_hf_call(info, out),
            inputs={"engine": "torch", "dtype": info.torch_dtype},
            run=lambda context: quantize.export_hf_checkpoint(
                request, info, quant_dir, context.out
            ),
        )

    def run_link(context: StageContext) -> dict[str, Any]:
        publish.link_tree(info.path, context.out)
        return {"linked_from": str(info.path)}

    return Stage(
        key="export",
        title="Link the unquantized checkpoint for the torch engine",
        call=f"build_engines.publish.link_tree({str(info.path)!r}, {str(out)!r})",
        inputs={"engine": "torch", "quant": "none"},
        run=run_link,
    )


def _build_stage(plan: BuildPlan) -> Stage:
    request = plan.request
    out = plan.work_dir / "build"
    executable = str(plan.trtllm_build) if plan.trtllm_build else "trtllm-build"
    command = trtllm.build_command(request, plan.work_dir / "export", out, executable)

    def run(context: StageContext) -> dict[str, Any]:
        if plan.trtllm_build is None:
            raise NeedsTensorRTLLM(trtllm.needs_image_sentence(plan.target, command))
        trtllm.run_build(command, plan.work_dir / "build.log", context.progress)
        return {"command": command, "built_with": installed_versions()["tensorrt_llm"]}

    def adopt(folder: Path) -> dict[str, Any] | None:
        # An engine built by running the printed command elsewhere (the NGC image).
        if plan.trtllm_build is None and trtllm.engine_built(folder, request.world_size):
            return {"command": command, "built_with": "outside cortex"}
        return None

    return Stage(
        key="build",
        title=f"Build the TensorRT-LLM {plan.target.tensorrt_llm} engine",
        call=shlex.join(command),
        inputs={"command": command[1:]},  # not the executable's path: the same build anywhere
        run=run,
        adopt=adopt,
    )


def _verify_stage(plan: BuildPlan) -> Stage:
    request, info = plan.request, plan.info
    trt = request.engine is EngineKind.TRTLLM
    folder = plan.work_dir / ("build" if trt else "export")

    def run(context: StageContext) -> dict[str, Any]:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        if trt:
            problems = trtllm.check_engine_config(config, request, info, plan.target)
            if not trtllm.engine_built(folder, request.world_size):
                problems.append(f"{folder} lacks rank0..rank{request.world_size - 1}.engine")
        else:
            problems = check_hf_export(folder, config, request)
        if problems:
            raise StageFailed(
                f"{folder / 'config.json'} disagrees with the request: {'; '.join(problems)}"
            )
        return {"checked": str(folder / "config.json")}

    checker = "trtllm.check_engine_config" if trt else "pipeline.check_hf_export"
    return Stage(
        key="verify",
        title="Verify config.json against the request",
        call=f"build_engines.{checker}({str(folder / 'config.json')!r}, request)",
        inputs={"engine": request.engine.value, "target": plan.target.tensorrt_llm},
        run=run,
    )


def check_hf_export(folder: Path, config: dict[str, Any], request: BuildRequest) -> list[str]:
    problems: list[str] = []
    if not request.quantized:
        if config.get("quantization_config"):
            problems.append("an unquantized build carries a quantization_config")
        return problems
    method = (config.get("quantization_config") or {}).get("quant_method")
    if method != "modelopt":
        problems.append(f"quantization_config.quant_method is {method!r}, expected 'modelopt'")
    try:
        details = json.loads((folder / "hf_quant_config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return [*problems, "hf_quant_config.json is missing or unreadable"]
    quantization = details.get("quantization") or {}
    if quantization.get("quant_algo") != HF_QUANT_ALGOS[request.quant]:
        problems.append(f"quant_algo is {quantization.get('quant_algo')!r}")
    if (
        request.quant is Quantization.INT4_AWQ
        and quantization.get("group_size") != request.awq_group_size
    ):
        problems.append(f"group_size is {quantization.get('group_size')!r}")
    if not list(folder.glob("*.safetensors")):
        problems.append("no .safetensors weights were written")
    return problems


def _publish_stage(plan: BuildPlan) -> Stage:
    request, info = plan.request, plan.info
    trt = request.engine is EngineKind.TRTLLM
    payload = plan.work_dir / ("build" if trt else "export")

    def run(context: StageContext) -> dict[str, Any]:
        results = context.results
        manifest = {
            "name": request.name,
            "inputs_hash": context.inputs_hash,
            "engine": request.engine.value,
            "quantization": request.quant.value,
            "tp": request.tp,
            "pp": request.pp,
            "source": {**info.summary(), "sha256": results["inspect"].details["sha256"]},
            "request": request.describe(),
            "calibration": results["quantize"].details if "quantize" in results else None,
            "build": results["build"].details if "build" in results else None,
            "versions": {
                **installed_versions(),
                "target_tensorrt_llm": plan.target.tensorrt_llm,
                "triton_release": plan.target.triton_release,
                "triton_image": plan.target.triton_image,
                "versions_source": plan.target.source,
            },
            "stages": {
                key: {"status": r.status, "seconds": round(r.seconds, 3)}
                for key, r in results.items()
            },
        }
        context_length = request.max_seq_len if trt else info.context_length
        published = publish.publish(
            publish.Publication(request, payload, info.path, manifest, int(context_length or 0))
        )
        return {"published": str(published)}

    return Stage(
        key="publish",
        title=f"Publish {request.name} atomically",
        call=f"build_engines.publish.publish(...)  # → {plan.publish_dir} by one rename",
        inputs={
            "name": request.name,
            "store": str(request.output),
            "kv_cache_free_gpu_mem_fraction": request.kv_cache_free_gpu_mem_fraction,
            "max_batch_size": request.max_batch_size,
        },
        run=run,
        still_valid=lambda digest: publish.published_hash(plan.publish_dir) == digest,
    )
