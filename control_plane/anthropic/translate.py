"""Anthropic requests → canonical requests; canonical events → a Message body or its SSE stream.

Conversation rules follow the real API and what Claude Code sends (reference §1.2, §3.3–3.5):
the billing-header system block is dropped (it changes on every request and would defeat prefix
caching), `tool_result` blocks become tool messages placed before the rest of their user turn,
consecutive turns of one role are merged, and a final assistant turn is a prefill to continue.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from control_plane.anthropic.protocol import (
    ContentBlock,
    Conversation,
    CountTokensRequest,
    DocumentBlock,
    ImageBlock,
    MessagesRequest,
    TextBlock,
    ThinkingBlock,
    ToolParam,
    ToolResultBlock,
    ToolUseBlock,
)
from control_plane.canonical import (
    ChatRequest,
    Finished,
    FinishReason,
    Message,
    ReasoningDelta,
    Started,
    TextDelta,
    Tool,
    ToolCall,
    ToolCallDelta,
    ToolCallStart,
    ToolChoice,
    Waiting,
    offered_tools,
)
from control_plane.errors import InvalidRequest
from control_plane.structured import output_format

BILLING_HEADER = "x-anthropic-billing-header"
STOP_REASONS = {
    FinishReason.STOP: "end_turn",
    FinishReason.STOP_SEQUENCE: "stop_sequence",
    FinishReason.LENGTH: "max_tokens",
    FinishReason.TOOL_CALLS: "tool_use",
}
EMPTY_SCHEMA: dict[str, Any] = {"type": "object", "properties": {}}


def tool_use_id_for(neutral_id: str) -> str:
    """The Anthropic spelling of a generated call id; clients echo it back as it is."""
    return f"toolu_{neutral_id}"


# ---- requests ---------------------------------------------------------------------------------


def _block_text(block: ContentBlock, path: str) -> str | None:
    """The text a block contributes to a turn, None for blocks a text model has no use for."""
    if isinstance(block, TextBlock):
        return block.text
    if isinstance(block, ImageBlock):
        raise InvalidRequest(f"{path}: images are not supported by text-only models", path)
    if isinstance(block, DocumentBlock):
        source = block.source
        if source.get("type") == "text":
            text = str(source.get("data", ""))
        elif source.get("type") == "content":
            inner = source.get("content")
            text = inner if isinstance(inner, str) else _plain_text(inner)
        else:
            raise InvalidRequest(f"{path}: only text documents are supported", f"{path}.source")
        return f"{block.title}\n\n{text}" if block.title else text
    # redacted_thinking, server-tool results, …: nothing a local model can read (an assistant
    # turn's thinking is read apart, as its reasoning: `_turns`).
    return None


def _plain_text(blocks: Any) -> str:
    if not isinstance(blocks, list):
        return ""
    return "\n\n".join(str(b.get("text", "")) for b in blocks if isinstance(b, dict))


def _joined(blocks: list[ContentBlock], path: str) -> str:
    texts = (_block_text(block, f"{path}.{i}") for i, block in enumerate(blocks))
    return "\n\n".join(text for text in texts if text)


def _system_prompt(blocks: list[ContentBlock]) -> str:
    texts = []
    for index, block in enumerate(blocks):
        text = _block_text(block, f"system.{index}")
        if text and not text.startswith(BILLING_HEADER):
            texts.append(text)
    return "\n\n".join(texts)


def _turns(body: Conversation) -> list[Message]:
    messages: list[Message] = []
    tool_names: dict[str, str] = {}
    for number, turn in enumerate(body.messages):
        path = f"messages.{number}.content"
        if turn.role == "system":
            messages.append(Message(role="system", content=_joined(turn.content, path)))
        elif turn.role == "assistant":
            texts, calls, thoughts = [], [], []
            for index, block in enumerate(turn.content):
                if isinstance(block, ToolUseBlock):
                    tool_names[block.id] = block.name
                    arguments = json.dumps(block.input, ensure_ascii=False, separators=(",", ":"))
                    calls.append(ToolCall(block.id, block.name, arguments))
                elif isinstance(block, ThinkingBlock):
                    # Echoed thinking: its text goes back into the prompt, its signature is
                    # not read (cortex's are digests, not attestations; `signature_for`).
                    thought = (block.model_extra or {}).get("thinking")
                    if block.type == "thinking" and isinstance(thought, str) and thought:
                        thoughts.append(thought)
                else:
                    text = _block_text(block, f"{path}.{index}")
                    if text:
                        texts.append(text)
            messages.append(
                Message(
                    role="assistant",
                    content="\n\n".join(texts),
                    tool_calls=tuple(calls),
                    reasoning="\n\n".join(thoughts),
                )
            )
        else:
            texts = []
            for index, block in enumerate(turn.content):
                if isinstance(block, ToolResultBlock):
                    # One tool message per result, in order, ahead of the turn's other text.
                    result = _joined(block.content, f"{path}.{index}.content")
                    messages.append(
                        Message(
                            role="tool",
                            content=f"Error: {result}" if block.is_error else result,
                            tool_call_id=block.tool_use_id,
                            name=tool_names.get(block.tool_use_id),
                        )
                    )
                else:
                    text = _block_text(block, f"{path}.{index}")
                    if text:
                        texts.append(text)
            if texts or not turn.content:
                messages.append(Message(role="user", content="\n\n".join(texts)))
    return _merge_same_role(messages)


def _merge_same_role(messages: list[Message]) -> list[Message]:
    """Consecutive user (or assistant) turns are one turn, as the API treats them."""
    merged: list[Message] = []
    for message in messages:
        previous = merged[-1] if merged else None
        if (
            previous is not None
            and message.role == previous.role
            and message.role in ("user", "assistant")
            and not previous.tool_calls
        ):
            content = "\n\n".join(t for t in (previous.content, message.content) if t)
            reasoning = "\n\n".join(t for t in (previous.reasoning, message.reasoning) if t)
            merged[-1] = Message(
                role=message.role,
                content=content,
                tool_calls=message.tool_calls,
                reasoning=reasoning,
            )
        else:
            merged.append(message)
    return merged


def _tools(tools: list[ToolParam] | None) -> tuple[Tool, ...]:
    # Server tools (web search, code execution, …) cannot run here: they are left out.
    return tuple(
        Tool(
            tool.name,
            tool.description,
            tool.input_schema or EMPTY_SCHEMA,
            f"tools.{index}.strict" if tool.strict else None,
        )
        for index, tool in enumerate(tools or [])
        if tool.input_schema is not None or tool.type in (None, "custom")
    )


def chat_request(body: MessagesRequest | CountTokensRequest, request_id: str) -> ChatRequest:
    messages = _turns(body)
    system = _system_prompt(body.system)
    if system:
        messages.insert(0, Message(role="system", content=system))
    choice, named, parallel = ToolChoice.AUTO, None, True
    if body.tool_choice is not None:
        choice = {
            "auto": ToolChoice.AUTO,
            "any": ToolChoice.REQUIRED,
            "tool": ToolChoice.NAMED,
            "none": ToolChoice.NONE,
        }[body.tool_choice.type]
        named = body.tool_choice.name if choice is ToolChoice.NAMED else None
        parallel = not body.tool_choice.disable_parallel_tool_use
    tools = offered_tools(_tools(body.tools), choice, named)
    if body.output_format is not None:
        answer_format = output_format(body.output_format, "output_format")
    else:
        answer_format = output_format(
            (body.output_config or {}).get("format"), "output_config.format"
        )
    if (
        messages
        and messages[-1].role == "assistant"
        and not (messages[-1].content or messages[-1].tool_calls)
    ):
        messages.pop()  # an empty prefill (say, only echoed thinking) is no prefill
    last = messages[-1] if messages else None
    generation: dict[str, Any] = {}
    if isinstance(body, MessagesRequest):
        generation = {
            "max_tokens": body.max_tokens,
            "temperature": body.temperature,
            "top_p": body.top_p,
            "top_k": body.top_k,
            "stop": tuple(body.stop_sequences or ()),
        }
    return ChatRequest(
        model=body.model,
        messages=tuple(messages),
        tools=tools,
        tool_choice=choice,
        tool_choice_name=named,
        parallel_tool_calls=parallel,
        output_format=answer_format,
        continue_final=last is not None and last.role == "assistant" and not last.tool_calls,
        # As on Anthropic's API, a model thinks only when asked to (its thinking is sent only
        # then): a hybrid model is told not to otherwise.
        reasoning=Thinking.asked(body.thinking).shown,
        request_id=request_id,
        **generation,
    )


# ---- responses --------------------------------------------------------------------------------


def usage_fields(prompt_tokens: int, cached_tokens: int, output_tokens: int) -> dict[str, int]:
    """Anthropic usage; its three prompt parts sum to the whole prompt.
    `cache_read_input_tokens` came from the engine's prefix cache. `cache_creation_input_tokens`
    counts tokens written to a cache entry that a `cache_control` breakpoint created; cortex's
    cache is automatic (every full block is kept, at no extra cost, with no entry to create),
    so it is 0 and every prompt token not read from the cache is `input_tokens`."""
    return {
        "input_tokens": prompt_tokens - cached_tokens,
        "output_tokens": output_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": cached_tokens,
    }


def usage_body(finished: Finished) -> dict[str, int]:
    usage = finished.usage
    return usage_fields(usage.prompt_tokens, usage.cached_prompt_tokens, usage.completion_tokens)


def _tool_input(arguments: str) -> dict[str, Any]:
    value = json.loads(arguments) if arguments else {}
    return value if isinstance(value, dict) else {}


@dataclass(frozen=True)
class Thinking:
    """What a request asked to see of the model's reasoning (its `thinking` field): nothing
    (absent, disabled: clients such as Zed's parse no thinking block), the blocks, or the blocks
    with their text left out (`display: "omitted"`)."""

    shown: bool = False
    omitted: bool = False

    @classmethod
    def asked(cls, setting: dict[str, Any] | None) -> Thinking:
        setting = setting or {}
        shown = setting.get("type") in ("enabled", "adaptive")
        return cls(shown, shown and setting.get("display") == "omitted")


def signature_for(thinking: str) -> str:
    """A thinking block's `signature`. Anthropic's is an encrypted attestation of the thinking;
    a local model has none, so cortex signs nothing: the signature is a SHA-256 digest of the
    text, marked as such. Non-empty, because clients expect one, and sent back unchanged in
    later turns, where the gateway reads neither the block nor its signature."""
    return "cortex-sha256:" + hashlib.sha256(thinking.encode()).hexdigest()


def thinking_block(thinking: str, omitted: bool = False) -> dict[str, Any]:
    shown = "" if omitted else thinking
    return {"type": "thinking", "thinking": shown, "signature": signature_for(thinking)}


def message_body(
    message_id: str,
    model: str,
    text: str,
    calls: list[tuple[str, str, str]],
    finished: Finished,
    reasoning: str = "",
    thinking: Thinking | None = None,
) -> dict[str, Any]:
    """A whole message: its thinking block (when the request asked for thinking and the model
    reasoned), its text, its tool_use blocks."""
    content: list[dict[str, Any]] = []
    if reasoning and thinking is not None and thinking.shown:
        content.append(thinking_block(reasoning, thinking.omitted))
    if text:
        content.append({"type": "text", "text": text})
    content.extend(
        {"type": "tool_use", "id": tool_use_id_for(call_id), "name": name, "input": _tool_input(a)}
        for call_id, name, a in calls
    )
    return {
        "id": message_id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": STOP_REASONS[finished.reason],
        "stop_sequence": finished.stop_sequence,
        "usage": usage_body(finished),
    }


# json.dumps(text, ensure_ascii=False) for a str, without making an encoder per call.
_json_text = json.JSONEncoder(ensure_ascii=False).encode


def _sse(name: str, data: dict[str, Any]) -> bytes:
    payload = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"event: {name}\ndata: {payload}\n\n".encode()


class MessageStreamEncoder:
    """Canonical events → Anthropic SSE bytes: message_start, then each content block as
    start/deltas/stop in order, message_delta with the stop reason and usage, message_stop.
    Tool input goes only into `input_json_delta` fragments: clients ignore a block start's
    `input`, so it is always `{}` there. Reasoning, when the request asked for thinking, is a
    thinking block of `thinking_delta`s closed by one `signature_delta` (`signature_for`)."""

    def __init__(self, message_id: str, model: str, thinking: Thinking | None = None) -> None:
        self.message_id = message_id
        self.model = model
        self.thinking = thinking or Thinking()
        self.blocks = 0  # content blocks opened so far
        self.open: str | None = None  # kind of the open block
        self.tool_blocks: dict[int, int] = {}  # canonical call index → block index
        self.thought: list[str] = []  # the open thinking block's text, for its signature

    def event(self, event: object) -> bytes:
        if isinstance(event, Started):
            return _sse("message_start", self._start(event))
        if isinstance(event, Waiting):
            return self.ping()
        if isinstance(event, ReasoningDelta):
            if not event.text or not self.thinking.shown:
                return b""
            out = b""
            if self.open != "thinking":
                out = self._open({"type": "thinking", "thinking": "", "signature": ""})
                self.thought = []
            self.thought.append(event.text)
            if self.thinking.omitted:
                return out
            delta = {"type": "thinking_delta", "thinking": event.text}
            return out + self._delta(self.blocks - 1, delta)
        if isinstance(event, TextDelta):
            if not event.text:
                return b""
            out = b"" if self.open == "text" else self._open({"type": "text", "text": ""})
            return out + self._text_delta(self.blocks - 1, event.text)
        if isinstance(event, ToolCallStart):
            block = {
                "type": "tool_use",
                "id": tool_use_id_for(event.id),
                "name": event.name,
                "input": {},
            }
            out = self._open(block)
            self.tool_blocks[event.index] = self.blocks - 1
            return out
        if isinstance(event, ToolCallDelta):
            index = self.tool_blocks[event.index]
            return self._delta(index, {"type": "input_json_delta", "partial_json": event.arguments})
        if isinstance(event, Finished):
            ending = {
                "stop_reason": STOP_REASONS[event.reason],
                "stop_sequence": event.stop_sequence,
            }
            return (
                self._close()
                + _sse(
                    "message_delta",
                    {"type": "message_delta", "delta": ending, "usage": usage_body(event)},
                )
                + _sse("message_stop", {"type": "message_stop"})
            )
        return b""

    def _start(self, event: Started) -> dict[str, Any]:
        message: dict[str, Any] = {
            "id": self.message_id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": usage_fields(event.prompt_tokens, event.cached_prompt_tokens, 0),
        }
        return {"type": "message_start", "message": message}

    def _open(self, block: dict[str, Any]) -> bytes:
        out = self._close()
        self.open = block["type"]
        self.blocks += 1
        start = {"type": "content_block_start", "index": self.blocks - 1, "content_block": block}
        return out + _sse("content_block_start", start)

    def _close(self) -> bytes:
        if self.open is None:
            return b""
        out = b""
        if self.open == "thinking":
            signature = signature_for("".join(self.thought))
            delta = {"type": "signature_delta", "signature": signature}
            out = self._delta(self.blocks - 1, delta)
        self.open = None
        stop = {"type": "content_block_stop", "index": self.blocks - 1}
        return out + _sse("content_block_stop", stop)

    @staticmethod
    def _delta(index: int, delta: dict[str, Any]) -> bytes:
        return _sse(
            "content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta}
        )

    @staticmethod
    def _text_delta(index: int, text: str) -> bytes:
        """`_delta(index, {"type": "text_delta", "text": text})`, byte for byte: the per-token
        hot path, without building and dumping the whole event."""
        return (
            b'event: content_block_delta\ndata: {"type":"content_block_delta","index":'
            + str(index).encode()
            + b',"delta":{"type":"text_delta","text":'
            + _json_text(text).encode()
            + b"}}\n\n"
        )

    @staticmethod
    def ping() -> bytes:
        return _sse("ping", {"type": "ping"})

    @staticmethod
    def error(body: dict[str, Any]) -> bytes:
        """The stream's last event when it fails after it started (no message_stop follows)."""
        return _sse("error", body)
