"""Mixture-of-experts MLP layers (Qwen3-MoE, Mixtral): a router picks each token's experts, and
only those experts' gated MLPs run.

Every expert's matrices are stacked into one tensor per projection — gate and up fused,
[E, 2I, H], and down, [E, H, I] — in any of `QuantLinear`'s weight formats (plain, int8 or
fp8 with a scale per output row, int4 with a scale per row and group), quantized with the
same functions at load. The kernels (`kernels.route_experts`, `kernels.experts_mlp`) read
them as stored.

Tensor parallel splits every expert the way the dense MLP is split: each rank holds its slice
of every expert's width (gate/up rows, down columns) and the partial outputs are summed, one
all-reduce per layer. At batch 1 each rank then reads 1/tp of every chosen expert, an even
load however the router chooses; expert parallelism (whole experts per rank) would leave the
rank that holds two of a token's experts as the step's straggler.
"""

from __future__ import annotations

import torch
from torch import nn

from neuron_agent.torch_engine import kernels
from neuron_agent.torch_engine.checkpoint import ExpertLayout, ModelSpec
from neuron_agent.torch_engine.errors import UnsupportedCheckpoint
from neuron_agent.torch_engine.kernels.reference import ExpertWeights
from neuron_agent.torch_engine.parallel import Shard
from neuron_agent.torch_engine.quant import QuantLinear, quantize, row_amax


class ExpertStack(nn.Module):
    """One projection of every expert, [E, N, K] as stored, and its scales."""

    def __init__(
        self, mode: str, weight: torch.Tensor, scale: torch.Tensor | None, group_size: int
    ) -> None:
        super().__init__()
        self.mode = mode
        self.group_size = group_size
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.scale = None if scale is None else nn.Parameter(scale, requires_grad=False)

    @classmethod
    def quantize(
        cls,
        matrices: list[torch.Tensor],
        mode: str,
        dtype: torch.dtype,
        group_size: int,
        amax: list[torch.Tensor] | None = None,
    ) -> ExpertStack:
        """Each expert's [N, K] matrix quantized on its own (scales belong to its rows), then
        stacked. `amax`: the whole rows' largest magnitudes when the matrices are row-parallel
        shards (tp), as for `QuantLinear.from_weight`."""
        if mode == "none":
            return cls(mode, torch.stack([m.to(dtype) for m in matrices]), None, group_size)
        weights, scales = [], []
        for index, matrix in enumerate(matrices):
            weight, scale = quantize(
                matrix, mode, group_size, None if amax is None else amax[index]
            )
            weights.append(weight)
            scales.append(scale.float())
        return cls(mode, torch.stack(weights), torch.stack(scales), group_size)


class SparseMoe(nn.Module):
    """Router → each token's top-k experts → their gated MLPs, summed with the routing
    weights (and over the tensor-parallel ranks)."""

    def __init__(
        self,
        router: QuantLinear,
        gate_up: ExpertStack,
        down: ExpertStack,
        top_k: int,
        normalize: bool,
        shard: Shard,
        softmax_after: bool = False,
        biases: tuple[torch.Tensor, torch.Tensor] | None = None,
        activation: str = "silu",
        alpha: float = 1.702,
        limit: float = 7.0,
    ) -> None:
        super().__init__()
        self.router = router
        self.gate_up = gate_up
        self.down = down
        self.top_k = top_k
        self.normalize = normalize
        self.softmax_after = softmax_after
        self.shard = shard
        self.gate_up_bias = None if biases is None else nn.Parameter(biases[0], False)
        self.down_bias = None if biases is None else nn.Parameter(biases[1], False)
        self.activation = (activation, alpha, limit)
        self.batch_invariant = False  # LlamaModel.make_batch_invariant

    def weights(self) -> ExpertWeights:
        # Built per call: sleeping and waking a model swaps its parameters' storage.
        activation, alpha, limit = self.activation
        return ExpertWeights(
            self.gate_up.weight,
            self.gate_up.scale,
            self.down.weight,
            self.down.scale,
            self.gate_up.group_size,
            self.gate_up_bias,
            self.down_bias,
            activation,
            alpha,
            limit,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = kernels.route_experts(
            self.router(x), self.top_k, self.normalize, self.softmax_after
        )
        out = kernels.experts_mlp(x, self.weights(), weights, ids, self.batch_invariant)
        return self.shard.all_reduce(out)


def _tensor(get: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    try:
        return get[name]
    except KeyError:
        raise UnsupportedCheckpoint(f"the checkpoint lacks tensor {name}") from None


def load_sparse_moe(
    spec: ModelSpec,
    layout: ExpertLayout,
    prefix: str,
    get: dict[str, torch.Tensor],
    mode: str,
    dtype: torch.dtype,
    device: torch.device,
    group_size: int,
    shard: Shard,
) -> SparseMoe:
    """Layer `prefix`'s router and experts from the checkpoint tensors `get`, this rank's slice
    of each expert's width (`spec` is the whole model's)."""
    width = spec.expert_intermediate_size // shard.world
    rows = slice(shard.rank * width, (shard.rank + 1) * width)
    mlp = f"{prefix}.{layout.mlp}"

    def matrix(expert: int, projection: str) -> torch.Tensor:
        return _tensor(get, f"{mlp}.experts.{expert}.{projection}.weight").to(device, dtype)

    experts = range(spec.num_experts)
    gate_up = [
        torch.cat((matrix(e, layout.gate)[rows], matrix(e, layout.up)[rows])) for e in experts
    ]
    down = [matrix(e, layout.down)[:, rows] for e in experts]
    amax = None
    if shard.parallel and mode in ("int8", "fp8"):
        amax = [shard.all_reduce_max(row_amax(m)) for m in down]
    router_weight = _tensor(get, f"{mlp}.{layout.router}.weight").to(device, dtype)
    return SparseMoe(
        QuantLinear.from_weight(router_weight, None, "none", dtype),
        ExpertStack.quantize(gate_up, mode, dtype, group_size),
        ExpertStack.quantize(down, mode, dtype, group_size, amax),
        spec.experts_per_token,
        spec.normalize_expert_weights,
        shard,
    )


def load_gpt_oss_experts(
    spec: ModelSpec,
    prefix: str,
    get: dict[str, torch.Tensor],
    mode: str,
    dtype: torch.dtype,
    device: torch.device,
    group_size: int,
    swiglu: tuple[float, float],
    shard: Shard,
) -> SparseMoe:
    """gpt-oss's experts: fused [E, H, 2I] gate/up (gate and up interleaved) and [E, I, H]
    down in the compute dtype, quantized in situ like any other; or as published, MXFP4
    `*_blocks` [E, N, K/32, 16] and `*_scales` [E, N, K/32], kept as stored. Biases on both,
    a biased router whose top-k logits are softmaxed, and the clamped SwiGLU. A tp rank holds
    its slice of every expert's width (whole groups of 32 for MXFP4's down), and rank 0 alone
    adds down's bias (the ranks' outputs are summed)."""
    mlp = f"{prefix}.mlp"
    width = spec.expert_intermediate_size
    mine = slice(shard.rank * width // shard.world, (shard.rank + 1) * width // shard.world)
    # This rank's gate rows, then its up rows, from gate/up interleaved ([gate | up] is what
    # the activation kernels take).
    order = torch.cat((torch.arange(0, 2 * width, 2)[mine], torch.arange(1, 2 * width, 2)[mine]))
    gate_up_bias = _tensor(get, f"{mlp}.experts.gate_up_proj_bias")[:, order]
    down_bias = _tensor(get, f"{mlp}.experts.down_proj_bias")
    if shard.rank:
        down_bias = torch.zeros_like(down_bias)
    amax = None
    if f"{mlp}.experts.gate_up_proj_blocks" in get:

        def packed(name: str, rows: torch.Tensor | None, groups: slice) -> ExpertStack:
            blocks = _tensor(get, f"{mlp}.experts.{name}_blocks")[:, :, groups].to(device)
            scales = _tensor(get, f"{mlp}.experts.{name}_scales")[:, :, groups].to(device)
            if rows is not None:
                blocks, scales = blocks[:, rows.to(device)], scales[:, rows.to(device)]
            experts, out_features = blocks.shape[:2]
            return ExpertStack("mxfp4", blocks.reshape(experts, out_features, -1), scales, 32)

        gate_up = packed("gate_up_proj", order, slice(None))
        down = packed("down_proj", None, slice(mine.start // 32, mine.stop // 32))
    else:
        fused = _tensor(get, f"{mlp}.experts.gate_up_proj").to(device, dtype)
        down_stack = _tensor(get, f"{mlp}.experts.down_proj").to(device, dtype)
        gate_up = ExpertStack.quantize(
            [m.T[order.to(device)] for m in fused], mode, dtype, group_size
        )
        downs = [m.T[:, mine] for m in down_stack]
        if shard.parallel and mode in ("int8", "fp8"):
            amax = [shard.all_reduce_max(row_amax(m)) for m in downs]
        down = ExpertStack.quantize(downs, mode, dtype, group_size, amax)
    router = QuantLinear.from_weight(
        _tensor(get, f"{mlp}.router.weight").to(device, dtype),
        _tensor(get, f"{mlp}.router.bias").to(device, dtype),
        "none",
        dtype,
    )
    return SparseMoe(
        router,
        gate_up,
        down,
        spec.experts_per_token,
        False,
        shard,
        softmax_after=True,
        biases=(gate_up_bias.to(device, dtype), down_bias.to(device, dtype)),
        activation="swiglu_oai",
        alpha=swiglu[0],
        limit=swiglu[1],
    )
