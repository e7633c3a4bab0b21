"""Guided decoding for every engine: the next token restricted to those a grammar allows, with
llguidance.

A request names its guide through TensorRT-LLM's tensors, `guided_decoding_guide_type` (one of
`GuideType`) and `guided_decoding_guide` (the schema, regex or grammar text), so one gateway
request drives every engine alike. Each guide is compiled once per engine (an engine has one
tokenizer) and cached; a request gets a copy of the compiled matcher, which follows its tokens.

What differs between engines is only where the tokenizer comes from (the torch engine reads the
gateway's `tokenizer.json`; the llama.cpp engine reads the GGUF's vocabulary through llama.cpp)
and how the mask meets the logits (a torch tensor, llama.cpp's float buffer). What is shared is
here: the compiler and its cache (`Guides`), and the per-step masks of a batch's guided rows,
computed by llguidance's own threads while the engine's forward pass runs (`MaskBatch.start`
before it, `wait` after) into one int32 bitmask.

The guide types and their grammars are shared with the gateway (`cortex/guides.py`).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import llguidance
import numpy as np
import numpy.typing as npt

from cortex.guides import GuideType, grammar_for

Matcher = llguidance.LLMatcher


class GuideRejected(Exception):
    """The guide does not compile, or the model has no vocabulary to build masks from; one
    sentence that names the tensor. Each engine raises it as its own request rejection."""


@dataclass(frozen=True)
class Guide:
    type: GuideType
    text: str


class Guides:
    """An engine's grammar compiler: its tokenizer (made once, when first needed, by
    `make_tokenizer`, so a model that never sees a guide pays nothing) and its compiled guides,
    least recently used dropped past `capacity`. `eos_ids`: the tokens that end a guided answer
    (the tokenizer's end tokens)."""

    def __init__(
        self,
        make_tokenizer: Callable[[], llguidance.LLTokenizer],
        eos_ids: frozenset[int],
        capacity: int = 64,
    ) -> None:
        self._make_tokenizer = make_tokenizer
        self.eos_ids = eos_ids
        self._tokenizer: llguidance.LLTokenizer | None = None
        self._compiled: OrderedDict[Guide, llguidance.LLMatcher] = OrderedDict()
        self._capacity = capacity
        self._lock = threading.Lock()
        self.compilations = 0

    def tokenizer(self) -> llguidance.LLTokenizer:
        if self._tokenizer is None:
            self._tokenizer = self._make_tokenizer()
        return self._tokenizer

    def matcher(self, guide: Guide) -> llguidance.LLMatcher:
        """A fresh matcher for one request; raises GuideRejected naming the tensor when the
        guide does not compile."""
        with self._lock:
            compiled = self._compiled.get(guide)
            if compiled is not None:
                self._compiled.move_to_end(guide)
                return compiled.deep_copy()
            tokenizer = self.tokenizer()
            try:
                grammar = grammar_for(guide.type, guide.text)
            except (ValueError, RuntimeError) as error:
                raise GuideRejected(f"guided_decoding_guide: {error}") from None
            compiled = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
            if compiled.is_error():
                raise GuideRejected(f"guided_decoding_guide: {compiled.get_error()}")
            self.compilations += 1
            self._compiled[guide] = compiled
            if len(self._compiled) > self._capacity:
                self._compiled.popitem(last=False)
            return compiled.deep_copy()


class MaskBatch:
    """Per-step masks for the guided rows of a batch, computed off the engine thread into
    `bitmask` [max_rows, words] (llguidance's layout: bit j of int32 word i allows token
    32·i + j)."""

    def __init__(
        self, max_rows: int, vocab_size: int, eos_ids: frozenset[int] = frozenset()
    ) -> None:
        self.vocab_size = vocab_size
        self.eos = sorted(i for i in eos_ids if i < vocab_size)
        self.bitmask = np.full((max_rows, (vocab_size + 31) // 32), -1, dtype=np.int32)
        self._executor = llguidance.LLExecutor()
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cortex-guides")

    def start(self, matchers: list[tuple[llguidance.LLMatcher, int]]) -> Future[None] | None:
        """Begin the masks of [(matcher, row)] (the rows a batch's guided sequences have); None
        when no row is guided."""
        if not matchers:
            return None
        rows, words = self.bitmask.shape
        return self._thread.submit(
            self._executor.unsafe_compute_mask_ptr,
            matchers,
            self.bitmask.ctypes.data,
            words * 4,
            rows,
        )

    def allowed(self, pending: Future[None], rows: list[int]) -> npt.NDArray[Any]:
        """Wait for the masks, then the tokens each of `rows` allows, bool [len(rows), vocab].
        A matcher in error allows nothing: such a row may still end (sampling from nothing
        would fail the step)."""
        pending.result()
        allowed = unpack_mask(self.bitmask[rows], self.vocab_size)
        if self.eos:
            stuck = ~allowed.any(axis=1)
            if stuck.any():
                allowed[np.ix_(stuck, self.eos)] = True
        return allowed

    def close(self) -> None:
        self._thread.shutdown(wait=False)


def unpack_mask(bitmask: npt.NDArray[Any], vocab_size: int) -> npt.NDArray[Any]:
    """llguidance's int32 bitmask [rows, words] as a bool mask [rows, vocab_size] (NumPy unpacks
    the little-endian words' bytes in one pass); tokens past the bitmask are disallowed."""
    as_bytes = np.ascontiguousarray(bitmask).view(np.uint8)
    unpacked = np.unpackbits(as_bytes, axis=-1, bitorder="little").astype(bool)
    if unpacked.shape[1] >= vocab_size:
        return unpacked[:, :vocab_size]
    padding = np.zeros((unpacked.shape[0], vocab_size - unpacked.shape[1]), dtype=bool)
    return np.concatenate([unpacked, padding], axis=1)
