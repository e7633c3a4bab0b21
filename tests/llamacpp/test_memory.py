"""The neuron's memory estimate for a llamacpp model (file + KV cache + compute buffers + the
stub around them) against what the model's Triton stub holds (its RSS, as the neuron measures
it on a CPU node) once it has prefilled a long prompt and decoded several streams."""

from __future__ import annotations

import threading

import httpx
import openai

from tests.llamacpp.conftest import LlamaCppFleet


def test_the_estimate_is_within_ten_percent_of_the_rss(
    oai_llamacpp: openai.OpenAI, llamacpp_fleet: LlamaCppFleet
) -> None:
    long_prompt = "Summarise the following notes. " + "The tide rose and fell. " * 150

    def ask(content: str) -> None:
        oai_llamacpp.chat.completions.create(
            model="smollm2",
            messages=[{"role": "user", "content": content}],
            max_tokens=16,
            temperature=0,
        )

    ask(long_prompt)  # a 512-token prefill chunk: the compute buffer's largest use
    threads = [threading.Thread(target=ask, args=(f"Say {i}.",)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    loaded = httpx.get(f"{llamacpp_fleet.neuron_url}/status", timeout=10).json()["loaded"]
    model = next(m for m in loaded if m["name"] == "smollm2")
    estimated, measured = model["estimated_bytes"], model["memory_bytes"]
    print(f"estimated {estimated / 2**20:.1f} MiB, RSS {measured / 2**20:.1f} MiB")
    assert abs(measured - estimated) <= 0.10 * estimated
