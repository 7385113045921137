"""`securechat check-config` on good and broken configs; the server's certificate-expiry warning."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import trio

from securechat import certs
from securechat.cli import main

from .conftest import WAIT, Pki, config_data, server_process, write_toml


def check_config(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "securechat", "check-config", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def lines(result: subprocess.CompletedProcess[str]) -> dict[str, list[str]]:
    """The report's lines by status, as "topic text"; the last line is the tally."""
    report: dict[str, list[str]] = {"ok": [], "warning": [], "error": []}
    *checks, tally = result.stdout.strip().splitlines()
    for line in checks:
        status, topic, text = line.split(maxsplit=2)
        report[status].append(f"{topic} {text}")
    report["tally"] = [tally]
    return report


def write_config(tmp_path: Path, pki: Pki, hashes: dict[str, str], **server: Any) -> Path:
    config = write_toml(tmp_path / "server.toml", config_data(pki, hashes, **server))
    config.chmod(0o600)
    return config


def test_a_good_config_passes_every_check(
    tmp_path: Path, pki: Pki, password_hashes: dict[str, str]
) -> None:
    config = write_config(tmp_path, pki, password_hashes)
    result = check_config(config)
    assert result.returncode == 0, result.stdout + result.stderr
    report = lines(result)
    assert report["warning"] == report["error"] == []
    topics = [line.split()[0] for line in report["ok"]]
    assert topics == [
        "config",
        "config",
        "certificate",
        "key",
        "host",
        "ca",
        "tls",
        "database",
        "server",
        "port",
    ]
    assert report["tally"] == [f"{config}: 0 errors, 0 warnings"]
    assert any("127.0.0.1 is one of the certificate's names" in line for line in report["ok"])
    assert result.stderr == ""


def other_server_key(tmp_path: Path, pki: Pki, rogue_pki: Pki) -> dict[str, Any]:
    key = tmp_path / "rogue.key"
    shutil.copy(rogue_pki.key("server"), key)
    return {"key": str(key)}


def readable_key(tmp_path: Path, pki: Pki, rogue_pki: Pki) -> dict[str, Any]:
    key = tmp_path / "open.key"
    shutil.copy(pki.key("server"), key)
    key.chmod(0o644)
    return {"key": str(key)}


def server_cert_as_ca(tmp_path: Path, pki: Pki, rogue_pki: Pki) -> dict[str, Any]:
    return {"ca": str(pki.cert("server"))}


def garbage_cert(tmp_path: Path, pki: Pki, rogue_pki: Pki) -> dict[str, Any]:
    cert = tmp_path / "garbage.crt"
    cert.write_text("not a certificate\n")
    return {"cert": str(cert)}


def host_not_in_certificate(tmp_path: Path, pki: Pki, rogue_pki: Pki) -> dict[str, Any]:
    return {"host": "127.0.0.2"}  # on Linux every 127/8 address is loopback: bindable


@pytest.mark.parametrize(
    ("breakage", "status", "topic", "fragment"),
    [
        (other_server_key, "error", "key", "does not belong to"),
        (readable_key, "error", "key", "chmod 600"),
        (server_cert_as_ca, "error", "ca", "is not a CA certificate"),
        (garbage_cert, "error", "certificate", "not a PEM certificate"),
        (host_not_in_certificate, "warning", "host", "--renew server --san 127.0.0.2"),
    ],
)
def test_certificate_and_key_problems(
    tmp_path: Path,
    pki: Pki,
    rogue_pki: Pki,
    password_hashes: dict[str, str],
    breakage: Callable[[Path, Pki, Pki], dict[str, Any]],
    status: str,
    topic: str,
    fragment: str,
) -> None:
    config = write_config(tmp_path, pki, password_hashes, **breakage(tmp_path, pki, rogue_pki))
    result = check_config(config)
    assert result.returncode == (2 if status == "error" else 0), result.stdout
    found = [line for line in lines(result)[status] if line.startswith(topic)]
    assert len(found) == 1, result.stdout
    assert fragment in found[0]


def make_pki(tmp_path: Path, *, days: int, issued_days_ago: int = 0) -> Pki:
    out = tmp_path / "pki"
    certs.generate(out, days=days, now=datetime.now(UTC) - timedelta(days=issued_days_ago))
    return Pki(out)


def test_a_certificate_that_expires_soon_is_a_warning_and_an_expired_one_an_error(
    tmp_path: Path, password_hashes: dict[str, str]
) -> None:
    soon = make_pki(tmp_path / "soon", days=10)
    result = check_config(write_config(tmp_path, soon, password_hashes))
    assert result.returncode == 0, result.stdout
    [warning] = lines(result)["warning"]
    assert warning.startswith(f"certificate {soon.cert('server')}: expires ")
    assert "(in 10 days); renew it with: securechat gen-certs --out" in warning

    expired = make_pki(tmp_path / "expired", days=5, issued_days_ago=30)
    result = check_config(write_config(tmp_path, expired, password_hashes))
    assert result.returncode == 2, result.stdout
    [error] = lines(result)["error"]
    assert error.startswith(f"certificate {expired.cert('server')}: EXPIRED ")


def test_config_file_problems(tmp_path: Path, pki: Pki, password_hashes: dict[str, str]) -> None:
    config = write_config(tmp_path, pki, password_hashes)
    config.chmod(0o644)  # it holds password hashes
    result = check_config(config)
    assert result.returncode == 0
    [warning] = lines(result)["warning"]
    assert warning.startswith(f"config {config} holds password hashes and is readable")

    config.write_text("[server]\nprot = 8000\n")
    result = check_config(config)
    assert result.returncode == 2
    assert result.stdout.splitlines() == [
        f"error   config      {config}: server.prot: unknown key",
        f"{config}: 1 error, 0 warnings",
    ]

    result = check_config(tmp_path / "missing.toml")
    assert result.returncode == 2
    assert "missing.toml: file not found" in result.stdout


def test_database_problems(tmp_path: Path, pki: Pki, password_hashes: dict[str, str]) -> None:
    data = config_data(pki, password_hashes)
    (tmp_path / "a-file").write_text("")
    data["storage"] = {"path": str(tmp_path / "a-file" / "chat.db")}
    config = write_toml(tmp_path / "server.toml", data)
    config.chmod(0o600)
    result = check_config(config)
    assert result.returncode == 2
    [error] = lines(result)["error"]
    assert error == f"database {tmp_path / 'a-file' / 'chat.db'} cannot be created:" + (
        f" {tmp_path / 'a-file'} is not a directory"
    )

    not_sqlite = tmp_path / "chat.db"
    not_sqlite.write_text("this is not a database, it is much longer than a header " * 20)
    not_sqlite.chmod(0o600)
    data["storage"] = {"path": str(not_sqlite)}
    write_toml(config, data)
    result = check_config(config)
    assert result.returncode == 2
    [error] = lines(result)["error"]
    assert error.startswith(f"database {not_sqlite}: not a usable SQLite database")


def test_a_port_in_use_is_an_error(
    tmp_path: Path, pki: Pki, password_hashes: dict[str, str]
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = check_config(write_config(tmp_path, pki, password_hashes, port=port))
    assert result.returncode == 2
    assert lines(result)["error"] == [
        f"port 127.0.0.1:{port} is in use by another program (another server?)"
    ]


async def test_check_config_knows_the_running_server(
    tmp_path: Path, pki: Pki, password_hashes: dict[str, str]
) -> None:
    config = write_config(tmp_path, pki, password_hashes)
    async with server_process(config, pki) as server:
        with trio.fail_after(WAIT * 3):
            result = await trio.to_thread.run_sync(check_config, config)
        assert result.returncode == 0, result.stdout
        report = lines(result)
        assert (
            f"server a server is running with this config (pid {server.process.pid})"
            in (report["ok"])
        )
        assert not any(line.startswith("port") for line in report["ok"])  # it has the port


async def test_server_warns_at_start_and_reload_when_its_certificate_expires_soon(
    tmp_path: Path, password_hashes: dict[str, str]
) -> None:
    soon = make_pki(tmp_path, days=10)
    config = write_config(tmp_path, soon, password_hashes)
    warning = (
        rf"WARNING securechat: the server certificate {soon.cert('server')}: expires \S+ \S+ UTC"
        r" \(in 10 days\); renew it with: securechat gen-certs"
    )
    async with server_process(config, soon) as server:
        await server.wait_for_log(warning)
        server.process.send_signal(signal.SIGHUP)
        await server.wait_for_log(rf"config reloaded(.|\n)*{warning}")
        server.process.send_signal(signal.SIGTERM)
        assert await server.wait() == 0
    assert "the CA" not in server.log()  # the CA has ten years left


async def test_reload_refuses_a_key_the_server_would_not_load(
    tmp_path: Path, pki: Pki, password_hashes: dict[str, str]
) -> None:
    key = tmp_path / "server.key"
    shutil.copy(pki.key("server"), key)
    config = write_config(tmp_path, pki, password_hashes, key=str(key))
    async with server_process(config, pki) as server:
        key.chmod(0o640)
        with trio.fail_after(WAIT * 3):
            result = await trio.run_process(
                [sys.executable, "-m", "securechat", "reload", "--config", str(config)],
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
        assert result.returncode == 2
        assert result.stderr.decode() == (
            f"securechat: error: {key} is accessible by group or others (mode 0640);"
            f" fix with: chmod 600 {key}; nothing sent to the server\n"
        )
        server.process.send_signal(signal.SIGTERM)
        assert await server.wait() == 0
    assert "reloading" not in server.log()


@pytest.mark.parametrize(
    ("command", "expected"),
    [("check-config", "ok, warning or error"), ("reload", "pidfile beside its database")],
)
def test_help(command: str, expected: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([command, "--help"]) == 0
    assert expected in " ".join(capsys.readouterr().out.split())
