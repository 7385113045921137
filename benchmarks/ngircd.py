"""ngIRCd as the benchmark's peer server (issue 14): a private ``ngircd --nodaemon``
on a free loopback port, never the Debian package's system service.

:class:`NgircdServer` writes a config into a directory of its own (TLS 1.3 only
on one TLS port, the bench PKI's ECDSA server certificate, the limits opened:
any number of connections from one address, of channels, long ping timeouts,
``MaxPenaltyTime = 0`` so that no command adds penalty time, and an IRC
operator whose password is the bench password: the sender takes user mode
``+F``, which lifts ngIRCd's per-read command limit from 3 to 10 and its
throttling), starts the process as user ``nobody`` (so that it has no
privileges to drop: dropping them would clear the parent-death signal that
makes it die with the coordinator) and reads its CPU and memory from /proc,
as :class:`~benchmarks.driver.BenchServer` does for securechat.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from .driver import BenchError, _die_with_parent
from .irc import OPERATOR
from .machine import cpu_seconds, memory_kib

START_TIMEOUT = 60.0  # without a DH parameter file, ngIRCd makes one first (about 1 s here)
STOP_TIMEOUT = 30.0
ATTEMPTS = 3  # a free port can be taken between choosing it and ngIRCd binding it
PRIORITY = "NORMAL:-VERS-ALL:+VERS-TLS1.3"  # GnuTLS: TLS 1.3 only
_READY = re.compile(r'Server "[^"]+" \(on "[^"]*"\) ready\.')
_LISTENING = re.compile(r"Now listening on \[127\.0\.0\.1\]:(\d+)")
_LEVELS = {"0": "EMERG", "1": "ALERT", "2": "CRIT", "3": "ERROR", "4": "WARNING"}
_LINE = re.compile(r"^\[\d+:(\d)\s+\d+\] (.*)$")
TEMP_PREFIX = "securechat-bench-ngircd-"  # its own directory: `nobody` must reach it


def version() -> str | None:
    """``ngircd --version``'s first line, None if ngIRCd is not installed."""
    binary = shutil.which("ngircd")
    if binary is None:
        return None
    found = subprocess.run(  # noqa: S603 (a fixed command)
        [binary, "--version"], capture_output=True, text=True, timeout=30, check=False
    )
    return (found.stdout.splitlines() or ["?"])[0].strip()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def config_text(port: int, password: str, cert: Path, key: Path, include: Path) -> str:
    return f"""\
# Written by the securechat benchmark (benchmarks/ngircd.py).
[Global]
Name = irc.bench
Info = securechat benchmark peer
AdminInfo1 = securechat benchmark
AdminInfo2 = loopback only
AdminEMail = bench@localhost
Listen = 127.0.0.1
MotdPhrase = bench
[Limits]
MaxConnections = 0
MaxConnectionsIP = 0
MaxJoins = 0
MaxNickLength = 30
MaxPenaltyTime = 0
PingTimeout = 3600
PongTimeout = 3600
IdleTimeout = 0
[Options]
DNS = no
Ident = no
PAM = no
IncludeDir = {include}
[SSL]
CertFile = {cert}
KeyFile = {key}
CipherList = {PRIORITY}
Ports = {port}
[Operator]
Name = {OPERATOR}
Password = {password}
"""


class NgircdServer:
    """One private ngIRCd process; the interface the sessions and spans use of
    :class:`~benchmarks.driver.BenchServer`."""

    redis = None  # never a cluster
    worker_pids: list[int] = []  # noqa: RUF012 (never changed: one process)
    cluster_workers = 0

    def __init__(self, log_directory: Path, pki: Path, password: str) -> None:
        self.log_directory = log_directory
        log_directory.mkdir(parents=True, exist_ok=True)
        self.log_path = log_directory / "ngircd.log"
        self.pki = pki
        self.password = password
        self.directory: Path | None = None
        self.process: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.stopped: dict[str, Any] = {}
        found = version()
        if found is None:
            raise BenchError(
                "ngircd is not installed: `apt-get install -y ngircd` (`make bench` does it)"
            )
        self.settings: dict[str, Any] = {
            "server": found,
            "command": "ngircd --nodaemon --config FILE (as user nobody)",
            "tls": f"TLS 1.3 only (GnuTLS priority {PRIORITY}), the bench PKI's ECDSA P-256"
            " server certificate",
            "limits": {
                "MaxConnections": 0,
                "MaxConnectionsIP": 0,
                "MaxJoins": 0,
                "MaxPenaltyTime": 0,
                "PingTimeout": 3600,
                "PongTimeout": 3600,
            },
            "sender": "IRC operator with user mode +F (no throttling, 10 commands per read)",
            "options": {"DNS": "no", "Ident": "no", "PAM": "no"},
        }

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self) -> None:
        nobody = pwd.getpwnam("nobody")
        directory = Path(tempfile.mkdtemp(prefix=TEMP_PREFIX))
        self.directory = directory
        # benchmarks.run removes it (its name starts like the run's) if this run dies.
        (directory / "owner.pid").write_text(str(os.getpid()))
        include = directory / "conf.d"  # empty: nothing of /etc/ngircd comes in
        include.mkdir()
        cert, key = directory / "server.crt", directory / "server.key"
        shutil.copyfile(self.pki / "server.crt", cert)
        shutil.copyfile(self.pki / "server.key", key)
        config = directory / "ngircd.conf"
        for path in (directory, include, cert, key, config):
            if path == config:
                path.touch()
            os.chown(path, nobody.pw_uid, nobody.pw_gid)
            path.chmod(0o700 if path.is_dir() else 0o600)
        binary = shutil.which("ngircd") or "ngircd"
        for _ in range(ATTEMPTS):
            self.port = free_port()
            config.write_text(config_text(self.port, self.password, cert, key, include))
            with self.log_path.open("wb") as log:
                self.process = subprocess.Popen(  # noqa: S603 (a fixed command)
                    [binary, "--nodaemon", "--config", str(config)],
                    cwd=directory,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    user=nobody.pw_uid,
                    group=nobody.pw_gid,
                    extra_groups=[],
                    start_new_session=True,  # Ctrl-C reaches the coordinator only
                    preexec_fn=_die_with_parent,  # set after the change of user: it stays
                )
            if self._ready():
                return
        raise BenchError(f"ngircd did not start in {ATTEMPTS} attempts: {self.tail()}")

    def _ready(self) -> bool:
        """Wait for the TLS port and the ready line; False (process gone) to try another
        port when it could not bind."""
        assert self.process is not None
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            text = self.log()
            listening = _LISTENING.search(text)
            if listening and int(listening[1]) == self.port and _READY.search(text):
                return True
            if self.process.poll() is not None:
                if "Can't bind" in text or "Address already in use" in text:
                    return False
                raise BenchError(f"ngircd exited with {self.process.returncode}: {self.tail()}")
            time.sleep(0.05)
        self.stop()
        raise BenchError(f"ngircd did not listen within {START_TIMEOUT:.0f} s: {self.tail()}")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def tail(self, lines: int = 5) -> str:
        return " | ".join(self.log().strip().splitlines()[-lines:])

    def cpu(self) -> float:
        return cpu_seconds(self.pid)

    def cpu_by_process(self) -> dict[str, float]:
        return {"server": cpu_seconds(self.pid)}

    def pids(self) -> list[int]:
        return [self.pid]

    def memory(self) -> dict[str, int]:
        return memory_kib(self.pid)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> dict[str, Any]:
        """SIGTERM, SIGKILL if it takes too long; its directory goes either way."""
        try:
            return self._stop()
        finally:
            if self.directory is not None:
                shutil.rmtree(self.directory, ignore_errors=True)
                self.directory = None

    def _stop(self) -> dict[str, Any]:
        process = self.process
        if process is None or self.stopped:
            return self.stopped
        started = time.monotonic()
        crashed = process.poll() is not None
        if not crashed:
            process.send_signal(signal.SIGTERM)
        try:
            code = process.wait(STOP_TIMEOUT)
            killed = False
        except subprocess.TimeoutExpired:
            process.kill()
            code = process.wait()
            killed = True
        self.stopped = {
            "exit_code": code,
            "exited_before_stop": crashed,
            "stop_s": round(time.monotonic() - started, 2),
            "killed": killed,
            **summarise_log(self.log()),
        }
        return self.stopped


def summarise_log(text: str) -> dict[str, Any]:
    """ngIRCd's log lines (``[pid:level uptime] text``, syslog levels) per level, and
    the most frequent warnings and errors."""
    levels: Counter[str] = Counter()
    problems: Counter[str] = Counter()
    for line in text.splitlines():
        found = _LINE.match(line)
        if not found:
            continue
        level = _LEVELS.get(found[1], "INFO")
        levels[level] += 1
        if level != "INFO":
            problems[re.sub(r"\d+", "N", found[2])[:120]] += 1
    return {"log_lines": dict(levels), "log_problems": dict(problems.most_common(6))}
