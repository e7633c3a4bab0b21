"""When a generated token ends its answer, and how the answer's new tokens leave: the one rule
both engines (torch, llama.cpp) follow, so a request ends alike whichever serves it.

An end token (the request's, or under a grammar any end token the grammar allowed) is not part
of the output, as TensorRT-LLM reports it; a length limit, a stop sequence at the answer's end
or a grammar that can take nothing more end it with the token included.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Sequence
from typing import Protocol

from neuron_agent.engines.guided import Matcher
from neuron_agent.engines.logprobs import TokenLogprob

log = logging.getLogger("cortex.engine")


def token_ends(
    token: int,
    end_ids: Collection[int],
    matcher: Matcher | None,
    grammar_end_ids: Collection[int],
    request_id: str,
) -> bool:
    """Whether `token` ends the answer before joining it; a token that does not is consumed by
    the request's grammar matcher, if it has one."""
    if token in end_ids:
        return True
    if matcher is None:
        return False
    if token in grammar_end_ids:
        return True  # the grammar ends the answer with any end token it allowed
    if not matcher.consume_token(token):
        # The mask allowed a token the matcher then refused (llguidance did so for a tag spelled
        # out while the vocabulary has it as a token): end the answer here.
        log.warning("guided request %s: %s", request_id, matcher.get_error())
        return True
    return False


def answer_complete(
    generated: Sequence[int],
    max_new_tokens: int,
    stop_sequences: Collection[tuple[int, ...]],
    matcher: Matcher | None,
) -> bool:
    """Whether the answer is whole with its last token in it."""
    return (
        len(generated) >= max_new_tokens
        or any(tuple(generated[-len(stop) :]) == stop for stop in stop_sequences if stop)
        or (matcher is not None and matcher.is_stopped())
    )


class Outgoing(Protocol):
    """What `deliver` reads of a request."""

    @property
    def stream(self) -> bool: ...
    @property
    def emit(self) -> Callable[[list[int], bool], None]: ...
    @property
    def logprobs(self) -> Callable[[list[TokenLogprob]], None] | None: ...


class Pending(Protocol):
    """What `deliver` takes from a sequence: the tokens (and their logprobs) not yet sent."""

    unsent: list[int]
    unsent_logprobs: list[TokenLogprob]


def deliver(sequence: Pending, request: Outgoing, finished: bool) -> None:
    """Hand the sequence's unsent tokens (each step when streaming, else at the end) and their
    logprobs to the request; the end token's logprob is dropped with the end token."""
    logprobs = sequence.unsent_logprobs
    if len(logprobs) > len(sequence.unsent):
        logprobs.pop()  # the end token's: it is not part of the output
    if request.stream or finished:
        out, sequence.unsent = sequence.unsent, []
        if logprobs and request.logprobs is not None:
            sequence.unsent_logprobs = []
            request.logprobs(logprobs)
        if out or finished:
            request.emit(out, finished)
