"""Unit tests for securechat.hub: per-connection outboxes and message fan-out (no I/O)."""

from __future__ import annotations

import trio
import trio.testing

from securechat.hub import Member, Outbox

# --- helpers -----------------------------------------------------------------


class OverflowCounter:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> None:
        self.calls += 1


def outbox(max_frames: int = 100, max_bytes: int = 1 << 20) -> tuple[Outbox, OverflowCounter]:
    counter = OverflowCounter()
    return Outbox(max_frames, max_bytes, counter), counter


def member(name: str, max_frames: int = 100, max_bytes: int = 1 << 20) -> Member:
    box, _ = outbox(max_frames, max_bytes)
    return Member(username=name, outbox=box)


def queued(box: Outbox) -> list[bytes]:
    """Everything in ``box`` right now, as the frames that were put (white-box peek)."""
    return list(box._frames)


# --- Outbox ----------------------------------------------------------------------


async def test_get_batch_returns_a_single_frame_as_is() -> None:
    box, _ = outbox()
    frame = b'{"type":"pong"}\n'
    box.put(frame)
    assert await box.get_batch() is frame
    assert len(box) == 0


async def test_get_batch_joins_queued_frames_into_one_bytes() -> None:
    box, _ = outbox()
    for frame in (b"a\n", b"bb\n", b"ccc\n"):
        box.put(frame)
    assert len(box) == 3
    batch = await box.get_batch()
    assert batch == b"a\nbb\nccc\n"
    assert isinstance(batch, bytes)
    assert len(box) == 0


async def test_get_batch_waits_for_a_put() -> None:
    box, _ = outbox()
    received: list[bytes | None] = []

    async def writer() -> None:
        received.append(await box.get_batch())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer)
        await trio.testing.wait_all_tasks_blocked()
        assert received == []
        box.put(b"late\n")
    assert received == [b"late\n"]


async def test_close_wakes_a_waiting_get_batch_with_none() -> None:
    box, _ = outbox()
    received: list[bytes | None] = []

    async def writer() -> None:
        received.append(await box.get_batch())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer)
        await trio.testing.wait_all_tasks_blocked()
        box.close()
    assert received == [None]


async def test_close_lets_get_batch_drain_then_returns_none() -> None:
    box, counter = outbox()
    box.put(b"one\n")
    box.put(b"two\n")
    box.close()
    assert box.closed
    assert await box.get_batch() == b"one\ntwo\n"
    assert await box.get_batch() is None
    assert await box.get_batch() is None
    assert counter.calls == 0


async def test_farewell_put_before_close_is_delivered_after_the_queue() -> None:
    box, _ = outbox()
    box.put(b"m1\n")
    box.put(b"bye\n")
    box.close()
    box.put(b"after close\n")  # ignored
    assert await box.get_batch() == b"m1\nbye\n"
    assert await box.get_batch() is None


async def test_put_after_close_is_ignored() -> None:
    box, counter = outbox(max_frames=1)
    box.close()
    box.put(b"x\n")
    box.put(b"y\n")  # would overflow an open outbox
    assert len(box) == 0
    assert counter.calls == 0
    assert not box.overflowed
    assert await box.get_batch() is None


async def test_overflow_by_count_calls_on_overflow_once_closes_and_drops_the_queue() -> None:
    box, counter = outbox(max_frames=3)
    for i in range(3):
        box.put(b"%d\n" % i)
    assert counter.calls == 0
    assert not box.closed
    box.put(b"3\n")
    assert counter.calls == 1
    assert box.overflowed
    assert box.closed
    assert len(box) == 0
    box.put(b"4\n")
    box.put(b"5\n")
    assert counter.calls == 1
    assert await box.get_batch() is None


async def test_overflow_by_bytes_calls_on_overflow_once_closes_and_drops_the_queue() -> None:
    box, counter = outbox(max_bytes=10)
    box.put(b"12345\n")
    box.put(b"123\n")  # exactly 10 bytes: still fine
    assert counter.calls == 0
    assert len(box) == 2
    box.put(b"\n")
    assert counter.calls == 1
    assert box.overflowed
    assert box.closed
    assert len(box) == 0
    box.put(b"\n")
    assert counter.calls == 1
    assert await box.get_batch() is None


def test_a_single_frame_larger_than_max_bytes_overflows() -> None:
    box, counter = outbox(max_bytes=10)
    box.put(b"x" * 11)
    assert counter.calls == 1
    assert box.overflowed
    assert len(box) == 0


async def test_draining_frees_room_in_the_outbox() -> None:
    box, counter = outbox(max_frames=2, max_bytes=8)
    for _ in range(5):
        box.put(b"abc\n")
        box.put(b"def\n")
        assert await box.get_batch() == b"abc\ndef\n"
    assert counter.calls == 0
    assert not box.closed
