"""What an operator asked `cortex build-engine` for: plain, frozen data.

`BuildRequest` holds the flags as given; `resolve` fills the defaults that depend on the
checkpoint (name, lengths, calibration size, KV-cache quantization, export dtype).
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cortex.config import EngineKind

if TYPE_CHECKING:
    from build_engines.checkpoint import CheckpointInfo


class Quantization(enum.StrEnum):
    FP8 = "fp8"
    INT4_AWQ = "int4_awq"
    NONE = "none"


class KvCacheQuantization(enum.StrEnum):
    AUTO = "auto"
    FP8 = "fp8"
    NONE = "none"


class ExportDtype(enum.StrEnum):
    AUTO = "auto"
    BFLOAT16 = "bfloat16"
    FLOAT16 = "float16"


DEFAULT_MAX_BATCH_SIZE = 64
DEFAULT_MAX_NUM_TOKENS = 8192
DEFAULT_MAX_SEQ_LEN_CAP = 8192
DEFAULT_CALIB_SEQ_LEN = 512
# TensorRT-LLM's quantize.py uses 512 samples; AWQ's search makes each sample cost more, and
# its README calibrates AWQ on 32.
DEFAULT_CALIB_SIZE = {Quantization.FP8: 512, Quantization.INT4_AWQ: 64, Quantization.NONE: 0}
DEFAULT_AWQ_GROUP_SIZE = 128


@dataclass(frozen=True)
class BuildRequest:
    checkpoint: Path
    quant: Quantization
    output: Path
    tp: int = 1
    pp: int = 1
    engine: EngineKind = EngineKind.TRTLLM
    name: str | None = None
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
    max_input_len: int | None = None
    max_seq_len: int | None = None
    max_num_tokens: int = DEFAULT_MAX_NUM_TOKENS
    calib_dataset: Path | None = None
    calib_size: int | None = None
    calib_seq_len: int = DEFAULT_CALIB_SEQ_LEN
    awq_group_size: int = DEFAULT_AWQ_GROUP_SIZE
    kv_cache: KvCacheQuantization = KvCacheQuantization.AUTO
    dtype: ExportDtype = ExportDtype.AUTO
    # Where ModelOpt calibrates: "auto" is the first GPU when torch sees one, else the CPU.
    device: str = "auto"
    kv_cache_free_gpu_mem_fraction: float = 0.9
    force: bool = False

    @property
    def world_size(self) -> int:
        return self.tp * self.pp

    @property
    def quantized(self) -> bool:
        return self.quant is not Quantization.NONE

    @property
    def kv_cache_fp8(self) -> bool:
        return self.kv_cache is KvCacheQuantization.FP8

    def describe(self) -> dict[str, Any]:
        """JSON-able form (paths as strings, enums as values) for records and manifests."""
        out: dict[str, Any] = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            out[field.name] = value.value if isinstance(value, enum.Enum) else value
            if isinstance(value, Path):
                out[field.name] = str(value)
        return out


def default_name(request: BuildRequest) -> str:
    parts = [request.checkpoint.resolve().name, request.quant.value.replace("_", "-")]
    parts.append(f"tp{request.tp}")
    if request.pp > 1:
        parts.append(f"pp{request.pp}")
    if request.engine is EngineKind.TORCH:
        parts.append("torch")
    return "-".join(parts)


def resolve(request: BuildRequest, info: CheckpointInfo) -> BuildRequest:
    """Fill every default that depends on the checkpoint; the result has no None left."""
    wanted = max(DEFAULT_MAX_SEQ_LEN_CAP, request.max_input_len or 0)
    max_seq_len = request.max_seq_len or min(info.context_length, wanted)
    max_input_len = request.max_input_len or max_seq_len
    kv_cache = request.kv_cache
    if kv_cache is KvCacheQuantization.AUTO:
        # "FP8" means weights and KV cache for TensorRT-LLM; the torch engine keeps its own
        # KV cache in the compute dtype, so it gets no KV scales it would ignore.
        fp8_kv = request.quant is Quantization.FP8 and request.engine is EngineKind.TRTLLM
        kv_cache = KvCacheQuantization.FP8 if fp8_kv else KvCacheQuantization.NONE
    dtype = request.dtype
    if dtype is ExportDtype.AUTO:
        dtype = ExportDtype.FLOAT16 if info.torch_dtype == "float16" else ExportDtype.BFLOAT16
    calib_size = request.calib_size
    if calib_size is None:
        calib_size = DEFAULT_CALIB_SIZE[request.quant]
    return dataclasses.replace(
        request,
        checkpoint=request.checkpoint.resolve(),
        output=request.output.resolve(),
        name=request.name or default_name(request),
        max_seq_len=max_seq_len,
        max_input_len=max_input_len,
        kv_cache=kv_cache,
        dtype=dtype,
        calib_size=calib_size,
        calib_dataset=request.calib_dataset.resolve() if request.calib_dataset else None,
    )
