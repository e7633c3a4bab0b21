"""The torch engine's admission and preemption by priority, on cortex-tiny on CPU.

The engine is driven step by step (its thread is not started), so what is running after each
step is exact. Priority 0 is interactive, 1 batch (smaller first, as Triton's priorities)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from neuron_agent.torch_engine.loader import EngineOptions, build_engine
from neuron_agent.torch_engine.scheduler import Engine, GenerationRequest

INTERACTIVE, BATCH = 0, 1


class Requests:
    """Requests by name, and the order the engine admitted them in."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.admitted: list[str] = []
        self.first_token: list[str] = []
        self.finished: list[str] = []

    def submit(self, name: str, priority: int, max_new: int = 8, prompt_tokens: int = 10) -> None:
        self.engine.submit(
            GenerationRequest(
                prompt=[1, *range(10, 9 + prompt_tokens)],  # ten tokens: one block of 16
                max_new_tokens=max_new,
                emit=lambda tokens, final: self._emitted(name, tokens, final),
                fail=lambda message: self.finished.append(f"{name} failed: {message}"),
                request_id=name,
                admitted=lambda _cached: self.admitted.append(name),
                priority=priority,
            )
        )

    def _emitted(self, name: str, tokens: list[int], final: bool) -> None:
        if tokens and name not in self.first_token:
            self.first_token.append(name)
        if final:
            self.finished.append(name)

    def running(self) -> list[str]:
        return [s.request.request_id for s in self.engine._running]

    def waiting(self) -> list[str]:
        return [s.request.request_id for s in self.engine._waiting]


def engine_for(tiny_model: Path, **options: Any) -> Engine:
    return build_engine(EngineOptions(tiny_model, prefix_caching=False, **options))


def test_interactive_requests_are_admitted_before_earlier_batch_ones(tiny_model: Path) -> None:
    engine = engine_for(tiny_model, kv_cache_tokens=1024, max_batch_size=2)
    requests = Requests(engine)
    for name in ("batch-1", "batch-2", "batch-3"):
        requests.submit(name, BATCH)
    requests.submit("interactive", INTERACTIVE)
    engine.step()
    assert requests.admitted == ["interactive", "batch-1"]
    assert requests.waiting() == ["batch-2", "batch-3"]  # arrival order within the class


def test_an_interactive_request_preempts_the_youngest_batch_one_when_the_batch_is_full(
    tiny_model: Path,
) -> None:
    engine = engine_for(tiny_model, kv_cache_tokens=1024, max_batch_size=2)
    requests = Requests(engine)
    requests.submit("batch-1", BATCH)
    requests.submit("batch-2", BATCH)
    engine.step()
    assert requests.running() == ["batch-1", "batch-2"]
    requests.submit("interactive", INTERACTIVE)
    engine.step()
    assert requests.running() == ["batch-1", "interactive"]
    assert requests.waiting() == ["batch-2"]
    assert engine.preemptions == 1
    # A batch request never preempts another batch request: it waits for room.
    requests.submit("batch-3", BATCH)
    engine.step()
    assert "batch-3" in requests.waiting() and engine.preemptions == 1
    while len(requests.finished) < 4:
        engine.step()
    assert sorted(requests.finished) == ["batch-1", "batch-2", "batch-3", "interactive"]


def test_a_short_kv_budget_preempts_batch_sequences_before_younger_interactive_ones(
    tiny_model: Path,
) -> None:
    # Four blocks of 16 tokens: two sequences of 10 prompt tokens fit, but cannot both grow
    # past 32 tokens. The interactive one is the younger: without priority it would be the
    # one preempted.
    engine = engine_for(tiny_model, kv_cache_tokens=64, max_batch_size=2)
    requests = Requests(engine)
    requests.submit("batch", BATCH, max_new=40)
    engine.step()
    requests.submit("interactive", INTERACTIVE, max_new=40)
    while engine.preemptions == 0:
        engine.step()
        assert len(requests.finished) < 2, "the pool never ran dry"
    assert requests.running() == ["interactive"]
    assert requests.waiting() == ["batch"]
    while len(requests.finished) < 2:
        engine.step()
    assert requests.finished == ["interactive", "batch"]


def test_interactive_prompts_take_the_prefill_budget_first(tiny_model: Path) -> None:
    # Ten prompt tokens a step: the batch prompt (30) takes three steps. The interactive one,
    # admitted behind it in the second, is prefilled first and has its token at once.
    engine = engine_for(tiny_model, kv_cache_tokens=1024, max_batch_size=2, prefill_tokens=10)
    requests = Requests(engine)
    requests.submit("batch", BATCH, prompt_tokens=30)
    engine.step()
    requests.submit("interactive", INTERACTIVE)
    engine.step()
    assert requests.running() == ["batch", "interactive"]
    assert requests.first_token == ["interactive"]
