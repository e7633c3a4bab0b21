"""Trace replay through the placement planner: hit rate and loads of `lru`, `priority` and
`demand` against an
offline oracle (Belady: evict what is next used farthest in the future), on one synthetic
multi-model trace over a fleet of different GPU sizes.

    python benchmarks/eviction_trace.py [--requests 6000] [--seed 0]

Pure: no servers. Each request advances the clock one second; a request for a model loaded
anywhere is a hit, otherwise the planner places it (evicting as its plan says). The oracle uses
the same planner with the worth of each model replaced by its next use (victims: the ones
needed farthest ahead, on whichever node loses the least), so only the eviction choice
differs. With models of different sizes Belady's rule is a strong offline baseline, not a
proven optimum: an online policy that beat it would say the oracle is weak, not the policy
good.
"""

from __future__ import annotations

import argparse
import bisect
import random
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

from control_plane.lifecycle import Demand, Placement, Resident, plan_placement
from control_plane.routing import FleetSnapshot, NodeView
from cortex.config import EvictionStrategy, ModelProfile
from cortex.neuron_api import (
    CatalogueEntry,
    GpuInfo,
    LoadedModel,
    ModelState,
    NeuronStatus,
    TritonInfo,
    TritonState,
)

GB = 10**9
# The demand strategy's half-life, in requests (one request a second here).
HALF_LIFE_S = 60.0
NODES = {"h100": 80 * GB, "l40s": 48 * GB, "4090": 24 * GB}
# name: (GB, priority). Priorities as an operator would set them: the popular assistants high.
MODELS = {
    "llama-70b-int4": (40, 9),
    "qwen-32b-fp8": (34, 8),
    "llama-8b": (18, 7),
    "qwen-14b": (30, 6),
    "mistral-7b": (16, 5),
    "qwen-7b": (16, 5),
    "phi-3": (9, 3),
    "gemma-9b": (20, 3),
    "coder-33b": (36, 6),
    "coder-7b": (16, 4),
    "embed-like-1b": (4, 2),
    "llama-3b": (8, 2),
}


def make_trace(requests: int, seed: int) -> list[str]:
    """Zipf popularity whose ranking reshuffles every phase (the working set drifts), in bursts."""
    rng = random.Random(seed)
    names = sorted(MODELS)
    trace: list[str] = []
    while len(trace) < requests:
        rng.shuffle(names)
        weights = [1 / (rank + 1) ** 1.1 for rank in range(len(names))]
        for _ in range(requests // 8):
            model = rng.choices(names, weights)[0]
            trace.extend([model] * rng.randint(1, 4))  # a client's burst
    return trace[:requests]


@dataclass
class Sim:
    loaded: dict[str, dict[str, float]] = field(default_factory=lambda: defaultdict(dict))

    def snapshot(self, clock: float) -> FleetSnapshot:
        nodes = []
        for name, total in NODES.items():
            used = sum(MODELS[m][0] * GB for m in self.loaded[name])
            status = NeuronStatus(
                name=name,
                triton=TritonInfo(
                    state=TritonState.LIVE, http_url="", grpc_url="h:1", metrics_url=""
                ),
                gpus=[
                    GpuInfo(
                        index=0,
                        uuid=name,
                        name=name,
                        memory_total_bytes=total,
                        memory_used_bytes=used,
                        memory_free_bytes=total - used,
                    )
                ],
                has_gpu=True,
                loaded=[
                    LoadedModel(
                        name=m,
                        state=ModelState.READY,
                        engine="trtllm",
                        quantization="none",
                        tp=1,
                        gpus=[0],
                        memory_bytes=MODELS[m][0] * GB,
                        estimated_bytes=MODELS[m][0] * GB,
                        loaded_at=last,
                        last_used=last,
                    )
                    for m, last in self.loaded[name].items()
                ],
                catalogue=[
                    CatalogueEntry(
                        profile=ModelProfile(name=m, source="/m", priority=p),
                        estimated_bytes=size * GB,
                        context_length=8192,
                    )
                    for m, (size, p) in MODELS.items()
                ],
            )
            nodes.append(NodeView(name, True, status))
        return FleetSnapshot(tuple(nodes))


def replay(trace: list[str], strategy: EvictionStrategy, oracle: bool) -> tuple[float, int]:
    uses: dict[str, list[int]] = defaultdict(list)
    for index, model in enumerate(trace):
        uses[model].append(index)
    sim = Sim()
    demand = Demand(HALF_LIFE_S)
    hits = loads = 0
    for index, model in enumerate(trace):
        clock = float(index)
        demand.record(model, clock)  # as the gateway counts a request that reaches a node
        holder = next((n for n, models in sim.loaded.items() if model in models), None)
        if holder is not None:
            hits += 1
            sim.loaded[holder][model] = clock
            continue

        def soon_needed(resident: Resident, now: int = index) -> float:
            """The oracle's worth of keeping a model: 1 / requests until its next use (0 when
            never used again), so victims are the ones needed farthest ahead (Belady), also
            when choosing between nodes."""
            later = uses[resident.name]
            position = bisect.bisect_right(later, now)
            return 1 / (later[position] - now) if position < len(later) else 0.0

        if oracle:
            value: Callable[[Resident], float] | None = soon_needed
        elif strategy is EvictionStrategy.DEMAND:
            value = demand.per_byte(clock)
        else:
            value = None
        plan = plan_placement(sim.snapshot(clock), model, strategy, clock, value)
        assert isinstance(plan, list), plan
        placement: Placement = plan[0]
        for victim in placement.victims:
            del sim.loaded[victim.node][victim.name]
        sim.loaded[placement.node][model] = clock
        loads += 1
    return hits / len(trace), loads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=6000)
    parser.add_argument("--seeds", type=int, default=5, help="traces to average over")
    args = parser.parse_args()
    total = sum(NODES.values()) / GB
    needed = sum(size for size, _ in MODELS.values())
    print(
        f"fleet {total:.0f} GB over {len(NODES)} nodes; {len(MODELS)} models need {needed} GB; "
        f"{args.requests} requests per trace, {args.seeds} traces"
    )
    print("| policy | hit rate (mean) | loads (mean) | hit rate per trace |")
    print("| --- | --- | --- | --- |")
    traces = [make_trace(args.requests, seed) for seed in range(args.seeds)]
    for label, strategy, oracle in (
        ("lru", EvictionStrategy.LRU, False),
        ("priority", EvictionStrategy.PRIORITY, False),
        (f"demand (half-life {HALF_LIFE_S:.0f} requests)", EvictionStrategy.DEMAND, False),
        ("Belady (offline oracle)", EvictionStrategy.LRU, True),
    ):
        results = [replay(trace, strategy, oracle) for trace in traces]
        rates = [rate for rate, _ in results]
        mean_loads = sum(loads for _, loads in results) / len(results)
        per_trace = " ".join(f"{rate:.3f}" for rate in rates)
        print(f"| {label} | {sum(rates) / len(rates):.3f} | {mean_loads:.0f} | {per_trace} |")


if __name__ == "__main__":
    main()
