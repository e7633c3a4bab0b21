"""Observability tests run against the session's embedded fleet (tests/conftest.py): a cortex.toml
that names its gateway metrics port and its neuron, and the `cortex` CLI as a subprocess."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import openai
import pytest

from cortex.config import CortexConfig, GatewaySection, NeuronRef
from cortex.launch import free_ports, write_gateway_config
from tests.conftest import Embedded

REPO = Path(__file__).resolve().parents[2]
NODE = "local"  # the embedded neuron's name, which the gateway's `node` label carries


def cortex(*args: str) -> subprocess.CompletedProcess[str]:
    # A wide terminal so that rich tables keep every cell on one line.
    env = dict(os.environ, COLUMNS="200")
    return subprocess.run(
        [sys.executable, "-m", "cortex.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )


def metrics_address(embedded: Embedded) -> str:
    return urlparse(embedded.metrics_url).netloc


def triton_metrics_port(embedded: Embedded) -> int:
    port = urlparse(embedded.triton_http).port
    assert port is not None
    return port + 2  # Triton takes HTTP, gRPC, metrics on consecutive ports


def write_cortex_toml(path: Path, embedded: Embedded, down_neuron: bool = False) -> Path:
    neurons = [embedded.neuron_ref(NODE)]
    if down_neuron:
        closed = free_ports(1)[0]  # nothing listens there
        neurons.append(NeuronRef(name="gone", endpoint=f"http://127.0.0.1:{closed}"))
    config = CortexConfig(
        gateway=GatewaySection(metrics_listen=metrics_address(embedded)), neurons=tuple(neurons)
    )
    return write_gateway_config(path, config)


@pytest.fixture
def fleet_toml(embedded: Embedded, tmp_path: Path) -> Path:
    return write_cortex_toml(tmp_path / "cortex.toml", embedded)


@pytest.fixture
def fleet_toml_one_down(embedded: Embedded, tmp_path: Path) -> Path:
    return write_cortex_toml(tmp_path / "cortex.toml", embedded, down_neuron=True)


@pytest.fixture(scope="module")
def client(embedded: Embedded) -> openai.OpenAI:
    return openai.OpenAI(base_url=embedded.base_url, api_key="unused", max_retries=0)


@pytest.fixture
def loaded(client: openai.OpenAI) -> None:
    """cortex-tiny is READY on the embedded neuron (the first request loads it)."""
    client.chat.completions.create(
        model="cortex-tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=1
    )


def program(name: str) -> str:
    """An outside program's path; skipped when absent unless CORTEX_REQUIRE_VALIDATORS=1 (CI)."""
    found = shutil.which(name)
    if found is None:
        if os.environ.get("CORTEX_REQUIRE_VALIDATORS") == "1":
            pytest.fail(f"{name} is not installed (CORTEX_REQUIRE_VALIDATORS=1)")
        pytest.skip(f"{name} is not installed")
    return found
