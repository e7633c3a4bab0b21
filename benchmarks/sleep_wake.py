"""Sleep and wake on CPU through a real gateway (issue 28): what a swap costs with the ASLEEP
tier against a cold load, and a thrashing trace with and without it.

    python -m benchmarks.sleep_wake            # 3 repetitions
    python -m benchmarks.sleep_wake --quick    # 1 repetition, a shorter trace

swap     per model (smollm2-135m on the torch engine, cortex-tiny): time to first token of a
         request for it when it is not loaded (a cold load), seconds to put it to sleep
         (`POST /models/sleep`), time to first token of a request while it sleeps (the gateway
         wakes it); the stub's resident memory awake and asleep
thrash   three cortex-tiny copies on a node whose budget holds two; a request trace that keeps
         switching between them in bursts (as agents on different models do), run with the
         host budget at 0 (every eviction unloads: the unload-based tier of before) and with
         room to sleep; total time and time to first token p50 / p95
Results go to benchmarks/results/sleep_wake[-quick].json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

from benchmarks.harness import API_KEY, bench_gateway, machine
from cortex.config import EngineKind, ModelProfile
from cortex.demo.smollm2 import ensure_smollm2, gguf_path
from cortex.demo.tiny_model import ensure_tiny_model
from cortex.launch import Gateway, Neuron, loopback_neuron, running_neuron

RESULTS = Path(__file__).resolve().parent / "results"
NODE = "bench-node"


def first_token(gateway: Gateway, model: str) -> float:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "Say hello."}],
        "max_tokens": 4,
        "temperature": 0,
        "stream": True,
    }
    started = time.perf_counter()
    with httpx.stream(
        "POST",
        f"{gateway.url}/v1/chat/completions",
        json=body,
        headers={"x-api-key": API_KEY},
        timeout=600,
    ) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if line.startswith("data: {") and '"content":"' in line and '"content":""' not in line:
                return time.perf_counter() - started
    raise RuntimeError(f"{model}: the stream had no content")


def wait_state(neuron: Neuron, model: str, states: set[str | None], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        loaded = httpx.get(f"{neuron.url}/status", timeout=30).json()["loaded"]
        state = next((m["state"] for m in loaded if m["name"] == model), None)
        if state in states:
            return
        time.sleep(0.1)
    raise TimeoutError(f"{model} never reached {states}")


def stub_rss(neuron: Neuron, model: str) -> int:
    marker = f"/{model}/1/model.py"
    total = 0
    for process in psutil.Process(neuron.process.pid).children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if any(marker in part for part in process.cmdline()):
                total += process.memory_info().rss
    return total


def swap(folder: Path, repetitions: int) -> dict[str, Any]:
    models = [
        ModelProfile(
            name="smollm2-135m",
            source=str(gguf_path(ensure_smollm2())),
            engine=EngineKind.TORCH,
            kv_cache_tokens=8192,
        ),
        ModelProfile(name="cortex-tiny", source=str(ensure_tiny_model()), kv_cache_tokens=8192),
    ]
    rows: dict[str, Any] = {}
    config = loopback_neuron(folder / "swap", NODE, models)
    with running_neuron(config) as neuron, bench_gateway(folder / "swap", neuron) as gateway:
        for model in (m.name for m in models):
            runs = []
            for _ in range(repetitions):
                cold = first_token(gateway, model)
                awake = stub_rss(neuron, model)
                started = time.perf_counter()
                response = httpx.post(
                    f"{neuron.url}/models/sleep", json={"model": model}, timeout=300
                )
                response.raise_for_status()
                slept = time.perf_counter() - started
                asleep = stub_rss(neuron, model)
                time.sleep(2.5)  # the gateway's next poll sees it asleep
                wake = first_token(gateway, model)
                runs.append(
                    {
                        "cold_first_token_s": cold,
                        "sleep_s": slept,
                        "wake_first_token_s": wake,
                        "rss_awake_bytes": awake,
                        "rss_asleep_bytes": asleep,
                    }
                )
                httpx.post(f"{neuron.url}/models/unload", json={"model": model}, timeout=300)
                wait_state(neuron, model, {None})
                time.sleep(2.5)
            rows[model] = runs
            print(model, runs, flush=True)
    return rows


def trace(length: int) -> list[str]:
    """Bursts of two to four requests, switching models in a fixed pseudo-random order."""
    order = ["a", "b", "a", "c", "b", "c", "a", "b", "c", "c", "a", "b"]
    sequence: list[str] = []
    index = 0
    while len(sequence) < length:
        sequence += [order[index % len(order)]] * (2 + index % 3)
        index += 1
    return sequence[:length]


def thrash(folder: Path, length: int, host_budget_mib: int, name: str) -> dict[str, Any]:
    tiny = ensure_tiny_model()
    models = [ModelProfile(name=m, source=str(tiny), kv_cache_tokens=2048) for m in "abc"]
    config = loopback_neuron(folder / name, NODE, models, memory_budget_mib=[1400])
    settings = config.neuron.model_copy(update={"host_memory_budget_mib": host_budget_mib})
    config = config.model_copy(update={"neuron": settings})
    with running_neuron(config) as neuron, bench_gateway(folder / name, neuron) as gateway:
        started = time.perf_counter()
        ttft = [first_token(gateway, model) for model in trace(length)]
        total = time.perf_counter() - started
    quantiles = statistics.quantiles(ttft, n=20)
    row = {
        "total_s": total,
        "ttft_p50_s": statistics.median(ttft),
        "ttft_p95_s": quantiles[-1],
        "ttft_max_s": max(ttft),
        "requests": len(ttft),
    }
    print(name, row, flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    repetitions, length = (1, 12) if args.quick else (3, 36)
    report: dict[str, Any] = {"machine": machine()}
    with tempfile.TemporaryDirectory(prefix="cortex-sleep-") as folder:
        root = Path(folder)
        report["swap"] = swap(root, repetitions)
        report["thrash_unload"] = thrash(root, length, 0, "unload")
        report["thrash_sleep"] = thrash(root, length, 4096, "sleep")
    out = args.out or RESULTS / f"sleep_wake{'-quick' if args.quick else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print("model          cold_ttft  sleep   wake_ttft  ×cold/wake   rss awake→asleep MiB")
    for model, runs in report["swap"].items():
        cold = statistics.median(r["cold_first_token_s"] for r in runs)
        wake = statistics.median(r["wake_first_token_s"] for r in runs)
        slept = statistics.median(r["sleep_s"] for r in runs)
        rss = runs[-1]["rss_awake_bytes"] / 2**20, runs[-1]["rss_asleep_bytes"] / 2**20
        print(
            f"{model:14} {cold:8.2f}s {slept:6.2f}s {wake:8.3f}s {cold / wake:9.1f}   "
            f"{rss[0]:.0f}→{rss[1]:.0f}"
        )
    a, b = report["thrash_unload"], report["thrash_sleep"]
    print(
        f"thrash: unload {a['total_s']:.1f}s p50 {a['ttft_p50_s']:.2f} p95 {a['ttft_p95_s']:.2f}; "
        f"sleep {b['total_s']:.1f}s p50 {b['ttft_p50_s']:.2f} p95 {b['ttft_p95_s']:.2f}; "
        f"ratio {b['total_s'] / a['total_s']:.2f}"
    )


if __name__ == "__main__":
    main()
