"""A real fleet for benchmarks, from config files, on loopback: a neuron agent (with its own
tritonserver) and gateways (`cortex serve --config`) in front of it, each its own process, as in
production, started by `cortex.launch`. Everything started here stops when its `with` block
ends, whatever happened in it.

    with bench_neuron(folder, models) as neuron, bench_gateway(folder, neuron) as gateway:
        ...

A gateway may run another revision's code (`source_tree(ref)`), so a benchmark can measure the
code before and after a change side by side, in one run, against the same neuron.
"""

from __future__ import annotations

import contextlib
import io
import os
import platform
import shutil
import subprocess
import tarfile
import time
from collections.abc import Iterator, Sequence
from importlib import metadata
from pathlib import Path

import psutil

from cortex.config import EvictionSection, ModelProfile, NeuronRef
from cortex.launch import (
    Gateway,
    Neuron,
    loopback_gateway,
    loopback_neuron,
    running_gateway,
    running_neuron,
)

REPOSITORY = Path(__file__).resolve().parents[1]
FAKES = REPOSITORY / "tests" / "fakes"
API_KEY = "sk-bench-cortex"
NODE = "bench-node"


@contextlib.contextmanager
def bench_neuron(
    folder: Path, models: Sequence[ModelProfile], token: str | None = None
) -> Iterator[Neuron]:
    """A neuron agent serving `models`, its files and log in `folder`; with `token`, its API
    and its Triton (the key derived from it) need it, as on a real node."""
    with running_neuron(loopback_neuron(folder, NODE, models, token=token)) as neuron:
        yield neuron


@contextlib.contextmanager
def bench_gateway(
    folder: Path,
    neuron: Neuron,
    name: str = "gateway",
    source: Path | None = None,
    poll_interval_s: float = 2.0,
    ping_interval_s: float = 5.0,
    eviction: EvictionSection | None = None,
) -> Iterator[Gateway]:
    """A gateway in front of `neuron` (config and log: `folder/NAME.toml`, `.log`), from
    `source` (a `source_tree`) or this checkout, with `eviction` as its `[eviction]`; it is
    yielded once it sees the neuron up."""
    env = dict(os.environ)
    if source is not None:  # another revision's packages come first on the path
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(source), env.get("PYTHONPATH")]))
    config = loopback_gateway(
        {NODE: neuron.url},
        api_keys=(API_KEY,),
        poll_interval_s=poll_interval_s,
        ping_interval_s=ping_interval_s,
        eviction=eviction,
    )
    token = neuron.config.neuron.bearer_token()
    ref = NeuronRef(name=NODE, endpoint=neuron.url, token=token)
    config = config.model_copy(update={"neurons": (ref,)})
    with running_gateway(
        folder / f"{name}.toml", config, neurons_up=True, env=env, cwd=source or REPOSITORY
    ) as gateway:
        yield gateway


def source_tree(ref: str, folder: Path) -> Path:
    """The gateway's packages (control_plane, cortex) as they were at git `ref`, in `folder`."""
    archive = subprocess.run(
        ["git", "archive", "--format=tar", ref, "control_plane", "cortex"],
        cwd=REPOSITORY,
        check=True,
        capture_output=True,
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(folder, filter="data")
    return folder


def revision(ref: str = "HEAD") -> str:
    if shutil.which("git") is None:
        return ""
    return subprocess.run(
        ["git", "rev-parse", "--short", ref], cwd=REPOSITORY, capture_output=True, text=True
    ).stdout.strip()


def machine() -> dict[str, str]:
    """What the numbers were measured on: CPU model, cores, versions."""
    model = platform.processor() or "unknown"
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        for line in subprocess.check_output(["lscpu"], text=True).splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    versions = {}
    for name in ("sanic", "grpcio", "tritonclient", "nvidia-pytriton", "tokenizers", "uvloop"):
        with contextlib.suppress(metadata.PackageNotFoundError):  # a GPU image: no pytriton
            versions[name] = metadata.version(name)
    return {
        "cpu": model,
        "cores": str(psutil.cpu_count(logical=True)),
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "revision": revision(),
        **versions,
    }


def cpu_seconds(process: psutil.Process) -> float:
    with contextlib.suppress(psutil.NoSuchProcess):
        times = process.cpu_times()
        return float(times.user + times.system)
    return 0.0


def own_cpu_seconds() -> float:
    """CPU seconds of this benchmark's own processes: this one and everything it started."""
    me = psutil.Process()
    return cpu_seconds(me) + sum(cpu_seconds(p) for p in me.children(recursive=True))


class Neighbours:
    """How many cores processes other than this benchmark's kept busy since it was made."""

    def __init__(self) -> None:
        self._own = own_cpu_seconds()
        self._machine = psutil.cpu_times()
        self._started = time.monotonic()

    def cores(self) -> float:
        after = psutil.cpu_times()
        busy = (sum(after) - sum(self._machine)) - (after.idle - self._machine.idle)
        elapsed = max(time.monotonic() - self._started, 1e-3)
        cores: float = max(0.0, busy - (own_cpu_seconds() - self._own)) / elapsed
        return cores


def background_cores(seconds: float = 1.0) -> float:
    """How many cores other processes keep busy right now."""
    watch = Neighbours()
    time.sleep(seconds)
    return watch.cores()


def wait_for_quiet(limit: float, timeout: float) -> float:
    """Wait (up to `timeout` seconds) until other processes keep fewer than `limit` cores busy."""
    deadline = time.monotonic() + timeout
    while True:
        cores = background_cores()
        if cores <= limit or time.monotonic() > deadline:
            return cores
