"""Hosted tools: tools OpenAI runs on its own servers (web search, file search, a code
interpreter, image generation, computer use, remote MCP servers). Clients offer them by default
(Codex CLI sends `web_search` on every turn), and the gateway cannot run them, so they are left
out of what the model sees rather than failing the request: the model answers with the tools
the client runs. The response names what was left out in the `cortex-dropped-tools` header, and
the gateway logs it once per client. A request that *forces* a hosted tool (`tool_choice`
naming one) is still refused: it asks for something that cannot happen.

Pure apart from the one-per-client log.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from sanic import Request
from sanic.response import HTTPResponse

log = logging.getLogger("cortex.gateway")

HEADER = "cortex-dropped-tools"

# Tool types, and the families whose dated or preview names (`web_search_preview_2025_03_11`,
# `computer_use_preview`) are the same tool.
HOSTED_FAMILIES = (
    "web_search",
    "file_search",
    "code_interpreter",
    "image_generation",
    "computer_use",
)
HOSTED_TYPES = frozenset({*HOSTED_FAMILIES, "computer", "mcp"})

# Clients already told, by (user agent, dropped types); bounded so it cannot grow for ever.
_LOGGED: set[tuple[str, tuple[str, ...]]] = set()
_LOGGED_MAX = 4096


def is_hosted(tool_type: str) -> bool:
    """Whether a tool of this type runs on the provider's servers (never here)."""
    return tool_type in HOSTED_TYPES or tool_type.startswith(
        tuple(f"{family}_" for family in HOSTED_FAMILIES)
    )


def forced_hosted(tool_choice: object) -> str | None:
    """The hosted tool type a `tool_choice` forces (`{"type": "web_search"}`), or None."""
    if isinstance(tool_choice, dict):
        kind = tool_choice.get("type")
        if isinstance(kind, str) and is_hosted(kind):
            return kind
    return None


def note_dropped(request: Request, dropped: Iterable[str]) -> None:
    """Remember for the response header what was left out, and log it once per client."""
    names = tuple(sorted(set(dropped)))
    if not names:
        return
    request.ctx.dropped_tools = names
    client = request.headers.get("user-agent", "")
    if (client, names) in _LOGGED:
        return
    if len(_LOGGED) >= _LOGGED_MAX:
        _LOGGED.clear()
    _LOGGED.add((client, names))
    log.info(
        "hosted tools left out of requests from %s: %s (the gateway cannot run them; the "
        "response's %s header names them)",
        client or "a client without a user agent",
        ", ".join(names),
        HEADER,
    )


async def tag_response(request: Request, response: HTTPResponse) -> None:
    """Response middleware: name the left-out tools in the response's header."""
    names: tuple[str, ...] | None = getattr(request.ctx, "dropped_tools", None)
    if names:
        response.headers[HEADER] = ", ".join(names)
