"""The TLS chat server: listening, accepting, and handing each connection to a session.

This is the I/O layer around :class:`~securechat.session.Session`. It owns
the listening sockets, the guard around every connection (nothing one
connection does can stop the server or another connection), the
connection caps, the TLS handshake under its deadline, and then routes the
connection: ALPN ``securechat/1`` to a session over a
:class:`~securechat.lines.LineTransport`, ALPN ``http/1.1`` to the chat page's
:class:`~securechat.web.Site` (whose WebSocket runs a session over a
:class:`~securechat.websocket.WebSocketTransport`), and a client that offered
neither by its first bytes (:class:`ReplayStream` puts them back).
It also applies a reloaded config and runs the storage and shutdown, and
builds a cluster node's store (:func:`cluster_store`: Redis, checked for
durability). Rooms and fan-out live in :mod:`securechat.hub`, delivery in
:mod:`securechat.delivery`, envelopes in :mod:`securechat.protocol`.

Listening: :meth:`ChatServer.listen` binds as ``trio.open_tcp_listeners`` does
(``SO_REUSEADDR``, never ``SO_REUSEPORT``), so a second server on the same port
fails to start. Only a worker of ``securechat server --workers`` asks for
``reuse_port`` (:mod:`securechat.supervisor`): its workers each bind the port
with ``SO_REUSEPORT`` and the kernel spreads new connections over them.
"""

from __future__ import annotations

import enum
import errno
import logging
import resource
import socket
import time
from collections.abc import AsyncIterator, Collection, Mapping
from contextlib import asynccontextmanager
from functools import partial

import trio

from . import __version__, fast_tls, redis_link, tls
from .auth import Authenticator, LoginFailure
from .certs import CertError, common_name, server_names
from .config import ClusterSection, Config
from .delivery import Flusher, FlushTicker
from .hub import Hub, load_state
from .limits import (
    Admission,
    ConnectionCounter,
    LoginThrottle,
    Occasional,
    RateLimiter,
    address_key,
)
from .lines import RECEIVE_BYTES, LineTransport
from .metrics import MetricsEndpoint
from .protocol import ALPN_PROTOCOL, Error, ErrorCode, encode
from .redis_store import RedisStore
from .session import ServerStats, Services, Session, UserRates
from .shared_limits import LimitSharing
from .sqlite_store import SqliteStore
from .store import Change, LoginFailures, Retention, Spent, Store, StoreError
from .transport import LeanSocketStream
from .web import Site, StaticFiles, default_origins
from .websocket import WebSocketTransport

log = logging.getLogger("securechat.server")

SERVER_NAME = f"securechat/{__version__}"
# accept() errors that mean "out of a resource for now" (trio.serve_listeners's list).
ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
ACCEPT_RETRY_DELAY = 0.1
LISTEN_BACKLOG = 0xFFFF  # as trio's default: the kernel caps it at net.core.somaxconn


def bind_tcp(host: str, port: int, *, reuse_port: bool) -> list[socket.socket]:
    """Bound, not yet listening, TCP sockets on every address ``host`` resolves to, set
    as ``trio.open_tcp_listeners`` sets its own (``SO_REUSEADDR``; ``IPV6_V6ONLY``), and
    with ``SO_REUSEPORT`` if ``reuse_port``. Port 0: one free port, the same on every
    address. Raises OSError (``socket.gaierror`` for a host that does not resolve)."""
    found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    bound: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in found:
            try:
                sock = socket.socket(family, kind, proto)
            except OSError as exc:
                if exc.errno == errno.EAFNOSUPPORT:  # as trio: skip what the host lacks
                    continue
                raise
            bound.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if port == 0 and len(bound) > 1:
                address = (address[0], bound[0].getsockname()[1], *address[2:])
            sock.bind(address)
    except BaseException:
        for sock in bound:
            sock.close()
        raise
    if not bound:
        raise OSError(errno.EAFNOSUPPORT, f"no address of {host!r} can be used here")
    return bound


@asynccontextmanager
async def cluster_store(
    section: ClusterSection, environ: Mapping[str, str] | None = None
) -> AsyncIterator[RedisStore]:
    """A cluster node's store: Redis reached and its durability checked against
    ``[cluster] durability``. Two clients, entered here so that they outlive the store's
    tasks: one for writes and reads, one for the log's blocking reads only.

    Raises :class:`~securechat.redis_link.ClusterError` (one line naming Redis as
    ``host:port``) and :class:`~securechat.config.ConfigError` (a password both in the
    URL and in the environment); exceptions of the block come out as themselves.
    """
    async with (
        redis_link.connect(section, environ) as client,
        redis_link.connect(section, environ) as tail,
    ):
        await redis_link.check_durability(client, section)
        yield RedisStore(
            client,
            tail,
            presence_ttl=section.presence_ttl,
            wait_replicas=section.replicas if section.durability == "replicated" else 0,
        )


def raise_open_file_limit() -> None:
    """Allow as many sockets as the hard limit does: every connection is a file descriptor."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class ChatServer:
    """Listens, accepts, and runs every connection until :meth:`request_shutdown`."""

    def __init__(
        self, config: Config, *, store: Store | None = None, worker: int | None = None
    ) -> None:
        """``store``: where the chat's state lives; default, the SQLite database of
        ``[storage]`` (a cluster node passes its :class:`~securechat.redis_store.RedisStore`,
        from :func:`cluster_store`). ``worker``: this server's number (from 1) among the
        workers of ``securechat server --workers`` (its metrics port follows from it)."""
        self.config = config
        self.worker = worker
        self.limits = config.limits
        interval = config.server.flush_interval_ms / 1000
        delay = config.server.presence_delay_ms / 1000
        longest = config.server.flush_interval_max_ms / 1000
        self.ticker = FlushTicker(interval, delay, longest) if interval else None
        settings = config.server
        # [server] tls_fast_path, when this trio has what it reads (else one log line).
        self._tls_fast_path = settings.tls_fast_path and fast_tls.AVAILABLE
        if settings.tls_fast_path and not fast_tls.AVAILABLE:
            log.warning(
                "tls_fast_path is on but unavailable with trio %s (tested: %s): %s;"
                " writing with SSLStream.send_all",
                trio.__version__,
                fast_tls.TESTED_TRIO,
                fast_tls.UNAVAILABLE,
            )
        # With the fast path, one task writes for every idle line connection.
        self.flusher = Flusher(self.ticker) if self._tls_fast_path else None
        self.ssl_context = tls.server_context(
            settings.cert, settings.key, settings.ca, settings.client_certs, http=config.web.enabled
        )
        # The chat page's files, read once; the site itself needs the bound port (serve).
        self._static = StaticFiles.load() if config.web.enabled else None
        self.site: Site | None = None
        self.authenticator = Authenticator(
            config.accounts(),
            config.server.client_certs,
            max_concurrent_checks=config.limits.auth_workers,
            throttle=LoginThrottle(
                free_failures=config.limits.login_failures_allowed,
                max_delay=config.limits.login_backoff_max,
            ),
        )
        self.store: Store = store if store is not None else SqliteStore(config.storage.path)
        storage = config.storage
        per_room = storage.retention_messages_per_room
        if config.cluster is not None:
            # Redis holds history in memory: a room's is always capped there, by
            # [cluster] history_max_per_room (or a lower [storage] cap, if one is set).
            cap = config.cluster.history_max_per_room
            per_room = min(per_room, cap) if per_room else cap
        self.retention = Retention(max_age=storage.retention_days * 86400, per_room=per_room)
        self._hub: Hub | None = None  # set up by load(), from the stored state
        self._sharing: LimitSharing | None = None  # a cluster node's shared limits
        self.addresses: list[tuple[str, int]] = []
        self._listeners: list[trio.SocketListener] = []
        self._sessions: set[Session] = set()
        # HTTP connections between requests (not WebSockets): shutdown cancels them.
        self._http_scopes: set[trio.CancelScope] = set()
        self._counter = ConnectionCounter(
            config.limits.max_connections, config.limits.max_connections_per_ip
        )
        self.stats = ServerStats()
        self.handshaking = 0  # connections in their TLS handshake
        # [metrics]: set up by listen_metrics (None: off).
        self.metrics: MetricsEndpoint | None = None
        # Lines for events that come in floods: at most one per interval, with a count.
        self._refusals = Occasional(10.0)
        self._busy = Occasional(1.0)
        self._handshake_failures = Occasional(1.0)
        self._accept_failures = Occasional(1.0)
        self.rates = UserRates(
            RateLimiter(
                message_rate=config.limits.messages_per_second,
                message_burst=config.limits.message_burst,
                request_rate=config.limits.requests_per_second,
                request_burst=config.limits.request_burst,
            )
        )
        self._shutdown = trio.Event()

    @property
    def sessions(self) -> Collection[Session]:
        """The connections past their handshake (for the metrics; do not change it)."""
        return self._sessions

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
            presence_delay=settings.presence_delay_ms / 1000,
        )
        if self.store.shared:
            self._sharing = LimitSharing(
                self.store, self.rates.limiter, self.authenticator.throttle
            )
            self.store.watch(self._changed_elsewhere)

    def _changed_elsewhere(self, change: Change) -> None:
        """What another server of the cluster changed or spent."""
        if isinstance(change, Spent | LoginFailures):
            if self._sharing is not None:
                self._sharing.apply(change)
        else:
            self.hub.changed(change)

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
            or config.cluster != self.config.cluster
            or config.web != self.config.web
            or config.metrics != self.config.metrics
        ):
            # (Also when the server was started with flags that override the file.)
            log.warning(
                "the file's [server], [limits], [storage], [cluster], [web] or [metrics] differ"
                " from the running settings; those sections are read at start only"
            )
        try:
            self.ssl_context = tls.server_context(
                settings.cert,
                settings.key,
                settings.ca,
                settings.client_certs,
                http=self.config.web.enabled,
            )
        except CertError as exc:
            log.error("certificates not reloaded, keeping the current ones: %s", exc)
        self.config = self.config.model_copy(update={"users": config.users, "rooms": config.rooms})
        changes = self.authenticator.reconfigure(config.accounts())
        accounts = self.authenticator.accounts
        self.hub.reconfigure(accounts, config.room_settings())  # lets removed users go
        for name in changes.removed:
            self.rates.forget(name)
        for name in changes.new_password:
            # Whoever logged in under the old credentials logs in again.
            self.hub.disconnect_user(
                name,
                Error(code=ErrorCode.KICKED, message="your password was changed; log in again"),
            )
        for name in changes.new_admin_flag:
            self.hub.set_admin(name, accounts[name].admin)
        log.info(
            "config reloaded: users=%d added=%s removed=%s changed=%s",
            len(accounts),
            ",".join(changes.added) or "-",
            ",".join(changes.removed) or "-",
            ",".join(changes.changed) or "-",
        )

    async def listen(self, *, reuse_port: bool = False) -> list[tuple[str, int]]:
        """Bind the listening sockets (OSError when the address is taken); returns the addresses.

        ``reuse_port``: with ``SO_REUSEPORT``, sharing the port with the other workers of a
        supervisor (see the module docstring); never for a server of its own.
        """
        settings = self.config.server
        if reuse_port:
            bound = await trio.to_thread.run_sync(
                partial(bind_tcp, settings.host, settings.port, reuse_port=True)
            )
            try:
                for sock in bound:
                    sock.listen(LISTEN_BACKLOG)
            except OSError:
                for sock in bound:
                    sock.close()
                raise
            self._listeners = [
                trio.SocketListener(trio.socket.from_stdlib_socket(sock)) for sock in bound
            ]
        else:
            self._listeners = await trio.open_tcp_listeners(settings.port, host=settings.host)
        self.addresses = [listener.socket.getsockname()[:2] for listener in self._listeners]
        return self.addresses

    def metrics_address(self) -> tuple[str, int] | None:
        """Where ``[metrics] listen`` says this server serves its metrics (None: off): the
        port as written, plus ``worker - 1`` for a worker of ``--workers`` (each worker
        its own port; port 0: each one any free port). Raises OSError beyond 65535."""
        address = self.config.metrics.address
        if address is None:
            return None
        host, port = address
        if port and self.worker is not None:
            port += self.worker - 1
            if port > 65535:
                raise OSError(
                    errno.EINVAL,
                    f"[metrics] listen: worker {self.worker}'s port would be {port}, beyond 65535",
                )
        return host, port

    async def listen_metrics(self) -> list[tuple[str, int]]:
        """Bind ``[metrics] listen`` if it is set (see :meth:`metrics_address`); returns
        the bound addresses (none when off). Raises OSError."""
        address = self.metrics_address()
        if address is None or self.metrics is not None:
            return [] if self.metrics is None else self.metrics.addresses
        metrics = MetricsEndpoint(self, worker=self.worker)
        await metrics.listen(*address)
        self.metrics = metrics
        log.info(
            "metrics on %s (plain HTTP, GET /metrics)",
            ", ".join(f"http://{_format_address(bound)}/metrics" for bound in metrics.addresses),
        )
        return metrics.addresses

    async def serve(
        self, *, task_status: trio.TaskStatus[list[tuple[str, int]]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Serve until shutdown is requested; ``task_status`` reports the bound addresses."""
        settings = self.config.server
        await self.load()
        if not self._listeners:
            await self.listen()
        await self.listen_metrics()
        listeners = self._listeners
        if self._static is not None:
            self.site = self._make_site(self._static)
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
                if self.flusher is not None:
                    storage.start_soon(self.flusher.run)
                background = trio.CancelScope()
                storage.start_soon(self._background, background)
                scrapes = trio.CancelScope()
                if self.metrics is not None:
                    await storage.start(self._serve_metrics, self.metrics, scrapes)
                try:
                    await self._serve_connections(listeners, task_status)
                finally:
                    background.cancel()
                    scrapes.cancel()
                    # The writer commits what is queued, the last callbacks run, then
                    # the store's tasks end.
                    self.store.close()
                    if self.ticker is not None:
                        self.ticker.stop()
                    if self.flusher is not None:
                        self.flusher.stop()
        finally:
            if isinstance(self.store, SqliteStore):
                self.store.close_database()
        log.info("server stopped")

    def _make_site(self, static: StaticFiles) -> Site:
        web = self.config.web
        settings = self.config.server
        if web.allowed_origins is not None:
            origins = frozenset(web.allowed_origins)
        else:
            names = [*server_names(settings.cert), settings.host]
            origins = default_origins(names, self.addresses[0][1])
        log.info(
            "chat page and WebSocket (/ws) on this port; allowed origins: %s",
            " ".join(sorted(origins)) or "none",
        )
        return Site(
            web,
            static,
            origins,
            max_frame_bytes=settings.max_frame_bytes,
            ping_interval=self.limits.idle_timeout / 2,
        )

    async def _background(self, scope: trio.CancelScope) -> None:
        """What runs beside the connections until ``scope`` is cancelled: the presence
        clock, retention, and on a cluster node the sharing of limits."""
        with scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self.hub.run_presence)
                if self.retention.enabled:
                    nursery.start_soon(self._prune_periodically)
                if self._sharing is not None:
                    nursery.start_soon(self._sharing.run)

    @staticmethod
    async def _serve_metrics(
        metrics: MetricsEndpoint,
        scope: trio.CancelScope,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        with scope:
            await metrics.serve(task_status=task_status)

    async def _prune_periodically(self) -> None:
        """Apply the retention rule now and every ``prune_interval``, until cancelled.

        A prune waits for the writer between its batches and reads in worker
        threads: the chat goes on meanwhile (see :meth:`SqliteStore.prune`).
        """
        storage = self.config.storage
        rules = []
        if storage.retention_days:
            rules.append(f"older than {storage.retention_days:g} days")
        if self.retention.per_room:
            rules.append(f"beyond the newest {self.retention.per_room} of a room")
        log.info(
            "retention: deleting messages %s, every %g s%s",
            " or ".join(rules),
            storage.prune_interval,
            ""
            if not isinstance(self.store, SqliteStore) or self.store.shrinks
            else " (this database was made without auto_vacuum: the space is reused,"
            " the file does not shrink; see config.example.toml)",
        )
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
            log.info("shutting down: %d connections", len(self._sessions))
            self.hub.begin_shutdown()
            farewell = encode(Error(code=ErrorCode.SERVER_SHUTDOWN, message="server shutting down"))
            for session in list(self._sessions):
                if not session.outbox.closed:
                    self.stats.errors[ErrorCode.SERVER_SHUTDOWN] += 1
                    self.stats.disconnects["shutdown"] += 1
                session.finish(farewell)
            for scope in list(self._http_scopes):
                scope.cancel()
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
        # Only a stream that finished its handshake and every write can say goodbye.
        graceful = False
        try:
            self.handshaking += 1
            try:
                with trio.fail_after(self.limits.handshake_timeout):
                    await stream.do_handshake()
            except trio.TooSlowError:
                self.stats.handshake_failed += 1
                self.stats.handshake_timeouts += 1
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
            finally:
                self.handshaking -= 1
            cert_user = _certificate_user(stream)
            routed = await self._route(stream, peer)
            if routed is None:
                graceful = True
                return
            channel, framing = routed
            if admission is Admission.BUSY:
                self.stats.refused_busy += 1
                self.stats.errors[ErrorCode.SERVER_BUSY] += 1
                if count := self._busy.due(trio.current_time()):
                    log.warning(
                        "server busy peer=%s connections=%d (%d refused since the last such line)",
                        peer,
                        self._counter.total,
                        count,
                    )
                if framing is _Framing.HTTP:
                    assert self.site is not None
                    graceful = await self.site.busy(channel)
                    return
                busy = Error(code=ErrorCode.SERVER_BUSY, message="too many connections; try later")
                with trio.move_on_after(self.limits.handshake_timeout) as scope:
                    await stream.send_all(encode(busy))
                graceful = not scope.cancelled_caught
                return
            log.info("[CONNECTION ESTABLISHED] %s", peer)
            if framing is _Framing.HTTP:
                assert self.site is not None
                http_scope = trio.CancelScope()

                async def run_session(transport: WebSocketTransport) -> bool:
                    # A session says goodbye itself at shutdown: not cancelled with HTTP.
                    self._http_scopes.discard(http_scope)
                    log.info("websocket peer=%s", peer)
                    clean = await self._run_session(transport)
                    if self._shutdown.is_set():
                        transport.going_away()
                    return clean

                if self._shutdown.is_set():
                    return
                self._http_scopes.add(http_scope)
                try:
                    with http_scope:
                        graceful = await self.site.serve(
                            channel,
                            peer=peer,
                            host=host,
                            certificate_user=cert_user,
                            run_session=run_session,
                        )
                finally:
                    self._http_scopes.discard(http_scope)
                return
            transport = LineTransport(
                channel,
                peer=peer,
                host=host,
                max_frame_bytes=self.config.server.max_frame_bytes,
                certificate_user=cert_user,
                # channel is the stream itself or a ReplayStream whose writes are its.
                send_all=partial(fast_tls.send_all, stream) if self._tls_fast_path else None,
            )
            direct = fast_tls.DirectWriter(stream) if self._tls_fast_path else None
            graceful = await self._run_session(transport, direct)
        finally:
            await tls.close(stream, graceful=graceful)

    async def _run_session(
        self,
        transport: LineTransport | WebSocketTransport,
        direct: fast_tls.DirectWriter | None = None,
    ) -> bool:
        """A session over ``transport`` until it ends; returns whether it ended cleanly."""
        session = Session(self._services(), transport, direct=direct)
        self._sessions.add(session)
        try:
            await session.run()
        finally:
            self._sessions.discard(session)
        return session.clean

    async def _route(
        self, stream: tls.AnyStream, peer: str
    ) -> tuple[trio.abc.Stream, _Framing] | None:
        """Which framing a connection speaks, and the stream to read it from: by ALPN, or
        (a client that offered none) by its first bytes: a request line (an upper-case
        method name) is HTTP, anything else the line protocol. None when the client left,
        or sent nothing before the login deadline (told ``timeout``, as a session does)."""
        if self.site is None:
            return stream, _Framing.LINES
        protocol = stream.selected_alpn_protocol()
        if protocol == ALPN_PROTOCOL:
            return stream, _Framing.LINES
        if protocol == tls.HTTP_ALPN:
            return stream, _Framing.HTTP
        first = b""
        with trio.move_on_after(self.limits.login_timeout) as scope:
            first = bytes(await stream.receive_some(RECEIVE_BYTES))
        if scope.cancelled_caught:
            log.warning("login timeout peer=%s", peer)
            # Counted as a session counts its own login timeout.
            self.stats.logins["none", "failed"] += 1
            self.stats.login_failures["none", LoginFailure.TIMEOUT] += 1
            self.stats.errors[ErrorCode.TIMEOUT] += 1
            timeout = Error(code=ErrorCode.TIMEOUT, message="no hello before the deadline")
            with trio.move_on_after(self.limits.handshake_timeout):
                await stream.send_all(encode(timeout))
            return None
        if not first:
            return None
        framing = _Framing.HTTP if first[:1].isupper() else _Framing.LINES
        return ReplayStream(stream, first), framing

    def _services(self) -> Services:
        return Services(
            hub=self.hub,
            authenticator=self.authenticator,
            rates=self.rates,
            limits=self.limits,
            ticker=self.ticker,
            flusher=self.flusher,
            stats=self.stats,
            name=SERVER_NAME,
        )


class _Framing(enum.Enum):
    LINES = "lines"  # the line protocol (ALPN securechat/1)
    HTTP = "http"  # the chat page and its WebSocket (ALPN http/1.1)


class ReplayStream(trio.abc.Stream):
    """``stream`` with ``first`` (bytes already read from it) put back in front."""

    def __init__(self, stream: trio.abc.Stream, first: bytes) -> None:
        self.stream = stream
        self._first = first

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._first:
            size = len(self._first) if max_bytes is None else max_bytes
            data, self._first = self._first[:size], self._first[size:]
            await trio.lowlevel.checkpoint()
            return data
        return bytes(await self.stream.receive_some(max_bytes))

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        raise NotImplementedError("TLS streams have no half-close")

    async def aclose(self) -> None:
        await self.stream.aclose()


def _certificate_user(stream: trio.SSLStream[LeanSocketStream]) -> str | None:
    """The user a verified client certificate names. Its parsed form is not kept: about
    1.5 KiB for as long as the connection lasts."""
    certificate = stream.getpeercert()
    return common_name(certificate.get("subject")) if certificate else None


def _format_address(address: tuple[str, int] | tuple[str, int, int, int]) -> str:
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
