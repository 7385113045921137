"""Rooms, topics, direct messages, presence and fan-out: the chat itself.

The hub knows who is connected (one :class:`Peer` per logged-in
connection; a user may have several), which rooms exist and who belongs to
them, and what each request means. It does no network I/O: replies and
deliveries are encoded frames put into each member's :class:`Outbox`, which
that connection's writer task drains. A broadcast is encoded once and every
recipient gets the same ``bytes`` object.

Messages are durable: ``say`` and ``dm`` hand the message to the
:class:`~securechat.store.Store` (``commit_then``) and return at once; the
fan-out and the ``ack`` happen in the callback that runs after the commit,
so nothing is delivered or acknowledged before it is on disk, and a sender
can pipeline many messages.
A re-sent client ``id`` (within a window per user) gets the original
``ack`` again instead of a second message.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Literal

import trio

from .config import RoomSettings
from .delivery import Peer
from .protocol import (
    LOBBY,
    SERVER_USER,
    Ack,
    Error,
    ErrorCode,
    HistoryEnd,
    Joined,
    Kicked,
    Left,
    Members,
    Message,
    Presence,
    ProtocolError,
    RoomInfo,
    RoomList,
    RoomTopic,
    UtcClock,
    encode,
    utc_timestamp,
)
from .store import (
    AddMember,
    AppendMessage,
    HistoryScope,
    MarkDelivered,
    PeerScope,
    RemoveMember,
    RoomScope,
    SaveRoom,
    Snapshot,
    Store,
    StoreError,
    VisibleScope,
)

log = logging.getLogger(__name__)

# Idempotent sends: a client id is remembered while it is among the user's
# last RECENT_IDS ids or younger than RECENT_SECONDS, up to RECENT_IDS_MAX.
RECENT_IDS = 1000
RECENT_SECONDS = 600.0
RECENT_IDS_MAX = 20_000
# Bulk replies (history, stored direct messages) read at most READ_ROWS
# messages, and not much more than READ_CHARS characters of text, from the
# database at a time, and wait whenever the connection's queue is more than
# half full. Stored direct messages are marked delivered one read at a time.
READ_ROWS = 16
READ_CHARS = 16 * 1024
# Why an admin cannot set a topic: the config file's [rooms.NAME] topic wins.
TOPIC_FROM_CONFIG = "the topic of this room is set in the config file"


@dataclass(eq=False)
class Room:
    name: str
    topic: str = ""
    allowed: frozenset[str] | None = None
    topic_from_config: bool = False  # the config file sets the topic: the wire cannot
    members: set[str] = field(default_factory=set)  # usernames, persistent
    connections: dict[Peer, None] = field(default_factory=dict)  # members' online connections
    # The hub's cache of the configured members, sorted, and the hub version it is for.
    sorted_members: tuple[int, list[str]] = (-1, [])

    def may_join(self, username: str) -> bool:
        return self.allowed is None or username in self.allowed

    def broadcast(
        self,
        frame: bytes,
        *,
        skip_user: str | None = None,
        skip: Peer | None = None,
        urgent: bool = True,
    ) -> None:
        # No copy needed: an overflowing put() only cancels that connection's
        # tasks; it leaves the room later, from its own task (logout).
        for member in self.connections:
            if member.username != skip_user and member is not skip:
                member.put(frame, urgent=urgent)

    def presence(self, username: str, state: Literal["joined", "left"]) -> None:
        """Tell the room's connections, other than ``username``'s own, that it joined or left.

        Not urgent (see :meth:`Outbox.put`): in a login storm this is what
        keeps the O(N²) presence frames from costing a write each.
        """
        frame = encode(Presence(room=self.name, username=username, state=state))
        self.broadcast(frame, skip_user=username, urgent=False)


class RecentIds:
    """One user's recently used client ids and the message ids they became."""

    def __init__(self) -> None:
        self._ids: OrderedDict[str, tuple[int, float]] = OrderedDict()

    def get(self, client_id: str) -> int | None:
        entry = self._ids.get(client_id)
        return None if entry is None else entry[0]

    def add(self, client_id: str, message_id: int, when: float) -> None:
        self._ids[client_id] = (message_id, when)
        self._ids.move_to_end(client_id)
        horizon = when - RECENT_SECONDS
        while len(self._ids) > RECENT_IDS_MAX or (
            len(self._ids) > RECENT_IDS and next(iter(self._ids.values()))[1] < horizon
        ):
            self._ids.popitem(last=False)


Reply = Callable[[Ack | Error], None]


async def load_state(store: Store) -> Snapshot:
    """The stored state a :class:`Hub` starts from (read without blocking the event loop),
    with the client ids the hub keeps for idempotent re-sends."""
    since = utc_timestamp(datetime.now(UTC) - timedelta(seconds=RECENT_SECONDS))
    return await store.load(recent_per_user=RECENT_IDS, recent_since=since)


class Hub:
    """The chat's state and rules, on top of a :class:`Store`, starting from its
    :class:`Snapshot` (see :func:`load_state`)."""

    def __init__(
        self,
        store: Store,
        state: Snapshot,
        *,
        users: Iterable[str],
        rooms: Mapping[str, RoomSettings],
        allow_room_create: bool = True,
        max_rooms: int = 1000,
    ) -> None:
        self.store = store
        self.allow_room_create = allow_room_create
        self.max_rooms = max_rooms
        self.users: set[str] = set(users)
        self._online: dict[str, list[Peer]] = {}
        # Bumped by every change to rooms, members or users; answers built
        # from those (room lists, member lists) are cached until it moves.
        self._version = 0
        self._listing: tuple[int, list[tuple[Room, RoomInfo]]] = (-1, [])
        self._rooms: dict[str, Room] = {LOBBY: Room(LOBBY)}
        for name, stored in state.rooms.items():
            self._rooms[name] = Room(name, stored.topic, stored.allowed)
        for name, members in state.memberships.items():
            self._rooms.setdefault(name, Room(name)).members |= members
        self.configure_rooms(rooms)
        self._last_id = state.last_message_id
        self._clock = UtcClock()
        self._recent: dict[str, RecentIds] = {}
        # (user, client id) of messages waiting for their commit, and the
        # replies owed to re-sends that arrived meanwhile.
        self._pending: dict[tuple[str, str], list[Reply]] = {}
        self._handing_over: set[int] = set()
        # Users with stored direct messages: a login of anyone else needs no query.
        self._waiting_for: set[str] = set(state.undelivered_to)
        self.shutting_down = False  # no presence updates while everyone is being let go
        for sent in state.recent_sends:
            self._remember(sent.sender, sent.client_id, sent.message_id, _epoch(sent.ts))

    # --- configuration ---

    def reconfigure(self, users: Iterable[str], rooms: Mapping[str, RoomSettings]) -> None:
        """Apply a reloaded config file's users and rooms.

        Connections of users no longer configured are let go; so are users
        taken off a private room's list (out of that room at once).
        """
        self.users = set(users)
        self._version += 1
        self.configure_rooms(rooms)
        for username in sorted(set(self._online) - self.users):
            self.disconnect_user(
                username, Error(code=ErrorCode.KICKED, message="your account was removed")
            )

    def begin_shutdown(self) -> None:
        """Everyone is about to be let go: no presence updates from now on."""
        self.shutting_down = True

    def set_admin(self, username: str, admin: bool) -> None:
        """A changed admin flag applies to the user's open connections at once."""
        for connection in self._online.get(username, ()):
            connection.admin = admin

    def configure_rooms(self, rooms: Mapping[str, RoomSettings]) -> None:
        """Apply the config file's rooms (at start-up and on reload)."""
        self._version += 1
        for room in self._rooms.values():
            room.topic_from_config = False  # dropped from the file: admins may set it again
        for name, settings in rooms.items():
            room = self._rooms.setdefault(name, Room(name))
            topic = room.topic if settings.topic is None else settings.topic
            if (room.topic, room.allowed) != (topic, settings.allowed):
                # Saved, so that a private room stays private even if it is
                # later dropped from the config file. A topic the file does
                # not set is left as stored (an admin's change may be in flight).
                self._spawn_persist(SaveRoom(name, settings.topic, settings.allowed))
            if topic != room.topic:
                room.broadcast(encode(RoomTopic(room=name, topic=topic, by=SERVER_USER)))
            room.topic, room.allowed = topic, settings.allowed
            room.topic_from_config = settings.topic is not None
            if settings.allowed is not None:
                # Taken off a private room's list: out of the room at once.
                for user in sorted(room.members - settings.allowed):
                    room.members.discard(user)
                    for connection in self._online.get(user, ()):
                        room.connections.pop(connection, None)
                        connection.send(Left(room=name))
                    room.presence(user, "left")
                    self._spawn_persist(RemoveMember(name, user))

    def online_users(self) -> list[str]:
        return sorted(self._online)

    def rooms_of(self, username: str) -> list[str]:
        return sorted(name for name, room in self._rooms.items() if username in room.members)

    # --- connections ---

    async def login(self, member: Peer) -> list[str]:
        """Attach a logged-in connection; returns the user's rooms (the lobby always among them).

        Refuses (auth_failed) a user who is no longer configured. The connection is
        registered before anything is awaited, so a reload from then on sees it.
        """
        user = member.username
        if user not in self.users:
            raise ProtocolError(ErrorCode.AUTH_FAILED, "invalid username, password or certificate")
        lobby = self._rooms[LOBBY]
        connections = self._online.setdefault(user, [])
        connections.append(member)
        if user not in lobby.members:
            lobby.members.add(user)
            self._version += 1
            for connection in connections:  # the user's other devices are back in too
                if connection is not member:
                    lobby.connections[connection] = None
                    connection.send(
                        Joined(room=LOBBY, topic=lobby.topic, members=self._members(lobby))
                    )
            await self._persist(AddMember(LOBBY, user))
        rooms = self.rooms_of(user)
        for name in rooms:
            self._rooms[name].connections[member] = None
        if len(connections) == 1:
            self._announce_presence(user, rooms, "online")
        return rooms

    def logout(self, member: Peer) -> None:
        user = member.username
        connections = self._online.get(user, [])
        if member in connections:
            connections.remove(member)
        for room in self._rooms.values():
            room.connections.pop(member, None)
        if not connections and user in self._online:
            del self._online[user]
            if not self.shutting_down:
                self._announce_presence(user, self.rooms_of(user), "offline")

    async def deliver_stored(self, member: Peer) -> None:
        """Send ``member`` the direct messages that arrived while its user was offline.

        Read a few at a time and paced by the connection: a long backlog
        never overflows its queue, nor is it held in memory at once. Each
        read's messages are claimed, queued, then marked delivered; if the
        connection closes meanwhile they are not marked, and come again at
        the next login.
        """
        user = member.username
        if user not in self._waiting_for:
            return
        # Direct messages with later ids were sent while the user was online:
        # their commit hands them over (or keeps them for the next login).
        through = self._last_id
        after = 0
        while not member.closed:
            try:
                chunk = await self.store.undelivered(
                    user, after, READ_ROWS, through=through, max_chars=READ_CHARS
                )
            except StoreError as exc:
                log.error("cannot read stored direct messages user=%s: %s", user, exc)
                return
            if not chunk:
                self._waiting_for.discard(user)
                return
            after = chunk[-1].id
            fresh = [message for message in chunk if message.id not in self._handing_over]
            ids = self._claim(fresh)
            handed_over = False
            try:
                for message in fresh:
                    member.put(encode(message))
                    await member.wait_for_room()
                handed_over = not member.closed
            finally:
                if not handed_over:  # closed or cancelled: they come again at the next login
                    self._handing_over.difference_update(ids)
            if not handed_over:
                return
            self._mark_delivered(ids)

    def _deliver_direct(self, user: str, message: Message, frame: bytes) -> bool:
        """Hand a just-committed direct message to every connection of ``user``; False
        when ``user`` has none (it waits for their next login)."""
        connections = self._online.get(user)
        if not connections:
            self._waiting_for.add(user)  # stored, for the next login
            return False
        if message.id in self._handing_over:
            return True  # a login is handing it over
        for connection in connections:
            connection.put(frame)
        self._mark_delivered(self._claim([message]))
        return True

    # Direct messages reach their recipient on two paths, the commit of a new
    # one and the backlog at login; ``_handing_over`` holds the ids one path
    # has claimed and whose "delivered" mark is not committed yet, so that the
    # other path never repeats them.

    def _claim(self, messages: list[Message]) -> tuple[int, ...]:
        ids = tuple(message.id for message in messages)
        self._handing_over.update(ids)
        return ids

    def _mark_delivered(self, ids: tuple[int, ...]) -> None:
        if not ids:
            return

        def marked(error: BaseException | None) -> None:
            self._handing_over.difference_update(ids)
            if error is not None:
                log.error("could not mark direct messages delivered: %s", error)

        try:
            self.store.commit_then_nowait(MarkDelivered(ids), marked)
        except trio.WouldBlock:
            marked(None)  # they stay undelivered and come again at the next login

    def _announce_presence(
        self, user: str, rooms: list[str], state: Literal["online", "offline"]
    ) -> None:
        """One ``presence`` (without a room) to each connection that shares a room with
        ``user``, however many rooms it shares; encoded once, not urgent."""
        frame = encode(Presence(username=user, state=state))
        if len(rooms) == 1:  # the common case (the lobby only): no set of connections needed
            self._rooms[rooms[0]].broadcast(frame, skip_user=user, urgent=False)
            return
        connections: dict[Peer, None] = {}
        for name in rooms:
            connections.update(self._rooms[name].connections)
        for connection in connections:
            if connection.username != user:
                connection.put(frame, urgent=False)

    def connections_of(self, username: str) -> list[Peer]:
        return list(self._online.get(username, ()))

    # --- rooms ---

    async def join(self, member: Peer, name: str, ref: str | None) -> None:
        user = member.username
        room = self._rooms.get(name)
        created = room is None
        if room is None:
            if not self.allow_room_create:
                raise ProtocolError(ErrorCode.UNKNOWN_ROOM, f"no room {name!r}")
            if len(self._rooms) >= self.max_rooms:
                raise ProtocolError(ErrorCode.FORBIDDEN, "the server has too many rooms")
            room = self._rooms[name] = Room(name)
            self._version += 1
            writes: tuple[SaveRoom | AddMember, ...] = (SaveRoom(name, ""), AddMember(name, user))
        elif not room.may_join(user):
            raise ProtocolError(ErrorCode.FORBIDDEN, f"room {name!r} is private")
        else:
            writes = () if user in room.members else (AddMember(name, user),)
        if writes:
            try:
                await self.store.commit(*writes)
            except Exception:
                log.exception("cannot save membership user=%s room=%s", user, name)
                if created and not room.members:
                    del self._rooms[name]
                    self._version += 1
                raise ProtocolError(
                    ErrorCode.UNAVAILABLE, "cannot save that now; try again"
                ) from None
            if member.closed or not room.may_join(user) or self._rooms.get(name) is not room:
                # A reload while the write was in flight took the right away.
                self._spawn_persist(RemoveMember(name, user))
                raise ProtocolError(ErrorCode.FORBIDDEN, f"room {name!r} is private")
            room.members.add(user)
            self._version += 1
            room.presence(user, "joined")
        for connection in self._online.get(user, ()):
            room.connections[connection] = None
            reply = Joined(
                room=name,
                topic=room.topic,
                members=self._members(room),
                ref=ref if connection is member else None,
            )
            connection.send(reply)

    async def leave(self, member: Peer, name: str, ref: str | None) -> None:
        user = member.username
        room = self._rooms.get(name)
        if room is None or user not in room.members:
            raise ProtocolError(ErrorCode.NOT_MEMBER, f"you are not in room {name!r}")
        room.members.discard(user)
        self._version += 1
        for connection in self._online.get(user, ()):
            room.connections.pop(connection, None)
            connection.send(Left(room=name, ref=ref if connection is member else None))
        room.presence(user, "left")
        await self._persist(RemoveMember(name, user))

    def who(self, member: Peer, name: str, ref: str | None) -> Members:
        room = self._visible_room(member, name)
        members = self._members(room)
        return Members.model_construct(
            room=name,
            online=[user for user in members if user in self._online],
            members=members,
            ref=ref,
        )

    def topic(self, member: Peer, name: str, ref: str | None) -> RoomTopic:
        """The topic of a room ``member`` may see (membership is not needed)."""
        room = self._visible_room(member, name)
        return RoomTopic(room=name, topic=room.topic, ref=ref)

    async def set_topic(self, member: Peer, name: str, topic: str, ref: str | None) -> None:
        """Store a room's new topic, then announce it; an admin's request.

        Like a message, the change is applied and announced after the commit,
        so that two changes in flight end as they were committed, and nobody
        sees a topic that is not stored. The requester's copy
        (carrying ``ref``) comes then too, or an error.
        """
        room = self._visible_room(member, name)
        if not member.admin:
            raise ProtocolError(ErrorCode.FORBIDDEN, "only admins can set a topic")
        if room.topic_from_config:
            raise _topic_from_config()
        user = member.username

        def committed(error: BaseException | None) -> None:
            reply: RoomTopic | Error
            if error is not None:
                reply = Error(
                    code=ErrorCode.UNAVAILABLE, message="cannot save that now; try again", ref=ref
                )
            elif room.topic_from_config:
                # A reload gave the room a topic meanwhile; its write, queued
                # after this one, puts the file's topic back.
                reply = Error(code=ErrorCode.FORBIDDEN, message=TOPIC_FROM_CONFIG, ref=ref)
            else:
                room.topic = topic
                self._version += 1
                room.broadcast(encode(RoomTopic(room=name, topic=topic, by=user)), skip=member)
                reply = RoomTopic(room=name, topic=topic, by=user, ref=ref)
            member.send(reply)
            member.answered()

        member.submitted()
        try:
            await self.store.commit_then(SaveRoom(name, topic, room.allowed), committed)
        except BaseException:
            member.answered()
            raise

    def room_list(self, username: str | None, ref: str | None = None) -> RoomList:
        """The rooms ``username`` may join (every room when None: the operator)."""
        return RoomList.model_construct(
            rooms=[
                info
                for room, info in self._room_infos()
                if username is None or room.may_join(username)
            ],
            ref=ref,
        )

    def room_count(self) -> int:
        return len(self._rooms)

    def room_size(self, name: str) -> int:
        room = self._rooms.get(name)
        return 0 if room is None else len(room.members)

    def _room_infos(self) -> list[tuple[Room, RoomInfo]]:
        # Cached: with a thousand rooms, building the list costs milliseconds.
        version, infos = self._listing
        if version != self._version:
            infos = [
                (room, RoomInfo.model_construct(name=room.name, topic=room.topic, members=count))
                for room in sorted(self._rooms.values(), key=lambda room: room.name)
                for count in [sum(1 for user in room.members if user in self.users)]
            ]
            self._listing = (self._version, infos)
        return infos

    def _members(self, room: Room) -> list[str]:
        # Memberships of accounts removed from the config stay stored, unlisted.
        if room.sorted_members[0] != self._version:
            members = sorted(user for user in room.members if user in self.users)
            room.sorted_members = (self._version, members)
        return room.sorted_members[1]

    def _visible_room(self, member: Peer, name: str) -> Room:
        room = self._rooms.get(name)
        if room is None:
            raise ProtocolError(ErrorCode.UNKNOWN_ROOM, f"no room {name!r}")
        if not room.may_join(member.username):
            raise ProtocolError(ErrorCode.FORBIDDEN, f"room {name!r} is private")
        return room

    # --- messages ---

    async def say(
        self,
        member: Peer,
        room_name: str,
        text: str,
        client_id: str | None,
        *,
        action: bool = False,
    ) -> None:
        """Store and deliver a room message; the ack (or error) reaches ``member`` after commit."""
        room = self._rooms.get(room_name)
        if room is None or member.username not in room.members:
            raise ProtocolError(ErrorCode.NOT_MEMBER, f"you are not in room {room_name!r}")
        if self._is_resend(member, client_id):
            return
        message = self._new_message(member.username, text, room=room_name, action=action)

        def committed(error: BaseException | None) -> None:
            if error is None:
                room.broadcast(encode(message))
            self._settle(member, client_id, message.id, error)

        await self._submit_message(member, client_id, AppendMessage(message, client_id), committed)

    async def _submit_message(
        self,
        member: Peer,
        client_id: str | None,
        write: AppendMessage,
        committed: Callable[[BaseException | None], None],
    ) -> None:
        member.submitted()
        try:
            await self.store.commit_then(write, committed)
        except BaseException:
            # Never queued (cancelled while the queue was full): forget the
            # id, so that a re-send is a new attempt rather than a wait.
            member.answered()
            if client_id is not None:
                self._pending.pop((member.username, client_id), None)
            raise

    async def dm(
        self,
        member: Peer,
        to: str,
        text: str,
        client_id: str | None,
        *,
        action: bool = False,
    ) -> None:
        """Store and deliver a direct message; stored for later if ``to`` is offline
        (the ack then says ``stored``)."""
        if to not in self.users:
            raise ProtocolError(ErrorCode.UNKNOWN_USER, f"no user {to!r}")
        if self._is_resend(member, client_id):
            return
        message = self._new_message(member.username, text, to=to, action=action)

        def committed(error: BaseException | None) -> None:
            stored = False
            if error is None:
                frame = encode(message)
                if to != member.username:  # a note to self is delivered once, below
                    for connection in self._online.get(member.username, ()):
                        connection.put(frame)
                stored = not self._deliver_direct(to, message, frame)
            self._settle(member, client_id, message.id, error, stored=stored)

        # Stored as undelivered; whoever hands it to the recipient marks it
        # delivered. Deciding at commit time, not now, is what keeps a
        # recipient who logs in or out meanwhile from getting it twice or never.
        await self._submit_message(
            member, client_id, AppendMessage(message, client_id, delivered=False), committed
        )

    async def announce(self, text: str) -> int:
        """A message from ``server`` to every room (the operator console); returns how many."""
        rooms = list(self._rooms.values())
        for room in rooms:
            message = self._new_message(SERVER_USER, text, room=room.name)
            frame = encode(message)

            def committed(
                error: BaseException | None, room: Room = room, frame: bytes = frame
            ) -> None:
                if error is None:
                    room.broadcast(frame)

            await self.store.commit_then(AppendMessage(message), committed)
        return len(rooms)

    def _new_message(
        self,
        sender: str,
        text: str,
        *,
        room: str | None = None,
        to: str | None = None,
        action: bool = False,
    ) -> Message:
        self._last_id += 1
        # Every field is already valid (the text came in a validated envelope),
        # so the model is built without validating it again.
        return Message.model_construct(
            id=self._last_id,
            room=room,
            to=to,
            sender=sender,
            text=text,
            action=True if action else None,  # omitted on the wire when false
            ts=self._clock(),
        )

    def _is_resend(self, member: Peer, client_id: str | None) -> bool:
        """A client id seen before: answer with the original outcome instead of sending again."""
        if client_id is None:
            return False
        recent = self._recent.get(member.username)
        message_id = recent.get(client_id) if recent else None
        if message_id is not None:
            member.send(Ack(ref=client_id, id=message_id))
            return True
        waiting = self._pending.get((member.username, client_id))
        if waiting is not None:
            waiting.append(member.send)
            return True
        self._pending[(member.username, client_id)] = []
        return False

    def _settle(
        self,
        member: Peer,
        client_id: str | None,
        message_id: int,
        error: BaseException | None,
        *,
        stored: bool = False,
    ) -> None:
        reply: Ack | Error
        if error is None:
            reply = Ack(ref=client_id, id=message_id, stored=True if stored else None)
            if client_id is not None:
                self._remember(member.username, client_id, message_id, time.time())
        else:
            reply = Error(
                code=ErrorCode.UNAVAILABLE,
                message="the message could not be stored; send it again",
                ref=client_id,
            )
        member.send(reply)
        member.answered()
        if client_id is not None:
            for send in self._pending.pop((member.username, client_id), []):
                send(reply)

    def _remember(self, user: str, client_id: str, message_id: int, when: float) -> None:
        self._recent.setdefault(user, RecentIds()).add(client_id, message_id, when)

    # --- history ---

    async def history(
        self,
        member: Peer,
        *,
        room: str | None,
        peer: str | None,
        after: int | None,
        limit: int,
        ref: str | None,
    ) -> None:
        """Replay stored messages to ``member``, then ``history_end``.

        The page's ids are looked up first; the messages are then read a few
        at a time, each read after the previous one was queued and the
        connection had room for more, so a page is never held whole.
        """
        user = member.username
        scope: HistoryScope
        if room is not None:
            if not self._is_member(user, room):
                raise _not_member(room)
            scope = RoomScope(room)
        elif peer is not None:
            scope = PeerScope(user, peer)
        else:
            scope = VisibleScope(user, tuple(self.rooms_of(user)))
        try:
            # One more than asked for tells whether there is more.
            ids = await self.store.history_ids(scope, after, limit + 1)
            more = len(ids) > limit
            ids = ids[:limit] if after is not None else ids[-limit:]
            start = 0
            while start < len(ids) and not member.closed:
                messages = await self.store.messages(
                    ids[start : start + READ_ROWS], max_chars=READ_CHARS
                )
                start = ids.index(messages[-1].id, start) + 1 if messages else start + READ_ROWS
                for message in messages:
                    # The user may have left a room (or been taken off a
                    # private room's list) since the replay began.
                    if message.room is not None and not self._is_member(user, message.room):
                        if room is not None:
                            raise _not_member(room)
                        continue
                    member.put(encode(message))
                    await member.wait_for_room()
        except StoreError as exc:
            log.error("history query failed user=%s: %s", user, exc)
            raise ProtocolError(ErrorCode.UNAVAILABLE, "history is unavailable now") from None
        last = ids[-1] if ids else (after or 0)
        member.send(HistoryEnd(room=room, peer=peer, last=last, more=more, ref=ref))

    def _is_member(self, user: str, room: str) -> bool:
        found = self._rooms.get(room)
        return found is not None and user in found.members

    # --- moderation ---

    def kick(self, username: str, *, by: str, reason: str | None, ref: str | None = None) -> Kicked:
        connections = self._online.get(username)
        if not connections:
            raise ProtocolError(ErrorCode.UNKNOWN_USER, f"{username!r} is not online")
        text = f"kicked by {by}" + (f": {reason}" if reason else "")
        self.disconnect_user(username, Error(code=ErrorCode.KICKED, message=text))
        log.warning("kick user=%s by=%s", username, by)
        return Kicked(username=username, ref=ref)

    def disconnect_user(self, username: str, error: Error) -> None:
        for connection in list(self._online.get(username, ())):
            connection.disconnect(error)

    # --- store helpers ---

    async def _persist(self, write: AddMember | RemoveMember | MarkDelivered) -> None:
        """Write state whose loss costs little (it is logged, never raised)."""

        def done(error: BaseException | None) -> None:
            if error is not None:
                log.error("could not save %s: %s", write, error)

        await self.store.commit_then(write, done)

    def _spawn_persist(self, write: RemoveMember | SaveRoom) -> None:
        # For callers that cannot wait (configuration is applied synchronously):
        # the write is small and the queue is large.
        def done(error: BaseException | None) -> None:
            if error is not None:
                log.error("could not save %s: %s", write, error)

        try:
            self.store.commit_then_nowait(write, done)
        except trio.WouldBlock:
            log.error("store queue full; %s not saved", write)


def _topic_from_config() -> ProtocolError:
    return ProtocolError(ErrorCode.FORBIDDEN, TOPIC_FROM_CONFIG)


def _not_member(room: str) -> ProtocolError:
    return ProtocolError(ErrorCode.NOT_MEMBER, f"you are not in room {room!r}")


def _epoch(ts: str) -> float:
    try:
        return datetime.fromisoformat(ts).timestamp()
    except ValueError:
        return 0.0
