"""Rooms as the chat remembers them: names, topics, who may join, who belongs.

This is durable room state only, the same on every node that shares a
store; which connections are in a room right now is
:mod:`securechat.online`'s business. :class:`Rooms` also keeps the answers
built from that state (the room list, each room's sorted member list)
until the state changes, and decides what the config file's rooms change,
without doing the notifications or writes that follow (the hub does).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

from .config import RoomSettings
from .protocol import LOBBY, ErrorCode, ProtocolError, RoomInfo
from .store import StoredRoom

# Why an admin cannot set a topic: the config file's [rooms.NAME] topic wins.
TOPIC_FROM_CONFIG = "the topic of this room is set in the config file"


@dataclass(eq=False)
class Room:
    name: str
    topic: str = ""
    allowed: frozenset[str] | None = None  # None: anyone may join
    topic_from_config: bool = False  # the config file sets the topic: the wire cannot
    members: set[str] = field(default_factory=set)  # usernames
    # Rooms' cache of the configured members, sorted, and the version it is for.
    sorted_members: tuple[int, list[str]] = (-1, [])

    def may_join(self, username: str) -> bool:
        return self.allowed is None or username in self.allowed


@dataclass(frozen=True)
class Configured:
    """What applying the config file did to one room (for the hub to tell and save)."""

    room: Room
    save: bool  # topic or access changed: the room must be saved
    topic_changed: bool
    removed: list[str]  # users taken off a private room's list: out of the room now


class Rooms:
    """Every room, its members, and the listings built from them."""

    def __init__(
        self,
        users: Iterable[str],
        stored: Mapping[str, StoredRoom],
        memberships: Mapping[str, Iterable[str]],
        *,
        allow_create: bool = True,
        max_rooms: int = 1000,
    ) -> None:
        self.users: set[str] = set(users)
        self.allow_create = allow_create
        self.max_rooms = max_rooms
        self._rooms: dict[str, Room] = {LOBBY: Room(LOBBY)}
        for name, room in stored.items():
            self._rooms[name] = Room(name, room.topic, room.allowed)
        for name, members in memberships.items():
            self._rooms.setdefault(name, Room(name)).members |= set(members)
        # Bumped by every change to rooms, members or users; answers built
        # from those (room lists, member lists) are cached until it moves.
        self._version = 0
        self._listing: tuple[int, list[tuple[Room, RoomInfo]]] = (-1, [])

    def __len__(self) -> int:
        return len(self._rooms)

    def __iter__(self) -> Iterator[Room]:
        return iter(list(self._rooms.values()))  # a copy: callers may create rooms meanwhile

    def get(self, name: str) -> Room | None:
        return self._rooms.get(name)

    def lobby(self) -> Room:
        return self._rooms[LOBBY]

    def of(self, username: str) -> list[str]:
        """The names of the rooms ``username`` belongs to, sorted."""
        return sorted(name for name, room in self._rooms.items() if username in room.members)

    def is_member(self, username: str, name: str) -> bool:
        room = self._rooms.get(name)
        return room is not None and username in room.members

    def size(self, name: str) -> int:
        room = self._rooms.get(name)
        return 0 if room is None else len(room.members)

    def visible(self, username: str, name: str) -> Room:
        """The room, if ``username`` may see it; else ``unknown_room`` or ``forbidden``."""
        room = self._rooms.get(name)
        if room is None:
            raise ProtocolError(ErrorCode.UNKNOWN_ROOM, f"no room {name!r}")
        if not room.may_join(username):
            raise ProtocolError(ErrorCode.FORBIDDEN, f"room {name!r} is private")
        return room

    # --- changes ---

    def set_users(self, users: Iterable[str]) -> None:
        self.users = set(users)
        self._version += 1

    def create(self, name: str) -> Room:
        """A new, empty room; ``unknown_room`` or ``forbidden`` when the server allows none."""
        if not self.allow_create:
            raise ProtocolError(ErrorCode.UNKNOWN_ROOM, f"no room {name!r}")
        if len(self._rooms) >= self.max_rooms:
            raise ProtocolError(ErrorCode.FORBIDDEN, "the server has too many rooms")
        room = self._rooms[name] = Room(name)
        self._version += 1
        return room

    def adopt(self, name: str, allowed: frozenset[str] | None = None) -> Room:
        """The room, created as another server sharing the store created it (no limits
        apply: it exists already)."""
        room = self._rooms.get(name)
        if room is None:
            room = self._rooms[name] = Room(name, allowed=allowed)
            self._version += 1
        return room

    def drop(self, room: Room) -> None:
        """Forget a room just created whose first write failed."""
        if self._rooms.get(room.name) is room and not room.members:
            del self._rooms[room.name]
            self._version += 1

    def add_member(self, room: Room, username: str) -> None:
        room.members.add(username)
        self._version += 1

    def remove_member(self, room: Room, username: str) -> None:
        room.members.discard(username)
        self._version += 1

    def set_topic(self, room: Room, topic: str) -> None:
        room.topic = topic
        self._version += 1

    def configure(self, settings: Mapping[str, RoomSettings]) -> list[Configured]:
        """Apply the config file's rooms (at start-up and on reload)."""
        self._version += 1
        for room in self._rooms.values():
            room.topic_from_config = False  # dropped from the file: admins may set it again
        changes = []
        for name, wanted in settings.items():
            room = self._rooms.setdefault(name, Room(name))
            topic = room.topic if wanted.topic is None else wanted.topic
            # Saved, so that a private room stays private even if it is later
            # dropped from the config file.
            save = (room.topic, room.allowed) != (topic, wanted.allowed)
            topic_changed = topic != room.topic
            room.topic, room.allowed = topic, wanted.allowed
            room.topic_from_config = wanted.topic is not None
            removed: list[str] = []
            if wanted.allowed is not None:
                removed = sorted(room.members - wanted.allowed)
                room.members -= set(removed)
            changes.append(Configured(room, save, topic_changed, removed))
        return changes

    # --- answers, cached ---

    def infos(self) -> list[tuple[Room, RoomInfo]]:
        """Every room with its listing entry, by name (cached: with a thousand rooms,
        building it costs milliseconds)."""
        version, infos = self._listing
        if version != self._version:
            infos = [
                (room, RoomInfo.model_construct(name=room.name, topic=room.topic, members=count))
                for room in sorted(self._rooms.values(), key=lambda room: room.name)
                for count in [sum(1 for user in room.members if user in self.users)]
            ]
            self._listing = (self._version, infos)
        return infos

    def members(self, room: Room) -> list[str]:
        """The room's members who are configured users, sorted (cached; do not change it).

        Memberships of accounts removed from the config stay stored, unlisted.
        """
        if room.sorted_members[0] != self._version:
            members = sorted(user for user in room.members if user in self.users)
            room.sorted_members = (self._version, members)
        return room.sorted_members[1]


def not_member(room: str) -> ProtocolError:
    return ProtocolError(ErrorCode.NOT_MEMBER, f"you are not in room {room!r}")
