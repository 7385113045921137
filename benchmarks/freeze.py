"""The freeze scenario (issue 9, finding 1): can one user's requests freeze everyone else?

A server with the default limits (the point is that the defaults protect)
and 1 000 rooms with long topics, its lobby holding a few hundred messages.
Ten bystanders (``alice0`` … ``alice9``, certificate logins) ping it in turn,
one ping every 10 ms in all (each user every 100 ms: half of the default
request rate), while one attacker (``bob``, its own process,
:mod:`benchmarks.attacker`) pipelines requests as fast as TCP allows for a
fixed time, connecting again whenever the server cuts it off. Variants:
nothing (the baseline), only ``rooms``, or a mix of ``rooms``, ``who
lobby``, ``history`` (limit 500), ``ping`` and invalid frames, each with an
attacker that never reads and one that reads everything.

Reported per variant: the bystanders' ping round trip (p50/p99/max; pings
still unanswered when the wait ends are counted apart), what the attacker
sent and how often it was cut off (the server log says why), and the CPU
of the server, of the generators and of everything else on the machine.
Every variant has its own server, started on a copy of the same seeded
database.
"""

from __future__ import annotations

import os
import shutil
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from securechat import certs

from . import attacker
from .attacker import FRAMES
from .driver import BENCH_LIMITS, BenchError, BenchServer, Span, Worker
from .loadgen import ConnSpec, Plan, Setup
from .machine import cpu_seconds
from .stats import latency_ms

if TYPE_CHECKING:
    from .scenarios import Bench

ATTACKER = "bob"
SEEDER = "carol"  # wrote the lobby's history, before the measured servers start
MIXED = ("rooms", "who", "history", "ping", "invalid")
# (name, request kinds, reads what the server sends)
VARIANTS: tuple[tuple[str, tuple[str, ...], bool], ...] = (
    ("baseline", (), False),
    ("rooms-noread", ("rooms",), False),
    ("rooms-read", ("rooms",), True),
    ("mixed-noread", MIXED, False),
    ("mixed-read", MIXED, True),
)
# 999 rooms and the lobby: the default max_rooms. Topics near their 200-character cap.
ROOMS: dict[str, dict[str, Any]] = {
    f"room{n:03d}": {"topic": f"room {n}: " + "a long topic for a room list that weighs " * 4}
    for n in range(999)
}
PING_GRACE = 30.0  # how long pings sent during the attack may take to be answered
LOGIN_TIMEOUT = 60.0


def bystander(index: int) -> str:
    return f"alice{index}"


def freeze(bench: Bench) -> None:
    sizes = bench.sizes
    bystanders = [bystander(i) for i in range(sizes.freeze_bystanders)]
    certs.generate(bench.pki, clients=[*bystanders, ATTACKER, SEEDER])
    users: dict[str, str | None] = dict.fromkeys([*bystanders, ATTACKER, SEEDER])  # certs only
    seeded = seed(bench, users)
    for name, kinds, read in VARIANTS:
        measure(bench, users, seeded, name, kinds, read)


def seed(bench: Bench, users: dict[str, str | None]) -> Path:
    """A database whose lobby holds ``freeze_history`` messages (~300 characters each),
    written by a server of the same code with the rate limits raised."""
    sizes = bench.sizes
    server = BenchServer(
        bench.root / "freeze-seed",
        bench.pki,
        users,
        overrides=bench.overrides,
        limits=BENCH_LIMITS,
        rooms=ROOMS,
        code=bench.server_code,
    )
    bench.log(f"freeze: {SEEDER} writes {sizes.freeze_history} messages to the lobby")
    worker: Worker | None = None
    try:
        server.start()
        setup = Setup(
            "127.0.0.1",
            server.port,
            str(bench.pki),
            bench.password,
            "freeze-seed",
            presence_lists=bench.presence_lists,
        )
        worker = Worker(bench.context, setup)
        worker.send("open", [ConnSpec(SEEDER, sender=True)], 1, LOGIN_TIMEOUT)
        opened = worker.expect("opened", LOGIN_TIMEOUT + 30)[1]
        if not all(row[1] for row in opened):
            raise BenchError(f"freeze: {SEEDER} could not log in: {opened}")
        worker.send("send", Plan(sizes.freeze_history, window=100, pad=240))
        rows = worker.expect("sent", 150)[1]["senders"]
        if sum(row[1] for row in rows) != sizes.freeze_history:
            raise BenchError(f"freeze: the lobby was not seeded: {rows}")
    finally:
        server.stop()
        if worker is not None:
            worker.stop()
    return server.database


def measure(
    bench: Bench,
    users: dict[str, str | None],
    seeded: Path,
    name: str,
    kinds: tuple[str, ...],
    read: bool,
) -> None:
    sizes = bench.sizes
    seconds, interval = sizes.freeze_seconds, sizes.freeze_ping_interval
    server = BenchServer(
        bench.root / f"freeze-{name}",
        bench.pki,
        users,
        overrides=bench.overrides,
        limits={},  # the server's defaults
        rooms=ROOMS,
        code=bench.server_code,
    )
    for suffix in ("", "-wal"):
        if Path(f"{seeded}{suffix}").exists():
            shutil.copy2(f"{seeded}{suffix}", f"{server.database}{suffix}")
    workers: list[Worker] = []
    try:
        server.start()
        bench.log(f"freeze-{name}: server pid {server.pid} on port {server.port}")
        setup = Setup(
            "127.0.0.1",
            server.port,
            str(bench.pki),
            bench.password,
            presence_lists=bench.presence_lists,
        )
        alice = Worker(bench.context, _named(setup, f"freeze-{name}-alice"))
        workers.append(alice)
        specs = [ConnSpec(bystander(i), sender=True) for i in range(sizes.freeze_bystanders)]
        alice.send("open", specs, len(specs), LOGIN_TIMEOUT)
        opened = alice.expect("opened", LOGIN_TIMEOUT + 30)[1]
        if not all(row[1] for row in opened):
            raise BenchError(f"freeze-{name}: bystanders could not log in: {opened}")
        bob: Worker | None = None
        if kinds:
            bob = Worker(bench.context, _named(setup, f"freeze-{name}-bob"), attacker.main)
            workers.append(bob)
            bob.send("connect", ATTACKER, LOGIN_TIMEOUT)
            error = bob.expect("connected", LOGIN_TIMEOUT + 30)[1]
            if error:
                raise BenchError(f"freeze-{name}: {ATTACKER} could not log in: {error}")
        wait_idle(server)
        what = f"{'+'.join(kinds)}, {'reads everything' if read else 'never reads'}"
        bench.log(
            f"freeze-{name}: {seconds:g} s of pings"
            + (f", {ATTACKER} pipelining {what}" if kinds else ", no attacker")
        )
        load_before = os.getloadavg()[0]
        span = Span(server, workers)
        bob_cpu = cpu_seconds(bob.pid) if bob is not None else 0.0
        pings = round(seconds / interval)
        alice.send("ping", pings, interval, seconds + PING_GRACE)
        if bob is not None:
            bob.send("attack", kinds, read, seconds)
        attack: dict[str, Any] = {}
        if bob is not None:
            attack = bob.expect("attacked", seconds + 60)[1]
            bob_cpu = cpu_seconds(bob.pid) - bob_cpu
        _, rtts, sent = alice.expect("pinged", seconds + PING_GRACE + 30)
        cpu = span.finish()
        load_after = os.getloadavg()[0]
        alice.send("collect")
        bystanders = alice.expect("collected", 60)[1]
    finally:
        server.stop()
        for worker in workers:
            worker.stop()
    results = {
        "ping_rtt_ms": latency_ms(rtts),
        "pings_sent": sent,
        "pings_unanswered": sent - len(rtts),
        "bystander_errors": bystanders["errors"],
        "bystanders_disconnected": dict(bystanders["lost"]),
        "attacker": attack,
        "cut_off": cut_offs(server.log()),
        "cpu": {**cpu, "attacker_cpu_share": round(bob_cpu / cpu["span_s"], 3)},
        "loadavg_1min": {"before": round(load_before, 2), "after": round(load_after, 2)},
    }
    params = {
        "attacker_requests": list(kinds),
        "attacker_frames": [FRAMES[kind].decode().strip() for kind in kinds],
        "attacker_reads": read if kinds else None,
        "seconds": seconds,
        "bystanders": sizes.freeze_bystanders,
        "ping_interval_s": interval,
        "ping_interval_per_bystander_s": interval * sizes.freeze_bystanders,
        "rooms": len(ROOMS) + 1,
        "lobby_messages": sizes.freeze_history,
        "limits": "server defaults",
        "login": "client certificate",
    }
    record = bench.record("freeze", f"freeze-{name}", params, results)
    record["target_key"] = "freeze"
    bench.finish(record, server)
    p = results["ping_rtt_ms"]
    bench.log(
        f"freeze-{name}: ping p50={p['p50']} p99={p['p99']} max={p['max']} ms,"
        f" unanswered {results['pings_unanswered']}; {ATTACKER} sent"
        f" {attack.get('frames_sent', 0)} frames over {attack.get('connections', 0)}"
        f" connections, cut off {results['cut_off']['total']} times;"
        f" server CPU {cpu['server_cpu_share']}"
    )


# What the server logs when it ends a connection of the attacker, by cause.
CUTS = {
    "flood": "flood disconnected user=" + ATTACKER + " ",
    "slow_consumer": "slow consumer disconnected user=" + ATTACKER + " ",
    "unresponsive": "unresponsive peer disconnected user=" + ATTACKER + " ",
}


def cut_offs(log: str) -> dict[str, int]:
    """How often the server cut the attacker off, and why (from its log)."""
    found: Counter[str] = Counter()
    for line in log.splitlines():
        for cause, text in CUTS.items():
            if text in line:
                found[cause] += 1
        if "protocol error peer=" in line:
            found["protocol_error"] += 1  # fatal framing errors (the log names no user)
        if f"rate limited user={ATTACKER} " in f"{line} ":  # "kind=…" follows since issue 9
            found["rate_limited_episodes"] += 1
        if f"login user={ATTACKER} " in line:
            found["logins"] += 1
    counts = {cause: found[cause] for cause in [*CUTS, "protocol_error"]}
    return {
        **counts,
        "total": sum(counts.values()),
        "rate_limited_episodes": found["rate_limited_episodes"],
        "logins": found["logins"],
    }


def wait_idle(server: BenchServer, limit: float = 15.0) -> None:
    """Wait (bounded) until the server is nearly idle: logins must not be measured."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        before = server.cpu()
        time.sleep(0.3)
        if server.cpu() - before <= 0.02:
            return


def _named(setup: Setup, name: str) -> Setup:
    return replace(setup, name=name)
