"""What kind of error an engine reports across Triton's gRPC stream, as a stable code.

Triton carries an engine's error as one string (`InferenceResponse(error=TritonError(text))`,
read by the gateway as the stream response's `error_message`). The engine puts its kind in
front of the sentence, `[cortex:overloaded] the request queue is full (256 waiting)`, and the
gateway (`control_plane.node_client`) reads the kind back with `parse_engine_error`: rewording
a message never changes what a client gets. An error without a code (Triton's own, or an
engine's that predates the codes) is a failure whose meaning the gateway decides from state,
not from its words.
"""

from __future__ import annotations

import enum
import re


class EngineErrorKind(enum.StrEnum):
    OVERLOADED = "overloaded"  # no room to admit the request now; try again later
    INVALID = "invalid"  # the request cannot be served as asked (too long, bad parameters)
    UNAVAILABLE = "unavailable"  # the model is leaving or its engine died: try elsewhere
    FAILED = "failed"  # the engine failed while generating


_CODE = re.compile(r"^\[cortex:([a-z_]+)\] ?")


def tag_engine_error(kind: EngineErrorKind, message: str) -> str:
    """`message` with its kind in front, as an engine sends it."""
    return f"[cortex:{kind.value}] {message}"


def parse_engine_error(text: str) -> tuple[EngineErrorKind | None, str]:
    """(kind, the sentence without its code); kind None when the text carries no known code."""
    found = _CODE.match(text)
    if found is None:
        return None, text
    try:
        return EngineErrorKind(found.group(1)), text[found.end() :]
    except ValueError:
        return None, text[found.end() :]
