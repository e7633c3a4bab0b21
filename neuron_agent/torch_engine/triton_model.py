"""The Triton Python-backend model around the engine.

Decoupled: `execute` queues each request with the engine and returns at once; the engine thread
answers through each request's response sender — one response per step while streaming (the new
tokens only, as TensorRT-LLM streams), or one at the end — and sets the final flag on the last.
A request whose client went away (`is_cancelled`) leaves the batch before the next step.
"""

from __future__ import annotations

import json
import logging
import os
import time
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


def _write_stats(path: Path, running: int, waiting: int, failed: str | None = None) -> None:
    """Counts the neuron agent reads for in-flight requests and last use (atomic replace), and
    why the engine failed if it did (a tensor-parallel rank died)."""
    data: dict[str, object] = {"running": running, "waiting": waiting, "last_used": time.time()}
    if failed is not None:
        data["failed"] = failed
    temporary = path.with_suffix(".tmp")
    try:
        temporary.write_text(json.dumps(data))
        os.replace(temporary, path)
    except OSError:
        log.debug("stats not written", exc_info=True)


class TritonPythonModel:
    engine: Engine

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
            tp=int(parameters.get("tp", "1") or "1"),
            devices=rank_devices(
                parameters.get("device", "cpu"), parameters.get("gpu_device_ids", "")
            ),
            # The stub's command line names this file; the neuron finds the ranks by it too.
            label=str(Path(args["model_repository"]) / args["model_version"] / "model.py"),
        )
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
                Path(stats_path), running, waiting, engine.failure
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
                self._send_error(sender, str(error))
            except Exception as error:  # malformed tensors: answer, never crash the stub
                self._send_error(sender, f"bad request: {error}")
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

        def emit(tokens: list[int], final: bool) -> None:
            output = np.array([[tokens]], dtype=np.int32)
            response = pb_utils.InferenceResponse(
                output_tensors=[
                    pb_utils.Tensor("output_ids", output),
                    pb_utils.Tensor("sequence_length", np.array([[len(tokens)]], dtype=np.int32)),
                ]
            )
            flags = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL if final else 0
            try:
                sender.send(response, flags=flags)
            except Exception:  # the client is gone; the engine drops it on the next step
                log.debug("response not delivered", exc_info=True)

        return GenerationRequest(
            prompt=ids,
            max_new_tokens=int(_scalar(request, "request_output_len", 16)),
            emit=emit,
            fail=lambda message: self._send_error(sender, message),
            is_cancelled=sender.is_cancelled,
            end_ids=end_ids,
            sampling=sampling,
            stop_sequences=_stop_sequences(request),
            stream=bool(_scalar(request, "streaming", True)),
            request_id=request.request_id(),
        )

    @staticmethod
    def _send_error(sender: Any, message: str) -> None:
        try:
            sender.send(
                pb_utils.InferenceResponse(error=pb_utils.TritonError(message)),
                flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL,
            )
        except Exception:
            log.debug("error not delivered", exc_info=True)

    def finalize(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            close_engine(engine)
