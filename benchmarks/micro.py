"""The floor costs behind the missed targets: ``python -m benchmarks.micro [--quick]``.

docs/performance.md lists the targets the server misses: CPU per delivery
in paced fan-out, logins per second with client certificates. This module
measures, in one process and with ``time.process_time`` (the CPU of the
measuring process only), what one delivery and one login cannot cost less
than on this machine, so that those figures can be read against a floor:

A. **Fan-out, per send.** A trio server in this process holds N TLS
   connections over loopback (``--connections``, default 1 000), each a
   ``trio.SSLStream`` over a ``LeanSocketStream`` as in the server, with one
   writer task per connection waiting on a :class:`securechat.delivery.Outbox`.
   A child process (``--drain``) opened them with stdlib TLS and then only
   reads raw bytes with ``epoll``; it never decrypts, and its CPU is not
   counted. Each round puts one ~120-byte message frame into every outbox
   and waits until every writer has handled it. What the writers do with the
   frame changes from mode to mode, each adding one layer: ``wake`` (take
   it: the put, the wake-up and one scheduler step), ``encrypt`` (also make
   the TLS record and throw it away), ``encrypt+write`` (also ``os.write`` it
   to the socket: the least one write with TLS costs, without trio's
   machinery) and ``send_all``, the real path, over ``LeanSocketStream`` and
   over a plain ``trio.SocketStream`` (the latter on a second set of
   connections). The differences are the share of the system call and of
   ``SSLStream``'s machinery. On loopback the sender's ``write`` also pays
   for the receiving side of TCP (the kernel delivers the segment in the
   writer's context), so the system call share is higher than over a NIC;
   the server's benchmark runs on loopback too, so it is the share that
   counts against its figures.
B. **TLS handshakes**, server and client side, in memory BIOs (no sockets),
   with the server's and client's real contexts (:mod:`securechat.tls`),
   without and with a client certificate.
C. **Trio wake-ups** of 1 000 parked tasks: ``ParkingLot.unpark_all`` against
   ``trio.lowlevel.reschedule`` of a stored task (what ``Outbox.put`` does),
   each followed by the task's step.

It prints one JSON line per measurement as it is done (``{"micro": name,
...}``; derived figures say what they are derived from), progress on
stderr, then a table and what the figures mean for the targets. Loopback
only; the child process and the temporary directory (certificates) are
removed however the run ends, and the child dies with this process
(``PR_SET_PDEATHSIG``) or when its stdin closes. About 45 s on a 2-core VM,
15 to 20 s with ``--quick``. Exit code 0, 1 when a measurement could not
run, 2 for bad arguments, 130 after Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import functools
import gc
import json
import math
import os
import resource
import select
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

import trio

from securechat import certs, fast_tls, tls
from securechat.config import ClientCertMode
from securechat.delivery import Flusher, Outbox, write_loop
from securechat.protocol import Message, encode
from securechat.transport import LeanSocketStream

from .driver import _die_with_parent
from .machine import busy_neighbours, cpu_model
from .run import LOCK, TEMP_PREFIX, _remove_stale_directories
from .targets import TARGETS

FRAME_BYTES = 120
PACED_RATE = 50  # messages per second in the paced fan-out scenario
WARMUP_ROUNDS = 3
SETUP_TIMEOUT_S = 30.0  # plus 20 ms per connection
ROUND_TIMEOUT_S = 30.0
CHILD_STOP_S = 5.0
FD_MARGIN = 64

# (fan-out rounds, handshakes, wake-up rounds); fan-out rounds are the most of the
# run time (1 000 connections x 5 modes): 200 keeps a full run under a minute here.
FULL = (200, 300, 300)
QUICK = (50, 50, 50)
WAKE_TASKS = 1000

T = TypeVar("T")

LEAN, SOCKET = "LeanSocketStream", "trio.SocketStream"


class MicroError(Exception):
    """A measurement could not run (the drain process died, a timeout, ...)."""


FAILURES = (MicroError, trio.TooSlowError, trio.BrokenResourceError, OSError, certs.CertError)


class _Stop(BaseException):
    """SIGTERM: unwind, stopping the child process and removing the temp dir on the way."""


def _stop_signal(signum: int, frame: FrameType | None) -> None:
    raise _Stop(signal.Signals(signum).name)


def _log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _frame(size: int = FRAME_BYTES) -> bytes:
    """A real ``message`` frame as the server encodes it, padded to about ``size`` bytes."""

    def build(text: str) -> bytes:
        return encode(
            Message(
                id=12345, room="lobby", sender="user0001", text=text, ts="2026-11-24T10:32:00.123Z"
            )
        )

    text = "m1 1234567890 "
    return build(text + "x" * max(0, size - len(build(text))))


@dataclass
class _Progress:
    """How many writers have handled their frame; ``event`` is set by the one that completes
    ``target``."""

    done: int = 0
    target: int = 0
    event: trio.Event = field(default_factory=trio.Event)

    def expect(self, more: int) -> trio.Event:
        self.target += more
        self.event = trio.Event()
        return self.event

    def advance(self) -> None:
        self.done += 1
        if self.done == self.target:
            self.event.set()


def _trio_run(function: Callable[..., Awaitable[T]], *args: Any) -> T:
    """``trio.run``, raising the exception itself rather than the nurseries' group of one."""
    try:
        return trio.run(function, *args)
    except BaseExceptionGroup as group:
        leaves = list(_leaves(group))
        # Ctrl-C and SIGTERM first (they decide the exit code), then our own diagnosis.
        leaves.sort(
            key=lambda leaf: (
                not isinstance(leaf, KeyboardInterrupt | _Stop),
                not isinstance(leaf, MicroError),
            )
        )
        raise leaves[0] from group


def _leaves(group: BaseExceptionGroup[BaseException]) -> Iterator[BaseException]:
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            yield from _leaves(exc)
        else:
            yield exc


def _overflowed() -> None:
    raise MicroError("an outbox overflowed (a writer fell behind by a million frames?)")


# --- A: fan-out, per send ---------------------------------------------------------------


@dataclass
class _Conn:
    tcp: trio.SocketStream
    stream: trio.SSLStream[Any]

    @property
    def fd(self) -> int:
        return self.tcp.socket.fileno()


Writer = Callable[[_Conn, Outbox, _Progress], Awaitable[None]]


async def _write_fd(fd: int, data: bytes) -> None:
    """``os.write`` all of ``data``, waiting only if the socket buffer is full."""
    sent = os.write(fd, data)
    if sent == len(data):
        return
    with memoryview(data) as view:
        while sent < len(view):
            try:
                sent += os.write(fd, view[sent:])
            except BlockingIOError:
                await trio.lowlevel.wait_writable(fd)


# The writers reach into SSLStream's private SSL object and outgoing memory
# BIO (``_ssl_object``, ``_outgoing``) to separate encryption from the rest
# of send_all. Acceptable in a measurement tool, never in the server. The
# drain process never decrypts, so the records thrown away by "encrypt"
# (they advance the TLS sequence numbers) do no harm.


async def _wake_only(conn: _Conn, outbox: Outbox, progress: _Progress) -> None:
    while True:
        await outbox.wait_for_frames()
        outbox.take()
        progress.advance()


async def _encrypt(conn: _Conn, outbox: Outbox, progress: _Progress) -> None:
    ssl_object, outgoing = conn.stream._ssl_object, conn.stream._outgoing
    while True:
        await outbox.wait_for_frames()
        frame = outbox.take()
        assert frame is not None
        ssl_object.write(frame)
        outgoing.read()
        progress.advance()


async def _encrypt_write(conn: _Conn, outbox: Outbox, progress: _Progress) -> None:
    ssl_object, outgoing, fd = conn.stream._ssl_object, conn.stream._outgoing, conn.fd
    while True:
        await outbox.wait_for_frames()
        frame = outbox.take()
        assert frame is not None
        ssl_object.write(frame)
        await _write_fd(fd, outgoing.read())
        progress.advance()


async def _send_all(conn: _Conn, outbox: Outbox, progress: _Progress) -> None:
    stream = conn.stream
    while True:
        await outbox.wait_for_frames()
        frame = outbox.take()
        assert frame is not None
        await stream.send_all(frame)
        progress.advance()


async def _encrypt_send(conn: _Conn, outbox: Outbox, progress: _Progress) -> None:
    ssl_object, outgoing = conn.stream._ssl_object, conn.stream._outgoing
    transport = conn.stream.transport_stream
    assert isinstance(transport, LeanSocketStream)
    while True:
        await outbox.wait_for_frames()
        frame = outbox.take()
        assert frame is not None
        ssl_object.write(frame)
        records = outgoing.read()
        sent = transport.send_nowait(records)
        if sent < len(records):
            await transport.send_all(records[sent:])
        progress.advance()


async def _fast_tls(conn: _Conn, outbox: Outbox, progress: _Progress) -> None:
    if not fast_tls.AVAILABLE:
        raise MicroError(f"securechat.fast_tls is unavailable: {fast_tls.UNAVAILABLE}")
    stream = conn.stream
    while True:
        await outbox.wait_for_frames()
        frame = outbox.take()
        assert frame is not None
        await fast_tls.send_all(stream, frame)
        progress.advance()


class _CountedDirect(fast_tls.DirectWriter):
    """The server's direct write, counting each write as a writer counts its frames."""

    def __init__(self, stream: trio.SSLStream[Any], progress: _Progress) -> None:
        super().__init__(stream)
        self._progress = progress

    def write(self, data: bytes) -> bool:
        done = super().write(data)
        self._progress.advance()
        return done


async def _flushed(conn: _Conn, outbox: Outbox, progress: _Progress) -> None:
    """The server's writer task beside the Flusher: it wakes only for what the flusher
    could not write at once."""
    await write_loop(outbox, functools.partial(fast_tls.send_all, conn.stream), None)


@dataclass(frozen=True)
class _Mode:
    name: str  # the JSON line's "micro"
    label: str  # the table's
    writer: Writer
    flusher: bool = False  # the outboxes are written by one delivery.Flusher


LEAN_MODES = (
    _Mode("fanout-wake", "wake (put + wake writer + step)", _wake_only),
    _Mode("fanout-encrypt", "encrypt (+ SSLObject.write, BIO read)", _encrypt),
    _Mode("fanout-encrypt+write", "encrypt+write (+ os.write)", _encrypt_write),
    _Mode("fanout-send_all-lean", "SSLStream.send_all (LeanSocketStream)", _send_all),
    # After send_all: the first write of a TLS 1.3 stream (held-back tickets) is SSLStream's.
    _Mode("fanout-encrypt+send", "encrypt+send (+ socket.send)", _encrypt_send),
    _Mode("fanout-fast_tls", "fast_tls.send_all (LeanSocketStream)", _fast_tls),
    _Mode("fanout-flusher", "Flusher + fast_tls.DirectWriter (no wake-up)", _flushed, True),
)
SOCKET_MODES = (
    _Mode("fanout-send_all-socketstream", "SSLStream.send_all (trio.SocketStream)", _send_all),
)


async def _watch(child: subprocess.Popen[bytes]) -> None:
    """Raise as soon as the drain process exits (a pidfd turns readable then; Linux 5.3+)."""
    pidfd = os.pidfd_open(child.pid)
    try:
        await trio.lowlevel.wait_readable(pidfd)
    finally:
        trio.lowlevel.notify_closing(pidfd)
        os.close(pidfd)
    raise MicroError(f"the drain process exited with {child.wait()}")


async def _accept(
    listener: trio.SocketListener,
    count: int,
    kind: str,
    context: ssl.SSLContext,
    conns: list[_Conn],
) -> None:
    """Accept ``count`` connections one by one (the drain process opens them in turn)."""
    with trio.fail_after(SETUP_TIMEOUT_S + 0.02 * count):
        for _ in range(count):
            tcp = await listener.accept()  # TCP_NODELAY is set by trio
            transport: trio.abc.Stream = LeanSocketStream(tcp) if kind == LEAN else tcp
            conn = _Conn(tcp, trio.SSLStream(transport, context, server_side=True))
            conns.append(conn)
            try:
                await conn.stream.do_handshake()
                first = await conn.stream.receive_some(1)
            except trio.BrokenResourceError as exc:
                raise MicroError(
                    f"connection {len(conns)}: {exc.__cause__ or exc!r} (the drain process died?)"
                ) from exc
            if first != b"x":
                raise MicroError(f"connection {len(conns)}: the drain process sent {first!r}")


async def _rounds(
    conns: Sequence[_Conn], mode: _Mode, frame: bytes, rounds: int
) -> tuple[float, float]:
    """CPU and wall seconds of ``rounds`` rounds of one frame to every connection."""
    progress = _Progress()
    async with trio.open_nursery() as nursery:
        outboxes = []
        flusher = Flusher(None) if mode.flusher else None
        if flusher is not None:
            nursery.start_soon(flusher.run)
        for conn in conns:
            direct = _CountedDirect(conn.stream, progress) if flusher is not None else None
            outbox = Outbox(1_000_000, 1 << 30, _overflowed, flusher=flusher, direct=direct)
            outboxes.append(outbox)
            nursery.start_soon(mode.writer, conn, outbox, progress)
        await trio.sleep(0.05)  # every writer parked

        async def run(count: int) -> None:
            for _ in range(count):
                done = progress.expect(len(outboxes))
                for outbox in outboxes:
                    outbox.put(frame)
                with trio.fail_after(ROUND_TIMEOUT_S):
                    await done.wait()

        await run(WARMUP_ROUNDS)
        gc.collect()
        cpu, wall = time.process_time(), time.perf_counter()
        await run(rounds)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        nursery.cancel_scope.cancel()
    return cpu, wall


async def _fanout_session(
    listener_socket: socket.socket,
    child: subprocess.Popen[bytes],
    kind: str,
    modes: Sequence[_Mode],
    context: ssl.SSLContext,
    count: int,
    rounds: int,
) -> dict[str, tuple[float, float]]:
    listener = trio.SocketListener(trio.socket.from_stdlib_socket(listener_socket))
    conns: list[_Conn] = []
    results: dict[str, tuple[float, float]] = {}
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_watch, child)
            _log(f"A: {count} TLS connections over {kind}...")
            await _accept(listener, count, kind, context, conns)
            frame = _frame()
            for mode in modes:
                _log(f"A: {mode.label}, {rounds} rounds...")
                results[mode.name] = await _rounds(conns, mode, frame, rounds)
            nursery.cancel_scope.cancel()
    finally:
        for conn in conns:
            conn.tcp.socket.close()  # EOF for the drain process: it exits
        listener.socket.close()
    return results


def _spawn_drain(port: int, count: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(  # noqa: S603 (our own interpreter and module)
        [sys.executable, "-m", "benchmarks.micro", "--drain", str(port), str(count)],
        stdin=subprocess.PIPE,  # closed when we stop it, or when we die
        stdout=subprocess.DEVNULL,
        start_new_session=True,  # Ctrl-C reaches us only; we stop it
        preexec_fn=_die_with_parent,  # no threads here: trio.run is not running
        cwd=Path(__file__).resolve().parent.parent,
    )


def _stop_child(child: subprocess.Popen[bytes]) -> None:
    if child.stdin is not None:
        with contextlib.suppress(OSError):
            child.stdin.close()
    try:
        child.wait(CHILD_STOP_S)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()


def fanout(
    pki: Path, kind: str, modes: Sequence[_Mode], count: int, rounds: int
) -> dict[str, tuple[float, float]]:
    """One set of ``count`` connections over ``kind``, the ``modes`` run on it in turn."""
    context = tls.server_context(pki / "server.crt", pki / "server.key", pki / "ca.crt", "none")
    listener = socket.create_server(("127.0.0.1", 0), backlog=128)
    child: subprocess.Popen[bytes] | None = None
    try:
        child = _spawn_drain(listener.getsockname()[1], count)
        return _trio_run(_fanout_session, listener, child, kind, modes, context, count, rounds)
    finally:
        listener.close()
        if child is not None:
            _stop_child(child)


# --- the drain process ---------------------------------------------------------------


def _client_handshake(sock: socket.socket, context: ssl.SSLContext) -> None:
    """A TLS handshake over a blocking socket through memory BIOs, then one byte."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls_object = context.wrap_bio(incoming, outgoing)
    while True:
        try:
            tls_object.do_handshake()
            break
        except ssl.SSLWantReadError:
            pending = outgoing.read()
            if pending:
                sock.sendall(pending)
            data = sock.recv(65536)
            if not data:
                raise ConnectionError("the server closed during the handshake") from None
            incoming.write(data)
    tls_object.write(b"x")  # the server's handshake finishes with our Finished
    sock.sendall(outgoing.read())


def drain(port: int, count: int) -> int:
    """The child: open ``count`` TLS connections, then read raw bytes until EOF on all."""
    _die_with_parent()  # also set before exec; harmless twice
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops us
    _raise_fd_limit()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # as the load generator: the server's work is the same
    socks: dict[int, socket.socket] = {}
    try:
        for _ in range(count):
            sock = socket.create_connection(("127.0.0.1", port), timeout=SETUP_TIMEOUT_S)
            socks[sock.fileno()] = sock
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            _client_handshake(sock, context)
        with select.epoll() as poller:
            poller.register(sys.stdin.fileno(), select.EPOLLIN)  # EOF: the parent is gone
            for fd, sock in socks.items():
                sock.setblocking(False)
                poller.register(fd, select.EPOLLIN)
            left = len(socks)
            while left:
                for fd, _events in poller.poll():
                    if fd == sys.stdin.fileno():
                        return 0
                    try:
                        data = socks[fd].recv(1 << 20)
                    except BlockingIOError:
                        continue
                    except OSError:
                        data = b""
                    if not data:
                        poller.unregister(fd)
                        left -= 1
    except OSError as exc:  # ssl.SSLError too
        print(f"drain: {exc!r}", file=sys.stderr)
        return 1
    finally:
        for sock in socks.values():
            sock.close()
    return 0


# --- B: TLS handshakes ----------------------------------------------------------------


def handshakes(pki: Path, mode: ClientCertMode, count: int) -> dict[str, Any]:
    """Server and client CPU per handshake, memory BIOs, the contexts of securechat.tls."""
    server_context = tls.server_context(
        pki / "server.crt", pki / "server.key", pki / "ca.crt", mode
    )
    client_context = tls.client_context(pki / "ca.crt", pki / "alice.crt", pki / "alice.key")
    server_cpu = client_cpu = 0.0
    version = cipher = ""
    for number in range(-WARMUP_ROUNDS, count):
        server_in, server_out = ssl.MemoryBIO(), ssl.MemoryBIO()
        client_in, client_out = ssl.MemoryBIO(), ssl.MemoryBIO()
        server = server_context.wrap_bio(server_in, server_out, server_side=True)
        client = client_context.wrap_bio(client_in, client_out, server_hostname="localhost")
        server_done = client_done = False
        spent_server = spent_client = 0.0
        for _ in range(10):  # a TLS 1.3 handshake takes 2 turns, TLS 1.2 3
            if not client_done:
                started = time.process_time()
                try:
                    client.do_handshake()
                    client_done = True
                except ssl.SSLWantReadError:
                    pass
                spent_client += time.process_time() - started
            server_in.write(client_out.read())
            if not server_done:
                started = time.process_time()
                try:
                    server.do_handshake()
                    server_done = True
                except ssl.SSLWantReadError:
                    pass
                spent_server += time.process_time() - started
            client_in.write(server_out.read())
            if server_done and client_done:
                break
        else:
            raise MicroError(f"the {mode} handshake did not finish")
        if mode == "required" and not server.getpeercert():
            raise MicroError("the server did not get the client certificate")
        if number >= 0:
            server_cpu += spent_server
            client_cpu += spent_client
        version, cipher = server.version() or "", (server.cipher() or ("",))[0]
    return {
        "micro": f"handshake-{mode}",
        "client_certs": mode,
        "server_cpu_ms": round(server_cpu / count * 1e3, 3),
        "client_cpu_ms": round(client_cpu / count * 1e3, 3),
        "ops": count,
        "tls_version": version,
        "cipher": cipher,
    }


# --- C: trio wake-ups -----------------------------------------------------------------


async def _wake_parking_lots(tasks: int, rounds: int) -> float:
    """CPU seconds of ``rounds`` rounds of unpark_all on ``tasks`` lots of one task each."""
    progress = _Progress()
    lots = [trio.lowlevel.ParkingLot() for _ in range(tasks)]

    async def worker(lot: trio.lowlevel.ParkingLot) -> None:
        while True:
            await lot.park()
            progress.advance()

    def wake() -> None:
        for lot in lots:
            lot.unpark_all()

    async with trio.open_nursery() as nursery:
        for lot in lots:
            nursery.start_soon(worker, lot)
        spent = await _wake_rounds(wake, progress, tasks, rounds)
        nursery.cancel_scope.cancel()
    return spent


async def _wake_reschedule(tasks: int, rounds: int) -> float:
    """The same with each task stored in a slot and woken with ``reschedule``."""
    progress = _Progress()
    slots: list[trio.lowlevel.Task | None] = [None] * tasks

    async def worker(index: int) -> None:
        def abort(_: trio.lowlevel.RaiseCancelT) -> trio.lowlevel.Abort:
            slots[index] = None
            return trio.lowlevel.Abort.SUCCEEDED

        while True:
            slots[index] = trio.lowlevel.current_task()
            await trio.lowlevel.wait_task_rescheduled(abort)
            progress.advance()

    def wake() -> None:
        for index, task in enumerate(slots):
            assert task is not None, "a task was not parked"
            slots[index] = None
            trio.lowlevel.reschedule(task)

    async with trio.open_nursery() as nursery:
        for index in range(tasks):
            nursery.start_soon(worker, index)
        spent = await _wake_rounds(wake, progress, tasks, rounds)
        nursery.cancel_scope.cancel()
    return spent


async def _wake_rounds(
    wake: Callable[[], None], progress: _Progress, tasks: int, rounds: int
) -> float:
    async def run(count: int) -> None:
        for _ in range(count):
            done = progress.expect(tasks)
            wake()
            with trio.fail_after(ROUND_TIMEOUT_S):
                await done.wait()

    await trio.sleep(0.05)  # every task parked
    await run(WARMUP_ROUNDS)
    gc.collect()
    started = time.process_time()
    await run(rounds)
    return time.process_time() - started


# --- the report -----------------------------------------------------------------------


def _target(key: str, figure: str) -> float:
    for target in TARGETS:
        if target.key == key and target.figure == figure:
            return target.bound
    raise KeyError(f"{key} {figure}")


def _us(record: dict[str, Any]) -> float:
    return float(record["cpu_us_per_op"])


def _table(records: dict[str, dict[str, Any]], count: int, rounds: int) -> list[str]:
    lines = []
    frame = records.get("fanout-wake", {}).get("frame_bytes", len(_frame()))
    lines.append(
        f"A. fan-out, CPU per send: {count} connections, {rounds} rounds, {frame}-byte frame"
    )
    lines.append(f"   {'':44} {'ops':>9} {'CPU µs/op':>10} {'wall µs/op':>11}")
    for mode in (*LEAN_MODES, *SOCKET_MODES):
        record = records.get(mode.name)
        if record:
            lines.append(
                f"   {mode.label:44} {record['ops']:>9,} {record['cpu_us_per_op']:>10.2f}"
                f" {record['wall_us_per_op']:>11.2f}"
            )
    for name, label in (
        ("fanout-syscall-share", "= syscall share (encrypt+write − encrypt)"),
        ("fanout-sslstream-machinery", "= SSLStream machinery (send_all Lean − e+w)"),
        ("fanout-socketstream-extra", "= SocketStream's extra (SocketStream − Lean)"),
        ("fanout-send-saving", "= socket.send saves (e+w − e+send)"),
        ("fanout-fast_tls-checks", "= fast_tls's checks (fast_tls − e+send)"),
        ("fanout-fast_tls-saving", "= fast_tls saves (send_all Lean − fast_tls)"),
        ("fanout-flusher-saving", "= the Flusher saves (fast_tls − Flusher)"),
    ):
        if name in records:
            lines.append(f"   {label:44} {'':>9} {records[name]['cpu_us_per_op']:>10.2f}")
    lines.append("B. TLS handshake, CPU per handshake (memory BIOs)")
    lines.append(f"   {'':24} {'ops':>5} {'server ms':>10} {'client ms':>10}  version, cipher")
    for client_certs in ("none", "required"):
        record = records.get(f"handshake-{client_certs}")
        if record:
            lines.append(
                f"   client_certs={client_certs:11} {record['ops']:>5}"
                f" {record['server_cpu_ms']:>10.3f} {record['client_cpu_ms']:>10.3f}"
                f"  {record['tls_version']}, {record['cipher']}"
            )
    lines.append(f"C. trio wake-ups of {WAKE_TASKS} parked tasks, CPU per wake-up + step")
    for name, label in (
        ("wakeup-parkinglot", "ParkingLot.unpark_all + step"),
        ("wakeup-reschedule", "lowlevel.reschedule + step"),
    ):
        record = records.get(name)
        if record:
            lines.append(f"   {label:44} {record['ops']:>9,} {record['cpu_us_per_op']:>10.2f}")
    return lines


def _meaning(records: dict[str, dict[str, Any]], count: int) -> list[str]:
    lines = []
    lean = records.get("fanout-send_all-lean")
    floor = records.get("fanout-encrypt+write")
    if lean and floor:
        write = _us(lean)
        deliveries = PACED_RATE * count
        budget = 1e6 / deliveries
        target = _target("fanout-1000-paced", "server_cpu_us_per_delivery")
        lines.append(
            f"- One write per delivery costs at least {write:.1f} µs here (SSLStream.send_all;"
            f" {_us(floor):.1f} µs with no trio machinery at all, of which"
            f" {_us(records['fanout-encrypt']):.1f} µs are the wake-up and encryption)."
        )
        need, for_target = math.ceil(write / budget), math.ceil(write / target)
        lines.append(
            f"- At {PACED_RATE} msg/s x {count:,} receivers ({deliveries:,} deliveries/s) one core"
            f" can afford {budget:.1f} µs per delivery for everything → "
            + (
                f"coalescing needed: >= {need} messages per write, with nothing else to do"
                if need > 1
                else "one write per delivery fits, with nothing else to do"
            )
            + f" (>= {for_target} per write to meet the paced target of {target:g} µs per"
            " delivery)."
        )
    for_certs, without = records.get("handshake-required"), records.get("handshake-none")
    if for_certs and without:
        ms = float(for_certs["server_cpu_ms"])
        target = _target("connect-certs", "logins_per_s")
        left = 1e3 / target - ms
        lines.append(
            f"- Handshakes alone cap one core at {1e3 / ms:,.0f} logins/s with client certificates"
            f" ({1e3 / float(without['server_cpu_ms']):,.0f}/s without); at the target of"
            f" {target:g} logins/s that leaves "
            + (f"{left:.2f} ms per login for everything else." if left > 0 else "nothing else.")
        )
    lot, direct = records.get("wakeup-parkinglot"), records.get("wakeup-reschedule")
    if lot and direct:
        lines.append(
            f"- Waking a writer costs {_us(direct):.2f} µs a task with reschedule (what"
            f" Outbox does), {_us(lot):.2f} µs through a ParkingLot."
        )
    return lines


# --- the command line -----------------------------------------------------------------


def _raise_fd_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.micro",
        description=(
            "Per-operation CPU costs, in this process: a send to one of N TLS connections"
            " (layer by layer), a TLS handshake, a trio wake-up."
        ),
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="fewer rounds and handshakes: 50 each (default: 200 fan-out rounds, 300 others)",
    )
    parser.add_argument(
        "--connections",
        type=int,
        default=1000,
        metavar="N",
        help="TLS connections for the fan-out measurements (default: 1000)",
    )
    parser.add_argument("--drain", nargs=2, type=int, metavar=("PORT", "N"), help=argparse.SUPPRESS)
    return parser


def _other_run() -> str | None:
    """The pid of a ``python -m benchmarks`` run holding the machine-wide lock, if any.

    The lock is not taken: a short measurement need not wait, only warn.
    """
    try:
        with LOCK.open("a+") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                lock.seek(0)
                return lock.read().strip() or "?"
            fcntl.flock(lock, fcntl.LOCK_UN)
    except OSError:
        return None
    return None


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.drain:
        return drain(*args.drain)
    count: int = args.connections
    if count < 1:
        print("--connections must be at least 1", file=sys.stderr)
        return 2
    if _raise_fd_limit() < count + FD_MARGIN:
        print(f"--connections {count}: the open-file limit is too low", file=sys.stderr)
        return 2
    rounds, handshake_count, wake_rounds = QUICK if args.quick else FULL
    signal.signal(signal.SIGTERM, _stop_signal)
    started = time.monotonic()

    records: dict[str, dict[str, Any]] = {}

    def emit(record: dict[str, Any]) -> None:
        records[record["micro"]] = record
        print(json.dumps(record), flush=True)

    def derive(name: str, plus: str, minus: str) -> None:
        if plus in records and minus in records:
            emit(
                {
                    "micro": name,
                    "cpu_us_per_op": round(_us(records[plus]) - _us(records[minus]), 2),
                    "derived": f"{plus} - {minus}",
                }
            )

    status = 0
    # The prefix and pid file of python -m benchmarks: a directory left by a
    # run that was killed (SIGKILL) is removed by the next run of either.
    _remove_stale_directories()
    directory = Path(tempfile.mkdtemp(prefix=TEMP_PREFIX + "micro-"))
    try:
        (directory / "owner.pid").write_text(str(os.getpid()))
        _log(f"certificates in {directory}; {cpu_model()}, {os.cpu_count()} CPUs")
        holder = _other_run()
        if holder:
            _log(f"warning: a benchmark run (pid {holder}) is running; the figures will be noisy")
        busy = busy_neighbours()
        if busy:
            _log(f"warning: busy processes: {', '.join(busy)}; the figures may be noisy")
        certs.generate(directory, clients=["alice"])
        for kind, modes in ((LEAN, LEAN_MODES), (SOCKET, SOCKET_MODES)):
            for name, (cpu, wall) in fanout(directory, kind, modes, count, rounds).items():
                ops = count * rounds
                emit(
                    {
                        "micro": name,
                        "transport": kind,
                        "cpu_us_per_op": round(cpu / ops * 1e6, 2),
                        "wall_us_per_op": round(wall / ops * 1e6, 2),
                        "ops": ops,
                        "connections": count,
                        "rounds": rounds,
                        "frame_bytes": len(_frame()),
                    }
                )
        derive("fanout-syscall-share", "fanout-encrypt+write", "fanout-encrypt")
        derive("fanout-sslstream-machinery", "fanout-send_all-lean", "fanout-encrypt+write")
        derive("fanout-socketstream-extra", "fanout-send_all-socketstream", "fanout-send_all-lean")
        derive("fanout-send-saving", "fanout-encrypt+write", "fanout-encrypt+send")
        derive("fanout-fast_tls-checks", "fanout-fast_tls", "fanout-encrypt+send")
        derive("fanout-fast_tls-saving", "fanout-send_all-lean", "fanout-fast_tls")
        derive("fanout-flusher-saving", "fanout-fast_tls", "fanout-flusher")

        for mode in ("none", "required"):
            _log(f"B: {handshake_count} handshakes, client_certs={mode}...")
            emit(handshakes(directory, mode, handshake_count))

        for name, measure in (
            ("wakeup-parkinglot", _wake_parking_lots),
            ("wakeup-reschedule", _wake_reschedule),
        ):
            _log(f"C: {name}, {WAKE_TASKS} tasks, {wake_rounds} rounds...")
            ops = WAKE_TASKS * wake_rounds
            spent = _trio_run(measure, WAKE_TASKS, wake_rounds)
            emit(
                {
                    "micro": name,
                    "cpu_us_per_op": round(spent / ops * 1e6, 2),
                    "ops": ops,
                    "tasks": WAKE_TASKS,
                    "rounds": wake_rounds,
                }
            )
    except KeyboardInterrupt:
        print("interrupted; everything stopped", file=sys.stderr)
        status = 130
    except _Stop as exc:
        print(f"stopped ({exc}); everything stopped", file=sys.stderr)
        status = 1
    except FAILURES as exc:
        print(f"FAILED: {exc!r}", file=sys.stderr)
        status = 1
    finally:
        shutil.rmtree(directory, ignore_errors=True)

    if records:
        print()
        print("\n".join(_table(records, count, rounds)))
        meaning = _meaning(records, count)
        if meaning:
            print("\nWhat this means:")
            print("\n".join(meaning))
        print(f"\n{len(records)} figures in {time.monotonic() - started:.0f} s")
    return status


if __name__ == "__main__":
    raise SystemExit(main())
