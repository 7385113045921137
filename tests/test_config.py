"""Unit tests for securechat.config: loading and validating the TOML file."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import SecretStr, ValidationError

from securechat import passwords
from securechat.config import (
    REDIS_PASSWORD_ENV,
    Account,
    ClusterSection,
    Config,
    ConfigError,
    MetricsSection,
    RedisTarget,
    describe_exposure,
    exposure_warning,
    load_config,
    parse_config,
)
from securechat.protocol import DEFAULT_MAX_FRAME_BYTES

EXAMPLE = Path(__file__).resolve().parent.parent / "config.example.toml"

# A real PHC string, computed once for the module (Argon2 costs ~30 ms per hash).
PASSWORD_HASH = passwords.hash_password("correct horse battery")


def write(tmp_path: Path, text: str, name: str = "securechat.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def config_error(path: Path) -> str:
    """The message of the ConfigError that loading ``path`` raises; it is always one line."""
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: ")
    return message


# --- the example file ---------------------------------------------------------------


def test_example_config_loads() -> None:
    config = load_config(EXAMPLE)
    assert config.server.host == "localhost"
    assert config.server.port == 8000
    assert config.server.client_certs == "optional"
    assert config.server.max_frame_bytes == 65536
    assert config.limits.max_outbound_queue == 1000
    assert set(config.users) == {"alice", "bob"}
    assert config.users["alice"].admin is True
    assert config.users["bob"].admin is False
    assert config.users["bob"].password_hash is None
    assert config.client.user == "alice"


def test_example_config_relative_paths_resolve_against_its_directory(tmp_path: Path) -> None:
    copy = tmp_path / "elsewhere" / "example.toml"
    copy.parent.mkdir()
    shutil.copy(EXAMPLE, copy)
    config = load_config(copy)
    base = copy.parent
    assert config.server.cert == base / "certs/server.crt"
    assert config.server.key == base / "certs/server.key"
    assert config.server.ca == base / "certs/ca.crt"
    assert config.client.ca == base / "certs/ca.crt"
    assert config.client.cert == base / "certs/alice.crt"
    assert config.client.key == base / "certs/alice.key"
    original = load_config(EXAMPLE)
    assert original.server.cert == EXAMPLE.parent / "certs/server.crt"


def test_example_config_documents_every_default(tmp_path: Path) -> None:
    # The example claims to show every key with its default: apart from the
    # users and the client section, it must equal an empty file.
    example = load_config(EXAMPLE)
    empty = load_config(write(tmp_path, ""))
    base = EXAMPLE.parent

    def relative(config: Config, root: Path) -> tuple[object, ...]:
        server = config.server
        return (
            server.model_copy(
                update={
                    "cert": server.cert.relative_to(root),
                    "key": server.key.relative_to(root),
                    "ca": server.ca.relative_to(root),
                }
            ),
            config.limits,
            config.storage.model_copy(update={"path": config.storage.path.relative_to(root)}),
            config.web,
            config.metrics,
        )

    assert relative(example, base) == relative(empty, tmp_path)


def test_the_example_documents_every_metrics_key(tmp_path: Path) -> None:
    text = EXAMPLE.read_text()
    block = text[text.index("[metrics]") : text.index("# Cluster mode")]
    keys = [line[2:] for line in block.splitlines() if re.match(r"# \w+ = ", line)]
    documented = load_config(write(tmp_path, "[metrics]\n" + "\n".join(keys) + "\n")).metrics
    assert set(MetricsSection.model_fields) == set(documented.model_fields_set)
    assert documented.address == ("127.0.0.1", 9100)
    assert load_config(EXAMPLE).metrics.address is None  # off by default


# --- defaults and paths -------------------------------------------------------------


def test_empty_file_gives_defaults(tmp_path: Path) -> None:
    path = write(tmp_path, "")
    config = load_config(path)
    assert config.server.host == "localhost"
    assert config.server.port == 8000
    assert config.server.client_certs == "optional"
    assert config.server.max_frame_bytes == DEFAULT_MAX_FRAME_BYTES
    assert config.server.cert == tmp_path / "certs/server.crt"
    assert config.server.key == tmp_path / "certs/server.key"
    assert config.server.ca == tmp_path / "certs/ca.crt"
    assert config.server.tls_fast_path is True
    assert config.limits.handshake_timeout == 10.0
    assert config.limits.login_timeout == 10.0
    assert config.limits.max_outbound_queue == 1000
    assert config.limits.max_outbound_bytes == 4 * 1024 * 1024
    assert config.limits.auth_workers == 2
    assert config.limits.shutdown_grace == 2.0
    assert config.storage.path == tmp_path / "data/securechat.db"
    assert config.storage.retention_days == 0.0  # keep forever
    assert config.storage.retention_messages_per_room == 0  # no cap
    assert config.storage.prune_interval == 600.0
    assert config.users == {}
    assert config.accounts() == {}
    assert config.client.host == "localhost"
    assert config.client.port == 8000
    assert config.client.ca == tmp_path / "certs/ca.crt"
    assert config.client.user is None
    assert config.client.cert is None
    assert config.client.key is None


def test_absolute_paths_are_kept(tmp_path: Path) -> None:
    path = write(tmp_path, '[server]\ncert = "/etc/securechat/server.crt"\n')
    assert load_config(path).server.cert == Path("/etc/securechat/server.crt")


def test_relative_paths_resolve_against_the_file_not_the_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    conf_dir = tmp_path / "conf"
    conf_dir.mkdir()
    path = write(conf_dir, '[server]\nkey = "keys/s.key"\n[client]\ncert = "me.crt"\n')
    monkeypatch.chdir(tmp_path)
    config = load_config(path)
    assert config.server.key == conf_dir / "keys/s.key"
    assert config.client.cert == conf_dir / "me.crt"


def test_users_become_accounts(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        f'[users.carol]\npassword_hash = "{PASSWORD_HASH}"\n[users.dave]\nadmin = true\n',
    )
    config = load_config(path)
    assert config.accounts() == {
        "carol": Account(password_hash=PASSWORD_HASH, admin=False),
        "dave": Account(password_hash=None, admin=True),
    }


def test_retention_in_whole_or_fractional_days(tmp_path: Path) -> None:
    path = write(tmp_path, "[storage]\nretention_days = 30\nretention_messages_per_room = 10000\n")
    storage = load_config(path).storage
    assert (storage.retention_days, storage.retention_messages_per_room) == (30.0, 10000)
    path = write(tmp_path, "[storage]\nretention_days = 0.5\n")
    assert load_config(path).storage.retention_days == 0.5


def test_integer_seconds_are_accepted(tmp_path: Path) -> None:
    path = write(tmp_path, "[limits]\nhandshake_timeout = 5\n")
    assert load_config(path).limits.handshake_timeout == 5.0


# --- bad values name the file and the key ------------------------------------------------


@pytest.mark.parametrize(
    ("text", "key"),
    [
        pytest.param("bogus = 1\n", "bogus", id="unknown-top-level-key"),
        pytest.param("[extras]\nx = 1\n", "extras", id="unknown-section"),
        pytest.param("[server]\nbogus = 1\n", "server.bogus", id="unknown-server-key"),
        pytest.param("[limits]\ntimeout = 1\n", "limits.timeout", id="unknown-limits-key"),
        pytest.param("[users.bob]\npassword = 'x'\n", "users.bob.password", id="unknown-user-key"),
    ],
)
def test_unknown_keys_are_errors(tmp_path: Path, text: str, key: str) -> None:
    message = config_error(write(tmp_path, text))
    assert f"{key}: unknown key" in message


@pytest.mark.parametrize(
    ("text", "key"),
    [
        pytest.param("[server]\nport = 70000\n", "server.port", id="port-70000"),
        pytest.param("[server]\nport = -1\n", "server.port", id="port-negative"),
        pytest.param('[server]\nport = "8000"\n', "server.port", id="port-string"),
        pytest.param("[server]\nport = true\n", "server.port", id="port-bool"),
        pytest.param("[server]\nport = 8000.0\n", "server.port", id="port-float"),
        pytest.param("[client]\nport = 70000\n", "client.port", id="client-port"),
        pytest.param('[server]\nclient_certs = "sometimes"\n', "server.client_certs", id="certs"),
        pytest.param("[server]\nclient_certs = true\n", "server.client_certs", id="certs-bool"),
        pytest.param('[server]\nhost = ""\n', "server.host", id="empty-host"),
        pytest.param("[server]\nmax_frame_bytes = 10\n", "server.max_frame_bytes", id="frame"),
        pytest.param("[limits]\nlogin_timeout = 0\n", "limits.login_timeout", id="timeout-0"),
        pytest.param('[limits]\nauth_workers = "2"\n', "limits.auth_workers", id="workers-str"),
        pytest.param("[server]\ncert = 1\n", "server.cert", id="path-int"),
        pytest.param('[server]\ntls_fast_path = "yes"\n', "server.tls_fast_path", id="fast-str"),
        pytest.param("server = 1\n", "server", id="section-not-table"),
        pytest.param('[users.bob]\nadmin = "yes"\n', "users.bob.admin", id="admin-string"),
        pytest.param("[storage]\nretention_days = -1\n", "storage.retention_days", id="days"),
        pytest.param('[storage]\nretention_days = "30"\n', "storage.retention_days", id="days-str"),
        pytest.param("[storage]\nretention_days = inf\n", "storage.retention_days", id="inf"),
        pytest.param(
            "[storage]\nretention_messages_per_room = 1.5\n",
            "storage.retention_messages_per_room",
            id="cap-float",
        ),
        pytest.param(
            "[storage]\nretention_messages_per_room = -5\n",
            "storage.retention_messages_per_room",
            id="cap-negative",
        ),
        pytest.param("[storage]\nprune_interval = 0\n", "storage.prune_interval", id="every-0"),
        pytest.param("[storage]\nretention = 30\n", "storage.retention", id="unknown-storage"),
    ],
)
def test_bad_values_are_errors_naming_file_and_key(tmp_path: Path, text: str, key: str) -> None:
    message = config_error(write(tmp_path, text))
    assert f"{key}: " in message


@pytest.mark.parametrize(
    "value",
    [
        "hunter2",
        "$argon2i$v=19$m=19456,t=2,p=1$c2FsdHNhbHRzYWx0$aGFzaGhhc2hoYXNoaGFzaA",
        "$argon2id$v=19$m=19456,t=2,p=1$short$hash",
        "$argon2id$v=19$m=99999999,t=2,p=1$c2FsdHNhbHRzYWx0$aGFzaGhhc2hoYXNoaGFzaA",
    ],
)
def test_bad_password_hash_is_an_error(tmp_path: Path, value: str) -> None:
    message = config_error(write(tmp_path, f'[users.carol]\npassword_hash = "{value}"\n'))
    assert "users.carol.password_hash: " in message


def test_bad_password_hash_message_says_how_to_make_one(tmp_path: Path) -> None:
    message = config_error(write(tmp_path, '[users.carol]\npassword_hash = "hunter2"\n'))
    assert "not an Argon2id PHC string" in message
    assert "securechat hash-password" in message


@pytest.mark.parametrize("name", ["Alice", "al ice", ".alice", "a" * 33, "al\u202eice"])
def test_bad_user_name_is_an_error(tmp_path: Path, name: str) -> None:
    message = config_error(write(tmp_path, f'[users."{name}"]\nadmin = true\n'))
    assert f"users.{name} (name): " in message


def test_bad_client_user_is_an_error(tmp_path: Path) -> None:
    message = config_error(write(tmp_path, '[client]\nuser = "Alice"\n'))
    assert "client.user: " in message


@pytest.mark.parametrize("members", ['["alice"]', "[]"])
def test_lobby_members_are_refused(tmp_path: Path, members: str) -> None:
    # Everyone is in the lobby: a member list there would be ignored, not enforced.
    path = write(tmp_path, f"[users.alice]\n[rooms.lobby]\nmembers = {members}\n")
    message = config_error(path)
    assert "rooms.lobby.members: the lobby cannot be private" in message


def test_lobby_topic_is_fine(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, '[rooms.lobby]\ntopic = "Welcome"\n'))
    assert config.room_settings()["lobby"].topic == "Welcome"
    assert config.room_settings()["lobby"].allowed is None


def test_several_errors_are_all_reported_on_one_line(tmp_path: Path) -> None:
    message = config_error(write(tmp_path, "bogus = 1\n[server]\nport = 70000\n"))
    assert "bogus: unknown key" in message
    assert "server.port: " in message


# --- [cluster] -----------------------------------------------------------------------------

SECRET = "s3cret-Redis-pw"  # a test password that must never show in an error or a repr


def cluster(tmp_path: Path, text: str) -> ClusterSection:
    section = load_config(write(tmp_path, "[cluster]\n" + text)).cluster
    assert section is not None
    return section


def test_no_cluster_section_means_one_process(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, "")).cluster is None
    assert load_config(EXAMPLE).cluster is None  # `make run` stays single-process


def test_the_example_documents_every_cluster_key_with_its_default(tmp_path: Path) -> None:
    text = EXAMPLE.read_text()
    block = text[text.index("# [cluster]") : text.index("[client]")]
    keys = [line[2:] for line in block.splitlines() if re.match(r"# (\[cluster\]|\w+ = )", line)]
    documented = cluster(tmp_path, "\n".join(keys[1:]) + "\n")
    assert keys[0] == "[cluster]"
    assert set(ClusterSection.model_fields) == set(documented.model_fields_set)
    defaults = cluster(tmp_path, f'redis_url = "{documented.redis_url.get_secret_value()}"\n')
    assert documented == defaults
    assert (defaults.durability, defaults.replicas) == ("fsync", 1)
    assert (defaults.presence_ttl, defaults.history_max_per_room) == (15.0, 10000)


@pytest.mark.parametrize(
    ("url", "target"),
    [
        ("redis://127.0.0.1", RedisTarget("127.0.0.1", 6379, 0, None, None, tls=False)),
        ("redis://127.0.0.1:6380/2", RedisTarget("127.0.0.1", 6380, 2, None, None, tls=False)),
        (
            "rediss://redis.example.net/",
            RedisTarget("redis.example.net", 6379, 0, None, None, tls=True),
        ),
        ("redis://[::1]:7000/0", RedisTarget("::1", 7000, 0, None, None, tls=False)),
        ("redis://chat@h:1/15", RedisTarget("h", 1, 15, "chat", None, tls=False)),
    ],
)
def test_redis_urls(tmp_path: Path, url: str, target: RedisTarget) -> None:
    section = cluster(tmp_path, f'redis_url = "{url}"\n')
    assert section.target({}) == target
    assert section.redacted_url() == url


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        pytest.param(f"http://:{SECRET}@h:6379", "must be redis://", id="http"),
        pytest.param(f"h:{SECRET}@x", "must be redis://", id="no-scheme"),
        pytest.param(f"redis:/:{SECRET}@h", "must be redis://", id="one-slash"),
        pytest.param(f"redis://:{SECRET}@", "names no host", id="no-host"),
        pytest.param(f"redis://:{SECRET}@h:0", "port must be a number from 1 to 65535", id="0"),
        pytest.param(f"redis://:{SECRET}@h:70000", "port from 1 to 65535", id="port-70000"),
        pytest.param(f"redis://:{SECRET}@h:{SECRET}", "port from 1 to 65535", id="port-text"),
        pytest.param(f"redis://:{SECRET}@h/{SECRET}", "database must be a number", id="db"),
        pytest.param(f"redis://:{SECRET}@h/0?ssl={SECRET}", "no query", id="query"),
        pytest.param(f"redis://:{SECRET}@[::1", "must be redis://", id="bad-ipv6"),
    ],
)
def test_bad_redis_url_is_one_line_without_the_password(
    tmp_path: Path, url: str, expected: str
) -> None:
    message = config_error(write(tmp_path, f'[cluster]\nredis_url = "{url}"\n'))
    assert "cluster.redis_url: " in message
    assert expected in message
    assert SECRET not in message


URL = 'redis_url = "redis://h"\n'


@pytest.mark.parametrize(
    ("text", "key"),
    [
        pytest.param("durability = 'fsync'\n", "cluster.redis_url: missing", id="no-url"),
        pytest.param("redis_url = 6379\n", "cluster.redis_url: ", id="url-int"),
        pytest.param(URL + "durability = 'disk'\n", "cluster.durability: ", id="durability"),
        pytest.param(
            URL + "durability = 'replicated'\nreplicas = 0\n", "cluster.replicas: ", id="r0"
        ),
        pytest.param(URL + "presence_ttl = 0\n", "cluster.presence_ttl: ", id="ttl-0"),
        pytest.param(URL + "presence_ttl = '15'\n", "cluster.presence_ttl: ", id="ttl-str"),
        pytest.param(URL + "history_max_per_room = 0\n", "cluster.history_max_per_room: ", id="h"),
        pytest.param(URL + "password = 'x'\n", "cluster.password: unknown key", id="unknown"),
        pytest.param(URL + "replicas = 2\n", "cluster: replicas: only used with dura", id="fsync"),
    ],
)
def test_bad_cluster_values(tmp_path: Path, text: str, key: str) -> None:
    assert key in config_error(write(tmp_path, "[cluster]\n" + text))


def test_replicated_takes_replicas(tmp_path: Path) -> None:
    section = cluster(
        tmp_path, 'redis_url = "redis://h"\ndurability = "replicated"\nreplicas = 2\n'
    )
    assert (section.durability, section.replicas) == ("replicated", 2)


def test_redis_password_from_the_url_or_the_environment_never_both(tmp_path: Path) -> None:
    in_url = cluster(tmp_path, f'redis_url = "redis://chat:{SECRET}%40x@h"\n')
    target = in_url.target({})
    assert (target.username, target.password) == ("chat", SecretStr(f"{SECRET}@x"))
    assert target.password is not None
    assert target.password.get_secret_value() == f"{SECRET}@x"  # percent-decoded
    assert in_url.target({REDIS_PASSWORD_ENV: ""}).password == target.password  # empty: unset

    plain = cluster(tmp_path, 'redis_url = "redis://h"\n')
    assert plain.target({}).password is None
    from_env = plain.target({REDIS_PASSWORD_ENV: SECRET}).password
    assert from_env is not None
    assert from_env.get_secret_value() == SECRET

    with pytest.raises(ConfigError) as both:
        in_url.target({REDIS_PASSWORD_ENV: "another"})
    assert str(both.value) == (
        f"[cluster] redis_url holds a password and {REDIS_PASSWORD_ENV} is set too:"
        " give the password in one place only"
    )


def test_the_redis_password_shows_nowhere(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, f'[cluster]\nredis_url = "rediss://u:{SECRET}@h:7/1"\n'))
    assert config.cluster is not None
    assert config.cluster.redacted_url() == "rediss://u:***@h:7/1"
    target = config.cluster.target({})
    assert target.endpoint == "h:7"
    for shown in (repr(config), str(config), repr(target), config.model_dump_json()):
        assert SECRET not in shown
    # A ValidationError's own text (for whoever logs one) hides the input too.
    with pytest.raises(ValidationError) as invalid:
        Config.model_validate({"cluster": {"redis_url": f"redis://:{SECRET}@h/x"}})
    assert SECRET not in str(invalid.value)
    with pytest.raises(ConfigError) as error:
        parse_config({"cluster": {"redis_url": f"redis://:{SECRET}@h/x"}}, tmp_path / "c.toml")
    assert SECRET not in str(error.value)


# --- the file's own permissions -----------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "holds_hashes", "expected"),
    [
        (0o600, True, None),
        (0o400, True, None),
        (0o644, False, None),  # nothing secret in it: the example config, certificate-only users
        (0o644, True, "holds password hashes and is readable by group or others (mode 0644)"),
        (0o640, True, "readable by group or others (mode 0640)"),
        (0o604, True, "readable by group or others (mode 0604)"),
        (0o664, False, "writable by group or others (mode 0664): they can add users and admins"),
        (0o602, True, "writable by group or others (mode 0602)"),
    ],
)
def test_describe_exposure(mode: int, holds_hashes: bool, expected: str | None) -> None:
    path = Path("conf/securechat.toml")
    warning = describe_exposure(path, mode, holds_hashes=holds_hashes)
    if expected is None:
        assert warning is None
    else:
        assert warning is not None
        assert warning.startswith(f"{path} ")
        assert expected in warning
        assert warning.endswith(f"fix with: chmod 600 {path}")


def test_exposure_warning_reads_the_file_mode_and_its_users(tmp_path: Path) -> None:
    path = write(tmp_path, f'[users.carol]\npassword_hash = "{PASSWORD_HASH}"\n')
    config = load_config(path)
    path.chmod(0o644)
    warning = exposure_warning(path, config)
    assert warning is not None
    assert "holds password hashes" in warning
    assert PASSWORD_HASH not in warning
    path.chmod(0o600)
    assert exposure_warning(path, config) is None
    path.chmod(0o644)
    assert exposure_warning(path, load_config(write(tmp_path, "[users.carol]\n"))) is None


# --- unreadable files --------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("[server\nport = 1\n", id="unclosed-table"),
        pytest.param("port = \n", id="missing-value"),
        pytest.param('host = "unterminated\n', id="unterminated-string"),
        pytest.param("[server]\nport = 1\nport = 2\n", id="duplicate-key"),
    ],
)
def test_bad_toml_syntax_is_a_one_line_error(tmp_path: Path, text: str) -> None:
    message = config_error(write(tmp_path, text))
    assert "invalid TOML" in message


def test_non_utf8_file_is_a_one_line_error(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'[server]\nhost = "caf\xe9"\n')
    assert "invalid TOML" in config_error(path)


def test_missing_file_is_a_one_line_error(tmp_path: Path) -> None:
    message = config_error(tmp_path / "nope.toml")
    assert "not found" in message


def test_directory_is_a_one_line_error(tmp_path: Path) -> None:
    message = config_error(tmp_path)
    assert "directory" in message


def test_importing_the_config_loads_no_event_loop_and_no_database() -> None:
    # The config is read by tools that start no server (check-config, reload,
    # hash-password): it must not drag in trio, SQLite or the server's modules.
    loaded = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, securechat.config;"
            " print(' '.join(sorted(name for name in sys.modules if name.startswith(("
            "'trio', 'sqlite3', 'securechat.')))))",
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    assert not [name for name in loaded if name.split(".")[0] in ("trio", "sqlite3")], loaded
    assert set(loaded) == {
        "securechat.config",
        "securechat.limits",
        "securechat.passwords",
        "securechat.protocol",
    }


# --- [web] ----------------------------------------------------------------------------


def test_web_origins_are_checked_and_lowered(tmp_path: Path) -> None:
    config = load_config(
        write(
            tmp_path,
            '[web]\nallowed_origins = ["https://Chat.Example.org", "https://[::1]:8000"]\n',
        )
    )
    assert config.web.allowed_origins == ["https://chat.example.org", "https://[::1]:8000"]
    for bad in ("chat.example.org", "https://chat.example.org/", "https://a/path", "*", "null"):
        with pytest.raises(ConfigError, match=r"web\.allowed_origins: .* is not an origin"):
            load_config(write(tmp_path, f'[web]\nallowed_origins = ["{bad}"]\n'))
    with pytest.raises(ConfigError, match=r"web\.max_headers"):
        load_config(write(tmp_path, "[web]\nmax_headers = 2\n"))
