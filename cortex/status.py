"""`cortex status`: ask every configured neuron for its /status; print a table or JSON."""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table

from cortex.config import CortexConfig
from cortex.neuron_api import NeuronStatus

GIB = 2**30


def collect_status(config: CortexConfig) -> dict[str, Any]:
    neurons: list[dict[str, Any]] = []
    models: list[dict[str, Any]] = []
    for ref in config.neurons:
        headers = {"authorization": f"Bearer {ref.token}"} if ref.token else {}
        try:
            response = httpx.get(f"{ref.endpoint}/status", headers=headers, timeout=5)
            response.raise_for_status()
            status = NeuronStatus.model_validate(response.json())
        except (httpx.HTTPError, ValueError) as error:
            neurons.append(
                {"name": ref.name, "endpoint": ref.endpoint, "up": False, "error": str(error)}
            )
            continue
        neurons.append(
            {
                "name": ref.name,
                "endpoint": ref.endpoint,
                "up": True,
                "triton": status.triton.state,
                "gpus": [g.model_dump() for g in status.gpus],
                "memory_used_bytes": sum(g.memory_used_bytes for g in status.gpus),
                "memory_free_bytes": sum(g.memory_free_bytes for g in status.gpus),
            }
        )
        for model in status.loaded:
            models.append(
                {
                    "model": model.name,
                    "node": ref.name,
                    "state": model.state,
                    "memory_bytes": model.memory_bytes,
                    "in_flight": model.in_flight,
                    "idle_s": None
                    if model.last_used is None
                    else round(time.time() - model.last_used, 1),
                    "pinned": next(
                        (
                            c.profile.pinned
                            for c in status.catalogue
                            if c.profile.name == model.name
                        ),
                        False,
                    ),
                }
            )
    return {"neurons": neurons, "models": models}


def print_status(report: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(report, indent=2))
        return
    console = Console()
    nodes = Table(title="neurons")
    for column in ("name", "up", "triton", "devices", "used GiB", "free GiB"):
        nodes.add_column(column)
    for n in report["neurons"]:
        if not n["up"]:
            nodes.add_row(n["name"], "[red]down[/red]", "-", "-", "-", "-")
            continue
        devices = ", ".join(g["name"] for g in n["gpus"]) or "CPU only"
        nodes.add_row(
            n["name"],
            "[green]up[/green]",
            n["triton"],
            devices,
            f"{n['memory_used_bytes'] / GIB:.2f}",
            f"{n['memory_free_bytes'] / GIB:.2f}",
        )
    console.print(nodes)
    models = Table(title="models")
    for column in ("model", "node", "state", "memory GiB", "in flight", "idle s", "pinned"):
        models.add_column(column)
    for m in report["models"]:
        models.add_row(
            m["model"],
            m["node"],
            m["state"],
            f"{m['memory_bytes'] / GIB:.2f}",
            str(m["in_flight"]),
            str(m["idle_s"]),
            "yes" if m["pinned"] else "no",
        )
    console.print(models)
