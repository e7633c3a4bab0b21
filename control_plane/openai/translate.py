"""OpenAI requests → canonical requests; canonical events → OpenAI bodies and chunks."""

from __future__ import annotations

import json
import time
from typing import Any

from control_plane.canonical import (
    ChatRequest,
    Finished,
    FinishReason,
    Message,
    ReasoningDelta,
    TextDelta,
    TokenLogprob,
    Tool,
    ToolCall,
    ToolCallDelta,
    ToolCallStart,
    ToolChoice,
    Usage,
    offered_tools,
)
from control_plane.errors import InvalidRequest
from control_plane.hosted_tools import is_hosted
from control_plane.openai.protocol import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    ToolSpec,
)
from control_plane.structured import output_format

FINISH_REASONS = {
    FinishReason.STOP: "stop",
    FinishReason.STOP_SEQUENCE: "stop",
    FinishReason.LENGTH: "length",
    FinishReason.TOOL_CALLS: "tool_calls",
}


def _content_text(message: ChatMessage, index: int) -> str:
    content = message.content
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts = []
    for number, part in enumerate(content):
        kind = part.get("type")
        if kind in ("text", "input_text"):
            parts.append(str(part.get("text", "")))
        elif kind in ("image_url", "input_image", "input_audio", "file"):
            raise InvalidRequest(
                f"content part type {kind!r} is not supported by text-only models",
                param=f"messages[{index}].content[{number}]",
            )
    return "".join(parts)


def _stops(stop: str | list[str] | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    return (stop,) if isinstance(stop, str) else tuple(stop)


def _echoed_reasoning(message: ChatMessage) -> str:
    """An assistant message's reasoning as clients send it back: `reasoning_content` (what
    cortex sends; DeepSeek, Zed) or vLLM's newer `reasoning`."""
    extra = message.model_extra or {}
    for key in ("reasoning_content", "reasoning"):
        if isinstance(extra.get(key), str) and extra[key]:
            return str(extra[key])
    return ""


def chat_request(body: ChatCompletionRequest, request_id: str) -> ChatRequest:
    messages = []
    for index, message in enumerate(body.messages):
        role = {"developer": "system", "function": "tool"}.get(message.role, message.role)
        calls = tuple(
            ToolCall(call.id, call.function.name, call.function.arguments)
            for call in message.tool_calls or []
        )
        messages.append(
            Message(
                role=role,
                content=_content_text(message, index),
                tool_calls=calls,
                tool_call_id=message.tool_call_id,
                name=message.name,
                reasoning=_echoed_reasoning(message),
            )
        )
    choice, named, tools = _tool_choice(body.tool_choice, _tools(body.tools))
    tools = offered_tools(tools, choice, named)
    return ChatRequest(
        model=body.model,
        messages=tuple(messages),
        max_tokens=body.max_completion_tokens or body.max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        seed=body.seed,
        stop=_stops(body.stop),
        tools=tools,
        tool_choice=choice,
        tool_choice_name=named,
        parallel_tool_calls=body.parallel_tool_calls,
        output_format=output_format(body.response_format, "response_format"),
        top_logprobs=_top_logprobs(body),
        reasoning=wants_reasoning(body.reasoning_effort),
        request_id=request_id,
    )


def wants_reasoning(effort: Any) -> bool | None:
    """A reasoning effort as the model can take it: "none" turns a hybrid model's reasoning
    off, any other effort on (the models served here have no budget to scale), none given
    leaves it to the model."""
    if effort is None:
        return None
    return bool(effort != "none")


def _tools(tools: list[ToolSpec] | None) -> tuple[Tool, ...]:
    """The function tools the model sees; hosted ones are left out (`hosted_tools`)."""
    offered = []
    for index, tool in enumerate(tools or []):
        if is_hosted(tool.type):
            continue
        if tool.type != "function":
            raise InvalidRequest(
                f"tool type {tool.type!r} is not supported: cortex serves function tools (the "
                "client runs them); hosted tools are left out",
                param=f"tools[{index}].type",
            )
        if tool.function is None:
            raise InvalidRequest(
                "a function tool needs its `function`", param=f"tools[{index}].function"
            )
        spec = tool.function
        strict = f"tools[{index}].function.strict" if spec.strict else None
        offered.append(Tool(spec.name, spec.description, spec.parameters, strict))
    return tuple(offered)


def hosted_tools(body: ChatCompletionRequest) -> list[str]:
    """The hosted tool types the request offers, which the model does not see."""
    return [tool.type for tool in body.tools or [] if is_hosted(tool.type)]


def _top_logprobs(body: ChatCompletionRequest) -> int | None:
    if not body.logprobs:
        if body.top_logprobs:
            raise InvalidRequest("top_logprobs needs logprobs: true", "top_logprobs")
        return None
    return body.top_logprobs or 0


def logprobs_content(entries: list[TokenLogprob]) -> list[dict[str, Any]]:
    """Chat's (and Responses') per-token logprobs."""
    return [
        {
            "token": entry.token,
            "logprob": entry.logprob,
            "bytes": list(entry.token.encode()),
            "top_logprobs": [
                {"token": top.token, "logprob": top.logprob, "bytes": list(top.token.encode())}
                for top in entry.top
            ],
        }
        for entry in entries
    ]


def completion_logprobs(entries: list[TokenLogprob], offset: int = 0) -> dict[str, Any]:
    """Completions' older shape: parallel lists, the alternatives as {token: logprob}."""
    offsets = []
    for entry in entries:
        offsets.append(offset)
        offset += len(entry.token)
    return {
        "tokens": [entry.token for entry in entries],
        "token_logprobs": [entry.logprob for entry in entries],
        "top_logprobs": [{top.token: top.logprob for top in entry.top} for entry in entries],
        "text_offset": offsets,
    }


def _tool_choice(
    value: str | dict[str, Any] | None, tools: tuple[Tool, ...]
) -> tuple[ToolChoice, str | None, tuple[Tool, ...]]:
    """(choice, named tool, tools allowed) from every tool_choice form OpenAI defines."""
    if value is None:
        return ToolChoice.AUTO, None, tools
    if isinstance(value, str):
        if value in ("auto", "none", "required"):
            return ToolChoice(value), None, tools
        raise InvalidRequest(
            "tool_choice must be 'auto', 'none', 'required' or a named function", "tool_choice"
        )
    kind = value.get("type")
    if kind in ("function", "custom"):
        name = (value.get(kind) or {}).get("name")
        if isinstance(name, str) and name:
            return ToolChoice.NAMED, name, tools
        raise InvalidRequest(f"tool_choice.{kind}.name is required", f"tool_choice.{kind}.name")
    if kind == "allowed_tools":
        allowed = value.get("allowed_tools") or {}
        names = {
            (entry.get("function") or entry.get("custom") or {}).get("name")
            for entry in allowed.get("tools") or []
            if isinstance(entry, dict)
        }
        mode = ToolChoice.REQUIRED if allowed.get("mode") == "required" else ToolChoice.AUTO
        return mode, None, tuple(t for t in tools if t.name in names)
    if isinstance(kind, str) and is_hosted(kind):
        raise InvalidRequest(
            f"tool_choice forces the hosted tool {kind!r}, which cortex cannot run (only tools "
            "the client runs are served here)",
            "tool_choice.type",
        )
    raise InvalidRequest(f"tool_choice type {kind!r} is not supported", "tool_choice.type")


def completion_request(body: CompletionRequest, request_id: str) -> ChatRequest:
    prompt = body.prompt if isinstance(body.prompt, str) else "".join(body.prompt)
    return ChatRequest(
        model=body.model,
        messages=(),
        raw_prompt=prompt,
        max_tokens=body.max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        seed=body.seed,
        stop=_stops(body.stop),
        output_format=output_format(body.response_format, "response_format"),
        top_logprobs=body.logprobs,
        request_id=request_id,
    )


def call_id_for(neutral_id: str) -> str:
    """The OpenAI spelling of a generated call id; clients echo it back as it is."""
    return f"call_{neutral_id}"


def usage_body(usage: Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
        # Of prompt_tokens, those read from the engine's prefix cache.
        "prompt_tokens_details": {"cached_tokens": usage.cached_prompt_tokens},
        # Of completion_tokens, those the model spent reasoning.
        "completion_tokens_details": {"reasoning_tokens": usage.reasoning_tokens},
    }


def chat_completion(
    request_id: str,
    model: str,
    text: str,
    calls: list[tuple[str, str, str]],
    finished: Finished,
    logprobs: list[TokenLogprob] | None = None,
    reasoning: str = "",
) -> dict[str, Any]:
    """A whole chat completion; a reasoning model's reasoning is the message's
    `reasoning_content` (as vLLM, SGLang and DeepSeek send it, and Zed reads it)."""
    message: dict[str, Any] = {"role": "assistant", "content": text or None}
    if reasoning:
        message["reasoning_content"] = reasoning
    if calls:
        message["tool_calls"] = [
            {
                "id": call_id_for(call_id),
                "type": "function",
                "function": {"name": name, "arguments": arguments},
            }
            for call_id, name, arguments in calls
        ]
    elif not text:
        message["content"] = ""
    return {
        "id": request_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": message,
                "logprobs": None
                if logprobs is None
                else {"content": logprobs_content(logprobs), "refusal": None},
                "finish_reason": FINISH_REASONS[finished.reason],
            }
        ],
        "usage": usage_body(finished.usage),
    }


class ChunkEncoder:
    """Canonical events → `chat.completion.chunk` SSE lines (bytes); reasoning as
    `delta.reasoning_content`."""

    def __init__(
        self, request_id: str, model: str, include_usage: bool, created: int | None = None
    ) -> None:
        self.request_id = request_id
        self.model = model
        self.include_usage = include_usage
        self.created = int(time.time()) if created is None else created
        self._prefix = (
            '{"id":'
            + json.dumps(request_id)
            + ',"object":"chat.completion.chunk","created":'
            + str(self.created)
            + ',"model":'
            + json.dumps(model)
            + ',"system_fingerprint":null,'
        ).encode()
        # A text chunk is the per-token hot path: its bytes around the text, made once. They
        # are exactly what `_chunk` writes for it (a test holds the two to each other).
        ending = (b',"usage":null' if include_usage else b"") + b"}\n\n"
        self._text_head = b"data: " + self._prefix + b'"choices":[{"index":0,"delta":{"content":'
        self._text_tail = b'},"logprobs":null,"finish_reason":null}]' + ending

    def _chunk(self, choices: list[dict[str, Any]], usage: dict[str, Any] | None = None) -> bytes:
        body = {"choices": choices}
        if self.include_usage:
            body["usage"] = usage  # type: ignore[assignment]
        return (
            b"data: "
            + self._prefix
            + json.dumps(body, separators=(",", ":"))[1:].encode()
            + b"\n\n"
        )

    def start(self) -> bytes:
        return self._chunk(
            [
                {
                    "index": 0,
                    "delta": {"role": "assistant", "content": ""},
                    "logprobs": None,
                    "finish_reason": None,
                }
            ]
        )

    def event(self, event: object) -> bytes:
        if isinstance(event, TextDelta):
            if event.logprobs:
                logprobs = {"content": logprobs_content(list(event.logprobs)), "refusal": None}
                return self._chunk(
                    [
                        {
                            "index": 0,
                            "delta": {"content": event.text},
                            "logprobs": logprobs,
                            "finish_reason": None,
                        }
                    ]
                )
            if not event.text:
                return b""
            return self._text_head + json.dumps(event.text).encode() + self._text_tail
        delta: dict[str, Any]
        if isinstance(event, ReasoningDelta):
            if not event.text:
                return b""
            delta = {"reasoning_content": event.text}
        elif isinstance(event, ToolCallStart):
            delta = {
                "tool_calls": [
                    {
                        "index": event.index,
                        "id": call_id_for(event.id),
                        "type": "function",
                        "function": {"name": event.name, "arguments": ""},
                    }
                ]
            }
        elif isinstance(event, ToolCallDelta):
            delta = {
                "tool_calls": [{"index": event.index, "function": {"arguments": event.arguments}}]
            }
        elif isinstance(event, Finished):
            out = self._chunk(
                [
                    {
                        "index": 0,
                        "delta": {},
                        "logprobs": None,
                        "finish_reason": FINISH_REASONS[event.reason],
                    }
                ]
            )
            if self.include_usage:
                out += self._chunk([], usage_body(event.usage))
            return out
        else:
            return b""
        return self._chunk([{"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}])

    @staticmethod
    def keep_alive() -> bytes:
        return b": keep-alive\n\n"

    @staticmethod
    def done() -> bytes:
        return b"data: [DONE]\n\n"

    @staticmethod
    def error(body: dict[str, Any]) -> bytes:
        return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"


def completion_body(
    request_id: str,
    model: str,
    text: str,
    finished: Finished,
    logprobs: list[TokenLogprob] | None = None,
) -> dict[str, Any]:
    return {
        "id": request_id,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "text": text,
                "logprobs": None if logprobs is None else completion_logprobs(logprobs),
                "finish_reason": FINISH_REASONS[finished.reason],
            }
        ],
        "usage": usage_body(finished.usage),
    }


def completion_chunk(
    request_id: str,
    model: str,
    text: str,
    finish: str | None,
    logprobs: dict[str, Any] | None = None,
) -> bytes:
    body = {
        "id": request_id,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}],
    }
    return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"
