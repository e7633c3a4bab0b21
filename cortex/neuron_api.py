"""Wire models of the neuron lifecycle API (`neuron_agent` serves them, `control_plane` reads them).

    GET  /health                    → Health
    GET  /status                    → NeuronStatus
    POST /models/load    LoadRequest   → LoadedModel          (409 when memory won't fit)
    POST /models/unload  UnloadRequest → UnloadResult
    POST /models/sleep, /models/wake  SleepRequest → LoadedModel  (409: busy, cannot sleep)
    POST /models/pin     PinRequest    → CatalogueEntry       (kept in the node's state folder)
    GET  /models/{name}/tokenizer   → TokenizerFiles
    errors                          → ErrorBody with the HTTP status

Responses are read by gateways that may be newer or older than the neuron, so these models
ignore unknown fields.

The states and kinds both sides share are enums here (string-valued, so the wire is unchanged):
the neuron sets them, the gateway compares against them, and neither spells a literal.
"""

from __future__ import annotations

import enum
from typing import Any

from pydantic import BaseModel, ConfigDict, field_validator

from cortex.config import ModelProfile


class ModelState(enum.StrEnum):
    """A loaded model's state, as /status reports it."""

    LOADING = "LOADING"
    READY = "READY"
    UNLOADING = "UNLOADING"
    UNAVAILABLE = "UNAVAILABLE"  # Triton lost it (a crash) or could not reload it
    # Its process kept, its device memory released (`torch_engine.residency`); woken on demand.
    ASLEEP = "ASLEEP"


class TritonState(enum.StrEnum):
    """The node's tritonserver, as its supervisor sees it."""

    STOPPED = "stopped"
    STARTING = "starting"
    LIVE = "live"
    RESTARTING = "restarting"


class EvictionReason(enum.StrEnum):
    """Why the gateway unloaded a model (the `reason` label of `cortex_evictions_total`)."""

    MAKE_ROOM = "make_room"  # a cold load needed its memory
    IDLE_TTL = "idle_ttl"
    SCALE_OUT = "scale_out"  # a new replica needed its memory
    SCALE_IN = "scale_in"
    DEFRAG = "defrag"
    IDLE_SLEEP = "idle_sleep"  # put to sleep after its sleep_after_s (`cortex_sleeps_total`)
    CONSOLE = "console"  # an admin's unload or sleep (the console, its API)


class RequestOutcome(enum.StrEnum):
    """How a request ended (the `outcome` label of `cortex_requests_total` and the request log);
    a refused or failed one is the error's kind (`control_plane.errors`) instead."""

    OK = "ok"
    CANCELLED = "cancelled"
    API_ERROR = "api_error"


class _Wire(BaseModel):
    model_config = ConfigDict(extra="ignore")


class Health(_Wire):
    status: str
    triton_live: bool


class GpuInfo(_Wire):
    index: int
    uuid: str
    name: str
    memory_total_bytes: int
    memory_used_bytes: int
    memory_free_bytes: int
    # True for a device that is a configured memory budget on a node without a GPU.
    virtual: bool = False
    processes: list[dict[str, int]] = []


class LoadedModel(_Wire):
    name: str
    state: ModelState
    engine: str
    quantization: str
    tp: int
    gpus: list[int]
    memory_bytes: int
    # tp × the largest share one of its tp devices holds (what the neuron places by).
    estimated_bytes: int
    estimated_bytes_per_gpu: int = 0
    loaded_at: float | None = None
    load_seconds: float | None = None
    in_flight: int = 0
    last_used: float | None = None
    reason: str | None = None
    # Host memory the model holds while ASLEEP (its weights); its memory_bytes are then what it
    # still holds on its devices.
    host_bytes: int = 0
    # When it last became READY: loaded, or woken.
    resident_since: float | None = None


class CatalogueEntry(_Wire):
    profile: ModelProfile
    estimated_bytes: int
    estimated_bytes_per_gpu: int = 0
    context_length: int
    # Whether its engine can sleep (release its device memory, keep its process), and the host
    # memory a sleep takes; an engine that cannot is unloaded instead.
    can_sleep: bool = False
    host_bytes_asleep: int = 0

    @field_validator("profile", mode="before")
    @classmethod
    def _known_fields(cls, value: Any) -> Any:
        """The profile is config (unknown keys are an error in models.toml), but here it is
        read off the wire: a newer neuron's new fields are left out, not refused."""
        if isinstance(value, dict):
            return {k: v for k, v in value.items() if k in ModelProfile.model_fields}
        return value


class TritonInfo(_Wire):
    state: TritonState
    http_url: str
    grpc_url: str
    metrics_url: str
    restarts: int = 0
    last_error: str | None = None


class CatalogueReload(_Wire):
    """The last time the neuron re-read models.toml (SIGHUP or the file changing)."""

    at: float
    ok: bool
    # Why the file was refused (file:line: key: problem); the old catalogue is still served.
    error: str | None = None
    added: list[str] = []
    updated: list[str] = []
    removed: list[str] = []
    # Loaded models whose entry changed or went: applied once each is unloaded.
    deferred: list[str] = []


class NeuronStatus(_Wire):
    name: str
    triton: TritonInfo
    gpus: list[GpuInfo]
    has_gpu: bool
    loaded: list[LoadedModel]
    catalogue: list[CatalogueEntry]
    events: list[str] = []
    # Host memory for sleeping models: the budget, and what the sleeping ones hold.
    host_memory_budget_bytes: int = 0
    host_memory_asleep_bytes: int = 0
    catalogue_reload: CatalogueReload | None = None


class LoadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    # Devices to place the model on; the neuron picks when omitted.
    gpus: list[int] | None = None


class UnloadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    # Unload even with requests in flight (they are cancelled by Triton).
    force: bool = False


class SleepRequest(BaseModel):
    """POST /models/sleep and /models/wake."""

    model_config = ConfigDict(extra="forbid")
    model: str


class PinRequest(BaseModel):
    """POST /models/pin: pin (or unpin) a catalogued model on this node, over models.toml."""

    model_config = ConfigDict(extra="forbid")
    model: str
    pinned: bool


class UnloadResult(_Wire):
    model: str
    memory_released: bool
    triton_restarted: bool


class TokenizerFiles(_Wire):
    model: str
    # File name → UTF-8 text (tokenizer.json, tokenizer_config.json, chat_template.jinja, …).
    files: dict[str, str]
    context_length: int
    eos_token_ids: list[int]
    pad_token_id: int | None


class ErrorBody(_Wire):
    error: str
    detail: dict[str, object] = {}
