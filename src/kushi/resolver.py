"""Name resolution through the system resolver, with a small cache.

kushi asks ``getaddrinfo`` (so ``/etc/hosts``, ``/etc/nsswitch.conf`` and
``/etc/resolv.conf`` apply, including a network namespace's ``/etc/netns/NAME/hosts``).
``getaddrinfo`` does not report record lifetimes, so answers are kept for ``dns_cache_ttl``
seconds (default 30, the cap; set it to 0 to disable caching) and failures for a few
seconds, so a burst of requests for a name that does not exist costs one lookup.
Concurrent lookups of one name share a single query.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import socket
import time
from collections.abc import Callable

from kushi.errors import DNSError, DNSTimeout, KushiError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
NEGATIVE_TTL = 5.0
MAX_ENTRIES = 4096


def ip_literal(host: str) -> IPAddress | None:
    """The address if ``host`` is an IP literal (an IPv4-mapped IPv6 one becomes IPv4).

    Cached, as every connection asks for its client's and its own address; a string
    longer than any IP literal (45 characters, a scope id of 15 more) is not one."""
    if len(host) > 64:
        return None
    return _ip_literal(host)


@functools.lru_cache(maxsize=4096)
def _ip_literal(host: str) -> IPAddress | None:
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        return None
    return unmap(addr)


def unmap(addr: IPAddress) -> IPAddress:
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


class Resolver:
    def __init__(
        self,
        ttl: float = 30.0,
        timeout: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl = ttl
        self.timeout = timeout
        self.clock = clock
        self._cache: dict[str, tuple[float, tuple[IPAddress, ...] | KushiError]] = {}
        self._inflight: dict[str, asyncio.Future[tuple[IPAddress, ...]]] = {}
        self.lookups = 0

    async def resolve(self, host: str) -> tuple[IPAddress, ...]:
        """Every address of ``host`` in the resolver's order, duplicates removed."""
        literal = ip_literal(host)
        if literal is not None:
            return (literal,)
        key = host.lower().rstrip(".")
        now = self.clock()
        cached = self._cache.get(key)
        if cached is not None and cached[0] > now:
            if isinstance(cached[1], KushiError):
                raise type(cached[1])(cached[1].details)
            return cached[1]
        pending = self._inflight.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[tuple[IPAddress, ...]] = loop.create_future()
        self._inflight[key] = future
        try:
            addrs = await self._lookup(key)
        except KushiError as exc:
            self._store(key, exc, NEGATIVE_TTL)
            future.set_exception(exc)
            future.exception()  # mark retrieved; waiters re-raise it
            raise
        finally:
            del self._inflight[key]
        self._store(key, addrs, self.ttl)
        future.set_result(addrs)
        return addrs

    def _store(self, key: str, value: tuple[IPAddress, ...] | KushiError, ttl: float) -> None:
        if ttl <= 0:
            return
        if len(self._cache) >= MAX_ENTRIES:
            now = self.clock()
            for name in [k for k, v in self._cache.items() if v[0] <= now] or list(self._cache)[:1]:
                del self._cache[name]
        self._cache[key] = (self.clock() + ttl, value)

    async def _lookup(self, host: str) -> tuple[IPAddress, ...]:
        self.lookups += 1
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.timeout):
                infos = await loop.getaddrinfo(host, None, type=socket.SOCK_STREAM)
        except TimeoutError:
            raise DNSTimeout(f"no answer for {host} within {self.timeout:g} s") from None
        except socket.gaierror as exc:
            raise DNSError(_gai_reason(host, exc)) from None
        except UnicodeError:
            raise DNSError(f"{host!r} is not a valid host name") from None
        seen: dict[IPAddress, None] = {}
        for family, _type, _proto, _canon, sockaddr in infos:
            if family in (socket.AF_INET, socket.AF_INET6):
                addr = unmap(ipaddress.ip_address(str(sockaddr[0]).split("%")[0]))
                seen.setdefault(addr, None)
        if not seen:
            raise DNSError(f"{host} has no IPv4 or IPv6 address")
        return tuple(seen)


def _gai_reason(host: str, exc: socket.gaierror) -> str:
    if exc.errno in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", -5)):
        return f"{host} does not exist (no address records)"
    if exc.errno == socket.EAI_AGAIN:
        return f"temporary failure resolving {host}"
    return f"resolving {host} failed: {exc.strerror}"
