"""OpenAI dialect details against the embedded fleet (real cortex-tiny) with the openai SDK:
legacy completions, the single-model route, and how tool_choice shapes the prompt."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam, ChatCompletionToolParam
from transformers import AutoTokenizer

from tests.conftest import Embedded

TOOL: ChatCompletionToolParam = {
    "type": "function",
    "function": {
        "name": "lookup",
        "description": "Look a word up",
        "parameters": {"type": "object", "properties": {"word": {"type": "string"}}},
    },
}
# With a system message of its own, so instructions add to it rather than replace the
# template's default system text.
QUESTION: list[ChatCompletionMessageParam] = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What does yield mean?"},
]


@pytest.fixture(scope="module")
def client(embedded: Embedded) -> openai.OpenAI:
    return openai.OpenAI(base_url=embedded.base_url, api_key="unused", max_retries=0)


def test_completion_prompt_is_tokenized_as_is(client: openai.OpenAI, tiny_model: Path) -> None:
    prompt = "def add(a, b):"
    reply = client.completions.create(model="cortex-tiny", prompt=prompt, max_tokens=5)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    expected = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    assert reply.usage is not None and reply.usage.prompt_tokens == expected
    pieces = [
        chunk.choices[0].text
        for chunk in client.completions.create(
            model="cortex-tiny", prompt=prompt, max_tokens=5, stream=True
        )
        if chunk.choices
    ]
    assert "".join(pieces) == reply.choices[0].text


def test_single_model_route(client: openai.OpenAI) -> None:
    assert client.models.retrieve("cortex-tiny").id == "cortex-tiny"
    assert client.models.retrieve("claude-opus-4-7").id == "claude-opus-4-7"  # an alias
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")


def prompt_tokens(client: openai.OpenAI, **extra: Any) -> int:
    reply = client.chat.completions.create(
        model="cortex-tiny",
        messages=QUESTION,
        max_tokens=1,
        **extra,
    )
    assert reply.usage is not None
    tokens: int = reply.usage.prompt_tokens
    return tokens


def test_tool_choice_shapes_the_prompt(client: openai.OpenAI) -> None:
    plain = prompt_tokens(client)
    auto = prompt_tokens(client, tools=[TOOL])
    assert auto > plain  # the tools are rendered by the model's template
    assert prompt_tokens(client, tools=[TOOL], tool_choice="none") == plain
    required = prompt_tokens(client, tools=[TOOL], tool_choice="required")
    named = prompt_tokens(
        client, tools=[TOOL], tool_choice={"type": "function", "function": {"name": "lookup"}}
    )
    assert required > auto and named > auto  # told to call, as no grammar can force it here
    allowed = prompt_tokens(
        client,
        tools=[TOOL],
        tool_choice={
            "type": "allowed_tools",
            "allowed_tools": {
                "mode": "auto",
                "tools": [{"type": "function", "function": {"name": "x"}}],
            },
        },
    )
    assert allowed == plain  # no allowed tool left to show
    assert prompt_tokens(client, response_format={"type": "json_object"}) > plain
