"""The llama.cpp engine through a real neuron, tritonserver and gateway, with the official openai
SDK: greedy answers equal llama.cpp's own generation from the same file token for token, several
streams batched at once, cancellation, prefix reuse reported as cached tokens, an overloaded
model's 503, and bad input refused with the tensor or field it is about."""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any

import httpx
import numpy as np
import numpy.typing as npt
import openai
import pytest
import tritonclient.grpc as grpcclient
from openai.types.chat import ChatCompletionMessageParam
from transformers import AutoTokenizer

from tests.llamacpp.conftest import LlamaCppFleet, standalone, standalone_greedy

MAX_TOKENS = 32
PROMPTS = [
    "What is the capital of France?",
    "Write one sentence about the sea.",
    "List three colours.",
    "Why is the sky blue?",
]


@pytest.fixture(scope="module")
def reference(llamacpp_fleet: LlamaCppFleet) -> Any:
    return standalone(llamacpp_fleet.smollm2_gguf)


@pytest.fixture(scope="module")
def hf_tokenizer(smollm2_model: Any) -> Any:
    return AutoTokenizer.from_pretrained(smollm2_model)


def expected_answer(reference: Any, tokenizer: Any, prompt: str) -> tuple[str, int, str]:
    """(text, completion tokens, finish reason) of llama.cpp's own greedy run on the prompt the
    gateway renders."""
    messages = [{"role": "user", "content": prompt}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    tokens = standalone_greedy(reference, ids, MAX_TOKENS)
    finish = "length" if len(tokens) == MAX_TOKENS else "stop"
    return tokenizer.decode(tokens, skip_special_tokens=True), len(tokens), finish


def ask(client: openai.OpenAI, prompt: str, model: str = "smollm2", **options: Any) -> Any:
    settings: dict[str, Any] = {"max_tokens": MAX_TOKENS, "temperature": 0, **options}
    return client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}], **settings
    )


@pytest.mark.parametrize("prompt", PROMPTS[:2])
def test_greedy_answers_equal_llama_cpp_standalone(
    oai_llamacpp: openai.OpenAI, reference: Any, hf_tokenizer: Any, prompt: str
) -> None:
    reply = ask(oai_llamacpp, prompt)
    text, count, finish = expected_answer(reference, hf_tokenizer, prompt)
    assert reply.choices[0].message.content == text
    assert reply.usage is not None and reply.usage.completion_tokens == count
    assert reply.choices[0].finish_reason == finish


def test_concurrent_streams_are_batched_and_each_equals_its_own_answer(
    oai_llamacpp: openai.OpenAI, reference: Any, hf_tokenizer: Any
) -> None:
    answers: dict[str, str] = {}
    overlap = threading.Barrier(len(PROMPTS))

    def stream(prompt: str) -> None:
        overlap.wait()
        chunks = ask(oai_llamacpp, prompt, stream=True)
        answers[prompt] = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    threads = [threading.Thread(target=stream, args=(p,)) for p in PROMPTS]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=240)
    for prompt in PROMPTS:
        assert answers[prompt] == expected_answer(reference, hf_tokenizer, prompt)[0], prompt


def in_flight(fleet: LlamaCppFleet, model: str) -> int:
    loaded = httpx.get(f"{fleet.neuron_url}/status", timeout=10).json()["loaded"]
    count: int = next(m["in_flight"] for m in loaded if m["name"] == model)
    return count


def test_a_stream_left_early_is_cancelled_within_a_step(llamacpp_fleet: LlamaCppFleet) -> None:
    """A request for 4,000 tokens that never meets its end id (Triton's own client, so the end id
    can be one the model does not produce), cancelled after three responses: the engine lets it
    go at its next step, long before it could have finished."""
    load = httpx.post(
        f"{llamacpp_fleet.neuron_url}/models/load", json={"model": "smollm2"}, timeout=120
    )
    assert load.status_code == 200, load.text
    client = grpcclient.InferenceServerClient(llamacpp_fleet.triton_grpc)
    received = threading.Semaphore(0)

    def callback(result: Any, error: Any) -> None:  # tritonclient passes both by keyword
        received.release()

    client.start_stream(callback=callback)
    inputs = [
        tensor("input_ids", np.array([[1, 4093, 198, 1780, 314]], dtype=np.int32), "INT32"),
        tensor("request_output_len", np.array([[4000]], dtype=np.int32), "INT32"),
        tensor("end_id", np.array([[-5]], dtype=np.int32), "INT32"),
    ]
    try:
        client.async_stream_infer("smollm2", inputs, request_id="to-cancel")
        for _ in range(3):
            assert received.acquire(timeout=120)
        assert in_flight(llamacpp_fleet, "smollm2") == 1
    finally:
        client.stop_stream(cancel_requests=True)
        client.close()
    deadline = time.monotonic() + 10
    while in_flight(llamacpp_fleet, "smollm2"):
        assert time.monotonic() < deadline, "the engine kept generating for a gone client"
        time.sleep(0.05)


def test_the_second_turn_reuses_the_first_turns_prefix(oai_llamacpp: openai.OpenAI) -> None:
    system = f"Session {uuid.uuid4().hex}. You answer briefly. " + "Be kind. " * 30
    first: list[ChatCompletionMessageParam] = [
        {"role": "system", "content": system},
        {"role": "user", "content": "Hello!"},
    ]
    opened = oai_llamacpp.chat.completions.create(
        model="smollm2",
        messages=first,
        max_tokens=8,
        temperature=0,
    )
    assert opened.usage is not None and opened.usage.prompt_tokens_details is not None
    # Only the template's opening ("<|im_start|>system\n") can be in any slot already: reuse is
    # per token, not per block.
    assert opened.usage.prompt_tokens_details.cached_tokens is not None
    assert opened.usage.prompt_tokens_details.cached_tokens <= 3
    second: list[ChatCompletionMessageParam] = [
        *first,
        {"role": "assistant", "content": opened.choices[0].message.content or ""},
        {"role": "user", "content": "And again?"},
    ]
    stream = oai_llamacpp.chat.completions.create(
        model="smollm2",
        messages=second,
        max_tokens=4,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    usage = [c.usage for c in stream if c.usage][-1]
    assert usage is not None and usage.prompt_tokens_details is not None
    assert usage.prompt_tokens_details.cached_tokens is not None
    # All of turn 1's prompt is in the slot's cache (its answer too, but the chat template
    # renders that differently from how it was generated).
    assert usage.prompt_tokens_details.cached_tokens >= opened.usage.prompt_tokens


def test_sampling_with_a_seed_repeats_and_differs_from_greedy(
    oai_llamacpp: openai.OpenAI,
) -> None:
    options: dict[str, Any] = {"temperature": 1.5, "top_p": 0.95, "seed": 7}
    first = ask(oai_llamacpp, PROMPTS[3], **options).choices[0].message.content
    again = ask(oai_llamacpp, PROMPTS[3], **options).choices[0].message.content
    greedy = ask(oai_llamacpp, PROMPTS[3]).choices[0].message.content
    assert first == again != greedy


def test_an_overloaded_model_answers_503_with_retry_after(
    llamacpp_fleet: LlamaCppFleet,
) -> None:
    """One slot and a one-request queue: of several long requests at once, some are refused
    with the torch engine's overload sentence, which the gateway turns into 503."""
    statuses: list[int] = []

    def post() -> None:
        response = httpx.post(
            f"{llamacpp_fleet.openai_url}/chat/completions",
            json={
                "model": "smollm2-one-slot",
                "messages": [{"role": "user", "content": "Tell a long story."}],
                "max_tokens": 64,
            },
            timeout=120,
        )
        statuses.append(response.status_code)
        if response.status_code == 503:
            assert response.headers.get("retry-after")
            assert "queue is full" in response.json()["error"]["message"]

    threads = [threading.Thread(target=post) for _ in range(5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert sorted(set(statuses)) == [200, 503], statuses


def infer_error(fleet: LlamaCppFleet, inputs: list[grpcclient.InferInput]) -> str:
    """What the engine answers a raw Triton request (the gateway never sends these)."""
    client = grpcclient.InferenceServerClient(fleet.triton_grpc)
    errors: list[str] = []
    done = threading.Event()

    def callback(result: Any, error: Any) -> None:
        if error is not None:
            errors.append(str(error))
            done.set()
        elif result.get_response().parameters.get("triton_final_response").bool_param:
            done.set()

    client.start_stream(callback=callback)
    try:
        client.async_stream_infer("smollm2", inputs, request_id="bad")
        assert done.wait(30)
    finally:
        client.stop_stream()
        client.close()
    assert errors, "the bad request was served"
    return errors[0]


def tensor(name: str, values: npt.NDArray[Any], dtype: str) -> grpcclient.InferInput:
    item = grpcclient.InferInput(name, list(values.shape), dtype)
    item.set_data_from_numpy(values)
    return item


def test_bad_tensors_are_refused_naming_them(llamacpp_fleet: LlamaCppFleet) -> None:
    length = tensor("request_output_len", np.array([[4]], dtype=np.int32), "INT32")
    outside = tensor("input_ids", np.array([[1, 10**6]], dtype=np.int32), "INT32")
    assert "input_ids" in infer_error(llamacpp_fleet, [outside, length])
    assert "input_ids is required" in infer_error(llamacpp_fleet, [length])
    ids = tensor("input_ids", np.array([[1, 2, 3]], dtype=np.int32), "INT32")
    hot = tensor("temperature", np.array([[-1.0]], dtype=np.float32), "FP32")
    assert "temperature" in infer_error(llamacpp_fleet, [ids, length, hot])
    texts = tensor("text_input", np.array([[b"hello"]], dtype=object), "BYTES")
    assert "text_input" in infer_error(llamacpp_fleet, [ids, length, texts])


def test_bad_requests_through_the_gateway_are_400s_naming_the_field(
    oai_llamacpp: openai.OpenAI,
) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        ask(oai_llamacpp, "Hi", max_tokens=0)
    assert caught.value.param == "max_tokens"
    with pytest.raises(openai.BadRequestError) as caught:
        ask(oai_llamacpp, "word " * 5000)
    assert caught.value.code == "context_length_exceeded"
