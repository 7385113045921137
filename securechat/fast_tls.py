"""The short write path on a server connection's ``trio.SSLStream``.

``SSLStream.send_all`` costs far more than the work it does: a lock that
always yields, two conflict detectors, the retry loop, then the transport's
write (docs/performance.md, "Where the time goes"). In the steady state of a
connection none of that machinery has anything to do. :func:`send_all` then
encrypts with the stream's own ``SSLObject``, takes the record(s) from its
outgoing BIO and hands them to the kernel with ``socket.send``, without a
scheduling point. It does so only when that is provably what the stock path
would have done:

- the handshake is done and the stream is neither broken nor closed;
- no other operation is sending on it: trio's inner send lock is free (a
  task that drained the outgoing BIO holds it until those bytes are written,
  so a free lock means no drained bytes are waiting), the outgoing BIO is
  empty, there are no delayed TLS 1.3 session-ticket bytes, and the outer
  send conflict detector is not held;
- the transport is a :class:`~securechat.transport.LeanSocketStream` whose
  standard-library socket could be found.

Everything else goes to ``stream.send_all``. When the kernel takes only part
of the bytes, the rest becomes the stream's ``_delayed_outgoing``: the bytes
trio itself holds back (for TLS 1.3 session tickets) and puts in front of
whatever it sends next, under its inner send lock. So records that a
concurrent read encrypts (a KeyUpdate answer), a later write, or ``aclose``'s
close_notify queue behind the rest in order, and :func:`flush` sends it
under that lock. It must not go back to the outgoing BIO: a read empties
that BIO and sends what it finds, so a reading task would then wait on a
peer that does not read, and stop reading (the peer, writing, would wait
for it in turn). Reads, the handshake, KeyUpdate and ``aclose`` stay
trio's.

:func:`write_now` is the synchronous core, for a caller that writes for
many connections in one task (:class:`DirectWriter`, used by
:class:`securechat.delivery.Flusher`); :func:`send_all` is the awaitable
form.

The fast path is not a scheduling point (it is a cancellation point): a
caller that loops on it must yield elsewhere, as the write loop does when it
waits for frames.

It reads trio internals (``SSLStream._state``, ``_handshook``,
``_inner_send_lock``, ``_outgoing``, ``_delayed_outgoing``,
``_outer_send_conflict_detector._held``, ``_ssl_object``, ``_check_status``,
``trio._ssl._State``
and the trio socket's ``_sock``), as written in trio 0.35.0. pyproject.toml
pins trio to the tested range; :data:`UNAVAILABLE` says (once, at import)
when the installed trio lacks one of them, and then every write takes the
stock path.
"""

from __future__ import annotations

import ssl
from typing import Any, cast

import trio

from .transport import LeanSocketStream

# The trio versions this was read against and tested with (pyproject.toml pins the same).
TESTED_TRIO = "0.35.0"


def _probe() -> tuple[Any, Any, str | None]:
    """trio's ``_State.OK`` and ``_State.BROKEN``, and why the fast path cannot be used
    (None when it can), from a fresh ``SSLStream`` that never touches the network."""
    try:
        from trio._ssl import _State  # an internal: imported where its absence is caught

        ok, broken = _State.OK, _State.BROKEN
    except (ImportError, AttributeError) as exc:
        return None, None, f"trio._ssl._State: {exc}"
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    # SSLStream's constructor does not touch its transport; this one never does I/O.
    stream: Any = trio.SSLStream(cast(Any, None), context, server_side=True)
    checks: dict[str, bool] = {}
    try:
        checks = {
            "_state": stream._state is ok,
            "_handshook.done": stream._handshook.done is False,
            "_inner_send_lock": isinstance(stream._inner_send_lock, trio.StrictFIFOLock),
            "_outgoing": isinstance(stream._outgoing, ssl.MemoryBIO),
            "_delayed_outgoing": stream._delayed_outgoing is None,
            "_outer_send_conflict_detector": stream._outer_send_conflict_detector._held is False,
            "_ssl_object": isinstance(stream._ssl_object, ssl.SSLObject),
            "_check_status": callable(stream._check_status),
        }
    except AttributeError as exc:
        return ok, broken, f"trio.SSLStream: {exc}"
    missing = [name for name, good in checks.items() if not good]
    if missing:
        return ok, broken, "trio.SSLStream changed: " + ", ".join(missing)
    return ok, broken, None


def _probe_safely() -> tuple[Any, Any, str | None]:
    try:
        return _probe()
    except Exception as exc:  # any surprise in trio's internals means: stock path
        return None, None, f"probe failed: {exc!r}"


_OK, _BROKEN, UNAVAILABLE = _probe_safely()
# Whether :func:`send_all` can ever take the short path with this trio.
AVAILABLE = UNAVAILABLE is None


def ready(stream: trio.SSLStream[Any]) -> bool:
    """Whether a write to ``stream`` may take the short path now (module docstring)."""
    transport = stream.transport_stream
    s: Any = stream  # trio internals below: checked by _probe at import
    return (
        AVAILABLE
        and type(transport) is LeanSocketStream
        and transport.raw_socket is not None
        and s._state is _OK
        and s._handshook.done
        and not s._inner_send_lock.locked()
        and not s._outgoing.pending
        and s._delayed_outgoing is None
        and not s._outer_send_conflict_detector._held
    )


class WantRead(Exception):
    """OpenSSL wants to read before it can write (not seen with TLS 1.3): the same data
    must be written again by the stock path, which does that read."""


def write_now(stream: trio.SSLStream[Any], data: bytes | bytearray | memoryview) -> bool:
    """Encrypt ``data`` and hand the records to the kernel, without waiting; only when
    :func:`ready` says so. True when the kernel took everything; False when it took only
    part: the rest waits in the stream's ``_delayed_outgoing`` (module docstring), where
    the next send on the stream (or :func:`flush`) sends it first, under trio's inner
    send lock.

    Raises :class:`WantRead` (nothing written; send ``data`` by the stock path), and
    ``trio.BrokenResourceError`` or ``trio.ClosedResourceError`` (the stream is broken
    from then on, as SSLStream does).
    """
    s: Any = stream
    try:
        s._ssl_object.write(data)
    except ssl.SSLWantReadError:
        raise WantRead from None
    except (ssl.SSLError, ssl.CertificateError) as exc:
        s._state = _BROKEN
        raise trio.BrokenResourceError from exc
    records: bytes = s._outgoing.read()
    transport: LeanSocketStream = stream.transport_stream
    try:
        sent = transport.send_nowait(records)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        s._state = _BROKEN
        raise
    if sent == len(records):
        return True
    # Nothing was delayed (ready()), and nothing has run since the records were read.
    s._delayed_outgoing = records[sent:]
    return False


async def flush(stream: trio.SSLStream[Any]) -> None:
    """Send what :func:`write_now` left (the stream's ``_delayed_outgoing``), under
    trio's inner send lock as SSLStream sends its records (so a KeyUpdate answer that a
    read encrypts meanwhile queues behind it; if a read had something to send first, it
    sent the rest in front of it, and nothing is left here). Raises what ``send_all``
    would on a broken or closed stream; cancelled while bytes are half sent, the stream
    is broken, as with SSLStream (python-trio/trio#198)."""
    s: Any = stream
    with s._outer_send_conflict_detector:
        s._check_status()
        lock: trio.StrictFIFOLock = s._inner_send_lock
        if lock.locked():
            await lock.acquire()
        else:
            # Taken at once, so nothing that is encrypted after this call started can
            # reach the socket before the rest.
            lock.acquire_nowait()
        try:
            records: bytes | None = s._delayed_outgoing
            s._delayed_outgoing = None
            if records:
                try:
                    await stream.transport_stream.send_all(records)
                except BaseException:
                    s._state = _BROKEN
                    raise
        finally:
            lock.release()


async def send_all(stream: trio.SSLStream[Any], data: bytes | bytearray | memoryview) -> None:
    """``stream.send_all(data)``, by the short path when that is safe (module docstring)."""
    if not data or not ready(stream):
        await stream.send_all(data)
        return
    # SSLStream's retry loop starts with the same check: a cancelled caller leaves
    # the stream untouched.
    await trio.lowlevel.checkpoint_if_cancelled()
    try:
        if write_now(stream, data):
            return
    except WantRead:
        await stream.send_all(data)
        return
    await flush(stream)


class DirectWriter:
    """Writes to one connection's ``SSLStream`` without waiting, for the server's
    :class:`~securechat.delivery.Flusher` (it implements
    :class:`~securechat.delivery.DirectWrite`); :meth:`finish` completes, in the
    connection's writer task, a write that could not be done at once."""

    def __init__(self, stream: trio.SSLStream[Any]) -> None:
        self._stream = stream
        # What finish() must do: None, flush the stream's buffer; else write these again.
        self._again: bytes | None = None
        self._broke: Exception | None = None

    def ready(self) -> bool:
        return ready(self._stream)

    def write(self, data: bytes) -> bool:
        try:
            if write_now(self._stream, data):
                return True
        except WantRead:
            self._again = data
            return False
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self._broke = exc  # for finish() to raise in the writer task
        except Exception as exc:
            # Not expected; still the connection's problem, not the flusher's (which
            # writes for every connection): the stream is given up, and the writer task
            # raises it where the server guards each connection.
            cast(Any, self._stream)._state = _BROKEN
            self._broke = exc
        self._again = None
        return False

    async def finish(self) -> None:
        again, self._again = self._again, None
        broke, self._broke = self._broke, None
        if broke is not None:
            await trio.lowlevel.checkpoint()
            raise broke
        if again is None:
            await flush(self._stream)
        else:
            await send_all(self._stream, again)
