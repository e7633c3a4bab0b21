"""The console's routes: its static files and its JSON API.

    GET  /ui, /ui/<file>           the page (plain HTML, CSS and JS shipped in the package)
    GET  /ui/api/state             nodes, models, key usage, recent errors     any valid key
    POST /ui/api/models/load       {"model"}: ready somewhere (placed as a cold load would)  admin
    POST /ui/api/models/unload     {"model", "node"}                           admin

Who may reach it: whoever reaches the gateway's API port. The static files hold no data and
answer without a key; the page asks for a key and sends it as `Authorization: Bearer` (kept in
the tab's sessionStorage, no cookie, so no other site can make the browser act with it). The API
needs a valid key when keys are configured, and its actions an `admin = true` key; on a gateway
without keys (loopback by default) everything is open, as the rest of its API is.
"""

from __future__ import annotations

import logging
from importlib import resources
from typing import Any

from pydantic import BaseModel, ConfigDict
from sanic import Blueprint, Request
from sanic.response import HTTPResponse, json, raw

from control_plane import wire
from control_plane.console.state import RecentErrors, fleet_view, model_samples, visible_usage
from control_plane.errors import InvalidRequest, NotFound, PermissionDenied
from control_plane.keys import Caller
from control_plane.openai.routes import field_path

blueprint = Blueprint("console", url_prefix="/ui")
log = logging.getLogger("cortex.gateway.console")

STATIC = resources.files("control_plane.console") / "static"
_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
}
# The page runs only its own script and styles and talks only to this gateway.
_HEADERS = {
    "content-security-policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
    ),
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cache-control": "no-cache",
}

recent_errors = RecentErrors()
logging.getLogger("cortex").addHandler(recent_errors)


def is_console_page(path: str) -> bool:
    """The console's static files, which answer without a key (its API does not)."""
    return (path == "/ui" or path.startswith("/ui/")) and not path.startswith("/ui/api/")


def _static(name: str) -> HTTPResponse:
    suffix = name[name.rfind(".") :] if "." in name else ""
    if "/" in name or name.startswith(".") or suffix not in _TYPES:
        raise NotFound(f"no console file {name}")
    file = STATIC / name
    if not file.is_file():
        raise NotFound(f"no console file {name}")
    return raw(file.read_bytes(), content_type=_TYPES[suffix], headers=_HEADERS)


@blueprint.get("/", strict_slashes=False)
async def page(request: Request) -> HTTPResponse:
    return _static("index.html")


@blueprint.get("/<name:str>")
async def static_file(request: Request, name: str) -> HTTPResponse:
    return _static(name)


def _caller(request: Request) -> Caller:
    found: Caller = request.ctx.caller
    return found


def _admin(request: Request) -> Caller:
    who = _caller(request)
    if not who.admin:
        raise PermissionDenied(f"the key {who.name!r} may read the console but not act on it")
    return who


@blueprint.get("/api/state")
async def state(request: Request) -> HTTPResponse:
    who = _caller(request)
    app = request.app
    nodes, models = fleet_view(app.ctx.fleet.snapshot(), model_samples(app.ctx.metrics.registry))
    return json(
        {
            "you": {"name": who.name, "admin": who.admin, "priority": who.priority.value},
            "nodes": nodes,
            "models": models,
            "keys": visible_usage(app.ctx.gate.status(), who.name, who.admin),
            "errors": recent_errors.recent() if who.admin else [],
        }
    )


class ModelAction(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    node: str | None = None


def _action(request: Request) -> ModelAction:
    action: ModelAction = wire.parse_body(ModelAction, request, field_path)
    return action


@blueprint.post("/api/models/load")
async def load(request: Request) -> HTTPResponse:
    who = _admin(request)
    action = _action(request)
    fleet = request.app.ctx.fleet
    model = fleet.resolve(action.model).profile.name
    log.info("console: %s loads %s", who.name, model)
    node = await fleet.ensure_ready(model)
    return json({"model": model, "node": node, "state": "READY"})


@blueprint.post("/api/models/unload")
async def unload(request: Request) -> HTTPResponse:
    who = _admin(request)
    action = _action(request)
    fleet = request.app.ctx.fleet
    snapshot = fleet.snapshot()
    holders = snapshot.placed_on(action.model)
    if action.node is None:
        raise InvalidRequest("node: say which node to unload the model from", "node")
    if action.node not in holders:
        raise NotFound(f"{action.model} is not loaded on {action.node}", "model")
    log.info("console: %s unloads %s from %s", who.name, action.model, action.node)
    await fleet.unload(action.node, action.model, "console")
    result: dict[str, Any] = {"model": action.model, "node": action.node, "state": "UNLOADED"}
    return json(result)
