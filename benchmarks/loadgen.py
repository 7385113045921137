"""The load generator: one process driving many TLS connections, as cheaply as it can.

Each generator process runs one ``epoll`` loop over plain non-blocking
sockets with stdlib TLS in memory BIOs (``ssl.SSLObject``): one ``recv``
system call takes everything the kernel has for a connection, and the TLS
records in it are decrypted in a tight loop. Received bytes are never
parsed as JSON: frames are counted with ``bytes.count``, and the send
timestamp of every delivered message is pulled out of whole chunks with one
compiled regex. The sender puts ``time.monotonic_ns()`` in the message text
(``m<seq> <ns> xxx…``); CLOCK_MONOTONIC is system-wide on Linux, so the
receiving process can subtract it from its own clock.

The coordinator (:mod:`benchmarks.driver`) sends commands over a
``multiprocessing`` pipe; the process answers each one, some at once, some
when the work is done (see :class:`Generator` for the list). It logs in
with wire protocol v1 (``hello``, then ``join`` if asked), answers server
``ping``s, and never leaves its sockets behind: it exits when told to, when
the pipe closes, or when its parent dies.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import resource
import select
import signal
import socket
import ssl
import struct
import sys
import time
import traceback
from array import array
from collections import Counter, deque
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from securechat import tls

RECV_BYTES = 1 << 18
RECORD_BYTES = 1 << 16

# What the generator looks for in received chunks (server frames are compact
# JSON with fields in a fixed order; see docs/protocol.md).
MESSAGE = re.compile(rb'"text":"m(\d+) (\d+) ')
ACK = re.compile(rb'"type":"ack","ref":"([mz])(\d+)"')
PONG = re.compile(rb'"type":"pong","ref":"p(\d+)"')
PING = re.compile(rb'"type":"ping","id":"([^"]+)"')
CODE = re.compile(rb'"code":"([a-z_]+)"')

CONNECTING, HANDSHAKE, LOGIN, JOINING, READY, CLOSED = range(6)

# A receiving process tells the sender how many plan messages have reached every
# one of its connections (feedback plans): one datagram, this layout (the round
# of feedback, so that a late datagram of an earlier plan is never taken; the count).
PROGRESS = struct.Struct("!II")

EPOLLIN = select.EPOLLIN
EPOLLOUT = select.EPOLLOUT


@dataclass(frozen=True)
class Setup:
    """What every generator process needs to reach the server."""

    host: str
    port: int
    pki: str  # directory with ca.crt and <user>.crt/.key
    password: str
    name: str = "gen"
    protocol: str = "securechat"  # or "irc": :mod:`benchmarks.irc` speaks it
    # Ask for presence lists in hello (as securechat's clients do); off for a server
    # that predates hello's ``features`` (``--server-code`` of an older commit).
    presence_lists: bool = True


@dataclass(frozen=True)
class ConnSpec:
    """One connection to open."""

    user: str
    cert: bool = True  # log in with the user's client certificate; False: with the password
    room: str | None = None  # join this room after login
    sender: bool = False  # sends plans and pings; its deliveries are not counted


@dataclass(frozen=True)
class Plan:
    """What each sender connection of a process sends."""

    count: int
    window: int = 0  # at most this many unacknowledged (0: no limit)
    rate: float = 0.0  # messages per second per sender (0: as fast as the window allows)
    pad: int = 40  # characters of padding after the timestamp
    deadline: float = 120.0  # give up after this many seconds
    # With a window: send the next message each time one more has reached every
    # receiver (the receiving processes say so over UDP), one message per write;
    # without, the window refills on acknowledgements, in one write.
    feedback: bool = False


@dataclass
class Sending:
    """One sender connection's progress through a plan."""

    plan: Plan
    room: bytes
    id_base: int
    t_first: int
    sent: int = 0
    acked: int = 0
    t_last_ack: int = 0
    send_ns: array[int] = field(default_factory=lambda: array("q"))
    ack_ns: array[int] = field(default_factory=lambda: array("q"))

    def frame(self, seq: int, now: int) -> bytes:
        self.send_ns.append(now)
        text = b"m%d %d %s" % (seq, now, b"x" * self.plan.pad)
        return b'{"type":"say","room":"%s","text":"%s","id":"m%d"}\n' % (
            self.room,
            text,
            self.id_base + seq,
        )


class Conn:
    """One connection's socket, TLS state and counters."""

    __slots__ = (
        "count",
        "disorder",
        "done",
        "error",
        "fd",
        "frames",
        "inc",
        "last_ns",
        "marker_seen",
        "next_id",
        "next_seq",
        "out",
        "presence",
        "sending",
        "sock",
        "spec",
        "state",
        "sync_pending",
        "t_hs",
        "t_login",
        "t_ready",
        "t_start",
        "tail",
        "tls",
        "wbuf",
        "writing",
    )

    def __init__(
        self, spec: ConnSpec, sock: socket.socket, context: ssl.SSLContext, host: str
    ) -> None:
        self.spec = spec
        self.sock = sock
        self.fd = sock.fileno()
        self.inc = ssl.MemoryBIO()
        self.out = ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.inc, self.out, server_hostname=host)
        self.state = CONNECTING
        self.wbuf = bytearray()
        self.writing = False
        self.tail = b""
        self.t_start = time.monotonic_ns()
        self.t_hs = 0
        self.t_login = 0
        self.t_ready = 0
        self.error = ""
        self.count = 0
        self.next_seq = 0
        self.disorder = 0
        self.done = False
        self.last_ns = 0
        self.frames = 0
        self.presence = 0
        self.marker_seen = False
        self.next_id = 0
        self.sync_pending = 0
        self.sending: Sending | None = None


class Generator:
    """The event loop of one generator process.

    Commands (tuples from the coordinator) and their replies:

    * ``("prepare", specs)``: make the TLS contexts (certificate loading is
      not what is measured); ``("prepared",)``.
    * ``("open", specs, parallel, timeout)``: connect, handshake, log in (and
      join) with at most ``parallel`` in progress; ``("opened", rows)`` when
      all are done, one row per connection: user, ok, error, start, TLS
      handshake done, welcome received, ready (all ``monotonic_ns``).
    * ``("marker", text, timeout)``: ``("marker_armed",)`` at once, then
      ``("marker_seen", seen, total)`` once every counted connection has
      received a message containing ``text`` (or at the timeout).
    * ``("sync", text, timeout)``: every sender says ``text`` in its room;
      ``("synced", ok)`` when all are acknowledged.
    * ``("arm", target, deadline, stall[, feedback])``: resets the
      counters, ``("armed",)``, then ``("arrived", summary)`` when every counted
      connection has received ``target`` plan messages, or at the deadline,
      or after ``stall`` seconds without any. With ``feedback`` (a UDP port on
      127.0.0.1 and a round), each time more plan messages have reached every
      counted connection, one :data:`PROGRESS` datagram there says how many.
    * ``("feedback", sources)``: a UDP port for the progress datagrams of
      ``sources`` receiving processes, ``("feedback", (port, round))``; the
      next feedback plan is paced by them.
    * ``("send", plan)``: every sender runs ``plan``; ``("sent", summary)``.
    * ``("ping", count, interval, timeout)``: ``count`` pings, one every
      ``interval`` seconds, from the senders in turn (each sender pings once
      every ``interval`` × senders); ``("pinged", round_trips_ns, sent)`` once
      every ping is answered, or at the timeout (``sent`` − answered were not).
    * ``("collect",)``: ``("collected", data)`` with latencies and counters.
    * ``("close",)``: ``("closed",)``, and the process exits.
    """

    sending_class: type[Sending] = Sending

    def __init__(self, pipe: Connection, setup: Setup) -> None:
        self.pipe = pipe
        self.setup = setup
        self.poller = select.epoll()
        self.poller.register(pipe.fileno(), EPOLLIN)
        self.conns: dict[int, Conn] = {}
        self.all: list[Conn] = []
        self.contexts: dict[str | None, ssl.SSLContext] = {}
        self.running = True
        # open
        self.to_open: deque[ConnSpec] = deque()
        self.opening = 0
        self.open_parallel = 0
        self.open_rows: list[tuple[str, bool, str, int, int, int, int]] = []
        self.open_deadline = 0.0
        self.open_active = False
        # counted deliveries
        self.latencies: array[int] = array("q")
        self.target = -1
        self.arm_conns: list[Conn] = []
        self.n_done = 0
        self.n_dead = 0
        self.arm_deadline = 0.0
        self.arm_stall = 0.0
        self.last_progress = 0.0
        # markers and syncs
        self.marker: bytes | None = None
        self.marker_count = 0
        self.marker_total = 0
        self.marker_deadline = 0.0
        self.sync_deadline = 0.0
        self.syncing = False
        # sending
        self.plan_active = False
        self.plan_deadline = 0.0
        self.paced: list[Conn] = []
        # feedback plans: the receiving side (progress of every counted connection)
        self.progress_to: tuple[str, int] | None = None
        self.progress_round = 0
        self.progress_socket: socket.socket | None = None
        self.reached: array[int] | None = None  # per plan message: connections it reached
        self.reached_all = 0  # plan messages that reached every live counted connection
        self.live = 0  # counted connections still open since the arm
        # ... and the sending side
        self.feedback_socket: socket.socket | None = None
        self.feedback_fd = -1
        self.feedback_sources = 0
        self.feedback_round = 0
        self.progress: dict[tuple[str, int], int] = {}
        self.fed: list[Conn] = []
        # pings
        self.ping_conns: list[Conn] = []  # pinged in turn
        self.ping_turn = 0
        self.ping_left = 0
        self.ping_interval = 0.0
        self.ping_next = 0.0
        self.ping_sent: dict[int, int] = {}
        self.ping_seq = 0
        self.ping_first = 0  # ping_seq when the current round of pings began
        self.ping_rtts: list[int] = []
        self.ping_deadline = 0.0
        # diagnostics
        self.errors: Counter[str] = Counter()
        self.lost: Counter[str] = Counter()

    # --- plumbing ---

    def reply(self, *message: Any) -> None:
        self.pipe.send(message)

    def context(self, spec: ConnSpec) -> ssl.SSLContext:
        key = spec.user if spec.cert else None
        context = self.contexts.get(key)
        if context is None:
            pki = Path(self.setup.pki)
            if spec.cert:
                context = tls.client_context(
                    pki / "ca.crt", pki / f"{spec.user}.crt", pki / f"{spec.user}.key"
                )
            else:
                context = tls.client_context(pki / "ca.crt")
            # The client's TLS settings, except that the generator does not verify
            # the server's certificate: one ECDSA verification less per handshake
            # on the generator's side; the server's work is the same.
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            self.contexts[key] = context
        return context

    def counted(self) -> list[Conn]:
        return [conn for conn in self.all if not conn.spec.sender]

    def senders(self) -> list[Conn]:
        return [conn for conn in self.all if conn.spec.sender and conn.state == READY]

    def run(self) -> None:
        poll = self.poller.poll
        conns = self.conns
        pipe_fd = self.pipe.fileno()
        while self.running:
            for fd, events in poll(self.timeout()):
                if fd == pipe_fd:
                    try:
                        command = self.pipe.recv()
                    except EOFError:
                        self.running = False
                        break
                    self.command(command)
                    continue
                conn = conns.get(fd)
                if conn is None:
                    if fd == self.feedback_fd:
                        self.feedback_in()
                    continue
                if conn.state == CONNECTING:
                    self.connected(conn)
                    continue
                if events & EPOLLOUT:
                    self.flush(conn)
                if events & ~EPOLLOUT:
                    self.receive(conn)
            self.tick()
        self.close_all()

    def timeout(self) -> float:
        now = time.monotonic()
        due = now + 0.2
        for conn in self.paced:
            sending = conn.sending
            if sending is not None:
                next_send = sending.t_first / 1e9 + sending.sent / sending.plan.rate
                due = min(due, next_send)
        if self.ping_left and self.ping_conns:
            due = min(due, self.ping_next)
        return max(0.0, due - now)

    # --- commands ---

    def command(self, command: tuple[Any, ...]) -> None:
        kind = command[0]
        if kind == "prepare":
            for spec in command[1]:
                self.context(spec)
            self.reply("prepared")
        elif kind == "open":
            self.start_open(command[1], command[2], command[3])
        elif kind == "marker":
            self.marker = command[1].encode()
            self.marker_deadline = time.monotonic() + command[2]
            self.marker_count = 0
            self.marker_total = 0
            for conn in self.counted():
                conn.marker_seen = conn.state != READY  # a closed one never will
                self.marker_total += 1
                self.marker_count += conn.marker_seen
            self.reply("marker_armed")
            self.check_marker()
        elif kind == "sync":
            self.start_sync(command[1], command[2])
        elif kind == "arm":
            self.arm(command[1], command[2], command[3], *command[4:])
        elif kind == "feedback":
            self.reply("feedback", self.listen_feedback(command[1]))
        elif kind == "send":
            self.start_plan(command[1])
        elif kind == "ping":
            self.start_ping(command[1], command[2], command[3])
        elif kind == "collect":
            self.reply("collected", self.collect())
        elif kind == "close":
            self.close_all()
            self.reply("closed")
            self.running = False
        else:
            raise ValueError(f"unknown command {kind!r}")

    # --- opening connections ---

    def start_open(self, specs: list[ConnSpec], parallel: int, timeout: float) -> None:
        self.to_open.extend(specs)
        self.open_parallel = max(1, parallel)
        self.open_rows = []
        self.open_deadline = time.monotonic() + timeout
        self.open_active = True
        self.open_more()
        self.check_open()

    def open_more(self) -> None:
        while self.to_open and self.opening < self.open_parallel:
            spec = self.to_open.popleft()
            self.opening += 1
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = Conn(spec, sock, self.context(spec), self.setup.host)
            self.conns[conn.fd] = conn
            self.all.append(conn)
            error = sock.connect_ex((self.setup.host, self.setup.port))
            if error not in (0, 115):  # EINPROGRESS
                self.fail(conn, f"connect: {os.strerror(error)}")
                continue
            self.poller.register(conn.fd, EPOLLOUT)

    def connected(self, conn: Conn) -> None:
        error = conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if error:
            self.fail(conn, f"connect: {os.strerror(error)}")
            return
        conn.state = HANDSHAKE
        self.poller.modify(conn.fd, EPOLLIN)
        self.handshake(conn)

    def handshake(self, conn: Conn) -> None:
        try:
            conn.tls.do_handshake()
        except ssl.SSLWantReadError:
            self.flush(conn)
            return
        except (ssl.SSLError, OSError) as exc:
            self.fail(conn, f"handshake: {exc}")
            return
        conn.t_hs = time.monotonic_ns()
        conn.state = LOGIN
        self.hello(conn)

    def hello(self, conn: Conn) -> None:
        """Log in: the first bytes once TLS is up."""
        features = b',"features":["presence_lists"]' if self.setup.presence_lists else b""
        if conn.spec.cert:
            hello = b'{"type":"hello","username":"%s"%s,"id":"h"}\n' % (
                conn.spec.user.encode(),
                features,
            )
        else:
            hello = b'{"type":"hello","username":"%s","password":"%s"%s,"id":"h"}\n' % (
                conn.spec.user.encode(),
                self.setup.password.encode(),
                features,
            )
        self.write(conn, hello)

    def logged_in(self, conn: Conn, data: bytes, now: int) -> None:
        """Login progress from the frames in ``data`` (state LOGIN or JOINING)."""
        if conn.state == LOGIN:
            if b'"type":"welcome"' in data:
                conn.t_login = now
                if conn.spec.room is not None:
                    conn.state = JOINING
                    self.write(
                        conn,
                        b'{"type":"join","room":"%s","id":"j"}\n' % conn.spec.room.encode(),
                    )
                    return
                self.ready(conn, now)
            elif b'"type":"error"' in data:
                self.fail(conn, "login: " + _codes(data))
        elif b'"type":"joined"' in data and b'"ref":"j"' in data:
            self.ready(conn, now)
        elif b'"type":"error"' in data and b'"ref":"j"' in data:
            self.fail(conn, "join: " + _codes(data))

    def ready(self, conn: Conn, now: int) -> None:
        conn.state = READY
        conn.t_ready = now
        self.opened(conn, ok=True)

    def opened(self, conn: Conn, *, ok: bool) -> None:
        self.opening -= 1
        spec = conn.spec
        self.open_rows.append(
            (spec.user, ok, conn.error, conn.t_start, conn.t_hs, conn.t_login, conn.t_ready)
        )
        self.open_more()
        self.check_open()

    def check_open(self) -> None:
        if self.open_active and not self.to_open and self.opening == 0:
            self.open_active = False
            self.reply("opened", self.open_rows)

    # --- I/O ---

    def write(self, conn: Conn, data: bytes) -> None:
        try:
            conn.tls.write(data)
        except ssl.SSLError as exc:
            self.fail(conn, f"write: {exc}")
            return
        self.flush(conn)

    def flush(self, conn: Conn) -> None:
        """Send what TLS produced; wait for EPOLLOUT only when the socket is full."""
        pending = conn.out.read()
        if pending:
            conn.wbuf += pending
        if conn.wbuf:
            try:
                sent = conn.sock.send(conn.wbuf)
            except BlockingIOError:
                sent = 0
            except OSError as exc:
                self.fail(conn, f"send: {exc.strerror or exc}")
                return
            del conn.wbuf[:sent]
        if conn.wbuf and not conn.writing:
            conn.writing = True
            self.poller.modify(conn.fd, EPOLLIN | EPOLLOUT)
        elif not conn.wbuf and conn.writing:
            conn.writing = False
            self.poller.modify(conn.fd, EPOLLIN)

    def receive(self, conn: Conn) -> None:
        try:
            raw = conn.sock.recv(RECV_BYTES)
        except BlockingIOError:
            return
        except OSError as exc:
            self.fail(conn, f"recv: {exc.strerror or exc}")
            return
        if not raw:
            self.fail(conn, "eof")
            return
        inc = conn.inc
        inc.write(raw)
        if conn.state == HANDSHAKE:
            self.handshake(conn)
            if conn.state != LOGIN:
                return
        read = conn.tls.read
        parts = []
        eof = False
        try:
            while inc.pending:
                parts.append(read(RECORD_BYTES))
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLZeroReturnError:
            eof = True
        except ssl.SSLError as exc:
            self.fail(conn, f"tls: {exc.reason or exc}")
            return
        if conn.out.pending:  # TLS may need to answer (key updates)
            self.flush(conn)
        if parts:
            data = b"".join(parts)
            if conn.tail:
                data = conn.tail + data
            end = data.rfind(b"\n") + 1
            if end:
                conn.tail = data[end:]
                self.frames(conn, data[:end] if conn.tail else data)
            else:
                conn.tail = data
        if eof:
            self.fail(conn, "close_notify")

    def frames(self, conn: Conn, data: bytes) -> None:
        """Account for the complete frames in ``data``."""
        now = time.monotonic_ns()
        conn.frames += data.count(b"\n")
        if conn.state != READY:
            self.logged_in(conn, data, now)
            if conn.state == CLOSED:
                return
        if b'"code":"' in data:
            for code in CODE.findall(data):
                self.errors[code.decode()] += 1
        if b'"type":"presence"' in data:
            conn.presence += data.count(b'"type":"presence"')
        if b'"type":"ping"' in data:
            for ping_id in PING.findall(data):
                self.write(conn, b'{"type":"pong","ref":"%s"}\n' % ping_id)
        if conn.spec.sender:
            if b'"type":"ack"' in data:
                self.acked(conn, ACK.findall(data), now)
            if b'"type":"pong"' in data and conn in self.ping_conns:
                self.ponged(PONG.findall(data), now)
            return
        self.delivered(conn, data, MESSAGE.findall(data), now)

    def delivered(
        self, conn: Conn, data: bytes, matches: list[tuple[bytes, bytes]], now: int
    ) -> None:
        """A receiver's chunk: the sync marker, and the plan messages in it (``matches``:
        sequence number and send time of each, in order), whatever the protocol."""
        if self.marker is not None and not conn.marker_seen and self.marker in data:
            conn.marker_seen = True
            self.marker_count += 1
            self.check_marker()
        if not matches or self.target < 0:
            return
        count = len(matches)
        first = int(matches[0][0])
        last = int(matches[-1][0]) if count > 1 else first
        if first != conn.next_seq or last != first + count - 1:
            conn.disorder += 1
        conn.next_seq = last + 1
        conn.count += count
        conn.last_ns = now
        append = self.latencies.append
        for _, sent in matches:
            append(now - int(sent))
        self.last_progress = now / 1e9
        if self.reached is not None:
            self.reach(first, count)
        if not conn.done and conn.count >= self.target:
            conn.done = True
            self.n_done += 1
            self.check_arrived()

    def fail(self, conn: Conn, reason: str) -> None:
        state = conn.state
        if state == CLOSED:
            return
        conn.state = CLOSED
        conn.error = reason
        self.conns.pop(conn.fd, None)
        with contextlib.suppress(OSError, ValueError):
            self.poller.unregister(conn.fd)
        conn.sock.close()
        if state < READY:
            self.opened(conn, ok=False)
            return
        self.lost[reason] += 1
        if conn.spec.sender:
            return
        if self.target >= 0 and not conn.done:
            conn.done = True
            self.n_dead += 1
            self.check_arrived()
        if self.reached is not None and conn in self.arm_conns:
            self.live -= 1  # the others no longer wait for it
            self.reach(0, 0)
        if self.marker is not None and not conn.marker_seen:
            conn.marker_seen = True  # it never will: do not wait for it
            self.marker_count += 1
            self.check_marker()

    def close_all(self) -> None:
        for conn in list(self.conns.values()):
            conn.state = CLOSED
            conn.sock.close()
        self.conns.clear()
        for sock in (self.feedback_socket, self.progress_socket):
            if sock is not None:
                sock.close()
        self.feedback_socket = self.progress_socket = None
        self.feedback_fd = -1

    # --- markers and syncs ---

    def check_marker(self) -> None:
        if self.marker is None:
            return
        if self.marker_count >= self.marker_total or time.monotonic() > self.marker_deadline:
            self.reply("marker_seen", self.marker_count, self.marker_total)
            self.marker = None

    def start_sync(self, text: str, timeout: float) -> None:
        senders = self.senders()
        self.syncing = True
        self.sync_deadline = time.monotonic() + timeout
        for conn in senders:
            conn.sync_pending += 1
            conn.next_id += 1
            self.say_sync(conn, text.encode(), conn.next_id)
        self.check_sync()

    def say_sync(self, conn: Conn, text: bytes, number: int) -> None:
        """Say ``text`` in the sender's room; its acknowledgement is ``z<number>``."""
        frame = b'{"type":"say","room":"%s","text":"%s","id":"z%d"}\n'
        self.write(conn, frame % (self.room(conn), text, number))

    def check_sync(self) -> None:
        if not self.syncing:
            return
        waiting = [conn for conn in self.senders() if conn.sync_pending]
        if not waiting or time.monotonic() > self.sync_deadline:
            self.syncing = False
            self.reply("synced", not waiting)

    # --- counted deliveries ---

    def arm(
        self, target: int, deadline: float, stall: float, feedback: tuple[int, int] | None = None
    ) -> None:
        self.latencies = array("q")
        self.target = target
        self.arm_conns = self.counted()
        self.n_done = 0
        self.n_dead = 0
        for conn in self.arm_conns:
            conn.count = 0
            conn.next_seq = 0
            conn.disorder = 0
            conn.last_ns = 0
            conn.done = conn.state != READY
            self.n_dead += conn.done
        now = time.monotonic()
        self.arm_deadline = now + deadline
        self.arm_stall = stall
        self.last_progress = now
        self.reached = None
        if feedback is not None:
            if self.progress_socket is None:
                self.progress_socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self.progress_to = ("127.0.0.1", feedback[0])
            self.progress_round = feedback[1]
            self.reached = array("i", bytes(4 * target))
            self.reached_all = -1  # not said yet: the first reach() says it, even if 0
            self.live = len(self.arm_conns) - self.n_dead
        self.reply("armed")
        if self.reached is not None:
            self.reach(0, 0)
        self.check_arrived()

    def reach(self, first: int, count: int) -> None:
        """Plan messages ``first`` .. ``first + count - 1`` reached one more connection;
        tell the sender when more of them have now reached every live one."""
        reached = self.reached
        assert reached is not None
        assert self.progress_socket is not None
        end = len(reached)
        for seq in range(first, min(first + count, end)):
            reached[seq] += 1
        done = max(0, self.reached_all)
        while done < end and reached[done] >= self.live:
            done += 1
        if done != self.reached_all:
            self.reached_all = done
            assert self.progress_to is not None
            with contextlib.suppress(OSError):  # the sender is gone: its plan is over
                message = PROGRESS.pack(self.progress_round, done)
                self.progress_socket.sendto(message, self.progress_to)

    def check_arrived(self, now: float | None = None) -> None:
        if self.target < 0:
            return
        counted = self.arm_conns
        finished = self.n_done + self.n_dead >= len(counted)
        if now is not None and not finished:
            finished = now > self.arm_deadline or now - self.last_progress > self.arm_stall
        if finished:
            self.reply(
                "arrived",
                {
                    "connections": len(counted),
                    "complete": self.n_done,
                    "dead": self.n_dead,
                    "received": sum(min(conn.count, self.target) for conn in counted),
                    "extra": sum(max(0, conn.count - self.target) for conn in counted),
                    "disorder": sum(conn.disorder for conn in counted),
                    "last_ns": max((conn.last_ns for conn in counted), default=0),
                },
            )
            self.target = -1

    # --- sending ---

    def room(self, conn: Conn) -> bytes:
        return (conn.spec.room or "lobby").encode()

    def start_plan(self, plan: Plan) -> None:
        self.plan_active = True
        self.plan_deadline = time.monotonic() + plan.deadline
        self.paced = []
        self.fed = []
        now = time.monotonic_ns()
        for conn in self.senders():
            conn.sending = self.sending_class(plan, self.room(conn), conn.next_id + 1, t_first=now)
            conn.next_id += plan.count
            if plan.rate > 0:
                self.paced.append(conn)
            elif plan.feedback:
                self.fed.append(conn)
                self.feed(conn, now)
            else:
                self.fill(conn, now)
        self.pace()

    def send_messages(self, conn: Conn, frames: list[bytes]) -> None:
        """Plan messages just made by ``conn.sending``, in one write."""
        self.write(conn, b"".join(frames))

    def listen_feedback(self, sources: int) -> tuple[int, int]:
        """The UDP port where ``sources`` receiving processes will say their progress,
        and the round of feedback they are to say it with."""
        if self.feedback_socket is None:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind(("127.0.0.1", 0))
            sock.setblocking(False)
            self.feedback_socket = sock
            self.feedback_fd = sock.fileno()
            self.poller.register(self.feedback_fd, EPOLLIN)
        self.feedback_sources = sources
        self.feedback_round += 1
        self.progress = {}
        return int(self.feedback_socket.getsockname()[1]), self.feedback_round

    def feedback_in(self) -> None:
        sock = self.feedback_socket
        assert sock is not None
        while True:
            try:
                data, source = sock.recvfrom(64)
            except BlockingIOError:
                break
            if len(data) == PROGRESS.size:
                round_, done = PROGRESS.unpack(data)
                if round_ == self.feedback_round:
                    self.progress[source] = max(done, self.progress.get(source, 0))
        now = time.monotonic_ns()
        for conn in self.fed:
            self.feed(conn, now)

    def feed(self, conn: Conn, now: int) -> None:
        """Feedback plan: keep ``window`` messages beyond those that reached every
        receiver in flight, each in its own write."""
        sending = conn.sending
        if sending is None or conn.state != READY:
            return
        plan = sending.plan
        reached = 0
        if len(self.progress) >= self.feedback_sources:
            reached = min(self.progress.values(), default=plan.count)
        limit = min(plan.count, reached + plan.window)
        while sending.sent < limit:
            frame = sending.frame(sending.sent, now)
            sending.sent += 1
            self.send_messages(conn, [frame])
            now = time.monotonic_ns()

    def fill(self, conn: Conn, now: int) -> None:
        sending = conn.sending
        if sending is None:
            return
        plan = sending.plan
        limit = plan.count
        if plan.window:
            limit = min(limit, sending.acked + plan.window)
        if sending.sent >= limit:
            return
        frames = []
        while sending.sent < limit:
            frames.append(sending.frame(sending.sent, now))
            sending.sent += 1
        self.send_messages(conn, frames)

    def pace(self) -> None:
        now = time.monotonic_ns()
        for conn in self.paced:
            sending = conn.sending
            if sending is None or conn.state != READY:
                continue
            plan = sending.plan
            due = sending.t_first + int(sending.sent * 1e9 / plan.rate)
            if sending.sent < plan.count and now >= due:
                frames = []
                while sending.sent < plan.count and now >= due:
                    frames.append(sending.frame(sending.sent, now))
                    sending.sent += 1
                    due = sending.t_first + int(sending.sent * 1e9 / plan.rate)
                self.send_messages(conn, frames)

    def acked(self, conn: Conn, refs: list[tuple[bytes, bytes]], now: int) -> None:
        sending = conn.sending
        for kind, number in refs:
            if kind == b"z":
                conn.sync_pending -= 1
                continue
            if sending is None:
                continue
            seq = int(number) - sending.id_base
            if 0 <= seq < len(sending.send_ns):
                sending.ack_ns.append(now - sending.send_ns[seq])
            sending.acked += 1
            sending.t_last_ack = now
        if self.syncing:
            self.check_sync()
        if sending is not None and refs:
            if sending.plan.rate == 0 and not sending.plan.feedback:
                self.fill(conn, now)
            self.check_plan()

    def check_plan(self, now: float | None = None) -> None:
        if not self.plan_active:
            return
        senders = [conn for conn in self.all if conn.sending is not None]
        finished = all(
            conn.sending is not None and conn.sending.acked >= conn.sending.plan.count
            for conn in senders
            if conn.state == READY
        )
        if now is not None and now > self.plan_deadline:
            finished = True
        if not finished:
            return
        self.plan_active = False
        self.paced = []
        self.fed = []
        ack_ns = array("q")
        rows = []
        for conn in senders:
            sending = conn.sending
            assert sending is not None
            ack_ns.extend(sending.ack_ns)
            rows.append((sending.sent, sending.acked, sending.t_first, sending.t_last_ack))
            conn.sending = None
        self.reply("sent", {"senders": rows, "ack_ns": ack_ns.tobytes()})

    # --- pings ---

    def start_ping(self, count: int, interval: float, timeout: float) -> None:
        senders = self.senders()
        self.ping_left = count
        self.ping_interval = interval
        self.ping_next = time.monotonic()
        self.ping_rtts = []
        self.ping_sent = {}
        self.ping_deadline = time.monotonic() + timeout
        self.ping_conns = senders
        self.ping_turn = 0
        self.ping_first = self.ping_seq
        if not senders:
            self.finish_ping()
            return
        self.check_ping()

    def ponged(self, refs: list[bytes], now: int) -> None:
        for ref in refs:
            sent = self.ping_sent.pop(int(ref), None)
            if sent is not None:
                self.ping_rtts.append(now - sent)
        self.check_ping()

    def check_ping(self) -> None:
        """Send the next ping when it is due, from the next sender in turn that is open."""
        now = time.monotonic()
        if self.ping_left and now >= self.ping_next:
            conns = self.ping_conns
            for _ in range(len(conns)):
                conn = conns[self.ping_turn % len(conns)]
                self.ping_turn += 1
                if conn.state == READY:
                    self.ping_left -= 1
                    self.ping_seq += 1
                    self.ping_sent[self.ping_seq] = time.monotonic_ns()
                    # On a fixed grid (a late wake-up does not push the rest back),
                    # but never more than one ping behind.
                    self.ping_next = max(self.ping_next + self.ping_interval, now)
                    self.write(conn, b'{"type":"ping","id":"p%d"}\n' % self.ping_seq)
                    break
            else:
                self.ping_left = 0  # every sender is gone
        if (not self.ping_left and not self.ping_sent) or now > self.ping_deadline:
            self.finish_ping()

    def finish_ping(self) -> None:
        """``("pinged", round trips, pings sent)``: those not answered by now never count."""
        sent = self.ping_seq - self.ping_first
        self.reply("pinged", self.ping_rtts, sent)
        self.ping_conns = []
        self.ping_left = 0

    # --- the clock ---

    def tick(self) -> None:
        if self.paced:
            self.pace()
        if self.ping_conns:
            self.check_ping()
        now = time.monotonic()
        if self.target >= 0:
            self.check_arrived(now)
        if self.plan_active:
            self.check_plan(now)
        if self.marker is not None and now > self.marker_deadline:
            self.check_marker()
        if self.syncing and now > self.sync_deadline:
            self.check_sync()
        if self.open_active and now > self.open_deadline:
            for conn in [conn for conn in self.all if conn.state < READY]:
                self.fail(conn, "open: timeout")
            while self.to_open:
                spec = self.to_open.popleft()
                self.open_rows.append((spec.user, False, "open: not started", 0, 0, 0, 0))
            self.check_open()

    # --- results ---

    def collect(self) -> dict[str, Any]:
        counted = self.counted()
        return {
            "latency_ns": self.latencies.tobytes(),
            "errors": dict(self.errors),
            "lost": dict(self.lost),
            "presence": sum(conn.presence for conn in self.all),
            "frames": sum(conn.frames for conn in self.all),
            "open_connections": sum(1 for conn in self.all if conn.state == READY),
            "counted": len(counted),
            "tls": self.tls_in_use(),
        }

    def tls_in_use(self) -> str | None:
        """The TLS version and cipher suite of an open connection (all are alike)."""
        for conn in self.all:
            if conn.state == READY:
                cipher = conn.tls.cipher()
                return f"{conn.tls.version()} {cipher[0] if cipher else '?'}"
        return None


def _codes(data: bytes) -> str:
    return ",".join(code.decode() for code in CODE.findall(data)) or "unexpected reply"


def _die_with_parent() -> None:
    """Ask the kernel to kill this process when the coordinator dies (Linux)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def main(pipe: Connection, setup: Setup) -> None:
    """The generator process: run commands from ``pipe`` until told to close."""
    parent = os.getppid()
    _die_with_parent()
    if os.getppid() != parent:
        return
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the coordinator handles Ctrl-C
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    generator: Generator
    if setup.protocol == "irc":
        from .irc import IrcGenerator  # here: it builds on this module

        generator = IrcGenerator(pipe, setup)
    else:
        generator = Generator(pipe, setup)
    try:
        generator.run()
    except BaseException:
        generator.close_all()
        with contextlib.suppress(OSError):
            pipe.send(("crashed", traceback.format_exc()))
        sys.exit(1)
