"""FAKE, for tests and benchmarks only: a Triton Python-backend model that emits tokens at a fixed
rate, so the engine's own time is known and whatever a client sees beyond it is the cost of the
path in between (Triton's gRPC stream, or the gateway in front of it).

It takes the torch engine's tensors (TensorRT-LLM's names) and streams token ids back the same
way — one decoupled response per token, the last one carrying the final flag. A request's first
token leaves `first_token_s` after the request reached the model (its "prefill"), then one token
every `token_interval_s`, `request_output_len` tokens in all, on an absolute schedule (no drift).
The ids cycle through `token_ids`, so the gateway's detokenizer yields text for every token.

The settings are `fixed_rate.json` in the profile's source folder (next to tokenizer.json):

    {"first_token_s": 0.01, "token_interval_s": 0.02, "token_ids": [271, 300, 412]}

With `"trtllm_metrics": true` it also stands in for TensorRT-LLM's backend on Triton's metrics
port: it reports its requests in flight as that backend does, in the gauge
`nv_trt_llm_request_metrics{model, version, request_type}` (`active`: streams being served,
`waiting`: none here, every request is admitted at once), updated as requests arrive and end.

One scheduler thread serves every request from a heap of due times, like an engine's step loop
but per request, so the fake itself costs little CPU at hundreds of concurrent streams. It asks
Triton whether a request was cancelled before its first token and then every
`CANCEL_CHECK_EVERY` tokens, not before each one: each question is a round trip between the
backend's stub and Triton, about 35 µs of CPU, a fifth of the fake's cost per token (measured
with benchmarks/gateway_overhead.py), and on a 2-core machine that CPU is taken from what the
benchmark measures.
"""

from __future__ import annotations

import heapq
import itertools
import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

CANCEL_CHECK_EVERY = 8


@dataclass(order=True)
class _Stream:
    due: float
    order: int
    sender: Any = field(compare=False)
    remaining: int = field(compare=False)
    sent: int = field(default=0, compare=False)


def _scalar(request: Any, name: str, default: int) -> int:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return default if tensor is None else int(tensor.as_numpy().reshape(-1)[0])


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        parameters = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        settings = json.loads(
            (Path(parameters["checkpoint_dir"]) / "fixed_rate.json").read_text(encoding="utf-8")
        )
        self.first_token_s = float(settings.get("first_token_s", 0.0))
        self.interval_s = float(settings.get("token_interval_s", 0.01))
        self.token_ids = [int(t) for t in settings["token_ids"]]
        self.active = 0
        self.gauges: dict[str, Any] = {}
        if settings.get("trtllm_metrics"):
            self.family = pb_utils.MetricFamily(
                name="nv_trt_llm_request_metrics",
                description="TRT LLM request metrics",
                kind=pb_utils.MetricFamily.GAUGE,
            )
            labels = {"model": args["model_name"], "version": args["model_version"]}
            self.gauges = {
                kind: self.family.Metric(labels={**labels, "request_type": kind})
                for kind in ("active", "waiting")
            }
        self.heap: list[_Stream] = []
        self.order = itertools.count()
        self.wake = threading.Condition()
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name="fixed-rate", daemon=True)
        self.thread.start()

    def execute(self, requests: list[Any]) -> None:
        arrived = time.monotonic()
        with self.wake:
            for request in requests:
                count = _scalar(request, "request_output_len", 16)
                stream = _Stream(
                    arrived + self.first_token_s,
                    next(self.order),
                    request.get_response_sender(),
                    max(count, 0),
                )
                heapq.heappush(self.heap, stream)
            self._count(len(requests))
            self.wake.notify()
        return None

    def _count(self, change: int) -> None:
        """Streams in flight, on the TensorRT-LLM gauge where it stands in for that backend."""
        self.active += change
        if self.gauges:
            self.gauges["active"].set(self.active)

    def _run(self) -> None:
        while True:
            with self.wake:
                while not self.stopping and (not self.heap or self.heap[0].due > time.monotonic()):
                    timeout = self.heap[0].due - time.monotonic() if self.heap else None
                    self.wake.wait(timeout)
                if self.stopping:
                    return
                now = time.monotonic()
                due = []
                while self.heap and self.heap[0].due <= now:
                    due.append(heapq.heappop(self.heap))
            for stream in due:
                if self._step(stream):
                    stream.due += self.interval_s
                    with self.wake:
                        heapq.heappush(self.heap, stream)
                else:
                    with self.wake:
                        self._count(-1)

    def _step(self, stream: _Stream) -> bool:
        """Send the stream's next token; False once it is finished (or cancelled)."""
        try:
            check = stream.sent % CANCEL_CHECK_EVERY == 0
            if stream.remaining == 0 or (check and stream.sender.is_cancelled()):
                # Close the sender all the same: Triton waits for it before unloading.
                stream.sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                return False
            token = self.token_ids[stream.sent % len(self.token_ids)]
            stream.sent += 1
            stream.remaining -= 1
            final = stream.remaining == 0
            response = pb_utils.InferenceResponse(
                output_tensors=[
                    pb_utils.Tensor("output_ids", np.array([[[token]]], dtype=np.int32)),
                    pb_utils.Tensor("sequence_length", np.array([[1]], dtype=np.int32)),
                ]
            )
            flags = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL if final else 0
            stream.sender.send(response, flags=flags)
            return not final
        except Exception:  # the client is gone: nothing left to send to
            return False

    def finalize(self) -> None:
        with self.wake:
            self.stopping = True
            self.wake.notify()
        self.thread.join(timeout=5)
        self.gauges.clear()  # a family outlives its metrics
