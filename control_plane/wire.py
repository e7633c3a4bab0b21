"""Reading a client's JSON body into a dialect's wire model, once for both dialects."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ValidationError
from sanic import Request

from control_plane.errors import InvalidRequest

FieldPath = Callable[[tuple[int | str, ...]], str]


def parse_body(model: type[BaseModel], request: Request, field_path: FieldPath) -> Any:
    """The validated body, or InvalidRequest naming the first bad field as the dialect spells it."""
    try:
        body = request.json
    except Exception:
        raise InvalidRequest("the body is not valid JSON") from None
    if not isinstance(body, dict):
        raise InvalidRequest("the body must be a JSON object")
    try:
        return model.model_validate(body)
    except ValidationError as error:
        first = error.errors()[0]
        path = field_path(tuple(first["loc"]))
        raise InvalidRequest(f"{path}: {first['msg']}", param=path or None) from None
