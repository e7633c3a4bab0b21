"""The mixture-of-experts kernels against their plain-PyTorch references, on CPU under Triton's
interpreter: routing, the sort by expert, and the experts' MLP through both GPU paths (one
program per chosen row for decode, the sorted grouped matmul for prefill) in every weight
format."""

from __future__ import annotations

import os

import pytest
import torch

from neuron_agent.torch_engine.kernels import reference
from neuron_agent.torch_engine.kernels.reference import ExpertWeights
from neuron_agent.torch_engine.moe import ExpertStack

assert os.environ.get("TRITON_INTERPRET") == "1", "tests/conftest.py sets it before imports"
# Without the Triton compiler there is nothing to run; but the project's own kernel module must
# import wherever Triton does: an ImportError in it is a failure, never a silent skip.
pytest.importorskip("triton")
from neuron_agent.torch_engine.kernels import triton_kernels  # noqa: E402

EXPERTS, HIDDEN, WIDTH, TOP_K = 6, 64, 32, 2


def _generator() -> torch.Generator:
    return torch.Generator().manual_seed(0)


@pytest.mark.parametrize("normalize", [False, True])
def test_routing_picks_the_reference_experts_and_weights(normalize: bool) -> None:
    logits = torch.randn(9, 12, generator=_generator()) * 3
    weights, ids = triton_kernels.route_experts(logits, 3, normalize)
    expected_weights, expected_ids = reference.route_experts(logits, 3, normalize)
    assert torch.equal(ids, expected_ids)
    torch.testing.assert_close(weights, expected_weights)
    # Softmax over all twelve, then the best three: they sum to one only when renormalised.
    sums = weights.sum(dim=-1)
    assert torch.allclose(sums, torch.ones(9)) == normalize


def test_the_sort_groups_rows_by_expert_in_padded_blocks() -> None:
    ids = torch.tensor([[2, 0], [2, 5], [0, 2]], dtype=torch.int32)
    rows, block_experts = reference.sort_by_expert(ids, 6, 4)
    # Rows (t·k + j): expert 0 has 1 and 4, expert 2 has 0, 2 and 5, expert 5 has 3; each
    # group padded with 6 (no row) to a block of 4.
    assert rows[:12].tolist() == [1, 4, 6, 6, 0, 2, 5, 6, 3, 6, 6, 6]
    assert block_experts.tolist()[:3] == [0, 2, 5]
    assert set(block_experts.tolist()[3:]) == {-1}
    assert set(rows[12:].tolist()) <= {6}


def _stacks(mode: str) -> tuple[ExpertStack, ExpertStack]:
    g = _generator()
    gate_up = [torch.randn(2 * WIDTH, HIDDEN, generator=g) * 0.2 for _ in range(EXPERTS)]
    down = [torch.randn(HIDDEN, WIDTH, generator=g) * 0.2 for _ in range(EXPERTS)]
    if mode == "mxfp4":
        return _mxfp4(gate_up, g), _mxfp4(down, g)
    return (
        ExpertStack.quantize(gate_up, mode, torch.float32, 32),
        ExpertStack.quantize(down, mode, torch.float32, 32),
    )


def _mxfp4(matrices: list[torch.Tensor], g: torch.Generator) -> ExpertStack:
    """Random e2m1 codes and power-of-two scales around 2^-3, as gpt-oss stores them."""
    rows, columns = matrices[0].shape
    codes = torch.randint(0, 16, (len(matrices), rows, columns), generator=g, dtype=torch.uint8)
    packed = codes[..., 0::2] | (codes[..., 1::2] << 4)
    scales = torch.randint(122, 127, (len(matrices), rows, columns // 32), generator=g)
    return ExpertStack("mxfp4", packed, scales.to(torch.uint8), 32)


def _weights(mode: str, gpt_oss: bool = False) -> ExpertWeights:
    gate_up, down = _stacks(mode)
    if not gpt_oss:
        return ExpertWeights(gate_up.weight, gate_up.scale, down.weight, down.scale, 32)
    g = torch.Generator().manual_seed(5)
    return ExpertWeights(
        gate_up.weight,
        gate_up.scale,
        down.weight,
        down.scale,
        32,
        torch.randn(EXPERTS, 2 * WIDTH, generator=g),
        torch.randn(EXPERTS, HIDDEN, generator=g),
        "swiglu_oai",
        1.702,
        1.5,  # a limit the random activations cross
    )


@pytest.mark.parametrize("mode", ["none", "int8", "fp8", "int4", "mxfp4"])
@pytest.mark.parametrize("tokens", [1, 4, 21])  # 2 and 8 rows: decode; 42: the grouped matmul
def test_experts_mlp_matches_the_reference(mode: str, tokens: int) -> None:
    g = _generator()
    experts = _weights(mode)
    x = torch.randn(tokens, HIDDEN, generator=g)
    weights, ids = reference.route_experts(torch.randn(tokens, EXPERTS, generator=g), TOP_K, True)
    got = triton_kernels.experts_mlp(x, experts, weights, ids)
    expected = reference.experts_mlp(x, experts, weights, ids)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("tokens", [1, 21])
def test_gpt_oss_experts_with_biases_and_clamped_swiglu_match_the_reference(tokens: int) -> None:
    g = _generator()
    experts = _weights("mxfp4", gpt_oss=True)
    x = torch.randn(tokens, HIDDEN, generator=g)
    logits = torch.randn(tokens, EXPERTS, generator=g)
    weights, ids = triton_kernels.route_experts(logits, TOP_K, False, softmax_after=True)
    expected_weights, expected_ids = reference.route_experts(logits, TOP_K, False, True)
    assert torch.equal(ids, expected_ids)
    torch.testing.assert_close(weights, expected_weights)
    got = triton_kernels.experts_mlp(x, experts, weights, ids)
    expected = reference.experts_mlp(x, experts, weights, ids)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("activation", ["gelu_tanh", "swiglu_oai"])
def test_gated_activations_match_the_reference(activation: str) -> None:
    gate_up = torch.randn(3, 2 * 1500, generator=_generator()) * 4
    torch.testing.assert_close(
        triton_kernels.silu_and_mul(gate_up, activation, 1.702, 7.0),
        reference.silu_and_mul(gate_up, activation, 1.702, 7.0),
        rtol=1e-5,
        atol=1e-5,
    )


def test_mxfp4_decodes_as_transformers_does() -> None:
    """e2m1 codes, low nibble first, times 2^(scale - 127): transformers' own dequantization
    (`convert_moe_packed_tensors`, which returns the matrix transposed)."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    stack = _mxfp4([torch.zeros(8, 64)] * 2, _generator())
    blocks = stack.weight.reshape(2, 8, 2, 16)
    expected = convert_moe_packed_tensors(blocks, stack.scale, dtype=torch.float32)
    got = reference.expert_weight(stack.weight, stack.scale, 1, 32, torch.float32)
    torch.testing.assert_close(got, expected[1].T)


def test_the_reference_equals_a_per_token_loop_over_dense_experts() -> None:
    """The oracle itself: each token's chosen experts' gated MLPs, weighted, summed."""
    g = _generator()
    experts = _weights("none")
    x = torch.randn(5, HIDDEN, generator=g)
    weights, ids = reference.route_experts(torch.randn(5, EXPERTS, generator=g), TOP_K, False)
    got = reference.experts_mlp(x, experts, weights, ids)
    for token in range(5):
        expected = torch.zeros(HIDDEN)
        for j in range(TOP_K):
            expert = int(ids[token, j])
            gate, up = (experts.gate_up[expert] @ x[token]).chunk(2)
            hidden = torch.nn.functional.silu(gate) * up
            expected += weights[token, j] * (experts.down[expert] @ hidden)
        torch.testing.assert_close(got[token], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["none", "fp8"])
def test_grouped_experts_give_each_row_the_same_bits_in_any_batch(mode: str) -> None:
    """Batch-invariant mode: a token's output alone equals its row in a batch of 21, bit for
    bit (the decode kernel would serve the one alone)."""
    g = _generator()
    experts = _weights(mode)
    x = torch.randn(21, HIDDEN, generator=g)
    weights, ids = reference.route_experts(torch.randn(21, EXPERTS, generator=g), TOP_K, True)
    batch = triton_kernels.experts_mlp(x, experts, weights, ids, grouped=True)
    for row in (0, 13):
        alone = triton_kernels.experts_mlp(
            x[row : row + 1], experts, weights[row : row + 1], ids[row : row + 1], grouped=True
        )
        assert torch.equal(alone[0], batch[row])
