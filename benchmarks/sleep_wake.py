"""Sleep and wake on CPU through a real gateway (issue 28): what a swap costs with the ASLEEP
tier against a cold load, and a thrashing trace with and without it.

    python -m benchmarks.sleep_wake            # 3 repetitions
    python -m benchmarks.sleep_wake --quick    # 1 repetition, a shorter trace
    python -m benchmarks.sleep_wake --thrash-only --repeats 2 --length 24

swap     per model (smollm2-135m on the torch engine, cortex-tiny): time to first token of a
         request for it when it is not loaded (a cold load), seconds to put it to sleep
         (`POST /models/sleep`), time to first token of a request while it sleeps (the gateway
         wakes it); the stub's resident memory awake and asleep
thrash   three cortex-tiny copies on a node whose budget holds two; a request trace that keeps
         switching between them in bursts (as agents on different models do), dealt to
         `AGENTS` agents that run at once, each one request after another with a short pause
         (a tool call) between; variants side by side, in this order, in every repeat:
         (a) host budget 0 (every eviction unloads: the unload-based tier of before), no swap
             bound, no min_resident_s;
         (b) room to sleep, no swap bound, no min_resident_s (the sleep tier alone);
         (c) room to sleep with swap-aware queueing: min_resident_s and max_swap_wait_s as in
             `QUEUEING`.
         Total time, time to first token p50 / p95 / max (the max against the bound), and
         the switches the gateway made (loads + wakes). `--warm`: each model is asked for once
         before the clock starts, so the timed part is the switching alone, not the three
         first cold loads every variant pays alike.
Results go to benchmarks/results/sleep_wake[-quick|-thrash].json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import psutil

from benchmarks.harness import API_KEY, bench_gateway, machine
from cortex.config import EngineKind, EvictionSection, ModelProfile
from cortex.demo.smollm2 import ensure_smollm2, gguf_path
from cortex.demo.tiny_model import ensure_tiny_model
from cortex.launch import Gateway, Neuron, loopback_neuron, running_neuron

RESULTS = Path(__file__).resolve().parent / "results"
NODE = "bench-node"
AGENTS = 3
THINK_S = 0.2  # an agent's pause between two requests (its tool call)
# No bound (longer than any run) and no min_resident_s: the rules before swap-aware queueing.
UNQUEUED = EvictionSection(max_swap_wait_s=3600.0)
QUEUEING = EvictionSection(min_resident_s=1.5, max_swap_wait_s=8.0)


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


def bursts(length: int) -> list[list[str]]:
    """Bursts of two to four requests, switching models in a fixed pseudo-random order."""
    order = ["a", "b", "a", "c", "b", "c", "a", "b", "c", "c", "a", "b"]
    found: list[list[str]] = []
    index = 0
    while sum(map(len, found)) < length:
        found.append([order[index % len(order)]] * (2 + index % 3))
        index += 1
    left = length - sum(map(len, found[:-1]))
    found[-1] = found[-1][:left]
    return found


def trace(length: int) -> list[str]:
    return [model for burst in bursts(length) for model in burst]


def agents(length: int) -> list[list[str]]:
    """The trace's bursts dealt round-robin to `AGENTS` agents."""
    dealt: list[list[str]] = [[] for _ in range(AGENTS)]
    for index, burst in enumerate(bursts(length)):
        dealt[index % AGENTS] += burst
    return dealt


def switches(gateway: Gateway) -> float:
    """Loads and wakes the gateway has made so far."""
    total = 0.0
    for line in httpx.get(gateway.metrics_url, timeout=30).text.splitlines():
        if line.startswith("cortex_wakes_total{") or (
            line.startswith("cortex_model_loads_total{") and 'outcome="ok"' in line
        ):
            total += float(line.rsplit(" ", 1)[1])
    return total


def thrash(
    folder: Path,
    length: int,
    host_budget_mib: int,
    name: str,
    eviction: EvictionSection,
    warm: bool = False,
) -> dict[str, Any]:
    tiny = ensure_tiny_model()
    models = [ModelProfile(name=m, source=str(tiny), kv_cache_tokens=2048) for m in "abc"]
    config = loopback_neuron(folder / name, NODE, models, memory_budget_mib=[1400])
    settings = config.neuron.model_copy(update={"host_memory_budget_mib": host_budget_mib})
    config = config.model_copy(update={"neuron": settings})

    def agent(sequence: list[str], gateway: Gateway) -> list[float]:
        times = []
        for model in sequence:
            times.append(first_token(gateway, model))
            time.sleep(THINK_S)
        return times

    with (
        running_neuron(config) as neuron,
        bench_gateway(folder / name, neuron, eviction=eviction) as gateway,
        ThreadPoolExecutor(AGENTS) as pool,
    ):
        for model in "abc" if warm else "":
            first_token(gateway, model)
        before = switches(gateway)
        started = time.perf_counter()
        runs = list(pool.map(lambda sequence: agent(sequence, gateway), agents(length)))
        total = time.perf_counter() - started
        made = switches(gateway) - before
    ttft = [t for run in runs for t in run]
    quantiles = statistics.quantiles(ttft, n=20, method="inclusive")  # never beyond the max
    row = {
        "total_s": total,
        "ttft_p50_s": statistics.median(ttft),
        "ttft_p95_s": quantiles[-1],
        "ttft_max_s": max(ttft),
        "requests": len(ttft),
        "agents": AGENTS,
        "warm": warm,
        "switches": made,
        "min_resident_s": eviction.min_resident_s,
        "max_swap_wait_s": eviction.max_swap_wait_s,
    }
    print(name, row, flush=True)
    return row


VARIANTS = {  # name: (host budget MiB, eviction)
    "unload": (0, UNQUEUED),
    "sleep": (4096, UNQUEUED),
    "sleep_queued": (4096, QUEUEING),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--thrash-only", action="store_true", help="skip the swap section")
    parser.add_argument("--repeats", type=int, help="thrash repeats (default: repetitions)")
    parser.add_argument("--length", type=int, help="requests in the thrash trace")
    parser.add_argument("--warm", action="store_true", help="each model once before the clock")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    repetitions, length = (1, 12) if args.quick else (3, 36)
    length = args.length or length
    report: dict[str, Any] = {"machine": machine(), "length": length}
    with tempfile.TemporaryDirectory(prefix="cortex-sleep-") as folder:
        root = Path(folder)
        if not args.thrash_only:
            report["swap"] = swap(root, repetitions)
        for repeat in range(args.repeats or repetitions):
            for name, (budget, eviction) in VARIANTS.items():
                row = thrash(root / str(repeat), length, budget, name, eviction, args.warm)
                report.setdefault(f"thrash_{name}", []).append(row)
    suffix = "-quick" if args.quick else "-thrash" if args.thrash_only else ""
    suffix += "-warm" if args.warm else ""
    out = args.out or RESULTS / f"sleep_wake{suffix}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    summarise(report)


def summarise(report: dict[str, Any]) -> None:
    print("model          cold_ttft  sleep   wake_ttft  ×cold/wake   rss awake→asleep MiB")
    for model, runs in report.get("swap", {}).items():
        cold = statistics.median(r["cold_first_token_s"] for r in runs)
        wake = statistics.median(r["wake_first_token_s"] for r in runs)
        slept = statistics.median(r["sleep_s"] for r in runs)
        rss = runs[-1]["rss_awake_bytes"] / 2**20, runs[-1]["rss_asleep_bytes"] / 2**20
        print(
            f"{model:14} {cold:8.2f}s {slept:6.2f}s {wake:8.3f}s {cold / wake:9.1f}   "
            f"{rss[0]:.0f}→{rss[1]:.0f}"
        )
    unload = report["thrash_unload"]
    for name in VARIANTS:
        for row, base in zip(report[f"thrash_{name}"], unload, strict=True):
            print(
                f"thrash {name:13} {row['total_s']:6.1f}s p50 {row['ttft_p50_s']:.2f} "
                f"p95 {row['ttft_p95_s']:.2f} max {row['ttft_max_s']:.2f} "
                f"(bound {row['max_swap_wait_s']:.0f}s) switches {row.get('switches', '?')} "
                f"×(a) {row['total_s'] / base['total_s']:.2f}"
            )


if __name__ == "__main__":
    main()
