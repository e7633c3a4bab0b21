"""Pure lifecycle planning over a fleet snapshot: where a cold model goes and what must leave
for it, which idle models expire, and how to re-pack the fleet. No I/O: `fleet.py` acts on the
plans.

Placement scores each allowed node by what loading there costs:
  1. nodes where the model fits in free memory cost nothing; among them the one left with the
     most free memory wins (large holes stay usable for large models);
  2. otherwise the node whose eviction set is cheapest under the strategy — fewest victims,
     then (priority) the lowest priorities, then (both) the longest idle;
  pinned models, models with requests in flight and models already being unloaded are never
  victims.
Memory is counted per device: a model with tp N needs N devices each with estimate / N free;
loads under way count as taken (`NodeView.device_free`), so plans made at once do not collide.

Replicas: `plan_scaling` adds a replica to a model whose load per replica stayed over the
threshold for a whole window (evicting only models idle for at least that window, so never a
busier one) and removes an idle replica beyond the model's floor; `LoadWindow` keeps the samples.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from control_plane.routing import FleetSnapshot, NodeView, busy
from cortex.config import EvictionStrategy, ScalingSection
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


def residents(node: NodeView) -> list[Resident]:
    if node.status is None:
        return []
    profiles = node.catalogue()
    found = []
    for model in node.status.loaded:
        entry = profiles.get(model.name)
        found.append(
            _resident(
                node,
                model,
                entry.profile.priority if entry else 0,
                entry.profile.pinned if entry else False,
            )
        )
    return found


def _resident(node: NodeView, model: LoadedModel, priority: int, pinned: bool) -> Resident:
    return Resident(
        name=model.name,
        node=node.name,
        gpus=tuple(model.gpus),
        bytes=max(model.memory_bytes, model.estimated_bytes),
        priority=priority,
        pinned=pinned,
        in_flight=busy(node, model.name),
        last_used=model.last_used or model.loaded_at or 0.0,
    )


def _devices(node: NodeView) -> _Devices:
    return _Devices(dict(node.device_free))


def victim_order(strategy: EvictionStrategy, candidates: list[Resident]) -> list[Resident]:
    """Who leaves first: lru → least recently used; priority → lowest priority, then LRU."""
    if strategy is EvictionStrategy.PRIORITY:
        return sorted(candidates, key=lambda r: (r.priority, r.last_used, r.name))
    return sorted(candidates, key=lambda r: (r.last_used, r.name))


VictimOrder = Callable[[list[Resident]], list[Resident]]


def _eviction_for(
    node: NodeView,
    need: int,
    tp: int,
    order: VictimOrder,
    eligible: Callable[[Resident], bool] | None = None,
) -> tuple[Resident, ...] | Refusal:
    devices = _devices(node)
    loaded = [r for r in residents(node) if r.name]
    movable = [
        r for r in loaded if not r.pinned and r.in_flight == 0 and r.name not in node.leaving
    ]
    if eligible is not None:
        movable = [r for r in movable if eligible(r)]
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
    in_use = [r.name for r in loaded if (r.in_flight or r.name in node.leaving) and not r.pinned]
    if pinned and not in_use:
        return Refusal(
            f"{node.name}: only pinned models stand in the way ({', '.join(pinned)})", True
        )
    reasons = []
    if pinned:
        reasons.append(f"pinned: {', '.join(pinned)}")
    if in_use:
        reasons.append(f"requests in flight: {', '.join(in_use)}")
    return Refusal(
        f"{node.name}: no room without evicting models that must stay ({'; '.join(reasons)})"
    )


def plan_placement(
    snapshot: FleetSnapshot,
    model: str,
    strategy: EvictionStrategy,
    order: VictimOrder | None = None,
    exclude: frozenset[str] = frozenset(),
    eligible: Callable[[Resident], bool] | None = None,
) -> list[Placement] | Refusal:
    """Every node that can take the model, best first, each with what must leave for it.

    `order` overrides the strategy's victim order (benchmarks compare against an oracle);
    `exclude` names nodes not to consider (those holding a replica already); `eligible` narrows
    who may be evicted (a new replica may only push out models idle for a while)."""
    victims_first = order or (lambda candidates: victim_order(strategy, candidates))
    options: list[tuple[tuple[float, ...], Placement]] = []
    refusals: list[Refusal] = []
    now = time.time()
    for node in snapshot.nodes:
        entry = node.catalogue().get(model)
        if entry is None or node.status is None or node.name in exclude:
            continue
        if model in node.loaded or model in node.loading:
            continue  # there (or on its way) already
        if not node.status.gpus:  # a CPU node without budgets: the neuron itself decides
            options.append(((0, 0, 0, -node.free_bytes()), Placement(node.name)))
            continue
        tp = entry.profile.tp
        need = entry.estimated_bytes // tp
        if _devices(node).fits(need, tp):  # the common case, without the victims' search
            options.append(
                ((0, 0, 0, entry.estimated_bytes - node.free_bytes()), Placement(node.name))
            )
            continue
        plan = _eviction_for(node, need, tp, victims_first, eligible)
        if isinstance(plan, Refusal):
            refusals.append(plan)
            continue
        left = node.free_bytes() + sum(v.bytes for v in plan) - entry.estimated_bytes
        cost = (
            len(plan),
            sum(v.priority for v in plan) if strategy is EvictionStrategy.PRIORITY else 0,
            -min((now - v.last_used for v in plan), default=0.0),
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
            if (
                ttl is None
                or resident.pinned
                or resident.in_flight
                or resident.name in node.leaving
            ):
                continue
            if now - resident.last_used >= ttl:
                expired.append(resident)
    return expired


def largest_free_block(snapshot: FleetSnapshot) -> int:
    """The largest model (tp 1) that could be loaded now: the most free memory on one device."""
    return max((free for n in snapshot.nodes for free in n.device_free.values()), default=0)


def plan_defrag(snapshot: FleetSnapshot) -> Move | None:
    """One move that makes the largest free block larger, or None.

    Moving model M from node A to node B frees M's memory on A and takes it on B. The best move
    is the one after which the largest free block is largest; it must beat today's. Only tp-1,
    unpinned models move, and only to nodes allowed to hold them. Models with requests in flight
    may move: the move is make-before-break, and the old copy drains before it is unloaded.
    """
    blocks = {
        (n.name, index): free
        for n in snapshot.nodes
        if n.status
        for index, free in n.device_free.items()
    }
    if not blocks:
        return None
    best_now = max(blocks.values())
    best: tuple[int, Move] | None = None
    for source in snapshot.nodes:
        for resident in residents(source):
            if resident.pinned or len(resident.gpus) != 1 or resident.name in source.leaving:
                continue
            for target in snapshot.nodes:
                if target.name == source.name or target.status is None:
                    continue
                if (
                    resident.name not in target.catalogue()
                    or resident.name in target.loaded
                    or resident.name in target.loading
                ):
                    continue
                for index, free in target.device_free.items():
                    if free < resident.bytes:
                        continue
                    after = dict(blocks)
                    after[(source.name, resident.gpus[0])] += resident.bytes
                    after[(target.name, index)] -= resident.bytes
                    gain = max(after.values())
                    if gain > best_now and (best is None or gain > best[0]):
                        best = (gain, Move(resident.name, source.name, target.name))
    return None if best is None else best[1]


def pinned_missing(snapshot: FleetSnapshot) -> list[str]:
    """Pinned models that no up node holds or is loading: to be placed now."""
    return sorted(
        name
        for name, entry in snapshot.catalogue().items()
        if entry.profile.pinned and not snapshot.placed_on(name)
    )


# ---------------------------------------------------------------------------------------------
# Replicas


@dataclass(frozen=True)
class ScaleOut:
    """Load one more replica of `model` where `placement` says."""

    model: str
    placement: Placement
    reason: str


@dataclass(frozen=True)
class ScaleIn:
    """Unload the replica of `model` on `node`."""

    model: str
    node: str


class LoadWindow:
    """Samples of requests in flight per replica, per model, over a sliding window.

    A model's load is sustained when every sample of the last `window_s` seconds was at or over
    the threshold, and the samples cover the whole window: one burst does not add a replica."""

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self._samples: dict[str, deque[tuple[float, float]]] = {}

    def record(self, snapshot: FleetSnapshot, now: float) -> None:
        for model in snapshot.catalogue():
            replicas = snapshot.replicas(model)
            per_replica = sum(busy(n, model) for n in replicas) / len(replicas) if replicas else 0.0
            samples = self._samples.setdefault(model, deque())
            samples.append((now, per_replica))
            while samples and samples[0][0] < now - 2 * self.window_s:
                samples.popleft()

    def sustained(self, model: str, now: float) -> float:
        """The lowest load per replica seen over the last window; 0 if the window is not full."""
        samples = self._samples.get(model)
        if not samples or samples[0][0] > now - self.window_s:
            return 0.0
        return min(load for at, load in samples if at >= now - self.window_s)


def plan_scaling(
    snapshot: FleetSnapshot,
    window: LoadWindow,
    rule: ScalingSection,
    strategy: EvictionStrategy,
    now: float,
) -> list[ScaleOut | ScaleIn]:
    """At most one change per model: a replica more where load stayed high for a whole window
    (or the model has fewer than `min_replicas`), or one fewer where a replica beyond the floor
    has been idle for `idle_s`. Loads under way count as replicas."""
    actions: list[ScaleOut | ScaleIn] = []
    for model, entry in snapshot.catalogue().items():
        profile = entry.profile
        placed = snapshot.placed_on(model)
        if not placed:
            continue  # not wanted now: a request (or pinning) brings the first copy
        reason = ""
        if len(placed) < profile.min_replicas:
            reason = f"{len(placed)} of at least {profile.min_replicas} replicas"
        elif len(placed) < profile.max_replicas:
            load = window.sustained(model, now)
            if load >= rule.in_flight_per_replica:
                reason = f"{load:.1f} requests in flight per replica for {window.window_s:.0f} s"
        if reason:
            plan = plan_placement(
                snapshot,
                model,
                strategy,
                exclude=frozenset(placed),
                eligible=lambda r: now - r.last_used >= window.window_s,
            )
            if not isinstance(plan, Refusal):
                actions.append(ScaleOut(model, plan[0], reason))
            continue
        floor = max(1, profile.min_replicas)
        ready = snapshot.replicas(model)
        if len(placed) > floor and len(ready) == len(placed):
            idle = [
                n
                for n in ready
                if busy(n, model) == 0
                and now - (n.loaded[model].last_used or n.loaded[model].loaded_at or now)
                >= rule.idle_s
            ]
            if idle:
                actions.append(ScaleIn(model, max(idle, key=lambda n: n.name).name))
    return actions
