"""No silently ignored field: every request field of the official SDKs' request types is decided
in control_plane/fields.py, and the gateway refuses the refused ones with a 400 naming them
while it accepts the no-ops (the embedded fleet, raw HTTP so any field can be sent)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import anthropic.types.message_create_params as anthropic_messages
import httpx
import openai.types.chat.completion_create_params as openai_chat
import openai.types.completion_create_params as openai_completions
import openai.types.responses.response_create_params as openai_responses
import pytest

from control_plane.fields import FIELDS, Decision, Dialect
from tests.conftest import Embedded

SDK_TYPES = {
    Dialect.CHAT: (
        openai_chat.CompletionCreateParamsStreaming,
        openai_chat.CompletionCreateParamsNonStreaming,
    ),
    Dialect.COMPLETIONS: (
        openai_completions.CompletionCreateParamsStreaming,
        openai_completions.CompletionCreateParamsNonStreaming,
    ),
    Dialect.RESPONSES: (
        openai_responses.ResponseCreateParamsStreaming,
        openai_responses.ResponseCreateParamsNonStreaming,
    ),
    Dialect.MESSAGES: (
        anthropic_messages.MessageCreateParamsStreaming,
        anthropic_messages.MessageCreateParamsNonStreaming,
    ),
}
PATHS = {
    Dialect.CHAT: "/v1/chat/completions",
    Dialect.COMPLETIONS: "/v1/completions",
    Dialect.RESPONSES: "/v1/responses",
    Dialect.MESSAGES: "/v1/messages",
}
MINIMAL: dict[Dialect, dict[str, Any]] = {
    Dialect.CHAT: {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1},
    Dialect.COMPLETIONS: {"prompt": "hi", "max_tokens": 1},
    Dialect.RESPONSES: {"input": "hi", "max_output_tokens": 1},
    Dialect.MESSAGES: {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1},
}
# A value that asks for something, per refused field (True where any will do).
ASKING: dict[str, Any] = {
    "frequency_penalty": 0.5,
    "presence_penalty": -0.5,
    "logit_bias": {"42": 5},
    "audio": {"voice": "alloy", "format": "mp3"},
    "modalities": ["text", "audio"],
    "functions": [{"name": "f", "parameters": {"type": "object"}}],
    "function_call": "auto",
    "web_search_options": {},
    "verbosity": "low",
    "best_of": 3,
    "echo": True,
    "suffix": "}",
    "truncation": "auto",
    "previous_response_id": "resp_1",
    "conversation": "conv_1",
    "prompt": {"id": "pmpt_1"},
    "max_tool_calls": 2,
    "container": "container_1",
}


def sdk_fields(dialect: Dialect) -> set[str]:
    names: set[str] = set()
    for typed_dict in SDK_TYPES[dialect]:
        for klass in typed_dict.__mro__:
            names |= set(getattr(klass, "__annotations__", {}))
    return names


@pytest.mark.parametrize("dialect", list(Dialect))
def test_every_sdk_field_is_decided(dialect: Dialect) -> None:
    undecided = sdk_fields(dialect) - set(FIELDS[dialect])
    assert not undecided, f"decide these {dialect} fields in control_plane/fields.py: {undecided}"
    for name, rule in FIELDS[dialect].items():
        assert rule.decision is Decision.HONOURED or rule.reason, f"{name} needs its reason"


@pytest.fixture(scope="module")
def gateway(embedded: Embedded) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=embedded.base_url.removesuffix("/v1"), timeout=60) as client:
        yield client


def post(gateway: httpx.Client, dialect: Dialect, **fields: Any) -> httpx.Response:
    body = {"model": "cortex-tiny", **MINIMAL[dialect], **fields}
    return gateway.post(PATHS[dialect], json=body, headers={"anthropic-version": "2023-06-01"})


@pytest.mark.parametrize("dialect", list(Dialect))
def test_refused_fields_are_a_400_naming_them(gateway: httpx.Client, dialect: Dialect) -> None:
    refused = [n for n, r in FIELDS[dialect].items() if r.decision is Decision.REFUSED]
    assert refused
    for name in refused:
        reply = post(gateway, dialect, **{name: ASKING.get(name, True)})
        assert reply.status_code == 400, (name, reply.text)
        error = reply.json()["error"]
        assert error.get("param") == name or name in error["message"], (name, error)


@pytest.mark.parametrize("dialect", list(Dialect))
def test_no_ops_and_harmless_values_are_accepted(gateway: httpx.Client, dialect: Dialect) -> None:
    harmless = {
        name: rule.harmless[1]
        for name, rule in FIELDS[dialect].items()
        if rule.decision is Decision.REFUSED and len(rule.harmless) > 1
    }
    no_ops = {
        "store": True,
        "metadata": {"team": "a"},
        "user": "someone",
        "service_tier": "auto",
        "prompt_cache_key": "k",
        "thinking": {"type": "enabled", "budget_tokens": 1024},
        "speed": "fast",
    }
    sent = {k: v for k, v in no_ops.items() if k in FIELDS[dialect]}
    sent.update(harmless)
    reply = post(gateway, dialect, **sent)
    assert reply.status_code == 200, reply.text
