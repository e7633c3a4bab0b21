"""Guided decoding in the torch engine: the grammar compiler and the per-step masks are shared
with the llama.cpp engine (`neuron_agent/engines/guided.py`); what is the torch engine's own is
its tokenizer and how a mask meets a batch's logits.

Each step, the masks of a batch's guided rows are computed on the CPU by llguidance's own
threads while the forward pass runs (`GuidedBatch.start` before it, `apply` after), then applied
to the float32 logits before sampling: outside any CUDA graph, which captures the forward only.

The tokenizer is the model's `tokenizer.json`, the same file the gateway tokenizes with; it is
read the first time a guided request arrives, so a model that never sees one pays nothing.
"""

from __future__ import annotations

from concurrent.futures import Future
from pathlib import Path

import llguidance
import torch

from neuron_agent.engines.guided import Guide as Guide
from neuron_agent.engines.guided import GuideRejected, Guides, MaskBatch, unpack_mask


def tokenizer_json_guides(
    tokenizer_dir: Path | None, vocab_size: int, eos_ids: frozenset[int]
) -> Guides:
    """The engine's grammar compiler over the gateway's `tokenizer.json` in `tokenizer_dir`."""

    def make_tokenizer() -> llguidance.LLTokenizer:
        path = None if tokenizer_dir is None else tokenizer_dir / "tokenizer.json"
        if path is None or not path.exists():
            raise GuideRejected(
                "guided_decoding_guide: this model has no tokenizer.json to build a "
                "grammar's token masks from"
            )
        return llguidance.LLTokenizer(
            path.read_text(encoding="utf-8"),
            n_vocab=vocab_size,
            eos_token=sorted(eos_ids) or None,
        )

    return Guides(make_tokenizer, eos_ids)


class GuidedBatch:
    """Per-step masks for the guided rows of a batch, computed off the engine thread."""

    def __init__(
        self, max_rows: int, vocab_size: int, eos_ids: frozenset[int] = frozenset()
    ) -> None:
        self.vocab_size = vocab_size
        self._masks = MaskBatch(max_rows, vocab_size, eos_ids)
        self._eos = self._masks.eos
        # The shared bitmask as a tensor (the same memory). llguidance.torch's helpers are not
        # used: importing them runs torch.compile, which fails in Triton's stub.
        self._bitmask = torch.from_numpy(self._masks.bitmask)

    def start(self, matchers: list[tuple[llguidance.LLMatcher, int]]) -> Future[None] | None:
        """Begin the masks of [(matcher, row)] (the rows a batch's guided sequences have); None
        when no row is guided."""
        return self._masks.start(matchers)

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
        self._masks.close()


def token_mask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """llguidance's int32 bitmask [rows, words] (bit j of word i allows token 32·i + j) as a bool
    mask [rows, vocab_size]; tokens past the tokenizer's bitmask are disallowed. On the CPU,
    NumPy unpacks the words in one pass, without torch's 32 int32 copies."""
    return torch.from_numpy(unpack_mask(bitmask.contiguous().numpy(), vocab_size))


def unpack_on_device(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """`token_mask` with torch's shifts, where the bitmask is (a GPU)."""
    bits = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    unpacked = ((bitmask.unsqueeze(-1) >> bits) & 1).bool().reshape(bitmask.shape[0], -1)
    if unpacked.shape[1] >= vocab_size:
        return unpacked[:, :vocab_size]
    padding = torch.zeros(
        unpacked.shape[0], vocab_size - unpacked.shape[1], dtype=torch.bool, device=unpacked.device
    )
    return torch.cat([unpacked, padding], dim=1)
