"""The send ledger: timestamps and idempotent re-sends.

Every message the server accepts gets its timestamp here; its id comes from
the store at its commit (:meth:`~securechat.store.Store.append`). A client
may send a message again with the same client ``id`` after a reconnect; the
ledger remembers each user's recent client ids and the message ids they
became, so that a re-send is answered with the original ``ack`` instead of
becoming a second message, and one that arrives while the original is still
being committed waits for the original's answer.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta

from .delivery import Peer
from .protocol import Ack, Error, ErrorCode, UtcClock, utc_timestamp
from .store import Appended, Draft, RecentSend, StoreError

# A client id is remembered while it is among the user's last RECENT_IDS ids
# or younger than RECENT_SECONDS, up to RECENT_IDS_MAX.
RECENT_IDS = 1000
RECENT_SECONDS = 600.0
RECENT_IDS_MAX = 20_000

Reply = Callable[[Ack | Error], None]


def recent_since(now: datetime | None = None) -> str:
    """The timestamp from which stored sends still count as recent (for the start-up snapshot)."""
    return utc_timestamp((now or datetime.now(UTC)) - timedelta(seconds=RECENT_SECONDS))


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


class SendLedger:
    """Timestamps for new messages, and the outcome of every recent client id."""

    def __init__(self, recent_sends: Iterable[RecentSend] = ()) -> None:
        self._clock = UtcClock()
        self._recent: dict[str, RecentIds] = {}
        # (user, client id) of messages waiting for their commit, and the
        # replies owed to re-sends that arrived meanwhile.
        self._pending: dict[tuple[str, str], list[Reply]] = {}
        for sent in recent_sends:
            self._remember(sent.sender, sent.client_id, sent.message_id, _epoch(sent.ts))

    def draft(
        self,
        sender: str,
        text: str,
        client_id: str | None = None,
        *,
        room: str | None = None,
        to: str | None = None,
        action: bool = False,
    ) -> Draft:
        return Draft(sender, text, self._clock(), room, to, action, client_id)

    def is_resend(self, peer: Peer, client_id: str | None) -> bool:
        """A client id seen before: answer with the original outcome instead of sending again.

        Otherwise the id is now pending: :meth:`settle` (or :meth:`abandon`)
        must follow.
        """
        if client_id is None:
            return False
        recent = self._recent.get(peer.username)
        message_id = recent.get(client_id) if recent else None
        if message_id is not None:
            peer.send(Ack(ref=client_id, id=message_id))
            return True
        waiting = self._pending.get((peer.username, client_id))
        if waiting is not None:
            waiting.append(peer.send)
            return True
        self._pending[(peer.username, client_id)] = []
        return False

    def abandon(self, peer: Peer, client_id: str | None) -> None:
        """The message was never queued: a re-send of its id is a new attempt, not a wait."""
        if client_id is not None:
            self._pending.pop((peer.username, client_id), None)

    def settle(
        self,
        peer: Peer,
        client_id: str | None,
        outcome: Appended | StoreError,
        *,
        stored: bool = False,
    ) -> None:
        """Answer the sender (and any re-send waiting) once the message is committed or failed."""
        reply: Ack | Error
        if isinstance(outcome, Appended):
            reply = Ack(ref=client_id, id=outcome.id, stored=True if stored else None)
            if client_id is not None:
                self._remember(peer.username, client_id, outcome.id, time.time())
        else:
            reply = Error(
                code=ErrorCode.UNAVAILABLE,
                message="the message could not be stored; send it again",
                ref=client_id,
            )
        peer.send(reply)
        peer.answered()
        if client_id is not None:
            for send in self._pending.pop((peer.username, client_id), []):
                send(reply)

    def _remember(self, user: str, client_id: str, message_id: int, when: float) -> None:
        self._recent.setdefault(user, RecentIds()).add(client_id, message_id, when)


def _epoch(ts: str) -> float:
    try:
        return datetime.fromisoformat(ts).timestamp()
    except ValueError:
        return 0.0
