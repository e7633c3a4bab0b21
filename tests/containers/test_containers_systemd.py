"""The systemd units for bare hosts: `systemd-analyze verify` clean, restartable, hardened."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SYSTEMD = REPO / "containers" / "systemd"
UNITS = ["cortex-gateway.service", "cortex-neuron.service"]
EXECUTABLE = "/opt/cortex/venv/bin/cortex"
Tool = Callable[[str], str]


def unit_settings(text: str) -> dict[str, dict[str, list[str]]]:
    sections: dict[str, dict[str, list[str]]] = {}
    # Repeated keys (Environment=) are legal in units: collect them by hand.
    current = ""
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        header = re.fullmatch(r"\[(.+)\]", line)
        if header:
            current = header.group(1)
            sections.setdefault(current, {})
            continue
        key, _, value = line.partition("=")
        sections[current].setdefault(key.strip(), []).append(value.strip())
    return sections


def verify(
    tool: Tool, unit_text: str, name: str, tmp_path: Path
) -> subprocess.CompletedProcess[str]:
    """`systemd-analyze verify` on the unit, with the virtual environment's `cortex` (not
    installed here) replaced by a stub: verify insists that ExecStart's program exists."""
    stub = tmp_path / "bin" / "cortex"
    stub.parent.mkdir(exist_ok=True)
    stub.write_text("#!/bin/sh\n", encoding="utf-8")
    stub.chmod(0o755)
    unit = tmp_path / name
    unit.write_text(unit_text.replace(EXECUTABLE, str(stub)), encoding="utf-8")
    return subprocess.run(
        [tool("systemd-analyze"), "verify", "--man=no", str(unit)],
        capture_output=True,
        text=True,
        check=False,
    )


@pytest.mark.parametrize("name", UNITS)
def test_unit_passes_systemd_analyze_verify(name: str, tool: Tool, tmp_path: Path) -> None:
    text = (SYSTEMD / name).read_text(encoding="utf-8")
    assert EXECUTABLE in text
    result = verify(tool, text, name, tmp_path)
    output = result.stdout + result.stderr
    # Unknown keys and bad values are warnings with exit status 0: any line about our unit fails.
    about_unit = [line for line in output.splitlines() if name in line]
    assert result.returncode == 0 and not about_unit, output


def test_systemd_analyze_reports_a_misspelt_key(tool: Tool, tmp_path: Path) -> None:
    text = (SYSTEMD / "cortex-gateway.service").read_text(encoding="utf-8")
    result = verify(
        tool, text.replace("NoNewPrivileges=", "NoNewPrivilege="), "x.service", tmp_path
    )
    assert "NoNewPrivilege" in result.stdout + result.stderr


@pytest.mark.parametrize(("name", "command"), [(UNITS[0], "serve"), (UNITS[1], "neuron")])
def test_unit_runs_cortex_unprivileged_and_restarts(name: str, command: str) -> None:
    service = unit_settings((SYSTEMD / name).read_text(encoding="utf-8"))["Service"]
    assert service["ExecStart"] == [f"{EXECUTABLE} {command} --config ${{CORTEX_CONFIG}}"]
    assert service["User"] == ["cortex"]
    assert service["Restart"] == ["on-failure"]
    assert any(path.startswith("-/etc/cortex/") for path in service["EnvironmentFile"])
    for key, value in {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "CapabilityBoundingSet": "",
    }.items():
        assert service[key] == [value], f"{name}: {key}"


def test_neuron_unit_leaves_the_gpus_reachable() -> None:
    # Each of these closes /dev/nvidia* to the service (ProtectClock through an implied DeviceAllow).
    service = unit_settings((SYSTEMD / "cortex-neuron.service").read_text(encoding="utf-8"))[
        "Service"
    ]
    for key in ("PrivateDevices", "DevicePolicy", "DeviceAllow", "ProtectClock"):
        assert key not in service
    assert service["LimitMEMLOCK"] == ["infinity"]


def test_sysusers_file_creates_the_service_user(tool: Tool, tmp_path: Path) -> None:
    result = subprocess.run(
        [
            tool("systemd-sysusers"),
            f"--root={tmp_path}",
            "--dry-run",
            str(SYSTEMD / "cortex.sysusers.conf"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "Creating user 'cortex'" in result.stdout + result.stderr
