"""Asynchronous name resolution: RFC 8305 section 3, record TTLs, stale answers, NAT64.

kushi resolves names itself, with dnspython (``dns.asyncresolver``) on the event loop, the
way ``getaddrinfo`` would but without waiting for both answers:

- ``/etc/hosts`` first (a name listed there is answered from it alone, as glibc's
  ``files`` source does), then the nameservers, search list, ``ndots``, ``timeout`` and
  ``attempts`` of ``/etc/resolv.conf`` (or the ``dns_servers`` of the config). Both files
  are read again when they change, as glibc does. A network namespace's
  ``/etc/netns/NAME/`` files are what ``ip netns exec`` shows as ``/etc``.
- AAAA and A are separate queries sent together (``Resolver.arrivals``): the preferred
  family's answer is handed on as soon as it arrives; when the other family answers first
  it is held for the Resolution Delay (50 ms) and then handed on; an answer that arrives
  later is handed on too, and joins the Happy Eyeballs race in the connector.
- Every answer is cached per name and record type for its TTL (the smallest TTL of the
  CNAME chain and the records), clamped to ``[min_ttl, max_ttl]``; a name without records
  and a name that does not exist are cached for the SOA minimum of the answer (RFC 2308
  section 5). The cache is bounded (least recently used entries go first). An expired
  answer is kept ``stale_ttl`` longer and used only when no nameserver answers
  (RFC 8767); the answer then says so, and the access log does too.
- Errors carry the DNS RCODE (``NXDOMAIN``, ``SERVFAIL``...) into ``Proxy-Status``
  (``error=dns_error; rcode="NXDOMAIN"``, RFC 9209 section 2.3.2).
- ``Nat64`` discovers the NAT64 prefix from ``ipv4only.arpa`` (RFC 7050) and synthesizes
  IPv6 addresses for IPv4 ones (RFC 6052 section 2.2, every prefix length).

Concurrent lookups of one name and type share a single query. No DNS wire format is
written here: dnspython builds and parses every message.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import ipaddress
import logging
import os
import re
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import dns.asyncbackend
import dns.asyncresolver
import dns.exception
import dns.message
import dns.name
import dns.nameserver
import dns.rcode
import dns.rdatatype
import dns.resolver

from kushi.config import NAT64_LENGTHS
from kushi.errors import DNSError, DNSTimeout, KushiError

log = logging.getLogger("kushi")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
RdType = Literal["AAAA", "A"]
MAX_ENTRIES = 4096
#: How often ``/etc/hosts`` and ``/etc/resolv.conf`` are checked for changes, in seconds.
RECHECK = 1.0
WELL_KNOWN_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
#: RFC 7050 section 2.2: the well-known IPv4-only name and its two addresses.
IPV4ONLY_ARPA = "ipv4only.arpa."
IPV4ONLY_ADDRS = (ipaddress.IPv4Address("192.0.0.170"), ipaddress.IPv4Address("192.0.0.171"))


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


@functools.lru_cache(maxsize=4096)
def _literal_batch(addr: IPAddress) -> Batch:
    """One Batch per literal, so the connector's remembered candidates apply to it too."""
    return Batch((addr,))


def unmap(addr: IPAddress) -> IPAddress:
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


# --- NAT64 (RFC 6052, RFC 7050) -----------------------------------------------------------


def synthesize(v4: ipaddress.IPv4Address, prefix: ipaddress.IPv6Network) -> ipaddress.IPv6Address:
    """The IPv4-embedded IPv6 address of ``v4`` under ``prefix`` (RFC 6052 section 2.2:
    bits 64-71 stay zero, the IPv4 bytes go around them; the suffix is zero)."""
    if prefix.prefixlen not in NAT64_LENGTHS:
        raise ValueError(f"{prefix} is not a NAT64 prefix length (RFC 6052: 32-96)")
    out = bytearray(prefix.network_address.packed)
    start = prefix.prefixlen // 8
    pos = start
    for byte in v4.packed:
        if pos == 8:
            pos = 9  # the "u" octet
        out[pos] = byte
        pos += 1
    return ipaddress.IPv6Address(bytes(out))


def extract(addr: ipaddress.IPv6Address, prefix: ipaddress.IPv6Network) -> ipaddress.IPv4Address:
    """The IPv4 address embedded in ``addr`` under ``prefix`` (RFC 6052 section 2.3)."""
    raw = addr.packed
    pos = prefix.prefixlen // 8
    out = bytearray()
    while len(out) < 4:
        if pos == 8:
            pos = 9
        out.append(raw[pos])
        pos += 1
    return ipaddress.IPv4Address(bytes(out))


def discover_prefixes(addrs: Iterable[ipaddress.IPv6Address]) -> list[ipaddress.IPv6Network]:
    """RFC 7050 section 3: the NAT64 prefixes shown by the AAAA records of ipv4only.arpa,
    found by looking for a well-known IPv4 address at each RFC 6052 position."""
    found: list[ipaddress.IPv6Network] = []
    for addr in addrs:
        for length in NAT64_LENGTHS:
            net = ipaddress.IPv6Network((addr, length), strict=False)
            if extract(addr, net) in IPV4ONLY_ADDRS and synthesize(extract(addr, net), net) == (
                addr
            ):
                if net not in found:
                    found.append(net)
                break
    return found


def has_ipv4_route() -> bool:
    """Whether this host has a route to the IPv4 Internet: a UDP ``connect`` (which sends
    nothing) to a documentation address fails with ENETUNREACH when it does not."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))
        except OSError:
            return False
    return True


# --- what the resolver reports --------------------------------------------------------------


class _ConnectedBackend(type(dns.asyncbackend.get_backend("asyncio"))):  # type: ignore[misc]
    """dnspython's asyncio backend with connected UDP sockets, as glibc uses: a nameserver
    that is not there (ICMP port unreachable) fails the query at once instead of after
    the timeout."""

    def datagram_connection_required(self) -> bool:
        return True


_BACKEND = _ConnectedBackend()


class DNSObserver(Protocol):
    """Where lookup times and cache results go (``metrics.Metrics`` is one)."""

    def dns_lookup(self, rdtype: str, seconds: float) -> None: ...

    def dns_cache(self, result: str, count: int = 1) -> None: ...


@dataclass(frozen=True, slots=True)
class Answer:
    """The addresses of one record type for one name (empty: no such records)."""

    addrs: tuple[IPAddress, ...]
    #: Why a stale answer was used (RFC 8767), or "".
    stale: str = ""


@dataclass(frozen=True, slots=True)
class Batch:
    """Addresses handed on to the connection race, in arrival order."""

    addrs: tuple[IPAddress, ...]
    notes: tuple[str, ...] = ()


@dataclass(slots=True)
class _Entry:
    answer: Answer
    error: DNSError | None
    expires: float
    stale_until: float


class HostsFile:
    """``/etc/hosts``, read again when it changes (checked at most once a second)."""

    def __init__(self, path: str, clock: Callable[[], float]) -> None:
        self.path = path
        self.clock = clock
        self.names: dict[str, Batch] = {}
        self._stamp: tuple[float, int] | None = None
        self.checked = -RECHECK

    def lookup(self, name: str, now: float | None = None) -> Batch | None:
        """Every address the hosts file lists for ``name`` (lower case, no final dot)."""
        if now is None:
            now = self.clock()
        if now - self.checked >= RECHECK:
            self.checked = now
            self.reload()
        return self.names.get(name)

    def reload(self) -> None:
        try:
            st = os.stat(self.path)
        except OSError:
            self.names, self._stamp = {}, None
            return
        stamp = (st.st_mtime, st.st_ino)
        if stamp == self._stamp:
            return
        self._stamp = stamp
        names: dict[str, dict[IPAddress, None]] = {}
        try:
            with open(self.path, encoding="utf-8", errors="replace") as f:
                text = f.read()
        except OSError:
            text = ""
        for line in text.splitlines():
            words = line.split("#", 1)[0].split()
            if len(words) < 2:
                continue
            try:
                addr = unmap(ipaddress.ip_address(words[0].split("%")[0]))
            except ValueError:
                continue
            for name in words[1:]:
                names.setdefault(name.lower().rstrip("."), {})[addr] = None
        self.names = {k: Batch(tuple(v)) for k, v in names.items()}


@dataclass(frozen=True, slots=True)
class ResolverSettings:
    """What the config says about resolution (``config.Config`` derives it)."""

    timeout: float = 5.0
    min_ttl: float = 0.0
    max_ttl: float = 3600.0
    stale_ttl: float = 86400.0
    size: int = MAX_ENTRIES
    servers: tuple[tuple[str, int], ...] = ()
    resolv_conf: str = "/etc/resolv.conf"
    hosts_file: str = "/etc/hosts"


class Resolver:
    def __init__(
        self,
        ttl: float | None = None,
        timeout: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        *,
        settings: ResolverSettings | None = None,
    ) -> None:
        if settings is None:
            settings = ResolverSettings(timeout=timeout)
            if ttl is not None:
                settings = ResolverSettings(timeout=timeout, max_ttl=ttl)
        self.settings = settings
        self.timeout = settings.timeout
        self.clock = clock
        self.hosts = HostsFile(settings.hosts_file, clock)
        self.observer: DNSObserver | None = None
        self._cache: collections.OrderedDict[tuple[str, RdType], _Entry] = collections.OrderedDict()
        self._inflight: dict[tuple[str, RdType], asyncio.Task[_Entry]] = {}
        self._fast: dict[tuple[str, tuple[RdType, ...]], tuple[float, Batch]] = {}
        self._dns: dns.asyncresolver.Resolver | None = None
        self._conf_stamp: tuple[float, int] | None = None
        self._conf_checked = -RECHECK
        self._lifetime = settings.timeout
        #: Stale answers already reported, so the log says it once per name and expiry.
        self._stale_logged: set[tuple[str, RdType, float]] = set()
        self.lookups = 0

    # -- public ----------------------------------------------------------------------------

    async def resolve(self, host: str) -> tuple[IPAddress, ...]:
        """Every address of ``host`` (AAAA then A answers), duplicates removed."""
        addrs: list[IPAddress] = []
        async for batch in self.arrivals(host, ("AAAA", "A"), delay=None):
            addrs.extend(batch.addrs)
        return tuple(dict.fromkeys(addrs))

    def cached(self, host: str, families: tuple[RdType, ...]) -> Batch | None:
        """The answer for ``host`` without waiting, when it is a literal, ``/etc/hosts``
        lists it, or fresh cache entries of every family in ``families`` give it (one dict
        look-up per family)."""
        literal = ip_literal(host)
        if literal is not None:
            return _literal_batch(literal)
        key = host.lower().rstrip(".")
        now = self.clock()
        hosts = self.hosts  # HostsFile.lookup, inlined: every request passes here
        if now - hosts.checked >= RECHECK:
            hosts.checked = now
            hosts.reload()
        listed = hosts.names.get(key)
        if listed is not None:
            # Every address the hosts file lists: the egress policy filters by family and
            # says what the name has when nothing of the wanted family is left.
            return listed
        fast_key = (key, families)
        fast = self._fast.get(fast_key)
        if fast is not None and fast[0] > now:
            if self.observer is not None:
                self.observer.dns_cache("hit", len(families))
            return fast[1]
        addrs: tuple[IPAddress, ...] = ()
        notes: list[str] = []
        expires = float("inf")
        for rdtype in families:
            entry = self._cache.get((key, rdtype))
            if entry is None or entry.expires <= now or entry.error is not None:
                return None
            addrs += entry.answer.addrs
            expires = min(expires, entry.expires)
            if entry.answer.stale:
                notes.append(f"stale DNS answer for {host} ({entry.answer.stale})")
        if not addrs:
            return None
        if self.observer is not None:
            self.observer.dns_cache("hit", len(families))
        batch = Batch(addrs, tuple(notes))
        # The families' answers joined, until the first of them expires: one look-up for
        # the next request (the entries change only once expired).
        if len(self._fast) >= self.settings.size:
            self._fast.clear()
        self._fast[fast_key] = (expires, batch)
        return batch

    async def arrivals(
        self,
        host: str,
        families: tuple[RdType, ...],
        delay: float | None = 0.05,
        *,
        fallback_only: bool = False,
    ) -> AsyncIterator[Batch]:
        """RFC 8305 section 3: query every family of ``families`` at once (the first is the
        preferred one) and yield their addresses as they should join the race.

        An answer of another family that arrives before the preferred one is held for
        ``delay`` seconds (None: until the preferred answer arrives); ``fallback_only``
        uses the other families only when the preferred one has no address (ipv6-only
        behind NAT64: the A records are wanted only for synthesis). Raises the most
        telling DNS error when no family gives an address."""
        fast = self.cached(host, families)
        if fast is not None:
            yield fast
            return
        key = host.lower().rstrip(".")
        if not key or len(key) > 253:
            raise DNSError(f"{host!r} is not a valid host name")
        loop = asyncio.get_running_loop()
        tasks = {rd: asyncio.ensure_future(self.lookup(key, rd)) for rd in families}
        order = {task: rd for rd, task in tasks.items()}
        preferred = tasks[families[0]]
        pending: set[asyncio.Task[Answer]] = set(tasks.values())
        held: list[Answer] = []
        errors: dict[RdType, KushiError] = {}
        given = finished = False
        deadline: float | None = None
        try:
            while pending:
                timeout = None if deadline is None else max(0.0, deadline - loop.time())
                done, pending = await asyncio.wait(
                    pending, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
                )
                out: list[Answer] = []
                if not done:  # the Resolution Delay is over: go on without the preferred
                    out, held, deadline = held, [], None
                for task in sorted(done, key=lambda t: t is not preferred):
                    exc = task.exception()
                    if exc is not None:
                        if not isinstance(exc, KushiError):
                            raise exc
                        errors[order[task]] = exc
                        answer = Answer(())
                    else:
                        answer = task.result()
                    if task is preferred:
                        if fallback_only and answer.addrs:
                            out, held, finished = [answer], [], True
                        else:
                            out += [answer, *held]
                        held, deadline = [], None
                    elif not answer.addrs:
                        continue
                    elif not preferred.done():
                        held.append(answer)
                        if deadline is None and delay is not None and not fallback_only:
                            deadline = loop.time() + delay
                    else:
                        out.append(answer)
                addrs = tuple(a for answer in out for a in answer.addrs)
                if addrs:
                    given = True
                    notes = tuple(
                        f"stale DNS answer for {host} ({answer.stale})"
                        for answer in out
                        if answer.stale
                    )
                    yield Batch(addrs, notes)
                if finished:
                    return
            if held:
                addrs = tuple(a for answer in held for a in answer.addrs)
                given = True
                yield Batch(addrs)
        finally:
            for task in pending:
                task.cancel()  # the shared queries go on and fill the cache
        if not given:
            raise _worst(host, errors)

    async def lookup(self, key: str, rdtype: RdType) -> Answer:
        """One record type of one (lower-case, dot-less) name, from the cache or a query."""
        now = self.clock()
        cache_key = (key, rdtype)
        entry = self._cache.get(cache_key)
        if entry is not None and entry.expires > now:
            self._cache.move_to_end(cache_key)
            self._count("hit")
            return _result(entry)
        task = self._inflight.get(cache_key)
        if task is None:
            self._count("miss")
            task = asyncio.ensure_future(self._query(key, rdtype, entry))
            self._inflight[cache_key] = task
            task.add_done_callback(lambda t: self._done(cache_key, t))
        return _result(await asyncio.shield(task))

    # -- internals ---------------------------------------------------------------------------

    def _done(self, key: tuple[str, RdType], task: asyncio.Task[_Entry]) -> None:
        self._inflight.pop(key, None)
        if not task.cancelled():
            task.exception()  # retrieved: every waiter may have moved on (a lost AAAA)

    def _count(self, result: str) -> None:
        if self.observer is not None:
            self.observer.dns_cache(result, 1)

    def _store(self, key: tuple[str, RdType], entry: _Entry) -> None:
        cache = self._cache
        cache[key] = entry
        cache.move_to_end(key)
        while len(cache) > self.settings.size:
            cache.popitem(last=False)

    def _system(self) -> dns.asyncresolver.Resolver:
        """The dnspython resolver, built again when resolv.conf changes."""
        now = self.clock()
        if self._dns is not None and now - self._conf_checked < RECHECK:
            return self._dns
        self._conf_checked = now
        path = self.settings.resolv_conf
        try:
            st = os.stat(path)
            stamp: tuple[float, int] | None = (st.st_mtime, st.st_ino)
        except OSError:
            stamp = None
        if self._dns is not None and stamp == self._conf_stamp:
            return self._dns
        self._conf_stamp = stamp
        res = dns.asyncresolver.Resolver(configure=False)
        attempts = 2
        if stamp is not None:
            try:
                res.read_resolv_conf(path)
            except (dns.resolver.NoResolverConfiguration, OSError, ValueError) as exc:
                log.warning("%s: %s", path, exc)
            attempts = _attempts(path)
        if self.settings.servers:
            res.nameservers = [
                dns.nameserver.Do53Nameserver(host, port) for host, port in self.settings.servers
            ]
        elif not res.nameservers:
            res.nameservers = ["127.0.0.1", "::1"]  # glibc's default without a resolv.conf
        res.cache = None
        res.use_search_by_default = True
        servers = max(1, len(res.nameservers))
        self._lifetime = min(self.settings.timeout, res.timeout * attempts * servers)
        res.lifetime = self._lifetime
        self._dns = res
        return res

    async def _query(self, key: str, rdtype: RdType, old: _Entry | None) -> _Entry:
        self.lookups += 1
        res = self._system()
        start = time.perf_counter()
        settings = self.settings
        error: DNSError | None = None
        addrs: tuple[IPAddress, ...] = ()
        try:
            answer = await res.resolve(
                key + ("." if key.endswith(".arpa") else ""),
                rdtype,
                raise_on_no_answer=False,
                search=True,
                backend=_BACKEND,
            )
            ttl = max(0.0, answer.expiration - time.time())
            if answer.rrset is not None:
                addrs = tuple(
                    dict.fromkeys(unmap(ipaddress.ip_address(r.address)) for r in answer.rrset)
                )
        except dns.resolver.NXDOMAIN as exc:
            error = DNSError(f"{key} does not exist (NXDOMAIN)", rcode="NXDOMAIN")
            ttl = _negative_ttl(exc)
        except (dns.resolver.LifetimeTimeout, dns.exception.Timeout):
            return self._unreachable(
                key,
                rdtype,
                old,
                DNSTimeout(f"no answer for {key} ({rdtype}) within {self._lifetime:g} s"),
                start,
            )
        except dns.resolver.NoNameservers as exc:
            rcode, text = _server_errors(exc)
            return self._unreachable(
                key,
                rdtype,
                old,
                DNSError(f"resolving {key} ({rdtype}) failed: {text}", rcode=rcode),
                start,
            )
        except (dns.name.NameTooLong, dns.name.LabelTooLong, dns.name.EmptyLabel, UnicodeError):
            error = DNSError(f"{key!r} is not a valid host name")
            ttl = 0.0
        except dns.exception.DNSException as exc:
            return self._unreachable(
                key, rdtype, old, DNSError(f"resolving {key} ({rdtype}) failed: {exc}"), start
            )
        self._observe(rdtype, start)
        ttl = min(max(ttl, settings.min_ttl), settings.max_ttl)
        now = self.clock()
        entry = _Entry(Answer(addrs), error, now + ttl, now + ttl + settings.stale_ttl)
        if ttl > 0 or settings.stale_ttl > 0:
            self._store((key, rdtype), entry)
        return entry

    def _observe(self, rdtype: str, start: float) -> None:
        if self.observer is not None:
            self.observer.dns_lookup(rdtype, time.perf_counter() - start)

    def _unreachable(
        self, key: str, rdtype: RdType, old: _Entry | None, exc: KushiError, start: float
    ) -> _Entry:
        """No nameserver answered: an expired answer within its stale time is used
        (RFC 8767 section 4), for 30 s before the next try; otherwise the error."""
        self._observe(rdtype, start)
        now = self.clock()
        if old is not None and old.error is None and old.stale_until > now and old.answer.addrs:
            reason = f"nameservers unreachable: {exc.details}"
            stamp = (key, rdtype, old.expires)
            if stamp not in self._stale_logged:
                self._stale_logged.add(stamp)
                if len(self._stale_logged) > self.settings.size:
                    self._stale_logged.clear()
                log.warning("using stale %s answer for %s (%s)", rdtype, key, reason)
            self._count("stale")
            entry = _Entry(Answer(old.answer.addrs, reason), None, now + 30.0, old.stale_until)
            self._store((key, rdtype), entry)
            return entry
        raise exc


def _result(entry: _Entry) -> Answer:
    if entry.error is not None:
        err = entry.error
        raise type(err)(err.details, rcode=err.rcode)
    return entry.answer


def _worst(host: str, errors: dict[RdType, KushiError]) -> KushiError:
    """The error to report when no family gave an address."""
    values = list(errors.values())
    for exc in values:
        if isinstance(exc, DNSError) and exc.rcode == "NXDOMAIN":
            return DNSError(f"{host} does not exist (NXDOMAIN)", rcode="NXDOMAIN")
    if values:
        first = values[0]
        if isinstance(first, DNSError):
            return DNSError(first.details, rcode=first.rcode)
        return type(first)(first.details)
    return DNSError(f"{host} has no address records (no A or AAAA)", rcode="NOERROR")


def _negative_ttl(exc: dns.resolver.NXDOMAIN) -> float:
    """RFC 2308 section 5: the SOA record's TTL, capped by its minimum field; no SOA, no
    caching."""
    ttl = 0.0
    responses: dict[Any, dns.message.Message] = exc.kwargs.get("responses") or {}
    for response in responses.values():
        for rrset in response.authority:
            if rrset.rdtype == dns.rdatatype.SOA:
                ttl = max(ttl, float(min(rrset.ttl, rrset[0].minimum)))
    return ttl


def _server_errors(exc: dns.resolver.NoNameservers) -> tuple[str | None, str]:
    """The RCODE the nameservers answered (if they answered) and a short text."""
    rcode = None
    texts = []
    for item in exc.kwargs.get("errors") or []:
        server, err = item[0], item[3]
        response = item[4] if len(item) > 4 else None
        if isinstance(response, dns.message.Message):
            rcode = dns.rcode.to_text(response.rcode())
        elif isinstance(err, str) and re.fullmatch(r"[A-Z]+", err):
            rcode = err
        where = str(server).removeprefix("Do53:")
        if isinstance(err, OSError):
            texts.append(f"{where}: {(err.strerror or type(err).__name__).lower()}")
        else:
            texts.append(f"{where} answered {err}")
    return rcode, "; ".join(dict.fromkeys(texts)) or "no nameserver answered"


def _attempts(path: str) -> int:
    """``options attempts:N`` of resolv.conf (dnspython reads every other option)."""
    attempts = 2
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                words = line.split()
                if words and words[0] == "options":
                    for opt in words[1:]:
                        if opt.startswith("attempts:") and opt[9:].isdigit():
                            attempts = max(1, min(5, int(opt[9:])))
    except OSError:
        pass
    return attempts


@dataclass(slots=True)
class Nat64:
    """The NAT64 prefix kushi synthesizes addresses with, and whether it does.

    ``mode``: ``on`` (always, for IPv4 literals and names with only A records), ``off``
    (never) or ``auto`` (only on a host without an IPv4 route). ``prefix`` is the
    configured one; without it the prefix is discovered from ipv4only.arpa (RFC 7050) at
    start and again every ``interval`` seconds (``refresh``)."""

    mode: Literal["auto", "on", "off"] = "auto"
    prefix: ipaddress.IPv6Network | None = None
    interval: float = 600.0
    discovered: list[ipaddress.IPv6Network] = field(default_factory=list)
    ipv4_route: bool = True
    checked: bool = False
    #: The prefix to synthesize with now, or None (derived by ``update``: every request
    #: reads it).
    active: ipaddress.IPv6Network | None = field(default=None, init=False)
    #: Every prefix known to be NAT64 here (configured and discovered).
    prefixes: tuple[ipaddress.IPv6Network, ...] = field(default=(), init=False)

    def __post_init__(self) -> None:
        self.update()

    def update(self) -> None:
        known = [self.prefix] if self.prefix is not None else []
        self.prefixes = tuple(known + [p for p in self.discovered if p not in known])
        if self.mode == "off" or (self.mode == "auto" and self.ipv4_route):
            self.active = None
        else:
            self.active = self.prefixes[0] if self.prefixes else None

    async def refresh(self, resolver: Resolver) -> None:
        """Check the IPv4 route and (without a configured prefix) rediscover the prefix."""
        self.ipv4_route = has_ipv4_route()
        self.checked = True
        self.update()
        if self.mode == "off" or self.prefix is not None:
            return
        if self.mode == "auto" and self.ipv4_route:
            return
        try:
            answer = await resolver.lookup(IPV4ONLY_ARPA.rstrip("."), "AAAA")
        except KushiError as exc:
            log.info("NAT64 prefix discovery (ipv4only.arpa): %s", exc.details)
            return
        found = discover_prefixes(a for a in answer.addrs if isinstance(a, ipaddress.IPv6Address))
        if found != self.discovered:
            log.info(
                "NAT64 prefix %s (from ipv4only.arpa)",
                ", ".join(str(p) for p in found) or "gone",
            )
        self.discovered = found
        self.update()
