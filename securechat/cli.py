"""The ``securechat`` command: argument parsing and turning failures into exit codes.

``main(argv)`` returns the exit code: 0 ok, 1 runtime failure (cannot
connect, login refused, address in use), 2 usage or configuration error.
Every failure a user can cause is reported as one line on stderr, never a
traceback. Passwords are read from a no-echo prompt, stdin or the
``SECURECHAT_PASSWORD`` environment variable, never from the command line.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import getpass
import json
import logging
import os
import re
import signal
import ssl
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, NoReturn

import trio
from pydantic import SecretStr

from . import __version__, checks, process, service, supervisor, tls
from .certs import CA, MAX_LEAF_DAYS, RENEW_WITHIN, SERVER, CertError, Issued, generate
from .client import FEATURES, ChatConnection, ChatSession, ClientError, FeaturesRefused
from .config import ClientSection, Config, ConfigError, exposure_warning, load_config
from .console import Console, PipeConsole, open_console
from .operator_console import PROMPT, run_operator_console
from .passwords import check_new_password, hash_password
from .protocol import NAME_PATTERN, Welcome, json_schemas
from .redis_link import ClusterError
from .server import ChatServer, cluster_store, raise_open_file_limit
from .service import HangupAction, ServiceError
from .store import StoreError

log = logging.getLogger("securechat")

DEFAULT_SERVER_CONFIG = Path("securechat.toml")
MAX_WORKERS = 64
PASSWORD_ENV = "SECURECHAT_PASSWORD"  # noqa: S105 (a variable name)


class UsageError(Exception):
    """A mistake in how the command was called (exit code 2)."""


class RuntimeFailure(Exception):
    """The command was fine but could not do its job (exit code 1)."""


def main(argv: Sequence[str] | None = None) -> int:
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse already printed usage and the error
        return exc.code if isinstance(exc.code, int) else 2
    command: Callable[[argparse.Namespace], int] = args.command
    try:
        return command(args)
    except (UsageError, ConfigError, CertError) as exc:
        _fail(str(exc))
        return 2
    except (RuntimeFailure, ClientError, ServiceError) as exc:
        _fail(str(exc))
        return 1
    except KeyboardInterrupt:
        return 130


def _fail(message: str) -> None:
    print(f"securechat: error: {message}", file=sys.stderr, flush=True)


# --- argument parsing ------------------------------------------------------------


def _port(value: str) -> int:
    try:
        port = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {value!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port out of range (0-65535): {port}")
    return port


def _renewable(value: str) -> str:
    if value == CA:
        raise argparse.ArgumentTypeError("the CA is not renewed: --new-ca replaces it")
    return value if value == SERVER else _username(value)


def _workers(value: str) -> int:
    try:
        count = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of workers: {value!r}") from None
    if not 1 <= count <= MAX_WORKERS:
        raise argparse.ArgumentTypeError(f"must be between 1 and {MAX_WORKERS}: {count}")
    return count


def _worker_number(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a worker number: {value!r}") from None
    if not 1 <= number <= 64:
        raise argparse.ArgumentTypeError(f"must be between 1 and 64: {number}")
    return number


def _leaf_days(value: str) -> int:
    try:
        days = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of days: {value!r}") from None
    if not 1 <= days <= MAX_LEAF_DAYS:
        raise argparse.ArgumentTypeError(f"must be between 1 and {MAX_LEAF_DAYS}: {days}")
    return days


def _username(value: str) -> str:
    if not re.fullmatch(NAME_PATTERN, value):
        raise argparse.ArgumentTypeError(
            f"invalid username {value!r}: lowercase letters, digits, '_', '.', '-'"
            " (at most 32, not starting with '.' or '-')"
        )
    return value


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line on stderr, like every other error."""

    def error(self, message: str) -> NoReturn:
        _fail(f"{message} (see `{self.prog} --help`)")
        raise SystemExit(2)


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="securechat",
        description="A secure chat server and client: TLS everywhere, authenticated users.",
    )
    parser.add_argument("-V", "--version", action="version", version=f"securechat {__version__}")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)

    gen = commands.add_parser(
        "gen-certs",
        help="make or renew the private CA, the server certificate and client certificates",
        description=(
            "Write ca.crt/ca.key, server.crt/server.key and <user>.crt/<user>.key into the"
            " output directory (ECDSA P-256; keys mode 0600, a new directory mode 0700), then"
            " list every certificate there and when it expires. The CA is made once and kept:"
            " existing files stay as they are, new certificates and renewals are signed by the"
            " same CA, so issued client certificates keep working. The server certificate is"
            " valid for localhost, 127.0.0.1, ::1 and this machine's hostname, plus every --san."
            f" Server and client certificates are valid {MAX_LEAF_DAYS} days or --days."
        ),
    )
    gen.add_argument("--out", type=Path, default=Path("certs"), help="directory (default: certs)")
    gen.add_argument(
        "--san",
        action="append",
        default=[],
        metavar="NAME",
        help="another DNS name or IP address for the server certificate (repeatable;"
        " with --renew server for an existing one)",
    )
    gen.add_argument(
        "--client",
        action="append",
        default=[],
        metavar="USER",
        type=_username,
        help="make a client certificate whose CN is USER, unless there is one (repeatable)",
    )
    gen.add_argument(
        "--renew",
        action="append",
        default=[],
        metavar="NAME",
        type=_renewable,
        help="reissue the certificate 'server' or USER's with a new key and the same CA"
        " (repeatable); a renewed server certificate keeps its names",
    )
    gen.add_argument(
        "--days",
        type=_leaf_days,
        default=MAX_LEAF_DAYS,
        help=f"validity of the certificates issued now (1-{MAX_LEAF_DAYS};"
        f" default {MAX_LEAF_DAYS})",
    )
    gen.add_argument(
        "--new-ca",
        action="store_true",
        help="replace the CA and reissue every certificate in the directory: every client"
        " certificate and ca.crt given out so far stops working",
    )
    gen.add_argument("--force", action="store_true", help=argparse.SUPPRESS)  # see _cmd_gen_certs
    gen.set_defaults(command=_cmd_gen_certs)

    hasher = commands.add_parser(
        "hash-password",
        help="print an Argon2id hash for a [users.NAME] password_hash entry",
        description=(
            "Read a password (without echo on a terminal, or one line from stdin when piped)"
            " and print its Argon2id PHC string (m=19456 KiB, t=2, p=1) for the config file."
        ),
    )
    hasher.set_defaults(command=_cmd_hash_password)

    server = commands.add_parser(
        "server",
        help="run the chat server",
        description=(
            "Run the TLS chat server. Settings come from the config file; the flags below"
            " override it. It logs its pid and config file at start and keeps its pid in a"
            " file beside the database (data/securechat.pid; a cluster node, with [cluster],"
            " keeps none). Stop with Ctrl-C or SIGTERM: clients are told and the server exits"
            " 0; closing the terminal it runs in stops it the same way. `securechat reload`"
            " (or SIGHUP) re-reads the config file's users and rooms and the certificate files"
            " (an invalid file is logged and ignored)."
        ),
    )
    server.add_argument(
        "--config",
        type=Path,
        default=DEFAULT_SERVER_CONFIG,
        help=f"TOML config file (default: {DEFAULT_SERVER_CONFIG}; see config.example.toml)",
    )
    server.add_argument("--host", help="address to listen on ([server] host)")
    server.add_argument("--port", type=_port, help="port to listen on ([server] port)")
    server.add_argument("--cert", type=Path, help="server certificate ([server] cert)")
    server.add_argument("--key", type=Path, help="server private key ([server] key)")
    server.add_argument("--ca", type=Path, help="CA for client certificates ([server] ca)")
    server.add_argument(
        "--client-certs",
        choices=["none", "optional", "required"],
        help="whether clients may or must present a certificate ([server] client_certs)",
    )
    server.add_argument(
        "--console",
        action="store_true",
        help=(
            "operator prompt (msg>): lines go to every room as 'server'; /who, /rooms,"
            " /kick USER; /quit or Ctrl-D stops the server"
        ),
    )
    server.add_argument(
        "--workers",
        type=_workers,
        metavar="N",
        help="run N worker processes of this cluster node on one port (SO_REUSEPORT), under a"
        " supervisor that restarts a worker that dies and passes SIGHUP, SIGTERM and SIGINT"
        " on; needs [cluster]",
    )
    # Internal: a worker of --workers (see securechat/supervisor.py).
    server.add_argument(supervisor.WORKER_FLAG, type=_worker_number, help=argparse.SUPPRESS)
    server.add_argument(
        "--log-file",
        type=Path,
        metavar="FILE",
        help="append the log to FILE (created mode 0600, reopened when logrotate moves it)"
        " instead of writing it to stderr",
    )
    server.add_argument(
        "--log-level",
        choices=["debug", "info", "warning", "error"],
        default="info",
        help="log verbosity (default: info)",
    )
    server.set_defaults(command=_cmd_server)

    check = commands.add_parser(
        "check-config",
        help="check a server config, its certificates, key, database and port",
        description=(
            "Check without starting a server: the config file (valid; not readable by others"
            " when it holds password hashes), the server certificate (dates, names against"
            " [server] host), its key (mode 0600, matches the certificate), the CA, that the"
            " TLS settings load, the database (writable or creatable), whether a server runs"
            " with this config, and the port. One line per check: ok, warning or error."
            " Exit code 0 without errors (warnings allowed), 2 with errors."
        ),
    )
    check.add_argument(
        "--config",
        type=Path,
        default=DEFAULT_SERVER_CONFIG,
        help=f"the server's config file (default: {DEFAULT_SERVER_CONFIG})",
    )
    check.set_defaults(command=_cmd_check_config)

    reload = commands.add_parser(
        "reload",
        help="make the running server re-read its config file",
        description=(
            "Check the config file and the certificate files as check-config does, then tell"
            " the server running with that file (found through the pidfile beside its"
            " database) to re-read it: users, passwords, admins, rooms and the certificate"
            " files. Nothing is sent when a check finds an error. The server logs what"
            " changed."
        ),
    )
    reload.add_argument(
        "--config",
        type=Path,
        default=DEFAULT_SERVER_CONFIG,
        help=f"the server's config file (default: {DEFAULT_SERVER_CONFIG})",
    )
    reload.set_defaults(command=_cmd_reload)

    client = commands.add_parser(
        "client",
        help="connect to a server and chat",
        description=(
            "Connect over TLS, verify the server against the CA, log in and chat at the"
            " send>>> prompt. The password comes from a no-echo prompt or the"
            f" {PASSWORD_ENV} environment variable; with --cert/--key the certificate"
            " logs you in. With stdin not a terminal, each line is carried out in turn"
            " (a message once acknowledged), and the client exits 0 at the end of input;"
            " a line that cannot be sent or that the server refuses stops it with exit"
            " code 1 and an error naming the line."
        ),
    )
    client.add_argument("--config", type=Path, help="TOML file with a [client] section")
    client.add_argument("--host", help="server name or address (default: localhost)")
    client.add_argument("--port", type=_port, help="server port (default: 8000)")
    client.add_argument("--user", type=_username, help="your username")
    client.add_argument("--ca", type=Path, help="CA certificate to trust (default: certs/ca.crt)")
    client.add_argument("--cert", type=Path, help="client certificate (with --key)")
    client.add_argument("--key", type=Path, help="client private key (with --cert)")
    client.add_argument(
        "--ask-password",
        action="store_true",
        help="also send a password when logging in with a certificate",
    )
    client.set_defaults(command=_cmd_client)

    schema = commands.add_parser(
        "schema",
        help="print the JSON Schema of the wire protocol",
        description="Print the JSON Schema of every envelope, in both directions.",
    )
    schema.set_defaults(command=_cmd_schema)
    return parser


# --- commands ---------------------------------------------------------------------


def _cmd_gen_certs(args: argparse.Namespace) -> int:
    if args.force:
        # It used to replace the CA too, silently breaking every client certificate.
        raise UsageError(
            "--force is gone: --renew server (or --renew USER) reissues a certificate with the"
            " same CA; --new-ca replaces the CA, and every client certificate with it"
        )
    try:
        report = generate(
            args.out,
            sans=args.san,
            clients=args.client,
            renew=args.renew,
            new_ca=args.new_ca,
            days=args.days,
        )
    except OSError as exc:
        raise RuntimeFailure(f"{exc.filename or args.out}: {exc.strerror or exc}") from None
    for warning in report.warnings:
        print(f"securechat: warning: {warning}", file=sys.stderr, flush=True)
    now = datetime.now(UTC)
    for issued in report.certificates:
        print(_describe_certificate(issued, now))
    return 0


def _describe_certificate(issued: Issued, now: datetime) -> str:
    """``made     certs/alice.crt, certs/alice.key: client alice; expires ... (in 366 days)``"""
    files = f"{issued.cert_path}, {issued.key_path}" if issued.key_path else f"{issued.cert_path}"
    if issued.stem == CA:
        what = "the CA" if issued.key_path else "the CA (its key is not here)"
    elif issued.stem == SERVER:
        what = f"server for {', '.join(issued.names)}"
    else:
        what = f"client {issued.stem}"
    left = issued.not_after - now
    expiry = f"expires {issued.not_after:%Y-%m-%d %H:%M} UTC"
    if left <= timedelta(0):
        expiry = f"EXPIRED {issued.not_after:%Y-%m-%d %H:%M} UTC"
    else:
        expiry += f" (in {round(left / timedelta(days=1))} days)"
    hints = []
    if issued.stem != CA and issued.action == "kept":
        if not issued.signed_by_ca:
            hints.append("NOT signed by this directory's ca.crt")
        if left <= RENEW_WITHIN or not issued.signed_by_ca:
            hints.append(f"renew with --renew {issued.stem}")
    elif issued.stem == CA and left <= RENEW_WITHIN:
        hints.append("replace it with --new-ca")
    tail = "".join(f"; {hint}" for hint in hints)
    return f"{issued.action:<8} {files}: {what}; {expiry}{tail}"


def _cmd_hash_password(args: argparse.Namespace) -> int:
    if sys.stdin.isatty():
        password = getpass.getpass("New password: ")
        if getpass.getpass("Repeat it: ") != password:
            raise UsageError("the passwords do not match")
    else:
        password = sys.stdin.readline().removesuffix("\n").removesuffix("\r")
    try:
        check_new_password(password)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    print(hash_password(password))
    return 0


def _cmd_schema(args: argparse.Namespace) -> int:
    print(json.dumps(json_schemas(), indent=2))
    return 0


def _cmd_server(args: argparse.Namespace) -> int:
    if args.config == DEFAULT_SERVER_CONFIG and not args.config.exists():
        raise UsageError(
            f"{args.config}: file not found"
            " (pass --config FILE; config.example.toml shows every key)"
        )
    config = load_config(args.config)
    _check_process_flags(args, config)
    overrides = {
        name: getattr(args, name)
        for name in ("host", "port", "cert", "key", "ca", "client_certs")
        if getattr(args, name) is not None
    }
    config = _with_overrides(config, overrides)
    supervised = args.workers is not None or args.worker is not None
    with contextlib.ExitStack() as cleanup:  # undone in reverse order
        log_handler = service.log_handler(args.log_file, tag_pid=supervised)
        cleanup.callback(log_handler.close)
        cleanup.callback(logging.getLogger().removeHandler, log_handler)
        hangup = _Hangup(
            had_terminal=service.has_controlling_terminal(),
            # Read before trio installs its handler: SIG_IGN here means nohup.
            ignored_at_start=signal.getsignal(signal.SIGHUP) == signal.SIG_IGN,
        )
        if args.workers is not None:
            try:
                return trio.run(_supervise, config, args, hangup, log_handler)
            except supervisor.StartFailed as exc:
                _fail(str(exc))
                return exc.code
        server: ChatServer | None = None
        pidfile: Path | None = None
        if config.cluster is None:
            # Before the database is touched: a second server on it is refused here.
            held = service.PidFile.acquire(service.pidfile_path(config.storage.path))
            cleanup.callback(held.release)
            pidfile = held.path
            try:
                server = ChatServer(config)
            except StoreError as exc:
                raise RuntimeFailure(str(exc)) from None
        # else: a cluster node opens no database, so it keeps no pidfile. The pidfile
        # guards the SQLite file against a second server; nodes share Redis, which
        # needs no such guard, and several nodes on one host may well share one config
        # file (the workers of --workers do). Its server is built once Redis answers.
        raise_open_file_limit()
        started = _Started(args.config, overrides, pidfile, hangup, log_handler)
        return trio.run(_serve, config, server, started, args)


def _check_process_flags(args: argparse.Namespace, config: Config) -> None:
    """--workers and --worker: what they need, and what they cannot go with."""
    if args.workers is not None:
        if config.cluster is None:
            raise UsageError(
                f"--workers needs a [cluster] section ({args.config} has none): without"
                " Redis, worker processes would each be a separate chat"
            )
        if args.console:
            raise UsageError(
                "--console cannot go with --workers: each worker is a process of its own;"
                " run the operator console on a server without --workers"
            )
    if args.worker is not None and (
        args.workers is not None or config.cluster is None or args.console
    ):
        raise UsageError(
            f"{supervisor.WORKER_FLAG} is for the workers `--workers` starts (with a"
            " [cluster] section; no --console)"
        )


def _with_overrides(config: Config, overrides: dict[str, Any]) -> Config:
    return config.model_copy(update={"server": config.server.model_copy(update=overrides)})


@dataclass(frozen=True)
class _Hangup:
    had_terminal: bool
    ignored_at_start: bool


@dataclass(frozen=True)
class _Started:
    config_path: Path
    overrides: dict[str, Any]  # the [server] settings given as flags
    pidfile: Path | None  # None: a cluster node
    hangup: _Hangup
    log_handler: logging.Handler


async def _serve(
    config: Config, server: ChatServer | None, started: _Started, args: argparse.Namespace
) -> int:
    """Run ``server``; for a cluster node (``server`` None) connect to Redis and build it."""
    # The console goes first: on a terminal it redirects stdout and stderr
    # so that log lines print above the prompt.
    console = open_console(lambda: PROMPT) if args.console else None
    try:
        _setup_logging(args.log_level, started.log_handler, log_file=args.log_file is not None)
        if server is not None:
            assert started.pidfile is not None
            log.info(
                "securechat %s pid %d: config %s, pidfile %s",
                __version__,
                os.getpid(),
                started.config_path.resolve(),
                started.pidfile.resolve(),
            )
            return await _run(server, started, args, console)
        section = config.cluster
        assert section is not None
        log.info(
            "securechat %s pid %d: config %s, cluster mode on Redis %s (durability %s),"
            " no pidfile%s",
            __version__,
            os.getpid(),
            started.config_path.resolve(),
            section.redacted_url(),  # never the password
            section.durability,
            f", worker {args.worker} of pid {os.getppid()}" if args.worker is not None else "",
        )
        try:
            async with cluster_store(section) as store:
                server = ChatServer(config, store=store, worker=args.worker)
                return await _run(server, started, args, console)
        except ClusterError as exc:
            raise RuntimeFailure(str(exc)) from None
    finally:
        if console is not None:
            await console.aclose()


async def _run(
    server: ChatServer, started: _Started, args: argparse.Namespace, console: Console | None
) -> int:
    process.tune_allocator()
    try:
        await server.load()
    except StoreError as exc:
        raise RuntimeFailure(str(exc)) from None
    # What exists now (config, TLS contexts, pydantic schemas, the hub's
    # rooms and users) lives as long as the process: keep it out of the
    # garbage collector's full passes, which under load would walk it again
    # and again (what that buys: docs/performance.md).
    gc.freeze()
    settings = server.config.server
    try:
        await server.listen(reuse_port=args.worker is not None)
    except OSError as exc:
        raise RuntimeFailure(
            f"cannot listen on {settings.host}:{settings.port}: {exc.strerror or exc}"
        ) from None
    try:
        await server.listen_metrics()
    except OSError as exc:
        raise RuntimeFailure(
            f"[metrics] cannot listen on {server.config.metrics.listen}: {exc.strerror or exc}"
        ) from None
    async with trio.open_nursery() as nursery:
        await nursery.start(_handle_signals, server, started)
        if console is not None:
            nursery.start_soon(_operate, server, console)
        if args.worker is not None:
            nursery.start_soon(_follow_supervisor, server)
        addresses = await nursery.start(_serve_until_shutdown, server, nursery.cancel_scope)
        listening = ", ".join(
            f"[{host}]:{port}" if ":" in host else f"{host}:{port}" for host, port in addresses
        )
        try:
            service.notify_systemd(f"READY=1\nSTATUS=listening on {listening}")
        except ServiceError as exc:
            log.warning("%s", exc)
    return 0


async def _follow_supervisor(server: ChatServer) -> None:
    """A worker's stdin is a pipe from its supervisor, which never writes to it: its end
    means the supervisor is gone (even by SIGKILL), and a worker does not run on alone."""
    try:
        stdin = trio.lowlevel.FdStream(os.dup(0))
    except OSError:
        stdin = None
    if stdin is not None:
        async with stdin:
            try:
                while await stdin.receive_some():
                    pass
            except (OSError, trio.BrokenResourceError):
                pass
    log.warning("the supervisor is gone (this worker's stdin closed): shutting down")
    server.request_shutdown()


async def _supervise(
    config: Config, args: argparse.Namespace, hangup: _Hangup, log_handler: logging.Handler
) -> int:
    """``--workers N``: reserve the port, then run the workers (securechat.supervisor)."""
    _setup_logging(args.log_level, log_handler, log_file=args.log_file is not None)
    settings, section = config.server, config.cluster
    assert section is not None
    try:
        held = await trio.to_thread.run_sync(supervisor.reserve_port, settings.host, settings.port)
    except OSError as exc:
        raise RuntimeFailure(
            f"cannot listen on {settings.host}:{settings.port}: {exc.strerror or exc}"
        ) from None
    try:
        port = held[0].getsockname()[1]
        where = f"[{settings.host}]:{port}" if ":" in settings.host else f"{settings.host}:{port}"
        log.info(
            "securechat %s pid %d: supervisor of %d workers on %s; config %s, cluster mode on"
            " Redis %s, no pidfile",
            __version__,
            os.getpid(),
            args.workers,
            where,
            args.config.resolve(),
            section.redacted_url(),
        )
        return await supervisor.Supervisor(
            [sys.executable, "-m", "securechat", "server", *_worker_flags(args, port)],
            args.workers,
            where=where,
            environ=os.environ,
            stop_within=config.limits.shutdown_grace + supervisor.STOP_SLACK,
            had_terminal=hangup.had_terminal,
            hangup_ignored_at_start=hangup.ignored_at_start,
        ).run()
    finally:
        for sock in held:
            sock.close()


def _worker_flags(args: argparse.Namespace, port: int) -> list[str]:
    """The supervisor's own flags for a worker, with the reserved port: no secret is a flag."""
    flags = ["--config", str(args.config), "--port", str(port), "--log-level", args.log_level]
    for name in ("host", "cert", "key", "ca", "client_certs"):
        if (value := getattr(args, name)) is not None:
            flags += [f"--{name.replace('_', '-')}", str(value)]
    if args.log_file is not None:
        flags += ["--log-file", str(args.log_file)]
    return flags  # the supervisor adds --worker N, N for each worker


async def _serve_until_shutdown(
    server: ChatServer,
    everything: trio.CancelScope,
    *,
    task_status: trio.TaskStatus[list[tuple[str, int]]] = trio.TASK_STATUS_IGNORED,
) -> None:
    await server.serve(task_status=task_status)
    everything.cancel()  # the signal handler and the console


async def _operate(server: ChatServer, console: Console) -> None:
    await run_operator_console(server.hub, console)
    server.request_shutdown()


async def _handle_signals(
    server: ChatServer,
    started: _Started,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    config_path, hangup = started.config_path, started.hangup
    with trio.open_signal_receiver(
        signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1
    ) as signals:
        # The config file's mode and the certificates' expiry are checked
        # here: at start, and at every reload.
        _warn_if_exposed(config_path, server.config)
        _warn_if_expiring(server)
        task_status.started()
        async for signum in signals:
            name = signal.Signals(signum).name
            if signum in (signal.SIGINT, signal.SIGTERM):
                log.info("received %s: shutting down", name)
                server.request_shutdown()
                return
            if signum == signal.SIGHUP:
                action = service.sighup_action(
                    had_terminal=hangup.had_terminal,
                    terminal_now=service.has_controlling_terminal(),
                    ignored_at_start=hangup.ignored_at_start,
                )
                if action is HangupAction.SHUTDOWN:
                    log.info("received SIGHUP: the terminal was closed, shutting down")
                    server.request_shutdown()
                    return
                if action is HangupAction.IGNORE:
                    log.info(
                        "received SIGHUP: the terminal was closed; started with SIGHUP"
                        " ignored (nohup), so running on. `securechat reload` still reloads"
                    )
                    continue
            log.info("received %s: reloading %s", name, config_path)
            try:
                config = await trio.to_thread.run_sync(load_config, config_path)
            except ConfigError as exc:
                log.error("config reload failed, keeping the current config: %s", exc)
            else:
                _warn_if_exposed(config_path, config)
                # The flags still hold: only a change in the file is a change.
                server.reload(_with_overrides(config, started.overrides))
                _warn_if_expiring(server)


def _warn_if_expiring(server: ChatServer) -> None:
    # The running settings: a reload re-reads the certificate files at the
    # paths the server started with.
    for finding in checks.expiry_warnings(server.config.server, datetime.now(UTC)):
        level = logging.ERROR if finding.status is checks.Status.ERROR else logging.WARNING
        what = "the CA" if finding.topic == "ca" else "the server certificate"
        log.log(level, "%s %s", what, finding.text)


def _warn_if_exposed(config_path: Path, config: Config) -> None:
    warning = exposure_warning(config_path, config)
    if warning is not None:
        log.warning("%s", warning)


def _setup_logging(level: str, handler: logging.Handler, *, log_file: bool) -> None:
    root = logging.getLogger()
    root.setLevel(level.upper())
    # coredis logs each retry and each lost connection at INFO (several lines a second
    # while Redis is away, some with a stray "NoneType: None"); a node logs Redis's state
    # changes itself, once each. Its lines stay visible with --log-level debug.
    logging.getLogger("coredis").setLevel(logging.DEBUG if level == "debug" else logging.WARNING)
    # Keep a host's handlers (pytest's, an embedding app's) unless a file was asked for.
    if log_file or not root.handlers:
        root.addHandler(handler)


def _cmd_check_config(args: argparse.Namespace) -> int:
    findings = checks.check_config(args.config, datetime.now(UTC))
    for finding in findings:
        print(finding.line())
    failed, warned = _tally(findings)
    print(f"{args.config}: {failed}, {warned}{_missing_default_hint(args.config)}")
    return 2 if checks.errors(findings) else 0


def _tally(findings: Sequence[checks.Finding]) -> tuple[str, str]:
    failed = len(checks.errors(findings))
    warned = sum(finding.status is checks.Status.WARNING for finding in findings)
    return (
        f"{failed} error{'' if failed == 1 else 's'}",
        f"{warned} warning{'' if warned == 1 else 's'}",
    )


def _missing_default_hint(path: Path) -> str:
    if path == DEFAULT_SERVER_CONFIG and not path.exists():
        return " (pass --config FILE; config.example.toml shows every key)"
    return ""


def _cmd_reload(args: argparse.Namespace) -> int:
    findings, config = checks.check_reloadable(args.config, datetime.now(UTC))
    for finding in findings:
        if finding.status is checks.Status.WARNING:
            print(f"securechat: warning: {finding.text}", file=sys.stderr, flush=True)
    problems = checks.errors(findings)
    for finding in problems[:-1]:
        _fail(finding.text)
    if problems:
        hint = _missing_default_hint(args.config)
        raise UsageError(f"{problems[-1].text}; nothing sent to the server{hint}")
    assert config is not None  # it is None only when loading it failed, an error
    if config.cluster is not None:
        raise UsageError(
            f"{args.config} has a [cluster] section: cluster nodes keep no pidfile, so reload"
            " cannot find them; send SIGHUP to each node, or to the --workers supervisor,"
            " which passes it on (each logs its pid at start)"
        )
    pidfile = service.pidfile_path(config.storage.path)
    pid = service.running_pid(pidfile)
    if pid is None:
        state = "a stale one, left by a server that did not exit" if pidfile.exists() else "none"
        raise RuntimeFailure(
            f"no securechat server is running with {args.config} (pidfile {pidfile}: {state})"
        )
    try:
        os.kill(pid, signal.SIGUSR1)
    except ProcessLookupError:
        raise RuntimeFailure(f"the server (pid {pid}) has just exited") from None
    except PermissionError:
        raise RuntimeFailure(
            f"not allowed to signal the server (pid {pid}): run this as its user"
        ) from None
    print(
        f"reload requested: server pid {pid}, config {args.config.resolve()}; its log says"
        " what changed"
    )
    return 0


def _cmd_client(args: argparse.Namespace) -> int:
    settings = load_config(args.config).client if args.config else ClientSection()
    overrides = {
        name: getattr(args, name)
        for name in ("host", "port", "ca", "cert", "key")
        if getattr(args, name) is not None
    }
    if args.user is not None:
        overrides["user"] = args.user
    settings = settings.model_copy(update=overrides)
    if settings.user is None:
        raise UsageError("no username: pass --user NAME (or set [client] user in --config)")
    ssl_context = tls.client_context(settings.ca, settings.cert, settings.key)
    password = _client_password(settings, ask=args.ask_password)
    return trio.run(_chat, settings, settings.user, password, ssl_context)


def _client_password(settings: ClientSection, *, ask: bool) -> SecretStr | None:
    from_env = os.environ.get(PASSWORD_ENV)
    if from_env:
        return SecretStr(from_env)
    if settings.cert is not None and not ask:
        return None
    if not sys.stdin.isatty():
        raise UsageError(
            f"no password: set {PASSWORD_ENV} or log in with a client certificate (--cert/--key)"
        )
    return SecretStr(getpass.getpass(f"password for {settings.user}: "))


async def _chat(
    settings: ClientSection, username: str, password: SecretStr | None, context: ssl.SSLContext
) -> int:
    features: tuple[str, ...] = FEATURES

    async def connect() -> tuple[ChatConnection, Welcome]:
        nonlocal features
        while True:
            connection = await ChatConnection.open(
                settings.host, settings.port, context, certificate=settings.cert
            )
            try:
                return connection, await connection.login(username, password, features=features)
            except FeaturesRefused:
                features = ()  # an older server (it closed the connection): log in without
                await trio.aclose_forcefully(connection.stream)
            except BaseException:
                await trio.aclose_forcefully(connection.stream)
                raise

    connection, welcome = await connect()
    print("[CONNECTED]", flush=True)  # only once logged in: a refusal is an error instead
    session: ChatSession
    console = open_console(lambda: session.prompt(), lambda line: session.check(line))
    session = ChatSession(
        connection, welcome, console, reconnect=connect, script=isinstance(console, PipeConsole)
    )
    try:
        console.show(session.format.welcome(welcome))
        code = await session.run()
    finally:
        await console.aclose()
        await session.connection.aclose()
    if session.failure is not None:
        _fail(session.failure)
    return code
