"""gpt-oss's harmony format, through `openai-harmony` (OpenAI's reference implementation, the
library gpt-oss's own tooling and vLLM use): prompts rendered from the canonical request, and
the model's output tokens parsed, as they stream, into canonical events.

A harmony completion is a run of messages on channels:

    <|channel|>analysis<|message|>…reasoning…<|end|>
    <|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city":"Oslo"}<|call|>
    <|start|>assistant<|channel|>final<|message|>…the answer…<|return|>

`analysis` becomes `ReasoningDelta`s (Anthropic `thinking` blocks, Responses `reasoning`
items, Chat Completions `reasoning_content`), `final` becomes `TextDelta`s, and a message addressed to `functions.NAME` a tool call
whose JSON arguments are checked before they are sent (as `tool_calls.py` does for the other
formats). `<|return|>` and `<|call|>` end the completion (`stop_token_ids`).

harmony tokenizes with o200k_harmony, whose base vocabulary it reads from
`$TIKTOKEN_ENCODINGS_BASE/o200k_base.tiktoken` (or downloads, which nothing here can): the
gateway writes that file from the served model's own tokenizer.json (`write_vocabulary`), and
harmony checks it against the published file's SHA-256 before using it.

A model whose `tool_call_format` is "harmony" is rendered here (`ModelTokenizer.render`) and
its output token ids are parsed here (`output.Output` hands them over undecoded: harmony's
channels are special tokens).
"""

from __future__ import annotations

import base64
import json
import os
import threading
from functools import cache
from pathlib import Path
from typing import Any

from openai_harmony import (
    Author,
    Conversation,
    DeveloperContent,
    HarmonyEncoding,
    HarmonyEncodingName,
    HarmonyError,
    ReasoningEffort,
    Role,
    StreamableParser,
    SystemContent,
    ToolDescription,
    load_harmony_encoding,
)
from openai_harmony import Message as HarmonyMessage

from control_plane.canonical import ChatRequest, Event, Message, ReasoningDelta, TextDelta
from control_plane.errors import InvalidRequest
from control_plane.prompting import fold_system_messages
from control_plane.tool_calls import as_call, call_events

VOCABULARY = "o200k_base.tiktoken"
# o200k_harmony's base vocabulary: its ranks below this; harmony's special tokens above.
BASE_VOCABULARY_SIZE = 199998
FUNCTIONS = "functions."

_lock = threading.Lock()


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet (tokenizer.json's), each printable stand-in → its byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return {chr(code): byte for byte, code in zip(printable, codes, strict=True)}


def write_vocabulary(tokenizer_json: str, folder: Path) -> Path:
    """o200k_base.tiktoken (base64 of each token's bytes, then its rank, a line each) from a
    gpt-oss tokenizer.json's byte-level vocabulary, into `folder`; harmony verifies its hash."""
    vocabulary: dict[str, int] = json.loads(tokenizer_json)["model"]["vocab"]
    decoder = _byte_decoder()
    lines = []
    for token, rank in sorted(vocabulary.items(), key=lambda item: item[1]):
        if rank >= BASE_VOCABULARY_SIZE:
            continue
        raw = bytes(decoder[character] for character in token)
        lines.append(f"{base64.b64encode(raw).decode()} {rank}\n")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / VOCABULARY
    path.write_text("".join(lines), encoding="ascii")
    return path


def encoding(vocabulary_folder: Path | None = None) -> HarmonyEncoding:
    """The gpt-oss harmony encoding, its vocabulary read from `vocabulary_folder` (else from
    what `TIKTOKEN_ENCODINGS_BASE` already names)."""
    if vocabulary_folder is not None:
        with _lock:
            os.environ["TIKTOKEN_ENCODINGS_BASE"] = str(vocabulary_folder)
    return _encoding(os.environ.get("TIKTOKEN_ENCODINGS_BASE", ""))


@cache
def _encoding(_base: str) -> HarmonyEncoding:
    try:
        return load_harmony_encoding(HarmonyEncodingName.HARMONY_GPT_OSS)
    except HarmonyError as error:
        raise RuntimeError(f"harmony's vocabulary could not be loaded: {error}") from None


def stop_token_ids(harmony: HarmonyEncoding) -> list[int]:
    """The tokens that end an assistant's completion: <|return|>, <|call|> (and <|end|>)."""
    return list(harmony.stop_tokens_for_assistant_actions())


def render(harmony: HarmonyEncoding, request: ChatRequest, effort: str = "medium") -> list[int]:
    """The prompt's token ids: a system message (reasoning effort), a developer message (the
    request's system prompt as instructions, its tools as the `functions` namespace), then the
    conversation, ending where the assistant's next message begins."""
    folded = fold_system_messages(request)
    instructions = folded[0].content if folded and folded[0].role == "system" else ""
    rest = folded[1:] if instructions else folded
    messages = [
        HarmonyMessage.from_role_and_content(
            Role.SYSTEM,
            SystemContent.new().with_reasoning_effort(ReasoningEffort(effort.capitalize())),
        )
    ]
    developer = DeveloperContent.new()
    if instructions:
        developer = developer.with_instructions(instructions)
    if request.tools:
        developer = developer.with_function_tools(
            [
                ToolDescription.new(t.name, t.description, t.parameters or None)
                for t in request.tools
            ]
        )
    if instructions or request.tools:
        messages.append(HarmonyMessage.from_role_and_content(Role.DEVELOPER, developer))
    calls: dict[str, str] = {}  # tool call id → function name, for the results
    for message in rest:
        messages.extend(_messages(message, calls))
    try:
        return list(
            harmony.render_conversation_for_completion(
                Conversation.from_messages(messages), Role.ASSISTANT
            )
        )
    except HarmonyError as error:
        raise InvalidRequest(f"messages: harmony cannot render them: {error}", "messages") from None


def _messages(message: Message, calls: dict[str, str]) -> list[HarmonyMessage]:
    if message.role == "user":
        return [HarmonyMessage.from_role_and_content(Role.USER, message.content)]
    if message.role == "assistant":
        rendered = []
        if message.reasoning:  # harmony keeps it before calls, drops it before an answer
            rendered.append(
                HarmonyMessage.from_role_and_content(
                    Role.ASSISTANT, message.reasoning
                ).with_channel("analysis")
            )
        if message.content:
            rendered.append(
                HarmonyMessage.from_role_and_content(Role.ASSISTANT, message.content).with_channel(
                    "final"
                )
            )
        for call in message.tool_calls:
            calls[call.id] = call.name
            rendered.append(
                HarmonyMessage.from_role_and_content(Role.ASSISTANT, call.arguments)
                .with_channel("commentary")
                .with_recipient(FUNCTIONS + call.name)
                .with_content_type("<|constrain|>json")
            )
        return rendered
    if message.role == "tool":
        name = message.name or calls.get(message.tool_call_id or "", "")
        if not name:
            raise InvalidRequest(
                "messages: a tool result answers no tool call of the conversation", "messages"
            )
        author = Author.new(Role.TOOL, FUNCTIONS + name)
        return [
            HarmonyMessage.from_author_and_content(author, message.content)
            .with_channel("commentary")
            .with_recipient("assistant")
        ]
    raise InvalidRequest(f"messages: role {message.role!r} cannot be rendered", "messages")


class HarmonyParser:
    """Output token ids in, canonical events out, as they stream. Reasoning and the final
    answer stream as they come; a tool call is held until its message ends, then sent if its
    arguments are a JSON object (else its text is given back, as `tool_calls.py` does)."""

    def __init__(self, harmony: HarmonyEncoding, max_calls: int | None = None) -> None:
        self.parser = StreamableParser(harmony, role=Role.ASSISTANT)
        self.max_calls = max_calls
        self.calls = 0
        self.reasoning_tokens = 0  # tokens of the analysis channel
        self._finished_messages = 0

    @property
    def done(self) -> bool:
        return self.max_calls is not None and self.calls >= self.max_calls

    def feed(self, token_ids: list[int]) -> list[Event]:
        events: list[Event] = []
        for token in token_ids:
            try:
                self.parser.process(token)
            except HarmonyError:
                # Malformed output (a model off its format): what it said so far stands.
                break
            if self.parser.current_channel == "analysis":
                self.reasoning_tokens += 1
            events.extend(self._delta())
            events.extend(self._completed())
        return events

    def finish(self) -> list[Event]:
        try:
            self.parser.process_eos()
        except HarmonyError:
            return []
        return self._completed()

    def _delta(self) -> list[Event]:
        delta = self.parser.last_content_delta
        if not delta or (self.parser.current_recipient or "").startswith(FUNCTIONS):
            return []
        if self.parser.current_channel == "analysis":
            return [ReasoningDelta(delta)]
        if self.parser.current_channel in ("final", None):
            return [TextDelta(delta)]
        return []  # commentary preambles to the user: not part of any dialect's answer

    def _completed(self) -> list[Event]:
        events: list[Event] = []
        messages = self.parser.messages
        for message in messages[self._finished_messages :]:
            recipient = message.recipient or ""
            if recipient.startswith(FUNCTIONS) and not self.done:
                events.extend(self._call(recipient[len(FUNCTIONS) :], _text(message)))
        self._finished_messages = len(messages)
        return events

    def _call(self, name: str, arguments: str) -> list[Event]:
        try:
            value: Any = json.loads(arguments) if arguments.strip() else {}
        except ValueError:
            return [TextDelta(arguments)]
        call = as_call({"name": name, "arguments": value})
        if call is None:
            return [TextDelta(arguments)]
        events: list[Event] = list(call_events(self.calls, *call))
        self.calls += 1
        return events


def _text(message: HarmonyMessage) -> str:
    return "".join(getattr(part, "text", "") for part in message.content)
