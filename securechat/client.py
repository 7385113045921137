"""The chat client: a TLS connection speaking protocol v1, and the chat loop on top.

:class:`ChatConnection` is the thin Trio layer (connect, verify the server,
log in, send and receive envelopes); tests and benchmarks use it directly.
:class:`ChatSession` is the interactive loop behind ``securechat client``:
lines typed at the ``send>>>`` prompt become ``say`` envelopes, slash
commands are handled locally, and incoming messages are shown as they arrive.
Input parsing and message formatting are plain functions.
"""

from __future__ import annotations

import ssl
from contextlib import suppress
from dataclasses import dataclass
from datetime import datetime
from itertools import count
from types import TracebackType

import trio
from pydantic import SecretStr

from . import tls
from .console import Console
from .protocol import (
    DEFAULT_MAX_FRAME_BYTES,
    LOBBY,
    MAX_TEXT_CHARS,
    Ack,
    Bye,
    Error,
    FrameDecoder,
    Hello,
    Message,
    Ping,
    Pong,
    ProtocolError,
    Say,
    Welcome,
    encode,
    parse_server_frame,
)

CONNECT_TIMEOUT = 10.0
LOGIN_TIMEOUT = 15.0
ACK_TIMEOUT = 30.0
RECEIVE_BYTES = 65536

ServerEnvelope = Welcome | Message | Ack | Pong | Error
ClientEnvelope = Hello | Say | Ping | Bye


class ClientError(Exception):
    """Connecting or logging in failed; the message is one line for the user."""


class ChatConnection:
    """One authenticated-or-about-to-be TLS connection to a securechat server."""

    def __init__(
        self,
        stream: trio.SSLStream[trio.SocketStream],
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
    ) -> None:
        self.stream = stream
        self._decoder = FrameDecoder(max_frame_bytes)
        self._send_lock = trio.Lock()

    @classmethod
    async def open(cls, host: str, port: int, ssl_context: ssl.SSLContext) -> ChatConnection:
        """Connect and finish the TLS handshake; raises :class:`ClientError`."""
        where = f"{host}:{port}"
        try:
            with trio.fail_after(CONNECT_TIMEOUT):
                tcp = await trio.open_tcp_stream(host, port)
        except trio.TooSlowError:
            raise ClientError(f"cannot connect to {where}: timed out") from None
        except OSError as exc:
            raise ClientError(f"cannot connect to {where}: {_connect_failure(exc)}") from None
        stream = trio.SSLStream(tcp, ssl_context, server_hostname=host)
        try:
            with trio.fail_after(CONNECT_TIMEOUT):
                await stream.do_handshake()
        except trio.TooSlowError:
            await trio.aclose_forcefully(stream)
            raise ClientError(f"TLS handshake with {where} timed out") from None
        except trio.BrokenResourceError as exc:
            await trio.aclose_forcefully(stream)
            raise ClientError(tls.describe_failure(exc, where)) from None
        return cls(stream)

    async def login(self, username: str, password: SecretStr | None) -> Welcome:
        """Send ``hello`` and wait for ``welcome``; raises :class:`ClientError`."""
        await self.send(Hello(username=username, password=password, id="login"))
        with trio.move_on_after(LOGIN_TIMEOUT):
            try:
                reply = await self.receive()
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                if not tls.is_unexpected_eof(exc):
                    raise ClientError(tls.describe_failure(exc, "the server")) from None
                reply = None
            if isinstance(reply, Welcome):
                return reply
            if isinstance(reply, Error):
                raise ClientError(f"login refused: {reply.message} ({reply.code})")
            if reply is None:
                # With TLS 1.3 the server checks our certificate after the
                # handshake, and trio drops the alert that would say why.
                raise ClientError(
                    "the server closed the connection during login: it may require a client"
                    " certificate signed by its CA (--cert and --key)"
                )
            raise ClientError(f"unexpected {reply.type!r} from the server during login")
        raise ClientError("login timed out: no answer from the server")

    async def send(self, envelope: ClientEnvelope) -> None:
        async with self._send_lock:
            await self.stream.send_all(encode(envelope))

    async def receive(self) -> ServerEnvelope | None:
        """The next envelope from the server, or None when it closed the connection.

        Raises :class:`ProtocolError` for a frame that is not a valid envelope
        (the connection stays usable) and ``trio.BrokenResourceError`` when the
        connection breaks.
        """
        while (frame := self._decoder.next_frame()) is None:
            data = await self.stream.receive_some(RECEIVE_BYTES)
            if not data:
                return None
            self._decoder.feed(data)
        return parse_server_frame(frame)

    async def aclose(self) -> None:
        await tls.close(self.stream)

    async def __aenter__(self) -> ChatConnection:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


def _connect_failure(exc: OSError) -> str:
    # trio tries every address of the host and chains their errors as a group.
    causes: list[BaseException] = [exc]
    if isinstance(exc.__cause__, BaseExceptionGroup):
        causes = list(exc.__cause__.exceptions)
    if all(isinstance(cause, ConnectionRefusedError) for cause in causes):
        return "connection refused (is the server running?)"
    first = causes[0]
    return (first.strerror if isinstance(first, OSError) else None) or str(first)


# --- input and output, without I/O --------------------------------------------


@dataclass(frozen=True)
class SendText:
    text: str


@dataclass(frozen=True)
class Quit:
    pass


@dataclass(frozen=True)
class ShowHelp:
    pass


@dataclass(frozen=True)
class Invalid:
    reason: str


Command = SendText | Quit | ShowHelp | Invalid

HELP = """\
Type a line and press Enter to send it to the current room.
  /help          this help
  /quit          leave (also Ctrl-D)
  //text         send a line that starts with '/'"""


def parse_input(line: str) -> Command | None:
    """What a line typed at the prompt asks for; None for a blank line."""
    if not line.strip():
        return None
    if line.startswith("//"):
        return _text(line[1:])
    if not line.startswith("/"):
        return _text(line)
    name = line[1:].split(maxsplit=1)[0].lower() if line[1:].strip() else ""
    if name == "quit":
        return Quit()
    if name == "help":
        return ShowHelp()
    return Invalid(f"unknown command /{name}; /help lists the commands")


def _text(text: str) -> Command:
    if len(text) > MAX_TEXT_CHARS:
        return Invalid(f"message too long ({len(text)} characters, at most {MAX_TEXT_CHARS})")
    if any(_is_control(char) for char in text):
        return Invalid("message contains control characters")
    return SendText(text)


def _is_control(char: str) -> bool:
    code = ord(char)
    return (code < 0x20 and char not in "\t\n") or 0x7F <= code <= 0x9F


def sanitize(text: str) -> str:
    """``text`` safe to print on a terminal: no escape sequences, no bidi tricks."""
    return "".join(
        char if char.isprintable() or char == "\n" else f"\\u{ord(char):04x}" for char in text
    ).replace("\n", "\n    ")


_RESET, _BOLD, _DIM, _RED, _CYAN = "\x1b[0m", "\x1b[1m", "\x1b[2m", "\x1b[31m", "\x1b[36m"


def format_message(message: Message, *, colour: bool, me: str | None = None) -> str:
    """``08:00:00 [lobby] alice: hi`` in local time."""
    try:
        clock = datetime.fromisoformat(message.ts).astimezone().strftime("%H:%M:%S")
    except ValueError:
        clock = "--:--:--"
    text = sanitize(message.text)
    if not colour:
        return f"{clock} [{message.room}] {message.sender}: {text}"
    name_colour = _CYAN if message.sender == me else _BOLD
    return f"{_DIM}{clock}{_RESET} [{message.room}] {name_colour}{message.sender}{_RESET}: {text}"


def format_error(error: Error, *, colour: bool) -> str:
    line = f"error: {sanitize(error.message)} ({error.code})"
    return f"{_RED}{line}{_RESET}" if colour else line


def format_notice(text: str, *, colour: bool) -> str:
    return f"{_DIM}{text}{_RESET}" if colour else text


# --- the interactive session ----------------------------------------------------


class ChatSession:
    """Runs the prompt loop and the receive loop until the user quits or the connection ends.

    :meth:`run` returns the process exit code: 0 when the user quit (or
    input ended) and every message sent was acknowledged, 1 otherwise.
    """

    def __init__(self, connection: ChatConnection, console: Console, username: str) -> None:
        self.connection = connection
        self.console = console
        self.username = username
        self.room = LOBBY
        self.pending: dict[str, str] = {}  # client id -> text, until acknowledged
        self.refused = 0
        self._ids = count(1)
        self._all_acked = trio.Event()
        self._all_acked.set()
        self._leaving = False

    def prompt(self) -> str:
        return f"[{self.room}] send>>> "

    async def run(self) -> int:
        exit_code = 1
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._receive_loop, nursery.cancel_scope)
            exit_code = await self._input_loop()
            nursery.cancel_scope.cancel()
        return exit_code

    async def _input_loop(self) -> int:
        while (line := await self.console.read_line()) is not None:
            command = parse_input(line)
            if command is None:
                continue
            if isinstance(command, Quit):
                break
            if isinstance(command, ShowHelp):
                self.console.show(HELP)
            elif isinstance(command, Invalid):
                self._notice(command.reason)
            else:
                await self._say(command.text)
        return await self._leave()

    async def _say(self, text: str) -> None:
        client_id = f"c{next(self._ids)}"
        self.pending[client_id] = text
        self._all_acked = trio.Event()
        await self.connection.send(Say(room=self.room, text=text, id=client_id))

    async def _leave(self) -> int:
        if self.pending:
            with trio.move_on_after(ACK_TIMEOUT):
                await self._all_acked.wait()
        unacknowledged = len(self.pending)
        self._leaving = True
        with suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await self.connection.send(Bye())
        if unacknowledged:
            self._notice(f"{unacknowledged} message(s) were not acknowledged by the server")
        return 0 if unacknowledged == 0 and self.refused == 0 else 1

    async def _receive_loop(self, scope: trio.CancelScope) -> None:
        colour = self.console.colour
        while True:
            try:
                envelope = await self.connection.receive()
            except ProtocolError as exc:
                self._notice(f"ignored an invalid frame from the server: {exc.message}")
                continue
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                if not self._leaving:
                    self._notice(f"[DISCONNECTED] {tls.describe_failure(exc, 'the server')}")
                break
            if envelope is None:
                if not self._leaving:
                    self._notice("[DISCONNECTED] the server closed the connection")
                break
            if isinstance(envelope, Message):
                self.console.show(format_message(envelope, colour=colour, me=self.username))
            elif isinstance(envelope, Ack):
                self._acknowledged(envelope.ref)
            elif isinstance(envelope, Error):
                if envelope.ref in self.pending:
                    self.refused += 1
                    self._acknowledged(envelope.ref)
                self.console.show(format_error(envelope, colour=colour))
        # The connection is gone: stop waiting for input.
        scope.cancel()

    def _acknowledged(self, ref: str | None) -> None:
        if ref is not None and self.pending.pop(ref, None) is not None and not self.pending:
            self._all_acked.set()

    def _notice(self, text: str) -> None:
        self.console.show(format_notice(text, colour=self.console.colour))
