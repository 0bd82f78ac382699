"""Proxy authentication: ``Proxy-Authorization: Basic`` against an htpasswd file.

Only bcrypt entries (``$2y$``, ``$2b$``, ``$2a$``, as ``htpasswd -B`` writes) are accepted;
a clear-text, crypt or MD5 entry is a config error naming the line.

bcrypt is slow by design, so it must not be a way to stall the proxy:

* it runs in a small executor of its own (``BCRYPT_THREADS`` threads; bcrypt releases the
  GIL), never on the event loop, and at most ``MAX_PENDING`` checks wait at once;
* a credential that verified is remembered for ``CACHE_SECONDS``, keyed by a MAC (keyed
  BLAKE2b) under a per-process random key (never the password or the header itself);
* failed attempts are counted per client (an IPv6 /64 is one client): after
  ``FAILURES_ALLOWED`` within ``FAILURE_WINDOW`` seconds the client gets 429 at once,
  without a bcrypt check, until the window has passed;
* an unknown user is checked against a dummy hash of the same cost as the file's entries,
  so the answer takes as long as for a known one (no user enumeration by timing);
  a password longer than bcrypt's 72 bytes is a failed attempt (407), not an error.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import concurrent.futures
import hashlib
import secrets
import time
from collections.abc import Callable

import bcrypt

from kushi.config import read_htpasswd
from kushi.errors import AuthRateLimited

CACHE_SECONDS = 300.0
CACHE_ENTRIES = 1024
BCRYPT_THREADS = 2
MAX_PENDING = 32
FAILURES_ALLOWED = 10
FAILURE_WINDOW = 60.0
#: bcrypt uses the first 72 bytes of a password only; longer ones are refused.
MAX_PASSWORD = 72
#: The limits, as the metrics export them (``kushi_auth_limit``).
LIMITS = {
    "cache_seconds": CACHE_SECONDS,
    "bcrypt_threads": BCRYPT_THREADS,
    "max_pending": MAX_PENDING,
    "failures_allowed": FAILURES_ALLOWED,
    "failure_window_seconds": FAILURE_WINDOW,
}


class _Malformed:
    """Basic credentials that do not decode: a failed attempt."""


_MALFORMED = _Malformed()


def _basic(header: bytes) -> tuple[str, bytes] | _Malformed | None:
    """(user, password) from a ``Basic`` credentials header; None for another scheme."""
    scheme, _, token = header.strip().partition(b" ")
    if scheme.lower() != b"basic":
        return None
    try:
        decoded = base64.b64decode(token.strip(), validate=True)
    except (binascii.Error, ValueError):
        return _MALFORMED
    user_b, sep, password = decoded.partition(b":")
    if not sep:
        return _MALFORMED
    return user_b.decode("utf-8", "replace"), password


_executor: concurrent.futures.ThreadPoolExecutor | None = None


def _bcrypt_executor() -> concurrent.futures.ThreadPoolExecutor:
    """One small pool per process, shared by every listener and reload."""
    global _executor
    if _executor is None:
        _executor = concurrent.futures.ThreadPoolExecutor(
            BCRYPT_THREADS, thread_name_prefix="kushi-bcrypt"
        )
    return _executor


def _cost(digest: bytes) -> int:
    """The cost (log2 rounds) of a ``$2b$NN$...`` hash."""
    try:
        return int(digest.split(b"$")[2])
    except (IndexError, ValueError):
        return 10


def _checkpw(password: bytes, digest: bytes) -> bool:
    try:
        return bcrypt.checkpw(password, digest)
    except ValueError:  # a malformed hash or an over-long password
        return False


class Htpasswd:
    def __init__(
        self, users: dict[str, bytes], path: str = "", clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.users = users
        self.path = path
        self.clock = clock
        self._key = secrets.token_bytes(32)
        self._verified: dict[bytes, tuple[float, str]] = {}
        self._failures: dict[str, tuple[float, int]] = {}
        self._pending = 0
        cost = max((_cost(d) for d in users.values()), default=10)
        self._dummy = bcrypt.hashpw(b"kushi-dummy", bcrypt.gensalt(rounds=max(4, min(cost, 31))))

    @classmethod
    def load(cls, path: str, key: str = "auth_file") -> Htpasswd:
        return cls(dict(read_htpasswd(path, key)), path)

    def remembered(self, header: bytes | None) -> str | None:
        """The user name when ``header`` holds credentials verified within the last
        ``CACHE_SECONDS``, else None (then ``check`` decides). Synchronous: a request with
        remembered credentials is answered without waiting for anything."""
        parsed = _basic(header) if header else None
        if parsed is None or isinstance(parsed, _Malformed):
            return None
        hit = self._verified.get(self._mac(parsed[0], parsed[1]))
        if hit is not None and hit[0] > self.clock():
            return hit[1]
        return None

    async def check(self, header: bytes | None, client: str = "") -> str | None:
        """The user name if ``header`` holds valid Basic credentials, else None.

        Raises ``AuthRateLimited`` when ``client`` (a ``acl.client_key``) has failed too
        often lately, or when too many checks are waiting already."""
        parsed = _basic(header) if header else None
        if parsed is None:
            return None
        if isinstance(parsed, _Malformed):
            now = self.clock()
            self._check_rate(client, now)
            self._failed(client, now)
            return None
        return await self.verify(parsed[0], parsed[1], client)

    def _mac(self, user: str, password: bytes) -> bytes:
        # (BLAKE2b in its keyed mode is a MAC, RFC 7693, and costs a fifth of HMAC-SHA-256
        # through OpenSSL 3, which looks the digest up again on every call.)
        return hashlib.blake2b(user.encode() + b"\0" + password, key=self._key).digest()

    async def verify(self, user: str, password: bytes, client: str = "") -> str | None:
        """``user`` if ``password`` is theirs, else None: SOCKS5's RFC 1929 sub-negotiation
        and HTTP Basic share this check, its cache and its rate limit.

        bcrypt runs off the event loop; verified credentials are remembered for
        ``CACHE_SECONDS`` under a MAC (keyed BLAKE2b) with a per-process key, never the
        password."""
        mac = self._mac(user, password)
        now = self.clock()
        hit = self._verified.get(mac)
        if hit is not None and hit[0] > now:
            return hit[1]
        self._check_rate(client, now)
        if len(password) > MAX_PASSWORD:
            self._failed(client, now)
            return None
        digest = self.users.get(user)
        if self._pending >= MAX_PENDING:
            raise AuthRateLimited("too many proxy-authentication checks in progress; retry")
        self._pending += 1
        try:
            ok = await asyncio.get_running_loop().run_in_executor(
                _bcrypt_executor(),
                _checkpw,
                password,
                digest if digest is not None else self._dummy,
            )
        finally:
            self._pending -= 1
        if not ok or digest is None:
            self._failed(client, self.clock())
            return None
        if len(self._verified) >= CACHE_ENTRIES:
            self._expire(now)
        self._verified[mac] = (now + CACHE_SECONDS, user)
        return user

    def _check_rate(self, client: str, now: float) -> None:
        entry = self._failures.get(client)
        if entry is None:
            return
        start, count = entry
        if now - start >= FAILURE_WINDOW:
            del self._failures[client]
        elif count >= FAILURES_ALLOWED:
            wait = round(FAILURE_WINDOW - (now - start))
            raise AuthRateLimited(
                f"{count} failed proxy-authentication attempts from {client}; retry in {wait} s"
            )

    def _failed(self, client: str, now: float) -> None:
        start, count = self._failures.get(client, (now, 0))
        if now - start >= FAILURE_WINDOW:
            start, count = now, 0
        if len(self._failures) >= 65536:
            self._failures = {
                k: v for k, v in self._failures.items() if now - v[0] < FAILURE_WINDOW
            }
        self._failures[client] = (start, count + 1)

    def _expire(self, now: float) -> None:
        self._verified = {k: v for k, v in self._verified.items() if v[0] > now}
        if len(self._verified) >= CACHE_ENTRIES:
            self._verified.clear()
