"""The server as a service: its pidfile, `securechat reload`, and SIGHUP from a closed terminal.

The terminal tests give a real ``securechat server`` process a controlling
terminal (a pty whose slave end is its stdin and stdout, made its session's
terminal with TIOCSCTTY) and close the master end, which is what closing a
terminal window or losing an ssh connection does.
"""

from __future__ import annotations

import fcntl
import gc
import logging
import os
import pty
import re
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
import warnings
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from securechat.cli import main
from securechat.protocol import Error, ErrorCode
from securechat.service import (
    HangupAction,
    PidFile,
    PrivateLogFile,
    ServiceError,
    pidfile_path,
    running_pid,
    sighup_action,
)

from .conftest import (
    WAIT,
    Endpoint,
    Pki,
    ServerProcess,
    config_data,
    receive_closed,
    server_process,
    write_toml,
)

SERVER = (sys.executable, "-m", "securechat", "server")


def server_config(tmp_path: Path, pki: Pki, hashes: dict[str, str]) -> Path:
    config = write_toml(tmp_path / "server.toml", config_data(pki, hashes))
    config.chmod(0o600)  # it holds password hashes
    return config


def default_pidfile(config: Path) -> Path:
    return config.parent / "data" / "securechat.pid"


async def securechat(*args: str) -> subprocess.CompletedProcess[bytes]:
    with trio.fail_after(WAIT * 3):
        return await trio.run_process(
            [sys.executable, "-m", "securechat", *args],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )


def one_error_line(result: subprocess.CompletedProcess[bytes]) -> str:
    lines = result.stderr.decode().strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("securechat: error: ")
    return lines[0]


# --- the pidfile --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("database", "pidfile"),
    [
        ("data/securechat.db", "data/securechat.pid"),
        ("/var/lib/chat/history", "/var/lib/chat/history.pid"),
        ("data/odd.pid", "data/odd.pid.pid"),
    ],
)
def test_pidfile_sits_beside_the_database(database: str, pidfile: str) -> None:
    assert pidfile_path(Path(database)) == Path(pidfile)


def test_pidfile_is_private_locked_and_removed(tmp_path: Path) -> None:
    path = tmp_path / "data" / "securechat.pid"
    held = PidFile.acquire(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert path.read_text() == f"{os.getpid()}\n"
    assert running_pid(path) == os.getpid()
    with pytest.raises(ServiceError, match=rf"another securechat server \(pid {os.getpid()}\)"):
        PidFile.acquire(path)
    held.release()
    assert not path.exists()
    assert running_pid(path) is None


def test_a_stale_pidfile_is_not_a_running_server_and_is_taken_over(tmp_path: Path) -> None:
    path = tmp_path / "securechat.pid"
    path.write_text("1\n")  # pid 1 exists: only the missing lock says the file is stale
    path.chmod(0o644)
    assert running_pid(path) is None
    held = PidFile.acquire(path)
    try:
        assert path.read_text() == f"{os.getpid()}\n"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    finally:
        held.release()


def test_a_start_waits_out_a_reload_glancing_at_a_stale_pidfile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "securechat.pid"
    path.write_text("1\n")
    glance = os.open(path, os.O_RDONLY)
    fcntl.flock(glance, fcntl.LOCK_SH)  # what running_pid holds for a moment
    waits: list[float] = []

    def glance_ends(seconds: float) -> None:  # the server's wait between two tries
        if not waits:
            os.close(glance)
        waits.append(seconds)

    monkeypatch.setattr(time, "sleep", glance_ends)  # the one service.py calls
    held = PidFile.acquire(path)
    held.release()
    assert len(waits) == 1


def test_a_symlinked_pidfile_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_text("keep me\n")
    path = tmp_path / "securechat.pid"
    path.symlink_to(target)
    with pytest.raises(ServiceError, match="symbolic link"):
        PidFile.acquire(path)
    assert target.read_text() == "keep me\n"


@pytest.mark.parametrize(
    ("had_terminal", "terminal_now", "ignored_at_start", "action"),
    [
        (False, False, False, HangupAction.RELOAD),  # systemd, setsid: the daemon convention
        (False, False, True, HangupAction.RELOAD),
        (True, True, False, HangupAction.RELOAD),  # kill -HUP, the terminal still open
        (True, True, True, HangupAction.RELOAD),
        (True, False, False, HangupAction.SHUTDOWN),  # the terminal was closed
        (True, False, True, HangupAction.IGNORE),  # ... but it was started with nohup
    ],
)
def test_what_sighup_means(
    had_terminal: bool, terminal_now: bool, ignored_at_start: bool, action: HangupAction
) -> None:
    assert (
        sighup_action(
            had_terminal=had_terminal,
            terminal_now=terminal_now,
            ignored_at_start=ignored_at_start,
        )
        is action
    )


# --- the server process and `securechat reload` ---------------------------------------------


async def test_server_logs_pid_and_config_and_reloads_on_securechat_reload(
    tmp_path: Path, pki: Pki, password_hashes: dict[str, str]
) -> None:
    config = server_config(tmp_path, pki, password_hashes)
    pidfile = default_pidfile(config)
    async with server_process(config, pki) as server:
        pid = server.process.pid
        await server.wait_for_log(
            rf"INFO securechat: securechat \S+ pid {pid}: config {config.resolve()},"
            rf" pidfile {pidfile.resolve()}"
        )
        assert pidfile.read_text() == f"{pid}\n"
        assert stat.S_IMODE(pidfile.stat().st_mode) == 0o600

        data = config_data(pki, password_hashes)
        data["users"]["erin"] = {}
        write_toml(config, data)
        result = await securechat("reload", "--config", str(config))
        assert result.returncode == 0, result.stderr
        assert f"reload requested: server pid {pid}" in result.stdout.decode()
        await server.wait_for_log(
            rf"received SIGUSR1: reloading {config}(.|\n)*config reloaded: .*added=erin"
        )

        # A second server on the same database is refused before it touches it.
        second = await securechat("server", "--config", str(config))
        assert second.returncode == 1
        assert f"another securechat server (pid {pid})" in one_error_line(second)

        server.process.send_signal(signal.SIGTERM)
        assert await server.wait() == 0
    assert not pidfile.exists()


async def test_reload_without_a_running_server(
    tmp_path: Path, pki: Pki, password_hashes: dict[str, str]
) -> None:
    config = server_config(tmp_path, pki, password_hashes)
    result = await securechat("reload", "--config", str(config))
    assert result.returncode == 1
    assert "no securechat server is running with" in one_error_line(result)

    pidfile = default_pidfile(config)
    pidfile.parent.mkdir()
    pidfile.write_text(f"{os.getpid()}\n")  # a live pid, but nobody holds the lock: stale
    result = await securechat("reload", "--config", str(config))
    assert result.returncode == 1
    assert "a stale one" in one_error_line(result)


async def test_reload_refuses_an_invalid_config_and_leaves_the_server_alone(
    tmp_path: Path, pki: Pki, password_hashes: dict[str, str]
) -> None:
    config = server_config(tmp_path, pki, password_hashes)
    async with server_process(config, pki) as server:
        good = config.read_text()
        config.write_text(good + "[server.oops]\n")
        result = await securechat("reload", "--config", str(config))
        assert result.returncode == 2
        assert one_error_line(result).endswith(
            f"{config}: server.oops: unknown key; nothing sent to the server"
        )
        config.write_text(good)
        server.process.send_signal(signal.SIGTERM)
        assert await server.wait() == 0
    assert "reloading" not in server.log()


# --- a server in a terminal -------------------------------------------------------------------

# Runs in the child: a session of its own with the pty (its stdin) as the
# controlling terminal, like a shell in a terminal window gives its jobs;
# optionally with SIGHUP ignored, as nohup starts a program.
_IN_A_TERMINAL = """
import fcntl, os, signal, sys, termios
os.setsid()
fcntl.ioctl(0, termios.TIOCSCTTY, 0)
# As a shell in a terminal starts it: SIGHUP ignored only under nohup (the test run
# itself may be under nohup, and an ignored signal stays ignored across exec).
signal.signal(signal.SIGHUP, signal.SIG_IGN if sys.argv[1] == "nohup" else signal.SIG_DFL)
os.execv(sys.executable, [sys.executable, "-m", "securechat", *sys.argv[2:]])
"""


class Terminal:
    """The master end of a pty: what a terminal emulator or sshd holds."""

    def __init__(self, master: int) -> None:
        self._master: int | None = master

    def close(self) -> None:
        """Hang up, as closing the terminal window does."""
        if self._master is not None:
            os.close(self._master)
            self._master = None


@asynccontextmanager
async def server_in_a_terminal(
    config: Path, pki: Pki, *, nohup: bool = False
) -> AsyncIterator[tuple[ServerProcess, Terminal]]:
    """A server whose controlling terminal is a pty."""
    master, slave = pty.openpty()
    terminal = Terminal(master)
    mode = "nohup" if nohup else "-"
    process = await trio.lowlevel.open_process(
        [sys.executable, "-c", _IN_A_TERMINAL, mode, "server", "--config", str(config)],
        stdin=slave,
        stdout=slave,
        stderr=subprocess.PIPE,
    )
    os.close(slave)
    assert process.stderr is not None
    running = ServerProcess(process, pki)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(running.collect, process.stderr)
            found = await running.wait_for_log(r"\[SEARCHING\] listening on 127.0.0.1:(\d+)")
            running._endpoint = Endpoint("127.0.0.1", int(found[1]), pki)
            yield running, terminal
            if process.poll() is None:
                process.kill()
    finally:
        if running._endpoint is not None:
            await running._endpoint.aclose()
        if process.poll() is None:
            process.kill()
        with trio.move_on_after(WAIT):
            await process.wait()
        await process.stderr.aclose()
        terminal.close()


async def test_closing_the_terminal_stops_the_server_while_kill_hup_reloads(
    tmp_path: Path, pki: Pki, password_hashes: dict[str, str]
) -> None:
    config = server_config(tmp_path, pki, password_hashes)
    async with server_in_a_terminal(config, pki) as (server, terminal):
        bob = await server.endpoint.login("bob")
        server.process.send_signal(signal.SIGHUP)  # the terminal is open: someone means it
        await server.wait_for_log("received SIGHUP: reloading(.|\n)*config reloaded")

        terminal.close()
        await server.wait_for_log("received SIGHUP: the terminal was closed, shutting down")
        received = await receive_closed(bob)
        assert [e.code for e in received if isinstance(e, Error)] == [ErrorCode.SERVER_SHUTDOWN]
        assert await server.wait() == 0
    assert "server stopped" in server.log()
    assert not default_pidfile(config).exists()


async def test_a_server_started_with_nohup_outlives_its_terminal_and_still_reloads(
    tmp_path: Path, pki: Pki, password_hashes: dict[str, str]
) -> None:
    config = server_config(tmp_path, pki, password_hashes)
    async with server_in_a_terminal(config, pki, nohup=True) as (server, terminal):
        terminal.close()
        await server.wait_for_log("the terminal was closed; started with SIGHUP ignored")
        await server.endpoint.login("bob")  # still serving
        result = await securechat("reload", "--config", str(config))
        assert result.returncode == 0, result.stderr
        await server.wait_for_log("received SIGUSR1: reloading(.|\n)*config reloaded")
        server.process.send_signal(signal.SIGTERM)
        assert await server.wait() == 0


# --- where the log goes ---------------------------------------------------------------------


async def wait_for_text(path: Path, text: str) -> str:
    """Poll a file the server writes (it has no event to wait on) until it holds ``text``."""
    trio_path = trio.Path(path)
    with trio.fail_after(WAIT):
        while True:
            content = await trio_path.read_text() if await trio_path.exists() else ""
            if text in content:
                return content
            await trio.sleep(0.01)


async def test_log_file_is_private_and_reopened_after_logrotate_moves_it(
    tmp_path: Path, pki: Pki, password_hashes: dict[str, str]
) -> None:
    config = server_config(tmp_path, pki, password_hashes)
    log_file = tmp_path / "logs" / "securechat.log"
    log_file.parent.mkdir()
    process = await trio.lowlevel.open_process(
        [*SERVER, "--config", str(config), "--log-file", str(log_file)],
        stdin=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    assert process.stderr is not None
    try:
        await wait_for_text(log_file, "[SEARCHING] listening on")
        assert stat.S_IMODE(log_file.stat().st_mode) == 0o600
        log_file.rename(log_file.with_suffix(".log.1"))  # what logrotate does
        result = await securechat("reload", "--config", str(config))
        assert result.returncode == 0, result.stderr
        reopened = await wait_for_text(log_file, "config reloaded")
        assert "received SIGUSR1: reloading" in reopened
        assert stat.S_IMODE(log_file.stat().st_mode) == 0o600
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(WAIT):
            assert await process.wait() == 0
        assert "server stopped" in log_file.read_text()
        assert await process.stderr.receive_some() == b""  # nothing went to stderr
    finally:
        if process.poll() is None:
            process.kill()
        await process.wait()
        await process.stderr.aclose()


async def test_a_log_file_that_cannot_be_opened_is_one_error_line(
    tmp_path: Path, pki: Pki, password_hashes: dict[str, str]
) -> None:
    config = server_config(tmp_path, pki, password_hashes)
    missing = tmp_path / "no-such-dir" / "securechat.log"
    result = await securechat("server", "--config", str(config), "--log-file", str(missing))
    assert result.returncode == 1
    assert f"cannot open the log file {missing}: No such file or directory" in one_error_line(
        result
    )
    assert not default_pidfile(config).exists()


@pytest.mark.parametrize("in_the_journal", [True, False])
def test_under_systemd_log_lines_carry_their_priority_instead_of_a_timestamp(
    tmp_path: Path, pki: Pki, password_hashes: dict[str, str], in_the_journal: bool
) -> None:
    # systemd gives a service's stderr to the journal and says so in
    # JOURNAL_STREAM (device:inode of that stream); here a file stands in.
    config = server_config(tmp_path, pki, password_hashes)
    stderr_path = tmp_path / "stderr"
    with socket.socket() as taken, stderr_path.open("wb") as stderr:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        info = os.fstat(stderr.fileno())
        stream = f"{info.st_dev}:{info.st_ino}" if in_the_journal else f"{info.st_dev}:1"
        result = subprocess.run(
            [*SERVER, "--config", str(config), "--port", str(port)],
            stdin=subprocess.DEVNULL,
            stderr=stderr,
            env={**os.environ, "JOURNAL_STREAM": stream},
            timeout=60,
            check=False,
        )
    assert result.returncode == 1  # the port is taken: the start line is logged all the same
    first = stderr_path.read_text().splitlines()[0]
    if in_the_journal:
        assert re.fullmatch(r"<6>securechat: securechat \S+ pid \d+: config .*", first)
    else:
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\S+Z INFO securechat: securechat \S+ pid .*", first)


# --- systemd --------------------------------------------------------------------------------


async def test_the_server_tells_systemd_when_it_listens(
    tmp_path: Path, pki: Pki, password_hashes: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    config = server_config(tmp_path, pki, password_hashes)
    name = f"securechat-test-{os.getpid()}-{secrets.token_hex(4)}"  # an abstract socket
    with trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        await notify.bind("\0" + name)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        async with server_process(config, pki) as server:
            with trio.fail_after(WAIT):
                message = await notify.recv(4096)
            port = server.endpoint.port
            assert message == f"READY=1\nSTATUS=listening on 127.0.0.1:{port}".encode()


async def test_a_notify_socket_that_is_not_there_is_a_warning(
    tmp_path: Path, pki: Pki, password_hashes: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    config = server_config(tmp_path, pki, password_hashes)
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone"))
    async with server_process(config, pki) as server:
        await server.wait_for_log(f"WARNING securechat: cannot notify systemd at '{tmp_path}/gone'")
        await server.endpoint.login("bob")


UNIT = Path(__file__).parent.parent / "contrib" / "securechat.service"


def unit_settings(text: str) -> dict[str, list[str]]:
    """``Key=value`` lines of a unit file, every value of each key (sections merged)."""
    settings: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    return settings


def test_the_systemd_unit_reloads_with_securechat_reload_and_is_hardened() -> None:
    settings = unit_settings(UNIT.read_text())
    program = "/opt/securechat/.venv/bin/securechat"
    config = "--config /etc/securechat/securechat.toml"
    assert settings["ExecStart"] == [f"{program} server {config}"]
    assert settings["ExecReload"] == [f"{program} reload {config}"]
    assert settings["Type"] == ["notify"]
    assert settings["User"] == ["securechat"]
    for key, value in [
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("PrivateDevices", "yes"),
        ("ReadWritePaths", "/var/lib/securechat"),
        ("StateDirectory", "securechat"),
        ("UMask", "0077"),
        ("CapabilityBoundingSet", ""),
    ]:
        assert settings[key] == [value], key


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze here")
def test_systemd_analyze_verifies_the_unit(tmp_path: Path) -> None:
    # verify insists that ExecStart's program exists: point it at this venv's.
    program = Path(sys.executable).parent / "securechat"
    assert program.exists()
    unit = tmp_path / "securechat.service"
    unit.write_text(UNIT.read_text().replace("/opt/securechat/.venv/bin/securechat", str(program)))
    result = subprocess.run(
        ["systemd-analyze", "verify", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == "", result.stderr


def test_a_refused_start_leaves_no_handler_or_pidfile_behind(
    tmp_path: Path, pki: Pki, password_hashes: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    config = server_config(tmp_path, pki, password_hashes)
    held = PidFile.acquire(default_pidfile(config))  # "another server" on this database
    try:
        log_file = tmp_path / "securechat.log"
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert main(["server", "--config", str(config), "--log-file", str(log_file)]) == 1
            gc.collect()  # an unclosed log file would say so now
        assert [w.message for w in caught] == []
        assert "another securechat server" in capsys.readouterr().err
        assert not any(isinstance(h, PrivateLogFile) for h in logging.getLogger().handlers)
        assert default_pidfile(config).read_text() == f"{os.getpid()}\n"  # still the holder's
    finally:
        held.release()


async def test_a_reload_keeps_the_flags_the_server_was_started_with(
    tmp_path: Path, pki: Pki, password_hashes: dict[str, str]
) -> None:
    # `make run PORT=9000` then `securechat reload`: the flag is no change in the file.
    config = server_config(tmp_path, pki, password_hashes)
    async with server_process(config, pki, "--client-certs", "required") as server:
        result = await securechat("reload", "--config", str(config))
        assert result.returncode == 0, result.stderr
        await server.wait_for_log("config reloaded")
        assert "differ from the running settings" not in server.log()
        data = config_data(pki, password_hashes, max_rooms=5)  # a change in the file
        write_toml(config, data)
        result = await securechat("reload", "--config", str(config))
        assert result.returncode == 0, result.stderr
        await server.wait_for_log("differ from the running settings(.|\n)*config reloaded")
