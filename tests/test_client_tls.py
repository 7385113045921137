"""What the client says when TLS fails: one line, in words, naming what to do.

Real servers throughout: ours, with a client certificate from another CA or
none (in TLS 1.2 the server refuses the certificate during the handshake, in
TLS 1.3 after it, and a trio server sends no alert either way), and a TCP
server that does not speak TLS at all.
"""

from __future__ import annotations

import os
import ssl
import sys
from functools import partial
from pathlib import Path

import pytest
import trio
from pydantic import SecretStr

from securechat import tls
from securechat.client import ChatConnection, ClientError

from .conftest import PASSWORDS, WAIT, Pki, RunningServer, StartServer

VERSIONS = {"TLS 1.2": ssl.TLSVersion.TLSv1_2, "TLS 1.3": ssl.TLSVersion.TLSv1_3}


async def connect_and_login(
    server: RunningServer, version: str, cert: Path | None = None, key: Path | None = None
) -> None:
    context = tls.client_context(server.pki.ca, cert, key)
    context.maximum_version = VERSIONS[version]
    connection = await ChatConnection.open(server.host, server.port, context, certificate=cert)
    server.connections.append(connection)
    assert connection.stream.version() == version.replace(" ", "v")
    await connection.login("alice", None if cert else SecretStr(PASSWORDS["alice"]))


@pytest.mark.parametrize("version", VERSIONS)
async def test_certificate_from_another_ca_is_refused_in_one_line(
    server: RunningServer, rogue_pki: Pki, version: str
) -> None:
    cert = rogue_pki.cert("alice")
    with pytest.raises(ClientError) as refused:
        await connect_and_login(server, version, cert, rogue_pki.key("alice"))
    assert str(refused.value) == (
        f"the server at {server.host}:{server.port} refused your client certificate {cert}"
        " during the TLS handshake: it is not signed by the CA the server trusts, or it has"
        " expired; ask the server's operator for a new one, or log in with a password,"
        " without --cert"
    )
    await server.login("bob")  # and the server serves everyone else


@pytest.mark.parametrize("version", VERSIONS)
async def test_missing_certificate_is_named_when_the_server_requires_one(
    start_server: StartServer, version: str
) -> None:
    server = await start_server(client_certs="required")
    with pytest.raises(ClientError) as refused:
        await connect_and_login(server, version)
    assert str(refused.value) == (
        f"the server at {server.host}:{server.port} closed the connection during the TLS"
        " handshake: it requires a client certificate (log in with --cert and --key)"
    )


async def test_client_process_refused_for_its_certificate_says_so_in_one_line(
    server: RunningServer, rogue_pki: Pki
) -> None:
    cert = rogue_pki.cert("alice")
    with trio.fail_after(WAIT * 3):
        result = await trio.run_process(
            [
                *(sys.executable, "-m", "securechat", "client", "--host", server.host),
                *("--port", str(server.port), "--ca", str(server.pki.ca), "--user", "alice"),
                *("--cert", str(cert), "--key", str(rogue_pki.key("alice"))),
            ],
            stdin=b"",
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env={**os.environ, "NO_COLOR": "1"},
        )
    assert result.returncode == 1
    assert result.stdout == b""  # no [CONNECTED]
    (line,) = result.stderr.decode().splitlines()
    assert line.startswith(
        f"securechat: error: the server at {server.host}:{server.port} refused your client"
        f" certificate {cert}"
    )


async def test_a_server_that_does_not_speak_tls_is_named(nursery: trio.Nursery, pki: Pki) -> None:
    async def http(stream: trio.SocketStream) -> None:
        await stream.receive_some(65536)
        await stream.send_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
        await stream.aclose()

    listeners = await nursery.start(partial(trio.serve_tcp, http, 0, host="127.0.0.1"))
    port = listeners[0].socket.getsockname()[1]
    with pytest.raises(ClientError) as failed:
        await ChatConnection.open("127.0.0.1", port, tls.client_context(pki.ca))
    assert str(failed.value) == (
        f"the server at 127.0.0.1:{port} does not speak TLS (is it a securechat server,"
        " and is this its port?)"
    )


async def test_a_server_certificate_for_other_names_is_named(
    start_server: StartServer, pki: Pki
) -> None:
    # 127.0.0.2 is loopback too, but not a name in the server certificate.
    server = await start_server(host="127.0.0.2")
    with pytest.raises(ClientError) as failed:
        await ChatConnection.open("127.0.0.2", server.port, tls.client_context(pki.ca))
    assert str(failed.value).startswith(
        f"the server at 127.0.0.2:{server.port} is not trusted: its certificate is not valid"
        " for the name 127.0.0.2"
    )


async def test_a_server_signed_by_another_ca_is_named(
    server: RunningServer, rogue_pki: Pki
) -> None:
    with pytest.raises(ClientError) as failed:
        await ChatConnection.open(server.host, server.port, tls.client_context(rogue_pki.ca))
    assert str(failed.value) == (
        f"the server at {server.host}:{server.port} is not trusted: its certificate is not"
        " signed by the CA you trust (check --ca)"
    )
