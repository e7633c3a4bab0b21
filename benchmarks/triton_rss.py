"""tritonserver's resident memory against requests served (issue 15, defect 7).

A neuron agent (its own tritonserver) serves one model; streamed requests are sent in rounds by
one of three clients, and tritonserver's RSS (the server process alone, not its Python stubs) is
sampled after every round:

    gateway      through a gateway (`cortex serve`), OpenAI streaming: the production path
    grpc         cortex's own Triton stream (control_plane.node_client.TritonStream), direct
    tritonclient tritonclient's own streaming call (start_stream / async_stream_infer), direct

and one of two models: `torch` (the torch engine on cortex-tiny, as benchmarks/cold_load.py
serves it) or `fake` (the fixed-rate fake,
a decoupled Python-backend model with no engine behind it). Comparing the rows says whose the
growth is: the gateway's way of calling, the engine's backend model, or Triton itself.

    python -m benchmarks.triton_rss --client grpc --model fake --requests 1000

Bounded on purpose (the machines are shared): a few thousand requests at most.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import queue
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from benchmarks import cold_load
from benchmarks.gateway_overhead import MODEL as FAKE_MODEL
from benchmarks.gateway_overhead import fake_models
from benchmarks.harness import API_KEY, bench_gateway, bench_neuron, machine
from control_plane.node_client import GenerationParams, TritonStream
from cortex.launch import Neuron

PROMPT = [11, 12, 13, 14, 15, 16]  # a short prompt; the ids only have to be in every vocabulary
MAX_TOKENS = 16


def triton_rss(neuron: Neuron) -> int:
    (server,) = [p for p in neuron.triton_processes() if p.name() == "tritonserver"]
    return int(server.memory_info().rss)


async def via_gateway(url: str, model: str, count: int, concurrency: int) -> None:
    body = {
        "model": model,
        "stream": True,
        "max_tokens": MAX_TOKENS,
        "messages": [{"role": "user", "content": "Tell me about lists."}],
    }
    headers = {"authorization": f"Bearer {API_KEY}"}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=120) as client:

        async def one() -> None:
            async with client.stream("POST", "/v1/chat/completions", json=body) as response:
                response.raise_for_status()
                async for _ in response.aiter_lines():
                    pass

        await _spread(one, count, concurrency)


async def via_grpc(grpc_url: str, model: str, count: int, concurrency: int, round_: int) -> None:
    stream = TritonStream(grpc_url)
    params = GenerationParams(max_tokens=MAX_TOKENS, end_ids=(0,), pad_id=0)
    numbers = iter(range(count))

    async def one() -> None:
        request_id = f"rss-{round_}-{next(numbers)}"
        async for _ in stream.generate(model, PROMPT, params, request_id):
            pass

    try:
        await _spread(one, count, concurrency)
    finally:
        await stream.close()


def via_tritonclient(grpc_url: str, model: str, count: int) -> None:
    """tritonclient's streaming call, one request at a time on one stream (its API is one
    callback per stream), each waited for until its final response."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(grpc_url)
    done: queue.Queue[Any] = queue.Queue()

    def tensor(name: str, value: Any, dtype: Any, datatype: str) -> Any:
        data = np.array(value, dtype=dtype)
        item = grpcclient.InferInput(name, list(data.shape), datatype)
        item.set_data_from_numpy(data)
        return item

    inputs = [
        tensor("input_ids", [PROMPT], np.int32, "INT32"),
        tensor("input_lengths", [[len(PROMPT)]], np.int32, "INT32"),
        tensor("request_output_len", [[MAX_TOKENS]], np.int32, "INT32"),
        tensor("end_id", [[0]], np.int32, "INT32"),
        tensor("pad_id", [[0]], np.int32, "INT32"),
        tensor("streaming", [[True]], bool, "BOOL"),
    ]

    def callback(result: Any, error: Any) -> None:
        if error is not None:
            done.put(error)
            return
        final = result.get_response().parameters.get("triton_final_response")
        if final is not None and final.bool_param:
            done.put(None)

    client.start_stream(callback=callback)
    try:
        for number in range(count):
            client.async_stream_infer(model, inputs, request_id=f"tc-{number}")
            error = done.get(timeout=60)
            if error is not None:
                raise RuntimeError(str(error))
    finally:
        client.stop_stream()
        client.close()


async def _spread(one: Any, count: int, concurrency: int) -> None:
    pending = iter(range(count))

    async def worker() -> None:
        for _ in pending:
            await one()

    await asyncio.gather(*(worker() for _ in range(concurrency)))


def run(args: argparse.Namespace) -> dict[str, Any]:
    model = FAKE_MODEL if args.model == "fake" else cold_load.MODEL
    samples: list[tuple[int, int]] = []
    with tempfile.TemporaryDirectory(prefix="cortex-rss-") as scratch:
        folder = Path(scratch)
        models = fake_models(folder) if args.model == "fake" else cold_load.models()
        with bench_neuron(folder / "node", models) as neuron:
            load = httpx.post(f"{neuron.url}/models/load", json={"model": model}, timeout=600)
            load.raise_for_status()
            gateway_cm = bench_gateway(folder, neuron) if args.client == "gateway" else None
            gateway = gateway_cm.__enter__() if gateway_cm is not None else None
            try:
                served = 0
                rounds = max(1, args.requests // args.every)
                for round_ in range(rounds + 1):  # round 0 is the warm-up
                    started = time.monotonic()
                    if args.client == "gateway":
                        assert gateway is not None
                        asyncio.run(via_gateway(gateway.url, model, args.every, args.concurrency))
                    elif args.client == "grpc":
                        asyncio.run(
                            via_grpc(
                                neuron.triton_grpc, model, args.every, args.concurrency, round_
                            )
                        )
                    else:
                        via_tritonclient(neuron.triton_grpc, model, args.every)
                    if round_ > 0:
                        served += args.every
                    rss = triton_rss(neuron)
                    samples.append((served, rss))
                    print(
                        f"{served:6d} requests  tritonserver RSS {rss / 2**20:7.1f} MiB  "
                        f"({time.monotonic() - started:.1f} s)",
                        flush=True,
                    )
            finally:
                if gateway_cm is not None:
                    gateway_cm.__exit__(None, None, None)
    after_warm_up = samples[1:] if len(samples) > 2 else samples
    first, last = after_warm_up[0], after_warm_up[-1]
    per_request = (last[1] - first[1]) / max(1, last[0] - first[0])
    return {
        "client": args.client,
        "model": args.model,
        "concurrency": args.concurrency,
        "max_tokens": MAX_TOKENS,
        "samples": [{"requests": n, "rss_bytes": rss} for n, rss in samples],
        "growth_bytes_per_request_after_warm_up": round(per_request, 1),
        "machine": machine(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--client", choices=("gateway", "grpc", "tritonclient"), default="grpc")
    parser.add_argument("--model", choices=("torch", "fake"), default="fake")
    parser.add_argument("--requests", type=int, default=1000, help="after a warm-up round")
    parser.add_argument("--every", type=int, default=200, help="requests per RSS sample")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--out", type=Path, help="write the result as JSON here")
    args = parser.parse_args()
    if args.requests > 5000:
        parser.error("--requests: at most 5000 (the machines are shared)")
    result = run(args)
    print(f"growth after warm-up: {result['growth_bytes_per_request_after_warm_up']} B/request")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
