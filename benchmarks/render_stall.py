"""Does rendering long prompts stall the gateway's event loop? A thread with the tokenizer's
GIL-releasing batch encode (what the gateway does) against a process pool (issue 31).

    python -m benchmarks.render_stall            # 24 renders of turn-10 Claude Code prompts
    python -m benchmarks.render_stall --quick

The prompts are benchmarks/claude_code_trace.py's Claude Code requests (turn 10: ~60k
characters, 12 tools), translated as the gateway does and rendered with cortex-tiny's chat
template and tokenizer. While `--concurrency` renders at a time run, a ticker on the event loop
sleeps 1 ms again and again and records how late each wake-up is: what every other stream on
the loop would wait. Modes:

- `inline`: on the loop (the reference for a stall);
- `to_thread`: `asyncio.to_thread(tokenizer.render)` (the default executor: as many at once as
  there are requests), the template under the GIL, the encode without it (`encode_batch`);
- `thread`: the same in a `ThreadPoolExecutor` of 2 workers (as many renders at once as the
  process pool);
- `process`: a `ProcessPoolExecutor` of 2 workers, each with its own tokenizer; the request
  goes in pickled and the ids come back pickled.

Reported per mode (3 repeats each, alternating): renders per second and the ticker's lateness
p50 / p99 / max in ms. Results: benchmarks/results/render_stall[-quick].json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from benchmarks.claude_code_trace import Conversation
from control_plane.anthropic.protocol import MessagesRequest
from control_plane.anthropic.translate import chat_request
from control_plane.canonical import ChatRequest
from control_plane.prompting import ModelTokenizer
from cortex.demo.tiny_model import ensure_tiny_model
from cortex.neuron_api import TokenizerFiles

RESULTS = Path(__file__).resolve().parent / "results"
_worker_tokenizer: ModelTokenizer | None = None


def tokenizer_files() -> TokenizerFiles:
    tiny = ensure_tiny_model()
    names = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
    files = {n: (tiny / n).read_text() for n in names if (tiny / n).exists()}
    return TokenizerFiles(
        model="cortex-tiny", files=files, context_length=131072, eos_token_ids=[2], pad_token_id=0
    )


def _worker_start() -> None:
    global _worker_tokenizer
    _worker_tokenizer = ModelTokenizer(tokenizer_files())


def _worker_render(request: ChatRequest) -> list[int]:
    assert _worker_tokenizer is not None
    return _worker_tokenizer.render(request)


async def measure(
    mode: str,
    tokenizer: ModelTokenizer,
    pool: ProcessPoolExecutor,
    threads: ThreadPoolExecutor,
    requests: list[ChatRequest],
    concurrency: int,
) -> dict[str, float]:
    lateness: list[float] = []
    stop = asyncio.Event()

    async def ticker() -> None:
        while not stop.is_set():
            start = time.perf_counter()
            await asyncio.sleep(0.001)
            lateness.append(time.perf_counter() - start - 0.001)

    loop = asyncio.get_running_loop()
    gate = asyncio.Semaphore(concurrency)

    async def one(request: ChatRequest) -> int:
        async with gate:
            if mode == "inline":
                ids = tokenizer.render(request)
            elif mode == "to_thread":
                ids = await asyncio.to_thread(tokenizer.render, request)
            elif mode == "thread":
                ids = await loop.run_in_executor(threads, tokenizer.render, request)
            else:
                ids = await loop.run_in_executor(pool, _worker_render, request)
            return len(ids)

    tick = asyncio.create_task(ticker())
    await asyncio.sleep(0.05)
    start = time.perf_counter()
    counts = await asyncio.gather(*(one(r) for r in requests))
    elapsed = time.perf_counter() - start
    stop.set()
    await tick
    ordered = sorted(lateness)
    return {
        "renders_per_s": len(requests) / elapsed,
        "prompt_tokens": statistics.mean(counts),
        "late_p50_ms": 1000 * ordered[len(ordered) // 2],
        "late_p99_ms": 1000 * ordered[int(len(ordered) * 0.99)],
        "late_max_ms": 1000 * ordered[-1],
    }


async def run(quick: bool, concurrency: int) -> dict[str, Any]:
    count = 8 if quick else 24
    turn = 10
    requests = [
        chat_request(MessagesRequest.model_validate(Conversation(s).request(turn)), f"r{s}")
        for s in range(count)
    ]
    tokenizer = ModelTokenizer(tokenizer_files())
    rows = []
    with (
        ProcessPoolExecutor(2, initializer=_worker_start) as pool,
        ThreadPoolExecutor(2) as threads,
    ):
        await asyncio.get_running_loop().run_in_executor(pool, _worker_render, requests[0])
        tokenizer.render(requests[0])  # warm both
        for repeat in range(3):
            for mode in ("inline", "to_thread", "thread", "process"):
                row: dict[str, Any] = await measure(
                    mode, tokenizer, pool, threads, requests, concurrency
                )
                row |= {"mode": mode, "repeat": repeat}
                rows.append(row)
                print(
                    f"{mode:8s} repeat {repeat}: {row['renders_per_s']:.1f} renders/s "
                    f"({row['prompt_tokens']:.0f} tokens), loop late p50 "
                    f"{row['late_p50_ms']:.2f} p99 {row['late_p99_ms']:.2f} "
                    f"max {row['late_max_ms']:.2f} ms",
                    flush=True,
                )
    chars = statistics.mean(
        sum(len(m.content) for m in r.messages) + sum(len(t.description) for t in r.tools)
        for r in requests
    )
    return {
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}, CPU",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "requests": count,
        "turn": turn,
        "prompt_chars": chars,
        "concurrency": concurrency,
        "rows": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--concurrency", type=int, default=4)
    args = parser.parse_args()
    result = asyncio.run(run(args.quick, args.concurrency))
    RESULTS.mkdir(exist_ok=True)
    name = "render_stall-quick.json" if args.quick else "render_stall.json"
    (RESULTS / name).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
