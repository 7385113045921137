"""The private redis-server helper: it answers at once, survives nothing it should not,
keeps an acknowledged write across a SIGKILL, and never outlives its test."""

from __future__ import annotations

import os
from pathlib import Path

import coredis
import pytest
import trio

from . import redis_server as helper
from .redis_server import RedisServer, answers_ping
from .redis_server import redis_server as redis_server_at


async def test_fixture_answers_on_a_private_port_and_durable_settings(
    redis_server: RedisServer,
) -> None:
    assert redis_server.port not in (0, 6379)
    async with coredis.Redis(host=redis_server.host, port=redis_server.port) as client:
        assert await client.ping() == b"PONG"
        settings = await client.config_get(["appendonly", "appendfsync", "save", "dir"])
    assert settings == {
        b"appendonly": b"yes",
        b"appendfsync": b"always",
        b"save": b"",
        b"dir": os.fsencode(redis_server.directory),
    }


async def test_an_acked_write_survives_sigkill_and_restart(tmp_path: Path) -> None:
    async with redis_server_at(tmp_path / "r") as server:
        port = server.port
        async with coredis.Redis(host=server.host, port=port) as client:
            assert await client.set("survivor", "1")  # acked after the fsync
        await server.kill()
        assert server.process is None
        assert not await answers_ping(port)
        await server.restart()
        assert server.port == port
        async with coredis.Redis(host=server.host, port=port) as client:
            assert await client.get("survivor") == b"1"


async def test_extra_settings_override_the_durable_defaults(tmp_path: Path) -> None:
    async with (
        redis_server_at(tmp_path / "r", {"appendonly": "no"}) as server,
        coredis.Redis(host=server.host, port=server.port) as client,
    ):
        settings = await client.config_get(["appendonly", "appendfsync"])
    assert settings == {b"appendonly": b"no", b"appendfsync": b"always"}


async def test_a_password_stays_off_the_command_line(tmp_path: Path) -> None:
    secret = "helper-test-secret"
    async with redis_server_at(tmp_path / "r", {"requirepass": secret}) as server:
        assert server.process is not None
        assert secret.encode() not in _proc(server.process.pid, "cmdline")
        assert await answers_ping(server.port, secret)
        assert not await answers_ping(server.port)  # NOAUTH: the password is enforced


async def test_stopped_however_the_test_ends(tmp_path: Path) -> None:
    pids: list[int] = []
    try:
        async with redis_server_at(tmp_path / "r") as server:
            assert server.process is not None
            pids.append(server.process.pid)
            raise RuntimeError("the test failed")
    except RuntimeError:
        pass
    with trio.CancelScope() as scope:
        async with redis_server_at(tmp_path / "s") as server:
            assert server.process is not None
            pids.append(server.process.pid)
            scope.cancel()
            await trio.sleep_forever()
    assert len(pids) == 2
    for pid in pids:  # reaped: the pid no longer names a redis-server
        assert b"redis" not in _proc(pid, "comm")


async def test_a_taken_port_is_retried_with_another(
    tmp_path: Path, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Between free_port() and redis binding it, another process may take the port: here
    # the first port offered is the fixture's, already listening.
    real_free_port = helper.free_port
    offered = [redis_server.port]

    def taken_first() -> int:
        return offered.pop() if offered else real_free_port()

    monkeypatch.setattr(helper, "free_port", taken_first)
    async with redis_server_at(tmp_path / "second") as second:
        assert second.port != redis_server.port
        assert "Address already in use" not in second.log()
    assert offered == []


def _proc(pid: int, name: str) -> bytes:
    try:
        return Path(f"/proc/{pid}/{name}").read_bytes()
    except FileNotFoundError:
        return b""
