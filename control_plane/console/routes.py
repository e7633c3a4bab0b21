"""The console's routes: its static files and its JSON API.

    GET  /ui, /ui/<file>           the page (plain HTML, CSS and JS shipped in the package)
    GET  /ui/api/state             nodes, models, key usage, recent errors     any valid key
    POST /ui/api/models/load       {"model", "node"?}: ready there, or somewhere (placed as a
                                   cold load would); a sleeping copy is woken   admin
    POST /ui/api/models/unload     {"model", "node"}                           admin
    POST /ui/api/models/pin        {"model"}: on every node that catalogues it  admin
    POST /ui/api/models/unpin      {"model"}                                   admin
    POST /ui/api/models/sleep      {"model", "node"?}: a READY copy sleeps      admin
    POST /ui/api/models/wake       {"model", "node"?}: an ASLEEP copy wakes     admin

The actions go through the fleet's own lifecycle calls (`Fleet.ensure_ready`, `load`, `unload`,
`sleep`, `pin`), so they are counted and logged as the gateway's own are (reason `console`).
What the model's state does not allow now is a 409 with a sentence: a sleep where its engine
cannot sleep or requests are in flight, an unload of a pinned model or of one in use, a wake of
a copy that is not asleep, a load the node has no room for.

Who may reach it: whoever reaches the gateway's API port. The static files hold no data and
answer without a key; the page asks for a key and sends it as `Authorization: Bearer` (kept in
the tab's sessionStorage, no cookie, so no other site can make the browser act with it). The API
needs a valid key when keys are configured, and its actions an `admin = true` key; on a gateway
without keys (loopback by default) everything is open, as the rest of its API is.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from importlib import resources
from typing import Any

from pydantic import BaseModel, ConfigDict
from sanic import Blueprint, Request
from sanic.response import HTTPResponse, json, raw

from control_plane import wire
from control_plane.console.state import RecentErrors, fleet_view, model_samples, visible_usage
from control_plane.errors import (
    Conflict,
    InvalidRequest,
    ModelUnavailable,
    NotFound,
    Overloaded,
    PermissionDenied,
)
from control_plane.keys import Caller
from control_plane.openai.routes import field_path
from control_plane.routing import FleetSnapshot, busy
from cortex.neuron_api import EvictionReason, ModelState

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


def _copies(snapshot: FleetSnapshot, model: str, state: ModelState) -> list[str]:
    """Up nodes that hold a copy of the model in `state`."""
    return [
        view.name
        for view in snapshot.nodes
        if view.up and model in view.loaded and view.loaded[model].state == state
    ]


def _copy_on(snapshot: FleetSnapshot, model: str, node: str | None, state: ModelState) -> str:
    """The node whose copy of the model an action is for: the one named, which must hold it
    in `state`, or else the one node that does (Conflict when none or several do)."""
    found = _copies(snapshot, model, state)
    if node is not None:
        if node not in found:
            held = next((v.loaded.get(model) for v in snapshot.nodes if v.name == node), None)
            now = f"is {held.state.value} there" if held else "is not loaded there"
            raise Conflict(f"{model} {now}, not {state.value}", "node")
        return node
    if not found:
        raise Conflict(f"no copy of {model} is {state.value} now")
    if len(found) > 1:
        raise Conflict(f"{model} is {state.value} on {', '.join(found)}: say which node", "node")
    return found[0]


@contextlib.contextmanager
def _node_refusals() -> Iterator[None]:
    """A neuron's 409 (no room, requests in flight, cannot sleep) is the admin's 409 too, not
    the overload a client's request would retry; so is a copy that left meanwhile (404), or no
    node that may hold the model being up."""
    try:
        yield
    except (Overloaded, ModelUnavailable) as error:
        raise Conflict(error.message) from None


@blueprint.post("/api/models/load")
async def load(request: Request) -> HTTPResponse:
    who = _admin(request)
    action = _action(request)
    fleet = request.app.ctx.fleet
    model = fleet.resolve(action.model).profile.name
    if action.node is None:
        log.info("console: %s loads %s", who.name, model)
        node = await fleet.ensure_ready(model)
        return json({"model": model, "node": node, "state": ModelState.READY.value})
    view = next((v for v in fleet.snapshot().nodes if v.name == action.node), None)
    if view is None or not view.up:
        raise NotFound(f"no node {action.node} is up", "node")
    if model not in view.catalogue():
        raise Conflict(f"{action.node} may not hold {model}", "node")
    held = view.loaded.get(model)
    if held is None or held.state != ModelState.READY:
        log.info("console: %s loads %s on %s", who.name, model, action.node)
        with _node_refusals():
            await fleet.load(action.node, model)  # a sleeping copy is woken
    return json({"model": model, "node": action.node, "state": ModelState.READY.value})


@blueprint.post("/api/models/unload")
async def unload(request: Request) -> HTTPResponse:
    who = _admin(request)
    action = _action(request)
    fleet = request.app.ctx.fleet
    entry = fleet.resolve(action.model)
    model = entry.profile.name
    if action.node is None:
        raise InvalidRequest("node: say which node to unload the model from", "node")
    if action.node not in fleet.snapshot().placed_on(model):
        raise NotFound(f"{model} is not loaded on {action.node}", "model")
    if entry.profile.pinned:
        raise Conflict(f"{model} is pinned: unpin it first, or it is loaded again")
    log.info("console: %s unloads %s from %s", who.name, model, action.node)
    with _node_refusals():
        await fleet.unload(action.node, model, EvictionReason.CONSOLE)
    result: dict[str, Any] = {"model": model, "node": action.node, "state": "UNLOADED"}
    return json(result)


async def _pin(request: Request, pinned: bool) -> HTTPResponse:
    who = _admin(request)
    action = _action(request)
    fleet = request.app.ctx.fleet
    model = fleet.resolve(action.model).profile.name
    if action.node is not None:
        raise InvalidRequest("node: a pin holds on every node that may hold the model", "node")
    log.info("console: %s %s %s", who.name, "pins" if pinned else "unpins", model)
    with _node_refusals():
        nodes = await fleet.pin(model, pinned)
    return json({"model": model, "pinned": pinned, "nodes": nodes})


@blueprint.post("/api/models/pin")
async def pin(request: Request) -> HTTPResponse:
    return await _pin(request, True)


@blueprint.post("/api/models/unpin")
async def unpin(request: Request) -> HTTPResponse:
    return await _pin(request, False)


@blueprint.post("/api/models/sleep")
async def sleep(request: Request) -> HTTPResponse:
    who = _admin(request)
    action = _action(request)
    fleet = request.app.ctx.fleet
    entry = fleet.resolve(action.model)
    model = entry.profile.name
    if not entry.can_sleep:
        profile = entry.profile
        raise Conflict(
            f"{model} cannot sleep (the catalogue says so of the {profile.engine.value} engine at "
            f"tp {profile.tp}{' with its own template' if profile.template else ''}): "
            "unload it instead"
        )
    snapshot = fleet.snapshot()
    node = _copy_on(snapshot, model, action.node, ModelState.READY)
    view = next(v for v in snapshot.nodes if v.name == node)
    in_flight = busy(view, model)
    if in_flight:
        raise Conflict(f"{model} has {in_flight} request(s) in flight on {node}; not sleeping")
    log.info("console: %s puts %s to sleep on %s", who.name, model, node)
    with _node_refusals():
        await fleet.sleep(node, model, EvictionReason.CONSOLE, unload_if_refused=False)
    return json({"model": model, "node": node, "state": ModelState.ASLEEP.value})


@blueprint.post("/api/models/wake")
async def wake(request: Request) -> HTTPResponse:
    who = _admin(request)
    action = _action(request)
    fleet = request.app.ctx.fleet
    model = fleet.resolve(action.model).profile.name
    node = _copy_on(fleet.snapshot(), model, action.node, ModelState.ASLEEP)
    log.info("console: %s wakes %s on %s", who.name, model, node)
    with _node_refusals():
        await fleet.load(node, model)  # the neuron wakes a sleeping copy
    return json({"model": model, "node": node, "state": ModelState.READY.value})
