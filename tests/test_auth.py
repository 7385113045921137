"""Unit tests for securechat.passwords (Argon2id hashing) and securechat.auth (login decisions)."""

from __future__ import annotations

import re
import threading

import pytest
import trio
import trio.testing
from pydantic import SecretStr

from securechat import passwords
from securechat.auth import Authenticator, AuthFailed
from securechat.config import Account, ClientCertMode
from securechat.limits import LoginThrottle
from securechat.passwords import check_new_password, check_phc, hash_password, verify_password
from securechat.protocol import MAX_PASSWORD_CHARS

from .conftest import WAIT, holding

# --- helpers -----------------------------------------------------------------

# Argon2 costs ~30 ms per call: hash once for the whole module.
ALICE_PASSWORD = "alice-correct-horse"
CAROL_PASSWORD = "carol-battery-staple"
ALICE_HASH = hash_password(ALICE_PASSWORD)
CAROL_HASH = hash_password(CAROL_PASSWORD)

ACCOUNTS = {
    "alice": Account(password_hash=ALICE_HASH, admin=True),
    "bob": Account(password_hash=None),  # certificate-only user
    "carol": Account(password_hash=CAROL_HASH),
}

PHC_RE = re.compile(
    r"\$argon2id\$v=19\$m=19456,t=2,p=1\$(?P<salt>[A-Za-z0-9+/]+)\$(?P<hash>[A-Za-z0-9+/]+)"
)


def secret(password: str) -> SecretStr:
    return SecretStr(password)


def authenticator(mode: ClientCertMode = "optional") -> Authenticator:
    return Authenticator(ACCOUNTS, mode)


def with_params(phc: str, params: str) -> str:
    return re.sub(r"m=\d+,t=\d+,p=\d+", params, phc)


# --- hashing -------------------------------------------------------------------------


def test_hash_password_is_a_phc_string_with_owasp_parameters() -> None:
    match = PHC_RE.fullmatch(ALICE_HASH)
    assert match is not None, ALICE_HASH
    assert len(match["salt"]) == 22  # 16 bytes, unpadded base64
    assert len(match["hash"]) == 43  # 32 bytes, unpadded base64


def test_hash_password_uses_a_fresh_salt() -> None:
    assert hash_password(ALICE_PASSWORD) != ALICE_HASH


def test_verify_password_accepts_the_right_password() -> None:
    assert verify_password(ALICE_PASSWORD, ALICE_HASH) is True


@pytest.mark.parametrize(
    "wrong", ["", "alice-correct-hors", "alice-correct-horse ", "ALICE-CORRECT-HORSE"]
)
def test_verify_password_rejects_a_wrong_password(wrong: str) -> None:
    assert verify_password(wrong, ALICE_HASH) is False


def test_verify_password_rejects_another_users_hash() -> None:
    assert verify_password(ALICE_PASSWORD, CAROL_HASH) is False


def test_unicode_passwords_hash_and_verify() -> None:
    phc = hash_password("pässwörd ☃ \U0001f511")
    assert verify_password("pässwörd ☃ \U0001f511", phc) is True
    assert verify_password("passwort ☃ \U0001f511", phc) is False


# --- check_phc -------------------------------------------------------------------------


def test_check_phc_accepts_a_hash_from_hash_password() -> None:
    assert check_phc(ALICE_HASH) == ALICE_HASH


def test_check_phc_accepts_other_sane_parameters() -> None:
    for params in ("m=65536,t=3,p=4", "m=8,t=1,p=1", "m=1048576,t=16,p=8"):
        phc = with_params(ALICE_HASH, params)
        assert check_phc(phc) == phc


@pytest.mark.parametrize(
    "phc",
    [
        pytest.param("", id="empty"),
        pytest.param("hunter2", id="plain-password"),
        pytest.param(ALICE_HASH.replace("argon2id", "argon2i"), id="argon2i"),
        pytest.param(ALICE_HASH.replace("v=19", "v=16"), id="old-version"),
        pytest.param(ALICE_HASH.rsplit("$", 1)[0], id="no-hash"),
        pytest.param(ALICE_HASH + "$extra", id="trailing-field"),
        pytest.param(" " + ALICE_HASH, id="leading-space"),
        pytest.param(ALICE_HASH + "\n", id="trailing-newline"),
        pytest.param("$2b$12$abcdefghijklmnopqrstuuABCDEFGHIJKLMNOPQRSTUVWXYZ01234", id="bcrypt"),
    ],
)
def test_check_phc_rejects_garbage(phc: str) -> None:
    with pytest.raises(ValueError, match="not an Argon2id PHC string"):
        check_phc(phc)


@pytest.mark.parametrize(
    "params",
    [
        "m=4294967295,t=2,p=1",  # 4 TiB of memory
        "m=1048577,t=2,p=1",
        "m=19456,t=1000000,p=1",
        "m=19456,t=17,p=1",
        "m=19456,t=0,p=1",
        "m=19456,t=2,p=0",
        "m=19456,t=2,p=9",
        "m=7,t=2,p=1",
        "m=31,t=2,p=4",  # less than 8 KiB per lane
    ],
)
def test_check_phc_rejects_absurd_parameters(params: str) -> None:
    with pytest.raises(ValueError, match="out of range"):
        check_phc(with_params(ALICE_HASH, params))


# --- check_new_password --------------------------------------------------------------------


def test_check_new_password_accepts_lengths_within_limits() -> None:
    for password in ("x" * passwords.MIN_PASSWORD_CHARS, "y" * MAX_PASSWORD_CHARS, "ünïcödé!"):
        assert check_new_password(password) == password


@pytest.mark.parametrize("password", ["", "short", "x" * (passwords.MIN_PASSWORD_CHARS - 1)])
def test_check_new_password_rejects_too_short(password: str) -> None:
    with pytest.raises(ValueError, match="too short"):
        check_new_password(password)


def test_check_new_password_rejects_too_long() -> None:
    with pytest.raises(ValueError, match="too long"):
        check_new_password("x" * (MAX_PASSWORD_CHARS + 1))


# --- Authenticator ---------------------------------------------------------------------------


async def test_password_login_succeeds() -> None:
    account = await authenticator().authenticate("alice", secret(ALICE_PASSWORD), None)
    assert account == ACCOUNTS["alice"]
    assert account.admin is True


async def test_wrong_password_fails() -> None:
    with pytest.raises(AuthFailed, match="wrong password"):
        await authenticator().authenticate("alice", secret(CAROL_PASSWORD), None)


async def test_unknown_user_fails() -> None:
    with pytest.raises(AuthFailed, match="unknown user"):
        await authenticator().authenticate("mallory", secret(ALICE_PASSWORD), None)


async def test_no_password_and_no_cert_fails() -> None:
    with pytest.raises(AuthFailed, match="no password"):
        await authenticator().authenticate("alice", None, None)


async def test_cert_cn_matching_username_logs_in_without_password_in_optional_mode() -> None:
    auth_ = authenticator("optional")
    assert await auth_.authenticate("alice", None, "alice") == ACCOUNTS["alice"]
    assert await auth_.authenticate("bob", None, "bob") == ACCOUNTS["bob"]


async def test_cert_with_a_wrong_password_fails_in_optional_mode() -> None:
    # A password sent along with the certificate is checked: a wrong credential never logs in.
    with pytest.raises(AuthFailed, match="wrong password"):
        await authenticator("optional").authenticate("alice", secret("nope-nope"), "alice")


async def test_cert_with_the_correct_password_succeeds_in_optional_mode() -> None:
    account = await authenticator("optional").authenticate("alice", secret(ALICE_PASSWORD), "alice")
    assert account == ACCOUNTS["alice"]


@pytest.mark.parametrize("mode", ["optional", "required"])
async def test_cert_cn_different_from_username_fails_even_with_correct_password(
    mode: ClientCertMode,
) -> None:
    with pytest.raises(AuthFailed, match="certificate is for 'carol'"):
        await authenticator(mode).authenticate("alice", secret(ALICE_PASSWORD), "carol")


@pytest.mark.parametrize("mode", ["optional", "required"])
async def test_cert_for_an_unconfigured_user_fails(mode: ClientCertMode) -> None:
    with pytest.raises(AuthFailed, match="not configured"):
        await authenticator(mode).authenticate("mallory", None, "mallory")


async def test_required_mode_with_cert_but_no_password_fails_for_a_user_with_a_hash() -> None:
    with pytest.raises(AuthFailed, match="no password"):
        await authenticator("required").authenticate("alice", None, "alice")


async def test_required_mode_with_cert_and_correct_password_succeeds() -> None:
    account = await authenticator("required").authenticate("alice", secret(ALICE_PASSWORD), "alice")
    assert account == ACCOUNTS["alice"]


async def test_required_mode_with_cert_and_wrong_password_fails() -> None:
    with pytest.raises(AuthFailed, match="wrong password"):
        await authenticator("required").authenticate("alice", secret(CAROL_PASSWORD), "alice")


async def test_required_mode_with_cert_for_a_cert_only_user_needs_no_password() -> None:
    assert await authenticator("required").authenticate("bob", None, "bob") == ACCOUNTS["bob"]


@pytest.mark.parametrize("password", [None, ALICE_PASSWORD])
async def test_required_mode_without_cert_fails(password: str | None) -> None:
    given = None if password is None else secret(password)
    with pytest.raises(AuthFailed, match="no client certificate"):
        await authenticator("required").authenticate("alice", given, None)


@pytest.mark.parametrize("mode", ["none", "optional"])
async def test_user_without_password_hash_and_without_cert_fails(mode: ClientCertMode) -> None:
    auth_ = authenticator(mode)
    with pytest.raises(AuthFailed, match="no password"):
        await auth_.authenticate("bob", None, None)
    with pytest.raises(AuthFailed, match="user has no password"):
        await auth_.authenticate("bob", secret("anything-at-all"), None)


async def test_mode_none_ignores_certificates() -> None:
    auth_ = authenticator("none")
    # A matching certificate does not replace the password...
    with pytest.raises(AuthFailed, match="no password"):
        await auth_.authenticate("alice", None, "alice")
    # ...and a certificate for someone else does not block a password login.
    account = await auth_.authenticate("alice", secret(ALICE_PASSWORD), "carol")
    assert account == ACCOUNTS["alice"]


async def test_authenticator_copies_the_accounts() -> None:
    accounts = dict(ACCOUNTS)
    auth_ = Authenticator(accounts, "optional")
    del accounts["alice"]
    assert await auth_.authenticate("alice", secret(ALICE_PASSWORD), None) == ACCOUNTS["alice"]


# --- Authenticator: throttling ------------------------------------------------------------------

GUESSER = "192.0.2.66"


def throttled(mode: ClientCertMode = "optional", *, checks: int = 1) -> Authenticator:
    """An authenticator allowing 3 free failures, with ``checks`` Argon2id workers."""
    return Authenticator(
        ACCOUNTS,
        mode,
        max_concurrent_checks=checks,
        throttle=LoginThrottle(free_failures=3),
    )


async def attempt(
    auth_: Authenticator,
    outcomes: list[Account | AuthFailed],
    username: str,
    password: str | None,
    cert_user: str | None = None,
) -> None:
    given = None if password is None else secret(password)
    try:
        outcomes.append(await auth_.authenticate(username, given, cert_user, source=GUESSER))
    except AuthFailed as exc:
        outcomes.append(exc)


def reasons(outcomes: list[Account | AuthFailed]) -> list[str]:
    return [str(outcome) for outcome in outcomes if isinstance(outcome, AuthFailed)]


async def test_parallel_guesses_are_counted_before_they_are_checked(
    password_checks: list[str],
) -> None:
    auth_ = throttled(checks=2)
    outcomes: list[Account | AuthFailed] = []
    async with trio.open_nursery() as nursery:
        with holding(auth_.limiter):
            for n in range(10):
                nursery.start_soon(attempt, auth_, outcomes, "carol", f"guess number {n}")
            await trio.testing.wait_all_tasks_blocked()
            # three in flight (waiting for a worker), the others waiting for
            # them to be settled: nothing answered, nothing checked yet
            assert auth_.limiter.statistics().tasks_waiting == 3
            # then the right password, behind the guesses
            nursery.start_soon(attempt, auth_, outcomes, "carol", CAROL_PASSWORD)
            await trio.testing.wait_all_tasks_blocked()
            assert auth_.limiter.statistics().tasks_waiting == 3
            assert outcomes == []
            assert password_checks == []
    # The three fail, which blocks carol: the other eight are refused without
    # a check, the right password among them, exactly as if sent one by one.
    assert reasons(outcomes)[:3] == ["wrong password"] * 3
    assert len(reasons(outcomes)) == 11
    assert all(reason.startswith("backing off for ") for reason in reasons(outcomes)[3:])
    assert password_checks == [CAROL_HASH] * 3
    throttle = auth_.throttle
    now = trio.current_time()
    assert throttle.failures("user:carol", now) == throttle.failures(f"ip:{GUESSER}", now) == 3
    assert throttle.in_flight("user:carol") == throttle.in_flight(f"ip:{GUESSER}") == 0


async def test_parallel_right_passwords_wait_their_turn_and_get_in(
    password_checks: list[str],
) -> None:
    auth_ = throttled(checks=2)
    outcomes: list[Account | AuthFailed] = []
    async with trio.open_nursery() as nursery:
        for _ in range(10):
            nursery.start_soon(attempt, auth_, outcomes, "carol", CAROL_PASSWORD)
    assert reasons(outcomes) == []
    assert len(outcomes) == 10
    assert password_checks == [CAROL_HASH] * 10


async def test_unknown_users_reserve_and_count_like_known_ones(
    password_checks: list[str],
) -> None:
    auth_ = throttled(checks=2)
    outcomes: list[Account | AuthFailed] = []
    async with trio.open_nursery() as nursery:
        with holding(auth_.limiter):
            for n in range(5):
                nursery.start_soon(attempt, auth_, outcomes, "mallory", f"guess number {n}")
            await trio.testing.wait_all_tasks_blocked()
            assert outcomes == []  # three in flight, two waiting for them
    assert reasons(outcomes)[:3] == ["unknown user"] * 3
    assert all(reason.startswith("backing off for ") for reason in reasons(outcomes)[3:])
    assert len(outcomes) == 5
    assert len(password_checks) == 3  # each against the dummy hash
    assert auth_.throttle.failures("user:mallory", trio.current_time()) == 3


async def test_a_success_clears_only_the_users_own_failures(password_checks: list[str]) -> None:
    auth_ = throttled()
    outcomes: list[Account | AuthFailed] = []
    await attempt(auth_, outcomes, "carol", "a wrong guess")
    await attempt(auth_, outcomes, "alice", "alice's typo")
    await attempt(auth_, outcomes, "alice", ALICE_PASSWORD)
    assert outcomes[-1] == ACCOUNTS["alice"]
    throttle, now = auth_.throttle, trio.current_time()
    assert throttle.failures("user:alice", now) == 0
    assert throttle.failures("user:carol", now) == 1
    assert throttle.failures(f"ip:{GUESSER}", now) == 2
    # so the address's third failure blocks it, for alice too
    await attempt(auth_, outcomes, "mallory", "a wrong guess")
    await attempt(auth_, outcomes, "alice", ALICE_PASSWORD)
    assert reasons(outcomes)[-1].startswith("backing off for ")
    assert reasons(outcomes)[-1].endswith(f"(ip:{GUESSER})")
    assert len(password_checks) == 4


async def test_certificate_logins_are_not_throttled(password_checks: list[str]) -> None:
    auth_ = throttled()
    outcomes: list[Account | AuthFailed] = []
    for n in range(4):
        await attempt(auth_, outcomes, "alice", f"guess number {n}")
    assert reasons(outcomes)[-1].startswith("backing off for ")
    await attempt(auth_, outcomes, "alice", None, cert_user="alice")
    assert outcomes[-1] == ACCOUNTS["alice"]
    assert auth_.throttle.in_flight("user:alice") == 0
    assert len(password_checks) == 3


async def test_a_login_cancelled_during_its_check_still_settles(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    started, finish = trio.Event(), threading.Event()
    checks: list[str] = []
    real = passwords.verify_password

    def gated(password: str, phc: str) -> bool:  # runs in the worker thread
        trio.from_thread.run_sync(started.set)
        # (a threading.Event: waiting through trio.from_thread.run would be cancelled too)
        assert finish.wait(WAIT)
        checks.append(phc)
        return real(password, phc)

    monkeypatch.setattr(passwords, "verify_password", gated)
    auth_ = throttled()
    outcomes: list[Account | AuthFailed] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(attempt, auth_, outcomes, "carol", "a wrong guess")
        await started.wait()
        assert auth_.throttle.in_flight("user:carol") == 1
        nursery.cancel_scope.cancel()  # as when the connection's login deadline passes
        finish.set()
    # the thread could not be interrupted: its verdict still counts
    assert checks == [CAROL_HASH]
    assert reasons(outcomes) == ["wrong password"]
    throttle = auth_.throttle
    assert throttle.in_flight("user:carol") == throttle.in_flight(f"ip:{GUESSER}") == 0
    assert throttle.failures("user:carol", trio.current_time()) == 1


async def test_a_login_cancelled_before_its_check_releases_its_reservation(
    password_checks: list[str],
) -> None:
    auth_ = throttled()
    outcomes: list[Account | AuthFailed] = []
    async with trio.open_nursery() as nursery:
        with holding(auth_.limiter):
            nursery.start_soon(attempt, auth_, outcomes, "carol", "a wrong guess")
            await trio.testing.wait_all_tasks_blocked()
            assert auth_.throttle.in_flight("user:carol") == 1
            nursery.cancel_scope.cancel()
    assert outcomes == []
    assert password_checks == []  # nothing was checked, so nothing counts
    throttle = auth_.throttle
    assert throttle.in_flight("user:carol") == throttle.in_flight(f"ip:{GUESSER}") == 0
    assert throttle.failures("user:carol", trio.current_time()) == 0


ALICE_CHANGES = {
    "removed": None,
    "new password": Account(password_hash=CAROL_HASH, admin=True),
    "no longer admin": Account(password_hash=ALICE_HASH, admin=False),
}


@pytest.mark.parametrize("change", ALICE_CHANGES)
async def test_an_account_changed_during_its_check_does_not_log_in(change: str) -> None:
    auth_ = throttled()
    outcomes: list[Account | AuthFailed] = []
    async with trio.open_nursery() as nursery:
        with holding(auth_.limiter):
            nursery.start_soon(attempt, auth_, outcomes, "alice", ALICE_PASSWORD)
            await trio.testing.wait_all_tasks_blocked()
            # a config reload while the right password waits for its check
            accounts = {name: Account(a.password_hash, a.admin) for name, a in ACCOUNTS.items()}
            if (new := ALICE_CHANGES[change]) is None:
                del accounts["alice"]
            else:
                accounts["alice"] = new
            auth_.reconfigure(accounts)
    assert reasons(outcomes) == ["account removed or changed during the password check"]
    # not a failed guess: nothing is counted against alice or the address
    throttle, now = auth_.throttle, trio.current_time()
    assert throttle.failures("user:alice", now) == throttle.failures(f"ip:{GUESSER}", now) == 0
    assert throttle.in_flight("user:alice") == 0


async def test_a_reload_that_leaves_the_account_as_it_was_does_not_disturb_a_login() -> None:
    auth_ = throttled()
    outcomes: list[Account | AuthFailed] = []
    async with trio.open_nursery() as nursery:
        with holding(auth_.limiter):
            nursery.start_soon(attempt, auth_, outcomes, "alice", ALICE_PASSWORD)
            await trio.testing.wait_all_tasks_blocked()
            # a reload makes new Account objects with the same contents
            auth_.reconfigure(
                {name: Account(a.password_hash, a.admin) for name, a in ACCOUNTS.items()}
            )
    assert outcomes == [ACCOUNTS["alice"]]
