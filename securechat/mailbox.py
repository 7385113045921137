"""The mailbox: direct messages for users who were offline, handed over exactly once.

A direct message is stored as undelivered; it reaches its recipient on one
of two paths: at its commit, if the recipient has a connection then
(:meth:`Mailbox.hand_over`), or from the backlog when the recipient next
logs in (:meth:`Mailbox.deliver_stored`). Whoever hands it over marks it
delivered. ``_handing_over`` holds the ids one path has claimed and whose
"delivered" mark is not committed yet, so that the other path never repeats
them; a hand-over that did not finish (the connection closed, or its task
was cancelled) releases its claim, and those messages come again at the next
login.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

import trio

from .delivery import READ_CHARS, READ_ROWS, Peer
from .protocol import Message, encode
from .store import MarkDelivered, Store, StoreError

log = logging.getLogger("securechat.hub")


class Mailbox:
    """Who has direct messages waiting, and the hand-over of each exactly once."""

    def __init__(self, store: Store, waiting_for: Iterable[str]) -> None:
        self.store = store
        # Users with stored direct messages: a login of anyone else needs no query.
        self._waiting_for = set(waiting_for)
        self._handing_over: set[int] = set()

    async def deliver_stored(self, peer: Peer, *, through: int) -> None:
        """Send ``peer`` the direct messages (ids up to ``through``) that arrived while its
        user was offline.

        Read a few at a time and paced by the connection: a long backlog
        never overflows its queue, nor is it held in memory at once. Messages
        with later ids were sent while the user was online: their commit
        hands them over (or keeps them for the next login).
        """
        user = peer.username
        if user not in self._waiting_for:
            return
        after = 0
        while not peer.closed:
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
                    peer.put(encode(message))
                    await peer.wait_for_room()
                handed_over = not peer.closed
            finally:
                if not handed_over:  # closed or cancelled: they come again at the next login
                    self._handing_over.difference_update(ids)
            if not handed_over:
                return
            self._mark_delivered(ids)

    def hand_over(self, to: str, message: Message, frame: bytes, peers: Sequence[Peer]) -> bool:
        """Hand a just-committed direct message to the connections of its recipient ``to``;
        False when there are none (it waits for their next login)."""
        if not peers:
            self._waiting_for.add(to)  # stored, for the next login
            return False
        if message.id in self._handing_over:
            return True  # a login is handing it over
        for peer in peers:
            peer.put(frame)
        self._mark_delivered(self._claim([message]))
        return True

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
            marked(None)  # not marked: they stay undelivered and come again at the next login
