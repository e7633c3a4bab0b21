"""Bad input, generated: valid requests of both dialects with one part mutated (deleted, replaced
by a value of another kind, an empty one, a lone surrogate), sent raw to the embedded gateway.
Whatever the mutation, the answer is a success or a 4xx in the dialect's envelope that names the
field; a 5xx would be cortex's fault, and this fleet has no faulty node. A 503/529 must carry
Retry-After. Streams that start must end without an error event."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.conftest import Embedded

Path = tuple[int | str, ...]

TOOL_OPENAI = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
TOOL_ANTHROPIC = {
    "name": "get_weather",
    "description": "The weather in a city",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
}
# (path, dialect, a valid body)
VALID: list[tuple[str, str, dict[str, Any]]] = [
    (
        "/v1/chat/completions",
        "openai",
        {
            "model": "cortex-tiny",
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "What is a list?"}]},
            ],
            "max_tokens": 3,
            "tools": [TOOL_OPENAI],
            "stop": ["\n\n"],
            "temperature": 0.5,
            "stream": True,
        },
    ),
    (
        "/v1/completions",
        "openai",
        {"model": "cortex-tiny", "prompt": "def main():", "max_tokens": 3, "seed": 1},
    ),
    (
        "/v1/messages",
        "anthropic",
        {
            "model": "claude-haiku-4-5",
            "max_tokens": 3,
            "system": [{"type": "text", "text": "Be brief."}],
            "messages": [
                {"role": "user", "content": "What is a dict?"},
                {"role": "assistant", "content": [{"type": "text", "text": "A mapping"}]},
            ],
            "tools": [TOOL_ANTHROPIC],
            "stream": True,
        },
    ),
    (
        "/v1/messages/count_tokens",
        "anthropic",
        {
            "model": "claude-haiku-4-5",
            "system": "Be brief.",
            "messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
            "tools": [TOOL_ANTHROPIC],
        },
    ),
]

REPLACEMENTS: st.SearchStrategy[Any] = st.one_of(
    st.sampled_from([None, "", "\ud800", "a\udfffb", [], {}, 0, -1, 10**12, 1.5, True, "x" * 300]),
    st.text(max_size=8),
    st.integers(),
    st.lists(st.integers(), max_size=2),
)


def paths(value: Any, prefix: Path = ()) -> list[Path]:
    """Every place in a JSON value, nested ones included (not the root)."""
    found: list[Path] = []
    items: list[tuple[int | str, Any]] = []
    if isinstance(value, dict):
        items = list(value.items())
    elif isinstance(value, list):
        items = list(enumerate(value))
    for key, item in items:
        found.append((*prefix, key))
        found.extend(paths(item, (*prefix, key)))
    return found


def mutated(body: dict[str, Any], path: Path, replacement: Any, delete: bool) -> dict[str, Any]:
    out = copy.deepcopy(body)
    parent: Any = out
    for key in path[:-1]:
        parent = parent[key]
    if delete:
        del parent[path[-1]]
    else:
        parent[path[-1]] = replacement
    return out


@st.composite
def bad_requests(draw: st.DrawFn) -> tuple[str, str, dict[str, Any], str]:
    route, dialect, valid = draw(st.sampled_from(VALID))
    path = draw(st.sampled_from(paths(valid)))
    delete = draw(st.booleans())
    body = mutated(valid, path, draw(REPLACEMENTS), delete)
    return route, dialect, body, str(path[0])


@pytest.fixture(scope="module")
def http(embedded: Embedded) -> Iterator[httpx.Client]:
    root = embedded.base_url.removesuffix("/v1")
    with httpx.Client(base_url=root, timeout=60) as client:
        yield client


def check(http: httpx.Client, route: str, dialect: str, body: dict[str, Any], field: str) -> None:
    headers = {"content-type": "application/json"}
    if dialect == "anthropic":
        headers["anthropic-version"] = "2023-06-01"
    # ensure_ascii keeps a lone surrogate as the escape a client sends, not as broken UTF-8.
    content = json.dumps(body, ensure_ascii=True).encode()
    with http.stream("POST", route, content=content, headers=headers) as response:
        data = response.read().decode("utf-8", errors="replace")
    status = response.status_code
    shown = f"{route} {json.dumps(body)[:400]} → {status} {data[:400]}"
    assert status < 500, shown
    if status in (503, 529):
        assert response.headers.get("retry-after"), shown
    if status < 400:
        if response.headers.get("content-type", "").startswith("text/event-stream"):
            assert '"error"' not in data, shown
        return
    error = json.loads(data)
    if dialect == "anthropic":
        assert error["type"] == "error", shown
        assert error["error"]["type"] in ("invalid_request_error", "not_found_error"), shown
        named = error["error"]["message"]
    else:
        assert set(error["error"]) == {"message", "type", "param", "code"}, shown
        assert error["error"]["type"] == "invalid_request_error", shown
        named = f"{error['error']['param']} {error['error']['message']}"
    assert field in named, shown


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(bad_requests())
# Found by the bounded run that filed issue 15 (each was a 5xx):
@example(
    (
        "/v1/chat/completions",
        "openai",
        {**VALID[0][2], "messages": [{"role": "user", "content": "\ud800"}]},
        "messages",
    )
)
@example(("/v1/messages", "anthropic", {**VALID[2][2], "system": "a\udc00"}, "system"))
@example(
    (
        "/v1/messages/count_tokens",
        "anthropic",
        {**VALID[3][2], "tools": [{**TOOL_ANTHROPIC, "description": "\ud83d"}]},
        "tools",
    )
)
@example(
    (
        "/v1/messages/count_tokens",
        "anthropic",
        {"model": "claude-haiku-4-5", "messages": [{"role": "assistant", "content": ""}]},
        "messages",
    )
)
@example(("/v1/messages/count_tokens", "anthropic", {**VALID[3][2], "messages": []}, "messages"))
@example(("/v1/completions", "openai", {**VALID[1][2], "prompt": ""}, "prompt"))
def test_bad_input_is_a_4xx_that_names_the_field(
    http: httpx.Client, case: tuple[str, str, dict[str, Any], str]
) -> None:
    check(http, *case)
