"""The scenarios of issue 5 (fanout, rooms, connect, idle, durable), of issue 9
(freeze, in :mod:`benchmarks.freeze`) and of issue 12 (cluster-fanout,
cluster-connect, cluster-durable).

Each scenario starts its own server (fresh database, same PKI and users),
spawns generator processes, sets up connections, synchronises (a marker
message that every receiver must see, so that login presence floods are
over), and measures one or more stretches. Every wait is bounded; a
session stops its server and its generators however it ends.

The cluster scenarios are the same code with ``cluster=True``: the server is
``securechat server --workers N`` (``--server-workers``, default 2) on a private
Redis, its CPU is the supervisor's, the workers' and Redis's (with the split),
the log says which worker took which connection, and each result carries its
ratios to the one-process result of the same run (``vs_one_process``),
measuring that first if the run does not have it yet.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import json
import secrets
import sqlite3
import sys
import time
from array import array
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from securechat import certs, passwords
from securechat.protocol import PRESENCE_LISTS
from securechat.redis_store import PREFIX as REDIS_PREFIX

from . import targets
from .cluster import RedisError, count_hash_values, logins_by_worker
from .driver import BenchError, BenchServer, Span, Worker, gather, spawn_context
from .freeze import freeze
from .loadgen import ConnSpec, Plan, Setup
from .machine import describe, git_revision
from .ngircd import NgircdServer
from .stats import latency_ms, per_second

OPEN_TIMEOUT = 180.0  # for one batch of connections to log in
SYNC_TIMEOUT = 120.0


@dataclass(frozen=True)
class Sizes:
    """How big each scenario is (the full run, or the quick one)."""

    fanout_receivers: tuple[int, ...] = (100, 1000)
    fanout_messages: tuple[int, ...] = (2000, 600)  # at full speed, per receiver count
    fanout_window: int = 20
    fanout_rate: float = 50.0
    fanout_paced_seconds: float = 10.0
    rooms: int = 10
    room_members: int = 100  # the sender included
    rooms_messages: int = 300  # per sender
    rooms_window: int = 20
    connect_certs: int = 1000
    connect_passwords: int = 200
    idle_connections: int = 10_000
    idle_users: int = 1000
    idle_pings: int = 300
    # Longer than the server's flush tick (20 ms): a ping right after another
    # one's pong would wait for the next tick, which measures the tick.
    idle_ping_interval: float = 0.025
    durable_senders: int = 10
    durable_messages: int = 2000  # per sender
    durable_window: int = 100
    pad: int = 40  # message text: "m<seq> <ns> " and this many characters
    freeze_seconds: float = 20.0  # per variant
    freeze_bystanders: int = 10
    freeze_ping_interval: float = 0.01  # one ping from the bystanders in turn
    freeze_history: int = 600  # messages in the lobby

    def users_needed(self) -> int:
        return max(
            *self.fanout_receivers,
            self.rooms * (self.room_members - 1),
            self.connect_certs,
            self.connect_passwords,
            self.idle_users,
        )


FULL = Sizes()
QUICK = Sizes(
    fanout_receivers=(20, 100),
    fanout_messages=(300, 100),
    fanout_paced_seconds=2.0,
    rooms=4,
    room_members=25,
    rooms_messages=100,
    connect_certs=100,
    connect_passwords=10,
    idle_connections=500,
    idle_users=50,
    idle_pings=100,
    durable_messages=300,
    freeze_seconds=3.0,
)


def user(index: int) -> str:
    return f"u{index:04d}"


def sender(index: int) -> str:
    return f"s{index:02d}"


PROBE = "probe"


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Bench:
    """One benchmark run: the PKI, the users, the results."""

    def __init__(
        self,
        root: Path,
        repo: Path,
        sizes: Sizes,
        *,
        quick: bool,
        workers: int,
        emit: Callable[[dict[str, Any]], None],
        overrides: dict[str, dict[str, Any]] | None = None,
        runs: int = 1,
        server_code: Path | None = None,
        server_workers: int = 2,
    ) -> None:
        self.started = time.monotonic()
        self.server_code = server_code
        # Ask for presence lists (as securechat's clients do) unless the server's code
        # predates them (``--server-code`` of an older commit refuses hello's features).
        self.presence_lists = server_code is None or PRESENCE_LISTS in (
            server_code / "securechat" / "protocol.py"
        ).read_text(encoding="utf-8")
        self.server_workers = server_workers
        self.runs = max(1, runs)
        self.overrides = overrides or {}
        self.root = root
        self.sizes = sizes
        self.quick = quick
        self.workers = workers
        self.emit = emit
        self.machine = describe(repo)
        busy = self.machine["busy_processes_at_start"]
        if busy:
            self.log(f"warning: other processes are using CPU, figures will be noisy: {busy}")
        self.context = spawn_context()
        self.password = secrets.token_urlsafe(16)
        users = [user(i) for i in range(sizes.users_needed())]
        senders = [sender(i) for i in range(max(sizes.durable_senders, sizes.rooms))]
        self.log(f"making {len(users) + len(senders) + 1} client certificates")
        self.pki = root / "pki"
        certs.generate(self.pki, clients=[*users, *senders, PROBE])
        # One Argon2id hash (about 30 ms) for everyone: the same password logs anyone in.
        phc = passwords.hash_password(self.password)
        self.users: dict[str, str | None] = dict.fromkeys([*users, *senders, PROBE], phc)
        self.records: list[dict[str, Any]] = []

    def log(self, message: str) -> None:
        elapsed = time.monotonic() - self.started
        print(f"[bench {elapsed:6.1f}s] {message}", file=sys.stderr, flush=True)

    def find(self, name: str) -> dict[str, Any] | None:
        """The result called ``name`` measured earlier in this run, if any."""
        return next((record for record in self.records if record["name"] == name), None)

    @contextmanager
    def session(
        self,
        name: str,
        *,
        receivers: int | None = None,
        senders: int = 1,
        cluster: bool = False,
        protocol: str = "securechat",
    ) -> Iterator[Session]:
        """A server and its generators; with ``protocol="irc"``, ngIRCd and IRC ones."""
        session = Session(
            self,
            name,
            self.workers if receivers is None else receivers,
            senders,
            self.server_workers if cluster else 0,
            protocol,
        )
        try:
            session.start()
            yield session
        finally:
            session.stop()
            for record in session.records:
                self.finish(record, session.server)

    def finish(self, record: dict[str, Any], server: BenchServer | NgircdServer) -> None:
        record["server"] = server.stopped
        record["server_settings"] = server.settings
        if self.quick:
            record["target_key"] = ""  # reduced sizes: not comparable with the targets
        record["targets"] = targets.evaluate(record)
        record["machine"] = self.machine
        if self.server_code is not None and isinstance(server, BenchServer):
            record["server_code"] = {
                "path": str(self.server_code),
                "revision": git_revision(self.server_code),
            }
        self.records.append(record)
        self.emit(record)

    def record(
        self, scenario: str, name: str, params: dict[str, Any], results: dict[str, Any]
    ) -> dict[str, Any]:
        return {
            "scenario": scenario,
            "name": name,
            "target_key": name,
            "quick": self.quick,
            "time": now_iso(),
            "params": params,
            "results": results,
        }


@dataclass
class Delivery:
    """What one measured stretch of sending produced."""

    arrived: list[dict[str, Any]]
    sent: list[dict[str, Any]]
    cpu: dict[str, Any]
    collected: list[dict[str, Any]]

    def latencies(self) -> array[int]:
        samples: array[int] = array("q")
        for data in self.collected:
            samples.frombytes(data["latency_ns"])
        return samples

    def ack_latencies(self) -> array[int]:
        samples: array[int] = array("q")
        for data in self.sent:
            samples.frombytes(data["ack_ns"])
        return samples

    def sender_rows(self) -> list[tuple[int, int, int, int]]:
        return [tuple(row) for data in self.sent for row in data["senders"]]

    def errors(self) -> dict[str, int]:
        total: Counter[str] = Counter()
        for data in self.collected:
            total.update(data["errors"])
        return dict(total)

    def lost_connections(self) -> dict[str, int]:
        total: Counter[str] = Counter()
        for data in self.collected:
            total.update(data["lost"])
        return dict(total)


@dataclass
class Session:
    """A server and its generators for one scenario."""

    bench: Bench
    name: str
    n_receivers: int
    n_senders: int
    cluster_workers: int = 0  # > 0: --workers N on a private Redis
    protocol: str = "securechat"  # or "irc": a private ngIRCd instead
    server: BenchServer | NgircdServer = field(init=False)
    receivers: list[Worker] = field(default_factory=list)
    senders: list[Worker] = field(default_factory=list)
    records: list[dict[str, Any]] = field(default_factory=list)
    after_stop: list[Callable[[], None]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.protocol == "irc":
            self.server = NgircdServer(
                self.bench.root / self.name, self.bench.pki, self.bench.password
            )
            return
        self.server = BenchServer(
            self.bench.root / self.name,
            self.bench.pki,
            self.bench.users,
            overrides=self.bench.overrides,
            code=self.bench.server_code,
            cluster_workers=self.cluster_workers,
        )

    @property
    def chat_server(self) -> BenchServer:
        """The server, known to be securechat's."""
        assert isinstance(self.server, BenchServer)
        return self.server

    @property
    def workers(self) -> list[Worker]:
        return [*self.receivers, *self.senders]

    def start(self) -> None:
        what = f"{self.cluster_workers} workers and Redis" if self.cluster_workers else "the server"
        if self.protocol == "irc":
            what = "ngIRCd"
        self.bench.log(f"{self.name}: starting {what}")
        self.server.start()
        if self.server.redis is not None:
            self.bench.log(
                f"{self.name}: supervisor pid {self.server.pid}, worker pids"
                f" {', '.join(map(str, self.server.worker_pids))}, redis pid"
                f" {self.server.redis.pid} (port {self.server.redis.port}); port {self.server.port}"
            )
        else:
            self.bench.log(f"{self.name}: server pid {self.server.pid} on port {self.server.port}")
        setup = Setup(
            "127.0.0.1",
            self.server.port,
            str(self.bench.pki),
            self.bench.password,
            protocol=self.protocol,
            presence_lists=self.bench.presence_lists,
        )
        context = self.bench.context
        for index in range(self.n_receivers):
            self.receivers.append(Worker(context, _named(setup, f"{self.name}-recv{index}")))
        for index in range(self.n_senders):
            self.senders.append(Worker(context, _named(setup, f"{self.name}-send{index}")))

    def stop(self) -> None:
        try:
            self.server.stop()
        finally:
            for worker in self.workers:
                worker.stop()
        for callback in self.after_stop:
            callback()

    # --- helpers for scenarios ---

    def open(
        self,
        workers: Sequence[Worker],
        specs: Sequence[ConnSpec],
        *,
        parallel: int = 100,
        timeout: float = OPEN_TIMEOUT,
        must_succeed: bool = True,
    ) -> list[tuple[str, bool, str, int, int, int, int]]:
        """Open ``specs`` spread round-robin over ``workers``; one row per connection."""
        self.prepare(workers, specs)
        for index, worker in enumerate(workers):
            worker.send("open", list(specs[index :: len(workers)]), parallel, timeout)
        rows = [row for reply in gather(workers, "opened", timeout + 30) for row in reply[1]]
        failed = Counter(row[2] for row in rows if not row[1])
        if failed and must_succeed:
            raise BenchError(
                f"{sum(failed.values())} of {len(rows)} connections failed: {dict(failed)}"
                f" (server log: {self.server.tail(3)})"
            )
        return rows

    def prepare(self, workers: Sequence[Worker], specs: Sequence[ConnSpec]) -> None:
        """Load the TLS contexts of ``specs`` in the workers that will open them."""
        for index, worker in enumerate(workers):
            worker.send("prepare", list(specs[index :: len(workers)]))
        gather(workers, "prepared", 120)

    def sync(self, label: str) -> None:
        """Every sender says a marker; return once every receiver has seen it."""
        text = f"sync-{label}"
        for worker in self.receivers:
            worker.send("marker", text, SYNC_TIMEOUT)
        gather(self.receivers, "marker_armed", 30)
        for worker in self.senders:
            worker.send("sync", text, SYNC_TIMEOUT)
        synced = gather(self.senders, "synced", SYNC_TIMEOUT + 10)
        seen = gather(self.receivers, "marker_seen", SYNC_TIMEOUT + 10)
        if not all(reply[1] for reply in synced) or any(r[1] < r[2] for r in seen):
            raise BenchError(f"{self.name}: sync {label} incomplete: {synced} {seen}")

    def quiesce(self, limit: float = 15.0) -> None:
        """Wait (bounded) until the server is nearly idle: leftovers must not be measured."""
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            before = self.server.cpu()
            time.sleep(0.3)
            if self.server.cpu() - before <= 0.02:
                return

    def deliver(self, plan: Plan, *, stall: float = 15.0) -> Delivery:
        """Run ``plan`` on every sender; receivers count ``plan.count`` messages each
        (and with ``plan.feedback`` tell the one sender process their progress)."""
        feedback = None
        if plan.feedback:
            if len(self.senders) != 1:
                raise BenchError("a feedback plan needs exactly one sender process")
            self.senders[0].send("feedback", len(self.receivers))
            feedback = self.senders[0].expect("feedback", 30)[1]
        for worker in self.receivers:
            worker.send("arm", plan.count, plan.deadline, stall, feedback)
        gather(self.receivers, "armed", 30)
        span = Span(self.server, self.workers)
        for worker in self.senders:
            worker.send("send", plan)
        arrived = [reply[1] for reply in gather(self.receivers, "arrived", plan.deadline + 30)]
        sent = [reply[1] for reply in gather(self.senders, "sent", plan.deadline + 30)]
        cpu = span.finish()
        for worker in self.workers:
            worker.send("collect")
        collected = [reply[1] for reply in gather(self.workers, "collected", 60)]
        return Delivery(arrived, sent, cpu, collected)

    def collect(self, workers: Sequence[Worker]) -> list[dict[str, Any]]:
        for worker in workers:
            worker.send("collect")
        return [reply[1] for reply in gather(workers, "collected", 60)]

    def spread(self, users: Callable[[str], bool]) -> dict[str, Any]:
        """For a cluster: how the logins of ``users`` so far fell on the workers (from the
        workers' log tags), and whether every worker has some."""
        found = logins_by_worker(self.server.log(), users)
        pids = sorted({*self.server.worker_pids, *found})
        return {
            "logins_by_worker": {str(pid): found.get(pid, 0) for pid in pids},
            "split": " / ".join(str(found.get(pid, 0)) for pid in pids),
            "every_worker_serves": all(found.get(pid, 0) > 0 for pid in self.server.worker_pids),
        }


def _named(setup: Setup, name: str) -> Setup:
    return dataclasses.replace(setup, name=name)


# --- fanout and rooms -------------------------------------------------------------------


def delivery_results(delivery: Delivery, receivers: int, messages: int) -> dict[str, Any]:
    """The figures of a stretch where every receiver should get every message."""
    expected = receivers * messages
    received = sum(data["received"] for data in delivery.arrived)
    senders = delivery.sender_rows()
    t_first = min(row[2] for row in senders)
    t_last = max(data["last_ns"] for data in delivery.arrived)
    seconds = (t_last - t_first) / 1e9 if t_last > t_first else 0.0
    cpu = delivery.cpu
    return {
        "deliveries": received,
        "expected": expected,
        "lost": expected - received,
        "duplicates_or_extra": sum(data["extra"] for data in delivery.arrived),
        "out_of_order_chunks": sum(data["disorder"] for data in delivery.arrived),
        "receivers_complete": sum(data["complete"] for data in delivery.arrived),
        "receivers_disconnected": sum(data["dead"] for data in delivery.arrived),
        "messages_sent": sum(row[0] for row in senders),
        "messages_acked": sum(row[1] for row in senders),
        "seconds": round(seconds, 3),
        "deliveries_per_s": per_second(received, seconds),
        "latency_ms": latency_ms(delivery.latencies()),
        "ack_latency_ms": latency_ms(delivery.ack_latencies(), curve=False),
        "server_cpu_us_per_delivery": round(cpu["server_cpu_s"] * 1e6 / received, 2)
        if received
        else None,
        "server_cpu_ms_per_message": round(cpu["server_cpu_s"] * 1e3 / len(senders) / messages, 3),
        "generator_cpu_us_per_delivery": round(cpu["generator_cpu_s"] * 1e6 / received, 2)
        if received
        else None,
        **cpu_split(cpu, received, 1e6, "us_per_delivery"),
        "cpu": cpu,
        "errors": delivery.errors(),
        "connections_lost": delivery.lost_connections(),
    }


def cpu_split(cpu: dict[str, Any], count: int, scale: float, unit: str) -> dict[str, Any]:
    """A cluster's server CPU per ``unit`` split into the nodes' (supervisor and workers)
    and Redis's; nothing for one process."""
    if "redis_cpu_s" not in cpu or not count:
        return {}
    return {
        f"node_cpu_{unit}": round(cpu["node_cpu_s"] * scale / count, 2),
        f"redis_cpu_{unit}": round(cpu["redis_cpu_s"] * scale / count, 2),
        "redis_fraction_of_server_cpu": cpu["redis_fraction"],
    }


def measure_runs(
    bench: Bench,
    session: Session,
    plan: Plan,
    figures: Callable[[Delivery], dict[str, Any]],
    *,
    median_of: str,
    label: str,
) -> dict[str, Any]:
    """Run ``plan`` ``bench.runs`` times; the run with the median ``median_of``, plus a
    summary of every run (``lost`` and ``errors`` are totals over all runs)."""
    runs = []
    for index in range(bench.runs):
        session.quiesce()
        bench.log(f"{label}: run {index + 1} of {bench.runs}")
        runs.append(figures(session.deliver(plan)))
    ordered = sorted(runs, key=lambda run: run.get(median_of) or 0.0)
    chosen = dict(ordered[(len(ordered) - 1) // 2])
    summary = ("deliveries_per_s", "acked_per_s", "acked", "server_cpu_us_per_delivery",
               "server_cpu_us_per_ack", "node_cpu_us_per_delivery", "redis_cpu_us_per_delivery",
               "node_cpu_us_per_ack", "redis_cpu_us_per_ack", "lost")  # fmt: skip
    chosen["runs"] = [
        {
            **{key: run[key] for key in summary if key in run},
            **{
                f"{name.removesuffix('_ms')}_p99_ms": run[name]["p99"]
                for name in ("latency_ms", "ack_latency_ms")
                if name in run
            },
            "server_cpu_share": run["cpu"]["server_cpu_share"],
            "generator_cpu_share": run["cpu"]["generator_cpu_share"],
            "other_cpu_share": run["cpu"]["other_cpu_share"],
            "server_runqueue_wait_share": run["cpu"]["server_runqueue_wait_share"],
        }
        for run in runs
    ]
    chosen["reported_run"] = f"median of {len(runs)} by {median_of}"
    if "lost" in chosen:
        chosen["lost"] = sum(run["lost"] for run in runs)
    errors: Counter[str] = Counter()
    for run in runs:
        errors.update(run.get("errors", {}))
    chosen["errors"] = dict(errors)
    return chosen


def fanout(
    bench: Bench,
    *,
    receivers: Sequence[int] | None = None,
    variants: Sequence[str] = ("full", "paced"),
    cluster: bool = False,
) -> None:
    """1 sender and N receivers in the lobby, for each N of ``receivers`` (default: the
    sizes'), at full speed and paced (``variants``); with ``cluster``, on
    ``--workers N`` + Redis, compared with the one-process results of this run."""
    sizes = bench.sizes
    largest = max(sizes.fanout_receivers)
    prefix = "cluster-" if cluster else ""
    with bench.session(f"{prefix}fanout", cluster=cluster) as session:
        bench.log(f"{prefix}fanout: sender logs in")
        session.open(session.senders, [ConnSpec(sender(0), sender=True)])
        have = 0
        for count in receivers or sizes.fanout_receivers:
            full_messages = dict(zip(sizes.fanout_receivers, sizes.fanout_messages, strict=True))[
                count
            ]
            bench.log(f"{prefix}fanout: {count - have} more receivers log in ({count} in all)")
            session.open(session.receivers, [ConnSpec(user(i)) for i in range(have, count)])
            have = count
            session.sync(f"fanout{count}")
            spread = session.spread(lambda who: who.startswith("u")) if cluster else None
            paced_messages = round(sizes.fanout_rate * sizes.fanout_paced_seconds)
            plans = {
                "full": Plan(full_messages, window=sizes.fanout_window, pad=sizes.pad),
                "paced": Plan(
                    paced_messages,
                    rate=sizes.fanout_rate,
                    pad=sizes.pad,
                    deadline=sizes.fanout_paced_seconds + 60,
                ),
            }
            for variant in variants:
                plan = plans[variant]
                results = measure_runs(
                    bench,
                    session,
                    plan,
                    functools.partial(delivery_results, receivers=count, messages=plan.count),
                    median_of="server_cpu_us_per_delivery",
                    label=(f"{prefix}fanout: {count} receivers, {plan.count} messages, {variant}"),
                )
                params = {
                    "receivers": count,
                    "senders": 1,
                    "messages": plan.count,
                    "mode": variant,
                    "window": plan.window or None,
                    "rate_per_s": plan.rate or None,
                    "room": "lobby",
                    "text_chars": len(f"m{plan.count} {time.monotonic_ns()} ") + plan.pad,
                    "generator_processes": len(session.receivers),
                    "login": "client certificate",
                    "runs": bench.runs,
                }
                name = f"fanout-{count}-{variant}"
                if cluster:
                    assert spread is not None
                    params.update(cluster_params(session))
                    results["workers"] = {
                        **spread,
                        "sender_on": session.spread(lambda who: who.startswith("s"))["split"],
                    }
                    results["vs_one_process"] = versus(
                        bench,
                        name,
                        results,
                        ("deliveries_per_s", "server_cpu_us_per_delivery", "latency_ms.p99"),
                    )
                record = bench.record(f"{prefix}fanout", prefix + name, params, results)
                record["target_key"] = prefix + name if count == largest else ""
                if cluster and bench.server_workers != 2:
                    record["target_key"] = ""  # the targets are for 2 workers
                session.records.append(record)
                _say_result(bench, record)


def cluster_params(session: Session) -> dict[str, Any]:
    """What a cluster result was measured on."""
    server = session.server
    return {
        "server": f"securechat server --workers {server.cluster_workers} + Redis",
        "server_workers": server.cluster_workers,
        "worker_pids": server.worker_pids,
        "redis": server.settings.get("cluster", {}),
    }


def versus(
    bench: Bench, peer: str, results: dict[str, Any], figures: Sequence[str]
) -> dict[str, Any]:
    """``figures`` of ``results`` divided by the same figures of the one-process result
    ``peer`` of this run (``latency_ms.p99`` becomes ``latency_ms_p99``)."""
    found = bench.find(peer)
    ratios: dict[str, Any] = {"peer": peer if found else None}
    for figure in figures:
        mine = targets.lookup(results, figure)
        theirs = targets.lookup(found["results"], figure) if found else None
        ratios[figure.replace(".", "_")] = (
            round(mine / theirs, 3)
            if isinstance(mine, int | float) and isinstance(theirs, int | float) and theirs
            else None
        )
    return ratios


def cluster_fanout(bench: Bench, variants: Sequence[str] = ("full", "paced")) -> None:
    """fanout to the most receivers (1 000) on ``--workers N`` + Redis; the one-process
    peers first if this run has not measured them."""
    receivers = max(bench.sizes.fanout_receivers)
    missing = [v for v in variants if bench.find(f"fanout-{receivers}-{v}") is None]
    if missing:
        bench.log(f"cluster-fanout: the one-process peers first ({', '.join(missing)})")
        fanout(bench, receivers=(receivers,), variants=missing)
    fanout(bench, receivers=(receivers,), variants=variants, cluster=True)


def rooms(bench: Bench) -> None:
    sizes = bench.sizes
    count, members = sizes.rooms, sizes.room_members
    with bench.session("rooms") as session:
        bench.log(f"rooms: {count} rooms x {members} members log in and join")
        specs = [
            ConnSpec(user(room * (members - 1) + index), room=f"room{room}")
            for room in range(count)
            for index in range(members - 1)
        ]
        session.open(session.receivers, specs)
        session.open(
            session.senders,
            [ConnSpec(sender(room), room=f"room{room}", sender=True) for room in range(count)],
        )
        session.sync("rooms")
        plan = Plan(sizes.rooms_messages, window=sizes.rooms_window, pad=sizes.pad)
        receivers = count * (members - 1)
        results = measure_runs(
            bench,
            session,
            plan,
            functools.partial(delivery_results, receivers=receivers, messages=plan.count),
            median_of="server_cpu_us_per_delivery",
            label=f"rooms: {count} senders x {plan.count} messages at once",
        )
        params = {
            "rooms": count,
            "members_per_room": members,
            "receivers": receivers,
            "senders": count,
            "messages_per_sender": plan.count,
            "window": plan.window,
            "generator_processes": len(session.receivers) + len(session.senders),
            "runs": bench.runs,
        }
        record = bench.record("rooms", f"rooms-{count}x{members}", params, results)
        record["target_key"] = "rooms-10x100"
        session.records.append(record)
        _say_result(bench, record)


# --- connect ----------------------------------------------------------------------------


def connect(
    bench: Bench, *, variants: Sequence[str] = ("certs", "passwords"), cluster: bool = False
) -> None:
    """N clients log in at once, with certificates and with passwords (``variants``); with
    ``cluster``, on ``--workers N`` + Redis, compared with the one-process results."""
    sizes = bench.sizes
    prefix = "cluster-" if cluster else ""
    for variant, clients, with_cert in (
        ("certs", sizes.connect_certs, True),
        ("passwords", sizes.connect_passwords, False),
    ):
        if variant not in variants:
            continue
        name = f"connect-{variant}"
        with bench.session(prefix + name, cluster=cluster) as session:
            session.quiesce()
            bench.log(f"{prefix}connect: {clients} clients log in at once with {variant}")
            specs = [ConnSpec(user(i), cert=with_cert) for i in range(clients)]
            session.prepare(session.receivers, specs)
            span = Span(session.server, session.workers)
            rows = session.open(session.receivers, specs, parallel=clients, must_succeed=False)
            cpu = span.finish()
            collected = session.collect(session.receivers)
            done = [row for row in rows if row[1]]
            failed = Counter(row[2] for row in rows if not row[1])
            seconds = (
                (max(row[6] for row in done) - min(row[3] for row in rows)) / 1e9 if done else 0.0
            )
            results = {
                "logged_in": len(done),
                "failed": sum(failed.values()),
                "failures": dict(failed),
                "seconds": round(seconds, 3),
                "logins_per_s": per_second(len(done), seconds),
                "handshake_ms": latency_ms((row[4] - row[3] for row in done), curve=True),
                "login_ms": latency_ms((row[5] - row[3] for row in done), curve=True),
                "server_cpu_ms_per_login": round(cpu["server_cpu_s"] * 1e3 / len(done), 3)
                if done
                else None,
                "generator_cpu_ms_per_login": round(cpu["generator_cpu_s"] * 1e3 / len(done), 3)
                if done
                else None,
                "presence_frames_received": sum(data["presence"] for data in collected),
                **cpu_split(cpu, len(done), 1e3, "ms_per_login"),
                "cpu": cpu,
            }
            params = {
                "clients": clients,
                "login": "client certificate" if with_cert else "password (Argon2id)",
                "users": "distinct, all in lobby",
                "all_at_once": True,
                "generator_processes": len(session.receivers),
                "auth_workers": 2,
            }
            if cluster:
                params.update(cluster_params(session))
                results["workers"] = session.spread(lambda who: who.startswith("u"))
                results["vs_one_process"] = versus(
                    bench, name, results, ("logins_per_s", "server_cpu_ms_per_login")
                )
            record = bench.record(f"{prefix}connect", prefix + name, params, results)
            if cluster and bench.server_workers != 2:
                record["target_key"] = ""  # the targets are for 2 workers
            session.records.append(record)
            _say_result(bench, record)


def cluster_connect(bench: Bench) -> None:
    """connect with certificates on ``--workers N`` + Redis; the one-process peer first if
    this run has not measured it."""
    if bench.find("connect-certs") is None:
        bench.log("cluster-connect: the one-process peer first (connect-certs)")
        connect(bench, variants=("certs",))
    connect(bench, variants=("certs",), cluster=True)


# --- idle -------------------------------------------------------------------------------


def idle(bench: Bench) -> None:
    sizes = bench.sizes
    total, users = sizes.idle_connections, sizes.idle_users
    with bench.session("idle") as session:
        session.open(session.senders, [ConnSpec(PROBE, sender=True)])
        session.quiesce()
        before = session.server.memory()
        bench.log(f"idle: {users} users log in (one connection each)")
        span = Span(session.server, session.workers)
        first = session.open(session.receivers, [ConnSpec(user(i)) for i in range(users)])
        first_cpu = span.finish()
        bench.log(f"idle: {total - users} more connections of the same users")
        span = Span(session.server, session.workers)
        rest = session.open(
            session.receivers, [ConnSpec(user(i % users)) for i in range(users, total)]
        )
        rest_cpu = span.finish()
        session.quiesce()
        after = session.server.memory()
        bench.log(f"idle: {total} idle connections; ping round trips from one more client")
        span = Span(session.server, session.workers)
        session.senders[0].send("ping", sizes.idle_pings, sizes.idle_ping_interval, 120.0)
        rtts = session.senders[0].expect("pinged", 150.0)[1]
        idle_cpu = span.finish()
        collected = session.collect(session.workers)
        connections = len(first) + len(rest)
        rest_seconds = (max(r[6] for r in rest) - min(r[3] for r in rest)) / 1e9 if rest else 0
        results = {
            "connections": connections,
            "open_at_end": sum(data["open_connections"] for data in collected) - 1,
            "rss_kib_before": before.get("VmRSS"),
            "rss_kib_after": after.get("VmRSS"),
            "rss_kib_peak": after.get("VmHWM"),
            "rss_kib_per_connection": round(
                (after.get("VmRSS", 0) - before.get("VmRSS", 0)) / connections, 1
            ),
            "ping_rtt_ms": latency_ms(rtts),
            "pings_answered": len(rtts),
            "connections_per_s": per_second(len(rest), rest_seconds),
            "server_cpu_ms_per_connection": round(
                rest_cpu["server_cpu_s"] * 1e3 / max(1, len(rest)), 3
            ),
            "first_logins_cpu": first_cpu,
            "more_connections_cpu": rest_cpu,
            "idle_cpu": idle_cpu,
            "presence_frames_received": sum(data["presence"] for data in collected),
            "connections_lost": dict(sum((Counter(data["lost"]) for data in collected), Counter())),
        }
        params = {
            "connections": total,
            "users": users,
            "connections_per_user": round(total / users, 1),
            "pings": sizes.idle_pings,
            "ping_interval_s": sizes.idle_ping_interval,
            "generator_processes": len(session.workers),
        }
        record = bench.record("idle", f"idle-{total}", params, results)
        record["target_key"] = "idle-10000"
        session.records.append(record)
        server = session.server

        def shutdown_time() -> None:
            # SIGTERM to exit with every connection open (shutdown_grace is 2 s).
            results["shutdown_s"] = server.stopped.get("stop_s")

        session.after_stop.append(shutdown_time)
        _say_result(bench, record)


# --- durable ----------------------------------------------------------------------------


def durable(bench: Bench, *, cluster: bool = False) -> None:
    """10 senders, each alone in a room, as fast as their windows allow; every ack must be
    stored after the stop. With ``cluster``, on ``--workers N`` + Redis: after the nodes
    stop, Redis is SIGKILLed (nothing flushed beyond its fsyncs) and started again from
    its append-only file to count what it kept."""
    sizes = bench.sizes
    count = sizes.durable_senders
    prefix = "cluster-" if cluster else ""
    with bench.session(f"{prefix}durable", receivers=0, cluster=cluster) as session:
        specs = [
            ConnSpec(sender(index), room=f"durable{index}", sender=True) for index in range(count)
        ]
        session.open(session.senders, specs)
        session.sync("durable")
        plan = Plan(sizes.durable_messages, window=sizes.durable_window, pad=sizes.pad)
        results = measure_runs(
            bench,
            session,
            plan,
            durable_results,
            median_of="acked_per_s",
            label=(
                f"{prefix}durable: {count} senders x {plan.count} messages, window {plan.window}"
            ),
        )
        acked_in_all_runs = sum(run["acked"] for run in results["runs"])
        params = {
            "senders": count,
            "messages_per_sender": plan.count,
            "window": plan.window,
            "rooms": "one per sender (each message is delivered once, to its sender)",
            "database": "SQLite WAL, synchronous=FULL, in the temp dir",
            "runs": bench.runs,
        }
        server = session.chat_server
        if cluster:
            params.update(cluster_params(session))
            params["database"] = (
                "Redis, appendonly yes, appendfsync always, in the temp dir; SIGKILLed after"
                " the nodes stop, then started again from its AOF to count"
            )
            results["workers"] = session.spread(lambda who: who.startswith("s"))
            results["vs_one_process"] = versus(
                bench, "durable", results, ("acked_per_s", "server_cpu_us_per_ack")
            )
            server.crash_redis_at_stop = True
        record = bench.record(f"{prefix}durable", f"{prefix}durable", params, results)
        if cluster and bench.server_workers != 2:
            record["target_key"] = ""  # the targets are for 2 workers
        session.records.append(record)

        def count_stored() -> None:
            stored = stored_in_redis(server) if cluster else stored_messages(server.database)
            results["stored_after_stop"] = stored
            results["acked_in_all_runs"] = acked_in_all_runs
            results["every_ack_stored"] = stored is not None and stored >= acked_in_all_runs

        session.after_stop.append(count_stored)
        _say_result(bench, record)


def cluster_durable(bench: Bench) -> None:
    """durable on ``--workers N`` + Redis; the one-process peer first if this run has not
    measured it."""
    if bench.find("durable") is None:
        bench.log("cluster-durable: the one-process peer first (durable)")
        durable(bench)
    durable(bench, cluster=True)


def durable_results(delivery: Delivery) -> dict[str, Any]:
    senders = delivery.sender_rows()
    acked = sum(row[1] for row in senders)
    seconds = (max(row[3] for row in senders) - min(row[2] for row in senders)) / 1e9
    cpu = delivery.cpu
    return {
        "sent": sum(row[0] for row in senders),
        "acked": acked,
        "seconds": round(seconds, 3),
        "acked_per_s": per_second(acked, seconds),
        "ack_latency_ms": latency_ms(delivery.ack_latencies()),
        "server_cpu_us_per_ack": round(cpu["server_cpu_s"] * 1e6 / acked, 2) if acked else None,
        **cpu_split(cpu, acked, 1e6, "us_per_ack"),
        "stored_after_stop": None,
        "cpu": cpu,
        "errors": delivery.errors(),
    }


def stored_messages(database: Path) -> int | None:
    """Plan messages in the database once the server has stopped (every ack must be there)."""
    try:
        with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as db:
            row = db.execute("SELECT COUNT(*) FROM messages WHERE text LIKE 'm%'").fetchone()
    except sqlite3.Error:
        return None
    return int(row[0])


def stored_in_redis(server: BenchServer) -> int | None:
    """Plan messages in a stopped cluster's Redis, started again on its directory (its
    append-only file): every ack must be there. None if it cannot be read."""
    redis = server.redis
    if redis is None:
        return None

    def planned(body: bytes) -> bool:
        return str(json.loads(body).get("text", "")).startswith("m")

    try:
        redis.start()
        try:
            return count_hash_values(redis.port, f"{REDIS_PREFIX}msg", planned)
        finally:
            redis.stop()
    except (RedisError, OSError, ValueError) as exc:
        server.stopped["redis_count_failed"] = str(exc)
        return None


def fanout_largest_full(bench: Bench) -> None:
    """The largest one-process fan-out at full speed alone (fanout-1000-full; with
    --quick, fanout-100-full): to compare a setting, e.g. [metrics] on and off."""
    fanout(bench, receivers=(max(bench.sizes.fanout_receivers),), variants=("full",))


def _say_result(bench: Bench, record: dict[str, Any]) -> None:
    figures = targets.HEADLINES.get(record["scenario"], ())[:4]
    shown = ", ".join(f"{figure}={targets.lookup(record['results'], figure)}" for figure in figures)
    bench.log(f"{record['name']}: {shown}")


def peers(bench: Bench) -> None:
    """The fan-out patterns on securechat and on ngIRCd side by side
    (:mod:`benchmarks.peers`)."""
    from .peers import peers as run  # here: it builds on this module

    run(bench)


SCENARIOS: dict[str, Callable[[Bench], None]] = {
    "fanout": fanout,
    "rooms": rooms,
    "connect": connect,
    "idle": idle,
    "durable": durable,
    "freeze": freeze,
    "cluster-fanout": cluster_fanout,
    "cluster-connect-certs": cluster_connect,
    "cluster-durable": cluster_durable,
    "peers": peers,
}
"""Everything ``python -m benchmarks`` runs by default, in this order."""

ALIASES: dict[str, Callable[[Bench], None]] = {
    "cluster-fanout-full": functools.partial(cluster_fanout, variants=("full",)),
    "cluster-fanout-paced": functools.partial(cluster_fanout, variants=("paced",)),
    "fanout-largest-full": fanout_largest_full,
    "connect-certs": functools.partial(connect, variants=("certs",)),
    "connect-passwords": functools.partial(connect, variants=("passwords",)),
}
"""Parts of a scenario that can be asked for by name (never run by default)."""

GROUPS: dict[str, tuple[str, ...]] = {
    "cluster": ("cluster-fanout", "cluster-connect-certs", "cluster-durable"),
}
"""Names that stand for several scenarios."""
