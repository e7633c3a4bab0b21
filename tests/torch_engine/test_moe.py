"""Mixture-of-experts models (Qwen3-MoE, Mixtral, gpt-oss) and Gemma 3 in the engine: greedy
decoding of concurrent requests equals transformers' own (past the sliding window of the
windowed layers), in-situ quantization of the experts stays close, the
memory estimate counts every expert, and tp = 2 (each rank a slice of every expert) equals
tp = 1."""

from __future__ import annotations

import json
import threading
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from neuron_agent.torch_engine.checkpoint import estimate_weight_bytes, read_spec
from neuron_agent.torch_engine.errors import UnsupportedCheckpoint
from neuron_agent.torch_engine.loader import EngineOptions, build_engine
from neuron_agent.torch_engine.moe import SparseMoe
from neuron_agent.torch_engine.parallel import check_shardable
from neuron_agent.torch_engine.scheduler import Engine, GenerationRequest
from tests.torch_engine.test_architectures import write_model
from tests.torch_engine.test_graphs import assert_padding_changes_nothing
from tests.torch_engine.test_tensor_parallel import outputs

KINDS = ("qwen3_moe", "mixtral")
WINDOWED = ("gemma3", "gpt_oss")  # sliding-window layers: decoding past the window
PROMPTS = [
    torch.randint(0, 512, (n,), generator=torch.Generator().manual_seed(n)).tolist()
    for n in (33, 5, 18)
]
NEW_TOKENS = 16


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("moe-models")
    return {kind: write_model(kind, folder / kind) for kind in KINDS + WINDOWED}


def reference_greedy(folder: Path, prompt: list[int]) -> tuple[list[int], list[float]]:
    """transformers' greedy tokens (up to and with its end token: the engine, given no end
    ids, goes on) and, per step, the gap between its top two logits."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]),
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            output_scores=True,
            return_dict_in_generate=True,
        )
    gaps = [float(s[0].topk(2).values.diff().abs()) for s in out.scores]
    return out.sequences[0][len(prompt) :].tolist(), gaps


def generate_together(engine: Engine, prompts: list[list[int]]) -> list[list[int]]:
    """Every prompt submitted at once: prefilled in one batch, decoded in one batch."""
    results: list[list[int]] = [[] for _ in prompts]
    done = [threading.Event() for _ in prompts]
    errors: list[str] = []
    for index, prompt in enumerate(prompts):

        def emit(new: list[int], final: bool, index: int = index) -> None:
            results[index].extend(new)
            if final:
                done[index].set()

        def fail(message: str, index: int = index) -> None:
            errors.append(message)
            done[index].set()

        engine.submit(
            GenerationRequest(prompt=prompt, max_new_tokens=NEW_TOKENS, emit=emit, fail=fail)
        )
    engine.start()
    try:
        assert all(event.wait(120) for event in done) and not errors, errors
    finally:
        engine.stop()
    return results


@pytest.mark.parametrize("kind", KINDS + WINDOWED)
def test_greedy_decoding_equals_transformers_up_to_a_near_tie(
    models: dict[str, Path], kind: str
) -> None:
    engine = build_engine(EngineOptions(models[kind], kv_cache_tokens=512, max_batch_size=4))
    got = generate_together(engine, PROMPTS)
    for prompt, tokens in zip(PROMPTS, got, strict=True):
        expected, gaps = reference_greedy(models[kind], prompt)
        tokens = tokens[: len(expected)]
        differs = next(
            (i for i, (a, b) in enumerate(zip(tokens, expected, strict=True)) if a != b), None
        )
        if differs is None:
            assert tokens == expected
        else:
            assert gaps[differs] < 1e-4, f"token {differs} differs, logit gap {gaps[differs]}"


@pytest.mark.parametrize("kind", ["qwen3_moe", "gpt_oss"])
def test_padding_a_decode_batch_to_its_graph_bucket_changes_no_real_row(
    models: dict[str, Path], kind: str
) -> None:
    """What a CUDA graph replays (a batch padded to its bucket), run eagerly: padded rows
    route to experts of their own and leave the real rows' logits and cache alone."""
    engine = build_engine(EngineOptions(models[kind], kv_cache_tokens=512, max_batch_size=4))
    assert_padding_changes_nothing(engine)


# int4 groups of 32 fit the experts' widths (64 and 128) and the hidden size (128). Random
# weights quantize badly: the dense Llama of test_architectures moves by 1 %, 4 % and 18 %;
# here a rounded router can also pick another expert (seen: 1.7 %, 10 %, 41 %).
@pytest.mark.parametrize(("mode", "bound"), [("int8", 0.03), ("fp8", 0.15), ("int4", 0.5)])
def test_in_situ_quantized_experts_stay_close(
    models: dict[str, Path], mode: str, bound: float
) -> None:
    folder = models["qwen3_moe"]
    plain = build_engine(EngineOptions(folder, kv_cache_tokens=256))
    quantized = build_engine(
        EngineOptions(folder, kv_cache_tokens=256, quantization=mode, group_size=32)
    )
    experts = [m for m in quantized.model.modules() if isinstance(m, SparseMoe)]
    assert experts and all(m.gate_up.mode == m.down.mode == mode for m in experts)
    for prompt in PROMPTS:
        a, b = plain.prompt_logits(prompt)[-1], quantized.prompt_logits(prompt)[-1]
        error = float((a - b).norm() / a.norm())
        assert error < bound, f"{mode}: relative logit error {error:.4f} ≥ {bound}"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", ["none", "int8"])
def test_the_memory_estimate_counts_every_expert(
    models: dict[str, Path], kind: str, mode: str
) -> None:
    """What the model's parameters hold is what the neuron's estimate says: norms and scales
    are not counted, within 3 % at this size (Mixtral's experts are 3/4 of its weights)."""
    engine = build_engine(EngineOptions(models[kind], kv_cache_tokens=256, quantization=mode))
    held = sum(p.numel() * p.element_size() for p in engine.model.parameters())
    estimate = estimate_weight_bytes(read_spec(models[kind]), mode, 4)  # float32 on CPU
    assert abs(held - estimate) / estimate < 0.03, (held, estimate)


@pytest.mark.parametrize("kind", ["gemma3", "gpt_oss", "gpt_oss_mxfp4"])
def test_windowed_models_at_tp2_equal_tp1(
    models: dict[str, Path], kind: str, tmp_path: Path
) -> None:
    """Windows, ropes and norms are the same on every rank; gpt-oss's sinks go with their
    heads, its experts (MXFP4 too, in whole groups) are split and down's bias added once."""
    folder = models[kind.removesuffix("_mxfp4")]
    if kind.endswith("_mxfp4"):
        folder = tmp_path / "mxfp4"
        write_mxfp4_export(models["gpt_oss"], folder, tmp_path / "dequantized")
    options = EngineOptions(folder, kv_cache_tokens=256)
    one_logits, one_tokens = outputs(options)
    two_logits, two_tokens = outputs(replace(options, tp=2))
    for a, b in zip(one_logits, two_logits, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
    assert two_tokens == one_tokens


def test_a_tp_that_splits_mxfp4_groups_is_refused(models: dict[str, Path]) -> None:
    spec = replace(read_spec(models["gpt_oss"]), stored_quantization="mxfp4")
    with pytest.raises(UnsupportedCheckpoint, match=r"^tp = 2 would split MXFP4 groups of 32"):
        check_shardable(replace(spec, expert_intermediate_size=96), 2, "none", 32)


# int8 too would check the row-parallel amax, which the dense layers share (test_tensor_parallel)
@pytest.mark.parametrize("quantization", ["none"])
def test_tp2_splits_every_expert_and_equals_tp1(models: dict[str, Path], quantization: str) -> None:
    options = EngineOptions(models["qwen3_moe"], quantization=quantization, kv_cache_tokens=256)
    one_logits, one_tokens = outputs(options)

    def holds_half_of_every_expert(engine: Engine) -> None:
        experts = next(m for m in engine.model.modules() if isinstance(m, SparseMoe))
        assert experts.gate_up.weight.shape == (8, 2 * 32, 128)
        assert experts.down.weight.shape == (8, 128, 32)

    two_logits, two_tokens = outputs(replace(options, tp=2), holds_half_of_every_expert)
    for a, b in zip(one_logits, two_logits, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
    assert two_tokens == one_tokens


FP4_GRID = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def write_mxfp4_export(source: Path, folder: Path, dequantized: Path) -> None:
    """gpt-oss as OpenAI publishes it: each expert projection as MXFP4 `*_blocks` [E, out,
    in/32, 16] (e2m1 codes, low nibble first) and `*_scales` [E, out, in/32] (exponent + 127),
    out × in; and beside it the same weights dequantized by transformers' own
    `convert_moe_packed_tensors`, for the reference model."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    tensors = load_file(str(source / "model.safetensors"))
    plain = dict(tensors)
    for name in [n for n in tensors if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        matrix = tensors.pop(name).transpose(1, 2).float()  # [E, out, in]
        experts, rows, columns = matrix.shape
        groups = matrix.reshape(experts, rows, columns // 32, 32)
        exponent = torch.ceil(torch.log2(groups.abs().amax(-1).clamp(min=1e-8) / 6.0))
        scaled = groups / torch.exp2(exponent)[..., None]
        codes = (scaled.abs()[..., None] - FP4_GRID).abs().argmin(-1).to(torch.uint8)
        codes |= (scaled < 0).to(torch.uint8) << 3
        blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)
        scales = (exponent + 127).to(torch.uint8)
        tensors[f"{name}_blocks"], tensors[f"{name}_scales"] = blocks, scales
        plain[name] = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)
    for target, weights, quantization in (
        (folder, tensors, {"quant_method": "mxfp4"}),
        (dequantized, plain, None),
    ):
        target.mkdir(parents=True)
        save_file(weights, str(target / "model.safetensors"))
        config = json.loads((source / "config.json").read_text())
        if quantization:
            config["quantization_config"] = quantization
        (target / "config.json").write_text(json.dumps(config))


def test_mxfp4_experts_are_served_as_stored(models: dict[str, Path], tmp_path: Path) -> None:
    """A published-layout MXFP4 gpt-oss equals transformers on its dequantized weights, and
    its memory estimate counts 4.25 bits an expert weight."""
    mxfp4, dequantized = tmp_path / "mxfp4", tmp_path / "dequantized"
    write_mxfp4_export(models["gpt_oss"], mxfp4, dequantized)
    reference = AutoModelForCausalLM.from_pretrained(dequantized, dtype=torch.float32).eval()
    engine = build_engine(EngineOptions(mxfp4, kv_cache_tokens=256))
    experts = [m for m in engine.model.modules() if isinstance(m, SparseMoe)]
    assert all(m.gate_up.weight.dtype == torch.uint8 for m in experts)
    for prompt in PROMPTS:
        with torch.no_grad():
            expected = reference(torch.tensor([prompt])).logits[0]
        torch.testing.assert_close(engine.prompt_logits(prompt), expected, rtol=1e-4, atol=1e-4)
    held = sum(p.numel() * p.element_size() for p in engine.model.parameters())
    estimate = estimate_weight_bytes(read_spec(mxfp4), "none", 4)
    assert abs(held - estimate) / estimate < 0.03, (held, estimate)
