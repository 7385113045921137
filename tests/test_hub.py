"""Unit tests for securechat.hub: per-connection outboxes and message fan-out (no I/O)."""

from __future__ import annotations

import re

import pytest
import trio
import trio.testing

from securechat.hub import Hub, Member, Outbox
from securechat.protocol import LOBBY, ErrorCode, Message, ProtocolError, encode, parse_server_frame

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


# --- Hub ---------------------------------------------------------------------------


def test_attach_puts_members_in_the_lobby() -> None:
    hub = Hub()
    alice, bob = member("alice"), member("bob")
    assert hub.attach(alice) == [LOBBY]
    assert hub.attach(bob) == [LOBBY]
    assert list(hub.members()) == [alice, bob]


def test_members_are_listed_once_even_when_attached_twice() -> None:
    hub = Hub()
    alice = member("alice")
    hub.attach(alice)
    hub.attach(alice)
    assert list(hub.members()) == [alice]


def test_two_connections_of_the_same_user_are_two_members() -> None:
    hub = Hub()
    first, second = member("alice"), member("alice")
    hub.attach(first)
    hub.attach(second)
    hub.publish(first, LOBBY, "hi")
    assert len(queued(first.outbox)) == len(queued(second.outbox)) == 1


def test_publish_delivers_the_same_bytes_object_to_every_member_including_the_sender() -> None:
    hub = Hub()
    alice, bob, carol = member("alice"), member("bob"), member("carol")
    for each in (alice, bob, carol):
        hub.attach(each)
    message = hub.publish(bob, LOBBY, "hello ☃")
    frames = [queued(each.outbox) for each in (alice, bob, carol)]
    assert all(len(items) == 1 for items in frames)
    first = frames[0][0]
    assert all(items[0] is first for items in frames)
    assert first == encode(message)
    assert parse_server_frame(first) == message


def test_publish_returns_the_message() -> None:
    hub = Hub()
    alice = member("alice")
    hub.attach(alice)
    message = hub.publish(alice, LOBBY, "hi there")
    assert isinstance(message, Message)
    assert message.id == 1
    assert message.room == LOBBY
    assert message.sender == "alice"
    assert message.text == "hi there"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", message.ts)


def test_message_ids_increase() -> None:
    hub = Hub()
    alice, bob = member("alice"), member("bob")
    hub.attach(alice)
    hub.attach(bob)
    ids = [hub.publish(sender, LOBBY, "x").id for sender in (alice, bob, alice, bob, bob)]
    assert ids == [1, 2, 3, 4, 5]
    received = [parse_server_frame(frame) for frame in queued(alice.outbox)]
    assert [envelope.id for envelope in received if isinstance(envelope, Message)] == ids


def test_publish_to_another_room_is_not_member() -> None:
    hub = Hub()
    alice = member("alice")
    hub.attach(alice)
    with pytest.raises(ProtocolError) as info:
        hub.publish(alice, "secret-room", "hi")
    assert info.value.code is ErrorCode.NOT_MEMBER
    assert not info.value.fatal
    assert "secret-room" in info.value.message
    assert queued(alice.outbox) == []
    assert hub.publish(alice, LOBBY, "ok").id == 1  # the refused message used no id


def test_publish_from_a_detached_member_is_not_member() -> None:
    hub = Hub()
    alice, bob = member("alice"), member("bob")
    hub.attach(bob)
    with pytest.raises(ProtocolError) as info:
        hub.publish(alice, LOBBY, "hi")
    assert info.value.code is ErrorCode.NOT_MEMBER
    assert queued(bob.outbox) == []


def test_detach_stops_delivery() -> None:
    hub = Hub()
    alice, bob = member("alice"), member("bob")
    hub.attach(alice)
    hub.attach(bob)
    hub.publish(alice, LOBBY, "one")
    hub.detach(bob)
    hub.detach(bob)  # detaching twice is harmless
    hub.publish(alice, LOBBY, "two")
    assert len(queued(alice.outbox)) == 2
    assert len(queued(bob.outbox)) == 1
    assert list(hub.members()) == [alice]
    with pytest.raises(ProtocolError):
        hub.publish(bob, LOBBY, "three")


def test_overflowing_member_detached_during_publish_does_not_stop_the_fan_out() -> None:
    hub = Hub()
    alice, carol = member("alice"), member("carol")
    slow = Member(username="bob", outbox=Outbox(1, 1 << 20, lambda: hub.detach(slow)))
    for each in (alice, slow, carol):
        hub.attach(each)
    hub.publish(alice, LOBBY, "one")
    hub.publish(alice, LOBBY, "two")  # bob's outbox overflows and bob is detached mid-publish
    assert slow.outbox.overflowed
    assert list(hub.members()) == [alice, carol]
    assert len(queued(alice.outbox)) == len(queued(carol.outbox)) == 2
