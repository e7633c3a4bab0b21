"""The `tensorrt_llm` template against TensorRT-LLM's own parameter set, filled and parsed with
Triton's model-config schema (tritonclient's model_config_pb2). The stock Triton here has no
`tensorrtllm` backend, so the config is parsed, not served."""

from __future__ import annotations

from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from build_engines.errors import BuildError
from build_engines.triton_model import (
    render_tensorrt_llm_config,
    template_placeholders,
    template_text,
    tensorrt_llm_values,
)


def words(text: str) -> list[str]:
    return text.split()


# The placeholders of TensorRT-LLM's triton_backend/all_models/inflight_batcher_llm/
# tensorrt_llm/config.pbtxt (NVIDIA/TensorRT-LLM commits 0c8de69 and 2a9abd9, the 1.2 line).
UPSTREAM_PLACEHOLDERS = {
    "triton_backend", "triton_max_batch_size", "decoupled_mode", "max_queue_delay_microseconds",
    "max_queue_size", "encoder_input_features_data_type", "logits_datatype",
    "prompt_embedding_table_data_type", "max_beam_width", "batching_strategy", "engine_dir",
    "encoder_engine_dir", "max_tokens_in_paged_kv_cache", "max_attention_window_size",
    "sink_token_length", "batch_scheduler_policy", "kv_cache_free_gpu_mem_fraction",
    "cross_kv_cache_fraction", "kv_cache_host_memory_bytes", "kv_cache_onboard_blocks",
    "enable_trt_overlap", "exclude_input_in_output", "cancellation_check_period_ms",
    "stats_check_period_ms", "iter_stats_max_iterations", "request_stats_max_iterations",
    "enable_kv_cache_reuse", "normalize_log_probs", "enable_chunked_context", "gpu_device_ids",
    "participant_ids", "num_nodes", "lora_cache_optimal_adapter_size",
    "lora_cache_max_adapter_size", "lora_cache_gpu_memory_fraction",
    "lora_cache_host_memory_bytes", "lora_prefetch_dir", "decoding_mode", "lookahead_window_size",
    "lookahead_ngram_size", "lookahead_verification_set_size", "medusa_choices", "eagle_choices",
    "gpu_weights_percent", "enable_context_fmha_fp32_acc", "multi_block_mode", "cuda_graph_mode",
    "cuda_graph_cache_size", "speculative_decoding_fast_logits", "tokenizer_dir",
    "guided_decoding_backend", "xgrammar_tokenizer_info_path",
}  # fmt: skip
# The same file's tensors, in order (the backend and the gateway rely on these names).
UPSTREAM_INPUTS = words(
    "input_ids encoder_input_features encoder_output_lengths input_lengths request_output_len "
    "num_return_sequences draft_input_ids decoder_input_ids decoder_input_lengths draft_logits "
    "draft_acceptance_threshold end_id pad_id stop_words_list bad_words_list embedding_bias "
    "beam_width temperature runtime_top_k runtime_top_p runtime_top_p_min runtime_top_p_decay "
    "runtime_top_p_reset_ids len_penalty early_stopping repetition_penalty min_tokens "
    "beam_search_diversity_rate presence_penalty frequency_penalty seed return_log_probs "
    "return_context_logits return_generation_logits return_perf_metrics "
    "return_num_input_tokens return_num_output_tokens exclude_input_in_output stop streaming "
    "prompt_embedding_table prompt_table_extra_ids prompt_vocab_size cross_attention_mask "
    "mrope_rotary_cos_sin mrope_position_deltas lora_task_id lora_weights lora_config "
    "context_phase_params skip_cross_attn_blocks retention_token_range_starts "
    "retention_token_range_ends retention_token_range_priorities "
    "retention_token_range_durations_ms retention_decode_priority retention_decode_duration_ms "
    "guided_decoding_guide_type guided_decoding_guide lookahead_window_size lookahead_ngram_size "
    "lookahead_verification_set_size"
)
UPSTREAM_OUTPUTS = words(
    "output_ids sequence_length cum_log_probs output_log_probs context_logits generation_logits "
    "batch_index sequence_index context_phase_params kv_cache_alloc_new_blocks "
    "kv_cache_reused_blocks kv_cache_alloc_total_blocks arrival_time_ns first_scheduled_time_ns "
    "first_token_time_ns last_token_time_ns acceptance_rate total_accepted_draft_tokens "
    "total_draft_tokens num_input_tokens num_output_tokens"
)
REQUIRED_INPUTS = {"input_lengths", "request_output_len"}


def filled(tmp_path: Path) -> model_config_pb2.ModelConfig:
    values = tensorrt_llm_values(
        engine_dir=tmp_path / "engine",
        tokenizer_dir=tmp_path / "tokenizer",
        max_batch_size=48,
        world_size=4,
        kv_cache_free_gpu_mem_fraction=0.85,
    )
    text = render_tensorrt_llm_config(values)
    assert "${" not in text
    config = model_config_pb2.ModelConfig()
    text_format.Parse(text, config)
    return config


def test_template_has_exactly_the_upstream_placeholders() -> None:
    assert template_placeholders() == UPSTREAM_PLACEHOLDERS


def test_every_placeholder_has_a_value() -> None:
    values = tensorrt_llm_values(Path("/e"), Path("/t"), 8, 1)
    assert set(values) == UPSTREAM_PLACEHOLDERS


def test_filled_template_parses_as_a_triton_model_config(tmp_path: Path) -> None:
    config = filled(tmp_path)
    assert config.backend == "tensorrtllm"
    assert config.max_batch_size == 48
    assert config.model_transaction_policy.decoupled is True
    assert list(config.dynamic_batching.preferred_batch_size) == [48]
    assert config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_CPU
    assert [tensor.name for tensor in config.input] == UPSTREAM_INPUTS
    assert [tensor.name for tensor in config.output] == UPSTREAM_OUTPUTS
    required = {tensor.name for tensor in config.input if not tensor.optional}
    assert required == REQUIRED_INPUTS
    logits = {t.name: t.data_type for t in config.output}["generation_logits"]
    assert logits == model_config_pb2.TYPE_FP32  # trtllm-build --logits_dtype float32
    parameters = {key: value.string_value for key, value in config.parameters.items()}
    assert parameters["gpt_model_path"] == str(tmp_path / "engine")
    assert parameters["gpt_model_type"] == "inflight_fused_batching"
    assert parameters["gpu_device_ids"] == "0,1,2,3"
    assert parameters["kv_cache_free_gpu_mem_fraction"] == "0.85"
    assert parameters["tokenizer_dir"] == str(tmp_path / "tokenizer")
    assert parameters["executor_worker_path"].endswith("/trtllmExecutorWorker")


def test_a_missing_value_is_refused() -> None:
    values = tensorrt_llm_values(Path("/e"), Path("/t"), 8, 1)
    del values["decoupled_mode"]
    with pytest.raises(BuildError, match="without a value: decoupled_mode"):
        render_tensorrt_llm_config(values)


def test_an_unfilled_template_is_not_a_model_config() -> None:
    with pytest.raises(text_format.ParseError):
        text_format.Parse(template_text(), model_config_pb2.ModelConfig())
