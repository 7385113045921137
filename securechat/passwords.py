"""Argon2id password hashes: making them, checking them, and what a new password must be.

Stored as PHC strings with the OWASP parameters (m=19456 KiB, t=2, p=1),
made and checked with ``cryptography``. A check is deliberately expensive
(tens of milliseconds of CPU, 19 MiB of memory: docs/security.md), so
:mod:`securechat.auth` runs it in a worker thread. This module does no I/O
and needs no event loop: the config validates stored hashes with it, and
``securechat hash-password`` makes them.
"""

from __future__ import annotations

import os
import re

from cryptography.exceptions import InvalidKey
from cryptography.hazmat.primitives.kdf.argon2 import Argon2id

from .protocol import MAX_PASSWORD_CHARS

ARGON2_MEMORY_KIB = 19456
ARGON2_ITERATIONS = 2
ARGON2_LANES = 1
ARGON2_HASH_BYTES = 32
ARGON2_SALT_BYTES = 16
MIN_PASSWORD_CHARS = 8

_PHC_RE = re.compile(
    r"\$argon2id\$v=19\$m=(\d+),t=(\d+),p=(\d+)\$[A-Za-z0-9+/]{11,}\$[A-Za-z0-9+/]{16,}"
)
# Refuse stored hashes whose parameters would let one login cost the server
# seconds of CPU or gigabytes of memory (a typo, or a hostile config edit).
_MAX_MEMORY_KIB = 1024 * 1024
_MAX_ITERATIONS = 16
_MAX_LANES = 8


def hash_password(password: str) -> str:
    """An Argon2id PHC string for ``password`` with a fresh random salt."""
    kdf = Argon2id(
        salt=os.urandom(ARGON2_SALT_BYTES),
        length=ARGON2_HASH_BYTES,
        iterations=ARGON2_ITERATIONS,
        lanes=ARGON2_LANES,
        memory_cost=ARGON2_MEMORY_KIB,
    )
    return kdf.derive_phc_encoded(password.encode("utf-8"))


def verify_password(password: str, phc: str) -> bool:
    """True when ``password`` matches the PHC string (blocking, and expensive on purpose)."""
    try:
        Argon2id.verify_phc_encoded(password.encode("utf-8"), phc)
    except InvalidKey:
        return False
    return True


def check_phc(phc: str) -> str:
    """``phc`` if it is an Argon2id PHC string with sane parameters; else ``ValueError``."""
    match = _PHC_RE.fullmatch(phc)
    if match is None:
        raise ValueError(
            "not an Argon2id PHC string ($argon2id$v=19$m=...,t=...,p=...$salt$hash);"
            " make one with `securechat hash-password`"
        )
    memory, iterations, lanes = (int(group) for group in match.groups())
    if not (8 * lanes <= memory <= _MAX_MEMORY_KIB and 1 <= iterations <= _MAX_ITERATIONS):
        raise ValueError("Argon2id parameters out of range")
    if not 1 <= lanes <= _MAX_LANES:
        raise ValueError("Argon2id parameters out of range")
    return phc


def check_new_password(password: str) -> str:
    """``password`` if it is acceptable for ``hash-password``; else ``ValueError``.

    At most :data:`~securechat.protocol.MAX_PASSWORD_CHARS`: what ``hello`` can carry.
    """
    if len(password) < MIN_PASSWORD_CHARS:
        raise ValueError(f"password too short: use at least {MIN_PASSWORD_CHARS} characters")
    if len(password) > MAX_PASSWORD_CHARS:
        raise ValueError(f"password too long: use at most {MAX_PASSWORD_CHARS} characters")
    return password
