"""Limits against abuse, without I/O: message rate, login back-off, connection counts.

Every method takes the current time as an argument (the server passes
``trio.current_time()``), so these are plain objects, tested with numbers.
"""

from __future__ import annotations

import enum
import ipaddress
from collections import OrderedDict, deque
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field


def address_key(host: str) -> str:
    """What per-address limits count: the IPv4 address, or the IPv6 /64 network.

    One IPv6 customer usually holds a whole /64, so counting single IPv6
    addresses would let one client look like millions.
    """
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


class Verdict(enum.Enum):
    ACCEPT = "accept"
    REJECT = "reject"  # too fast: refuse this one, say when to retry
    DISCONNECT = "disconnect"  # kept going far past the limit


@dataclass
class TokenBucket:
    """``rate`` tokens per second on average, bursts of up to ``burst``.

    A refused request still costs its tokens (the bucket goes into debt), so
    a client that ignores ``retry_after`` only pushes it further away; once
    the debt passes ``flood_factor`` times the burst, the verdict is DISCONNECT.
    """

    rate: float
    burst: float
    now: float
    flood_factor: float = 3.0
    tokens: float = field(init=False)

    def __post_init__(self) -> None:
        self.tokens = self.burst
        self._updated = self.now

    def take(self, now: float, cost: float = 1.0) -> tuple[Verdict, float]:
        """Spend ``cost`` tokens; returns the verdict and, for REJECT, seconds until
        a request of the same cost is accepted.

        A cost above the burst is charged as the burst, so that every request
        can be made at some rate.
        """
        cost = min(cost, self.burst)
        self.tokens = min(self.burst, self.tokens + (now - self._updated) * self.rate)
        self._updated = now
        self.tokens -= cost
        if self.tokens >= 0:
            return Verdict.ACCEPT, 0.0
        if self.tokens < -self.flood_factor * self.burst:
            return Verdict.DISCONNECT, 0.0
        # Accepted again once the bucket is back at `cost` tokens.
        return Verdict.REJECT, (cost - self.tokens) / self.rate

    def debt_paid_in(self, now: float) -> float:
        """Seconds until the bucket is out of debt (0 if it is not in debt)."""
        return max(0.0, -self.tokens_at(now) / self.rate)

    def tokens_at(self, now: float) -> float:
        """The tokens at ``now`` (negative: in debt)."""
        return min(self.burst, self.tokens + (now - self._updated) * self.rate)


class RateKind(enum.Enum):
    MESSAGES = "messages"  # what others see: say, dm, join, leave, kick
    REQUESTS = "requests"  # everything else a user asks of the server


class RateLimiter:
    """Every user's two token buckets (shared by all their connections).

    Messages cost one token each. A request costs tokens in proportion to the
    work it makes the server do (the caller says how much), so pipelining
    cheap-looking requests is limited like sending messages.

    Servers sharing one chat (a cluster) share the buckets by telling each
    other what each user spent: with ``share``, :attr:`spent` collects what was
    taken here since the caller last emptied it, and :meth:`debit` charges
    what a user spent on another server.
    """

    def __init__(
        self,
        *,
        message_rate: float,
        message_burst: float,
        request_rate: float,
        request_burst: float,
        share: bool = False,
    ) -> None:
        self._settings = {
            RateKind.MESSAGES: (message_rate, message_burst),
            RateKind.REQUESTS: (request_rate, request_burst),
        }
        self._buckets: dict[tuple[str, RateKind], TokenBucket] = {}
        self._flooded: set[str] = set()  # cut off for flooding, debt not yet paid
        self.share = share
        self.spent: dict[tuple[str, RateKind], float] = {}

    def take(self, user: str, kind: RateKind, cost: float, now: float) -> tuple[Verdict, float]:
        verdict, retry_after = self._bucket(user, kind, now).take(now, cost)
        if verdict is Verdict.DISCONNECT:
            self._flooded.add(user)
        if self.share:
            self.spent[user, kind] = self.spent.get((user, kind), 0.0) + cost
        return verdict, retry_after

    def debit(self, user: str, kind: RateKind, cost: float, now: float) -> None:
        """Charge what ``user`` spent on another server (no verdict: it is spent)."""
        if self._bucket(user, kind, now).take(now, cost)[0] is Verdict.DISCONNECT:
            self._flooded.add(user)

    def available(self, user: str, kind: RateKind, now: float) -> float:
        """The tokens ``user`` has of ``kind`` at ``now`` (negative: in debt)."""
        bucket = self._buckets.get((user, kind))
        if bucket is None:
            return self._settings[kind][1]
        return bucket.tokens_at(now)

    def _bucket(self, user: str, kind: RateKind, now: float) -> TokenBucket:
        bucket = self._buckets.get((user, kind))
        if bucket is None:
            rate, burst = self._settings[kind]
            bucket = self._buckets[user, kind] = TokenBucket(rate, burst, now)
        return bucket

    def cooldown(self, user: str, now: float) -> float:
        """Seconds until a user cut off for flooding has paid their debt (0: not cut off).

        Until then the user may not come back: each new connection would be
        cut again at its first request, and a login is not free.
        """
        if user not in self._flooded:
            return 0.0
        wait = 0.0
        for kind in RateKind:
            bucket = self._buckets.get((user, kind))
            if bucket is not None:
                wait = max(wait, bucket.debt_paid_in(now))
        if wait == 0.0:
            self._flooded.discard(user)
        return wait

    def forget(self, user: str) -> None:
        """Drop a user's buckets (their account was removed)."""
        for kind in RateKind:
            self._buckets.pop((user, kind), None)
        self._flooded.discard(user)


# The login back-off's defaults (``[limits]`` login_failures_allowed and
# login_backoff_max in the config).
LOGIN_FAILURES_ALLOWED = 5
LOGIN_BACKOFF_MAX = 300.0


@dataclass(frozen=True)
class Refusal:
    """Why :meth:`LoginThrottle.reserve` refused an attempt (for the server log)."""

    key: str
    wait: float  # seconds until the key's block ends; 0 when only attempts in flight refuse it
    in_flight: int

    def __str__(self) -> str:
        if self.wait > 0:
            return f"backing off for {self.wait:.1f} s after repeated failures ({self.key})"
        return f"backing off: {self.in_flight} attempts in flight ({self.key})"


class LoginThrottle:
    """Back-off after failed logins, per key (a username, a source address).

    A key may fail ``free_failures`` times within ``window`` seconds; the
    last of those failures blocks it for ``first_delay`` seconds, and each
    further one for twice as long, up to ``max_delay``.

    An attempt is reserved (:meth:`reserve`) before its password is checked
    and settled after (:meth:`failed`, :meth:`succeeded` or :meth:`release`).
    A reservation counts as a failure in waiting, so attempts made in
    parallel get exactly as many password checks as the same attempts made
    one after another. A success clears only the keys the caller names (the
    user's own), never a shared one such as the address.

    At most ``max_keys`` failure records are remembered (the stalest are
    forgotten first), so an attacker cycling through addresses cannot exhaust
    memory; reservations live only while their checks run, so there are never
    more of them than logins in progress.

    Servers sharing one chat (a cluster) share the failures: with ``share``,
    :attr:`failed_here` and :attr:`cleared_here` collect what happened here since
    the caller last emptied them, and :meth:`failed_elsewhere` /
    :meth:`cleared_elsewhere` apply what happened on another server.
    """

    def __init__(
        self,
        *,
        free_failures: int = LOGIN_FAILURES_ALLOWED,
        window: float = 600.0,
        first_delay: float = 1.0,
        max_delay: float = LOGIN_BACKOFF_MAX,
        max_keys: int = 100_000,
        share: bool = False,
    ) -> None:
        self.share = share
        self.failed_here: list[tuple[str, ...]] = []
        self.cleared_here: list[str] = []
        self.free_failures = free_failures
        self.window = window
        self.first_delay = first_delay
        self.max_delay = max_delay
        self.max_keys = max_keys
        # key -> (failure times within the window, blocked until); least recently failed first
        self._keys: OrderedDict[str, tuple[deque[float], float]] = OrderedDict()
        # key -> attempts reserved and not yet settled (no entry when none)
        self._in_flight: dict[str, int] = {}

    def reserve(self, keys: Collection[str], now: float) -> Refusal | None:
        """Reserve one attempt for all of ``keys``; or, reserving nothing, say why not.

        An attempt is refused while a key is blocked, and while the attempts
        in flight would block it if they all failed: with ``f`` recent
        failures and ``k > 0`` attempts in flight, once ``f + k`` reaches
        ``free_failures``. Every reservation must be settled exactly once.
        """
        for key in keys:
            refusal = self._refusal(key, now)
            if refusal is not None:
                return refusal
        for key in keys:
            self._in_flight[key] = self._in_flight.get(key, 0) + 1
        return None

    def failed(self, keys: Collection[str], now: float) -> None:
        """Settle a reservation for ``keys`` as a failed attempt at ``now``."""
        self.release(keys)
        if self.share:
            self.failed_here.append(tuple(keys))
        self.failed_elsewhere(keys, now)

    def failed_elsewhere(self, keys: Collection[str], now: float) -> None:
        """A failed attempt for ``keys`` on another server (seen here at ``now``)."""
        for key in keys:
            failures, _ = self._keys.pop(key, (deque(), 0.0))
            failures.append(now)
            while failures[0] <= now - self.window:
                failures.popleft()
            excess = len(failures) - self.free_failures
            blocked_until = 0.0
            if excess >= 0:
                blocked_until = now + min(self.max_delay, self.first_delay * 2.0**excess)
            self._keys[key] = (failures, blocked_until)
        self._forget_stale(now)

    def succeeded(self, keys: Collection[str], *, clear: Collection[str]) -> None:
        """Settle a reservation for ``keys`` as a success; forget the failures of ``clear`` only."""
        self.release(keys)
        if self.share:
            self.cleared_here.extend(clear)
        self.cleared_elsewhere(clear)

    def cleared_elsewhere(self, keys: Collection[str]) -> None:
        """Forget the failures of ``keys`` (a success, here or on another server)."""
        for key in keys:
            self._keys.pop(key, None)

    def release(self, keys: Collection[str]) -> None:
        """Settle a reservation for ``keys`` whose password was never checked."""
        for key in keys:
            remaining = self._in_flight.get(key, 0) - 1
            if remaining > 0:
                self._in_flight[key] = remaining
            else:
                self._in_flight.pop(key, None)

    def blocked_for(self, keys: Iterable[str], now: float) -> float:
        """Seconds until every one of ``keys`` is out of its block (0: none is blocked)."""
        return max((self._keys[key][1] - now for key in keys if key in self._keys), default=0.0)

    def failures(self, key: str, now: float) -> int:
        """Failures of ``key`` within the window before ``now``."""
        failures, _ = self._keys.get(key, ((), 0.0))
        return sum(1 for when in failures if when > now - self.window)

    def in_flight(self, key: str) -> int:
        """Attempts reserved for ``key`` and not yet settled."""
        return self._in_flight.get(key, 0)

    def _refusal(self, key: str, now: float) -> Refusal | None:
        wait = self.blocked_for((key,), now)
        in_flight = self.in_flight(key)
        if wait > 0 or (in_flight and self.failures(key, now) + in_flight >= self.free_failures):
            return Refusal(key, max(wait, 0.0), in_flight)
        return None

    def _forget_stale(self, now: float) -> None:
        while self._keys:
            key, (failures, blocked_until) = next(iter(self._keys.items()))
            stale = failures[-1] <= now - self.window and blocked_until <= now
            if not stale and len(self._keys) <= self.max_keys:
                return
            del self._keys[key]

    def __len__(self) -> int:
        """Keys with a failure record (reservations in flight are not counted)."""
        return len(self._keys)


class Occasional:
    """At most one log line per ``interval`` seconds for an event that may come in floods.

    :meth:`due` says whether this occurrence should be logged, and how many
    occurrences (this one included) the line stands for.
    """

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._next = float("-inf")
        self._unlogged = 0

    def due(self, now: float) -> int:
        """0: stay quiet; else log now, for this many occurrences."""
        self._unlogged += 1
        if now < self._next:
            return 0
        self._next = now + self.interval
        count, self._unlogged = self._unlogged, 0
        return count


class Admission(enum.Enum):
    ADMIT = "admit"
    BUSY = "busy"  # the server is full: refuse with server_busy after the handshake
    REFUSE = "refuse"  # the address is at its own cap: close at once, before any TLS work


class ConnectionCounter:
    """Open connections, in total and per source address, against their caps.

    The per-address count holds every connection of that address that is
    still open, admitted or being told ``server_busy``; the total holds only
    admitted ones. So one address holds at most ``max_per_address``
    connections in any state, connections refused for the address cap cost
    nothing, and only many addresses can fill the total.
    """

    def __init__(self, max_total: int, max_per_address: int) -> None:
        self.max_total = max_total
        self.max_per_address = max_per_address
        self.total = 0
        self._per_address: dict[str, int] = {}

    def hold(self, address: str) -> _Held:
        """Count a connection for the duration of a ``with`` block, as the verdict it gives
        (``with counter.hold(address) as admission``) says."""
        return _Held(self, address)

    def _enter(self, address: str) -> Admission:
        count = self._per_address.get(address, 0)
        if count >= self.max_per_address:
            return Admission.REFUSE
        admission = Admission.ADMIT if self.total < self.max_total else Admission.BUSY
        self._per_address[address] = count + 1
        if admission is Admission.ADMIT:
            self.total += 1
        return admission

    def _exit(self, address: str, admission: Admission) -> None:
        if admission is Admission.REFUSE:
            return
        if admission is Admission.ADMIT:
            self.total -= 1
        remaining = self._per_address[address] - 1
        if remaining:
            self._per_address[address] = remaining
        else:
            del self._per_address[address]

    def count(self, address: str) -> int:
        return self._per_address.get(address, 0)


class _Held:
    """One connection counted by a :class:`ConnectionCounter` (a class, not a generator:
    it lasts as long as the connection, and a generator's frame costs ~0.3 KiB more)."""

    __slots__ = ("_address", "_admission", "_counter")

    def __init__(self, counter: ConnectionCounter, address: str) -> None:
        self._counter = counter
        self._address = address
        self._admission = Admission.REFUSE

    def __enter__(self) -> Admission:
        self._admission = self._counter._enter(self._address)
        return self._admission

    def __exit__(self, *exc_info: object) -> None:
        self._counter._exit(self._address, self._admission)
