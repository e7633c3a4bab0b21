"""Publish a finished build into `STORE/NAME/`, atomically, with a manifest and models.toml entry.

Everything is assembled under `STORE/.staging/` (large files hard-linked from the work folder,
copied only across filesystems) and renamed into place in one step, so a reader sees either the
previous model or the complete new one, never half of either. Layout:

    STORE/NAME/manifest.json        what was built from what, with which tools and flags
    STORE/NAME/models.toml          the entry to paste into the gateway's models.toml
    STORE/NAME/engine/              (trtllm) config.json + rank{i}.engine
    STORE/NAME/tokenizer/           (trtllm) the source's tokenizer and chat template
    STORE/NAME/triton/NAME/         (trtllm) the filled `tensorrt_llm` Triton model directory
    STORE/NAME/checkpoint/          (torch)  the checkpoint the torch engine loads
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from build_engines.checkpoint import TOKENIZER_FILES
from build_engines.errors import BuildError
from build_engines.request import BuildRequest
from build_engines.triton_model import render_tensorrt_llm_config, tensorrt_llm_values
from cortex.config import EngineKind

MANIFEST_FORMAT = 1


@dataclass(frozen=True)
class Publication:
    """What goes into STORE/NAME: the payload folder and the manifest's contents."""

    request: BuildRequest
    payload: Path  # the engine folder (trtllm) or checkpoint folder (torch)
    tokenizer_source: Path
    manifest: dict[str, Any]
    context_length: int


def published_dir(request: BuildRequest) -> Path:
    assert request.name is not None
    return request.output / request.name


def published_hash(folder: Path) -> str | None:
    try:
        manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    value = manifest.get("inputs_hash") if isinstance(manifest, dict) else None
    return str(value) if value else None


def link_tree(source: Path, destination: Path) -> None:
    """Hard-link every file of `source` under `destination` (copy where links cannot go)."""
    for path in sorted(source.rglob("*")):
        target = destination / path.relative_to(source)
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, target)
        except OSError:
            shutil.copy2(path, target)


def models_toml_entry(publication: Publication, folder: Path) -> str:
    request = publication.request
    trtllm = request.engine is EngineKind.TRTLLM
    lines = [
        "[[models]]",
        f'name = "{request.name}"',
        f'source = "{folder / ("engine" if trtllm else "checkpoint")}"',
        f'engine = "{request.engine.value}"',
        f'quantization = "{request.quant.value}"',
        f"tp = {request.tp}",
        f"context_length = {publication.context_length}",
    ]
    if trtllm:
        lines += [
            f"max_batch_size = {request.max_batch_size}",
            f'tokenizer = "{folder / "tokenizer"}"',
        ]
    text = "\n".join(lines) + "\n"
    _check_entry(text)
    return text


def _check_entry(text: str) -> None:
    # The shared schema is the judge: an entry the gateway would refuse is a bug here.
    from cortex.config import ModelsFile

    try:
        ModelsFile.model_validate(tomllib.loads(text))
    except Exception as error:  # pydantic and TOML errors alike
        first = str(error).splitlines()[0]
        raise BuildError(f"the models.toml entry this build wrote is invalid: {first}") from None


def assemble(publication: Publication, staging: Path, final: Path) -> None:
    """Write the published layout into `staging`, with paths that are right once renamed."""
    request = publication.request
    if request.engine is EngineKind.TRTLLM:
        link_tree(publication.payload, staging / "engine")
        tokenizer = staging / "tokenizer"
        tokenizer.mkdir()
        for name in TOKENIZER_FILES:
            if (publication.tokenizer_source / name).exists():
                shutil.copy2(publication.tokenizer_source / name, tokenizer / name)
        assert request.name is not None
        model_dir = staging / "triton" / request.name
        (model_dir / "1").mkdir(parents=True)
        values = tensorrt_llm_values(
            engine_dir=final / "engine",
            tokenizer_dir=final / "tokenizer",
            max_batch_size=request.max_batch_size,
            world_size=request.world_size,
            kv_cache_free_gpu_mem_fraction=request.kv_cache_free_gpu_mem_fraction,
        )
        (model_dir / "config.pbtxt").write_text(
            render_tensorrt_llm_config(values), encoding="utf-8"
        )
    else:
        link_tree(publication.payload, staging / "checkpoint")
    (staging / "models.toml").write_text(models_toml_entry(publication, final), encoding="utf-8")
    manifest = dict(publication.manifest)
    manifest["format"] = MANIFEST_FORMAT
    manifest["published_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    manifest["files"] = {
        str(p.relative_to(staging)): p.stat().st_size
        for p in sorted(staging.rglob("*"))
        if p.is_file()
    }
    (staging / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def publish(publication: Publication) -> Path:
    """Assemble and rename into `STORE/NAME/`; an existing copy is replaced in one rename."""
    final = published_dir(publication.request)
    scratch = publication.request.output / ".staging"
    scratch.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f"{final.name}-", dir=scratch))
    retired: Path | None = None
    try:
        assemble(publication, staging, final)
        if final.exists():
            retired = Path(tempfile.mkdtemp(prefix=f"{final.name}-old-", dir=scratch)) / final.name
            final.rename(retired)
        staging.rename(final)
    except BaseException:
        if retired is not None and not final.exists():
            retired.rename(final)  # put the previous model back
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if retired is not None:
            shutil.rmtree(retired.parent, ignore_errors=True)
    return final
