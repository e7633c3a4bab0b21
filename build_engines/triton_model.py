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

TEMPLATE_DIR = Path(__file__).resolve().parent.parent / "model_repo_templates" / "tensorrt_llm"
PLACEHOLDER = re.compile(r"\$\{(\w+)\}")

# Every optional parameter of the template, at the value the backend would use anyway or
# "" (unset: see the template's header). Chosen explicitly rather than left as literal
# placeholders, which some callers (and Triton's parser, outside quotes) reject.
TENSORRT_LLM_DEFAULTS: dict[str, str] = {
    "triton_backend": "tensorrtllm",
    "decoupled_mode": "true",
    "max_queue_delay_microseconds": "0",
    "max_queue_size": "0",
    "batching_strategy": "inflight_fused_batching",
    "encoder_input_features_data_type": "TYPE_FP16",
    "logits_datatype": "TYPE_FP32",  # trtllm-build runs with --logits_dtype float32
    "prompt_embedding_table_data_type": "TYPE_FP16",
    "max_beam_width": "1",
    "encoder_engine_dir": "",
    "max_tokens_in_paged_kv_cache": "",
    "max_attention_window_size": "",
    "sink_token_length": "",
    "batch_scheduler_policy": "guaranteed_no_evict",
    "kv_cache_free_gpu_mem_fraction": "0.9",
    "cross_kv_cache_fraction": "",
    "kv_cache_host_memory_bytes": "0",
    "kv_cache_onboard_blocks": "true",
    "enable_trt_overlap": "false",
    # The gateway detokenizes generated ids only, as the torch engine returns them.
    "exclude_input_in_output": "true",
    "cancellation_check_period_ms": "100",
    "stats_check_period_ms": "100",
    "iter_stats_max_iterations": "1000",
    "request_stats_max_iterations": "0",
    # Engines are built with paged context FMHA, which both of these need.
    "enable_kv_cache_reuse": "true",
    "enable_chunked_context": "true",
    "normalize_log_probs": "true",
    "participant_ids": "",
    "num_nodes": "1",
    "lora_cache_optimal_adapter_size": "",
    "lora_cache_max_adapter_size": "",
    "lora_cache_gpu_memory_fraction": "",
    "lora_cache_host_memory_bytes": "",
    "lora_prefetch_dir": "",
    "decoding_mode": "",
    "lookahead_window_size": "",
    "lookahead_ngram_size": "",
    "lookahead_verification_set_size": "",
    "medusa_choices": "",
    "eagle_choices": "",
    "gpu_weights_percent": "1.0",
    "enable_context_fmha_fp32_acc": "false",
    "multi_block_mode": "true",
    "cuda_graph_mode": "false",
    "cuda_graph_cache_size": "0",
    "speculative_decoding_fast_logits": "false",
    "guided_decoding_backend": "",
    "xgrammar_tokenizer_info_path": "",
}


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
