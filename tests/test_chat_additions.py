"""Actions (/me), room topics, stored-DM acks and presence once per event, over real TLS."""

from __future__ import annotations

import trio
from pydantic import SecretStr

from securechat.client import ChatConnection
from securechat.protocol import (
    Ack,
    Dm,
    Error,
    ErrorCode,
    History,
    HistoryEnd,
    Join,
    Joined,
    Message,
    Ping,
    Pong,
    Presence,
    RoomList,
    Rooms,
    RoomTopic,
    Say,
    ServerEnvelope,
    TopicRequest,
)

from .conftest import PASSWORDS, WAIT, RunningServer, StartServer, receive_type


async def until_pong(connection: ChatConnection, marker: str) -> list[ServerEnvelope]:
    """Everything the server sends before the answer to a ping sent now.

    The pong is urgent, so it also flushes what was waiting (presence):
    whatever the server had queued for this connection comes before it.
    """
    await connection.send(Ping(id=marker))
    received: list[ServerEnvelope] = []
    with trio.fail_after(WAIT):
        while True:
            envelope = await connection.receive()
            assert envelope is not None, "connection closed"
            if isinstance(envelope, Pong) and envelope.ref == marker:
                return received
            received.append(envelope)


async def join(connection: ChatConnection, room: str) -> Joined:
    await connection.send(Join(room=room, id=f"join-{room}"))
    return await receive_type(connection, Joined)


# --- actions ---------------------------------------------------------------------------------


async def test_an_action_reaches_the_room_and_the_peer_and_history_keeps_it(
    server: RunningServer,
) -> None:
    alice = await server.login("alice", cert_user="alice")
    bob = await server.login("bob", cert_user="bob")
    await alice.send(Say(room="lobby", text="waves", action=True, id="a1"))
    await alice.send(Say(room="lobby", text="hello", id="a2"))
    await alice.send(Dm(to="bob", text="nods", action=True, id="a3"))
    live = [await receive_type(bob, Message) for _ in range(3)]
    assert [(m.text, m.action, m.room, m.to) for m in live] == [
        ("waves", True, "lobby", None),
        ("hello", None, "lobby", None),
        ("nods", True, None, "bob"),
    ]

    await bob.send(History(after=0, id="h"))
    replayed = [await receive_type(bob, Message) for _ in range(3)]
    assert replayed == live
    assert (await receive_type(bob, HistoryEnd)).ref == "h"


# --- direct messages to offline users ---------------------------------------------------------


async def test_the_ack_of_a_dm_to_an_offline_user_says_stored(server: RunningServer) -> None:
    alice = await server.login("alice", cert_user="alice")
    await alice.send(Dm(to="bob", text="when you are back", id="d1"))
    stored = await receive_type(alice, Ack)
    assert (stored.ref, stored.stored) == ("d1", True)

    bob = await server.login("bob", cert_user="bob")
    assert (await receive_type(bob, Message)).id == stored.id
    await alice.send(Dm(to="bob", text="now you are here", id="d2"))
    live = await receive_type(alice, Ack)
    assert (live.ref, live.stored) == ("d2", None)
    # A re-send is answered with the message's id; it no longer says where the message is.
    await alice.send(Dm(to="bob", text="when you are back", id="d1"))
    assert await receive_type(alice, Ack) == Ack(ref="d1", id=stored.id)


# --- presence ---------------------------------------------------------------------------------


async def test_online_and_offline_come_once_per_event_without_a_room(
    server: RunningServer,
) -> None:
    alice = await server.login("alice", cert_user="alice")
    for room in ("dev", "ops", "qa"):
        await join(alice, room)
    bob = await server.login("bob", cert_user="bob")
    for room in ("dev", "ops", "qa"):
        await join(bob, room)
    await until_pong(alice, "settled")
    await trio.aclose_forcefully(bob.stream)

    offline = await receive_type(alice, Presence)
    assert offline == Presence(username="bob", state="offline")
    bob = await server.login("bob", cert_user="bob")  # shares four rooms with alice
    online = await receive_type(alice, Presence)
    assert online == Presence(username="bob", state="online")
    others = await until_pong(alice, "after-online")
    assert [e for e in others if isinstance(e, Presence)] == []

    # joined and left still name their room
    await join(alice, "new")
    await join(bob, "new")
    joined = await receive_type(alice, Presence)
    assert joined == Presence(room="new", username="bob", state="joined")


# --- topics -----------------------------------------------------------------------------------


async def test_an_admin_sets_a_topic_the_room_sees_it_and_it_is_shown_everywhere(
    start_server: StartServer,
) -> None:
    server = await start_server(rooms={"general": {"topic": "Anything goes"}})
    alice = await server.login("alice", cert_user="alice")  # admin
    bob = await server.login("bob", cert_user="bob")
    carol = await server.login("carol", cert_user="carol")
    await join(alice, "dev")
    await join(bob, "dev")

    await alice.send(TopicRequest(room="dev", topic="Release week", id="t1"))
    assert await receive_type(alice, RoomTopic) == RoomTopic(
        room="dev", topic="Release week", by="alice", ref="t1"
    )
    assert await receive_type(bob, RoomTopic) == RoomTopic(
        room="dev", topic="Release week", by="alice"
    )
    # carol is not in dev: nothing came, but she can read it, and sees it on joining.
    assert [e for e in await until_pong(carol, "c") if isinstance(e, RoomTopic)] == []
    await carol.send(TopicRequest(room="dev", id="t2"))
    assert await receive_type(carol, RoomTopic) == RoomTopic(
        room="dev", topic="Release week", ref="t2"
    )
    await carol.send(Rooms(id="r"))
    listed = {room.name: room.topic for room in (await receive_type(carol, RoomList)).rooms}
    assert listed == {"dev": "Release week", "general": "Anything goes", "lobby": ""}
    assert (await join(carol, "dev")).topic == "Release week"


async def test_setting_a_topic_is_refused_with_the_reason(start_server: StartServer) -> None:
    server = await start_server(
        rooms={"general": {"topic": "Anything goes"}, "ops": {"members": ["alice"]}}
    )
    alice = await server.login("alice", cert_user="alice")  # admin
    bob = await server.login("bob", cert_user="bob")
    await join(bob, "dev")

    async def refused(connection: ChatConnection, request: TopicRequest) -> Error:
        await connection.send(request)
        error = await receive_type(connection, Error)
        assert error.ref == request.id
        return error

    error = await refused(bob, TopicRequest(room="dev", topic="mine", id="t1"))
    assert (error.code, error.message) == (ErrorCode.FORBIDDEN, "only admins can set a topic")
    error = await refused(alice, TopicRequest(room="general", topic="other", id="t2"))
    assert (error.code, error.message) == (
        ErrorCode.FORBIDDEN,
        "the topic of this room is set in the config file",
    )
    error = await refused(alice, TopicRequest(room="nowhere", topic="x", id="t3"))
    assert error.code == ErrorCode.UNKNOWN_ROOM
    error = await refused(bob, TopicRequest(room="ops", id="t4"))
    assert error.code == ErrorCode.FORBIDDEN  # private: not even readable
    error = await refused(bob, TopicRequest(room="nowhere", id="t5"))
    assert error.code == ErrorCode.UNKNOWN_ROOM
    # A topic of the file's room can be read, and the private room's by who may join it.
    await bob.send(TopicRequest(room="general", id="t6"))
    assert (await receive_type(bob, RoomTopic)).topic == "Anything goes"
    await alice.send(TopicRequest(room="ops", topic="Admins", id="t7"))
    assert (await receive_type(alice, RoomTopic)).topic == "Admins"
    bad = b'{"type":"topic","room":"dev","topic":"two\\nlines","id":"t8"}\n'
    await alice.stream.send_all(bad)
    error = await receive_type(alice, Error)
    assert (error.code, error.ref) == (ErrorCode.BAD_ENVELOPE, "t8")
    assert error.message.startswith("topic: ")


async def test_setting_a_topic_costs_a_message_token_and_reading_one_does_not(
    start_server: StartServer,
) -> None:
    server = await start_server(limits={"message_burst": 2, "messages_per_second": 0.01})
    alice = await server.login("alice", password=PASSWORDS["alice"])
    await join(alice, "dev")  # one message token
    await alice.send(TopicRequest(room="dev", topic="first", id="t1"))  # the second
    assert (await receive_type(alice, RoomTopic)).ref == "t1"
    await alice.send(TopicRequest(room="dev", topic="second", id="t2"))
    error = await receive_type(alice, Error)
    assert (error.code, error.ref) == (ErrorCode.RATE_LIMITED, "t2")
    assert error.retry_after is not None
    await alice.send(TopicRequest(room="dev", id="t3"))  # reading: the requests bucket
    assert await receive_type(alice, RoomTopic) == RoomTopic(room="dev", topic="first", ref="t3")


async def test_a_topic_survives_a_restart(start_server: StartServer) -> None:
    first = await start_server()
    alice = await first.login("alice", cert_user="alice")
    await join(alice, "dev")
    await alice.send(TopicRequest(room="dev", topic="Kept", id="t"))
    await receive_type(alice, RoomTopic)
    # The topic was stored before it was announced: a server started now on
    # the same database (while the first shuts down) has it.
    first.server.request_shutdown()
    second = await start_server()
    bob = await second.open("bob")
    await bob.login("bob", SecretStr(PASSWORDS["bob"]))
    await bob.send(TopicRequest(room="dev", id="t"))
    assert (await receive_type(bob, RoomTopic)).topic == "Kept"
