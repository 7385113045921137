"""Development PKI: a private CA, a server certificate and client certificates.

Keys are ECDSA P-256 (a TLS handshake costs about a third of RSA-2048's
CPU). The CA is made once and kept: renewing a certificate or issuing one
for a new user signs with the same CA, so existing client certificates
keep working; only an explicit ``new_ca`` replaces it. Server and client
certificates live at most 366 days (Mozilla's intermediate TLS profile).
Private keys are written with mode 0600, the directory is kept out of other
users' reach. Also owns the checks the server and client make on key files
before loading them.
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
from typing import Literal

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .protocol import NAME_PATTERN

CA_VALIDITY = dt.timedelta(days=3650)
# Mozilla's "intermediate" TLS profile flags a server certificate whose
# lifespan (not_valid_after - not_valid_before, in whole days) exceeds 366.
MAX_LEAF_DAYS = 366
CLOCK_SKEW = dt.timedelta(minutes=5)
RENEW_WITHIN = dt.timedelta(days=30)  # a kept certificate this close to expiry gets a hint
ORGANIZATION = "securechat development"
SERVER = "server"
CA = "ca"

_DNS_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")

DIRECTORY_MODE = 0o700
_OTHERS_WRITE = stat.S_IWGRP | stat.S_IWOTH


class CertError(Exception):
    """A certificate or key file problem; the message is one line saying what to do."""


Action = Literal["made", "renewed", "replaced", "kept"]


@dataclass(frozen=True)
class Issued:
    """One certificate in the output directory after a run, and what the run did to it."""

    stem: str  # "ca", "server" or a username: the file names are stem.crt and stem.key
    cert_path: Path
    key_path: Path | None  # None: the key is not in the directory
    action: Action
    not_after: dt.datetime
    names: tuple[str, ...] = ()  # the server certificate's DNS names and IP addresses
    signed_by_ca: bool = True


@dataclass
class GenerationReport:
    certificates: list[Issued] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def written(self) -> list[Path]:
        return [
            path for cert in self.certificates if cert.action != "kept" for path in _paths(cert)
        ]

    @property
    def kept(self) -> list[Path]:
        return [
            path for cert in self.certificates if cert.action == "kept" for path in _paths(cert)
        ]


def _paths(cert: Issued) -> list[Path]:
    return [cert.cert_path] if cert.key_path is None else [cert.cert_path, cert.key_path]


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
    renew: Sequence[str] = (),
    new_ca: bool = False,
    days: int = MAX_LEAF_DAYS,
    now: dt.datetime | None = None,
) -> GenerationReport:
    """Make or update the PKI in ``out``; the report lists every certificate there.

    The CA is made on the first run and kept afterwards: it signs the
    server certificate and one client certificate per name in ``clients``,
    each made only if missing. ``renew`` names certificates (``"server"`` or
    a username) to reissue now, with a new key, signed by the same CA; a
    renewed server certificate keeps the names it had, plus ``sans``.
    ``new_ca`` replaces the CA and so reissues every certificate in ``out``:
    the only way the CA is ever replaced. Certificates issued now are valid
    ``days`` days (at most :data:`MAX_LEAF_DAYS`, and never past the CA).
    """
    now = now or dt.datetime.now(dt.UTC)
    for name in sans:
        _check_san(name)
    for user in clients:
        _check_client_name(user, "client name")
    for stem in renew:
        if stem != SERVER:
            _check_client_name(stem, "--renew")
    if not 1 <= days <= MAX_LEAF_DAYS:
        raise CertError(f"--days {days}: must be between 1 and {MAX_LEAF_DAYS}")
    report = GenerationReport()
    _prepare_directory(out, report)

    # Decide everything (and find every problem) before the first file is written.
    asked = _dedupe([SERVER, *clients, *renew])
    present = [stem for stem in _client_stems(out) if stem not in asked]
    plan: list[tuple[str, x509.Certificate | None, bool]] = []  # stem, its cert, reissue?
    for stem in [*asked, *present]:
        cert_path, key_path = out / f"{stem}.crt", out / f"{stem}.key"
        old = _read_cert(cert_path)
        reissue = new_ca or stem in renew
        if not reissue and stem in asked:
            if cert_path.exists() != key_path.exists():
                there, missing = (
                    (cert_path, key_path) if cert_path.exists() else (key_path, cert_path)
                )
                raise CertError(
                    f"{there} exists but {missing} does not; pass --renew {stem} to replace both"
                )
            if cert_path.exists() and old is None:
                raise CertError(
                    f"{cert_path}: not a PEM certificate; pass --renew {stem} to replace it"
                )
            if stem == SERVER and old is not None:
                _check_server_names(cert_path, old, sans)
            reissue = old is None
        plan.append((stem, old, reissue))

    ca = _CertificateAuthority(out, now, report, new=new_ca)
    for stem, old, reissue in plan:
        cert_path, key_path = out / f"{stem}.crt", out / f"{stem}.key"
        if not reissue:
            assert old is not None
            report.certificates.append(_kept(stem, cert_path, key_path, old, ca))
            continue
        names: list[str] = []
        if stem == SERVER:
            names = _dedupe([*default_server_names(), *_server_names(old), *sans])
        key = ec.generate_private_key(ec.SECP256R1())
        cert = ca.sign(stem, key, names, days)
        _write_pair(cert_path, cert, key_path, key)
        action: Action = "made" if old is None else "renewed"
        report.certificates.append(
            Issued(stem, cert_path, key_path, action, cert.not_valid_after_utc, tuple(names))
        )
    return report


class _CertificateAuthority:
    """The CA in ``out``: made when missing (or asked for), else loaded when first needed.

    Loading is lazy so that a directory whose ``ca.key`` is kept elsewhere
    (as docs/security.md advises) can still be listed.
    """

    def __init__(self, out: Path, now: dt.datetime, report: GenerationReport, *, new: bool):
        self.cert_path, self.key_path = out / f"{CA}.crt", out / f"{CA}.key"
        self.now = now
        self._report = report
        self._key: ec.EllipticCurvePrivateKey | None = None
        exists = self.cert_path.exists() or self.key_path.exists()
        if exists and not new:
            if not self.cert_path.exists():
                raise CertError(
                    f"{self.cert_path} is missing; pass --new-ca to make a new CA"
                    " (every certificate the old one signed stops working)"
                )
            self.cert = _load_cert(self.cert_path)
            key_path = self.key_path if self.key_path.exists() else None
            report.certificates.append(
                Issued(CA, self.cert_path, key_path, "kept", self.cert.not_valid_after_utc)
            )
            return
        self._key = ec.generate_private_key(ec.SECP256R1())
        self.cert = _make_ca(self._key, now)
        _write_pair(self.cert_path, self.cert, self.key_path, self._key)
        report.certificates.append(
            Issued(
                CA,
                self.cert_path,
                self.key_path,
                "replaced" if exists else "made",
                self.cert.not_valid_after_utc,
            )
        )
        if exists:
            report.warnings.append(
                f"replaced the CA in {out}: every certificate the old CA signed stops working;"
                f" give clients the new {self.cert_path} and each user their new certificate"
                " and key"
            )

    def sign(
        self, stem: str, key: ec.EllipticCurvePrivateKey, names: Sequence[str], days: int
    ) -> x509.Certificate:
        if self._key is None:
            self._key = _load_ca_key(self.key_path, stem)
            if self._key.public_key() != self.cert.public_key():
                raise CertError(
                    f"{self.key_path} does not belong to {self.cert_path}; pass --new-ca to make"
                    " a new CA (every certificate the old one signed stops working)"
                )
        not_before = self.now - CLOCK_SKEW
        not_after = not_before + dt.timedelta(days=days)
        if not_after > self.cert.not_valid_after_utc:
            not_after = self.cert.not_valid_after_utc
            self._report.warnings.append(
                f"{stem}.crt expires with the CA on {_date(not_after)}; make a new CA with"
                " --new-ca before then"
            )
        if stem == SERVER:
            return _make_leaf(
                key,
                "securechat server",
                [_san_extension(names)],
                ExtendedKeyUsageOID.SERVER_AUTH,
                self.cert,
                self._key,
                not_before,
                not_after,
            )
        return _make_leaf(
            key,
            stem,
            [],
            ExtendedKeyUsageOID.CLIENT_AUTH,
            self.cert,
            self._key,
            not_before,
            not_after,
        )


def _kept(
    stem: str, cert_path: Path, key_path: Path, cert: x509.Certificate, ca: _CertificateAuthority
) -> Issued:
    try:
        cert.verify_directly_issued_by(ca.cert)
        signed = True
    except (ValueError, TypeError, InvalidSignature):
        signed = False
    return Issued(
        stem,
        cert_path,
        key_path if key_path.exists() else None,
        "kept",
        cert.not_valid_after_utc,
        tuple(_server_names(cert)) if stem == SERVER else (),
        signed_by_ca=signed,
    )


def _check_server_names(path: Path, cert: x509.Certificate, sans: Sequence[str]) -> None:
    have = set(_server_names(cert))
    missing = [name for name in sans if _normal_name(name) not in have]
    if missing:
        raise CertError(
            f"{path} does not cover {', '.join(missing)}; add --renew server to reissue it"
            " (with the same CA)"
        )


def server_names(path: Path) -> list[str]:
    """The DNS names and IP addresses the server certificate at ``path`` covers (its
    subjectAltName); none when it cannot be read."""
    return _server_names(_read_cert(path))


def _server_names(cert: x509.Certificate | None) -> list[str]:
    """The DNS names and IP addresses of a server certificate (none for None)."""
    if cert is None:
        return []
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [
        *(str(name) for name in san.get_values_for_type(x509.DNSName)),
        *(str(address) for address in san.get_values_for_type(x509.IPAddress)),
    ]


def _normal_name(name: str) -> str:
    try:
        return str(ipaddress.ip_address(name))
    except ValueError:
        return name


def _client_stems(out: Path) -> list[str]:
    """Users with a client certificate in ``out``, in name order.

    Only files that are one: ``NAME.crt`` with common name NAME and the
    client-auth usage (any other ``.crt`` there is none of our business).
    """
    stems = []
    for path in sorted(out.glob("*.crt")):
        if path.stem in (CA, SERVER) or not re.fullmatch(NAME_PATTERN, path.stem):
            continue
        cert = _read_cert(path)
        if cert is not None and _is_client_cert(cert, path.stem):
            stems.append(path.stem)
    return stems


def _is_client_cert(cert: x509.Certificate, user: str) -> bool:
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    try:
        usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return False
    return [name.value for name in names] == [user] and ExtendedKeyUsageOID.CLIENT_AUTH in usage


def _check_client_name(user: str, what: str) -> None:
    if not re.fullmatch(NAME_PATTERN, user):
        raise CertError(f"{what} {user!r} is not a valid username ({NAME_PATTERN})")
    if user in (CA, SERVER):
        # Their files would be ca.crt/ca.key or server.crt/server.key.
        raise CertError(f"{what} {user!r} is reserved (its files would replace {user}.crt)")


def _read_cert(path: Path) -> x509.Certificate | None:
    """The certificate in ``path``; None if there is none or it is not PEM."""
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except (FileNotFoundError, IsADirectoryError, ValueError):
        return None


def _load_cert(path: Path) -> x509.Certificate:
    cert = _read_cert(path)
    if cert is None:
        raise CertError(
            f"{path}: not a PEM certificate; pass --new-ca to make a new CA"
            " (every certificate the old one signed stops working)"
        )
    return cert


def _load_ca_key(path: Path, stem: str) -> ec.EllipticCurvePrivateKey:
    if not path.exists():
        raise CertError(
            f"{path} is missing and {stem}.crt needs it; put the CA key back, or pass --new-ca"
            " to make a new CA (every certificate the old one signed stops working)"
        )
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise CertError(f"{path}: cannot load the CA key ({exc})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertError(f"{path}: not an ECDSA key; pass --new-ca to make a new CA")
    return key


def _date(moment: dt.datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M UTC")


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
        warning = f"{out} was writable by group or others (mode {old:04o}); it is now {new:04o}"
        if any(out.glob("*.crt")) or any(out.glob("*.key")):
            warning += (
                ". Its certificates and keys could have been replaced: if you cannot rule that"
                " out, make a new CA with --new-ca"
            )
        report.warnings.append(warning)


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
    not_before: dt.datetime,
    not_after: dt.datetime,
) -> x509.Certificate:
    public = key.public_key()
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
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
    cert_path: Path, cert: x509.Certificate, key_path: Path, key: ec.EllipticCurvePrivateKey
) -> None:
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _write_atomically(key_path, key_pem, 0o600)
    _write_atomically(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)


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
