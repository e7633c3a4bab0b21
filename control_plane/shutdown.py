"""Graceful shutdown, handled in one place: on SIGTERM or SIGINT the gateway stops taking
requests (new ones get 503 with Retry-After), lets the answers in flight finish for up to
`drain_timeout_s`, cuts the ones still running — each ends with an error that says it was cut,
never as a complete answer — and only then stops the server, the fleet and its channels.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Callable, Iterator

from control_plane.errors import Overloaded

log = logging.getLogger("cortex.gateway")

# How long cut handlers get to write their error event before the server closes connections.
CUT_GRACE_S = 2.0


class ShuttingDown(Overloaded):
    def __init__(self, cut: bool = False) -> None:
        super().__init__(
            "the gateway is shutting down; the answer was cut before it was complete"
            if cut
            else "the gateway is shutting down; try again shortly"
        )


class Drain:
    """The answers in flight (their handler tasks) and whether the gateway is closing."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.closing = False
        self.cutting = False
        self._tasks: set[asyncio.Task[object]] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._shutdown: asyncio.Task[None] | None = None

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        """Around one answer: shutdown waits for it (up to the timeout), then cancels it."""
        if self.closing:
            raise ShuttingDown()
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._idle.clear()
        try:
            yield
        except asyncio.CancelledError:
            if not self.cutting:
                raise
            raise ShuttingDown(cut=True) from None  # an answer not yet begun: a plain error
        finally:
            self._tasks.discard(task)
            if not self._tasks:
                self._idle.set()

    def cut_error(self) -> ShuttingDown | None:
        """The error to end a cancelled answer with, when shutdown cancelled it."""
        return ShuttingDown(cut=True) if self.cutting else None

    async def drain(self) -> None:
        self.closing = True
        started = time.monotonic()
        if self._tasks:
            log.info("shutting down: waiting for %d answer(s) in flight", len(self._tasks))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), self.timeout)
        if self._tasks:
            log.warning(
                "shutting down: cutting %d answer(s) still running after %.0f s",
                len(self._tasks),
                time.monotonic() - started,
            )
            self.cutting = True
            for task in list(self._tasks):
                task.cancel()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), CUT_GRACE_S)

    def install(self, stop: Callable[[], None]) -> None:
        """SIGTERM and SIGINT start the drain, then call `stop()` (the server's own stop)."""
        loop = asyncio.get_running_loop()

        def begin() -> None:
            if self.closing:
                return
            log.info("shutting down (signal received)")

            async def run() -> None:
                await self.drain()
                stop()

            self._shutdown = loop.create_task(run())

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, begin)
