"""Several servers, one chat: nodes sharing a real, private Redis (tests/redis_server.py).

Each node is a real ChatServer on its own loopback port with real TLS, its
state in a RedisStore; clients are real ChatConnections. What crosses nodes
so far: messages (in id order, no gaps), history, and idempotent re-sends;
and Redis going away costs refused sends, not connections or messages.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio

from securechat.client import ChatConnection
from securechat.protocol import LOBBY, Ack, Error, ErrorCode, History, HistoryEnd, Message, Say
from securechat.server import ChatServer

from .conftest import WAIT, ConfigFactory, Endpoint, Pki, receive_type, redis_store
from .redis_server import RedisServer


@asynccontextmanager
async def nodes(
    count: int, redis: RedisServer, make_config: ConfigFactory, pki: Pki, **overrides: Any
) -> AsyncIterator[list[Endpoint]]:
    """``count`` servers on one Redis, each on its own port, with the same config
    (``make_config(**overrides)``); stopped at the end."""
    async with redis_store(redis) as first, redis_store(redis) as second:
        stores = [first, second][:count]
        servers = [ChatServer(make_config(**overrides), store=store) for store in stores]
        endpoints: list[Endpoint] = []
        async with trio.open_nursery() as nursery:
            for server in servers:
                host, port = (await nursery.start(server.serve))[0]
                endpoints.append(Endpoint(host, port, pki))
            try:
                yield endpoints
            finally:
                for endpoint in endpoints:
                    await endpoint.aclose()
                for server in servers:
                    server.request_shutdown()


async def say(connection: ChatConnection, text: str, client_id: str) -> Ack:
    await connection.send(Say(room=LOBBY, text=text, id=client_id))
    return await receive_type(connection, Ack)


async def messages(connection: ChatConnection, count: int) -> list[Message]:
    return [await receive_type(connection, Message) for _ in range(count)]


async def test_room_messages_cross_nodes_both_ways_in_one_id_order(
    redis_server: RedisServer, make_config: ConfigFactory, pki: Pki
) -> None:
    async with nodes(2, redis_server, make_config, pki) as (a, b):
        alice = await a.login("alice")
        bob = await b.login("bob")
        with trio.fail_after(WAIT):
            first = await say(alice, "hello from node a", "a1")
            (seen_by_bob,) = await messages(bob, 1)
            assert (seen_by_bob.id, seen_by_bob.sender, seen_by_bob.text) == (
                first.id,
                "alice",
                "hello from node a",
            )
            reply = await say(bob, "hello from node b", "b1")
            assert reply.id > first.id  # one id order across the nodes
            (answer,) = await messages(alice, 1)  # (her own came before her ack)
            assert (answer.id, answer.sender, answer.text) == (reply.id, "bob", "hello from node b")


async def test_a_burst_on_one_node_reaches_the_other_in_order_without_gaps(
    redis_server: RedisServer, make_config: ConfigFactory, pki: Pki
) -> None:
    limits = {"messages_per_second": 1000.0, "message_burst": 1000}
    async with nodes(2, redis_server, make_config, pki, limits=limits) as (a, b):
        alice = await a.login("alice")
        bob = await b.login("bob")
        with trio.fail_after(WAIT * 3):
            for number in range(200):  # pipelined: the acks are read afterwards
                await alice.send(Say(room=LOBBY, text=f"burst {number}", id=f"m{number}"))
            received = await messages(bob, 200)
        assert [message.text for message in received] == [f"burst {n}" for n in range(200)]
        ids = [message.id for message in received]
        assert ids == list(range(ids[0], ids[0] + 200))


async def test_a_resend_to_another_node_is_acked_with_the_same_id_and_stored_once(
    redis_server: RedisServer, make_config: ConfigFactory, pki: Pki
) -> None:
    async with nodes(2, redis_server, make_config, pki) as (a, b):
        bob = await b.login("bob")
        alice = await a.login("alice")
        with trio.fail_after(WAIT):
            original = await say(alice, "only once", "same-id")
            await messages(bob, 1)
            # alice lost the connection before she saw the ack, and comes back on node b
            await trio.aclose_forcefully(alice.stream)
            alice_again = await b.login("alice")
            again = await say(alice_again, "only once", "same-id")
            assert again.id == original.id
            await say(alice_again, "after", "a2")  # bob gets nothing before this one
            (marker,) = await messages(bob, 1)
            assert marker.text == "after"
            await bob.send(History(room=LOBBY, id="h"))
            texts: list[str] = []
            while not isinstance(envelope := await bob.receive(), HistoryEnd):
                if isinstance(envelope, Message):
                    texts.append(envelope.text)
        assert texts.count("only once") == 1


async def test_while_redis_is_down_sends_are_refused_and_after_it_returns_they_go_through(
    redis_server: RedisServer,
    make_config: ConfigFactory,
    pki: Pki,
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with nodes(2, redis_server, make_config, pki) as (a, b):
        alice = await a.login("alice")
        bob = await b.login("bob")
        with trio.fail_after(WAIT * 3):
            before = await say(alice, "before", "a1")
            await messages(bob, 1)
            await redis_server.kill()
            await alice.send(Say(room=LOBBY, text="while down", id="a2"))
            refused = await receive_type(alice, Error)
            assert (refused.code, refused.ref) == (ErrorCode.UNAVAILABLE, "a2")
            await redis_server.restart()
            # The connections stayed up; the same client id goes through now, once.
            after = await say(alice, "while down", "a2")
            assert after.id > before.id
            (seen,) = await messages(bob, 1)
            assert (seen.id, seen.text) == (after.id, "while down")
    # One line per change of state, however long it lasted: no log storm.
    lines = [record.getMessage() for record in caplog.records]
    assert sum("Redis unavailable" in line for line in lines) == 1  # node a's refused send
    assert sum("Redis available again" in line for line in lines) == 1
    assert sum("cannot read the message log" in line for line in lines) <= 2  # once per node


async def test_every_acknowledged_message_survives_a_sigkill_of_redis(
    redis_server: RedisServer, make_config: ConfigFactory, pki: Pki
) -> None:
    limits = {"messages_per_second": 1000.0, "message_burst": 1000}
    async with nodes(2, redis_server, make_config, pki, limits=limits) as (a, b):
        alice = await a.login("alice")
        with trio.fail_after(WAIT * 3):
            for number in range(100):
                await alice.send(Say(room=LOBBY, text=f"durable {number}", id=f"d{number}"))
            acked = {(await receive_type(alice, Ack)).id for _ in range(100)}
            await redis_server.kill()  # SIGKILL: no chance to save anything more
            await redis_server.restart()
            bob = await b.login("bob")
            await bob.send(History(room=LOBBY, limit=200, id="h"))
            stored: list[int] = []
            while not isinstance(envelope := await bob.receive(), HistoryEnd):
                if isinstance(envelope, Message) and envelope.text.startswith("durable "):
                    stored.append(envelope.id)
        assert sorted(stored) == sorted(acked)  # every ack kept, each once
