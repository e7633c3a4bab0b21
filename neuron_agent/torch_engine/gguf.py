"""GGUF files (llama.cpp's format, what Ollama and llama-swap hold) as a torch-engine source.

llama.cpp's own Python reader (the `gguf` package) parses the file and dequantizes its tensors;
this module maps what it finds onto what the engine already reads from a Hugging Face folder:
the metadata (`llama.block_count`, …) becomes a `ModelSpec`, and the tensors become float32
tensors under Hugging Face names (`blk.0.attn_q.weight` → `model.layers.0.self_attn.q_proj.weight`)
in Hugging Face layouts. The profile's in-situ quantization then applies as for safetensors: the
GGUF's own quantization is undone at load, not served as stored.

llama.cpp's converter permutes the rows of Llama's q and k projections (its rope rotates
interleaved pairs; Hugging Face's rotates halves), so those rows are permuted back. Qwen2 and
Qwen3 files use llama.cpp's half-rotating (NeoX) rope and are stored unpermuted.

Like `checkpoint.py`, reading the spec imports no torch (the neuron agent estimates memory with
it); tokenizer files are made from the metadata on the neuron's side (`cortex/tokenizer_files.py`),
never here, since this module runs inside Triton's stub.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import gguf
    import numpy.typing as npt
    import torch

    from neuron_agent.torch_engine.checkpoint import ModelSpec

from neuron_agent.torch_engine.errors import UnsupportedCheckpoint

# general.architecture → (the engine's architecture name, whether q/k rows are permuted).
ARCHITECTURES: dict[str, tuple[str, bool]] = {
    "llama": ("LlamaForCausalLM", True),  # Mistral files say "llama" too
    "qwen2": ("Qwen2ForCausalLM", False),
    "qwen3": ("Qwen3ForCausalLM", False),
}
# What the engine dequantizes (through gguf.quants): float types and the common llama.cpp
# block quantizations (Q4_K_M and Q5_K_M files mix the K types with Q6_K and Q8_0).
TENSOR_TYPES = (
    "F32",
    "F16",
    "BF16",
    "Q8_0",
    "Q4_0",
    "Q4_1",
    "Q5_0",
    "Q5_1",
    "Q2_K",
    "Q3_K",
    "Q4_K",
    "Q5_K",
    "Q6_K",
)
# llama.cpp name (after `blk.N.`) → Hugging Face name (after `model.layers.N.`).
LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
MODEL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# Tensors llama.cpp stores that the engine computes itself (rotary tables).
IGNORED_TENSORS = ("rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight")


def is_gguf(path: Path) -> bool:
    return path.suffix.lower() == ".gguf"


# One parsed file: `read_spec` and then `read_tensors` of the same file parse it once. Parsing
# walks every metadata array in Python (a 49k-token vocabulary takes seconds), and the reader
# only maps the file, so keeping the last one costs little.
_cache_lock = threading.Lock()
_cached: tuple[tuple[str, int, int], gguf.GGUFReader] | None = None


def open_reader(path: Path) -> gguf.GGUFReader:
    """The parsed file (memory-mapped), or one clear line saying why it cannot be read."""
    global _cached
    try:
        stat = path.stat()
    except OSError as error:
        raise UnsupportedCheckpoint(f"GGUF file {path} cannot be read: {error.strerror}") from None
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    with _cache_lock:
        if _cached is not None and _cached[0] == key:
            return _cached[1]
        import gguf

        try:
            reader = gguf.GGUFReader(path)
        except (ValueError, OSError) as error:
            raise UnsupportedCheckpoint(f"{path} is not a readable GGUF file: {error}") from None
        _cached = (key, reader)
        return reader


def forget(path: Path) -> None:
    """Drop the cached parse (after the weights are loaded: they were the reason to keep it)."""
    global _cached
    with _cache_lock:
        if _cached is not None and _cached[0][0] == str(path.resolve()):
            _cached = None


def metadata(reader: gguf.GGUFReader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _architecture(reader: gguf.GGUFReader, path: Path) -> tuple[str, str, bool]:
    arch = str(metadata(reader, "general.architecture", "(none)"))
    if arch not in ARCHITECTURES:
        raise UnsupportedCheckpoint(
            f"{path.name}: GGUF architecture {arch!r} is not supported by the torch engine "
            f"(supported: {', '.join(sorted(ARCHITECTURES))})"
        )
    name, permuted = ARCHITECTURES[arch]
    return arch, name, permuted


def read_gguf_spec(path: Path) -> ModelSpec:
    """The `ModelSpec` from the GGUF's metadata (and the shapes of its tensors)."""
    from neuron_agent.torch_engine.checkpoint import ARCHITECTURES as SWITCHES
    from neuron_agent.torch_engine.checkpoint import ModelSpec, RopeSpec

    reader = open_reader(path)
    arch, architecture, _permuted = _architecture(reader, path)
    tensors = {t.name: t for t in reader.tensors}

    def need(key: str) -> Any:
        value = metadata(reader, f"{arch}.{key}")
        if value is None:
            raise UnsupportedCheckpoint(f"{path.name}: GGUF metadata lacks {arch}.{key}")
        return value

    if "token_embd.weight" not in tensors:
        raise UnsupportedCheckpoint(f"{path.name}: the GGUF lacks tensor token_embd.weight")
    hidden = int(need("embedding_length"))
    heads = int(need("attention.head_count"))
    kv_heads = metadata(reader, f"{arch}.attention.head_count_kv", heads)
    if isinstance(kv_heads, list):
        if len(set(kv_heads)) != 1:
            raise UnsupportedCheckpoint(f"{path.name}: KV heads differ between layers")
        kv_heads = kv_heads[0]
    head_dim = int(metadata(reader, f"{arch}.attention.key_length", hidden // heads))
    rotary = int(metadata(reader, f"{arch}.rope.dimension_count", head_dim))
    if rotary != head_dim:
        raise UnsupportedCheckpoint(
            f"{path.name}: partial rotary embeddings ({rotary} of {head_dim} dimensions) "
            "are not supported by the torch engine"
        )
    rope = RopeSpec(theta=float(metadata(reader, f"{arch}.rope.freq_base", 10000.0)))
    scaling = str(metadata(reader, f"{arch}.rope.scaling.type", "none"))
    if scaling == "linear":
        factor = float(metadata(reader, f"{arch}.rope.scaling.factor", 1.0))
        rope = RopeSpec(theta=rope.theta, kind="linear", factor=factor)
    elif scaling != "none":
        raise UnsupportedCheckpoint(
            f"{path.name}: GGUF rope scaling {scaling!r} is not supported (supported: linear)"
        )
    if "rope_freqs.weight" in tensors:
        # Llama 3.1's frequency factors as a tensor: the engine's llama3 rope would need its
        # parameters, which the file does not carry.
        raise UnsupportedCheckpoint(
            f"{path.name}: GGUF rope frequency factors (rope_freqs.weight, Llama 3.1 style) "
            "are not supported by the torch engine"
        )
    eos = [metadata(reader, "tokenizer.ggml.eos_token_id")]
    eos.append(metadata(reader, "tokenizer.ggml.eot_token_id"))
    eos_ids = tuple(dict.fromkeys(int(i) for i in eos if i is not None))
    return ModelSpec(
        vocab_size=int(tensors["token_embd.weight"].shape[1]),
        hidden_size=hidden,
        intermediate_size=int(need("feed_forward_length")),
        num_layers=int(need("block_count")),
        num_heads=heads,
        num_kv_heads=int(kv_heads),
        head_dim=head_dim,
        architecture=architecture,
        rms_norm_eps=float(metadata(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        context_length=int(metadata(reader, f"{arch}.context_length", 4096)),
        rope=rope,
        qkv_bias="blk.0.attn_q.bias" in tensors or SWITCHES[architecture]["qkv_bias"],
        qk_norm=SWITCHES[architecture]["qk_norm"],
        tie_word_embeddings="output.weight" not in tensors,
        torch_dtype=_dtype_of(reader),
        eos_token_ids=eos_ids,
        extra={"format": "gguf", "gguf_architecture": arch},
    )


def _dtype_of(reader: gguf.GGUFReader) -> str:
    """What a GPU computes in: float32 files → float32 (→ bfloat16 by the loader's rule), float16
    files → float16, everything else → bfloat16 (block-quantized values fit it safely)."""
    types = {t.tensor_type.name for t in reader.tensors if len(t.shape) == 2}
    if types <= {"F32"}:
        return "float32"
    if types <= {"F32", "F16"}:
        return "float16"
    return "bfloat16"


def hf_name(name: str) -> str | None:
    """The Hugging Face name of a llama.cpp tensor, or None for one the engine does not use."""
    if name in MODEL_TENSORS:
        return MODEL_TENSORS[name]
    if name in IGNORED_TENSORS:
        return None
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in LAYER_TENSORS:
        return f"model.layers.{parts[1]}.{LAYER_TENSORS[parts[2]]}.{parts[3]}"
    raise UnsupportedCheckpoint(f"GGUF tensor {name} is not one the torch engine knows")


def unpermute(weight: npt.NDArray[Any], heads: int) -> npt.NDArray[Any]:
    """Undo llama.cpp's q/k row permutation: within each head, rows (0, 2, 4, …, 1, 3, 5, …)
    back to Hugging Face's first-half / second-half order."""
    half = weight.shape[0] // heads // 2
    return weight.reshape(heads, half, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def read_gguf_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor the engine uses, dequantized to float32, under Hugging Face names."""
    import numpy as np
    import torch
    from gguf import quants

    spec = read_gguf_spec(path)
    reader = open_reader(path)
    _arch, _name, permuted = _architecture(reader, path)
    tensors: dict[str, torch.Tensor] = {}
    for tensor in reader.tensors:
        name = hf_name(tensor.name)
        if name is None:
            continue
        kind = tensor.tensor_type.name
        if kind not in TENSOR_TYPES:
            raise UnsupportedCheckpoint(
                f"{path.name}: tensor {tensor.name} is stored as {kind}, which the torch engine "
                f"does not read (supported: {', '.join(TENSOR_TYPES)})"
            )
        values = quants.dequantize(tensor.data, tensor.tensor_type)
        # ggml lists dimensions innermost first: [in, out] is PyTorch's [out, in].
        values = values.reshape(tuple(int(d) for d in reversed(tensor.shape.tolist())))
        if permuted and name.endswith(("q_proj.weight", "q_proj.bias")):
            values = unpermute(values, spec.num_heads)
        elif permuted and name.endswith(("k_proj.weight", "k_proj.bias")):
            values = unpermute(values, spec.num_kv_heads)
        tensors[name] = torch.from_numpy(np.array(values, dtype=np.float32, copy=True))
    forget(path)
    return tensors
