"""OpenAI Responses wire models (requests). Every model accepts unknown fields: Codex and the SDK
add new ones (`include`, `prompt_cache_key`, `client_metadata`, `text.verbosity`, …) all the
time, and a gateway that rejects them breaks those clients.

Input items and tools are discriminated by `type`; item and tool types we do not model validate
as `OtherItem` / `OtherTool`, so the translation can refuse them with a 400 that names the type
and its place, instead of a validation error about missing fields.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Discriminator, Field, Tag


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="allow")


def _as_parts(value: Any) -> Any:
    """A string where parts may stand is one text part, so the translation sees only parts."""
    return [{"type": "input_text", "text": value}] if isinstance(value, str) else value


def _as_items(value: Any) -> Any:
    """A string input is one user message."""
    return [{"role": "user", "content": value}] if isinstance(value, str) else value


Parts = Annotated[list[dict[str, Any]], BeforeValidator(_as_parts)]


class MessageItem(_Lenient):
    """A turn: `{"role", "content"}` with or without `"type": "message"`; content is a string
    or parts (`input_text`, `output_text`, `refusal`, `input_image`, `input_file`)."""

    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: Parts


class FunctionCallItem(_Lenient):
    """A call the model made earlier, echoed back by the client."""

    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str = ""
    namespace: str | None = None  # set when the function came from a namespace tool


class FunctionCallOutputItem(_Lenient):
    """What the client's tool returned for `call_id`."""

    type: Literal["function_call_output"]
    call_id: str
    output: Parts


class CustomToolCallItem(_Lenient):
    """A call of a custom (freeform) tool the model made earlier: its input is plain text."""

    type: Literal["custom_tool_call"]
    call_id: str
    name: str
    input: str = ""
    namespace: str | None = None


class CustomToolCallOutputItem(_Lenient):
    type: Literal["custom_tool_call_output"]
    call_id: str
    output: Parts


class ReasoningItem(_Lenient):
    """Reasoning echoed back from an earlier turn (Codex replays it with encrypted content)."""

    type: Literal["reasoning"]


class OtherItem(_Lenient):
    type: str


ITEM_TAGS = (
    "message",
    "function_call",
    "function_call_output",
    "custom_tool_call",
    "custom_tool_call_output",
    "reasoning",
    "other",
)


def _item_tag(value: Any) -> str:
    kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    if kind is None:
        return "message"  # the "easy" input message: {"role", "content"} alone
    return kind if kind in ITEM_TAGS else "other"


InputItem = Annotated[
    Annotated[MessageItem, Tag("message")]
    | Annotated[FunctionCallItem, Tag("function_call")]
    | Annotated[FunctionCallOutputItem, Tag("function_call_output")]
    | Annotated[CustomToolCallItem, Tag("custom_tool_call")]
    | Annotated[CustomToolCallOutputItem, Tag("custom_tool_call_output")]
    | Annotated[ReasoningItem, Tag("reasoning")]
    | Annotated[OtherItem, Tag("other")],
    Discriminator(_item_tag),
]

Items = Annotated[list[InputItem], BeforeValidator(_as_items)]


class FunctionTool(_Lenient):
    """A function tool, flat in this dialect: no `function` wrapper as in Chat."""

    type: Literal["function"]
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class CustomTool(_Lenient):
    """A tool the client runs whose input is free text, optionally in a grammar (`format`:
    `{"type": "grammar", "syntax": "lark", "definition": …}`); Codex's `apply_patch` is one."""

    type: Literal["custom"]
    name: str
    description: str | None = None
    format: dict[str, Any] | None = None


class OtherTool(_Lenient):
    """Built-in and hosted tools (`web_search`, `file_search`, `mcp`, `local_shell`, …)."""

    type: str


class NamespaceTool(_Lenient):
    """Function and custom tools grouped under one name (Codex sends each MCP server's tools
    so); calls to them name the tool and its namespace."""

    type: Literal["namespace"]
    name: str
    description: str = ""
    tools: list[ToolParam]


TOOL_TAGS = ("function", "custom", "namespace", "other")


def _tool_tag(value: Any) -> str:
    kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    return kind if kind in TOOL_TAGS else "other"


ToolParam = Annotated[
    Annotated[FunctionTool, Tag("function")]
    | Annotated[CustomTool, Tag("custom")]
    | Annotated[NamespaceTool, Tag("namespace")]
    | Annotated[OtherTool, Tag("other")],
    Discriminator(_tool_tag),
]
NamespaceTool.model_rebuild()


class TextConfig(_Lenient):
    # {"type": "text"} | {"type": "json_object"} | {"type": "json_schema", "name", "schema", …}
    format: dict[str, Any] | None = None


class ResponsesRequest(_Lenient):
    model: str
    input: Items
    instructions: str | None = None
    tools: list[ToolParam] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    # Not OpenAI's, but what local-model clients send (as on /v1/chat/completions).
    top_k: int | None = Field(default=None, ge=0)
    seed: int | None = None
    stop: str | list[str] | None = None
    text: TextConfig | None = None
    stream: bool | None = None
    # Logprobs come with `include: ["message.output_text.logprobs"]` or a `top_logprobs`.
    include: list[str] | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    # cortex keeps no responses: `store` is accepted and answered with `"store": false`.
    store: bool | None = None
    # Server-side state cortex does not keep; refused with a 400 naming the field when set.
    previous_response_id: str | None = None
    conversation: str | dict[str, Any] | None = None
    prompt: dict[str, Any] | None = None
    background: bool | None = None
    # effort "none" turns a hybrid model's reasoning off, another effort on (no budget to
    # scale here); summary is not honoured (the reasoning itself is sent).
    reasoning: dict[str, Any] | None = None
    metadata: dict[str, Any] | None = None


class InputTokensRequest(_Lenient):
    """POST /v1/responses/input_tokens: the conversation part of a request, to count."""

    model: str
    input: Items = Field(default_factory=list)
    instructions: str | None = None
    tools: list[ToolParam] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    previous_response_id: str | None = None
    conversation: str | dict[str, Any] | None = None


def field_path(loc: tuple[int | str, ...]) -> str:
    """Pydantic's error location as OpenAI spells it (`input[2].call_id`), without the tags the
    discriminated unions add after a list index."""
    parts: list[str] = []
    previous: int | str | None = None
    for part in loc:
        if isinstance(part, str) and isinstance(previous, int) and part in (*ITEM_TAGS, *TOOL_TAGS):
            previous = part
            continue
        parts.append(f"[{part}]" if isinstance(part, int) else f".{part}")
        previous = part
    return "".join(parts).lstrip(".")
