"""Delivery: how frames get from the chat to each connection's socket.

Everything between "the hub decided this connection gets this frame" and
"the transport writes bytes" lives here: the :class:`Outbox` (one bounded
queue per connection, never blocking the hub), the :class:`Peer` through
which the hub sees a connection, the :class:`FlushTicker` that paces writers
so that a busy connection's frames coalesce into few writes, the
:class:`DeferredWakeups` for frames that are not urgent (presence),
:func:`write_loop`, the policy of one connection's writer task, and the
:class:`Flusher`, one task that writes for every connection whose transport
can write without waiting (:class:`DirectWrite`), so that a message to a
thousand idle connections is one task's loop instead of a thousand writer
wake-ups. It knows nothing of TLS or WebSocket: a transport is a function
that sends bytes, and maybe a :class:`DirectWrite`.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

import trio

from .protocol import Error, ServerEnvelope, encode

# The most a connection's writer takes from its queue at once (unless one
# frame is larger): what it holds and hands to the transport in one go.
BATCH_BYTES = 64 * 1024
# Bulk replies (history pages, stored direct messages) read at most READ_ROWS
# messages, and not much more than READ_CHARS characters of text, from the
# store at a time, and queue them with the connection's back-pressure
# (Peer.wait_for_room) before they read more.
READ_ROWS = 16
READ_CHARS = 16 * 1024


# The Flusher lets other tasks run after writing for this many connections.
FLUSH_STEP = 256


class DirectWrite(Protocol):
    """A transport's write that never waits (securechat.fast_tls.DirectWriter)."""

    def ready(self) -> bool:
        """Whether :meth:`write` may be called now (nothing else is writing)."""
        ...

    def write(self, data: bytes) -> bool:
        """Write ``data`` now: True when all of it went; False when it could not all go
        (the rest waits, in order, or the connection broke): then :meth:`finish`, in the
        connection's writer task, completes it or raises what a send would."""
        ...

    async def finish(self) -> None:
        """Complete the last :meth:`write` that returned False."""
        ...


class Outbox:
    """A bounded queue of encoded frames for one connection.

    ``put`` never blocks. When a frame would take the queue past
    ``max_frames`` or ``max_bytes``, the queue is dropped, closed, and
    ``on_overflow`` is called: that connection is too slow to keep, and the
    caller must disconnect it. ``take`` returns queued frames as one
    ``bytes`` of at most ``batch_bytes`` (or one larger frame), so the writer
    makes one ``send_all`` per wake-up and never encrypts more than that at
    once. A taken batch still counts against ``max_bytes`` until the writer
    comes back for the next one, having sent it: what is queued plus what the
    writer holds never exceeds ``max_bytes``.

    With a ``flusher`` and a ``direct`` write, frames put while the writer is
    idle are written by the :class:`Flusher` instead of waking the writer; the
    writer runs only when a direct write cannot be done or completed at once,
    and to send the last frames when the outbox is closed. Given
    ``start_writer`` too, an idle writer is no task at all (the memory of an
    idle connection): the outbox calls ``start_writer`` when one is needed,
    and the writer task ends when it would wait (:meth:`wait_for_frames`).
    """

    def __init__(
        self,
        max_frames: int,
        max_bytes: int,
        on_overflow: Callable[[], None],
        *,
        drain_timeout: float = 30.0,
        later: DeferredWakeups | None = None,
        batch_bytes: int = BATCH_BYTES,
        flusher: Flusher | None = None,
        direct: DirectWrite | None = None,
        start_writer: Callable[[], bool] | None = None,
    ) -> None:
        # Frames from _head on are queued: a list and an index, not a deque, which
        # costs an idle connection ~0.7 KiB more (docs/performance.md, idle).
        self._frames: list[bytes] = []
        self._head = 0
        self._later = later
        self._wake_pending = False
        self._room = trio.lowlevel.ParkingLot()  # woken when the writer frees room
        self._drain_timeout = drain_timeout
        self._bytes = 0  # queued, plus the batch the writer holds
        self._in_flight = 0  # the batch the writer holds
        self._max_frames = max_frames
        self._max_bytes = max_bytes
        self._on_overflow = on_overflow
        self.batch_bytes = batch_bytes
        self.closed = False
        self._flusher = flusher if direct is not None else None
        self.direct = direct if flusher is not None else None
        self._start_writer = start_writer if self.direct is not None else None
        # The writer while it is idle: its task, waiting for frames (woken with a
        # plain reschedule: a ParkingLot costs more per wake-up, docs/performance.md,
        # and a put to every member of a room wakes every member's writer), or
        # NO_TASK (started on demand: writer_on_demand); None while it runs.
        self._writer: trio.lowlevel.Task | _NoTask | None = None
        self._flush_due = False  # in the flusher's list
        # A direct write left something for the writer task to complete (DirectWrite.finish).
        self.unfinished = False
        # The flush tick of the last write that emptied the queue (FlushTicker.count).
        self.flushed_in = -1

    def __len__(self) -> int:
        return len(self._frames) - self._head

    @property
    def queued_bytes(self) -> int:
        """Bytes queued, plus the batch the writer holds (what counts against the limit)."""
        return self._bytes

    def put(self, frame: bytes, *, urgent: bool = True) -> None:
        """Queue ``frame``; a frame that is not ``urgent`` does not wake the writer itself.

        It goes out with the next urgent frame, or when ``later`` (the
        server's clock) wakes the writer: at most a presence delay after.
        Order is kept either way: there is one queue.
        """
        if self.closed:
            return
        frames = self._frames
        size = self._bytes + len(frame)
        if len(frames) - self._head >= self._max_frames or size > self._max_bytes:
            self._overflow()
            return
        frames.append(frame)
        self._bytes = size
        if self._writer is not None:
            if urgent or self._later is None:
                self._wake_writer()
            elif not self._wake_pending:
                self._wake_pending = True
                self._later.add(self)

    def writer_on_demand(self) -> bool:
        """Whether the outbox starts its writer task itself when it needs one (it has a
        ``start_writer``); the connection then starts none. Called once, before the
        first writer; with something already queued, a writer is started now."""
        if self._start_writer is None:
            return False
        self._writer = NO_TASK
        if len(self) or self.closed:
            self._wake_task()
        return True

    def wake(self) -> None:
        """Wake the writer for frames that were not urgent (called by :class:`DeferredWakeups`)."""
        self._wake_pending = False
        self._wake_writer()

    def _wake_writer(self) -> None:
        if self._writer is None:
            return
        if self._flusher is not None:
            if not self._flush_due:
                self._flush_due = True
                self._flusher.add(self)
            return
        self._wake_task()

    def _wake_task(self) -> None:
        writer = self._writer
        if writer is None:
            return
        if isinstance(writer, _NoTask):
            assert self._start_writer is not None
            if self._start_writer():
                self._writer = None
            return
        self._writer = None
        trio.lowlevel.reschedule(writer)

    def write_direct(self, tick: int) -> None:
        """Write what is queued through the direct write (the :class:`Flusher` calls this),
        or wake the writer task to do it when that cannot be done now."""
        self._flush_due = False
        direct = self.direct
        if self._writer is None or self.closed or direct is None:
            return  # the writer task is running, or finishing: it takes the frames itself
        if not direct.ready():
            self._wake_task()
            return
        while (batch := self.take()) is not None:
            if not direct.write(batch):
                self.unfinished = True  # the batch is released once the writer completes it
                self._wake_task()
                return
            self._release()
        self.flushed_in = tick

    def _overflow(self) -> None:
        self._frames.clear()
        self._head = 0
        self._bytes = self._in_flight = 0
        self.close()
        self._on_overflow()

    def close(self) -> None:
        """No more frames will be accepted; the writer sends what is left, then stops."""
        self.closed = True
        self._wake_task()
        self._room.unpark_all()

    async def wait_for_room(self) -> None:
        """Back-pressure for bulk replies: wait while the queue is more than half full.

        A connection that stays that far behind for ``drain_timeout`` is too
        slow to keep, exactly as if its queue had overflowed.
        """
        with trio.move_on_after(self._drain_timeout):
            while not self.closed and (
                2 * len(self) > self._max_frames or 2 * self._bytes > self._max_bytes
            ):
                await self._room.park()
            return
        self._overflow()

    async def wait_for_frames(self) -> bool:
        """Return True when there is something to take, or the outbox is closed (one
        writer only); with ``start_writer``, False at once instead of waiting: the
        writer task should end, and the outbox starts another when it needs one.

        The writer calls this when it has sent its last batch: that batch
        stops counting against the limit. It also returns when a direct write
        left something :attr:`unfinished` for the writer.
        """
        self._release()
        while not len(self) and not self.closed and not self.unfinished:
            if self._writer is not None:
                raise RuntimeError("another task is already waiting on this outbox")
            if self._start_writer is not None:
                self._writer = NO_TASK
                return False
            self._writer = trio.lowlevel.current_task()
            await trio.lowlevel.wait_task_rescheduled(self._abort_wait)
        return True

    def _abort_wait(self, _: trio.lowlevel.RaiseCancelT) -> trio.lowlevel.Abort:
        self._writer = None
        return trio.lowlevel.Abort.SUCCEEDED

    def take(self) -> bytes | None:
        """The oldest queued frames as one ``bytes`` (None if nothing is queued).

        At most ``batch_bytes``, but always at least one whole frame; a
        single frame is returned as the very object that was put. The batch
        counts against ``max_bytes`` until the next ``take`` or
        :meth:`wait_for_frames` (the previous one is released now).
        """
        self._release()
        frames, head = self._frames, self._head
        count = len(frames) - head
        if not count:
            return None
        if count == 1:
            batch = frames[head]
            frames.clear()
            head = 0
        elif self._bytes <= self.batch_bytes:
            batch = b"".join(frames[head:] if head else frames)
            frames.clear()
            head = 0
        else:
            end, size = head + 1, len(frames[head])
            while end < len(frames) and size + len(frames[end]) <= self.batch_bytes:
                size += len(frames[end])
                end += 1
            batch = frames[head] if end == head + 1 else b"".join(frames[head:end])
            head = end
            if head * 2 > len(frames):  # drop what was taken, in amortised O(1)
                del frames[:head]
                head = 0
        self._head = head
        self._in_flight = len(batch)
        return batch

    def _release(self) -> None:
        """The writer is done with its batch: its bytes no longer count."""
        if self._in_flight:
            self._bytes -= self._in_flight
            self._in_flight = 0
            if self._room:
                self._room.unpark_all()


class _NoTask:
    """The writer of an :class:`Outbox` that starts it on demand, while it is idle."""


NO_TASK = _NoTask()


class DeferredWakeups:
    """Outboxes whose writers have frames that are not urgent, woken together later.

    The server's flush clock calls :meth:`wake_all` every presence delay;
    between calls, any number of non-urgent frames to one connection cost
    one write instead of one each.
    """

    def __init__(self) -> None:
        self._due: list[Outbox] = []

    def add(self, outbox: Outbox) -> None:
        self._due.append(outbox)

    def wake_all(self) -> None:
        due, self._due = self._due, []
        for outbox in due:
            outbox.wake()


@dataclass(eq=False)
class Peer:
    """One logged-in connection, as the hub sees it: who it is and where its frames go."""

    username: str
    outbox: Outbox
    admin: bool = False
    # Send this error, then close the connection (kick, account removed).
    disconnect: Callable[[Error], None] = field(default=lambda error: None)
    # Where the ``error`` envelopes sent through :meth:`send` are counted, by code.
    errors: Counter[str] | None = field(default=None, repr=False)
    # Messages of this connection handed to the store and not yet answered.
    unsettled: int = 0
    _all_settled: trio.Event | None = field(default=None, repr=False)

    @property
    def closed(self) -> bool:
        """No more frames reach this connection (it is being let go, or too slow)."""
        return self.outbox.closed

    def put(self, frame: bytes, *, urgent: bool = True) -> None:
        self.outbox.put(frame, urgent=urgent)

    def send(self, envelope: ServerEnvelope) -> None:
        if self.errors is not None and type(envelope) is Error:
            self.errors[envelope.code] += 1
        self.outbox.put(encode(envelope))

    async def wait_for_room(self) -> None:
        """Back-pressure for bulk replies (see :meth:`Outbox.wait_for_room`)."""
        await self.outbox.wait_for_room()

    def submitted(self) -> None:
        """A message of this connection was handed to the store."""
        self.unsettled += 1

    def answered(self) -> None:
        """A message of this connection was acked or refused."""
        self.unsettled -= 1
        if not self.unsettled and self._all_settled is not None:
            self._all_settled.set()
            self._all_settled = None

    async def settled(self) -> None:
        """Return once every message this connection sent has been acked or refused."""
        if self.unsettled:
            if self._all_settled is None:
                self._all_settled = trio.Event()
            await self._all_settled.wait()


# The adaptive tick: the share of the last ticks the event loop was busy (smoothed),
# above which the tick grows; when it never waits for I/O the tick is the longest one.
BUSY_LOW = 0.25
BUSY_SMOOTHING = 0.25  # weight of the newest tick


class LoopBusy(trio.abc.Instrument):
    """Seconds the event loop has spent on anything but waiting for I/O since it was made.

    Wall time, not CPU time: a loop whose thread waits for a core (another
    process has it) is as far behind as one that computes.
    """

    def __init__(self) -> None:
        self._start = time.perf_counter()
        self._idle = 0.0
        self._since = self._start

    # A wait with no timeout is only a look at what is ready: the loop has tasks to run.
    def before_io_wait(self, timeout: float) -> None:
        if timeout:
            self._since = time.perf_counter()

    def after_io_wait(self, timeout: float) -> None:
        if timeout:
            self._idle += time.perf_counter() - self._since

    def __call__(self) -> float:
        return time.perf_counter() - self._start - self._idle


class FlushTicker:
    """The flush tick's clock: one task sleeps, and every writer waiting for the next
    tick wakes at once (one timer in all instead of one per connection).

    Every ``presence_delay`` it also wakes the writers that hold only frames
    that were not urgent (:class:`DeferredWakeups`). A :class:`Flusher` built
    on it gets the connections it held back for the next tick at every tick.

    The tick adapts to load between ``interval`` and ``max_interval``: while
    the event loop is busy (not waiting for I/O) less than a quarter of the
    time (``BUSY_LOW``), it is ``interval``; above that it grows in
    proportion, to ``max_interval`` when the loop never waits. A busy server
    then writes several messages to a connection in one write, which is what
    frees it (a write costs about the same for one message as for several);
    an idle one stays quick.
    ``busy_clock`` gives the loop's busy seconds so far; by default a
    :class:`LoopBusy` instrument installed while the ticker runs (a test
    passes its own).
    """

    def __init__(
        self,
        interval: float,
        presence_delay: float,
        max_interval: float | None = None,
        busy_clock: Callable[[], float] | None = None,
    ) -> None:
        self.interval = interval
        self.max_interval = interval if max_interval is None else max(interval, max_interval)
        self.current = interval  # the length of the tick now under way
        self.busy = 0.0  # smoothed share of the time the event loop was busy
        self.count = 0
        self.later: DeferredWakeups | None = DeferredWakeups() if presence_delay else None
        self._presence_delay = presence_delay
        self._busy_clock = busy_clock
        self._waiting = trio.lowlevel.ParkingLot()
        self._stopped = False
        self.flusher: Flusher | None = None

    def _next_interval(self, busy: float, wall: float) -> float:
        if wall > 0:
            share = min(1.0, max(0.0, busy / wall))
            self.busy += BUSY_SMOOTHING * (share - self.busy)
        over = max(0.0, self.busy - BUSY_LOW) / (1 - BUSY_LOW)
        return self.interval + (self.max_interval - self.interval) * over

    async def run(self) -> None:
        if self.max_interval > self.interval and self._busy_clock is None:
            busy_clock = LoopBusy()
            trio.lowlevel.add_instrument(busy_clock)
            try:
                await self._run(busy_clock)
            finally:
                trio.lowlevel.remove_instrument(busy_clock)
        else:
            await self._run(self._busy_clock)

    async def _run(self, busy_clock: Callable[[], float] | None) -> None:
        presence_due = trio.current_time() + self._presence_delay
        busy = busy_clock() if busy_clock is not None else 0.0
        now = trio.current_time()
        while not self._stopped:
            await trio.sleep(self.current)
            self.count += 1
            if self._waiting:
                self._waiting.unpark_all()
            if self.flusher is not None:
                self.flusher.tick()
            then, now = now, trio.current_time()
            if self.later is not None and now >= presence_due:
                presence_due = now + self._presence_delay
                self.later.wake_all()
            if busy_clock is not None and self.max_interval > self.interval:
                before, busy = busy, busy_clock()
                self.current = self._next_interval(busy - before, now - then)

    def stop(self) -> None:
        self._stopped = True
        self._waiting.unpark_all()
        if self.later is not None:
            self.later.wake_all()

    async def next_tick(self) -> None:
        if not self._stopped:
            await self._waiting.park()


class Flusher:
    """One task that writes for the connections whose writers are idle.

    An :class:`Outbox` with a direct write hands itself here instead of waking
    its writer task. The flusher writes each one's frames with
    :meth:`DirectWrite.write`, in the order they became due, and wakes a
    writer task only for what cannot be written at once (a full socket
    buffer, a stream that is busy or broken). The flush tick holds as for
    writers: a connection written to in the current tick waits for the next
    one, so that under load its frames coalesce into one write.
    """

    def __init__(self, ticker: FlushTicker | None) -> None:
        self._ticker = ticker
        if ticker is not None:
            ticker.flusher = self
        self._due: list[Outbox] = []
        self._next_tick: list[Outbox] = []
        self._task: trio.lowlevel.Task | None = None  # while it waits for work
        self._stopped = False

    def add(self, outbox: Outbox) -> None:
        ticker = self._ticker
        if ticker is not None and outbox.flushed_in == ticker.count:
            self._next_tick.append(outbox)
            return
        self._due.append(outbox)
        self._wake()

    def tick(self) -> None:
        """The ticker's call: what waited for this tick is due."""
        if self._next_tick:
            self._due.extend(self._next_tick)
            self._next_tick = []
            self._wake()

    def _wake(self) -> None:
        task = self._task
        if task is not None:
            self._task = None
            trio.lowlevel.reschedule(task)

    def stop(self) -> None:
        """Write what is due (the connections' writers do the rest), then end :meth:`run`."""
        self._stopped = True
        self.tick()
        self._wake()

    def _abort(self, _: trio.lowlevel.RaiseCancelT) -> trio.lowlevel.Abort:
        self._task = None
        return trio.lowlevel.Abort.SUCCEEDED

    async def run(self) -> None:
        while True:
            if not self._due:
                if self._stopped:
                    return
                self._task = trio.lowlevel.current_task()
                await trio.lowlevel.wait_task_rescheduled(self._abort)
                continue
            due, self._due = self._due, []
            tick = self._ticker.count if self._ticker is not None else -1
            for index, outbox in enumerate(due, 1):
                outbox.write_direct(tick)
                if index % FLUSH_STEP == 0:
                    await trio.lowlevel.checkpoint()
            await trio.lowlevel.checkpoint()


async def write_loop(
    outbox: Outbox, send: Callable[[bytes], Awaitable[None]], ticker: FlushTicker | None
) -> bool:
    """Drain ``outbox`` into ``send`` until it is closed and empty (returns False), or,
    for an outbox that starts its writer on demand, until it has nothing to write
    (returns True: the outbox starts a writer again when it needs one).

    The flush tick: a connection already flushed in the current tick waits
    for the next one, so that under load its frames coalesce into one write
    instead of one per frame (and its task is not woken for each of them);
    the first write after a quiet spell goes out at once. Ticks are global,
    so waiting writers wake together. A batch is at most the outbox's
    ``batch_bytes`` (or one larger frame); when a batch was cut there, the
    rest follows at once, not a tick later. What a direct write left
    :attr:`~Outbox.unfinished` is completed first. Transport errors propagate.
    """
    while True:
        if not await outbox.wait_for_frames():
            return True
        if outbox.unfinished:
            assert outbox.direct is not None
            outbox.unfinished = False
            await outbox.direct.finish()
            if ticker is not None:
                outbox.flushed_in = ticker.count
            continue
        if ticker is not None and ticker.count == outbox.flushed_in:
            await ticker.next_tick()
        batch = outbox.take()
        if batch is None:
            return False  # closed, and everything was sent
        cut = len(outbox) > 0
        await send(batch)
        if ticker is not None:
            outbox.flushed_in = -1 if cut else ticker.count
