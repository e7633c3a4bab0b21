"""A node dies mid-stream on a fleet with auth on: its stream ends with an error event, and every
request after that, for its models, the pinned one and the others, answers 200 (issue 27).

Three real neurons (budgets 800 / 1400 / 1400 MiB: one, two and two tiny-model copies) with
bearer tokens, a gateway with an API key, the official SDKs with their retries off, so a
refusal the gateway makes reaches the test instead of being retried away. The fleet is this
module's own: the test kills one of its neurons."""

from __future__ import annotations

import concurrent.futures
import os
import signal
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import anthropic
import openai
import pytest

from cortex.config import EvictionSection, NeuronRef
from cortex.launch import loopback_gateway, running_gateway
from tests.fleet.conftest import NeuronProcess, start_tier_neuron

API_KEY = "sk-cortex-test-key"
BUDGETS = {"a": 800, "b": 1400, "c": 1400}


@pytest.fixture(scope="module")
def neurons(
    tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, NeuronProcess]]:
    root = tmp_path_factory.mktemp("node-loss")
    with ExitStack() as stack, concurrent.futures.ThreadPoolExecutor() as pool:
        futures = {
            name: pool.submit(
                start_tier_neuron,
                root / name,
                name,
                budget,
                tiny_model,
                pinned_on=(),
                token=f"token-of-{name}",
            )
            for name, budget in BUDGETS.items()
        }
        started = {}
        for name, future in futures.items():
            started[name] = future.result()
            stack.callback(started[name].stop)
        yield started


def openai_client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


def ask(url: str, model: str) -> str:
    reply = openai_client(url).chat.completions.create(
        model=model, messages=[{"role": "user", "content": "hello"}], max_tokens=4
    )
    return reply.choices[0].message.content or ""


def ask_anthropic(url: str, model: str) -> str:
    client = anthropic.Anthropic(base_url=url, api_key=API_KEY, max_retries=0, timeout=120)
    reply = client.messages.create(
        model=model, messages=[{"role": "user", "content": "hello"}], max_tokens=4
    )
    return "".join(block.text for block in reply.content if block.type == "text")


def test_a_node_killed_mid_stream_costs_that_stream_only(
    neurons: dict[str, NeuronProcess], tmp_path: Path
) -> None:
    a, b, c = neurons["a"], neurons["b"], neurons["c"]
    # b holds m2 and the pinned model; c is full of idle, unpinned models; a is empty.
    b.load("pin")
    b.load("m2")
    c.load("m1")
    c.load("m3")
    config = loopback_gateway(
        {},
        eviction=EvictionSection(interval_s=3600),
        # Polls far apart: the gateway learns of the death from the requests that meet it.
        poll_interval_s=60,
        missed_polls_down=2,
        load_timeout_s=120,
        api_keys=(API_KEY,),
    ).model_copy(
        update={
            "neurons": tuple(
                NeuronRef(name=n.name, endpoint=n.url, token=n.config.neuron.token)
                for n in (a, b, c)
            )
        }
    )
    with running_gateway(tmp_path / "cortex.toml", config, neurons_up=True) as gateway:
        stream = openai_client(gateway.url).chat.completions.create(
            model="m2",
            messages=[{"role": "user", "content": "The"}],
            # Sampled, the tiny model rarely draws its end token: a stream of a thousand tokens
            # that is still going when its node is killed.
            temperature=1.0,
            seed=7,
            max_tokens=1000,
            stream=True,
        )
        text = ""
        with pytest.raises(openai.APIError):
            for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    if not text:
                        os.kill(b.process.pid, signal.SIGKILL)  # its tritonserver dies with it
                    text += chunk.choices[0].delta.content
        assert text  # the stream had started: it ended with an error event, not a 5xx

        # Every request from here on answers: the dead node's models, the pinned one, others,
        # one at a time and all at once, through both dialects.
        for model in ("m2", "pin", "m1", "m3", "m2"):
            assert ask(gateway.url, model)
        assert ask_anthropic(gateway.url, "pin")
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda m: ask(gateway.url, m), ["m1", "m2", "m3", "pin"] * 2))
        assert all(answers)
        # The pinned model came back on a surviving node by itself.
        assert any("pin" in n.loaded() for n in (a, c))
        log = gateway.log.read_text()
        assert "neuron b is down" in log and "before its first token" in log
        assert "cannot place" not in log
