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

import logging
import resource

import trio

from . import __version__, tls
from .auth import Account, Authenticator, AuthFailed
from .certs import CertError, common_name
from .config import Config
from .hub import DeferredWakeups, Hub, Member, Outbox
from .limits import ConnectionCounter, LoginThrottle, TokenBucket, Verdict, address_key
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
    Welcome,
    Who,
    encode,
    parse_client_frame,
    request_id,
)
from .store import Store
from .transport import LeanSocketStream

log = logging.getLogger("securechat.server")

RECEIVE_BYTES = 65536
# After the reader stops (bye, EOF, fatal error), how long the writer may
# take to flush what is queued before the connection is dropped.
FLUSH_TIMEOUT = 5.0
SERVER_NAME = f"securechat/{__version__}"


def raise_open_file_limit() -> None:
    """Allow as many sockets as the hard limit does: every connection is a file descriptor."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


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
        self.store = Store(config.storage.path)
        self.hub = Hub(
            self.store,
            users=config.users,
            rooms=config.room_settings(),
            allow_room_create=settings.allow_room_create,
            max_rooms=settings.max_rooms,
        )
        self.addresses: list[tuple[str, int]] = []
        self._listeners: list[trio.SocketListener] = []
        self._connections: set[_Connection] = set()
        self._counter = ConnectionCounter(
            config.limits.max_connections, config.limits.max_connections_per_ip
        )
        self._buckets: dict[str, TokenBucket] = {}
        self._limited: set[str] = set()  # users whose flood has been logged
        self._shutdown = trio.Event()

    def request_shutdown(self) -> None:
        self._shutdown.set()

    def reload(self, config: Config) -> None:
        """Apply a re-read config file: users, passwords, rooms and certificate files.

        Other server settings need a restart. New TLS settings apply to new
        connections; connected clients are not disturbed.
        """
        settings = self.config.server
        if config.server != settings or config.limits != self.limits:
            # (Also when the server was started with flags that override the file.)
            log.warning(
                "the file's [server] and [limits] differ from the running settings;"
                " those sections are read at start only"
            )
        try:
            self.ssl_context = tls.server_context(
                settings.cert, settings.key, settings.ca, settings.client_certs
            )
        except CertError as exc:
            log.error("certificates not reloaded, keeping the current ones: %s", exc)
        removed = set(self.config.users) - set(config.users)
        self.config = self.config.model_copy(update={"users": config.users, "rooms": config.rooms})
        self.authenticator.accounts = config.accounts()
        self.hub.users = set(config.users)
        self.hub.configure_rooms(config.room_settings())
        for username in sorted(removed):
            self.hub.disconnect_user(
                username, Error(code=ErrorCode.KICKED, message="your account was removed")
            )
        log.info(
            "config reloaded: users=%d removed=%s", len(config.users), ",".join(removed) or "-"
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
                await storage.start(self.store.run_writer)
                if self.ticker is not None:
                    storage.start_soon(self.ticker.run)
                try:
                    await self._serve_connections(listeners, task_status)
                finally:
                    # The writer commits what is queued, then ends.
                    self.store.close()
                    if self.ticker is not None:
                        self.ticker.stop()
        finally:
            self.store.close_database()
        log.info("server stopped")

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
                # EMFILE/ENFILE/ENOBUFS: out of descriptors or memory for now;
                # keep serving those already connected and retry shortly.
                log.warning("accept failed: %s", exc.strerror or exc)
                await trio.sleep(0.1)
                continue
            nursery.start_soon(self._handle, stream)

    def check_rate(self, username: str) -> Verdict:
        """Spend one of ``username``'s message tokens; raises rate_limited when there is none."""
        bucket = self._buckets.get(username)
        now = trio.current_time()
        if bucket is None:
            limits = self.limits
            bucket = self._buckets[username] = TokenBucket(
                limits.messages_per_second, limits.message_burst, now
            )
        verdict, retry_after = bucket.take(now)
        if verdict is Verdict.ACCEPT:
            self._limited.discard(username)
        elif verdict is Verdict.REJECT:
            if username not in self._limited:
                self._limited.add(username)
                log.warning("rate limited user=%s", username)
            raise ProtocolError(
                ErrorCode.RATE_LIMITED,
                f"too many messages; try again in {retry_after:.1f} s",
                retry_after=round(retry_after, 3),
            )
        return verdict

    async def _handle(self, tcp_stream: trio.SocketStream) -> None:
        host, port = tcp_stream.socket.getpeername()[:2]
        with self._counter.hold(address_key(host)) as allowed:
            await self._handle_counted(tcp_stream, _format_address((host, port)), host, allowed)

    async def _handle_counted(
        self, tcp_stream: trio.SocketStream, peer: str, host: str, allowed: bool
    ) -> None:
        stream = trio.SSLStream(LeanSocketStream(tcp_stream), self.ssl_context, server_side=True)
        connection: _Connection | None = None
        graceful = (
            False  # only a stream that finished its handshake and every write can say goodbye
        )
        try:
            try:
                with trio.fail_after(self.limits.handshake_timeout):
                    await stream.do_handshake()
            except trio.TooSlowError:
                log.warning("handshake timeout peer=%s", peer)
                return
            except trio.BrokenResourceError as exc:
                log.warning("handshake failed peer=%s reason=%s", peer, tls.failure_reason(exc))
                return
            if not allowed:
                log.warning(
                    "server busy peer=%s connections=%d from_ip=%d",
                    peer,
                    self._counter.total,
                    self._counter.count(address_key(host)),
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
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the peer went away
        except Exception:
            log.exception("connection failed peer=%s", peer)
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
        piece = 16 * 1024
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
            while (frame := await self._next_frame(frames)) is not None:
                try:
                    envelope = parse_client_frame(frame)
                except ProtocolError as exc:
                    self.send(exc.to_envelope())
                    continue
                try:
                    if not await self._dispatch(member, envelope):
                        return
                except ProtocolError as exc:
                    exc.ref = request_id(envelope)
                    self.send(exc.to_envelope())
        except _Unresponsive:
            user = self.member.username if self.member else "-"
            log.warning("unresponsive peer disconnected user=%s peer=%s", user, self.peer)
            self.send(Error(code=ErrorCode.TIMEOUT, message="no answer to ping"))
        except ProtocolError as exc:  # from the decoder: always fatal
            log.warning("protocol error peer=%s code=%s", self.peer, exc.code)
            self.send(exc.to_envelope())
        except trio.BrokenResourceError:
            pass  # the peer left without close_notify: an ordinary disconnect

    async def _next_frame(self, frames: _Frames) -> bytes | None:
        """The next frame; pings the client after a silence and gives up if it stays silent."""
        limits = self.server.limits
        if (frame := frames.buffered()) is not None:
            return frame  # already here: no deadline needed
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
            log.warning("auth failed user=%s peer=%s reason=%s", hello.username, self.peer, exc)
            self.send(
                Error(
                    code=ErrorCode.AUTH_FAILED,
                    message="invalid username, password or certificate",
                    ref=hello.id,
                )
            )
            return None
        log.info(
            "login user=%s peer=%s method=%s admin=%s",
            hello.username,
            self.peer,
            "certificate" if cert_user == hello.username and hello.password is None else "password",
            account.admin,
        )
        return hello, account

    async def _attach(self, hello: Hello, account: Account) -> Member:
        member = self.member = Member(
            hello.username,
            self.outbox,
            admin=account.admin,
            disconnect=lambda error: self.finish(encode(error)),
        )
        hub = self.server.hub
        rooms = await hub.login(member)
        self.send(Welcome(username=hello.username, rooms=rooms, server=SERVER_NAME, ref=hello.id))
        await hub.deliver_stored(member)
        return member

    async def _dispatch(self, member: Member, envelope: ClientEnvelope) -> bool:
        """Act on one envelope; False when the connection should close.

        Refusals are raised as ProtocolError and answered by the caller.
        """
        hub = self.server.hub
        if isinstance(envelope, Pong):
            return True  # any frame proves the client alive; nothing else to do
        ref = envelope.id
        if (
            isinstance(envelope, Say | Dm | Join)
            and self.server.check_rate(member.username) is Verdict.DISCONNECT
        ):
            log.warning("flood disconnected user=%s peer=%s", member.username, self.peer)
            self.send(Error(code=ErrorCode.RATE_LIMITED, message="flooding: disconnected", ref=ref))
            return False
        if isinstance(envelope, Say):
            await hub.say(member, envelope.room, envelope.text, ref)
        elif isinstance(envelope, Dm):
            await hub.dm(member, envelope.to, envelope.text, ref)
        elif isinstance(envelope, Join):
            await hub.join(member, envelope.room, ref)
        elif isinstance(envelope, Leave):
            await hub.leave(member, envelope.room, ref)
        elif isinstance(envelope, Who):
            self.send(hub.who(member, envelope.room, ref))
        elif isinstance(envelope, Rooms):
            self.send(hub.room_list(member.username, ref))
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
        elif isinstance(envelope, Bye):
            return False
        else:
            raise ProtocolError(ErrorCode.BAD_ENVELOPE, "already logged in")
        return True


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
