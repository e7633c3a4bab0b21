"""Speculative decoding's acceptance and speed on real weights: SmolLM2-135M-Instruct on CPU.

    python -m benchmarks.speculation                  # 3 repeats, k = 2, 4, 8 against off
    python -m benchmarks.speculation --quick          # 1 repeat, shorter outputs
    python -m benchmarks.speculation --verify-cost 2=1.01,3=1.02,5=1.04,9=1.09

Two traces, each request run alone (batch 1), greedy:
- **code-edit**: the model asked to reproduce a file from its prompt with a small change
  (rename a function, add a parameter, fix a comparison), and agent tool-call turns (an edit
  tool's JSON call made for one file, then asked again for another file);
- **chat**: ordinary questions whose answers are not in the prompt.

For each k the engine runs with `speculation = "ngram"` and `speculative_tokens = k`, and once
with speculation off, all in the same repeat, one after another on one loaded model (a fresh
engine, KV pool and output history per run, so a repeat never guesses from an earlier repeat's
outputs). Reported per run: tokens/s end to end (prompt included, the same for every setting),
tokens emitted per verify step (accepted guesses + the model's own), acceptance, the share of
decode steps that guessed. Outputs with speculation on must equal the outputs with it off.

**Projection to another machine.** A decode step that verifies m tokens costs r(m) times a
one-token step there (`--verify-cost m=r,…`, measured on the H200 by
`benchmarks/gpu/engine_bench.py --only verify`). Replaying the measured steps (each step's
number of guesses and accepted tokens) at those costs gives the projected speed-up:
(tokens emitted) / (Σ r(guesses + 1) over the steps). Without `--verify-cost` it assumes r = 1
(the bound where extra rows are free) and says so.

torch runs on one thread (the machine is shared; one thread is also fairer between settings).
Results go to benchmarks/results/speculation[-quick].json.
"""

from __future__ import annotations

import argparse
import json
import platform
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer

from cortex.demo.smollm2 import ensure_smollm2, gguf_path
from neuron_agent.torch_engine import loader
from neuron_agent.torch_engine.kv_cache import BlockPool
from neuron_agent.torch_engine.llama import LlamaModel
from neuron_agent.torch_engine.parallel import Shard
from neuron_agent.torch_engine.scheduler import Engine, GenerationRequest
from neuron_agent.torch_engine.speculation import (
    SpeculationCounters,
    SpeculationMethod,
    SpeculationSettings,
)

RESULTS = Path(__file__).resolve().parent / "results"

CONFIG_FILE = """import json
from pathlib import Path


class Settings:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.values: dict[str, str] = {}

    def load(self) -> None:
        if not self.path.exists():
            return
        data = json.loads(self.path.read_text())
        for key, value in data.items():
            self.values[key] = str(value)

    def get(self, key: str, default: str = "") -> str:
        return self.values.get(key, default)

    def save(self) -> None:
        self.path.write_text(json.dumps(self.values, indent=2))
"""

QUEUE_FILE = """from collections import deque


class JobQueue:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.jobs = deque()

    def push(self, job):
        if len(self.jobs) > self.limit:
            raise ValueError("the queue is full")
        self.jobs.append(job)

    def pop(self):
        if not self.jobs:
            return None
        return self.jobs.popleft()

    def size(self) -> int:
        return len(self.jobs)
"""

TOOL_SYSTEM = (
    "You are a coding agent. To change a file, reply with exactly one JSON object and nothing "
    'else: {"tool": "edit_file", "path": ..., "old": ..., "new": ...}.'
)
FIRST_CALL = json.dumps(
    {
        "tool": "edit_file",
        "path": "src/app/settings.py",
        "old": "        return self.values.get(key, default)",
        "new": "        value = self.values.get(key)\n        return default if value is None else value",
    }
)


def code_edit_trace() -> list[list[dict[str, str]]]:
    def rewrite(instruction: str, source: str) -> list[dict[str, str]]:
        return [
            {
                "role": "user",
                "content": f"{instruction} Reply with the whole new file only.\n\n"
                f"```python\n{source}```",
            }
        ]

    def tool_turn(path: str) -> list[dict[str, str]]:
        return [
            {"role": "system", "content": TOOL_SYSTEM},
            {"role": "user", "content": "Make get() treat a missing key and None alike."},
            {"role": "assistant", "content": FIRST_CALL},
            {"role": "user", "content": '{"result": "ok"}'},
            {"role": "user", "content": f"Make the same edit in {path}, which has the same code."},
        ]

    return [
        rewrite("Rename the method get to lookup in this file.", CONFIG_FILE),
        rewrite("Change the comparison in push to >= in this file.", QUEUE_FILE),
        rewrite("Add a docstring to the class Settings in this file.", CONFIG_FILE),
        tool_turn("src/app/defaults.py"),
        tool_turn("src/worker/settings.py"),
    ]


def chat_trace() -> list[list[dict[str, str]]]:
    return [
        [{"role": "user", "content": question}]
        for question in (
            "What are the health benefits of regular exercise?",
            "Explain how a hash table works, briefly.",
            "Write a short story about a lighthouse keeper.",
            "Why is the sky blue?",
        )
    ]


class RecordingCounters(SpeculationCounters):
    """The engine's counters, and each guessing sequence-step's (guesses, accepted)."""

    def __init__(self) -> None:
        super().__init__()
        self.steps: list[tuple[int, int]] = []

    def record(self, proposed: int, accepted: int) -> None:
        super().record(proposed, accepted)
        self.steps.append((proposed, accepted))


@dataclass
class Run:
    trace: str
    setting: str
    seconds: float
    outputs: list[list[int]]
    counters: RecordingCounters
    requests: int
    decode_seconds: float = 0.0

    @property
    def tokens(self) -> int:
        return sum(len(o) for o in self.outputs)

    @property
    def decode_steps(self) -> int:
        """Decode steps over the trace's requests (the first token comes from the prompt's
        pass; each step emits one token, or a verify step its accepted guesses + one)."""
        c = self.counters
        return (self.tokens - self.requests) - c.emitted + c.sequence_steps

    def summary(self, verify_cost: dict[int, float]) -> dict[str, Any]:
        c = self.counters
        plain = self.decode_steps - c.sequence_steps
        cost = plain + sum(cost_of(verify_cost, p + 1) for p, _ in c.steps)
        return {
            "trace": self.trace,
            "setting": self.setting,
            "seconds": round(self.seconds, 3),
            "tokens": self.tokens,
            "tokens_per_s": round(self.tokens / self.seconds, 2),
            # after each request's first token: the prompt's pass left out
            "decode_tokens_per_s": round((self.tokens - self.requests) / self.decode_seconds, 2),
            "verify_steps": c.sequence_steps,
            "decode_steps": self.decode_steps,
            "guessing_share": round(c.sequence_steps / max(1, self.decode_steps), 3),
            "proposed": c.proposed,
            "accepted": c.accepted,
            "acceptance": round(c.accepted / c.proposed, 3) if c.proposed else None,
            "emitted_per_verify_step": round(c.emitted / c.sequence_steps, 3)
            if c.sequence_steps
            else None,
            "projected_speedup": round((self.tokens - self.requests) / cost, 3) if cost else None,
        }


def cost_of(verify_cost: dict[int, float], rows: int) -> float:
    """r(rows): the measured ratio, or the next measured size's (a pessimistic step)."""
    if not verify_cost:
        return 1.0
    larger = [m for m in verify_cost if m >= rows]
    return verify_cost[min(larger)] if larger else verify_cost[max(verify_cost)]


def make_engine(model: LlamaModel, setting: str) -> tuple[Engine, RecordingCounters]:
    """A fresh engine (KV pool, prefix cache, output history) on the loaded model."""
    if setting == "off":
        settings = SpeculationSettings()
    else:
        settings = SpeculationSettings(
            SpeculationMethod.NGRAM, max_tokens=int(setting[1:]), max_batch=4
        )
    pool = BlockPool(model.spec, 4096, model.dtype, model.device)
    engine = Engine(model, pool, max_batch_size=4, speculation=settings)
    counters = RecordingCounters()
    engine.speculated = counters
    return engine, counters


def generate(
    engine: Engine, ids: list[int], max_new: int, end_ids: frozenset[int]
) -> tuple[list[int], float]:
    """The output, and the seconds from its first token to its last (decode alone)."""
    tokens: list[int] = []
    done = threading.Event()
    failure: list[str] = []
    first: list[float] = []

    def emit(new: list[int], final: bool) -> None:
        if not first and new:
            first.append(time.perf_counter())
        tokens.extend(new)
        if final:
            done.set()

    def fail(message: str) -> None:
        failure.append(message)
        done.set()

    engine.submit(
        GenerationRequest(prompt=ids, max_new_tokens=max_new, emit=emit, fail=fail, end_ids=end_ids)
    )
    done.wait()
    if failure:
        raise RuntimeError(failure[0])
    return tokens, time.perf_counter() - first[0] if first else 0.0


def run_trace(
    model: LlamaModel,
    prompts: list[list[int]],
    settings: list[str],
    trace: str,
    max_new: int,
    end_ids: frozenset[int],
) -> list[Run]:
    """The trace's requests one at a time, each under every setting in turn (so every setting
    meets the same load from whatever else runs on the machine), one engine per setting."""
    engines = {setting: make_engine(model, setting) for setting in settings}
    runs = {
        s: Run(trace, s, 0.0, [], counters, len(prompts)) for s, (_, counters) in engines.items()
    }
    for engine, _ in engines.values():
        engine.start()
    try:
        for ids in prompts:
            for setting, (engine, _) in engines.items():
                started = time.perf_counter()
                output, decoding = generate(engine, ids, max_new, end_ids)
                runs[setting].seconds += time.perf_counter() - started
                runs[setting].decode_seconds += decoding
                runs[setting].outputs.append(output)
    finally:
        for engine, _ in engines.values():
            engine.stop()
    return list(runs.values())


def parse_costs(text: str) -> dict[int, float]:
    costs = {}
    for part in filter(None, text.split(",")):
        rows, ratio = part.split("=")
        costs[int(rows)] = float(ratio)
    return costs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ks", default="2,4,8")
    parser.add_argument("--verify-cost", default="", help="m=r,… (rows verified → step cost)")
    parser.add_argument("--label", default="", help="where --verify-cost was measured")
    args = parser.parse_args()
    torch.set_num_threads(1)
    repeats = 1 if args.quick else args.repeats
    max_new = {"code-edit": 64 if args.quick else 96, "chat": 32 if args.quick else 48}
    costs = parse_costs(args.verify_cost)

    folder = ensure_smollm2()
    path = gguf_path(folder)
    options = loader.EngineOptions(path)
    model, _ = loader.load_shard(options, loader.plan(options), Shard())
    tokenizer = AutoTokenizer.from_pretrained(folder)
    end_ids = frozenset(model.spec.eos_token_ids)
    traces = {
        name: [
            list(
                tokenizer.apply_chat_template(
                    messages, add_generation_prompt=True, return_dict=False
                )
            )
            for messages in conversations
        ]
        for name, conversations in (("code-edit", code_edit_trace()), ("chat", chat_trace()))
    }
    settings = ["off", *(f"k{k}" for k in args.ks.split(","))]
    runs: list[dict[str, Any]] = []
    mismatches: list[str] = []
    for repeat in range(repeats):
        for trace, prompts in traces.items():
            runs_now = run_trace(model, prompts, settings, trace, max_new[trace], end_ids)
            baseline = runs_now[0].outputs
            for run in runs_now:
                if run.outputs != baseline:
                    mismatches.append(f"repeat {repeat} {trace} {run.setting}")
                summary = {"repeat": repeat, **run.summary(costs)}
                runs.append(summary)
                print(json.dumps(summary), flush=True)

    table = []
    for trace in traces:
        off = [r["tokens_per_s"] for r in runs if r["trace"] == trace and r["setting"] == "off"]
        off_decode = [
            r["decode_tokens_per_s"] for r in runs if r["trace"] == trace and r["setting"] == "off"
        ]
        for setting in settings[1:]:
            rows = [r for r in runs if r["trace"] == trace and r["setting"] == setting]
            speeds = [r["tokens_per_s"] for r in rows]
            ratios = [s / o for s, o in zip(speeds, off, strict=True)]
            decode = [r["decode_tokens_per_s"] for r in rows]
            decode_ratios = [s / o for s, o in zip(decode, off_decode, strict=True)]
            table.append(
                {
                    "trace": trace,
                    "setting": setting,
                    "off_tokens_per_s": off,
                    "on_tokens_per_s": speeds,
                    "measured_speedup": [round(x, 3) for x in ratios],
                    "off_decode_tokens_per_s": off_decode,
                    "on_decode_tokens_per_s": decode,
                    "measured_decode_speedup": [round(x, 3) for x in decode_ratios],
                    "emitted_per_verify_step": rows[0]["emitted_per_verify_step"],
                    "acceptance": rows[0]["acceptance"],
                    "guessing_share": rows[0]["guessing_share"],
                    "projected_speedup": rows[0]["projected_speedup"],
                }
            )
    result = {
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}, "
        f"torch {torch.__version__}, 1 thread",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "model": "SmolLM2-135M-Instruct (GGUF Q4_1, dequantized to float32), CPU",
        "verify_cost": costs or "assumed r = 1 (extra verified rows free)",
        "verify_cost_label": args.label,
        "outputs_equal_to_off": not mismatches,
        "mismatches": mismatches,
        "table": table,
        "runs": runs,
    }
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"speculation{'-quick' if args.quick else ''}.json"
    out.write_text(json.dumps(result, indent=2))
    for row in table:
        print(
            f"{row['trace']:9} {row['setting']:3} off {row['off_tokens_per_s']} on "
            f"{row['on_tokens_per_s']} ×{row['measured_speedup']} decode "
            f"×{row['measured_decode_speedup']} "
            f"emitted/verify {row['emitted_per_verify_step']} acceptance {row['acceptance']} "
            f"guessing {row['guessing_share']} projected ×{row['projected_speedup']}"
        )
    print(f"outputs equal with speculation on and off: {not mismatches}; wrote {out}")


if __name__ == "__main__":
    main()
