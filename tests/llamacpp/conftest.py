"""One fleet for the llama.cpp engine's tests: a real neuron agent (with its tritonserver)
serving SmolLM2's GGUF on the llamacpp engine twice (roomy, and with one slot and a one-request
queue for the overload test), a tiny random Qwen3-MoE and a tiny random BERT embedding model,
both converted by llama.cpp's own converter in this session, behind a real gateway; and llama.cpp standalone (llama-cpp-python's own
generation loop) on the same files, the reference."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest

from cortex.config import ModelProfile
from cortex.demo.smollm2 import gguf_path
from cortex.demo.tiny_model import chat_template
from cortex.launch import loopback_gateway, loopback_neuron, running_gateway, running_neuron
from tests.llamacpp.models import tiny_bert_gguf, tiny_moe_gguf

CONTEXT = 4096


@dataclass
class LlamaCppFleet:
    openai_url: str
    neuron_url: str
    triton_grpc: str
    neuron_log: Path
    smollm2_gguf: Path
    moe_gguf: Path
    bert_gguf: Path


@pytest.fixture(scope="session")
def moe_gguf(smollm2_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_moe_gguf(tmp_path_factory.mktemp("tiny-moe"), smollm2_model, chat_template())


@pytest.fixture(scope="session")
def bert_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_bert_gguf(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def llamacpp_fleet(
    smollm2_model: Path,
    moe_gguf: Path,
    bert_gguf: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[LlamaCppFleet]:
    folder = tmp_path_factory.mktemp("llamacpp-fleet")
    smollm2 = gguf_path(smollm2_model)
    models = [
        ModelProfile(
            name="smollm2",
            source=str(smollm2),
            tokenizer=str(smollm2_model),
            context_length=CONTEXT,
            kv_cache_tokens=4 * CONTEXT,
            max_batch_size=4,
        ),
        ModelProfile(
            name="smollm2-one-slot",
            source=str(smollm2),
            tokenizer=str(smollm2_model),
            context_length=CONTEXT,
            kv_cache_tokens=CONTEXT,
            max_batch_size=1,
            max_queue_size=1,
        ),
        # No tokenizer folder: the gateway's tokenizer and chat template come from the file.
        ModelProfile(
            name="tiny-moe",
            source=str(moe_gguf),
            context_length=CONTEXT,
            kv_cache_tokens=CONTEXT,
            max_batch_size=2,
        ),
        ModelProfile(
            name="tiny-bert",
            source=str(bert_gguf),
            embedding=True,
            kv_cache_tokens=512,
            max_batch_size=4,
        ),
    ]
    node = loopback_neuron(folder / "node", "llamacpp-node", models)
    with running_neuron(node) as neuron:
        config = loopback_gateway({"llamacpp-node": neuron.url}, poll_interval_s=0.5)
        with running_gateway(folder / "cortex.toml", config, neurons_up=True) as gateway:
            yield LlamaCppFleet(
                openai_url=f"{gateway.url}/v1",
                neuron_url=neuron.url,
                triton_grpc=neuron.triton_grpc,
                neuron_log=neuron.log,
                smollm2_gguf=smollm2,
                moe_gguf=moe_gguf,
                bert_gguf=bert_gguf,
            )


@pytest.fixture(scope="session")
def oai_llamacpp(llamacpp_fleet: LlamaCppFleet) -> openai.OpenAI:
    return openai.OpenAI(base_url=llamacpp_fleet.openai_url, api_key="unused", max_retries=0)


def standalone(path: Path) -> Any:
    """llama.cpp on its own (llama-cpp-python's high-level `Llama`), 2 threads, with flash
    attention as llama.cpp's own default ("auto") chooses on a CPU and the engine runs it
    (llama-cpp-python's `Llama` leaves it off unless asked; the sums differ in rounding)."""
    from llama_cpp import Llama

    return Llama(str(path), n_ctx=CONTEXT, n_threads=2, flash_attn=True, verbose=False)


def standalone_greedy(llm: Any, prompt: list[int], max_tokens: int) -> list[int]:
    """llama.cpp's own greedy generation, up to an end-of-generation token (not kept)."""
    import llama_cpp

    tokens: list[int] = []
    for token in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
        if llama_cpp.llama_vocab_is_eog(llm._model.vocab, token):
            break
        tokens.append(token)
        if len(tokens) >= max_tokens:
            break
    return tokens
