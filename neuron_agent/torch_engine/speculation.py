"""Model-free speculative decoding: guess a sequence's next tokens from text it has already
seen, and keep the guesses the model would have produced itself.

Coding agents mostly re-emit text that is in their context (edit tools, whole-file rewrites,
repeated tool-call JSON). Their next tokens can often be found by matching the last few tokens
of the sequence against earlier text and reading on:

- `PromptLookup`: the sequence's own prompt and output (n-gram prompt lookup), indexed
  incrementally as the sequence grows: the latest earlier occurrence of its last n tokens, for
  the longest n in [min_ngram, max_ngram] that matches.
- `OutputHistory`: recent requests' outputs for one model (a conversation's earlier answers,
  the same tool call made again), under a token budget: the oldest outputs leave first. A flat
  n-gram index, not SuffixDecoding's frequency-weighted suffix tree: the same kind of match, one
  candidate path.
- `LengthControl`: how many tokens to propose, per sequence, from its recent acceptance (all
  accepted: two more next time; some rejected: one fewer; none accepted at one: pause, for
  twice as many steps each time it happens again).

The engine verifies every candidate in one forward pass (k + 1 rows per sequence) and keeps the
prefix the model agrees with, plus one token of its own (`verify_greedy`, `verify_sampled`), so
outputs are those of decoding one token at a time: the same tokens when greedy, the same
distribution when sampled (rejection sampling against a deterministic draft).

Everything here is plain Python and tensors, with no engine state: tests drive it on token lists.
"""

from __future__ import annotations

import enum
from collections import OrderedDict
from dataclasses import dataclass, field

import torch


class SpeculationMethod(enum.StrEnum):
    OFF = "off"
    NGRAM = "ngram"  # prompt lookup over the sequence, and the model's recent outputs


@dataclass(frozen=True)
class SpeculationSettings:
    method: SpeculationMethod = SpeculationMethod.OFF
    max_tokens: int = 4  # candidates per sequence per step, at most (k)
    # Above this many decoding sequences the step decodes one token each: a verify pass then
    # costs more than it saves. A guess until measured (BENCHMARKS.md).
    max_batch: int = 4
    min_ngram: int = 2
    max_ngram: int = 4
    history_tokens: int = 1 << 16  # OutputHistory's budget, per model (0: no history)

    def __post_init__(self) -> None:
        if self.max_tokens < 1 or self.max_batch < 1:
            raise ValueError("speculative_tokens and speculative_max_batch must be at least 1")
        if not 1 <= self.min_ngram <= self.max_ngram:
            raise ValueError("need 1 ≤ min_ngram ≤ max_ngram")

    @property
    def enabled(self) -> bool:
        return self.method is not SpeculationMethod.OFF


@dataclass(frozen=True)
class Match:
    """A proposal: `tokens` that followed an earlier occurrence of the last `length` tokens."""

    length: int = 0
    tokens: tuple[int, ...] = ()


NO_MATCH = Match()


def _ngrams_before(
    tokens: list[int], position: int, min_ngram: int, max_ngram: int
) -> list[tuple[int, ...]]:
    """The n-grams that end just before `position` (whose continuation starts there)."""
    return [
        tuple(tokens[position - n : position])
        for n in range(min_ngram, min(max_ngram, position) + 1)
    ]


class PromptLookup:
    """N-gram lookup over one growing token list (the sequence's prompt, then its output).

    `tokens` is the sequence's own list, read, never written: each `propose` first indexes the
    tokens added since the last call, so a token costs (max_ngram - min_ngram + 1) dictionary
    writes once."""

    def __init__(self, tokens: list[int], min_ngram: int = 2, max_ngram: int = 4) -> None:
        self.tokens = tokens
        self.min_ngram = min_ngram
        self.max_ngram = max_ngram
        # n-gram → where the tokens after its latest (complete) occurrence start
        self._after: dict[tuple[int, ...], int] = {}
        self._indexed = 0  # positions whose preceding n-grams are in `_after`

    def _index(self) -> None:
        # A position's n-grams go in once the token at that position exists: the n-gram at the
        # very end of the list has nothing after it yet, so it never matches itself.
        for position in range(max(self._indexed, 1), len(self.tokens)):
            for ngram in _ngrams_before(self.tokens, position, self.min_ngram, self.max_ngram):
                self._after[ngram] = position
        self._indexed = max(self._indexed, len(self.tokens))

    def propose(self, count: int) -> Match:
        """Up to `count` tokens that followed the latest earlier occurrence of the longest
        n-gram the list ends with."""
        self._index()
        tokens = self.tokens
        for n in range(min(self.max_ngram, len(tokens)), self.min_ngram - 1, -1):
            start = self._after.get(tuple(tokens[-n:]))
            if start is not None:
                return Match(n, tuple(tokens[start : start + count]))
        return NO_MATCH


class OutputHistory:
    """Recent outputs of one model, n-gram indexed, within `capacity_tokens` (oldest out first).

    An output is indexed whole when its request ends; an n-gram points at its latest
    occurrence, and forgetting an output removes only the n-grams that still point into it."""

    def __init__(self, min_ngram: int = 2, max_ngram: int = 4, capacity_tokens: int = 1 << 16):
        self.min_ngram = min_ngram
        self.max_ngram = max_ngram
        self.capacity_tokens = capacity_tokens
        self._outputs: OrderedDict[int, list[int]] = OrderedDict()
        self._after: dict[tuple[int, ...], tuple[int, int]] = {}  # n-gram → (output, position)
        self._next_id = 0
        self.tokens = 0  # held now

    def __len__(self) -> int:
        return len(self._outputs)

    def add(self, output: list[int]) -> None:
        if len(output) <= self.min_ngram or len(output) > self.capacity_tokens:
            return
        ident, self._next_id = self._next_id, self._next_id + 1
        stored = list(output)
        self._outputs[ident] = stored
        self.tokens += len(stored)
        for position in range(1, len(stored)):
            for ngram in _ngrams_before(stored, position, self.min_ngram, self.max_ngram):
                self._after[ngram] = (ident, position)
        while self.tokens > self.capacity_tokens:
            self._forget_oldest()

    def _forget_oldest(self) -> None:
        ident, stored = self._outputs.popitem(last=False)
        self.tokens -= len(stored)
        for position in range(1, len(stored)):
            for ngram in _ngrams_before(stored, position, self.min_ngram, self.max_ngram):
                if self._after.get(ngram, (None, 0))[0] == ident:
                    del self._after[ngram]

    def propose(self, context: list[int], count: int) -> Match:
        """Up to `count` tokens that followed the longest n-gram `context` ends with, in the
        latest output that has it."""
        for n in range(min(self.max_ngram, len(context)), self.min_ngram - 1, -1):
            found = self._after.get(tuple(context[-n:]))
            if found is not None:
                ident, start = found
                return Match(n, tuple(self._outputs[ident][start : start + count]))
        return NO_MATCH


def propose(lookup: PromptLookup, history: OutputHistory | None, count: int) -> Match:
    """The longer match of the sequence's own text and the model's recent outputs (the
    sequence's own on a tie: it is the same conversation)."""
    own = lookup.propose(count)
    if history is None or own.length == lookup.max_ngram:
        return own
    shared = history.propose(lookup.tokens, count)
    return shared if shared.length > own.length else own


@dataclass
class LengthControl:
    """How many candidates one sequence proposes next, from how its last ones fared."""

    max_tokens: int
    length: int = 0  # 0: start at max_tokens
    pause: int = 0  # steps left without proposing
    _misses: int = field(default=0, repr=False)

    def __post_init__(self) -> None:
        self.length = self.length or self.max_tokens

    def wanted(self) -> int:
        """Candidates to ask the proposer for this step (0 while paused); each call is a step."""
        if self.pause > 0:
            self.pause -= 1
            return 0
        return self.length

    def record(self, proposed: int, accepted: int) -> None:
        if proposed == 0:
            return
        if accepted == proposed:
            self.length = min(self.max_tokens, self.length + 2)
        else:
            self.length = max(1, self.length - 1)
        if accepted == 0 and proposed == 1:
            # Guessing costs a verify row each step: stop guessing for a while where it fails.
            self._misses += 1
            self.pause = min(2**self._misses, 64)
        elif accepted > 0:
            self._misses = 0


def verify_greedy(best: list[int], candidates: list[int]) -> list[int]:
    """Tokens to emit: the candidates while each equals the model's own choice (`best[j]`, the
    argmax of the row fed candidate j, row 0 fed the sequence's last token), then the model's
    choice where they part (or after the last candidate)."""
    emitted: list[int] = []
    for choice, candidate in zip(best, candidates, strict=False):
        if choice != candidate:
            break
        emitted.append(candidate)
    emitted.append(best[len(emitted)])
    return emitted


def verify_sampled(
    probabilities: torch.Tensor, candidates: list[int], generator: torch.Generator | None
) -> list[int]:
    """Tokens to emit, distributed exactly as sampling one token at a time from
    `probabilities` [len(candidates) + 1, vocab] (each row the model's distribution after the
    row's input, temperature and top-k/top-p applied).

    The draft is deterministic (q = 1 on the candidate), so the standard rule (accept with
    probability min(1, p/q); on rejection draw from max(0, p - q), normalised) becomes: accept
    candidate j with probability p_j(candidate); at the first rejection draw from p_j with the
    candidate removed; when all are accepted draw one more from the last row."""
    count = len(candidates)
    device = probabilities.device
    accepted = 0
    if count:
        chosen = torch.tensor(candidates, dtype=torch.long, device=device)
        rows = torch.arange(count, device=device)
        odds = probabilities[rows, chosen]
        uniforms = torch.rand(count, generator=generator, device=device, dtype=odds.dtype)
        for kept in (uniforms < odds).tolist():
            if not kept:
                break
            accepted += 1
    last = probabilities[accepted]
    if accepted < count:
        last = last.clone()
        last[candidates[accepted]] = 0.0
    token = int(torch.multinomial(last, 1, generator=generator).item())
    return [*candidates[:accepted], token]


@dataclass
class SequenceGuesser:
    """One sequence's proposer state: its n-gram index and its proposal length."""

    lookup: PromptLookup
    control: LengthControl

    @classmethod
    def over(cls, tokens: list[int], settings: SpeculationSettings) -> SequenceGuesser:
        return cls(
            PromptLookup(tokens, settings.min_ngram, settings.max_ngram),
            LengthControl(settings.max_tokens),
        )

    def candidates(self, history: OutputHistory | None, limit: int) -> list[int]:
        """This step's candidates, at most `limit` (none while paused or without a match)."""
        wanted = min(self.control.wanted(), limit)
        if wanted <= 0:
            return []
        return list(propose(self.lookup, history, wanted).tokens)


@dataclass
class SpeculationCounters:
    """Since the engine started: verify passes, and over the sequences that proposed in them,
    sequence-steps, candidates proposed, candidates accepted and tokens emitted (accepted + the
    model's own token each)."""

    verify_steps: int = 0
    sequence_steps: int = 0
    proposed: int = 0
    accepted: int = 0
    emitted: int = 0

    def record(self, proposed: int, accepted: int) -> None:
        self.sequence_steps += 1
        self.proposed += proposed
        self.accepted += accepted
        self.emitted += accepted + 1

    def as_stats(self) -> dict[str, int]:
        return {
            "speculative_verify_steps": self.verify_steps,
            "speculative_sequence_steps": self.sequence_steps,
            "speculative_proposed_tokens": self.proposed,
            "speculative_accepted_tokens": self.accepted,
            "speculative_emitted_tokens": self.emitted,
        }
