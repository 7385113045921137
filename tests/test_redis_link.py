"""securechat.redis_link against real private redis-servers: connecting (password from
the URL or the environment, TLS), and the start-up durability check, each refusal and
each acceptance. No message may carry the password."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import pytest
import trio

from securechat.config import REDIS_PASSWORD_ENV, ClusterSection, ConfigError
from securechat.redis_link import ClusterError, check_durability, connect

from .conftest import WAIT, Pki
from .redis_server import RedisServer, free_port
from .redis_server import redis_server as redis_at

SECRET = "redis-link-test-pw"  # throw-away; must never show in a message
MEMORY = '[cluster] durability = "memory"'


def section(url: str, **settings: object) -> ClusterSection:
    return ClusterSection.model_validate({"redis_url": url, **settings})


async def refusal(server: RedisServer, environ: Mapping[str, str] = {}, **settings: object) -> str:
    """The one-line ClusterError that connecting and checking ``server`` raises."""
    cluster = section(server.url, **settings)
    with pytest.raises(ClusterError) as info:
        async with connect(cluster, environ) as client:
            await check_durability(client, cluster)
    message = str(info.value)
    assert "\n" not in message
    assert SECRET not in message
    return message


async def accepted(url: str, environ: Mapping[str, str] = {}, **settings: object) -> None:
    cluster = section(url, **settings)
    async with connect(cluster, environ) as client:
        await check_durability(client, cluster)
        assert await client.set("checked", "1")


# --- durability -------------------------------------------------------------------------


async def test_fsync_accepts_appendonly_with_appendfsync_always(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    await accepted(redis_server.url)
    await accepted(redis_server.url, durability="fsync")
    assert not [record for record in caplog.records if record.levelno >= logging.WARNING]


async def test_fsync_refuses_appendonly_no(tmp_path: Path) -> None:
    async with redis_at(tmp_path / "r", {"appendonly": "no"}) as server:
        assert await refusal(server) == (
            f"Redis at 127.0.0.1:{server.port} has appendonly no: acks would not be durable;"
            f" set appendonly yes and appendfsync always, or accept it with {MEMORY}"
        )


@pytest.mark.parametrize("appendfsync", ["everysec", "no"])
async def test_fsync_refuses_appendfsync_other_than_always(
    tmp_path: Path, appendfsync: str
) -> None:
    async with redis_at(tmp_path / "r", {"appendfsync": appendfsync}) as server:
        message = await refusal(server)
    assert message.startswith(f"Redis at 127.0.0.1:{server.port} has appendfsync {appendfsync}:")
    assert message.endswith(f"set appendfsync always, or accept it with {MEMORY}")


async def test_memory_accepts_anything_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with redis_at(tmp_path / "r", {"appendonly": "no", "appendfsync": "no"}) as server:
        with caplog.at_level(logging.WARNING, logger="securechat.cluster"):
            await accepted(server.url, durability="memory")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        '[cluster] durability = "memory": acks are not durable; messages acknowledged to'
        f" clients are lost if Redis at 127.0.0.1:{server.port} stops before saving them"
    ]


async def test_config_disabled_is_refused_unless_memory(tmp_path: Path) -> None:
    async with redis_at(tmp_path / "r", {"rename-command": 'CONFIG ""'}) as server:
        message = await refusal(server)
        assert message.startswith(
            f"Redis at 127.0.0.1:{server.port} does not let this client run CONFIG GET ("
        )
        assert message.endswith(f"or accept unchecked durability with {MEMORY}")
        await accepted(server.url, durability="memory")


async def test_config_denied_by_acl_is_refused(tmp_path: Path) -> None:
    acl = f"chat on >{SECRET} ~* &* +@all -config"
    async with redis_at(tmp_path / "r", {"user": acl}) as server:
        url = f"redis://chat@127.0.0.1:{server.port}/0"
        message = await refusal(server, {REDIS_PASSWORD_ENV: SECRET}, redis_url=url)
    assert "does not let this client run CONFIG GET" in message


async def test_replicated_needs_connected_replicas(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    assert await refusal(redis_server, durability="replicated") == (
        f"Redis at 127.0.0.1:{redis_server.port} has 0 replica(s) online and [cluster]"
        " replicas = 1 needs 1: attach replicas (replicaof) and let them sync, lower"
        ' replicas, or use durability = "fsync"'
    )
    primary = f"127.0.0.1 {redis_server.port}"
    async with redis_at(tmp_path / "replica", {"replicaof": primary}) as replica:
        cluster = section(redis_server.url, durability="replicated")
        async with connect(cluster) as client:
            with trio.fail_after(WAIT):  # the replica's link comes up, and it syncs
                while "'state': 'online'" not in str(await client.info("replication")):  # noqa: ASYNC110
                    await trio.sleep(0.02)
            await check_durability(client, cluster)
        assert "replicas = 2 needs 2" in await refusal(
            redis_server, durability="replicated", replicas=2
        )
        # A replica is read-only: pointing a node at it is refused whatever the mode.
        message = await refusal(replica)
        assert message == (
            f"Redis at 127.0.0.1:{replica.port} is a replica (read-only to clients):"
            " point [cluster] redis_url at the primary"
        )


# --- connecting -----------------------------------------------------------------------------


async def test_unreachable_redis_is_one_line_naming_host_and_port(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    port = free_port()  # nothing listens there
    cluster = section(f"redis://:{SECRET}@127.0.0.1:{port}/0")
    with pytest.raises(ClusterError) as info:
        async with connect(cluster, {}):
            pass
    assert str(info.value) == f"cannot use Redis at 127.0.0.1:{port}: connection refused"
    assert SECRET not in caplog.text


async def test_unknown_host_is_one_line() -> None:
    cluster = section("redis://no-such-host.invalid:6390")
    with pytest.raises(ClusterError) as info:
        async with connect(cluster, {}):
            pass
    assert str(info.value).startswith(
        "cannot use Redis at no-such-host.invalid:6390: cannot resolve the host name ("
    )


async def test_password_from_the_url_or_the_environment(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)  # securechat's and coredis's logs: no password either
    async with redis_at(tmp_path / "r", {"requirepass": SECRET}) as server:
        plain = server.url
        with_password = plain.replace("redis://", f"redis://:{SECRET}@")
        await accepted(with_password)
        await accepted(plain, {REDIS_PASSWORD_ENV: SECRET})
        assert await refusal(server) == (
            f"cannot use Redis at 127.0.0.1:{server.port}: it requires a password; give it"
            " in [cluster] redis_url (redis://:PASSWORD@host) or in SECURECHAT_REDIS_PASSWORD"
        )
        assert await refusal(server, {REDIS_PASSWORD_ENV: "wrong-" + SECRET}) == (
            f"cannot use Redis at 127.0.0.1:{server.port}: it refused the user name or"
            " password (check [cluster] redis_url and the environment)"
        )
        with pytest.raises(ConfigError, match="give the password in one place only"):
            async with connect(section(with_password), {REDIS_PASSWORD_ENV: SECRET}):
                pass
    assert SECRET not in caplog.text


async def test_the_process_environment_is_the_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with redis_at(tmp_path / "r", {"requirepass": SECRET}) as server:
        monkeypatch.setenv(REDIS_PASSWORD_ENV, SECRET)
        cluster = section(server.url)
        async with connect(cluster) as client:
            await check_durability(client, cluster)


async def test_rediss_verifies_redis_with_the_system_defaults(
    tmp_path: Path, pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    tls_port = free_port()
    tls = {
        "tls-port": str(tls_port),
        "tls-cert-file": str(pki.cert("server")),
        "tls-key-file": str(pki.key("server")),
        "tls-ca-cert-file": str(pki.ca),
        "tls-auth-clients": "no",
    }
    async with redis_at(tmp_path / "r", tls) as server:
        url = f"rediss://127.0.0.1:{tls_port}/0"
        # Not (yet) trusted: the system's CAs do not include the test CA.
        message = await refusal(server, redis_url=url)
        assert message.startswith(f"cannot use Redis at 127.0.0.1:{tls_port}: TLS failed: ")
        assert "CERTIFICATE_VERIFY_FAILED" in message
        # OpenSSL's default verify paths honour SSL_CERT_FILE, as an admin's system CA would.
        monkeypatch.setenv("SSL_CERT_FILE", str(pki.ca))
        await accepted(url)


async def test_rediss_to_a_plain_port_says_so(redis_server: RedisServer) -> None:
    cluster = section(redis_server.url.replace("redis://", "rediss://"))
    with pytest.raises(ClusterError) as info:
        async with connect(cluster, {}, answer_within=1.0):
            pass
    assert str(info.value) == (
        f"cannot use Redis at 127.0.0.1:{redis_server.port}: no answer within 1 s"
        " (with rediss://, is that a TLS port of Redis?)"
    )
