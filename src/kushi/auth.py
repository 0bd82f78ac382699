"""Proxy authentication: ``Proxy-Authorization: Basic`` against an htpasswd file.

Only bcrypt entries (``$2y$``, ``$2b$``, ``$2a$``, as ``htpasswd -B`` writes) are accepted;
a clear-text, crypt or MD5 entry is a config error naming the line. bcrypt is slow by
design, so a credential that verified once is remembered (as an HMAC under a per-process
key, never in clear) for a while; an unknown user is checked against a dummy hash so the
answer takes as long as for a known one.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
import time

import bcrypt

from kushi.errors import ConfigError

BCRYPT_PREFIXES = (b"$2y$", b"$2b$", b"$2a$")
CACHE_SECONDS = 300.0


class Htpasswd:
    def __init__(self, users: dict[str, bytes], path: str = "") -> None:
        self.users = users
        self.path = path
        self._key = secrets.token_bytes(32)
        self._verified: dict[bytes, tuple[float, str]] = {}
        self._dummy = bcrypt.hashpw(b"kushi-dummy", bcrypt.gensalt(rounds=10))

    @classmethod
    def load(cls, path: str, key: str = "auth_file") -> Htpasswd:
        try:
            with open(path, "rb") as fh:
                lines = fh.read().splitlines()
        except OSError as exc:
            raise ConfigError(key, f"{path}: {exc.strerror}") from None
        users: dict[str, bytes] = {}
        for number, line in enumerate(lines, 1):
            line = line.strip()
            if not line or line.startswith(b"#"):
                continue
            user, sep, digest = line.partition(b":")
            if not sep or not user:
                raise ConfigError(key, f"{path} line {number}: expected user:bcrypt-hash")
            if not digest.startswith(BCRYPT_PREFIXES):
                raise ConfigError(
                    key,
                    f"{path} line {number}: user {user.decode('utf-8', 'replace')!r} is not a "
                    "bcrypt entry (clear-text and MD5 are refused; use htpasswd -B)",
                )
            users[user.decode("utf-8", "replace")] = digest.replace(b"$2y$", b"$2b$", 1)
        if not users:
            raise ConfigError(key, f"{path}: no users")
        return cls(users, path)

    def check(self, header: bytes | None) -> str | None:
        """The user name if ``header`` holds valid Basic credentials, else None."""
        if not header:
            return None
        scheme, _, token = header.strip().partition(b" ")
        if scheme.lower() != b"basic":
            return None
        try:
            decoded = base64.b64decode(token.strip(), validate=True)
        except (binascii.Error, ValueError):
            return None
        user_b, sep, password = decoded.partition(b":")
        if not sep:
            return None
        return self.verify(user_b.decode("utf-8", "replace"), password)

    def verify(self, user: str, password: bytes) -> str | None:
        """``user`` if ``password`` is theirs, else None (SOCKS5's RFC 1929 sub-negotiation
        and HTTP Basic share this check and its cache)."""
        mac = hmac.new(self._key, user.encode() + b"\0" + password, hashlib.sha256).digest()
        now = time.monotonic()
        hit = self._verified.get(mac)
        if hit is not None and hit[0] > now:
            return hit[1]
        digest = self.users.get(user)
        ok = bcrypt.checkpw(password, digest if digest is not None else self._dummy)
        if not ok or digest is None:
            return None
        if len(self._verified) > 1024:
            self._verified.clear()
        self._verified[mac] = (now + CACHE_SECONDS, user)
        return user
