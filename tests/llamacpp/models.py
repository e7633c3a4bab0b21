"""Small GGUF files for the llama.cpp engine's tests, made by llama.cpp's own converter.

`convert_hf_to_gguf.py` (with its `conversion` package and the `gguf-py` it imports) ships in
llama-cpp-python's source distribution, under vendor/llama.cpp. `converter()` downloads that
sdist with pip (the version installed here; once per machine, into the model cache) and keeps
those three parts. Checkpoints are written by transformers from a config (random weights) and
converted in the test session.

The tiny `qwen3moe` model has random weights, and one planted answer: with embeddings much
larger than what its layers add, its residual stream is its current token's embedding, and the
output head's rows for a chain of tokens point at their predecessors' embeddings, so that after
"assistant\n" it writes a Hermes tool call token by token (every token of the call differs, so
the current token alone says the next). Every layer (attention, router, experts) still runs on
every token; prompts off the chain get whatever the random weights give.
"""

from __future__ import annotations

import itertools
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from cortex.demo.cache import build_once, models_root

SDIST_PREFIX = "vendor/llama.cpp/"
CONVERTER_PARTS = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")
TOOL_CALL = '<tool_call>{"name":"get_weather","arguments":{}}</tool_call>'


def llama_cpp_version() -> str:
    from importlib.metadata import version

    return version("llama-cpp-python")


def converter() -> Path:
    """convert_hf_to_gguf.py of the installed llama-cpp-python's llama.cpp."""
    version = llama_cpp_version()

    def make(staging: Path) -> None:
        with tempfile.TemporaryDirectory(prefix="cortex-sdist-") as download:
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "pip",
                    "download",
                    "--no-binary",
                    ":all:",
                    "--no-deps",
                    "--disable-pip-version-check",
                    "--dest",
                    download,
                    f"llama-cpp-python=={version}",
                ],
                check=True,
                capture_output=True,
            )
            (archive,) = Path(download).glob("*.tar.gz")
            with tarfile.open(archive) as tar:
                for member in tar.getmembers():
                    _, _, inner = member.name.partition("/")
                    if not inner.startswith(SDIST_PREFIX):
                        continue
                    relative = inner[len(SDIST_PREFIX) :]
                    if member.isfile() and relative.startswith(CONVERTER_PARTS):
                        member.name = relative
                        tar.extract(member, staging, filter="data")

    folder = build_once(
        models_root() / f"llama-cpp-converter-{version}", "convert_hf_to_gguf.py", make
    )
    return folder / "convert_hf_to_gguf.py"


def convert(checkpoint: Path, output: Path, outtype: str = "f32") -> Path:
    """llama.cpp's converter on a Hugging Face folder; CalledProcessError carries its log."""
    subprocess.run(
        [
            sys.executable,
            str(converter()),
            str(checkpoint),
            "--outfile",
            str(output),
            "--outtype",
            outtype,
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    return output


def write_tiny_moe(folder: Path, tokenizer_source: Path, chat_template: str) -> Path:
    """A random Qwen3-MoE checkpoint (2 layers, 8 experts, 2 per token) with SmolLM2's tokenizer
    plus <tool_call> / </tool_call>, and the planted tool call (see the module docstring)."""
    import torch
    from transformers import AutoTokenizer, Qwen3MoeConfig, Qwen3MoeForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source)
    # Not special: the gateway skips special tokens when it detokenizes, and its parser must
    # see these (as Qwen's own tokenizer has them).
    tokenizer.add_tokens(["<tool_call>", "</tool_call>"], special_tokens=False)
    tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(folder)
    # transformers' typed Qwen3MoeConfig lacks `head_dim` (taken through **kwargs), and a
    # single token's id is an int.
    config = Qwen3MoeConfig(  # type: ignore[call-arg]
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.convert_tokens_to_ids("<|im_start|>"),  # type: ignore[arg-type]
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
    )
    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM(config).eval()
    chain = [tokenizer.encode("\n")[-1], *tokenizer.encode(TOOL_CALL), config.eos_token_id]
    assert len(set(chain)) == len(chain), "the planted call needs distinct tokens"
    with torch.no_grad():
        embeddings = model.model.embed_tokens.weight
        embeddings.copy_(torch.randn_like(embeddings))
        head = model.lm_head.weight
        for previous, following in itertools.pairwise(chain):
            direction = embeddings[previous] / embeddings[previous].norm()
            head[following] = 2.0 * direction
    model.save_pretrained(folder)
    (folder / "planted.json").write_text(json.dumps({"chain": chain}))
    return folder


def tiny_moe_gguf(folder: Path, tokenizer_source: Path, chat_template: str) -> Path:
    checkpoint = write_tiny_moe(folder / "tiny-moe-hf", tokenizer_source, chat_template)
    output = convert(checkpoint, folder / "tiny-qwen3moe.gguf")
    shutil.rmtree(checkpoint / "__pycache__", ignore_errors=True)
    return output


# llama.cpp's converter names a BPE/WordPiece tokenizer's pre-tokenizer by hashing how it splits a
# fixed text, and refuses hashes it has not seen: those of published tokenizers. A synthetic
# vocabulary has none, so for it (the tiny BERT's) the converter runs with that lookup answering
# "default" (what llama.cpp's WordPiece tokenizer uses for BERT files anyway); nothing else in
# the conversion changes.
_UNKNOWN_TOKENIZER_RUN = """
import runpy, sys
script = sys.argv[1]
sys.path.insert(0, str(__import__("pathlib").Path(script).parent))
sys.argv = sys.argv[1:]
import conversion.base
conversion.base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "default"
runpy.run_path(script, run_name="__main__")
"""
BERT_TEXT = (
    "the a an of to and in is it that was for on are with as be at by this have from or one had "
    "not but what all were when we there can your which their said if do will each about how up "
    "out them then she many some so these would other into has more her two like him see time "
    "could no make than first been its who now people my made over did down only way find use may "
    "water long little very after words called just where most know cat dog sea sky blue sun"
)


def write_tiny_bert(folder: Path) -> Path:
    """A random BERT (2 layers, hidden 64) with a small WordPiece vocabulary and mean pooling
    declared the sentence-transformers way (modules.json + 1_Pooling/config.json)."""
    import torch

    # Exported lazily by transformers 5, missing from its typed __init__.
    from transformers import BertConfig, BertModel, BertTokenizerFast  # type: ignore[attr-defined]

    folder.mkdir(parents=True, exist_ok=True)
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    pieces = [f"##{c}" for c in letters]
    punctuation = list(".,!?'-")
    vocabulary = specials + punctuation + letters + pieces + BERT_TEXT.split()
    tokenizer = BertTokenizerFast(
        vocab={token: index for index, token in enumerate(vocabulary)}, do_lower_case=True
    )
    tokenizer.save_pretrained(folder)
    config = BertConfig(
        vocab_size=len(vocabulary),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=512,
    )
    torch.manual_seed(0)
    BertModel(config, add_pooling_layer=False).eval().save_pretrained(folder)
    (folder / "modules.json").write_text(
        json.dumps(
            [
                {
                    "idx": 0,
                    "name": "0",
                    "path": "",
                    "type": "sentence_transformers.models.Transformer",
                },
                {
                    "idx": 1,
                    "name": "1",
                    "path": "1_Pooling",
                    "type": "sentence_transformers.models.Pooling",
                },
            ]
        )
    )
    (folder / "1_Pooling").mkdir(exist_ok=True)
    (folder / "1_Pooling" / "config.json").write_text(
        json.dumps({"word_embedding_dimension": 64, "pooling_mode_mean_tokens": True})
    )
    return folder


def tiny_bert_gguf(folder: Path) -> Path:
    checkpoint = write_tiny_bert(folder / "tiny-bert-hf")
    output = folder / "tiny-bert.gguf"
    subprocess.run(
        [
            sys.executable,
            "-c",
            _UNKNOWN_TOKENIZER_RUN,
            str(converter()),
            str(checkpoint),
            "--outfile",
            str(output),
            "--outtype",
            "f32",
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    return output
