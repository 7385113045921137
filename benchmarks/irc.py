"""The load generator's IRC adapter: the same loop, connections and counters as
:mod:`benchmarks.loadgen`, speaking IRC (RFC 2812) over TLS to a peer server
(ngIRCd, :mod:`benchmarks.ngircd`) instead of securechat's protocol.

A connection registers (``NICK``/``USER``, then ``001``), a sender becomes an
IRC operator with user mode ``+F`` (ngIRCd's flood protection off for it; the
bench password is the operator password), and everyone ``JOIN``s ``#bench``
(ready at the end of the names list, ``366``). A plan message is
``PRIVMSG #bench :m<seq> <ns> xxx…``: the send timestamp is in the text, so the
receivers measure latency exactly as for securechat. IRC has no acknowledgement
of a message, so each write of plan messages ends with ``PING :m<id>``; the
server answers it once it has handled the messages before it, which is what
securechat's ``ack`` says (one per write here, one per message there). Server
``PING``s are answered.
"""

from __future__ import annotations

import re
import time
from multiprocessing.connection import Connection

from .loadgen import JOINING, LOGIN, READY, Conn, Generator, Sending, Setup

MESSAGE = re.compile(rb"PRIVMSG #\S+ :m(\d+) (\d+) ")
PONG = re.compile(rb" PONG \S+ :([mz])(\d+)")
SERVER_PING = re.compile(rb"(?:^|\n)PING (:?[^\r\n]*)")
# Numeric replies 400-599 are errors (RFC 2812, section 5.2).
NUMERIC_ERROR = re.compile(rb"(?:^|\n):\S+ ([45]\d\d) ")
OPERATOR = "bench"  # the [Operator] name in the ngIRCd config the bench writes


class IrcSending(Sending):
    def frame(self, seq: int, now: int) -> bytes:
        self.send_ns.append(now)
        return b"PRIVMSG %s :m%d %d %s\r\n" % (self.room, seq, now, b"x" * self.plan.pad)


class IrcGenerator(Generator):
    """:class:`~benchmarks.loadgen.Generator` speaking IRC (see the module docstring)."""

    sending_class = IrcSending

    def __init__(self, pipe: Connection, setup: Setup) -> None:
        super().__init__(pipe, setup)
        self.awaiting_flood_mode: set[int] = set()  # senders not yet +F (by fd)

    def room(self, conn: Conn) -> bytes:
        return b"#" + (conn.spec.room or "bench").encode()

    def hello(self, conn: Conn) -> None:
        nick = conn.spec.user.encode()
        self.write(conn, b"NICK %s\r\nUSER %s 0 * :%s\r\n" % (nick, nick, nick))

    def logged_in(self, conn: Conn, data: bytes, now: int) -> None:
        """Registration, operator status for senders, then the channel."""
        problem = NUMERIC_ERROR.search(data)
        if problem or data.startswith(b"ERROR ") or b"\nERROR " in data:
            what = problem[1].decode() if problem else "ERROR"
            self.fail(conn, ("join: " if conn.state == JOINING else "login: ") + what)
            return
        nick = conn.spec.user.encode()
        if conn.state == LOGIN and b" 001 " in data:
            conn.t_login = now
            conn.state = JOINING
            commands = b""
            if conn.spec.sender:
                # In order: ngIRCd handles one client's commands one after the other.
                commands = b"OPER %s %s\r\nMODE %s +F\r\n" % (
                    OPERATOR.encode(),
                    self.setup.password.encode(),
                    nick,
                )
                self.awaiting_flood_mode.add(conn.fd)
            self.write(conn, commands + b"JOIN %s\r\n" % self.room(conn))
            return
        if conn.state != JOINING:
            return
        if b"MODE %s :+F" % nick in data:
            self.awaiting_flood_mode.discard(conn.fd)
        if b" 366 " in data:  # end of the names list: joined
            if conn.fd in self.awaiting_flood_mode:
                self.fail(conn, "oper: no user mode +F")
                return
            self.ready(conn, now)

    def send_messages(self, conn: Conn, frames: list[bytes]) -> None:
        sending = conn.sending
        assert sending is not None
        last = sending.id_base + sending.sent - 1
        self.write(conn, b"".join(frames) + b"PING :m%d\r\n" % last)

    def say_sync(self, conn: Conn, text: bytes, number: int) -> None:
        self.write(conn, b"PRIVMSG %s :%s\r\nPING :z%d\r\n" % (self.room(conn), text, number))

    def ponged_acks(self, conn: Conn, tokens: list[tuple[bytes, bytes]], now: int) -> None:
        """``PONG``s of the ``PING``s after plan messages: each acknowledges every plan
        message up to the one it names."""
        refs: list[tuple[bytes, bytes]] = []
        sending = conn.sending
        next_id = sending.id_base + sending.acked if sending is not None else 0
        for kind, number in tokens:
            if kind == b"z" or sending is None:
                refs.append((kind, number))
                continue
            last = int(number)
            refs.extend((b"m", b"%d" % ident) for ident in range(next_id, last + 1))
            next_id = max(next_id, last + 1)
        self.acked(conn, refs, now)

    def frames(self, conn: Conn, data: bytes) -> None:
        """Account for the complete lines in ``data`` (as the securechat one does)."""
        now = time.monotonic_ns()
        conn.frames += data.count(b"\n")
        if conn.state != READY:
            self.logged_in(conn, data, now)
            if conn.state != READY:
                return
        if b"PING " in data:
            for token in SERVER_PING.findall(data):
                self.write(conn, b"PONG %s\r\n" % token)
        if b"ERROR " in data and (data.startswith(b"ERROR ") or b"\nERROR " in data):
            self.errors["server_error"] += 1
        if b" JOIN " in data:
            conn.presence += data.count(b" JOIN ")
        if conn.spec.sender:
            for code in NUMERIC_ERROR.findall(data):
                self.errors[f"irc_{code.decode()}"] += 1
            if b" PONG " in data:
                self.ponged_acks(conn, PONG.findall(data), now)
            return
        self.delivered(conn, data, MESSAGE.findall(data), now)
