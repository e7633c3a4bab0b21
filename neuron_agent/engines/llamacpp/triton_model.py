"""The Triton Python-backend model around the llama.cpp engine.

Decoupled: `execute` queues each request with the engine and returns at once; the engine thread
hands each step's new tokens to the shared `ResponseWriter` (`triton_glue`), which sends them
from its own thread. An embedding model (`embedding` parameter) takes `text_input` and answers
each request once with `embedding` [texts, dim] and `prompt_tokens` [texts].
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import triton_python_backend_utils as pb_utils

from cortex.engine_errors import EngineErrorKind, tag_engine_error
from neuron_agent.engines import triton_glue
from neuron_agent.engines.triton_glue import BadRequest, ResponseWriter

log = logging.getLogger("cortex.engine.llamacpp")

# Prompt tokens one step prefills when the profile leaves it at 0.
DEFAULT_PREFILL_TOKENS = 512


def thread_count() -> int:
    """CORTEX_LLAMACPP_THREADS, else every core this process may run on."""
    configured = os.environ.get("CORTEX_LLAMACPP_THREADS")
    if configured:
        return max(1, int(configured))
    return max(1, len(os.sched_getaffinity(0)))


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        parameters = triton_glue.model_parameters(args)
        gpus = [g.strip() for g in parameters.get("gpu_device_ids", "").split(",") if g.strip()]
        if gpus:
            # Before llama.cpp initializes CUDA: it sees only the GPUs the neuron placed it on.
            os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
        from neuron_agent.engines.llamacpp.embeddings import EmbeddingEngine
        from neuron_agent.engines.llamacpp.runtime import LlamaCppError, Runtime, RuntimeOptions
        from neuron_agent.engines.llamacpp.scheduler import Engine, RequestRejected

        self.rejected: tuple[type[Exception], ...] = (RequestRejected, BadRequest)
        self.embedding = parameters.get("embedding", "false") == "true"
        max_batch = int(parameters.get("max_batch_size", "8"))
        kv_tokens = int(parameters.get("kv_cache_tokens", "4096"))
        prefill = int(parameters.get("prefill_tokens", "0") or "0") or DEFAULT_PREFILL_TOKENS
        context = int(parameters.get("context_length", "0") or "0") or kv_tokens
        options = RuntimeOptions(
            model_path=Path(parameters["model_path"]),
            context_tokens=kv_tokens,
            sequences=max_batch,
            batch_tokens=min(context, kv_tokens) if self.embedding else prefill + max_batch,
            threads=thread_count(),
            gpu_layers=-1 if gpus else 0,
            split_layers=len(gpus) > 1,
            embedding=self.embedding,
        )
        stats_path = parameters.get("stats_path")

        def report(running: int, waiting: int) -> None:
            if stats_path:
                triton_glue.write_stats(Path(stats_path), running, waiting)

        self.writer = ResponseWriter()
        try:
            self.runtime = Runtime(options)
            if self.embedding:
                self.engine: Any = EmbeddingEngine(
                    self.runtime, int(parameters.get("max_queue_size", "256")), report
                )
            else:
                self.engine = Engine(
                    self.runtime,
                    context_length=min(context, self.runtime.context_train or context),
                    max_batch_size=max_batch,
                    max_queue_size=int(parameters.get("max_queue_size", "256")),
                    prefill_tokens=prefill,
                    prefix_caching=parameters.get("prefix_caching", "true") != "false",
                    on_change=report,
                )
        except (LlamaCppError, RequestRejected) as error:
            raise pb_utils.TritonModelException(str(error)) from None
        report(0, 0)
        self.engine.start()

    def execute(self, requests: list[Any]) -> None:
        for request in requests:
            sender = request.get_response_sender()
            try:
                if self.embedding:
                    self.engine.submit(self._embedding_request(request, sender))
                else:
                    self.engine.submit(self._generation_request(request, sender))
            except self.rejected as error:
                kind = getattr(error, "kind", EngineErrorKind.INVALID)
                self.writer.error(sender, tag_engine_error(kind, str(error)))
            except Exception as error:  # malformed tensors: answer, never crash the stub
                self.writer.error(
                    sender, tag_engine_error(EngineErrorKind.INVALID, f"bad request: {error}")
                )
        return None

    def _generation_request(self, request: Any, sender: Any) -> Any:
        from neuron_agent.engines.llamacpp.scheduler import GenerationRequest

        if pb_utils.get_input_tensor_by_name(request, "text_input") is not None:
            raise BadRequest("text_input: this model generates; send input_ids")
        tensors = triton_glue.read_request(request)
        return GenerationRequest(
            prompt=tensors.prompt,
            max_new_tokens=tensors.max_new_tokens,
            emit=lambda tokens, final: self.writer.tokens(sender, tokens, final),
            fail=lambda message: self.writer.error(sender, message),
            is_cancelled=sender.is_cancelled,
            end_ids=tensors.end_ids,
            temperature=tensors.temperature,
            top_k=tensors.top_k,
            top_p=tensors.top_p,
            seed=tensors.seed,
            stop_sequences=tensors.stop_sequences,
            stream=tensors.stream,
            request_id=tensors.request_id,
            admitted=lambda cached: self.writer.admitted(sender, cached),
            priority=tensors.priority,
            guide=tensors.guide,
            top_logprobs=tensors.top_logprobs,
            logprobs=None
            if tensors.top_logprobs is None
            else lambda entries: self.writer.logprobs(sender, entries),
        )

    def _embedding_request(self, request: Any, sender: Any) -> Any:
        from neuron_agent.engines.llamacpp.embeddings import EmbeddingRequest

        tensor = pb_utils.get_input_tensor_by_name(request, "text_input")
        if tensor is None:
            raise BadRequest("text_input is required: this is an embedding model")
        texts = [
            item.decode("utf-8") if isinstance(item, bytes) else str(item)
            for item in tensor.as_numpy().reshape(-1).tolist()
        ]

        def done(vectors: npt.NDArray[np.float32], counts: list[int]) -> None:
            self.writer.final(
                sender,
                {
                    "embedding": vectors[np.newaxis].astype(np.float32),
                    "prompt_tokens": np.array([counts], dtype=np.int32),
                },
            )

        return EmbeddingRequest(
            texts=texts,
            done=done,
            fail=lambda message: self.writer.error(sender, message),
            is_cancelled=sender.is_cancelled,
        )

    def finalize(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.stop()
        writer = getattr(self, "writer", None)
        if writer is not None:
            writer.close()
        runtime = getattr(self, "runtime", None)
        if runtime is not None:
            runtime.close()
