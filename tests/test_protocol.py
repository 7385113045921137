"""Unit tests for securechat.protocol: framing, envelope parsing and encoding (no I/O)."""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from pydantic import SecretStr

from securechat import protocol
from securechat.protocol import (
    DEFAULT_MAX_FRAME_BYTES,
    MAX_TEXT_CHARS,
    MAX_TOPIC_CHARS,
    Ack,
    Bye,
    Dm,
    Error,
    ErrorCode,
    FrameDecoder,
    Hello,
    Message,
    Ping,
    Pong,
    Presence,
    ProtocolError,
    RoomTopic,
    Say,
    TopicRequest,
    Welcome,
    _reject_duplicate_keys,
    encode,
    json_schemas,
    parse_client_frame,
    parse_server_frame,
    utc_timestamp,
)

# --- helpers -----------------------------------------------------------------

PROPERTY_SETTINGS = settings(max_examples=200, deadline=None)

ClientEnvelope = Hello | Say | TopicRequest | Ping | Bye


def frame(obj: object) -> bytes:
    """A JSON frame body (no newline) for ``obj``."""
    return json.dumps(obj).encode()


def drain(decoder: FrameDecoder) -> list[bytes]:
    return list(decoder)


def feed_chunks(decoder: FrameDecoder, chunks: Iterable[bytes]) -> list[bytes]:
    """Feed every chunk, collecting the frames as they become available."""
    frames: list[bytes] = []
    for chunk in chunks:
        decoder.feed(chunk)
        frames += drain(decoder)
    return frames


def split_at(data: bytes, points: Iterable[int]) -> list[bytes]:
    cuts = [0, *sorted(set(points)), len(data)]
    return [data[start:end] for start, end in itertools.pairwise(cuts)]


def bad_envelope(data: bytes) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        parse_client_frame(data)
    assert info.value.code is ErrorCode.BAD_ENVELOPE
    assert not info.value.fatal
    return info.value


def bad_frame(data: bytes) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        parse_client_frame(data)
    assert info.value.code is ErrorCode.BAD_FRAME
    assert info.value.ref is None
    return info.value


def unfinished_bytes(decoder: FrameDecoder) -> int:
    """White-box: how many bytes of an unfinished frame the decoder holds."""
    buffer = decoder._buffer
    # bytearray.rfind, not buffer.rfind: ScanCountingBuffer must not count this check.
    return len(buffer) - (bytearray.rfind(buffer, b"\n") + 1)


def run_decoder(
    decoder: FrameDecoder, chunks: Iterable[bytes]
) -> tuple[list[bytes], ProtocolError | None]:
    """Feed the chunks, draining after each, until the first ProtocolError.

    The decoder may raise ``frame_too_large`` from ``feed`` or from the
    ``next_frame`` that follows it; either is fine. After every ``feed`` it
    must hold at most ``max_frame_bytes`` of an unfinished frame.
    """
    frames: list[bytes] = []
    try:
        for chunk in chunks:
            decoder.feed(chunk)
            assert unfinished_bytes(decoder) <= decoder.max_frame_bytes
            while (item := decoder.next_frame()) is not None:
                frames.append(item)
    except ProtocolError as error:
        return frames, error
    return frames, None


def assert_too_large(error: ProtocolError | None, max_frame_bytes: int) -> None:
    assert error is not None, "no frame_too_large error"
    assert error.code is ErrorCode.FRAME_TOO_LARGE
    assert error.fatal is True
    assert str(max_frame_bytes) in error.message


# --- FrameDecoder ----------------------------------------------------------------


def test_decoder_returns_none_before_any_data() -> None:
    decoder = FrameDecoder()
    assert decoder.next_frame() is None
    assert drain(decoder) == []


def test_decoder_returns_a_whole_frame_without_its_newline() -> None:
    decoder = FrameDecoder()
    decoder.feed(b'{"type":"ping"}\n')
    assert decoder.next_frame() == b'{"type":"ping"}'
    assert decoder.next_frame() is None


def test_decoder_accepts_bytearray() -> None:
    decoder = FrameDecoder()
    decoder.feed(bytearray(b"abc\n"))
    assert drain(decoder) == [b"abc"]


def test_decoder_splits_several_frames_in_one_feed() -> None:
    decoder = FrameDecoder()
    decoder.feed(b"one\ntwo\nthree\n")
    assert drain(decoder) == [b"one", b"two", b"three"]


def test_decoder_handles_a_frame_split_at_every_byte_position() -> None:
    stream = b'{"type":"say","room":"lobby","text":"h\xc3\xa9llo"}\n{"type":"bye"}\n'
    expected = [stream.split(b"\n")[0], b'{"type":"bye"}']
    for cut in range(len(stream) + 1):
        decoder = FrameDecoder()
        assert feed_chunks(decoder, [stream[:cut], stream[cut:]]) == expected, cut


def test_decoder_handles_byte_by_byte_feeding() -> None:
    stream = b"alpha\r\nbeta\n\ngamma\n"
    decoder = FrameDecoder()
    chunks = [stream[i : i + 1] for i in range(len(stream))]
    assert feed_chunks(decoder, chunks) == [b"alpha", b"beta", b"gamma"]


def test_decoder_keeps_a_trailing_partial_frame_for_later() -> None:
    decoder = FrameDecoder()
    decoder.feed(b"first\nsec")
    assert decoder.next_frame() == b"first"
    assert decoder.next_frame() is None
    decoder.feed(b"ond")
    assert decoder.next_frame() is None
    decoder.feed(b"\nthi")
    assert drain(decoder) == [b"second"]
    decoder.feed(b"rd\n")
    assert drain(decoder) == [b"third"]


def test_decoder_skips_empty_lines_and_strips_carriage_returns() -> None:
    decoder = FrameDecoder()
    decoder.feed(b"\n\r\n\na\r\n\r\nb\n\n")
    assert drain(decoder) == [b"a", b"b"]


def test_decoder_strips_only_one_trailing_carriage_return() -> None:
    decoder = FrameDecoder()
    decoder.feed(b"a\rb\r\r\n")
    assert drain(decoder) == [b"a\rb\r"]


def test_decoder_iterator_stops_when_more_data_is_needed() -> None:
    decoder = FrameDecoder()
    decoder.feed(b"x\ny")
    iterator = iter(decoder)
    assert next(iterator) == b"x"
    with pytest.raises(StopIteration):
        next(iterator)


def test_decoder_default_limit() -> None:
    assert FrameDecoder().max_frame_bytes == DEFAULT_MAX_FRAME_BYTES


def test_decoder_accepts_a_frame_of_exactly_max_frame_bytes() -> None:
    decoder = FrameDecoder(max_frame_bytes=16)
    decoder.feed(b"x" * 16)
    decoder.feed(b"\n")
    decoder.feed(b"y" * 16 + b"\n")
    assert drain(decoder) == [b"x" * 16, b"y" * 16]


def test_decoder_rejects_an_oversize_complete_frame() -> None:
    decoder = FrameDecoder(max_frame_bytes=16)
    frames, error = run_decoder(decoder, [b"ok\n" + b"x" * 17 + b"\n" + b"after\n"])
    assert frames == [b"ok"]
    assert_too_large(error, 16)


def test_decoder_rejects_an_oversize_incomplete_frame_in_one_feed() -> None:
    decoder = FrameDecoder(max_frame_bytes=16)
    frames, error = run_decoder(decoder, [b"x" * 17])
    assert frames == []
    assert_too_large(error, 16)


def test_decoder_rejects_an_oversize_incomplete_frame_growing_over_several_feeds() -> None:
    chunks = [b"done\n" + b"x" * 10, b"x" * 6, b"x"]
    frames, error = run_decoder(FrameDecoder(max_frame_bytes=16), chunks[:2])
    assert (frames, error) == ([b"done"], None)  # exactly at the limit: still fine
    frames, error = run_decoder(FrameDecoder(max_frame_bytes=16), chunks)
    assert frames == [b"done"]
    assert_too_large(error, 16)


def test_decoder_delivers_complete_frames_before_an_oversize_tail_in_the_same_feed() -> None:
    decoder = FrameDecoder(max_frame_bytes=16)
    frames, error = run_decoder(decoder, [b"one\ntwo\n" + b"x" * 17])
    assert frames == [b"one", b"two"]
    assert_too_large(error, 16)


def test_decoder_rejects_an_oversize_frame_assembled_from_a_buffered_tail() -> None:
    # The tail already buffered plus the start of the next feed make one long frame.
    decoder = FrameDecoder(max_frame_bytes=16)
    frames, error = run_decoder(decoder, [b"x" * 10, b"x" * 10 + b"\n"])
    assert frames == []
    assert_too_large(error, 16)


def test_decoder_rejects_an_oversize_frame_fed_byte_by_byte_as_soon_as_it_exceeds() -> None:
    decoder = FrameDecoder(max_frame_bytes=32)
    frames, error = run_decoder(decoder, [b"x"] * 32)
    assert (frames, error) == ([], None)
    frames, error = run_decoder(decoder, [b"x"])
    assert frames == []
    assert_too_large(error, 32)


def test_decoder_never_buffers_more_than_max_frame_bytes_of_an_unfinished_frame() -> None:
    limit = 64
    decoder = FrameDecoder(max_frame_bytes=limit)
    # Complete frames may arrive in big feeds; the unfinished tail may not grow past the limit.
    for size in (1, 7, limit - 1, limit):
        frames, error = run_decoder(decoder, [b"f" * size + b"\n" + b"t" * size, b"\n"])
        assert (frames, error) == ([b"f" * size, b"t" * size], None)
    decoder.feed(b"t" * limit)
    assert unfinished_bytes(decoder) == limit
    assert decoder.next_frame() is None
    frames, error = run_decoder(decoder, [b"t" * 10_000])  # asserts unfinished_bytes <= limit
    assert frames == []
    assert_too_large(error, limit)
    assert len(decoder._buffer) <= limit  # the oversize data is dropped, not kept


class ScanCountingBuffer(bytearray):
    """A decoder buffer that counts how many bytes ``find``/``rfind`` look at."""

    scanned = 0

    def _window(self, args: tuple[Any, ...]) -> tuple[int, int]:
        start = 0 if len(args) < 2 or args[1] is None else int(args[1])
        end = len(self) if len(args) < 3 or args[2] is None else int(args[2])
        return max(start, 0), min(end, len(self))

    def find(self, *args: Any, **kwargs: Any) -> int:
        result = super().find(*args, **kwargs)
        start, end = self._window(args)
        self.scanned += (result + 1 if result >= 0 else end) - start
        return result

    def rfind(self, *args: Any, **kwargs: Any) -> int:
        result = super().rfind(*args, **kwargs)
        start, end = self._window(args)
        self.scanned += end - (result if result >= 0 else start)
        return result


def test_decoder_scans_each_byte_a_bounded_number_of_times() -> None:
    decoder = FrameDecoder(max_frame_bytes=1 << 20)
    counting = ScanCountingBuffer()
    decoder._buffer = counting  # white-box: count the work done on the buffer
    chunk, chunks = b"x" * 64, 2048
    frames, error = run_decoder(decoder, [chunk] * chunks + [b"\n"])
    assert frames == [chunk * chunks]
    assert error is None
    total = len(chunk) * chunks + 1
    assert counting.scanned <= 4 * total, f"{counting.scanned} bytes scanned for {total}"


@PROPERTY_SETTINGS
@given(
    tail=st.binary(min_size=0, max_size=200).map(lambda b: b.replace(b"\n", b"")),
    points=st.lists(st.integers(min_value=0, max_value=200), max_size=8),
)
def test_decoder_raises_exactly_when_the_unfinished_tail_exceeds_the_limit(
    tail: bytes, points: list[int]
) -> None:
    limit = 100
    chunks = split_at(tail, [p for p in points if p <= len(tail)])
    decoder = FrameDecoder(max_frame_bytes=limit)
    fed = 0
    for chunk in chunks:
        frames, error = run_decoder(decoder, [chunk])
        assert frames == []
        fed += len(chunk)
        if fed > limit:
            assert_too_large(error, limit)  # raised right after the feed that crossed it
            return
        assert error is None
    assert len(tail) <= limit


# --- parse_client_frame: valid envelopes ---------------------------------------------


def test_parse_hello_with_password_and_id() -> None:
    hello = parse_client_frame(
        frame({"type": "hello", "username": "alice", "password": "pw", "id": "h1"})
    )
    assert isinstance(hello, Hello)
    assert hello.username == "alice"
    assert hello.password is not None
    assert hello.password.get_secret_value() == "pw"
    assert hello.id == "h1"


def test_parse_hello_without_password() -> None:
    hello = parse_client_frame(frame({"type": "hello", "username": "bob"}))
    assert hello == Hello(username="bob")
    assert isinstance(hello, Hello)
    assert hello.password is None
    assert hello.id is None


def test_parse_say() -> None:
    say = parse_client_frame(frame({"type": "say", "room": "lobby", "text": "hi\tthere\n"}))
    assert say == Say(room="lobby", text="hi\tthere\n")


def test_parse_say_with_max_length_unicode_text() -> None:
    text = "é" * MAX_TEXT_CHARS  # length counts characters, not UTF-8 bytes
    say = parse_client_frame(frame({"type": "say", "room": "lobby", "text": text, "id": "s"}))
    assert say == Say(room="lobby", text=text, id="s")


def test_parse_ping() -> None:
    assert parse_client_frame(b'{"type":"ping","id":"p-1"}') == Ping(id="p-1")
    assert parse_client_frame(b'{"type":"ping"}') == Ping()


def test_parse_bye() -> None:
    assert parse_client_frame(b'{"type":"bye"}') == Bye()
    assert parse_client_frame(b'{"id":"z","type":"bye"}') == Bye(id="z")


def test_parse_accepts_names_at_the_limits() -> None:
    for name in ("a", "_", "0", "a" * 32, "a.b-c_d", "x" + "." * 31):
        assert parse_client_frame(frame({"type": "hello", "username": name})) == Hello(
            username=name
        )


def test_parse_accepts_a_64_char_id() -> None:
    ident = "!" + "~" * 63
    assert parse_client_frame(frame({"type": "ping", "id": ident})) == Ping(id=ident)


# --- parse_client_frame: bad frames ---------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"\xff\xfe", id="invalid-utf8"),
        pytest.param(b'{"type":"ping","id":"\xc3"}', id="truncated-utf8-in-string"),
        pytest.param(b"\xef\xbb\xbf" + b'{"type":"ping"}', id="utf8-bom"),
        pytest.param(b"", id="empty"),
        pytest.param(b"hello", id="not-json"),
        pytest.param(b'{"type":"ping"', id="truncated-json"),
        pytest.param(b"{'type':'ping'}", id="single-quotes"),
        pytest.param(b'{"type":"ping"} {}', id="trailing-data"),
    ],
)
def test_parse_rejects_invalid_utf8_or_json_as_bad_frame(data: bytes) -> None:
    error = bad_frame(data)
    assert "JSON" in error.message


@pytest.mark.parametrize(
    "data", [b"[]", b'["type","ping"]', b'"ping"', b"1", b"null", b"true", b"1.5"]
)
def test_parse_rejects_a_non_object_as_bad_frame(data: bytes) -> None:
    error = bad_frame(data)
    assert "object" in error.message


# --- parse_client_frame: bad envelopes ------------------------------------------------


def test_parse_rejects_unknown_type() -> None:
    error = bad_envelope(frame({"type": "shout", "text": "x"}))
    assert error.message == "type: unknown envelope type"


@pytest.mark.parametrize("tag", [None, 1, [], {}, "HELLO", ""])
def test_parse_rejects_non_string_or_unknown_type_tags(tag: object) -> None:
    error = bad_envelope(frame({"type": tag}))
    assert error.message.startswith("type:")


def test_parse_rejects_missing_type() -> None:
    error = bad_envelope(frame({"username": "alice"}))
    assert error.message == "type: missing"


def test_parse_rejects_an_empty_object() -> None:
    assert bad_envelope(b"{}").message == "type: missing"


@pytest.mark.parametrize(
    ("envelope", "field"),
    [
        ({"type": "ping", "extra": 1}, "extra"),
        ({"type": "bye", "reason": "done"}, "reason"),
        ({"type": "hello", "username": "alice", "admin": True}, "admin"),
        ({"type": "say", "room": "lobby", "text": "x", "from": "bob"}, "from"),
    ],
)
def test_parse_rejects_extra_fields(envelope: dict[str, object], field: str) -> None:
    error = bad_envelope(frame(envelope))
    assert f"{field}: unknown field" in error.message


@pytest.mark.parametrize(
    ("envelope", "field"),
    [
        ({"type": "say", "text": "x"}, "room"),
        ({"type": "say", "room": "lobby"}, "text"),
        ({"type": "hello"}, "username"),
    ],
)
def test_parse_rejects_missing_fields(envelope: dict[str, object], field: str) -> None:
    error = bad_envelope(frame(envelope))
    assert f"{field}: missing" in error.message


@pytest.mark.parametrize(
    ("envelope", "field"),
    [
        ({"type": "say", "room": 1, "text": "x"}, "room"),
        ({"type": "say", "room": "lobby", "text": True}, "text"),
        ({"type": "say", "room": "lobby", "text": ["x"]}, "text"),
        ({"type": "hello", "username": None}, "username"),
        ({"type": "hello", "username": "alice", "password": 1234}, "password"),
        ({"type": "ping", "id": 7}, "id"),
        ({"type": "ping", "id": {"a": 1}}, "id"),
        ({"type": "say", "room": "lobby", "text": "x", "action": 1}, "action"),
        ({"type": "dm", "to": "bob", "text": "x", "action": "true"}, "action"),
        ({"type": "topic", "room": "lobby", "topic": 5}, "topic"),
        ({"type": "topic", "room": None}, "room"),
    ],
)
def test_parse_rejects_wrong_types(envelope: dict[str, object], field: str) -> None:
    error = bad_envelope(frame(envelope))
    assert error.message.startswith(f"{field}:")


def test_parse_rejects_text_of_4001_chars() -> None:
    error = bad_envelope(frame({"type": "say", "room": "lobby", "text": "x" * 4001}))
    assert error.message.startswith("text:")


def test_parse_rejects_empty_text() -> None:
    error = bad_envelope(frame({"type": "say", "room": "lobby", "text": ""}))
    assert error.message.startswith("text:")


@pytest.mark.parametrize("char", ["\x00", "\x07", "\x0b", "\r", "\x1b", "\x7f", "\x85", "\x9f"])
def test_parse_rejects_control_chars_in_text(char: str) -> None:
    error = bad_envelope(frame({"type": "say", "room": "lobby", "text": f"a{char}b"}))
    assert error.message == "text: control characters are not allowed"


def test_parse_rejects_an_empty_password() -> None:
    error = bad_envelope(frame({"type": "hello", "username": "alice", "password": ""}))
    assert error.message.startswith("password:")


def test_parse_rejects_a_password_over_1024_chars() -> None:
    error = bad_envelope(frame({"type": "hello", "username": "alice", "password": "p" * 1025}))
    assert error.message.startswith("password:")


BAD_NAMES = [
    pytest.param("Alice", id="uppercase"),
    pytest.param("al\x00ice", id="nul"),
    pytest.param("al\tice", id="tab"),
    pytest.param("alice\n", id="trailing-newline"),
    pytest.param("al\u202eice", id="bidi-override"),
    pytest.param("a" * 33, id="33-chars"),
    pytest.param(".hidden", id="leading-dot"),
    pytest.param("-dash", id="leading-dash"),
    pytest.param("", id="empty"),
    pytest.param("al ice", id="space"),
    pytest.param("ålice", id="non-ascii"),
]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_parse_rejects_bad_usernames(name: str) -> None:
    error = bad_envelope(frame({"type": "hello", "username": name, "id": "h"}))
    assert error.message.startswith("username: must match")
    assert error.ref == "h"


@pytest.mark.parametrize("name", BAD_NAMES)
def test_parse_rejects_bad_room_names(name: str) -> None:
    error = bad_envelope(frame({"type": "say", "room": name, "text": "hi"}))
    assert error.message.startswith("room: must match")


@pytest.mark.parametrize(
    "ident",
    [
        pytest.param("x" * 65, id="65-chars"),
        pytest.param("", id="empty"),
        pytest.param("a b", id="space"),
        pytest.param("é", id="non-ascii"),
        pytest.param("a\x7f", id="del"),
    ],
)
def test_parse_rejects_bad_ids(ident: str) -> None:
    error = bad_envelope(frame({"type": "ping", "id": ident}))
    assert error.message == "id: must be 1-64 visible ASCII characters"
    assert error.ref is None  # an invalid id is never echoed back


def test_parse_salvages_the_ref_from_a_bad_envelope_with_a_valid_id() -> None:
    error = bad_envelope(frame({"type": "say", "room": "lobby", "text": "", "id": "msg-42"}))
    assert error.ref == "msg-42"
    error = bad_envelope(frame({"type": "nope", "id": "n1"}))
    assert error.ref == "n1"
    error = bad_envelope(frame({"id": "m1"}))
    assert error.ref == "m1"


def test_parse_error_becomes_an_error_envelope_with_the_ref() -> None:
    error = bad_envelope(frame({"type": "say", "room": "Lobby", "text": "x", "id": "r"}))
    assert error.to_envelope() == Error(code=ErrorCode.BAD_ENVELOPE, message=error.message, ref="r")


def test_parse_error_message_is_short_and_summarises_many_errors() -> None:
    envelope: dict[str, object] = {"type": "ping"}
    envelope.update({f"field{i}_" + "k" * 200: i for i in range(10)})
    error = bad_envelope(frame(envelope))
    assert len(error.message) <= 300
    assert error.message.count("unknown field") == 1  # only the first is spelled out fully
    short: dict[str, object] = {"type": "ping", "a": 1, "b": 2, "c": 3, "d": 4, "e": 5}
    assert bad_envelope(frame(short)).message.endswith("and 2 more")


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b'{"type":"ping","type":"bye"}', id="two-valid-types"),
        pytest.param(b'{"type":"bye","type":"bye"}', id="same-type-twice"),
        pytest.param(b'{"type":"say","room":"lobby","room":"other","text":"x"}', id="room"),
        pytest.param(b'{"type":"say","room":"lobby","text":"a","text":"b"}', id="text"),
        pytest.param(b'{"type":"hello","username":"eve","username":"alice"}', id="username-twice"),
        pytest.param(b'{"type":"say","room":"lobby","text":"hi","type":"bye"}', id="say-bye"),
        pytest.param(b'{"type":"ping","\\u0069d":"a","id":"b"}', id="escaped-key-id"),
        pytest.param(b'{"typ\\u0065":"bye","type":"ping"}', id="escaped-key-type"),
        # One copy compact, the other spaced: counting '":' alone sees one key.
        pytest.param(b'{"type":"ping","type" :"bye"}', id="spaced-second-type"),
        pytest.param(b'{"type":"say","room":"lobby","text":"hi","room"\t:"x"}', id="tab-room"),
        pytest.param(b'{"type":"say","room":"lobby","text":"hi","text"\n:"b"}', id="newline-text"),
    ],
)
def test_parse_rejects_duplicate_keys(data: bytes) -> None:
    bad_envelope(data)


COMPACT_CLIENT_FRAMES = [
    {"type": "hello", "username": "alice", "password": "pw", "id": "h1"},
    {"type": "say", "room": "lobby", "text": 'a "quoted": text', "id": "s1"},
    {"type": "say", "room": "lobby", "text": 'he said ":" then', "id": "s2"},
    {"type": "dm", "to": "bob", "text": "hi", "id": "d1"},
    {"type": "say", "room": "lobby", "text": "waves", "action": True, "id": "s3"},
    {"type": "topic", "room": "dev", "topic": 'new: "topic"', "id": "t1"},
    {"type": "topic", "room": "dev", "topic": "", "id": "t2"},
    {"type": "history", "with": "bob", "after": 3, "limit": 10, "id": "q1"},
    {"type": "kick", "username": "bob", "reason": "spam", "id": "k1"},
    {"type": "pong", "ref": "srv1"},
    {"type": "bye"},
]


@pytest.mark.parametrize("fields", COMPACT_CLIENT_FRAMES, ids=lambda fields: fields["type"])
def test_every_key_given_twice_in_a_compact_frame_is_a_duplicate(fields: dict[str, Any]) -> None:
    # Compact JSON is what clients send and what the counting check sees.
    def frame(pairs: list[tuple[str, Any]]) -> bytes:
        body = ",".join(f"{json.dumps(k)}:{json.dumps(v)}" for k, v in pairs)
        return ("{" + body + "}").encode()

    pairs = list(fields.items())
    parse_client_frame(frame(pairs))  # the frame itself is fine
    for index, (key, value) in enumerate(pairs):
        again = [*pairs[: index + 1], (key, value), *pairs[index + 1 :]]
        error = bad_envelope(frame(again))
        assert "duplicate key" in error.message, key


def test_parse_duplicate_key_error_names_the_problem_and_keeps_the_ref() -> None:
    error = bad_envelope(b'{"type":"ping","id":"a","type":"ping"}')
    assert "duplicate key" in error.message
    assert error.ref == "a"


# --- parse_client_frame: hostile input ---------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b'{"type":"ping","id":"\\ud800"}', id="lone-high-surrogate-id"),
        pytest.param(b'{"type":"say","room":"lobby","text":"\\udc00x"}', id="lone-low-surrogate"),
        pytest.param(
            b'{"type":"hello","username":"alice","password":"\\ud83d"}', id="surrogate-password"
        ),
        pytest.param(b'{"type":"ping","id":"ok","x":"\\ud800"}', id="surrogate-extra-field"),
        pytest.param(b'{"type":"ping","id":"\xed\xa0\x80"}', id="utf8-encoded-surrogate"),
        pytest.param(b'{"type":"ping"\x00}', id="nul-between-tokens"),
        pytest.param(b'{"type":"ping","id":"a\x00b"}', id="raw-nul-in-string"),
        pytest.param(b'{"type":"ping","id":"a\\u0000b"}', id="escaped-nul-in-id"),
        pytest.param(b'{"type":"hello","username":"a\\u0000"}', id="escaped-nul-in-username"),
        pytest.param(b'{"type":"say","room":"lobby","text":"\\u0000"}', id="escaped-nul-in-text"),
        pytest.param(b"[" * 100_000 + b"]" * 100_000, id="nested-arrays-100000"),
        pytest.param(b'{"a":' * 100_000 + b"1" + b"}" * 100_000, id="nested-objects-100000"),
        pytest.param(
            b'{"type":"say","room":"lobby","text":' + b"[" * 100_000 + b"]" * 100_000 + b"}",
            id="nested-value-100000",
        ),
        pytest.param(b"1" * 100_000, id="number-100000-digits"),
        pytest.param(b'{"type":"ping","id":' + b"9" * 100_000 + b"}", id="big-number-in-id"),
        pytest.param(b'{"type":"ping","n":' + b"9" * 100_000 + b"}", id="big-number-extra"),
        pytest.param(b'{"type":"ping","n":1e99999}', id="huge-exponent"),
        pytest.param(b'{"type":"ping","n":NaN}', id="nan"),
        pytest.param(b'{"type":"ping","n":-Infinity}', id="infinity"),
    ],
)
def test_parse_rejects_hostile_input_with_protocol_error_only(data: bytes) -> None:
    with pytest.raises(ProtocolError) as info:
        parse_client_frame(data)
    assert info.value.code in (ErrorCode.BAD_FRAME, ErrorCode.BAD_ENVELOPE)
    assert not info.value.fatal


def test_parse_accepts_an_escaped_surrogate_pair() -> None:
    say = parse_client_frame(b'{"type":"say","room":"lobby","text":"\\ud83d\\ude00"}')
    assert say == Say(room="lobby", text="\U0001f600")


# --- Hello's password ---------------------------------------------------------------


def test_hello_password_is_hidden_from_repr_and_str() -> None:
    hello = parse_client_frame(
        frame({"type": "hello", "username": "alice", "password": "hunter2-secret"})
    )
    assert "hunter2-secret" not in repr(hello)
    assert "hunter2-secret" not in str(hello)
    assert "**********" in repr(hello)


def test_hello_encode_includes_the_password() -> None:
    hello = Hello(username="alice", password=SecretStr("hunter2-secret"), id="h")
    assert json.loads(encode(hello)) == {
        "type": "hello",
        "username": "alice",
        "password": "hunter2-secret",
        "id": "h",
    }
    assert parse_client_frame(encode(hello).rstrip(b"\n")) == hello


# --- actions, topics, stored acks, presence ----------------------------------------------


def test_parse_say_and_dm_with_action() -> None:
    say = parse_client_frame(b'{"type":"say","room":"lobby","text":"waves","action":true}')
    assert say == Say(room="lobby", text="waves", action=True)
    dm = parse_client_frame(b'{"type":"dm","to":"bob","text":"nods","action":false,"id":"1"}')
    assert dm == Dm(to="bob", text="nods", action=False, id="1")
    # null is the same as leaving it out, as for every optional field
    assert parse_client_frame(b'{"type":"say","room":"lobby","text":"x","action":null}') == Say(
        room="lobby", text="x"
    )


def test_a_message_carries_action_only_when_true() -> None:
    plain = Message(id=1, room="lobby", sender="bob", text="hi", ts=TS)
    assert b"action" not in encode(plain)
    action = Message(id=2, room="lobby", sender="bob", text="waves", action=True, ts=TS)
    assert json.loads(encode(action))["action"] is True
    assert parse_server_frame(encode(action)) == action


def test_parse_topic_request_reads_without_topic_and_sets_with_it() -> None:
    assert parse_client_frame(b'{"type":"topic","room":"dev","id":"1"}') == TopicRequest(
        room="dev", id="1"
    )
    assert parse_client_frame(b'{"type":"topic","room":"dev","topic":""}') == TopicRequest(
        room="dev", topic=""
    )
    assert parse_client_frame(b'{"type":"topic","room":"dev","topic":"x"}') == TopicRequest(
        room="dev", topic="x"
    )


@pytest.mark.parametrize(
    "topic",
    ["a\nb", "tab\there", "\u001b[31m", "\u0085", "x" * (MAX_TOPIC_CHARS + 1)],
    ids=["newline", "tab", "escape", "c1", "too-long"],
)
def test_parse_topic_request_refuses_a_topic_that_is_not_one_short_line(topic: str) -> None:
    error = bad_envelope(frame({"type": "topic", "room": "dev", "topic": topic, "id": "t"}))
    assert error.message.startswith("topic: ")
    assert error.ref == "t"


def test_topic_of_exactly_the_limit_is_accepted() -> None:
    topic = "\u00e9" * MAX_TOPIC_CHARS
    envelope = parse_client_frame(frame({"type": "topic", "room": "dev", "topic": topic}))
    assert envelope == TopicRequest(room="dev", topic=topic)


def test_room_topic_round_trips_with_and_without_by() -> None:
    for envelope in [
        RoomTopic(room="dev", topic="Release week", by="alice", ref="t1"),
        RoomTopic(room="dev", topic="", by="server"),
        RoomTopic(room="dev", topic="Release week", ref="t2"),
    ]:
        assert parse_server_frame(encode(envelope)) == envelope
    assert json.loads(encode(RoomTopic(room="dev", topic="x", ref="r"))) == {
        "type": "topic",
        "room": "dev",
        "topic": "x",
        "ref": "r",
    }


def test_ack_says_stored_only_when_true() -> None:
    assert (
        encode(Ack(ref="d1", id=4, stored=True))
        == b'{"type":"ack","ref":"d1","id":4,"stored":true}\n'
    )
    assert encode(Ack(ref="d1", id=4)) == b'{"type":"ack","ref":"d1","id":4}\n'


def test_presence_has_a_room_for_joined_and_left_only() -> None:
    assert encode(Presence(username="bob", state="online")) == (
        b'{"type":"presence","username":"bob","state":"online"}\n'
    )
    joined = Presence(room="dev", username="bob", state="joined")
    assert parse_server_frame(encode(joined)) == joined
    for bad in [
        b'{"type":"presence","room":"dev","username":"bob","state":"online"}',
        b'{"type":"presence","room":"dev","username":"bob","state":"offline"}',
        b'{"type":"presence","username":"bob","state":"joined"}',
        b'{"type":"presence","username":"bob","state":"left"}',
    ]:
        with pytest.raises(ProtocolError) as info:
            parse_server_frame(bad)
        assert info.value.code is ErrorCode.BAD_ENVELOPE


def test_presence_lists_name_several_users_for_online_and_offline_only() -> None:
    listed = Presence(users=["bob", "carol"], state="offline")
    assert encode(listed) == b'{"type":"presence","users":["bob","carol"],"state":"offline"}\n'
    assert parse_server_frame(encode(listed)) == listed
    assert listed.names == ["bob", "carol"]
    assert Presence(username="bob", state="online").names == ["bob"]
    for bad in [
        b'{"type":"presence","users":[],"state":"online"}',
        b'{"type":"presence","users":["bob"],"username":"bob","state":"online"}',
        b'{"type":"presence","state":"online"}',
        b'{"type":"presence","room":"dev","users":["bob"],"state":"joined"}',
        b'{"type":"presence","users":["Bob!"],"state":"online"}',
    ]:
        with pytest.raises(ProtocolError) as info:
            parse_server_frame(bad)
        assert info.value.code is ErrorCode.BAD_ENVELOPE


def test_hello_features_are_optional_names_and_bounded() -> None:
    hello = parse_client_frame(b'{"type":"hello","username":"bob","features":["presence_lists"]}')
    assert isinstance(hello, Hello)
    assert hello.features == ["presence_lists"]
    assert parse_client_frame(b'{"type":"hello","username":"bob"}') == Hello(username="bob")
    many = ",".join(f'"f{n}"' for n in range(17))
    for bad in [
        b'{"type":"hello","username":"bob","features":"presence_lists"}',
        b'{"type":"hello","username":"bob","features":["Presence Lists"]}',
        b'{"type":"hello","username":"bob","features":[' + many.encode() + b"]}",
    ]:
        with pytest.raises(ProtocolError) as info:
            parse_client_frame(bad)
        assert info.value.code is ErrorCode.BAD_ENVELOPE


# --- encode ---------------------------------------------------------------------------

TS = "2026-11-24T07:00:00.123Z"

SERVER_ENVELOPES: list[Welcome | Message | Ack | Pong | Error] = [
    Welcome(username="alice", rooms=["lobby"], server="securechat test"),
    Welcome(username="alice", rooms=[], server="s", ref="h1"),
    Message(id=1, room="lobby", sender="bob", text="hi ☃ \U0001f600\n", ts=TS),
    Ack(id=7),
    Ack(ref="s1", id=8),
    Pong(),
    Pong(ref="p"),
    Error(code=ErrorCode.BAD_ENVELOPE, message="text: missing"),
    Error(code=ErrorCode.SERVER_SHUTDOWN, message="bye", ref="x"),
]


@pytest.mark.parametrize("envelope", SERVER_ENVELOPES, ids=repr)
def test_encode_round_trips_server_envelopes(
    envelope: Welcome | Message | Ack | Pong | Error,
) -> None:
    data = encode(envelope)
    assert data.endswith(b"\n")
    assert data.count(b"\n") == 1
    assert parse_server_frame(data.rstrip(b"\n")) == envelope


@pytest.mark.parametrize("code", list(ErrorCode))
def test_encode_round_trips_every_error_code(code: ErrorCode) -> None:
    envelope = Error(code=code, message=f"about {code}")
    assert json.loads(encode(envelope))["code"] == code.value
    assert parse_server_frame(encode(envelope)) == envelope


def test_encode_omits_none_fields() -> None:
    assert encode(Pong()) == b'{"type":"pong"}\n'
    assert encode(Ack(id=3)) == b'{"type":"ack","id":3}\n'
    assert encode(Hello(username="bob")) == b'{"type":"hello","username":"bob"}\n'
    assert encode(Error(code=ErrorCode.TIMEOUT, message="t")) == (
        b'{"type":"error","code":"timeout","message":"t"}\n'
    )


def test_encode_message_serialises_sender_as_from() -> None:
    message = Message(id=5, room="lobby", sender="carol", text="yo", ts=TS)
    decoded = json.loads(encode(message))
    assert decoded == {
        "type": "message",
        "id": 5,
        "room": "lobby",
        "from": "carol",
        "text": "yo",
        "ts": TS,
    }
    assert "sender" not in decoded


def test_encode_round_trips_client_envelopes() -> None:
    for envelope in [
        Hello(username="alice", password=SecretStr("pw"), id="1"),
        Say(room="lobby", text="hello\tworld", id="2"),
        Ping(),
        Bye(id="3"),
    ]:
        assert parse_client_frame(encode(envelope)) == envelope


def test_parse_server_frame_rejects_bad_input_with_protocol_error() -> None:
    with pytest.raises(ProtocolError) as info:
        parse_server_frame(b"not json")
    assert info.value.code is ErrorCode.BAD_FRAME
    with pytest.raises(ProtocolError) as info:
        parse_server_frame(b'{"type":"message","id":0,"room":"lobby","from":"a","text":"x"}')
    assert info.value.code is ErrorCode.BAD_ENVELOPE
    with pytest.raises(ProtocolError) as info:
        parse_server_frame(b'{"type":"hello","username":"alice"}')
    assert info.value.code is ErrorCode.BAD_ENVELOPE


# --- utc_timestamp and schemas ------------------------------------------------------------


def test_utc_timestamp_formats_milliseconds_and_z() -> None:
    moment = datetime(2026, 11, 24, 7, 0, 0, 123456, tzinfo=UTC)
    assert utc_timestamp(moment) == "2026-11-24T07:00:00.123Z"
    assert utc_timestamp(datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)) == "2026-01-02T03:04:05.000Z"
    assert utc_timestamp(datetime(2026, 1, 2, 3, 4, 5, 999999, tzinfo=UTC)).endswith(":05.999Z")


def test_utc_timestamp_converts_other_zones_to_utc() -> None:
    plus_one = timezone(timedelta(hours=1))
    assert utc_timestamp(datetime(2026, 11, 24, 8, 0, 0, 5000, tzinfo=plus_one)) == (
        "2026-11-24T07:00:00.005Z"
    )


def test_utc_timestamp_defaults_to_now() -> None:
    before = datetime.now(UTC).replace(microsecond=0)
    stamp = utc_timestamp()
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", stamp)
    parsed = datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    assert before <= parsed <= datetime.now(UTC)


def test_json_schemas_cover_both_directions() -> None:
    schemas = json_schemas()
    assert set(schemas) == {"client_to_server", "server_to_client"}
    client = schemas["client_to_server"]["discriminator"]
    server = schemas["server_to_client"]["discriminator"]
    assert client["propertyName"] == server["propertyName"] == "type"
    assert set(client["mapping"]) == {
        "hello", "say", "dm", "join", "leave", "who", "rooms", "history", "topic", "kick",
        "ping", "pong", "bye",
    }  # fmt: skip
    assert set(server["mapping"]) == {
        "welcome", "message", "ack", "joined", "left", "presence", "members", "room_list",
        "topic", "history_end", "kicked", "ping", "pong", "error",
    }  # fmt: skip
    message = schemas["server_to_client"]["$defs"]["Message"]["properties"]
    assert "from" in message
    assert "sender" not in message
    json.dumps(schemas)  # printable as JSON


# --- property tests ------------------------------------------------------------------------


@st.composite
def chunked(draw: st.DrawFn, data: bytes) -> list[bytes]:
    points = draw(st.lists(st.integers(min_value=0, max_value=len(data)), max_size=12))
    return split_at(data, points)


def json_values() -> st.SearchStrategy[object]:
    scalars = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        st.floats(allow_nan=False),
        st.text(max_size=20),
        st.sampled_from(["hello", "say", "ping", "bye", "lobby", "alice", "type", "id"]),
    )
    return st.recursive(
        scalars,
        lambda children: st.one_of(
            st.lists(children, max_size=4),
            st.dictionaries(
                st.sampled_from(["type", "id", "room", "text", "username", "password", "x"]),
                children,
                max_size=5,
            ),
        ),
        max_leaves=12,
    )


junk = st.one_of(
    st.binary(max_size=300),
    json_values().map(lambda value: json.dumps(value).encode()),
    st.lists(
        st.one_of(
            st.binary(max_size=20),
            json_values().map(lambda value: json.dumps(value).encode()),
            st.sampled_from([b"\n", b"\r\n", b"{", b"}", b'"', b"\\u", b"\\ud800", b"\x00"]),
        ),
        max_size=10,
    ).map(b"".join),
)


@PROPERTY_SETTINGS
@given(data=st.data(), stream=junk)
def test_property_arbitrary_bytes_only_ever_raise_protocol_error(
    data: st.DataObject, stream: bytes
) -> None:
    decoder = FrameDecoder(max_frame_bytes=128)
    envelope_errors: list[ProtocolError] = []
    stream_errors: list[ProtocolError] = []
    try:
        for chunk in data.draw(chunked(stream)):
            decoder.feed(chunk)
            for item in decoder:
                try:
                    parse_client_frame(item)
                except ProtocolError as error:
                    envelope_errors.append(error)
    except ProtocolError as error:
        stream_errors.append(error)
    # Any other exception fails the test by propagating.
    for envelope_error in envelope_errors:
        assert envelope_error.code in (ErrorCode.BAD_FRAME, ErrorCode.BAD_ENVELOPE)
        assert not envelope_error.fatal
    for stream_error in stream_errors:
        assert stream_error.code is ErrorCode.FRAME_TOO_LARGE
        assert stream_error.fatal


NAMES = st.from_regex(r"[a-z0-9_][a-z0-9_.-]{0,31}", fullmatch=True)
IDS = st.none() | st.from_regex(r"[\x21-\x7e]{1,64}", fullmatch=True)
TEXTS = st.text(
    alphabet=st.characters(
        codec="utf-8",
        exclude_characters=[chr(c) for c in [*range(0x00, 0x09), *range(0x0B, 0x20)]]
        + [chr(c) for c in range(0x7F, 0xA0)],
    ),
    min_size=1,
    max_size=40,
)
PASSWORDS = st.none() | st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=30).map(
    SecretStr
)

TOPICS = st.text(
    alphabet=st.characters(
        codec="utf-8", exclude_characters=[chr(c) for c in [*range(0x20), *range(0x7F, 0xA0)]]
    ),
    max_size=MAX_TOPIC_CHARS,
)

CLIENT_ENVELOPES: st.SearchStrategy[ClientEnvelope] = st.one_of(
    st.builds(Hello, username=NAMES, password=PASSWORDS, id=IDS),
    st.builds(Say, room=NAMES, text=TEXTS, action=st.none() | st.booleans(), id=IDS),
    st.builds(TopicRequest, room=NAMES, topic=st.none() | TOPICS, id=IDS),
    st.builds(Ping, id=IDS),
    st.builds(Bye, id=IDS),
)


@PROPERTY_SETTINGS
@given(data=st.data(), envelopes=st.lists(CLIENT_ENVELOPES, max_size=8))
def test_property_valid_envelopes_survive_arbitrary_chunking(
    data: st.DataObject, envelopes: Sequence[ClientEnvelope]
) -> None:
    stream = b"".join(encode(envelope) for envelope in envelopes)
    decoder = FrameDecoder()
    decoded = [
        parse_client_frame(item) for item in feed_chunks(decoder, data.draw(chunked(stream)))
    ]
    assert decoded == list(envelopes)
    assert decoder.next_frame() is None


ServerSample = Welcome | Message | Ack | Presence | RoomTopic | Pong | Error
SERVER_ENVELOPE_STRATEGY: st.SearchStrategy[ServerSample] = st.one_of(
    st.builds(
        Welcome, username=NAMES, rooms=st.lists(NAMES, max_size=3), server=st.text(), ref=IDS
    ),
    st.builds(
        Message,
        id=st.integers(min_value=1, max_value=2**53),
        room=NAMES,
        sender=NAMES,
        text=TEXTS,
        action=st.none() | st.just(True),
        ts=st.just(TS),
    ),
    st.builds(
        Ack,
        ref=IDS,
        id=st.integers(min_value=1, max_value=2**53),
        stored=st.none() | st.just(True),
    ),
    st.builds(Presence, username=NAMES, state=st.sampled_from(["online", "offline"])),
    st.builds(Presence, room=NAMES, username=NAMES, state=st.sampled_from(["joined", "left"])),
    st.builds(RoomTopic, room=NAMES, topic=TOPICS, by=st.none() | NAMES, ref=IDS),
    st.builds(Pong, ref=IDS),
    st.builds(Error, code=st.sampled_from(ErrorCode), message=st.text(), ref=IDS),
)


@PROPERTY_SETTINGS
@given(envelope=SERVER_ENVELOPE_STRATEGY)
def test_property_server_envelopes_round_trip(envelope: ServerSample) -> None:
    data = encode(envelope)
    assert data.count(b"\n") == 1
    assert parse_server_frame(data) == envelope


_PLAIN = st.characters(blacklist_characters='"\\', blacklist_categories=["Cs"], min_codepoint=32)


@PROPERTY_SETTINGS
@given(
    pairs=st.lists(
        st.tuples(
            st.text(alphabet=_PLAIN, max_size=6),
            st.one_of(st.integers(), st.text(alphabet=_PLAIN, max_size=8)),
        ),
        max_size=6,
    ),
    separators=st.lists(st.sampled_from([":", " : ", ":\t", "\n:"]), min_size=6, max_size=6),
)
# A key scan that starts a string at the quote ending "" saw the keys ":" and ",".
@example(pairs=[(":", ""), (":", 0)], separators=[":"] * 6)
def test_duplicate_key_fast_paths_agree_with_a_full_parse(
    pairs: list[tuple[str, int | str]], separators: list[str]
) -> None:
    # Compact frames take the counting path, frames with whitespace the
    # regex path (some pairs compact, some not, in one frame); both must
    # agree with what a full parse sees, whatever the keys and values hold. The caller
    # passes how many different keys the frame has (in the server: the
    # fields the validated envelope set).
    def dump(value: object) -> str:
        return json.dumps(value, ensure_ascii=False)

    pieces = zip(pairs, separators, strict=False)
    body = ",".join(f"{dump(k)}{sep}{dump(v)}" for (k, v), sep in pieces)
    frame = ("{" + body + "}").encode()
    assert b"\\" not in frame  # the fast paths are the ones under test
    keys = [key for key, _ in pairs]
    if len(set(keys)) == len(keys):
        _reject_duplicate_keys(frame, None, len(set(keys)))
    else:
        with pytest.raises(ProtocolError):
            _reject_duplicate_keys(frame, None, len(set(keys)))


@pytest.mark.parametrize(
    ("room", "to", "action"),
    [("lobby", None, False), (None, "bob", True), ("dev", None, True)],
)
def test_trusted_message_is_what_model_construct_builds(
    room: str | None, to: str | None, action: bool
) -> None:
    fast = protocol.trusted_message(
        7, room, to, "alice", "hi <b>", action, "2026-11-30T00:00:00.000Z"
    )
    slow = protocol.Message.model_construct(
        id=7,
        room=room,
        to=to,
        sender="alice",
        text="hi <b>",
        action=True if action else None,
        ts="2026-11-30T00:00:00.000Z",
    )
    assert protocol._MESSAGE_PLAIN  # the short cut is taken, not the fallback
    assert fast == slow
    assert fast.__dict__ == slow.__dict__
    assert fast.model_fields_set == slow.model_fields_set
    assert protocol.encode(fast) == protocol.encode(slow)
    # and it is a valid message, as the wire sees it
    assert protocol.parse_server_frame(protocol.encode(fast)) == slow
