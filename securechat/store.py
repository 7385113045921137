"""What the chat needs from durable storage: the :class:`Store` interface.

The hub talks to storage through this interface only; the server runs
:class:`~securechat.sqlite_store.SqliteStore` (SQLite on disk), the hub's
tests :class:`~securechat.memory_store.MemoryStore` (the same behaviour in
memory, committed when the test says so). A new backend is one new module
that implements :class:`Store`.

The write calls say what they guarantee:

- ``await commit(*writes)`` returns once the writes are durable (one
  transaction), and raises :class:`StoreError` if they are not.
- ``await commit_then(writes, then)`` queues the writes for the next group
  commit and returns at once (it waits only for room in the queue:
  back-pressure); ``then(None)`` runs once they are durable, ``then(error)``
  if they cannot be. Nothing a ``then`` does (a fan-out, an ``ack``)
  happens before the commit.
- ``commit_then_nowait(writes, then)`` is the same for callers that cannot
  wait (a config reload); it raises ``trio.WouldBlock`` when the queue is full.

Messages go through ``append(draft, then)`` instead: the store numbers
them (ids grow in commit order) and hands every committed message to the
function given to ``feed``, in id order, before the ``then`` of its append
runs. Fan-out is that function's job, the ``ack`` the ``then``'s. In one
process the feed is the commit itself (:class:`LocalLog`); a store shared
by several servers feeds each of them every server's messages.

The ``then`` calls run in commit order, and ``commit`` returns in that
order too: what a caller does after ``await commit(...)`` comes after the
fan-out of everything committed before. They run after the commit, never
inside a transaction (SqliteStore: its writer runs them between two
commits; RedisStore: once its tail has fed the messages committed up to
them). A ``then`` must not raise: if it does, the error is logged and the next one
runs.

Start-up state comes as one :class:`Snapshot` from ``await load(...)``,
read without blocking the event loop.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import NamedTuple, Protocol

import trio

from .protocol import Message, trusted_message, utc_timestamp
from .stats import BATCH_BUCKETS, LATENCY_BUCKETS, Histogram

# Units of writes (one commit_then call each) that may wait for the next
# commit before commit_then waits for room (back-pressure), in every backend.
QUEUE_SIZE = 1024


class StoreError(Exception):
    """The database cannot be opened or written; the message says which file and why."""


# --- writes ------------------------------------------------------------------------


@dataclass(frozen=True)
class AppendMessage:
    message: Message
    client_id: str | None = None
    delivered: bool = True  # False: a direct message waiting for its offline recipient


@dataclass(frozen=True)
class MarkDelivered:
    ids: tuple[int, ...]


@dataclass(frozen=True)
class DeleteMessages:
    """Retention: delete these messages (ids that no longer exist are skipped)."""

    ids: tuple[int, ...]


@dataclass(frozen=True)
class ReleaseSpace:
    """Give up to ``pages`` free pages back to the file system (``auto_vacuum=INCREMENTAL``)."""

    pages: int


@dataclass(frozen=True)
class SaveRoom:
    name: str
    topic: str | None  # None: keep the stored topic ("" for a new room)
    allowed: frozenset[str] | None = None  # a private room's list of who may join
    by: str | None = None  # who set ``topic`` (an admin), for the other servers to say


@dataclass(frozen=True)
class AddMember:
    room: str
    username: str


@dataclass(frozen=True)
class RemoveMember:
    room: str
    username: str


Write = (
    AppendMessage
    | MarkDelivered
    | SaveRoom
    | AddMember
    | RemoveMember
    | DeleteMessages
    | ReleaseSpace
)
# What runs after a commit: with None once the writes are durable, with the error if not.
Then = Callable[[StoreError | None], None]


# --- what the servers sharing a store tell each other ------------------------------------
# With one server nothing is shared and none of this happens. On a cluster node
# the store hands the hub what the other nodes changed (:meth:`Store.watch`), in
# log order, and passes on what this node tells them (:meth:`Store.tell`).


@dataclass(frozen=True)
class HereOnline:
    """Told: ``username`` has its first connection on this server (``online``), or its
    last one here has gone."""

    username: str
    online: bool


@dataclass(frozen=True)
class OnlineElsewhere:
    """Fed: ``username`` is now online on some other server (``online``), or on none."""

    username: str
    online: bool


@dataclass(frozen=True)
class LetGo:
    """Told and fed: end ``username``'s connections with an error saying ``message``
    (a kick)."""

    username: str
    message: str


@dataclass(frozen=True)
class Spent:
    """Told and fed: what users spent of their rate limits on one server since it last
    said: (user, the :class:`~securechat.limits.RateKind` value, tokens)."""

    costs: tuple[tuple[str, str, float], ...]


@dataclass(frozen=True)
class LoginFailures:
    """Told and fed: failed logins on one server (each attempt's throttle keys), and the
    keys that a successful login cleared."""

    failed: tuple[tuple[str, ...], ...]
    cleared: tuple[str, ...]


Notice = HereOnline | LetGo | Spent | LoginFailures
# What another server changed in the chat (room state it committed, presence, kicks) ...
ChatChange = SaveRoom | AddMember | RemoveMember | OnlineElsewhere | LetGo
# ... and that, or what it spent of the shared limits.
Change = ChatChange | Spent | LoginFailures
Watch = Callable[[Change], None]


async def commit_and_wait(
    commit_then: Callable[[tuple[Write, ...], Then], Awaitable[None]], writes: tuple[Write, ...]
) -> None:
    """:meth:`Store.commit` on top of :meth:`Store.commit_then`: queue ``writes`` as one
    unit, wait for its commit, raise its error."""
    if not writes:
        return
    outcome: list[StoreError | None] = []
    committed = trio.Event()

    def then(error: StoreError | None) -> None:
        outcome.append(error)
        committed.set()

    await commit_then(writes, then)
    await committed.wait()
    if outcome[0] is not None:
        raise outcome[0]


# --- messages ----------------------------------------------------------------------------


class Draft(NamedTuple):  # a tuple: built once per message, at half a frozen dataclass's cost
    """A message the server accepted, before the store gives it its id."""

    sender: str
    text: str
    ts: str
    room: str | None = None
    to: str | None = None  # a direct message (then ``room`` is None)
    action: bool = False
    client_id: str | None = None


@dataclass(frozen=True)
class Appended:
    """An appended message, committed: the id it got."""

    id: int


# What runs after an append: with the message's id once it is durable, with the error if not.
AppendThen = Callable[[Appended | StoreError], None]
# Where committed messages go, in id order (see Store.feed).
Feed = Callable[[Message], None]


class LocalLog:
    """Numbering and feed for a store that is the only writer of its messages (one
    process): ids continue from the highest stored one in the order appends are
    queued, which is commit order, and the feed gets each message right before the
    ``then`` of its append."""

    def __init__(self) -> None:
        self.last_id = 0
        self._feed: Feed | None = None

    def feed(self, apply: Feed) -> None:
        self._feed = apply

    def number(self, draft: Draft) -> AppendMessage:
        self.last_id += 1
        # Every field is already valid (the text came in a validated envelope),
        # so the model is built without validating it again.
        message = trusted_message(
            self.last_id, draft.room, draft.to, draft.sender, draft.text, draft.action, draft.ts
        )
        # A direct message is stored as undelivered; whoever hands it to its
        # recipient marks it delivered.
        return AppendMessage(message, draft.client_id, delivered=draft.to is None)

    def then(self, message: Message, then: AppendThen) -> Then:
        def committed(error: StoreError | None) -> None:
            if error is not None:
                then(error)
                return
            if self._feed is not None:
                self._feed(message)
            then(Appended(message.id))

        return committed


# --- retention ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Retention:
    """What the prune keeps: messages younger than ``max_age`` seconds (0: any age; room
    and direct messages alike, delivered or not), and in each room its newest
    ``per_room`` messages (0: all; direct messages have no room)."""

    max_age: float = 0.0
    per_room: int = 0

    @property
    def enabled(self) -> bool:
        return self.max_age > 0 or self.per_room > 0

    def cutoff(self, now: float) -> str | None:
        """The ``ts`` before which a message is too old at ``now`` (None: no age limit)."""
        if not self.max_age:
            return None
        return utc_timestamp(datetime.fromtimestamp(now - self.max_age, UTC))


@dataclass(frozen=True)
class Pruned:
    """What one :meth:`Store.prune` did."""

    by_age: int = 0
    by_room: int = 0
    pages_released: int = 0

    @property
    def messages(self) -> int:
        return self.by_age + self.by_room


# --- start-up state ----------------------------------------------------------------------


@dataclass(frozen=True)
class RecentSend:
    """A message sent with a client id, for idempotent re-sends after a restart."""

    sender: str
    client_id: str
    message_id: int
    ts: str


@dataclass(frozen=True)
class StoredRoom:
    topic: str = ""
    allowed: frozenset[str] | None = None  # who may join a private room; None: public


@dataclass(frozen=True)
class Snapshot:
    """The stored state at one moment: what a hub starts from."""

    last_message_id: int = 0  # the highest id ever stored, pruned ones included
    rooms: Mapping[str, StoredRoom] = field(default_factory=dict)  # every saved room
    memberships: Mapping[str, frozenset[str]] = field(default_factory=dict)  # room: usernames
    # Users who have direct messages waiting for their next login.
    undelivered_to: frozenset[str] = frozenset()
    # Messages sent with a client id (see Store.load), oldest first.
    recent_sends: tuple[RecentSend, ...] = ()
    # Users connected to other servers sharing the store (a cluster).
    online_elsewhere: frozenset[str] = frozenset()


# --- history -----------------------------------------------------------------------------


@dataclass(frozen=True)
class RoomScope:
    """History of one room."""

    room: str


@dataclass(frozen=True)
class PeerScope:
    """The direct messages between ``user`` and ``peer`` (both ways; a note to self when equal)."""

    user: str
    peer: str


@dataclass(frozen=True)
class VisibleScope:
    """Everything ``user`` can see: the messages of ``rooms`` and their direct messages."""

    user: str
    rooms: tuple[str, ...]


HistoryScope = RoomScope | PeerScope | VisibleScope


# --- the interface -----------------------------------------------------------------------


@dataclass
class StoreStats:
    """What a store counts of its work, for the metrics (:mod:`securechat.stats`)."""

    # Each group commit: how long it took (from the writer handing it over to the
    # outcome: SQLite's transaction and fsync in a thread, Redis's round trips), and
    # how many units (appends, ``commit_then`` calls) it held; those that failed.
    commit_seconds: Histogram = field(default_factory=lambda: Histogram(LATENCY_BUCKETS))
    batch_units: Histogram = field(default_factory=lambda: Histogram(BATCH_BUCKETS))
    failed_commits: int = 0
    # A store on a server of its own (Redis): requests sent, each one round trip (one
    # command, or one pipeline or transaction), by what they were for; those that
    # failed (an error reply, a lost connection). Empty for SQLite.
    requests: Counter[str] = field(default_factory=Counter)
    request_errors: Counter[str] = field(default_factory=Counter)


class Store(Protocol):
    """Durable messages, rooms and memberships (see the module docstring for the guarantees)."""

    # Other servers share this store (a cluster): what :meth:`watch` and :meth:`tell` are for.
    shared: bool
    stats: StoreStats

    # -- start-up and lifetime --

    async def load(self, *, recent_per_user: int, recent_since: str) -> Snapshot:
        """The stored state, read without blocking the event loop (before or while
        :meth:`run` runs). Its ``recent_sends`` are each user's newest
        ``recent_per_user`` sends with a client id, and every one at or after the
        timestamp ``recent_since``."""
        ...

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Everything the store runs (its writer, the ``then`` calls) until :meth:`close`;
        then commits what is queued, runs the last ``then`` calls and returns."""
        ...

    def close(self) -> None:
        """No more writes: a later write fails with :class:`StoreError` (``commit`` raises
        it; a ``then`` gets it at once)."""
        ...

    # -- writes --

    async def commit(self, *writes: Write) -> None:
        """Commit ``writes`` in one transaction and return once they are durable (and
        everything queued before them too); raises :class:`StoreError` if they are not."""
        ...

    async def commit_then(self, writes: Write | tuple[Write, ...], then: Then) -> None:
        """Queue ``writes`` (one unit: all or nothing) for the group commit; ``then``
        runs after it. Waits only while the queue is full (back-pressure)."""
        ...

    def commit_then_nowait(self, writes: Write | tuple[Write, ...], then: Then) -> None:
        """:meth:`commit_then` for callers that cannot wait; raises ``trio.WouldBlock``
        when the queue is full (nothing is queued then)."""
        ...

    # -- messages --

    async def append(self, draft: Draft, then: AppendThen) -> None:
        """Queue a new message like :meth:`commit_then`: it gets the next id at its commit,
        goes to the feed, and then ``then(Appended(id))`` runs (``then(error)`` if it
        cannot be stored, and nothing goes to the feed). Ids grow in commit order."""
        ...

    def feed(self, apply: Feed) -> None:
        """From now on, hand every committed message to ``apply``, once each, in id order."""
        ...

    # -- other servers sharing the store (a cluster) --

    def watch(self, apply: Watch) -> None:
        """From now on, hand what other servers change (room state they committed,
        presence, kicks) to ``apply``, in the order they committed it, interleaved in
        order with :meth:`feed`. A store that only one server uses never calls it."""
        ...

    def tell(self, notice: Notice) -> None:
        """Tell the other servers (best effort, without waiting); nothing to do for a
        store that only one server uses."""
        ...

    # -- reads --

    async def history_ids(self, scope: HistoryScope, after: int | None, limit: int) -> list[int]:
        """The ids of a history page, ascending: the first ``limit`` after ``after``, or
        without ``after`` the latest ``limit``."""
        ...

    async def messages(self, ids: Sequence[int], *, max_chars: int | None = None) -> list[Message]:
        """The messages with these ids, in id order (ids that do not exist are skipped).

        With ``max_chars``, stops after the message that takes the texts read
        to that many characters: the caller asks again for the ids after the
        last one returned.
        """
        ...

    async def undelivered(
        self,
        user: str,
        after: int = 0,
        limit: int = 10_000,
        *,
        through: int | None = None,
        max_chars: int | None = None,
    ) -> list[Message]:
        """Direct messages to ``user`` stored while they were offline, with ids after
        ``after`` (and up to ``through``), oldest first; ``max_chars`` as for :meth:`messages`."""
        ...

    # -- retention --

    async def prune(self, retention: Retention, now: float) -> Pruned:
        """Delete what ``retention`` does not keep at time ``now`` (seconds since the
        epoch), beside live traffic; raises :class:`StoreError` if the storage fails."""
        ...
