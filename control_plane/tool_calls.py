"""Parsing tool calls out of generated text, per the model's `tool_call_format`.

    hermes       <tool_call>{"name": …, "arguments": {…}}</tool_call> (Hermes, Qwen2.5/3)
    llama3_json  the whole answer is {"name": …, "parameters": {…}} (optionally <|python_tag|>)

The parser is fed text as it streams and returns canonical events; tag text never reaches the
client. Call ids are made here and stay stable across the round trip (the client echoes them).
"""

from __future__ import annotations

import json
import uuid

from control_plane.canonical import Event, TextDelta, ToolCallDelta, ToolCallStart

OPEN, CLOSE = "<tool_call>", "</tool_call>"
ARGUMENT_FRAGMENT = 16


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _call_events(index: int, body: str) -> list[Event]:
    try:
        data = json.loads(body)
    except ValueError:
        return [TextDelta(f"{OPEN}{body}{CLOSE}")]
    if not isinstance(data, dict) or not isinstance(data.get("name"), str):
        return [TextDelta(f"{OPEN}{body}{CLOSE}")]
    arguments = data.get("arguments", data.get("parameters", {}))
    text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    events: list[Event] = [ToolCallStart(index, new_call_id(), data["name"])]
    # Arguments arrive as fragments, as clients expect from streaming APIs.
    for start in range(0, len(text), ARGUMENT_FRAGMENT):
        events.append(ToolCallDelta(index, text[start : start + ARGUMENT_FRAGMENT]))
    return events


class HermesParser:
    def __init__(self) -> None:
        self.buffer = ""
        self.inside = False
        self.calls = 0

    def feed(self, text: str) -> list[Event]:
        self.buffer += text
        events: list[Event] = []
        while True:
            if not self.inside:
                position = self.buffer.find(OPEN)
                if position < 0:
                    hold = _partial_suffix(self.buffer, OPEN)
                    ready = self.buffer[: len(self.buffer) - hold]
                    self.buffer = self.buffer[len(self.buffer) - hold :]
                    if ready and not (self.calls and not ready.strip()):
                        events.append(TextDelta(ready))
                    return events
                before = self.buffer[:position]
                if before and not (self.calls and not before.strip()):
                    events.append(TextDelta(before))
                self.buffer = self.buffer[position + len(OPEN) :]
                self.inside = True
            position = self.buffer.find(CLOSE)
            if position < 0:
                return events
            events.extend(_call_events(self.calls, self.buffer[:position].strip()))
            self.calls += 1
            self.buffer = self.buffer[position + len(CLOSE) :]
            self.inside = False

    def finish(self) -> list[Event]:
        rest, self.buffer = self.buffer, ""
        if self.inside:
            # An unterminated call: take it if it parses, else give the text back as text.
            events = _call_events(self.calls, rest.strip())
            if isinstance(events[0], ToolCallStart):
                self.calls += 1
            return events
        return [TextDelta(rest)] if rest and not (self.calls and not rest.strip()) else []


class Llama3JsonParser:
    def __init__(self) -> None:
        self.buffer = ""
        self.mode: str | None = None  # "json" | "text"
        self.calls = 0

    def feed(self, text: str) -> list[Event]:
        if self.mode == "text":
            return [TextDelta(text)] if text else []
        self.buffer += text
        stripped = self.buffer.lstrip().removeprefix("<|python_tag|>").lstrip()
        if not stripped:
            return []
        if stripped.startswith("{"):
            self.mode = "json"
            return []
        self.mode = "text"
        out, self.buffer = self.buffer, ""
        return [TextDelta(out)]

    def finish(self) -> list[Event]:
        if self.mode != "json":
            rest, self.buffer = self.buffer, ""
            return [TextDelta(rest)] if rest else []
        body = self.buffer.strip().removeprefix("<|python_tag|>").strip()
        self.buffer = ""
        events: list[Event] = []
        for line in [part for part in body.split(";") if part.strip()]:
            parsed = _call_events(self.calls, line.strip())
            if isinstance(parsed[0], ToolCallStart):
                self.calls += 1
                events.extend(parsed)
            else:
                return [TextDelta(body)]
        return events


class PlainParser:
    calls = 0

    def feed(self, text: str) -> list[Event]:
        return [TextDelta(text)] if text else []

    def finish(self) -> list[Event]:
        return []


ToolParser = HermesParser | Llama3JsonParser | PlainParser


def parser_for(tool_call_format: str, tools_offered: bool) -> ToolParser:
    if not tools_offered or tool_call_format == "none":
        return PlainParser()
    if tool_call_format == "llama3_json":
        return Llama3JsonParser()
    return HermesParser()


def _partial_suffix(text: str, tag: str) -> int:
    for size in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:size]):
            return size
    return 0
