"""Priority and per-key limits (issue 33), on CPU.

    python -m benchmarks.priority            # 3 repeats of idle / priority off / priority on
    python -m benchmarks.priority --quick    # 1 repeat, fewer requests

**Priority.** The torch engine (cortex-tiny, float32 on CPU, `max_batch_size` 8) is driven in
this process, its engine thread running as on a neuron: a saturating batch-class load — 16
closed-loop streams, each resubmitting as soon as its request ends, so 8 run and 8 wait at all
times — and one interactive client sending short requests one after another. Its time to first
token (submit → first generated token) is measured three ways in the same run: alone (idle),
under the load with every request in one class (priority off: what the engine did before), and
with the load in the batch class (priority on). Modes alternate within each repeat so the
machine's load affects them alike. Target: p95 with priority on ≤ 1.5 × idle p95.

**Limits.** The gateway's limiter (`control_plane.limits`) under about twice its limit, rpm
and tpm each alone, on a simulated clock (10 minutes, 240 arrivals a minute at random times,
prompts of 100–500 tokens, outputs of 50–300 tokens counted when each request ends 2–20 s
later): what it admitted per minute in the steady minutes (the first fills an empty window),
and in the worst rolling minute. The end-to-end promise
(no request beyond a key's limits reaches a node) is held by tests/gateway/test_keys.py.

Results go to benchmarks/results/priority[-quick].json; BENCHMARKS.md has the table.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from control_plane.limits import KeyLimiter, Limits

RESULTS = Path(__file__).resolve().parent / "results"
INTERACTIVE, BATCH = 0, 1


@dataclass
class Load:
    streams: int = 16
    batch_prompt: int = 96
    batch_new: int = 64
    interactive_prompt: int = 48
    interactive_new: int = 4
    interactive_requests: int = 24
    gap_s: float = 0.15


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


def run_mode(engine: Any, load: Load, mode: str, seed: int) -> list[float]:
    """Interactive TTFTs (seconds) with the batch load off (`idle`) or on, in one class (`off`)
    or as the batch class (`on`)."""
    from neuron_agent.torch_engine.scheduler import GenerationRequest

    rng = random.Random(seed)
    vocabulary = range(10, 900)
    stop = threading.Event()
    batch_priority = BATCH if mode == "on" else INTERACTIVE

    def batch_stream() -> None:
        while not stop.is_set():
            done = threading.Event()
            engine.submit(
                GenerationRequest(
                    prompt=[1, *rng.choices(vocabulary, k=load.batch_prompt)],
                    max_new_tokens=load.batch_new,
                    emit=lambda _tokens, final, done=done: final and done.set(),  # type: ignore[misc]
                    fail=lambda _message, done=done: done.set(),  # type: ignore[misc]
                    priority=batch_priority,
                )
            )
            done.wait()

    streams = [threading.Thread(target=batch_stream, daemon=True) for _ in range(load.streams)]
    if mode != "idle":
        for stream in streams:
            stream.start()
        time.sleep(2.0)  # the batch fills and its queue forms
    ttfts: list[float] = []
    for _ in range(load.interactive_requests):
        finished = threading.Event()
        sent = time.perf_counter()
        got: list[float] = []

        def emit(
            tokens: list[int], final: bool, got: list[float] = got, finished: Any = finished
        ) -> None:
            if tokens and not got:
                got.append(time.perf_counter())
            if final:
                finished.set()

        engine.submit(
            GenerationRequest(
                prompt=[1, *rng.choices(vocabulary, k=load.interactive_prompt)],
                max_new_tokens=load.interactive_new,
                emit=emit,
                fail=lambda _message, finished=finished: finished.set(),  # type: ignore[misc]
                priority=INTERACTIVE,
            )
        )
        finished.wait(300)
        ttfts.append(got[0] - sent)
        time.sleep(load.gap_s)
    stop.set()
    for stream in streams:
        if stream.is_alive():
            stream.join(300)
    return ttfts


def bench_priority(repeats: int, load: Load) -> dict[str, Any]:
    from cortex.demo import tiny_model
    from neuron_agent.torch_engine.loader import EngineOptions, build_engine

    engine = build_engine(
        EngineOptions(
            tiny_model.ensure_tiny_model(),
            kv_cache_tokens=16384,
            max_batch_size=8,
            max_queue_size=64,
            # As deployed: a preempted batch sequence resumes from the prefix cache. The prompts
            # are fresh random ids, so the interactive ones find nothing to reuse.
        )
    )
    engine.start()
    runs: dict[str, list[dict[str, float]]] = {"idle": [], "off": [], "on": []}
    try:
        for repeat in range(repeats):
            order = ["idle", "off", "on"] if repeat % 2 == 0 else ["on", "off", "idle"]
            for mode in order:
                ttfts = run_mode(engine, load, mode, seed=repeat * 10 + len(mode))
                summary = {
                    "p50_ms": 1000 * statistics.median(ttfts),
                    "p95_ms": 1000 * percentile(ttfts, 0.95),
                    "max_ms": 1000 * max(ttfts),
                }
                runs[mode].append(summary)
                print(
                    f"repeat {repeat + 1} {mode:>4}: p50 {summary['p50_ms']:8.1f} ms  "
                    f"p95 {summary['p95_ms']:8.1f} ms",
                    flush=True,
                )
        stats = engine.stats()
    finally:
        engine.stop()
    return {"load": load.__dict__, "runs": runs, "preemptions": stats["preemptions"]}


def bench_limit(limits: Limits, minutes: int, seed: int = 7) -> dict[str, Any]:
    """One key's limiter against about twice its limit, on a simulated clock: arrivals at 240
    a minute, prompts of 100–500 tokens, outputs of 50–300 counted when the request ends."""
    rng = random.Random(seed)
    limiter = KeyLimiter(limits)
    duration = 60.0 * minutes
    arrivals = sorted(rng.uniform(0, duration) for _ in range(240 * minutes))
    ends: list[tuple[float, int]] = []  # (when, output tokens) of admitted requests
    requests_at: list[float] = []
    tokens: list[tuple[float, int]] = []  # (when, tokens counted then)
    for now in arrivals:
        while ends and ends[0][0] <= now:
            when, output = ends.pop(0)
            limiter.finish(when, output)
            tokens.append((when, output))
        prompt = rng.randint(100, 500)
        if limiter.admit(now, prompt) is None:
            requests_at.append(now)
            tokens.append((now, prompt))
            ends.append((now + rng.uniform(2, 20), rng.randint(50, 300)))
            ends.sort()

    def worst_minute(events: list[tuple[float, int]]) -> int:
        return max(sum(n for t, n in events if start <= t < start + 60) for start, _ in events)

    # The first minute fills an empty window and the last one leaves outputs uncounted: the
    # steady rate is read from the minutes between.
    steady = [(t, n) for t, n in tokens if 60 <= t < duration - 60]
    steady_requests = [t for t in requests_at if 60 <= t < duration - 60]
    return {
        "rpm": limits.rpm,
        "tpm": limits.tpm,
        "minutes": minutes,
        "offered_requests_per_minute": len(arrivals) / minutes,
        "admitted_requests_per_minute": len(steady_requests) / (minutes - 2),
        "worst_minute_requests": worst_minute([(t, 1) for t in requests_at]),
        "tokens_per_minute": sum(n for _, n in steady) / (minutes - 2),
        "worst_minute_tokens": worst_minute(tokens),
    }


def bench_limits(minutes: int) -> dict[str, Any]:
    """rpm alone (120 against 240 offered), then tpm alone (60,000 against ~114,000 offered)."""
    return {
        "rpm": bench_limit(Limits(rpm=120), minutes),
        "tpm": bench_limit(Limits(tpm=60_000), minutes),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path)
    parser.add_argument(
        "--limits-only", action="store_true", help="rerun the limiter part into an existing --out"
    )
    args = parser.parse_args()
    out = args.out or RESULTS / f"priority{'-quick' if args.quick else ''}.json"
    if args.limits_only:
        result = json.loads(out.read_text())
        result["limits"] = bench_limits(3 if args.quick else 10)
        out.write_text(json.dumps(result, indent=1))
        print(json.dumps(result["limits"]))
        return
    load = Load(interactive_requests=8) if args.quick else Load()
    repeats = 1 if args.quick else 3
    result = {
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "priority": bench_priority(repeats, load),
        "limits": bench_limits(3 if args.quick else 10),
    }
    out.write_text(json.dumps(result, indent=1))
    runs = result["priority"]["runs"]
    idle = statistics.median(r["p95_ms"] for r in runs["idle"])
    on = statistics.median(r["p95_ms"] for r in runs["on"])
    off = statistics.median(r["p95_ms"] for r in runs["off"])
    rpm, tpm = result["limits"]["rpm"], result["limits"]["tpm"]
    print(
        f"idle_p95_ms={idle:.1f} off_p95_ms={off:.1f} on_p95_ms={on:.1f} "
        f"on_over_idle={on / idle:.2f} "
        f"rpm_held={rpm['admitted_requests_per_minute'] / rpm['rpm']:.3f} "
        f"tpm_held={tpm['tokens_per_minute'] / tpm['tpm']:.3f}"
    )


if __name__ == "__main__":
    main()
