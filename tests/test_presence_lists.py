"""Presence lists (``hello`` ``features: ["presence_lists"]``) on a real server over real TLS.

A client that asks for them gets the ``online``/``offline`` changes of a presence
delay in one ``presence`` per state; a client that does not gets one frame per
change, as before. The server's clock runs at a hundredth of real time, so a
presence delay (5 s here) cannot pass while a loaded machine makes the logins;
the test moves the clock on when the held changes are to go.
"""

from __future__ import annotations

import trio
import trio.testing
from pydantic import SecretStr

from securechat.client import ChatConnection
from securechat.protocol import (
    PRESENCE_LISTS,
    Error,
    ErrorCode,
    Hello,
    Kick,
    Kicked,
    Members,
    Message,
    Presence,
    Say,
    ServerEnvelope,
    Welcome,
    Who,
)

from .conftest import PASSWORDS, WAIT, RunningServer, StartServer, receive_closed, receive_type

HELD = 5.0  # presence_delay_ms = 5000: the most it can be


async def lister(server: RunningServer, username: str, *, cert: bool = False) -> ChatConnection:
    """A connection that asked for presence lists (with a password, or carol's certificate)."""
    connection = await server.open(username if cert else None)
    password = None if cert else SecretStr(PASSWORDS[username])
    await connection.login(username, password, features=[PRESENCE_LISTS])
    return connection


async def frames_until(connection: ChatConnection, kind: type[ServerEnvelope]) -> list[object]:
    """Everything received up to and including the next envelope of type ``kind``."""
    received: list[object] = []
    with trio.fail_after(WAIT):
        while not (received and isinstance(received[-1], kind)):
            envelope = await connection.receive()
            assert envelope is not None, f"closed while waiting for {kind.__name__}"
            received.append(envelope)
    return received


async def start(start_server: StartServer, mock_clock: trio.testing.MockClock) -> RunningServer:
    mock_clock.rate = 0.01
    # No flush tick: an older client's frames go out at once, so the test can wait on them.
    return await start_server(flush_interval_ms=0, presence_delay_ms=HELD * 1000)


async def test_a_storm_of_logins_reaches_a_list_taker_as_one_frame_before_its_who_answer(
    start_server: StartServer, mock_clock: trio.testing.MockClock
) -> None:
    server = await start(start_server, mock_clock)
    alice = await lister(server, "alice")
    dave = await server.login("dave")  # an older client, without features
    bob = await lister(server, "bob")
    await lister(server, "carol", cert=True)
    # The older client is told at once, one frame per change.
    assert await receive_type(dave, Presence) == Presence(username="bob", state="online")
    assert await receive_type(dave, Presence) == Presence(username="carol", state="online")

    # Held for the list takers; a who answer comes after what was held, never before.
    await alice.send(Who(room="lobby", id="w1"))
    assert await frames_until(alice, Members) == [
        Presence(users=["bob", "carol", "dave"], state="online"),
        Members(
            room="lobby",
            online=["alice", "bob", "carol", "dave"],
            members=["alice", "bob", "carol", "dave"],
            ref="w1",
        ),
    ]
    # bob hears of carol (and of alice and dave, online before it came: no harm), never itself.
    await bob.send(Who(room="lobby", id="w2"))
    listed = await frames_until(bob, Members)
    assert listed[0] == Presence(users=["alice", "carol", "dave"], state="online")
    assert len(listed) == 2


async def test_logouts_kicks_and_a_second_connection_go_out_after_the_delay_as_final_states(
    start_server: StartServer, mock_clock: trio.testing.MockClock
) -> None:
    server = await start(start_server, mock_clock)
    alice = await lister(server, "alice")  # an admin
    dave = await server.login("dave")
    bob = await lister(server, "bob")
    bob_again = await lister(server, "bob")
    carol = await lister(server, "carol", cert=True)
    for user in ("bob", "carol"):
        assert await receive_type(dave, Presence) == Presence(username=user, state="online")
    await alice.send(Who(room="lobby", id="w1"))  # flushes what is held so far
    await receive_type(alice, Members)

    await trio.aclose_forcefully(bob_again.stream)  # bob still has a connection: no change
    await alice.send(Kick(username="carol", id="k1"))
    assert await receive_type(alice, Kicked) == Kicked(username="carol", ref="k1")
    assert [e.code for e in await receive_closed(carol) if isinstance(e, Error)] == [
        ErrorCode.KICKED
    ]
    await trio.aclose_forcefully(bob.stream)  # bob's last connection
    # The older client hears at once; once it has, the server has handled both logouts.
    told = [await receive_type(dave, Presence) for _ in range(2)]
    assert sorted((each.username, each.state) for each in told) == [
        ("bob", "offline"),
        ("carol", "offline"),
    ]

    # carol comes back and goes again within the same delay: told by her final state.
    carol = await lister(server, "carol", cert=True)
    assert await receive_type(dave, Presence) == Presence(username="carol", state="online")
    await trio.aclose_forcefully(carol.stream)
    assert await receive_type(dave, Presence) == Presence(username="carol", state="offline")

    mock_clock.jump(HELD)
    with trio.fail_after(WAIT):
        assert await alice.receive() == Presence(users=["bob", "carol"], state="offline")
    await alice.send(Who(room="lobby", id="w2"))
    assert await frames_until(alice, Members) == [
        Members(
            room="lobby",
            online=["alice", "dave"],
            members=["alice", "bob", "carol", "dave"],
            ref="w2",
        )
    ]


async def test_a_users_online_comes_before_its_first_message(
    start_server: StartServer, mock_clock: trio.testing.MockClock
) -> None:
    server = await start(start_server, mock_clock)
    alice = await lister(server, "alice")
    bob = await lister(server, "bob")
    await bob.send(Say(room="lobby", text="hello", id="m1"))
    received = await frames_until(alice, Message)
    assert received[0] == Presence(users=["bob"], state="online")
    assert isinstance(received[1], Message)
    assert received[1].text == "hello"
    assert len(received) == 2


async def test_features_the_server_does_not_know_are_ignored(server: RunningServer) -> None:
    connection = await server.open()
    await connection.send(
        Hello(
            username="alice",
            password=SecretStr(PASSWORDS["alice"]),
            features=["from_a_newer_client", PRESENCE_LISTS],
            id="login",
        )
    )
    assert isinstance(await receive_type(connection, Welcome), Welcome)
