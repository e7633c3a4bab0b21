"""Make `cortex-tiny`, deterministically and offline.

A byte-level BPE tokenizer is trained with `tokenizers` on text every Python install carries
(the pydoc topics and standard-library sources), and a small Llama-architecture model
(4 layers, hidden 256, 8 heads / 4 KV heads, context 32,768) is trained for a fixed number of
steps on ChatML-wrapped snippets of the same text. Training briefly matters: random weights give
near-tied logits (so greedy output flips under float rounding between batch shapes) and never
emit the end token; after 300 steps the model ends its answers by itself and reads like
documentation English. Training is bounded by step count with fixed seeds and one thread, so the
model is the same on every machine.
"""

from __future__ import annotations

import os
import random
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from cortex.demo.cache import build_once, models_root
from cortex.tokenizer_files import make_portable

MODEL_NAME = "cortex-tiny"
# Bump when anything below changes what is generated: the cache key.
RECIPE_VERSION = 2
VOCAB_SIZE = 4096
CONTEXT_LENGTH = 32768
TRAIN_STEPS = 300
TRAIN_BATCH = 8
TRAIN_SEQUENCE = 128
TRAIN_THREADS = 2
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Single tokens that stay visible when special tokens are skipped: tool-call parsers need them.
TOOL_TOKENS = ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"]

Progress = Callable[[str, float], None]


def default_cache_dir() -> Path:
    return models_root() / f"{MODEL_NAME}-v{RECIPE_VERSION}"


def chat_template() -> str:
    return (Path(__file__).parent / "chat_template.jinja").read_text(encoding="utf-8")


def _corpus() -> list[str]:
    """Documents from the standard library: the same on every CPython 3.11+."""
    import pydoc_data.topics

    documents = [text for _, text in sorted(pydoc_data.topics.topics.items())]
    stdlib = Path(os.__file__).parent
    for name in sorted(["json/__init__.py", "argparse.py", "pathlib.py", "textwrap.py"]):
        path = stdlib / name
        if path.exists():
            documents.append(path.read_text(encoding="utf-8", errors="replace"))
    return documents


def _paragraphs(documents: list[str]) -> list[str]:
    paragraphs: list[str] = []
    for document in documents:
        for block in document.split("\n\n"):
            block = " ".join(block.split())
            if 40 <= len(block) <= 600:
                paragraphs.append(block)
    return paragraphs


def train_tokenizer(documents: list[str]) -> object:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE - len(TOOL_TOKENS),
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(documents, trainer=trainer)
    tokenizer.add_tokens(
        [AddedToken(token, special=False, normalized=False) for token in TOOL_TOKENS]
    )
    return tokenizer


def _training_texts(paragraphs: list[str], rng: random.Random) -> Iterator[str]:
    """ChatML conversations: a paragraph's opening as the question, the rest as the answer."""
    while True:
        paragraph = rng.choice(paragraphs)
        words = paragraph.split()
        cut = max(3, len(words) // 4)
        question, answer = " ".join(words[:cut]), " ".join(words[cut:])
        yield (
            f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n{answer}<|im_end|>\n"
        )


def generate(target: Path, progress: Progress | None = None) -> Path:
    """Write the Hugging Face-format checkpoint of `cortex-tiny` into `target` (a new folder)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    report = progress or (lambda _stage, _fraction: None)
    report("tokenizer", 0.0)
    documents = _corpus()
    raw_tokenizer = train_tokenizer(documents)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw_tokenizer,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
    )
    tokenizer.chat_template = chat_template()
    tokenizer.model_max_length = CONTEXT_LENGTH

    pad_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    eos_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    settings: dict[str, Any] = dict(
        vocab_size=len(tokenizer),
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=CONTEXT_LENGTH,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        torch_dtype="float32",
    )
    config = LlamaConfig(**settings)
    threads = torch.get_num_threads()
    torch.set_num_threads(TRAIN_THREADS)
    try:
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, TRAIN_STEPS)
        rng = random.Random(0)
        texts = _training_texts(_paragraphs(documents), rng)
        model.train()
        for step in range(TRAIN_STEPS):
            batch = [next(texts) for _ in range(TRAIN_BATCH)]
            encoded = tokenizer(
                batch,
                max_length=TRAIN_SEQUENCE,
                truncation=True,
                padding="max_length",
                return_tensors="pt",
            )
            labels = encoded["input_ids"].clone()
            labels[encoded["attention_mask"] == 0] = -100
            loss = model(**encoded, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            report("train", (step + 1) / TRAIN_STEPS)
    finally:
        torch.set_num_threads(threads)
    model.eval()
    model.generation_config.eos_token_id = eos_id
    model.generation_config.pad_token_id = pad_id
    model.generation_config.bos_token_id = None

    # Training padded and truncated every batch to 128 tokens; the saved tokenizer must not.
    tokenizer.backend_tokenizer.no_padding()
    tokenizer.backend_tokenizer.no_truncation()
    target.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(target, safe_serialization=True)
    tokenizer.save_pretrained(target)
    make_portable(target)
    for path in target.iterdir():
        path.chmod(0o644)
    report("done", 1.0)
    return target


def ensure_tiny_model(cache_dir: Path | None = None, progress: Progress | None = None) -> Path:
    """The cached checkpoint, generated on first use (atomically: never a half-written folder)."""
    return build_once(
        cache_dir or default_cache_dir(),
        "model.safetensors",
        lambda staging: generate(staging, progress),
    )


def write_demo_model(target: Path, progress: Progress | None = None) -> Path:
    """Copy the (cached) checkpoint to a folder of the user's choice."""
    if target.exists() and any(target.iterdir()):
        raise FileExistsError(f"{target} exists and is not empty")
    source = ensure_tiny_model(progress=progress)
    shutil.copytree(source, target, dirs_exist_ok=True)
    return target
