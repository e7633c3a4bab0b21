"""Errors the engine reports to Triton (and so to the gateway) as one clear sentence, each with
its kind (`cortex.engine_errors`), which travels in front of the sentence as a stable code."""

from __future__ import annotations

from cortex.engine_errors import EngineErrorKind


class EngineError(Exception):
    """Base: the message is one sentence meant for an operator or a client."""

    kind = EngineErrorKind.FAILED


class UnsupportedCheckpoint(EngineError):
    """The checkpoint cannot be served by this engine (architecture, files, dtype)."""

    kind = EngineErrorKind.INVALID


class RequestRejected(EngineError):
    """A request cannot be admitted (larger than the KV budget, bad parameters)."""

    kind = EngineErrorKind.INVALID


class QueueFull(RequestRejected):
    """No room in the admission queue now: the gateway answers overloaded (try again)."""

    kind = EngineErrorKind.OVERLOADED


class EngineUnavailable(RequestRejected):
    """The engine cannot serve any more (a tensor-parallel rank died): try another copy."""

    kind = EngineErrorKind.UNAVAILABLE
