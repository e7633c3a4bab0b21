"""Residency tiers in the pure planner (issue 28), on hand-built snapshots: a sleeping copy is
woken before anything is loaded elsewhere, a victim sleeps while its node's host budget holds
it and is unloaded beyond, idle models sleep after `sleep_after_s` and leave after their TTL."""

from __future__ import annotations

from control_plane.lifecycle import (
    Placement,
    Refusal,
    idle_expired,
    idle_sleepers,
    plan_placement,
    resident_for,
)
from control_plane.routing import FleetSnapshot, NodeView
from cortex.config import EvictionStrategy, ModelProfile
from cortex.neuron_api import CatalogueEntry, LoadedModel, ModelState
from tests.gateway.test_lifecycle import GB, NOW, node, profile

LRU = EvictionStrategy.LRU
# Each model: 10 GB on a device when loaded, 4 GB of weights in host memory when asleep.
HOST = 4 * GB


def sleepy(view: NodeView, host_budget: int, asleep: dict[str, int] | None = None) -> NodeView:
    """The view with sleep-capable catalogue entries, a host budget, and `asleep` models
    (name → device bytes still held) in the ASLEEP tier."""
    assert view.status is not None
    asleep = asleep or {}
    catalogue = [
        entry.model_copy(update={"can_sleep": True, "host_bytes_asleep": HOST})
        for entry in view.status.catalogue
    ]
    loaded = [
        model.model_copy(
            update={
                "state": ModelState.ASLEEP,
                "memory_bytes": asleep[model.name],
                "host_bytes": HOST,
            }
        )
        if model.name in asleep
        else model
        for model in view.status.loaded
    ]
    held = {m.name: m.memory_bytes for m in view.status.loaded}
    gpus = [
        gpu.model_copy(
            update={
                "memory_used_bytes": gpu.memory_used_bytes
                - sum(held[name] - bytes_ for name, bytes_ in asleep.items()),
                "memory_free_bytes": gpu.memory_free_bytes
                + sum(held[name] - bytes_ for name, bytes_ in asleep.items()),
            }
        )
        for gpu in view.status.gpus
    ]
    status = view.status.model_copy(
        update={
            "catalogue": catalogue,
            "loaded": loaded,
            "gpus": gpus,
            "host_memory_budget_bytes": host_budget,
            "host_memory_asleep_bytes": HOST * len(asleep),
        }
    )
    return NodeView(view.name, view.up, status, view.in_flight)


def placements(plan: list[Placement] | Refusal) -> list[Placement]:
    assert isinstance(plan, list), plan
    return plan


def catalogue(**settings: object) -> dict[str, tuple[ModelProfile, int]]:
    sizes = {"a": 10 * GB, "b": 10 * GB, "c": 10 * GB, "wide": 20 * GB}
    return {name: (profile(name, **settings), size) for name, size in sizes.items()}


def test_a_sleeping_copy_is_woken_before_a_load_elsewhere() -> None:
    # "a" sleeps on n1 (1 GB still on its device); n2 is empty and has all the room.
    n1 = sleepy(
        node("n1", [20 * GB], [("a", 0, 10 * GB, NOW - 50)], catalogue()), 8 * GB, {"a": GB}
    )
    n2 = sleepy(node("n2", [80 * GB], [], catalogue()), 8 * GB)
    plans = plan_placement(FleetSnapshot((n2, n1)), "a", LRU, NOW)
    assert isinstance(plans, list)
    assert plans[0] == Placement("n1", wake=True)


def test_victims_sleep_while_the_host_budget_holds_them_then_leave() -> None:
    # One 20 GB device full with a and b; "wide" needs both out. The host holds one sleeper.
    full = node(
        "n", [20 * GB], [("a", 0, 10 * GB, NOW - 90), ("b", 0, 10 * GB, NOW - 80)], catalogue()
    )
    [plan] = placements(plan_placement(FleetSnapshot((sleepy(full, 5 * GB),)), "wide", LRU, NOW))
    assert [v.name for v in plan.victims] == ["a", "b"]
    assert plan.sleepers == {"a"}  # the least recently used sleeps; b is unloaded
    [roomy] = placements(plan_placement(FleetSnapshot((sleepy(full, 8 * GB),)), "wide", LRU, NOW))
    assert roomy.sleepers == {"a", "b"}
    [none] = placements(plan_placement(FleetSnapshot((sleepy(full, 0),)), "wide", LRU, NOW))
    assert none.sleepers == frozenset()
    # An engine that cannot sleep (TensorRT-LLM, tp > 1) is always unloaded.
    assert full.status is not None
    [plain] = placements(plan_placement(FleetSnapshot((full,)), "wide", LRU, NOW))
    assert plain.sleepers == frozenset()


def test_a_wake_that_needs_room_evicts_for_it() -> None:
    view = sleepy(
        node(
            "n", [20 * GB], [("a", 0, 10 * GB, NOW - 90), ("b", 0, 12 * GB, NOW - 5)], catalogue()
        ),
        8 * GB,
        {"a": GB},
    )
    view.in_flight["b"] = 0
    [plan] = placements(plan_placement(FleetSnapshot((view,)), "a", LRU, NOW))
    assert plan.wake and [v.name for v in plan.victims] == ["b"]
    assert plan.sleepers == {"b"}  # b takes a's place asleep: 4 + 4 GB of the 8 GB budget


def test_idle_models_sleep_after_sleep_after_s_and_leave_after_their_ttl() -> None:
    settings = {"sleep_after_s": 60.0, "idle_ttl_s": 600.0}
    view = sleepy(
        node(
            "n",
            [40 * GB],
            [
                ("a", 0, 10 * GB, NOW - 100),  # idle past sleep_after_s
                ("b", 0, 10 * GB, NOW - 10),  # recent
                ("c", 0, 10 * GB, NOW - 700),  # asleep, past its idle TTL
            ],
            catalogue(**settings),
        ),
        8 * GB,
        {"c": GB},
    )
    snapshot = FleetSnapshot((view,))
    assert [r.name for r in idle_sleepers(snapshot, NOW)] == ["a"]
    assert [r.name for r in idle_expired(snapshot, NOW)] == ["c"]
    # Without room in the host budget nothing sleeps (the idle TTL unloads it later).
    assert idle_sleepers(FleetSnapshot((sleepy(view, 5 * GB, {"c": GB}),)), NOW) == []
    # With requests in flight it is not idle.
    busy = sleepy(view, 8 * GB, {"c": GB})
    busy.in_flight["a"] = 1
    assert idle_sleepers(FleetSnapshot((busy,)), NOW) == []


def test_the_catalogue_entry_says_whether_an_engine_sleeps() -> None:
    entry = CatalogueEntry(profile=profile("a"), estimated_bytes=GB, context_length=1)
    assert entry.can_sleep is False and entry.host_bytes_asleep == 0
    model = LoadedModel(
        name="a",
        state=ModelState.ASLEEP,
        engine="torch",
        quantization="none",
        tp=1,
        gpus=[0],
        memory_bytes=0,
        estimated_bytes=GB,
    )
    assert model.host_bytes == 0


def test_a_model_just_woken_stays_for_min_resident_s() -> None:
    # b was woken 3 s ago; a wants its room. Under min_resident_s = 10 the request waits.
    view = sleepy(
        node(
            "n", [20 * GB], [("a", 0, 10 * GB, NOW - 90), ("b", 0, 12 * GB, NOW - 3)], catalogue()
        ),
        8 * GB,
        {"a": GB},
    )
    assert view.status is not None
    woken = [
        m.model_copy(update={"resident_since": NOW - 3}) if m.name == "b" else m
        for m in view.status.loaded
    ]
    view = NodeView(view.name, view.up, view.status.model_copy(update={"loaded": woken}), {})
    snapshot = FleetSnapshot((view,))
    held = plan_placement(snapshot, "a", LRU, NOW, eligible=resident_for(10.0, NOW))
    assert isinstance(held, Refusal) and held.wait
    assert "too recently loaded or woken: b" in held.reason
    [plan] = placements(plan_placement(snapshot, "a", LRU, NOW, eligible=resident_for(2.0, NOW)))
    assert [v.name for v in plan.victims] == ["b"]
    assert resident_for(0.0, NOW) is None  # off: every idle model may go
