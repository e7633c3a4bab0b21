"""Many agent sessions on one engine, the prefix cache's host tier off and on (issue 31).

    python -m benchmarks.many_sessions             # 12 sessions × 6 turns, cortex-tiny, CPU
    python -m benchmarks.many_sessions --quick     # 6 sessions × 3 turns

Claude-Code-shaped sessions scaled down for a CPU: every session's first prompt is a shared
system prefix (tools and instructions, as every Claude Code session sends) and its own first
task, and each later turn appends the model's answer and a tool result. The sessions run side
by side: turn t of every session is sent at once, then turn t + 1, so the sessions take turns
in the KV cache as a team's agents do. The device KV budget holds about a third of all the
sessions' final prompts; the host tier (when on) holds all of them.

The engine runs in this process (the torch engine on CPU, no Triton, no gateway: what is
measured is the cache), twice per repeat, host tier off and on, alternating. Reported per
configuration: the prefix hit rate of turns 2+ (prompt tokens read from the cache, either tier,
over prompt tokens), how many came from host memory, and time to first token (submit to first
token) p50 / p95 over turns 2+. Results: benchmarks/results/many_sessions[-quick].json.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import torch

from cortex.demo.tiny_model import ensure_tiny_model
from neuron_agent.torch_engine.loader import EngineOptions, build_engine
from neuron_agent.torch_engine.scheduler import Engine, GenerationRequest

RESULTS = Path(__file__).resolve().parent / "results"


class Turn:
    def __init__(self) -> None:
        self.sent = time.perf_counter()
        self.first: float | None = None
        self.tokens: list[int] = []
        self.cached = 0
        self.done = threading.Event()

    def emit(self, tokens: list[int], final: bool) -> None:
        if tokens and self.first is None:
            self.first = time.perf_counter()
        self.tokens.extend(tokens)
        if final:
            self.done.set()

    def fail(self, message: str) -> None:
        raise RuntimeError(message)

    def admitted(self, cached: int) -> None:
        self.cached = cached


def ids(count: int, seed: int) -> list[int]:
    generator = random.Random(seed)
    return [generator.randrange(8, 4000) for _ in range(count)]


def run_sessions(
    engine: Engine, sessions: int, turns: int, shape: dict[str, int]
) -> dict[str, Any]:
    system = ids(shape["system"], seed=1)
    prompts = [system + ids(shape["task"], seed=100 + s) for s in range(sessions)]
    ttft: list[float] = []
    cached = prompt_tokens = 0
    host_before = engine.prefix_hit_tokens_host
    for turn in range(turns):
        running = []
        for session in range(sessions):
            record = Turn()
            engine.submit(
                GenerationRequest(
                    prompt=list(prompts[session]),
                    max_new_tokens=shape["answer"],
                    emit=record.emit,
                    fail=record.fail,
                    admitted=record.admitted,
                )
            )
            running.append(record)
        for session, record in enumerate(running):
            assert record.done.wait(600), "a turn did not finish"
            assert record.first is not None
            if turn > 0:
                ttft.append(record.first - record.sent)
                cached += record.cached
                prompt_tokens += len(prompts[session])
            # The next turn: the answer, then a tool result.
            prompts[session] += record.tokens + ids(
                shape["tool_result"], seed=turn * 1000 + session
            )
    return {
        "hit_rate": cached / prompt_tokens,
        "host_share": (engine.prefix_hit_tokens_host - host_before) / max(1, cached),
        "ttft_p50_ms": 1000 * statistics.median(ttft),
        "ttft_p95_ms": 1000 * statistics.quantiles(ttft, n=20)[-1],
        "final_prompt_tokens": statistics.mean(len(p) for p in prompts),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    sessions, turns = (6, 3) if args.quick else (12, 6)
    shape = {"system": 256, "task": 256, "answer": 16, "tool_result": 64}
    final = shape["system"] + shape["task"] + (turns - 1) * (shape["answer"] + shape["tool_result"])
    # A third of the sessions' own tokens, plus the shared system prefix once.
    device_tokens = (sessions * (final - shape["system"]) // 3 + shape["system"]) // 16 * 16
    host_bytes = 256 * 2**20  # every session's blocks, several times over
    torch.set_num_threads(2)
    tiny = ensure_tiny_model()
    rows: list[dict[str, Any]] = []
    for repeat in range(args.repeats):
        for host in (0, host_bytes):
            engine = build_engine(
                EngineOptions(
                    tiny,
                    kv_cache_tokens=device_tokens,
                    max_batch_size=4,
                    host_kv_cache_bytes=host,
                )
            )
            engine.start()
            try:
                row = run_sessions(engine, sessions, turns, shape)
            finally:
                engine.stop()
            row |= {"repeat": repeat, "host_tier": bool(host)}
            rows.append(row)
            print(
                f"repeat {repeat} host tier {'on ' if host else 'off'}: "
                f"hit rate {row['hit_rate']:.3f} (host {row['host_share']:.2f}), "
                f"TTFT p50 {row['ttft_p50_ms']:.1f} ms, p95 {row['ttft_p95_ms']:.1f} ms",
                flush=True,
            )
    result = {
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}, CPU",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "sessions": sessions,
        "turns": turns,
        "shape": shape,
        "device_kv_tokens": device_tokens,
        "host_kv_bytes": host_bytes,
        "rows": rows,
    }
    RESULTS.mkdir(exist_ok=True)
    name = "many_sessions-quick.json" if args.quick else "many_sessions.json"
    (RESULTS / name).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
