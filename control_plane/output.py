"""A generation's output, as a pure pipeline: token ids in, canonical events out.

    token ids → incremental detokenization → reasoning split (`<think>`) → stop strings →
    tool-call parsing → events
    … the end → what the decoder and the stop matcher still hold → `Finished` with its reason

A harmony model's (gpt-oss) ids go to its parser undecoded (its channels are special tokens),
and the stop strings apply to the answer it finds. Reasoning is never cut by a stop string nor
read for calls; its tokens are counted (`Usage.reasoning_tokens`).

No I/O and no clock: `generate` feeds it what the engine streams, and tests feed it ids by hand.
"""

from __future__ import annotations

from typing import Protocol

from control_plane.canonical import Event, Finished, FinishReason, TextDelta, Usage
from control_plane.harmony import HarmonyParser
from control_plane.prompting import StopMatcher
from control_plane.reasoning import ThinkSplitter
from control_plane.tool_calls import ToolParser


class Decoder(Protocol):
    """Token ids in, complete text out (`prompting.IncrementalDecoder`)."""

    def step(self, token_id: int) -> str: ...

    def finish(self) -> str: ...


def finish_reason(
    calls: int, stop_sequence: str | None, completion_tokens: int, max_tokens: int
) -> FinishReason:
    """Why a generation that ran to its end ended. Calls decide the reason even when a stop
    string came after them: the client must answer the calls."""
    if calls:
        return FinishReason.TOOL_CALLS
    if stop_sequence is not None:
        return FinishReason.STOP_SEQUENCE
    if completion_tokens >= max_tokens:
        return FinishReason.LENGTH
    return FinishReason.STOP


class Output:
    """One generation's output. `feed` each batch of new token ids; stop feeding once `done`
    (a stop string matched, or no more calls are wanted) and call `finish` for the last events."""

    def __init__(
        self,
        decoder: Decoder,
        stopper: StopMatcher,
        parser: ToolParser,
        prompt_tokens: int,
        max_tokens: int,
        splitter: ThinkSplitter | None = None,
    ) -> None:
        self.decoder = decoder
        self.stopper = stopper
        self.parser = parser
        self.splitter = splitter  # a model that writes `<think>` reasoning: splits it off
        self.reasoning_tokens = 0
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens
        self.completion_tokens = 0
        # Of the prompt, tokens the engine read from its prefix cache (once it has said).
        self.cached_prompt_tokens = 0

    @property
    def done(self) -> bool:
        return self.stopper.matched is not None or self.parser.done

    def feed(self, tokens: list[int]) -> list[Event]:
        self.completion_tokens += len(tokens)
        if isinstance(self.parser, HarmonyParser):
            events = self.parser.feed(tokens)
            self.reasoning_tokens = self.parser.reasoning_tokens
            return self._stopped(events)
        step = self.decoder.step
        if self.splitter is None:
            text = "".join([step(token) for token in tokens])
            return self.parser.feed(self.stopper.feed(text))
        if not self.splitter.reasoning:
            return self._answer(self.splitter.feed("".join([step(token) for token in tokens])))
        split: list[Event] = []
        for token in tokens:  # a token at a time while reasoning, to count its tokens
            if self.splitter.reasoning:
                self.reasoning_tokens += 1
            split.extend(self.splitter.feed(step(token)))
        return self._answer(split)

    def finish(self) -> list[Event]:
        """The events the end releases: text held back (a partial character, a possible stop
        string, an unterminated call), then `Finished`."""
        events: list[Event] = []
        if isinstance(self.parser, HarmonyParser):
            events.extend(self._stopped(self.parser.finish()))
            if self.stopper.matched is None and (held := self.stopper.flush()):
                events.append(TextDelta(held))
        elif not self.done:
            tail = self.decoder.finish()
            if self.splitter is None:
                events.extend(self.parser.feed(self.stopper.feed(tail)))
            else:
                events.extend(self._answer(self.splitter.feed(tail) + self.splitter.finish()))
            events.extend(self.parser.feed(self.stopper.flush()))
        if not isinstance(self.parser, HarmonyParser):
            events.extend(self.parser.finish())
        matched = self.stopper.matched
        reason = finish_reason(self.parser.calls, matched, self.completion_tokens, self.max_tokens)
        stop_sequence = matched if reason is FinishReason.STOP_SEQUENCE else None
        usage = Usage(
            self.prompt_tokens,
            self.completion_tokens,
            self.cached_prompt_tokens,
            self.reasoning_tokens,
        )
        events.append(Finished(reason, usage, stop_sequence))
        return events

    def _answer(self, split: list[Event]) -> list[Event]:
        """The splitter's events on: its answer text through the stop strings and the tool
        parser, its reasoning as it is (until a stop string ends the answer)."""
        parser = self.parser
        assert not isinstance(parser, HarmonyParser)  # harmony splits its own reasoning
        events: list[Event] = []
        for event in split:
            if isinstance(event, TextDelta):
                events.extend(parser.feed(self.stopper.feed(event.text)))
            elif self.stopper.matched is None:
                events.append(event)
        return events

    def _stopped(self, events: list[Event]) -> list[Event]:
        """harmony's events with the stop strings applied to its answer text."""
        kept: list[Event] = []
        for event in events:
            if isinstance(event, TextDelta):
                if self.stopper.matched is not None:
                    continue
                text = self.stopper.feed(event.text)
                if text:
                    kept.append(TextDelta(text))
            elif self.stopper.matched is None:
                kept.append(event)
        return kept
