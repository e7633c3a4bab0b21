"""What every engine checks of a generation request before it queues it, as a pure function:
the sentence that names what is wrong (the tensor, where there is one), or None. Each engine
raises the sentence as its own request rejection, so a client hears the same words whichever
engine serves the model."""

from __future__ import annotations

from collections.abc import Sequence

from neuron_agent.engines.logprobs import MAX_TOP_LOGPROBS


def request_problem(
    prompt: Sequence[int],
    max_new_tokens: int,
    context_length: int,
    vocabulary: int,
    top_logprobs: int | None = None,
) -> str | None:
    """Why a request cannot be queued: an empty prompt or one that fills the context, no room
    to answer, ids outside the vocabulary (an embedding lookup would fail the whole batch's
    step), or more alternatives than an engine reports."""
    if not prompt:
        return "the prompt is empty"
    if len(prompt) >= context_length:
        return f"the prompt has {len(prompt)} tokens; the model's context is {context_length}"
    if max_new_tokens < 1:
        return "request_output_len must be at least 1"
    if min(prompt) < 0 or max(prompt) >= vocabulary:
        return f"input_ids must be token ids in [0, {vocabulary})"
    if top_logprobs is not None and not 0 <= top_logprobs <= MAX_TOP_LOGPROBS:
        return f"num_top_logprobs must be 0 to {MAX_TOP_LOGPROBS}"
    return None
