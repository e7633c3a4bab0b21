"""The prompt's ids are exactly what transformers' `apply_chat_template(tokenize=True)` gives for
the same conversation: `render` takes the template's text and encodes it itself (faster), and
must not drift from the reference — system messages, tools, prefill, and control tokens typed
as text included."""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from control_plane.canonical import ChatRequest, Message, Tool
from control_plane.prompting import ModelTokenizer


def reference(
    tokenizer: ModelTokenizer,
    messages: list[dict[str, str]],
    tools: list[Any] | None,
    prefill: bool,
) -> list[int]:
    """transformers' own tokenized rendering of the conversation, given as the chat template's
    documented input (not through cortex's translation of it)."""
    ids = tokenizer.tokenizer.apply_chat_template(
        messages,
        tools=tools,
        add_generation_prompt=not prefill,
        continue_final_message=prefill,
        tokenize=True,
        return_dict=False,
    )
    return [int(i) for i in ids]  # type: ignore[arg-type]  # transformers types ids loosely


# Plain text, accents, CJK, JSON-ish characters, and control tokens a user might type.
PIECES = [*'abc xyz.,!?é中\n{}"', "<|im_start|>", "<|im_end|>", "</s>"]
TEXT = st.lists(st.sampled_from(PIECES), max_size=40).map("".join)


@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(system=TEXT, user=TEXT, reply=TEXT, prefill=st.booleans(), with_tool=st.booleans())
def test_render_is_the_reference_encoding(
    tokenizer: ModelTokenizer, system: str, user: str, reply: str, prefill: bool, with_tool: bool
) -> None:
    messages = [Message("system", system), Message("user", user)]
    expected = [{"role": "system", "content": system}] if system else []  # no empty system turn
    expected.append({"role": "user", "content": user})
    if prefill:
        messages.append(Message("assistant", reply))
        expected.append({"role": "assistant", "content": reply})
    tools = (Tool("get_weather", "", {"type": "object"}),) if with_tool else ()
    expected_tools: list[dict[str, object]] | None = None
    if with_tool:
        function = {"name": "get_weather", "description": "", "parameters": {"type": "object"}}
        expected_tools = [{"type": "function", "function": function}]
    request = ChatRequest(
        model="cortex-tiny", messages=tuple(messages), tools=tools, continue_final=prefill
    )
    assert tokenizer.render(request) == reference(tokenizer, expected, expected_tools, prefill)


@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(turns=st.lists(st.tuples(TEXT, TEXT), min_size=1, max_size=5), edit=st.booleans())
def test_a_conversations_next_turn_tokenized_from_its_last_is_the_reference(
    tokenizer: ModelTokenizer, turns: list[tuple[str, str]], edit: bool
) -> None:
    """PromptMemo tokenizes only what follows the part a turn shares with the conversation's
    previous prompt, and must give exactly the ids of tokenizing it whole: turns that append,
    and (edit) a turn whose earlier text changed, with control tokens typed as text."""
    messages: list[Message] = [Message("system", "You help.")]
    conversation = f"c{len(turns)}{edit}{turns!r}"
    assert tokenizer.memo is not None
    before = tokenizer.memo.reused_tokens
    for user, reply in turns:
        messages += [Message("user", user)]
        request = ChatRequest(model="cortex-tiny", messages=tuple(messages))
        assert tokenizer.render(request, conversation=conversation) == tokenizer.render(request)
        messages += [Message("assistant", reply)]
    if edit:
        messages[1] = Message("user", messages[1].content + "é")
        request = ChatRequest(model="cortex-tiny", messages=tuple(messages))
        assert tokenizer.render(request, conversation=conversation) == tokenizer.render(request)
    if len(turns) > 1:
        assert tokenizer.memo.reused_tokens > before  # the memo was used, not bypassed


def test_claude_code_turns_tokenized_from_the_last_are_the_reference(
    tokenizer: ModelTokenizer,
) -> None:
    """Ten turns of the benchmark's Claude Code trace (tools, a mid-conversation system
    message, tool calls and results): each turn's ids through the memo equal the whole encode,
    and most of each later turn's ids come from the memo."""
    from benchmarks.claude_code_trace import Conversation
    from control_plane.anthropic.protocol import MessagesRequest
    from control_plane.anthropic.translate import chat_request
    from control_plane.routing import conversation_key

    conversation = Conversation(7, scale=0.25)
    assert tokenizer.memo is not None
    for turn in range(1, 6):
        body = MessagesRequest.model_validate(conversation.request(turn))
        request = chat_request(body, f"turn{turn}")
        before = tokenizer.memo.reused_tokens
        ids = tokenizer.render(request, conversation=conversation_key(request))
        assert ids == tokenizer.render(request)
        if turn > 1:
            assert tokenizer.memo.reused_tokens - before > len(ids) // 2
