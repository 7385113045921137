"""The chat client: a TLS connection speaking protocol v1, and the chat loop on top.

:class:`ChatConnection` is the thin Trio layer (connect, verify the server,
log in, send and receive envelopes); tests and benchmarks use it directly.
When TLS fails it says why in words (:func:`describe_tls_failure`).
:class:`ChatSession` is the interactive loop behind ``securechat client``:
lines typed at the ``send>>>`` prompt become ``say`` envelopes, slash
commands become the other requests, and what arrives is shown as it
arrives. When the connection drops, the session reconnects with backoff,
catches up on the history it missed (showing nothing twice) and re-sends
unacknowledged messages with their original ids, which the server
recognises. Lines from a pipe are carried out like typed ones, each in
turn, and the first that fails stops the client. Input parsing and
formatting are plain functions.
"""

from __future__ import annotations

import random
import re
import secrets
import ssl
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from datetime import datetime
from itertools import count
from pathlib import Path
from types import TracebackType

import trio
from pydantic import SecretStr, TypeAdapter, ValidationError

from . import tls
from .console import Console
from .lines import FrameReader
from .protocol import (
    LOBBY,
    MAX_HISTORY_LIMIT,
    MAX_SERVER_FRAME_BYTES,
    MAX_TEXT_CHARS,
    MAX_TOPIC_CHARS,
    NAME_PATTERN,
    PRESENCE_LISTS,
    SERVER_USER,
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
    Kick,
    Kicked,
    Leave,
    Left,
    Members,
    Message,
    Ping,
    Pong,
    Presence,
    ProtocolError,
    Reason,
    RoomList,
    Rooms,
    RoomTopic,
    Say,
    ServerEnvelope,
    Topic,
    TopicRequest,
    Welcome,
    Who,
    check_text,
    encode,
    parse_server_frame,
)

CONNECT_TIMEOUT = 10.0
LOGIN_TIMEOUT = 15.0
ACK_TIMEOUT = 30.0
# How long the prompt waits for the answer to a command before reading on.
REPLY_TIMEOUT = 10.0
OUTBOX_SIZE = 1000  # messages typed ahead of the server's acks; typing waits beyond
HISTORY_DEFAULT = 20


class ClientError(Exception):
    """Connecting or logging in failed; the message is one line for the user."""


class LoginRefused(ClientError):
    """The server said no to our credentials: trying again will not help."""


class FeaturesRefused(ClientError):
    """The server predates ``hello``'s ``features``: log in again without them."""


# What this client asks for in ``hello``: it shows presence lists too.
FEATURES = (PRESENCE_LISTS,)


# Refusals of a login that say "not now" rather than "not you".
TRANSIENT_REFUSALS = frozenset({ErrorCode.SERVER_BUSY, ErrorCode.RATE_LIMITED})


class ChatConnection:
    """One authenticated-or-about-to-be TLS connection to a securechat server."""

    def __init__(
        self,
        stream: tls.AnyStream,
        max_frame_bytes: int = MAX_SERVER_FRAME_BYTES,
        *,
        where: str | None = None,
        certificate: Path | None = None,
    ) -> None:
        self.stream = stream
        self.where = where
        self.certificate = certificate
        self._frames = FrameReader(stream, FrameDecoder(max_frame_bytes))
        self._send_lock = trio.Lock()

    @classmethod
    async def open(
        cls,
        host: str,
        port: int,
        ssl_context: ssl.SSLContext,
        *,
        certificate: Path | None = None,
    ) -> ChatConnection:
        """Connect and finish the TLS handshake; raises :class:`ClientError`.

        ``certificate`` is the file of the client certificate in
        ``ssl_context``, if it has one: a refusal then names it.
        """
        where = f"{host}:{port}"
        try:
            with trio.fail_after(CONNECT_TIMEOUT):
                tcp = await trio.open_tcp_stream(host, port)
        except trio.TooSlowError:
            raise ClientError(f"cannot connect to {where}: timed out") from None
        except OSError as exc:
            raise ClientError(f"cannot connect to {where}: {_connect_failure(exc)}") from None
        transport = _Watched(tcp)
        stream: tls.AnyStream = trio.SSLStream(transport, ssl_context, server_hostname=host)
        try:
            with trio.fail_after(CONNECT_TIMEOUT):
                await stream.do_handshake()
        except trio.TooSlowError:
            await trio.aclose_forcefully(stream)
            raise ClientError(f"TLS handshake with {where} timed out") from None
        except trio.BrokenResourceError as exc:
            await trio.aclose_forcefully(stream)
            if _closed_without_alert(exc):
                if not transport.received:
                    raise ClientError(
                        f"the server at {where} closed the connection before TLS started: it may"
                        " be refusing connections from your address (too many open), or it is"
                        " not a securechat server"
                    ) from None
                # TLS 1.2: the server checks our certificate during the
                # handshake, and a trio server ends it without an alert.
                raise ClientError(_refused_during_handshake(where, certificate)) from None
            raise ClientError(describe_tls_failure(exc, where, certificate)) from None
        return cls(stream, where=where, certificate=certificate)

    async def login(
        self, username: str, password: SecretStr | None, *, features: Sequence[str] = ()
    ) -> Welcome:
        """Send ``hello`` (asking for ``features``) and wait for ``welcome``; raises
        :class:`ClientError` (:class:`FeaturesRefused` from a server that knows no
        features: log in again, on a new connection, without them)."""
        with trio.move_on_after(LOGIN_TIMEOUT):
            try:
                wanted = list(features) or None
                await self.send(
                    Hello(username=username, password=password, features=wanted, id="login")
                )
                reply = await self.receive()
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                if not _closed_without_alert(exc):
                    raise ClientError(
                        describe_tls_failure(exc, self.where, self.certificate)
                    ) from None
                reply = None
            except ProtocolError as exc:
                raise ClientError(
                    f"the server broke the protocol during login: {sanitize(exc.message)}"
                ) from None
            if isinstance(reply, Welcome):
                return reply
            if isinstance(reply, Error):
                text = f"login refused: {sanitize(reply.message)} ({reply.code})"
                if (
                    features
                    and reply.code == ErrorCode.BAD_ENVELOPE
                    and reply.message.startswith("features: unknown field")
                ):
                    raise FeaturesRefused(text)
                if reply.code in TRANSIENT_REFUSALS:
                    raise ClientError(text)  # worth trying again later
                raise LoginRefused(text)
            if reply is None:
                # TLS 1.3: the server checks our certificate after the
                # handshake, and a trio server closes without an alert; no
                # other refusal closes a connection without an error frame.
                raise ClientError(_refused_during_handshake(self.where, self.certificate))
            raise ClientError(f"unexpected {sanitize(reply.type)!r} from the server during login")
        raise ClientError("login timed out: no answer from the server")

    async def send(self, envelope: ClientEnvelope) -> None:
        async with self._send_lock:
            await self.stream.send_all(encode(envelope))

    async def receive(self) -> ServerEnvelope | None:
        """The next envelope from the server, or None when it closed the connection.

        Raises :class:`ProtocolError` for a frame that is not a valid envelope
        (the connection stays usable) or, ``fatal``, for one over
        ``max_frame_bytes`` (nothing more can be read), and
        ``trio.BrokenResourceError`` when the connection breaks.
        """
        frame = await self._frames.next()
        return None if frame is None else parse_server_frame(frame)

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


class _Watched(trio.abc.Stream):
    """A TCP stream that remembers whether the peer sent anything (to tell why TLS failed)."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.socket = stream.socket  # (as SocketStream has it, for socket options)
        self.received = False

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.stream.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        data = await self.stream.receive_some(max_bytes)
        self.received = self.received or bool(data)
        return data

    async def aclose(self) -> None:
        await self.stream.aclose()


def _connect_failure(exc: OSError) -> str:
    # trio tries every address of the host and chains their errors as a group.
    causes: list[BaseException] = [exc]
    if isinstance(exc.__cause__, BaseExceptionGroup):
        causes = list(exc.__cause__.exceptions)
    if all(isinstance(cause, ConnectionRefusedError) for cause in causes):
        return "connection refused (is the server running?)"
    first = causes[0]
    return (first.strerror if isinstance(first, OSError) else None) or str(first)


def _closed_without_alert(exc: BaseException) -> bool:
    """The server closed the TCP connection (FIN or RST) without a TLS alert or close_notify."""
    return tls.is_unexpected_eof(exc) or isinstance(
        exc.__cause__, ConnectionResetError | BrokenPipeError
    )


def _server(where: str | None) -> str:
    return f"the server at {where}" if where else "the server"


def _refused_during_handshake(where: str | None, certificate: Path | None) -> str:
    """The server ended the connection in or right after the handshake, without saying why.

    A server built on trio does not send its TLS alert when it refuses a
    handshake, and checking the client certificate is the step it refuses.
    """
    if certificate is None:
        return (
            f"{_server(where)} closed the connection during the TLS handshake: it requires"
            " a client certificate (log in with --cert and --key)"
        )
    return (
        f"{_server(where)} refused your client certificate {certificate} during the TLS"
        " handshake: it is not signed by the CA the server trusts, or it has expired; ask the"
        " server's operator for a new one, or log in with a password, without --cert"
    )


# OpenSSL's reasons, in words: what failed, with the server at HOST:PORT.
_NOT_TLS = "does not speak TLS (is it a securechat server, and is this its port?)"
_PLAIN_REASONS = {
    "WRONG_VERSION_NUMBER": _NOT_TLS,
    "PACKET_LENGTH_TOO_LONG": _NOT_TLS,
    "HTTP_REQUEST": _NOT_TLS,
    "RECORD_LAYER_FAILURE": _NOT_TLS,
    "TLSV1_ALERT_PROTOCOL_VERSION": "does not offer TLS 1.2 or 1.3, which this client needs",
    "UNSUPPORTED_PROTOCOL": "does not offer TLS 1.2 or 1.3, which this client needs",
    "SSLV3_ALERT_HANDSHAKE_FAILURE": "has no TLS cipher suite in common with this client",
    "NO_SHARED_CIPHER": "has no TLS cipher suite in common with this client",
    "NO_CIPHERS_AVAILABLE": "has no TLS cipher suite in common with this client",
    "TLSV1_ALERT_NO_APPLICATION_PROTOCOL": "is not a securechat server (no securechat/1 ALPN)",
    "NO_APPLICATION_PROTOCOL": "is not a securechat server (no securechat/1 ALPN)",
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": (
        "requires a client certificate (log in with --cert and --key)"
    ),
}
# Alerts about the certificate we presented, and what they mean.
_CERTIFICATE_REFUSALS = {
    "TLSV1_ALERT_UNKNOWN_CA": "it is not signed by the CA the server trusts",
    "SSLV3_ALERT_BAD_CERTIFICATE": "the server finds it invalid",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": "the server cannot check it",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": "it has expired",
    "SSLV3_ALERT_CERTIFICATE_REVOKED": "it was revoked",
    "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE": "the server does not support its kind",
    "TLSV1_ALERT_ACCESS_DENIED": "the server denies it access",
    "TLSV1_ALERT_DECRYPT_ERROR": "it does not match its key",
}
# Why the server's certificate failed verification (OpenSSL's verify messages).
_UNTRUSTED = "is not signed by the CA you trust (check --ca)"
_VERIFY_FAILURES = {
    "unable to get local issuer certificate": _UNTRUSTED,
    "self-signed certificate in certificate chain": _UNTRUSTED,
    "self-signed certificate": _UNTRUSTED,
    "unable to get issuer certificate": _UNTRUSTED,
    "certificate signature failure": _UNTRUSTED,
    "certificate has expired": "has expired (the operator renews it with gen-certs --renew server)",
    "certificate is not yet valid": "is not valid yet (is this machine's clock right?)",
    "certificate revoked": "was revoked",
}


def describe_tls_failure(
    exc: BaseException, where: str | None, certificate: Path | None = None
) -> str:
    """One line, in plain words, for a TLS connection to ``where`` that failed or broke.

    ``exc`` is trio's error, with the ``ssl`` error it came from chained as
    its cause; ``certificate`` is the client certificate we presented, if any.
    """
    cause = exc.__cause__
    if isinstance(cause, ssl.SSLCertVerificationError):
        detail = cause.verify_message or cause.reason or "verification failed"
        if detail.startswith("Hostname mismatch") or detail.startswith("IP address mismatch"):
            host = where.rpartition(":")[0] if where else "you connected to"
            plain = (
                f"is not valid for the name {host} (connect with a name it has, or the operator"
                " adds this one with gen-certs --renew server --san NAME)"
            )
        else:
            plain = _VERIFY_FAILURES.get(detail, f"failed verification: {detail}")
        return f"{_server(where)} is not trusted: its certificate {plain}"
    if isinstance(cause, ssl.SSLError):
        reason = cause.reason or type(cause).__name__
        if reason in _CERTIFICATE_REFUSALS:
            yours = f"your client certificate {certificate}" if certificate else "your certificate"
            return (
                f"{_server(where)} refused {yours}: {_CERTIFICATE_REFUSALS[reason]}; ask the"
                " server's operator for a new one, or log in with a password, without --cert"
            )
        if reason in _PLAIN_REASONS:
            return f"{_server(where)} {_PLAIN_REASONS[reason]}"
        return f"TLS with {_server(where)} failed ({reason})"
    if isinstance(cause, ConnectionResetError) or _closed_without_alert(exc):
        return f"{_server(where)} closed the connection"
    return f"the connection to {_server(where)} was lost"


# --- input and output, without I/O --------------------------------------------


@dataclass(frozen=True)
class SendText:
    """A line for the current room (``action``: a ``/me`` line)."""

    text: str
    action: bool = False


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

    envelope: Join | Leave | Who | Rooms | History | Kick | TopicRequest


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

HELP = f"""\
Type a line and press Enter to send it to the current room (at most {MAX_TEXT_CHARS} characters;
a longer line stays in the input for you to shorten).
  /join ROOM            join (or create) a room and send your lines there
  /leave ROOM           leave a room (lobby too: you are back in it at your next login)
  /switch ROOM          send your lines to ROOM, a room you are in
  /me ACTION            an action in the current room, shown as '* you ACTION'
  /msg USER TEXT        direct message to USER (stored for them if they are offline)
  /who [ROOM]           members of ROOM (default: the current room), and who is online
  /rooms                the rooms you can join
  /history [N]          the last N messages of the current room (default {HISTORY_DEFAULT})
  /history @USER [N]    the last N direct messages between you and USER
  /topic                the topic of the current room
  /topic TEXT           set it (admins only); /topic -delete clears it
  /kick USER [REASON]   disconnect USER (admins only)
  /help                 this help
  /quit                 leave (also Ctrl-D)
  //text                send a line that starts with '/'
Names of rooms and users: 1-32 lowercase letters, digits, '_', '.' and '-';
not starting with '.' or '-'."""

_NAME = re.compile(NAME_PATTERN)
_REASON: TypeAdapter[str] = TypeAdapter(Reason)
_TOPIC: TypeAdapter[str] = TypeAdapter(Topic)
CLEAR_TOPIC = "-delete"


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
        if not args and name != "who":
            return Invalid(f"usage: /{name} ROOM")
        target = rest.strip() or room
        if problem := _name_problem(target, "room name", f"/{name}"):
            return Invalid(problem)
        if name == "join":
            return Ask(Join(room=target))
        if name == "leave":
            return Ask(Leave(room=target))
        if name == "who":
            return Ask(Who(room=target))
        return Switch(target)
    if name == "history":
        return _history(args, room)
    if name == "msg":
        to, _, text = rest.strip().partition(" ")
        if not to or not text.strip():
            return Invalid("usage: /msg USER TEXT")
        if problem := _name_problem(to, "username", "/msg"):
            return Invalid(problem)
        return _text(text, lambda checked: SendDirect(to, checked))
    if name == "me":
        if not rest.strip():
            return Invalid("usage: /me ACTION")
        return _text(rest.strip(), lambda text: SendText(text, action=True))
    if name == "topic":
        return _topic(rest.strip(), room)
    if name == "kick":
        username, _, reason = rest.strip().partition(" ")
        if not username:
            return Invalid("usage: /kick USER [REASON]")
        if problem := _name_problem(username, "username", "/kick"):
            return Invalid(problem)
        try:
            checked = _REASON.validate_python(reason.strip()) or None
        except ValidationError:
            return Invalid(f"the reason must be one line of at most {MAX_TOPIC_CHARS} characters")
        return Ask(Kick(username=username, reason=checked))
    return Invalid(f"unknown command /{name}; /help lists the commands")


def _topic(text: str, room: str) -> Command:
    if not text:
        return Ask(TopicRequest(room=room))
    if text == CLEAR_TOPIC:
        return Ask(TopicRequest(room=room, topic=""))
    try:
        return Ask(TopicRequest(room=room, topic=_TOPIC.validate_python(text)))
    except ValidationError:
        return Invalid(f"a topic is one line of at most {MAX_TOPIC_CHARS} characters")


def _history(args: list[str], room: str) -> Command:
    usage = Invalid("usage: /history [N] or /history @USER [N]")
    peer = None
    if args and args[0].startswith("@"):
        peer = args.pop(0)[1:]
        if problem := _name_problem(peer, "username", "/history @"):
            return Invalid(problem)
    if len(args) > 1 or (args and not args[0].isdigit()):
        return usage
    limit = int(args[0]) if args else HISTORY_DEFAULT
    if not 1 <= limit <= MAX_HISTORY_LIMIT:
        return Invalid(f"N must be between 1 and {MAX_HISTORY_LIMIT}")
    if peer is not None:
        return Ask(History(peer=peer, limit=limit))
    return Ask(History(room=room, limit=limit))


def _name_problem(name: str, kind: str, command: str) -> str | None:
    """Why ``name`` cannot be a room or user name (with a name that can), or None."""
    if _NAME.fullmatch(name):
        return None
    rules = (
        f"{name!r} is not a valid {kind}: 1-32 lowercase letters, digits, '_', '.' or '-',"
        " not starting with '.' or '-'"
    )
    suggestion = re.sub(r"[^a-z0-9_.-]+", "-", name.lower()).lstrip(".-")[:32].rstrip("-")
    if suggestion and _NAME.fullmatch(suggestion):
        return f"{rules} (like {command}{' ' if command[-1] != '@' else ''}{suggestion})"
    return rules


def _text(text: str, make: Callable[[str], Command]) -> Command:
    try:
        return make(check_text(text))
    except ProtocolError as exc:
        return Invalid(exc.message)


def is_command(line: str) -> bool:
    """Whether ``line`` is a slash command (not text, not ``//text``)."""
    return line.startswith("/") and not line.startswith("//")


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
        if message.action:
            action = f"* {sanitize(message.sender)} {text}"
            if message.to is None:
                return f"{self._paint(_DIM, clock)} {where} {action}"
            text = action
        return f"{self._paint(_DIM, clock)} {where} {sender}: {text}"

    def error(self, error: Error) -> str:
        return self._paint(_RED, f"error: {sanitize(error.message)} ({sanitize(error.code)})")

    def invalid_frame(self, exc: ProtocolError) -> str:
        # The description names the offending fields, and their names came from the server.
        return self.notice(f"ignored an invalid frame from the server: {sanitize(exc.message)}")

    def notice(self, text: str) -> str:
        """A line of the client's own (its text is not from the wire)."""
        return self._paint(_DIM, text)

    @staticmethod
    def _topic(envelope: RoomTopic) -> str:
        room, topic = sanitize(envelope.room), sanitize(envelope.topic)
        if envelope.by is None:
            return f"[{room}] topic: {topic}" if topic else f"[{room}] no topic"
        if envelope.by == SERVER_USER:
            return f"[{room}] the topic is now (from the config file): {topic or '(none)'}"
        by = sanitize(envelope.by)
        return (
            f"[{room}] * {by} set the topic: {topic}"
            if topic
            else f"[{room}] * {by} cleared the topic"
        )

    def typed(self, prompt: str, line: str) -> str:
        """A command as it was typed at ``prompt``, to keep in the scrollback."""
        return f"{sanitize(prompt)}{sanitize(line)}"

    def describe(self, envelope: ServerEnvelope) -> str | None:
        """A line for anything but messages, acks and history ends (None: nothing to show)."""
        if isinstance(envelope, Presence):
            where = f"[{sanitize(envelope.room)}] " if envelope.room is not None else ""
            return self.notice(f"{where}* {_names(envelope.names)} {sanitize(envelope.state)}")
        if isinstance(envelope, Joined):
            topic = f" ({sanitize(envelope.topic)})" if envelope.topic else ""
            members = _names(envelope.members)
            return self.notice(f"joined {sanitize(envelope.room)}{topic}; members: {members}")
        if isinstance(envelope, Left):
            if envelope.room == LOBBY:
                return self.notice(f"left {LOBBY} (everyone is put back in it at each login)")
            return self.notice(f"left {sanitize(envelope.room)}")
        if isinstance(envelope, Members):
            return (
                f"[{sanitize(envelope.room)}] online: {_names(envelope.online) or '-'};"
                f" members: {_names(envelope.members) or '-'}"
            )
        if isinstance(envelope, RoomList):
            lines = [
                f"  {sanitize(room.name)} ({_count(room.members, 'member')})"
                + (f" {sanitize(room.topic)}" if room.topic else "")
                for room in envelope.rooms
            ]
            return "\n".join(["rooms:", *lines])
        if isinstance(envelope, RoomTopic):
            return self.notice(self._topic(envelope))
        if isinstance(envelope, Kicked):
            return self.notice(f"kicked {sanitize(envelope.username)}")
        if isinstance(envelope, Error):
            return self.error(envelope)
        return None


def _names(names: list[str]) -> str:
    return ", ".join(sanitize(name) for name in names)


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"


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


Request = Say | Dm | Join | Leave | Who | Rooms | History | Kick | TopicRequest
"""What the session sends with an id and waits for the answer to."""


@dataclass
class _Waiter:
    """A request sent, until the server's answer to it (the envelope whose ``ref`` is its id)."""

    event: trio.Event = field(default_factory=trio.Event)
    reply: ServerEnvelope | None = None  # None: the connection dropped before an answer


@dataclass
class _Outgoing:
    """A message in the outbox, until the server acknowledged or refused it."""

    envelope: Say | Dm
    done: trio.Event = field(default_factory=trio.Event)
    reply: ServerEnvelope | None = None


class ChatSession:
    """The prompt loop and the network loop, until the user quits or the server is gone for good.

    Messages go out one at a time, in the order typed: each is sent when
    the one before it was acknowledged or refused. A message refused as
    ``rate_limited`` is sent again after the server's ``retry_after``, so
    a long paste arrives whole and in order, at the server's pace; while
    the connection is down, messages wait for the reconnect and keep their
    ids (the server does not deliver a re-sent message twice). The next
    line is read only once the answer to a command has arrived (bounded by
    :data:`REPLY_TIMEOUT` on a terminal): a line after ``/join`` goes to
    the joined room.

    With ``script`` (the lines come from a pipe), each line also waits for
    its message to be acknowledged, and the first line that cannot be sent
    or that the server refuses ends the session; :attr:`failure` names it.
    :meth:`run` returns the process exit code: 0 when the user quit (or
    input ended) and every message was acknowledged, 1 otherwise.
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
        script: bool = False,
    ) -> None:
        self.connection = connection
        self.console = console
        self.script = script
        self.username = welcome.username
        self.rooms = list(welcome.rooms)
        self.room = LOBBY if LOBBY in self.rooms else (self.rooms[0] if self.rooms else LOBBY)
        self.format = Formatter(me=self.username, colour=console.colour)
        self.seen = SeenIds()
        self.refused = 0  # messages the server refused
        self.failure: str | None = None  # script: the input line that stopped the session
        self._reconnect = reconnect
        self._backoff = backoff or Backoff()
        self._keepalive = keepalive or Keepalive()
        self._last_heard = trio.current_time()
        # Client ids must never repeat for this user: the server treats a
        # repeated id as a re-send and answers with the old ack.
        self._id_prefix = secrets.token_hex(6)
        self._ids = count(1)
        self._waiters: dict[str, _Waiter] = {}
        self._outbox_in, self._outbox = trio.open_memory_channel[_Outgoing](OUTBOX_SIZE)
        self._unsettled = 0  # messages typed and not yet acknowledged or refused
        self._progress = trio.Event()  # set (and replaced) whenever one is
        self._connected = True
        self._online = trio.Event()  # set while connected
        self._online.set()
        self._leaving = False
        self._replays = 0  # explicit /history requests not yet ended
        self._exit_code = 1
        self._sync_after = 0  # where the last catch-up page started
        self._tasks: trio.Nursery | None = None

    def prompt(self) -> str:
        return f"[{self.room}] send>>> "

    def check(self, line: str) -> str | None:
        """Why ``line`` cannot be sent as typed (the terminal keeps it for editing), or None."""
        command = parse_input(line, self.room)
        return command.reason if isinstance(command, Invalid) else None

    async def run(self) -> int:
        async with trio.open_nursery() as nursery:
            self._tasks = nursery
            nursery.start_soon(self._network_loop, nursery.cancel_scope)
            nursery.start_soon(self._keepalive_loop)
            nursery.start_soon(self._sender_loop)
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
        number = 0
        while (line := await self.console.read_line()) is not None:
            number += 1
            command = parse_input(line, self.room)
            if command is None:
                continue
            if not self.script and is_command(line):
                self.console.show(self.format.typed(self.prompt(), line))
            if isinstance(command, Quit):
                break
            problem = await self._do(command)
            if problem is not None and self.script:
                self.failure = f"input line {number} {problem}; the lines after it were not sent"
                break
        return await self._leave()

    async def _do(self, command: Command) -> str | None:
        """Carry out ``command``; what went wrong with it (``not sent: ...``), or None."""
        if isinstance(command, ShowHelp):
            self.console.show(HELP)
        elif isinstance(command, Invalid):
            if not self.script:  # (a script's failure line says it)
                self._notice(command.reason)
            return f"not sent: {command.reason}"
        elif isinstance(command, Switch):
            if command.room not in self.rooms:
                return self._refuse(f"you are not in {command.room}; /join it first")
            self.room = command.room
            self._notice(f"your lines now go to {command.room}")
        elif isinstance(command, SendText):
            if self.room not in self.rooms:
                return self._refuse(f"you are not in {self.room}; /join a room first")
            action = True if command.action else None  # (left out of the frame when plain)
            return await self._send_message(
                Say(room=self.room, text=command.text, action=action, id=self._next_id())
            )
        elif isinstance(command, SendDirect):
            return await self._send_message(
                Dm(to=command.to, text=command.text, id=self._next_id())
            )
        elif isinstance(command, Ask):
            return await self._ask(command.envelope)
        return None

    def _refuse(self, reason: str) -> str:
        if not self.script:
            self._notice(reason)
        return f"not sent: {reason}"

    def _next_id(self) -> str:
        return f"{self._id_prefix}-{next(self._ids)}"

    async def _send_message(self, envelope: Say | Dm) -> str | None:
        item = _Outgoing(envelope)
        self._unsettled += 1
        await self._outbox_in.send(item)
        if not self.script:
            return None
        await item.done.wait()
        return _refusal(item.reply)

    async def _ask(
        self, request: Join | Leave | Who | Rooms | History | Kick | TopicRequest
    ) -> str | None:
        if not self._connected and not self.script:
            self._notice("not connected right now; try again in a moment")
            return None
        envelope = request.model_copy(update={"id": self._next_id()})
        if isinstance(envelope, History):
            self._replays += 1
        reply: ServerEnvelope | None = None
        if self.script:
            reply = await self._request(envelope, wait_for_connection=True)
        else:
            with trio.move_on_after(REPLY_TIMEOUT):
                reply = await self._request(envelope, wait_for_connection=False)
        if isinstance(envelope, History) and not isinstance(reply, HistoryEnd):
            self._replays = max(0, self._replays - 1)
        return _refusal(reply)

    async def _sender_loop(self) -> None:
        async for item in self._outbox:
            item.reply = await self._request(item.envelope, wait_for_connection=True)
            if isinstance(item.reply, Error):
                self.refused += 1
            elif (
                isinstance(item.reply, Ack) and item.reply.stored and isinstance(item.envelope, Dm)
            ):
                self._notice(
                    f"{item.envelope.to} is offline: the message is stored and delivered"
                    " when they next log in"
                )
            self._unsettled -= 1
            item.done.set()
            self._progress.set()
            self._progress = trio.Event()

    async def _request(
        self, envelope: Request, *, wait_for_connection: bool
    ) -> ServerEnvelope | None:
        """Send ``envelope`` and return the server's answer to it.

        A ``rate_limited`` refusal is not an answer: the envelope goes again
        after ``retry_after``. If the connection drops first: with
        ``wait_for_connection`` it goes again (same id) once the session has
        reconnected, else the result is None.
        """
        assert envelope.id is not None
        waiter = self._waiters[envelope.id] = _Waiter()
        try:
            while True:
                if not self._connected:
                    if not wait_for_connection:
                        return None
                    await self._online.wait()
                    continue
                waiter.event, waiter.reply = trio.Event(), None
                await self._send(envelope)
                await waiter.event.wait()
                reply = waiter.reply
                if isinstance(reply, Error) and reply.code == ErrorCode.RATE_LIMITED:
                    await trio.sleep(reply.retry_after if reply.retry_after is not None else 1.0)
                elif reply is not None:
                    return reply
        finally:
            del self._waiters[envelope.id]

    async def _send(self, envelope: ClientEnvelope) -> None:
        if self._connected:
            with suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await self.connection.send(envelope)

    async def _leave(self) -> int:
        # Wait for the outbox to empty, as long as it keeps moving.
        while self._unsettled:
            progress = self._progress
            with trio.move_on_after(ACK_TIMEOUT):
                await progress.wait()
            if not progress.is_set():
                break
        unacknowledged = self._unsettled
        self._leaving = True
        await self._send(Bye())
        if unacknowledged:
            self._notice(f"{unacknowledged} message(s) were not acknowledged by the server")
        failed = unacknowledged or self.refused or self.failure is not None
        return 1 if failed else 0

    # --- network ---

    async def _network_loop(self, scope: trio.CancelScope) -> None:
        while True:
            retry = await self._receive_loop()
            if self._leaving:
                return
            self._disconnected()
            await trio.aclose_forcefully(self.connection.stream)
            if not retry or self._reconnect is None:
                self._exit_code = 1
                scope.cancel()
                return
            if not await self._reconnect_with_backoff():
                scope.cancel()
                return

    def _disconnected(self) -> None:
        self._connected = False
        self._online = trio.Event()
        for waiter in self._waiters.values():
            if not waiter.event.is_set():
                waiter.event.set()  # with no reply: the request goes again, or gives up

    async def _receive_loop(self) -> bool:
        """Handle envelopes until the connection ends; True if reconnecting makes sense."""
        while True:
            try:
                envelope = await self.connection.receive()
            except ProtocolError as exc:
                if exc.fatal:  # the frames that follow cannot be found: give up on this one
                    if not self._leaving:
                        reason = sanitize(exc.message)
                        self._notice(f"[DISCONNECTED] the server broke the protocol: {reason}")
                    return True
                self.console.show(self.format.invalid_frame(exc))
                continue
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                if not self._leaving:
                    where = self.connection.where
                    self._notice(f"[DISCONNECTED] {describe_tls_failure(exc, where)}")
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
        if isinstance(envelope, Error) and envelope.ref == "sync":
            if envelope.code == ErrorCode.RATE_LIMITED and self._tasks is not None:
                # Catching up is worth waiting for: ask again when the server says.
                self._tasks.start_soon(self._sync_later, envelope.retry_after or 1.0)
                return
        elif isinstance(envelope, Joined):
            if envelope.room not in self.rooms:
                self.rooms.append(envelope.room)
            if envelope.ref is not None:  # our own /join, not one from another device
                self.room = envelope.room
        elif isinstance(envelope, Left):
            if envelope.room in self.rooms:
                self.rooms.remove(envelope.room)
            if self.room == envelope.room:
                self.room = (
                    LOBBY if LOBBY in self.rooms else (self.rooms[0] if self.rooms else LOBBY)
                )
        if self._answered(envelope):
            return
        if isinstance(envelope, HistoryEnd):
            await self._history_ended(envelope)
            return
        line = self.format.describe(envelope)
        if line is not None:
            self.console.show(line)

    def _answered(self, envelope: ServerEnvelope) -> bool:
        """Hand ``envelope`` to the request it answers; True if it is not to be shown."""
        ref = getattr(envelope, "ref", None)
        waiter = self._waiters.get(ref) if isinstance(ref, str) else None
        if waiter is None:
            return False
        waiter.reply = envelope
        waiter.event.set()
        if isinstance(envelope, Ack):
            return True
        # Refusals for rate are retried; in a script a refusal is its line's failure.
        return isinstance(envelope, Error) and (
            envelope.code == ErrorCode.RATE_LIMITED or self.script
        )

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

    async def _reconnect_with_backoff(self) -> bool:
        """Connect again, one line per attempt; False when it is time to give up."""
        assert self._reconnect is not None
        deadline = trio.current_time() + self._backoff.give_up
        attempt = 0
        delay = self._backoff.delay(attempt)
        self._notice(f"reconnecting in {delay:.1f} s")
        while True:
            await trio.sleep(delay)
            attempt += 1
            try:
                connection, welcome = await self._reconnect()
            except LoginRefused as exc:
                self.console.show(self.format.notice(str(exc)))
                self._exit_code = 1
                return False
            except ClientError as exc:
                delay = self._backoff.delay(attempt)
                if trio.current_time() + delay > deadline:
                    self._notice(f"{exc}; giving up: the server is still unreachable")
                    self._exit_code = 1
                    return False
                self._notice(f"{exc}; trying again in {delay:.1f} s")
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
        self._online.set()  # requests waiting for the connection go (again) now
        return True

    def _notice(self, text: str) -> None:
        self.console.show(self.format.notice(text))


def _refusal(reply: ServerEnvelope | None) -> str | None:
    """``refused by the server: ...`` if ``reply`` is an error, else None."""
    if isinstance(reply, Error):
        return f"refused by the server: {sanitize(reply.message)} ({sanitize(reply.code)})"
    return None
