"""The egress policy: the one place that decides how kushi connects out.

``order_addresses`` (pure) filters and orders a name's addresses by the policy
(``prefer-ipv6``, ``ipv6-only``, ``prefer-ipv4``, ``ipv4-only``), classifying each as
``ipv6``, ``ipv4`` or ``nat64`` (an IPv4-mapped IPv6 address is IPv4 for every decision).
``Connector.connect`` resolves, orders, checks each address against the destination
policy and races them Happy Eyeballs style (RFC 8305 section 5: a new attempt every
Connection Attempt Delay, 250 ms by default, or as soon as the previous one fails). It
returns the connection together with the address actually used and a record of every
attempt, which flow on into ``Proxy-Status``, the access log and the metrics.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

from kushi.config import EgressPolicy as EgressMode
from kushi.errors import (
    ConnectionRefused,
    ConnectionTimeout,
    DestinationNotFound,
    DestinationProhibited,
    DestinationUnroutable,
    KushiError,
)
from kushi.netio import Conn, fmt_addr
from kushi.resolver import IPAddress, Resolver, ip_literal

Family = Literal["ipv4", "ipv6", "nat64"]


@dataclass(frozen=True, slots=True)
class EgressPolicy:
    mode: EgressMode = "prefer-ipv6"
    nat64: Literal["allow", "refuse"] = "allow"
    nat64_prefixes: tuple[ipaddress.IPv6Network, ...] = (ipaddress.IPv6Network("64:ff9b::/96"),)
    attempt_delay: float = 0.25
    connect_timeout: float = 10.0


@dataclass(frozen=True, slots=True)
class Attempt:
    """One connection attempt and how it ended."""

    address: str
    port: int
    family: Family
    outcome: Literal["connected", "refused", "timeout", "unreachable", "error", "abandoned"]
    elapsed: float
    reason: str = ""

    def describe(self) -> str:
        ms = round(self.elapsed * 1000)
        where = f"{self.family} {fmt_addr(self.address, self.port)}"
        if self.outcome == "connected":
            return f"{where} connected in {ms} ms"
        if self.outcome == "abandoned":
            return f"{where} no answer after {ms} ms"
        return f"{where} {self.outcome} after {ms} ms" + (
            f" ({self.reason})" if self.reason else ""
        )


@dataclass(eq=False, slots=True)
class Upstream:
    """A connected upstream socket and how it was reached."""

    conn: Conn
    address: str
    port: int
    family: Family
    attempts: tuple[Attempt, ...]
    connect_time: float
    #: Proxy-Status values by received status, built once per connection.
    proxy_status: dict[int | None, bytes] = field(default_factory=dict)
    #: The listener snapshot whose destination rules this connection last passed (a
    #: pooled connection is checked again only under another snapshot).
    allowed_under: object = None

    @property
    def next_hop(self) -> str:
        return fmt_addr(self.address, self.port)

    @property
    def fallbacks(self) -> tuple[Attempt, ...]:
        """The attempts that did not win: a silent fallback is what users must see."""
        return tuple(a for a in self.attempts if a.outcome != "connected")


class DestinationCheck(Protocol):
    def __call__(self, addr: IPAddress, port: int) -> str | None:
        """A reason to refuse connecting to ``addr``:``port``, or None; a check may also
        raise a ``KushiError`` to refuse the whole request outright."""


def classify(addr: IPAddress, nat64_prefixes: Sequence[ipaddress.IPv6Network]) -> Family:
    if isinstance(addr, ipaddress.IPv4Address):
        return "ipv4"
    if addr.ipv4_mapped is not None:
        return "ipv4"
    if any(addr in prefix for prefix in nat64_prefixes):
        return "nat64"
    return "ipv6"


def order_addresses(
    host: str, addrs: Sequence[IPAddress], policy: EgressPolicy
) -> list[tuple[IPAddress, Family]]:
    """Filter and order by the policy, interleaving families (RFC 8305 section 4).

    Raises ``DestinationNotFound`` when no address of an allowed family is left."""
    tagged = [(a, classify(a, policy.nat64_prefixes)) for a in addrs]
    v6 = [t for t in tagged if t[1] == "ipv6" or (t[1] == "nat64" and policy.nat64 == "allow")]
    v4 = [t for t in tagged if t[1] == "ipv4"]
    if policy.mode == "ipv6-only":
        if not v6:
            raise DestinationNotFound(_no_family(host, "IPv6", tagged, policy))
        return v6
    if policy.mode == "ipv4-only":
        if not v4:
            raise DestinationNotFound(_no_family(host, "IPv4", tagged, policy))
        return v4
    first, second = (v6, v4) if policy.mode == "prefer-ipv6" else (v4, v6)
    if policy.mode == "prefer-ipv4":
        first, second = v4, [t for t in tagged if t[1] != "ipv4"]
    ordered: list[tuple[IPAddress, Family]] = []
    for i in range(max(len(first), len(second))):
        if i < len(first):
            ordered.append(first[i])
        if i < len(second):
            ordered.append(second[i])
    if not ordered:
        raise DestinationNotFound(f"{host} has no usable address")
    return ordered


def _no_family(
    host: str, wanted: str, tagged: list[tuple[IPAddress, Family]], policy: EgressPolicy
) -> str:
    if ip_literal(host) is not None:
        fam = tagged[0][1].replace("ip", "IP")
        return f"{host} is an {fam} address; egress policy is {policy.mode}"
    have = ", ".join(str(a) for a, _ in tagged[:4])
    text = f"{host} has no {wanted} address (only {have}); egress policy is {policy.mode}"
    if any(f == "nat64" for _, f in tagged) and policy.nat64 == "refuse":
        text += "; its NAT64 addresses are refused (nat64 = refuse)"
    return text


class Connector:
    """Resolves and connects according to an ``EgressPolicy``."""

    def __init__(
        self,
        resolver: Resolver,
        check: DestinationCheck | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.resolver = resolver
        self.check = check
        self.clock = clock

    async def connect(
        self,
        host: str,
        port: int,
        policy: EgressPolicy,
        check: DestinationCheck | None = None,
    ) -> Upstream:
        """Resolve, order by ``policy``, drop what ``check`` (and the connector's own check)
        refuses, and race the rest."""
        candidates = await self.candidates(host, port, policy, check)
        return await self.race(host, port, candidates, policy)

    async def candidates(
        self,
        host: str,
        port: int,
        policy: EgressPolicy,
        check: DestinationCheck | None = None,
    ) -> list[tuple[IPAddress, Family]]:
        """The addresses kushi may use for ``host``:``port``, in the policy's order."""
        addrs = await self.resolver.resolve(host)
        candidates = order_addresses(host, addrs, policy)
        checks = [c for c in (self.check, check) if c is not None]
        if checks:
            refused = []
            allowed = []
            for addr, fam in candidates:
                reason = next((r for c in checks if (r := c(addr, port))), None)
                if reason:
                    refused.append(f"{addr}: {reason}")
                else:
                    allowed.append((addr, fam))
            if not allowed:
                raise DestinationProhibited(f"{host} port {port}: " + "; ".join(refused[:3]))
            candidates = allowed
        return candidates

    async def datagram_target(
        self,
        host: str,
        port: int,
        policy: EgressPolicy,
        check: DestinationCheck | None = None,
    ) -> tuple[IPAddress, Family]:
        """Where one UDP datagram goes (SOCKS5 UDP ASSOCIATE): the first address the egress
        order and the destination policy allow. There is no handshake to race, so no Happy
        Eyeballs: an application protocol over UDP (DNS, QUIC) retries by itself."""
        return (await self.candidates(host, port, policy, check))[0]

    async def race(
        self,
        host: str,
        port: int,
        candidates: list[tuple[IPAddress, Family]],
        policy: EgressPolicy,
    ) -> Upstream:
        """RFC 8305 section 5: staggered attempts; the first to connect wins."""
        start = self.clock()
        attempts: list[Attempt] = []
        if len(candidates) == 1:
            # Nothing to race: connect in this task (no attempt task to start and collect,
            # which under load costs event-loop turns of a few milliseconds each).
            addr, fam = candidates[0]
            try:
                async with asyncio.timeout(policy.connect_timeout):
                    conn = await _open(addr, port)
            except Exception as error:  # noqa: BLE001 - classified like a raced attempt's
                attempts.append(_failed(addr, port, fam, self.clock() - start, error))
                return self._fail(host, port, attempts, policy)
            elapsed = self.clock() - start
            attempts.append(Attempt(str(addr), port, fam, "connected", elapsed))
            return Upstream(conn, str(addr), port, fam, tuple(attempts), elapsed)
        running: dict[asyncio.Task[Conn], tuple[IPAddress, Family, float]] = {}
        queue = list(candidates)

        def launch() -> None:
            addr, fam = queue.pop(0)
            task = asyncio.ensure_future(_open(addr, port))
            running[task] = (addr, fam, self.clock())

        launch()
        try:
            async with asyncio.timeout(policy.connect_timeout):
                while running:
                    wait_for = policy.attempt_delay if queue else None
                    done, _ = await asyncio.wait(
                        running, timeout=wait_for, return_when=asyncio.FIRST_COMPLETED
                    )
                    for task in done:
                        addr, fam, began = running.pop(task)
                        elapsed = self.clock() - began
                        exc = task.exception()
                        if exc is None:
                            attempts.append(Attempt(str(addr), port, fam, "connected", elapsed))
                            conn = task.result()
                            for other, (o_addr, o_fam, o_began) in running.items():
                                other.cancel()
                                attempts.append(
                                    Attempt(
                                        str(o_addr),
                                        port,
                                        o_fam,
                                        "abandoned",
                                        self.clock() - o_began,
                                    )
                                )
                            running.clear()
                            self._drop_losers(done, task)
                            attempts.sort(key=lambda a: a.outcome == "connected")
                            return Upstream(
                                conn, str(addr), port, fam, tuple(attempts), self.clock() - start
                            )
                        attempts.append(_failed(addr, port, fam, elapsed, exc))
                    if queue:
                        # A failure starts the next attempt at once; so does the delay expiring.
                        launch()
        except TimeoutError:
            for task, (addr, fam, began) in running.items():
                task.cancel()
                attempts.append(
                    Attempt(str(addr), port, fam, "timeout", self.clock() - began, "no answer")
                )
            running.clear()
        finally:
            for task in running:
                task.cancel()
        return self._fail(host, port, attempts, policy)

    @staticmethod
    def _drop_losers(done: set[asyncio.Task[Conn]], winner: asyncio.Task[Conn]) -> None:
        for task in done:
            if task is not winner and task.exception() is None:
                task.result().abort()

    @staticmethod
    def _fail(host: str, port: int, attempts: list[Attempt], policy: EgressPolicy) -> Upstream:
        summary = "; ".join(a.describe() for a in attempts) or "no attempt"
        text = f"could not connect to {host} port {port}: {summary}"
        exc: KushiError
        if any(a.outcome == "timeout" for a in attempts):
            exc = ConnectionTimeout(text)
        elif attempts and all(a.outcome == "unreachable" for a in attempts):
            exc = DestinationUnroutable(text)
        else:
            exc = ConnectionRefused(text)
        exc.attempts = tuple(a.describe() for a in attempts)
        raise exc


def _failed(addr: IPAddress, port: int, fam: Family, elapsed: float, exc: BaseException) -> Attempt:
    if isinstance(exc, ConnectionRefusedError):
        return Attempt(str(addr), port, fam, "refused", elapsed, "connection refused")
    if isinstance(exc, OSError) and exc.errno in (
        errno.ENETUNREACH,
        errno.EHOSTUNREACH,
        errno.EADDRNOTAVAIL,
        errno.EAFNOSUPPORT,
    ):
        return Attempt(str(addr), port, fam, "unreachable", elapsed, exc.strerror or "unreachable")
    if isinstance(exc, TimeoutError):
        return Attempt(str(addr), port, fam, "timeout", elapsed, "no answer")
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
    return Attempt(str(addr), port, fam, "error", elapsed, reason)


async def _open(addr: IPAddress, port: int) -> Conn:
    """One TCP connection to an address (a literal: nothing is resolved here)."""
    loop = asyncio.get_running_loop()
    family = socket.AF_INET6 if addr.version == 6 else socket.AF_INET
    _transport, conn = await loop.create_connection(Conn, str(addr), port, family=family)
    return conn


def describe_fallbacks(upstream: Upstream) -> str:
    """Proxy-Status ``details`` / access log text for attempts that lost, or ''."""
    return "; ".join(a.describe() for a in upstream.fallbacks)


__all__ = [
    "Attempt",
    "Connector",
    "DestinationCheck",
    "EgressPolicy",
    "Family",
    "KushiError",
    "Upstream",
    "classify",
    "describe_fallbacks",
    "order_addresses",
]
