"""The neuron's one exception tree. Every error carries the HTTP status the lifecycle API
answers with (its class says which: the one table of that mapping) and the numbers behind it
(`detail`, sent in the error body).

    NodeError                     500  (a lifecycle request failed)
    ├── BadRequest                400  the body is not what the API takes
    ├── ModelUnknown              404  not in this node's catalogue
    ├── ModelNotLoaded            404  in the catalogue, not loaded here
    ├── NoRoom                    409  the model's memory does not fit (with the numbers)
    ├── ModelBusy                 409  requests in flight; not unloading (or sleeping)
    ├── CannotSleep               409  its engine cannot sleep, or it is not READY / ASLEEP
    ├── UnsupportedModel          422  its checkpoint or tokenizer cannot be served here
    ├── RepositoryError           500  its Triton model directory cannot be made
    ├── TritonError               502  Triton refused or failed an operation
    └── TritonNotRestarted        503  a model unloaded, but Triton did not come back

Lower-level errors (Triton's HTTP API, the file system, the checkpoint readers) are translated
into these where the node calls them; `neuron_agent.api` renders any of them.
"""

from __future__ import annotations


class NodeError(Exception):
    """A lifecycle request failed; `status` is the HTTP status the API answers with."""

    status = 500

    def __init__(self, message: str, **detail: object) -> None:
        super().__init__(message)
        self.detail = detail


class BadRequest(NodeError):
    status = 400


class ModelUnknown(NodeError):
    status = 404


class ModelNotLoaded(NodeError):
    status = 404


class NoRoom(NodeError):
    status = 409


class ModelBusy(NodeError):
    status = 409


class CannotSleep(NodeError):
    status = 409


class UnsupportedModel(NodeError):
    status = 422


class RepositoryError(NodeError):
    """A template could not be filled or written."""

    status = 500


class TritonError(NodeError):
    """Triton refused or failed an operation; the message is Triton's own where it gave one."""

    status = 502


class TritonNotRestarted(NodeError):
    status = 503
