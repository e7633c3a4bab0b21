"""Pure placement, eviction choice and defragmentation planning over hand-built snapshots."""

from __future__ import annotations

from control_plane.lifecycle import (
    Placement,
    Refusal,
    idle_expired,
    largest_free_block,
    plan_defrag,
    plan_placement,
)
from control_plane.routing import FleetSnapshot, NodeView, choose_replica, resolve_model
from cortex.config import EvictionStrategy, ModelProfile
from cortex.neuron_api import CatalogueEntry, GpuInfo, LoadedModel, NeuronStatus, TritonInfo

GB = 10**9
NOW = 1_000_000.0
LRU, PRIORITY = EvictionStrategy.LRU, EvictionStrategy.PRIORITY


def profile(name: str, **fields: object) -> ModelProfile:
    return ModelProfile(name=name, source="/m", **fields)  # type: ignore[arg-type]


def node(
    name: str,
    devices: list[int],
    loaded: list[tuple[str, int, int, float]] = (),  # type: ignore[assignment]
    catalogue: dict[str, tuple[ModelProfile, int]] | None = None,
    in_flight: dict[str, int] | None = None,
    up: bool = True,
) -> NodeView:
    """devices: total bytes per device; loaded: (model, device, bytes, last_used)."""
    used = {i: 0 for i in range(len(devices))}
    for _, device, size, _ in loaded:
        used[device] += size
    status = NeuronStatus(
        name=name,
        triton=TritonInfo(state="live", http_url="", grpc_url="h:1", metrics_url=""),
        gpus=[
            GpuInfo(
                index=i,
                uuid=f"{name}-{i}",
                name="gpu",
                memory_total_bytes=total,
                memory_used_bytes=used[i],
                memory_free_bytes=total - used[i],
            )
            for i, total in enumerate(devices)
        ],
        has_gpu=True,
        loaded=[
            LoadedModel(
                name=m,
                state="READY",
                engine="torch",
                quantization="none",
                tp=1,
                gpus=[device],
                memory_bytes=size,
                estimated_bytes=size,
                loaded_at=last,
                last_used=last,
            )
            for m, device, size, last in loaded
        ],
        catalogue=[
            CatalogueEntry(profile=p, estimated_bytes=size, context_length=4096)
            for p, size in (catalogue or {}).values()
        ],
    )
    return NodeView(name, up, status if up else None, in_flight or {})


CATALOGUE = {
    "a": (profile("a", priority=1), 10 * GB),
    "b": (profile("b", priority=5), 10 * GB),
    "c": (profile("c", priority=3), 10 * GB),
    "big": (profile("big"), 30 * GB),
    "pinned": (profile("pinned", pinned=True), 10 * GB),
    "pair": (profile("pair", tp=2), 20 * GB),
}


def test_fits_in_free_memory_without_eviction_and_keeps_large_holes() -> None:
    snapshot = FleetSnapshot(
        (
            node("small", [24 * GB], catalogue=CATALOGUE),
            node("large", [80 * GB], catalogue=CATALOGUE),
        )
    )
    plan = plan_placement(snapshot, "a", LRU)
    assert isinstance(plan, list)
    # Both fit; the node left with the most free memory wins: a 30 GB model still fits later.
    assert plan[0] == Placement("large") and plan[1] == Placement("small")


def test_lru_evicts_the_least_recently_used() -> None:
    full = node(
        "n", [20 * GB], [("a", 0, 10 * GB, NOW - 10), ("b", 0, 10 * GB, NOW - 100)], CATALOGUE
    )
    plan = plan_placement(FleetSnapshot((full,)), "c", LRU)
    assert isinstance(plan, list)
    assert [v.name for v in plan[0].victims] == ["b"]


def test_priority_evicts_the_lowest_priority_first() -> None:
    full = node(
        "n", [20 * GB], [("a", 0, 10 * GB, NOW - 10), ("b", 0, 10 * GB, NOW - 100)], CATALOGUE
    )
    plan = plan_placement(FleetSnapshot((full,)), "c", PRIORITY)
    assert isinstance(plan, list)
    assert [v.name for v in plan[0].victims] == ["a"]  # priority 1 < 5, though used more recently


def test_priority_ties_fall_back_to_lru() -> None:
    catalogue = {**CATALOGUE, "x": (profile("x", priority=1), 10 * GB)}
    full = node(
        "n", [20 * GB], [("a", 0, 10 * GB, NOW - 10), ("x", 0, 10 * GB, NOW - 50)], catalogue
    )
    plan = plan_placement(FleetSnapshot((full,)), "c", PRIORITY)
    assert isinstance(plan, list) and [v.name for v in plan[0].victims] == ["x"]


def test_pinned_and_in_flight_models_are_never_victims() -> None:
    full = node(
        "n",
        [30 * GB],
        [
            ("pinned", 0, 10 * GB, NOW - 999),
            ("a", 0, 10 * GB, NOW - 500),
            ("b", 0, 10 * GB, NOW - 1),
        ],
        CATALOGUE,
        in_flight={"a": 2},
    )
    plan = plan_placement(FleetSnapshot((full,)), "c", LRU)
    assert isinstance(plan, list) and [v.name for v in plan[0].victims] == ["b"]


def test_only_pinned_models_in_the_way_is_said() -> None:
    full = node("n", [10 * GB], [("pinned", 0, 10 * GB, NOW - 999)], CATALOGUE)
    plan = plan_placement(FleetSnapshot((full,)), "a", LRU)
    assert isinstance(plan, Refusal)
    assert plan.blocked_by_pinned and "only pinned models stand in the way (pinned)" in plan.reason


def test_busy_models_in_the_way_are_named() -> None:
    full = node("n", [10 * GB], [("b", 0, 10 * GB, NOW)], CATALOGUE, in_flight={"b": 1})
    plan = plan_placement(FleetSnapshot((full,)), "a", LRU)
    assert isinstance(plan, Refusal) and "requests in flight: b" in plan.reason


def test_too_large_for_every_node() -> None:
    plan = plan_placement(FleetSnapshot((node("n", [24 * GB], catalogue=CATALOGUE),)), "big", LRU)
    assert isinstance(plan, Refusal) and "too small for it even when empty" in plan.reason


def test_cheapest_node_wins_fewest_victims_then_longest_idle() -> None:
    catalogue = {**CATALOGUE, "x": (profile("x"), 15 * GB)}
    # "two" must lose both its models for 15 GB; "one" only one of them.
    one = node(
        "one", [25 * GB], [("a", 0, 10 * GB, NOW - 5), ("b", 0, 10 * GB, NOW - 50)], catalogue
    )
    two = node(
        "two", [20 * GB], [("c", 0, 10 * GB, NOW - 500), ("a", 0, 10 * GB, NOW - 500)], catalogue
    )
    plan = plan_placement(FleetSnapshot((one, two)), "x", LRU)
    assert isinstance(plan, list)
    assert plan[0].node == "one" and [v.name for v in plan[0].victims] == ["b"]
    assert plan[1].node == "two" and len(plan[1].victims) == 2
    # Equal victim counts: the node whose victim has been idle longest goes first.
    three = node(
        "three", [25 * GB], [("c", 0, 10 * GB, NOW - 900), ("a", 0, 10 * GB, NOW - 1)], catalogue
    )
    plan = plan_placement(FleetSnapshot((one, three)), "x", LRU)
    assert isinstance(plan, list) and plan[0].node == "three"


def test_tensor_parallel_needs_enough_devices() -> None:
    wide = node("wide", [12 * GB, 12 * GB], catalogue=CATALOGUE)
    narrow = node("narrow", [40 * GB], catalogue=CATALOGUE)
    plan = plan_placement(FleetSnapshot((wide, narrow)), "pair", LRU)
    assert isinstance(plan, list) and [p.node for p in plan] == ["wide"]


def test_models_only_go_to_nodes_whose_catalogue_allows_them() -> None:
    restricted = {"a": CATALOGUE["a"]}
    plan = plan_placement(
        FleetSnapshot(
            (node("x", [80 * GB], catalogue=restricted), node("y", [80 * GB], catalogue=CATALOGUE))
        ),
        "b",
        LRU,
    )
    assert isinstance(plan, list) and [p.node for p in plan] == ["y"]


def test_down_nodes_are_not_candidates() -> None:
    plan = plan_placement(
        FleetSnapshot((node("x", [80 * GB], catalogue=CATALOGUE, up=False),)), "a", LRU
    )
    assert isinstance(plan, Refusal) and "no node" in plan.reason


def test_idle_ttl() -> None:
    catalogue = {
        "a": (profile("a", idle_ttl_s=60), GB),
        "b": (profile("b", idle_ttl_s=60), GB),
        "p": (profile("p", idle_ttl_s=1, pinned=True), GB),
        "c": (profile("c"), GB),
    }
    n = node(
        "n",
        [80 * GB],
        [
            ("a", 0, GB, NOW - 61),
            ("b", 0, GB, NOW - 30),
            ("p", 0, GB, NOW - 999),
            ("c", 0, GB, NOW - 999),
        ],
        catalogue,
    )
    assert [r.name for r in idle_expired(FleetSnapshot((n,)), NOW)] == ["a"]
    busy = node("n", [80 * GB], [("a", 0, GB, NOW - 61)], catalogue, in_flight={"a": 1})
    assert idle_expired(FleetSnapshot((busy,)), NOW) == []


def test_defrag_makes_the_largest_block_larger() -> None:
    # Two 40 GB nodes, each holding one 10 GB model: 30 GB free each. Moving one model next to
    # the other leaves a whole 40 GB node free.
    one = node("one", [40 * GB], [("a", 0, 10 * GB, NOW - 5)], CATALOGUE)
    two = node("two", [40 * GB], [("b", 0, 10 * GB, NOW - 5)], CATALOGUE)
    snapshot = FleetSnapshot((one, two))
    assert largest_free_block(snapshot) == 30 * GB
    move = plan_defrag(snapshot)
    assert move is not None and {move.source, move.target} == {"one", "two"}


def test_defrag_does_nothing_when_no_move_helps() -> None:
    one = node("one", [40 * GB], [("a", 0, 10 * GB, NOW)], CATALOGUE)
    two = node("two", [40 * GB], catalogue=CATALOGUE)
    assert plan_defrag(FleetSnapshot((one, two))) is None  # 40 GB is free already


def test_defrag_never_moves_pinned_models_but_moves_busy_ones() -> None:
    one = node("one", [40 * GB], [("pinned", 0, 10 * GB, NOW)], CATALOGUE)
    two = node("two", [40 * GB], [("b", 0, 10 * GB, NOW)], CATALOGUE, in_flight={"b": 1})
    move = plan_defrag(FleetSnapshot((one, two)))
    # b drains after its new copy is READY: traffic does not stop a move.
    assert move is not None and (move.model, move.source, move.target) == ("b", "two", "one")


def test_routing_picks_the_least_busy_ready_replica_and_skips_draining() -> None:
    one = node("one", [40 * GB], [("a", 0, 10 * GB, NOW)], CATALOGUE, in_flight={"a": 3})
    two = node("two", [40 * GB], [("a", 0, 10 * GB, NOW)], CATALOGUE, in_flight={"a": 1})
    assert choose_replica(FleetSnapshot((one, two)), "a") == "two"
    draining = NodeView("two", True, two.status, {"a": 1}, frozenset({"a"}))
    assert choose_replica(FleetSnapshot((one, draining)), "a") == "one"


def test_aliases_resolve() -> None:
    catalogue = {"a": (profile("a", aliases=("claude-*", "gpt-x")), GB)}
    snapshot = FleetSnapshot((node("n", [GB], catalogue=catalogue),))
    assert resolve_model(snapshot, "claude-sonnet-4") == "a"
    assert resolve_model(snapshot, "gpt-x") == "a"
    assert resolve_model(snapshot, "other") is None
