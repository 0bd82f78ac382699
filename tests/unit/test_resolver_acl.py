"""IP literals and host-name allow-list entries (``localhost`` from /etc/hosts).

The DNS cache itself is tested against a real test DNS server in test_resolver_dns.py.
"""

from __future__ import annotations

import asyncio
import ipaddress

from kushi.acl import AllowList
from kushi.config import parse_network
from kushi.resolver import Resolver, ip_literal


def test_literals_are_not_looked_up_and_mapped_addresses_are_ipv4() -> None:
    async def main() -> None:
        resolver = Resolver()
        assert await resolver.resolve("2001:db8::1") == (ipaddress.ip_address("2001:db8::1"),)
        assert await resolver.resolve("::ffff:198.51.100.7") == (
            ipaddress.ip_address("198.51.100.7"),
        )
        assert resolver.lookups == 0

    asyncio.run(main())
    assert ip_literal("localhost") is None


def test_allow_list_host_names_are_resolved_on_refresh() -> None:
    async def main() -> None:
        allow = AllowList([ipaddress.ip_network("203.0.113.0/24"), "localhost"])
        loopback = ipaddress.ip_address("127.0.0.1")
        assert not allow.allows(loopback)  # not resolved yet
        await allow.refresh(Resolver(ttl=0.0))
        assert allow.allows(loopback)
        assert allow.allows(ipaddress.ip_address("203.0.113.9"))
        assert not allow.allows(ipaddress.ip_address("198.51.100.1"))

    asyncio.run(main())


def test_allow_list_keeps_the_last_answer_when_a_name_stops_resolving() -> None:
    async def main() -> None:
        allow = AllowList(["nonexistent.invalid"])
        previous = frozenset({ipaddress.ip_address("198.51.100.7")})
        allow.resolved["nonexistent.invalid"] = previous
        await allow.refresh(Resolver(ttl=0.0))
        assert allow.resolved["nonexistent.invalid"] == previous

    asyncio.run(main())


def test_mapped_client_addresses_match_ipv4_rules() -> None:
    allow = AllowList([ipaddress.ip_network("198.51.100.0/24")])
    mapped = ip_literal("::ffff:198.51.100.7")
    assert mapped is not None and allow.allows(mapped)
    # The config parses an IPv4-mapped network as the IPv4 network it carries.
    mapped_net = parse_network("allow", "::ffff:198.51.100.0/120")
    assert AllowList([mapped_net]).allows(ipaddress.ip_address("198.51.100.7"))


def test_ip_literal_caches_only_what_could_be_an_address() -> None:
    from kushi import resolver

    assert resolver.ip_literal("::ffff:192.0.2.1") == ipaddress.ip_address("192.0.2.1")
    assert resolver.ip_literal("fe80::1%eth0") == ipaddress.ip_address("fe80::1%eth0")
    before = resolver._ip_literal.cache_info().currsize
    assert resolver.ip_literal("h" * 100 + ".test") is None
    assert resolver._ip_literal.cache_info().currsize == before
