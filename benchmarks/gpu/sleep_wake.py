"""Sleep and wake against a cold load, in-process on one GPU (issue 28), in one call.

    OUT=/tmp/out python3 benchmarks/gpu/sleep_wake.py            # 8B shape, bf16 and fp8
    FORMATS=none ROUNDS=2 IMPORTS=1 python3 benchmarks/gpu/sleep_wake.py   # a short run

For each weight format, on a random Llama-3.1-8B-shaped checkpoint written on the device:
  cold     where a load's engine time goes: reading the checkpoint and building the model
           (in-situ quantization and host→device copies included), allocating the KV cache,
           capturing the decode CUDA graphs; then its first token
  sleep    seconds to sleep; GPU memory the process still holds while asleep (NVML, and torch's
           own reserved / allocated); host bytes the weights took
  wake     seconds to wake (weights copied back, cache allocated, graphs re-captured) and the
           first token after it
  equal    greedy tokens after the wake against before the sleep
Three sleep/wake rounds per format for a spread. What this leaves out of a cold load through
Triton, the stub's start and its imports, is timed separately as a fresh interpreter importing
the engine. Results in $OUT/sleep_wake.json; a table is printed last.
"""

from __future__ import annotations

import gc
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.random_checkpoint import write as write_checkpoint
from neuron_agent.torch_engine import residency
from neuron_agent.torch_engine.loader import EngineOptions, load_shard, new_engine, plan
from neuron_agent.torch_engine.parallel import Shard
from neuron_agent.torch_engine.scheduler import Engine, GenerationRequest

OUT = Path(os.environ.get("OUT", "/tmp/out"))
RESULTS: dict[str, Any] = {}
STARTED = time.time()
PROMPT = list(range(1000, 1128))
FORMATS = os.environ.get("FORMATS", "none,fp8").split(",")
ROUNDS = int(os.environ.get("ROUNDS", "3"))
IMPORTS = int(os.environ.get("IMPORTS", "3"))
SHAPE = os.environ.get("SHAPE", "llama-3.1-8b")
DEVICE = os.environ.get("DEVICE", "cuda:0")  # cpu: a smoke run of the script itself
ON_GPU = DEVICE.startswith("cuda")


def reserved() -> int:
    return torch.cuda.memory_reserved() if ON_GPU else 0


def synchronize() -> None:
    if ON_GPU:
        torch.cuda.synchronize()


NEVER = frozenset({10**9})


def say(*parts: object) -> None:
    print(f"[{time.time() - STARTED:6.1f}s]", *parts, flush=True)


def process_gpu_bytes() -> int | None:
    if not ON_GPU:
        return None
    try:
        import pynvml
    except ImportError:
        return None
    pynvml.nvmlInit()
    handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
    for process in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
        if process.pid == os.getpid():
            return int(process.usedGpuMemory or 0)
    return 0


def generate(engine: Engine, tokens: int) -> tuple[list[int], float]:
    """Greedy tokens and the time to the first one."""
    done = threading.Event()
    record: dict[str, Any] = {"tokens": [], "first": None}
    started = time.perf_counter()

    def emit(new: list[int], final: bool) -> None:
        if new and record["first"] is None:
            record["first"] = time.perf_counter()
        record["tokens"].extend(new)
        if final:
            done.set()

    engine.submit(
        GenerationRequest(list(PROMPT), tokens, emit, lambda m: say("FAILED", m), end_ids=NEVER)
    )
    done.wait(300)
    return record["tokens"], record["first"] - started


def import_seconds() -> float:
    """A fresh interpreter importing the engine: what a Triton stub pays before loading."""
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-c", "import torch, neuron_agent.torch_engine.scheduler"],
        check=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )
    return time.perf_counter() - started


def one_format(path: Path, quantization: str) -> dict[str, Any]:
    options = EngineOptions(
        path, quantization=quantization, dtype="bfloat16", device=DEVICE, kv_cache_tokens=65536
    )
    synchronize()
    t0 = time.perf_counter()
    planned = plan(options)
    model, pool = load_shard(options, planned, Shard())
    synchronize()
    t1 = time.perf_counter()
    engine = new_engine(options, model, pool, cuda_graphs=True)
    t2 = time.perf_counter()
    engine.start()
    before, cold_first = generate(engine, 32)
    row: dict[str, Any] = {
        "cold_model_s": t1 - t0,
        "cold_cache_and_graphs_s": t2 - t1,
        "graph_capture_s": engine.decoder.capture_seconds,
        "cold_first_token_s": cold_first,
        "cold_total_s": t2 - t0 + cold_first,
        "awake_process_gpu_bytes": process_gpu_bytes(),
        "awake_reserved_bytes": reserved(),
        "rounds": [],
    }
    say(quantization, "cold", {k: v for k, v in row.items() if k != "rounds"})
    for _ in range(ROUNDS):
        slept = residency.sleep(engine)
        gc.collect()
        synchronize()
        asleep = {
            "sleep_s": slept["seconds"],
            "host_bytes": slept["host_bytes"],
            "asleep_process_gpu_bytes": process_gpu_bytes(),
            "asleep_reserved_bytes": reserved(),
            "asleep_allocated_bytes": (torch.cuda.memory_allocated() if ON_GPU else 0),
        }
        woken = residency.wake(engine)
        after, first = generate(engine, 32)
        asleep.update(
            wake_s=woken["seconds"],
            wake_first_token_s=first,
            wake_total_s=woken["seconds"] + first,
            graphs_recaptured_s=engine.decoder.capture_seconds,
            equal=after == before,
        )
        row["rounds"].append(asleep)
        say(quantization, asleep)
    engine.stop()
    del engine, model, pool
    gc.collect()
    if ON_GPU:
        torch.cuda.empty_cache()
    return row


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    query = ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"]
    gpu = subprocess.run(query, capture_output=True, text=True).stdout.strip() if ON_GPU else DEVICE
    RESULTS["machine"] = {
        "gpu": gpu,
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    say(RESULTS["machine"])
    RESULTS["import_torch_s"] = [import_seconds() for _ in range(IMPORTS)]
    path = Path(f"/tmp/ckpt-{SHAPE}")
    if not (path / "config.json").exists():
        write_checkpoint(SHAPE, path, "cuda" if ON_GPU else "cpu")
    for quantization in FORMATS:
        try:
            RESULTS[quantization] = one_format(path, quantization)
        except Exception as error:
            import traceback

            traceback.print_exc()
            RESULTS.setdefault("errors", {})[quantization] = repr(error)
        (OUT / "sleep_wake.json").write_text(json.dumps(RESULTS, indent=2, default=str))
    print("format  cold_total  wake_total(min/med/max)  ×  asleep_GiB(nvml)  equal")
    for quantization in FORMATS:
        row = RESULTS.get(quantization)
        if not row:
            continue
        totals = [r["wake_total_s"] for r in row["rounds"]]
        held = [r["asleep_process_gpu_bytes"] or r["asleep_reserved_bytes"] for r in row["rounds"]]
        print(
            f"{quantization:6}  {row['cold_total_s']:9.2f}s  "
            f"{min(totals):.3f}/{statistics.median(totals):.3f}/{max(totals):.3f}s  "
            f"{row['cold_total_s'] / statistics.median(totals):5.1f}  "
            f"{max(held) / 2**30:8.2f}  {all(r['equal'] for r in row['rounds'])}"
        )


if __name__ == "__main__":
    main()
