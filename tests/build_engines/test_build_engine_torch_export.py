"""The Hugging Face exports the torch engine loads: their exact format, checked against
ModelOpt's own fake-quantized weights, and the torch engine's logits against the original.

Verified facts (ModelOpt 0.47.0, CPU):
- FP8: `weight` float8_e4m3fn [out, in]; `weight_scale` and `input_scale` 0-dim float32;
  `w.float() * weight_scale` equals ModelOpt's fake-quantized weight exactly.
- INT4-AWQ: `weight` uint8 [out/2, in]: the two 4-bit values of a byte are two consecutive
  OUTPUT rows (2i in the low nibble, 2i+1 in the high one), signed two's complement (-8..7,
  not offset by 8); `weight_scale` float32 [out, in/group]; `pre_quant_scale` [in] only on
  o_proj and down_proj (folded into the layer norms for q/k/v and gate/up, which ModelOpt
  re-quantizes with one shared scale); group size only in hf_quant_config.json.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from build_engines import quantize
from neuron_agent.torch_engine.quant import unpack_int4_rows
from tests.build_engines.helpers import Quantized

# Agreement with the unquantized model that every export must keep (logits over a 64-token
# prompt the calibration never saw): cosine similarity at every position, greedy top-1 share.
MIN_COSINE = 0.995
MIN_TOP1 = 0.9
PROMPT = (
    "A context manager sets something up before a block of code runs and tears it down "
    "afterwards, even when the block raises. The with statement calls __enter__ first, binds "
    "its result to the target, and calls __exit__ with the exception details at the end."
)


def export_hf(quantized: Quantized, folder: Path) -> Path:
    quantize.export_hf_checkpoint(quantized.request, quantized.info, quantized.quant_dir, folder)
    return folder


@pytest.fixture(scope="module")
def fp8_export(fp8_torch: Quantized, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_hf(fp8_torch, tmp_path_factory.mktemp("fp8-hf"))


@pytest.fixture(scope="module")
def int4_export(int4_torch: Quantized, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_hf(int4_torch, tmp_path_factory.mktemp("int4-hf"))


def fake_quantized_weights(quantized: Quantized) -> dict[str, torch.Tensor]:
    """ModelOpt's own view: each quantized linear's weight through its weight quantizer."""
    model = quantize.restore_quantized(quantized.info, quantized.quant_dir, "cpu")
    weights = {}
    with torch.no_grad():
        for name, module in model.named_modules():
            quantizer = getattr(module, "weight_quantizer", None)
            if quantizer is not None and quantizer.is_enabled:
                weights[name] = quantizer(module.weight).float()
    return weights


def test_fp8_export_format(fp8_torch: Quantized, fp8_export: Path) -> None:
    tensors = load_file(str(fp8_export / "model.safetensors"))
    reference = fake_quantized_weights(fp8_torch)
    assert len(reference) == 4 * 7
    for name, expected in reference.items():
        weight, scale = tensors[f"{name}.weight"], tensors[f"{name}.weight_scale"]
        assert weight.dtype == torch.float8_e4m3fn and tuple(weight.shape) == tuple(expected.shape)
        assert scale.dtype == torch.float32 and scale.dim() == 0
        assert tensors[f"{name}.input_scale"].dim() == 0
        # ModelOpt's export and its fake quantization round the same values; a value at a
        # rounding boundary may land one e4m3 step (1/8 relative) apart: allow that, rarely.
        difference = (weight.float() * scale - expected).abs()
        assert bool((difference <= expected.abs() / 8 + 1e-12).all()), name
        assert float((difference > 1e-6 * expected.abs()).float().mean()) < 1e-4, name
    assert not any(key.endswith(("k_scale", "v_scale")) for key in tensors)  # KV stays unquantized
    hf_quant = json.loads((fp8_export / "hf_quant_config.json").read_text())["quantization"]
    assert hf_quant["quant_algo"] == "FP8"
    assert (
        json.loads((fp8_export / "config.json").read_text())["quantization_config"]["quant_method"]
        == "modelopt"
    )


def test_int4_awq_export_format(int4_torch: Quantized, int4_export: Path) -> None:
    tensors = load_file(str(int4_export / "model.safetensors"))
    reference = fake_quantized_weights(int4_torch)
    group = 8
    for name, expected in reference.items():
        out_features, in_features = expected.shape
        packed, scale = tensors[f"{name}.weight"], tensors[f"{name}.weight_scale"]
        assert packed.dtype == torch.uint8
        assert tuple(packed.shape) == (out_features // 2, in_features)  # pairs of OUTPUT rows
        assert scale.dtype == torch.float32
        assert tuple(scale.shape) == (out_features, in_features // group)
        kept = name.endswith(("o_proj", "down_proj"))
        assert (f"{name}.pre_quant_scale" in tensors) == kept
        if kept:  # not re-quantized by the export: must equal ModelOpt's weights exactly
            values = unpack_int4_rows(packed).float()
            dequantized = values * scale.repeat_interleave(group, dim=1)
            torch.testing.assert_close(dequantized, expected, rtol=1e-6, atol=0)
            # The other readings of the same bytes do not match.
            offset = ((packed & 0xF).float() - 8).repeat_interleave(2, dim=0)
            assert not torch.allclose(offset * scale.repeat_interleave(group, dim=1), expected)
    hf_quant = json.loads((int4_export / "hf_quant_config.json").read_text())["quantization"]
    assert hf_quant["quant_algo"] == "W4A16_AWQ" and hf_quant["group_size"] == group


def engine_logits(checkpoint: Path, tokens: list[int]) -> torch.Tensor:
    from neuron_agent.torch_engine.loader import EngineOptions, build_engine

    return build_engine(EngineOptions(checkpoint, kv_cache_tokens=256)).prompt_logits(tokens)


@pytest.fixture(scope="module")
def prompt_and_reference(tiny_model: Path) -> tuple[list[int], torch.Tensor]:
    from transformers import AutoTokenizer

    tokens = AutoTokenizer.from_pretrained(str(tiny_model))(PROMPT)["input_ids"][:64]
    return tokens, engine_logits(tiny_model, tokens)


def assert_close_to_reference(logits: torch.Tensor, reference: torch.Tensor) -> None:
    cosine = torch.nn.functional.cosine_similarity(logits, reference, dim=-1)
    top1 = (logits.argmax(-1) == reference.argmax(-1)).float().mean().item()
    assert cosine.min().item() >= MIN_COSINE, f"cosine {cosine.min().item():.5f}"
    assert top1 >= MIN_TOP1, f"top-1 agreement {top1:.3f}"


def test_torch_engine_serves_the_fp8_export(
    fp8_export: Path, prompt_and_reference: tuple[list[int], torch.Tensor]
) -> None:
    tokens, reference = prompt_and_reference
    assert_close_to_reference(engine_logits(fp8_export, tokens), reference)


def test_torch_engine_serves_the_int4_awq_export(
    int4_export: Path, prompt_and_reference: tuple[list[int], torch.Tensor]
) -> None:
    tokens, reference = prompt_and_reference
    assert_close_to_reference(engine_logits(int4_export, tokens), reference)


def test_triton_serves_the_fp8_and_int4_awq_exports(
    fp8_export: Path, int4_export: Path, tmp_path: Path
) -> None:
    """Both exports through a real neuron agent and tritonserver: greedy tokens over Triton's
    gRPC stream equal the same engine's greedy tokens in-process."""
    import asyncio

    import httpx

    from control_plane.node_client import GenerationParams, TritonStream
    from cortex.config import ModelProfile
    from cortex.launch import loopback_neuron, running_neuron
    from neuron_agent.torch_engine.loader import EngineOptions, build_engine
    from tests.torch_engine.test_engine import Collector

    models = [
        ModelProfile(name=name, source=str(path), kv_cache_tokens=512)
        for name, path in (("tiny-fp8", fp8_export), ("tiny-int4-awq", int4_export))
    ]
    prompt = list(range(30, 70))
    with running_neuron(loopback_neuron(tmp_path / "node", "exports", models)) as neuron:
        grpc_url = httpx.get(neuron.url + "/status").json()["triton"]["grpc_url"]
        for name, path in (("tiny-fp8", fp8_export), ("tiny-int4-awq", int4_export)):
            response = httpx.post(neuron.url + "/models/load", json={"model": name}, timeout=120)
            assert response.status_code == 200, response.text
            assert response.json()["quantization"] == "none"  # served as stored, not re-quantized

            async def generate(model: str = name) -> list[int]:
                stream = TritonStream(grpc_url)
                tokens: list[int] = []
                params = GenerationParams(max_tokens=16, end_ids=(-1,), pad_id=0)
                async for piece in stream.generate(model, prompt, params, "export-test"):
                    tokens.extend(piece)
                await stream.close()
                return tokens

            served = asyncio.run(generate())
            engine = build_engine(EngineOptions(path, kv_cache_tokens=512))
            engine.start()
            local = Collector()
            from neuron_agent.torch_engine.scheduler import GenerationRequest

            engine.submit(GenerationRequest(prompt, 16, local.emit, local.fail))
            assert local.done.wait(60)
            engine.stop()
            assert len(served) == 16
            assert served == local.tokens
