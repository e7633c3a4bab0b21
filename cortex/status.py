"""`cortex status`: ask every configured neuron for its /status; print tables or JSON.

`collect_status` gathers plain data (what `--json` prints); `print_status` renders it with rich.
A neuron that does not answer is reported down with the reason, never skipped.
"""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from cortex.config import CortexConfig, NeuronRef
from cortex.neuron_api import ModelState, NeuronStatus

GIB = 2**30


def fetch_status(ref: NeuronRef, timeout: float = 5.0) -> NeuronStatus:
    """One neuron's /status; raises httpx.HTTPError or ValueError when it does not answer well."""
    response = httpx.get(f"{ref.endpoint}/status", headers=ref.authorization(), timeout=timeout)
    response.raise_for_status()
    return NeuronStatus.model_validate(response.json())


def _neuron_row(ref: NeuronRef, status: NeuronStatus) -> dict[str, Any]:
    return {
        "name": ref.name,
        "endpoint": ref.endpoint,
        "up": True,
        "triton": status.triton.state,
        "gpus": [g.model_dump() for g in status.gpus],
        "memory_used_bytes": sum(g.memory_used_bytes for g in status.gpus),
        "memory_free_bytes": sum(g.memory_free_bytes for g in status.gpus),
    }


def _model_rows(node: str, status: NeuronStatus, now: float) -> list[dict[str, Any]]:
    pinned = {c.profile.name: c.profile.pinned for c in status.catalogue}
    return [
        {
            "model": model.name,
            "node": node,
            "state": model.state,
            "memory_bytes": model.memory_bytes,
            "in_flight": model.in_flight,
            "idle_s": None if model.last_used is None else round(now - model.last_used, 1),
            "pinned": pinned.get(model.name, False),
        }
        for model in status.loaded
    ]


def collect_status(config: CortexConfig) -> dict[str, Any]:
    """{"neurons": [...], "models": [...], "warnings": [...]}: one model row per loaded replica,
    then one row (node None, state "unloaded") per catalogue model that no answering neuron
    holds; a warning for each pinned model among those."""
    neurons: list[dict[str, Any]] = []
    models: list[dict[str, Any]] = []
    catalogue: dict[str, bool] = {}
    now = time.time()
    for ref in config.neurons:
        try:
            status = fetch_status(ref)
        except (httpx.HTTPError, ValueError) as error:
            reason = str(error) or error.__class__.__name__
            neurons.append(
                {"name": ref.name, "endpoint": ref.endpoint, "up": False, "error": reason}
            )
            continue
        neurons.append(_neuron_row(ref, status))
        models.extend(_model_rows(ref.name, status, now))
        for entry in status.catalogue:
            catalogue.setdefault(entry.profile.name, entry.profile.pinned)
    loaded = {m["model"] for m in models}
    for name, pinned in catalogue.items():
        if name not in loaded:
            models.append(
                {
                    "model": name,
                    "node": None,
                    "state": "unloaded",
                    "memory_bytes": 0,
                    "in_flight": 0,
                    "idle_s": None,
                    "pinned": pinned,
                }
            )
    # A pinned model should be resident somewhere; the gateway keeps trying to place it.
    warnings = [
        f"pinned model {name} is not loaded on any answering neuron (cannot be placed)"
        for name, pinned in catalogue.items()
        if pinned and name not in loaded
    ]
    return {"neurons": neurons, "models": models, "warnings": warnings}


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "never used"
    whole = max(int(seconds), 0)
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    return f"{whole // 3600}h{whole % 3600 // 60:02d}m"


def _gib(value: int) -> str:
    return f"{value / GIB:.2f}"


def neurons_table(neurons: list[dict[str, Any]]) -> Table:
    table = Table(title="neurons")
    for column in ("neuron", "endpoint", "state", "triton", "devices", "used GiB", "free GiB"):
        table.add_column(column)
    for n in neurons:
        if not n["up"]:
            down = f"[red]down[/red]: {escape(n['error'])}"
            table.add_row(escape(n["name"]), escape(n["endpoint"]), down, "-", "-", "-", "-")
            continue
        devices = "\n".join(
            f"{g['index']}: {escape(g['name'])} ({_gib(g['memory_used_bytes'])}/"
            f"{_gib(g['memory_total_bytes'])} GiB)"
            for g in n["gpus"]
        )
        table.add_row(
            escape(n["name"]),
            escape(n["endpoint"]),
            "[green]up[/green]",
            n["triton"],
            devices or "none (CPU)",
            _gib(n["memory_used_bytes"]) if devices else "-",
            _gib(n["memory_free_bytes"]) if devices else "-",
        )
    return table


def models_table(models: list[dict[str, Any]]) -> Table:
    table = Table(title="models")
    for column in ("model", "loaded on", "state", "GiB", "in flight", "idle for", "pinned"):
        table.add_column(column)
    for m in models:
        state = m["state"]
        colour = {
            ModelState.READY: "green",
            ModelState.LOADING: "yellow",
            ModelState.UNLOADING: "yellow",
        }.get(state)
        table.add_row(
            escape(m["model"]),
            escape(m["node"] or "-"),
            f"[{colour}]{state}[/{colour}]" if colour else state,
            _gib(m["memory_bytes"]) if m["node"] else "-",
            str(m["in_flight"]),
            _duration(m["idle_s"]) if m["node"] else "-",
            "yes" if m["pinned"] else "no",
        )
    return table


def print_status(report: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(report, indent=2))
        return
    console = Console()
    console.print(neurons_table(report["neurons"]))
    console.print(models_table(report["models"]))
    for warning in report.get("warnings", []):
        console.print(f"[red]{escape(warning)}[/red]")
