"""The neuron reports a model's last use from Triton's own model statistics, which every engine
has (the TensorRT-LLM backend writes no stats file of ours), so idle TTLs count from the last
request rather than from the load."""

from __future__ import annotations

import httpx

from tests.conftest import Embedded


def test_last_used_is_tritons_last_inference(embedded: Embedded) -> None:
    reply = httpx.post(
        embedded.base_url + "/chat/completions",
        json={
            "model": "cortex-tiny",
            "max_tokens": 2,
            "messages": [{"role": "user", "content": "hi"}],
        },
        timeout=180,
    )
    assert reply.status_code == 200, reply.text
    stats = httpx.get(
        f"{embedded.triton_http}/v2/models/cortex-tiny/stats",
        headers=embedded.triton_headers,
        timeout=10,
    ).json()
    last_inference = stats["model_stats"][0]["last_inference"] / 1000
    status = httpx.get(
        f"{embedded.neuron_url}/status", headers=embedded.neuron_headers, timeout=10
    ).json()
    (model,) = [m for m in status["loaded"] if m["name"] == "cortex-tiny"]
    assert model["last_used"] == last_inference
    assert model["last_used"] > model["loaded_at"]
