"""The fleet end to end: real neuron agents with real tritonservers of different memory tiers,
real gateways, the official openai SDK as the client."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.fleet.conftest import GatewayFactory, NeuronProcess, start_neuron


def ask(gateway_url: str, model: str, tokens: int = 4) -> str:
    client = openai.OpenAI(base_url=gateway_url, api_key="none", max_retries=0, timeout=120)
    reply = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "hello"}], max_tokens=tokens
    )
    return reply.choices[0].message.content or ""


def wait_until(predicate, timeout: float = 30) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError("condition not met in time")


def test_catalogue_merges_every_neuron(
    fleet: dict[str, NeuronProcess], gateway: GatewayFactory
) -> None:
    g = gateway(list(fleet.values()))
    fleet["large"].load("m2")
    wait_until(
        lambda: any(
            m["id"] == "m2" and m["loaded_on"] for m in httpx.get(g.url + "/models").json()["data"]
        )
    )
    models = {m["id"]: m for m in httpx.get(g.url + "/models").json()["data"]}
    assert set(models) == {"m1", "m2", "m3", "pin"}  # one entry per model, not per node
    assert models["m2"]["loaded_on"] == ["large"] and models["m1"]["loaded_on"] == []


def test_cold_load_on_first_request(
    fleet: dict[str, NeuronProcess], gateway: GatewayFactory
) -> None:
    g = gateway([fleet["small"]])
    assert fleet["small"].loaded() == set()
    assert ask(g.url, "m1")
    assert fleet["small"].loaded() == {"m1"}
    assert g.loads("m1") == 1


def test_second_model_evicts_the_first_under_lru(
    fleet: dict[str, NeuronProcess], gateway: GatewayFactory
) -> None:
    g = gateway([fleet["small"]])
    ask(g.url, "m1")
    ask(g.url, "m2")
    assert fleet["small"].loaded() == {"m2"}
    assert 'reason="make_room"' in httpx.get(g.metrics_url).text


@pytest.mark.parametrize(("strategy", "victim"), [("lru", "m2"), ("priority", "m1")])
def test_strategy_chooses_the_victim(
    fleet: dict[str, NeuronProcess], gateway: GatewayFactory, strategy: str, victim: str
) -> None:
    g = gateway([fleet["medium"]], strategy=strategy)
    ask(g.url, "m2")  # priority 5, used first (least recently)
    ask(g.url, "m1")  # priority 1, used last
    ask(g.url, "m3")  # needs room: lru drops m2, priority drops m1
    assert fleet["medium"].loaded() == {"m1", "m2", "m3"} - {victim}


def test_pinned_models_stay_and_are_named_when_in_the_way(
    fleet: dict[str, NeuronProcess], gateway: GatewayFactory
) -> None:
    g = gateway([fleet["medium"]])
    ask(g.url, "pin")
    ask(g.url, "m1")
    ask(g.url, "m2")  # m1 goes, pin stays although least recently used
    assert fleet["medium"].loaded() == {"pin", "m2"}
    small = gateway([fleet["small"]])
    ask(small.url, "pin")
    client = openai.OpenAI(base_url=small.url, api_key="none", max_retries=0)
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(
            model="m1", messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )
    assert caught.value.status_code == 503
    assert "only pinned models stand in the way (pin)" in caught.value.message
    assert caught.value.response.headers["retry-after"]


def test_ten_concurrent_requests_for_a_cold_model_cause_one_load(
    fleet: dict[str, NeuronProcess], gateway: GatewayFactory
) -> None:
    g = gateway([fleet["large"]])
    before = fleet["large"].triton_loads("m3")
    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        answers = list(pool.map(lambda _: ask(g.url, "m3"), range(10)))
    # Ten greedy answers to one prompt from the one copy loaded: one non-empty answer.
    assert len(answers) == 10 and len(set(answers)) == 1 and answers[0]
    assert g.loads("m3") == 1
    assert fleet["large"].triton_loads("m3") == before + 1


def test_idle_ttl_unloads_on_the_schedule(
    tiny_model: Path, tmp_path: Path, gateway: GatewayFactory
) -> None:
    neuron = start_neuron(tmp_path / "ttl", "ttl", 2000, tiny_model, m1_idle_ttl_s=1)
    try:
        g = gateway([neuron], interval_s=1)
        ask(g.url, "m1")
        ask(g.url, "m2")
        wait_until(lambda: 'reason="idle_ttl"' in httpx.get(g.metrics_url).text, timeout=30)
        assert neuron.loaded() == {"m2"}  # m2 has no TTL
    finally:
        neuron.process.send_signal(signal.SIGTERM)
        neuron.process.wait(60)


def test_defragmentation_under_steady_traffic_loses_no_request(
    fleet: dict[str, NeuronProcess], gateway: GatewayFactory
) -> None:
    # medium holds m1, large holds m2: the largest free block is large's. Moving m2 next to m1
    # frees the whole of large.
    fleet["medium"].load("m1")
    fleet["large"].load("m2")
    members = [fleet["medium"], fleet["large"]]
    g = gateway(members, interval_s=2, defrag_after_cycles=1)
    failures: list[str] = []
    answered = 0
    stop_traffic = threading.Event()

    def traffic() -> None:
        nonlocal answered
        while not stop_traffic.is_set():
            try:
                ask(g.url, "m2", tokens=8)
                answered += 1
            except Exception as error:  # every failure counts against the move
                failures.append(repr(error))

    workers = [threading.Thread(target=traffic) for _ in range(3)]
    for worker in workers:
        worker.start()
    try:
        wait_until(lambda: 'reason="defrag"' in httpx.get(g.metrics_url).text, timeout=90)
        time.sleep(1.0)  # traffic keeps flowing to the new copy
    finally:
        stop_traffic.set()
        for worker in workers:
            worker.join(60)
    assert failures == []
    assert answered > 0
    assert fleet["medium"].loaded() == {"m1", "m2"}
    assert fleet["large"].loaded() == set()


def test_killed_neuron_is_routed_around(
    fleet: dict[str, NeuronProcess], gateway: GatewayFactory, tiny_model: Path, tmp_path: Path
) -> None:
    spare = start_neuron(tmp_path / "spare", "spare", 2000, tiny_model)
    g = gateway([spare, fleet["large"]])
    spare.load("m1")
    wait_until(
        lambda: (
            "spare"
            in next(m for m in httpx.get(g.url + "/models").json()["data"] if m["id"] == "m1")[
                "loaded_on"
            ]
        )
    )
    assert ask(g.url, "m1")
    os.kill(spare.process.pid, signal.SIGKILL)  # its tritonserver dies with it
    wait_until(
        lambda: (
            next(m for m in httpx.get(g.url + "/models").json()["data"] if m["id"] == "m1")[
                "loaded_on"
            ]
            == []
        ),
        timeout=10,
    )
    assert ask(g.url, "m1")  # loaded on the surviving node
    assert fleet["large"].loaded() == {"m1"}
