"""auth.Htpasswd: what a verified credential lets through without bcrypt, and what not."""

from __future__ import annotations

import asyncio
import base64

import bcrypt

from kushi.auth import CACHE_SECONDS, Htpasswd


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def basic(credentials: bytes) -> bytes:
    return b"Basic " + base64.b64encode(credentials)


def test_only_credentials_bcrypt_verified_are_remembered_and_only_for_a_while() -> None:
    clock = Clock()
    users = {"owner": bcrypt.hashpw(b"secret", bcrypt.gensalt(4))}
    auth = Htpasswd(users, clock=clock)
    good, wrong = basic(b"owner:secret"), basic(b"owner:guess")

    assert auth.remembered(good) is None  # not verified yet: check() (bcrypt) decides
    assert asyncio.run(auth.check(good, "198.51.100.7")) == "owner"
    assert auth.remembered(good) == "owner"  # now answered at once
    # Nothing else rides on it: another password, a malformed header, another scheme.
    assert asyncio.run(auth.check(wrong, "198.51.100.7")) is None
    for header in (wrong, basic(b"owner"), b"Basic !!!", b"Bearer x", b"", None):
        assert auth.remembered(header) is None
    # After CACHE_SECONDS the password is checked by bcrypt again.
    clock.now += CACHE_SECONDS + 1
    assert auth.remembered(good) is None
    assert asyncio.run(auth.check(good, "198.51.100.7")) == "owner"
    assert auth.remembered(good) == "owner"
    # Another process (or a reload's new password file) has its own key: no carry-over.
    assert Htpasswd(users, clock=clock).remembered(good) is None
