"""Reading a client's JSON body into a dialect's wire model, once for both dialects."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ValidationError
from sanic import Request

from control_plane.errors import InvalidRequest

Location = tuple[int | str, ...]
FieldPath = Callable[[Location], str]


def parse_body(model: type[BaseModel], request: Request, field_path: FieldPath) -> Any:
    """The validated body, or InvalidRequest naming the first bad field as the dialect spells it."""
    try:
        body = request.json
    except Exception:
        raise InvalidRequest("the body is not valid JSON") from None
    if not isinstance(body, dict):
        raise InvalidRequest("the body must be a JSON object")
    broken = unencodable(body)
    if broken is not None:
        path = field_path(broken)
        raise InvalidRequest(
            f"{path}: the text is not valid Unicode (a lone surrogate)", param=path or None
        )
    try:
        return model.model_validate(body)
    except ValidationError as error:
        first = error.errors()[0]
        path = field_path(tuple(first["loc"]))
        raise InvalidRequest(f"{path}: {first['msg']}", param=path or None) from None


def unencodable(value: Any, path: Location = ()) -> Location | None:
    """Where the first string that cannot be UTF-8 is (JSON lets `"\\ud800"` through; tokenizers
    refuse it), or None. Keys count too: they reach templates as tool parameter names."""
    if isinstance(value, str):
        if value.isascii():
            return None
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            found = unencodable(key, (*path, key)) or unencodable(item, (*path, key))
            if found is not None:
                return found
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found = unencodable(item, (*path, index))
            if found is not None:
                return found
    return None
