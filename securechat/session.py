"""A client's session, whatever carries it: login, then requests, until goodbye.

This is the server's side of the protocol for one connection, apart from
any I/O of its own: it reads frames from a :class:`Transport` and writes
batches of frames to it, and everything else (the deadlines for hello and
for silence, pings, authentication, the rate limits charged before each
request, the dispatch of requests to the :class:`~securechat.hub.Hub`, the
acks owed before a goodbye) is decided here. The line transport
(:mod:`securechat.lines`) is one adapter; a WebSocket is another. The
session's writer task is :func:`securechat.delivery.write_loop`.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Protocol

import trio

from .auth import Authenticator, AuthFailed, LoginFailure
from .config import Account, LimitsSection
from .delivery import DirectWrite, Flusher, FlushTicker, Outbox, Peer, write_loop
from .hub import Hub
from .limits import RateKind, RateLimiter, Verdict, address_key
from .protocol import (
    PRESENCE_LISTS,
    Bye,
    ClientEnvelope,
    Dm,
    Error,
    ErrorCode,
    Hello,
    History,
    Join,
    Kick,
    Leave,
    Ping,
    Pong,
    ProtocolError,
    Rooms,
    Say,
    ServerEnvelope,
    TopicRequest,
    Welcome,
    Who,
    encode,
    parse_client_frame,
    request_id,
)

log = logging.getLogger("securechat.server")

# After the reader stops (bye, EOF, fatal error), how long the writer may
# take to flush what is queued, and a goodbye may wait for the acks owed.
FLUSH_TIMEOUT = 5.0
# A request costs one rate-limit token plus one per this many items (history
# messages asked for, members listed, rooms listed).
ITEMS_PER_TOKEN = 100


class Transport(Protocol):
    """What a session needs of a connection; the TLS line transport and a WebSocket
    transport implement it."""

    peer: str  # who is at the other end, for log lines ("host:port")
    host: str  # the client's address, for per-address limits
    kind: str  # what carries the protocol, a label of the metrics: "tls" (lines), "ws"

    def certificate_user(self) -> str | None:
        """The user name of the client's verified certificate, if it sent one."""
        ...

    def pending_frame(self) -> bytes | None:
        """A frame that has already arrived, if any (no waiting)."""
        ...

    async def receive_frame(self) -> bytes | None:
        """The next frame; None when the client closed the connection.

        Raises a fatal ``ProtocolError`` when the stream cannot go on (a frame
        over the size cap), ``trio.BrokenResourceError`` when the connection
        breaks. A frame that is bad but can be skipped is returned, for
        :func:`~securechat.protocol.parse_client_frame` to refuse (and the
        rate limits to charge).
        """
        ...

    async def send(self, data: bytes) -> None:
        """Send encoded frames (one or more, each ending in a newline)."""
        ...


@dataclass
class ServerStats:
    """What happened to connections since the server started (counters only grow).

    The metrics endpoint reads them (:mod:`securechat.metrics`); every key of the
    counters is from a bounded set (never a user or room name).
    """

    accepted: int = 0
    gone_before_served: int = 0  # reset before its address could even be read
    refused_per_address: int = 0  # closed at once: the address had max_connections_per_ip
    refused_busy: int = 0  # told server_busy: the server had max_connections
    handshake_failed: int = 0  # TLS handshake failed or timed out
    handshake_timeouts: int = 0  # of those, the ones that timed out
    failed: int = 0  # ended by an unexpected error (a bug): logged with its traceback
    frames: int = 0  # frames read from logged-in clients
    # ``error`` envelopes sent, by code.
    errors: Counter[str] = field(default_factory=Counter)
    # Logins decided: (method, "ok" or "failed"); the failures by (method, reason).
    # Methods: "password", "certificate", "none" (neither was offered).
    logins: Counter[tuple[str, str]] = field(default_factory=Counter)
    login_failures: Counter[tuple[str, LoginFailure]] = field(default_factory=Counter)
    # Sessions the server ended, by reason: "slow_consumer", "unresponsive" (no
    # answer to a ping), "flood", "protocol_error" (a fatal one), "kicked" (let go:
    # a kick, an account removed or its password changed), "shutdown".
    disconnects: Counter[str] = field(default_factory=Counter)


class UserRates:
    """Every user's rate limits as sessions apply them: charge, refuse, log once per episode."""

    def __init__(self, limiter: RateLimiter) -> None:
        self.limiter = limiter
        self._limited: set[tuple[str, RateKind]] = set()  # rate limiting logged, per episode
        self.refused: Counter[RateKind] = Counter()  # requests refused rate_limited, by kind

    def charge(self, username: str, kind: RateKind, cost: float) -> Verdict:
        """Spend ``cost`` of the user's ``kind`` tokens; raises rate_limited when they lack them."""
        key = (username, kind)
        verdict, retry_after = self.limiter.take(username, kind, cost, trio.current_time())
        if verdict is Verdict.ACCEPT:
            self._limited.discard(key)
        elif verdict is Verdict.REJECT:
            self.refused[kind] += 1
            if key not in self._limited:
                self._limited.add(key)
                log.warning("rate limited user=%s kind=%s", username, kind.value)
            what = "messages" if kind is RateKind.MESSAGES else "requests"
            promised = promise(retry_after)
            raise ProtocolError(
                ErrorCode.RATE_LIMITED,
                f"too many {what}; try again in {promised:.1f} s",
                retry_after=promised,
            )
        return verdict

    def cooldown(self, username: str) -> float:
        return self.limiter.cooldown(username, trio.current_time())

    def forget(self, username: str) -> None:
        self.limiter.forget(username)
        for kind in RateKind:
            self._limited.discard((username, kind))


def promise(seconds: float) -> float:
    """A wait as ``retry_after`` tells it: whole milliseconds, rounded up with at least
    half a millisecond to spare. A client that waits exactly that long is then let
    through, whatever the rounding of its clock arithmetic (or of ours): rounded to
    the nearest, a third of a second became 0.333, and a request sent 0.333 s later
    was refused again."""
    return math.ceil((seconds + 0.0005) * 1000) / 1000


@dataclass(frozen=True)
class Services:
    """What every session shares: the server's parts it talks to."""

    hub: Hub
    authenticator: Authenticator
    rates: UserRates
    limits: LimitsSection
    ticker: FlushTicker | None
    flusher: Flusher | None  # writes for idle connections whose transport has a direct write
    stats: ServerStats
    name: str  # the server's name and version, for welcome


class Session:
    """One client's session on one connection: login, then requests, until goodbye.

    :meth:`run` drives it to the end; :meth:`finish` lets it go from outside
    (shutdown). Afterwards ``clean`` says whether the transport may say
    goodbye (close_notify) or must be dropped.
    """

    def __init__(
        self, services: Services, transport: Transport, *, direct: DirectWrite | None = None
    ) -> None:
        """``direct``: a write to the transport's stream that never waits, for the
        server's :class:`~securechat.delivery.Flusher` (the TLS fast path)."""
        self.services = services
        self.transport = transport
        self.peer = transport.peer
        self._pings = 0
        limits = services.limits
        self.outbox = Outbox(
            limits.max_outbound_queue,
            limits.max_outbound_bytes,
            self._overflowed,
            drain_timeout=limits.ping_timeout,
            later=services.ticker.later if services.ticker is not None else None,
            flusher=services.flusher,
            direct=direct,
            start_writer=self._start_writer,
        )
        self.member: Peer | None = None
        self.clean = True  # False when the stream may be mid-write and cannot say goodbye
        # While run() is under way: where the writer task runs (its cancel scope is
        # the session's); _cancelled if the session was condemned before that.
        self._nursery: trio.Nursery | None = None
        self._cancelled = False

    def send(self, envelope: ServerEnvelope) -> None:
        if type(envelope) is Error:
            self.services.stats.errors[envelope.code] += 1
        self.outbox.put(encode(envelope))

    def finish(self, farewell: bytes) -> None:
        """Send ``farewell`` after what is queued, then close."""
        self.outbox.put(farewell)
        self.outbox.close()

    def _let_go(self, error: Error) -> None:
        """The hub lets this connection go (a kick, a removed account): ``error``, then close."""
        if not self.outbox.closed:
            self.services.stats.disconnects["kicked"] += 1
            self.services.stats.errors[error.code] += 1
        self.finish(encode(error))

    @property
    def state(self) -> str:
        """For the metrics: "login" (no welcome yet), "active", "closing"."""
        if self.outbox.closed:
            return "closing"
        return "login" if self.member is None else "active"

    def _overflowed(self) -> None:
        self.services.stats.disconnects["slow_consumer"] += 1
        log.warning(
            "slow consumer disconnected user=%s peer=%s",
            self.member.username if self.member else "-",
            self.peer,
        )
        self.clean = False
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()
        else:
            self._cancelled = True

    async def run(self) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                if self._cancelled:
                    nursery.cancel_scope.cancel()
                # The writer: with a direct write there is none until the outbox needs
                # one, and it ends whenever it has nothing to write (an idle connection
                # has no writer task); without, it runs throughout, waiting for frames.
                if not self.outbox.writer_on_demand():
                    nursery.start_soon(self._write_loop)
                try:
                    await self._read_loop()
                finally:
                    self.outbox.close()
                    nursery.cancel_scope.deadline = trio.current_time() + FLUSH_TIMEOUT
        finally:
            self._nursery = None
            if self.member is not None:  # however the connection ended
                self.services.hub.logout(self.member)
                log.info("logout user=%s peer=%s", self.member.username, self.peer)

    def _start_writer(self) -> bool:
        if self._nursery is None:
            return False  # not running (any more): nothing to write to
        self._nursery.start_soon(self._write_loop)
        return True

    async def _write_loop(self) -> None:
        idle = False
        try:
            idle = await write_loop(self.outbox, self.transport.send, self.services.ticker)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        except trio.Cancelled:
            self.clean = False
            raise
        finally:
            # Writer done (farewell sent, or the peer is gone): stop reading too.
            if not idle and self._nursery is not None:
                self._nursery.cancel_scope.cancel()

    async def _read_loop(self) -> None:
        try:
            login: tuple[Hello, Account] | None = None
            with trio.move_on_after(self.services.limits.login_timeout) as login_deadline:
                login = await self._login()
            if login_deadline.cancelled_caught:
                self._count_failure("none", LoginFailure.TIMEOUT)
                log.warning("login timeout peer=%s", self.peer)
                self.send(Error(code=ErrorCode.TIMEOUT, message="no hello before the deadline"))
                return
            if login is None:
                return
            # Attached outside the login deadline; run() detaches it however it ends.
            member = await self._attach(*login)
            del login  # not needed from here on: an idle connection's memory
            if member is None:
                return
            while (frame := await self._next_frame()) is not None:
                if self.outbox.closed:
                    return  # condemned (too slow) or let go (kicked): read no more of it
                if not await self._serve_frame(member, frame):
                    return
            await self._settle(member)
        except _Unresponsive:
            self.services.stats.disconnects["unresponsive"] += 1
            user = self.member.username if self.member else "-"
            log.warning("unresponsive peer disconnected user=%s peer=%s", user, self.peer)
            self.send(Error(code=ErrorCode.TIMEOUT, message="no answer to ping"))
        except ProtocolError as exc:  # from the transport: fatal (see Transport.receive_frame)
            self.services.stats.disconnects["protocol_error"] += 1
            log.warning("protocol error peer=%s code=%s", self.peer, exc.code)
            self.send(exc.to_envelope())
        except trio.BrokenResourceError:
            pass  # the peer left without close_notify: an ordinary disconnect

    async def _serve_frame(self, member: Peer, frame: bytes) -> bool:
        """Answer one frame; False when the connection should close.

        Every frame is charged to the user's rate limits before it is acted
        on, in proportion to its cost; a refused frame costs too. Refusals
        are answered with an ``error`` naming the request.
        """
        self.services.stats.frames += 1
        envelope: ClientEnvelope | None = None
        try:
            try:
                envelope = parse_client_frame(frame)
            except ProtocolError:
                if not await self._pay(member, RateKind.REQUESTS, 1.0, None):
                    return False
                raise
            if isinstance(envelope, Bye):
                await self._settle(member)
                return False
            kind, cost = self._cost(envelope)
            if not await self._pay(member, kind, cost, request_id(envelope)):
                return False
            await self._dispatch(member, envelope)
        except ProtocolError as exc:
            if envelope is not None:
                exc.ref = request_id(envelope)
            self.send(exc.to_envelope())
        return True

    async def _pay(self, member: Peer, kind: RateKind, cost: float, ref: str | None) -> bool:
        """Charge the user for a request: raises rate_limited when they are over the
        limit, and says False (after the acks they are owed, and a goodbye) when they
        kept going far past it."""
        if self.services.rates.charge(member.username, kind, cost) is not Verdict.DISCONNECT:
            return True
        self.services.stats.disconnects["flood"] += 1
        log.warning(
            "flood disconnected user=%s peer=%s kind=%s", member.username, self.peer, kind.value
        )
        await self._settle(member)
        self.send(Error(code=ErrorCode.RATE_LIMITED, message="flooding: disconnected", ref=ref))
        return False

    async def _settle(self, member: Peer) -> None:
        """Before a goodbye: let the messages accepted so far be committed and acknowledged.

        A sender that stops (bye, flood cut, end of stream) still gets the acks
        of what the server took, so it need not send those again. Bounded in time.
        """
        if not self.outbox.closed:
            with trio.move_on_after(FLUSH_TIMEOUT):
                await member.settled()

    async def _next_frame(self) -> bytes | None:
        """The next frame; pings the client after a silence and gives up if it stays silent."""
        limits = self.services.limits
        if (frame := self.transport.pending_frame()) is not None:
            # Already here: no deadline needed. But let the others run first:
            # one read can hold hundreds of frames, and a connection must not
            # keep the event loop to itself while it works through them.
            await trio.lowlevel.checkpoint()
            return frame
        with trio.move_on_after(limits.idle_timeout):
            return await self.transport.receive_frame()
        self._pings += 1
        self.send(Ping(id=f"srv{self._pings}"))
        with trio.move_on_after(limits.ping_timeout):
            return await self.transport.receive_frame()
        raise _Unresponsive

    async def _login(self) -> tuple[Hello, Account] | None:
        """Read ``hello`` and authenticate it; None (after an error reply) if that fails."""
        frame = await self.transport.receive_frame()
        if frame is None:
            return None
        try:
            hello = parse_client_frame(frame)
        except ProtocolError as exc:
            self._count_failure("none", LoginFailure.BAD_HELLO)
            self.send(exc.to_envelope())
            return None
        if not isinstance(hello, Hello):
            self._count_failure("none", LoginFailure.BAD_HELLO)
            self.send(
                Error(
                    code=ErrorCode.AUTH_REQUIRED,
                    message="send hello first",
                    ref=request_id(hello),
                )
            )
            return None
        cert_user = self.transport.certificate_user()
        try:
            account: Account = await self.services.authenticator.authenticate(
                hello.username, hello.password, cert_user, source=address_key(self.transport.host)
            )
            # The check runs in a thread that cancellation cannot interrupt: a
            # login that overran its deadline must still fail.
            await trio.lowlevel.checkpoint_if_cancelled()
        except AuthFailed as exc:
            self._refuse_login(hello, str(exc), exc.reason)
            return None
        log.info(
            "login user=%s peer=%s method=%s admin=%s",
            hello.username,
            self.peer,
            self._method(hello),
            account.admin,
        )
        return hello, account

    def _method(self, hello: Hello) -> str:
        """How ``hello`` logs in: "password" (with or without a certificate), else
        "certificate" if the connection has one, else "none"."""
        if hello.password is not None:
            return "password"
        return "none" if self.transport.certificate_user() is None else "certificate"

    def _count_failure(self, method: str, reason: LoginFailure) -> None:
        stats = self.services.stats
        stats.logins[method, "failed"] += 1
        stats.login_failures[method, reason] += 1

    def _refuse_login(self, hello: Hello, reason: str, why: LoginFailure) -> None:
        self._count_failure(self._method(hello), why)
        # The reason is for the log only: every refusal looks the same to the client.
        log.warning("auth failed user=%s peer=%s reason=%s", hello.username, self.peer, reason)
        self.send(
            Error(
                code=ErrorCode.AUTH_FAILED,
                message="invalid username, password or certificate",
                ref=hello.id,
            )
        )

    async def _attach(self, hello: Hello, account: Account) -> Peer | None:
        """Join the chat as ``hello.username``; None (after an error reply) if the account
        changed since it was checked (a reload while the login was in flight)."""
        if self.services.authenticator.accounts.get(hello.username) is not account:
            self._refuse_login(hello, "account changed during login", LoginFailure.ACCOUNT_CHANGED)
            return None
        cooldown = self.services.rates.cooldown(hello.username)
        if cooldown:
            self._count_failure(self._method(hello), LoginFailure.FLOOD_COOLDOWN)
            log.warning(
                "login refused user=%s peer=%s: cut off for flooding, %.0f s to go",
                hello.username,
                self.peer,
                cooldown,
            )
            promised = promise(cooldown)
            self.send(
                Error(
                    code=ErrorCode.RATE_LIMITED,
                    message=f"disconnected for flooding; log in again in {promised:.0f} s",
                    ref=hello.id,
                    retry_after=promised,
                )
            )
            return None
        member = self.member = Peer(
            hello.username,
            self.outbox,
            admin=account.admin,
            disconnect=self._let_go,
            errors=self.services.stats.errors,
        )
        hub = self.services.hub
        # From here on a reload sees this connection (login registers it
        # before it awaits anything) and can let it go.
        try:
            rooms = await hub.login(member, presence_lists=PRESENCE_LISTS in (hello.features or ()))
        except ProtocolError:  # a reload removed the user meanwhile
            self._refuse_login(hello, "account removed during login", LoginFailure.ACCOUNT_CHANGED)
            return None
        self.services.stats.logins[self._method(hello), "ok"] += 1
        self.send(
            Welcome(username=hello.username, rooms=rooms, server=self.services.name, ref=hello.id)
        )
        await hub.deliver_stored(member)
        return member

    async def _dispatch(self, member: Peer, envelope: ClientEnvelope) -> None:
        """Act on one (paid-for) envelope; refusals are raised as ProtocolError."""
        hub = self.services.hub
        ref = request_id(envelope)
        if isinstance(envelope, Say):
            await hub.say(member, envelope.room, envelope.text, ref, action=bool(envelope.action))
        elif isinstance(envelope, Dm):
            await hub.dm(member, envelope.to, envelope.text, ref, action=bool(envelope.action))
        elif isinstance(envelope, Join):
            await hub.join(member, envelope.room, ref)
        elif isinstance(envelope, Leave):
            await hub.leave(member, envelope.room, ref)
        elif isinstance(envelope, Who):
            self.send(hub.who(member, envelope.room, ref))
        elif isinstance(envelope, Rooms):
            self.send(hub.room_list(member.username, ref))
        elif isinstance(envelope, TopicRequest):
            if envelope.topic is None:
                self.send(hub.topic(member, envelope.room, ref))
            else:
                await hub.set_topic(member, envelope.room, envelope.topic, ref)
        elif isinstance(envelope, History):
            await hub.history(
                member,
                room=envelope.room,
                with_user=envelope.peer,
                after=envelope.after,
                limit=envelope.limit,
                ref=ref,
            )
        elif isinstance(envelope, Kick):
            if not member.admin:
                raise ProtocolError(ErrorCode.FORBIDDEN, "only admins can kick")
            self.send(
                hub.kick(envelope.username, by=member.username, reason=envelope.reason, ref=ref)
            )
        elif isinstance(envelope, Ping):
            self.send(Pong(ref=ref))
        elif isinstance(envelope, Pong):
            pass  # any frame proves the client alive; nothing else to do
        else:  # hello again
            raise ProtocolError(ErrorCode.BAD_ENVELOPE, "already logged in")

    def _cost(self, envelope: ClientEnvelope) -> tuple[RateKind, float]:
        """Which of the user's buckets a request draws on, and how many tokens:
        one per request, plus one per hundred items it makes the server handle."""
        if isinstance(envelope, Say | Dm | Join | Leave | Kick):
            return RateKind.MESSAGES, 1.0
        if isinstance(envelope, TopicRequest) and envelope.topic is not None:
            return RateKind.MESSAGES, 1.0  # a change, announced to the room: like a message
        hub = self.services.hub
        items = 0
        if isinstance(envelope, History):
            items = envelope.limit
        elif isinstance(envelope, Who):
            items = hub.room_size(envelope.room)
        elif isinstance(envelope, Rooms):
            items = hub.room_count()
        return RateKind.REQUESTS, 1.0 + items / ITEMS_PER_TOKEN


class _Unresponsive(Exception):
    """The client answered neither traffic nor a ping in time."""
