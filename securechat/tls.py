"""TLS settings for both ends, and the few TLS facts the I/O layers need.

The server context is what passes scanners (Mozilla "intermediate"):
TLS 1.2+ with forward-secret AEAD suites only, one curve (P-256), no
compression, no renegotiation, server cipher preference, no session
tickets (a long-lived ticket key would undo forward secrecy for resumed
sessions). When client certificates are on, OpenSSL also sends the CA
certificate from ``[server] ca`` after the leaf (it is public). The client
trusts only the given CA and checks the server's hostname. Both offer ALPN
``securechat/1``.
"""

from __future__ import annotations

import ssl
from contextlib import suppress
from pathlib import Path
from typing import Any

import trio

from .auth import ClientCertMode
from .certs import CertError, check_cert_file, check_key_file
from .protocol import ALPN_PROTOCOL

# TLS 1.2 suites: forward secret and AEAD only. TLS 1.3 suites are all AEAD.
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"
CURVE = "prime256v1"
CLOSE_TIMEOUT = 1.0

AnyStream = trio.SSLStream[Any]


def server_context(cert: Path, key: Path, ca: Path, client_certs: ClientCertMode) -> ssl.SSLContext:
    """The server's context; raises :class:`CertError` for unusable files."""
    check_cert_file(cert)
    check_key_file(key)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _harden(context)
    context.options |= ssl.OP_CIPHER_SERVER_PREFERENCE | ssl.OP_NO_RENEGOTIATION | ssl.OP_NO_TICKET
    _load_chain(context, cert, key)
    if client_certs != "none":
        _load_ca(context, ca)
        context.verify_mode = ssl.CERT_REQUIRED if client_certs == "required" else ssl.CERT_OPTIONAL
    return context


def client_context(ca: Path, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    """Trust only ``ca``, check the hostname, optionally present a client certificate."""
    if (cert is None) != (key is None):
        raise CertError("--cert and --key go together: give both or neither")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies chain and hostname
    _harden(context)
    _load_ca(context, ca)
    if cert is not None and key is not None:
        check_key_file(key)
        _load_chain(context, cert, key)
    return context


def _harden(context: ssl.SSLContext) -> None:
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_COMPRESSION
    context.set_ciphers(TLS12_CIPHERS)
    context.set_ecdh_curve(CURVE)
    context.set_alpn_protocols([ALPN_PROTOCOL])


def _load_chain(context: ssl.SSLContext, cert: Path, key: Path) -> None:
    check_cert_file(cert)
    try:
        context.load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        raise CertError(
            f"{cert}, {key}: not a matching certificate and key ({exc.reason})"
        ) from None


def _load_ca(context: ssl.SSLContext, ca: Path) -> None:
    check_cert_file(ca)
    try:
        context.load_verify_locations(cafile=ca)
    except ssl.SSLError as exc:
        raise CertError(f"{ca}: not a usable CA certificate ({exc.reason})") from None


async def close(stream: AnyStream, *, graceful: bool = True) -> None:
    """Close ``stream``; when ``graceful``, try to send close_notify first (bounded in time).

    A stream whose last write was cancelled cannot say goodbye (python-trio/trio#198):
    pass ``graceful=False``.
    """
    if not graceful:
        await trio.aclose_forcefully(stream)
        return
    # aclose always closes the socket, even when cancelled or broken.
    with (
        trio.move_on_after(CLOSE_TIMEOUT),
        suppress(trio.BrokenResourceError, trio.ClosedResourceError),
    ):
        await stream.aclose()


def describe_failure(exc: BaseException, where: str) -> str:
    """One line for a broken TLS connection, from the ``ssl`` error trio chained to it."""
    cause = exc.__cause__
    if isinstance(cause, ssl.SSLCertVerificationError):
        detail = cause.verify_message or cause.reason or "verification failed"
        return f"TLS: the certificate of {where} is not trusted: {detail} (check --ca and --host)"
    if isinstance(cause, ssl.SSLError):
        reason = cause.reason or str(cause)
        if reason == "TLSV13_ALERT_CERTIFICATE_REQUIRED":
            return f"TLS: {where} requires a client certificate (use --cert and --key)"
        if reason in ("SSLV3_ALERT_BAD_CERTIFICATE", "TLSV1_ALERT_UNKNOWN_CA"):
            return f"TLS: {where} rejected the client certificate ({reason})"
        return f"TLS with {where} failed: {reason}"
    return f"connection to {where} lost"


def is_unexpected_eof(exc: BaseException) -> bool:
    """The peer closed the TCP connection without a TLS close_notify."""
    return isinstance(exc.__cause__, ssl.SSLEOFError) or (
        isinstance(exc.__cause__, ssl.SSLError)
        and exc.__cause__.reason == "UNEXPECTED_EOF_WHILE_READING"
    )


def failure_reason(exc: BaseException) -> str:
    """A short reason for logs: the OpenSSL reason code when there is one."""
    cause = exc.__cause__
    if isinstance(cause, ssl.SSLError):
        return cause.reason or cause.__class__.__name__
    return str(cause or exc) or exc.__class__.__name__
