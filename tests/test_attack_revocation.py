"""A reload takes rights away at once, including from logins in flight.

The review's attack: with one password worker, 30 logins of a user were in
flight when the config was reloaded without that user; all 30 were
welcomed and most could still talk a second later. Here the reload happens
while the password checks are held in flight, and every outcome is checked:
no connection authenticated under the old config keeps a right the new one
does not give.
"""

from __future__ import annotations

from typing import Any

import pytest
import trio
from pydantic import SecretStr

from securechat.client import ChatConnection, ClientError
from securechat.config import Config
from securechat.passwords import hash_password
from securechat.protocol import Error, ErrorCode, Kick, Message, Say, Welcome

from .conftest import (
    PASSWORDS,
    ConfigFactory,
    RunningServer,
    StartServer,
    receive_closed,
    receive_type,
)
from .test_hardening import wait_until


async def held_logins(
    server: RunningServer, username: str, count: int, nursery: trio.Nursery
) -> list[Any]:
    """Start ``count`` password logins; return once they all wait on the password check.

    Each slot of the list becomes a Welcome'd ChatConnection or the login's error.
    """
    outcomes: list[Any] = [None] * count

    async def login(n: int) -> None:
        connection = await server.open()
        try:
            await connection.login(username, SecretStr(PASSWORDS[username]))
        except ClientError as exc:
            outcomes[n] = exc
        else:
            outcomes[n] = connection

    limiter = server.server.authenticator.limiter
    await limiter.acquire()  # hold every password check until the reload is done
    for n in range(count):
        nursery.start_soon(login, n)
    await wait_until(lambda: limiter.statistics().tasks_waiting == count)
    return outcomes


def without(config: Config, username: str) -> Config:
    users = {name: user for name, user in config.users.items() if name != username}
    return config.model_copy(update={"users": users})


async def test_logins_in_flight_when_a_user_is_removed_all_fail(
    start_server: StartServer,
) -> None:
    server = await start_server(
        limits={"auth_workers": 1, "max_connections_per_ip": 1000, "login_failures_allowed": 100}
    )
    alice = await server.login("alice", cert_user="alice")
    async with trio.open_nursery() as nursery:
        outcomes = await held_logins(server, "dave", 30, nursery)
        server.server.reload(without(server.server.config, "dave"))
        server.server.authenticator.limiter.release()
    assert all(isinstance(outcome, ClientError) for outcome in outcomes), outcomes
    assert "dave" not in server.server.hub.online_users()
    # Nothing said as dave reached anyone.
    await alice.send(Say(room="lobby", text="after the reload", id="after"))
    assert (await _message(alice)).text == "after the reload"


async def _message(connection: ChatConnection) -> Message:
    return await receive_type(connection, Message)


async def test_a_removed_users_connections_and_certificate_logins_end(
    start_server: StartServer,
) -> None:
    server = await start_server()
    bob = await server.login("bob", cert_user="bob")
    server.server.reload(without(server.server.config, "bob"))
    received = await receive_closed(bob)
    assert [(e.code, e.message) for e in received if isinstance(e, Error)] == [
        (ErrorCode.KICKED, "your account was removed")
    ]
    again = await server.open("bob")
    with pytest.raises(ClientError, match="auth_failed"):
        await again.login("bob", None)


async def test_a_changed_password_ends_the_sessions_opened_with_the_old_one(
    start_server: StartServer, make_config: ConfigFactory
) -> None:
    server = await start_server(
        limits={"auth_workers": 1, "max_connections_per_ip": 1000, "login_failures_allowed": 100}
    )
    dave = await server.login("dave")
    config = server.server.config
    users = dict(config.users)
    users["dave"] = users["dave"].model_copy(
        update={"password_hash": hash_password("dave-new-password")}
    )
    async with trio.open_nursery() as nursery:
        outcomes = await held_logins(server, "dave", 5, nursery)
        server.server.reload(config.model_copy(update={"users": users}))
        server.server.authenticator.limiter.release()
    assert all(isinstance(outcome, ClientError) for outcome in outcomes), outcomes
    received = await receive_closed(dave)
    assert [(e.code, e.message) for e in received if isinstance(e, Error)] == [
        (ErrorCode.KICKED, "your password was changed; log in again")
    ]
    fresh = await server.open()
    welcome = await fresh.login("dave", SecretStr("dave-new-password"))
    assert isinstance(welcome, Welcome)


async def test_a_revoked_admin_cannot_kick_from_an_open_session(
    start_server: StartServer,
) -> None:
    server = await start_server()
    alice = await server.login("alice", cert_user="alice")  # admin in the test config
    bob = await server.login("bob", cert_user="bob")
    config = server.server.config
    users = dict(config.users)
    users["alice"] = users["alice"].model_copy(update={"admin": False})
    server.server.reload(config.model_copy(update={"users": users}))
    await alice.send(Kick(username="bob", id="kick"))
    refused = await receive_type(alice, Error)
    assert (refused.code, refused.ref) == (ErrorCode.FORBIDDEN, "kick")
    # Bob is still there, and alice too: a change of flag needs no reconnect.
    await bob.send(Say(room="lobby", text="still here", id="s"))
    assert (await _message(alice)).text == "still here"
