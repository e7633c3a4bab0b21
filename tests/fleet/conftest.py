"""A fleet of real neuron agents (each with its own tritonserver) on loopback, with memory
budgets so that tiers differ: `small` holds one tiny-model copy, `medium` two, `large` three.
Gateways are started per scenario over some of them. Started once per module; every test begins
with nothing loaded. The pinned model may live on `large` and `spare` only (a gateway places
it at start), and `m3` may have two replicas."""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from cortex.config import EvictionSection, EvictionStrategy, ModelProfile, ScalingSection
from cortex.launch import (
    Neuron,
    loopback_gateway,
    loopback_neuron,
    running_gateway,
    start_neuron,
)

# Budgets in MiB; one copy of a model below is estimated at ~560 MiB (weights, a 2k-token KV
# budget and the runtime overhead).
TIERS = {"small": 800, "medium": 1400, "large": 2000}


@dataclass
class NeuronProcess(Neuron):
    """A tier's neuron agent, with the calls these tests make."""

    @classmethod
    def of(cls, neuron: Neuron) -> NeuronProcess:
        return cls(neuron.process, neuron.url, neuron.log, what=neuron.what, config=neuron.config)

    @property
    def name(self) -> str:
        return self.config.neuron.name

    @property
    def headers(self) -> dict[str, str]:
        token = self.config.neuron.token
        return {"authorization": f"Bearer {token}"} if token else {}

    def status(self) -> dict[str, Any]:
        report: dict[str, Any] = httpx.get(
            self.url + "/status", headers=self.headers, timeout=30
        ).json()
        return report

    def loaded(self) -> set[str]:
        return {m["name"] for m in self.status()["loaded"] if m["state"] == "READY"}

    def asleep(self) -> set[str]:
        return {m["name"] for m in self.status()["loaded"] if m["state"] == "ASLEEP"}

    def load(self, model: str) -> None:
        response = httpx.post(
            self.url + "/models/load", json={"model": model}, headers=self.headers, timeout=120
        )
        assert response.status_code == 200, response.text

    def unload_all(self) -> None:
        for model in self.loaded() | self.asleep():
            httpx.post(
                self.url + "/models/unload",
                json={"model": model, "force": True},
                headers=self.headers,
                timeout=120,
            )

    def triton_loads(self, model: str) -> int:
        log = Path(self.log.parent / "state" / "tritonserver.log").read_text(errors="replace")
        return log.count(f"loading: {model}:1")


def tier_models(
    tiny_model: Path,
    m1_idle_ttl_s: float | None = None,
    pinned_on: tuple[str, ...] = ("large", "spare"),
) -> list[ModelProfile]:
    def tiny(name: str, **settings: Any) -> ModelProfile:
        return ModelProfile(name=name, source=str(tiny_model), kv_cache_tokens=2048, **settings)

    return [
        tiny("m1", priority=1, idle_ttl_s=m1_idle_ttl_s),
        tiny("m2", priority=5),
        tiny("m3", priority=3, max_replicas=2),
        tiny("pin", pinned=True, neurons=pinned_on),
    ]


def start_tier_neuron(
    folder: Path,
    name: str,
    budget_mib: int,
    tiny_model: Path,
    m1_idle_ttl_s: float | None = None,
    *,
    pinned_on: tuple[str, ...] = ("large", "spare"),
    token: str | None = None,
) -> NeuronProcess:
    """A neuron with one memory budget serving the tier models, once healthy; the caller stops
    it (`.stop()`). `pinned_on` (empty: any node) says where the pinned model may live; `token`
    is the bearer token its API asks for."""
    config = loopback_neuron(
        folder,
        name,
        tier_models(tiny_model, m1_idle_ttl_s, pinned_on),
        memory_budget_mib=[budget_mib],
        token=token,
    )
    return NeuronProcess.of(start_neuron(config)).healthy(120)


@dataclass
class Gateway:
    url: str  # with /v1
    metrics_url: str
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
    with ExitStack() as stack:
        started: dict[str, NeuronProcess] = {}
        for name, budget in TIERS.items():
            started[name] = start_tier_neuron(root / name, name, budget, tiny_model)
            stack.callback(started[name].stop)
        yield started


@pytest.fixture
def fleet(neurons: dict[str, NeuronProcess]) -> dict[str, NeuronProcess]:
    # Every neuron at once: one after another this took ~65 s of a loaded CI run.
    with concurrent.futures.ThreadPoolExecutor() as pool:
        list(pool.map(NeuronProcess.unload_all, neurons.values()))
    return neurons


@contextmanager
def fleet_gateway(
    folder: Path,
    members: list[NeuronProcess],
    strategy: str = "lru",
    interval_s: float = 3600,
    defrag_after_cycles: int = 0,
    scaling: ScalingSection | None = None,
    poll_interval_s: float = 0.5,
    eviction: dict[str, Any] | None = None,
    **gateway: Any,
) -> Iterator[Gateway]:
    """A gateway over `members`, its config and log in `folder`, stopped after; `eviction`
    sets other `[eviction]` keys, `gateway` other `[gateway]` keys."""
    config = loopback_gateway(
        {n.name: n.url for n in members},
        eviction=EvictionSection(
            strategy=EvictionStrategy(strategy),
            interval_s=interval_s,
            defrag_after_cycles=defrag_after_cycles,
            **(eviction or {}),
        ),
        scaling=scaling,
        poll_interval_s=poll_interval_s,
        missed_polls_down=2,
        load_timeout_s=120,
        **gateway,
    )
    with running_gateway(folder / "cortex.toml", config) as running:
        yield Gateway(running.url + "/v1", running.metrics_url, running.log)


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[GatewayFactory]:
    with ExitStack() as stack:
        started: list[Gateway] = []

        def start(members: list[NeuronProcess], **settings: Any) -> Gateway:
            folder = tmp_path / f"gateway{len(started)}"
            started.append(stack.enter_context(fleet_gateway(folder, members, **settings)))
            return started[-1]

        yield start
