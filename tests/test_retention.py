"""Retention beside a live server, over real TLS: the prune runs while users chat."""

from __future__ import annotations

import contextlib
import logging
import sqlite3
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from securechat.client import ChatConnection
from securechat.protocol import Ack, History, HistoryEnd, Message, Say
from securechat.server import ChatServer
from securechat.sqlite_store import SqliteStore

from .conftest import WAIT, ConfigFactory, Pki, RunningServer, receive_type

OLD_TS = "2020-01-01T00:00:00.000Z"
OLD_ROOM_MESSAGES = 30_000
OLD_STORED_DMS = 500


@asynccontextmanager
async def server_with_storage(
    nursery: trio.Nursery, make_config: ConfigFactory, pki: Pki, **storage: Any
) -> AsyncIterator[RunningServer]:
    """A real server whose ``[storage]`` has these settings (conftest's start_server
    overrides [server] only); its clients are closed and it is stopped at the end."""
    config = make_config(limits={"messages_per_second": 1000.0, "message_burst": 1000})
    config = config.model_copy(update={"storage": config.storage.model_copy(update=storage)})
    server = ChatServer(config)
    host, port = (await nursery.start(server.serve))[0]
    running = RunningServer(host, port, pki, server=server)
    try:
        yield running
    finally:
        await running.aclose()
        server.request_shutdown()


def prefill(path: Path) -> int:
    """An existing database with a backlog older than any retention: lobby messages, and
    direct messages to carol that were never delivered. Returns the highest id."""
    SqliteStore(path).close_database()  # the schema
    rows: list[tuple[Any, ...]] = [
        (i, "lobby", None, "dave", "old news " * 5, OLD_TS, 1)
        for i in range(1, OLD_ROOM_MESSAGES + 1)
    ]
    rows += [
        (i, None, "carol", "dave", "are you there?", OLD_TS, 0)
        for i in range(OLD_ROOM_MESSAGES + 1, OLD_ROOM_MESSAGES + OLD_STORED_DMS + 1)
    ]
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        db.executemany(
            "INSERT INTO messages (id, room, recipient, sender, text, ts, delivered)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            rows,
        )
    return len(rows)


def count(path: Path, where: str) -> int:
    """Read the database the way an operator would, beside the server (WAL: no waiting)."""
    with contextlib.closing(sqlite3.connect(path)) as db:
        return int(db.execute(f"SELECT COUNT(*) FROM messages WHERE {where}").fetchone()[0])  # noqa: S608


def backlog(path: Path, last_old: int) -> bool:
    """Whether any of the pre-filled messages is left (one index lookup: the test's
    polling must not hold up the server, which runs in the same event loop)."""
    with contextlib.closing(sqlite3.connect(path)) as db:
        return (
            db.execute("SELECT 1 FROM messages WHERE id <= ? LIMIT 1", (last_old,)).fetchone()
            is not None
        )


async def until(condition: Callable[[], bool], deadline: float = 3 * WAIT) -> None:
    """Poll state that has no event to wait on, with a deadline."""
    with trio.fail_after(deadline):
        while not condition():  # noqa: ASYNC110
            await trio.sleep(0.01)


async def test_pruning_beside_a_live_chat_loses_nothing_and_history_stays_right(
    nursery: trio.Nursery,
    make_config: ConfigFactory,
    pki: Pki,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="securechat")
    path = make_config().storage.path
    last_old = prefill(path)
    cap = 100
    async with server_with_storage(
        nursery,
        make_config,
        pki,
        retention_days=30.0,
        retention_messages_per_room=cap,
        prune_interval=0.01,  # prune after prune, the whole time
    ) as server:
        await chat_while_pruning(server, path, last_old, cap)
        # The prune that deleted the backlog logs when its thread is back: on a busy
        # machine that can be after the chat above is over.
        await until(lambda: any(r.getMessage().startswith("pruned ") for r in caplog.records))
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
    assert any(
        r.getMessage().startswith("retention: deleting messages older than 30 days")
        for r in caplog.records
    )
    assert any(r.getMessage().startswith("pruned ") for r in caplog.records)


async def chat_while_pruning(server: RunningServer, path: Path, last_old: int, cap: int) -> None:
    alice = await server.login("alice", cert_user="alice")
    bob = await server.login("bob", cert_user="bob")

    # Alice chats until the backlog is gone (at least 50 messages), each
    # message waiting for its ack; bob reads everything. (Here about 20 of
    # them were acknowledged while the backlog was being deleted.)
    sent: list[int] = []
    received: list[Message] = []

    async def read(connection: ChatConnection) -> None:
        while True:
            received.append(await receive_type(connection, Message))

    async with trio.open_nursery() as readers:
        readers.start_soon(read, bob)
        with trio.fail_after(3 * WAIT):
            while backlog(path, last_old) or len(sent) < 50:
                await alice.send(Say(room="lobby", text=f"live {len(sent)}", id=f"s{len(sent)}"))
                ack = await receive_type(alice, Ack)
                assert ack.ref == f"s{len(sent)}"
                sent.append(ack.id)
        await until(lambda: len(received) >= len(sent))
        readers.cancel_scope.cancel()

    # Every message arrived, in order, with ids after the pruned ones.
    assert [message.id for message in received] == sent
    assert [message.text for message in received] == [f"live {n}" for n in range(len(sent))]
    assert sent[0] > last_old
    # The stored direct messages went too (by age, undelivered or not).
    assert count(path, "recipient = 'carol'") == 0

    # The room cap holds once the last prune has run; history is what is kept.
    await until(lambda: count(path, "room = 'lobby'") <= cap)
    await alice.send(History(room="lobby", after=0, limit=500, id="h"))
    replay: list[Message] = []
    with trio.fail_after(WAIT):
        while not isinstance(envelope := await alice.receive(), HistoryEnd):
            if isinstance(envelope, Message):
                replay.append(envelope)
    assert [message.id for message in replay] == sent[-cap:]
    assert (envelope.last, envelope.more) == (sent[-1], False)
