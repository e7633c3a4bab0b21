"""Token logprobs as every engine reports them: the chosen token's log-probability under the
model's raw logits (log-softmax before temperature, top-k/p or a guide's mask), with the most
likely tokens' ids and theirs. `triton_glue` sends them as TensorRT-LLM's `output_log_probs`
and our `output_top_logprob_ids` / `output_top_logprobs`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

MAX_TOP_LOGPROBS = 20  # OpenAI's limit, and the most an engine reports


@dataclass(frozen=True)
class TokenLogprob:
    """A chosen token's log-probability, and the `top` most likely tokens' ids and theirs."""

    logprob: float
    top_ids: tuple[int, ...] = ()
    top_logprobs: tuple[float, ...] = ()


def log_softmax(logits: npt.NDArray[Any]) -> npt.NDArray[Any]:
    """One row of raw logits [vocab] as log-probabilities (float64: a 150k-token sum in float32
    loses the small ones' digits)."""
    shifted = logits.astype(np.float64) - np.max(logits)
    result: npt.NDArray[Any] = shifted - np.log(np.exp(shifted).sum())
    return result


def row_logprob(logprobs: npt.NDArray[Any], chosen: int, top: int) -> TokenLogprob:
    """The chosen token's entry from one row's log-probabilities, with its `top` best."""
    if top == 0:
        return TokenLogprob(float(logprobs[chosen]))
    best = np.argpartition(logprobs, -top)[-top:]
    best = best[np.argsort(-logprobs[best], kind="stable")]
    return TokenLogprob(
        float(logprobs[chosen]),
        tuple(int(i) for i in best),
        tuple(float(logprobs[i]) for i in best),
    )
