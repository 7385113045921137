"""securechat.fast_tls over real TLS on loopback TCP: records, partial writes, KeyUpdate, races.

The server end is what the server runs: ``trio.SSLStream`` over a
:class:`LeanSocketStream` of an accepted loopback connection, with the server's TLS
context. The peer is a TLS 1.3 client made of an ``ssl.SSLObject`` over its own trio
socket, so the test sees every TLS record the server sent (the 5-byte headers) and
decrypts them: a reordered or interleaved record fails the peer's MAC check. Nothing is
mocked. The KeyUpdate test calls OpenSSL's ``SSL_key_update`` through ctypes on the
peer's ``SSLObject`` (the pointer is checked against CPython's struct before use).
"""

from __future__ import annotations

import _ssl
import ctypes
import os
import socket
import ssl
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial
from typing import Any, cast

import pytest
import trio
import trio.lowlevel
import trio.testing

from securechat import fast_tls, tls
from securechat.delivery import Flusher, FlushTicker, Outbox, write_loop
from securechat.lines import LineTransport
from securechat.protocol import Message, Say
from securechat.transport import LeanSocketStream

from .conftest import WAIT, Pki, StartServer, receive_type

HEADER = 5  # TLS record header: type, version (2), length (2)


class Peer:
    """A TLS client over a trio socket that keeps the record headers it received."""

    def __init__(self, sock: trio.SocketStream, context: ssl.SSLContext) -> None:
        self.sock = sock
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_hostname="127.0.0.1")
        self.raw = bytearray()  # received bytes not yet split into records
        self.records: list[tuple[int, int]] = []  # (content type, length) after the handshake
        self.plaintext = bytearray()
        self.closed = False  # close_notify received
        self.handshaken = False

    async def flush(self) -> None:
        if data := self.outgoing.read():
            await self.sock.send_all(data)

    async def _receive(self) -> bool:
        data = await self.sock.receive_some(65536)
        if not data:
            return False
        self.raw += data
        while len(self.raw) >= HEADER:
            kind, _, length = struct.unpack("!BHH", self.raw[:HEADER])
            if len(self.raw) < HEADER + length:
                break
            if self.handshaken:
                self.records.append((kind, length))
            self.incoming.write(bytes(self.raw[: HEADER + length]))
            del self.raw[: HEADER + length]
        return True

    async def handshake(self) -> None:
        while True:
            try:
                self.tls.do_handshake()
            except ssl.SSLWantReadError:
                await self.flush()
                assert await self._receive()
            else:
                await self.flush()
                self.handshaken = True
                return

    def _decrypt(self) -> None:
        while not self.closed:
            try:
                data = self.tls.read(65536)
            except ssl.SSLWantReadError:
                return
            except ssl.SSLZeroReturnError:
                self.closed = True
                return
            if not data:  # CPython's answer to a close_notify
                self.closed = True
                return
            self.plaintext += data

    async def read_until(self, condition: Callable[[Peer], bool]) -> None:
        """Receive and decrypt until ``condition(self)``; fails at end of stream."""
        with trio.fail_after(WAIT):
            self._decrypt()
            while not condition(self):
                assert await self._receive(), "connection ended first"
                self._decrypt()
                await self.flush()  # what reading produced (a KeyUpdate answer)

    async def read_to_end(self) -> None:
        """Receive and decrypt until close_notify or the end of the TCP stream."""
        with trio.fail_after(WAIT):
            self._decrypt()
            while not self.closed and await self._receive():
                self._decrypt()

    async def send(self, data: bytes) -> None:
        self.tls.write(data)
        await self.flush()

    async def key_update(self) -> None:
        """Send a TLS 1.3 KeyUpdate asking the server to update its keys too."""
        libssl, pointer = _openssl_handle(self.tls)
        assert libssl.SSL_key_update(pointer, 1) == 1  # SSL_KEY_UPDATE_REQUESTED
        self.tls.do_handshake()  # sends the pending KeyUpdate (SSL_do_handshake)
        await self.flush()


def _openssl_handle(tls_object: ssl.SSLObject) -> tuple[Any, ctypes.c_void_p]:
    """libssl (as loaded by CPython's _ssl) and the ``SSL *`` inside ``tls_object``.

    CPython 3.11's PySSLSocket is {PyObject_HEAD; PyObject *Socket; SSL *ssl;
    PySSLContext *ctx; ...}; the ctx field is compared with the context object before the
    ssl field is trusted."""
    inner: Any = tls_object._sslobj  # type: ignore[attr-defined]
    word = ctypes.sizeof(ctypes.c_void_p)
    base = id(inner)
    head = 2 * word  # ob_refcnt, ob_type
    ctx = ctypes.c_void_p.from_address(base + head + 2 * word).value
    if ctx != id(inner.context):
        pytest.skip("CPython's SSLObject layout is not the one this test knows")
    libssl: Any = ctypes.CDLL(_ssl.__file__)
    libssl.SSL_key_update.argtypes = [ctypes.c_void_p, ctypes.c_int]
    libssl.SSL_version.argtypes = [ctypes.c_void_p]
    pointer = ctypes.c_void_p(ctypes.c_void_p.from_address(base + head + word).value)
    assert libssl.SSL_version(pointer) == 0x0304  # TLS 1.3
    return libssl, pointer


Connect = Callable[..., Awaitable[tuple[trio.SSLStream[LeanSocketStream], Peer]]]


@pytest.fixture
async def connect(pki: Pki) -> AsyncIterator[Connect]:
    """``await connect(sndbuf=..., rcvbuf=..., tickets=..., handshake=...)``: a (server
    SSLStream, Peer), handshaken unless ``handshake=False``."""
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = listener.socket.getsockname()[1]
    server_ctx = tls.server_context(pki.cert("server"), pki.key("server"), pki.ca, "none")
    # The same with TLS 1.3 session tickets, which SSLStream holds back until the first write.
    ticket_ctx = tls.server_context(pki.cert("server"), pki.key("server"), pki.ca, "none")
    ticket_ctx.num_tickets = 2
    client_ctx = tls.client_context(pki.ca)
    opened: list[trio.abc.AsyncResource] = []

    async def open_one(
        sndbuf: int | None = None,
        rcvbuf: int | None = None,
        tickets: bool = False,
        handshake: bool = True,
    ) -> tuple[trio.SSLStream[LeanSocketStream], Peer]:
        with trio.fail_after(WAIT):
            client_sock = trio.socket.socket()
            if rcvbuf is not None:  # before connect, so the window starts small
                client_sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            await client_sock.connect(("127.0.0.1", port))
            client = trio.SocketStream(client_sock)
            accepted = await listener.accept()
            if sndbuf is not None:
                accepted.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
            context = ticket_ctx if tickets else server_ctx
            server = trio.SSLStream(LeanSocketStream(accepted), context, server_side=True)
            peer = Peer(client, client_ctx)
            opened.extend([server, client])
            if not handshake:
                return server, peer
            async with trio.open_nursery() as nursery:
                nursery.start_soon(server.do_handshake)
                await peer.handshake()
        return server, peer

    try:
        yield open_one
    finally:
        for resource in opened:
            await trio.aclose_forcefully(resource)
        await listener.aclose()


class _Steps(trio.abc.Instrument):
    """Counts the times one task gave up the CPU (each ends one of its steps)."""

    def __init__(self, task: trio.lowlevel.Task) -> None:
        self.task = task
        self.count = 0

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        if task is self.task:
            self.count += 1


async def runs_without_yielding(operation: Callable[[], Awaitable[None]]) -> bool:
    """Whether ``operation`` completed without a scheduling point."""
    steps = _Steps(trio.lowlevel.current_task())
    trio.lowlevel.add_instrument(steps)
    try:
        await operation()
    finally:
        trio.lowlevel.remove_instrument(steps)
    return steps.count == 0


async def wait_until(condition: Callable[[], bool]) -> None:
    with trio.fail_after(WAIT):
        while not condition():  # noqa: ASYNC110 (trio's internals have no event for these)
            await trio.sleep(0.001)


def test_available_with_the_pinned_trio() -> None:
    assert fast_tls.AVAILABLE, fast_tls.UNAVAILABLE
    # pyproject.toml pins trio to the minor version these tests were written against.
    assert trio.__version__.rsplit(".", 1)[0] == fast_tls.TESTED_TRIO.rsplit(".", 1)[0]


SIZES = [1, 180, 181, 4000, 16384, 16385, 40000, 180, 0, 7]


@pytest.mark.parametrize("tickets", [False, True])
async def test_same_records_and_plaintext_as_the_stock_path(
    connect: Connect, tickets: bool
) -> None:
    stock_server, stock_peer = await connect(tickets=tickets)
    fast_server, fast_peer = await connect(tickets=tickets)
    writes = [os.urandom(size) for size in SIZES]
    expected = b"".join(writes)
    short = []
    for data in writes:
        await stock_server.send_all(data)
        short.append(await runs_without_yielding(partial(fast_tls.send_all, fast_server, data)))
    # The first write carries the delayed TLS 1.3 session tickets: SSLStream's path; an
    # empty write is SSLStream's checkpoint; the rest are short.
    assert short == [False] + [bool(size) for size in SIZES[1:]]
    for peer in (stock_peer, fast_peer):
        await peer.read_until(lambda p: len(p.plaintext) >= len(expected))
    assert fast_peer.plaintext == stock_peer.plaintext == expected
    assert fast_peer.records == stock_peer.records
    # Multi-record writes (and the tickets) included.
    records = sum(-(-size // 16384) for size in SIZES)
    assert len(fast_peer.records) == records + (2 if tickets else 0)


async def test_before_the_handshake_the_stock_path_does_it(connect: Connect) -> None:
    server, peer = await connect(handshake=False)
    with trio.fail_after(WAIT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fast_tls.send_all, server, b"early")
            await peer.handshake()
    await peer.read_until(lambda p: p.plaintext == b"early")
    assert await runs_without_yielding(partial(fast_tls.send_all, server, b"later"))
    await peer.read_until(lambda p: p.plaintext == b"earlylater")


async def test_partial_write_completes_in_order(connect: Connect) -> None:
    server, peer = await connect(sndbuf=4096, rcvbuf=4096)
    chunks = [bytes([index]) * 16384 for index in range(1, 41)]  # far more than both buffers
    await server.send_all(b"tickets")  # the delayed session tickets go the stock way
    assert await runs_without_yielding(lambda: fast_tls.send_all(server, b"first"))
    lock: trio.StrictFIFOLock = server._inner_send_lock
    done = trio.Event()

    async def writer() -> None:
        for chunk in chunks:
            await fast_tls.send_all(server, chunk)
        done.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer)
        # The peer does not read: a write is left with bytes the kernel did not take,
        # and waits for them holding trio's inner send lock.
        await wait_until(lock.locked)
        with pytest.raises(trio.BusyResourceError):  # as SSLStream.send_all would
            await fast_tls.send_all(server, b"meanwhile")
        expected = b"tickets" + b"first" + b"".join(chunks)
        await peer.read_until(lambda p: len(p.plaintext) >= len(expected))
        assert peer.plaintext == expected
    assert done.is_set()
    await fast_tls.send_all(server, b"after")  # the stream is fine afterwards
    await peer.read_until(lambda p: p.plaintext.endswith(b"after"))


async def test_key_update_with_a_pending_receive_and_a_blocked_write(connect: Connect) -> None:
    server, peer = await connect(sndbuf=4096, rcvbuf=4096)
    await server.send_all(b"tickets")
    received = bytearray()
    writes = [bytes([index]) * 16384 for index in range(1, 21)]
    lock: trio.StrictFIFOLock = server._inner_send_lock

    async def reader() -> None:
        while data := await server.receive_some():
            received.extend(data)

    async def writer() -> None:
        for data in writes:
            await fast_tls.send_all(server, data)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        await trio.testing.wait_all_tasks_blocked()  # receive_some is pending
        # 1. The peer updates its keys and asks for the server's while the server is
        # idle: trio's reader answers; the next short write uses the new keys.
        await peer.key_update()
        await peer.send(b"one")
        await wait_until(lambda: received == b"one")
        await fast_tls.send_all(server, b"after-update")
        await peer.read_until(lambda p: p.plaintext.endswith(b"after-update"))
        # 2. Again while a write waits under the inner send lock for the rest of its
        # bytes: the reader's KeyUpdate answer must queue behind them.
        nursery.start_soon(writer)
        await wait_until(lock.locked)
        await peer.key_update()
        await peer.send(b"two")
        await wait_until(lambda: received == b"onetwo")
        expected = b"tickets" + b"after-update" + b"".join(writes)
        await peer.read_until(lambda p: len(p.plaintext) >= len(expected))
        assert peer.plaintext == expected
        # 3. Many updates racing many short writes.
        for round_ in range(20):
            await peer.key_update()
            await peer.send(b"k")
            for _ in range(3):
                await fast_tls.send_all(server, b"r%d;" % round_)
                await trio.lowlevel.checkpoint()
        await wait_until(lambda: received == b"onetwo" + b"k" * 20)
        tail = b"".join(b"r%d;" % round_ * 3 for round_ in range(20))
        await peer.read_until(lambda p: p.plaintext.endswith(tail))
        assert peer.plaintext == expected + tail
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("close_delay", [0, 1, 2, 3])
@pytest.mark.parametrize("send_delay", [0, 1, 2])
async def test_write_racing_aclose(connect: Connect, close_delay: int, send_delay: int) -> None:
    server, peer = await connect()
    await server.send_all(b"tickets")
    outcome: list[str] = []

    async def closer() -> None:
        for _ in range(close_delay):
            await trio.lowlevel.checkpoint()
        await server.aclose()

    async def sender() -> None:
        for _ in range(send_delay):
            await trio.lowlevel.checkpoint()
        try:
            await fast_tls.send_all(server, b"racing")
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            outcome.append(type(exc).__name__)
        else:
            outcome.append("sent")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(closer)
        nursery.start_soon(sender)
    await peer.read_to_end()  # decrypts everything: a stray record would fail here
    assert peer.closed  # close_notify came last
    if outcome == ["sent"]:
        assert peer.plaintext == b"tickets" + b"racing"
    else:
        assert peer.plaintext == b"tickets"
    with pytest.raises(trio.ClosedResourceError):
        await fast_tls.send_all(server, b"late")


async def test_cancelled_before_writing_leaves_the_stream_usable(connect: Connect) -> None:
    server, peer = await connect()
    await server.send_all(b"tickets")
    with trio.CancelScope() as scope:
        scope.cancel()
        with pytest.raises(trio.Cancelled):
            await fast_tls.send_all(server, b"never")
    await fast_tls.send_all(server, b"next")
    await peer.read_until(lambda p: p.plaintext.endswith(b"next"))
    assert peer.plaintext == b"ticketsnext"


async def test_cancelled_while_sending_the_rest_breaks_the_stream(connect: Connect) -> None:
    server, _peer = await connect(sndbuf=4096, rcvbuf=4096)
    await server.send_all(b"tickets")
    lock: trio.StrictFIFOLock = server._inner_send_lock
    cancelled = False

    async def writer() -> None:
        nonlocal cancelled
        try:
            while True:
                await fast_tls.send_all(server, b"x" * 16384)
        except trio.Cancelled:
            cancelled = True
            raise

    with trio.fail_after(WAIT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer)
            await wait_until(lock.locked)
            nursery.cancel_scope.cancel()
    assert cancelled
    # Part of a record went out: as with SSLStream (python-trio/trio#198), the stream is
    # broken, and the lock was released so closing does not hang.
    assert not lock.locked()
    with pytest.raises(trio.BrokenResourceError):
        await fast_tls.send_all(server, b"more")
    with trio.fail_after(WAIT):
        await server.aclose()


async def test_cancelled_in_the_stock_fallback(connect: Connect) -> None:
    server, peer = await connect()
    # The first write goes to SSLStream.send_all (delayed session tickets); cancelled
    # before it starts, nothing is lost and the next write still carries them.
    with trio.CancelScope() as scope:
        scope.cancel()
        with pytest.raises(trio.Cancelled):
            await fast_tls.send_all(server, b"never")
    await fast_tls.send_all(server, b"first")
    await fast_tls.send_all(server, b"second")
    await peer.read_until(lambda p: p.plaintext.endswith(b"second"))
    assert peer.plaintext == b"firstsecond"


async def test_reset_peer(connect: Connect) -> None:
    server, peer = await connect()
    await server.send_all(b"tickets")
    await fast_tls.send_all(server, b"hello")
    await peer.read_until(lambda p: p.plaintext == b"ticketshello")
    peer.sock.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    peer.sock.socket.close()  # RST
    with trio.fail_after(WAIT):
        await trio.lowlevel.wait_readable(server.transport_stream.socket_stream.socket)
    with pytest.raises(trio.BrokenResourceError) as caught:
        await fast_tls.send_all(server, b"into the void")
    assert isinstance(caught.value.__cause__, ConnectionResetError | BrokenPipeError)
    with pytest.raises(trio.BrokenResourceError):  # broken for good, like SSLStream
        await fast_tls.send_all(server, b"again")
    with trio.fail_after(WAIT):
        await server.aclose()


async def test_other_transports_take_the_stock_path(pki: Pki) -> None:
    left, right = trio.testing.memory_stream_pair()
    server_ctx = tls.server_context(pki.cert("server"), pki.key("server"), pki.ca, "none")
    server = trio.SSLStream(left, server_ctx, server_side=True)
    client = trio.SSLStream(right, tls.client_context(pki.ca), server_hostname="127.0.0.1")
    with trio.fail_after(WAIT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.do_handshake)
            await client.do_handshake()
        await server.send_all(b"tickets")
        assert not await runs_without_yielding(lambda: fast_tls.send_all(server, b"stock"))
        received = b""
        while len(received) < len(b"ticketsstock"):
            received += await client.receive_some()
        assert received == b"ticketsstock"


@pytest.mark.parametrize("enabled", [False, True])
async def test_server_sessions_write_by_the_configured_path(
    start_server: StartServer, enabled: bool
) -> None:
    running = await start_server(tls_fast_path=enabled)
    alice = await running.login("alice")
    bob = await running.login("bob")
    texts = [f"line {index}" for index in range(20)]  # within the message burst
    for index, text in enumerate(texts):
        await alice.send(Say(room="lobby", text=text, id=f"c{index}"))
    received = [(await receive_type(bob, Message)).text for _ in texts]
    assert received == texts
    sessions = list(running.server._sessions)
    assert len(sessions) == 2
    for session in sessions:
        assert isinstance(session.transport, LineTransport)
        send_all = session.transport._send_all
        if enabled:
            assert isinstance(send_all, partial)
            assert send_all.func is fast_tls.send_all
        else:
            assert send_all == session.transport.stream.send_all


# --- the Flusher: one task writes for idle connections (securechat.delivery) -------------


class _WriterSteps(trio.abc.Instrument):
    """Counts the steps of the sessions' writer tasks (each wake-up is at least one)."""

    def __init__(self) -> None:
        self.count = 0

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        if task.name.endswith("Session._write_loop"):
            self.count += 1


@pytest.mark.parametrize("enabled", [False, True])
async def test_a_message_to_idle_connections_wakes_no_writer_task(
    start_server: StartServer, enabled: bool
) -> None:
    running = await start_server(tls_fast_path=enabled, presence_delay_ms=0)
    alice = await running.login("alice")
    receivers = [await running.login(name) for name in ("bob", "dave")]
    receivers.append(await running.login("carol", cert_user="carol"))
    receivers.append(await running.login("bob"))  # a second connection of bob's
    await trio.testing.wait_all_tasks_blocked()  # the logins' frames are written
    steps = _WriterSteps()
    trio.lowlevel.add_instrument(steps)
    try:
        for index in range(3):
            await alice.send(Say(room="lobby", text=f"hello {index}", id=f"c{index}"))
            for connection in receivers:
                assert (await receive_type(connection, Message)).text == f"hello {index}"
            await receive_type(alice, Message)
    finally:
        trio.lowlevel.remove_instrument(steps)
    if enabled:
        assert steps.count == 0  # the flusher wrote every message, ack and echo
    else:
        assert steps.count >= 3 * len(receivers)  # a writer wake-up per delivery


def _writer_tasks() -> int:
    """How many sessions' writer tasks exist now, anywhere in this run."""
    count, tasks = 0, [trio.lowlevel.current_root_task()]
    while tasks:
        task = tasks.pop()
        if task is None:
            continue
        count += task.name.endswith("Session._write_loop")
        tasks.extend(child for nursery in task.child_nurseries for child in nursery.child_tasks)
    return count


@pytest.mark.parametrize("enabled", [False, True])
async def test_an_idle_connection_has_no_writer_task_and_still_gets_its_frames(
    start_server: StartServer, enabled: bool
) -> None:
    """With the fast path, a connection's writer task ends whenever it has nothing left to
    write (an idle connection's memory, docs/performance.md); frames still arrive, and a
    write that cannot be done at once starts one again (the next test)."""
    running = await start_server(tls_fast_path=enabled, presence_delay_ms=0)
    alice = await running.login("alice")
    bob = await running.login("bob")
    await trio.testing.wait_all_tasks_blocked()
    assert _writer_tasks() == (0 if enabled else 2)
    await alice.send(Say(room="lobby", text="still there?", id="c1"))
    assert (await receive_type(bob, Message)).text == "still there?"
    await trio.testing.wait_all_tasks_blocked()
    assert _writer_tasks() == (0 if enabled else 2)


async def test_a_write_that_cannot_go_at_once_starts_a_writer_that_ends_when_done(
    start_server: StartServer,
) -> None:
    """A receiver that stops reading (small socket buffers at both ends) while ~400 KB of
    messages come: the flusher's writes stop part-way, a writer task is started to finish
    them, everything arrives in order once the receiver reads, and then the connection
    has no writer task again."""
    running = await start_server(
        tls_fast_path=True,
        presence_delay_ms=0,
        limits={"message_burst": 1000, "messages_per_second": 1000},
    )
    alice = await running.login("alice")
    bob = await running.login("bob")
    # Room in flight: about 150 KB (the kernel doubles these), so most of 400 KB waits.
    bob.stream.transport_stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    (session,) = [s for s in running.server._sessions if s.member and s.member.username == "bob"]
    server_side: Any = session.transport
    server_side.stream.transport_stream.raw_socket.setsockopt(
        socket.SOL_SOCKET, socket.SO_SNDBUF, 16384
    )
    await trio.testing.wait_all_tasks_blocked()
    assert _writer_tasks() == 0
    for n in range(100):
        await alice.send(Say(room="lobby", text=f"{n} " + "x" * 3900, id=f"c{n}"))
    # Alice's own copy of the last one: every message has been handed to bob's connection.
    while not (await receive_type(alice, Message)).text.startswith("99 "):
        pass
    await trio.testing.wait_all_tasks_blocked()
    assert _writer_tasks() == 1  # blocked on bob's full socket, the rest queued behind it
    texts = [(await receive_type(bob, Message)).text for _ in range(100)]
    assert [text.split(" ")[0] for text in texts] == [str(n) for n in range(100)]
    await trio.testing.wait_all_tasks_blocked()
    assert _writer_tasks() == 0
    await alice.send(Say(room="lobby", text="and after", id="after"))
    assert (await receive_type(bob, Message)).text == "and after"


Direct = tuple[Outbox, fast_tls.DirectWriter]


def _direct_outbox(
    server: trio.SSLStream[LeanSocketStream], flusher: Flusher, overflowed: list[bool]
) -> Direct:
    direct = fast_tls.DirectWriter(server)
    outbox = Outbox(
        1000, 10_000_000, lambda: overflowed.append(True), flusher=flusher, direct=direct
    )
    return outbox, direct


async def test_a_partial_direct_write_is_completed_by_the_writer_in_order(
    connect: Connect,
) -> None:
    server, peer = await connect(sndbuf=4096, rcvbuf=4096)
    await server.send_all(b"tickets")
    flusher = Flusher(None)
    overflowed: list[bool] = []
    outbox, _ = _direct_outbox(server, flusher, overflowed)
    lock: trio.StrictFIFOLock = server._inner_send_lock
    chunks = [bytes([index]) * 16000 for index in range(1, 41)]  # more than both buffers
    async with trio.open_nursery() as nursery:
        nursery.start_soon(flusher.run)
        nursery.start_soon(write_loop, outbox, partial(fast_tls.send_all, server), None)
        await trio.testing.wait_all_tasks_blocked()
        outbox.put(b"first")
        await peer.read_until(lambda p: p.plaintext == b"ticketsfirst")
        for chunk in chunks:
            outbox.put(chunk)
            await trio.lowlevel.checkpoint()
        # The peer does not read: a direct write was left unfinished, and the writer
        # task waits to send the rest under trio's inner send lock.
        await wait_until(lock.locked)
        assert outbox.unfinished is False  # the writer took it over
        expected = b"ticketsfirst" + b"".join(chunks)
        await peer.read_until(lambda p: len(p.plaintext) >= len(expected))
        assert peer.plaintext == expected
        await wait_until(lambda: outbox.queued_bytes == 0)
        # Idle again: the next frame is the flusher's, and the writer stays asleep.
        await trio.testing.wait_all_tasks_blocked()
        steps = _Steps(_find_task("write_loop"))
        trio.lowlevel.add_instrument(steps)
        outbox.put(b"after")
        await peer.read_until(lambda p: p.plaintext.endswith(b"after"))
        trio.lowlevel.remove_instrument(steps)
        assert steps.count == 0
        outbox.close()
        flusher.stop()
    assert not overflowed


def _find_task(name: str) -> trio.lowlevel.Task:
    """The one task whose name ends with ``name``."""
    found: list[trio.lowlevel.Task] = []

    def walk(task: trio.lowlevel.Task) -> None:
        if task.name.endswith(name):
            found.append(task)
        for nursery in task.child_nurseries:
            for child in nursery.child_tasks:
                walk(child)

    root = trio.lowlevel.current_root_task()
    assert root is not None
    walk(root)
    assert len(found) == 1, found
    return found[0]


async def test_the_flush_tick_holds_a_second_write_for_the_next_tick(connect: Connect) -> None:
    server, peer = await connect()
    await server.send_all(b"tickets")
    ticker = FlushTicker(0.02, 0)  # not running: the test moves it
    flusher = Flusher(ticker)
    overflowed: list[bool] = []
    outbox, _ = _direct_outbox(server, flusher, overflowed)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(flusher.run)
        nursery.start_soon(write_loop, outbox, partial(fast_tls.send_all, server), ticker)
        await trio.testing.wait_all_tasks_blocked()
        outbox.put(b"a")  # the first write after a quiet spell goes at once
        await peer.read_until(lambda p: p.plaintext == b"ticketsa")
        outbox.put(b"b")
        outbox.put(b"c")
        await trio.testing.wait_all_tasks_blocked()
        assert len(outbox) == 2  # held for the next tick, to be written as one
        ticker.count += 1
        flusher.tick()
        await peer.read_until(lambda p: p.plaintext == b"ticketsabc")
        assert len(outbox) == 0
        assert peer.records[-1][1] == len(b"bc") + 17  # one record: 2 bytes, type, tag
        outbox.close()
        ticker.stop()
        flusher.stop()


async def test_a_reset_peer_ends_the_writer_with_broken_resource(connect: Connect) -> None:
    server, peer = await connect()
    await server.send_all(b"tickets")
    await peer.read_until(lambda p: p.plaintext == b"tickets")
    flusher = Flusher(None)
    overflowed: list[bool] = []
    outbox, _ = _direct_outbox(server, flusher, overflowed)
    peer.sock.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    peer.sock.socket.close()  # RST
    with trio.fail_after(WAIT):
        await trio.lowlevel.wait_readable(server.transport_stream.socket_stream.socket)
    raised: list[BaseException] = []

    async def writer() -> None:
        try:
            await write_loop(outbox, partial(fast_tls.send_all, server), None)
        except trio.BrokenResourceError as exc:
            raised.append(exc)

    with trio.fail_after(WAIT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(flusher.run)
            nursery.start_soon(writer)
            await trio.testing.wait_all_tasks_blocked()
            outbox.put(b"into the void")  # the flusher's write breaks; the writer raises
            await wait_until(lambda: bool(raised))
            flusher.stop()
    assert isinstance(raised[0].__cause__, ConnectionResetError | BrokenPipeError)
    with pytest.raises(trio.BrokenResourceError):
        await fast_tls.send_all(server, b"again")


async def test_an_unexpected_error_in_a_direct_write_is_the_connections_not_the_flushers(
    connect: Connect,
) -> None:
    server, _peer = await connect()
    await server.send_all(b"tickets")
    direct = fast_tls.DirectWriter(server)
    assert direct.ready()
    # Not bytes: SSLObject.write raises TypeError, which nothing in the path expects.
    assert direct.write(cast(Any, "text")) is False
    assert not direct.ready()  # the stream is given up
    with pytest.raises(TypeError):
        await direct.finish()  # raised in the connection's own writer task
    with pytest.raises(trio.BrokenResourceError):
        await fast_tls.send_all(server, b"more")


async def test_after_a_partial_direct_write_reading_still_reads(connect: Connect) -> None:
    # A peer that writes and does not read until its writes are taken (as a client
    # uploading before it reads) must still be read from while the rest of a direct
    # write waits for it: the rest must not be left where a read would try to send it.
    server, peer = await connect(sndbuf=4096, rcvbuf=4096)
    await server.send_all(b"tickets")
    direct = fast_tls.DirectWriter(server)
    chunks = [bytes([index]) * 16000 for index in range(1, 41)]
    written = []
    for chunk in chunks:
        written.append(chunk)
        if not direct.write(chunk):
            break
    else:
        pytest.fail("the kernel took everything: the buffers are not small")
    upload = os.urandom(200_000)
    received = bytearray()
    with trio.fail_after(WAIT):
        async with trio.open_nursery() as nursery:

            async def upload_all() -> None:
                await peer.send(upload)

            nursery.start_soon(upload_all)
            while len(received) < len(upload):
                received += await server.receive_some()
    assert received == upload
    # The rest goes once the peer reads, before anything written after it.
    with trio.fail_after(WAIT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(direct.finish)
            expected = b"tickets" + b"".join(written)
            await peer.read_until(lambda p: len(p.plaintext) >= len(expected))
    await fast_tls.send_all(server, b"after")
    await peer.read_until(lambda p: p.plaintext.endswith(b"after"))
    assert peer.plaintext == b"tickets" + b"".join(written) + b"after"
