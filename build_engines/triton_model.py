"""Fill the `tensorrt_llm` Triton model template (model_repo_templates/tensorrt_llm/).

`tensorrt_llm_values` returns a value for every placeholder of TensorRT-LLM's own template;
`render_tensorrt_llm_config` fills it and refuses to leave any placeholder behind. The
neuron agent fills the same template when it loads a model on chosen GPUs; it can pass its
own `gpu_device_ids` and KV-cache budget through `overrides`.
"""

from __future__ import annotations

import re
import string
from pathlib import Path

from build_engines.errors import BuildError
from model_repo_templates import TENSORRT_LLM_DEFAULTS

TEMPLATE_DIR = Path(__file__).resolve().parent.parent / "model_repo_templates" / "tensorrt_llm"
PLACEHOLDER = re.compile(r"\$\{(\w+)\}")


def template_text() -> str:
    return (TEMPLATE_DIR / "config.pbtxt").read_text(encoding="utf-8")


def template_placeholders(text: str | None = None) -> set[str]:
    return set(PLACEHOLDER.findall(template_text() if text is None else text))


def tensorrt_llm_values(
    engine_dir: Path,
    tokenizer_dir: Path,
    max_batch_size: int,
    world_size: int,
    kv_cache_free_gpu_mem_fraction: float = 0.9,
    overrides: dict[str, str] | None = None,
) -> dict[str, str]:
    """A value for every placeholder; GPUs default to 0..world_size-1 (the neuron reassigns)."""
    values = dict(TENSORRT_LLM_DEFAULTS)
    values.update(
        triton_max_batch_size=str(max_batch_size),
        engine_dir=str(engine_dir),
        tokenizer_dir=str(tokenizer_dir),
        gpu_device_ids=",".join(str(gpu) for gpu in range(world_size)),
        kv_cache_free_gpu_mem_fraction=f"{kv_cache_free_gpu_mem_fraction:g}",
    )
    values.update(overrides or {})
    return values


def render_tensorrt_llm_config(values: dict[str, str], text: str | None = None) -> str:
    """The filled config.pbtxt; raises BuildError naming any placeholder left without a value."""
    text = template_text() if text is None else text
    missing = sorted(template_placeholders(text) - set(values))
    if missing:
        raise BuildError(
            f"tensorrt_llm template placeholders without a value: {', '.join(missing)}"
        )
    for key, value in values.items():
        if '"' in value or "\n" in value:
            raise BuildError(f"tensorrt_llm template value for {key} holds a quote or newline")
    return string.Template(text).substitute({k: values[k] for k in template_placeholders(text)})
