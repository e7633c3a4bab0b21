"""What a node holds and how it changes: the catalogue, loads, unloads, memory accounting.

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
from pathlib import Path

import psutil

from cortex.config import EngineKind, ModelProfile, NeuronConfig
from cortex.neuron_api import (
    CatalogueEntry,
    LoadedModel,
    NeuronStatus,
    TokenizerFiles,
    TritonInfo,
    UnloadResult,
)
from cortex.tokenizer_files import cached_gguf_tokenizer
from neuron_agent.gpus import DeviceInventory
from neuron_agent.repository import materialise, render
from neuron_agent.torch_engine.checkpoint import ModelSpec, estimate_weight_bytes, read_spec
from neuron_agent.torch_engine.errors import UnsupportedCheckpoint
from neuron_agent.torch_engine.gguf import is_gguf
from neuron_agent.triton import TritonError, TritonSupervisor

log = logging.getLogger("cortex.neuron")
# Runtime memory beside weights and KV cache: the CUDA context / Python stub and torch.
RUNTIME_OVERHEAD_BYTES = 512 * 1024 * 1024
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
    "config.json",
)


class NodeError(Exception):
    """A lifecycle request failed; `status` is the HTTP status the API answers with."""

    def __init__(self, status: int, message: str, **detail: object) -> None:
        super().__init__(message)
        self.status = status
        self.detail = detail


@dataclass
class _Loaded:
    profile: ModelProfile
    state: str
    gpus: list[int]
    estimated_bytes: int
    memory_bytes: int = 0
    loaded_at: float | None = None
    load_seconds: float | None = None
    reason: str | None = None
    baseline_used: dict[int, int] = field(default_factory=dict)


class Node:
    def __init__(self, config: NeuronConfig) -> None:
        self.config = config
        self.name = config.neuron.name
        self.state_dir = config.resolve(config.neuron.state_dir)
        self.repository = self.state_dir / "repository"
        self.stats_dir = self.state_dir / "stats"
        self.inventory = DeviceInventory(self.name, config.neuron.memory_budget_mib)
        self.supervisor = TritonSupervisor(
            config.triton,
            self.repository,
            self.state_dir,
            shm_prefix=f"cortex{config.triton.http_port}",
            on_restart=self._reload_after_restart,
        )
        self.profiles = {
            p.name: p for p in config.models.models if not p.neurons or self.name in p.neurons
        }
        self.loaded: dict[str, _Loaded] = {}
        self.events: list[str] = []
        self._loads: dict[str, asyncio.Task[LoadedModel]] = {}
        self._specs: dict[str, ModelSpec | None] = {}

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        self.stats_dir.mkdir(parents=True, exist_ok=True)
        # Read every spec while Triton starts: a GGUF's takes seconds to parse, which the first
        # /status would otherwise spend on the event loop (and a gateway poll would time out).
        specs = asyncio.create_task(asyncio.to_thread(self.catalogue))
        await self.supervisor.start()
        await specs

    async def stop(self) -> None:
        for task in self._loads.values():
            task.cancel()
        await self.supervisor.stop()

    def _event(self, message: str) -> None:
        log.warning(message)
        self.events = [*self.events[-19:], f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {message}"]

    # ------------------------------------------------------------------ catalogue and estimates

    def source_of(self, profile: ModelProfile) -> Path:
        return self.config.resolve(profile.source)

    def spec_of(self, profile: ModelProfile) -> ModelSpec | None:
        if profile.name not in self._specs:
            folder = self.source_of(profile)
            if profile.engine is EngineKind.TRTLLM:
                folder = self.config.resolve(profile.tokenizer) if profile.tokenizer else folder
            try:
                self._specs[profile.name] = read_spec(folder)
            except UnsupportedCheckpoint:
                self._specs[profile.name] = None
        return self._specs[profile.name]

    def estimate(self, profile: ModelProfile) -> int:
        """Weights × quantization + KV budget + runtime overhead, in bytes."""
        if profile.engine is EngineKind.TRTLLM:
            engine_dir = self.source_of(profile)
            weights = sum(p.stat().st_size for p in engine_dir.glob("*.engine"))
            spec = self.spec_of(profile)
            kv = profile.kv_cache_tokens * spec.kv_bytes_per_token(2) if spec else 0
            return weights + kv + RUNTIME_OVERHEAD_BYTES
        spec = self.spec_of(profile)
        if spec is None:
            return 0
        dtype_bytes = (
            4 if not self.inventory.has_gpu and profile.dtype in ("auto", "float32") else 2
        )
        weights = estimate_weight_bytes(spec, profile.quantization.value, dtype_bytes)
        kv = profile.kv_cache_tokens * spec.kv_bytes_per_token(dtype_bytes)
        return weights + kv + RUNTIME_OVERHEAD_BYTES

    def context_length(self, profile: ModelProfile) -> int:
        spec = self.spec_of(profile)
        context = spec.context_length if spec else 4096
        return min(context, profile.context_length or context)

    def catalogue(self) -> list[CatalogueEntry]:
        return [
            CatalogueEntry(
                profile=profile,
                estimated_bytes=self.estimate(profile),
                context_length=self.context_length(profile),
            )
            for profile in self.profiles.values()
        ]

    # ------------------------------------------------------------------ memory

    def _held_by_device(self) -> dict[int, int]:
        held: dict[int, int] = {}
        for entry in self.loaded.values():
            share = max(entry.estimated_bytes, entry.memory_bytes) // max(1, len(entry.gpus))
            for gpu in entry.gpus:
                held[gpu] = held.get(gpu, 0) + share
        return held

    def _place(self, profile: ModelProfile, estimate: int, wanted: list[int] | None) -> list[int]:
        """Devices for the model, or NodeError 409 with the numbers."""
        devices = self.inventory.snapshot(self._held_by_device())
        if not devices:
            available = psutil.virtual_memory().available
            if estimate > available:
                raise NodeError(
                    409,
                    f"{profile.name} needs about {estimate / 2**30:.2f} GiB; "
                    f"this node has {available / 2**30:.2f} GiB of memory available",
                    needed_bytes=estimate,
                    free_bytes=available,
                )
            return []
        share = estimate // profile.tp
        candidates = [d for d in devices if wanted is None or d.index in wanted]
        fitting = sorted(
            (d for d in candidates if d.memory_free_bytes >= share),
            key=lambda d: -d.memory_free_bytes,
        )
        if len(fitting) < profile.tp:
            free = {d.index: d.memory_free_bytes for d in candidates}
            raise NodeError(
                409,
                f"{profile.name} needs {share / 2**30:.2f} GiB on each of {profile.tp} device(s); "
                "free per device: "
                + ", ".join(f"{i}: {b / 2**30:.2f} GiB" for i, b in free.items()),
                needed_bytes_per_device=share,
                free_bytes=free,
            )
        return sorted(d.index for d in fitting[: profile.tp])

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

    def _measure(self, entry: _Loaded) -> int:
        if self.inventory.has_gpu and entry.gpus:
            total = 0
            for gpu in entry.gpus:
                used = self.inventory.used_on(gpu)
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

    async def _memory_returned(self, entry: _Loaded, timeout: float = 10.0) -> bool:
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
        try:
            return self.profiles[name]
        except KeyError:
            raise NodeError(404, f"model {name!r} is not in this node's catalogue") from None

    async def load(self, name: str, gpus: list[int] | None = None) -> LoadedModel:
        profile = self.profile(name)
        existing = self.loaded.get(name)
        if existing is not None and existing.state == "READY":
            return self._describe(name, existing)
        task = self._loads.get(name)
        if task is None:
            task = asyncio.create_task(self._load(profile, gpus))
            self._loads[name] = task
            task.add_done_callback(lambda _t: self._loads.pop(name, None))
        return await asyncio.shield(task)

    async def _load(self, profile: ModelProfile, gpus: list[int] | None) -> LoadedModel:
        name = profile.name
        if self.spec_of(profile) is None and profile.engine is EngineKind.TORCH:
            try:
                read_spec(self.source_of(profile))
            except UnsupportedCheckpoint as error:
                raise NodeError(422, f"{name}: {error}") from None
        estimate = self.estimate(profile)
        devices = self._place(profile, estimate, gpus)
        baseline = {g: self.inventory.used_on(g) or 0 for g in devices}
        entry = _Loaded(profile, "LOADING", devices, estimate, baseline_used=baseline)
        self.loaded[name] = entry
        stats_path = self.stats_dir / f"{name}.json"
        files = render(
            profile, self.source_of(profile), devices, self.inventory.has_gpu, stats_path
        )
        started = time.monotonic()
        try:
            await asyncio.to_thread(
                materialise, self.repository, self.state_dir / "scratch", name, files
            )
            await self.supervisor.load(name)
        except (TritonError, OSError) as error:
            self.loaded.pop(name, None)
            raise NodeError(502, f"Triton could not load {name}: {error}") from None
        entry.state = "READY"
        entry.load_seconds = time.monotonic() - started
        entry.loaded_at = time.time()
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
            raise NodeError(404, f"model {name!r} is not loaded on this node")
        in_flight = self.in_flight(name)
        if in_flight and not force:
            raise NodeError(
                409,
                f"{name} has {in_flight} request(s) in flight; not unloading",
                in_flight=in_flight,
            )
        entry.state = "UNLOADING"
        try:
            await self.supervisor.unload(name)
        except TritonError as error:
            entry.state = "READY"
            raise NodeError(502, f"Triton could not unload {name}: {error}") from None
        self.loaded.pop(name, None)
        (self.stats_dir / f"{name}.json").unlink(missing_ok=True)
        released = await self._memory_returned(entry)
        restarted = False
        if not released:
            self._event(f"memory of {name} did not come back after unload: restarting Triton")
            try:
                await self.supervisor.restart()
            except TritonError as error:
                raise NodeError(
                    503, f"{name} unloaded, but Triton was not restarted: {error}"
                ) from None
            await self._reload_after_restart()
            restarted = True
        return UnloadResult(model=name, memory_released=released, triton_restarted=restarted)

    async def _reload_after_restart(self) -> None:
        # Everything this node holds, including models /status already saw Triton lose.
        survivors = [n for n, e in self.loaded.items() if e.state != "UNLOADING"]
        if survivors:
            self._event(f"Triton restarted; reloading {', '.join(survivors)}")
        for name in survivors:
            entry = self.loaded[name]
            entry.state = "LOADING"
            try:
                await self.supervisor.load(name)
                entry.state, entry.reason = "READY", None
                entry.memory_bytes = self._measure(entry)
            except TritonError as error:
                entry.state = "UNAVAILABLE"
                entry.reason = str(error)

    # ------------------------------------------------------------------ reporting

    def _engine_stats(self, name: str) -> dict[str, float]:
        try:
            data = json.loads((self.stats_dir / f"{name}.json").read_text())
            return {k: float(v) for k, v in data.items()}
        except (OSError, ValueError):
            return {}

    def in_flight(self, name: str) -> int:
        stats = self._engine_stats(name)
        return int(stats.get("running", 0) + stats.get("waiting", 0))

    def _describe(self, name: str, entry: _Loaded) -> LoadedModel:
        stats = self._engine_stats(name)
        return LoadedModel(
            name=name,
            state=entry.state,
            engine=entry.profile.engine.value,
            quantization=entry.profile.quantization.value,
            tp=entry.profile.tp,
            gpus=entry.gpus,
            memory_bytes=entry.memory_bytes,
            estimated_bytes=entry.estimated_bytes,
            loaded_at=entry.loaded_at,
            load_seconds=entry.load_seconds,
            in_flight=int(stats.get("running", 0) + stats.get("waiting", 0)),
            last_used=stats.get("last_used") or entry.loaded_at,
            reason=entry.reason,
        )

    async def status(self) -> NeuronStatus:
        # Triton is the truth about readiness: a model it lost (crash) is not READY here either.
        if self.supervisor.state == "live":
            for name, entry in self.loaded.items():
                if entry.state == "READY" and not await self.supervisor.is_ready(name):
                    entry.state = "UNAVAILABLE"
                    entry.reason = "Triton does not report it ready"
                elif entry.state == "UNAVAILABLE" and await self.supervisor.is_ready(name):
                    entry.state, entry.reason = "READY", None
        for entry in self.loaded.values():
            if entry.state == "READY":
                entry.memory_bytes = self._measure(entry) or entry.memory_bytes
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
            gpus=self.inventory.snapshot(self._held_by_device()),
            has_gpu=self.inventory.has_gpu,
            loaded=[self._describe(n, e) for n, e in self.loaded.items()],
            catalogue=self.catalogue(),
            events=self.events,
        )

    def tokenizer_folder(self, profile: ModelProfile) -> Path:
        """The profile's tokenizer folder; a GGUF source's is made from its metadata once (it
        imports transformers and takes seconds: call it off the event loop)."""
        if profile.tokenizer:
            return self.config.resolve(profile.tokenizer)
        source = self.source_of(profile)
        if not is_gguf(source):
            return source
        if self.spec_of(profile) is None:
            read_spec(source)  # raises the reason, one line
        try:
            return cached_gguf_tokenizer(
                source, self.state_dir / "tokenizers", self.context_length(profile)
            )
        except (OSError, ValueError) as error:
            raise NodeError(422, f"{profile.name}: no tokenizer from {source}: {error}") from None

    def tokenizer_files(self, name: str) -> TokenizerFiles:
        profile = self.profile(name)
        try:
            folder = self.tokenizer_folder(profile)
        except UnsupportedCheckpoint as error:
            raise NodeError(422, f"{name}: {error}") from None
        files = {}
        for file_name in TOKENIZER_FILES:
            path = folder / file_name
            if path.exists():
                files[file_name] = path.read_text(encoding="utf-8")
        if "tokenizer.json" not in files:
            raise NodeError(422, f"{name}: no tokenizer.json in {folder}")
        spec = self.spec_of(profile)
        generation = json.loads(files.get("generation_config.json", "{}"))
        eos = generation.get("eos_token_id", list(spec.eos_token_ids) if spec else [])
        return TokenizerFiles(
            model=name,
            files=files,
            context_length=self.context_length(profile),
            eos_token_ids=eos if isinstance(eos, list) else [eos],
            pad_token_id=generation.get("pad_token_id"),
        )
