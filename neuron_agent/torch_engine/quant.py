"""QuantLinear: one linear-layer type over every weight format the engine serves.

    plain   weight [out, in] in the compute dtype                    (the default, unchanged)
    int8    weight-only: int8 [out, in] + per-output-channel scale   (CPU and GPU)
    int4    weight-only, group-wise: two 4-bit values per byte [out, in/2] + scale per
            (out, group); symmetric, so AWQ exports (ModelOpt) load into it as they are
    fp8     float8 e4m3 [out, in] + per-output-channel scale; on Hopper the matmul itself runs in
            FP8 (`torch._scaled_mm`, activations scaled per token), elsewhere it dequantizes

Model code builds every projection through `QuantLinear.from_weight` or `from_stored` and calls
it like `nn.Linear`; nothing above this module knows which path is active.
"""

from __future__ import annotations

import torch
from torch import nn

from neuron_agent.torch_engine import kernels
from neuron_agent.torch_engine.errors import UnsupportedCheckpoint

FP8_MAX = 448.0
MODES = ("none", "int8", "int4", "fp8")


def fp8_matmul_available(device: torch.device) -> bool:
    if device.type != "cuda" or not hasattr(torch, "_scaled_mm"):
        return False
    major, _minor = torch.cuda.get_device_capability(device)
    return major >= 9


def row_amax(weight: torch.Tensor) -> torch.Tensor:
    """Each output row's largest magnitude (float32): what per-channel scales come from. A
    row-parallel shard holds part of each row; its ranks take the maximum of their parts."""
    return weight.abs().amax(dim=1).float()


def quantize_int8(
    weight: torch.Tensor, amax: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """`amax`: the rows' largest magnitudes when `weight` is only part of each row (tp)."""
    scale = (row_amax(weight) if amax is None else amax).clamp(min=1e-8) / 127.0
    quantized = torch.round(weight.float() / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return quantized, scale


def quantize_int4(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A width that is not a multiple of the group size (SmolLM2's 576 at 128) ends in one
    shorter group: zero padding leaves its scale as the real values' own."""
    out_features, in_features = weight.shape
    if in_features % 2:
        raise UnsupportedCheckpoint(f"int4 needs an even input width, got {in_features}")
    groups = -(-in_features // group_size)
    padded = torch.nn.functional.pad(weight.float(), (0, groups * group_size - in_features))
    grouped = padded.reshape(out_features, groups, group_size)
    scale = grouped.abs().amax(dim=2).clamp(min=1e-8) / 7.0
    values = torch.round(grouped / scale[:, :, None]).clamp(-8, 7).to(torch.int8)
    return pack_int4(values.reshape(out_features, -1)[:, :in_features]), scale


def pack_int4(values: torch.Tensor) -> torch.Tensor:
    """Signed 4-bit values in [-8, 7], shape [out, in] → uint8 [out, in/2] (low nibble first)."""
    unsigned = (values.to(torch.int16) & 0xF).to(torch.uint8)
    return unsigned[:, 0::2] | (unsigned[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    low = (packed & 0xF).to(torch.int8)
    high = ((packed >> 4) & 0xF).to(torch.int8)
    low = torch.where(low > 7, low - 16, low)
    high = torch.where(high > 7, high - 16, high)
    return torch.stack([low, high], dim=-1).reshape(packed.shape[0], packed.shape[1] * 2)


def unpack_int4_rows(packed: torch.Tensor) -> torch.Tensor:
    """ModelOpt's INT4 export: uint8 [out/2, in], output row 2i in the low nibble and row 2i+1
    in the high nibble, signed two's complement → int8 [out, in]."""
    low = (packed & 0xF).to(torch.int8)
    high = ((packed >> 4) & 0xF).to(torch.int8)
    low = torch.where(low > 7, low - 16, low)
    high = torch.where(high > 7, high - 16, high)
    return torch.stack([low, high], dim=1).reshape(packed.shape[0] * 2, packed.shape[1])


def quantize_fp8(
    weight: torch.Tensor, amax: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    scale = (row_amax(weight) if amax is None else amax).clamp(min=1e-8) / FP8_MAX
    quantized = (weight.float() / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return quantized, scale


def quantize(
    weight: torch.Tensor, mode: str, group_size: int, amax: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(stored weight, scale) of a full-precision [out, in] weight in an int8, int4 or fp8
    mode (`QuantLinear`'s formats; the experts' stacks use the same)."""
    if mode == "int8":
        return quantize_int8(weight, amax)
    if mode == "int4":
        return quantize_int4(weight, group_size)
    if mode == "fp8":
        return quantize_fp8(weight, amax)
    raise UnsupportedCheckpoint(f"quantization {mode!r} is not one of {', '.join(MODES)}")


class QuantLinear(nn.Module):
    """`y = x @ W.T + b`, whatever form W is stored in."""

    def __init__(
        self,
        mode: str,
        weight: torch.Tensor,
        scale: torch.Tensor | None,
        bias: torch.Tensor | None,
        compute_dtype: torch.dtype,
        group_size: int = 128,
        pre_quant_scale: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise UnsupportedCheckpoint(f"quantization {mode!r} is not one of {', '.join(MODES)}")
        self.mode = mode
        self.compute_dtype = compute_dtype
        self.group_size = group_size
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.scale = None if scale is None else nn.Parameter(scale.float(), requires_grad=False)
        self.bias = (
            None if bias is None else nn.Parameter(bias.to(compute_dtype), requires_grad=False)
        )
        self.pre_quant_scale = (
            None
            if pre_quant_scale is None
            else nn.Parameter(pre_quant_scale.to(compute_dtype), requires_grad=False)
        )
        self.out_features = weight.shape[0]
        self._use_scaled_mm = mode == "fp8" and fp8_matmul_available(weight.device)
        # Every row count through one fixed-tile kernel (`make_batch_invariant`).
        self.batch_invariant = False
        # Plain weights at one row through the Triton one-row kernel: it streams the small
        # matrices faster than cuBLAS (o_proj 6.2 against 10.8 µs on an H200); from two rows
        # cuBLAS is as fast or faster (BENCHMARKS.md).
        self._plain_kernel = mode == "none" and weight.is_cuda

    @classmethod
    def from_weight(
        cls,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        mode: str,
        compute_dtype: torch.dtype,
        group_size: int = 128,
        amax: torch.Tensor | None = None,
    ) -> QuantLinear:
        """Quantize a full-precision weight now (in-situ quantization at load time). `amax`:
        the whole rows' largest magnitudes when `weight` is a row-parallel shard, so per-channel
        scales equal the unsharded layer's (int4's groups lie inside one shard: no need)."""
        if mode == "none":
            return cls("none", weight.to(compute_dtype), None, bias, compute_dtype)
        quantized, scale = quantize(weight, mode, group_size, amax)
        return cls(mode, quantized, scale, bias, compute_dtype, group_size)

    def dequantized(self) -> torch.Tensor:
        """The weight as the compute dtype (what the plain path multiplies by)."""
        weight = self.weight
        if self.mode == "none":
            return weight
        assert self.scale is not None
        if self.mode == "int4":
            values = unpack_int4(weight).to(self.compute_dtype)
            scale = self.scale.to(self.compute_dtype).repeat_interleave(self.group_size, dim=1)
            return values * scale[:, : values.shape[1]]
        return weight.to(self.compute_dtype) * self.scale.to(self.compute_dtype)[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pre_quant_scale is not None:
            x = x * self.pre_quant_scale
        if self.batch_invariant and x.is_cuda:
            output = self._invariant_forward(x)
        elif self._use_scaled_mm:
            output = self._fp8_forward(x)
        elif self._plain_kernel and x.numel() == x.shape[-1]:
            output = self._weight_kernel(x, self.weight, None)
        elif self.mode == "int8":
            # Scale after the matmul: one multiply per output instead of per weight.
            output = (x @ self.weight.to(x.dtype).T) * self.scale.to(x.dtype)  # type: ignore[union-attr]
        else:
            output = x @ self.dequantized().T
        if self.bias is not None:
            output = output + self.bias
        return output

    def _weight_kernel(
        self,
        x: torch.Tensor,
        weight: torch.Tensor,
        scale: torch.Tensor | None,
        batch_invariant: bool = False,
    ) -> torch.Tensor:
        """`kernels.weight_matmul` over x's rows, whatever its leading dimensions."""
        flat = kernels.weight_matmul(x.reshape(-1, x.shape[-1]), weight, scale, batch_invariant)
        return flat.reshape(*x.shape[:-1], self.out_features)

    def _invariant_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Stored int8/fp8 weights are widened in the kernel; int4 is unpacked first."""
        if self.mode == "int4":
            return self._weight_kernel(x, self.dequantized(), None, batch_invariant=True)
        return self._weight_kernel(x, self.weight, self.scale, batch_invariant=True)

    def _fp8_forward(self, x: torch.Tensor) -> torch.Tensor:
        assert self.scale is not None
        shape = x.shape
        if x.numel() // shape[-1] <= kernels.WEIGHT_MATMUL_MAX_ROWS:
            # Decoding: bound by reading the weights, which are FP8 either way; scaling the
            # activations too would cost kernels and accuracy for nothing.
            return self._weight_kernel(x, self.weight, self.scale)
        # One kernel scales and casts the activations (four elementwise ops eagerly, which cost
        # more than FP8 saved at small batches).
        x_fp8, x_scale = kernels.quantize_fp8_rows(x.reshape(-1, shape[-1]))
        output = torch._scaled_mm(
            x_fp8,
            self.weight.T,
            scale_a=x_scale,
            scale_b=self.scale[None, :],
            out_dtype=self.compute_dtype,
        )
        return output.reshape(*shape[:-1], self.out_features)
