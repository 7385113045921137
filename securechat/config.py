"""The TOML configuration file: its schema (pydantic models) and its loading.

What the rest of the server takes from it comes as plain values defined
here (:class:`Account`, :class:`RoomSettings`, :data:`ClientCertMode`): the
config depends on :mod:`~securechat.protocol`, :mod:`~securechat.passwords`
and :mod:`~securechat.limits` only, and importing it loads neither trio nor
the server. Every key is documented in ``config.example.toml``. Unknown keys
and bad values are errors that name the file and the key. Relative paths in
the file are relative to the file's own directory, so a config works from
any working directory.
"""

from __future__ import annotations

import stat
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

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
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class ServerSection(_Section):
    host: str = Field("localhost", min_length=1)
    port: Port = 8000
    cert: ConfigPath = Path("certs/server.crt")
    key: ConfigPath = Path("certs/server.key")
    ca: ConfigPath = Path("certs/ca.crt")
    client_certs: ClientCertMode = "optional"
    max_frame_bytes: int = Field(DEFAULT_MAX_FRAME_BYTES, ge=1024, le=16 * 1024 * 1024)
    allow_room_create: bool = True
    flush_interval_ms: float = Field(20.0, ge=0, le=1000)
    presence_delay_ms: float = Field(200.0, ge=0, le=5000)
    max_rooms: int = Field(1000, ge=1)


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


class ClientSection(_Section):
    host: str = Field("localhost", min_length=1)
    port: Port = 8000
    ca: ConfigPath = Path("certs/ca.crt")
    user: Name | None = None
    cert: ConfigPath | None = None
    key: ConfigPath | None = None


class Config(_Section):
    server: ServerSection = ServerSection()
    limits: LimitsSection = LimitsSection()
    storage: StorageSection = StorageSection()
    users: dict[Name, UserSection] = {}
    rooms: dict[Name, RoomSection] = {}
    client: ClientSection = ClientSection()

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
