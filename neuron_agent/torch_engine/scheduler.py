"""Continuous batching: requests join and leave the running batch between decode steps.

One engine thread loops over `step()`:
  1. requests cancelled by their client (or the gateway) leave, freeing their blocks at once;
  2. waiting requests are admitted in arrival order while the batch has room and the KV pool can
     reserve their whole budget (prompt + max new tokens) — so nothing runs out of memory later;
  3. admitted prompts are prefilled in chunks (a long prompt does not stall decoding for long);
  4. every sequence past prefill decodes one token in one batched forward pass.
Requests beyond the queue limit, or larger than the whole KV budget, are rejected with a clear
sentence instead of waiting forever or exhausting memory.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from neuron_agent.torch_engine.errors import RequestRejected
from neuron_agent.torch_engine.kv_cache import BlockPool
from neuron_agent.torch_engine.llama import AttentionBatch, LlamaModel
from neuron_agent.torch_engine.sampling import (
    SamplingParams,
    make_generator,
    sample,
    sample_batch,
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


@dataclass
class _Sequence:
    request: GenerationRequest
    blocks: list[int]
    tokens: list[int]
    cached: int = 0  # tokens whose keys/values are in the cache
    generated: list[int] = field(default_factory=list)
    unsent: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None

    @property
    def prefilling(self) -> bool:
        return self.cached < len(self.request.prompt)


class Engine:
    def __init__(
        self,
        model: LlamaModel,
        pool: BlockPool,
        max_batch_size: int = 8,
        max_queue_size: int = 256,
        prefill_chunk: int = 512,
        on_change: Callable[[int, int], None] | None = None,
    ) -> None:
        self.model = model
        self.pool = pool
        self.max_batch_size = max_batch_size
        self.max_queue_size = max_queue_size
        self.prefill_chunk = prefill_chunk
        self.device = model.device
        self.context_length = model.spec.context_length
        self._waiting: deque[_Sequence] = deque()
        self._running: list[_Sequence] = []
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.steps = 0
        # on_change(running, waiting): told whenever the counts change (the node reads them).
        self.on_change = on_change
        self._reported = (-1, -1)
        # Set by abort(): why this engine cannot serve any more (a tensor-parallel rank died).
        self.failure: str | None = None

    # ------------------------------------------------------------------ public surface

    def submit(self, request: GenerationRequest) -> None:
        """Queue a request, or raise RequestRejected with the reason."""
        if self.failure is not None:
            raise RequestRejected(self.failure)
        prompt_length = len(request.prompt)
        if prompt_length == 0:
            raise RequestRejected("the prompt is empty")
        if prompt_length >= self.context_length:
            raise RequestRejected(
                f"the prompt has {prompt_length} tokens; the model's context is {self.context_length}"
            )
        if request.max_new_tokens < 1:
            raise RequestRejected("request_output_len must be at least 1")
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
        with self._wake:
            if len(self._waiting) >= self.max_queue_size:
                raise RequestRejected(
                    f"the request queue is full ({self.max_queue_size} waiting); try again later"
                )
            self._waiting.append(sequence)
            self._wake.notify()
        self._report()

    def _report(self) -> None:
        counts = (len(self._running), len(self._waiting))
        if self.on_change is not None and counts != self._reported:
            self._reported = counts
            self.on_change(*counts)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="cortex-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout=10)
        for sequence in [*self._waiting, *self._running]:
            sequence.request.fail("the model is being unloaded")
        self._waiting.clear()
        self._running.clear()

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
            sequence.request.fail(message)
        self._report()

    @torch.inference_mode()
    def prompt_logits(self, prompt: list[int]) -> torch.Tensor:
        """float32 logits at every position of one prompt, outside the batch (accuracy checks:
        quantized against plain). Uses the first cache slots: call it on an idle engine."""
        count = len(prompt)
        batch = AttentionBatch(
            positions=torch.arange(count, device=self.device)[None],
            write_slots=torch.arange(count, device=self.device)[None],
            gather=None,
            key_valid=None,
            fresh=True,
        )
        tokens = torch.tensor([prompt], dtype=torch.long, device=self.device)
        return self.model(tokens, batch, self.pool.layers, torch.arange(count, device=self.device))

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {
                "waiting": len(self._waiting),
                "running": len(self._running),
                "free_kv_blocks": self.pool.free_blocks,
                "kv_blocks": self.pool.num_blocks,
                "steps": self.steps,
            }

    # ------------------------------------------------------------------ the loop

    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self._wake:
                while not self._stopping and not self._waiting and not self._running:
                    self._wake.wait()
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
            sequence.request.fail(message)

    @torch.inference_mode()
    def step(self) -> None:
        self.steps += 1
        self._drop_cancelled()
        self._admit()
        prefill_budget = self.prefill_chunk
        for sequence in [s for s in self._running if s.prefilling]:
            if prefill_budget <= 0:
                break
            prefill_budget -= self._prefill(sequence, prefill_budget)
        decoding = [s for s in self._running if not s.prefilling and s.generated]
        if decoding:
            self._decode(decoding)

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
        with self._lock:
            while self._waiting and len(self._running) < self.max_batch_size:
                sequence = self._waiting[0]
                request = sequence.request
                blocks = self.pool.allocate(len(request.prompt) + request.max_new_tokens)
                if blocks is None:
                    return  # first come, first served: wait for blocks to come back
                self._waiting.popleft()
                sequence.blocks = blocks
                self._running.append(sequence)

    # ------------------------------------------------------------------ forward passes

    def _prefill(self, sequence: _Sequence, budget: int) -> int:
        start = sequence.cached
        stop = min(len(sequence.request.prompt), start + budget)
        chunk = sequence.request.prompt[start:stop]
        device = self.device
        tokens = torch.tensor([chunk], dtype=torch.long, device=device)
        positions = torch.arange(start, stop, device=device)[None, :]
        write_slots = self.pool.slots(sequence.blocks, start, stop).to(device)[None, :]
        fresh = start == 0
        batch = AttentionBatch(
            positions=positions,
            write_slots=write_slots,
            gather=None if fresh else self.pool.slots(sequence.blocks, 0, stop).to(device)[None, :],
            key_valid=None if fresh else torch.ones((1, stop), dtype=torch.bool, device=device),
            fresh=fresh,
        )
        last = torch.tensor([len(chunk) - 1], device=device)
        logits = self.model(tokens, batch, self.pool.layers, last)
        sequence.cached = stop
        if stop == len(sequence.request.prompt):
            self._accept(sequence, sample(logits[0], sequence.request.sampling, sequence.generator))
        return len(chunk)

    def _decode(self, sequences: list[_Sequence]) -> None:
        device = self.device
        count = len(sequences)
        lengths = [len(s.tokens) for s in sequences]  # the last token is not cached yet
        longest = max(lengths)
        tokens = torch.tensor([[s.tokens[-1]] for s in sequences], dtype=torch.long, device=device)
        positions = torch.tensor([[n - 1] for n in lengths], device=device)
        gather = torch.zeros((count, longest), dtype=torch.long)
        key_valid = torch.zeros((count, longest), dtype=torch.bool)
        write = torch.empty((count, 1), dtype=torch.long)
        for row, (sequence, length) in enumerate(zip(sequences, lengths, strict=True)):
            slots = self.pool.slots(sequence.blocks, 0, length)
            gather[row, :length] = slots
            key_valid[row, :length] = True
            write[row, 0] = slots[-1]
        batch = AttentionBatch(
            positions=positions,
            write_slots=write.to(device),
            gather=gather.to(device),
            # Equal lengths (always so at batch 1): nothing to mask.
            key_valid=None if min(lengths) == longest else key_valid.to(device),
            fresh=False,
        )
        logits = self.model(tokens, batch, self.pool.layers, torch.arange(count, device=device))
        chosen = sample_batch(
            logits, [s.request.sampling for s in sequences], [s.generator for s in sequences]
        )
        for row, sequence in enumerate(sequences):
            sequence.cached = lengths[row]
            self._accept(sequence, chosen[row])

    # ------------------------------------------------------------------ results

    def _accept(self, sequence: _Sequence, token: int) -> None:
        request = sequence.request
        finished = token in request.end_ids
        if not finished:
            sequence.tokens.append(token)
            sequence.generated.append(token)
            sequence.unsent.append(token)
            finished = len(sequence.generated) >= request.max_new_tokens or any(
                tuple(sequence.generated[-len(stop) :]) == stop
                for stop in request.stop_sequences
                if stop
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
        if request.stream or finished:
            out, sequence.unsent = sequence.unsent, []
            if out or finished:
                request.emit(out, finished)


def wait_until(predicate: Callable[[], bool], timeout: float) -> bool:
    """Poll `predicate` until true or `timeout` seconds pass (tests and shutdown use it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()
