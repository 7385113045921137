"""Running ``securechat server`` as a service: its pidfile and what SIGHUP means to it.

**The pidfile** sits beside the database (``data/securechat.db`` ->
``data/securechat.pid``), so the config file alone tells ``securechat
reload`` where to look. The server creates it mode 0600, writes its pid
into it and holds an exclusive ``flock`` on it until it exits, then removes
it. The lock, not the file's existence, says whether a server runs: a file
left behind by a server that was killed is unlocked, so it is recognised as
stale even if its pid now belongs to another process, and a second server
on the same database is refused at start. A cluster node (``[cluster]``) opens
no database, so it keeps no pidfile: several nodes on one host may share one
config file, and nothing local needs guarding (README, "Cluster mode").

**The log** goes to stderr, with a UTC timestamp on every line; under
systemd, whose journal stamps lines itself, each line starts with its
syslog priority instead (``<4>`` for a warning), so ``journalctl -p warning``
works. ``--log-file`` appends to a file instead, created mode 0600 and
reopened when it is moved away (logrotate without ``copytruncate``).

**systemd** (``Type=notify``): the server sends ``READY=1`` on
``$NOTIFY_SOCKET`` once it listens, so that ``systemctl start`` waits for
it and reports a server that could not start. See contrib/securechat.service.

**SIGHUP.** Under systemd, or any supervisor, a daemon has no terminal and
SIGHUP means "re-read your config". A server started in a terminal also
gets SIGHUP when that terminal closes (the kernel sends it to the session,
the shell passes it on to its jobs): that one means "your terminal is gone".
:func:`sighup_action` tells them apart by whether the process still has its
controlling terminal, which the kernel takes away before it signals the
hangup. ``securechat reload`` sends SIGUSR1 instead, which always reloads.
"""

from __future__ import annotations

import errno
import fcntl
import io
import logging
import logging.handlers
import os
import socket
import sys
import time
from enum import Enum
from pathlib import Path
from typing import Any

PIDFILE_SUFFIX = ".pid"
PIDFILE_MODE = 0o600
LOG_FILE_MODE = 0o600
DIRECTORY_MODE = 0o700
_ACQUIRE_ATTEMPTS = 5
_LOCK_PATIENCE = 0.2  # seconds


class ServiceError(Exception):
    """A pidfile problem; the message is one line saying what to do."""


def pidfile_path(database: Path) -> Path:
    """Where the server using ``database`` keeps its pidfile."""
    path = database.with_suffix(PIDFILE_SUFFIX)
    return path if path != database else database.with_name(database.name + PIDFILE_SUFFIX)


class PidFile:
    """This process's pid in ``path``, locked until :meth:`release`."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    @classmethod
    def acquire(cls, path: Path) -> PidFile:
        """Create or take over ``path`` and write our pid; :class:`ServiceError` if a
        running server holds it, or it cannot be written.

        A missing directory is created mode 0700, as the database's is.
        """
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=DIRECTORY_MODE)
        except OSError as exc:
            raise ServiceError(f"cannot create {path.parent}: {_reason(exc)}") from None
        for _ in range(_ACQUIRE_ATTEMPTS):
            try:
                fd = os.open(
                    path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, PIDFILE_MODE
                )
            except OSError as exc:
                raise ServiceError(f"cannot create the pidfile {path}: {_reason(exc)}") from None
            if not _lock_exclusively(fd):
                pid = _read_pid(fd)
                os.close(fd)
                raise ServiceError(
                    f"another securechat server{f' (pid {pid})' if pid else ''} is running with"
                    f" this database (its pidfile {path} is locked); stop it first"
                ) from None
            # A server that was just stopping may have removed the file we
            # opened: then our lock is on a file nobody else will find.
            if _same_file(fd, path):
                break
            os.close(fd)
        else:
            raise ServiceError(f"{path} keeps being replaced; is another server starting?")
        try:
            os.fchmod(fd, PIDFILE_MODE)  # a file left behind may have another mode
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError as exc:
            os.close(fd)
            raise ServiceError(f"cannot write the pidfile {path}: {_reason(exc)}") from None
        return cls(path, fd)

    def release(self) -> None:
        """Remove the file (if it is still ours) and drop the lock."""
        if self._fd is None:
            return
        try:
            if _same_file(self._fd, self.path):
                self.path.unlink()
        except OSError:
            pass  # nothing to be done about it at exit; the next start takes it over
        finally:
            os.close(self._fd)
            self._fd = None


def running_pid(path: Path) -> int | None:
    """The pid of the server holding the pidfile ``path``; None if there is none running.

    A file that exists but is not locked was left by a server that did not
    exit normally: it is stale, and says nothing about its pid.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ServiceError(f"cannot read the pidfile {path}: {_reason(exc)}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _read_pid(fd)
            if pid is None:
                raise ServiceError(
                    f"the pidfile {path} is locked but holds no pid (is the server starting?)"
                ) from None
            return pid
        return None
    finally:
        os.close(fd)  # also drops our shared lock, if we got it


def _lock_exclusively(fd: int) -> bool:
    """Take the exclusive lock; False if a running server holds it.

    ``running_pid`` (``securechat reload``, ``check-config``) holds a shared
    lock on a stale file for a moment: wait that out rather than mistake it
    for a server.
    """
    deadline = time.monotonic() + _LOCK_PATIENCE
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)
        else:
            return True


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return int(text) if text.isdigit() and int(text) > 0 else None


def _same_file(fd: int, path: Path) -> bool:
    try:
        on_disk = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (mine.st_dev, mine.st_ino) == (on_disk.st_dev, on_disk.st_ino)


def _reason(exc: OSError) -> str:
    if exc.errno == errno.ELOOP:
        return "it is a symbolic link"
    return exc.strerror or str(exc)


# --- SIGHUP: reload, or the terminal hung up -------------------------------------------


class HangupAction(Enum):
    RELOAD = "reload"
    SHUTDOWN = "shutdown"  # the terminal the server ran in is gone
    IGNORE = "ignore"  # ... but the server was started immune to hangups (nohup)


def has_controlling_terminal() -> bool:
    """Whether this process has a controlling terminal (one that has not hung up).

    When a terminal hangs up, the kernel detaches it from every process of
    its session before it sends them SIGHUP; ``/dev/tty`` then fails to open
    (ENXIO). The same happens when the session's leader (the shell) exits.
    """
    try:
        fd = os.open("/dev/tty", os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(fd)
    return True


def sighup_action(
    *, had_terminal: bool, terminal_now: bool, ignored_at_start: bool
) -> HangupAction:
    """What a SIGHUP means to a server that ``had_terminal`` when it started.

    Without a terminal at start (systemd, setsid, a container without a
    tty), SIGHUP is the traditional "reload". With one, a SIGHUP that comes
    while the terminal is still there was sent on purpose (``kill -HUP``):
    reload too. One that finds the terminal gone is its hangup: stop, as
    every program in a closed terminal does, unless the server was started
    with SIGHUP ignored (``nohup``), which asks to outlive the terminal.
    """
    if not had_terminal or terminal_now:
        return HangupAction.RELOAD
    return HangupAction.IGNORE if ignored_at_start else HangupAction.SHUTDOWN


# --- systemd ------------------------------------------------------------------------------


def notify_systemd(state: str) -> bool:
    """Send ``state`` (e.g. ``"READY=1"``) to systemd's notify socket; False when there is none.

    Run by systemd with ``Type=notify``, ``$NOTIFY_SOCKET`` names a datagram
    socket, a path or (``@`` first) an abstract one. Elsewhere nothing is sent.
    """
    address = os.environ.get("NOTIFY_SOCKET")
    if not address or address[0] not in "/@":
        return False
    if address[0] == "@":
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError as exc:
        raise ServiceError(f"cannot notify systemd at {address!r}: {_reason(exc)}") from None
    return True


# --- where the log goes ------------------------------------------------------------------

# syslog priorities (RFC 5424), which journald reads from a "<N>" line prefix.
_PRIORITIES = {
    logging.DEBUG: 7,
    logging.INFO: 6,
    logging.WARNING: 4,
    logging.ERROR: 3,
    logging.CRITICAL: 2,
}


def log_handler(log_file: Path | None, *, tag_pid: bool = False) -> logging.Handler:
    """The server's log handler: ``log_file``, the journal, or stderr (see the module doc).

    ``tag_pid``: each line names the process (``securechat.server[1234]: ...``), for
    the processes of ``--workers``, which share one stderr or log file.
    Raises :class:`ServiceError` when ``log_file`` cannot be opened.
    """
    source = "%(name)s[%(process)d]" if tag_pid else "%(name)s"
    handler: logging.Handler
    if log_file is not None:
        try:
            handler = PrivateLogFile(log_file)
        except OSError as exc:
            raise ServiceError(f"cannot open the log file {log_file}: {_reason(exc)}") from None
    else:
        handler = StderrHandler()
    if log_file is None and stderr_is_journal(os.environ.get("JOURNAL_STREAM")):
        handler.setFormatter(JournalFormatter(f"{source}: %(message)s"))
    else:
        formatter = logging.Formatter(
            f"%(asctime)s.%(msecs)03dZ %(levelname)s {source}: %(message)s", "%Y-%m-%dT%H:%M:%S"
        )
        formatter.converter = time.gmtime
        handler.setFormatter(formatter)
    return handler


def stderr_is_journal(journal_stream: str | None) -> bool:
    """Whether stderr is systemd's journal: ``$JOURNAL_STREAM`` names its device and inode.

    Checked against stderr itself, because the variable is inherited by
    processes whose stderr was redirected elsewhere.
    """
    if not journal_stream:
        return False
    device, _, inode = journal_stream.partition(":")
    if not (device.isdigit() and inode.isdigit()):
        return False
    try:
        stderr = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return (stderr.st_dev, stderr.st_ino) == (int(device), int(inode))


class JournalFormatter(logging.Formatter):
    """``<4>name: message``: the journal adds the time, and takes the priority from the prefix."""

    def format(self, record: logging.LogRecord) -> str:
        return f"<{_PRIORITIES.get(record.levelno, 6)}>{super().format(record)}"


class StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is now (the operator console replaces it)."""

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


class PrivateLogFile(logging.handlers.WatchedFileHandler):
    """Appends to a file created mode 0600, reopened when it was moved or removed."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, encoding="utf-8")

    def _open(self) -> io.TextIOWrapper:
        return open(
            self.baseFilename,
            "a",
            encoding=self.encoding,
            errors=self.errors,
            opener=_private,
        )


def _private(path: str, flags: int) -> int:
    return os.open(path, flags | os.O_CLOEXEC, LOG_FILE_MODE)
