"""The line transport: newline-framed JSON envelopes over a ``trio.SSLStream``.

Everything a :class:`~securechat.session.Session` needs of a TLS
connection, and nothing of the chat: frames in (:class:`FrameReader` over
the stream, with the frame size cap of :class:`~securechat.protocol.FrameDecoder`),
batches of frames out (one TLS record at a time), and the user name of the
verified client certificate. The client reads the server's frames with the
same :class:`FrameReader`. A WebSocket transport is a second adapter of the
same shape.
"""

from __future__ import annotations

import trio

from .certs import common_name
from .protocol import FrameDecoder
from .transport import LeanSocketStream

# What one read asks of the stream: a TLS record holds at most 16 KiB, so
# this takes whatever a few records brought.
RECEIVE_BYTES = 65536
# The most plaintext one TLS record holds. A batch is encrypted a record at a
# time, so that the ciphertext the stream holds while the peer does not
# read, and the buffer OpenSSL keeps for it, stay that small.
TLS_RECORD_BYTES = 16 * 1024


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


class TlsLineTransport:
    """A session's transport over a TLS connection whose handshake is done."""

    def __init__(
        self,
        stream: trio.SSLStream[LeanSocketStream],
        *,
        peer: str,
        host: str,
        max_frame_bytes: int,
    ) -> None:
        self.stream = stream
        self.peer = peer
        self.host = host
        self._frames = FrameReader(stream, FrameDecoder(max_frame_bytes))

    def certificate_user(self) -> str | None:
        certificate = self.stream.getpeercert()
        return common_name(certificate.get("subject")) if certificate else None

    def pending_frame(self) -> bytes | None:
        return self._frames.buffered()

    async def receive_frame(self) -> bytes | None:
        return await self._frames.next()

    async def send(self, data: bytes) -> None:
        if len(data) <= TLS_RECORD_BYTES:
            await self.stream.send_all(data)
            return
        view = memoryview(data)
        for start in range(0, len(view), TLS_RECORD_BYTES):
            await self.stream.send_all(view[start : start + TLS_RECORD_BYTES])
