"""A second fleet for gateway tests, from config files: a real neuron agent (with its real
tritonserver) serving the replay fake (tests/fakes/replay_llm) with cortex-tiny's tokenizer and
cortex-tiny itself on the torch engine (`SLEEPER`, for sleep and wake), and a real gateway in
front of it with an API key, short timeouts and fast keep-alives. Started once per session;
tests drive it with the official SDKs."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest

from control_plane.prompting import ModelTokenizer
from cortex.config import KeyRecord, ModelProfile, ReasoningFormat, ToolCallFormat
from cortex.launch import loopback_gateway, loopback_neuron, running_gateway, running_neuron
from cortex.neuron_api import TokenizerFiles

FAKES = Path(__file__).resolve().parents[1] / "fakes"
API_KEY = "sk-test-cortex"
# Named keys ([[keys]]) beside the plain API_KEY, for tests/gateway/test_keys.py and the console.
KEYS: dict[str, dict[str, Any]] = {
    "admin": {"key": "sk-admin", "admin": True},
    "viewer": {"key": "sk-viewer", "models": ["replay-llama3"]},
    "two-a-minute": {"key": "sk-rpm", "rpm": 2},
    "few-tokens": {"key": "sk-tpm", "tpm": 300},
    "one-at-a-time": {"key": "sk-single", "max_concurrent": 1},
    "background": {"key": "sk-batch", "priority": "batch"},
}
CONTEXT_LENGTH = 2048
SLEEPER = "tiny-torch"  # cortex-tiny on the torch engine, beside the replay fakes
REQUEST_TIMEOUT_S = 2.0
PING_INTERVAL_S = 0.3

PARIS_CALL = '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}'
# As Qwen3 writes them: a line break inside each tag, a blank line before the answer.
THOUGHT = "The user asks for France's capital. A <tool_call> written here is no call."
ANSWER = "The capital of France is Paris."
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
# As Qwen3-Coder writes a call: every value between line breaks, strings unquoted.
CODER_CALL = (
    "<tool_call>\n<function=get_forecast>\n<parameter=city>\nSão Paulo\n</parameter>\n"
    "<parameter=days>\n3\n</parameter>\n<parameter=hourly>\ntrue\n</parameter>\n"
    '<parameter=fields>\n["temp", "wind"]\n</parameter>\n</function>\n</tool_call>'
)
# The replay fake's script: the first rule whose `when` the latest user turn contains answers.
RULES: list[dict[str, object]] = [
    {"when": "weather in Paris", "reply": f"<tool_call>\n{PARIS_CALL}\n</tool_call>"},
    {
        "when": "weather in two cities",
        "reply": (
            "Checking both.\n<tool_call>\n"
            '{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
            '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
        ),
    },
    {"when": "weather in Rome", "reply": '{"name": "get_weather", "parameters": {"city": "Rome"}}'},
    # Qwen3's reasoning (replay-qwen3 reasons): a call tag inside it is no call.
    {"when": "think about the capital", "reply": f"<think>\n{THOUGHT}\n</think>\n\n{ANSWER}"},
    {"when": "think, then call", "reply": f"<think>\n{THOUGHT}\n</think>\n\n{CALL}"},
    # Qwen3-Coder's XML call (replay-qwen3-coder parses it; the others give it back as text).
    {"when": "forecast for São Paulo", "reply": f"Let me look that up.\n{CODER_CALL}"},
    {"when": "<tool_response>", "reply": "The tool answered: {turn}"},
    {"when": "count with a stop", "reply": "one two three STOP four five"},
    {"when": "echo the prompt", "reply": "{turn}"},
    {"when": "which priority", "reply": "served as {priority}"},
    {"when": "take your time", "reply": "Ready now.", "first_delay_s": 1.0},
    {"when": "leave before the answer", "reply": "Nobody is listening.", "first_delay_s": 1.0},
    {"when": "never finish", "reply": "Too late.", "first_delay_s": 4.0},
    {
        "when": "break mid-stream",
        "reply": "Half of an answer that will not",
        "fail_after": 3,
        "error": "CUDA error: an illegal memory access was encountered",
    },
    {
        "when": "crowded",
        "reply": "unused",
        "fail_after": 0,
        "error": "the request queue is full (256 waiting); try again later",
        "error_kind": "overloaded",
    },
    {"when": "", "reply": "Hello from the replay fake."},
]


@dataclass
class ReplayFleet:
    root_url: str  # for the anthropic SDK and raw HTTP (no /v1)
    openai_url: str  # for the openai SDK (with /v1)
    metrics_url: str
    api_key: str
    tokenizer_dir: Path
    replay_source: Path  # the fake's folder: replay.json, and cancelled.log as it fills
    gateway_log: Path
    neuron_log: Path
    neuron_url: str
    models_file: Path  # the neuron's models.toml (it re-reads it when it changes)
    neuron_pid: int


def _replay_models(folder: Path, tiny_model: Path) -> list[ModelProfile]:
    """The replay fake's source folder (cortex-tiny's tokenizer and the script), and the
    profiles that serve it: each a different model output format over the same script."""
    source = folder / "replay-source"
    source.mkdir()
    for name in (
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ):
        shutil.copy(tiny_model / name, source / name)
    script = {"turn_marker": "<|im_start|>user", "rules": RULES}
    (source / "replay.json").write_text(json.dumps(script, indent=1), encoding="utf-8")
    auto = ReasoningFormat.AUTO  # cortex-tiny's template knows no <think>: none
    profiles = [
        ("replay-hermes", ToolCallFormat.HERMES, auto, ("claude-replay", "claude-*")),
        ("replay-llama3", ToolCallFormat.LLAMA3_JSON, auto, ()),
        ("replay-qwen3", ToolCallFormat.HERMES, ReasoningFormat.THINK, ()),
        ("replay-qwen3-coder", ToolCallFormat.QWEN3_CODER, auto, ()),
    ]
    fakes = [
        ModelProfile(
            name=name,
            aliases=aliases,
            source=str(source),
            template=str(FAKES / "replay_llm"),
            context_length=CONTEXT_LENGTH,
            tool_call_format=tool_format,
            reasoning=reasoning,
        )
        for name, tool_format, reasoning, aliases in profiles
    ]
    # cortex-tiny on the real torch engine: the one model here that can sleep (the replay
    # fake's own model.py serves no control socket, so the catalogue says it cannot).
    sleeper = ModelProfile(
        name=SLEEPER, source=str(tiny_model), context_length=CONTEXT_LENGTH, kv_cache_tokens=2048
    )
    return [*fakes, sleeper]


@pytest.fixture(scope="session")
def replay_fleet(
    tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ReplayFleet]:
    folder = tmp_path_factory.mktemp("replay-fleet")
    node = loopback_neuron(folder / "node", "replay-node", _replay_models(folder, tiny_model))
    with running_neuron(node) as neuron:
        config = loopback_gateway(
            {"replay-node": neuron.url},
            api_keys=(API_KEY,),
            poll_interval_s=0.5,
            request_timeout_s=REQUEST_TIMEOUT_S,
            ping_interval_s=PING_INTERVAL_S,
        )
        records = tuple(KeyRecord(name=name, **record) for name, record in KEYS.items())
        config = config.model_copy(update={"keys": records})
        with running_gateway(folder / "cortex.toml", config) as gateway:
            yield ReplayFleet(
                root_url=gateway.url,
                openai_url=f"{gateway.url}/v1",
                metrics_url=gateway.metrics_url,
                api_key=API_KEY,
                tokenizer_dir=tiny_model,
                replay_source=folder / "replay-source",
                gateway_log=gateway.log,
                neuron_log=neuron.log,
                neuron_url=neuron.url,
                models_file=neuron.folder / "models.toml",
                neuron_pid=neuron.process.pid,
            )


@pytest.fixture(scope="session")
def oai(replay_fleet: ReplayFleet) -> openai.OpenAI:
    """The official OpenAI SDK on the replay fleet (no retries: each test sees what happened)."""
    return openai.OpenAI(
        base_url=replay_fleet.openai_url, api_key=replay_fleet.api_key, max_retries=0
    )


@pytest.fixture(scope="session")
def claude(replay_fleet: ReplayFleet) -> anthropic.Anthropic:
    """The official Anthropic SDK on the replay fleet."""
    return anthropic.Anthropic(
        base_url=replay_fleet.root_url, api_key=replay_fleet.api_key, max_retries=0
    )


@pytest.fixture(scope="session")
def tokenizer(tiny_model: Path) -> ModelTokenizer:
    """cortex-tiny's tokenizer as the gateway renders with it (no server)."""
    names = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
    files = {n: (tiny_model / n).read_text() for n in names if (tiny_model / n).exists()}
    return ModelTokenizer(
        TokenizerFiles(
            model="cortex-tiny",
            files=files,
            context_length=32768,
            eos_token_ids=[2],
            pad_token_id=0,
        )
    )
