"""A fleet of real neuron agents (each with its own tritonserver) on loopback, with memory
budgets so that tiers differ: `small` holds one tiny-model copy, `medium` two, `large` three.
Gateways are started per scenario over some of them. Started once per module; every test begins
with nothing loaded. The pinned model may live on `large` and `spare` only (a gateway places
it at start), and `m3` may have two replicas."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import free_ports, stop, wait_for
from tests.conftest import start_neuron as start_agent

# Budgets in MiB; one copy of a model below is estimated at ~560 MiB (weights, a 2k-token KV
# budget and the runtime overhead).
TIERS = {"small": 800, "medium": 1400, "large": 2000}


@dataclass
class NeuronProcess:
    name: str
    url: str
    process: subprocess.Popen[bytes]
    log: Path

    def status(self) -> dict:  # type: ignore[type-arg]
        return httpx.get(self.url + "/status", timeout=30).json()

    def loaded(self) -> set[str]:
        return {m["name"] for m in self.status()["loaded"] if m["state"] == "READY"}

    def load(self, model: str) -> None:
        response = httpx.post(self.url + "/models/load", json={"model": model}, timeout=120)
        assert response.status_code == 200, response.text

    def unload_all(self) -> None:
        for model in self.loaded():
            httpx.post(
                self.url + "/models/unload", json={"model": model, "force": True}, timeout=120
            )

    def triton_loads(self, model: str) -> int:
        log = Path(self.log.parent / "state" / "tritonserver.log").read_text(errors="replace")
        return log.count(f"loading: {model}:1")


def models_toml(tiny_model: Path, m1_idle_ttl_s: float | None = None) -> str:
    entries = {
        "m1": "priority = 1" + (f"\nidle_ttl_s = {m1_idle_ttl_s}" if m1_idle_ttl_s else ""),
        "m2": "priority = 5",
        "m3": "priority = 3\nmax_replicas = 2",
        "pin": 'pinned = true\nneurons = ["large", "spare"]',
    }
    return "\n".join(
        f'[[models]]\nname = "{name}"\nsource = "{tiny_model}"\nkv_cache_tokens = 2048\n{extra}\n'
        for name, extra in entries.items()
    )


def start_neuron(
    folder: Path, name: str, budget_mib: int, tiny_model: Path, m1_idle_ttl_s: float | None = None
) -> NeuronProcess:
    handle = start_agent(folder, name, models_toml(tiny_model, m1_idle_ttl_s), [budget_mib])
    return NeuronProcess(name, handle.url, handle.process, handle.log)


@dataclass
class Gateway:
    url: str
    metrics_url: str
    process: subprocess.Popen[bytes]
    log: Path

    def loads(self, model: str) -> float:
        text = httpx.get(self.metrics_url).text
        total = 0.0
        for line in text.splitlines():
            if (
                line.startswith("cortex_model_loads_total{")
                and f'model="{model}"' in line
                and 'outcome="ok"' in line
            ):
                total += float(line.rsplit(" ", 1)[1])
        return total


GatewayFactory = Callable[..., Gateway]


@pytest.fixture(scope="package")
def neurons(
    tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, NeuronProcess]]:
    root = tmp_path_factory.mktemp("fleet")
    started: dict[str, NeuronProcess] = {}
    try:
        for name, budget in TIERS.items():
            started[name] = start_neuron(root / name, name, budget, tiny_model)
        yield started
    finally:
        for neuron in started.values():
            stop(neuron.process, signal.SIGTERM)


@pytest.fixture
def fleet(neurons: dict[str, NeuronProcess]) -> dict[str, NeuronProcess]:
    for neuron in neurons.values():
        neuron.unload_all()
    return neurons


def start_gateway(
    folder: Path,
    members: list[NeuronProcess],
    strategy: str = "lru",
    interval_s: float = 3600,
    defrag_after_cycles: int = 0,
    scaling: str = "",
    poll_interval_s: float = 0.5,
    gateway_settings: str = "",
) -> Gateway:
    """A gateway over `members`, its config and log in `folder`; `gateway_settings` adds lines
    to its [gateway] table."""
    port, metrics = free_ports(2)
    folder.mkdir(parents=True, exist_ok=True)
    neurons = "\n".join(f'[[neurons]]\nname = "{n.name}"\nendpoint = "{n.url}"\n' for n in members)
    (folder / "cortex.toml").write_text(
        f"""
[gateway]
listen = "127.0.0.1:{port}"
metrics_listen = "127.0.0.1:{metrics}"
poll_interval_s = {poll_interval_s}
missed_polls_down = 2
load_timeout_s = 120
{gateway_settings}

[eviction]
strategy = "{strategy}"
interval_s = {interval_s}
defrag_after_cycles = {defrag_after_cycles}

[scaling]
{scaling}

{neurons}
"""
    )
    log = folder / "gateway.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "cortex.cli", "serve", "--config", str(folder / "cortex.toml")],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    wait_for(f"http://127.0.0.1:{port}/health", 60, process)
    return Gateway(
        f"http://127.0.0.1:{port}/v1", f"http://127.0.0.1:{metrics}/metrics", process, log
    )


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[GatewayFactory]:
    started: list[Gateway] = []

    def start(members: list[NeuronProcess], **settings: Any) -> Gateway:
        gateway = start_gateway(tmp_path / f"gateway{len(started)}", members, **settings)
        started.append(gateway)
        return gateway

    yield start
    for gateway in started:
        stop(gateway.process)
