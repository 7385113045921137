"""Durable state in SQLite: message history, rooms and room memberships.

:class:`SqliteStore` implements :class:`~securechat.store.Store`. Every write
goes through one writer task, which takes everything queued and commits it
in one transaction (group commit) in a worker thread, then runs the batch's
callbacks with its outcome (the hub's fan-out and acks) before it takes
the next batch: an ``ack`` is sent only from such a callback, so no message
is acknowledged before it is on disk. (A task of their own for the
callbacks, so that a big fan-out overlaps the next commit, was tried and
measured: the acks came a scheduler pass later, and at full speed to 1 000
receivers a delivery cost 15-20 us instead of 11: docs/performance.md.)
Writes queued meanwhile join the next batch. The database runs in WAL mode with
``synchronous=FULL``, so a committed transaction survives the process being
killed, and the machine losing power.

Reads (history replay, start-up state) use a small pool of other
connections, so they never wait behind a commit, and one user's read never
queues everyone else's (WAL lets readers run at once). SQLite calls block, so
every connection is only used from worker threads, one call at a time each.

History is read in two steps, so that neither its cost nor its memory grows
with the database or with what a client asks for: :meth:`SqliteStore.history_ids`
finds the ids of a page, walking indexes in id order and stopping at the
limit (several scopes are merged lazily, never sorted whole), then
:meth:`SqliteStore.messages` fetches their rows a few at a time.

Retention (:meth:`SqliteStore.prune`, run periodically by the server) finds the
messages to drop with a connection of its own, in worker threads, a bounded
batch at a time, and deletes each batch through the writer like any other
write: one short transaction each, committed one at a time, so neither the
writer nor the readers ever wait long for it. Freed pages are reused by new
messages; a database created with ``auto_vacuum=INCREMENTAL`` (every new
one) also gives pages it will not need soon back to the file system.
"""

from __future__ import annotations

import functools
import heapq
import itertools
import json
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import trio

from .protocol import MAX_MESSAGE_ID, Message, trusted_message
from .store import (
    QUEUE_SIZE,
    AddMember,
    AppendMessage,
    AppendThen,
    DeleteMessages,
    Draft,
    Feed,
    HistoryScope,
    LocalLog,
    MarkDelivered,
    Notice,
    PeerScope,
    Pruned,
    RecentSend,
    ReleaseSpace,
    Retention,
    RoomScope,
    SaveRoom,
    Snapshot,
    StoredRoom,
    StoreError,
    StoreStats,
    Then,
    Watch,
    Write,
    commit_and_wait,
)

log = logging.getLogger(__name__)

# How many writes one transaction may hold (and QUEUE_SIZE, from store.py, how
# many may wait for the writer before submitters are made to wait).
MAX_BATCH = 1024
# Reader connections: reads run at once on this many threads.
READERS = 2
# Retention: messages deleted per transaction, and free pages given back per
# transaction (1 MiB of 4 KiB pages). Small enough that each holds the writer
# (and so every ack) only a few milliseconds (figures: docs/performance.md).
PRUNE_BATCH = 256
RELEASE_PAGES = 256

_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    id        INTEGER PRIMARY KEY,
    room      TEXT,
    recipient TEXT,
    sender    TEXT NOT NULL,
    text      TEXT NOT NULL,
    ts        TEXT NOT NULL,
    client_id TEXT,
    delivered INTEGER NOT NULL DEFAULT 1,
    action    INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS messages_by_room ON messages(room, id) WHERE room IS NOT NULL;
CREATE INDEX IF NOT EXISTS messages_by_recipient
    ON messages(recipient, sender, id) WHERE recipient IS NOT NULL;
CREATE INDEX IF NOT EXISTS messages_by_sender
    ON messages(sender, id) WHERE recipient IS NOT NULL;
CREATE INDEX IF NOT EXISTS messages_to
    ON messages(recipient, id) WHERE recipient IS NOT NULL;
CREATE INDEX IF NOT EXISTS messages_undelivered
    ON messages(recipient, id) WHERE delivered = 0;
CREATE TABLE IF NOT EXISTS rooms (
    name    TEXT PRIMARY KEY,
    topic   TEXT NOT NULL DEFAULT '',
    allowed TEXT  -- JSON list of who may join a private room; NULL: public
);
CREATE TABLE IF NOT EXISTS memberships (
    room     TEXT NOT NULL,
    username TEXT NOT NULL,
    PRIMARY KEY (room, username)
) WITHOUT ROWID;
-- pruned_through: the highest message id retention ever deleted, so that
-- ids go on increasing after a restart even when every message was pruned.
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
"""
_COLUMNS = "id, room, recipient, sender, text, ts, action"


# --- writes ------------------------------------------------------------------------


_INSERT_MESSAGE = (
    "INSERT INTO messages (id, room, recipient, sender, text, ts, client_id, delivered, action)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


def _message_row(write: AppendMessage) -> tuple[Any, ...]:
    message = write.message
    return (
        message.id,
        message.room,
        message.to,
        message.sender,
        message.text,
        message.ts,
        write.client_id,
        int(write.delivered),
        int(bool(message.action)),
    )


def _apply_all(cursor: sqlite3.Cursor, writes: list[Write]) -> None:
    """Apply ``writes`` in order; runs of messages go in one ``executemany``."""
    rows: list[tuple[Any, ...]] = []
    for write in writes:
        if isinstance(write, AppendMessage):
            rows.append(_message_row(write))
            continue
        if rows:
            cursor.executemany(_INSERT_MESSAGE, rows)
            rows = []
        _apply(cursor, write)
    if rows:
        cursor.executemany(_INSERT_MESSAGE, rows)


def _apply(cursor: sqlite3.Cursor, write: Write) -> None:
    if isinstance(write, AppendMessage):
        cursor.execute(_INSERT_MESSAGE, _message_row(write))
    elif isinstance(write, MarkDelivered):
        cursor.executemany(
            "UPDATE messages SET delivered = 1 WHERE id = ?", [(i,) for i in write.ids]
        )
    elif isinstance(write, SaveRoom):
        allowed = None if write.allowed is None else json.dumps(sorted(write.allowed))
        if write.topic is None:
            cursor.execute(
                "INSERT INTO rooms (name, allowed) VALUES (?, ?)"
                " ON CONFLICT(name) DO UPDATE SET allowed = excluded.allowed",
                (write.name, allowed),
            )
        else:
            cursor.execute(
                "INSERT INTO rooms (name, topic, allowed) VALUES (?, ?, ?) ON CONFLICT(name)"
                " DO UPDATE SET topic = excluded.topic, allowed = excluded.allowed",
                (write.name, write.topic, allowed),
            )
    elif isinstance(write, AddMember):
        cursor.execute(
            "INSERT OR IGNORE INTO memberships (room, username) VALUES (?, ?)",
            (write.room, write.username),
        )
    elif isinstance(write, DeleteMessages):
        if write.ids:
            cursor.execute(
                "INSERT INTO meta (key, value) VALUES ('pruned_through', ?) ON CONFLICT(key)"
                " DO UPDATE SET value = MAX(value, excluded.value)",
                (max(write.ids),),
            )
            cursor.executemany("DELETE FROM messages WHERE id = ?", [(i,) for i in write.ids])
    elif isinstance(write, ReleaseSpace):
        # incremental_vacuum frees one page per step, and Python's sqlite3
        # steps a statement that returns no rows only once: one execute a page.
        for _ in range(write.pages):
            cursor.execute("PRAGMA incremental_vacuum(1)")
    else:
        cursor.execute(
            "DELETE FROM memberships WHERE room = ? AND username = ?", (write.room, write.username)
        )


# --- retention ---------------------------------------------------------------------------


def pages_to_release(free_pages: int, growth_pages: int | None) -> int:
    """How many free pages to give back after a prune: all but what the messages of
    one prune interval are likely to take again (the pages they took since the last
    prune; unknown at the first prune: none kept). Giving back pages that new messages
    would soon need again only moves them, so a steady chat keeps its file size."""
    return max(0, free_pages - max(0, growth_pages or 0))


def _old_ids(db: sqlite3.Connection, cutoff: str, limit: int) -> tuple[list[int], bool]:
    """The oldest messages (in id order) with ``ts`` before ``cutoff``, up to ``limit``;
    and whether that is all of them. Ids grow with time, so the scan stops at the
    first message that is young enough: O(limit), however large the table."""
    rows = db.execute("SELECT id, ts FROM messages ORDER BY id LIMIT ?", (limit,)).fetchall()
    old = [id_ for id_, ts in itertools.takewhile(lambda row: row[1] < cutoff, rows)]
    return old, len(old) < limit


def _rooms_with_messages(db: sqlite3.Connection, after: int | None) -> list[str]:
    """Rooms holding messages with ids after ``after`` (None: any message)."""
    if after is not None:
        rows = db.execute(
            "SELECT DISTINCT room FROM messages WHERE id > ? AND room IS NOT NULL", (after,)
        )
        return sorted(row[0] for row in rows)
    # One index seek per room instead of a walk over every message.
    rooms: list[str] = []
    row = db.execute(
        "SELECT room FROM messages INDEXED BY messages_by_room"
        " WHERE room IS NOT NULL ORDER BY room LIMIT 1"
    ).fetchone()
    while row is not None:
        rooms.append(row[0])
        row = db.execute(
            "SELECT room FROM messages INDEXED BY messages_by_room"
            " WHERE room > ? ORDER BY room LIMIT 1",
            (row[0],),
        ).fetchone()
    return rooms


def _room_excess(db: sqlite3.Connection, room: str, keep: int, limit: int) -> list[int]:
    """The oldest messages of ``room`` beyond its newest ``keep``, up to ``limit``.

    Steps over the ``keep`` newest entries of the room's index: O(keep + limit).
    """
    row = db.execute(
        "SELECT id FROM messages INDEXED BY messages_by_room"
        " WHERE room = ? ORDER BY id DESC LIMIT 1 OFFSET ?",
        (room, keep),
    ).fetchone()
    if row is None:
        return []
    rows = db.execute(
        "SELECT id FROM messages INDEXED BY messages_by_room"
        " WHERE room = ? AND id <= ? ORDER BY id LIMIT ?",
        (room, row[0], limit),
    )
    return [id_ for (id_,) in rows]


def _max_id(db: sqlite3.Connection) -> int:
    return int(db.execute("SELECT COALESCE(MAX(id), 0) FROM messages").fetchone()[0])


def _space(db: sqlite3.Connection) -> tuple[int, int]:
    """(pages in use, free pages) of the database."""
    pages = db.execute("PRAGMA page_count").fetchone()[0]
    free = db.execute("PRAGMA freelist_count").fetchone()[0]
    return pages - free, free


# --- history ---------------------------------------------------------------------------

# One index range per part of a scope: (index, condition). Each is read in id
# order straight from its index, so a page costs one seek per range plus one
# step per message, however many messages match. Only these constant
# fragments are interpolated into SQL; every value is bound.
_ROOM_RANGE = ("messages_by_room", "room = ?")
_CONVERSATION_RANGE = ("messages_by_recipient", "recipient = ? AND sender = ?")
_TO_RANGE = ("messages_to", "recipient = ?")
_FROM_RANGE = ("messages_by_sender", "sender = ? AND recipient IS NOT NULL")
_Range = tuple[tuple[str, str], tuple[str, ...]]

T = TypeVar("T")


def _ranges(scope: HistoryScope) -> list[_Range]:
    if isinstance(scope, RoomScope):
        return [(_ROOM_RANGE, (scope.room,))]
    if isinstance(scope, PeerScope):
        ranges: list[_Range] = [(_CONVERSATION_RANGE, (scope.peer, scope.user))]
        if scope.peer != scope.user:
            ranges.append((_CONVERSATION_RANGE, (scope.user, scope.peer)))
        return ranges
    visible: list[_Range] = [(_ROOM_RANGE, (room,)) for room in sorted(set(scope.rooms))]
    # A note to self is in both of these; the merge drops the second copy.
    visible += [(_TO_RANGE, (scope.user,)), (_FROM_RANGE, (scope.user,))]
    return visible


def _range_sql(index: str, condition: str, latest: bool) -> str:
    if latest:
        return (
            f"SELECT id FROM messages INDEXED BY {index}"  # noqa: S608
            f" WHERE {condition} ORDER BY id DESC LIMIT ?"
        )
    return (
        f"SELECT id FROM messages INDEXED BY {index}"  # noqa: S608
        f" WHERE {condition} AND id > ? ORDER BY id LIMIT ?"
    )


def _page_ids(
    db: sqlite3.Connection, scope: HistoryScope, after: int | None, limit: int
) -> list[int]:
    """The ids of a history page, ascending (see :meth:`SqliteStore.history_ids`)."""
    latest = after is None
    cursors: list[sqlite3.Cursor] = []
    try:
        for (index, condition), params in _ranges(scope):
            args = (*params, limit) if latest else (*params, after, limit)
            cursors.append(db.execute(_range_sql(index, condition, latest), args))
        # A lazy k-way merge: each cursor is stepped only when its id is next.
        merged: Iterator[int] = heapq.merge(
            *((row[0] for row in cursor) for cursor in cursors), reverse=latest
        )
        ids: list[int] = []
        for id_ in merged:
            if ids and ids[-1] == id_:
                continue
            ids.append(id_)
            if len(ids) == limit:
                break
    finally:
        for cursor in cursors:
            cursor.close()
    if latest:
        ids.reverse()
    return ids


def _rows(cursor: sqlite3.Cursor, max_chars: int | None) -> list[Message]:
    """``cursor``'s message rows, stopping after the row that takes their texts to ``max_chars``."""
    messages: list[Message] = []
    chars = 0
    try:
        for id_, room, recipient, sender, text, ts, action in cursor:
            # Rows were validated on the way in; skip validating them again.
            messages.append(trusted_message(id_, room, recipient, sender, text, bool(action), ts))
            chars += len(text)
            if max_chars is not None and chars >= max_chars:
                break
    finally:
        cursor.close()
    return messages


def _snapshot(db: sqlite3.Connection, recent_per_user: int, recent_since: str) -> Snapshot:
    """Everything a hub starts from, read in one transaction (one consistent state)."""
    db.execute("BEGIN")
    try:
        last_id = db.execute(
            "SELECT MAX(COALESCE((SELECT MAX(id) FROM messages), 0),"
            " COALESCE((SELECT value FROM meta WHERE key = 'pruned_through'), 0))"
        ).fetchone()[0]
        rooms = {
            name: StoredRoom(topic, None if allowed is None else frozenset(json.loads(allowed)))
            for name, topic, allowed in db.execute("SELECT name, topic, allowed FROM rooms")
        }
        members: dict[str, set[str]] = {}
        for room, username in db.execute("SELECT room, username FROM memberships"):
            members.setdefault(room, set()).add(username)
        undelivered_to = frozenset(
            row[0]
            for row in db.execute("SELECT DISTINCT recipient FROM messages WHERE delivered = 0")
        )
        recent = db.execute(
            "SELECT sender, client_id, id, ts FROM ("
            "  SELECT sender, client_id, id, ts,"
            "   ROW_NUMBER() OVER (PARTITION BY sender ORDER BY id DESC) AS newest"
            "  FROM messages WHERE client_id IS NOT NULL"
            ") WHERE newest <= ? OR ts >= ? ORDER BY id",
            (recent_per_user, recent_since),
        ).fetchall()
    finally:
        if db.in_transaction:
            db.execute("ROLLBACK")  # it only read: ends the transaction
    return Snapshot(
        last_message_id=int(last_id),
        rooms=rooms,
        memberships={room: frozenset(users) for room, users in members.items()},
        undelivered_to=undelivered_to,
        recent_sends=tuple(RecentSend(*row) for row in recent),
    )


# A unit of writes waiting for the writer, and what runs after its commit.
_Queued = tuple[tuple[Write, ...], Then]


class SqliteStore:
    """The database, its writer task, and its history queries."""

    shared = False  # one server: nothing to watch or tell

    def __init__(self, path: Path, *, readers: int = READERS) -> None:
        self.path = path
        self.stats = StoreStats()
        self._writer_db = _connect(path)
        self._readers = [_connect(path, schema=False) for _ in range(readers)]
        self._idle_readers = list(self._readers)
        self._reader_slots = trio.CapacityLimiter(readers)
        self._send, self._receive = trio.open_memory_channel[_Queued](QUEUE_SIZE)
        self._closed = False
        # Retention's own connection: its reads never take a reader from history.
        self._pruner_db = _connect(path, schema=False)
        self.shrinks = self._pruner_db.execute("PRAGMA auto_vacuum").fetchone()[0] == 2
        self._rooms_checked_through: int | None = None  # None: every room at the next prune
        self._in_use_after_prune: int | None = None
        self._log = LocalLog()

    async def load(self, *, recent_per_user: int, recent_since: str) -> Snapshot:
        """The stored state (see :meth:`Store.load`), read in a worker thread."""
        snapshot = await self._read(lambda db: _snapshot(db, recent_per_user, recent_since))
        self._log.last_id = max(self._log.last_id, snapshot.last_message_id)
        return snapshot

    # -- writes --

    async def commit(self, *writes: Write) -> None:
        """Commit ``writes`` in one transaction and wait for it; raises the error if it fails."""
        await commit_and_wait(self.commit_then, writes)

    async def commit_then(self, writes: Write | tuple[Write, ...], then: Then) -> None:
        """Queue ``writes`` (a tuple is committed as one unit); ``then(None)`` runs once it is
        committed, ``then(error)`` if it could not be.

        Waits only when the writer is far behind (back-pressure).
        """
        if self._closed:
            then(StoreError("the store is closed"))
            return
        item = (writes if isinstance(writes, tuple) else (writes,), then)
        try:
            # No scheduler pass per message while there is room (the common case).
            self._send.send_nowait(item)
        except trio.WouldBlock:
            try:
                await self._send.send(item)
            except trio.ClosedResourceError:  # closed while this waited for room
                then(StoreError("the store is closed"))

    def commit_then_nowait(self, writes: Write | tuple[Write, ...], then: Then) -> None:
        """:meth:`commit_then` for callers that must not wait; raises ``trio.WouldBlock``
        when the queue is full."""
        if self._closed:
            then(StoreError("the store is closed"))
            return
        self._send.send_nowait((writes if isinstance(writes, tuple) else (writes,), then))

    async def append(self, draft: Draft, then: AppendThen) -> None:
        write = self._log.number(draft)
        await self.commit_then(write, self._log.then(write.message, then))

    def feed(self, apply: Feed) -> None:
        self._log.feed(apply)

    def watch(self, apply: Watch) -> None:
        """Never called: this store has one server."""

    def tell(self, notice: Notice) -> None:
        """Nobody to tell: this store has one server."""

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The writer, until :meth:`close`; then it commits what is queued, the last
        callbacks run, and this returns."""
        task_status.started()
        await self._write()

    async def _write(self) -> None:
        """The writer: each batch of queued writes in one transaction, then its callbacks."""
        async with self._receive:
            while True:
                try:
                    first = await self._receive.receive()
                except trio.EndOfChannel:
                    return
                batch = self._take_batch([first])
                error: StoreError | None = None
                started = time.perf_counter()
                try:
                    await trio.to_thread.run_sync(
                        self._commit, [write for unit, _ in batch for write in unit]
                    )
                except sqlite3.Error as exc:
                    log.error("database write failed (%d writes lost): %s", len(batch), exc)
                    error = StoreError(f"{self.path}: {exc}")
                    self.stats.failed_commits += 1
                self.stats.commit_seconds.observe(time.perf_counter() - started)
                self.stats.batch_units.observe(len(batch))
                for _, then in batch:
                    try:
                        then(error)
                    except Exception:  # one bad callback must not stop the others
                        log.exception("store callback failed")

    def _take_batch(self, batch: list[_Queued]) -> list[_Queued]:
        """``batch`` and what is queued, up to MAX_BATCH units, without waiting."""
        while len(batch) < MAX_BATCH:
            try:
                batch.append(self._receive.receive_nowait())
            except (trio.WouldBlock, trio.EndOfChannel):
                break
        return batch

    def _commit(self, writes: list[Write]) -> None:
        cursor = self._writer_db.cursor()
        cursor.execute("BEGIN IMMEDIATE")
        try:
            _apply_all(cursor, writes)
            cursor.execute("COMMIT")
        except BaseException:
            if self._writer_db.in_transaction:
                cursor.execute("ROLLBACK")
            raise

    def close(self) -> None:
        """No more writes: the writer commits what is queued, the last callbacks run,
        then :meth:`run` returns."""
        self._closed = True
        self._send.close()

    def close_database(self) -> None:
        """Close the connections (once :meth:`run` has returned and nothing reads)."""
        self._writer_db.close()
        self._pruner_db.close()
        for db in self._readers:
            db.close()

    # -- retention --

    async def prune(self, retention: Retention, now: float, *, batch: int = PRUNE_BATCH) -> Pruned:
        """Delete what ``retention`` does not keep at time ``now`` (seconds since the epoch).

        Runs beside live traffic: each step finds at most ``batch`` messages
        (in a worker thread, on the pruner's own connection), then deletes
        them through the writer and waits for that commit before the next
        step. The room cap looks at every room at the first prune, then only
        at rooms that got messages since the previous one. Afterwards, in a
        database that can shrink, free pages beyond the next interval's
        needs are given back, a bounded number per commit. Raises
        :class:`StoreError` if the database fails (what was deleted stays
        deleted; the next prune goes on).
        """
        in_use_before, _ = await self._maintain(_space)
        by_age = by_room = 0
        cutoff = retention.cutoff(now)
        if cutoff is not None:
            while True:
                ids, last = await self._maintain(lambda db: _old_ids(db, cutoff, batch))
                if ids:
                    await self.commit(DeleteMessages(tuple(ids)))
                    by_age += len(ids)
                if last:
                    break
        if retention.per_room:
            checked = self._rooms_checked_through
            high = await self._maintain(_max_id)
            for room in await self._maintain(lambda db: _rooms_with_messages(db, checked)):
                excess = functools.partial(
                    _room_excess, room=room, keep=retention.per_room, limit=batch
                )
                while ids := await self._maintain(excess):
                    await self.commit(DeleteMessages(tuple(ids)))
                    by_room += len(ids)
            self._rooms_checked_through = high
        released = await self._release_space(in_use_before)
        return Pruned(by_age=by_age, by_room=by_room, pages_released=released)

    async def _release_space(self, in_use_before: int) -> int:
        in_use, free = await self._maintain(_space)
        growth = None
        if self._in_use_after_prune is not None:
            growth = in_use_before - self._in_use_after_prune
        self._in_use_after_prune = in_use
        if not self.shrinks:
            return 0
        wanted = pages_to_release(free, growth)
        released = 0
        while released < wanted:
            step = min(RELEASE_PAGES, wanted - released)
            await self.commit(ReleaseSpace(step))
            released += step
        return released

    async def _maintain(self, run: Callable[[sqlite3.Connection], T]) -> T:
        """``run(connection)`` on the pruner's connection, in a worker thread."""
        try:
            return await trio.to_thread.run_sync(run, self._pruner_db)
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: {exc}") from exc

    # -- reads --

    async def history_ids(self, scope: HistoryScope, after: int | None, limit: int) -> list[int]:
        """The ids of a history page, ascending: the first ``limit`` after ``after``, or
        without ``after`` the latest ``limit``.

        Costs O((ranges + limit) · log n) for n stored messages: one index seek
        per room in the scope (plus two for direct messages), then one step
        per id returned.
        """
        return await self._read(lambda db: _page_ids(db, scope, after, limit))

    async def messages(self, ids: Sequence[int], *, max_chars: int | None = None) -> list[Message]:
        """The messages with these ids, in id order (ids that do not exist are skipped).

        With ``max_chars``, stops after the message that takes the texts read
        to that many characters: the caller asks again for the ids after the
        last one returned.
        """
        if not ids:
            return []
        placeholders = ", ".join("?" * len(ids))
        sql = f"SELECT {_COLUMNS} FROM messages WHERE id IN ({placeholders}) ORDER BY id"  # noqa: S608
        return await self._read(lambda db: _rows(db.execute(sql, tuple(ids)), max_chars))

    async def undelivered(
        self,
        user: str,
        after: int = 0,
        limit: int = 10_000,
        *,
        through: int | None = None,
        max_chars: int | None = None,
    ) -> list[Message]:
        sql = (
            f"SELECT {_COLUMNS} FROM messages INDEXED BY messages_undelivered"  # noqa: S608
            " WHERE recipient = ? AND delivered = 0 AND id > ? AND id <= ? ORDER BY id LIMIT ?"
        )
        args = (user, after, MAX_MESSAGE_ID if through is None else through, limit)
        return await self._read(lambda db: _rows(db.execute(sql, args), max_chars))

    async def _read(self, run: Callable[[sqlite3.Connection], T]) -> T:
        """``run(connection)`` in a worker thread on an idle reader connection."""
        async with self._reader_slots:
            db = self._idle_readers.pop()
            try:
                # Not abandoned on cancel: the connection is back in the pool
                # only once its thread is done with it.
                return await trio.to_thread.run_sync(run, db)
            except sqlite3.Error as exc:
                raise StoreError(f"{self.path}: {exc}") from exc
            finally:
                self._idle_readers.append(db)


def _connect(path: Path, *, schema: bool = True) -> sqlite3.Connection:
    """Open ``path``; with ``schema``, create or upgrade the tables and indexes (the writer)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not path.exists():
            # Messages are private: create the file (and so its -wal/-shm) 0600.
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
        db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA busy_timeout = 5000")
        if schema:
            # Takes effect only in a new database (before its first table):
            # lets retention give space back. An older one keeps reusing it.
            db.execute("PRAGMA auto_vacuum = INCREMENTAL")
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA synchronous = FULL")
        # What retention deletes is overwritten, not left readable in free pages.
        db.execute("PRAGMA secure_delete = ON")
        if schema:
            db.executescript(_SCHEMA)
            columns = {row[1] for row in db.execute("PRAGMA table_info(rooms)")}
            if "allowed" not in columns:  # a database from before private rooms were saved
                db.execute("ALTER TABLE rooms ADD COLUMN allowed TEXT")
            columns = {row[1] for row in db.execute("PRAGMA table_info(messages)")}
            if "action" not in columns:  # a database from before actions (/me)
                db.execute("ALTER TABLE messages ADD COLUMN action INTEGER NOT NULL DEFAULT 0")
    except (OSError, sqlite3.Error) as exc:
        raise StoreError(f"{path}: cannot open the database ({exc})") from None
    return db
