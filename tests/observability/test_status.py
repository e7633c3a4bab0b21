"""`cortex status` against the running embedded fleet, and with one configured neuron down."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from cortex.status import models_table, neurons_table
from tests.observability.conftest import NODE, cortex


def rows(table: str) -> list[list[str]]:
    """The cells of a rich table's body rows (box-drawn with │)."""
    return [
        [cell.strip() for cell in line.strip().strip("│").split("│")]
        for line in table.splitlines()
        if line.strip().startswith("│")
    ]


@pytest.mark.usefixtures("loaded")
def test_table_shows_the_neuron_up_and_the_model_ready(fleet_toml: Path) -> None:
    result = cortex("status", "--config", str(fleet_toml))
    assert result.returncode == 0, result.stdout + result.stderr
    cells = rows(result.stdout)
    neuron = next(row for row in cells if row[0] == NODE)
    assert neuron[2:4] == ["up", "live"]
    model = next(row for row in cells if row[0] == "cortex-tiny")
    # model, loaded on, state, GiB, in flight, idle for, pinned
    assert model[1:3] == [NODE, "READY"]
    assert float(model[3]) > 0
    assert model[4] == "0"
    assert model[5].endswith(("s", "m"))
    assert model[6] == "yes"  # the embedded models.toml pins it


@pytest.mark.usefixtures("loaded")
def test_json_for_scripts(fleet_toml: Path) -> None:
    result = cortex("status", "--config", str(fleet_toml), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    [neuron] = report["neurons"]
    assert neuron["name"] == NODE and neuron["up"] is True and neuron["triton"] == "live"
    assert {"memory_used_bytes", "memory_free_bytes", "gpus"} <= neuron.keys()
    [model] = [m for m in report["models"] if m["model"] == "cortex-tiny"]
    assert model["node"] == NODE and model["state"] == "READY"
    assert model["pinned"] is True and model["in_flight"] == 0
    assert model["memory_bytes"] > 0 and model["idle_s"] >= 0


@pytest.mark.usefixtures("loaded")
def test_a_neuron_down_fails_and_says_down(fleet_toml_one_down: Path) -> None:
    result = cortex("status", "--config", str(fleet_toml_one_down))
    assert result.returncode == 1
    cells = rows(result.stdout)
    gone = next(row for row in cells if row[0] == "gone")
    assert gone[2].startswith("down")
    assert "refused" in gone[2].lower()
    assert next(row for row in cells if row[0] == NODE)[2] == "up"
    # The neuron that answers still reports its models.
    assert any(row[0] == "cortex-tiny" and row[1] == NODE for row in cells)


@pytest.mark.usefixtures("loaded")
def test_json_with_a_neuron_down(fleet_toml_one_down: Path) -> None:
    result = cortex("status", "--config", str(fleet_toml_one_down), "--json")
    assert result.returncode == 1
    neurons = {n["name"]: n for n in json.loads(result.stdout)["neurons"]}
    assert neurons[NODE]["up"] is True
    assert neurons["gone"]["up"] is False and neurons["gone"]["error"]


def test_a_broken_config_is_a_usage_error(tmp_path: Path) -> None:
    broken = tmp_path / "cortex.toml"
    broken.write_text('[[neurons]]\nname = "a"\nendpoint = "not a url"\n', encoding="utf-8")
    result = cortex("status", "--config", str(broken))
    assert result.returncode == 2
    assert "endpoint" in result.stderr


def test_table_of_a_gpu_fleet_with_an_unloaded_model() -> None:
    gib = 2**30
    gpu = {"index": 0, "name": "NVIDIA H100 80GB HBM3", "memory_total_bytes": 80 * gib}
    report: dict[str, list[dict[str, Any]]] = {
        "neurons": [
            {
                "name": "a",
                "endpoint": "http://10.0.0.11:13131",
                "up": True,
                "triton": "live",
                "gpus": [
                    {**gpu, "memory_used_bytes": 20 * gib},
                    {**gpu, "index": 1, "memory_used_bytes": 0},
                ],
                "memory_used_bytes": 20 * gib,
                "memory_free_bytes": 140 * gib,
            }
        ],
        "models": [
            {
                "model": "llama-70b",
                "node": "a",
                "state": "READY",
                "memory_bytes": 19 * gib,
                "in_flight": 3,
                "idle_s": 3725.0,
                "pinned": False,
            },
            {
                "model": "qwen-7b",
                "node": None,
                "state": "unloaded",
                "memory_bytes": 0,
                "in_flight": 0,
                "idle_s": None,
                "pinned": True,
            },
        ],
    }
    console = Console(width=200, record=True)
    console.print(neurons_table(report["neurons"]))
    console.print(models_table(report["models"]))
    cells = rows(console.export_text())
    assert cells[0][4] == "0: NVIDIA H100 80GB HBM3 (20.00/80.00 GiB)"
    assert cells[1][4] == "1: NVIDIA H100 80GB HBM3 (0.00/80.00 GiB)"
    assert cells[0][5:7] == ["20.00", "140.00"]
    assert cells[2] == ["llama-70b", "a", "READY", "19.00", "3", "1h02m", "no"]
    assert cells[3] == ["qwen-7b", "-", "unloaded", "-", "0", "-", "yes"]
