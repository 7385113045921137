"""The line transport: newline-framed JSON envelopes over a byte stream.

Everything a :class:`~securechat.session.Session` needs of a connection
whose frames are lines (docs/protocol.md §2), and nothing of the chat:
frames in (:class:`FrameReader`, with the frame size cap of
:class:`~securechat.protocol.FrameDecoder`), batches of frames out, and the
user name of the client's verified certificate, which the server reads from
the TLS handshake. In the server the stream is a ``trio.SSLStream``; tests
run sessions over ``trio.testing.memory_stream_pair``. The client reads the
server's frames with the same :class:`FrameReader`. A WebSocket transport is
a second adapter of the same shape.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import trio

from .protocol import FrameDecoder

# What one read asks of the stream: a TLS record holds at most 16 KiB, so
# this takes whatever a few records brought.
RECEIVE_BYTES = 65536
# Batches are written this much at a time: the most plaintext one TLS record
# holds. So a TLS stream encrypts a record at a time, and the ciphertext it
# holds while the peer does not read (and OpenSSL's buffer for it) stays small.
WRITE_BYTES = 16 * 1024


class FrameReader:
    """Frames from a byte stream: reads only when no complete frame is buffered."""

    def __init__(self, stream: trio.abc.ReceiveStream, decoder: FrameDecoder) -> None:
        self._stream = stream
        self._decoder = decoder

    def buffered(self) -> bytes | None:
        """The next frame if it has already arrived (no waiting, no checkpoint)."""
        return self._decoder.next_frame()

    async def next(self) -> bytes | None:
        """The next frame, or None at end of stream; raises ProtocolError (fatal) for a
        frame over the size cap."""
        while (frame := self._decoder.next_frame()) is None:
            data = await self._stream.receive_some(RECEIVE_BYTES)
            if not data:
                return None
            self._decoder.feed(data)
        return frame


class LineTransport:
    """A session's transport over a stream of lines (in the server: TLS, handshake done)."""

    kind = "tls"  # the metrics' transport label: the line protocol on its TLS port

    def __init__(
        self,
        stream: trio.abc.Stream,
        *,
        peer: str,
        host: str,
        max_frame_bytes: int,
        certificate_user: str | None = None,
        send_all: Callable[[bytes | memoryview], Awaitable[None]] | None = None,
    ) -> None:
        """``send_all``: what writes to ``stream`` (the server's ``[server] tls_fast_path``
        passes :func:`securechat.fast_tls.send_all` over its TLS stream); by default
        ``stream.send_all``."""
        self.stream = stream
        self._send_all = stream.send_all if send_all is None else send_all
        self.peer = peer
        self.host = host
        self._certificate_user = certificate_user
        self._frames = FrameReader(stream, FrameDecoder(max_frame_bytes))

    def certificate_user(self) -> str | None:
        return self._certificate_user

    def pending_frame(self) -> bytes | None:
        return self._frames.buffered()

    async def receive_frame(self) -> bytes | None:
        return await self._frames.next()

    async def send(self, data: bytes) -> None:
        if len(data) <= WRITE_BYTES:
            await self._send_all(data)
            return
        view = memoryview(data)
        for start in range(0, len(view), WRITE_BYTES):
            await self._send_all(view[start : start + WRITE_BYTES])
