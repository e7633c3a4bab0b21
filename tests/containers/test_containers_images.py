"""The container images: pinned versions agree, Dockerfiles lint clean and run the right thing."""

from __future__ import annotations

import json
import re
import subprocess
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
CONTAINERS = REPO / "containers"
Tool = Callable[[str], str]

DOCKERFILES = [
    CONTAINERS / "neuron" / "Dockerfile",
    CONTAINERS / "neuron" / "Dockerfile.cpu",
    CONTAINERS / "gateway" / "Dockerfile",
]
NEURON_GPU = CONTAINERS / "neuron" / "Dockerfile"


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    result: list[tuple[str, str]] = []
    pending = ""
    for line in dockerfile.read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith("#"):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        if full:
            keyword, _, rest = full.partition(" ")
            result.append((keyword.upper(), rest.strip()))
    return result


def arg_defaults(dockerfile: Path) -> dict[str, str]:
    return {
        name: value
        for keyword, rest in instructions(dockerfile)
        if keyword == "ARG"
        for name, _, value in [rest.partition("=")]
    }


def exec_form(dockerfile: Path, keyword: str) -> list[str]:
    (rest,) = [rest for kw, rest in instructions(dockerfile) if kw == keyword][-1:]
    value = json.loads(rest)
    assert isinstance(value, list), f"{dockerfile.name}: {keyword} must use the exec (JSON) form"
    return value


def test_versions_pin_a_known_triton_and_tensorrt_llm_pairing(versions: dict[str, Any]) -> None:
    release = versions["triton_release"]
    assert re.fullmatch(r"\d\d\.\d\d", release)
    assert versions["triton_image"] == f"nvcr.io/nvidia/tritonserver:{release}-trtllm-python-py3"
    assert versions["known_pairings"].get(release) == versions["tensorrt_llm"], (
        f"Triton {release} does not ship TensorRT-LLM {versions['tensorrt_llm']} "
        "according to [known_pairings] in containers/versions.toml"
    )


def test_neuron_image_is_built_from_versions_toml(versions: dict[str, Any]) -> None:
    defaults = arg_defaults(NEURON_GPU)
    assert defaults["TRITON_IMAGE"] == versions["triton_image"]
    assert defaults["TENSORRT_LLM"] == versions["tensorrt_llm"]
    froms = [rest for keyword, rest in instructions(NEURON_GPU) if keyword == "FROM"]
    assert froms == ["${TRITON_IMAGE}"]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: str(p.relative_to(CONTAINERS)))
def test_dockerfile_passes_hadolint(dockerfile: Path, tool: Tool) -> None:
    result = subprocess.run(
        [tool("hadolint"), "--no-color", "--failure-threshold", "info", str(dockerfile)],
        capture_output=True,
        text=True,
        check=False,
        cwd=dockerfile.parent,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_reports_a_bad_dockerfile(tool: Tool, tmp_path: Path) -> None:
    # Guards the test above against a linter that silently accepts everything.
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN cd /tmp && apt-get install curl\n", encoding="utf-8")
    result = subprocess.run(
        [tool("hadolint"), "--no-color", str(bad)], capture_output=True, text=True, check=False
    )
    assert result.returncode != 0
    assert "DL3007" in result.stdout


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: str(p.relative_to(CONTAINERS)))
def test_build_context_lets_every_installed_package_through(dockerfile: Path) -> None:
    ignore = dockerfile.with_name(dockerfile.name + ".dockerignore")
    allowed = {
        line[1:].strip()
        for line in ignore.read_text(encoding="utf-8").splitlines()
        if line.startswith("!")
    }
    with (REPO / "pyproject.toml").open("rb") as handle:
        pyproject = tomllib.load(handle)
    packages = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    needed = {pattern.rstrip("*").rstrip(".") for pattern in packages} | {
        "pyproject.toml",
        "constraints.txt",
    }
    assert needed <= allowed, f"{ignore.name} leaves out {sorted(needed - allowed)}"


@pytest.mark.parametrize(
    ("dockerfile", "command", "config"),
    [
        (CONTAINERS / "neuron" / "Dockerfile", "neuron", "/etc/cortex/neuron.toml"),
        (CONTAINERS / "neuron" / "Dockerfile.cpu", "neuron", "/etc/cortex/neuron.toml"),
        (CONTAINERS / "gateway" / "Dockerfile", "serve", "/etc/cortex/cortex.toml"),
    ],
    ids=["neuron", "neuron-cpu", "gateway"],
)
def test_image_runs_cortex_as_a_non_root_user(dockerfile: Path, command: str, config: str) -> None:
    entrypoint = exec_form(dockerfile, "ENTRYPOINT")
    assert entrypoint[0] == "/usr/bin/tini", "PID 1 must reap Triton's child processes"
    assert entrypoint[-2:] == ["cortex", command]
    assert exec_form(dockerfile, "CMD") == ["--config", config]
    users = [rest for keyword, rest in instructions(dockerfile) if keyword == "USER"]
    assert users, "no USER: the image would run as root"
    assert users[-1].split(":")[0] not in ("0", "root")
    healthchecks = [rest for keyword, rest in instructions(dockerfile) if keyword == "HEALTHCHECK"]
    port = "31313" if command == "serve" else "13131"
    assert healthchecks and f"127.0.0.1:{port}/health" in healthchecks[-1]
