"""Prefix-cache reuse as clients see it, through the embedded fleet (`cortex serve`: real
gateway, neuron, tritonserver and torch engine on cortex-tiny), with the official SDKs.

The expected counts come from the prompts' token ids, rendered here with the gateway's own
renderer: what a later request shares with an earlier one, in whole KV blocks of 16 tokens
(the torch engine's), never its last token (the engine computes that one for its logits).
Anthropic: `cache_read_input_tokens` in message_start, the final message_delta and
non-streamed bodies, `input_tokens` the rest; OpenAI: `prompt_tokens_details.cached_tokens`
(Responses: `input_tokens_details.cached_tokens`).
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest

from build_engines.request import BuildRequest
from build_engines.request import Quantization as BuildQuantization
from build_engines.trtllm import build_command
from control_plane.anthropic.protocol import MessagesRequest
from control_plane.anthropic.translate import chat_request as anthropic_chat_request
from control_plane.node_client import GenerationParams, build_request
from control_plane.openai.protocol import ChatCompletionRequest
from control_plane.openai.translate import chat_request as openai_chat_request
from control_plane.prompting import ModelTokenizer
from cortex.config import TRTLLM_TOKENS_PER_BLOCK, EngineKind, ModelProfile
from neuron_agent.repository import render
from tests.conftest import Embedded

BLOCK = 16


@pytest.fixture(scope="module")
def root(embedded: Embedded) -> str:
    return embedded.base_url.removesuffix("/v1")


def reusable(earlier: list[int], later: list[int]) -> int:
    """Tokens of `later` an engine can read from `earlier`'s cached blocks."""
    shared = 0
    for a, b in zip(earlier, later[:-1], strict=False):
        if a != b:
            break
        shared += 1
    return shared // BLOCK * BLOCK


def anthropic_ids(tokenizer: ModelTokenizer, body: dict[str, Any]) -> list[int]:
    return tokenizer.render(anthropic_chat_request(MessagesRequest.model_validate(body), "r"))


def openai_ids(tokenizer: ModelTokenizer, body: dict[str, Any]) -> list[int]:
    return tokenizer.render(openai_chat_request(ChatCompletionRequest.model_validate(body), "r"))


def sse_events(root: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    headers = {"anthropic-version": "2023-06-01", "x-api-key": "unused"}
    with httpx.stream(
        "POST", f"{root}/v1/messages", json={**body, "stream": True}, headers=headers, timeout=120
    ) as response:
        assert response.status_code == 200
        return [
            json.loads(line.removeprefix("data: "))
            for line in response.iter_lines()
            if line.startswith("data: ")
        ]


def metric(embedded: Embedded, name: str) -> float:
    total = 0.0
    for line in httpx.get(embedded.metrics_url).text.splitlines():
        if line.startswith(name + "{") and 'model="cortex-tiny"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_both_dialects_report_the_reused_prefix(
    embedded: Embedded, root: str, tokenizer: ModelTokenizer
) -> None:
    claude = anthropic.Anthropic(base_url=root, api_key="unused", max_retries=0)
    oai = openai.OpenAI(base_url=embedded.base_url, api_key="unused", max_retries=0)
    cached_before = metric(embedded, "cortex_cached_input_tokens_total")
    # A system prompt no other test sends: its first block is new to the engine.
    system = f"Session {uuid.uuid4().hex}. " + "You answer questions about Python. " * 40
    first: dict[str, Any] = {
        "model": "cortex-tiny",
        "max_tokens": 1,
        "system": system,
        "messages": [{"role": "user", "content": "What is a generator?"}],
    }
    opened = claude.messages.create(**first)
    assert opened.usage.cache_read_input_tokens == 0
    assert opened.usage.cache_creation_input_tokens == 0
    first_ids = anthropic_ids(tokenizer, first)
    assert opened.usage.input_tokens == len(first_ids)

    # Turn 2 appends to turn 1: streamed, the count is in message_start and message_delta.
    second = {
        **first,
        "max_tokens": 4,
        "messages": [
            *first["messages"],
            {"role": "assistant", "content": "A function that yields values."},
            {"role": "user", "content": "Show one."},
        ],
    }
    second_ids = anthropic_ids(tokenizer, second)
    expected = reusable(first_ids, second_ids)
    assert expected >= len(first_ids) - BLOCK  # all of turn 1 but its last partial block
    events = sse_events(root, second)
    start = events[0]["message"]["usage"]
    delta = next(e for e in events if e["type"] == "message_delta")["usage"]
    for usage in (start, delta):
        assert usage["cache_read_input_tokens"] == expected
        assert usage["cache_creation_input_tokens"] == 0
        assert usage["input_tokens"] == len(second_ids) - expected
    counted = claude.messages.count_tokens(
        model="cortex-tiny", system=system, messages=second["messages"]
    )
    assert counted.input_tokens == len(second_ids)  # count_tokens is the whole prompt

    # The same request again, not streamed: all of it but the block holding its last token.
    again = claude.messages.create(**second)
    assert again.usage.cache_read_input_tokens == reusable(second_ids, second_ids)
    assert again.usage.input_tokens + again.usage.cache_read_input_tokens == len(second_ids)

    # OpenAI, the conversation one turn further, streamed and not.
    chat: dict[str, Any] = {
        "model": "cortex-tiny",
        "max_tokens": 2,
        "messages": [
            {"role": "system", "content": system},
            *second["messages"],
            {"role": "assistant", "content": "def count(): yield 1"},
            {"role": "user", "content": "And a second one?"},
        ],
    }
    chat_ids = openai_ids(tokenizer, chat)
    expected_chat = reusable(second_ids, chat_ids)
    assert expected_chat > expected
    stream = oai.chat.completions.create(
        **chat, stream=True, stream_options={"include_usage": True}
    )
    usage = [chunk.usage for chunk in stream if chunk.usage is not None][-1]
    assert usage.prompt_tokens == len(chat_ids)
    assert usage.prompt_tokens_details is not None
    assert usage.prompt_tokens_details.cached_tokens == expected_chat
    reply = oai.chat.completions.create(**chat)
    assert reply.usage is not None and reply.usage.prompt_tokens_details is not None
    assert reply.usage.prompt_tokens_details.cached_tokens == reusable(chat_ids, chat_ids)

    # The Responses API, the same conversation (the same prompt as Chat's): input_tokens
    # includes the cached ones, as OpenAI counts them.
    response = oai.responses.create(
        model="cortex-tiny", input=chat["messages"], max_output_tokens=16
    )
    assert response.usage is not None
    assert response.usage.input_tokens == len(chat_ids)
    assert response.usage.input_tokens_details.cached_tokens == reusable(chat_ids, chat_ids)

    reported = expected + reusable(second_ids, second_ids) + expected_chat
    reported += 2 * reusable(chat_ids, chat_ids)
    assert metric(embedded, "cortex_cached_input_tokens_total") - cached_before == reported
    assert 0 < metric(embedded, "cortex_prefix_cache_hit_ratio") < 1


def test_trtllm_engines_are_built_and_served_for_kv_cache_reuse(tmp_path: Path) -> None:
    """TensorRT-LLM reuses KV blocks only with paged context FMHA in the engine and
    `enable_kv_cache_reuse` in its model config; it reports reuse (`kv_cache_reused_blocks`,
    in blocks of the size the engine was built with) when a request sets
    `return_perf_metrics`, which its template must declare."""
    request = BuildRequest(
        checkpoint=tmp_path, quant=BuildQuantization.FP8, output=tmp_path, max_input_len=1024
    )
    command = build_command(request, tmp_path / "ckpt", tmp_path / "engine")
    assert command[command.index("--use_paged_context_fmha") + 1] == "enable"
    assert command[command.index("--tokens_per_block") + 1] == str(TRTLLM_TOKENS_PER_BLOCK)
    profile = ModelProfile(name="m", source=str(tmp_path), engine=EngineKind.TRTLLM)
    config = render(profile, tmp_path, [0], True, tmp_path / "stats.json")["config.pbtxt"].decode()
    assert 'key: "enable_kv_cache_reuse" value: { string_value: "true" }' in config
    assert '{ name: "return_perf_metrics" data_type: TYPE_BOOL' in config
    assert '{ name: "kv_cache_reused_blocks" data_type: TYPE_INT32' in config
    asked = build_request("m", [1, 2], GenerationParams(4, (2,), 0, return_perf_metrics=True), "r")
    assert "return_perf_metrics" in [tensor.name for tensor in asked.inputs]
    plain = build_request("m", [1, 2], GenerationParams(4, (2,), 0), "r")
    assert "return_perf_metrics" not in [tensor.name for tensor in plain.inputs]
