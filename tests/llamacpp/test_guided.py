"""Guided decoding, logprobs and priority in the llama.cpp engine, on SmolLM2's GGUF: the engine
on its own (a real `Runtime` over the file, no Triton), then one request through the real
neuron, tritonserver and gateway with the official openai SDK.

Schemas are validated with the `jsonschema` package and regexes with `re`, not with the
engine's own code; logprobs are compared with llama.cpp's own logits for the same tokens
(llama-cpp-python's `Llama`, evaluating the prompt and then one token at a time as the engine
does), log-softmaxed here."""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import numpy as np
import numpy.typing as npt
import openai
import pytest
from transformers import AutoTokenizer

from cortex.demo.smollm2 import gguf_path
from cortex.guides import GuideType
from neuron_agent.engines.guided import Guide
from neuron_agent.engines.llamacpp.runtime import Runtime, RuntimeOptions
from neuron_agent.engines.llamacpp.scheduler import Engine, GenerationRequest, RequestRejected
from neuron_agent.engines.logprobs import TokenLogprob
from tests.llamacpp.conftest import LlamaCppFleet, standalone
from tests.llamacpp.test_engine import infer_error, tensor
from tests.torch_engine.test_engine import Collector as EngineCollector
from tests.torch_engine.test_guided import SCHEMAS, prompt
from tests.torch_engine.test_guided import finish as finish_within

CONTEXT = 2048


class Collector(EngineCollector):
    """The torch engine tests' collector, with the logprobs handed to it."""

    def __init__(self) -> None:
        super().__init__()
        self.logprobs: list[TokenLogprob] = []


def make_engine(gguf: Path, slots: int, prefix_caching: bool = True) -> Engine:
    runtime = Runtime(
        RuntimeOptions(
            gguf, context_tokens=slots * CONTEXT, sequences=slots, batch_tokens=512, threads=2
        )
    )
    engine = Engine(runtime, CONTEXT, max_batch_size=slots, prefix_caching=prefix_caching)
    engine.start()
    return engine


def close(engine: Engine) -> None:
    engine.stop()
    engine.runtime.close()


@pytest.fixture(scope="module")
def engine(smollm2_model: Path) -> Iterator[Engine]:
    built = make_engine(gguf_path(smollm2_model), 4)
    yield built
    close(built)


@pytest.fixture(scope="module")
def tokenizer(smollm2_model: Path) -> Any:
    return AutoTokenizer.from_pretrained(smollm2_model)


def submit(
    engine: Engine,
    ids: list[int],
    guide: Guide | None = None,
    max_new: int = 96,
    **options: Any,
) -> Collector:
    collector = Collector()
    engine.submit(
        GenerationRequest(
            prompt=ids,
            max_new_tokens=max_new,
            emit=collector.emit,
            fail=collector.fail,
            guide=guide,
            logprobs=collector.logprobs.extend,
            **options,
        )
    )
    return collector


def finish(collectors: list[Collector], tokenizer: Any) -> list[str]:
    return finish_within(collectors, tokenizer, timeout=240)  # llama.cpp on 2 cores is slower


def test_every_constrained_answer_validates_and_the_free_one_does_not(
    engine: Engine, tokenizer: Any
) -> None:
    ids = prompt(tokenizer, "Tell me about your favourite holiday.")
    collectors = [
        submit(
            engine,
            ids,
            Guide(GuideType.JSON_SCHEMA, json.dumps(schema)),
            temperature=temperature,
            seed=seed,
        )
        for schema in SCHEMAS
        for temperature, seed in ((0.0, None), (1.0, 7), (1.0, 8))
    ]
    free = submit(engine, ids, max_new=48)
    texts = finish([*collectors, free], tokenizer)
    for index, text in enumerate(texts[:-1]):
        jsonschema.validate(json.loads(text), SCHEMAS[index // 3])
    with pytest.raises(ValueError):  # the model answers in prose by itself
        json.loads(texts[-1])


def test_json_object_regex_ebnf_and_lark_guides(engine: Engine, tokenizer: Any) -> None:
    ids = prompt(tokenizer, "hello")
    sampled: dict[str, Any] = {"temperature": 1.0, "seed": 3}
    # Greedy: sampled at temperature 1, SmolLM2 can ramble inside a string past any budget.
    json_any = submit(engine, ids, Guide(GuideType.JSON, ""), max_new=200)
    regex = submit(engine, ids, Guide(GuideType.REGEX, r"[0-9]{3}-[a-z]{2}"), **sampled)
    ebnf = submit(
        engine,
        ids,
        Guide(GuideType.EBNF_GRAMMAR, 'root ::= answer ("," answer)?\nanswer ::= "yes" | "no"'),
        **sampled,
    )
    lark = submit(engine, ids, Guide(GuideType.LARK_GRAMMAR, 'start: "a"+ "b"'), max_new=8)
    json_text, regex_text, ebnf_text, lark_text = finish([json_any, regex, ebnf, lark], tokenizer)
    assert isinstance(json.loads(json_text), dict)
    assert re.fullmatch(r"[0-9]{3}-[a-z]{2}", regex_text), regex_text
    assert re.fullmatch(r"(yes|no)(,(yes|no))?", ebnf_text), ebnf_text
    assert re.fullmatch(r"a+b|a+", lark_text), lark_text  # a+ alone: max_new_tokens ran out


def test_a_bad_guide_is_refused_naming_the_tensor(engine: Engine, tokenizer: Any) -> None:
    with pytest.raises(RequestRejected, match="guided_decoding_guide"):
        submit(engine, prompt(tokenizer, "x"), Guide(GuideType.REGEX, "[a-"))
    with pytest.raises(RequestRejected, match="num_top_logprobs"):
        submit(engine, prompt(tokenizer, "x"), top_logprobs=21)


def reference_logprobs(llm: Any, ids: list[int], tokens: list[int]) -> list[npt.NDArray[Any]]:
    """llama.cpp's own log-softmaxed logits before each of `tokens` (and after the last): the
    prompt in one decode, then one token a decode, as the engine runs a request alone."""
    llm.reset()
    llm.eval(ids)
    rows = []
    for token in [*tokens, None]:
        logits = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))
        shifted = logits.astype(np.float64) - logits.max()
        rows.append(shifted - np.log(np.exp(shifted).sum()))
        if token is not None:
            llm.eval([token])
    return rows


def test_logprobs_equal_llama_cpps_own_logits(tokenizer: Any, smollm2_model: Path) -> None:
    """Greedy, and sampled under a regex: each token's logprob and its 5 best from the raw
    logits, before the mask. Each request alone, its whole prompt computed (llama.cpp's sums
    differ in rounding with the decode's shape: a batch, a prompt partly from the cache)."""
    ids = prompt(tokenizer, "Name a colour.")
    llm = standalone(gguf_path(smollm2_model))
    engine = make_engine(gguf_path(smollm2_model), 1, prefix_caching=False)
    for options in (
        {"max_new": 12},
        {"temperature": 1.0, "seed": 5, "guide": Guide(GuideType.REGEX, "[A-Z][a-z]+ [0-9]")},
    ):
        collector = submit(engine, ids, top_logprobs=5, **options)
        finish([collector], tokenizer)
        assert len(collector.logprobs) == len(collector.tokens) > 0
        expected = reference_logprobs(llm, ids, collector.tokens)
        for token, entry, row in zip(collector.tokens, collector.logprobs, expected, strict=False):
            assert entry.logprob == pytest.approx(row[token], abs=1e-5)
            best = np.argsort(-row)[:5]
            assert list(entry.top_ids) == best.tolist()
            assert entry.top_logprobs == pytest.approx(row[best].tolist(), abs=1e-5)
    llm.close()
    close(engine)


def test_interactive_requests_are_admitted_before_batch_ones(
    smollm2_model: Path, tokenizer: Any
) -> None:
    """One slot, held by a long request: of a batch request and an interactive one that wait
    for it, the interactive one takes the slot first, though it came second."""
    engine = make_engine(gguf_path(smollm2_model), 1)
    order: list[str] = []
    holding = threading.Event()
    try:
        ids = prompt(tokenizer, "Tell a long story.")
        blocker = submit(
            engine, ids, max_new=48, end_ids=frozenset({-1}), admitted=lambda _: holding.set()
        )
        assert holding.wait(60)
        waiting = [
            submit(
                engine,
                ids,
                max_new=2,
                priority=priority,
                admitted=lambda _, n=name: order.append(n),
            )
            for name, priority in (("batch", 1), ("interactive", 0))
        ]
        assert not blocker.done.is_set(), "the slot was free before both waited"
        finish([blocker, *waiting], tokenizer)
    finally:
        close(engine)
    assert order == ["interactive", "batch"]


def test_a_schema_and_logprobs_through_the_gateway(oai_llamacpp: openai.OpenAI) -> None:
    """response_format with a strict schema and logprobs on a llamacpp model, as a client asks
    for them: the answer validates, and each of its tokens comes with its logprob and 3
    alternatives, the best of which is at least as likely as the token chosen."""
    schema: dict[str, Any] = SCHEMAS[1]
    reply = oai_llamacpp.chat.completions.create(
        model="smollm2",
        messages=[{"role": "user", "content": "Tell me about the weather."}],
        max_tokens=96,
        temperature=0,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "weather", "schema": schema, "strict": True},
        },
        logprobs=True,
        top_logprobs=3,
    )
    text = reply.choices[0].message.content or ""
    jsonschema.validate(json.loads(text), schema)
    logprobs = reply.choices[0].logprobs
    assert logprobs is not None and logprobs.content is not None
    assert reply.usage is not None and len(logprobs.content) == reply.usage.completion_tokens
    assert "".join(entry.token for entry in logprobs.content) == text
    for entry in logprobs.content:
        assert len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob >= entry.logprob - 1e-6


def test_a_strict_tool_call_follows_its_schema_through_the_files_tag_tokens(
    oai_llamacpp: openai.OpenAI,
) -> None:
    """tiny-moe's random weights write their planted call with empty arguments
    (tests/llamacpp/models.py); a strict tool whose schema requires a city gets one, through the
    grammar's <tool_call> tokens as llguidance reads them from the file's own vocabulary."""
    parameters = {
        "type": "object",
        "properties": {"city": {"enum": ["Paris", "Rome"]}},
        "required": ["city"],
        "additionalProperties": False,
    }
    reply = oai_llamacpp.chat.completions.create(
        model="tiny-moe",
        messages=[{"role": "user", "content": "What is the weather in Paris?"}],
        tools=[
            {
                "type": "function",
                "function": {"name": "get_weather", "strict": True, "parameters": parameters},
            }
        ],
        tool_choice="required",
        max_tokens=40,
        temperature=0,
    )
    calls = reply.choices[0].message.tool_calls
    assert calls is not None and len(calls) == 1
    assert calls[0].function.name == "get_weather"  # type: ignore[union-attr]
    jsonschema.validate(json.loads(calls[0].function.arguments), parameters)  # type: ignore[union-attr]


def test_bad_guide_tensors_are_refused_naming_them(llamacpp_fleet: LlamaCppFleet) -> None:
    """Raw Triton requests (the gateway checks a guide before it sends one)."""
    load = httpx.post(
        f"{llamacpp_fleet.neuron_url}/models/load", json={"model": "smollm2"}, timeout=120
    )
    assert load.status_code == 200, load.text
    ids = tensor("input_ids", np.array([[1, 2, 3]], dtype=np.int32), "INT32")
    length = tensor("request_output_len", np.array([[4]], dtype=np.int32), "INT32")

    def text(name: str, value: str) -> Any:
        return tensor(name, np.array([[value.encode()]], dtype=object), "BYTES")

    kind = text("guided_decoding_guide_type", "yaml")
    assert "guided_decoding_guide_type" in infer_error(llamacpp_fleet, [ids, length, kind])
    regex = text("guided_decoding_guide_type", "regex")
    broken = text("guided_decoding_guide", "[a-")
    assert "guided_decoding_guide" in infer_error(llamacpp_fleet, [ids, length, regex, broken])
    asking = tensor("return_log_probs", np.array([[True]]), "BOOL")
    too_many = tensor("num_top_logprobs", np.array([[21]], dtype=np.int32), "INT32")
    assert "num_top_logprobs" in infer_error(llamacpp_fleet, [ids, length, asking, too_many])
