"""Prefix-aware routing end to end (issue 16): two real neuron agents of the fleet fixture
(`medium` and `large`, each with its own tritonserver) serve m3 — cortex-tiny on the torch
engine, CPU, prefix caching on — behind one gateway, and the official anthropic and openai SDKs
hold conversations through it.

Where a request ran is read from the gateway's one log line per request (its `node` field, found
by the `x-request-id` the client sent), and whether the engine reused the conversation's prefix
from what the engine itself reported (`cached_tokens` / `cache_read_input_tokens` in the
response's usage) — never from the routing code."""

from __future__ import annotations

import concurrent.futures
import re
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import cast

import anthropic
import openai
import pytest
from openai.types.chat import ChatCompletionChunk, ChatCompletionMessageParam

from tests.fleet.conftest import Gateway, NeuronProcess, fleet_gateway
from tests.fleet.test_fleet import wait_until

MODEL = "m3"
REPLICAS = ("medium", "large")
# A conversation stays on its replica unless that one has more than this many requests in
# flight beyond the other.
SLACK = 1
# Every conversation starts with this (as every Claude Code session shares its system prompt),
# long enough to fill several of the engine's 16-token KV blocks.
SYSTEM = (
    "You are a careful assistant for a Python code base. Answer briefly, quote the code you "
    "mean, and say which file it lives in. Never invent a function that is not in the code."
)


@pytest.fixture(scope="module")
def pair(
    neurons: dict[str, NeuronProcess], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    """m3 READY on both replicas before the gateway starts, and a gateway over the two."""
    for neuron in neurons.values():
        neuron.unload_all()
    with concurrent.futures.ThreadPoolExecutor() as pool:
        list(pool.map(lambda name: neurons[name].load(MODEL), REPLICAS))
    with fleet_gateway(
        tmp_path_factory.mktemp("prefix-routing"),
        [neurons[name] for name in REPLICAS],
        affinity_slack=SLACK,
    ) as gateway:
        yield gateway


def served(gateway: Gateway) -> dict[str, dict[str, str]]:
    """The gateway's request log lines so far: request id → their key=value fields."""
    lines: dict[str, dict[str, str]] = {}
    for match in re.finditer(r"request (request_id=.*)", gateway.log.read_text(errors="replace")):
        fields = dict(pair.split("=", 1) for pair in match.group(1).split() if "=" in pair)
        lines[fields["request_id"]] = fields
    return lines


def new_id() -> str:
    return f"route-{uuid.uuid4().hex}"


def openai_messages(messages: list[dict[str, str]]) -> list[ChatCompletionMessageParam]:
    return cast(
        "list[ChatCompletionMessageParam]", [{"role": "system", "content": SYSTEM}, *messages]
    )


def openai_turn(
    gateway: Gateway, messages: list[dict[str, str]], tokens: int = 8
) -> tuple[str, str, int]:
    """One turn through the openai SDK: the request id, the reply and the cached prompt tokens
    the engine reported."""
    client = openai.OpenAI(base_url=gateway.url, api_key="none", max_retries=0, timeout=120)
    request_id = new_id()
    reply = client.chat.completions.create(
        model=MODEL,
        messages=openai_messages(messages),
        max_tokens=tokens,
        extra_headers={"x-request-id": request_id},
    )
    assert reply.usage is not None and reply.usage.prompt_tokens_details is not None
    cached = reply.usage.prompt_tokens_details.cached_tokens or 0
    return request_id, reply.choices[0].message.content or "", cached


def anthropic_turn(
    gateway: Gateway, messages: list[dict[str, str]], tokens: int = 8
) -> tuple[str, str, int]:
    """One turn through the anthropic SDK, as `openai_turn`."""
    client = anthropic.Anthropic(
        base_url=gateway.url.removesuffix("/v1"), api_key="none", max_retries=0, timeout=120
    )
    request_id = new_id()
    reply = client.messages.create(
        model=MODEL,
        system=SYSTEM,
        messages=messages,  # type: ignore[arg-type]
        max_tokens=tokens,
        extra_headers={"x-request-id": request_id},
    )
    text = "".join(block.text for block in reply.content if block.type == "text")
    return request_id, text, reply.usage.cache_read_input_tokens or 0


def opening(number: int) -> str:
    return f"Conversation {number}: where is the retry loop of the request handler, and why?"


def test_turn_two_lands_where_turn_one_ran(pair: Gateway) -> None:
    turns = []
    for number, turn in enumerate([openai_turn, anthropic_turn] * 3):
        first = [{"role": "user", "content": opening(number)}]
        one, answer, _ = turn(pair, first)
        second = [
            *first,
            {"role": "assistant", "content": answer or "I do not know."},
            {"role": "user", "content": "Show me the line that sleeps between attempts."},
        ]
        two, _, cached = turn(pair, second)
        turns.append((one, two, cached))
    log = served(pair)
    for one, two, cached in turns:
        assert log[one]["node"] in REPLICAS, log[one]
        assert log[two]["node"] == log[one]["node"], (log[one], log[two])
        # The engine that served turn 2 held all of turn 1's prompt in its 16-token blocks, not
        # only the system text every conversation shares (which both replicas hold).
        assert cached >= int(log[one]["prompt_tokens"]) // 16 * 16, (log[one], log[two])
        assert log[two]["cached_prompt_tokens"] == str(cached)


def test_twenty_conversations_spread_over_both(pair: Gateway) -> None:
    ids = [
        openai_turn(pair, [{"role": "user", "content": opening(100 + n)}], 2)[0] for n in range(20)
    ]
    log = served(pair)
    nodes = Counter(log[request_id]["node"] for request_id in ids)
    assert set(nodes) == set(REPLICAS), nodes
    # Rendezvous hashing of 20 keys over two nodes; fewer than 4 on one side has a chance of
    # 0.3 % for a fair hash.
    assert min(nodes.values()) >= 4, nodes


def test_unbalanced_load_goes_to_the_least_busy_replica(pair: Gateway) -> None:
    """Two long streams of one conversation hold its replica; the next turn of that
    conversation goes to the other replica (2 in flight against 0 is beyond the slack of 1)."""
    first = [{"role": "user", "content": opening(1000)}]
    one, answer, _ = openai_turn(pair, first)
    home = served(pair)[one]["node"]
    client = openai.OpenAI(base_url=pair.url, api_key="none", max_retries=0, timeout=120)
    holders: list[str] = []
    streams: list[openai.Stream[ChatCompletionChunk]] = []
    try:
        for _ in range(SLACK + 1):
            request_id = new_id()
            stream = client.chat.completions.create(
                model=MODEL,
                messages=openai_messages(first),
                max_tokens=1500,
                temperature=1.5,
                stream=True,
                extra_headers={"x-request-id": request_id},
            )
            next(iter(stream))  # it runs on the engine now
            holders.append(request_id)
            streams.append(stream)
        second = [
            *first,
            {"role": "assistant", "content": answer or "I do not know."},
            {"role": "user", "content": "Show me the line that sleeps between attempts."},
        ]
        # Both still stream (the gateway logs a request when it ends), so the probe is routed
        # while its conversation's replica has two in flight and the other none.
        assert not set(holders) & set(served(pair)), "a holder ended early: no imbalance"
        probe, _, _ = openai_turn(pair, second)
    finally:
        for stream in streams:
            stream.close()
    wait_until(lambda: all(holder in served(pair) for holder in holders))  # cancelled now
    log = served(pair)
    assert [log[holder]["node"] for holder in holders] == [home] * len(holders), log
    other = next(name for name in REPLICAS if name != home)
    assert log[probe]["node"] == other, log[probe]
