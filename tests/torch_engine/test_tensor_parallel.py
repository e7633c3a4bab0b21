"""Tensor parallel against tp = 1 in the engine itself (CPU, gloo): this test process is rank 0
and starts rank 1 as a real worker process, as Triton's stub does. Logits of the whole prompt
agree within float32 rounding (1e-4), greedy tokens are identical, for plain weights, in-situ
int8 and int4, and ModelOpt FP8 / INT4-AWQ exports with fewer kv heads than ranks."""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch

from cortex.config import EngineKind, ModelProfile
from neuron_agent.repository import render
from neuron_agent.torch_engine.checkpoint import estimate_weight_bytes, read_spec
from neuron_agent.torch_engine.errors import UnsupportedCheckpoint
from neuron_agent.torch_engine.loader import (
    EngineOptions,
    build_engine,
    close_engine,
    rank_devices,
)
from neuron_agent.torch_engine.scheduler import Engine, GenerationRequest
from tests.torch_engine.random_models import (
    write_fp8_export,
    write_int4_awq_export,
    write_random_model,
)

PROMPTS = [
    torch.randint(0, 512, (n,), generator=torch.Generator().manual_seed(n)).tolist()
    for n in (40, 7, 23)
]
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("tp-models")
    qwen = write_random_model("qwen2", folder / "qwen2")
    # One kv head for two ranks: each rank holds a replica of it.
    llama = write_random_model("llama", folder / "llama-kv1", kv_heads=1)
    return {
        "qwen2": qwen,
        "fp8": write_fp8_export(llama, folder / "llama-kv1-fp8"),
        "int4_awq": write_int4_awq_export(llama, folder / "llama-kv1-awq", group=32),
    }


def greedy(engine: Engine, prompt: list[int], max_new: int = NEW_TOKENS) -> list[int]:
    tokens: list[int] = []
    done = threading.Event()
    errors: list[str] = []

    def emit(new: list[int], final: bool) -> None:
        tokens.extend(new)
        if final:
            done.set()

    def fail(message: str) -> None:
        errors.append(message)
        done.set()

    engine.submit(GenerationRequest(prompt=prompt, max_new_tokens=max_new, emit=emit, fail=fail))
    assert done.wait(60) and not errors, errors
    return tokens


def outputs(
    options: EngineOptions, inspect: Callable[[Engine], None] | None = None
) -> tuple[list[torch.Tensor], list[list[int]]]:
    engine = build_engine(options)
    try:
        if inspect is not None:
            inspect(engine)
        logits = [engine.prompt_logits(p) for p in PROMPTS]
        engine.start()
        return logits, [greedy(engine, p) for p in PROMPTS]
    finally:
        close_engine(engine)


def rank_processes() -> list[psutil.Process]:
    found = []
    for child in psutil.Process().children(recursive=True):
        try:
            if "neuron_agent.torch_engine.ranks" in " ".join(child.cmdline()):
                found.append(child)
        except psutil.Error:
            continue
    return found


@pytest.fixture(autouse=True)
def no_rank_left() -> Iterator[None]:
    yield
    assert not rank_processes(), "a worker rank outlived its engine"


@pytest.mark.parametrize(
    ("model", "quantization", "group"),
    [
        ("qwen2", "none", 128),
        ("qwen2", "int8", 128),
        ("qwen2", "int4", 32),  # o_proj's 64 and down_proj's 128 columns per rank: whole groups
        ("fp8", "none", 128),
        ("int4_awq", "none", 128),
    ],
)
def test_tp2_equals_tp1(models: dict[str, Path], model: str, quantization: str, group: int) -> None:
    options = EngineOptions(
        models[model], quantization=quantization, group_size=group, kv_cache_tokens=256
    )
    one_logits, one_tokens = outputs(options)
    two_logits, two_tokens = outputs(
        replace(options, tp=2),
        partial(holds_its_shard_only, models[model]) if model == "qwen2" else None,
    )
    for a, b in zip(one_logits, two_logits, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
    assert two_tokens == one_tokens
    assert all(len(t) == NEW_TOKENS for t in one_tokens)


def holds_its_shard_only(folder: Path, engine: Engine) -> None:
    """Rank 0's model is its shard: half the heads, its kv head, half the MLP width; and its
    unquantized weights take what the neuron's per-device estimate says (it counts no norms
    or biases: within 2 % at this size)."""
    spec = engine.model.spec
    assert (spec.num_heads, spec.num_kv_heads, spec.intermediate_size) == (2, 1, 128)
    layer = engine.model.layers[0]
    assert layer.qkv.dequantized().shape == ((2 + 1 + 1) * 32, 128)  # type: ignore[union-attr,operator]
    assert layer.down.linear.dequantized().shape == (128, 128)  # type: ignore[union-attr,operator]
    assert engine.pool.layers[0][0].shape[1] == 1
    if layer.qkv.mode == "none":
        held = sum(p.numel() * p.element_size() for p in engine.model.parameters())
        estimate = estimate_weight_bytes(read_spec(folder), "none", 4, tp=2)
        assert abs(held - estimate) / estimate < 0.02, (held, estimate)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            dict(quantization="int4", group_size=128),
            r"int4 groups of 128 would straddle the tp = 2 shards of o_proj: each rank holds 64",
        ),
        (dict(tp=3), r"tp = 3 does not divide its 4 attention heads or its 2 kv heads"),
    ],
)
def test_shapes_tp_cannot_split_are_refused_before_any_rank_starts(
    models: dict[str, Path], options: dict[str, object], message: str
) -> None:
    arguments: dict[str, Any] = {"tp": 2, **options}
    with pytest.raises(UnsupportedCheckpoint, match=message):
        build_engine(EngineOptions(models["qwen2"], **arguments))
    assert not rank_processes()


def test_torch_and_tensorrt_llm_name_a_tp_models_gpus_alike(
    tiny_model: Path, tmp_path: Path
) -> None:
    """Both templates get the GPUs the neuron chose as NVML indices in rank order; the torch
    engine puts rank r on the r-th of them."""

    def parameters(files: dict[str, bytes]) -> dict[str, str]:
        text = files["config.pbtxt"].decode()
        return dict(re.findall(r'key: "(\w+)"\s+value: \{ string_value: "([^"]*)" \}', text))

    torch_profile = ModelProfile(name="m", source=str(tiny_model), tp=2)
    engine_profile = ModelProfile(name="m", source=str(tmp_path), engine=EngineKind.TRTLLM, tp=2)
    stats = tmp_path / "m.json"
    torch_side = parameters(render(torch_profile, tiny_model, [2, 3], True, stats))
    engine_side = parameters(render(engine_profile, tmp_path, [2, 3], True, stats))
    assert torch_side["gpu_device_ids"] == engine_side["gpu_device_ids"] == "2,3"
    assert torch_side["tp"] == "2"
    devices = rank_devices(torch_side["device"], torch_side["gpu_device_ids"])
    assert devices == ("cuda:2", "cuda:3")
    cpu_side = parameters(render(torch_profile, tiny_model, [0, 1], False, stats))
    assert rank_devices(cpu_side["device"], cpu_side["gpu_device_ids"]) == ()
    assert cpu_side["device"] == "cpu"
