"""A client's session (securechat.session) on the clock it runs by.

Every deadline the session keeps (hello, silence, the answer to a ping, the
acks owed before a goodbye, the rate limits' ``retry_after`` and the
flooding cool-down) is tested here on ``trio.testing.MockClock`` with
``autojump_threshold=0`` (pytest-trio's ``autojump_clock``): the clock
jumps to the next deadline whenever every task waits, so a minute of
silence takes no real time and every time below is exact. The session runs
as in the server, over the real line transport (:class:`LineTransport`) on
an in-memory stream, with a real :class:`Hub` on a :class:`MemoryStore`
and a real :class:`Authenticator`. Users log in with their certificate
name (as the TLS handshake would give it), so no password check runs in a
worker thread: a thread's real time is something this clock cannot jump.

The real-TLS tests of the same deadlines, in real time, are in
tests/test_hardening.py (login and handshake deadlines, ping and drop).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import pytest
import trio
import trio.testing

from securechat.auth import Authenticator
from securechat.config import Account, LimitsSection
from securechat.hub import Hub, load_state
from securechat.limits import RateLimiter
from securechat.lines import FrameReader, LineTransport
from securechat.memory_store import MemoryStore
from securechat.protocol import (
    DEFAULT_MAX_FRAME_BYTES,
    MAX_SERVER_FRAME_BYTES,
    Ack,
    Bye,
    ClientEnvelope,
    Error,
    ErrorCode,
    FrameDecoder,
    Hello,
    Ping,
    Pong,
    Say,
    ServerEnvelope,
    Welcome,
    encode,
    parse_server_frame,
)
from securechat.session import FLUSH_TIMEOUT, ServerStats, Services, Session, UserRates

ACCOUNTS = {"alice": Account(password_hash=None), "bob": Account(password_hash=None)}


@dataclass
class Client:
    """The client's end of one session's stream, and when the session ended."""

    stream: trio.abc.Stream
    session: Session
    frames: FrameReader = field(init=False)
    ended_at: float | None = None  # the server's clock when the session ended

    def __post_init__(self) -> None:
        self.frames = FrameReader(self.stream, FrameDecoder(MAX_SERVER_FRAME_BYTES))

    async def send(self, *envelopes: ClientEnvelope) -> None:
        """Send the envelopes in one write (pipelined)."""
        await self.stream.send_all(b"".join(encode(envelope) for envelope in envelopes))

    async def receive(self) -> ServerEnvelope | None:
        frame = await self.frames.next()
        return None if frame is None else parse_server_frame(frame)

    async def login(self, username: str) -> Welcome:
        await self.send(Hello(username=username, id="login"))
        welcome = await self.receive()
        assert isinstance(welcome, Welcome), welcome
        return welcome

    async def rest(self) -> list[tuple[float, ServerEnvelope]]:
        """Everything still to come, with the time each arrived, until the session ends."""
        received: list[tuple[float, ServerEnvelope]] = []
        while (envelope := await self.receive()) is not None:
            received.append((trio.current_time(), envelope))
        return received


@dataclass
class Server:
    """What the TLS server gives every session, on a MemoryStore; clients connect in memory."""

    services: Services
    store: MemoryStore
    nursery: trio.Nursery
    _numbers: itertools.count[int] = field(default_factory=itertools.count)

    async def connect(self, certificate_user: str | None = None) -> Client:
        server_end, client_end = trio.testing.memory_stream_pair()
        transport = LineTransport(
            server_end,
            peer=f"memory:{next(self._numbers)}",
            host="127.0.0.1",
            max_frame_bytes=DEFAULT_MAX_FRAME_BYTES,
            certificate_user=certificate_user,
        )
        client = Client(client_end, Session(self.services, transport))
        self.nursery.start_soon(self._serve, client, server_end)
        return client

    async def _serve(self, client: Client, server_end: trio.abc.Stream) -> None:
        try:
            await client.session.run()
        finally:
            client.ended_at = trio.current_time()
            await server_end.aclose()

    async def login(self, username: str) -> Client:
        client = await self.connect(certificate_user=username)
        await client.login(username)
        return client


@pytest.fixture
async def chat(nursery: trio.Nursery) -> Any:
    """``await chat(commit=True, **limits)``: sessions on a hub whose store commits by itself
    (``commit=False``: when the test calls ``store.commit_pending()``)."""

    async def start(*, commit: bool = True, **limits: Any) -> Server:
        store = MemoryStore()
        if commit:
            await nursery.start(store.run)
        settings = LimitsSection(**limits)
        services = Services(
            hub=Hub(store, await load_state(store), users=ACCOUNTS, rooms={}),
            authenticator=Authenticator(ACCOUNTS, "optional"),
            rates=UserRates(
                RateLimiter(
                    message_rate=settings.messages_per_second,
                    message_burst=settings.message_burst,
                    request_rate=settings.requests_per_second,
                    request_burst=settings.request_burst,
                )
            ),
            limits=settings,
            ticker=None,
            flusher=None,
            stats=ServerStats(),
            name="securechat/test",
        )
        return Server(services, store, nursery)

    return start


def timed(start: float, received: list[tuple[float, ServerEnvelope]]) -> list[tuple[float, Any]]:
    """(seconds after ``start``, what arrived): the type, or an error's code and message."""
    return [
        (when - start, (e.code, e.message) if isinstance(e, Error) else type(e).__name__)
        for when, e in received
    ]


# --- the login deadline -----------------------------------------------------------------


async def test_no_hello_before_the_login_deadline_is_answered_timeout_then_closed(
    chat: Any, autojump_clock: trio.testing.MockClock
) -> None:
    server = await chat(login_timeout=10)
    client = await server.connect(certificate_user="alice")
    start = trio.current_time()
    assert timed(start, await client.rest()) == [
        (10.0, (ErrorCode.TIMEOUT, "no hello before the deadline"))
    ]
    assert client.ended_at == start + 10.0


async def test_a_hello_just_before_the_login_deadline_logs_in_and_the_deadline_ends(
    chat: Any, autojump_clock: trio.testing.MockClock
) -> None:
    server = await chat(login_timeout=10, idle_timeout=60)
    client = await server.connect(certificate_user="alice")
    await trio.sleep(9.99)
    await client.login("alice")
    await trio.sleep(20)  # past the login deadline: it no longer applies
    await client.send(Ping(id="still"))
    assert await client.receive() == Pong(ref="still")
    assert client.ended_at is None


# --- silence, pings and the answer to them --------------------------------------------------


async def test_a_silent_client_is_pinged_after_idle_timeout_and_dropped_after_ping_timeout(
    chat: Any, autojump_clock: trio.testing.MockClock
) -> None:
    server = await chat(idle_timeout=60, ping_timeout=30)
    client = await server.login("alice")
    start = trio.current_time()
    assert timed(start, await client.rest()) == [
        (60.0, "Ping"),
        (90.0, (ErrorCode.TIMEOUT, "no answer to ping")),
    ]
    assert client.ended_at == start + 90.0


async def test_a_client_that_answers_pings_stays(
    chat: Any, autojump_clock: trio.testing.MockClock
) -> None:
    server = await chat(idle_timeout=60, ping_timeout=30)
    client = await server.login("alice")
    answered = trio.current_time()
    for number in range(1, 4):
        ping = await client.receive()
        assert ping == Ping(id=f"srv{number}")
        # Each ping comes a full idle_timeout after the client's last frame.
        assert trio.current_time() == answered + 60
        await trio.sleep(29.9)  # slow, but within ping_timeout
        await client.send(Pong(ref=ping.id))
        answered = trio.current_time()
    await client.send(Ping(id="alive"))
    assert await client.receive() == Pong(ref="alive")
    assert client.ended_at is None


async def test_any_traffic_keeps_the_server_from_pinging(
    chat: Any, autojump_clock: trio.testing.MockClock
) -> None:
    server = await chat(idle_timeout=60, ping_timeout=30)
    client = await server.login("alice")
    for number in range(5):
        await trio.sleep(59)
        await client.send(Ping(id=f"c{number}"))
        assert await client.receive() == Pong(ref=f"c{number}")  # and no server ping before it
    last = trio.current_time()
    assert timed(last, await client.rest()) == [
        (60.0, "Ping"),
        (90.0, (ErrorCode.TIMEOUT, "no answer to ping")),
    ]


# --- the goodbye and the acks owed ---------------------------------------------------------


async def test_a_goodbye_waits_for_the_acks_owed(
    chat: Any, autojump_clock: trio.testing.MockClock
) -> None:
    server = await chat(commit=False)
    client = await server.login("alice")
    await client.send(Say(room="lobby", text="kept", id="m1"), Bye())
    await trio.sleep(2)  # the commit takes its time; the session waits for it
    assert client.ended_at is None
    server.store.commit_pending()
    committed = trio.current_time()
    received = await client.rest()
    assert [(when, e.ref) for when, e in received if isinstance(e, Ack)] == [(committed, "m1")]
    assert client.ended_at == committed  # and then at once


async def test_a_goodbye_waits_at_most_flush_timeout_for_the_acks_owed(
    chat: Any, autojump_clock: trio.testing.MockClock
) -> None:
    server = await chat(commit=False)  # and the store never commits
    client = await server.login("alice")
    await client.send(Say(room="lobby", text="never committed", id="m1"), Bye())
    start = trio.current_time()
    received = await client.rest()
    assert not [envelope for _, envelope in received if isinstance(envelope, Ack)]
    assert client.ended_at == start + FLUSH_TIMEOUT


# --- rate limits: retry_after and the flooding cool-down -------------------------------------


@pytest.mark.parametrize("rate", [3.0, 6.0, 7.0, 20.0])
async def test_a_message_sent_retry_after_seconds_later_is_accepted(
    chat: Any, autojump_clock: trio.testing.MockClock, rate: float
) -> None:
    server = await chat(messages_per_second=rate, message_burst=1)
    client = await server.login("alice")
    await client.send(
        Say(room="lobby", text="one", id="m1"), Say(room="lobby", text="two", id="m2")
    )
    refused = await receive_error(client)
    assert (refused.code, refused.ref) == (ErrorCode.RATE_LIMITED, "m2")
    assert refused.retry_after is not None
    # Two tokens short (the refused message cost one too), at `rate` a second.
    assert refused.retry_after == pytest.approx(2 / rate, abs=0.002)
    await trio.sleep(refused.retry_after)
    await client.send(Say(room="lobby", text="three", id="m3"))
    assert await receive_reply(client, "m3") == Ack


@pytest.mark.parametrize("rate", [1.0, 3.0])
async def test_a_flooder_is_cut_off_and_may_log_in_again_once_the_cool_down_is_over(
    chat: Any, autojump_clock: trio.testing.MockClock, rate: float
) -> None:
    server = await chat(messages_per_second=rate, message_burst=2)
    flooder = await server.login("alice")
    await flooder.send(*[Say(room="lobby", text=f"flood {n}", id=f"f{n}") for n in range(20)])
    received = [envelope for _, envelope in await flooder.rest()]
    assert [e.ref for e in received if isinstance(e, Ack)] == ["f0", "f1"]
    refusals = [e for e in received if isinstance(e, Error)]
    assert [e.ref for e in refusals] == [f"f{n}" for n in range(2, 9)]
    assert refusals[-1].message == "flooding: disconnected"
    cut_at = trio.current_time()

    again = await server.connect(certificate_user="alice")
    await again.send(Hello(username="alice", id="back"))
    refused = await receive_error(again)
    assert (refused.code, refused.ref) == (ErrorCode.RATE_LIMITED, "back")
    # 9 messages against 2 tokens: 7 in debt, paid back at `rate` a second.
    assert refused.message == f"disconnected for flooding; log in again in {7 / rate:.0f} s"
    assert refused.retry_after is not None
    assert refused.retry_after == pytest.approx(7 / rate, abs=0.002)
    bob = await server.login("bob")  # nobody else is affected
    await bob.send(Say(room="lobby", text="hello", id="b1"))
    assert await receive_reply(bob, "b1") == Ack

    await trio.sleep_until(cut_at + refused.retry_after)
    back = await server.login("alice")
    await back.send(Ping(id="p"))
    assert await back.receive() == Pong(ref="p")


async def test_a_login_during_the_cool_down_is_refused(
    chat: Any, autojump_clock: trio.testing.MockClock
) -> None:
    server = await chat(messages_per_second=1, message_burst=2)
    flooder = await server.login("alice")
    await flooder.send(*[Say(room="lobby", text=f"flood {n}", id=f"f{n}") for n in range(20)])
    await flooder.rest()
    await trio.sleep(6.5)  # half a second of debt left
    again = await server.connect(certificate_user="alice")
    await again.send(Hello(username="alice", id="back"))
    refused = await receive_error(again)
    assert refused.code == ErrorCode.RATE_LIMITED
    assert refused.retry_after == pytest.approx(0.5, abs=0.002)
    assert await again.rest() == []
    assert again.ended_at == trio.current_time()


async def receive_error(client: Client) -> Error:
    while not isinstance(envelope := await client.receive(), Error):
        assert envelope is not None, "closed before an error"
    return envelope


async def receive_reply(client: Client, ref: str) -> type[ServerEnvelope]:
    """The type of the answer to ``ref`` (an Ack, or an Error), skipping everything else."""
    while True:
        envelope = await client.receive()
        assert envelope is not None, f"closed before the answer to {ref}"
        if isinstance(envelope, Ack | Error) and envelope.ref == ref:
            return type(envelope)
