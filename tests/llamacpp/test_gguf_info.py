"""The neuron's own GGUF header reader (no llama.cpp, no numpy) against the `gguf` package's
reader, llama.cpp's own Python one, on real files; a damaged file is one clear line."""

from __future__ import annotations

from pathlib import Path

import gguf
import pytest

from cortex.demo.smollm2 import gguf_path
from neuron_agent.engines.llamacpp.gguf_info import ArrayInfo, GgufError, read_info, read_metadata


def field(reader: gguf.GGUFReader, key: str) -> object:
    return reader.fields[key].contents()


@pytest.mark.parametrize("which", ["smollm2", "moe"])
def test_the_header_reads_as_the_gguf_package_reads_it(
    which: str, smollm2_model: Path, moe_gguf: Path
) -> None:
    path = gguf_path(smollm2_model) if which == "smollm2" else moe_gguf
    reader = gguf.GGUFReader(path)
    meta = read_metadata(path)
    assert set(meta) == set(reader.fields) - {"GGUF.version", "GGUF.tensor_count", "GGUF.kv_count"}
    for key, value in meta.items():
        if isinstance(value, ArrayInfo):
            assert value.length == len(reader.fields[key].data), key
        else:
            assert value == pytest.approx(field(reader, key)), key
    info = read_info(path)
    arch = field(reader, "general.architecture")
    assert info.architecture == arch
    assert info.layers == field(reader, f"{arch}.block_count")
    assert info.kv_heads == field(reader, f"{arch}.attention.head_count_kv")
    assert info.vocab_size == len(reader.fields["tokenizer.ggml.tokens"].data)
    assert info.file_bytes == path.stat().st_size


def test_a_damaged_file_is_one_line(tmp_path: Path, smollm2_model: Path) -> None:
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(gguf_path(smollm2_model).read_bytes()[:4096])
    with pytest.raises(GgufError, match="damaged"):
        read_info(cut)
    other = tmp_path / "other.gguf"
    other.write_bytes(b"not a model at all, just text" * 4)
    with pytest.raises(GgufError, match="no GGUF magic"):
        read_info(other)
