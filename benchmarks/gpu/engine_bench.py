"""The torch engine on one GPU, in one call: correctness first, then speed beside its peer.

    OUT=/tmp/out python3 benchmarks/gpu/engine_bench.py            # everything (~7 min on an H200)
    OUT=/tmp/out python3 benchmarks/gpu/engine_bench.py --only speed

Sections (each result also goes to $OUT/engine_bench.json; a table is printed last):
  roofline   device-to-device copy bandwidth (read + write bytes per second)
  kernels    each Triton kernel against its plain-PyTorch reference on the GPU, bf16
  correct    a seeded random Llama-3.2-1B-shaped model: greedy tokens of the graphed engine
             against the eager one and alone against batched; bf16 logits against float32
  speed      Llama-3.1-8B shape, random bf16 weights: decode at batch 1/8/32/64 in bf16 and fp8
             (in-situ), decode at 16k context, time to first token of a 16k-token prompt
  peer       transformers `generate()` on the same checkpoint: eager, and with a static cache
             (which transformers compiles)
"""

from __future__ import annotations

import argparse
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

from benchmarks.gpu import copy_bandwidth
from benchmarks.random_checkpoint import write as write_checkpoint
from neuron_agent.torch_engine import kernels
from neuron_agent.torch_engine.kernels import reference
from neuron_agent.torch_engine.loader import EngineOptions, build_engine
from neuron_agent.torch_engine.scheduler import Engine, GenerationRequest

OUT = Path(os.environ.get("OUT", "/tmp/out"))
RESULTS: dict[str, Any] = {}
STARTED = time.time()
NEVER = frozenset({10**9})  # an end id no model produces: every request runs its full length


def say(*parts: object) -> None:
    print(f"[{time.time() - STARTED:6.1f}s]", *parts, flush=True)


def save() -> None:
    (OUT / "engine_bench.json").write_text(json.dumps(RESULTS, indent=2, default=str))


def checkpoint(shape: str) -> Path:
    path = Path(f"/tmp/ckpt-{shape}")
    if not (path / "config.json").exists():
        started = time.time()
        write_checkpoint(shape, path, "cuda")
        say(f"wrote {shape} in {time.time() - started:.1f}s")
    return path


def free(*objects: object) -> None:
    for obj in objects:
        engine = obj if isinstance(obj, Engine) else None
        if engine is not None:
            engine.stop()
    del objects
    gc.collect()
    torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- roofline


def roofline() -> None:
    rates = [copy_bandwidth.measure() for _ in range(3)]
    RESULTS["copy_bytes_per_s"] = rates
    say("copy bandwidth TB/s", [round(r / 1e12, 3) for r in rates])
    torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- kernels


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-12))


def kernel_checks() -> None:
    from neuron_agent.torch_engine.kernels import triton_kernels as tk

    g = torch.Generator(device="cuda").manual_seed(0)
    dev, bf = "cuda", torch.bfloat16
    found: dict[str, Any] = {}
    x = torch.randn(37, 4096, device=dev, generator=g).to(bf)
    r = torch.randn(37, 4096, device=dev, generator=g).to(bf)
    w = torch.randn(4096, device=dev, generator=g).to(bf)
    got, got_sum = tk.add_rms_norm(x, r, w, 1e-5)
    want, want_sum = reference.add_rms_norm(x, r, w, 1e-5)
    found["add_rms_norm"] = (relative(got, want), bool(torch.equal(got_sum, want_sum)))

    tokens, heads, kv_heads, dim = 19, 32, 8, 128
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim, device=dev, generator=g).to(bf)
    positions = torch.randint(0, 4000, (tokens,), device=dev, generator=g)
    slots = torch.randperm(512, device=dev, generator=g)[:tokens]
    from benchmarks.random_checkpoint import SHAPES  # noqa: F401  (the 8B rope below)
    from neuron_agent.torch_engine.checkpoint import RopeSpec
    from neuron_agent.torch_engine.llama import rope_table

    table = rope_table(RopeSpec(theta=500000.0), dim, 4096).to(dev)

    def rotate_into_cache(module: Any, fp8: bool) -> tuple[torch.Tensor, ...]:
        """The rotated q and the cache written (with an FP8 cache, its scales too)."""
        q, k, v = qkv.clone().split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
        dtype = torch.float8_e4m3fn if fp8 else bf
        caches = [torch.zeros(512, kv_heads, dim, device=dev, dtype=dtype) for _ in range(2)]
        scales = [torch.ones(512, kv_heads, device=dev) for _ in range(2)] if fp8 else []
        rotated = module.rotary_and_cache(
            q.view(tokens, heads, dim),
            k.view(tokens, kv_heads, dim),
            v.view(tokens, kv_heads, dim),
            table,
            positions,
            *caches,
            slots,
            *scales,
        )
        return (rotated.clone(), *caches, *scales)

    outs = [rotate_into_cache(module, fp8=False) for module in (tk, reference)]
    found["rotary_and_cache"] = [relative(a, b) for a, b in zip(*outs, strict=True)]
    # The FP8 cache write: on the GPU the cast is exact, so the stored values should agree.
    outs = [rotate_into_cache(module, fp8=True)[1:] for module in (tk, reference)]
    found["rotary_and_cache_fp8_mismatch_fraction"] = [
        float((a.float() != b.float()).float().mean()) for a, b in zip(*outs, strict=True)
    ]

    gate_up = torch.randn(9, 2 * 14336, device=dev, generator=g).to(bf)
    found["silu_and_mul"] = relative(tk.silu_and_mul(gate_up), reference.silu_and_mul(gate_up))

    act = torch.randn(13, 4096, device=dev, generator=g).to(bf) * 3
    got_q, got_s = tk.quantize_fp8_rows(act)
    want_q, want_s = reference.quantize_fp8_rows(act)
    found["quantize_fp8_rows"] = (
        float((got_q.float() != want_q.float()).float().mean()),
        relative(got_s, want_s),
    )

    for lengths in ([1, 7, 129], [16384]):
        batch = len(lengths)
        blocks_each = -(-max(lengths) // 16)
        k_cache = torch.randn(batch * blocks_each * 16 + 16, 8, 128, device=dev, generator=g)
        k_cache = k_cache.to(bf)
        v_cache = torch.randn_like(k_cache)
        order = torch.randperm(batch * blocks_each, device=dev, generator=g).to(torch.int32)
        tables = order.view(batch, blocks_each)
        lens = torch.tensor(lengths, device=dev, dtype=torch.int32)
        q = torch.randn(batch, 32, 128, device=dev, generator=g).to(bf)
        splits = kernels.decode_splits(1, 8, torch.device(dev))
        got = tk.paged_decode_attention(q, k_cache, v_cache, tables, lens, 16, 128**-0.5, splits)
        want = reference.paged_decode_attention(q, k_cache, v_cache, tables, lens, 16, 128**-0.5)
        found[f"paged_decode_attention{lengths}"] = relative(got, want)
        if lengths == [16384]:
            continue
        kq, ks = reference.quantize_fp8_vectors(k_cache)
        vq, vs = reference.quantize_fp8_vectors(v_cache)
        args = (tables, lens, 16, 128**-0.5)
        got = tk.paged_decode_attention(q, kq, vq, *args, splits, ks, vs)
        want = reference.paged_decode_attention(q, kq, vq, *args, ks, vs)
        exact = reference.paged_decode_attention(q, k_cache, v_cache, *args)
        found[f"paged_decode_attention_fp8_cache{lengths}"] = relative(got, want)
        found[f"fp8_cache_vs_bf16_cache{lengths}"] = relative(got, exact)

    # Batch-invariant matmul: a row's bits may not depend on how many rows ran with it.
    invariant: dict[str, bool | float] = {}
    for label, weight, scale in (
        ("bf16", torch.randn(4096, 4096, device=dev, generator=g).to(bf), None),
        (
            "fp8",
            torch.randn(4096, 4096, device=dev, generator=g).to(torch.float8_e4m3fn),
            torch.rand(4096, device=dev, generator=g),
        ),
    ):
        x = torch.randn(300, 4096, device=dev, generator=g).to(bf)
        whole = tk.weight_matmul(x, weight, scale, batch_invariant=True)
        invariant[label] = all(
            torch.equal(tk.weight_matmul(x[:m], weight, scale, batch_invariant=True), whole[:m])
            for m in (1, 7, 33, 64, 129)
        )
        invariant[f"{label}_vs_reference"] = relative(
            whole, reference.weight_matmul(x, weight, scale)
        )
        invariant[f"{label}_cublas_rows_equal"] = all(
            torch.equal((x[:m] @ (weight.to(bf)).T), (x @ (weight.to(bf)).T)[:m])
            for m in (1, 7, 33, 64, 129)
        )
    found["batch_invariant_matmul"] = invariant
    RESULTS["kernels"] = found
    say("kernels (relative error vs reference)", found)


# ----------------------------------------------------------------------------- micro


def gpu_ms(fn: Any, repeats: int = 50) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    milliseconds: float = start.elapsed_time(end)
    return milliseconds / repeats


def graph_us(fn: Any, calls: int = 20) -> float:
    """GPU time of one call, from a CUDA graph of `calls` calls (as the engine runs them: the
    CPU's launch cost, which would dominate a plain loop of small kernels, is not in it)."""
    fn()
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return gpu_ms(graph.replay, 10) * 1000 / calls


def micro() -> None:
    """The 8B decoder's four matmul shapes: bytes of weight read per second by cuBLAS (bf16),
    the Triton weight kernels (bf16 and FP8; the one-row kernel in several tile shapes) and
    `_scaled_mm` (FP8 with per-token activations)."""
    from neuron_agent.torch_engine.kernels import triton_kernels as tk

    shapes = {
        "qkv": (6144, 4096),
        "o": (4096, 4096),
        "gate_up": (28672, 4096),
        "down": (4096, 14336),
    }
    configs = [
        {"BLOCK_N": 16, "BLOCK_K": 512, "num_warps": 4},
        {"BLOCK_N": 32, "BLOCK_K": 256, "num_warps": 4},
        {"BLOCK_N": 8, "BLOCK_K": 1024, "num_warps": 4},
        {"BLOCK_N": 32, "BLOCK_K": 512, "num_warps": 8},
        {"BLOCK_N": 64, "BLOCK_K": 256, "num_warps": 8},
        {"BLOCK_N": 4, "BLOCK_K": 1024, "num_warps": 2},
        {"BLOCK_N": 16, "BLOCK_K": 1024, "num_warps": 8},
        {"BLOCK_N": 8, "BLOCK_K": 512, "num_warps": 2},
        {"BLOCK_N": 4, "BLOCK_K": 512, "num_warps": 1},
        {"BLOCK_N": 2, "BLOCK_K": 1024, "num_warps": 1},
        {"BLOCK_N": 4, "BLOCK_K": 2048, "num_warps": 4},
        {"BLOCK_N": 8, "BLOCK_K": 2048, "num_warps": 8},
        {"BLOCK_N": 4, "BLOCK_K": 1024, "num_warps": 2, "num_stages": 4},
        {"BLOCK_N": 8, "BLOCK_K": 1024, "num_warps": 4, "num_stages": 4},
        {"BLOCK_N": 16, "BLOCK_K": 512, "num_warps": 4, "num_stages": 4},
        {"BLOCK_N": 2, "BLOCK_K": 2048, "num_warps": 2},
        {"BLOCK_N": 16, "BLOCK_K": 256, "num_warps": 2},
    ]
    found: dict[str, Any] = {}
    g = torch.Generator(device="cuda").manual_seed(5)
    for name, (n, k) in shapes.items():
        w = (torch.randn(n, k, device="cuda", generator=g) * 0.02).to(torch.bfloat16)
        w8 = (w.float() / 0.02 * 10).to(torch.float8_e4m3fn)
        scale = torch.full((n,), 0.002, device="cuda")
        for rows in (1, 8, 32, 2048):
            x = torch.randn(rows, k, device="cuda", generator=g).to(torch.bfloat16)
            x_fp8, x_scale = tk.quantize_fp8_rows(x)
            variants: dict[str, tuple[Any, int]] = {
                "cublas_bf16": (lambda x=x, w=w: x @ w.T, 2),
                "quantize_fp8_rows": (lambda x=x: tk.quantize_fp8_rows(x), 0),
                "scaled_mm_fp8_only": (
                    lambda xq=x_fp8, xs=x_scale, w8=w8, s=scale: torch._scaled_mm(
                        xq, w8.T, scale_a=xs, scale_b=s[None, :], out_dtype=torch.bfloat16
                    ),
                    1,
                ),
            }
            variants["invariant_bf16"] = (
                lambda x=x, w=w: tk.weight_matmul(x, w, None, batch_invariant=True),
                2,
            )
            variants["invariant_fp8"] = (
                lambda x=x, w8=w8, s=scale: tk.weight_matmul(x, w8, s, batch_invariant=True),
                1,
            )
            if rows == 2048:  # a prefill pass: only the invariant kernel against cuBLAS
                variants = {
                    k: v for k, v in variants.items() if k in ("cublas_bf16", "invariant_bf16")
                }
            elif rows > 1:
                variants["triton_dot_bf16"] = (lambda x=x, w=w: tk.weight_matmul(x, w, None), 2)
                variants["triton_dot_fp8"] = (
                    lambda x=x, w8=w8, s=scale: tk.weight_matmul(x, w8, s),
                    1,
                )
            else:
                for index, config in enumerate(configs):
                    variants[f"gemv{index}_bf16"] = (
                        lambda x=x, w=w, c=config: tk.weight_vector(x, w, None, c),
                        2,
                    )
                    variants[f"gemv{index}_fp8"] = (
                        lambda x=x, w8=w8, s=scale, c=config: tk.weight_vector(x, w8, s, c),
                        1,
                    )
            for label, (fn, width) in variants.items():
                try:
                    us = graph_us(fn)
                except Exception as error:  # a tile shape that does not fit this width
                    found[f"{name} m{rows} {label}"] = {"error": repr(error)[:120]}
                    continue
                found[f"{name} m{rows} {label}"] = {
                    "us": us,
                    "weight_TBps": n * k * width / us / 1e6,
                    "TFLOPS": 2 * rows * n * k / us / 1e6,
                }
    # The one-row kernel's tile shapes: per weight format, the one that reads the decoder's four
    # matrices fastest in all, against the default (kernels.GEMV_CONFIGS, which the speed runs
    # use: adopting a better tile is a code change, measured end to end).
    for element, suffix in ((1, "fp8"), (2, "bf16")):
        totals = {
            index: sum(found[f"{name} m1 gemv{index}_{suffix}"].get("us", 1e9) for name in shapes)
            for index in range(len(configs))
        }
        best = min(totals, key=totals.__getitem__)
        default = tk.GEMV_CONFIGS[element]
        RESULTS.setdefault("gemv_tiles", {})[suffix] = {
            "default": default,
            "default_us": totals[configs.index(default)] if default in configs else None,
            "best": configs[best],
            "best_us": totals[best],
        }

    # The batch-invariant tile: one shape for every row count, so its cost at one row, at a
    # decode batch and at a prefill pass all count.
    tiles = [
        {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 256, "num_warps": 4, "num_stages": 4},
        {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 128, "num_warps": 4, "num_stages": 4},
        {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 128, "num_warps": 4, "num_stages": 3},
        {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 4},
        {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 4, "num_stages": 3},
    ]
    tile_found: dict[str, Any] = {}
    for name, (n, k) in shapes.items():
        w = (torch.randn(n, k, device="cuda", generator=g) * 0.02).to(torch.bfloat16)
        for rows in (1, 32, 2048):
            x = torch.randn(rows, k, device="cuda", generator=g).to(torch.bfloat16)
            for index, tile in enumerate(tiles):
                tile_found[f"{name} m{rows} tile{index}"] = graph_us(
                    lambda x=x, w=w, t=tile: tk.weight_matmul(x, w, None, True, t), 5
                )
    RESULTS["invariant_tiles"] = {"tiles": tiles, "us": tile_found}
    say("invariant tiles", tile_found)
    RESULTS["attention_us"] = attention_micro()
    say("decode attention", RESULTS["attention_us"])
    RESULTS["micro"] = found
    for key, value in found.items():
        if "us" in value:
            say(
                f"{key:34} {value['us']:8.1f} us  {value['weight_TBps']:.2f} TB/s"
                f"  {value['TFLOPS']:.0f} TFLOPS"
            )
    RESULTS["micro_configs"] = configs


def attention_micro() -> dict[str, float]:
    """One layer's decode attention (8B shape: 32 heads over 8 kv heads of 128) over a bf16 and
    an FP8 cache: what the FP8 cache saves per step."""
    from neuron_agent.torch_engine.kernels import triton_kernels as tk

    found: dict[str, float] = {}
    g = torch.Generator(device="cuda").manual_seed(6)
    for batch, length in ((1, 128), (1, 16384), (32, 1024), (64, 2048)):
        blocks_each = -(-length // 16)
        keys = torch.randn(batch * blocks_each * 16 + 16, 8, 128, device="cuda", generator=g)
        values = torch.randn_like(keys) * 0.05
        tables = torch.randperm(batch * blocks_each, device="cuda", generator=g).to(torch.int32)
        tables = tables.view(batch, blocks_each)
        lens = torch.full((batch,), length, device="cuda", dtype=torch.int32)
        q = torch.randn(batch, 32, 128, device="cuda", generator=g).to(torch.bfloat16)
        splits = kernels.decode_splits(1, 8, torch.device("cuda"))
        caches = {
            "bf16": (keys.to(torch.bfloat16), values.to(torch.bfloat16), None, None),
            "fp8": (
                *reference.quantize_fp8_vectors(keys)[:1],
                *reference.quantize_fp8_vectors(values)[:1],
                reference.quantize_fp8_vectors(keys)[1],
                reference.quantize_fp8_vectors(values)[1],
            ),
        }
        for label, (k, v, ks, vs) in caches.items():
            found[f"b{batch} ctx{length} {label}"] = graph_us(
                lambda k=k, v=v, ks=ks, vs=vs, q=q, t=tables, n=lens, s=splits: (
                    tk.paged_decode_attention(q, k, v, t, n, 16, 128**-0.5, s, ks, vs)
                )
            )
        del caches, keys, values
    return found


# ----------------------------------------------------------------------------- correctness


def run_requests(
    engine: Engine, prompts: list[list[int]], new: int, **request: Any
) -> list[dict[str, Any]]:
    """Submit all prompts at once, step until all finish; per request its tokens and timings."""
    results: list[dict[str, Any]] = []
    done = threading.Event()
    remaining = [len(prompts)]
    lock = threading.Lock()
    started = time.perf_counter()
    for prompt in prompts:
        record: dict[str, Any] = {"tokens": [], "first": None, "end": None}
        results.append(record)

        def emit(tokens: list[int], final: bool, record: dict[str, Any] = record) -> None:
            now = time.perf_counter()
            if tokens and record["first"] is None:
                record["first"] = now
            record["tokens"].extend(tokens)
            if final:
                record["end"] = now
                with lock:
                    remaining[0] -= 1
                    if remaining[0] == 0:
                        done.set()

        engine.submit(
            GenerationRequest(
                prompt=prompt,
                max_new_tokens=new,
                emit=emit,
                fail=lambda message: say("FAILED", message),
                end_ids=request.get("end_ids", NEVER),
            )
        )
    done.wait(600)
    for record in results:
        record["ttft"] = record["first"] - started
        record["decode_tps"] = (len(record["tokens"]) - 1) / max(
            record["end"] - record["first"], 1e-9
        )
        record["wall"] = record["end"] - started
    return results


def first_diffs(runs: list[list[int]], others: list[list[int]]) -> list[int | None]:
    """Per prompt, the first token where two runs differ (None: equal)."""
    return [
        next((i for i, (a, b) in enumerate(zip(x, y, strict=False)) if a != b), None)
        for x, y in zip(runs, others, strict=True)
    ]


def correctness() -> None:
    path = checkpoint("llama-3.2-1b")
    g = torch.Generator().manual_seed(1)
    prompts = [
        torch.randint(10, 120000, (n,), generator=g).tolist() for n in (5, 33, 128, 300, 17, 1000)
    ]
    new = 48
    found: dict[str, Any] = {}

    def runs(**options: Any) -> tuple[list[list[int]], list[list[int]], Engine]:
        """The prompts batched, then each alone (after the batch: with the prefix cache on,
        its full blocks are cached by then); the engine, still running."""
        engine = build_engine(
            EngineOptions(
                path,
                device="cuda",
                dtype="bfloat16",
                kv_cache_tokens=16384,
                max_batch_size=8,
                **options,
            )
        )
        engine.start()
        together = [r["tokens"] for r in run_requests(engine, prompts, new)]
        alone = [run_requests(engine, [p], new)[0]["tokens"] for p in prompts]
        return together, alone, engine

    together, alone, graphed = runs()
    found["graph_capture_s"] = graphed.decoder.capture_seconds
    logits_bf16 = graphed.prompt_logits(prompts[3])
    free(graphed)
    eager_together, _, eager = runs(cuda_graphs=False)
    free(eager)
    invariant_together, invariant_alone, invariant = runs(batch_invariant=True)
    free(invariant)
    uncached_together, uncached_alone, uncached = runs(batch_invariant=True, prefix_caching=False)
    free(uncached)
    found["batch_invariant_no_prefix_cache_alone_equals_batched"] = (
        uncached_together == uncached_alone
    )
    found["batch_invariant_cached_equals_uncached"] = invariant_together == uncached_together
    found["batch_invariant_alone_equals_batched"] = invariant_together == invariant_alone
    found["batch_invariant_first_diffs"] = first_diffs(invariant_together, invariant_alone)
    found["batch_invariant_vs_default_first_diffs"] = first_diffs(invariant_together, together)
    reference_engine = build_engine(
        EngineOptions(path, device="cuda", dtype="float32", kv_cache_tokens=4096, cuda_graphs=False)
    )
    logits_fp32 = reference_engine.prompt_logits(prompts[3])
    free(reference_engine)
    found["alone_first_diffs"] = first_diffs(together, alone)
    found["transformers_bf16_vs_fp32_logits_relative_max"] = _transformers_bf16_error(
        path, prompts[3]
    )
    found["graphed_equals_eager"] = together == eager_together
    found["alone_equals_batched"] = together == alone
    found["first_diffs"] = first_diffs(together, eager_together)
    per_position = (logits_bf16 - logits_fp32).norm(dim=-1) / logits_fp32.norm(dim=-1)
    found["bf16_vs_fp32_logits_relative_max"] = float(per_position.max())
    found["bf16_vs_fp32_top1_agreement"] = float(
        (logits_bf16.argmax(-1) == logits_fp32.argmax(-1)).float().mean()
    )
    RESULTS["correctness"] = found
    say("correctness", found)


def _transformers_bf16_error(path: Path, prompt: list[int]) -> float:
    """The same measure for transformers' own model: how far bf16 itself is from float32 here."""
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([prompt], device="cuda")
    logits = {}
    for dtype in (torch.float32, torch.bfloat16):
        # transformers wraps PreTrainedModel.to in a decorator whose type drops `self`.
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to("cuda").eval()  # type: ignore[arg-type]
        with torch.inference_mode():
            logits[dtype] = model(ids).logits[0].float()
        del model
        torch.cuda.empty_cache()
    a, b = logits[torch.bfloat16], logits[torch.float32]
    return float(((a - b).norm(dim=-1) / b.norm(dim=-1)).max())


# ----------------------------------------------------------------------------- speed


def speed_rows(engine: Engine, label: str, batches: list[int]) -> None:
    vocab = engine.model.spec.vocab_size
    g = torch.Generator().manual_seed(2)
    run_requests(engine, [[5] * 16], 8)  # warm-up
    for batch in batches:
        rows = []
        for _repeat in range(2):
            prompts = [torch.randint(0, vocab, (128,), generator=g).tolist() for _ in range(batch)]
            results = run_requests(engine, prompts, 256)
            wall = max(r["wall"] for r in results)
            rows.append(
                {
                    "batch": batch,
                    "aggregate_tps": sum(len(r["tokens"]) for r in results) / wall,
                    "decode_tps_per_sequence": statistics.median(r["decode_tps"] for r in results),
                    "ttft_median_s": statistics.median(r["ttft"] for r in results),
                }
            )
        RESULTS.setdefault("speed", {}).setdefault(label, []).extend(rows)
        say(label, rows)
        save()


def prefix_turns() -> None:
    """Claude-Code-sized turns in-process (8B, bf16): a 15.6k-token first turn, then turns that
    each append ~600 tokens to the previous prompt, so all but the new tokens come from the
    prefix cache. Time to first token of each, and a profile of one cached turn's prefill: what
    the engine itself spends of a turn's TTFT through the gateway."""
    path = checkpoint("llama-3.1-8b")
    engine = build_engine(
        EngineOptions(
            path, device="cuda", dtype="bfloat16", kv_cache_tokens=131072, max_batch_size=8
        )
    )
    engine.start()
    g = torch.Generator().manual_seed(7)
    vocab = engine.model.spec.vocab_size
    prompt = torch.randint(0, vocab, (15600,), generator=g).tolist()
    run_requests(engine, [[5] * 16], 2)  # warm-up
    found: dict[str, Any] = {"ttft_s": []}
    for _turn in range(6):
        record = run_requests(engine, [prompt], 1)[0]
        found["ttft_s"].append(record["ttft"])
        prompt = prompt + torch.randint(0, vocab, (600,), generator=g).tolist()
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        run_requests(engine, [prompt], 1)
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=15)
    (OUT / "prefix_profile.txt").write_text(table)
    found["profile_top"] = table.splitlines()[:20]
    free(engine)
    RESULTS["prefix_turns"] = found
    say("prefix turns in-process", [round(t * 1000, 1) for t in found["ttft_s"]])
    print(table, flush=True)


def long_context(engine: Engine, label: str) -> None:
    vocab = engine.model.spec.vocab_size
    g = torch.Generator().manual_seed(3)
    found = {}
    for budget in (8192, 16384):
        engine.prefill_tokens = budget
        prompt = torch.randint(0, vocab, (16384,), generator=g).tolist()
        record = run_requests(engine, [prompt], 129)[0]
        found[f"prefill_tokens={budget}"] = {
            "ttft_s": record["ttft"],
            "decode_tps_at_16k": record["decode_tps"],
        }
    RESULTS.setdefault("long_context", {})[label] = found
    say(label, "16k context", found)


def speed(quick: bool) -> None:
    path = checkpoint("llama-3.1-8b")
    batches = [1, 8, 32] if quick else [1, 8, 32, 64]
    # (label, quantization, other options, batch sizes): the two weight formats at every
    # batch size, the options that trade speed for something at the sizes that show it.
    variants: list[tuple[str, str, dict[str, Any], list[int]]] = [
        ("bf16", "none", {}, batches),
        ("fp8", "fp8", {}, batches),
        ("bf16-kvfp8", "none", {"kv_cache_dtype": "fp8"}, [1, 32]),
        ("fp8-kvfp8", "fp8", {"kv_cache_dtype": "fp8"}, [1, 32, 64]),
        ("bf16-invariant", "none", {"batch_invariant": True}, [1, 32]),
    ]
    chosen = os.environ.get("ENGINE_BENCH_VARIANTS")
    if chosen:
        variants = [v for v in variants if v[0] in chosen.split(",")]
    for label, quantization, extra, sizes in variants:
        started = time.time()
        engine = build_engine(
            EngineOptions(
                path,
                quantization=quantization,
                device="cuda",
                dtype="bfloat16",
                kv_cache_tokens=65536,
                max_batch_size=64,
                **extra,
            )
        )
        torch.cuda.synchronize()
        RESULTS.setdefault("load", {})[label] = {
            "seconds": time.time() - started,
            "graph_capture_s": engine.decoder.capture_seconds,
            "gpu_bytes": torch.cuda.memory_allocated(),
        }
        runner = engine.decoder
        if runner.graphed:
            for size in (1, 32):
                graph = runner._graphs[size][0]
                RESULTS["load"][label][f"graph_replay_ms_b{size}"] = gpu_ms(graph.replay, 20)
        say(label, "loaded", RESULTS["load"][label])
        engine.start()
        speed_rows(engine, label, sizes)
        if label != "fp8" or not quick:
            long_context(engine, label)
        free(engine)


# ----------------------------------------------------------------------------- peer


def peer() -> None:
    from transformers import AutoModelForCausalLM

    path = checkpoint("llama-3.1-8b")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to("cuda").eval()  # type: ignore[arg-type]
    ids = torch.randint(0, 128000, (1, 128), generator=torch.Generator().manual_seed(4)).cuda()
    found = {}
    for label, options in (("eager", {}), ("static", {"cache_implementation": "static"})):
        rates = []
        for _ in range(3):  # the first static run compiles
            torch.cuda.synchronize()
            started = time.perf_counter()
            out = model.generate(
                ids, max_new_tokens=128, min_new_tokens=128, do_sample=False, **options
            )
            torch.cuda.synchronize()
            rates.append((out.shape[1] - ids.shape[1]) / (time.perf_counter() - started))
        found[label] = rates
        say("transformers", label, [round(r, 1) for r in rates])
    RESULTS["peer_transformers_b1_tps"] = found
    del model
    free()


def table() -> None:
    rate = max(RESULTS.get("copy_bytes_per_s", [0]))
    lines = [f"copy bandwidth {rate / 1e12:.2f} TB/s; bf16 roofline b1 {rate / 15.0e9:.0f} tok/s"]
    for label, rows in RESULTS.get("speed", {}).items():
        for row in rows:
            lines.append(
                f"{label:5} b{row['batch']:<3} aggregate {row['aggregate_tps']:8.1f} tok/s  "
                f"per-seq {row['decode_tps_per_sequence']:7.1f}  ttft {row['ttft_median_s'] * 1000:7.1f} ms"
            )
    for label, found in RESULTS.get("long_context", {}).items():
        lines.append(f"{label} 16k: {json.dumps(found)}")
    if "peer_transformers_b1_tps" in RESULTS:
        lines.append(f"transformers b1: {json.dumps(RESULTS['peer_transformers_b1_tps'])}")
    if "correctness" in RESULTS:
        lines.append(f"correctness: {json.dumps(RESULTS['correctness'])}")
    text = "\n".join(lines)
    (OUT / "engine_bench.txt").write_text(text + "\n")
    print(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--only", nargs="*", default=["roofline", "kernels", "correct", "speed", "peer", "micro"]
    )
    parser.add_argument("--quick", action="store_true", help="fewer batch sizes")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    smi = subprocess.run(
        ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
        capture_output=True,
        text=True,
    )
    import triton

    RESULTS["machine"] = {
        "gpu": smi.stdout.strip(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    say(RESULTS["machine"])
    sections = {
        "roofline": roofline,
        "micro": micro,
        "kernels": kernel_checks,
        "correct": correctness,
        "speed": lambda: speed(args.quick),
        "peer": peer,
        "attention": lambda: RESULTS.__setitem__("attention_us", attention_micro()),
        "prefix": prefix_turns,
    }
    for name in args.only:
        try:
            sections[name]()
        except Exception as error:  # one broken section must not cost the others' numbers
            import traceback

            traceback.print_exc()
            RESULTS.setdefault("errors", {})[name] = repr(error)
        save()
    table()


if __name__ == "__main__":
    main()
