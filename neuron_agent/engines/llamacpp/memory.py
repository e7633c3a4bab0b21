"""What a GGUF model holds once llama.cpp has it loaded, from the file alone (pure).

    weights          the file's size (llama.cpp maps it, or copies it to the GPU as it is)
    KV cache         n_ctx cells × layers × KV heads × (key + value length) × 2 bytes (f16)
    compute buffers  llama.cpp's graph reserve for one micro-batch. It reserves logits for every
                     token of it (n_ubatch × vocabulary × 4 bytes, most of the reserve), and a
                     GPU holds all of it (cudaMalloc); this engine asks for one row of logits
                     per sequence, so on a CPU only those pages and the activations (about 32
                     bytes per token per embedding dimension) ever become resident
    output buffer    one row of logits per sequence
    runtime          the Python stub around it (CPU) or the CUDA context (GPU)

Checked against the stub's RSS on CPU (tests/llamacpp/test_memory.py); llama.cpp logs the same
KV and compute reserve to the byte for SmolLM2.
"""

from __future__ import annotations

from cortex.config import ModelProfile
from neuron_agent.engines.llamacpp.gguf_info import GgufInfo

MIB = 2**20
# llama.cpp rounds the context up to whole 256-cell pages.
CONTEXT_PAGE = 256
# The largest micro-batch a generator's context uses (n_ubatch).
MICRO_BATCH = 512
# Prompt tokens one step prefills when the profile leaves it at 0 (the engine's default).
DEFAULT_PREFILL_TOKENS = 512
# The Triton stub around the engine: Python, numpy, llama_cpp's bindings and the stub's own
# shared memory (measured: 75–85 MiB on CPU); a CUDA context and cuBLAS workspace on a GPU.
CPU_RUNTIME_BYTES = 80 * MIB
GPU_RUNTIME_BYTES = 450 * MIB


def context_cells(kv_cache_tokens: int) -> int:
    return -(-kv_cache_tokens // CONTEXT_PAGE) * CONTEXT_PAGE


def micro_batch(profile: ModelProfile, context_length: int) -> int:
    if profile.embedding:
        return min(context_length, profile.kv_cache_tokens)
    prefill = profile.prefill_tokens or DEFAULT_PREFILL_TOKENS
    return min(MICRO_BATCH, prefill + profile.max_batch_size)


def compute_bytes(profile: ModelProfile, info: GgufInfo, context_length: int, has_gpu: bool) -> int:
    tokens = micro_batch(profile, context_length)
    if profile.embedding:
        # No flash attention for a non-causal encoder: the scores are materialized.
        scores = info.heads * tokens * tokens * 4
        return tokens * 4 * 6 * info.embedding_length + scores
    if has_gpu:
        return tokens * 4 * (info.vocab_size + 2 * info.embedding_length)
    return tokens * 32 * info.embedding_length + profile.max_batch_size * info.vocab_size * 4


def estimate_llamacpp_bytes(
    profile: ModelProfile, info: GgufInfo, context_length: int, has_gpu: bool
) -> int:
    """Bytes the model holds once loaded and warm (on each of its GPUs × tp, or in host
    memory on a CPU node)."""
    kv = (
        0
        if profile.embedding
        else context_cells(profile.kv_cache_tokens) * info.kv_bytes_per_token()
    )
    output = profile.max_batch_size * info.vocab_size * 4 if not profile.embedding else 0
    runtime = GPU_RUNTIME_BYTES * profile.tp if has_gpu else CPU_RUNTIME_BYTES
    compute = compute_bytes(profile, info, context_length, has_gpu)
    return info.file_bytes + kv + compute + output + runtime
