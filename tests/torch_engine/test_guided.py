"""Guided decoding in the torch engine, on cortex-tiny: a random-weight model that never writes
JSON by itself, so every valid answer below is the grammar's doing. Schemas are validated with
the `jsonschema` package, regexes with `re`, not with the engine's own code."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from cortex.guides import GuideType, problem
from neuron_agent.torch_engine.errors import RequestRejected
from neuron_agent.torch_engine.guided import Guide, GuidedBatch, token_mask, unpack_on_device
from neuron_agent.torch_engine.loader import EngineOptions, build_engine
from neuron_agent.torch_engine.sampling import SamplingParams
from neuron_agent.torch_engine.scheduler import Engine, GenerationRequest
from tests.torch_engine.test_engine import Collector

SCHEMAS: list[dict[str, Any]] = [
    {
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 12},
            "days": {"type": "integer", "minimum": 1, "maximum": 9},
        },
        "required": ["city", "days"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {
            "unit": {"enum": ["celsius", "fahrenheit"]},
            "tags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3},
            "nested": {
                "type": "object",
                "properties": {"ok": {"type": "boolean"}},
                "required": ["ok"],
                "additionalProperties": False,
            },
        },
        "required": ["unit", "tags", "nested"],
        "additionalProperties": False,
    },
    {
        "anyOf": [
            {"type": "integer", "minimum": 0, "maximum": 99},
            {"type": "string", "pattern": "^[a-c]{2,4}$"},
        ]
    },
]


@pytest.fixture(scope="module")
def tokenizer(tiny_model: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(tiny_model)


@pytest.fixture(scope="module")
def engine(tiny_model: Path) -> Iterator[Engine]:
    built = build_engine(
        EngineOptions(tiny_model, kv_cache_tokens=8192, max_batch_size=8, tokenizer_dir=tiny_model)
    )
    built.start()
    yield built
    built.stop()


def prompt(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return list(
        tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, return_dict=False
        )
    )


def submit(
    engine: Engine,
    ids: list[int],
    guide: Guide | None,
    max_new: int = 96,
    sampling: SamplingParams | None = None,
) -> Collector:
    collector = Collector()
    engine.submit(
        GenerationRequest(
            prompt=ids,
            max_new_tokens=max_new,
            emit=collector.emit,
            fail=collector.fail,
            sampling=sampling or SamplingParams(),
            guide=guide,
        )
    )
    return collector


def finish(
    collectors: Sequence[Collector], tokenizer: PreTrainedTokenizerBase, timeout: float = 120
) -> list[str]:
    """Each answer's text, once every one has ended without an error."""
    texts: list[str] = []
    for collector in collectors:
        assert collector.done.wait(timeout)
        assert collector.error is None, collector.error
        text = tokenizer.decode(collector.tokens, skip_special_tokens=True)
        assert isinstance(text, str)  # one sequence's ids decode to one text
        texts.append(text)
    return texts


def test_every_constrained_answer_validates_against_its_schema(
    engine: Engine, tokenizer: PreTrainedTokenizerBase
) -> None:
    ids = prompt(tokenizer, "Answer in JSON")
    collectors = [
        submit(
            engine,
            ids,
            Guide(GuideType.JSON_SCHEMA, json.dumps(schema)),
            sampling=SamplingParams(temperature=temperature, seed=seed),
        )
        for schema in SCHEMAS
        for temperature, seed in ((0.0, None), (1.0, 7), (1.0, 8))
    ]
    texts = finish(collectors, tokenizer)
    for index, text in enumerate(texts):
        schema = SCHEMAS[index // 3]
        jsonschema.validate(json.loads(text), schema)


def test_json_object_regex_and_ebnf_guides(
    engine: Engine, tokenizer: PreTrainedTokenizerBase
) -> None:
    ids = prompt(tokenizer, "hello")
    sampled = SamplingParams(temperature=1.0, seed=3)
    json_any = submit(engine, ids, Guide(GuideType.JSON, ""), max_new=200, sampling=sampled)
    regex = submit(engine, ids, Guide(GuideType.REGEX, r"[0-9]{3}-[a-z]{2}"), sampling=sampled)
    ebnf = submit(
        engine,
        ids,
        Guide(GuideType.EBNF_GRAMMAR, 'root ::= answer ("," answer)?\nanswer ::= "yes" | "no"'),
        sampling=sampled,
    )
    lark = submit(engine, ids, Guide(GuideType.LARK_GRAMMAR, 'start: "a"+ "b"'), max_new=8)
    json_text, regex_text, ebnf_text, lark_text = finish([json_any, regex, ebnf, lark], tokenizer)
    assert isinstance(json.loads(json_text), dict)
    assert re.fullmatch(r"[0-9]{3}-[a-z]{2}", regex_text), regex_text
    assert re.fullmatch(r"(yes|no)(,(yes|no))?", ebnf_text), ebnf_text
    assert re.fullmatch(r"a+b|a+", lark_text), lark_text  # a+ alone: max_new_tokens ran out


def test_a_mixed_batch_leaves_the_free_rows_unchanged(
    engine: Engine, tokenizer: PreTrainedTokenizerBase
) -> None:
    free_ids = prompt(tokenizer, "Explain the with statement")
    alone = finish([submit(engine, free_ids, None, max_new=24)], tokenizer)[0]
    schema = Guide(GuideType.JSON_SCHEMA, json.dumps(SCHEMAS[0]))
    together = [
        submit(engine, prompt(tokenizer, "JSON please"), schema),
        submit(engine, free_ids, None, max_new=24),
        submit(engine, prompt(tokenizer, "more JSON"), schema),
        submit(engine, free_ids, None, max_new=24),
    ]
    texts = finish(together, tokenizer)
    assert texts[1] == alone and texts[3] == alone
    for text in (texts[0], texts[2]):
        jsonschema.validate(json.loads(text), SCHEMAS[0])
    assert not alone.lstrip().startswith("{")  # the free rows were not constrained


def test_a_guide_is_compiled_once(engine: Engine, tokenizer: PreTrainedTokenizerBase) -> None:
    assert engine.guides is not None
    guide = Guide(GuideType.REGEX, "(red|green|blue)")
    before = engine.guides.compilations
    finish([submit(engine, prompt(tokenizer, "a colour"), guide) for _ in range(3)], tokenizer)
    assert engine.guides.compilations == before + 1


def test_a_bad_guide_is_refused_naming_the_tensor(
    engine: Engine, tokenizer: PreTrainedTokenizerBase
) -> None:
    with pytest.raises(RequestRejected, match="guided_decoding_guide"):
        submit(engine, prompt(tokenizer, "x"), Guide(GuideType.REGEX, "[a-"))
    with pytest.raises(RequestRejected, match="guided_decoding_guide"):
        submit(engine, prompt(tokenizer, "x"), Guide(GuideType.JSON_SCHEMA, '{"type": 5}'))
    assert problem(GuideType.REGEX, "[a-") is not None
    assert problem(GuideType.JSON_SCHEMA, json.dumps(SCHEMAS[1])) is None


def test_the_cpu_and_device_unpackings_agree() -> None:
    bitmask = torch.randint(-(2**31), 2**31 - 1, (3, 5), dtype=torch.int32)
    shifted = ((bitmask.unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1).bool()
    expected = shifted.reshape(3, -1)
    for vocab in (150, 160, 170):
        assert torch.equal(token_mask(bitmask, vocab), unpack_on_device(bitmask, vocab))
        assert torch.equal(token_mask(bitmask, vocab)[:, :150], expected[:, :150])
    assert not token_mask(bitmask, 170)[:, 160:].any()


def test_a_row_whose_mask_allows_nothing_may_still_end() -> None:
    masks = GuidedBatch(2, 100, frozenset({2, 7}))
    masks._bitmask[0] = 0  # a matcher in error
    masks._bitmask[1] = -1
    done: Future[None] = Future()
    done.set_result(None)
    out = masks.apply(done, [0, 1], torch.zeros(2, 100))
    assert (out[0] > float("-inf")).nonzero().flatten().tolist() == [2, 7]
    assert bool((out[1] > float("-inf")).all())
    masks.close()
