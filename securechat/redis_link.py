"""The link from a cluster node to Redis: connecting, and checking that Redis keeps acks.

Owns turning a ``[cluster]`` section into a connected :class:`coredis.Redis` client
under trio (the password from the URL or ``SECURECHAT_REDIS_PASSWORD``; TLS with the
``ssl`` module's defaults, i.e. the system's CA certificates, for ``rediss://``), and
the start-up check of Redis's persistence settings against ``[cluster] durability``
(:func:`check_durability`). Every failure is a :class:`ClusterError` whose message is
one line naming Redis as ``host:port`` (never the password) and saying how to fix it.

What is stored in Redis, and how, is not this module's: it hands out the client.
"""

from __future__ import annotations

import logging
import os
import socket
import ssl
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager

import coredis
import trio
from coredis.exceptions import (
    AuthenticationFailureError,
    AuthenticationRequiredError,
    AuthorizationError,
    RedisError,
    UnknownCommandError,
)

from .config import ClusterSection, RedisTarget

log = logging.getLogger("securechat.cluster")

CONNECT_TIMEOUT = 10.0
"""Seconds to connect, authenticate and get a PING answered."""

ACCEPT_ANYTHING = '[cluster] durability = "memory"'


class ClusterError(Exception):
    """Cluster mode cannot run against this Redis; the message is one line."""


def make_client(target: RedisTarget) -> coredis.Redis[bytes]:
    """A client for ``target`` (not connected yet: enter it in the task that outlives
    its users, as anyio ties its cancel scopes to the entering task)."""
    return coredis.Redis(
        host=target.host,
        port=target.port,
        db=target.db,
        username=target.username,
        password=None if target.password is None else target.password.get_secret_value(),
        ssl_context=ssl.create_default_context() if target.tls else None,
        connect_timeout=CONNECT_TIMEOUT,
    )


@asynccontextmanager
async def connect(
    section: ClusterSection,
    environ: Mapping[str, str] | None = None,
    *,
    answer_within: float = CONNECT_TIMEOUT,
) -> AsyncIterator[coredis.Redis[bytes]]:
    """A client of the section's Redis that has answered a PING within ``answer_within`` seconds.

    ``environ`` (default: the process's) may hold the password; a password in both the
    URL and the environment raises :class:`~securechat.config.ConfigError`. A Redis that
    cannot be reached, refuses the login or does not answer raises :class:`ClusterError`.
    """
    target = section.target(os.environ if environ is None else environ)
    client = make_client(target)
    failure: str | None = None
    raised: Exception | None = None
    async with client:
        try:
            with trio.fail_after(answer_within):
                await client.ping()
        except trio.TooSlowError:
            failure = f"no answer within {answer_within:g} s"
            if target.tls:
                failure += " (with rediss://, is that a TLS port of Redis?)"
        except (RedisError, OSError) as exc:
            failure = _reason(exc)
        if failure is None:
            try:
                yield client
            except Exception as exc:  # re-raised below, as itself
                raised = exc
    # Raised outside the client's block, whose task group would wrap them in an
    # exception group. (Cancellation and KeyboardInterrupt go through it, as they must.)
    if failure is not None:
        raise ClusterError(f"cannot use Redis at {target.endpoint}: {failure}")
    if raised is not None:
        raise raised


def _reason(exc: BaseException) -> str:
    """Why connecting failed, in words that hold no password (Redis's replies never echo it)."""
    if isinstance(exc, AuthenticationRequiredError):
        return (
            "it requires a password; give it in [cluster] redis_url"
            " (redis://:PASSWORD@host) or in SECURECHAT_REDIS_PASSWORD"
        )
    if isinstance(exc, AuthenticationFailureError):
        return (
            "it refused the user name or password (check [cluster] redis_url and the environment)"
        )
    if isinstance(exc, ssl.SSLError):
        return f"TLS failed: {exc.reason or exc}"
    causes = list(_causes(exc))
    for cause in causes:
        if isinstance(cause, ssl.SSLError):
            return f"TLS failed: {cause.reason or cause}"
    for cause in causes:  # coredis and anyio wrap the OSError that says why
        if isinstance(cause, socket.gaierror):
            return f"cannot resolve the host name ({(cause.strerror or str(cause)).lower()})"
        if isinstance(cause, OSError) and cause.errno:
            # Not strerror: anyio's repeats the address ("Error connecting to (...): ...").
            return os.strerror(cause.errno).lower()
        if isinstance(cause, OSError) and cause.strerror:
            return cause.strerror.lower()
    return _first_line(exc).lower()


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """``exc``, what caused it, and the members of exception groups among those."""
    seen: set[int] = set()
    pending = [exc]
    while pending:
        current = pending.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        if isinstance(current, BaseExceptionGroup):
            pending.extend(current.exceptions)
        pending.extend(e for e in (current.__cause__, current.__context__) if e is not None)


async def check_durability(client: coredis.Redis[bytes], section: ClusterSection) -> None:
    """Raise :class:`ClusterError` if Redis would not keep acknowledged messages as
    ``[cluster] durability`` promises; log a warning for ``"memory"``, which accepts any.

    ``"fsync"``: ``appendonly yes`` and ``appendfsync always``, on a primary.
    ``"replicated"``: the same, and at least ``replicas`` connected replicas.
    """
    where = f"Redis at {section.endpoint}"
    if section.durability == "memory":
        log.warning(
            '[cluster] durability = "memory": acks are not durable; messages acknowledged'
            " to clients are lost if %s stops before saving them",
            where,
        )
        return
    try:
        settings = await client.config_get(["appendonly", "appendfsync"])
    except (UnknownCommandError, AuthorizationError) as exc:
        raise ClusterError(
            f"{where} does not let this client run CONFIG GET ({_first_line(exc)}), so its"
            " durability cannot be checked: allow CONFIG GET (rename-command, ACL +config|get)"
            f" or accept unchecked durability with {ACCEPT_ANYTHING}"
        ) from None
    appendonly = _text(settings.get(b"appendonly"))
    appendfsync = _text(settings.get(b"appendfsync"))
    if appendonly != "yes":
        raise ClusterError(
            f"{where} has appendonly {appendonly or '(unset)'}: acks would not be durable;"
            f" set appendonly yes and appendfsync always, or accept it with {ACCEPT_ANYTHING}"
        )
    if appendfsync != "always":
        raise ClusterError(
            f"{where} has appendfsync {appendfsync or '(unset)'}: acked messages could be lost"
            " in a crash (the file is not synced before each reply); set appendfsync always,"
            f" or accept it with {ACCEPT_ANYTHING}"
        )
    replication = await client.info("replication")
    role = _text(replication.get("role"))
    if role != "master":
        raise ClusterError(
            f"{where} is a {'replica' if role == 'slave' else role or 'non-primary'}"
            " (read-only to clients): point"
            " [cluster] redis_url at the primary"
        )
    if section.durability == "replicated":
        # Replicas still in their first sync (state wait_bgsave, ...) cannot confirm a write.
        online = sum(
            1
            for key, value in replication.items()
            if _text(key).startswith("slave") and _replica_state(value) == "online"
        )
        if online < section.replicas:
            raise ClusterError(
                f"{where} has {online} replica(s) online and [cluster] replicas ="
                f" {section.replicas} needs {section.replicas}: attach replicas (replicaof)"
                ' and let them sync, lower replicas, or use durability = "fsync"'
            )


def _replica_state(value: object) -> str:
    """The ``state`` of an ``INFO replication`` ``slaveN`` entry (parsed into a mapping by
    coredis; ``ip=...,state=online,...`` as Redis writes it otherwise)."""
    if isinstance(value, Mapping):
        return _text(value.get("state"))
    fields = dict(part.partition("=")[::2] for part in _text(value).split(","))
    return fields.get("state", "")


def _text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return "" if value is None else str(value)


def _first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0].strip()
