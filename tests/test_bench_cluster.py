"""The benchmark's cluster parts (benchmarks/cluster.py, benchmarks/driver.py): the CPU sum
over a process tree (a restarted worker still counted), the private Redis it starts and
always stops, the workers' log tags and the ratio targets.

Real processes throughout: a process tree burning CPU, Debian's redis-server, and one real
``securechat server --workers 2`` whose worker is SIGKILLed. Waits poll with a deadline.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from benchmarks import targets
from benchmarks.cluster import (
    RedisError,
    RedisProcess,
    command,
    count_hash_values,
    logins_by_worker,
)
from benchmarks.driver import BenchError, BenchServer, span_cpu
from benchmarks.machine import children, run_delay_seconds, tree_cpu_seconds

from .conftest import WAIT, Pki

BURN = 0.3  # CPU seconds each child of the tree test burns
TICKS = 0.03  # /proc counts in clock ticks (10 ms), rounded down: some slack


def wait_for(condition: Callable[[], bool], within: float = WAIT) -> None:
    """Poll other processes' state (they have no event to wait on), with a deadline."""
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def running(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


# --- the CPU of a process tree -----------------------------------------------------------

TREE = textwrap.dedent(
    f"""
    import subprocess, sys
    burn = "import time\\nwhile time.process_time() < {BURN}: pass\\n"
    # The first child burns, exits and is reaped (a worker that died and was restarted).
    subprocess.run([sys.executable, "-c", burn], check=True)
    # The second burns and stays until our stdin closes (a live worker).
    live = subprocess.Popen(
        [sys.executable, "-c", burn + "print('burnt', flush=True)\\nimport sys\\nsys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    assert live.stdout.readline() == "burnt\\n"
    print(live.pid, flush=True)
    sys.stdin.read()
    live.stdin.close()
    live.wait()
    """
)


def test_tree_cpu_counts_live_children_and_reaped_ones() -> None:
    with subprocess.Popen(
        [sys.executable, "-c", TREE], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    ) as parent:
        assert parent.stdout is not None
        assert parent.stdin is not None
        try:
            live = int(parent.stdout.readline())
            assert children(parent.pid) == [live]
            tree = tree_cpu_seconds(parent.pid)
            assert set(tree) == {parent.pid, live}
            assert tree[live] >= BURN - TICKS
            # The reaped child's CPU is in its parent's figure (cutime + cstime).
            assert tree[parent.pid] >= BURN - TICKS
            assert sum(tree.values()) >= 2 * (BURN - TICKS)
        finally:
            parent.stdin.close()
            parent.wait(WAIT)
    assert tree_cpu_seconds(parent.pid) == {}  # gone: nothing, no error


def test_run_queue_wait_is_read_for_every_thread_and_zero_for_a_gone_process() -> None:
    with subprocess.Popen([sys.executable, "-c", "pass"]) as gone:
        gone.wait(WAIT)
    assert run_delay_seconds(gone.pid) == 0.0
    mine = run_delay_seconds(os.getpid())
    assert mine >= 0.0
    assert run_delay_seconds(os.getpid()) >= mine  # a counter: it never goes back


def test_a_worker_reaped_during_a_span_counts_only_its_time_within_it() -> None:
    before = {"supervisor": 1.0, "worker 10": 2.0, "worker 11": 3.0, "redis": 1.0}
    # worker 10 ran 0.5 s more, died and was reaped: its 2.5 s are now in the supervisor's
    # figure (which also spent 0.1 s itself); worker 12 replaced it and used 0.4 s.
    after = {"supervisor": 3.6, "worker 11": 3.5, "worker 12": 0.4, "redis": 1.2}
    spans = span_cpu(before, after)
    assert spans == pytest.approx(
        {"supervisor": 0.6, "worker 11": 0.5, "worker 12": 0.4, "redis": 0.2}
    )
    assert sum(spans.values()) == pytest.approx(sum(after.values()) - sum(before.values()))


# --- the private Redis -------------------------------------------------------------------


def test_redis_starts_answers_and_stops(tmp_path: Path) -> None:
    redis = RedisProcess(tmp_path / "redis")
    try:
        redis.start()
        pid, port = redis.pid, redis.port
        assert command(port, "CONFIG", "GET", "appendfsync") == [b"appendfsync", b"always"]
        assert command(port, "CONFIG", "GET", "appendonly") == [b"appendonly", b"yes"]
        assert command(port, "SET", "k", "v") == b"OK"
        assert command(port, "GET", "k") == b"v"
        assert redis.cpu() > 0.0
    finally:
        redis.stop()
    assert not running(pid)
    assert redis.process is None
    with pytest.raises(ConnectionRefusedError):
        command(port, "PING", timeout=1.0)
    redis.stop()  # again: nothing to do


def test_a_killed_redis_started_again_has_every_write_it_answered(tmp_path: Path) -> None:
    redis = RedisProcess(tmp_path / "redis")
    try:
        redis.start()
        for number in range(2500):  # more than one HSCAN page
            text = f"m{number}" if number % 5 else f"s{number}"
            command(redis.port, "HSET", "h", str(number), f'{{"text":"{text}"}}')
        redis.kill()  # nothing flushed beyond the fsyncs before each answer
        redis.start()  # a new port, the same directory and AOF
        assert count_hash_values(redis.port, "h", lambda body: b'"text":"m' in body) == 2000
    finally:
        redis.stop()


def test_redis_dies_with_the_coordinator(tmp_path: Path) -> None:
    with subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys\n"
            "from pathlib import Path\n"
            "from benchmarks.cluster import RedisProcess\n"
            f"redis = RedisProcess(Path({str(tmp_path / 'redis')!r}))\n"
            "redis.start()\n"
            "print(redis.pid, flush=True)\n"
            "sys.stdin.read()\n",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as coordinator:
        assert coordinator.stdout is not None
        pid = int(coordinator.stdout.readline())
        try:
            assert running(pid)
        finally:
            coordinator.kill()  # no finally of its own runs: PR_SET_PDEATHSIG must do it
            coordinator.wait(WAIT)
    try:
        wait_for(lambda: not running(pid))
    finally:
        if running(pid):  # the test failed: leave nothing behind
            os.kill(pid, signal.SIGKILL)


def test_a_missing_redis_server_is_named_in_one_line(tmp_path: Path) -> None:
    redis = RedisProcess(tmp_path / "redis", executable=str(tmp_path / "no-redis-server"))
    with pytest.raises(RedisError, match=r"cannot run .*no-redis-server"):
        redis.start()


# --- a cluster BenchServer ---------------------------------------------------------------


def test_a_cluster_server_counts_a_restarted_worker_and_stops_redis(
    tmp_path: Path, pki: Pki
) -> None:
    server = BenchServer(tmp_path / "node", pki.directory, {"alice": None}, cluster_workers=2)
    try:
        server.start()
        assert server.redis is not None
        redis_pid = server.redis.pid
        assert len(server.worker_pids) == 2
        assert sorted(children(server.pid)) == sorted(server.worker_pids)
        first = server.cpu_by_process()
        assert set(first) == {
            "supervisor",
            "redis",
            *(f"worker {pid}" for pid in server.worker_pids),
        }

        killed = server.worker_pids[0]
        os.kill(killed, signal.SIGKILL)
        wait_for(lambda: "starting it again" in server.log())

        def replaced() -> bool:
            now = set(children(server.pid))
            return len(now) == 2 and killed not in now

        wait_for(replaced, within=WAIT * 3)
        second = server.cpu_by_process()
        assert f"worker {killed}" not in second
        # The killed worker's CPU moved into the supervisor's figure: nothing is lost.
        assert second["supervisor"] >= first[f"worker {killed}"]
        assert sum(second.values()) >= sum(first.values())
        spans = span_cpu(first, second)
        assert sum(spans.values()) == pytest.approx(
            sum(second.values()) - sum(first.values()), abs=1e-6
        )
    finally:
        stopped = server.stop()
    assert stopped["redis_stopped_by"] == "SIGTERM"
    assert not running(redis_pid)
    assert not any(running(pid) for pid in server.worker_pids)


def test_redis_is_stopped_when_the_cluster_server_cannot_start(tmp_path: Path) -> None:
    empty = tmp_path / "no-pki"
    empty.mkdir()
    server = BenchServer(tmp_path / "node", empty, {"alice": None}, cluster_workers=2)
    try:
        with pytest.raises(BenchError, match="exited"):
            server.start()
        assert server.redis is not None
        assert server.redis.process is not None
        redis_pid = server.redis.pid
    finally:
        server.stop()
    assert not running(redis_pid)


def test_cluster_overrides_stay_off_a_one_process_server(tmp_path: Path, pki: Pki) -> None:
    overrides: dict[str, dict[str, Any]] = {
        "cluster": {"presence_ttl": 5.0},
        "server": {"flush_interval_ms": 5},
    }
    alone = BenchServer(tmp_path / "a", pki.directory, {"alice": None}, overrides=overrides)
    assert alone.redis is None
    assert "cluster" not in alone.settings
    assert alone.settings["server"]["flush_interval_ms"] == 5
    node = BenchServer(
        tmp_path / "b", pki.directory, {"alice": None}, overrides=overrides, cluster_workers=2
    )
    assert node.settings["cluster"]["presence_ttl"] == 5.0


# --- the log, and the ratio targets ------------------------------------------------------


def test_logins_are_counted_per_worker_from_the_log_tags() -> None:
    log = "\n".join(
        [
            "2026-12-01T00:00:00.000Z INFO securechat.supervisor[7]: worker 1 ready (pid 10)",
            "2026-12-01T00:00:01.000Z INFO securechat.server[10]: login user=u0001"
            " peer=127.0.0.1:5000 method=certificate admin=False",
            "2026-12-01T00:00:01.000Z INFO securechat.server[11]: login user=u0002"
            " peer=127.0.0.1:5001 method=certificate admin=False",
            "2026-12-01T00:00:01.000Z INFO securechat.server[11]: login user=u0003"
            " peer=127.0.0.1:5002 method=certificate admin=False",
            "2026-12-01T00:00:01.000Z INFO securechat.server[10]: login user=s00"
            " peer=127.0.0.1:5003 method=certificate admin=False",
            "2026-12-01T00:00:02.000Z WARNING securechat.server[10]: auth failed user=u0009"
            " peer=127.0.0.1:5004 reason=x",
        ]
    )
    assert logins_by_worker(log, lambda who: who.startswith("u")) == {10: 1, 11: 2}
    assert logins_by_worker(log, lambda who: who.startswith("s")) == {10: 1}


def test_ratio_targets_judge_the_ratio_to_one_process() -> None:
    def verdicts(name: str, results: dict[str, object]) -> dict[str, bool]:
        record = {"target_key": name, "results": results}
        return {v["figure"]: v["met"] for v in targets.evaluate(record)}

    full = verdicts(
        "cluster-fanout-1000-full",
        {"lost": 0, "vs_one_process": {"server_cpu_us_per_delivery": 1.31}},
    )
    assert full == {"vs_one_process.server_cpu_us_per_delivery": False, "lost": True}
    connect = verdicts("cluster-connect-certs", {"vs_one_process": {"logins_per_s": 1.6}})
    assert connect == {"vs_one_process.logins_per_s": True}
    durable = verdicts("cluster-durable", {"acked_per_s": 9_999.0, "every_ack_stored": True})
    assert durable == {"acked_per_s": False, "every_ack_stored": True}
    missing = verdicts("cluster-connect-certs", {"vs_one_process": {"logins_per_s": None}})
    assert missing == {"vs_one_process.logins_per_s": False}
