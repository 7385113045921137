"""Attack: clients that ask for a lot and never read must not make the server hold much.

The memory one connection can make the server hold is bounded by
``max_outbound_bytes`` plus a small constant (docs/security.md, Limits),
whatever it asks for. These tests run a real ``securechat server`` process on
a database filled beforehand, open raw TLS connections with a small receive
buffer that log in, ask, and never read again, and compare the server's
resident memory (``VmRSS``) before and while they are pinned. A
connection is pinned until the server gives up on it after ``ping_timeout``
(logged as ``slow consumer disconnected``), so the peak is sampled until all
of them are dropped.
"""

from __future__ import annotations

import socket
import sqlite3
from pathlib import Path

import pytest
import trio

from securechat.client import ChatConnection
from securechat.protocol import History, HistoryEnd, Message
from securechat.server import raise_open_file_limit
from securechat.sqlite_store import SqliteStore

from .conftest import (
    ConfigFactory,
    Endpoint,
    Pki,
    ServerProcess,
    StartServer,
    config_data,
    receive_type,
    server_process,
    write_toml,
)

raise_open_file_limit()

MAX_OUTBOUND = 256 * 1024  # small, so that the bound stands out against noise
# What one connection may cost beyond its queue: a read chunk, the writer's
# ciphertext, TLS and connection state, the sampling noise.
SLACK = 256 * 1024
CONNECTIONS = 20
RECEIVE_BUFFER = 4096
TS = "2026-01-02T03:04:05.678Z"
WARM_UP = 100  # small lobby messages read once before the baseline


# id, room, recipient, sender, text, delivered
Row = tuple[int, str | None, str | None, str, str, int]


def warm_up_rows() -> list[Row]:
    return [(n, "lobby", None, "alice", f"warm {n}", 1) for n in range(1, WARM_UP + 1)]


def fill(path: Path, rows: list[Row]) -> None:
    """Create the schema (as the server would) and insert ``rows`` directly."""
    SqliteStore(path).close_database()
    db = sqlite3.connect(path)
    with db:
        db.executemany(
            "INSERT INTO messages (id, room, recipient, sender, text, ts, delivered)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            [
                (id_, room, to, sender, text, TS, delivered)
                for id_, room, to, sender, text, delivered in rows
            ],
        )
    db.close()


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def server_config(tmp_path: Path, pki: Pki, password_hashes: dict[str, str]) -> Path:
    data = config_data(pki, password_hashes)
    # Twenty history pages of 500 at once are over one user's request rate: lift it,
    # the memory of each page is what is measured.
    data["limits"] = {
        "max_outbound_bytes": MAX_OUTBOUND,
        "ping_timeout": 3.0,
        "request_burst": 1000,
    }
    data["storage"] = {"path": str(tmp_path / "chat.db")}
    return write_toml(tmp_path / "server.toml", data)


async def silent_login(endpoint: Endpoint, username: str) -> ChatConnection:
    """A logged-in connection with a tiny receive buffer; after ``welcome`` it reads no more.

    It logs in with its client certificate: a password check would add the
    memory of Argon2id (19 MiB per worker thread) to the measure.
    """
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
    await sock.connect((endpoint.host, endpoint.port))
    stream = trio.SSLStream(
        trio.SocketStream(sock), endpoint.client_context(username), server_hostname=endpoint.host
    )
    connection = ChatConnection(stream)
    endpoint.connections.append(connection)  # closed at teardown
    await connection.login(username, None)
    return connection


async def warm_up(endpoint: Endpoint) -> None:
    """One ordinary history read, so that the baseline includes what any reader costs once."""
    reader = await endpoint.login("alice", cert_user="alice")
    await reader.send(History(room="lobby", after=0, limit=WARM_UP, id="warm"))
    for _ in range(WARM_UP):
        await receive_type(reader, Message)
    await receive_type(reader, HistoryEnd)


async def peak_until_all_dropped(server: ServerProcess, baseline: int) -> int:
    """Sample the server's RSS until every silent connection was dropped as a slow consumer."""
    peak = baseline
    with trio.fail_after(60):
        while server.log().count("slow consumer disconnected") < CONNECTIONS:
            peak = max(peak, rss(server.process.pid))
            await trio.sleep(0.05)
    return peak


def report(what: str, baseline: int, peak: int) -> int:
    per_connection = (peak - baseline) // CONNECTIONS
    print(
        f"{what}: server RSS {baseline / 2**20:.1f} MiB -> {peak / 2**20:.1f} MiB,"
        f" {per_connection / 1024:.0f} KiB per connection"
        f" (bound {(MAX_OUTBOUND + SLACK) / 1024:.0f} KiB)"
    )
    return per_connection


@pytest.mark.slow
async def test_history_pages_nobody_reads_pin_at_most_the_outbound_limit(
    tmp_path: Path, pki: Pki, password_hashes: dict[str, str]
) -> None:
    config = server_config(tmp_path, pki, password_hashes)
    emoji = "\N{GRINNING FACE}" * 4000  # the longest text, and 4 bytes a character
    rows = warm_up_rows()
    rows += [(WARM_UP + n, "lobby", None, "alice", emoji, 1) for n in range(1, 501)]
    fill(tmp_path / "chat.db", rows)
    async with server_process(config, pki) as server:
        await warm_up(server.endpoint)
        baseline = rss(server.process.pid)
        silent = [await silent_login(server.endpoint, "carol") for _ in range(CONNECTIONS)]
        for connection in silent:
            await connection.send(History(room="lobby", limit=500, id="h"))
        peak = await peak_until_all_dropped(server, baseline)
    assert report("history", baseline, peak) < MAX_OUTBOUND + SLACK


@pytest.mark.slow
async def test_stored_direct_messages_nobody_reads_pin_at_most_the_outbound_limit(
    tmp_path: Path, pki: Pki, password_hashes: dict[str, str]
) -> None:
    config = server_config(tmp_path, pki, password_hashes)
    rows = warm_up_rows()
    rows += [(WARM_UP + n, None, "bob", "alice", "x" * 4000, 0) for n in range(1, 2001)]
    fill(tmp_path / "chat.db", rows)
    async with server_process(config, pki) as server:
        await warm_up(server.endpoint)
        baseline = rss(server.process.pid)
        # Each login starts handing bob's 2000 waiting messages to that connection.
        for _ in range(CONNECTIONS):
            await silent_login(server.endpoint, "bob")
        peak = await peak_until_all_dropped(server, baseline)
    assert report("stored direct messages", baseline, peak) < MAX_OUTBOUND + SLACK


async def test_a_reply_cut_into_batches_is_not_held_back_by_the_flush_tick(
    make_config: ConfigFactory, start_server: StartServer
) -> None:
    # 40 messages of 16 KB: ten batches of at most BATCH_BYTES. A writer that
    # waited for the next flush tick after each cut batch would need ten
    # ticks (ten seconds) for this reply.
    fill(
        make_config().storage.path,
        [(n, "lobby", None, "alice", "\N{GRINNING FACE}" * 4000, 1) for n in range(1, 41)],
    )
    server = await start_server(flush_interval_ms=1000)
    ticker = server.server.ticker
    assert ticker is not None
    carol = await server.login("carol", cert_user="carol")
    ticks = ticker.count
    await carol.send(History(room="lobby", limit=40, id="h"))
    replay = [await receive_type(carol, Message) for _ in range(40)]
    end = await receive_type(carol, HistoryEnd)
    assert [m.id for m in replay] == list(range(1, 41))
    assert end.last == 40
    # The first batch may wait for one tick; the rest follow it at once.
    assert ticker.count - ticks <= 2
