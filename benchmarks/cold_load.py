"""Cold load: from a request for a model nobody has loaded to its first token, against the time
Triton alone takes to load the same model.

    python -m benchmarks.cold_load            # 5 repetitions
    python -m benchmarks.cold_load --quick    # 1 repetition

The model is cortex-tiny on the real torch engine (a Triton Python-backend model, CPU), behind a
real neuron agent and a real gateway (`cortex serve --config`, default poll interval) on
loopback. Each repetition measures, with the model unloaded before each step:

1. Triton alone: `POST /v2/repository/models/cortex-tiny/load` straight to the node's Triton
   (the model directory the neuron materialised), until it answers — Triton answers once the
   model is READY. Then it is unloaded the same way.
2. One request through the gateway (OpenAI, streaming): time to its first content token.
3. Ten requests at once: time to first token of each (they share one load).

The first repetition's gateway has never seen the model, so it also fetches and builds the
tokenizer; later ones have it cached. Load times vary by a few tenths of a second from one load
to the next, so the summary compares medians over the repetitions. Target: first token ≤
Triton's own load time + 10 %.
Results go to benchmarks/results/cold_load[-quick].json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from benchmarks.harness import bench_gateway, bench_neuron, machine
from cortex.config import ModelProfile
from cortex.demo.tiny_model import ensure_tiny_model
from cortex.launch import Gateway, Neuron
from cortex.secrets import TRITON_KEY_HEADER, triton_key

MODEL = "cortex-tiny"
# The node's token: its neuron API and (through the key derived from it) its Triton need it.
TOKEN = "bench-cold-load"
NEURON = {"authorization": f"Bearer {TOKEN}"}
TRITON = {TRITON_KEY_HEADER: triton_key(TOKEN)}
WAITING = 10
RESULTS = Path(__file__).resolve().parent / "results"
BODY = {
    "model": MODEL,
    "messages": [{"role": "user", "content": "Say hello."}],
    "max_tokens": 4,
    "temperature": 0,
    "stream": True,
}


def models() -> list[ModelProfile]:
    return [
        ModelProfile(
            name=MODEL,
            source=str(ensure_tiny_model()),
            context_length=4096,
            kv_cache_tokens=16384,
            max_batch_size=16,
        )
    ]


async def first_token(client: httpx.AsyncClient, gateway: Gateway) -> float:
    """Seconds from sending one streaming request to its first content chunk."""
    started = time.perf_counter()
    headers = {"x-api-key": gateway.api_key}
    async with client.stream(
        "POST", f"{gateway.url}/v1/chat/completions", json=BODY, headers=headers
    ) as response:
        if response.status_code != 200:
            raise RuntimeError(f"{response.status_code}: {(await response.aread())[:300]!r}")
        first = None
        async for line in response.aiter_lines():
            content = '"content":"' in line and '"content":""' not in line
            if first is None and line.startswith("data: {") and content:
                first = time.perf_counter() - started
    if first is None:
        raise RuntimeError("the stream had no content")
    return first


async def through_gateway(gateway: Gateway, count: int) -> list[float]:
    async with httpx.AsyncClient(timeout=600) as client:
        return list(await asyncio.gather(*(first_token(client, gateway) for _ in range(count))))


def triton_load(neuron: Neuron) -> float:
    started = time.perf_counter()
    response = httpx.post(
        f"{neuron.triton_http}/v2/repository/models/{MODEL}/load", headers=TRITON, timeout=600
    )
    seconds = time.perf_counter() - started
    response.raise_for_status()
    httpx.post(
        f"{neuron.triton_http}/v2/repository/models/{MODEL}/unload", headers=TRITON, timeout=600
    )
    _wait_stub_gone(neuron)
    return seconds


def _wait_stub_gone(neuron: Neuron, timeout: float = 60) -> None:
    """Triton answers an unload before the model's stub process has exited."""
    deadline = time.monotonic() + timeout
    while any("stub" in p.name() for p in neuron.triton_processes()):
        if time.monotonic() > deadline:
            raise TimeoutError("the model's stub process did not exit")
        time.sleep(0.1)


def unload(neuron: Neuron, gateway: Gateway) -> None:
    """Unload through the neuron and wait until the gateway's fleet view has it unloaded."""
    response = httpx.post(
        f"{neuron.url}/models/unload", json={"model": MODEL}, headers=NEURON, timeout=600
    )
    if response.status_code not in (200, 404):
        response.raise_for_status()
    _wait_stub_gone(neuron)
    deadline = time.monotonic() + 60
    while True:
        models = httpx.get(
            f"{gateway.url}/v1/models", headers={"x-api-key": gateway.api_key}, timeout=10
        ).json()["data"]
        if not next(m for m in models if m["id"] == MODEL)["loaded_on"]:
            return
        if time.monotonic() > deadline:
            raise TimeoutError("the gateway still sees the model loaded")
        time.sleep(0.1)


def run(repetitions: int) -> dict[str, Any]:
    report: dict[str, Any] = {"machine": machine(), "repetitions": []}
    with contextlib.ExitStack() as stack:
        folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="cortex-cold-")))
        neuron = stack.enter_context(bench_neuron(folder, models(), token=TOKEN))
        # The neuron materialises the model directory on its first load; Triton alone can then
        # load it from there.
        for action in ("load", "unload"):
            httpx.post(
                f"{neuron.url}/models/{action}", json={"model": MODEL}, headers=NEURON, timeout=600
            )
        _wait_stub_gone(neuron)
        gateway = stack.enter_context(bench_gateway(folder, neuron))
        for number in range(repetitions):
            triton = triton_load(neuron)
            one = asyncio.run(through_gateway(gateway, 1))[0]
            unload(neuron, gateway)
            many = asyncio.run(through_gateway(gateway, WAITING))
            unload(neuron, gateway)
            row = {
                "tokenizer_cached": number > 0,
                "triton_load_s": triton,
                "one_request_first_token_s": one,
                "ten_requests_first_token_s": sorted(many),
                "one_vs_triton": one / triton,
                "ten_last_vs_triton": max(many) / triton,
            }
            report["repetitions"].append(row)
            print(
                f"rep {number + 1}: Triton alone {triton:.2f} s | 1 request {one:.2f} s "
                f"(x{one / triton:.2f}) | 10 requests first {min(many):.2f} "
                f"median {statistics.median(many):.2f} last {max(many):.2f} s "
                f"(x{max(many) / triton:.2f})" + ("" if number else "  [tokenizer not cached]"),
                flush=True,
            )
        rows = report["repetitions"]
        triton = statistics.median(r["triton_load_s"] for r in rows)
        one = statistics.median(r["one_request_first_token_s"] for r in rows)
        ten = statistics.median(max(r["ten_requests_first_token_s"]) for r in rows)
        report["median"] = {
            "triton_load_s": triton,
            "one_request_first_token_s": one,
            "ten_requests_last_first_token_s": ten,
            "one_vs_triton": one / triton,
            "ten_vs_triton": ten / triton,
        }
        print(
            f"median: Triton alone {triton:.2f} s | 1 request {one:.2f} s (x{one / triton:.2f}) "
            f"| last of 10 {ten:.2f} s (x{ten / triton:.2f})"
        )
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one repetition")
    parser.add_argument("--out", type=Path, help="where the JSON results go")
    args = parser.parse_args()
    report = run(1 if args.quick else 5)
    out = args.out or RESULTS / f"cold_load{'-quick' if args.quick else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    print(f"results: {out}")


if __name__ == "__main__":
    main()
