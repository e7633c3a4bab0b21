"""Supervising `tritonserver`: start it in explicit model-control mode, wait until live, restart it
with backoff when it dies (reloading what was loaded), stop it on shutdown.

Who may reach it. Triton's model-repository API accepts model files in the request, which is
code execution for whoever reaches it, and its inference API would spend the GPUs without the
gateway's keys. So:
- HTTP (:8000) and metrics (:8002) bind 127.0.0.1 whatever `[triton] address` says: the neuron is
  their one user (it re-exports the metrics on its own authenticated `/metrics`).
- Every protocol but health, on HTTP and on gRPC (:8001, the port gateways reach over the
  network at `address`), answers only requests that carry the node's key in the header or
  gRPC metadata `cortex-triton-key` (`cortex.secrets`). The key is derived from the neuron's
  token, which gateways hold; a neuron without a token must keep both on loopback
  (`cortex.config`), and its Triton's gRPC port is then left open to loopback clients.
- With `tls_cert` / `tls_key` the gRPC port speaks TLS only.

The child never outlives the agent: it gets PR_SET_PDEATHSIG (SIGKILL when the agent dies, even
by `kill -9`) and its own session, so a terminal's Ctrl-C reaches the agent, which stops Triton
in order, instead of killing Triton behind the agent's back.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import shutil
import signal
import sys
import sysconfig
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
from prometheus_client.parser import text_string_to_metric_families

from cortex.config import TritonSection
from cortex.neuron_api import TritonState
from cortex.secrets import TRITON_KEY_HEADER, TRITON_RESTRICTED
from neuron_agent.errors import TritonError

log = logging.getLogger("cortex.neuron.triton")
PR_SET_PDEATHSIG = 1
# The TensorRT-LLM backend's request gauges on Triton's metrics port, by model and
# request_type: `active` (in its batch), `waiting` (queued for admission), `scheduled`, `max`, ….
TRTLLM_REQUEST_METRICS = "nv_trt_llm_request_metrics"


@dataclass(frozen=True)
class TritonLayout:
    binary: Path
    backends: Path
    library_path: list[str]


def locate_triton(configured: str, state_dir: Path) -> TritonLayout:
    """The NGC image's `tritonserver` on PATH, else the one `nvidia-pytriton` ships.

    For the wheel's binary, a backend folder is assembled under `state_dir`: its Python backend
    plus the stub built for this interpreter's minor version (the stub's embedded interpreter
    must match the virtual environment that holds the engine).
    """
    if configured:
        binary = Path(configured)
        if not binary.exists():
            raise TritonError(f"tritonserver binary {configured} does not exist")
        # A Triton tree (bin/ beside backends/), else the NGC image's layout.
        beside = binary.parent.parent / "backends"
        backends = beside if beside.is_dir() else Path("/opt/tritonserver/backends")
        return TritonLayout(binary, backends, [str(sysconfig.get_config_var("LIBDIR") or "")])
    on_path = shutil.which("tritonserver")
    if on_path and Path("/opt/tritonserver/backends").is_dir():
        return TritonLayout(Path(on_path), Path("/opt/tritonserver/backends"), [])
    try:
        import pytriton
    except ImportError:
        raise TritonError("no tritonserver on PATH and nvidia-pytriton is not installed") from None
    root = Path(pytriton.__file__).parent / "tritonserver"
    libs = root.parent.parent / "nvidia_pytriton.libs"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.exists():
        raise TritonError(f"nvidia-pytriton ships no Python-backend stub for Python {version}")
    backends = state_dir / "backends"
    python_backend = backends / "python"
    python_backend.mkdir(parents=True, exist_ok=True)
    for name in ("libtriton_python.so", "triton_python_backend_utils.py"):
        _link(root / "backends" / "python" / name, python_backend / name)
    _link(stub, python_backend / "triton_python_backend_stub")
    library_path = [str(libs), str(sysconfig.get_config_var("LIBDIR") or "")]
    return TritonLayout(root / "bin" / "tritonserver", backends, [p for p in library_path if p])


def _link(source: Path, target: Path) -> None:
    if target.is_symlink() and target.resolve() == source.resolve():
        return
    with contextlib.suppress(FileNotFoundError):
        target.unlink()
    target.symlink_to(source)


def _die_with_parent() -> None:
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    # Nothing of the agent's but stdin/out/err crosses the exec: its listening socket was seen
    # inherited (under uvloop's spawn), so Triton's Python stubs, which outlive an agent killed
    # with -9, kept the port and the restarted agent could not bind it. (Marked close-on-exec,
    # not closed: the spawner's own pipe must stay open until the exec.)
    for name in os.listdir("/proc/self/fd"):
        descriptor = int(name)
        if descriptor > 2:
            with contextlib.suppress(OSError):
                os.set_inheritable(descriptor, False)


def kill_orphaned_stubs(repository: Path) -> int:
    """Kill the Python-backend stubs of an earlier tritonserver of this repository. A stub
    outlives its Triton when the agent is killed with -9 (Triton dies with its parent; its
    stubs do not), holding its model's memory, and, with the GPU engine, the GPU's. A stub
    names its model's folder in the repository, and no Triton of ours is running when this is
    called (it is about to start one): any stub naming it is an orphan. Returns how many."""
    mark = f"{repository}{os.sep}"
    killed = 0
    for process in psutil.process_iter(["cmdline"]):
        command = process.info["cmdline"] or []
        if (
            command
            and command[0].endswith("triton_python_backend_stub")
            and any(argument.startswith(mark) for argument in command[1:])
        ):
            with contextlib.suppress(psutil.Error):
                process.kill()
                killed += 1
    return killed


class TritonSupervisor:
    """One `tritonserver` child and its HTTP control API."""

    def __init__(
        self,
        settings: TritonSection,
        repository: Path,
        state_dir: Path,
        shm_prefix: str,
        key: str,
        *,
        restrict_grpc: bool = True,
        on_restart: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """`key` guards every protocol but health (HTTP always; gRPC unless `restrict_grpc` is
        false, for a token-less neuron whose gRPC port stays on loopback)."""
        self.settings = settings
        self.key = key
        self.restrict_grpc = restrict_grpc
        self.repository = repository
        self.state_dir = state_dir
        self.shm_prefix = shm_prefix
        self.on_restart = on_restart
        self.http_url = f"http://127.0.0.1:{settings.http_port}"
        self.grpc_url = f"127.0.0.1:{settings.grpc_port}"
        self.metrics_url = f"http://127.0.0.1:{settings.metrics_port}/metrics"
        self.state = TritonState.STOPPED
        self.restarts = 0
        self.last_error: str | None = None
        self.process: asyncio.subprocess.Process | None = None
        self._stopping = False
        self._shut_down = False
        self._watch: asyncio.Task[None] | None = None
        self._client = httpx.AsyncClient(
            base_url=self.http_url, timeout=None, headers={TRITON_KEY_HEADER: key}
        )
        self.log_path = state_dir / "tritonserver.log"

    # ------------------------------------------------------------------ process

    def command(self, layout: TritonLayout) -> list[str]:
        restriction = f"{','.join(TRITON_RESTRICTED)}:{TRITON_KEY_HEADER}={self.key}"
        tls = self.settings.tls_cert is not None and self.settings.tls_key is not None
        return [
            str(layout.binary),
            f"--model-repository={self.repository}",
            "--model-control-mode=explicit",
            f"--backend-directory={layout.backends}",
            "--http-address=127.0.0.1",
            f"--grpc-address={self.settings.address}",
            "--metrics-address=127.0.0.1",
            f"--http-restricted-api={restriction}",
            *([f"--grpc-restricted-protocol={restriction}"] if self.restrict_grpc else []),
            *(
                [
                    "--grpc-use-ssl=true",
                    f"--grpc-server-cert={self.settings.tls_cert}",
                    f"--grpc-server-key={self.settings.tls_key}",
                ]
                if tls
                else []
            ),
            f"--http-port={self.settings.http_port}",
            f"--grpc-port={self.settings.grpc_port}",
            f"--metrics-port={self.settings.metrics_port}",
            "--allow-metrics=true",
            "--strict-readiness=false",
            "--exit-on-error=false",
            "--exit-timeout-secs=10",
            "--log-verbose=0",
            # Several Tritons may share one host's /dev/shm (tests run three).
            f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
            *self.settings.extra_args,
        ]

    def environment(self, layout: TritonLayout) -> dict[str, str]:
        env = dict(os.environ)
        # The Python stub builds its sys.path from the first python3 on PATH: make it ours.
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        # CUDA numbers GPUs fastest first unless told otherwise; the neuron places models by
        # NVML index (PCI bus order), and both engines take those indices (gpu_device_ids).
        env.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
        env["LD_LIBRARY_PATH"] = os.pathsep.join(
            [*layout.library_path, env.get("LD_LIBRARY_PATH", "")]
        ).strip(os.pathsep)
        return env

    async def start(self) -> None:
        self._stopping = False
        await self._spawn()
        self._watch = asyncio.create_task(self._watch_process())

    async def _spawn(self) -> None:
        layout = locate_triton(self.settings.binary, self.state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.repository.mkdir(parents=True, exist_ok=True)
        orphans = kill_orphaned_stubs(self.repository)
        if orphans:
            log.warning("killed %d Python-backend stubs a dead tritonserver left behind", orphans)
        self.state = TritonState.STARTING
        log_file = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        try:
            self.process = await asyncio.create_subprocess_exec(
                *self.command(layout),
                stdout=log_file,
                stderr=asyncio.subprocess.STDOUT,
                env=self.environment(layout),
                preexec_fn=_die_with_parent,
                start_new_session=True,
            )
        finally:
            log_file.close()
        await self._wait_live()
        self.state = TritonState.LIVE
        log.info("tritonserver pid %d live on %s", self.process.pid, self.http_url)

    async def _wait_live(self) -> None:
        deadline = time.monotonic() + self.settings.startup_timeout_s
        assert self.process is not None
        while time.monotonic() < deadline:
            if self.process.returncode is not None:
                raise TritonError(
                    f"tritonserver exited with code {self.process.returncode} while starting; "
                    f"see {self.log_path}: {self.log_tail()}"
                )
            with contextlib.suppress(httpx.HTTPError):
                response = await self._client.get("/v2/health/live", timeout=2)
                if response.status_code == 200:
                    return
            await asyncio.sleep(0.1)
        raise TritonError(
            f"tritonserver did not become live in {self.settings.startup_timeout_s} s"
        )

    def log_tail(self, lines: int = 3) -> str:
        try:
            text = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return " | ".join(text[-lines:])

    async def _watch_process(self) -> None:
        backoff = 1.0
        while not self._stopping:
            assert self.process is not None
            code = await self.process.wait()
            if self._stopping:
                return
            self.last_error = f"tritonserver exited with code {code}"
            log.error("%s; restarting in %.0f s", self.last_error, backoff)
            self.state = TritonState.RESTARTING
            await asyncio.sleep(backoff)
            try:
                await self._spawn()
                self.restarts += 1
                backoff = 1.0
                if self.on_restart is not None:
                    await self.on_restart()
            except Exception as error:
                self.last_error = str(error)
                log.error("restart failed: %s", error)
                backoff = min(backoff * 2, 30.0)
                await self._kill()

    async def restart(self) -> None:
        """Deliberate restart (memory not returned after an unload)."""
        if self._shut_down:
            raise TritonError("the neuron is shutting down")
        self._stopping = True
        if self._watch is not None:
            self._watch.cancel()
        await self._terminate()
        self.restarts += 1
        await self.start()

    async def stop(self) -> None:
        self._stopping = self._shut_down = True
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
        # Our own keep-alive connection would hold Triton's HTTP shutdown for its exit timeout.
        await self._client.aclose()
        await self._terminate()
        self.state = TritonState.STOPPED

    async def _terminate(self, grace: float = 15.0) -> None:
        process = self.process
        if process is None or process.returncode is not None:
            return
        process.terminate()
        try:
            await asyncio.wait_for(process.wait(), grace)
        except TimeoutError:
            await self._kill()

    async def _kill(self) -> None:
        process = self.process
        if process is not None and process.returncode is None:
            process.kill()
            await process.wait()

    # ------------------------------------------------------------------ control API

    async def load(self, model: str) -> None:
        try:
            response = await self._client.post(f"/v2/repository/models/{model}/load")
        except httpx.HTTPError as error:
            raise TritonError(f"Triton did not answer the load of {model}: {error}") from None
        if response.status_code != 200:
            raise TritonError(_error_text(response))

    async def unload(self, model: str) -> None:
        try:
            response = await self._client.post(f"/v2/repository/models/{model}/unload")
        except httpx.HTTPError as error:
            raise TritonError(f"Triton did not answer the unload of {model}: {error}") from None
        if response.status_code != 200:
            raise TritonError(_error_text(response))

    async def index(self) -> list[dict[str, str]]:
        response = await self._client.post("/v2/repository/index", json={}, timeout=10)
        response.raise_for_status()
        return list(response.json())

    async def is_ready(self, model: str) -> bool:
        with contextlib.suppress(httpx.HTTPError):
            response = await self._client.get(f"/v2/models/{model}/ready", timeout=5)
            return response.status_code == 200
        return False

    async def live(self) -> bool:
        with contextlib.suppress(httpx.HTTPError):
            response = await self._client.get("/v2/health/live", timeout=2)
            return response.status_code == 200
        return False

    async def model_stats(self, model: str) -> dict[str, object]:
        with contextlib.suppress(httpx.HTTPError, ValueError, KeyError, IndexError):
            response = await self._client.get(f"/v2/models/{model}/stats", timeout=5)
            if response.status_code == 200:
                return dict(response.json()["model_stats"][0])
        return {}

    async def metrics_text(self) -> str | None:
        """Triton's metrics as its loopback-only port serves them; None where it does not answer."""
        try:
            response = await self._client.get(self.metrics_url, timeout=5)
        except httpx.HTTPError:
            return None
        return response.text if response.status_code == 200 else None

    async def trtllm_requests(self) -> dict[str, dict[str, float]]:
        """TensorRT-LLM's request gauges, model → request_type → value, read from Triton's
        metrics port in one scrape; {} where Triton does not answer or no such model runs."""
        scraped = await self.metrics_text()
        if scraped is None:
            return {}
        try:
            families = list(text_string_to_metric_families(scraped))
        except ValueError:
            return {}
        gauges: dict[str, dict[str, float]] = {}
        for family in families:
            if family.name != TRTLLM_REQUEST_METRICS:
                continue
            for sample in family.samples:
                model, kind = sample.labels.get("model"), sample.labels.get("request_type")
                if model and kind:
                    counts = gauges.setdefault(model, {})
                    counts[kind] = counts.get(kind, 0.0) + sample.value  # summed over versions
        return gauges


def _error_text(response: httpx.Response) -> str:
    try:
        return str(response.json().get("error") or response.text)
    except ValueError:
        return response.text
