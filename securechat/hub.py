"""Who is connected, which rooms they are in, and fan-out of messages.

The hub does no network I/O: it puts encoded frames into each member's
:class:`Outbox`, and each connection's writer task drains its own outbox.
A broadcast is validated and encoded once; every recipient gets the same
``bytes`` object, so a slow recipient costs memory up to its outbox's cap
and nothing else.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import trio

from .protocol import LOBBY, ErrorCode, Message, ProtocolError, encode, utc_timestamp


class Outbox:
    """A bounded queue of encoded frames for one connection.

    ``put`` never blocks. When a frame would take the queue past
    ``max_frames`` or ``max_bytes``, the queue is dropped, closed, and
    ``on_overflow`` is called: that connection is too slow to keep, and the
    caller must disconnect it. ``get_batch`` returns everything queued as
    one ``bytes`` so the writer makes one ``send_all`` per wake-up.
    """

    def __init__(self, max_frames: int, max_bytes: int, on_overflow: Callable[[], None]) -> None:
        self._frames: deque[bytes] = deque()
        self._bytes = 0
        self._max_frames = max_frames
        self._max_bytes = max_bytes
        self._on_overflow = on_overflow
        self._waiters = trio.lowlevel.ParkingLot()
        self.closed = False
        self.overflowed = False

    def __len__(self) -> int:
        return len(self._frames)

    def put(self, frame: bytes) -> None:
        if self.closed:
            return
        if len(self._frames) >= self._max_frames or self._bytes + len(frame) > self._max_bytes:
            self.overflowed = True
            self._frames.clear()
            self._bytes = 0
            self.close()
            self._on_overflow()
            return
        self._frames.append(frame)
        self._bytes += len(frame)
        if self._waiters:
            self._waiters.unpark_all()

    def close(self) -> None:
        """No more frames will be accepted; ``get_batch`` drains what is left, then returns None."""
        self.closed = True
        self._waiters.unpark_all()

    async def get_batch(self) -> bytes | None:
        while not self._frames:
            if self.closed:
                return None
            await self._waiters.park()
        if len(self._frames) == 1:
            batch = self._frames.popleft()
        else:
            batch = b"".join(self._frames)
            self._frames.clear()
        self._bytes = 0
        return batch


@dataclass(eq=False)
class Member:
    """One logged-in connection, as the hub sees it."""

    username: str
    outbox: Outbox


class Hub:
    """Rooms and their members; assigns message ids and fans messages out.

    In this version every user is in ``lobby`` and nothing else; a later
    version adds room membership and durable history behind the same calls.
    """

    def __init__(self) -> None:
        self._rooms: dict[str, dict[Member, None]] = {LOBBY: {}}
        self._last_id = 0

    def attach(self, member: Member) -> list[str]:
        """Add a logged-in connection; returns the rooms it is in."""
        self._rooms[LOBBY][member] = None
        return [LOBBY]

    def detach(self, member: Member) -> None:
        for members in self._rooms.values():
            members.pop(member, None)

    def members(self) -> Iterator[Member]:
        """Every attached connection, once."""
        seen: set[Member] = set()
        for members in self._rooms.values():
            for member in members:
                if member not in seen:
                    seen.add(member)
                    yield member

    def publish(self, sender: Member, room: str, text: str) -> Message:
        """Deliver ``text`` from ``sender`` to everyone in ``room``; raises ``not_member``."""
        members = self._rooms.get(room)
        if members is None or sender not in members:
            raise ProtocolError(ErrorCode.NOT_MEMBER, f"you are not in room {room!r}")
        self._last_id += 1
        message = Message(
            id=self._last_id, room=room, sender=sender.username, text=text, ts=utc_timestamp()
        )
        frame = encode(message)
        # list(): a put() that overflows disconnects, and detach mutates the dict.
        for member in list(members):
            member.outbox.put(frame)
        return message
