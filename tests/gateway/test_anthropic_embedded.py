"""The Anthropic dialect against the embedded fleet (real tritonserver, torch engine, cortex-tiny)
with the official anthropic SDK, plus the raw requests Claude Code and older SDKs send."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import anthropic
import httpx
import pytest
from anthropic.types import TextBlock
from transformers import AutoTokenizer

from tests.conftest import Embedded

TOOLS: list[dict[str, Any]] = [
    {
        "name": "read_file",
        "description": "Read a file",
        "input_schema": {
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "type": "object",
            "properties": {"path": {"type": "string"}},
            "required": ["path"],
            "additionalProperties": False,
        },
    },
    {"type": "web_search_20250305", "name": "web_search", "max_uses": 3},  # a server tool
]
BILLING = "x-anthropic-billing-header: cc_version=2.1.0.abc; cc_entrypoint=cli; cch=1234;"


@pytest.fixture(scope="module")
def root(embedded: Embedded) -> str:
    return embedded.base_url.removesuffix("/v1")


@pytest.fixture(scope="module")
def claude(root: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=root, api_key="unused", max_retries=0)


def test_non_streamed_message(claude: anthropic.Anthropic) -> None:
    message = claude.messages.create(
        model="claude-haiku-4-5-20251001",
        max_tokens=20,
        system="You answer briefly.",
        messages=[{"role": "user", "content": "What is a tuple?"}],
    )
    assert message.type == "message" and message.role == "assistant"
    assert message.id.startswith("msg_")
    assert message.model == "claude-haiku-4-5-20251001"
    assert message.stop_reason in ("end_turn", "max_tokens")
    assert [block.type for block in message.content] == ["text"]
    assert isinstance(message.content[0], TextBlock)
    assert message.content[0].text
    assert 1 <= message.usage.output_tokens <= 20
    assert message._request_id and message._request_id.startswith("req_")


def prompt_size(usage: anthropic.types.Usage) -> int:
    """The whole prompt: what count_tokens says (cache reads are part of it)."""
    return (
        usage.input_tokens
        + (usage.cache_read_input_tokens or 0)
        + (usage.cache_creation_input_tokens or 0)
    )


def test_streamed_message_matches_non_streamed(claude: anthropic.Anthropic) -> None:
    request: dict[str, Any] = {
        "model": "claude-sonnet-4-5",
        "max_tokens": 32,
        # No temperature: SDK 2.x cannot send one; the gateway then decodes greedily.
        "messages": [{"role": "user", "content": "Explain the for statement"}],
    }
    whole = claude.messages.create(**request)
    with claude.messages.stream(**request) as stream:
        kinds = [event.type for event in stream]
        streamed = stream.get_final_message()
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert kinds.count("text") > 1  # really streamed
    assert isinstance(streamed.content[0], TextBlock) and isinstance(whole.content[0], TextBlock)
    assert streamed.content[0].text == whole.content[0].text
    assert streamed.stop_reason == whole.stop_reason
    # The second run reads the prompt from the prefix cache: the prompt's parts sum the same.
    assert prompt_size(streamed.usage) == prompt_size(whole.usage)
    assert streamed.usage.output_tokens == whole.usage.output_tokens


def test_count_tokens_is_the_usage_the_request_reports(
    claude: anthropic.Anthropic, tiny_model: Path
) -> None:
    conversation: dict[str, Any] = {
        "model": "claude-sonnet-4-5",
        "system": [{"type": "text", "text": BILLING}, {"type": "text", "text": "Be terse."}],
        "messages": [
            {"role": "user", "content": "Show me setup.py"},
            {
                "role": "assistant",
                "content": [
                    {"type": "thinking", "thinking": "I should read it.", "signature": "c2ln"},
                    {
                        "type": "tool_use",
                        "id": "toolu_01",
                        "name": "read_file",
                        "input": {"path": "setup.py"},
                    },
                ],
            },
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_01", "content": "print('hi')"},
                    {
                        "type": "text",
                        "text": "Now explain it.",
                        "cache_control": {"type": "ephemeral"},
                    },
                ],
            },
        ],
        "tools": TOOLS,
    }
    counted = claude.messages.count_tokens(**conversation).input_tokens
    message = claude.messages.create(max_tokens=4, **conversation)
    assert counted == prompt_size(message.usage)

    # And it is the model's own template over the same conversation, tools included (the
    # server tool and the billing header left out, the tool result as a tool turn).
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    expected = tokenizer.apply_chat_template(
        [  # type: ignore[arg-type]  # transformers types a message as dict[str, str]
            {"role": "system", "content": "Be terse."},
            {"role": "user", "content": "Show me setup.py"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [
                    {
                        "id": "toolu_01",
                        "type": "function",
                        "function": {"name": "read_file", "arguments": {"path": "setup.py"}},
                    }
                ],
            },
            {
                "role": "tool",
                "tool_call_id": "toolu_01",
                "name": "read_file",
                "content": "print('hi')",
            },
            {"role": "user", "content": "Now explain it."},
        ],
        tools=[
            {
                "type": "function",
                "function": {
                    "name": "read_file",
                    "description": "Read a file",
                    "parameters": TOOLS[0]["input_schema"],
                },
            }
        ],
        add_generation_prompt=True,
        return_dict=False,
    )
    assert counted == len(expected)
    without_tools = claude.messages.count_tokens(
        model="claude-sonnet-4-5",
        messages=conversation["messages"],
    ).input_tokens
    assert without_tools < counted


def test_prefill_is_continued(claude: anthropic.Anthropic, tiny_model: Path) -> None:
    # Sent through the SDK and the tokenizer, whose types differ: plain JSON.
    messages: list[Any] = [
        {"role": "user", "content": "Name a keyword"},
        {"role": "assistant", "content": "The keyword is"},
    ]
    counted = claude.messages.count_tokens(model="cortex-tiny", messages=messages).input_tokens
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    prompt = tokenizer.apply_chat_template(messages, continue_final_message=True, return_dict=False)
    assert counted == len(prompt)
    message = claude.messages.create(model="cortex-tiny", max_tokens=8, messages=messages)
    assert prompt_size(message.usage) == counted


def raw_headers(**extra: str) -> dict[str, str]:
    return {"content-type": "application/json", **extra}


def test_claude_code_style_request(root: str) -> None:
    """What Claude Code posts: ?beta=true, 2023-06-01 with x-api-key and betas, system blocks
    with the billing header, inline system messages, adaptive thinking, metadata, context
    management and other fields this gateway has never heard of, a max_tokens above the
    context, and a streamed answer read with plain HTTP."""
    body = {
        "model": "claude-opus-4-7",
        "max_tokens": 10_000_000,
        "stream": True,
        "system": [
            {"type": "text", "text": BILLING},
            {
                "type": "text",
                "text": "You are Claude Code.",
                "cache_control": {"type": "ephemeral"},
            },
        ],
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "hi"}]},
            {"role": "assistant", "content": "Hello."},
            {"role": "system", "content": "<system-reminder>Be careful.</system-reminder>"},
            {"role": "user", "content": "What is a dict?"},
        ],
        "tools": TOOLS,
        "tool_choice": {"type": "auto"},
        "thinking": {"type": "adaptive"},
        "output_config": {"effort": "high"},
        "metadata": {"user_id": "user_abc_account_def_session_0000"},
        "context_management": {"edits": []},
        "temperature": 1,
        "brand_new_field": {"x": 1},
    }
    headers = raw_headers(
        **{
            "anthropic-version": "2023-06-01",
            "anthropic-beta": "claude-code-20250219,interleaved-thinking-2025-05-14,unknown-beta",
            "x-api-key": "anything",
            "x-app": "cli",
        }
    )
    with httpx.stream(
        "POST", f"{root}/v1/messages?beta=true", json=body, headers=headers, timeout=60
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["request-id"].startswith("req_")
        lines = [line for line in response.iter_lines() if line]
    names = [line.removeprefix("event: ") for line in lines if line.startswith("event: ")]
    payloads = [
        json.loads(line.removeprefix("data: ")) for line in lines if line.startswith("data: ")
    ]
    assert len(names) == len(payloads)
    assert [p["type"] for p in payloads] == names  # every event line names its data
    assert names[0] == "message_start" and names[-1] == "message_stop"
    assert names.count("message_start") == names.count("message_stop") == 1
    assert payloads[0]["message"]["usage"]["input_tokens"] > 0
    assert names[-2] == "message_delta"
    assert payloads[-2]["delta"]["stop_reason"] in ("end_turn", "max_tokens")
    assert "thinking" not in json.dumps(payloads)  # never sent unless the model thinks

    counted = httpx.post(
        f"{root}/v1/messages/count_tokens?beta=true",
        json={k: body[k] for k in ("model", "system", "messages", "tools", "thinking")},
        headers=headers,
    )
    assert counted.status_code == 200
    usage = payloads[0]["message"]["usage"]
    assert (
        counted.json()["input_tokens"] == usage["input_tokens"] + usage["cache_read_input_tokens"]
    )


def test_max_tokens_one_probe(root: str) -> None:
    response = httpx.post(
        f"{root}/v1/messages?beta=true",
        json={
            "model": "claude-haiku-4-5",
            "max_tokens": 1,
            "messages": [{"role": "user", "content": "quota"}],
        },
        headers=raw_headers(**{"anthropic-version": "2023-06-01"}),
        timeout=60,
    )
    assert response.status_code == 200
    body = response.json()
    assert body["usage"]["output_tokens"] <= 1
    assert body["stop_reason"] in ("max_tokens", "end_turn")
    assert response.headers["request-id"].startswith("req_")


def test_warm_up_probes(root: str) -> None:
    assert httpx.head(f"{root}/api/hello").status_code == 200
    assert httpx.head(f"{root}/").status_code == 200


def test_models_in_anthropic_shape(claude: anthropic.Anthropic, root: str) -> None:
    page = claude.models.list(limit=1000)
    assert sorted(m.id for m in page.data) == ["cortex-tiny", "smollm2-135m"]
    model = next(m for m in page.data if m.id == "cortex-tiny")
    assert model.type == "model" and model.display_name == "cortex-tiny"
    assert model.max_input_tokens == 32768
    assert claude.models.retrieve("cortex-tiny").id == "cortex-tiny"
    raw = httpx.get(f"{root}/v1/models", headers={"anthropic-version": "2023-06-01"}).json()
    assert raw["has_more"] is False
    assert {raw["first_id"], raw["last_id"]} == {"cortex-tiny", "smollm2-135m"}
    openai_shape = httpx.get(f"{root}/v1/models").json()
    assert openai_shape["object"] == "list" and openai_shape["data"][0]["object"] == "model"
