"""What the servers of a cluster share of their limits: rate limits and login back-off.

Each server keeps its own token buckets (:class:`~securechat.limits.RateLimiter`)
and login failures (:class:`~securechat.limits.LoginThrottle`), so a request
is judged at once, without a round trip to Redis. Every
:data:`SHARE_INTERVAL` a server tells the others, through the store
(:meth:`~securechat.store.Store.tell`), what each user spent and which logins
failed or cleared their back-off here; what the others tell is charged to the
buckets and counted as failures here. A user spread over several servers thus
spends one budget and a guesser spread over them faces one back-off, with a
lag of one interval and one read of the log: at most the burst once per
server beyond the limit, then the limit itself.
"""

from __future__ import annotations

import trio

from .limits import LoginThrottle, RateKind, RateLimiter
from .store import LoginFailures, Spent, Store

SHARE_INTERVAL = 0.1  # seconds
# Users' spending per notice: a burst of activity becomes several log entries of
# bounded size rather than one huge one.
COSTS_PER_NOTICE = 500


class LimitSharing:
    """Tells the other servers what was spent here, and applies what they spent."""

    def __init__(self, store: Store, limiter: RateLimiter, throttle: LoginThrottle) -> None:
        self.store = store
        self.limiter = limiter
        self.throttle = throttle
        limiter.share = throttle.share = True

    async def run(self) -> None:
        """Tell the others every :data:`SHARE_INTERVAL` (until cancelled)."""
        while True:
            await trio.sleep(SHARE_INTERVAL)
            self.tell()

    def tell(self) -> None:
        if self.limiter.spent:
            spent, self.limiter.spent = self.limiter.spent, {}
            costs = [(user, kind.value, cost) for (user, kind), cost in spent.items()]
            for start in range(0, len(costs), COSTS_PER_NOTICE):
                self.store.tell(Spent(tuple(costs[start : start + COSTS_PER_NOTICE])))
        if self.throttle.failed_here or self.throttle.cleared_here:
            failed, self.throttle.failed_here = self.throttle.failed_here, []
            cleared, self.throttle.cleared_here = self.throttle.cleared_here, []
            for start in range(0, max(len(failed), len(cleared)), COSTS_PER_NOTICE):
                end = start + COSTS_PER_NOTICE
                self.store.tell(LoginFailures(tuple(failed[start:end]), tuple(cleared[start:end])))

    def apply(self, change: Spent | LoginFailures) -> None:
        """What another server told: charged, or counted, here."""
        now = trio.current_time()
        if isinstance(change, Spent):
            for user, kind, cost in change.costs:
                try:
                    rate_kind = RateKind(kind)
                except ValueError:
                    continue  # a kind this version does not have
                self.limiter.debit(user, rate_kind, cost, now)
        else:
            for keys in change.failed:
                self.throttle.failed_elsewhere(keys, now)
            self.throttle.cleared_elsewhere(change.cleared)
