"""HTTP/1.1 requests under limits, and responses with the security headers (h11).

The small HTTP layer of the server: the chat page's static files and the
WebSocket upgrade use it over TLS, the metrics endpoint over plain HTTP on
loopback. It serves what we need and nothing more: ``GET`` and ``HEAD``, no
request bodies, keep-alive with a cap, every wait under a deadline. h11 does
the parsing (sans-IO); this module owns the I/O and the limits around it.

The API (all a user of this module needs)::

    limits = HttpLimits(...)              # request line, head size, header count, deadlines
    connection = HttpConnection(stream, limits, hsts_max_age=...)   # any trio stream
    graceful = await connection.serve(handler)

``handler(request: Request) -> Response | None`` is awaited for every request
that passed the limits (method ``GET`` or ``HEAD``, no body, head within its
limits and its deadline); ``serve`` writes its :class:`Response` (for ``HEAD``
without the body) and reads the next request on the same connection until the
client closes, the keep-alive deadline passes, or ``max_requests`` were
served. A handler that takes the connection over (a WebSocket) calls
:meth:`HttpConnection.switch_protocols` and returns ``None``; ``serve`` then
returns at once. Whatever breaks the limits is answered by ``serve`` itself
with a specific status (400, 405, 408, 413, 414, 431, 505) and the connection is
closed. ``serve`` returns whether the stream may be closed gracefully (False
when a write was cut off by its deadline); it never closes the stream: the
caller does. Transport errors (``trio.BrokenResourceError``) propagate.

Every response carries :data:`SECURITY_HEADERS` (a strict Content-Security-
Policy: only this origin's scripts, styles, images and connections, no
framing; ``nosniff``; no referrer) and a ``Cache-Control``; with
``hsts_max_age`` > 0 also ``Strict-Transport-Security``, except to a request for
``localhost`` or an IP address (:func:`sends_hsts`).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace

import h11
import trio

# What one read asks of the stream (a request head is far smaller).
RECEIVE_BYTES = 16384

CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self';"
    " connect-src 'self'; font-src 'self'; object-src 'none'; base-uri 'none';"
    " form-action 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS: tuple[tuple[str, str], ...] = (
    ("Content-Security-Policy", CONTENT_SECURITY_POLICY),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
    ("X-Frame-Options", "DENY"),
    ("Cross-Origin-Opener-Policy", "same-origin"),
    ("Cross-Origin-Resource-Policy", "same-origin"),
)
METHODS = ("GET", "HEAD")
NO_STORE = "no-store"
TEXT = "text/plain; charset=utf-8"

REASONS = {
    101: "Switching Protocols",
    200: "OK",
    304: "Not Modified",
    400: "Bad Request",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    413: "Content Too Large",
    414: "URI Too Long",
    426: "Upgrade Required",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
    505: "HTTP Version Not Supported",
}


@dataclass(frozen=True)
class HttpLimits:
    """What one HTTP connection may ask of the server."""

    max_request_line: int = 8190  # bytes of "METHOD TARGET HTTP/1.1" (414 beyond)
    max_header_bytes: int = 16384  # bytes of the whole head (431 beyond)
    max_headers: int = 64  # header fields (431 beyond)
    request_timeout: float = 10.0  # for a request head once it started, and for each response
    keepalive_timeout: float = 15.0  # for the next request to start (then closed silently)
    max_requests: int = 100  # requests served on one connection; the last says close


@dataclass(frozen=True)
class Request:
    """A request head that passed the limits. Header names are lower case."""

    method: str  # "GET" or "HEAD"
    target: str  # as sent: path and query
    headers: tuple[tuple[str, str], ...]

    @property
    def path(self) -> str:
        """The target without its query string (not percent-decoded)."""
        return self.target.partition("?")[0]

    def header(self, name: str) -> str | None:
        """The value of header ``name`` (lower case); None if absent. Several fields of one
        name are joined with ", " (RFC 9110 §5.3)."""
        values = [value for key, value in self.headers if key == name]
        return ", ".join(values) if values else None

    def header_tokens(self, name: str) -> set[str]:
        """A comma-separated header's tokens, lower case (``Connection``, ``Upgrade``)."""
        value = self.header(name) or ""
        return {token.strip().lower() for token in value.split(",") if token.strip()}


@dataclass(frozen=True)
class Response:
    """What a handler answers. ``cache`` is the ``Cache-Control`` value."""

    status: int
    body: bytes = b""
    content_type: str | None = TEXT
    headers: tuple[tuple[str, str], ...] = ()
    cache: str = NO_STORE
    close: bool = False  # close the connection after this response


class HttpError(Exception):
    """A request refused before any handler saw it: answered with ``status``, then closed."""

    def __init__(
        self, status: int, message: str, headers: tuple[tuple[str, str], ...] = ()
    ) -> None:
        super().__init__(f"{status} {message}")
        self.status = status
        self.message = message
        self.headers = headers

    def response(self) -> Response:
        return error_response(self.status, self.message, headers=self.headers)


def error_response(
    status: int, message: str, *, headers: tuple[tuple[str, str], ...] = (), close: bool = True
) -> Response:
    """A short plain-text error, never cached; closes the connection unless told not to."""
    return Response(status, f"{status} {message}\n".encode(), headers=headers, close=close)


Handler = Callable[[Request], Awaitable[Response | None]]


def sends_hsts(host: str | None) -> bool:
    """Whether a response to a request for ``host`` (its ``Host`` header) carries
    Strict-Transport-Security. Not for an IP address (browsers ignore it there, RFC 6797
    §8.1) nor for ``localhost``: there it would make the browser use https for every
    local port for a year, other development servers' included."""
    if not host:
        return False
    name = host.strip().lower()
    if name.startswith("["):  # an IPv6 literal, with or without a port
        return False
    name = name.rpartition(":")[0] if ":" in name else name
    name = name.rstrip(".")
    if name == "localhost" or name.endswith(".localhost"):
        return False
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return True
    return False


class HttpConnection:
    """One HTTP/1.1 connection on the server side (see the module docstring)."""

    def __init__(self, stream: trio.abc.Stream, limits: HttpLimits, *, hsts_max_age: int = 0):
        self.stream = stream
        self.limits = limits
        self._hsts = (
            (("Strict-Transport-Security", f"max-age={hsts_max_age}"),) if hsts_max_age else ()
        )
        self._h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=limits.max_header_bytes)
        self.served = 0  # responses written
        self.refused: HttpError | None = None  # the limit a request broke, if one did

    async def serve(self, handler: Handler) -> bool:
        """Answer requests until the connection is done; returns whether it may be
        closed gracefully. See the module docstring."""
        first = True
        while self.served < self.limits.max_requests:
            try:
                request = await self._next_request(first=first)
            except HttpError as exc:
                self.refused = exc
                return await self.respond(None, exc.response())
            if request is None:
                return True
            first = False
            response = await handler(request)
            if response is None:
                return True  # taken over (switch_protocols)
            if self.served + 1 >= self.limits.max_requests:
                response = replace(response, close=True)
            if not await self.respond(request, response):
                return False
            if self._h11.our_state is not h11.DONE or self._h11.their_state is not h11.DONE:
                return True  # closing: Connection: close was said by one side
            self._h11.start_next_cycle()
        return True

    async def respond(self, request: Request | None, response: Response) -> bool:
        """Write ``response`` (without its body for ``HEAD``) under the request deadline;
        False if the deadline cut it off (the stream cannot say goodbye then)."""
        headers: list[tuple[str, str]] = [*SECURITY_HEADERS]
        if request is not None and sends_hsts(request.header("host")):
            headers.extend(self._hsts)
        if response.content_type is not None:
            headers.append(("Content-Type", response.content_type))
        if response.status != 304:  # a 304's length would have to be the 200's (RFC 9110)
            headers.append(("Content-Length", str(len(response.body))))
        headers.append(("Cache-Control", response.cache))
        headers.extend(response.headers)
        if response.close:
            headers.append(("Connection", "close"))
        events: list[h11.Event] = [
            h11.Response(
                status_code=response.status,
                headers=headers,
                reason=REASONS.get(response.status, "").encode(),
            )
        ]
        if response.body and (request is None or request.method != "HEAD"):
            events.append(h11.Data(data=response.body))
        events.append(h11.EndOfMessage())
        try:
            data = b"".join(self._h11.send(event) or b"" for event in events)
        except h11.LocalProtocolError:
            # The state does not allow a response (the peer is gone mid-request): no
            # response can be framed, so none is sent.
            return True
        self.served += 1
        with trio.move_on_after(self.limits.request_timeout) as scope:
            await self.stream.send_all(data)
        return not scope.cancelled_caught

    async def switch_protocols(self, headers: list[tuple[str, str]]) -> bytes | None:
        """Answer the current request (an upgrade) with ``101 Switching Protocols`` and
        ``headers``; returns the bytes that came after the request (the new protocol's
        first bytes), or None when the 101 could not be written within the request
        deadline (the stream cannot say goodbye then). The connection is then the
        caller's, and HTTP is done with it."""
        data = self._h11.send(
            h11.InformationalResponse(
                status_code=101, headers=headers, reason=REASONS[101].encode()
            )
        )
        self.served += 1
        with trio.move_on_after(self.limits.request_timeout) as scope:
            await self.stream.send_all(data or b"")
        if scope.cancelled_caught:
            return None
        trailing, _ = self._h11.trailing_data
        return bytes(trailing)

    async def _next_request(self, *, first: bool) -> Request | None:
        """The next request head, checked against the limits; None when the client is
        done (closed, or silent past the keep-alive deadline). Raises HttpError."""
        limits = self.limits
        started = first  # the first request's head is timed from the start
        deadline = trio.current_time() + (
            limits.request_timeout if first else limits.keepalive_timeout
        )
        line_ended = False
        line_bytes = 0
        ended = False  # the client closed its side
        while True:
            try:
                event = self._h11.next_event()
            except h11.RemoteProtocolError as exc:
                if ended:
                    return None  # closed in the middle of a head: nobody to answer
                raise HttpError(exc.error_status_hint, _describe(exc)) from None
            if event is h11.NEED_DATA:
                data: bytes | bytearray = b""
                with trio.move_on_at(deadline):
                    data = await self.stream.receive_some(RECEIVE_BYTES)
                    if not data:
                        ended = True
                        self._h11.receive_data(b"")
                        continue
                if not data:
                    if started:
                        raise HttpError(408, "the request head took too long")
                    return None
                if not started:
                    started = True
                    deadline = trio.current_time() + limits.request_timeout
                if not line_ended:
                    # h11 only knows the size of the whole head: catch a long request
                    # line as it arrives, to answer 414 rather than 431.
                    newline = data.find(b"\n")
                    line_ended = newline >= 0
                    line_bytes += newline if line_ended else len(data)
                    if line_bytes > limits.max_request_line:
                        raise HttpError(414, "request line too long")
                self._h11.receive_data(bytes(data))
                continue
            if isinstance(event, h11.ConnectionClosed):
                return None
            if isinstance(event, h11.Request):
                return self._accept(event)
            # Nothing else comes before a request head.
            raise HttpError(400, "unexpected data")

    def _accept(self, event: h11.Request) -> Request:
        """The request head as a :class:`Request`, once it passed the limits; raises HttpError."""
        limits = self.limits
        line = len(event.method) + len(event.target) + len(event.http_version) + 7
        if line > limits.max_request_line:
            raise HttpError(414, "request line too long")
        raw = list(event.headers)
        if len(raw) > limits.max_headers:
            raise HttpError(431, f"more than {limits.max_headers} header fields")
        if line + sum(len(name) + len(value) + 4 for name, value in raw) > limits.max_header_bytes:
            raise HttpError(431, "request head too large")
        if event.http_version not in (b"1.0", b"1.1"):
            raise HttpError(505, "HTTP/1.1 only")
        method = event.method.decode("ascii", "replace")
        try:
            target = event.target.decode("ascii")
        except UnicodeDecodeError:
            raise HttpError(400, "request target is not ASCII") from None
        headers = tuple(
            (name.decode("ascii", "replace"), value.decode("latin-1")) for name, value in raw
        )
        if method not in METHODS:
            raise HttpError(405, "method not allowed", (("Allow", ", ".join(METHODS)),))
        request = Request(method, target, headers)
        length = request.header("content-length")
        if request.header("transfer-encoding") is not None or (
            length is not None and length.strip() != "0"
        ):
            raise HttpError(413, "request bodies are not accepted")
        if not target.startswith("/"):
            raise HttpError(400, "only origin-form request targets are served")
        # A bodiless request's end is already parsed: take it, so the next cycle can start.
        end = self._h11.next_event()
        if not isinstance(end, h11.EndOfMessage):
            raise HttpError(400, "unexpected request body")
        return request


def _describe(exc: h11.RemoteProtocolError) -> str:
    if exc.error_status_hint == 431:
        return "request head too large"
    return "malformed request"
