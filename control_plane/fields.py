"""Every request field of the dialects, and what cortex does with it: what a client asks for,
it gets, or a 400 that names the field — never a field dropped in silence.

Each field is honoured, honoured as a no-op (with the reason it changes nothing here), or
refused unless its value is one that asks for nothing (`frequency_penalty: 0`). The lists are
the official SDKs' own request types (openai's `CompletionCreateParams`, `ResponseCreateParams`,
anthropic's `MessageCreateParams`); `tests/gateway/test_fields.py` walks those types, so a field
an SDK adds fails the test until it is decided here. Fields cortex takes beyond the SDKs' (`top_k`,
Claude Code's `context_management`) are listed too. The routes call `refuse_unhonoured` on the
raw body before anything else.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from control_plane.errors import InvalidRequest


class Decision(enum.Enum):
    HONOURED = "honoured"
    NO_OP = "no-op"  # accepted; the reason says why nothing changes
    REFUSED = "refused"  # a 400 naming it, unless its value is one of `harmless`


@dataclass(frozen=True)
class Rule:
    decision: Decision
    reason: str = ""
    harmless: tuple[Any, ...] = (None,)


class Dialect(enum.StrEnum):
    CHAT = "chat.completions"
    COMPLETIONS = "completions"
    RESPONSES = "responses"
    MESSAGES = "messages"


def honoured(note: str = "") -> Rule:
    return Rule(Decision.HONOURED, note)


def no_op(reason: str) -> Rule:
    return Rule(Decision.NO_OP, reason)


def refused(reason: str, *harmless: Any) -> Rule:
    return Rule(Decision.REFUSED, reason, (None, *harmless))


_NO_PENALTIES = "the engines have no repetition penalties"
_NOTHING_KEPT = "cortex keeps no requests or answers to tag, list or fetch"
_ABUSE_ID = "an end-user id for the provider's abuse tracking; none runs here"
_ONE_TIER = "one service tier: every request is served alike"
_CACHE_AUTOMATIC = "the prefix cache is automatic; routing follows the conversation's prefix"
_NO_BUDGET = "the models served here have no reasoning budget to set"
_EFFORT = (
    "\"none\" turns a hybrid model's reasoning off (Qwen3's enable_thinking), another effort "
    "on; " + _NO_BUDGET
)
_NO_MODERATION = "no moderation runs here, so none can be asked for"

_SHARED_OPENAI: dict[str, Rule] = {
    "model": honoured(),
    "stream": honoured(),
    "stream_options": honoured("include_usage"),
    "temperature": honoured(),
    "top_p": honoured(),
    "top_k": honoured("not OpenAI's; vLLM's and llama.cpp's"),
    "seed": honoured(),
    "stop": honoured(),
    "n": honoured("1 only: more is a 400 naming n"),
    "logprobs": honoured(),
    "frequency_penalty": refused(_NO_PENALTIES, 0, 0.0),
    "presence_penalty": refused(_NO_PENALTIES, 0, 0.0),
    "logit_bias": refused("the engines take no logit bias", {}),
    "user": no_op(_ABUSE_ID),
    "response_format": honoured("json_schema, json_object, grammar (regex, lark, ebnf)"),
}

FIELDS: Mapping[Dialect, Mapping[str, Rule]] = {
    Dialect.CHAT: {
        **_SHARED_OPENAI,
        "messages": honoured(),
        "max_tokens": honoured(),
        "max_completion_tokens": honoured(),
        "top_logprobs": honoured(),
        "tools": honoured("function tools; strict ones constrain the arguments"),
        "tool_choice": honoured(),
        "parallel_tool_calls": honoured(),
        "audio": refused("the models served here write text only"),
        "modalities": refused("the models served here write text only", ["text"]),
        "functions": refused("the legacy functions field: send tools"),
        "function_call": refused("the legacy functions field: send tool_choice"),
        "web_search_options": refused("no hosted web search runs here"),
        "moderation": refused(_NO_MODERATION),
        "verbosity": refused("the models served here take no verbosity setting", "medium"),
        "prediction": no_op("a predicted output only speeds decoding up; the answer is the same"),
        "metadata": no_op(_NOTHING_KEPT),
        "store": no_op(_NOTHING_KEPT),
        "prompt_cache_key": no_op(_CACHE_AUTOMATIC),
        "prompt_cache_options": no_op(_CACHE_AUTOMATIC),
        "prompt_cache_retention": no_op(_CACHE_AUTOMATIC),
        "reasoning_effort": honoured(_EFFORT),
        "safety_identifier": no_op(_ABUSE_ID),
        "service_tier": no_op(_ONE_TIER),
    },
    Dialect.COMPLETIONS: {
        **_SHARED_OPENAI,
        "prompt": honoured(),
        "max_tokens": honoured(),
        "best_of": refused("one candidate is generated per request", 1),
        "echo": refused("the prompt is not repeated in the answer", False),
        "suffix": refused("the engines do not fill in the middle", ""),
    },
    Dialect.RESPONSES: {
        "model": honoured(),
        "input": honoured(),
        "instructions": honoured(),
        "max_output_tokens": honoured(),
        "temperature": honoured(),
        "top_p": honoured(),
        "top_k": honoured("not OpenAI's; as on chat completions"),
        "seed": honoured("not OpenAI's; as on chat completions"),
        "stop": honoured("not OpenAI's; as on chat completions"),
        "stream": honoured(),
        "text": honoured("format: json_schema, json_object, grammar"),
        "tools": honoured("function and custom tools; strict function tools constrain"),
        "tool_choice": honoured(),
        "parallel_tool_calls": honoured(),
        "top_logprobs": honoured(),
        "include": honoured(
            "message.output_text.logprobs; the others (encrypted reasoning, sources) have "
            "nothing to add here"
        ),
        "store": no_op(_NOTHING_KEPT + "; answered with store: false"),
        "metadata": no_op("echoed in the response; " + _NOTHING_KEPT),
        "reasoning": honoured("effort: " + _EFFORT + "; summary: the reasoning itself is sent"),
        "prompt_cache_key": no_op(_CACHE_AUTOMATIC),
        "prompt_cache_options": no_op(_CACHE_AUTOMATIC),
        "prompt_cache_retention": no_op(_CACHE_AUTOMATIC),
        "safety_identifier": no_op(_ABUSE_ID),
        "service_tier": no_op(_ONE_TIER),
        "user": no_op(_ABUSE_ID),
        "stream_options": no_op("its one option pads events against side channels; none here"),
        "context_management": no_op("the whole input is sent; nothing is compacted server-side"),
        "truncation": refused("a prompt too long is a 400, never cut", "disabled"),
        "previous_response_id": refused(_NOTHING_KEPT),
        "conversation": refused(_NOTHING_KEPT),
        "prompt": refused("no stored prompts here"),
        "background": refused("answers are not kept to poll later", False),
        "background_options": refused("answers are not kept to poll later"),
        "max_tool_calls": refused("the number of tool calls is not capped here"),
        "moderation": refused(_NO_MODERATION),
        "image": refused("the models served here read and write text only"),
        "access_programs": refused("no provider programs here"),
    },
    Dialect.MESSAGES: {
        "model": honoured(),
        "messages": honoured(),
        "system": honoured(),
        "max_tokens": honoured(),
        "stop_sequences": honoured(),
        "stream": honoured(),
        "temperature": honoured("gone from the SDK's types, still sent under 2023-06-01"),
        "top_p": honoured("as temperature"),
        "top_k": honoured("as temperature"),
        "tools": honoured("client tools; strict ones constrain the input; server tools left out"),
        "tool_choice": honoured(),
        "output_config": honoured("format; effort is a no-op: " + _NO_BUDGET),
        "output_format": honoured("the structured-outputs beta's spelling of output_config"),
        "thinking": honoured(
            "enabled or adaptive: a hybrid model reasons (else it is told not to), its reasoning "
            "sent as thinking blocks; the budget is a no-op: " + _NO_BUDGET
        ),
        "metadata": no_op(_NOTHING_KEPT),
        "cache_control": no_op(_CACHE_AUTOMATIC),
        "context_management": no_op("Claude Code's; the whole conversation is sent each turn"),
        "service_tier": no_op(_ONE_TIER),
        "inference_geo": no_op("one place serves every request"),
        "speed": no_op("one speed: every request is served alike"),
        "workspace_id": no_op("one workspace"),
        "user_profile_id": no_op(_ABUSE_ID),
        "diagnostics": no_op("diagnostics are in cortex's own logs and metrics"),
        "container": refused("no code-execution container runs here"),
    },
}


def refuse_unhonoured(dialect: Dialect, body: Any) -> None:
    """InvalidRequest naming the first field of `body` that this dialect's table refuses (with
    a value that asks for something)."""
    if not isinstance(body, dict):
        return
    rules = FIELDS[dialect]
    for name, value in body.items():
        rule = rules.get(name)
        if rule is None or rule.decision is not Decision.REFUSED:
            continue
        if any(value == harmless and type(value) is type(harmless) for harmless in rule.harmless):
            continue
        if (
            isinstance(value, int | float)
            and not isinstance(value, bool)
            and value in rule.harmless
        ):
            continue
        raise InvalidRequest(f"{name} is not supported here: {rule.reason}", name)
