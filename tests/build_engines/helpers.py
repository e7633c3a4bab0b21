"""Shared helpers for the build_engines tests (fixtures are in conftest.py)."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from build_engines.checkpoint import CheckpointInfo, inspect_checkpoint
from build_engines.progress import Progress
from build_engines.request import BuildRequest, Quantization, resolve
from cortex.config import EngineKind

# Not the default 10000: a lost rotary_base (modelopt_notes pitfall 2) must fail the checks.
ROPE_THETA = 500000.0
CALIB: dict[str, Any] = {"calib_size": 8, "calib_seq_len": 64}
FAKE_TRTLLM_BUILD = Path(__file__).parent / "fake_trtllm_build.py"


def link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


@dataclass(frozen=True)
class Quantized:
    request: BuildRequest
    info: CheckpointInfo
    quant_dir: Path


def quantize_once(
    checkpoint: Path, folder: Path, quant: Quantization, engine: EngineKind, **options: Any
) -> Quantized:
    """The quantize stage, for real (ModelOpt on CPU), into `folder/quantize`."""
    from build_engines.quantize import calibrate_and_quantize

    info = inspect_checkpoint(checkpoint)
    raw = BuildRequest(checkpoint, quant, output=folder, engine=engine, **CALIB, **options)
    request = resolve(raw, info)
    quant_dir = folder / "quantize"
    quant_dir.mkdir(parents=True)
    calibrate_and_quantize(request, info, quant_dir, Progress())
    return Quantized(request, info, quant_dir)


def with_tp(quantized: Quantized, tp: int) -> BuildRequest:
    return replace(quantized.request, tp=tp)
