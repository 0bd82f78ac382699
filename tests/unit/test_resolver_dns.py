"""The resolver against a real DNS server on loopback (tests/support/dnsserver.py).

RFC 8305 section 3 (which answer is handed on when), record TTLs clamped, negative caching
from the SOA minimum (RFC 2308), the bounded cache, stale answers only when no nameserver
answers (RFC 8767), RCODEs in errors and in Proxy-Status, /etc/hosts first, and RFC 6052
synthesis / RFC 7050 discovery. The cache clock is passed in, so lifetimes are checked
without sleeping; the answer delays are real, on real sockets.
"""

from __future__ import annotations

import asyncio
import ipaddress
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kushi import http1
from kushi.connector import Connector, EgressPolicy
from kushi.errors import DNSError, DNSTimeout
from kushi.resolver import (
    Nat64,
    Resolver,
    ResolverSettings,
    discover_prefixes,
    extract,
    synthesize,
)
from support.dnsserver import DNSServer

pytestmark = pytest.mark.timeout(30)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Observer:
    def __init__(self) -> None:
        self.cache: list[str] = []
        self.lookups: list[str] = []

    def dns_lookup(self, rdtype: str, seconds: float) -> None:
        self.lookups.append(rdtype)

    def dns_cache(self, result: str, count: int = 1) -> None:
        self.cache.extend([result] * count)


ZONE: dict[str, Any] = {
    "$negative_ttl": 20,
    "dual.test": {"AAAA": ["2001:db8::5"], "A": ["203.0.113.5"], "ttl": 60},
    "slow6.test": {"AAAA": ["2001:db8::6"], "A": ["203.0.113.6"], "delay": {"AAAA": 2.0}},
    "lost6.test": {"AAAA": ["2001:db8::7"], "A": ["203.0.113.7"], "drop": ["AAAA"]},
    "slow4.test": {"AAAA": ["2001:db8::8"], "A": ["203.0.113.8"], "delay": {"A": 2.0}},
    "late6.test": {"AAAA": ["2001:db8::9"], "A": ["203.0.113.9"], "delay": {"AAAA": 0.3}},
    "only4.test": {"A": ["203.0.113.10"]},
    "short.test": {"AAAA": ["2001:db8::11"], "A": ["203.0.113.11"], "ttl": 1},
    "long.test": {"AAAA": ["2001:db8::12"], "ttl": 999999},
    "broken.test": {"rcode": "SERVFAIL"},
    "refused.test": {"rcode": "REFUSED"},
    "ipv4only.arpa": {"AAAA": ["2001:db8:64:ff9b::c000:aa", "2001:db8:64:ff9b::c000:ab"]},
}


@pytest.fixture
def server() -> Iterator[DNSServer]:
    with DNSServer(
        "127.0.0.1", 0, {k: dict(v) if isinstance(v, dict) else v for k, v in ZONE.items()}
    ) as srv:
        yield srv


@pytest.fixture
def hosts(tmp_path: Path) -> Path:
    path = tmp_path / "hosts"
    path.write_text("127.0.0.1 localhost\n::1 localhost\n203.0.113.50 fromhosts.test\n")
    return path


def make(server: DNSServer, hosts: Path, clock: Clock | None = None, **kw: Any) -> Resolver:
    conf = hosts.parent / "resolv.conf"
    conf.write_text("nameserver 127.0.0.1\noptions timeout:5 attempts:1\n")
    settings = ResolverSettings(
        servers=(("127.0.0.1", server.port),),
        hosts_file=str(hosts),
        resolv_conf=str(conf),
        timeout=kw.pop("timeout", 5.0),
        **kw,
    )
    resolver = Resolver(settings=settings, clock=clock or time.monotonic)
    return resolver


async def timed(resolver: Resolver, host: str, **kw: Any) -> list[tuple[float, tuple[str, ...]]]:
    start = time.monotonic()
    out = []
    async for batch in resolver.arrivals(host, kw.pop("families", ("AAAA", "A")), **kw):
        out.append((time.monotonic() - start, tuple(str(a) for a in batch.addrs)))
    return out


# --- RFC 8305 section 3 ---------------------------------------------------------------------


def test_a_fast_aaaa_answer_goes_first_and_both_families_are_asked(
    server: DNSServer, hosts: Path
) -> None:
    got = asyncio.run(timed(make(server, hosts), "dual.test"))
    assert [addrs for _, addrs in got] == [("2001:db8::5", "203.0.113.5")] or [
        addrs for _, addrs in got
    ] == [("2001:db8::5",), ("203.0.113.5",)]
    assert sorted(server.queries) == ["dual.test A", "dual.test AAAA"]


def test_slow_aaaa_ipv4_goes_on_after_the_resolution_delay_and_ipv6_joins_later(
    server: DNSServer, hosts: Path
) -> None:
    got = asyncio.run(timed(make(server, hosts), "slow6.test", delay=0.05))
    assert [addrs for _, addrs in got] == [("203.0.113.6",), ("2001:db8::6",)]
    assert got[0][0] < 0.5, got  # not waiting for the 2 s AAAA answer
    assert got[1][0] >= 1.9, got


def test_lost_aaaa_does_not_hold_up_ipv4(server: DNSServer, hosts: Path) -> None:
    resolver = make(server, hosts, timeout=3.0)

    async def main() -> tuple[float, tuple[str, ...]]:
        start = time.monotonic()
        gen = resolver.arrivals("lost6.test", ("AAAA", "A"), 0.05)
        batch = await anext(gen)
        await gen.aclose()
        return time.monotonic() - start, tuple(str(a) for a in batch.addrs)

    elapsed, addrs = asyncio.run(main())
    assert addrs == ("203.0.113.7",)
    assert elapsed < 0.5


def test_aaaa_within_the_resolution_delay_goes_first(server: DNSServer, hosts: Path) -> None:
    got = asyncio.run(timed(make(server, hosts), "late6.test", delay=1.0))
    # A arrived first and waited (up to 1 s); the AAAA answer 0.3 s later went ahead of it.
    assert [addrs for _, addrs in got] == [("2001:db8::9", "203.0.113.9")]
    assert 0.25 <= got[0][0] < 0.9


def test_slow_a_does_not_hold_up_ipv6(server: DNSServer, hosts: Path) -> None:
    got = asyncio.run(timed(make(server, hosts), "slow4.test"))
    assert [addrs for _, addrs in got] == [("2001:db8::8",), ("203.0.113.8",)]
    assert got[0][0] < 0.5


def test_ipv6_only_never_asks_for_a(server: DNSServer, hosts: Path) -> None:
    got = asyncio.run(timed(make(server, hosts), "slow4.test", families=("AAAA",)))
    assert [addrs for _, addrs in got] == [("2001:db8::8",)]
    assert server.queries == ["slow4.test AAAA"]


def test_fallback_only_uses_a_only_without_aaaa(server: DNSServer, hosts: Path) -> None:
    resolver = make(server, hosts)
    got = asyncio.run(timed(resolver, "only4.test", fallback_only=True))
    assert [addrs for _, addrs in got] == [("203.0.113.10",)]
    got = asyncio.run(timed(resolver, "slow4.test", fallback_only=True))
    assert [addrs for _, addrs in got] == [("2001:db8::8",)]
    assert got[0][0] < 0.5


# --- cache ----------------------------------------------------------------------------------


def test_answers_live_for_their_ttl_clamped(server: DNSServer, hosts: Path) -> None:
    clock = Clock()
    observer = Observer()
    resolver = make(server, hosts, clock, min_ttl=5.0, max_ttl=100.0)
    resolver.observer = observer

    async def main() -> None:
        await resolver.resolve("dual.test")  # TTL 60
        await resolver.resolve("DUAL.test.")
        assert resolver.lookups == 2  # AAAA and A, once
        clock.now += 59.0
        await resolver.resolve("dual.test")
        assert resolver.lookups == 2
        clock.now += 2.0
        await resolver.resolve("dual.test")
        assert resolver.lookups == 4
        await resolver.resolve("short.test")  # TTL 1, raised to the 5 s minimum
        clock.now += 4.0
        await resolver.resolve("short.test")
        assert resolver.lookups == 6
        clock.now += 1.5
        await resolver.resolve("short.test")
        assert resolver.lookups == 8
        await resolver.resolve("long.test")  # TTL 999999, capped at 100
        clock.now += 101.0
        await resolver.resolve("long.test")
        assert resolver.lookups == 12

    asyncio.run(main())
    assert observer.cache.count("hit") >= 4 and "miss" in observer.cache
    assert set(observer.lookups) == {"AAAA", "A"}


def test_a_changed_record_is_seen_after_its_ttl(server: DNSServer, hosts: Path) -> None:
    clock = Clock()
    resolver = make(server, hosts, clock)

    async def main() -> None:
        assert ipaddress.ip_address("203.0.113.5") in await resolver.resolve("dual.test")
        server.zone["dual.test"] = {"A": ["203.0.113.55"], "ttl": 60}
        assert ipaddress.ip_address("203.0.113.5") in await resolver.resolve("dual.test")
        clock.now += 61
        assert await resolver.resolve("dual.test") == (ipaddress.ip_address("203.0.113.55"),)

    asyncio.run(main())


def test_negative_answers_are_cached_for_the_soa_minimum(server: DNSServer, hosts: Path) -> None:
    clock = Clock()
    resolver = make(server, hosts, clock)

    async def main() -> None:
        for _ in range(3):
            with pytest.raises(DNSError) as info:
                await resolver.resolve("missing.test")
            assert info.value.rcode == "NXDOMAIN"
        assert resolver.lookups == 2
        clock.now += 19
        with pytest.raises(DNSError):
            await resolver.resolve("missing.test")
        assert resolver.lookups == 2
        clock.now += 2  # past the SOA minimum (20 s)
        server.zone["missing.test"] = {"A": ["203.0.113.77"]}
        assert await resolver.resolve("missing.test") == (ipaddress.ip_address("203.0.113.77"),)
        # NODATA: only4.test has no AAAA; the empty answer is cached too.
        await resolver.resolve("only4.test")
        await resolver.resolve("only4.test")
        assert server.queries.count("only4.test AAAA") == 1

    asyncio.run(main())


def test_the_cache_is_bounded(server: DNSServer, hosts: Path) -> None:
    resolver = make(server, hosts, size=3)
    for name in ("one", "two", "three", "four"):
        server.zone[f"{name}.test"] = {"A": ["203.0.113.1"]}

    async def main() -> None:
        for name in ("one", "two", "three", "four"):
            await resolver.resolve(f"{name}.test")
        assert len(resolver._cache) == 3

    asyncio.run(main())


def test_stale_answers_only_when_the_nameservers_are_unreachable(
    server: DNSServer, hosts: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock()
    observer = Observer()
    resolver = make(server, hosts, clock, timeout=1.0)
    resolver.observer = observer

    async def main() -> None:
        await resolver.resolve("dual.test")
        clock.now += 61
        # Still answering: a fresh answer, never the stale one.
        server.zone["dual.test"] = {"AAAA": ["2001:db8::55"], "ttl": 60}
        assert await resolver.resolve("dual.test") == (ipaddress.ip_address("2001:db8::55"),)
        clock.now += 61
        server.zone["$down"] = True
        batches = [b async for b in resolver.arrivals("dual.test", ("AAAA",))]
        assert [b.addrs for b in batches] == [(ipaddress.ip_address("2001:db8::55"),)]
        assert "stale DNS answer for dual.test" in batches[0].notes[0]
        assert "nameservers unreachable" in batches[0].notes[0]
        # A name never seen has no stale answer: the timeout is the error.
        with pytest.raises(DNSTimeout):
            await resolver.resolve("never.test")

    with caplog.at_level("WARNING", logger="kushi"):
        asyncio.run(main())
    assert "stale" in observer.cache
    assert any("using stale AAAA answer for dual.test" in r.message for r in caplog.records)


def test_rcodes_reach_proxy_status(server: DNSServer, hosts: Path) -> None:
    resolver = make(server, hosts)

    async def rcode(name: str) -> DNSError:
        with pytest.raises(DNSError) as info:
            await resolver.resolve(name)
        return info.value

    nx = asyncio.run(rcode("missing.test"))
    assert nx.rcode == "NXDOMAIN" and "does not exist" in nx.details
    assert asyncio.run(rcode("broken.test")).rcode == "SERVFAIL"
    assert asyncio.run(rcode("refused.test")).rcode == "REFUSED"
    response = http1.render_error(nx, proxy_name="kushi", close=False)
    assert b'Proxy-Status: kushi; error=dns_error; rcode="NXDOMAIN"; details=' in response


def test_hosts_file_first_and_reread(server: DNSServer, hosts: Path) -> None:
    clock = Clock()
    resolver = make(server, hosts, clock)

    async def main() -> None:
        assert await resolver.resolve("fromhosts.test") == (ipaddress.ip_address("203.0.113.50"),)
        assert server.queries == []
        hosts.write_text("203.0.113.51 fromhosts.test\n")
        clock.now += 2
        assert await resolver.resolve("fromhosts.test") == (ipaddress.ip_address("203.0.113.51"),)

    asyncio.run(main())


# --- NAT64 ----------------------------------------------------------------------------------

#: RFC 6052 section 2.4: 192.0.2.33 under each prefix length.
RFC6052 = [
    ("2001:db8::/32", "2001:db8:c000:221::"),
    ("2001:db8:100::/40", "2001:db8:1c0:2:21::"),
    ("2001:db8:122::/48", "2001:db8:122:c000:2:2100::"),
    ("2001:db8:122:300::/56", "2001:db8:122:3c0:0:221::"),
    ("2001:db8:122:344::/64", "2001:db8:122:344:c0:2:2100:0"),
    ("2001:db8:122:344::/96", "2001:db8:122:344::192.0.2.33"),
    ("64:ff9b::/96", "64:ff9b::192.0.2.33"),
]


@pytest.mark.parametrize(("prefix", "expected"), RFC6052)
def test_rfc6052_synthesis_and_extraction(prefix: str, expected: str) -> None:
    v4 = ipaddress.IPv4Address("192.0.2.33")
    net = ipaddress.IPv6Network(prefix)
    assert synthesize(v4, net) == ipaddress.IPv6Address(expected)
    assert extract(ipaddress.IPv6Address(expected), net) == v4


@pytest.mark.parametrize(("prefix", "_expected"), RFC6052)
def test_rfc7050_discovers_every_prefix_length(prefix: str, _expected: str) -> None:
    net = ipaddress.IPv6Network(prefix)
    answer = [synthesize(ipaddress.IPv4Address("192.0.0.170"), net)]
    assert discover_prefixes(answer) == [net]
    assert discover_prefixes([ipaddress.IPv6Address("2001:db8::1")]) == []


def test_discovery_from_ipv4only_arpa(server: DNSServer, hosts: Path) -> None:
    nat64 = Nat64(mode="on")
    asyncio.run(nat64.refresh(make(server, hosts)))
    assert nat64.active == ipaddress.IPv6Network("2001:db8:64:ff9b::/96")
    assert Nat64(mode="off", discovered=list(nat64.discovered)).active is None
    configured = Nat64(mode="on", prefix=ipaddress.IPv6Network("64:ff9b::/96"))
    assert configured.active == ipaddress.IPv6Network("64:ff9b::/96")


def test_connector_synthesizes_for_a_only_names_and_checks_the_ipv4(
    server: DNSServer, hosts: Path
) -> None:
    prefix = ipaddress.IPv6Network("2001:db8:64:ff9b::/96")
    seen: list[str] = []

    def check(addr: Any, port: int) -> str | None:
        seen.append(str(addr))
        return "private" if str(addr) == "203.0.113.99" else None

    connector = Connector(make(server, hosts), check=check, nat64=Nat64(mode="on", prefix=prefix))
    policy = EgressPolicy(mode="ipv6-only")
    got = asyncio.run(connector.candidates("only4.test", 80, policy))
    assert got == [(ipaddress.IPv6Address("2001:db8:64:ff9b::cb00:710a"), "nat64")]
    assert seen == ["203.0.113.10"]  # the destination policy saw the IPv4 address
    literal = asyncio.run(connector.candidates("203.0.113.4", 80, policy))
    assert literal == [(ipaddress.IPv6Address("2001:db8:64:ff9b::cb00:7104"), "nat64")]
    from kushi.errors import DestinationProhibited

    with pytest.raises(DestinationProhibited, match="203.0.113.99: private"):
        asyncio.run(connector.candidates("203.0.113.99", 80, policy))
    # Names with AAAA records are not synthesized, and A is not waited for.
    dual = asyncio.run(connector.candidates("slow4.test", 80, policy))
    assert dual == [(ipaddress.IPv6Address("2001:db8::8"), "ipv6")]


def test_lookup_times_and_cache_results_reach_metrics(server: DNSServer, hosts: Path) -> None:
    from kushi.metrics import Metrics

    metrics = Metrics()
    resolver = make(server, hosts)
    resolver.observer = metrics

    async def main() -> None:
        await resolver.resolve("dual.test")
        await resolver.resolve("dual.test")

    asyncio.run(main())
    text = metrics.render().decode()
    assert 'kushi_dns_lookup_seconds_count{type="AAAA"} 1.0' in text
    assert 'kushi_dns_lookup_seconds_count{type="A"} 1.0' in text
    assert 'kushi_dns_cache_total{result="miss"} 2.0' in text
    assert 'kushi_dns_cache_total{result="hit"} 2.0' in text


def test_remembered_candidates_follow_the_answer_and_nat64(server: DNSServer, hosts: Path) -> None:
    from kushi.errors import DestinationNotFound

    clock = Clock()
    nat64 = Nat64(mode="off", prefix=ipaddress.IPv6Network("64:ff9b::/96"))
    connector = Connector(make(server, hosts, clock), check=lambda a, p: None, nat64=nat64)
    prefer6, v6only = EgressPolicy(), EgressPolicy(mode="ipv6-only")

    async def main() -> None:
        for _ in range(2):
            got = await connector.candidates("fromhosts.test", 80, prefer6)
            assert got == [(ipaddress.IPv4Address("203.0.113.50"), "ipv4")]
        hosts.write_text("203.0.113.51 fromhosts.test\n")
        clock.now += 2
        got = await connector.candidates("fromhosts.test", 80, prefer6)
        assert got == [(ipaddress.IPv4Address("203.0.113.51"), "ipv4")]
        with pytest.raises(DestinationNotFound):
            await connector.candidates("fromhosts.test", 80, v6only)
        nat64.mode = "on"
        nat64.update()
        got = await connector.candidates("fromhosts.test", 80, v6only)
        assert got == [(ipaddress.IPv6Address("64:ff9b::cb00:7133"), "nat64")]

    asyncio.run(main())
