"""What the neuron needs to know of a GGUF file before llama.cpp opens it: its architecture,
context, the shape that sizes the KV cache, and whether it is an embedding model.

Read straight from the file's header (the format is llama.cpp's `gguf.md`: magic, version,
tensor and key counts, then typed key/value pairs) with `struct` over a memory map. Metadata
arrays are skipped, not decoded (a 150k-token vocabulary is a few milliseconds), so the neuron
reads any file in well under a second, whatever its architecture. Imports nothing of llama.cpp,
numpy or torch: the neuron agent's catalogue uses it.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MAGIC = b"GGUF"
# Value types: struct format of the scalar ones; 8 is a string, 9 an array.
_SCALARS = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_STRING, _ARRAY = 8, 9
# Architectures llama.cpp serves as embedding models (no causal language-model head).
EMBEDDING_ARCHITECTURES = frozenset(
    {
        "bert",
        "nomic-bert",
        "nomic-bert-moe",
        "jina-bert-v2",
        "jina-bert-v3",
        "modern-bert",
        "neo-bert",
        "t5encoder",
        "gemma-embedding",
    }
)
# llama.cpp's pooling types (`enum llama_pooling_type`), by the number a file stores.
POOLING = {0: "none", 1: "mean", 2: "cls", 3: "last", 4: "rank"}


class GgufError(Exception):
    """The file is not a GGUF llama.cpp could read; the message says why, in one line."""


@dataclass(frozen=True)
class ArrayInfo:
    """A metadata array, counted and not decoded."""

    element_type: int
    length: int


@dataclass(frozen=True)
class GgufInfo:
    path: Path
    file_bytes: int
    architecture: str
    context_length: int
    layers: int
    embedding_length: int
    heads: int
    kv_heads: int  # the largest over the layers where it differs (hybrid models)
    key_length: int
    value_length: int
    vocab_size: int
    pooling: str | None  # what the file declares, for embedding models
    eos_token_ids: tuple[int, ...]
    has_chat_template: bool

    @property
    def is_embedding(self) -> bool:
        return self.architecture in EMBEDDING_ARCHITECTURES

    def kv_bytes_per_token(self, element_bytes: int = 2) -> int:
        """llama.cpp's KV cache per token (f16 keys and values by default)."""
        return self.layers * self.kv_heads * (self.key_length + self.value_length) * element_bytes


def read_metadata(path: Path) -> dict[str, Any]:
    """Every key of the header: scalars and strings as values, arrays as `ArrayInfo`."""
    try:
        with open(path, "rb") as file:
            size = path.stat().st_size
            if size < 24:
                raise GgufError(f"{path.name} is too short to be a GGUF file")
            with mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data:
                return _parse(data, path)
    except OSError as error:
        raise GgufError(f"{path} cannot be read: {error.strerror or error}") from None
    except (struct.error, UnicodeDecodeError, IndexError) as error:
        raise GgufError(f"{path.name}: the GGUF header is damaged ({error})") from None


def _parse(data: mmap.mmap, path: Path) -> dict[str, Any]:
    if data[:4] != MAGIC:
        raise GgufError(f"{path.name} is not a GGUF file (no GGUF magic)")
    version, _tensors, count = struct.unpack_from("<IQQ", data, 4)
    if version < 2:
        raise GgufError(f"{path.name}: GGUF version {version} is too old for llama.cpp")
    offset = 24
    values: dict[str, Any] = {}

    def string(at: int) -> tuple[str, int]:
        (length,) = struct.unpack_from("<Q", data, at)
        at += 8
        return bytes(data[at : at + length]).decode("utf-8"), at + length

    def skip_string(at: int) -> int:
        (length,) = struct.unpack_from("<Q", data, at)
        return at + 8 + int(length)

    for _ in range(count):
        key, offset = string(offset)
        (kind,) = struct.unpack_from("<I", data, offset)
        offset += 4
        if kind in _SCALARS:
            fmt = _SCALARS[kind]
            (values[key],) = struct.unpack_from(fmt, data, offset)
            offset += struct.calcsize(fmt)
        elif kind == _STRING:
            values[key], offset = string(offset)
        elif kind == _ARRAY:
            element, length = struct.unpack_from("<IQ", data, offset)
            offset += 12
            if element in _SCALARS:
                width = struct.calcsize(_SCALARS[element])
                if length <= 1024:  # small numeric arrays (per-layer head counts) are kept
                    values[key] = list(
                        struct.unpack_from(f"<{length}{_SCALARS[element][1]}", data, offset)
                    )
                else:
                    values[key] = ArrayInfo(element, length)
                offset += width * length
            elif element == _STRING:
                for _ in range(length):
                    offset = skip_string(offset)
                values[key] = ArrayInfo(element, length)
            else:
                raise GgufError(f"{path.name}: key {key} holds an array of arrays")
        else:
            raise GgufError(f"{path.name}: key {key} has unknown value type {kind}")
    return values


def read_info(path: Path) -> GgufInfo:
    """The file's `GgufInfo`, or `GgufError` with the reason."""
    meta = read_metadata(path)
    arch = meta.get("general.architecture")
    if not isinstance(arch, str):
        raise GgufError(f"{path.name}: the GGUF metadata lacks general.architecture")

    def number(key: str, default: int | None = None) -> int:
        value = meta.get(f"{arch}.{key}", default)
        if isinstance(value, list):
            value = max(value) if value else default
        if value is None:
            raise GgufError(f"{path.name}: the GGUF metadata lacks {arch}.{key}")
        return int(value)

    embedding = number("embedding_length")
    heads = number("attention.head_count", 0)
    head_dim = embedding // heads if heads else 0
    tokens = meta.get("tokenizer.ggml.tokens")
    vocab = tokens.length if isinstance(tokens, ArrayInfo) else number("vocab_size", 0)
    pooling = meta.get(f"{arch}.pooling_type")
    eos = [meta.get("tokenizer.ggml.eos_token_id"), meta.get("tokenizer.ggml.eot_token_id")]
    return GgufInfo(
        path=path,
        file_bytes=path.stat().st_size,
        architecture=arch,
        context_length=number("context_length", 4096),
        layers=number("block_count"),
        embedding_length=embedding,
        heads=heads,
        kv_heads=number("attention.head_count_kv", heads),
        key_length=number("attention.key_length", head_dim),
        value_length=number("attention.value_length", head_dim),
        vocab_size=vocab,
        pooling=POOLING.get(int(pooling)) if isinstance(pooling, int) else None,
        eos_token_ids=tuple(dict.fromkeys(int(i) for i in eos if isinstance(i, int))),
        has_chat_template=isinstance(meta.get("tokenizer.chat_template"), str),
    )
