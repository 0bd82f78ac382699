"""Source addresses (kushi.source) and their config: which address a connection leaves
from, the keys addresses are derived from, and every bad value naming its key.

What the origin really sees is tested end to end in tests/e2e/test_source_netns.py."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from pathlib import Path

import bcrypt
import pytest

from kushi.accesslog import AccessRecord
from kushi.config import load_config
from kushi.connector import Connector, EgressPolicy
from kushi.errors import ConfigError
from kushi.resolver import Resolver
from kushi.runtime import ListenerState
from kushi.source import (
    Source,
    SourcePlan,
    SourceUnusable,
    bound_socket,
    check_usable,
    pick,
    route_type,
    usable_range,
)

pytestmark = pytest.mark.timeout(30)

V6 = ipaddress.IPv6Network("2001:db8:1:2::/64")
V4 = ipaddress.IPv4Network("203.0.113.0/24")


def test_a_prefix_first_usable_address_and_ranges() -> None:
    assert pick(V6, "") == ipaddress.IPv6Address("2001:db8:1:2::1")
    assert pick(V4, "") == ipaddress.IPv4Address("203.0.113.1")
    one = ipaddress.IPv4Network("203.0.113.7/32")
    assert pick(one, None) == pick(one, "x") == ipaddress.IPv4Address("203.0.113.7")
    # IPv4: no network or broadcast address; IPv6: no subnet-router anycast (all zeros)
    # and no RFC 2526 reserved anycast addresses at the top of a /64.
    assert usable_range(V4) == (1, 254)
    assert usable_range(V6) == (1, 2**64 - 129)
    assert usable_range(ipaddress.IPv4Network("203.0.113.6/31")) == (0, 2)
    small = ipaddress.IPv4Network("203.0.113.4/30")
    assert {pick(small, None) for _ in range(200)} == {
        ipaddress.IPv4Address("203.0.113.5"),
        ipaddress.IPv4Address("203.0.113.6"),
    }


def test_keyed_addresses_are_stable_distinct_and_depend_on_the_secret() -> None:
    a = pick(V6, "client 198.51.100.2", b"k" * 32)
    assert a == pick(V6, "client 198.51.100.2", b"k" * 32)
    assert a in V6 and a != V6.network_address
    assert a != pick(V6, "client 198.51.100.3", b"k" * 32)
    assert a != pick(V6, "client 198.51.100.2", b"j" * 32)
    fresh = {pick(V6, None) for _ in range(50)}
    assert len(fresh) == 50 and all(addr in V6 for addr in fresh)


def test_rotation_keys_and_pool_keys() -> None:
    plan = SourcePlan(v6=V6, rotation="client")
    assert plan.key_for("198.51.100.2", "alice", 1) == "client 198.51.100.2"
    # A client reaching an IPv6 socket through IPv4 is the same client.
    assert plan.key_for("::ffff:198.51.100.2", "", 1) == "client 198.51.100.2"
    assert plan.pool_key("198.51.100.2", "", 1) == plan.pool_key("198.51.100.2", "", 9)
    users = SourcePlan(v6=V6, rotation="user")
    assert users.key_for("198.51.100.2", "alice", 1) != users.key_for("198.51.100.2", "bob", 1)
    assert users.key_for("198.51.100.2", "", 1) == users.key_for("198.51.100.9", "", 2)
    fresh = SourcePlan(v6=V6, rotation="connection")
    assert fresh.key_for("198.51.100.2", "", 1) is None
    # Per connection: pooled upstreams stay within one client connection.
    assert fresh.pool_key("198.51.100.2", "", 1) != fresh.pool_key("198.51.100.2", "", 2)
    fixed = SourcePlan(v6=V6)
    assert fixed.key_for("a", "b", 1) == "" and fixed.pool_key("a", "b", 1) == ""
    assert not SourcePlan() and SourcePlan().pool_key("a", "", 1) is None


def test_a_family_without_a_source_uses_the_default() -> None:
    plan = SourcePlan(v6=V6, rotation="none")
    assert plan.address(4, "") is None
    assert plan.address(6, "") == ipaddress.IPv6Address("2001:db8:1:2::1")
    assert plan.covers(6) and not plan.covers(4)
    assert plan.describe() == "2001:db8:1:2::/64 (rotation none)"
    assert SourcePlan(v4=ipaddress.IPv4Network("203.0.113.7/32")).describe() == "203.0.113.7"


def test_route_type_and_the_startup_check_on_loopback() -> None:
    assert route_type(ipaddress.ip_address("127.0.0.1")) == "local"
    assert route_type(ipaddress.ip_address("::1")) == "local"
    check_usable(ipaddress.IPv4Network("127.0.0.0/8"), "source")  # all of it is local
    # 203.0.113.0/24 (TEST-NET-3) is on no interface of a test machine.
    with pytest.raises(SourceUnusable) as info:
        check_usable(ipaddress.IPv4Network("203.0.113.77/32"), "listener forward: source")
    assert str(info.value).startswith(
        "listener forward: source 203.0.113.77: not an address of this host"
    )
    with pytest.raises(SourceUnusable) as info:
        check_usable(V6, "source")
    assert "ip -6 route add local 2001:db8:1:2::/64 dev lo" in str(info.value)


def test_bound_socket_uses_freebind() -> None:
    # FREEBIND: an address that is on no interface can still be bound (its traffic
    # needs a local route to come back, which check_usable insists on).
    sock = bound_socket(ipaddress.IPv4Address("203.0.113.77"), socket.SOCK_DGRAM)
    try:
        assert sock.getsockname()[0] == "203.0.113.77"
    finally:
        sock.close()


def test_the_connector_binds_the_source_of_the_destinations_family() -> None:
    """Through real loopback sockets: 127.0.0.0/8 is all local, so any address of it is a
    source; ::1 has no source configured and leaves from the default address."""
    v4 = socket.socket(socket.AF_INET)
    v6 = socket.socket(socket.AF_INET6)
    v4.bind(("127.0.0.1", 0))
    v6.bind(("::1", 0))
    for sock in (v4, v6):
        sock.listen(8)
    plan = SourcePlan(v4=ipaddress.IPv4Network("127.0.0.0/8"), rotation="client")
    connector = Connector(Resolver())
    policy = EgressPolicy()

    async def go() -> list[tuple[str, str, str]]:
        out = []
        for key, (host, port) in (
            ("client 198.51.100.2", v4.getsockname()[:2]),
            ("client 198.51.100.2", v4.getsockname()[:2]),
            ("client 198.51.100.3", v4.getsockname()[:2]),
            ("client 198.51.100.2", v6.getsockname()[:2]),
        ):
            upstream = await connector.connect(host, port, policy, source=Source(plan, key))
            out.append((upstream.source, upstream.conn.local[0], upstream.family))
            upstream.conn.abort()
        return out

    try:
        (a, a_again, b, six) = asyncio.run(go())
        peers = []
        for _ in range(3):
            conn, peer = v4.accept()
            conn.close()
            peers.append(peer[0])
        v6.accept()[0].close()
    finally:
        v4.close()
        v6.close()
    assert a == a_again and a[0] == a[1] and a[2] == "ipv4"
    assert ipaddress.IPv4Address(a[0]) in plan.v4  # type: ignore[operator]
    assert b[0] != a[0]
    assert peers == [a[0], a[0], b[0]]  # what the listening side saw
    assert six == ("", "::1", "ipv6")  # no IPv6 source: the default, said as none


def test_the_access_log_names_the_source() -> None:
    record = AccessRecord(time=0.0, listener="l", mode="forward", client="198.51.100.2")
    record.upstream, record.family, record.status = "[2001:db8:1::4]:80", "ipv6", 200
    assert "source=" not in record.to_squid()
    record.source = "2001:db8:1:2::1"
    assert record.to_squid().endswith('"source=2001:db8:1:2::1"')
    assert '"source":"2001:db8:1:2::1"' in record.to_json()


# --- config ------------------------------------------------------------------------------


def toml(tmp_path: Path, text: str) -> str:
    path = tmp_path / "kushi.toml"
    path.write_text(text)
    return str(path)


def htpasswd(tmp_path: Path, *users: str) -> str:
    digest = bcrypt.hashpw(b"pw", bcrypt.gensalt(rounds=4)).decode()
    path = tmp_path / "htpasswd"
    path.write_text("".join(f"{user}:{digest}\n" for user in users))
    return str(path)


def error(tmp_path: Path | None, text: str | None = None, **flags: object) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(toml(tmp_path, text) if tmp_path and text else None, flags)
    return f"{info.value.key}: {info.value.problem}"


def test_source_values(tmp_path: Path) -> None:
    config = load_config(None, {"source": ["2001:db8:1:2::/64", "203.0.113.7"]})
    listener = config.listeners[0]
    assert listener.source_plan == SourcePlan(
        v4=ipaddress.IPv4Network("203.0.113.7/32"), v6=V6, rotation="none"
    )
    mapped = load_config(None, {"source": ["::ffff:203.0.113.7"]}).listeners[0]
    assert mapped.source_plan.v4 == ipaddress.IPv4Network("203.0.113.7/32")
    assert load_config(None, {}).listeners[0].source_plan == SourcePlan()


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (
            {"source": ["203.0.113.7", "203.0.113.8"]},
            "source: '203.0.113.8': at most one IPv4 address or prefix per listener",
        ),
        ({"source": ["2001:db8:1:2::5/64"]}, "source: '2001:db8:1:2::5/64' has host bits set"),
        ({"source": ["::"]}, "source: '::' is not a unicast address or prefix"),
        ({"source": ["ff02::1"]}, "source: 'ff02::1' is not a unicast address or prefix"),
        ({"source": ["fe80::1"]}, "source: 'fe80::1': a link-local source needs an interface"),
        ({"source": ["example.com"]}, "source: 'example.com' is not an address or CIDR network"),
        ({"source_rotation": "sticky"}, "source_rotation: 'sticky' is not one of none"),
        ({"source_rotation": "user"}, "listener forward: source_rotation: user needs auth"),
    ],
)
def test_bad_source_values_name_their_key(flags: dict[str, object], expected: str) -> None:
    assert error(None, **flags).startswith(expected)


def test_users_tables(tmp_path: Path) -> None:
    auth = htpasswd(tmp_path, "alice", "bob")
    path = toml(
        tmp_path,
        f'auth_file = "{auth}"\nsource = ["2001:db8:1:2::/64"]\nsource_rotation = "user"\n'
        '[users.alice]\negress = "ipv6-only"\nsource = ["2001:db8:1:3::a"]\n'
        '[users.carol]\nsource_rotation = "connection"\n',
    )
    config = load_config(path)
    alice = config.user("alice")
    assert alice is not None and alice.egress == "ipv6-only"
    assert alice.source == (ipaddress.IPv6Network("2001:db8:1:3::a/128"),)
    assert config.user("bob") is None
    # carol is not in the htpasswd file: a warning, not an error.
    assert config.warnings == (
        f"users.carol: no such user in {auth}; the table applies once that user exists",
    )
    state = ListenerState(config.listeners[0], config)
    # Each key a user's table sets replaces the listener's own; the rest stands.
    assert state.user_egress("alice").policy.mode == "ipv6-only"
    assert state.user_egress("alice").sources == SourcePlan(
        v6=ipaddress.IPv6Network("2001:db8:1:3::a/128"), rotation="user"
    )
    assert state.user_egress("bob").sources == SourcePlan(v6=V6, rotation="user")
    assert state.user_egress("carol").sources == SourcePlan(v6=V6, rotation="connection")
    a, b = state.egress("198.51.100.2", "alice"), state.egress("198.51.100.2", "bob")
    assert a.source is not None and b.source is not None
    assert a.source.address(6) == ipaddress.IPv6Address("2001:db8:1:3::a")
    assert b.source.address(6) in V6 and a.pool_tag != b.pool_tag
    assert a.policy.mode == "ipv6-only" and b.policy.mode == "prefer-ipv6"
    plain = load_config(None, {})
    nothing = ListenerState(plain.listeners[0], plain).egress("198.51.100.2", "x")
    assert nothing.source is None


def test_bad_users_tables(tmp_path: Path) -> None:
    assert error(tmp_path, '[users.alice]\negress = "ipv6-only"\n').startswith(
        "users.alice: per-user settings need authentication (auth_file)"
    )
    auth = htpasswd(tmp_path, "alice")
    assert error(tmp_path, f'auth_file = "{auth}"\n[users.alice]\nallow = []\n').startswith(
        "users.alice.allow: unknown key (a user table sets egress, source, source_rotation)"
    )
    assert error(tmp_path, f'auth_file = "{auth}"\n[users.alice]\negress = "v6"\n').startswith(
        "users.alice.egress: 'v6' is not one of"
    )
    assert error(tmp_path, f'auth_file = "{auth}"\nusers = 1\n').startswith(
        "users: expected [users.NAME] tables"
    )
