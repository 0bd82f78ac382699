"""The egress policy: the one place that decides how kushi connects out.

``order_addresses`` (pure) filters and orders a name's addresses by the policy
(``prefer-ipv6``, ``ipv6-only``, ``prefer-ipv4``, ``ipv4-only``), classifying each as
``ipv6``, ``ipv4`` or ``nat64`` (an IPv4-mapped IPv6 address is IPv4 for every decision).
``Connector.connect`` resolves (RFC 8305 section 3, ``Resolver.arrivals``: AAAA and A
asked at once, the preferred family's answer used as soon as it arrives, the other one
after the 50 ms Resolution Delay, later answers joining the race), orders, checks each
address against the destination policy and races them Happy Eyeballs style (RFC 8305
section 5: a new attempt every Connection Attempt Delay, 250 ms by default, or as soon as
the previous one fails). It returns the connection together with the address actually
used and a record of every attempt, which flow on into ``Proxy-Status``, the access log
and the metrics.

NAT64: with a prefix in use (``resolver.Nat64``: configured or discovered from
ipv4only.arpa on a host without IPv4 route), every IPv4 address (a literal, or a name's A
records) becomes its RFC 6052 IPv6 address of family ``nat64``; the destination policy
sees the IPv4 address inside, and every report names it ("IPv4 198.51.100.7 via NAT64").

A ``Source`` (kushi.source) says which local address each attempt binds to, per family of
the destination: an attempt to an IPv6 (or NAT64) address binds the IPv6 source, one to an
IPv4 address the IPv4 source, and a family without a source leaves from the default
address. The source actually bound is in ``Upstream.source``.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import os
import socket
import time
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Protocol

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
from kushi.resolver import (
    WELL_KNOWN_NAT64,
    Batch,
    IPAddress,
    Nat64,
    RdType,
    Resolver,
    extract,
    ip_literal,
    synthesize,
)
from kushi.source import Source, bound_socket

Family = Literal["ipv4", "ipv6", "nat64"]
#: Candidates from one DNS answer, and the resolver's notes about it.
Arrival = tuple[list[tuple[IPAddress, Family]], tuple[str, ...]]


@dataclass(frozen=True, slots=True)
class EgressPolicy:
    mode: EgressMode = "prefer-ipv6"
    nat64: Literal["allow", "refuse"] = "allow"
    nat64_prefixes: tuple[ipaddress.IPv6Network, ...] = (ipaddress.IPv6Network("64:ff9b::/96"),)
    attempt_delay: float = 0.25
    connect_timeout: float = 10.0
    #: RFC 8305 section 3: how long an answer of the other family waits for the
    #: preferred family's.
    resolution_delay: float = 0.05


@dataclass(frozen=True, slots=True)
class Attempt:
    """One connection attempt and how it ended."""

    address: str
    port: int
    family: Family
    outcome: Literal["connected", "refused", "timeout", "unreachable", "error", "abandoned"]
    elapsed: float
    reason: str = ""
    #: The IPv4 address inside a NAT64 address, or "".
    via: str = ""

    def describe(self) -> str:
        ms = round(self.elapsed * 1000)
        where = f"{self.family} {fmt_addr(self.address, self.port)}"
        if self.via:
            where += f" (IPv4 {self.via} via NAT64)"
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
    #: The IPv4 address a NAT64 address stands for, or "".
    via: str = ""
    #: The configured source address this connection left from ('' for the default).
    source: str = ""
    #: What the resolver had to say (a stale answer, RFC 8767), for the access log.
    notes: tuple[str, ...] = ()
    #: The listener snapshot whose destination rules this connection last passed (a
    #: pooled connection is checked again only under another snapshot).
    allowed_under: object = None
    _next_hop: str = field(default="", init=False, repr=False, compare=False)

    @property
    def next_hop(self) -> str:
        """``address:port`` as logs and Proxy-Status show it (formatted once)."""
        if not self._next_hop:
            self._next_hop = fmt_addr(self.address, self.port)
        return self._next_hop

    @property
    def label(self) -> str:
        """The family as reports show it: ``nat64 (IPv4 198.51.100.7)`` for NAT64."""
        return f"{self.family} (IPv4 {self.via})" if self.via else self.family

    @property
    def report_notes(self) -> list[str]:
        """What the access log adds: the IPv4 address behind NAT64, stale DNS answers."""
        head = [f"IPv4 {self.via} via NAT64"] if self.via else []
        return head + list(self.notes)

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


#: Remembered candidate lists (``Connector._cached``) before the memo starts again.
MEMO_SIZE = 4096
#: The record types asked for under each egress mode, preferred first, and whether the
#: others are used only when the preferred one has no address (``Connector.families``).
_FAMILIES: dict[str, tuple[tuple[RdType, ...], bool]] = {
    "prefer-ipv6": (("AAAA", "A"), False),
    "prefer-ipv4": (("A", "AAAA"), False),
    "ipv6-only": (("AAAA", "A"), True),
    "ipv4-only": (("A", "AAAA"), True),
}


class Connector:
    """Resolves and connects according to an ``EgressPolicy``."""

    def __init__(
        self,
        resolver: Resolver,
        check: DestinationCheck | None = None,
        clock: Callable[[], float] = time.monotonic,
        nat64: Nat64 | None = None,
    ) -> None:
        self.resolver = resolver
        self.check = check
        self.clock = clock
        self.nat64 = nat64
        self._memo: dict[
            tuple[str, int, int, int],
            tuple[
                Batch, EgressPolicy, DestinationCheck | None, ipaddress.IPv6Network | None, Arrival
            ],
        ] = {}
        self._policies: dict[
            tuple[EgressPolicy, tuple[ipaddress.IPv6Network, ...]], EgressPolicy
        ] = {}

    async def connect(
        self,
        host: str,
        port: int,
        policy: EgressPolicy,
        check: DestinationCheck | None = None,
        source: Source | None = None,
    ) -> Upstream:
        """Resolve, order by ``policy``, drop what ``check`` (and the connector's own check)
        refuses, and race the rest (each attempt from ``source``'s address of its family);
        addresses that arrive later join the race."""
        ready = self._cached(host, port, policy, check)
        if ready is not None:  # a literal, /etc/hosts or the cache: no generator needed
            upstream = await self.race(host, port, ready[0], policy, source=source)
            if ready[1]:
                upstream.notes = ready[1]
            return upstream
        stream = self._stream(host, port, policy, check)
        try:
            first, notes = await anext(stream)
        except BaseException:
            await stream.aclose()
            raise
        upstream = await self.race(host, port, first, policy, more=stream, source=source)
        if notes:
            upstream.notes = notes + upstream.notes
        return upstream

    async def candidates(
        self,
        host: str,
        port: int,
        policy: EgressPolicy,
        check: DestinationCheck | None = None,
    ) -> list[tuple[IPAddress, Family]]:
        """The addresses kushi may use for ``host``:``port``, in the policy's order (every
        answer waited for)."""
        ready = self._cached(host, port, policy, check)
        if ready is not None:
            return list(ready[0])
        out: list[tuple[IPAddress, Family]] = []
        async for batch, _notes in self._stream(host, port, policy, check):
            out.extend(batch)
        return out

    async def datagram_target(
        self,
        host: str,
        port: int,
        policy: EgressPolicy,
        check: DestinationCheck | None = None,
    ) -> tuple[IPAddress, Family]:
        """Where one UDP datagram goes (SOCKS5 UDP ASSOCIATE): the first address the egress
        order and the destination policy allow, from the first answer that has one. There is
        no handshake to race, so no Happy Eyeballs: an application protocol over UDP (DNS,
        QUIC) retries by itself."""
        ready = self._cached(host, port, policy, check)
        if ready is not None:
            return ready[0][0]
        stream = self._stream(host, port, policy, check)
        try:
            batch, _notes = await anext(stream)
        finally:
            await stream.aclose()
        return batch[0]

    def families(self, policy: EgressPolicy) -> tuple[tuple[RdType, ...], bool]:
        """The record types to ask for under ``policy``, preferred first, and whether the
        others are wanted only when the preferred one has no address. Under ``ipv6-only``
        an A answer is never waited for: it is used only for a name without AAAA records,
        to synthesize NAT64 addresses or to say what the name has (and ``ipv4-only``
        likewise)."""
        return _FAMILIES[policy.mode]

    def _synthesis(self, policy: EgressPolicy) -> ipaddress.IPv6Network | None:
        if self.nat64 is None or policy.nat64 == "refuse" or policy.mode == "ipv4-only":
            return None
        return self.nat64.active

    def _effective(self, policy: EgressPolicy) -> EgressPolicy:
        """``policy`` with the discovered NAT64 prefixes among its ``nat64_prefixes``."""
        if self.nat64 is None or not self.nat64.prefixes:
            return policy
        key = (policy, self.nat64.prefixes)
        found = self._policies.get(key)
        if found is None:
            extra = tuple(p for p in self.nat64.prefixes if p not in policy.nat64_prefixes)
            if len(self._policies) > 64:
                self._policies.clear()
            found = self._policies[key] = replace(
                policy, nat64_prefixes=(*policy.nat64_prefixes, *extra)
            )
        return found

    def embedded(self, addr: IPAddress, policy: EgressPolicy) -> ipaddress.IPv4Address | None:
        """The IPv4 address inside a NAT64 address of ``policy``'s prefixes, or None."""
        if not isinstance(addr, ipaddress.IPv6Address):
            return None
        for prefix in (*policy.nat64_prefixes, WELL_KNOWN_NAT64):
            if addr in prefix:
                return extract(addr, prefix)
        return None

    def _cached(
        self,
        host: str,
        port: int,
        policy: EgressPolicy,
        check: DestinationCheck | None,
    ) -> Arrival | None:
        """The candidates when no query is needed (a literal, /etc/hosts, fresh cache
        entries), or None. Raises like ``_stream`` when none of them may be used."""
        families, fallback_only = _FAMILIES[policy.mode]
        resolver = self.resolver
        batch = resolver.cached(host, families[:1] if fallback_only else families)
        if batch is None and fallback_only:  # no AAAA address (ipv6-only): is A cached?
            batch = resolver.cached(host, families)
        if batch is None:
            return None
        # The same answer (the very Batch: a hosts entry, or the cache's joined answer
        # until it expires) under the same policy and checks gives the same candidates.
        nat64 = self.nat64
        active = nat64.active if nat64 is not None else None
        memo_key = (host, port, id(policy), id(check))
        memo = self._memo.get(memo_key)
        if (
            memo is not None
            and memo[0] is batch
            and memo[1] is policy
            and memo[2] is check
            and memo[3] is active
        ):
            return memo[4]
        addrs = batch.addrs
        given = policy
        if nat64 is not None and nat64.prefixes:
            policy = self._effective(policy)
            addrs = self._synthesized(addrs, policy)
        refused: list[str] = []
        allowed = self._allowed(order_addresses(host, addrs, policy), port, policy, check, refused)
        if not allowed:
            raise DestinationProhibited(f"{host} port {port}: " + "; ".join(refused[:3]))
        if len(self._memo) >= MEMO_SIZE:
            self._memo.clear()
        result = (allowed, batch.notes)
        self._memo[memo_key] = (batch, given, check, active, result)
        return result

    def forget(self) -> None:
        """Drop remembered candidates (a reload may change what the checks answer)."""
        self._memo.clear()

    def _synthesized(
        self, addrs: tuple[IPAddress, ...], policy: EgressPolicy
    ) -> tuple[IPAddress, ...]:
        prefix = self._synthesis(policy)
        if prefix is None:
            return addrs
        return tuple(
            synthesize(a, prefix) if isinstance(a, ipaddress.IPv4Address) else a for a in addrs
        )

    async def _stream(
        self,
        host: str,
        port: int,
        policy: EgressPolicy,
        check: DestinationCheck | None,
    ) -> AsyncGenerator[Arrival, None]:
        """Candidates as the answers arrive: each batch filtered and ordered by the policy
        and checked by the destination policy; only non-empty batches are yielded. When no
        batch had a usable address, the error says why (family or policy)."""
        policy = self._effective(policy)
        families, fallback_only = self.families(policy)
        seen: list[IPAddress] = []
        refused: list[str] = []
        given = False
        batches = self.resolver.arrivals(
            host, families, policy.resolution_delay, fallback_only=fallback_only
        )
        async for batch in batches:
            addrs = self._synthesized(batch.addrs, policy)
            seen.extend(addrs)
            try:
                ordered = order_addresses(host, addrs, policy)
            except DestinationNotFound:
                continue
            allowed = self._allowed(ordered, port, policy, check, refused)
            if allowed:
                given = True
                yield allowed, batch.notes
        if not given:
            order_addresses(host, seen, policy)  # raises DestinationNotFound
            raise DestinationProhibited(f"{host} port {port}: " + "; ".join(refused[:3]))

    def _allowed(
        self,
        candidates: list[tuple[IPAddress, Family]],
        port: int,
        policy: EgressPolicy,
        check: DestinationCheck | None,
        refused: list[str],
    ) -> list[tuple[IPAddress, Family]]:
        checks = [c for c in (self.check, check) if c is not None]
        if not checks:
            return candidates
        allowed = []
        for addr, fam in candidates:
            # A NAT64 address is checked as the IPv4 address it stands for.
            target: IPAddress = (self.embedded(addr, policy) or addr) if fam == "nat64" else addr
            reason = next((r for c in checks if (r := c(target, port))), None)
            if reason:
                refused.append(f"{target}: {reason}")
            else:
                allowed.append((addr, fam))
        return allowed

    def _via(self, addr: IPAddress, fam: Family, policy: EgressPolicy) -> str:
        if fam != "nat64":
            return ""
        inner = self.embedded(addr, policy)
        return str(inner) if inner is not None else ""

    async def race(
        self,
        host: str,
        port: int,
        candidates: list[tuple[IPAddress, Family]],
        policy: EgressPolicy,
        more: AsyncGenerator[Arrival, None] | None = None,
        source: Source | None = None,
    ) -> Upstream:
        """RFC 8305 section 5: staggered attempts; the first to connect wins. ``more``
        gives candidates that arrive later (section 4: they join the list of addresses
        not yet tried, in the policy's order)."""
        upstream = await self._race(host, port, candidates, policy, more, source)
        if source is not None:
            addr = ip_literal(upstream.address)
            if addr is not None and source.plan.covers(_version(addr)):
                upstream.source = upstream.conn.local[0]
        return upstream

    async def _race(
        self,
        host: str,
        port: int,
        candidates: list[tuple[IPAddress, Family]],
        policy: EgressPolicy,
        more: AsyncGenerator[Arrival, None] | None,
        source: Source | None,
    ) -> Upstream:
        policy = self._effective(policy)
        start = self.clock()
        attempts: list[Attempt] = []
        if len(candidates) == 1 and more is None:
            # Nothing to race: connect in this task (no attempt task to start and collect,
            # which under load costs event-loop turns of a few milliseconds each).
            addr, fam = candidates[0]
            via = self._via(addr, fam, policy)
            try:
                async with asyncio.timeout(policy.connect_timeout):
                    conn = await _open(addr, port, source)
            except Exception as error:  # noqa: BLE001 - classified like a raced attempt's
                attempts.append(_failed(addr, port, fam, self.clock() - start, error, via))
                return self._fail(host, port, attempts, policy)
            elapsed = self.clock() - start
            attempts.append(Attempt(str(addr), port, fam, "connected", elapsed, via=via))
            return Upstream(conn, str(addr), port, fam, tuple(attempts), elapsed, via=via)
        running: dict[asyncio.Task[Conn], tuple[IPAddress, Family, float]] = {}
        queue = list(candidates)
        notes: list[str] = []
        arrival: asyncio.Future[Arrival] | None = (
            asyncio.ensure_future(anext(more)) if more is not None else None
        )
        tried: set[IPAddress] = set()
        last_launch = self.clock()

        def launch() -> None:
            nonlocal last_launch
            addr, fam = queue.pop(0)
            tried.add(addr)
            task = asyncio.ensure_future(_open(addr, port, source))
            running[task] = (addr, fam, self.clock())
            last_launch = self.clock()

        def join(batch: list[tuple[IPAddress, Family]]) -> None:
            fresh = [c for c in batch if c[0] not in tried and c not in queue]
            if fresh:
                rest = order_addresses(host, [a for a, _ in queue + fresh], policy)
                queue[:] = rest

        launch()
        try:
            async with asyncio.timeout(policy.connect_timeout):
                while running or (arrival is not None and queue == []):
                    if not running and not queue:
                        # Every attempt so far failed: wait for the next answer.
                        assert arrival is not None
                        await asyncio.wait([arrival])
                    wait_for = None
                    if queue:
                        wait_for = max(0.0, policy.attempt_delay - (self.clock() - last_launch))
                    waiting: set[asyncio.Future[Any]] = set(running)
                    if arrival is not None:
                        waiting.add(arrival)
                    finished, _ = await asyncio.wait(
                        waiting, timeout=wait_for, return_when=asyncio.FIRST_COMPLETED
                    )
                    if arrival is not None and arrival in finished:
                        finished.discard(arrival)
                        if arrival.exception() is None and more is not None:
                            batch, batch_notes = arrival.result()
                            notes.extend(batch_notes)
                            join(batch)
                            arrival = asyncio.ensure_future(anext(more))
                        else:
                            arrival = None  # StopAsyncIteration, or the other family failed
                    done: set[asyncio.Task[Conn]] = {t for t in running if t in finished}
                    for task in done:
                        addr, fam, began = running.pop(task)
                        elapsed = self.clock() - began
                        via = self._via(addr, fam, policy)
                        exc = task.exception()
                        if exc is None:
                            attempts.append(
                                Attempt(str(addr), port, fam, "connected", elapsed, via=via)
                            )
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
                                        via=self._via(o_addr, o_fam, policy),
                                    )
                                )
                            running.clear()
                            self._drop_losers(done, task)
                            attempts.sort(key=lambda a: a.outcome == "connected")
                            return Upstream(
                                conn,
                                str(addr),
                                port,
                                fam,
                                tuple(attempts),
                                self.clock() - start,
                                via=via,
                                notes=tuple(notes),
                            )
                        attempts.append(_failed(addr, port, fam, elapsed, exc, via))
                        if queue:
                            # A failure starts the next attempt at once.
                            launch()
                    if queue and (
                        not running or self.clock() - last_launch >= policy.attempt_delay
                    ):
                        launch()
        except TimeoutError:
            for task, (addr, fam, began) in running.items():
                task.cancel()
                attempts.append(
                    Attempt(
                        str(addr),
                        port,
                        fam,
                        "timeout",
                        self.clock() - began,
                        "no answer",
                        self._via(addr, fam, policy),
                    )
                )
            running.clear()
        finally:
            for task in running:
                task.cancel()
            if arrival is not None and not arrival.done():
                arrival.cancel()
                await asyncio.wait([arrival])  # the generator is free to close only then
            if more is not None:
                await _close(more)
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


def _failed(
    addr: IPAddress, port: int, fam: Family, elapsed: float, exc: BaseException, via: str = ""
) -> Attempt:
    attempt = _failure(addr, port, fam, elapsed, exc)
    return replace(attempt, via=via) if via else attempt


def _failure(
    addr: IPAddress, port: int, fam: Family, elapsed: float, exc: BaseException
) -> Attempt:
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


async def _open(addr: IPAddress, port: int, source: Source | None = None) -> Conn:
    """One TCP connection to an address (a literal: nothing is resolved here), from the
    source address of its family when ``source`` has one."""
    loop = asyncio.get_running_loop()
    src = source.address(_version(addr)) if source is not None else None
    if src is None:
        family = socket.AF_INET6 if addr.version == 6 else socket.AF_INET
        _transport, conn = await loop.create_connection(Conn, str(addr), port, family=family)
        return conn
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped  # leaves as IPv4, from the IPv4 source
    sock = bound_socket(src)
    try:
        await _connect(loop, sock, (str(addr), port))
        _transport, conn = await loop.create_connection(Conn, sock=sock)
    except BaseException:
        sock.close()
        raise
    return conn


async def _connect(
    loop: asyncio.AbstractEventLoop, sock: socket.socket, address: tuple[str, int]
) -> None:
    """A non-blocking connect of a socket bound beforehand: wait until it is writable and
    read its outcome (``SO_ERROR``). (uvloop's ``sock_connect`` does the same at several
    times the cost per connection.)"""
    err = sock.connect_ex(address)
    if err == errno.EINPROGRESS:
        done: asyncio.Future[None] = loop.create_future()
        fd = sock.fileno()

        def writable() -> None:
            if not done.done():
                done.set_result(None)

        loop.add_writer(fd, writable)
        try:
            await done
        finally:
            loop.remove_writer(fd)
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if err:
        raise OSError(err, os.strerror(err))


def _version(addr: IPAddress) -> int:
    """The IP version a connection to ``addr`` really uses (IPv4-mapped: 4)."""
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return 4
    return addr.version


def datagram_socket(version: int, source: Source | None) -> socket.socket | None:
    """A UDP socket bound to ``source``'s address of ``version`` (SOCKS5 UDP ASSOCIATE's
    outgoing socket), or None when that family has no source."""
    src = source.address(version) if source is not None else None
    return bound_socket(src, socket.SOCK_DGRAM) if src is not None else None


async def _close(stream: AsyncGenerator[Any, None]) -> None:
    try:
        await stream.aclose()
    except Exception:  # noqa: BLE001 - an unfinished lookup's error is not this race's
        pass


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
    "datagram_socket",
    "describe_fallbacks",
    "order_addresses",
]
