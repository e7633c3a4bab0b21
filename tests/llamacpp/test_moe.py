"""A mixture-of-experts architecture end to end: a tiny random `qwen3moe` checkpoint, converted to
GGUF by llama.cpp's own converter in this session (tests/llamacpp/models.py), served by the
llamacpp engine through the gateway, with the tokenizer and chat template the gateway read from
the file's metadata: a tool call comes back as one, and greedy tokens off the planted call equal
llama.cpp's own generation from the same file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import openai
import pytest
from openai.types.chat import ChatCompletionMessageFunctionToolCall, ChatCompletionToolParam

from neuron_agent.engines.llamacpp.gguf_info import read_info
from tests.llamacpp.conftest import LlamaCppFleet, standalone, standalone_greedy

WEATHER: ChatCompletionToolParam = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {}},
    },
}


def test_the_file_is_a_mixture_of_experts(moe_gguf: Path) -> None:
    info = read_info(moe_gguf)
    assert info.architecture == "qwen3moe" and info.layers == 2


def test_a_tool_call_comes_back_as_one(oai_llamacpp: openai.OpenAI) -> None:
    reply = oai_llamacpp.chat.completions.create(
        model="tiny-moe",
        messages=[{"role": "user", "content": "What is the weather in Paris?"}],
        tools=[WEATHER],
        max_tokens=40,
        temperature=0,
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.tool_calls is not None and len(choice.message.tool_calls) == 1
    call = choice.message.tool_calls[0]
    assert isinstance(call, ChatCompletionMessageFunctionToolCall)
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {}


def test_greedy_tokens_equal_llama_cpp_standalone(
    oai_llamacpp: openai.OpenAI, llamacpp_fleet: LlamaCppFleet
) -> None:
    """A raw completion prompt off the planted chain: what the random experts say."""
    reference = standalone(llamacpp_fleet.moe_gguf)
    prompt = "The experts disagree about"
    reply = oai_llamacpp.completions.create(
        model="tiny-moe", prompt=prompt, max_tokens=16, temperature=0
    )
    tokens = standalone_greedy(reference, reference.tokenize(prompt.encode(), add_bos=False), 16)
    expected = reference.detokenize(tokens).decode("utf-8", errors="replace")
    assert reply.usage is not None and reply.usage.completion_tokens == len(tokens)
    assert reply.choices[0].text == expected


@pytest.fixture(scope="module", autouse=True)
def _warm(oai_llamacpp: openai.OpenAI) -> Any:
    return oai_llamacpp
