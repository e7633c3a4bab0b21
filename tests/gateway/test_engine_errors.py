"""Engine errors cross Triton's gRPC stream as a stable code in front of the sentence; the
gateway maps the code, never the words (issue 27)."""

from __future__ import annotations

import pytest

from control_plane.errors import (
    InvalidRequest,
    ModelUnavailable,
    Overloaded,
    UpstreamFailed,
)
from control_plane.node_client import _translate
from cortex.engine_errors import EngineErrorKind, parse_engine_error, tag_engine_error
from neuron_agent.torch_engine.errors import (
    EngineUnavailable,
    QueueFull,
    RequestRejected,
)


def test_a_code_survives_the_round_trip_and_unknown_codes_are_no_code() -> None:
    for kind in EngineErrorKind:
        assert parse_engine_error(tag_engine_error(kind, "words")) == (kind, "words")
    assert parse_engine_error("[cortex:nonsense] words") == (None, "words")
    assert parse_engine_error("Request for unknown model: 'm'") == (
        None,
        "Request for unknown model: 'm'",
    )


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (QueueFull("anything at all"), Overloaded),
        (RequestRejected("the prompt is empty"), InvalidRequest),
        (EngineUnavailable("rank 1 died"), ModelUnavailable),
    ],
)
def test_the_engines_errors_map_by_their_kind(error: Exception, expected: type) -> None:
    assert isinstance(error, RequestRejected)
    translated = _translate(tag_engine_error(error.kind, str(error)), "m")
    assert type(translated) is expected
    assert translated.message == f"m: {error}"  # the code is not shown to the client


def test_words_alone_map_to_nothing() -> None:
    # What used to be matched by text now means nothing by itself: no code, a plain failure
    # (the fleet decides from the node's state whether the model left it).
    for text in ("the request queue is full", "unknown model", "model is not ready"):
        assert type(_translate(text, "m")) is UpstreamFailed
