"""Who is connected to this server, in which rooms, and telling others when that changes.

One :class:`~securechat.delivery.Peer` per logged-in connection (a user may
have several). :class:`Online` keeps each user's connections and each
room's local connections (which rooms a user belongs to is durable state:
:mod:`securechat.rooms`), sends a frame to everyone in a room, and
announces presence. A broadcast is encoded once by the caller, and every
recipient gets the same ``bytes`` object. Presence frames are not urgent
(see :meth:`~securechat.delivery.Outbox.put`): in a login storm this is what
keeps the O(N²) presence frames from costing a write each.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Literal

from .delivery import Peer
from .protocol import Presence, encode


class Online:
    """The local connections, by user and by room; and, in a cluster, who is connected
    to the other servers (``elsewhere``: users only, their connections are not here)."""

    def __init__(self, elsewhere: Iterable[str] = ()) -> None:
        self._users: dict[str, list[Peer]] = {}
        self._rooms: dict[str, dict[Peer, None]] = {}
        self.elsewhere: set[str] = set(elsewhere)

    def users(self) -> list[str]:
        """Everyone online, here or on another server."""
        return sorted(self._users.keys() | self.elsewhere)

    def is_online(self, username: str) -> bool:
        return username in self._users or username in self.elsewhere

    def is_here(self, username: str) -> bool:
        return username in self._users

    def here(self) -> list[str]:
        """The users connected to this server."""
        return list(self._users)

    def peers_of(self, username: str) -> Sequence[Peer]:
        """The user's connections (do not change the sequence)."""
        return self._users.get(username, ())

    def add(self, peer: Peer) -> bool:
        """Register a connection; True if it is its user's first."""
        peers = self._users.setdefault(peer.username, [])
        peers.append(peer)
        return len(peers) == 1

    def remove(self, peer: Peer) -> bool:
        """Forget a connection and take it out of every room; True if it was its user's last."""
        for peers in self._rooms.values():
            peers.pop(peer, None)
        user_peers = self._users.get(peer.username)
        if user_peers is None:
            return False
        if peer in user_peers:
            user_peers.remove(peer)
        if user_peers:
            return False
        del self._users[peer.username]
        return True

    def room_size(self, room: str) -> int:
        """How many connections here are in ``room``."""
        return len(self._rooms.get(room, ()))

    def enter(self, room: str, peer: Peer) -> None:
        self._rooms.setdefault(room, {})[peer] = None

    def leave(self, room: str, peer: Peer) -> None:
        peers = self._rooms.get(room)
        if peers is not None:
            peers.pop(peer, None)

    def broadcast(
        self,
        room: str,
        frame: bytes,
        *,
        skip_user: str | None = None,
        skip: Peer | None = None,
        urgent: bool = True,
    ) -> None:
        """Queue ``frame`` for every connection in ``room`` but the skipped ones."""
        # No copy needed: an overflowing put() only cancels that connection's
        # tasks; it leaves the room later, from its own task (logout).
        for peer in self._rooms.get(room, ()):
            if peer.username != skip_user and peer is not skip:
                peer.put(frame, urgent=urgent)

    def room_presence(self, room: str, username: str, state: Literal["joined", "left"]) -> None:
        """Tell the room's connections, other than ``username``'s own, that it joined or left."""
        frame = encode(Presence(room=room, username=username, state=state))
        self.broadcast(room, frame, skip_user=username, urgent=False)

    def announce(
        self, username: str, rooms: Iterable[str], state: Literal["online", "offline"]
    ) -> None:
        """One ``presence`` (without a room) to each connection that shares a room with
        ``username``, however many rooms it shares."""
        frame = encode(Presence(username=username, state=state))
        names = list(rooms)
        if len(names) == 1:  # the common case (the lobby only): no set of connections needed
            self.broadcast(names[0], frame, skip_user=username, urgent=False)
            return
        peers: dict[Peer, None] = {}
        for name in names:
            peers.update(self._rooms.get(name, {}))
        for peer in peers:
            if peer.username != username:
                peer.put(frame, urgent=False)
