"""The ``securechat`` command as a user runs it: exit codes, one-line errors, real processes."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from securechat.certs import generate
from securechat.cli import main
from securechat.passwords import verify_password
from securechat.protocol import Error, ErrorCode, Message, Say

from .conftest import (
    PASSWORDS,
    WAIT,
    Pki,
    RunningServer,
    config_data,
    receive_closed,
    receive_type,
    server_process,
    write_toml,
)

EXAMPLE_CONFIG = Path(__file__).parent.parent / "config.example.toml"


def run_cli(
    *args: str, stdin: str = "", env: dict[str, str] | None = None, umask: int = -1
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "securechat", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
        check=False,
        umask=umask,  # -1: inherit ours
    )


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def assert_one_line_error(stderr: str, *fragments: str) -> None:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("securechat: error: ")
    assert "Traceback" not in stderr
    for fragment in fragments:
        assert fragment in lines[0]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# --- help and simple commands ------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        ([], "gen-certs"),
        (["gen-certs"], "--client"),
        (["hash-password"], "Argon2id"),
        (["server"], "--config"),
        (["client"], "send>>>"),
        (["schema"], "JSON Schema"),
    ],
)
def test_help(command: list[str], expected: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*command, "--help"]) == 0
    assert expected in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["no-such-command"], "invalid choice"),
        ([], "required"),
        (["server", "--port", "70000"], "port out of range"),
        (["client", "--user", "Bob"], "invalid username"),
        (["server", "--client-certs", "maybe"], "invalid choice"),
    ],
)
def test_usage_errors_exit_2_with_one_line(
    argv: list[str], fragment: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    assert_one_line_error(capsys.readouterr().err, fragment)


def test_schema_prints_both_directions(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert set(schema) == {"client_to_server", "server_to_client"}
    assert "hello" in json.dumps(schema["client_to_server"])
    assert "welcome" in json.dumps(schema["server_to_client"])


def test_gen_certs_writes_and_keeps(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "certs"
    assert main(["gen-certs", "--out", str(out), "--client", "zed", "--san", "chat.example"]) == 0
    names = sorted(path.name for path in out.iterdir())
    assert names == ["ca.crt", "ca.key", "server.crt", "server.key", "zed.crt", "zed.key"]
    assert all(
        (out / name).stat().st_mode & 0o777 == 0o600 for name in names if name.endswith(".key")
    )
    before = (out / "server.key").read_bytes()
    capsys.readouterr()
    assert main(["gen-certs", "--out", str(out)]) == 0
    assert "kept" in capsys.readouterr().out
    assert (out / "server.key").read_bytes() == before
    assert main(["gen-certs", "--out", str(out), "--renew", "server"]) == 0
    assert (out / "server.key").read_bytes() != before


def test_gen_certs_lists_every_certificate_and_its_expiry(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "certs"
    assert main(["gen-certs", "--out", str(out), "--client", "zed"]) == 0
    lines = capsys.readouterr().out.splitlines()
    pattern = (
        r"(made|kept|renewed) +(\S+)\.crt, \S+\.key: (.*); expires"
        r" (\d{4}-\d\d-\d\d \d\d:\d\d) UTC \(in (\d+) days\)"
    )
    matches = [re.fullmatch(pattern, line) for line in lines]
    assert all(matches), lines
    listed = {Path(m[2]).name: (m[1], m[3], int(m[5])) for m in matches if m}
    assert listed == {
        "ca": ("made", "the CA", 3650),
        "server": ("made", listed["server"][1], 366),
        "zed": ("made", "client zed", 366),
    }
    assert listed["server"][1].startswith("server for localhost, 127.0.0.1, ::1")

    assert main(["gen-certs", "--out", str(out), "--days", "30", "--renew", "zed"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == ["kept", "kept", "renewed"]
    assert lines[2].endswith("(in 30 days)")


def test_gen_certs_flags_certificates_that_expire_soon_or_are_foreign(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "certs"
    generate(out, clients=["alice"], now=datetime.now(UTC) - timedelta(days=350))
    generate(tmp_path / "other", clients=["bob"])
    for name in ("bob.crt", "bob.key"):
        (out / name).write_bytes((tmp_path / "other" / name).read_bytes())
    assert main(["gen-certs", "--out", str(out)]) == 0
    lines = {
        Path(line.split()[1].rstrip(",")).stem: line
        for line in capsys.readouterr().out.splitlines()
    }
    assert lines["server"].endswith("(in 16 days); renew with --renew server")
    assert lines["alice"].endswith("(in 16 days); renew with --renew alice")
    assert lines["bob"].endswith("; NOT signed by this directory's ca.crt; renew with --renew bob")
    assert not lines["ca"].endswith("--new-ca")


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["--force"], ["--force is gone", "--renew server", "--new-ca"]),
        (["--days", "367"], ["--days", "between 1 and 366"]),
        (["--days", "0"], ["--days", "between 1 and 366"]),
        (["--renew", "ca"], ["--new-ca"]),
        (["--renew", "Bob"], ["--renew", "invalid username"]),
        (["--client", "ca"], ["reserved"]),
        (["--san", "chat.example.org"], ["does not cover chat.example.org", "--renew server"]),
    ],
)
def test_gen_certs_refusals_are_one_line_and_change_nothing(
    tmp_path: Path, args: list[str], fragments: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "certs"
    assert main(["gen-certs", "--out", str(out)]) == 0
    before = {path.name: path.read_bytes() for path in out.iterdir()}
    capsys.readouterr()
    assert main(["gen-certs", "--out", str(out), *args]) == 2
    assert_one_line_error(capsys.readouterr().err, *fragments)
    assert {path.name: path.read_bytes() for path in out.iterdir()} == before


def test_make_run_certificates_on_a_fresh_clone(tmp_path: Path) -> None:
    # The Makefile's certs/server.crt target, in a clone: certs/ exists, holding its README.
    out = tmp_path / "certs"
    out.mkdir()
    (out / "README.md").write_text("# certs/\n")
    result = run_cli("gen-certs", "--out", str(out), "--client", "alice", "--client", "bob")
    assert result.returncode == 0, result.stderr
    names = sorted(path.name for path in out.iterdir())
    assert names == sorted(
        [
            "README.md",
            *(f"{s}.{e}" for s in ("ca", "server", "alice", "bob") for e in ("crt", "key")),
        ]
    )
    assert {mode(key) for key in out.glob("*.key")} == {0o600}
    assert len(result.stdout.splitlines()) == 4


def test_gen_certs_makes_private_directories_even_with_umask_000(tmp_path: Path) -> None:
    # Under umask 000 a plain mkdir makes the directory 0777: anyone could swap ca.crt.
    out = tmp_path / "new" / "certs"
    result = run_cli("gen-certs", "--out", str(out), "--client", "zed", umask=0)
    assert result.returncode == 0, result.stderr
    assert mode(out) == 0o700
    assert mode(out.parent) == 0o700
    assert {mode(key) for key in out.glob("*.key")} == {0o600}
    assert {mode(cert) for cert in out.glob("*.crt")} == {0o644}


def test_gen_certs_takes_write_access_to_its_directory_away_from_others(tmp_path: Path) -> None:
    # What a fresh clone's certs/ (tracked in git for its README) looks like under umask 000.
    out = tmp_path / "certs"
    out.mkdir()
    out.chmod(0o777)
    result = run_cli("gen-certs", "--out", str(out), umask=0)
    assert result.returncode == 0, result.stderr
    assert mode(out) == 0o755
    warnings = result.stderr.splitlines()
    assert len(warnings) == 1, result.stderr
    assert warnings[0].startswith(f"securechat: warning: {out} was writable by group or others")
    assert warnings[0].endswith("(mode 0777); it is now 0755")  # nothing in it to distrust yet
    out.chmod(0o707)
    result = run_cli("gen-certs", "--out", str(out), umask=0)
    assert result.returncode == 0, result.stderr
    assert mode(out) == 0o705
    assert result.stderr.splitlines() == [
        f"securechat: warning: {out} was writable by group or others (mode 0707); it is now 0705."
        " Its certificates and keys could have been replaced: if you cannot rule that out, make"
        " a new CA with --new-ca"
    ]


def test_gen_certs_leaves_a_directory_shared_for_reading_as_it_is(tmp_path: Path) -> None:
    out = tmp_path / "certs"
    out.mkdir()
    out.chmod(0o750)
    result = run_cli("gen-certs", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert mode(out) == 0o750


def test_gen_certs_rejects_bad_names(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["gen-certs", "--out", str(tmp_path), "--client", "Bad Name"]) == 2
    assert_one_line_error(capsys.readouterr().err, "--client", "invalid username")
    assert main(["gen-certs", "--out", str(tmp_path), "--san", "not a name!"]) == 2
    assert_one_line_error(capsys.readouterr().err, "--san")
    assert list(tmp_path.iterdir()) == []  # nothing written on error


def test_hash_password_from_stdin() -> None:
    result = run_cli("hash-password", stdin="correct horse battery\n")
    assert result.returncode == 0, result.stderr
    phc = result.stdout.strip()
    assert phc.startswith("$argon2id$v=19$m=19456,t=2,p=1$")
    assert verify_password("correct horse battery", phc)
    assert "correct horse" not in result.stderr


def test_hash_password_refuses_short_password() -> None:
    result = run_cli("hash-password", stdin="short\n")
    assert result.returncode == 2
    assert_one_line_error(result.stderr, "too short")
    assert "short" not in result.stdout


# --- server configuration errors ---------------------------------------------------


def server_config(tmp_path: Path, pki: Pki, hashes: dict[str, str], **server: Any) -> Path:
    return write_toml(tmp_path / "server.toml", config_data(pki, hashes, **server))


def test_server_without_config_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["server", "--config", str(tmp_path / "missing.toml")]) == 2
    assert_one_line_error(capsys.readouterr().err, "missing.toml", "not found")


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        ("[server\nport = 1", ["invalid TOML"]),
        ("[server]\nprot = 8000\n", ["server.prot", "unknown key"]),
        ("[server]\nport = 70000\n", ["server.port"]),
        ("[server]\nport = '8000'\n", ["server.port"]),
        ("[server]\nclient_certs = 'maybe'\n", ["server.client_certs"]),
        ("[users.Alice]\n", ["users.Alice"]),
        ("[users.bob]\npassword_hash = 'hunter2'\n", ["users.bob.password_hash", "PHC"]),
        ("[limits]\nlogin_timeout = -1\n", ["limits.login_timeout"]),
        ("[rooms.lobby]\nmembers = []\n", ["rooms.lobby.members", "cannot be private"]),
    ],
)
def test_server_config_errors_name_file_and_key(
    tmp_path: Path, text: str, fragments: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    assert main(["server", "--config", str(path)]) == 2
    assert_one_line_error(capsys.readouterr().err, str(path), *fragments)


def test_a_cluster_node_that_cannot_reach_redis_says_where_in_one_line(
    tmp_path: Path, pki: Pki, password_hashes: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    # It stops: a node that ran alone would split the chat in two.
    port = free_port()
    config = server_config(tmp_path, pki, password_hashes)
    config.write_text(
        config.read_text() + f'\n[cluster]\nredis_url = "redis://127.0.0.1:{port}/0"\n'
    )
    assert main(["server", "--config", str(config)]) == 1
    assert_one_line_error(
        capsys.readouterr().err, f"cannot use Redis at 127.0.0.1:{port}: connection refused"
    )


def test_server_refuses_a_key_others_can_read(
    tmp_path: Path, pki: Pki, password_hashes: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    key = tmp_path / "server.key"
    shutil.copy(pki.key("server"), key)
    key.chmod(0o644)
    config = server_config(tmp_path, pki, password_hashes, key=str(key))
    assert main(["server", "--config", str(config)]) == 2
    assert_one_line_error(capsys.readouterr().err, f"chmod 600 {key}")


def test_server_reports_port_in_use(
    tmp_path: Path, pki: Pki, password_hashes: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    config = server_config(tmp_path, pki, password_hashes)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["server", "--config", str(config), "--port", str(port)]) == 1
    assert_one_line_error(capsys.readouterr().err, f"cannot listen on 127.0.0.1:{port}")


def test_example_config_is_valid(capsys: pytest.CaptureFixture[str]) -> None:
    # Validate the shipped example without starting anything: a bad port flag
    # is checked after the file, so exit code 2 here must come from the flag.
    assert main(["server", "--config", str(EXAMPLE_CONFIG), "--port", "-1"]) == 2
    assert "port out of range" in capsys.readouterr().err


# --- the client as a user runs it ------------------------------------------------------


def client_args(server: RunningServer, *extra: str) -> list[str]:
    return [
        "client",
        "--host",
        server.host,
        "--port",
        str(server.port),
        "--ca",
        str(server.pki.ca),
        *extra,
    ]


async def run_client(
    args: list[str], stdin: bytes = b"", env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[bytes]:
    with trio.fail_after(WAIT * 3):
        return await trio.run_process(
            [sys.executable, "-m", "securechat", *args],
            stdin=stdin,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env={**os.environ, "NO_COLOR": "1", **(env or {})},
        )


async def test_piped_client_delivers_lines_and_exits_0(server: RunningServer) -> None:
    bob = await server.login("bob")
    result = await run_client(
        client_args(server, "--user", "alice"),
        stdin=b"hello from a pipe\n/help\nsecond line\n",
        env={"SECURECHAT_PASSWORD": PASSWORDS["alice"]},
    )
    assert result.returncode == 0, result.stderr
    output = result.stdout.decode()
    assert output.startswith("[CONNECTED]\n")
    assert "alice: hello from a pipe" in output
    assert "alice: second line" in output
    assert "/quit" in output  # /help was answered locally, not sent
    received = [await receive_type(bob, Message) for _ in range(2)]
    assert [(m.sender, m.text) for m in received] == [
        ("alice", "hello from a pipe"),
        ("alice", "second line"),
    ]


async def test_client_with_certificate_from_config_file(
    server: RunningServer, tmp_path: Path
) -> None:
    config = write_toml(
        tmp_path / "client.toml",
        {
            "client": {
                "host": server.host,
                "port": server.port,
                "ca": str(server.pki.ca),
                "user": "carol",
                "cert": str(server.pki.cert("carol")),
                "key": str(server.pki.key("carol")),
            }
        },
    )
    result = await run_client(["client", "--config", str(config)], stdin=b"via config\n")
    assert result.returncode == 0, result.stderr
    assert "carol: via config" in result.stdout.decode()


async def test_client_wrong_password(server: RunningServer) -> None:
    result = await run_client(
        client_args(server, "--user", "bob"),
        env={"SECURECHAT_PASSWORD": "Wrong-Password-123"},
    )
    assert result.returncode == 1
    assert_one_line_error(result.stderr.decode(), "login refused", "auth_failed")
    assert b"Wrong-Password-123" not in result.stderr + result.stdout


async def test_client_without_password_source(server: RunningServer) -> None:
    result = await run_client(client_args(server, "--user", "bob"), env={"SECURECHAT_PASSWORD": ""})
    assert result.returncode == 2
    assert_one_line_error(result.stderr.decode(), "SECURECHAT_PASSWORD")


async def test_client_server_not_running(pki: Pki) -> None:
    port = free_port()
    result = await run_client(
        [
            "client",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--ca",
            str(pki.ca),
            "--user",
            "bob",
        ],
        env={"SECURECHAT_PASSWORD": PASSWORDS["bob"]},
    )
    assert result.returncode == 1
    assert_one_line_error(result.stderr.decode(), "is the server running?")


async def test_client_untrusted_server(server: RunningServer, rogue_pki: Pki) -> None:
    result = await run_client(
        [
            "client",
            "--host",
            server.host,
            "--port",
            str(server.port),
            "--ca",
            str(rogue_pki.ca),
            "--user",
            "bob",
        ],
        env={"SECURECHAT_PASSWORD": PASSWORDS["bob"]},
    )
    assert result.returncode == 1
    assert_one_line_error(result.stderr.decode(), "not trusted")


async def test_client_refuses_missing_ca(tmp_path: Path) -> None:
    result = await run_client(
        ["client", "--ca", str(tmp_path / "nope.crt"), "--user", "bob"],
        env={"SECURECHAT_PASSWORD": "x"},
    )
    assert result.returncode == 2
    assert_one_line_error(result.stderr.decode(), "nope.crt", "not found")


# --- the server as a process ------------------------------------------------------------


async def test_server_process_serves_and_shuts_down_on_sigterm(
    tmp_path: Path, pki: Pki, password_hashes: dict[str, str]
) -> None:
    config = server_config(tmp_path, pki, password_hashes)
    async with server_process(config, pki) as process:
        bob = await process.endpoint.login("bob")
        await bob.send(Say(room="lobby", text="over a real process", id="p1"))
        assert (await receive_type(bob, Message)).text == "over a real process"

        process.process.send_signal(signal.SIGTERM)
        received = await receive_closed(bob)
        assert [e.code for e in received if isinstance(e, Error)] == [ErrorCode.SERVER_SHUTDOWN]
        assert await process.wait() == 0
    log = process.log()
    assert "[CONNECTION ESTABLISHED] 127.0.0.1:" in log
    assert "login user=bob" in log
    assert "server stopped" in log
    assert PASSWORDS["bob"] not in log


async def test_server_warns_at_start_and_reload_when_its_config_exposes_password_hashes(
    tmp_path: Path, pki: Pki, password_hashes: dict[str, str]
) -> None:
    config = server_config(tmp_path, pki, password_hashes)
    config.chmod(0o644)
    warning = (
        f"WARNING securechat: {config} holds password hashes and is readable by group or others"
        f" (mode 0644); fix with: chmod 600 {config}"
    )
    async with server_process(config, pki) as process:
        await process.wait_for_log(re.escape(warning))
        process.process.send_signal(signal.SIGHUP)
        await process.wait_for_log("config reloaded")
        assert process.log().count(warning) == 2
        config.chmod(0o600)
        process.process.send_signal(signal.SIGHUP)
        await process.wait_for_log("config reloaded(.|\n)*config reloaded")
        assert process.log().count(warning) == 2
        assert "WARNING securechat: " + str(config) not in process.log().replace(warning, "")


async def test_renewing_the_server_and_adding_a_user_keep_issued_client_certificates_working(
    tmp_path: Path, password_hashes: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    # The two README one-liners, then a real server: alice's certificate predates both.
    out = tmp_path / "certs"
    assert main(["gen-certs", "--out", str(out), "--client", "alice"]) == 0
    assert main(["gen-certs", "--out", str(out), "--renew", "server", "--san", "chat.test"]) == 0
    assert main(["gen-certs", "--out", str(out), "--client", "carol"]) == 0
    capsys.readouterr()
    pki = Pki(out)
    renewed = x509.load_pem_x509_certificate((out / "server.crt").read_bytes())
    config = server_config(tmp_path, pki, password_hashes)
    async with server_process(config, pki) as process:
        alice = await process.endpoint.login("alice", cert_user="alice")
        carol = await process.endpoint.login("carol", cert_user="carol")
        presented = alice.stream.getpeercert(binary_form=True)
        assert presented == renewed.public_bytes(serialization.Encoding.DER)
        await carol.send(Say(room="lobby", text="signed by the same CA", id="c1"))
        assert (await receive_type(alice, Message)).text == "signed by the same CA"
