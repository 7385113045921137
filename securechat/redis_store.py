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

Keys share one hash tag (``{chat}``), so that every script may touch every
key (on Redis Cluster they all live in one slot; docs/cluster.md).
"""

from __future__ import annotations

import json
import logging
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import coredis
import trio
from coredis.exceptions import RedisError
from coredis.tokens import PureToken

from .ledger import RECENT_SECONDS
from .protocol import Message, trusted_message
from .store import (
    QUEUE_SIZE,
    AddMember,
    Appended,
    AppendMessage,
    AppendThen,
    DeleteMessages,
    Draft,
    Feed,
    HistoryScope,
    MarkDelivered,
    PeerScope,
    Pruned,
    ReleaseSpace,
    RemoveMember,
    Retention,
    RoomScope,
    SaveRoom,
    Snapshot,
    StoredRoom,
    StoreError,
    Then,
    Write,
    commit_and_wait,
)

log = logging.getLogger("securechat.cluster")

PREFIX = "sc:{chat}:"
# The log stream keeps about this many entries: a node that falls further
# behind skips the oldest (it says so); its clients catch up from history.
LOG_LENGTH = 100_000
# What one batch, and one read of the log, may hold.
MAX_BATCH = 1024
TAIL_COUNT = 500
TAIL_BLOCK_MS = 1000
# Waits between attempts while Redis cannot be reached (the tail).
RETRY_DELAYS = (0.1, 0.2, 0.5, 1.0, 2.0, 5.0)

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


# The sequence is at least ARGV[1] (a message stored with an id of its own).
_RAISE_SEQ = """
if tonumber(redis.call("GET", KEYS[1]) or "0") < tonumber(ARGV[1]) then
  redis.call("SET", KEYS[1], ARGV[1])
end
"""


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


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _pair(a: str, b: str) -> str:
    return "\n".join(sorted((a, b)))


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
    in a task that outlives the store's :meth:`run`.
    """

    def __init__(
        self,
        client: coredis.Redis[bytes],
        tail_client: coredis.Redis[bytes],
        *,
        prefix: str = PREFIX,
    ) -> None:
        self._client = client
        self._tail_client = tail_client
        self._prefix = prefix
        self._send, self._receive = trio.open_memory_channel[_Queued](QUEUE_SIZE)
        self._closed = False
        self._feed: Feed | None = None
        self._cursor = 0  # the id of the last message fed
        # The highest id Redis has answered an append with.
        self._barrier = 0
        # Answers waiting for the tail to feed up to an id, in commit order:
        # (that id, then, its outcome).
        self._unsettled: deque[tuple[int, Any, Any]] = deque()
        self._settled = trio.Event()
        self._redis_down = False

    def _key(self, name: str) -> str:
        return self._prefix + name

    # -- start-up and lifetime --

    async def load(self, *, recent_per_user: int, recent_since: str) -> Snapshot:
        """The stored state. Re-sends are recognised by Redis itself (within
        RECENT_SECONDS), so the snapshot lists no recent sends; the feed starts after
        the last message stored now."""
        try:
            last = int(await self._client.get(self._key("seq")) or 0)
            stored_rooms = await self._client.hgetall(self._key("rooms"))
            member_rooms = await self._client.smembers(self._key("memberrooms"))
            memberships: dict[str, frozenset[str]] = {}
            for room in member_rooms:
                users = await self._client.smembers(self._key("members:" + _text(room)))
                if users:
                    memberships[_text(room)] = frozenset(_text(user) for user in users)
            waiting = [
                user
                for user in await self._client.smembers(self._key("waiting"))
                if await self._client.zcard(self._key("undelivered:" + _text(user)))
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
        self._cursor = max(self._cursor, last)
        return Snapshot(
            last_message_id=last,
            rooms=rooms,
            memberships=memberships,
            undelivered_to=frozenset(_text(user) for user in waiting),
        )

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The writer and the tail of the log, until :meth:`close`; then the writer
        writes what is queued, and the appends it answered wait (a bounded time) for
        the tail to feed them."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._tail)
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

    def close(self) -> None:
        self._closed = True
        self._send.close()

    def feed(self, apply: Feed) -> None:
        self._feed = apply

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
        try:
            for item in batch:
                if not isinstance(item, _Append):
                    await self._apply(item[0])
            ids = iter(await self._run_appends(appends) if appends else [])
        except StoreError as exc:  # a write that cannot be applied
            log.error("Redis write refused (batch of %d): %s", len(batch), exc)
            failure = exc
        except (RedisError, OSError) as exc:
            self._redis_state(down=True, error=exc)
            failure = StoreError(f"Redis: {exc}")
        if failure is not None:
            for item in batch:
                self._call(item.then if isinstance(item, _Append) else item[1], failure)
            return
        self._redis_state(down=False)
        # Answered in queue order, each once the tail has fed every message appended
        # up to it: what follows an answer (an ack, code after ``await commit``) comes
        # after the fan-out of everything committed before, as in one process.
        for item in batch:
            if isinstance(item, _Append):
                id_ = next(ids)
                self._barrier = max(self._barrier, id_)
                self._unsettled.append((self._barrier, item.then, Appended(id_)))
            else:
                self._unsettled.append((self._barrier, item[1], None))
        self._settle()

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
        ids = await self._client.eval(_APPEND, keys=[self._key("seq")], args=args)
        assert isinstance(ids, list | tuple)
        return [int(id_) for id_ in ids]

    async def _apply(self, writes: tuple[Write, ...]) -> None:
        """One unit of writes other than appends, in one MULTI/EXEC."""
        ids = [
            id_
            for write in writes
            if isinstance(write, DeleteMessages | MarkDelivered)
            for id_ in write.ids
        ]
        bodies = await self._bodies(ids)
        for write in writes:
            if isinstance(write, AppendMessage) and await self._client.hexists(
                self._key("msg"), str(write.message.id)
            ):
                raise StoreError(f"Redis: UNIQUE constraint failed: message {write.message.id}")
        topics: dict[str, str] = {}
        for write in writes:
            if isinstance(write, SaveRoom) and write.topic is None:
                # The stored topic stays (a concurrent topic change on another node
                # between this read and the write is lost: the config's rooms only).
                stored = await self._client.hget(self._key("rooms"), write.name)
                topics[write.name] = json.loads(stored).get("topic", "") if stored else ""
        async with self._client.pipeline(transaction=True) as pipe:
            for write in writes:
                self._queue_write(pipe, write, bodies, topics)

    async def _bodies(self, ids: list[int]) -> dict[int, Message]:
        if not ids:
            return {}
        values = await self._client.hmget(self._key("msg"), [str(id_) for id_ in ids])
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
            log.error("Redis unavailable: %s (sends are refused until it is back)", error)
        elif not down and self._redis_down:
            log.warning("Redis available again")
        self._redis_down = down

    # -- the tail of the log --

    async def _tail(self) -> None:
        failures = 0
        while True:
            try:
                found = await self._tail_client.xread(
                    {self._key("log"): f"{self._cursor}-0"}, count=TAIL_COUNT, block=TAIL_BLOCK_MS
                )
            except (RedisError, OSError) as exc:
                if failures == 0:
                    log.error("cannot read the message log from Redis: %s (retrying)", exc)
                await trio.sleep(RETRY_DELAYS[min(failures, len(RETRY_DELAYS) - 1)])
                failures += 1
                continue
            if failures:
                log.warning("reading the message log again after %d failed attempts", failures)
                failures = 0
            for entries in (found or {}).values():
                for entry in entries:
                    identifier = _text(entry.identifier)
                    self._feed_entry(int(identifier.split("-")[0]), entry.field_values)
            self._settle()

    def _feed_entry(self, id_: int, fields: Any) -> None:
        if id_ <= self._cursor:
            return
        if id_ != self._cursor + 1 and self._cursor:
            log.error(
                "the message log no longer holds messages %d to %d (this node fell behind"
                " by more than %d); clients catch up from history",
                self._cursor + 1,
                id_ - 1,
                LOG_LENGTH,
            )
        self._cursor = id_
        body = fields.get(b"m", fields.get("m"))
        if self._feed is not None and body is not None:
            try:
                self._feed(_message(id_, body))
            except Exception:
                log.exception("feeding message %d failed", id_)

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
                found = await self._client.zrange(
                    key, top, "-inf", sortby=PureToken.BYSCORE, rev=True, offset=0, count=limit
                )
                return sorted(int(_text(value)) for value in found)
            found = await self._client.zrange(
                key, f"({after}", top, sortby=PureToken.BYSCORE, offset=0, count=limit
            )
            return [int(_text(value)) for value in found]
        except (RedisError, OSError) as exc:
            raise StoreError(f"Redis: {exc}") from exc

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
            bodies = await self._bodies(ordered)
        except (RedisError, OSError) as exc:
            raise StoreError(f"Redis: {exc}") from exc
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
                    found = await self._client.zrange(self._key("all"), 0, 255)
                    ids = [int(_text(value)) for value in found]
                    old = [m.id for m in await self.messages(ids) if m.ts < cutoff]
                    if old:
                        await self.commit(DeleteMessages(tuple(old)))
                        by_age += len(old)
                    if len(old) < len(ids) or not ids:
                        break
            if retention.per_room:
                for room in await self._client.smembers(self._key("msgrooms")):
                    key = self._key("room:" + _text(room))
                    excess = await self._client.zcard(key) - retention.per_room
                    if excess > 0:
                        found = await self._client.zrange(key, 0, excess - 1)
                        excess_ids = tuple(int(_text(value)) for value in found)
                        await self.commit(DeleteMessages(excess_ids))
                        by_room += len(excess_ids)
        except (RedisError, OSError) as exc:
            raise StoreError(f"Redis: {exc}") from exc
        return Pruned(by_age=by_age, by_room=by_room)
