"""The chat session: lines from a pipe or typed, what goes out, and what the user is told.

Piped and typed lines mean the same: a line after ``/join`` goes to the
joined room, messages arrive whole and in order at the server's pace. A
pipe is a script, so its first line that cannot be sent stops the client
with exit code 1 and an error naming the line. The client is a real
process where its output and exit code are the point, a
:class:`ChatSession` with a scripted console where the session's timing is.
"""

from __future__ import annotations

import subprocess

import pytest
import trio
from pydantic import SecretStr

from securechat import __version__
from securechat.cli import main
from securechat.client import Backoff, ChatConnection, ChatSession, ClientError, Connect
from securechat.protocol import MAX_TEXT_CHARS, Join, Joined, Message, Ping, Pong, Welcome

from .conftest import (
    PASSWORDS,
    WAIT,
    RunningServer,
    ScriptedConsole,
    StartServer,
    piped_client,
    receive_first,
    receive_type,
)


async def run_client(
    server: RunningServer, user: str, stdin: bytes, password: str | None = None
) -> subprocess.CompletedProcess[bytes]:
    """``securechat client`` as ``user`` with ``stdin`` piped in."""
    return await piped_client(
        server.host, server.port, server.pki.ca, user, stdin, password=password
    )


async def messages_until_quiet(connection: ChatConnection) -> list[Message]:
    """Every message ``connection`` received so far (a ping round trip marks the end)."""
    await connection.send(Ping(id="quiet"))
    received = []
    while not isinstance(envelope := await receive_first(connection, Message, Pong), Pong):
        received.append(envelope)
    return received


def error_lines(result: subprocess.CompletedProcess[bytes]) -> list[str]:
    lines = result.stderr.decode().splitlines()
    assert all(line.startswith("securechat: error: ") for line in lines), lines
    return [line.removeprefix("securechat: error: ") for line in lines]


# --- piped ----------------------------------------------------------------------------------


async def test_piped_line_after_join_goes_to_the_joined_room(server: RunningServer) -> None:
    alice = await server.login("alice")
    await alice.send(Join(room="ops2"))
    await receive_type(alice, Joined)
    result = await run_client(server, "bob", b"/join ops2\nline after join\n")
    assert result.returncode == 0, result.stderr
    assert "joined ops2" in result.stdout.decode()
    message = await receive_type(alice, Message)
    assert (message.room, message.text) == ("ops2", "line after join")


async def test_piped_line_too_long_stops_the_client_and_names_the_line(
    server: RunningServer,
) -> None:
    alice = await server.login("alice")
    too_long = "x" * (MAX_TEXT_CHARS + 1)
    result = await run_client(server, "bob", f"first\n{too_long}\nthird\n".encode())
    assert result.returncode == 1
    assert error_lines(result) == [
        f"input line 2 not sent: message too long ({MAX_TEXT_CHARS + 1} characters,"
        f" at most {MAX_TEXT_CHARS}); the lines after it were not sent"
    ]
    assert [message.text for message in await messages_until_quiet(alice)] == ["first"]


async def test_piped_line_the_server_refuses_stops_the_client_and_names_the_line(
    start_server: StartServer,
) -> None:
    server = await start_server(rooms={"ops": {"members": ["alice"]}})
    alice = await server.login("alice")
    result = await run_client(server, "bob", b"/join ops\nfor the operators only\n")
    assert result.returncode == 1
    (line,) = error_lines(result)
    assert line.startswith("input line 1 refused by the server: ")
    assert line.endswith("(forbidden); the lines after it were not sent")
    # Not sent to the lobby instead.
    assert await messages_until_quiet(alice) == []


async def test_piped_lines_beyond_the_rate_limit_arrive_whole_and_in_order(
    start_server: StartServer,
) -> None:
    # A burst of 3: most lines are refused as rate_limited at first, and sent again.
    server = await start_server(limits={"message_burst": 3, "messages_per_second": 50})
    alice = await server.login("alice")
    lines = [f"line {n}" for n in range(20)]
    result = await run_client(server, "bob", "".join(f"{line}\n" for line in lines).encode())
    assert result.returncode == 0, result.stderr
    assert result.stderr == b""
    assert [message.text for message in await messages_until_quiet(alice)] == lines


async def test_refused_login_is_not_announced_as_connected(server: RunningServer) -> None:
    result = await run_client(server, "bob", b"", password="Wrong-Password-123")
    assert result.returncode == 1
    assert b"[CONNECTED]" not in result.stdout
    (line,) = error_lines(result)
    assert line.startswith("login refused: ")


def test_dash_capital_v_prints_the_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["-V"]) == 0
    assert capsys.readouterr().out == f"securechat {__version__}\n"


# --- typed (a scripted console) -------------------------------------------------------------


async def logged_in_session(
    server: RunningServer,
    console: ScriptedConsole,
    *,
    reconnect: Connect | None = None,
    backoff: Backoff | None = None,
) -> ChatSession:
    connection = await server.open()
    welcome = await connection.login("bob", SecretStr(PASSWORDS["bob"]))
    return ChatSession(connection, welcome, console, reconnect=reconnect, backoff=backoff)


async def test_typed_lines_beyond_the_rate_limit_arrive_in_order_without_errors(
    start_server: StartServer,
) -> None:
    server = await start_server(limits={"message_burst": 3, "messages_per_second": 50})
    alice = await server.login("alice")
    console = ScriptedConsole()
    session = await logged_in_session(server, console)
    lines = [f"pasted {n}" for n in range(15)]
    for line in lines:
        console.type(line)
    console.type("/quit")
    with trio.fail_after(WAIT):
        assert await session.run() == 0
    assert [message.text for message in await messages_until_quiet(alice)] == lines
    assert not [line for line in console.shown if "error" in line], console.shown


async def test_typed_commands_are_echoed_with_their_prompt(server: RunningServer) -> None:
    console = ScriptedConsole()
    session = await logged_in_session(server, console)
    for line in ("/join general", "hello", "//not a command", "/quit"):
        console.type(line)
    with trio.fail_after(WAIT):
        assert await session.run() == 0
    echoed = [line for line in console.shown if "send>>>" in line]
    assert echoed == ["[lobby] send>>> /join general", "[general] send>>> /quit"]


async def test_a_line_typed_ahead_after_join_goes_to_the_joined_room(
    server: RunningServer,
) -> None:
    alice = await server.login("alice")
    await alice.send(Join(room="ops2"))
    await receive_type(alice, Joined)
    console = ScriptedConsole()
    session = await logged_in_session(server, console)
    # Both lines are there before the join is answered, as when typed ahead.
    console.type("/join ops2")
    console.type("line after join")
    console.type("/quit")
    with trio.fail_after(WAIT):
        assert await session.run() == 0
    message = await receive_type(alice, Message)
    assert (message.room, message.text) == ("ops2", "line after join")


async def test_each_reconnect_attempt_is_one_line(server: RunningServer) -> None:
    failures = 3
    attempts: list[int] = []

    async def reconnect() -> tuple[ChatConnection, Welcome]:
        attempts.append(len(attempts))
        if len(attempts) <= failures:
            raise ClientError("cannot connect to somewhere: connection refused")
        connection = await server.open()
        return connection, await connection.login("bob", SecretStr(PASSWORDS["bob"]))

    console = ScriptedConsole()
    session = await logged_in_session(
        server, console, reconnect=reconnect, backoff=Backoff(first=0.001, cap=0.002)
    )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(session.run)
        await trio.aclose_forcefully(session.connection.stream)  # the network goes away
        shown = await console.wait_for(lambda shown: "[RECONNECTED]" in str(shown))
        console.type("/quit")
    disconnected = [n for n, line in enumerate(shown) if line.startswith("[DISCONNECTED]")]
    between = shown[disconnected[0] + 1 :]
    between = between[: between.index("[RECONNECTED]")]
    assert len(between) == 1 + failures, between
    assert between[0].startswith("reconnecting in ")
    for line in between[1:]:
        assert line.startswith("cannot connect to somewhere: connection refused; trying again in ")
