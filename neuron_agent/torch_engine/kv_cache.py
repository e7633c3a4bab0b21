"""The paged KV cache: a pool of fixed-size blocks shared by all sequences, with automatic
prefix caching.

Each layer owns two flat tensors of `num_blocks * block_size` slots. A sequence holds a list of
blocks; token t of the sequence lives in slot `blocks[t // block_size] * block_size + t % block_size`.

Prefix caching (as vLLM's automatic prefix caching does it): once a block is full and its keys
and values are written, it is registered under a key that hashes the previous block's key with
the block's token ids, so equal keys mean equal prefixes (equal tokens at equal positions). A
block is reference-counted while sequences use it. When the count drops to zero a registered
block is not wiped: it joins a least-recently-used list of cached blocks, from which a later
request with the same prefix takes it back (`lookup`), and from which `grow` reclaims the oldest
only when no never-used block is left. Shared blocks are only read: a sequence writes positions
beyond its reused prefix, which lie in blocks of its own.

Every block is in exactly one of three states: free (no content), cached (content, no user) or
in use (reference count ≥ 1). Reclaimable = free + cached.

An FP8 cache (`kv_cache_dtype = "fp8"`) stores keys and values as float8 e4m3 with one float32
scale per slot and kv head (its vector's largest magnitude / 448, as the weights' per-channel
scales are taken): 132 bytes a vector of 128 instead of bf16's 256, so nearly twice the tokens
in the same memory, for rounding each element to 3 mantissa bits. Decode attention reads half
the bytes but does more work a key, so it is no faster on an H200 (BENCHMARKS.md).
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict
from typing import NamedTuple

import torch

from neuron_agent.torch_engine.checkpoint import ModelSpec

BlockKey = bytes

KV_CACHE_DTYPES = ("auto", "fp8")


class LayerCache(NamedTuple):
    """One layer's keys and values, [slots, kv_heads, head_dim]; with an FP8 cache also their
    scales, [slots, kv_heads] float32 (None when the cache holds the model's own dtype)."""

    keys: torch.Tensor
    values: torch.Tensor
    key_scales: torch.Tensor | None = None
    value_scales: torch.Tensor | None = None

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self if t is not None)


def chain_key(parent: BlockKey | None, tokens: list[int]) -> BlockKey:
    """The key of a full block: BLAKE2b over the parent's key and the block's token ids. A
    cryptographic digest, not Python's `hash`, because a collision would silently serve another
    prefix's keys and values."""
    digest = hashlib.blake2b(parent or b"", digest_size=16)
    digest.update(struct.pack(f"<{len(tokens)}q", *tokens))
    return digest.digest()


class BlockPool:
    def __init__(
        self,
        spec: ModelSpec,
        budget_tokens: int,
        dtype: torch.dtype,
        device: torch.device,
        block_size: int = 16,
        prefix_caching: bool = True,
        kv_cache_dtype: str = "auto",
    ) -> None:
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self.num_blocks = max(1, budget_tokens // block_size)
        # One more block than the budget, never handed out: padded rows of a CUDA-graph batch
        # write their throwaway keys there.
        slots = (self.num_blocks + 1) * block_size
        self.scratch_slot = self.num_blocks * block_size
        shape = (slots, spec.num_kv_heads, spec.head_dim)
        if kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype {kv_cache_dtype!r} is not one of auto, fp8")
        self._shape = shape
        self._fp8 = kv_cache_dtype == "fp8"
        self._stored = torch.float8_e4m3fn if self._fp8 else dtype
        self._device = device
        self.layers = [self._new_layer() for _ in range(spec.num_layers)]
        self._free = list(range(self.num_blocks - 1, -1, -1))
        self._refs = [0] * self.num_blocks
        self._cached: OrderedDict[int, None] = (
            OrderedDict()
        )  # unused registered blocks, oldest first
        self._key_of: dict[int, BlockKey] = {}
        self._block_of: dict[BlockKey, int] = {}
        self.evictions = 0  # cached blocks reclaimed for new content, since start

    def _new_layer(self) -> LayerCache:
        shape, device = self._shape, self._device
        scales = (
            (lambda: torch.ones(shape[:2], dtype=torch.float32, device=device))
            if self._fp8
            else (lambda: None)
        )
        return LayerCache(
            torch.zeros(shape, dtype=self._stored, device=device),
            torch.zeros(shape, dtype=self._stored, device=device),
            scales(),
            scales(),
        )

    def release_memory(self) -> int:
        """Give the cache's memory back (a model going to sleep): every cached prefix is
        forgotten and every layer's tensors become empty, in place, so whoever holds `layers`
        sees it. No block may be in use. Returns the bytes released."""
        if self.used_blocks:
            raise RuntimeError(f"{self.used_blocks} KV blocks are in use")
        self.clear_cache()
        released = self.nbytes()
        empty = torch.empty(0, device=self._device)
        self.layers[:] = [LayerCache(empty, empty) for _ in self.layers]
        return released

    def restore_memory(self) -> int:
        """Allocate the layers again after `release_memory` (zeroed, as at start)."""
        self.layers[:] = [self._new_layer() for _ in self.layers]
        return self.nbytes()

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def free_blocks(self) -> int:
        """Blocks a new sequence could get now: never used, or cached and unreferenced."""
        return len(self._free) + len(self._cached)

    @property
    def cached_blocks(self) -> int:
        """Unreferenced blocks that still hold a reusable prefix."""
        return len(self._cached)

    @property
    def used_blocks(self) -> int:
        return self.num_blocks - self.free_blocks

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def references(self, block: int) -> int:
        return self._refs[block]

    # ------------------------------------------------------------------ prefix cache

    def lookup(self, tokens: list[int]) -> tuple[list[int], list[BlockKey]]:
        """Take the longest cached prefix of `tokens` in whole blocks: its blocks (now
        referenced by the caller, who must `release` them) and their keys."""
        blocks: list[int] = []
        keys: list[BlockKey] = []
        if not self.prefix_caching:
            return blocks, keys
        parent: BlockKey | None = None
        for start in range(0, len(tokens) - self.block_size + 1, self.block_size):
            key = chain_key(parent, tokens[start : start + self.block_size])
            block = self._block_of.get(key)
            if block is None:
                break
            self._acquire(block)
            blocks.append(block)
            keys.append(key)
            parent = key
        return blocks, keys

    def commit(
        self, blocks: list[int], keys: list[BlockKey], tokens: list[int], computed: int
    ) -> None:
        """Register the sequence's blocks that became full: `tokens[:computed]` have their keys
        and values written. `keys` (the sequence's registered keys so far) grows in place."""
        if not self.prefix_caching:
            return
        parent = keys[-1] if keys else None
        for index in range(len(keys), computed // self.block_size):
            start = index * self.block_size
            key = chain_key(parent, tokens[start : start + self.block_size])
            block = blocks[index]
            # The same prefix computed twice at once (two equal prompts admitted together): the
            # first copy stays the cached one; this block is plain and is freed on release.
            if key not in self._block_of and block not in self._key_of:
                self._block_of[key] = block
                self._key_of[block] = key
            keys.append(key)
            parent = key

    # ------------------------------------------------------------------ allocation

    def grow(self, blocks: list[int], tokens: int) -> bool:
        """Extend `blocks` in place to hold `tokens` positions; False (and `blocks` untouched)
        when the pool cannot, even after reclaiming every cached block."""
        needed = self.blocks_for(tokens) - len(blocks)
        if needed <= 0:
            return True
        if needed > self.free_blocks:
            return False
        for _ in range(needed):
            blocks.append(self._take())
        return True

    def allocate(self, tokens: int) -> list[int] | None:
        """Fresh blocks for `tokens` positions, or None when the pool cannot hold them."""
        blocks: list[int] = []
        return blocks if self.grow(blocks, tokens) else None

    def release(self, blocks: list[int]) -> None:
        """Drop the caller's reference to each block. Registered blocks stay cached; the last
        blocks of a sequence (the least likely to be shared) become the oldest in the LRU list,
        so they are reclaimed first."""
        for block in reversed(blocks):
            self._refs[block] -= 1
            assert self._refs[block] >= 0, f"block {block} released twice"
            if self._refs[block] == 0:
                if block in self._key_of:
                    self._cached[block] = None
                else:
                    self._free.append(block)
        blocks.clear()

    def slot(self, blocks: list[int], position: int) -> int:
        """The cache slot of one position of a sequence holding `blocks`."""
        return blocks[position // self.block_size] * self.block_size + position % self.block_size

    def clear_cache(self) -> None:
        """Forget every cached prefix (their blocks become free); blocks in use keep theirs."""
        for block in self._cached:
            del self._block_of[self._key_of.pop(block)]
            self._free.append(block)
        self._cached.clear()

    def _acquire(self, block: int) -> None:
        if self._refs[block] == 0:
            del self._cached[block]
        self._refs[block] += 1

    def _take(self) -> int:
        if self._free:
            block = self._free.pop()
        else:
            block, _ = self._cached.popitem(last=False)  # the least recently used prefix
            del self._block_of[self._key_of.pop(block)]
            self.evictions += 1
        self._refs[block] = 1
        return block

    # ------------------------------------------------------------------ addressing

    def slots(self, blocks: list[int], start: int, stop: int) -> torch.Tensor:
        """Cache slots of positions [start, stop) of a sequence holding `blocks`."""
        positions = torch.arange(start, stop)
        table = torch.tensor(blocks, dtype=torch.long)
        return table[positions // self.block_size] * self.block_size + positions % self.block_size

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)
