"""tp = 2 through a real neuron and tritonserver on CPU (gloo): the stub is rank 0 and starts
rank 1; greedy output equals tp = 1 token for token; each of the two (virtual) devices holds
half; unloading, a killed rank and a killed Triton leave no rank process behind."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import torch
from transformers import AutoTokenizer

from control_plane.errors import CortexError
from control_plane.node_client import GenerationParams, TritonStream
from cortex.config import ModelProfile
from cortex.launch import Neuron as NeuronHandle
from cortex.launch import loopback_neuron, running_neuron
from neuron_agent.torch_engine.loader import EngineOptions, build_engine
from neuron_agent.torch_engine.scheduler import Engine
from tests.torch_engine.random_models import write_random_model
from tests.torch_engine.test_tensor_parallel import greedy

NEW_TOKENS = 16
RANK_MODULE = "neuron_agent.torch_engine.ranks"


@pytest.fixture(scope="module")
def random_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_random_model("llama", tmp_path_factory.mktemp("tp-triton") / "llama")


@pytest.fixture(scope="module")
def neuron(
    tiny_model: Path, random_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[NeuronHandle]:
    models = [
        ModelProfile(name="tiny", source=str(tiny_model), kv_cache_tokens=1024),
        ModelProfile(name="tiny-tp2", source=str(tiny_model), tp=2, kv_cache_tokens=1024),
        ModelProfile(name="random-tp2", source=str(random_model), tp=2, kv_cache_tokens=1024),
    ]
    folder = tmp_path_factory.mktemp("neuron-tp")
    config = loopback_neuron(folder, "tp-node", models, memory_budget_mib=[2048, 2048])
    with running_neuron(config) as handle:
        yield handle


def call(neuron: NeuronHandle, method: str, path: str, **kwargs: Any) -> httpx.Response:
    return httpx.request(method, neuron.url + path, timeout=180, **kwargs)


def status(neuron: NeuronHandle) -> dict[str, Any]:
    report: dict[str, Any] = call(neuron, "GET", "/status").json()
    return report


def load(neuron: NeuronHandle, model: str) -> dict[str, Any]:
    response = call(neuron, "POST", "/models/load", json={"model": model})
    assert response.status_code == 200, response.text
    loaded: dict[str, Any] = response.json()
    return loaded


def rank_processes(neuron: NeuronHandle) -> list[psutil.Process]:
    found = []
    for child in psutil.Process(neuron.process.pid).children(recursive=True):
        try:
            if RANK_MODULE in " ".join(child.cmdline()) and child.status() != "zombie":
                found.append(child)
        except psutil.Error:
            continue
    return found


def triton_grpc(neuron: NeuronHandle) -> str:
    return str(status(neuron)["triton"]["grpc_url"])


async def _generate(url: str, model: str, prompts: list[list[int]]) -> list[list[int]]:
    stream = TritonStream(url)
    try:
        results = []
        for index, prompt in enumerate(prompts):
            params = GenerationParams(max_tokens=NEW_TOKENS, end_ids=(-1,), pad_id=0)
            tokens: list[int] = []
            async for new in stream.generate(model, prompt, params, f"tp-{index}"):
                tokens.extend(new)
            results.append(tokens)
        return results
    finally:
        await stream.close()


def generate(neuron: NeuronHandle, model: str, prompts: list[list[int]]) -> list[list[int]]:
    return asyncio.run(_generate(triton_grpc(neuron), model, prompts))


def reference(checkpoint: Path, prompts: list[list[int]]) -> list[list[int]]:
    """tp = 1 greedy tokens from the engine in this process (what the tp = 1 model serves;
    tests/torch_engine/test_engine.py holds that to transformers' own generate). No end ids
    here nor in the Triton requests (-1): every request runs its full length."""
    engine: Engine = build_engine(EngineOptions(checkpoint, kv_cache_tokens=1024))
    engine.start()
    try:
        return [greedy(engine, prompt, NEW_TOKENS) for prompt in prompts]
    finally:
        engine.stop()


def tiny_prompts(tiny_model: Path) -> list[list[int]]:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    questions = ["What is a list?", "Explain the with statement", "hello"]
    return [
        list(
            tokenizer.apply_chat_template(  # type: ignore[arg-type]
                [{"role": "user", "content": q}], add_generation_prompt=True, return_dict=False
            )
        )
        for q in questions
    ]


def random_prompts() -> list[list[int]]:
    return [
        torch.randint(0, 512, (n,), generator=torch.Generator().manual_seed(n)).tolist()
        for n in (30, 5)
    ]


def test_tp2_serves_the_same_tokens_as_tp1_on_two_devices(
    neuron: NeuronHandle, tiny_model: Path, random_model: Path
) -> None:
    for model, checkpoint, prompts in (
        ("random-tp2", random_model, random_prompts()),
        ("tiny-tp2", tiny_model, tiny_prompts(tiny_model)),
    ):
        loaded = load(neuron, model)
        assert loaded["gpus"] == [0, 1] and loaded["tp"] == 2
        assert len(rank_processes(neuron)) == 1
        # Each virtual device holds the model's per-device share, and only that.
        share = loaded["estimated_bytes_per_gpu"]
        assert loaded["estimated_bytes"] == 2 * share
        assert [g["memory_used_bytes"] for g in status(neuron)["gpus"]] == [share, share]
        got = generate(neuron, model, prompts)
        assert got == reference(checkpoint, prompts), model
        assert all(len(tokens) == NEW_TOKENS for tokens in got)
        if model == "tiny-tp2":
            break  # stays loaded for the tests below
        unloaded = call(neuron, "POST", "/models/unload", json={"model": model}).json()
        assert unloaded == {"model": model, "memory_released": True, "triton_restarted": False}
        assert not rank_processes(neuron)
        assert [g["memory_used_bytes"] for g in status(neuron)["gpus"]] == [0, 0]


def test_per_device_estimate_halves_the_shardable_part(neuron: NeuronHandle) -> None:
    catalogue = {e["profile"]["name"]: e for e in status(neuron)["catalogue"]}
    one, two = catalogue["tiny"], catalogue["tiny-tp2"]
    assert one["estimated_bytes_per_gpu"] == one["estimated_bytes"]
    # cortex-tiny (config.json): 4 layers, hidden 256, 8 heads / 4 kv heads of 32, MLP 688,
    # vocab 4096, embedding and head untied, float32 on CPU; 1024 KV tokens; 512 MiB of
    # runtime per process. At tp = 2 rank 0 holds half the layers, half the KV cache, the whole
    # embedding and the head (the other rank holds no head: rank 0's share is the larger).
    linear = 4 * (256 * 32 * (2 * 8 + 2 * 4) + 3 * 256 * 688) * 4
    embedding = head = 4096 * 256 * 4
    kv = 1024 * 2 * 4 * 4 * 32 * 4
    runtime = 512 * 2**20
    assert one["estimated_bytes"] == linear + embedding + head + kv + runtime
    assert two["estimated_bytes_per_gpu"] == linear // 2 + embedding + head + kv // 2 + runtime
    assert two["estimated_bytes"] == 2 * two["estimated_bytes_per_gpu"]


def test_a_killed_rank_fails_the_requests_and_the_model(
    neuron: NeuronHandle, tiny_model: Path
) -> None:
    load(neuron, "tiny-tp2")
    [worker] = rank_processes(neuron)
    prompt = tiny_prompts(tiny_model)[1]

    async def long_generation() -> tuple[int, str, float]:
        stream = TritonStream(triton_grpc(neuron))
        params = GenerationParams(max_tokens=900, end_ids=(-1,), pad_id=0)
        received, killed_at = 0, 0.0
        try:
            async for new in stream.generate("tiny-tp2", prompt, params, "doomed"):
                received += len(new)
                if received >= 4 and not killed_at:
                    os.kill(worker.pid, signal.SIGKILL)
                    killed_at = time.monotonic()
        except CortexError as error:
            return received, str(error), time.monotonic() - killed_at
        finally:
            await stream.close()
        return received, "", 0.0

    received, message, seconds = asyncio.run(long_generation())
    assert message, f"the request finished ({received} tokens) although its rank died"
    assert "tensor-parallel rank 1 of 2" in message and "SIGKILL" in message, message
    assert seconds < 5, f"the failure took {seconds:.1f} s to arrive"
    # The neuron reports it failed, with the reason, and gives its processes back.
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        [entry] = [m for m in status(neuron)["loaded"] if m["name"] == "tiny-tp2"]
        if entry["state"] == "UNAVAILABLE" and not rank_processes(neuron):
            break
        time.sleep(0.2)
    assert entry["state"] == "UNAVAILABLE" and "tensor-parallel rank 1 of 2" in entry["reason"]
    assert not rank_processes(neuron)
    # A load brings it back.
    assert load(neuron, "tiny-tp2")["state"] == "READY"
    assert len(generate(neuron, "tiny-tp2", [prompt])[0]) == NEW_TOKENS


def test_a_killed_triton_leaves_no_rank_behind(neuron: NeuronHandle) -> None:
    load(neuron, "tiny-tp2")
    [old] = rank_processes(neuron)
    [triton] = [
        c for c in psutil.Process(neuron.process.pid).children() if c.name() == "tritonserver"
    ]
    triton.kill()
    psutil.wait_procs([old], timeout=10)
    assert not old.is_running() or old.status() == "zombie"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:  # the neuron restarts Triton and reloads the model
        states = {m["name"]: m["state"] for m in status(neuron)["loaded"]}
        if states.get("tiny-tp2") == "READY" and rank_processes(neuron):
            break
        time.sleep(0.5)
    else:
        raise AssertionError(f"not reloaded: {status(neuron)['loaded']}")
    assert call(neuron, "POST", "/models/unload", json={"model": "tiny-tp2"}).json()[
        "memory_released"
    ]
    assert not rank_processes(neuron)
