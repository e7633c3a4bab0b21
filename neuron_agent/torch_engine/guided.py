"""Guided decoding: the next token restricted to those a grammar allows, with llguidance.

A request names its guide through TensorRT-LLM's tensors, `guided_decoding_guide_type` (one of
`GuideType`) and `guided_decoding_guide` (the schema, regex or grammar text), so one gateway
request drives this engine and TensorRT-LLM's alike. Each guide is compiled once per engine
(the engine has one tokenizer) and cached; a request gets a copy of the compiled matcher, which
follows its tokens.

Each step, the masks of a batch's guided rows are computed on the CPU by llguidance's own
threads while the forward pass runs (`GuidedBatch.start` before it, `wait` after), then applied
to the float32 logits before sampling: outside any CUDA graph, which captures the forward only.

The guide types and their grammars are shared with the gateway (`cortex/guides.py`). The
tokenizer is the model's `tokenizer.json`, the same file the gateway tokenizes with; it is
read the first time a guided request arrives, so a model that never sees one pays nothing.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import llguidance
import numpy as np
import torch

from cortex.guides import GuideType, grammar_for
from neuron_agent.torch_engine.errors import RequestRejected

Matcher = llguidance.LLMatcher


@dataclass(frozen=True)
class Guide:
    type: GuideType
    text: str


class Guides:
    """The engine's grammar compiler: its tokenizer (read once, when first needed) and its
    compiled guides, least recently used dropped past `capacity`."""

    def __init__(
        self,
        tokenizer_dir: Path | None,
        vocab_size: int,
        eos_ids: frozenset[int],
        capacity: int = 64,
    ) -> None:
        self._tokenizer_dir = tokenizer_dir
        self._vocab_size = vocab_size
        self.eos_ids = eos_ids
        self._eos_ids = sorted(eos_ids)
        self._tokenizer: llguidance.LLTokenizer | None = None
        self._compiled: OrderedDict[Guide, llguidance.LLMatcher] = OrderedDict()
        self._capacity = capacity
        self._lock = threading.Lock()
        self.compilations = 0

    def tokenizer(self) -> llguidance.LLTokenizer:
        if self._tokenizer is None:
            path = None if self._tokenizer_dir is None else self._tokenizer_dir / "tokenizer.json"
            if path is None or not path.exists():
                raise RequestRejected(
                    "guided_decoding_guide: this model has no tokenizer.json to build a "
                    "grammar's token masks from"
                )
            self._tokenizer = llguidance.LLTokenizer(
                path.read_text(encoding="utf-8"),
                n_vocab=self._vocab_size,
                eos_token=self._eos_ids or None,
            )
        return self._tokenizer

    def matcher(self, guide: Guide) -> llguidance.LLMatcher:
        """A fresh matcher for one request; raises RequestRejected naming the tensor when the
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
                raise RequestRejected(f"guided_decoding_guide: {error}") from None
            compiled = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
            if compiled.is_error():
                raise RequestRejected(f"guided_decoding_guide: {compiled.get_error()}")
            self.compilations += 1
            self._compiled[guide] = compiled
            if len(self._compiled) > self._capacity:
                self._compiled.popitem(last=False)
            return compiled.deep_copy()


class GuidedBatch:
    """Per-step masks for the guided rows of a batch, computed off the engine thread."""

    def __init__(
        self, max_rows: int, vocab_size: int, eos_ids: frozenset[int] = frozenset()
    ) -> None:
        self.vocab_size = vocab_size
        self._eos = sorted(i for i in eos_ids if i < vocab_size)
        # llguidance's layout: bit j of int32 word i allows token 32·i + j. (Its llguidance.torch
        # helpers are not used: importing them runs torch.compile, which fails in Triton's stub.)
        self._bitmask = torch.full((max_rows, (vocab_size + 31) // 32), -1, dtype=torch.int32)
        self._executor = llguidance.LLExecutor()
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cortex-guides")

    def start(self, matchers: list[tuple[llguidance.LLMatcher, int]]) -> Future[None] | None:
        """Begin the masks of [(matcher, row)] (the rows a batch's guided sequences have); None
        when no row is guided."""
        if not matchers:
            return None
        words = self._bitmask.shape[1]
        return self._thread.submit(
            self._executor.unsafe_compute_mask_ptr,
            matchers,
            self._bitmask.data_ptr(),
            words * 4,
            self._bitmask.shape[0],
        )

    def apply(self, pending: Future[None], rows: list[int], logits: torch.Tensor) -> torch.Tensor:
        """Wait for the masks, then logits [batch, vocab] with the disallowed tokens of `rows`
        at -inf, in one pass into a new tensor (the CUDA graph's output buffer is left alone).
        The packed masks cross to the device, 1/32 of the bool mask's size, and are unpacked
        there."""
        pending.result()
        vocab = logits.shape[-1]
        bitmask = self._bitmask[torch.tensor(rows, dtype=torch.long)]
        if logits.device.type == "cpu":
            allowed = token_mask(bitmask, vocab)
        else:
            allowed = unpack_on_device(bitmask.to(logits.device, non_blocking=True), vocab)
        if self._eos:
            # A matcher in error allows nothing: it may still end (sampling all -inf would fail
            # the whole batch's step).
            stuck = ~allowed.any(dim=1, keepdim=True)
            allowed[:, self._eos] |= stuck
        if len(rows) == logits.shape[0]:
            return logits.masked_fill(~allowed, float("-inf"))
        disallowed = torch.zeros(logits.shape, dtype=torch.bool, device=logits.device)
        disallowed[torch.tensor(rows, dtype=torch.long, device=logits.device)] = ~allowed
        return logits.masked_fill(disallowed, float("-inf"))

    def close(self) -> None:
        self._thread.shutdown(wait=False)


def token_mask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """llguidance's int32 bitmask [rows, words] (bit j of word i allows token 32·i + j) as a bool
    mask [rows, vocab_size]; tokens past the tokenizer's bitmask are disallowed. On the CPU,
    NumPy unpacks the little-endian words' bytes in one pass, without torch's 32 int32 copies."""
    as_bytes = bitmask.contiguous().numpy().view(np.uint8)
    unpacked = torch.from_numpy(np.unpackbits(as_bytes, axis=-1, bitorder="little")).bool()
    return _fit(unpacked, vocab_size)


def unpack_on_device(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """`token_mask` with torch's shifts, where the bitmask is (a GPU)."""
    bits = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    unpacked = ((bitmask.unsqueeze(-1) >> bits) & 1).bool().reshape(bitmask.shape[0], -1)
    return _fit(unpacked, vocab_size)


def _fit(unpacked: torch.Tensor, vocab_size: int) -> torch.Tensor:
    if unpacked.shape[1] >= vocab_size:
        return unpacked[:, :vocab_size]
    padding = torch.zeros(
        unpacked.shape[0], vocab_size - unpacked.shape[1], dtype=torch.bool, device=unpacked.device
    )
    return torch.cat([unpacked, padding], dim=1)
