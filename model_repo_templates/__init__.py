"""Triton model-directory templates that the neuron agent fills from a model's profile.

torch_llm/      our torch engine (Python backend), TensorRT-LLM's tensor names
llamacpp_llm/   the llama.cpp engine (Python backend, GGUF files as they are), the same names
tensorrt_llm/   the `tensorrtllm` C++ backend model for engines `cortex build-engine` built
"""

from __future__ import annotations

from pathlib import Path

TEMPLATES_DIR = Path(__file__).parent

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
