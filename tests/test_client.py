"""What the client prints of what a server sends: never a terminal escape, whoever sent it.

A server (or a user through it) controls every string the client shows. The
tests here put hostile strings on the wire, from a scripted TLS server where
the real one would never send them (its banner, a login refusal, invalid
frames) and from the real server where it relays them (message text, the
field names it echoes in errors), and check what reaches stdout, stderr or
the session's console.
"""

from __future__ import annotations

import itertools
import os
import subprocess
from collections.abc import Iterator, Sequence
from functools import partial
from typing import Any

import pytest
import trio
from pydantic import SecretStr

from securechat import tls
from securechat.client import ChatSession, Formatter, sanitize
from securechat.protocol import (
    MAX_SERVER_FRAME_BYTES,
    Error,
    ErrorCode,
    FrameDecoder,
    Joined,
    Kicked,
    Left,
    Members,
    Message,
    Presence,
    ProtocolError,
    RoomInfo,
    RoomList,
    Say,
    ServerEnvelope,
    Welcome,
    encode,
    parse_server_frame,
)

from .conftest import (
    PASSWORDS,
    WAIT,
    Pki,
    RunningServer,
    ScriptedConsole,
    piped_client,
    receive_type,
)

# Clears the screen, sets the window title, rings the bell, overrides the text
# direction, moves the cursor back, starts a C1 CSI, forges a line, and more.
HOSTILE = "\x1b[2J\x1b]0;owned\x07\u202eevil\u2066\r\x08\x9b31m\nfake line\u2028\x00\x7f\ufeff"
HOSTILE_FIELD = "\x1b[31mred\x9b"


def unsafe_characters(output: str) -> set[str]:
    """Characters in ``output`` that a terminal would act on rather than show."""
    return {char for char in output if char != "\n" and not char.isprintable()}


def assert_terminal_safe(output: str) -> None:
    assert not unsafe_characters(output), sorted(unsafe_characters(output))
    assert not [line for line in output.splitlines() if line.startswith("fake line")], output


# --- a scripted server: real TLS, chosen frames -----------------------------------------------


async def scripted_server(nursery: trio.Nursery, pki: Pki, scripts: Sequence[list[bytes]]) -> int:
    """Listen on 127.0.0.1 with the test PKI's server certificate; returns the port.

    Connection *i* reads the client's hello, gets the frames of ``scripts[i]``
    (the last script for any later connection), and is closed with close_notify.
    """
    context = tls.server_context(pki.cert("server"), pki.key("server"), pki.ca, "none")
    numbers = itertools.count()

    async def handle(tcp: trio.SocketStream) -> None:
        script = scripts[min(next(numbers), len(scripts) - 1)]
        stream = trio.SSLStream(tcp, context, server_side=True)
        try:
            with trio.fail_after(WAIT):
                await stream.do_handshake()
                decoder = FrameDecoder()
                while decoder.next_frame() is None:  # the hello
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    decoder.feed(data)
                for frame in script:
                    await stream.send_all(frame)
                await stream.aclose()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await trio.aclose_forcefully(stream)

    listeners = await nursery.start(partial(trio.serve_tcp, handle, 0, host="127.0.0.1"))
    port: int = listeners[0].socket.getsockname()[1]
    return port


@pytest.fixture
def silent_stdin() -> Iterator[int]:
    """A stdin that stays open and says nothing, so the client waits for the server."""
    read_end, write_end = os.pipe()
    yield read_end
    os.close(read_end)
    os.close(write_end)


async def run_client(port: int, pki: Pki, stdin: int) -> subprocess.CompletedProcess[bytes]:
    return await piped_client("127.0.0.1", port, pki.ca, "bob", stdin)


async def test_hostile_server_strings_reach_the_terminal_escaped(
    nursery: trio.Nursery, pki: Pki, silent_stdin: int
) -> None:
    first = [
        encode(Welcome(username="bob", rooms=["lobby"], server=HOSTILE)),
        encode(Joined(room="lobby", topic="topic \u202eevil", members=["bob"])),
        encode(
            Message(
                id=1,
                room="lobby",
                sender="alice",
                text="hi \u202egnp.exe\n[lobby] alice: fake",
                ts="2026-01-01T00:00:00.000Z",
            )
        ),
        encode(Error(code=ErrorCode.FORBIDDEN, message=HOSTILE)),
        b'{"type":"pong","\\u001b[31mred\\u009b":1}\n',  # an unknown field with a hostile name
    ]
    # The reconnect after the close is refused, with a hostile reason: the client gives up.
    refused = [encode(Error(code=ErrorCode.AUTH_FAILED, message=HOSTILE))]
    port = await scripted_server(nursery, pki, [first, refused])

    result = await run_client(port, pki, silent_stdin)

    assert result.returncode == 1, result.stderr
    stdout, stderr = result.stdout.decode(), result.stderr.decode()
    assert_terminal_safe(stdout)
    assert_terminal_safe(stderr)
    lines = stdout.splitlines()
    escaped = sanitize(HOSTILE)
    assert f"logged in as bob ({escaped}); rooms: lobby. Type /help for commands." in lines
    assert "joined lobby (topic \\u202eevil); members: bob" in lines
    assert any(line.endswith("[lobby] alice: hi \\u202egnp.exe") for line in lines), lines
    assert "    [lobby] alice: fake" in lines  # the message's second line, indented
    assert f"error: {escaped} (forbidden)" in lines
    assert "ignored an invalid frame from the server: \\u001b[31mred\\u009b: unknown field" in lines
    assert f"login refused: {escaped} (auth_failed)" in lines


async def test_hostile_login_refusal_is_one_escaped_error_line(
    nursery: trio.Nursery, pki: Pki, silent_stdin: int
) -> None:
    port = await scripted_server(
        nursery, pki, [[encode(Error(code=ErrorCode.AUTH_FAILED, message=HOSTILE))]]
    )
    result = await run_client(port, pki, silent_stdin)
    assert result.returncode == 1
    stderr = result.stderr.decode()
    assert_terminal_safe(stderr)
    assert stderr.splitlines() == [
        f"securechat: error: login refused: {sanitize(HOSTILE)} (auth_failed)"
    ]


async def test_a_frame_over_the_cap_ends_the_connection_instead_of_spinning(
    nursery: trio.Nursery, pki: Pki, silent_stdin: int
) -> None:
    # Nothing after an oversized frame can be read: the error is fatal, and the
    # client lets the connection go (it used to show the same error forever).
    oversized = b'{"type":"pong","ref":"' + b"x" * MAX_SERVER_FRAME_BYTES
    first = [encode(Welcome(username="bob", rooms=["lobby"], server="scripted")), oversized]
    refused = [encode(Error(code=ErrorCode.AUTH_FAILED, message="no more"))]
    port = await scripted_server(nursery, pki, [first, refused])

    result = await run_client(port, pki, silent_stdin)

    assert result.returncode == 1, result.stderr
    lines = result.stdout.decode().splitlines()
    assert (
        f"[DISCONNECTED] the server broke the protocol: frame longer than"
        f" {MAX_SERVER_FRAME_BYTES} bytes"
    ) in lines
    assert not [line for line in lines if "ignored an invalid frame" in line]
    assert "login refused: no more (auth_failed)" in lines


@pytest.mark.parametrize(
    "reply",
    [b'{"type":"welcome"}\n', b'{"type":"pong","ref":"' + b"x" * MAX_SERVER_FRAME_BYTES],
    ids=["invalid", "oversized"],
)
async def test_an_invalid_answer_to_hello_is_one_error_line(
    nursery: trio.Nursery, pki: Pki, silent_stdin: int, reply: bytes
) -> None:
    port = await scripted_server(nursery, pki, [[reply]])
    result = await run_client(port, pki, silent_stdin)
    assert result.returncode == 1
    [line] = result.stderr.decode().splitlines()
    assert line.startswith("securechat: error: the server broke the protocol during login: ")


# --- the real server relaying hostile strings -------------------------------------------------


async def test_session_escapes_what_the_real_server_relays(server: RunningServer) -> None:
    connection = await server.open()
    welcome = await connection.login("alice", SecretStr(PASSWORDS["alice"]))
    console = ScriptedConsole()
    session = ChatSession(connection, welcome, console)
    bob = await server.login("bob")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(session.run)
        # Message text may hold bidi overrides and newlines: the protocol allows both.
        await bob.send(Say(room="lobby", text="look \u202eexe.pdf\nalice: fake", id="b1"))
        # The server names unknown fields in its error: here the name carries escapes.
        await connection.stream.send_all(b'{"type":"ping","\\u001b]0;owned\\u0007":1}\n')
        await console.wait_for(lambda shown: any("unknown field" in line for line in shown))
        await console.wait_for(lambda shown: any("look" in line for line in shown))
        nursery.cancel_scope.cancel()
    shown = "\n".join(console.shown)
    assert_terminal_safe(shown)
    assert "bob: look \\u202eexe.pdf" in shown
    assert "\n    alice: fake" in shown
    assert "error: \\u001b]0;owned\\u0007: unknown field (bad_envelope)" in shown
    await receive_type(bob, Message)


# --- the formatter, field by field ----------------------------------------------------------


def hostile_envelopes() -> list[ServerEnvelope]:
    """One envelope of every kind the client shows, every string field hostile.

    Built without validation: names and codes cannot carry these characters
    on today's wire, but the formatter must not depend on that.
    """
    bad = "x\x1b[2J\u202e\n"
    untyped: Any = bad  # where the model's type is narrower than str
    return [
        Welcome.model_construct(username=bad, rooms=[bad], server=bad),
        Message.model_construct(
            id=1, room=bad, to=None, sender=bad, text=bad, ts="2026-01-01T00:00:00.000Z"
        ),
        Message.model_construct(
            id=2, room=None, to=bad, sender=bad, text=bad, ts="2026-01-01T00:00:00.000Z"
        ),
        Joined.model_construct(room=bad, topic=bad, members=[bad, bad]),
        Left.model_construct(room=bad),
        Presence.model_construct(room=bad, username=bad, state=untyped),
        Presence.model_construct(users=[bad, bad], state=untyped),
        Members.model_construct(room=bad, online=[bad], members=[bad]),
        RoomList.model_construct(rooms=[RoomInfo.model_construct(name=bad, topic=bad, members=3)]),
        Kicked.model_construct(username=bad),
        Error.model_construct(code=untyped, message=bad),
    ]


def test_formatter_shows_a_presence_list_on_one_line() -> None:
    formatter = Formatter(me="alice", colour=False)
    listed = Presence(users=["bob", "carol"], state="online")
    assert formatter.describe(listed) == formatter.notice("* bob, carol online")
    single = Presence(username="bob", state="offline")
    assert formatter.describe(single) == formatter.notice("* bob offline")


@pytest.mark.parametrize("colour", [False, True])
@pytest.mark.parametrize("envelope", hostile_envelopes(), ids=lambda e: e.type)
def test_formatter_escapes_every_field(envelope: ServerEnvelope, colour: bool) -> None:
    formatter = Formatter(me="alice", colour=colour)
    if isinstance(envelope, Welcome):
        line = formatter.welcome(envelope)
    elif isinstance(envelope, Message):
        line = formatter.message(envelope)
    else:
        described = formatter.describe(envelope)
        assert described is not None
        line = described
    # The formatter's own colours are the only escape sequences.
    for code in ("\x1b[0m", "\x1b[1m", "\x1b[2m", "\x1b[31m", "\x1b[36m", "\x1b[35m"):
        line = line.replace(code, "")
    assert_terminal_safe(line)
    assert "x\\u001b[2J\\u202e" in line
    if not isinstance(envelope, Message | RoomList):
        assert "\n" not in line  # one line, whatever the server put in its strings


def test_invalid_frame_notice_escapes_the_field_names() -> None:
    with pytest.raises(ProtocolError) as info:
        parse_server_frame(b'{"type":"pong","\\u001b[31mred\\u009b":1}')
    line = Formatter(me="alice", colour=False).invalid_frame(info.value)
    assert line == (
        "ignored an invalid frame from the server: \\u001b[31mred\\u009b: unknown field"
    )


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("plain text, ünïcödé and emoji \U0001f600", "plain text, ünïcödé and emoji \U0001f600"),
        ("ESC \x1b[31m", "ESC \\u001b[31m"),
        ("CSI \x9b31m", "CSI \\u009b31m"),
        ("OSC \x1b]8;;http://x\x07", "OSC \\u001b]8;;http://x\\u0007"),
        ("bidi \u202e \u2066 \u200f", "bidi \\u202e \\u2066 \\u200f"),
        ("zero width \u200b \ufeff", "zero width \\u200b \\ufeff"),
        ("line\u2028paragraph\u2029", "line\\u2028paragraph\\u2029"),
        ("cr\rbs\x08del\x7f", "cr\\u000dbs\\u0008del\\u007f"),
        ("tag \U000e0041", "tag \\U000e0041"),
        ("two\nlines", "two\\u000alines"),
        ("می\u200cخواهم \U0001f468\u200d\U0001f469", "می\u200cخواهم \U0001f468\u200d\U0001f469"),
    ],
)
def test_sanitize(text: str, shown: str) -> None:
    assert sanitize(text) == shown
    assert sanitize(shown) == shown  # applying it twice changes nothing


def test_sanitize_keeps_lines_of_message_text_indented() -> None:
    assert sanitize("one\ntwo\n\x1b[2J", lines=True) == "one\n    two\n    \\u001b[2J"
