"""The ``peers`` scenario (issue 14): securechat and ngIRCd side by side, in one run,
driven by the same load generator.

One sender and N receivers (1000; 100 with ``--quick``) in one room (securechat's
lobby, ngIRCd's ``#bench``), each with its own TLS 1.3 connection, and three
patterns of sending, on ngIRCd first (:mod:`benchmarks.ngircd`, through the IRC
adapter :mod:`benchmarks.irc`) and then on securechat (``securechat server``, one
process, configured as every other scenario; ``--server-code`` applies to it):

* ``paced``: 50 messages/s for as long as fanout-1000-paced;
* ``per-delivery``: at full speed, the sender sends its next message each time one
  more has reached every receiver (at most 20 beyond that), one message per write,
  as many people typing into one busy room do;
* ``burst``: at full speed, the window of 20 refilled in one write as the server
  acknowledges (what fanout-1000-full does; on ngIRCd the acknowledgement is the
  ``PONG`` to a ``PING`` after each write).

Each securechat result carries its ratios to ngIRCd's result of the same pattern
in this run (``vs_ngircd``): the targets of issue 14 are on those.
"""

from __future__ import annotations

import functools
import time
from typing import Any

from .loadgen import ConnSpec, Plan
from .scenarios import (
    Bench,
    Session,
    _say_result,
    delivery_results,
    measure_runs,
    sender,
    user,
    versus,
)

SERVERS = ("ngircd", "securechat")  # ngIRCd first: securechat's results carry the ratios
PATTERNS = ("paced", "per-delivery", "burst")
RATIOS = ("deliveries_per_s", "server_cpu_us_per_delivery", "latency_ms.p99")


def plans(bench: Bench) -> dict[str, Plan]:
    sizes = bench.sizes
    receivers = max(sizes.fanout_receivers)
    full = dict(zip(sizes.fanout_receivers, sizes.fanout_messages, strict=True))[receivers]
    return {
        "paced": Plan(
            round(sizes.fanout_rate * sizes.fanout_paced_seconds),
            rate=sizes.fanout_rate,
            pad=sizes.pad,
            deadline=sizes.fanout_paced_seconds + 60,
        ),
        "per-delivery": Plan(full, window=sizes.fanout_window, pad=sizes.pad, feedback=True),
        "burst": Plan(full, window=sizes.fanout_window, pad=sizes.pad),
    }


def record_name(receivers: int, pattern: str, server: str) -> str:
    return f"peers-{receivers}-{pattern}-{server}"


def peers(bench: Bench) -> None:
    receivers = max(bench.sizes.fanout_receivers)
    for server in SERVERS:
        irc = server == "ngircd"
        with bench.session(f"peers-{server}", protocol="irc" if irc else "securechat") as session:
            bench.log(f"peers: {server}: the sender and {receivers} receivers log in")
            session.open(session.senders, [ConnSpec(sender(0), sender=True)])
            started = time.monotonic()
            session.open(session.receivers, [ConnSpec(user(i)) for i in range(receivers)])
            # On IRC every join is told to everyone in the channel: n²/2 JOIN lines.
            bench.log(f"peers: {server}: logged in in {time.monotonic() - started:.1f} s; sync")
            session.sync("peers")
            collected = session.collect(session.receivers)
            tls = next((data["tls"] for data in collected if data["tls"]), None)
            for pattern, plan in plans(bench).items():
                measure(bench, session, server, pattern, plan, receivers, tls)


def measure(
    bench: Bench,
    session: Session,
    server: str,
    pattern: str,
    plan: Plan,
    receivers: int,
    tls: str | None,
) -> None:
    results = measure_runs(
        bench,
        session,
        plan,
        functools.partial(delivery_results, receivers=receivers, messages=plan.count),
        median_of="server_cpu_us_per_delivery",
        label=f"peers: {server}, {receivers} receivers, {plan.count} messages, {pattern}",
    )
    irc = server == "ngircd"
    params: dict[str, Any] = {
        "server": session.server.settings["server"] if irc else "securechat server (one process)",
        "receivers": receivers,
        "senders": 1,
        "messages": plan.count,
        "pattern": pattern,
        "window": plan.window or None,
        "rate_per_s": plan.rate or None,
        "one_message_per_write": plan.feedback,
        "room": "#bench" if irc else "lobby",
        "tls": tls,
        "text_chars": len(f"m{plan.count} {time.monotonic_ns()} ") + plan.pad,
        "generator_processes": len(session.receivers),
        "login": "NICK/USER; client certificate presented" if irc else "client certificate",
        "acknowledgement": "PONG to a PING after each write" if irc else "ack per message",
        "runs": bench.runs,
    }
    name = record_name(receivers, pattern, server)
    if not irc:
        results["vs_ngircd"] = versus(
            bench, record_name(receivers, pattern, "ngircd"), results, RATIOS
        )
    record = bench.record("peers", name, params, results)
    record["target_key"] = f"peers-{pattern}" if not irc else ""
    session.records.append(record)
    _say_result(bench, record)
