"""Byte-level tests of the Triton stream's messages: the request the gateway builds straight as
protobuf is the one tritonclient's InferInput + numpy would build, and streamed token ids are
read back from raw little-endian contents."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from tritonclient.grpc import InferInput, service_pb2
from tritonclient.grpc._utils import _get_inference_request

from control_plane.node_client import (
    GenerationParams,
    build_request,
    cached_prompt_tokens,
    output_ids,
)


def tritonclient_request(
    model: str, prompt: list[int], params: GenerationParams, request_id: str
) -> service_pb2.ModelInferRequest:
    def tensor(name: str, array: npt.NDArray[Any], datatype: str) -> InferInput:
        infer_input = InferInput(name, list(array.shape), datatype)
        infer_input.set_data_from_numpy(array)
        return infer_input

    inputs = [
        tensor("input_ids", np.array([prompt], dtype=np.int32), "INT32"),
        tensor("input_lengths", np.array([[len(prompt)]], dtype=np.int32), "INT32"),
        tensor("request_output_len", np.array([[params.max_tokens]], dtype=np.int32), "INT32"),
        tensor("end_id", np.array([[params.end_ids[0]]], dtype=np.int32), "INT32"),
        tensor("pad_id", np.array([[params.pad_id]], dtype=np.int32), "INT32"),
        tensor("streaming", np.array([[True]], dtype=bool), "BOOL"),
        tensor("temperature", np.array([[params.temperature]], dtype=np.float32), "FP32"),
        tensor("runtime_top_k", np.array([[params.top_k]], dtype=np.int32), "INT32"),
        tensor("runtime_top_p", np.array([[params.top_p]], dtype=np.float32), "FP32"),
    ]
    if params.seed is not None:
        inputs.append(tensor("seed", np.array([[params.seed]], dtype=np.uint64), "UINT64"))
    if params.return_perf_metrics:
        inputs.append(tensor("return_perf_metrics", np.array([[True]], dtype=bool), "BOOL"))
    if params.top_logprobs is not None:
        inputs.append(tensor("return_log_probs", np.array([[True]], dtype=bool), "BOOL"))
        inputs.append(
            tensor("num_top_logprobs", np.array([[params.top_logprobs]], dtype=np.int32), "INT32")
        )
    if params.guide_type is not None:
        for name, text in (
            ("guided_decoding_guide_type", params.guide_type),
            ("guided_decoding_guide", params.guide or ""),
        ):
            inputs.append(tensor(name, np.array([[text.encode()]], dtype=np.object_), "BYTES"))
    return _get_inference_request(
        model_name=model,
        inputs=inputs,
        model_version="",
        request_id=request_id,
        outputs=None,
        sequence_id=0,
        sequence_start=False,
        sequence_end=False,
        priority=0,
        timeout=None,
        parameters=None,
    )


@pytest.mark.parametrize(
    "params",
    [
        GenerationParams(max_tokens=64, end_ids=(2, 7), pad_id=0),
        GenerationParams(
            max_tokens=1,
            end_ids=(151645,),
            pad_id=3,
            temperature=0.7,
            top_k=40,
            top_p=0.9,
            seed=2**63,
        ),
        GenerationParams(max_tokens=8, end_ids=(2,), pad_id=0, return_perf_metrics=True),
        GenerationParams(
            max_tokens=8,
            end_ids=(2,),
            pad_id=0,
            top_logprobs=20,
            guide_type="json_schema",
            guide='{"type": "object", "properties": {"é": {"enum": ["ü"]}}}',
        ),
    ],
)
def test_the_request_is_what_tritonclient_builds(params: GenerationParams) -> None:
    prompt = [1, 2**31 - 1, 0, 4095, 17]
    ours = build_request("llama-8b", prompt, params, "req-1")
    theirs = tritonclient_request("llama-8b", prompt, params, "req-1")
    assert ours == theirs
    assert ours.SerializeToString(deterministic=True) == theirs.SerializeToString(
        deterministic=True
    )


def test_token_ids_are_read_from_raw_contents() -> None:
    response = service_pb2.ModelInferResponse()
    response.outputs.add(name="output_ids", datatype="INT32", shape=[1, 1, 3])
    response.outputs.add(name="sequence_length", datatype="INT32", shape=[1, 1])
    response.raw_output_contents.extend(
        [np.array([5, 0, 2**31 - 1], dtype="<i4").tobytes(), np.array([3], dtype="<i4").tobytes()]
    )
    assert output_ids(response) == [5, 0, 2**31 - 1]

    wide = service_pb2.ModelInferResponse()
    wide.outputs.add(name="output_ids", datatype="INT64", shape=[1, 1, 1])
    wide.raw_output_contents.append(np.array([9], dtype="<i8").tobytes())
    assert output_ids(wide) == [9]


def test_an_empty_final_response_has_no_tokens() -> None:
    empty = service_pb2.ModelInferResponse()
    empty.parameters["triton_final_response"].bool_param = True
    assert output_ids(empty) == []
    none_yet = service_pb2.ModelInferResponse()
    none_yet.outputs.add(name="output_ids", datatype="INT32", shape=[1, 1, 0])
    none_yet.raw_output_contents.append(b"")
    assert output_ids(none_yet) == []


def test_cached_prompt_tokens_are_read_from_either_engine() -> None:
    """The torch engine's `cached_prompt_tokens` as it is; TensorRT-LLM's reused blocks times
    the block size engines are built with (32 tokens); none on responses that do not say."""
    torch_first = service_pb2.ModelInferResponse()
    torch_first.outputs.add(name="output_ids", datatype="INT32", shape=[1, 1, 0])
    torch_first.outputs.add(name="sequence_length", datatype="INT32", shape=[1, 1])
    torch_first.outputs.add(name="cached_prompt_tokens", datatype="INT32", shape=[1, 1])
    torch_first.raw_output_contents.extend(
        [b"", np.array([0], dtype="<i4").tobytes(), np.array([17408], dtype="<i4").tobytes()]
    )
    assert cached_prompt_tokens(torch_first) == 17408

    trtllm = service_pb2.ModelInferResponse()
    trtllm.outputs.add(name="output_ids", datatype="INT32", shape=[1, 1, 1])
    trtllm.outputs.add(name="kv_cache_reused_blocks", datatype="INT32", shape=[1, 1])
    trtllm.raw_output_contents.extend(
        [np.array([5], dtype="<i4").tobytes(), np.array([544], dtype="<i4").tobytes()]
    )
    assert cached_prompt_tokens(trtllm) == 544 * 32

    plain = service_pb2.ModelInferResponse()
    plain.outputs.add(name="output_ids", datatype="INT32", shape=[1, 1, 1])
    plain.raw_output_contents.append(np.array([5], dtype="<i4").tobytes())
    assert cached_prompt_tokens(plain) is None
