"""The HTTP side every dialect shares: reading a client's JSON body into the dialect's wire model,
and sending a generation as a server-sent event stream in the dialect's encoding."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Callable
from typing import Any

from pydantic import BaseModel, ValidationError
from sanic import Request

from control_plane.canonical import Event
from control_plane.errors import CortexError, InvalidRequest, UpstreamFailed

log = logging.getLogger("cortex.gateway")

Location = tuple[int | str, ...]
FieldPath = Callable[[Location], str]


def parse_body(model: type[BaseModel], request: Request, field_path: FieldPath) -> Any:
    """The validated body, or InvalidRequest naming the first bad field as the dialect spells it."""
    try:
        body = request.json
    except Exception:
        raise InvalidRequest("the body is not valid JSON") from None
    if not isinstance(body, dict):
        raise InvalidRequest("the body must be a JSON object")
    broken = unencodable(body)
    if broken is not None:
        path = field_path(broken)
        raise InvalidRequest(
            f"{path}: the text is not valid Unicode (a lone surrogate)", param=path or None
        )
    try:
        return model.model_validate(body)
    except ValidationError as error:
        first = error.errors()[0]
        path = field_path(tuple(first["loc"]))
        raise InvalidRequest(f"{path}: {first['msg']}", param=path or None) from None


def unencodable(value: Any, path: Location = ()) -> Location | None:
    """Where the first string that cannot be UTF-8 is (JSON lets `"\\ud800"` through; tokenizers
    refuse it), or None. Keys count too: they reach templates as tool parameter names."""
    if isinstance(value, str):
        if value.isascii():
            return None
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            found = unencodable(key, (*path, key)) or unencodable(item, (*path, key))
            if found is not None:
                return found
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found = unencodable(item, (*path, index))
            if found is not None:
                return found
    return None


async def send_stream(
    request: Request,
    events: AsyncGenerator[Event, None],
    encode: Callable[[Event], bytes],
    error_event: Callable[[CortexError], bytes],
    opening: bytes = b"",
    closing: bytes = b"",
) -> None:
    """Send `events` as an SSE stream, each encoded by the dialect's `encode` (b"": nothing sent).

    The first event is awaited before the response starts, so what fails before it (a refusal,
    no node for the model) is a plain HTTP error. After that the status is sent: a failure
    becomes the stream's last event (`error_event`, in the dialect's error envelope), and so
    does a cut by the shutdown drain (with the drain's error), never a normal end; a client
    that went away ends it there. `opening` precedes the first event and `closing` (OpenAI's
    `[DONE]`) follows the last one, an error event included."""
    first = await events.__anext__()
    response = await request.respond(
        content_type="text/event-stream",
        headers={"cache-control": "no-cache", "x-accel-buffering": "no"},
    )
    try:
        if opening:
            await response.send(opening)
        data = encode(first)
        if data:
            await response.send(data)
        async for event in events:
            data = encode(event)
            if data:
                await response.send(data)
    except asyncio.CancelledError:
        cut = request.app.ctx.drain.cut_error()
        if cut is None:  # the client went away
            raise
        await response.send(error_event(cut))
    except Exception as error:
        if not isinstance(error, CortexError):
            log.exception("stream %s failed", request.ctx.request_id)
            error = UpstreamFailed(f"internal error: {error.__class__.__name__}: {error}")
        await response.send(error_event(error))
    finally:
        await events.aclose()
    if closing:
        await response.send(closing)
    await response.eof()
