"""/v1/embeddings on a tiny random BERT (converted in this session by llama.cpp's converter,
mean pooling declared the sentence-transformers way) served by the llamacpp engine, checked
against transformers' BertModel on the same checkpoint with the same pooling; batch inputs, both
encoding formats, and 400s naming the field for the wrong kind of model or input."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import numpy.typing as npt
import openai
import pytest
import torch
from transformers import AutoTokenizer, BertModel

from tests.llamacpp.conftest import LlamaCppFleet

TEXTS = ["The cat sat on the blue sea.", "Water is blue", "dog"]


def reference(checkpoint: Path, texts: list[str]) -> tuple[npt.NDArray[Any], int]:
    """Mean of the last hidden states over each text's tokens, L2-normalized; total tokens."""
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = BertModel.from_pretrained(checkpoint, add_pooling_layer=False).eval()
    vectors, tokens = [], 0
    for text in texts:
        encoded = tokenizer(text, return_tensors="pt")
        tokens += encoded["input_ids"].shape[1]
        with torch.no_grad():
            pooled = model(**encoded).last_hidden_state[0].mean(dim=0).numpy()
        vectors.append(pooled / np.linalg.norm(pooled))
    return np.stack(vectors), tokens


@pytest.fixture(scope="module")
def expected(llamacpp_fleet: LlamaCppFleet) -> tuple[npt.NDArray[Any], int]:
    return reference(llamacpp_fleet.bert_gguf.parent / "tiny-bert-hf", TEXTS)


def post(fleet: LlamaCppFleet, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{fleet.openai_url}/embeddings", json=body, timeout=120)


def test_a_batch_of_texts_equals_transformers_with_the_files_pooling(
    llamacpp_fleet: LlamaCppFleet, expected: tuple[npt.NDArray[Any], int]
) -> None:
    response = post(llamacpp_fleet, {"model": "tiny-bert", "input": TEXTS})
    assert response.status_code == 200, response.text
    body = response.json()
    vectors = np.array([item["embedding"] for item in body["data"]], dtype=np.float32)
    assert [item["index"] for item in body["data"]] == [0, 1, 2]
    np.testing.assert_allclose(vectors, expected[0], atol=1e-4)
    assert body["usage"] == {"prompt_tokens": expected[1], "total_tokens": expected[1]}


def test_the_openai_sdk_gets_base64_and_decodes_it(
    oai_llamacpp: openai.OpenAI,
    llamacpp_fleet: LlamaCppFleet,
    expected: tuple[npt.NDArray[Any], int],
) -> None:
    # The SDK asks for base64 unless told otherwise, and decodes it to floats.
    result = oai_llamacpp.embeddings.create(model="tiny-bert", input=TEXTS[0])
    np.testing.assert_allclose(result.data[0].embedding, expected[0][0], atol=1e-4)
    raw = post(llamacpp_fleet, {"model": "tiny-bert", "input": TEXTS, "encoding_format": "base64"})
    decoded = [
        np.frombuffer(base64.b64decode(item["embedding"]), dtype="<f4")
        for item in raw.json()["data"]
    ]
    np.testing.assert_allclose(np.stack(decoded), expected[0], atol=1e-4)


def test_the_wrong_kind_of_model_or_input_is_a_400_naming_the_field(
    llamacpp_fleet: LlamaCppFleet, oai_llamacpp: openai.OpenAI
) -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        ({"model": "smollm2", "input": "hello"}, "model"),
        ({"model": "tiny-bert", "input": [[1, 2, 3]]}, "input"),
        ({"model": "tiny-bert", "input": []}, "input"),
        ({"model": "tiny-bert", "input": "hi", "dimensions": 8}, "dimensions"),
        ({"model": "tiny-bert", "input": "hi", "encoding_format": "int8"}, "encoding_format"),
    ]
    for body, field in cases:
        response = post(llamacpp_fleet, body)
        assert response.status_code == 400, (body, response.text)
        assert response.json()["error"]["param"] == field, body
    with pytest.raises(openai.BadRequestError) as caught:
        oai_llamacpp.chat.completions.create(
            model="tiny-bert", messages=[{"role": "user", "content": "hi"}]
        )
    assert caught.value.param == "model"
