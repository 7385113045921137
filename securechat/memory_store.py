"""The :class:`~securechat.store.Store` interface in memory, for tests of the code above it.

:class:`MemoryStore` answers like :class:`~securechat.sqlite_store.SqliteStore`
(the same writes, all or nothing per commit, callbacks in commit order, the
same history, stored direct messages, start-up snapshot and retention) with
nothing on disk, and leaves the commits in the test's hands: what
``commit_then`` queues waits until the test calls
:meth:`MemoryStore.commit_pending` (or, while :meth:`MemoryStore.run` runs,
until the runner's next turn). ``await commit(...)``, whose caller waits for
durability, commits at once, after everything queued before it, as the
real writer would. :meth:`MemoryStore.fail_next` makes the next commit fail.
Speed is not its concern: reads look at every row.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import trio

from .protocol import MAX_MESSAGE_ID, Message, trusted_message
from .store import (
    QUEUE_SIZE,
    AddMember,
    AppendMessage,
    AppendThen,
    DeleteMessages,
    Draft,
    Feed,
    HistoryScope,
    LocalLog,
    MarkDelivered,
    Notice,
    PeerScope,
    Pruned,
    RecentSend,
    ReleaseSpace,
    RemoveMember,
    Retention,
    RoomScope,
    SaveRoom,
    Snapshot,
    StoredRoom,
    StoreError,
    StoreStats,
    Then,
    VisibleScope,
    Watch,
    Write,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Row:
    message: Message
    client_id: str | None
    delivered: bool


@dataclass
class _State:
    """What is committed. A commit applies its writes to a copy, kept only if all apply."""

    rows: dict[int, _Row] = field(default_factory=dict)
    rooms: dict[str, StoredRoom] = field(default_factory=dict)
    members: dict[str, set[str]] = field(default_factory=dict)
    pruned_through: int = 0

    def copy(self) -> _State:
        return _State(
            dict(self.rows),
            dict(self.rooms),
            {room: set(users) for room, users in self.members.items()},
            self.pruned_through,
        )

    def apply(self, write: Write) -> None:
        if isinstance(write, AppendMessage):
            if write.message.id in self.rows:
                raise StoreError("memory: UNIQUE constraint failed: messages.id")
            self.rows[write.message.id] = _Row(write.message, write.client_id, write.delivered)
        elif isinstance(write, MarkDelivered):
            for id_ in write.ids:
                if id_ in self.rows:
                    self.rows[id_] = replace(self.rows[id_], delivered=True)
        elif isinstance(write, DeleteMessages):
            if write.ids:
                self.pruned_through = max(self.pruned_through, *write.ids)
            for id_ in write.ids:
                self.rows.pop(id_, None)
        elif isinstance(write, SaveRoom):
            topic = write.topic
            if topic is None:
                stored = self.rooms.get(write.name)
                topic = "" if stored is None else stored.topic
            self.rooms[write.name] = StoredRoom(topic, write.allowed)
        elif isinstance(write, AddMember):
            self.members.setdefault(write.room, set()).add(write.username)
        elif isinstance(write, RemoveMember):
            users = self.members.get(write.room)
            if users is not None:
                users.discard(write.username)
                if not users:
                    del self.members[write.room]
        else:
            assert isinstance(write, ReleaseSpace)  # memory has no free pages to give back


def _visible(scope: HistoryScope, message: Message) -> bool:
    if isinstance(scope, RoomScope):
        return message.room == scope.room
    if message.to is None:
        return isinstance(scope, VisibleScope) and message.room in scope.rooms
    if isinstance(scope, PeerScope):
        return (message.sender, message.to) in ((scope.user, scope.peer), (scope.peer, scope.user))
    return scope.user in (message.sender, message.to)


def _as_read(message: Message) -> Message:
    """A stored message as a read returns it: a new object, ``action`` True or None."""
    return trusted_message(
        message.id,
        message.room,
        message.to,
        message.sender,
        message.text,
        bool(message.action),
        message.ts,
    )


def _up_to_chars(messages: list[Message], max_chars: int | None) -> list[Message]:
    taken: list[Message] = []
    chars = 0
    for message in messages:
        taken.append(_as_read(message))
        chars += len(message.text)
        if max_chars is not None and chars >= max_chars:
            break
    return taken


class MemoryStore:
    """A :class:`~securechat.store.Store` in memory, committed when the test says so."""

    shared = False  # one server: nothing to watch or tell

    def __init__(self, *, queue_size: int = QUEUE_SIZE) -> None:
        self.stats = StoreStats()
        self._state = _State()
        self._queue: list[tuple[tuple[Write, ...], Then]] = []
        self._queue_size = queue_size
        self._room = trio.lowlevel.ParkingLot()  # commit_then waiting for room in the queue
        # Committed batches whose callbacks have not run: (callbacks, error).
        self._uncalled: list[tuple[list[Then], StoreError | None]] = []
        self._failure: StoreError | None = None
        self._closed = False
        self._queued = trio.Event()  # wakes run()
        self._log = LocalLog()

    # -- what a test controls --

    def commit_pending(self, *, run_callbacks: bool = True) -> int:
        """Commit everything queued as one transaction (none of it if a write fails, or
        after :meth:`fail_next`), then run the callbacks of every committed batch in
        commit order; returns how many units were committed. With ``run_callbacks``
        false the callbacks wait for :meth:`run_callbacks`: the moment between the
        commit and its fan-out."""
        batch, self._queue = self._queue, []
        self._room.unpark_all()
        if batch:
            started = time.perf_counter()
            error, self._failure = self._failure, None
            if error is None:
                state = self._state.copy()
                try:
                    for unit, _ in batch:
                        for write in unit:
                            state.apply(write)
                except StoreError as exc:
                    error = exc
                else:
                    self._state = state
            self.stats.commit_seconds.observe(time.perf_counter() - started)
            self.stats.batch_units.observe(len(batch))
            if error is not None:
                self.stats.failed_commits += 1
            self._uncalled.append(([then for _, then in batch], error))
        if run_callbacks:
            self.run_callbacks()
        return len(batch)

    def run_callbacks(self) -> None:
        """Run the callbacks of the batches committed so far, in commit order."""
        while self._uncalled:
            thens, error = self._uncalled.pop(0)
            for then in thens:
                try:
                    then(error)
                except Exception:  # as SqliteStore: logged, and the next one runs
                    log.exception("store callback failed")

    def fail_next(self, error: StoreError | None = None) -> None:
        """Make the next commit fail with ``error``: none of its writes happen."""
        self._failure = error or StoreError("memory: the commit failed")

    # -- the Store interface --

    async def load(self, *, recent_per_user: int, recent_since: str) -> Snapshot:
        await trio.lowlevel.checkpoint()
        state = self._state
        sends = [
            (row.message.sender, row.client_id, id_, row.message.ts)
            for id_, row in sorted(state.rows.items())
            if row.client_id is not None
        ]
        newest: dict[str, int] = {}  # how many later sends each sender has
        recent: list[RecentSend] = []
        for sender, client_id, id_, ts in reversed(sends):
            newest[sender] = newest.get(sender, 0) + 1
            if newest[sender] <= recent_per_user or ts >= recent_since:
                recent.append(RecentSend(sender, client_id, id_, ts))
        self._log.last_id = max(self._log.last_id, state.pruned_through, *state.rows)
        return Snapshot(
            last_message_id=max(state.pruned_through, *state.rows, 0),
            rooms=dict(state.rooms),
            memberships={room: frozenset(users) for room, users in state.members.items()},
            undelivered_to=frozenset(
                row.message.to
                for row in state.rows.values()
                if not row.delivered and row.message.to is not None
            ),
            recent_sends=tuple(reversed(recent)),
        )

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Commit what is queued at each turn, until :meth:`close`; then commit what is
        left and return. (Without it, commits wait for :meth:`commit_pending`.)"""
        task_status.started()
        while True:
            if self._queue or self._uncalled:
                self.commit_pending()
                await trio.lowlevel.checkpoint()
            elif self._closed:
                return
            else:
                self._queued = trio.Event()
                await self._queued.wait()

    def close(self) -> None:
        self._closed = True
        self._room.unpark_all()
        self._queued.set()

    async def commit(self, *writes: Write) -> None:
        await trio.lowlevel.checkpoint()
        if not writes:
            return
        if self._closed:
            raise StoreError("the store is closed")
        outcome: list[StoreError | None] = []
        self._queue.append((writes, outcome.append))
        self.commit_pending()
        if outcome[0] is not None:
            raise outcome[0]

    async def commit_then(self, writes: Write | tuple[Write, ...], then: Then) -> None:
        while len(self._queue) >= self._queue_size and not self._closed:
            await self._room.park()
        self.commit_then_nowait(writes, then)

    def commit_then_nowait(self, writes: Write | tuple[Write, ...], then: Then) -> None:
        if self._closed:
            then(StoreError("the store is closed"))
            return
        if len(self._queue) >= self._queue_size:
            raise trio.WouldBlock
        self._queue.append((writes if isinstance(writes, tuple) else (writes,), then))
        self._queued.set()

    async def append(self, draft: Draft, then: AppendThen) -> None:
        write = self._log.number(draft)
        await self.commit_then(write, self._log.then(write.message, then))

    def feed(self, apply: Feed) -> None:
        self._log.feed(apply)

    def watch(self, apply: Watch) -> None:
        """Never called: this store has one server."""

    def tell(self, notice: Notice) -> None:
        """Nobody to tell: this store has one server."""

    async def history_ids(self, scope: HistoryScope, after: int | None, limit: int) -> list[int]:
        await trio.lowlevel.checkpoint()
        if limit <= 0:
            return []
        ids = sorted(id_ for id_, row in self._state.rows.items() if _visible(scope, row.message))
        if after is None:
            return ids[-limit:]
        return [id_ for id_ in ids if id_ > after][:limit]

    async def messages(self, ids: Sequence[int], *, max_chars: int | None = None) -> list[Message]:
        await trio.lowlevel.checkpoint()
        rows = self._state.rows
        found = sorted(set(ids) & rows.keys())
        return _up_to_chars([rows[id_].message for id_ in found], max_chars)

    async def undelivered(
        self,
        user: str,
        after: int = 0,
        limit: int = 10_000,
        *,
        through: int | None = None,
        max_chars: int | None = None,
    ) -> list[Message]:
        await trio.lowlevel.checkpoint()
        last = MAX_MESSAGE_ID if through is None else through
        waiting = [
            row.message
            for id_, row in sorted(self._state.rows.items())
            if row.message.to == user and not row.delivered and after < id_ <= last
        ]
        return _up_to_chars(waiting[:limit], max_chars)

    async def prune(self, retention: Retention, now: float) -> Pruned:
        """What SqliteStore.prune does: the oldest messages up to the first one young
        enough (ids grow with time), then each room beyond its newest ``per_room``;
        deleted through :meth:`commit`."""
        await trio.lowlevel.checkpoint()
        by_age = by_room = 0
        cutoff = retention.cutoff(now)
        if cutoff is not None:
            rows = self._state.rows
            old = tuple(
                itertools.takewhile(lambda id_: rows[id_].message.ts < cutoff, sorted(rows))
            )
            if old:
                await self.commit(DeleteMessages(old))
                by_age = len(old)
        if retention.per_room:
            by_room_name: dict[str, list[int]] = {}
            for id_, row in sorted(self._state.rows.items()):
                if row.message.room is not None:
                    by_room_name.setdefault(row.message.room, []).append(id_)
            for ids in by_room_name.values():
                excess = tuple(ids[: -retention.per_room])
                if excess:
                    await self.commit(DeleteMessages(excess))
                    by_room += len(excess)
        return Pruned(by_age=by_age, by_room=by_room)
