"""The TCP stream under each server connection's ``trio.SSLStream``.

``trio.SocketStream`` makes every ``send_all`` and ``receive_some`` a
scheduling point, even when the kernel takes or returns the bytes at once.
Under ``trio.SSLStream`` that is a second one per call: SSLStream already
yields once when it takes its internal send or receive lock, and it
serialises the calls to its transport. On a busy server that double yield
is a full scheduler pass per delivered message (profiled: see
docs/performance.md).

:class:`LeanSocketStream` is that transport without the second yield: it
calls ``write``/``read`` on the socket first and waits for readiness only
when the kernel says it would block. It is meant to be used only as the
transport of an ``SSLStream``, which provides the checkpoint. Everything
else (TCP_NODELAY, closing, the socket itself) stays with the
``trio.SocketStream`` it wraps. POSIX only (``os.write``/``os.read`` on
the socket's descriptor), like the rest of the server.

:meth:`LeanSocketStream.send_nowait` is the one write that never waits:
``socket.send`` on the standard-library socket inside trio's socket (its
``_sock``, a trio internal; None when a trio version lacks it), for
:mod:`securechat.fast_tls`.
"""

from __future__ import annotations

import errno
import os
import socket

import trio

# What SocketStream reads when asked for "some" bytes.
DEFAULT_RECEIVE_SIZE = 65536


class LeanSocketStream(trio.abc.Stream):
    """A connected TCP socket whose calls yield only when they have to wait."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.socket_stream = stream
        self._socket = stream.socket
        # The standard-library socket trio's socket wraps (trio internal): ``send``
        # on it costs less than ``os.write`` on the descriptor (docs/performance.md).
        raw = getattr(stream.socket, "_sock", None)
        self.raw_socket: socket.socket | None = raw if isinstance(raw, socket.socket) else None

    def _fd(self) -> int:
        # Looked up on every call: a closed trio socket reports -1, so a
        # stale number is never written to after the descriptor is reused.
        fd = self._socket.fileno()
        if fd < 0:
            raise trio.ClosedResourceError("the socket was closed")
        return fd

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        with memoryview(data) as view:
            sent = 0
            while sent < len(view):
                fd = self._fd()
                try:
                    sent += os.write(fd, view[sent:])
                except BlockingIOError:
                    await trio.lowlevel.wait_writable(fd)
                except OSError as exc:
                    raise _translate(exc) from exc

    def send_nowait(self, data: bytes | bytearray | memoryview) -> int:
        """Write what the kernel takes now, without waiting; returns how many bytes it took
        (0 when the socket buffer is full). Only when :attr:`raw_socket` is not None."""
        raw = self.raw_socket
        assert raw is not None
        try:
            return raw.send(data)
        except BlockingIOError:
            return 0
        except OSError as exc:  # a closed trio socket closed ``raw`` too: EBADF
            raise _translate(exc) from exc

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.wait_writable(self._fd())

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        size = DEFAULT_RECEIVE_SIZE if max_bytes is None else max_bytes
        if size < 1:
            raise ValueError("max_bytes must be >= 1")
        while True:
            fd = self._fd()
            try:
                return os.read(fd, size)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(fd)
            except OSError as exc:
                raise _translate(exc) from exc

    async def aclose(self) -> None:
        await self.socket_stream.aclose()


def _translate(exc: OSError) -> trio.BrokenResourceError | trio.ClosedResourceError:
    """As SocketStream does: EBADF means closed, anything else (EPIPE, ECONNRESET...) broken."""
    if exc.errno == errno.EBADF:
        return trio.ClosedResourceError("the socket was closed")
    return trio.BrokenResourceError(f"socket connection broken: {exc.strerror or exc}")
