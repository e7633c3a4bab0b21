"""Tensor parallelism: how a model's weights split across ranks, and the collectives between them.

A `tp = N` model runs as N ranks on one host, each on its own device (NCCL between GPUs, gloo
between CPU processes). The split is Megatron's:

    column-parallel  q/k/v and gate/up: a rank holds a slice of the OUTPUT rows (its attention
                     heads, its kv heads, its slice of the MLP width) and uses its output as it is
    row-parallel     o_proj and down_proj: a rank holds the matching slice of the INPUT columns;
                     the ranks' partial outputs are summed (one all-reduce per layer each), then
                     the bias is added once
    replicated       embedding and norms on every rank (a lookup reads only the rows it needs, so
                     splitting it would save memory at the price of one more all-reduce); the
                     output head on rank 0 only, the rank that samples: the others hold none
                     and compute none, so no gather of logits is needed

Grouped-query attention: kv heads are divided across ranks; when there are fewer kv heads than
ranks (and tp is a multiple of them), each rank holds the one kv head its query heads use, so a
kv head is replicated on tp / kv_heads ranks.

Quantized shards are quantized where they are loaded: per-channel scales (int8, fp8) belong to
output rows, so a column-parallel shard's scales are its rows' own; a row-parallel shard holds
part of every row, and its ranks take the maximum of their parts' magnitudes (an all-reduce at
load time) so the scales equal the unsharded layer's. int4's groups run along the input: a
row-parallel shard must hold whole groups (refused otherwise, with the numbers).

With `world == 1` nothing here communicates and the loader slices nothing.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from neuron_agent.torch_engine.checkpoint import ModelSpec, shard_spec
from neuron_agent.torch_engine.errors import UnsupportedCheckpoint
from neuron_agent.torch_engine.quant import QuantLinear

# A collective that takes longer than this means a rank is stuck: the step fails.
COLLECTIVE_TIMEOUT = timedelta(minutes=10)


@dataclass(frozen=True)
class Shard:
    """Which part of the model this process holds, and the collectives it shares."""

    rank: int = 0
    world: int = 1

    @property
    def parallel(self) -> bool:
        return self.world > 1

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum `tensor` over the ranks, in place (every rank gets the sum)."""
        if self.parallel:
            dist.all_reduce(tensor)
        return tensor

    def all_reduce_max(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.parallel:
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return tensor

    def broadcast(self, tensor: torch.Tensor) -> torch.Tensor:
        """Rank 0's `tensor` into every rank's (same shape and dtype on all of them)."""
        if self.parallel:
            dist.broadcast(tensor, src=0)
        return tensor


def join_process_group(shard: Shard, store: dist.Store, device: torch.device) -> None:
    """Make this process rank `shard.rank` of the model's process group (one per process)."""
    if dist.is_initialized():
        raise UnsupportedCheckpoint(
            "this process already serves a tensor-parallel model (one per process)"
        )
    # One host: gloo talks over loopback (the host's name may resolve to no usable interface).
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group(
            "nccl",
            store=store,
            rank=shard.rank,
            world_size=shard.world,
            timeout=COLLECTIVE_TIMEOUT,
            device_id=device,  # eager: the communicator exists before the first step
        )
    else:
        dist.init_process_group(
            "gloo",
            store=store,
            rank=shard.rank,
            world_size=shard.world,
            timeout=COLLECTIVE_TIMEOUT,
        )


def leave_process_group(abort: bool = False) -> None:
    """Tear the process group down; `abort` first unblocks collectives stuck on a dead peer
    (NCCL waits for one forever)."""
    if not dist.is_initialized():
        return
    # Best effort: the process is about to drop the model anyway.
    aborter = getattr(dist.distributed_c10d, "_abort_process_group", None)
    with contextlib.suppress(Exception):
        if abort and aborter is not None:
            aborter()
        else:
            dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# Which rows and columns a rank holds


def split(total: int, shard: Shard, what: str) -> slice:
    """Rank's equal part of `total` (rows or columns)."""
    if total % shard.world:
        raise UnsupportedCheckpoint(f"tp = {shard.world} does not divide {what} ({total})")
    size = total // shard.world
    return slice(shard.rank * size, (shard.rank + 1) * size)


def head_rows(spec: ModelSpec, shard: Shard) -> slice:
    """Rows of q_proj (columns of o_proj) that belong to this rank's query heads."""
    heads = split(spec.num_heads, shard, "the attention heads")
    return slice(heads.start * spec.head_dim, heads.stop * spec.head_dim)


def kv_head_rows(spec: ModelSpec, shard: Shard) -> slice:
    """Rows of k_proj / v_proj of this rank's kv heads: its share, or the single kv head its
    query heads read when there are fewer kv heads than ranks."""
    if spec.num_kv_heads >= shard.world:
        heads = split(spec.num_kv_heads, shard, "the kv heads")
    else:
        shard_spec(spec, shard.world)  # refuses tp that is not a multiple of the kv heads
        head = shard.rank * spec.num_kv_heads // shard.world
        heads = slice(head, head + 1)
    return slice(heads.start * spec.head_dim, heads.stop * spec.head_dim)


def mlp_rows(spec: ModelSpec, shard: Shard) -> slice:
    return split(spec.intermediate_size, shard, "the MLP width")


def check_shardable(spec: ModelSpec, tp: int, quantization: str, group_size: int) -> None:
    """Refuse, before any rank starts, a tp the model's shape or int4 groups do not allow."""
    if tp == 1:
        return
    if spec.stored_quantization == "mxfp4" and (spec.expert_intermediate_size // tp) % 32:
        raise UnsupportedCheckpoint(
            f"tp = {tp} would split MXFP4 groups of 32: each rank would hold "
            f"{spec.expert_intermediate_size // tp} of each expert's width"
        )
    local = shard_spec(spec, tp)
    grouped = quantization == "int4" or spec.stored_quantization == "modelopt_int4_awq"
    if not grouped:
        return
    widths = {
        "o_proj": local.num_heads * local.head_dim,
        "down_proj": local.intermediate_size,
    }
    for name, width in widths.items():
        if width % group_size:
            raise UnsupportedCheckpoint(
                f"int4 groups of {group_size} would straddle the tp = {tp} shards of {name}: "
                f"each rank holds {width} of its input columns, not a multiple of {group_size} "
                "(use a group size that divides it, another tp, or int8)"
            )


# ---------------------------------------------------------------------------------------------
# The all-reduce after each row-parallel layer


class RowParallelLinear(nn.Module):
    """A row-parallel shard: its partial output summed over the ranks, then the bias (once)."""

    def __init__(self, linear: QuantLinear, bias: torch.Tensor | None, shard: Shard) -> None:
        super().__init__()
        self.linear = linear
        self.shard = shard
        self.bias = (
            None
            if bias is None
            else nn.Parameter(bias.to(linear.compute_dtype), requires_grad=False)
        )

    @property
    def mode(self) -> str:
        return self.linear.mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        output = self.shard.all_reduce(self.linear(x))
        if self.bias is not None:
            output = output + self.bias
        return output
