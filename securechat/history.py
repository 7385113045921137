"""History replays: a page of stored messages, read in chunks and paced by the connection.

A ``history`` request names a scope (a room, the direct messages with one
user, or everything the user can see) and a page (the latest ``limit``, or
``limit`` after an id). The page's ids come first (the store walks indexes
and stops at the limit); the messages are then read a few at a time, each
read after the previous one was queued and the connection had room for
more, so a page is never held whole. The user may leave a room while its
messages are replayed: those are not sent.
"""

from __future__ import annotations

import logging

from .delivery import READ_CHARS, READ_ROWS, Peer
from .protocol import ErrorCode, HistoryEnd, ProtocolError, encode
from .rooms import Rooms, not_member
from .store import HistoryScope, PeerScope, RoomScope, Store, StoreError, VisibleScope

log = logging.getLogger("securechat.hub")


async def replay(
    store: Store,
    rooms: Rooms,
    peer: Peer,
    *,
    room: str | None,
    with_user: str | None = None,
    after: int | None,
    limit: int,
    ref: str | None,
) -> None:
    """Replay a page of stored messages to ``peer``, then ``history_end``."""
    user = peer.username
    scope: HistoryScope
    if room is not None:
        if not rooms.is_member(user, room):
            raise not_member(room)
        scope = RoomScope(room)
    elif with_user is not None:
        scope = PeerScope(user, with_user)
    else:
        scope = VisibleScope(user, tuple(rooms.of(user)))
    try:
        # One more than asked for tells whether there is more.
        ids = await store.history_ids(scope, after, limit + 1)
        more = len(ids) > limit
        ids = ids[:limit] if after is not None else ids[-limit:]
        start = 0
        while start < len(ids) and not peer.closed:
            messages = await store.messages(ids[start : start + READ_ROWS], max_chars=READ_CHARS)
            start = ids.index(messages[-1].id, start) + 1 if messages else start + READ_ROWS
            for message in messages:
                # The user may have left a room (or been taken off a
                # private room's list) since the replay began.
                if message.room is not None and not rooms.is_member(user, message.room):
                    if room is not None:
                        raise not_member(room)
                    continue
                peer.put(encode(message))
                await peer.wait_for_room()
    except StoreError as exc:
        log.error("history query failed user=%s: %s", user, exc)
        raise ProtocolError(ErrorCode.UNAVAILABLE, "history is unavailable now") from None
    last = ids[-1] if ids else (after or 0)
    peer.send(HistoryEnd(room=room, peer=with_user, last=last, more=more, ref=ref))
