"""Anthropic endpoints: POST /v1/messages, POST /v1/messages/count_tokens, the Anthropic shape
of the model list, and the warm-up probes Claude Code sends (HEAD /api/hello, HEAD /).

Paths are matched without their query string, so the `?beta=true` that Claude Code and older
SDKs append reaches the same handlers. Any `anthropic-version` and `anthropic-beta` is accepted.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator
from typing import Any

from pydantic import BaseModel
from sanic import Blueprint, Request
from sanic.response import HTTPResponse, empty, json

from control_plane import keys, wire
from control_plane.anthropic import translate
from control_plane.anthropic.protocol import CountTokensRequest, MessagesRequest, field_path
from control_plane.canonical import Event
from control_plane.errors import CortexError, InvalidRequest, anthropic_body
from control_plane.fields import Dialect, refuse_unhonoured
from control_plane.generation import collect, count_prompt_tokens, generate

blueprint = Blueprint("anthropic")
log = logging.getLogger("cortex.gateway.anthropic")
EPOCH = "1970-01-01T00:00:00Z"  # the model list's created_at when the release date is unknown


def parse_body(model: type[BaseModel], request: Request) -> Any:
    return wire.parse_body(model, request, field_path)


def anthropic_request_id(request: Request) -> str:
    return f"req_{request.ctx.request_id}"


@blueprint.post("/v1/messages")
async def messages(request: Request) -> HTTPResponse | None:
    body: MessagesRequest = parse_body(MessagesRequest, request)
    refuse_unhonoured(Dialect.MESSAGES, request.json)
    if body.metadata and body.metadata.get("user_id"):
        log.debug("request %s for user %s", request.ctx.request_id, body.metadata["user_id"])
    message_id = f"msg_{request.ctx.request_id}"
    chat = translate.chat_request(body, request.ctx.request_id)
    with request.app.ctx.drain.hold():
        events = generate(request.app.ctx.fleet, request.app.ctx.metrics, chat, "anthropic")
        thinking = translate.Thinking.asked(body.thinking)
        if not body.stream:
            reasoning: list[str] = []
            text, calls, finished = await collect(events, reasoning=reasoning)
            return json(
                translate.message_body(
                    message_id, body.model, text, calls, finished, "".join(reasoning), thinking
                )
            )
        await _stream(request, body, message_id, events)
    return None


async def _stream(
    request: Request, body: MessagesRequest, message_id: str, events: AsyncGenerator[Event, None]
) -> None:
    encoder = translate.MessageStreamEncoder(
        message_id, body.model, translate.Thinking.asked(body.thinking)
    )

    def error(cause: CortexError) -> bytes:
        # After the first byte the status is sent: the failure is the stream's last event.
        return encoder.error(anthropic_body(cause, anthropic_request_id(request)))

    await wire.send_stream(request, events, encoder.event, error)


@blueprint.post("/v1/messages/count_tokens")
async def count_tokens(request: Request) -> HTTPResponse:
    body: CountTokensRequest = parse_body(CountTokensRequest, request)
    chat = translate.chat_request(body, request.ctx.request_id)
    return json({"input_tokens": await count_prompt_tokens(request.app.ctx.fleet, chat)})


@blueprint.route("/api/hello", methods=["GET", "HEAD"])
async def hello(request: Request) -> HTTPResponse:
    """Claude Code's connection warm-up: answered at once, without auth."""
    return empty(status=200) if request.method == "HEAD" else json({"status": "ok"})


@blueprint.route("/", methods=["GET", "HEAD"])
async def root(request: Request) -> HTTPResponse:
    return empty(status=200) if request.method == "HEAD" else json({"name": "cortex"})


# ---- the model list in Anthropic's shape (GET /v1/models with an anthropic-version header) ----


def model_info(model_id: str, display_name: str, context_length: int) -> dict[str, Any]:
    return {
        "type": "model",
        "id": model_id,
        "display_name": display_name,
        "created_at": EPOCH,
        "lifecycle": "active",
        "max_input_tokens": context_length,
        "max_tokens": context_length,
    }


def model_infos(request: Request) -> list[dict[str, Any]]:
    """Every model, then every alias that is a plain name (not a pattern such as `claude-*`):
    Claude Code's model discovery keeps only ids that contain "claude"."""
    catalogue = sorted(request.app.ctx.fleet.snapshot().catalogue().items())
    infos = [
        model_info(name, name, entry.context_length)
        for name, entry in catalogue
        if keys.may_see(name)
    ]
    seen = {name for name, _ in catalogue}
    for name, entry in catalogue:
        for alias in entry.profile.aliases:
            if not keys.may_see(alias, name):
                continue
            if alias not in seen and not any(c in alias for c in "*?["):
                seen.add(alias)
                infos.append(model_info(alias, f"{alias} ({name})", entry.context_length))
    return infos


def models_page(request: Request) -> dict[str, Any]:
    """One page of the list: `limit` (1–1000, default 20), `after_id`, `before_id`."""
    infos = model_infos(request)
    ids = [info["id"] for info in infos]
    try:
        limit = int(request.args.get("limit", 20))
    except ValueError:
        raise InvalidRequest("limit: Input should be a valid integer", "limit") from None
    if not 1 <= limit <= 1000:
        raise InvalidRequest("limit: Input should be between 1 and 1000", "limit")
    after, before = request.args.get("after_id"), request.args.get("before_id")
    start, end = 0, len(infos)
    if after is not None:
        start = ids.index(after) + 1 if after in ids else len(infos)
    if before is not None:
        end = ids.index(before) if before in ids else 0
        start = max(start, end - limit)
    page = infos[start : min(end, start + limit)]
    more = start + len(page) < end if before is None else start > 0
    return {
        "data": page,
        "has_more": more,
        "first_id": page[0]["id"] if page else None,
        "last_id": page[-1]["id"] if page else None,
    }
