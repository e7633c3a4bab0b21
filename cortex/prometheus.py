"""`cortex prometheus-targets`: the file_sd target lists that containers/prometheus/prometheus.yml
reads, written from cortex.toml.

    gateway.json  the gateway's metrics_listen                      (job cortex-gateway)
    triton.json   every neuron's /metrics, which re-exports its     (job triton)
                  node's Triton metrics, with a `node` label equal
                  to the neuron's name, so Triton's nv_* series line
                  up with the gateway's cortex_* series in queries
                  and the Grafana dashboard

Triton serves its metrics on the node's loopback only (`neuron_agent.triton` says why): a
Triton target is the neuron's own endpoint, scraped with the neuron's bearer token (the triton
job's `credentials_file`). Files are replaced atomically: Prometheus re-reads them on change.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from cortex.config import CortexConfig, NeuronRef, split_host_port

GATEWAY_FILE = "gateway.json"
TRITON_FILE = "triton.json"
WILDCARD_HOSTS = frozenset({"", "0.0.0.0", "::"})

TargetGroup = dict[str, Any]


@dataclass
class Targets:
    gateway: list[TargetGroup]
    triton: list[TargetGroup]


def host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def gateway_target(config: CortexConfig) -> str:
    """metrics_listen as a scrapeable address: a wildcard bind becomes this machine's name."""
    host, port = split_host_port(config.gateway.metrics_listen)
    if host in WILDCARD_HOSTS:
        host = socket.gethostname()
    return host_port(host, port)


def triton_group(ref: NeuronRef) -> TargetGroup:
    """The neuron's endpoint, where its /metrics serves its Triton's series."""
    endpoint = urlparse(ref.endpoint)
    labels = {"node": ref.name}
    if endpoint.scheme == "https":
        labels["__scheme__"] = "https"
    return {"targets": [endpoint.netloc], "labels": labels}


def build_targets(config: CortexConfig) -> Targets:
    gateway: list[TargetGroup] = [{"targets": [gateway_target(config)], "labels": {}}]
    return Targets(gateway=gateway, triton=[triton_group(ref) for ref in config.neurons])


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
