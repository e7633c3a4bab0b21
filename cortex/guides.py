"""Guides for constrained decoding, as both sides name them: the gateway turns a client's
`response_format` / `output_format` / strict tools into a guide, the torch engine compiles it
into token masks (`neuron_agent/torch_engine/guided.py`). The types are TensorRT-LLM's
`guided_decoding_guide_type` values, so the same request drives TensorRT-LLM too.

The grammars are llguidance's (JSON schema, regex, Lark; GBNF is converted to Lark), chosen over
xgrammar because it is one dependency-free wheel (xgrammar pulls in transformers, triton and
apache-tvm-ffi, none of which Triton's stub or the gateway should import for this), it compiles
a grammar lazily in milliseconds, and computes masks in its own threads without the GIL.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING

import llguidance
from llguidance.gbnf_to_lark import gbnf_to_lark

if TYPE_CHECKING:
    from llguidance._lib import JsonCompileOptions


class GuideType(enum.StrEnum):
    """TensorRT-LLM's guide types (`guided_decoding_guide_type`), and llguidance's Lark."""

    JSON = "json"  # any JSON object (OpenAI's json_object)
    JSON_SCHEMA = "json_schema"
    REGEX = "regex"
    EBNF_GRAMMAR = "ebnf_grammar"  # GBNF, as llama.cpp and xgrammar write it
    LARK_GRAMMAR = "lark_grammar"  # llguidance's grammar language (TensorRT-LLM's too)


# Compact JSON: no whitespace of the model's choosing (a small model can loop on newlines).
JSON_OPTIONS: JsonCompileOptions = {
    "whitespace_flexible": False,
    "item_separator": ", ",
    "key_separator": ": ",
}


def grammar_for(guide_type: GuideType, guide: str) -> str:
    """The llguidance grammar for a guide; raises ValueError naming what is wrong."""
    if guide_type is GuideType.JSON:
        return llguidance.LLMatcher.grammar_from_json_schema({"type": "object"}, JSON_OPTIONS)
    if guide_type is GuideType.JSON_SCHEMA:
        return llguidance.LLMatcher.grammar_from_json_schema(guide, JSON_OPTIONS)
    if guide_type is GuideType.REGEX:
        return llguidance.LLMatcher.grammar_from_regex(guide)
    if guide_type is GuideType.EBNF_GRAMMAR:
        return llguidance.LLMatcher.grammar_from_lark(gbnf_to_lark(guide))
    return llguidance.LLMatcher.grammar_from_lark(guide)


def problem(guide_type: GuideType, guide: str) -> str | None:
    """Why a guide cannot be compiled, or None (no tokenizer needed: the gateway checks here
    before it sends one, so a bad schema is the client's 400, not the engine's failure)."""
    try:
        grammar = grammar_for(guide_type, guide)
    except (ValueError, RuntimeError, TypeError) as error:
        return str(error)
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
    return messages[0] if is_error else None
