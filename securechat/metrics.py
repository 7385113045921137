"""The Prometheus endpoint: ``GET /metrics`` over plain HTTP on ``[metrics] listen``.

Owns what an operator's Prometheus sees: every metric's name, type, labels and
meaning (docs/metrics.md is the reference), and the listener that serves them.

The numbers are read when a scrape comes, not pushed as they happen: a custom
collector (:class:`ChatCollector`) reads the counts the server's parts keep anyway
as plain numbers (:class:`~securechat.session.ServerStats`, the hub's
:class:`~securechat.hub.ChatStats`, the store's
:class:`~securechat.store.StoreStats`, :class:`~securechat.session.UserRates`) and
the live state (the sessions and their outboxes, the hub's rooms and users). So the
chat's hot path pays an addition per broadcast or per batch, and nothing for
Prometheus itself. Each :class:`MetricsEndpoint` owns its registry (never
``prometheus_client``'s global one), with the collector, the process's metrics and
the Python version; its listener runs in the server's own nursery on trio (not
``prometheus_client``'s thread-based server).

A scrape renders in the event loop, from the objects as they are at that moment
(consistent: nothing changes while the collector reads them); it costs about 2 ms
plus 1.5 us per connection of CPU (docs/metrics.md, "Cost"). The HTTP side is
:mod:`securechat.http` (request limits, deadlines): a client that is slow, silent or
hostile holds only its own task, at most :data:`MAX_CONNECTIONS` of them at once.

No label value is a user or room name: labels come from fixed sets (error codes,
login methods and failure reasons, transports, connection states, store
operations), so the number of series is bounded whatever the clients do.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterable, Iterator
from typing import Protocol

import trio
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from . import __version__
from .auth import LoginFailure
from .http import HttpConnection, HttpLimits, Request, Response, error_response
from .hub import Hub
from .limits import Occasional, RateKind
from .protocol import ErrorCode
from .session import ServerStats, Session, UserRates
from .stats import Histogram
from .store import Store

log = logging.getLogger("securechat.metrics")

# Metrics connections served at once; more are closed at once (Prometheus needs one).
MAX_CONNECTIONS = 16
# A scrape is a small request: tight limits, short deadlines.
LIMITS = HttpLimits(
    max_request_line=1024,
    max_header_bytes=8192,
    max_headers=32,
    request_timeout=5.0,
    keepalive_timeout=30.0,  # Prometheus keeps its connection between scrapes (15 s)
    max_requests=1000,
)
PATH = "/metrics"

LOGIN_METHODS = ("password", "certificate", "none")
LOGIN_RESULTS = ("ok", "failed")
DISCONNECT_REASONS = (
    "slow_consumer",
    "unresponsive",
    "flood",
    "protocol_error",
    "kicked",
    "shutdown",
)
CONNECTION_STATES = ("login", "active", "closing")
# Transports whose connection gauges are shown even at zero (others appear when used):
# the line protocol over TLS, and the WebSocket (securechat.websocket).
TRANSPORTS = ("tls", "ws")
MESSAGE_KINDS = ("room", "direct")
HISTORY_RESULTS = ("ok", "error")
REDIS_OPERATIONS = ("write", "tail", "presence", "read", "load", "prune")


class Observed(Protocol):
    """What the metrics read of a server (:class:`~securechat.server.ChatServer`)."""

    stats: ServerStats
    rates: UserRates
    store: Store
    handshaking: int  # TLS handshakes in progress

    @property
    def hub(self) -> Hub: ...

    @property
    def sessions(self) -> Collection[Session]: ...


class ChatCollector:
    """Reads the server's counts and state into metric families at each scrape."""

    def __init__(self, server: Observed, *, worker: int | None = None) -> None:
        self._server = server
        self._worker = "" if worker is None else str(worker)

    def collect(self) -> Iterator[Metric]:
        server = self._server
        stats = server.stats
        yield InfoMetricFamily(
            "securechat_server",
            "The server's version, and its worker number under --workers (else empty).",
            value={"version": __version__, "worker": self._worker},
        )
        yield from self._connections(server, stats)
        yield from self._logins(stats)
        yield from self._chat(server.hub, server.rates, stats)
        yield from self._store(server.store)

    def _connections(self, server: Observed, stats: ServerStats) -> Iterator[Metric]:
        states: dict[tuple[str, str], int] = {
            (transport, state): 0 for transport in TRANSPORTS for state in CONNECTION_STATES
        }
        queued_bytes = queued_frames = largest = 0
        # The one loop whose cost grows with the connections: kept to plain reads.
        for session in server.sessions:
            key = (session.transport.kind, session.state)
            states[key] = states.get(key, 0) + 1
            outbox = session.outbox
            size = outbox.queued_bytes
            if size:
                queued_bytes += size
                queued_frames += len(outbox)
                if size > largest:
                    largest = size
        connections = GaugeMetricFamily(
            "securechat_connections",
            "Open connections past their TLS handshake, by transport and state (login: no"
            " welcome yet; active: logged in; closing: being let go).",
            labels=["transport", "state"],
        )
        for (transport, state), count in sorted(states.items()):
            connections.add_metric([transport, state], count)
        yield connections
        yield GaugeMetricFamily(
            "securechat_tls_handshakes_in_progress",
            "Connections accepted whose TLS handshake is not done yet.",
            value=server.handshaking,
        )
        yield CounterMetricFamily(
            "securechat_connections_accepted_total",
            "TCP connections accepted.",
            value=stats.accepted,
        )
        yield _counters(
            "securechat_connections_refused_total",
            "Connections refused by a cap (per_address: max_connections_per_ip, closed at"
            " once; busy: max_connections, told server_busy).",
            "reason",
            [("per_address", stats.refused_per_address), ("busy", stats.refused_busy)],
        )
        yield _counters(
            "securechat_tls_handshake_failures_total",
            "TLS handshakes that failed (error: refused or broken; timeout: not done within"
            " handshake_timeout).",
            "reason",
            [
                ("error", stats.handshake_failed - stats.handshake_timeouts),
                ("timeout", stats.handshake_timeouts),
            ],
        )
        yield CounterMetricFamily(
            "securechat_connection_crashes_total",
            "Connections ended by an unexpected error (a bug; logged with its traceback).",
            value=stats.failed,
        )
        yield CounterMetricFamily(
            "securechat_frames_received_total",
            "Frames read from logged-in clients (requests, valid or not).",
            value=stats.frames,
        )
        reasons = (*DISCONNECT_REASONS, *sorted(set(stats.disconnects) - {*DISCONNECT_REASONS}))
        yield _counters(
            "securechat_disconnects_total",
            "Sessions the server ended, by reason (slow_consumer: its outbound queue"
            " overflowed; unresponsive: no answer to a ping; flood: far over its rate limit;"
            " protocol_error: a fatal one, e.g. a frame over the size cap; kicked: let go"
            " by a kick, a removed account or a changed password; shutdown).",
            "reason",
            [(reason, stats.disconnects[reason]) for reason in reasons],
        )
        yield GaugeMetricFamily(
            "securechat_outbound_queued_bytes",
            "Bytes queued to connections and not yet written (with the batch each writer holds).",
            value=queued_bytes,
        )
        yield GaugeMetricFamily(
            "securechat_outbound_queued_frames",
            "Frames queued to connections and not yet taken by their writers.",
            value=queued_frames,
        )
        yield GaugeMetricFamily(
            "securechat_outbound_queue_max_bytes",
            "The largest outbound queue of one connection, in bytes (max_outbound_bytes"
            " disconnects it as a slow consumer).",
            value=largest,
        )

    def _logins(self, stats: ServerStats) -> Iterator[Metric]:
        logins = CounterMetricFamily(
            "securechat_logins_total",
            "Logins decided, by method (password, certificate, none: neither offered) and result.",
            labels=["method", "result"],
        )
        for method in LOGIN_METHODS:
            for result in LOGIN_RESULTS:
                logins.add_metric([method, result], stats.logins[method, result])
        yield logins
        failures = CounterMetricFamily(
            "securechat_login_failures_total",
            "Logins refused, by method and reason (docs/metrics.md lists the reasons).",
            labels=["method", "reason"],
        )
        for (method, reason), count in sorted(stats.login_failures.items()):
            failures.add_metric([method, LoginFailure(reason).value], count)
        yield failures
        yield _counters(
            "securechat_errors_sent_total",
            "Error envelopes sent to clients, by code.",
            "code",
            [(code.value, stats.errors[code]) for code in ErrorCode],
        )

    def _chat(self, hub: Hub, rates: UserRates, stats: ServerStats) -> Iterator[Metric]:
        online = hub.online
        yield GaugeMetricFamily(
            "securechat_users_online",
            "Users with at least one logged-in connection to this server.",
            value=len(online.here()),
        )
        if hub.store.shared:
            yield GaugeMetricFamily(
                "securechat_cluster_users_online",
                "Users online on any node of the cluster, as this node knows it.",
                value=len(online.users()),
            )
        yield GaugeMetricFamily("securechat_rooms", "Rooms that exist.", value=hub.room_count())
        chat = hub.stats
        yield _counters(
            "securechat_messages_received_total",
            "Messages this server's clients sent that were handed to the store, by kind"
            " (room, direct); re-sends not included.",
            "kind",
            [(kind, chat.received[kind]) for kind in MESSAGE_KINDS],
        )
        yield CounterMetricFamily(
            "securechat_message_resends_total",
            "Re-sent messages recognised by their client id (answered, not stored again).",
            value=chat.resends,
        )
        yield _counters(
            "securechat_deliveries_total",
            "Committed messages queued to connections on this server, one per recipient"
            " connection, by kind (room, direct).",
            "kind",
            [(kind, chat.deliveries[kind]) for kind in MESSAGE_KINDS],
        )
        yield _counters(
            "securechat_rate_limited_total",
            "Requests refused with rate_limited, by the bucket they drew on (messages:"
            " say, dm, join, leave, kick, topic changes; requests: the others).",
            "kind",
            [(rate.value, rates.refused[rate]) for rate in RateKind],
        )
        yield _counters(
            "securechat_history_requests_total",
            "History requests, by result (ok: replayed to its history_end; error: refused"
            " or the store failed).",
            "result",
            [(result, chat.history[result]) for result in HISTORY_RESULTS],
        )
        yield _histogram(
            "securechat_history_duration_seconds",
            "Time from a history request to its history_end being queued (paced by how"
            " fast the client reads).",
            chat.history_seconds,
        )

    def _store(self, store: Store) -> Iterator[Metric]:
        stats = store.stats
        yield _histogram(
            "securechat_store_commit_duration_seconds",
            "Time of each group commit (SQLite: the transaction and its fsync; Redis: the"
            " batch's round trips).",
            stats.commit_seconds,
        )
        yield _histogram(
            "securechat_store_batch_size",
            "Units of writes (messages, membership and topic changes) per group commit.",
            stats.batch_units,
        )
        yield CounterMetricFamily(
            "securechat_store_commit_failures_total",
            "Group commits that failed (every write in them was answered unavailable).",
            value=stats.failed_commits,
        )
        if store.shared:
            yield _counters(
                "securechat_redis_requests_total",
                "Requests to Redis (each one round trip: a command or a pipeline), by operation.",
                "operation",
                [(operation, stats.requests[operation]) for operation in REDIS_OPERATIONS],
            )
            yield _counters(
                "securechat_redis_errors_total",
                "Requests to Redis that failed (an error reply or a lost connection), by"
                " operation.",
                "operation",
                [(operation, stats.request_errors[operation]) for operation in REDIS_OPERATIONS],
            )


def _counters(
    name: str, documentation: str, label: str, counts: Iterable[tuple[str, float]]
) -> CounterMetricFamily:
    """A counter family with one label: a sample for each (label value, count)."""
    family = CounterMetricFamily(name, documentation, labels=[label])
    for value, count in counts:
        family.add_metric([value], count)
    return family


def _histogram(name: str, documentation: str, histogram: Histogram) -> HistogramMetricFamily:
    return HistogramMetricFamily(
        name, documentation, buckets=histogram.cumulative(), sum_value=histogram.total
    )


class MetricsEndpoint:
    """The registry of one server, and the listener that serves it over HTTP."""

    def __init__(self, server: Observed, *, worker: int | None = None) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(ChatCollector(server, worker=worker))
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        self.addresses: list[tuple[str, int]] = []
        self._listeners: list[trio.SocketListener] = []
        self.connections = 0  # metrics connections open now
        self.refused = 0  # connections closed at once: MAX_CONNECTIONS were open
        self._accept_failures = Occasional(10.0)

    def render(self, accept: str | None = None) -> tuple[bytes, str]:
        """The registry's metrics now, and their content type: Prometheus's text format,
        or OpenMetrics if ``accept`` (an Accept header) asks for it."""
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type

    async def listen(self, host: str, port: int) -> list[tuple[str, int]]:
        """Bind the listening sockets (OSError if the address is taken or unknown)."""
        self._listeners = await trio.open_tcp_listeners(port, host=host)
        self.addresses = [listener.socket.getsockname()[:2] for listener in self._listeners]
        return self.addresses

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Accept and answer scrapes until cancelled (:meth:`listen` first)."""
        try:
            async with trio.open_nursery() as nursery:
                for listener in self._listeners:
                    nursery.start_soon(self._accept_loop, listener, nursery)
                task_status.started()
        finally:
            for listener in self._listeners:
                await trio.aclose_forcefully(listener)

    async def _accept_loop(self, listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:  # out of descriptors for now: the chat comes first
                if count := self._accept_failures.due(trio.current_time()):
                    log.warning("metrics: accept failed (%d times): %s", count, exc.strerror or exc)
                await trio.sleep(0.1)
                continue
            if self.connections >= MAX_CONNECTIONS:
                self.refused += 1
                await trio.aclose_forcefully(stream)
                continue
            self.connections += 1
            nursery.start_soon(self._handle, stream)

    async def _handle(self, stream: trio.SocketStream) -> None:
        """One metrics connection; whatever it does ends it alone."""
        try:
            await HttpConnection(stream, LIMITS).serve(self._answer)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass  # the client went away
        except Exception:
            log.exception("metrics connection failed")
        finally:
            self.connections -= 1
            await trio.aclose_forcefully(stream)

    async def _answer(self, request: Request) -> Response:
        if request.path != PATH:
            return error_response(404, f"not found; the metrics are at {PATH}", close=False)
        body, content_type = self.render(request.header("accept"))
        return Response(200, body, content_type=content_type)
