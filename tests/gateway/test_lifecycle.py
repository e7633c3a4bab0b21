"""Pure placement, eviction choice, defragmentation, replica and routing decisions over
hand-built snapshots."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest

from control_plane.canonical import ChatRequest, Message
from control_plane.cold_load import REFUSALS_PER_NODE, WAIT_STEP_S, ColdLoad, GiveUp, Place, Wait
from control_plane.errors import Overloaded, UpstreamFailed, UpstreamTimeout
from control_plane.lifecycle import (
    Demand,
    LoadWindow,
    Placement,
    Refusal,
    ScaleIn,
    ScaleOut,
    idle_expired,
    largest_free_block,
    pinned_missing,
    plan_defrag,
    plan_placement,
    plan_scaling,
)
from control_plane.node_record import CircuitBreaker, NodeRecord
from control_plane.routing import (
    FleetSnapshot,
    NodeView,
    busy,
    choose_replica,
    conversation_key,
    resolve_model,
)
from cortex.config import EvictionStrategy, ModelProfile, ScalingSection
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
NOW = 1_000_000.0
LRU, PRIORITY = EvictionStrategy.LRU, EvictionStrategy.PRIORITY


def profile(name: str, **fields: Any) -> ModelProfile:
    return ModelProfile(name=name, source="/m", **fields)


def node(
    name: str,
    devices: list[int],
    loaded: Sequence[tuple[str, int, int, float]] = (),
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
        triton=TritonInfo(state=TritonState.LIVE, http_url="", grpc_url="h:1", metrics_url=""),
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
                state=ModelState.READY,
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
    plan = plan_placement(snapshot, "a", LRU, NOW)
    assert isinstance(plan, list)
    # Both fit; the node left with the most free memory wins: a 30 GB model still fits later.
    assert plan[0] == Placement("large") and plan[1] == Placement("small")


def test_lru_evicts_the_least_recently_used() -> None:
    full = node(
        "n", [20 * GB], [("a", 0, 10 * GB, NOW - 10), ("b", 0, 10 * GB, NOW - 100)], CATALOGUE
    )
    plan = plan_placement(FleetSnapshot((full,)), "c", LRU, NOW)
    assert isinstance(plan, list)
    assert [v.name for v in plan[0].victims] == ["b"]


def test_priority_evicts_the_lowest_priority_first() -> None:
    full = node(
        "n", [20 * GB], [("a", 0, 10 * GB, NOW - 10), ("b", 0, 10 * GB, NOW - 100)], CATALOGUE
    )
    plan = plan_placement(FleetSnapshot((full,)), "c", PRIORITY, NOW)
    assert isinstance(plan, list)
    assert [v.name for v in plan[0].victims] == ["a"]  # priority 1 < 5, though used more recently


def test_priority_ties_fall_back_to_lru() -> None:
    catalogue = {**CATALOGUE, "x": (profile("x", priority=1), 10 * GB)}
    full = node(
        "n", [20 * GB], [("a", 0, 10 * GB, NOW - 10), ("x", 0, 10 * GB, NOW - 50)], catalogue
    )
    plan = plan_placement(FleetSnapshot((full,)), "c", PRIORITY, NOW)
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
    plan = plan_placement(FleetSnapshot((full,)), "c", LRU, NOW)
    assert isinstance(plan, list) and [v.name for v in plan[0].victims] == ["b"]


def test_only_pinned_models_in_the_way_is_said() -> None:
    full = node("n", [10 * GB], [("pinned", 0, 10 * GB, NOW - 999)], CATALOGUE)
    plan = plan_placement(FleetSnapshot((full,)), "a", LRU, NOW)
    assert isinstance(plan, Refusal)
    assert plan.blocked_by_pinned and "only pinned models stand in the way (pinned)" in plan.reason


def test_busy_models_in_the_way_are_named() -> None:
    full = node("n", [10 * GB], [("b", 0, 10 * GB, NOW)], CATALOGUE, in_flight={"b": 1})
    plan = plan_placement(FleetSnapshot((full,)), "a", LRU, NOW)
    assert isinstance(plan, Refusal) and "requests in flight: b" in plan.reason


def test_too_large_for_every_node() -> None:
    plan = plan_placement(
        FleetSnapshot((node("n", [24 * GB], catalogue=CATALOGUE),)), "big", LRU, NOW
    )
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
    plan = plan_placement(FleetSnapshot((one, two)), "x", LRU, NOW)
    assert isinstance(plan, list)
    assert plan[0].node == "one" and [v.name for v in plan[0].victims] == ["b"]
    assert plan[1].node == "two" and len(plan[1].victims) == 2
    # Equal victim counts: the node whose victim has been idle longest goes first.
    three = node(
        "three", [25 * GB], [("c", 0, 10 * GB, NOW - 900), ("a", 0, 10 * GB, NOW - 1)], catalogue
    )
    plan = plan_placement(FleetSnapshot((one, three)), "x", LRU, NOW)
    assert isinstance(plan, list) and plan[0].node == "three"


def test_tensor_parallel_needs_enough_devices() -> None:
    wide = node("wide", [12 * GB, 12 * GB], catalogue=CATALOGUE)
    narrow = node("narrow", [40 * GB], catalogue=CATALOGUE)
    plan = plan_placement(FleetSnapshot((wide, narrow)), "pair", LRU, NOW)
    assert isinstance(plan, list) and [p.node for p in plan] == ["wide"]


def test_models_only_go_to_nodes_whose_catalogue_allows_them() -> None:
    restricted = {"a": CATALOGUE["a"]}
    plan = plan_placement(
        FleetSnapshot(
            (node("x", [80 * GB], catalogue=restricted), node("y", [80 * GB], catalogue=CATALOGUE))
        ),
        "b",
        LRU,
        NOW,
    )
    assert isinstance(plan, list) and [p.node for p in plan] == ["y"]


def test_down_nodes_are_not_candidates() -> None:
    plan = plan_placement(
        FleetSnapshot((node("x", [80 * GB], catalogue=CATALOGUE, up=False),)), "a", LRU, NOW
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


def test_loads_under_way_and_victims_being_unloaded_are_not_counted_twice() -> None:
    # x has room for one model. A load of "a" is under way there (not reported yet): a second
    # plan must not pick the same memory.
    x = node("x", [10 * GB], catalogue=CATALOGUE)
    y = node("y", [10 * GB], [("c", 0, 10 * GB, NOW - 999)], CATALOGUE)
    reserved = NodeView("x", True, x.status, loading={"a": 10 * GB})
    plan = plan_placement(FleetSnapshot((reserved, y)), "b", LRU, NOW)
    assert isinstance(plan, list) and plan[0] == Placement("y", plan[0].victims)
    assert [v.name for v in plan[0].victims] == ["c"]
    # ... and once c is being unloaded for that plan, nobody may count on evicting it again.
    leaving = NodeView("y", True, y.status, leaving=frozenset({"c"}))
    plan = plan_placement(FleetSnapshot((reserved, leaving)), "b", LRU, NOW)
    assert isinstance(plan, Refusal)
    # A load the neuron reports already (LOADING or READY) is not subtracted a second time.
    reported = node("x", [20 * GB], [("a", 0, 10 * GB, NOW)], CATALOGUE)
    both = NodeView("x", True, reported.status, loading={"a": 10 * GB})
    assert both.free_bytes() == 10 * GB


def test_busy_is_the_larger_of_the_gateways_count_and_the_engines() -> None:
    # The engine's count includes this gateway's own requests: adding them counts them twice.
    n = node("n", [40 * GB], [("a", 0, 10 * GB, NOW)], CATALOGUE, in_flight={"a": 2})
    assert n.status is not None
    n.status.loaded[0].in_flight = 3  # one more from another gateway
    assert busy(n, "a") == 3
    n.status.loaded[0].in_flight = 1  # the poll is older than this gateway's last request
    assert busy(n, "a") == 2
    assert busy(n, "b") == 0


def chat(*messages: tuple[str, str]) -> ChatRequest:
    return ChatRequest("a", tuple(Message(role, text) for role, text in messages))


SYSTEM = ("system", "You are Claude Code. " * 50)


def test_a_conversations_turns_land_on_one_replica_and_conversations_spread() -> None:
    one = node("one", [40 * GB], [("a", 0, 10 * GB, NOW)], CATALOGUE)
    two = node("two", [40 * GB], [("a", 0, 10 * GB, NOW)], CATALOGUE)
    snapshot = FleetSnapshot((one, two))
    landed = []
    for number in range(20):
        turn1 = chat(SYSTEM, ("user", f"task {number}"))
        turn2 = chat(SYSTEM, ("user", f"task {number}"), ("assistant", "ok"), ("user", "more"))
        first = choose_replica(snapshot, "a", conversation_key(turn1))
        assert choose_replica(snapshot, "a", conversation_key(turn2)) == first
        landed.append(first)
    # The system prompt every conversation shares does not decide: both replicas get a share.
    assert 5 <= landed.count("one") <= 15


def test_affinity_gives_way_when_its_replica_is_much_busier() -> None:
    key = conversation_key(chat(SYSTEM, ("user", "hello")))
    one = node("one", [40 * GB], [("a", 0, 10 * GB, NOW)], CATALOGUE)
    two = node("two", [40 * GB], [("a", 0, 10 * GB, NOW)], CATALOGUE)
    preferred = choose_replica(FleetSnapshot((one, two)), "a", key)
    other = "two" if preferred == "one" else "one"

    def loaded(in_flight: int) -> FleetSnapshot:
        views = {
            "one": node("one", [40 * GB], [("a", 0, 10 * GB, NOW)], CATALOGUE),
            "two": node("two", [40 * GB], [("a", 0, 10 * GB, NOW)], CATALOGUE),
        }
        busy_one = views[str(preferred)]
        views[str(preferred)] = NodeView(busy_one.name, True, busy_one.status, {"a": in_flight})
        return FleetSnapshot((views["one"], views["two"]))

    assert choose_replica(loaded(4), "a", key, slack=4) == preferred  # within the bound
    assert choose_replica(loaded(5), "a", key, slack=4) == other


def test_no_key_without_a_user_message_and_keys_differ_by_first_user_turn() -> None:
    assert conversation_key(chat(SYSTEM)) is None
    assert conversation_key(chat(SYSTEM, ("user", "x"))) != conversation_key(
        chat(SYSTEM, ("user", "y"))
    )


def test_pinned_models_nobody_holds_are_missing() -> None:
    n = node("n", [40 * GB], [("a", 0, 10 * GB, NOW)], CATALOGUE)
    assert pinned_missing(FleetSnapshot((n,))) == ["pinned"]
    held = node("n", [40 * GB], [("pinned", 0, 10 * GB, NOW)], CATALOGUE)
    assert pinned_missing(FleetSnapshot((held,))) == []
    loading = NodeView("n", True, n.status, loading={"pinned": 10 * GB})
    assert pinned_missing(FleetSnapshot((loading,))) == []


RULE = ScalingSection(in_flight_per_replica=2, window_s=10, idle_s=60)
SCALED = {**CATALOGUE, "hot": (profile("hot", max_replicas=2), 10 * GB)}


def hot_fleet(in_flight: int, idle_last_used: float = NOW - 5) -> FleetSnapshot:
    return FleetSnapshot(
        (
            node(
                "one", [20 * GB], [("hot", 0, 10 * GB, NOW)], SCALED, in_flight={"hot": in_flight}
            ),
            # two: an idle model (long unused) and a recently used one
            node("two", [10 * GB], [("a", 0, 10 * GB, NOW - 999)], SCALED),
            node(
                "three",
                [20 * GB],
                [("b", 0, 10 * GB, idle_last_used), ("c", 0, 10 * GB, NOW)],
                SCALED,
            ),
        )
    )


def test_a_replica_is_added_only_for_load_sustained_over_the_window() -> None:
    window = LoadWindow(RULE.window_s)
    for second in range(0, 11):
        window.record(hot_fleet(in_flight=3 if second != 5 else 1), NOW - 10 + second)
    assert plan_scaling(hot_fleet(3), window, RULE, LRU, NOW) == []  # one dip in the window
    window = LoadWindow(RULE.window_s)
    for second in range(0, 11):
        window.record(hot_fleet(3), NOW - 10 + second)
    actions = plan_scaling(hot_fleet(3), window, RULE, LRU, NOW)
    assert len(actions) == 1 and isinstance(actions[0], ScaleOut)
    # Where it fits, evicting only a model idle for longer than the window: a on two, not b or
    # c on three (c was used just now: busier than an idle model, never pushed out for a copy).
    assert actions[0].placement.node == "two" and [
        v.name for v in actions[0].placement.victims
    ] == ["a"]
    without_two = FleetSnapshot(tuple(n for n in hot_fleet(3).nodes if n.name != "two"))
    assert plan_scaling(without_two, window, RULE, LRU, NOW) == []
    window = LoadWindow(RULE.window_s)
    window.record(hot_fleet(3), NOW - 3)
    assert plan_scaling(hot_fleet(3), window, RULE, LRU, NOW) == []  # the window is not full yet


def test_no_replica_at_the_maximum_and_idle_replicas_beyond_the_floor_go() -> None:
    def replicas(last_used: float, in_flight: int = 0) -> FleetSnapshot:
        return FleetSnapshot(
            (
                node("one", [20 * GB], [("hot", 0, 10 * GB, NOW)], SCALED, in_flight={"hot": 5}),
                node(
                    "two",
                    [20 * GB],
                    [("hot", 0, 10 * GB, last_used)],
                    SCALED,
                    in_flight={"hot": in_flight},
                ),
            )
        )

    window = LoadWindow(RULE.window_s)
    for second in range(0, 11):
        window.record(replicas(NOW), NOW - 10 + second)
    assert plan_scaling(replicas(NOW), window, RULE, LRU, NOW) == []  # busy, and at max already
    assert plan_scaling(replicas(NOW - 61), window, RULE, LRU, NOW) == [ScaleIn("hot", "two")]
    assert plan_scaling(replicas(NOW - 61, in_flight=1), window, RULE, LRU, NOW) == []
    floor = {"hot": (profile("hot", min_replicas=2, max_replicas=2), 10 * GB)}
    alone = FleetSnapshot(
        (
            node("one", [20 * GB], [("hot", 0, 10 * GB, NOW - 999)], floor),
            node("two", [20 * GB], catalogue=floor),
        )
    )
    actions = plan_scaling(alone, LoadWindow(10), RULE, LRU, NOW)
    assert [(a.model, a.placement.node) for a in actions if isinstance(a, ScaleOut)] == [
        ("hot", "two")
    ]


def test_demand_evicts_what_is_asked_for_least_per_byte() -> None:
    # b was used last, but a is asked for far more: under demand, b leaves.
    full = node(
        "n", [20 * GB], [("a", 0, 10 * GB, NOW - 100), ("b", 0, 10 * GB, NOW - 1)], CATALOGUE
    )
    demand = Demand(half_life_s=60)
    for second in range(10):
        demand.record("a", NOW - 200 + second)
    demand.record("b", NOW - 1)
    plan = plan_placement(
        FleetSnapshot((full,)), "c", EvictionStrategy.DEMAND, NOW, demand.per_byte(NOW)
    )
    assert isinstance(plan, list) and [v.name for v in plan[0].victims] == ["b"]
    lru = plan_placement(FleetSnapshot((full,)), "c", LRU, NOW)
    assert isinstance(lru, list) and [v.name for v in lru[0].victims] == ["a"]
    # Counts fade: long after, one recent request outweighs ten old ones.
    assert demand.value("a", NOW + 600) < demand.value("b", NOW + 600) * 10
    assert demand.value("a", NOW - 190) == pytest.approx(10, rel=0.2)


def test_a_model_still_loading_is_neither_idle_nor_a_victim() -> None:
    # Without the lock that once serialised loads and eviction cycles, a cycle can see a model
    # LOADING (no last use yet): it must not unload it, nor may a placement evict it.
    catalogue = {**CATALOGUE, "a": (profile("a", idle_ttl_s=1), 10 * GB)}
    loading = node("n", [10 * GB], [("a", 0, 10 * GB, 0.0)], catalogue)
    assert loading.status is not None
    loading.status.loaded[0].state = ModelState.LOADING
    loading.status.loaded[0].loaded_at = loading.status.loaded[0].last_used = None
    assert idle_expired(FleetSnapshot((loading,)), NOW) == []
    plan = plan_placement(FleetSnapshot((loading,)), "b", LRU, NOW)
    assert isinstance(plan, Refusal) and "loading or unloading: a" in plan.reason


# ---------------------------------------------------------------------------------------------
# Placement that waits instead of failing, and the cold load's next step (issue 27)


def test_every_node_is_considered_not_only_the_first_that_refuses() -> None:
    # The killed-node case: the small node holds the pinned model just restored there; another
    # node holds two idle, unpinned models. The other node evicts one.
    small = node("a", [10 * GB], [("pinned", 0, 10 * GB, NOW - 1)], CATALOGUE)
    big = node("c", [20 * GB], [("a", 0, 10 * GB, NOW - 50), ("c", 0, 10 * GB, NOW - 5)], CATALOGUE)
    plan = plan_placement(FleetSnapshot((small, big)), "b", LRU, NOW)
    assert isinstance(plan, list) and [p.node for p in plan] == ["c"]
    assert [v.name for v in plan[0].victims] == ["a"]


def test_loads_unloads_and_requests_in_flight_are_waited_for() -> None:
    busy_node = node("n", [10 * GB], [("b", 0, 10 * GB, NOW)], CATALOGUE, in_flight={"b": 1})
    plan = plan_placement(FleetSnapshot((busy_node,)), "a", LRU, NOW)
    assert isinstance(plan, Refusal) and plan.wait
    # A load this gateway has under way, not reported by the neuron yet: its memory is taken,
    # but the node is not "too small even when empty".
    empty = node("n", [10 * GB], catalogue=CATALOGUE)
    reserved = NodeView("n", True, empty.status, loading={"b": 10 * GB})
    plan = plan_placement(FleetSnapshot((reserved,)), "a", LRU, NOW)
    assert isinstance(plan, Refusal) and plan.wait and "loading or unloading: b" in plan.reason
    # The model itself on its way somewhere: wait for that copy rather than place another.
    plan = plan_placement(
        FleetSnapshot((NodeView("n", True, empty.status, loading={"a": 1}),)), "a", LRU, NOW
    )
    assert isinstance(plan, Refusal) and plan.wait and "being loaded on n" in plan.reason
    unloading = node("n", [10 * GB], [("a", 0, 10 * GB, NOW)], CATALOGUE)
    assert unloading.status is not None
    unloading.status.loaded[0].state = ModelState.UNLOADING
    plan = plan_placement(FleetSnapshot((unloading,)), "a", LRU, NOW)
    assert isinstance(plan, Refusal) and plan.wait and "being unloaded on n" in plan.reason


def test_a_copy_triton_lost_is_reloaded_where_it_is() -> None:
    lost = node("n", [10 * GB], [("a", 0, 10 * GB, NOW)], CATALOGUE)
    assert lost.status is not None
    lost.status.loaded[0].state = ModelState.UNAVAILABLE
    plan = plan_placement(FleetSnapshot((lost,)), "a", LRU, NOW)
    assert plan == [Placement("n")]


def test_only_a_fleet_that_cannot_hold_the_model_refuses_for_good() -> None:
    pinned = node("a", [10 * GB], [("pinned", 0, 10 * GB, NOW)], CATALOGUE)
    plan = plan_placement(FleetSnapshot((pinned,)), "b", LRU, NOW)
    assert isinstance(plan, Refusal) and not plan.wait and plan.blocked_by_pinned
    small = node("s", [5 * GB], catalogue=CATALOGUE)
    plan = plan_placement(FleetSnapshot((small,)), "b", LRU, NOW)
    assert isinstance(plan, Refusal) and not plan.wait
    # One node refuses for good, another only until its request is done: wait.
    busy_node = node("c", [10 * GB], [("c", 0, 10 * GB, NOW)], CATALOGUE, in_flight={"c": 1})
    plan = plan_placement(FleetSnapshot((pinned, busy_node)), "b", LRU, NOW)
    assert isinstance(plan, Refusal) and plan.wait and not plan.blocked_by_pinned


def test_a_cold_load_waits_while_waiting_helps_then_times_out() -> None:
    attempts = ColdLoad("m", deadline=100.0, timeout_s=60)
    assert attempts.next_step([Placement("n")], 10.0) == Place(Placement("n"))
    step = attempts.next_step(Refusal("n: busy", wait=True), 10.0)
    assert isinstance(step, Wait) and step.seconds == WAIT_STEP_S
    assert attempts.next_step(Refusal("n: busy", wait=True), 99.5) == Wait(0.5, "n: busy")
    step = attempts.next_step(Refusal("n: busy", wait=True), 100.0)
    assert isinstance(step, GiveUp) and isinstance(step.error, UpstreamTimeout)
    assert "n: busy" in step.error.message
    step = attempts.next_step(Refusal("n: only pinned", blocked_by_pinned=True), 10.0)
    assert isinstance(step, GiveUp) and isinstance(step.error, Overloaded)


def test_a_node_that_refuses_is_tried_again_and_one_that_fails_is_left_out() -> None:
    attempts = ColdLoad("m", deadline=100.0, timeout_s=60)
    for _ in range(REFUSALS_PER_NODE - 1):
        assert isinstance(attempts.failed_on("a", Overloaded("no room")), Wait)
        assert attempts.exclude() == frozenset()
    attempts.failed_on("a", Overloaded("no room"))
    assert attempts.exclude() == {"a"}
    assert attempts.failed_on("b", UpstreamFailed("Triton could not load m")) is None
    assert attempts.exclude() == {"a", "b"}
    step = attempts.next_step(Refusal("no node that may serve m is up"), 10.0)
    assert isinstance(step, GiveUp) and isinstance(step.error, UpstreamFailed)
    assert "b: Triton could not load m" in step.error.message


def test_a_model_being_evicted_takes_no_new_requests_and_its_next_load_waits() -> None:
    holder = node("n", [10 * GB], [("a", 0, 10 * GB, NOW)], CATALOGUE)
    leaving = NodeView("n", True, holder.status, leaving=frozenset({"a"}))
    assert choose_replica(FleetSnapshot((holder,)), "a") == "n"
    assert choose_replica(FleetSnapshot((leaving,)), "a") is None
    plan = plan_placement(FleetSnapshot((leaving,)), "a", LRU, NOW)
    assert isinstance(plan, Refusal) and plan.wait and "being unloaded on n" in plan.reason


# ---------------------------------------------------------------------------------------------
# The node record and its circuit breaker


def test_the_breaker_opens_after_enough_downs_within_its_window() -> None:
    breaker = CircuitBreaker(failures=3, window_s=60, open_s=30)
    assert not breaker.went_down(NOW) and not breaker.went_down(NOW + 10)
    assert not breaker.is_open(NOW + 10)
    assert breaker.went_down(NOW + 20)  # the third within a minute
    assert breaker.is_open(NOW + 49) and not breaker.is_open(NOW + 50)
    # Downs further apart than the window never add up.
    spaced = CircuitBreaker(failures=2, window_s=60, open_s=30)
    assert not spaced.went_down(NOW) and not spaced.went_down(NOW + 61)
    assert spaced.went_down(NOW + 62)


def test_a_node_is_down_after_enough_missed_polls_and_its_view_is_a_copy() -> None:
    record = NodeRecord(client=None, breaker=CircuitBreaker(3, 60, 30), up=True)
    assert not record.missed_poll(down_after=2) and record.missed_poll(down_after=2)
    record.in_flight["a"] = 1
    view = record.view("n")
    record.in_flight["a"] = 2
    record.leaving.add("a")
    assert view.in_flight == {"a": 1} and view.leaving == frozenset()
