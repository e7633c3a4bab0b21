"""llama.cpp through llama-cpp-python's low-level (ctypes) API, in one place: the model and its
context, one reusable `llama_batch`, decode, logits, the KV cache's sequence operations and
sampler chains. The scheduler above it speaks plain Python lists; nothing else here touches a
pointer.

The context keeps one unified KV cache (`kv_unified`): every sequence may grow to the whole
budget, and a prefix can be shared between sequences by copying cells (`copy_prefix`).
"""

from __future__ import annotations

import ctypes
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

log = logging.getLogger("cortex.engine.llamacpp")


class LlamaCppError(Exception):
    """llama.cpp refused the file or the context; one sentence."""


@dataclass(frozen=True)
class RuntimeOptions:
    model_path: Path
    context_tokens: int  # the KV cache, shared by every sequence
    sequences: int  # sequence ids (slots)
    batch_tokens: int  # the most tokens one decode takes (prefill chunk + one per decoder)
    threads: int
    gpu_layers: int = 0  # -1: every layer on the GPU(s)
    split_layers: bool = False  # split the layers over every visible GPU (tp > 1)
    embedding: bool = False


def _llama() -> Any:
    """llama_cpp's ctypes module, its own log lines sent to Python's logging (errors only)."""
    import llama_cpp
    from llama_cpp import _logger

    _logger.set_verbose(os.environ.get("CORTEX_LLAMACPP_VERBOSE") == "1")
    return llama_cpp


class Runtime:
    def __init__(self, options: RuntimeOptions) -> None:
        lib = self.lib = _llama()
        self.options = options
        lib.llama_backend_init()
        model_params = lib.llama_model_default_params()
        model_params.n_gpu_layers = options.gpu_layers
        if options.split_layers:
            model_params.split_mode = lib.LLAMA_SPLIT_MODE_LAYER
        self.model = lib.llama_model_load_from_file(str(options.model_path).encode(), model_params)
        if not self.model:
            raise LlamaCppError(f"llama.cpp could not load {options.model_path.name}")
        self.vocab = lib.llama_model_get_vocab(self.model)
        params = lib.llama_context_default_params()
        params.n_ctx = options.context_tokens
        params.n_batch = options.batch_tokens
        params.n_ubatch = (
            options.batch_tokens if options.embedding else min(512, options.batch_tokens)
        )
        params.n_seq_max = options.sequences
        params.n_threads = options.threads
        params.n_threads_batch = options.threads
        params.kv_unified = True
        params.no_perf = True
        params.embeddings = options.embedding
        self.ctx = lib.llama_init_from_model(self.model, params)
        if not self.ctx:
            lib.llama_model_free(self.model)
            raise LlamaCppError(
                f"llama.cpp could not make a context of {options.context_tokens} tokens for "
                f"{options.model_path.name} (out of memory?)"
            )
        self.memory = lib.llama_get_memory(self.ctx)
        self.n_vocab = lib.llama_vocab_n_tokens(self.vocab)
        self.n_embd = lib.llama_model_n_embd_out(self.model)
        self.context_train = lib.llama_model_n_ctx_train(self.model)
        self.capacity = options.batch_tokens
        self.batch = lib.llama_batch_init(self.capacity, 0, 1)
        self._tokens = np.ctypeslib.as_array(self.batch.token, shape=(self.capacity,))
        self._positions = np.ctypeslib.as_array(self.batch.pos, shape=(self.capacity,))
        self._outputs = np.ctypeslib.as_array(self.batch.logits, shape=(self.capacity,))
        np.ctypeslib.as_array(self.batch.n_seq_id, shape=(self.capacity,))[:] = 1
        self._seq_slots = [self.batch.seq_id[i] for i in range(self.capacity)]
        # Which part of a sequence's cache can be dropped or shared: not a recurrent state's,
        # nor a sliding window's (llama.cpp keeps only the window there).
        self.partial_reuse = not (
            lib.llama_model_is_recurrent(self.model)
            or lib.llama_model_is_hybrid(self.model)
            or lib.llama_model_n_swa(self.model) > 0
        )

    # ------------------------------------------------------------------ vocabulary

    def end_tokens(self) -> frozenset[int]:
        """Every end-of-generation token the file declares (llama.cpp's own stop set)."""
        is_end = self.lib.llama_vocab_is_eog
        return frozenset(i for i in range(self.n_vocab) if is_end(self.vocab, i))

    def guidance_tokenizer(self, end_ids: frozenset[int]) -> Any:
        """llguidance's tokenizer over the file's own vocabulary (each token's bytes as llama.cpp
        renders it, control tokens marked special; llguidance tokenizes text with
        `llama_tokenize` itself), so guided decoding needs no tokenizer beyond the GGUF. About a
        second for a 50k vocabulary: made once, for the first guided request."""
        from llguidance.llamacpp import lltokenizer_from_vocab

        return lltokenizer_from_vocab(self.vocab, self.n_vocab, sorted(end_ids))

    def tokenize(self, text: str, special: bool = False) -> list[int]:
        """The text's tokens as the file's tokenizer makes them, with its special tokens (BOS,
        CLS/SEP) added where the file says to; `special`: markup such as <|im_start|> in the
        text becomes its token."""
        data = text.encode("utf-8")
        size = len(data) + 16
        while True:
            buffer = (self.lib.llama_token * size)()
            count = self.lib.llama_tokenize(
                self.vocab, data, len(data), buffer, size, True, special
            )
            if count >= 0:
                return list(buffer[:count])
            size = -count

    # ------------------------------------------------------------------ decoding

    def decode(
        self, tokens: list[int], positions: list[int], sequences: list[int], outputs: list[bool]
    ) -> int:
        """One `llama_decode` over the tokens (each with its position and sequence id; logits
        kept where `outputs` says). Returns llama.cpp's code: 0 done, 1 no KV room, else failed."""
        count = len(tokens)
        self.batch.n_tokens = count
        self._tokens[:count] = tokens
        self._positions[:count] = positions
        self._outputs[:count] = outputs
        slots = self._seq_slots
        for index, sequence in enumerate(sequences):
            slots[index][0] = sequence
        return int(self.lib.llama_decode(self.ctx, self.batch))

    def logits(self, row: int) -> npt.NDArray[np.float32]:
        """The logits of the last decode's batch row `row` (one marked for output; a view:
        copy to keep)."""
        pointer = self.lib.llama_get_logits_ith(self.ctx, row)
        return np.ctypeslib.as_array(pointer, shape=(self.n_vocab,))

    def embeddings(self, sequence: int) -> npt.NDArray[np.float32]:
        """The pooled embedding of one sequence of the last decode (a copy)."""
        pointer = self.lib.llama_get_embeddings_seq(self.ctx, sequence)
        if not pointer:
            raise LlamaCppError("the model gave no pooled embedding (its pooling type is none)")
        return np.ctypeslib.as_array(pointer, shape=(self.n_embd,)).copy()

    def pooling(self) -> int:
        return int(self.lib.llama_pooling_type(self.ctx))

    # ------------------------------------------------------------------ the KV cache

    def forget(self, sequence: int, start: int = 0) -> bool:
        """Drop the sequence's cache from position `start` on; False where llama.cpp cannot cut
        there (then call with start 0, which always can)."""
        if not self.memory:
            return True
        return bool(self.lib.llama_memory_seq_rm(self.memory, sequence, start, -1))

    def copy_prefix(self, source: int, target: int, length: int) -> None:
        """Make positions [0, length) of `source` part of `target` too (cells shared, not
        recomputed)."""
        self.lib.llama_memory_seq_cp(self.memory, source, target, 0, length)

    def clear(self) -> None:
        if self.memory:
            self.lib.llama_memory_clear(self.memory, True)

    # ------------------------------------------------------------------ sampling

    def sampler(self, temperature: float, top_k: int, top_p: float, seed: int | None) -> Sampler:
        """A chain with the torch engine's order: temperature, then top-k, then top-p over the
        tempered distribution, then a draw from the sequence's own seeded generator."""
        lib = self.lib
        chain = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
        lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_temp(temperature))
        if top_k > 0:
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_top_k(top_k))
        if top_p < 1.0:
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_top_p(top_p, 1))
        draw_seed = lib.LLAMA_DEFAULT_SEED if seed is None else seed & 0xFFFFFFFF
        lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_dist(draw_seed))
        return Sampler(lib, chain)

    def sample(self, sampler: Sampler, row: int) -> int:
        return int(self.lib.llama_sampler_sample(sampler.chain, self.ctx, row))

    # ------------------------------------------------------------------ lifetime

    def close(self) -> None:
        lib = self.lib
        if getattr(self, "batch", None) is not None:
            lib.llama_batch_free(self.batch)
            self.batch = None
        if getattr(self, "ctx", None):
            lib.llama_free(self.ctx)
            self.ctx = None
        if getattr(self, "model", None):
            lib.llama_model_free(self.model)
            self.model = None


class Sampler:
    def __init__(self, lib: Any, chain: ctypes.c_void_p | None) -> None:
        self._lib = lib
        self.chain = chain

    def free(self) -> None:
        if self.chain:
            self._lib.llama_sampler_free(self.chain)
            self.chain = None
