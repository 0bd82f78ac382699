"""Who may use a listener, and where kushi may connect.

``AllowList`` admits clients by CIDR or by host name; names (the owner's dynamic-DNS name
at home) are re-resolved by ``refresh()``, which the server calls periodically. Every check
treats an IPv4-mapped IPv6 address as the IPv4 address it carries, so
``::ffff:198.51.100.7`` cannot slip past a rule written for ``198.51.100.7``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from kushi.config import IPNetwork, parse_destination_rule, parse_network
from kushi.errors import KushiError
from kushi.resolver import IPAddress, Resolver, ip_literal

log = logging.getLogger("kushi.acl")


def client_address(text: str) -> IPAddress | None:
    return ip_literal(text.split("%")[0])


def in_networks(addr: IPAddress, networks: Iterable[IPNetwork]) -> bool:
    return any(addr.version == net.version and addr in net for net in networks)


class AllowList:
    def __init__(self, entries: Iterable[str]) -> None:
        self.networks: list[IPNetwork] = []
        self.names: list[str] = []
        for entry in entries:
            try:
                self.networks.append(parse_network("allow", entry))
            except KushiError:
                self.names.append(entry)
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
PRIVATE_RANGES: tuple[str, ...] = (
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "100.64.0.0/10",
    "fc00::/7",
)


class DestinationPolicy:
    """Where a forward listener may connect, checked on every resolved address.

    Order: ``allow_destinations`` (exceptions), then ``deny_destinations``, then the
    built-in refusals (loopback, link-local and cloud metadata, unspecified, multicast),
    then the private ranges when ``private_destinations = "deny"``."""

    def __init__(self, allow: Iterable[str], deny: Iterable[str], private: str = "allow") -> None:
        self.allow = [parse_destination_rule("allow_destinations", e) for e in allow]
        self.deny = [parse_destination_rule("deny_destinations", e) for e in deny]
        self.builtin = [(parse_network("builtin", n), why) for n, why in DEFAULT_DENY]
        self.private = (
            [parse_network("builtin", n) for n in PRIVATE_RANGES] if private == "deny" else []
        )

    def __call__(self, addr: IPAddress, port: int) -> str | None:
        for net, ports in self.allow:
            if addr.version == net.version and addr in net and (not ports or port in ports):
                return None
        for net, ports in self.deny:
            if addr.version == net.version and addr in net and (not ports or port in ports):
                return f"denied by deny_destinations ({net})"
        for net, why in self.builtin:
            if addr.version == net.version and addr in net:
                return f"{why} (allow it with allow_destinations)"
        if in_networks(addr, self.private):
            return "a private address (private_destinations = deny)"
        return None


__all__ = ["AllowList", "DestinationPolicy", "client_address", "in_networks"]
