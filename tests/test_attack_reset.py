"""Connections reset (RST) at every stage from accept to close never reach the server.

The review's crash: a peer that resets right after connecting made the
server's ``getpeername()`` raise outside any error handling, which ended the
whole process. These attacks reset thousands of connections over real TCP
and TLS, at each stage, then check that a user logged in before the attack
and a newcomer still chat, that nothing was logged as a crash, and that
every connection slot came back.
"""

from __future__ import annotations

import logging
import socket
import struct

import pytest
import trio

from securechat.client import ChatConnection
from securechat.protocol import Ack, Hello, History, HistoryEnd, Say, encode
from securechat.server import raise_open_file_limit

from .conftest import WAIT, Pki, RunningServer, StartServer, receive_type
from .test_hardening import wait_until
from .test_hostile import Bystanders, client_hello

raise_open_file_limit()

LINGER_RESET = struct.pack("ii", 1, 0)  # close() then sends RST instead of FIN
ROUNDS = 4  # every batch below is sent this many times, with the server running between


def reset(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
    sock.close()


def connect(server: RunningServer) -> socket.socket:
    """A blocking TCP connection: the kernel completes it while the server is not running."""
    return socket.create_connection((server.host, server.port), timeout=WAIT)


async def reset_tls(stream: trio.SSLStream[trio.SocketStream]) -> None:
    stream.transport_stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
    await trio.aclose_forcefully(stream.transport_stream)


async def tls_connection(server: RunningServer) -> trio.SSLStream[trio.SocketStream]:
    tcp = await trio.open_tcp_stream(server.host, server.port)
    stream = trio.SSLStream(tcp, server.client_context("bob"), server_hostname=server.host)
    with trio.fail_after(WAIT):
        await stream.do_handshake()
    return stream


async def attacked(server: RunningServer, caplog: pytest.LogCaptureFixture) -> Bystanders:
    caplog.set_level(logging.INFO, logger="securechat")
    return await Bystanders.watch(server, caplog)


async def all_slots_free(server: RunningServer, held: int = 1) -> None:
    """Every attacking connection is gone: only the ``held`` ones of the test are counted."""
    await wait_until(lambda: server.server._counter.total == held)


@pytest.fixture
async def server(start_server: StartServer) -> RunningServer:
    # Every attacker is 127.0.0.1; the per-address cap is not what is tested here.
    return await start_server(limits={"max_connections_per_ip": 100_000})


async def test_reset_before_the_server_accepts(
    server: RunningServer, caplog: pytest.LogCaptureFixture
) -> None:
    bystanders = await attacked(server, caplog)
    for _ in range(ROUNDS):
        # Connected and reset while the server's task does not run: it accepts
        # sockets whose peer is already gone, and getpeername() fails on them.
        for sock in [connect(server) for _ in range(500)]:
            reset(sock)
        await all_slots_free(server)
    await bystanders.check()


async def test_reset_in_the_middle_of_the_client_hello(
    server: RunningServer, caplog: pytest.LogCaptureFixture, pki: Pki
) -> None:
    bystanders = await attacked(server, caplog)
    hello = client_hello(pki, server.host)
    for _ in range(ROUNDS):
        sockets = [connect(server) for _ in range(250)]
        for n, sock in enumerate(sockets):
            sock.sendall(hello[: 1 + n % (len(hello) - 1)])
        await trio.lowlevel.checkpoint()  # some are read by the server, some not yet
        for sock in sockets:
            reset(sock)
        await all_slots_free(server)
    await bystanders.check()


async def test_reset_after_the_handshake(
    server: RunningServer, caplog: pytest.LogCaptureFixture
) -> None:
    bystanders = await attacked(server, caplog)
    for _ in range(ROUNDS):
        streams = [await tls_connection(server) for _ in range(100)]
        for stream in streams:
            await reset_tls(stream)
        await all_slots_free(server)
    await bystanders.check()


async def test_reset_in_the_middle_of_a_frame(
    server: RunningServer, caplog: pytest.LogCaptureFixture
) -> None:
    bystanders = await attacked(server, caplog)
    hello = encode(Hello(username="bob", id="h"))
    say = encode(Say(room="lobby", text="cut short " * 50, id="s"))
    for _ in range(ROUNDS):
        streams = [await tls_connection(server) for _ in range(50)]
        for n, stream in enumerate(streams):
            # Before login (half a hello) and after it (half a say).
            if n % 2:
                await stream.send_all(hello + say[: len(say) // 2])
            else:
                await stream.send_all(hello[: len(hello) // 2])
        for stream in streams:
            await reset_tls(stream)
        await all_slots_free(server)
    await bystanders.check()


async def test_reset_while_the_server_is_writing(
    start_server: StartServer, caplog: pytest.LogCaptureFixture
) -> None:
    server = await start_server(
        limits={
            "max_connections_per_ip": 100_000,
            "message_burst": 1000,
            "messages_per_second": 1000,
            "request_burst": 1000,
            "requests_per_second": 1000,
        }
    )
    writer = await server.login("alice", cert_user="alice")
    for n in range(100):
        await writer.send(Say(room="lobby", text=f"{n} " + "x" * 3900, id=f"fill-{n}"))
    while (await receive_type(writer, Ack)).ref != "fill-99":
        pass
    bystanders = await attacked(server, caplog)
    for _ in range(ROUNDS):
        readers: list[ChatConnection] = []
        for _ in range(25):
            reader = await server.login("bob", cert_user="bob")
            # Nearly 400 KB of history and a tiny window: the server is mid-write.
            reader.stream.transport_stream.socket.setsockopt(
                socket.SOL_SOCKET, socket.SO_RCVBUF, 4096
            )
            await reader.send(History(room="lobby", limit=100, id="h"))
            readers.append(reader)
        for reader in readers:
            await reset_tls(reader.stream)
        await all_slots_free(server, held=2)
        for reader in readers:  # already closed
            server.connections.remove(reader)
    # The reset readers never got their history_end; a fresh one does.
    fresh = await server.login("bob", cert_user="bob")
    await fresh.send(History(room="lobby", limit=100, id="h"))
    assert (await receive_type(fresh, HistoryEnd)).ref == "h"
    await bystanders.check()
