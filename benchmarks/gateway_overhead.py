"""What the gateway adds on top of Triton: the same streaming requests sent straight to Triton's
gRPC stream and through the gateway in each dialect, against an engine of known speed.

    python -m benchmarks.gateway_overhead --quick     # < 1 minute: 64 streams, OpenAI dialect
    python -m benchmarks.gateway_overhead             # 1/16/64/256 streams, both dialects,
                                                      # CPU per request, RSS 1k → 10k requests
    python -m benchmarks.gateway_overhead --baseline REF   # also a gateway from git REF, side by
                                                           # side in the same rounds

The engine is the fixed-rate fake (tests/fakes/fixed_rate_llm, a Triton Python-backend model): its
first token leaves `FIRST_TOKEN_S` after a request reaches it, then one token every
`TOKEN_INTERVAL_S`. A real neuron agent (real tritonserver) serves it and a real gateway (`cortex
serve --config`) fronts it, on loopback. The load generator is two processes of its own, but they
share the machine's cores with the gateway and Triton (on a 2-core machine everything competes for
CPU), and so does whatever else runs there. Direct and gateway requests alternate in rounds, so
both see the same neighbours; in full mode a round waits until other processes leave the cores
alone and is run again if they disturbed it anyway (each cell reports how many cores they kept
busy, and how many rounds were repeated). The quick mode does not wait.

Added time = gateway percentile − direct percentile at the same concurrency. Throughput is
requests per second in the closed loop (concurrency ÷ mean request time, Little's law),
gateway ÷ direct. The last line of `--quick` is machine-readable:
`added_ttft_p50_ms=… added_ttft_p99_ms=… throughput_ratio=…` (64 streams, OpenAI dialect).
Results go to benchmarks/results/gateway_overhead[-quick].json (and PNG plots, full mode).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil
from tokenizers import Tokenizer

from benchmarks.harness import (
    FAKES,
    Neighbours,
    background_cores,
    bench_gateway,
    bench_neuron,
    cpu_seconds,
    machine,
    revision,
    source_tree,
    wait_for_quiet,
)
from benchmarks.loadgen import Job, Result, run_job, split
from control_plane.generation import generation_params
from control_plane.node_client import GenerationParams
from control_plane.openai.protocol import ChatCompletionRequest
from control_plane.openai.translate import chat_request
from control_plane.prompting import ModelTokenizer
from cortex.config import ModelProfile, ToolCallFormat
from cortex.demo.tiny_model import ensure_tiny_model
from cortex.launch import Gateway, Neuron
from cortex.neuron_api import TokenizerFiles

MODEL = "fixed-rate"
FIRST_TOKEN_S = 0.010
TOKEN_INTERVAL_S = 0.015
OUTPUT_TOKENS = 32
# Streams start spread over one request's length, so arrivals do not come in bursts.
STAGGER_S = FIRST_TOKEN_S + (OUTPUT_TOKENS - 1) * TOKEN_INTERVAL_S
SYSTEM = "You are a concise assistant. Answer in one short paragraph."
USER = "Tell me about the lighthouse on the northern cliffs and who keeps its lamp lit."
# Concurrency → (rounds, requests per stream per round).
FULL_CELLS = {1: (3, 15), 16: (4, 5), 64: (6, 3), 256: (2, 3)}
QUICK_CELLS = {64: (3, 4)}
MEMORY_CHECKPOINTS = (1_000, 2_000, 5_000, 10_000)
MEMORY_CONCURRENCY = 64
# The machine is shared: rounds wait for, and are repeated after, other processes busier than this.
QUIET_CORES = 0.15
MAX_REPEATS = 2
RESULTS = Path(__file__).resolve().parent / "results"
# Client processes sharing each load: one Python process reading 256 gRPC streams is itself the
# bottleneck of the direct path; two keep the client out of the way on both paths.
CLIENTS = 2


def openai_body() -> dict[str, Any]:
    return {
        "model": MODEL,
        "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": USER}],
        "max_tokens": OUTPUT_TOKENS,
        "temperature": 0,
        "stream": True,
    }


def anthropic_body() -> dict[str, Any]:
    return {
        "model": MODEL,
        "system": SYSTEM,
        "messages": [{"role": "user", "content": USER}],
        "max_tokens": OUTPUT_TOKENS,
        "temperature": 0,
        "stream": True,
    }


def fake_models(folder: Path) -> list[ModelProfile]:
    """The fixed-rate fake as a model, with cortex-tiny's tokenizer and chat template."""
    tiny = ensure_tiny_model()
    source = folder / "fixed-rate-source"
    source.mkdir(parents=True)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny / name, source / name)
    for name in ("chat_template.jinja", "generation_config.json"):
        if (tiny / name).exists():
            shutil.copy(tiny / name, source / name)
    words = Tokenizer.from_file(str(tiny / "tokenizer.json")).encode(
        " The lamp over the harbour and then back home again", add_special_tokens=False
    )
    settings = {
        "first_token_s": FIRST_TOKEN_S,
        "token_interval_s": TOKEN_INTERVAL_S,
        "token_ids": words.ids,
    }
    (source / "fixed_rate.json").write_text(json.dumps(settings), encoding="utf-8")
    return [
        ModelProfile(
            name=MODEL,
            source=str(source),
            template=str(FAKES / "fixed_rate_llm"),
            context_length=4096,
            tool_call_format=ToolCallFormat.NONE,
            max_batch_size=512,
            max_queue_size=4096,
        )
    ]


def direct_payload(neuron: Neuron) -> tuple[tuple[int, ...], GenerationParams]:
    """The prompt ids and parameters the gateway sends for the OpenAI body, made the same way."""
    files = httpx.get(f"{neuron.url}/models/{MODEL}/tokenizer", timeout=30).json()
    tokenizer = ModelTokenizer(TokenizerFiles.model_validate(files))
    chat = chat_request(ChatCompletionRequest.model_validate(openai_body()), "bench")
    prompt = tokenizer.render(chat)
    room = min(tokenizer.context_length, 4096) - len(prompt)
    return tuple(prompt), generation_params(tokenizer, chat, min(OUTPUT_TOKENS, room))


@dataclass(frozen=True)
class Target:
    label: str  # direct | openai | anthropic | openai@REF …
    dialect: str  # direct | openai | anthropic
    gateway: Gateway | None = None


@dataclass
class Tally:
    """One target's requests at one concurrency, over all rounds."""

    result: Result = field(default_factory=Result)
    sent: int = 0
    gateway_cpu_s: float = 0.0
    triton_cpu_s: float = 0.0

    def merge(self, other: Tally) -> None:
        self.add(other.result, other.sent, other.gateway_cpu_s, other.triton_cpu_s)

    def add(self, result: Result, sent: int, gateway_cpu_s: float, triton_cpu_s: float) -> None:
        self.result.merge(result)
        self.sent += sent
        self.gateway_cpu_s += gateway_cpu_s
        self.triton_cpu_s += triton_cpu_s

    def summary(self, concurrency: int) -> dict[str, Any]:
        result, done = self.result, len(self.result.total_s)
        mean_total = float(np.mean(result.total_s)) if done else float("nan")
        out = {
            "requests": done,
            "errors": len(result.errors),
            "first_errors": result.errors[:3],
            "ttft_p50_ms": 1000 * _percentile(result.ttft_s, 50),
            "ttft_p99_ms": 1000 * _percentile(result.ttft_s, 99),
            "total_p50_ms": 1000 * _percentile(result.total_s, 50),
            "total_p99_ms": 1000 * _percentile(result.total_s, 99),
            "tokens_mean": float(np.mean(result.tokens)) if done else 0.0,
            "requests_per_s": concurrency / mean_total,
            # CPU of every request sent (warm-ups included), per request.
            "triton_cpu_ms_per_request": 1000 * self.triton_cpu_s / max(1, self.sent),
            "client_cpu_ms_per_request": 1000 * result.client_cpu_s / max(1, done),
        }
        if self.gateway_cpu_s:
            out["gateway_cpu_ms_per_request"] = 1000 * self.gateway_cpu_s / max(1, self.sent)
        return out


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.array(values), q)) if values else float("nan")


class Bench:
    def __init__(self, neuron: Neuron, client: ProcessPoolExecutor, quiet: bool = False) -> None:
        self.neuron = neuron
        self.client = client
        self.quiet = quiet
        self.prompt, self.params = direct_payload(neuron)
        self.bodies = {
            "openai": json.dumps(openai_body()).encode(),
            "anthropic": json.dumps(anthropic_body()).encode(),
        }

    def job(self, target: Target, concurrency: int, per_stream: int, warm_up: bool = True) -> Job:
        if target.gateway is None:
            return Job(
                "direct",
                concurrency,
                per_stream,
                triton_grpc=self.neuron.triton_grpc,
                model=MODEL,
                prompt=self.prompt,
                params=self.params,
                warm_up=warm_up,
                stagger_s=STAGGER_S,
            )
        return Job(
            target.dialect,
            concurrency,
            per_stream,
            port=target.gateway.port,
            api_key=target.gateway.api_key,
            body=self.bodies[target.dialect],
            warm_up=warm_up,
            stagger_s=STAGGER_S,
        )

    def send(self, job: Job) -> Result:
        """Run a job on every client process at once (its streams shared between them)."""
        result = Result()
        for future in [self.client.submit(run_job, part) for part in split(job, CLIENTS)]:
            result.merge(future.result())
        return result

    def cell(
        self, concurrency: int, rounds: int, per_stream: int, targets: list[Target]
    ) -> dict[str, Any]:
        """Every target at one concurrency, in alternating rounds. With `quiet` set, a round
        starts once other processes leave the cores alone, and a round they disturbed anyway
        (more than QUIET_CORES busy on average) is run again, at most MAX_REPEATS times."""
        tallies = {t.label: Tally() for t in targets}
        backgrounds: list[float] = []
        repeated = 0
        while len(backgrounds) < rounds:
            if self.quiet:
                wait_for_quiet(QUIET_CORES, timeout=60)
            watch = Neighbours()
            attempt = {t.label: self.round(t, concurrency, per_stream) for t in targets}
            background = watch.cores()
            if self.quiet and background > QUIET_CORES and repeated < MAX_REPEATS:
                repeated += 1
                continue
            backgrounds.append(background)
            for label, tally in attempt.items():
                tallies[label].merge(tally)
        row: dict[str, Any] = {
            "concurrency": concurrency,
            "background_cores": float(np.mean(backgrounds)),
            "rounds_repeated": repeated,
        }
        for label, tally in tallies.items():
            row[label] = tally.summary(concurrency)
        direct = row["direct"]
        for target in targets:
            if target.gateway is not None:
                row[target.label].update(added(direct, row[target.label]))
        return row

    def round(self, target: Target, concurrency: int, per_stream: int) -> Tally:
        gateway = psutil.Process(target.gateway.process.pid) if target.gateway else None
        triton = self.neuron.triton_processes()
        gateway_cpu = cpu_seconds(gateway) if gateway else 0.0
        triton_cpu = sum(cpu_seconds(p) for p in triton)
        result = self.send(self.job(target, concurrency, per_stream))
        tally = Tally()
        tally.add(
            result,
            concurrency * (per_stream + 1),
            (cpu_seconds(gateway) - gateway_cpu) if gateway else 0.0,
            sum(cpu_seconds(p) for p in triton) - triton_cpu,
        )
        return tally

    def memory(self, gateway: Gateway, served: int) -> list[dict[str, float]]:
        """Gateway RSS once it has served each checkpoint's count of requests (both dialects)."""
        points = []
        dialect = "openai"
        for checkpoint in MEMORY_CHECKPOINTS:
            while served < checkpoint:
                per_stream = max(1, min(20, (checkpoint - served) // MEMORY_CONCURRENCY))
                target = Target(dialect, dialect, gateway)
                result = self.send(self.job(target, MEMORY_CONCURRENCY, per_stream, False))
                served += len(result.total_s) + len(result.errors)
                dialect = "anthropic" if dialect == "openai" else "openai"
            rss = psutil.Process(gateway.process.pid).memory_info().rss / 2**20
            points.append({"requests": served, "rss_mib": rss})
            print(f"  gateway RSS after {served:>6} requests: {rss:.1f} MiB", flush=True)
        return points


def added(direct: dict[str, Any], gateway: dict[str, Any]) -> dict[str, float]:
    return {
        "added_ttft_p50_ms": gateway["ttft_p50_ms"] - direct["ttft_p50_ms"],
        "added_ttft_p99_ms": gateway["ttft_p99_ms"] - direct["ttft_p99_ms"],
        "added_total_p50_ms": gateway["total_p50_ms"] - direct["total_p50_ms"],
        "added_total_p99_ms": gateway["total_p99_ms"] - direct["total_p99_ms"],
        "throughput_ratio": gateway["requests_per_s"] / direct["requests_per_s"],
    }


def print_row(row: dict[str, Any], labels: list[str]) -> None:
    print(
        f"c={row['concurrency']}  (other processes kept {row['background_cores']:.2f} cores busy; "
        f"{row['rounds_repeated']} rounds repeated)",
        flush=True,
    )
    for label in labels:
        s = row[label]
        line = (
            f"  {label:<20} n={s['requests']:<5} err={s['errors']:<2} "
            f"ttft p50 {s['ttft_p50_ms']:6.2f} p99 {s['ttft_p99_ms']:6.2f} ms  "
            f"total p50 {s['total_p50_ms']:6.1f} p99 {s['total_p99_ms']:6.1f} ms  "
            f"{s['requests_per_s']:6.1f} req/s"
        )
        if "added_ttft_p50_ms" in s:
            line += (
                f"  added ttft {s['added_ttft_p50_ms']:+.2f}/{s['added_ttft_p99_ms']:+.2f} "
                f"total {s['added_total_p50_ms']:+.2f}/{s['added_total_p99_ms']:+.2f} ms  "
                f"x{s['throughput_ratio']:.3f}  gateway cpu {s['gateway_cpu_ms_per_request']:.2f}"
                " ms/req"
            )
        print(line, flush=True)


def run(quick: bool, baseline: str | None) -> dict[str, Any]:
    cells = QUICK_CELLS if quick else FULL_CELLS
    dialects = ("openai",) if quick else ("openai", "anthropic")
    report: dict[str, Any] = {
        "machine": machine(),
        "background_cores_before": background_cores(),
        "engine": {
            "first_token_s": FIRST_TOKEN_S,
            "token_interval_s": TOKEN_INTERVAL_S,
            "output_tokens": OUTPUT_TOKENS,
        },
        "cells": [],
    }
    context = multiprocessing.get_context("spawn")
    with contextlib.ExitStack() as stack:
        folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="cortex-bench-")))
        client = stack.enter_context(ProcessPoolExecutor(CLIENTS, mp_context=context))
        started = time.monotonic()
        neuron = stack.enter_context(bench_neuron(folder, fake_models(folder)))
        current = stack.enter_context(bench_gateway(folder, neuron))
        targets = [Target("direct", "direct")]
        targets += [Target(d, d, current) for d in dialects]
        if baseline:
            old = source_tree(baseline, folder / "baseline-source")
            before = stack.enter_context(bench_gateway(folder, neuron, "baseline", old))
            report["baseline"] = revision(baseline)
            targets += [Target(f"{d}@{report['baseline']}", d, before) for d in dialects]
        print(f"fleet up in {time.monotonic() - started:.1f} s", flush=True)
        bench = Bench(neuron, client, quiet=not quick)
        for target in targets[1:]:  # the first request loads the model; then every path once
            warm = bench.send(bench.job(target, 1, 2, warm_up=False))
            if warm.errors:
                raise RuntimeError(f"warm-up of {target.label} failed: {warm.errors}")
        report["prompt_tokens"] = len(bench.prompt)
        if not quick:
            report["memory"] = bench.memory(current, served=2 * len(dialects))
        for concurrency, (rounds, per_stream) in cells.items():
            row = bench.cell(concurrency, rounds, per_stream, targets)
            print_row(row, [t.label for t in targets])
            report["cells"].append(row)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="64 streams, OpenAI only (< 1 min)")
    parser.add_argument("--baseline", help="also measure a gateway from this git revision")
    parser.add_argument("--out", type=Path, help="where the JSON results go")
    args = parser.parse_args()
    report = run(args.quick, args.baseline)
    out = args.out or RESULTS / f"gateway_overhead{'-quick' if args.quick else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    if not args.quick:
        from benchmarks.plots import gateway_plots

        for path in gateway_plots(report, out.parent):
            print(f"plot: {path}")
    print(f"results: {out}")
    row = next(r for r in report["cells"] if r["concurrency"] == 64)["openai"]
    print(
        f"added_ttft_p50_ms={row['added_ttft_p50_ms']:.3f} "
        f"added_ttft_p99_ms={row['added_ttft_p99_ms']:.3f} "
        f"throughput_ratio={row['throughput_ratio']:.3f}"
    )


if __name__ == "__main__":
    main()
