"""Shared fixtures: a real PKI, a real config and real servers on ephemeral ports.

Nothing here is mocked: certificates come from ``securechat.certs``,
passwords are real Argon2id hashes, servers listen on 127.0.0.1 with TLS,
and clients are :class:`securechat.client.ChatConnection` over real sockets.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trio
from pydantic import SecretStr

from securechat import certs, tls
from securechat.auth import hash_password
from securechat.client import ChatConnection
from securechat.config import Config, parse_config
from securechat.server import ChatServer

# Test-only passwords for throwaway users; never used outside the test suite.
PASSWORDS = {"alice": "alice-test-password", "bob": "bob-test-password", "dave": "dave-pw-1234"}
CERT_USERS = ("alice", "bob", "carol")  # carol has a certificate and no password
WAIT = 10.0  # upper bound for anything a test waits on; passing tests never get near it


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
    return {name: hash_password(password) for name, password in PASSWORDS.items()}


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
            **server,
        },
        "users": users,
        "client": {"ca": str(pki.ca)},
    }


ConfigFactory = Callable[..., Config]


@pytest.fixture
def make_config(pki: Pki, password_hashes: dict[str, str], tmp_path: Path) -> ConfigFactory:
    """``make_config(client_certs="required", limits={...})``: a validated Config."""

    def factory(*, limits: dict[str, Any] | None = None, **server: Any) -> Config:
        data = config_data(pki, password_hashes, **server)
        if limits:
            data["limits"] = limits
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


T = TypeVar("T")


async def receive_type(connection: ChatConnection, kind: type[T]) -> T:
    """The next envelope of type ``kind``, skipping others; fails after WAIT seconds."""
    with trio.fail_after(WAIT):
        while True:
            envelope = await connection.receive()
            assert envelope is not None, f"connection closed while waiting for {kind.__name__}"
            if isinstance(envelope, kind):
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
