"""The ``securechat`` command: argument parsing and turning failures into exit codes.

``main(argv)`` returns the exit code: 0 ok, 1 runtime failure (cannot
connect, login refused, address in use), 2 usage or configuration error.
Every failure a user can cause is reported as one line on stderr, never a
traceback. Passwords are read from a no-echo prompt, stdin or the
``SECURECHAT_PASSWORD`` environment variable, never from the command line.
"""

from __future__ import annotations

import argparse
import gc
import getpass
import json
import logging
import os
import re
import signal
import ssl
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, NoReturn

import trio
from pydantic import SecretStr

from . import __version__, process, tls
from .auth import check_new_password, hash_password
from .certs import CA, MAX_LEAF_DAYS, RENEW_WITHIN, SERVER, CertError, Issued, generate
from .client import ChatConnection, ChatSession, ClientError
from .config import ClientSection, Config, ConfigError, exposure_warning, load_config
from .console import Console, PipeConsole, open_console
from .operator_console import PROMPT, run_operator_console
from .protocol import NAME_PATTERN, Welcome, json_schemas
from .server import ChatServer, raise_open_file_limit
from .store import StoreError

log = logging.getLogger("securechat")

DEFAULT_SERVER_CONFIG = Path("securechat.toml")
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
    except (RuntimeFailure, ClientError) as exc:
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
            " override it. Stop with Ctrl-C or SIGTERM: clients are told and the server exits 0."
            " SIGHUP re-reads the config file's users and rooms (an invalid file is logged and"
            " ignored)."
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
        "--log-level",
        choices=["debug", "info", "warning", "error"],
        default="info",
        help="log verbosity (default: info)",
    )
    server.set_defaults(command=_cmd_server)

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
    overrides = {
        name: getattr(args, name)
        for name in ("host", "port", "cert", "key", "ca", "client_certs")
        if getattr(args, name) is not None
    }
    config = config.model_copy(update={"server": config.server.model_copy(update=overrides)})
    try:
        server = ChatServer(config)
    except StoreError as exc:
        raise RuntimeFailure(str(exc)) from None
    raise_open_file_limit()
    # What exists now (config, TLS contexts, pydantic schemas, the hub's
    # rooms and users) lives as long as the process: keep it out of the
    # garbage collector's full passes, which under load would walk it again
    # and again. Measured: durable 18 100 -> 19 500 acked/s.
    gc.freeze()
    return trio.run(_serve, server, args.config, args.console, args.log_level)


async def _serve(server: ChatServer, config_path: Path, with_console: bool, log_level: str) -> int:
    # The console goes first: on a terminal it redirects stdout and stderr
    # so that log lines print above the prompt.
    console = open_console(lambda: PROMPT) if with_console else None
    _setup_logging(log_level)
    process.tune_allocator()
    settings = server.config.server
    try:
        await server.listen()
    except OSError as exc:
        raise RuntimeFailure(
            f"cannot listen on {settings.host}:{settings.port}: {exc.strerror or exc}"
        ) from None
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(_handle_signals, server, config_path)
            if console is not None:
                nursery.start_soon(_operate, server, console)
            await server.serve()
            nursery.cancel_scope.cancel()
    finally:
        if console is not None:
            await console.aclose()
    return 0


async def _operate(server: ChatServer, console: Console) -> None:
    await run_operator_console(server.hub, console)
    server.request_shutdown()


async def _handle_signals(
    server: ChatServer,
    config_path: Path,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        # The config file's mode is checked here: at start, and at every reload.
        _warn_if_exposed(config_path, server.config)
        task_status.started()
        async for signum in signals:
            log.info("received %s", signal.Signals(signum).name)
            if signum != signal.SIGHUP:
                server.request_shutdown()
                return
            try:
                config = await trio.to_thread.run_sync(load_config, config_path)
            except ConfigError as exc:
                log.error("config reload failed, keeping the current config: %s", exc)
            else:
                _warn_if_exposed(config_path, config)
                server.reload(config)


def _warn_if_exposed(config_path: Path, config: Config) -> None:
    warning = exposure_warning(config_path, config)
    if warning is not None:
        log.warning("%s", warning)


def _setup_logging(level: str) -> None:
    formatter = logging.Formatter(
        "%(asctime)s.%(msecs)03dZ %(levelname)s %(name)s: %(message)s", "%Y-%m-%dT%H:%M:%S"
    )
    formatter.converter = time.gmtime
    root = logging.getLogger()
    root.setLevel(level.upper())
    if not root.handlers:  # keep a host's handlers (pytest's, an embedding app's)
        handler = _StderrHandler()
        handler.setFormatter(formatter)
        root.addHandler(handler)


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is now (the operator console replaces it)."""

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


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
    async def connect() -> tuple[ChatConnection, Welcome]:
        connection = await ChatConnection.open(
            settings.host, settings.port, context, certificate=settings.cert
        )
        try:
            return connection, await connection.login(username, password)
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
