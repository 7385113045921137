"""Several servers, one chat: nodes sharing a real, private Redis (tests/redis_server.py).

Each node is a real ChatServer on its own loopback port with real TLS, its
state in a RedisStore; clients are real ChatConnections. The tests that need
only the nodes' addresses run twice (the ``cluster`` fixture): with the nodes
in this process, and as real ``securechat server`` processes with one config
file; the others look at a node's state, or stop it dead, from inside. What crosses nodes:
messages (in id order, no gaps), history, idempotent re-sends, rooms,
memberships and topics, presence (also of a node that dies), kicks; and
Redis going away costs refused sends, not connections or messages.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from coredis.tokens import PureToken
from pydantic import SecretStr

from securechat import redis_link
from securechat.client import ChatConnection
from securechat.config import ClusterSection
from securechat.limits import RateKind
from securechat.protocol import (
    LOBBY,
    Ack,
    Bye,
    Dm,
    Error,
    ErrorCode,
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
    Presence,
    RoomTopic,
    Say,
    TopicRequest,
    Who,
)
from securechat.server import ChatServer

from .conftest import (
    PASSWORDS,
    WAIT,
    ConfigFactory,
    Endpoint,
    Pki,
    RunningServer,
    config_data,
    receive_closed,
    receive_first,
    receive_type,
    redis_store,
    server_process,
    write_toml,
)
from .redis_server import RedisServer
from .redis_server import redis_server as private_redis_server


@asynccontextmanager
async def nodes(
    count: int,
    redis: RedisServer,
    make_config: ConfigFactory,
    pki: Pki,
    presence_ttl: float = 15.0,
    wait_replicas: int = 0,
    **overrides: Any,
) -> AsyncIterator[list[RunningServer]]:
    """``count`` servers on one Redis, each on its own port, with the same config
    (``make_config(**overrides)``); stopped at the end."""
    async with (
        redis_store(
            redis, node="a", presence_ttl=presence_ttl, wait_replicas=wait_replicas
        ) as first,
        redis_store(
            redis, node="b", presence_ttl=presence_ttl, wait_replicas=wait_replicas
        ) as second,
    ):
        stores = [first, second][:count]
        servers = [ChatServer(make_config(**overrides), store=store) for store in stores]
        endpoints: list[RunningServer] = []
        async with trio.open_nursery() as nursery:
            for server in servers:
                host, port = (await nursery.start(server.serve))[0]
                endpoints.append(RunningServer(host, port, pki, server=server))
            try:
                yield endpoints
            finally:
                for endpoint in endpoints:
                    await endpoint.aclose()
                for server in servers:
                    server.request_shutdown()


@asynccontextmanager
async def node_processes(
    count: int,
    redis: RedisServer,
    pki: Pki,
    password_hashes: dict[str, str],
    directory: Path,
    *,
    presence_ttl: float = 15.0,
    limits: dict[str, Any] | None = None,
    rooms: dict[str, Any] | None = None,
) -> AsyncIterator[list[Endpoint]]:
    """``count`` real ``securechat server`` processes on one Redis and one config file."""
    data = config_data(pki, password_hashes)
    data["cluster"] = {"redis_url": redis.url, "presence_ttl": presence_ttl}
    if limits:
        data["limits"] = limits
    if rooms:
        data["rooms"] = rooms
    config = write_toml(directory / "node.toml", data)
    async with AsyncExitStack() as stack:
        running = [
            await stack.enter_async_context(server_process(config, pki)) for _ in range(count)
        ]
        yield [process.endpoint for process in running]


OpenNodes = Callable[..., AbstractAsyncContextManager[Sequence[Endpoint]]]


@pytest.fixture(params=["in-process", "processes"])
def cluster(
    request: pytest.FixtureRequest,
    redis_server: RedisServer,
    make_config: ConfigFactory,
    pki: Pki,
    password_hashes: dict[str, str],
    tmp_path: Path,
) -> OpenNodes:
    """``async with cluster(**config) as (a, b)``: two nodes on one Redis, each test run
    twice: as servers in this process, and as real ``securechat server`` processes."""

    def open_nodes(
        count: int = 2, **options: Any
    ) -> AbstractAsyncContextManager[Sequence[Endpoint]]:
        if request.param == "processes":
            return node_processes(count, redis_server, pki, password_hashes, tmp_path, **options)
        return nodes(count, redis_server, make_config, pki, **options)

    return open_nodes


async def say(connection: ChatConnection, text: str, client_id: str) -> Ack:
    await connection.send(Say(room=LOBBY, text=text, id=client_id))
    return await receive_type(connection, Ack)


async def messages(connection: ChatConnection, count: int) -> list[Message]:
    return [await receive_type(connection, Message) for _ in range(count)]


async def test_room_messages_cross_nodes_both_ways_in_one_id_order(cluster: OpenNodes) -> None:
    async with cluster() as (a, b):
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
    cluster: OpenNodes,
) -> None:
    limits = {"messages_per_second": 1000.0, "message_burst": 1000}
    async with cluster(limits=limits) as (a, b):
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
    cluster: OpenNodes,
) -> None:
    async with cluster() as (a, b):
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
    # One line per node and change of state, however long it lasted: no log storm.
    # (Node b logs it too if a write of its own was caught: its login's.)
    lines = [record.getMessage() for record in caplog.records]
    assert 1 <= sum("Redis unavailable" in line for line in lines) <= 2
    assert 1 <= sum("Redis available again" in line for line in lines) <= 2
    assert sum("cannot read the message log" in line for line in lines) <= 2
    # each a short line: no command or script quoted
    assert all("\n" not in line and len(line) < 300 for line in lines if "Redis" in line)


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


async def presence(connection: ChatConnection, username: str, state: str) -> Presence:
    """The next presence of ``username`` in ``state`` (other frames are skipped)."""
    while True:
        seen = await receive_type(connection, Presence)
        if (seen.username, seen.state) == (username, state):
            return seen


async def test_rooms_memberships_and_topics_made_on_one_node_hold_on_the_other(
    cluster: OpenNodes,
) -> None:
    async with cluster() as (a, b):
        alice = await a.login("alice")  # an admin
        bob = await b.login("bob")
        with trio.fail_after(WAIT):
            await alice.send(Join(room="dev", id="j1"))
            assert (await receive_type(alice, Joined)).members == ["alice"]
            # node b learnt of the new room and of alice in it
            await bob.send(Join(room="dev", id="j2"))
            joined = await receive_type(bob, Joined)
            assert (joined.room, joined.members) == ("dev", ["alice", "bob"])
            seen = await presence(alice, "bob", "joined")
            assert seen.room == "dev"
            await alice.send(TopicRequest(room="dev", topic="ship it", id="t1"))
            topic = await receive_type(bob, RoomTopic)
            assert (topic.room, topic.topic, topic.by) == ("dev", "ship it", "alice")
            await bob.send(Who(room="dev", id="w1"))
            members = await receive_type(bob, Members)
            assert members.members == ["alice", "bob"]
            await alice.send(Leave(room="dev", id="l1"))
            await receive_type(alice, Left)
            assert (await presence(bob, "alice", "left")).room == "dev"
            await bob.send(Who(room="dev", id="w2"))
            assert (await receive_type(bob, Members)).members == ["bob"]


async def test_presence_crosses_nodes_and_counts_every_node_a_user_is_on(
    cluster: OpenNodes,
) -> None:
    async with cluster() as (a, b):
        alice = await a.login("alice")
        with trio.fail_after(WAIT):
            bob_on_b = await b.login("bob")
            await presence(alice, "bob", "online")
            await alice.send(Who(room=LOBBY, id="w1"))
            assert "bob" in (await receive_type(alice, Members)).online
            bob_on_a = await a.login("bob")  # a second device, on alice's node
            await bob_on_b.send(Bye())
            await receive_closed(bob_on_b)
            await bob_on_a.send(Bye())
            await receive_closed(bob_on_a)
            # one "offline", after both: not when his first device left
            await presence(alice, "bob", "offline")
            await alice.send(Who(room=LOBBY, id="w2"))
            assert "bob" not in (await receive_type(alice, Members)).online


async def test_a_direct_message_to_a_user_on_another_node_is_delivered_not_stored(
    cluster: OpenNodes,
) -> None:
    async with cluster() as (a, b):
        alice = await a.login("alice")
        bob = await b.login("bob")
        with trio.fail_after(WAIT):
            await presence(alice, "bob", "online")
            await alice.send(Dm(to="bob", text="psst", id="d1"))
            ack = await receive_type(alice, Ack)
            assert ack.stored is None  # bob is online, on node b
            (got,) = await messages(bob, 1)
            assert (got.id, got.text, got.to) == (ack.id, "psst", "bob")
            await bob.send(Bye())
            await receive_closed(bob)
            await presence(alice, "bob", "offline")
            await alice.send(Dm(to="bob", text="later", id="d2"))
            assert (await receive_type(alice, Ack)).stored is True
            bob_again = await b.login("bob")
            (waiting,) = await messages(bob_again, 1)
            assert waiting.text == "later"


async def test_a_kick_on_one_node_ends_the_users_connections_on_the_other(
    cluster: OpenNodes,
) -> None:
    async with cluster() as (a, b):
        alice = await a.login("alice")  # an admin
        bob = await b.login("bob")
        with trio.fail_after(WAIT):
            await presence(alice, "bob", "online")
            await alice.send(Kick(username="bob", reason="spam", id="k1"))
            assert (await receive_type(alice, Kicked)).username == "bob"
            error = await receive_type(bob, Error)
            assert (error.code, error.message) == (ErrorCode.KICKED, "kicked by alice: spam")
            await receive_closed(bob)


async def test_users_of_a_node_that_dies_go_offline_within_presence_ttl(
    redis_server: RedisServer,
    make_config: ConfigFactory,
    pki: Pki,
    caplog: pytest.LogCaptureFixture,
) -> None:
    ttl = 1.5
    async with (
        redis_store(redis_server, node="a", presence_ttl=ttl) as store_a,
        redis_store(redis_server, node="b", presence_ttl=ttl) as store_b,
        trio.open_nursery() as nursery,
    ):
        server_a = ChatServer(make_config(), store=store_a)
        server_b = ChatServer(make_config(), store=store_b)
        host, port = (await nursery.start(server_a.serve))[0]
        a = Endpoint(host, port, pki)
        dies = trio.CancelScope()

        async def run_b(*, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
            with dies:
                await server_b.serve(task_status=task_status)

        host, port = (await nursery.start(run_b))[0]
        b = Endpoint(host, port, pki)
        try:
            alice = await a.login("alice")
            bob = await b.login("bob")
            with trio.fail_after(WAIT * 2):
                await presence(alice, "bob", "online")
                # Node b stops dead: no goodbye to Redis, nothing more from it.
                dies.cancel()
                await presence(alice, "bob", "offline")
            lines = [record.getMessage() for record in caplog.records]
            assert "node b stopped answering: its users are offline" in lines
            await trio.aclose_forcefully(bob.stream)
        finally:
            await a.aclose()
            await b.aclose()
            server_a.request_shutdown()


async def wait_until(condition: Callable[[], bool]) -> None:
    """Poll node state that has no event to wait on, with a deadline."""
    with trio.fail_after(WAIT):
        while not condition():  # noqa: ASYNC110
            await trio.sleep(0.005)


async def test_a_users_rate_limit_is_one_budget_over_all_nodes(
    redis_server: RedisServer, make_config: ConfigFactory, pki: Pki
) -> None:
    limits = {"message_burst": 3, "messages_per_second": 0.05}
    async with nodes(2, redis_server, make_config, pki, limits=limits) as (a, b):
        alice_on_a = await a.login("alice")
        alice_on_b = await b.login("alice")
        with trio.fail_after(WAIT):
            for number in range(3):  # her whole burst, on node a
                await say(alice_on_a, f"spent {number}", f"a{number}")
            limiter = b.server.rates.limiter
            await wait_until(
                lambda: limiter.available("alice", RateKind.MESSAGES, trio.current_time()) < 1
            )
            await alice_on_b.send(Say(room=LOBBY, text="one more", id="b1"))
            refused = await receive_type(alice_on_b, Error)
        assert (refused.code, refused.ref) == (ErrorCode.RATE_LIMITED, "b1")


async def test_the_login_back_off_is_one_over_all_nodes(
    redis_server: RedisServer, make_config: ConfigFactory, pki: Pki
) -> None:
    limits = {"login_failures_allowed": 2}
    async with nodes(2, redis_server, make_config, pki, limits=limits) as (a, b):
        with trio.fail_after(WAIT):
            for number in range(2):  # the free failures, spent on node a
                guesser = await a.open()
                await guesser.send(Hello(username="bob", password=SecretStr(f"guess {number}")))
                assert (await receive_type(guesser, Error)).code is ErrorCode.AUTH_FAILED
            throttle = b.server.authenticator.throttle
            await wait_until(lambda: throttle.failures("user:bob", trio.current_time()) == 2)
            # bob is blocked on node b too: even the right password is refused
            bob = await b.open()
            await bob.send(Hello(username="bob", password=SecretStr(PASSWORDS["bob"])))
            refused = await receive_type(bob, Error)
        assert refused.code is ErrorCode.AUTH_FAILED


async def test_killed_redis_connections_cost_no_message_the_tail_resumes_from_its_cursor(
    redis_server: RedisServer, make_config: ConfigFactory, pki: Pki
) -> None:
    # No pub/sub anywhere: every node reads the log with XREAD BLOCK from its cursor.
    # Here Redis drops every node connection at once, the blocked tails' too (the
    # failure that ended coredis pub/sub iterators silently under trio).
    limits = {"messages_per_second": 1000.0, "message_burst": 1000}
    async with nodes(2, redis_server, make_config, pki, limits=limits) as (a, b):
        alice = await a.login("alice")
        bob = await b.login("bob")
        section = ClusterSection.model_validate({"redis_url": redis_server.url})
        async with redis_link.connect(section) as killer:
            with trio.fail_after(WAIT * 3):
                for number in range(50):
                    await alice.send(Say(room=LOBBY, text=f"m {number}", id=f"m{number}"))
                received = [await receive_type(bob, Message)]  # the tails are reading
                killed = await killer.client_kill(type_=PureToken.NORMAL, skipme=True)
                assert killed >= 4  # two nodes, a writer and a tail each
                for number in range(50, 100):
                    await alice.send(Say(room=LOBBY, text=f"m {number}", id=f"m{number}"))
                # A send caught in a killed write is refused (unavailable): the
                # client sends it again with the same id, as the real client does.
                acked: set[str] = set()
                while len(acked) < 100:
                    reply = await alice.receive()
                    if isinstance(reply, Ack) and reply.ref is not None:
                        acked.add(reply.ref)
                    elif isinstance(reply, Error):
                        assert (reply.code, reply.ref) == (ErrorCode.UNAVAILABLE, reply.ref)
                        assert reply.ref is not None
                        number = int(reply.ref[1:])
                        await alice.send(Say(room=LOBBY, text=f"m {number}", id=reply.ref))
                received += [await receive_type(bob, Message) for _ in range(99)]
        texts = [message.text for message in received]
        assert sorted(texts) == sorted(f"m {n}" for n in range(100))  # each once
        ids = [message.id for message in received]
        assert ids == list(range(ids[0], ids[0] + 100))  # in id order, no gap


async def test_replicated_durability_acks_only_what_a_replica_has_too(
    redis_server: RedisServer,
    make_config: ConfigFactory,
    pki: Pki,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    section = ClusterSection.model_validate(
        {"redis_url": redis_server.url, "durability": "replicated", "replicas": 1}
    )
    replica_of = {"replicaof": f"{redis_server.host} {redis_server.port}"}
    async with (
        private_redis_server(tmp_path / "replica", replica_of) as replica,
        redis_link.connect(section) as probe,
    ):
        with trio.fail_after(WAIT):  # the replica's link comes up, and it syncs
            while "'state': 'online'" not in str(await probe.info("replication")):  # noqa: ASYNC110
                await trio.sleep(0.01)
        await redis_link.check_durability(probe, section)  # what a node checks at start
        async with nodes(1, redis_server, make_config, pki, wait_replicas=1) as (a,):
            alice = await a.login("alice")
            with trio.fail_after(WAIT * 3):
                first = await say(alice, "replicated", "r1")
                await replica.kill()
                await alice.send(Say(room=LOBBY, text="primary only", id="r2"))
                refused = await receive_type(alice, Error)
                assert (refused.code, refused.ref) == (ErrorCode.UNAVAILABLE, "r2")
                await replica.restart()
                # The client sends it again with the same id until it is acked: once
                # the replica has it, with the id the primary gave it the first time.
                while True:
                    await alice.send(Say(room=LOBBY, text="primary only", id="r2"))
                    reply = await receive_first(alice, Ack, Error)
                    if isinstance(reply, Ack):
                        break
                    assert reply.code is ErrorCode.UNAVAILABLE
                assert reply.id == first.id + 1
    lines = [record.getMessage() for record in caplog.records]
    assert sum("replica(s) confirmed the write" in line for line in lines) == 1


async def test_a_reload_on_one_node_reaches_the_users_connections_on_the_other(
    redis_server: RedisServer, make_config: ConfigFactory, pki: Pki
) -> None:
    rooms = {"ops": {"members": ["alice", "bob"]}}
    async with nodes(2, redis_server, make_config, pki, rooms=rooms) as (a, b):
        bob = await b.login("bob")
        dave = await b.login("dave")
        with trio.fail_after(WAIT):
            await bob.send(Join(room="ops", id="j1"))
            assert (await receive_type(bob, Joined)).room == "ops"
            await dave.send(Join(room="ops", id="j2"))
            refused = await receive_type(dave, Error)  # private, on node b too
            assert refused.code is ErrorCode.FORBIDDEN
            # Node a reloads a file that takes bob off the room and removes dave.
            config = make_config(rooms={"ops": {"members": ["alice"]}})
            users = {name: account for name, account in config.users.items() if name != "dave"}
            a.server.reload(config.model_copy(update={"users": users}))
            left = await receive_type(bob, Left)
            assert left.room == "ops"
            gone = await receive_type(dave, Error)
            assert (gone.code, gone.message) == (ErrorCode.KICKED, "your account was removed")
            await receive_closed(dave)
