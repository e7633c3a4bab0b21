"""What a node can serve and what each model would cost: its catalogue, with a memory estimate
and a context length per model.

`estimate_bytes` and `context_length` are pure (a profile and a checkpoint's shape in, numbers
out); `Catalogue` reads each checkpoint's shape once and keeps it.

Pins set through the lifecycle API (`POST /models/pin`, which the gateway's console calls) are
kept in the node's state folder (`pins.json`) and laid over models.toml's `pinned` at start and
on every reload, so they outlive a restart; the operator's models.toml is never rewritten. The
latest word wins: each pin remembers what the file said of the model when it was set, and once
the file says otherwise (the operator changed that line since), the file's word holds and the
pin is dropped.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Collection, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

from cortex.config import EngineKind, KVCacheDtype, ModelProfile, ModelsFile, NeuronConfig
from cortex.neuron_api import CatalogueEntry, TokenizerFiles
from cortex.tokenizer_files import cached_gguf_tokenizer
from neuron_agent.engines.llamacpp.gguf_info import GgufError, GgufInfo, read_info
from neuron_agent.engines.llamacpp.memory import estimate_llamacpp_bytes
from neuron_agent.errors import ModelUnknown, UnsupportedModel
from neuron_agent.torch_engine.checkpoint import (
    ModelSpec,
    estimate_weight_bytes,
    read_spec,
    shard_spec,
)
from neuron_agent.torch_engine.errors import UnsupportedCheckpoint
from neuron_agent.torch_engine.gguf import is_gguf

log = logging.getLogger("cortex.neuron")

# Runtime memory beside weights and KV cache: the CUDA context / Python stub and torch.
RUNTIME_OVERHEAD_BYTES = 512 * 1024 * 1024
# A model whose checkpoint does not say its context length.
DEFAULT_CONTEXT = 4096
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
    "config.json",
)


def estimate_bytes(
    profile: ModelProfile, spec: ModelSpec | None, has_gpu: bool, engine_bytes: int = 0
) -> int:
    """Weights × quantization + KV budget + runtime overhead, in bytes. `engine_bytes`: the size
    of a TensorRT-LLM engine's files, whose weights are already in their final form. A torch
    model at tp > 1 takes its largest rank's share on each of its tp devices: tp × that."""
    if profile.engine is EngineKind.TRTLLM:
        kv = profile.kv_cache_tokens * spec.kv_bytes_per_token(2) if spec else 0
        return engine_bytes + kv + RUNTIME_OVERHEAD_BYTES
    if spec is None:
        return 0
    # On CPU an "auto" or float32 model runs in float32; on a GPU in 16 bits.
    dtype_bytes = 4 if not has_gpu and profile.dtype in ("auto", "float32") else 2
    try:
        local = shard_spec(spec, profile.tp)
    except UnsupportedCheckpoint:
        return 0  # the load is refused with the reason
    # Each rank: its shard of the linear layers, the embedding (and on rank 0 the head), its kv
    # heads' share of the KV budget, its own process and CUDA context.
    weights = estimate_weight_bytes(spec, profile.quantization.value, dtype_bytes, profile.tp)
    if profile.kv_cache_dtype is KVCacheDtype.FP8:
        kv = profile.kv_cache_tokens * local.kv_bytes_per_token(1, scale_bytes=4)
    else:
        kv = profile.kv_cache_tokens * local.kv_bytes_per_token(dtype_bytes)
    return (weights + kv + RUNTIME_OVERHEAD_BYTES) * profile.tp


def context_length(profile: ModelProfile, spec: ModelSpec | GgufInfo | None) -> int:
    """The checkpoint's context, capped by the profile's."""
    context = spec.context_length if spec else DEFAULT_CONTEXT
    return min(context, profile.context_length or context)


@dataclass(frozen=True)
class CatalogueChange:
    """What a re-read models.toml changed now, and what waits for its model to be unloaded."""

    added: tuple[str, ...] = ()
    updated: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    # Loaded (or loading) models whose entry changed or went: kept as they are until unloaded.
    deferred: tuple[str, ...] = ()


def plan_catalogue_change(
    current: Mapping[str, ModelProfile],
    wanted: Mapping[str, ModelProfile],
    loaded: Collection[str],
) -> tuple[dict[str, ModelProfile], CatalogueChange]:
    """The catalogue to serve now, moving from `current` towards `wanted`: new entries appear,
    entries of models not loaded are updated or removed, and a loaded model keeps the entry it
    was loaded with (a stream is never cut, a running engine never re-described) until it is
    unloaded. Pure: the node applies the result."""
    profiles: dict[str, ModelProfile] = {}
    added, updated, removed, deferred = [], [], [], []
    for name, profile in current.items():
        if name in loaded:
            profiles[name] = profile
            if wanted.get(name) != profile:
                deferred.append(name)
        elif name not in wanted:
            removed.append(name)
        else:
            profiles[name] = wanted[name]
            if wanted[name] != profile:
                updated.append(name)
    for name, profile in wanted.items():
        if name not in current:
            profiles[name] = profile
            added.append(name)
    change = CatalogueChange(tuple(added), tuple(updated), tuple(removed), tuple(deferred))
    return profiles, change


@dataclass(frozen=True)
class Pin:
    """A pin set through the lifecycle API, and what models.toml said of the model then."""

    pinned: bool
    file_said: bool


def read_pins(path: Path) -> dict[str, Pin]:
    """The pins kept in `path`; none when it is missing or unreadable (said in the log)."""
    try:
        found = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as error:
        log.warning("%s not read (%s): pins from models.toml only", path, error)
        return {}
    pins: dict[str, Pin] = {}
    for name, pin in found.items() if isinstance(found, dict) else ():
        said = pin.get("file_said") if isinstance(pin, dict) else None
        if isinstance(said, bool) and isinstance(pin.get("pinned"), bool):
            pins[str(name)] = Pin(pin["pinned"], said)
    return pins


def write_pins(path: Path, pins: Mapping[str, Pin]) -> None:
    """Write the pins whole and then move them in place, so a crash leaves the old file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".json.partial")
    body = {name: asdict(pin) for name, pin in sorted(pins.items())}
    partial.write_text(json.dumps(body, indent=1), encoding="utf-8")
    os.replace(partial, path)


def pins_still_set(pins: Mapping[str, Pin], file_pinned: Mapping[str, bool]) -> dict[str, Pin]:
    """The pins that still hold over models.toml: those of models the file says the same of
    as when the pin was set (or no longer lists). Pure."""
    return {
        name: pin
        for name, pin in pins.items()
        if file_pinned.get(name, pin.file_said) == pin.file_said
    }


class Catalogue:
    """The models this node may serve (those whose `neurons` list names it, or has none)."""

    def __init__(self, config: NeuronConfig, has_gpu: bool) -> None:
        self.config = config
        self.has_gpu = has_gpu
        self.pins_file = config.resolve(config.neuron.state_dir) / "pins.json"
        self.pins = read_pins(self.pins_file)
        self.file_pinned: dict[str, bool] = {}
        self.profiles = self.profiles_for(config.models)
        self._specs: dict[str, ModelSpec | None] = {}
        self._gguf: dict[str, GgufInfo | None] = {}

    def profiles_for(self, models: ModelsFile) -> dict[str, ModelProfile]:
        """The file's profiles for this node, with the pins that still hold laid over them
        (dropping, and saying so, those whose line the operator has changed since)."""
        name = self.config.neuron.name
        wanted = {p.name: p for p in models.models if not p.neurons or name in p.neurons}
        self.file_pinned = {p.name: p.pinned for p in wanted.values()}
        kept = pins_still_set(self.pins, self.file_pinned)
        if kept != self.pins:
            for dropped in self.pins.keys() - kept.keys():
                log.info(
                    "models.toml now sets %s's pinned itself: the API's pin is dropped", dropped
                )
            self.pins = kept
            write_pins(self.pins_file, kept)
        return {n: self._pinned_as_set(p) for n, p in wanted.items()}

    def _pinned_as_set(self, profile: ModelProfile) -> ModelProfile:
        pin = self.pins.get(profile.name)
        if pin is None or pin.pinned == profile.pinned:
            return profile
        return profile.model_copy(update={"pinned": pin.pinned})

    def set_pinned(self, name: str, pinned: bool) -> ModelProfile:
        """Pin or unpin a catalogued model, loaded or not (a pin changes no running engine),
        and keep that in pins.json (a pin the file agrees with is dropped there)."""
        profile = self.profile(name)
        file_said = self.file_pinned.get(name, profile.pinned)
        if pinned == file_said:
            self.pins.pop(name, None)
        else:
            self.pins[name] = Pin(pinned, file_said)
        write_pins(self.pins_file, self.pins)
        self.profiles[name] = profile.model_copy(update={"pinned": pinned})
        return self.profiles[name]

    def replace(self, profiles: Mapping[str, ModelProfile]) -> None:
        """Serve `profiles` from now on (in place: the node holds this mapping); checkpoint
        shapes are read again for entries that changed."""
        for name, profile in list(self.profiles.items()):
            if profiles.get(name) != profile:
                self._specs.pop(name, None)
        self.profiles.clear()
        self.profiles.update(profiles)

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

    def gguf_info_of(self, profile: ModelProfile) -> GgufInfo | None:
        """A llamacpp profile's file as llama.cpp will see it (None: unreadable)."""
        if profile.name not in self._gguf:
            try:
                self._gguf[profile.name] = read_info(self.source_of(profile))
            except GgufError:
                self._gguf[profile.name] = None
        return self._gguf[profile.name]

    def shape_of(self, profile: ModelProfile) -> ModelSpec | GgufInfo | None:
        if profile.engine is EngineKind.LLAMACPP:
            return self.gguf_info_of(profile)
        return self.spec_of(profile)

    def estimate(self, profile: ModelProfile) -> int:
        if profile.engine is EngineKind.LLAMACPP:
            info = self.gguf_info_of(profile)
            if info is None:
                return 0
            return estimate_llamacpp_bytes(
                profile, info, self.context_length(profile), self.has_gpu
            )
        engine_bytes = 0
        if profile.engine is EngineKind.TRTLLM:
            engine_bytes = sum(p.stat().st_size for p in self.source_of(profile).glob("*.engine"))
        return estimate_bytes(profile, self.spec_of(profile), self.has_gpu, engine_bytes)

    def context_length(self, profile: ModelProfile) -> int:
        return context_length(profile, self.shape_of(profile))

    def can_sleep(self, profile: ModelProfile) -> bool:
        """The torch engine sleeps (`torch_engine.residency`) at tp = 1. TensorRT-LLM's own LLM
        API (its PyTorch backend) gained sleep and wake-up through virtual device memory in
        2025–26 (`sleep_config`, `release()` / `resume()`), but the Triton `tensorrtllm` C++
        backend that serves the engines `cortex build-engine` builds exposes no such call, so
        trtllm models are unload-only; the torch engine's other ranks do not sleep yet. A
        profile with its own `template` runs someone else's model.py (the tests' fakes), which
        need not serve the control socket a sleep goes through."""
        return profile.engine is EngineKind.TORCH and profile.tp == 1 and profile.template is None

    def host_bytes_asleep(self, profile: ModelProfile) -> int:
        """Host memory a sleeping copy holds: its weights (the KV cache is dropped)."""
        spec = self.spec_of(profile)
        if not self.can_sleep(profile) or spec is None:
            return 0
        dtype_bytes = 4 if not self.has_gpu and profile.dtype in ("auto", "float32") else 2
        return estimate_weight_bytes(spec, profile.quantization.value, dtype_bytes)

    def entries(self) -> list[CatalogueEntry]:
        return [
            CatalogueEntry(
                profile=profile,
                estimated_bytes=self.estimate(profile),
                estimated_bytes_per_gpu=self.estimate(profile) // profile.tp,
                context_length=self.context_length(profile),
                can_sleep=self.can_sleep(profile),
                host_bytes_asleep=self.host_bytes_asleep(profile),
            )
            for profile in self.profiles.values()
        ]

    def profile(self, name: str) -> ModelProfile:
        try:
            return self.profiles[name]
        except KeyError:
            raise ModelUnknown(f"model {name!r} is not in this node's catalogue") from None

    def tokenizer_folder(self, profile: ModelProfile) -> Path:
        """The profile's tokenizer folder; a GGUF source's is made from its metadata once (it
        imports transformers and takes seconds: call it off the event loop)."""
        if profile.tokenizer:
            return self.config.resolve(profile.tokenizer)
        source = self.source_of(profile)
        if not is_gguf(source):
            return source
        if profile.engine is EngineKind.LLAMACPP:
            try:
                read_info(source)
            except GgufError as error:
                raise UnsupportedModel(f"{profile.name}: {error}") from None
        elif self.spec_of(profile) is None:
            read_spec(source)  # raises the reason, one line
        try:
            return cached_gguf_tokenizer(
                source,
                self.config.resolve(self.config.neuron.state_dir) / "tokenizers",
                self.context_length(profile),
            )
        except (OSError, ValueError) as error:
            raise UnsupportedModel(f"{profile.name}: no tokenizer from {source}: {error}") from None

    def tokenizer_files(self, name: str) -> TokenizerFiles:
        profile = self.profile(name)
        try:
            folder = self.tokenizer_folder(profile)
        except UnsupportedCheckpoint as error:
            raise UnsupportedModel(f"{name}: {error}") from None
        files = {}
        for file_name in TOKENIZER_FILES:
            path = folder / file_name
            if path.exists():
                files[file_name] = path.read_text(encoding="utf-8")
        if "tokenizer.json" not in files:
            raise UnsupportedModel(f"{name}: no tokenizer.json in {folder}")
        spec = self.shape_of(profile)
        generation = json.loads(files.get("generation_config.json", "{}"))
        eos = generation.get("eos_token_id", list(spec.eos_token_ids) if spec else [])
        return TokenizerFiles(
            model=name,
            files=files,
            context_length=self.context_length(profile),
            eos_token_ids=eos if isinstance(eos, list) else [eos],
            pad_token_id=generation.get("pad_token_id"),
        )
