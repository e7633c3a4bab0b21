"""Fixtures for `cortex build-engine` tests: the project's tiny model and ModelOpt states.

`tiny_model` comes from tests/conftest.py (set CORTEX_CACHE_DIR to reuse a generated one).
Quantized states are made once per session through the real stage functions (ModelOpt on
CPU) and shared by the export tests.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import typer

from build_engines.cli import build_engine
from build_engines.request import Quantization
from cortex.config import EngineKind
from tests.build_engines.helpers import (
    FAKE_TRTLLM_BUILD,
    ROPE_THETA,
    Quantized,
    link_or_copy,
    quantize_once,
)


@pytest.fixture(scope="session")
def tiny_model_rope(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with rope_theta 500000 in config.json (weights shared by hard links)."""
    folder = tmp_path_factory.mktemp("tiny-rope") / "cortex-tiny-rope"
    folder.mkdir()
    for path in tiny_model.iterdir():
        if path.is_file() and path.name != "config.json":
            link_or_copy(path, folder / path.name)
    config = json.loads((tiny_model / "config.json").read_text())
    config["rope_parameters"] = {**config.get("rope_parameters", {}), "rope_theta": ROPE_THETA}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


@pytest.fixture(scope="session")
def fp8_trtllm(tiny_model_rope: Path, tmp_path_factory: pytest.TempPathFactory) -> Quantized:
    folder = tmp_path_factory.mktemp("fp8-trtllm")
    return quantize_once(tiny_model_rope, folder, Quantization.FP8, EngineKind.TRTLLM)


@pytest.fixture(scope="session")
def int4_trtllm(tiny_model_rope: Path, tmp_path_factory: pytest.TempPathFactory) -> Quantized:
    # Group 8: the tiny model's intermediate size 688 (344 per GPU at tp 2) admits no 64 or
    # 128 group, so the export is exercised at a size it divides (the CLI refuses group 8
    # for TensorRT-LLM, whose kernels take 64 or 128: see test_build_engine_bad_input).
    folder = tmp_path_factory.mktemp("int4-trtllm")
    return quantize_once(
        tiny_model_rope, folder, Quantization.INT4_AWQ, EngineKind.TRTLLM, awq_group_size=8
    )


@pytest.fixture(scope="session")
def fp8_torch(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Quantized:
    return quantize_once(
        tiny_model, tmp_path_factory.mktemp("fp8-torch"), Quantization.FP8, EngineKind.TORCH
    )


@pytest.fixture(scope="session")
def int4_torch(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Quantized:
    return quantize_once(
        tiny_model,
        tmp_path_factory.mktemp("int4-torch"),
        Quantization.INT4_AWQ,
        EngineKind.TORCH,
        awq_group_size=8,
    )


@pytest.fixture()
def cli() -> typer.Typer:
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None)
    app.command("build-engine")(build_engine)

    @app.command()
    def version() -> None:  # a second command keeps `build-engine` a subcommand, as in cortex
        typer.echo("test")

    return app


@pytest.fixture()
def no_trtllm(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """This machine as it is: no trtllm-build anywhere."""
    monkeypatch.delenv("CORTEX_TRTLLM_BUILD", raising=False)
    monkeypatch.setenv(
        "PATH", os.pathsep.join([str(Path(sys.executable).parent), "/usr/bin", "/bin"])
    )


@pytest.fixture()
def fake_trtllm(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A FAKE trtllm-build (TensorRT-LLM cannot run here) that writes the engine layout."""
    launcher = tmp_path / "fake-trtllm-build"
    launcher.write_text(f'#!/bin/sh\nexec {sys.executable} {FAKE_TRTLLM_BUILD} "$@"\n')
    launcher.chmod(0o755)
    monkeypatch.setenv("CORTEX_TRTLLM_BUILD", str(launcher))
    return launcher
