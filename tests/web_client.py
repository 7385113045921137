"""Test clients for the web side of a real server: raw HTTP/1.1 and a WebSocket (wsproto)
over real TLS, the way a browser reaches it (ALPN ``http/1.1``, or none)."""

from __future__ import annotations

import re
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import trio
from wsproto import WSConnection
from wsproto.connection import ConnectionType
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Event,
    Message,
    Ping,
    Pong,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)

from securechat.client import ChatConnection
from securechat.protocol import ClientEnvelope, ServerEnvelope, encode, parse_server_frame

from .conftest import WAIT, Endpoint

BROWSER_ALPN = ("h2", "http/1.1")


def web_context(server: Endpoint, alpn: Sequence[str] | None = BROWSER_ALPN) -> ssl.SSLContext:
    """A browser-like client context: trusts the test CA, offers ``alpn``."""
    context = ssl.create_default_context(cafile=str(server.pki.ca))
    if alpn:
        context.set_alpn_protocols(list(alpn))
    return context


async def open_tls(
    server: Endpoint,
    alpn: Sequence[str] | None = BROWSER_ALPN,
    *,
    context: ssl.SSLContext | None = None,
) -> trio.SSLStream[trio.SocketStream]:
    """A TLS connection to ``server``, closed with the test's other clients at teardown."""
    tcp = await trio.open_tcp_stream(server.host, server.port)
    if context is None:
        context = web_context(server, alpn)
    stream = trio.SSLStream(tcp, context, server_hostname=server.host)
    server.connections.append(ChatConnection(stream))
    with trio.fail_after(WAIT):
        await stream.do_handshake()
    return stream


def origin(server: Endpoint) -> str:
    return f"https://{server.host}:{server.port}"


@dataclass
class Answer:
    status: int
    headers: dict[str, str]  # lower-case names
    body: bytes


_STATUS = re.compile(rb"HTTP/1\.1 (\d{3}) [^\r\n]*\r\n")


async def read_until_closed(stream: trio.abc.ReceiveStream) -> bytes:
    """Everything until the server closes (a reset counts as a close)."""
    received = bytearray()
    with trio.fail_after(WAIT):
        while True:
            try:
                data = await stream.receive_some(65536)
            except trio.BrokenResourceError:
                return bytes(received)
            if not data:
                return bytes(received)
            received += data


def parse_answers(data: bytes, *, head_only: bool = False) -> list[Answer]:
    """The responses in ``data`` (Content-Length framing, as the server sends)."""
    answers = []
    while data:
        match = _STATUS.match(data)
        assert match, data[:200]
        head, _, rest = data.partition(b"\r\n\r\n")
        headers: dict[str, str] = {}
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        length = 0 if head_only else int(headers.get("content-length", "0"))
        answers.append(Answer(int(match[1]), headers, rest[:length]))
        data = rest[length:]
    return answers


async def http_exchange(
    server: Endpoint, sent: bytes, alpn: Sequence[str] | None = BROWSER_ALPN
) -> list[Answer]:
    """Send raw ``sent`` and collect every response until the server closes."""
    stream = await open_tls(server, alpn)
    try:
        await stream.send_all(sent)
        data = await read_until_closed(stream)
    finally:
        await trio.aclose_forcefully(stream)
    return parse_answers(data, head_only=sent.startswith(b"HEAD "))


def get(path: str, server: Endpoint, *extra: str, close: bool = True) -> bytes:
    lines = [f"GET {path} HTTP/1.1", f"Host: {server.host}:{server.port}", *extra]
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


class WebSocketClient:
    """A WebSocket client (wsproto) over real TLS."""

    def __init__(self, stream: trio.SSLStream[trio.SocketStream]) -> None:
        self.stream = stream
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.events: list[Event] = []
        self._text: list[str] = []
        self.closed: CloseConnection | None = None
        self.pongs: list[bytes] = []
        self.pings: list[bytes] = []  # the server's WebSocket pings (answered)

    @classmethod
    async def connect(
        cls,
        server: Endpoint,
        *,
        origin_header: str | None = "",
        alpn: Sequence[str] | None = BROWSER_ALPN,
        context: ssl.SSLContext | None = None,
    ) -> WebSocketClient:
        """Open ``/ws``; ``origin_header`` "" means the server's own origin, None none."""
        client = cls(await open_tls(server, alpn, context=context))
        headers: list[tuple[bytes, bytes]] = []
        if origin_header is not None:
            headers.append((b"origin", (origin_header or origin(server)).encode()))
        await client.stream.send_all(
            client.ws.send(
                Request(host=f"{server.host}:{server.port}", target="/ws", extra_headers=headers)
            )
        )
        event = await client.next_event()
        if not isinstance(event, AcceptConnection):
            raise Refused(event)
        return client

    async def next_event(self) -> Event:
        with trio.fail_after(WAIT):
            while not self.events:
                try:
                    data = await self.stream.receive_some(65536)
                except trio.BrokenResourceError:
                    data = b""
                self.ws.receive_data(bytes(data) or None)
                self.events.extend(self.ws.events())
            return self.events.pop(0)

    async def send_envelope(self, envelope: ClientEnvelope) -> None:
        await self.send_text(encode(envelope).decode().rstrip("\n"))

    async def send_text(self, text: str) -> None:
        await self.stream.send_all(self.ws.send(TextMessage(data=text)))

    async def send_event(self, event: Event) -> None:
        await self.stream.send_all(self.ws.send(event))

    async def receive(self) -> ServerEnvelope | None:
        """The next envelope; None once the server closed (``closed`` holds its Close).
        Answers the server's Close as a browser does."""
        while True:
            if self.closed is not None:
                return None
            event = await self.next_event()
            if isinstance(event, TextMessage):
                self._text.append(event.data)
                if event.message_finished:
                    frame = "".join(self._text)
                    self._text.clear()
                    return parse_server_frame(frame.encode())
            elif isinstance(event, CloseConnection):
                self.closed = event
                if self.ws.state.name == "REMOTE_CLOSING":
                    await self.stream.send_all(self.ws.send(event.response()))
                return None
            elif isinstance(event, Pong):
                self.pongs.append(bytes(event.payload))
            elif isinstance(event, Ping):
                self.pings.append(bytes(event.payload))
                await self.send_event(event.response())
            elif isinstance(event, BytesMessage | Message):
                raise AssertionError(f"unexpected {event!r}")

    async def receive_type(self, kind: type[Any]) -> Any:
        while True:
            envelope = await self.receive()
            assert envelope is not None, f"closed ({self.closed}) waiting for {kind.__name__}"
            if isinstance(envelope, kind):
                return envelope

    async def receive_closed(self) -> list[ServerEnvelope]:
        """Every envelope until the server's Close."""
        received = []
        while (envelope := await self.receive()) is not None:
            received.append(envelope)
        return received

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)


class Refused(Exception):
    def __init__(self, event: Event) -> None:
        super().__init__(repr(event))
        self.event = event

    @property
    def status(self) -> int:
        assert isinstance(self.event, RejectConnection | RejectData), self.event
        if isinstance(self.event, RejectConnection):
            return self.event.status_code
        raise AssertionError(self.event)
