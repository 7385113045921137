"""Rooms, direct messages, presence, history and durability, over real TLS."""

from __future__ import annotations

import signal
import sqlite3
from pathlib import Path

import pytest
import trio
from pydantic import SecretStr

from securechat.client import Backoff, ChatConnection, ChatSession, ClientError
from securechat.passwords import hash_password
from securechat.protocol import (
    Ack,
    Dm,
    Error,
    ErrorCode,
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
    RoomList,
    Rooms,
    Say,
    Welcome,
    Who,
)
from securechat.sqlite_store import SqliteStore

from .conftest import (
    PASSWORDS,
    WAIT,
    Pki,
    RunningServer,
    ScriptedConsole,
    StartServer,
    config_data,
    receive_closed,
    receive_first,
    receive_type,
    server_process,
    write_toml,
)


async def login_welcome(server: RunningServer, username: str) -> tuple[ChatConnection, Welcome]:
    connection = await server.open()
    welcome = await connection.login(username, SecretStr(PASSWORDS[username]))
    return connection, welcome


async def say_and_ack(connection: ChatConnection, room: str, text: str, client_id: str) -> int:
    await connection.send(Say(room=room, text=text, id=client_id))
    ack = await receive_type(connection, Ack)
    assert ack.ref == client_id
    return ack.id


# --- rooms ----------------------------------------------------------------------------------


async def test_join_and_leave_with_presence(server: RunningServer) -> None:
    alice = await server.login("alice")
    bob = await server.login("bob")
    await alice.send(Join(room="dev", id="j1"))
    joined = await receive_type(alice, Joined)
    assert (joined.room, joined.members, joined.ref, joined.topic) == ("dev", ["alice"], "j1", "")

    await bob.send(Join(room="dev"))
    assert (await receive_type(bob, Joined)).members == ["alice", "bob"]
    presence = await receive_type(alice, Presence)
    assert (presence.room, presence.username, presence.state) == ("dev", "bob", "joined")

    await say_and_ack(alice, "dev", "in dev", "s1")
    assert (await receive_type(bob, Message)).room == "dev"

    await bob.send(Leave(room="dev", id="l1"))
    assert await receive_type(bob, Left) == Left(room="dev", ref="l1")
    presence = await receive_type(alice, Presence)
    assert (presence.room, presence.username, presence.state) == ("dev", "bob", "left")
    await bob.send(Say(room="dev", text="still here?", id="s2"))
    error = await receive_type(bob, Error)
    assert (error.code, error.ref) == (ErrorCode.NOT_MEMBER, "s2")


async def test_configured_rooms_topics_and_private_rooms(start_server: StartServer) -> None:
    server = await start_server(
        rooms={
            "ops": {"topic": "operators only", "members": ["alice"]},
            "news": {"topic": "announcements"},
        }
    )
    alice = await server.login("alice")
    bob = await server.login("bob")
    await alice.send(Join(room="ops", id="j"))
    joined = await receive_type(alice, Joined)
    assert joined.topic == "operators only"

    await bob.send(Join(room="ops", id="j2"))
    error = await receive_type(bob, Error)
    assert (error.code, error.ref) == (ErrorCode.FORBIDDEN, "j2")
    await bob.send(Rooms(id="r"))
    listed = await receive_type(bob, RoomList)
    assert [room.name for room in listed.rooms] == ["lobby", "news"]  # ops is hidden from bob
    assert listed.rooms[1].topic == "announcements"


async def test_room_creation_can_be_disabled(start_server: StartServer) -> None:
    server = await start_server(allow_room_create=False)
    bob = await server.login("bob")
    await bob.send(Join(room="new-room", id="j"))
    error = await receive_type(bob, Error)
    assert (error.code, error.ref) == (ErrorCode.UNKNOWN_ROOM, "j")


async def test_memberships_persist_across_logins(server: RunningServer) -> None:
    bob, welcome = await login_welcome(server, "bob")
    assert welcome.rooms == ["lobby"]
    await bob.send(Join(room="dev"))
    await receive_type(bob, Joined)
    await bob.send(Leave(room="lobby"))
    await receive_type(bob, Left)
    await trio.aclose_forcefully(bob.stream)

    _, welcome = await login_welcome(server, "bob")
    assert welcome.rooms == ["dev", "lobby"]  # every user is back in the lobby at login


async def test_who_and_rooms(server: RunningServer) -> None:
    alice = await server.login("alice")
    await server.login("bob")
    await alice.send(Who(room="lobby", id="w"))
    members = await receive_type(alice, Members)
    assert (members.online, members.members, members.ref) == (
        ["alice", "bob"],
        ["alice", "bob"],
        "w",
    )
    await alice.send(Who(room="nowhere", id="w2"))
    assert (await receive_type(alice, Error)).code == ErrorCode.UNKNOWN_ROOM


# --- direct messages and presence ---------------------------------------------------------


async def test_direct_message_reaches_both_sides_only(server: RunningServer) -> None:
    alice = await server.login("alice")
    bob = await server.login("bob")
    dave = await server.login("dave")
    await alice.send(Dm(to="bob", text="just for you", id="d1"))
    at_bob = await receive_type(bob, Message)
    at_alice = await receive_type(alice, Message)
    ack = await receive_type(alice, Ack)
    assert at_bob == at_alice
    assert (at_bob.to, at_bob.room, at_bob.sender, ack.id) == ("bob", None, "alice", at_bob.id)
    # dave saw nothing of it: the next message he gets is a later room message
    await say_and_ack(alice, "lobby", "public", "s1")
    assert (await receive_type(dave, Message)).text == "public"

    await alice.send(Dm(to="nobody", text="hello?", id="d2"))
    error = await receive_type(alice, Error)
    assert (error.code, error.ref) == (ErrorCode.UNKNOWN_USER, "d2")


async def test_offline_direct_message_is_delivered_at_next_login_once(
    server: RunningServer,
) -> None:
    alice = await server.login("alice")
    await alice.send(Dm(to="bob", text="read this when you are back", id="d1"))
    stored_id = (await receive_type(alice, Ack)).id

    bob = await server.login("bob")
    delivered = await receive_type(bob, Message)
    assert (delivered.id, delivered.text) == (stored_id, "read this when you are back")
    await trio.aclose_forcefully(bob.stream)

    bob_again = await server.login("bob")
    await bob_again.send(Join(room="dev", id="marker"))
    # the first thing after the welcome is the reply to our join: no second delivery
    first = await receive_first(bob_again, Joined, Message)
    assert isinstance(first, Joined)


async def test_two_connections_of_one_user(server: RunningServer) -> None:
    alice = await server.login("alice")
    laptop = await server.login("bob")
    phone = await server.login("bob")
    await say_and_ack(alice, "lobby", "to both devices", "s1")
    assert (await receive_type(laptop, Message)).text == "to both devices"
    assert (await receive_type(phone, Message)).text == "to both devices"

    await alice.send(Dm(to="bob", text="dm to both", id="d1"))
    assert (await receive_type(alice, Ack)).ref == "d1"
    assert (await receive_type(laptop, Message)).to == "bob"
    assert (await receive_type(phone, Message)).to == "bob"

    # bob goes offline only when the last of his connections closes
    await trio.aclose_forcefully(laptop.stream)
    with trio.fail_after(WAIT):  # until the server has noticed (polled: no event to wait on)
        while len(server.server.hub.online.peers_of("bob")) != 1:  # noqa: ASYNC110
            await trio.sleep(0.001)
    await phone.send(Say(room="lobby", text="marker", id="s2"))
    presence_or_message = await receive_first(alice, Presence, Message)
    assert isinstance(presence_or_message, Message)  # no "offline" before it
    assert presence_or_message.text == "marker"
    await trio.aclose_forcefully(phone.stream)
    presence = await receive_type(alice, Presence)
    assert (presence.username, presence.state) == ("bob", "offline")


async def test_presence_online_when_a_user_logs_in(server: RunningServer) -> None:
    alice = await server.login("alice")
    await server.login("bob")
    presence = await receive_type(alice, Presence)
    assert (presence.room, presence.username, presence.state) == (None, "bob", "online")


# --- history and idempotency ----------------------------------------------------------------


async def test_history_replays_in_order_with_paging(server: RunningServer) -> None:
    alice = await server.login("alice")
    ids = [await say_and_ack(alice, "lobby", f"m{n}", f"s{n}") for n in range(5)]
    await alice.send(Dm(to="bob", text="private", id="d"))
    dm_id = (await receive_type(alice, Ack)).id

    bob = await server.login("bob")
    await receive_type(bob, Message)  # the stored DM, delivered at login
    await bob.send(History(room="lobby", after=ids[0], limit=2, id="h1"))
    page = [await receive_type(bob, Message) for _ in range(2)]
    end = await receive_type(bob, HistoryEnd)
    assert [m.id for m in page] == ids[1:3]
    assert (end.room, end.last, end.more, end.ref) == ("lobby", ids[2], True, "h1")

    await bob.send(History(room="lobby", after=end.last, limit=10, id="h2"))
    rest = [await receive_type(bob, Message) for _ in range(2)]
    end = await receive_type(bob, HistoryEnd)
    assert [m.text for m in rest] == ["m3", "m4"]
    assert (end.last, end.more) == (ids[4], False)

    await bob.send(History(room="lobby", limit=1, id="h3"))  # the latest one
    assert (await receive_type(bob, Message)).id == ids[4]

    await bob.send(History(peer="alice", id="h4"))
    assert (await receive_type(bob, Message)).id == dm_id
    assert (await receive_type(bob, HistoryEnd)).peer == "alice"

    await bob.send(History(room="secret", id="h5"))
    assert (await receive_type(bob, Error)).code == ErrorCode.NOT_MEMBER


async def test_resent_id_is_acknowledged_again_and_not_delivered_twice(
    server: RunningServer,
) -> None:
    alice = await server.login("alice")
    bob = await server.login("bob")
    await alice.send(Say(room="lobby", text="once", id="same"))
    await alice.send(Say(room="lobby", text="once", id="same"))
    first, second = await receive_type(alice, Ack), await receive_type(alice, Ack)
    assert first == second == Ack(ref="same", id=first.id)
    await say_and_ack(alice, "lobby", "next", "other")
    texts = [(await receive_type(bob, Message)).text for _ in range(2)]
    assert texts == ["once", "next"]


# --- moderation -------------------------------------------------------------------------------


async def test_admin_can_kick_others_cannot(server: RunningServer) -> None:
    alice = await server.login("alice")  # admin in the test config
    bob = await server.login("bob")
    await bob.send(Kick(username="alice", id="k0"))
    error = await receive_type(bob, Error)
    assert (error.code, error.ref) == (ErrorCode.FORBIDDEN, "k0")

    await alice.send(Kick(username="bob", reason="spam", id="k1"))
    assert await receive_type(alice, Kicked) == Kicked(username="bob", ref="k1")
    received = await receive_closed(bob)
    kicked = [e for e in received if isinstance(e, Error)]
    assert [(e.code, e.message) for e in kicked] == [(ErrorCode.KICKED, "kicked by alice: spam")]


# --- durability -------------------------------------------------------------------------------


async def test_acknowledged_messages_survive_sigkill(
    tmp_path: Path, pki: Pki, password_hashes: dict[str, str]
) -> None:
    data = config_data(pki, password_hashes)
    data["limits"] = {"messages_per_second": 1e6, "message_burst": 1000}  # a deliberate burst
    config = write_toml(tmp_path / "server.toml", data)
    acked: dict[str, int] = {}
    async with server_process(config, pki) as first:
        alice = await first.endpoint.login("alice")
        # a pipelined burst: everything sent before the first ack is read
        for n in range(300):
            await alice.send(Say(room="lobby", text=f"burst {n}", id=f"b{n}"))
        while len(acked) < 300:
            ack = await receive_type(alice, Ack)
            assert ack.ref is not None
            acked[ack.ref] = ack.id
        first.process.send_signal(signal.SIGKILL)
        assert await first.wait() == -signal.SIGKILL

    async with server_process(config, pki) as second:
        bob = await second.endpoint.login("bob")
        stored: list[Message] = []
        after = 0
        while True:
            await bob.send(History(room="lobby", after=after, limit=500))
            while isinstance(envelope := await receive_first(bob, Message, HistoryEnd), Message):
                stored.append(envelope)
            after = envelope.last
            if not envelope.more:
                break
        assert sorted(m.id for m in stored) == sorted(acked.values())  # each exactly once
        assert {m.text for m in stored} == {f"burst {n}" for n in range(300)}

        # ids keep increasing after the restart, and a re-send of an
        # acknowledged id is recognised across the restart
        await bob.send(Say(room="lobby", text="after restart", id="new"))
        assert (await receive_type(bob, Ack)).id > max(acked.values())
        alice = await second.endpoint.login("alice")
        await alice.send(Say(room="lobby", text="burst 7", id="b7"))
        assert (await receive_type(alice, Ack)).id == acked["b7"]


# --- the client's reconnect ------------------------------------------------------------------


async def test_client_reconnects_and_shows_missed_messages_once(server: RunningServer) -> None:
    allowed = trio.Event()

    async def reconnect() -> tuple[ChatConnection, Welcome]:
        await allowed.wait()
        return await login_welcome(server, "alice")

    connection, welcome = await login_welcome(server, "alice")
    console = ScriptedConsole()
    session = ChatSession(
        connection, welcome, console, reconnect=reconnect, backoff=Backoff(first=0.01, cap=0.02)
    )
    bob = await server.login("bob")
    result: list[int] = []

    async def run() -> None:
        result.append(await session.run())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run)
        await say_and_ack(bob, "lobby", "before the drop", "b1")
        await console.wait_for(lambda shown: any("before the drop" in line for line in shown))

        await trio.aclose_forcefully(connection.stream)  # the network goes away
        presence = await receive_type(bob, Presence)
        assert (presence.username, presence.state) == ("alice", "offline")
        await say_and_ack(bob, "lobby", "missed one", "b2")
        await say_and_ack(bob, "lobby", "missed two", "b3")
        console.type("typed while offline")  # sent after the reconnect, with its id
        allowed.set()

        await console.wait_for(lambda shown: any("typed while offline" in line for line in shown))
        await console.wait_for(lambda shown: any("missed two" in line for line in shown))
        console.type("/quit")
    assert result == [0]
    shown = console.shown
    for text in ("before the drop", "missed one", "missed two", "typed while offline"):
        assert sum(text in line for line in shown) == 1, shown
    assert (await receive_type(bob, Message)).text == "typed while offline"


async def test_client_gives_up_when_login_is_refused_on_reconnect(server: RunningServer) -> None:
    async def reconnect() -> tuple[ChatConnection, Welcome]:
        connection = await server.open()
        return connection, await connection.login("alice", SecretStr("wrong password!"))

    connection, welcome = await login_welcome(server, "alice")
    console = ScriptedConsole()
    session = ChatSession(
        connection, welcome, console, reconnect=reconnect, backoff=Backoff(first=0.01, cap=0.02)
    )
    await trio.aclose_forcefully(connection.stream)
    with trio.fail_after(WAIT):
        assert await session.run() == 1
    assert any("login refused" in line for line in console.shown)


# --- the server process: reload and operator console --------------------------------------


async def test_sighup_reload_updates_users_passwords_and_rooms(
    tmp_path: Path, pki: Pki, password_hashes: dict[str, str]
) -> None:
    data = config_data(pki, password_hashes)
    data["rooms"] = {"ops": {"members": ["alice", "bob"]}}
    config = write_toml(tmp_path / "server.toml", data)
    async with server_process(config, pki) as server:
        dave = await server.endpoint.login("dave")
        bob = await server.endpoint.login("bob")
        await bob.send(Join(room="ops"))
        await receive_type(bob, Joined)
        with_erin = config_data(pki, password_hashes)
        with_erin["rooms"] = {"ops": {"members": ["alice"]}}
        del with_erin["users"]["dave"]
        with_erin["users"]["erin"] = {"password_hash": hash_password("erin-password-1")}
        with_erin["users"]["bob"] = {"password_hash": hash_password("bob-new-password")}
        write_toml(config, with_erin)
        server.process.send_signal(signal.SIGHUP)
        await server.wait_for_log(r"config reloaded: users=\d+ added=erin removed=dave changed=bob")

        received = await receive_closed(dave)
        assert [(e.code, e.message) for e in received if isinstance(e, Error)] == [
            (ErrorCode.KICKED, "your account was removed")
        ]
        erin = await server.endpoint.open()
        await erin.login("erin", SecretStr("erin-password-1"))
        # bob is off the private room's list now, so out of the room; and his
        # password changed, so whoever logged in with the old one must log in again
        received = await receive_closed(bob)
        assert Left(room="ops") in received
        assert [(e.code, e.message) for e in received if isinstance(e, Error)] == [
            (ErrorCode.KICKED, "your password was changed; log in again")
        ]
        stale = await server.endpoint.open()
        with pytest.raises(ClientError, match="auth_failed"):
            await stale.login("bob", SecretStr(PASSWORDS["bob"]))
        fresh = await server.endpoint.open()
        await fresh.login("bob", SecretStr("bob-new-password"))

        config.write_text("[server\nthis is not toml")
        server.process.send_signal(signal.SIGHUP)
        await server.wait_for_log("config reload failed, keeping the current config")
        erin_again = await server.endpoint.open()
        await erin_again.login("erin", SecretStr("erin-password-1"))


async def test_operator_console(tmp_path: Path, pki: Pki, password_hashes: dict[str, str]) -> None:
    config = write_toml(tmp_path / "server.toml", config_data(pki, password_hashes))
    async with server_process(config, pki, "--console", stdin=True) as server:
        stdin = server.process.stdin
        assert stdin is not None
        bob = await server.endpoint.login("bob")
        await stdin.send_all(b"hello from the operator\n")
        message = await receive_type(bob, Message)
        assert (message.sender, message.room, message.text) == (
            "server",
            "lobby",
            "hello from the operator",
        )
        await stdin.send_all(b"/kick bob being rude\n")
        received = await receive_closed(bob)
        assert [(e.code, e.message) for e in received if isinstance(e, Error)] == [
            (ErrorCode.KICKED, "kicked by server: being rude")
        ]
        await stdin.send_all(b"/quit\n")
        assert await server.wait() == 0

        # the announcement was stored like any other message
    async with server_process(config, pki) as restarted:
        alice = await restarted.endpoint.login("alice")
        await alice.send(History(room="lobby"))
        assert (await receive_type(alice, Message)).text == "hello from the operator"


# --- regressions found in review ------------------------------------------------------------


async def test_client_ids_never_repeat_across_sessions(server: RunningServer) -> None:
    # Two runs of the client must not look like re-sends of each other.
    bob = await server.login("bob")
    for _ in range(2):
        connection, welcome = await login_welcome(server, "alice")
        console = ScriptedConsole()
        session = ChatSession(connection, welcome, console)
        console.type("same words")
        console.type(None)
        with trio.fail_after(WAIT):
            assert await session.run() == 0
        await connection.aclose()
    first, second = await receive_type(bob, Message), await receive_type(bob, Message)
    assert (first.text, second.text) == ("same words", "same words")
    assert second.id > first.id


async def test_many_stored_direct_messages_arrive_without_overflow(
    start_server: StartServer,
) -> None:
    server = await start_server(
        limits={"max_outbound_queue": 50, "messages_per_second": 1e6, "message_burst": 1000}
    )
    alice = await server.login("alice")
    for window in range(0, 300, 20):  # 20 at a time: alice's own queue is small too
        for n in range(window, window + 20):
            await alice.send(Dm(to="bob", text=f"stored {n}", id=f"d{n}"))
        for _ in range(20):
            await receive_type(alice, Ack)
    bob = await server.login("bob")  # 300 waiting, six times the queue
    texts = [(await receive_type(bob, Message)).text for _ in range(300)]
    assert texts == [f"stored {n}" for n in range(300)]
    await bob.send(Ping(id="still-connected"))
    assert (await receive_type(bob, Pong)).ref == "still-connected"


async def test_large_history_replay_is_paced_not_dropped(start_server: StartServer) -> None:
    server = await start_server(
        limits={"max_outbound_queue": 50, "messages_per_second": 1e6, "message_burst": 1000}
    )
    alice = await server.login("alice")
    for window in range(0, 450, 15):
        for n in range(window, window + 15):
            await alice.send(Say(room="lobby", text=f"old {n}", id=f"s{n}"))
        for _ in range(15):
            await receive_type(alice, Ack)
    bob = await server.login("bob")
    await bob.send(History(room="lobby", limit=400, id="h"))
    replay = [await receive_type(bob, Message) for _ in range(400)]
    end = await receive_type(bob, HistoryEnd)
    assert [m.text for m in replay] == [f"old {n}" for n in range(50, 450)]
    assert (end.more, end.last) == (True, replay[-1].id)  # 50 older ones exist
    await bob.send(History(room="lobby", after=replay[-1].id, id="h2"))
    end = await receive_type(bob, HistoryEnd)
    assert (end.more, end.last) == (False, replay[-1].id)  # exact: nothing after


async def test_login_back_into_lobby_restores_other_devices(server: RunningServer) -> None:
    phone = await server.login("bob")
    await phone.send(Leave(room="lobby"))
    await receive_type(phone, Left)
    await server.login("bob")  # the laptop: bob is in the lobby again
    rejoined = await receive_type(phone, Joined)
    assert rejoined.room == "lobby"
    alice = await server.login("alice")
    await say_and_ack(alice, "lobby", "both devices again", "s")
    assert (await receive_type(phone, Message)).text == "both devices again"


async def test_wire_names_only(server: RunningServer) -> None:
    bob = await server.login("bob")
    await bob.stream.send_all(b'{"type":"history","peer":"alice","id":"h"}\n')
    error = await receive_type(bob, Error)
    assert (error.code, error.ref) == (ErrorCode.BAD_ENVELOPE, "h")
    assert "peer" in error.message


async def test_history_read_failure_is_unavailable(server: RunningServer) -> None:
    bob = await server.login("bob")
    store = server.server.store
    assert isinstance(store, SqliteStore)
    healthy = list(store._idle_readers)
    # Inject databases that fail every read (they have no tables).
    store._idle_readers[:] = [sqlite3.connect(":memory:", check_same_thread=False) for _ in healthy]
    try:
        await bob.send(History(room="lobby", id="h"))
        error = await receive_type(bob, Error)
        assert (error.code, error.ref) == (ErrorCode.UNAVAILABLE, "h")
        await bob.send(Ping(id="alive"))
        assert (await receive_type(bob, Pong)).ref == "alive"
    finally:
        for db in store._idle_readers:
            db.close()
        store._idle_readers[:] = healthy


async def test_private_room_stays_private_when_dropped_from_config(
    tmp_path: Path, pki: Pki, password_hashes: dict[str, str]
) -> None:
    data = config_data(pki, password_hashes)
    data["rooms"] = {"ops": {"members": ["alice"]}}
    config = write_toml(tmp_path / "server.toml", data)
    async with server_process(config, pki) as first:
        alice = await first.endpoint.login("alice")
        await alice.send(Join(room="ops"))
        await receive_type(alice, Joined)
        await say_and_ack(alice, "ops", "operators only", "s")
    del data["rooms"]
    write_toml(config, data)
    async with server_process(config, pki) as second:
        bob = await second.endpoint.login("bob")
        await bob.send(Join(room="ops", id="j"))
        assert (await receive_type(bob, Error)).code == ErrorCode.FORBIDDEN


async def test_room_count_is_capped(start_server: StartServer) -> None:
    server = await start_server(max_rooms=3)  # lobby and two more
    bob = await server.login("bob")
    for name in ("one", "two"):
        await bob.send(Join(room=name))
        await receive_type(bob, Joined)
    await bob.send(Join(room="three", id="j"))
    error = await receive_type(bob, Error)
    assert (error.code, error.ref) == (ErrorCode.FORBIDDEN, "j")
