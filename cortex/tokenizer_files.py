"""Tokenizer files as the gateway loads them (`tokenizer.json` + `tokenizer_config.json` with the
chat template inline), written portably, and made from a GGUF file's metadata.

A GGUF carries its tokenizer (vocabulary, merges, special tokens) and chat template as metadata.
transformers turns that into a fast tokenizer (`from_pretrained(folder, gguf_file=…)`, offline);
this module saves the result as the files the neuron serves at `GET /models/{name}/tokenizer`.
It imports transformers, so it runs in the neuron agent or when a model is cached, never inside
Triton's stub.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path

from cortex.demo.cache import build_once


def make_portable(folder: Path) -> None:
    """transformers 5 names `TokenizersBackend`, which 4.x cannot load (the fast class loads in
    both), and keeps the chat template in its own file (older readers look in the config)."""
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    for key in ("is_local", "local_files_only", "gguf_file"):
        config.pop(key, None)
    if "chat_template" not in config and (folder / "chat_template.jinja").exists():
        config["chat_template"] = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")


def write_gguf_tokenizer(gguf_path: Path, target: Path, context_length: int | None = None) -> Path:
    """Write the GGUF's tokenizer and chat template into `target` (created)."""
    from transformers import AutoTokenizer

    # A folder holding the GGUF alone: transformers would otherwise mix in tokenizer files that
    # lie beside it (ours, from an earlier conversion, or anyone's).
    with tempfile.TemporaryDirectory(prefix="cortex-gguf-") as alone:
        (Path(alone) / gguf_path.name).symlink_to(gguf_path.resolve())
        tokenizer = AutoTokenizer.from_pretrained(
            alone, gguf_file=gguf_path.name, local_files_only=True
        )
    if context_length:
        tokenizer.model_max_length = context_length
    target.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(target)
    make_portable(target)
    for path in target.iterdir():
        path.chmod(0o644)
    return target


def cached_gguf_tokenizer(
    gguf_path: Path, cache_root: Path, context_length: int | None = None
) -> Path:
    """The tokenizer folder of a GGUF file, converted once into `cache_root` (keyed by the file's
    path, size and modification time) and never left half-written."""
    stat = gguf_path.stat()
    key = hashlib.sha256(
        f"{gguf_path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}:{context_length}".encode()
    ).hexdigest()[:16]
    final = cache_root / f"{gguf_path.stem}-{key}"
    return build_once(
        final,
        "tokenizer.json",
        lambda staging: write_gguf_tokenizer(gguf_path, staging, context_length),
    )
