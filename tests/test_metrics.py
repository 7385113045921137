"""The Prometheus endpoint ([metrics] listen): a real server, real clients doing real
things, then /metrics fetched over HTTP and parsed with prometheus_client's parser."""

from __future__ import annotations

import re
import socket
from dataclasses import replace
from pathlib import Path

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families
from pydantic import SecretStr
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, TextMessage
from wsproto.events import Request as WsRequest

from securechat import __version__, metrics
from securechat.cli import main
from securechat.client import ChatConnection, LoginRefused
from securechat.config import ConfigError, parse_config
from securechat.protocol import (
    Ack,
    Error,
    ErrorCode,
    Hello,
    History,
    HistoryEnd,
    Kick,
    Message,
    Say,
    Who,
    encode,
)

from .conftest import (
    PASSWORDS,
    WAIT,
    ConfigFactory,
    Pki,
    RunningServer,
    StartServer,
    config_data,
    receive_type,
    write_toml,
)
from .redis_server import redis_server as private_redis_server
from .test_checks import check_config, lines
from .test_cluster_processes import supervised
from .test_hardening import wait_until

DOCS = Path(__file__).resolve().parent.parent / "docs"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
Address = tuple[str, int]


async def http(address: Address, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send ``request`` (raw bytes) and read the answer until the server closes."""
    with trio.fail_after(WAIT):
        stream = await trio.open_tcp_stream(*address)
        async with stream:
            await stream.send_all(request)
            data = bytearray()
            while chunk := await stream.receive_some(65536):
                data += chunk
    head, _, body = bytes(data).partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers, body


def get(path: str = "/metrics", method: str = "GET", extra: str = "") -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: x\r\n{extra}Connection: close\r\n\r\n".encode()


def endpoint(server: RunningServer) -> Address:
    assert server.server.metrics is not None, "[metrics] listen is not set"
    return server.server.metrics.addresses[0]


async def scrape(address: Address) -> Samples:
    status, headers, body = await http(address, get())
    assert status == 200
    assert headers["content-type"].startswith("text/plain; version=")
    samples: Samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            samples[sample.name, frozenset(sample.labels.items())] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[name, frozenset(labels.items())]


def total(scrapes: list[Samples], name: str, **labels: str) -> float:
    return sum(value(samples, name, **labels) for samples in scrapes)


def names(samples: Samples) -> set[str]:
    return {name for name, _ in samples}


async def test_metrics_count_logins_messages_errors_and_rate_limits(
    start_server: StartServer,
) -> None:
    server = await start_server(
        metrics={"listen": "127.0.0.1:0"},
        limits={"message_burst": 4, "messages_per_second": 0.01},
    )
    address = endpoint(server)
    before = await scrape(address)
    assert value(before, "securechat_logins_total", method="password", result="ok") == 0
    assert value(before, "securechat_connections", transport="tls", state="active") == 0

    alice = await server.login("alice")  # password
    bob = await server.login("bob", cert_user="bob")  # certificate, no password
    for user, password in (("dave", "not dave's password"), ("mallory", "whatever-it-is")):
        with pytest.raises(LoginRefused):
            await server.login(user, password=password)

    for n in range(3):
        await alice.send(Say(room="lobby", text=f"hello {n}", id=f"m{n}"))
        assert (await receive_type(alice, Ack)).ref == f"m{n}"
    for n in range(3):
        assert (await receive_type(bob, Message)).text == f"hello {n}"
    dave = await server.login("dave")
    await alice.send(Kick(username="dave", id="k"))  # alice is an admin
    assert (await receive_type(dave, Error)).code == ErrorCode.KICKED
    await wait_until(lambda: len(server.server.sessions) == 2)
    # Three messages and a kick took the four tokens of the burst.
    await alice.send(Say(room="lobby", text="one too many", id="m3"))
    refused = await receive_type(alice, Error)
    assert (refused.code, refused.ref) == (ErrorCode.RATE_LIMITED, "m3")
    await alice.send(Who(room="no-such-room", id="w"))
    assert (await receive_type(alice, Error)).code == ErrorCode.UNKNOWN_ROOM
    await bob.send(History(room="lobby", limit=10, id="h"))
    assert (await receive_type(bob, HistoryEnd)).ref == "h"

    after = await scrape(address)
    assert value(after, "securechat_logins_total", method="password", result="ok") == 2
    assert value(after, "securechat_logins_total", method="certificate", result="ok") == 1
    assert value(after, "securechat_logins_total", method="password", result="failed") == 2
    failures = "securechat_login_failures_total"
    assert value(after, failures, method="password", reason="wrong_password") == 1
    assert value(after, failures, method="password", reason="unknown_user") == 1
    assert value(after, "securechat_errors_sent_total", code="auth_failed") == 2
    assert value(after, "securechat_errors_sent_total", code="rate_limited") == 1
    assert value(after, "securechat_errors_sent_total", code="unknown_room") == 1
    assert value(after, "securechat_errors_sent_total", code="kicked") == 1
    assert value(after, "securechat_disconnects_total", reason="kicked") == 1
    assert value(after, "securechat_disconnects_total", reason="slow_consumer") == 0
    assert value(after, "securechat_rate_limited_total", kind="messages") == 1
    assert value(after, "securechat_rate_limited_total", kind="requests") == 0
    assert value(after, "securechat_messages_received_total", kind="room") == 3
    # Each message went to both connections in the lobby: six deliveries.
    assert value(after, "securechat_deliveries_total", kind="room") == 6
    assert value(after, "securechat_connections", transport="tls", state="active") == 2
    assert value(after, "securechat_users_online") == 2
    assert value(after, "securechat_rooms") == 1
    assert value(after, "securechat_history_requests_total", result="ok") == 1
    assert value(after, "securechat_history_duration_seconds_count") == 1
    assert value(after, "securechat_connections_accepted_total") == 5
    commits = value(after, "securechat_store_commit_duration_seconds_count")
    assert commits >= 1
    assert value(after, "securechat_store_commit_duration_seconds_bucket", le="+Inf") == commits
    # Three messages and the two logins' lobby memberships, in however many batches.
    assert value(after, "securechat_store_batch_size_sum") >= 5
    assert value(after, "securechat_server_info", version=__version__, worker="") == 1
    assert "process_resident_memory_bytes" in names(after)
    # No user or room name is a label value anywhere.
    labels = {label for _, pairs in after for _, label in pairs}
    assert not labels & {"alice", "bob", "dave", "mallory", "lobby", "no-such-room", "k", "h"}
    # Not a cluster node: no Redis metrics.
    assert "securechat_redis_requests_total" not in names(after)


async def test_metrics_count_slow_consumers_and_outbound_bytes(
    start_server: StartServer,
) -> None:
    server = await start_server(
        metrics={"listen": "127.0.0.1:0"},
        limits={"max_outbound_bytes": 65536, "messages_per_second": 1000, "message_burst": 1000},
    )
    address = endpoint(server)
    alice = await server.login("alice")
    # Bob logs in and reads nothing: his queue grows until the server lets him go.
    bob = await server.open()
    await bob.login("bob", SecretStr(PASSWORDS["bob"]))
    text = "x" * 4000
    with trio.fail_after(WAIT):
        sent = 0
        while not server.server.stats.disconnects["slow_consumer"]:
            await alice.send(Say(room="lobby", text=text, id=f"s{sent}"))
            await receive_type(alice, Ack)
            sent += 1
    samples = await scrape(address)
    assert value(samples, "securechat_disconnects_total", reason="slow_consumer") == 1
    assert value(samples, "securechat_outbound_queue_max_bytes") < 65536


async def test_bad_requests_to_the_metrics_port_get_specific_errors(
    start_server: StartServer,
) -> None:
    server = await start_server(metrics={"listen": "127.0.0.1:0"})
    address = endpoint(server)
    status, headers, body = await http(address, get("/", extra=""))
    assert status == 404
    assert b"/metrics" in body
    status, headers, _ = await http(address, get(method="POST"))
    assert (status, headers["allow"]) == (405, "GET, HEAD")
    status, headers, body = await http(address, get(method="HEAD"))
    assert (status, body) == (200, b"")
    assert int(headers["content-length"]) > 1000
    status, _, _ = await http(address, b"this is not HTTP\r\n\r\n")
    assert status == 400
    status, _, _ = await http(address, get("/metrics?" + "a" * 2000))
    assert status == 414
    status, _, _ = await http(address, get(extra="X-Big: " + "b" * 9000 + "\r\n"))
    assert status == 431
    many = "".join(f"X-{n}: {n}\r\n" for n in range(40))
    status, _, _ = await http(address, get(extra=many))
    assert status == 431
    status, _, _ = await http(
        address, b"GET /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"
    )
    assert status == 413
    # OpenMetrics when asked for (Prometheus asks for it first).
    status, headers, body = await http(
        address, get(extra="Accept: application/openmetrics-text; version=1.0.0\r\n")
    )
    assert status == 200
    assert headers["content-type"].startswith("application/openmetrics-text")
    assert body.endswith(b"# EOF\n")


async def test_a_silent_request_head_times_out_with_408(
    start_server: StartServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(metrics, "LIMITS", replace(metrics.LIMITS, request_timeout=0.2))
    server = await start_server(metrics={"listen": "127.0.0.1:0"})
    status, _, _ = await http(endpoint(server), b"GET /metrics HTTP/1.1\r\n")
    assert status == 408


async def test_the_metrics_port_never_blocks_the_chat(start_server: StartServer) -> None:
    server = await start_server(metrics={"listen": "127.0.0.1:0"})
    address = endpoint(server)
    # Every metrics connection the server allows is taken, each in the middle of a
    # request head that never ends; one more is closed at once.
    held = []
    with trio.fail_after(WAIT):
        for _ in range(metrics.MAX_CONNECTIONS):
            stream = await trio.open_tcp_stream(*address)
            await stream.send_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
            held.append(stream)
        extra = await trio.open_tcp_stream(*address)
        assert await extra.receive_some() == b""  # closed by the server, unanswered
        await extra.aclose()
    # Meanwhile the chat goes on as ever.
    alice = await server.login("alice")
    bob = await server.login("bob", cert_user="bob")
    await alice.send(Say(room="lobby", text="still here", id="1"))
    assert (await receive_type(bob, Message)).text == "still here"
    assert server.server.metrics is not None
    assert server.server.metrics.refused == 1
    for stream in held:
        await stream.aclose()
    # Once the server has seen them go, scrapes are answered again.
    endpoint_ = server.server.metrics
    await wait_until(lambda: endpoint_.connections == 0)
    samples = await scrape(address)
    assert value(samples, "securechat_messages_received_total", kind="room") == 1


async def test_metrics_are_off_unless_listen_is_set(start_server: StartServer) -> None:
    server = await start_server()
    assert server.server.metrics is None


def test_metrics_listen_must_be_host_and_port(make_config: ConfigFactory, tmp_path: Path) -> None:
    for bad in ("9100", "localhost", ":9100", "127.0.0.1:99999", "::1:9100", "host:port"):
        with pytest.raises(ConfigError, match=r"metrics\.listen: "):
            make_config(metrics={"listen": bad})
    assert make_config(metrics={"listen": "[::1]:9100"}).metrics.address == ("::1", 9100)
    assert make_config(metrics={"listen": "0.0.0.0:0"}).metrics.address == ("0.0.0.0", 0)  # noqa: S104
    assert make_config().metrics.address is None
    with pytest.raises(ConfigError, match=r"metrics\.port: unknown key"):
        parse_config({"metrics": {"port": 9100}}, tmp_path / "x.toml")


def test_a_taken_metrics_port_stops_the_server_with_one_line(
    tmp_path: Path,
    pki: Pki,
    password_hashes: dict[str, str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        data = config_data(pki, password_hashes)
        data["storage"] = {"path": str(tmp_path / "chat.db")}
        data["metrics"] = {"listen": f"127.0.0.1:{port}"}
        config = write_toml(tmp_path / "server.toml", data)
        assert main(["server", "--config", str(config)]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[-1] == (
        f"securechat: error: [metrics] cannot listen on 127.0.0.1:{port}: Address already in use"
    )


async def test_two_servers_have_registries_of_their_own(start_server: StartServer) -> None:
    first = await start_server(metrics={"listen": "127.0.0.1:0"})
    second = await start_server(metrics={"listen": "127.0.0.1:0"})
    await first.login("alice")
    one, two = await scrape(endpoint(first)), await scrape(endpoint(second))
    assert value(one, "securechat_logins_total", method="password", result="ok") == 1
    assert value(two, "securechat_logins_total", method="password", result="ok") == 0


async def test_the_metrics_of_a_closed_connection_go(start_server: StartServer) -> None:
    server = await start_server(metrics={"listen": "127.0.0.1:0"})
    connection: ChatConnection = await server.login("alice")
    samples = await scrape(endpoint(server))
    assert value(samples, "securechat_connections", transport="tls", state="active") == 1
    await connection.aclose()
    await wait_until(lambda: not server.server.sessions)
    samples = await scrape(endpoint(server))
    assert value(samples, "securechat_connections", transport="tls", state="active") == 0
    assert value(samples, "securechat_users_online") == 0


def two_free_ports() -> int:
    """A port P such that P and P + 1 are free now (a worker's metrics port is the
    configured one plus its number minus one)."""
    for _ in range(100):
        with socket.socket() as first, socket.socket() as second:
            first.bind(("127.0.0.1", 0))
            port: int = first.getsockname()[1]
            if port >= 65535:
                continue
            try:
                second.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
            return port
    raise AssertionError("no two consecutive free ports")


async def test_each_worker_serves_its_own_metrics_on_the_next_port(
    tmp_path: Path, pki: Pki, password_hashes: dict[str, str]
) -> None:
    async with private_redis_server(tmp_path / "redis") as redis:
        port = two_free_ports()
        data = config_data(pki, password_hashes)
        data["cluster"] = {"redis_url": redis.url}
        data["metrics"] = {"listen": f"127.0.0.1:{port}"}
        config = write_toml(tmp_path / "node.toml", data)
        async with supervised(config, pki) as workers:
            log = workers.log()
            served = sorted(
                int(found) for found in re.findall(r"metrics on http://127\.0\.0\.1:(\d+)/", log)
            )
            assert served == [port, port + 1]
            alice = await workers.endpoint.login("alice", cert_user="alice")
            await alice.send(Say(room="lobby", text="counted once", id="c"))
            assert (await receive_type(alice, Ack)).ref == "c"
            each = [await scrape(("127.0.0.1", port + n)) for n in (0, 1)]
            assert [
                value(s, "securechat_server_info", version=__version__, worker=str(n + 1))
                for n, s in enumerate(each)
            ] == [1, 1]
            # One worker took the message; both fed it from Redis's log.
            assert (
                sum(value(s, "securechat_messages_received_total", kind="room") for s in each) == 1
            )
            assert sum(value(s, "securechat_deliveries_total", kind="room") for s in each) == 1
            for samples in each:
                assert value(samples, "securechat_redis_requests_total", operation="load") > 0
                assert value(samples, "securechat_redis_errors_total", operation="write") == 0
                assert value(samples, "securechat_cluster_users_online") == 1
            writes = sum(
                value(s, "securechat_redis_requests_total", operation="write") for s in each
            )
            assert writes >= 1


async def test_a_websocket_session_counts_under_its_own_transport(
    start_server: StartServer,
) -> None:
    server = await start_server(metrics={"listen": "127.0.0.1:0"})
    context = server.client_context()
    context.set_alpn_protocols(["http/1.1"])
    stream = await trio.open_ssl_over_tcp_stream(server.host, server.port, ssl_context=context)
    socket_ = WSConnection(ConnectionType.CLIENT)
    origin = f"https://{server.host}:{server.port}"
    with trio.fail_after(WAIT):
        upgrade = WsRequest(
            host=server.host, target="/ws", extra_headers=[(b"Origin", origin.encode())]
        )
        await stream.send_all(socket_.send(upgrade))
        hello = encode(Hello(username="alice", password=SecretStr(PASSWORDS["alice"])))
        welcomed = False
        while not welcomed:
            socket_.receive_data(bytes(await stream.receive_some()))
            for event in socket_.events():
                if isinstance(event, AcceptConnection):
                    text = hello.decode().strip()  # one envelope per message, no newline
                    await stream.send_all(socket_.send(TextMessage(data=text)))
                elif isinstance(event, TextMessage):
                    welcomed = '"welcome"' in event.data
    samples = await scrape(endpoint(server))
    assert value(samples, "securechat_connections", transport="ws", state="active") == 1
    assert value(samples, "securechat_connections", transport="tls", state="active") == 0
    assert value(samples, "securechat_logins_total", method="password", result="ok") == 1
    await trio.aclose_forcefully(stream)


async def test_docs_and_dashboard_name_exactly_the_metrics_served(
    start_server: StartServer,
) -> None:
    """docs/metrics.md's tables list every securechat_* metric a server serves (cluster
    nodes add the Redis ones), and the Grafana dashboard asks for none that is not."""
    server = await start_server(metrics={"listen": "127.0.0.1:0"})
    _, _, body = await http(endpoint(server), get())
    # Every family the server declares, with or without samples yet.
    served = set(re.findall(r"^# TYPE (securechat_\w+) ", body.decode(), re.M))
    docs = DOCS
    documented = set(re.findall(r"^\| `(securechat_\w+)`", (docs / "metrics.md").read_text(), re.M))
    cluster_only = {
        "securechat_cluster_users_online",
        "securechat_redis_requests_total",
        "securechat_redis_errors_total",
    }
    assert documented - cluster_only == served
    dashboard = (docs / "grafana-dashboard.json").read_text()
    asked = {
        re.sub(r"_(bucket|sum|count)$", "", name)
        for name in re.findall(r"securechat_\w+", dashboard)
    }
    assert asked - {"securechat_server_info"} <= documented


@pytest.mark.parametrize(
    ("listen", "status", "fragment"),
    [
        ("127.0.0.1:9100", "ok", "http://127.0.0.1:9100/metrics (plain HTTP), on loopback"),
        ("[::1]:0", "ok", "on loopback"),
        ("0.0.0.0:9100", "warning", "is reachable from other hosts, without a login"),
    ],
)
def test_check_config_says_where_the_metrics_are_and_warns_off_loopback(
    tmp_path: Path,
    pki: Pki,
    password_hashes: dict[str, str],
    listen: str,
    status: str,
    fragment: str,
) -> None:
    data = config_data(pki, password_hashes)
    data["metrics"] = {"listen": listen}
    config = write_toml(tmp_path / "server.toml", data)
    config.chmod(0o600)
    report = lines(check_config(config))
    [found] = [line for line in report[status] if line.startswith("metrics ")]
    assert fragment in found
