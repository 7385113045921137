"""Unit tests for securechat.limits.LoginThrottle: back-off with reservations, in numbers."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from securechat.limits import LoginThrottle, RateKind, RateLimiter, Refusal, Verdict

USER = "user:carol"
IP = "ip:192.0.2.7"
KEYS = (USER, IP)


def throttle(*, window: float = 600.0, max_keys: int = 100_000) -> LoginThrottle:
    return LoginThrottle(
        free_failures=5, window=window, first_delay=1.0, max_delay=300.0, max_keys=max_keys
    )


def guess(limiter: LoginThrottle, now: float, keys: tuple[str, ...] = KEYS) -> bool:
    """One sequential wrong guess: True if its password was checked (and failed)."""
    if limiter.reserve(keys, now) is not None:
        return False
    limiter.failed(keys, now)
    return True


def test_sequential_failures_are_free_then_back_off_doubling() -> None:
    limiter = throttle()
    assert [guess(limiter, 0.0) for _ in range(7)] == [True] * 5 + [False] * 2
    refusal = limiter.reserve(KEYS, 0.5)
    assert refusal == Refusal(USER, 0.5, 0)
    assert str(refusal) == "backing off for 0.5 s after repeated failures (user:carol)"
    assert guess(limiter, 1.0)  # the 1 s block is over: one more check...
    assert not guess(limiter, 2.9)  # ...which failed and blocks for 2 s
    assert guess(limiter, 3.0)
    assert limiter.blocked_for(KEYS, 3.0) == 4.0


def test_the_delay_stops_growing_at_max_delay() -> None:
    limiter = throttle()
    now = 0.0
    for _ in range(20):
        assert guess(limiter, now)
        now += limiter.blocked_for(KEYS, now)
    assert limiter.blocked_for(KEYS, now - 300.0) == 300.0


def test_parallel_attempts_count_before_they_are_checked() -> None:
    limiter = throttle()
    for _ in range(5):
        assert limiter.reserve(KEYS, 0.0) is None
    assert limiter.in_flight(USER) == limiter.in_flight(IP) == 5
    refusal = limiter.reserve(KEYS, 0.0)
    assert refusal == Refusal(USER, 0.0, 5)
    assert str(refusal) == "backing off: 5 attempts in flight (user:carol)"
    for _ in range(5):
        limiter.failed(KEYS, 0.1)
    assert limiter.in_flight(USER) == 0
    # The same state as five sequential failures: blocked for 1 s from the last one.
    assert limiter.failures(USER, 0.1) == 5
    assert limiter.blocked_for(KEYS, 0.1) == 1.0


def test_after_a_block_only_one_attempt_at_a_time() -> None:
    limiter = throttle()
    for _ in range(5):
        guess(limiter, 0.0)
    assert limiter.reserve(KEYS, 1.0) is None
    assert limiter.reserve(KEYS, 1.0) == Refusal(USER, 0.0, 1)
    limiter.failed(KEYS, 1.0)
    assert limiter.blocked_for(KEYS, 1.0) == 2.0


def test_in_flight_attempts_and_failures_add_up() -> None:
    limiter = throttle()
    for _ in range(3):
        guess(limiter, 0.0)
    assert limiter.reserve(KEYS, 0.0) is None
    assert limiter.reserve(KEYS, 0.0) is None
    assert limiter.reserve(KEYS, 0.0) == Refusal(USER, 0.0, 2)


@given(
    st.lists(st.sampled_from(["reserve", "fail", "succeed", "release"]), max_size=60),
    st.integers(min_value=1, max_value=6),
)
def test_no_interleaving_checks_more_passwords_than_allowed(
    steps: list[str], free_failures: int
) -> None:
    """At one instant, however attempts start and settle, at most ``free_failures`` wrong
    passwords are checked per key, and successes of other users do not add to that."""
    limiter = LoginThrottle(free_failures=free_failures)
    in_flight = 0
    checked_wrong = 0
    for step in steps:
        if step == "reserve":
            if limiter.reserve(KEYS, 0.0) is None:
                in_flight += 1
        elif in_flight:
            in_flight -= 1
            if step == "fail":
                checked_wrong += 1
                limiter.failed(KEYS, 0.0)
            elif step == "succeed":  # someone else's right password from the same address
                limiter.succeeded(KEYS, clear=())
            else:
                limiter.release(KEYS)
        assert checked_wrong + in_flight <= free_failures
        assert limiter.in_flight(USER) == limiter.in_flight(IP) == in_flight


def test_a_refusal_reserves_nothing() -> None:
    limiter = throttle()
    for n in range(5):
        guess(limiter, 0.0, (f"user:u{n}", IP))  # the address is blocked, the users are not
    assert limiter.reserve(("user:dave", IP), 0.0) == Refusal(IP, 1.0, 0)
    assert limiter.in_flight("user:dave") == 0
    assert limiter.failures("user:dave", 0.0) == 0


def test_release_settles_without_counting() -> None:
    limiter = throttle()
    assert limiter.reserve(KEYS, 0.0) is None
    limiter.release(KEYS)
    assert limiter.in_flight(USER) == limiter.in_flight(IP) == 0
    assert limiter.failures(USER, 0.0) == limiter.failures(IP, 0.0) == 0
    assert len(limiter) == 0


def test_success_clears_only_the_named_key() -> None:
    limiter = throttle()
    for name in ("bob", "dave", "erin"):
        guess(limiter, 0.0, (f"user:{name}", IP))
    guess(limiter, 0.0, ("user:alice", IP))  # alice mistyped
    assert limiter.reserve(("user:alice", IP), 0.0) is None  # the address has 4 failures...
    limiter.succeeded(("user:alice", IP), clear=("user:alice",))
    assert limiter.failures("user:alice", 0.0) == 0
    assert limiter.failures(IP, 0.0) == 4  # ...and keeps them
    assert limiter.failures("user:bob", 0.0) == 1
    assert limiter.in_flight(IP) == 0


def test_an_insider_cannot_reset_the_address_with_their_own_logins() -> None:
    """One guess per user, the insider's own login after every four: blocked all the same."""
    limiter = throttle()
    checked = 0
    for n in range(20):
        checked += guess(limiter, 0.0, (f"user:victim{n}", IP))
        if n % 4 == 3 and limiter.reserve(("user:insider", IP), 0.0) is None:
            limiter.succeeded(("user:insider", IP), clear=("user:insider",))
    assert checked == 5
    assert limiter.blocked_for((IP,), 0.0) == 1.0


def test_a_success_for_one_user_does_not_unblock_the_address_for_another() -> None:
    limiter = throttle()
    for n in range(5):
        guess(limiter, 0.0, (f"user:bob{n}", IP))  # the address is blocked for 1 s
    assert limiter.reserve(("user:alice", IP), 0.5) == Refusal(IP, 0.5, 0)
    assert limiter.reserve(("user:alice", IP), 1.0) is None
    limiter.succeeded(("user:alice", IP), clear=("user:alice",))
    # the next guess from the address is checked (as it would have been anyway)
    # and the doubling goes on from where it was
    assert guess(limiter, 1.0, ("user:bob5", IP))
    assert limiter.blocked_for((IP,), 1.0) == 2.0
    assert not guess(limiter, 2.9, ("user:bob6", IP))


def test_failures_leave_the_window() -> None:
    limiter = throttle(window=60.0)
    for _ in range(4):
        guess(limiter, 0.0)
    assert limiter.failures(USER, 59.0) == 4
    assert limiter.failures(USER, 60.0) == 0
    # with the old failures gone, five attempts may be in flight again
    for _ in range(5):
        assert limiter.reserve(KEYS, 60.0) is None
    assert limiter.reserve(KEYS, 60.0) is not None


def test_memory_is_bounded_and_reservations_vanish_when_settled() -> None:
    limiter = throttle(max_keys=100)
    for n in range(1000):
        keys = (f"user:u{n}", f"ip:10.0.{n // 256}.{n % 256}")
        assert limiter.reserve(keys, float(n)) is None
        limiter.failed(keys, float(n))
    assert len(limiter) == 100
    assert limiter._in_flight == {}
    # keys with a reservation in flight are counted apart from the failure records
    assert limiter.reserve(("user:new", "ip:new"), 1000.0) is None
    assert limiter.in_flight("user:new") == 1
    assert len(limiter) == 100


def test_a_shared_throttle_collects_what_happened_here_and_counts_what_happened_elsewhere() -> None:
    here = LoginThrottle(free_failures=2, share=True)
    keys = ("user:bob", "ip:192.0.2.1")
    assert here.reserve(keys, 0.0) is None
    here.failed(keys, 0.0)
    assert here.failed_here == [keys]
    # another server's failure counts here as if it had been made here
    here.failed_elsewhere(("user:bob",), 1.0)
    assert here.failures("user:bob", 1.0) == 2
    assert here.reserve(keys, 1.0) is not None  # blocked: two failures
    here.cleared_elsewhere(("user:bob",))  # bob logged in on another server
    assert here.failures("user:bob", 1.0) == 0
    assert here.cleared_here == []  # not ours to tell again


def test_a_throttle_that_does_not_share_collects_nothing() -> None:
    alone = LoginThrottle()
    assert alone.reserve(("user:bob",), 0.0) is None
    alone.failed(("user:bob",), 0.0)
    assert alone.failed_here == []


def test_a_shared_rate_limiter_collects_spending_and_charges_what_others_spent() -> None:
    here = RateLimiter(
        message_rate=1.0, message_burst=5, request_rate=1.0, request_burst=5, share=True
    )
    assert here.take("alice", RateKind.MESSAGES, 1.0, 0.0) == (Verdict.ACCEPT, 0.0)
    assert here.spent == {("alice", RateKind.MESSAGES): 1.0}
    here.debit("alice", RateKind.MESSAGES, 4.0, 0.0)  # spent on another server
    assert here.available("alice", RateKind.MESSAGES, 0.0) == 0.0
    verdict, retry_after = here.take("alice", RateKind.MESSAGES, 1.0, 0.0)
    assert (verdict, retry_after) == (Verdict.REJECT, 2.0)
    # far past the limit elsewhere: cut off here too
    here.debit("alice", RateKind.MESSAGES, 100.0, 0.0)
    here.debit("alice", RateKind.MESSAGES, 100.0, 0.0)
    here.debit("alice", RateKind.MESSAGES, 100.0, 0.0)
    assert here.cooldown("alice", 0.0) > 0
    assert here.available("bob", RateKind.REQUESTS, 0.0) == 5
