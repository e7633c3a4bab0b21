"""Catalogue changes without a restart: the plan over plain data, then the replay fleet's real
neuron re-reading its models.toml when the file changes and on SIGHUP, seen by the gateway on
its next poll. The file is put back as it was at the end (the fleet is shared)."""

from __future__ import annotations

import os
import signal
import time
import tomllib
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import openai
import pytest
import tomli_w

from cortex.config import ModelProfile
from neuron_agent.catalogue import CatalogueChange, plan_catalogue_change
from tests.gateway.conftest import ReplayFleet

WAIT_S = 30.0


def profile(name: str, **fields: Any) -> ModelProfile:
    return ModelProfile(name=name, source="/models/x", **fields)


def test_the_plan_adds_updates_removes_and_waits_for_loaded_models() -> None:
    current = {
        "kept": profile("kept"),
        "retuned": profile("retuned"),
        "dropped": profile("dropped"),
        "busy-retuned": profile("busy-retuned"),
        "busy-dropped": profile("busy-dropped"),
    }
    wanted = {
        "kept": profile("kept"),
        "retuned": profile("retuned", context_length=1024),
        "busy-retuned": profile("busy-retuned", context_length=1024),
        "new": profile("new"),
    }
    profiles, change = plan_catalogue_change(current, wanted, {"busy-retuned", "busy-dropped"})
    assert change == CatalogueChange(
        added=("new",),
        updated=("retuned",),
        removed=("dropped",),
        deferred=("busy-retuned", "busy-dropped"),
    )
    assert profiles["retuned"].context_length == 1024
    assert profiles["busy-retuned"] == current["busy-retuned"]  # as it was loaded
    assert "busy-dropped" in profiles and "dropped" not in profiles
    # Once unloaded, the same plan finishes the job.
    profiles, change = plan_catalogue_change(profiles, wanted, set())
    assert change.updated == ("busy-retuned",) and change.removed == ("busy-dropped",)
    assert set(profiles) == set(wanted)


def wait_for(what: str, check: Callable[[], Any]) -> Any:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.2)
    raise AssertionError(f"waited {WAIT_S} s for {what}")


def neuron_status(fleet: ReplayFleet) -> dict[str, Any]:
    return dict(httpx.get(f"{fleet.neuron_url}/status", timeout=10).json())


def catalogue(fleet: ReplayFleet) -> dict[str, dict[str, Any]]:
    return {e["profile"]["name"]: e for e in neuron_status(fleet)["catalogue"]}


def write_models(fleet: ReplayFleet, data: dict[str, Any]) -> None:
    # A new size or modification time is what the neuron looks for; make sure of the time.
    before = fleet.models_file.stat().st_mtime_ns
    fleet.models_file.write_text(tomli_w.dumps(data), encoding="utf-8")
    if fleet.models_file.stat().st_mtime_ns == before:
        os.utime(fleet.models_file, ns=(before + 1_000_000, before + 1_000_000))


@pytest.fixture
def models_file(replay_fleet: ReplayFleet) -> Iterator[dict[str, Any]]:
    """The fleet's models.toml as data; put back (and re-read) after the test."""
    original = replay_fleet.models_file.read_text(encoding="utf-8")
    yield tomllib.loads(original)
    replay_fleet.models_file.write_text(original, encoding="utf-8")
    os.kill(replay_fleet.neuron_pid, signal.SIGHUP)
    wait_for("the original catalogue", lambda: "replay-extra" not in catalogue(replay_fleet))


def test_the_neuron_rereads_its_catalogue_and_the_gateway_follows(
    replay_fleet: ReplayFleet, oai: openai.OpenAI, models_file: dict[str, Any]
) -> None:
    extra = dict(models_file["models"][0], name="replay-extra", aliases=[])
    write_models(replay_fleet, {"models": [*models_file["models"], extra]})

    # New entries appear on the neuron, then in the gateway's model list, and serve.
    wait_for("the new entry on the neuron", lambda: "replay-extra" in catalogue(replay_fleet))
    wait_for(
        "the new entry in the gateway",
        lambda: "replay-extra" in {m.id for m in oai.models.list().data},
    )
    reload = neuron_status(replay_fleet)["catalogue_reload"]
    assert reload["ok"] and reload["added"] == ["replay-extra"]

    # A bad edit is refused with file:line: key, and the catalogue stays as it was.
    text = replay_fleet.models_file.read_text(encoding="utf-8")
    replay_fleet.models_file.write_text(text + "colour = 'blue'\n", encoding="utf-8")
    os.kill(replay_fleet.neuron_pid, signal.SIGHUP)
    refused = wait_for(
        "the refusal",
        lambda: (r := neuron_status(replay_fleet)["catalogue_reload"]) and not r["ok"] and r,
    )
    lines = len(text.splitlines()) + 1
    extra_index = len(models_file["models"])  # the last table: the extra entry
    assert f"models.toml:{lines}: models.{extra_index}.colour: unknown key" in refused["error"]
    assert "replay-extra" in catalogue(replay_fleet)
    assert any("not reloaded" in event for event in neuron_status(replay_fleet)["events"])

    # An entry of a model not loaded is updated at once.
    write_models(
        replay_fleet, {"models": [*models_file["models"], dict(extra, context_length=1024)]}
    )
    wait_for(
        "the updated entry",
        lambda: catalogue(replay_fleet)["replay-extra"]["context_length"] == 1024,
    )

    # Loaded, then removed from the file: it serves until idle, then goes.
    reply = oai.chat.completions.create(
        model="replay-extra", messages=[{"role": "user", "content": "hello"}]
    )
    assert reply.choices[0].message.content == "Hello from the replay fake."
    write_models(replay_fleet, models_file)
    wait_for("the removal", lambda: "replay-extra" not in catalogue(replay_fleet))
    assert "replay-extra" not in {m["name"] for m in neuron_status(replay_fleet)["loaded"]}
    wait_for(
        "the gateway to drop it",
        lambda: "replay-extra" not in {m.id for m in oai.models.list().data},
    )
