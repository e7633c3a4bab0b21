"""Structured output: the guide a request's engine decodes under, from what the client asked.

A pure function of the canonical request and the model's tool-call format. `response_format`
(and its other dialects' names) becomes the answer's guide as it is; strict tools become a Lark
grammar of the model's own tool-call syntax (`tool_calls.py` parses the same syntax back) whose
arguments are the tool's JSON schema, with free text (or the output format) as the other
alternative when `tool_choice` lets the model answer without a call. The guide is checked here,
without a tokenizer, so a schema the grammar library cannot compile is the client's 400 naming
its field, never an engine failure.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from control_plane.canonical import ChatRequest, OutputFormat, Tool, ToolChoice
from control_plane.errors import InvalidRequest
from control_plane.tool_calls import CLOSE, OPEN
from cortex.config import EngineKind
from cortex.guides import JSON_OPTIONS, GuideType, problem

# Engines whose Triton model takes guided_decoding_guide_type / guided_decoding_guide (torch
# and llama.cpp, both through llguidance). The TensorRT-LLM template leaves its
# guided_decoding_backend unset: a guide for it is refused, never dropped.
GUIDED_ENGINES = frozenset({EngineKind.TORCH, EngineKind.LLAMACPP})
# Engines that return each token's logprob with its alternatives (output_top_logprob_ids /
# output_top_logprobs; TensorRT-LLM's template has no alternatives).
LOGPROB_ENGINES = frozenset({EngineKind.TORCH, EngineKind.LLAMACPP})


@dataclass(frozen=True)
class Guide:
    type: GuideType
    text: str
    field: str  # the request field that asked (the first, when several did)


# Grammar syntaxes a `{"type": "grammar"}` format may name (OpenAI's custom-tool grammar shape).
_SYNTAXES = {
    "lark": GuideType.LARK_GRAMMAR,
    "regex": GuideType.REGEX,
    "ebnf": GuideType.EBNF_GRAMMAR,
    "gbnf": GuideType.EBNF_GRAMMAR,
}


def output_format(value: Any, field: str) -> OutputFormat | None:
    """A client's output format in any dialect's shape — OpenAI Chat's `response_format`
    (`json_schema` nested), Responses' `text.format` and Anthropic's `output_format` /
    `output_config.format` (flat) — or None for plain text. Beyond those, `{"type": "grammar",
    "grammar": {"syntax": "lark" | "regex" | "ebnf", "definition": …}}` (OpenAI's custom-tool
    grammar shape) asks for a regex or a grammar."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise InvalidRequest(f"{field} must be an object", field)
    kind = value.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return OutputFormat(GuideType.JSON, "", field)
    if kind == "json_schema":
        holder = value.get("json_schema", value)
        schema = holder.get("schema") if isinstance(holder, dict) else None
        if schema is None:
            return OutputFormat(GuideType.JSON, "", field)
        if not isinstance(schema, dict | bool):
            raise InvalidRequest(f"{field}: the schema must be a JSON object", field)
        return OutputFormat(GuideType.JSON_SCHEMA, json.dumps(schema), field)
    if kind == "grammar":
        grammar = value.get("grammar", value)
        syntax = grammar.get("syntax", "lark") if isinstance(grammar, dict) else None
        definition = grammar.get("definition") if isinstance(grammar, dict) else None
        if syntax not in _SYNTAXES or not isinstance(definition, str):
            raise InvalidRequest(
                f"{field}: a grammar format needs grammar.syntax (lark, regex or ebnf) and "
                "grammar.definition",
                field,
            )
        return OutputFormat(_SYNTAXES[syntax], definition, field)
    raise InvalidRequest(
        f"{field}.type must be text, json_object, json_schema or grammar, not {kind!r}",
        f"{field}.type",
    )


def guide_for(
    request: ChatRequest, tool_call_format: str, tag_tokens: frozenset[str] = frozenset()
) -> Guide | None:
    """The guide for a request on a model with this tool-call format; None: decode freely.
    `tag_tokens`: the call tags that are tokens of the model's vocabulary (the grammar asks for
    the token the model was trained to write, not the tag spelled out in other tokens)."""
    strict = [tool for tool in request.tools if tool.strict_field]
    output = request.output_format
    if not strict:
        return None if output is None else Guide(output.type, output.text, output.field)
    field = strict[0].strict_field or "tools"
    if tool_call_format not in ("hermes", "llama3_json"):
        raise InvalidRequest(
            f"{field}: model {request.model!r} has no tool-call format to constrain", field
        )
    calls = _calls(request.tools, tool_call_format, request.parallel_tool_calls, tag_tokens)
    if request.tool_choice in (ToolChoice.REQUIRED, ToolChoice.NAMED):
        start = "start: calls"
    else:
        start = f"start: {_text_rule(output, tool_call_format)} | calls"
    return Guide(GuideType.LARK_GRAMMAR, "\n".join([start, *calls]), field)


def check(guide: Guide, engine: EngineKind, model: str) -> None:
    """Refuse a guide the model's engine cannot honour, or one that does not compile."""
    if engine not in GUIDED_ENGINES:
        raise InvalidRequest(
            f"{guide.field}: model {model!r} runs on the {engine.value} engine, which cannot "
            "constrain its output",
            guide.field,
        )
    reason = _problem(guide.type, guide.text)
    if reason is not None:
        raise InvalidRequest(f"{guide.field}: {reason.splitlines()[0]}", guide.field)


def check_logprobs(request: ChatRequest, engine: EngineKind, model: str) -> None:
    if request.top_logprobs is not None and engine not in LOGPROB_ENGINES:
        raise InvalidRequest(
            f"logprobs: model {model!r} runs on the {engine.value} engine, which does not "
            "report them",
            "logprobs",
        )


@lru_cache(maxsize=256)
def _problem(guide_type: GuideType, text: str) -> str | None:
    return problem(guide_type, text)


def _schema(schema: dict[str, Any]) -> dict[str, Any]:
    """A schema as the grammar takes it: compact JSON, an object when the tool gave nothing."""
    return {**(schema or {"type": "object"}), "x-guidance": JSON_OPTIONS}


def _calls(
    tools: tuple[Tool, ...], tool_call_format: str, parallel: bool, tag_tokens: frozenset[str]
) -> list[str]:
    """Lark rules `calls` and one rule per tool: the model's call syntax around a JSON object of
    the tool's name and its arguments (strict tools' schema; any object for the others)."""
    key = "parameters" if tool_call_format == "llama3_json" else "arguments"
    rules = []
    for index, tool in enumerate(tools):
        body = {
            "type": "object",
            "properties": {
                "name": {"const": tool.name},
                key: tool.parameters if tool.strict_field else {"type": "object"},
            },
            "required": ["name", key],
            "additionalProperties": False,
        }
        rules.append(f"tool_{index}: %json {json.dumps(_schema(body))}")
    one = " | ".join(f"tool_{index}" for index in range(len(tools)))
    if tool_call_format == "llama3_json":
        call = f"call: {one}"
        calls = 'calls: call (";" call)*' if parallel else "calls: call"
    else:
        # A tag that is a token is named as one (`<tool_call>` in Lark is the token itself).
        opening, closing = (tag if tag in tag_tokens else json.dumps(tag) for tag in (OPEN, CLOSE))
        call = f'call: {opening} "\\n" ({one}) "\\n" {closing}'
        calls = 'calls: call ("\\n" call)*' if parallel else "calls: call"
    return [calls, call, *rules]


def _text_rule(output: OutputFormat | None, tool_call_format: str) -> str:
    """The answer that is not a call: the output format's JSON, or free text that does not open
    like a call (so that a call is always the grammar's)."""
    if output is None:
        opening = "{" if tool_call_format == "llama3_json" else "<"
        return f"/[^{opening}\\s][\\s\\S]*/"
    if output.type is GuideType.JSON_SCHEMA:
        return f"%json {json.dumps(_schema(json.loads(output.text)))}"
    if output.type is GuideType.JSON:
        return f"%json {json.dumps(_schema({'type': 'object'}))}"
    raise InvalidRequest(
        f"{output.field}: only a JSON format combines with strict tools", output.field
    )
