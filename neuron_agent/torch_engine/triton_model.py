"""The Triton Python-backend model around the engine.

Decoupled: `execute` queues each request with the engine and returns at once; the engine thread
hands each step's new tokens to a `ResponseWriter`, whose own thread sends them through each
request's response sender (the new tokens only, as TensorRT-LLM streams; or one response at the
end when not streaming) and sets the final flag on the last. A request whose client went away
(`is_cancelled`) leaves the batch before the next step.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

from neuron_agent.torch_engine.errors import EngineError
from neuron_agent.torch_engine.loader import (
    EngineOptions,
    build_engine,
    close_engine,
    rank_devices,
)
from neuron_agent.torch_engine.sampling import SamplingParams
from neuron_agent.torch_engine.scheduler import Engine, GenerationRequest

log = logging.getLogger("cortex.engine")


def _scalar(request: Any, name: str, default: Any) -> Any:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return default
    values = tensor.as_numpy().reshape(-1)
    return default if values.size == 0 else values[0].item()


def _stop_sequences(request: Any) -> tuple[tuple[int, ...], ...]:
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


def _write_stats(
    path: Path,
    running: int,
    waiting: int,
    failed: str | None = None,
    counters: dict[str, int] | None = None,
) -> None:
    """Counts the neuron agent reads for in-flight requests and last use (atomic replace), why
    the engine failed if it did (a tensor-parallel rank died), and the engine's counters that
    the neuron's /metrics shows (speculative decoding's, as of this change of the counts)."""
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
    final: bool = False
    error: str | None = None


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

    def admitted(self, sender: Any, cached_prompt_tokens: int) -> None:
        with self._wake:
            outgoing = self._waiting.setdefault(sender, _Outgoing())
            outgoing.cached_prompt_tokens = cached_prompt_tokens
            self._wake.notify()

    def error(self, sender: Any, message: str) -> None:
        with self._wake:
            self._waiting.setdefault(sender, _Outgoing()).error = message
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
        if outgoing.tokens or (outgoing.final and outgoing.error is None):
            tokens = outgoing.tokens
            response = pb_utils.InferenceResponse(
                output_tensors=[
                    pb_utils.Tensor("output_ids", np.array([[tokens]], dtype=np.int32)),
                    pb_utils.Tensor("sequence_length", np.array([[len(tokens)]], dtype=np.int32)),
                ]
            )
            final = outgoing.final and outgoing.error is None
            sender.send(
                response, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL if final else 0
            )
        if outgoing.error is not None:
            sender.send(
                pb_utils.InferenceResponse(error=pb_utils.TritonError(outgoing.error)),
                flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL,
            )
    except Exception:  # the client is gone; the engine drops it on the next step
        log.debug("response not delivered", exc_info=True)


class TritonPythonModel:
    engine: Engine
    writer: ResponseWriter

    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        parameters = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        threads = os.environ.get("CORTEX_TORCH_THREADS")
        if threads:
            import torch

            torch.set_num_threads(int(threads))
        options = EngineOptions(
            checkpoint=Path(parameters["checkpoint_dir"]),
            quantization=parameters.get("quantization", "none"),
            dtype=parameters.get("dtype", "auto"),
            device=parameters.get("device", "cpu"),
            kv_cache_tokens=int(parameters.get("kv_cache_tokens", "65536")),
            max_batch_size=int(parameters.get("max_batch_size", "8")),
            max_queue_size=int(parameters.get("max_queue_size", "256")),
            prefill_tokens=int(parameters.get("prefill_tokens", "0")),
            cuda_graphs=parameters.get("cuda_graphs", "true") == "true",
            prefix_caching=parameters.get("prefix_caching", "true") != "false",
            kv_cache_dtype=parameters.get("kv_cache_dtype", "auto"),
            batch_invariant=parameters.get("batch_invariant", "false") == "true",
            speculation=parameters.get("speculation", "off") or "off",
            speculative_tokens=int(parameters.get("speculative_tokens", "4") or "4"),
            speculative_max_batch=int(parameters.get("speculative_max_batch", "4") or "4"),
            tp=int(parameters.get("tp", "1") or "1"),
            devices=rank_devices(
                parameters.get("device", "cpu"), parameters.get("gpu_device_ids", "")
            ),
            # The stub's command line names this file; the neuron finds the ranks by it too.
            label=str(Path(args["model_repository"]) / args["model_version"] / "model.py"),
        )
        # The engine thread wants the GIL back as soon as each step's GPU wait ends; with the
        # default 5 ms switch interval the response thread kept it for milliseconds per step.
        sys.setswitchinterval(0.0002)
        self.writer = ResponseWriter()
        try:
            self.engine = build_engine(options)
        except EngineError as error:
            # One sentence in Triton's load error, not a traceback.
            raise pb_utils.TritonModelException(str(error)) from None
        self.default_end_ids = frozenset(self.engine.model.spec.eos_token_ids)
        stats_path = parameters.get("stats_path")
        if stats_path:
            engine = self.engine
            self.engine.on_change = lambda running, waiting: _write_stats(
                Path(stats_path), running, waiting, engine.failure, engine.speculated.as_stats()
            )
            _write_stats(Path(stats_path), 0, 0)
            ranks = getattr(engine.model, "ranks", None)
            if ranks is not None:
                ranks.on_failure.append(
                    lambda message: _write_stats(Path(stats_path), 0, 0, message)
                )
        self.engine.start()

    def execute(self, requests: list[Any]) -> None:
        for request in requests:
            sender = request.get_response_sender()
            try:
                self.engine.submit(self._generation_request(request, sender))
            except EngineError as error:
                self.writer.error(sender, str(error))
            except Exception as error:  # malformed tensors: answer, never crash the stub
                self.writer.error(sender, f"bad request: {error}")
        return None

    def _generation_request(self, request: Any, sender: Any) -> GenerationRequest:
        ids_tensor = pb_utils.get_input_tensor_by_name(request, "input_ids")
        if ids_tensor is None:
            raise EngineError("input_ids is required")
        ids = ids_tensor.as_numpy().reshape(-1).astype(np.int64).tolist()
        length = int(_scalar(request, "input_lengths", len(ids)))
        ids = ids[:length]
        end_id = _scalar(request, "end_id", None)
        end_ids = frozenset({int(end_id)}) if end_id is not None else self.default_end_ids
        seed = _scalar(request, "seed", None)
        if seed is None:
            seed = _scalar(request, "random_seed", None)
        sampling = SamplingParams(
            temperature=float(_scalar(request, "temperature", 0.0)),
            top_k=int(_scalar(request, "runtime_top_k", 0)),
            top_p=float(_scalar(request, "runtime_top_p", 1.0)),
            seed=None if seed is None else int(seed),
        )
        if sampling.temperature < 0 or not 0 < sampling.top_p <= 1 or sampling.top_k < 0:
            raise EngineError("temperature must be ≥ 0, top_p in (0, 1], top_k ≥ 0")

        return GenerationRequest(
            prompt=ids,
            admitted=lambda cached: self.writer.admitted(sender, cached),
            max_new_tokens=int(_scalar(request, "request_output_len", 16)),
            emit=lambda tokens, final: self.writer.tokens(sender, tokens, final),
            fail=lambda message: self.writer.error(sender, message),
            is_cancelled=sender.is_cancelled,
            end_ids=end_ids,
            sampling=sampling,
            stop_sequences=_stop_sequences(request),
            stream=bool(_scalar(request, "streaming", True)),
            request_id=request.request_id(),
        )

    def finalize(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            close_engine(engine)
        writer = getattr(self, "writer", None)
        if writer is not None:
            writer.close()
