"""Durable state in SQLite: message history, rooms and room memberships.

Every write goes through one writer task, which takes everything queued
and commits it in one transaction (group commit), then reports each write's
outcome through its callback: an ``ack`` is sent only from that callback,
so no message is acknowledged before it is on disk. The database runs in
WAL mode with ``synchronous=FULL``, so a committed transaction survives the
process being killed, and the machine losing power.

Reads (history replay, start-up state) use a second connection, so they
never wait behind a commit. SQLite calls block, so both connections are only
used from worker threads, one call at a time each.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from .protocol import Message

log = logging.getLogger(__name__)

# How many writes one transaction may hold, and how many may wait for the
# writer before submitters are made to wait (back-pressure).
MAX_BATCH = 1024
QUEUE_SIZE = 1024

_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    id        INTEGER PRIMARY KEY,
    room      TEXT,
    recipient TEXT,
    sender    TEXT NOT NULL,
    text      TEXT NOT NULL,
    ts        TEXT NOT NULL,
    client_id TEXT,
    delivered INTEGER NOT NULL DEFAULT 1
);
CREATE INDEX IF NOT EXISTS messages_by_room ON messages(room, id) WHERE room IS NOT NULL;
CREATE INDEX IF NOT EXISTS messages_by_recipient
    ON messages(recipient, sender, id) WHERE recipient IS NOT NULL;
CREATE INDEX IF NOT EXISTS messages_by_sender
    ON messages(sender, id) WHERE recipient IS NOT NULL;
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
"""
_COLUMNS = "id, room, recipient, sender, text, ts"


class StoreError(Exception):
    """The database cannot be opened or written; the message says which file and why."""


# --- writes ------------------------------------------------------------------------


@dataclass(frozen=True)
class AppendMessage:
    message: Message
    client_id: str | None = None
    delivered: bool = True  # False: a direct message waiting for its offline recipient


@dataclass(frozen=True)
class MarkDelivered:
    ids: tuple[int, ...]


@dataclass(frozen=True)
class SaveRoom:
    name: str
    topic: str
    allowed: frozenset[str] | None = None  # a private room's list of who may join


@dataclass(frozen=True)
class AddMember:
    room: str
    username: str


@dataclass(frozen=True)
class RemoveMember:
    room: str
    username: str


Write = AppendMessage | MarkDelivered | SaveRoom | AddMember | RemoveMember
Done = Callable[[BaseException | None], None]


_INSERT_MESSAGE = (
    "INSERT INTO messages (id, room, recipient, sender, text, ts, client_id, delivered)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
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
        cursor.execute(
            "INSERT INTO rooms (name, topic, allowed) VALUES (?, ?, ?)"
            " ON CONFLICT(name) DO UPDATE SET topic = excluded.topic, allowed = excluded.allowed",
            (write.name, write.topic, allowed),
        )
    elif isinstance(write, AddMember):
        cursor.execute(
            "INSERT OR IGNORE INTO memberships (room, username) VALUES (?, ?)",
            (write.room, write.username),
        )
    else:
        cursor.execute(
            "DELETE FROM memberships WHERE room = ? AND username = ?", (write.room, write.username)
        )


# --- the store ---------------------------------------------------------------------------


@dataclass(frozen=True)
class RecentSend:
    """A message sent with a client id, for idempotent re-sends after a restart."""

    sender: str
    client_id: str
    message_id: int
    ts: str


class Store:
    """The database, its writer task and its history queries."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._writer_db = _connect(path)
        self._reader_db = _connect(path)
        self._reader_lock = trio.CapacityLimiter(1)
        self._send, self._receive = trio.open_memory_channel[tuple[tuple[Write, ...], Done]](
            QUEUE_SIZE
        )
        self._closed = False

    # -- start-up state (call before serving; blocking) --

    def last_message_id(self) -> int:
        row = self._reader_db.execute("SELECT COALESCE(MAX(id), 0) FROM messages").fetchone()
        return int(row[0])

    def rooms(self) -> dict[str, tuple[str, frozenset[str] | None]]:
        """Every saved room: its topic and, for a private room, who may join."""
        return {
            name: (topic, None if allowed is None else frozenset(json.loads(allowed)))
            for name, topic, allowed in self._reader_db.execute(
                "SELECT name, topic, allowed FROM rooms"
            )
        }

    def memberships(self) -> dict[str, set[str]]:
        members: dict[str, set[str]] = {}
        for room, username in self._reader_db.execute("SELECT room, username FROM memberships"):
            members.setdefault(room, set()).add(username)
        return members

    def users_with_undelivered(self) -> set[str]:
        """Users who have direct messages waiting for their next login."""
        rows = self._reader_db.execute(
            "SELECT DISTINCT recipient FROM messages WHERE delivered = 0"
        )
        return {row[0] for row in rows}

    def recent_sends(self, per_user: int, since: str) -> list[RecentSend]:
        """Messages sent with a client id: each user's newest ``per_user``, and every
        one at or after the timestamp ``since``; oldest first."""
        rows = self._reader_db.execute(
            "SELECT sender, client_id, id, ts FROM ("
            "  SELECT sender, client_id, id, ts,"
            "   ROW_NUMBER() OVER (PARTITION BY sender ORDER BY id DESC) AS newest"
            "  FROM messages WHERE client_id IS NOT NULL"
            ") WHERE newest <= ? OR ts >= ? ORDER BY id",
            (per_user, since),
        ).fetchall()
        return [RecentSend(*row) for row in rows]

    # -- writes --

    async def submit(self, write: Write | tuple[Write, ...], done: Done) -> None:
        """Queue ``write`` (a tuple is committed as one unit); ``done(None)`` runs once it is
        committed, ``done(error)`` if it could not be.

        Waits only when the writer is far behind (back-pressure).
        """
        if self._closed:
            done(StoreError("the store is closed"))
            return
        item = (write if isinstance(write, tuple) else (write,), done)
        try:
            # No scheduler pass per message while there is room (the common case).
            self._send.send_nowait(item)
        except trio.WouldBlock:
            await self._send.send(item)

    def submit_nowait(self, write: Write, done: Done) -> None:
        """:meth:`submit` for callers that must not wait; raises ``trio.WouldBlock`` when full."""
        if self._closed:
            done(StoreError("the store is closed"))
            return
        self._send.send_nowait(((write,), done))

    async def write(self, *writes: Write) -> None:
        """Commit ``writes`` in one transaction and wait for it; raises the error if it fails."""
        if not writes:
            return
        outcome: list[BaseException | None] = []
        committed = trio.Event()

        def done(error: BaseException | None) -> None:
            outcome.append(error)
            committed.set()

        await self.submit(writes, done)
        await committed.wait()
        if outcome[0] is not None:
            raise outcome[0]

    async def run_writer(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """The writer task: runs until :meth:`close`, then commits what is left and returns."""
        task_status.started()
        async with self._receive:
            while True:
                try:
                    first = await self._receive.receive()
                except trio.EndOfChannel:
                    return
                batch = [first]
                while len(batch) < MAX_BATCH:
                    try:
                        batch.append(self._receive.receive_nowait())
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                error: BaseException | None = None
                try:
                    await trio.to_thread.run_sync(
                        self._commit, [write for unit, _ in batch for write in unit]
                    )
                except sqlite3.Error as exc:
                    log.error("database write failed (%d writes lost): %s", len(batch), exc)
                    error = StoreError(f"{self.path}: {exc}")
                for _, done in batch:
                    try:
                        done(error)
                    except Exception:  # one bad callback must not stop the writer
                        log.exception("store callback failed")

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
        """No more writes: the writer commits what is queued, then ends."""
        self._closed = True
        self._send.close()

    def close_database(self) -> None:
        self._writer_db.close()
        self._reader_db.close()

    # -- reads --

    async def room_history(self, room: str, after: int | None, limit: int) -> list[Message]:
        return await self._query("room = ?", (room,), after, limit)

    async def direct_history(
        self, user: str, peer: str, after: int | None, limit: int
    ) -> list[Message]:
        return await self._query(
            "recipient IS NOT NULL AND ((sender = ? AND recipient = ?)"
            " OR (sender = ? AND recipient = ?))",
            (user, peer, peer, user),
            after,
            limit,
        )

    async def visible_history(
        self, user: str, rooms: Iterable[str], after: int | None, limit: int
    ) -> list[Message]:
        """Messages in ``rooms`` and direct messages to or from ``user``."""
        room_list = sorted(rooms)
        placeholders = ", ".join("?" * len(room_list))
        condition = "(recipient = ? OR (recipient IS NOT NULL AND sender = ?))"
        if room_list:
            condition = f"(room IN ({placeholders}) OR {condition})"
        return await self._query(condition, (*room_list, user, user), after, limit)

    async def undelivered(self, user: str) -> list[Message]:
        """Direct messages to ``user`` stored while they were offline."""
        return await self._query("recipient = ? AND delivered = 0", (user,), 0, 10_000)

    async def _query(
        self, condition: str, params: tuple[Any, ...], after: int | None, limit: int
    ) -> list[Message]:
        # Only constant SQL fragments are interpolated; every value is bound.
        select = f"SELECT {_COLUMNS} FROM messages WHERE {condition}"  # noqa: S608
        if after is None:  # the latest `limit` messages, oldest first
            sql = f"SELECT * FROM ({select} ORDER BY id DESC LIMIT ?) ORDER BY id"  # noqa: S608
            args: tuple[Any, ...] = (*params, limit)
        else:
            sql = f"{select} AND id > ? ORDER BY id LIMIT ?"
            args = (*params, after, limit)

        def run() -> list[tuple[Any, ...]]:
            return self._reader_db.execute(sql, args).fetchall()

        try:
            rows = await trio.to_thread.run_sync(run, limiter=self._reader_lock)
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: {exc}") from exc
        return [
            # Rows were validated on the way in; skip validating them again.
            Message.model_construct(
                id=id_, room=room, to=recipient, sender=sender, text=text, ts=ts
            )
            for id_, room, recipient, sender, text, ts in rows
        ]


def _connect(path: Path) -> sqlite3.Connection:
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not path.exists():
            # Messages are private: create the file (and so its -wal/-shm) 0600.
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
        db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA busy_timeout = 5000")
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA synchronous = FULL")
        db.executescript(_SCHEMA)
        columns = {row[1] for row in db.execute("PRAGMA table_info(rooms)")}
        if "allowed" not in columns:  # a database from before private rooms were saved
            db.execute("ALTER TABLE rooms ADD COLUMN allowed TEXT")
    except (OSError, sqlite3.Error) as exc:
        raise StoreError(f"{path}: cannot open the database ({exc})") from None
    return db
