"""A Hugging Face checkpoint's `config.json`, read once for everyone who needs its shape: the
build pipeline (`build_engines/checkpoint.py`) and the torch engine
(`neuron_agent/torch_engine/checkpoint.py`). Each caller raises its own error type from
`ConfigError` and adds what only it needs.

Both spellings transformers has used are read: `dtype` (transformers 5) or `torch_dtype`, and
`rope_parameters` (transformers 5) or `rope_theta` + `rope_scaling`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

# config.json missing, unreadable or lacking what the shape needs is a configuration error like
# any other: one class for both (re-exported here for the checkpoint readers).
from cortex.config import ConfigError

__all__ = [
    "ConfigError",
    "ConfigShape",
    "Dimensions",
    "Rope",
    "read_config",
    "read_json_object",
    "read_shape",
    "rope_of",
    "shape_of",
]


@dataclass(frozen=True)
class Rope:
    theta: float
    # The scaling settings, merged from both spellings; None for plain rope.
    scaling: dict[str, Any] | None

    @property
    def kind(self) -> str:
        if self.scaling is None:
            return "default"
        return str(self.scaling.get("rope_type") or self.scaling.get("type") or "default")


@dataclass(frozen=True)
class Dimensions:
    """The transformer's sizes; the build pipeline's and the engine's views of a checkpoint
    extend this."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int

    def dimensions(self) -> dict[str, Any]:
        """These fields alone, as keyword arguments for another `Dimensions`."""
        return {f.name: getattr(self, f.name) for f in fields(Dimensions)}


@dataclass(frozen=True)
class ConfigShape(Dimensions):
    architecture: str  # "(none)" when config.json names none
    model_type: str
    dtype: str
    max_position_embeddings: int
    rope: Rope


def read_shape(folder: Path) -> tuple[dict[str, Any], ConfigShape]:
    """A checkpoint folder's config.json, and its shape."""
    config = read_config(folder)
    return config, shape_of(config, str(folder / "config.json"))


def read_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.exists():
        raise ConfigError(f"{folder} has no config.json: not a Hugging Face checkpoint folder")
    return read_json_object(path)


def read_json_object(path: Path) -> dict[str, Any]:
    """A checkpoint's JSON file (config.json, tokenizer_config.json) that must hold an object."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConfigError(f"{path} cannot be read: {error}") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{path} is not a JSON object")
    return value


def rope_of(config: dict[str, Any]) -> Rope:
    parameters = dict(config.get("rope_parameters") or {})
    theta = float(parameters.pop("rope_theta", config.get("rope_theta", 10000.0)))
    scaling = dict(config.get("rope_scaling") or {}) | parameters
    kind = scaling.get("rope_type") or scaling.get("type") or "default"
    return Rope(theta, None if kind == "default" else scaling)


def shape_of(config: dict[str, Any], source: str = "config.json") -> ConfigShape:
    """The fields every caller reads; `source` names the file in errors."""
    architectures = config.get("architectures") or []
    try:
        hidden = int(config["hidden_size"])
        heads = int(config["num_attention_heads"])
        return ConfigShape(
            architecture=str(architectures[0]) if architectures else "(none)",
            model_type=str(config.get("model_type", "")),
            dtype=str(config.get("dtype") or config.get("torch_dtype") or "float32"),
            vocab_size=int(config["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(config["intermediate_size"]),
            num_layers=int(config["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(config.get("head_dim") or hidden // heads),
            max_position_embeddings=int(config.get("max_position_embeddings", 4096)),
            rope=rope_of(config),
        )
    except KeyError as error:
        raise ConfigError(f"{source} lacks {error.args[0]}") from None
    except (TypeError, ValueError, ZeroDivisionError) as error:
        raise ConfigError(f"{source} mangles a value: {error}") from None
