"""Fleet state, cold loads, eviction and defragmentation: the thin async shell around the pure
planning in `routing` and `lifecycle`.

The gateway polls every neuron's /status (a neuron is down after `missed_polls_down` missed
polls, up again when it answers), keeps the latest snapshot, and counts its own in-flight
requests. A request for a model nobody has loaded triggers one load however many requests wait
for it (they wait up to `load_timeout_s`); the placement plan says where, and what must be
evicted first; a failed load tries the next candidate. An APScheduler interval job unloads
models past their idle TTL and, every `defrag_after_cycles` cycles, carries out one re-packing
move make-before-break: load the new copy, let traffic move to it, unload the old one.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from urllib.parse import urlparse

from apscheduler.schedulers.asyncio import AsyncIOScheduler

from control_plane.errors import (
    CortexError,
    ModelNotFound,
    Overloaded,
    UpstreamFailed,
    UpstreamTimeout,
)
from control_plane.lifecycle import Move, Refusal, idle_expired, plan_defrag, plan_placement
from control_plane.metrics import GatewayMetrics
from control_plane.node_client import NeuronClient, TritonStream
from control_plane.prompting import ModelTokenizer
from control_plane.routing import FleetSnapshot, NodeView, choose_replica, resolve_model
from cortex.config import CortexConfig
from cortex.neuron_api import CatalogueEntry, NeuronStatus

log = logging.getLogger("cortex.fleet")


@dataclass
class _Neuron:
    client: NeuronClient
    status: NeuronStatus | None = None
    up: bool = False
    missed: int = 0
    triton: TritonStream | None = None
    in_flight: dict[str, int] = field(default_factory=dict)
    draining: set[str] = field(default_factory=set)


class Fleet:
    def __init__(self, config: CortexConfig, metrics: GatewayMetrics | None = None) -> None:
        self.config = config
        self.metrics = metrics or GatewayMetrics()
        self.cycles = 0
        self._scheduler: AsyncIOScheduler | None = None
        self._lifecycle_lock = asyncio.Lock()
        settings = config.gateway
        self.neurons = {
            n.name: _Neuron(NeuronClient(n, settings.load_timeout_s)) for n in config.neurons
        }
        self._loads: dict[str, asyncio.Task[str]] = {}
        self._tokenizers: dict[str, ModelTokenizer] = {}
        self._tokenizer_locks: dict[str, asyncio.Lock] = {}
        self._poller: asyncio.Task[None] | None = None
        self.changed = asyncio.Event()
        self.last_used: dict[str, float] = {}

    # ------------------------------------------------------------------ polling

    async def start(self) -> None:
        await self.poll_all()
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
        for task in self._loads.values():
            task.cancel()
        for neuron in self.neurons.values():
            await neuron.client.close()
            if neuron.triton is not None:
                await neuron.triton.close()

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.sleep(self.config.gateway.poll_interval_s)
            await self.poll_all()

    async def poll_all(self) -> None:
        await asyncio.gather(*(self.poll(name) for name in self.neurons))
        self.changed.set()
        self.changed.clear()

    async def poll(self, name: str) -> None:
        neuron = self.neurons[name]
        try:
            # A neuron busy loading a model can answer slowly: be lenient before calling it down.
            status = await neuron.client.status(
                timeout=max(5.0, 2 * self.config.gateway.poll_interval_s)
            )
        except CortexError as error:
            neuron.missed += 1
            if neuron.missed >= self.config.gateway.missed_polls_down:
                if neuron.up:
                    log.warning("neuron %s is down: %s", name, error.message)
                neuron.up = False
                neuron.status = None
                self.metrics.neuron_up.labels(name).set(0)
            return
        self.metrics.neuron_up.labels(name).set(1)
        for gpu in status.gpus:
            self.metrics.memory_used.labels(name, str(gpu.index)).set(gpu.memory_used_bytes)
            self.metrics.memory_free.labels(name, str(gpu.index)).set(gpu.memory_free_bytes)
        if not neuron.up:
            log.info("neuron %s is up", name)
        neuron.status, neuron.up, neuron.missed = status, True, 0
        grpc_url = self._grpc_url(name, status)
        if neuron.triton is None or neuron.triton.url != grpc_url:
            if neuron.triton is not None:
                await neuron.triton.close()
            neuron.triton = TritonStream(grpc_url, name)

    def _grpc_url(self, name: str, status: NeuronStatus) -> str:
        # The neuron reports Triton on its own loopback; reach it on the neuron's host.
        host = urlparse(self.neurons[name].client.neuron.endpoint).hostname or "127.0.0.1"
        port = status.triton.grpc_url.rpartition(":")[2]
        return f"{host}:{port}"

    def mark_down(self, name: str) -> None:
        neuron = self.neurons[name]
        neuron.up, neuron.status = False, None

    def snapshot(self) -> FleetSnapshot:
        return FleetSnapshot(
            tuple(
                NodeView(name, n.up, n.status, dict(n.in_flight), frozenset(n.draining))
                for name, n in self.neurons.items()
            )
        )

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
                files = await self.neurons[holders[0]].client.tokenizer(model)
                self._tokenizers[model] = await asyncio.to_thread(ModelTokenizer, files)
                # A tokenizer brings transformers (and torch) with it: a quarter of a million
                # objects that live as long as the process. Out of the collector's way, a full
                # collection takes microseconds instead of stalling every stream for ~0.1 s.
                gc.freeze()
        return self._tokenizers[model]

    def ready_replica(self, model: str) -> str | None:
        """The node to serve a model that is READY somewhere now, without waiting."""
        return choose_replica(self.snapshot(), model)

    async def ensure_ready(self, model: str) -> str:
        """A node with the model READY, loading it first if needed (one load per model)."""
        node = self.ready_replica(model)
        if node is not None:
            return node
        task = self._loads.get(model)
        if task is None:
            task = asyncio.create_task(self._cold_load(model))
            self._loads[model] = task
            task.add_done_callback(lambda _t: self._loads.pop(model, None))
        try:
            return await asyncio.wait_for(asyncio.shield(task), self.config.gateway.load_timeout_s)
        except TimeoutError:
            raise UpstreamTimeout(
                f"{model} was not ready within {self.config.gateway.load_timeout_s:.0f} s"
            ) from None

    async def _cold_load(self, model: str) -> str:
        async with self._lifecycle_lock:  # placements must see each other's evictions
            node = choose_replica(self.snapshot(), model)
            if node is not None:
                return node
            plan = plan_placement(self.snapshot(), model, self.config.eviction.strategy)
            if isinstance(plan, Refusal):
                raise Overloaded(f"cannot place {model}: {plan.reason}", retry_after=30)
            errors = []
            for placement in plan:
                try:
                    for victim in placement.victims:
                        await self.unload(victim.node, victim.name, "make_room")
                    await self.load(placement.node, model)
                except CortexError as error:
                    errors.append(f"{placement.node}: {error.message}")
                    await self.poll(placement.node)
                    continue
                return placement.node
            raise UpstreamFailed(f"{model} could not be loaded: " + "; ".join(errors))

    async def load(self, node: str, model: str) -> None:
        started = time.monotonic()
        try:
            await self.neurons[node].client.load(model)
        except CortexError:
            self.metrics.loads.labels(model, node, "error").inc()
            raise
        seconds = time.monotonic() - started
        self.metrics.loads.labels(model, node, "ok").inc()
        self.metrics.load_seconds.labels(model, node).observe(seconds)
        log.info("loaded %s on %s in %.2f s", model, node, seconds)
        await self.poll(node)

    async def unload(self, node: str, model: str, reason: str) -> None:
        await self.neurons[node].client.unload(model)
        self.metrics.evictions.labels(model, node, reason).inc()
        log.info("unloaded %s from %s (%s)", model, node, reason)
        await self.poll(node)

    # ------------------------------------------------------------------ scheduled lifecycle

    async def eviction_cycle(self) -> None:
        """Idle TTLs now; every `defrag_after_cycles` cycles one re-packing move."""
        self.cycles += 1
        async with self._lifecycle_lock:
            for resident in idle_expired(self.snapshot(), time.time()):
                try:
                    await self.unload(resident.node, resident.name, "idle_ttl")
                except CortexError as error:
                    log.warning("idle unload of %s failed: %s", resident.name, error.message)
        every = self.config.eviction.defrag_after_cycles
        if every and self.cycles % every == 0:
            await self.defragment()

    async def defragment(self) -> Move | None:
        async with self._lifecycle_lock:
            move = plan_defrag(self.snapshot())
            if move is None:
                return None
            log.info("defragmenting: moving %s from %s to %s", move.model, move.source, move.target)
            source = self.neurons[move.source]
            try:
                await self.load(move.target, move.model)
                source.draining.add(move.model)
                # Both copies are READY now; new requests go to the least busy one. Unloading
                # the old copy waits for its streams: the neuron refuses while any are in flight.
                for _ in range(600):
                    if not self.neurons[move.source].in_flight.get(move.model):
                        try:
                            await self.unload(move.source, move.model, "defrag")
                            break
                        except Overloaded:
                            pass
                    await asyncio.sleep(0.1)
            except CortexError as error:
                log.warning("defragmentation move failed: %s", error.message)
                return None
            finally:
                source.draining.discard(move.model)
            return move

    @contextlib.asynccontextmanager
    async def using(self, node: str, model: str) -> AsyncIterator[TritonStream]:
        """Count a request in flight on (node, model) while the block runs."""
        neuron = self.neurons[node]
        if neuron.triton is None:
            raise UpstreamFailed(f"neuron {node} has no Triton endpoint yet")
        neuron.in_flight[model] = neuron.in_flight.get(model, 0) + 1
        self.last_used[model] = time.time()
        try:
            yield neuron.triton
        finally:
            neuron.in_flight[model] -= 1
            self.last_used[model] = time.time()
