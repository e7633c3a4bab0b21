"""The torch engine without Triton: decode step time at several batch sizes, and where a
batch-1 step spends its time (torch.profiler). Run beside engine_throughput.py to separate the
engine's own speed from Triton's and the Python backend's per-response cost."""

from __future__ import annotations

import argparse
import json
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

from neuron_agent.torch_engine.loader import EngineOptions, build_engine
from neuron_agent.torch_engine.scheduler import Engine, GenerationRequest


def measure(engine: Engine, batch: int, prompt: int, new: int, vocab: int) -> dict[str, float]:
    done = threading.Barrier(batch + 1)
    first: list[float] = []
    counts = [0] * batch

    def emit_for(i: int) -> Callable[[list[int], bool], None]:
        def emit(tokens: list[int], final: bool) -> None:
            if tokens and counts[i] == 0:
                first.append(time.perf_counter())
            counts[i] += len(tokens)
            if final:
                threading.Thread(target=done.wait).start()

        return emit

    g = torch.Generator().manual_seed(batch)
    start = time.perf_counter()
    for i in range(batch):
        ids = torch.randint(0, vocab, (prompt,), generator=g).tolist()
        engine.submit(
            GenerationRequest(
                prompt=ids,
                max_new_tokens=new,
                emit=emit_for(i),
                fail=print,
                end_ids=frozenset({vocab + 7}),
            )
        )
    done.wait()
    end = time.perf_counter()
    decode = end - max(first)
    return {
        "batch": batch,
        "aggregate_tps": sum(counts) / (end - start),
        "decode_steps_per_s": (new - 1) / decode if decode > 0 else 0.0,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--quantization", default="none")
    parser.add_argument("--profile", type=Path)
    args = parser.parse_args()
    engine = build_engine(
        EngineOptions(
            args.checkpoint,
            quantization=args.quantization,
            dtype="bfloat16",
            device="cuda",
            kv_cache_tokens=65536,
            max_batch_size=32,
        )
    )
    engine.start()
    vocab = engine.model.spec.vocab_size
    measure(engine, 1, 16, 8, vocab)
    for batch in (1, 8, 32):
        print(
            json.dumps(
                {"quantization": args.quantization, **measure(engine, batch, 128, 128, vocab)}
            ),
            flush=True,
        )
    if args.profile:
        engine.stop()
        from torch.profiler import ProfilerActivity, profile

        engine = build_engine(
            EngineOptions(
                args.checkpoint,
                quantization=args.quantization,
                dtype="bfloat16",
                device="cuda",
                kv_cache_tokens=4096,
                max_batch_size=1,
            )
        )
        ids = list(range(100, 164))
        engine.submit(
            GenerationRequest(
                prompt=ids,
                max_new_tokens=40,
                emit=lambda t, f: None,
                fail=print,
                end_ids=frozenset({vocab + 7}),
            )
        )
        for _ in range(10):
            engine.step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                engine.step()
            torch.cuda.synchronize()
        args.profile.write_text(
            prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
            + "\n\n"
            + prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=15)
        )
    engine.stop()


if __name__ == "__main__":
    main()
