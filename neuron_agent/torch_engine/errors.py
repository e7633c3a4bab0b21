"""Errors the engine reports to Triton (and so to the gateway) as one clear sentence."""

from __future__ import annotations


class EngineError(Exception):
    """Base: the message is one sentence meant for an operator or a client."""


class UnsupportedCheckpoint(EngineError):
    """The checkpoint cannot be served by this engine (architecture, files, dtype)."""


class RequestRejected(EngineError):
    """A request cannot be admitted (queue full, larger than the KV budget, bad parameters)."""
