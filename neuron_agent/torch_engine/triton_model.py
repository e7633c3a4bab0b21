"""The Triton Python-backend model around the engine.

Decoupled: `execute` queues each request with the engine and returns at once; the engine thread
hands each step's new tokens to the shared `ResponseWriter` (`neuron_agent/engines/triton_glue`),
whose own thread sends them through each request's response sender (the new tokens only, as
TensorRT-LLM streams; or one response at the end when not streaming) and sets the final flag on
the last. A request whose client went away
(`is_cancelled`) leaves the batch before the next step.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

from cortex.engine_errors import EngineErrorKind, tag_engine_error
from neuron_agent.engines.triton_glue import BadRequest, ResponseWriter
from neuron_agent.engines.triton_glue import guide as _guide
from neuron_agent.engines.triton_glue import scalar as _scalar
from neuron_agent.engines.triton_glue import stop_sequences as _stop_sequences
from neuron_agent.engines.triton_glue import write_stats as _write_stats
from neuron_agent.torch_engine.errors import EngineError
from neuron_agent.torch_engine.loader import (
    EngineOptions,
    build_engine,
    close_engine,
    rank_devices,
)
from neuron_agent.torch_engine.residency import ControlServer, control_socket
from neuron_agent.torch_engine.sampling import SamplingParams
from neuron_agent.torch_engine.scheduler import Engine, GenerationRequest

log = logging.getLogger("cortex.engine")


def _prefix_hit_counter(args: dict[str, str]) -> Callable[[int, int], None]:
    """Prompt tokens read from the prefix cache, by tier, as a Triton metric (the neuron
    re-exports Triton's metrics): `cortex_engine_cached_prompt_tokens{tier="gpu"|"host"}`."""
    family = pb_utils.MetricFamily(
        name="cortex_engine_cached_prompt_tokens",
        description="Prompt tokens read from the prefix cache instead of computed, by tier",
        kind=pb_utils.MetricFamily.COUNTER,
    )
    labels = {"model": args["model_name"], "version": args["model_version"]}
    tiers = {tier: family.Metric(labels={**labels, "tier": tier}) for tier in ("gpu", "host")}

    def count(gpu_tokens: int, host_tokens: int, family: Any = family) -> None:
        # `family` rides along: Triton drops the metrics of a family that is collected.
        try:
            if gpu_tokens:
                tiers["gpu"].increment(gpu_tokens)
            if host_tokens:
                tiers["host"].increment(host_tokens)
        except Exception:  # a metric must never fail a request
            log.debug("prefix-cache metric not counted", exc_info=True)

    return count


class TritonPythonModel:
    engine: Engine
    writer: ResponseWriter
    control: ControlServer | None = None

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
            host_kv_cache_bytes=int(parameters.get("host_kv_cache_bytes", "0") or "0"),
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
            tokenizer_dir=Path(parameters["tokenizer_dir"])
            if parameters.get("tokenizer_dir")
            else None,
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
        self.engine.on_prefix_hit = _prefix_hit_counter(args)
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
            # The neuron's sleep / wake requests (`residency` describes the channel).
            self.control = ControlServer(control_socket(Path(stats_path)), self.engine)
        self.engine.start()

    def execute(self, requests: list[Any]) -> None:
        for request in requests:
            sender = request.get_response_sender()
            try:
                self.engine.submit(self._generation_request(request, sender))
            except EngineError as error:
                self.writer.error(sender, tag_engine_error(error.kind, str(error)))
            except BadRequest as error:
                self.writer.error(sender, tag_engine_error(EngineErrorKind.INVALID, str(error)))
            except Exception as error:  # malformed tensors: answer, never crash the stub
                self.writer.error(
                    sender, tag_engine_error(EngineErrorKind.INVALID, f"bad request: {error}")
                )
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
        top_logprobs = None
        if _scalar(request, "return_log_probs", False):
            top_logprobs = int(_scalar(request, "num_top_logprobs", 0))

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
            priority=int(_scalar(request, "priority", 0)),
            guide=_guide(request),
            top_logprobs=top_logprobs,
            logprobs=None
            if top_logprobs is None
            else lambda entries: self.writer.logprobs(sender, entries),
        )

    def finalize(self) -> None:
        if self.control is not None:
            self.control.close()
        engine = getattr(self, "engine", None)
        if engine is not None:
            close_engine(engine)
        writer = getattr(self, "writer", None)
        if writer is not None:
            writer.close()
