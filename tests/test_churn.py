"""Connection churn must not grow the server's memory (issue 9, finding 5b).

A real ``securechat server`` process is warmed up to a plateau, then
thousands of connections come and go: certificate logins over TLS 1.3 and
over a client that forces TLS 1.2 without session tickets, password logins,
abandoned handshakes, resets (``SO_LINGER`` 0), EOF without close_notify and
clean ``bye``s. Afterwards its resident memory must be back within a few MiB
of the plateau. Before the fix, OpenSSL's server session cache kept ~11 KiB
per certificate handshake for two hours, and each Argon2id worker thread
kept its freed 19 MiB buffer in a glibc arena.
"""

from __future__ import annotations

import logging
import os
import socket
import ssl
import struct
from collections.abc import Awaitable, Callable
from contextlib import suppress
from pathlib import Path

import pytest
import trio
from pydantic import SecretStr

from securechat import process
from securechat.client import ChatConnection, LoginRefused
from securechat.passwords import ARGON2_MEMORY_KIB
from securechat.protocol import Bye

from .conftest import (
    PASSWORDS,
    WAIT,
    Endpoint,
    Pki,
    ServerProcess,
    config_data,
    receive_closed,
    server_process,
    write_toml,
)

MIB = 1024 * 1024
ARGON2_BUFFER = ARGON2_MEMORY_KIB * 1024
# Slack for what a long-running CPython process moves around anyway
# (pymalloc arenas, the log buffer, the SQLite page cache).
ALLOWED_GROWTH = 4 * MIB
CONCURRENCY = 8

Kind = Callable[[Endpoint, "Contexts"], Awaitable[None]]


class Contexts:
    """Client TLS contexts, made once: a context per connection would dominate the client's CPU."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.anonymous = endpoint.client_context()
        self.cert = endpoint.client_context("carol")
        self.stranger = endpoint.client_context("mallory")  # valid certificate, no such user
        self.cert_tls12 = endpoint.client_context("carol")
        # A TLS 1.2 client that sends no session-ticket extension: the server
        # would remember its session under a session id.
        self.cert_tls12.maximum_version = ssl.TLSVersion.TLSv1_2
        self.cert_tls12.options |= ssl.OP_NO_TICKET


def _vm_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def _open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def _connect(endpoint: Endpoint, context: ssl.SSLContext) -> ChatConnection:
    connection = await ChatConnection.open(endpoint.host, endpoint.port, context)
    assert connection.stream.context is context
    return connection


async def _bye(connection: ChatConnection) -> None:
    await connection.send(Bye())
    await receive_closed(connection)  # the server says close_notify and closes
    await connection.aclose()


async def _reset(connection: ChatConnection) -> None:
    sock = connection.stream.transport_stream.socket
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    await trio.aclose_forcefully(connection.stream)


async def cert_bye(endpoint: Endpoint, contexts: Contexts) -> None:
    connection = await _connect(endpoint, contexts.cert)
    await connection.login("carol", None)
    await _bye(connection)


async def cert_tls12_bye(endpoint: Endpoint, contexts: Contexts) -> None:
    connection = await _connect(endpoint, contexts.cert_tls12)
    assert connection.stream.version() == "TLSv1.2"
    await connection.login("carol", None)
    await _bye(connection)


async def cert_tls12_reset(endpoint: Endpoint, contexts: Contexts) -> None:
    connection = await _connect(endpoint, contexts.cert_tls12)
    await connection.login("carol", None)
    await _reset(connection)


async def cert_reset(endpoint: Endpoint, contexts: Contexts) -> None:
    connection = await _connect(endpoint, contexts.cert)
    await connection.login("carol", None)
    await _reset(connection)


async def cert_eof(endpoint: Endpoint, contexts: Contexts) -> None:
    """Logged in, then a TCP FIN without close_notify."""
    connection = await _connect(endpoint, contexts.cert)
    await connection.login("carol", None)
    await trio.aclose_forcefully(connection.stream)


async def refused_login(endpoint: Endpoint, contexts: Contexts) -> None:
    """The server refuses the login and closes the connection."""
    connection = await _connect(endpoint, contexts.stranger)
    with pytest.raises(LoginRefused):
        await connection.login("mallory", None)
    await receive_closed(connection)
    await trio.aclose_forcefully(connection.stream)


async def password_bye(endpoint: Endpoint, contexts: Contexts) -> None:
    connection = await _connect(endpoint, contexts.anonymous)
    await connection.login("dave", SecretStr(PASSWORDS["dave"]))
    await _bye(connection)


async def password_reset(endpoint: Endpoint, contexts: Contexts) -> None:
    connection = await _connect(endpoint, contexts.anonymous)
    await connection.login("dave", SecretStr(PASSWORDS["dave"]))
    await _reset(connection)


def _client_hello(context: ssl.SSLContext) -> bytes:
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = context.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with suppress(ssl.SSLWantReadError):
        client.do_handshake()
    return outgoing.read()


async def abandoned_handshake(endpoint: Endpoint, contexts: Contexts) -> None:
    """A ClientHello, part of the server's answer read, then a reset."""
    stream = await trio.open_tcp_stream(endpoint.host, endpoint.port)
    try:
        await stream.send_all(_client_hello(contexts.cert))
        await stream.receive_some(100)  # the start of the ServerHello
    finally:
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        await stream.aclose()


async def silent_drop(endpoint: Endpoint, contexts: Contexts) -> None:
    """Half a ClientHello, then a plain close."""
    hello = _client_hello(contexts.anonymous)
    stream = await trio.open_tcp_stream(endpoint.host, endpoint.port)
    await stream.send_all(hello[: len(hello) // 2])
    await stream.aclose()


async def _drain(connection: ChatConnection) -> None:
    """Read everything until the connection closes (no deadline: it lives as long as the test)."""
    with suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        while await connection.receive() is not None:
            pass


async def churn(server: ServerProcess, contexts: Contexts, plan: list[tuple[Kind, int]]) -> None:
    """Run every connection of ``plan`` (kind, count), a few at a time, in an interleaved order."""
    queue = [kind for kind, count in plan for _ in range(count)]
    # Interleave the kinds (a stable shuffle: every run the same order).
    queue = [queue[i] for i in sorted(range(len(queue)), key=lambda i: (i * 7919) % len(queue))]
    send, receive = trio.open_memory_channel[Kind](len(queue))
    for kind in queue:
        send.send_nowait(kind)
    send.close()

    async def worker() -> None:
        async for kind in receive:
            await kind(server.endpoint, contexts)

    async with trio.open_nursery() as nursery:
        for _ in range(CONCURRENCY):
            nursery.start_soon(worker)


async def settled_rss(server: ServerProcess, fds: int) -> int:
    """The server's RSS once every churned connection is closed on its side too."""
    pid = server.process.pid
    with trio.fail_after(WAIT):
        while _open_fds(pid) > fds:  # noqa: ASYNC110 (no event to wait on in another process)
            await trio.sleep(0.01)
    return _vm_rss(pid)


@pytest.mark.slow
async def test_connection_churn_leaves_server_memory_at_its_plateau(
    tmp_path: Path, pki: Pki, password_hashes: dict[str, str]
) -> None:
    data = config_data(pki, password_hashes, client_certs="optional")
    data["limits"] = {"max_connections_per_ip": 1000}
    config = write_toml(tmp_path / "server.toml", data)
    mixed: list[tuple[Kind, int]] = [
        (cert_bye, 400),
        (cert_reset, 200),
        (cert_eof, 200),
        (cert_tls12_bye, 400),
        (cert_tls12_reset, 200),
        (refused_login, 100),
        (password_bye, 60),
        (password_reset, 40),
        (abandoned_handshake, 200),
        (silent_drop, 200),
    ]
    async with server_process(config, pki) as server:
        contexts = Contexts(server.endpoint)
        # Two users stay logged in and read everything (presence notices of the churn).
        readers = [await server.endpoint.login(name) for name in ("alice", "bob")]
        fds = _open_fds(server.process.pid)
        async with trio.open_nursery() as nursery:
            for reader in readers:
                nursery.start_soon(_drain, reader)

            # Warm up with rounds of a quarter of the mix until a round no
            # longer grows the server much (two rounds at least, four at most).
            rounds: list[int] = []
            while len(rounds) < 2 or (len(rounds) < 4 and rounds[-1] - rounds[-2] > MIB // 2):
                await churn(server, contexts, [(kind, count // 4) for kind, count in mixed])
                rounds.append(await settled_rss(server, fds))
            plateau = rounds[-1]

            await churn(server, contexts, mixed)
            after = await settled_rss(server, fds)
            for reader in readers:
                await trio.aclose_forcefully(reader.stream)
        connections = sum(count for _, count in mixed)
        print(
            f"server RSS after warm-up rounds {[rss >> 10 for rss in rounds]} KiB;"
            f" after {connections} more connections {after >> 10} KiB"
            f" ({(after - plateau) / MIB:+.1f} MiB)"
        )
        assert after - plateau < ALLOWED_GROWTH, (plateau, after)
        assert "connection failed" not in server.log()  # no exception escaped a handler


async def test_password_logins_leave_no_hashing_buffer_behind(
    tmp_path: Path, pki: Pki, password_hashes: dict[str, str]
) -> None:
    """Each Argon2id check needs 19 MiB; the server must give it back, not keep one per thread."""
    data = config_data(pki, password_hashes, client_certs="optional")
    config = write_toml(tmp_path / "server.toml", data)
    async with server_process(config, pki) as server:
        contexts = Contexts(server.endpoint)
        fds = _open_fds(server.process.pid)
        await churn(server, contexts, [(cert_bye, 50)])  # everything but hashing warmed up
        before = await settled_rss(server, fds)
        # Eight at a time: both hashing threads busy, and trio's thread cache
        # starting new threads (each may take its own malloc arena).
        await churn(server, contexts, [(password_bye, 40)])
        after = await settled_rss(server, fds)
        print(f"server RSS before password logins {before >> 10} KiB, after 40: {after >> 10} KiB")
        assert after - before < ARGON2_BUFFER // 2, (before, after)


def test_allocator_is_left_alone_without_glibc(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def no_glibc(name: str) -> str | None:
        assert name == "CS_GNU_LIBC_VERSION"
        return None  # what musl says

    monkeypatch.setattr(os, "confstr", no_glibc)
    with caplog.at_level(logging.DEBUG, logger="securechat.process"):
        assert process.tune_allocator() is False
    assert "not glibc" in caplog.text
