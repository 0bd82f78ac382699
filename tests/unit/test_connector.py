"""The egress policy (kushi.connector): address ordering by family, and the connection race.

``order_addresses`` is pure and tested by value. ``Connector.race`` is tested against real
loopback sockets (a closed IPv6 port that refuses, a listening IPv4 socket); Happy Eyeballs
timing against unanswered addresses needs blackholes, which the namespace end-to-end tests
provide.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Iterator

import pytest

from kushi.connector import (
    Attempt,
    Connector,
    EgressPolicy,
    Upstream,
    classify,
    describe_fallbacks,
    order_addresses,
)
from kushi.errors import (
    ConnectionRefused,
    DestinationNotFound,
    DestinationProhibited,
)
from kushi.resolver import IPAddress, Resolver

pytestmark = pytest.mark.timeout(30)

V6A = ipaddress.IPv6Address("2001:db8::a")
V6B = ipaddress.IPv6Address("2001:db8::b")
V6C = ipaddress.IPv6Address("2001:db8::c")
V4A = ipaddress.IPv4Address("198.51.100.1")
V4B = ipaddress.IPv4Address("198.51.100.2")
MAPPED = ipaddress.IPv6Address("::ffff:198.51.100.3")
NAT64 = ipaddress.IPv6Address("64:ff9b::cb00:7104")  # 203.0.113.4 behind the well-known prefix


def ordered(host: str, addrs: list[IPAddress], **policy: object) -> list[tuple[str, str]]:
    return [(str(a), f) for a, f in order_addresses(host, addrs, EgressPolicy(**policy))]  # type: ignore[arg-type]


# --- classification --------------------------------------------------------------------------


def test_classify_families() -> None:
    prefixes = (ipaddress.IPv6Network("64:ff9b::/96"),)
    assert classify(V4A, prefixes) == "ipv4"
    assert classify(V6A, prefixes) == "ipv6"
    assert classify(MAPPED, prefixes) == "ipv4"  # IPv4-mapped is IPv4 for every decision
    assert classify(NAT64, prefixes) == "nat64"
    assert classify(NAT64, ()) == "ipv6"
    custom = (ipaddress.IPv6Network("2001:db8:64::/96"),)
    assert classify(ipaddress.IPv6Address("2001:db8:64::c633:6401"), custom) == "nat64"


# --- order_addresses: one test per policy ----------------------------------------------------


def test_prefer_ipv6_interleaves_families_ipv6_first() -> None:
    # RFC 8305 section 4: alternate families, starting with the preferred one.
    got = ordered("dual.test", [V4A, V4B, V6A, V6B, V6C], mode="prefer-ipv6")
    assert got == [
        (str(V6A), "ipv6"),
        (str(V4A), "ipv4"),
        (str(V6B), "ipv6"),
        (str(V4B), "ipv4"),
        (str(V6C), "ipv6"),
    ]


def test_prefer_ipv6_keeps_resolver_order_within_a_family() -> None:
    got = ordered("x.test", [V6B, V4B, V6A, V4A], mode="prefer-ipv6")
    assert [a for a, _ in got] == [str(V6B), str(V4B), str(V6A), str(V4A)]


def test_prefer_ipv6_with_one_family_only() -> None:
    assert ordered("v4.test", [V4A, V4B]) == [(str(V4A), "ipv4"), (str(V4B), "ipv4")]
    assert ordered("v6.test", [V6A]) == [(str(V6A), "ipv6")]


def test_prefer_ipv4_interleaves_families_ipv4_first() -> None:
    got = ordered("dual.test", [V6A, V6B, V4A, V4B], mode="prefer-ipv4")
    assert got == [
        (str(V4A), "ipv4"),
        (str(V6A), "ipv6"),
        (str(V4B), "ipv4"),
        (str(V6B), "ipv6"),
    ]


def test_ipv6_only_drops_ipv4() -> None:
    assert ordered("dual.test", [V4A, V6A, V4B, V6B], mode="ipv6-only") == [
        (str(V6A), "ipv6"),
        (str(V6B), "ipv6"),
    ]


def test_ipv6_only_without_ipv6_is_destination_not_found_in_plain_words() -> None:
    with pytest.raises(DestinationNotFound) as info:
        order_addresses("v4.test", [V4A, V4B], EgressPolicy(mode="ipv6-only"))
    exc = info.value
    assert exc.status == 502 and exc.error_type == "destination_not_found"
    assert exc.details == (
        "v4.test has no IPv6 address (only 198.51.100.1, 198.51.100.2); egress policy is ipv6-only"
    )


def test_ipv6_only_with_ipv4_literal_says_it_is_an_ipv4_address() -> None:
    with pytest.raises(DestinationNotFound) as info:
        order_addresses("198.51.100.1", [V4A], EgressPolicy(mode="ipv6-only"))
    assert info.value.details == "198.51.100.1 is an IPv4 address; egress policy is ipv6-only"


def test_ipv4_only_keeps_ipv4_and_ipv4_mapped() -> None:
    got = ordered("dual.test", [V6A, MAPPED, V4A], mode="ipv4-only")
    assert got == [(str(MAPPED), "ipv4"), (str(V4A), "ipv4")]


def test_ipv4_only_without_ipv4_is_destination_not_found() -> None:
    with pytest.raises(DestinationNotFound) as info:
        order_addresses("v6.test", [V6A], EgressPolicy(mode="ipv4-only"))
    assert info.value.details == "v6.test has no IPv4 address (only 2001:db8::a); " + (
        "egress policy is ipv4-only"
    )
    with pytest.raises(DestinationNotFound) as literal:
        order_addresses("2001:db8::a", [V6A], EgressPolicy(mode="ipv4-only"))
    assert literal.value.details == "2001:db8::a is an IPv6 address; egress policy is ipv4-only"


def test_ipv4_mapped_counts_as_ipv4_under_ipv6_only() -> None:
    with pytest.raises(DestinationNotFound) as info:
        order_addresses("mapped.test", [MAPPED], EgressPolicy(mode="ipv6-only"))
    assert "has no IPv6 address" in info.value.details


def test_nat64_addresses_are_ipv6_egress_when_allowed() -> None:
    got = ordered("v4only.test", [NAT64], mode="ipv6-only")
    assert got == [(str(NAT64), "nat64")]
    got = ordered("dual.test", [V4A, NAT64], mode="prefer-ipv6")
    assert got == [(str(NAT64), "nat64"), (str(V4A), "ipv4")]


def test_nat64_refuse_drops_nat64_addresses_and_says_why() -> None:
    got = ordered("mixed.test", [NAT64, V6A], mode="ipv6-only", nat64="refuse")
    assert got == [(str(V6A), "ipv6")]
    with pytest.raises(DestinationNotFound) as info:
        order_addresses("v4only.test", [NAT64], EgressPolicy(mode="ipv6-only", nat64="refuse"))
    details = info.value.details
    assert details.startswith("v4only.test has no IPv6 address (only 64:ff9b::cb00:7104)")
    assert details.endswith("its NAT64 addresses are refused (nat64 = refuse)")


def test_custom_nat64_prefix() -> None:
    prefix = ipaddress.IPv6Network("2001:db8:64::/96")
    addr = ipaddress.IPv6Address("2001:db8:64::cb00:7104")
    assert ordered("x.test", [addr], mode="ipv6-only", nat64_prefixes=(prefix,)) == [
        (str(addr), "nat64")
    ]
    with pytest.raises(DestinationNotFound):
        order_addresses(
            "x.test",
            [addr],
            EgressPolicy(mode="ipv6-only", nat64="refuse", nat64_prefixes=(prefix,)),
        )


def test_no_address_at_all_is_destination_not_found() -> None:
    with pytest.raises(DestinationNotFound):
        order_addresses("empty.test", [], EgressPolicy())


# --- Connector.race against real loopback sockets --------------------------------------------


@pytest.fixture
def ipv4_listener() -> Iterator[socket.socket]:
    """A listening socket on 127.0.0.1 whose port is closed on [::1] (so IPv6 is refused)."""
    for _ in range(20):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        probe = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        try:
            probe.bind(("::1", port))  # free on [::1]: nothing listens there
        except OSError:
            sock.close()
            continue
        finally:
            probe.close()
        sock.listen(8)
        yield sock
        sock.close()
        return
    pytest.skip("no port free on both 127.0.0.1 and [::1]")


async def _race(
    port: int, candidates: list[tuple[IPAddress, str]], policy: EgressPolicy
) -> Upstream:
    connector = Connector(Resolver())
    upstream = await connector.race("test.host", port, candidates, policy)  # type: ignore[arg-type]
    upstream.conn.close()
    await upstream.conn.wait_closed()
    return upstream


LOOP6 = ipaddress.IPv6Address("::1")
LOOP4 = ipaddress.IPv4Address("127.0.0.1")


def test_race_refused_ipv6_then_listening_ipv4_connects_ipv4(
    ipv4_listener: socket.socket,
) -> None:
    port = ipv4_listener.getsockname()[1]
    upstream = asyncio.run(
        _race(port, [(LOOP6, "ipv6"), (LOOP4, "ipv4")], EgressPolicy(connect_timeout=10))
    )
    conn, _ = ipv4_listener.accept()
    conn.close()
    assert upstream.address == "127.0.0.1" and upstream.family == "ipv4"
    assert upstream.next_hop == f"127.0.0.1:{port}"
    assert [a.outcome for a in upstream.attempts] == ["refused", "connected"]
    (failed,) = upstream.fallbacks
    assert failed.address == "::1" and failed.family == "ipv6" and failed.port == port
    text = describe_fallbacks(upstream)
    assert text.startswith(f"ipv6 [::1]:{port} refused after ")
    assert text.endswith("(connection refused)")


def test_race_failure_starts_the_next_attempt_at_once(ipv4_listener: socket.socket) -> None:
    """RFC 8305 section 5: a failed attempt does not wait out the Connection Attempt Delay.

    With a delay longer than the connect timeout, waiting for it could only time out."""
    port = ipv4_listener.getsockname()[1]
    policy = EgressPolicy(attempt_delay=3600.0, connect_timeout=20.0)
    upstream = asyncio.run(_race(port, [(LOOP6, "ipv6"), (LOOP4, "ipv4")], policy))
    conn, _ = ipv4_listener.accept()
    conn.close()
    assert upstream.family == "ipv4"


def test_race_ipv6_first_wins_when_it_answers(ipv4_listener: socket.socket) -> None:
    server6 = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    try:
        port = ipv4_listener.getsockname()[1]
        server6.bind(("::1", port))
        server6.listen(8)
        upstream = asyncio.run(
            _race(port, [(LOOP6, "ipv6"), (LOOP4, "ipv4")], EgressPolicy(attempt_delay=3600.0))
        )
        conn, _ = server6.accept()
        conn.close()
    finally:
        server6.close()
    assert upstream.family == "ipv6" and upstream.next_hop == f"[::1]:{port}"
    assert upstream.fallbacks == ()
    assert describe_fallbacks(upstream) == ""


def test_race_every_address_refused_is_connection_refused() -> None:
    probe = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    probe.bind(("::1", 0))
    port = probe.getsockname()[1]
    probe.close()
    connector = Connector(Resolver())

    async def go() -> None:
        await connector.race(
            "closed.test", port, [(LOOP6, "ipv6"), (LOOP4, "ipv4")], EgressPolicy()
        )

    with pytest.raises(ConnectionRefused) as info:
        asyncio.run(go())
    exc = info.value
    assert exc.status == 502 and exc.error_type == "connection_refused"
    assert exc.details.startswith(f"could not connect to closed.test port {port}: ")
    assert f"ipv6 [::1]:{port} refused" in exc.details
    assert f"ipv4 127.0.0.1:{port} refused" in exc.details


def test_connect_applies_the_destination_check() -> None:
    connector = Connector(Resolver(), check=lambda addr, port: "not there")

    async def go() -> None:
        await connector.connect("::1", 9, EgressPolicy())

    with pytest.raises(DestinationProhibited) as info:
        asyncio.run(go())
    assert info.value.details == "::1 port 9: ::1: not there"


def test_connect_resolves_literal_and_applies_policy_before_connecting() -> None:
    connector = Connector(Resolver())

    async def go() -> None:
        await connector.connect("127.0.0.1", 9, EgressPolicy(mode="ipv6-only"))

    with pytest.raises(DestinationNotFound):
        asyncio.run(go())


def test_attempt_describe() -> None:
    assert Attempt("::1", 80, "ipv6", "connected", 0.012).describe() == (
        "ipv6 [::1]:80 connected in 12 ms"
    )
    assert Attempt("2001:db8::1", 80, "ipv6", "abandoned", 0.25).describe() == (
        "ipv6 [2001:db8::1]:80 no answer after 250 ms"
    )
    assert Attempt("192.0.2.1", 443, "ipv4", "timeout", 1.0, "no answer").describe() == (
        "ipv4 192.0.2.1:443 timeout after 1000 ms (no answer)"
    )
