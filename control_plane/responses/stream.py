"""Canonical events → the Responses API's SSE stream, as the openai SDK's `ResponseStreamState`
and Codex CLI parse it. Every event is `event: <type>` + `data: <json>` with that `type` and a
`sequence_number` counting from 0:

    response.created, response.in_progress
    per output item, in order:
      reasoning: output_item.added (reasoning) → content_part.added → reasoning_text.delta … →
             reasoning_text.done → content_part.done → output_item.done
      text:  output_item.added (message) → content_part.added → output_text.delta … →
             output_text.done → content_part.done → output_item.done
      call:  output_item.added (function_call) → function_call_arguments.delta … →
             function_call_arguments.done → output_item.done
      custom tool call: output_item.added (custom_tool_call) → custom_tool_call_input.delta
             (its whole input: the model writes it as JSON, so it is plain text only at the
             end) → custom_tool_call_input.done → output_item.done
    response.completed (or response.incomplete when max_output_tokens cut it), with usage

Keep-alives (a cold load, a long prefill) are `response.in_progress` again: an SSE comment would
not reset Codex's stream idle timer, an event it knows does. A failure after the stream started
is an `error` event, then `response.failed` with what was produced so far.
"""

from __future__ import annotations

import json
import time
from typing import Any

from control_plane.canonical import (
    Finished,
    ReasoningDelta,
    Started,
    TextDelta,
    ToolCallDelta,
    ToolCallStart,
    Waiting,
)
from control_plane.errors import CortexError, Overloaded
from control_plane.openai.translate import logprobs_content
from control_plane.responses.translate import (
    CallNames,
    call_item,
    incomplete,
    message_item,
    reasoning_item,
    reasoning_item_id,
    reasoning_part,
    response_object,
    text_part,
    usage_body,
)

# json.dumps(text, ensure_ascii=False) for a str, without making an encoder per call.
_json_text = json.JSONEncoder(ensure_ascii=False).encode


def sse(kind: str, sequence_number: int, fields: dict[str, Any]) -> bytes:
    """One event: its `type`, its fields, then its sequence number."""
    data = {"type": kind, **fields, "sequence_number": sequence_number}
    payload = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"event: {kind}\ndata: {payload}\n\n".encode()


def failure_code(error: CortexError) -> str:
    """The `response.error.code` for a failure after the stream started (a prompt too long is
    refused before it, as an HTTP 400 with `context_length_exceeded`)."""
    if isinstance(error, Overloaded):
        return "rate_limit_exceeded"  # Codex retries after a pause
    return "server_error"  # Codex retries


class ResponseStreamEncoder:
    """One response's stream. Feed it every canonical event in order; each call returns the
    bytes to send (possibly several events, possibly none)."""

    def __init__(
        self,
        response_id: str,
        model: str,
        settings: dict[str, Any],
        message_id: str,
        created_at: int | None = None,
        names: CallNames | None = None,
    ) -> None:
        self.response_id = response_id
        self.model = model
        self.settings = settings
        self.message_id = message_id
        self.names = names or CallNames()
        self.created_at = int(time.time()) if created_at is None else created_at
        self.sequence = 0
        self.output: list[dict[str, Any]] = []  # finished items, in output order
        self.open: str | None = None  # the open item's type ("message", "function_call", …)
        self.text: list[str] = []
        self.logprobs: list[dict[str, Any]] = []  # the open message's, when asked for
        self.call: list[str] = []  # the open call: neutral id, name, arguments so far
        self.call_id = ""  # the open call's item id
        self.messages = 0  # message items so far (a second text run after a call needs an id)
        self.reasoning: list[str] = []  # the open reasoning item's text
        self.reasonings = 0  # reasoning items so far
        # The per-token hot path: the bytes around a text delta, made when its item opens.
        self._delta_head = b""

    def _next(self) -> int:
        self.sequence += 1
        return self.sequence - 1

    def _event(self, kind: str, fields: dict[str, Any]) -> bytes:
        return sse(kind, self._next(), fields)

    def _snapshot(
        self,
        status: str,
        output: list[dict[str, Any]] | None = None,
        usage: dict[str, Any] | None = None,
        error: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        return response_object(
            self.response_id,
            self.model,
            self.created_at,
            self.settings,
            status,
            output or [],
            usage,
            error,
        )

    def event(self, event: object) -> bytes:
        if isinstance(event, ReasoningDelta):
            if not event.text:
                return b""
            out = b"" if self.open == "reasoning" else self._open_reasoning()
            self.reasoning.append(event.text)
            part = {"item_id": self._reasoning_id(), "output_index": len(self.output)}
            fields = {**part, "content_index": 0, "delta": event.text}
            return out + self._event("response.reasoning_text.delta", fields)
        if isinstance(event, TextDelta):
            if not event.text:
                return b""
            out = b"" if self.open == "message" else self._open_message()
            self.text.append(event.text)
            if event.logprobs:
                entries = logprobs_content(list(event.logprobs))
                self.logprobs.extend(entries)
                part = {"item_id": self._item_id(), "output_index": len(self.output)}
                fields = {**part, "content_index": 0, "delta": event.text, "logprobs": entries}
                return out + self._event("response.output_text.delta", fields)
            return out + self._text_delta(event.text)
        if isinstance(event, ToolCallDelta):
            if not event.arguments:
                return b""
            self.call[2] += event.arguments
            if self.open == "custom_tool_call":
                return b""  # its plain input is known once the arguments are whole
            return self._event(
                "response.function_call_arguments.delta",
                {
                    "item_id": self.call_id,
                    "output_index": len(self.output),
                    "delta": event.arguments,
                },
            )
        if isinstance(event, ToolCallStart):
            out = self._close()
            self.call = [event.id, event.name, ""]
            item = call_item(event.id, event.name, "", "in_progress", self.names)
            self.open, self.call_id = item["type"], item["id"]
            return out + self._event(
                "response.output_item.added", {"output_index": len(self.output), "item": item}
            )
        if isinstance(event, Started):
            response = self._snapshot("in_progress")
            return self._event("response.created", {"response": response}) + self._event(
                "response.in_progress", {"response": response}
            )
        if isinstance(event, Waiting):
            return self.keep_alive()
        if isinstance(event, Finished):
            out = self._close()
            status = "incomplete" if incomplete(event) else "completed"
            response = self._snapshot(status, output=self.output, usage=usage_body(event.usage))
            return out + self._event(f"response.{status}", {"response": response})
        return b""

    def keep_alive(self) -> bytes:
        return self._event("response.in_progress", {"response": self._snapshot("in_progress")})

    def error(self, error: CortexError) -> bytes:
        """The stream's last events when it fails after it started: `error` with the dialect's
        error fields, then `response.failed` with the items so far."""
        partial = list(self.output)
        if self.open == "message":
            partial.append(
                message_item(self._item_id(), [text_part("".join(self.text))], "incomplete")
            )
        elif self.open == "reasoning":
            text = "".join(self.reasoning)
            partial.append(reasoning_item(self._reasoning_id(), text, "incomplete"))
        elif self.open is not None:
            neutral_id, name, arguments = self.call
            partial.append(call_item(neutral_id, name, arguments, "incomplete", self.names))
        self.open = None
        details = {"code": error.openai_code, "message": error.message, "param": error.param}
        failed = {"code": failure_code(error), "message": error.message}
        return self._event("error", details) + self._event(
            "response.failed",
            {"response": self._snapshot("failed", output=partial, error=failed)},
        )

    # ---- items ------------------------------------------------------------------------------

    def _item_id(self) -> str:
        """The open message's id: the request's message id, numbered after the first."""
        return self.message_id if self.messages <= 1 else f"{self.message_id}_{self.messages}"

    def _reasoning_id(self) -> str:
        return reasoning_item_id(self.message_id, self.reasonings)

    def _open_reasoning(self) -> bytes:
        out = self._close()
        self.open = "reasoning"
        self.reasonings += 1
        self.reasoning = []
        item_id, index = self._reasoning_id(), len(self.output)
        part = {"item_id": item_id, "output_index": index, "content_index": 0}
        return (
            out
            + self._event(
                "response.output_item.added",
                {"output_index": index, "item": reasoning_item(item_id, None, "in_progress")},
            )
            + self._event("response.content_part.added", {**part, "part": reasoning_part("")})
        )

    def _open_message(self) -> bytes:
        out = self._close()
        self.open = "message"
        self.messages += 1
        self.text = []
        self.logprobs = []
        item_id, index = self._item_id(), len(self.output)
        self._delta_head = (
            b'event: response.output_text.delta\ndata: {"type":"response.output_text.delta",'
            b'"item_id":'
            + _json_text(item_id).encode()
            + b',"output_index":'
            + str(index).encode()
            + b',"content_index":0,"delta":'
        )
        part = {"item_id": item_id, "output_index": index, "content_index": 0}
        return (
            out
            + self._event(
                "response.output_item.added",
                {"output_index": index, "item": message_item(item_id, [], "in_progress")},
            )
            + self._event("response.content_part.added", {**part, "part": text_part("")})
        )

    def _text_delta(self, text: str) -> bytes:
        """`_event("response.output_text.delta", …)` byte for byte, without building and
        dumping the whole event (a test holds the two to each other)."""
        return (
            self._delta_head
            + _json_text(text).encode()
            + b',"logprobs":[],"sequence_number":'
            + str(self._next()).encode()
            + b"}\n\n"
        )

    def _close(self) -> bytes:
        """Finish the open item, if any: its done events, and its place in the output."""
        index = len(self.output)
        if self.open == "message":
            item_id, text = self._item_id(), "".join(self.text)
            part = {"item_id": item_id, "output_index": index, "content_index": 0}
            item = message_item(item_id, [text_part(text)], "completed")
            out = (
                self._event(
                    "response.output_text.done", {**part, "text": text, "logprobs": self.logprobs}
                )
                + self._event("response.content_part.done", {**part, "part": text_part(text)})
                + self._event("response.output_item.done", {"output_index": index, "item": item})
            )
        elif self.open == "reasoning":
            item_id, text = self._reasoning_id(), "".join(self.reasoning)
            part = {"item_id": item_id, "output_index": index, "content_index": 0}
            item = reasoning_item(item_id, text, "completed")
            out = (
                self._event("response.reasoning_text.done", {**part, "text": text})
                + self._event("response.content_part.done", {**part, "part": reasoning_part(text)})
                + self._event("response.output_item.done", {"output_index": index, "item": item})
            )
        elif self.open == "function_call":
            neutral_id, name, arguments = self.call
            item = call_item(neutral_id, name, arguments, "completed", self.names)
            fields = {"item_id": item["id"], "output_index": index}
            out = self._event(
                "response.function_call_arguments.done",
                {**fields, "name": item["name"], "arguments": arguments},
            ) + self._event("response.output_item.done", {"output_index": index, "item": item})
        elif self.open == "custom_tool_call":
            neutral_id, name, arguments = self.call
            item = call_item(neutral_id, name, arguments, "completed", self.names)
            fields = {"item_id": item["id"], "output_index": index}
            delta = (
                self._event(
                    "response.custom_tool_call_input.delta", {**fields, "delta": item["input"]}
                )
                if item["input"]
                else b""
            )
            out = (
                delta
                + self._event(
                    "response.custom_tool_call_input.done", {**fields, "input": item["input"]}
                )
                + self._event("response.output_item.done", {"output_index": index, "item": item})
            )
        else:
            return b""
        self.open = None
        self.output.append(item)
        return out
