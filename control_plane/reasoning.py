"""Reasoning written inline, split from the answer: Qwen3's `<think>…</think>` (DeepSeek-R1 and
QwQ write the same) at the start of a completion.

    <think>
    The user wants … I should …
    </think>

    The answer.

The reasoning becomes `ReasoningDelta`s and the answer `TextDelta`s, which go on to the stop
strings and the tool-call parser: a tag inside the reasoning is never a call (reference §5.5).
Only a completion that opens with the tag reasons; a `<think>` later in the answer is text the
model wrote. Thinking-only models (Qwen3 …-Thinking-2507) have the opening tag in their prompt's
generation prompt, so their completion starts inside the reasoning and shows only the closing
tag: `starts_inside` says so.

Which models reason is the catalogue's `reasoning` field; "auto" (the default) reads the chat
template: one that knows the tags belongs to a model that may write them. Whether a hybrid
model (Qwen3) reasons for a request is the request's (`ChatRequest.reasoning`, its template's
`enable_thinking`); its output is split the same way either way.
"""

from __future__ import annotations

import enum

from control_plane.canonical import Event, ReasoningDelta, TextDelta

OPEN, CLOSE = "<think>", "</think>"


def template_reasons(chat_template: str) -> bool:
    """Whether a chat template belongs to a model that writes `<think>` reasoning: it strips
    the block from history turns, or opens it in the generation prompt."""
    return CLOSE in chat_template or OPEN in chat_template


def prompt_opens_reasoning(prompt_tail: str) -> bool:
    """Whether a rendered prompt ends inside an open `<think>` (the model goes on reasoning)."""
    tail = prompt_tail.rstrip()
    return tail.endswith(OPEN)


class Phase(enum.Enum):
    START = "start"  # nothing but whitespace yet
    INSIDE = "inside"  # reasoning
    AFTER = "after"  # past the closing tag: the whitespace before the answer is dropped
    ANSWER = "answer"  # plain text from here on


class ThinkSplitter:
    """Text in (as it streams), reasoning and answer events out. Tags never reach the client,
    nor the whitespace models put around them."""

    def __init__(self, starts_inside: bool = False) -> None:
        self.state = Phase.INSIDE if starts_inside else Phase.START
        self.buffer = ""
        self.space = ""  # trailing whitespace of the reasoning, held: it may precede the tag
        self.emitted = False  # some reasoning was sent (its leading whitespace is gone)

    @property
    def reasoning(self) -> bool:
        """Text fed now may still be reasoning (its tokens count as reasoning tokens)."""
        return self.state in (Phase.START, Phase.INSIDE)

    def feed(self, text: str) -> list[Event]:
        if self.state is Phase.ANSWER:
            return [TextDelta(text)] if text else []
        if self.state is Phase.AFTER:
            return self._answer(text)
        self.buffer += text
        if self.state is Phase.START:
            stripped = self.buffer.lstrip()
            if not stripped or OPEN.startswith(stripped):
                return []  # undecided until the tag is whole or something else comes
            if not stripped.startswith(OPEN):
                self.state = Phase.ANSWER
                out, self.buffer = self.buffer, ""
                return [TextDelta(out)]
            self.state, self.buffer = Phase.INSIDE, stripped[len(OPEN) :]
        position = self.buffer.find(CLOSE)
        if position >= 0:
            events = self._reasoning(self.buffer[:position], final=True)
            rest, self.buffer = self.buffer[position + len(CLOSE) :], ""
            self.state = Phase.AFTER
            return events + self._answer(rest)
        hold = _partial_suffix(self.buffer, CLOSE)
        ready = self.buffer[: len(self.buffer) - hold]
        self.buffer = self.buffer[len(self.buffer) - hold :]
        return self._reasoning(ready, final=False)

    def finish(self) -> list[Event]:
        """What the end releases: an undecided start is answer text; an unclosed reasoning
        (the model ran out of tokens while thinking) stays reasoning."""
        rest, self.buffer = self.buffer, ""
        state, self.state = self.state, Phase.ANSWER
        if state is Phase.START:
            return [TextDelta(rest)] if rest else []
        if state is Phase.INSIDE:
            return self._reasoning(rest, final=True)
        return []

    def _answer(self, text: str) -> list[Event]:
        text = text.lstrip()
        if not text:
            return []
        self.state = Phase.ANSWER
        return [TextDelta(text)]

    def _reasoning(self, text: str, final: bool) -> list[Event]:
        text, self.space = self.space + text, ""
        if not self.emitted:
            text = text.lstrip()
        kept = text.rstrip()
        if not final:
            self.space = text[len(kept) :]
        if not kept:
            return []
        self.emitted = True
        return [ReasoningDelta(kept)]


def _partial_suffix(text: str, tag: str) -> int:
    for size in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:size]):
            return size
    return 0
