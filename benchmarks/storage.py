"""The disk cost of history, and of pruning it: ``python -m benchmarks.storage [--quick]``.

For each kind of message (room messages with texts of 40, 100 and 400
characters, direct messages of 100), writes N messages (``--messages``,
default 100 000) through a real :class:`securechat.sqlite_store.SqliteStore`
into a new database, in group commits of 100 as under load, with a client id as the
securechat client sends it, then checkpoints the WAL and reads the file size:
bytes per message, and what 30 messages a second add per hour and per day
(the figures config.example.toml quotes for sizing the retention). Then it
prunes the older half by age, as the server does (in batches through the
writer), and reports how long that took, how much of the file was given
back, and the size after the same number of new messages has been written
again (the steady state of a database whose retention is full).

Prints one JSON line per kind (``{"storage": kind, ...}``), then a table.
Everything happens in a temporary directory, removed at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sqlite3
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import trio

from securechat.protocol import Message, utc_timestamp
from securechat.sqlite_store import SqliteStore
from securechat.store import AppendMessage, Retention

COMMIT = 100  # messages per group commit
RATE = 30.0  # messages per second, for the per-hour figure
START = datetime(2026, 1, 1, tzinfo=UTC).timestamp()
KINDS: dict[str, tuple[str, int]] = {  # kind: (room or "dm", text length)
    "room-40": ("lobby", 40),
    "room-100": ("lobby", 100),
    "room-400": ("lobby", 400),
    "dm-100": ("dm", 100),
}


def file_bytes(path: Path) -> int:
    """The database's size once its WAL is checkpointed into it."""
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    wal = Path(f"{path}-wal")
    return path.stat().st_size + (wal.stat().st_size if wal.exists() else 0)


def messages(first: int, count: int, where: str, length: int) -> list[AppendMessage]:
    text = ("lorem ipsum dolor sit amet " * 20)[:length]
    writes = []
    for id_ in range(first, first + count):
        ts = utc_timestamp(datetime.fromtimestamp(START + id_ / RATE, UTC))
        room, to = (None, "bob") if where == "dm" else (where, None)
        message = Message(id=id_, room=room, to=to, sender="alice", text=text, ts=ts)
        writes.append(AppendMessage(message, f"5f3a9c01d2e4-{id_}", delivered=where != "dm"))
    return writes


async def measure(directory: Path, kind: str, count: int) -> dict[str, Any]:
    where, length = KINDS[kind]
    path = directory / f"{kind}.db"
    store = SqliteStore(path)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(store.run)
            for first in range(1, count + 1, COMMIT):
                await store.commit(*messages(first, min(COMMIT, count + 1 - first), where, length))
            full = file_bytes(path)
            # Prune the older half: everything sent before the middle message.
            middle = START + (count // 2) / RATE
            began = time.perf_counter()
            pruned = await store.prune(Retention(max_age=1.0), middle + 1.0)
            prune_seconds = time.perf_counter() - began
            after_prune = file_bytes(path)
            for first in range(count + 1, count + count // 2 + 1, COMMIT):
                await store.commit(*messages(first, COMMIT, where, length))
            refilled = file_bytes(path)
            store.close()
    finally:
        store.close_database()
    per_message = full / count
    return {
        "storage": kind,
        "messages": count,
        "text_chars": length,
        "file_bytes": full,
        "bytes_per_message": round(per_message, 1),
        "mb_per_hour_at_30_per_s": round(per_message * RATE * 3600 / 1e6, 2),
        "gb_per_day_at_30_per_s": round(per_message * RATE * 86400 / 1e9, 3),
        "pruned": pruned.messages,
        "prune_seconds": round(prune_seconds, 3),
        "prune_messages_per_second": round(pruned.messages / prune_seconds),
        "pages_released": pruned.pages_released,
        "file_bytes_after_prune": after_prune,
        "file_bytes_after_refill": refilled,
    }


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.storage", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--messages", type=int, default=100_000, help="per kind")
    parser.add_argument("--quick", action="store_true", help="10 000 messages per kind")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    count = 10_000 if args.quick else args.messages
    results = []
    with tempfile.TemporaryDirectory(prefix="securechat-storage-") as tmp:
        for kind in KINDS:
            print(f"measuring {kind} ...", file=sys.stderr)
            result = trio.run(measure, Path(tmp), kind, count)
            print(json.dumps(result), flush=True)
            results.append(result)
            os.remove(Path(tmp) / f"{kind}.db")
    print(
        f"\n{'kind':<10} {'B/msg':>7} {'MB/h@30/s':>10} {'GB/day':>7}"
        f" {'prune msg/s':>12} {'after prune':>12} {'after refill':>13}"
    )
    for r in results:
        print(
            f"{r['storage']:<10} {r['bytes_per_message']:>7} {r['mb_per_hour_at_30_per_s']:>10}"
            f" {r['gb_per_day_at_30_per_s']:>7} {r['prune_messages_per_second']:>12}"
            f" {r['file_bytes_after_prune'] / r['file_bytes']:>11.0%}"
            f" {r['file_bytes_after_refill'] / r['file_bytes']:>12.0%}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
