"""The client side of issue 10's protocol additions, against the real server.

``/me``, ``/topic``, the note that a direct message to someone offline is
stored for them, and presence shown once per event whatever the rooms two
users share. A :class:`ChatSession` with a scripted console is the client;
other users are plain connections.
"""

from __future__ import annotations

import trio
from pydantic import SecretStr

from securechat.client import ChatSession
from securechat.protocol import Join, Joined, Message, RoomTopic

from .conftest import PASSWORDS, WAIT, RunningServer, ScriptedConsole, receive_type


async def session_of(server: RunningServer, user: str, console: ScriptedConsole) -> ChatSession:
    connection = await server.open()
    welcome = await connection.login(user, SecretStr(PASSWORDS[user]))
    return ChatSession(connection, welcome, console)


async def run_lines(session: ChatSession, console: ScriptedConsole, *lines: str) -> list[str]:
    """Type ``lines`` then /quit; what the session showed (it must exit 0)."""
    for line in (*lines, "/quit"):
        console.type(line)
    with trio.fail_after(WAIT):
        assert await session.run() == 0
    return console.shown


async def test_me_sends_an_action_and_shows_it_as_one(server: RunningServer) -> None:
    alice = await server.login("alice")
    console = ScriptedConsole()
    shown = await run_lines(await session_of(server, "bob", console), console, "/me waves")
    message = await receive_type(alice, Message)
    assert (message.room, message.text, message.action) == ("lobby", "waves", True)
    assert any(line.endswith("[lobby] * bob waves") for line in shown), shown


async def test_topic_is_shown_set_once_and_refused_to_others(server: RunningServer) -> None:
    bob = await server.login("bob")
    console = ScriptedConsole()
    admin = await session_of(server, "alice", console)  # alice is an admin
    shown = await run_lines(admin, console, "/topic", "/topic Release week", "/topic")
    assert "[lobby] no topic" in shown
    assert shown.count("[lobby] * alice set the topic: Release week") == 1, shown
    assert "[lobby] topic: Release week" in shown
    change = await receive_type(bob, RoomTopic)
    assert (change.topic, change.by) == ("Release week", "alice")

    console = ScriptedConsole()
    user = await session_of(server, "bob", console)
    console.type("/topic Mine now")
    console.type("/quit")
    with trio.fail_after(WAIT):
        assert await user.run() == 0  # (a refused command is not a failed message)
    assert "error: only admins can set a topic (forbidden)" in console.shown


async def test_a_direct_message_to_someone_offline_is_said_to_be_stored(
    server: RunningServer,
) -> None:
    console = ScriptedConsole()
    shown = await run_lines(
        await session_of(server, "alice", console), console, "/msg bob see you tomorrow"
    )
    assert "bob is offline: the message is stored and delivered when they next log in" in shown
    bob = await server.login("bob")
    assert (await receive_type(bob, Message)).text == "see you tomorrow"


async def test_presence_is_shown_once_whatever_the_rooms_shared(server: RunningServer) -> None:
    console = ScriptedConsole()
    session = await session_of(server, "alice", console)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(session.run)
        console.type("/join one")
        console.type("/join two")
        await console.wait_for(lambda shown: any(line.startswith("joined two") for line in shown))
        bob = await server.login("bob")  # online: alice and bob share the lobby
        for room in ("one", "two"):
            await bob.send(Join(room=room))
            await receive_type(bob, Joined)
        await trio.aclose_forcefully(bob.stream)  # offline: they share three rooms now
        shown = await console.wait_for(lambda shown: "* bob offline" in shown)
        console.type("/quit")
    assert shown.count("* bob online") == 1, shown
    assert shown.count("* bob offline") == 1, shown
    assert "[one] * bob joined" in shown
    assert "[two] * bob joined" in shown
