"""The fleet shell (control_plane/fleet.py) against in-process fake neurons: one load per model,
fallback to the next node, loads that overlap, polling that survives a bad reply, failed nodes
out at once and a breaker for flapping ones, pinned models kept resident, defragmentation that
does not block loads. The fake stands in for a neuron's lifecycle API only (`FakeNeuron`: memory
accounting, per-model load de-duplication and the refusal to unload a busy model, as the real
neuron does); tests/fleet/test_fleet.py runs the same behaviours on real neurons."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from pydantic import ValidationError

from control_plane.errors import ModelNotFound, Overloaded, UpstreamFailed
from control_plane.fleet import Fleet
from cortex.config import CortexConfig, ModelProfile, NeuronRef
from cortex.neuron_api import (
    CatalogueEntry,
    GpuInfo,
    LoadedModel,
    ModelState,
    NeuronStatus,
    TokenizerFiles,
    TritonInfo,
    TritonState,
    UnloadResult,
)

GB = 10**9


class FakeNeuron:
    """A fake neuron: one device of `budget` bytes; every model costs `size` bytes."""

    def __init__(self, neuron: NeuronRef, profiles: list[ModelProfile], budget: int) -> None:
        self.neuron = neuron
        self.profiles = {p.name: p for p in profiles if not p.neurons or neuron.name in p.neurons}
        self.budget = budget
        self.size = 10 * GB
        self.loaded: dict[str, str] = {}  # model → state
        self.in_flight: dict[str, int] = {}
        self.load_seconds = 0.05
        self.fail_loads = False
        self.dead = False
        self.bad_replies = 0
        self.loads: list[tuple[str, float, float]] = []  # (model, started, ended)
        self.refused = 0
        self._tasks: dict[str, asyncio.Task[None]] = {}
        # Sleep: whether its engines can, and how many sleeps it refuses first (the engine
        # still counting a request the gateway saw end).
        self.can_sleep = False
        self.refuse_sleeps = 0
        self.unloads: list[str] = []

    async def status(self, timeout: float) -> NeuronStatus:
        if self.dead:
            raise UpstreamFailed(f"neuron {self.neuron.name} did not answer")
        if self.bad_replies:
            self.bad_replies -= 1
            NeuronStatus.model_validate({"name": self.neuron.name})  # a reply it cannot read
        used = self.size * sum(state != "ASLEEP" for state in self.loaded.values())
        return NeuronStatus(
            name=self.neuron.name,
            triton=TritonInfo(
                state=TritonState.LIVE, http_url="", grpc_url="127.0.0.1:1", metrics_url=""
            ),
            gpus=[
                GpuInfo(
                    index=0,
                    uuid=self.neuron.name,
                    name="fake",
                    memory_total_bytes=self.budget,
                    memory_used_bytes=used,
                    memory_free_bytes=self.budget - used,
                )
            ],
            has_gpu=True,
            loaded=[
                LoadedModel(
                    name=name,
                    state=ModelState(state),
                    engine="torch",
                    quantization="none",
                    tp=1,
                    gpus=[0],
                    memory_bytes=0 if state == "ASLEEP" else self.size,
                    estimated_bytes=self.size,
                    host_bytes=GB if state == "ASLEEP" else 0,
                    loaded_at=1.0,
                    last_used=1.0,
                    in_flight=self.in_flight.get(name, 0),
                )
                for name, state in self.loaded.items()
            ],
            catalogue=[
                CatalogueEntry(
                    profile=p,
                    estimated_bytes=self.size,
                    context_length=4096,
                    can_sleep=self.can_sleep,
                    host_bytes_asleep=GB,
                )
                for p in self.profiles.values()
            ],
            host_memory_budget_bytes=100 * GB if self.can_sleep else 0,
            host_memory_asleep_bytes=GB * sum(s == "ASLEEP" for s in self.loaded.values()),
        )

    async def load(self, model: str) -> LoadedModel:
        if self.dead:
            raise UpstreamFailed(f"neuron {self.neuron.name} did not answer")
        if self.loaded.get(model) == "ASLEEP":
            self.loaded[model] = "READY"  # woken
        if model not in self.loaded:
            awake = sum(state != "ASLEEP" for state in self.loaded.values())
            if self.size * (awake + 1) > self.budget:
                self.refused += 1
                raise Overloaded(f"neuron {self.neuron.name}: {model} does not fit")
            if self.fail_loads:
                raise UpstreamFailed(f"neuron {self.neuron.name}: Triton could not load {model}")
            self.loaded[model] = "LOADING"
            self._tasks[model] = asyncio.create_task(self._load(model))
        if model in self._tasks:
            await asyncio.shield(self._tasks[model])
        return (await self.status(1)).loaded[list(self.loaded).index(model)]

    async def _load(self, model: str) -> None:
        started = time.monotonic()
        await asyncio.sleep(self.load_seconds)
        self.loaded[model] = "READY"
        self.loads.append((model, started, time.monotonic()))
        del self._tasks[model]

    async def unload(self, model: str, force: bool = False) -> UnloadResult:
        if self.in_flight.get(model) and not force:
            raise Overloaded(f"{model} has requests in flight; not unloading")
        self.loaded.pop(model)
        self.unloads.append(model)
        return UnloadResult(model=model, memory_released=True, triton_restarted=False)

    async def sleep(self, model: str) -> LoadedModel:
        if self.refuse_sleeps:
            self.refuse_sleeps -= 1
            raise Overloaded(f"neuron {self.neuron.name}: {model} has 1 request(s) in flight")
        self.loaded[model] = "ASLEEP"
        return (await self.status(1)).loaded[list(self.loaded).index(model)]

    async def tokenizer(self, model: str) -> TokenizerFiles:
        raise ModelNotFound(model)

    async def close(self) -> None:
        pass

    async def pin(self, model: str, pinned: bool) -> CatalogueEntry:
        self.profiles[model] = self.profiles[model].model_copy(update={"pinned": pinned})
        return CatalogueEntry(
            profile=self.profiles[model], estimated_bytes=self.size, context_length=4096
        )


def profile(name: str, **fields: Any) -> ModelProfile:
    return ModelProfile(name=name, source="/m", **fields)


PROFILES = [profile("a"), profile("b"), profile("c"), profile("d")]


def run_fleet(
    budgets: dict[str, int],
    body: Callable[[Fleet, dict[str, FakeNeuron]], Awaitable[None]],
    profiles: list[ModelProfile] = PROFILES,
    start: bool = False,
    eviction: dict[str, Any] | None = None,
    **gateway: Any,
) -> None:
    config = CortexConfig.model_validate(
        {
            "gateway": {"poll_interval_s": 0.05, "load_timeout_s": 10, **gateway},
            "eviction": {
                "interval_s": 3600,
                "defrag_after_cycles": 0,
                "drain_timeout_s": 0.5,
                **(eviction or {}),
            },
            "neurons": [
                {"name": n, "endpoint": f"http://127.0.0.1:{i + 1}"} for i, n in enumerate(budgets)
            ],
        }
    )
    fakes: dict[str, FakeNeuron] = {}

    def clients(ref: NeuronRef, timeout: float) -> FakeNeuron:
        fakes[ref.name] = FakeNeuron(ref, profiles, budgets[ref.name])
        return fakes[ref.name]

    async def main() -> None:
        fleet = Fleet(config, clients=clients)
        if start:
            await fleet.start()
        else:
            await fleet.poll_all()
        try:
            await asyncio.wait_for(body(fleet, fakes), 20)
        finally:
            await fleet.stop()

    asyncio.run(main())


async def eventually(predicate: Callable[[], bool], timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


def test_many_waiting_requests_cause_one_load() -> None:
    async def body(fleet: Fleet, fakes: dict[str, FakeNeuron]) -> None:
        nodes = await asyncio.gather(*(fleet.ensure_ready("a") for _ in range(10)))
        assert set(nodes) == {"x"}
        assert [model for model, _, _ in fakes["x"].loads] == ["a"]

    run_fleet({"x": 40 * GB}, body)


def test_a_failed_load_falls_back_to_the_next_node() -> None:
    async def body(fleet: Fleet, fakes: dict[str, FakeNeuron]) -> None:
        fakes["big"].fail_loads = True  # the first choice: it has the most room
        assert await fleet.ensure_ready("a") == "small"
        assert fakes["small"].loaded == {"a": "READY"} and fakes["big"].loaded == {}

    run_fleet({"big": 40 * GB, "small": 20 * GB}, body)


def test_cold_loads_of_different_models_overlap_and_never_share_memory() -> None:
    async def body(fleet: Fleet, fakes: dict[str, FakeNeuron]) -> None:
        for fake in fakes.values():
            fake.load_seconds = 0.5
        started = time.monotonic()
        nodes = await asyncio.gather(fleet.ensure_ready("a"), fleet.ensure_ready("b"))
        # One copy fits on each node: both plans were made while the other was under way, and
        # the first one's reserved memory sent the second elsewhere, without a refused load.
        assert sorted(nodes) == ["x", "y"]
        assert fakes["x"].refused == fakes["y"].refused == 0
        (_, start_x, end_x), (_, start_y, end_y) = fakes["x"].loads[0], fakes["y"].loads[0]
        assert start_x < end_y and start_y < end_x  # the two loads ran at the same time
        assert time.monotonic() - started < 0.9

    run_fleet({"x": 10 * GB, "y": 10 * GB}, body)


def test_polling_goes_on_after_a_reply_it_cannot_read() -> None:
    async def body(fleet: Fleet, fakes: dict[str, FakeNeuron]) -> None:
        fakes["x"].bad_replies = 1
        with pytest.raises(ValidationError):
            await fakes["x"].status(1)  # the fake's bad reply is a real validation error
        fakes["x"].bad_replies = 3  # more than missed_polls_down: the node goes down meanwhile
        await eventually(lambda: not fleet.nodes["x"].up)
        fakes["x"].loaded["a"] = "READY"  # loaded behind the gateway's back
        await eventually(lambda: fleet.ready_replica("a") == "x")

    run_fleet({"x": 40 * GB}, body, start=True)


def test_a_failed_node_is_down_at_once_and_a_flapping_one_stays_out() -> None:
    async def body(fleet: Fleet, fakes: dict[str, FakeNeuron]) -> None:
        await fleet.ensure_ready("a")
        fleet.node_failed("x", "connection refused")
        assert fleet.ready_replica("a") is None  # no waiting for missed polls
        await eventually(lambda: fleet.ready_replica("a") == "x")  # it answers: back
        fleet.node_failed("x", "connection refused")
        await eventually(lambda: fleet.nodes["x"].up)
        fleet.node_failed("x", "connection refused")  # third time in the window: breaker opens
        await asyncio.sleep(0.5)  # ten polls answered meanwhile
        assert not fleet.nodes["x"].up and fleet.ready_replica("a") is None
        await eventually(lambda: fleet.ready_replica("a") == "x", timeout=3)

    run_fleet({"x": 40 * GB}, body, start=True, breaker_open_s=1.0)


def test_pinned_models_are_placed_at_start_and_again_when_their_node_dies() -> None:
    profiles = [profile("p", pinned=True), profile("a"), profile("q", pinned=True, neurons=("x",))]

    async def body(fleet: Fleet, fakes: dict[str, FakeNeuron]) -> None:
        await eventually(lambda: "p" in fakes["x"].loaded or "p" in fakes["y"].loaded)
        await eventually(lambda: fakes["x"].loaded.get("q") == "READY")
        assert fleet.pinned_unplaced == {}
        fakes["x"].dead = True
        fakes["y"].loaded.pop("a", None)
        await eventually(lambda: fakes["y"].loaded.get("p") == "READY")  # re-placed (or stayed)
        # q may live on x only: it cannot be placed, and the fleet says so.
        await eventually(lambda: "q" in fleet.pinned_unplaced)
        assert fleet.metrics.pinned_unplaced.labels("q")._value.get() == 1
        fakes["x"].dead = False  # x is back: q goes home
        await eventually(
            lambda: fakes["x"].loaded.get("q") == "READY" and not fleet.pinned_unplaced
        )

    run_fleet({"x": 20 * GB, "y": 20 * GB}, body, profiles=profiles, start=True)


def test_defragmentation_drains_without_blocking_loads_and_says_when_the_old_copy_stayed() -> None:
    async def body(fleet: Fleet, fakes: dict[str, FakeNeuron]) -> None:
        # x holds a, y holds b: moving one next to the other frees a whole node.
        fakes["x"].loaded["a"] = "READY"
        fakes["y"].loaded["b"] = "READY"
        await fleet.poll_all()
        for name in ("x", "y"):  # the old copy keeps a stream the whole time
            fleet.nodes[name].in_flight = {"a": 1, "b": 1}
            fakes[name].in_flight = {"a": 1, "b": 1}
        move = asyncio.create_task(fleet.defragment())
        await eventually(lambda: bool(fleet.nodes["x"].draining or fleet.nodes["y"].draining))
        started = time.monotonic()
        assert await fleet.ensure_ready("c") in ("x", "y")  # a cold load during the drain
        assert time.monotonic() - started < 0.4 and not move.done()
        result = await move
        assert result is not None and not result.old_copy_unloaded
        assert result.move.model in fakes[result.move.source].loaded  # two copies, as reported

    run_fleet({"x": 40 * GB, "y": 40 * GB}, body)


def test_a_cold_load_waits_for_a_busy_victim_instead_of_refusing() -> None:
    # x holds one model. a is busy; a request for b waits for a's request to end, then b
    # takes a's place (issue 27: this was a 503 "requests in flight: a").
    async def body(fleet: Fleet, fakes: dict[str, FakeNeuron]) -> None:
        assert await fleet.ensure_ready("a") == "x"
        async with fleet.using("x", "a"):
            waiting = asyncio.create_task(fleet.ensure_ready("b"))
            await asyncio.sleep(0.3)
            assert not waiting.done() and fakes["x"].loaded == {"a": "READY"}
        assert await waiting == "x"
        assert fakes["x"].loaded == {"b": "READY"}

    run_fleet({"x": 10 * GB}, body)


def test_past_the_swap_bound_a_busy_model_yields_and_its_new_requests_queue_behind() -> None:
    # x holds one model. a's request outlasts the bound (0.2 s) that b's request waits: a then
    # takes no new requests (it is leaving), its request in flight still runs; once that ends
    # b takes a's place, and a's next request, queued meanwhile, comes after b.
    async def body(fleet: Fleet, fakes: dict[str, FakeNeuron]) -> None:
        assert await fleet.ensure_ready("a") == "x"
        async with fleet.using("x", "a"):
            waiting = asyncio.create_task(fleet.ensure_ready("b"))
            await eventually(lambda: fleet.ready_replica("a") is None)
            assert not waiting.done() and fakes["x"].loaded == {"a": "READY"}
            again = asyncio.create_task(fleet.ensure_ready("a"))
        assert await waiting == "x"
        assert await again == "x"
        assert [model for model, _, _ in fakes["x"].loads] == ["a", "b", "a"]

    run_fleet({"x": 10 * GB}, body, eviction={"max_swap_wait_s": 0.2})


def test_a_sleep_refused_for_a_request_just_ended_is_tried_again_before_unloading() -> None:
    # The engine still counted a's last request when the gateway asked it to sleep: asked once
    # more it sleeps, instead of being unloaded (a cold load for its next request).
    async def body(fleet: Fleet, fakes: dict[str, FakeNeuron]) -> None:
        fakes["x"].can_sleep = True
        await fleet.poll("x")
        assert await fleet.ensure_ready("a") == "x"
        fakes["x"].refuse_sleeps = 1
        assert await fleet.ensure_ready("b") == "x"
        assert fakes["x"].loaded == {"a": "ASLEEP", "b": "READY"}
        assert fakes["x"].unloads == []
        # Refused twice (its host budget, say): unloaded.
        fakes["x"].refuse_sleeps = 2
        assert await fleet.ensure_ready("c") == "x"
        assert fakes["x"].unloads == ["b"] and fakes["x"].loaded["c"] == "READY"

    run_fleet({"x": 10 * GB}, body)


def test_a_request_that_found_its_model_gone_leaves_the_node_up() -> None:
    async def body(fleet: Fleet, fakes: dict[str, FakeNeuron]) -> None:
        assert await fleet.ensure_ready("a") == "x"
        assert not await fleet.model_left("x", "a")  # still there: the node failed
        fakes["x"].dead = True  # a node that does not answer has not lost the model
        assert not await fleet.model_left("x", "a")
        fakes["x"].dead = False
        fakes["x"].loaded.clear()  # unloaded behind this gateway's back
        assert await fleet.model_left("x", "a")
        assert fleet.nodes["x"].up

    run_fleet({"x": 10 * GB}, body)
