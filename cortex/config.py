"""Configuration schema and loading for `cortex.toml`, `neuron.toml` and `models.toml`.

Config is data: frozen pydantic models, unknown keys rejected, loaded once at start. A broken
file raises `ConfigError`, whose message is one line naming the file, the line where it can be
found, the key and what is wrong.
"""

from __future__ import annotations

import enum
import ipaddress
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from cortex.secrets import absolute_beside, read_secret, read_secret_file, sha256_hex

DEFAULT_GATEWAY_LISTEN = "127.0.0.1:31313"
DEFAULT_METRICS_LISTEN = "127.0.0.1:31314"
DEFAULT_NEURON_LISTEN = "127.0.0.1:13131"


class ConfigError(ValueError):
    """A configuration file (ours, or a checkpoint's config.json: `cortex.hf_config`) is
    missing, unreadable or invalid. `str()` is one line for a human."""


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_host_port(value: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected HOST:PORT such as 127.0.0.1:31313, got {value!r}")
    return value


def split_host_port(value: str) -> tuple[str, int]:
    """'host:port' → (host, port); '[::1]:80' → ('::1', 80)."""
    host, _, port = value.rpartition(":")
    return host.strip("[]"), int(port)


def is_loopback(host: str) -> bool:
    """Whether binding `host` keeps a port off the network (wildcards and names do not)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _secret_file_beside_config(value: str | None, info: ValidationInfo) -> str | None:
    return absolute_beside(value, (info.context or {}).get("base_dir"))


def _env_is_set(value: str | None) -> str | None:
    if value is not None:
        read_secret(None, value, None)
    return value


def _file_is_readable(value: str | None) -> str | None:
    if value is not None:
        read_secret_file(value)
    return value


class _Token(_Config):
    """A bearer token written as itself, as an environment variable's name or as a file."""

    token: str | None = Field(default=None, repr=False)
    token_env: str | None = None
    token_file: str | None = None

    _token_file_beside = field_validator("token_file", mode="before")(_secret_file_beside_config)
    _token_env = field_validator("token_env")(_env_is_set)
    _token_file = field_validator("token_file")(_file_is_readable)

    @model_validator(mode="after")
    def _one_spelling(self) -> _Token:
        spellings = [self.token, self.token_env, self.token_file]
        if sum(spelling is not None for spelling in spellings) > 1:
            raise ValueError("set only one of token, token_env and token_file")
        return self

    def bearer_token(self) -> str | None:
        """The token, read from where the config says (validated when it was loaded)."""
        return read_secret(self.token, self.token_env, self.token_file)

    def authorization(self) -> dict[str, str]:
        """The header that carries the token, or none without one."""
        token = self.bearer_token()
        return {"authorization": f"Bearer {token}"} if token else {}


# ---------------------------------------------------------------------------------------------
# cortex.toml (gateway)


class EvictionStrategy(enum.StrEnum):
    LRU = "lru"
    PRIORITY = "priority"
    # Least recent requests per byte held (decayed counts): fewer loads than LRU on mixed sizes.
    DEMAND = "demand"


class GatewaySection(_Config):
    listen: str = DEFAULT_GATEWAY_LISTEN
    metrics_listen: str = DEFAULT_METRICS_LISTEN
    # Client API keys; none configured → the API is open (the embedded default binds loopback).
    # Each may be written as itself (api_keys), as its SHA-256 digest in hex (api_key_sha256:
    # the gateway's host then never holds the key), as environment variables' names
    # (api_keys_env) or as a file holding one key a line (api_keys_file).
    api_keys: tuple[str, ...] = Field(default=(), repr=False)
    api_key_sha256: tuple[str, ...] = ()
    api_keys_env: tuple[str, ...] = ()
    api_keys_file: str | None = None
    poll_interval_s: Annotated[float, Field(gt=0)] = 2.0
    # Polls a neuron may miss before it is marked down.
    missed_polls_down: Annotated[int, Field(ge=1)] = 2
    load_timeout_s: Annotated[float, Field(gt=0)] = 600.0
    # A request's generation (once its model is ready) must end within this many seconds.
    request_timeout_s: Annotated[float, Field(gt=0)] = 600.0
    # Keep-alive interval of streams while nothing is produced (cold load, long prefill).
    ping_interval_s: Annotated[float, Field(gt=0)] = 5.0
    # On SIGTERM the gateway stops accepting and lets streams in flight finish for up to this
    # many seconds; streams still running then are cut, and say so.
    drain_timeout_s: Annotated[float, Field(ge=0)] = 30.0
    log_format: str = "text"
    # A conversation stays on the replica that holds its prefix unless that replica has more
    # than this many requests in flight beyond the least busy one.
    affinity_slack: Annotated[int, Field(ge=0)] = 4
    # A node that fails this many requests (or polls) within breaker_window_s is kept out of
    # rotation for breaker_open_s, even if it answers polls meanwhile.
    breaker_failures: Annotated[int, Field(ge=1)] = 3
    breaker_window_s: Annotated[float, Field(gt=0)] = 60.0
    breaker_open_s: Annotated[float, Field(gt=0)] = 30.0

    _listen = field_validator("listen", "metrics_listen")(_check_host_port)
    _keys_file_beside = field_validator("api_keys_file", mode="before")(_secret_file_beside_config)
    _keys_file = field_validator("api_keys_file")(_file_is_readable)

    @field_validator("api_keys_env")
    @classmethod
    def _keys_env(cls, names: tuple[str, ...]) -> tuple[str, ...]:
        for name in names:
            _env_is_set(name)
        return names

    @field_validator("api_key_sha256")
    @classmethod
    def _digests(cls, digests: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(_sha256_digest(digest) for digest in digests)

    def key_digests(self) -> frozenset[str]:
        """The SHA-256 digest (hex) of every accepted key, however each was written."""
        keys = [
            *self.api_keys,
            *(read_secret(None, name, None) or "" for name in self.api_keys_env),
        ]
        if self.api_keys_file is not None:
            keys.extend(read_secret_file(self.api_keys_file))
        return frozenset({*self.api_key_sha256, *(sha256_hex(key) for key in keys)})

    @field_validator("log_format")
    @classmethod
    def _log_format(cls, value: str) -> str:
        if value not in ("text", "json"):
            raise ValueError("expected 'text' or 'json'")
        return value


class EvictionSection(_Config):
    strategy: EvictionStrategy = EvictionStrategy.LRU
    interval_s: Annotated[float, Field(gt=0)] = 30.0
    # Every this many eviction cycles the fleet is re-packed; 0 turns defragmentation off.
    defrag_after_cycles: Annotated[int, Field(ge=0)] = 10
    # Half-life of the request counts the `demand` strategy ranks models by.
    demand_half_life_s: Annotated[float, Field(gt=0)] = 300.0
    # How long a defragmentation move waits for the old copy's streams before leaving it be.
    drain_timeout_s: Annotated[float, Field(gt=0)] = 60.0
    # A model loaded or woken less than this many seconds ago is not evicted for another (a
    # request for that one waits): keeps a GPU from swapping faster than requests justify.
    min_resident_s: Annotated[float, Field(ge=0)] = 0.0
    # Swap-aware queueing: a request waiting for its model to be loaded or woken where other
    # models still have work waits at most this long; then those models yield (they finish what
    # is in flight, new requests for them queue behind the switch), even within min_resident_s.
    max_swap_wait_s: Annotated[float, Field(gt=0)] = 30.0


class ScalingSection(_Config):
    """When a model with `max_replicas` > 1 gets another replica, and when it loses one."""

    # Requests in flight per replica that, held for a whole window, add a replica.
    in_flight_per_replica: Annotated[float, Field(gt=0)] = 4.0
    window_s: Annotated[float, Field(gt=0)] = 30.0
    # A replica beyond the model's floor that served nothing for this long is unloaded.
    idle_s: Annotated[float, Field(gt=0)] = 300.0


class KeyPriority(enum.StrEnum):
    """A key's scheduling class: interactive requests are admitted before batch ones."""

    INTERACTIVE = "interactive"
    BATCH = "batch"


def _sha256_digest(digest: str) -> str:
    if not re.fullmatch(r"[0-9a-fA-F]{64}", digest):
        raise ValueError("expected SHA-256 digests as 64 hex digits")
    return digest.lower()


# The name usage of the plain [gateway] api_keys is counted under (a record may not take it).
UNNAMED_KEY = "unnamed"


class KeyRecord(_Config):
    """One `[[keys]]` record: a named client key with what it may use and how much.

    The key is written as itself (`key`), as its SHA-256 digest (`key_sha256`), as a file that
    holds it (`key_file`) or as an environment variable's name (`key_env`): exactly one. Usage
    is counted under `name`; the key itself never reaches a log or a metric."""

    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._@-]*$", max_length=64)]
    key: str | None = Field(default=None, repr=False)
    key_sha256: str | None = None
    key_file: str | None = None
    key_env: str | None = None
    # Shell-style patterns of the models (catalogue names or the names clients ask for) this
    # key may use.
    models: tuple[str, ...] = ("*",)
    # Requests and tokens (prompt + output) per rolling minute, requests at once; unset: none.
    rpm: Annotated[int, Field(gt=0)] | None = None
    tpm: Annotated[int, Field(gt=0)] | None = None
    max_concurrent: Annotated[int, Field(gt=0)] | None = None
    priority: KeyPriority = KeyPriority.INTERACTIVE
    # May load, unload, pin and unpin models from the console and its API.
    admin: bool = False

    _key_file_beside = field_validator("key_file", mode="before")(_secret_file_beside_config)
    _key_env = field_validator("key_env")(_env_is_set)
    _key_file = field_validator("key_file")(_file_is_readable)

    @field_validator("key_sha256")
    @classmethod
    def _digest(cls, digest: str | None) -> str | None:
        return None if digest is None else _sha256_digest(digest)

    @field_validator("name")
    @classmethod
    def _not_unnamed(cls, name: str) -> str:
        if name == UNNAMED_KEY:
            raise ValueError(f"{UNNAMED_KEY!r} is the name usage of [gateway] api_keys goes under")
        return name

    @field_validator("models")
    @classmethod
    def _some_models(cls, models: tuple[str, ...]) -> tuple[str, ...]:
        if not models or any(not pattern.strip() for pattern in models):
            raise ValueError("expected at least one model name or pattern such as 'qwen-*'")
        return models

    @model_validator(mode="after")
    def _one_spelling(self) -> KeyRecord:
        spellings = [self.key, self.key_sha256, self.key_file, self.key_env]
        if sum(spelling is not None for spelling in spellings) != 1:
            raise ValueError("set exactly one of key, key_sha256, key_file and key_env")
        if self.key is not None and not self.key.strip():
            raise ValueError("the key is empty")
        return self

    def digest(self) -> str:
        """The key's SHA-256 digest (hex), however it was written."""
        if self.key_sha256 is not None:
            return self.key_sha256
        return sha256_hex(read_secret(self.key, self.key_env, self.key_file) or "")


class NeuronRef(_Token):
    name: str
    endpoint: str
    # CA certificate (PEM) that signed this node's Triton gRPC certificate ([triton] tls_cert):
    # set, the gateway reaches Triton over TLS and checks the certificate names the endpoint's
    # host.
    tls_ca: str | None = None

    _tls_ca_beside = field_validator("tls_ca", mode="before")(_secret_file_beside_config)

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, value: str) -> str:
        if not re.match(r"^https?://[^/\s]+(:\d+)?/?$", value):
            raise ValueError(f"expected an URL such as http://10.0.0.5:13131, got {value!r}")
        return value.rstrip("/")


class CortexConfig(_Config):
    gateway: GatewaySection = GatewaySection()
    eviction: EvictionSection = EvictionSection()
    scaling: ScalingSection = ScalingSection()
    neurons: tuple[NeuronRef, ...] = ()
    # Named client keys with limits, model patterns and a priority class ([[keys]]); the plain
    # [gateway] api_keys lists stay accepted as unnamed, unlimited, interactive keys.
    keys: tuple[KeyRecord, ...] = ()

    @field_validator("keys")
    @classmethod
    def _unique_keys(
        cls, keys: tuple[KeyRecord, ...], info: ValidationInfo
    ) -> tuple[KeyRecord, ...]:
        names: set[str] = set()
        gateway = info.data.get("gateway")
        plain = gateway.key_digests() if isinstance(gateway, GatewaySection) else frozenset()
        digests: set[str] = set()
        for record in keys:
            if record.digest() in plain:
                raise ValueError(f"key {record.name!r} is also listed in [gateway] api_keys")
            if record.name in names:
                raise ValueError(f"key name {record.name!r} is used twice")
            if record.digest() in digests:
                raise ValueError(f"key {record.name!r} has the same secret as an earlier key")
            names.add(record.name)
            digests.add(record.digest())
        return keys

    @field_validator("neurons")
    @classmethod
    def _unique_names(cls, neurons: tuple[NeuronRef, ...]) -> tuple[NeuronRef, ...]:
        names = [n.name for n in neurons]
        for name in names:
            if names.count(name) > 1:
                raise ValueError(f"neuron name {name!r} is used twice")
        return neurons


# ---------------------------------------------------------------------------------------------
# models.toml (placement profiles)


class EngineKind(enum.StrEnum):
    TORCH = "torch"
    TRTLLM = "trtllm"
    # GGUF files as they are, on llama.cpp (the default for a .gguf source)
    LLAMACPP = "llamacpp"


# KV-cache block size `cortex build-engine` builds TensorRT-LLM engines with; the gateway turns
# the backend's `kv_cache_reused_blocks` into prompt tokens read from the cache with it.
TRTLLM_TOKENS_PER_BLOCK = 32


class Quantization(enum.StrEnum):
    NONE = "none"
    FP8 = "fp8"
    INT8 = "int8"
    INT4 = "int4"
    INT4_AWQ = "int4_awq"


class KVCacheDtype(enum.StrEnum):
    AUTO = "auto"  # the model's compute dtype
    FP8 = "fp8"  # float8 e4m3, one scale per token and kv head (torch engine)


class Speculation(enum.StrEnum):
    OFF = "off"
    NGRAM = "ngram"  # prompt lookup over the request and the model's recent outputs


class ToolCallFormat(enum.StrEnum):
    HERMES = "hermes"
    LLAMA3_JSON = "llama3_json"
    # gpt-oss: prompts rendered and output parsed by openai-harmony (control_plane/harmony.py)
    HARMONY = "harmony"
    # Qwen3-Coder: <tool_call><function=NAME><parameter=P>value</parameter></function></tool_call>
    QWEN3_CODER = "qwen3_coder"
    NONE = "none"


class ReasoningFormat(enum.StrEnum):
    """How a model writes its reasoning before its answer (control_plane/reasoning.py)."""

    AUTO = "auto"  # `think` when its chat template knows <think> or </think>, else `none`
    THINK = "think"  # <think>…</think> (Qwen3, QwQ, DeepSeek-R1)
    NONE = "none"  # it does not: its output is all answer


class ModelProfile(_Config):
    """One servable model: what it is, where it may run, and how the lifecycle treats it."""

    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")]
    # Other names clients may use; shell-style patterns such as "claude-*" are allowed.
    aliases: tuple[str, ...] = ()
    # Hugging Face checkpoint folder (torch), TensorRT-LLM engine folder (trtllm) or GGUF file
    # (llamacpp; torch reads the common GGUF architectures too).
    source: str
    # Default: llamacpp for a .gguf source, torch for anything else.
    engine: EngineKind = EngineKind.TORCH
    # An embedding model (llamacpp): served at /v1/embeddings, refused for chat.
    embedding: bool = False
    quantization: Quantization = Quantization.NONE
    dtype: str = "auto"
    tp: Annotated[int, Field(ge=1)] = 1
    priority: int = 0
    pinned: bool = False
    # Replicas the fleet keeps once the model is wanted, and the most it adds under load.
    min_replicas: Annotated[int, Field(ge=1)] = 1
    max_replicas: Annotated[int, Field(ge=1)] = 1
    idle_ttl_s: Annotated[float, Field(gt=0)] | None = None
    # Idle this long, a model that can sleep (torch engine, tp 1) sleeps: its device memory is
    # released and it wakes in about a second; unset, it stays loaded until its idle TTL or an
    # eviction (which puts it to sleep when its node's host budget allows, else unloads it).
    sleep_after_s: Annotated[float, Field(gt=0)] | None = None
    # Neurons allowed to hold this model; empty means any.
    neurons: tuple[str, ...] = ()
    context_length: Annotated[int, Field(gt=0)] | None = None
    tool_call_format: ToolCallFormat = ToolCallFormat.HERMES
    # harmony models reason on their analysis channel whatever this says.
    reasoning: ReasoningFormat = ReasoningFormat.AUTO
    max_batch_size: Annotated[int, Field(ge=1)] = 8
    kv_cache_tokens: Annotated[int, Field(ge=16)] = 65536
    max_queue_size: Annotated[int, Field(ge=0)] = 256
    # torch engine: prompt tokens prefilled per step, over all sequences (0: 512 on CPU, 16384
    # on a GPU, where a 16k prompt then takes one pass: 0.54 s on an H200 for an 8B model,
    # 0.64 s in two). Larger gives long prompts a shorter first token and stalls decoding longer.
    prefill_tokens: Annotated[int, Field(ge=0)] = 0
    # torch engine on a GPU: decode through CUDA graphs captured at load (false: eager).
    cuda_graphs: bool = True
    # Reuse the KV cache of earlier requests' equal prompt prefixes (torch engine; trtllm
    # engines always reuse, as their template enables it).
    prefix_caching: bool = True
    # torch engine: what the KV cache stores. fp8 about halves the bytes of kv_cache_tokens (the
    # budget stays in tokens: raise it to fill the memory), for a small loss of accuracy and no
    # gain in speed (BENCHMARKS.md).
    kv_cache_dtype: KVCacheDtype = KVCacheDtype.AUTO
    # Host memory (GiB, pinned beside a GPU) that keeps prefix-cache blocks evicted from the KV
    # cache, so a returning conversation copies its prefix back instead of recomputing it
    # (torch: kv_cache.HostTier; trtllm: KvCacheConfig's host cache). 0: off.
    host_kv_cache_gib: Annotated[float, Field(ge=0)] = 0
    # torch engine: every matmul through one fixed-tile kernel, so a sequence's greedy output
    # does not depend on what else is in its batch; a prefix-cache hit can still change it
    # (slower; BENCHMARKS.md says how much).
    batch_invariant: bool = False
    # torch engine: speculative decoding. "ngram" guesses up to speculative_tokens next tokens
    # from the request's own prompt and output and the model's recent outputs, and verifies
    # them in one forward pass (outputs unchanged: the same greedy tokens, the same sampling
    # distribution); off above speculative_max_batch decoding sequences (BENCHMARKS.md).
    speculation: Speculation = Speculation.OFF
    speculative_tokens: Annotated[int, Field(ge=1, le=16)] = 4
    speculative_max_batch: Annotated[int, Field(ge=1)] = 4
    # Folder with tokenizer files when the source has none (trtllm engines).
    tokenizer: str | None = None
    # A Triton model-directory template folder to use instead of the engine's own one under
    # model_repo_templates/ (filled with the same placeholders). Tests point it at fakes.
    template: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _gguf_engine(cls, data: Any) -> Any:
        """A GGUF source is served by llama.cpp unless the profile names another engine."""
        if (
            isinstance(data, dict)
            and "engine" not in data
            and str(data.get("source", "")).lower().endswith(".gguf")
        ):
            return {**data, "engine": EngineKind.LLAMACPP}
        return data

    @field_validator("embedding")
    @classmethod
    def _embedding(cls, value: bool, info: ValidationInfo) -> bool:
        if value and info.data.get("engine") not in (EngineKind.LLAMACPP, None):
            raise ValueError('embedding models are served by engine = "llamacpp" only')
        return value

    @property
    def host_kv_cache_bytes(self) -> int:
        """The prefix cache's host tier in bytes (the node counts it as host memory)."""
        return int(self.host_kv_cache_gib * 2**30)

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, value: str) -> str:
        if value not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError("expected one of auto, float32, bfloat16, float16")
        return value

    @field_validator("max_replicas")
    @classmethod
    def _replicas(cls, value: int, info: ValidationInfo) -> int:
        if value < info.data.get("min_replicas", 1):
            raise ValueError("must be at least min_replicas")
        return value


class ModelsFile(_Config):
    models: tuple[ModelProfile, ...] = ()

    @field_validator("models")
    @classmethod
    def _unique(cls, models: tuple[ModelProfile, ...]) -> tuple[ModelProfile, ...]:
        seen: set[str] = set()
        for model in models:
            if model.name in seen:
                raise ValueError(f"model name {model.name!r} is used twice")
            seen.add(model.name)
        return models


# ---------------------------------------------------------------------------------------------
# neuron.toml (one node)


class NeuronSection(_Token):
    name: str = "local"
    listen: str = DEFAULT_NEURON_LISTEN
    # Without a token the neuron (and its Triton's gRPC port) may only listen on loopback,
    # unless this says the network in between is trusted.
    allow_unauthenticated: bool = False
    # models.toml, relative to this file when not absolute.
    models: str = "models.toml"
    # Generated Triton model repository, Triton backends and logs.
    state_dir: str = "~/.cache/cortex/neuron"
    # Memory budget per device in MiB. On a node without GPUs each entry stands for one virtual
    # device of that size (tests stage "VRAM tiers" this way); with GPUs it caps each real one.
    memory_budget_mib: tuple[Annotated[int, Field(gt=0)], ...] = ()
    # Host memory sleeping models may hold, in MiB (their weights, off the GPU); unset: the
    # machine's memory less a reserve (a tenth, at least 2 GiB). A sleep that would not fit is
    # refused, and the gateway unloads instead.
    host_memory_budget_mib: Annotated[int, Field(ge=0)] | None = None

    _listen = field_validator("listen")(_check_host_port)


class TritonSection(_Config):
    # Empty: `tritonserver` on PATH (NGC image), else the binary `nvidia-pytriton` ships.
    binary: str = ""
    # Address Triton's gRPC port binds; gateways on other hosts reach it here (set 0.0.0.0 or
    # the node's address on a real fleet, with a neuron token). Its HTTP and metrics ports bind
    # loopback only: the neuron is their one user, and re-exports the metrics on its /metrics.
    address: str = "127.0.0.1"
    http_port: Annotated[int, Field(gt=0, lt=65536)] = 8000
    grpc_port: Annotated[int, Field(gt=0, lt=65536)] = 8001
    metrics_port: Annotated[int, Field(gt=0, lt=65536)] = 8002
    startup_timeout_s: Annotated[float, Field(gt=0)] = 120.0
    # TLS for the gRPC port (PEM files; both or neither): for networks between the gateway and
    # the nodes that the operator does not trust. The gateway's [[neurons]] tls_ca checks it.
    tls_cert: str | None = None
    tls_key: str | None = Field(default=None, repr=False)
    # Extra command-line flags passed to tritonserver as they are.
    extra_args: tuple[str, ...] = ()

    _tls_beside = field_validator("tls_cert", "tls_key", mode="before")(_secret_file_beside_config)

    @model_validator(mode="after")
    def _tls_pair(self) -> TritonSection:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together: set both or neither")
        return self


class NeuronConfig(_Config):
    neuron: NeuronSection = NeuronSection()
    triton: TritonSection = TritonSection()
    models: ModelsFile = ModelsFile()
    # Folder the config came from; relative paths in it are resolved against this.
    base_dir: str = "."

    def resolve(self, path: str) -> Path:
        resolved = Path(path).expanduser()
        return resolved if resolved.is_absolute() else Path(self.base_dir) / resolved


# ---------------------------------------------------------------------------------------------
# Loading with one-line errors

_Model = TypeVar("_Model", bound=BaseModel)


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except OSError as error:
        raise ConfigError(f"{path}: cannot read: {error.strerror}") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path}: not valid TOML: {error}") from None


def _line_of(path: Path, loc: tuple[int | str, ...]) -> int | None:
    """Best effort: the line where the key at `loc` (pydantic's error location) is written."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return None
    keys = [part for part in loc if isinstance(part, str)]
    indices = [part for part in loc if isinstance(part, int)]
    if not keys:
        return None
    table, key = keys[:-1], keys[-1]
    wanted_index = indices[0] if indices else 0
    current: list[str] = []
    seen_index = -1
    for number, line in enumerate(lines, start=1):
        stripped = line.strip()
        header = re.match(r"^\[\[?\s*([^\]]+?)\s*\]\]?", stripped)
        if header:
            current = header.group(1).split(".")
            if stripped.startswith("[[") and current == keys[: len(current)]:
                seen_index += 1
            continue
        if re.match(rf"^\"?{re.escape(key)}\"?\s*=", stripped):
            in_table = current == table or (not table and not current)
            if in_table and (not indices or seen_index == wanted_index):
                return number
    # The key itself is missing or is a whole table: point at the (index-th) table header.
    for header_keys in (keys, table):
        if not header_keys:
            continue
        pattern = rf"^\[\[?\s*{re.escape('.'.join(header_keys))}\s*\]\]?"
        matches = [n for n, line in enumerate(lines, start=1) if re.match(pattern, line.strip())]
        if matches:
            return matches[min(wanted_index, len(matches) - 1)]
    return None


def _problem(error: ValidationError) -> tuple[tuple[int | str, ...], str]:
    """The first problem's location, and it in words: 'key: what is wrong (and N more)'."""
    first = error.errors()[0]
    loc = tuple(first["loc"])
    key = ".".join(str(part) for part in loc) or "(top level)"
    message = first["msg"]
    if first["type"] == "extra_forbidden":
        message = "unknown key"
    elif first["type"] == "missing":
        message = "required key is missing"
    extra = f" (and {len(error.errors()) - 1} more problems)" if len(error.errors()) > 1 else ""
    return loc, f"{key}: {message}{extra}"


def _validate(model: type[_Model], data: dict[str, Any], path: Path) -> _Model:
    try:
        # Secret files and certificates are written relative to the config file.
        return model.model_validate(data, context={"base_dir": str(path.parent.resolve())})
    except ValidationError as error:
        loc, problem = _problem(error)
        line = _line_of(path, loc)
        where = f"{path}:{line}" if line else str(path)
        raise ConfigError(f"{where}: {problem}") from None


def validate_settings(model: type[_Model], data: dict[str, Any], where: str) -> _Model:
    """Settings that come from no file (a command line): `ConfigError` 'WHERE: key: problem'."""
    try:
        return model.model_validate(data)
    except ValidationError as error:
        raise ConfigError(f"{where}: {_problem(error)[1]}") from None


def load_cortex_config(path: Path) -> CortexConfig:
    return _validate(CortexConfig, _read_toml(path), path)


def load_models_file(path: Path) -> ModelsFile:
    return _validate(ModelsFile, _read_toml(path), path)


def load_neuron_config(path: Path) -> NeuronConfig:
    data = _read_toml(path)
    if "models" in data or "base_dir" in data:
        key = "models" if "models" in data else "base_dir"
        raise ConfigError(f"{path}: {key}: unknown key (models belong in [neuron] models = FILE)")
    config = _validate(NeuronConfig, data, path)
    base_dir = str(path.parent.resolve())
    models_path = Path(config.neuron.models).expanduser()
    if not models_path.is_absolute():
        models_path = path.parent / models_path
    models = load_models_file(models_path)
    _refuse_open_network(config, path)
    return config.model_copy(update={"models": models, "base_dir": base_dir})


def _refuse_open_network(config: NeuronConfig, path: Path) -> None:
    """A neuron without a token answers anyone who reaches it, and so would its Triton's gRPC
    port: both must then stay on loopback, unless the operator says the network is trusted."""
    section = config.neuron
    if section.bearer_token() is not None or section.allow_unauthenticated:
        return
    for key, host in (
        ("neuron.listen", split_host_port(section.listen)[0]),
        ("triton.address", config.triton.address),
    ):
        if not is_loopback(host):
            line = _line_of(path, tuple(key.split(".")))
            where = f"{path}:{line}" if line else str(path)
            raise ConfigError(
                f"{where}: {key}: {host} is reachable from the network but neuron.token is not "
                "set: set neuron.token (or token_env / token_file), or "
                "neuron.allow_unauthenticated = true for a trusted network"
            )
