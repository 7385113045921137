"""What the cluster scenarios need beside a server: a private Redis, and the workers' logs.

:class:`RedisProcess` is Debian's ``redis-server`` started by the benchmark on a
free loopback port in a directory of its own, durable as a cluster node requires
(``--appendonly yes --appendfsync always``, no RDB snapshots). Like
:class:`~benchmarks.driver.BenchServer`'s process it runs in its own session and
dies with the coordinator (``PR_SET_PDEATHSIG``), and :meth:`RedisProcess.stop`
ends it however a scenario ends. :func:`command` speaks just enough RESP to ask it
something without an event loop (the coordinator is synchronous).

:func:`logins_by_worker` reads a ``--workers`` server's log: each worker tags its
lines with its pid (``securechat.server[PID]: login user=…``), which says where
the kernel put each connection.
"""

from __future__ import annotations

import contextlib
import ctypes
import re
import shutil
import signal
import socket
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from .machine import cpu_seconds

HOST = "127.0.0.1"
START_TIMEOUT = 30.0
STOP_TIMEOUT = 30.0
PORT_ATTEMPTS = 5  # a free port taken by someone else before redis-server binds it
REPLY_TIMEOUT = 30.0


class RedisError(Exception):
    """Redis could not be started or asked (the message says why)."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        port: int = probe.getsockname()[1]
        return port


# --- a minimal RESP client --------------------------------------------------------------

Reply = bytes | int | list["Reply"] | None


def _encode(words: tuple[str | bytes, ...]) -> bytes:
    parts = [b"*%d\r\n" % len(words)]
    for word in words:
        data = word.encode() if isinstance(word, str) else word
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


class _Reader:
    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._buffer = b""

    def _fill(self) -> None:
        chunk = self._sock.recv(1 << 16)
        if not chunk:
            raise RedisError("Redis closed the connection")
        self._buffer += chunk

    def line(self) -> bytes:
        while (end := self._buffer.find(b"\r\n")) < 0:
            self._fill()
        line, self._buffer = self._buffer[:end], self._buffer[end + 2 :]
        return line

    def exactly(self, size: int) -> bytes:
        while len(self._buffer) < size + 2:
            self._fill()
        data, self._buffer = self._buffer[:size], self._buffer[size + 2 :]
        return data

    def reply(self) -> Reply:
        line = self.line()
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest
        if kind == b"-":
            raise RedisError(rest.decode(errors="replace"))
        if kind == b":":
            return int(rest)
        if kind == b"$":
            size = int(rest)
            return None if size < 0 else self.exactly(size)
        if kind == b"*":
            count = int(rest)
            return None if count < 0 else [self.reply() for _ in range(count)]
        raise RedisError(f"unexpected reply {line[:40]!r}")


def command(port: int, *words: str | bytes, timeout: float = REPLY_TIMEOUT) -> Reply:
    """Send one command to the Redis on ``port`` and return its reply (RESP2)."""
    with socket.create_connection((HOST, port), timeout=timeout) as sock:
        sock.sendall(_encode(words))
        return _Reader(sock).reply()


def serving_pid(port: int) -> int | None:
    """The pid of the Redis answering on ``port`` (None: nothing there, or still loading)."""
    try:
        info = command(port, "INFO", "server", timeout=2.0)
    except (OSError, RedisError):
        return None
    if not isinstance(info, bytes):
        return None
    for line in info.decode(errors="replace").splitlines():
        if line.startswith("process_id:"):
            return int(line.partition(":")[2])
    return None


def answers_ping(port: int) -> bool:
    try:
        return command(port, "PING", timeout=2.0) == b"PONG"
    except (OSError, RedisError):
        return False


# --- the process ----------------------------------------------------------------------


def _die_with_parent() -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class RedisProcess:
    """A private ``redis-server`` in ``directory`` (see the module docstring).

    :meth:`start` picks a new free port each time; the data stays in the directory, so
    a Redis started again (after :meth:`stop`, or :meth:`kill` for a crash) reloads its
    append-only file.
    """

    def __init__(self, directory: Path, executable: str | None = None) -> None:
        found = executable or shutil.which("redis-server")
        if found is None:
            raise RedisError(
                "redis-server is not installed (Debian: apt-get install redis-server;"
                " `make test` and `make bench` install it)"
            )
        self.executable = found
        self.directory = directory
        self.log_path = directory / "redis.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.port = 0
        self._log_start = 0  # where the current process's output begins in the log

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        for _ in range(PORT_ATTEMPTS):
            self.port = free_port()
            if self._launch():
                return
            if "Address already in use" not in self.log():
                break
        raise RedisError(f"redis-server did not start: {self.tail()}")

    def _launch(self) -> bool:
        """Start on ``self.port`` and wait until this process answers: True, or False if
        it exited (the port was taken, or worse: see the log)."""
        with self.log_path.open("ab") as log:
            self._log_start = log.tell()
            try:
                self.process = subprocess.Popen(  # noqa: S603 (a fixed program, our arguments)
                    [
                        self.executable,
                        *("--port", str(self.port), "--bind", HOST, "--dir", str(self.directory)),
                        *("--save", "", "--appendonly", "yes", "--appendfsync", "always"),
                        *("--daemonize", "no", "--logfile", ""),
                    ],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # Ctrl-C reaches the coordinator only; it stops us
                    preexec_fn=_die_with_parent,  # the coordinator has no threads
                )
            except OSError as exc:
                raise RedisError(f"cannot run {self.executable}: {exc.strerror}") from None
        deadline = time.monotonic() + START_TIMEOUT
        try:
            # This process, not another Redis that holds the port it is about to fail on,
            # and done loading its append-only file (PING says LOADING until then).
            while serving_pid(self.port) != self.process.pid or not answers_ping(self.port):
                if self.process.poll() is not None:
                    self.process = None
                    return False
                if time.monotonic() > deadline:
                    raise RedisError(
                        f"redis-server did not answer within {START_TIMEOUT:.0f} s: {self.tail()}"
                    )
                time.sleep(0.02)
        except BaseException:
            self.kill()
            raise
        return True

    def cpu(self) -> float:
        """CPU seconds of the running Redis (0.0 when none runs)."""
        if not self.alive():
            return 0.0
        try:
            return cpu_seconds(self.pid)
        except OSError:
            return 0.0

    def command(self, *words: str | bytes) -> Reply:
        return command(self.port, *words)

    def stop(self) -> None:
        """SIGTERM (Redis syncs its AOF and exits), SIGKILL if it takes too long."""
        self._end(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL: a crash, nothing flushed beyond what Redis had fsynced."""
        self._end(signal.SIGKILL)

    def _end(self, signum: int) -> None:
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signum)
        try:
            process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def log(self) -> str:
        try:
            with self.log_path.open("rb") as log:
                log.seek(self._log_start)
                return log.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def tail(self, lines: int = 5) -> str:
        return " | ".join(self.log().strip().splitlines()[-lines:]) or "(no output)"

    def version(self) -> str:
        info = self.command("INFO", "server")
        text = info.decode(errors="replace") if isinstance(info, bytes) else ""
        for line in text.splitlines():
            if line.startswith("redis_version:"):
                return line.partition(":")[2].strip()
        return "unknown"


def count_hash_values(port: int, key: str, wanted: Callable[[bytes], bool]) -> int:
    """How many values of the hash ``key`` satisfy ``wanted`` (HSCAN, in pages)."""
    count = 0
    cursor = b"0"
    while True:
        reply = command(port, "HSCAN", key, cursor, "COUNT", "1000")
        if not isinstance(reply, list) or len(reply) != 2:
            raise RedisError(f"unexpected HSCAN reply for {key!r}")
        cursor_reply, items = reply
        if not isinstance(cursor_reply, bytes) or not isinstance(items, list):
            raise RedisError(f"unexpected HSCAN reply for {key!r}")
        values = items[1::2]
        count += sum(1 for value in values if isinstance(value, bytes) and wanted(value))
        cursor = cursor_reply
        if cursor == b"0":
            return count


# --- the workers' logs ------------------------------------------------------------------

_LOGIN = re.compile(r"securechat\.server\[(\d+)\]: login user=(\S+) ")


def logins_by_worker(log: str, users: Callable[[str], bool]) -> dict[int, int]:
    """Logins of the users ``users`` accepts, per worker pid (from the log's tags)."""
    found: Counter[int] = Counter()
    for match in _LOGIN.finditer(log):
        if users(match[2]):
            found[int(match[1])] += 1
    return dict(sorted(found.items()))
