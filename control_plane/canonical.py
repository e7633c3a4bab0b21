"""The canonical chat request and event stream. Both dialects translate into `ChatRequest` and
out of `Event`s; nothing below the adapters knows which dialect a client spoke.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from control_plane.errors import InvalidRequest
from cortex.guides import GuideType


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
    # An assistant turn's reasoning, as a client sends it back (Chat `reasoning_content`,
    # Anthropic `thinking` blocks): templates that keep it (Qwen3's, within a tool loop; harmony
    # for calls) render it, so the prompt is what the model wrote.
    reasoning: str = ""


@dataclass(frozen=True)
class Tool:
    name: str
    description: str = ""
    parameters: dict[str, Any] = field(default_factory=dict)
    # The call's arguments are constrained to `parameters` (OpenAI / Anthropic `strict`); the
    # request field that asked, for the 400 when the model's engine cannot constrain.
    strict_field: str | None = None


@dataclass(frozen=True)
class OutputFormat:
    """What the answer's text must be (a JSON schema, any JSON object, a regex, a grammar), and
    the request field that asked for it (a refusal names it)."""

    type: GuideType
    text: str
    field: str

    @property
    def is_json(self) -> bool:
        return self.type in (GuideType.JSON, GuideType.JSON_SCHEMA)


class ToolChoice(enum.StrEnum):
    AUTO = "auto"
    NONE = "none"
    REQUIRED = "required"  # any tool
    NAMED = "named"


def offered_tools(
    tools: tuple[Tool, ...], choice: ToolChoice, name: str | None
) -> tuple[Tool, ...]:
    """The tools the model is shown for a tool choice: none for NONE, only the named one for
    NAMED (so the model cannot pick another), all of them otherwise."""
    if choice is ToolChoice.NONE:
        return ()
    if choice is ToolChoice.NAMED:
        named = tuple(t for t in tools if t.name == name)
        if not named:
            raise InvalidRequest(
                f"tool_choice names {name!r}, which is not in tools", "tool_choice"
            )
        return named
    return tools


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
    tools: tuple[Tool, ...] = ()
    tool_choice: ToolChoice = ToolChoice.AUTO
    tool_choice_name: str | None = None
    parallel_tool_calls: bool = True
    output_format: OutputFormat | None = None
    # Each token's logprob with this many alternatives (0–20); None: no logprobs.
    top_logprobs: int | None = None
    # The last message is an assistant turn to continue (Anthropic prefill), not a finished one.
    continue_final: bool = False
    # Whether the client wants the model to reason before it answers: False turns a hybrid
    # model's reasoning off (Qwen3's chat template reads `enable_thinking`), None leaves it to
    # the model's default.
    reasoning: bool | None = None
    # The raw prompt of a legacy completion: rendered as is, no chat template.
    raw_prompt: str | None = None
    request_id: str = ""
    # The engine's scheduling class, smaller first: 0 interactive (the default), 1 batch. Set
    # by the gateway from the client's key (`control_plane.keys`), not by a dialect.
    priority: int = 0

    @property
    def json_mode(self) -> bool:
        """The answer must be JSON: the prompt says so too (the constraint alone leaves a model
        writing JSON it did not mean to)."""
        return self.output_format is not None and self.output_format.is_json


class FinishReason(enum.StrEnum):
    STOP = "stop"  # end token
    STOP_SEQUENCE = "stop_sequence"  # a client stop string matched
    LENGTH = "length"
    TOOL_CALLS = "tool_calls"


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    # Of prompt_tokens, those the engine read from its prefix cache instead of computing.
    cached_prompt_tokens: int = 0
    # Of completion_tokens, those the model spent reasoning (a `<think>` block, harmony's
    # analysis channel).
    reasoning_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


# ---- events -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Started:
    """The request was admitted: model resolved and prompt tokenized. Always the first event,
    before any `Waiting`, so encoders can open their stream with the real prompt size. On a
    warm model it waits for the engine's first response, which says how much of the prompt
    came from the prefix cache (Claude Code reads that from the stream's opening event)."""

    model: str
    prompt_tokens: int
    cached_prompt_tokens: int = 0


@dataclass(frozen=True)
class Waiting:
    """Nothing to say yet (a cold load, a long prefill): encoders send a keep-alive."""


@dataclass(frozen=True)
class TopLogprob:
    token: str
    logprob: float


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's text, its log-probability under the model and, when asked, the most
    likely alternatives at its position."""

    token: str
    logprob: float
    top: tuple[TopLogprob, ...] = ()


@dataclass(frozen=True)
class TextDelta:
    text: str
    # The logprobs of the tokens since the previous delta (when the request asked for them):
    # text held back by a stop string or a tool call is counted with the next delta.
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class ReasoningDelta:
    """The model's reasoning (gpt-oss's analysis channel, Qwen3's `<think>` block), before its
    answer: Anthropic `thinking` blocks (when the request asked for thinking), Chat Completions
    `reasoning_content`, Responses `reasoning` items."""

    text: str


@dataclass(frozen=True)
class ToolCallStart:
    """A new tool call. `id` is dialect-neutral; each encoder gives it its dialect's prefix
    (`call_…`, `toolu_…`), and clients echo that prefixed id back in their history."""

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


Event = Started | Waiting | TextDelta | ReasoningDelta | ToolCallStart | ToolCallDelta | Finished
