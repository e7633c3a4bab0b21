"""The per-machine model cache (`$CORTEX_CACHE_DIR`, else `~/.cache/cortex`): the demo models
are made into it once, atomically, however many processes ask at the same time."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path


def models_root() -> Path:
    root = os.environ.get("CORTEX_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "cortex"
    )
    return Path(root) / "models"


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive lock file: one process makes a cached folder, the others wait for it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def build_once(final: Path, marker: str, make: Callable[[Path], object]) -> Path:
    """`final`, made by `make(staging)` unless `final/marker` exists; never half-written."""
    if (final / marker).exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with locked(final.parent / f".{final.name}.lock"):
        if (final / marker).exists():
            return final
        staging = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
        try:
            make(staging)
            staging.chmod(0o755)
            shutil.rmtree(final, ignore_errors=True)
            staging.rename(final)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return final
