"""Prompting on the gateway side: each model's chat template and tokenizer (files fetched from the
neuron that serves it), incremental UTF-8-safe detokenization, and exact stop strings.

transformers renders chat templates (the reference implementation of the Jinja dialect models
ship); `tokenizers.decoders.DecodeStream` detokenizes one id at a time and only returns text once
a character is complete.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

from tokenizers.decoders import DecodeStream

from control_plane.canonical import ChatRequest, Message
from cortex.neuron_api import TokenizerFiles

JSON_MODE_INSTRUCTION = "Respond with a single valid JSON object and nothing else."


class ModelTokenizer:
    def __init__(self, files: TokenizerFiles) -> None:
        from transformers import AutoTokenizer

        with tempfile.TemporaryDirectory(prefix="cortex-tokenizer-") as folder:
            for name, text in files.files.items():
                if name != "config.json":
                    (Path(folder) / name).write_text(text, encoding="utf-8")
            self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.context_length = files.context_length
        self.eos_token_ids = list(files.eos_token_ids)
        if (
            self.tokenizer.eos_token_id is not None
            and self.tokenizer.eos_token_id not in self.eos_token_ids
        ):
            self.eos_token_ids.append(int(self.tokenizer.eos_token_id))
        self.pad_token_id = (
            files.pad_token_id if files.pad_token_id is not None else self.tokenizer.pad_token_id
        )
        self.backend = self.tokenizer.backend_tokenizer

    def render(self, request: ChatRequest) -> list[int]:
        """The prompt's token ids: the chat template over messages and tools."""
        if request.raw_prompt is not None:
            return list(self.backend.encode(request.raw_prompt, add_special_tokens=False).ids)
        messages = [_template_message(m) for m in fold_system_messages(request)]
        tools: list[Any] | None = [
            {
                "type": "function",
                "function": {
                    "name": tool.name,
                    "description": tool.description,
                    "parameters": tool.parameters,
                },
            }
            for tool in request.tools
        ] or None
        ids = self.tokenizer.apply_chat_template(
            messages, tools=tools, add_generation_prompt=True, tokenize=True, return_dict=False
        )
        return [int(i) for i in ids]  # type: ignore[arg-type]

    def decode(self, ids: list[int]) -> str:
        return str(self.backend.decode(ids, skip_special_tokens=True))

    def stream_decoder(self, prompt_ids: list[int]) -> IncrementalDecoder:
        return IncrementalDecoder(self, prompt_ids)


def fold_system_messages(request: ChatRequest) -> list[Message]:
    """One leading system message (chat templates expect it first): later system messages are
    folded into it in order — clients such as Claude Code send them mid-conversation."""
    system = [m.content for m in request.messages if m.role == "system" and m.content]
    if request.json_mode:
        system.append(JSON_MODE_INSTRUCTION)
    rest = [m for m in request.messages if m.role != "system"]
    if system:
        return [Message(role="system", content="\n\n".join(system)), *rest]
    return rest


def _template_message(message: Message) -> dict[str, Any]:
    rendered: dict[str, Any] = {"role": message.role, "content": message.content}
    if message.tool_calls:
        rendered["tool_calls"] = [
            {
                "id": call.id,
                "type": "function",
                "function": {"name": call.name, "arguments": _arguments(call.arguments)},
            }
            for call in message.tool_calls
        ]
    if message.tool_call_id:
        rendered["tool_call_id"] = message.tool_call_id
    if message.name:
        rendered["name"] = message.name
    return rendered


def _arguments(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


class IncrementalDecoder:
    """Token ids in, complete text out; `finish` flushes what a final partial character left."""

    def __init__(self, tokenizer: ModelTokenizer, prompt_ids: list[int]) -> None:
        self.tokenizer = tokenizer
        self.stream = DecodeStream(skip_special_tokens=True)
        self.ids: list[int] = []
        self.emitted = 0

    def step(self, token_id: int) -> str:
        self.ids.append(token_id)
        piece = self.stream.step(self.tokenizer.backend, token_id)
        if piece:
            self.emitted += len(piece)
            return str(piece)
        return ""

    def finish(self) -> str:
        full = self.tokenizer.decode(self.ids)
        rest = full[self.emitted :]
        self.emitted = len(full)
        return rest


class StopMatcher:
    """Cuts generated text exactly at the first client stop string, holding back any tail that
    could still become one."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = tuple(s for s in stops if s)
        self.buffer = ""
        self.matched: str | None = None

    def feed(self, text: str) -> str:
        if not self.stops:
            return text
        self.buffer += text
        first: tuple[int, str] | None = None
        for stop in self.stops:
            position = self.buffer.find(stop)
            if position >= 0 and (first is None or position < first[0]):
                first = (position, stop)
        if first is not None:
            self.matched = first[1]
            out, self.buffer = self.buffer[: first[0]], ""
            return out
        hold = 0
        for stop in self.stops:
            for size in range(min(len(stop) - 1, len(self.buffer)), 0, -1):
                if self.buffer.endswith(stop[:size]):
                    hold = max(hold, size)
                    break
        out = self.buffer[: len(self.buffer) - hold]
        self.buffer = self.buffer[len(self.buffer) - hold :]
        return out

    def flush(self) -> str:
        out, self.buffer = self.buffer, ""
        return out


def describe(request: ChatRequest) -> dict[str, Any]:
    """The request as plain data (logs, tests)."""
    return asdict(request)
