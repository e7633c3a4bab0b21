"""GGUF files as a torch-engine source: small random models written with llama.cpp's own writer
(the `gguf` package) in every tensor type the engine reads, served by the engine and compared
with transformers loading the same file (float32); files the engine cannot serve fail in one
line that names what is unsupported."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf
import numpy as np
import numpy.typing as npt
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from transformers import AutoModelForCausalLM, LlamaConfig

from neuron_agent.torch_engine.checkpoint import read_spec
from neuron_agent.torch_engine.errors import UnsupportedCheckpoint
from neuron_agent.torch_engine.gguf import TENSOR_TYPES
from neuron_agent.torch_engine.loader import EngineOptions, build_engine

# K-quant blocks span 256 values: every input width is a multiple of it.
SHAPE: dict[str, Any] = dict(
    vocab_size=256,
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    rope_theta=10000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)
# Where each K-quant block keeps its float16 scales (d, and dmin where it has one): the gguf
# package cannot quantize to these types, so the tests write random blocks with sane scales.
K_SCALES = {
    Q.Q2_K: (84, [80, 82]),
    Q.Q3_K: (110, [108]),
    Q.Q4_K: (144, [0, 2]),
    Q.Q5_K: (176, [0, 2]),
    Q.Q6_K: (210, [208]),
}


def llama_cpp_permute(weight: npt.NDArray[Any], heads: int) -> npt.NDArray[Any]:
    """What llama.cpp's converter does to Llama's q and k rows (its `LlamaModel.permute`)."""
    return (
        weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def encode(values: npt.NDArray[Any], kind: Q, rng: np.random.Generator) -> npt.NDArray[Any]:
    if kind in K_SCALES:
        size, offsets = K_SCALES[kind]
        rows = values.shape[0]
        blocks = rng.integers(0, 256, (rows, values.shape[1] // 256, size), dtype=np.uint8)
        for offset in offsets:
            blocks[:, :, offset : offset + 2] = (
                np.array([0.002], np.float16).view(np.uint8).reshape(1, 1, 2)
            )
        return blocks.reshape(rows, -1)
    return gguf.quants.quantize(values, kind)


def write_gguf(path: Path, kinds: Q | list[Q], architecture: str = "llama", shift: int = 0) -> Path:
    """A random Llama as llama.cpp would convert it. Its 2-D weights are stored as `kinds`, in
    turn from the `shift`-th on (llama.cpp's Q4_K_M files mix types the same way)."""
    kinds = kinds if isinstance(kinds, list) else [kinds]
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**SHAPE), dtype=torch.float32)
    state = {name: tensor.numpy() for name, tensor in model.state_dict().items()}
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_block_count(SHAPE["num_hidden_layers"])
    writer.add_context_length(SHAPE["max_position_embeddings"])
    writer.add_embedding_length(SHAPE["hidden_size"])
    writer.add_feed_forward_length(SHAPE["intermediate_size"])
    writer.add_head_count(SHAPE["num_attention_heads"])
    writer.add_head_count_kv(SHAPE["num_key_value_heads"])
    writer.add_layer_norm_rms_eps(SHAPE["rms_norm_eps"])
    writer.add_rope_freq_base(SHAPE["rope_theta"])
    writer.add_rope_dimension_count(SHAPE["hidden_size"] // SHAPE["num_attention_heads"])
    writer.add_vocab_size(SHAPE["vocab_size"])
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([f"<{i}>" for i in range(SHAPE["vocab_size"])])
    writer.add_eos_token_id(1)
    names = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    layer_names = {
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    weights = 0
    for name, values in state.items():
        if name in names:
            target = names[name]
        else:
            _model, _layers, index, *rest = name.split(".")
            target = f"blk.{index}.{layer_names['.'.join(rest[:-1])]}.{rest[-1]}"
        if values.ndim == 1:  # norms: non-trivial, and stored as float32 as llama.cpp does
            writer.add_tensor(target, values + rng.normal(0, 0.1, values.shape).astype(np.float32))
            continue
        if target.endswith("attn_q.weight"):
            values = llama_cpp_permute(values, SHAPE["num_attention_heads"])
        elif target.endswith("attn_k.weight"):
            values = llama_cpp_permute(values, SHAPE["num_key_value_heads"])
        stored = kinds[(weights + shift) % len(kinds)]
        weights += 1
        data = encode(np.ascontiguousarray(values), stored, rng)
        writer.add_tensor(target, data, raw_dtype=stored)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


PROMPT = torch.randint(0, 256, (24,), generator=torch.Generator().manual_seed(1)).tolist()


# Three files: each type lands on permuted (q, k) and plain tensors, embeddings and the head.
@pytest.mark.parametrize("shift", [0, 5, 9])
def test_engine_logits_equal_transformers_on_the_same_gguf(shift: int, tmp_path: Path) -> None:
    path = write_gguf(tmp_path / f"mixed-{shift}.gguf", [Q[k] for k in TENSOR_TYPES], shift=shift)
    reference = AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file=path.name, dtype=torch.float32
    ).eval()
    with torch.no_grad():
        expected = reference(torch.tensor([PROMPT])).logits[0]
    engine = build_engine(EngineOptions(path, kv_cache_tokens=64))
    got = engine.prompt_logits(PROMPT)
    # Random K-quant blocks make large weights: the tolerance scales with the logits.
    scale = float(expected.abs().max())
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5 * scale)


def test_spec_comes_from_the_metadata(tmp_path: Path) -> None:
    spec = read_spec(write_gguf(tmp_path / "tiny.gguf", Q.F16))
    assert (spec.architecture, spec.num_layers, spec.hidden_size) == ("LlamaForCausalLM", 2, 256)
    assert (spec.num_heads, spec.num_kv_heads, spec.head_dim) == (4, 2, 64)
    assert (spec.vocab_size, spec.intermediate_size, spec.context_length) == (256, 512, 1024)
    assert spec.rope.theta == 10000.0 and spec.rms_norm_eps == pytest.approx(1e-5)
    assert spec.eos_token_ids == (1,) and not spec.tie_word_embeddings
    assert spec.torch_dtype == "float16"


def test_unsupported_architecture_is_one_line(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "falcon.gguf", Q.F16, architecture="falcon")
    with pytest.raises(UnsupportedCheckpoint) as caught:
        read_spec(path)
    message = str(caught.value)
    assert "'falcon'" in message and "llama" in message and "\n" not in message


def test_unsupported_tensor_type_is_one_line(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "tiny.gguf", Q.F16)
    # Rewrite one tensor as IQ4_NL (32 values in 18 bytes), a type the engine does not read.
    reader = gguf.GGUFReader(path)
    writer = gguf.GGUFWriter(str(tmp_path / "iq4.gguf"), "llama")
    for key, field in reader.fields.items():
        if key.startswith(("llama.", "tokenizer.")):
            value = field.contents()
            kind = field.types[0]
            sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(key, value, kind, sub_type=sub)
    for tensor in reader.tensors:
        if tensor.name == "blk.0.ffn_up.weight":
            blocks = np.zeros((512, 256 // 32 * 18), np.uint8)
            writer.add_tensor(tensor.name, blocks, raw_dtype=Q.IQ4_NL)
        else:
            shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
            values = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(shape)
            stored = np.ascontiguousarray(
                values.astype(np.float16 if values.ndim == 2 else np.float32)
            )
            writer.add_tensor(tensor.name, stored)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UnsupportedCheckpoint) as caught:
        build_engine(EngineOptions(tmp_path / "iq4.gguf", kv_cache_tokens=64))
    message = str(caught.value)
    assert "blk.0.ffn_up.weight" in message and "IQ4_NL" in message and "\n" not in message
