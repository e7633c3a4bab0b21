"""The canonical chat request and event stream. Both dialects translate into `ChatRequest` and
out of `Event`s; nothing below the adapters knows which dialect a client spoke.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text, as the model wrote it


@dataclass(frozen=True)
class Message:
    role: str  # system | user | assistant | tool
    content: str = ""
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None
    name: str | None = None


@dataclass(frozen=True)
class Tool:
    name: str
    description: str = ""
    parameters: dict[str, Any] = field(default_factory=dict)


class ToolChoice(enum.StrEnum):
    AUTO = "auto"
    NONE = "none"
    REQUIRED = "required"  # any tool
    NAMED = "named"


@dataclass(frozen=True)
class ChatRequest:
    model: str
    messages: tuple[Message, ...]
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stream: bool = False
    tools: tuple[Tool, ...] = ()
    tool_choice: ToolChoice = ToolChoice.AUTO
    tool_choice_name: str | None = None
    parallel_tool_calls: bool = True
    json_mode: bool = False
    # The raw prompt of a legacy completion: rendered as is, no chat template.
    raw_prompt: str | None = None
    request_id: str = ""


class FinishReason(enum.StrEnum):
    STOP = "stop"  # end token
    STOP_SEQUENCE = "stop_sequence"  # a client stop string matched
    LENGTH = "length"
    TOOL_CALLS = "tool_calls"
    CANCELLED = "cancelled"


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


# ---- events -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Started:
    """The request was admitted: model resolved and prompt tokenized."""

    model: str
    prompt_tokens: int


@dataclass(frozen=True)
class Waiting:
    """Nothing to say yet (a cold load, a long prefill): encoders send a keep-alive."""


@dataclass(frozen=True)
class TextDelta:
    text: str


@dataclass(frozen=True)
class ToolCallStart:
    index: int
    id: str
    name: str


@dataclass(frozen=True)
class ToolCallDelta:
    index: int
    arguments: str


@dataclass(frozen=True)
class Finished:
    reason: FinishReason
    usage: Usage
    stop_sequence: str | None = None


Event = Started | Waiting | TextDelta | ToolCallStart | ToolCallDelta | Finished
