"""Talking to a node: the neuron's lifecycle API (httpx) and Triton's gRPC stream (tritonclient).

Lower-level errors (httpx, gRPC) are translated to the gateway's exception tree here, once.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np
import tritonclient.grpc.aio as triton_grpc
from tritonclient.grpc import InferInput
from tritonclient.utils import InferenceServerException

from control_plane.errors import CortexError, ModelNotFound, Overloaded, UpstreamFailed
from cortex import logs
from cortex.config import NeuronRef
from cortex.neuron_api import LoadedModel, NeuronStatus, TokenizerFiles, UnloadResult


class NeuronClient:
    def __init__(self, neuron: NeuronRef, timeout: float) -> None:
        self.neuron = neuron
        headers = {"authorization": f"Bearer {neuron.token}"} if neuron.token else {}
        self._client = httpx.AsyncClient(
            base_url=neuron.endpoint, headers=headers, timeout=httpx.Timeout(10.0, read=timeout)
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
            raise UpstreamFailed(f"neuron {self.neuron.name} did not answer: {error!r}") from None
        if response.status_code >= 400:
            try:
                message = response.json().get("error", response.text)
            except ValueError:
                message = response.text
            if response.status_code == 404:
                raise UpstreamFailed(f"neuron {self.neuron.name}: {message}")
            if response.status_code == 409:
                raise Overloaded(f"neuron {self.neuron.name}: {message}")
            raise UpstreamFailed(f"neuron {self.neuron.name}: {message}")
        return dict(response.json())

    async def status(self, timeout: float) -> NeuronStatus:
        data = await self._call("GET", "/status", timeout=timeout)
        return NeuronStatus.model_validate(data)

    async def load(self, model: str) -> LoadedModel:
        return LoadedModel.model_validate(
            await self._call("POST", "/models/load", json={"model": model})
        )

    async def unload(self, model: str, force: bool = False) -> UnloadResult:
        data = await self._call("POST", "/models/unload", json={"model": model, "force": force})
        return UnloadResult.model_validate(data)

    async def tokenizer(self, model: str) -> TokenizerFiles:
        return TokenizerFiles.model_validate(await self._call("GET", f"/models/{model}/tokenizer"))


@dataclass(frozen=True)
class GenerationParams:
    max_tokens: int
    end_ids: tuple[int, ...]
    pad_id: int
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None


def _tensor(name: str, array: np.ndarray, datatype: str) -> InferInput:
    tensor = InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return tensor


def build_inputs(prompt: list[int], params: GenerationParams) -> list[InferInput]:
    """The request tensors of TensorRT-LLM's `tensorrt_llm` model (our torch engine takes the same)."""
    inputs = [
        _tensor("input_ids", np.array([prompt], dtype=np.int32), "INT32"),
        _tensor("input_lengths", np.array([[len(prompt)]], dtype=np.int32), "INT32"),
        _tensor("request_output_len", np.array([[params.max_tokens]], dtype=np.int32), "INT32"),
        _tensor("end_id", np.array([[params.end_ids[0]]], dtype=np.int32), "INT32"),
        _tensor("pad_id", np.array([[params.pad_id]], dtype=np.int32), "INT32"),
        _tensor("streaming", np.array([[True]], dtype=bool), "BOOL"),
        _tensor("temperature", np.array([[params.temperature]], dtype=np.float32), "FP32"),
        _tensor("runtime_top_k", np.array([[params.top_k]], dtype=np.int32), "INT32"),
        _tensor("runtime_top_p", np.array([[params.top_p]], dtype=np.float32), "FP32"),
    ]
    if params.seed is not None:
        inputs.append(_tensor("seed", np.array([[params.seed]], dtype=np.uint64), "UINT64"))
    return inputs


class TritonStream:
    """One gRPC channel to a node's Triton; each generation is one bidirectional stream."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._client = triton_grpc.InferenceServerClient(url=url)

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self._client.close()

    async def generate(
        self, model: str, prompt: list[int], params: GenerationParams, request_id: str
    ) -> AsyncGenerator[list[int], None]:
        """New token ids as the engine produces them; leaving early cancels the Triton request."""
        done = asyncio.Event()

        async def requests() -> AsyncIterator[dict[str, Any]]:
            yield {
                "model_name": model,
                "inputs": build_inputs(prompt, params),
                "request_id": request_id,
            }
            # Keep our side open until the final response: closing early ends the stream.
            await done.wait()

        responses = self._client.stream_infer(requests())
        try:
            async for result, error in responses:
                if error is not None:
                    raise _translate(error, model)
                if result is None:
                    continue
                output = result.as_numpy("output_ids")
                tokens = [] if output is None else [int(t) for t in output.reshape(-1)]
                final = result.get_response().parameters.get("triton_final_response")
                yield tokens
                if final is not None and final.bool_param:
                    return
        except InferenceServerException as error:
            raise _translate(error, model) from None
        finally:
            done.set()
            with contextlib.suppress(Exception):
                responses.cancel()


def _translate(error: InferenceServerException, model: str) -> CortexError:
    message = error.message() or str(error)
    if "queue is full" in message:
        return Overloaded(f"{model}: {message}")
    if "unknown model" in message.lower() or "is not ready" in message.lower():
        return ModelNotFound(model)
    return UpstreamFailed(f"{model}: {message}")
