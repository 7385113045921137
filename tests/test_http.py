"""securechat.http over memory streams: limits, statuses, keep-alive, deadlines (MockClock)."""

from __future__ import annotations

import re

import trio
import trio.testing

from securechat.http import (
    CONTENT_SECURITY_POLICY,
    HttpConnection,
    HttpLimits,
    Request,
    Response,
    sends_hsts,
)

LIMITS = HttpLimits(
    max_request_line=200,
    max_header_bytes=1024,
    max_headers=10,
    request_timeout=5.0,
    keepalive_timeout=20.0,
    max_requests=3,
)


async def hello(request: Request) -> Response:
    return Response(200, f"hello {request.path}".encode(), cache="no-cache")


async def exchange(sent: bytes, limits: HttpLimits = LIMITS) -> tuple[bytes, bool]:
    """Everything the server answers to ``sent`` (then EOF), and serve's graceful flag."""
    client, server = trio.testing.memory_stream_pair()
    received = bytearray()
    graceful = False

    async def run_server() -> None:
        nonlocal graceful
        graceful = await HttpConnection(server, limits, hsts_max_age=60).serve(hello)
        await server.aclose()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_server)
        await client.send_all(sent)
        await client.send_eof()
        while data := await client.receive_some():
            received += data
    return bytes(received), graceful


def statuses(answer: bytes) -> list[int]:
    return [int(status) for status in re.findall(rb"HTTP/1\.1 (\d{3}) ", answer)]


async def test_get_with_security_headers() -> None:
    answer, graceful = await exchange(b"GET /x?y=1 HTTP/1.1\r\nHost: a\r\n\r\n")
    assert graceful
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert body == b"hello /x"
    lines = head.decode().lower().split("\r\n")
    assert f"content-security-policy: {CONTENT_SECURITY_POLICY}".lower() in lines
    for expected in (
        "x-content-type-options: nosniff",
        "referrer-policy: no-referrer",
        "x-frame-options: deny",
        "strict-transport-security: max-age=60",
        "cache-control: no-cache",
    ):
        assert expected in lines


def test_hsts_is_sent_for_names_but_not_for_localhost_or_addresses() -> None:
    for name in ("chat.example.org", "chat.example.org:8000", "Chat.Example.Org.", "a"):
        assert sends_hsts(name), name
    for host in (
        None,
        "",
        "localhost",
        "localhost:8000",
        "LOCALHOST.",
        "app.localhost:3000",
        "127.0.0.1:8000",
        "10.1.2.3",
        "[::1]:8000",
        "[2001:db8::1]",
    ):
        assert not sends_hsts(host), host


async def test_no_hsts_for_localhost() -> None:
    answer, _ = await exchange(b"GET / HTTP/1.1\r\nHost: localhost:8000\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200 ")
    assert b"strict-transport-security" not in answer.lower()


async def test_head_has_no_body() -> None:
    answer, _ = await exchange(b"HEAD / HTTP/1.1\r\nHost: a\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200 ")
    assert b"content-length: 7\r\n" in answer.lower()
    assert answer.endswith(b"\r\n\r\n")


async def test_keep_alive_is_capped() -> None:
    one = b"GET /a HTTP/1.1\r\nHost: a\r\n\r\n"
    answer, _ = await exchange(one * 5)
    assert statuses(answer) == [200, 200, 200]
    assert answer.lower().count(b"connection: close") == 1


async def test_limits_get_specific_statuses() -> None:
    cases = {
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc": 405,
        b"DELETE / HTTP/1.1\r\nHost: a\r\n\r\n": 405,
        b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc": 413,
        b"GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n": 413,
        b"GET /" + b"a" * 300 + b" HTTP/1.1\r\nHost: a\r\n\r\n": 414,
        b"GET /" + b"a" * 300: 414,  # a long line that never ends
        b"GET / HTTP/1.1\r\nHost: a\r\n" + b"X-A: b\r\n" * 20 + b"\r\n": 431,
        b"GET / HTTP/1.1\r\nHost: a\r\nX-A: " + b"b" * 2000 + b"\r\n\r\n": 431,
        b"GET / HTTP/1.1\r\nno colon here\r\n\r\n": 400,
        b"GET / HTTP/1.1\r\n\r\n": 400,  # no Host
        b"GET http://elsewhere/ HTTP/1.1\r\nHost: a\r\n\r\n": 400,
    }
    for sent, status in cases.items():
        answer, _ = await exchange(sent)
        assert statuses(answer) == [status], sent[:60]
        assert b"connection: close" in answer.lower()
        assert b"cache-control: no-store" in answer.lower()


async def test_head_fed_byte_by_byte() -> None:
    client, server = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(HttpConnection(server, LIMITS).serve, hello)
        for byte in b"GET /slow HTTP/1.1\r\nHost: a\r\n\r\n":
            await client.send_all(bytes([byte]))
        received = b""
        while not received.endswith(b"hello /slow"):
            received += await client.receive_some()
        nursery.cancel_scope.cancel()


async def test_slow_head_gets_408(autojump_clock: trio.testing.MockClock) -> None:
    client, server = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        result: list[bool] = []

        async def run() -> None:
            result.append(await HttpConnection(server, LIMITS).serve(hello))

        nursery.start_soon(run)
        await client.send_all(b"GET / HTTP/1.1\r\n")
        start = trio.current_time()
        received = b""
        while data := await client.receive_some():
            received += data
            if b"\r\n\r\n" in received:
                break
        assert statuses(received) == [408]
        assert trio.current_time() - start == LIMITS.request_timeout


async def test_idle_keep_alive_closes_silently(autojump_clock: trio.testing.MockClock) -> None:
    client, server = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        result: list[bool] = []

        async def run() -> None:
            result.append(await HttpConnection(server, LIMITS).serve(hello))
            await server.aclose()

        nursery.start_soon(run)
        await client.send_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        start = trio.current_time()
        received = b""
        while data := await client.receive_some():
            received += data
        assert statuses(received) == [200]
        assert trio.current_time() - start == LIMITS.keepalive_timeout
    assert result == [True]
