"""Who is connected to this server, in which rooms, and telling others when that changes.

One :class:`~securechat.delivery.Peer` per logged-in connection (a user may
have several). :class:`Online` keeps each user's connections and each
room's local connections (which rooms a user belongs to is durable state:
:mod:`securechat.rooms`), sends a frame to everyone in a room, and
announces presence. A broadcast is encoded once by the caller, and every
recipient gets the same ``bytes`` object.

``online``/``offline`` presence is O(N²) frames when N users arrive at once.
Connections that asked for :data:`~securechat.protocol.PRESENCE_LISTS` get it
coalesced: the changes are held (the hub's presence clock,
:meth:`~securechat.hub.Hub.run_presence`, calls :meth:`Online.flush_presence`)
and then each such connection gets one ``presence`` per state naming every
user whose state changed, with the user's final state only. The held changes
go out before any frame broadcast to a room, any direct message the hub fans
out and any ``who`` answer, so a user's ``online`` still comes before its
messages and an answer is never overtaken by an older change. Other
connections get one frame per change, as before; those frames are not urgent
(see :meth:`~securechat.delivery.Outbox.put`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Literal

from .delivery import Peer
from .protocol import Presence, encode

OnlineState = Literal["online", "offline"]


class Online:
    """The local connections, by user and by room; and, in a cluster, who is connected
    to the other servers (``elsewhere``: users only, their connections are not here)."""

    def __init__(self, elsewhere: Iterable[str] = (), *, hold_presence: bool = False) -> None:
        """``hold_presence``: someone calls :meth:`flush_presence` periodically, so the
        changes for connections that take presence lists may be held until then
        (otherwise they go at once, still as lists)."""
        self._users: dict[str, list[Peer]] = {}
        self._rooms: dict[str, dict[Peer, None]] = {}
        self.elsewhere: set[str] = set(elsewhere)
        self.hold_presence = hold_presence
        # The connections that take presence lists, and how many do not.
        self._listers: set[Peer] = set()
        self._singles = 0
        # Held changes: user -> (latest state, every room it was announced to).
        self._held: dict[str, tuple[OnlineState, set[str]]] = {}

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

    def add(self, peer: Peer, *, presence_lists: bool = False) -> bool:
        """Register a connection; True if it is its user's first. ``presence_lists``:
        it takes several users' ``online``/``offline`` in one frame."""
        peers = self._users.setdefault(peer.username, [])
        peers.append(peer)
        if presence_lists:
            self._listers.add(peer)
        else:
            self._singles += 1
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
            if peer in self._listers:
                self._listers.discard(peer)
            else:
                self._singles -= 1
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
        if self._held:
            self.flush_presence()
        # No copy needed: an overflowing put() only cancels that connection's
        # tasks; it leaves the room later, from its own task (logout).
        peers = self._rooms.get(room, ())
        if skip_user is None and skip is None and urgent:  # a message: the hot path,
            # straight into each outbox (a call less per delivery)
            for peer in peers:
                peer.outbox.put(frame)
            return
        for peer in peers:
            if peer.username != skip_user and peer is not skip:
                peer.put(frame, urgent=urgent)

    def room_presence(self, room: str, username: str, state: Literal["joined", "left"]) -> None:
        """Tell the room's connections, other than ``username``'s own, that it joined or left."""
        frame = encode(Presence(room=room, username=username, state=state))
        self.broadcast(room, frame, skip_user=username, urgent=False)

    def announce(self, username: str, rooms: Iterable[str], state: OnlineState) -> None:
        """One ``presence`` (without a room) to each connection that shares a room with
        ``username``, however many rooms it shares; to those that take presence
        lists, in a list with the other changes held until :meth:`flush_presence`."""
        names = list(rooms)
        if self._listers:
            previous = self._held.get(username)
            self._held[username] = (state, previous[1].union(names) if previous else set(names))
            if not self.hold_presence:
                self.flush_presence()
        if not self._singles:
            return
        frame = encode(Presence(username=username, state=state))
        if len(names) == 1:  # the common case (the lobby only): no set of connections needed
            if not self._listers:
                self.broadcast(names[0], frame, skip_user=username, urgent=False)
                return
            peers: Iterable[Peer] = self._rooms.get(names[0], {})
        else:
            union: dict[Peer, None] = {}
            for name in names:
                union.update(self._rooms.get(name, {}))
            peers = union
        listers = self._listers
        for peer in peers:
            if peer.username != username and peer not in listers:
                peer.put(frame, urgent=False)

    def flush_presence(self) -> bool:
        """Send the held ``online``/``offline`` changes to the connections that take lists:
        to each, at most one frame per state, naming the users (other than its own)
        it shares a room with, each with its latest state. False if none were held."""
        if not self._held:
            return False
        held, self._held = self._held, {}
        # Users announced to the same rooms have the same audience: one pass over
        # each audience's connections, not one per user.
        audiences: dict[frozenset[str], list[tuple[str, OnlineState]]] = {}
        for user, (state, rooms) in held.items():
            audiences.setdefault(frozenset(rooms), []).append((user, state))
        groups = list(audiences.values())
        reach: dict[Peer, list[int]] = {}
        listers = self._listers
        for index, audience in enumerate(audiences):
            for name in audience:
                for peer in self._rooms.get(name, ()):
                    if peer in listers:
                        got = reach.setdefault(peer, [])
                        if not got or got[-1] != index:  # once, however many rooms it shares
                            got.append(index)
        # Connections that share the same audiences get the same bytes, except where
        # their own user is among the changes (never told about themselves).
        frames: dict[tuple[tuple[int, ...], str | None], list[bytes]] = {}
        users_of = [{user for user, _ in group} for group in groups]
        for peer, indexes in reach.items():
            own = peer.username
            mine = own if any(own in users_of[index] for index in indexes) else None
            key = (tuple(indexes), mine)
            batch = frames.get(key)
            if batch is None:
                changes = [change for index in indexes for change in groups[index]]
                batch = frames[key] = _presence_lists(changes, skip=mine)
            for frame in batch:
                peer.put(frame)
        return True


def _presence_lists(changes: list[tuple[str, OnlineState]], *, skip: str | None) -> list[bytes]:
    """The frames telling ``changes`` (one per state, names sorted), leaving out ``skip``."""
    frames = []
    states: tuple[OnlineState, ...] = ("online", "offline")
    for state in states:
        users = sorted(user for user, now in changes if now == state and user != skip)
        if users:
            frames.append(encode(Presence(users=users, state=state)))
    return frames
