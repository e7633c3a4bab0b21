"""OpenAI's POST /v1/embeddings, for models marked `embedding = true` in models.toml (served by
the llamacpp engine, which tokenizes, pools as the file declares and L2-normalizes).

Inputs are text (one string or a list of them); each vector comes back as floats or, with
`encoding_format: "base64"`, as the base64 of its little-endian float32 bytes, as OpenAI's API
and SDK have it. What cannot be honoured is refused with a 400 naming the field: a chat model,
token-array inputs (the engine tokenizes with the file's own tokenizer), `dimensions`.
"""

from __future__ import annotations

import base64
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict
from sanic import Blueprint, Request
from sanic.response import HTTPResponse, json

from control_plane.errors import InvalidRequest
from control_plane.openai.routes import parse_body

blueprint = Blueprint("openai_embeddings", url_prefix="/v1")


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None


def input_texts(body: EmbeddingRequest) -> list[str]:
    """The texts to embed, or InvalidRequest naming `input`."""
    texts = [body.input] if isinstance(body.input, str) else body.input
    if not texts:
        raise InvalidRequest("input: give at least one text", param="input")
    if not all(isinstance(text, str) for text in texts):
        raise InvalidRequest(
            "input: token-id inputs are not supported; send the text (the model's own "
            "tokenizer reads it)",
            param="input",
        )
    for index, text in enumerate(texts):
        if not text:
            raise InvalidRequest(f"input[{index}]: the text is empty", param=f"input[{index}]")
    return [str(text) for text in texts]


def encode(vector: npt.NDArray[np.float32], encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":
        return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
    return [float(value) for value in vector]


def response_body(
    model: str, vectors: npt.NDArray[np.float32], counts: list[int], encoding_format: str
) -> dict[str, Any]:
    tokens = sum(counts)
    return {
        "object": "list",
        "data": [
            {"object": "embedding", "index": index, "embedding": encode(vector, encoding_format)}
            for index, vector in enumerate(vectors)
        ],
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


@blueprint.post("/embeddings")
async def embeddings(request: Request) -> HTTPResponse:
    body: EmbeddingRequest = parse_body(EmbeddingRequest, request)
    texts = input_texts(body)
    if body.dimensions is not None:
        raise InvalidRequest(
            "dimensions: the model's embeddings have the size it was trained with",
            param="dimensions",
        )
    fleet = request.app.ctx.fleet
    entry = fleet.resolve(body.model)
    name = entry.profile.name
    if not entry.profile.embedding:
        raise InvalidRequest(
            f"model: {name} is a chat model; /v1/embeddings needs one with embedding = true",
            param="model",
        )
    with request.app.ctx.drain.hold():
        node = await fleet.ensure_ready(name)
        async with fleet.using(node, name) as triton:
            vectors, counts = await triton.embed(name, texts, request.ctx.request_id)
    return json(response_body(body.model, vectors, counts, body.encoding_format))
