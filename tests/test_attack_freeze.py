"""One authenticated user cannot freeze the others, whatever requests they pipeline.

The review's attack: with a thousand rooms, bob sends one 16 KB write of
960 ``rooms`` requests and never reads; the server answered them all in one
go without letting anything else run (alice's ping took 5 s), and went on
working for bob long after it had given up on him as a slow consumer.

What these tests hold, without timing anything: the server handles at most
one frame of a connection per scheduling step (a trio instrument counts the
frames handled between the start and the end of every task step), every
request type costs rate-limit tokens, and a connection condemned as too slow
is not served again. The latency it buys is measured by
``python -m benchmarks freeze`` (docs/performance.md), not asserted here.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import trio

from securechat.client import ChatConnection, ClientError, LoginRefused
from securechat.limits import RateKind, RateLimiter, Verdict
from securechat.protocol import (
    Error,
    ErrorCode,
    History,
    Ping,
    Pong,
    RoomList,
    Rooms,
    Who,
    encode,
)
from securechat.server import ChatServer

from .conftest import RunningServer, StartServer, receive_first, receive_type
from .test_hardening import ping_round_trip, wait_until

ROOMS = {f"room{n:03}": {"topic": f"the topic of room {n} ".ljust(80, ".")} for n in range(999)}


class FramesPerStep(trio.abc.Instrument):
    """The most frames the server handled within one task step."""

    def __init__(self, server: ChatServer) -> None:
        self.server = server
        self.most = 0
        self._before = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self._before = self.server.stats.frames

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        self.most = max(self.most, self.server.stats.frames - self._before)


@contextmanager
def frames_per_step(server: ChatServer) -> Iterator[FramesPerStep]:
    instrument = FramesPerStep(server)
    trio.lowlevel.add_instrument(instrument)
    try:
        yield instrument
    finally:
        trio.lowlevel.remove_instrument(instrument)


def pipelined(count: int, *kinds: str) -> bytes:
    """``count`` request lines cycling through ``kinds``, as one write."""
    frames: dict[str, bytes] = {
        "rooms": encode(Rooms(id="r")),
        "who": encode(Who(room="lobby", id="w")),
        "history": encode(History(room="lobby", limit=500, id="h")),
        "ping": encode(Ping(id="p")),
        "invalid": b'{"type":"nonsense"}\n',
    }
    return b"".join(frames[kinds[n % len(kinds)]] for n in range(count))


async def attacker(server: RunningServer) -> ChatConnection:
    bob = await server.login("bob", cert_user="bob")
    # Bob never reads; a small window makes that show at once.
    bob.stream.transport_stream.socket.setsockopt(
        trio.socket.SOL_SOCKET, trio.socket.SO_RCVBUF, 4096
    )
    return bob


async def bob_is_gone(server: RunningServer) -> None:
    await wait_until(lambda: "bob" not in server.server.hub.online_users())


@pytest.mark.parametrize(
    "kinds",
    [("rooms",), ("who", "history", "ping", "invalid", "rooms")],
    ids=["rooms", "mixed"],
)
async def test_pipelined_requests_are_served_one_frame_per_step(
    start_server: StartServer, kinds: tuple[str, ...]
) -> None:
    server = await start_server(rooms=ROOMS)
    alice = await server.login("alice", cert_user="alice")
    bob = await attacker(server)
    with frames_per_step(server.server) as steps:
        await bob.stream.send_all(pipelined(960, *kinds))
        # Alice is answered while bob's requests are being dealt with.
        for n in range(5):
            await ping_round_trip(alice, f"during-{n}")
        await bob_is_gone(server)
    assert steps.most == 1
    # Bob was cut off (flooding, or too slow to read) long before his 960th request.
    assert server.server.stats.frames < 960


async def test_every_request_type_costs_rate_limit_tokens(start_server: StartServer) -> None:
    server = await start_server(rooms=ROOMS, limits={"request_burst": 30})
    bob = await server.login("bob", cert_user="bob")
    # rooms with a thousand rooms: 1 + 1000/100 = 11 tokens; two fit in 30, a third does not.
    for n in range(3):
        await bob.send(Rooms(id=f"rooms-{n}"))
    replies = [await receive_first(bob, RoomList, Error) for _ in range(3)]
    assert [type(reply) for reply in replies] == [RoomList, RoomList, Error]
    limited = replies[2]
    assert isinstance(limited, Error)
    assert (limited.code, limited.ref) == (ErrorCode.RATE_LIMITED, "rooms-2")
    assert limited.retry_after is not None
    assert limited.retry_after > 0
    # The same bucket pays for pings and history: those are refused now too.
    await bob.send(History(room="lobby", limit=500, id="hist"))
    assert (await receive_type(bob, Error)).ref == "hist"
    await bob.send(Ping(id="ping"))
    refused = await receive_first(bob, Pong, Error)
    assert isinstance(refused, Error)
    assert refused.code == ErrorCode.RATE_LIMITED


async def test_invalid_frames_cost_tokens_and_a_flood_of_them_disconnects(
    start_server: StartServer,
) -> None:
    server = await start_server(limits={"request_burst": 10})
    bob = await server.login("bob", cert_user="bob")
    await bob.stream.send_all(pipelined(200, "invalid"))
    received: list[Any] = []
    with trio.fail_after(10):
        while (envelope := await _receive_or_none(bob)) is not None:
            received.append(envelope)
    codes = [envelope.code for envelope in received if isinstance(envelope, Error)]
    assert codes[:10] == [ErrorCode.BAD_ENVELOPE] * 10
    assert ErrorCode.RATE_LIMITED in codes
    assert received[-1].message == "flooding: disconnected"
    assert len(codes) < 200


async def test_a_condemned_connection_is_not_served_again(start_server: StartServer) -> None:
    # Each room list is ~90 KB, more than bob's outbound cap: the first answer
    # condemns him, and none of his other requests is handled after that.
    server = await start_server(
        rooms=ROOMS,
        limits={"max_outbound_bytes": 65536, "request_burst": 100_000},
    )
    bob = await attacker(server)
    before = server.server.stats.frames
    await bob.stream.send_all(pipelined(500, "rooms"))
    await bob_is_gone(server)
    assert server.server.stats.frames - before == 1


async def _receive_or_none(connection: ChatConnection) -> Any:
    try:
        return await connection.receive()
    except trio.BrokenResourceError:
        return None


async def test_a_user_cut_off_for_flooding_cannot_come_back_until_the_debt_is_paid(
    start_server: StartServer,
) -> None:
    # Without this, a flooder reconnects at once and is cut again at its first
    # request, over and over: a login storm of successful logins.
    server = await start_server(limits={"request_burst": 10, "requests_per_second": 10})
    bob = await server.login("bob", cert_user="bob")
    await bob.stream.send_all(pipelined(200, "invalid"))
    with trio.fail_after(10):
        while await _receive_or_none(bob) is not None:
            pass
    again = await server.open("bob")
    with pytest.raises(ClientError, match="disconnected for flooding") as refused:
        await again.login("bob", None)
    assert not isinstance(refused.value, LoginRefused)  # the client may try again later
    # Alice is not affected by bob's cool-down.
    await server.login("alice", cert_user="alice")


def test_cooldown_lasts_until_the_debt_is_paid() -> None:
    rates = RateLimiter(message_rate=1, message_burst=1, request_rate=10, request_burst=10)
    verdict = Verdict.ACCEPT
    while verdict is not Verdict.DISCONNECT:
        verdict, _ = rates.take("bob", RateKind.REQUESTS, 1, now=0.0)
    assert rates.cooldown("alice", 0.0) == 0.0
    debt = rates.cooldown("bob", 0.0)
    assert debt == pytest.approx(3.1)  # 31 tokens below zero, at 10 a second
    assert rates.cooldown("bob", 3.0) == pytest.approx(0.1)
    assert rates.cooldown("bob", 3.2) == 0.0
    # A user who was only refused (not cut off) has no cool-down.
    rates.take("carol", RateKind.REQUESTS, 10, now=0.0)
    assert rates.take("carol", RateKind.REQUESTS, 10, now=0.0)[0] is Verdict.REJECT
    assert rates.cooldown("carol", 0.0) == 0.0
