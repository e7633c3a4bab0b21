"""CUDA graphs of the decode step, one per bucketed batch size.

A decode step of an 8B model is ~300 kernels; launched one by one from Python the GPU waits on
the CPU most of the step. Each bucket's step is captured once, when the engine is built (so no
request pays for a capture), over static input buffers; a batch is padded to the next bucket:
padded rows decode a dummy token into the pool's scratch slot and their logits are ignored. All
buckets share one memory pool, captured largest first, so graphs cost about one step's
activations plus a logits buffer per bucket.

The eager path (CPU, or a batch larger than the largest bucket) runs the same model code; the
tests hold the two to the same tokens.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import torch

from neuron_agent.torch_engine import kernels
from neuron_agent.torch_engine.kv_cache import LayerCache
from neuron_agent.torch_engine.llama import ForwardBatch, LlamaModel

log = logging.getLogger("cortex.engine")


def decode_buckets(max_batch_size: int) -> list[int]:
    """1, 2, 4, 8, then every 8 up to 64, then every 16 — and always max_batch_size itself."""
    sizes = [1, 2, 4, 8, *range(16, 65, 8), *range(80, max_batch_size + 1, 16)]
    return sorted({s for s in sizes if s < max_batch_size} | {max_batch_size})


class DecodeInputs:
    """The decode step's inputs as device tensors, written with two host→device copies."""

    def __init__(
        self, max_batch: int, table_width: int, block_size: int, device: torch.device
    ) -> None:
        self.block_size = block_size
        # tokens, positions, write slots, lengths (after this token)
        self.rows = torch.zeros((4, max_batch), dtype=torch.long, device=device)
        self.tables = torch.zeros((max_batch, table_width), dtype=torch.int32, device=device)

    def write(
        self,
        tokens: Sequence[int],
        positions: Sequence[int],
        slots: Sequence[int],
        tables: Sequence[Sequence[int]],
        pad_to: int,
        scratch_slot: int,
    ) -> None:
        count = len(tokens)
        padding = pad_to - count
        lengths = [p + 1 for p in positions]
        rows = torch.tensor(
            [
                [*tokens, *([0] * padding)],
                [*positions, *([0] * padding)],
                [*slots, *([scratch_slot] * padding)],
                [*lengths, *([1] * padding)],
            ],
            dtype=torch.long,
        )
        self.rows[:, :pad_to].copy_(rows, non_blocking=True)
        width = max(len(t) for t in tables)
        # Padded rows read one slot of the scratch block: a real read, never garbage.
        scratch_row = [scratch_slot // self.block_size] + [0] * (width - 1)
        table = torch.tensor(
            [[*blocks, *([0] * (width - len(blocks)))] for blocks in tables]
            + [scratch_row] * padding,
            dtype=torch.int32,
        )
        self.tables[:pad_to, :width].copy_(table, non_blocking=True)

    def batch(self, size: int, splits: int) -> ForwardBatch:
        return ForwardBatch(
            positions=self.rows[1, :size],
            write_slots=self.rows[2, :size],
            block_size=self.block_size,
            block_tables=self.tables[:size],
            seq_lens=self.rows[3, :size].to(torch.int32),
            decode_splits=splits,
        )


class DecodeRunner:
    """Runs decode steps: through a captured graph when `graphs` and the batch fits a bucket,
    else eagerly. Returns float32 logits [B, vocab] and the greedy tokens [B], on the device."""

    def __init__(
        self,
        model: LlamaModel,
        kv_caches: list[LayerCache],
        block_size: int,
        scratch_slot: int,
        max_batch_size: int,
        table_width: int,
        graphs: bool,
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.scratch_slot = scratch_slot
        self.device = model.device
        self.buckets = decode_buckets(max_batch_size)
        self.inputs = DecodeInputs(self.buckets[-1], table_width, block_size, self.device)
        # One split count for every batch size: a sequence's attention sums in the same order
        # whatever else shares its batch.
        self.splits = kernels.decode_splits(1, model.spec.num_kv_heads, self.device)
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}
        self.capture_seconds = 0.0
        if graphs and self.device.type == "cuda":
            self._capture()

    def _forward(self, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        batch = self.inputs.batch(size, self.splits)
        logits = self.model(self.inputs.rows[0, :size], batch, self.kv_caches)
        return logits, logits.argmax(dim=-1)

    def _capture(self) -> None:
        started = time.perf_counter()
        pool = None
        stream = torch.cuda.Stream(self.device)
        for size in reversed(self.buckets):
            self.inputs.write(
                [0] * size,
                [0] * size,
                [self.scratch_slot] * size,
                [[0]] * size,
                size,
                self.scratch_slot,
            )
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                self._forward(size)  # warm-up: kernels compiled and tuned before capture
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, stream=stream):
                logits, greedy = self._forward(size)
            pool = graph.pool()
            self._graphs[size] = (graph, logits, greedy)
        torch.cuda.synchronize(self.device)
        self.capture_seconds = time.perf_counter() - started
        log.info(
            "captured decode graphs for batch sizes %s in %.1f s",
            self.buckets,
            self.capture_seconds,
        )

    @property
    def graphed(self) -> bool:
        return bool(self._graphs)

    def release(self) -> None:
        """Drop the captured graphs and the memory pool they hold (a model going to sleep)."""
        self._graphs.clear()

    def run(
        self,
        tokens: Sequence[int],
        positions: Sequence[int],
        slots: Sequence[int],
        tables: Sequence[Sequence[int]],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        count = len(tokens)
        bucket = next((b for b in self.buckets if b >= count), None)
        if bucket is not None and bucket in self._graphs:
            self.inputs.write(tokens, positions, slots, tables, bucket, self.scratch_slot)
            graph, logits, greedy = self._graphs[bucket]
            graph.replay()
            return logits[:count], greedy[:count]
        if count > self.buckets[-1]:
            raise ValueError(f"decode batch {count} is over the engine's {self.buckets[-1]}")
        self.inputs.write(tokens, positions, slots, tables, count, self.scratch_slot)
        return self._forward(count)
