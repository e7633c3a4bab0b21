"""Fleet state and cold loads: the thin async shell around `routing`.

The gateway polls every neuron's /status (a neuron is down after `missed_polls_down` missed
polls, up again when it answers), keeps the latest snapshot, and counts its own in-flight
requests. A request for a model nobody has loaded triggers one load however many requests wait
for it; a failed load tries the next candidate.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from urllib.parse import urlparse

from control_plane.errors import CortexError, ModelNotFound, Overloaded, UpstreamFailed
from control_plane.node_client import NeuronClient, TritonStream
from control_plane.prompting import ModelTokenizer
from control_plane.routing import (
    FleetSnapshot,
    NodeView,
    choose_replica,
    load_candidates,
    resolve_model,
)
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


class Fleet:
    def __init__(self, config: CortexConfig) -> None:
        self.config = config
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

    async def stop(self) -> None:
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
            status = await neuron.client.status(
                timeout=max(2.0, self.config.gateway.poll_interval_s)
            )
        except CortexError as error:
            neuron.missed += 1
            if neuron.up and neuron.missed >= self.config.gateway.missed_polls_down:
                log.warning("neuron %s is down: %s", name, error.message)
                neuron.up = False
                neuron.status = None
            return
        if not neuron.up:
            log.info("neuron %s is up", name)
        neuron.status, neuron.up, neuron.missed = status, True, 0
        grpc_url = self._grpc_url(name, status)
        if neuron.triton is None or neuron.triton.url != grpc_url:
            if neuron.triton is not None:
                await neuron.triton.close()
            neuron.triton = TritonStream(grpc_url)

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
                NodeView(name, n.up, n.status, dict(n.in_flight))
                for name, n in self.neurons.items()
            )
        )

    # ------------------------------------------------------------------ models

    def resolve(self, requested: str) -> CatalogueEntry:
        snapshot = self.snapshot()
        name = resolve_model(snapshot, requested)
        if name is None:
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
        return self._tokenizers[model]

    async def ensure_ready(self, model: str) -> str:
        """A node with the model READY, loading it first if needed (one load per model)."""
        node = choose_replica(self.snapshot(), model)
        if node is not None:
            return node
        task = self._loads.get(model)
        if task is None:
            task = asyncio.create_task(self._cold_load(model))
            self._loads[model] = task
            task.add_done_callback(lambda _t: self._loads.pop(model, None))
        return await asyncio.shield(task)

    async def _cold_load(self, model: str) -> str:
        candidates = load_candidates(self.snapshot(), model)
        if not candidates:
            raise Overloaded(f"no node that can serve {model} is up", retry_after=10)
        errors = []
        for name in candidates:
            started = time.monotonic()
            try:
                await self.neurons[name].client.load(model)
            except CortexError as error:
                errors.append(f"{name}: {error.message}")
                continue
            log.info("loaded %s on %s in %.2f s", model, name, time.monotonic() - started)
            await self.poll(name)
            return name
        if all("needs" in e for e in errors):
            raise Overloaded(f"{model} does not fit on any node now: " + "; ".join(errors), 30)
        raise UpstreamFailed(f"{model} could not be loaded: " + "; ".join(errors))

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
