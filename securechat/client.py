"""The chat client: a TLS connection speaking protocol v1, and the chat loop on top.

:class:`ChatConnection` is the thin Trio layer (connect, verify the server,
log in, send and receive envelopes); tests and benchmarks use it directly.
:class:`ChatSession` is the interactive loop behind ``securechat client``:
lines typed at the ``send>>>`` prompt become ``say`` envelopes, slash
commands become the other requests, and what arrives is shown as it
arrives. When the connection drops, the session reconnects with backoff,
catches up on the history it missed (showing nothing twice) and re-sends
unacknowledged messages with their original ids, which the server
recognises. Input parsing and formatting are plain functions.
"""

from __future__ import annotations

import random
import re
import secrets
import ssl
from collections import deque
from collections.abc import Awaitable, Callable
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
    LOBBY,
    MAX_HISTORY_LIMIT,
    MAX_SERVER_FRAME_BYTES,
    NAME_PATTERN,
    Ack,
    Bye,
    ClientEnvelope,
    Dm,
    Error,
    ErrorCode,
    FrameDecoder,
    Hello,
    History,
    HistoryEnd,
    Join,
    Joined,
    Kicked,
    Leave,
    Left,
    Members,
    Message,
    Ping,
    Pong,
    Presence,
    ProtocolError,
    RoomList,
    Rooms,
    Say,
    ServerEnvelope,
    Welcome,
    Who,
    check_text,
    encode,
    parse_server_frame,
)

CONNECT_TIMEOUT = 10.0
LOGIN_TIMEOUT = 15.0
ACK_TIMEOUT = 30.0
RECEIVE_BYTES = 65536
HISTORY_DEFAULT = 20


class ClientError(Exception):
    """Connecting or logging in failed; the message is one line for the user."""


class LoginRefused(ClientError):
    """The server said no to our credentials: trying again will not help."""


# Refusals of a login that say "not now" rather than "not you".
TRANSIENT_REFUSALS = frozenset({ErrorCode.SERVER_BUSY, ErrorCode.RATE_LIMITED})


class ChatConnection:
    """One authenticated-or-about-to-be TLS connection to a securechat server."""

    def __init__(
        self,
        stream: trio.SSLStream[trio.SocketStream],
        max_frame_bytes: int = MAX_SERVER_FRAME_BYTES,
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
            if tls.is_unexpected_eof(exc) or isinstance(exc.__cause__, ConnectionResetError):
                raise ClientError(
                    f"{where} closed the connection before TLS started: the server may be"
                    " refusing connections from your address (too many open), or it is not"
                    " a securechat server"
                ) from None
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
                text = f"login refused: {sanitize(reply.message)} ({reply.code})"
                if reply.code in TRANSIENT_REFUSALS:
                    raise ClientError(text)  # worth trying again later
                raise LoginRefused(text)
            if reply is None:
                # With TLS 1.3 the server checks our certificate after the
                # handshake, and trio drops the alert that would say why.
                raise ClientError(
                    "the server closed the connection during login: it may require a client"
                    " certificate signed by its CA (--cert and --key)"
                )
            raise ClientError(f"unexpected {sanitize(reply.type)!r} from the server during login")
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
    """A line for the current room."""

    text: str


@dataclass(frozen=True)
class SendDirect:
    to: str
    text: str


@dataclass(frozen=True)
class Switch:
    room: str


@dataclass(frozen=True)
class Ask:
    """A request that goes to the server as it is."""

    envelope: Join | Leave | Who | Rooms | History


@dataclass(frozen=True)
class Quit:
    pass


@dataclass(frozen=True)
class ShowHelp:
    pass


@dataclass(frozen=True)
class Invalid:
    reason: str


Command = SendText | SendDirect | Switch | Ask | Quit | ShowHelp | Invalid

HELP = """\
Type a line and press Enter to send it to the current room.
  /join ROOM        join (or create) a room and switch to it
  /leave ROOM       leave a room
  /switch ROOM      send plain lines to ROOM from now on
  /msg USER TEXT    direct message to USER (delivered later if they are offline)
  /who [ROOM]       members of ROOM (default: the current room), and who is online
  /rooms            the rooms you can join
  /history [N]      the last N messages of the current room (default 20)
  /help             this help
  /quit             leave (also Ctrl-D)
  //text            send a line that starts with '/'"""

_NAME = re.compile(NAME_PATTERN)


def parse_input(line: str, room: str) -> Command | None:
    """What a line typed at the prompt asks for, given the current ``room``; None if blank."""
    if not line.strip():
        return None
    if line.startswith("//"):
        return _text(line[1:], lambda text: SendText(text))
    if not line.startswith("/"):
        return _text(line, lambda text: SendText(text))
    name, _, rest = line[1:].partition(" ")
    name = name.lower()
    args = rest.split()
    if name == "quit":
        return Quit()
    if name == "help":
        return ShowHelp()
    if name == "rooms":
        return Ask(Rooms())
    if name in ("join", "leave", "switch", "who"):
        target = args[0] if args else (room if name == "who" else None)
        if target is None or len(args) > 1:
            return Invalid(f"usage: /{name} ROOM")
        if not _NAME.fullmatch(target):
            return Invalid(f"{target!r} is not a valid room name")
        if name == "join":
            return Ask(Join(room=target))
        if name == "leave":
            return Ask(Leave(room=target))
        if name == "who":
            return Ask(Who(room=target))
        return Switch(target)
    if name == "history":
        if len(args) > 1 or (args and not args[0].isdigit()):
            return Invalid("usage: /history [N]")
        limit = int(args[0]) if args else HISTORY_DEFAULT
        if not 1 <= limit <= MAX_HISTORY_LIMIT:
            return Invalid(f"N must be between 1 and {MAX_HISTORY_LIMIT}")
        return Ask(History(room=room, limit=limit))
    if name == "msg":
        to, _, text = rest.strip().partition(" ")
        if not to or not text.strip():
            return Invalid("usage: /msg USER TEXT")
        if not _NAME.fullmatch(to):
            return Invalid(f"{to!r} is not a valid username")
        return _text(text, lambda checked: SendDirect(to, checked))
    return Invalid(f"unknown command /{name}; /help lists the commands")


def _text(text: str, make: Callable[[str], Command]) -> Command:
    try:
        return make(check_text(text))
    except ProtocolError as exc:
        return Invalid(exc.message)


def sanitize(text: str, *, lines: bool = False) -> str:
    """``text`` from the server, safe to print on a terminal; the one route wire text takes.

    Every character that is not printable becomes a visible ``\\uXXXX``:
    C0 and C1 controls (so ESC, and with it every ANSI/OSC sequence; BEL,
    backspace, carriage return), DEL, Unicode format characters (bidi
    overrides and isolates, zero-width characters), line and paragraph
    separators, private-use and unassigned code points. Zero-width (non-)joiners
    stay: Persian, Indic scripts and emoji need them, and they cannot move
    the cursor or reorder text. Newlines are escaped too unless ``lines``
    (message text, which may have several lines): then each following line
    is indented, so it cannot pass for a line of its own.
    """
    if text.isprintable():
        return text
    keep = _JOINERS | {"\n"} if lines else _JOINERS
    safe = "".join(char if char.isprintable() or char in keep else _escape(char) for char in text)
    return safe.replace("\n", "\n    ") if lines else safe


_JOINERS = frozenset("\u200c\u200d")


def _escape(char: str) -> str:
    code = ord(char)
    return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"


_RESET, _BOLD, _DIM, _RED = "\x1b[0m", "\x1b[1m", "\x1b[2m", "\x1b[31m"
_CYAN, _MAGENTA = "\x1b[36m", "\x1b[35m"


class Formatter:
    """Turns what the server sent into lines for the screen; colour only when asked.

    Nothing from the wire reaches the screen another way, and every field
    shown here goes through :func:`sanitize`: names, room names and codes
    too, although the protocol models already restrict them, so that a check
    loosened there never turns into a terminal escape here. The only escape
    sequences in the output are this class's own colours.
    """

    def __init__(self, *, me: str, colour: bool) -> None:
        self.me = me
        self.colour = colour

    def _paint(self, code: str, text: str) -> str:
        return f"{code}{text}{_RESET}" if self.colour else text

    def welcome(self, welcome: Welcome) -> str:
        """The first line after logging in."""
        return (
            f"logged in as {sanitize(welcome.username)} ({sanitize(welcome.server)}); rooms: "
            f"{_names(welcome.rooms)}. Type /help for commands."
        )

    def message(self, message: Message) -> str:
        """``08:00:00 [lobby] alice: hi`` or ``08:00:00 [dm] alice -> bob: hi``, in local time."""
        try:
            clock = datetime.fromisoformat(message.ts).astimezone().strftime("%H:%M:%S")
        except ValueError:
            clock = "--:--:--"
        sender = sanitize(message.sender)
        sender = self._paint(_CYAN if message.sender == self.me else _BOLD, sender)
        if message.to is not None:
            where = self._paint(_MAGENTA, "[dm]")
            sender = f"{sender} -> {sanitize(message.to)}"
        else:
            where = f"[{sanitize(message.room or '')}]"
        text = sanitize(message.text, lines=True)
        return f"{self._paint(_DIM, clock)} {where} {sender}: {text}"

    def error(self, error: Error) -> str:
        return self._paint(_RED, f"error: {sanitize(error.message)} ({sanitize(error.code)})")

    def invalid_frame(self, exc: ProtocolError) -> str:
        # The description names the offending fields, and their names came from the server.
        return self.notice(f"ignored an invalid frame from the server: {sanitize(exc.message)}")

    def notice(self, text: str) -> str:
        """A line of the client's own (its text is not from the wire)."""
        return self._paint(_DIM, text)

    def describe(self, envelope: ServerEnvelope) -> str | None:
        """A line for anything but messages, acks and history ends (None: nothing to show)."""
        if isinstance(envelope, Presence):
            where = f"[{sanitize(envelope.room)}] " if envelope.room is not None else ""
            user = sanitize(envelope.username)
            return self.notice(f"{where}* {user} {sanitize(envelope.state)}")
        if isinstance(envelope, Joined):
            topic = f" ({sanitize(envelope.topic)})" if envelope.topic else ""
            members = _names(envelope.members)
            return self.notice(f"joined {sanitize(envelope.room)}{topic}; members: {members}")
        if isinstance(envelope, Left):
            return self.notice(f"left {sanitize(envelope.room)}")
        if isinstance(envelope, Members):
            return (
                f"[{sanitize(envelope.room)}] online: {_names(envelope.online) or '-'};"
                f" members: {_names(envelope.members) or '-'}"
            )
        if isinstance(envelope, RoomList):
            lines = [
                f"  {sanitize(room.name)} ({room.members} members)"
                + (f" {sanitize(room.topic)}" if room.topic else "")
                for room in envelope.rooms
            ]
            return "\n".join(["rooms:", *lines])
        if isinstance(envelope, Kicked):
            return self.notice(f"kicked {sanitize(envelope.username)}")
        if isinstance(envelope, Error):
            return self.error(envelope)
        return None


def _names(names: list[str]) -> str:
    return ", ".join(sanitize(name) for name in names)


# --- the interactive session ----------------------------------------------------

Connect = Callable[[], Awaitable[tuple[ChatConnection, Welcome]]]


@dataclass(frozen=True)
class Keepalive:
    """After ``interval`` seconds without hearing from the server, ping it; if nothing
    arrives within ``timeout`` more, the connection is dead (reconnect)."""

    interval: float = 30.0
    timeout: float = 15.0


@dataclass(frozen=True)
class Backoff:
    """Reconnect delays: exponential with jitter, capped; give up after ``give_up`` seconds."""

    first: float = 0.5
    cap: float = 30.0
    give_up: float = 300.0

    def delay(self, attempt: int) -> float:
        return min(self.cap, self.first * 2.0**attempt) * random.uniform(0.5, 1.0)  # noqa: S311


class SeenIds:
    """Ids of the messages already shown, so a replay never shows one twice (bounded)."""

    def __init__(self, size: int = 20_000) -> None:
        self._order: deque[int] = deque()
        self._ids: set[int] = set()
        self._size = size
        self.highest = 0

    def add(self, message_id: int) -> bool:
        """Record ``message_id``; False if it was already there."""
        if message_id in self._ids:
            return False
        self._ids.add(message_id)
        self._order.append(message_id)
        if len(self._order) > self._size:
            self._ids.discard(self._order.popleft())
        self.highest = max(self.highest, message_id)
        return True


class ChatSession:
    """The prompt loop and the network loop, until the user quits or the server is gone for good.

    :meth:`run` returns the process exit code: 0 when the user quit (or input
    ended) and every message sent was acknowledged, 1 otherwise.
    """

    def __init__(
        self,
        connection: ChatConnection,
        welcome: Welcome,
        console: Console,
        *,
        reconnect: Connect | None = None,
        backoff: Backoff | None = None,
        keepalive: Keepalive | None = None,
    ) -> None:
        self.connection = connection
        self.console = console
        self.username = welcome.username
        self.rooms = list(welcome.rooms)
        self.room = LOBBY if LOBBY in self.rooms else (self.rooms[0] if self.rooms else LOBBY)
        self.format = Formatter(me=self.username, colour=console.colour)
        self.seen = SeenIds()
        self.pending: dict[str, Say | Dm] = {}  # by client id, until acknowledged
        self.refused = 0
        self._reconnect = reconnect
        self._backoff = backoff or Backoff()
        self._keepalive = keepalive or Keepalive()
        self._last_heard = trio.current_time()
        # Client ids must never repeat for this user: the server treats a
        # repeated id as a re-send and answers with the old ack.
        self._id_prefix = secrets.token_hex(6)
        self._ids = count(1)
        self._all_acked = trio.Event()
        self._all_acked.set()
        self._connected = True
        self._leaving = False
        self._replays = 0  # explicit /history requests not yet ended
        self._exit_code = 1
        self._sync_after = 0  # where the last catch-up page started
        self._tasks: trio.Nursery | None = None

    def prompt(self) -> str:
        return f"[{self.room}] send>>> "

    async def run(self) -> int:
        async with trio.open_nursery() as nursery:
            self._tasks = nursery
            nursery.start_soon(self._network_loop, nursery.cancel_scope)
            nursery.start_soon(self._keepalive_loop)
            self._exit_code = await self._input_loop()
            nursery.cancel_scope.cancel()
        return self._exit_code

    async def _keepalive_loop(self) -> None:
        interval, timeout = self._keepalive.interval, self._keepalive.timeout
        while True:
            await trio.sleep_until(self._last_heard + interval)
            if not self._connected or trio.current_time() < self._last_heard + interval:
                continue
            silent_since = self._last_heard
            await self._send(Ping(id="keepalive"))
            await trio.sleep(timeout)
            if self._connected and self._last_heard == silent_since:
                # No answer: the connection is dead even if TCP has not noticed.
                self._notice("[DISCONNECTED] the server stopped answering")
                await trio.aclose_forcefully(self.connection.stream)

    # --- input ---

    async def _input_loop(self) -> int:
        while (line := await self.console.read_line()) is not None:
            command = parse_input(line, self.room)
            if command is None:
                continue
            if isinstance(command, Quit):
                break
            await self._do(command)
        return await self._leave()

    async def _do(self, command: Command) -> None:
        if isinstance(command, ShowHelp):
            self.console.show(HELP)
        elif isinstance(command, Invalid):
            self._notice(command.reason)
        elif isinstance(command, Switch):
            if command.room in self.rooms:
                self.room = command.room
                self._notice(f"plain lines now go to {command.room}")
            else:
                self._notice(f"you are not in {command.room}; /join it first")
        elif isinstance(command, SendText):
            await self._send_message(Say(room=self.room, text=command.text, id=self._next_id()))
        elif isinstance(command, SendDirect):
            await self._send_message(Dm(to=command.to, text=command.text, id=self._next_id()))
        elif isinstance(command, Quit):
            pass  # the input loop handles it
        elif not self._connected:
            self._notice("not connected right now; try again in a moment")
        else:
            envelope = command.envelope.model_copy(update={"id": self._next_id()})
            if isinstance(envelope, History):
                self._replays += 1
            await self._send(envelope)

    def _next_id(self) -> str:
        return f"{self._id_prefix}-{next(self._ids)}"

    async def _send_message(self, envelope: Say | Dm) -> None:
        assert envelope.id is not None
        self.pending[envelope.id] = envelope
        self._all_acked = trio.Event()
        await self._send(envelope)  # if the connection is down, the reconnect re-sends it

    async def _send(self, envelope: ClientEnvelope) -> None:
        if self._connected:
            with suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await self.connection.send(envelope)

    async def _leave(self) -> int:
        if self.pending:
            with trio.move_on_after(ACK_TIMEOUT):
                await self._all_acked.wait()
        unacknowledged = len(self.pending)
        self._leaving = True
        await self._send(Bye())
        if unacknowledged:
            self._notice(f"{unacknowledged} message(s) were not acknowledged by the server")
        return 0 if unacknowledged == 0 and self.refused == 0 else 1

    # --- network ---

    async def _network_loop(self, scope: trio.CancelScope) -> None:
        while True:
            retry = await self._receive_loop()
            if self._leaving:
                return
            self._connected = False
            await trio.aclose_forcefully(self.connection.stream)
            if not retry or self._reconnect is None:
                self._exit_code = 1
                scope.cancel()
                return
            if not await self._reconnect_with_backoff():
                scope.cancel()
                return

    async def _receive_loop(self) -> bool:
        """Handle envelopes until the connection ends; True if reconnecting makes sense."""
        while True:
            try:
                envelope = await self.connection.receive()
            except ProtocolError as exc:
                self.console.show(self.format.invalid_frame(exc))
                continue
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                if not self._leaving:
                    self._notice(f"[DISCONNECTED] {tls.describe_failure(exc, 'the server')}")
                return True
            if envelope is None:
                if not self._leaving:
                    self._notice("[DISCONNECTED] the server closed the connection")
                return True
            self._last_heard = trio.current_time()
            if isinstance(envelope, Error) and envelope.code == ErrorCode.KICKED:
                self.console.show(self.format.error(envelope))
                return False
            await self._handle(envelope)

    async def _handle(self, envelope: ServerEnvelope) -> None:
        if isinstance(envelope, Ping):
            await self._send(Pong(ref=envelope.id))
            return
        if isinstance(envelope, Pong):
            return
        if isinstance(envelope, Message):
            if self.seen.add(envelope.id) or self._replays:
                self.console.show(self.format.message(envelope))
            return
        if isinstance(envelope, Ack):
            self._acknowledged(envelope.ref)
            return
        if isinstance(envelope, HistoryEnd):
            await self._history_ended(envelope)
            return
        if isinstance(envelope, Joined):
            if envelope.room not in self.rooms:
                self.rooms.append(envelope.room)
            if envelope.ref is not None:
                self.room = envelope.room
        elif isinstance(envelope, Left):
            if envelope.room in self.rooms:
                self.rooms.remove(envelope.room)
            if self.room == envelope.room:
                self.room = (
                    LOBBY if LOBBY in self.rooms else (self.rooms[0] if self.rooms else LOBBY)
                )
        elif isinstance(envelope, Error) and envelope.ref == "sync":
            if envelope.code == ErrorCode.RATE_LIMITED and self._tasks is not None:
                # Catching up is worth waiting for: ask again when the server says.
                self._tasks.start_soon(self._sync_later, envelope.retry_after or 1.0)
                return
        elif isinstance(envelope, Error) and envelope.ref in self.pending:
            self.refused += 1
            self._acknowledged(envelope.ref)
        line = self.format.describe(envelope)
        if line is not None:
            self.console.show(line)

    async def _history_ended(self, end: HistoryEnd) -> None:
        if end.ref is not None and end.ref.startswith("sync"):
            if end.more:  # catching up after a reconnect: fetch the next page
                await self._sync(end.last)
            return
        self._replays = max(0, self._replays - 1)
        self._notice("-- end of history --")

    async def _sync(self, after: int) -> None:
        """Ask for the next catch-up page: everything visible to us after ``after``."""
        self._sync_after = after
        await self._send(History(after=after, limit=MAX_HISTORY_LIMIT, id="sync"))

    async def _sync_later(self, delay: float) -> None:
        after = self._sync_after
        await trio.sleep(delay)
        if self._sync_after == after:  # no reconnect started a new catch-up meanwhile
            await self._sync(after)

    def _acknowledged(self, ref: str | None) -> None:
        if ref is not None and self.pending.pop(ref, None) is not None and not self.pending:
            self._all_acked.set()

    async def _reconnect_with_backoff(self) -> bool:
        assert self._reconnect is not None
        deadline = trio.current_time() + self._backoff.give_up
        attempt = 0
        while True:
            delay = self._backoff.delay(attempt)
            if trio.current_time() + delay > deadline:
                self._notice("giving up: the server is still unreachable")
                self._exit_code = 1
                return False
            self._notice(f"reconnecting in {delay:.1f} s")
            await trio.sleep(delay)
            attempt += 1
            try:
                connection, welcome = await self._reconnect()
            except LoginRefused as exc:
                self.console.show(self.format.notice(str(exc)))
                self._exit_code = 1
                return False
            except ClientError as exc:
                self._notice(str(exc))
                continue
            break
        self.connection = connection
        self._last_heard = trio.current_time()
        self.rooms = list(welcome.rooms)
        if self.room not in self.rooms:
            self.room = LOBBY
        self._connected = True
        self._replays = 0
        self._notice("[RECONNECTED]")
        if self.seen.highest:
            # Everything visible to us since the last message we saw.
            await self._sync(self.seen.highest)
        for envelope in list(self.pending.values()):
            await self._send(envelope)  # the same ids: the server will not deliver twice
        return True

    def _notice(self, text: str) -> None:
        self.console.show(self.format.notice(text))
