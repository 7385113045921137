"""Password guessing against the real server over real TLS: parallel guesses and insiders.

Security review, issue 9 finding 4: guesses sent in parallel all reached the
Argon2id check before the first failure was counted, and an insider's own
successful login cleared their address's failures. The server's checks are
counted with a spy on the real ``verify_password``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import trio
from pydantic import SecretStr

from securechat.client import ChatConnection, LoginRefused
from securechat.protocol import Error, ErrorCode, Hello, ServerEnvelope, Welcome
from securechat.server import raise_open_file_limit

from .conftest import PASSWORDS, WAIT, RunningServer, StartServer, holding

raise_open_file_limit()

GUESSES = 40


async def wait_until(condition: Callable[[], bool]) -> None:
    """Poll server state that has no event to wait on, with a deadline."""
    with trio.fail_after(WAIT):
        while not condition():  # noqa: ASYNC110
            await trio.sleep(0.005)


def sequential_bound(allowed: int, elapsed: float) -> int:
    """Most checks sequential guesses get in ``elapsed`` seconds: ``allowed`` free failures,
    then one more each time a block (1 s, doubling) ends, at 1, 3, 7, 15... s."""
    return allowed + int(math.log2(elapsed + 1))


async def reply_to(connection: ChatConnection, hello: Hello) -> ServerEnvelope:
    await connection.send(hello)
    with trio.fail_after(WAIT):
        reply = await connection.receive()
    assert reply is not None, "closed without a reply"
    return reply


def refused(reply: ServerEnvelope) -> bool:
    return isinstance(reply, Error) and reply.code is ErrorCode.AUTH_FAILED


async def test_parallel_guesses_get_no_more_checks_than_sequential_ones(
    start_server: StartServer, password_checks: list[str]
) -> None:
    server = await start_server(limits={"auth_workers": 2})
    allowed = server.server.limits.login_failures_allowed
    guessers = [await server.open() for _ in range(GUESSES)]
    owner = await server.open()
    limiter = server.server.authenticator.limiter
    replies: dict[int, ServerEnvelope] = {}

    async def guess(n: int) -> None:
        hello = Hello(username="bob", password=SecretStr(f"guess number {n}"), id=f"g{n}")
        replies[n] = await reply_to(guessers[n], hello)

    async with trio.open_nursery() as nursery:
        # The worst case of the finding: every guess arrives before any check ends.
        with holding(limiter):
            for n in range(GUESSES):
                nursery.start_soon(guess, n)
            # `allowed` guesses wait for an Argon2id worker; the others wait for
            # them to be settled, unanswered and unchecked.
            await wait_until(lambda: limiter.statistics().tasks_waiting == allowed)
            # bob's own, right, password arrives behind the guesses
            right = Hello(username="bob", password=SecretStr(PASSWORDS["bob"]), id="bob")
            nursery.start_soon(owner_login, owner, right, replies)
            await trio.testing.wait_all_tasks_blocked()
            assert limiter.statistics().tasks_waiting == allowed
            assert replies == {}
            assert password_checks == []
        # The checked guesses fail, which blocks bob: everyone else is refused
        # without a check, the right password too, as if all came one by one.
    assert len(replies) == GUESSES + 1
    assert all(refused(reply) for reply in replies.values())
    assert len(password_checks) == allowed


async def owner_login(
    owner: ChatConnection, hello: Hello, replies: dict[int, ServerEnvelope]
) -> None:
    replies[-1] = await reply_to(owner, hello)


async def test_parallel_right_passwords_all_get_in(
    start_server: StartServer, password_checks: list[str]
) -> None:
    # More logins of one user at once than the failures allowed (a user's
    # devices after a restart): the ones beyond wait their turn, none is refused.
    server = await start_server(limits={"auth_workers": 1})
    allowed = server.server.limits.login_failures_allowed
    logins = [await server.open() for _ in range(3 * allowed)]
    replies: list[ServerEnvelope] = []

    async def login(connection: ChatConnection) -> None:
        hello = Hello(username="bob", password=SecretStr(PASSWORDS["bob"]), id="login")
        replies.append(await reply_to(connection, hello))

    async with trio.open_nursery() as nursery:
        for connection in logins:
            nursery.start_soon(login, connection)
    assert [type(reply) for reply in replies] == [Welcome] * len(logins)
    assert len(password_checks) == len(logins)


async def test_a_burst_of_guesses_is_checked_no_more_than_sequential_guesses(
    start_server: StartServer, password_checks: list[str]
) -> None:
    server = await start_server(limits={"auth_workers": 2})
    guessers = [await server.open() for _ in range(GUESSES)]
    replies: list[ServerEnvelope] = []

    async def guess(n: int) -> None:
        hello = Hello(username="bob", password=SecretStr(f"guess number {n}"), id=f"g{n}")
        replies.append(await reply_to(guessers[n], hello))

    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        for n in range(GUESSES):
            nursery.start_soon(guess, n)
    elapsed = trio.current_time() - start
    assert len(replies) == GUESSES
    assert all(refused(reply) for reply in replies)
    allowed = server.server.limits.login_failures_allowed
    assert allowed <= len(password_checks) <= sequential_bound(allowed, elapsed)


async def failed_guess(server: RunningServer, username: str, n: int) -> None:
    connection = await server.open()
    with pytest.raises(LoginRefused, match="auth_failed"):
        await connection.login(username, SecretStr(f"spray guess {n}"))


async def test_an_insiders_own_logins_do_not_clear_the_addresss_failures(
    start_server: StartServer, password_checks: list[str]
) -> None:
    server = await start_server()
    alice_hash = server.server.authenticator.accounts["alice"].password_hash

    def guesses_checked(checks: list[str]) -> list[str]:
        return [phc for phc in checks if phc != alice_hash]

    allowed = server.server.limits.login_failures_allowed
    throttle = server.server.authenticator.throttle
    # one guess per user name (so no user's own count ever blocks), and the
    # insider's own right password after every `allowed - 1` guesses
    victims = ["bob", "carol", "dave", *(f"user{n}" for n in range(30))]
    guesses = len(victims)
    start = trio.current_time()
    own_logins = 0
    for n, victim in enumerate(victims):
        await failed_guess(server, victim, n)
        if n % (allowed - 1) == allowed - 2:
            connection = await server.open()
            try:
                welcome = await connection.login("alice", SecretStr(PASSWORDS["alice"]))
            except LoginRefused:
                continue  # the address is backing off: refused without a check
            assert isinstance(welcome, Welcome)
            own_logins += 1
            # alice's success cleared alice's failures, not the address's
            failures = throttle.failures("ip:127.0.0.1", trio.current_time())
            assert failures == len(guesses_checked(password_checks))
    elapsed = trio.current_time() - start
    assert own_logins >= 1
    checked = len(guesses_checked(password_checks))
    assert allowed <= checked <= sequential_bound(allowed, elapsed) < guesses
