"""Successive requests of one Claude Code session render prompts that only grow at their end:
every token of a turn's prompt is the start of the next turn's, so a prefix cache reuses all of
it. The requests are shaped like the real ones (benchmarks/claude_code_trace.py): the billing
header's per-request checksum, `cache_control` moving to the newest message, the
mid-conversation system message switching between a block list and a string."""

from __future__ import annotations

from benchmarks.claude_code_trace import Conversation
from control_plane.anthropic.protocol import MessagesRequest
from control_plane.anthropic.translate import chat_request
from control_plane.prompting import ModelTokenizer


def prompt(tokenizer: ModelTokenizer, body: dict[str, object]) -> list[int]:
    return tokenizer.render(chat_request(MessagesRequest.model_validate(body), "req"))


def test_each_turn_starts_with_every_token_of_the_previous_turn(tokenizer: ModelTokenizer) -> None:
    conversation = Conversation(session=1)
    previous = prompt(tokenizer, conversation.request(1))
    assert 15_000 < len(previous) < 19_000  # about what Claude Code's first request renders to
    for turn in range(2, 5):
        current = prompt(tokenizer, conversation.request(turn))
        assert len(current) > len(previous)
        shared = next(
            (i for i, (a, b) in enumerate(zip(previous, current, strict=False)) if a != b),
            len(previous),
        )
        assert shared == len(previous), f"turn {turn} diverges at token {shared}"
        previous = current


def test_sessions_share_the_system_prompt_and_tools(tokenizer: ModelTokenizer) -> None:
    """Two sessions differ from their first user turn on, not before: Claude Code's system
    prompt and tools (what every session shares) lead the prompt."""
    one = prompt(tokenizer, Conversation(session=1).request(1))
    two = prompt(tokenizer, Conversation(session=2).request(1))
    shared = next(i for i, (a, b) in enumerate(zip(one, two, strict=False)) if a != b)
    assert shared > 0.6 * len(one)
