"""The neuron's load path without a Triton: whatever ends a load before Triton has the model — a
template that cannot be filled, a cancellation — leaves no entry behind to hold memory."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from cortex.config import ModelProfile, ModelsFile, NeuronConfig, NeuronSection
from neuron_agent.errors import NodeError
from neuron_agent.node import Node


def node_with(folder: Path, tiny_model: Path) -> Node:
    (folder / "broken-template").mkdir()
    (folder / "broken-template" / "config.pbtxt").write_text('name: "${nowhere_to_be_found}"\n')
    models = [
        ModelProfile(name="tiny", source=str(tiny_model), kv_cache_tokens=256),
        ModelProfile(
            name="bad-template",
            source=str(tiny_model),
            template=str(folder / "broken-template"),
            kv_cache_tokens=256,
        ),
    ]
    config = NeuronConfig(
        neuron=NeuronSection(
            name="load-path", state_dir=str(folder / "state"), memory_budget_mib=(4096,)
        ),
        models=ModelsFile(models=tuple(models)),
        base_dir=str(folder),
    )
    return Node.from_config(config)


def test_a_template_that_cannot_be_filled_leaves_no_entry(tmp_path: Path, tiny_model: Path) -> None:
    node = node_with(tmp_path, tiny_model)
    with pytest.raises(NodeError) as caught:
        asyncio.run(node.load("bad-template"))
    assert "nowhere_to_be_found" in str(caught.value)
    assert node.loaded == {}


def test_a_cancelled_load_leaves_no_entry(tmp_path: Path, tiny_model: Path) -> None:
    node = node_with(tmp_path, tiny_model)

    async def cancel_mid_load() -> None:
        task = asyncio.create_task(node.load("tiny"))
        while "tiny" not in node.loaded:  # registered, now writing its directory or loading
            await asyncio.sleep(0)
        assert node.loaded["tiny"].state == "LOADING"
        await node.stop()  # cancels the loads in progress (Triton was never started)
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(cancel_mid_load())
    assert node.loaded == {}
