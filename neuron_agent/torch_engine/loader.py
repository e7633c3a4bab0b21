"""Build a ready Engine from a checkpoint folder and the profile's parameters.

At `tp > 1` this process becomes rank 0: it starts the other ranks (`ranks.py`), each loads its
own shard of the same checkpoint, and the engine's scheduler drives them all through rank 0's
model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from neuron_agent.torch_engine.checkpoint import ModelSpec, read_spec, read_tensors
from neuron_agent.torch_engine.errors import UnsupportedCheckpoint
from neuron_agent.torch_engine.guided import tokenizer_json_guides
from neuron_agent.torch_engine.kv_cache import BlockPool
from neuron_agent.torch_engine.llama import LlamaModel, preload_attention
from neuron_agent.torch_engine.parallel import Shard, check_shardable
from neuron_agent.torch_engine.quant import MODES
from neuron_agent.torch_engine.scheduler import Engine
from neuron_agent.torch_engine.speculation import SpeculationMethod, SpeculationSettings


@dataclass(frozen=True)
class EngineOptions:
    checkpoint: Path
    quantization: str = "none"  # none | int8 | int4 | int4_awq | fp8
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    device: str = "cpu"
    kv_cache_tokens: int = 65536
    max_batch_size: int = 8
    max_queue_size: int = 256
    prefill_tokens: int = 0  # 0: 512 on CPU, 16384 on a GPU
    group_size: int = 128
    cuda_graphs: bool = True
    # Reuse the KV blocks of earlier requests' equal prompt prefixes (kv_cache's docstring).
    prefix_caching: bool = True
    kv_cache_dtype: str = "auto"  # auto | fp8 (kv_cache's docstring)
    host_kv_cache_bytes: int = 0  # the prefix cache's host tier (kv_cache.HostTier); 0: none
    # Every matmul through one fixed-tile kernel: output independent of the batch it ran in.
    batch_invariant: bool = False
    # Model-free speculative decoding (speculation.py): off | ngram, the most candidates a
    # sequence proposes per step, and the largest batch that still speculates.
    speculation: str = "off"
    speculative_tokens: int = 4
    speculative_max_batch: int = 4
    # Tensor-parallel ranks, and each rank's device ("cuda:0", "cuda:1"; empty: all on `device`).
    tp: int = 1
    devices: tuple[str, ...] = ()
    # Shown on the other ranks' command lines: the neuron finds a model's processes by it.
    label: str = ""
    # The model's tokenizer.json folder (the gateway's tokenizer): guided decoding's masks.
    tokenizer_dir: Path | None = None

    def device_of(self, rank: int) -> torch.device:
        if not self.devices:
            return torch.device(self.device)
        if len(self.devices) != self.tp:
            raise UnsupportedCheckpoint(
                f"tp = {self.tp} needs {self.tp} devices, got {len(self.devices)}: "
                + ", ".join(self.devices)
            )
        return torch.device(self.devices[rank])


def rank_devices(device: str, gpu_device_ids: str) -> tuple[str, ...]:
    """Each rank's device from the model's Triton parameters: `gpu_device_ids` ("0,1", the NVML
    indices the neuron placed the model on, as TensorRT-LLM's template takes them) on a GPU
    node; empty (every rank on `device`) on a CPU one."""
    ids = [i.strip() for i in gpu_device_ids.split(",") if i.strip()]
    if not ids or not device.startswith("cuda"):
        return ()
    return tuple(f"cuda:{i}" for i in ids)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def choose_dtype(spec: ModelSpec, requested: str, device: torch.device) -> torch.dtype:
    if requested != "auto":
        return DTYPES[requested]
    if device.type == "cpu":
        return torch.float32  # CPU bf16 matmuls are slow and less exact; fp32 is the reference
    stored = DTYPES.get(spec.torch_dtype, torch.bfloat16)
    return torch.bfloat16 if stored == torch.float32 else stored


@dataclass(frozen=True)
class LoadPlan:
    """What every rank loads: checked once, before any rank starts."""

    spec: ModelSpec
    mode: str
    group: int


def plan(options: EngineOptions) -> LoadPlan:
    spec = read_spec(options.checkpoint)
    mode = {"int4_awq": "int4"}.get(options.quantization, options.quantization)
    if mode not in MODES:
        raise UnsupportedCheckpoint(
            f"quantization {options.quantization!r} is not one of none, int8, int4, int4_awq, fp8"
        )
    if spec.stored_quantization and mode != "none":
        expected = {"modelopt_fp8": "fp8", "modelopt_int4_awq": "int4"}.get(
            spec.stored_quantization
        )
        if mode != expected:
            raise UnsupportedCheckpoint(
                f"the checkpoint is already quantized ({spec.stored_quantization}); "
                f"set quantization to 'none'" + (f" or '{expected}'" if expected else "")
            )
    if options.tp < 1:
        raise UnsupportedCheckpoint(f"tp must be at least 1, got {options.tp}")
    if options.tp > 1 and options.host_kv_cache_bytes:
        # The other ranks' caches follow the leader's slots, not its host copies.
        raise UnsupportedCheckpoint("host_kv_cache_gib needs tp = 1 (the torch engine's host tier)")
    for rank in range(options.tp):
        device = options.device_of(rank)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UnsupportedCheckpoint("device cuda was asked for but no GPU is visible")
    group = spec.quant_group_size if spec.stored_quantization else options.group_size
    check_shardable(spec, options.tp, mode, group)
    return LoadPlan(spec, mode, group)


def load_shard(
    options: EngineOptions,
    planned: LoadPlan,
    shard: Shard,
    model_type: Callable[..., LlamaModel] = LlamaModel,
) -> tuple[LlamaModel, BlockPool]:
    """This rank's model and KV cache (the whole model at tp = 1)."""
    device = options.device_of(shard.rank)
    dtype = choose_dtype(planned.spec, options.dtype, device)
    # Memory-mapped: a rank reads only the rows and columns of its shard.
    tensors = read_tensors(options.checkpoint)
    stored = planned.spec.stored_quantization
    model = model_type(
        planned.spec,
        tensors,
        "none" if stored else planned.mode,
        dtype,
        device,
        planned.group,
        shard,
    )
    del tensors
    model.eval()
    if options.batch_invariant:
        model.make_batch_invariant()
    if device.type == "cuda":
        preload_attention()
    # model.spec is the rank's: its kv heads are what its cache holds.
    pool = BlockPool(
        model.spec,
        options.kv_cache_tokens,
        dtype,
        device,
        prefix_caching=options.prefix_caching,
        kv_cache_dtype=options.kv_cache_dtype,
        host_cache_bytes=options.host_kv_cache_bytes,
    )
    return model, pool


def new_engine(
    options: EngineOptions, model: LlamaModel, pool: BlockPool, cuda_graphs: bool
) -> Engine:
    prefill_tokens = options.prefill_tokens or (16384 if model.device.type == "cuda" else 512)
    return Engine(
        model,
        pool,
        options.max_batch_size,
        options.max_queue_size,
        prefill_tokens,
        cuda_graphs=cuda_graphs,
        guides=tokenizer_json_guides(
            options.tokenizer_dir, model.spec.vocab_size, frozenset(model.spec.eos_token_ids)
        ),
        speculation=speculation_settings(options),
    )


def speculation_settings(options: EngineOptions) -> SpeculationSettings:
    try:
        method = SpeculationMethod(options.speculation)
        return SpeculationSettings(
            method, options.speculative_tokens, options.speculative_max_batch
        )
    except ValueError as error:
        raise UnsupportedCheckpoint(f"speculation: {error}") from None


def build_engine(options: EngineOptions) -> Engine:
    planned = plan(options)
    if options.tp > 1:
        from neuron_agent.torch_engine.ranks import build_parallel_engine

        return build_parallel_engine(options, planned)
    model, pool = load_shard(options, planned, Shard())
    return new_engine(options, model, pool, options.cuda_graphs)


def close_engine(engine: Engine) -> None:
    """Stop the engine and, at tp > 1, its other ranks (no process is left behind)."""
    engine.stop()
    from neuron_agent.torch_engine.ranks import LeaderModel

    if isinstance(engine.model, LeaderModel):
        engine.model.ranks.close()
