"""Materialising a model's Triton directory from `model_repo_templates/` and its profile.

Rendering is pure (profile → {relative path: bytes}); writing is idempotent and atomic: the
directory is assembled outside the repository and renamed into place, so Triton never reads a
half-written model, and an identical directory is left untouched.
"""

from __future__ import annotations

import filecmp
import shutil
import string
import tempfile
from pathlib import Path

from cortex.config import EngineKind, ModelProfile
from model_repo_templates import TEMPLATES_DIR, TENSORRT_LLM_DEFAULTS
from neuron_agent.errors import RepositoryError


def fill(template: str, values: dict[str, str], source: str) -> str:
    filled = string.Template(template).safe_substitute(values)
    leftover = sorted(set(string.Template.pattern.findall(filled)) - {("", "", "", "")})
    names = [next(part for part in match if part) for match in leftover if any(match)]
    if names:
        raise RepositoryError(f"{source}: placeholders left unfilled: {', '.join(names)}")
    return filled


def torch_parameters(
    profile: ModelProfile, checkpoint: Path, gpus: list[int], has_gpu: bool, stats_path: Path
) -> dict[str, str]:
    device = f"cuda:{gpus[0]}" if has_gpu and gpus else "cpu"
    return {
        "model_name": profile.name,
        "triton_max_batch_size": "1",
        "checkpoint_dir": str(checkpoint),
        "quantization": profile.quantization.value,
        "dtype": profile.dtype,
        "device": device,
        "kv_cache_tokens": str(profile.kv_cache_tokens),
        "engine_max_batch_size": str(profile.max_batch_size),
        "max_queue_size": str(profile.max_queue_size),
        "prefill_tokens": str(profile.prefill_tokens),
        "cuda_graphs": str(profile.cuda_graphs).lower(),
        "prefix_caching": "true" if profile.prefix_caching else "false",
        "kv_cache_dtype": profile.kv_cache_dtype.value,
        "host_kv_cache_bytes": str(profile.host_kv_cache_bytes),
        "batch_invariant": "true" if profile.batch_invariant else "false",
        "stats_path": str(stats_path),
        "tp": str(profile.tp),
        "gpu_device_ids": ",".join(str(g) for g in gpus) if has_gpu else "",
    }


def llamacpp_parameters(
    profile: ModelProfile,
    model_path: Path,
    context_length: int,
    gpus: list[int],
    has_gpu: bool,
    stats_path: Path,
) -> dict[str, str]:
    return {
        "model_name": profile.name,
        "model_path": str(model_path),
        "embedding": "true" if profile.embedding else "false",
        "context_length": str(context_length),
        "kv_cache_tokens": str(profile.kv_cache_tokens),
        "engine_max_batch_size": str(profile.max_batch_size),
        "max_queue_size": str(profile.max_queue_size),
        "prefill_tokens": str(profile.prefill_tokens),
        "prefix_caching": "true" if profile.prefix_caching else "false",
        "stats_path": str(stats_path),
        "tp": str(profile.tp),
        "gpu_device_ids": ",".join(str(g) for g in gpus) if has_gpu else "",
    }


def trtllm_parameters(profile: ModelProfile, engine_dir: Path, gpus: list[int]) -> dict[str, str]:
    values = dict(TENSORRT_LLM_DEFAULTS)
    values.update(
        model_name=profile.name,
        triton_max_batch_size=str(profile.max_batch_size),
        max_queue_size=str(profile.max_queue_size),
        engine_dir=str(engine_dir),
        max_tokens_in_paged_kv_cache=str(profile.kv_cache_tokens),
        kv_cache_host_memory_bytes=str(profile.host_kv_cache_bytes),
        gpu_device_ids=",".join(str(g) for g in gpus),
        tokenizer_dir=profile.tokenizer or str(engine_dir),
    )
    return values


def render(
    profile: ModelProfile,
    source: Path,
    gpus: list[int],
    has_gpu: bool,
    stats_path: Path,
    context_length: int = 0,
) -> dict[str, bytes]:
    """The files of the model's Triton directory, relative path → contents. `context_length`:
    the catalogue's (llamacpp; 0 leaves it to the file)."""
    if profile.engine is EngineKind.TORCH:
        template_dir = TEMPLATES_DIR / "torch_llm"
        values = torch_parameters(profile, source, gpus, has_gpu, stats_path)
    elif profile.engine is EngineKind.LLAMACPP:
        template_dir = TEMPLATES_DIR / "llamacpp_llm"
        values = llamacpp_parameters(profile, source, context_length, gpus, has_gpu, stats_path)
    else:
        template_dir = TEMPLATES_DIR / "tensorrt_llm"
        values = trtllm_parameters(profile, source, gpus)
    if profile.template:
        # A profile's own template folder (tests use it for fakes), filled with the same values.
        template_dir = Path(profile.template).expanduser()
    if not (template_dir / "config.pbtxt").exists():
        raise RepositoryError(f"template {template_dir.name} is missing from {TEMPLATES_DIR}")
    files: dict[str, bytes] = {}
    for path in sorted(template_dir.rglob("*")):
        if path.is_dir() or "__pycache__" in path.parts:
            continue
        relative = str(path.relative_to(template_dir))
        data = path.read_bytes()
        if path.name == "config.pbtxt":
            data = fill(data.decode("utf-8"), values, str(path)).encode("utf-8")
        files[relative] = data
    if "1/model.py" not in files and profile.engine is not EngineKind.TRTLLM:
        raise RepositoryError(f"the {template_dir.name} template lacks 1/model.py")
    files.setdefault("1/.keep", b"")
    return files


def materialise(repository: Path, scratch: Path, name: str, files: dict[str, bytes]) -> bool:
    """Write `repository/name` atomically; returns False when it was already identical."""
    target = repository / name
    scratch.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=scratch))
    try:
        for relative, data in files.items():
            path = staging / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        if target.exists() and _same_tree(staging, target):
            return False
        repository.mkdir(parents=True, exist_ok=True)
        if target.exists():
            retired = Path(tempfile.mkdtemp(prefix=f"{name}-old-", dir=scratch))
            target.rename(retired / name)
        staging.rename(target)
        return True
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        for leftover in scratch.glob(f"{name}-old-*"):
            shutil.rmtree(leftover, ignore_errors=True)


def _same_tree(left: Path, right: Path) -> bool:
    comparison = filecmp.dircmp(left, right, ignore=["__pycache__"])
    if comparison.left_only or comparison.right_only or comparison.diff_files:
        return False
    _, mismatch, errors = filecmp.cmpfiles(left, right, comparison.common_files, shallow=False)
    if mismatch or errors:
        return False
    return all(_same_tree(left / sub, right / sub) for sub in comparison.common_dirs)
