"""What `make run` and `make test` would do on a fresh clone (``make -n``: printed, not run)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="no make here")


def dry_run(clone: Path, *args: str) -> list[str]:
    # Without what a calling make (`make test`) or the user's shell may have set.
    unset = {"MAKEFLAGS", "MFLAGS", "MAKELEVEL", "CONFIG", "PORT", "PYTHON"}
    result = subprocess.run(
        ["make", "-n", *args],
        cwd=clone,
        env={name: value for name, value in os.environ.items() if name not in unset},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


@pytest.fixture
def clone(tmp_path: Path) -> Path:
    """The files `make` reads, without a .venv: a fresh clone as far as make can tell."""
    for name in ("Makefile", "pyproject.toml", "config.example.toml"):
        shutil.copy(ROOT / name, tmp_path / name)
    return tmp_path


def installs(commands: list[str]) -> list[str]:
    return [command for command in commands if "pip install" in command]


def test_make_run_installs_the_runtime_only(clone: Path) -> None:
    commands = dry_run(clone, "run")
    assert [command.split("install --quiet ")[-1] for command in installs(commands)] == [
        "--upgrade pip",
        "-e .",
    ]
    assert commands[-1] == ".venv/bin/securechat server --config config.example.toml"


def test_make_test_installs_the_test_tools(clone: Path) -> None:
    commands = dry_run(clone, "test")
    assert installs(commands)[-1].endswith("-e '.[dev]'")
    assert ".venv/bin/pytest" in commands


def test_make_test_brings_redis_server_when_missing(clone: Path) -> None:
    # The cluster tests start private redis-servers (tests/redis_server.py).
    commands = "\n".join(dry_run(clone, "test"))
    guard = commands[commands.index("command -v redis-server >/dev/null || {") :]
    assert "apt-get install -y -qq redis-server" in guard[: guard.index(".venv/bin/pytest")]


def test_make_test_and_bench_bring_ngircd_with_its_service_off(clone: Path) -> None:
    # tests/test_bench_peers.py and the peers scenario start private ngircds.
    for target, runs in (("test", ".venv/bin/pytest"), ("bench", ".venv/bin/python -m benchmarks")):
        commands = "\n".join(dry_run(clone, target))
        guard = commands[commands.index("command -v ngircd >/dev/null || {") :]
        guard = guard[: guard.index(runs)]
        assert "apt-get install -y -qq ngircd" in guard
        assert "systemctl disable --now ngircd.service" in guard
        assert "update-rc.d ngircd disable" in guard


def test_make_run_port_and_config(clone: Path) -> None:
    commands = dry_run(clone, "run", "PORT=9000")
    assert commands[-1] == ".venv/bin/securechat server --config config.example.toml --port 9000"
    commands = dry_run(clone, "run", "CONFIG=my.toml")
    assert commands[-1] == ".venv/bin/securechat server --config my.toml"
    (clone / "securechat.toml").write_text("")  # the server's own default, once there is one
    assert dry_run(clone, "run")[-1] == ".venv/bin/securechat server --config securechat.toml"


def test_install_filters_only_the_editable_notice() -> None:
    # setuptools' deprecation warnings stay visible: the project has none left.
    makefile = (ROOT / "Makefile").read_text()
    assert "-W 'ignore:Editable installation:UserWarning'" in makefile
    assert 'license = "MIT"' in (ROOT / "pyproject.toml").read_text()
