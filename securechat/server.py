"""The TLS chat server: accepting connections and driving each one.

This is the I/O layer. Each connection gets a TLS handshake under a
deadline, then two tasks: a reader that decodes frames and dispatches
envelopes (login first, then chat), and a writer that drains the
connection's outbox. Rooms and fan-out live in :mod:`securechat.hub`,
envelopes and framing in :mod:`securechat.protocol`, login decisions in
:mod:`securechat.auth`. A failure in one connection is logged and never
reaches the others.
"""

from __future__ import annotations

import errno
import logging
import resource
import time
from dataclasses import dataclass

import trio

from . import __version__, tls
from .auth import Account, Authenticator, AuthFailed
from .certs import CertError, common_name
from .config import Config
from .hub import DeferredWakeups, Hub, Member, Outbox, load_state
from .limits import (
    Admission,
    ConnectionCounter,
    LoginThrottle,
    Occasional,
    RateKind,
    RateLimiter,
    Verdict,
    address_key,
)
from .protocol import (
    Bye,
    ClientEnvelope,
    Dm,
    Error,
    ErrorCode,
    FrameDecoder,
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
from .sqlite_store import SqliteStore
from .store import Retention, StoreError
from .transport import LeanSocketStream

log = logging.getLogger("securechat.server")

RECEIVE_BYTES = 65536
TLS_RECORD_BYTES = 16 * 1024  # the most plaintext one TLS record holds
# After the reader stops (bye, EOF, fatal error), how long the writer may
# take to flush what is queued before the connection is dropped.
FLUSH_TIMEOUT = 5.0
SERVER_NAME = f"securechat/{__version__}"
# accept() errors that mean "out of a resource for now" (trio.serve_listeners's list).
ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
ACCEPT_RETRY_DELAY = 0.1
# A request costs one rate-limit token plus one per this many items (history
# messages asked for, members listed, rooms listed).
ITEMS_PER_TOKEN = 100


def raise_open_file_limit() -> None:
    """Allow as many sockets as the hard limit does: every connection is a file descriptor."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


@dataclass
class ServerStats:
    """What happened to connections since the server started (counters only grow)."""

    accepted: int = 0
    gone_before_served: int = 0  # reset before its address could even be read
    refused_per_address: int = 0  # closed at once: the address had max_connections_per_ip
    refused_busy: int = 0  # told server_busy: the server had max_connections
    handshake_failed: int = 0  # TLS handshake failed or timed out
    failed: int = 0  # ended by an unexpected error (a bug): logged with its traceback
    frames: int = 0  # frames read from logged-in clients


class ChatServer:
    """Listens, accepts, and runs every connection until :meth:`request_shutdown`."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.limits = config.limits
        interval = config.server.flush_interval_ms / 1000
        delay = config.server.presence_delay_ms / 1000
        self.ticker = _Ticker(interval, delay) if interval else None
        settings = config.server
        self.ssl_context = tls.server_context(
            settings.cert, settings.key, settings.ca, settings.client_certs
        )
        self.authenticator = Authenticator(
            config.accounts(),
            config.server.client_certs,
            max_concurrent_checks=config.limits.auth_workers,
            throttle=LoginThrottle(
                free_failures=config.limits.login_failures_allowed,
                max_delay=config.limits.login_backoff_max,
            ),
        )
        self.store = SqliteStore(config.storage.path)
        storage = config.storage
        self.retention = Retention(
            max_age=storage.retention_days * 86400, per_room=storage.retention_messages_per_room
        )
        self._hub: Hub | None = None  # set up by load(), from the stored state
        self.addresses: list[tuple[str, int]] = []
        self._listeners: list[trio.SocketListener] = []
        self._connections: set[_Connection] = set()
        self._counter = ConnectionCounter(
            config.limits.max_connections, config.limits.max_connections_per_ip
        )
        self.stats = ServerStats()
        # Lines for events that come in floods: at most one per interval, with a count.
        self._refusals = Occasional(10.0)
        self._busy = Occasional(1.0)
        self._handshake_failures = Occasional(1.0)
        self._accept_failures = Occasional(1.0)
        self.rates = RateLimiter(
            message_rate=config.limits.messages_per_second,
            message_burst=config.limits.message_burst,
            request_rate=config.limits.requests_per_second,
            request_burst=config.limits.request_burst,
        )
        self._limited: set[tuple[str, RateKind]] = set()  # rate limiting logged, per episode
        self._shutdown = trio.Event()

    @property
    def hub(self) -> Hub:
        if self._hub is None:
            raise RuntimeError("the server's stored state is not loaded yet (ChatServer.load)")
        return self._hub

    async def load(self) -> None:
        """Read the stored state (rooms, memberships, message ids; in a worker thread) and
        set up the hub on it. :meth:`serve` calls it if it was not called before; raises
        :class:`StoreError`."""
        if self._hub is not None:
            return
        settings = self.config.server
        self._hub = Hub(
            self.store,
            await load_state(self.store),
            users=self.config.users,
            rooms=self.config.room_settings(),
            allow_room_create=settings.allow_room_create,
            max_rooms=settings.max_rooms,
        )

    def request_shutdown(self) -> None:
        self._shutdown.set()

    def reload(self, config: Config) -> None:
        """Apply a re-read config file: users, passwords, rooms and certificate files.

        Other server settings need a restart. New TLS settings apply to new
        connections; connected clients are not disturbed.
        """
        settings = self.config.server
        if (
            config.server != settings
            or config.limits != self.limits
            or config.storage != self.config.storage
        ):
            # (Also when the server was started with flags that override the file.)
            log.warning(
                "the file's [server], [limits] or [storage] differ from the running settings;"
                " those sections are read at start only"
            )
        try:
            self.ssl_context = tls.server_context(
                settings.cert, settings.key, settings.ca, settings.client_certs
            )
        except CertError as exc:
            log.error("certificates not reloaded, keeping the current ones: %s", exc)
        self.config = self.config.model_copy(update={"users": config.users, "rooms": config.rooms})
        old, new = self.authenticator.accounts, config.accounts()
        # An unchanged account stays the same object: a login checks, when it
        # joins the chat, that its account is still the one it was checked
        # against, so logins in flight during a reload cannot slip through.
        accounts = {
            name: old[name] if old.get(name) == account else account
            for name, account in new.items()
        }
        self.authenticator.accounts = accounts
        self.hub.reconfigure(accounts, config.room_settings())  # lets removed users go
        added = sorted(set(accounts) - set(old))
        removed = sorted(set(old) - set(accounts))
        changed = sorted(name for name in set(old) & set(accounts) if old[name] != accounts[name])
        for name in removed:
            self.rates.forget(name)
        for name in changed:
            if old[name].password_hash != accounts[name].password_hash:
                # Whoever logged in under the old credentials logs in again.
                self.hub.disconnect_user(
                    name,
                    Error(
                        code=ErrorCode.KICKED,
                        message="your password was changed; log in again",
                    ),
                )
            else:
                self.hub.set_admin(name, accounts[name].admin)
        log.info(
            "config reloaded: users=%d added=%s removed=%s changed=%s",
            len(accounts),
            ",".join(added) or "-",
            ",".join(removed) or "-",
            ",".join(changed) or "-",
        )

    async def listen(self) -> list[tuple[str, int]]:
        """Bind the listening sockets (OSError when the address is taken); returns the addresses."""
        settings = self.config.server
        self._listeners = await trio.open_tcp_listeners(settings.port, host=settings.host)
        self.addresses = [listener.socket.getsockname()[:2] for listener in self._listeners]
        return self.addresses

    async def serve(
        self, *, task_status: trio.TaskStatus[list[tuple[str, int]]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Serve until shutdown is requested; ``task_status`` reports the bound addresses."""
        settings = self.config.server
        await self.load()
        if not self._listeners:
            await self.listen()
        listeners = self._listeners
        log.info(
            "[SEARCHING] listening on %s (TLS, client_certs=%s, users=%d)",
            ", ".join(_format_address(address) for address in self.addresses),
            settings.client_certs,
            len(self.authenticator.accounts),
        )
        try:
            async with trio.open_nursery() as storage:
                await storage.start(self.store.run)
                if self.ticker is not None:
                    storage.start_soon(self.ticker.run)
                pruning = trio.CancelScope()
                if self.retention.enabled:
                    storage.start_soon(self._prune_periodically, pruning)
                try:
                    await self._serve_connections(listeners, task_status)
                finally:
                    pruning.cancel()
                    # The writer commits what is queued, the last callbacks run, then
                    # the store's tasks end.
                    self.store.close()
                    if self.ticker is not None:
                        self.ticker.stop()
        finally:
            self.store.close_database()
        log.info("server stopped")

    async def _prune_periodically(self, scope: trio.CancelScope) -> None:
        """Apply the retention rule now and every ``prune_interval``, until ``scope`` ends.

        A prune waits for the writer between its batches and reads in worker
        threads: the chat goes on meanwhile (see :meth:`SqliteStore.prune`).
        """
        storage = self.config.storage
        rules = []
        if storage.retention_days:
            rules.append(f"older than {storage.retention_days:g} days")
        if storage.retention_messages_per_room:
            rules.append(f"beyond the newest {storage.retention_messages_per_room} of a room")
        log.info(
            "retention: deleting messages %s, every %g s%s",
            " or ".join(rules),
            storage.prune_interval,
            ""
            if self.store.shrinks
            else " (this database was made without auto_vacuum: the space is reused,"
            " the file does not shrink; see config.example.toml)",
        )
        with scope:
            while True:
                try:
                    pruned = await self.store.prune(self.retention, time.time())
                except StoreError as exc:
                    log.error("prune failed (retried in %.0f s): %s", storage.prune_interval, exc)
                else:
                    if pruned.messages or pruned.pages_released:
                        log.info(
                            "pruned %d messages (%d by age, %d by the room cap);"
                            " released %d free pages",
                            pruned.messages,
                            pruned.by_age,
                            pruned.by_room,
                            pruned.pages_released,
                        )
                await trio.sleep(storage.prune_interval)

    async def _serve_connections(
        self,
        listeners: list[trio.SocketListener],
        task_status: trio.TaskStatus[list[tuple[str, int]]],
    ) -> None:
        async with trio.open_nursery() as connections:
            try:
                async with trio.open_nursery() as acceptors:
                    for listener in listeners:
                        acceptors.start_soon(self._accept_loop, listener, connections)
                    task_status.started(self.addresses)
                    await self._shutdown.wait()
                    acceptors.cancel_scope.cancel()
            finally:
                for listener in listeners:
                    await trio.aclose_forcefully(listener)
            log.info("shutting down: %d connections", len(self._connections))
            self.hub.shutting_down = True
            farewell = encode(Error(code=ErrorCode.SERVER_SHUTDOWN, message="server shutting down"))
            for connection in list(self._connections):
                connection.finish(farewell)
            connections.cancel_scope.deadline = trio.current_time() + self.limits.shutdown_grace

    async def _accept_loop(self, listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:
                # As trio.serve_listeners does: out of descriptors or memory
                # for now, so keep serving those connected and retry shortly.
                # (trio already skips the errors one bad peer can cause.)
                if exc.errno not in ACCEPT_CAPACITY_ERRNOS:
                    raise
                if count := self._accept_failures.due(trio.current_time()):
                    log.warning("accept failed (%d times): %s", count, exc.strerror or exc)
                await trio.sleep(ACCEPT_RETRY_DELAY)
                continue
            nursery.start_soon(self._handle, stream)

    def charge(self, username: str, kind: RateKind, cost: float) -> Verdict:
        """Spend ``cost`` of the user's ``kind`` tokens; raises rate_limited when they lack them."""
        key = (username, kind)
        verdict, retry_after = self.rates.take(username, kind, cost, trio.current_time())
        if verdict is Verdict.ACCEPT:
            self._limited.discard(key)
        elif verdict is Verdict.REJECT:
            if key not in self._limited:
                self._limited.add(key)
                log.warning("rate limited user=%s kind=%s", username, kind.value)
            what = "messages" if kind is RateKind.MESSAGES else "requests"
            raise ProtocolError(
                ErrorCode.RATE_LIMITED,
                f"too many {what}; try again in {retry_after:.1f} s",
                retry_after=round(retry_after, 3),
            )
        return verdict

    async def _handle(self, tcp_stream: trio.SocketStream) -> None:
        """Run one connection from accept to close.

        Nothing raised here reaches the nursery of connections: an error in
        one connection, at any stage and in any of its tasks, ends that
        connection only (logged with its traceback, counted in ``stats``).
        """
        self.stats.accepted += 1
        peer = "-"
        try:
            try:
                address = tcp_stream.socket.getpeername()
            except OSError:
                self.stats.gone_before_served += 1  # reset before we looked: nothing to serve
                return
            host, peer = address[0], _format_address(address)
            key = address_key(host)
            with self._counter.hold(key) as admission:
                if admission is Admission.REFUSE:
                    self.stats.refused_per_address += 1
                    if count := self._refusals.due(trio.current_time()):
                        log.warning(
                            "connections refused (%d since the last such line): peer=%s"
                            " has max_connections_per_ip=%d open",
                            count,
                            peer,
                            self.limits.max_connections_per_ip,
                        )
                    return
                await self._serve_tls(tcp_stream, peer, host, admission)
        except* (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the peer went away
        except* Exception:
            self.stats.failed += 1
            log.exception("connection failed peer=%s", peer)
        finally:
            await trio.aclose_forcefully(tcp_stream)  # already closed on every normal path

    async def _serve_tls(
        self, tcp_stream: trio.SocketStream, peer: str, host: str, admission: Admission
    ) -> None:
        stream = trio.SSLStream(LeanSocketStream(tcp_stream), self.ssl_context, server_side=True)
        connection: _Connection | None = None
        # Only a stream that finished its handshake and every write can say goodbye.
        graceful = False
        try:
            try:
                with trio.fail_after(self.limits.handshake_timeout):
                    await stream.do_handshake()
            except trio.TooSlowError:
                self.stats.handshake_failed += 1
                if count := self._handshake_failures.due(trio.current_time()):
                    log.warning("handshake timeout peer=%s (%d failed handshakes)", peer, count)
                return
            except trio.BrokenResourceError as exc:
                self.stats.handshake_failed += 1
                if count := self._handshake_failures.due(trio.current_time()):
                    log.warning(
                        "handshake failed peer=%s reason=%s (%d failed handshakes)",
                        peer,
                        tls.failure_reason(exc),
                        count,
                    )
                return
            if admission is Admission.BUSY:
                self.stats.refused_busy += 1
                if count := self._busy.due(trio.current_time()):
                    log.warning(
                        "server busy peer=%s connections=%d (%d refused since the last such line)",
                        peer,
                        self._counter.total,
                        count,
                    )
                busy = Error(code=ErrorCode.SERVER_BUSY, message="too many connections; try later")
                with trio.move_on_after(self.limits.handshake_timeout) as scope:
                    await stream.send_all(encode(busy))
                graceful = not scope.cancelled_caught
                return
            log.info("[CONNECTION ESTABLISHED] %s", peer)
            connection = _Connection(self, stream, peer, host)
            self._connections.add(connection)
            await connection.run()
            graceful = connection.clean
        finally:
            if connection is not None:
                self._connections.discard(connection)
            await tls.close(stream, graceful=graceful)


class _Connection:
    """One TLS connection after its handshake: login, then chat."""

    def __init__(
        self, server: ChatServer, stream: trio.SSLStream[LeanSocketStream], peer: str, host: str
    ) -> None:
        self.server = server
        self.stream = stream
        self.peer = peer
        self.host = host
        self._pings = 0
        self.outbox = Outbox(
            server.limits.max_outbound_queue,
            server.limits.max_outbound_bytes,
            self._overflowed,
            drain_timeout=server.limits.ping_timeout,
            later=server.ticker.later if server.ticker is not None else None,
        )
        self.member: Member | None = None
        self.clean = True  # False when the stream may be mid-write and cannot say goodbye
        self._scope = trio.CancelScope()

    def send(self, envelope: ServerEnvelope) -> None:
        self.outbox.put(encode(envelope))

    def finish(self, farewell: bytes) -> None:
        """Send ``farewell`` after what is queued, then close."""
        self.outbox.put(farewell)
        self.outbox.close()

    def _overflowed(self) -> None:
        log.warning(
            "slow consumer disconnected user=%s peer=%s",
            self.member.username if self.member else "-",
            self.peer,
        )
        self.clean = False
        self._scope.cancel()

    async def run(self) -> None:
        try:
            with self._scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._write_loop, nursery.cancel_scope)
                    try:
                        await self._read_loop()
                    finally:
                        self.outbox.close()
                        nursery.cancel_scope.deadline = trio.current_time() + FLUSH_TIMEOUT
        finally:
            if self.member is not None:  # however the connection ended
                self.server.hub.logout(self.member)
                log.info("logout user=%s peer=%s", self.member.username, self.peer)

    async def _write_loop(self, scope: trio.CancelScope) -> None:
        # The flush tick: a connection already flushed in the current tick
        # waits for the next one, so that under load its messages coalesce
        # into one TLS write instead of one per message (and its task is not
        # woken for each of them); the first write after a quiet spell goes
        # out at once. Ticks are global, so waiting writers wake together.
        # A batch is at most the outbox's batch_bytes (or one larger frame);
        # when a batch was cut there, the rest follows at once, not a tick
        # later. A batch is encrypted one TLS record (16 KiB) at a time: the
        # ciphertext the stream holds while the peer does not read, and the
        # buffer OpenSSL keeps for it, stay that small.
        ticker = self.server.ticker
        piece = TLS_RECORD_BYTES
        flushed_in = -1
        try:
            while True:
                await self.outbox.wait_for_frames()
                if ticker is not None and ticker.count == flushed_in:
                    await ticker.next_tick()
                batch = self.outbox.take()
                if batch is None:
                    return  # closed, and everything was sent
                cut = len(self.outbox) > 0
                if len(batch) <= piece:
                    await self.stream.send_all(batch)
                else:
                    view = memoryview(batch)
                    for start in range(0, len(view), piece):
                        await self.stream.send_all(view[start : start + piece])
                if ticker is not None:
                    flushed_in = -1 if cut else ticker.count
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        except trio.Cancelled:
            self.clean = False
            raise
        finally:
            # Writer done (farewell sent, or the peer is gone): stop reading too.
            scope.cancel()

    async def _read_loop(self) -> None:
        decoder = FrameDecoder(self.server.config.server.max_frame_bytes)
        frames = _Frames(self.stream, decoder)
        try:
            login: tuple[Hello, Account] | None = None
            with trio.move_on_after(self.server.limits.login_timeout) as login_deadline:
                login = await self._login(frames)
            if login_deadline.cancelled_caught:
                log.warning("login timeout peer=%s", self.peer)
                self.send(Error(code=ErrorCode.TIMEOUT, message="no hello before the deadline"))
                return
            if login is None:
                return
            # Attached outside the login deadline; run() detaches it however it ends.
            member = await self._attach(*login)
            if member is None:
                return
            while (frame := await self._next_frame(frames)) is not None:
                if self.outbox.closed:
                    return  # condemned (too slow) or let go (kicked): read no more of it
                if not await self._serve_frame(member, frame):
                    return
            await self._settle(member)
        except _Unresponsive:
            user = self.member.username if self.member else "-"
            log.warning("unresponsive peer disconnected user=%s peer=%s", user, self.peer)
            self.send(Error(code=ErrorCode.TIMEOUT, message="no answer to ping"))
        except ProtocolError as exc:  # from the decoder: always fatal
            log.warning("protocol error peer=%s code=%s", self.peer, exc.code)
            self.send(exc.to_envelope())
        except trio.BrokenResourceError:
            pass  # the peer left without close_notify: an ordinary disconnect

    async def _serve_frame(self, member: Member, frame: bytes) -> bool:
        """Answer one frame; False when the connection should close.

        Every frame is charged to the user's rate limits before it is acted
        on, in proportion to its cost; a refused frame costs too. Refusals
        are answered with an ``error`` naming the request.
        """
        self.server.stats.frames += 1
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

    async def _pay(self, member: Member, kind: RateKind, cost: float, ref: str | None) -> bool:
        """Charge the user for a request: raises rate_limited when they are over the
        limit, and says False (after the acks they are owed, and a goodbye) when they
        kept going far past it."""
        if self.server.charge(member.username, kind, cost) is not Verdict.DISCONNECT:
            return True
        log.warning(
            "flood disconnected user=%s peer=%s kind=%s", member.username, self.peer, kind.value
        )
        await self._settle(member)
        self.send(Error(code=ErrorCode.RATE_LIMITED, message="flooding: disconnected", ref=ref))
        return False

    async def _settle(self, member: Member) -> None:
        """Before a goodbye: let the messages accepted so far be committed and acknowledged.

        A sender that stops (bye, flood cut, end of stream) still gets the acks
        of what the server took, so it need not send those again. Bounded in time.
        """
        if not self.outbox.closed:
            with trio.move_on_after(FLUSH_TIMEOUT):
                await member.settled()

    async def _next_frame(self, frames: _Frames) -> bytes | None:
        """The next frame; pings the client after a silence and gives up if it stays silent."""
        limits = self.server.limits
        if (frame := frames.buffered()) is not None:
            # Already here: no deadline needed. But let the others run first:
            # one read can hold hundreds of frames, and a connection must not
            # keep the event loop to itself while it works through them.
            await trio.lowlevel.checkpoint()
            return frame
        with trio.move_on_after(limits.idle_timeout):
            return await frames.next()
        self._pings += 1
        self.send(Ping(id=f"srv{self._pings}"))
        with trio.move_on_after(limits.ping_timeout):
            return await frames.next()
        raise _Unresponsive

    async def _login(self, frames: _Frames) -> tuple[Hello, Account] | None:
        """Read ``hello`` and authenticate it; None (after an error reply) if that fails."""
        frame = await frames.next()
        if frame is None:
            return None
        try:
            hello = parse_client_frame(frame)
        except ProtocolError as exc:
            self.send(exc.to_envelope())
            return None
        if not isinstance(hello, Hello):
            self.send(
                Error(
                    code=ErrorCode.AUTH_REQUIRED,
                    message="send hello first",
                    ref=request_id(hello),
                )
            )
            return None
        peer_cert = self.stream.getpeercert()
        cert_user = common_name(peer_cert.get("subject")) if peer_cert else None
        try:
            account: Account = await self.server.authenticator.authenticate(
                hello.username, hello.password, cert_user, source=address_key(self.host)
            )
            # The check runs in a thread that cancellation cannot interrupt: a
            # login that overran its deadline must still fail.
            await trio.lowlevel.checkpoint_if_cancelled()
        except AuthFailed as exc:
            self._refuse_login(hello, str(exc))
            return None
        log.info(
            "login user=%s peer=%s method=%s admin=%s",
            hello.username,
            self.peer,
            "certificate" if cert_user == hello.username and hello.password is None else "password",
            account.admin,
        )
        return hello, account

    def _refuse_login(self, hello: Hello, reason: str) -> None:
        # The reason is for the log only: every refusal looks the same to the client.
        log.warning("auth failed user=%s peer=%s reason=%s", hello.username, self.peer, reason)
        self.send(
            Error(
                code=ErrorCode.AUTH_FAILED,
                message="invalid username, password or certificate",
                ref=hello.id,
            )
        )

    async def _attach(self, hello: Hello, account: Account) -> Member | None:
        """Join the chat as ``hello.username``; None (after an error reply) if the account
        changed since it was checked (a reload while the login was in flight)."""
        if self.server.authenticator.accounts.get(hello.username) is not account:
            self._refuse_login(hello, "account changed during login")
            return None
        cooldown = self.server.rates.cooldown(hello.username, trio.current_time())
        if cooldown:
            log.warning(
                "login refused user=%s peer=%s: cut off for flooding, %.0f s to go",
                hello.username,
                self.peer,
                cooldown,
            )
            self.send(
                Error(
                    code=ErrorCode.RATE_LIMITED,
                    message=f"disconnected for flooding; log in again in {cooldown:.0f} s",
                    ref=hello.id,
                    retry_after=round(cooldown, 3),
                )
            )
            return None
        member = self.member = Member(
            hello.username,
            self.outbox,
            admin=account.admin,
            disconnect=lambda error: self.finish(encode(error)),
        )
        hub = self.server.hub
        # From here on a reload sees this connection (login registers it
        # before it awaits anything) and can let it go.
        rooms = await hub.login(member)
        self.send(Welcome(username=hello.username, rooms=rooms, server=SERVER_NAME, ref=hello.id))
        await hub.deliver_stored(member)
        return member

    async def _dispatch(self, member: Member, envelope: ClientEnvelope) -> None:
        """Act on one (paid-for) envelope; refusals are raised as ProtocolError."""
        hub = self.server.hub
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
                peer=envelope.peer,
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
        hub = self.server.hub
        items = 0
        if isinstance(envelope, History):
            items = envelope.limit
        elif isinstance(envelope, Who):
            items = hub.room_size(envelope.room)
        elif isinstance(envelope, Rooms):
            items = hub.room_count()
        return RateKind.REQUESTS, 1.0 + items / ITEMS_PER_TOKEN


class _Ticker:
    """The flush tick's clock: one task sleeps, and every writer waiting for the next
    tick wakes at once (one timer in all instead of one per connection).

    Every ``presence_delay`` (rounded to ticks) it also wakes the writers that
    hold only frames that were not urgent (:class:`DeferredWakeups`).
    """

    def __init__(self, interval: float, presence_delay: float) -> None:
        self.interval = interval
        self.count = 0
        self.later: DeferredWakeups | None = DeferredWakeups() if presence_delay else None
        self._later_every = max(1, round(presence_delay / interval))
        self._waiting = trio.lowlevel.ParkingLot()
        self._stopped = False

    async def run(self) -> None:
        while not self._stopped:
            await trio.sleep(self.interval)
            self.count += 1
            if self._waiting:
                self._waiting.unpark_all()
            if self.later is not None and self.count % self._later_every == 0:
                self.later.wake_all()

    def stop(self) -> None:
        self._stopped = True
        self._waiting.unpark_all()
        if self.later is not None:
            self.later.wake_all()

    async def next_tick(self) -> None:
        if not self._stopped:
            await self._waiting.park()


class _Unresponsive(Exception):
    """The client answered neither traffic nor a ping in time."""


class _Frames:
    """Frames from a stream: reads only when the decoder has no complete frame left."""

    def __init__(self, stream: trio.SSLStream[LeanSocketStream], decoder: FrameDecoder):
        self._stream = stream
        self._decoder = decoder

    def buffered(self) -> bytes | None:
        """The next frame if it has already arrived (no waiting)."""
        return self._decoder.next_frame()

    async def next(self) -> bytes | None:
        """The next frame, or None at end of stream; raises ProtocolError (fatal)."""
        while (frame := self._decoder.next_frame()) is None:
            data = await self._stream.receive_some(RECEIVE_BYTES)
            if not data:
                return None
            self._decoder.feed(data)
        return frame


def _format_address(address: tuple[str, int] | tuple[str, int, int, int]) -> str:
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
