"""Decode throughput of an engine served by Triton, measured through Triton's gRPC stream with
the same token-id requests the gateway sends (TensorRT-LLM tensor names).

    python benchmarks/engine_throughput.py --url 127.0.0.1:8001 --model llama8b \
        --concurrency 1 8 32 --prompt-tokens 128 --output-tokens 256

Reports, per concurrency: time to first token (median), decode tokens/s per request and
aggregate tokens/s (all generated tokens ÷ wall time from first send to last token).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time

from control_plane.node_client import GenerationParams, TritonStream


async def one(
    stream: TritonStream, model: str, prompt: list[int], params: GenerationParams, rid: str
) -> dict[str, float]:
    start = time.perf_counter()
    first = None
    count = 0
    async for tokens in stream.generate(model, prompt, params, rid):
        if tokens and first is None:
            first = time.perf_counter()
        count += len(tokens)
    end = time.perf_counter()
    assert first is not None
    return {
        "ttft": first - start,
        "tokens": count,
        "decode_tps": (count - 1) / max(end - first, 1e-9),
        "end": end,
        "start": start,
    }


async def run(
    url: str, model: str, concurrency: int, prompt_tokens: int, output_tokens: int, vocab: int
) -> dict[str, float]:
    stream = TritonStream(url)
    rng = random.Random(concurrency)
    # An end id the model never produces: every request runs its full length.
    params = GenerationParams(max_tokens=output_tokens, end_ids=(vocab + 7,), pad_id=0)
    await one(
        stream,
        model,
        [rng.randrange(vocab) for _ in range(16)],
        GenerationParams(max_tokens=8, end_ids=(vocab + 7,), pad_id=0),
        "warmup",
    )
    prompts = [[rng.randrange(vocab) for _ in range(prompt_tokens)] for _ in range(concurrency)]
    started = time.perf_counter()
    results = await asyncio.gather(
        *(one(stream, model, p, params, f"r{i}") for i, p in enumerate(prompts))
    )
    wall = max(r["end"] for r in results) - started
    await stream.close()
    total = sum(r["tokens"] for r in results)
    return {
        "concurrency": concurrency,
        "ttft_median_s": statistics.median(r["ttft"] for r in results),
        "decode_tps_per_request_median": statistics.median(r["decode_tps"] for r in results),
        "aggregate_tps": total / wall,
        "tokens": total,
        "wall_s": wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="127.0.0.1:8001")
    parser.add_argument("--model", required=True)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--output-tokens", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=128256)
    args = parser.parse_args()
    for concurrency in args.concurrency:
        result = asyncio.run(
            run(
                args.url,
                args.model,
                concurrency,
                args.prompt_tokens,
                args.output_tokens,
                args.vocab,
            )
        )
        print(json.dumps({"model": args.model, **result}), flush=True)


if __name__ == "__main__":
    main()
