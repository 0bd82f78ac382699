"""Who may use a listener, and where kushi may connect.

``AllowList`` admits clients by CIDR or by host name; names (the owner's dynamic-DNS name
at home) are re-resolved by ``refresh()``, which the server calls periodically. Every check
treats an IPv4-mapped IPv6 address as the IPv4 address it carries, so
``::ffff:198.51.100.7`` cannot slip past a rule written for ``198.51.100.7``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from kushi.config import IPNetwork, parse_network
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

    @property
    def admits_everyone(self) -> bool:
        return any(net.prefixlen == 0 for net in self.networks)

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


__all__ = ["AllowList", "client_address", "in_networks"]
