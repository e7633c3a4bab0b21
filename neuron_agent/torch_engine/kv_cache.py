"""The paged KV cache: a pool of fixed-size blocks shared by all sequences.

Each layer owns two flat tensors of `num_blocks * block_size` slots. A sequence holds a list of
blocks; token t of the sequence lives in slot `blocks[t // block_size] * block_size + t % block_size`.
Blocks are reserved for a request's whole budget (prompt + max new tokens) when it is admitted,
so a running request never runs out of cache and memory never exceeds the configured budget.
"""

from __future__ import annotations

import torch

from neuron_agent.torch_engine.checkpoint import ModelSpec


class BlockPool:
    def __init__(
        self,
        spec: ModelSpec,
        budget_tokens: int,
        dtype: torch.dtype,
        device: torch.device,
        block_size: int = 16,
    ) -> None:
        self.block_size = block_size
        self.num_blocks = max(1, budget_tokens // block_size)
        # One more block than the budget, never handed out: padded rows of a CUDA-graph batch
        # write their throwaway keys there.
        slots = (self.num_blocks + 1) * block_size
        self.scratch_slot = self.num_blocks * block_size
        shape = (slots, spec.num_kv_heads, spec.head_dim)
        self.layers = [
            (
                torch.zeros(shape, dtype=dtype, device=device),
                torch.zeros(shape, dtype=dtype, device=device),
            )
            for _ in range(spec.num_layers)
        ]
        self._free = list(range(self.num_blocks - 1, -1, -1))

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def allocate(self, tokens: int) -> list[int] | None:
        needed = self.blocks_for(tokens)
        if needed > len(self._free):
            return None
        return [self._free.pop() for _ in range(needed)]

    def release(self, blocks: list[int]) -> None:
        self._free.extend(reversed(blocks))
        blocks.clear()

    def slot(self, blocks: list[int], position: int) -> int:
        """The cache slot of one position of a sequence holding `blocks`."""
        return blocks[position // self.block_size] * self.block_size + position % self.block_size

    def slots(self, blocks: list[int], start: int, stop: int) -> torch.Tensor:
        """Cache slots of positions [start, stop) of a sequence holding `blocks`."""
        positions = torch.arange(start, stop)
        table = torch.tensor(blocks, dtype=torch.long)
        return table[positions // self.block_size] * self.block_size + positions % self.block_size

    def nbytes(self) -> int:
        return sum(k.numel() * k.element_size() * 2 for k, _ in self.layers)
