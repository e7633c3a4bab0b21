"""The lifecycle API (JSON over HTTP, bearer token when configured).

    GET  /health   GET /status   POST /models/load   POST /models/unload
    POST /models/sleep   POST /models/wake   (a loaded model's residency tier)
    POST /models/pin     {"model", "pinned"}: kept in the state folder over models.toml
    GET  /models/<name>/tokenizer
    GET  /metrics  this node's Triton metrics (Prometheus text), which Triton serves on loopback,
                   and the torch engines' own counters (`engine_metrics`)

Who may reach it: gateways (the lifecycle calls) and Prometheus (/metrics), with the node's
bearer token; /health answers anyone. A neuron without a token listens on loopback only
(`cortex.config` refuses anything else unless `allow_unauthenticated` is set).

Bad input gets a JSON error with a clear message: malformed body 400, wrong token 401, unknown
model 404, won't fit 409, Triton failure 502. Nothing a client sends can crash the agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import time
from types import SimpleNamespace
from typing import Any

from pydantic import BaseModel, ValidationError
from sanic import Request, Sanic
from sanic.config import Config
from sanic.response import HTTPResponse, text
from sanic.response import json as json_response

from cortex import logs
from cortex.config import NeuronConfig
from cortex.neuron_api import (
    ErrorBody,
    Health,
    LoadRequest,
    PinRequest,
    SleepRequest,
    UnloadRequest,
)
from cortex.secrets import secret_matches
from neuron_agent.engine_metrics import render_engine_counters
from neuron_agent.errors import BadRequest, NodeError
from neuron_agent.node import Node

# The app as Sanic types it by default (its ctx is a SimpleNamespace that the app fills).
App = Sanic[Config, SimpleNamespace]

log = logging.getLogger("cortex.neuron.api")
# Polled every few seconds by every gateway: logged only at debug level.
QUIET_PATHS = frozenset({"/health", "/status"})


def _error(status: int, message: str, **detail: object) -> HTTPResponse:
    return json_response(ErrorBody(error=message, detail=detail).model_dump(), status=status)


def _parse(model: type[BaseModel], request: Request) -> Any:
    try:
        body = json.loads(request.body or b"null")
    except ValueError:
        raise BadRequest("the body is not valid JSON") from None
    if not isinstance(body, dict):
        raise BadRequest('the body must be a JSON object such as {"model": "name"}')
    try:
        return model.model_validate(body)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        raise BadRequest(f"{where}: {first['msg']}") from None


def create_app(config: NeuronConfig, node: Node | None = None) -> App:
    name = f"cortex-neuron-{config.neuron.name}".replace("_", "-")
    app = Sanic(name, configure_logging=False)  # cortex.logs formats every line
    app.config.RESPONSE_TIMEOUT = 3600  # a large model's load takes minutes
    app.config.REQUEST_TIMEOUT = 60
    app.config.FALLBACK_ERROR_FORMAT = "json"
    node = node or Node.from_config(config)
    app.ctx.node = node
    token = config.neuron.bearer_token()

    @app.before_server_start
    async def start(app: App) -> None:
        await node.start()
        # SIGHUP re-reads models.toml (only where this server owns the process's signals).
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            asyncio.get_running_loop().add_signal_handler(
                signal.SIGHUP,
                lambda: asyncio.ensure_future(node.catalogue_watch.reload("SIGHUP")),
            )

    @app.before_server_stop
    async def stop(app: App) -> None:
        await node.stop()

    @app.on_request
    async def identify(request: Request) -> None:
        request.ctx.started = time.monotonic()
        request.ctx.request_id = request.headers.get("x-request-id")
        logs.request_id.set(request.ctx.request_id)

    @app.on_response
    async def log_request(request: Request, response: HTTPResponse) -> None:
        started = getattr(request.ctx, "started", time.monotonic())
        request_id = getattr(request.ctx, "request_id", None)
        log.log(
            logging.DEBUG if request.path in QUIET_PATHS else logging.INFO,
            "%s %s %s %.3f s request_id=%s",
            request.method,
            request.path,
            response.status,
            time.monotonic() - started,
            request_id or "-",
            extra={
                "method": request.method,
                "path": request.path,
                "status": response.status,
                "request_id": request_id,
            },
        )

    @app.on_request
    async def authenticate(request: Request) -> HTTPResponse | None:
        if not token or request.path == "/health":
            return None
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not secret_matches(given.strip(), token):
            return _error(401, "missing or wrong bearer token")
        return None

    @app.exception(NodeError)
    async def node_error(request: Request, error: NodeError) -> HTTPResponse:
        return _error(error.status, str(error), **error.detail)

    @app.exception(Exception)
    async def unexpected(request: Request, error: Exception) -> HTTPResponse:
        status = getattr(error, "status_code", 500)
        if status >= 500:
            log.exception("unexpected error on %s", request.path)
        return _error(status, str(error) or error.__class__.__name__)

    @app.get("/health")
    async def health(request: Request) -> HTTPResponse:
        live = await node.supervisor.live()
        body = Health(status="ok" if live else "degraded", triton_live=live)
        return json_response(body.model_dump(), status=200 if live else 503)

    @app.get("/metrics")
    async def metrics(request: Request) -> HTTPResponse:
        scraped = await node.supervisor.metrics_text()
        if scraped is None:
            return _error(502, "Triton's metrics endpoint does not answer")
        scraped += render_engine_counters(node.engine_counters())
        return text(scraped, content_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/status")
    async def status(request: Request) -> HTTPResponse:
        return json_response((await node.status()).model_dump(mode="json"))

    @app.post("/models/load")
    async def load(request: Request) -> HTTPResponse:
        body: LoadRequest = _parse(LoadRequest, request)
        loaded = await node.load(body.model, body.gpus)
        return json_response(loaded.model_dump(mode="json"))

    @app.post("/models/sleep")
    async def sleep(request: Request) -> HTTPResponse:
        body: SleepRequest = _parse(SleepRequest, request)
        return json_response((await node.sleep(body.model)).model_dump(mode="json"))

    @app.post("/models/wake")
    async def wake(request: Request) -> HTTPResponse:
        body: SleepRequest = _parse(SleepRequest, request)
        return json_response((await node.wake(body.model)).model_dump(mode="json"))

    @app.post("/models/pin")
    async def pin(request: Request) -> HTTPResponse:
        body: PinRequest = _parse(PinRequest, request)
        return json_response(node.pin(body.model, body.pinned).model_dump(mode="json"))

    @app.post("/models/unload")
    async def unload(request: Request) -> HTTPResponse:
        body: UnloadRequest = _parse(UnloadRequest, request)
        result = await node.unload(body.model, body.force)
        return json_response(result.model_dump(mode="json"))

    @app.get("/models/<name:str>/tokenizer")
    async def tokenizer(request: Request, name: str) -> HTTPResponse:
        # Off the event loop: a GGUF source's tokenizer is converted on first use (seconds).
        files = await asyncio.to_thread(node.catalogue.tokenizer_files, name)
        return json_response(files.model_dump(mode="json"))

    return app
