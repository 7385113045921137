"""Cluster mode from the command line: real ``securechat server`` processes on a real,
private Redis (tests/redis_server.py), and ``--workers N`` (securechat/supervisor.py).

Nodes and workers are real processes with real TLS; clients are real ChatConnections.
Everything waits on log lines or polls with a deadline: nothing sleeps.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import sys
from collections.abc import Iterable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import pytest
import trio

from securechat import supervisor
from securechat.cli import main
from securechat.client import ChatConnection
from securechat.config import REDIS_PASSWORD_ENV, parse_config
from securechat.protocol import (
    LOBBY,
    Ack,
    History,
    HistoryEnd,
    Message,
    Ping,
    Pong,
    Presence,
    Say,
)
from securechat.server import ChatServer, cluster_store
from securechat.store import Retention

from .conftest import (
    WAIT,
    Endpoint,
    Pki,
    ServerProcess,
    config_data,
    receive_type,
    server_process,
    write_toml,
)
from .redis_server import RedisServer, free_port
from .redis_server import redis_server as private_redis_server

SECRET = "redis-test-secret-5d1e"  # a throwaway requirepass; must never show anywhere
WORKERS_READY = (
    r"securechat\.supervisor\[\d+\]: 2 workers ready on 127\.0\.0\.1:(\d+) \(pids (\d+), (\d+)\)"
)


def cluster_config(
    path: Path,
    pki: Pki,
    password_hashes: dict[str, str],
    redis_url: str,
    *,
    cluster: dict[str, Any] | None = None,
    **server: Any,
) -> Path:
    data = config_data(pki, password_hashes, **server)
    data["cluster"] = {"redis_url": redis_url, **(cluster or {})}
    return write_toml(path, data)


def supervised(
    config: Path, pki: Pki, count: int = 2, ready: str = WORKERS_READY, **kwargs: Any
) -> AbstractAsyncContextManager[ServerProcess]:
    """``securechat server --workers COUNT``, once the log matches ``ready`` (by default:
    both workers are ready; they start one after the other, so this waits longer than for
    one server)."""
    return server_process(
        config, pki, "--workers", str(count), ready=ready, ready_within=WAIT * 3, **kwargs
    )


def server_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "securechat", "server", *args]


async def say(connection: ChatConnection, text: str, client_id: str) -> Ack:
    await connection.send(Say(room=LOBBY, text=text, id=client_id))
    return await receive_type(connection, Ack)


async def lobby_history(connection: ChatConnection) -> list[Message]:
    await connection.send(History(room=LOBBY, id="h"))
    found: list[Message] = []
    with trio.fail_after(WAIT):
        while not isinstance(envelope := await connection.receive(), HistoryEnd):
            if isinstance(envelope, Message):
                found.append(envelope)
    return found


def running(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie nobody reaped yet counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


async def until_gone(pids: Iterable[int]) -> None:
    with trio.fail_after(WAIT * 3):
        while any(running(pid) for pid in pids):  # noqa: ASYNC110 (other processes)
            await trio.sleep(0.05)


def command_line(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()


async def served_by(process: ServerProcess, connection: ChatConnection) -> int:
    """The pid of the worker whose log says it logged ``connection`` in."""
    port = connection.stream.transport_stream.socket.getsockname()[1]
    found = await process.wait_for_log(rf"\[(\d+)\]: login user=alice peer=127\.0\.0\.1:{port} ")
    return int(found[1])


async def serve_until(process: ServerProcess, wanted: set[int], *, tries: int = 200) -> None:
    """Log in (certificate) again and again until each of ``wanted`` has served one; the
    kernel spreads connections by a hash of their ports, so a few tries do it."""
    seen: set[int] = set()
    for _ in range(tries):
        connection = await process.endpoint.login("alice", cert_user="alice")
        seen.add(await served_by(process, connection))
        await trio.aclose_forcefully(connection.stream)
        if wanted <= seen:
            return
    raise AssertionError(f"after {tries} logins only {seen} of {wanted} served")


async def stop(process: ServerProcess, signum: int = signal.SIGTERM) -> int:
    process.process.send_signal(signum)
    with trio.fail_after(WAIT * 4):
        return await process.process.wait()


# --- two nodes, each its own process -----------------------------------------------------


async def test_two_node_processes_with_one_config_share_the_lobby(
    tmp_path: Path, pki: Pki, password_hashes: dict[str, str]
) -> None:
    async with private_redis_server(tmp_path / "redis", {"requirepass": SECRET}) as redis:
        url = f"redis://:{SECRET}@127.0.0.1:{redis.port}/0"
        config = cluster_config(tmp_path / "node.toml", pki, password_hashes, url)
        # One config file for both: a node keeps no pidfile that would refuse the second.
        async with server_process(config, pki) as a, server_process(config, pki) as b:
            assert a.endpoint.port != b.endpoint.port
            alice = await a.endpoint.login("alice")
            bob = await b.endpoint.login("bob")
            first = await say(alice, "hello from node a", "a1")
            seen_by_bob = await receive_type(bob, Message)
            assert (seen_by_bob.id, seen_by_bob.sender, seen_by_bob.text) == (
                first.id,
                "alice",
                "hello from node a",
            )
            reply = await say(bob, "hello from node b", "b1")
            seen_by_alice = await receive_type(alice, Message)  # her own came before her ack
            assert (seen_by_alice.id, seen_by_alice.text) == (reply.id, "hello from node b")
            assert reply.id > first.id
            history = await lobby_history(bob)
            assert [(m.id, m.sender, m.text) for m in history] == [
                (first.id, "alice", "hello from node a"),
                (reply.id, "bob", "hello from node b"),
            ]
            for node in (a, b):
                await node.wait_for_log(
                    rf"cluster mode on Redis redis://:\*\*\*@127\.0\.0\.1:{redis.port}/0"
                    r" \(durability fsync\), no pidfile"
                )
            assert await stop(a) == 0
            assert await stop(b) == 0
        for node in (a, b):
            assert SECRET not in node.log()
        assert not [name for _, _, names in os.walk(tmp_path) for name in names if ".pid" in name]


async def test_a_node_refuses_a_redis_that_does_not_fsync_in_one_line(
    tmp_path: Path, pki: Pki, password_hashes: dict[str, str]
) -> None:
    async with private_redis_server(tmp_path / "redis", {"appendonly": "no"}) as redis:
        config = cluster_config(tmp_path / "node.toml", pki, password_hashes, redis.url)
        with trio.fail_after(WAIT * 3):
            done = await trio.run_process(
                server_command("--config", str(config)),
                capture_stderr=True,
                check=False,
            )
    stderr = done.stderr.decode()
    errors = [line for line in stderr.splitlines() if line.startswith("securechat: error: ")]
    assert done.returncode == 1, stderr
    assert errors == [
        f"securechat: error: Redis at 127.0.0.1:{redis.port} has appendonly no: acks would not"
        " be durable; set appendonly yes and appendfsync always, or accept it with"
        ' [cluster] durability = "memory"'
    ]
    assert "Traceback" not in stderr
    assert "[SEARCHING]" not in stderr


def test_a_node_names_an_unreachable_redis_in_one_line_without_its_password(
    tmp_path: Path,
    pki: Pki,
    password_hashes: dict[str, str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    port = free_port()  # nothing listens there
    url = f"redis://chat:{SECRET}@127.0.0.1:{port}/0"
    config = cluster_config(tmp_path / "node.toml", pki, password_hashes, url)
    assert main(["server", "--config", str(config)]) == 1
    err = capsys.readouterr().err
    assert err == f"securechat: error: cannot use Redis at 127.0.0.1:{port}: connection refused\n"


async def test_a_node_prunes_each_room_to_cluster_history_max_per_room(
    tmp_path: Path, redis_server: RedisServer, pki: Pki, password_hashes: dict[str, str]
) -> None:
    data = config_data(pki, password_hashes)
    data["cluster"] = {"redis_url": redis_server.url, "history_max_per_room": 3}
    config = parse_config(data, tmp_path / "node.toml")
    assert config.cluster is not None
    async with cluster_store(config.cluster) as store, trio.open_nursery() as nursery:
        server = ChatServer(config, store=store)
        assert server.retention == Retention(max_age=0.0, per_room=3)
        host, port = (await nursery.start(server.serve))[0]
        endpoint = Endpoint(host, port, pki)
        try:
            alice = await endpoint.login("alice")
            acks = [await say(alice, f"message {n}", f"m{n}") for n in range(5)]
            pruned = await server.store.prune(server.retention, 0.0)
            assert pruned.by_room == 2
            assert [m.id for m in await lobby_history(alice)] == [ack.id for ack in acks[2:]]
        finally:
            await endpoint.aclose()
            server.request_shutdown()


def test_reload_and_check_config_know_a_cluster_node_keeps_no_pidfile(
    tmp_path: Path, pki: Pki, password_hashes: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    config = cluster_config(
        tmp_path / "node.toml", pki, password_hashes, f"redis://:{SECRET}@127.0.0.1:6390/0"
    )
    config.chmod(0o600)
    assert main(["reload", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"securechat: error: {config} has a [cluster] section: cluster nodes")
    assert "send SIGHUP to each node, or to the --workers supervisor" in err
    assert main(["check-config", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "a cluster node on Redis at 127.0.0.1:6390 (durability fsync" in out
    assert not [line for line in out.splitlines() if line.split()[1:2] == ["database"]]
    assert SECRET not in out


# --- --workers -----------------------------------------------------------------------------


def test_workers_need_a_cluster_section_and_no_console(
    tmp_path: Path, pki: Pki, password_hashes: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    alone = write_toml(tmp_path / "alone.toml", config_data(pki, password_hashes))
    assert main(["server", "--config", str(alone), "--workers", "2"]) == 2
    assert capsys.readouterr().err == (
        f"securechat: error: --workers needs a [cluster] section ({alone} has none): without"
        " Redis, worker processes would each be a separate chat\n"
    )
    clustered = cluster_config(
        tmp_path / "node.toml", pki, password_hashes, "redis://127.0.0.1:6390/0"
    )
    assert main(["server", "--config", str(clustered), "--workers", "2", "--console"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("securechat: error: --console cannot go with --workers")
    assert err.count("\n") == 1
    assert main(["server", "--config", str(alone), supervisor.WORKER_FLAG, "1"]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert main(["server", "--config", str(clustered), "--workers", "0"]) == 2
    assert "must be between 1 and 64: 0" in capsys.readouterr().err


async def test_workers_share_one_port_and_a_killed_worker_is_replaced(
    tmp_path: Path, pki: Pki, password_hashes: dict[str, str]
) -> None:
    async with private_redis_server(tmp_path / "redis", {"requirepass": SECRET}) as redis:
        # The password only in the environment, which the workers inherit.
        url = f"redis://127.0.0.1:{redis.port}/0"
        config = cluster_config(tmp_path / "node.toml", pki, password_hashes, url)
        async with supervised(config, pki, env={REDIS_PASSWORD_ENV: SECRET}) as workers:
            ready = await workers.wait_for_log(WORKERS_READY)
            first, second = int(ready[2]), int(ready[3])
            for pid in (workers.process.pid, first, second):
                assert SECRET not in command_line(pid)
            assert supervisor.WORKER_FLAG in command_line(first)
            await serve_until(workers, {first, second})

            os.kill(first, signal.SIGKILL)
            since = len(workers.log())
            restart = await workers.wait_for_log(
                rf"supervisor\[\d+\]: worker (\d) \(pid {first}\) was killed by SIGKILL after"
                r" [\d.]+ s; starting it again in 1 s",
                since=since,
            )
            since += restart.end()
            again = await workers.wait_for_log(
                rf"supervisor\[\d+\]: worker {restart[1]} ready \(pid (\d+)\)",
                since=since,
                within=WAIT * 3,
            )
            replacement = int(again[1])
            assert replacement not in (first, second)
            await serve_until(workers, {second, replacement})

            assert await stop(workers) == 0
            await workers.wait_for_log(r"supervisor\[\d+\]: every worker stopped")
            assert not any(running(pid) for pid in (first, second, replacement))
        assert SECRET not in workers.log()


async def test_workers_reload_on_sighup_and_stop_when_the_supervisor_is_killed(
    tmp_path: Path, redis_server: RedisServer, pki: Pki, password_hashes: dict[str, str]
) -> None:
    data = config_data(pki, password_hashes)
    data["cluster"] = {"redis_url": redis_server.url}
    config = write_toml(tmp_path / "node.toml", data)
    async with supervised(config, pki) as workers:
        ready = await workers.wait_for_log(WORKERS_READY)
        pids = (int(ready[2]), int(ready[3]))
        data["users"]["erin"] = {"password_hash": password_hashes["dave"]}
        write_toml(config, data)
        since = len(workers.log())
        workers.process.send_signal(signal.SIGHUP)
        for pid in pids:
            await workers.wait_for_log(
                rf"\[{pid}\]: config reloaded: users=\d+ added=erin ", since=since
            )
        # The workers' flags (--port from the supervisor) are no change of the file's.
        assert "differ from the running settings" not in workers.log()
        erin = await workers.endpoint.login("erin", password="dave-pw-1234")
        await trio.aclose_forcefully(erin.stream)

        # SIGKILL: no chance to stop them. Their stdin ends, and they stop by themselves.
        workers.process.kill()
        await until_gone(pids)
        for pid in pids:
            await workers.wait_for_log(
                rf"\[{pid}\]: the supervisor is gone \(this worker's stdin closed\)"
            )


async def test_workers_that_cannot_start_stop_the_supervisor_with_the_error(
    tmp_path: Path, pki: Pki, password_hashes: dict[str, str]
) -> None:
    port = free_port()  # no Redis there: every worker would fail the same way
    config = cluster_config(
        tmp_path / "node.toml", pki, password_hashes, f"redis://127.0.0.1:{port}/0"
    )
    with trio.fail_after(WAIT * 3):
        done = await trio.run_process(
            server_command("--config", str(config), "--workers", "2"),
            capture_stderr=True,
            check=False,
        )
    stderr = done.stderr.decode()
    errors = [line for line in stderr.splitlines() if line.startswith("securechat: error: ")]
    assert done.returncode == 1, stderr
    assert errors[0] == (
        f"securechat: error: cannot use Redis at 127.0.0.1:{port}: connection refused"
    )
    assert re.fullmatch(
        r"securechat: error: worker 1 \(pid \d+\) exited with status 1 before it was ready"
        r" \(its error is above\): no worker runs",
        errors[1],
    )
    assert len(errors) == 2
    assert "worker 2 starting" not in stderr
    assert "Traceback" not in stderr
    assert "coredis" not in stderr  # its retries are not the node's to log


async def test_a_port_held_by_workers_refuses_a_lone_server_and_another_supervisor(
    tmp_path: Path, redis_server: RedisServer, pki: Pki, password_hashes: dict[str, str]
) -> None:
    config = cluster_config(tmp_path / "node.toml", pki, password_hashes, redis_server.url)
    alone = write_toml(tmp_path / "alone.toml", config_data(pki, password_hashes))
    async with supervised(config, pki) as workers:
        port = str(workers.endpoint.port)
        with trio.fail_after(WAIT * 3):
            for command in (
                ["--config", str(alone), "--port", port],  # a lone server: no SO_REUSEPORT
                ["--config", str(config), "--port", port, "--workers", "2"],
            ):
                done = await trio.run_process(
                    server_command(*command),
                    capture_stderr=True,
                    check=False,
                )
                errors = [
                    line
                    for line in done.stderr.decode().splitlines()
                    if line.startswith("securechat: error: ")
                ]
                assert done.returncode == 1
                assert errors == [
                    f"securechat: error: cannot listen on 127.0.0.1:{port}: Address already in use"
                ]
        assert await stop(workers) == 0


async def test_only_a_worker_binds_with_so_reuseport(
    tmp_path: Path, redis_server: RedisServer, pki: Pki, password_hashes: dict[str, str]
) -> None:
    data = config_data(pki, password_hashes)
    data["cluster"] = {"redis_url": redis_server.url}
    config = parse_config(data, tmp_path / "node.toml")
    assert config.cluster is not None
    async with cluster_store(config.cluster) as store:
        for reuse_port in (False, True):
            server = ChatServer(config, store=store)
            await server.listen(reuse_port=reuse_port)
            for listener in server._listeners:
                sock = listener.socket
                assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == int(reuse_port)
                await listener.aclose()


def test_backoff_doubles_to_its_ceiling_and_starts_over_after_a_healthy_run() -> None:
    backoff = supervisor.Backoff(first=1.0, most=30.0, healthy_after=60.0)
    assert [backoff.delay(lived=2.0) for _ in range(7)] == [1, 2, 4, 8, 16, 30, 30]
    assert backoff.delay(lived=60.0) == 1.0
    assert backoff.delay(lived=59.0) == 2.0


@pytest.mark.parametrize(
    ("status", "text"),
    [
        (0, "exited with status 0"),
        (2, "exited with status 2"),
        (-signal.SIGKILL, "was killed by SIGKILL"),
        (-99, "was killed by signal 99"),
    ],
)
def test_exit_statuses_are_described(status: int, text: str) -> None:
    assert supervisor.describe_exit(status) == text


def test_a_reserved_port_takes_workers_and_refuses_others() -> None:
    held = supervisor.reserve_port("127.0.0.1", 0)
    port = held[0].getsockname()[1]
    try:
        with pytest.raises(OSError, match="Address already in use"):
            supervisor.reserve_port("127.0.0.1", port)  # another supervisor
        with socket.socket() as lone:  # as trio.open_tcp_listeners binds
            lone.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            with pytest.raises(OSError, match="Address already in use"):
                lone.bind(("127.0.0.1", port))
        with socket.socket() as worker, socket.socket() as client:
            worker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            worker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            worker.bind(("127.0.0.1", port))
            worker.listen()
            client.connect(("127.0.0.1", port))  # reaches the worker, not the reservation
            accepted, _ = worker.accept()
            accepted.close()
    finally:
        for sock in held:
            sock.close()


async def test_a_sighup_that_comes_while_a_worker_starts_reaches_it_once_it_is_ready(
    tmp_path: Path, redis_server: RedisServer, pki: Pki, password_hashes: dict[str, str]
) -> None:
    config = cluster_config(tmp_path / "node.toml", pki, password_hashes, redis_server.url)
    assert redis_server.process is not None
    redis_server.process.send_signal(signal.SIGSTOP)  # the worker waits for its PING
    try:
        async with supervised(
            config, pki, count=1, ready=r"supervisor of 1 workers on 127\.0\.0\.1:(\d+)"
        ) as workers:
            starting = await workers.wait_for_log(r"worker 1 starting \(pid (\d+)\)")
            workers.process.send_signal(signal.SIGHUP)  # before its handlers exist
            await workers.wait_for_log(r"received SIGHUP: passing it on to the workers")
            redis_server.process.send_signal(signal.SIGCONT)
            await workers.wait_for_log(
                rf"\[{starting[1]}\]: received SIGHUP: reloading", within=WAIT * 3
            )
            await workers.wait_for_log(r"worker 1 ready")
            assert "starting it again" not in workers.log()
            assert await stop(workers) == 0
    finally:
        redis_server.process.send_signal(signal.SIGCONT)


# --- a node dies ---------------------------------------------------------------------------


async def test_a_node_sigkilled_mid_burst_loses_no_acknowledged_message_and_alice_moves_on(
    tmp_path: Path, pki: Pki, password_hashes: dict[str, str]
) -> None:
    burst = 300
    async with private_redis_server(tmp_path / "redis") as redis:
        data = config_data(pki, password_hashes)
        data["cluster"] = {"redis_url": redis.url, "presence_ttl": 2.0}
        data["limits"] = {"messages_per_second": 10000.0, "message_burst": 10000}
        config = write_toml(tmp_path / "node.toml", data)
        async with server_process(config, pki) as a, server_process(config, pki) as b:
            bob = await b.endpoint.login("bob")
            alice = await a.endpoint.login("alice")
            seen: list[Message] = []  # what bob, on node b all along, receives
            await receive_first_presence(bob, "alice", "online", seen)
            acked: dict[str, int] = {}
            with trio.fail_after(WAIT * 3):
                for number in range(burst):  # pipelined: acks are read as they come
                    await alice.send(Say(room=LOBBY, text=f"burst {number}", id=f"m{number}"))
                while len(acked) < burst // 6:
                    ack = await receive_type(alice, Ack)
                    assert ack.ref is not None
                    acked[ack.ref] = ack.id
                a.process.kill()  # SIGKILL, in the middle of the burst
                await a.process.wait()
                # What node a acked before it died, as far as alice's end has read it.
                while (envelope := await receive_or_end(alice)) is not None:
                    if isinstance(envelope, Ack) and envelope.ref is not None:
                        acked[envelope.ref] = envelope.id
                # bob sees alice go, within presence_ttl: node a said nothing more.
                await receive_first_presence(bob, "alice", "offline", seen)
                # alice's client reconnects to node b and sends again what was not
                # acknowledged, with the same client ids (what ChatSession does).
                alice_on_b = await b.endpoint.login("alice")
                for number in range(burst):
                    if f"m{number}" not in acked:
                        await alice_on_b.send(
                            Say(room=LOBBY, text=f"burst {number}", id=f"m{number}")
                        )
                while len(acked) < burst:
                    ack = await receive_type(alice_on_b, Ack)
                    assert ack.ref is not None
                    acked.setdefault(ack.ref, ack.id)
                    assert acked[ack.ref] == ack.id  # a re-send keeps its original id
                await alice_on_b.send(History(room=LOBBY, limit=burst + 50, id="h"))
                stored: list[Message] = []
                while not isinstance(envelope := await alice_on_b.receive(), HistoryEnd):
                    if isinstance(envelope, Message):
                        stored.append(envelope)
                seen += await drain_messages(bob)
        texts = [message.text for message in stored]
        assert sorted(texts) == sorted(f"burst {n}" for n in range(burst))  # each once
        assert {message.id for message in stored} == set(acked.values())  # every ack kept
        ids = sorted(message.id for message in stored)
        assert ids == list(range(ids[0], ids[0] + burst))  # no gap
        assert [m.id for m in seen] == ids  # each once, in id order


async def receive_first_presence(
    connection: ChatConnection, username: str, state: str, messages: list[Message]
) -> None:
    """Wait for ``username``'s presence in ``state``; the messages meanwhile go to ``messages``."""
    with trio.fail_after(WAIT * 2):
        while True:
            envelope = await connection.receive()
            assert envelope is not None
            if isinstance(envelope, Message):
                messages.append(envelope)
            elif isinstance(envelope, Presence) and (envelope.username, envelope.state) == (
                username,
                state,
            ):
                return


async def receive_or_end(connection: ChatConnection) -> Any:
    """The next envelope, or None once the connection has ended (its server died)."""
    try:
        return await connection.receive()
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        return None


async def drain_messages(connection: ChatConnection) -> list[Message]:
    """The messages ``connection`` has received so far (up to a ping's answer)."""
    await connection.send(Ping(id="drain"))
    found: list[Message] = []
    with trio.fail_after(WAIT):
        while not isinstance(envelope := await connection.receive(), Pong):
            if isinstance(envelope, Message):
                found.append(envelope)
    return found
