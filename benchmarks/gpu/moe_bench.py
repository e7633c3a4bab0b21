"""Mixture-of-experts decode on one GPU: the torch engine on a Qwen3-30B-A3B-shaped model with
random weights, bf16 and in-situ fp8, at batch 1/8/32 (96 new tokens, two repeats), beside
transformers' eager `generate()` on the same shape in the same run, and beside the roofline of
the bytes a decode step reads.

    OUT=/tmp/out python3 benchmarks/gpu/moe_bench.py          # on the GPU (not run yet)
    OUT=/tmp/out python3 benchmarks/gpu/moe_bench.py --tiny   # a smoke run of the same code

No checkpoint is written (30.5 B parameters are 61 GB, nearly the device's disk): the weights
are drawn on the GPU as the engine loads them, from a mapping that makes each tensor when it is
asked for (`RandomTensors`), so only the engine's own copy is ever held. transformers builds
its model from the same config with its own random initialisation.

Roofline: the bytes one decode step reads at batch 1 are the attention weights, the router,
the 8 chosen experts of each layer, the output head and one embedding row (the KV cache of a
128-token prompt is negligible here); divided into the device-to-device copy bandwidth
measured in the same run (bytes read + written per second, as engine_bench.py counts it).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
import zlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.gpu import copy_bandwidth
from benchmarks.gpu.engine_bench import graph_us, run_requests
from neuron_agent.torch_engine.checkpoint import ModelSpec, read_spec
from neuron_agent.torch_engine.kv_cache import BlockPool
from neuron_agent.torch_engine.llama import LlamaModel
from neuron_agent.torch_engine.loader import EngineOptions, new_engine

OUT = Path(os.environ.get("OUT", "/tmp/out"))
RESULTS: dict[str, Any] = {}
STARTED = time.time()

QWEN3_30B_A3B = {
    "architectures": ["Qwen3MoeForCausalLM"],
    "model_type": "qwen3_moe",
    "hidden_size": 2048,
    "intermediate_size": 6144,
    "moe_intermediate_size": 768,
    "num_hidden_layers": 48,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "head_dim": 128,
    "num_experts": 128,
    "num_experts_per_tok": 8,
    "norm_topk_prob": True,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "vocab_size": 151936,
    "max_position_embeddings": 40960,
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "eos_token_id": 151645,
}
TINY = {
    **QWEN3_30B_A3B,
    "hidden_size": 128,
    "moe_intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "num_experts": 8,
    "num_experts_per_tok": 2,
    "vocab_size": 512,
}


def say(*parts: object) -> None:
    print(f"[{time.time() - STARTED:6.1f}s]", *parts, flush=True)


def save() -> None:
    (OUT / "moe_bench.json").write_text(json.dumps(RESULTS, indent=2, default=str))


def tensor_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every tensor of a Qwen3-MoE checkpoint of this config, by name."""
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    kv_heads, head_dim = config["num_key_value_heads"], config["head_dim"]
    width, experts = config["moe_intermediate_size"], config["num_experts"]
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (config["vocab_size"], hidden),
        "lm_head.weight": (config["vocab_size"], hidden),
        "model.norm.weight": (hidden,),
    }
    for layer in range(config["num_hidden_layers"]):
        p = f"model.layers.{layer}"
        shapes |= {
            f"{p}.input_layernorm.weight": (hidden,),
            f"{p}.post_attention_layernorm.weight": (hidden,),
            f"{p}.self_attn.q_proj.weight": (heads * head_dim, hidden),
            f"{p}.self_attn.k_proj.weight": (kv_heads * head_dim, hidden),
            f"{p}.self_attn.v_proj.weight": (kv_heads * head_dim, hidden),
            f"{p}.self_attn.o_proj.weight": (hidden, heads * head_dim),
            f"{p}.self_attn.q_norm.weight": (head_dim,),
            f"{p}.self_attn.k_norm.weight": (head_dim,),
            f"{p}.mlp.gate.weight": (experts, hidden),
        }
        for e in range(experts):
            q = f"{p}.mlp.experts.{e}"
            shapes |= {
                f"{q}.gate_proj.weight": (width, hidden),
                f"{q}.up_proj.weight": (width, hidden),
                f"{q}.down_proj.weight": (hidden, width),
            }
    return shapes


class RandomTensors(Mapping[str, torch.Tensor]):
    """A checkpoint's tensors, each drawn (seeded by its name) when it is read: norms are ones,
    matrices N(0, 1/in)."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], device: str) -> None:
        self.shapes = shapes
        self.device = device

    def __getitem__(self, name: str) -> torch.Tensor:
        shape = self.shapes[name]
        if len(shape) == 1:
            return torch.ones(shape, dtype=torch.bfloat16, device=self.device)
        generator = torch.Generator(device=self.device).manual_seed(zlib.crc32(name.encode()))
        values = torch.randn(shape, generator=generator, device=self.device)
        scaled: torch.Tensor = (values * shape[-1] ** -0.5).to(torch.bfloat16)
        return scaled

    def __contains__(self, name: object) -> bool:  # without drawing the tensor
        return name in self.shapes

    def __iter__(self) -> Iterator[str]:
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)


def active_bytes(spec: ModelSpec, weight_bytes: float) -> float:
    """What one batch-1 decode step reads: every weight but the other experts and all but one
    embedding row; the head stays bf16 (the engine never quantizes it)."""
    head = spec.vocab_size * spec.hidden_size
    body = spec.parameter_count(experts=spec.experts_per_token) - 2 * head
    return body * weight_bytes + head * 2 + spec.hidden_size * 2


def engine_rows(
    folder: Path, config: dict[str, Any], quantization: str, batches: list[int], new: int
) -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    spec = read_spec(folder)
    started = time.time()
    options = EngineOptions(
        folder,
        quantization=quantization,
        device=device,
        dtype="bfloat16",
        kv_cache_tokens=32768,
        max_batch_size=max(batches),
    )
    model = LlamaModel(
        spec,
        RandomTensors(tensor_shapes(config), device),  # type: ignore[arg-type]
        quantization,
        torch.bfloat16,
        torch.device(device),
    )
    model.eval()
    pool = BlockPool(model.spec, options.kv_cache_tokens, torch.bfloat16, torch.device(device))
    engine = new_engine(options, model, pool, cuda_graphs=device == "cuda")
    if device == "cuda":
        torch.cuda.synchronize()
    load = {
        "seconds": time.time() - started,
        "gpu_bytes": torch.cuda.memory_allocated() if device == "cuda" else 0,
    }
    RESULTS.setdefault("load", {})[quantization] = load
    say(quantization, "loaded", load)
    engine.start()
    try:
        vocab = spec.vocab_size
        g = torch.Generator().manual_seed(2)
        run_requests(engine, [[5] * 16], 8)  # warm-up: the kernels compile
        for batch in batches:
            rows = []
            for _repeat in range(2):
                prompts = [
                    torch.randint(0, vocab, (128,), generator=g).tolist() for _ in range(batch)
                ]
                results = run_requests(engine, prompts, new)
                wall = max(r["wall"] for r in results)
                rows.append(
                    {
                        "aggregate_tps": sum(len(r["tokens"]) for r in results) / wall,
                        "decode_tps_per_sequence": statistics.median(
                            r["decode_tps"] for r in results
                        ),
                    }
                )
            RESULTS.setdefault("engine", {}).setdefault(quantization, {})[batch] = rows
            say(quantization, f"batch {batch}", rows)
            save()
    finally:
        engine.stop()
        del engine, model, pool
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()


def transformers_rows(config: dict[str, Any], new: int) -> None:
    """transformers' eager generate() at batch 1 on the same shape (its own random weights)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    hf_config = AutoConfig.for_model(**{k: v for k, v in config.items() if k != "architectures"})
    started = time.time()
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.bfloat16).eval()
    say("transformers built in", round(time.time() - started, 1), "s")
    ids = torch.randint(
        0, config["vocab_size"], (1, 128), generator=torch.Generator().manual_seed(4)
    )
    rates = []
    for _ in range(2):
        if device == "cuda":
            torch.cuda.synchronize()
        begun = time.perf_counter()
        out = model.generate(
            ids.to(device), max_new_tokens=new, min_new_tokens=new, do_sample=False
        )
        if device == "cuda":
            torch.cuda.synchronize()
        rates.append((out.shape[1] - ids.shape[1]) / (time.perf_counter() - begun))
    RESULTS["transformers_eager_b1_tps"] = rates
    RESULTS["transformers_experts_implementation"] = str(
        getattr(model.config, "_experts_implementation", "default")
    )
    say("transformers eager b1", [round(r, 1) for r in rates])
    save()
    del model
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def kernel_checks() -> None:
    """The expert kernels against their references on the GPU at this shape, bf16 and fp8:
    one token (the decode kernel) and 64 (sorted, the grouped matmul)."""
    from neuron_agent.torch_engine.kernels import reference, triton_kernels
    from neuron_agent.torch_engine.moe import ExpertStack

    g = torch.Generator(device="cuda").manual_seed(0)
    found: dict[str, float] = {}
    hidden, width, experts = 2048, 768, 128
    gate_up = [
        torch.randn(2 * width, hidden, device="cuda", generator=g) * hidden**-0.5
        for _ in range(experts)
    ]
    down = [
        torch.randn(hidden, width, device="cuda", generator=g) * width**-0.5 for _ in range(experts)
    ]
    for mode in ("none", "fp8"):
        stacks = [ExpertStack.quantize(m, mode, torch.bfloat16, 128) for m in (gate_up, down)]
        weights = reference.ExpertWeights(
            stacks[0].weight, stacks[0].scale, stacks[1].weight, stacks[1].scale, 128
        )
        for tokens in (1, 64):
            x = torch.randn(tokens, hidden, device="cuda", generator=g).to(torch.bfloat16)
            logits = torch.randn(tokens, experts, device="cuda", generator=g)
            route = triton_kernels.route_experts(logits, 8, True)
            want_route = reference.route_experts(logits, 8, True)
            got = triton_kernels.experts_mlp(x, weights, *route)
            want = reference.experts_mlp(x, weights, *want_route)
            found[f"{mode}_t{tokens}_ids_equal"] = float(torch.equal(route[1], want_route[1]))
            found[f"{mode}_t{tokens}_relative"] = float(
                (got.float() - want.float()).norm() / want.float().norm()
            )
            # One layer's experts inside a CUDA graph (as the engine replays them): the bytes
            # of the chosen experts read per second.
            chosen = int(torch.unique(route[1]).numel())
            per_weight = 2 if mode == "none" else 1
            expert_bytes = chosen * 3 * hidden * width * per_weight
            micros = graph_us(
                lambda x=x, weights=weights, route=route: triton_kernels.experts_mlp(
                    x, weights, *route
                )
            )
            found[f"{mode}_t{tokens}_us"] = micros
            found[f"{mode}_t{tokens}_expert_bytes_per_s"] = expert_bytes / (micros * 1e-6)
    RESULTS["kernel_checks"] = found
    say("kernel checks", found)
    save()


def section(name: str, run: Any) -> None:
    """One part of the run; a failure is recorded and the rest still runs."""
    try:
        run()
    except Exception as error:
        RESULTS.setdefault("errors", {})[name] = repr(error)
        say(name, "FAILED", repr(error))
        import traceback

        traceback.print_exc()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    save()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a smoke run of a tiny shape")
    parser.add_argument("--skip-transformers", action="store_true")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    config = TINY if args.tiny else QWEN3_30B_A3B
    folder = Path("/tmp/moe-bench-config")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    spec = read_spec(folder)
    if torch.cuda.is_available():
        RESULTS["device"] = torch.cuda.get_device_name()
        rates = [copy_bandwidth.measure() for _ in range(3)]
        RESULTS["copy_bytes_per_s"] = rates
        best = max(rates)
        RESULTS["roofline_b1_tps"] = {
            "bf16": best / active_bytes(spec, 2),
            "fp8": best / active_bytes(spec, 1),
        }
        RESULTS["active_bytes_b1"] = {"bf16": active_bytes(spec, 2), "fp8": active_bytes(spec, 1)}
        say(
            "copy TB/s", [round(r / 1e12, 3) for r in rates], "roofline", RESULTS["roofline_b1_tps"]
        )
        section("kernels", kernel_checks)
    batches, new = ([1, 4], 8) if args.tiny else ([1, 8, 32], 96)
    # transformers first: the comparison is the point, should the run be cut short.
    if not args.skip_transformers:
        section("transformers", lambda: transformers_rows(config, 8 if args.tiny else 24))
    for quantization in ("none", "fp8"):
        section(
            f"engine_{quantization}",
            lambda q=quantization: engine_rows(folder, config, q, batches, new),
        )
    save()
    print(json.dumps(RESULTS, indent=2, default=str))


if __name__ == "__main__":
    main()
