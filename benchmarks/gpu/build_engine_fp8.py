# ruff: noqa: E402, SIM115 - a one-shot device script: imports follow its timing log
"""GPU check for `cortex build-engine`: ModelOpt FP8 of a Llama-3.1-8B-shaped model with random
weights, the torch-engine export served by the torch engine on the GPU, and the TRT-LLM export.

One device call, from the repository root, with the wheels the image lacks (nvidia-modelopt and
its pure-Python needs, pydantic, typer, rich) installed into PYTHONPATH, and a folder of
tokenizer files (any Hugging Face tokenizer; `cortex demo-model` writes one) in TOKENIZER_DIR:

    OUT=/tmp/out TOKENIZER_DIR=/path/to/tokenizer python3 benchmarks/gpu/build_engine_fp8.py
"""

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

OUT = Path(os.environ["OUT"])
LOG = open(OUT / "log.txt", "a")
T0 = time.time()


def say(*parts: object) -> None:
    line = f"[{time.time() - T0:7.1f}s] " + " ".join(map(str, parts))
    print(line, flush=True)
    LOG.write(line + "\n")
    LOG.flush()


say("gpu", torch.cuda.get_device_name(0), "torch", torch.__version__)
import transformers

say("transformers", transformers.__version__)
ckpt = Path("/tmp/llama8b-random")
from transformers import LlamaConfig, LlamaForCausalLM

config = LlamaConfig(
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    vocab_size=128256,
    max_position_embeddings=131072,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
    rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
    eos_token_id=2,
    bos_token_id=None,
    pad_token_id=0,
)
config.architectures = ["LlamaForCausalLM"]
torch.manual_seed(0)
t = time.time()
torch.set_default_dtype(torch.bfloat16)
with torch.device("cuda"):
    model = LlamaForCausalLM(config)
torch.set_default_dtype(torch.float32)
model.config.dtype = torch.bfloat16
say(
    "random init",
    f"{time.time() - t:.1f}s",
    sum(p.numel() for p in model.parameters()) / 1e9,
    "B params",
)
t = time.time()
model.save_pretrained(ckpt, max_shard_size="5GB")
for f in Path(os.environ["TOKENIZER_DIR"]).iterdir():
    shutil.copy2(f, ckpt / f.name)
say(
    "saved checkpoint",
    f"{time.time() - t:.1f}s",
    json.loads((ckpt / "config.json").read_text()).get("dtype"),
)
del model
torch.cuda.empty_cache()


def cli(*args: str) -> int:
    t = time.time()
    proc = subprocess.run(
        [sys.executable, "-m", "cortex.cli", "build-engine", str(ckpt), *args],
        capture_output=True,
        text=True,
    )
    say("build-engine", " ".join(args), "->", proc.returncode, f"{time.time() - t:.1f}s")
    tail = (proc.stderr.strip().splitlines() or [""])[-1]
    say("  last line:", tail[:400])
    return proc.returncode


store = Path("/tmp/store")
cli(
    "--quant",
    "fp8",
    "--engine",
    "torch",
    "-o",
    str(store),
    "--name",
    "l8b-fp8-torch",
    "--calib-size",
    "128",
    "--calib-seq-len",
    "512",
    "--device",
    "cuda",
)
work = store / ".work" / "l8b-fp8-torch"
for rec in sorted(work.glob("*.json")):
    r = json.loads(rec.read_text())
    say("  stage", r["stage"], r["status"], r["seconds"], "s")
published = store / "l8b-fp8-torch" / "checkpoint"
say("fp8 export size GiB", sum(p.stat().st_size for p in published.glob("*.safetensors")) / 2**30)

from neuron_agent.torch_engine.loader import EngineOptions, build_engine
from neuron_agent.torch_engine.scheduler import Engine, GenerationRequest


def prefill_logits(engine: Engine, ids: list[int]) -> torch.Tensor:
    return engine.prompt_logits(ids)


def decode_rate(
    engine: Engine, batch: int, new: int = 128, prompt_len: int = 256
) -> tuple[float, float]:
    done = [threading.Event() for _ in range(batch)]
    counts = [0] * batch
    t = time.time()
    for i in range(batch):

        def emit(toks: list[int], final: bool, i: int = i) -> None:
            counts[i] += len(toks)
            if final:
                done[i].set()

        engine.submit(
            GenerationRequest(
                prompt=[(7 * i + j) % 4000 + 10 for j in range(prompt_len)],
                max_new_tokens=new,
                emit=emit,
                fail=lambda m: say("fail", m),
            )
        )
    for d in done:
        d.wait(300)
    seconds = time.time() - t
    return sum(counts) / seconds, seconds


ids = [(13 * j) % 4000 + 10 for j in range(512)]
results = {}
for label, path in (("bf16", ckpt), ("fp8", published)):
    t = time.time()
    engine = build_engine(
        EngineOptions(path, device="cuda", kv_cache_tokens=32768, max_batch_size=8)
    )
    torch.cuda.synchronize()
    load = time.time() - t
    mem = torch.cuda.memory_allocated() / 2**30
    logits = prefill_logits(engine, ids)
    torch.cuda.synchronize()
    t = time.time()
    for _ in range(3):
        prefill_logits(engine, ids)
    torch.cuda.synchronize()
    prefill = (time.time() - t) / 3
    engine.start()
    r1 = decode_rate(engine, 1)
    r8 = decode_rate(engine, 8)
    engine.stop()
    say(
        label,
        f"load {load:.1f}s",
        f"GPU mem {mem:.1f} GiB",
        f"prefill 512 tok {prefill * 1000:.1f} ms",
        f"decode b1 {r1[0]:.1f} tok/s",
        f"b8 {r8[0]:.1f} tok/s",
        "scaled_mm:",
        getattr(
            engine.model.layers[0].qkv if hasattr(engine.model.layers[0], "qkv") else None,
            "_use_scaled_mm",
            "?",
        ),
    )
    results[label] = logits.cpu()
    del engine
    torch.cuda.empty_cache()
cos = torch.nn.functional.cosine_similarity(results["fp8"], results["bf16"], dim=-1)
top1 = (results["fp8"].argmax(-1) == results["bf16"].argmax(-1)).float().mean()
say(
    "fp8 vs bf16 logits (random weights): cosine min",
    f"{cos.min():.4f}",
    "mean",
    f"{cos.mean():.5f}",
    "top1",
    f"{top1:.3f}",
)

if time.time() - T0 < 330:
    cli(
        "--quant",
        "fp8",
        "--tp",
        "2",
        "-o",
        str(store),
        "--name",
        "l8b-fp8-tp2",
        "--calib-size",
        "128",
        "--calib-seq-len",
        "512",
        "--device",
        "cuda",
    )
    work = store / ".work" / "l8b-fp8-tp2"
    for rec in sorted(work.glob("*.json")):
        r = json.loads(rec.read_text())
        say("  stage", r["stage"], r["status"], r["seconds"], "s")
    cfg = json.loads((work / "export" / "config.json").read_text())
    say(
        "  trtllm ckpt",
        cfg["mapping"],
        cfg["quantization"],
        "rotary_base",
        cfg.get("rotary_base"),
        "GiB",
        sum(p.stat().st_size for p in (work / "export").glob("rank*.safetensors")) / 2**30,
    )
say("done")
