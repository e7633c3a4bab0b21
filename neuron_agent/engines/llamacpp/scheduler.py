"""Continuous batching over llama.cpp: several sequences in one `llama_decode`, one sequence id
(a slot) each, requests joining and leaving between steps.

One engine thread loops over `step()`:
  1. requests cancelled by their client leave (their slot keeps what was computed);
  2. waiting requests take a free slot in priority order (interactive before batch; arrival
     order within a class): the slot whose cache shares the longest prefix with the prompt (its
     tail beyond the prefix is dropped), or — where another slot, busy or idle, shares a longer
     one — a free slot that the longer prefix is copied into (cells shared, not recomputed); at
     least the last prompt token is always computed, so there are logits to choose from. The
     reused length goes back at once (`admitted`);
  3. one decode takes every decoding sequence's newest token and prompt chunks of the
     prefilling ones, at most `prefill_tokens` prompt tokens a step (a long prompt does not stall
     the streams for long); meanwhile llguidance's threads compute the token masks of the guided
     sequences about to choose (`neuron_agent/engines/guided.py`, the torch engine's guides);
  4. each sequence with logits chooses its next token: its logprobs from the raw logits when
     asked, then its mask written into llama.cpp's logits (-inf where the grammar refuses), so
     the argmax or llama.cpp's sampler chain chooses among the allowed tokens only; `_accept`
     then applies end ids, the grammar's end, stop sequences and the token budget.
When the KV cache would overflow, idle slots' caches go first (least recently used); when that is
not enough the youngest running request is failed with the reason. Requests beyond the queue
limit are refused with the torch engine's sentence, which the gateway turns into 503.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from cortex.engine_errors import EngineErrorKind, tag_engine_error
from neuron_agent.engines.admission import request_problem
from neuron_agent.engines.counts import CountsReport
from neuron_agent.engines.finishing import answer_complete, deliver, token_ends
from neuron_agent.engines.guided import Guide, GuideRejected, Guides, MaskBatch, Matcher
from neuron_agent.engines.llamacpp.runtime import Runtime, Sampler
from neuron_agent.engines.logprobs import TokenLogprob, log_softmax, row_logprob

log = logging.getLogger("cortex.engine.llamacpp")


class RequestRejected(Exception):
    """A request cannot be admitted (too long, bad parameters); one sentence. Its `kind` goes in
    front of the sentence across Triton (`cortex.engine_errors`)."""

    kind = EngineErrorKind.INVALID


class QueueFull(RequestRejected):
    """No room in the queue now; try again later."""

    kind = EngineErrorKind.OVERLOADED


@dataclass
class GenerationRequest:
    prompt: list[int]
    max_new_tokens: int
    emit: Callable[[list[int], bool], None]  # (new tokens, final), from the engine thread
    fail: Callable[[str], None]
    is_cancelled: Callable[[], bool] = lambda: False
    end_ids: frozenset[int] | None = None  # None: the model's own
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop_sequences: tuple[tuple[int, ...], ...] = ()
    stream: bool = True
    request_id: str = ""
    # admitted(cached_prompt_tokens): once, when the request takes its slot.
    admitted: Callable[[int], None] | None = None
    # Scheduling class, smaller first: 0 interactive, 1 batch (the gateway's key classes).
    priority: int = 0
    # Only tokens this grammar allows; None: any token.
    guide: Guide | None = None
    # Each token's logprob and this many top alternatives (0–20); None: no logprobs. They are
    # handed to `logprobs(entries)` just before the `emit` of the same tokens.
    top_logprobs: int | None = None
    logprobs: Callable[[list[TokenLogprob]], None] | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0 or self.top_k == 1


@dataclass(eq=False)
class _Slot:
    seq_id: int
    cached: list[int] = field(default_factory=list)  # tokens whose keys/values it holds
    last_used: float = 0.0
    sequence: _Sequence | None = None


@dataclass(eq=False)
class _Sequence:
    request: GenerationRequest
    tokens: list[int]  # prompt, then generated tokens
    end_ids: frozenset[int]
    slot: _Slot | None = None
    computed: int = 0  # positions whose keys/values are in the cache
    generated: list[int] = field(default_factory=list)
    unsent: list[int] = field(default_factory=list)
    sampler: Sampler | None = None
    admitted_at: float = 0.0
    matcher: Matcher | None = None  # follows the generated tokens through the request's guide
    unsent_logprobs: list[TokenLogprob] = field(default_factory=list)

    @property
    def prefilling(self) -> bool:
        return self.computed < len(self.tokens) - (1 if self.generated else 0)


def common_prefix(left: list[int], right: list[int]) -> int:
    length = min(len(left), len(right))
    if length == 0:
        return 0
    a, b = np.asarray(left[:length]), np.asarray(right[:length])
    differ = np.flatnonzero(a != b)
    return int(differ[0]) if differ.size else length


class Engine:
    def __init__(
        self,
        runtime: Runtime,
        context_length: int,
        max_batch_size: int = 8,
        max_queue_size: int = 256,
        prefill_tokens: int = 512,
        prefix_caching: bool = True,
        on_change: Callable[[int, int], None] | None = None,
    ) -> None:
        self.runtime = runtime
        self.kv_tokens = runtime.options.context_tokens
        self.context_length = min(context_length, self.kv_tokens)
        self.max_queue_size = max_queue_size
        self.prefill_tokens = max(1, min(prefill_tokens, runtime.capacity - max_batch_size))
        self.prefix_caching = prefix_caching and runtime.partial_reuse
        self.slots = [_Slot(i) for i in range(max_batch_size)]
        self.default_end_ids = runtime.end_tokens()
        self.guides = Guides(
            lambda: runtime.guidance_tokenizer(self.default_end_ids), self.default_end_ids
        )
        self._masks: MaskBatch | None = None  # made with the first guided request
        self.on_change = on_change
        self._waiting: deque[_Sequence] = deque()
        self._running: list[_Sequence] = []
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._counts = CountsReport()
        self.steps = 0
        self.prefix_hit_tokens = 0

    # ------------------------------------------------------------------ public surface

    def submit(self, request: GenerationRequest) -> None:
        """Queue a request, or raise RequestRejected with the reason."""
        vocabulary = self.runtime.n_vocab
        problem = request_problem(
            request.prompt,
            request.max_new_tokens,
            self.context_length,
            vocabulary,
            request.top_logprobs,
        )
        if problem is not None:
            raise RequestRejected(problem)
        prompt_length = len(request.prompt)
        request.max_new_tokens = min(request.max_new_tokens, self.context_length - prompt_length)
        sequence = _Sequence(request, list(request.prompt), request.end_ids or self.default_end_ids)
        if request.guide is not None:
            try:
                sequence.matcher = self.guides.matcher(request.guide)
            except GuideRejected as error:
                raise RequestRejected(str(error)) from None
            with self._lock:
                if self._masks is None:
                    self._masks = MaskBatch(len(self.slots), vocabulary, self.guides.eos_ids)
        with self._wake:
            if len(self._waiting) >= self.max_queue_size:
                raise QueueFull(
                    f"the request queue is full ({self.max_queue_size} waiting); try again later"
                )
            self._waiting.append(sequence)
            self._wake.notify()
        self._report()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="cortex-llamacpp", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)
        for sequence in [*self._waiting, *self._running]:
            self._release(sequence)
            sequence.request.fail(
                tag_engine_error(EngineErrorKind.UNAVAILABLE, "the model is being unloaded")
            )
        self._waiting.clear()
        self._running.clear()
        if self._masks is not None:
            self._masks.close()

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {
                "waiting": len(self._waiting),
                "running": len(self._running),
                "steps": self.steps,
                "prefix_hit_tokens": self.prefix_hit_tokens,
            }

    def _report(self) -> None:
        self._counts.tell(self.on_change, lambda: (len(self._running), len(self._waiting)))

    # ------------------------------------------------------------------ the loop

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._stopping and not self._waiting and not self._running:
                    self._wake.wait()
                if self._stopping:
                    return
            try:
                self.step()
            except Exception as error:  # the engine must survive any one bad step
                log.exception("engine step failed")
                self._fail(
                    list(self._running), f"the engine failed: {error}", EngineErrorKind.FAILED
                )
            self._report()

    def step(self) -> None:
        self.steps += 1
        self._drop_cancelled()
        self._admit()
        if not self._running:
            return
        tokens: list[int] = []
        positions: list[int] = []
        seq_ids: list[int] = []
        outputs: list[bool] = []
        choosing: list[tuple[_Sequence, int]] = []  # (sequence, its logits' row in the batch)
        advanced: list[tuple[_Sequence, int]] = []  # (sequence, computed after this step)
        budget = self.prefill_tokens
        for sequence in self._running:
            assert sequence.slot is not None
            if not sequence.prefilling:  # its newest token goes in
                position = len(sequence.tokens) - 1
                tokens.append(sequence.tokens[-1])
                positions.append(position)
                seq_ids.append(sequence.slot.seq_id)
                outputs.append(True)
                choosing.append((sequence, len(tokens) - 1))
                advanced.append((sequence, position + 1))
            elif budget > 0:
                start = sequence.computed
                stop = min(len(sequence.tokens), start + budget)
                budget -= stop - start
                tokens.extend(sequence.tokens[start:stop])
                positions.extend(range(start, stop))
                seq_ids.extend([sequence.slot.seq_id] * (stop - start))
                done = stop == len(sequence.tokens)
                outputs.extend([False] * (stop - start - 1) + [done])
                if done:
                    choosing.append((sequence, len(tokens) - 1))
                advanced.append((sequence, stop))
        self._make_room(len(tokens))
        guided = [j for j, (s, _) in enumerate(choosing) if s.matcher is not None]
        pending = self._start_masks([choosing[j][0] for j in guided])
        code = self.runtime.decode(tokens, positions, seq_ids, outputs)
        # One worker computes the masks: a step that fails here leaves the bitmask to the next.
        allowed = (
            None
            if pending is None or self._masks is None
            else self._masks.allowed(pending, list(range(len(guided))))
        )
        if code == 1:
            # No KV room even after idle slots let go: the youngest request gives way.
            youngest = max(self._running, key=lambda s: s.admitted_at)
            self._fail(
                [youngest],
                f"the KV cache ({self.kv_tokens} tokens) is full; try again with a shorter request",
                EngineErrorKind.OVERLOADED,
            )
            return
        if code != 0:
            raise RuntimeError(f"llama_decode returned {code}")
        for sequence, computed in advanced:
            sequence.computed = computed
        rows = {j: k for k, j in enumerate(guided)}  # index in `choosing` → mask row
        for j, (sequence, row) in enumerate(choosing):
            mask = None if allowed is None or j not in rows else allowed[rows[j]]
            self._accept(sequence, self._choose(sequence, row, mask))

    # ------------------------------------------------------------------ admission

    def _drop_cancelled(self) -> None:
        with self._lock:
            cancelled = [s for s in (*self._waiting, *self._running) if s.request.is_cancelled()]
            if not cancelled:
                return
            self._waiting = deque(s for s in self._waiting if s not in cancelled)
            self._running = [s for s in self._running if s not in cancelled]
        for sequence in cancelled:
            self._release(sequence)
            sequence.request.emit([], True)

    def _admit(self) -> None:
        admitted: list[_Sequence] = []
        with self._lock:
            while self._waiting:
                free = [slot for slot in self.slots if slot.sequence is None]
                if not free:
                    break
                # The first of the best class (min keeps arrival order among equals).
                sequence = min(self._waiting, key=lambda s: s.request.priority)
                self._waiting.remove(sequence)
                self._place(sequence, free)
                self._running.append(sequence)
                admitted.append(sequence)
        for sequence in admitted:
            request = sequence.request
            self.prefix_hit_tokens += sequence.computed
            if not request.greedy:
                sequence.sampler = self.runtime.sampler(
                    request.temperature, request.top_k, request.top_p, request.seed
                )
            if request.admitted is not None:
                request.admitted(sequence.computed)

    def _place(self, sequence: _Sequence, free: list[_Slot]) -> None:
        """The free slot for a sequence, holding as much of its prompt as the cache has."""
        prompt = sequence.tokens
        reusable = len(prompt) - 1
        if not self.prefix_caching:
            slot = min(free, key=lambda s: s.last_used)
            self._keep(slot, 0)
        else:
            # Its own best slot, then whether another slot holds a longer prefix to copy.
            own = {id(s): min(common_prefix(s.cached, prompt), reusable) for s in free}
            slot = max(free, key=lambda s: (own[id(s)], -s.last_used))
            kept = own[id(slot)]
            source, longest = None, kept
            for other in self.slots:
                if other is slot:
                    continue
                length = min(common_prefix(self._held(other), prompt), reusable)
                if length > longest:
                    source, longest = other, length
            if source is not None:
                self._keep(slot, 0)
                self.runtime.copy_prefix(source.seq_id, slot.seq_id, longest)
                slot.cached = prompt[:longest]
                kept = longest
            else:
                kept = self._keep(slot, kept)
        slot.sequence = sequence
        slot.last_used = time.monotonic()
        sequence.slot = slot
        sequence.computed = len(slot.cached)
        sequence.admitted_at = slot.last_used

    def _held(self, slot: _Slot) -> list[int]:
        """The tokens a slot's cache holds now (a running sequence's computed positions)."""
        if slot.sequence is not None:
            return slot.sequence.tokens[: slot.sequence.computed]
        return slot.cached

    def _keep(self, slot: _Slot, length: int) -> int:
        """Cut the slot's cache to its first `length` positions; returns what it kept (all of
        it is dropped where llama.cpp cannot cut there)."""
        if (length < len(slot.cached) or length == 0) and not self.runtime.forget(
            slot.seq_id, length
        ):
            self.runtime.forget(slot.seq_id, 0)
            length = 0
        slot.cached = slot.cached[:length]
        return length

    def _make_room(self, needed: int) -> None:
        """Drop idle slots' caches, least recently used first, until `needed` more cells fit."""
        held = sum(len(self._held(s)) for s in self.slots)
        idle = sorted(
            (s for s in self.slots if s.sequence is None and s.cached), key=lambda s: s.last_used
        )
        for slot in idle:
            if held + needed <= self.kv_tokens:
                return
            held -= len(slot.cached)
            self._keep(slot, 0)

    # ------------------------------------------------------------------ results

    def _start_masks(self, sequences: list[_Sequence]) -> Future[None] | None:
        """Start the guided sequences' masks (row i: sequences[i]) on llguidance's threads,
        while the decode that follows runs; None when none is guided."""
        if not sequences or self._masks is None:
            return None
        return self._masks.start([(s.matcher, i) for i, s in enumerate(sequences) if s.matcher])

    def _choose(self, sequence: _Sequence, row: int, allowed: npt.NDArray[Any] | None) -> int:
        """The next token from batch row `row`'s logits, among the `allowed` tokens when the
        sequence is guided; its logprobs (from the raw logits) kept when the request asked."""
        logits = self.runtime.logits(row)
        top = sequence.request.top_logprobs
        logprobs = None if top is None else log_softmax(logits)
        if allowed is not None:
            # In llama.cpp's own buffer: its sampler chain reads the logits from there.
            logits[~allowed] = -np.inf
        if sequence.sampler is None:
            token = int(np.argmax(logits))
        else:
            token = self.runtime.sample(sequence.sampler, row)
        if logprobs is not None and top is not None:
            sequence.unsent_logprobs.append(row_logprob(logprobs, token, top))
        return token

    def _accept(self, sequence: _Sequence, token: int) -> None:
        request = sequence.request
        matcher = sequence.matcher
        finished = token_ends(
            token, sequence.end_ids, matcher, self.guides.eos_ids, request.request_id
        )
        if not finished:
            sequence.tokens.append(token)
            sequence.generated.append(token)
            sequence.unsent.append(token)
            finished = answer_complete(
                sequence.generated, request.max_new_tokens, request.stop_sequences, matcher
            )
        if finished:
            with self._lock:
                if sequence in self._running:
                    self._running.remove(sequence)
            self._release(sequence)
        deliver(sequence, request, finished)

    def _release(self, sequence: _Sequence) -> None:
        """The slot goes back, keeping the keys/values computed (a later prompt may share them)."""
        slot = sequence.slot
        if slot is not None and slot.sequence is sequence:
            slot.cached = sequence.tokens[: sequence.computed]
            slot.sequence = None
            slot.last_used = time.monotonic()
            if len(slot.cached) != sequence.computed:  # pragma: no cover - bookkeeping guard
                self._keep(slot, 0)
        sequence.slot = None
        if sequence.sampler is not None:
            sequence.sampler.free()
            sequence.sampler = None

    def _fail(self, sequences: list[_Sequence], message: str, kind: EngineErrorKind) -> None:
        with self._lock:
            self._running = [s for s in self._running if s not in sequences]
        for sequence in sequences:
            if sequence.slot is not None:
                self.runtime.forget(sequence.slot.seq_id, 0)
                sequence.computed = 0
            self._release(sequence)
            sequence.request.fail(tag_engine_error(kind, message))
