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
of the bytes, this task takes the inner send lock before it yields and sends
the rest through the transport under it, as ``SSLStream`` does, so records
from a concurrent reader (a KeyUpdate answer) or a later write queue behind
it in order. Reads, the handshake, KeyUpdate and ``aclose`` stay trio's.

The fast path is not a scheduling point (it is a cancellation point): a
caller that loops on it must yield elsewhere, as the write loop does when it
waits for frames.

It reads trio internals (``SSLStream._state``, ``_handshook``,
``_inner_send_lock``, ``_outgoing``, ``_delayed_outgoing``,
``_outer_send_conflict_detector._held``, ``_ssl_object``, ``trio._ssl._State``
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


async def send_all(stream: trio.SSLStream[Any], data: bytes | bytearray | memoryview) -> None:
    """``stream.send_all(data)``, by the short path when that is safe (module docstring)."""
    transport = stream.transport_stream
    s: Any = stream  # trio internals below: checked by _probe at import
    if (
        not AVAILABLE
        or type(transport) is not LeanSocketStream
        or transport.raw_socket is None
        or not data
        or s._state is not _OK
        or not s._handshook.done
        or s._inner_send_lock.locked()
        or s._outgoing.pending
        or s._delayed_outgoing is not None
        or s._outer_send_conflict_detector._held
    ):
        await stream.send_all(data)
        return
    # SSLStream's retry loop starts with the same check: a cancelled caller leaves
    # the stream untouched.
    await trio.lowlevel.checkpoint_if_cancelled()
    try:
        s._ssl_object.write(data)
    except ssl.SSLWantReadError:
        # Not seen with TLS 1.3; SSLStream retries the same write after a read, and
        # sends what this attempt queued in the BIO first.
        await stream.send_all(data)
        return
    except (ssl.SSLError, ssl.CertificateError) as exc:
        s._state = _BROKEN
        raise trio.BrokenResourceError from exc
    records: bytes = s._outgoing.read()
    try:
        sent = transport.send_nowait(records)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        s._state = _BROKEN
        raise
    if sent == len(records):
        return
    # The kernel took only part. Take the inner send lock before yielding (it is
    # free: nothing since the check above could yield), so anything encrypted
    # after this (a later write, a KeyUpdate answer) queues behind the rest.
    with s._outer_send_conflict_detector:
        lock: trio.StrictFIFOLock = s._inner_send_lock
        lock.acquire_nowait()
        try:
            await transport.send_all(memoryview(records)[sent:])
        except BaseException:
            # Cancelled or broken halfway through a record: as SSLStream does.
            s._state = _BROKEN
            raise
        finally:
            lock.release()
