"""The gateway server: Config → startup (fleet polling, metrics) → serve → graceful shutdown.

Auth: client keys from cortex.toml (`control_plane.keys`: `[[keys]]` records with limits and a
priority, and the plain `[gateway] api_keys`), accepted as `x-api-key` or `Authorization:
Bearer`; none configured → open (the embedded default binds loopback only). Keys never reach
logs or metrics; usage is counted under each key's name. The console's static files at `/ui`
answer without a key (they hold no data); its JSON API needs one, and its actions an admin key.
Every error is rendered in the envelope of the dialect the client spoke.
"""

from __future__ import annotations

import asyncio
import gc
import json as json_module
import logging
import uuid
from types import SimpleNamespace

from prometheus_client import start_http_server
from sanic import Request, Sanic
from sanic.config import Config
from sanic.response import HTTPResponse, json

from control_plane.anthropic.routes import blueprint as anthropic_routes
from control_plane.console.routes import blueprint as console_routes
from control_plane.console.routes import is_console_page
from control_plane.errors import (
    AuthenticationFailed,
    BodyTooLarge,
    CortexError,
    InvalidRequest,
    NotFound,
    anthropic_body,
    anthropic_status,
    openai_body,
    openai_status,
)
from control_plane.fleet import Fleet
from control_plane.keys import (
    OPEN_CALLER,
    PRIORITY_HEADER,
    Client,
    Gate,
    KeyRing,
    client,
    parse_priority,
)
from control_plane.metrics import GatewayMetrics
from control_plane.openai.embeddings import blueprint as embedding_routes
from control_plane.openai.routes import blueprint as openai_routes
from control_plane.prompting import import_tokenizer_support
from control_plane.responses.routes import blueprint as responses_routes
from control_plane.shutdown import Drain
from cortex import logs
from cortex.config import CortexConfig, is_loopback, split_host_port

# The app as Sanic types it by default (its ctx is a SimpleNamespace that the app fills).
App = Sanic[Config, SimpleNamespace]

log = logging.getLogger("cortex.gateway")

# The largest body the gateway reads. A prompt that cannot fit any context is refused by its
# characters long before this (generation.prepare); this bounds the memory one request takes.
MAX_BODY_BYTES = 64 * 2**20


# Paths that answer without a key: liveness and Claude Code's warm-up probes.
OPEN_PATHS = frozenset({"/health", "/", "/api/hello"})


def is_anthropic(request: Request) -> bool:
    """Which envelope the client reads: by path where only one dialect lives, else by the
    `anthropic-version` header every Anthropic client sends (GET /v1/models serves both)."""
    if request.path.startswith("/v1/messages"):
        return True
    if request.path in ("/v1/chat/completions", "/v1/completions"):
        return False
    if request.path.startswith("/v1/responses"):
        return False
    return "anthropic-version" in request.headers


def render_error(request: Request, error: CortexError) -> HTTPResponse:
    if is_anthropic(request):
        request_id = f"req_{request_id_of(request)}"
        return json(
            anthropic_body(error, request_id),
            status=anthropic_status(error),
            headers=error.headers(),
        )
    return json(openai_body(error), status=openai_status(error), headers=error.headers())


def request_id_of(request: Request) -> str:
    """The request's id (the client's `x-request-id` if it sent one), made on first use: an
    unknown route fails before request middleware runs."""
    if not hasattr(request.ctx, "request_id"):
        request.ctx.request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
    return str(request.ctx.request_id)


def credentials(request: Request) -> list[str]:
    """Every key the request offers: Claude Code may send `x-api-key` and a bearer token."""
    offered = [request.headers.get("x-api-key") or ""]
    scheme, _, bearer = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer":
        offered.append(bearer.strip())
    return [key for key in offered if key]


def create_app(config: CortexConfig, name: str = "cortex-gateway") -> App:
    # The standard library's json reads a multi-MB prompt's one long string 4x faster than the
    # ujson Sanic picks when installed (3.7 against 16 ms for 5 MB), and it runs on the loop.
    app = Sanic(name, configure_logging=False, loads=json_module.loads)  # cortex.logs: lines
    app.config.RESPONSE_TIMEOUT = int(
        config.gateway.request_timeout_s + config.gateway.load_timeout_s
    )
    app.config.REQUEST_MAX_SIZE = MAX_BODY_BYTES
    app.config.KEEP_ALIVE_TIMEOUT = 75
    # Answers in flight are drained before Sanic stops (control_plane/shutdown.py); what is
    # left then is idle keep-alive connections.
    app.config.GRACEFUL_SHUTDOWN_TIMEOUT = 1.0
    app.ctx.config = config
    app.ctx.metrics = GatewayMetrics()
    app.blueprint(openai_routes)
    app.blueprint(embedding_routes)
    app.blueprint(anthropic_routes)
    app.blueprint(responses_routes)
    app.blueprint(console_routes)
    keys = KeyRing(config)
    app.ctx.gate = Gate(keys, app.ctx.metrics)
    listen_host = split_host_port(config.gateway.listen)[0]
    if not keys and not is_loopback(listen_host):
        log.warning(
            "the API listens on %s with no API keys: anyone who reaches it may use every model "
            "(set [gateway] api_keys, api_key_sha256, api_keys_env or api_keys_file)",
            config.gateway.listen,
        )

    @app.before_server_start
    async def start(app: App) -> None:
        app.ctx.drain = Drain(config.gateway.drain_timeout_s)
        app.ctx.fleet = Fleet(config, app.ctx.metrics)
        await app.ctx.fleet.start()
        host, port = split_host_port(config.gateway.metrics_listen)
        app.ctx.metrics_server = start_http_server(port, host, registry=app.ctx.metrics.registry)
        gc.freeze()  # what start-up made lives as long as the server: keep it out of GC passes
        app.ctx.warm_up = asyncio.create_task(warm_up())

    @app.after_server_start
    async def handle_signals(app: App) -> None:
        app.ctx.drain.install(lambda: app.stop(terminate=False))

    async def warm_up() -> None:
        # A model's first request builds its tokenizer, which imports transformers: do that now,
        # beside serving, rather than in front of that request (and its cold load).
        await asyncio.to_thread(import_tokenizer_support)
        gc.freeze()

    @app.after_server_stop
    async def stop(app: App) -> None:
        await app.ctx.fleet.stop()
        server = getattr(app.ctx, "metrics_server", None)
        if server is not None:
            server[0].shutdown()

    @app.on_request
    async def prepare(request: Request) -> HTTPResponse | None:
        # Set on every request: a keep-alive connection serves its requests in one task.
        logs.request_id.set(request_id_of(request))
        if request.path in OPEN_PATHS or is_console_page(request.path):
            return None
        who = keys.identify(credentials(request)) if keys else OPEN_CALLER
        if who is None:
            return render_error(request, AuthenticationFailed("invalid or missing API key"))
        try:
            asked = parse_priority(request.headers.get(PRIORITY_HEADER))
        except CortexError as error:
            return render_error(request, error)
        request.ctx.caller = who
        # Read where the request is generated (control_plane.generation), below the dialects.
        client.set(Client(app.ctx.gate, who, asked))
        return None

    @app.on_response
    async def identify(request: Request, response: HTTPResponse) -> None:
        # Anthropic's SDK exposes this header as the response's `_request_id`.
        response.headers.setdefault("request-id", f"req_{request_id_of(request)}")

    @app.exception(CortexError)
    async def cortex_error(request: Request, error: CortexError) -> HTTPResponse:
        return render_error(request, error)

    @app.exception(Exception)
    async def unexpected(request: Request, error: Exception) -> HTTPResponse:
        status = int(getattr(error, "status_code", 500))
        if status == 404:
            return render_error(request, NotFound(f"no route {request.method} {request.path}"))
        if status == 413:  # Sanic's PayloadTooLarge, before the body is read
            return render_error(request, BodyTooLarge(MAX_BODY_BYTES))
        if status == 405:
            return render_error(
                request, InvalidRequest(f"method {request.method} not allowed here")
            )
        log.exception("unexpected error on %s", request.path)
        wrapped = CortexError(f"internal error: {error.__class__.__name__}: {error}")
        return render_error(request, wrapped)

    @app.get("/health")
    async def health(request: Request) -> HTTPResponse:
        snapshot = request.app.ctx.fleet.snapshot()
        up = sum(1 for n in snapshot.nodes if n.up)
        return json({"status": "ok", "neurons_up": up, "neurons": len(snapshot.nodes)})

    return app
