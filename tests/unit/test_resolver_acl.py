"""The resolver cache and host-name allow-list entries, against the real system resolver.

``localhost`` is in every /etc/hosts, so these use getaddrinfo for real; the clock is passed
in, so cache lifetimes are checked without sleeping.
"""

from __future__ import annotations

import asyncio
import ipaddress

import pytest

from kushi.acl import AllowList
from kushi.config import parse_network
from kushi.errors import DNSError
from kushi.resolver import Resolver, ip_literal


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


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


def test_answers_are_cached_for_their_lifetime_then_asked_again() -> None:
    async def main() -> None:
        clock = Clock()
        resolver = Resolver(ttl=30.0, clock=clock)
        first = await resolver.resolve("localhost")
        assert ipaddress.ip_address("127.0.0.1") in first
        await resolver.resolve("LOCALHOST.")  # same name, other spelling: still cached
        assert resolver.lookups == 1
        clock.now += 29.0
        await resolver.resolve("localhost")
        assert resolver.lookups == 1
        clock.now += 2.0  # past the lifetime
        await resolver.resolve("localhost")
        assert resolver.lookups == 2

    asyncio.run(main())


def test_concurrent_lookups_of_one_name_share_one_query() -> None:
    async def main() -> None:
        resolver = Resolver(ttl=30.0)
        answers = await asyncio.gather(*(resolver.resolve("localhost") for _ in range(20)))
        assert len(set(answers)) == 1
        assert resolver.lookups == 1

    asyncio.run(main())


def test_failures_are_cached_briefly_and_reported_as_dns_error() -> None:
    async def main() -> None:
        clock = Clock()
        resolver = Resolver(ttl=30.0, clock=clock)
        for _ in range(3):
            with pytest.raises(DNSError, match="nonexistent.invalid"):
                await resolver.resolve("nonexistent.invalid")
        assert resolver.lookups == 1
        clock.now += 6.0  # past the 5 s negative lifetime
        with pytest.raises(DNSError):
            await resolver.resolve("nonexistent.invalid")
        assert resolver.lookups == 2

    asyncio.run(main())


def test_ttl_zero_disables_the_cache() -> None:
    async def main() -> None:
        resolver = Resolver(ttl=0.0)
        await resolver.resolve("localhost")
        await resolver.resolve("localhost")
        assert resolver.lookups == 2

    asyncio.run(main())


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
