"""Calibration text → token windows for ModelOpt, from local files only (never a download).

The set shipped here (`*.txt` next to this file, about 15 kB: prose, code in several languages,
assistant dialogues, configuration and logs, numbers and tables, short paragraphs in fifteen
languages) was written for this project and is under the project's licence. It is enough for
FP8 amax calibration and AWQ's scale search on a small model; for production, pass
`--calib-dataset DIR` with text from the model's real traffic.

A dataset folder holds `.txt` / `.md` files (one document each), `.jsonl` files (one JSON object
per line with a "text" field) or `.json` files (a list of strings or of such objects).
Documents are tokenized, joined with the end-of-sequence token, and `count` windows of `length`
tokens are taken at evenly spaced offsets; when the text is shorter than `count × length`
the windows overlap.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from build_engines.errors import InvalidRequest

SHIPPED_DIR = Path(__file__).parent
TEXT_SUFFIXES = (".txt", ".md")
SUFFIXES = (*TEXT_SUFFIXES, ".jsonl", ".json")


def dataset_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in SUFFIXES)


def dataset_fingerprint(folder: Path) -> str:
    """sha256 over the dataset's file names and contents (a calibration input)."""
    digest = hashlib.sha256()
    for path in dataset_files(folder):
        digest.update(f"{path.relative_to(folder)}\0".encode())
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def _texts_from_json(value: Any, path: Path) -> Iterator[str]:
    items = value if isinstance(value, list) else [value]
    for item in items:
        if isinstance(item, str):
            yield item
        elif isinstance(item, dict) and isinstance(item.get("text"), str):
            yield item["text"]
        else:
            raise InvalidRequest(f'{path}: expected strings or objects with a "text" field')


def read_documents(folder: Path) -> list[str]:
    if not folder.is_dir():
        raise InvalidRequest(f"calibration dataset folder {folder} does not exist")
    documents: list[str] = []
    for path in dataset_files(folder):
        try:
            content = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise InvalidRequest(f"calibration file {path} cannot be read: {error}") from None
        if path.suffix in TEXT_SUFFIXES:
            documents.append(content)
            continue
        try:
            if path.suffix == ".jsonl":
                for line in content.splitlines():
                    if line.strip():
                        documents.extend(_texts_from_json(json.loads(line), path))
            else:
                documents.extend(_texts_from_json(json.loads(content), path))
        except json.JSONDecodeError as error:
            raise InvalidRequest(f"calibration file {path} is not valid JSON: {error}") from None
    documents = [d for d in documents if d.strip()]
    if not documents:
        raise InvalidRequest(
            f"calibration dataset folder {folder} has no text "
            f"(expected {', '.join(SUFFIXES)} files)"
        )
    return documents


def token_windows(tokens: list[int], count: int, length: int) -> list[list[int]]:
    """`count` windows of `length` tokens at evenly spaced offsets (overlapping if need be)."""
    if count < 1:
        return []
    length = min(length, len(tokens))
    last_start = len(tokens) - length
    starts = [round(i * last_start / (count - 1)) if count > 1 else 0 for i in range(count)]
    return [tokens[start : start + length] for start in starts]


def calibration_windows(
    folder: Path,
    encode: Callable[[str], list[int]],
    separator: int | None,
    count: int,
    length: int,
) -> list[list[int]]:
    """Token windows for calibration; `encode` is the checkpoint's tokenizer (no special tokens)."""
    tokens: list[int] = []
    for document in read_documents(folder):
        if tokens and separator is not None:
            tokens.append(separator)
        tokens.extend(encode(document))
    if len(tokens) < 2:
        raise InvalidRequest(f"calibration dataset folder {folder} tokenizes to almost nothing")
    return token_windows(tokens, count, length)
