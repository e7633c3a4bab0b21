"""OpenAI endpoints: GET /v1/models, POST /v1/chat/completions, POST /v1/completions."""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, Callable
from typing import Any

from pydantic import BaseModel
from sanic import Blueprint, Request
from sanic.response import HTTPResponse, json

from control_plane import keys, wire
from control_plane.anthropic import routes as anthropic_routes
from control_plane.canonical import Event, Finished, TextDelta, TokenLogprob, Waiting
from control_plane.errors import CortexError, ModelForbidden, openai_body
from control_plane.fields import Dialect, refuse_unhonoured
from control_plane.generation import collect, generate
from control_plane.hosted_tools import note_dropped, tag_response
from control_plane.openai import translate
from control_plane.openai.protocol import ChatCompletionRequest, CompletionRequest
from control_plane.openai.translate import ChunkEncoder

blueprint = Blueprint("openai", url_prefix="/v1")
blueprint.on_response(tag_response)
log = logging.getLogger("cortex.gateway.openai")


def field_path(loc: tuple[int | str, ...]) -> str:
    """Pydantic's error location as OpenAI spells it: `messages[0].content`."""
    return "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc).lstrip(".")


def parse_body(model: type[BaseModel], request: Request) -> Any:
    return wire.parse_body(model, request, field_path)


def model_list(request: Request) -> list[dict[str, Any]]:
    fleet = request.app.ctx.fleet
    snapshot = fleet.snapshot()
    models = []
    for name, entry in sorted(snapshot.catalogue().items()):
        if not keys.may_see(name):
            continue
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
    # One path, two dialects: Anthropic clients always send anthropic-version.
    if "anthropic-version" in request.headers:
        return json(anthropic_routes.models_page(request))
    return json({"object": "list", "data": model_list(request)})


@blueprint.get("/models/<model_id:path>")
async def get_model(request: Request, model_id: str) -> HTTPResponse:
    entry = request.app.ctx.fleet.resolve(model_id)
    if not keys.may_see(model_id, entry.profile.name):
        raise ModelForbidden(model_id)
    if "anthropic-version" in request.headers:
        return json(anthropic_routes.model_info(model_id, model_id, entry.context_length))
    return json({"id": model_id, "object": "model", "created": 0, "owned_by": "cortex"})


@blueprint.post("/chat/completions")
async def chat_completions(request: Request) -> HTTPResponse | None:
    body: ChatCompletionRequest = parse_body(ChatCompletionRequest, request)
    refuse_unhonoured(Dialect.CHAT, request.json)
    request_id = f"chatcmpl-{request.ctx.request_id}"
    chat = translate.chat_request(body, request.ctx.request_id)
    note_dropped(request, translate.hosted_tools(body))
    with request.app.ctx.drain.hold():
        events = generate(request.app.ctx.fleet, request.app.ctx.metrics, chat, "openai")
        if not body.stream:
            logprobs: list[TokenLogprob] | None = [] if chat.top_logprobs is not None else None
            reasoning: list[str] = []
            text, calls, finished = await collect(events, logprobs, reasoning)
            return json(
                translate.chat_completion(
                    request_id, body.model, text, calls, finished, logprobs, "".join(reasoning)
                )
            )
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        encoder = translate.ChunkEncoder(request_id, body.model, include_usage)
        await _stream(request, events, encoder.start(), encoder.event)
    return None


@blueprint.post("/completions")
async def completions(request: Request) -> HTTPResponse | None:
    body: CompletionRequest = parse_body(CompletionRequest, request)
    refuse_unhonoured(Dialect.COMPLETIONS, request.json)
    request_id = f"cmpl-{request.ctx.request_id}"
    chat = translate.completion_request(body, request.ctx.request_id)

    offset = 0  # of the next token's text in the whole completion

    def chunk(event: Event) -> bytes:
        nonlocal offset
        if isinstance(event, TextDelta) and event.logprobs:
            logprobs = translate.completion_logprobs(list(event.logprobs), offset)
            offset += sum(len(entry.token) for entry in event.logprobs)
            return translate.completion_chunk(request_id, body.model, event.text, None, logprobs)
        if isinstance(event, TextDelta) and event.text:
            return translate.completion_chunk(request_id, body.model, event.text, None)
        if isinstance(event, Finished):
            finish = translate.FINISH_REASONS[event.reason]
            return translate.completion_chunk(request_id, body.model, "", finish)
        return b""

    with request.app.ctx.drain.hold():
        events = generate(request.app.ctx.fleet, request.app.ctx.metrics, chat, "openai")
        if not body.stream:
            logprobs: list[TokenLogprob] | None = [] if chat.top_logprobs is not None else None
            text, _calls, finished = await collect(events, logprobs)
            return json(translate.completion_body(request_id, body.model, text, finished, logprobs))
        await _stream(request, events, b"", chunk)
    return None


async def _stream(
    request: Request,
    events: AsyncGenerator[Event, None],
    opening: bytes,
    encode: Callable[[Event], bytes],
) -> None:
    """An OpenAI SSE stream: `data:` chunks, `: keep-alive` comments while waiting, `[DONE]`
    last; a failure after the first byte is `data: {"error": …}` before it."""

    def chunk(event: Event) -> bytes:
        return ChunkEncoder.keep_alive() if isinstance(event, Waiting) else encode(event)

    def error(cause: CortexError) -> bytes:
        return ChunkEncoder.error(openai_body(cause))

    await wire.send_stream(request, events, chunk, error, opening, ChunkEncoder.done())
