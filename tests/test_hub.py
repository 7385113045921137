"""Unit tests for securechat.hub: per-connection outboxes and message fan-out (no I/O).

The hub tests run on a :class:`~securechat.memory_store.MemoryStore`, whose
commits happen when the test says so (``flush``): what is queued for the
store is not committed, and nothing waits on it is delivered, before that.
(tests/test_store.py checks that it answers like the SQLite store the server
runs.) What a connection received is read back from its outbox and parsed
like a client would.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from securechat.config import RoomSettings
from securechat.delivery import DeferredWakeups, Outbox, Peer
from securechat.hub import Hub, load_state
from securechat.memory_store import MemoryStore
from securechat.protocol import (
    LOBBY,
    Ack,
    Error,
    ErrorCode,
    HistoryEnd,
    Joined,
    Kicked,
    Left,
    Members,
    Message,
    Presence,
    ProtocolError,
    RoomInfo,
    RoomList,
    RoomTopic,
    ServerEnvelope,
    parse_server_frame,
    utc_timestamp,
)
from securechat.store import (
    QUEUE_SIZE,
    AddMember,
    PeerScope,
    RecentSend,
    RoomScope,
    SaveRoom,
    Snapshot,
    Store,
    StoredRoom,
)

# --- helpers -----------------------------------------------------------------


class OverflowCounter:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> None:
        self.calls += 1


def outbox(
    max_frames: int = 100, max_bytes: int = 1 << 20, *, later: DeferredWakeups | None = None
) -> tuple[Outbox, OverflowCounter]:
    counter = OverflowCounter()
    return Outbox(max_frames, max_bytes, counter, later=later), counter


async def next_batch(box: Outbox) -> bytes | None:
    """What a writer does: wait for frames, then take a batch (None once closed and empty)."""
    await box.wait_for_frames()
    return box.take()


async def waiting_writer(nursery: trio.Nursery, box: Outbox) -> list[bytes | None]:
    """Start a writer that takes one batch from ``box``; returns, once it waits, the list
    its batch will be appended to."""
    received: list[bytes | None] = []

    async def writer() -> None:
        received.append(await next_batch(box))

    nursery.start_soon(writer)
    await trio.testing.wait_all_tasks_blocked()
    return received


def member(name: str, max_frames: int = 100, max_bytes: int = 1 << 20) -> Peer:
    box, _ = outbox(max_frames, max_bytes)
    return Peer(username=name, outbox=box)


def queued(box: Outbox) -> list[bytes]:
    """Everything in ``box`` right now, as the frames that were put (white-box peek)."""
    return box._frames[box._head :]


# --- Outbox ----------------------------------------------------------------------


async def test_get_batch_returns_a_single_frame_as_is() -> None:
    box, _ = outbox()
    frame = b'{"type":"pong"}\n'
    box.put(frame)
    assert await next_batch(box) is frame
    assert len(box) == 0


async def test_get_batch_joins_queued_frames_into_one_bytes() -> None:
    box, _ = outbox()
    for frame in (b"a\n", b"bb\n", b"ccc\n"):
        box.put(frame)
    assert len(box) == 3
    batch = await next_batch(box)
    assert batch == b"a\nbb\nccc\n"
    assert isinstance(batch, bytes)
    assert len(box) == 0


async def test_get_batch_waits_for_a_put() -> None:
    box, _ = outbox()
    async with trio.open_nursery() as nursery:
        received = await waiting_writer(nursery, box)
        assert received == []
        box.put(b"late\n")
    assert received == [b"late\n"]


async def test_a_cancelled_wait_leaves_the_outbox_usable_by_the_next_writer() -> None:
    box, _ = outbox()
    with trio.move_on_after(0.01) as scope:
        await box.wait_for_frames()  # nothing comes: cancelled by the deadline
    assert scope.cancelled_caught
    async with trio.open_nursery() as nursery:
        received = await waiting_writer(nursery, box)
        box.put(b"after\n")
    assert received == [b"after\n"]


async def test_a_second_task_waiting_on_one_outbox_is_refused() -> None:
    box, _ = outbox()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(box.wait_for_frames)
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(RuntimeError, match="already waiting"):
            await box.wait_for_frames()
        box.put(b"x\n")  # the first waiter is still the writer, and wakes
    assert box.take() == b"x\n"


async def test_a_frame_that_is_not_urgent_waits_for_the_deferred_wakeup() -> None:
    later = DeferredWakeups()
    box, _ = outbox(later=later)
    async with trio.open_nursery() as nursery:
        received = await waiting_writer(nursery, box)
        box.put(b"presence 1\n", urgent=False)
        box.put(b"presence 2\n", urgent=False)
        await trio.testing.wait_all_tasks_blocked()
        assert received == []  # queued, but the writer was not woken
        later.wake_all()
    assert received == [b"presence 1\npresence 2\n"]  # one wake-up, one batch


async def test_an_urgent_frame_takes_queued_frames_that_are_not_urgent_along_in_order() -> None:
    later = DeferredWakeups()
    box, _ = outbox(later=later)
    async with trio.open_nursery() as nursery:
        received = await waiting_writer(nursery, box)
        box.put(b"presence\n", urgent=False)
        box.put(b"message\n")
    assert received == [b"presence\nmessage\n"]
    later.wake_all()  # the wake-up owed earlier is now harmless: nothing is queued
    assert len(box) == 0


async def test_without_deferred_wakeups_a_frame_that_is_not_urgent_wakes_the_writer() -> None:
    box, _ = outbox()
    async with trio.open_nursery() as nursery:
        received = await waiting_writer(nursery, box)
        box.put(b"presence\n", urgent=False)
    assert received == [b"presence\n"]


async def test_close_wakes_a_waiting_get_batch_with_none() -> None:
    box, _ = outbox()
    async with trio.open_nursery() as nursery:
        received = await waiting_writer(nursery, box)
        box.close()
    assert received == [None]


async def test_close_lets_get_batch_drain_then_returns_none() -> None:
    box, counter = outbox()
    box.put(b"one\n")
    box.put(b"two\n")
    box.close()
    assert box.closed
    assert await next_batch(box) == b"one\ntwo\n"
    assert await next_batch(box) is None
    assert await next_batch(box) is None
    assert counter.calls == 0


async def test_farewell_put_before_close_is_delivered_after_the_queue() -> None:
    box, _ = outbox()
    box.put(b"m1\n")
    box.put(b"bye\n")
    box.close()
    box.put(b"after close\n")  # ignored
    assert await next_batch(box) == b"m1\nbye\n"
    assert await next_batch(box) is None


async def test_put_after_close_is_ignored() -> None:
    box, counter = outbox(max_frames=1)
    box.close()
    box.put(b"x\n")
    box.put(b"y\n")  # would overflow an open outbox
    assert len(box) == 0
    assert counter.calls == 0
    assert await next_batch(box) is None


async def test_overflow_by_count_calls_on_overflow_once_closes_and_drops_the_queue() -> None:
    box, counter = outbox(max_frames=3)
    for i in range(3):
        box.put(b"%d\n" % i)
    assert counter.calls == 0
    assert not box.closed
    box.put(b"3\n")
    assert counter.calls == 1
    assert box.closed
    assert len(box) == 0
    box.put(b"4\n")
    box.put(b"5\n")
    assert counter.calls == 1
    assert await next_batch(box) is None


async def test_overflow_by_bytes_calls_on_overflow_once_closes_and_drops_the_queue() -> None:
    box, counter = outbox(max_bytes=10)
    box.put(b"12345\n")
    box.put(b"123\n")  # exactly 10 bytes: still fine
    assert counter.calls == 0
    assert len(box) == 2
    box.put(b"\n")
    assert counter.calls == 1
    assert box.closed
    assert len(box) == 0
    box.put(b"\n")
    assert counter.calls == 1
    assert await next_batch(box) is None


def test_a_single_frame_larger_than_max_bytes_overflows() -> None:
    box, counter = outbox(max_bytes=10)
    box.put(b"x" * 11)
    assert counter.calls == 1
    assert len(box) == 0


async def test_draining_frees_room_in_the_outbox_once_the_writer_is_back() -> None:
    box, counter = outbox(max_frames=2, max_bytes=8)
    for _ in range(5):
        box.put(b"abc\n")
        box.put(b"def\n")
        assert await next_batch(box) == b"abc\ndef\n"
        assert box.take() is None  # the writer is back: that batch was sent
    assert counter.calls == 0
    assert not box.closed


def test_a_taken_batch_counts_against_max_bytes_until_the_writer_is_back() -> None:
    box, counter = outbox(max_frames=10, max_bytes=8)
    box.put(b"abc\n")
    box.put(b"def\n")
    assert box.take() == b"abc\ndef\n"  # the writer holds it while the peer is slow
    box.put(b"!")
    assert counter.calls == 1


def test_take_returns_at_most_batch_bytes_and_leaves_the_rest_in_order() -> None:
    box = Outbox(100, 1 << 20, OverflowCounter(), batch_bytes=10)
    for frame in (b"aaaa\n", b"bbbb\n", b"cccc\n", b"d\n"):
        box.put(frame)
    assert box.take() == b"aaaa\nbbbb\n"
    assert len(box) == 2
    assert box.take() == b"cccc\nd\n"
    assert box.take() is None


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.one_of(st.integers(min_value=1, max_value=25), st.none()), min_size=1, max_size=200)
)
def test_take_keeps_order_and_batch_bounds_whatever_the_puts_and_takes(
    steps: list[int | None],
) -> None:
    """Puts (a frame of that many bytes) and takes (None) in any order: every frame comes
    out once, in order, in batches of at most batch_bytes or one larger frame, and the
    queue's length agrees with what is left (the queue is a list and an index)."""
    box = Outbox(10_000, 1 << 20, OverflowCounter(), batch_bytes=20)
    put: list[bytes] = []
    taken: list[bytes] = []
    for number, step in enumerate(steps):
        if step is None:
            batch = box.take()
            if batch is not None:
                assert len(batch) <= 20 or batch in put
                taken.append(batch)
        else:
            frame = bytes([65 + number % 26]) * step
            put.append(frame)
            box.put(frame)
        assert b"".join(taken) + b"".join(queued(box)) == b"".join(put)
        assert len(box) == len(queued(box))
    while (batch := box.take()) is not None:
        taken.append(batch)
    assert b"".join(taken) == b"".join(put)
    assert len(box) == 0
    assert box.queued_bytes == 0


def test_a_frame_larger_than_batch_bytes_is_taken_whole_and_as_is() -> None:
    box = Outbox(100, 1 << 20, OverflowCounter(), batch_bytes=10)
    large, small = b"x" * 30 + b"\n", b"y\n"
    box.put(large)
    box.put(small)
    assert box.take() is large
    assert box.take() is small


async def test_a_bulk_reply_waits_until_the_writer_has_sent_the_batch_it_took() -> None:
    box, counter = outbox(max_bytes=100)
    box.put(b"x" * 60)  # more than half full
    waited: list[bool] = []

    async def bulk_reply() -> None:
        await box.wait_for_room()
        waited.append(True)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(bulk_reply)
        await trio.testing.wait_all_tasks_blocked()
        assert box.take() == b"x" * 60
        await trio.testing.wait_all_tasks_blocked()
        assert waited == []  # taken, but still being sent
        assert box.take() is None  # the writer is back
    assert waited == [True]
    assert counter.calls == 0


# --- Hub: helpers ----------------------------------------------------------------------

USERS = ("alice", "bob", "carol", "dave")
ROOMS = {
    "secret": RoomSettings(topic="Shh", allowed=frozenset({"alice", "carol"})),
    "news": RoomSettings(topic="Announcements"),
}


class Conn:
    """One logged-in connection as a test sees it: its Peer, outbox and disconnects."""

    def __init__(self, username: str, *, admin: bool = False) -> None:
        self.disconnects: list[Error] = []
        self.outbox = Outbox(1000, 1 << 22, lambda: None)
        self.member = Peer(username, self.outbox, admin=admin, disconnect=self.disconnects.append)

    def frames(self) -> list[bytes]:
        """The frames queued right now, as the hub put them (not removed)."""
        return queued(self.outbox)

    async def take(self) -> list[ServerEnvelope]:
        """Everything queued since the last take, parsed, and removed from the outbox."""
        envelopes: list[ServerEnvelope] = []
        while len(self.outbox):  # one batch at a time, as the writer takes them
            batch = await next_batch(self.outbox)  # returns at once: frames are queued
            assert batch is not None
            envelopes.extend(parse_server_frame(line) for line in batch.splitlines())
        return envelopes

    async def messages(self) -> list[Message]:
        return [envelope for envelope in await self.take() if isinstance(envelope, Message)]


async def make_hub(store: Store, *, allow_room_create: bool = True) -> Hub:
    """A hub on what ``store`` holds now: how the server starts (or restarts)."""
    return Hub(
        store,
        await load_state(store),
        users=USERS,
        rooms=ROOMS,
        allow_room_create=allow_room_create,
    )


@pytest.fixture
async def hub_store() -> tuple[Hub, MemoryStore]:
    """A Hub on a MemoryStore whose commits wait for the test (``flush``)."""
    store = MemoryStore()
    return await make_hub(store), store


async def flush(store: MemoryStore) -> None:
    """Commit every write queued so far, and run its callbacks (fan-out, acks)."""
    store.commit_pending()
    await trio.lowlevel.checkpoint()


async def snapshot(store: Store) -> Snapshot:
    """What a restarted server would start from."""
    return await load_state(store)


async def room_history(store: Store, room: str, after: int | None, limit: int) -> list[Message]:
    return await store.messages(await store.history_ids(RoomScope(room), after, limit))


async def direct_history(
    store: Store, user: str, peer: str, after: int | None, limit: int
) -> list[Message]:
    return await store.messages(await store.history_ids(PeerScope(user, peer), after, limit))


async def online(hub: Hub, username: str, *, admin: bool = False) -> Conn:
    conn = Conn(username, admin=admin)
    await hub.login(conn.member)
    return conn


async def drain(store: MemoryStore, *conns: Conn) -> None:
    """Let pending writes settle, then forget what ``conns`` received so far."""
    await flush(store)
    for conn in conns:
        await conn.take()


@contextlib.contextmanager
def refused(code: ErrorCode) -> Iterator[None]:
    with pytest.raises(ProtocolError) as caught:
        yield
    assert caught.value.code is code


def only_message(envelopes: list[ServerEnvelope]) -> Message:
    assert len(envelopes) >= 1
    message = envelopes[0]
    assert isinstance(message, Message)
    return message


# --- Hub: login and presence -----------------------------------------------------------


async def test_login_puts_the_user_in_the_lobby_persistently_and_returns_their_rooms(
    hub_store: tuple[Hub, MemoryStore],
) -> None:
    hub, store = hub_store
    alice = Conn("alice")
    assert await hub.login(alice.member) == ["lobby"]
    assert hub.online_users() == ["alice"]
    await flush(store)
    assert (await snapshot(store)).memberships == {"lobby": {"alice"}}

    await hub.join(alice.member, "dev", None)
    assert await hub.login(Conn("alice").member) == ["dev", "lobby"]
    # A hub rebuilt on the same store (a restart) knows the memberships.
    assert (await make_hub(store)).rooms_of("alice") == ["dev", "lobby"]


async def test_a_hub_starts_from_the_snapshot_it_is_given_without_reading_the_store() -> None:
    state = Snapshot(
        last_message_id=41,
        rooms={"dev": StoredRoom("Release week"), "vault": StoredRoom("", frozenset({"bob"}))},
        memberships={"dev": frozenset({"alice"}), "lobby": frozenset({"alice", "bob"})},
        recent_sends=(RecentSend("alice", "c1", 40, utc_timestamp(datetime.now(UTC))),),
    )
    store = MemoryStore()  # empty: everything the hub knows comes from the snapshot
    hub = Hub(store, state, users=USERS, rooms=ROOMS)
    assert hub.rooms_of("alice") == ["dev", "lobby"]
    assert [room.name for room in hub.room_list("alice").rooms] == [
        "dev",
        "lobby",
        "news",
        "secret",
    ]
    alice = await online(hub, "alice")
    assert hub.topic(alice.member, "dev", None).topic == "Release week"
    await hub.say(alice.member, "lobby", "sent before the restart", "c1")
    assert await alice.take() == [Ack(ref="c1", id=40)]  # a re-send: not stored again
    await hub.say(alice.member, "lobby", "new", "c2")
    await flush(store)
    # A new message (its id is the store's to give: tests/test_store.py).
    assert [e.ref for e in await alice.take() if isinstance(e, Ack)] == ["c2"]


async def test_online_presence_goes_to_others_only_on_a_users_first_connection(
    hub_store: tuple[Hub, MemoryStore],
) -> None:
    hub, store = hub_store
    bob = await online(hub, "bob")
    await drain(store, bob)

    alice1 = await online(hub, "alice")
    assert await bob.take() == [Presence(username="alice", state="online")]
    assert await alice1.take() == []

    alice2 = await online(hub, "alice")
    assert await bob.take() == []
    assert await alice1.take() == []
    assert await alice2.take() == []


async def test_offline_presence_only_when_the_last_connection_logs_out(
    hub_store: tuple[Hub, MemoryStore],
) -> None:
    hub, store = hub_store
    alice1 = await online(hub, "alice")
    alice2 = await online(hub, "alice")
    bob = await online(hub, "bob")
    await hub.join(alice1.member, "dev", None)
    await hub.join(bob.member, "dev", None)
    await drain(store, alice1, alice2, bob)

    hub.logout(alice1.member)
    assert await bob.take() == []
    assert hub.online_users() == ["alice", "bob"]

    hub.logout(alice2.member)
    # Once, though they share two rooms.
    assert await bob.take() == [Presence(username="alice", state="offline")]
    assert hub.online_users() == ["bob"]

    hub.logout(alice2.member)  # a second logout changes nothing
    assert await bob.take() == []
    assert await alice1.take() == []
    assert await alice2.take() == []


async def listing(hub: Hub, username: str) -> Conn:
    """A connection that asked for presence lists (``hello`` ``features``)."""
    conn = Conn(username)
    await hub.login(conn.member, presence_lists=True)
    return conn


@pytest.fixture
async def holding_hub() -> tuple[Hub, MemoryStore]:
    """A hub that holds presence for list-takers until ``online.flush_presence()``."""
    store = MemoryStore()
    hub = Hub(store, await load_state(store), users=USERS, rooms=ROOMS, presence_delay=1.0)
    return hub, store


async def test_presence_lists_hold_changes_then_one_frame_per_state_with_final_states(
    holding_hub: tuple[Hub, MemoryStore],
) -> None:
    hub, store = holding_hub
    alice = await listing(hub, "alice")
    carol = await online(hub, "carol")  # an older client: one frame per change, as before
    hub.online.flush_presence()
    await drain(store, alice, carol)

    bob1 = await listing(hub, "bob")
    bob2 = await listing(hub, "bob")  # a second connection: no change
    dave = await listing(hub, "dave")
    hub.logout(dave.member)  # came and went within the window: told as offline
    await flush(store)
    assert await alice.take() == []  # held
    assert await carol.take() == [
        Presence(username="bob", state="online"),
        Presence(username="dave", state="online"),
        Presence(username="dave", state="offline"),
    ]

    hub.online.flush_presence()
    assert await alice.take() == [
        Presence(users=["bob"], state="online"),
        Presence(users=["dave"], state="offline"),
    ]
    # Never told about itself; the same bytes for both of bob's connections.
    assert bob1.frames() == bob2.frames()
    assert await bob1.take() == [Presence(users=["dave"], state="offline")]
    assert await carol.take() == []
    hub.online.flush_presence()  # nothing held: nothing sent
    assert await alice.take() == []

    hub.logout(bob1.member)
    hub.logout(carol.member)
    hub.online.flush_presence()
    assert await alice.take() == [Presence(users=["carol"], state="offline")]
    hub.logout(bob2.member)
    hub.online.flush_presence()
    assert await alice.take() == [Presence(users=["bob"], state="offline")]


async def test_held_presence_goes_before_a_message_and_a_who_answer(
    holding_hub: tuple[Hub, MemoryStore],
) -> None:
    hub, store = holding_hub
    alice = await listing(hub, "alice")
    await drain(store, alice)

    bob = await listing(hub, "bob")
    await drain(store, bob)
    await hub.say(bob.member, LOBBY, "hi", "m1")
    await flush(store)
    received = await alice.take()
    assert received[0] == Presence(users=["bob"], state="online")
    assert isinstance(received[1], Message)
    assert received[1].text == "hi"

    hub.logout(bob.member)
    await flush(store)
    assert await alice.take() == []  # held
    members = hub.who(alice.member, LOBBY, "w1")
    assert members.online == ["alice"]
    # The change was put before the answer is returned (the session sends it then).
    assert await alice.take() == [Presence(users=["bob"], state="offline")]


async def test_presence_lists_reach_each_connection_once_with_what_it_shares(
    holding_hub: tuple[Hub, MemoryStore],
) -> None:
    hub, store = holding_hub
    alice = await listing(hub, "alice")
    bob = await listing(hub, "bob")
    carol = await listing(hub, "carol")
    for conn in (alice, bob):
        await hub.join(conn.member, "dev", None)
    await hub.leave(carol.member, LOBBY, None)
    await hub.join(carol.member, "news", None)  # shares no room with alice and bob
    await drain(store, alice, bob, carol)
    hub.online.flush_presence()
    await drain(store, alice, bob, carol)

    dave = await listing(hub, "dave")
    await hub.join(dave.member, "news", None)  # sent after dave's held "online"
    await drain(store, dave)
    assert await alice.take() == [Presence(users=["dave"], state="online")]
    # Not in the lobby when dave came: not told (as an older client would not be).
    assert await carol.take() == [Presence(room="news", username="dave", state="joined")]

    hub.logout(bob.member)  # lobby and dev
    hub.logout(carol.member)  # news
    hub.online.flush_presence()
    assert await alice.take() == [Presence(users=["bob"], state="offline")]  # once, not twice
    assert await dave.take() == [Presence(users=["bob", "carol"], state="offline")]


async def test_the_presence_clock_waits_longer_while_changes_keep_coming(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = MemoryStore()
    hub = Hub(store, await load_state(store), users=USERS, rooms=ROOMS, presence_delay=0.2)
    alice = await listing(hub, "alice")
    hub.online.flush_presence()  # alice's own online: to nobody
    start = trio.current_time()

    async def told_at(when: float, presence: Presence) -> None:
        await trio.sleep_until(start + when - 0.001)
        assert alice.frames() == []
        await trio.sleep_until(start + when + 0.001)
        assert await alice.take() == [presence]

    async with trio.open_nursery() as nursery:
        nursery.start_soon(hub.run_presence)
        await trio.sleep_until(start + 0.1)
        bob = await listing(hub, "bob")
        await told_at(0.2, Presence(users=["bob"], state="online"))  # one delay
        await trio.sleep_until(start + 0.3)
        await listing(hub, "carol")
        await told_at(0.6, Presence(users=["carol"], state="online"))  # a storm: 2 delays
        await trio.sleep_until(start + 0.7)
        await listing(hub, "dave")
        await told_at(1.4, Presence(users=["dave"], state="online"))  # 4 delays
        # The next wait is 5 delays (the most), ends at 2.4 with nothing held: back to one.
        await trio.sleep_until(start + 2.5)
        hub.logout(bob.member)
        await told_at(2.6, Presence(users=["bob"], state="offline"))
        nursery.cancel_scope.cancel()


async def test_online_and_offline_go_once_to_each_connection_sharing_a_room_same_bytes(
    hub_store: tuple[Hub, MemoryStore],
) -> None:
    hub, store = hub_store
    bob1 = await online(hub, "bob")
    bob2 = await online(hub, "bob")
    carol = await online(hub, "carol")  # shares only the lobby with alice
    dave = await online(hub, "dave")
    await hub.join(bob1.member, "dev", None)
    await hub.join(bob1.member, "ops", None)
    await hub.leave(dave.member, "lobby", None)  # shares no room with alice
    alice = await online(hub, "alice")
    await hub.join(alice.member, "dev", None)
    await hub.join(alice.member, "ops", None)
    hub.logout(alice.member)
    await drain(store, bob1, bob2, carol, dave)

    alice = await online(hub, "alice")  # a member of lobby, dev and ops
    frames = [conn.frames() for conn in (bob1, bob2, carol)]
    assert [len(each) for each in frames] == [1, 1, 1]
    assert frames[0][0] is frames[1][0] is frames[2][0]  # encoded once
    assert parse_server_frame(frames[0][0]) == Presence(username="alice", state="online")
    assert dave.frames() == []
    assert alice.frames() == []
    await drain(store, bob1, bob2, carol)

    hub.logout(alice.member)
    for conn in (bob1, bob2, carol):
        assert await conn.take() == [Presence(username="alice", state="offline")]
    assert await dave.take() == []


# --- Hub: rooms --------------------------------------------------------------------------


async def test_join_creates_a_room_and_persists_it(hub_store: tuple[Hub, MemoryStore]) -> None:
    hub, store = hub_store
    alice = await online(hub, "alice")
    await hub.join(alice.member, "dev", "j1")
    assert await alice.take() == [Joined(room="dev", topic="", members=["alice"], ref="j1")]
    # join returns after the commit.
    assert (await snapshot(store)).rooms["dev"] == StoredRoom("", None)
    assert (await snapshot(store)).memberships["dev"] == {"alice"}
    assert hub.rooms_of("alice") == ["dev", "lobby"]
    assert "dev" in [room.name for room in (await make_hub(store)).room_list("bob").rooms]


async def test_join_tells_the_others_and_every_connection_of_the_joining_user(
    hub_store: tuple[Hub, MemoryStore],
) -> None:
    hub, store = hub_store
    alice1 = await online(hub, "alice")
    alice2 = await online(hub, "alice")
    bob = await online(hub, "bob")
    carol = await online(hub, "carol")
    await hub.join(bob.member, "dev", None)
    await drain(store, alice1, alice2, bob, carol)

    await hub.join(alice1.member, "dev", "j1")
    assert await alice1.take() == [Joined(room="dev", topic="", members=["alice", "bob"], ref="j1")]
    assert await alice2.take() == [Joined(room="dev", topic="", members=["alice", "bob"])]
    assert await bob.take() == [Presence(room="dev", username="alice", state="joined")]
    assert await carol.take() == []
    assert (await snapshot(store)).memberships["dev"] == {"alice", "bob"}

    # Both of alice's connections are now in the room.
    await hub.say(bob.member, "dev", "welcome", None)
    await flush(store)
    assert [m.text for m in await alice1.messages()] == ["welcome"]
    assert [m.text for m in await alice2.messages()] == ["welcome"]


async def test_joining_a_room_again_only_repeats_joined(hub_store: tuple[Hub, MemoryStore]) -> None:
    hub, store = hub_store
    alice = await online(hub, "alice")
    bob = await online(hub, "bob")
    await hub.join(alice.member, "dev", None)
    await hub.join(bob.member, "dev", None)
    await drain(store, alice, bob)

    await hub.join(alice.member, "dev", "again")
    assert await alice.take() == [
        Joined(room="dev", topic="", members=["alice", "bob"], ref="again")
    ]
    assert await bob.take() == []


async def test_join_of_a_private_room_by_a_user_not_allowed_is_forbidden(
    hub_store: tuple[Hub, MemoryStore],
) -> None:
    hub, store = hub_store
    bob = await online(hub, "bob")
    carol = await online(hub, "carol")
    await drain(store, bob, carol)

    with refused(ErrorCode.FORBIDDEN):
        await hub.join(bob.member, "secret", "j1")
    assert await bob.take() == []
    assert hub.rooms_of("bob") == ["lobby"]
    assert "secret" not in (await snapshot(store)).memberships

    await hub.join(carol.member, "secret", "j2")  # carol is allowed
    assert await carol.take() == [Joined(room="secret", topic="Shh", members=["carol"], ref="j2")]


async def test_join_of_an_unknown_room_is_unknown_room_when_rooms_cannot_be_created(
    hub_store: tuple[Hub, MemoryStore],
) -> None:
    _, store = hub_store
    hub = await make_hub(store, allow_room_create=False)
    alice = await online(hub, "alice")
    with refused(ErrorCode.UNKNOWN_ROOM):
        await hub.join(alice.member, "dev", "j1")
    assert await alice.take() == []
    assert (await snapshot(store)).rooms == {}
    assert "dev" not in [room.name for room in hub.room_list("alice").rooms]

    await hub.join(alice.member, "news", "j2")  # configured rooms can still be joined
    assert await alice.take() == [
        Joined(room="news", topic="Announcements", members=["alice"], ref="j2")
    ]


async def test_leave_sends_left_to_every_connection_and_presence_left_to_the_room(
    hub_store: tuple[Hub, MemoryStore],
) -> None:
    hub, store = hub_store
    alice1 = await online(hub, "alice")
    alice2 = await online(hub, "alice")
    bob = await online(hub, "bob")
    await hub.join(alice1.member, "dev", None)
    await hub.join(bob.member, "dev", None)
    await drain(store, alice1, alice2, bob)

    await hub.leave(alice1.member, "dev", "l1")
    assert await alice1.take() == [Left(room="dev", ref="l1")]
    assert await alice2.take() == [Left(room="dev")]
    assert await bob.take() == [Presence(room="dev", username="alice", state="left")]
    assert hub.rooms_of("alice") == ["lobby"]
    await flush(store)
    assert (await snapshot(store)).memberships["dev"] == {"bob"}

    # alice's connections no longer get the room's messages.
    await hub.say(bob.member, "dev", "still here?", None)
    await flush(store)
    assert await alice1.take() == []
    assert await alice2.take() == []
    assert [m.text for m in await bob.messages()] == ["still here?"]


async def test_leave_of_a_room_not_in_is_not_member(hub_store: tuple[Hub, MemoryStore]) -> None:
    hub, store = hub_store
    alice = await online(hub, "alice")
    await drain(store, alice)
    with refused(ErrorCode.NOT_MEMBER):
        await hub.leave(alice.member, "news", "l1")  # exists, alice is not in it
    with refused(ErrorCode.NOT_MEMBER):
        await hub.leave(alice.member, "nowhere", "l2")  # does not exist
    assert await alice.take() == []
    assert hub.rooms_of("alice") == ["lobby"]


async def test_who_lists_the_rooms_members_and_which_of_them_are_online(
    hub_store: tuple[Hub, MemoryStore],
) -> None:
    hub, _ = hub_store
    alice = await online(hub, "alice")
    bob = await online(hub, "bob")
    carol = await online(hub, "carol")
    await hub.join(alice.member, "dev", None)
    await hub.join(bob.member, "dev", None)
    hub.logout(bob.member)

    assert hub.who(carol.member, "dev", "w1") == Members(
        room="dev", online=["alice"], members=["alice", "bob"], ref="w1"
    )
    assert hub.who(alice.member, "lobby", None) == Members(
        room="lobby", online=["alice", "carol"], members=["alice", "bob", "carol"]
    )


async def test_who_of_a_private_or_unknown_room_is_refused(
    hub_store: tuple[Hub, MemoryStore],
) -> None:
    hub, _ = hub_store
    alice = await online(hub, "alice")
    bob = await online(hub, "bob")
    await hub.join(alice.member, "secret", None)
    with refused(ErrorCode.FORBIDDEN):
        hub.who(bob.member, "secret", None)
    with refused(ErrorCode.UNKNOWN_ROOM):
        hub.who(bob.member, "nowhere", None)
    assert hub.who(alice.member, "secret", None).members == ["alice"]


async def test_room_list_hides_private_rooms_from_users_not_allowed_to_join_them(
    hub_store: tuple[Hub, MemoryStore],
) -> None:
    hub, _ = hub_store
    alice = await online(hub, "alice")
    bob = await online(hub, "bob")
    await hub.join(alice.member, "dev", None)
    await hub.join(bob.member, "dev", None)
    await hub.join(alice.member, "secret", None)

    public = [
        RoomInfo(name="dev", topic="", members=2),
        RoomInfo(name="lobby", topic="", members=2),
        RoomInfo(name="news", topic="Announcements", members=0),
    ]
    assert hub.room_list("bob", "r1") == RoomList(rooms=public, ref="r1")
    everything = [*public, RoomInfo(name="secret", topic="Shh", members=1)]
    assert hub.room_list("alice", None).rooms == everything
    assert hub.room_list("carol", None).rooms == everything  # allowed, not a member
    assert hub.room_list(None, None).rooms == everything  # the operator sees every room


# --- Hub: room messages --------------------------------------------------------------------


async def test_say_delivers_the_same_bytes_to_every_connection_in_the_room_after_commit(
    hub_store: tuple[Hub, MemoryStore],
) -> None:
    hub, store = hub_store
    alice1 = await online(hub, "alice")
    alice2 = await online(hub, "alice")
    bob = await online(hub, "bob")
    carol = await online(hub, "carol")  # in the lobby only
    await hub.join(alice1.member, "dev", None)
    await hub.join(bob.member, "dev", None)
    await drain(store, alice1, alice2, bob, carol)

    await hub.say(alice1.member, "dev", "hello", "s1")
    # Nothing is delivered or acknowledged before the commit.
    assert [conn.frames() for conn in (alice1, alice2, bob, carol)] == [[], [], [], []]
    await flush(store)

    [frame] = bob.frames()
    assert len(alice1.frames()) == 2
    assert alice1.frames()[0] is frame
    assert alice2.frames()[0] is frame
    assert len(alice2.frames()) == 1
    assert carol.frames() == []

    message = parse_server_frame(frame)
    assert isinstance(message, Message)
    assert (message.room, message.to, message.sender, message.text) == (
        "dev",
        None,
        "alice",
        "hello",
    )
    # The sender gets its ack after its own copy of the message.
    assert parse_server_frame(alice1.frames()[1]) == Ack(ref="s1", id=message.id)
    assert await room_history(store, "dev", None, 10) == [message]


async def test_say_to_a_room_not_in_is_not_member(hub_store: tuple[Hub, MemoryStore]) -> None:
    hub, store = hub_store
    alice = await online(hub, "alice")
    bob = await online(hub, "bob")
    await hub.join(bob.member, "dev", None)
    await drain(store, alice, bob)
    with refused(ErrorCode.NOT_MEMBER):
        await hub.say(alice.member, "dev", "let me in", "s1")
    with refused(ErrorCode.NOT_MEMBER):
        await hub.say(alice.member, "nowhere", "hello?", "s2")
    await flush(store)
    assert await alice.take() == []
    assert await bob.take() == []
    assert (await snapshot(store)).last_message_id == 0


async def test_message_ids_increase_and_continue_after_the_hub_is_rebuilt_on_the_same_store() -> (
    None
):
    store = MemoryStore()
    hub = await make_hub(store)
    alice = await online(hub, "alice")
    await hub.join(alice.member, "dev", None)
    await drain(store, alice)
    for text in ("one", "two", "three"):
        await hub.say(alice.member, "lobby", text, None)
    await hub.dm(alice.member, "bob", "psst", None)
    await hub.say(alice.member, "dev", "four", None)
    await flush(store)
    received = await alice.take()
    assert [e.id for e in received if isinstance(e, Message)] == [1, 2, 3, 4, 5]
    assert [e.id for e in received if isinstance(e, Ack)] == [1, 2, 3, 4, 5]

    # A restart: a new hub on what the store holds.
    hub = await make_hub(store)
    alice = await online(hub, "alice")
    assert hub.rooms_of("alice") == ["dev", "lobby"]
    await hub.say(alice.member, "dev", "five", None)
    await hub.say(alice.member, "lobby", "six", None)
    await flush(store)
    received = await alice.take()
    assert [e.id for e in received if isinstance(e, Ack)] == [6, 7]
    assert [m.id for m in await room_history(store, "lobby", None, 10)] == [1, 2, 3, 7]


# --- Hub: idempotent sends -------------------------------------------------------------------


async def test_a_client_id_sent_again_before_and_after_the_commit_is_stored_once(
    hub_store: tuple[Hub, MemoryStore],
) -> None:
    hub, store = hub_store
    alice1 = await online(hub, "alice")
    alice2 = await online(hub, "alice")
    bob = await online(hub, "bob")
    await drain(store, alice1, alice2, bob)

    await hub.say(alice1.member, "lobby", "once", "c1")
    await hub.say(alice1.member, "lobby", "once", "c1")  # before the first is committed
    await flush(store)
    await hub.say(alice1.member, "lobby", "once", "c1")  # after
    await hub.say(alice2.member, "lobby", "once", "c1")  # from another connection of alice
    await flush(store)

    [stored] = await room_history(store, "lobby", None, 10)
    ack = Ack(ref="c1", id=stored.id)
    assert await alice1.take() == [stored, ack, ack, ack]
    assert await alice2.take() == [stored, ack]
    assert await bob.take() == [stored]

    # Client ids are per user: bob's "c1" is a message of its own.
    await hub.say(bob.member, "lobby", "mine", "c1")
    await flush(store)
    assert await bob.take() == [
        *await room_history(store, "lobby", stored.id, 10),
        Ack(ref="c1", id=stored.id + 1),
    ]


async def test_a_client_id_sent_again_after_the_hub_is_rebuilt_gets_its_original_id() -> None:
    store = MemoryStore()
    hub = await make_hub(store)
    alice = await online(hub, "alice")
    await hub.say(alice.member, "lobby", "hello", "c1")
    await hub.dm(alice.member, "bob", "psst", "c2")
    await hub.say(alice.member, "lobby", "no id", None)
    await flush(store)
    acks = [e for e in await alice.take() if isinstance(e, Ack)]
    assert acks == [Ack(ref="c1", id=1), Ack(ref="c2", id=2, stored=True), Ack(id=3)]

    # A restart: a new hub on what the store holds.
    hub = await make_hub(store)
    alice = await online(hub, "alice")
    await hub.say(alice.member, "lobby", "hello", "c1")
    await hub.dm(alice.member, "bob", "psst", "c2")
    await flush(store)
    assert await alice.take() == [Ack(ref="c1", id=1), Ack(ref="c2", id=2)]
    assert (await snapshot(store)).last_message_id == 3


# --- Hub: direct messages ---------------------------------------------------------------------


async def test_dm_reaches_every_connection_of_both_sides_after_commit(
    hub_store: tuple[Hub, MemoryStore],
) -> None:
    hub, store = hub_store
    alice1 = await online(hub, "alice")
    alice2 = await online(hub, "alice")
    bob = await online(hub, "bob")
    carol = await online(hub, "carol")
    await drain(store, alice1, alice2, bob, carol)

    await hub.dm(alice1.member, "bob", "just you", "d1")
    assert [conn.frames() for conn in (alice1, alice2, bob, carol)] == [[], [], [], []]
    await flush(store)

    [frame] = bob.frames()
    assert alice1.frames()[0] is frame
    assert alice2.frames() == [frame]
    assert alice2.frames()[0] is frame
    assert carol.frames() == []
    message = parse_server_frame(frame)
    assert isinstance(message, Message)
    assert (message.room, message.to, message.sender, message.text) == (
        None,
        "bob",
        "alice",
        "just you",
    )
    assert parse_server_frame(alice1.frames()[1]) == Ack(ref="d1", id=message.id)
    assert len(alice1.frames()) == 2
    assert await direct_history(store, "bob", "alice", None, 10) == [message]
    await flush(store)  # the "delivered" mark is written by the commit callback, one batch later
    assert await store.undelivered("bob") == []


async def test_dm_to_an_unknown_user_is_unknown_user(hub_store: tuple[Hub, MemoryStore]) -> None:
    hub, store = hub_store
    alice = await online(hub, "alice")
    await drain(store, alice)
    with refused(ErrorCode.UNKNOWN_USER):
        await hub.dm(alice.member, "zed", "anyone there?", "d1")
    await flush(store)
    assert await alice.take() == []
    assert (await snapshot(store)).last_message_id == 0


async def test_dm_to_an_offline_user_is_stored_and_delivered_once_at_their_next_login(
    hub_store: tuple[Hub, MemoryStore],
) -> None:
    hub, store = hub_store
    alice = await online(hub, "alice")
    await drain(store, alice)

    await hub.dm(alice.member, "bob", "when you are back", "d1")
    await flush(store)
    message = only_message(await alice.take())
    assert await store.undelivered("bob") == [message]

    bob1 = await online(hub, "bob")
    await hub.deliver_stored(bob1.member)
    assert await bob1.take() == [message]
    await flush(store)
    assert await store.undelivered("bob") == []

    bob2 = await online(hub, "bob")
    await hub.deliver_stored(bob2.member)
    await flush(store)
    assert await bob2.take() == []
    assert await bob1.take() == []

    # Also after a restart: the delivery was saved.
    rebuilt = await make_hub(store)
    bob3 = await online(rebuilt, "bob")
    await rebuilt.deliver_stored(bob3.member)
    assert await bob3.take() == []


async def test_dm_to_a_user_who_logs_in_before_the_commit_is_delivered_live_and_marked(
    hub_store: tuple[Hub, MemoryStore],
) -> None:
    hub, store = hub_store
    alice = await online(hub, "alice")
    hub.logout((await online(hub, "bob")).member)  # bob is known (in the lobby), now offline
    await drain(store, alice)

    await hub.dm(alice.member, "bob", "racing", "d1")
    bob = await online(hub, "bob")  # no checkpoint: the commit callback has not run yet
    await flush(store)
    await flush(store)  # the callback's MarkDelivered is queued behind the first flush
    [message] = await bob.messages()
    assert message.text == "racing"
    assert await store.undelivered("bob") == []


async def test_a_dm_committed_while_its_recipient_logs_in_is_delivered_once() -> None:
    store = MemoryStore()
    hub = await make_hub(store)
    alice = await online(hub, "alice")
    await drain(store, alice)

    await hub.dm(alice.member, "bob", "exactly once", "d1")
    # Committed (undelivered); its callback has not run yet.
    store.commit_pending(run_callbacks=False)
    bob = await online(hub, "bob")
    await hub.deliver_stored(bob.member)
    store.run_callbacks()
    await flush(store)
    assert [m.text for m in await bob.messages()] == ["exactly once"]


async def test_a_dm_whose_recipient_logs_out_before_the_commit_is_stored_for_their_next_login() -> (
    None
):
    # Whether it is stored is decided at the commit, by whether the recipient is online then.
    store = MemoryStore()
    hub = await make_hub(store)
    alice = await online(hub, "alice")
    bob = await online(hub, "bob")
    await drain(store, alice, bob)

    await hub.dm(alice.member, "bob", "are you there", "d1")
    # Committed (undelivered); its callback has not run yet.
    store.commit_pending(run_callbacks=False)
    hub.logout(bob.member)
    store.run_callbacks()
    await flush(store)
    assert await bob.messages() == []
    acks = [e for e in await alice.take() if isinstance(e, Ack)]
    assert acks == [Ack(ref="d1", id=1, stored=True)]

    bob_again = await online(hub, "bob")
    await hub.deliver_stored(bob_again.member)
    assert [m.text for m in await bob_again.messages()] == ["are you there"]


# --- Hub: history ------------------------------------------------------------------------------


async def test_history_of_a_room_replays_its_messages_then_history_end(
    hub_store: tuple[Hub, MemoryStore],
) -> None:
    hub, store = hub_store
    alice = await online(hub, "alice")
    bob = await online(hub, "bob")
    await hub.join(alice.member, "dev", None)
    for i in range(1, 6):
        await hub.say(alice.member, "lobby", f"lobby {i}", None)
        await hub.say(alice.member, "dev", f"dev {i}", None)
    await drain(store, alice, bob)
    lobby = await room_history(store, "lobby", 0, 100)
    assert [m.text for m in lobby] == [f"lobby {i}" for i in range(1, 6)]

    await hub.history(bob.member, room="lobby", with_user=None, after=None, limit=2, ref="h1")
    assert await bob.take() == [
        *lobby[-2:],
        HistoryEnd(room="lobby", last=lobby[-1].id, more=True, ref="h1"),
    ]
    await hub.history(bob.member, room="lobby", with_user=None, after=0, limit=3, ref="h2")
    assert await bob.take() == [
        *lobby[:3],
        HistoryEnd(room="lobby", last=lobby[2].id, more=True, ref="h2"),
    ]
    await hub.history(
        bob.member, room="lobby", with_user=None, after=lobby[2].id, limit=3, ref="h3"
    )
    assert await bob.take() == [
        *lobby[3:],
        HistoryEnd(room="lobby", last=lobby[-1].id, more=False, ref="h3"),
    ]
    await hub.history(
        bob.member, room="lobby", with_user=None, after=lobby[-1].id, limit=3, ref="h4"
    )
    assert await bob.take() == [HistoryEnd(room="lobby", last=lobby[-1].id, more=False, ref="h4")]


async def test_history_of_an_empty_room_ends_at_zero(hub_store: tuple[Hub, MemoryStore]) -> None:
    hub, store = hub_store
    alice = await online(hub, "alice")
    await drain(store, alice)
    await hub.history(alice.member, room="lobby", with_user=None, after=None, limit=10, ref=None)
    assert await alice.take() == [HistoryEnd(room="lobby", last=0, more=False)]


async def test_history_of_a_room_not_in_is_not_member(hub_store: tuple[Hub, MemoryStore]) -> None:
    hub, store = hub_store
    alice = await online(hub, "alice")
    bob = await online(hub, "bob")
    await hub.join(alice.member, "dev", None)
    await hub.join(alice.member, "secret", None)
    await hub.say(alice.member, "dev", "members only", None)
    await drain(store, alice, bob)
    for room in ("dev", "secret", "news", "nowhere"):
        with refused(ErrorCode.NOT_MEMBER):
            await hub.history(bob.member, room=room, with_user=None, after=None, limit=10, ref="h")
    assert await bob.take() == []


async def test_history_with_a_peer_replays_the_direct_conversation(
    hub_store: tuple[Hub, MemoryStore],
) -> None:
    hub, store = hub_store
    alice = await online(hub, "alice")
    bob = await online(hub, "bob")
    await hub.dm(alice.member, "bob", "hi bob", None)
    await hub.dm(alice.member, "carol", "hi carol", None)
    await hub.dm(bob.member, "alice", "hi alice", None)
    await hub.say(alice.member, "lobby", "hi all", None)
    await drain(store, alice, bob)

    await hub.history(alice.member, room=None, with_user="bob", after=None, limit=10, ref="h1")
    received = await alice.take()
    assert [(m.sender, m.to, m.text) for m in received if isinstance(m, Message)] == [
        ("alice", "bob", "hi bob"),
        ("bob", "alice", "hi alice"),
    ]
    assert received[-1] == HistoryEnd(peer="bob", last=3, more=False, ref="h1")
    assert len(received) == 3


async def test_history_without_a_scope_is_own_rooms_and_own_direct_messages_only(
    hub_store: tuple[Hub, MemoryStore],
) -> None:
    hub, store = hub_store
    alice = await online(hub, "alice")
    bob = await online(hub, "bob")
    carol = await online(hub, "carol")
    await hub.join(alice.member, "dev", None)
    await hub.say(alice.member, "lobby", "for everyone", None)
    await hub.say(alice.member, "dev", "for dev", None)
    await hub.dm(alice.member, "bob", "alice to bob", None)
    await hub.dm(carol.member, "dave", "carol to dave", None)
    await hub.dm(bob.member, "carol", "bob to carol", None)
    await hub.say(carol.member, "lobby", "carol in the lobby", None)
    await drain(store, alice, bob, carol)

    await hub.history(bob.member, room=None, with_user=None, after=None, limit=10, ref="h1")
    received = await bob.take()
    assert [m.text for m in received if isinstance(m, Message)] == [
        "for everyone",
        "alice to bob",
        "bob to carol",
        "carol in the lobby",
    ]
    assert received[-1] == HistoryEnd(last=6, more=False, ref="h1")

    await hub.history(bob.member, room=None, with_user=None, after=None, limit=2, ref="h2")
    received = await bob.take()
    assert [m.text for m in received if isinstance(m, Message)] == [
        "bob to carol",
        "carol in the lobby",
    ]
    assert received[-1] == HistoryEnd(last=6, more=True, ref="h2")


# --- Hub: moderation and the operator --------------------------------------------------------


async def test_kick_disconnects_every_connection_of_the_user_with_kicked(
    hub_store: tuple[Hub, MemoryStore],
) -> None:
    hub, _ = hub_store
    alice = await online(hub, "alice", admin=True)
    bob1 = await online(hub, "bob")
    bob2 = await online(hub, "bob")
    carol = await online(hub, "carol")

    assert hub.kick("bob", by="alice", reason="spam", ref="k1") == Kicked(username="bob", ref="k1")
    expected = Error(code=ErrorCode.KICKED, message="kicked by alice: spam")
    assert bob1.disconnects == [expected]
    assert bob2.disconnects == [expected]
    assert alice.disconnects == []
    assert carol.disconnects == []

    assert hub.kick("carol", by="alice", reason=None) == Kicked(username="carol")
    assert carol.disconnects == [Error(code=ErrorCode.KICKED, message="kicked by alice")]


async def test_kick_of_a_user_who_is_not_online_is_unknown_user(
    hub_store: tuple[Hub, MemoryStore],
) -> None:
    hub, _ = hub_store
    bob = await online(hub, "bob")
    hub.logout(bob.member)
    for username in ("bob", "carol", "nobody"):
        with refused(ErrorCode.UNKNOWN_USER):
            hub.kick(username, by="alice", reason=None)
    assert bob.disconnects == []


async def test_disconnect_user_calls_disconnect_of_every_connection_of_that_user(
    hub_store: tuple[Hub, MemoryStore],
) -> None:
    hub, _ = hub_store
    alice = await online(hub, "alice")
    bob1 = await online(hub, "bob")
    bob2 = await online(hub, "bob")
    error = Error(code=ErrorCode.AUTH_FAILED, message="account removed")
    hub.disconnect_user("bob", error)
    hub.disconnect_user("carol", error)  # offline: nothing to do
    assert bob1.disconnects == [error]
    assert bob2.disconnects == [error]
    assert alice.disconnects == []


async def test_announce_stores_one_server_message_per_room_and_delivers_it(
    hub_store: tuple[Hub, MemoryStore],
) -> None:
    hub, store = hub_store
    alice = await online(hub, "alice")
    bob = await online(hub, "bob")
    carol = await online(hub, "carol")
    await hub.join(alice.member, "dev", None)
    await hub.join(carol.member, "secret", None)
    await drain(store, alice, bob, carol)

    assert await hub.announce("restart at noon") == 4  # lobby, secret, news, dev
    await flush(store)
    stored: dict[str, Message] = {}
    for room in ("lobby", "secret", "news", "dev"):
        [stored[room]] = await room_history(store, room, None, 10)
        assert (stored[room].sender, stored[room].text) == ("server", "restart at noon")
    assert sorted(m.id for m in stored.values()) == [1, 2, 3, 4]

    def by_room(messages: list[Message]) -> dict[str | None, Message]:
        return {m.room: m for m in messages}

    assert by_room(await alice.messages()) == {"lobby": stored["lobby"], "dev": stored["dev"]}
    assert by_room(await bob.messages()) == {"lobby": stored["lobby"]}
    assert by_room(await carol.messages()) == {
        "lobby": stored["lobby"],
        "secret": stored["secret"],
    }


# --- Hub: the store failing -----------------------------------------------------------------


async def test_say_and_dm_on_a_closed_store_reply_unavailable_with_the_ref_and_deliver_nothing(
    hub_store: tuple[Hub, MemoryStore],
) -> None:
    hub, store = hub_store
    alice = await online(hub, "alice")
    bob = await online(hub, "bob")
    await drain(store, alice, bob)
    store.close()

    await hub.say(alice.member, "lobby", "lost", "s1")
    await hub.dm(alice.member, "bob", "lost too", "d1")
    received = await alice.take()
    assert [(e.code, e.ref) for e in received if isinstance(e, Error)] == [
        (ErrorCode.UNAVAILABLE, "s1"),
        (ErrorCode.UNAVAILABLE, "d1"),
    ]
    assert len(received) == 2
    assert await bob.take() == []
    assert (await snapshot(store)).last_message_id == 0


async def test_say_whose_write_fails_replies_unavailable_and_the_client_id_can_be_retried(
    hub_store: tuple[Hub, MemoryStore],
) -> None:
    hub, store = hub_store
    alice = await online(hub, "alice")
    bob = await online(hub, "bob")
    await drain(store, alice, bob)

    await hub.say(alice.member, "lobby", "try me", "s1")
    store.fail_next()
    await flush(store)
    [error] = await alice.take()
    assert isinstance(error, Error)
    assert (error.code, error.ref) == (ErrorCode.UNAVAILABLE, "s1")
    assert await bob.take() == []

    await hub.say(alice.member, "lobby", "try me", "s1")
    await flush(store)
    [stored] = await room_history(store, "lobby", None, 10)
    assert await alice.take() == [stored, Ack(ref="s1", id=stored.id)]
    assert await bob.take() == [stored]


async def test_join_on_a_closed_store_is_unavailable_and_changes_no_membership(
    hub_store: tuple[Hub, MemoryStore],
) -> None:
    hub, store = hub_store
    alice = await online(hub, "alice")
    await drain(store, alice)
    store.close()
    with refused(ErrorCode.UNAVAILABLE):
        await hub.join(alice.member, "dev", "j1")
    with refused(ErrorCode.UNAVAILABLE):
        await hub.join(alice.member, "news", "j2")
    assert await alice.take() == []
    assert hub.rooms_of("alice") == ["lobby"]


async def test_a_join_that_cannot_create_its_room_leaves_no_room_behind(
    hub_store: tuple[Hub, MemoryStore],
) -> None:
    hub, store = hub_store
    alice = await online(hub, "alice")
    await drain(store, alice)
    store.close()
    with refused(ErrorCode.UNAVAILABLE):
        await hub.join(alice.member, "dev", "j1")
    assert "dev" not in [room.name for room in hub.room_list("alice").rooms]


# --- Hub: configuration reload ------------------------------------------------------------


async def test_a_user_taken_off_a_private_rooms_list_is_out_of_the_room_at_once(
    hub_store: tuple[Hub, MemoryStore],
) -> None:
    hub, store = hub_store
    alice = await online(hub, "alice")
    carol = await online(hub, "carol")
    await hub.join(alice.member, "secret", None)
    await hub.join(carol.member, "secret", None)
    await drain(store, alice, carol)

    hub.configure_rooms({"secret": RoomSettings(topic="Shh", allowed=frozenset({"carol"}))})
    assert await alice.take() == [Left(room="secret")]
    assert hub.rooms_of("alice") == ["lobby"]
    assert hub.rooms_of("carol") == ["lobby", "secret"]
    await hub.say(carol.member, "secret", "just us now", None)
    await flush(store)
    assert await alice.take() == []
    assert [m.text for m in await carol.messages()] == ["just us now"]


async def test_a_user_taken_off_a_private_rooms_list_stays_out_after_a_restart(
    hub_store: tuple[Hub, MemoryStore],
) -> None:
    hub, store = hub_store
    alice = await online(hub, "alice")
    await hub.join(alice.member, "secret", None)
    hub.configure_rooms({"secret": RoomSettings(topic="Shh", allowed=frozenset({"carol"}))})
    hub.configure_rooms(ROOMS)  # alice may join again, but has not
    await flush(store)
    assert hub.rooms_of("alice") == ["lobby"]
    assert (await make_hub(store)).rooms_of("alice") == ["lobby"]  # a restart with the same config


# --- Hub: actions (/me) and stored direct messages -------------------------------------------


async def test_an_action_is_delivered_stored_and_replayed_as_an_action(
    hub_store: tuple[Hub, MemoryStore],
) -> None:
    hub, store = hub_store
    alice = await online(hub, "alice")
    bob = await online(hub, "bob")
    await drain(store, alice, bob)

    await hub.say(alice.member, "lobby", "waves", "s1", action=True)
    await hub.say(alice.member, "lobby", "plain", "s2")
    await hub.dm(alice.member, "bob", "nods", "d1", action=True)
    await flush(store)
    received = await bob.messages()
    assert [(m.text, m.action) for m in received] == [
        ("waves", True),
        ("plain", None),
        ("nods", True),
    ]
    assert await room_history(store, "lobby", None, 10) == received[:2]
    assert await direct_history(store, "bob", "alice", None, 10) == received[2:]

    await hub.history(bob.member, room=None, with_user=None, after=0, limit=10, ref="h")
    replayed = await bob.messages()
    assert replayed == received


async def test_a_plain_message_frame_has_no_action_field(
    hub_store: tuple[Hub, MemoryStore],
) -> None:
    hub, store = hub_store
    alice = await online(hub, "alice")
    await drain(store, alice)
    await hub.say(alice.member, "lobby", "plain", None)
    await flush(store)
    assert b"action" not in alice.frames()[0]


async def test_the_ack_of_a_dm_says_stored_when_the_recipient_had_no_connection(
    hub_store: tuple[Hub, MemoryStore],
) -> None:
    hub, store = hub_store
    alice = await online(hub, "alice")
    bob = await online(hub, "bob")
    await drain(store, alice, bob)

    await hub.dm(alice.member, "bob", "you are here", "d1")
    await hub.dm(alice.member, "alice", "note to self", "d2")
    await hub.dm(alice.member, "carol", "when you are back", "d3")
    await hub.say(alice.member, "lobby", "room message", "s1")
    await flush(store)
    acks = [e for e in await alice.take() if isinstance(e, Ack)]
    assert [(ack.ref, ack.stored) for ack in acks] == [
        ("d1", None),
        ("d2", None),
        ("d3", True),
        ("s1", None),
    ]


async def test_an_admin_sets_a_topic_stored_then_announced_to_the_room_same_bytes(
    hub_store: tuple[Hub, MemoryStore],
) -> None:
    hub, store = hub_store
    alice1 = await online(hub, "alice", admin=True)
    alice2 = await online(hub, "alice", admin=True)
    bob = await online(hub, "bob")
    carol = await online(hub, "carol")  # not in dev
    await hub.join(alice1.member, "dev", None)
    await hub.join(bob.member, "dev", None)
    await drain(store, alice1, alice2, bob, carol)
    assert hub.room_list("bob").rooms[0] == RoomInfo(name="dev", topic="", members=2)

    await hub.set_topic(alice1.member, "dev", "Release week", "t1")
    # Nothing is announced before the commit.
    assert [conn.frames() for conn in (alice1, alice2, bob, carol)] == [[], [], [], []]
    await flush(store)

    [frame] = bob.frames()
    assert alice2.frames() == [frame]
    assert alice2.frames()[0] is frame
    assert parse_server_frame(frame) == RoomTopic(room="dev", topic="Release week", by="alice")
    assert await alice1.take() == [
        RoomTopic(room="dev", topic="Release week", by="alice", ref="t1")
    ]
    assert carol.frames() == []
    assert (await snapshot(store)).rooms["dev"].topic == "Release week"
    # The cached answers see it, and a rebuilt hub (a restart) too.
    assert hub.room_list("bob").rooms[0] == RoomInfo(name="dev", topic="Release week", members=2)
    assert hub.topic(carol.member, "dev", "r") == RoomTopic(
        room="dev", topic="Release week", ref="r"
    )
    await hub.join(carol.member, "dev", None)
    assert (await carol.take())[0] == Joined(
        room="dev", topic="Release week", members=["alice", "bob", "carol"]
    )
    assert (await make_hub(store)).topic(carol.member, "dev", None).topic == "Release week"
    await drain(store, alice1, alice2, bob, carol)

    await hub.set_topic(alice1.member, "dev", "", None)  # "" clears it
    await flush(store)
    assert await bob.take() == [RoomTopic(room="dev", topic="", by="alice")]
    assert (await snapshot(store)).rooms["dev"].topic == ""


async def test_an_admin_sets_the_topic_of_a_room_they_are_not_in(
    hub_store: tuple[Hub, MemoryStore],
) -> None:
    hub, store = hub_store
    alice = await online(hub, "alice", admin=True)
    bob = await online(hub, "bob")
    await hub.join(bob.member, "dev", None)
    await drain(store, alice, bob)
    await hub.set_topic(alice.member, "dev", "Tidy up", "t1")
    await flush(store)
    assert await alice.take() == [RoomTopic(room="dev", topic="Tidy up", by="alice", ref="t1")]
    assert await bob.take() == [RoomTopic(room="dev", topic="Tidy up", by="alice")]


async def test_setting_a_topic_is_refused_to_non_admins_and_for_rooms_the_file_sets(
    hub_store: tuple[Hub, MemoryStore],
) -> None:
    hub, store = hub_store
    alice = await online(hub, "alice", admin=True)
    bob = await online(hub, "bob")
    dave = await online(hub, "dave", admin=True)  # an admin not on secret's list
    await hub.join(alice.member, "dev", None)
    await drain(store, alice, bob, dave)

    with refused(ErrorCode.FORBIDDEN):
        await hub.set_topic(bob.member, "dev", "mine now", "t1")
    with pytest.raises(ProtocolError) as caught:
        await hub.set_topic(alice.member, "news", "not from the file", "t2")
    assert caught.value.code is ErrorCode.FORBIDDEN
    assert caught.value.message == "the topic of this room is set in the config file"
    with refused(ErrorCode.UNKNOWN_ROOM):
        await hub.set_topic(alice.member, "nowhere", "x", "t3")
    with refused(ErrorCode.FORBIDDEN):
        await hub.set_topic(dave.member, "secret", "x", "t4")
    with refused(ErrorCode.FORBIDDEN):
        hub.topic(bob.member, "secret", "t5")
    with refused(ErrorCode.UNKNOWN_ROOM):
        hub.topic(bob.member, "nowhere", "t6")
    assert hub.topic(bob.member, "news", "t7") == RoomTopic(
        room="news", topic="Announcements", ref="t7"
    )
    await flush(store)
    for conn in (alice, bob, dave):
        assert await conn.take() == []
    assert (await snapshot(store)).rooms["news"].topic == "Announcements"


async def test_a_reload_that_sets_a_topic_announces_it_and_one_that_drops_it_frees_it(
    hub_store: tuple[Hub, MemoryStore],
) -> None:
    hub, store = hub_store
    alice = await online(hub, "alice", admin=True)
    bob = await online(hub, "bob")
    await hub.join(alice.member, "dev", None)
    await hub.join(bob.member, "dev", None)
    await hub.set_topic(alice.member, "dev", "Set by alice", None)
    await drain(store, alice, bob)

    hub.configure_rooms({**ROOMS, "dev": RoomSettings(topic="From the file")})
    assert await bob.take() == [RoomTopic(room="dev", topic="From the file", by="server")]
    with refused(ErrorCode.FORBIDDEN):
        await hub.set_topic(alice.member, "dev", "mine again", None)
    hub.configure_rooms({**ROOMS, "dev": RoomSettings(topic="From the file")})  # unchanged
    assert await bob.take() == []
    await flush(store)
    assert (await snapshot(store)).rooms["dev"].topic == "From the file"

    # In the file without a topic, or out of the file: the admins' again, as it was left.
    hub.configure_rooms({**ROOMS, "dev": RoomSettings()})
    assert await bob.take() == []
    assert hub.topic(bob.member, "dev", None).topic == "From the file"
    await hub.set_topic(alice.member, "dev", "Admins again", None)
    hub.configure_rooms(ROOMS)
    await flush(store)
    assert (await snapshot(store)).rooms["dev"].topic == "Admins again"
    await hub.set_topic(alice.member, "dev", "Still ours", None)
    await flush(store)
    assert [e.topic for e in await bob.take() if isinstance(e, RoomTopic)] == [
        "Admins again",
        "Still ours",
    ]


async def test_a_reload_that_sets_the_topic_while_an_admins_change_is_in_flight_wins() -> None:
    store = MemoryStore()
    hub = await make_hub(store)
    alice = await online(hub, "alice", admin=True)
    bob = await online(hub, "bob")
    await hub.join(bob.member, "dev", None)
    await drain(store, alice, bob)

    await hub.set_topic(alice.member, "dev", "too late", "t1")
    # Committed; its callback (the topic applied and announced) has not run yet.
    store.commit_pending(run_callbacks=False)
    hub.configure_rooms({**ROOMS, "dev": RoomSettings(topic="From the file")})
    store.run_callbacks()
    await flush(store)
    [error] = await alice.take()
    assert isinstance(error, Error)
    assert (error.code, error.ref) == (ErrorCode.FORBIDDEN, "t1")
    assert await bob.take() == [RoomTopic(room="dev", topic="From the file", by="server")]
    assert (await snapshot(store)).rooms["dev"].topic == "From the file"
    assert hub.topic(bob.member, "dev", None).topic == "From the file"


async def test_a_reload_that_changes_a_rooms_list_keeps_an_admins_topic_in_flight() -> None:
    store = MemoryStore()
    hub = await make_hub(store)
    alice = await online(hub, "alice", admin=True)
    await hub.join(alice.member, "dev", None)
    await drain(store, alice)

    await hub.set_topic(alice.member, "dev", "kept", "t1")
    # Committed; its callback (the topic applied and announced) has not run yet.
    store.commit_pending(run_callbacks=False)
    # The file now lists who may join dev, and sets no topic for it.
    hub.configure_rooms({**ROOMS, "dev": RoomSettings(allowed=frozenset({"alice"}))})
    store.run_callbacks()
    await flush(store)
    assert await alice.take() == [RoomTopic(room="dev", topic="kept", by="alice", ref="t1")]
    assert (await snapshot(store)).rooms["dev"] == StoredRoom("kept", frozenset({"alice"}))
    assert (await make_hub(store)).topic(alice.member, "dev", None).topic == "kept"


async def test_a_topic_that_cannot_be_stored_is_unavailable_and_changes_nothing(
    hub_store: tuple[Hub, MemoryStore],
) -> None:
    hub, store = hub_store
    alice = await online(hub, "alice", admin=True)
    bob = await online(hub, "bob")
    await hub.join(alice.member, "dev", None)
    await hub.join(bob.member, "dev", None)
    await drain(store, alice, bob)
    await hub.set_topic(alice.member, "dev", "lost", "t1")
    store.fail_next()
    await flush(store)
    [error] = await alice.take()
    assert isinstance(error, Error)
    assert (error.code, error.ref) == (ErrorCode.UNAVAILABLE, "t1")
    assert await bob.take() == []
    assert hub.topic(bob.member, "dev", None).topic == ""
    assert alice.member.unsettled == 0


def test_save_room_without_a_topic_keeps_the_stored_one() -> None:
    assert SaveRoom("dev", None).topic is None


async def test_two_devices_back_in_the_lobby_at_once_announce_online_once() -> None:
    # The lobby write of a login waits while the store's queue is full; a
    # second device logging in meanwhile must not make both stay quiet.
    store = MemoryStore()
    hub = await make_hub(store)
    bob = await online(hub, "bob")
    first = await online(hub, "alice")
    await hub.leave(first.member, LOBBY, None)
    hub.logout(first.member)
    await drain(store, bob)
    for _ in range(QUEUE_SIZE):  # someone else's writes fill the store's queue
        store.commit_then_nowait(AddMember("news", "carol"), lambda error: None)
    phone, laptop = Conn("alice"), Conn("alice")
    with trio.fail_after(10):  # a hang here is the bug, not a slow machine
        async with trio.open_nursery() as nursery:
            nursery.start_soon(hub.login, phone.member)  # waits for room in the queue
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(hub.login, laptop.member)
            await trio.testing.wait_all_tasks_blocked()
            store.commit_pending()
    await flush(store)
    presences = [e for e in await bob.take() if isinstance(e, Presence)]
    assert presences == [Presence(username="alice", state="online")]
