"""Development PKI: a private CA, a server certificate and client certificates.

Keys are ECDSA P-256 (a TLS handshake costs about a third of RSA-2048's
CPU). Private keys are written with mode 0600 and never replaced unless
``force`` is given. Also owns the checks the server and client make on key
files before loading them.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
import socket
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .protocol import NAME_PATTERN

CA_VALIDITY = dt.timedelta(days=3650)
LEAF_VALIDITY = dt.timedelta(days=397)  # the CA/Browser Forum ceiling for TLS server certificates
CLOCK_SKEW = dt.timedelta(minutes=5)
ORGANIZATION = "securechat development"

_DNS_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")


class CertError(Exception):
    """A certificate or key file problem; the message is one line saying what to do."""


DIRECTORY_MODE = 0o700
_OTHERS_WRITE = stat.S_IWGRP | stat.S_IWOTH


@dataclass
class GenerationReport:
    written: list[Path] = field(default_factory=list)
    kept: list[Path] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def default_server_names() -> list[str]:
    names = ["localhost", "127.0.0.1", "::1"]
    hostname = socket.gethostname()
    if hostname and _is_dns_name(hostname) and hostname not in names:
        names.append(hostname)
    return names


def generate(
    out: Path,
    *,
    sans: Sequence[str] = (),
    clients: Sequence[str] = (),
    force: bool = False,
    now: dt.datetime | None = None,
) -> GenerationReport:
    """Write ``ca``, ``server`` and one pair per client into ``out``.

    Existing files are kept (and reused: new client certificates are signed
    by the existing CA) unless ``force`` is given, which regenerates
    everything asked for.
    """
    now = now or dt.datetime.now(dt.UTC)
    names = _dedupe([*default_server_names(), *sans])
    for name in names:
        _check_san(name)
    for user in clients:
        if not re.fullmatch(NAME_PATTERN, user):
            raise CertError(f"client name {user!r} is not a valid username ({NAME_PATTERN})")
    report = GenerationReport()
    _prepare_directory(out, report)

    ca_cert_path, ca_key_path = out / "ca.crt", out / "ca.key"
    if not force and (ca_cert_path.exists() or ca_key_path.exists()):
        ca_cert, ca_key = load_ca(ca_cert_path, ca_key_path)
        report.kept += [ca_cert_path, ca_key_path]
    else:
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_cert = _make_ca(ca_key, now)
        _write_pair(ca_cert_path, ca_cert, ca_key_path, ca_key, report)

    leaves: list[tuple[str, list[x509.ExtensionType], x509.ObjectIdentifier]] = [
        ("server", [_san_extension(names)], ExtendedKeyUsageOID.SERVER_AUTH),
        *((user, [], ExtendedKeyUsageOID.CLIENT_AUTH) for user in _dedupe(clients)),
    ]

    for stem, extra, usage in leaves:
        cert_path, key_path = out / f"{stem}.crt", out / f"{stem}.key"
        if not force and cert_path.exists() and key_path.exists():
            report.kept += [cert_path, key_path]
            continue
        if not force and (cert_path.exists() or key_path.exists()):
            present, missing = (
                (cert_path, key_path) if cert_path.exists() else (key_path, cert_path)
            )
            raise CertError(
                f"{present} exists but {missing} does not; pass --force to replace both"
            )
        key = ec.generate_private_key(ec.SECP256R1())
        common_name = "securechat server" if stem == "server" else stem
        cert = _make_leaf(key, common_name, extra, usage, ca_cert, ca_key, now)
        _write_pair(cert_path, cert, key_path, key, report)
    return report


def _prepare_directory(out: Path, report: GenerationReport) -> None:
    """Make ``out`` (and missing parents) mode 0700; take write access away from others.

    Whoever can write to the directory can replace ``ca.crt`` (which clients
    trust) or ``ca.key`` (which signs here). An existing directory keeps its
    read permissions (it may be shared with a group on purpose), but not
    write access for group or others.
    """
    missing = []
    directory = out
    while not directory.exists() and directory != directory.parent:
        missing.append(directory)
        directory = directory.parent
    for directory in reversed(missing):
        directory.mkdir(mode=DIRECTORY_MODE)
        os.chmod(directory, DIRECTORY_MODE)  # mkdir applies the umask, which may be odd
    if missing:
        return
    mode = out.stat().st_mode
    if not stat.S_ISDIR(mode):
        raise CertError(f"--out {out}: not a directory")
    if mode & _OTHERS_WRITE:
        old, new = stat.S_IMODE(mode), stat.S_IMODE(mode) & ~_OTHERS_WRITE
        try:
            os.chmod(out, new)
        except PermissionError:
            raise CertError(
                f"{out} is writable by group or others (mode {old:04o}) and not yours to change;"
                f" fix with: chmod go-w {out}"
            ) from None
        report.warnings.append(
            f"{out} was writable by group or others (mode {old:04o}), so the files in it could"
            f" have been replaced; it is now {new:04o}. If you did not expect that, check them"
        )


def load_ca(cert_path: Path, key_path: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    if not (cert_path.exists() and key_path.exists()):
        missing = key_path if cert_path.exists() else cert_path
        raise CertError(f"{missing} is missing; pass --force to make a new CA")
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise CertError(f"{cert_path.parent}: cannot load the CA ({exc})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertError(f"{key_path}: not an ECDSA key; pass --force to make a new CA")
    return cert, key


def check_key_file(path: Path) -> None:
    """Refuse a private key that is missing or readable by group or others."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise CertError(f"{path}: file not found (make one with `securechat gen-certs`)") from None
    except PermissionError:
        raise CertError(f"{path}: permission denied") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise CertError(
            f"{path} is accessible by group or others (mode {stat.S_IMODE(mode):04o});"
            f" fix with: chmod 600 {path}"
        )


def check_cert_file(path: Path) -> None:
    if not path.is_file():
        raise CertError(f"{path}: file not found (make one with `securechat gen-certs`)")


def common_name(subject: object) -> str | None:
    """The commonName from ``ssl.SSLSocket.getpeercert()``'s ``subject`` field."""
    if not isinstance(subject, tuple):
        return None
    for rdn in subject:
        for attribute in rdn:
            if attribute[0] == "commonName":
                return str(attribute[1])
    return None


def _make_ca(key: ec.EllipticCurvePrivateKey, now: dt.datetime) -> x509.Certificate:
    name = _name("securechat development CA")
    public = key.public_key()
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + CA_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(signs_certificates=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )


def _make_leaf(
    key: ec.EllipticCurvePrivateKey,
    common_name: str,
    extensions: Iterable[x509.ExtensionType],
    usage: x509.ObjectIdentifier,
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    now: dt.datetime,
) -> x509.Certificate:
    public = key.public_key()
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(min(now + LEAF_VALIDITY, ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(signs_certificates=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
            critical=False,
        )
    )
    for extension in extensions:
        builder = builder.add_extension(extension, critical=False)
    return builder.sign(ca_key, hashes.SHA256())


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _key_usage(*, signs_certificates: bool) -> x509.KeyUsage:
    # ECDSA keys sign (the TLS handshake, or certificates for the CA); they
    # never encrypt, so every other usage stays off.
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=signs_certificates,
        crl_sign=signs_certificates,
        encipher_only=False,
        decipher_only=False,
    )


def _san_extension(names: Sequence[str]) -> x509.SubjectAlternativeName:
    general: list[x509.GeneralName] = []
    for name in names:
        try:
            general.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            general.append(x509.DNSName(name))
    return x509.SubjectAlternativeName(general)


def _check_san(name: str) -> None:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        if not _is_dns_name(name):
            raise CertError(f"--san {name!r} is neither an IP address nor a DNS name") from None


def _is_dns_name(name: str) -> bool:
    labels = name.rstrip(".").split(".")
    if labels and labels[0] == "*":
        labels = labels[1:]
    return 0 < len(name) <= 253 and bool(labels) and all(_DNS_LABEL.fullmatch(x) for x in labels)


def _dedupe(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))


def _write_pair(
    cert_path: Path,
    cert: x509.Certificate,
    key_path: Path,
    key: ec.EllipticCurvePrivateKey,
    report: GenerationReport,
) -> None:
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _write_atomically(key_path, key_pem, 0o600)
    _write_atomically(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    report.written += [cert_path, key_path]


def _write_atomically(path: Path, data: bytes, mode: int) -> None:
    # The temporary file is created with its final mode, so a key is never
    # readable by others, not even for a moment; rename replaces atomically.
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(tmp, mode)  # umask may have narrowed it; never widens a key
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
