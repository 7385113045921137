"""Unit tests for the Store interface and its implementations.

SqliteStore runs on a real SQLite database on disk with its real tasks. The
tests of what any store must do (the ``store`` fixture) run on both
SqliteStore and MemoryStore, so that the hub's tests, which run on
MemoryStore, test the hub against the behaviour the server has.
"""

from __future__ import annotations

import contextlib
import random
import sqlite3
import stat
import threading
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

import securechat.sqlite_store
from securechat.memory_store import MemoryStore
from securechat.protocol import Message, utc_timestamp
from securechat.redis_store import RedisStore
from securechat.sqlite_store import PRUNE_BATCH, SqliteStore, pages_to_release
from securechat.store import (
    AddMember,
    Appended,
    AppendMessage,
    Draft,
    HistoryScope,
    MarkDelivered,
    PeerScope,
    Pruned,
    RecentSend,
    RemoveMember,
    Retention,
    RoomScope,
    SaveRoom,
    Snapshot,
    Store,
    StoredRoom,
    StoreError,
    Then,
    VisibleScope,
    Write,
)

from .conftest import WAIT, redis_store, running
from .redis_server import RedisServer
from .redis_server import redis_server as private_redis_server

EPOCH = "1970-01-01T00:00:00.000Z"
FUTURE = "9999-01-01T00:00:00.000Z"
TS = "2026-01-02T03:04:05.678Z"

# --- helpers -----------------------------------------------------------------


class CountingStore(SqliteStore):
    """A SqliteStore that records the size of every transaction it commits."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.transactions: list[int] = []

    def _commit(self, writes: list[Write]) -> None:
        super()._commit(writes)
        self.transactions.append(len(writes))


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "x.db"


@pytest.fixture(params=["sqlite", "memory", "redis"])
async def store(request: pytest.FixtureRequest, db_path: Path) -> AsyncIterator[Store]:
    """Each implementation, its tasks running (MemoryStore commits at each turn; RedisStore
    on a private redis-server)."""
    if request.param == "redis":
        async with (
            private_redis_server(db_path.parent / "redis") as server,
            redis_store(server) as in_redis,
            running(in_redis) as store,
        ):
            yield store
        return
    implementation: Store = SqliteStore(db_path) if request.param == "sqlite" else MemoryStore()
    async with running(implementation) as store:
        yield store


@pytest.fixture
async def sqlite_store(db_path: Path) -> AsyncIterator[SqliteStore]:
    async with running(SqliteStore(db_path)) as store:
        yield store


async def snapshot(store: Store, recent_per_user: int = 10, recent_since: str = FUTURE) -> Snapshot:
    return await store.load(recent_per_user=recent_per_user, recent_since=recent_since)


async def page(store: Store, scope: HistoryScope, after: int | None, limit: int) -> list[Message]:
    return await store.messages(await store.history_ids(scope, after, limit))


async def room_history(store: Store, room: str, after: int | None, limit: int) -> list[Message]:
    return await page(store, RoomScope(room), after, limit)


async def direct_history(
    store: Store, user: str, peer: str, after: int | None, limit: int
) -> list[Message]:
    return await page(store, PeerScope(user, peer), after, limit)


async def visible_history(
    store: Store, user: str, rooms: Iterable[str], after: int | None, limit: int
) -> list[Message]:
    return await page(store, VisibleScope(user, tuple(rooms)), after, limit)


async def prune(store: Store, retention: Retention, now: float, *, batch: int) -> Pruned:
    """``store.prune``; a SqliteStore's in batches of ``batch`` (its loops are under test)."""
    if isinstance(store, SqliteStore):
        return await store.prune(retention, now, batch=batch)
    return await store.prune(retention, now)


def room_message(id_: int, room: str = "lobby", sender: str = "alice") -> Message:
    return Message(id=id_, room=room, sender=sender, text=f"message {id_}", ts=TS)


def direct_message(id_: int, sender: str, to: str) -> Message:
    return Message(id=id_, to=to, sender=sender, text=f"dm {id_}", ts=TS)


class Outcomes:
    """Callbacks that record (label, error) in the order they are called."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, StoreError | None]] = []
        self._changed = trio.Event()

    def done(self, label: int) -> Then:
        def callback(error: StoreError | None) -> None:
            self.calls.append((label, error))
            self._changed.set()

        return callback

    async def wait_for(self, count: int) -> None:
        """Until ``count`` callbacks have run."""
        with trio.fail_after(WAIT):
            while len(self.calls) < count:
                self._changed = trio.Event()
                await self._changed.wait()


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def last_stored_id(path: Path) -> int:
    """The highest message id in the database, as another connection sees it now."""
    with contextlib.closing(sqlite3.connect(path)) as db:
        return int(db.execute("SELECT COALESCE(MAX(id), 0) FROM messages").fetchone()[0])


# --- opening -----------------------------------------------------------------------


async def test_opening_creates_the_parent_directory_a_private_file_and_the_schema(
    tmp_path: Path,
) -> None:
    path = tmp_path / "new" / "dir" / "x.db"
    async with running(SqliteStore(path)) as store:
        await store.commit(SaveRoom("dev", ""))
        assert path.parent.is_dir()
        assert mode(path) == 0o600
        # While the database is open in WAL mode, its -wal and -shm files exist too.
        assert mode(Path(f"{path}-wal")) == 0o600
        assert mode(Path(f"{path}-shm")) == 0o600
    with contextlib.closing(sqlite3.connect(path)) as db:
        names = {row[0] for row in db.execute("SELECT name FROM sqlite_master")}
        journal_mode = db.execute("PRAGMA journal_mode").fetchone()[0]
    assert {"messages", "rooms", "memberships"} <= names
    assert {
        "messages_by_room",
        "messages_by_recipient",
        "messages_by_sender",
        "messages_undelivered",
    } <= names
    assert journal_mode == "wal"


async def test_opening_an_existing_database_keeps_its_file_mode(db_path: Path) -> None:
    async with running(SqliteStore(db_path)):
        pass
    await trio.Path(db_path).chmod(0o640)
    async with running(SqliteStore(db_path)) as store:
        assert (await snapshot(store)).last_message_id == 0
    assert mode(db_path) == 0o640


def test_a_directory_path_cannot_be_opened(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="cannot open the database") as caught:
        SqliteStore(tmp_path)
    assert str(tmp_path) in str(caught.value)


def test_a_path_under_a_regular_file_cannot_be_opened(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(StoreError, match="cannot open the database"):
        SqliteStore(blocker / "x.db")


# --- messages and history ------------------------------------------------------------


async def test_room_history_returns_the_rooms_messages_in_id_order(store: Store) -> None:
    await store.commit(
        AppendMessage(room_message(3)),
        AppendMessage(room_message(2, room="dev")),
        AppendMessage(room_message(1)),
    )
    await store.commit(
        AppendMessage(direct_message(4, "alice", "bob")),
        AppendMessage(room_message(5, sender="bob")),
    )
    assert await room_history(store, "lobby", None, 100) == [
        room_message(1),
        room_message(3),
        room_message(5, sender="bob"),
    ]
    assert await room_history(store, "dev", None, 100) == [room_message(2, room="dev")]
    assert await room_history(store, "nowhere", None, 100) == []


async def test_history_without_after_is_the_latest_n_oldest_first(store: Store) -> None:
    await store.commit(*(AppendMessage(room_message(i)) for i in range(1, 11)))
    assert await room_history(store, "lobby", None, 3) == [room_message(i) for i in (8, 9, 10)]
    assert await room_history(store, "lobby", None, 1) == [room_message(10)]
    assert await room_history(store, "lobby", None, 50) == [room_message(i) for i in range(1, 11)]


async def test_history_after_pages_forward_from_the_cursor_up_to_the_limit(store: Store) -> None:
    await store.commit(*(AppendMessage(room_message(i)) for i in range(1, 8)))
    assert await room_history(store, "lobby", 0, 3) == [room_message(i) for i in (1, 2, 3)]
    assert await room_history(store, "lobby", 3, 3) == [room_message(i) for i in (4, 5, 6)]
    assert await room_history(store, "lobby", 6, 3) == [room_message(7)]
    assert await room_history(store, "lobby", 7, 3) == []
    assert await room_history(store, "lobby", 100, 3) == []


async def test_direct_history_is_one_conversation_in_both_directions(store: Store) -> None:
    await store.commit(
        AppendMessage(direct_message(1, "alice", "bob")),
        AppendMessage(direct_message(2, "bob", "alice")),
        AppendMessage(direct_message(3, "alice", "carol")),
        AppendMessage(room_message(4, sender="bob")),
        AppendMessage(direct_message(5, "carol", "bob")),
        AppendMessage(direct_message(6, "alice", "bob")),
    )
    conversation = [
        direct_message(1, "alice", "bob"),
        direct_message(2, "bob", "alice"),
        direct_message(6, "alice", "bob"),
    ]
    assert await direct_history(store, "alice", "bob", None, 100) == conversation
    assert await direct_history(store, "bob", "alice", None, 100) == conversation
    assert await direct_history(store, "alice", "bob", None, 2) == conversation[1:]
    assert await direct_history(store, "alice", "bob", 1, 1) == [conversation[1]]
    assert await direct_history(store, "alice", "dave", None, 100) == []


async def test_visible_history_is_the_given_rooms_and_the_users_own_direct_messages(
    store: Store,
) -> None:
    await store.commit(
        AppendMessage(room_message(1)),
        AppendMessage(room_message(2, room="dev")),
        AppendMessage(direct_message(3, "alice", "bob")),
        AppendMessage(direct_message(4, "bob", "carol")),
        AppendMessage(direct_message(5, "carol", "dave")),
        AppendMessage(room_message(6, room="ops")),
        AppendMessage(room_message(7)),
    )
    bob_sees = [
        room_message(1),
        direct_message(3, "alice", "bob"),
        direct_message(4, "bob", "carol"),
        room_message(7),
    ]
    assert await visible_history(store, "bob", ["lobby"], None, 100) == bob_sees
    assert await visible_history(store, "bob", ["lobby"], None, 2) == bob_sees[2:]
    assert await visible_history(store, "bob", ["lobby"], 1, 2) == bob_sees[1:3]
    assert await visible_history(store, "bob", {"lobby", "dev"}, None, 100) == [
        room_message(1),
        room_message(2, room="dev"),
        *bob_sees[1:],
    ]
    # No rooms at all: only the user's own direct messages.
    assert await visible_history(store, "bob", [], None, 100) == bob_sees[1:3]
    assert await visible_history(store, "dave", [], 0, 100) == [direct_message(5, "carol", "dave")]


async def test_undelivered_lists_waiting_direct_messages_until_marked_delivered(
    store: Store,
) -> None:
    await store.commit(
        AppendMessage(direct_message(1, "alice", "bob"), delivered=False),
        AppendMessage(direct_message(2, "alice", "bob"), delivered=True),
        AppendMessage(direct_message(3, "carol", "bob"), delivered=False),
        AppendMessage(direct_message(4, "bob", "alice"), delivered=False),
        AppendMessage(room_message(5)),
    )
    assert await store.undelivered("bob") == [
        direct_message(1, "alice", "bob"),
        direct_message(3, "carol", "bob"),
    ]
    assert await store.undelivered("alice") == [direct_message(4, "bob", "alice")]
    assert await store.undelivered("carol") == []

    await store.commit(MarkDelivered((1, 4)))
    assert await store.undelivered("bob") == [direct_message(3, "carol", "bob")]
    assert await store.undelivered("alice") == []
    await store.commit(MarkDelivered((3,)))
    assert await store.undelivered("bob") == []
    # Delivered messages stay in the history.
    assert len(await direct_history(store, "alice", "bob", None, 100)) == 3


def model_page(
    messages: list[Message], visible: Callable[[Message], bool], after: int | None, limit: int
) -> list[int]:
    """What a history page is, computed the plain way: filter everything, sort, cut."""
    ids = sorted(m.id for m in messages if visible(m))
    if after is None:
        return ids[-limit:]
    return [i for i in ids if i > after][:limit]


async def test_history_ids_match_the_plain_definition_for_every_scope_and_cursor(
    store: Store,
) -> None:
    draw = random.Random(9)  # noqa: S311 (test data, not secrets)
    users, rooms = ("alice", "bob", "carol"), ("lobby", "dev", "ops")
    messages: list[Message] = []
    for id_ in range(1, 401):
        sender = draw.choice(users)
        if draw.random() < 0.5:
            messages.append(room_message(id_, room=draw.choice(rooms), sender=sender))
        else:  # including notes to self
            messages.append(direct_message(id_, sender, draw.choice(users)))
    await store.commit(*(AppendMessage(m) for m in messages))

    def dm_between(a: str, b: str) -> Callable[[Message], bool]:
        return lambda m: m.to is not None and {m.sender, m.to} == {a, b}

    def sees(user: str, rooms: tuple[str, ...]) -> Callable[[Message], bool]:
        return lambda m: m.room in rooms or (m.to is not None and user in (m.sender, m.to))

    scopes: list[tuple[HistoryScope, Callable[[Message], bool]]] = [
        (RoomScope("dev"), lambda m: m.room == "dev"),
        (RoomScope("nowhere"), lambda m: False),
        (PeerScope("alice", "bob"), dm_between("alice", "bob")),
        (PeerScope("bob", "alice"), dm_between("alice", "bob")),
        (PeerScope("alice", "alice"), lambda m: m.to == m.sender == "alice"),
        (VisibleScope("alice", ("lobby", "dev")), sees("alice", ("lobby", "dev"))),
        (VisibleScope("carol", ()), sees("carol", ())),
        (VisibleScope("bob", rooms), sees("bob", rooms)),
    ]
    for scope, visible in scopes:
        for after in (None, 0, 57, 399, 400, 10_000):
            for limit in (1, 7, 50, 500):
                expected = model_page(messages, visible, after, limit)
                assert await store.history_ids(scope, after, limit) == expected, (
                    scope,
                    after,
                    limit,
                )


async def test_messages_are_read_in_id_order_up_to_max_chars_skipping_unknown_ids(
    store: Store,
) -> None:
    texts = {1: "a" * 10, 2: "b" * 10, 3: "c" * 10, 5: "d" * 10}
    await store.commit(
        *(
            AppendMessage(Message(id=i, room="lobby", sender="alice", text=t, ts=TS))
            for i, t in texts.items()
        )
    )
    assert [m.id for m in await store.messages([1, 2, 3, 4, 5])] == [1, 2, 3, 5]
    # Stops after the message that reaches max_chars: the caller asks again from there.
    assert [m.id for m in await store.messages([1, 2, 3, 5], max_chars=15)] == [1, 2]
    assert [m.id for m in await store.messages([3, 5], max_chars=1)] == [3]
    assert await store.messages([]) == []
    assert (await store.messages([5]))[0].text == "d" * 10


async def test_undelivered_reads_a_range_of_ids_up_to_max_chars(store: Store) -> None:
    await store.commit(
        *(AppendMessage(direct_message(i, "alice", "bob"), delivered=False) for i in range(1, 9))
    )
    assert [m.id for m in await store.undelivered("bob", 2, 3)] == [3, 4, 5]
    assert [m.id for m in await store.undelivered("bob", 2, 10, through=6)] == [3, 4, 5, 6]
    # "dm 1" is 4 characters: the second message reaches 8.
    assert [m.id for m in await store.undelivered("bob", 0, 10, max_chars=8)] == [1, 2]


async def test_a_slow_read_does_not_hold_up_other_reads(sqlite_store: SqliteStore) -> None:
    store = sqlite_store
    await store.commit(AppendMessage(room_message(1)))
    release = threading.Event()

    def slow(db: sqlite3.Connection) -> None:
        release.wait(WAIT)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(store._read, slow)  # holds one reader connection
        await trio.testing.wait_all_tasks_blocked()
        with trio.fail_after(WAIT):
            assert await room_history(store, "lobby", None, 10) == [room_message(1)]
        release.set()


async def test_a_database_from_before_the_direct_message_index_gets_it(db_path: Path) -> None:
    with contextlib.closing(sqlite3.connect(db_path)) as db:
        db.executescript(securechat.sqlite_store._SCHEMA)
        db.execute("DROP INDEX messages_to")
        db.execute(
            "INSERT INTO messages (id, recipient, sender, text, ts)"
            " VALUES (1, 'bob', 'alice', 'hi', ?)",
            (TS,),
        )
        db.commit()
    async with running(SqliteStore(db_path)) as store:
        assert [m.id for m in await visible_history(store, "bob", [], None, 10)] == [1]
    with contextlib.closing(sqlite3.connect(db_path)) as db:
        names = {row[0] for row in db.execute("SELECT name FROM sqlite_master")}
    assert "messages_to" in names


async def test_a_database_from_before_actions_gets_the_column_and_keeps_its_messages(
    db_path: Path,
) -> None:
    with contextlib.closing(sqlite3.connect(db_path)) as db:
        db.executescript(
            securechat.sqlite_store._SCHEMA.replace(
                ",\n    action    INTEGER NOT NULL DEFAULT 0", ""
            )
        )
        assert "action" not in {row[1] for row in db.execute("PRAGMA table_info(messages)")}
        db.execute(
            "INSERT INTO messages (id, room, sender, text, ts)"
            " VALUES (1, 'lobby', 'alice', 'hi', ?)",
            (TS,),
        )
        db.commit()
    async with running(SqliteStore(db_path)) as store:
        action = Message(id=2, room="lobby", sender="bob", text="waves", action=True, ts=TS)
        await store.commit(AppendMessage(action))
        old, new = await room_history(store, "lobby", None, 10)
        assert (old.text, old.action) == ("hi", None)
        assert new == action


async def test_save_room_without_a_topic_keeps_the_stored_topic(store: Store) -> None:
    await store.commit(SaveRoom("dev", "Kept"), SaveRoom("new", None, frozenset({"alice"})))
    await store.commit(SaveRoom("dev", None, frozenset({"bob"})))
    assert (await snapshot(store)).rooms == {
        "dev": StoredRoom("Kept", frozenset({"bob"})),
        "new": StoredRoom("", frozenset({"alice"})),
    }


# --- history on a large database: cost O(limit), not O(messages) -----------------------------

BIG_ROOMS = tuple(f"r{i}" for i in range(20))
BIG_MESSAGES = 240_000


@pytest.fixture(scope="module")
def big_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """240 000 messages: the lobby (60%), 20 rooms (20%), alice's and bob's direct
    messages with each other (10%) and bob's with carol (10%)."""
    path = tmp_path_factory.mktemp("big") / "big.db"
    SqliteStore(path).close_database()

    def rows() -> Iterator[tuple[Any, ...]]:
        for n in range(1, BIG_MESSAGES + 1):
            kind = n % 10
            if kind < 6:
                yield (n, "lobby", None, "dave", "x", TS)
            elif kind < 8:
                yield (n, BIG_ROOMS[n % 20], None, "bob", "x", TS)
            elif kind == 8:
                yield (n, None, *(("bob", "alice") if n % 3 else ("alice", "bob")), "x", TS)
            else:
                yield (n, None, "carol", "bob", "x", TS)

    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute("PRAGMA synchronous = OFF")
        with db:
            db.executemany(
                "INSERT INTO messages (id, room, recipient, sender, text, ts)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                rows(),
            )
    return path


class ReadCost:
    """Every statement the store's connections run, and their SQLite VM steps (in tens)."""

    def __init__(self) -> None:
        self.steps = 0
        self.statements: list[str] = []

    def watch(self, db: sqlite3.Connection) -> None:
        def step() -> int:
            self.steps += 10
            return 0

        db.set_progress_handler(step, 10)
        db.set_trace_callback(self.statements.append)

    def reset(self) -> None:
        self.steps = 0
        self.statements.clear()


@pytest.fixture
def read_cost(monkeypatch: pytest.MonkeyPatch) -> ReadCost:
    cost = ReadCost()
    connect = securechat.sqlite_store._connect

    def watched(path: Path, **options: Any) -> sqlite3.Connection:
        db = connect(path, **options)
        cost.watch(db)
        return db

    monkeypatch.setattr(securechat.sqlite_store, "_connect", watched)
    return cost


@pytest.mark.parametrize("after", [None, 1000, BIG_MESSAGES // 2])
@pytest.mark.parametrize("scope", ["room", "peer", "visible"])
async def test_history_touches_o_limit_rows_however_many_messages_match(
    big_db: Path, read_cost: ReadCost, scope: str, after: int | None
) -> None:
    limit = 101  # what the hub asks for a page of 100
    rooms = ("lobby", *BIG_ROOMS)
    async with running(SqliteStore(big_db)) as store:
        read_cost.reset()
        if scope == "room":
            page, ranges = await room_history(store, "lobby", after, limit), 1
        elif scope == "peer":
            page, ranges = await direct_history(store, "alice", "bob", after, limit), 2
        else:
            page, ranges = (
                await visible_history(store, "alice", rooms, after, limit),
                len(rooms) + 2,
            )
        assert len(page) == limit
        steps, statements = read_cost.steps, list(read_cost.statements)
    # Tens of thousands of messages match each scope; a page steps through
    # its own rows and one index entry per range, a few VM steps each.
    assert steps < 100 * (ranges + limit), steps
    with contextlib.closing(sqlite3.connect(big_db)) as db:
        for sql in statements:
            plan = [row[3] for row in db.execute(f"EXPLAIN QUERY PLAN {sql}")]
            assert not any("TEMP B-TREE" in step or step.startswith("SCAN") for step in plan), (
                sql,
                plan,
            )


# --- rooms, memberships and start-up state -------------------------------------------------


EXPECTED_ROOMS = {"dev": StoredRoom("Development", None), "ops": StoredRoom("Operations", None)}
EXPECTED_MEMBERS = {"dev": {"alice", "bob"}, "lobby": {"alice"}}


async def save_rooms_and_memberships(store: Store) -> None:
    await store.commit(
        SaveRoom("dev", "Development"),
        SaveRoom("ops", ""),
        AddMember("dev", "alice"),
        AddMember("dev", "bob"),
        AddMember("dev", "bob"),  # already a member: ignored
        AddMember("lobby", "alice"),
        AddMember("ops", "carol"),
    )
    await store.commit(SaveRoom("ops", "Operations"), RemoveMember("ops", "carol"))
    await store.commit(RemoveMember("dev", "nobody"))  # not a member: nothing happens


async def test_rooms_and_memberships_reflect_writes(store: Store) -> None:
    assert (await snapshot(store)).rooms == {}
    assert (await snapshot(store)).memberships == {}
    await save_rooms_and_memberships(store)
    assert (await snapshot(store)).rooms == EXPECTED_ROOMS
    assert (await snapshot(store)).memberships == EXPECTED_MEMBERS


async def test_rooms_and_memberships_survive_reopening(db_path: Path) -> None:
    async with running(SqliteStore(db_path)) as store:
        await save_rooms_and_memberships(store)
    async with running(SqliteStore(db_path)) as reopened:
        assert (await snapshot(reopened)).rooms == EXPECTED_ROOMS
        assert (await snapshot(reopened)).memberships == EXPECTED_MEMBERS


async def test_last_message_id_and_recent_sends_survive_reopening(db_path: Path) -> None:
    async with running(SqliteStore(db_path)) as store:
        await store.commit(
            AppendMessage(room_message(1), client_id="a1"),
            AppendMessage(room_message(2, sender="bob"), client_id="b1"),
            AppendMessage(room_message(9, sender="server")),
        )
    async with running(SqliteStore(db_path)) as reopened:
        state = await snapshot(reopened, 10, FUTURE)
        assert state.last_message_id == 9
        assert state.recent_sends == (
            RecentSend("alice", "a1", 1, TS),
            RecentSend("bob", "b1", 2, TS),
        )


async def test_the_snapshot_has_the_last_id_and_each_users_recent_sends(store: Store) -> None:
    assert await snapshot(store, 10, EPOCH) == Snapshot()
    await store.commit(
        AppendMessage(room_message(1), client_id="a1"),
        AppendMessage(room_message(2, sender="bob"), client_id="b1"),
        AppendMessage(room_message(3)),  # no client id: not a recent send
        AppendMessage(direct_message(4, "alice", "bob"), client_id="a2"),
        AppendMessage(room_message(9, sender="server")),
    )
    assert (await snapshot(store)).last_message_id == 9
    if isinstance(store, RedisStore):
        # Redis recognises re-sends itself, across nodes (the test below): no
        # window for the ledger to rebuild.
        assert (await snapshot(store, 10, FUTURE)).recent_sends == ()
        return
    assert (await snapshot(store, 10, FUTURE)).recent_sends == (
        RecentSend("alice", "a1", 1, TS),
        RecentSend("bob", "b1", 2, TS),
        RecentSend("alice", "a2", 4, TS),
    )
    # Each user's newest `per_user`, oldest first...
    assert (await snapshot(store, 1, FUTURE)).recent_sends == (
        RecentSend("bob", "b1", 2, TS),
        RecentSend("alice", "a2", 4, TS),
    )
    # ...and every one sent since the given time.
    assert (await snapshot(store, 1, EPOCH)).recent_sends == (
        RecentSend("alice", "a1", 1, TS),
        RecentSend("bob", "b1", 2, TS),
        RecentSend("alice", "a2", 4, TS),
    )
    assert await room_history(store, "lobby", None, 100) == [
        room_message(1),
        room_message(2, sender="bob"),
        room_message(3),
        room_message(9, sender="server"),
    ]


# --- the writer ------------------------------------------------------------------------------


async def test_writes_queued_before_the_writer_runs_commit_in_one_transaction(
    db_path: Path,
) -> None:
    store = CountingStore(db_path)
    outcomes = Outcomes()
    seen_by_callbacks: list[tuple[int, int]] = []

    def recording(label: int) -> Then:
        record = outcomes.done(label)

        def callback(error: StoreError | None) -> None:
            # What another connection sees when the callback runs: all of it is committed.
            seen_by_callbacks.append((last_stored_id(db_path), len(store.transactions)))
            record(error)

        return callback

    for i in range(1, 51):
        await store.commit_then(AppendMessage(room_message(i)), recording(i))
    store.commit_then_nowait(SaveRoom("dev", ""), recording(51))
    assert outcomes.calls == []
    assert (await snapshot(store)).last_message_id == 0

    async with running(store):
        pass  # closing makes the writer commit what is queued, then return

    assert store.transactions == [51]
    assert outcomes.calls == [(i, None) for i in range(1, 52)]
    assert seen_by_callbacks == [(50, 1)] * 51


async def test_a_batch_holds_at_most_max_batch_writes(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(securechat.sqlite_store, "MAX_BATCH", 3)
    store = CountingStore(db_path)
    outcomes = Outcomes()
    for i in range(1, 8):
        await store.commit_then(AppendMessage(room_message(i)), outcomes.done(i))
    async with running(store):
        pass  # closing makes the writer commit what is queued, then return
    assert store.transactions == [3, 3, 1]
    assert outcomes.calls == [(i, None) for i in range(1, 8)]


async def test_close_lets_the_writer_commit_what_is_queued_then_return(db_path: Path) -> None:
    store = SqliteStore(db_path)
    outcomes = Outcomes()
    try:
        with trio.fail_after(WAIT):
            async with trio.open_nursery() as nursery:
                await nursery.start(store.run)
                for i in range(1, 4):
                    await store.commit_then(AppendMessage(room_message(i)), outcomes.done(i))
                store.close()
            # The nursery exited: the writer returned on its own.
        assert outcomes.calls == [(1, None), (2, None), (3, None)]
        assert (await snapshot(store)).last_message_id == 3
    finally:
        store.close_database()


async def test_a_failing_write_fails_its_whole_batch_and_the_writer_goes_on(
    db_path: Path,
) -> None:
    store = CountingStore(db_path)
    outcomes = Outcomes()
    await store.commit_then(AppendMessage(room_message(1)), outcomes.done(1))
    await store.commit_then(SaveRoom("dev", ""), outcomes.done(2))
    await store.commit_then(AppendMessage(room_message(1, room="dev")), outcomes.done(3))  # same id
    await store.commit_then(AddMember("dev", "alice"), outcomes.done(4))
    async with running(store):
        await outcomes.wait_for(4)
        # One transaction was attempted and rolled back: none of its writes happened.
        assert [label for label, _ in outcomes.calls] == [1, 2, 3, 4]
        errors = [error for _, error in outcomes.calls]
        assert all(isinstance(error, StoreError) for error in errors)
        assert str(db_path) in str(errors[0])
        assert (await snapshot(store)).last_message_id == 0
        assert (await snapshot(store)).rooms == {}
        assert (await snapshot(store)).memberships == {}

        # Later writes still work.
        await store.commit(AppendMessage(room_message(1)), SaveRoom("dev", ""))
        assert await room_history(store, "lobby", None, 10) == [room_message(1)]
        assert (await snapshot(store)).rooms == {"dev": StoredRoom("", None)}
    assert sum(store.transactions) == 2  # only the successful commits are counted


async def test_commit_raises_the_database_error(store: Store) -> None:
    await store.commit(AppendMessage(room_message(1)))
    with pytest.raises(StoreError, match="UNIQUE constraint failed"):
        await store.commit(AppendMessage(room_message(1, sender="mallory")))
    assert await room_history(store, "lobby", None, 10) == [room_message(1)]


async def test_writes_fail_while_the_database_is_read_only_and_work_again_after(
    sqlite_store: SqliteStore,
) -> None:
    store = sqlite_store
    store._writer_db.execute("PRAGMA query_only = ON")
    outcomes = Outcomes()
    await store.commit_then(SaveRoom("dev", ""), outcomes.done(1))
    with pytest.raises(StoreError, match="readonly"):
        await store.commit(AddMember("dev", "alice"))
    assert len(outcomes.calls) == 1
    assert isinstance(outcomes.calls[0][1], StoreError)

    store._writer_db.execute("PRAGMA query_only = OFF")
    await store.commit(SaveRoom("dev", ""), AddMember("dev", "alice"))
    assert (await snapshot(store)).rooms == {"dev": StoredRoom("", None)}
    assert (await snapshot(store)).memberships == {"dev": {"alice"}}


async def test_commit_then_after_close_calls_then_with_store_error_at_once(store: Store) -> None:
    store.close()
    outcomes = Outcomes()
    await store.commit_then(SaveRoom("dev", ""), outcomes.done(1))
    assert len(outcomes.calls) == 1
    store.commit_then_nowait(SaveRoom("dev", ""), outcomes.done(2))
    assert [label for label, _ in outcomes.calls] == [1, 2]
    assert all(isinstance(error, StoreError) for _, error in outcomes.calls)
    with pytest.raises(StoreError, match="closed"):
        await store.commit(SaveRoom("dev", ""), AddMember("dev", "alice"))
    assert (await snapshot(store)).rooms == {}


async def test_every_then_runs_once_in_order_when_writes_interleave_with_commits(
    store: Store,
) -> None:
    outcomes = Outcomes()
    for i in range(1, 101):
        await store.commit_then(AppendMessage(room_message(i)), outcomes.done(i))
        if i % 7 == 0:
            await trio.lowlevel.checkpoint()
    await store.commit(MarkDelivered(()))
    assert outcomes.calls == [(i, None) for i in range(1, 101)]
    assert (await snapshot(store)).last_message_id == 100


# --- append and feed: the store numbers messages and feeds them in id order --------------


class Fed:
    """What a store's feed and its appends' callbacks saw, in the order they saw it."""

    def __init__(self, store: Store) -> None:
        self.events: list[tuple[str, Any]] = []
        store.feed(lambda message: self.events.append(("fed", message)))

    def then(self, label: str) -> Callable[[Appended | StoreError], None]:
        return lambda outcome: self.events.append((label, outcome))


def draft(text: str, **fields: Any) -> Draft:
    return Draft(text=text, **({"sender": "alice", "ts": TS, "room": "lobby"} | fields))


async def test_appends_are_numbered_in_commit_order_and_fed_before_their_then(
    store: Store,
) -> None:
    await store.commit(AppendMessage(room_message(41)))
    await snapshot(store)  # (as at start-up) numbering continues from the highest id
    fed = Fed(store)
    await store.append(draft("one"), fed.then("a"))
    await store.append(draft("two", room=None, to="bob", client_id="c2"), fed.then("b"))
    await store.commit(MarkDelivered(()))  # everything queued before it is committed
    kinds = [(kind, value.id) for kind, value in fed.events]
    assert kinds.index(("fed", 42)) < kinds.index(("a", 42))
    assert kinds.index(("fed", 43)) < kinds.index(("b", 43))
    assert [kind for kind, _ in kinds if kind != "fed"] == ["a", "b"]
    assert [value for kind, value in fed.events if kind != "fed"] == [Appended(42), Appended(43)]
    one, two = (value for kind, value in fed.events if kind == "fed")
    assert (one.room, one.to, one.sender, one.text, one.ts) == ("lobby", None, "alice", "one", TS)
    assert (two.room, two.to, two.text) == (None, "bob", "two")
    assert await room_history(store, "lobby", 41, 10) == [one]
    # A direct message is stored as waiting for its recipient; its client id is kept.
    assert await store.undelivered("bob") == [two]
    if not isinstance(store, RedisStore):  # (Redis recognises re-sends itself)
        assert RecentSend("alice", "c2", 43, TS) in (await snapshot(store)).recent_sends


async def test_an_append_that_cannot_be_stored_is_not_fed_and_its_then_gets_the_error(
    store: Store,
) -> None:
    fed = Fed(store)
    store.close()
    await store.append(draft("lost"), fed.then("a"))
    assert len(fed.events) == 1
    label, outcome = fed.events[0]
    assert label == "a"
    assert isinstance(outcome, StoreError)


async def test_redis_answers_a_resent_client_id_with_the_original_id_and_stores_it_once(
    redis_server: RedisServer,
) -> None:
    async with redis_store(redis_server) as first, running(first) as store:
        await snapshot(store)
        fed = Fed(store)
        await store.append(draft("once", client_id="c1"), fed.then("a"))
        await store.append(draft("once", client_id="c1"), fed.then("b"))  # a re-send
        await store.append(draft("once", client_id="c1", sender="bob"), fed.then("c"))
        await store.commit(MarkDelivered(()))
    events = [(kind, value.id) for kind, value in fed.events]
    assert [id_ for kind, id_ in events if kind == "fed"] == [1, 2]  # the re-send: not fed
    # The same id for the re-send; another sender's client id is another message.
    assert [event for event in events if event[0] != "fed"] == [("a", 1), ("b", 1), ("c", 2)]
    assert events.index(("fed", 2)) < events.index(("c", 2))


async def test_a_resend_on_another_node_is_fed_there_as_first_stored_not_as_resent(
    redis_server: RedisServer,
) -> None:
    """A re-send on another node gets the first one's id, and every node is fed the message
    as first stored (its text and time), not as re-sent."""
    later = "2026-02-03T04:05:06.000Z"
    async with (
        redis_store(redis_server, node="a") as first,
        redis_store(redis_server, node="b") as second,
        running(first) as a,
        running(second) as b,
    ):
        await snapshot(a)
        await snapshot(b)
        fed_a, fed_b = Fed(a), Fed(b)
        await a.append(draft("as first sent", client_id="c1"), fed_a.then("sent"))
        await a.commit(MarkDelivered(()))
        # The client re-sends on node b (whose tail may not have read the first yet).
        await b.append(draft("as re-sent", client_id="c1", ts=later), fed_b.then("resent"))
        await b.commit(MarkDelivered(()))  # its answer came after b's tail fed id 1
        stored = await room_history(a, "lobby", None, 10)
    assert len(stored) == 1
    assert ("resent", Appended(1)) in fed_b.events
    for fed in (fed_a, fed_b):
        first_fed = next(value for kind, value in fed.events if kind == "fed")
        assert first_fed == stored[0]
        assert (first_fed.text, first_fed.ts) == ("as first sent", TS)


async def test_message_ids_from_appends_continue_after_a_restart(db_path: Path) -> None:
    async with running(SqliteStore(db_path)) as store:
        await snapshot(store)
        fed = Fed(store)
        for text in ("a", "b", "c"):
            await store.append(draft(text), fed.then(text))
        await store.commit(MarkDelivered(()))
    async with running(SqliteStore(db_path)) as reopened:
        await snapshot(reopened)
        fed = Fed(reopened)
        await reopened.append(draft("d"), fed.then("d"))
        await reopened.commit(MarkDelivered(()))
        assert fed.events[-1] == ("d", Appended(4))


async def test_a_commit_of_no_writes_returns_at_once(store: Store) -> None:
    finished = trio.Event()

    async def write_nothing() -> None:
        await store.commit()
        finished.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(write_nothing)
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    assert finished.is_set()


async def test_writes_queued_while_callbacks_run_join_the_next_batch(db_path: Path) -> None:
    # The writer runs a batch's callbacks (the fan-out, the acks) right after its
    # commit, and what they and others queue meanwhile is committed together next.
    store = CountingStore(db_path)
    async with running(store):

        def fan_out(error: StoreError | None) -> None:
            for i in range(2, 6):
                store.commit_then_nowait(AppendMessage(room_message(i)), lambda error: None)

        await store.commit_then(AppendMessage(room_message(1)), fan_out)
        await store.commit(MarkDelivered(()))  # (queued at once: it joins message 1)
        await store.commit(MarkDelivered(()))  # (joins the four, or comes after them)
        assert [m.id for m in await room_history(store, "lobby", None, 10)] == [1, 2, 3, 4, 5]
    first, second = store.transactions[:2]
    assert first == 2
    assert second in (4, 5)  # the four queued by the callback, together


async def test_a_then_that_raises_is_logged_and_the_next_ones_run(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    outcomes = Outcomes()

    def broken(error: StoreError | None) -> None:
        raise RuntimeError("a bug in a fan-out")

    await store.commit_then(AppendMessage(room_message(1)), broken)
    await store.commit_then(AppendMessage(room_message(2)), outcomes.done(2))
    await store.commit(AppendMessage(room_message(3)))
    await store.commit_then(AppendMessage(room_message(4)), outcomes.done(4))
    await store.commit(MarkDelivered(()))
    assert outcomes.calls == [(2, None), (4, None)]
    assert "store callback failed" in caplog.text
    assert "a bug in a fan-out" in caplog.text


# --- MemoryStore: commits in the test's hands -------------------------------------------------


async def test_a_memory_store_commits_what_is_queued_when_the_test_says_so() -> None:
    store = MemoryStore()
    outcomes = Outcomes()
    await store.commit_then(AppendMessage(room_message(1)), outcomes.done(1))
    store.commit_then_nowait((SaveRoom("dev", ""), AddMember("dev", "alice")), outcomes.done(2))
    assert outcomes.calls == []
    assert await snapshot(store) == Snapshot()

    assert store.commit_pending(run_callbacks=False) == 2
    # Committed, and its callbacks (the fan-out) not run yet.
    assert (await snapshot(store)).last_message_id == 1
    assert (await snapshot(store)).memberships == {"dev": {"alice"}}
    assert outcomes.calls == []
    store.run_callbacks()
    assert outcomes.calls == [(1, None), (2, None)]
    assert store.commit_pending() == 0


async def test_a_memory_store_commit_commits_what_was_queued_before_it_first() -> None:
    store = MemoryStore()
    outcomes = Outcomes()
    await store.commit_then(AppendMessage(room_message(1)), outcomes.done(1))
    await store.commit(AppendMessage(room_message(2)))
    assert outcomes.calls == [(1, None)]
    assert [m.id for m in await room_history(store, "lobby", None, 10)] == [1, 2]


async def test_a_memory_store_fails_the_whole_next_commit_when_told_to() -> None:
    store = MemoryStore()
    outcomes = Outcomes()
    await store.commit_then(AppendMessage(room_message(1)), outcomes.done(1))
    await store.commit_then(SaveRoom("dev", ""), outcomes.done(2))
    store.fail_next()
    store.commit_pending()
    assert [label for label, _ in outcomes.calls] == [1, 2]
    assert all(isinstance(error, StoreError) for _, error in outcomes.calls)
    assert await snapshot(store) == Snapshot()

    await store.commit(AppendMessage(room_message(1)))  # only the next commit failed
    store.fail_next(StoreError("disk full"))
    with pytest.raises(StoreError, match="disk full"):
        await store.commit(AppendMessage(room_message(2)))
    assert (await snapshot(store)).last_message_id == 1


async def test_a_memory_store_with_a_full_queue_makes_writers_wait_or_refuses() -> None:
    store = MemoryStore(queue_size=1)
    outcomes = Outcomes()
    await store.commit_then(AppendMessage(room_message(1)), outcomes.done(1))
    with pytest.raises(trio.WouldBlock):
        store.commit_then_nowait(AppendMessage(room_message(2)), outcomes.done(2))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(store.commit_then, AppendMessage(room_message(3)), outcomes.done(3))
        await trio.testing.wait_all_tasks_blocked()
        assert store.commit_pending() == 1  # message 1; message 3 waited for room
    assert store.commit_pending() == 1
    assert outcomes.calls == [(1, None), (3, None)]


# --- retention -----------------------------------------------------------------------------

DAY = 86400.0
JAN_1 = datetime(2026, 1, 1, tzinfo=UTC).timestamp()


def at(day: float) -> str:
    """The ``ts`` of a message sent ``day`` days after 2026-01-01 00:00 UTC."""
    return utc_timestamp(datetime.fromtimestamp(JAN_1 + day * DAY, UTC))


def stamped(id_: int, day: float, *, room: str | None = "lobby", to: str | None = None) -> Message:
    return Message(id=id_, room=room, to=to, sender="alice", text=f"m{id_}", ts=at(day))


def ids(messages: list[Message]) -> list[int]:
    return [message.id for message in messages]


def test_retention_cutoff_is_the_ts_of_now_minus_the_age() -> None:
    assert Retention().cutoff(JAN_1) is None
    assert not Retention().enabled
    assert Retention(max_age=DAY).cutoff(JAN_1 + 2 * DAY) == at(1)
    assert Retention(max_age=DAY).enabled
    assert Retention(per_room=5).enabled
    assert Retention(per_room=5).cutoff(JAN_1) is None


def test_pages_to_release_keeps_what_one_interval_of_messages_takes() -> None:
    assert pages_to_release(1000, None) == 1000  # first prune: nothing known, give all back
    assert pages_to_release(1000, 300) == 700
    assert pages_to_release(1000, 1000) == 0  # a steady chat reuses what was pruned
    assert pages_to_release(100, 5000) == 0
    assert pages_to_release(100, -50) == 100  # the database shrank meanwhile


async def test_prune_by_age_drops_old_room_and_direct_messages_delivered_or_not(
    store: Store,
) -> None:
    await store.commit(
        AppendMessage(stamped(1, 1)),
        AppendMessage(stamped(2, 2, room=None, to="bob")),  # delivered
        AppendMessage(stamped(3, 2.5, room=None, to="bob"), delivered=False),
        AppendMessage(stamped(4, 3, room="dev")),
        AppendMessage(stamped(5, 4, room=None, to="bob"), delivered=False),
        AppendMessage(stamped(6, 5)),
    )
    # At day 6, three days of retention keep what is from day 3 on.
    pruned = await prune(store, Retention(max_age=3 * DAY), JAN_1 + 6 * DAY, batch=2)
    assert (pruned.by_age, pruned.by_room) == (3, 0)
    assert ids(await room_history(store, "lobby", 0, 10)) == [6]
    assert ids(await room_history(store, "dev", 0, 10)) == [4]
    assert ids(await direct_history(store, "bob", "alice", 0, 10)) == [5]
    assert ids(await store.undelivered("bob")) == [5]
    assert (await snapshot(store)).undelivered_to == {"bob"}

    # Nothing more to do at the same time; everything goes once old enough.
    assert (await store.prune(Retention(max_age=3 * DAY), JAN_1 + 6 * DAY)).messages == 0
    assert (await store.prune(Retention(max_age=3 * DAY), JAN_1 + 100 * DAY)).messages == 3
    assert (await snapshot(store)).undelivered_to == set()


async def test_pruned_text_is_overwritten_in_the_database_file(db_path: Path) -> None:
    # What retention deletes must not stay readable in the file's free pages.
    secret = "a secret that retention deleted"
    async with running(SqliteStore(db_path)) as store:
        await store.commit(
            AppendMessage(stamped(1, 1).model_copy(update={"text": secret})),
            AppendMessage(stamped(2, 9)),
        )
        assert (await store.prune(Retention(max_age=3 * DAY), JAN_1 + 10 * DAY)).messages == 1
    files = [db_path, db_path.with_name(db_path.name + "-wal")]
    data = b"".join(file.read_bytes() for file in files if file.exists())
    assert secret.encode() not in data


async def test_message_ids_go_on_increasing_after_everything_was_pruned(db_path: Path) -> None:
    async with running(SqliteStore(db_path)) as store:
        await store.commit(*(AppendMessage(stamped(i, 1)) for i in range(1, 8)))
        await store.prune(Retention(max_age=DAY), JAN_1 + 10 * DAY)
        assert await room_history(store, "lobby", 0, 10) == []
        assert (await snapshot(store)).last_message_id == 7
    async with running(SqliteStore(db_path)) as reopened:
        assert (await snapshot(reopened)).last_message_id == 7


async def test_prune_by_count_keeps_each_rooms_newest_and_leaves_direct_messages(
    store: Store,
) -> None:
    rows = [stamped(i, 1) for i in range(1, 11)]  # lobby: 1-10
    rows += [stamped(i, 1, room="dev") for i in range(11, 14)]  # dev: 11-13
    rows += [stamped(i, 1, room=None, to="bob") for i in range(14, 20)]  # direct: 14-19
    rows += [stamped(i, 1) for i in range(20, 23)]  # lobby: 20-22
    await store.commit(*(AppendMessage(message) for message in rows))

    pruned = await prune(store, Retention(per_room=4), JAN_1 + 2 * DAY, batch=3)
    assert pruned.by_room == 9
    assert ids(await room_history(store, "lobby", 0, 100)) == [10, 20, 21, 22]
    assert ids(await room_history(store, "dev", 0, 100)) == [11, 12, 13]
    assert ids(await direct_history(store, "alice", "bob", 0, 100)) == list(range(14, 20))

    # The next prune looks at the rooms that got messages since.
    await store.commit(*(AppendMessage(stamped(i, 2, room="dev")) for i in range(23, 26)))
    pruned = await store.prune(Retention(per_room=4), JAN_1 + 3 * DAY)
    assert pruned.by_room == 2
    assert ids(await room_history(store, "dev", 0, 100)) == [13, 23, 24, 25]
    assert ids(await room_history(store, "lobby", 0, 100)) == [10, 20, 21, 22]


async def test_the_first_prune_of_a_store_looks_at_every_room(db_path: Path) -> None:
    async with running(SqliteStore(db_path)) as store:
        await store.commit(*(AppendMessage(stamped(i, 1, room="dev")) for i in range(1, 6)))
        await store.prune(Retention(per_room=10), JAN_1)  # nothing to cut yet
    async with running(SqliteStore(db_path)) as restarted:  # with a smaller cap
        assert (await restarted.prune(Retention(per_room=2), JAN_1)).by_room == 3
        assert ids(await room_history(restarted, "dev", 0, 10)) == [4, 5]


async def test_age_and_count_together(store: Store) -> None:
    await store.commit(
        *(AppendMessage(stamped(i, i)) for i in range(1, 9)),  # lobby, one a day
        *(AppendMessage(stamped(i, 7, room="dev")) for i in range(9, 12)),
    )
    pruned = await store.prune(Retention(max_age=4 * DAY, per_room=2), JAN_1 + 9 * DAY)
    assert (pruned.by_age, pruned.by_room) == (4, 3)
    assert ids(await room_history(store, "lobby", 0, 10)) == [7, 8]
    assert ids(await room_history(store, "dev", 0, 10)) == [10, 11]


async def test_prune_deletes_through_the_writer_in_batches_committed_one_at_a_time(
    db_path: Path,
) -> None:
    async with running(CountingStore(db_path)) as store:
        await store.commit(*(AppendMessage(stamped(i, 1)) for i in range(1, 1001)))
        store.transactions.clear()
        pruned = await store.prune(Retention(max_age=DAY), JAN_1 + 5 * DAY, batch=300)
        assert pruned.by_age == 1000
        # Four deletes of at most 300, each its own commit; then the space given back.
        assert store.transactions[:4] == [1, 1, 1, 1]
        assert await room_history(store, "lobby", 0, 10) == []


async def test_a_prune_beside_a_stream_of_messages_loses_none_of_them(store: Store) -> None:
    old = 3000
    await store.commit(*(AppendMessage(stamped(i, 1)) for i in range(1, old + 1)))
    outcomes = Outcomes()
    new = [stamped(old + i, 30) for i in range(1, 401)]

    async def chat() -> None:
        for message in new:
            await store.commit_then(AppendMessage(message), outcomes.done(message.id))
            await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(chat)
        pruned = await prune(store, Retention(max_age=10 * DAY), JAN_1 + 31 * DAY, batch=100)
    await outcomes.wait_for(len(new))
    assert all(error is None for _, error in outcomes.calls)
    assert pruned.by_age == old
    assert await room_history(store, "lobby", 0, 500) == new


async def test_a_new_database_gives_pruned_space_back_an_old_one_reuses_it(
    tmp_path: Path,
) -> None:
    text = "x" * 2000

    def fill(first: int, count: int, day: float) -> list[AppendMessage]:
        return [
            AppendMessage(Message(id=i, room="lobby", sender="a", text=text, ts=at(day)))
            for i in range(first, first + count)
        ]

    def file_size(path: Path) -> int:
        with contextlib.closing(sqlite3.connect(path)) as db:
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return path.stat().st_size

    new_db, old_db = tmp_path / "new.db", tmp_path / "old.db"
    with contextlib.closing(sqlite3.connect(old_db)) as db:
        db.execute("PRAGMA journal_mode = WAL")  # as made before auto_vacuum was set
        db.executescript(securechat.sqlite_store._SCHEMA)
    for path, shrinks in ((new_db, True), (old_db, False)):
        async with running(SqliteStore(path)) as store:
            assert store.shrinks is shrinks
            await store.commit(*fill(1, 1000, 1))
            full = file_size(path)
            pruned = await store.prune(Retention(max_age=DAY), JAN_1 + 5 * DAY)
            assert pruned.by_age == 1000
            if shrinks:
                assert pruned.pages_released > 0
                assert file_size(path) < full / 4
            else:
                assert pruned.pages_released == 0
                assert file_size(path) == full
                await store.commit(*fill(1001, 1000, 6))  # into the freed pages
                assert file_size(path) <= full * 1.1
            with contextlib.closing(sqlite3.connect(path)) as db:
                assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)


async def test_history_is_served_from_the_indexes_after_pruning(
    tmp_path: Path, read_cost: ReadCost
) -> None:
    path = tmp_path / "pruned.db"
    rooms = ("lobby", "dev", "ops")
    rows: list[AppendMessage] = []
    for i in range(1, 6001):
        kind = i % 4
        if kind < 3:
            rows.append(AppendMessage(stamped(i, i / 1000, room=rooms[kind])))
        else:
            to, sender = ("bob", "alice") if i % 8 == 3 else ("alice", "bob")
            rows.append(
                AppendMessage(Message(id=i, to=to, sender=sender, text=f"m{i}", ts=at(i / 1000)))
            )
    async with running(SqliteStore(path)) as store:
        await store.commit(*rows)
        pruned = await store.prune(Retention(max_age=3 * DAY, per_room=500), JAN_1 + 6 * DAY)
        assert pruned.by_age == 3000 - 1  # ts of messages 1..2999 is before day 3
        kept = {message.id: message for message in await store.messages(range(1, 6001))}
        for room in rooms:
            expected = sorted(i for i, m in kept.items() if m.room == room)
            assert len(expected) == 500
            read_cost.reset()
            assert ids(await room_history(store, room, None, 101)) == expected[-101:]
            assert read_cost.steps < 100 * (1 + 101), read_cost.steps
            assert ids(await room_history(store, room, 0, 101)) == expected[:101]
        conversation = sorted(i for i, m in kept.items() if m.to is not None)
        read_cost.reset()
        assert ids(await direct_history(store, "alice", "bob", None, 101)) == conversation[-101:]
        assert read_cost.steps < 100 * (2 + 101), read_cost.steps
        read_cost.reset()
        visible = await visible_history(store, "alice", rooms, None, 101)
        assert ids(visible) == sorted(kept)[-101:]
        assert read_cost.steps < 100 * (5 + 101), read_cost.steps
        statements = list(read_cost.statements)
    with contextlib.closing(sqlite3.connect(path)) as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        for sql in statements:
            plan = [row[3] for row in db.execute(f"EXPLAIN QUERY PLAN {sql}")]
            assert not any("TEMP B-TREE" in step or step.startswith("SCAN") for step in plan), (
                sql,
                plan,
            )


async def test_a_prune_by_age_with_nothing_to_delete_reads_little_of_a_large_database(
    big_db: Path, read_cost: ReadCost
) -> None:
    # 240 000 messages, all younger than the limit: the prune looks at the oldest few.
    async with running(SqliteStore(big_db)) as store:
        read_cost.reset()
        pruned = await store.prune(Retention(max_age=DAY), datetime.fromisoformat(TS).timestamp())
        steps = read_cost.steps
        assert (await snapshot(store)).last_message_id == BIG_MESSAGES
    assert pruned == Pruned()
    assert steps < 20 * PRUNE_BATCH, steps
