"""Unit tests for securechat.certs: the development PKI and key-file checks."""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
import stat
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from securechat import certs
from securechat.certs import CertError, check_cert_file, check_key_file, common_name, generate

# --- helpers -----------------------------------------------------------------

CLIENTS = ("alice", "bob")
EXTRA_SANS = ("chat.example.test", "192.0.2.7", "2001:db8::5")


def load_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return key


def cn(cert: x509.Certificate) -> str:
    value = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    assert isinstance(value, str)
    return value


def eku(cert: x509.Certificate) -> list[x509.ObjectIdentifier]:
    return list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


def snapshot(directory: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir()) if path.is_file()}


def names_of(cert: x509.Certificate) -> list[str]:
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [str(name) for name in san.get_values_for_type(x509.DNSName)]


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@dataclass
class Pki:
    out: Path

    def cert(self, stem: str) -> x509.Certificate:
        return load_cert(self.out / f"{stem}.crt")

    def key(self, stem: str) -> ec.EllipticCurvePrivateKey:
        return load_key(self.out / f"{stem}.key")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """One PKI for the read-only tests of this module (generation is the slow part)."""
    out = tmp_path_factory.mktemp("pki") / "certs"
    generate(out, sans=EXTRA_SANS, clients=CLIENTS)
    return Pki(out)


# --- what generate writes ---------------------------------------------------------------


def test_generate_writes_all_files_and_reports_them(tmp_path: Path) -> None:
    out = tmp_path / "nested" / "certs"
    report = generate(out, clients=["alice"])
    expected = {
        out / f"{stem}.{ext}" for stem in ("ca", "server", "alice") for ext in ("crt", "key")
    }
    assert set(report.written) == expected
    assert report.kept == []
    assert {path.name for path in out.iterdir()} == {path.name for path in expected}


def test_chain_verifies(pki: Pki) -> None:
    ca = pki.cert("ca")
    ca.verify_directly_issued_by(ca)  # self-signed
    for stem in ("server", *CLIENTS):
        leaf = pki.cert(stem)
        leaf.verify_directly_issued_by(ca)
        assert leaf.issuer == ca.subject


def test_leaf_signed_by_another_ca_does_not_verify(pki: Pki, tmp_path: Path) -> None:
    # Every generated CA has the same subject name: only the signature tells them apart.
    generate(tmp_path, clients=["alice"])
    other_ca = load_cert(tmp_path / "ca.crt")
    assert other_ca.subject == pki.cert("ca").subject
    with pytest.raises(InvalidSignature):
        pki.cert("alice").verify_directly_issued_by(other_ca)


def test_server_sans_include_loopback_names_and_extra_sans(pki: Pki) -> None:
    san = pki.cert("server").extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    dns = san.get_values_for_type(x509.DNSName)
    ips = san.get_values_for_type(x509.IPAddress)
    assert "localhost" in dns
    assert "chat.example.test" in dns
    assert ipaddress.ip_address("127.0.0.1") in ips
    assert ipaddress.ip_address("::1") in ips
    assert ipaddress.ip_address("192.0.2.7") in ips
    assert ipaddress.ip_address("2001:db8::5") in ips
    # IP addresses are IP SANs, never DNS names.
    assert not {"127.0.0.1", "::1", "192.0.2.7", "2001:db8::5"} & set(dns)


def test_server_sans_have_no_duplicates(tmp_path: Path) -> None:
    generate(tmp_path, sans=["localhost", "127.0.0.1", "x.test", "x.test"])
    san = load_cert(tmp_path / "server.crt").extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    )
    names = [general.value for general in san.value]
    assert len(names) == len(set(names))


def test_server_cert_has_server_auth_eku(pki: Pki) -> None:
    server = pki.cert("server")
    assert eku(server) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert cn(server) == "securechat server"


def test_client_cert_cn_is_the_username_with_client_auth_eku(pki: Pki) -> None:
    for user in CLIENTS:
        cert = pki.cert(user)
        assert cn(cert) == user
        assert eku(cert) == [ExtendedKeyUsageOID.CLIENT_AUTH]
        with pytest.raises(x509.ExtensionNotFound):
            cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)


def test_ca_basic_constraints_are_critical_and_ca_true(pki: Pki) -> None:
    extension = pki.cert("ca").extensions.get_extension_for_class(x509.BasicConstraints)
    assert extension.critical is True
    assert extension.value.ca is True
    key_usage = pki.cert("ca").extensions.get_extension_for_class(x509.KeyUsage).value
    assert key_usage.key_cert_sign


def test_leaves_are_not_cas(pki: Pki) -> None:
    for stem in ("server", *CLIENTS):
        extension = pki.cert(stem).extensions.get_extension_for_class(x509.BasicConstraints)
        assert extension.critical is True
        assert extension.value.ca is False
        assert (
            not pki.cert(stem).extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
        )


def test_ski_and_aki_match(pki: Pki) -> None:
    ca = pki.cert("ca")
    ca_ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert ca_ski == x509.SubjectKeyIdentifier.from_public_key(pki.key("ca").public_key())
    for stem in ("server", *CLIENTS):
        leaf = pki.cert(stem)
        aki = leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
        assert aki.key_identifier == ca_ski.digest
        ski = leaf.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        assert ski == x509.SubjectKeyIdentifier.from_public_key(pki.key(stem).public_key())


def test_keys_are_ec_p256_and_match_their_certs(pki: Pki) -> None:
    for stem in ("ca", "server", *CLIENTS):
        key = pki.key(stem)
        assert isinstance(key.curve, ec.SECP256R1)
        assert pki.cert(stem).public_key() == key.public_key()


def test_key_files_are_mode_600_and_certs_644(pki: Pki) -> None:
    for stem in ("ca", "server", *CLIENTS):
        assert mode(pki.out / f"{stem}.key") == 0o600
        assert mode(pki.out / f"{stem}.crt") == 0o644
        check_key_file(pki.out / f"{stem}.key")
        check_cert_file(pki.out / f"{stem}.crt")


def test_no_temporary_files_are_left_behind(pki: Pki) -> None:
    assert not [path for path in pki.out.iterdir() if path.name.startswith(".")]


def test_validity_periods(tmp_path: Path) -> None:
    now = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    generate(tmp_path, clients=["alice"], now=now)
    ca = load_cert(tmp_path / "ca.crt")
    assert ca.not_valid_before_utc == now - certs.CLOCK_SKEW
    assert ca.not_valid_after_utc == now + certs.CA_VALIDITY
    for stem in ("server", "alice"):
        leaf = load_cert(tmp_path / f"{stem}.crt")
        assert leaf.not_valid_before_utc == now - certs.CLOCK_SKEW
        lifespan = leaf.not_valid_after_utc - leaf.not_valid_before_utc
        assert lifespan == dt.timedelta(days=366)
        # sslyze's Mozilla-profile check: (not_after - not_before).days > 366 is flagged.
        assert lifespan.days <= 366
        assert leaf.not_valid_after_utc <= ca.not_valid_after_utc


def test_shorter_validity_on_request(tmp_path: Path) -> None:
    now = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    generate(tmp_path, clients=["alice"], days=90, now=now)
    for stem in ("server", "alice"):
        leaf = load_cert(tmp_path / f"{stem}.crt")
        assert leaf.not_valid_after_utc - leaf.not_valid_before_utc == dt.timedelta(days=90)
    assert load_cert(tmp_path / "ca.crt").not_valid_after_utc == now + certs.CA_VALIDITY


@pytest.mark.parametrize("days", [0, -1, 367, 397])
def test_validity_over_366_days_is_refused(tmp_path: Path, days: int) -> None:
    with pytest.raises(CertError, match="--days"):
        generate(tmp_path / "out", days=days)
    assert not (tmp_path / "out").exists()


def test_a_leaf_never_outlives_the_ca(tmp_path: Path) -> None:
    start = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    generate(tmp_path, now=start)
    late = start + certs.CA_VALIDITY - dt.timedelta(days=100)
    report = generate(tmp_path, clients=["alice"], now=late)
    alice = load_cert(tmp_path / "alice.crt")
    assert alice.not_valid_after_utc == load_cert(tmp_path / "ca.crt").not_valid_after_utc
    assert any("alice.crt expires with the CA" in w and "--new-ca" in w for w in report.warnings)


def test_report_lists_every_certificate_with_its_expiry(tmp_path: Path) -> None:
    now = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    generate(tmp_path, clients=["alice", "bob"], now=now)
    report = generate(tmp_path, clients=["carol"], now=now)  # alice and bob are not named
    listed = {(c.stem, c.action): c for c in report.certificates}
    assert set(listed) == {
        ("ca", "kept"),
        ("server", "kept"),
        ("alice", "kept"),
        ("bob", "kept"),
        ("carol", "made"),
    }
    assert listed["ca", "kept"].not_after == now + certs.CA_VALIDITY
    assert (
        listed["carol", "made"].not_after == load_cert(tmp_path / "carol.crt").not_valid_after_utc
    )
    assert "localhost" in listed["server", "kept"].names
    assert all(c.signed_by_ca for c in report.certificates)


# --- reruns ----------------------------------------------------------------------------


def test_rerun_keeps_files_byte_identical(tmp_path: Path) -> None:
    generate(tmp_path, clients=["alice"])
    before = snapshot(tmp_path)
    report = generate(tmp_path, clients=["alice"])
    assert snapshot(tmp_path) == before
    assert report.written == []
    assert set(report.kept) == {tmp_path / name for name in before}


def test_rerun_signs_new_clients_with_the_existing_ca(tmp_path: Path) -> None:
    generate(tmp_path, clients=["alice"])
    before = snapshot(tmp_path)
    report = generate(tmp_path, clients=["alice", "carol"])
    after = snapshot(tmp_path)
    assert {name: after[name] for name in before} == before
    assert set(report.written) == {tmp_path / "carol.crt", tmp_path / "carol.key"}
    carol = load_cert(tmp_path / "carol.crt")
    carol.verify_directly_issued_by(load_cert(tmp_path / "ca.crt"))
    assert cn(carol) == "carol"
    assert mode(tmp_path / "carol.key") == 0o600


def test_renewing_the_server_certificate_keeps_the_ca_and_its_names(tmp_path: Path) -> None:
    start = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    generate(tmp_path, sans=["old.example.test"], clients=["alice"], now=start)
    before = snapshot(tmp_path)
    later = start + dt.timedelta(days=350)
    report = generate(tmp_path, renew=["server"], sans=["new.example.test"], now=later)
    after = snapshot(tmp_path)
    for name in ("ca.crt", "ca.key", "alice.crt", "alice.key"):
        assert after[name] == before[name], name
    assert after["server.key"] != before["server.key"]
    server = load_cert(tmp_path / "server.crt")
    server.verify_directly_issued_by(load_cert(tmp_path / "ca.crt"))
    assert server.not_valid_after_utc == later - certs.CLOCK_SKEW + dt.timedelta(days=366)
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"localhost", "old.example.test", "new.example.test"} <= set(
        san.get_values_for_type(x509.DNSName)
    )
    assert set(report.written) == {tmp_path / "server.crt", tmp_path / "server.key"}
    assert [c.action for c in report.certificates if c.stem == "server"] == ["renewed"]
    assert mode(tmp_path / "server.key") == 0o600


def test_renewing_a_client_certificate_keeps_the_ca(tmp_path: Path) -> None:
    generate(tmp_path, clients=["alice", "bob"])
    before = snapshot(tmp_path)
    generate(tmp_path, renew=["alice"])
    after = snapshot(tmp_path)
    changed = {name for name in before if after[name] != before[name]}
    assert changed == {"alice.crt", "alice.key"}
    alice = load_cert(tmp_path / "alice.crt")
    alice.verify_directly_issued_by(load_cert(tmp_path / "ca.crt"))
    assert (cn(alice), eku(alice)) == ("alice", [ExtendedKeyUsageOID.CLIENT_AUTH])


def test_a_new_server_name_for_an_existing_certificate_asks_for_renew(tmp_path: Path) -> None:
    # The README used to say `--san chat.example.org --force`, which replaced the CA.
    generate(tmp_path, clients=["alice"])
    before = snapshot(tmp_path)
    with pytest.raises(CertError, match=r"does not cover chat\.example\.org.*--renew server"):
        generate(tmp_path, sans=["chat.example.org"])
    assert snapshot(tmp_path) == before
    generate(tmp_path, sans=["127.0.0.1", "localhost"])  # names it has: nothing to do


def test_new_ca_replaces_the_ca_and_reissues_every_certificate(tmp_path: Path) -> None:
    generate(tmp_path, sans=["chat.example.test"], clients=["alice", "bob"])
    (tmp_path / "notes.crt").write_text("not ours\n")
    before = snapshot(tmp_path)
    report = generate(tmp_path, new_ca=True)
    after = snapshot(tmp_path)
    assert after["notes.crt"] == before["notes.crt"]
    for name in set(before) - {"notes.crt"}:
        assert after[name] != before[name], name
    ca = load_cert(tmp_path / "ca.crt")
    for stem in ("server", "alice", "bob"):
        load_cert(tmp_path / f"{stem}.crt").verify_directly_issued_by(ca)
        assert mode(tmp_path / f"{stem}.key") == 0o600
    assert "chat.example.test" in names_of(load_cert(tmp_path / "server.crt"))
    assert {(c.stem, c.action) for c in report.certificates} == {
        ("ca", "replaced"),
        ("server", "renewed"),
        ("alice", "renewed"),
        ("bob", "renewed"),
    }
    assert len(report.warnings) == 1
    assert "every certificate the old CA signed stops working" in report.warnings[0]


def test_missing_ca_key_is_an_error_not_a_silent_new_ca(tmp_path: Path) -> None:
    generate(tmp_path)
    (tmp_path / "ca.key").unlink()
    with pytest.raises(CertError, match=r"ca\.key is missing.*--new-ca"):
        generate(tmp_path, clients=["alice"])
    assert not (tmp_path / "alice.crt").exists()


def test_a_directory_without_the_ca_key_can_still_be_listed(tmp_path: Path) -> None:
    # docs/security.md: keep the CA key off the server when you can.
    generate(tmp_path, clients=["alice"])
    (tmp_path / "ca.key").unlink()
    before = snapshot(tmp_path)
    report = generate(tmp_path)
    assert snapshot(tmp_path) == before
    first = report.certificates[0]
    assert (first.stem, first.key_path) == ("ca", None)


def test_a_ca_key_that_does_not_match_the_ca_certificate_is_refused(tmp_path: Path) -> None:
    generate(tmp_path)
    other = tmp_path / "other"
    generate(other)
    (tmp_path / "ca.key").write_bytes((other / "ca.key").read_bytes())
    with pytest.raises(CertError, match="does not belong to"):
        generate(tmp_path, clients=["alice"])
    assert not (tmp_path / "alice.crt").exists()


def test_a_kept_certificate_from_another_ca_is_flagged(tmp_path: Path) -> None:
    generate(tmp_path, clients=["alice"])
    other = tmp_path / "other"
    generate(other, clients=["alice"])
    for name in ("alice.crt", "alice.key"):
        (tmp_path / name).write_bytes((other / name).read_bytes())
    report = generate(tmp_path)
    assert [c.signed_by_ca for c in report.certificates if c.stem == "alice"] == [False]


@pytest.mark.parametrize("missing", ["server.crt", "server.key", "alice.key"])
def test_half_a_leaf_pair_is_refused(tmp_path: Path, missing: str) -> None:
    generate(tmp_path, clients=["alice"])
    (tmp_path / missing).unlink()
    before = {path.name: path.read_bytes() for path in tmp_path.iterdir()}
    stem = missing.split(".")[0]
    with pytest.raises(CertError, match=rf"{re.escape(missing)} does not.*--renew {stem}"):
        generate(tmp_path, clients=["alice"])
    assert {path.name: path.read_bytes() for path in tmp_path.iterdir()} == before
    generate(tmp_path, clients=["alice"], renew=[stem])
    assert (tmp_path / missing).exists()
    assert (tmp_path / "ca.key").read_bytes() == before["ca.key"]


# --- invalid input -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "san", ["", "bad name", "-leading.dash", "under_score.test", "a..b", "x" * 64 + ".test", "ü.de"]
)
def test_invalid_san_raises_cert_error(tmp_path: Path, san: str) -> None:
    with pytest.raises(CertError, match="--san"):
        generate(tmp_path / "out", sans=[san])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["Alice", "", ".alice", "a" * 33, "al ice", "alice\n", "../x"])
def test_invalid_client_name_raises_cert_error(tmp_path: Path, name: str) -> None:
    with pytest.raises(CertError, match="client name"):
        generate(tmp_path / "out", clients=[name])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["ca", "server"])
def test_client_names_that_would_overwrite_the_ca_or_server_files_are_refused(
    tmp_path: Path, name: str
) -> None:
    with pytest.raises(CertError, match="reserved"):
        generate(tmp_path / "out", clients=[name])
    with pytest.raises(CertError, match="reserved"):
        generate(tmp_path / "out", renew=[name] if name == "ca" else ["ca"])
    assert not (tmp_path / "out").exists()


# --- key and cert file checks ----------------------------------------------------------------


def test_check_key_file_accepts_mode_600(tmp_path: Path) -> None:
    path = tmp_path / "k.key"
    path.write_bytes(b"key")
    path.chmod(0o600)
    check_key_file(path)
    path.chmod(0o400)
    check_key_file(path)


@pytest.mark.parametrize("bad_mode", [0o644, 0o640, 0o604, 0o660, 0o606, 0o610])
def test_check_key_file_rejects_group_or_other_access(tmp_path: Path, bad_mode: int) -> None:
    path = tmp_path / "k.key"
    path.write_bytes(b"key")
    path.chmod(bad_mode)
    with pytest.raises(CertError) as info:
        check_key_file(path)
    message = str(info.value)
    assert f"chmod 600 {path}" in message
    assert f"{bad_mode:04o}" in message


def test_check_key_file_rejects_a_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "missing.key"
    with pytest.raises(CertError, match="not found") as info:
        check_key_file(path)
    assert str(path) in str(info.value)


def test_check_cert_file_rejects_a_missing_file_or_a_directory(tmp_path: Path) -> None:
    with pytest.raises(CertError, match="not found"):
        check_cert_file(tmp_path / "missing.crt")
    with pytest.raises(CertError, match="not found"):
        check_cert_file(tmp_path)


# --- common_name -----------------------------------------------------------------------


def test_common_name_from_getpeercert_subject() -> None:
    subject = (
        (("organizationName", "securechat development"),),
        (("commonName", "alice"),),
    )
    assert common_name(subject) == "alice"


def test_common_name_in_a_multi_valued_rdn() -> None:
    subject = ((("organizationName", "o"), ("commonName", "bob")),)
    assert common_name(subject) == "bob"


@pytest.mark.parametrize(
    "subject",
    [
        None,
        (),
        ((("organizationName", "o"),),),
        [[("commonName", "alice")]],  # not the tuple getpeercert returns
        "commonName=alice",
    ],
)
def test_common_name_is_none_without_a_cn(subject: object) -> None:
    assert common_name(subject) is None
