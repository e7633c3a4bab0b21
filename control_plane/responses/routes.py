"""Responses endpoints: POST /v1/responses (streamed or not), POST /v1/responses/input_tokens,
and clear 404s for the routes that read stored responses (cortex stores none)."""

from __future__ import annotations

import logging
import time
from typing import Any

from pydantic import BaseModel
from sanic import Blueprint, Request
from sanic.response import HTTPResponse, json

from control_plane import wire
from control_plane.canonical import TokenLogprob
from control_plane.errors import NotFound
from control_plane.fields import Dialect, refuse_unhonoured
from control_plane.generation import collect, count_prompt_tokens, generate
from control_plane.hosted_tools import note_dropped, tag_response
from control_plane.responses import translate
from control_plane.responses.protocol import InputTokensRequest, ResponsesRequest, field_path
from control_plane.responses.stream import ResponseStreamEncoder

blueprint = Blueprint("responses", url_prefix="/v1")
log = logging.getLogger("cortex.gateway.responses")
API = "responses"  # the `api` label of its metrics and request log lines
blueprint.on_response(tag_response)


def parse_body(model: type[BaseModel], request: Request) -> Any:
    return wire.parse_body(model, request, field_path)


@blueprint.post("/responses")
async def create_response(request: Request) -> HTTPResponse | None:
    body: ResponsesRequest = parse_body(ResponsesRequest, request)
    refuse_unhonoured(Dialect.RESPONSES, request.json)
    chat = translate.chat_request(body, request.ctx.request_id)
    note_dropped(request, translate.hosted_tools(body))
    response_id = f"resp_{request.ctx.request_id}"
    message_id = f"msg_{request.ctx.request_id}"
    settings = translate.echo(body)
    names = translate.call_names(body)
    created_at = int(time.time())
    with request.app.ctx.drain.hold():
        events = generate(request.app.ctx.fleet, request.app.ctx.metrics, chat, API)
        if not body.stream:
            logprobs: list[TokenLogprob] | None = [] if chat.top_logprobs is not None else None
            reasoning: list[str] = []
            text, calls, finished = await collect(events, logprobs, reasoning)
            return json(
                translate.response_body(
                    response_id,
                    body.model,
                    created_at,
                    settings,
                    message_id,
                    text,
                    calls,
                    finished,
                    names,
                    logprobs,
                    "".join(reasoning),
                )
            )
        encoder = ResponseStreamEncoder(
            response_id, body.model, settings, message_id, created_at, names
        )
        await wire.send_stream(request, events, encoder.event, encoder.error)
    return None


@blueprint.post("/responses/input_tokens")
async def input_tokens(request: Request) -> HTTPResponse:
    body: InputTokensRequest = parse_body(InputTokensRequest, request)
    chat = translate.chat_request(body, request.ctx.request_id)
    note_dropped(request, translate.hosted_tools(body))
    count = await count_prompt_tokens(request.app.ctx.fleet, chat)
    return json({"object": "response.input_tokens", "input_tokens": count})


def _not_stored(response_id: str) -> NotFound:
    return NotFound(
        f"No response with id {response_id!r}: cortex stores no responses (every response "
        "says store: false)",
        "response_id",
    )


@blueprint.route("/responses/<response_id>", methods=["GET", "DELETE"])
async def stored_response(request: Request, response_id: str) -> HTTPResponse:
    raise _not_stored(response_id)


@blueprint.get("/responses/<response_id>/input_items")
async def stored_input_items(request: Request, response_id: str) -> HTTPResponse:
    raise _not_stored(response_id)


@blueprint.post("/responses/<response_id>/cancel")
async def cancel_response(request: Request, response_id: str) -> HTTPResponse:
    raise _not_stored(response_id)
