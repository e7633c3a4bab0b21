"""The requests-in-flight counts an engine tells the neuron agent (through its stats file).

Two threads change an engine's queues (the Triton thread that submits, the engine thread that
admits and finishes) and each tells the counts after its change. Read and told under one lock,
the last telling always carries the latest counts; without it a submit's (0 running, 1 waiting)
could be written after the engine's (0, 0) and stay there, an idle model reported busy.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

OnChange = Callable[[int, int], None]


class CountsReport:
    """Tells `on_change(running, waiting)` whenever the counts differ from the last told."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._told: tuple[int, int] | None = None

    def tell(self, on_change: OnChange | None, counts: Callable[[], tuple[int, int]]) -> None:
        if on_change is None:
            return
        with self._lock:
            now = counts()
            if now != self._told:
                self._told = now
                on_change(*now)
