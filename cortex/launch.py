"""Config files written from the config models, and cortex processes run as children.

One place for what the embedded default, the tests, the benchmarks and the GPU scripts all do:

- write `cortex.toml`, `neuron.toml` (with its `models.toml`) from `cortex.config`'s models,
  serialized with tomli-w, so that a file written here loads back equal to what was written;
- start `cortex neuron` or `cortex serve`, wait until its `/health` answers (if it exits first,
  or never answers, a `LaunchError` that says so with the last lines of its log), and stop it:
  SIGTERM, SIGKILL after a grace period, and nothing it started left running.

    with running_neuron(loopback_neuron(folder, "node", models)) as neuron:
        with running_gateway(folder / "cortex.toml", loopback_gateway({"node": neuron.url})):
            ...

Shell scripts write their files with `python -m cortex.launch neuron-config|gateway-config`
(`--help` explains).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import httpx
import psutil
import tomli_w
from pydantic import BaseModel

from cortex.config import (
    ConfigError,
    CortexConfig,
    EvictionSection,
    GatewaySection,
    ModelProfile,
    ModelsFile,
    NeuronConfig,
    NeuronRef,
    NeuronSection,
    ScalingSection,
    TritonSection,
    validate_settings,
)

# ---------------------------------------------------------------------------------------------
# Writing config files


def toml_text(config: BaseModel, exclude: set[str] | None = None, header: str = "") -> str:
    """`config` as TOML: only what differs from the defaults, so the file reads like one written
    by hand; `header` becomes comment lines on top."""
    data = config.model_dump(mode="json", exclude_defaults=True, exclude_none=True, exclude=exclude)
    comments = "".join(f"# {line}\n" for line in header.splitlines())
    return comments + tomli_w.dumps(data)


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def write_gateway_config(path: Path, config: CortexConfig, header: str = "") -> Path:
    """`cortex.toml` at `path`."""
    return _write(path, toml_text(config, header=header))


def write_models_file(path: Path, models: ModelsFile, header: str = "") -> Path:
    """`models.toml` at `path`."""
    return _write(path, toml_text(models, header=header))


def models_path(neuron_toml: Path, config: NeuronConfig) -> Path:
    """Where `[neuron] models` points, read as `load_neuron_config` reads it."""
    path = Path(config.neuron.models).expanduser()
    return path if path.is_absolute() else neuron_toml.parent / path


def write_neuron_config(path: Path, config: NeuronConfig, header: str = "") -> Path:
    """`neuron.toml` at `path`, and its models (`config.models`) where `[neuron] models` says."""
    write_models_file(models_path(path, config), config.models, header)
    return _write(path, toml_text(config, exclude={"models", "base_dir"}, header=header))


# ---------------------------------------------------------------------------------------------
# Configs for processes on loopback (tests, benchmarks)


def free_ports(count: int) -> list[int]:
    """`count` distinct loopback ports that nothing listens on now."""
    sockets, ports = [], []
    for _ in range(count):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sockets.append(sock)
        ports.append(sock.getsockname()[1])
    for sock in sockets:
        sock.close()
    return ports


def consecutive_free_ports(count: int) -> int:
    """A base port with `count` free ports from it on (Triton takes base, base+1, base+2)."""
    for _ in range(100):
        base = free_ports(1)[0]
        if base + count >= 65535:
            continue
        try:
            with contextlib.ExitStack() as stack:
                for offset in range(count):
                    sock = stack.enter_context(socket.socket())
                    sock.bind(("127.0.0.1", base + offset))
            return base
        except OSError:
            continue
    raise RuntimeError("no run of free ports")


def loopback_neuron(
    folder: Path,
    name: str,
    models: Sequence[ModelProfile],
    *,
    memory_budget_mib: Sequence[int] = (),
    token: str | None = None,
) -> NeuronConfig:
    """A neuron on free 127.0.0.1 ports whose files, state and log live in `folder`."""
    port = free_ports(1)[0]
    triton = consecutive_free_ports(3)
    return NeuronConfig(
        neuron=NeuronSection(
            name=name,
            listen=f"127.0.0.1:{port}",
            token=token,
            state_dir=str(folder / "state"),
            memory_budget_mib=tuple(memory_budget_mib),
        ),
        triton=TritonSection(
            address="127.0.0.1", http_port=triton, grpc_port=triton + 1, metrics_port=triton + 2
        ),
        models=ModelsFile(models=tuple(models)),
        base_dir=str(folder),
    )


def loopback_gateway(
    neurons: Mapping[str, str],
    *,
    eviction: EvictionSection | None = None,
    scaling: ScalingSection | None = None,
    **gateway: Any,
) -> CortexConfig:
    """A gateway on free 127.0.0.1 ports (API and metrics) in front of `neurons` (name → URL);
    `gateway` sets other `[gateway]` keys."""
    listen, metrics = free_ports(2)
    return CortexConfig(
        gateway=GatewaySection(
            **{"listen": f"127.0.0.1:{listen}", "metrics_listen": f"127.0.0.1:{metrics}"} | gateway
        ),
        eviction=eviction or EvictionSection(),
        scaling=scaling or ScalingSection(),
        neurons=tuple(NeuronRef(name=name, endpoint=url) for name, url in neurons.items()),
    )


# ---------------------------------------------------------------------------------------------
# Running processes


class LaunchError(RuntimeError):
    """A process did not come up (or did not go down cleanly). `summary` is one line; the
    message adds the last lines of the process's log."""

    def __init__(self, summary: str, log: Path | None = None) -> None:
        self.summary = summary
        self.log = log
        tail = log_tail(log) if log is not None else ""
        super().__init__(f"{summary} (log: {log})\n{tail}" if log is not None else summary)


def log_tail(log: Path, lines: int = 40) -> str:
    try:
        text = log.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def _die_with_parent() -> None:
    ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    os.setpgid(0, 0)  # our Ctrl-C is not theirs: they are stopped in order


def start(
    args: Sequence[str],
    log: Path,
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    append: bool = False,
    die_with_parent: bool = False,
) -> subprocess.Popen[bytes]:
    """`python -m cortex.cli ARGS` with stdout and stderr into `log`. `die_with_parent`: killed
    when this process dies, and in a process group of its own (Ctrl-C does not reach it)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab" if append else "wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "cortex.cli", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            preexec_fn=_die_with_parent if die_with_parent else None,
        )


def wait_for(
    url: str,
    timeout: float,
    process: subprocess.Popen[bytes] | None = None,
    log: Path | None = None,
    what: str = "the process",
) -> httpx.Response:
    """Poll `url` until it answers 200 and return that answer. `LaunchError` when `process`
    exits first or the time is up (with `log`'s last lines)."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while True:
        if process is not None and process.poll() is not None:
            raise LaunchError(f"{what} exited with code {process.returncode}", log)
        try:
            response = httpx.get(url, timeout=2)
            if response.status_code == 200:
                return response
            last = None
        except httpx.HTTPError as error:
            last = error
        if time.monotonic() > deadline:
            reason = f" ({last})" if last is not None else ""
            raise LaunchError(f"{what} did not answer {url} in {timeout:.0f} s{reason}", log)
        time.sleep(0.2)


def _alive(processes: list[psutil.Process]) -> list[psutil.Process]:
    alive = []
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                alive.append(process)
    return alive


def descendants(pid: int) -> list[psutil.Process]:
    try:
        children: list[psutil.Process] = psutil.Process(pid).children(recursive=True)
        return children
    except psutil.NoSuchProcess:
        return []


def stop(
    process: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 60.0
) -> None:
    """Stop `process` with `sig`, SIGKILL after `timeout` seconds, and then whatever it started
    that is still running `timeout` seconds later. A process that exits on `sig` but leaves
    children running raises `LaunchError` (after they are killed): that is a bug to see."""
    children = descendants(process.pid)
    forced = False
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            forced = True
            process.kill()
            process.wait()
    # What it started gets time to go with it (a killed one's children are not waited for).
    deadline = time.monotonic() + (1.0 if forced else timeout)
    while _alive(children) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = []
    for child in _alive(children):
        with contextlib.suppress(psutil.NoSuchProcess):
            left.append(f"{child.name()} ({child.pid})")
            child.kill()
    if left and not forced:
        raise LaunchError(f"pid {process.pid} stopped but left running: {', '.join(left)} (killed)")


@dataclass
class Launched:
    """A cortex process started here, whose `/health` answers at `url`."""

    process: subprocess.Popen[bytes]
    url: str
    log: Path
    what: str = field(default="the process", kw_only=True)

    def wait_healthy(self, timeout: float) -> httpx.Response:
        return wait_for(f"{self.url}/health", timeout, self.process, self.log, self.what)

    def healthy(self, timeout: float) -> Self:
        """This, once healthy; stopped (and the error raised) if it does not become so."""
        try:
            self.wait_healthy(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> None:
        stop(self.process, sig, timeout)

    def descendants(self) -> list[psutil.Process]:
        return descendants(self.process.pid)


@dataclass
class Neuron(Launched):
    config: NeuronConfig = field(kw_only=True)

    @property
    def folder(self) -> Path:
        return Path(self.config.base_dir)

    @property
    def triton_http(self) -> str:
        return f"http://127.0.0.1:{self.config.triton.http_port}"

    @property
    def triton_grpc(self) -> str:
        return f"127.0.0.1:{self.config.triton.grpc_port}"

    def triton_processes(self) -> list[psutil.Process]:
        """tritonserver and its Python-backend stubs."""
        return [p for p in self.descendants() if "triton" in p.name()]


@dataclass
class Gateway(Launched):
    config: CortexConfig = field(kw_only=True)

    @property
    def port(self) -> int:
        return int(self.config.gateway.listen.rpartition(":")[2])

    @property
    def metrics_url(self) -> str:
        return f"http://{self.config.gateway.metrics_listen}/metrics"

    @property
    def api_key(self) -> str:
        return self.config.gateway.api_keys[0] if self.config.gateway.api_keys else ""


def _http(listen: str) -> str:
    host, _, port = listen.rpartition(":")
    return f"http://{'127.0.0.1' if host in ('0.0.0.0', '::', '[::]') else host}:{port}"


def start_neuron(
    config: NeuronConfig,
    *,
    header: str = "",
    append: bool = False,
    die_with_parent: bool = False,
) -> Neuron:
    """Write `config` into its folder (`base_dir`: neuron.toml, models.toml) and start the agent
    (log: neuron.log there); not waited for."""
    folder = Path(config.base_dir)
    path = write_neuron_config(folder / "neuron.toml", config, header)
    log = folder / "neuron.log"
    process = start(
        ["neuron", "--config", str(path)], log, append=append, die_with_parent=die_with_parent
    )
    return Neuron(process, _http(config.neuron.listen), log, what="the neuron agent", config=config)


def start_gateway(
    path: Path,
    config: CortexConfig,
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> Gateway:
    """Write `config` to `path` and start `cortex serve --config` on it (log beside it, `.log`);
    not waited for."""
    write_gateway_config(path, config)
    log = path.with_suffix(".log")
    process = start(["serve", "--config", str(path)], log, env=env, cwd=cwd)
    return Gateway(process, _http(config.gateway.listen), log, what="the gateway", config=config)


@contextlib.contextmanager
def running_neuron(config: NeuronConfig, timeout: float = 120.0) -> Iterator[Neuron]:
    """A neuron agent from `config` (see `start_neuron`), yielded once healthy, stopped after."""
    neuron = start_neuron(config).healthy(timeout)
    try:
        yield neuron
    finally:
        neuron.stop()


@contextlib.contextmanager
def running_gateway(
    path: Path,
    config: CortexConfig,
    *,
    timeout: float = 60.0,
    neurons_up: bool = False,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> Iterator[Gateway]:
    """A gateway from `config` (see `start_gateway`), yielded once healthy (with `neurons_up`,
    once it also sees every neuron up), stopped after."""
    gateway = start_gateway(path, config, env=env, cwd=cwd).healthy(timeout)
    try:
        deadline = time.monotonic() + timeout
        while neurons_up and gateway.wait_healthy(timeout).json()["neurons_up"] < len(
            config.neurons
        ):
            if time.monotonic() > deadline:
                raise LaunchError("the gateway never saw its neurons up", gateway.log)
            time.sleep(0.2)
        yield gateway
    finally:
        gateway.stop()


# ---------------------------------------------------------------------------------------------
# Command line, for shell scripts


def _settings(pairs: Sequence[str], what: str) -> dict[str, Any]:
    """KEY=VALUE pairs (KEY may be dotted: section.key) as nested data; a value that is a JSON
    list (`["a", "b"]`) is one, anything else a string that pydantic converts as the field says."""
    data: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"{what}: expected KEY=VALUE, got {pair!r}")
        parsed: Any = value
        if value.startswith("["):
            try:
                parsed = json.loads(value)
            except json.JSONDecodeError:
                raise ConfigError(f"{what}: {key}: not a JSON list: {value}") from None
        *tables, last = key.split(".")
        node = data
        for table in tables:
            node = node.setdefault(table, {})
        node[last] = parsed
    return data


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m cortex.launch",
        description="Write cortex config files from cortex.config's schema (for shell scripts).",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    neuron = _subcommand(
        commands,
        "neuron-config",
        ("folder", "FOLDER/neuron.toml and the models.toml it names"),
        ("[neuron] or [triton]", "neuron.listen=127.0.0.1:13131"),
        "/tmp/node --set neuron.name=gpu0 "
        "--model 'name=llama source=/ckpt dtype=bfloat16 kv_cache_tokens=65536'",
    )
    neuron.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="'KEY=VALUE ...'",
        help=(
            "one [[models]] entry: KEY=VALUE pairs split as a shell splits words, so quote a "
            "value with spaces or a list: aliases='[\"gpt-*\"]' (repeatable)"
        ),
    )
    gateway = _subcommand(
        commands,
        "gateway-config",
        ("path", "a cortex.toml at PATH"),
        ("[gateway], [eviction] or [scaling]", "eviction.strategy=demand"),
        "/tmp/cortex.toml --set gateway.listen=127.0.0.1:31313 --neuron gpu0=http://10.0.0.5:13131",
    )
    gateway.add_argument(
        "--neuron",
        action="append",
        default=[],
        metavar="NAME=URL",
        help="one [[neurons]] entry (repeatable)",
    )
    args = parser.parse_args(argv)
    try:
        _write_from(args)
    except ConfigError as error:
        raise SystemExit(f"error: {error}") from None


def _subcommand(
    commands: Any, name: str, target: tuple[str, str], settings: tuple[str, str], example: str
) -> argparse.ArgumentParser:
    """A command that writes `target` ((argument, what)), with `--set` for `settings` ((the
    sections, an example))."""
    argument, what = target
    parser: argparse.ArgumentParser = commands.add_parser(
        name, help=f"write {what}", description=f"Write {what}. Example: {name} {example}"
    )
    parser.add_argument(argument, type=Path, help="where to write (folders are made)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help=f"a {settings[0]} setting, e.g. {settings[1]} (repeatable)",
    )
    return parser


def _write_from(args: argparse.Namespace) -> None:
    if args.command == "neuron-config":
        models = [_settings(shlex.split(entry), "--model") for entry in args.model]
        data = _settings(args.set, "--set") | {"models": {"models": models}}
        node = validate_settings(NeuronConfig, data, "neuron-config")
        path = write_neuron_config(args.folder / "neuron.toml", node)
        print(f"wrote {path} and {models_path(path, node)}")
    else:
        data = _settings(args.set, "--set")
        data["neurons"] = [
            dict(zip(("name", "endpoint"), entry.split("=", 1), strict=False))
            for entry in args.neuron
        ]
        gateway = validate_settings(CortexConfig, data, "gateway-config")
        print(f"wrote {write_gateway_config(args.path, gateway)}")


if __name__ == "__main__":
    main()
