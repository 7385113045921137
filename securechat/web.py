"""The chat page's side of the server: static files, the Origin check, the WebSocket.

What an HTTP connection on the chat's TLS port gets (the server routes it here
by ALPN ``http/1.1`` or by its first bytes, see :mod:`securechat.server`):

- ``GET``/``HEAD`` ``/`` and ``/NAME`` for the files of ``securechat/static/``
  (:class:`StaticFiles`: read once at start, a fixed table of names; no path is
  ever joined to a directory, so ``..`` and its encodings are simply not found);
  with an ETag and ``Cache-Control: no-cache`` (revalidated each time: a new
  version shows at once), 304 on a matching ``If-None-Match``;
- ``/ws``: the WebSocket (:mod:`securechat.websocket`), if the request's
  ``Origin`` is one of the allowed origins (403 otherwise, and when it has none);
  then a session runs over it, as over a line connection;
- anything else: 404; a server at ``max_connections``: 503.

Requests, limits and headers are :mod:`securechat.http`'s.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import re
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path

import trio

from .config import WebSection
from .http import HttpConnection, HttpError, HttpLimits, Request, Response, error_response
from .limits import Occasional
from .websocket import WebSocketTransport, accept_headers

WEBSOCKET_PATH = "/ws"
INDEX = "index.html"
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".json": "application/json",
    ".webmanifest": "application/manifest+json",
    ".txt": "text/plain; charset=utf-8",
    ".woff2": "font/woff2",
}
_FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*(\.[A-Za-z0-9]+)+")
# Where a static file says how it may be cached: kept, but asked about each time.
STATIC_CACHE = "no-cache"

log = logging.getLogger("securechat.server")

RunSession = Callable[[WebSocketTransport], Awaitable[bool]]
"""Runs a session over the transport until it ends; returns whether it ended cleanly."""


@dataclass(frozen=True)
class StaticFile:
    body: bytes
    content_type: str
    etag: str


class StaticFiles:
    """The page's files by URL path, read once: every regular file (not a symlink)
    directly in the directory whose name is a plain ``name.ext`` with a known type
    (``/`` is ``index.html``). Nothing else is served, whatever the path."""

    def __init__(self, files: dict[str, StaticFile]) -> None:
        self.files = files

    @classmethod
    def load(cls, directory: Traversable | None = None) -> StaticFiles:
        """The files of ``directory`` (default: the package's ``static/``)."""
        if directory is None:
            directory = resources.files("securechat") / "static"
        files: dict[str, StaticFile] = {}
        if directory.is_dir():
            for entry in directory.iterdir():
                suffix = "." + entry.name.rpartition(".")[2]
                if (
                    not entry.is_file()
                    or (isinstance(entry, Path) and entry.is_symlink())
                    or not _FILE_NAME.fullmatch(entry.name)
                    or suffix not in CONTENT_TYPES
                ):
                    continue
                body = entry.read_bytes()
                etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
                files["/" + entry.name] = StaticFile(body, CONTENT_TYPES[suffix], etag)
        if "/" + INDEX in files:
            files["/"] = files["/" + INDEX]
        return cls(files)

    def response(self, request: Request) -> Response:
        found = self.files.get(request.path)
        if found is None:
            return error_response(404, "not found", close=False)
        headers = (("ETag", found.etag),)
        if found.etag in _etags(request.header("if-none-match")):
            return Response(304, content_type=None, headers=headers, cache=STATIC_CACHE)
        return Response(
            200, found.body, content_type=found.content_type, headers=headers, cache=STATIC_CACHE
        )


def _etags(value: str | None) -> set[str]:
    if not value:
        return set()
    return {tag.strip().removeprefix("W/") for tag in value.split(",")}


def default_origins(names: Iterable[str], port: int) -> frozenset[str]:
    """The origins a browser shows for this server: ``https://NAME:PORT`` for each name
    (``[ADDR]`` for IPv6), and ``https://NAME`` too when the port is 443. Wildcard
    addresses (``0.0.0.0``, ``::``) name no origin."""
    origins: set[str] = set()
    for name in names:
        name = name.strip().lower().removeprefix("[").removesuffix("]")
        if not name:
            continue
        try:
            address = ipaddress.ip_address(name)
        except ValueError:
            host = name
        else:
            if address.is_unspecified:
                continue
            host = f"[{address.compressed}]" if address.version == 6 else address.compressed
        origins.add(f"https://{host}:{port}")
        if port == 443:
            origins.add(f"https://{host}")
    return frozenset(origins)


def http_limits(section: WebSection) -> HttpLimits:
    return HttpLimits(
        max_request_line=section.max_request_line,
        max_header_bytes=section.max_header_bytes,
        max_headers=section.max_headers,
        request_timeout=section.request_timeout,
        keepalive_timeout=section.keepalive_timeout,
        max_requests=section.max_requests_per_connection,
    )


class Site:
    """Serves one HTTP connection of the chat's port (see the module docstring)."""

    def __init__(
        self,
        section: WebSection,
        static: StaticFiles,
        origins: frozenset[str],
        *,
        max_frame_bytes: int,
        ping_interval: float,
    ) -> None:
        self.section = section
        self.static = static
        self.origins = origins
        self.limits = http_limits(section)
        self.max_frame_bytes = max_frame_bytes
        self.ping_interval = ping_interval  # WebSocket pings after this long without data
        self._refusals = Occasional(1.0)  # log lines for refusals: at most one a second

    async def serve(
        self,
        stream: trio.abc.Stream,
        *,
        peer: str,
        host: str,
        certificate_user: str | None,
        run_session: RunSession,
    ) -> bool:
        """Answer the connection's requests (and run its WebSocket session, if it opens
        one); returns whether the stream may be closed gracefully."""
        http = HttpConnection(stream, self.limits, hsts_max_age=self.section.hsts_max_age)
        graceful = True

        async def handle(request: Request) -> Response | None:
            nonlocal graceful
            if request.path != WEBSOCKET_PATH:
                return self.static.response(request)
            try:
                headers = accept_headers(request)
            except HttpError as exc:
                return exc.response()
            origin = (request.header("origin") or "").strip().lower()
            if origin not in self.origins:
                # repr, cut: the header is the client's, and must not forge log lines.
                self._refused(peer, f"403 websocket from Origin {origin[:100]!r}")
                return error_response(
                    403, "Origin not allowed" if origin else "Origin header required"
                )
            received = await http.switch_protocols(headers)
            if received is None:
                graceful = False
                return None
            transport = WebSocketTransport(
                stream,
                received,
                peer=peer,
                host=host,
                max_frame_bytes=self.max_frame_bytes,
                certificate_user=certificate_user,
                ping_interval=self.ping_interval,
            )
            clean = await run_session(transport)
            graceful = clean and await transport.close()
            return None

        served = await http.serve(handle)
        if http.refused is not None:
            self._refused(peer, f"{http.refused.status} {http.refused.message}")
        return served and graceful

    def _refused(self, peer: str, what: str) -> None:
        if count := self._refusals.due(trio.current_time()):
            log.warning(
                "http refused peer=%s: %s (%d refusals since the last such line)",
                peer,
                what,
                count,
            )

    async def busy(self, stream: trio.abc.Stream) -> bool:
        """Answer the first request with 503 (the server has ``max_connections``)."""

        async def refuse(request: Request) -> Response:
            return error_response(
                503, "too many connections; try later", headers=(("Retry-After", "5"),)
            )

        return await HttpConnection(
            stream, self.limits, hsts_max_age=self.section.hsts_max_age
        ).serve(refuse)
