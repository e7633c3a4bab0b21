"""The pure planner at fleet scale: time per decision on synthetic fleets of 10, 100 and 1,000
nodes with ten times as many models, under a replayed request trace.

    python benchmarks/planner_scale.py [--nodes 10 100 1000] [--requests 2000] [--seed 0]

Pure: no servers, no I/O. Each node has 1, 2, 4 or 8 devices of 24, 48 or 80 GB and can load
every model (one shared catalogue, as with one model store); models are 2-70 GB, a tenth of
them tp 2. The fleet starts about two thirds full. The trace is Zipf over the models (popular
ones hot, a long tail cold), each request carrying a conversation key. For every request:
  - routing: `choose_replica` (with the conversation's key) when the model is READY somewhere;
  - placement: otherwise `plan_placement` (with its eviction choice), whose first option is
    applied to the simulated fleet, so later decisions see its loads and evictions;
and every 100 requests one eviction cycle: `idle_expired` plus `plan_defrag` and
`plan_scaling` over the whole fleet. A changed node gets a new `NodeView`; the others keep
theirs (and their cached indexes), as between two polls.

Times are the thread's CPU time per decision (`time.thread_time`), so other processes on a
shared machine do not inflate them (wall time would). Prints one table row per fleet size and
decision kind (p50 / p99 / max, in milliseconds) and a machine-readable last line.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from dataclasses import dataclass, field

from control_plane.lifecycle import (
    LoadWindow,
    idle_expired,
    plan_defrag,
    plan_placement,
    plan_scaling,
)
from control_plane.routing import FleetSnapshot, NodeView, choose_replica, merge_catalogues
from cortex.config import EvictionStrategy, ModelProfile, ScalingSection
from cortex.neuron_api import (
    CatalogueEntry,
    GpuInfo,
    LoadedModel,
    NeuronStatus,
    TritonInfo,
    TritonState,
)

GB = 10**9
TRITON = TritonInfo(state=TritonState.LIVE, http_url="", grpc_url="h:1", metrics_url="")


@dataclass
class SimNode:
    name: str
    devices: list[int]  # total bytes per device
    loaded: dict[str, tuple[tuple[int, ...], int, float]] = field(default_factory=dict)

    def used(self) -> dict[int, int]:
        used = dict.fromkeys(range(len(self.devices)), 0)
        for gpus, size, _ in self.loaded.values():
            for gpu in gpus:
                used[gpu] += size // len(gpus)
        return used

    def place(self, model: str, size: int, tp: int, now: float) -> None:
        used = self.used()
        free = sorted(range(len(self.devices)), key=lambda i: used[i] - self.devices[i])
        self.loaded[model] = (tuple(free[:tp]), size, now)


def make_fleet(nodes: int, rng: random.Random) -> tuple[list[SimNode], list[CatalogueEntry]]:
    catalogue = []
    for index in range(nodes * 10):
        size = int(rng.choice((2, 4, 8, 16, 16, 18, 30, 34, 40, 70)) * GB)
        tp = 2 if index % 10 == 9 else 1
        profile = ModelProfile(name=f"m{index:05d}", source="/m", priority=rng.randint(0, 9))
        profile = profile.model_copy(update={"tp": tp, "max_replicas": 2 if index < 20 else 1})
        catalogue.append(CatalogueEntry(profile=profile, estimated_bytes=size, context_length=8192))
    fleet = [
        SimNode(f"n{index:04d}", [rng.choice((24, 48, 80)) * GB] * rng.choice((1, 2, 4, 8)))
        for index in range(nodes)
    ]
    # Start about two thirds full.
    for node in fleet:
        budget = sum(node.devices) * 2 // 3
        while True:
            entry = rng.choice(catalogue)
            need = entry.estimated_bytes // entry.profile.tp
            used = node.used()
            free = [node.devices[i] - used[i] for i in range(len(node.devices))]
            if sum(used.values()) + entry.estimated_bytes > budget:
                break
            if sum(1 for f in free if f >= need) >= entry.profile.tp:
                node.place(entry.profile.name, entry.estimated_bytes, entry.profile.tp, 0.0)
    return fleet, catalogue


def view(
    node: SimNode, catalogue: list[CatalogueEntry], index: dict[str, CatalogueEntry]
) -> NodeView:
    used = node.used()
    status = NeuronStatus.model_construct(
        name=node.name,
        triton=TRITON,
        gpus=[
            GpuInfo.model_construct(
                index=i,
                uuid=f"{node.name}-{i}",
                name="gpu",
                memory_total_bytes=total,
                memory_used_bytes=used[i],
                memory_free_bytes=total - used[i],
                virtual=False,
                processes=[],
            )
            for i, total in enumerate(node.devices)
        ],
        has_gpu=True,
        loaded=[
            LoadedModel.model_construct(
                name=name,
                state="READY",
                engine="torch",
                quantization="none",
                tp=len(gpus),
                gpus=list(gpus),
                memory_bytes=size,
                estimated_bytes=size,
                loaded_at=last,
                load_seconds=1.0,
                in_flight=0,
                last_used=last,
                reason=None,
            )
            for name, (gpus, size, last) in node.loaded.items()
        ],
        catalogue=catalogue,  # one list shared by every node: one model store
        events=[],
    )
    # The catalogue's index is built once per status by the gateway (at each poll): here once.
    return NodeView(node.name, True, status, catalogue_index=index)


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))] if ordered else 0.0


def run(nodes: int, requests: int, seed: int) -> dict[str, dict[str, float]]:
    rng = random.Random(seed)
    fleet, catalogue = make_fleet(nodes, rng)
    sizes = {e.profile.name: e.estimated_bytes for e in catalogue}
    index = {e.profile.name: e for e in catalogue}
    tps = {e.profile.name: e.profile.tp for e in catalogue}
    views = {n.name: view(n, catalogue, index) for n in fleet}
    by_name = {n.name: n for n in fleet}
    names = [e.profile.name for e in catalogue]
    rng.shuffle(names)
    weights = [1 / (rank + 1) ** 1.0 for rank in range(len(names))]
    trace = rng.choices(names, weights, k=requests)
    timings: dict[str, list[float]] = {
        "routing": [],
        "placement": [],
        "eviction cycle": [],
        "defrag plan": [],
        "scaling plan": [],
    }
    window = LoadWindow(30.0)
    rule = ScalingSection()
    clock = 1_000.0
    # One merged catalogue, as the gateway keeps it between catalogue changes.
    merged = merge_catalogues(tuple(views.values()))
    for number, model in enumerate(trace):
        clock += 1.0
        snapshot = FleetSnapshot(tuple(views.values()), merged)
        started = time.thread_time()
        node = choose_replica(snapshot, model, f"conversation-{number % 97}")
        if node is not None:
            timings["routing"].append(time.thread_time() - started)
            gpus, size, _ = by_name[node].loaded[model]
            by_name[node].loaded[model] = (gpus, size, clock)
            views[node] = view(by_name[node], catalogue, index)
        else:
            started = time.thread_time()
            plan = plan_placement(snapshot, model, EvictionStrategy.LRU, time.time())
            timings["placement"].append(time.thread_time() - started)
            if isinstance(plan, list):
                placement = plan[0]
                target = by_name[placement.node]
                for victim in placement.victims:
                    del target.loaded[victim.name]
                target.place(model, sizes[model], tps[model], clock)
                views[target.name] = view(target, catalogue, index)
        if number % 100 == 99:
            snapshot = FleetSnapshot(tuple(views.values()), merged)
            started = time.thread_time()
            idle_expired(snapshot, clock)
            timings["eviction cycle"].append(time.thread_time() - started)
            started = time.thread_time()
            plan_defrag(snapshot)
            timings["defrag plan"].append(time.thread_time() - started)
            started = time.thread_time()
            window.record(snapshot, clock)
            plan_scaling(snapshot, window, rule, EvictionStrategy.LRU, clock)
            timings["scaling plan"].append(time.thread_time() - started)
    return {
        kind: {
            "count": len(values),
            "p50_ms": 1000 * statistics.median(values) if values else 0.0,
            "p99_ms": 1000 * percentile(values, 0.99),
            "max_ms": 1000 * max(values, default=0.0),
        }
        for kind, values in timings.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    results = {}
    print("| nodes | models | decision | count | p50 ms | p99 ms | max ms |")
    print("| ---: | ---: | --- | ---: | ---: | ---: | ---: |")
    for nodes in args.nodes:
        result = run(nodes, args.requests, args.seed)
        results[nodes] = result
        for kind, numbers in result.items():
            print(
                f"| {nodes} | {nodes * 10} | {kind} | {numbers['count']:.0f} | "
                f"{numbers['p50_ms']:.3f} | {numbers['p99_ms']:.3f} | {numbers['max_ms']:.3f} |"
            )
    print(json.dumps({"planner_scale": results}))


if __name__ == "__main__":
    main()
