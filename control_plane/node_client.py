"""Talking to a node: the neuron's lifecycle API (httpx) and Triton's gRPC stream (grpc.aio with
Triton's own protobuf messages, which tritonclient ships).

Lower-level errors (httpx, gRPC) are translated to the gateway's exception tree here, once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
from pydantic import BaseModel, ValidationError

from control_plane.errors import (
    CortexError,
    InvalidRequest,
    ModelUnavailable,
    NodeUnavailable,
    Overloaded,
    UpstreamFailed,
)
from cortex import logs
from cortex.config import TRTLLM_TOKENS_PER_BLOCK, NeuronRef
from cortex.engine_errors import EngineErrorKind, parse_engine_error
from cortex.neuron_api import (
    CatalogueEntry,
    LoadedModel,
    NeuronStatus,
    TokenizerFiles,
    UnloadResult,
)
from cortex.secrets import TRITON_GRPC_KEY_METADATA, triton_key

# grpcio runs client channels on its EventEngine by default; for the gateway's stream reads (one
# message per token) its older client path costs about a third less CPU per message (measured
# with benchmarks/gateway_overhead.py). grpc reads GRPC_EXPERIMENTS once, when it is imported:
# it is set for that moment only (processes started later get the environment as it was), and
# an operator's own setting wins.
_OPERATOR_EXPERIMENTS = os.environ.get("GRPC_EXPERIMENTS")
os.environ["GRPC_EXPERIMENTS"] = _OPERATOR_EXPERIMENTS or "-event_engine_client"
try:
    import grpc
    from tritonclient.grpc import service_pb2
finally:
    if _OPERATOR_EXPERIMENTS is None:
        del os.environ["GRPC_EXPERIMENTS"]


W = TypeVar("W", bound=BaseModel)
# How long a finished request waits for Triton to close its stream (`until_closed`).
STREAM_CLOSE_WAIT_S = 5.0
log = logging.getLogger("cortex.node_client")


class NeuronClient:
    def __init__(self, neuron: NeuronRef, timeout: float) -> None:
        self.neuron = neuron
        self._client = httpx.AsyncClient(
            base_url=neuron.endpoint,
            headers=neuron.authorization(),
            timeout=httpx.Timeout(10.0, read=timeout),
        )

    async def close(self) -> None:
        await self._client.aclose()

    async def _call(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        # A call made for a client's request (a cold load, its evictions) names that request,
        # so the neuron's log lines up with the gateway's.
        request_id = logs.request_id.get()
        headers = {"x-request-id": request_id} if request_id else None
        try:
            response = await self._client.request(method, path, headers=headers, **kwargs)
        except httpx.HTTPError as error:
            log.debug("neuron %s: %s %s failed: %r", self.neuron.name, method, path, error)
            raise NodeUnavailable(self.neuron.name, "its neuron agent does not answer") from None
        if response.status_code >= 400:
            try:
                message = response.json().get("error", response.text)
            except ValueError:
                message = response.text
            if response.status_code == 404:  # the model is not there (not loaded, not served)
                raise ModelUnavailable(f"neuron {self.neuron.name}: {message}")
            if response.status_code == 409:
                raise Overloaded(f"neuron {self.neuron.name}: {message}")
            raise UpstreamFailed(f"neuron {self.neuron.name}: {message}")
        return dict(response.json())

    async def _read(self, wire: type[W], method: str, path: str, **kwargs: Any) -> W:
        """A call's answer as its wire model; an answer that does not fit is the neuron's
        failure, translated here like any other."""
        data = await self._call(method, path, **kwargs)
        try:
            return wire.model_validate(data)
        except ValidationError as error:
            raise UpstreamFailed(
                f"neuron {self.neuron.name} answered {path} with an unexpected body: "
                f"{error.error_count()} problem(s), first: {error.errors()[0]['loc']}"
            ) from None

    async def status(self, timeout: float) -> NeuronStatus:
        return await self._read(NeuronStatus, "GET", "/status", timeout=timeout)

    async def load(self, model: str) -> LoadedModel:
        return await self._read(LoadedModel, "POST", "/models/load", json={"model": model})

    async def sleep(self, model: str) -> LoadedModel:
        return await self._read(LoadedModel, "POST", "/models/sleep", json={"model": model})

    async def wake(self, model: str) -> LoadedModel:
        return await self._read(LoadedModel, "POST", "/models/wake", json={"model": model})

    async def pin(self, model: str, pinned: bool) -> CatalogueEntry:
        body = {"model": model, "pinned": pinned}
        return await self._read(CatalogueEntry, "POST", "/models/pin", json=body)

    async def unload(self, model: str, force: bool = False) -> UnloadResult:
        body = {"model": model, "force": force}
        return await self._read(UnloadResult, "POST", "/models/unload", json=body)

    async def tokenizer(self, model: str) -> TokenizerFiles:
        return await self._read(TokenizerFiles, "GET", f"/models/{model}/tokenizer")


@dataclass(frozen=True)
class GenerationParams:
    max_tokens: int
    end_ids: tuple[int, ...]
    pad_id: int
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    # Ask TensorRT-LLM for its per-request KV-cache figures (kv_cache_reused_blocks, …); only
    # for engines whose model declares the input (our torch engine reports without asking).
    return_perf_metrics: bool = False
    # Scheduling class, smaller first (0 interactive, 1 batch): sent as the optional `priority`
    # tensor only when not 0, so engines without that input keep serving interactive requests.
    priority: int = 0
    # TensorRT-LLM's guided decoding (cortex/guides.py names the types): decode under a JSON
    # schema, regex or grammar.
    guide_type: str | None = None
    guide: str | None = None
    # Each token's logprob and this many alternatives (TensorRT-LLM's return_log_probs; the
    # alternatives are the torch engine's); None: none.
    top_logprobs: int | None = None


# Request tensors of TensorRT-LLM's `tensorrt_llm` model (our torch engine takes the same), in
# the order `build_request` appends their contents: name, Triton datatype, struct format.
_SCALARS = (
    ("input_lengths", "INT32", "<i"),
    ("request_output_len", "INT32", "<i"),
    ("end_id", "INT32", "<i"),
    ("pad_id", "INT32", "<i"),
    ("streaming", "BOOL", "<?"),
    ("temperature", "FP32", "<f"),
    ("runtime_top_k", "INT32", "<i"),
    ("runtime_top_p", "FP32", "<f"),
    ("seed", "UINT64", "<Q"),
    ("return_perf_metrics", "BOOL", "<?"),
    ("priority", "UINT32", "<I"),
    ("return_log_probs", "BOOL", "<?"),
    ("num_top_logprobs", "INT32", "<i"),
)
_SCALAR_TENSORS = {
    name: service_pb2.ModelInferRequest.InferInputTensor(name=name, datatype=dtype, shape=[1, 1])
    for name, dtype, _ in _SCALARS
}
_SCALAR_FORMATS = {name: struct.Struct(fmt) for name, _, fmt in _SCALARS}
# Channel options as tritonclient sets them: no message size limit (long prompts), its keepalive.
_CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", 2**31 - 1),
    ("grpc.max_receive_message_length", 2**31 - 1),
    ("grpc.keepalive_time_ms", 2**31 - 1),
    ("grpc.keepalive_timeout_ms", 20000),
    ("grpc.keepalive_permit_without_calls", False),
    ("grpc.http2.max_pings_without_data", 2),
]


def build_request(
    model: str, prompt: list[int], params: GenerationParams, request_id: str
) -> service_pb2.ModelInferRequest:
    """One generation's `ModelInferRequest`, built straight as protobuf (raw little-endian
    contents): what tritonclient's InferInput + numpy would send, without their per-request
    cost."""
    values: list[tuple[str, float | int | bool]] = [
        ("input_lengths", len(prompt)),
        ("request_output_len", params.max_tokens),
        ("end_id", params.end_ids[0]),
        ("pad_id", params.pad_id),
        ("streaming", True),
        ("temperature", params.temperature),
        ("runtime_top_k", params.top_k),
        ("runtime_top_p", params.top_p),
    ]
    if params.seed is not None:
        values.append(("seed", params.seed))
    if params.return_perf_metrics:
        values.append(("return_perf_metrics", True))
    if params.priority:
        values.append(("priority", params.priority))
    if params.top_logprobs is not None:
        values.append(("return_log_probs", True))
        values.append(("num_top_logprobs", params.top_logprobs))
    request = service_pb2.ModelInferRequest(model_name=model, id=request_id)
    ids = request.inputs.add()
    ids.name, ids.datatype = "input_ids", "INT32"
    ids.shape.extend((1, len(prompt)))
    request.inputs.extend(_SCALAR_TENSORS[name] for name, _ in values)
    contents = [struct.pack(f"<{len(prompt)}i", *prompt)]
    contents.extend(_SCALAR_FORMATS[name].pack(value) for name, value in values)
    if params.guide_type is not None:
        for name, text in (
            ("guided_decoding_guide_type", params.guide_type),
            ("guided_decoding_guide", params.guide or ""),
        ):
            tensor = request.inputs.add()
            tensor.name, tensor.datatype = name, "BYTES"
            tensor.shape.extend((1, 1))
            data = text.encode("utf-8")
            # Triton's raw BYTES: each element's length (uint32, little-endian), then its bytes.
            contents.append(struct.pack("<I", len(data)) + data)
    request.raw_input_contents.extend(contents)
    return request


def output_ids(response: service_pb2.ModelInferResponse) -> list[int]:
    """The `output_ids` of one streamed response (none in an empty final response)."""
    for index, output in enumerate(response.outputs):
        if output.name == "output_ids":
            if index < len(response.raw_output_contents):
                raw = memoryview(response.raw_output_contents[index])
                return (raw.cast("q") if output.datatype == "INT64" else raw.cast("i")).tolist()
            return list(output.contents.int_contents or output.contents.int64_contents)
    return []


def _floats(response: service_pb2.ModelInferResponse, name: str) -> list[float] | None:
    for index, output in enumerate(response.outputs):
        if output.name == name:
            if index < len(response.raw_output_contents):
                raw = memoryview(response.raw_output_contents[index]).cast("f")
                return [float(value) for value in raw.tolist()]
            return list(output.contents.fp32_contents)
    return None


def _ints(response: service_pb2.ModelInferResponse, name: str) -> list[int]:
    for index, output in enumerate(response.outputs):
        if output.name == name:
            if index < len(response.raw_output_contents):
                return memoryview(response.raw_output_contents[index]).cast("i").tolist()
            return list(output.contents.int_contents)
    return []


TokenLogprobs = tuple[float, list[tuple[int, float]]]  # (logprob, [(top id, its logprob)])


def token_logprobs(response: service_pb2.ModelInferResponse) -> list[TokenLogprobs]:
    """One entry per token of `output_ids`: its logprob (`output_log_probs`) and the top
    alternatives (`output_top_logprob_ids` / `output_top_logprobs`, [tokens, k])."""
    chosen = _floats(response, "output_log_probs")
    if not chosen:
        return []
    top_values = _floats(response, "output_top_logprobs") or []
    top_ids = _ints(response, "output_top_logprob_ids")
    k = len(top_ids) // len(chosen)
    return [
        (
            value,
            list(zip(top_ids[i * k : (i + 1) * k], top_values[i * k : (i + 1) * k], strict=True)),
        )
        for i, value in enumerate(chosen)
    ]


def cached_prompt_tokens(response: service_pb2.ModelInferResponse) -> int | None:
    """Prompt tokens the engine read from its prefix cache, where this response says: our
    torch engine's `cached_prompt_tokens`, or TensorRT-LLM's `kv_cache_reused_blocks` in whole
    blocks of the size `cortex build-engine` builds with."""
    for index, output in enumerate(response.outputs):
        if output.name in ("cached_prompt_tokens", "kv_cache_reused_blocks"):
            if index < len(response.raw_output_contents):
                values = memoryview(response.raw_output_contents[index]).cast("i").tolist()
            else:
                values = list(output.contents.int_contents)
            if not values:
                return None
            if output.name == "kv_cache_reused_blocks":
                return values[0] * TRTLLM_TOKENS_PER_BLOCK
            return values[0]
    return None


class TritonStream:
    """One gRPC channel to a node's Triton; each generation is one `ModelStreamInfer` stream.

    Triton declares that method bidirectional, but a generation sends one request, so it is
    called as a server stream: metadata, the request and the half-close leave in one batch.
    Written as a bidirectional call, the request waits for the metadata's completion to come
    back through grpcio's poller thread first, which on a busy gateway costs about half a
    millisecond of time to first token (benchmarks/gateway_overhead.py). Triton keeps a
    half-closed stream open until the request's final response, and cancelling the call still
    cancels the request in the engine (tests/gateway/test_streaming.py)."""

    def __init__(
        self, url: str, node: str = "", *, key: str | None = None, tls_ca: bytes | None = None
    ) -> None:
        """`key`: the node's Triton key (`cortex.secrets.triton_key`), sent as metadata on every
        call; `tls_ca`: the PEM CA that signed Triton's certificate, for a TLS channel."""
        self.url = url
        self.node = node or url
        self._metadata = ((TRITON_GRPC_KEY_METADATA, key),) if key else None
        if tls_ca is None:
            self._channel = grpc.aio.insecure_channel(url, options=_CHANNEL_OPTIONS)
        else:
            credentials = grpc.ssl_channel_credentials(root_certificates=tls_ca)
            self._channel = grpc.aio.secure_channel(url, credentials, options=_CHANNEL_OPTIONS)
        # `_registered_method` as grpc's generated stubs pass it: the path is resolved once.
        self._stream_infer = self._channel.unary_stream(
            "/inference.GRPCInferenceService/ModelStreamInfer",
            request_serializer=service_pb2.ModelInferRequest.SerializeToString,
            response_deserializer=service_pb2.ModelStreamInferResponse.FromString,
            _registered_method=True,
        )

    @classmethod
    def for_neuron(cls, url: str, neuron: NeuronRef) -> TritonStream:
        """The stream to a node's Triton with the key and TLS its neuron's entry implies."""
        token = neuron.bearer_token()
        tls_ca = Path(neuron.tls_ca).read_bytes() if neuron.tls_ca else None
        return cls(url, neuron.name, key=triton_key(token) if token else None, tls_ca=tls_ca)

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self._channel.close()

    def generate(
        self, model: str, prompt: list[int], params: GenerationParams, request_id: str
    ) -> Generation:
        """Start a generation: the request leaves on the event loop's next turn, whatever the
        caller does meanwhile (the gateway writes its client's response headers)."""
        request = build_request(model, prompt, params, request_id)
        return Generation(self._stream_infer(request, metadata=self._metadata), model, self.node)

    async def embed(self, model: str, texts: list[str], request_id: str) -> tuple[Any, list[int]]:
        """One embedding request (an embedding model's `text_input`): the vectors and the
        token count of each text."""
        request = service_pb2.ModelInferRequest(model_name=model, id=request_id)
        tensor = request.inputs.add()
        tensor.name, tensor.datatype = "text_input", "BYTES"
        tensor.shape.extend((1, len(texts)))
        encoded = [text.encode("utf-8") for text in texts]
        request.raw_input_contents.append(
            b"".join(struct.pack("<I", len(item)) + item for item in encoded)
        )
        call = self._stream_infer(request, metadata=self._metadata)
        try:
            embedded = await read_embeddings(call, model, self.node)
        except BaseException:
            call.cancel()
            raise
        await until_closed(call)  # not cancelled: see `until_closed`
        return embedded


async def until_closed(call: Any) -> None:
    """Wait, after a request's final response, until Triton has closed its stream. A call
    cancelled in between (its caller closing the channel at once, say) pins the model in
    tritonserver, whose unload then never finishes and the neuron must restart Triton (seen in
    1 of 6 unloads on the loaded CI machine). Triton closes the stream right after the final
    response; the wait is bounded in case it never does."""
    with contextlib.suppress(Exception):
        await asyncio.wait_for(call.code(), STREAM_CLOSE_WAIT_S)


async def read_embeddings(call: Any, model: str, node: str) -> tuple[Any, list[int]]:
    """An embedding request's one final response: (vectors [texts, dim] float32, tokens per
    text)."""
    import numpy as np

    vectors, counts = None, None
    try:
        while True:
            response = await call.read()
            if response is grpc.aio.EOF:
                break
            if response.error_message:
                raise _translate(response.error_message, model)
            result = response.infer_response
            for index, output in enumerate(result.outputs):
                raw = result.raw_output_contents[index]
                if output.name == "embedding":
                    shape = [int(d) for d in output.shape][-2:]
                    vectors = np.frombuffer(raw, dtype="<f4").reshape(shape)
                elif output.name == "prompt_tokens":
                    counts = np.frombuffer(raw, dtype="<i4").tolist()
            final = result.parameters.get("triton_final_response")
            if final is not None and final.bool_param:
                break
    except grpc.aio.AioRpcError as error:
        if error.code() == grpc.StatusCode.UNAVAILABLE:
            raise NodeUnavailable(node, "its Triton does not answer") from None
        raise _translate(error.details() or str(error.code()), model) from None
    if vectors is None or counts is None:
        raise UpstreamFailed(f"{model}: the engine answered without embeddings")
    return vectors, counts


class Generation:
    """One generation's new token ids as the engine produces them (`async for`); `aclose()` (or
    leaving through `contextlib.aclosing`) cancels the Triton request if it is still running."""

    def __init__(self, call: Any, model: str, node: str) -> None:
        self._call = call
        self._model = model
        self._node = node
        self._finished = False
        # Prompt tokens from the engine's prefix cache, once a response has said (the torch
        # engine's first response does, before any token); None until then.
        self.cached_prompt_tokens: int | None = None
        # Logprobs of the tokens read so far and not yet taken (`take_logprobs`).
        self._logprobs: list[TokenLogprobs] = []

    def take_logprobs(self, count: int) -> list[TokenLogprobs]:
        """The logprobs of the next `count` tokens handed out (the reader may be ahead)."""
        taken, self._logprobs = self._logprobs[:count], self._logprobs[count:]
        return taken

    def __aiter__(self) -> Generation:
        return self

    async def __anext__(self) -> list[int]:
        if self._finished:
            await until_closed(self._call)
            raise StopAsyncIteration
        try:
            response = await self._call.read()
        except grpc.aio.AioRpcError as error:
            self._finished = True
            log.warning(
                "%s on %s: gRPC %s: %s", self._model, self._node, error.code(), error.details()
            )
            if error.code() == grpc.StatusCode.UNAVAILABLE:
                raise NodeUnavailable(self._node, "its Triton does not answer") from None
            raise _translate(error.details() or str(error.code()), self._model) from None
        if response is grpc.aio.EOF:
            # The stream closed before the engine's final response: the answer was cut (Triton
            # or the channel went away), and a cut answer must never pass for a whole one.
            self._finished = True
            raise UpstreamFailed(f"{self._model}: the stream ended before the answer was complete")
        if response.error_message:
            self._finished = True
            raise _translate(response.error_message, self._model)
        result = response.infer_response
        final = result.parameters.get("triton_final_response")
        if final is not None and final.bool_param:
            self._finished = True
        if self.cached_prompt_tokens is None and result.outputs:
            self.cached_prompt_tokens = cached_prompt_tokens(result)
        tokens = output_ids(result)
        if tokens and len(result.outputs) > 2:
            self._logprobs.extend(token_logprobs(result))
        return tokens

    async def aclose(self) -> None:
        # Only a generation still running is cancelled. After the engine's final response the
        # call ends by itself (Triton closes the half-closed stream); cancelling it anyway costs
        # tritonserver memory that it never gives back (3.5–7 KB a request, measured with
        # benchmarks/triton_rss.py), so a finished one is left to end.
        if not self._finished:
            self._call.cancel()


# What each engine error kind (`cortex.engine_errors`) is to a client: the one table.
_ENGINE_ERRORS: dict[EngineErrorKind | None, Callable[[str], CortexError]] = {
    EngineErrorKind.OVERLOADED: Overloaded,
    EngineErrorKind.INVALID: InvalidRequest,
    EngineErrorKind.UNAVAILABLE: ModelUnavailable,
    EngineErrorKind.FAILED: UpstreamFailed,
    # No code: Triton's own error (a model it does not hold, one not ready) or an engine's
    # without one. The request is retried on another node before its first token, and the
    # fleet looks at the node's state to tell a model that left from a node that failed.
    None: UpstreamFailed,
}


def _translate(text: str, model: str) -> CortexError:
    """An engine's error text → the gateway's error, by its code alone (never its words)."""
    kind, message = parse_engine_error(text)
    return _ENGINE_ERRORS[kind](f"{model}: {message}")
