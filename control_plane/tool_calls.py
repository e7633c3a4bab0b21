"""Parsing tool calls out of generated text, per the model's `tool_call_format`.

    hermes       <tool_call>{"name": …, "arguments": {…}}</tool_call> (Hermes, Qwen2.5/3)
    llama3_json  the whole answer is {"name": …, "parameters": {…}} (optionally <|python_tag|>),
                 several calls separated by ";"
    qwen3_coder  <tool_call><function=NAME><parameter=P>value</parameter>…</function></tool_call>
                 (Qwen3-Coder): each value converted to the type the tool's schema gives it
    harmony      gpt-oss: messages on channels, parsed from token ids (`harmony.py`)

The parser is fed text as it streams and returns canonical events. Tag text never reaches the
client, nor does the whitespace models put around calls. Each call is held until it is complete
and its JSON is checked, so a client never receives a call whose input is broken or silently
emptied: a region that does not parse as a call is given back as the text the model wrote. The
checked arguments are then sent as fragments, as streaming clients expect.

Call ids are made here, dialect-neutral; the encoders prefix them (`call_…`, `toolu_…`) and the
client echoes the prefixed id in its history, so ids stay stable across the round trip.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import TYPE_CHECKING, Any, Union

if TYPE_CHECKING:
    from openai_harmony import HarmonyEncoding

    from control_plane.harmony import HarmonyParser

from control_plane.canonical import Event, TextDelta, Tool, ToolCallDelta, ToolCallStart

OPEN, CLOSE = "<tool_call>", "</tool_call>"
PYTHON_TAG = "<|python_tag|>"
ARGUMENT_FRAGMENT = 16


def new_call_id() -> str:
    return uuid.uuid4().hex[:24]


def as_call(value: Any) -> tuple[str, str] | None:
    """(name, compact JSON arguments) when `value` is a well-formed call, else None."""
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    arguments = value.get("arguments", value.get("parameters"))
    if arguments is None:
        arguments = {}
    if isinstance(arguments, str):  # some models write the arguments as a JSON string
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    return value["name"], json.dumps(arguments, ensure_ascii=False, separators=(",", ":"))


def call_events(index: int, name: str, arguments: str) -> list[Event]:
    events: list[Event] = [ToolCallStart(index, new_call_id(), name)]
    for start in range(0, len(arguments), ARGUMENT_FRAGMENT):
        events.append(ToolCallDelta(index, arguments[start : start + ARGUMENT_FRAGMENT]))
    return events


class HermesParser:
    def __init__(self, max_calls: int | None = None) -> None:
        self.max_calls = max_calls
        self.buffer = ""
        self.inside = False
        self.calls = 0
        self.space = ""  # trailing whitespace held back: it may precede a call
        self.after_call = False

    @property
    def done(self) -> bool:
        """No more calls are wanted (parallel calls off): the rest of the output is ignored."""
        return self.max_calls is not None and self.calls >= self.max_calls

    def feed(self, text: str) -> list[Event]:
        self.buffer += text
        events: list[Event] = []
        while not self.done:
            if self.inside:
                position = self.buffer.find(CLOSE)
                if position < 0:
                    return events
                body = self.buffer[:position]
                self.buffer = self.buffer[position + len(CLOSE) :]
                self.inside = False
                events.extend(self._call(body, closed=True))
                continue
            position = self.buffer.find(OPEN)
            if position < 0:
                hold = _partial_suffix(self.buffer, OPEN)
                ready = self.buffer[: len(self.buffer) - hold]
                self.buffer = self.buffer[len(self.buffer) - hold :]
                events.extend(self._text(ready, before_call=False))
                return events
            events.extend(self._text(self.buffer[:position], before_call=True))
            self.buffer = self.buffer[position + len(OPEN) :]
            self.inside = True
        return events

    def finish(self) -> list[Event]:
        if self.done:
            return []
        rest, self.buffer = self.buffer, ""
        if self.inside:
            self.inside = False
            return self._call(rest, closed=False)  # an unterminated call: take it if it parses
        return self._text(rest, before_call=False, final=True)

    def _text(self, text: str, before_call: bool, final: bool = False) -> list[Event]:
        text, self.space = self.space + text, ""
        if self.after_call:
            text = text.lstrip()
        if before_call:
            text = text.rstrip()
        elif not final:
            kept = text.rstrip()
            text, self.space = kept, text[len(kept) :]
        if not text:
            return []
        self.after_call = False
        return [TextDelta(text)]

    def _parse(self, body: str) -> tuple[str, str] | None:
        """(name, compact JSON arguments) of a call region's body, or None if it is none."""
        try:
            return as_call(json.loads(body))
        except ValueError:
            return None

    def _call(self, body: str, closed: bool) -> list[Event]:
        call = self._parse(body)
        if call is None:
            raw = OPEN + body + (CLOSE if closed else "")
            return self._text(raw, before_call=False, final=not closed)
        events = call_events(self.calls, *call)
        self.calls += 1
        self.after_call = True
        return events


FUNCTION = re.compile(r"\s*<function=([^>\n]+)>(.*?)(?:</function>\s*)?\Z", re.DOTALL)
PARAMETER = re.compile(r"<parameter=([^>\n]+)>(.*?)(?:</parameter>|(?=<parameter=)|\Z)", re.DOTALL)


class Qwen3CoderParser(HermesParser):
    """Qwen3-Coder's calls: the Hermes tags around XML-ish function and parameter elements,
    one value per parameter, written raw (a string unquoted, an object as JSON):

        <tool_call>
        <function=get_weather>
        <parameter=city>
        Paris
        </parameter>
        <parameter=days>
        3
        </parameter>
        </function>
        </tool_call>

    Values become the JSON types the tool's schema declares (`parameter_value`)."""

    def __init__(self, tools: tuple[Tool, ...], max_calls: int | None = None) -> None:
        super().__init__(max_calls)
        self.schemas = {tool.name: tool.parameters for tool in tools}

    def _parse(self, body: str) -> tuple[str, str] | None:
        function = FUNCTION.match(body)
        if function is None:
            return None
        name = function.group(1).strip()
        properties = (self.schemas.get(name) or {}).get("properties") or {}
        arguments = {}
        for parameter in PARAMETER.finditer(function.group(2)):
            key = parameter.group(1).strip()
            arguments[key] = parameter_value(_unwrap(parameter.group(2)), properties.get(key))
        return name, json.dumps(arguments, ensure_ascii=False, separators=(",", ":"))


def _unwrap(text: str) -> str:
    """A parameter's value without the one line break the format puts on each side of it."""
    text = text.removeprefix("\n")
    return text.removesuffix("\n")


def parameter_value(text: str, schema: Any) -> Any:
    """A raw parameter value as the JSON type its schema declares: integers and numbers,
    booleans, null, objects and arrays as JSON; a string, an undeclared parameter or a value
    that does not read as its type stays the text the model wrote."""
    declared = schema.get("type") if isinstance(schema, dict) else None
    kinds = declared if isinstance(declared, list) else [declared]
    if isinstance(schema, dict) and not declared:
        for option in schema.get("anyOf") or schema.get("oneOf") or []:
            if isinstance(option, dict) and isinstance(option.get("type"), str):
                kinds.append(option["type"])
    stripped = text.strip()
    if "null" in kinds and stripped == "null":
        return None
    if "string" in kinds or not any(kinds):
        return text
    if "boolean" in kinds and stripped.lower() in ("true", "false"):
        return stripped.lower() == "true"
    if "integer" in kinds and re.fullmatch(r"-?\d+", stripped):
        return int(stripped)
    if "number" in kinds:
        try:
            number = float(stripped)
        except ValueError:
            pass
        else:
            return int(number) if re.fullmatch(r"-?\d+", stripped) else number
    if "object" in kinds or "array" in kinds:
        try:
            return json.loads(stripped)
        except ValueError:
            pass
    return text


class Llama3JsonParser:
    def __init__(self, max_calls: int | None = None) -> None:
        self.max_calls = max_calls
        self.buffer = ""
        self.mode: str | None = None  # "json" | "text"
        self.calls = 0

    done = False  # calls are only known at the end

    def feed(self, text: str) -> list[Event]:
        if self.mode == "text":
            return [TextDelta(text)] if text else []
        self.buffer += text
        stripped = self.buffer.lstrip().removeprefix(PYTHON_TAG).lstrip()
        if not stripped or PYTHON_TAG.startswith(stripped):
            return []  # undecided until the first character past the tag
        if stripped.startswith("{"):
            self.mode = "json"
            return []
        self.mode = "text"
        out, self.buffer = self.buffer, ""
        return [TextDelta(out)]

    def finish(self) -> list[Event]:
        rest, self.buffer = self.buffer, ""
        if self.mode != "json":
            return [TextDelta(rest)] if rest else []
        calls = _json_calls(rest.strip().removeprefix(PYTHON_TAG).strip())
        if calls is None:
            return [TextDelta(rest)]
        events: list[Event] = []
        for name, arguments in calls[: self.max_calls]:
            events.extend(call_events(self.calls, name, arguments))
            self.calls += 1
        return events


def _json_calls(body: str) -> list[tuple[str, str]] | None:
    """One or more JSON calls separated by ";" or whitespace, or None if that is not what the
    body is. Decoded object by object, so a ";" inside an argument does not split a call."""
    decoder = json.JSONDecoder()
    calls: list[tuple[str, str]] = []
    position = 0
    while position < len(body):
        try:
            value, position = decoder.raw_decode(body, position)
        except ValueError:
            return None
        call = as_call(value)
        if call is None:
            return None
        calls.append(call)
        while position < len(body) and (body[position].isspace() or body[position] == ";"):
            position += 1
    return calls or None


class PlainParser:
    calls = 0
    done = False

    def feed(self, text: str) -> list[Event]:
        return [TextDelta(text)] if text else []

    def finish(self) -> list[Event]:
        return []


ToolParser = Union[HermesParser, Llama3JsonParser, PlainParser, "HarmonyParser"]


def parser_for(
    tool_call_format: str,
    tools_offered: bool,
    parallel: bool = True,
    harmony: HarmonyEncoding | None = None,
    tools: tuple[Tool, ...] = (),
) -> ToolParser:
    """The parser for a model's format and the tools offered (Qwen3-Coder's calls take their
    types from them); with parallel calls off only the first call is kept. harmony's parser
    reads every output (its answer too is on a channel) with `harmony`, the model's encoding."""
    if tool_call_format == "harmony":
        from control_plane.harmony import HarmonyParser

        if harmony is None:
            raise ValueError("the harmony format needs the model's harmony encoding")
        return HarmonyParser(harmony, None if parallel else 1)
    if not tools_offered or tool_call_format == "none":
        return PlainParser()
    max_calls = None if parallel else 1
    if tool_call_format == "llama3_json":
        return Llama3JsonParser(max_calls)
    if tool_call_format == "qwen3_coder":
        return Qwen3CoderParser(tools, max_calls)
    return HermesParser(max_calls)


def _partial_suffix(text: str, tag: str) -> int:
    for size in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:size]):
            return size
    return 0
