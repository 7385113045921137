"""The flush tick (securechat.delivery.FlushTicker) on trio's MockClock: its length
follows the load of the event loop, and presence wake-ups keep their delay.

In virtual time the loop is never busy, so ``Load`` says it was busy a given share of
the (virtual) time, which is what the ticker reads from a ``LoopBusy`` instrument in the
server; ``LoopBusy`` itself is tested on the real clock.
"""

from __future__ import annotations

import time

import pytest
import trio
import trio.testing

from securechat.delivery import BUSY_LOW, FlushTicker, LoopBusy, Outbox

MS = 0.001


class Load:
    """A busy clock for the ticker: busy ``share`` of the virtual time since it last changed."""

    def __init__(self) -> None:
        self.share = 0.0
        self._cpu = 0.0
        self._since = 0.0

    def set(self, share: float) -> None:
        self._cpu = self()
        self._since = trio.current_time()
        self.share = share

    def __call__(self) -> float:
        return self._cpu + self.share * (trio.current_time() - self._since)


async def ticks(ticker: FlushTicker, count: int) -> None:
    start = ticker.count
    while ticker.count < start + count:  # noqa: ASYNC110 (virtual time: each sleep is a jump)
        await trio.sleep(ticker.interval / 4)


@pytest.mark.parametrize("share", [0.0, BUSY_LOW / 2, BUSY_LOW, 0.5, 0.75, 1.0])
async def test_the_tick_grows_with_the_load_of_the_event_loop(
    autojump_clock: trio.testing.MockClock, share: float
) -> None:
    # interval below BUSY_LOW, max_interval when never waiting, in proportion between.
    expected = 10 * MS + 40 * MS * max(0.0, share - BUSY_LOW) / (1 - BUSY_LOW)
    load = Load()
    ticker = FlushTicker(10 * MS, 0, 50 * MS, busy_clock=load)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(ticker.run)
        load.set(share)
        await ticks(ticker, 60)  # the smoothing settles
        assert ticker.current == pytest.approx(expected, abs=0.5 * MS)
        # Measured, not only computed: the next tick comes that long after this one.
        start = ticker.count
        await ticks(ticker, 1)
        first = trio.current_time()
        await ticks(ticker, 1)
        assert ticker.count == start + 2
        assert trio.current_time() - first == pytest.approx(ticker.current, abs=ticker.interval / 4)
        ticker.stop()


async def test_the_tick_shrinks_again_when_the_load_goes(
    autojump_clock: trio.testing.MockClock,
) -> None:
    load = Load()
    ticker = FlushTicker(10 * MS, 0, 50 * MS, busy_clock=load)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(ticker.run)
        load.set(1.0)
        await ticks(ticker, 60)
        assert ticker.current == pytest.approx(50 * MS, abs=0.5 * MS)
        load.set(0.0)
        await ticks(ticker, 60)
        assert ticker.current == 10 * MS
        ticker.stop()


async def test_a_fixed_tick_does_not_read_the_busy_clock(
    autojump_clock: trio.testing.MockClock,
) -> None:
    reads: list[float] = []

    def clock() -> float:
        reads.append(trio.current_time())
        return trio.current_time()  # always busy: would stretch an adaptive tick

    ticker = FlushTicker(20 * MS, 0, busy_clock=clock)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(ticker.run)
        await ticks(ticker, 20)
        assert ticker.current == 20 * MS
        ticker.stop()
    assert len(reads) <= 1  # at start only


@pytest.mark.parametrize("share", [0.0, 1.0])
async def test_presence_waits_its_delay_whatever_the_tick(
    autojump_clock: trio.testing.MockClock, share: float
) -> None:
    load = Load()
    load.share = share
    ticker = FlushTicker(10 * MS, 200 * MS, 50 * MS, busy_clock=load)
    assert ticker.later is not None
    woken: list[float] = []

    class Recorder(Outbox):
        def wake(self) -> None:
            woken.append(trio.current_time())

    outbox = Recorder(10, 10_000, lambda: None)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(ticker.run)
        await trio.sleep(0.5)  # the load has stretched the tick, or not
        ticker.later.add(outbox)
        added = trio.current_time()
        while not woken:  # noqa: ASYNC110 (virtual time)
            await trio.sleep(5 * MS)
        # At the first tick after the delay was up since the last presence wake-up:
        # never later than one delay plus one (longest) tick.
        assert woken[0] - added <= 200 * MS + ticker.max_interval + 1 * MS
        ticker.stop()


async def test_loop_busy_counts_what_is_not_waiting_for_io() -> None:
    busy = LoopBusy()
    trio.lowlevel.add_instrument(busy)
    try:
        start = busy()
        await trio.sleep(0.05)  # waiting for I/O (the timeout): not busy
        sleeping = busy() - start
        deadline = time.perf_counter() + 0.05
        while time.perf_counter() < deadline:  # computing (and yielding): busy
            await trio.lowlevel.checkpoint()
        computing = busy() - start - sleeping
    finally:
        trio.lowlevel.remove_instrument(busy)
    assert sleeping < 0.04
    assert computing >= 0.05
