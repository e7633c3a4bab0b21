"""The prompt's ids are exactly what transformers' `apply_chat_template(tokenize=True)` gives for
the same conversation: `render` takes the template's text and encodes it itself (faster), and
must not drift from the reference — system messages, tools, prefill, and control tokens typed
as text included."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from control_plane.canonical import ChatRequest, Message, Tool
from control_plane.prompting import ModelTokenizer


def reference(
    tokenizer: ModelTokenizer,
    messages: list[dict[str, str]],
    tools: list[dict[str, object]] | None,
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
    return [int(i) for i in ids]  # type: ignore[arg-type]


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
