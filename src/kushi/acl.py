"""Who may use a listener, and where kushi may connect.

``AllowList`` admits clients by CIDR or by host name; names (the owner's dynamic-DNS name
at home) are re-resolved by ``refresh()``, which the server calls periodically. Every check
treats an IPv4-mapped IPv6 address as the IPv4 address it carries, so
``::ffff:198.51.100.7`` cannot slip past a rule written for ``198.51.100.7``.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
from collections.abc import Iterable

from kushi.config import AllowEntry, DestinationRule, IPNetwork, parse_network
from kushi.errors import KushiError
from kushi.resolver import IPAddress, Resolver, ip_literal

log = logging.getLogger("kushi.acl")


def client_address(text: str) -> IPAddress | None:
    return ip_literal(text.split("%")[0])


@functools.lru_cache(maxsize=4096)
def client_key(text: str) -> str:
    """Who counts as one client for the per-client limits: an IPv4 address, or the /64 an
    IPv6 address is in (one customer's network gets a /64 or more, so a client that owns
    one has 2**64 addresses to spread over)."""
    addr = client_address(text)
    if isinstance(addr, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((addr, 64), strict=False))
    return str(addr) if addr is not None else text


def in_networks(addr: IPAddress, networks: Iterable[IPNetwork]) -> bool:
    return any(addr.version == net.version and addr in net for net in networks)


class AllowList:
    def __init__(self, entries: Iterable[AllowEntry]) -> None:
        entries = tuple(entries)
        self.networks: list[IPNetwork] = [e for e in entries if not isinstance(e, str)]
        self.names: list[str] = [e for e in entries if isinstance(e, str)]
        self.resolved: dict[str, frozenset[IPAddress]] = {name: frozenset() for name in self.names}

    def allows(self, addr: IPAddress | None) -> bool:
        if addr is None:
            return False
        if in_networks(addr, self.networks):
            return True
        return any(addr in addrs for addrs in self.resolved.values())

    async def refresh(self, resolver: Resolver) -> None:
        """Re-resolve the host-name entries; a failed lookup keeps the previous answer."""
        for name in self.names:
            try:
                addrs = frozenset(await resolver.resolve(name))
            except KushiError as exc:
                log.warning("allow list: could not resolve %s: %s", name, exc.details)
                continue
            if addrs != self.resolved.get(name):
                log.info("allow list: %s is now %s", name, ", ".join(sorted(map(str, addrs))))
            self.resolved[name] = addrs

    def describe(self) -> str:
        return ", ".join([str(n) for n in self.networks] + self.names) or "(nobody)"


# RFC 6890 special-purpose ranges a forward proxy must not reach on a stranger's behalf.
DEFAULT_DENY: tuple[tuple[str, str], ...] = (
    ("127.0.0.0/8", "a loopback address"),
    ("::1/128", "a loopback address"),
    ("169.254.169.254/32", "the cloud metadata address"),
    ("fd00:ec2::254/128", "the cloud metadata address"),
    ("169.254.0.0/16", "a link-local address"),
    ("fe80::/10", "a link-local address"),
    ("0.0.0.0/8", "an unspecified address"),
    ("::/128", "an unspecified address"),
    ("224.0.0.0/4", "a multicast address"),
    ("ff00::/8", "a multicast address"),
    ("240.0.0.0/4", "a reserved address"),
)
#: The networks of a site or a provider, never the public internet: refused by default
#: (``private_destinations = "allow"`` lets a forward listener reach them). The
#: documentation ranges (192.0.2.0/24, 198.51.100.0/24, 203.0.113.0/24, 2001:db8::/32)
#: are not in this list: no host's real network uses them.
PRIVATE_RANGES: tuple[str, ...] = (
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "100.64.0.0/10",  # CGNAT (RFC 6598), also 100.100.100.200, a cloud metadata address
    "198.18.0.0/15",  # benchmarking (RFC 2544), used inside data centres
    "fc00::/7",  # unique local (RFC 4193)
    "fec0::/10",  # site-local (deprecated, RFC 3879)
)
_WELL_KNOWN_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")  # RFC 6052
_LOCAL_NAT64 = ipaddress.IPv6Network("64:ff9b:1::/48")  # RFC 8215
_6TO4 = ipaddress.IPv6Network("2002::/16")  # RFC 3056
_TEREDO = ipaddress.IPv6Network("2001::/32")  # RFC 4380
_V4_COMPATIBLE = ipaddress.IPv6Network("::/96")  # RFC 4291 2.5.5.1 (deprecated)
#: RFC 6052 section 2.2: the bit positions of the IPv4 address for each prefix length
#: (bits 64-71, the "u" octet, are skipped).
_RFC6052_LENGTHS = (32, 40, 48, 56, 64, 96)


def _rfc6052_ipv4(addr: ipaddress.IPv6Address, prefixlen: int) -> ipaddress.IPv4Address:
    value = int(addr)
    if prefixlen == 96:
        return ipaddress.IPv4Address(value & 0xFFFFFFFF)
    bits = format(value, "0128b")
    v4 = (bits[prefixlen:64] + bits[72:])[:32]
    return ipaddress.IPv4Address(int(v4, 2))


def embedded_ipv4(
    addr: IPAddress, nat64_prefixes: Iterable[ipaddress.IPv6Network] = ()
) -> list[tuple[ipaddress.IPv4Address, str]]:
    """Every IPv4 address that a packet to ``addr`` may end up at, and how.

    A NAT64 gateway (the well-known prefix, the local-use 64:ff9b:1::/48 and the configured
    ones), a 6to4 relay, a Teredo relay or an IPv4-compatible address hands the packet to
    the IPv4 address inside it, so that address is what the destination rules must judge."""
    if isinstance(addr, ipaddress.IPv4Address):
        return []
    found: list[tuple[ipaddress.IPv4Address, str]] = []
    if addr.ipv4_mapped is not None:
        found.append((addr.ipv4_mapped, "IPv4-mapped"))
    for prefix in (_WELL_KNOWN_NAT64, *nat64_prefixes):
        if addr in prefix:
            found.append((_rfc6052_ipv4(addr, min(prefix.prefixlen, 96)), f"NAT64 {prefix}"))
    if addr in _LOCAL_NAT64:
        # Any prefix length inside the local-use /48 may be in use: judge every layout.
        for length in _RFC6052_LENGTHS:
            if length >= 48:
                found.append((_rfc6052_ipv4(addr, length), f"NAT64 {_LOCAL_NAT64}"))
    if addr.sixtofour is not None:
        found.append((addr.sixtofour, "6to4"))
    if addr.teredo is not None:
        server, client = addr.teredo
        found.append((client, "Teredo"))
        found.append((server, "Teredo server"))
    if addr in _V4_COMPATIBLE:
        found.append((ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF), "IPv4-compatible"))
    return found


def forwards_by_client_choice(mode: str) -> bool:
    """Whether a listener connects where its clients say (forward, SOCKS): the destination
    policy guards those. Reverse and TCP backends are the owner's own choice."""
    return mode not in ("reverse", "tcp")


def local_addresses() -> frozenset[IPAddress]:
    """This host's own addresses (every interface), read from /proc on Linux: a web page
    in the owner's browser must not reach services bound to 0.0.0.0 through the proxy."""
    found: set[IPAddress] = set()
    try:
        with open("/proc/net/if_inet6", encoding="ascii") as fh:
            for line in fh:
                field = line.split()[0] if line.strip() else ""
                if len(field) == 32:
                    found.add(ipaddress.IPv6Address(int(field, 16)))
    except OSError:
        pass
    try:
        with open("/proc/net/fib_trie", encoding="ascii") as fh:
            previous = ""
            for line in fh:
                if "/32 host LOCAL" in line and previous.strip().startswith("|--"):
                    found.add(ipaddress.IPv4Address(previous.strip()[3:].strip()))
                previous = line
    except (OSError, ValueError):
        pass
    return frozenset(found)


class DestinationPolicy:
    """Where a forward (or SOCKS) listener may connect: ONE function of the final address,
    applied to every connection kushi opens or takes from the pool.

    Order: ``allow_destinations`` (exceptions), then ``deny_destinations``, then the
    built-in refusals (loopback, link-local and cloud metadata, unspecified, multicast),
    then, unless ``private_destinations = "allow"``, the private ranges and this host's own
    addresses. An IPv6 address that carries an IPv4 address (NAT64, 6to4, Teredo,
    IPv4-compatible) is refused when the IPv4 address inside it would be."""

    def __init__(
        self,
        allow: Iterable[DestinationRule],
        deny: Iterable[DestinationRule],
        private: str = "deny",
        nat64_prefixes: Iterable[ipaddress.IPv6Network] = (),
        own: Iterable[IPAddress] = (),
    ) -> None:
        self.allow = tuple(allow)
        self.deny = tuple(deny)
        self.builtin = [(parse_network("builtin", n), why) for n, why in DEFAULT_DENY]
        self.private_denied = private == "deny"
        self.private = (
            [parse_network("builtin", n) for n in PRIVATE_RANGES] if self.private_denied else []
        )
        self.nat64_prefixes = tuple(nat64_prefixes)
        self.own: frozenset[IPAddress] = frozenset(own) if self.private_denied else frozenset()

    def __call__(self, addr: IPAddress, port: int) -> str | None:
        reason = self._check(addr, port)
        if reason is not None or self._allowed(addr, port):
            return reason
        for inner, how in embedded_ipv4(addr, self.nat64_prefixes):
            why = self._check(inner, port)
            if why is not None:
                return f"it carries {inner} ({how}), {why}"
        return None

    def _allowed(self, addr: IPAddress, port: int) -> bool:
        return any(rule.covers(addr, port) for rule in self.allow)

    def _check(self, addr: IPAddress, port: int) -> str | None:
        if self._allowed(addr, port):
            return None
        for rule in self.deny:
            if rule.covers(addr, port):
                return f"denied by deny_destinations ({rule.network})"
        for net, why in self.builtin:
            if addr.version == net.version and addr in net:
                return f"{why} (allow it with allow_destinations)"
        if in_networks(addr, self.private):
            return "a private address (private_destinations = deny)"
        if addr in self.own:
            return "an address of this host (private_destinations = deny)"
        return None


__all__ = [
    "AllowList",
    "DestinationPolicy",
    "client_address",
    "client_key",
    "embedded_ipv4",
    "forwards_by_client_choice",
    "in_networks",
    "local_addresses",
]
