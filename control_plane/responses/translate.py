"""Responses requests → canonical requests; canonical results → `response` objects and their
output items (the stream encoder in `stream` builds its events from the same pieces).

Conversation rules: `instructions` is the leading system message, `developer` turns are system
turns, `function_call` (and `custom_tool_call`) items join the assistant turn just before them
(what Chat spells as one assistant message with `tool_calls`), each call's output is a tool
message, and a `reasoning` item's text (the `reasoning_text` content cortex sends) is the
reasoning of the assistant turn after it; one with only encrypted content or a summary
(another model's) is accepted and left out. Server-side state — `previous_response_id`, `conversation`, stored prompts,
background runs — and built-in tools cortex cannot run are refused with a 400 that names the
field.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from control_plane.canonical import (
    ChatRequest,
    Finished,
    FinishReason,
    Message,
    OutputFormat,
    TokenLogprob,
    Tool,
    ToolCall,
    ToolChoice,
    Usage,
    offered_tools,
)
from control_plane.errors import InvalidRequest
from control_plane.hosted_tools import is_hosted
from control_plane.openai.translate import call_id_for, logprobs_content, wants_reasoning
from control_plane.responses.protocol import (
    CustomTool,
    CustomToolCallItem,
    CustomToolCallOutputItem,
    FunctionCallItem,
    FunctionCallOutputItem,
    FunctionTool,
    InputItem,
    InputTokensRequest,
    MessageItem,
    NamespaceTool,
    OtherItem,
    Parts,
    ReasoningItem,
    ResponsesRequest,
    ToolParam,
)
from control_plane.structured import output_format

EMPTY_SCHEMA: dict[str, Any] = {"type": "object", "properties": {}}
TEXT_PARTS = ("input_text", "output_text", "text", "summary_text")
NO_STORE = (
    "cortex keeps no responses between requests, so {field} cannot be used: send the whole "
    "conversation in `input` (Codex does this with `store: false`)"
)


# A custom tool is shown to the model as a function of one string argument.
CUSTOM_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"input": {"type": "string", "description": "The tool's input, as plain text"}},
    "required": ["input"],
}


@dataclass(frozen=True)
class CallNames:
    """How the model's calls go back to the client. The model sees one name per tool — a
    namespaced tool's is `qualified(namespace, name)` — and custom tools as functions of one
    string, `input`; their calls leave as name + namespace, and custom ones as
    `custom_tool_call` items carrying the plain input."""

    namespaced: dict[str, tuple[str, str]] = field(default_factory=dict)  # shown → (ns, name)
    custom: frozenset[str] = frozenset()  # shown names of custom tools


def qualified(namespace: str, name: str) -> str:
    """The one name a namespaced function has in the prompt: `mcp__server` + `lookup` is
    `mcp__server__lookup`, the spelling Codex gave MCP tools before namespaces."""
    return f"{namespace}__{name}"


def call_item_id(neutral_id: str, custom: bool = False) -> str:
    """The id of a call's output item (its `call_id` is the Chat dialect's `call_…`)."""
    return f"ctc_{neutral_id}" if custom else f"fc_{neutral_id}"


def custom_input(arguments: str) -> str:
    """A custom tool's plain input from the arguments the model wrote for it: the `input`
    string, or the text itself when the model wrote something else."""
    try:
        value = json.loads(arguments)
    except ValueError:
        return arguments
    text = value.get("input") if isinstance(value, dict) else None
    return text if isinstance(text, str) else arguments


# ---- requests ---------------------------------------------------------------------------------


def _refuse_server_state(body: ResponsesRequest | InputTokensRequest) -> None:
    for name in ("previous_response_id", "conversation", "prompt"):
        if getattr(body, name, None) is not None:
            raise InvalidRequest(NO_STORE.format(field=f"`{name}`"), name)
    if getattr(body, "background", None):
        raise InvalidRequest(
            "background responses are not supported: cortex keeps none", "background"
        )


def _parts_text(parts: Parts, path: str) -> str:
    texts = []
    for number, part in enumerate(parts):
        kind = part.get("type")
        if kind in TEXT_PARTS:
            texts.append(str(part.get("text", "")))
        elif kind == "refusal":
            texts.append(str(part.get("refusal", "")))
        else:
            raise InvalidRequest(
                f"content part type {kind!r} is not supported by text-only models",
                param=f"{path}[{number}]",
            )
    return "".join(texts)


def _messages(instructions: str | None, items: list[InputItem]) -> list[Message]:
    messages: list[Message] = [Message(role="system", content=instructions)] if instructions else []
    tool_names: dict[str, str] = {}
    reasoning = ""  # a reasoning item's text, for the assistant turn that follows it
    for index, item in enumerate(items):
        path = f"input[{index}]"
        if isinstance(item, MessageItem):
            role = "system" if item.role == "developer" else item.role
            text = _parts_text(item.content, f"{path}.content")
            if role == "assistant":
                messages.append(Message(role=role, content=text, reasoning=reasoning))
                reasoning = ""
            else:
                messages.append(Message(role=role, content=text))
        elif isinstance(item, FunctionCallItem | CustomToolCallItem):
            name = qualified(item.namespace, item.name) if item.namespace else item.name
            tool_names[item.call_id] = name
            arguments = (
                item.arguments
                if isinstance(item, FunctionCallItem)
                else json.dumps({"input": item.input}, ensure_ascii=False)
            )
            call = ToolCall(item.call_id, name, arguments)
            previous = messages[-1] if messages else None
            if previous is not None and previous.role == "assistant":
                # The calls of one turn follow its text: one assistant message, as in Chat.
                messages[-1] = Message(
                    role="assistant",
                    content=previous.content,
                    tool_calls=(*previous.tool_calls, call),
                    reasoning="\n\n".join(t for t in (previous.reasoning, reasoning) if t),
                )
            else:
                messages.append(Message(role="assistant", tool_calls=(call,), reasoning=reasoning))
            reasoning = ""
        elif isinstance(item, FunctionCallOutputItem | CustomToolCallOutputItem):
            messages.append(
                Message(
                    role="tool",
                    content=_parts_text(item.output, f"{path}.output"),
                    tool_call_id=item.call_id,
                    name=tool_names.get(item.call_id),
                )
            )
        elif isinstance(item, OtherItem):
            raise InvalidRequest(
                f"input item type {item.type!r} is not supported here (cortex runs function "
                "tools only and keeps no stored items)",
                f"{path}.type",
            )
        elif isinstance(item, ReasoningItem):
            reasoning = "\n\n".join(t for t in (reasoning, _reasoning_text(item)) if t)
    return messages


def _reasoning_text(item: ReasoningItem) -> str:
    """The text of a reasoning item sent back: its `reasoning_text` content (what cortex
    sends); one with only encrypted content or a summary (another model's) gives none."""
    parts = (item.model_extra or {}).get("content") or []
    texts = [
        str(part.get("text", ""))
        for part in parts
        if isinstance(part, dict) and part.get("type") == "reasoning_text"
    ]
    return "".join(texts)


def _custom_description(tool: CustomTool) -> str:
    form = tool.format or {}
    if form.get("type") != "grammar" or not form.get("definition"):
        return tool.description or ""
    grammar = f"The input follows this {form.get('syntax', '')} grammar:\n{form['definition']}"
    return f"{tool.description}\n\n{grammar}" if tool.description else grammar


def _tool(tool: ToolParam, path: str, namespace: str | None = None) -> Tool:
    if isinstance(tool, FunctionTool | CustomTool):
        name = qualified(namespace, tool.name) if namespace else tool.name
        if isinstance(tool, FunctionTool):
            return Tool(
                name,
                tool.description or "",
                tool.parameters or EMPTY_SCHEMA,
                f"{path}.strict" if tool.strict else None,
            )
        return Tool(name, _custom_description(tool), CUSTOM_SCHEMA)
    raise InvalidRequest(
        f"tool type {tool.type!r} is not supported: cortex serves only tools the client runs, "
        "'function' and 'custom' ones (also inside namespaces); hosted tools are left out",
        f"{path}.type",
    )


def _tools(tools: list[ToolParam] | None) -> tuple[Tool, ...]:
    offered: list[Tool] = []
    for index, tool in enumerate(tools or []):
        if isinstance(tool, NamespaceTool):
            offered.extend(
                _tool(inner, f"tools[{index}].tools[{number}]", tool.name)
                for number, inner in enumerate(tool.tools)
                if not is_hosted(inner.type)
            )
        elif not is_hosted(tool.type):
            offered.append(_tool(tool, f"tools[{index}]"))
    return tuple(offered)


def hosted_tools(body: ResponsesRequest | InputTokensRequest) -> list[str]:
    """The hosted tool types the request offers, which the model does not see
    (`control_plane.hosted_tools`)."""
    found = []
    for tool in body.tools or []:
        for member in tool.tools if isinstance(tool, NamespaceTool) else [tool]:
            if is_hosted(member.type):
                found.append(member.type)
    return found


def call_names(body: ResponsesRequest) -> CallNames:
    """How calls to this request's tools are spelled on the way out."""
    namespaced, custom = {}, set()
    for tool in body.tools or []:
        inner = tool.tools if isinstance(tool, NamespaceTool) else [tool]
        for member in inner:
            if not isinstance(member, FunctionTool | CustomTool):
                continue
            shown = member.name
            if isinstance(tool, NamespaceTool):
                shown = qualified(tool.name, member.name)
                namespaced[shown] = (tool.name, member.name)
            if isinstance(member, CustomTool):
                custom.add(shown)
    return CallNames(namespaced, frozenset(custom))


def _tool_choice(
    value: str | dict[str, Any] | None, tools: tuple[Tool, ...]
) -> tuple[ToolChoice, str | None, tuple[Tool, ...]]:
    """(choice, named tool, tools allowed) from every tool_choice form this dialect defines."""
    if value is None:
        return ToolChoice.AUTO, None, tools
    if isinstance(value, str):
        if value in ("auto", "none", "required"):
            return ToolChoice(value), None, tools
        raise InvalidRequest(
            "tool_choice must be 'auto', 'none', 'required' or a named function", "tool_choice"
        )
    kind = value.get("type")
    if kind == "function":
        name = value.get("name")
        if isinstance(name, str) and name:
            return ToolChoice.NAMED, name, tools
        raise InvalidRequest("tool_choice.name is required", "tool_choice.name")
    if kind == "allowed_tools":
        names = {
            entry.get("name")
            for entry in value.get("tools") or []
            if isinstance(entry, dict) and entry.get("type") == "function"
        }
        mode = ToolChoice.REQUIRED if value.get("mode") == "required" else ToolChoice.AUTO
        return mode, None, tuple(t for t in tools if t.name in names)
    if isinstance(kind, str) and is_hosted(kind):
        raise InvalidRequest(
            f"tool_choice forces the hosted tool {kind!r}, which cortex cannot run (only tools "
            "the client runs are served here)",
            "tool_choice.type",
        )
    raise InvalidRequest(
        f"tool_choice type {kind!r} is not supported: only function tools run here",
        "tool_choice.type",
    )


def _output_format(body: ResponsesRequest | InputTokensRequest) -> OutputFormat | None:
    return output_format(body.text.format if body.text else None, "text.format")


LOGPROBS_INCLUDE = "message.output_text.logprobs"


def _top_logprobs(body: ResponsesRequest) -> int | None:
    if body.top_logprobs is None and LOGPROBS_INCLUDE not in (body.include or []):
        return None
    return body.top_logprobs or 0


def _stops(stop: str | list[str] | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    return (stop,) if isinstance(stop, str) else tuple(stop)


def chat_request(body: ResponsesRequest | InputTokensRequest, request_id: str) -> ChatRequest:
    _refuse_server_state(body)
    messages = _messages(body.instructions, body.input)
    if not any(m.role != "system" for m in messages):
        raise InvalidRequest("input: a conversation needs at least one turn", "input")
    choice, named, tools = _tool_choice(body.tool_choice, _tools(body.tools))
    tools = offered_tools(tools, choice, named)
    generation: dict[str, Any] = {}
    if isinstance(body, ResponsesRequest):
        generation = {
            "max_tokens": body.max_output_tokens,
            "temperature": body.temperature,
            "top_p": body.top_p,
            "top_k": body.top_k,
            "seed": body.seed,
            "stop": _stops(body.stop),
            "top_logprobs": _top_logprobs(body),
            "reasoning": wants_reasoning((body.reasoning or {}).get("effort")),
        }
    return ChatRequest(
        model=body.model,
        messages=tuple(messages),
        tools=tools,
        tool_choice=choice,
        tool_choice_name=named,
        parallel_tool_calls=body.parallel_tool_calls is not False,
        output_format=_output_format(body),
        request_id=request_id,
        **generation,
    )


# ---- responses --------------------------------------------------------------------------------


def echo(body: ResponsesRequest) -> dict[str, Any]:
    """The request's settings, as every response object of it repeats them."""
    reasoning = body.reasoning or {}
    return {
        "instructions": body.instructions,
        "max_output_tokens": body.max_output_tokens,
        "metadata": body.metadata or {},
        "parallel_tool_calls": body.parallel_tool_calls is not False,
        "previous_response_id": None,
        "reasoning": {"effort": reasoning.get("effort"), "summary": reasoning.get("summary")},
        "store": False,  # whatever the client asked: nothing is kept
        "temperature": body.temperature,
        "text": {"format": (body.text.format if body.text else None) or {"type": "text"}},
        "tool_choice": body.tool_choice if body.tool_choice is not None else "auto",
        "tools": [tool.model_dump(exclude_none=True) for tool in body.tools or []],
        "top_p": body.top_p,
        "truncation": "disabled",
        "user": None,
    }


def usage_body(usage: Usage) -> dict[str, Any]:
    # Unlike Anthropic's, `input_tokens` here includes the cached tokens.
    return {
        "input_tokens": usage.prompt_tokens,
        "input_tokens_details": {
            "cached_tokens": usage.cached_prompt_tokens,  # read from the prefix cache
            "cache_write_tokens": 0,
        },
        "output_tokens": usage.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": usage.reasoning_tokens},
        "total_tokens": usage.total_tokens,
    }


def text_part(text: str, logprobs: list[TokenLogprob] | None = None) -> dict[str, Any]:
    part: dict[str, Any] = {"type": "output_text", "text": text, "annotations": []}
    if logprobs is not None:
        part["logprobs"] = logprobs_content(logprobs)
    return part


def reasoning_item_id(message_id: str, number: int = 1) -> str:
    """The id of a response's reasoning item, from its message id (`msg_…` → `rs_…`),
    numbered after the first."""
    item_id = "rs_" + message_id.removeprefix("msg_")
    return item_id if number <= 1 else f"{item_id}_{number}"


def reasoning_part(text: str) -> dict[str, Any]:
    return {"type": "reasoning_text", "text": text}


def reasoning_item(item_id: str, text: str | None, status: str) -> dict[str, Any]:
    """A `reasoning` item: the model's reasoning as its content (the raw text, as gpt-oss's
    open-weight serving returns it), no summary (nothing here writes one) and no
    `encrypted_content` (there is nothing to keep hidden from the client)."""
    content = [] if text is None else [reasoning_part(text)]
    return {"id": item_id, "type": "reasoning", "summary": [], "content": content, "status": status}


def message_item(item_id: str, parts: list[dict[str, Any]], status: str) -> dict[str, Any]:
    return {
        "id": item_id,
        "type": "message",
        "status": status,
        "role": "assistant",
        "content": parts,
    }


def call_item(
    neutral_id: str, name: str, arguments: str, status: str, names: CallNames | None = None
) -> dict[str, Any]:
    """A call's output item: `function_call`, or `custom_tool_call` for a custom tool."""
    names = names or CallNames()
    namespace, own_name = names.namespaced.get(name, (None, name))
    custom = name in names.custom
    item: dict[str, Any] = {"id": call_item_id(neutral_id, custom)}
    if custom:
        item.update(type="custom_tool_call", call_id=call_id_for(neutral_id), name=own_name)
        item["input"] = custom_input(arguments) if arguments else ""
    else:
        item.update(type="function_call", status=status, arguments=arguments)
        item.update(call_id=call_id_for(neutral_id), name=own_name)
    if namespace is not None:
        item["namespace"] = namespace
    return item


def incomplete(finished: Finished) -> bool:
    return finished.reason is FinishReason.LENGTH


def response_object(
    response_id: str,
    model: str,
    created_at: int,
    settings: dict[str, Any],
    status: str,
    output: list[dict[str, Any]],
    usage: dict[str, Any] | None = None,
    error: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The `response` resource: the body of a non-streamed answer, and the snapshot the
    lifecycle events (created, in_progress, completed, incomplete, failed) carry."""
    return {
        "id": response_id,
        "object": "response",
        "created_at": created_at,
        "status": status,
        "background": False,
        "error": error,
        "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
        "model": model,
        "output": output,
        **settings,
        "usage": usage,
    }


def response_body(
    response_id: str,
    model: str,
    created_at: int,
    settings: dict[str, Any],
    message_id: str,
    text: str,
    calls: list[tuple[str, str, str]],
    finished: Finished,
    names: CallNames | None = None,
    logprobs: list[TokenLogprob] | None = None,
    reasoning: str = "",
) -> dict[str, Any]:
    """A whole answer: its reasoning as a reasoning item, its text as one message item, then
    one item per function call."""
    status = "incomplete" if incomplete(finished) else "completed"
    output = []
    if reasoning:
        output.append(reasoning_item(reasoning_item_id(message_id), reasoning, "completed"))
    if text:
        output.append(message_item(message_id, [text_part(text, logprobs)], status))
    output.extend(
        call_item(call_id, name, arguments, "completed", names)
        for call_id, name, arguments in calls
    )
    return response_object(
        response_id, model, created_at, settings, status, output, usage_body(finished.usage)
    )
