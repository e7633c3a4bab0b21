"""What the neuron reports about its models comes from Triton, for every engine, and reporting
changes nothing: a TensorRT-LLM model's requests in flight (its backend's gauges on Triton's
metrics port) and last use (Triton's model statistics) make it busy for the unload refusal and
the gateway, and `GET /status`, called again and again, leaves the node's record and NVML alone.

The agent runs in this process (its real app on a loopback port, its real tritonserver), so the
test can look at the node's record itself. Two parts cannot run here and are FAKES: TensorRT-LLM
(the fixed-rate fake, tests/fakes/fixed_rate_llm, served with `engine = "trtllm"` and reporting
the TensorRT-LLM backend's request gauges) and NVML (`FakeNvml`: one GPU whose used memory
moves with every read, counting initialisations and reads).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import shutil
import sys
import threading
import time
import types
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

from control_plane.node_client import GenerationParams, TritonStream
from cortex.config import (
    EngineKind,
    ModelProfile,
    ModelsFile,
    NeuronConfig,
    NeuronSection,
    TritonSection,
)
from cortex.launch import consecutive_free_ports
from cortex.secrets import TRITON_KEY_HEADER
from neuron_agent import gpus
from neuron_agent import node as node_module
from neuron_agent.api import create_app
from neuron_agent.node import Node
from tests.conftest import free_ports

FAKES = Path(__file__).resolve().parents[1] / "fakes"
GIB = 1024**3
MIB = 1024**2
T = TypeVar("T")


class FakeNvml(types.ModuleType):
    """FAKE `pynvml` (no GPU here): one 16 GiB device whose used memory grows 1 MiB a read."""

    class NVMLError(Exception):
        pass

    def __init__(self) -> None:
        super().__init__("pynvml")
        self.inits = 0
        self.reads = 0  # device enumerations: one per full read of the devices
        self.used = 2 * GIB

    def nvmlInit(self) -> None:
        self.inits += 1

    def nvmlShutdown(self) -> None:
        pass

    def nvmlDeviceGetCount(self) -> int:
        self.reads += 1
        return 1

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        return index

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> types.SimpleNamespace:
        self.used += MIB
        return types.SimpleNamespace(total=16 * GIB, used=self.used, free=16 * GIB - self.used)

    def nvmlDeviceGetComputeRunningProcesses(self, handle: int) -> list[Any]:
        return []

    def nvmlDeviceGetName(self, handle: int) -> str:
        return "FAKE GPU"

    def nvmlDeviceGetUUID(self, handle: int) -> str:
        return "GPU-fake-0"


class InProcessNeuron:
    """The neuron agent's app and node on an event loop of their own (a thread), served on a
    loopback port as `cortex neuron` serves them."""

    def __init__(self, config: NeuronConfig) -> None:
        self.node = Node.from_config(config)
        self.app = create_app(config, self.node)
        self.port = free_ports(1)[0]
        self.url = f"http://127.0.0.1:{self.port}"
        self.triton_http = self.node.supervisor.http_url
        # Triton's HTTP API answers only its node's key (a random one: this node has no token).
        self.triton_headers = {TRITON_KEY_HEADER: self.node.supervisor.key}
        self.triton_grpc = self.node.supervisor.grpc_url
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="neuron", daemon=True)
        self.thread.start()
        self.server: Any = self.run(self._start(), timeout=180)

    def run(self, coroutine: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    async def _start(self) -> Any:
        # Listening from here on; nothing calls it before the node has started.
        server = await self.app.create_server(
            host="127.0.0.1", port=self.port, return_asyncio_server=True
        )
        assert server is not None
        await server.startup()
        await server.before_start()  # the node starts its tritonserver
        await server.after_start()
        return server

    async def _stop(self) -> None:
        await self.server.before_stop()  # the node stops its tritonserver
        self.server.close()
        await self.server.wait_closed()
        await self.server.after_stop()

    def stop(self) -> None:
        self.run(self._stop(), timeout=60)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)

    def status(self) -> dict[str, Any]:
        reply = httpx.get(self.url + "/status", timeout=30)
        assert reply.status_code == 200, reply.text
        return dict(reply.json())

    def model(self, name: str) -> dict[str, Any]:
        (found,) = [m for m in self.status()["loaded"] if m["name"] == name]
        return dict(found)

    def post(self, path: str, model: str) -> httpx.Response:
        return httpx.post(self.url + path, json={"model": model}, timeout=120)

    def record(self) -> dict[str, Any]:
        """The node's own record, copied on its loop: entries, events, loads, retirements."""

        async def copy() -> dict[str, Any]:
            node = self.node
            return {
                "loaded": {name: dataclasses.asdict(e) for name, e in node.loaded.items()},
                "events": list(node.events),
                "loads": sorted(node._loads),
                "retiring": sorted(node._retiring),
                "triton": (node.supervisor.state, node.supervisor.restarts),
            }

        return self.run(copy())


def _source(folder: Path, tiny_model: Path, settings: dict[str, object]) -> Path:
    """A fixed-rate fake's source folder: cortex-tiny's config and tokenizer, its settings."""
    folder.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model / name, folder / name)
    (folder / "fixed_rate.json").write_text(json.dumps(settings), encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def fake_nvml() -> Iterator[FakeNvml]:
    fake = FakeNvml()
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(sys.modules, "pynvml", fake)
        patch.setattr(gpus, "_nvml_state", [])  # NVML not yet tried in this process
        yield fake


@pytest.fixture(scope="module")
def neuron(
    tiny_model: Path, tmp_path_factory: pytest.TempPathFactory, fake_nvml: FakeNvml
) -> Iterator[InProcessNeuron]:
    folder = tmp_path_factory.mktemp("observed")
    paced = {"first_token_s": 0.0, "token_interval_s": 0.05, "token_ids": [271, 300, 412]}
    # The trtllm template's placeholders name the engine folder, not a checkpoint's.
    template = folder / "fixed-rate-as-trtllm"
    shutil.copytree(FAKES / "fixed_rate_llm", template, ignore=shutil.ignore_patterns("__py*"))
    config_file = template / "config.pbtxt"
    config_file.write_text(config_file.read_text().replace("${checkpoint_dir}", "${engine_dir}"))
    models = (
        ModelProfile(
            name="paced-torch",
            source=str(_source(folder / "torch", tiny_model, paced)),
            template=str(FAKES / "fixed_rate_llm"),
            kv_cache_tokens=256,
        ),
        ModelProfile(
            name="paced-trtllm",
            source=str(_source(folder / "trtllm", tiny_model, {**paced, "trtllm_metrics": True})),
            template=str(template),
            engine=EngineKind.TRTLLM,
            kv_cache_tokens=256,
        ),
    )
    http = consecutive_free_ports(3)
    config = NeuronConfig(
        neuron=NeuronSection(name="observed", state_dir=str(folder / "state")),
        triton=TritonSection(
            address="127.0.0.1", http_port=http, grpc_port=http + 1, metrics_port=http + 2
        ),
        models=ModelsFile(models=models),
        base_dir=str(folder),
    )
    agent = InProcessNeuron(config)
    yield agent
    agent.stop()


def test_status_changes_nothing_and_reads_nvml_once(
    neuron: InProcessNeuron, fake_nvml: FakeNvml
) -> None:
    for name in ("paced-torch", "paced-trtllm"):
        reply = neuron.post("/models/load", name)
        assert reply.status_code == 200, reply.text
    # Triton loses paced-torch behind the node's back (as in a crash): a report must say so,
    # and must not write it into the node's record.
    lost = httpx.post(
        f"{neuron.triton_http}/v2/repository/models/paced-torch/unload",
        headers=neuron.triton_headers,
        timeout=60,
    )
    assert lost.status_code == 200, lost.text
    deadline = time.monotonic() + 30
    ready = f"{neuron.triton_http}/v2/models/paced-torch/ready"
    while httpx.get(ready, headers=neuron.triton_headers).status_code == 200:
        assert time.monotonic() < deadline, "Triton kept paced-torch"
        time.sleep(0.1)

    record = neuron.record()
    inits, reads = fake_nvml.inits, fake_nvml.reads
    replies = [neuron.status() for _ in range(5)]
    assert neuron.record() == record
    assert fake_nvml.inits == inits == 1  # NVML initialised once, when the node started
    assert fake_nvml.reads - reads == len(replies)  # and read once per report
    for report in replies:
        (torch,) = [m for m in report["loaded"] if m["name"] == "paced-torch"]
        assert (torch["state"], torch["reason"]) == (
            "UNAVAILABLE",
            "Triton does not report it ready",
        )
    memory = [next(m for m in r["loaded"] if m["name"] == "paced-trtllm") for r in replies]
    assert len({m["memory_bytes"] for m in memory}) == len(replies)  # measured anew each time
    assert all(m["state"] == "READY" for m in memory)

    # A model whose engine failed (a tensor-parallel rank died, as the torch engine writes in
    # its stats file) is reported failed at once, by a report that still changes nothing ...
    failure = "rank 1 exited with code -9"
    interval = node_module.ENGINE_WATCH_S
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(node_module, "ENGINE_WATCH_S", 3600.0)  # the watcher waits, after ...
        time.sleep(interval + 0.5)  # ... the look it had begun
        before = neuron.record()
        (neuron.node.stats_dir / "paced-torch.json").write_text(json.dumps({"failed": failure}))
        torch = neuron.model("paced-torch")
        assert (torch["state"], torch["reason"]) == ("UNAVAILABLE", failure)
        assert neuron.record() == before
        # ... and the node's engine watcher (one look of it here) retires it.

        async def look() -> None:
            neuron.node.retire_failed_engines()

        neuron.run(look())
    after = neuron.record()
    assert after["loaded"]["paced-trtllm"] == record["loaded"]["paced-trtllm"]
    assert after["loaded"]["paced-torch"]["state"] == "UNAVAILABLE"


def test_a_trtllm_model_serving_is_busy_and_its_last_use_moves(neuron: InProcessNeuron) -> None:
    reply = neuron.post("/models/load", "paced-trtllm")
    assert reply.status_code == 200, reply.text
    before = neuron.model("paced-trtllm")
    assert before["engine"] == "trtllm"
    assert before["in_flight"] == 0

    async def mid_request() -> tuple[dict[str, Any], httpx.Response, float]:
        triton = TritonStream(neuron.triton_grpc)
        started = time.time()
        generation = triton.generate(
            "paced-trtllm", [1, 2, 3], GenerationParams(60, (0,), 0), "busy-trtllm"
        )
        try:
            assert await generation.__anext__()  # first token: the request is in flight
            async with httpx.AsyncClient(base_url=neuron.url, timeout=60) as client:
                busy = (await client.get("/status")).json()
                refused = await client.post("/models/unload", json={"model": "paced-trtllm"})
            assert len([ids async for ids in generation]) == 59
        finally:
            await generation.aclose()
            await triton.close()
        (model,) = [m for m in busy["loaded"] if m["name"] == "paced-trtllm"]
        return model, refused, started

    busy, refused, started = asyncio.run(mid_request())
    assert busy["in_flight"] == 1
    assert refused.status_code == 409, refused.text
    assert refused.json()["detail"]["in_flight"] == 1

    deadline = time.monotonic() + 10
    while (after := neuron.model("paced-trtllm"))["in_flight"]:
        assert time.monotonic() < deadline, "the finished request still counts"
        time.sleep(0.1)
    assert after["last_used"] > before["last_used"]
    assert started - 1 <= after["last_used"] <= time.time()
    unloaded = neuron.post("/models/unload", "paced-trtllm")
    assert unloaded.status_code == 200, unloaded.text
