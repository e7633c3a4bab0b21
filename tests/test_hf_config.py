"""config.json as both the build pipeline and the torch engine read it (cortex/hf_config.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cortex.hf_config import ConfigError, read_config, read_shape, shape_of

BASE = {
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 64,
    "num_attention_heads": 4,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "vocab_size": 100,
}


def test_transformers_5_and_older_spellings_give_the_same_shape() -> None:
    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0}
    older = BASE | {"torch_dtype": "bfloat16", "rope_theta": 500000.0, "rope_scaling": llama3}
    newer = BASE | {"dtype": "bfloat16", "rope_parameters": {"rope_theta": 500000.0, **llama3}}
    assert shape_of(older) == shape_of(newer)
    shape = shape_of(newer)
    assert shape.dtype == "bfloat16" and shape.rope.theta == 500000.0
    assert shape.rope.kind == "llama3" and shape.rope.scaling == llama3
    assert shape.num_kv_heads == 4 and shape.head_dim == 16  # defaults from the heads


def test_the_newer_dtype_key_wins_and_plain_rope_has_no_scaling() -> None:
    shape = shape_of(BASE | {"dtype": "float16", "torch_dtype": "float32"})
    assert shape.dtype == "float16"
    assert shape.rope.kind == "default" and shape.rope.scaling is None
    assert shape.rope.theta == 10000.0


def test_errors_name_the_file_and_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"has no config\.json"):
        read_config(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(ConfigError, match="is not a JSON object"):
        read_config(tmp_path)
    missing = {k: v for k, v in BASE.items() if k != "vocab_size"}
    (tmp_path / "config.json").write_text(json.dumps(missing), encoding="utf-8")
    with pytest.raises(ConfigError, match=r"config\.json lacks vocab_size"):
        read_shape(tmp_path)
    with pytest.raises(ConfigError, match="mangles"):
        shape_of(BASE | {"hidden_size": "wide"})
