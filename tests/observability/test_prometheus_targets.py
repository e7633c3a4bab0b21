"""`cortex prometheus-targets`: file_sd lists from cortex.toml, in the shape that the shipped
containers/prometheus/prometheus.yml reads, accepted by promtool."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from urllib.parse import urlparse

from cortex.config import CortexConfig, GatewaySection, load_cortex_config
from cortex.launch import write_gateway_config
from tests.conftest import Embedded
from tests.observability.conftest import (
    NODE,
    REPO,
    cortex,
    metrics_address,
    program,
    triton_metrics_port,
)

SHIPPED = REPO / "containers" / "prometheus"


def test_targets_from_a_running_fleet(embedded: Embedded, fleet_toml: Path, tmp_path: Path) -> None:
    out = tmp_path / "targets"
    result = cortex("prometheus-targets", "--config", str(fleet_toml), "--out", str(out))
    assert result.returncode == 0, result.stderr
    gateway = json.loads((out / "gateway.json").read_text())
    triton = json.loads((out / "triton.json").read_text())
    assert gateway == [{"targets": [metrics_address(embedded)], "labels": {}}]
    # The neuron's own endpoint: its /metrics re-exports Triton's (which binds loopback).
    assert triton == [{"targets": [urlparse(embedded.neuron_url).netloc], "labels": {"node": NODE}}]
    assert str(triton_metrics_port(embedded)) not in triton[0]["targets"][0]
    assert sorted(p.name for p in out.iterdir()) == ["gateway.json", "triton.json"]


def test_same_shape_as_the_shipped_lists(fleet_toml: Path, tmp_path: Path) -> None:
    cortex("prometheus-targets", "--config", str(fleet_toml), "--out", str(tmp_path))
    for name in ("gateway.json", "triton.json"):
        shipped = json.loads((SHIPPED / "targets" / name).read_text())
        written = json.loads((tmp_path / name).read_text())
        assert {frozenset(g) for g in written} == {frozenset(g) for g in shipped}
        assert {frozenset(g["labels"]) for g in written} == {
            frozenset(g["labels"]) for g in shipped
        }


def test_a_neuron_down_keeps_its_target(fleet_toml_one_down: Path, tmp_path: Path) -> None:
    result = cortex(
        "prometheus-targets", "--config", str(fleet_toml_one_down), "--out", str(tmp_path)
    )
    assert result.returncode == 0, result.stderr
    triton = json.loads((tmp_path / "triton.json").read_text())
    by_node = {g["labels"]["node"]: g["targets"] for g in triton}
    gone = next(
        ref for ref in load_cortex_config(fleet_toml_one_down).neurons if ref.name == "gone"
    )
    assert by_node["gone"] == [urlparse(gone.endpoint).netloc]
    assert NODE in by_node


def test_rewrites_in_place_and_promtool_accepts_the_result(
    fleet_toml_one_down: Path, tmp_path: Path
) -> None:
    copy = tmp_path / "prometheus"
    shutil.copytree(SHIPPED, copy)
    for _ in range(2):
        result = cortex(
            "prometheus-targets",
            "--config",
            str(fleet_toml_one_down),
            "--out",
            str(copy / "targets"),
        )
        assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (copy / "targets").iterdir()) == ["gateway.json", "triton.json"]
    check = subprocess.run(
        [program("promtool"), "check", "config", str(copy / "prometheus.yml")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert check.returncode == 0, check.stdout + check.stderr


def test_wildcard_metrics_listen_becomes_a_host_name(tmp_path: Path) -> None:
    config = write_gateway_config(
        tmp_path / "cortex.toml",
        CortexConfig(gateway=GatewaySection(metrics_listen="0.0.0.0:9400")),
    )
    result = cortex("prometheus-targets", "--config", str(config), "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    [group] = json.loads((tmp_path / "gateway.json").read_text())
    host, _, port = group["targets"][0].rpartition(":")
    assert port == "9400" and host not in ("", "0.0.0.0")
    assert json.loads((tmp_path / "triton.json").read_text()) == []


def test_missing_config_is_a_usage_error(tmp_path: Path) -> None:
    result = cortex(
        "prometheus-targets", "--config", str(tmp_path / "nope.toml"), "--out", str(tmp_path)
    )
    assert result.returncode == 2
    assert "nope.toml" in result.stderr
    assert not (tmp_path / "gateway.json").exists()
