"""Integration tests: the real server over real TLS, real certificates, real clients."""

from __future__ import annotations

import ssl

import pytest
import trio
from pydantic import SecretStr

from securechat import tls
from securechat.client import ChatConnection, ClientError
from securechat.protocol import (
    ALPN_PROTOCOL,
    Ack,
    Bye,
    Error,
    ErrorCode,
    Hello,
    Message,
    Ping,
    Pong,
    Say,
    Welcome,
    encode,
)

from .conftest import (
    PASSWORDS,
    WAIT,
    Pki,
    RunningServer,
    StartServer,
    receive_closed,
    receive_type,
)


async def test_two_users_chat(server: RunningServer) -> None:
    alice = await server.login("alice")
    bob = await server.login("bob")
    await alice.send(Say(room="lobby", text="hi bob", id="c1"))

    at_bob = await receive_type(bob, Message)
    at_alice = await receive_type(alice, Message)
    ack = await receive_type(alice, Ack)
    assert (at_bob.sender, at_bob.room, at_bob.text) == ("alice", "lobby", "hi bob")
    assert at_alice == at_bob  # the sender gets its own message, identical
    assert ack.ref == "c1"
    assert ack.id == at_bob.id

    await bob.send(Say(room="lobby", text="hello alice", id="b1"))
    reply = await receive_type(alice, Message)
    assert (reply.sender, reply.text) == ("bob", "hello alice")
    assert reply.id > at_bob.id


async def test_welcome_names_user_rooms_and_server(server: RunningServer) -> None:
    connection = await server.open()
    await connection.send(Hello(username="bob", password=SecretStr(PASSWORDS["bob"]), id="hello-1"))
    welcome = await receive_type(connection, Welcome)
    assert welcome.username == "bob"
    assert welcome.rooms == ["lobby"]
    assert welcome.server.startswith("securechat/")
    assert welcome.ref == "hello-1"


@pytest.mark.parametrize(
    ("username", "password"),
    [("bob", "not-bobs-password"), ("nobody", "whatever-password"), ("carol", "any-password")],
    ids=["wrong-password", "unknown-user", "user-without-password"],
)
async def test_failed_login_is_refused_the_same_way_and_closed(
    server: RunningServer, username: str, password: str
) -> None:
    connection = await server.open()
    await connection.send(Hello(username=username, password=SecretStr(password), id="h"))
    received = await receive_closed(connection)
    assert received == [
        Error(
            code=ErrorCode.AUTH_FAILED,
            message="invalid username, password or certificate",
            ref="h",
        )
    ]


async def test_login_error_never_echoes_the_password(server: RunningServer) -> None:
    connection = await server.open()
    secret = "Sup3r-secret-value"
    await connection.stream.send_all(
        b'{"type":"hello","username":"bob","password":"' + secret.encode() + b'","x":1}\n'
    )
    received = await receive_closed(connection)
    assert len(received) == 1
    assert isinstance(received[0], Error)
    assert received[0].code == ErrorCode.BAD_ENVELOPE
    assert secret not in received[0].message


async def test_client_certificate_logs_in_without_password(server: RunningServer) -> None:
    carol = await server.login("carol", cert_user="carol")
    await carol.send(Ping(id="p"))
    assert (await receive_type(carol, Pong)).ref == "p"


async def test_certificate_for_another_user_authenticates_nobody(server: RunningServer) -> None:
    connection = await server.open(cert_user="carol")
    # Even bob's right password does not help a connection holding carol's certificate.
    await connection.send(Hello(username="bob", password=SecretStr(PASSWORDS["bob"])))
    received = await receive_closed(connection)
    assert [envelope.code for envelope in received if isinstance(envelope, Error)] == [
        ErrorCode.AUTH_FAILED
    ]


async def test_certificate_of_unconfigured_user_is_refused(server: RunningServer) -> None:
    connection = await server.open(cert_user="mallory")
    await connection.send(Hello(username="mallory"))
    received = await receive_closed(connection)
    assert [envelope.code for envelope in received if isinstance(envelope, Error)] == [
        ErrorCode.AUTH_FAILED
    ]


async def test_required_mode_needs_certificate_and_password(start_server: StartServer) -> None:
    server = await start_server(client_certs="required")

    with pytest.raises(ClientError, match="client certificate"):
        await server.login("bob")  # password but no certificate

    certificate_only = await server.open(cert_user="bob")
    await certificate_only.send(Hello(username="bob"))
    assert [type(envelope) for envelope in await receive_closed(certificate_only)] == [Error]

    both = await server.login("bob", password=PASSWORDS["bob"], cert_user="bob")
    await both.send(Ping(id="ok"))
    assert (await receive_type(both, Pong)).ref == "ok"

    # A user without a password hash needs only the certificate.
    await server.login("carol", cert_user="carol")


async def test_none_mode_ignores_client_certificates(start_server: StartServer) -> None:
    server = await start_server(client_certs="none")
    connection = await server.open(cert_user="carol")
    await connection.send(Hello(username="carol"))
    assert [type(envelope) for envelope in await receive_closed(connection)] == [Error]
    await server.login("bob")  # passwords still work


async def test_client_that_does_not_trust_the_ca_fails_clearly(
    server: RunningServer, rogue_pki: Pki
) -> None:
    context = tls.client_context(rogue_pki.ca)
    with pytest.raises(ClientError, match="not trusted"):
        await ChatConnection.open(server.host, server.port, context)


async def test_client_checks_the_server_hostname(start_server: StartServer, pki: Pki) -> None:
    # 127.0.0.2 is loopback too, but not a name in the server certificate.
    server = await start_server(host="127.0.0.2")
    with pytest.raises(ClientError, match=r"not trusted.*(mismatch|127\.0\.0\.2)"):
        await ChatConnection.open("127.0.0.2", server.port, tls.client_context(pki.ca))


async def test_client_certificate_from_another_ca_is_rejected(
    server: RunningServer, rogue_pki: Pki, pki: Pki
) -> None:
    context = tls.client_context(pki.ca, rogue_pki.cert("alice"), rogue_pki.key("alice"))
    with pytest.raises(ClientError, match="client certificate"):
        async with await ChatConnection.open(server.host, server.port, context) as connection:
            # TLS 1.3: the server's verdict on our certificate arrives after the handshake.
            await connection.login("alice", None)
    # and the server still serves everyone else
    await server.login("bob")


async def test_tls_settings(server: RunningServer) -> None:
    connection = await server.open()
    assert connection.stream.selected_alpn_protocol() == ALPN_PROTOCOL
    assert connection.stream.version() == "TLSv1.3"

    # A client that offers no ALPN and allows only TLS 1.2 is still served.
    context = ssl.create_default_context(cafile=str(server.pki.ca))
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    tcp = await trio.open_tcp_stream(server.host, server.port)
    async with trio.SSLStream(tcp, context, server_hostname=server.host) as stream:
        await stream.do_handshake()
        assert stream.version() == "TLSv1.2"
        cipher = stream.cipher()
        assert cipher is not None
        assert cipher[0].startswith("ECDHE-")
        assert stream.selected_alpn_protocol() is None
        await ChatConnection(stream).login("bob", SecretStr(PASSWORDS["bob"]))


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated:DeprecationWarning")
async def test_tls_1_1_is_refused(server: RunningServer) -> None:
    context = ssl.create_default_context(cafile=str(server.pki.ca))
    context.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
    context.maximum_version = ssl.TLSVersion.TLSv1_1
    context.set_ciphers("ALL:@SECLEVEL=0")
    tcp = await trio.open_tcp_stream(server.host, server.port)
    stream = trio.SSLStream(tcp, context, server_hostname=server.host)
    with pytest.raises(trio.BrokenResourceError):
        await stream.do_handshake()
    await trio.aclose_forcefully(stream)


async def test_anything_before_hello_gets_auth_required_and_close(server: RunningServer) -> None:
    connection = await server.open()
    await connection.send(Say(room="lobby", text="let me in", id="s1"))
    received = await receive_closed(connection)
    assert received == [Error(code=ErrorCode.AUTH_REQUIRED, message="send hello first", ref="s1")]


async def test_bad_input_after_login_keeps_the_connection(server: RunningServer) -> None:
    bob = await server.login("bob")
    await bob.stream.send_all(b"this is not json\n")
    assert (await receive_type(bob, Error)).code == ErrorCode.BAD_FRAME
    await bob.stream.send_all(b'{"type":"say","room":"lobby","text":"","id":"e1"}\n')
    error = await receive_type(bob, Error)
    assert (error.code, error.ref) == (ErrorCode.BAD_ENVELOPE, "e1")
    assert "text" in error.message
    await bob.stream.send_all(b'{"type":"shout","id":"e2"}\n')
    error = await receive_type(bob, Error)
    assert (error.code, error.ref) == (ErrorCode.BAD_ENVELOPE, "e2")
    await bob.send(Ping(id="still-there"))
    assert (await receive_type(bob, Pong)).ref == "still-there"


async def test_say_to_a_room_the_user_is_not_in(server: RunningServer) -> None:
    bob = await server.login("bob")
    await bob.send(Say(room="secret", text="psst", id="s9"))
    error = await receive_type(bob, Error)
    assert (error.code, error.ref) == (ErrorCode.NOT_MEMBER, "s9")


async def test_second_hello_is_refused(server: RunningServer) -> None:
    bob = await server.login("bob")
    await bob.send(Hello(username="alice", password=SecretStr(PASSWORDS["alice"]), id="h2"))
    error = await receive_type(bob, Error)
    assert (error.code, error.ref) == (ErrorCode.BAD_ENVELOPE, "h2")


async def test_oversize_frame_is_refused_and_closed(start_server: StartServer) -> None:
    server = await start_server(max_frame_bytes=2048)
    watcher = await server.login("alice")
    bob = await server.login("bob")
    await bob.stream.send_all(b'{"type":"say","room":"lobby","text":"' + b"x" * 4096)
    received = await receive_closed(bob)
    assert [envelope.code for envelope in received if isinstance(envelope, Error)] == [
        ErrorCode.FRAME_TOO_LARGE
    ]
    # nothing of it reached anyone, and the others are fine
    await watcher.send(Say(room="lobby", text="after", id="a"))
    message = await receive_type(watcher, Message)
    assert message.text == "after"


async def test_bye_closes_cleanly(server: RunningServer) -> None:
    bob = await server.login("bob")
    await bob.send(Bye())
    assert await receive_closed(bob) == []


async def test_handshake_deadline(start_server: StartServer) -> None:
    # Long enough for bob's real handshake on a loaded machine.
    server = await start_server(limits={"handshake_timeout": 1.0})
    async with await trio.open_tcp_stream(server.host, server.port) as raw:
        with trio.fail_after(WAIT):
            assert await raw.receive_some(100) == b""  # closed by the server
    await server.login("bob")


async def test_broken_clients_do_not_affect_others(server: RunningServer) -> None:
    alice = await server.login("alice")

    async with await trio.open_tcp_stream(server.host, server.port) as plaintext:
        await plaintext.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        with trio.fail_after(WAIT):
            while await plaintext.receive_some(1000):
                pass  # whatever TLS alert the server sends, it then closes

    half_frame = await server.login("bob")
    await half_frame.stream.send_all(b'{"type":"say","room":"lo')
    await trio.aclose_forcefully(half_frame.stream)

    mid_handshake = await trio.open_tcp_stream(server.host, server.port)
    await mid_handshake.send_all(b"\x16\x03\x01\x00\xc8\x01\x00\x00\xc4\x03\x03")
    await mid_handshake.aclose()

    await alice.send(Say(room="lobby", text="still here", id="x"))
    assert (await receive_type(alice, Message)).text == "still here"


async def test_many_clients_receive_every_message(server: RunningServer) -> None:
    clients = []
    for index in range(40):
        cert_user = "carol" if index % 2 else None
        clients.append(await server.login("carol" if cert_user else "dave", cert_user=cert_user))
    sender = await server.login("alice")
    for number in range(5):
        await sender.send(Say(room="lobby", text=f"message {number}", id=f"m{number}"))

    async def collect(connection: ChatConnection, into: list[list[str]]) -> None:
        texts: list[str] = []
        while len(texts) < 5:
            texts.append((await receive_type(connection, Message)).text)
        into.append(texts)

    results: list[list[str]] = []
    async with trio.open_nursery() as nursery:
        for connection in clients:
            nursery.start_soon(collect, connection, results)
    assert results == [[f"message {number}" for number in range(5)]] * len(clients)


async def test_shutdown_tells_clients(start_server: StartServer) -> None:
    server = await start_server()
    bob = await server.login("bob")
    pending = await server.open()  # connected but not logged in
    server.server.request_shutdown()
    for connection in (bob, pending):
        received = await receive_closed(connection)
        assert [envelope.code for envelope in received if isinstance(envelope, Error)] == [
            ErrorCode.SERVER_SHUTDOWN
        ]
    with pytest.raises(OSError, match="failed"):  # nobody listens any more
        await trio.open_tcp_stream(server.host, server.port)


async def test_encoded_frames_are_what_the_server_reads(server: RunningServer) -> None:
    # Several envelopes in one write, and one envelope split over several writes.
    bob = await server.login("bob")
    frames = encode(Ping(id="p1")) + encode(Ping(id="p2"))
    await bob.stream.send_all(frames + encode(Ping(id="p3"))[:5])
    await bob.stream.send_all(encode(Ping(id="p3"))[5:])
    refs = [(await receive_type(bob, Pong)).ref for _ in range(3)]
    assert refs == ["p1", "p2", "p3"]
