"""Bulk replies of the hub: ``history`` pages and stored direct messages at login.

They are read from the store a few messages at a time, each read only once
the connection has room for more, so a page or a backlog is never held
whole; and what the user may see is checked again as the replay goes on.
Runs on a MemoryStore; the connections are outboxes the test drains itself,
like a slow client's writer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest
import trio
import trio.testing

from securechat.config import RoomSettings
from securechat.delivery import READ_ROWS, Outbox, Peer
from securechat.hub import Hub
from securechat.memory_store import MemoryStore
from securechat.protocol import (
    ErrorCode,
    HistoryEnd,
    Message,
    ProtocolError,
    ServerEnvelope,
    parse_server_frame,
)
from securechat.store import AppendMessage

from .conftest import WAIT
from .test_hub import ROOMS, flush, make_hub, online

TS = "2026-01-02T03:04:05.678Z"
QUEUE_BYTES = 16 * 1024
TEXT = "x" * 1000  # ~1.1 KB a frame: a replay fills half the queue with 8 of them


class RecordingStore(MemoryStore):
    """A MemoryStore that records every read of message rows: how many, and how full
    the reading connection's queue was when the read began."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[int] = []
        self.queued_at_read: list[int] = []
        self.watched: Outbox | None = None

    def _began(self) -> None:
        if self.watched is not None:
            self.queued_at_read.append(self.watched._bytes)

    async def messages(self, ids: Sequence[int], *, max_chars: int | None = None) -> list[Message]:
        self._began()
        found = await super().messages(ids, max_chars=max_chars)
        self.reads.append(len(found))
        return found

    async def undelivered(
        self,
        user: str,
        after: int = 0,
        limit: int = 10_000,
        *,
        through: int | None = None,
        max_chars: int | None = None,
    ) -> list[Message]:
        self._began()
        found = await super().undelivered(user, after, limit, through=through, max_chars=max_chars)
        self.reads.append(len(found))
        return found


@pytest.fixture
def store() -> RecordingStore:
    return RecordingStore()


class SlowConnection:
    """A logged-in connection with a small queue, drained only when the test says so."""

    def __init__(self, username: str) -> None:
        self.outbox = Outbox(1000, QUEUE_BYTES, lambda: None)
        self.member = Peer(username, self.outbox)
        self.received: list[ServerEnvelope] = []

    def take_all(self) -> None:
        """What the writer does: take batches (each send done before the next take)."""
        while (batch := self.outbox.take()) is not None:
            self.received.extend(parse_server_frame(line) for line in batch.splitlines())

    def messages(self) -> list[Message]:
        return [envelope for envelope in self.received if isinstance(envelope, Message)]

    async def wait_until_paced(self) -> None:
        """Until the replay has filled half the queue and waits for room."""
        await trio.testing.wait_all_tasks_blocked()  # the store's reads do not block
        assert 2 * self.outbox._bytes > QUEUE_BYTES

    async def drain_until(self, done: Callable[[], bool]) -> None:
        with trio.fail_after(WAIT):
            while not done():
                self.take_all()
                await trio.testing.wait_all_tasks_blocked()  # the replay goes on meanwhile
        self.take_all()


async def login(hub: Hub, connection: SlowConnection) -> None:
    await hub.login(connection.member)
    connection.take_all()
    connection.received.clear()


def room_message(id_: int, room: str = "lobby") -> Message:
    return Message(id=id_, room=room, sender="alice", text=TEXT, ts=TS)


def direct_message(id_: int, to: str = "bob") -> Message:
    return Message(id=id_, to=to, sender="alice", text=TEXT, ts=TS)


class Replay:
    """``hub.history`` in the background; remembers how it ended."""

    def __init__(self) -> None:
        self.error: ErrorCode | None = None
        self.done = False

    async def run(self, hub: Hub, member: Peer, **request: object) -> None:
        try:
            await hub.history(member, **request)  # type: ignore[arg-type]
        except ProtocolError as exc:
            self.error = exc.code
        self.done = True


# --- history ----------------------------------------------------------------------------


async def test_a_long_page_is_read_a_few_messages_at_a_time_as_the_connection_drains(
    store: RecordingStore,
) -> None:
    await store.commit(*(AppendMessage(room_message(i)) for i in range(1, 201)))
    hub = await make_hub(store)
    bob = SlowConnection("bob")
    await login(hub, bob)
    store.watched = bob.outbox
    replay = Replay()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(
            lambda: replay.run(
                hub, bob.member, room="lobby", with_user=None, after=0, limit=200, ref="h"
            )
        )
        await bob.drain_until(lambda: replay.done)
    assert replay.error is None
    assert [m.id for m in bob.messages()] == list(range(1, 201))
    assert bob.received[-1] == HistoryEnd(room="lobby", last=200, more=False, ref="h")
    # Each message read once, a few at a time, and only when the queue had room.
    assert sum(store.reads) == 200
    assert max(store.reads) <= READ_ROWS
    assert max(store.queued_at_read) <= QUEUE_BYTES // 2


async def test_a_user_taken_off_a_private_room_during_its_replay_gets_no_more_of_it(
    store: RecordingStore,
) -> None:
    hub = await make_hub(store)
    alice = SlowConnection("alice")
    await login(hub, alice)
    await hub.join(alice.member, "secret", None)
    await store.commit(*(AppendMessage(room_message(i, "secret")) for i in range(1, 61)))
    alice.take_all()
    alice.received.clear()

    replay = Replay()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(
            lambda: replay.run(
                hub, alice.member, room="secret", with_user=None, after=0, limit=60, ref="h"
            )
        )
        await alice.wait_until_paced()
        sent_before = len(alice.outbox)
        hub.configure_rooms({**ROOMS, "secret": RoomSettings("Shh", frozenset({"carol"}))})
        await alice.drain_until(lambda: replay.done)
    assert [m.id for m in alice.messages()] == list(range(1, sent_before + 1))
    assert replay.error is ErrorCode.NOT_MEMBER
    assert not any(isinstance(envelope, HistoryEnd) for envelope in alice.received)


async def test_a_replay_of_everything_leaves_out_a_room_left_during_it(
    store: RecordingStore,
) -> None:
    hub = await make_hub(store)
    bob = SlowConnection("bob")
    await login(hub, bob)
    await hub.join(bob.member, "news", None)
    await store.commit(
        *(AppendMessage(room_message(i, "news" if i % 2 else "lobby")) for i in range(1, 61)),
        AppendMessage(direct_message(61)),
    )
    bob.take_all()
    bob.received.clear()

    replay = Replay()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(
            lambda: replay.run(
                hub, bob.member, room=None, with_user=None, after=0, limit=100, ref="h"
            )
        )
        await bob.wait_until_paced()
        sent_before = len(bob.outbox)
        await hub.leave(bob.member, "news", None)
        await bob.drain_until(lambda: replay.done)
    assert replay.error is None
    ids = [m.id for m in bob.messages()]
    assert ids[:sent_before] == list(range(1, sent_before + 1))
    assert ids[sent_before:] == [i for i in range(sent_before + 1, 61) if i % 2 == 0] + [61]
    assert bob.received[-1] == HistoryEnd(last=61, more=False, ref="h")


# --- stored direct messages at login -------------------------------------------------------


async def test_stored_direct_messages_are_read_a_few_at_a_time_and_all_marked_delivered(
    store: RecordingStore,
) -> None:
    await store.commit(*(AppendMessage(direct_message(i), delivered=False) for i in range(1, 101)))
    hub = await make_hub(store)
    bob = SlowConnection("bob")
    await login(hub, bob)
    store.watched = bob.outbox
    delivered = trio.Event()

    async def deliver() -> None:
        await hub.deliver_stored(bob.member)
        delivered.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(deliver)
        await bob.drain_until(delivered.is_set)
    assert [m.id for m in bob.messages()] == list(range(1, 101))
    assert max(store.reads) <= READ_ROWS
    assert max(store.queued_at_read) <= QUEUE_BYTES // 2
    await flush(store)
    assert await store.undelivered("bob") == []
    again = await online(hub, "bob")
    await hub.deliver_stored(again.member)
    assert await again.messages() == []


async def test_stored_direct_messages_not_handed_over_before_a_disconnect_come_at_next_login(
    store: RecordingStore,
) -> None:
    await store.commit(*(AppendMessage(direct_message(i), delivered=False) for i in range(1, 101)))
    hub = await make_hub(store)
    bob = SlowConnection("bob")
    await login(hub, bob)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(hub.deliver_stored, bob.member)
        await bob.wait_until_paced()
        bob.take_all()
        await bob.wait_until_paced()
        bob.outbox.close()  # the connection is gone
    bob.take_all()  # what it was sent before it went
    first = [m.id for m in bob.messages()]
    hub.logout(bob.member)
    await flush(store)

    again = await online(hub, "bob")
    await hub.deliver_stored(again.member)
    second = [m.id for m in await again.messages()]
    assert sorted(set(first) | set(second)) == list(range(1, 101))  # none lost
    assert second == sorted(second)
    # Only the read being handed over at the disconnect was not marked delivered.
    assert len(set(first) & set(second)) <= READ_ROWS


async def test_a_direct_message_sent_during_a_long_backlog_is_delivered_once(
    store: RecordingStore,
) -> None:
    await store.commit(*(AppendMessage(direct_message(i), delivered=False) for i in range(1, 41)))
    hub = await make_hub(store)
    alice = await online(hub, "alice")
    bob = SlowConnection("bob")
    await login(hub, bob)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(hub.deliver_stored, bob.member)
        await bob.wait_until_paced()
        await hub.dm(alice.member, "bob", "live", "d1")
        await flush(store)
        await bob.drain_until(lambda: len(bob.messages()) >= 41)
    await flush(store)
    bob.take_all()
    texts = [m.text for m in bob.messages()]
    assert texts.count("live") == 1
    assert sorted(m.id for m in bob.messages() if m.text != "live") == list(range(1, 41))


async def test_stored_direct_messages_whose_delivery_is_cancelled_come_at_next_login(
    store: RecordingStore,
) -> None:
    await store.commit(*(AppendMessage(direct_message(i), delivered=False) for i in range(1, 31)))
    hub = await make_hub(store)
    bob = SlowConnection("bob")
    await login(hub, bob)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(hub.deliver_stored, bob.member)
        await bob.wait_until_paced()
        nursery.cancel_scope.cancel()  # the connection's tasks are cancelled mid-read
    hub.logout(bob.member)
    await flush(store)

    again = await online(hub, "bob")
    await hub.deliver_stored(again.member)
    assert [m.id for m in await again.messages()] == list(range(1, 31))
