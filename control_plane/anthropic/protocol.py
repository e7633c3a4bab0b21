"""Anthropic Messages wire models (requests). Every model accepts unknown fields: clients such
as Claude Code add new ones (`context_management`, `output_config`, `cache_control` on any block)
all the time, and a gateway that rejects them breaks those clients.

Content is normalised on the way in: a string where blocks may stand becomes one text block, so
the translation sees only blocks. Block types we do not model (server-tool results,
`search_result`, `tool_reference`, …) validate as `OtherBlock` instead of failing.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    field_validator,
    model_validator,
)


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="allow")


class TextBlock(_Lenient):
    type: Literal["text"]
    text: str


class ImageBlock(_Lenient):
    type: Literal["image"]
    source: dict[str, Any]


class DocumentBlock(_Lenient):
    type: Literal["document"]
    source: dict[str, Any]
    title: str | None = None
    context: str | None = None


class ToolUseBlock(_Lenient):
    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any] = Field(default_factory=dict)


class ToolResultBlock(_Lenient):
    type: Literal["tool_result"]
    tool_use_id: str
    content: list[ContentBlock] = Field(default_factory=list)
    is_error: bool = False

    @field_validator("content", mode="before")
    @classmethod
    def _blocks(cls, value: Any) -> Any:
        return _as_blocks(value)


class ThinkingBlock(_Lenient):
    """`thinking` and `redacted_thinking` blocks clients echo back from earlier turns."""

    type: Literal["thinking", "redacted_thinking"]


class OtherBlock(_Lenient):
    type: str


BLOCK_TAGS = ("text", "image", "document", "tool_use", "tool_result", "thinking", "other")


def _block_tag(value: Any) -> str:
    kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    if kind == "redacted_thinking":
        return "thinking"
    return kind if kind in BLOCK_TAGS else "other"


ContentBlock = Annotated[
    Annotated[TextBlock, Tag("text")]
    | Annotated[ImageBlock, Tag("image")]
    | Annotated[DocumentBlock, Tag("document")]
    | Annotated[ToolUseBlock, Tag("tool_use")]
    | Annotated[ToolResultBlock, Tag("tool_result")]
    | Annotated[ThinkingBlock, Tag("thinking")]
    | Annotated[OtherBlock, Tag("other")],
    Discriminator(_block_tag),
]


# The tool_result block holds blocks itself: resolve its forward reference now.
ToolResultBlock.model_rebuild()


def _as_blocks(value: Any) -> Any:
    if isinstance(value, str):
        return [{"type": "text", "text": value}]
    return [] if value is None else value


class MessageParam(_Lenient):
    # "system" inside messages: the 2026-10-21 API allows it and Claude Code sends it anyway.
    role: Literal["user", "assistant", "system"]
    content: list[ContentBlock]

    @field_validator("content", mode="before")
    @classmethod
    def _blocks(cls, value: Any) -> Any:
        return _as_blocks(value)


class ToolParam(_Lenient):
    name: str
    description: str = ""
    # Absent on server tools (`web_search_20250305`, `bash_20250124`, …).
    input_schema: dict[str, Any] | None = None
    type: str | None = None
    strict: bool | None = None


class ToolChoiceParam(_Lenient):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool = False

    @model_validator(mode="after")
    def _named(self) -> ToolChoiceParam:
        if self.type == "tool" and not self.name:
            raise ValueError("a tool choice of type 'tool' needs the tool's name")
        return self


class Conversation(_Lenient):
    """What both /v1/messages and /v1/messages/count_tokens take."""

    model: str
    messages: list[MessageParam] = Field(min_length=1)
    system: list[ContentBlock] = Field(default_factory=list)
    tools: list[ToolParam] | None = None
    tool_choice: ToolChoiceParam | None = None
    # enabled / adaptive: a reasoning model's reasoning comes back as thinking blocks (its
    # budget is not honoured: the models served here have none to set).
    thinking: dict[str, Any] | None = None
    output_config: dict[str, Any] | None = None
    # The structured-outputs beta's spelling of output_config.format.
    output_format: dict[str, Any] | None = None
    metadata: dict[str, Any] | None = None

    @field_validator("system", mode="before")
    @classmethod
    def _blocks(cls, value: Any) -> Any:
        return _as_blocks(value)


class CountTokensRequest(Conversation):
    pass


class MessagesRequest(Conversation):
    max_tokens: int = Field(ge=1)
    stop_sequences: list[str] | None = None
    stream: bool = False
    # Removed from the 2026-10-21 API, still sent under 2023-06-01: accepted and honoured.
    temperature: float | None = Field(default=None, ge=0, le=1)
    top_p: float | None = Field(default=None, ge=0, le=1)
    top_k: int | None = Field(default=None, ge=0)


def field_path(loc: tuple[int | str, ...]) -> str:
    """Pydantic's error location as Anthropic spells it (`messages.0.content.1.text`), without
    the block tags the discriminated union adds after a list index."""
    parts: list[str] = []
    previous: int | str | None = None
    for part in loc:
        if isinstance(part, str) and isinstance(previous, int) and part in BLOCK_TAGS:
            previous = part
            continue
        parts.append(str(part))
        previous = part
    return ".".join(parts)
