"""`cortex prometheus-targets`: the file_sd target lists that containers/prometheus/prometheus.yml
reads, written from cortex.toml.

    gateway.json  the gateway's metrics_listen                      (job cortex-gateway)
    triton.json   every neuron's Triton metrics endpoint, with a    (job triton)
                  `node` label equal to the neuron's name, so Triton's nv_* series line up
                  with the gateway's cortex_* series in queries and the Grafana dashboard

A Triton target is the neuron endpoint's host with the metrics port that neuron reports in its
/status (the neuron only knows its loopback address). A neuron that does not answer keeps a
target on Triton's default port, so Prometheus shows it down instead of forgetting it. Files
are replaced atomically: Prometheus re-reads them on change.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx

from cortex.config import CortexConfig, NeuronRef, split_host_port
from cortex.status import fetch_status

TRITON_DEFAULT_METRICS_PORT = 8002
GATEWAY_FILE = "gateway.json"
TRITON_FILE = "triton.json"
WILDCARD_HOSTS = frozenset({"", "0.0.0.0", "::"})

TargetGroup = dict[str, Any]


@dataclass
class Targets:
    gateway: list[TargetGroup]
    triton: list[TargetGroup]
    # One line per neuron whose Triton port had to be assumed.
    warnings: list[str] = field(default_factory=list)


def host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def gateway_target(config: CortexConfig) -> str:
    """metrics_listen as a scrapeable address: a wildcard bind becomes this machine's name."""
    host, port = split_host_port(config.gateway.metrics_listen)
    if host in WILDCARD_HOSTS:
        host = socket.gethostname()
    return host_port(host, port)


def triton_target(ref: NeuronRef, metrics_url: str | None) -> str:
    host = urlparse(ref.endpoint).hostname or "localhost"
    port = urlparse(metrics_url).port if metrics_url else None
    return host_port(host, port or TRITON_DEFAULT_METRICS_PORT)


def build_targets(config: CortexConfig) -> Targets:
    """Ask every neuron where its Triton serves metrics; the target groups to write."""
    triton: list[TargetGroup] = []
    warnings: list[str] = []
    for ref in config.neurons:
        try:
            metrics_url: str | None = fetch_status(ref).triton.metrics_url
        except (httpx.HTTPError, ValueError) as error:
            metrics_url = None
            warnings.append(
                f"{ref.name} did not answer ({error.__class__.__name__}); "
                f"assumed Triton metrics on :{TRITON_DEFAULT_METRICS_PORT}"
            )
        triton.append({"targets": [triton_target(ref, metrics_url)], "labels": {"node": ref.name}})
    gateway: list[TargetGroup] = [{"targets": [gateway_target(config)], "labels": {}}]
    return Targets(gateway=gateway, triton=triton, warnings=warnings)


def _write_atomically(path: Path, groups: list[TargetGroup]) -> None:
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(handle, "w", encoding="utf-8") as file:
        json.dump(groups, file, indent=2)
        file.write("\n")
    os.chmod(temporary, 0o644)
    os.replace(temporary, path)


def write_targets(config: CortexConfig, folder: Path) -> Targets:
    """Write gateway.json and triton.json into `folder` (made if missing)."""
    targets = build_targets(config)
    folder.mkdir(parents=True, exist_ok=True)
    _write_atomically(folder / GATEWAY_FILE, targets.gateway)
    _write_atomically(folder / TRITON_FILE, targets.triton)
    return targets
