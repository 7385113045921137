"""The coordinator's side: the server process, the generator processes, measured spans.

:class:`BenchServer` runs ``python -m securechat server --config …`` in its
own session (it dies with the coordinator: ``PR_SET_PDEATHSIG``), with its
log in a file, and reads its CPU and memory from /proc; as a cluster
(``cluster_workers``: ``--workers N`` on a private Redis,
:class:`~benchmarks.cluster.RedisProcess`) its CPU is the supervisor's, every
worker's (its children, found afresh at each reading) and Redis's.
:class:`Worker` is one generator process (:mod:`benchmarks.loadgen`) spoken to
over a pipe. :class:`Span` snapshots the CPU time of the server, of every
generator and of the machine, at the start and at the end of what is measured.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import multiprocessing
import multiprocessing.connection
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from . import loadgen
from .cluster import RedisError, RedisProcess
from .machine import (
    MachineTimes,
    cpu_seconds,
    memory_kib,
    run_delay_seconds,
    tree_cpu_seconds,
)

START_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0
_LISTENING = re.compile(r"\[SEARCHING\] listening on 127\.0\.0\.1:(\d+)")
_WORKERS_READY = re.compile(
    r"securechat\.supervisor\[\d+\]: \d+ workers ready on 127\.0\.0\.1:(\d+) \(pids ([\d, ]+)\)"
)


class BenchError(Exception):
    """The benchmark could not run (the server did not start, a generator crashed, …)."""


# --- the config file ------------------------------------------------------------------


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    return json.dumps(str(value))  # a JSON string is a valid TOML basic string


def write_toml(path: Path, data: dict[str, dict[str, Any]]) -> None:
    """Tables of scalars, and tables of tables (``[users.NAME]``)."""
    lines: list[str] = []
    for name, table in data.items():
        scalars = {key: value for key, value in table.items() if not isinstance(value, dict)}
        nested = {key: value for key, value in table.items() if isinstance(value, dict)}
        if scalars or not nested:
            lines.append(f"[{name}]")
            lines.extend(f"{key} = {_toml_value(value)}" for key, value in scalars.items())
        for key, values in nested.items():
            lines.append(f"[{name}.{key}]")
            lines.extend(f"{item} = {_toml_value(value)}" for item, value in values.items())
    path.write_text("\n".join(lines) + "\n")


# Limits raised so that the benchmark measures the server, not its abuse
# defences: no rate limit, no caps, no pings, room for deep queues.
BENCH_LIMITS: dict[str, Any] = {
    "handshake_timeout": 120.0,
    "login_timeout": 120.0,
    "idle_timeout": 3600.0,
    "ping_timeout": 3600.0,
    "max_connections": 100_000,
    "max_connections_per_ip": 100_000,
    "messages_per_second": 1e9,
    "message_burst": 1_000_000_000,
    "requests_per_second": 1e9,
    "request_burst": 1_000_000_000,
    "login_failures_allowed": 1_000_000,
    "max_outbound_queue": 1_000_000,
    "max_outbound_bytes": 1 << 30,
}


# --- the server -----------------------------------------------------------------------


def _die_with_parent() -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class BenchServer:
    """A securechat server process with its own config, database and log.

    ``limits`` is the config's [limits] table (:data:`BENCH_LIMITS` unless
    given; ``{}`` for the server's defaults), ``rooms`` its [rooms.NAME]
    tables, and ``code`` a directory holding another copy of the
    ``securechat`` package to run instead of this checkout's (an older commit
    in a ``git worktree``, to compare).

    ``cluster_workers`` > 0 makes it ``securechat server --workers N`` with a
    ``[cluster]`` section on a private Redis in ``directory/redis``, started
    before the server and stopped after it (SIGKILLed instead with
    ``crash_redis_at_stop``, to check what it had fsynced). ``cluster.*``
    overrides apply to such a server only: they would turn a one-process server
    into a cluster node.
    """

    def __init__(
        self,
        directory: Path,
        pki: Path,
        users: dict[str, str | None],
        *,
        overrides: dict[str, dict[str, Any]] | None = None,
        limits: dict[str, Any] | None = None,
        rooms: dict[str, dict[str, Any]] | None = None,
        code: Path | None = None,
        cluster_workers: int = 0,
    ) -> None:
        self.directory = directory
        self.code = code
        self.cluster_workers = cluster_workers
        directory.mkdir(parents=True, exist_ok=True)
        self.config = directory / "server.toml"
        self.database = directory / "securechat.db"
        self.log_path = directory / "server.log"
        data: dict[str, dict[str, Any]] = {
            "server": {
                "host": "127.0.0.1",
                "port": 0,
                "cert": str(pki / "server.crt"),
                "key": str(pki / "server.key"),
                "ca": str(pki / "ca.crt"),
                "client_certs": "optional",
            },
            "limits": dict(BENCH_LIMITS if limits is None else limits),
            "storage": {"path": str(self.database)},
        }
        for section, values in (overrides or {}).items():
            if section != "cluster":
                data.setdefault(section, {}).update(values)
        self.settings = effective_settings(data)
        self.cluster_settings: dict[str, Any] = {}
        self.redis: RedisProcess | None = None
        if cluster_workers:
            self.cluster_settings = dict((overrides or {}).get("cluster", {}))
            self.redis = RedisProcess(directory / "redis")
            self.settings["cluster"] = {
                "workers": cluster_workers,
                **self.cluster_settings,
                "redis": "redis-server --save '' --appendonly yes --appendfsync always",
            }
        data["users"] = {
            name: ({"password_hash": phc} if phc else {}) for name, phc in users.items()
        }
        if rooms:
            data["rooms"] = rooms
        self._data = data  # written at start: [cluster] needs Redis's port
        self.process: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.worker_pids: list[int] = []
        self.crash_redis_at_stop = False
        self.stopped: dict[str, Any] = {}

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self) -> None:
        data = dict(self._data)
        command = [sys.executable, "-m", "securechat", "server", "--config", str(self.config)]
        if self.redis is not None:
            try:
                self.redis.start()
                self.settings["cluster"]["redis_version"] = self.redis.version()
            except RedisError as exc:
                raise BenchError(str(exc)) from None
            data["cluster"] = {"redis_url": self.redis.url, **self.cluster_settings}
            command += ["--workers", str(self.cluster_workers)]
        write_toml(self.config, data)
        self.config.chmod(0o600)  # it holds password hashes: the server warns otherwise
        environment = None
        if self.code is not None:
            # Ahead of the editable install of this checkout (and `-m` puts the
            # working directory first on the path: that too).
            environment = {**os.environ, "PYTHONPATH": str(self.code)}
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(  # noqa: S603 (our own interpreter and arguments)
                command,
                cwd=self.code,
                env=environment,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,  # Ctrl-C reaches the coordinator only; it stops us
                preexec_fn=_die_with_parent,  # the coordinator has no threads
            )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.redis is None:
                found = _LISTENING.search(self.log())
            else:  # every worker listens: the supervisor says so once
                found = _WORKERS_READY.search(self.log())
            if found:
                self.port = int(found[1])
                if self.redis is not None:
                    self.worker_pids = [int(pid) for pid in found[2].split(", ")]
                return
            if self.process.poll() is not None:
                raise BenchError(f"the server exited with {self.process.returncode}: {self.tail()}")
            time.sleep(0.05)
        raise BenchError(f"the server did not listen within {START_TIMEOUT:.0f} s: {self.tail()}")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def tail(self, lines: int = 5) -> str:
        return " | ".join(self.log().strip().splitlines()[-lines:])

    def cpu(self) -> float:
        """CPU seconds so far: the server process's, or as a cluster the sum of
        :meth:`cpu_by_process`."""
        if self.redis is None:
            return cpu_seconds(self.pid)
        return sum(self.cpu_by_process().values())

    def cpu_by_process(self) -> dict[str, float]:
        """CPU seconds so far of each process: ``server`` (one process), or ``supervisor``
        (with the workers it has reaped: a restarted worker's earlier life), ``worker PID``
        for each live worker (its children now, not the pids it started with) and
        ``redis``."""
        if self.redis is None:
            return {"server": cpu_seconds(self.pid)}
        tree = tree_cpu_seconds(self.pid)
        found = {"supervisor": tree.pop(self.pid, 0.0)}
        found.update({f"worker {pid}": seconds for pid, seconds in sorted(tree.items())})
        found["redis"] = self.redis.cpu()
        return found

    def pids(self) -> list[int]:
        """The server's processes now: the one, or the supervisor, its workers and Redis."""
        if self.redis is None:
            return [self.pid]
        return [*tree_cpu_seconds(self.pid), *([self.redis.pid] if self.redis.alive() else [])]

    def memory(self) -> dict[str, int]:
        """VmRSS, VmHWM and VmSize in KiB: the server process's, or as a cluster summed
        over the supervisor, its workers and Redis."""
        if self.redis is None:
            return memory_kib(self.pid)
        total: Counter[str] = Counter()
        for pid in self.pids():
            with contextlib.suppress(OSError):
                total.update(memory_kib(pid))
        return dict(total)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> dict[str, Any]:
        """SIGTERM (the server's clean shutdown), SIGKILL if it takes too long; what happened.
        A cluster's Redis is stopped after the server, however that went."""
        try:
            return self._stop_server()
        finally:
            if self.redis is not None and self.redis.process is not None:
                if self.crash_redis_at_stop:
                    self.redis.kill()
                else:
                    self.redis.stop()
                self.stopped["redis_stopped_by"] = (
                    "SIGKILL" if self.crash_redis_at_stop else "SIGTERM"
                )

    def _stop_server(self) -> dict[str, Any]:
        process = self.process
        if process is None or self.stopped:
            return self.stopped
        started = time.monotonic()
        crashed = process.poll() is not None
        if not crashed:
            process.send_signal(signal.SIGTERM)
        try:
            code = process.wait(STOP_TIMEOUT)
            killed = False
        except subprocess.TimeoutExpired:
            process.kill()
            code = process.wait()
            killed = True
        self.stopped = {
            "exit_code": code,
            "exited_before_stop": crashed,
            "stop_s": round(time.monotonic() - started, 2),
            "killed": killed,
            **summarise_log(self.log()),
        }
        return self.stopped


def effective_settings(data: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The server's [server] and [limits] settings, defaults included, as the server sees them."""
    from pydantic import ValidationError

    from securechat.config import LimitsSection, ServerSection, describe_errors

    try:
        server = ServerSection.model_validate(data["server"])
        limits = LimitsSection.model_validate(data["limits"])
    except ValidationError as exc:
        raise BenchError(f"bad server setting: {describe_errors(exc)}") from None
    return {
        "server": server.model_dump(mode="json", exclude={"cert", "key", "ca", "port"}),
        "limits": limits.model_dump(mode="json"),
    }


_VARIABLE = re.compile(r"\s(peer|user|reason|connections|from_ip)=\S+")


def summarise_log(text: str) -> dict[str, Any]:
    """Log lines per level, and the most frequent warnings and errors (variable parts cut)."""
    levels: Counter[str] = Counter()
    problems: Counter[str] = Counter()
    for line in text.splitlines():
        parts = line.split(" ", 3)
        if len(parts) < 4 or not parts[0][:1].isdigit():
            if line.strip():
                problems[line.strip()[:120]] += 1  # tracebacks and stray output
            continue
        level = parts[1]
        levels[level] += 1
        if level in ("WARNING", "ERROR", "CRITICAL"):
            problems[_VARIABLE.sub("", parts[3])[:120]] += 1
    return {
        "log_lines": dict(levels),
        "log_problems": dict(problems.most_common(6)),
    }


# --- generator processes ------------------------------------------------------------


class Worker:
    """One generator process (``target``: :func:`loadgen.main` unless given) and the
    pipe to it."""

    def __init__(
        self,
        context: Any,
        setup: loadgen.Setup,
        target: Callable[[multiprocessing.connection.Connection, loadgen.Setup], None] = (
            loadgen.main
        ),
    ) -> None:
        self.name = setup.name
        self.pipe, child = context.Pipe()
        self.process: multiprocessing.process.BaseProcess = context.Process(
            target=target, args=(child, setup), name=setup.name, daemon=True
        )
        self.process.start()
        child.close()

    @property
    def pid(self) -> int:
        pid = self.process.pid
        assert pid is not None
        return pid

    def send(self, *command: Any) -> None:
        self.pipe.send(command)

    def expect(self, kind: str, timeout: float) -> tuple[Any, ...]:
        if not self.pipe.poll(timeout):
            raise BenchError(f"{self.name}: no {kind!r} within {timeout:.0f} s")
        return self.check(self.pipe.recv(), kind)

    def check(self, reply: tuple[Any, ...], kind: str) -> tuple[Any, ...]:
        if reply[0] == "crashed":
            raise BenchError(f"{self.name} crashed:\n{reply[1]}")
        if reply[0] != kind:
            raise BenchError(f"{self.name}: expected {kind!r}, got {reply[0]!r}")
        return reply

    def stop(self) -> None:
        try:
            if self.process.is_alive():
                self.send("close")
                self.process.join(5)
        except (OSError, EOFError, BrokenPipeError):
            pass
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(2)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(2)
        self.pipe.close()


def gather(workers: Sequence[Worker], kind: str, timeout: float) -> list[tuple[Any, ...]]:
    """The next ``kind`` reply of every worker (in worker order), within ``timeout`` overall."""
    replies: dict[int, tuple[Any, ...]] = {}
    deadline = time.monotonic() + timeout
    by_pipe = {id(worker.pipe): index for index, worker in enumerate(workers)}
    waiting = [worker.pipe for worker in workers]
    while waiting:
        left = deadline - time.monotonic()
        if left <= 0:
            names = ", ".join(workers[by_pipe[id(pipe)]].name for pipe in waiting)
            raise BenchError(f"no {kind!r} from {names} within {timeout:.0f} s")
        for ready in multiprocessing.connection.wait(waiting, left):
            assert isinstance(ready, multiprocessing.connection.Connection)
            index = by_pipe[id(ready)]
            try:
                reply = ready.recv()
            except EOFError:
                raise BenchError(f"{workers[index].name} exited") from None
            replies[index] = workers[index].check(reply, kind)
            waiting.remove(ready)
    return [replies[index] for index in range(len(workers))]


def spawn_context() -> Any:
    # spawn, not fork: a generator must not inherit the other generators' pipes
    # (it would never see EOF when the coordinator goes away).
    return multiprocessing.get_context("spawn")


# --- measured spans -----------------------------------------------------------------


class Measured(Protocol):
    """What a span reads of a server: :class:`BenchServer`, or the peer's
    (:class:`~benchmarks.ngircd.NgircdServer`)."""

    def cpu_by_process(self) -> dict[str, float]: ...

    def pids(self) -> list[int]: ...


@dataclass
class Span:
    """CPU of the server, the generators and the machine over one measured stretch.

    ``server_cpu_s`` is the whole server's: for a cluster the supervisor, every
    worker and Redis, found afresh at each reading (a restarted worker is counted:
    the supervisor's figure includes the workers it reaped). A cluster's figures
    also give the split: ``node_cpu_s`` (supervisor and workers) and
    ``redis_cpu_s``, ``redis_cpu_share`` (cores, like every ``*_share``),
    ``redis_fraction`` (Redis's part of ``server_cpu_s``) and ``processes`` (each
    process's CPU seconds over the span).

    ``server_runqueue_wait_share`` is how long the server's threads were ready to run
    but waited for a CPU (cores' worth, from schedstat): high when the machine's cores
    are all busy, which shows as latency rather than as CPU.
    """

    server: Measured
    workers: Sequence[Worker]
    started: float = field(init=False)
    server_cpu: dict[str, float] = field(init=False)
    server_wait: dict[int, float] = field(init=False)
    worker_cpu: float = field(init=False)
    machine: MachineTimes = field(init=False)
    figures: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.machine = MachineTimes.read()
        self.server_cpu = self.server.cpu_by_process()
        self.server_wait = self._server_wait()
        self.worker_cpu = self._workers_cpu()
        self.started = time.monotonic()

    def _server_wait(self) -> dict[int, float]:
        return {pid: run_delay_seconds(pid) for pid in self.server.pids()}

    def _workers_cpu(self) -> float:
        return sum(cpu_seconds(worker.pid) for worker in self.workers)

    def finish(self) -> dict[str, Any]:
        wall = time.monotonic() - self.started
        processes = span_cpu(self.server_cpu, self.server.cpu_by_process())
        server = sum(processes.values())
        waited = sum(
            max(0.0, value - self.server_wait.get(pid, 0.0))
            for pid, value in self._server_wait().items()
        )
        generators = self._workers_cpu() - self.worker_cpu
        machine = MachineTimes.read().share_since(self.machine)
        cpus = os.cpu_count() or 1

        def share(seconds: float) -> float:
            return round(seconds / wall, 3) if wall else 0.0

        self.figures = {
            "span_s": round(wall, 3),
            "server_cpu_s": round(server, 3),
            "server_cpu_share": share(server),
            "server_runqueue_wait_share": share(waited),
            "generator_cpu_s": round(generators, 3),
            "generator_cpu_share": share(generators),
            **machine,
            # Cores' worth of CPU used by everything else on the machine (noise).
            "other_cpu_share": round(
                max(0.0, machine["machine_busy_share"] * cpus - (server + generators) / wall), 3
            )
            if wall
            else 0.0,
        }
        if "redis" in processes:
            redis = processes["redis"]
            self.figures.update(
                {
                    "node_cpu_s": round(server - redis, 3),
                    "node_cpu_share": share(server - redis),
                    "redis_cpu_s": round(redis, 3),
                    "redis_cpu_share": share(redis),
                    "redis_fraction": round(redis / server, 3) if server else 0.0,
                    "processes": {name: round(value, 3) for name, value in processes.items()},
                }
            )
        return self.figures


def span_cpu(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Each process's CPU seconds between two :meth:`BenchServer.cpu_by_process` readings.

    A process that appeared meanwhile counts from zero. A worker that exited and was
    reaped meanwhile is in the supervisor's second reading with its whole life (see
    :func:`~benchmarks.machine.tree_cpu_seconds`), so what it had used before the
    span comes off the supervisor's figure: the sum is the tree's CPU over the span.
    """
    spans = {name: value - before.get(name, 0.0) for name, value in after.items()}
    if "supervisor" in spans:
        reaped = [name for name in before if name.startswith("worker ") and name not in after]
        spans["supervisor"] -= sum(before[name] for name in reaped)
    return {name: max(0.0, value) for name, value in spans.items()}
