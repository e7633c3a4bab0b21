"""A large prompt costs its sender, not everyone (issue 31), on a real gateway and neuron.

The engine is the fixed-rate FAKE (tests/fakes/fixed_rate_llm: tokens on an absolute schedule,
so any gap a client sees beyond its interval is the gateway's), with cortex-tiny's tokenizer.
A prompt that cannot fit the context is refused before it is tokenized, and meanwhile another
client's stream keeps its pace; a body beyond what the gateway reads is answered with a 413 in
the dialect's envelope, not a dropped connection.
"""

from __future__ import annotations

import itertools
import json
import shutil
import statistics
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from tokenizers import Tokenizer

from control_plane.app import MAX_BODY_BYTES
from cortex.config import ModelProfile, ToolCallFormat
from cortex.launch import loopback_gateway, loopback_neuron, running_gateway, running_neuron

FAKES = Path(__file__).resolve().parents[1] / "fakes"
MODEL = "fixed-rate"
CONTEXT = 2048
INTERVAL_S = 0.03
STREAM_TOKENS = 120


@dataclass
class Fleet:
    url: str


@pytest.fixture(scope="module")
def fleet(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    folder = tmp_path_factory.mktemp("large-prompts")
    source = folder / "source"
    source.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model / name, source / name)
    for name in ("chat_template.jinja", "generation_config.json"):
        if (tiny_model / name).exists():
            shutil.copy(tiny_model / name, source / name)
    words = Tokenizer.from_file(str(tiny_model / "tokenizer.json")).encode(
        " the lamp over the harbour", add_special_tokens=False
    )
    settings = {"first_token_s": 0.01, "token_interval_s": INTERVAL_S, "token_ids": words.ids}
    (source / "fixed_rate.json").write_text(json.dumps(settings), encoding="utf-8")
    profile = ModelProfile(
        name=MODEL,
        source=str(source),
        template=str(FAKES / "fixed_rate_llm"),
        context_length=CONTEXT,
        tool_call_format=ToolCallFormat.NONE,
    )
    node = loopback_neuron(folder / "node", "node", [profile])
    with running_neuron(node) as neuron:
        config = loopback_gateway({"node": neuron.url}, poll_interval_s=0.5)
        with running_gateway(folder / "cortex.toml", config, neurons_up=True) as gateway:
            yield Fleet(gateway.url)


def stream_gaps(url: str) -> list[float]:
    """Seconds between the chunks of one streamed answer, after its first."""
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Tell me about the harbour."}],
        "max_tokens": STREAM_TOKENS,
        "stream": True,
    }
    arrivals: list[float] = []
    with (
        httpx.Client(timeout=60) as client,
        client.stream("POST", f"{url}/v1/chat/completions", json=body) as response,
    ):
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: {"):
                arrivals.append(time.monotonic())
    assert len(arrivals) >= STREAM_TOKENS // 2
    return [b - a for a, b in itertools.pairwise(arrivals[1:])]


def huge_chat(megabytes: int) -> bytes:
    text = "the quick brown fox jumps over the lazy dog " * (megabytes * 2**20 // 44)
    body = {"model": MODEL, "messages": [{"role": "user", "content": text}], "max_tokens": 8}
    return json.dumps(body).encode()


def test_prompts_that_cannot_fit_are_refused_without_stalling_other_streams(
    fleet: Fleet,
) -> None:
    stream_gaps(fleet.url)  # warm: the tokenizer is fetched and built on the first request
    alone = stream_gaps(fleet.url)
    refusals: list[httpx.Response] = []
    body = huge_chat(1)

    def send_huge() -> None:
        # Each sender's prompts go out while the stream runs (it lasts about 3.6 s).
        with httpx.Client(timeout=120) as client:
            for _ in range(2):
                time.sleep(0.3)
                response = client.post(
                    f"{fleet.url}/v1/chat/completions",
                    content=body,
                    headers={"content-type": "application/json"},
                )
                refusals.append(response)

    senders = [threading.Thread(target=send_huge) for _ in range(3)]
    for sender in senders:
        sender.start()
    try:
        loaded = stream_gaps(fleet.url)
    finally:
        for sender in senders:
            sender.join(120)
    assert len(refusals) == 6
    for response in refusals:
        assert response.status_code == 400
        error = response.json()["error"]
        assert error["code"] == "context_length_exceeded"
        # Refused from its characters, before tokenizing ("at least": a lower bound).
        assert "resulted in at least" in error["message"]
        assert f"maximum context length is {CONTEXT} tokens" in error["message"]
    # The fake paces tokens on an absolute schedule: what stretches a gap is the gateway. Gaps
    # are compared within this run only, as ratios (the median, and the slowest tenth). (What
    # is left on the loop per refusal is parsing the body: a few ms for 1 MB.)
    assert statistics.median(loaded) <= 2 * statistics.median(alone)
    slow = sorted(alone)[-len(alone) // 10 :]
    slow_loaded = sorted(loaded)[-len(loaded) // 10 :]
    assert statistics.mean(slow_loaded) <= 2 * max(statistics.mean(slow), INTERVAL_S)


@pytest.mark.parametrize(("dialect", "framing"), [("openai", "length"), ("anthropic", "chunked")])
def test_a_body_beyond_the_limit_gets_a_413_in_the_dialects_envelope(
    fleet: Fleet, dialect: str, framing: str
) -> None:
    """With a Content-Length the gateway answers before reading the body; chunked, once the
    body passes the limit. Either way the client reads a 413 (the SDKs' httpx reads the
    response even when the server stops reading the body)."""
    size = MAX_BODY_BYTES + 86 * 2**20  # 150 MiB with the default limit
    path, headers = "/v1/chat/completions", {"content-type": "application/json"}
    if dialect == "anthropic":
        path = "/v1/messages"
        headers |= {"anthropic-version": "2023-06-01"}
    whole = b'{"model": "fixed-rate", "messages": [], "padding": "' + b" " * size + b'"}'
    body: bytes | Iterator[bytes] = whole
    if framing == "chunked":  # httpx sends an iterator's body chunked
        body = (whole[i : i + 2**20] for i in range(0, len(whole), 2**20))
    with httpx.Client(timeout=120) as client:
        response = client.post(f"{fleet.url}{path}", content=body, headers=headers)
    assert response.status_code == 413
    error = response.json()
    if dialect == "anthropic":
        assert error["type"] == "error"
        assert error["error"]["type"] == "request_too_large"
    else:
        assert error["error"]["type"] == "invalid_request_error"
        assert error["error"]["code"] == "request_too_large"
