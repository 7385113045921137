"""The benchmark's ngIRCd side (issue 14): the private ngIRCd it starts and always stops
(benchmarks/ngircd.py), the IRC adapter of the load generator (benchmarks/irc.py) and
the feedback plans, through the whole ``peers`` scenario at a tiny size, and the
ratio targets.

Real processes throughout: Debian's ngircd (``make test`` installs it), a real
``securechat server``, the real generator processes. Waits poll with a deadline.
"""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks import targets
from benchmarks.ngircd import TEMP_PREFIX as NGIRCD_PREFIX
from benchmarks.ngircd import NgircdServer
from benchmarks.peers import PATTERNS, SERVERS, peers
from benchmarks.run import REPO
from benchmarks.scenarios import Bench, Sizes

from .conftest import WAIT, Pki
from .test_bench_cluster import running, wait_for

PASSWORD = "operator-secret-for-the-test"


def irc_lines(sock: ssl.SSLSocket, until: bytes) -> bytes:
    """What the server sends until a line holding ``until`` (bounded by WAIT)."""
    sock.settimeout(WAIT)
    received = b""
    while until not in received:
        chunk = sock.recv(65536)
        assert chunk, f"closed before {until!r}: {received!r}"
        received += chunk
    return received


def test_ngircd_speaks_irc_over_tls13_lifts_flood_limits_for_the_operator_and_stops(
    tmp_path: Path, pki: Pki
) -> None:
    server = NgircdServer(tmp_path / "ngircd", pki.directory, PASSWORD)
    try:
        server.start()
        pid, port, directory = server.pid, server.port, server.directory
        assert directory is not None
        assert directory.is_dir()
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.load_verify_locations(pki.ca)
        context.check_hostname = False  # the bench certificate names localhost, not 127.0.0.1
        with (
            socket.create_connection(("127.0.0.1", port), timeout=WAIT) as raw,
            context.wrap_socket(raw) as sock,
        ):
            assert sock.version() == "TLSv1.3"
            sock.sendall(b"NICK s00\r\nUSER s00 0 * :s00\r\n")
            irc_lines(sock, b" 001 s00 ")
            sock.sendall(b"OPER bench %s\r\nMODE s00 +F\r\nJOIN #bench\r\n" % PASSWORD.encode())
            joined = irc_lines(sock, b" 366 ")
            assert b"MODE s00 :+F" in joined
        assert server.cpu() > 0.0
        assert server.memory()["VmRSS"] > 0
    finally:
        stopped = server.stop()
    assert not running(pid)
    assert stopped["exit_code"] == 0
    assert not directory.exists()  # the config with the operator password is gone
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", port)) != 0


def test_ngircd_dies_with_the_coordinator(tmp_path: Path, pki: Pki) -> None:
    with subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys\n"
            "from pathlib import Path\n"
            "from benchmarks.ngircd import NgircdServer\n"
            f"server = NgircdServer(Path({str(tmp_path / 'n')!r}), Path({str(pki.directory)!r}),"
            f" {PASSWORD!r})\n"
            "server.start()\n"
            "print(server.pid, flush=True)\n"
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


TINY = Sizes(
    fanout_receivers=(6,),
    fanout_messages=(30,),
    fanout_paced_seconds=0.4,
    rooms=1,
    room_members=2,
    connect_certs=1,
    connect_passwords=1,
    idle_users=1,
    durable_senders=1,
)


def test_the_peers_scenario_drives_ngircd_and_securechat_with_every_pattern(
    tmp_path: Path,
) -> None:
    records: list[dict[str, Any]] = []
    bench = Bench(tmp_path, REPO, TINY, quick=True, workers=2, emit=records.append)
    peers(bench)
    names = [record["name"] for record in records]
    assert names == [f"peers-6-{p}-{s}" for s in SERVERS for p in PATTERNS]
    for record in records:
        results = record["results"]
        expected = 6 * record["params"]["messages"]
        assert (results["deliveries"], results["lost"]) == (expected, 0), record["name"]
        assert results["duplicates_or_extra"] == 0
        assert results["messages_acked"] == record["params"]["messages"]
        assert results["latency_ms"]["samples"] == expected
        assert record["params"]["tls"].startswith("TLSv1.3 ")
        assert record["server"]["exit_code"] == 0
        assert not results["errors"]
        assert not results["connections_lost"]
    by_name = {record["name"]: record for record in records}
    for pattern in PATTERNS:
        mine = by_name[f"peers-6-{pattern}-securechat"]["results"]
        theirs = by_name[f"peers-6-{pattern}-ngircd"]["results"]
        ratios = mine["vs_ngircd"]
        assert ratios["peer"] == f"peers-6-{pattern}-ngircd"
        assert ratios["deliveries_per_s"] == round(
            mine["deliveries_per_s"] / theirs["deliveries_per_s"], 3
        )
    assert by_name["peers-6-per-delivery-ngircd"]["params"]["one_message_per_write"]
    left = [
        directory
        for directory in Path(tempfile.gettempdir()).glob(NGIRCD_PREFIX + "*")
        if (directory / "owner.pid").read_text() == str(os.getpid())
    ]
    assert not left  # ngIRCd's directory (config, key) goes with it


def test_issue_14_targets_judge_securechat_against_ngircd() -> None:
    def verdicts(name: str, results: dict[str, object]) -> dict[str, bool]:
        record = {"target_key": name, "results": results}
        return {v["figure"]: v["met"] for v in targets.evaluate(record)}

    paced = verdicts(
        "peers-paced",
        {
            "lost": 0,
            "latency_ms": {"p99": 61.0},
            "vs_ngircd": {
                "deliveries_per_s": 0.99,
                "server_cpu_us_per_delivery": 1.0,
                "latency_ms_p99": 2.01,
            },
        },
    )
    assert paced == {
        "vs_ngircd.deliveries_per_s": True,
        "vs_ngircd.server_cpu_us_per_delivery": True,
        "vs_ngircd.latency_ms_p99": False,
        "latency_ms.p99": False,
        "lost": True,
    }
    per_delivery = verdicts(
        "peers-per-delivery", {"lost": 0, "vs_ngircd": {"server_cpu_us_per_delivery": 1.49}}
    )
    assert per_delivery == {"vs_ngircd.server_cpu_us_per_delivery": False, "lost": True}
    burst = verdicts("peers-burst", {"lost": 0, "vs_ngircd": {"server_cpu_us_per_delivery": 0.6}})
    assert burst == {"vs_ngircd.server_cpu_us_per_delivery": True, "lost": True}
    no_peer = verdicts(
        "peers-burst", {"lost": 0, "vs_ngircd": {"server_cpu_us_per_delivery": None}}
    )
    assert no_peer["vs_ngircd.server_cpu_us_per_delivery"] is False
