"""OpenAI endpoints: GET /v1/models, POST /v1/chat/completions, POST /v1/completions."""

from __future__ import annotations

import time
import uuid
from typing import Any

from pydantic import BaseModel, ValidationError
from sanic import Blueprint, Request
from sanic.response import HTTPResponse, json

from control_plane.canonical import Finished, TextDelta, Waiting
from control_plane.errors import CortexError, InvalidRequest, openai_body
from control_plane.generation import collect, generate
from control_plane.openai import translate
from control_plane.openai.protocol import ChatCompletionRequest, CompletionRequest

blueprint = Blueprint("openai", url_prefix="/v1")


def parse_body(model: type[BaseModel], request: Request) -> Any:
    try:
        body = request.json
    except Exception:
        raise InvalidRequest("the body is not valid JSON") from None
    if not isinstance(body, dict):
        raise InvalidRequest("the body must be a JSON object")
    try:
        return model.model_validate(body)
    except ValidationError as error:
        first = error.errors()[0]
        path = "".join(
            f"[{part}]" if isinstance(part, int) else f".{part}" for part in first["loc"]
        ).lstrip(".")
        raise InvalidRequest(f"{path}: {first['msg']}", param=path or None) from None


def model_list(request: Request) -> list[dict[str, Any]]:
    fleet = request.app.ctx.fleet
    snapshot = fleet.snapshot()
    models = []
    for name, entry in sorted(snapshot.catalogue().items()):
        models.append(
            {
                "id": name,
                "object": "model",
                "created": 0,
                "owned_by": "cortex",
                "loaded_on": snapshot.loaded_on(name),
                "aliases": list(entry.profile.aliases),
                "context_length": entry.context_length,
                "engine": entry.profile.engine.value,
                "quantization": entry.profile.quantization.value,
            }
        )
    return models


@blueprint.get("/models")
async def list_models(request: Request) -> HTTPResponse:
    return json({"object": "list", "data": model_list(request)})


@blueprint.post("/chat/completions")
async def chat_completions(request: Request) -> HTTPResponse | None:
    body: ChatCompletionRequest = parse_body(ChatCompletionRequest, request)
    request_id = f"chatcmpl-{request.ctx.request_id}"
    chat = translate.chat_request(body, request.ctx.request_id)
    events = generate(request.app.ctx.fleet, request.app.ctx.metrics, chat, "openai")
    if not body.stream:
        text, calls, finished = await collect(events)
        return json(
            translate.chat_completion(
                request_id, _model_of(request, body.model), text, calls, finished
            )
        )
    first = await events.__anext__()  # errors before the stream starts are plain HTTP errors
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    encoder = translate.ChunkEncoder(request_id, _model_of(request, body.model), include_usage)
    response = await request.respond(content_type="text/event-stream", headers=_sse_headers())
    try:
        await response.send(encoder.start())
        await _send(response, encoder, first)
        async for event in events:
            await _send(response, encoder, event)
        await response.send(encoder.done())
    except CortexError as error:
        await response.send(encoder.error(openai_body(error)))
        await response.send(encoder.done())
    finally:
        await events.aclose()
    await response.eof()
    return None


async def _send(response: Any, encoder: translate.ChunkEncoder, event: object) -> None:
    if isinstance(event, Waiting):
        await response.send(encoder.keep_alive())
        return
    data = encoder.event(event)
    if data:
        await response.send(data)


def _sse_headers() -> dict[str, str]:
    return {"cache-control": "no-cache", "x-accel-buffering": "no"}


def _model_of(request: Request, requested: str) -> str:
    return requested


@blueprint.post("/completions")
async def completions(request: Request) -> HTTPResponse | None:
    body: CompletionRequest = parse_body(CompletionRequest, request)
    request_id = f"cmpl-{request.ctx.request_id}"
    chat = translate.completion_request(body, request.ctx.request_id)
    events = generate(request.app.ctx.fleet, request.app.ctx.metrics, chat, "openai")
    if not body.stream:
        text, _calls, finished = await collect(events)
        return json(translate.completion_body(request_id, body.model, text, finished))
    first = await events.__anext__()
    response = await request.respond(content_type="text/event-stream", headers=_sse_headers())
    pending = [first]
    try:
        async for event in _chain(pending, events):
            if isinstance(event, Waiting):
                await response.send(translate.ChunkEncoder.keep_alive())
            elif isinstance(event, TextDelta) and event.text:
                await response.send(
                    translate.completion_chunk(request_id, body.model, event.text, None)
                )
            elif isinstance(event, Finished):
                finish = translate.FINISH_REASONS[event.reason]
                await response.send(translate.completion_chunk(request_id, body.model, "", finish))
        await response.send(translate.ChunkEncoder.done())
    except CortexError as error:
        await response.send(translate.ChunkEncoder.error(openai_body(error)))
        await response.send(translate.ChunkEncoder.done())
    finally:
        await events.aclose()
    await response.eof()
    return None


async def _chain(first: list[Any], rest: Any) -> Any:
    for event in first:
        yield event
    async for event in rest:
        yield event


def new_request_id() -> str:
    return uuid.uuid4().hex[:24] + f"{int(time.time()) % 1000:03d}"
