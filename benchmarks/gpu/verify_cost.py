"""Cost of a speculative verify step against a one-token decode step, on one GPU.

    OUT=/tmp/out python3 benchmarks/gpu/verify_cost.py [--shape llama-3.1-8b] [--context 512]

Llama-3.1-8B shape, random bf16 weights (`benchmarks/random_checkpoint.py`; speed does not
depend on the values). For batch 1, 4 and 16, sequences of `--context` cached tokens (their
prompts prefilled by the engine itself), then, timed as the engine runs them (host preparation
included, wall time between two synchronisations, median of 20):
  decode      one token per sequence through the engine's decode runner: a CUDA-graph replay
  verify k    the engine's verify pass (`Engine._verify_logits`) over the last token and k
              candidates per sequence, k = 0, 1, 2, 4, 8: B × (k + 1) decode rows, a replay of
              the graph of that many rows' bucket (k = 0 is the decode step again, through
              the verify code)
The ratio verify k / decode is r(k + 1) for `benchmarks/speculation.py --verify-cost`.
Results: $OUT/verify_cost.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.gpu.engine_bench import checkpoint
from neuron_agent.torch_engine.loader import EngineOptions, build_engine
from neuron_agent.torch_engine.scheduler import Engine, GenerationRequest

OUT = Path(os.environ.get("OUT", "/tmp/out"))
KS = (0, 1, 2, 4, 8)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def wall_ms(fn: Any, repeats: int = 20) -> list[float]:
    for _ in range(3):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - started) * 1000)
    return times


def prepared(engine: Engine, batch: int, context: int) -> list[Any]:
    """`batch` sequences with `context` prompt tokens cached and their first token chosen,
    and room in the cache for 8 candidates each."""
    vocab = engine.model.spec.vocab_size
    g = torch.Generator().manual_seed(batch)
    for _ in range(batch):
        engine.submit(
            GenerationRequest(
                prompt=torch.randint(0, vocab, (context,), generator=g).tolist(),
                max_new_tokens=64,
                emit=lambda tokens, final: None,
                fail=print,
            )
        )
    while any(s.prefilling or not s.generated for s in [*engine._running, *engine._waiting]):
        engine.step()
        if len(engine._running) == batch and all(s.generated for s in engine._running):
            break
    sequences = list(engine._running)
    assert len(sequences) == batch
    for sequence in sequences:
        assert engine.pool.grow(sequence.blocks, len(sequence.tokens) + max(KS))
    return sequences


def measure(engine: Engine, batch: int, context: int) -> dict[str, Any]:
    sequences = prepared(engine, batch, context)
    lengths = [len(s.tokens) for s in sequences]

    def decode() -> None:
        engine.decoder.run(
            tokens=[s.tokens[-1] for s in sequences],
            positions=[n - 1 for n in lengths],
            slots=[
                engine.pool.slot(s.blocks, n - 1) for s, n in zip(sequences, lengths, strict=True)
            ],
            tables=[s.blocks for s in sequences],
        )

    row: dict[str, Any] = {"batch": batch, "context": context}
    row["decode_ms"] = wall_ms(decode)
    for k in KS:
        proposals = [[7] * k for _ in sequences]
        row[f"verify_{k}_ms"] = wall_ms(lambda p=proposals: engine._verify_logits(sequences, p))
    base = statistics.median(row["decode_ms"])
    row["ratio"] = {k + 1: round(statistics.median(row[f"verify_{k}_ms"]) / base, 3) for k in KS}
    for sequence in sequences:
        engine.pool.release(sequence.blocks)
    engine._running.clear()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="llama-3.1-8b")
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--batches", default="1,4,16")
    parser.add_argument("--checkpoint", help="a checkpoint folder instead of random weights")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    query = ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"]
    smi = subprocess.run(query, capture_output=True, text=True) if args.device != "cpu" else None
    batches = [int(b) for b in args.batches.split(",")]
    result: dict[str, Any] = {
        "gpu": smi.stdout.strip() if smi else "cpu",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "shape": args.shape,
        "rows": [],
    }
    print(result, flush=True)
    engine = build_engine(
        EngineOptions(
            Path(args.checkpoint) if args.checkpoint else checkpoint(args.shape),
            device=args.device,
            kv_cache_tokens=65536,
            max_batch_size=max(batches),
            # graphs captured for verify passes of up to 8 candidates at every batch measured
            speculation="ngram",
            speculative_tokens=max(KS),
            speculative_max_batch=max(batches),
        )
    )  # not started: this script drives its steps
    for batch in batches:
        row = measure(engine, batch, args.context)
        result["rows"].append(row)
        print(
            f"batch {batch}: decode {statistics.median(row['decode_ms']):.3f} ms; "
            + ", ".join(
                f"verify k={k} {statistics.median(row[f'verify_{k}_ms']):.3f} ms" for k in KS
            )
            + f"; ratio {row['ratio']}",
            flush=True,
        )
        (OUT / "verify_cost.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
