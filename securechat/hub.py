"""The chat's rules: what each request means, on top of rooms, connections, the ledger,
the mailbox and the store.

The hub is the coordinator. Durable room state is :class:`~securechat.rooms.Rooms`,
the connections here and presence :class:`~securechat.online.Online`, timestamps and
idempotent re-sends the :class:`~securechat.ledger.SendLedger`, the offline direct
messages the :class:`~securechat.mailbox.Mailbox`. It does no network I/O: replies
and deliveries are encoded frames put to each connection's
:class:`~securechat.delivery.Peer`.

Messages are durable: ``say`` and ``dm`` hand a draft to the
:class:`~securechat.store.Store` (``append``) and return at once, so a
sender can pipeline. The store gives the message its id (ids grow in commit order) and
hands every committed message, in id order, to :meth:`Hub._apply` (the
fan-out); then the append's callback sends the ``ack``. Nothing is
delivered or acknowledged before it is on disk.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

import trio

from .config import RoomSettings
from .delivery import Peer
from .history import replay
from .ledger import RECENT_IDS, SendLedger, recent_since
from .mailbox import Mailbox
from .online import Online
from .protocol import (
    LOBBY,
    SERVER_USER,
    Error,
    ErrorCode,
    Joined,
    Kicked,
    Left,
    Members,
    Message,
    ProtocolError,
    RoomList,
    RoomTopic,
    encode,
)
from .rooms import TOPIC_FROM_CONFIG, Room, Rooms, not_member
from .stats import LATENCY_BUCKETS, Histogram
from .store import (
    AddMember,
    Appended,
    AppendThen,
    ChatChange,
    Draft,
    HereOnline,
    LetGo,
    OnlineElsewhere,
    RemoveMember,
    SaveRoom,
    Snapshot,
    Store,
    StoreError,
    Write,
)

log = logging.getLogger(__name__)

Committed = Callable[[BaseException | None], None]

# How many "stored for later" flags wait for their ack (see Hub._stored).
STORED_FLAGS = 4096
# In a storm of changes, held presence waits up to this many presence delays, but no
# more than PRESENCE_STORM_MAX seconds (unless one delay is longer) (Hub.run_presence).
PRESENCE_STORM_FACTOR = 5
PRESENCE_STORM_MAX = 5.0


@dataclass
class ChatStats:
    """What the hub counts, for the metrics (:mod:`securechat.stats`): per message and
    per broadcast, never per recipient."""

    # Messages this server's clients sent, handed to the store ("room", "direct"),
    # and re-sends recognised (answered with the first one's ack, stored nothing).
    received: Counter[str] = field(default_factory=Counter)
    resends: int = 0
    # Committed messages queued to connections here: each broadcast adds its number of
    # recipients ("room", "direct": the recipient's and the sender's other connections).
    deliveries: Counter[str] = field(default_factory=Counter)
    # History requests answered, by result ("ok", "error": refused or failed), and the
    # time from the request to its history_end (paced by the client's reading).
    history: Counter[str] = field(default_factory=Counter)
    history_seconds: Histogram = field(default_factory=lambda: Histogram(LATENCY_BUCKETS))


async def load_state(store: Store) -> Snapshot:
    """The stored state a :class:`Hub` starts from (read without blocking the event loop),
    with the client ids the ledger keeps for idempotent re-sends."""
    return await store.load(recent_per_user=RECENT_IDS, recent_since=recent_since())


class Hub:
    """The chat's rules, on top of a :class:`Store`, starting from its
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
        presence_delay: float = 0.0,
    ) -> None:
        """``presence_delay``: how long ``online``/``offline`` for connections that take
        presence lists may be held to be sent together (:meth:`run_presence`); 0: not held."""
        self.store = store
        self.rooms = Rooms(
            users,
            state.rooms,
            state.memberships,
            allow_create=allow_room_create,
            max_rooms=max_rooms,
        )
        self.presence_delay = presence_delay
        self.online = Online(state.online_elsewhere, hold_presence=presence_delay > 0)
        self.ledger = SendLedger(state.recent_sends)
        self.last_applied = state.last_message_id  # the newest message delivered here
        self.stats = ChatStats()
        # Direct messages kept for an offline recipient, until their ack says so. In
        # a cluster every node sees every message, and only the sender's node acks:
        # the oldest are forgotten (by then long acked).
        self._stored: dict[int, None] = {}
        store.feed(self._apply)
        self.mailbox = Mailbox(store, state.undelivered_to)
        self.shutting_down = False  # no presence updates while everyone is being let go
        self.configure_rooms(rooms)

    # --- configuration ---

    def reconfigure(self, users: Iterable[str], rooms: Mapping[str, RoomSettings]) -> None:
        """Apply a reloaded config file's users and rooms.

        Connections of users no longer configured are let go; so are users
        taken off a private room's list (out of that room at once).
        """
        self.rooms.set_users(users)
        self.configure_rooms(rooms)
        removed = "your account was removed"
        for username in self.online.users():  # here and on other servers
            if username not in self.rooms.users:
                if username in self.online.elsewhere:  # theirs may not be reloaded yet
                    self.store.tell(LetGo(username, removed))
                self.disconnect_user(username, Error(code=ErrorCode.KICKED, message=removed))

    def configure_rooms(self, rooms: Mapping[str, RoomSettings]) -> None:
        """Apply the config file's rooms (at start-up and on reload)."""
        for change in self.rooms.configure(rooms):
            room = change.room
            if change.save:
                # A topic the file does not set is left as stored (None): an
                # admin's change may be in flight.
                self._spawn_persist(SaveRoom(room.name, rooms[room.name].topic, room.allowed))
            if change.topic_changed:
                frame = encode(RoomTopic(room=room.name, topic=room.topic, by=SERVER_USER))
                self.online.broadcast(room.name, frame)
            for user in change.removed:
                for peer in self.online.peers_of(user):
                    self.online.leave(room.name, peer)
                    peer.send(Left(room=room.name))
                self.online.room_presence(room.name, user, "left")
                self._spawn_persist(RemoveMember(room.name, user))

    def begin_shutdown(self) -> None:
        """Everyone is about to be let go: no presence updates from now on."""
        self.shutting_down = True

    def set_admin(self, username: str, admin: bool) -> None:
        """A changed admin flag applies to the user's open connections at once."""
        for peer in self.online.peers_of(username):
            peer.admin = admin

    def online_users(self) -> list[str]:
        return self.online.users()

    def rooms_of(self, username: str) -> list[str]:
        return self.rooms.of(username)

    # --- connections ---

    async def login(self, peer: Peer, *, presence_lists: bool = False) -> list[str]:
        """Attach a logged-in connection; returns the user's rooms (the lobby always among them).

        Refuses (auth_failed) a user who is no longer configured. The connection is
        registered before anything is awaited, so a reload from then on sees it.
        ``presence_lists``: the client takes several users' ``online``/``offline`` in
        one ``presence`` (it asked for :data:`~securechat.protocol.PRESENCE_LISTS`).
        """
        user = peer.username
        if user not in self.rooms.users:
            raise ProtocolError(ErrorCode.AUTH_FAILED, "invalid username, password or certificate")
        first = self.online.add(peer, presence_lists=presence_lists)
        if first:
            self.store.tell(HereOnline(user, True))
        lobby = self.rooms.lobby()
        if user not in lobby.members:
            self.rooms.add_member(lobby, user)
            for other in self.online.peers_of(user):  # the user's other devices are back in too
                if other is not peer:
                    self.online.enter(LOBBY, other)
                    other.send(Joined(room=LOBBY, topic=lobby.topic, members=self._members(lobby)))
            await self._persist(AddMember(LOBBY, user))
        rooms = self.rooms.of(user)
        for name in rooms:
            self.online.enter(name, peer)
        if first and user not in self.online.elsewhere:
            self.online.announce(user, rooms, "online")
        return rooms

    def logout(self, peer: Peer) -> None:
        user = peer.username
        if not self.online.remove(peer):
            return
        self.store.tell(HereOnline(user, False))
        if not self.shutting_down and user not in self.online.elsewhere:
            self.online.announce(user, self.rooms.of(user), "offline")

    async def run_presence(self) -> None:
        """Send the held ``online``/``offline`` changes (see :meth:`Online.flush_presence`)
        a presence delay after the last time; runs until cancelled.

        While every delay brings changes (a login storm) the wait doubles, up to
        :data:`PRESENCE_STORM_FACTOR` delays (1 s by default): each wait ends in one write to every
        connection that takes lists, so in a storm of N arrivals their number, not
        N², is what costs, and it falls with a longer wait. A delay without
        changes brings it back.
        """
        if self.presence_delay <= 0:
            return
        delay = self.presence_delay
        longest = max(delay, min(PRESENCE_STORM_FACTOR * delay, PRESENCE_STORM_MAX))
        wait = delay
        while True:
            await trio.sleep(wait)
            wait = min(2 * wait, longest) if self.online.flush_presence() else delay

    async def deliver_stored(self, peer: Peer) -> None:
        """Send ``peer`` the direct messages that arrived while its user was offline."""
        await self.mailbox.deliver_stored(peer, through=self.last_applied)

    # --- rooms ---

    async def join(self, peer: Peer, name: str, ref: str | None) -> None:
        user = peer.username
        room = self.rooms.get(name)
        created = room is None
        if room is None:
            room = self.rooms.create(name)
            writes: tuple[Write, ...] = (SaveRoom(name, ""), AddMember(name, user))
        elif not room.may_join(user):
            raise ProtocolError(ErrorCode.FORBIDDEN, f"room {name!r} is private")
        else:
            writes = () if user in room.members else (AddMember(name, user),)
        if writes:
            try:
                await self.store.commit(*writes)
            except Exception:
                log.exception("cannot save membership user=%s room=%s", user, name)
                if created:
                    self.rooms.drop(room)
                raise ProtocolError(
                    ErrorCode.UNAVAILABLE, "cannot save that now; try again"
                ) from None
            if peer.closed or not room.may_join(user) or self.rooms.get(name) is not room:
                # A reload while the write was in flight took the right away.
                self._spawn_persist(RemoveMember(name, user))
                raise ProtocolError(ErrorCode.FORBIDDEN, f"room {name!r} is private")
            self.rooms.add_member(room, user)
            self.online.room_presence(name, user, "joined")
        for other in self.online.peers_of(user):
            self.online.enter(name, other)
            other.send(
                Joined(
                    room=name,
                    topic=room.topic,
                    members=self._members(room),
                    ref=ref if other is peer else None,
                )
            )

    async def leave(self, peer: Peer, name: str, ref: str | None) -> None:
        user = peer.username
        room = self.rooms.get(name)
        if room is None or user not in room.members:
            raise not_member(name)
        self.rooms.remove_member(room, user)
        for other in self.online.peers_of(user):
            self.online.leave(name, other)
            other.send(Left(room=name, ref=ref if other is peer else None))
        self.online.room_presence(name, user, "left")
        await self._persist(RemoveMember(name, user))

    def who(self, peer: Peer, name: str, ref: str | None) -> Members:
        self.online.flush_presence()  # what it was told before comes before this answer
        members = self._members(self.rooms.visible(peer.username, name))
        return Members.model_construct(
            room=name,
            online=[user for user in members if self.online.is_online(user)],
            members=members,
            ref=ref,
        )

    def topic(self, peer: Peer, name: str, ref: str | None) -> RoomTopic:
        """The topic of a room ``peer`` may see (membership is not needed)."""
        room = self.rooms.visible(peer.username, name)
        return RoomTopic(room=name, topic=room.topic, ref=ref)

    async def set_topic(self, peer: Peer, name: str, topic: str, ref: str | None) -> None:
        """Store a room's new topic, then announce it; an admin's request.

        Like a message, the change is applied and announced after the commit,
        so that two changes in flight end as they were committed, and nobody
        sees a topic that is not stored. The requester's copy (carrying
        ``ref``) comes then too, or an error.
        """
        room = self.rooms.visible(peer.username, name)
        if not peer.admin:
            raise ProtocolError(ErrorCode.FORBIDDEN, "only admins can set a topic")
        if room.topic_from_config:
            raise ProtocolError(ErrorCode.FORBIDDEN, TOPIC_FROM_CONFIG)
        user = peer.username

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
                self.rooms.set_topic(room, topic)
                frame = encode(RoomTopic(room=name, topic=topic, by=user))
                self.online.broadcast(name, frame, skip=peer)
                reply = RoomTopic(room=name, topic=topic, by=user, ref=ref)
            peer.send(reply)
            peer.answered()

        await self._commit_for(peer, SaveRoom(name, topic, room.allowed, by=user), committed)

    def room_list(self, username: str | None, ref: str | None = None) -> RoomList:
        """The rooms ``username`` may join (every room when None: the operator)."""
        return RoomList.model_construct(
            rooms=[
                info
                for room, info in self.rooms.infos()
                if username is None or room.may_join(username)
            ],
            ref=ref,
        )

    def room_count(self) -> int:
        return len(self.rooms)

    def room_size(self, name: str) -> int:
        return self.rooms.size(name)

    def _members(self, room: Room) -> list[str]:
        return self.rooms.members(room)

    # --- messages ---

    async def say(
        self,
        peer: Peer,
        room_name: str,
        text: str,
        client_id: str | None,
        *,
        action: bool = False,
    ) -> None:
        """Store and deliver a room message; the ack (or error) reaches ``peer`` after commit."""
        if not self.rooms.is_member(peer.username, room_name):
            raise not_member(room_name)
        if self.ledger.is_resend(peer, client_id):
            self.stats.resends += 1
            return
        self.stats.received["room"] += 1
        draft = self.ledger.draft(peer.username, text, client_id, room=room_name, action=action)

        def committed(outcome: Appended | StoreError) -> None:
            self.ledger.settle(peer, client_id, outcome)

        await self._append_for(peer, client_id, draft, committed)

    async def dm(
        self,
        peer: Peer,
        to: str,
        text: str,
        client_id: str | None,
        *,
        action: bool = False,
    ) -> None:
        """Store and deliver a direct message; stored for later if ``to`` is offline
        (the ack then says ``stored``)."""
        if to not in self.rooms.users:
            raise ProtocolError(ErrorCode.UNKNOWN_USER, f"no user {to!r}")
        if self.ledger.is_resend(peer, client_id):
            self.stats.resends += 1
            return
        self.stats.received["direct"] += 1
        draft = self.ledger.draft(peer.username, text, client_id, to=to, action=action)

        def committed(outcome: Appended | StoreError) -> None:
            stored = False
            if isinstance(outcome, Appended) and outcome.id in self._stored:
                del self._stored[outcome.id]
                stored = True
            self.ledger.settle(peer, client_id, outcome, stored=stored)

        await self._append_for(peer, client_id, draft, committed)

    async def announce(self, text: str) -> int:
        """A message from ``server`` to every room (the operator console); returns how many."""
        rooms = [room.name for room in self.rooms]
        for name in rooms:

            def committed(outcome: Appended | StoreError, name: str = name) -> None:
                if isinstance(outcome, StoreError):
                    log.error("announcement not stored in room %s: %s", name, outcome)

            await self.store.append(self.ledger.draft(SERVER_USER, text, room=name), committed)
        return len(rooms)

    def _apply(self, message: Message) -> None:
        """A committed message, in id order: deliver it to its connections here.

        A direct message is handed to its recipient's connections, or kept for
        their next login; deciding at commit time, not at send time, is what
        keeps a recipient who logs in or out meanwhile from getting it twice
        or never.
        """
        self.last_applied = message.id
        frame = encode(message)
        if message.to is None:
            assert message.room is not None
            self.stats.deliveries["room"] += self.online.room_size(message.room)
            self.online.broadcast(message.room, frame)
            return
        sender, to = message.sender, message.to
        self.online.flush_presence()  # the sender's "online" before its message
        if to != sender:  # a note to self is delivered once, below
            own_peers = self.online.peers_of(sender)
            self.stats.deliveries["direct"] += len(own_peers)
            for own in own_peers:
                own.put(frame)
        peers = self.online.peers_of(to)
        if self.mailbox.hand_over(to, message, frame, peers):
            self.stats.deliveries["direct"] += len(peers)
        elif to not in self.online.elsewhere:
            self._stored[message.id] = None
            if len(self._stored) > STORED_FLAGS:
                del self._stored[next(iter(self._stored))]

    def changed(self, change: ChatChange) -> None:
        """What another server sharing the store changed (a cluster; see
        :meth:`Store.watch`), in log order: the same state and notices here as if it
        had been done on this server."""
        if isinstance(change, OnlineElsewhere):
            user = change.username
            if change.online:
                self.online.elsewhere.add(user)
            else:
                self.online.elsewhere.discard(user)
            if not self.online.is_here(user) and not self.shutting_down:
                state: Literal["online", "offline"] = "online" if change.online else "offline"
                self.online.announce(user, self.rooms.of(user), state)
        elif isinstance(change, LetGo):
            text = change.message
            self.disconnect_user(change.username, Error(code=ErrorCode.KICKED, message=text))
        elif isinstance(change, SaveRoom):
            room = self.rooms.adopt(change.name, change.allowed)
            if change.topic is not None and change.topic != room.topic:
                if room.topic_from_config:
                    return  # this server's config file sets it
                self.rooms.set_topic(room, change.topic)
                by = change.by or SERVER_USER
                frame = encode(RoomTopic(room=room.name, topic=change.topic, by=by))
                self.online.broadcast(room.name, frame)
        elif isinstance(change, AddMember):
            room = self.rooms.adopt(change.room)
            user = change.username
            if user in room.members or not room.may_join(user):
                return
            self.rooms.add_member(room, user)
            if room.name != LOBBY:
                self.online.room_presence(room.name, user, "joined")
            elif user in self.online.elsewhere and not self.online.is_here(user):
                # A first login on another node: its "online" may have come first,
                # when the user was in no room yet (it is not ordered with writes).
                self.online.announce(user, [LOBBY], "online")
            for peer in self.online.peers_of(user):  # the user's connections here join too
                self.online.enter(room.name, peer)
                peer.send(Joined(room=room.name, topic=room.topic, members=self._members(room)))
        else:
            left = self.rooms.get(change.room)
            user = change.username
            if left is None or user not in left.members:
                return
            self.rooms.remove_member(left, user)
            for peer in self.online.peers_of(user):
                self.online.leave(left.name, peer)
                peer.send(Left(room=left.name))
            self.online.room_presence(left.name, user, "left")

    async def _append_for(
        self, peer: Peer, client_id: str | None, draft: Draft, then: AppendThen
    ) -> None:
        """Queue a message ``peer`` is owed an answer for; ``then`` gives the answer."""
        peer.submitted()
        try:
            await self.store.append(draft, then)
        except BaseException:
            peer.answered()  # never queued (cancelled while the queue was full)
            self.ledger.abandon(peer, client_id)
            raise

    async def _commit_for(self, peer: Peer, write: Write, committed: Committed) -> None:
        """Queue a write ``peer`` is owed an answer for; ``committed`` gives the answer."""
        peer.submitted()
        try:
            await self.store.commit_then(write, committed)
        except BaseException:
            peer.answered()  # never queued (cancelled while the queue was full)
            raise

    # --- history ---

    async def history(
        self,
        peer: Peer,
        *,
        room: str | None,
        with_user: str | None = None,
        after: int | None,
        limit: int,
        ref: str | None,
    ) -> None:
        """Replay stored messages to ``peer``, then ``history_end`` (see :mod:`.history`)."""
        started = time.perf_counter()
        try:
            await replay(
                self.store,
                self.rooms,
                peer,
                room=room,
                with_user=with_user,
                after=after,
                limit=limit,
                ref=ref,
            )
        except ProtocolError:
            self.stats.history["error"] += 1
            raise
        self.stats.history["ok"] += 1
        self.stats.history_seconds.observe(time.perf_counter() - started)

    # --- moderation ---

    def kick(self, username: str, *, by: str, reason: str | None, ref: str | None = None) -> Kicked:
        if not self.online.is_online(username):
            raise ProtocolError(ErrorCode.UNKNOWN_USER, f"{username!r} is not online")
        text = f"kicked by {by}" + (f": {reason}" if reason else "")
        if username in self.online.elsewhere:
            self.store.tell(LetGo(username, text))
        self.disconnect_user(username, Error(code=ErrorCode.KICKED, message=text))
        log.warning("kick user=%s by=%s", username, by)
        return Kicked(username=username, ref=ref)

    def disconnect_user(self, username: str, error: Error) -> None:
        for peer in list(self.online.peers_of(username)):
            peer.disconnect(error)

    # --- store helpers ---

    async def _persist(self, write: AddMember | RemoveMember) -> None:
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
