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

Residency tiers: a model may be ASLEEP on a node (its process kept, its device memory given
back; it wakes in about a second). Placement prefers waking such a copy to loading one
anywhere else, unless that node is much busier: more than `busier_slack` requests in flight
(all its models together) beyond the least busy other node that may take the model — the
gateway passes `[gateway] affinity_slack`, the measure prefix-aware routing uses for "much
busier". A victim that can sleep sleeps when its node's host budget holds its weights beside
what the budget has given out already (sleeping models, and the host KV tier of every model
there, awake or asleep: `host_held`), else it is unloaded; idle models sleep after their
`sleep_after_s` (`idle_sleepers`) and leave after their idle TTL, asleep or not
(`idle_expired`).

Swap-aware queueing (`swap.py` orders the waiters): models with requests in flight, and those
made resident less than `min_resident_s` ago, are not victims — unless the plan is made for a
model whose oldest request waited past the bound (`yielding`): then they are, idle ones first.

Replicas: `plan_scaling` adds a replica to a model whose load per replica stayed over the
threshold for a whole window (evicting only models idle for at least that window, so never a
busier one) and removes an idle replica beyond the model's floor; `LoadWindow` keeps the samples.
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from control_plane.routing import FleetSnapshot, NodeView, busy
from cortex.config import EvictionStrategy, ScalingSection
from cortex.neuron_api import CatalogueEntry, LoadedModel, ModelState


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
    # READY; a model still loading (or unloading) is never a victim nor idle.
    ready: bool = True
    # ASLEEP: `bytes` is what it still holds on its devices; it is woken, never a victim.
    asleep: bool = False
    can_sleep: bool = False
    host_bytes_asleep: int = 0  # host memory it holds once asleep
    resident_since: float = 0.0  # when it last became READY (loaded or woken)


@dataclass(frozen=True)
class Placement:
    node: str
    victims: tuple[Resident, ...] = ()
    # Victims that go to sleep rather than leave (`sleepers`); the model is woken, not loaded,
    # where it sleeps on this node.
    sleepers: frozenset[str] = frozenset()
    wake: bool = False


@dataclass(frozen=True)
class Refusal:
    """No node takes the model now. `wait`: what stands in the way changes by itself (a load or
    unload under way, requests in flight), so the caller waits for the fleet to change and plans
    again (bounded by its load timeout) rather than failing; without it the fleet cannot hold
    the model as it is configured (too large, or only pinned models in the way)."""

    reason: str
    blocked_by_pinned: bool = False
    wait: bool = False


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
    """The models loaded on the node as placement sees them (computed once per view)."""
    cached: list[Resident] | None = node.memo.get("residents")
    if cached is None:
        cached = node.memo["residents"] = _residents(node)
    return cached


def _residents(node: NodeView) -> list[Resident]:
    if node.status is None:
        return []
    profiles = node.catalogue()
    found = []
    for model in node.status.loaded:
        found.append(_resident(node, model, profiles.get(model.name)))
    return found


def _resident(node: NodeView, model: LoadedModel, entry: CatalogueEntry | None) -> Resident:
    asleep = model.state == ModelState.ASLEEP
    return Resident(
        name=model.name,
        node=node.name,
        gpus=tuple(model.gpus),
        bytes=model.memory_bytes if asleep else max(model.memory_bytes, model.estimated_bytes),
        priority=entry.profile.priority if entry else 0,
        pinned=entry.profile.pinned if entry else False,
        in_flight=busy(node, model.name),
        last_used=model.last_used or model.loaded_at or 0.0,
        ready=model.state == ModelState.READY,
        asleep=asleep,
        can_sleep=entry.can_sleep if entry else False,
        host_bytes_asleep=entry.host_bytes_asleep if entry else 0,
        resident_since=model.resident_since or model.loaded_at or 0.0,
    )


def resident_for(min_seconds: float, now: float) -> Callable[[Resident], bool] | None:
    """Who may be evicted under `min_resident_s`: models READY for at least that long."""
    if min_seconds <= 0:
        return None
    return lambda resident: now - resident.resident_since >= min_seconds


def host_held(node: NodeView) -> int:
    """Host memory the node's budget has given out, as its neuron counts it: what sleeping
    models hold, and the host KV tier (`host_kv_cache_gib`) of every model there, awake or
    asleep (held from its load to its unload)."""
    if node.status is None:
        return 0
    catalogue = node.catalogue()
    tiers = sum(
        catalogue[m.name].profile.host_kv_cache_bytes
        for m in node.status.loaded
        if m.name in catalogue
    )
    return node.status.host_memory_asleep_bytes + tiers


def sleepers(
    node: NodeView, victims: tuple[Resident, ...], incoming_host_bytes: int = 0
) -> frozenset[str]:
    """Which of a plan's victims sleep rather than leave: those whose engine can, in order,
    while the node's host budget holds their weights beside what it has given out already
    (`host_held`) and the host KV tier of the model coming in (`incoming_host_bytes`)."""
    if node.status is None:
        return frozenset()
    room = node.status.host_memory_budget_bytes - host_held(node) - incoming_host_bytes
    chosen = []
    for victim in victims:
        if victim.can_sleep and victim.host_bytes_asleep <= room:
            room -= victim.host_bytes_asleep
            chosen.append(victim.name)
    return frozenset(chosen)


def _oldest_evictable(node: NodeView) -> float | None:
    """When the longest-idle model that may be evicted was last used (None: no such model)."""
    if "oldest" not in node.memo:
        node.memo["oldest"] = min(
            (
                r.last_used
                for r in residents(node)
                if r.ready and not r.pinned and r.in_flight == 0 and r.name not in node.leaving
            ),
            default=None,
        )
    oldest: float | None = node.memo["oldest"]
    return oldest


def _devices(node: NodeView) -> _Devices:
    return _Devices(dict(node.device_free))


def victim_order(
    strategy: EvictionStrategy,
    candidates: list[Resident],
    value: Callable[[Resident], float] | None = None,
) -> list[Resident]:
    """Who leaves first: by `value` (least valuable first) when one is given — the `demand`
    strategy's recent requests per byte, or a benchmark's oracle; lru → least recently used;
    priority → lowest priority, then LRU."""
    if value is not None:
        return sorted(candidates, key=lambda r: (value(r), r.last_used, r.name))
    if strategy is EvictionStrategy.PRIORITY:
        return sorted(candidates, key=lambda r: (r.priority, r.last_used, r.name))
    return sorted(candidates, key=lambda r: (r.last_used, r.name))


VictimOrder = Callable[[list[Resident]], list[Resident]]


class Demand:
    """Requests per model, decayed exponentially with a half-life: what the `demand` strategy
    keeps. A model's worth is its recent demand per byte it holds (GreedyDual-Size-Frequency
    with load cost proportional to size): a large model must be asked for more to stay."""

    def __init__(self, half_life_s: float) -> None:
        self._rate = math.log(2) / half_life_s
        self._counts: dict[str, tuple[float, float]] = {}  # model → (count, as of)

    def record(self, model: str, now: float) -> None:
        self._counts[model] = (self.value(model, now) + 1.0, now)

    def value(self, model: str, now: float) -> float:
        count, at = self._counts.get(model, (0.0, now))
        return count * math.exp(-self._rate * max(0.0, now - at))

    def per_byte(self, now: float) -> Callable[[Resident], float]:
        return lambda resident: self.value(resident.name, now) / max(1, resident.bytes)


def _eviction_for(
    node: NodeView,
    need: int,
    tp: int,
    order: VictimOrder,
    eligible: Callable[[Resident], bool] | None = None,
    yielding: bool = False,
) -> tuple[Resident, ...] | Refusal:
    assert node.status is not None  # callers pass up nodes with a status
    devices = _devices(node)
    loaded = [r for r in residents(node) if r.name]
    movable = [
        r
        for r in loaded
        if r.ready
        and not r.pinned
        and (yielding or r.in_flight == 0)
        and r.name not in node.leaving
    ]
    if eligible is not None:
        movable = [r for r in movable if eligible(r)]
    victims: list[Resident] = []
    # Busy models yield only after every idle one is gone (a stable sort keeps the order).
    for victim in sorted(order(movable), key=lambda r: r.in_flight > 0):
        if devices.fits(need, tp):
            break
        victims.append(victim)
        share = victim.bytes // max(1, len(victim.gpus))
        for gpu in victim.gpus:
            devices.free[gpu] = devices.free.get(gpu, 0) + share
    if devices.fits(need, tp):
        return tuple(victims)
    # Would it fit if the untouchable ones left too (and loads this gateway has under way
    # here were not counted)? Then say who stands in the way.
    everything = _Devices({g.index: g.memory_free_bytes for g in node.status.gpus})
    for resident in loaded:
        for gpu in resident.gpus:
            everything.free[gpu] = everything.free.get(gpu, 0) + resident.bytes // max(
                1, len(resident.gpus)
            )
    if not everything.fits(need, tp):
        return Refusal(f"{node.name} is too small for it even when empty")
    pinned = [r.name for r in loaded if r.pinned]
    in_use = [
        r.name
        for r in loaded
        if r.ready and (r.in_flight or r.name in node.leaving) and not r.pinned
    ]
    held_back = [
        r.name
        for r in loaded
        if eligible is not None
        and r.ready
        and not r.pinned
        and not r.in_flight
        and r.name not in node.leaving
        and not eligible(r)
    ]
    changing = [r.name for r in loaded if not r.ready and not r.asleep and not r.pinned]
    changing += sorted(set(node.loading) - {r.name for r in loaded})
    if pinned and not in_use and not changing and not held_back:
        return Refusal(
            f"{node.name}: only pinned models stand in the way ({', '.join(pinned)})", True
        )
    reasons = []
    if pinned:
        reasons.append(f"pinned: {', '.join(pinned)}")
    if in_use:
        reasons.append(f"requests in flight: {', '.join(in_use)}")
    if changing:
        reasons.append(f"loading or unloading: {', '.join(changing)}")
    if held_back:
        reasons.append(f"too recently loaded or woken: {', '.join(held_back)}")
    return Refusal(
        f"{node.name}: no room without evicting models that must stay ({'; '.join(reasons)})",
        wait=True,
    )


def node_load(node: NodeView) -> int:
    """Requests in flight on the node, all its models together."""
    return sum(busy(node, model) for model in {*node.loaded, *node.in_flight})


def plan_placement(
    snapshot: FleetSnapshot,
    model: str,
    strategy: EvictionStrategy,
    now: float,
    value: Callable[[Resident], float] | None = None,
    exclude: frozenset[str] = frozenset(),
    eligible: Callable[[Resident], bool] | None = None,
    yielding: bool = False,
    busier_slack: int | None = None,
) -> list[Placement] | Refusal:
    """Every node that can take the model, best first, each with what must leave for it.
    When some node takes it without evicting anything, only such nodes are listed: no plan
    that evicts can be cheaper, and the eviction search is skipped.

    Every up node that may serve the model is considered. The refusal, when no node takes it,
    says whether waiting helps (`Refusal.wait`): a copy is being loaded or unloaded somewhere,
    or some node would have room once its loads, unloads or requests in flight are done.

    `value` says what keeping a model is worth (never negative): victims are the least
    valuable, and among nodes the one losing the least value wins (after the fewest victims);
    `exclude` names nodes not to consider (those holding a replica already); `eligible` narrows
    who may be evicted (a new replica may only push out models idle for a while).

    `yielding`: the model's oldest request has waited past the swap bound, so models with
    requests in flight may be victims too (after the idle ones; the caller lets their streams
    finish first). `busier_slack`: a sleeping copy is woken first unless its node has more than
    this many requests in flight beyond the least busy other node that may take the model; then
    it ranks after every other plan (None: always first)."""

    def victims_first(candidates: list[Resident]) -> list[Resident]:
        return victim_order(strategy, candidates, value)

    options: list[tuple[tuple[float, ...], Placement]] = []
    crowded: list[tuple[NodeView, CatalogueEntry]] = []
    much_busier: list[tuple[tuple[float, ...], Placement]] = []
    least_load = _least_load_elsewhere(snapshot, model, exclude) if busier_slack is not None else {}
    asleep_on: set[str] = set()
    refusals: list[Refusal] = []
    for node in snapshot.nodes:
        entry = node.catalogue().get(model)
        if entry is None or node.status is None or node.name in exclude:
            continue
        reported = node.loaded.get(model)
        if model in node.loading or (reported is not None and reported.state == ModelState.LOADING):
            refusals.append(Refusal(f"{model} is being loaded on {node.name}", wait=True))
            continue
        if model in node.leaving or (
            reported is not None and reported.state == ModelState.UNLOADING
        ):
            refusals.append(Refusal(f"{model} is being unloaded on {node.name}", wait=True))
            continue
        if reported is not None and reported.state == ModelState.READY:
            if model in node.draining:
                refusals.append(Refusal(f"{model} is being moved off {node.name}", wait=True))
            continue  # there already (a replica the caller excluded, or not yet routed to)
        if reported is not None and reported.state == ModelState.ASLEEP:
            # Waking costs a copy, a cold load a process, its imports and the checkpoint: a
            # sleeping copy that fits beats any other node (first in the cost order).
            asleep_on.add(node.name)
            load = node_load(node)
            others = least_load.get(node.name)
            if busier_slack is not None and others is not None and load - others > busier_slack:
                # Much busier: a wake here ranks after any other plan (still one if none).
                waking = Placement(node.name, wake=True)
                much_busier.append(((math.inf, load, 0, -node.free_bytes()), waking))
                continue
            need = max(0, entry.estimated_bytes - reported.memory_bytes) // entry.profile.tp
            if not node.status.gpus or node.fits(need, entry.profile.tp):
                options.append(((-1, 0, 0, -node.free_bytes()), Placement(node.name, wake=True)))
            else:
                crowded.append((node, entry))
            continue
        if not node.status.gpus:  # a CPU node without budgets: the neuron itself decides
            options.append(((0, 0, 0, -node.free_bytes()), Placement(node.name)))
        elif reported is not None or node.fits(
            entry.estimated_bytes // entry.profile.tp, entry.profile.tp
        ):
            # (A copy Triton lost is reloaded into the memory it still holds.)
            left = node.free_bytes() - (0 if reported else entry.estimated_bytes)
            options.append(((0, 0, 0, -left), Placement(node.name)))
        else:
            crowded.append((node, entry))

    # Branch and bound: a plan evicts at least one model, and none of its victims has been idle
    # longer than the node's longest-idle evictable model. Nodes are tried best bound first and
    # the search stops once the best plan found beats the next bound.
    def bound(candidate: tuple[NodeView, CatalogueEntry]) -> tuple[float, ...]:
        if yielding:
            return (0,)  # busy victims allowed: the idle-time bound does not hold; try all
        oldest = _oldest_evictable(candidate[0])
        if oldest is None:
            return (float("inf"),)
        if value is not None:
            return (1, 0.0, float("-inf"))
        if strategy is EvictionStrategy.PRIORITY:
            return (1, float("-inf"))
        return (1, 0, -(now - oldest))

    best: tuple[float, ...] | None = None
    for node, entry in sorted(crowded, key=bound) if not options else ():
        if best is not None and best < bound((node, entry)):
            break
        tp = entry.profile.tp
        plan = _eviction_for(
            node, entry.estimated_bytes // tp, tp, victims_first, eligible, yielding
        )
        if isinstance(plan, Refusal):
            refusals.append(plan)
            continue
        left = node.free_bytes() + sum(v.bytes for v in plan) - entry.estimated_bytes
        if value is not None:
            lost: float = sum(value(v) for v in plan)
        elif strategy is EvictionStrategy.PRIORITY:
            lost = sum(v.priority for v in plan)
        else:
            lost = 0
        cost = (len(plan), lost, -min((now - v.last_used for v in plan), default=0.0), -left)
        wake = node.name in asleep_on
        incoming = 0 if model in node.loaded else entry.profile.host_kv_cache_bytes
        options.append((cost, Placement(node.name, plan, sleepers(node, plan, incoming), wake)))
        best = cost if best is None else min(best, cost)
    options += much_busier
    if options:
        return [placement for _, placement in sorted(options, key=lambda o: (o[0], o[1].node))]
    if not refusals:
        return Refusal(f"no node that may serve {model} is up")
    return Refusal(
        "; ".join(r.reason for r in refusals),
        blocked_by_pinned=all(r.blocked_by_pinned for r in refusals),
        wait=any(r.wait for r in refusals),
    )


def _least_load_elsewhere(
    snapshot: FleetSnapshot, model: str, exclude: frozenset[str]
) -> dict[str, int]:
    """For each node where `model` sleeps: the fewest requests in flight on any other up node
    that may take it (absent: there is none)."""
    candidates = [
        n
        for n in snapshot.nodes
        if n.status is not None and n.name not in exclude and model in n.catalogue()
    ]
    loads = {n.name: node_load(n) for n in candidates}
    found = {}
    for node in candidates:
        reported = node.loaded.get(model)
        if reported is None or reported.state != ModelState.ASLEEP:
            continue
        others = [load for name, load in loads.items() if name != node.name]
        if others:
            found[node.name] = min(others)
    return found


def idle_expired(snapshot: FleetSnapshot, now: float) -> list[Resident]:
    """READY models past their idle TTL, never pinned ones nor ones with requests in flight
    (a model still loading has not been idle: its TTL counts from when it is READY)."""
    expired = []
    for node in snapshot.nodes:
        if node.status is None:
            continue
        catalogue = node.catalogue()
        for resident in residents(node):
            entry = catalogue.get(resident.name)
            ttl = entry.profile.idle_ttl_s if entry else None
            if (
                ttl is None
                or not (resident.ready or resident.asleep)
                or resident.pinned
                or resident.in_flight
                or resident.name in node.leaving
                or resident.name in node.loading
            ):
                continue
            if now - resident.last_used >= ttl:
                expired.append(resident)
    return expired


def idle_sleepers(snapshot: FleetSnapshot, now: float) -> list[Resident]:
    """READY models idle for their `sleep_after_s` that can sleep where they are (their engine
    can, the node's host budget holds them); never pinned ones nor ones with requests in flight
    or already changing."""
    found: list[Resident] = []
    for node in snapshot.nodes:
        if node.status is None:
            continue
        catalogue = node.catalogue()
        candidates = []
        for resident in residents(node):
            entry = catalogue.get(resident.name)
            after = entry.profile.sleep_after_s if entry else None
            if (
                after is None
                or not resident.ready
                or resident.pinned
                or resident.in_flight
                or resident.name in node.leaving
                or resident.name in node.loading
                or now - resident.last_used < after
            ):
                continue
            candidates.append(resident)
        chosen = sleepers(node, tuple(sorted(candidates, key=lambda r: (r.last_used, r.name))))
        found.extend(r for r in candidates if r.name in chosen)
    return found


def largest_free_block(snapshot: FleetSnapshot) -> int:
    """The largest model (tp 1) that could be loaded now: the most free memory on one device."""
    return max((free for n in snapshot.nodes for free in n.device_free.values()), default=0)


def plan_defrag(snapshot: FleetSnapshot) -> Move | None:
    """One move that makes the largest free block larger, or None.

    Moving model M from node A to node B frees M's memory on A and takes it on B. The best move
    is the one after which the largest free block is largest; it must beat today's. Only tp-1,
    unpinned models move, and only to nodes allowed to hold them. Models with requests in flight
    may move: the move is make-before-break, and the old copy drains before it is unloaded.

    After a move the largest block is the source's grown block or the largest one the move did
    not touch; any target but the largest block leaves that one whole, so for each model the
    best-fitting other device is as good as any (and keeps large holes). With the devices
    sorted by free memory that is a binary search per model: O(models · log devices)."""
    blocks = [
        (free, n.name, index)
        for n in snapshot.nodes
        if n.status
        for index, free in n.device_free.items()
    ]
    if not blocks:
        return None
    blocks.sort()
    frees = [free for free, _, _ in blocks]
    best_now = frees[-1]
    views = {n.name: n for n in snapshot.nodes}
    best: tuple[int, Move] | None = None
    for source in snapshot.nodes:
        for resident in residents(source):
            if resident.pinned or len(resident.gpus) != 1 or resident.name in source.leaving:
                continue
            grown = source.device_free.get(resident.gpus[0], 0) + resident.bytes
            if grown <= best_now or (best is not None and grown <= best[0]):
                continue  # not better than today, nor than a move already found
            for position in range(bisect.bisect_left(frees, resident.bytes), len(blocks)):
                _, target_name, _ = blocks[position]
                target = views[target_name]
                if (
                    target_name == source.name
                    or resident.name not in target.catalogue()
                    or resident.name in target.loaded
                    or resident.name in target.loading
                ):
                    continue
                best = (grown, Move(resident.name, source.name, target_name))
                break
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
        index = snapshot.replica_index()
        for model, entry in snapshot.catalogue().items():
            if entry.profile.max_replicas == 1:
                continue
            replicas = index.get(model, [])
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
        if profile.max_replicas == 1:
            continue  # one replica at most (min_replicas <= max_replicas): nothing to scale
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
                now,
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
