"""What a node holds and how it changes: the load / unload state machine over the node's Triton
(its supervisor) and devices (its inventory), both passed in; the catalogue and placement it
consults are pure modules (`catalogue`, `placement`).

The node is the arbiter of its own Triton: loads and unloads go through here only. Two loads of
one model become one; loads of different models run together. A load that won't fit is refused
with the numbers before Triton is asked. After an unload the memory must come back; when it does
not (a known Triton/TensorRT-LLM failure), Triton is restarted and the survivors reloaded, and the
result says so.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import psutil

from cortex.config import EngineKind, ModelProfile, NeuronConfig
from cortex.neuron_api import (
    CatalogueEntry,
    LoadedModel,
    ModelState,
    NeuronStatus,
    TritonInfo,
    TritonState,
    UnloadResult,
)
from cortex.secrets import random_key, triton_key
from neuron_agent.catalogue import Catalogue
from neuron_agent.catalogue_watch import CatalogueWatch
from neuron_agent.engines.llamacpp.gguf_info import GgufError, read_info
from neuron_agent.errors import (
    CannotSleep,
    ModelBusy,
    ModelNotLoaded,
    NodeError,
    NoRoom,
    RepositoryError,
    TritonError,
    TritonNotRestarted,
    UnsupportedModel,
)
from neuron_agent.gpus import DeviceInventory, PhysicalGpu
from neuron_agent.placement import held_by_device, place
from neuron_agent.repository import materialise, render
from neuron_agent.torch_engine.checkpoint import read_spec, shard_spec
from neuron_agent.torch_engine.errors import UnsupportedCheckpoint
from neuron_agent.torch_engine.residency import control_socket
from neuron_agent.triton import TritonSupervisor

log = logging.getLogger("cortex.neuron")

# How often the node looks for models whose engine failed, to retire them.
ENGINE_WATCH_S = 1.0


@dataclass
class _Loaded:
    profile: ModelProfile
    state: ModelState
    gpus: list[int]
    estimated_bytes: int
    memory_bytes: int = 0
    loaded_at: float | None = None
    load_seconds: float | None = None
    reason: str | None = None
    baseline_used: dict[int, int] = field(default_factory=dict)
    host_bytes: int = 0  # held in host memory while ASLEEP
    resident_since: float | None = None  # last load or wake


class Node:
    def __init__(
        self, config: NeuronConfig, inventory: DeviceInventory, supervisor: TritonSupervisor
    ) -> None:
        self.config = config
        self.name = config.neuron.name
        self.state_dir = config.resolve(config.neuron.state_dir)
        self.repository = self.state_dir / "repository"
        self.stats_dir = self.state_dir / "stats"
        # Unloads of models whose engine failed (a rank died), by model name.
        self._retiring: dict[str, asyncio.Task[None]] = {}
        self.inventory = inventory
        self.supervisor = supervisor
        supervisor.on_restart = self._reload_after_restart
        self.catalogue = Catalogue(config, inventory.has_gpu)
        self.profiles = self.catalogue.profiles
        self.loaded: dict[str, _Loaded] = {}
        self.events: list[str] = []
        self._loads: dict[str, asyncio.Task[LoadedModel]] = {}
        self._residency_locks: dict[str, asyncio.Lock] = {}
        self._watcher: asyncio.Task[None] | None = None
        # models.toml re-read on SIGHUP and when it changes (catalogue_watch).
        self.catalogue_watch = CatalogueWatch(self)

    @classmethod
    def from_config(cls, config: NeuronConfig) -> Node:
        """The node with its own devices and tritonserver, as `cortex neuron` runs it."""
        state_dir = config.resolve(config.neuron.state_dir)
        token = config.neuron.bearer_token()
        supervisor = TritonSupervisor(
            config.triton,
            state_dir / "repository",
            state_dir,
            shm_prefix=f"cortex{config.triton.http_port}",
            key=triton_key(token) if token else random_key(),
            restrict_grpc=token is not None,
        )
        return cls(
            config, DeviceInventory(config.neuron.name, config.neuron.memory_budget_mib), supervisor
        )

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        self.stats_dir.mkdir(parents=True, exist_ok=True)
        # Read every spec while Triton starts: a GGUF's takes seconds to parse, which the first
        # /status would otherwise spend on the event loop (and a gateway poll would time out).
        specs = asyncio.create_task(asyncio.to_thread(self.catalogue.entries))
        await self.supervisor.start()
        await specs
        self._watcher = asyncio.create_task(self._watch_engines())
        self.catalogue_watch.start()

    async def stop(self) -> None:
        await self.catalogue_watch.stop()
        if self._watcher is not None:
            self._watcher.cancel()
        for task in self._loads.values():
            task.cancel()
        await self.supervisor.stop()

    def _event(self, message: str) -> None:
        log.warning(message)
        self.events = [*self.events[-19:], f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {message}"]

    # ------------------------------------------------------------------ memory

    def _held_by_device(self) -> dict[int, int]:
        # A sleeping model holds what it measured after its sleep (its CUDA context), not its
        # estimate: the rest is what sleeping gave back.
        return held_by_device(
            (e.gpus, 0 if e.state is ModelState.ASLEEP else e.estimated_bytes, e.memory_bytes)
            for e in self.loaded.values()
        )

    @property
    def host_memory_budget(self) -> int:
        configured = self.config.neuron.host_memory_budget_mib
        if configured is not None:
            return configured * 2**20
        total = int(psutil.virtual_memory().total)
        return max(0, total - max(total // 10, 2 * 2**30))

    def _host_asleep(self) -> int:
        return sum(e.host_bytes for e in self.loaded.values() if e.state is ModelState.ASLEEP)

    def _host_held(self) -> int:
        """What the host budget has given out: asleep models' memory, and the prefix-cache host
        tier of every model loaded (held awake and asleep)."""
        tiers = sum(e.profile.host_kv_cache_bytes for e in self.loaded.values())
        return self._host_asleep() + tiers

    def _place(self, profile: ModelProfile, estimate: int, wanted: list[int] | None) -> list[int]:
        """Devices for the model, or NoRoom (409) with the numbers."""
        tier = profile.host_kv_cache_bytes
        held = self._host_held() - (tier if profile.name in self.loaded else 0)  # a wake: its own
        left = self.host_memory_budget - held
        if tier > left:
            raise NoRoom(
                f"{profile.name}'s host_kv_cache_gib needs {tier / 2**30:.2f} GiB of the host "
                f"budget; {max(0, left) / 2**30:.2f} GiB of it is left"
            )
        devices = self.inventory.snapshot(self._held_by_device())
        host = psutil.virtual_memory().available
        return place(profile, estimate, devices, wanted, host)

    def _stub_processes(self, name: str) -> list[psutil.Process]:
        process = self.supervisor.process
        if process is None or process.returncode is not None:
            return []
        marker = str(self.repository / name / "1" / "model.py")
        try:
            children = psutil.Process(process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        found = []
        for child in children:
            try:
                if any(marker in part for part in child.cmdline()):
                    found.append(child)
            except psutil.Error:
                continue
        return found

    def _measure(self, entry: _Loaded, physical: list[PhysicalGpu] | None = None) -> int:
        if self.inventory.has_gpu and entry.gpus:
            physical = self.inventory.physical() if physical is None else physical
            total = 0
            for gpu in entry.gpus:
                used = self.inventory.used_on(gpu, physical)
                if used is not None:
                    total += max(0, used - entry.baseline_used.get(gpu, used))
            return total
        rss = 0
        for process in self._stub_processes(entry.profile.name):
            try:
                rss += process.memory_info().rss
            except psutil.Error:
                continue
        return rss

    async def _memory_returned(self, entry: _Loaded, timeout: float = 30.0) -> bool:
        """Whether the model's memory came back (its processes exited) within `timeout`. 30 s:
        a tensor-parallel model's stub and ranks took over 10 s to exit on a loaded 2-core CI
        machine, and a false "not returned" restarts Triton and reloads every other model."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.inventory.has_gpu and entry.gpus:
                tolerance = 256 * 1024 * 1024
                if all(
                    (self.inventory.used_on(g) or 0) <= entry.baseline_used.get(g, 0) + tolerance
                    for g in entry.gpus
                ):
                    return True
            elif not self._stub_processes(entry.profile.name):
                return True
            await asyncio.sleep(0.2)
        return False

    # ------------------------------------------------------------------ load / unload

    def profile(self, name: str) -> ModelProfile:
        return self.catalogue.profile(name)

    async def load(self, name: str, gpus: list[int] | None = None) -> LoadedModel:
        profile = self.profile(name)
        existing = self.loaded.get(name)
        if existing is not None and existing.state is ModelState.ASLEEP:
            return await self.wake(name)  # a sleeping copy wakes in a fraction of a load
        if (
            existing is not None
            and existing.state is ModelState.READY
            and not self._engine_failure(name)
        ):
            if await self.supervisor.is_ready(name):
                return self._describe(name, existing, in_flight=await self.in_flight(name))
            # Triton lost it (a crash): load it again.
            existing.state, existing.reason = (
                ModelState.UNAVAILABLE,
                "Triton does not report it ready",
            )
        task = self._loads.get(name)
        if task is None:
            task = asyncio.create_task(self._load(profile, gpus))
            self._loads[name] = task
            task.add_done_callback(lambda _t: self._loads.pop(name, None))
        return await asyncio.shield(task)

    async def _load(self, profile: ModelProfile, gpus: list[int] | None) -> LoadedModel:
        name = profile.name
        if profile.engine is EngineKind.TORCH:
            try:
                shard_spec(read_spec(self.catalogue.source_of(profile)), profile.tp)
            except UnsupportedCheckpoint as error:
                raise UnsupportedModel(f"{name}: {error}") from None
        elif profile.engine is EngineKind.LLAMACPP:
            try:
                read_info(self.catalogue.source_of(profile))
            except GgufError as error:
                raise UnsupportedModel(f"{name}: {error}") from None
        stale = self.loaded.get(name)
        if stale is not None and self._engine_failure(name):
            self._retire_failed(name, stale)
        if name in self._retiring:
            # A failed copy is still leaving Triton: a load meanwhile would not replace it.
            await self._retiring[name]
        if name in self.loaded and self.loaded[name].state is not ModelState.READY:
            self.loaded.pop(name, None)
        estimate = self.catalogue.estimate(profile)
        devices = self._place(profile, estimate, gpus)
        baseline = {g: self.inventory.used_on(g) or 0 for g in devices}
        stats_path = self.stats_dir / f"{name}.json"
        # The torch engine's guided decoding builds its masks from the gateway's tokenizer (a
        # llama.cpp model's tokenizer is the file's own; transformers cannot read every GGUF).
        tokenizer_dir = (
            await asyncio.to_thread(self.catalogue.tokenizer_folder, profile)
            if profile.engine is EngineKind.TORCH
            else None
        )
        try:
            files = render(
                profile,
                self.catalogue.source_of(profile),
                devices,
                self.inventory.has_gpu,
                stats_path,
                context_length=self.catalogue.context_length(profile),
                tokenizer_dir=tokenizer_dir,
            )
        except (RepositoryError, OSError) as error:
            raise RepositoryError(
                f"{name}: its Triton model directory cannot be made: {error}"
            ) from None
        # Registered from here on, so concurrent placements count its memory; whatever ends
        # the load early (an error of any kind, a cancellation) takes the entry away again.
        entry = _Loaded(profile, ModelState.LOADING, devices, estimate, baseline_used=baseline)
        self.loaded[name] = entry
        started = time.monotonic()
        try:
            await asyncio.to_thread(
                materialise, self.repository, self.state_dir / "scratch", name, files
            )
            await self.supervisor.load(name)
        except (TritonError, OSError, RepositoryError) as error:
            self.loaded.pop(name, None)
            raise TritonError(f"Triton could not load {name}: {error}") from None
        except BaseException:
            self.loaded.pop(name, None)
            raise
        entry.state = ModelState.READY
        entry.load_seconds = time.monotonic() - started
        entry.loaded_at = entry.resident_since = time.time()
        entry.memory_bytes = self._measure(entry)
        log.info("loaded %s in %.2f s (%d bytes)", name, entry.load_seconds, entry.memory_bytes)
        return self._describe(name, entry)

    async def unload(self, name: str, force: bool = False) -> UnloadResult:
        self.profile(name)
        task = self._loads.get(name)
        if task is not None:
            await asyncio.gather(task, return_exceptions=True)
        entry = self.loaded.get(name)
        if entry is None:
            raise ModelNotLoaded(f"model {name!r} is not loaded on this node")
        in_flight = await self.in_flight(name)
        if in_flight and not force:
            raise ModelBusy(
                f"{name} has {in_flight} request(s) in flight; not unloading",
                in_flight=in_flight,
            )
        entry.state = ModelState.UNLOADING
        try:
            await self.supervisor.unload(name)
        except TritonError as error:
            entry.state = ModelState.READY
            raise TritonError(f"Triton could not unload {name}: {error}") from None
        self.loaded.pop(name, None)
        (self.stats_dir / f"{name}.json").unlink(missing_ok=True)
        released = await self._memory_returned(entry)
        restarted = False
        if not released:
            self._event(f"memory of {name} did not come back after unload: restarting Triton")
            try:
                await self.supervisor.restart()
            except TritonError as error:
                raise TritonNotRestarted(
                    f"{name} unloaded, but Triton was not restarted: {error}"
                ) from None
            await self._reload_after_restart()
            restarted = True
        self.catalogue_watch.settle()  # an entry models.toml changed meanwhile applies now
        return UnloadResult(model=name, memory_released=released, triton_restarted=restarted)

    def pin(self, name: str, pinned: bool) -> CatalogueEntry:
        """Pin or unpin a catalogued model: gateways keep a pinned model resident and never
        evict it. Kept in the state folder over models.toml (`Catalogue.set_pinned`)."""
        self.catalogue.set_pinned(name, pinned)
        self._event(f"{name} {'pinned' if pinned else 'unpinned'} through the lifecycle API")
        return next(e for e in self.catalogue.entries() if e.profile.name == name)

    # ------------------------------------------------------------------ sleep / wake

    async def sleep(self, name: str) -> LoadedModel:
        """Release the model's device memory and keep its process (`torch_engine.residency`);
        ModelBusy, CannotSleep or NoRoom (409 each) when it has requests in flight, its engine
        cannot sleep or the host budget would be exceeded: the caller unloads instead."""
        profile = self.profile(name)
        async with self._residency(name):
            entry = self._loaded_entry(name)
            if entry.state is ModelState.ASLEEP:
                return self._describe(name, entry)
            if entry.state is not ModelState.READY:
                raise CannotSleep(f"{name} is {entry.state.value}; only a READY model sleeps")
            if not self.catalogue.can_sleep(profile):
                raise CannotSleep(f"{name}'s engine cannot sleep; unload it instead")
            in_flight = await self.in_flight(name)
            if in_flight:
                raise ModelBusy(
                    f"{name} has {in_flight} request(s) in flight; not sleeping",
                    in_flight=in_flight,
                )
            needed = self.catalogue.host_bytes_asleep(profile)
            budget, used = self.host_memory_budget, self._host_held()
            if used + needed > budget:
                raise NoRoom(
                    f"{name} would hold {needed / 2**20:.0f} MiB of host memory asleep; "
                    f"{(budget - used) / 2**20:.0f} MiB of the host budget is left",
                )
            reply = await self._control(name, "sleep")
            entry.state = ModelState.ASLEEP
            entry.host_bytes = int(reply.get("host_bytes") or 0) or needed
            entry.memory_bytes = self._measure_asleep(entry)
            log.info("%s asleep in %.2f s", name, float(reply.get("seconds") or 0))
            return self._describe(name, entry)

    async def wake(self, name: str) -> LoadedModel:
        """Take a sleeping model's device memory back; NoRoom (409) when it does not fit."""
        self.profile(name)
        async with self._residency(name):
            entry = self._loaded_entry(name)
            if entry.state is ModelState.READY:
                return self._describe(name, entry)
            if entry.state is not ModelState.ASLEEP:
                raise CannotSleep(f"{name} is {entry.state.value}; only an ASLEEP model wakes")
            # Its devices must hold its estimate again (another model may have taken the room):
            # checked while it still counts as asleep, or it would stand in its own way.
            self._place(entry.profile, entry.estimated_bytes, entry.gpus)
            entry.state = ModelState.LOADING
            try:
                started = time.monotonic()
                await self._control(name, "wake")
            except BaseException:
                entry.state = ModelState.ASLEEP
                raise
            entry.state, entry.host_bytes = ModelState.READY, 0
            entry.resident_since = time.time()
            entry.memory_bytes = self._measure(entry)
            log.info("%s awake in %.2f s", name, time.monotonic() - started)
            return self._describe(name, entry)

    def _loaded_entry(self, name: str) -> _Loaded:
        entry = self.loaded.get(name)
        if entry is None:
            raise ModelNotLoaded(f"model {name!r} is not loaded on this node")
        return entry

    def _residency(self, name: str) -> asyncio.Lock:
        """One sleep or wake of a model at a time (a load of it waits on its own task)."""
        return self._residency_locks.setdefault(name, asyncio.Lock())

    def _measure_asleep(self, entry: _Loaded) -> int:
        """Device bytes a sleeping model still holds: measured on a GPU; none of a virtual
        device (on CPU the weights stay in the process, counted in the host budget)."""
        if self.inventory.has_gpu and entry.gpus:
            return self._measure(entry)
        return 0

    async def _still_asleep(self, name: str) -> bool:
        """Whether the model's stub still answers, asleep."""
        try:
            return bool((await self._control(name, "state", timeout=5))["asleep"])
        except NodeError:
            return False

    async def _control(self, name: str, operation: str, timeout: float = 300) -> dict[str, Any]:
        """One request over the model's control socket: TritonError when the stub does not
        answer, CannotSleep when it refuses."""
        path = control_socket(self.stats_dir / f"{name}.json")
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(path)), 10)
            writer.write(json.dumps({"op": operation}).encode() + b"\n")
            await writer.drain()
            line = await asyncio.wait_for(reader.readline(), timeout)
            writer.close()
            reply = json.loads(line)
        except (OSError, ValueError, TimeoutError) as error:
            raise TritonError(f"{name} did not answer its {operation}: {error}") from None
        if not isinstance(reply, dict) or not reply.get("ok"):
            message = reply.get("error") if isinstance(reply, dict) else reply
            raise CannotSleep(f"{name} did not {operation}: {message}")
        return reply

    async def _reload_after_restart(self) -> None:
        # Everything this node holds, including models /status already saw Triton lose.
        survivors = [n for n, e in self.loaded.items() if e.state is not ModelState.UNLOADING]
        if survivors:
            self._event(f"Triton restarted; reloading {', '.join(survivors)}")
        for name in survivors:
            entry = self.loaded[name]
            entry.state = ModelState.LOADING
            try:
                await self.supervisor.load(name)
                entry.state, entry.reason = ModelState.READY, None
                entry.memory_bytes = self._measure(entry)
            except TritonError as error:
                entry.state = ModelState.UNAVAILABLE
                entry.reason = str(error)

    async def _watch_engines(self) -> None:
        """Retire, within a second, every READY model whose engine says it failed (a rank
        died): reports only show such a model UNAVAILABLE; the change happens here."""
        while True:
            await asyncio.sleep(ENGINE_WATCH_S)
            self.retire_failed_engines()
            await self.retire_dead_sleepers()

    async def retire_dead_sleepers(self) -> None:
        """Retire every ASLEEP model whose stub no longer answers (killed while asleep): Triton
        keeps reporting it ready (it starts a new stub on the next request), so the stub's own
        answer is the truth. Its host memory is free again."""
        for name, entry in list(self.loaded.items()):
            if entry.state is ModelState.ASLEEP and not await self._still_asleep(name):
                self._retire_failed(name, entry, "its process died while asleep")

    def retire_failed_engines(self) -> None:
        """One look for READY models whose engine failed; each found is retired."""
        for name, entry in list(self.loaded.items()):
            if entry.state is ModelState.READY and self._engine_failure(name):
                self._retire_failed(name, entry)

    def _retire_failed(self, name: str, entry: _Loaded, failure: str | None = None) -> None:
        """Mark a model whose engine failed (a rank died, or its stub died asleep) UNAVAILABLE
        with the reason, and unload it: its stub may still hold rank 0's memory. A later load
        loads it afresh."""
        failure = failure or self._engine_failure(name)
        if name in self._retiring or failure is None:
            return
        entry.host_bytes = 0  # a dead sleeper's host memory is free again
        entry.state, entry.reason = ModelState.UNAVAILABLE, failure
        self._event(f"{name} failed: {failure}")
        self._retiring[name] = asyncio.create_task(self._unload_failed(name, entry))
        self._retiring[name].add_done_callback(lambda _t: self._retiring.pop(name, None))

    async def _unload_failed(self, name: str, entry: _Loaded) -> None:
        try:
            await self.supervisor.unload(name)
        except TritonError as error:
            self._event(f"{name} failed and could not be unloaded: {error}")
            return
        await self._memory_returned(entry)
        (self.stats_dir / f"{name}.json").unlink(missing_ok=True)

    # ------------------------------------------------------------------ reporting

    def _engine_stats(self, name: str) -> dict[str, float]:
        data = self._engine_file(name)
        return {k: float(v) for k, v in data.items() if isinstance(v, int | float)}

    def _engine_file(self, name: str) -> dict[str, object]:
        try:
            data = json.loads((self.stats_dir / f"{name}.json").read_text())
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def engine_counters(self) -> dict[str, dict[str, float]]:
        """Each loaded torch model's engine counters, from its stats file (`engine_metrics`)."""
        return {
            name: self._engine_stats(name)
            for name, entry in self.loaded.items()
            if entry.profile.engine is EngineKind.TORCH
        }

    def _engine_failure(self, name: str) -> str | None:
        """Why the engine says it cannot serve (a tensor-parallel rank died), if it does."""
        failed = self._engine_file(name).get("failed")
        return str(failed) if failed else None

    async def in_flight(self, name: str) -> int:
        """Requests in flight for the model now (0 when it is not loaded)."""
        entry = self.loaded.get(name)
        if entry is None:
            return 0
        trtllm = entry.profile.engine is EngineKind.TRTLLM
        return self._in_flight(
            name, entry, await self.supervisor.trtllm_requests() if trtllm else {}
        )

    def _in_flight(self, name: str, entry: _Loaded, trtllm: dict[str, dict[str, float]]) -> int:
        """Requests in flight, the one count for every engine: those the engine is working on
        and those queued for admission. TensorRT-LLM reports them on Triton's metrics port
        (`trtllm`, one scrape: `TritonSupervisor.trtllm_requests`), the torch engine in its
        stats file. The unload refusal and /status use it, and through /status the gateway's
        routing and lifecycle (`control_plane.routing.busy`)."""
        if entry.profile.engine is EngineKind.TRTLLM:
            gauges = trtllm.get(name, {})
            return int(gauges.get("active", 0) + gauges.get("waiting", 0))
        stats = self._engine_stats(name)
        return int(stats.get("running", 0) + stats.get("waiting", 0))

    def _describe(
        self,
        name: str,
        entry: _Loaded,
        state: ModelState | None = None,
        reason: str | None = None,
        memory_bytes: int | None = None,
        last_inference: float | None = None,
        in_flight: int = 0,
    ) -> LoadedModel:
        """The model as the API reports it; `status` passes what it observed now."""
        return LoadedModel(
            name=name,
            state=state or entry.state,
            engine=entry.profile.engine.value,
            quantization=entry.profile.quantization.value,
            tp=entry.profile.tp,
            gpus=entry.gpus,
            memory_bytes=entry.memory_bytes if memory_bytes is None else memory_bytes,
            estimated_bytes=entry.estimated_bytes,
            estimated_bytes_per_gpu=entry.estimated_bytes // max(1, entry.profile.tp),
            loaded_at=entry.loaded_at,
            load_seconds=entry.load_seconds,
            in_flight=in_flight,
            last_used=last_inference or entry.loaded_at,
            reason=reason if state else entry.reason,
            host_bytes=entry.host_bytes,
            resident_since=entry.resident_since,
        )

    async def _observe(
        self,
        name: str,
        entry: _Loaded,
        physical: list[PhysicalGpu],
        trtllm: dict[str, dict[str, float]],
    ) -> LoadedModel:
        """One model as Triton sees it now, read without changing the node's own record:
        Triton is the truth about readiness (a model it lost in a crash is not READY here
        either) and, from its model statistics, about the last inference, for every engine;
        the requests in flight are the engine's count (`_in_flight`)."""
        state, reason = entry.state, entry.reason
        failure = self._engine_failure(name) if state is ModelState.READY else None
        if failure is not None:
            # A dead rank's model: reported failed at once, so the gateway stops routing to it;
            # `_watch_engines` retires it (a report changes nothing).
            state, reason = ModelState.UNAVAILABLE, failure
        last_inference = None
        if (
            self.supervisor.state is TritonState.LIVE
            and state
            in (
                ModelState.READY,
                ModelState.UNAVAILABLE,
            )
            and failure is None
        ):
            ready = await self.supervisor.is_ready(name)
            if entry.state is ModelState.READY and not ready:
                state, reason = ModelState.UNAVAILABLE, "Triton does not report it ready"
            elif entry.state is ModelState.UNAVAILABLE and ready:
                state, reason = ModelState.READY, None
            if ready:
                stats = await self.supervisor.model_stats(name)
                milliseconds = stats.get("last_inference")
                if isinstance(milliseconds, int) and milliseconds > 0:
                    last_inference = milliseconds / 1000
        memory = entry.memory_bytes
        if state is ModelState.READY:
            memory = self._measure(entry, physical) or entry.memory_bytes
        in_flight = self._in_flight(name, entry, trtllm)
        return self._describe(name, entry, state, reason, memory, last_inference, in_flight)

    async def status(self) -> NeuronStatus:
        """What the node holds now. A read only: nothing here changes the node's record, and
        NVML (and Triton's metrics, when a TensorRT-LLM model is loaded) is read once for the
        whole report."""
        physical = self.inventory.physical()
        entries = list(self.loaded.items())
        trtllm: dict[str, dict[str, float]] = {}
        if any(e.profile.engine is EngineKind.TRTLLM for _, e in entries):
            trtllm = await self.supervisor.trtllm_requests()
        loaded = [await self._observe(n, e, physical, trtllm) for n, e in entries]
        return NeuronStatus(
            name=self.name,
            triton=TritonInfo(
                state=self.supervisor.state,
                http_url=self.supervisor.http_url,
                grpc_url=self.supervisor.grpc_url,
                metrics_url=self.supervisor.metrics_url,
                restarts=self.supervisor.restarts,
                last_error=self.supervisor.last_error,
            ),
            gpus=self.inventory.snapshot(self._held_by_device(), physical),
            has_gpu=self.inventory.has_gpu,
            loaded=loaded,
            catalogue=self.catalogue.entries(),
            events=self.events,
            catalogue_reload=self.catalogue_watch.last,
            host_memory_budget_bytes=self.host_memory_budget,
            host_memory_asleep_bytes=self._host_asleep(),
        )
