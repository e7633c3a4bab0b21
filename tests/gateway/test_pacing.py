"""`Paced`: items in order, a None per interval of silence, the deadline, failures raised where
the consumer reads, and closing stops a pending read before the source is closed."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator

import pytest

from control_plane.errors import UpstreamTimeout
from control_plane.pacing import READ_AHEAD, Paced


async def timed(items: list[tuple[float, int]]) -> AsyncGenerator[int, None]:
    for delay, item in items:
        await asyncio.sleep(delay)
        yield item


async def drain(paced: Paced[int]) -> list[int | None]:
    async with contextlib.aclosing(paced):
        return [item async for item in paced]


def test_items_in_order_with_a_none_per_silent_interval() -> None:
    source = timed([(0, 1), (0, 2), (0.25, 3), (0, 4)])
    got = asyncio.run(drain(Paced(source, interval=0.1)))
    assert [item for item in got if item is not None] == [1, 2, 3, 4]
    assert got.index(3) - got.index(2) - 1 == 2  # 0.25 s of silence: two keep-alives


def test_no_keep_alive_while_items_flow() -> None:
    source = timed([(0.02, n) for n in range(10)])
    assert asyncio.run(drain(Paced(source, interval=0.1))) == list(range(10))


def test_the_deadline_ends_a_stream_that_runs_on() -> None:
    async def main() -> list[int | None]:
        got: list[int | None] = []
        paced = Paced(timed([(0.05, n) for n in range(100)]), 1.0, time.monotonic() + 0.2)
        with pytest.raises(UpstreamTimeout):
            async with contextlib.aclosing(paced):
                async for item in paced:
                    got.append(item)
        return got

    got = asyncio.run(main())
    assert 2 <= len(got) <= 5


def test_a_failing_source_raises_where_the_consumer_reads() -> None:
    async def failing() -> AsyncGenerator[int, None]:
        yield 1
        raise RuntimeError("engine died")

    async def main() -> list[int | None]:
        got: list[int | None] = []
        with pytest.raises(RuntimeError, match="engine died"):
            async with contextlib.aclosing(Paced(failing(), 1.0)) as paced:
                async for item in paced:
                    got.append(item)
        return got

    assert asyncio.run(main()) == [1]


def test_closing_stops_the_pending_read_and_the_source_is_idle_after() -> None:
    closed = asyncio.Event()

    async def slow() -> AsyncGenerator[int, None]:
        try:
            yield 1
            await asyncio.sleep(60)
            yield 2
        finally:
            closed.set()

    async def main() -> None:
        source = slow()
        paced = Paced(source, 10.0)
        assert await paced.__anext__() == 1
        await asyncio.sleep(0.01)  # the reader is now waiting inside the source
        await asyncio.wait_for(paced.aclose(), 1)
        assert closed.is_set()
        await source.aclose()  # nothing is running in it any more

    asyncio.run(main())


def test_the_reader_waits_when_the_consumer_falls_behind() -> None:
    produced = 0

    async def fast() -> AsyncGenerator[int, None]:
        nonlocal produced
        for n in range(READ_AHEAD * 3):
            produced += 1
            yield n

    async def main() -> list[int | None]:
        paced = Paced(fast(), 10.0)
        first = await paced.__anext__()
        await asyncio.sleep(0.05)
        assert produced <= READ_AHEAD + 2
        rest = [item async for item in paced]
        await paced.aclose()
        return [first, *rest]

    assert asyncio.run(main()) == list(range(READ_AHEAD * 3))
