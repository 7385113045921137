"""Login decisions: who a connection is, from its ``hello`` and its client certificate.

:class:`Authenticator` applies the rules below to the configured accounts
(:class:`~securechat.config.Account`). A password check is an Argon2id
verification (:mod:`securechat.passwords`), expensive on purpose, so it runs
in a worker thread behind a capacity limiter, after the login back-off
(:class:`~securechat.limits.LoginThrottle`) has let the attempt through, and
against a dummy hash for unknown users so that a login attempt takes the
same time whether or not the user exists.
"""

from __future__ import annotations

import enum
import logging
import secrets
from collections.abc import Mapping
from dataclasses import dataclass

import trio
from pydantic import SecretStr

from . import passwords
from .config import Account, ClientCertMode
from .limits import LoginThrottle

log = logging.getLogger(__name__)


class LoginFailure(enum.StrEnum):
    """Why a login was refused, as the metrics count it (a bounded set: a label value)."""

    # (Names of reasons, not passwords: S105.)
    WRONG_PASSWORD = "wrong_password"  # noqa: S105
    UNKNOWN_USER = "unknown_user"
    NO_PASSWORD_HASH = "no_password_hash"  # noqa: S105 (a certificate-only user sent a password)
    NO_PASSWORD = "no_password"  # noqa: S105 (neither a password nor a certificate that suffices)
    NO_CERTIFICATE = "no_certificate"  # client_certs = "required"
    CERTIFICATE_MISMATCH = "certificate_mismatch"  # the certificate names another user
    CERTIFICATE_UNKNOWN_USER = "certificate_unknown_user"
    THROTTLED = "throttled"  # the login back-off refused the attempt unchecked
    ACCOUNT_CHANGED = "account_changed"  # a reload changed the account meanwhile
    # Decided by the session, not here:
    BAD_HELLO = "bad_hello"  # the first frame was not a valid hello
    TIMEOUT = "timeout"  # no hello, or no decision, before login_timeout
    FLOOD_COOLDOWN = "flood_cooldown"  # cut off for flooding a moment ago


class AuthFailed(Exception):
    """Login refused. The message is for the server log only; clients all see the same
    message. ``reason`` classifies it (for metrics)."""

    def __init__(self, message: str, reason: LoginFailure) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class AccountChanges:
    """What a reload changed, by username (each list sorted)."""

    added: list[str]
    removed: list[str]
    new_password: list[str]
    new_admin_flag: list[str]  # the password unchanged

    @property
    def changed(self) -> list[str]:
        return sorted(self.new_password + self.new_admin_flag)


class Authenticator:
    """Decides who a connection is, from its ``hello`` and its client certificate.

    Rules (``client_certs`` is the server's TLS setting):

    * A verified client certificate whose CN equals the ``hello`` username
      authenticates that user without a password, unless the mode is
      ``required`` and the user has a password hash: then both are needed.
      A password sent with the certificate must be right whenever the user
      has a password hash.
    * A certificate whose CN differs from the username authenticates nobody:
      the login fails.
    * Without a certificate, the password must match the user's hash.
    * Only configured users get in; every failure looks the same to the client.
    """

    def __init__(
        self,
        accounts: Mapping[str, Account],
        client_certs: ClientCertMode,
        *,
        max_concurrent_checks: int = 2,
        throttle: LoginThrottle | None = None,
    ) -> None:
        self.accounts = dict(accounts)
        self.client_certs = client_certs
        self.throttle = throttle if throttle is not None else LoginThrottle()
        # Every Argon2id check holds a token while its thread runs.
        self.limiter = trio.CapacityLimiter(max_concurrent_checks)
        # Woken whenever a password attempt is settled (see authenticate).
        self._settled = trio.lowlevel.ParkingLot()
        self._dummy_hash = passwords.hash_password(secrets.token_urlsafe(16))

    def reconfigure(self, accounts: Mapping[str, Account]) -> AccountChanges:
        """Take the accounts of a reloaded config; returns what changed.

        An unchanged account stays the same object: a login checks, when it joins
        the chat, that its account is still the one it was checked against, so
        logins in flight during a reload cannot slip through.
        """
        old = self.accounts
        self.accounts = {
            name: old[name] if old.get(name) == account else account
            for name, account in accounts.items()
        }
        kept = set(old) & set(accounts)
        return AccountChanges(
            added=sorted(set(accounts) - set(old)),
            removed=sorted(set(old) - set(accounts)),
            new_password=sorted(
                name for name in kept if old[name].password_hash != accounts[name].password_hash
            ),
            new_admin_flag=sorted(
                name
                for name in kept
                if old[name].password_hash == accounts[name].password_hash
                and old[name].admin != accounts[name].admin
            ),
        )

    async def authenticate(
        self,
        username: str,
        password: SecretStr | None,
        cert_user: str | None,
        *,
        source: str = "-",
    ) -> Account:
        """The account of ``username``, or :class:`AuthFailed`.

        Password attempts are throttled per username and per ``source``
        address (see :class:`LoginThrottle`): each attempt is reserved before
        its password is checked; one that the attempts in flight stand in the
        way of waits for them to be settled, and one refused fails without a
        check. A success clears the user's own failures, never the address's.
        """
        account = self.accounts.get(username)
        if cert_user is not None and self.client_certs != "none":
            if cert_user != username:
                raise AuthFailed(
                    f"certificate is for {cert_user!r}, hello says {username!r}",
                    LoginFailure.CERTIFICATE_MISMATCH,
                )
            if account is None:
                raise AuthFailed(
                    "certificate user is not configured", LoginFailure.CERTIFICATE_UNKNOWN_USER
                )
            if account.password_hash is None:
                return account
            if self.client_certs == "optional" and password is None:
                return account
            # A password sent along with the certificate is checked too: a
            # wrong credential never logs anyone in.
        elif self.client_certs == "required":
            raise AuthFailed("no client certificate", LoginFailure.NO_CERTIFICATE)

        if password is None:
            # Nothing to check, so nothing to time: the client already knows
            # it sent no password.
            raise AuthFailed("no password given", LoginFailure.NO_PASSWORD)
        user_key = f"user:{username}"
        keys = (user_key, f"ip:{source}")
        # Reserved before the hash, so that guesses sent in parallel are
        # counted before any of them is checked.
        while (refusal := self.throttle.reserve(keys, trio.current_time())) is not None:
            if refusal.wait > 0:
                raise AuthFailed(str(refusal), LoginFailure.THROTTLED)
            # Only the attempts in flight stand in the way (they would block
            # the key if they all failed): wait until one is settled and ask
            # again, as the same attempt sent after them would be answered.
            # A right password is then let in, a guess refused. The caller's
            # login deadline bounds the wait.
            await self._settled.park()
        right: bool | None = None  # None: the password was never checked
        try:
            if account is None or account.password_hash is None:
                await self._verify(password, self._dummy_hash)
                right = False
                if account is None:
                    raise AuthFailed("unknown user", LoginFailure.UNKNOWN_USER)
                raise AuthFailed("user has no password", LoginFailure.NO_PASSWORD_HASH)
            right = await self._verify(password, account.password_hash)
            if not right:
                raise AuthFailed("wrong password", LoginFailure.WRONG_PASSWORD)
            # A config reload during the check may have removed the user or
            # changed their password or admin flag: the old account no longer
            # counts. (Not a guess that failed: the reservation is released.)
            if self.accounts.get(username) != account:
                right = None
                raise AuthFailed(
                    "account removed or changed during the password check",
                    LoginFailure.ACCOUNT_CHANGED,
                )
        finally:
            # Also when the task was cancelled: a check that started always
            # finishes (its thread cannot be interrupted) and is settled here;
            # one cancelled while waiting for a worker checked nothing.
            if right is None:
                self.throttle.release(keys)
            elif right:
                self.throttle.succeeded(keys, clear=(user_key,))
            else:
                self.throttle.failed(keys, trio.current_time())
            self._settled.unpark_all()
        return account

    async def _verify(self, password: SecretStr, phc: str) -> bool:
        return await trio.to_thread.run_sync(
            passwords.verify_password, password.get_secret_value(), phc, limiter=self.limiter
        )
