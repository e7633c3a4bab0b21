"""Sleep and wake through a real gateway (issue 28): on a node whose memory holds one of two
models, asking for the other puts the first to sleep instead of unloading it, and asking for
the first again wakes it — the same process, the same greedy answer — while the second sleeps.
Real neuron (tritonserver, torch engine on CPU), real gateway, the openai SDK."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import openai
import psutil

from tests.fleet.conftest import GatewayFactory, NeuronProcess


def ask(gateway_url: str, model: str) -> str:
    client = openai.OpenAI(base_url=gateway_url, api_key="none", max_retries=0, timeout=180)
    reply = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Name a colour"}],
        max_tokens=8,
        temperature=0,
    )
    return reply.choices[0].message.content or ""


def stubs(neuron: NeuronProcess, model: str) -> set[int]:
    marker = f"{os.sep}{model}{os.sep}1{os.sep}model.py"
    return {
        p.pid
        for p in psutil.Process(neuron.process.pid).children(recursive=True)
        if any(marker in part for part in p.cmdline())
    }


def sample(metrics_url: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in httpx.get(metrics_url).text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_a_swap_sleeps_and_wakes_instead_of_loading(
    fleet: dict[str, NeuronProcess], gateway: GatewayFactory, tmp_path: Path
) -> None:
    small = fleet["small"]  # its budget holds one copy
    g = gateway([small])
    first = ask(g.url, "m1")
    m1_stubs = stubs(small, "m1")
    assert small.loaded() == {"m1"} and m1_stubs
    assert ask(g.url, "m2")
    assert small.loaded() == {"m2"} and small.asleep() == {"m1"}
    assert stubs(small, "m1") == m1_stubs  # asleep, not unloaded
    assert ask(g.url, "m1") == first  # woken: the same process answers as before
    assert small.loaded() == {"m1"} and small.asleep() == {"m2"}
    assert stubs(small, "m1") == m1_stubs
    assert g.loads("m1") == 1  # one cold load; the second time it woke
    assert sample(g.metrics_url, "cortex_wakes_total", model="m1") == 1
    assert sample(g.metrics_url, "cortex_sleeps_total", model="m1", reason="make_room") == 1
    assert sample(g.metrics_url, "cortex_model_tier", model="m2", tier="asleep") == 1
    assert sample(g.metrics_url, "cortex_model_tier", model="m1", tier="loaded") == 1
