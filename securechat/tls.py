"""TLS settings for both ends, and the few TLS facts the I/O layers need.

The server context is what passes scanners (Mozilla "intermediate"):
TLS 1.2+ with forward-secret AEAD suites only, one curve (P-256), no
compression, no renegotiation, server cipher preference, no session
tickets (a long-lived ticket key would undo forward secrecy for resumed
sessions) and no server-side session cache: nothing of a finished
connection stays in memory (see :func:`_disable_session_cache`). When
client certificates are on, OpenSSL also sends the CA certificate from
``[server] ca`` after the leaf (it is public); that chain is built once, at
start-up, not in every handshake (:func:`_build_chain_once`). The client trusts only the
given CA and checks the server's hostname. Both offer ALPN ``securechat/1``; the
server also ``http/1.1`` when it serves the chat page (``[web]``).
"""

from __future__ import annotations

import ctypes
import logging
import ssl
import sys
from contextlib import suppress
from pathlib import Path
from typing import Any

import trio

from .certs import CertError, check_cert_file, check_key_file
from .config import ClientCertMode
from .protocol import ALPN_PROTOCOL

# TLS 1.2 suites: forward secret and AEAD only. TLS 1.3 suites are all AEAD.
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"
CURVE = "prime256v1"
CLOSE_TIMEOUT = 1.0
HTTP_ALPN = "http/1.1"

AnyStream = trio.SSLStream[Any]

log = logging.getLogger("securechat.tls")

# OpenSSL's server session cache, when it cannot be turned off: at most
# 20 480 sessions (SSL_SESSION_CACHE_MAX_SIZE_DEFAULT), each kept 7200 s
# (the TLS default timeout), the oldest evicted first.
SESSION_CACHE_MAX_ENTRIES = 20480
SESSION_CACHE_TIMEOUT = 7200
# From openssl/ssl.h (the same values since OpenSSL 0.9.x).
_SSL_CTRL_SET_SESS_CACHE_MODE = 44
_SSL_CTRL_GET_SESS_CACHE_MODE = 45
_SSL_SESS_CACHE_OFF = 0
_SSL_SESS_CACHE_SERVER = 2
_SSL_CTRL_BUILD_CERT_CHAIN = 105
_SSL_CTRL_GET_CHAIN_CERTS = 115
_SSL_BUILD_CHAIN_FLAG_IGNORE_ERROR = 0x8
_SSL_BUILD_CHAIN_FLAG_CLEAR_ERROR = 0x10
_SSL_VERIFY_MODES = {ssl.CERT_NONE: 0, ssl.CERT_OPTIONAL: 1, ssl.CERT_REQUIRED: 3}


def server_context(
    cert: Path, key: Path, ca: Path, client_certs: ClientCertMode, *, http: bool = False
) -> ssl.SSLContext:
    """The server's context; raises :class:`CertError` for unusable files.

    ``http``: also offer ALPN ``http/1.1`` (the chat page and its WebSocket on the same
    port). OpenSSL picks by the server's order among what the client offers, so the
    line client gets ``securechat/1`` and a browser ``http/1.1``."""
    check_cert_file(cert)
    check_key_file(key)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _harden(context)
    if http:
        context.set_alpn_protocols([ALPN_PROTOCOL, HTTP_ALPN])
    context.options |= ssl.OP_CIPHER_SERVER_PREFERENCE | ssl.OP_NO_RENEGOTIATION | ssl.OP_NO_TICKET
    # OP_NO_TICKET alone turns TLS 1.3 tickets into stateful ones, each a
    # session (~11 KiB with a client certificate) in the server's cache for
    # two hours. Our clients never resume: issue no TLS 1.3 tickets at all.
    context.num_tickets = 0
    _load_chain(context, cert, key)
    if client_certs != "none":
        _load_ca(context, ca)
        context.verify_mode = ssl.CERT_REQUIRED if client_certs == "required" else ssl.CERT_OPTIONAL
    if not _build_chain_once(context):
        log.info(
            "cannot build the certificate chain once here (%s): OpenSSL completes it in each"
            " TLS handshake (~0.1 ms of CPU each)",
            ssl.OPENSSL_VERSION,
        )
    if not _disable_session_cache(context):
        log.warning(
            "cannot turn off OpenSSL's TLS session cache here (%s, %s): a TLS 1.2 client"
            " may leave up to %d sessions (~11 KiB each with a client certificate) for %d s",
            sys.implementation.name,
            ssl.OPENSSL_VERSION,
            SESSION_CACHE_MAX_ENTRIES,
            SESSION_CACHE_TIMEOUT,
        )
    return context


class _Native:
    """The ``SSL_CTX`` behind an ``SSLContext``, for the two OpenSSL settings Python's
    ``ssl`` has no API for (the session cache mode, building the certificate chain).

    CPython keeps the ``SSL_CTX`` pointer right after the object header of an
    ``SSLContext`` (the layout since ``SSLContext`` came in 3.2; run on 3.11,
    3.12 and 3.13); the calls go to the libssl that ``_ssl`` itself uses.
    :meth:`of` checks each step first and says None when anything is
    unexpected: the caller then leaves OpenSSL's default.
    """

    def __init__(self, libssl: ctypes.CDLL, ssl_ctx: int) -> None:
        self.libssl = libssl
        self.ssl_ctx = ssl_ctx
        self.ctrl = libssl.SSL_CTX_ctrl
        self.ctrl.restype = ctypes.c_long
        self.ctrl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_void_p]

    @classmethod
    def of(cls, context: ssl.SSLContext) -> _Native | None:
        if sys.implementation.name != "cpython" or not sys.platform.startswith("linux"):
            return None
        try:
            import _ssl

            libssl = ctypes.CDLL(_ssl.__file__)  # finds the libssl that _ssl itself uses
            version = libssl.OpenSSL_version_num
            version.restype, version.argtypes = ctypes.c_ulong, []
            if version() != ssl.OPENSSL_VERSION_NUMBER:
                return None
            get_options = libssl.SSL_CTX_get_options
            get_options.restype, get_options.argtypes = ctypes.c_uint64, [ctypes.c_void_p]
            get_verify_mode = libssl.SSL_CTX_get_verify_mode
            get_verify_mode.restype, get_verify_mode.argtypes = ctypes.c_int, [ctypes.c_void_p]

            offset = object.__basicsize__  # after PyObject_HEAD
            pointer_size = ctypes.sizeof(ctypes.c_void_p)
            if type(context).__basicsize__ < offset + pointer_size:
                return None
            ssl_ctx = ctypes.c_void_p.from_address(id(context) + offset).value
            # Read through the pointer only if it points into writable memory
            # with room for an SSL_CTX: a wrong guess then reads garbage and
            # fails the checks below, instead of crashing the process.
            if ssl_ctx is None or not _in_writable_mapping(ssl_ctx, 4096):
                return None
            if get_options(ssl_ctx) != context.options or (
                get_verify_mode(ssl_ctx) != _SSL_VERIFY_MODES[context.verify_mode]
            ):
                return None
            return cls(libssl, ssl_ctx)
        except (ImportError, OSError, AttributeError, KeyError, ValueError):
            return None

    def clear_errors(self) -> None:
        clear = self.libssl.ERR_clear_error
        clear.restype, clear.argtypes = None, []
        clear()

    def chain_certs(self) -> int | None:
        """How many certificates the context sends after its own (None: none set, so
        OpenSSL builds the chain from the trust store in every handshake)."""
        stack = ctypes.c_void_p()
        if self.ctrl(self.ssl_ctx, _SSL_CTRL_GET_CHAIN_CERTS, 0, ctypes.byref(stack)) != 1:
            return None
        if not stack.value:
            return None
        count = self.libssl.OPENSSL_sk_num
        count.restype, count.argtypes = ctypes.c_int, [ctypes.c_void_p]
        return int(count(stack.value))


def _disable_session_cache(context: ssl.SSLContext) -> bool:
    """Turn off OpenSSL's server-side session cache of ``context``; False where that is unsafe.

    A TLS 1.2 client that sends no session-ticket extension gets a session
    id, and its session (~11 KiB with a client certificate, ~1 KiB without)
    stays in the context's cache for 7200 s whenever the server closed the
    connection with close_notify, up to 20 480 sessions. Python's ``ssl``
    has no API for ``SSL_CTX_set_session_cache_mode``: see :class:`_Native`.
    """
    native = _Native.of(context)
    if native is None:
        return False
    ctrl, ssl_ctx = native.ctrl, native.ssl_ctx
    if ctrl(ssl_ctx, _SSL_CTRL_GET_SESS_CACHE_MODE, 0, None) not in (
        _SSL_SESS_CACHE_SERVER,
        _SSL_SESS_CACHE_OFF,
    ):
        return False
    ctrl(ssl_ctx, _SSL_CTRL_SET_SESS_CACHE_MODE, _SSL_SESS_CACHE_OFF, None)
    return bool(ctrl(ssl_ctx, _SSL_CTRL_GET_SESS_CACHE_MODE, 0, None) == _SSL_SESS_CACHE_OFF)


def _build_chain_once(context: ssl.SSLContext) -> bool:
    """Build the certificate chain the server sends once, now; False where that is
    unsafe or failed (then OpenSSL's default stays).

    When the certificate file holds only the leaf, OpenSSL completes the chain
    from the trust store (``[server] ca``) in *every* handshake: a whole
    ``X509_verify_cert`` of the server's own certificate, about 0.1 ms of the
    ~1 ms a handshake with a client certificate costs. ``SSL_CTX_build_cert_chain``
    does the same once and keeps the result, which OpenSSL then sends as it is:
    the same certificates as before (errors ignored as the per-handshake
    building ignores them). A chain given in the certificate file is left alone.
    """
    native = _Native.of(context)
    if native is None:
        return False
    if native.chain_certs() is not None:
        return True  # given in the certificate file: OpenSSL sends it and builds nothing
    flags = _SSL_BUILD_CHAIN_FLAG_IGNORE_ERROR | _SSL_BUILD_CHAIN_FLAG_CLEAR_ERROR
    if native.ctrl(native.ssl_ctx, _SSL_CTRL_BUILD_CERT_CHAIN, flags, None) not in (1, 2):
        native.clear_errors()  # or a later, unrelated ssl call would report them
        return False
    return native.chain_certs() is not None


def _in_writable_mapping(address: int, size: int) -> bool:
    """Whether ``address`` to ``address + size`` lies in one readable and writable mapping."""
    with open("/proc/self/maps", encoding="ascii") as maps:
        for line in maps:
            bounds, perms = line.split(maxsplit=2)[:2]
            start, end = (int(bound, 16) for bound in bounds.split("-"))
            if start <= address < end:
                return perms.startswith("rw") and address + size <= end
    return False


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
