"""Reading a source that may fall silent: its items, a `None` for every `interval` seconds that a
reader waited in vain (callers send a keep-alive), and `UpstreamTimeout` once a deadline passed.

This sits on the per-token path, so it costs one future per item and no more: one task reads the
source ahead (a bounded buffer, so gRPC flow control still pushes back on a slow client), and one
timer, re-armed only when it fires, notices silence — rather than a task and a timed wait per
item. A read in progress is never cancelled to send a keep-alive: cancelling a gRPC read cancels
the call.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import AsyncIterator
from typing import Generic, TypeVar

from control_plane.errors import UpstreamTimeout

T = TypeVar("T")

# Items read ahead of the consumer at most; beyond that the reader waits.
READ_AHEAD = 64


class Paced(Generic[T]):
    """`async for item in Paced(source, interval, deadline)`; close with `aclose()` (or
    `contextlib.aclosing`), which stops a pending read and waits for it, so the source is idle
    again before anyone closes it."""

    def __init__(
        self, source: AsyncIterator[T], interval: float, deadline: float | None = None
    ) -> None:
        self._source = source
        self._interval = interval
        self._deadline = deadline
        self._items: collections.deque[T] = collections.deque()
        self._finished = False
        self._error: BaseException | None = None
        self._expired = False
        self._waiter: asyncio.Future[None] | None = None
        self._space: asyncio.Future[None] | None = None
        self._waiting_since = 0.0
        self._reader: asyncio.Task[None] | None = None
        self._timers: list[asyncio.TimerHandle] = []

    def __aiter__(self) -> Paced[T]:
        return self

    def _start(self) -> None:
        loop = asyncio.get_running_loop()
        self._reader = loop.create_task(self._read())
        self._timers.append(loop.call_later(self._interval, self._tick))
        if self._deadline is not None:
            self._timers.append(
                loop.call_later(max(0.0, self._deadline - time.monotonic()), self._expire)
            )

    async def _read(self) -> None:
        try:
            async for item in self._source:
                self._items.append(item)
                self._wake()
                if len(self._items) >= READ_AHEAD:
                    self._space = asyncio.get_running_loop().create_future()
                    await self._space
        except Exception as error:  # handed to the consumer, raised where it reads
            self._error = error
        finally:
            self._finished = True
            self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _tick(self) -> None:
        """The silence timer: wakes a consumer that has waited `interval` seconds."""
        loop = asyncio.get_running_loop()
        delay = self._interval
        if self._waiter is not None and not self._waiter.done():
            waited = time.monotonic() - self._waiting_since
            if waited >= self._interval - 0.001:  # timers may fire a hair early
                self._waiter.set_result(None)
            else:
                delay = self._interval - waited
        self._timers[0] = loop.call_later(delay, self._tick)

    def _expire(self) -> None:
        self._expired = True
        self._wake()

    async def __anext__(self) -> T | None:
        if self._reader is None:
            self._start()
        if not (self._items or self._finished or self._expired):
            self._waiter = asyncio.get_running_loop().create_future()
            self._waiting_since = time.monotonic()
            try:
                await self._waiter
            finally:
                self._waiter = None
        if self._expired:
            raise UpstreamTimeout("the model did not finish in the request timeout")
        if self._items:
            if self._space is not None and not self._space.done():
                self._space.set_result(None)
            return self._items.popleft()
        if self._finished:
            if self._error is not None:
                raise self._error
            raise StopAsyncIteration
        return None  # woken by the silence timer

    async def aclose(self) -> None:
        for timer in self._timers:
            timer.cancel()
        reader = self._reader
        if reader is not None and not reader.done():
            reader.cancel()
            await asyncio.wait({reader})
