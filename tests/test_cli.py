"""The CLI's help explains every command."""

from __future__ import annotations

import subprocess
import sys

import pytest


def cortex(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cortex.cli", *args], capture_output=True, text=True, timeout=60
    )


def test_top_level_help_lists_commands() -> None:
    result = cortex("--help")
    assert result.returncode == 0
    for command in ("serve", "neuron", "status", "demo-model"):
        assert command in result.stdout


@pytest.mark.parametrize(
    ("command", "phrase"),
    [
        ("serve", "embedded default"),
        ("neuron", "tritonserver"),
        ("status", "--json"),
        ("demo-model", "Hugging Face"),
    ],
)
def test_command_help(command: str, phrase: str) -> None:
    result = cortex(command, "--help")
    assert result.returncode == 0, result.stderr
    assert phrase in " ".join(result.stdout.split())


def test_unknown_command_fails_cleanly() -> None:
    result = cortex("frobnicate")
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
