"""The chat page's side of a real server (TLS on 127.0.0.1): routing, static files, the
WebSocket session beside line clients, and hostile HTTP and WebSocket input. Every
hostile test checks the specific status or close code, and that a line client
connected meanwhile is unharmed."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest
import trio
from pydantic import SecretStr
from wsproto.connection import Connection, ConnectionType
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    Request,
    TextMessage,
)

from securechat.client import ChatConnection
from securechat.protocol import (
    ALPN_PROTOCOL,
    Ack,
    Bye,
    Dm,
    Error,
    ErrorCode,
    Hello,
    Message,
    Presence,
    Say,
    Welcome,
    encode,
    parse_server_frame,
)
from securechat.protocol import Ping as PingEnvelope
from securechat.protocol import Pong as PongEnvelope
from securechat.web import StaticFiles, default_origins
from securechat.websocket import text_frame

from .conftest import PASSWORDS, WAIT, RunningServer, StartServer, receive_type
from .web_client import (
    Refused,
    WebSocketClient,
    get,
    http_exchange,
    open_tls,
    origin,
    parse_answers,
    read_until_closed,
    web_context,
)


async def ws_login(server: RunningServer, user: str = "alice") -> WebSocketClient:
    client = await WebSocketClient.connect(server)
    await client.send_envelope(Hello(username=user, password=SecretStr(PASSWORDS[user])))
    welcome = await client.receive_type(Welcome)
    assert welcome.username == user
    return client


async def assert_unharmed(connection: ChatConnection, server: RunningServer) -> None:
    """``connection`` (a line client) is still served, and so is a new login."""
    await connection.send(PingEnvelope(id="still-here"))
    assert (await receive_type(connection, PongEnvelope)).ref == "still-here"
    fresh = await server.login("dave")
    await fresh.send(PingEnvelope(id="fresh"))
    assert (await receive_type(fresh, PongEnvelope)).ref == "fresh"


async def went_offline(connection: ChatConnection, user: str) -> None:
    with trio.fail_after(WAIT):
        while True:
            presence = await receive_type(connection, Presence)
            if (presence.username, presence.state, presence.room) == (user, "offline", None):
                return


# --- routing ---------------------------------------------------------------------------


async def test_alpn_picks_the_framing(server: RunningServer) -> None:
    line = await server.open()
    assert line.stream.selected_alpn_protocol() == ALPN_PROTOCOL
    browser = await open_tls(server)
    try:
        assert browser.selected_alpn_protocol() == "http/1.1"
        await browser.send_all(get("/", server))
        (answer,) = parse_answers(await read_until_closed(browser))
        assert answer.status == 200
    finally:
        await trio.aclose_forcefully(browser)


async def test_without_alpn_the_first_bytes_decide(server: RunningServer) -> None:
    (answer,) = await http_exchange(server, get("/", server), alpn=None)
    assert answer.status == 200
    assert answer.headers["content-type"] == "text/html; charset=utf-8"

    stream = await open_tls(server, alpn=None)
    assert stream.selected_alpn_protocol() is None
    connection = ChatConnection(stream)
    welcome = await connection.login("bob", SecretStr(PASSWORDS["bob"]))
    assert welcome.username == "bob"
    await trio.aclose_forcefully(stream)

    ws = await WebSocketClient.connect(server, alpn=None)
    await ws.send_envelope(Hello(username="alice", password=SecretStr(PASSWORDS["alice"])))
    assert (await ws.receive_type(Welcome)).username == "alice"
    await ws.aclose()


async def test_a_silent_client_without_alpn_gets_the_login_timeout(
    start_server: StartServer,
) -> None:
    server = await start_server(limits={"login_timeout": 0.5})
    stream = await open_tls(server, alpn=None)
    data = await read_until_closed(stream)
    assert parse_server_frame(data.rstrip(b"\n")) == Error(
        code=ErrorCode.TIMEOUT, message="no hello before the deadline"
    )


async def test_web_disabled_serves_lines_only(start_server: StartServer) -> None:
    off = await start_server(web={"enabled": False})
    stream = await open_tls(off)
    assert stream.selected_alpn_protocol() is None
    await stream.send_all(get("/", off))
    # A line server answers HTTP as a bad frame, as it always did.
    assert b'"code":"bad_frame"' in await read_until_closed(stream)
    await trio.aclose_forcefully(stream)


async def test_shutdown_does_not_wait_for_idle_http(start_server: StartServer) -> None:
    server = await start_server(limits={"shutdown_grace": 3600}, web={"keepalive_timeout": 3600})
    stream = await open_tls(server)
    await stream.send_all(get("/", server, close=False))
    received = b""
    with trio.fail_after(WAIT):
        while b"</html>" not in received:
            received += await stream.receive_some()
    server.server.request_shutdown()
    await read_until_closed(stream)  # at once, not after the grace or keep-alive time


# --- static files ----------------------------------------------------------------------


async def test_page_has_security_and_cache_headers(server: RunningServer) -> None:
    first = get("/", server, close=False)
    (answer,) = await http_exchange(server, get("/", server))
    assert answer.status == 200
    assert b"<html" in answer.body
    headers = answer.headers
    csp = headers["content-security-policy"]
    assert "default-src 'self'" in csp
    assert "connect-src 'self'" in csp
    assert "frame-ancestors 'none'" in csp
    assert "unsafe-inline" not in csp
    assert "script-src 'self'" in csp
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["referrer-policy"] == "no-referrer"
    assert headers["x-frame-options"] == "DENY"
    assert "strict-transport-security" not in headers  # (asked for by IP address)
    assert headers["cache-control"] == "no-cache"
    named = b"GET / HTTP/1.1\r\nHost: chat.example.org:8000\r\nConnection: close\r\n\r\n"
    (by_name,) = await http_exchange(server, named)
    assert by_name.headers["strict-transport-security"] == "max-age=31536000"
    etag = headers["etag"]
    # Revalidation on the same connection: 304 without a body.
    again = get("/index.html", server, f"If-None-Match: {etag}")
    second, third = await http_exchange(server, first + again)
    assert (second.status, third.status) == (200, 304)
    assert third.body == b""
    assert "content-length" not in third.headers
    assert third.headers["etag"] == etag


async def test_no_path_reaches_outside_the_table(server: RunningServer) -> None:
    paths = [
        "/../pyproject.toml",
        "/%2e%2e/securechat/config.py",
        "/..%2fserver.py",
        "/%2e%2e%2f%2e%2e%2fetc%2fpasswd",
        "/static/index.html",
        "//etc/passwd",
        "/index.html/",
        "/server.py",
        "/__init__.py",
        "/.",
        "/static/",
        "/INDEX.HTML",
        "/index.html%00.js",
    ]
    for path in paths:
        (answer,) = await http_exchange(server, get(path, server))
        assert answer.status == 404, path
        assert answer.headers["cache-control"] == "no-store"
    (answer,) = await http_exchange(server, get("/index.html?x=1", server))
    assert answer.status == 200


async def test_methods(server: RunningServer) -> None:
    host = f"Host: {server.host}"
    (head,) = await http_exchange(
        server, f"HEAD / HTTP/1.1\r\n{host}\r\nConnection: close\r\n\r\n".encode()
    )
    assert head.status == 200
    assert int(head.headers["content-length"]) > 0
    assert head.body == b""
    for method in ("POST", "PUT", "DELETE", "OPTIONS", "TRACE", "CONNECT", "PATCH"):
        sent = f"{method} / HTTP/1.1\r\n{host}\r\nContent-Length: 0\r\n\r\n".encode()
        (answer,) = await http_exchange(server, sent)
        assert answer.status == 405, method
        assert answer.headers["allow"] == "GET, HEAD"
        assert answer.headers["connection"] == "close"


# --- the WebSocket session -------------------------------------------------------------


async def test_browser_and_line_client_chat(server: RunningServer) -> None:
    alice = await ws_login(server, "alice")
    bob = await server.login("bob")
    online = await alice.receive_type(Presence)
    assert (online.username, online.state) == ("bob", "online")

    await alice.send_envelope(Say(room="lobby", text="hi from the browser", id="w1"))
    heard = await receive_type(bob, Message)
    assert (heard.sender, heard.text, heard.room) == ("alice", "hi from the browser", "lobby")

    await bob.send(Say(room="lobby", text="<img src=x onerror=alert(1)>", id="l1"))
    heard = await alice.receive_type(Message)
    assert heard.sender == "alice"  # her own, first
    heard = await alice.receive_type(Message)
    assert (heard.sender, heard.text) == ("bob", "<img src=x onerror=alert(1)>")

    await bob.send(Dm(to="alice", text="just you", id="l2"))
    direct = await alice.receive_type(Message)
    assert (direct.sender, direct.to, direct.text) == ("bob", "alice", "just you")
    await alice.send_envelope(Dm(to="bob", text="and you", id="w2"))
    direct = await receive_type(bob, Message)
    while direct.sender == "bob":  # his own, first
        direct = await receive_type(bob, Message)
    assert (direct.sender, direct.to, direct.text) == ("alice", "bob", "and you")

    await alice.send_envelope(PingEnvelope(id="p1"))
    assert (await alice.receive_type(PongEnvelope)).ref == "p1"

    # A clean goodbye: the close handshake with 1000, and bob sees alice go.
    await alice.send_envelope(Bye())
    await alice.receive_closed()
    assert alice.closed is not None
    assert alice.closed.code == 1000
    await went_offline(bob, "alice")


async def test_first_message_in_the_same_write_as_the_upgrade(server: RunningServer) -> None:
    # What follows the upgrade request in the same read is the WebSocket's first data.
    stream = await open_tls(server)
    client = WebSocketClient(stream)
    request = Request(
        host=f"{server.host}:{server.port}",
        target="/ws",
        extra_headers=[(b"origin", origin(server).encode())],
    )
    hello = Hello(username="bob", password=SecretStr(PASSWORDS["bob"]))
    await stream.send_all(client.ws.send(request) + masked_frame(0x1, encode(hello).strip()))
    assert isinstance(await client.next_event(), AcceptConnection)
    assert (await client.receive_type(Welcome)).username == "bob"


async def test_websocket_pings_are_answered(server: RunningServer) -> None:
    alice = await ws_login(server)
    await alice.send_event(Ping(payload=b"are you there"))
    await alice.send_envelope(PingEnvelope(id="after"))
    assert (await alice.receive_type(PongEnvelope)).ref == "after"
    assert alice.pongs == [b"are you there"]


async def test_the_server_pings_a_quiet_websocket(start_server: StartServer) -> None:
    # WebSocket pings at half the idle timeout: the browser answers them by itself. They
    # do not replace the session's liveness rule: its ping envelope still comes.
    server = await start_server(limits={"idle_timeout": 0.4, "ping_timeout": 5.0})
    alice = await ws_login(server)
    assert (await alice.receive_type(PingEnvelope)).id == "srv1"
    assert alice.pings[:1] == [b"1"]


async def test_wrong_password_over_websocket(server: RunningServer) -> None:
    client = await WebSocketClient.connect(server)
    await client.send_envelope(Hello(username="bob", password=SecretStr("not-the-password")))
    received = await client.receive_closed()
    assert [e.code for e in received if isinstance(e, Error)] == [ErrorCode.AUTH_FAILED]


async def test_shutdown_closes_websockets_with_going_away(start_server: StartServer) -> None:
    server = await start_server()
    alice = await ws_login(server)
    server.server.request_shutdown()
    received = await alice.receive_closed()
    assert [e.code for e in received if isinstance(e, Error)] == [ErrorCode.SERVER_SHUTDOWN]
    assert alice.closed is not None
    assert alice.closed.code == 1001


async def test_certificate_login_over_websocket(server: RunningServer) -> None:
    # A browser that presents carol's certificate (from its certificate store): no password.
    context = web_context(server)
    context.load_cert_chain(server.pki.cert("carol"), server.pki.key("carol"))
    client = await WebSocketClient.connect(server, context=context)
    await client.send_envelope(Hello(username="carol"))
    assert (await client.receive_type(Welcome)).username == "carol"


async def test_websocket_flooder_is_cut_like_a_line_flooder(start_server: StartServer) -> None:
    server = await start_server(limits={"messages_per_second": 5, "message_burst": 10})
    bob = await server.login("bob")
    flooder = await ws_login(server, "alice")
    for n in range(200):
        try:
            await flooder.send_envelope(Say(room="lobby", text=f"flood {n}", id=f"f{n}"))
        except trio.BrokenResourceError:
            break
    received = await flooder.receive_closed()
    limited = [e for e in received if isinstance(e, Error) and e.code == ErrorCode.RATE_LIMITED]
    assert len([e for e in received if isinstance(e, Ack)]) == 10
    assert limited[-1].message == "flooding: disconnected"
    assert flooder.closed is not None
    assert flooder.closed.code == 1000
    await assert_unharmed(bob, server)


async def test_a_ping_flood_gets_one_pong_per_read(server: RunningServer) -> None:
    bob = await server.login("bob")
    alice = await ws_login(server)
    # 1000 pings in one TLS record: the server reads them at once and answers the last.
    await alice.stream.send_all(b"".join(masked_frame(0x9, b"%d" % n) for n in range(1000)))
    await alice.send_envelope(PingEnvelope(id="after"))
    assert (await alice.receive_type(PongEnvelope)).ref == "after"
    assert alice.pongs == [b"999"]
    await assert_unharmed(bob, server)


# --- hostile WebSocket input -----------------------------------------------------------


def masked_frame(opcode: int, payload: bytes, *, fin: bool = True) -> bytes:
    """A client frame, built by hand (for what wsproto will not send)."""
    head = bytes([(0x80 if fin else 0) | opcode])
    if len(payload) < 126:
        head += bytes([0x80 | len(payload)])
    elif len(payload) < 65536:
        head += bytes([0x80 | 126]) + struct.pack("!H", len(payload))
    else:
        head += bytes([0x80 | 127]) + struct.pack("!Q", len(payload))
    mask = os.urandom(4)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


async def closed_with(client: WebSocketClient) -> tuple[list[ErrorCode], int]:
    received = await client.receive_closed()
    assert client.closed is not None
    return [e.code for e in received if isinstance(e, Error)], client.closed.code


@pytest.mark.parametrize("logged_in", [False, True])
async def test_oversize_message_is_closed_with_1009(
    start_server: StartServer, logged_in: bool
) -> None:
    server = await start_server(max_frame_bytes=2048)
    bob = await server.login("bob")
    client = await ws_login(server) if logged_in else await WebSocketClient.connect(server)
    await client.send_text("x" * 2049)
    assert await closed_with(client) == ([ErrorCode.FRAME_TOO_LARGE], 1009)
    await assert_unharmed(bob, server)


async def test_message_of_exactly_the_cap_is_read(start_server: StartServer) -> None:
    server = await start_server(max_frame_bytes=2048)
    alice = await ws_login(server)
    text = '{"type":"ping","id":"edge"}'
    await alice.send_text(text + " " * (2048 - len(text)))
    assert (await alice.receive_type(PongEnvelope)).ref == "edge"


async def test_fragments_beyond_the_cap_are_closed_with_1009(start_server: StartServer) -> None:
    server = await start_server(max_frame_bytes=2048)
    bob = await server.login("bob")
    alice = await ws_login(server)
    with trio.fail_after(WAIT):
        for _ in range(9):  # 9 × 256 bytes, never finished
            await alice.send_event(TextMessage(data="y" * 256, message_finished=False))
    assert await closed_with(alice) == ([ErrorCode.FRAME_TOO_LARGE], 1009)
    await assert_unharmed(bob, server)


async def test_a_huge_declared_length_is_closed_without_waiting_for_it(
    start_server: StartServer,
) -> None:
    server = await start_server(max_frame_bytes=2048)
    bob = await server.login("bob")
    alice = await ws_login(server)
    # The header says 1 GiB; the server stops at the cap, after what arrived.
    header = bytes([0x81, 0x80 | 127]) + struct.pack("!Q", 1 << 30) + b"\0\0\0\0"
    await alice.stream.send_all(header + b"z" * 4096)
    assert await closed_with(alice) == ([ErrorCode.FRAME_TOO_LARGE], 1009)
    await assert_unharmed(bob, server)


async def test_fragment_flood_is_closed_with_1009(server: RunningServer) -> None:
    bob = await server.login("bob")
    alice = await ws_login(server)
    data = b"".join(masked_frame(0x1 if i == 0 else 0x0, b"", fin=False) for i in range(1100))
    await alice.stream.send_all(data)
    assert await closed_with(alice) == ([ErrorCode.FRAME_TOO_LARGE], 1009)
    await assert_unharmed(bob, server)


async def test_binary_message_is_closed_with_1003(server: RunningServer) -> None:
    bob = await server.login("bob")
    alice = await ws_login(server)
    await alice.send_event(BytesMessage(data=b'{"type":"ping"}'))
    assert await closed_with(alice) == ([ErrorCode.BAD_FRAME], 1003)
    await assert_unharmed(bob, server)


async def test_invalid_utf8_is_closed_with_1007(server: RunningServer) -> None:
    bob = await server.login("bob")
    alice = await ws_login(server)
    await alice.stream.send_all(masked_frame(0x1, b'{"type":"ping","id":"\xff\xfe"}'))
    assert await closed_with(alice) == ([ErrorCode.BAD_FRAME], 1007)
    await assert_unharmed(bob, server)


async def test_unmasked_frame_is_closed_with_1002(server: RunningServer) -> None:
    bob = await server.login("bob")
    alice = await ws_login(server)
    await alice.stream.send_all(b"\x81\x05hello")
    assert await closed_with(alice) == ([ErrorCode.BAD_FRAME], 1002)
    await assert_unharmed(bob, server)


async def test_bad_json_over_websocket_keeps_the_connection(server: RunningServer) -> None:
    alice = await ws_login(server)
    await alice.send_text("this is not json")
    assert (await alice.receive_type(Error)).code == ErrorCode.BAD_FRAME
    await alice.send_envelope(PingEnvelope(id="fine"))
    assert (await alice.receive_type(PongEnvelope)).ref == "fine"


async def test_client_close_is_answered(server: RunningServer) -> None:
    bob = await server.login("bob")
    alice = await ws_login(server)
    await alice.send_event(CloseConnection(code=1000, reason="bye"))
    await alice.receive_closed()
    assert alice.closed is not None
    assert alice.closed.code == 1000
    await went_offline(bob, "alice")


# --- hostile handshakes and HTTP -------------------------------------------------------


async def test_foreign_or_missing_origin_is_refused(
    server: RunningServer, caplog: pytest.LogCaptureFixture
) -> None:
    bob = await server.login("bob")
    for header in ("https://evil.example", "null", f"http://{server.host}:{server.port}", None):
        with pytest.raises(Refused) as refused:
            await WebSocketClient.connect(server, origin_header=header)
        assert refused.value.status == 403, header
    assert origin(server) == f"https://127.0.0.1:{server.port}"
    # One line for the burst (at most one a second), naming the first Origin.
    assert "403 websocket from Origin 'https://evil.example'" in caplog.text
    await assert_unharmed(bob, server)


async def test_allowed_origins_from_the_config(start_server: StartServer) -> None:
    server = await start_server(web={"allowed_origins": ["https://chat.example.org"]})
    client = await WebSocketClient.connect(server, origin_header="https://chat.example.org")
    await client.aclose()
    with pytest.raises(Refused) as refused:
        await WebSocketClient.connect(server)  # its own origin is no longer in the list
    assert refused.value.status == 403


async def test_bad_upgrades(server: RunningServer) -> None:
    bob = await server.login("bob")
    own = f"Origin: {origin(server)}"
    cases = {
        (own, "Upgrade: websocket", "Connection: Upgrade", "Sec-WebSocket-Version: 13"): 400,
        (
            own,
            "Upgrade: websocket",
            "Connection: Upgrade",
            "Sec-WebSocket-Version: 13",
            "Sec-WebSocket-Key: short",
        ): 400,
        (
            own,
            "Upgrade: websocket",
            "Connection: Upgrade",
            "Sec-WebSocket-Version: 8",
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        ): 426,
        (own,): 426,  # a plain GET of /ws
    }
    for headers, status in cases.items():
        (answer,) = await http_exchange(server, get("/ws", server, *headers))
        assert answer.status == status, headers
    await assert_unharmed(bob, server)


async def test_oversized_heads(start_server: StartServer) -> None:
    server = await start_server(
        web={"max_request_line": 512, "max_header_bytes": 2048, "max_headers": 16}
    )
    bob = await server.login("bob")
    cases = {
        get("/" + "a" * 600, server): 414,
        b"GET /" + b"a" * 5000: 414,  # a request line that never ends
        get("/", server, *(f"X-H{i}: v" for i in range(20))): 431,
        get("/", server, "X-Big: " + "b" * 3000): 431,
        b"GET / HTTP/1.1\r\nHost: a\r\nX: " + b"b" * 100_000: 431,  # a head that never ends
        b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello": 413,
        b"GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n": 413,
        b"GET / HTTP/1.1\r\nbroken header\r\n\r\n": 400,
        b"GET / HTTP/9.9\r\nHost: a\r\n\r\n": 505,
    }
    for sent, status in cases.items():
        (answer,) = await http_exchange(server, sent)
        assert answer.status == status, sent[:50]
        assert answer.headers["connection"] == "close"
    await assert_unharmed(bob, server)


async def test_slow_request_head_gets_408(start_server: StartServer) -> None:
    server = await start_server(web={"request_timeout": 0.5})
    bob = await server.login("bob")
    stream = await open_tls(server)
    await stream.send_all(b"GET / HTTP/1.1\r\nHost: a\r\n")  # and never the end
    (answer,) = parse_answers(await read_until_closed(stream))
    assert answer.status == 408
    await trio.aclose_forcefully(stream)
    # A client that never sends anything gets 408 too, at the same deadline.
    stream = await open_tls(server)
    (answer,) = parse_answers(await read_until_closed(stream))
    assert answer.status == 408
    await trio.aclose_forcefully(stream)
    await assert_unharmed(bob, server)


async def test_idle_keep_alive_is_closed(start_server: StartServer) -> None:
    server = await start_server(web={"keepalive_timeout": 0.5})
    stream = await open_tls(server)
    await stream.send_all(get("/", server, close=False))
    (answer,) = parse_answers(await read_until_closed(stream))
    assert answer.status == 200
    await trio.aclose_forcefully(stream)


async def test_keep_alive_flood_is_capped(start_server: StartServer) -> None:
    server = await start_server(web={"max_requests_per_connection": 5})
    bob = await server.login("bob")
    answers = await http_exchange(server, get("/", server, close=False) * 50)
    assert [answer.status for answer in answers] == [200] * 5
    assert [answer.headers.get("connection") for answer in answers] == [None] * 4 + ["close"]
    await assert_unharmed(bob, server)


async def test_busy_server_answers_http_with_503(start_server: StartServer) -> None:
    server = await start_server(limits={"max_connections": 2})
    held = [await server.login(name) for name in ("alice", "bob")]
    (answer,) = await http_exchange(server, get("/", server))
    assert answer.status == 503
    assert answer.headers["retry-after"] == "5"
    await held[1].send(PingEnvelope(id="ok"))
    assert (await receive_type(held[1], PongEnvelope)).ref == "ok"


# --- pure parts ------------------------------------------------------------------------


def test_static_table_holds_plain_files_of_known_types(tmp_path: Path) -> None:
    (tmp_path / "index.html").write_text("<html></html>")
    (tmp_path / "app.js").write_text("1")
    (tmp_path / "app.css").write_text("a{}")
    (tmp_path / ".secret.js").write_text("no")
    (tmp_path / "notes.md").write_text("no")
    (tmp_path / "noext").write_text("no")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "inner.js").write_text("no")
    (tmp_path / "link.js").symlink_to(tmp_path / "sub" / "inner.js")
    files = StaticFiles.load(tmp_path).files
    assert set(files) == {"/", "/index.html", "/app.js", "/app.css"}  # no link either
    assert files["/app.js"].content_type == "text/javascript; charset=utf-8"
    assert files["/"] is files["/index.html"]


def test_the_package_ships_the_page() -> None:
    files = StaticFiles.load().files
    assert files["/"].content_type == "text/html; charset=utf-8"


def test_default_origins() -> None:
    names = ["localhost", "127.0.0.1", "::1", "0.0.0.0", "::", "Chat.Example"]  # noqa: S104
    assert default_origins(names, 8000) == {
        "https://localhost:8000",
        "https://127.0.0.1:8000",
        "https://[::1]:8000",
        "https://chat.example:8000",
    }
    assert default_origins(["chat.example"], 443) == {
        "https://chat.example:443",
        "https://chat.example",
    }


@pytest.mark.parametrize("size", [1, 125, 126, 65535, 65536, 70000])
def test_text_frame_is_what_a_client_reads(size: int) -> None:
    client = Connection(ConnectionType.CLIENT)
    payload = ("é" * (size // 2) + "a" * (size % 2)).encode()
    client.receive_data(text_frame(payload))
    (event,) = client.events()
    assert isinstance(event, TextMessage)
    assert event.message_finished
    assert event.data.encode() == payload
