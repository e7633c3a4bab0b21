"""Read a Hugging Face checkpoint folder without loading it, and refuse what cannot be built.

`inspect_checkpoint` reads config.json, the safetensors headers and the file listing (cheap:
no weights are read); `validate` checks a request against it and raises `InvalidRequest` with
one line naming what is wrong. Hashing the weights is the (resumable) inspect stage.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from build_engines.errors import InvalidRequest
from build_engines.request import BuildRequest, Quantization
from cortex.config import EngineKind
from cortex.hf_config import ConfigError, Dimensions, read_json_object, read_shape

# Architecture → ModelOpt's `decoder_type` for the TensorRT-LLM export (None: torch engine only).
ARCHITECTURES: dict[str, str | None] = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen",
    "Qwen3ForCausalLM": None,
}
# Files the gateway needs to tokenize and render chats; copied next to every export.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)
# TensorRT-LLM's fine-grained W4A16 kernels take only these (cutlass fpA_intB "Only group size
# 64 and 128 supported for fine grained kernels").
TRTLLM_AWQ_GROUP_SIZES = (64, 128)
# The model names models.toml accepts.
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class SourceFile:
    path: str  # relative to the checkpoint folder
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class CheckpointInfo(Dimensions):
    path: Path
    architecture: str
    model_type: str
    torch_dtype: str
    context_length: int
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    parameter_count: int
    weight_bytes: int
    has_tokenizer: bool
    has_chat_template: bool
    quantization_config: dict[str, Any] | None
    files: tuple[SourceFile, ...] = ()
    warnings: tuple[str, ...] = field(default=())

    @property
    def decoder_type(self) -> str | None:
        return ARCHITECTURES.get(self.architecture)

    def fingerprint(self) -> str:
        """Cheap identity of the folder's contents: names, sizes and modification times."""
        digest = hashlib.sha256()
        for item in self.files:
            digest.update(f"{item.path}\0{item.size}\0{item.mtime_ns}\n".encode())
        return digest.hexdigest()

    def summary(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "architecture": self.architecture,
            "dtype": self.torch_dtype,
            "parameters": self.parameter_count,
            "weight_bytes": self.weight_bytes,
            "context_length": self.context_length,
            "layers": self.num_layers,
            "heads": self.num_heads,
            "kv_heads": self.num_kv_heads,
            "rope_theta": self.rope_theta,
        }


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return read_json_object(path)
    except ConfigError as error:
        raise InvalidRequest(str(error)) from None


def _safetensors_parameters(path: Path) -> int:
    """Parameter count from a safetensors header (8-byte length + JSON), no tensor read."""
    try:
        with path.open("rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
    except (OSError, struct.error, ValueError) as error:
        raise InvalidRequest(f"{path} is not a readable safetensors file: {error}") from None
    count = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        numel = 1
        for dim in entry["shape"]:
            numel *= int(dim)
        count += numel
    return count


def inspect_checkpoint(folder: Path) -> CheckpointInfo:
    """Everything the plan needs about a checkpoint, read from its config and headers."""
    if not folder.exists():
        raise InvalidRequest(f"checkpoint folder {folder} does not exist")
    if not folder.is_dir():
        raise InvalidRequest(f"{folder} is not a folder (expected a Hugging Face checkpoint)")
    try:
        config, shape = read_shape(folder)
    except ConfigError as error:
        raise InvalidRequest(str(error)) from None
    architecture = shape.architecture
    if architecture not in ARCHITECTURES:
        raise InvalidRequest(
            f"architecture {architecture} is not supported "
            f"(supported: {', '.join(sorted(ARCHITECTURES))})"
        )
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        raise InvalidRequest(
            f"{folder} has no .safetensors weights (convert .bin checkpoints to safetensors first)"
        )
    files = tuple(
        SourceFile(str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )
    tokenizer_config: dict[str, Any] = {}
    if (folder / "tokenizer_config.json").exists():
        tokenizer_config = _read_json(folder / "tokenizer_config.json")
    has_tokenizer = (folder / "tokenizer.json").exists() or (folder / "tokenizer.model").exists()
    has_chat_template = bool(tokenizer_config.get("chat_template")) or any(
        (folder / name).exists() for name in ("chat_template.jinja", "chat_template.json")
    )
    warnings = (
        ()
        if has_chat_template
        else (f"{folder} has no chat template: chat requests to this model will be refused",)
    )
    return CheckpointInfo(
        **shape.dimensions(),
        path=folder.resolve(),
        architecture=architecture,
        model_type=shape.model_type,
        torch_dtype=shape.dtype,
        context_length=shape.max_position_embeddings,
        rope_theta=shape.rope.theta,
        rope_scaling=shape.rope.scaling,
        parameter_count=sum(_safetensors_parameters(p) for p in weights),
        weight_bytes=sum(p.stat().st_size for p in weights),
        has_tokenizer=has_tokenizer,
        has_chat_template=has_chat_template,
        quantization_config=config.get("quantization_config"),
        files=files,
        warnings=warnings,
    )


def hash_checkpoint(info: CheckpointInfo, advance: Callable[[int], None] | None = None) -> str:
    """sha256 over every file's path and contents (the manifest's source checkpoint hash)."""
    digest = hashlib.sha256()
    for item in info.files:
        file_digest = hashlib.sha256()
        with (info.path / item.path).open("rb") as handle:
            while chunk := handle.read(1 << 22):
                file_digest.update(chunk)
                if advance:
                    advance(len(chunk))
        digest.update(f"{item.path}\0{file_digest.hexdigest()}\n".encode())
    return digest.hexdigest()


def awq_input_widths(info: CheckpointInfo, tp: int) -> dict[str, int]:
    """Per-GPU input width of every AWQ-quantized projection (what the group size must divide).

    Column-parallel projections (q/k/v, gate/up) keep the full hidden input; row-parallel ones
    (o_proj, down_proj) see 1/tp of theirs.
    """
    return {
        "hidden_size": info.hidden_size,
        "attention width (heads × head_dim) / tp": info.num_heads * info.head_dim // tp,
        "intermediate_size / tp": info.intermediate_size // tp,
    }


def validate(request: BuildRequest, info: CheckpointInfo) -> None:
    """Raise `InvalidRequest` (one line) for anything that would fail later, before any work."""
    if request.name is not None and not NAME_PATTERN.match(request.name):
        raise InvalidRequest(
            f"--name {request.name!r} must start with a letter or digit and hold only "
            "letters, digits, '.', '_' and '-'"
        )
    if request.tp < 1 or request.pp < 1:
        raise InvalidRequest(
            f"--tp and --pp must be at least 1 (got tp {request.tp}, pp {request.pp})"
        )
    if info.quantization_config:
        method = info.quantization_config.get("quant_method", "?")
        raise InvalidRequest(
            f"{info.path} is already quantized ({method}); pass the unquantized checkpoint"
        )
    if not info.has_tokenizer:
        raise InvalidRequest(
            f"{info.path} has no tokenizer.json or tokenizer.model: the gateway tokenizes with them"
        )
    if request.engine is EngineKind.TRTLLM and info.decoder_type is None:
        raise InvalidRequest(
            f"architecture {info.architecture} can be served by the torch engine only "
            "(use --engine torch)"
        )
    if request.engine is EngineKind.TORCH and request.world_size > 1:
        raise InvalidRequest(
            f"the torch engine serves a model on one device: use --tp 1 --pp 1 with --engine torch "
            f"(got tp {request.tp}, pp {request.pp})"
        )
    if info.num_heads % request.tp:
        raise InvalidRequest(
            f"--tp {request.tp} does not divide the model's {info.num_heads} attention heads"
        )
    kv = info.num_kv_heads
    if kv % request.tp and request.tp % kv:
        raise InvalidRequest(
            f"--tp {request.tp} and the model's {kv} KV heads do not divide one another"
        )
    if info.intermediate_size % request.tp:
        raise InvalidRequest(
            f"--tp {request.tp} does not divide the model's intermediate size {info.intermediate_size}"
        )
    if request.pp > info.num_layers:
        raise InvalidRequest(f"--pp {request.pp} exceeds the model's {info.num_layers} layers")
    if request.quant is Quantization.INT4_AWQ:
        _validate_awq(request, info)
    _validate_limits(request, info)
    if request.calib_dataset is not None and not request.calib_dataset.is_dir():
        raise InvalidRequest(f"calibration dataset folder {request.calib_dataset} does not exist")
    if request.calib_size is not None and request.quantized and request.calib_size < 1:
        raise InvalidRequest(f"--calib-size must be at least 1 (got {request.calib_size})")
    if not 0.0 < request.kv_cache_free_gpu_mem_fraction <= 1.0:
        raise InvalidRequest("--kv-cache-free-gpu-mem-fraction must be in (0, 1]")


def _validate_awq(request: BuildRequest, info: CheckpointInfo) -> None:
    group = request.awq_group_size
    if group < 2 or group % 2:
        raise InvalidRequest(f"--awq-group-size must be an even number ≥ 2 (got {group})")
    if request.engine is EngineKind.TRTLLM and group not in TRTLLM_AWQ_GROUP_SIZES:
        raise InvalidRequest(
            f"INT4-AWQ group size {group} cannot be built: TensorRT-LLM's W4A16 kernels take "
            f"only {' or '.join(map(str, TRTLLM_AWQ_GROUP_SIZES))}"
        )
    tp = request.tp if request.engine is EngineKind.TRTLLM else 1
    for what, width in awq_input_widths(info, tp).items():
        if width % group:
            hint = " or another --tp" if tp > 1 else ""
            raise InvalidRequest(
                f"INT4-AWQ group size {group} does not divide the {what} = {width} "
                f"(try another --awq-group-size{hint})"
            )


def _validate_limits(request: BuildRequest, info: CheckpointInfo) -> None:
    for flag, value in (
        ("--max-batch-size", request.max_batch_size),
        ("--max-num-tokens", request.max_num_tokens),
        ("--max-input-len", request.max_input_len),
        ("--max-seq-len", request.max_seq_len),
    ):
        if value is not None and value < 1:
            raise InvalidRequest(f"{flag} must be at least 1 (got {value})")
    if request.max_seq_len is not None and request.max_seq_len > info.context_length:
        raise InvalidRequest(
            f"--max-seq-len {request.max_seq_len} exceeds the model's context length "
            f"{info.context_length}"
        )
    if (
        request.max_input_len is not None
        and request.max_seq_len is not None
        and request.max_input_len > request.max_seq_len
    ):
        raise InvalidRequest(
            f"--max-input-len {request.max_input_len} exceeds --max-seq-len {request.max_seq_len}"
        )
