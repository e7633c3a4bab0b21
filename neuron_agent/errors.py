"""The neuron's exception: every lifecycle failure carries the HTTP status the API answers with
and the numbers behind it (`detail`). Lower-level errors (Triton's HTTP API, the repository)
are translated into it where the node calls them."""

from __future__ import annotations


class NodeError(Exception):
    """A lifecycle request failed; `status` is the HTTP status the API answers with."""

    def __init__(self, status: int, message: str, **detail: object) -> None:
        super().__init__(message)
        self.status = status
        self.detail = detail
