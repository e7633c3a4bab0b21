"""Embedding models on llama.cpp: texts in, one pooled vector each out.

Each text is tokenized with the file's own tokenizer (its CLS/SEP or BOS added as the file says),
the texts of a request are packed into as few decodes as fit (one sequence id each, at most the
context's sequences and batch tokens per decode), pooled as the file declares (mean, CLS, last)
and L2-normalized, as OpenAI's and llama.cpp's servers return them. Requests are served one at a
time on the engine's own thread, in arrival order.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from cortex.engine_errors import EngineErrorKind, tag_engine_error
from neuron_agent.engines.counts import CountsReport
from neuron_agent.engines.llamacpp.runtime import Runtime
from neuron_agent.engines.llamacpp.scheduler import QueueFull, RequestRejected

log = logging.getLogger("cortex.engine.llamacpp")


@dataclass
class EmbeddingRequest:
    texts: list[str]
    done: Callable[
        [npt.NDArray[np.float32], list[int]], None
    ]  # (vectors [n, dim], tokens per text)
    fail: Callable[[str], None]
    is_cancelled: Callable[[], bool] = lambda: False


class EmbeddingEngine:
    def __init__(
        self,
        runtime: Runtime,
        max_queue_size: int = 256,
        on_change: Callable[[int, int], None] | None = None,
    ) -> None:
        if runtime.pooling() == 0:
            raise RequestRejected(
                "the model's pooling type is none: it gives token embeddings, not one per text"
            )
        self.runtime = runtime
        self.max_queue_size = max_queue_size
        self.on_change = on_change
        self._counts = CountsReport()
        self.sequences = runtime.options.sequences
        self.batch_tokens = runtime.capacity
        self._waiting: deque[EmbeddingRequest] = deque()
        self._wake = threading.Condition()
        self._stopping = False
        self._busy = 0
        self._thread: threading.Thread | None = None

    def submit(self, request: EmbeddingRequest) -> None:
        if not request.texts:
            raise RequestRejected("text_input is empty")
        with self._wake:
            if len(self._waiting) >= self.max_queue_size:
                raise QueueFull(
                    f"the request queue is full ({self.max_queue_size} waiting); try again later"
                )
            self._waiting.append(request)
            self._wake.notify()
        self._report()

    def _report(self) -> None:
        self._counts.tell(self.on_change, lambda: (self._busy, len(self._waiting)))

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="cortex-embeddings", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)
        for request in self._waiting:
            request.fail(
                tag_engine_error(EngineErrorKind.UNAVAILABLE, "the model is being unloaded")
            )
        self._waiting.clear()

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._stopping and not self._waiting:
                    self._wake.wait()
                if self._stopping:
                    return
                request = self._waiting.popleft()
                self._busy = 1
            self._report()
            try:
                if not request.is_cancelled():
                    vectors, counts = self.embed(request.texts)
                    request.done(vectors, counts)
            except RequestRejected as error:
                request.fail(tag_engine_error(error.kind, str(error)))
            except Exception as error:
                log.exception("embedding failed")
                request.fail(
                    tag_engine_error(EngineErrorKind.FAILED, f"the engine failed: {error}")
                )
            self._busy = 0
            self._report()

    def embed(self, texts: list[str]) -> tuple[npt.NDArray[np.float32], list[int]]:
        """L2-normalized pooled embeddings [len(texts), dim] and each text's token count."""
        inputs = [self.runtime.tokenize(text) for text in texts]
        for index, tokens in enumerate(inputs):
            if not tokens:
                raise RequestRejected(f"text_input[{index}] has no tokens")
            if len(tokens) > self.batch_tokens:
                raise RequestRejected(
                    f"text_input[{index}] has {len(tokens)} tokens; the model takes at most "
                    f"{self.batch_tokens} per input"
                )
        vectors = np.zeros((len(inputs), self.runtime.n_embd), dtype=np.float32)
        start = 0
        while start < len(inputs):
            stop, used = start, 0
            while (
                stop < len(inputs)
                and stop - start < self.sequences
                and used + len(inputs[stop]) <= self.batch_tokens
            ):
                used += len(inputs[stop])
                stop += 1
            self._decode(inputs[start:stop])
            for offset in range(stop - start):
                vector = self.runtime.embeddings(offset)
                norm = float(np.linalg.norm(vector))
                vectors[start + offset] = vector / norm if norm > 0 else vector
            start = stop
        return vectors, [len(tokens) for tokens in inputs]

    def _decode(self, group: list[list[int]]) -> None:
        tokens: list[int] = []
        positions: list[int] = []
        seq_ids: list[int] = []
        outputs: list[bool] = []
        for seq_id, ids in enumerate(group):
            tokens.extend(ids)
            positions.extend(range(len(ids)))
            seq_ids.extend([seq_id] * len(ids))
            outputs.extend([True] * len(ids))
        self.runtime.clear()
        code = self.runtime.decode(tokens, positions, seq_ids, outputs)
        if code != 0:
            raise RuntimeError(f"llama_decode returned {code}")
