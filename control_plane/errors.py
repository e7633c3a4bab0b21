"""The gateway's one exception tree. Every error carries its HTTP status and a dialect-neutral
kind; `openai_body` and `anthropic_body` render it in each dialect's envelope.

    CortexError
    ├── InvalidRequest        400  invalid_request_error   (field path in `param`)
    │   ├── PromptTooLong     400  the dialect's own context-length wording
    │   └── BodyTooLarge      413  request_too_large       (before the body is read)
    ├── AuthenticationFailed  401  authentication_error
    ├── PermissionDenied      403  permission_error        (an admin action, a non-admin key)
    │   └── ModelForbidden    403 / OpenAI 404 model_not_found (outside the key's models)
    ├── RateLimited           429  rate_limit_error        (a key's limit; Retry-After)
    ├── NotFound              404  not_found_error         (no such route)
    │   └── ModelNotFound     404  not_found_error
    ├── Conflict              409  invalid_request_error   (a lifecycle action the model's state,
    │                                                       engine or requests do not allow now)
    ├── Overloaded            529/503  overloaded_error    (Retry-After)
    ├── UpstreamTimeout       504  timeout_error
    └── UpstreamFailed        502  api_error               (a node or Triton failed)
        ├── NodeUnavailable   502  api_error               (a node does not answer at all)
        └── ModelUnavailable  502  api_error               (the model left the node, or its
                                                            engine died: try another copy)

Messages say in words what happened; the low-level cause (gRPC or httpx text) goes to the log.
"""

from __future__ import annotations

from typing import Any


class CortexError(Exception):
    status = 500
    kind = "api_error"
    openai_type = "server_error"
    openai_code: str | None = None

    def __init__(self, message: str, param: str | None = None, retry_after: int | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.retry_after = retry_after

    def headers(self) -> dict[str, str]:
        return {"retry-after": str(self.retry_after)} if self.retry_after is not None else {}


class InvalidRequest(CortexError):
    status = 400
    kind = "invalid_request_error"
    openai_type = "invalid_request_error"


class PromptTooLong(InvalidRequest):
    openai_code = "context_length_exceeded"

    def __init__(
        self,
        prompt_tokens: int,
        context: int,
        max_tokens: int | None = None,
        at_least: bool = False,
    ) -> None:
        # `at_least`: refused before tokenizing, from a lower bound (prompting.fits_context).
        self.prompt_tokens = prompt_tokens
        self.context = context
        self.max_tokens = max_tokens
        size = f"at least {prompt_tokens}" if at_least else str(prompt_tokens)
        super().__init__(
            f"This model's maximum context length is {context} tokens. However, your messages "
            f"resulted in {size} tokens. Please reduce the length of the messages.",
            param="messages",
        )

    def anthropic_message(self) -> str:
        return f"prompt is too long: {self.prompt_tokens} tokens > {self.context} maximum"


class BodyTooLarge(InvalidRequest):
    """The body is larger than the gateway reads at all (app.MAX_BODY_BYTES)."""

    status = 413
    kind = "request_too_large"
    openai_code = "request_too_large"

    def __init__(self, limit_bytes: int) -> None:
        super().__init__(
            f"the request body is larger than this gateway accepts ({limit_bytes // 2**20} MiB)"
        )


class AuthenticationFailed(CortexError):
    status = 401
    kind = "authentication_error"
    openai_type = "invalid_request_error"
    openai_code = "invalid_api_key"


class PermissionDenied(CortexError):
    status = 403
    kind = "permission_error"
    openai_type = "invalid_request_error"
    openai_code = "permission_denied"


class ModelForbidden(PermissionDenied):
    """A model outside the key's `models`: Anthropic's 403; OpenAI answers such a key 404
    `model_not_found`, as for a model it does not have."""

    openai_status = 404
    openai_code = "model_not_found"

    def __init__(self, model: str) -> None:
        super().__init__(
            f"The model `{model}` does not exist or this API key may not use it.", "model"
        )


class RateLimited(CortexError):
    status = 429
    kind = "rate_limit_error"
    openai_code = "rate_limit_exceeded"

    def __init__(self, message: str, limit: str, retry_after: int | None) -> None:
        super().__init__(message, retry_after=retry_after)
        # OpenAI's 429 says which: "requests" or "tokens".
        self.openai_type = "tokens" if limit == "tokens" else "requests"


class NotFound(CortexError):
    status = 404
    kind = "not_found_error"
    openai_type = "invalid_request_error"


class ModelNotFound(NotFound):
    openai_code = "model_not_found"

    def __init__(self, model: str) -> None:
        super().__init__(
            f"The model `{model}` does not exist or is not served by this fleet.", "model"
        )


class Conflict(CortexError):
    """An admin's lifecycle action that cannot be done now: the model's engine cannot sleep,
    it has requests in flight, it is not in the state the action needs, or the node refused."""

    status = 409
    kind = "invalid_request_error"
    openai_type = "invalid_request_error"
    openai_code = "conflict"


class Overloaded(CortexError):
    status = 503
    kind = "overloaded_error"
    openai_type = "server_error"
    openai_code = "overloaded"

    def __init__(self, message: str, retry_after: int = 5) -> None:
        super().__init__(message, retry_after=retry_after)


class UpstreamTimeout(CortexError):
    status = 504
    kind = "timeout_error"
    openai_type = "server_error"
    openai_code = "timeout"


class UpstreamFailed(CortexError):
    status = 502
    kind = "api_error"
    openai_type = "server_error"


class NodeUnavailable(UpstreamFailed):
    def __init__(self, node: str, what: str = "does not answer") -> None:
        self.node = node
        super().__init__(f"node {node} is unavailable: {what}; try again shortly")


class ModelUnavailable(UpstreamFailed):
    """The engine says the model cannot serve there any more (being unloaded, a rank died)."""


def openai_body(error: CortexError) -> dict[str, Any]:
    return {
        "error": {
            "message": error.message,
            "type": error.openai_type,
            "param": error.param,
            "code": error.openai_code,
        }
    }


def openai_status(error: CortexError) -> int:
    return error.openai_status if isinstance(error, ModelForbidden) else error.status


def anthropic_status(error: CortexError) -> int:
    # Anthropic signals overload with 529; its SDK retries on it.
    return 529 if isinstance(error, Overloaded) else error.status


def anthropic_body(error: CortexError, request_id: str | None = None) -> dict[str, Any]:
    message = error.anthropic_message() if isinstance(error, PromptTooLong) else error.message
    body: dict[str, Any] = {"type": "error", "error": {"type": error.kind, "message": message}}
    if request_id:
        body["request_id"] = request_id
    return body
