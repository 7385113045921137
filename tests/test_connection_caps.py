"""Connection caps and flood-proof log lines, as plain objects (no I/O)."""

from __future__ import annotations

from contextlib import ExitStack

from securechat.limits import Admission, ConnectionCounter, Occasional


def test_over_the_address_cap_is_refused_and_not_counted() -> None:
    counter = ConnectionCounter(max_total=40, max_per_address=5)
    with ExitStack() as stack:
        verdicts = [stack.enter_context(counter.hold("10.0.0.1")) for _ in range(45)]
        assert verdicts == [Admission.ADMIT] * 5 + [Admission.REFUSE] * 40
        assert counter.total == 5
        assert counter.count("10.0.0.1") == 5
        # Another address is not affected by the first one's refusals.
        assert stack.enter_context(counter.hold("10.0.0.2")) is Admission.ADMIT
    assert counter.total == 0
    assert counter.count("10.0.0.1") == 0


def test_a_full_server_says_busy_and_busy_ones_count_for_their_address_only() -> None:
    counter = ConnectionCounter(max_total=2, max_per_address=3)
    with ExitStack() as stack:
        assert stack.enter_context(counter.hold("a")) is Admission.ADMIT
        assert stack.enter_context(counter.hold("b")) is Admission.ADMIT
        assert stack.enter_context(counter.hold("a")) is Admission.BUSY
        assert stack.enter_context(counter.hold("a")) is Admission.BUSY
        assert counter.total == 2
        # Busy refusals still hold the address's slots: one address cannot
        # keep an unbounded number of handshakes going while the server is full.
        assert stack.enter_context(counter.hold("a")) is Admission.REFUSE
    assert counter.total == 0
    assert counter.count("a") == 0


def test_occasional_logs_the_first_then_one_line_per_interval_with_the_count() -> None:
    occasional = Occasional(10.0)
    assert occasional.due(0.0) == 1
    assert [occasional.due(t) for t in (1.0, 2.0, 9.9)] == [0, 0, 0]
    assert occasional.due(10.0) == 4  # this one and the three kept quiet
    assert occasional.due(25.0) == 1
