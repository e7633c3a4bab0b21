"""The console's lifecycle actions through its JSON API (httpx), on the replay fleet (a real
neuron and Triton behind a gateway with `[[keys]]`; conftest.py): load, unload, pin / unpin,
sleep / wake. Only an admin key acts; what the model's state does not allow is a 409 with a
sentence; every change is seen in the neuron's own /status and in the console's state.

Sleep and wake run on `SLEEPER` (cortex-tiny on the real torch engine); the replay fakes serve
no control socket, so their catalogue entries say they cannot sleep.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from cortex.config import ModelProfile
from cortex.launch import loopback_neuron
from neuron_agent.catalogue import Catalogue
from tests.gateway.conftest import API_KEY, KEYS, SLEEPER, ReplayFleet

ADMIN = {"authorization": f"Bearer {KEYS['admin']['key']}"}
VIEWER = {"authorization": f"Bearer {KEYS['viewer']['key']}"}
NODE = "replay-node"
PINNED = "replay-hermes"
ACTIONS = ("load", "unload", "pin", "unpin", "sleep", "wake")


def post(fleet: ReplayFleet, action: str, headers: dict[str, str], **body: Any) -> httpx.Response:
    return httpx.post(
        f"{fleet.root_url}/ui/api/models/{action}", json=body, headers=headers, timeout=120
    )


def neuron_status(fleet: ReplayFleet) -> dict[str, Any]:
    found: dict[str, Any] = httpx.get(f"{fleet.neuron_url}/status", timeout=10).json()
    return found


def neuron_state(fleet: ReplayFleet, model: str) -> str | None:
    loaded = neuron_status(fleet)["loaded"]
    return next((m["state"] for m in loaded if m["name"] == model), None)


def catalogue_pinned(fleet: ReplayFleet, model: str) -> bool:
    entries = neuron_status(fleet)["catalogue"]
    return bool(next(e for e in entries if e["profile"]["name"] == model)["profile"]["pinned"])


def console_model(fleet: ReplayFleet, model: str) -> dict[str, Any]:
    state = httpx.get(f"{fleet.root_url}/ui/api/state", headers=ADMIN, timeout=10).json()
    found: dict[str, Any] = next(m for m in state["models"] if m["name"] == model)
    return found


def wait_for(what: str, check: Callable[[], Any], timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.2)
    raise AssertionError(f"waited {timeout} s for {what}")


def refused(response: httpx.Response, status: int, *words: str) -> None:
    assert response.status_code == status, response.text
    message = response.json()["error"]["message"]
    for word in words:
        assert word in message, message


def neuron_status_folder(fleet: ReplayFleet) -> Path:
    """The neuron's state folder (loopback_neuron puts it beside models.toml)."""
    return fleet.models_file.parent / "state"


@pytest.fixture
def unpinned(replay_fleet: ReplayFleet) -> Iterator[None]:
    """The shared fleet's PINNED model unpinned again after the test, whatever it did."""
    yield
    post(replay_fleet, "unpin", ADMIN, model=PINNED).raise_for_status()


@pytest.mark.parametrize("action", ACTIONS)
def test_only_an_admin_key_acts(replay_fleet: ReplayFleet, action: str) -> None:
    before = neuron_state(replay_fleet, SLEEPER), catalogue_pinned(replay_fleet, SLEEPER)
    body = {"model": SLEEPER} if action in ("pin", "unpin") else {"model": SLEEPER, "node": NODE}
    no_key = post(replay_fleet, action, {}, **body)
    assert no_key.status_code == 401 and no_key.json()["error"]["code"] == "invalid_api_key"
    for key in (VIEWER, {"authorization": f"Bearer {API_KEY}"}):  # a [[keys]] record, a plain key
        answer = post(replay_fleet, action, key, **body)
        assert answer.status_code == 403 and answer.json()["error"]["code"] == "permission_denied"
    # The Anthropic envelope for a client that speaks it.
    answer = post(replay_fleet, action, {**VIEWER, "anthropic-version": "2023-06-01"}, **body)
    assert answer.status_code == 403
    assert answer.json()["error"]["type"] == "permission_error"
    assert (neuron_state(replay_fleet, SLEEPER), catalogue_pinned(replay_fleet, SLEEPER)) == before


def test_a_pin_is_kept_by_the_neuron_and_shown(replay_fleet: ReplayFleet, unpinned: None) -> None:
    pinned = post(replay_fleet, "pin", ADMIN, model="claude-replay")  # an alias names it too
    assert pinned.status_code == 200, pinned.text
    assert pinned.json() == {"model": PINNED, "pinned": True, "nodes": [NODE]}
    assert catalogue_pinned(replay_fleet, PINNED)
    assert console_model(replay_fleet, PINNED)["pinned"]
    # Kept in the neuron's state folder, over models.toml, which stays as the operator wrote it.
    state = Path(neuron_status_folder(replay_fleet))
    pins = json.loads((state / "pins.json").read_text())
    assert pins[PINNED] == {"pinned": True, "file_said": False}
    assert "pinned = true" not in replay_fleet.models_file.read_text()
    # Pinned: the gateway keeps it resident, and will not unload it.
    wait_for("the pinned model to load", lambda: neuron_state(replay_fleet, PINNED) == "READY")
    refused(post(replay_fleet, "unload", ADMIN, model=PINNED, node=NODE), 409, "pinned")
    assert neuron_state(replay_fleet, PINNED) == "READY"

    # A re-read of models.toml (it says nothing of the pin) keeps it.
    def last_reload() -> float:
        return float((neuron_status(replay_fleet)["catalogue_reload"] or {}).get("at", 0))

    before = last_reload()
    text = replay_fleet.models_file.read_text()
    replay_fleet.models_file.write_text(text + "\n")
    wait_for("the neuron to re-read models.toml", lambda: last_reload() > before)
    assert catalogue_pinned(replay_fleet, PINNED)
    replay_fleet.models_file.write_text(text)

    unpinned_answer = post(replay_fleet, "unpin", ADMIN, model=PINNED)
    assert unpinned_answer.json()["pinned"] is False
    assert not catalogue_pinned(replay_fleet, PINNED)
    assert not console_model(replay_fleet, PINNED)["pinned"]
    assert PINNED not in json.loads((state / "pins.json").read_text())  # as the file says
    assert post(replay_fleet, "unload", ADMIN, model=PINNED, node=NODE).status_code == 200
    assert neuron_state(replay_fleet, PINNED) is None


def test_a_pin_outlives_the_neuron_until_the_file_changes_its_word(
    tmp_path: Path, tiny_model: Path
) -> None:
    """What a restarted neuron starts from: a new catalogue over the same state folder. The
    latest word wins: a pin holds over models.toml until the operator changes the model's
    `pinned` line there."""

    def catalogue(pinned_in_file: bool) -> Catalogue:
        profile = ModelProfile(name="m", source=str(tiny_model), pinned=pinned_in_file)
        return Catalogue(loopback_neuron(tmp_path, "n", [profile]), has_gpu=False)

    first = catalogue(False)
    assert not first.profiles["m"].pinned
    first.set_pinned("m", True)
    assert catalogue(False).profiles["m"].pinned  # restarted: the pin holds
    first.set_pinned("m", False)
    assert not catalogue(False).profiles["m"].pinned
    assert json.loads((tmp_path / "state" / "pins.json").read_text()) == {}

    first.set_pinned("m", True)
    assert catalogue(True).profiles["m"].pinned  # the file now pins it itself: the pin is dropped
    assert json.loads((tmp_path / "state" / "pins.json").read_text()) == {}
    assert not catalogue(False).profiles["m"].pinned  # and the file's later word holds


def test_sleep_and_wake_change_the_tier(replay_fleet: ReplayFleet) -> None:
    loaded = post(replay_fleet, "load", ADMIN, model=SLEEPER, node=NODE)
    assert loaded.status_code == 200, loaded.text
    assert neuron_state(replay_fleet, SLEEPER) == "READY"
    model = console_model(replay_fleet, SLEEPER)
    assert model["can_sleep"] and model["placements"][0]["tier"] == "loaded"

    asleep = post(replay_fleet, "sleep", ADMIN, model=SLEEPER)  # the one copy: no node needed
    assert asleep.status_code == 200, asleep.text
    assert asleep.json() == {"model": SLEEPER, "node": NODE, "state": "ASLEEP"}
    assert neuron_state(replay_fleet, SLEEPER) == "ASLEEP"
    wait_for(
        "the console to show it asleep",
        lambda: console_model(replay_fleet, SLEEPER)["placements"][0]["tier"] == "asleep",
    )
    refused(post(replay_fleet, "sleep", ADMIN, model=SLEEPER), 409, "no copy", "READY")

    awake = post(replay_fleet, "wake", ADMIN, model=SLEEPER, node=NODE)
    assert awake.status_code == 200, awake.text
    assert neuron_state(replay_fleet, SLEEPER) == "READY"
    assert console_model(replay_fleet, SLEEPER)["placements"][0]["tier"] == "loaded"
    refused(post(replay_fleet, "wake", ADMIN, model=SLEEPER, node=NODE), 409, "READY there")
    answer = httpx.post(
        f"{replay_fleet.openai_url}/chat/completions",
        headers={"authorization": f"Bearer {API_KEY}"},
        json={"model": SLEEPER, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
        timeout=60,
    )
    assert answer.status_code == 200, answer.text  # awake, it serves


def test_what_the_state_does_not_allow_is_a_409(replay_fleet: ReplayFleet) -> None:
    # An engine that cannot sleep (the replay fake), loaded or not.
    refused(post(replay_fleet, "sleep", ADMIN, model="replay-llama3"), 409, "cannot sleep")
    # Requests in flight: the copy keeps serving them. A regex holds the tiny model off its end
    # of sequence, so the answer runs until the fleet's request timeout (2 s).
    post(replay_fleet, "load", ADMIN, model=SLEEPER, node=NODE).raise_for_status()
    body = {
        "model": SLEEPER,
        "messages": [{"role": "user", "content": "count"}],
        "max_tokens": 1500,
        "stream": True,
        "response_format": {
            "type": "grammar",
            "grammar": {"syntax": "regex", "definition": "(ab ){600}"},
        },
    }
    headers = {"authorization": f"Bearer {API_KEY}"}
    with httpx.stream(
        "POST", f"{replay_fleet.openai_url}/chat/completions", json=body, headers=headers
    ) as stream:
        # The first token, not the first event: the role comes before the request reaches a
        # node. The lines are kept: a dropped iterator closes the response, cancelling it.
        lines = stream.iter_lines()
        next(line for line in lines if '"content":"ab' in line)
        refused(post(replay_fleet, "sleep", ADMIN, model=SLEEPER), 409, "in flight")
    assert neuron_state(replay_fleet, SLEEPER) == "READY"
    # A node that is not there, a copy that is not there.
    missing = post(replay_fleet, "load", ADMIN, model=SLEEPER, node="no-such-node")
    refused(missing, 404, "no-such-node")
    refused(post(replay_fleet, "wake", ADMIN, model="replay-llama3"), 409, "no copy")
    bad = post(replay_fleet, "pin", ADMIN, model=SLEEPER, node=NODE)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "node"
