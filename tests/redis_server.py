"""A private ``redis-server`` for one test: a free loopback port, the test's own directory.

Never the machine's Redis service: each :class:`RedisServer` is a process of its own,
durable by default (``appendonly yes``, ``appendfsync always``, no RDB snapshots),
stopped however the test ends (SIGTERM, then SIGKILL after a bounded wait). A test can
crash it (:meth:`RedisServer.kill`, SIGKILL) and start it again on the same port and
directory (:meth:`RedisServer.restart`), where it reloads its append-only file.

Settings go to a config file in that directory rather than the command line, so that a
``requirepass`` never shows in ``ps``.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path

import trio

from . import conftest  # for WAIT; conftest imports this module for its fixture

HOST = "127.0.0.1"
BASE_SETTINGS: dict[str, str] = {
    "bind": HOST,
    "save": '""',
    "appendonly": "yes",
    "appendfsync": "always",
    "daemonize": "no",
    "logfile": '""',  # stdout, which goes to redis.log in the directory
    # A replica's first sync starts at once (the default waits 5 s for more replicas).
    "repl-diskless-sync-delay": "0",
}
PORT_ATTEMPTS = 5  # a freshly freed port taken by someone else before redis binds it


class RedisServerError(Exception):
    """The private redis-server did not come up; the message carries its log's tail."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        port: int = probe.getsockname()[1]
        return port


async def answers_ping(port: int, password: str | None = None) -> bool:
    """Whether a Redis on ``port`` answers PING now (not refusing, not still loading its AOF)."""
    try:
        stream = await trio.open_tcp_stream(HOST, port)
    except OSError:
        return False
    async with stream:
        try:
            if password is not None:
                await stream.send_all(_command("AUTH", password))
                if not (await _reply_line(stream)).startswith(b"+OK"):
                    return False
            await stream.send_all(_command("PING"))
            return (await _reply_line(stream)).startswith(b"+PONG")
        except (OSError, trio.BrokenResourceError):
            return False


async def serving_pid(port: int, password: str | None = None) -> int | None:
    """The process id of the Redis serving on ``port`` once it is ready (None: not yet,
    or refusing, or still loading its AOF)."""
    try:
        stream = await trio.open_tcp_stream(HOST, port)
    except OSError:
        return None
    async with stream:
        try:
            if password is not None:
                await stream.send_all(_command("AUTH", password))
                if not (await _reply_line(stream)).startswith(b"+OK"):
                    return None
            await stream.send_all(_command("INFO", "server"))
            reply = await _reply_line(stream)
            if not reply.startswith(b"$"):
                return None  # -LOADING, -NOAUTH, ...
            header, _, body = reply.partition(b"\r\n")
            size = int(header[1:])
            while len(body) < size:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    return None
                body += chunk
        except (OSError, trio.BrokenResourceError):
            return None
    for line in body.decode(errors="replace").splitlines():
        if line.startswith("process_id:"):
            return int(line.partition(":")[2])
    return None


def _command(*words: str) -> bytes:
    encoded = [word.encode() for word in words]
    parts = [b"*%d\r\n" % len(encoded)]
    parts.extend(b"$%d\r\n%s\r\n" % (len(word), word) for word in encoded)
    return b"".join(parts)


async def _reply_line(stream: trio.SocketStream) -> bytes:
    received = b""
    while b"\r\n" not in received:
        chunk = await stream.receive_some(4096)
        if not chunk:
            break
        received += chunk
    return received


class RedisServer:
    """One private redis-server process (see the module docstring)."""

    def __init__(self, directory: Path, settings: Mapping[str, str] | None = None) -> None:
        executable = shutil.which("redis-server")
        if executable is None:
            raise RedisServerError("redis-server is not installed (`make test` installs it)")
        self.executable = executable
        self.directory = directory
        self.settings = {**BASE_SETTINGS, **(settings or {})}
        self.port = 0
        self.process: trio.Process | None = None
        self._log_file = directory / "redis.log"
        self._config_file = directory / "redis.conf"
        self._log_start = 0  # where the current process's output begins in redis.log

    @property
    def host(self) -> str:
        return HOST

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    @property
    def password(self) -> str | None:
        return self.settings.get("requirepass")

    def log(self) -> str:
        """What the current (or last) process wrote."""
        try:
            with self._log_file.open("rb") as log:
                log.seek(self._log_start)
                return log.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    async def start(self) -> None:
        """Start on a free port (a new one for each attempt when another process took it)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        for attempt in range(PORT_ATTEMPTS):
            self.port = free_port()
            if await self._launch():
                return
            if not self._port_taken() or attempt == PORT_ATTEMPTS - 1:
                raise RedisServerError(f"redis-server did not start: {self._log_tail()}")

    async def restart(self) -> None:
        """Start again on the same port and directory (stopping it first if it runs)."""
        await self.stop()
        with trio.fail_after(conftest.WAIT):
            # The port is ours; another process can only hold it for a moment.
            while not await self._launch():
                if not self._port_taken():
                    raise RedisServerError(f"redis-server did not restart: {self._log_tail()}")
                await trio.sleep(0.05)

    async def kill(self) -> None:
        """SIGKILL: a crash, with no chance to flush anything."""
        if self.process is not None and self.process.returncode is None:
            self.process.send_signal(signal.SIGKILL)
        await self._reap()

    async def stop(self) -> None:
        """SIGTERM, then SIGKILL if it has not exited within WAIT seconds."""
        if self.process is not None and self.process.returncode is None:
            self.process.terminate()
            with trio.move_on_after(conftest.WAIT):
                await self.process.wait()
            if self.process.returncode is None:
                self.process.kill()
        await self._reap()

    async def _reap(self) -> None:
        if self.process is not None:
            with trio.CancelScope(shield=True):
                await self.process.wait()
            self.process = None

    async def _launch(self) -> bool:
        """Start the process and wait until it is ready: True, or False if it exited."""
        settings = {**self.settings, "port": str(self.port), "dir": str(self.directory)}
        lines = [f"{key} {value}" for key, value in settings.items()]
        self._config_file.write_text("\n".join(lines) + "\n")
        self._config_file.chmod(0o600)
        with self._log_file.open("ab") as log:
            self._log_start = log.tell()
            self.process = await trio.lowlevel.open_process(
                [self.executable, str(self._config_file)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            with trio.fail_after(conftest.WAIT):
                # Our process, not another Redis that holds the port our process is
                # about to fail to bind.
                while await serving_pid(self.port, self.password) != self.process.pid:
                    if self.process.poll() is not None:
                        await self._reap()
                        return False
                    await trio.sleep(0.01)
        except BaseException:
            await self.kill()
            raise
        return True

    def _port_taken(self) -> bool:
        return "Address already in use" in self.log()

    def _log_tail(self) -> str:
        return " | ".join(self.log().strip().splitlines()[-5:]) or "(no output)"


@asynccontextmanager
async def redis_server(
    directory: Path, settings: Mapping[str, str] | None = None
) -> AsyncIterator[RedisServer]:
    """A started :class:`RedisServer` in ``directory``, stopped at exit however the block ends."""
    server = RedisServer(directory, settings)
    try:
        await server.start()
        yield server
    finally:
        with trio.CancelScope(shield=True):
            await server.stop()
