"""Which TensorRT-LLM / Triton the engines target, and which tools are installed here.

The target comes from `containers/versions.toml` (keys `tensorrt_llm`, `triton_release`,
`triton_image`), the one file that pins the serving image; engines only deserialize under the
exact TensorRT-LLM that built them. Without that file (an installed wheel, no checkout) the
constants below are used and `TargetVersions.source` says so.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import tomllib
from dataclasses import dataclass
from pathlib import Path

VERSIONS_TOML = Path(__file__).resolve().parent.parent / "containers" / "versions.toml"
FALLBACK_TENSORRT_LLM = "1.2.1"
FALLBACK_TRITON_RELEASE = "26.07"
FALLBACK_TRITON_IMAGE = "nvcr.io/nvidia/tritonserver:26.07-trtllm-python-py3"
# Points at a trtllm-build executable when it is not on PATH (e.g. another venv in the image).
TRTLLM_BUILD_ENV = "CORTEX_TRTLLM_BUILD"


@dataclass(frozen=True)
class TargetVersions:
    tensorrt_llm: str
    triton_release: str
    triton_image: str
    source: str  # the versions.toml read, or "built-in fallback (…)"


def target_versions(path: Path = VERSIONS_TOML) -> TargetVersions:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
        return TargetVersions(
            tensorrt_llm=str(data["tensorrt_llm"]),
            triton_release=str(data["triton_release"]),
            triton_image=str(data["triton_image"]),
            source=str(path),
        )
    except (OSError, KeyError, tomllib.TOMLDecodeError):
        return TargetVersions(
            tensorrt_llm=FALLBACK_TENSORRT_LLM,
            triton_release=FALLBACK_TRITON_RELEASE,
            triton_image=FALLBACK_TRITON_IMAGE,
            source=f"built-in fallback ({path} not found or incomplete)",
        )


def package_version(*names: str) -> str | None:
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def installed_versions() -> dict[str, str | None]:
    """Versions of the tools a build uses, from package metadata (nothing is imported)."""
    return {
        "modelopt": package_version("nvidia-modelopt"),
        "torch": package_version("torch"),
        "transformers": package_version("transformers"),
        "tensorrt_llm": package_version("tensorrt-llm", "tensorrt_llm"),
        "cortex": package_version("cortex"),
    }


def find_trtllm_build() -> Path | None:
    configured = os.environ.get(TRTLLM_BUILD_ENV)
    if configured:
        return Path(configured)
    found = shutil.which("trtllm-build")
    return Path(found) if found else None
