"""``securechat server --workers N``: N worker processes of one cluster node on one port.

Owns starting the workers, restarting one that dies, passing signals on to them and
stopping them. It needs ``[cluster]`` (the CLI refuses ``--workers`` without it):
without Redis each worker would be a chat of its own.

**A worker** is ``securechat server`` itself, started with the same config file and
flags, the port the supervisor reserved (``--port``), and the internal flag
``--worker N`` (:data:`WORKER_FLAG`, not in ``--help``; N is the worker's number from 1,
the same for a worker started again), which tells it four things:

- bind its own listening socket with ``SO_REUSEPORT``, so that the kernel spreads new
  connections over the workers' sockets. Only workers set it: a server started by hand
  never does, so two of those on one port still fail with "address already in use";
- its stdin is a pipe from the supervisor: when that ends (the supervisor is gone, even
  by SIGKILL) the worker shuts down rather than run on unsupervised;
- tag its log lines with its pid (``securechat.server[1234]: ...``): the workers write
  to the supervisor's stderr (or the same ``--log-file``);
- its metrics (``[metrics] listen``, docs/metrics.md) are on the port written there
  plus N - 1: each worker serves its own (a registry is a process's), one scrape target
  each.

Every worker reads the config file itself: no setting, and no password, is on a
command line (the Redis password is in the file's URL or in
``SECURECHAT_REDIS_PASSWORD``, which the workers inherit).

**The port.** Before any worker starts, the supervisor binds the address once without
``SO_REUSEPORT`` (so a port anyone holds, another supervisor's workers included, is
refused in one line), then keeps a socket bound to it with ``SO_REUSEPORT`` and without
``SO_REUSEADDR``, never listening (:func:`reserve_port`). The kernel hands connections
to listening sockets only; meanwhile the port stays the workers': a restarted worker
always gets it back, and a server without ``SO_REUSEPORT`` cannot take it in between.
With ``port = 0`` this is how every worker gets the same free port.

**Ready.** Each worker runs in a session of its own (a terminal's Ctrl-C and hangup reach
the supervisor only, which passes them on), with ``NOTIFY_SOCKET`` naming the
supervisor's datagram socket: the ``READY=1`` a server sends systemd once it listens
tells the supervisor instead, which knows the sender by its credentials
(``SO_PASSCRED``). Once every worker is ready it logs one line and, under systemd,
sends its own ``READY=1``.

**Start and restarts.** The first worker starts alone. If it exits before it is ready
(port in use, a bad certificate, Redis unreachable or too weak) the supervisor stops,
with that worker's exit status, instead of restarting forever: the worker's error line
is above on the shared stderr. Then the others start. A worker that exits later is
started again after a back-off (:class:`Backoff`: 1 s, doubling up to 30 s, 1 s again
once a worker has lived 60 s); each restart is one log line with the exit status.

**Signals.** SIGHUP and SIGUSR1 (reload) go to every ready worker, and to one still
starting once it is ready (before that its handlers are not installed, and a SIGHUP
would kill it). A SIGHUP that finds the supervisor's terminal gone means stop, as for
one server (:func:`~securechat.service.sighup_action`). SIGTERM and SIGINT go to every
worker; the supervisor waits for them (``shutdown_grace`` plus :data:`STOP_SLACK`
seconds), SIGKILLs any left, and exits 0 if every worker stopped cleanly, 1 otherwise.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import struct
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import trio

from . import service
from .server import bind_tcp
from .service import HangupAction, ServiceError

log = logging.getLogger("securechat.supervisor")

WORKER_FLAG = "--worker"
"""Tells ``securechat server`` it is a supervisor's worker (see the module docstring)."""

FIRST_DELAY = 1.0  # seconds before restarting a worker that exited
MOST_DELAY = 30.0
HEALTHY_AFTER = 60.0  # a worker that lived this long starts the back-off again
STOP_SLACK = 20.0  # beyond shutdown_grace: the store's last writes, the process's exit
_CREDENTIALS = struct.Struct("3i")  # struct ucred: pid, uid, gid
_EARLY_READY_KEPT = 64


class StartFailed(Exception):
    """The first worker exited before it was ready; ``code`` is the exit code to give."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


class Backoff:
    """How long to wait before starting a worker again: :data:`FIRST_DELAY`, doubled at
    each exit up to :data:`MOST_DELAY`, and :data:`FIRST_DELAY` again after a worker that
    lived :data:`HEALTHY_AFTER` seconds (pure: the caller says how long it lived)."""

    def __init__(
        self,
        first: float = FIRST_DELAY,
        most: float = MOST_DELAY,
        healthy_after: float = HEALTHY_AFTER,
    ) -> None:
        self._first = first
        self._most = most
        self._healthy_after = healthy_after
        self._next = first

    def delay(self, lived: float) -> float:
        """The wait before the next start, for a worker that exited after ``lived`` seconds."""
        if lived >= self._healthy_after:
            self._next = self._first
        delay = self._next
        self._next = min(self._next * 2, self._most)
        return delay


def describe_exit(status: int) -> str:
    """``exited with status 1`` or ``was killed by SIGKILL`` (trio's negative returncodes)."""
    if status >= 0:
        return f"exited with status {status}"
    try:
        return f"was killed by {signal.Signals(-status).name}"
    except ValueError:
        return f"was killed by signal {-status}"


def reserve_port(host: str, port: int) -> list[socket.socket]:
    """Sockets holding ``host:port`` for the workers (see the module docstring); port 0
    picks a free one. Raises OSError if anyone holds the port already."""
    probe = bind_tcp(host, port, reuse_port=False)
    port = probe[0].getsockname()[1]
    for sock in probe:
        sock.close()
    held = bind_tcp(host, port, reuse_port=True)
    for sock in held:
        # SO_REUSEADDR let the bind through a previous run's TIME_WAIT connections;
        # without it now, a server binding with SO_REUSEADDR alone is refused while no
        # worker listens. (The workers get in by SO_REUSEPORT: same user.)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 0)
    return held


@dataclass
class _Worker:
    number: int
    backoff: Backoff = field(default_factory=Backoff)
    process: trio.Process | None = None
    started: float = 0.0
    ready: bool = False
    reload_pending: int | None = None  # a signal to send once it is ready
    killed: bool = False


class Supervisor:
    """Runs ``count`` workers with ``command`` until SIGTERM or SIGINT (module docstring)."""

    def __init__(
        self,
        command: Sequence[str],
        count: int,
        *,
        where: str,
        environ: Mapping[str, str],
        stop_within: float,
        had_terminal: bool,
        hangup_ignored_at_start: bool,
    ) -> None:
        self._command = list(command)
        self._workers = [_Worker(number) for number in range(1, count + 1)]
        self._where = where
        self._environ = dict(environ)
        self._stop_within = stop_within
        self._had_terminal = had_terminal
        self._hangup_ignored = hangup_ignored_at_start
        self._by_pid: dict[int, _Worker] = {}
        self._early_ready: list[int] = []  # READY=1 from a pid not registered yet
        self._first_done = trio.Event()  # the first worker is ready, or gave up
        self._changed = trio.Event()  # a worker became ready
        self._stopping = trio.Event()
        self._stop_signal: int = signal.SIGTERM
        self._failure: StartFailed | None = None
        self._unclean: list[str] = []

    async def run(self) -> int:
        """Supervise until stopped; the exit code (0: every worker stopped cleanly).
        Raises :class:`StartFailed` when the first worker cannot start."""
        notify = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        with notify:
            notify.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
            # Abstract (no file to clean up). Anyone on the host may send to it, but the
            # kernel vouches for the sender's pid, and only our workers' pids count.
            await notify.bind(f"\0securechat-supervisor-{os.getpid()}-{os.urandom(6).hex()}")
            name = notify.getsockname()
            name = name.decode() if isinstance(name, bytes) else name
            self._environ["NOTIFY_SOCKET"] = "@" + name[1:]
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._receive_notifications, notify)
                await nursery.start(self._handle_signals, nursery)
                await self._supervise()
                nursery.cancel_scope.cancel()
        if self._failure is not None:
            raise self._failure
        if self._unclean:
            log.error("not every worker stopped cleanly: %s", "; ".join(self._unclean))
            return 1
        log.info("every worker stopped")
        return 0

    async def _supervise(self) -> None:
        first, *others = self._workers
        async with trio.open_nursery() as workers:
            workers.start_soon(self._keep, first)
            await self._first_done.wait()
            if self._failure is None and not self._stopping.is_set():
                for worker in others:
                    workers.start_soon(self._keep, worker)
                workers.start_soon(self._announce_when_ready)

    async def _keep(self, worker: _Worker) -> None:
        """Run the worker, and start it again each time it exits, until the stop."""
        while not self._stopping.is_set():
            process = await self._spawn(worker)
            try:
                status = await process.wait()
            finally:
                assert process.stdin is not None
                with trio.CancelScope(shield=True):
                    await process.stdin.aclose()
            lived = trio.current_time() - worker.started
            self._by_pid.pop(process.pid, None)
            worker.process = None
            if self._stopping.is_set():
                self._note_stopped(worker, process.pid, status)
                return
            if not self._first_done.is_set():  # the first worker, never ready
                self._failure = StartFailed(
                    f"worker {worker.number} (pid {process.pid}) {describe_exit(status)} before"
                    " it was ready (its error is above): no worker runs",
                    status if status in (1, 2) else 1,
                )
                self._first_done.set()
                return
            delay = worker.backoff.delay(lived)
            log.warning(
                "worker %d (pid %d) %s after %.1f s%s; starting it again in %g s",
                worker.number,
                process.pid,
                describe_exit(status),
                lived,
                "" if worker.ready else ", before it was ready",
                delay,
            )
            with trio.move_on_after(delay):
                await self._stopping.wait()

    async def _spawn(self, worker: _Worker) -> trio.Process:
        process = await trio.lowlevel.open_process(
            [*self._command, WORKER_FLAG, str(worker.number)],
            stdin=subprocess.PIPE,  # its end tells the worker we are gone
            env=self._environ,
            start_new_session=True,  # terminal signals come through us
        )
        worker.process = process
        worker.started = trio.current_time()
        worker.ready = False
        worker.killed = False
        self._by_pid[process.pid] = worker
        log.info("worker %d starting (pid %d)", worker.number, process.pid)
        if self._stopping.is_set():  # the stop came while it was being started
            process.send_signal(self._stop_signal)
        elif process.pid in self._early_ready:
            self._early_ready.remove(process.pid)
            self._mark_ready(worker)
        return process

    def _note_stopped(self, worker: _Worker, pid: int, status: int) -> None:
        stop = self._stop_signal
        if worker.killed:
            self._unclean.append(f"worker {worker.number} (pid {pid}) had to be killed")
        elif status not in (0, -stop, 128 + stop):
            self._unclean.append(f"worker {worker.number} (pid {pid}) {describe_exit(status)}")

    async def _announce_when_ready(self) -> None:
        while not all(worker.ready for worker in self._workers):
            await self._changed.wait()
        pids = ", ".join(
            str(worker.process.pid) for worker in self._workers if worker.process is not None
        )
        log.info("%d workers ready on %s (pids %s)", len(self._workers), self._where, pids)
        try:
            service.notify_systemd(f"READY=1\nSTATUS={len(self._workers)} workers on {self._where}")
        except ServiceError as exc:
            log.warning("%s", exc)

    # -- the workers' READY=1 --

    async def _receive_notifications(self, notify: trio.socket.SocketType) -> None:
        uid = os.getuid()
        while True:
            data, ancillary, _, _ = await notify.recvmsg(4096, socket.CMSG_SPACE(_CREDENTIALS.size))
            sender: int | None = None
            for level, kind, value in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid, sender_uid, _ = _CREDENTIALS.unpack(value[: _CREDENTIALS.size])
                    sender = pid if sender_uid == uid else None
            if sender is None or b"READY=1" not in data.split(b"\n"):
                continue
            worker = self._by_pid.get(sender)
            if worker is not None:
                self._mark_ready(worker)
            elif len(self._early_ready) < _EARLY_READY_KEPT:
                self._early_ready.append(sender)

    def _mark_ready(self, worker: _Worker) -> None:
        if worker.ready or worker.process is None:
            return
        worker.ready = True
        log.info("worker %d ready (pid %d)", worker.number, worker.process.pid)
        if worker.reload_pending is not None:
            worker.process.send_signal(worker.reload_pending)
            worker.reload_pending = None
        self._first_done.set()
        self._changed.set()
        self._changed = trio.Event()

    # -- signals --

    async def _handle_signals(
        self,
        nursery: trio.Nursery,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        with trio.open_signal_receiver(
            signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1
        ) as signals:
            task_status.started()
            async for signum in signals:
                name = signal.Signals(signum).name
                if signum in (signal.SIGINT, signal.SIGTERM):
                    self._stop(signum, f"received {name}", nursery)
                    continue
                if signum == signal.SIGHUP:
                    action = service.sighup_action(
                        had_terminal=self._had_terminal,
                        terminal_now=service.has_controlling_terminal(),
                        ignored_at_start=self._hangup_ignored,
                    )
                    if action is HangupAction.SHUTDOWN:
                        self._stop(
                            signal.SIGTERM, "received SIGHUP: the terminal was closed", nursery
                        )
                        continue
                    if action is HangupAction.IGNORE:
                        log.info(
                            "received SIGHUP: the terminal was closed; started with SIGHUP"
                            " ignored (nohup), so running on"
                        )
                        continue
                self._reload(signum, name)

    def _reload(self, signum: int, name: str) -> None:
        if self._stopping.is_set():
            return
        log.info("received %s: passing it on to the workers (reload)", name)
        for worker in self._workers:
            if worker.process is None:
                continue  # waiting to start again: it will read the file then
            if worker.ready:
                worker.process.send_signal(signum)
            else:
                worker.reload_pending = signum

    def _stop(self, signum: int, why: str, nursery: trio.Nursery) -> None:
        if self._stopping.is_set():
            log.info("%s: already stopping", why)
            return
        running = [worker for worker in self._workers if worker.process is not None]
        log.info("%s: stopping %d workers", why, len(running))
        self._stop_signal = signum
        self._stopping.set()
        self._first_done.set()
        for worker in running:
            assert worker.process is not None
            worker.process.send_signal(signum)
        nursery.start_soon(self._kill_late, signal.Signals(signum).name)

    async def _kill_late(self, name: str) -> None:
        await trio.sleep(self._stop_within)
        for worker in self._workers:
            if worker.process is not None and worker.process.returncode is None:
                log.warning(
                    "worker %d (pid %d) still runs %g s after %s: killing it",
                    worker.number,
                    worker.process.pid,
                    self._stop_within,
                    name,
                )
                worker.killed = True
                worker.process.kill()
