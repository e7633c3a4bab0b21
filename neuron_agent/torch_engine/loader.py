"""Build a ready Engine from a checkpoint folder and the profile's parameters."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from neuron_agent.torch_engine.checkpoint import ModelSpec, read_spec, read_tensors
from neuron_agent.torch_engine.errors import UnsupportedCheckpoint
from neuron_agent.torch_engine.kv_cache import BlockPool
from neuron_agent.torch_engine.llama import LlamaModel
from neuron_agent.torch_engine.quant import MODES
from neuron_agent.torch_engine.scheduler import Engine


@dataclass(frozen=True)
class EngineOptions:
    checkpoint: Path
    quantization: str = "none"  # none | int8 | int4 | int4_awq | fp8
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    device: str = "cpu"
    kv_cache_tokens: int = 65536
    max_batch_size: int = 8
    max_queue_size: int = 256
    prefill_tokens: int = 0  # 0: 512 on CPU, 8192 on a GPU
    group_size: int = 128
    cuda_graphs: bool = True
    # Reuse the KV blocks of earlier requests' equal prompt prefixes (kv_cache's docstring).
    prefix_caching: bool = True


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def choose_dtype(spec: ModelSpec, requested: str, device: torch.device) -> torch.dtype:
    if requested != "auto":
        return DTYPES[requested]
    if device.type == "cpu":
        return torch.float32  # CPU bf16 matmuls are slow and less exact; fp32 is the reference
    stored = DTYPES.get(spec.torch_dtype, torch.bfloat16)
    return torch.bfloat16 if stored == torch.float32 else stored


def build_engine(options: EngineOptions) -> Engine:
    spec = read_spec(options.checkpoint)
    mode = {"int4_awq": "int4"}.get(options.quantization, options.quantization)
    if mode not in MODES:
        raise UnsupportedCheckpoint(
            f"quantization {options.quantization!r} is not one of none, int8, int4, int4_awq, fp8"
        )
    if spec.stored_quantization and mode != "none":
        expected = "fp8" if spec.stored_quantization == "modelopt_fp8" else "int4"
        if mode != expected:
            raise UnsupportedCheckpoint(
                f"the checkpoint is already quantized ({spec.stored_quantization}); "
                f"set quantization to 'none' or '{expected}'"
            )
    device = torch.device(options.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UnsupportedCheckpoint("device cuda was asked for but no GPU is visible")
    dtype = choose_dtype(spec, options.dtype, device)
    if mode == "fp8" and device.type == "cpu" and not spec.stored_quantization:
        pass  # FP8 on CPU dequantizes per matmul: correct, slow; useful for checking accuracy
    group = spec.quant_group_size if spec.stored_quantization else options.group_size
    tensors = read_tensors(options.checkpoint)
    model = LlamaModel(
        spec, tensors, "none" if spec.stored_quantization else mode, dtype, device, group
    )
    del tensors
    model.eval()
    pool = BlockPool(
        spec, options.kv_cache_tokens, dtype, device, prefix_caching=options.prefix_caching
    )
    prefill_tokens = options.prefill_tokens or (8192 if device.type == "cuda" else 512)
    return Engine(
        model,
        pool,
        options.max_batch_size,
        options.max_queue_size,
        prefill_tokens,
        cuda_graphs=options.cuda_graphs,
    )
