"""The WebSocket transport: one JSON envelope per WebSocket text message (wsproto).

The session's second adapter (the first is :mod:`securechat.lines`): the same
:class:`~securechat.session.Transport` members over a WebSocket whose opening
handshake HTTP has done (:func:`accept_headers` checks the upgrade request and
makes the 101's headers; :meth:`securechat.http.HttpConnection.switch_protocols`
sends them). The envelopes, login, limits, rate rules and the session's own
``ping`` envelopes are the line protocol's, unchanged; only the framing differs.

The framing's rules, each a close code (RFC 6455 §7.4) after an ``error``
envelope where one can still be sent:

- a text message over ``max_frame_bytes`` (UTF-8 bytes, however fragmented):
  ``frame_too_large``, close 1009; the message is never held whole;
- more than :data:`MAX_FRAGMENTS` frames in one message: close 1009 too;
- a binary message: ``bad_frame``, close 1003;
- invalid UTF-8: ``bad_frame``, close 1007; any other broken framing (unmasked
  frames, bad opcodes, oversized control frames): close 1002.

WebSocket pings are answered with pongs (only the latest, as RFC 6455 §5.5.3
allows), and the server sends its own after every ``ping_interval`` without
data from the client (the server gives half the session's ``idle_timeout``):
browsers answer them by themselves, which keeps proxies from dropping a quiet
connection and shows a dead one at the next write. The liveness rule stays the
session's (a ``ping`` envelope after a silence, answered by the page).

No extension is accepted (no compression: compressed secrets beside
attacker-chosen text leak through sizes) and no subprotocol is chosen.

wsproto does no I/O: this class reads the stream, feeds the parser, and writes
what it produces, under one lock (the session's writer and the pongs of the
reader share the stream).
"""

from __future__ import annotations

import base64
import binascii
import math
import struct
from collections import deque

import trio
from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.events import (
    BytesMessage,
    CloseConnection,
    Event,
    Message,
    Ping,
    Pong,
    TextMessage,
)
from wsproto.frame_protocol import CloseReason
from wsproto.utilities import LocalProtocolError, generate_accept_token

from .http import HttpError, Request
from .protocol import ErrorCode, ProtocolError

RECEIVE_BYTES = 65536
# Frames are written this much at a time: a TLS record's worth (as lines.WRITE_BYTES).
WRITE_BYTES = 16 * 1024
# How long a close handshake may take: our Close written, the client's read.
CLOSE_TIMEOUT = 1.0
# Fragments (frames) one message may arrive in.
MAX_FRAGMENTS = 1024
# What a client may still send while we wait for its Close (discarded).
CLOSE_DRAIN_BYTES = 256 * 1024
WEBSOCKET_VERSION = "13"


def text_frame(payload: bytes) -> bytes:
    """One unmasked, final text frame holding ``payload`` (UTF-8), as a server sends it
    (RFC 6455 §5.2)."""
    size = len(payload)
    if size < 126:
        return bytes((0x81, size)) + payload
    if size < 65536:
        return struct.pack("!BBH", 0x81, 126, size) + payload
    return struct.pack("!BBQ", 0x81, 127, size) + payload


def accept_headers(request: Request) -> list[tuple[str, str]]:
    """The headers of the 101 that accepts ``request`` as a WebSocket opening handshake
    (RFC 6455 §4.2); raises HttpError (400, or 426 for another version) if it is not one."""
    if request.method != "GET":
        raise HttpError(400, "a WebSocket opens with GET")
    if "websocket" not in request.header_tokens("upgrade") or "upgrade" not in (
        request.header_tokens("connection")
    ):
        raise HttpError(
            426,
            "this address is a WebSocket",
            (("Upgrade", "websocket"), ("Connection", "Upgrade")),
        )
    if request.header("sec-websocket-version") != WEBSOCKET_VERSION:
        raise HttpError(
            426, "WebSocket version 13 only", (("Sec-WebSocket-Version", WEBSOCKET_VERSION),)
        )
    key = (request.header("sec-websocket-key") or "").strip()
    try:
        nonce = base64.b64decode(key, validate=True)
    except (binascii.Error, ValueError):
        nonce = b""
    if len(nonce) != 16:
        raise HttpError(400, "Sec-WebSocket-Key must be 16 bytes in base64")
    return [
        ("Upgrade", "websocket"),
        ("Connection", "Upgrade"),
        ("Sec-WebSocket-Accept", generate_accept_token(key.encode("ascii")).decode("ascii")),
    ]


class WebSocketTransport:
    """A session's transport over an open WebSocket (in the server: TLS, after the 101)."""

    kind = "ws"  # the metrics' transport label

    def __init__(
        self,
        stream: trio.abc.Stream,
        received: bytes = b"",
        *,
        peer: str,
        host: str,
        max_frame_bytes: int,
        certificate_user: str | None = None,
        ping_interval: float = math.inf,
    ) -> None:
        """``received``: what the client sent after its upgrade request, already read."""
        self.stream = stream
        self.peer = peer
        self.host = host
        self.max_frame_bytes = max_frame_bytes
        self._certificate_user = certificate_user
        self._ws = Connection(ConnectionType.SERVER)
        self._unread = received
        self._frames: deque[bytes] = deque()
        self._fatal: ProtocolError | None = None
        self._parts: list[bytes] = []
        self._size = 0
        self._fragments = 0
        self._pong: Pong | None = None
        self.ping_interval = ping_interval
        self._pings = 0  # WebSocket pings sent
        self._their_close: CloseConnection | None = None
        self._ended = False  # the stream ended without a Close
        self._lock = trio.Lock()
        # The code our Close will carry; a fatal framing error sets its own.
        self.close_code: int = CloseReason.NORMAL_CLOSURE

    def certificate_user(self) -> str | None:
        return self._certificate_user

    def going_away(self) -> None:
        """Close with 1001 (the server is shutting down) unless an error set a code."""
        if self.close_code == CloseReason.NORMAL_CLOSURE:
            self.close_code = CloseReason.GOING_AWAY

    def pending_frame(self) -> bytes | None:
        return self._frames.popleft() if self._frames else None

    async def receive_frame(self) -> bytes | None:
        while not self._frames:
            if self._fatal is not None:
                raise self._fatal
            if self._their_close is not None or self._ended:
                return None
            data = self._unread or await self._receive_data()
            self._unread = b""
            if not data:
                self._ended = True
                return None
            self._ws.receive_data(data)
            self._take_events()
            if self._pong is not None:
                pong, self._pong = self._pong, None
                await self._write_events([pong])
        return self._frames.popleft()

    async def _receive_data(self) -> bytes:
        """The next bytes from the client; a WebSocket Ping after each ``ping_interval``
        of silence."""
        while True:
            with trio.move_on_after(self.ping_interval):
                return bytes(await self.stream.receive_some(RECEIVE_BYTES))
            if self._ws.state is ConnectionState.OPEN:
                self._pings += 1
                await self._write_events([Ping(payload=b"%d" % self._pings)])

    def _take_events(self) -> None:
        """Turn what the parser has into frames, a pong to send, the client's Close or a
        fatal error (after which nothing more is read)."""
        for event in self._ws.events():
            if isinstance(event, TextMessage):
                part = event.data.encode("utf-8")
                self._size += len(part)
                self._fragments += event.frame_finished
                if self._size > self.max_frame_bytes or self._fragments > MAX_FRAGMENTS:
                    self._fail(
                        CloseReason.MESSAGE_TOO_BIG,
                        ErrorCode.FRAME_TOO_LARGE,
                        f"message longer than {self.max_frame_bytes} bytes"
                        if self._size > self.max_frame_bytes
                        else f"message in more than {MAX_FRAGMENTS} fragments",
                    )
                    return
                self._parts.append(part)
                if event.message_finished:
                    self._frames.append(b"".join(self._parts))
                    self._parts.clear()
                    self._size = self._fragments = 0
            elif isinstance(event, BytesMessage):
                self._fail(
                    CloseReason.UNSUPPORTED_DATA,
                    ErrorCode.BAD_FRAME,
                    "binary messages are not accepted: send JSON as text",
                )
                return
            elif isinstance(event, Ping):
                self._pong = event.response()
            elif isinstance(event, CloseConnection):
                if self._ws.state is ConnectionState.REMOTE_CLOSING:
                    self._their_close = event
                else:  # wsproto reports a framing error as a Close of its own
                    code = event.code
                    if code != CloseReason.INVALID_FRAME_PAYLOAD_DATA:
                        code = CloseReason.PROTOCOL_ERROR
                    self._fail(code, ErrorCode.BAD_FRAME, f"invalid WebSocket data: {event.reason}")
                return
            # Pong: nothing to do (the session's own pings are envelopes).

    def _fail(self, close_code: int, code: ErrorCode, message: str) -> None:
        self.close_code = close_code
        self._fatal = ProtocolError(code, message, fatal=True)
        self._parts.clear()

    async def send(self, data: bytes) -> None:
        """Send encoded frames (newline-joined): each as one text message."""
        if self._ws.state is not ConnectionState.OPEN:
            raise trio.BrokenResourceError("the WebSocket is closing")
        # Server frames are unmasked, uncompressed and already UTF-8 JSON: framed
        # here (text_frame), a sixth of what wsproto's general path costs per message.
        out = b"".join(text_frame(frame) for frame in data.split(b"\n") if frame)
        await self._take_stream()
        try:
            if len(out) <= WRITE_BYTES:
                await self.stream.send_all(out)
                return
            view = memoryview(out)
            for start in range(0, len(view), WRITE_BYTES):
                await self.stream.send_all(view[start : start + WRITE_BYTES])
        finally:
            self._lock.release()

    async def _write_events(self, events: list[Event]) -> None:
        """Control frames (pongs, Close), through wsproto, which tracks the closing state."""
        await self._take_stream()
        try:
            out = bytearray()
            for event in events:
                try:
                    out += self._ws.send(event)
                except LocalProtocolError:
                    raise trio.BrokenResourceError("the WebSocket is closing") from None
            await self.stream.send_all(out)
        finally:
            self._lock.release()

    async def _take_stream(self) -> None:
        """The stream to ourselves (the session's writer and the reader's pongs share
        it); release ``_lock`` after. Taken without a scheduling point when free: the
        stream's send_all has one already (LeanSocketStream avoids a second one too)."""
        try:
            self._lock.acquire_nowait()
        except trio.WouldBlock:
            await self._lock.acquire()

    async def close(self) -> bool:
        """The closing handshake: answer the client's Close, or send ours (``close_code``)
        and, after a clean end, wait a moment for the client's. Returns whether the stream
        may say goodbye (False when a write was cut off)."""
        if self._ended:
            return True
        done = False
        with trio.move_on_after(CLOSE_TIMEOUT):
            if self._their_close is not None:
                await self._write_events([self._their_close.response()])
            elif self._ws.state is ConnectionState.OPEN:
                await self._write_events([CloseConnection(code=self.close_code)])
            done = True
            if self._fatal is None:
                await self._await_their_close()
        return done

    async def _await_their_close(self) -> None:
        drained = 0
        while self._ws.state is ConnectionState.LOCAL_CLOSING and drained < CLOSE_DRAIN_BYTES:
            data = bytes(await self.stream.receive_some(RECEIVE_BYTES))
            if not data:
                return
            drained += len(data)
            self._ws.receive_data(data)
            for event in self._ws.events():
                if isinstance(event, CloseConnection | Message):
                    continue  # messages after our Close are dropped; a Close ends the wait
