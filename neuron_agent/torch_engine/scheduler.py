"""Continuous batching: requests join and leave the running batch between decode steps.

One engine thread loops over `step()`:
  1. requests cancelled by their client (or the gateway) leave, freeing their blocks at once;
  2. waiting requests are admitted in priority order (interactive before batch; arrival order
     within a class) while the batch has room and the KV pool can hold their prompt — an
     interactive request that finds no room preempts batch ones — and the longest cached
     prefix of the prompt (whole blocks, shared with other requests) is reused, blocks are
     taken for the rest;
  3. admitted prompts of the best class waiting (interactive before batch) are prefilled from
     where the reused prefix ends, in one forward pass over chunks of several sequences, at
     most `prefill_tokens` tokens a step (a long prompt does not stall decoding for long);
  4. every sequence past prefill decodes one token in one batched forward pass — on a GPU a
     replay of the CUDA graph captured for that batch size (`graphs`) — taking a new block when
     its last one is full. With speculation on and a small batch, sequences that can guess
     their next tokens (`speculation`) have them verified in the same pass instead: k + 1 rows
     each, over the paged cache; the rejected guesses' slots are given back.
Blocks for generated tokens are taken as sequences grow, not reserved for `max_new_tokens` at
admission: agents ask for far more (Claude Code: 32,000) than they use. When the pool runs dry
the youngest running sequence of the lowest class is preempted — its blocks released (registered ones stay cached),
itself put back at the front of the queue — and later resumes by recomputing its prompt and
generated tokens, which mostly come back from the prefix cache. Its client sees only a pause.
Requests beyond the queue limit, or larger than the whole KV budget, are rejected with a clear
sentence instead of waiting forever or exhausting memory.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from cortex.engine_errors import EngineErrorKind, tag_engine_error
from neuron_agent.engines.admission import request_problem
from neuron_agent.engines.counts import CountsReport
from neuron_agent.engines.finishing import answer_complete, deliver, token_ends
from neuron_agent.engines.guided import Guide, GuideRejected, Guides, Matcher
from neuron_agent.torch_engine.errors import EngineUnavailable, QueueFull, RequestRejected
from neuron_agent.torch_engine.graphs import DecodeRunner
from neuron_agent.torch_engine.guided import GuidedBatch
from neuron_agent.torch_engine.kv_cache import BlockKey, BlockPool
from neuron_agent.torch_engine.llama import ForwardBatch, LlamaModel, PrefillChunk
from neuron_agent.torch_engine.sampling import (
    HostCopy,
    SamplingParams,
    TokenLogprob,
    distribution,
    make_generator,
    sample_batch,
    token_logprobs,
)
from neuron_agent.torch_engine.speculation import (
    OutputHistory,
    SequenceGuesser,
    SpeculationCounters,
    SpeculationSettings,
    verify_greedy,
    verify_sampled,
)

log = logging.getLogger("cortex.engine")


@dataclass
class GenerationRequest:
    prompt: list[int]
    max_new_tokens: int
    # emit(new_tokens, final): called from the engine thread.
    emit: Callable[[list[int], bool], None]
    fail: Callable[[str], None]
    is_cancelled: Callable[[], bool] = lambda: False
    end_ids: frozenset[int] = frozenset()
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop_sequences: tuple[tuple[int, ...], ...] = ()
    stream: bool = True
    request_id: str = ""
    # admitted(cached_prompt_tokens): called once, from the engine thread, when the request
    # first joins the batch, with how many prompt tokens it reuses from the prefix cache.
    admitted: Callable[[int], None] | None = None
    # Scheduling class, smaller first: 0 interactive, 1 batch (the gateway's key classes).
    priority: int = 0
    # Only tokens this grammar allows (guided.py); None: any token.
    guide: Guide | None = None
    # Each token's logprob and this many top alternatives (0–20); None: no logprobs. They are
    # handed to `logprobs(entries)` just before the `emit` of the same tokens.
    top_logprobs: int | None = None
    logprobs: Callable[[list[TokenLogprob]], None] | None = None


@dataclass(frozen=True)
class _Masks:
    pending: Future[None]
    rows: list[int]


@dataclass(eq=False)  # identity: the loop asks `in self._running` per sequence per step
class _Sequence:
    request: GenerationRequest
    blocks: list[int]
    tokens: list[int]  # prompt, then generated tokens (an end token is not kept)
    cached: int = 0  # tokens whose keys/values are in the cache
    generated: list[int] = field(default_factory=list)
    unsent: list[int] = field(default_factory=list)
    unsent_logprobs: list[TokenLogprob] = field(default_factory=list)
    generator: torch.Generator | None = None
    keys: list[BlockKey] = field(default_factory=list)  # prefix keys of its full blocks
    reused: int | None = None  # prompt tokens from the prefix cache at first admission
    matcher: Matcher | None = None  # follows the generated tokens through the request's guide
    from_host: int = 0  # of `cached`, tokens copied back from the host tier at admission

    @property
    def prefill_target(self) -> int:
        """Positions that must be in the cache before the next token is chosen: the whole
        prompt for a new sequence; all but the newest token for one resumed after preemption
        (decoding feeds that one)."""
        return len(self.tokens) - 1 if self.generated else len(self.tokens)

    @property
    def prefilling(self) -> bool:
        return self.cached < self.prefill_target


def _priority(sequence: _Sequence) -> int:
    return sequence.request.priority


class Engine:
    def __init__(
        self,
        model: LlamaModel,
        pool: BlockPool,
        max_batch_size: int = 8,
        max_queue_size: int = 256,
        prefill_tokens: int = 512,
        on_change: Callable[[int, int], None] | None = None,
        cuda_graphs: bool = True,
        guides: Guides | None = None,
        speculation: SpeculationSettings | None = None,
    ) -> None:
        self.model = model
        self.pool = pool
        self.max_batch_size = max_batch_size
        self.max_queue_size = max_queue_size
        self.prefill_tokens = prefill_tokens
        self.device = model.device
        context_blocks = pool.blocks_for(min(model.spec.context_length, pool.capacity_tokens))
        settings = speculation or SpeculationSettings()
        # A verify pass is a decode pass of k + 1 rows per sequence (`_verify_logits`).
        rows = max_batch_size
        if settings.enabled:
            rows = max(rows, min(max_batch_size, settings.max_batch) * (settings.max_tokens + 1))
        self._decode_rows = rows
        self.decoder = DecodeRunner(
            model,
            pool.layers,
            pool.block_size,
            pool.scratch_slot,
            rows,
            table_width=context_blocks,
            graphs=cuda_graphs,
        )
        self._host = HostCopy(max_batch_size, self.device)
        self.guides = guides
        self._guided: GuidedBatch | None = None  # made with the first guided request
        self.context_length = model.spec.context_length
        self._cuda_graphs = cuda_graphs
        self._table_width = context_blocks
        self._waiting: deque[_Sequence] = deque()
        self._running: list[_Sequence] = []
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.steps = 0
        self.preemptions = 0
        self.prefix_hit_tokens = 0  # prompt tokens reused from the prefix cache, since start
        self.prefix_hit_tokens_host = 0  # of those, copied back from the host tier
        # on_prefix_hit(gpu_tokens, host_tokens): each admitted request's reuse by tier (the
        # Triton model counts them in its metrics).
        self.on_prefix_hit: Callable[[int, int], None] | None = None
        # on_change(running, waiting): told whenever the counts change (the node reads them).
        self.on_change = on_change
        self._counts = CountsReport()
        # Set by abort(): why this engine cannot serve any more (a tensor-parallel rank died).
        self.failure: str | None = None
        # A sleeping engine (`residency`) holds no KV cache and takes no request; `_idle` is
        # true while the loop waits for work, so a sleep never frees memory under a step.
        self.asleep = False
        self._idle = False
        self.speculation = settings
        self._history = (
            OutputHistory(settings.min_ngram, settings.max_ngram, settings.history_tokens)
            if settings.enabled and settings.history_tokens > 0
            else None
        )
        # Each sequence's proposer state, gone with the sequence.
        self._guessers: weakref.WeakKeyDictionary[_Sequence, SequenceGuesser] = (
            weakref.WeakKeyDictionary()
        )
        self._verify_host = HostCopy(self.decoder.buckets[-1], self.device)
        self.speculated = SpeculationCounters()

    # ------------------------------------------------------------------ public surface

    def submit(self, request: GenerationRequest) -> None:
        """Queue a request, or raise RequestRejected with the reason."""
        if self.failure is not None:
            raise EngineUnavailable(self.failure)
        if self.asleep:
            raise EngineUnavailable("the model is asleep: its neuron wakes it before serving")
        problem = request_problem(
            request.prompt,
            request.max_new_tokens,
            self.context_length,
            self.model.spec.vocab_size,
            request.top_logprobs,
        )
        if problem is not None:
            raise RequestRejected(problem)
        prompt_length = len(request.prompt)
        max_new = min(request.max_new_tokens, self.context_length - prompt_length)
        request.max_new_tokens = max_new
        needed = prompt_length + max_new
        if needed > self.pool.capacity_tokens:
            raise RequestRejected(
                f"the request needs {needed} KV-cache tokens (prompt {prompt_length} + "
                f"{max_new} new); this model's whole KV budget is {self.pool.capacity_tokens}"
            )
        sequence = _Sequence(request, [], list(request.prompt))
        sequence.generator = make_generator(request.sampling, self.device)
        if request.guide is not None:
            if self.guides is None:
                raise RequestRejected("guided_decoding_guide: this engine has no grammar support")
            try:
                sequence.matcher = self.guides.matcher(request.guide)
            except GuideRejected as error:
                raise RequestRejected(str(error)) from None
            if self._guided is None:
                self._guided = GuidedBatch(
                    self.max_batch_size, self.model.spec.vocab_size, self.guides.eos_ids
                )
        with self._wake:
            if len(self._waiting) >= self.max_queue_size:
                raise QueueFull(
                    f"the request queue is full ({self.max_queue_size} waiting); try again later"
                )
            self._waiting.append(sequence)
            self._wake.notify_all()
        self._report()

    def _report(self) -> None:
        self._counts.tell(self.on_change, lambda: (len(self._running), len(self._waiting)))

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="cortex-engine", daemon=True)
        self._thread.start()

    def hold(self) -> None:
        """Take no more requests (a sleep), once the loop is idle; RequestRejected, and nothing
        changed, while any request is queued or running."""
        with self._wake:
            in_flight = len(self._waiting) + len(self._running)
            if in_flight:
                raise RequestRejected(f"{in_flight} request(s) in flight; not sleeping")
            self.asleep = True
            while not self._idle and not self._stopping and self._thread is not None:
                self._wake.wait(0.1)

    def resume(self) -> None:
        with self._wake:
            self.asleep = False

    def rebuild_decoder(self) -> None:
        """A new decode runner over the pool as it is now (after a wake: the CUDA graphs
        captured over the old buffers are gone)."""
        self.decoder = DecodeRunner(
            self.model,
            self.pool.layers,
            self.pool.block_size,
            self.pool.scratch_slot,
            self._decode_rows,  # verify passes' rows too
            table_width=self._table_width,
            graphs=self._cuda_graphs,
        )

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=10)
        for sequence in [*self._waiting, *self._running]:
            sequence.request.fail(
                tag_engine_error(EngineErrorKind.UNAVAILABLE, "the model is being unloaded")
            )
        self._waiting.clear()
        self._running.clear()
        if self._guided is not None:
            self._guided.close()

    def abort(self, message: str) -> None:
        """Fail every request now, and every later one, with `message`; the loop ends. Called
        from another thread, as the engine thread may be stuck in a collective that a dead rank
        never joins."""
        with self._wake:
            self.failure = message
            self._stopping = True
            doomed = [*self._waiting, *self._running]
            self._waiting.clear()
            self._running = []
            self._wake.notify()
        for sequence in doomed:
            sequence.request.fail(tag_engine_error(EngineErrorKind.UNAVAILABLE, message))
        self._report()

    @torch.inference_mode()
    def prompt_logits(self, prompt: list[int]) -> torch.Tensor:
        """float32 logits at every position of one prompt, outside the batch (accuracy checks:
        quantized against plain). Call it on an idle engine: it takes blocks from the pool."""
        count = len(prompt)
        blocks = self.pool.allocate(count)
        if blocks is None:
            raise RequestRejected(f"{count} tokens do not fit the KV budget")
        try:
            batch = ForwardBatch.prefill(
                positions=torch.arange(count, device=self.device),
                write_slots=self.pool.slots(blocks, 0, count).to(self.device),
                block_size=self.pool.block_size,
                chunks=[PrefillChunk(0, count)],
            )
            tokens = torch.tensor(prompt, dtype=torch.long, device=self.device)
            logits: torch.Tensor = self.model(tokens, batch, self.pool.layers)
            return logits
        finally:
            self.pool.release(blocks)

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {
                "waiting": len(self._waiting),
                "running": len(self._running),
                "free_kv_blocks": self.pool.free_blocks,
                "cached_kv_blocks": self.pool.cached_blocks,
                "kv_blocks": self.pool.num_blocks,
                "steps": self.steps,
                "preemptions": self.preemptions,
                "prefix_hit_tokens": self.prefix_hit_tokens,
                "prefix_hit_tokens_host": self.prefix_hit_tokens_host,
                "host_kv_blocks": len(self.pool.host) if self.pool.host is not None else 0,
                **self.speculated.as_stats(),
            }

    # ------------------------------------------------------------------ the loop

    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self._wake:
                while not self._stopping and not self._waiting and not self._running:
                    self._idle = True
                    self._wake.notify_all()  # a sleep waiting for the loop to be idle
                    self._wake.wait()
                self._idle = False
                if self._stopping:
                    return
            try:
                self.step()
                self._report()
            except Exception as error:  # the engine must survive any one bad step
                log.exception("engine step failed")
                self._fail_running(f"the engine failed: {error}")

    def _fail_running(self, message: str) -> None:
        with self._lock:
            failed, self._running = self._running, []
        for sequence in failed:
            self.pool.release(sequence.blocks)
            sequence.request.fail(tag_engine_error(EngineErrorKind.FAILED, message))

    @torch.inference_mode()
    def step(self) -> None:
        self.steps += 1
        self._drop_cancelled()
        self._admit()
        # Only the best class waiting for prefill is prefilled this step: an interactive prompt
        # never shares its pass (and its wait for a first token) with batch prompts.
        prefilling = [s for s in self._running if s.prefilling]
        if prefilling:
            best = min(map(_priority, prefilling))
            self._prefill([s for s in prefilling if _priority(s) == best])
        decoding = self._grow([s for s in self._running if not s.prefilling and s.generated])
        if decoding:
            proposals = self._propose(decoding)
            if any(proposals):
                self._verify(decoding, proposals)
            else:
                self._decode(decoding)
            self._remember([s for s in decoding if s not in self._running])

    def _drop_cancelled(self) -> None:
        with self._lock:
            cancelled = [s for s in (*self._waiting, *self._running) if s.request.is_cancelled()]
            if not cancelled:
                return
            self._waiting = deque(s for s in self._waiting if s not in cancelled)
            self._running = [s for s in self._running if s not in cancelled]
        for sequence in cancelled:
            self.pool.release(sequence.blocks)
            sequence.request.emit([], True)

    def _admit(self) -> None:
        """Waiting sequences join in priority order (arrival order within a class). One that
        finds no room (batch full, or too few blocks) makes room by preempting running
        sequences of a lower class, youngest first; otherwise it waits, and so do those after
        it (first come, first served within its class)."""
        admitted: list[_Sequence] = []
        while True:
            with self._lock:
                if not self._waiting:
                    break
                sequence = min(self._waiting, key=_priority)  # the first of the best class
                if len(self._running) < self.max_batch_size and self._place(sequence):
                    self._waiting.remove(sequence)
                    self._running.append(sequence)
                    if sequence.reused is None:
                        sequence.reused = sequence.cached
                        self.prefix_hit_tokens += sequence.cached
                        self.prefix_hit_tokens_host += sequence.from_host
                        admitted.append(sequence)
                    continue
                victim = self._victim(below=sequence.request.priority)
            if victim is None:
                break
            self._preempt(victim)
        for sequence in admitted:
            if self.on_prefix_hit is not None:
                self.on_prefix_hit(sequence.cached - sequence.from_host, sequence.from_host)
            if sequence.request.admitted is not None:
                sequence.request.admitted(sequence.cached)

    def _place(self, sequence: _Sequence) -> bool:
        """Blocks for a waiting sequence's tokens: its longest cached prefix (at least the last
        token is left to compute, so there are logits to choose from), new blocks for the rest.
        Refused while that would leave running sequences less than a block each to grow into,
        which would only preempt the newcomer again at once."""
        pool = self.pool
        # Blocks found only in the host tier come back now, copied ahead of the prefill.
        blocks, keys, from_host = pool.lookup_tiers(sequence.tokens[:-1])
        needed = pool.blocks_for(len(sequence.tokens)) - len(blocks)
        if needed + len(self._running) > pool.free_blocks or not pool.grow(
            blocks, len(sequence.tokens)
        ):
            pool.release(blocks)
            return False
        sequence.blocks, sequence.keys = blocks, keys
        sequence.cached = len(keys) * pool.block_size
        sequence.from_host = from_host * pool.block_size
        return True

    def _grow(self, decoding: list[_Sequence]) -> list[_Sequence]:
        """A slot for each decoding sequence's next token (oldest first), preempting the
        youngest running sequence while the pool is dry; returns those that may decode."""
        ready = []
        for sequence in decoding:
            if sequence not in self._running:
                continue  # preempted to make room for an older one
            while not self.pool.grow(sequence.blocks, len(sequence.tokens)):
                victim = self._victim() or self._running[-1]
                self._preempt(victim)
                if victim is sequence:
                    break
            else:
                ready.append(sequence)
        return [s for s in ready if s in self._running]

    def _victim(self, below: int | None = None) -> _Sequence | None:
        """The running sequence to preempt first: of the lowest class (the largest priority
        number), the youngest; with `below`, only one of a lower class than that."""
        candidates = [s for s in reversed(self._running) if below is None or _priority(s) > below]
        return max(candidates, key=_priority) if candidates else None

    def _preempt(self, sequence: _Sequence) -> None:
        """Back to the front of the queue, its blocks released (full ones stay cached): it
        resumes by recomputing prompt + generated tokens, most of them from the cache."""
        with self._lock:
            self._running.remove(sequence)
            self._waiting.appendleft(sequence)
        self.pool.release(sequence.blocks)
        sequence.keys = []
        sequence.cached = 0
        self.preemptions += 1
        log.info(
            "preempted request %s at %d tokens: the KV cache is full",
            sequence.request.request_id or "-",
            len(sequence.tokens),
        )

    # ------------------------------------------------------------------ forward passes

    def _prefill(self, sequences: list[_Sequence]) -> None:
        """One forward pass over prompt chunks of several sequences, at most `prefill_tokens`
        tokens in all, each from where its cached prefix ends; a sequence whose prompt is done
        gets its first token."""
        budget = self.prefill_tokens
        tokens: list[int] = []
        positions: list[int] = []
        slots: list[torch.Tensor] = []
        chunks: list[PrefillChunk] = []
        filled: list[tuple[_Sequence, int]] = []  # (sequence, cached positions after this pass)
        finishing: list[tuple[_Sequence, int]] = []  # (sequence, its last row)
        for sequence in sequences:
            if budget <= 0:
                break
            start = sequence.cached
            stop = min(sequence.prefill_target, start + budget)
            budget -= stop - start
            chunks.append(
                PrefillChunk(
                    start=len(tokens),
                    length=stop - start,
                    key_slots=None
                    if start == 0
                    else self.pool.slots(sequence.blocks, 0, stop).to(self.device),
                )
            )
            tokens.extend(sequence.tokens[start:stop])
            positions.extend(range(start, stop))
            slots.append(self.pool.slots(sequence.blocks, start, stop))
            filled.append((sequence, stop))
            if not sequence.generated and stop == len(sequence.tokens):
                finishing.append((sequence, len(tokens) - 1))
        device = self.device
        batch = ForwardBatch.prefill(
            positions=torch.tensor(positions, device=device),
            write_slots=torch.cat(slots).to(device),
            block_size=self.pool.block_size,
            chunks=chunks,
        )
        rows = torch.tensor([row for _, row in finishing], dtype=torch.long, device=device)
        masks = self._start_masks([s for s, _ in finishing])
        logits = self.model(
            torch.tensor(tokens, dtype=torch.long, device=device), batch, self.pool.layers, rows
        )
        for sequence, stop in filled:
            sequence.cached = stop
            self.pool.commit(sequence.blocks, sequence.keys, sequence.tokens, stop)
        if finishing:
            self._sample_and_accept([s for s, _ in finishing], logits, logits.argmax(dim=-1), masks)

    def _decode(self, sequences: list[_Sequence]) -> None:
        lengths = [len(s.tokens) for s in sequences]  # the last token is not cached yet
        masks = self._start_masks(sequences)
        logits, greedy = self.decoder.run(
            tokens=[s.tokens[-1] for s in sequences],
            positions=[n - 1 for n in lengths],
            slots=[
                self.pool.slot(s.blocks, n - 1) for s, n in zip(sequences, lengths, strict=True)
            ],
            tables=[s.blocks for s in sequences],
        )
        for sequence, length in zip(sequences, lengths, strict=True):
            sequence.cached = length
            self.pool.commit(sequence.blocks, sequence.keys, sequence.tokens, length)
        self._sample_and_accept(sequences, logits, greedy, masks)

    def _start_masks(self, sequences: list[_Sequence]) -> _Masks | None:
        """Start computing the guided rows' token masks (on llguidance's threads, while the
        forward pass that follows runs); None when no row is guided."""
        guided = [(s.matcher, row) for row, s in enumerate(sequences) if s.matcher is not None]
        if not guided or self._guided is None:
            return None
        pending = self._guided.start(guided)
        return None if pending is None else _Masks(pending, [row for _, row in guided])

    def _sample_and_accept(
        self,
        sequences: list[_Sequence],
        logits: torch.Tensor,
        greedy: torch.Tensor,
        masks: _Masks | None = None,
    ) -> None:
        raw = logits
        if masks is not None and self._guided is not None:
            logits = self._guided.apply(masks.pending, masks.rows, logits)
            rows = torch.tensor(masks.rows, dtype=torch.long, device=logits.device)
            greedy = greedy.clone()
            greedy[rows] = logits[rows].argmax(dim=-1)
        chosen = sample_batch(
            logits,
            greedy,
            [s.request.sampling for s in sequences],
            [s.generator for s in sequences],
        )
        asking = [row for row, s in enumerate(sequences) if s.request.top_logprobs is not None]
        if asking:
            entries = token_logprobs(
                raw, chosen, asking, [sequences[row].request.top_logprobs or 0 for row in asking]
            )
            for row, entry in zip(asking, entries, strict=True):
                sequences[row].unsent_logprobs.append(entry)
        for sequence, token in zip(sequences, self._host.tolist(chosen), strict=True):
            self._accept(sequence, token)

    # ------------------------------------------------------------------ speculation

    def _may_speculate(self, sequence: _Sequence) -> bool:
        """Whether a sequence may have guesses verified. Not combined with a grammar guide (its
        mask is computed one token at a time) nor with logprobs (a verify step's logits are not
        the ones a one-token step would report for rejected positions): those decode plainly."""
        request = sequence.request
        if request.guide is not None or request.top_logprobs is not None:
            return False
        return request.max_new_tokens - len(sequence.generated) > 1

    def _propose(self, decoding: list[_Sequence]) -> list[list[int]]:
        """Each decoding sequence's candidates (empty: none), with KV blocks taken for them; all
        empty when speculation is off or the batch is over `speculative_max_batch`."""
        settings = self.speculation
        if not settings.enabled or len(decoding) > settings.max_batch:
            return [[] for _ in decoding]
        proposals = []
        for sequence in decoding:
            candidates: list[int] = []
            if self._may_speculate(sequence):
                guesser = self._guessers.get(sequence)
                if guesser is None:
                    guesser = SequenceGuesser.over(sequence.tokens, settings)
                    self._guessers[sequence] = guesser
                # Never past max_new_tokens: every accepted guess is output.
                room = sequence.request.max_new_tokens - len(sequence.generated) - 1
                candidates = guesser.candidates(self._history, room)
                # Room in the cache for the guesses' keys, or no guessing this step (a guess
                # never preempts anyone).
                if candidates and not self.pool.grow(
                    sequence.blocks, len(sequence.tokens) + len(candidates)
                ):
                    candidates = []
            proposals.append(candidates)
        return proposals

    def _verify(self, sequences: list[_Sequence], proposals: list[list[int]]) -> None:
        """Each sequence keeps the candidates the model agrees with and one token of its own.
        Cache slots written for rejected candidates lie past `cached` (never read, overwritten
        later); whole blocks that only they used go back to the pool."""
        pool = self.pool
        lengths = [len(s.tokens) for s in sequences]  # the last token is not cached yet
        logits, chunks = self._verify_logits(sequences, proposals)
        best = self._verify_host.tolist(logits.argmax(dim=-1))
        self.speculated.verify_steps += 1
        for sequence, candidates, length, chunk in zip(
            sequences, proposals, lengths, chunks, strict=True
        ):
            rows = slice(chunk.start, chunk.start + chunk.length)
            params = sequence.request.sampling
            if params.greedy or sequence.generator is None:
                emitted = verify_greedy(best[rows], candidates)
            else:
                emitted = verify_sampled(
                    distribution(logits[rows], params), candidates, sequence.generator
                )
            accepted = len(emitted) - 1
            cached = length + accepted
            sequence.cached = cached
            pool.commit(sequence.blocks, sequence.keys, sequence.tokens + emitted[:-1], cached)
            keep = pool.blocks_for(cached + 1)  # the next step feeds the token emitted last
            if len(sequence.blocks) > keep:
                unused = sequence.blocks[keep:]
                del sequence.blocks[keep:]
                pool.release(unused)
            if candidates:
                self.speculated.record(len(candidates), accepted)
                self._guessers[sequence].control.record(len(candidates), accepted)
            for token in emitted:
                self._accept(sequence, token)
                if sequence not in self._running:
                    break  # ended (an end token, a stop sequence, max_new_tokens)

    def _verify_logits(
        self, sequences: list[_Sequence], proposals: list[list[int]]
    ) -> tuple[torch.Tensor, list[PrefillChunk]]:
        """One decode pass with a row for each sequence's last token and one for each of its
        candidates: row j of a sequence sits at position n - 1 + j, reads the sequence's block
        table and attends to its first n + j positions, so the rows are causal among
        themselves over the cached prefix. Every row's keys and values are written before any
        row attends (per layer), so this is the paged decode kernel, and on a GPU a CUDA graph
        at the bucket of the row count. Float32 logits of every row, and each sequence's rows."""
        pool = self.pool
        tokens: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        tables: list[list[int]] = []
        chunks: list[PrefillChunk] = []
        for sequence, candidates in zip(sequences, proposals, strict=True):
            length = len(sequence.tokens)
            chunks.append(PrefillChunk(start=len(tokens), length=1 + len(candidates)))
            tokens.extend([sequence.tokens[-1], *candidates])
            for position in range(length - 1, length + len(candidates)):
                positions.append(position)
                slots.append(pool.slot(sequence.blocks, position))
                tables.append(sequence.blocks)
        logits, _ = self.decoder.run(tokens=tokens, positions=positions, slots=slots, tables=tables)
        return logits, chunks

    def _remember(self, finished: list[_Sequence]) -> None:
        """Finished outputs join the model's output history (for later requests' guesses)."""
        if self._history is None:
            return
        for sequence in finished:
            self._history.add(sequence.tokens[len(sequence.request.prompt) :])

    # ------------------------------------------------------------------ results

    def _accept(self, sequence: _Sequence, token: int) -> None:
        request = sequence.request
        matcher = sequence.matcher
        grammar_end = self.guides.eos_ids if self.guides is not None else frozenset()
        finished = token_ends(token, request.end_ids, matcher, grammar_end, request.request_id)
        if not finished:
            sequence.tokens.append(token)
            sequence.generated.append(token)
            sequence.unsent.append(token)
            finished = answer_complete(
                sequence.generated, request.max_new_tokens, request.stop_sequences, matcher
            )
        else:
            # The end token is not part of the output (as TensorRT-LLM reports it), but the
            # sequence must still look decoded for bookkeeping.
            sequence.generated.append(token)
        if finished:
            with self._lock:
                if sequence in self._running:
                    self._running.remove(sequence)
            self.pool.release(sequence.blocks)
        deliver(sequence, request, finished)
