"""The TOML configuration file: its schema (pydantic models) and its loading.

What the rest of the server takes from it comes as plain values defined
here (:class:`Account`, :class:`RoomSettings`, :data:`ClientCertMode`): the
config depends on :mod:`~securechat.protocol`, :mod:`~securechat.passwords`
and :mod:`~securechat.limits` only, and importing it loads neither trio nor
the server. Every key is documented in ``config.example.toml``. Unknown keys
and bad values are errors that name the file and the key. Relative paths in
the file are relative to the file's own directory, so a config works from
any working directory. ``[cluster]`` (:class:`ClusterSection`) holds a secret, the
Redis URL's password: it shows in no repr and no error message.
"""

from __future__ import annotations

import re
import stat
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import SplitResult, unquote, urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from .limits import LOGIN_BACKOFF_MAX, LOGIN_FAILURES_ALLOWED
from .passwords import check_phc
from .protocol import DEFAULT_MAX_FRAME_BYTES, LOBBY, SERVER_USER, Name, Topic

ConfigPath = Annotated[Path, Field(strict=False)]
ClientCertMode = Literal["none", "optional", "required"]
"""``[server] client_certs``: whether the server asks for client certificates."""
Port = Annotated[int, Field(ge=0, le=65535)]
Seconds = Annotated[float, Field(gt=0, le=3600)]


@dataclass(frozen=True)
class RoomSettings:
    """A room as the config file defines it (what the chat applies at start and reload)."""

    topic: str | None = None  # None: the file sets no topic (admins may set one)
    allowed: frozenset[str] | None = None  # None: anyone may join


class ConfigError(Exception):
    """The configuration is unusable; the message is one line naming file and key."""


@dataclass(frozen=True)
class Account:
    """A configured user as the authenticator sees it (:meth:`Config.accounts`)."""

    password_hash: str | None
    admin: bool = False


class _Section(BaseModel):
    # hide_input_in_errors: a ValidationError's text must not echo a password (the
    # Redis URL's, a password hash); describe_errors leaves inputs out too.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, hide_input_in_errors=True)


class ServerSection(_Section):
    host: str = Field("localhost", min_length=1)
    port: Port = 8000
    cert: ConfigPath = Path("certs/server.crt")
    key: ConfigPath = Path("certs/server.key")
    ca: ConfigPath = Path("certs/ca.crt")
    client_certs: ClientCertMode = "optional"
    max_frame_bytes: int = Field(DEFAULT_MAX_FRAME_BYTES, ge=1024, le=16 * 1024 * 1024)
    allow_room_create: bool = True
    flush_interval_ms: float = Field(10.0, ge=0, le=1000)
    flush_interval_max_ms: float = Field(80.0, ge=0, le=1000)
    presence_delay_ms: float = Field(200.0, ge=0, le=5000)
    max_rooms: int = Field(1000, ge=1)
    tls_fast_path: bool = True


class LimitsSection(_Section):
    handshake_timeout: Seconds = 10.0
    login_timeout: Seconds = 10.0
    idle_timeout: Seconds = 60.0
    ping_timeout: Seconds = 30.0
    max_connections: int = Field(10000, ge=1)
    max_connections_per_ip: int = Field(100, ge=1)
    messages_per_second: float = Field(10.0, gt=0)
    message_burst: int = Field(30, ge=1)
    requests_per_second: float = Field(20.0, gt=0)
    request_burst: int = Field(100, ge=1)
    login_failures_allowed: int = Field(LOGIN_FAILURES_ALLOWED, ge=1)
    login_backoff_max: Seconds = LOGIN_BACKOFF_MAX
    max_outbound_queue: int = Field(1000, ge=1)
    max_outbound_bytes: int = Field(4 * 1024 * 1024, ge=65536)
    auth_workers: int = Field(2, ge=1, le=64)
    shutdown_grace: Seconds = 2.0


class UserSection(_Section):
    password_hash: str | None = None
    admin: bool = False

    @field_validator("password_hash")
    @classmethod
    def _valid_phc(cls, value: str | None) -> str | None:
        return None if value is None else check_phc(value)


class RoomSection(_Section):
    topic: Topic = ""
    members: list[Name] | None = None


class StorageSection(_Section):
    path: ConfigPath = Path("data/securechat.db")
    retention_days: float = Field(0.0, ge=0, le=36500)  # 0: keep messages forever
    retention_messages_per_room: int = Field(0, ge=0)  # 0: no cap
    prune_interval: float = Field(600.0, gt=0, le=86400)  # seconds between prunes


class MetricsSection(_Section):
    """``[metrics]``: the Prometheus endpoint (plain HTTP ``GET /metrics``; off when
    ``listen`` is unset). See docs/metrics.md."""

    listen: str | None = None  # "HOST:PORT" ("[::1]:9100" for IPv6); port 0: any free one

    @field_validator("listen")
    @classmethod
    def _valid_listen(cls, value: str | None) -> str | None:
        if value is not None:
            split_host_port(value)
        return value

    @property
    def address(self) -> tuple[str, int] | None:
        """``(host, port)`` to listen on; None when the endpoint is off."""
        return None if self.listen is None else split_host_port(self.listen)


def split_host_port(text: str) -> tuple[str, int]:
    """``"127.0.0.1:9100"`` or ``"[::1]:9100"`` as ``(host, port)``; ValueError naming the form."""
    form = 'the form is "HOST:PORT", e.g. "127.0.0.1:9100" (or "[::1]:9100")'
    host, colon, port_text = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"an IPv6 address goes in brackets; {form}")
    if not colon or not host or any(c.isspace() for c in host):
        raise ValueError(form)
    if not port_text.isascii() or not port_text.isdigit() or int(port_text) > 65535:
        raise ValueError(f"the port must be a number from 0 to 65535; {form}")
    return host, int(port_text)


class ClientSection(_Section):
    host: str = Field("localhost", min_length=1)
    port: Port = 8000
    ca: ConfigPath = Path("certs/ca.crt")
    user: Name | None = None
    cert: ConfigPath | None = None
    key: ConfigPath | None = None


_ORIGIN = re.compile(r"https?://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)(:[0-9]{1,5})?")


class WebSection(_Section):
    """``[web]``: the chat page and its WebSocket, on the chat's own TLS port."""

    enabled: bool = True
    # None: the server's own origins, https://NAME:PORT for every name of its certificate
    # (and [server] host); see securechat.web.default_origins.
    allowed_origins: list[str] | None = None
    hsts_max_age: int = Field(31536000, ge=0, le=63072000)  # 0: no Strict-Transport-Security
    max_request_line: int = Field(8190, ge=256, le=65536)
    max_header_bytes: int = Field(16384, ge=1024, le=1024 * 1024)
    max_headers: int = Field(64, ge=8, le=1000)
    request_timeout: Seconds = 10.0
    keepalive_timeout: Seconds = 15.0
    max_requests_per_connection: int = Field(100, ge=1, le=100000)

    @field_validator("allowed_origins")
    @classmethod
    def _valid_origins(cls, origins: list[str] | None) -> list[str] | None:
        if origins is None:
            return None
        for origin in origins:
            if not _ORIGIN.fullmatch(origin):
                raise ValueError(
                    f"{origin!r} is not an origin: write scheme://host[:port], as a browser"
                    " sends it in Origin (e.g. https://chat.example.org:8000), no path"
                )
        return [origin.lower() for origin in origins]


REDIS_PASSWORD_ENV = "SECURECHAT_REDIS_PASSWORD"  # noqa: S105 (a variable's name)
Durability = Literal["fsync", "replicated", "memory"]
"""``[cluster] durability``: what Redis must guarantee before a node acks a message."""
REDIS_PORT = 6379


@dataclass(frozen=True)
class RedisTarget:
    """Where and how to reach Redis, from ``[cluster] redis_url`` and the environment."""

    host: str
    port: int
    db: int
    username: str | None
    password: SecretStr | None
    tls: bool

    @property
    def endpoint(self) -> str:
        """``host:port`` for messages (never a password)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


class ClusterSection(_Section):
    """``[cluster]``: this node shares the chat with others through Redis.

    The URL is a secret (it may hold the password): its repr is masked, and messages
    use :meth:`redacted_url` or :attr:`RedisTarget.endpoint`.
    """

    redis_url: SecretStr
    durability: Durability = "fsync"
    replicas: int = Field(1, ge=1, le=100)  # with durability = "replicated"
    presence_ttl: Seconds = 15.0
    history_max_per_room: int = Field(10000, gt=0)

    @field_validator("redis_url")
    @classmethod
    def _valid_url(cls, value: SecretStr) -> SecretStr:
        _split_redis_url(value.get_secret_value())
        return value

    @model_validator(mode="after")
    def _replicas_need_replication(self) -> ClusterSection:
        if self.replicas != 1 and self.durability != "replicated":
            raise ValueError(
                'replicas: only used with durability = "replicated" (remove it, or set that)'
            )
        return self

    @property
    def endpoint(self) -> str:
        """Redis's ``host:port``, for messages."""
        return self.target({}).endpoint

    def redacted_url(self) -> str:
        """The URL with its password (if any) replaced by ``***``: safe to log."""
        parts = urlsplit(self.redis_url.get_secret_value())
        userinfo, at, hostport = parts.netloc.rpartition("@")
        if at and parts.password is not None:
            userinfo = f"{userinfo.partition(':')[0]}:***"
        return f"{parts.scheme}://{userinfo}{at}{hostport}{parts.path}"

    def target(self, environ: Mapping[str, str]) -> RedisTarget:
        """The URL's parts, with the password from the URL or from ``environ``
        (:data:`REDIS_PASSWORD_ENV`); both at once is a :class:`ConfigError`."""
        parts, db = _split_redis_url(self.redis_url.get_secret_value())
        assert parts.hostname is not None  # checked by the validator
        from_url = unquote(parts.password) if parts.password else None
        from_env = environ.get(REDIS_PASSWORD_ENV) or None
        if from_url is not None and from_env is not None:
            raise ConfigError(
                f"[cluster] redis_url holds a password and {REDIS_PASSWORD_ENV} is set too:"
                " give the password in one place only"
            )
        password = from_url if from_url is not None else from_env
        return RedisTarget(
            host=parts.hostname,
            port=parts.port or REDIS_PORT,
            db=db,
            username=unquote(parts.username) if parts.username else None,
            password=None if password is None else SecretStr(password),
            tls=parts.scheme == "rediss",
        )


def _split_redis_url(url: str) -> tuple[SplitResult, int]:
    """The URL's parts and its database index; a ValueError that never quotes the URL."""
    form = "redis://[USER[:PASSWORD]@]HOST[:PORT][/DB] (or rediss:// for TLS)"
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:  # its text may quote the URL
        raise ValueError(f"must be {form}, with a port from 1 to 65535") from None
    if parts.scheme not in ("redis", "rediss") or not url.startswith(f"{parts.scheme}://"):
        raise ValueError(f"must be {form}")
    if not parts.hostname:
        raise ValueError(f"names no host; the form is {form}")
    if port == 0:
        raise ValueError("the port must be a number from 1 to 65535")
    if parts.query or parts.fragment:
        raise ValueError(f"takes no query or fragment; the form is {form}")
    db_text = parts.path.removeprefix("/")
    if db_text == "":
        return parts, 0
    if not db_text.isascii() or not db_text.isdigit() or len(db_text) > 5:
        raise ValueError(
            f"the database must be a number, as in redis://host:6379/0; the form is {form}"
        )
    return parts, int(db_text)


class Config(_Section):
    server: ServerSection = ServerSection()
    limits: LimitsSection = LimitsSection()
    storage: StorageSection = StorageSection()
    users: dict[Name, UserSection] = {}
    rooms: dict[Name, RoomSection] = {}
    client: ClientSection = ClientSection()
    web: WebSection = WebSection()
    metrics: MetricsSection = MetricsSection()
    cluster: ClusterSection | None = None  # None: one process, the SQLite store

    @field_validator("users")
    @classmethod
    def _no_reserved_names(cls, users: dict[str, UserSection]) -> dict[str, UserSection]:
        if SERVER_USER in users:
            raise ValueError(f"{SERVER_USER!r} is reserved for operator announcements")
        return users

    @model_validator(mode="after")
    def _room_members_are_users(self) -> Config:
        lobby = self.rooms.get(LOBBY)
        if lobby is not None and lobby.members is not None:
            # Everyone joins the lobby at login and can read its history: a
            # member list there would look like privacy and give none.
            raise ValueError(
                f"rooms.{LOBBY}.members: the lobby cannot be private (every user joins it at"
                " login and reads its history); remove the key, or use another room"
            )
        for name, room in self.rooms.items():
            unknown = sorted(set(room.members or ()) - set(self.users))
            if unknown:
                raise ValueError(f"rooms.{name}.members: unknown users {', '.join(unknown)}")
        return self

    def room_settings(self) -> dict[str, RoomSettings]:
        return {
            name: RoomSettings(
                # A topic the file does not set is the admins' to set (the topic envelope).
                topic=room.topic if "topic" in room.model_fields_set else None,
                allowed=None if room.members is None else frozenset(room.members),
            )
            for name, room in self.rooms.items()
        }

    def accounts(self) -> dict[str, Account]:
        return {
            name: Account(password_hash=user.password_hash, admin=user.admin)
            for name, user in self.users.items()
        }


_PATH_FIELDS: dict[str, tuple[str, ...]] = {
    "server": ("cert", "key", "ca"),
    "client": ("ca", "cert", "key"),
    "storage": ("path",),
}


def load_config(path: Path) -> Config:
    """Read and validate a config file; raises :class:`ConfigError`."""
    try:
        with path.open("rb") as file:
            data = tomllib.load(file)
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, not a config file") from None
    except PermissionError:
        raise ConfigError(f"{path}: permission denied") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: invalid TOML: not UTF-8") from None
    return parse_config(data, path)


def parse_config(data: dict[str, Any], path: Path) -> Config:
    """Validate parsed TOML; ``path`` names the file in errors and anchors relative paths."""
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{path}: {describe_errors(exc)}") from None
    return _anchor_paths(config, path.parent)


def exposure_warning(path: Path, config: Config) -> str | None:
    """One line for the log when other local users can write ``path``, or read the
    password hashes in it; None when the file is private enough (or cannot be stat'ed).

    A warning, not a refusal like for private keys: the example config and
    configs without password hashes hold nothing secret.
    """
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except OSError:
        return None
    holds_hashes = any(user.password_hash is not None for user in config.users.values())
    return describe_exposure(path, mode, holds_hashes=holds_hashes)


def describe_exposure(path: Path, mode: int, *, holds_hashes: bool) -> str | None:
    """The policy behind :func:`exposure_warning`, for a file with permission bits ``mode``."""
    if mode & (stat.S_IWGRP | stat.S_IWOTH):
        return (
            f"{path} is writable by group or others (mode {mode:04o}): they can add users and"
            f" admins; fix with: chmod 600 {path}"
        )
    if holds_hashes and mode & (stat.S_IRGRP | stat.S_IROTH):
        return (
            f"{path} holds password hashes and is readable by group or others"
            f" (mode {mode:04o}); fix with: chmod 600 {path}"
        )
    return None


def describe_errors(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors(include_url=False, include_input=False):
        key = _dotted(error["loc"])
        if error["type"] == "extra_forbidden":
            message = "unknown key"
        elif error["type"] == "missing":
            message = "missing"
        else:
            message = error["msg"].removeprefix("Value error, ")
        parts.append(f"{key}: {message}" if key else message)
    return "; ".join(parts)


def _dotted(loc: tuple[int | str, ...]) -> str:
    # ('users', 'Alice', '[key]') is how pydantic reports a bad dict key.
    if loc and loc[-1] == "[key]":
        return ".".join(str(part) for part in loc[:-1]) + " (name)"
    return ".".join(str(part) for part in loc)


def _anchor_paths(config: Config, base: Path) -> Config:
    updates: dict[str, Any] = {}
    for section_name, fields in _PATH_FIELDS.items():
        section = getattr(config, section_name)
        changed = {
            field: base / value
            for field in fields
            if isinstance(value := getattr(section, field), Path) and not value.is_absolute()
        }
        if changed:
            updates[section_name] = section.model_copy(update=changed)
    return config.model_copy(update=updates)
