"""Wire protocol v1: envelopes, framing and errors, with no I/O.

This module is the single source of truth for what crosses the wire
(`docs/protocol.md` describes the same thing for people). Each envelope is
one UTF-8 JSON object on one line, terminated by ``\\n``. Envelopes are strict
pydantic models: unknown fields, wrong types and unknown ``type`` tags are
errors, never silently dropped or coerced.

The server and the client are I/O layers on top: they feed received bytes
to a :class:`FrameDecoder` (through :class:`securechat.lines.FrameReader`),
turn each frame into an envelope with
:func:`parse_client_frame` / :func:`parse_server_frame`, and write the bytes
:func:`encode` returns. Anything that goes wrong with the peer's input is a
:class:`ProtocolError` carrying the ``error`` code to send back.
"""

from __future__ import annotations

import enum
import json
import re
import time
from datetime import UTC, datetime
from typing import Annotated, Any, Literal, NoReturn

import pydantic_core
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    StringConstraints,
    TypeAdapter,
    ValidationError,
    field_serializer,
    model_validator,
)

ALPN_PROTOCOL = "securechat/1"
DEFAULT_MAX_FRAME_BYTES = 65536
# What a client accepts from the server in one frame: room lists and member
# lists grow with the server's rooms and users (a thousand rooms with long
# topics are a quarter of a megabyte), so the client's cap is far above them.
MAX_SERVER_FRAME_BYTES = 16 * 1024 * 1024
MAX_TEXT_CHARS = 4000
MAX_PASSWORD_CHARS = 1024
MAX_HISTORY_LIMIT = 500
MAX_MESSAGE_ID = 2**63 - 1  # SQLite's INTEGER PRIMARY KEY
MAX_TOPIC_CHARS = 200
LOBBY = "lobby"
SERVER_USER = "server"  # sender of operator announcements; no account may have this name

NAME_PATTERN = r"^[a-z0-9_][a-z0-9_.-]{0,31}$"
# Visible ASCII only: ids are echoed back and shown in logs.
ID_PATTERN = r"^[\x21-\x7e]{1,64}$"
# Message text: any Unicode except C0/C1 control characters (tab and newline
# are allowed). Lone surrogates never get this far: the JSON parser rejects them.
# The length is Text's min_length/max_length: a bounded repetition here made the
# regex cost 2.6 µs per message instead of 0.5.
TEXT_PATTERN = r"^[^\x00-\x08\x0b-\x1f\x7f-\x9f]*$"

Name = Annotated[str, StringConstraints(pattern=NAME_PATTERN)]
"""A username or a room name."""
# Optional features a client asks for in ``hello`` (unknown ones are ignored, so
# that a client may ask for features a newer server offers).
Feature = Annotated[str, StringConstraints(pattern=r"^[a-z0-9_.-]{1,32}$")]
MAX_FEATURES = 16
PRESENCE_LISTS = "presence_lists"
"""Feature: ``online``/``offline`` may come as one ``presence`` with a ``users`` list."""
ClientId = Annotated[str, StringConstraints(pattern=ID_PATTERN)]
Text = Annotated[
    str, StringConstraints(min_length=1, max_length=MAX_TEXT_CHARS, pattern=TEXT_PATTERN)
]
# One line of text: room topics and kick reasons.
LINE_PATTERN = r"^[^\x00-\x1f\x7f-\x9f]*$"
Topic = Annotated[str, StringConstraints(max_length=MAX_TOPIC_CHARS, pattern=LINE_PATTERN)]
Reason = Annotated[str, StringConstraints(max_length=MAX_TOPIC_CHARS, pattern=LINE_PATTERN)]


class ErrorCode(enum.StrEnum):
    """Every code an ``error`` envelope can carry."""

    BAD_FRAME = "bad_frame"
    BAD_ENVELOPE = "bad_envelope"
    AUTH_REQUIRED = "auth_required"
    AUTH_FAILED = "auth_failed"
    FRAME_TOO_LARGE = "frame_too_large"
    NOT_MEMBER = "not_member"
    FORBIDDEN = "forbidden"
    UNKNOWN_USER = "unknown_user"
    UNKNOWN_ROOM = "unknown_room"
    UNAVAILABLE = "unavailable"
    KICKED = "kicked"
    RATE_LIMITED = "rate_limited"
    SERVER_BUSY = "server_busy"
    TIMEOUT = "timeout"
    SERVER_SHUTDOWN = "server_shutdown"


class ProtocolError(Exception):
    """The peer broke the protocol; ``code`` is the ``error`` code to send back.

    ``fatal``: nothing after this can be read from the connection (its
    framing is lost, as after a frame over the size cap), so whoever reads
    it closes the connection, after sending the error if it is the server.
    Any other error is about one frame: it is answered (or shown) and the
    connection goes on.
    """

    def __init__(
        self,
        code: ErrorCode,
        message: str,
        *,
        ref: str | None = None,
        fatal: bool = False,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.ref = ref
        self.fatal = fatal
        self.retry_after = retry_after

    def to_envelope(self) -> Error:
        return Error(
            code=self.code, message=self.message, ref=self.ref, retry_after=self.retry_after
        )


class _Envelope(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        frozen=True,
        validate_by_name=True,
        validate_by_alias=True,
        serialize_by_alias=True,
    )


# --- client -> server -------------------------------------------------------

_ACTION = "True: an action (/me), shown as '* sender text'. Omitted or false: plain text."


class Hello(_Envelope):
    """First envelope of every connection: who the client is."""

    type: Literal["hello"] = "hello"
    username: Name
    password: SecretStr | None = Field(
        default=None,
        min_length=1,
        max_length=MAX_PASSWORD_CHARS,
        description="Omitted when a client certificate authenticates the user.",
    )
    features: list[Feature] | None = Field(
        default=None,
        max_length=MAX_FEATURES,
        description=(
            "Optional protocol features the client understands (e.g. "
            f"{PRESENCE_LISTS!r}); names the server does not know are ignored."
        ),
    )
    id: ClientId | None = None

    @field_serializer("password")
    def _reveal_password(self, password: SecretStr | None) -> str | None:
        # Only the encoder ever dumps a Hello; repr() and logs still show '**********'.
        return None if password is None else password.get_secret_value()


class Say(_Envelope):
    """Send ``text`` to everyone in ``room``."""

    type: Literal["say"] = "say"
    room: Name
    text: Text
    action: bool | None = Field(default=None, description=_ACTION)
    id: ClientId | None = None


class Dm(_Envelope):
    """Send ``text`` to one user (stored and delivered later if they are offline)."""

    type: Literal["dm"] = "dm"
    to: Name
    text: Text
    action: bool | None = Field(default=None, description=_ACTION)
    id: ClientId | None = None


class Join(_Envelope):
    """Join ``room``, creating it if it does not exist (when the server allows that)."""

    type: Literal["join"] = "join"
    room: Name
    id: ClientId | None = None


class Leave(_Envelope):
    type: Literal["leave"] = "leave"
    room: Name
    id: ClientId | None = None


class Who(_Envelope):
    """Who is in ``room``, and who of them is online."""

    type: Literal["who"] = "who"
    room: Name
    id: ClientId | None = None


class Rooms(_Envelope):
    """The rooms this user can see."""

    type: Literal["rooms"] = "rooms"
    id: ClientId | None = None


class History(_Envelope):
    """Replay stored messages in id order, then ``history_end``.

    Scope: ``room`` (a room the user is in), ``with`` (direct messages with
    one user), or neither (everything the user can see: their rooms and
    their direct messages). Without ``after``, the latest ``limit`` messages.
    """

    type: Literal["history"] = "history"
    room: Name | None = None
    peer: Name | None = Field(default=None, alias="with")
    after: int | None = Field(default=None, ge=0, le=MAX_MESSAGE_ID)
    limit: int = Field(default=100, ge=1, le=MAX_HISTORY_LIMIT)
    id: ClientId | None = None

    @model_validator(mode="after")
    def _one_scope(self) -> History:
        if self.room is not None and self.peer is not None:
            raise ValueError("give room or with, not both")
        return self


class TopicRequest(_Envelope):
    """Without ``topic``: read the topic of ``room``. With it: set it (admins only; "" clears)."""

    type: Literal["topic"] = "topic"
    room: Name
    topic: Topic | None = None
    id: ClientId | None = None


class Kick(_Envelope):
    """Disconnect every connection of ``username`` (admins only)."""

    type: Literal["kick"] = "kick"
    username: Name
    reason: Reason | None = None
    id: ClientId | None = None


class Ping(_Envelope):
    """Liveness check; answered by ``pong``. The server sends it too, to an idle client."""

    type: Literal["ping"] = "ping"
    id: ClientId | None = None


class Pong(_Envelope):
    """Answer to ``ping``, in either direction."""

    type: Literal["pong"] = "pong"
    ref: ClientId | None = None


class Bye(_Envelope):
    """The client is leaving; the server closes the connection cleanly."""

    type: Literal["bye"] = "bye"
    id: ClientId | None = None


ClientEnvelope = (
    Hello
    | Say
    | Dm
    | Join
    | Leave
    | Who
    | Rooms
    | History
    | TopicRequest
    | Kick
    | Ping
    | Pong
    | Bye
)


# --- server -> client -------------------------------------------------------


class Welcome(_Envelope):
    """Login succeeded."""

    type: Literal["welcome"] = "welcome"
    username: Name
    rooms: list[Name] = Field(description="The rooms this user is a member of.")
    server: str
    ref: ClientId | None = None


class Message(_Envelope):
    """A chat message: to everyone in ``room``, or a direct message ``to`` one user.

    Exactly one of ``room`` and ``to`` is present. The sender receives its own
    message too.
    """

    type: Literal["message"] = "message"
    id: int = Field(ge=1, le=MAX_MESSAGE_ID, description="Server-assigned, increasing.")
    room: Name | None = None
    to: Name | None = None
    sender: Name = Field(alias="from")
    text: Text
    action: bool | None = Field(default=None, description="True for an action (/me); else omitted.")
    ts: str = Field(description="UTC time the server accepted it, ISO 8601 with milliseconds.")

    @model_validator(mode="after")
    def _room_or_recipient(self) -> Message:
        if (self.room is None) == (self.to is None):
            raise ValueError("exactly one of room and to")
        return self


class Ack(_Envelope):
    """The server stored the ``say``/``dm`` whose ``id`` was ``ref`` as message ``id``."""

    type: Literal["ack"] = "ack"
    ref: ClientId | None = None
    id: int = Field(ge=1)
    stored: bool | None = Field(
        default=None,
        description="True: a dm whose recipient had no connection; it waits for their next login.",
    )


class Joined(_Envelope):
    type: Literal["joined"] = "joined"
    room: Name
    topic: Topic
    members: list[Name]
    ref: ClientId | None = None


class Left(_Envelope):
    type: Literal["left"] = "left"
    room: Name
    ref: ClientId | None = None


PresenceState = Literal["joined", "left", "online", "offline"]


class Presence(_Envelope):
    """``username`` joined or left ``room`` (with ``room``), or came online or went offline
    (without: sent once to each connection that shares a room with the user).

    To a client that asked for :data:`PRESENCE_LISTS`, ``online`` and ``offline``
    may instead name several users at once in ``users`` (never empty; then
    ``username`` is absent)."""

    type: Literal["presence"] = "presence"
    room: Name | None = None
    username: Name | None = None
    users: list[Name] | None = Field(default=None, min_length=1)
    state: PresenceState

    @model_validator(mode="after")
    def _room_for_joined_and_left_only(self) -> Presence:
        if (self.room is not None) != (self.state in ("joined", "left")):
            raise ValueError("room: given with joined and left only")
        if (self.username is None) == (self.users is None):
            raise ValueError("presence: exactly one of username and users")
        if self.users is not None and self.room is not None:
            raise ValueError("users: with online and offline only")
        return self

    @property
    def names(self) -> list[str]:
        """The users whose state changed: ``users``, or ``[username]``."""
        if self.users is not None:
            return self.users
        assert self.username is not None  # the validator saw to it
        return [self.username]


class Members(_Envelope):
    """Answer to ``who``."""

    type: Literal["members"] = "members"
    room: Name
    online: list[Name]
    members: list[Name]
    ref: ClientId | None = None


class RoomInfo(_Envelope):
    name: Name
    topic: Topic
    members: int = Field(ge=0, description="How many users are members.")


class RoomList(_Envelope):
    """Answer to ``rooms``."""

    type: Literal["room_list"] = "room_list"
    rooms: list[RoomInfo]
    ref: ClientId | None = None


class RoomTopic(_Envelope):
    """The topic of ``room``: the answer to a ``topic`` request, or (with ``by``) a change."""

    type: Literal["topic"] = "topic"
    room: Name
    topic: Topic
    by: Name | None = Field(
        default=None, description="Who changed it (server: the config file); absent in an answer."
    )
    ref: ClientId | None = None


class HistoryEnd(_Envelope):
    """Ends a ``history`` replay; ``last`` is the cursor to pass as ``after`` for the next page."""

    type: Literal["history_end"] = "history_end"
    room: Name | None = None
    peer: Name | None = Field(default=None, alias="with")
    last: int = Field(
        ge=0, description="Id of the last message replayed, else the request's after."
    )
    more: bool = Field(description="True when the limit was reached: ask again after last.")
    ref: ClientId | None = None


class Kicked(_Envelope):
    """Answer to ``kick``: the user's connections were closed."""

    type: Literal["kicked"] = "kicked"
    username: Name
    ref: ClientId | None = None


class Error(_Envelope):
    """Something the client sent was refused, or the server is closing the connection."""

    type: Literal["error"] = "error"
    code: ErrorCode
    message: str
    ref: ClientId | None = None
    retry_after: float | None = Field(
        default=None, ge=0, description="rate_limited: seconds until a message is accepted again."
    )


ServerEnvelope = (
    Welcome
    | Message
    | Ack
    | Joined
    | Left
    | Presence
    | Members
    | RoomList
    | RoomTopic
    | HistoryEnd
    | Kicked
    | Ping
    | Pong
    | Error
)

_CLIENT_ADAPTER: TypeAdapter[ClientEnvelope] = TypeAdapter(
    Annotated[ClientEnvelope, Field(discriminator="type")]
)
_SERVER_ADAPTER: TypeAdapter[ServerEnvelope] = TypeAdapter(
    Annotated[ServerEnvelope, Field(discriminator="type")]
)


# Every field of Message, and the ones trusted_message sets (``type`` keeps its default).
_MESSAGE_SET = frozenset({"id", "room", "to", "sender", "text", "action", "ts"})
# trusted_message's short cut is what model_construct ends with for a model like
# Message (no extra fields kept, no private attributes, no post-init); a model
# that stops being like that gets model_construct itself.
_MESSAGE_PLAIN = (
    Message.model_config.get("extra") != "allow"
    and not Message.__private_attributes__
    and Message.__pydantic_post_init__ is None
    and set(Message.model_fields) == _MESSAGE_SET | {"type"}
)
_set = object.__setattr__


def trusted_message(
    id: int,
    room: str | None,
    to: str | None,
    sender: str,
    text: str,
    action: bool,
    ts: str,
) -> Message:
    """A :class:`Message` from values that are already valid (a validated envelope, a
    stored row), built without validating them again.

    What ``Message.model_construct`` builds, at less than half its cost (once per
    message sent and per message read back): 6.2 -> 2.6 us here. ``action``
    False is left out on the wire (None).
    """
    if not _MESSAGE_PLAIN:
        return Message.model_construct(
            id=id, room=room, to=to, sender=sender, text=text, action=action or None, ts=ts
        )
    message = Message.__new__(Message)
    _set(
        message,
        "__dict__",
        {
            "type": "message",
            "id": id,
            "room": room,
            "to": to,
            "sender": sender,
            "text": text,
            "action": True if action else None,
            "ts": ts,
        },
    )
    _set(message, "__pydantic_fields_set__", set(_MESSAGE_SET))
    _set(message, "__pydantic_extra__", None)
    _set(message, "__pydantic_private__", None)
    return message


def json_schemas() -> dict[str, Any]:
    """The JSON Schema of both directions, as printed by ``securechat schema``."""
    return {
        "client_to_server": _CLIENT_ADAPTER.json_schema(),
        "server_to_client": _SERVER_ADAPTER.json_schema(),
    }


# --- encoding and parsing ---------------------------------------------------


def encode(envelope: _Envelope) -> bytes:
    """One envelope as a complete frame (JSON + newline); absent optional fields are left out."""
    return envelope.__pydantic_serializer__.to_json(envelope, exclude_none=True) + b"\n"


def utc_timestamp(now: datetime | None = None) -> str:
    """``2026-11-24T07:00:00.123Z``: the form of every ``ts`` field."""
    now = now or datetime.now(UTC)
    return now.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z"


class UtcClock:
    """:func:`utc_timestamp` for now, fast: formats the date and time once per second.

    (``strftime`` on every message was a tenth of the server's time under load.)
    """

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""

    def __call__(self) -> str:
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second = second
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S.", time.gmtime(second))
        return f"{self._prefix}{int((now - second) * 1000):03d}Z"


def parse_client_frame(frame: bytes) -> ClientEnvelope:
    """Validate one frame from a client; raises :class:`ProtocolError`."""
    try:
        # by_name=False: on the wire only the documented names count ("with",
        # "from"), not the Python attribute names behind them.
        envelope = _CLIENT_ADAPTER.validate_json(frame, by_alias=True, by_name=False)
    except ValidationError as exc:
        _raise_invalid(frame, exc)
    _reject_duplicate_keys(frame, request_id(envelope), len(envelope.model_fields_set))
    return envelope


def request_id(envelope: ClientEnvelope) -> str | None:
    """The client's ``id`` on ``envelope``, to echo as ``ref`` (a ``pong`` has none)."""
    return None if isinstance(envelope, Pong) else envelope.id


def parse_server_frame(frame: bytes) -> ServerEnvelope:
    """Validate one frame from the server; raises :class:`ProtocolError`."""
    try:
        return _SERVER_ADAPTER.validate_json(frame, by_alias=True, by_name=False)
    except ValidationError as exc:
        _raise_invalid(frame, exc)


def _raise_invalid(frame: bytes, exc: ValidationError) -> NoReturn:
    errors = exc.errors(include_url=False, include_input=False, include_context=False)
    first = errors[0]
    if first["type"] == "json_invalid":
        raise ProtocolError(ErrorCode.BAD_FRAME, "frame is not valid UTF-8 JSON") from None
    if first["type"] in ("dict_type", "model_type", "model_attributes_type"):
        raise ProtocolError(ErrorCode.BAD_FRAME, "frame is not a JSON object") from None
    ref = _salvage_id(frame)
    raise ProtocolError(ErrorCode.BAD_ENVELOPE, _describe(errors), ref=ref) from None


def _describe(errors: list[Any]) -> str:
    parts = []
    for error in errors[:3]:
        kind = error["type"]
        # loc starts with the union tag ("say", "text"); the tag is not a field name.
        field = ".".join(str(part) for part in error["loc"][1:]) or "type"
        if kind == "union_tag_not_found":
            parts.append("type: missing")
        elif kind == "union_tag_invalid":
            parts.append("type: unknown envelope type")
        elif kind == "extra_forbidden":
            parts.append(f"{field}: unknown field")
        elif kind == "missing":
            parts.append(f"{field}: missing")
        elif kind == "value_error":
            parts.append(str(error["msg"]).removeprefix("Value error, "))
        elif kind == "string_pattern_mismatch":
            parts.append(f"{field}: {_PATTERN_HINTS.get(field, 'invalid characters')}")
        else:
            parts.append(f"{field}: {error['msg']}")
    if len(errors) > 3:
        parts.append(f"and {len(errors) - 3} more")
    # Field names come from the peer (unknown fields); keep the reply small.
    return "; ".join(parts)[:300]


_PATTERN_HINTS = {
    "username": "must match " + NAME_PATTERN,
    "room": "must match " + NAME_PATTERN,
    "id": "must be 1-64 visible ASCII characters",
    "text": "control characters are not allowed",
    "topic": "control characters are not allowed",
    "reason": "control characters are not allowed",
}


def _salvage_id(frame: bytes) -> str | None:
    """The client's ``id`` from an envelope that failed validation, if it is a valid id."""
    try:
        value = pydantic_core.from_json(frame)
    except ValueError:
        return None
    candidate = value.get("id") if isinstance(value, dict) else None
    try:
        return _ID_ADAPTER.validate_python(candidate)
    except ValidationError:
        return None


_ID_ADAPTER: TypeAdapter[str] = TypeAdapter(ClientId)
_TEXT_ADAPTER: TypeAdapter[str] = TypeAdapter(Text)


def check_text(text: str) -> str:
    """``text`` if it is valid message text; else ProtocolError saying why (for local input)."""
    try:
        return _TEXT_ADAPTER.validate_python(text)
    except ValidationError as exc:
        kind = exc.errors()[0]["type"]
        if kind == "string_too_long":
            reason = f"message too long ({len(text)} characters, at most {MAX_TEXT_CHARS})"
        elif kind == "string_too_short":
            reason = "message is empty"
        else:
            reason = "message contains control characters"
        raise ProtocolError(ErrorCode.BAD_ENVELOPE, reason) from None


# Every string of a frame without escapes, in order, with the ':' after it if
# it is a key. Matching whole strings keeps the scan aligned: no quote is
# ever taken for the start of a string when it ends one.
_STRING = re.compile(rb'"([^"]*)"([ \t\r\n]*:)?')


_QUOTE_THEN_SPACE = re.compile(rb'"[ \t\r\n]')


def _reject_duplicate_keys(frame: bytes, ref: str | None, distinct_keys: int) -> None:
    # pydantic keeps the last of duplicate keys; a frame such as
    # {"type":"say",...,"type":"bye"} must not mean different things to
    # different parsers. The frame already validated, so it is a flat object
    # whose keys are all known fields: ``distinct_keys`` (the fields it set)
    # is how many different keys it has, and this second look is cheap and
    # cannot recurse deeply.
    if b"\\" not in frame:
        # Compact JSON (what clients send): when no quote is followed by
        # whitespace, every key's closing quote is followed by ':' at once, so
        # '":' occurs at least once per key (more if a value starts with ':').
        # As many as there are different keys: no key can be there twice.
        if frame.count(b'":') == distinct_keys and not _QUOTE_THEN_SPACE.search(frame):
            return
        # Otherwise decide exactly: with no escapes, a string followed by ":"
        # is a key, and nothing else is (in valid JSON a value string is never
        # followed by ":").
        keys = [key for key, colon in _STRING.findall(frame) if colon]
        if len(set(keys)) != len(keys):
            raise ProtocolError(ErrorCode.BAD_ENVELOPE, "duplicate key in envelope", ref=ref)
        return

    def check(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [key for key, _ in pairs]
        if len(set(keys)) != len(keys):
            raise ProtocolError(ErrorCode.BAD_ENVELOPE, "duplicate key in envelope", ref=ref)
        return dict(pairs)

    try:
        json.loads(frame, object_pairs_hook=check)
    except (ValueError, RecursionError):
        raise ProtocolError(ErrorCode.BAD_FRAME, "frame is not valid UTF-8 JSON") from None


# --- framing ------------------------------------------------------------------


class FrameDecoder:
    """Splits a byte stream into newline-terminated frames.

    ``feed`` the bytes as they arrive, then call ``next_frame`` until it
    returns ``None`` (more data needed). A frame longer than
    ``max_frame_bytes`` raises a fatal ``frame_too_large`` error, and the
    decoder never holds more than ``max_frame_bytes`` of an unfinished frame.
    Empty lines are skipped; a trailing ``\\r`` is removed.
    """

    def __init__(self, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> None:
        self.max_frame_bytes = max_frame_bytes
        self._buffer = bytearray()
        self._scanned = 0  # bytes at the start of _buffer known to hold no newline
        self._unfinished = 0  # bytes after the last newline in _buffer
        self._overflowed = False

    def feed(self, data: bytes | bytearray) -> None:
        if self._overflowed:
            return
        self._buffer += data
        # Only the new data is searched: feeding a frame in tiny pieces stays linear.
        newline = data.rfind(b"\n")
        self._unfinished = self._unfinished + len(data) if newline < 0 else len(data) - newline - 1
        if self._unfinished > self.max_frame_bytes:
            # Keep the complete frames before the oversize one; next_frame
            # hands them out, then raises.
            del self._buffer[len(self._buffer) - self._unfinished :]
            self._unfinished = 0
            self._overflowed = True

    def next_frame(self) -> bytes | None:
        while True:
            newline = self._buffer.find(b"\n", self._scanned)
            if newline < 0:
                self._scanned = len(self._buffer)
                if self._overflowed:
                    raise self._too_large()
                return None
            if newline > self.max_frame_bytes:
                self._buffer.clear()
                self._unfinished = 0
                self._overflowed = True
                raise self._too_large()
            frame = bytes(self._buffer[:newline])
            del self._buffer[: newline + 1]
            self._scanned = 0
            if frame.endswith(b"\r"):
                frame = frame[:-1]
            if frame:
                return frame

    def __iter__(self) -> FrameDecoder:
        return self

    def __next__(self) -> bytes:
        frame = self.next_frame()
        if frame is None:
            raise StopIteration
        return frame

    def _too_large(self) -> ProtocolError:
        return ProtocolError(
            ErrorCode.FRAME_TOO_LARGE,
            f"frame longer than {self.max_frame_bytes} bytes",
            fatal=True,
        )
