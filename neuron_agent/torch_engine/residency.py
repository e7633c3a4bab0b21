"""Sleep and wake: a loaded model gives its memory back without leaving Triton, and takes it
again in about the time of a copy.

Triton has no such API, so the neuron talks to the model's Python stub over a side channel:
each torch-engine stub serves a Unix socket (`control_socket`, derived from the model's stats
file so both sides find it without configuration) in a folder only the neuron's user can
enter. One JSON line in, one JSON line out:

    {"op": "sleep"} → {"ok": true, "asleep": true, "released_bytes": …, "host_bytes": …, "seconds": …}
    {"op": "wake"}  → {"ok": true, "asleep": false, "restored_bytes": …, "seconds": …}
    {"op": "state"} → {"ok": true, "asleep": …}
    any failure     → {"ok": false, "error": "…"}

Sleeping refuses while a request is queued or running, then stops admitting requests, drops
the KV cache (its prefix-cache contents with it) and, on a GPU, moves the weights to pinned host
memory, so the process, its CUDA context and its compiled kernels stay; waking copies the
weights back, allocates the cache again and re-captures the decode CUDA graphs (their captured
addresses died with the old buffers). On CPU, sleeping releases the KV cache and keeps the
weights where they are. A request that reaches a sleeping model is refused with a sentence
(the gateway routes only to READY models; the neuron wakes one first).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import torch

from neuron_agent.torch_engine.errors import RequestRejected
from neuron_agent.torch_engine.scheduler import Engine

log = logging.getLogger("cortex.engine")


def control_socket(stats_path: Path) -> Path:
    """The socket a model's stub serves, from its stats file. Unix socket paths must stay
    under 108 bytes, which a state folder inside a test's temporary tree does not: the socket
    lives in a short per-user folder (mode 0700) under the temporary directory instead."""
    digest = hashlib.blake2b(str(stats_path.resolve()).encode(), digest_size=8).hexdigest()
    return Path(tempfile.gettempdir()) / f"cortex-{os.getuid()}" / f"{digest}.sock"


def _private_folder(path: Path) -> None:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    status = path.stat()
    if status.st_uid != os.getuid() or status.st_mode & 0o077:
        raise PermissionError(f"{path} must belong to this user alone (mode 0700)")


def _weights_bytes(engine: Engine) -> int:
    return sum(t.numel() * t.element_size() for t in engine.model.state_dict().values())


def sleep(engine: Engine) -> dict[str, Any]:
    """Release the engine's memory; RequestRejected while requests are in flight."""
    if engine.model.device.type == "cuda" and hasattr(engine.model, "ranks"):
        raise RequestRejected("a tensor-parallel model cannot sleep yet: unload it instead")
    started = time.perf_counter()
    engine.hold()
    try:
        released = engine.pool.release_memory()
        host = 0
        if engine.model.device.type == "cuda":
            cast(Any, engine.model)._apply(  # torch's Module._apply is unannotated
                lambda tensor: tensor.to("cpu").pin_memory()
            )
            host = _weights_bytes(engine)
            engine.decoder.release()
            torch.cuda.empty_cache()
    except BaseException:
        engine.resume()
        raise
    return {
        "asleep": True,
        "released_bytes": released,
        "host_bytes": host,
        "seconds": time.perf_counter() - started,
    }


def wake(engine: Engine) -> dict[str, Any]:
    """Take the memory back and serve again; a no-op for an engine that is awake."""
    if not engine.asleep:
        return {"asleep": False, "restored_bytes": 0, "seconds": 0.0}
    started = time.perf_counter()
    device = engine.device
    if device.type == "cuda":
        cast(Any, engine.model)._apply(  # torch's Module._apply is unannotated
            lambda tensor: tensor.to(device, non_blocking=True)
        )
    restored = engine.pool.restore_memory()
    engine.rebuild_decoder()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    engine.resume()
    return {"asleep": False, "restored_bytes": restored, "seconds": time.perf_counter() - started}


class ControlServer:
    """The stub's side of the channel: a thread answering one request per connection."""

    def __init__(self, path: Path, engine: Engine) -> None:
        self.path = path
        self._operations: dict[str, Callable[[], dict[str, Any]]] = {
            "sleep": lambda: sleep(engine),
            "wake": lambda: wake(engine),
            "state": lambda: {"asleep": engine.asleep},
        }
        _private_folder(path.parent)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # a dead stub's socket
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._socket.bind(str(path))
        os.chmod(path, 0o600)
        self._socket.listen(4)
        self._lock = threading.Lock()  # one sleep or wake at a time
        self._thread = threading.Thread(target=self._serve, name="cortex-control", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                connection, _ = self._socket.accept()
            except OSError:
                return  # closed
            with connection:
                try:
                    line = connection.makefile("rb").readline()
                    reply = self._answer(line)
                    connection.sendall(json.dumps(reply).encode() + b"\n")
                except OSError:
                    log.debug("control connection lost", exc_info=True)

    def _answer(self, line: bytes) -> dict[str, Any]:
        try:
            operation = self._operations[json.loads(line)["op"]]
        except (ValueError, KeyError, TypeError):
            return {"ok": False, "error": f"expected one of {sorted(self._operations)}"}
        try:
            with self._lock:
                return {"ok": True, **operation()}
        except RequestRejected as error:
            return {"ok": False, "error": str(error)}
        except Exception as error:  # the stub keeps serving whatever a control call does
            log.exception("control operation failed")
            return {"ok": False, "error": f"{error.__class__.__name__}: {error}"}

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._socket.shutdown(socket.SHUT_RDWR)
        self._socket.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
