"""Pure lifecycle planning over a fleet snapshot: where a cold model goes and what must leave
for it, which idle models expire, and how to re-pack the fleet. No I/O: `fleet.py` acts on the
plans.

Placement scores each allowed node by what loading there costs:
  1. nodes where the model fits in free memory cost nothing; among them the one left with the
     most free memory wins (large holes stay usable for large models);
  2. otherwise the node whose eviction set is cheapest under the strategy — fewest victims,
     then (priority) the lowest priorities, then (both) the longest idle;
  pinned models and models with requests in flight are never victims.
Memory is counted per device: a model with tp N needs N devices each with estimate / N free.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from control_plane.routing import FleetSnapshot, NodeView
from cortex.config import EvictionStrategy
from cortex.neuron_api import LoadedModel


@dataclass(frozen=True)
class Resident:
    """A loaded model as placement sees it."""

    name: str
    node: str
    gpus: tuple[int, ...]
    bytes: int
    priority: int
    pinned: bool
    in_flight: int
    last_used: float


@dataclass(frozen=True)
class Placement:
    node: str
    victims: tuple[Resident, ...] = ()


@dataclass(frozen=True)
class Refusal:
    reason: str
    blocked_by_pinned: bool = False


@dataclass(frozen=True)
class Move:
    """Load `model` on `target`, then unload it from `source` (make before break)."""

    model: str
    source: str
    target: str


@dataclass
class _Devices:
    free: dict[int, int] = field(default_factory=dict)

    def fits(self, need: int, tp: int) -> bool:
        return sum(1 for f in self.free.values() if f >= need) >= tp


def residents(node: NodeView, gateway_in_flight: bool = True) -> list[Resident]:
    if node.status is None:
        return []
    profiles = {entry.profile.name: entry.profile for entry in node.status.catalogue}
    found = []
    for model in node.status.loaded:
        profile = profiles.get(model.name)
        found.append(
            _resident(
                node,
                model,
                profile.priority if profile else 0,
                profile.pinned if profile else False,
                gateway_in_flight,
            )
        )
    return found


def _resident(
    node: NodeView, model: LoadedModel, priority: int, pinned: bool, count_gateway: bool
) -> Resident:
    in_flight = model.in_flight + (node.in_flight.get(model.name, 0) if count_gateway else 0)
    return Resident(
        name=model.name,
        node=node.name,
        gpus=tuple(model.gpus),
        bytes=max(model.memory_bytes, model.estimated_bytes),
        priority=priority,
        pinned=pinned,
        in_flight=in_flight,
        last_used=model.last_used or model.loaded_at or 0.0,
    )


def _devices(node: NodeView) -> _Devices:
    assert node.status is not None
    return _Devices({g.index: g.memory_free_bytes for g in node.status.gpus})


def victim_order(strategy: EvictionStrategy, candidates: list[Resident]) -> list[Resident]:
    """Who leaves first: lru → least recently used; priority → lowest priority, then LRU."""
    if strategy is EvictionStrategy.PRIORITY:
        return sorted(candidates, key=lambda r: (r.priority, r.last_used, r.name))
    return sorted(candidates, key=lambda r: (r.last_used, r.name))


VictimOrder = Callable[[list[Resident]], list[Resident]]


def _eviction_for(
    node: NodeView, need: int, tp: int, order: VictimOrder
) -> tuple[Resident, ...] | Refusal:
    devices = _devices(node)
    loaded = [r for r in residents(node) if r.name]
    movable = [r for r in loaded if not r.pinned and r.in_flight == 0]
    victims: list[Resident] = []
    for victim in order(movable):
        if devices.fits(need, tp):
            break
        victims.append(victim)
        share = victim.bytes // max(1, len(victim.gpus))
        for gpu in victim.gpus:
            devices.free[gpu] = devices.free.get(gpu, 0) + share
    if devices.fits(need, tp):
        return tuple(victims)
    # Would it fit if the untouchable ones left too? Then say who stands in the way.
    everything = _devices(node)
    for resident in loaded:
        for gpu in resident.gpus:
            everything.free[gpu] = everything.free.get(gpu, 0) + resident.bytes // max(
                1, len(resident.gpus)
            )
    if not everything.fits(need, tp):
        return Refusal(f"{node.name} is too small for it even when empty")
    pinned = [r.name for r in loaded if r.pinned]
    busy = [r.name for r in loaded if r.in_flight and not r.pinned]
    if pinned and not busy:
        return Refusal(
            f"{node.name}: only pinned models stand in the way ({', '.join(pinned)})", True
        )
    reasons = []
    if pinned:
        reasons.append(f"pinned: {', '.join(pinned)}")
    if busy:
        reasons.append(f"requests in flight: {', '.join(busy)}")
    return Refusal(
        f"{node.name}: no room without evicting models that must stay ({'; '.join(reasons)})"
    )


def plan_placement(
    snapshot: FleetSnapshot,
    model: str,
    strategy: EvictionStrategy,
    order: VictimOrder | None = None,
) -> list[Placement] | Refusal:
    """Every node that can take the model, best first, each with what must leave for it.

    `order` overrides the strategy's victim order (benchmarks compare against an oracle)."""
    victims_first = order or (lambda candidates: victim_order(strategy, candidates))
    options: list[tuple[tuple[float, ...], Placement]] = []
    refusals: list[Refusal] = []
    for node in snapshot.nodes:
        entry = node.catalogue().get(model)
        if entry is None or node.status is None:
            continue
        if not node.status.gpus:  # a CPU node without budgets: the neuron itself decides
            options.append(((0, 0, 0, -node.free_bytes()), Placement(node.name)))
            continue
        tp = entry.profile.tp
        need = entry.estimated_bytes // tp
        plan = _eviction_for(node, need, tp, victims_first)
        if isinstance(plan, Refusal):
            refusals.append(plan)
            continue
        left = node.free_bytes() + sum(v.bytes for v in plan) - entry.estimated_bytes
        cost = (
            len(plan),
            sum(v.priority for v in plan) if strategy is EvictionStrategy.PRIORITY else 0,
            -min((time.time() - v.last_used for v in plan), default=0.0),
            -left,
        )
        options.append((cost, Placement(node.name, plan)))
    if options:
        return [placement for _, placement in sorted(options, key=lambda o: (o[0], o[1].node))]
    if not refusals:
        return Refusal(f"no node that may serve {model} is up")
    pinned_only = all(r.blocked_by_pinned for r in refusals)
    return Refusal("; ".join(r.reason for r in refusals), pinned_only)


def idle_expired(snapshot: FleetSnapshot, now: float) -> list[Resident]:
    """Models past their idle TTL, never pinned ones nor ones with requests in flight."""
    expired = []
    for node in snapshot.nodes:
        if node.status is None:
            continue
        ttls = {e.profile.name: e.profile.idle_ttl_s for e in node.status.catalogue}
        for resident in residents(node):
            ttl = ttls.get(resident.name)
            if ttl is None or resident.pinned or resident.in_flight:
                continue
            if now - resident.last_used >= ttl:
                expired.append(resident)
    return expired


def largest_free_block(snapshot: FleetSnapshot) -> int:
    """The largest model (tp 1) that could be loaded now: the most free memory on one device."""
    return max(
        (g.memory_free_bytes for n in snapshot.nodes if n.status for g in n.status.gpus), default=0
    )


def plan_defrag(snapshot: FleetSnapshot) -> Move | None:
    """One move that makes the largest free block larger, or None.

    Moving model M from node A to node B frees M's memory on A and takes it on B. The best move
    is the one after which the largest free block is largest; it must beat today's. Only tp-1,
    unpinned models move, and only to nodes allowed to hold them. Models with requests in flight
    may move: the move is make-before-break, and the old copy drains before it is unloaded.
    """
    blocks = {
        (n.name, g.index): g.memory_free_bytes
        for n in snapshot.nodes
        if n.status
        for g in n.status.gpus
    }
    if not blocks:
        return None
    best_now = max(blocks.values())
    best: tuple[int, Move] | None = None
    for source in snapshot.nodes:
        for resident in residents(source):
            if resident.pinned or len(resident.gpus) != 1:
                continue
            for target in snapshot.nodes:
                if target.name == source.name or target.status is None:
                    continue
                if (
                    resident.name not in target.catalogue()
                    or resident.name in target.ready_models()
                ):
                    continue
                for gpu in target.status.gpus:
                    if gpu.memory_free_bytes < resident.bytes:
                        continue
                    after = dict(blocks)
                    after[(source.name, resident.gpus[0])] += resident.bytes
                    after[(target.name, gpu.index)] -= resident.bytes
                    gain = max(after.values())
                    if gain > best_now and (best is None or gain > best[0]):
                        best = (gain, Move(resident.name, source.name, target.name))
    return None if best is None else best[1]
