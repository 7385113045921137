"""``securechat check-config``: what can be checked about a server's config without starting it.

Each check gives one :class:`Finding`, ok, warning or error, printed as one
line: the config file (valid, and its mode), the server certificate (readable,
its validity dates), its key (mode, and that it matches the certificate), the
``[server] host`` against the certificate's names, the CA for client
certificates, that the server's TLS settings load these files, the
database (there and writable, or creatable), whether a server already runs
with this config (its pidfile), and whether the port is free. For a cluster
node (``[cluster]``) there is no database or pidfile to check, and Redis is not
contacted; a port in use is a warning (it may be that node). An error is
what stops the server from starting or clients from connecting; a warning is
what works but should not stay that way.

The server itself uses :func:`expiry_warnings` at start and at every reload.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import sqlite3
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import Enum
from pathlib import Path
from urllib.parse import quote

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from . import tls
from .certs import CertError, check_key_file
from .config import (
    Config,
    ConfigError,
    MetricsSection,
    ServerSection,
    exposure_warning,
    load_config,
)
from .service import ServiceError, pidfile_path, running_pid

EXPIRY_WARNING = timedelta(days=30)  # a certificate this close to its end gets a warning
WILDCARD_HOSTS = frozenset({"", "0.0.0.0", "::"})  # noqa: S104 (recognised, not bound)


class Status(Enum):
    OK = "ok"
    WARNING = "warning"
    ERROR = "error"


@dataclass(frozen=True)
class Finding:
    status: Status
    topic: str  # what was checked: config, certificate, key, host, ca, tls, database, ...
    text: str

    def line(self) -> str:
        return f"{self.status.value:<7} {self.topic:<11} {self.text}"


def _ok(topic: str, text: str) -> Finding:
    return Finding(Status.OK, topic, text)


def _warning(topic: str, text: str) -> Finding:
    return Finding(Status.WARNING, topic, text)


def _error(topic: str, text: str) -> Finding:
    return Finding(Status.ERROR, topic, text)


def errors(findings: Sequence[Finding]) -> list[Finding]:
    return [finding for finding in findings if finding.status is Status.ERROR]


def check_config(path: Path, now: datetime) -> list[Finding]:
    """Every check, in order; a config that does not load stops the rest."""
    findings, config = check_reloadable(path, now)
    if config is None:
        return findings
    if config.metrics.listen is not None:
        findings.append(_metrics(config.metrics))
    if config.cluster is not None:
        # No database and no pidfile (securechat.cli): whether a node runs is not known here.
        findings.append(
            _ok(
                "cluster",
                f"a cluster node on Redis at {config.cluster.endpoint} (durability"
                f" {config.cluster.durability}; check-config does not contact Redis);"
                " no database, no pidfile",
            )
        )
        port = _port(config.server)
        if port.status is Status.ERROR:
            port = _warning("port", f"{port.text} (fine if it is a node of this cluster)")
        findings.append(port)
        return findings
    findings.append(_database(config.storage.path))
    pidfile = pidfile_path(config.storage.path)
    try:
        pid = running_pid(pidfile)
    except ServiceError as exc:
        findings.append(_warning("server", f"cannot tell whether a server is running: {exc}"))
        return findings
    if pid is not None:
        findings.append(_ok("server", f"a server is running with this config (pid {pid})"))
    else:
        stale = " (its stale pidfile is taken over at start)" if pidfile.exists() else ""
        findings.append(_ok("server", f"no server is running with this config{stale}"))
        findings.append(_port(config.server))
    return findings


def check_reloadable(path: Path, now: datetime) -> tuple[list[Finding], Config | None]:
    """What a reload reads: the file itself and the TLS files; the config if it loads."""
    try:
        config = load_config(path)
    except ConfigError as exc:
        return [_error("config", str(exc))], None
    findings = [_config_summary(path, config), _config_mode(path, config)]
    findings.extend(_tls_files(config.server, now))
    return findings, config


def expiry_warnings(settings: ServerSection, now: datetime) -> list[Finding]:
    """Warnings (or errors) for a server certificate or CA that expires within 30 days."""
    paths = [("certificate", settings.cert)]
    if settings.client_certs != "none":
        paths.append(("ca", settings.ca))
    found = []
    for topic, path in paths:
        try:
            first = _read_certificates(path)[0]
        except CertError:
            continue  # the TLS context could not load it either, and said so
        finding = _validity(topic, path, first, now)
        if finding.status is not Status.OK:
            found.append(finding)
    return found


# --- the config file -------------------------------------------------------------------


def _config_summary(path: Path, config: Config) -> Finding:
    users = config.users.values()
    with_password = sum(user.password_hash is not None for user in users)
    admins = sum(user.admin for user in users)
    return _ok(
        "config",
        f"{path}: valid; {_count(len(users), 'user')} ({with_password} with a password,"
        f" {_count(admins, 'admin')}), {_count(len(config.rooms), 'room')} defined",
    )


def _config_mode(path: Path, config: Config) -> Finding:
    warning = exposure_warning(path, config)
    if warning is not None:
        return _warning("config", warning)
    mode = stat.S_IMODE(path.stat().st_mode)
    holds = any(user.password_hash is not None for user in config.users.values())
    what = "holds password hashes" if holds else "holds no password hashes"
    return _ok("config", f"mode {mode:04o}, {what}")


# --- certificates and keys ----------------------------------------------------------------


def _tls_files(settings: ServerSection, now: datetime) -> list[Finding]:
    findings: list[Finding] = []
    try:
        chain = _read_certificates(settings.cert)
    except CertError as exc:
        findings.append(_error("certificate", str(exc)))
        chain = []
    if chain:
        leaf = chain[0]
        validity = _validity("certificate", settings.cert, leaf, now)
        extra = f" (+{_count(len(chain) - 1, 'more certificate')})" if len(chain) > 1 else ""
        names = _names(leaf)
        findings.append(
            Finding(
                validity.status,
                validity.topic,
                f"{validity.text}; for {', '.join(names) or 'no names'}{extra}",
            )
        )
        findings.append(_key(settings.key, settings.cert, leaf))
        findings.append(_host(settings.host, names, settings.cert))
    if settings.client_certs == "none":
        findings.append(_ok("ca", "not used ([server] client_certs = none)"))
    else:
        findings.append(_ca(settings.ca, now))
    if not errors(findings):
        try:
            tls.server_context(settings.cert, settings.key, settings.ca, settings.client_certs)
        except CertError as exc:
            findings.append(_error("tls", str(exc)))
        else:
            findings.append(_ok("tls", "the server's TLS settings load these files"))
    return findings


def _read_certificates(path: Path) -> list[x509.Certificate]:
    """The PEM certificates in ``path`` (a leaf, possibly followed by its chain)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CertError(f"{path}: file not found (make one with `securechat gen-certs`)") from None
    except OSError as exc:
        raise CertError(f"{path}: {exc.strerror or exc}") from None
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError:
        raise CertError(f"{path}: not a PEM certificate") from None


def _validity(topic: str, path: Path, cert: x509.Certificate, now: datetime) -> Finding:
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    until = f"valid until {end:%Y-%m-%d %H:%M} UTC"
    renew = _renew_hint(topic, path)
    if now < start:
        return _error(topic, f"{path}: not valid before {start:%Y-%m-%d %H:%M} UTC (a clock off?)")
    if end <= now:
        return _error(topic, f"{path}: EXPIRED {end:%Y-%m-%d %H:%M} UTC; {renew}")
    left = end - now
    in_days = f"(in {_count(round(left / timedelta(days=1)), 'day')})"
    if left <= EXPIRY_WARNING:
        return _warning(topic, f"{path}: expires {end:%Y-%m-%d %H:%M} UTC {in_days}; {renew}")
    return _ok(topic, f"{path}: {until} {in_days}")


def _renew_hint(topic: str, path: Path) -> str:
    if topic == "ca":
        return (
            f"make a new one with: securechat gen-certs --out {path.parent} --new-ca"
            " (every client certificate is reissued)"
        )
    return (
        f"renew it with: securechat gen-certs --out {path.parent} --renew server,"
        " then securechat reload (or your ACME client's renewal)"
    )


def _key(path: Path, cert_path: Path, cert: x509.Certificate) -> Finding:
    try:
        check_key_file(path)
    except CertError as exc:
        return _error("key", str(exc))
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except OSError as exc:
        return _error("key", f"{path}: {exc.strerror or exc}")
    except (ValueError, TypeError) as exc:
        return _error("key", f"{path}: not an unencrypted PEM private key ({exc})")
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    if key.public_key().public_bytes(der, spki) != cert.public_key().public_bytes(der, spki):
        return _error(
            "key",
            f"{path} does not belong to {cert_path}; install the key made with that"
            f" certificate, or make a new pair: securechat gen-certs --out {cert_path.parent}"
            " --renew server",
        )
    mode = stat.S_IMODE(path.stat().st_mode)
    return _ok("key", f"{path}: mode {mode:04o}, matches the certificate")


def _names(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [
        *(str(name) for name in san.get_values_for_type(x509.DNSName)),
        *(str(address) for address in san.get_values_for_type(x509.IPAddress)),
    ]


def _host(host: str, names: list[str], cert_path: Path) -> Finding:
    if host in WILDCARD_HOSTS:
        return _ok(
            "host",
            f"{host or '(any)'} listens on every address: clients must connect with a name"
            f" the certificate has: {', '.join(names) or 'it has none'}",
        )
    if _covers(names, host):
        return _ok("host", f"{host} is one of the certificate's names")
    return _warning(
        "host",
        f"{host} is not a name in {cert_path}: clients connecting to it will refuse the"
        f" certificate; add it with: securechat gen-certs --out {cert_path.parent}"
        f" --renew server --san {host}",
    )


def _covers(names: list[str], host: str) -> bool:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        wanted = host.lower().rstrip(".")
        for name in names:
            name = name.lower()
            if name == wanted:
                return True
            # A wildcard covers exactly one leftmost label (RFC 6125).
            if name.startswith("*.") and wanted.partition(".")[2] == name[2:] and "." in name[2:]:
                return True
        return False
    return any(_same_address(name, address) for name in names)


def _same_address(name: str, address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    try:
        return ipaddress.ip_address(name) == address
    except ValueError:
        return False


def _ca(path: Path, now: datetime) -> Finding:
    try:
        cas = _read_certificates(path)
    except CertError as exc:
        return _error("ca", str(exc))
    for cert in cas:
        try:
            is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        except x509.ExtensionNotFound:
            is_ca = False
        if not is_ca:
            return _error("ca", f"{path}: {cert.subject.rfc4514_string()} is not a CA certificate")
    first_to_expire = min(cas, key=lambda cert: cert.not_valid_after_utc)
    validity = _validity("ca", path, first_to_expire, now)
    more = f" ({len(cas)} CAs)" if len(cas) > 1 else ""
    return Finding(validity.status, "ca", f"{validity.text}{more}; it signs client certificates")


# --- the database, and the port -------------------------------------------------------------


def _database(path: Path) -> Finding:
    if not path.exists():
        ancestor = path.parent
        while not ancestor.exists() and ancestor != ancestor.parent:
            ancestor = ancestor.parent
        if not ancestor.is_dir():
            return _error("database", f"{path} cannot be created: {ancestor} is not a directory")
        if not os.access(ancestor, os.W_OK | os.X_OK):
            return _error("database", f"{path} cannot be created: {ancestor} is not writable")
        return _ok("database", f"{path} does not exist yet; the server creates it (mode 0600)")
    if not path.is_file():
        return _error("database", f"{path} is not a file")
    if not os.access(path, os.R_OK | os.W_OK):
        return _error("database", f"{path} is not readable and writable by this user")
    if not os.access(path.parent, os.W_OK | os.X_OK):
        # SQLite keeps its -wal and -shm files beside the database.
        return _error("database", f"{path.parent} is not writable (SQLite writes beside {path})")
    try:
        db = sqlite3.connect(f"file:{quote(str(path.resolve()))}?mode=ro", uri=True)
        try:
            db.execute("PRAGMA schema_version").fetchone()
        finally:
            db.close()
    except sqlite3.Error as exc:
        return _error("database", f"{path}: not a usable SQLite database ({exc})")
    mode = stat.S_IMODE(path.stat().st_mode)
    size = _size(path.stat().st_size)
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        return _warning(
            "database",
            f"{path} ({size}) holds every message and is accessible by group or others"
            f" (mode {mode:04o}); fix with: chmod 600 {path}",
        )
    return _ok("database", f"{path}: {size}, mode {mode:04o}, writable")


def _port(settings: ServerSection) -> Finding:
    host, port = settings.host, settings.port
    if port == 0:
        return _ok("port", "0: the server picks a free port at start (its log says which)")
    try:
        addresses = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        return _error("port", f"cannot resolve [server] host {host!r}: {exc.strerror}")
    bound = []
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
            except OSError as exc:
                return _error("port", _bind_failure(host, port, exc))
        bound.append(
            f"[{address[0]}]:{port}" if family == socket.AF_INET6 else f"{address[0]}:{port}"
        )
    return _ok("port", f"free: the server can listen on {', '.join(bound)}")


def _metrics(section: MetricsSection) -> Finding:
    """Where the metrics are served, and a warning when that is reachable from elsewhere
    (plain HTTP without a login: docs/security.md)."""
    assert section.address is not None
    host, port = section.address
    where = f"http://{section.listen}/metrics (plain HTTP)"
    try:
        found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        return _error("metrics", f"cannot resolve [metrics] listen host {host!r}: {exc.strerror}")
    addresses = {ipaddress.ip_address(str(address[0]).partition("%")[0]) for *_, address in found}
    if all(address.is_loopback for address in addresses):
        return _ok("metrics", f"{where}, on loopback")
    return _warning(
        "metrics",
        f"{where} is reachable from other hosts, without a login: anyone there reads the"
        " chat's activity counts (docs/security.md, Metrics endpoint); prefer 127.0.0.1,"
        " or firewall it to your monitoring",
    )


def _bind_failure(host: str, port: int, exc: OSError) -> str:
    if exc.errno == errno.EADDRINUSE:
        return f"{host}:{port} is in use by another program (another server?)"
    if exc.errno == errno.EACCES:
        return (
            f"port {port} needs privileges: use a port above 1023, or give the server"
            " CAP_NET_BIND_SERVICE (systemd: AmbientCapabilities=CAP_NET_BIND_SERVICE)"
        )
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"{host} is not an address of this machine"
    return f"cannot listen on {host}:{port}: {exc.strerror or exc}"


def _size(size: int) -> str:
    if size < 2**20:
        return f"{size / 2**10:.0f} KiB"
    return f"{size / 2**20:.1f} MiB" if size < 2**30 else f"{size / 2**30:.1f} GiB"


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"
