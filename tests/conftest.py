"""Shared fixtures: a real PKI, a real config and real servers on ephemeral ports.

Nothing here is mocked: certificates come from ``securechat.certs``,
passwords are real Argon2id hashes, servers listen on 127.0.0.1 with TLS,
and clients are :class:`securechat.client.ChatConnection` over real sockets.
"""

from __future__ import annotations

import json
import os
import re
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trio
from pydantic import SecretStr

from securechat import certs, passwords, redis_link, tls
from securechat.client import ChatConnection
from securechat.config import ClusterSection, Config, parse_config
from securechat.redis_store import RedisStore
from securechat.server import ChatServer
from securechat.sqlite_store import SqliteStore
from securechat.store import Store

from .redis_server import RedisServer
from .redis_server import redis_server as private_redis_server

# Test-only passwords for throwaway users; never used outside the test suite.
PASSWORDS = {"alice": "alice-test-password", "bob": "bob-test-password", "dave": "dave-pw-1234"}
CERT_USERS = ("alice", "bob", "carol")  # carol has a certificate and no password
WAIT = 10.0  # upper bound for anything a test waits on; passing tests never get near it
LOG_TAIL = 3000  # characters of a server's log shown when a wait for a line fails


@dataclass(frozen=True)
class Pki:
    directory: Path

    @property
    def ca(self) -> Path:
        return self.directory / "ca.crt"

    def cert(self, name: str) -> Path:
        return self.directory / f"{name}.crt"

    def key(self, name: str) -> Path:
        return self.directory / f"{name}.key"


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    certs.generate(directory, clients=[*CERT_USERS, "mallory"])
    return Pki(directory)


@pytest.fixture(scope="session")
def rogue_pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """Another CA, whose certificates our server and clients must not trust."""
    directory = tmp_path_factory.mktemp("rogue-pki")
    certs.generate(directory, clients=["alice"])
    return Pki(directory)


@pytest.fixture(scope="session")
def password_hashes() -> dict[str, str]:
    return {name: passwords.hash_password(password) for name, password in PASSWORDS.items()}


# `pytest --tls-stock-path` (or this variable set to 1): every test server writes with
# [server] tls_fast_path = false unless the test sets it, to run the suites both ways
# (`make test` runs the transport and hostile suites again so).
STOCK_PATH_VARIABLE = "SECURECHAT_TEST_TLS_STOCK_PATH"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--tls-stock-path",
        action="store_true",
        help="test servers use [server] tls_fast_path = false (trio's SSLStream.send_all)",
    )


def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("--tls-stock-path", default=False):
        os.environ[STOCK_PATH_VARIABLE] = "1"


def config_data(pki: Pki, password_hashes: dict[str, str], **server: Any) -> dict[str, Any]:
    users: dict[str, dict[str, Any]] = {
        name: {"password_hash": phc} for name, phc in password_hashes.items()
    }
    users["alice"]["admin"] = True
    users["carol"] = {}
    return {
        "server": {
            "host": "127.0.0.1",
            "port": 0,
            "cert": str(pki.cert("server")),
            "key": str(pki.key("server")),
            "ca": str(pki.ca),
            **({"tls_fast_path": False} if os.environ.get(STOCK_PATH_VARIABLE) == "1" else {}),
            **server,
        },
        "users": users,
        "client": {"ca": str(pki.ca)},
    }


ConfigFactory = Callable[..., Config]


@pytest.fixture
def make_config(pki: Pki, password_hashes: dict[str, str], tmp_path: Path) -> ConfigFactory:
    """``make_config(client_certs="required", limits={...}, web={...}, metrics={...})``: a
    validated Config."""

    def factory(
        *,
        limits: dict[str, Any] | None = None,
        rooms: dict[str, Any] | None = None,
        web: dict[str, Any] | None = None,
        metrics: dict[str, Any] | None = None,
        **server: Any,
    ) -> Config:
        data = config_data(pki, password_hashes, **server)
        if limits:
            data["limits"] = limits
        if web:
            data["web"] = web
        if rooms:
            data["rooms"] = rooms
        if metrics:
            data["metrics"] = metrics
        return parse_config(data, tmp_path / "test.toml")

    return factory


@dataclass
class Endpoint:
    """Where a server listens, and the clients the test opened to it (closed at teardown)."""

    host: str
    port: int
    pki: Pki
    connections: list[ChatConnection] = field(default_factory=list)

    def client_context(self, cert_user: str | None = None) -> ssl.SSLContext:
        if cert_user is None:
            return tls.client_context(self.pki.ca)
        return tls.client_context(self.pki.ca, self.pki.cert(cert_user), self.pki.key(cert_user))

    async def open(self, cert_user: str | None = None) -> ChatConnection:
        connection = await ChatConnection.open(self.host, self.port, self.client_context(cert_user))
        self.connections.append(connection)
        return connection

    async def login(
        self, username: str, *, password: str | None = None, cert_user: str | None = None
    ) -> ChatConnection:
        """A logged-in connection; without a certificate, the user's test password is used."""
        if password is None and cert_user is None:
            password = PASSWORDS[username]
        connection = await self.open(cert_user)
        await connection.login(username, SecretStr(password) if password else None)
        return connection

    async def aclose(self) -> None:
        for connection in self.connections:
            await trio.aclose_forcefully(connection.stream)


@dataclass
class RunningServer(Endpoint):
    server: ChatServer = field(kw_only=True)


StartServer = Callable[..., Awaitable[RunningServer]]

AnyStore = TypeVar("AnyStore", bound=Store)


@asynccontextmanager
async def running(store: AnyStore) -> AsyncIterator[AnyStore]:
    """``store`` with its tasks running (:meth:`Store.run`); on exit it commits what is
    queued and its tasks end, then a SqliteStore's database is closed."""
    try:
        with trio.fail_after(WAIT):
            async with trio.open_nursery() as nursery:
                await nursery.start(store.run)
                try:
                    yield store
                finally:
                    store.close()
    finally:
        if isinstance(store, SqliteStore):
            store.close_database()


@pytest.fixture
async def start_server(
    nursery: trio.Nursery, make_config: ConfigFactory, pki: Pki
) -> AsyncIterator[StartServer]:
    """``await start_server(**config overrides)``: a real server in the test's nursery."""
    running: list[RunningServer] = []

    async def start(**overrides: Any) -> RunningServer:
        server = ChatServer(make_config(**overrides))
        host, port = (await nursery.start(server.serve))[0]
        running.append(RunningServer(host, port, pki, server=server))
        return running[-1]

    yield start
    for each in running:
        await each.aclose()
        each.server.request_shutdown()


@pytest.fixture
async def server(start_server: StartServer) -> RunningServer:
    return await start_server()


@asynccontextmanager
async def redis_store(server: RedisServer, **options: Any) -> AsyncIterator[RedisStore]:
    """A RedisStore on ``server`` (its clients connected; its tasks not started);
    ``options`` for RedisStore (node, presence_ttl)."""
    section = ClusterSection.model_validate({"redis_url": server.url})
    async with redis_link.connect(section) as client, redis_link.connect(section) as tail:
        yield RedisStore(client, tail, **options)


@pytest.fixture
async def redis_server(tmp_path: Path) -> AsyncIterator[RedisServer]:
    """A private, durable redis-server (tests/redis_server.py), stopped after the test.
    For other settings: ``async with private_redis_server(tmp_path / "r", {...})``."""
    async with private_redis_server(tmp_path / "redis") as server:
        yield server


@pytest.fixture
def password_checks(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The PHC string of every Argon2id verification the server runs (a spy on the real one)."""
    calls: list[str] = []
    real = passwords.verify_password

    def spy(password: str, phc: str) -> bool:
        calls.append(phc)
        return real(password, phc)

    monkeypatch.setattr(passwords, "verify_password", spy)
    return calls


@contextmanager
def holding(limiter: trio.CapacityLimiter) -> Iterator[None]:
    """Take every password-check worker: checks already started wait, in flight, until the end."""
    borrowers = [object() for _ in range(int(limiter.total_tokens))]
    for borrower in borrowers:
        limiter.acquire_on_behalf_of_nowait(borrower)
    try:
        yield
    finally:
        for borrower in borrowers:
            limiter.release_on_behalf_of(borrower)


T = TypeVar("T")


async def piped_client(
    host: str, port: int, ca: Path, user: str, stdin: bytes | int, *, password: str | None = None
) -> subprocess.CompletedProcess[bytes]:
    """``securechat client`` as ``user`` with ``stdin`` (bytes, or a descriptor) piped in,
    without colours, the password from the environment."""
    with trio.fail_after(WAIT * 3):
        return await trio.run_process(
            [
                *(sys.executable, "-m", "securechat", "client", "--host", host),
                *("--port", str(port), "--ca", str(ca), "--user", user),
            ],
            stdin=stdin,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env={
                **os.environ,
                "NO_COLOR": "1",
                "SECURECHAT_PASSWORD": password or PASSWORDS[user],
            },
        )


async def receive_type(connection: ChatConnection, kind: type[T]) -> T:
    """The next envelope of type ``kind``, skipping others; fails after WAIT seconds."""
    with trio.fail_after(WAIT):
        while True:
            envelope = await connection.receive()
            assert envelope is not None, f"connection closed while waiting for {kind.__name__}"
            if isinstance(envelope, kind):
                return envelope


async def receive_first(connection: ChatConnection, *kinds: type[Any]) -> Any:
    """The next envelope of any of ``kinds``, skipping others; fails after WAIT seconds."""
    with trio.fail_after(WAIT):
        while True:
            envelope = await connection.receive()
            assert envelope is not None, f"connection closed while waiting for {kinds}"
            if isinstance(envelope, kinds):
                return envelope


async def receive_closed(connection: ChatConnection) -> list[Any]:
    """Everything the server still sends, until it closes the connection."""
    received: list[Any] = []
    with trio.fail_after(WAIT):
        while True:
            try:
                envelope = await connection.receive()
            except trio.BrokenResourceError:
                return received
            if envelope is None:
                return received
            received.append(envelope)


# --- config files and server processes ------------------------------------------------


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    return json.dumps(str(value))  # a JSON string is a valid TOML basic string


def write_toml(path: Path, data: dict[str, Any]) -> Path:
    """A TOML file of nested tables of scalars and lists (enough for our configs)."""
    lines: list[str] = []

    def table(name: str, values: dict[str, Any]) -> None:
        lines.append(f"[{name}]")
        nested = {key: value for key, value in values.items() if isinstance(value, dict)}
        lines.extend(
            f"{key} = {_toml_value(value)}" for key, value in values.items() if key not in nested
        )
        for key, value in nested.items():
            table(f"{name}.{key}", value)

    for name, values in data.items():
        table(name, values)
    path.write_text("\n".join(lines) + "\n")
    return path


class ServerProcess:
    """``securechat server`` running as its own process; its stderr is collected."""

    def __init__(self, process: trio.Process, pki: Pki) -> None:
        self.process = process
        self.pki = pki
        self._log = bytearray()
        self._grew = trio.Event()
        self._endpoint: Endpoint | None = None

    @property
    def endpoint(self) -> Endpoint:
        assert self._endpoint is not None, "not listening yet"
        return self._endpoint

    def log(self) -> str:
        return self._log.decode(errors="replace")

    async def collect(self, stream: trio.abc.ReceiveStream) -> None:
        while chunk := await stream.receive_some():
            self._log.extend(chunk)
            self._grew.set()
            self._grew = trio.Event()

    async def wait_for_log(
        self, pattern: str, *, since: int = 0, within: float = WAIT
    ) -> re.Match[str]:
        """Wait (at most ``within`` seconds) until ``pattern`` appears in the log (from
        the character ``since`` on: the match's positions count from there)."""
        with trio.move_on_after(within):
            while (match := re.search(pattern, self.log()[since:])) is None:
                await self._grew.wait()
            return match
        # Say what the server did say: a timeout alone tells nothing (a rare failure
        # is understood from this, or not at all).
        tail = self.log()[-LOG_TAIL:]
        raise AssertionError(
            f"{pattern!r} not in the server's log within {within} s; it ends with:\n{tail}"
        )

    async def wait(self) -> int:
        with trio.fail_after(WAIT):
            return await self.process.wait()


LISTENING = r"\[SEARCHING\] listening on 127.0.0.1:(\d+)"


@asynccontextmanager
async def server_process(
    config: Path,
    pki: Pki,
    *args: str,
    stdin: bool = False,
    ready: str = LISTENING,
    ready_within: float = WAIT,
    env: Mapping[str, str] | None = None,
) -> AsyncIterator[ServerProcess]:
    """Start ``securechat server --config CONFIG`` (port 0) and wait (``ready_within``
    seconds at most) until the log matches ``ready``, whose group 1 is the port (default:
    the server listens). ``env``: variables for the process, on top of this one's."""
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "securechat", "server", "--config", str(config), *args],
        stderr=subprocess.PIPE,
        stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
        env=None if env is None else {**os.environ, **env},
    )
    assert process.stderr is not None
    running = ServerProcess(process, pki)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(running.collect, process.stderr)
            found = await running.wait_for_log(ready, within=ready_within)
            running._endpoint = Endpoint("127.0.0.1", int(found[1]), pki)
            yield running
            if process.poll() is None:
                process.kill()
    finally:
        if running._endpoint is not None:
            await running._endpoint.aclose()
        if process.poll() is None:
            process.kill()
        with trio.move_on_after(WAIT):
            await process.wait()
        if process.stdin is not None:
            await process.stdin.aclose()
        await process.stderr.aclose()


# --- a terminal stand-in for ChatSession ---------------------------------------------------


class ScriptedConsole:
    """Lines typed by the test in; lines the session shows collected (no terminal needed)."""

    colour = False

    def __init__(self) -> None:
        self.shown: list[str] = []
        self._input_send, self._input = trio.open_memory_channel[str | None](100)
        self._changed = trio.Event()

    def type(self, line: str | None) -> None:
        """Enter ``line`` (None: end of input)."""
        self._input_send.send_nowait(line)

    async def read_line(self) -> str | None:
        return await self._input.receive()

    def show(self, text: str) -> None:
        self.shown.extend(text.splitlines())
        self._changed.set()
        self._changed = trio.Event()

    async def aclose(self) -> None:
        pass

    async def wait_for(self, predicate: Callable[[list[str]], bool]) -> list[str]:
        with trio.fail_after(WAIT):
            while not predicate(self.shown):
                await self._changed.wait()
        return self.shown
