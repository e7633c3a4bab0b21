"""Fleet state, cold loads, replicas, eviction and defragmentation: the thin async shell around
the pure planning in `routing` and `lifecycle`.

The gateway polls every neuron's /status (a neuron is down after `missed_polls_down` missed
polls, or at once when a request fails on it; up again when it answers, unless its circuit
breaker keeps it out a while), keeps the latest snapshot, and counts its own in-flight requests.

A request for a model nobody has loaded triggers one load however many requests wait for it
(they wait up to `load_timeout_s`); the placement plan says where, and what must be evicted
first; a failed load re-plans without that node. The waiting requests are a queue (`swap.py`):
a load that must evict waits while a model ahead of it in the swap queue may take the same
node, models with requests in flight stay until a waiter has waited `max_swap_wait_s` (then
they yield: their streams finish, new requests for them wait behind the switch), and when the
model is READY its waiters go together, interactive keys first. Loads of different models run at once: there
is no fleet-wide lock. A plan is made and its memory reserved in the snapshot in one step (no
await between), so concurrent plans see each other's loads under way and victims being
unloaded; the neuron serialises what happens on its node. Before placing, the gateway looks at
the candidate nodes afresh: a load another gateway started shows there as LOADING, and this one
waits for that load instead of starting a second copy.

Pinned models are placed at start, when a neuron comes up or goes down, and on every cycle while
one is missing. Each poll samples load per replica; models allowed more than one replica get
another when it stays high (`plan_scaling`). An APScheduler interval job unloads models past
their idle TTL and, every `defrag_after_cycles` cycles, carries out one re-packing move
make-before-break: load the new copy, let traffic move to it, unload the old one.

Node clients come from a factory (`NodeClientFactory`), so the fleet's behaviour can be tested
against in-process fakes as well as against real neurons.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import itertools
import logging
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlparse

from apscheduler.schedulers.asyncio import AsyncIOScheduler

from control_plane.cold_load import WAIT_STEP_S, ColdLoad, GiveUp, Place, Wait
from control_plane.errors import (
    CortexError,
    ModelNotFound,
    ModelUnavailable,
    Overloaded,
    UpstreamFailed,
    UpstreamTimeout,
)
from control_plane.lifecycle import (
    Demand,
    LoadWindow,
    Move,
    Placement,
    Resident,
    ScaleIn,
    idle_expired,
    idle_sleepers,
    pinned_missing,
    plan_defrag,
    plan_placement,
    plan_scaling,
)
from control_plane.metrics import GatewayMetrics
from control_plane.node_client import NeuronClient, TritonStream
from control_plane.node_record import CircuitBreaker, NodeRecord
from control_plane.prompting import ModelTokenizer
from control_plane.routing import (
    FleetSnapshot,
    catalogue_index,
    choose_replica,
    merge_catalogues,
    resolve_model,
)
from control_plane.swap import (
    Waiter,
    ahead_of,
    eviction_rules,
    release_order,
    seconds_to_bound,
    switch_order,
    waiting_models,
)
from cortex.config import CortexConfig, EvictionStrategy, KeyPriority, NeuronRef
from cortex.neuron_api import (
    CatalogueEntry,
    EvictionReason,
    LoadedModel,
    ModelState,
    NeuronStatus,
    TokenizerFiles,
)

log = logging.getLogger("cortex.fleet")


class NodeClient(Protocol):
    """What the fleet asks of a neuron (`NeuronClient` over HTTP; tests may pass fakes)."""

    neuron: NeuronRef

    async def status(self, timeout: float) -> NeuronStatus: ...
    async def load(self, model: str) -> LoadedModel: ...
    async def unload(self, model: str, force: bool = False) -> Any: ...
    async def sleep(self, model: str) -> LoadedModel: ...
    async def pin(self, model: str, pinned: bool) -> CatalogueEntry: ...
    async def tokenizer(self, model: str) -> TokenizerFiles: ...
    async def close(self) -> None: ...


NodeClientFactory = Callable[[NeuronRef, float], NodeClient]


def _loading_elsewhere(snapshot: FleetSnapshot, model: str) -> str | None:
    """An up node whose neuron reports the model LOADING while this gateway is not loading it
    there (another gateway's load, or the neuron's reload after a Triton restart)."""
    for view in snapshot.nodes:
        reported = view.loaded.get(model)
        if (
            view.up
            and reported is not None
            and reported.state == ModelState.LOADING
            and model not in view.loading
        ):
            return view.name
    return None


@dataclass(frozen=True)
class DefragResult:
    """A move carried out: `old_copy_unloaded` is False when the old copy kept serving past the
    drain timeout and was left in place (two copies now)."""

    move: Move
    old_copy_unloaded: bool


class Fleet:
    def __init__(
        self,
        config: CortexConfig,
        metrics: GatewayMetrics | None = None,
        clients: NodeClientFactory = NeuronClient,
    ) -> None:
        self.config = config
        self.metrics = metrics or GatewayMetrics()
        self.cycles = 0
        self._scheduler: AsyncIOScheduler | None = None
        settings = config.gateway
        self.nodes = {
            n.name: NodeRecord(
                clients(n, settings.load_timeout_s),
                CircuitBreaker(
                    settings.breaker_failures, settings.breaker_window_s, settings.breaker_open_s
                ),
            )
            for n in config.neurons
        }
        self._loads: dict[str, asyncio.Task[str]] = {}
        # Requests waiting for their model's load, wake or switch (the swap queue), and the
        # models whose placement is being carried out (out of the queue).
        self._waiters: dict[str, list[tuple[Waiter, asyncio.Future[str]]]] = {}
        self._arrivals = itertools.count()
        self._switching: set[str] = set()
        self._background: dict[str, asyncio.Task[None]] = {}
        self._tokenizers: dict[str, ModelTokenizer] = {}
        self._tokenizer_locks: dict[str, asyncio.Lock] = {}
        self._poller: asyncio.Task[None] | None = None
        self.window = LoadWindow(config.scaling.window_s)
        self.demand = Demand(config.eviction.demand_half_life_s)
        # Pinned models that could not be placed, with the reason (`cortex_pinned_unplaced`).
        self.pinned_unplaced: dict[str, str] = {}
        self._pinned: set[str] = set()  # every pinned model any catalogue has listed
        self._merged: dict[str, CatalogueEntry] | None = None
        self._change = asyncio.Event()

    # ------------------------------------------------------------------ polling

    async def start(self) -> None:
        await self.poll_all()
        self.keep_pinned()
        self._poller = asyncio.create_task(self._poll_forever())
        self._scheduler = AsyncIOScheduler()
        self._scheduler.add_job(
            self.eviction_cycle,
            "interval",
            seconds=self.config.eviction.interval_s,
            max_instances=1,
            coalesce=True,
        )
        self._scheduler.start()

    async def stop(self) -> None:
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=False)
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
        for task in [*self._loads.values(), *self._background.values()]:
            task.cancel()
        for node in self.nodes.values():
            await node.client.close()
            if node.triton is not None:
                await node.triton.close()

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.sleep(self.config.gateway.poll_interval_s)
            try:
                await self.poll_all()
                self.window.record(self.snapshot(), time.time())
                self.scale()
            except Exception:  # one bad round must not end polling for good
                log.exception("fleet poll failed; polling goes on")

    async def poll_all(self) -> None:
        before = {name: n.up for name, n in self.nodes.items()}
        await asyncio.gather(*(self.poll(name) for name in self.nodes))
        if any(self.nodes[name].up != up for name, up in before.items()):
            self.keep_pinned()  # a node came (pinned models may go there) or went (re-place)

    async def poll(self, name: str) -> None:
        node = self.nodes[name]
        try:
            # A neuron busy loading a model can answer slowly: be lenient before calling it down.
            status = await node.client.status(
                timeout=max(5.0, 2 * self.config.gateway.poll_interval_s)
            )
        except Exception as error:  # any failure is a missed poll, never the end of polling
            message = error.message if isinstance(error, CortexError) else repr(error)
            if node.missed_poll(self.config.gateway.missed_polls_down):
                self._set_down(name, message)
            else:
                log.info("neuron %s missed a poll: %s", name, message)
            return
        for gpu in status.gpus:
            self.metrics.memory_used.labels(name, str(gpu.index)).set(gpu.memory_used_bytes)
            self.metrics.memory_free.labels(name, str(gpu.index)).set(gpu.memory_free_bytes)
        self._record_tiers(name, status)
        node.missed = 0
        if node.status is None or node.status.catalogue != status.catalogue:
            self._merged = None
        if node.breaker.is_open(time.monotonic()):
            return  # the breaker is open: it answers, but stays out of rotation for now
        if not node.up:
            log.info("neuron %s is up", name)
        self.metrics.neuron_up.labels(name).set(1)
        node.status, node.up = status, True
        self._notify()
        node.catalogue = catalogue_index(status)  # once per poll, not per request
        grpc_url = self._grpc_url(name, status)
        if node.triton is None or node.triton.url != grpc_url:
            if node.triton is not None:
                await node.triton.close()
            node.triton = TritonStream.for_neuron(grpc_url, node.client.neuron)

    def _record_tiers(self, name: str, status: NeuronStatus) -> None:
        """The tier gauge: 1 for the tier each model copy on the node is in, 0 for the other
        (and for both once a copy has left)."""
        tiers = {m.name: m.state for m in status.loaded}
        node = self.nodes[name]
        for model in node.tiered | set(tiers):
            state = tiers.get(model)
            self.metrics.tier.labels(model, name, "loaded").set(state == ModelState.READY)
            self.metrics.tier.labels(model, name, "asleep").set(state == ModelState.ASLEEP)
        node.tiered = set(tiers)

    def _set_down(self, name: str, reason: str) -> None:
        node = self.nodes[name]
        if node.up:
            log.warning("neuron %s is down: %s", name, reason)
            settings = self.config.gateway
            if node.breaker.went_down(time.monotonic()):
                log.warning(
                    "neuron %s went down %d times in %.0f s: out of rotation for %.0f s",
                    name,
                    settings.breaker_failures,
                    settings.breaker_window_s,
                    settings.breaker_open_s,
                )
        node.up = False
        node.status = None
        self._merged = None
        self._notify()
        self.metrics.neuron_up.labels(name).set(0)

    def node_failed(self, name: str, reason: str) -> None:
        """A request failed on the node before its first token: down at once, without waiting
        for missed polls (a poll brings it back when it answers and its breaker allows)."""
        self._set_down(name, reason)
        self.keep_pinned()

    def _grpc_url(self, name: str, status: NeuronStatus) -> str:
        # The neuron reports Triton on its own loopback; reach it on the neuron's host.
        host = urlparse(self.nodes[name].client.neuron.endpoint).hostname or "127.0.0.1"
        port = status.triton.grpc_url.rpartition(":")[2]
        return f"{host}:{port}"

    def snapshot(self) -> FleetSnapshot:
        nodes = tuple(n.view(name) for name, n in self.nodes.items())
        if self._merged is None:  # merged again only when a node's catalogue or state changed
            self._merged = merge_catalogues(nodes)
        return FleetSnapshot(nodes, self._merged)

    # ------------------------------------------------------------------ models

    def resolve(self, requested: str) -> CatalogueEntry:
        snapshot = self.snapshot()
        name = resolve_model(snapshot, requested)
        if name is None:
            down = [node.name for node in snapshot.nodes if not node.up]
            if down:  # it may be theirs: not "no such model" while a node is away
                raise Overloaded(f"node {', '.join(down)} is unavailable; try again shortly")
            raise ModelNotFound(requested)
        return snapshot.catalogue()[name]

    async def tokenizer(self, model: str) -> ModelTokenizer:
        cached = self._tokenizers.get(model)
        if cached is not None:
            return cached
        lock = self._tokenizer_locks.setdefault(model, asyncio.Lock())
        async with lock:
            if model not in self._tokenizers:
                snapshot = self.snapshot()
                holders = [n.name for n in snapshot.nodes if model in n.catalogue()]
                if not holders:
                    raise ModelNotFound(model)
                files = await self.nodes[holders[0]].client.tokenizer(model)
                self._tokenizers[model] = await asyncio.to_thread(ModelTokenizer, files)
                # A tokenizer brings transformers (and torch) with it: a quarter of a million
                # objects that live as long as the process. Out of the collector's way, a full
                # collection takes microseconds instead of stalling every stream for ~0.1 s.
                gc.freeze()
        return self._tokenizers[model]

    async def model_left(self, node: str, model: str) -> bool:
        """After a request for `model` failed on `node` before its first token: whether a fresh
        look shows the model gone from there (unloaded, retired, being moved) while the node
        answers, rather than the node failing."""
        await self.poll(node)
        member = self.nodes[node]
        if not member.up or member.status is None:
            return False
        view = next(v for v in self.snapshot().nodes if v.name == node)
        return model not in view.ready_models()

    def ready_replica(self, model: str, affinity: str | None = None) -> str | None:
        """The node to serve a model that is READY somewhere now, without waiting."""
        return choose_replica(self.snapshot(), model, affinity, self.config.gateway.affinity_slack)

    async def ensure_ready(
        self,
        model: str,
        affinity: str | None = None,
        priority: KeyPriority = KeyPriority.INTERACTIVE,
    ) -> str:
        """A node with the model READY, loading (or waking, or switching) it first if needed:
        one load per model, however many requests wait; they go in `release_order`."""
        node = self.ready_replica(model, affinity)
        if node is not None:
            return node
        waiter = Waiter(model, priority, time.monotonic(), next(self._arrivals))
        ready: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        queue = self._waiters.setdefault(model, [])
        queue.append((waiter, ready))
        waiting = self.metrics.waiting.labels(model, priority.value)
        waiting.inc()
        if model not in self._loads:
            task = asyncio.create_task(self._cold_load(model))
            self._loads[model] = task
            task.add_done_callback(functools.partial(self._loaded, model))
        try:
            return await asyncio.wait_for(ready, self.config.gateway.load_timeout_s)
        except TimeoutError:
            raise UpstreamTimeout(
                f"{model} was not ready within {self.config.gateway.load_timeout_s:.0f} s"
            ) from None
        finally:
            waiting.dec()
            queue.remove((waiter, ready))
            if not queue and self._waiters.get(model) is queue:
                del self._waiters[model]

    def _loaded(self, model: str, task: asyncio.Task[str]) -> None:
        """A model's load ended: its waiters go together, in `release_order`."""
        self._loads.pop(model, None)
        waiting = dict(self._waiters.get(model, []))
        for waiter in release_order(waiting):
            ready = waiting[waiter]
            if ready.done():
                continue
            if task.cancelled():
                ready.cancel()
            elif task.exception() is not None:
                ready.set_exception(task.exception())  # type: ignore[arg-type]
            else:
                ready.set_result(task.result())
        if not waiting and not task.cancelled():
            task.exception()  # nobody waits any more (timed out): retrieved, not logged

    def _swap_queue(self) -> list[Waiter]:
        return [waiter for queue in self._waiters.values() for waiter, _ in queue]

    async def _cold_load(self, model: str) -> str:
        """Place the model and load it, waiting (up to the load timeout) while loads, unloads
        or requests in flight stand in the way; `ColdLoad` decides each next step."""
        # A fresh look at every node that may hold the model: another gateway may be loading it.
        await self._refresh(model)
        timeout = self.config.gateway.load_timeout_s
        attempts = ColdLoad(model, time.monotonic() + timeout, timeout)
        while True:
            snapshot = self.snapshot()
            node = choose_replica(snapshot, model)
            if node is not None:
                return node
            elsewhere = _loading_elsewhere(snapshot, model)
            if elsewhere is not None:
                log.info("%s is being loaded on %s already; waiting for it", model, elsewhere)
                await self.load(elsewhere, model)  # the neuron joins the load under way
                return elsewhere
            now, clock = time.time(), time.monotonic()
            bound = self.config.eviction.max_swap_wait_s
            queue = self._swap_queue()
            mine = waiting_models(queue).get(model)
            rules = eviction_rules(mine, clock, bound, self.config.eviction.min_resident_s, now)
            plan = plan_placement(
                snapshot,
                model,
                self.config.eviction.strategy,
                now,
                self._worth(),
                exclude=attempts.exclude(),
                eligible=rules.eligible,
                yielding=rules.yielding,
                busier_slack=self.config.gateway.affinity_slack,
            )
            step = attempts.next_step(plan, clock)
            if isinstance(step, Place) and step.placement.victims:
                order = switch_order(queue, clock, bound)
                rival = ahead_of(snapshot, model, step.placement.node, order, self._switching)
                if rival is not None:
                    step = Wait(WAIT_STEP_S, f"{rival} is ahead of it in the swap queue")
            if isinstance(step, GiveUp):
                raise step.error
            if isinstance(step, Place):
                placement = step.placement
                self._switching.add(model)
                try:
                    await self.place(model, placement, EvictionReason.MAKE_ROOM)
                    return placement.node
                except CortexError as error:
                    await self.poll(placement.node)
                    retry = attempts.failed_on(placement.node, error)
                finally:
                    self._switching.discard(model)
                if retry is None:
                    continue
                step = retry
            log.debug("%s waits for the fleet to change: %s", model, step.reason)
            # Look again when the bound runs out, whatever else happens.
            left = seconds_to_bound(mine, clock, bound)
            seconds = (
                step.seconds if left is None or rules.yielding else min(step.seconds, left + 0.01)
            )
            if not await self._changed(seconds):
                await self._refresh(model)  # others' requests show only in the neurons' counts

    async def _refresh(self, model: str) -> None:
        """Poll every up node that may hold the model."""
        await asyncio.gather(
            *(self.poll(n.name) for n in self.snapshot().nodes if model in n.catalogue())
        )

    def _notify(self) -> None:
        """The fleet changed (a load or unload ended, a request finished, a poll came back):
        wake the cold loads waiting for room."""
        self._change.set()
        self._change = asyncio.Event()

    async def _changed(self, timeout: float) -> bool:
        """Whether the fleet changed within `timeout` seconds."""
        change = self._change
        try:
            await asyncio.wait_for(change.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def _worth(self) -> Callable[[Resident], float] | None:
        """What keeping a model is worth to the `demand` strategy (None: the strategy's order)."""
        if self.config.eviction.strategy is EvictionStrategy.DEMAND:
            return self.demand.per_byte(time.time())
        return None

    async def place(self, model: str, placement: Placement, reason: EvictionReason) -> None:
        """Carry out a placement: evict its victims, then load. The caller made the plan from a
        snapshot just now; the memory is reserved before anything is awaited."""
        member = self.nodes[placement.node]
        entry = member.status and next(
            (e for e in member.status.catalogue if e.profile.name == model), None
        )
        member.loading[model] = entry.estimated_bytes if entry else 0
        member.leaving.update(v.name for v in placement.victims)
        try:
            for victim in placement.victims:
                # A victim that yields (the swap bound ran out) takes no new requests from now
                # (it is leaving); those in flight finish before it goes.
                await self._drained(victim.node, victim.name)
                if victim.name in placement.sleepers:
                    await self.sleep(victim.node, victim.name, reason)
                else:
                    await self.unload(victim.node, victim.name, reason)
            await self.load(placement.node, model)
        finally:
            member.loading.pop(model, None)
            member.leaving.difference_update(v.name for v in placement.victims)
            self._notify()

    async def _drained(self, node: str, model: str) -> None:
        """Wait until this gateway has no request in flight for `model` on `node`, up to
        `drain_timeout_s` (then the neuron's own refusal decides)."""
        member = self.nodes[node]
        deadline = time.monotonic() + self.config.eviction.drain_timeout_s
        while member.in_flight.get(model) and time.monotonic() < deadline:
            await self._changed(min(WAIT_STEP_S, deadline - time.monotonic()))

    async def load(self, node: str, model: str) -> None:
        """Load the model there; the neuron wakes it instead where it sleeps."""
        status = self.nodes[node].status
        reported = next((m for m in status.loaded if m.name == model), None) if status else None
        waking = reported is not None and reported.state == ModelState.ASLEEP
        started = time.monotonic()
        try:
            await self.nodes[node].client.load(model)
        except CortexError:
            self.metrics.loads.labels(model, node, "error").inc()
            raise
        seconds = time.monotonic() - started
        if waking:
            self.metrics.wakes.labels(model, node).inc()
            self.metrics.wake_seconds.labels(model, node).observe(seconds)
            log.info("woke %s on %s in %.2f s", model, node, seconds)
        else:
            self.metrics.loads.labels(model, node, "ok").inc()
            self.metrics.load_seconds.labels(model, node).observe(seconds)
            log.info("loaded %s on %s in %.2f s", model, node, seconds)
        await self.poll(node)

    async def sleep(
        self, node: str, model: str, reason: EvictionReason, unload_if_refused: bool = True
    ) -> None:
        """Put the model to sleep there; where the neuron refuses twice (requests arrived
        meanwhile, its host budget filled, its engine cannot), unload it instead, or with
        `unload_if_refused=False` (an admin asked for a sleep, not for the memory) raise the
        first refusal.

        A refusal (409) is tried once more after the neuron's own count of the model's requests
        has drained: the engine counts a request a moment longer than this gateway, which saw
        its last token, so a sleep planned at once can be refused for a request already over
        (an unload then would cost a cold load where a wake would do)."""
        member = self.nodes[node]
        member.leaving.add(model)
        try:
            for attempt in (1, 2):
                try:
                    await member.client.sleep(model)
                except ModelUnavailable:
                    if not unload_if_refused:
                        raise
                    log.info("%s had left %s already", model, node)
                except Overloaded as error:
                    if not unload_if_refused:
                        raise
                    if attempt == 1:
                        log.info(
                            "%s did not sleep on %s (%s): once more", model, node, error.message
                        )
                        await self._reported_drained(node, model)
                        continue
                    log.info(
                        "%s did not sleep on %s (%s): unloading it", model, node, error.message
                    )
                    await self.unload(node, model, reason)
                    return
                except CortexError as error:
                    if not unload_if_refused:
                        raise
                    log.info(
                        "%s did not sleep on %s (%s): unloading it", model, node, error.message
                    )
                    await self.unload(node, model, reason)
                    return
                else:
                    self.metrics.sleeps.labels(model, node, reason).inc()
                    log.info("put %s to sleep on %s (%s)", model, node, reason)
                break
            await self.poll(node)
        finally:
            member.leaving.discard(model)
            self._notify()

    async def _reported_drained(self, node: str, model: str) -> None:
        """Poll the node until it reports no request in flight for `model`, up to
        `drain_timeout_s`."""
        deadline = time.monotonic() + self.config.eviction.drain_timeout_s
        while True:
            await self.poll(node)
            status = self.nodes[node].status
            reported = next((m for m in status.loaded if m.name == model), None) if status else None
            if reported is None or not reported.in_flight or time.monotonic() >= deadline:
                return
            await asyncio.sleep(0.05)

    async def unload(self, node: str, model: str, reason: EvictionReason) -> None:
        member = self.nodes[node]
        member.leaving.add(model)
        try:
            try:
                await member.client.unload(model)
            except ModelUnavailable:  # it left already (another gateway, an idle TTL): done
                log.info("%s had left %s already", model, node)
            else:
                self.metrics.evictions.labels(model, node, reason).inc()
                log.info("unloaded %s from %s (%s)", model, node, reason)
            # Routing sees the model gone before it stops counting as leaving: no request is
            # sent to a copy that is no longer there.
            await self.poll(node)
        finally:
            member.leaving.discard(model)
            self._notify()

    # ------------------------------------------------------------------ pinned and replicas

    def _in_background(self, key: str, work: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Run one background job per key (a model's pinning or scaling) at a time."""
        if key in self._background:
            return
        task = asyncio.create_task(work())
        self._background[key] = task
        task.add_done_callback(lambda _t: self._background.pop(key, None))

    def keep_pinned(self) -> None:
        """Place every pinned model that no up node holds, each in its own task."""
        snapshot = self.snapshot()
        catalogue = snapshot.catalogue()
        self._pinned.update(name for name, entry in catalogue.items() if entry.profile.pinned)
        for model in self._pinned - catalogue.keys():
            self._pinned_not_resident(model, f"no node that may hold {model} is up")
        for model in list(self.pinned_unplaced):
            if snapshot.placed_on(model):
                self._pinned_placed(model)
        for model in pinned_missing(snapshot):
            self._in_background(f"pin:{model}", functools.partial(self._pin, model))

    async def pin(self, model: str, pinned: bool) -> list[str]:
        """Pin or unpin the model on every up node that catalogues it (each neuron keeps the
        pin in its state folder, so it outlives this gateway and the neuron's restarts); a
        pinned model that no node holds is then placed, as at start. The nodes, by name."""
        nodes = [
            view.name for view in self.snapshot().nodes if view.up and model in view.catalogue()
        ]
        if not nodes:
            raise ModelUnavailable(f"no node that may hold {model} is up")
        await asyncio.gather(*(self.nodes[name].client.pin(model, pinned) for name in nodes))
        await asyncio.gather(*(self.poll(name) for name in nodes))
        log.info("%s %s on %s", model, "pinned" if pinned else "unpinned", ", ".join(nodes))
        if not pinned:
            self._pinned.discard(model)
            self._pinned_placed(model)  # no longer wanted resident: nothing left to report
        self.keep_pinned()
        return nodes

    async def _pin(self, model: str) -> None:
        try:
            node = await self.ensure_ready(model)
        except CortexError as error:
            self._pinned_not_resident(model, error.message)
            return
        log.info("pinned model %s is resident on %s", model, node)
        self._pinned_placed(model)

    def _pinned_not_resident(self, model: str, reason: str) -> None:
        if model not in self.pinned_unplaced:
            log.warning("pinned model %s is not resident: %s", model, reason)
        self.pinned_unplaced[model] = reason
        self.metrics.pinned_unplaced.labels(model).set(1)

    def _pinned_placed(self, model: str) -> None:
        self.pinned_unplaced.pop(model, None)
        self.metrics.pinned_unplaced.labels(model).set(0)

    def scale(self) -> None:
        """Carry out what `plan_scaling` says for the load the window has seen."""
        snapshot = self.snapshot()
        actions = plan_scaling(
            snapshot,
            self.window,
            self.config.scaling,
            self.config.eviction.strategy,
            time.time(),
        )
        for action in actions:
            work: Callable[[], Coroutine[Any, Any, None]]
            if isinstance(action, ScaleIn):
                work = functools.partial(self._scale_in, action.model, action.node)
            else:
                work = functools.partial(
                    self._scale_out, action.model, action.placement, action.reason
                )
            self._in_background(f"scale:{action.model}", work)

    async def _scale_out(self, model: str, placement: Placement, reason: str) -> None:
        log.info("adding a replica of %s on %s: %s", model, placement.node, reason)
        try:
            await self.place(model, placement, EvictionReason.SCALE_OUT)
        except CortexError as error:
            log.warning("new replica of %s on %s failed: %s", model, placement.node, error.message)

    async def _scale_in(self, model: str, node: str) -> None:
        try:
            await self.unload(node, model, EvictionReason.SCALE_IN)
        except CortexError as error:
            log.info("replica of %s on %s stays: %s", model, node, error.message)

    # ------------------------------------------------------------------ scheduled lifecycle

    async def eviction_cycle(self) -> None:
        """Idle TTLs now; every `defrag_after_cycles` cycles one re-packing move; pinned models
        that are still missing are tried again."""
        self.cycles += 1
        for resident in idle_sleepers(self.snapshot(), time.time()):
            try:
                await self.sleep(resident.node, resident.name, EvictionReason.IDLE_SLEEP)
            except CortexError as error:
                log.warning("idle sleep of %s failed: %s", resident.name, error.message)
        for resident in idle_expired(self.snapshot(), time.time()):
            try:
                await self.unload(resident.node, resident.name, EvictionReason.IDLE_TTL)
            except CortexError as error:
                log.warning("idle unload of %s failed: %s", resident.name, error.message)
        self.keep_pinned()
        every = self.config.eviction.defrag_after_cycles
        if every and self.cycles % every == 0:
            await self.defragment()

    async def defragment(self) -> DefragResult | None:
        """One re-packing move, make before break. Cold loads and other moves go on meanwhile:
        the new copy's memory is reserved like any load's, and draining holds no lock."""
        move = plan_defrag(self.snapshot())
        if move is None:
            return None
        log.info("defragmenting: moving %s from %s to %s", move.model, move.source, move.target)
        source = self.nodes[move.source]
        try:
            await self.place(move.model, Placement(move.target), EvictionReason.DEFRAG)
        except CortexError as error:
            log.warning("defragmentation move failed: %s", error.message)
            return None
        source.draining.add(move.model)
        # Both copies are READY now; new requests go to the new one. Unloading the old copy
        # waits for its streams: the neuron refuses while any are in flight.
        deadline = time.monotonic() + self.config.eviction.drain_timeout_s
        try:
            while True:
                if not source.in_flight.get(move.model):
                    try:
                        await self.unload(move.source, move.model, EvictionReason.DEFRAG)
                        return DefragResult(move, old_copy_unloaded=True)
                    except Overloaded:
                        pass
                    except CortexError as error:
                        log.warning("old copy of %s stays: %s", move.model, error.message)
                        break
                if time.monotonic() >= deadline:
                    break
                await asyncio.sleep(0.1)
        finally:
            source.draining.discard(move.model)
        log.warning(
            "defragmentation: %s kept serving on %s; the old copy stays (two copies now)",
            move.model,
            move.source,
        )
        return DefragResult(move, old_copy_unloaded=False)

    @contextlib.asynccontextmanager
    async def using(self, node: str, model: str) -> AsyncIterator[TritonStream]:
        """Count a request in flight on (node, model) while the block runs."""
        member = self.nodes[node]
        if member.triton is None:
            raise UpstreamFailed(f"node {node} has no Triton endpoint yet")
        member.in_flight[model] = member.in_flight.get(model, 0) + 1
        self.demand.record(model, time.time())
        try:
            yield member.triton
        finally:
            member.in_flight[model] -= 1
            self._notify()
