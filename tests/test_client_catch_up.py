"""The terminal client catches up after a reconnect even when the server rate-limits it.

Catching up asks for history in pages of 500, and a page costs request
tokens (docs/protocol.md, Flow control): a client that missed more pages
than its burst covers is told ``rate_limited`` and must ask again when the
server says, rather than stop with a gap in its history.
"""

from __future__ import annotations

import trio
from pydantic import SecretStr

from securechat.client import Backoff, ChatConnection, ChatSession
from securechat.protocol import Ack, Say, Welcome

from .conftest import PASSWORDS, ScriptedConsole, StartServer, receive_type

MISSED = 1200  # three pages of 500


async def test_catch_up_waits_out_the_rate_limit_and_misses_nothing(
    start_server: StartServer,
) -> None:
    # One page (1 + 500/100 = 6 tokens) fits in the burst, the next two must wait.
    server = await start_server(
        limits={
            "request_burst": 7,
            "requests_per_second": 20,
            "messages_per_second": 10_000,
            "message_burst": 10_000,
        }
    )
    alice = await server.login("alice", cert_user="alice")
    back = trio.Event()

    async def reconnect() -> tuple[ChatConnection, Welcome]:
        await back.wait()
        connection = await server.open("bob")
        return connection, await connection.login("bob", None)

    connection = await server.open("bob")
    welcome = await connection.login("bob", SecretStr(PASSWORDS["bob"]))
    console = ScriptedConsole()
    session = ChatSession(
        connection, welcome, console, reconnect=reconnect, backoff=Backoff(first=0.01)
    )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(session.run)
        await alice.send(Say(room="lobby", text="before the cut", id="m-first"))
        await console.wait_for(lambda shown: any("before the cut" in line for line in shown))
        await trio.aclose_forcefully(session.connection.stream)  # the network fails
        for n in range(MISSED):
            await alice.send(Say(room="lobby", text=f"missed {n}", id=f"m{n}"))
        while (await receive_type(alice, Ack)).ref != f"m{MISSED - 1}":
            pass
        back.set()
        last = f"missed {MISSED - 1}"
        shown = await console.wait_for(lambda shown: any(last in line for line in shown))
        console.type("/quit")
    texts = [line for line in shown if "missed " in line]
    assert len(texts) == MISSED
    assert not any("rate_limited" in line or "too many" in line for line in shown)
