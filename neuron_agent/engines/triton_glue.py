"""What every Python-backend engine does on Triton's side of the tensor contract.

A request carries TensorRT-LLM's tensor names (`input_ids`, `input_lengths`,
`request_output_len`, `end_id`, `streaming`, `temperature`, `runtime_top_k`, `runtime_top_p`,
`seed` / `random_seed`, `stop_words_list`, `priority`, `guided_decoding_guide_type` /
`guided_decoding_guide`, `return_log_probs` / `num_top_logprobs`); `read_request` turns them
into a plain `RequestTensors`, or raises `BadRequest` with one sentence. Responses leave through a
`ResponseWriter` on a thread of its own: the cached-prompt-token count first (one response of
its own, before any token), then the new tokens (as TensorRT-LLM streams them), the final flag on
the last; an error is one final error response. `write_stats` keeps the file the neuron agent
reads for requests in flight.

Imported inside Triton's stub only (`triton_python_backend_utils` exists nowhere else).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import triton_python_backend_utils as pb_utils

from cortex.guides import GuideType
from neuron_agent.engines.guided import Guide
from neuron_agent.engines.logprobs import MAX_TOP_LOGPROBS

log = logging.getLogger("cortex.engine")


class BadRequest(Exception):
    """The request's tensors are missing or out of range; the message names the tensor."""


@dataclass(frozen=True)
class RequestTensors:
    """One generation request as the engines read it."""

    prompt: list[int]
    max_new_tokens: int
    end_ids: frozenset[int] | None  # None: the model's own end tokens
    temperature: float
    top_k: int
    top_p: float
    seed: int | None
    stop_sequences: tuple[tuple[int, ...], ...]
    stream: bool
    request_id: str
    priority: int = 0  # scheduling class, smaller first: 0 interactive, 1 batch
    guide: Guide | None = None
    top_logprobs: int | None = None  # each token's logprob and this many alternatives


def model_parameters(args: dict[str, str]) -> dict[str, str]:
    """The `parameters` of the model's config.pbtxt, as strings."""
    config = json.loads(args["model_config"])
    return {k: v["string_value"] for k, v in config.get("parameters", {}).items()}


def scalar(request: Any, name: str, default: Any) -> Any:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return default
    values = tensor.as_numpy().reshape(-1)
    return default if values.size == 0 else values[0].item()


def stop_sequences(request: Any) -> tuple[tuple[int, ...], ...]:
    """TensorRT-LLM's stop_words_list: [2, N] = flat ids, then end offsets (-1 padded)."""
    tensor = pb_utils.get_input_tensor_by_name(request, "stop_words_list")
    if tensor is None:
        return ()
    array = tensor.as_numpy().reshape(-1, 2, tensor.as_numpy().shape[-1])[0]
    ids, offsets = array[0].tolist(), [o for o in array[1].tolist() if o >= 0]
    sequences, start = [], 0
    for end in offsets:
        if end > start:
            sequences.append(tuple(ids[start:end]))
        start = end
    return tuple(sequences)


def text(request: Any, name: str) -> str | None:
    """A STRING [1] input as text (Triton sends BYTES), or None when absent or empty."""
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return None
    values = tensor.as_numpy().reshape(-1)
    if values.size == 0:
        return None
    value = values[0]
    decoded = value.decode("utf-8") if isinstance(value, bytes) else str(value)
    return decoded or None


def guide(request: Any) -> Guide | None:
    """TensorRT-LLM's guided_decoding_guide_type / guided_decoding_guide."""
    kind = text(request, "guided_decoding_guide_type")
    if kind is None:
        return None
    try:
        guide_type = GuideType(kind)
    except ValueError:
        raise BadRequest(
            f"guided_decoding_guide_type must be one of {', '.join(GuideType)}, not {kind!r}"
        ) from None
    content = text(request, "guided_decoding_guide") or ""
    if not content and guide_type is not GuideType.JSON:
        raise BadRequest(f"guided_decoding_guide is required for {guide_type}")
    return Guide(guide_type, content)


def top_logprobs(request: Any) -> int | None:
    """How many alternatives each token's logprob comes with (`num_top_logprobs`), when
    `return_log_probs` asks for logprobs; None: no logprobs."""
    if not scalar(request, "return_log_probs", False):
        return None
    top = int(scalar(request, "num_top_logprobs", 0))
    if not 0 <= top <= MAX_TOP_LOGPROBS:
        raise BadRequest(f"num_top_logprobs must be 0 to {MAX_TOP_LOGPROBS}")
    return top


def read_request(request: Any) -> RequestTensors:
    ids_tensor = pb_utils.get_input_tensor_by_name(request, "input_ids")
    if ids_tensor is None:
        raise BadRequest("input_ids is required")
    ids = ids_tensor.as_numpy().reshape(-1).astype(np.int64).tolist()
    length = int(scalar(request, "input_lengths", len(ids)))
    end_id = scalar(request, "end_id", None)
    seed = scalar(request, "seed", None)
    if seed is None:
        seed = scalar(request, "random_seed", None)
    tensors = RequestTensors(
        prompt=ids[:length],
        max_new_tokens=int(scalar(request, "request_output_len", 16)),
        end_ids=None if end_id is None else frozenset({int(end_id)}),
        temperature=float(scalar(request, "temperature", 0.0)),
        top_k=int(scalar(request, "runtime_top_k", 0)),
        top_p=float(scalar(request, "runtime_top_p", 1.0)),
        seed=None if seed is None else int(seed),
        stop_sequences=stop_sequences(request),
        stream=bool(scalar(request, "streaming", True)),
        request_id=request.request_id(),
        priority=int(scalar(request, "priority", 0)),
        guide=guide(request),
        top_logprobs=top_logprobs(request),
    )
    if tensors.temperature < 0 or not 0 < tensors.top_p <= 1 or tensors.top_k < 0:
        raise BadRequest("temperature must be ≥ 0, top_p in (0, 1], top_k ≥ 0")
    return tensors


def write_stats(
    path: Path,
    running: int,
    waiting: int,
    failed: str | None = None,
    counters: dict[str, int] | None = None,
) -> None:
    """Counts the neuron agent reads for in-flight requests and last use (atomic replace), why
    the engine failed if it did, and the engine's counters the neuron's /metrics shows
    (`neuron_agent.engine_metrics`; the torch engine's speculation counters)."""
    data: dict[str, object] = {"running": running, "waiting": waiting, "last_used": time.time()}
    data.update(counters or {})
    if failed is not None:
        data["failed"] = failed
    temporary = path.with_suffix(".tmp")
    try:
        temporary.write_text(json.dumps(data))
        os.replace(temporary, path)
    except OSError:
        log.debug("stats not written", exc_info=True)


@dataclass
class _Outgoing:
    cached_prompt_tokens: int | None = None  # said once, in a response of its own, first
    tokens: list[int] = field(default_factory=list)
    # One per token, when asked (an engine's TokenLogprob: logprob, top_ids, top_logprobs).
    logprobs: list[Any] = field(default_factory=list)
    final: bool = False
    error: str | None = None
    tensors: list[Any] | None = None  # a whole final response (embeddings)


class ResponseWriter:
    """Sends the engine's output to Triton from a thread of its own.

    The engine thread only appends; a send (a response through the stub's shared memory, ~0.1 ms
    with the GIL held) would otherwise stall every stream's next step. A stream whose responses
    fall behind gets its waiting tokens in one response; one that keeps up gets each token as soon
    as it is made: nothing is held back to fill a response.
    """

    def __init__(self) -> None:
        self._waiting: dict[Any, _Outgoing] = {}
        self._wake = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._loop, name="cortex-responses", daemon=True)
        self._thread.start()

    def tokens(self, sender: Any, tokens: list[int], final: bool) -> None:
        with self._wake:
            outgoing = self._waiting.setdefault(sender, _Outgoing())
            outgoing.tokens.extend(tokens)
            outgoing.final = outgoing.final or final
            self._wake.notify()

    def logprobs(self, sender: Any, entries: list[Any]) -> None:
        """The logprobs of the tokens the next `tokens` call brings (the engine calls both
        from its thread, in that order)."""
        with self._wake:
            self._waiting.setdefault(sender, _Outgoing()).logprobs.extend(entries)

    def admitted(self, sender: Any, cached_prompt_tokens: int) -> None:
        with self._wake:
            outgoing = self._waiting.setdefault(sender, _Outgoing())
            outgoing.cached_prompt_tokens = cached_prompt_tokens
            self._wake.notify()

    def error(self, sender: Any, message: str) -> None:
        with self._wake:
            self._waiting.setdefault(sender, _Outgoing()).error = message
            self._wake.notify()

    def final(self, sender: Any, tensors: dict[str, npt.NDArray[Any]]) -> None:
        """One whole final response with these output tensors (an embedding request's)."""
        with self._wake:
            outgoing = self._waiting.setdefault(sender, _Outgoing())
            outgoing.tensors = [pb_utils.Tensor(name, value) for name, value in tensors.items()]
            outgoing.final = True
            self._wake.notify()

    def close(self) -> None:
        """Send what is waiting, then stop the thread."""
        with self._wake:
            self._closing = True
            self._wake.notify()
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._waiting and not self._closing:
                    self._wake.wait()
                batch, self._waiting = self._waiting, {}
                if not batch and self._closing:
                    return
            for sender, outgoing in batch.items():
                _send(sender, outgoing)


def _send(sender: Any, outgoing: _Outgoing) -> None:
    final_flag = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
    try:
        if outgoing.cached_prompt_tokens is not None:
            # Before any token: what the prefix cache gave (the gateway puts it in the usage it
            # opens the client's stream with).
            cached = np.array([[outgoing.cached_prompt_tokens]], dtype=np.int32)
            sender.send(
                pb_utils.InferenceResponse(
                    output_tensors=[
                        pb_utils.Tensor("output_ids", np.zeros((1, 1, 0), dtype=np.int32)),
                        pb_utils.Tensor("sequence_length", np.array([[0]], dtype=np.int32)),
                        pb_utils.Tensor("cached_prompt_tokens", cached),
                    ]
                ),
                flags=0,
            )
        if outgoing.tensors is not None and outgoing.error is None:
            sender.send(
                pb_utils.InferenceResponse(output_tensors=outgoing.tensors), flags=final_flag
            )
            return
        if outgoing.tokens or (outgoing.final and outgoing.error is None):
            tokens = outgoing.tokens
            tensors = [
                pb_utils.Tensor("output_ids", np.array([[tokens]], dtype=np.int32)),
                pb_utils.Tensor("sequence_length", np.array([[len(tokens)]], dtype=np.int32)),
            ]
            if outgoing.logprobs:
                tensors.extend(_logprob_tensors(outgoing.logprobs))
            response = pb_utils.InferenceResponse(output_tensors=tensors)
            final = outgoing.final and outgoing.error is None
            sender.send(response, flags=final_flag if final else 0)
        if outgoing.error is not None:
            sender.send(
                pb_utils.InferenceResponse(error=pb_utils.TritonError(outgoing.error)),
                flags=final_flag,
            )
    except Exception:  # the client is gone; the engine drops it on the next step
        log.debug("response not delivered", exc_info=True)


def _logprob_tensors(entries: list[Any]) -> list[Any]:
    """TensorRT-LLM's output_log_probs [beams, tokens], and ours for the alternatives:
    output_top_logprob_ids / output_top_logprobs [tokens, k]."""
    shape = (1, len(entries), len(entries[0].top_ids))
    return [
        pb_utils.Tensor(
            "output_log_probs", np.array([[[e.logprob for e in entries]]], dtype=np.float32)
        ),
        pb_utils.Tensor(
            "output_top_logprob_ids",
            np.array([e.top_ids for e in entries], dtype=np.int32).reshape(shape),
        ),
        pb_utils.Tensor(
            "output_top_logprobs",
            np.array([e.top_logprobs for e in entries], dtype=np.float32).reshape(shape),
        ),
    ]
