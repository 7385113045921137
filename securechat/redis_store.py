"""The :class:`~securechat.store.Store` interface on Redis: one chat shared by many servers.

Owns what a cluster node keeps in Redis and how: the message log, history,
stored direct messages, rooms and memberships, and the numbering of messages
with idempotent re-sends. What a node needs from Redis to start
(connecting, the durability check) is :mod:`securechat.redis_link`'s.

Messages: one Lua script per batch of appends gives each new message the
next id (``INCR``), stores it (the body in a hash; its id in the history
sets of its room or conversation, and in the recipient's mailbox for a
direct message) and appends it to the log stream, whose entry id is the
message id: ids grow across the whole cluster in log order, and the log has
no gaps. A client id already used by that sender (within
:data:`~securechat.ledger.RECENT_SECONDS`) gets the original id back and
nothing is stored: re-sends are idempotent across nodes. Redis answers
after the write is in its append-only file (``appendfsync always``; the
node checks that at start), so an answer is durability.

Every node tails the log from where it stopped (``XREAD BLOCK``) and feeds
each message, in id order, to its hub; an append's ``then`` runs once this
node's tail has fed the message, so a sender's own connections get their
message before its ``ack``, as in one process. After a lost connection or
a Redis restart the tail resumes from its cursor: nothing skipped, nothing
twice.

Other servers' changes go through the same log, in the same order: room
state (a room saved, a member added or removed) is written together with an
event entry (one ``MULTI``), and the tail hands each event from another node
to the hub (:meth:`RedisStore.watch`); events take the id of the last message
with a sequence number of their own (``<id>-<n>``), so message ids stay dense.
Presence is per node: a hash of the users connected to it, refreshed every
third of ``presence_ttl`` and expiring if the node stops (it died); an event
for each user's first and last connection on a node makes a change visible at
once, and each node checks the others' hashes on the same beat, so that the
users of a node that vanished go offline within ``presence_ttl``. A kick is an
event for the nodes where the user is.

Keys share one hash tag (``{chat}``), so that every script may touch every
key (on Redis Cluster they all live in one slot; docs/cluster.md).
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import coredis
import trio
from coredis.exceptions import RedisError
from coredis.patterns.pipeline import Pipeline
from coredis.tokens import PureToken

from .ledger import RECENT_SECONDS
from .protocol import Message, trusted_message
from .store import (
    QUEUE_SIZE,
    AddMember,
    Appended,
    AppendMessage,
    AppendThen,
    Change,
    DeleteMessages,
    Draft,
    Feed,
    HereOnline,
    HistoryScope,
    LetGo,
    LoginFailures,
    MarkDelivered,
    Notice,
    OnlineElsewhere,
    PeerScope,
    Pruned,
    ReleaseSpace,
    RemoveMember,
    Retention,
    RoomScope,
    SaveRoom,
    Snapshot,
    Spent,
    StoredRoom,
    StoreError,
    StoreStats,
    Then,
    Watch,
    Write,
    commit_and_wait,
)

log = logging.getLogger("securechat.cluster")

PREFIX = "sc:{chat}:"
# The log stream keeps about this many entries: a node that falls further
# behind skips the oldest (it says so); its clients catch up from history.
LOG_LENGTH = 100_000
# durability = "replicated": how long a batch waits for its replicas before its
# answers are "unavailable" (the messages are kept; a re-send gets the same id).
REPLICA_TIMEOUT = 1.0
# What one batch, and one read of the log, may hold.
MAX_BATCH = 1024
TAIL_COUNT = 500
TAIL_BLOCK_MS = 1000
# Waits between attempts while Redis cannot be reached (the tail).
RETRY_DELAYS = (0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
# Notices (presence, kicks) waiting to be told; beyond that they are dropped
# (presence is then put right by the next beat).
NOTICE_QUEUE = 10_000

# A log entry's id: (the last message id, a sequence number; 0 for the message itself).
EntryId = tuple[int, int]
T = TypeVar("T")


def _entry_id(value: bytes | str) -> EntryId:
    ms, _, seq = _text(value).partition("-")
    return int(ms), int(seq or 0)


# KEYS[1]: the prefix's sequence key (so that the call is routed to its slot).
# ARGV: prefix, client-id lifetime, log length, then per draft:
#   sender, client id, room, to, body ("" for none).
# Returns each draft's message id (the original one for a re-send).
_APPEND = """
local prefix, ttl, maxlen = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local ids = {}
for i = 4, #ARGV, 5 do
  local sender, cid, room, to, body = ARGV[i], ARGV[i+1], ARGV[i+2], ARGV[i+3], ARGV[i+4]
  local cidkey = nil
  local id = nil
  if cid ~= "" then
    cidkey = prefix .. "cid:" .. sender .. "\\n" .. cid
    id = redis.call("GET", cidkey)
  end
  if id then
    ids[#ids + 1] = tonumber(id)
  else
    id = redis.call("INCR", KEYS[1])
    redis.call("HSET", prefix .. "msg", id, body)
    redis.call("ZADD", prefix .. "all", id, id)
    if room ~= "" then
      redis.call("ZADD", prefix .. "room:" .. room, id, id)
      redis.call("SADD", prefix .. "msgrooms", room)
    else
      local a, b = sender, to
      if b < a then a, b = b, a end
      redis.call("ZADD", prefix .. "dm:" .. a .. "\\n" .. b, id, id)
      redis.call("ZADD", prefix .. "dmu:" .. sender, id, id)
      if to ~= sender then redis.call("ZADD", prefix .. "dmu:" .. to, id, id) end
      redis.call("ZADD", prefix .. "undelivered:" .. to, id, id)
      redis.call("SADD", prefix .. "waiting", to)
    end
    if cidkey then redis.call("SET", cidkey, id, "EX", ttl) end
    redis.call("XADD", prefix .. "log", "MAXLEN", "~", maxlen, id .. "-0", "m", body)
    ids[#ids + 1] = id
  end
end
return ids
"""


# An event after the last message: KEYS[1] the message sequence, KEYS[2] the log;
# ARGV: log length, node, event (JSON). Returns the entry's id.
_EVENT = """
local last = redis.call("GET", KEYS[1]) or "0"
return redis.call("XADD", KEYS[2], "MAXLEN", "~", ARGV[1], last .. "-*", "e", ARGV[3], "n", ARGV[2])
"""


# The sequence is at least ARGV[1] (a message stored with an id of its own).
_RAISE_SEQ = """
if tonumber(redis.call("GET", KEYS[1]) or "0") < tonumber(ARGV[1]) then
  redis.call("SET", KEYS[1], ARGV[1])
end
"""


def _event(write: Write) -> dict[str, Any] | None:
    """The log event for the other nodes that a write of room state makes (None: none)."""
    if isinstance(write, SaveRoom):
        allowed = None if write.allowed is None else sorted(write.allowed)
        return {
            "t": "room",
            "name": write.name,
            "topic": write.topic,
            "allowed": allowed,
            "by": write.by,
        }
    if isinstance(write, AddMember):
        return {"t": "join", "room": write.room, "user": write.username}
    if isinstance(write, RemoveMember):
        return {"t": "part", "room": write.room, "user": write.username}
    return None


def _body(draft: Draft) -> str:
    fields: dict[str, Any] = {"sender": draft.sender, "text": draft.text, "ts": draft.ts}
    if draft.room is not None:
        fields["room"] = draft.room
    if draft.to is not None:
        fields["to"] = draft.to
    if draft.action:
        fields["action"] = True
    return json.dumps(fields, ensure_ascii=False, separators=(",", ":"))


def _message(id_: int, body: bytes | str) -> Message:
    fields = json.loads(body)
    return trusted_message(
        id_,
        fields.get("room"),
        fields.get("to"),
        fields["sender"],
        fields["text"],
        bool(fields.get("action")),
        fields["ts"],
    )


def _reason(exc: BaseException) -> str:
    """What went wrong, in one short line: coredis quotes a failed pipeline's commands
    (scripts and all) before the cause, which is what a log line needs."""
    text = str(exc).rsplit("caused error: ", 1)[-1].strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _pair(a: str, b: str) -> str:
    return "\n".join(sorted((a, b)))


class _NotReplicated(StoreError):
    pass


class _Append:
    __slots__ = ("draft", "then")

    def __init__(self, draft: Draft, then: AppendThen) -> None:
        self.draft = draft
        self.then = then


_Queued = tuple[tuple[Write, ...], Then] | _Append


class RedisStore:
    """A :class:`~securechat.store.Store` in Redis, shared by every node of a cluster.

    ``client`` serves the writer and reads; ``tail_client`` only the log's blocking
    reads (a blocking read holds its connection). Both are entered by the caller,
    in a task that outlives the store's :meth:`run`. ``node`` names this server in
    the cluster (default: a new random name each start); ``presence_ttl`` is how
    long its users stay online for the others after it stops answering. With
    ``wait_replicas`` (``[cluster] durability = "replicated"``), a batch is answered
    only once that many replicas have it too (``WAIT``, at most
    :data:`REPLICA_TIMEOUT`); otherwise its answers are ``unavailable``.
    """

    shared = True

    def __init__(
        self,
        client: coredis.Redis[bytes],
        tail_client: coredis.Redis[bytes],
        *,
        prefix: str = PREFIX,
        node: str | None = None,
        presence_ttl: float = 15.0,
        wait_replicas: int = 0,
    ) -> None:
        self._client = client
        self._tail_client = tail_client
        self._prefix = prefix
        self.node = node or secrets.token_hex(6)
        self.presence_ttl = presence_ttl
        self.wait_replicas = wait_replicas
        self._send, self._receive = trio.open_memory_channel[_Queued](QUEUE_SIZE)
        self._closed = False
        self._feed: Feed | None = None
        self._watch: Watch | None = None
        self._cursor: EntryId = (0, 0)  # the last log entry fed
        self._last_message = 0  # the id of the last message fed
        # The last log entry of a write Redis has answered (an append's, an event's).
        self._barrier: EntryId = (0, 0)
        # Presence: the users connected here; the other nodes' users (what their
        # hashes and events said), and for each user the nodes they are on.
        self._here: set[str] = set()
        self._nodes: dict[str, set[str]] = {}
        self._where: dict[str, set[str]] = {}
        self._notices, self._notices_out = trio.open_memory_channel[Notice](NOTICE_QUEUE)
        self._presence_lost = False  # a change of ours may not have reached Redis
        # Answers waiting for the tail to feed up to an id, in commit order:
        # (that id, then, its outcome).
        self._unsettled: deque[tuple[EntryId, Any, Any]] = deque()
        self._settled = trio.Event()
        self._redis_down = False
        self.stats = StoreStats()

    def _key(self, name: str) -> str:
        return self._prefix + name

    # Every request to Redis goes through one of these two, which count it (one round
    # trip) and its failure under ``op``: "write" (the writer's batches), "tail" (reads
    # of the log), "presence" (presence, kicks and shared limits told; the beat),
    # "read" (history, stored direct messages), "load", "prune".

    async def _request(self, op: str, request: Awaitable[T]) -> T:
        self.stats.requests[op] += 1
        try:
            return await request
        except (RedisError, OSError):
            self.stats.request_errors[op] += 1
            raise

    @asynccontextmanager
    async def _pipeline(self, op: str, *, transaction: bool) -> AsyncIterator[Pipeline[bytes]]:
        """A pipeline (a MULTI/EXEC with ``transaction``), sent at the end of the block."""
        self.stats.requests[op] += 1
        try:
            async with self._client.pipeline(transaction=transaction) as pipe:
                yield pipe
        except (RedisError, OSError):
            self.stats.request_errors[op] += 1
            raise

    # -- start-up and lifetime --

    async def load(self, *, recent_per_user: int, recent_since: str) -> Snapshot:
        """The stored state. Re-sends are recognised by Redis itself (within
        RECENT_SECONDS), so the snapshot lists no recent sends; the feed starts after
        the last message stored now."""
        try:
            client, load = self._client, "load"
            last = int(await self._request(load, client.get(self._key("seq"))) or 0)
            await self._load_nodes()
            stored_rooms = await self._request(load, client.hgetall(self._key("rooms")))
            member_rooms = await self._request(load, client.smembers(self._key("memberrooms")))
            memberships: dict[str, frozenset[str]] = {}
            for room in member_rooms:
                users = await self._request(
                    load, client.smembers(self._key("members:" + _text(room)))
                )
                if users:
                    memberships[_text(room)] = frozenset(_text(user) for user in users)
            waiting = [
                user
                for user in await self._request(load, client.smembers(self._key("waiting")))
                if await self._request(load, client.zcard(self._key("undelivered:" + _text(user))))
            ]
        except (RedisError, OSError) as exc:
            raise StoreError(f"cannot read the chat's state from Redis: {exc}") from exc
        rooms = {}
        for name, value in stored_rooms.items():
            saved = json.loads(value)
            allowed = saved.get("allowed")
            rooms[_text(name)] = StoredRoom(
                saved.get("topic", ""), None if allowed is None else frozenset(allowed)
            )
        # Events after ``last`` are read again by the tail: each of them is already in
        # this snapshot, and applying one again changes nothing.
        self._cursor = max(self._cursor, (last, 0))
        self._last_message = max(self._last_message, last)
        return Snapshot(
            last_message_id=last,
            rooms=rooms,
            memberships=memberships,
            undelivered_to=frozenset(_text(user) for user in waiting),
            online_elsewhere=frozenset(self._where),
        )

    async def _load_nodes(self) -> None:
        """The other nodes' users, from their presence hashes (those that expired are gone)."""
        for node in await self._request("load", self._client.smembers(self._key("nodes"))):
            name = _text(node)
            if name == self.node:
                continue
            users = await self._request("load", self._client.hkeys(self._key("node:" + name)))
            for user in users:
                self._node_user(name, _text(user), True)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The writer and the tail of the log, until :meth:`close`; then the writer
        writes what is queued, and the appends it answered wait (a bounded time) for
        the tail to feed them."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._tail)
            nursery.start_soon(self._tell_loop)
            nursery.start_soon(self._beat)
            task_status.started()
            await self._write()
            with trio.move_on_after(RETRY_DELAYS[-1]):
                while self._unsettled:
                    await self._settled.wait()
            # Committed, though not fed here: answered all the same (ack => durable).
            while self._unsettled:
                _, then, outcome = self._unsettled.popleft()
                self._call(then, outcome)
            nursery.cancel_scope.cancel()
        with trio.move_on_after(RETRY_DELAYS[-1]) as leaving:
            leaving.shield = True
            await self._leave()

    async def _leave(self) -> None:
        """A clean stop: the others see this node's users offline now, not after the ttl."""
        try:
            async with self._pipeline("presence", transaction=True) as pipe:
                pipe.delete([self._key("node:" + self.node)])
                pipe.srem(self._key("nodes"), [self.node])
                pipe.eval(
                    _EVENT,
                    keys=[self._key("seq"), self._key("log")],
                    args=[LOG_LENGTH, self.node, json.dumps({"t": "gone"})],
                )
        except (RedisError, OSError) as exc:
            log.warning("could not tell the cluster this node stops: %s", _reason(exc))

    def close(self) -> None:
        self._closed = True
        self._send.close()
        self._notices.close()

    def feed(self, apply: Feed) -> None:
        self._feed = apply

    def watch(self, apply: Watch) -> None:
        self._watch = apply

    def tell(self, notice: Notice) -> None:
        if isinstance(notice, HereOnline):
            if notice.online:
                self._here.add(notice.username)
            else:
                self._here.discard(notice.username)
        try:
            self._notices.send_nowait(notice)
        except (trio.WouldBlock, trio.ClosedResourceError):
            self._presence_lost = True  # the next beat puts presence right

    # -- writes --

    async def commit(self, *writes: Write) -> None:
        await commit_and_wait(self.commit_then, writes)

    async def commit_then(self, writes: Write | tuple[Write, ...], then: Then) -> None:
        item = (writes if isinstance(writes, tuple) else (writes,), then)
        await self._queue(item, lambda: then(StoreError("the store is closed")))

    def commit_then_nowait(self, writes: Write | tuple[Write, ...], then: Then) -> None:
        if self._closed:
            then(StoreError("the store is closed"))
            return
        self._send.send_nowait((writes if isinstance(writes, tuple) else (writes,), then))

    async def append(self, draft: Draft, then: AppendThen) -> None:
        await self._queue(_Append(draft, then), lambda: then(StoreError("the store is closed")))

    async def _queue(self, item: _Queued, refuse: Callable[[], None]) -> None:
        if self._closed:
            refuse()
            return
        try:
            self._send.send_nowait(item)
        except trio.WouldBlock:
            try:
                await self._send.send(item)
            except trio.ClosedResourceError:
                refuse()

    async def _write(self) -> None:
        """Each batch of queued writes as one transaction (MULTI/EXEC), appends as one
        script call in it; answered once Redis has it on disk."""
        batch: list[_Queued] = []
        async with self._receive:
            while True:
                try:
                    batch.append(await self._receive.receive())
                except trio.EndOfChannel:
                    return
                await trio.lowlevel.checkpoint()  # let the others woken meanwhile queue too
                while len(batch) < MAX_BATCH:
                    try:
                        batch.append(self._receive.receive_nowait())
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                await self._commit(batch)
                batch = []

    async def _commit(self, batch: list[_Queued]) -> None:
        # The other writes first: if one is refused, no message of the batch is
        # stored either, and every answer is the error. (Those are idempotent.)
        appends = [item for item in batch if isinstance(item, _Append)]
        failure: StoreError | None = None
        events: list[EntryId] = []  # each unit's last log entry (its events')
        started = time.perf_counter()
        try:
            for item in batch:
                if not isinstance(item, _Append):
                    events.append(await self._apply(item[0]))
            ids = iter(await self._run_appends(appends) if appends else [])
            if self.wait_replicas:
                await self._replicated()
        except _NotReplicated as exc:  # like Redis away: one line per change of state
            self._redis_state(down=True, error=exc)
            failure = exc
        except StoreError as exc:  # a write that cannot be applied
            log.error("Redis write refused (batch of %d): %s", len(batch), exc)
            failure = exc
        except (RedisError, OSError) as exc:
            self._redis_state(down=True, error=exc)
            failure = StoreError(f"Redis: {_reason(exc)}")
        self.stats.commit_seconds.observe(time.perf_counter() - started)
        self.stats.batch_units.observe(len(batch))
        if failure is not None:
            self.stats.failed_commits += 1
            for item in batch:
                self._call(item.then if isinstance(item, _Append) else item[1], failure)
            return
        self._redis_state(down=False)
        # Answered in queue order, each once the tail has fed every message appended
        # up to it: what follows an answer (an ack, code after ``await commit``) comes
        # after the fan-out of everything committed before, as in one process.
        # The units went first, then the appends: their entries are in that order.
        units = iter(events)
        for item in batch:
            if not isinstance(item, _Append):
                self._barrier = max(self._barrier, next(units))
                self._unsettled.append((self._barrier, item[1], None))
        for item in batch:
            if isinstance(item, _Append):
                id_ = next(ids)
                self._barrier = max(self._barrier, (id_, 0))
                self._unsettled.append((self._barrier, item.then, Appended(id_)))
        self._settle()

    async def _replicated(self) -> None:
        """Wait until ``wait_replicas`` replicas have everything written so far.

        ``WAIT`` counts the writes of its own connection, and the pool may have
        sent the batch over others: so a write of its own goes first, which the
        replication stream carries after everything written before it.
        """
        async with self._pipeline("write", transaction=False) as pipe:
            pipe.incr(self._key("replicated"))
            confirmed = pipe.wait(self.wait_replicas, int(REPLICA_TIMEOUT * 1000))
        count = await confirmed
        if count < self.wait_replicas:
            raise _NotReplicated(
                f"Redis: {count} of {self.wait_replicas} replica(s) confirmed the write"
                f" within {REPLICA_TIMEOUT:g} s"
            )

    async def _run_appends(self, appends: list[_Append]) -> list[int]:
        args: list[str | int] = [self._prefix, int(RECENT_SECONDS), LOG_LENGTH]
        for item in appends:
            draft = item.draft
            args += [
                draft.sender,
                draft.client_id or "",
                draft.room or "",
                draft.to or "",
                _body(draft),
            ]
        ids = await self._request(
            "write", self._client.eval(_APPEND, keys=[self._key("seq")], args=args)
        )
        assert isinstance(ids, list | tuple)
        return [int(id_) for id_ in ids]

    async def _apply(self, writes: tuple[Write, ...]) -> EntryId:
        """One unit of writes other than appends, in one MULTI/EXEC, with an event in the
        log for each change of room state; returns the last event's entry (or (0, 0))."""
        ids = [
            id_
            for write in writes
            if isinstance(write, DeleteMessages | MarkDelivered)
            for id_ in write.ids
        ]
        bodies = await self._bodies(ids, "write")
        for write in writes:
            if isinstance(write, AppendMessage) and await self._request(
                "write", self._client.hexists(self._key("msg"), str(write.message.id))
            ):
                raise StoreError(f"Redis: UNIQUE constraint failed: message {write.message.id}")
        topics: dict[str, str] = {}
        for write in writes:
            if isinstance(write, SaveRoom) and write.topic is None:
                # The stored topic stays (a concurrent topic change on another node
                # between this read and the write is lost: the config's rooms only).
                stored = await self._request(
                    "write", self._client.hget(self._key("rooms"), write.name)
                )
                topics[write.name] = json.loads(stored).get("topic", "") if stored else ""
        events = []
        async with self._pipeline("write", transaction=True) as pipe:
            for write in writes:
                self._queue_write(pipe, write, bodies, topics)
                if (event := _event(write)) is not None:
                    events.append(self._queue_event(pipe, event))
        return max([_entry_id(await entry) for entry in events], default=(0, 0))

    def _queue_event(self, pipe: Any, event: dict[str, Any]) -> Any:
        return pipe.eval(
            _EVENT,
            keys=[self._key("seq"), self._key("log")],
            args=[LOG_LENGTH, self.node, json.dumps(event, ensure_ascii=False)],
        )

    async def _bodies(self, ids: list[int], op: str) -> dict[int, Message]:
        if not ids:
            return {}
        values = await self._request(
            op, self._client.hmget(self._key("msg"), [str(id_) for id_ in ids])
        )
        return {id_: _message(id_, value) for id_, value in zip(ids, values, strict=True) if value}

    def _queue_write(
        self, pipe: Any, write: Write, bodies: dict[int, Message], topics: dict[str, str]
    ) -> None:
        key = self._key
        if isinstance(write, AppendMessage):
            # Messages with ids of their own (imported history): no log entry.
            message = write.message
            body = json.dumps(
                {
                    k: v
                    for k, v in {
                        "sender": message.sender,
                        "text": message.text,
                        "ts": message.ts,
                        "room": message.room,
                        "to": message.to,
                        "action": True if message.action else None,
                    }.items()
                    if v is not None
                },
                ensure_ascii=False,
            )
            id_ = message.id
            pipe.eval(_RAISE_SEQ, keys=[key("seq")], args=[id_])
            pipe.hset(key("msg"), {str(id_): body})
            pipe.zadd(key("all"), {str(id_): id_})
            if message.room is not None:
                pipe.zadd(key("room:" + message.room), {str(id_): id_})
                pipe.sadd(key("msgrooms"), [message.room])
            else:
                assert message.to is not None
                pipe.zadd(key("dm:" + _pair(message.sender, message.to)), {str(id_): id_})
                pipe.zadd(key("dmu:" + message.sender), {str(id_): id_})
                pipe.zadd(key("dmu:" + message.to), {str(id_): id_})
                if not write.delivered:
                    pipe.zadd(key("undelivered:" + message.to), {str(id_): id_})
                    pipe.sadd(key("waiting"), [message.to])
            if write.client_id is not None:
                pipe.set(
                    key(f"cid:{message.sender}\n{write.client_id}"),
                    str(id_),
                    ex=int(RECENT_SECONDS),
                )
        elif isinstance(write, MarkDelivered):
            for id_ in write.ids:
                if (found := bodies.get(id_)) is not None and found.to is not None:
                    pipe.zrem(key("undelivered:" + found.to), [str(id_)])
        elif isinstance(write, DeleteMessages):
            for id_ in write.ids:
                found = bodies.get(id_)
                pipe.hdel(key("msg"), [str(id_)])
                pipe.zrem(key("all"), [str(id_)])
                if found is None:
                    continue
                if found.room is not None:
                    pipe.zrem(key("room:" + found.room), [str(id_)])
                elif found.to is not None:
                    pipe.zrem(key("dm:" + _pair(found.sender, found.to)), [str(id_)])
                    pipe.zrem(key("dmu:" + found.sender), [str(id_)])
                    pipe.zrem(key("dmu:" + found.to), [str(id_)])
                    pipe.zrem(key("undelivered:" + found.to), [str(id_)])
        elif isinstance(write, SaveRoom):
            topic = write.topic if write.topic is not None else topics.get(write.name, "")
            allowed = None if write.allowed is None else sorted(write.allowed)
            pipe.hset(key("rooms"), {write.name: json.dumps({"topic": topic, "allowed": allowed})})
        elif isinstance(write, AddMember):
            pipe.sadd(key("members:" + write.room), [write.username])
            pipe.sadd(key("memberrooms"), [write.room])
        elif isinstance(write, RemoveMember):
            pipe.srem(key("members:" + write.room), [write.username])
        else:
            assert isinstance(write, ReleaseSpace)  # Redis gives memory back itself

    def _call(self, then: Any, outcome: Any) -> None:
        try:
            then(outcome)
        except Exception:
            log.exception("store callback failed")

    def _redis_state(self, *, down: bool, error: BaseException | None = None) -> None:
        if down and not self._redis_down:
            reason = "?" if error is None else _reason(error)
            log.error("Redis unavailable: %s (sends are refused until it is back)", reason)
        elif not down and self._redis_down:
            log.warning("Redis available again")
        self._redis_down = down

    # -- the tail of the log --

    async def _tail(self) -> None:
        failures = 0
        while True:
            try:
                found = await self._request(
                    "tail",
                    self._tail_client.xread(
                        {self._key("log"): "{}-{}".format(*self._cursor)},
                        count=TAIL_COUNT,
                        block=TAIL_BLOCK_MS,
                    ),
                )
            except (RedisError, OSError) as exc:
                if failures == 0:
                    log.error("cannot read the message log from Redis: %s (retrying)", _reason(exc))
                await trio.sleep(RETRY_DELAYS[min(failures, len(RETRY_DELAYS) - 1)])
                failures += 1
                continue
            if failures:
                log.warning("reading the message log again after %d failed attempts", failures)
                failures = 0
            for entries in (found or {}).values():
                for entry in entries:
                    self._feed_entry(_entry_id(entry.identifier), entry.field_values)
            self._settle()

    def _feed_entry(self, entry: EntryId, fields: Any) -> None:
        if entry <= self._cursor:
            return
        self._cursor = entry
        body = fields.get(b"m", fields.get("m"))
        if body is not None:
            self._feed_message(entry[0], body)
            return
        event = fields.get(b"e", fields.get("e"))
        node = fields.get(b"n", fields.get("n"))
        if event is not None and node is not None and _text(node) != self.node:
            try:
                self._apply_event(_text(node), json.loads(event))
            except Exception:
                log.exception("applying log entry %d-%d failed", *entry)

    def _feed_message(self, id_: int, body: bytes | str) -> None:
        if id_ <= self._last_message:
            return
        if id_ != self._last_message + 1 and self._last_message:
            log.error(
                "the message log no longer holds messages %d to %d (this node fell behind"
                " by more than %d); clients catch up from history",
                self._last_message + 1,
                id_ - 1,
                LOG_LENGTH,
            )
        self._last_message = id_
        if self._feed is not None:
            try:
                self._feed(_message(id_, body))
            except Exception:
                log.exception("feeding message %d failed", id_)

    def _apply_event(self, node: str, event: dict[str, Any]) -> None:
        """Another node's event: room state to the hub; presence here first."""
        kind = event.get("t")
        if kind == "room":
            allowed = event.get("allowed")
            self._tell_hub(
                SaveRoom(
                    event["name"],
                    event.get("topic"),
                    None if allowed is None else frozenset(allowed),
                    by=event.get("by"),
                )
            )
        elif kind == "join":
            self._tell_hub(AddMember(event["room"], event["user"]))
        elif kind == "part":
            self._tell_hub(RemoveMember(event["room"], event["user"]))
        elif kind == "kick":
            self._tell_hub(LetGo(event["user"], event["message"]))
        elif kind == "spent":
            costs = tuple((user, rate, float(cost)) for user, rate, cost in event["costs"])
            self._tell_hub(Spent(costs))
        elif kind == "logins":
            failed = tuple(tuple(keys) for keys in event["failed"])
            self._tell_hub(LoginFailures(failed, tuple(event["cleared"])))
        elif kind == "on":
            self._node_user(node, event["user"], True)
        elif kind == "off":
            self._node_user(node, event["user"], False)
        elif kind == "sync":
            self._node_users(node, set(event["users"]))
        elif kind == "gone":
            self._node_users(node, set())

    def _tell_hub(self, change: Change) -> None:
        # (The server routes what concerns limits to them, the rest to its hub.)
        if self._watch is not None:
            self._watch(change)

    # -- presence --

    def _node_user(self, node: str, user: str, online: bool) -> None:
        users = self._nodes.setdefault(node, set())
        if online:
            users.add(user)
        else:
            users.discard(user)
            if not users:
                del self._nodes[node]
        nodes = self._where.get(user)
        was_elsewhere = bool(nodes)
        if online:
            self._where.setdefault(user, set()).add(node)
        elif nodes is not None:
            nodes.discard(node)
            if not nodes:
                del self._where[user]
        if bool(self._where.get(user)) != was_elsewhere:
            self._tell_hub(OnlineElsewhere(user, online))

    def _node_users(self, node: str, users: set[str]) -> None:
        """``node``'s users are now exactly ``users`` (a resync, or none: it is gone)."""
        had = self._nodes.get(node, set())
        for user in sorted(had - users):
            self._node_user(node, user, False)
        for user in sorted(users - had):
            self._node_user(node, user, True)

    async def _tell_loop(self) -> None:
        """Pass on what the hub tells the others: presence changes here, kicks."""
        async with self._notices_out:
            async for first in self._notices_out:
                notices = [first]
                while len(notices) < MAX_BATCH:
                    try:
                        notices.append(self._notices_out.receive_nowait())
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                try:
                    await self._tell_all(notices)
                except (RedisError, OSError) as exc:
                    if not self._presence_lost:
                        log.error("cannot tell the cluster about presence: %s", _reason(exc))
                    self._presence_lost = True

    async def _tell_all(self, notices: list[Notice]) -> None:
        here = self._key("node:" + self.node)
        async with self._pipeline("presence", transaction=True) as pipe:
            for notice in notices:
                event: dict[str, Any]
                if isinstance(notice, LetGo):
                    event = {"t": "kick", "user": notice.username, "message": notice.message}
                elif isinstance(notice, Spent):
                    event = {"t": "spent", "costs": notice.costs}
                elif isinstance(notice, LoginFailures):
                    event = {"t": "logins", "failed": notice.failed, "cleared": notice.cleared}
                elif notice.online:
                    pipe.hset(here, {notice.username: "1"})
                    event = {"t": "on", "user": notice.username}
                else:
                    pipe.hdel(here, [notice.username])
                    event = {"t": "off", "user": notice.username}
                self._queue_event(pipe, event)
            pipe.pexpire(here, int(self.presence_ttl * 1000))
            pipe.sadd(self._key("nodes"), [self.node])

    async def _beat(self) -> None:
        """Every third of the ttl: keep this node's presence alive (and put it right
        after a failure), and drop the users of nodes whose presence expired."""
        while True:
            await trio.sleep(self.presence_ttl / 3)
            try:
                await self._keep_alive()
                await self._sweep()
            except (RedisError, OSError) as exc:
                if not self._presence_lost:
                    log.error("cannot refresh presence in Redis: %s", _reason(exc))
                self._presence_lost = True

    async def _keep_alive(self) -> None:
        here = self._key("node:" + self.node)
        ttl_ms = int(self.presence_ttl * 1000)
        presence = "presence"
        if not self._presence_lost and (
            await self._request(presence, self._client.pexpire(here, ttl_ms)) or not self._here
        ):
            await self._request(presence, self._client.sadd(self._key("nodes"), [self.node]))
            return
        # Lost, or expired while Redis was away: write it again, and tell the others.
        users = sorted(self._here)
        async with self._pipeline(presence, transaction=True) as pipe:
            pipe.delete([here])
            if users:
                pipe.hset(here, dict.fromkeys(users, "1"))
                pipe.pexpire(here, ttl_ms)
            pipe.sadd(self._key("nodes"), [self.node])
            self._queue_event(pipe, {"t": "sync", "users": users})
        if self._presence_lost:
            log.warning("presence in Redis is up to date again")
        self._presence_lost = False

    async def _sweep(self) -> None:
        client, presence = self._client, "presence"
        nodes = await self._request(presence, client.smembers(self._key("nodes")))
        listed = {_text(node) for node in nodes}
        for node in sorted((listed | set(self._nodes)) - {self.node}):
            if await self._request(presence, client.exists([self._key("node:" + node)])):
                if node not in self._nodes:  # started (or came back) unseen
                    users = await self._request(presence, client.hkeys(self._key("node:" + node)))
                    self._node_users(node, {_text(user) for user in users})
                continue
            if node in self._nodes:
                log.warning("node %s stopped answering: its users are offline", node)
            self._node_users(node, set())
            await self._request(presence, client.srem(self._key("nodes"), [node]))

    def _settle(self) -> None:
        while self._unsettled and self._unsettled[0][0] <= self._cursor:
            _, then, outcome = self._unsettled.popleft()
            self._call(then, outcome)
        self._settled.set()
        self._settled = trio.Event()

    # -- reads --

    async def _read_ids(
        self, key: str, after: int | None, limit: int, through: int | None = None
    ) -> list[int]:
        """Up to ``limit`` ids of the sorted set ``key``: the first after ``after`` (up to
        ``through``), or without ``after`` the latest."""
        top = "+inf" if through is None else str(through)
        try:
            if after is None:
                found = await self._request(
                    "read",
                    self._client.zrange(
                        key, top, "-inf", sortby=PureToken.BYSCORE, rev=True, offset=0, count=limit
                    ),
                )
                return sorted(int(_text(value)) for value in found)
            found = await self._request(
                "read",
                self._client.zrange(
                    key, f"({after}", top, sortby=PureToken.BYSCORE, offset=0, count=limit
                ),
            )
            return [int(_text(value)) for value in found]
        except (RedisError, OSError) as exc:
            raise StoreError(f"Redis: {_reason(exc)}") from exc

    async def history_ids(self, scope: HistoryScope, after: int | None, limit: int) -> list[int]:
        if limit <= 0:
            return []
        if isinstance(scope, RoomScope):
            keys = [self._key("room:" + scope.room)]
        elif isinstance(scope, PeerScope):
            keys = [self._key("dm:" + _pair(scope.user, scope.peer))]
        else:
            keys = [self._key("room:" + room) for room in scope.rooms]
            keys.append(self._key("dmu:" + scope.user))
        ids: set[int] = set()
        for key in keys:
            ids.update(await self._read_ids(key, after, limit))
        ordered = sorted(ids)
        return ordered[-limit:] if after is None else ordered[:limit]

    async def messages(self, ids: Sequence[int], *, max_chars: int | None = None) -> list[Message]:
        if not ids:
            return []
        ordered = sorted(set(ids))
        try:
            bodies = await self._bodies(ordered, "read")
        except (RedisError, OSError) as exc:
            raise StoreError(f"Redis: {_reason(exc)}") from exc
        taken: list[Message] = []
        chars = 0
        for id_ in ordered:
            if (message := bodies.get(id_)) is None:
                continue
            taken.append(message)
            chars += len(message.text)
            if max_chars is not None and chars >= max_chars:
                break
        return taken

    async def undelivered(
        self,
        user: str,
        after: int = 0,
        limit: int = 10_000,
        *,
        through: int | None = None,
        max_chars: int | None = None,
    ) -> list[Message]:
        ids = await self._read_ids(self._key("undelivered:" + user), after, limit, through)
        return await self.messages(ids, max_chars=max_chars)

    # -- retention --

    async def prune(self, retention: Retention, now: float) -> Pruned:
        by_age = by_room = 0
        cutoff = retention.cutoff(now)
        try:
            if cutoff is not None:
                while True:
                    found = await self._request(
                        "prune", self._client.zrange(self._key("all"), 0, 255)
                    )
                    ids = [int(_text(value)) for value in found]
                    old = [m.id for m in await self.messages(ids) if m.ts < cutoff]
                    if old:
                        await self.commit(DeleteMessages(tuple(old)))
                        by_age += len(old)
                    if len(old) < len(ids) or not ids:
                        break
            if retention.per_room:
                rooms = await self._request("prune", self._client.smembers(self._key("msgrooms")))
                for room in rooms:
                    key = self._key("room:" + _text(room))
                    excess = await self._request("prune", self._client.zcard(key))
                    excess -= retention.per_room
                    if excess > 0:
                        found = await self._request(
                            "prune", self._client.zrange(key, 0, excess - 1)
                        )
                        excess_ids = tuple(int(_text(value)) for value in found)
                        await self.commit(DeleteMessages(excess_ids))
                        by_room += len(excess_ids)
        except (RedisError, OSError) as exc:
            raise StoreError(f"Redis: {_reason(exc)}") from exc
        return Pruned(by_age=by_age, by_room=by_room)
