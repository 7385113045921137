"""The attacker of the freeze scenario: one user pipelining requests as fast as TCP allows.

One process, one connection at a time. It logs in with its client
certificate, then writes the same block of request frames (one TLS record,
16 KiB of plaintext, cycling through the request kinds it was given) again
and again, each as soon as the kernel has taken the previous one: the only
brake is TCP flow control, that is the server reading. It either reads
everything the server sends (and throws it away, counting frames and error
codes) or never reads at all. Whenever the server disconnects it (a flood
cut, a slow-consumer cut, anything), it connects, logs in and goes on, until
its time is up. Like :mod:`benchmarks.loadgen` it uses plain sockets with
stdlib TLS in memory BIOs (``ssl.SSLObject``), so that it knows which bytes
the kernel accepted.

Commands from the coordinator (tuples over the pipe) and the replies:

* ``("connect", user, timeout)``: log in as ``user`` (with its client
  certificate) once, before what is measured; ``("connected", error)``,
  error ``""`` when logged in.
* ``("attack", kinds, read, seconds)``: attack for ``seconds``;
  ``("attacked", summary)``.
* ``("close",)``: ``("closed",)``, and the process exits.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import select
import signal
import socket
import ssl
import sys
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from securechat import tls

from .loadgen import Setup, _die_with_parent

# The requests the attacker pipelines (wire protocol v1, as the client sends them).
FRAMES: dict[str, bytes] = {
    "rooms": b'{"type":"rooms","id":"r"}\n',
    "who": b'{"type":"who","room":"lobby","id":"w"}\n',
    "history": b'{"type":"history","room":"lobby","limit":500,"id":"h"}\n',
    "ping": b'{"type":"ping","id":"p"}\n',
    "invalid": b'{"type":"nonsense"}\n',
}
BLOCK_BYTES = 16 * 1024  # the plaintext of one TLS record
RECV_BYTES = 1 << 18
CODE = re.compile(rb'"code":"([a-z_]+)"')
RETRY_PAUSE = 0.01  # after a failed connection attempt, so that a dead server is not spun on

EPOLLIN = select.EPOLLIN
EPOLLOUT = select.EPOLLOUT
EPOLLRDHUP = select.EPOLLRDHUP
EPOLL_GONE = select.EPOLLERR | select.EPOLLHUP


def request_block(kinds: tuple[str, ...]) -> tuple[bytes, int]:
    """Whole frames cycling through ``kinds``, as many as fit in one TLS record."""
    frames: list[bytes] = []
    size = 0
    while True:
        frame = FRAMES[kinds[len(frames) % len(kinds)]]
        if size + len(frame) > BLOCK_BYTES:
            return b"".join(frames), len(frames)
        frames.append(frame)
        size += len(frame)


class _Failed(Exception):
    """A connection attempt failed (the reason is the message)."""


@dataclass
class Link:
    """One logged-in connection: its socket and TLS state."""

    sock: socket.socket
    tls: ssl.SSLObject
    inc: ssl.MemoryBIO
    out: ssl.MemoryBIO


@dataclass
class Tally:
    """What one attack did, from the attacker's side."""

    frames_sent: int = 0  # frames of blocks the kernel accepted in full
    bytes_sent: int = 0  # TLS bytes the kernel accepted
    frames_received: int = 0
    bytes_received: int = 0
    connections: int = 0  # logins, the one before the attack included
    login_failures: Counter[str] = field(default_factory=Counter)
    disconnects: Counter[str] = field(default_factory=Counter)  # as the attacker saw them
    error_codes: Counter[str] = field(default_factory=Counter)  # in what it read

    def summary(self, seconds: float) -> dict[str, Any]:
        return {
            "seconds": round(seconds, 3),
            "frames_sent": self.frames_sent,
            "frames_per_s": round(self.frames_sent / seconds, 1) if seconds > 0 else 0.0,
            "bytes_sent": self.bytes_sent,
            "frames_received": self.frames_received,
            "bytes_received": self.bytes_received,
            "connections": self.connections,
            "login_failures": dict(self.login_failures),
            "disconnects": dict(self.disconnects),
            "error_codes": dict(self.error_codes),
        }


class Attacker:
    """The attacker process: commands from the pipe, one connection at a time."""

    def __init__(self, pipe: Connection, setup: Setup) -> None:
        self.pipe = pipe
        self.setup = setup
        self.user = ""
        self.context: ssl.SSLContext | None = None
        self.link: Link | None = None
        self.tally = Tally()

    def run(self) -> None:
        while True:
            try:
                command = self.pipe.recv()
            except EOFError:
                break
            kind = command[0]
            if kind == "connect":
                self.log_in_as(command[1])
                self.tally = Tally()
                try:
                    self.link = self.connect(time.monotonic() + command[2])
                    self.tally.connections += 1
                    self.pipe.send(("connected", ""))
                except _Failed as exc:
                    self.pipe.send(("connected", str(exc)))
            elif kind == "attack":
                self.pipe.send(("attacked", self.attack(tuple(command[1]), command[2], command[3])))
            elif kind == "close":
                self.drop()
                self.pipe.send(("closed",))
                break
            else:
                raise ValueError(f"unknown command {kind!r}")
        self.drop()

    def drop(self) -> None:
        if self.link is not None:
            self.link.sock.close()
            self.link = None

    # --- logging in ---

    def log_in_as(self, user: str) -> None:
        pki = Path(self.setup.pki)
        self.user = user
        self.context = tls.client_context(pki / "ca.crt", pki / f"{user}.crt", pki / f"{user}.key")
        # As the load generator: no verification of the server's certificate
        # on this side; the server's work is the same.
        self.context.check_hostname = False
        self.context.verify_mode = ssl.CERT_NONE

    def connect(self, deadline: float) -> Link:
        """Connect, handshake and log in (blocking, until ``deadline``)."""
        assert self.context is not None, "connect names the user first"
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.settimeout(max(0.001, deadline - time.monotonic()))
            inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
            link = Link(
                sock, self.context.wrap_bio(inc, out, server_hostname=self.setup.host), inc, out
            )
            try:
                sock.connect((self.setup.host, self.setup.port))
                while True:
                    try:
                        link.tls.do_handshake()
                        break
                    except ssl.SSLWantReadError:
                        self._exchange(link, deadline)
                sock.sendall(link.out.read())
                hello = b'{"type":"hello","username":"%s","id":"h"}\n' % self.user.encode()
                link.tls.write(hello)
                sock.sendall(link.out.read())
                self._welcome(link, deadline)
            except TimeoutError:
                raise _Failed("timeout") from None
            except ssl.SSLError as exc:
                raise _Failed(f"tls: {exc.reason or exc}") from None
            except OSError as exc:
                raise _Failed(_reason(exc)) from None
        except BaseException:
            sock.close()
            raise
        sock.setblocking(False)
        return link

    def _exchange(self, link: Link, deadline: float) -> None:
        """Send what TLS has to say, then feed it what the server sends next."""
        link.sock.sendall(link.out.read())
        link.sock.settimeout(max(0.001, deadline - time.monotonic()))
        data = link.sock.recv(RECV_BYTES)
        if not data:
            raise _Failed("eof during login")
        link.inc.write(data)

    def _welcome(self, link: Link, deadline: float) -> None:
        received = b""
        while b"\n" not in received:
            try:
                received += link.tls.read(RECV_BYTES)
                continue
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLZeroReturnError:
                raise _Failed("close_notify during login") from None
            self._exchange(link, deadline)
        first = received.split(b"\n", 1)[0]
        if b'"type":"welcome"' not in first:
            codes = ",".join(code.decode() for code in CODE.findall(first))
            raise _Failed("login: " + (codes or "unexpected reply"))

    # --- the attack ---

    def attack(self, kinds: tuple[str, ...], read: bool, seconds: float) -> dict[str, Any]:
        block, count = request_block(kinds)
        started = time.monotonic()
        deadline = started + seconds
        tally = self.tally
        while time.monotonic() < deadline:
            if self.link is None:
                try:
                    self.link = self.connect(min(deadline, time.monotonic() + 10.0))
                    tally.connections += 1
                except _Failed as exc:
                    tally.login_failures[str(exc)] += 1
                    time.sleep(RETRY_PAUSE)
                    continue
            reason = self.pump(self.link, block, count, read, deadline)
            if reason is not None:
                tally.disconnects[reason] += 1
                self.drop()
        self.drop()
        return tally.summary(time.monotonic() - started)

    def pump(self, link: Link, block: bytes, count: int, read: bool, deadline: float) -> str | None:
        """Write ``block`` over and over until ``deadline`` (None) or the connection ends
        (why it ended); reading everything when ``read``, nothing otherwise."""
        tally = self.tally
        sock = link.sock
        poller = select.epoll()
        mask = EPOLLRDHUP | (EPOLLIN if read else 0)
        poller.register(sock.fileno(), mask)
        pending = memoryview(b"")
        try:
            while True:
                now = time.monotonic()
                if now >= deadline:
                    return None
                if not pending:
                    link.tls.write(block)
                    pending = memoryview(link.out.read())
                try:
                    sent = sock.send(pending)
                except BlockingIOError:
                    sent = 0
                except OSError as exc:
                    return _reason(exc)
                tally.bytes_sent += sent
                pending = pending[sent:]
                if sent and not pending:
                    tally.frames_sent += count
                blocked = len(pending) > 0
                wanted = mask | (EPOLLOUT if blocked else 0)
                poller.modify(sock.fileno(), wanted)
                for _, events in poller.poll(deadline - now if blocked else 0):
                    if read and events & EPOLLIN:
                        gone = self.receive(link)
                        if gone is not None:
                            return gone
                    if events & EPOLL_GONE:
                        error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                        return _reason(OSError(error, os.strerror(error))) if error else "hangup"
                    if not read and events & EPOLLRDHUP:
                        return "eof"
        finally:
            poller.close()

    def receive(self, link: Link) -> str | None:
        """Read and decrypt what has arrived; why the connection ended, if it did."""
        try:
            raw = link.sock.recv(RECV_BYTES)
        except BlockingIOError:
            return None
        except OSError as exc:
            return _reason(exc)
        if not raw:
            return "eof"
        tally = self.tally
        tally.bytes_received += len(raw)
        link.inc.write(raw)
        gone = None
        parts = []
        try:
            while link.inc.pending:
                parts.append(link.tls.read(RECV_BYTES))
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLZeroReturnError:
            gone = "close_notify"
        except ssl.SSLError as exc:
            gone = f"tls: {exc.reason or exc}"
        data = b"".join(parts)
        tally.frames_received += data.count(b"\n")
        if b'"code":"' in data:
            tally.error_codes.update(code.decode() for code in CODE.findall(data))
        return gone


def _reason(exc: OSError) -> str:
    if exc.errno in (errno.ECONNRESET, errno.EPIPE):
        return "reset"
    if exc.errno == errno.ECONNREFUSED:
        return "refused"
    return exc.strerror or str(exc)


def main(pipe: Connection, setup: Setup) -> None:
    """The attacker process (``setup.name`` is the user it logs in as)."""
    parent = os.getppid()
    _die_with_parent()
    if os.getppid() != parent:
        return
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the coordinator handles Ctrl-C
    attacker = Attacker(pipe, setup)
    try:
        attacker.run()
    except BaseException:
        attacker.drop()
        with contextlib.suppress(OSError):
            pipe.send(("crashed", traceback.format_exc()))
        sys.exit(1)
