"""Swap-aware queueing and the residency rules around it, in the pure planner (issues 28 and
33), on hand-built snapshots: the order waiting requests and models go in, the starvation
bound, interactive before batch, the "much busier" exception to waking, and the host budget
counting host KV tiers."""

from __future__ import annotations

from control_plane.lifecycle import Placement, Refusal, host_held, plan_placement, sleepers
from control_plane.routing import FleetSnapshot, NodeView
from control_plane.swap import (
    Waiter,
    ahead_of,
    eviction_rules,
    release_order,
    switch_order,
    waiting_models,
)
from cortex.config import KeyPriority
from tests.gateway.test_lifecycle import GB, NOW, node
from tests.gateway.test_residency_planning import HOST, LRU, catalogue, sleepy

INTERACTIVE, BATCH = KeyPriority.INTERACTIVE, KeyPriority.BATCH
BOUND = 30.0
CLOCK = 5_000.0  # monotonic seconds


def placed(result: list[Placement] | Refusal) -> list[Placement]:
    """The plans, where the planner was expected to place the model."""
    assert not isinstance(result, Refusal), result
    return result


def waiter(model: str, priority: KeyPriority, waited: float, sequence: int) -> Waiter:
    return Waiter(model, priority, CLOCK - waited, sequence)


def full_node(in_flight: dict[str, int] | None = None) -> NodeView:
    """One 20 GB device holding a (idle longest) and b; c sleeps there. Each takes 10 GB."""
    view = sleepy(
        node(
            "n",
            [20 * GB],
            [("a", 0, 10 * GB, NOW - 90), ("b", 0, 10 * GB, NOW - 30), ("c", 0, 10 * GB, NOW)],
            catalogue(),
        ),
        16 * GB,
        {"c": 0},
    )
    return NodeView(view.name, view.up, view.status, in_flight or {})


# --------------------------------------------------------------------- the order of the queue


def test_a_models_waiters_go_interactive_first_then_in_arrival_order() -> None:
    queue = [
        waiter("m", BATCH, 9, 0),
        waiter("m", INTERACTIVE, 5, 1),
        waiter("m", BATCH, 7, 2),
        waiter("m", INTERACTIVE, 1, 3),
    ]
    assert [w.sequence for w in release_order(queue)] == [1, 3, 0, 2]


def test_models_with_an_interactive_request_switch_in_before_batch_ones() -> None:
    queue = [
        waiter("batchy", BATCH, 20, 0),  # waiting longest, but batch only
        waiter("late", INTERACTIVE, 2, 1),
        waiter("early", INTERACTIVE, 8, 2),
        waiter("mixed", BATCH, 1, 3),
        waiter("mixed", INTERACTIVE, 0.5, 4),
    ]
    assert switch_order(queue, CLOCK, BOUND) == ["early", "late", "mixed", "batchy"]
    assert waiting_models(queue)["mixed"].requests == 2


def test_past_the_bound_a_batch_model_goes_before_interactive_ones() -> None:
    # The bound holds for both classes: the batch model waited 31 s > 30 s.
    queue = [
        waiter("batchy", BATCH, 31, 0),
        waiter("fresh", INTERACTIVE, 1, 1),
        waiter("older", BATCH, 45, 2),
    ]
    assert switch_order(queue, CLOCK, BOUND) == ["older", "batchy", "fresh"]


def test_a_switch_waits_for_a_model_ahead_of_it_that_may_take_the_same_node() -> None:
    snapshot = FleetSnapshot((full_node(),))
    order = ["c", "wide"]  # both in n's catalogue
    assert ahead_of(snapshot, "wide", "n", order, switching=()) == "c"
    assert ahead_of(snapshot, "c", "n", order, switching=()) is None
    # Once c's switch is under way it is out of the queue.
    assert ahead_of(snapshot, "wide", "n", order, switching={"c"}) is None
    # A rival that node cannot hold is no rival there.
    assert ahead_of(snapshot, "wide", "n", ["elsewhere", "wide"], switching=()) is None


# --------------------------------------------------------------------- the starvation bound


def test_busy_models_stay_until_the_oldest_request_waited_the_bound_out() -> None:
    # a and b both serve requests; c (asleep) is wanted.
    snapshot = FleetSnapshot((full_node({"a": 1, "b": 2}),))
    young = waiting_models([waiter("c", INTERACTIVE, BOUND - 1, 0)])["c"]
    rules = eviction_rules(young, CLOCK, BOUND, 0.0, NOW)
    held = plan_placement(snapshot, "c", LRU, NOW, eligible=rules.eligible, yielding=rules.yielding)
    assert isinstance(held, Refusal) and held.wait and "requests in flight" in held.reason

    old = waiting_models([waiter("c", BATCH, BOUND + 0.1, 0)])["c"]
    rules = eviction_rules(old, CLOCK, BOUND, 0.0, NOW)
    assert rules.yielding
    [plan] = placed(
        plan_placement(snapshot, "c", LRU, NOW, eligible=rules.eligible, yielding=rules.yielding)
    )
    # The least busy-to-lose by the strategy's order (a: least recently used) yields; it sleeps.
    assert plan == Placement("n", plan.victims, frozenset({"a"}), wake=True)
    assert [v.name for v in plan.victims] == ["a"]


def test_when_yielding_idle_models_go_before_busy_ones() -> None:
    # a (least recently used) is busy, b idle: b goes, a keeps serving.
    snapshot = FleetSnapshot((full_node({"a": 3}),))
    [plan] = placed(plan_placement(snapshot, "c", LRU, NOW, yielding=True))
    assert [v.name for v in plan.victims] == ["b"]


def test_the_bound_overrides_min_resident_s() -> None:
    # b was woken 3 s ago and a is busy; min_resident_s = 60 holds b until the bound.
    view = full_node({"a": 1})
    assert view.status is not None
    woken = [
        m.model_copy(update={"resident_since": NOW - 3}) if m.name == "b" else m
        for m in view.status.loaded
    ]
    view = NodeView("n", True, view.status.model_copy(update={"loaded": woken}), {"a": 1})
    snapshot = FleetSnapshot((view,))
    young = waiting_models([waiter("c", INTERACTIVE, 10, 0)])["c"]
    rules = eviction_rules(young, CLOCK, BOUND, 60.0, NOW)
    held = plan_placement(snapshot, "c", LRU, NOW, eligible=rules.eligible, yielding=rules.yielding)
    assert isinstance(held, Refusal) and "too recently loaded or woken: b" in held.reason
    old = waiting_models([waiter("c", INTERACTIVE, BOUND, 0)])["c"]
    rules = eviction_rules(old, CLOCK, BOUND, 60.0, NOW)
    [plan] = placed(
        plan_placement(snapshot, "c", LRU, NOW, eligible=rules.eligible, yielding=rules.yielding)
    )
    assert [v.name for v in plan.victims] == ["b"]  # idle (if fresh) before busy


# --------------------------------------------------------------------- waking vs much busier


def test_a_sleeping_copy_is_woken_unless_its_node_is_much_busier() -> None:
    # "a" sleeps on n1, where b is busy; n2 is empty with room for a cold load.
    def fleet(b_in_flight: int) -> FleetSnapshot:
        n1 = sleepy(
            node(
                "n1", [40 * GB], [("a", 0, 10 * GB, NOW - 50), ("b", 0, 10 * GB, NOW)], catalogue()
            ),
            8 * GB,
            {"a": GB},
        )
        n1 = NodeView("n1", True, n1.status, {"b": b_in_flight})
        n2 = sleepy(node("n2", [40 * GB], [], catalogue()), 8 * GB)
        return FleetSnapshot((n1, n2))

    slack = 4
    plans = plan_placement(fleet(4), "a", LRU, NOW, busier_slack=slack)
    assert isinstance(plans, list) and plans[0] == Placement("n1", wake=True)  # 4 more: not much
    plans = plan_placement(fleet(5), "a", LRU, NOW, busier_slack=slack)
    assert isinstance(plans, list)
    assert [p.node for p in plans] == ["n2", "n1"]  # 5 more: loaded on n2; the wake still listed
    assert plans[1].wake
    # Without the rule (None) the wake always comes first.
    plans = plan_placement(fleet(50), "a", LRU, NOW)
    assert isinstance(plans, list) and plans[0] == Placement("n1", wake=True)


def test_a_much_busier_node_is_still_woken_on_when_no_other_node_has_room() -> None:
    n1 = sleepy(node("n1", [40 * GB], [("a", 0, 10 * GB, NOW)], catalogue()), 8 * GB, {"a": GB})
    n1 = NodeView("n1", True, n1.status, {"b": 9})
    n2 = node("n2", [20 * GB], [("b", 0, 15 * GB, NOW - 10)], catalogue())
    n2 = NodeView("n2", True, n2.status, {"b": 1})  # busy: nothing there may leave
    plans = plan_placement(FleetSnapshot((n1, n2)), "a", LRU, NOW, busier_slack=4)
    assert isinstance(plans, list) and plans == [Placement("n1", wake=True)]


# --------------------------------------------------------------------- the host budget


def with_host_kv(view: NodeView, gib: float) -> NodeView:
    """Every catalogue entry with a host KV tier of `gib` GiB."""
    assert view.status is not None
    entries = [
        e.model_copy(update={"profile": e.profile.model_copy(update={"host_kv_cache_gib": gib})})
        for e in view.status.catalogue
    ]
    return NodeView(view.name, view.up, view.status.model_copy(update={"catalogue": entries}))


def test_host_kv_tiers_count_against_the_host_budget() -> None:
    # a and b loaded, each with a 2 GiB host KV tier; the budget holds one sleeper (4 GB) and
    # the two tiers only just not: 4 + 2·2 GiB > 8 GB.
    full = node(
        "n", [20 * GB], [("a", 0, 10 * GB, NOW - 90), ("b", 0, 10 * GB, NOW - 80)], catalogue()
    )
    plain = sleepy(full, 8 * GB)
    tiered = with_host_kv(plain, 2.0)
    assert host_held(plain) == 0
    assert host_held(tiered) == 2 * 2 * 2**30
    [without] = placed(plan_placement(FleetSnapshot((plain,)), "c", LRU, NOW))
    assert without.sleepers == {"a"}
    [with_tiers] = placed(plan_placement(FleetSnapshot((tiered,)), "c", LRU, NOW))
    assert with_tiers.sleepers == frozenset()  # the neuron would refuse: unload instead
    # A budget of exactly one sleeper beside both tiers holds it, unless the incoming model's
    # own tier must fit too.
    roomy = sleepy(with_host_kv(full, 2.0), 4 * GB + 4 * 2**30)
    assert sleepers(roomy, (resident(roomy, "a"),)) == {"a"}
    assert sleepers(roomy, (resident(roomy, "a"),), incoming_host_bytes=2**30) == frozenset()
    assert HOST == 4 * GB


def resident(view: NodeView, name: str):  # type: ignore[no-untyped-def]
    from control_plane.lifecycle import residents

    return next(r for r in residents(view) if r.name == name)
