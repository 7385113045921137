"""LeanSocketStream over real loopback TCP: data, waiting, closing, resets and TLS on top.

Each test connects a :class:`LeanSocketStream` to a plain ``trio.SocketStream`` peer on
127.0.0.1; nothing is mocked. Anything that could hang is bounded by ``trio.fail_after``.
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import AsyncIterator

import pytest
import trio
import trio.lowlevel
import trio.testing

from securechat import tls
from securechat.protocol import ALPN_PROTOCOL
from securechat.transport import LeanSocketStream

from .conftest import WAIT, Pki

LARGE = 8 * 1024 * 1024


@pytest.fixture
async def pair() -> AsyncIterator[tuple[LeanSocketStream, trio.SocketStream]]:
    """A LeanSocketStream and the plain SocketStream at the other end of its connection."""
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    try:
        with trio.fail_after(WAIT):
            # The kernel completes the connection into the backlog; accept then takes it.
            peer = await trio.open_tcp_stream("127.0.0.1", listener.socket.getsockname()[1])
            accepted = await listener.accept()
    finally:
        await listener.aclose()
    lean = LeanSocketStream(accepted)
    try:
        yield lean, peer
    finally:
        await trio.aclose_forcefully(lean)
        await trio.aclose_forcefully(peer)


async def receive_exactly(stream: trio.abc.ReceiveStream, count: int, chunk: int = 65536) -> bytes:
    received = bytearray()
    while len(received) < count:
        data = await stream.receive_some(min(chunk, count - len(received)))
        assert data, f"EOF after {len(received)} of {count} bytes"
        received += data
    return bytes(received)


def reset_on_close(stream: trio.SocketStream) -> None:
    """Make closing ``stream`` send a TCP RST instead of a FIN."""
    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


async def test_round_trip_both_ways(pair: tuple[LeanSocketStream, trio.SocketStream]) -> None:
    lean, peer = pair
    with trio.fail_after(WAIT):
        await lean.send_all(b"from lean")
        assert await receive_exactly(peer, 9) == b"from lean"
        await peer.send_all(b"from peer")
        assert await receive_exactly(lean, 9) == b"from peer"
        await lean.send_all(memoryview(bytearray(b"a view")))
        assert await receive_exactly(peer, 6) == b"a view"


async def test_receive_some_returns_at_most_max_bytes(
    pair: tuple[LeanSocketStream, trio.SocketStream],
) -> None:
    lean, peer = pair
    with trio.fail_after(WAIT):
        await peer.send_all(b"0123456789")
        await trio.testing.wait_all_tasks_blocked()
        first = await lean.receive_some(4)
        assert first == b"0123"
        rest = await receive_exactly(lean, 6, chunk=3)
        assert rest == b"456789"


async def test_receive_some_returns_empty_at_eof(
    pair: tuple[LeanSocketStream, trio.SocketStream],
) -> None:
    lean, peer = pair
    with trio.fail_after(WAIT):
        await peer.send_all(b"last words")
        await peer.aclose()
        assert await receive_exactly(lean, 10) == b"last words"
        assert await lean.receive_some() == b""
        assert await lean.receive_some() == b""  # EOF stays EOF


async def test_receive_some_zero_is_refused(
    pair: tuple[LeanSocketStream, trio.SocketStream],
) -> None:
    lean, _ = pair
    with pytest.raises(ValueError, match="max_bytes"):
        await lean.receive_some(0)


async def test_large_send_to_slow_reader_arrives_whole_and_in_order(
    pair: tuple[LeanSocketStream, trio.SocketStream],
) -> None:
    lean, peer = pair
    payload = os.urandom(LARGE)  # not periodic: a skipped or repeated slice would show
    sent = trio.Event()

    async def send() -> None:
        await lean.send_all(payload)
        sent.set()

    with trio.fail_after(WAIT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(send)
            await trio.testing.wait_all_tasks_blocked()
            # The kernel buffers are full and nobody reads: the sender must be waiting.
            assert not sent.is_set()
            # Small reads: many partial writes.
            received = await receive_exactly(peer, LARGE, chunk=16384)
        assert sent.is_set()
    assert received == payload


async def test_receive_some_waits_for_data(
    pair: tuple[LeanSocketStream, trio.SocketStream],
) -> None:
    lean, peer = pair
    received: list[bytes] = []
    done = trio.Event()

    async def receive() -> None:
        received.append(await lean.receive_some())
        done.set()

    with trio.fail_after(WAIT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(receive)
            # A busy loop would never let every task block; returning b"" would set done.
            await trio.testing.wait_all_tasks_blocked()
            assert not done.is_set()
            await peer.send_all(b"wake up")
            await done.wait()
    assert received == [b"wake up"]


async def test_ready_io_completes_without_yielding(
    pair: tuple[LeanSocketStream, trio.SocketStream],
) -> None:
    lean, peer = pair
    with trio.fail_after(WAIT):
        await peer.send_all(b"ready")
        await trio.testing.wait_all_tasks_blocked()
    with trio.testing.assert_no_checkpoints():
        await lean.send_all(b"fits in the buffer")
        assert await lean.receive_some() == b"ready"
    with trio.fail_after(WAIT):
        assert await receive_exactly(peer, 18) == b"fits in the buffer"


async def test_calls_after_aclose_raise_closed(
    pair: tuple[LeanSocketStream, trio.SocketStream],
) -> None:
    lean, _ = pair
    await lean.aclose()
    assert lean.socket_stream.socket.fileno() == -1
    with pytest.raises(trio.ClosedResourceError):
        await lean.send_all(b"too late")
    with pytest.raises(trio.ClosedResourceError):
        await lean.receive_some()
    with pytest.raises(trio.ClosedResourceError):
        await lean.wait_send_all_might_not_block()


async def test_closed_stream_never_touches_a_reused_descriptor_number(
    pair: tuple[LeanSocketStream, trio.SocketStream],
) -> None:
    lean, _ = pair
    old_fd = lean.socket_stream.socket.fileno()
    read_end, write_end = os.pipe()  # made first, so neither end gets the old number
    await lean.aclose()
    try:
        os.set_blocking(read_end, False)
        os.dup2(write_end, old_fd)  # the old number is now someone else's pipe
        with pytest.raises(trio.ClosedResourceError):
            await lean.send_all(b"stray")
        with pytest.raises(BlockingIOError):
            os.read(read_end, 100)  # nothing was written into the pipe
        os.dup2(read_end, old_fd)
        os.write(write_end, b"not yours")
        with pytest.raises(trio.ClosedResourceError):
            await lean.receive_some()
        assert os.read(read_end, 100) == b"not yours"  # nothing was read from it
    finally:
        for fd in (old_fd, read_end, write_end):
            os.close(fd)


async def test_aclose_wakes_a_blocked_receive_with_closed(
    pair: tuple[LeanSocketStream, trio.SocketStream],
) -> None:
    lean, _ = pair
    outcome: list[BaseException] = []

    async def receive() -> None:
        try:
            await lean.receive_some()
        except trio.ClosedResourceError as exc:
            outcome.append(exc)

    with trio.fail_after(WAIT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(receive)
            await trio.testing.wait_all_tasks_blocked()
            await lean.aclose()
    assert len(outcome) == 1
    assert lean.socket_stream.socket.fileno() == -1


async def test_peer_reset_breaks_receive_some(
    pair: tuple[LeanSocketStream, trio.SocketStream],
) -> None:
    lean, peer = pair
    reset_on_close(peer)
    await peer.aclose()
    with trio.fail_after(WAIT), pytest.raises(trio.BrokenResourceError) as caught:
        await lean.receive_some()
    assert isinstance(caught.value.__cause__, ConnectionResetError)


async def test_peer_reset_breaks_send_all(
    pair: tuple[LeanSocketStream, trio.SocketStream],
) -> None:
    lean, peer = pair
    reset_on_close(peer)
    await peer.aclose()
    with trio.fail_after(WAIT):
        await trio.lowlevel.wait_readable(lean.socket_stream.socket)  # the RST has arrived
    with pytest.raises(trio.BrokenResourceError) as caught:
        await lean.send_all(b"x" * 4096)
    assert isinstance(caught.value.__cause__, ConnectionResetError | BrokenPipeError)


async def test_tls_handshake_and_echo_over_lean_transport(
    pair: tuple[LeanSocketStream, trio.SocketStream], pki: Pki
) -> None:
    lean, peer = pair
    server_ctx = tls.server_context(pki.cert("server"), pki.key("server"), pki.ca, "none")
    server = trio.SSLStream(lean, server_ctx, server_side=True)
    client = trio.SSLStream(peer, tls.client_context(pki.ca), server_hostname="127.0.0.1")
    message = os.urandom(300_000)  # several TLS records, more than one socket buffer

    async def echo() -> None:
        await server.do_handshake()
        assert server.selected_alpn_protocol() == ALPN_PROTOCOL
        data = await receive_exactly(server, len(message))
        await server.send_all(data)
        assert await server.receive_some() == b""  # the client's close_notify
        await server.aclose()

    with trio.fail_after(WAIT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(echo)
            await client.do_handshake()
            assert client.selected_alpn_protocol() == ALPN_PROTOCOL
            await client.send_all(message)
            assert await receive_exactly(client, len(message)) == message
            await client.aclose()
    assert lean.socket_stream.socket.fileno() == -1
