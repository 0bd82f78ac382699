"""Source addresses (issue 12 items 4 and 5) end to end, in network namespaces.

Topology (built here)::

    client 198.51.100.2 and 198.51.100.3 (two client addresses, IPv4 only)
      |
    proxy 198.51.100.1 | 203.0.113.1 + 203.0.113.11 + 2001:db8:1::1, and the routed prefix
          2001:db8:1:2::/64 as a local route on lo (AnyIP: no address of it is configured)
      |
    origin 203.0.113.4 + 2001:db8:1::4 (default routes via the proxy, so answers to any
           address of 2001:db8:1:2::/64 come back to it)

The origin records the peer address and connection number of every request, which is what
each test checks first: the address a connection really left from. kushi's JSON access log,
``Proxy-Status`` and the status page must say the same. One kushi runs every listener:

=========  ======  ===================================  ============================
listener   port    source                               rotation
=========  ======  ===================================  ============================
fixed      3128    203.0.113.11, 2001:db8:1:2::/64      none (SOCKS5 on this port too)
perconn    3129    2001:db8:1:2::/64                    connection
perclient  3130    2001:db8:1:2::/64                    client
peruser    3131    2001:db8:1:2::/64 (auth: alice,      user; [users.carol] a fixed
                   bob, carol, dave)                    source, [users.dave] ipv4-only
tcp        3140    2001:db8:1:2::/64 -> origin:80       client
=========  ======  ===================================  ============================
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import signal
import socket
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bcrypt
import pytest
import socks

from support import netns
from support.kushi_proc import KUSHI, Kushi, write_toml
from support.netns import Topology
from support.origin import ONE_K, OriginProcess, spawn_origin
from support.udpecho import UdpEcho

pytestmark = [pytest.mark.timeout(90), pytest.mark.netns]

PREFIX = ipaddress.IPv6Network("2001:db8:1:2::/64")
FIXED_V4 = "203.0.113.11"
FIXED_V6 = "2001:db8:1:2::1"  # rotation none: the prefix's first usable address
CAROL = "2001:db8:1:2::c0"
PORTS = {"fixed": 3128, "perconn": 3129, "perclient": 3130, "peruser": 3131, "tcp": 3140}
ADMIN_PORT = 9128
UDP_PORT = 7777
PASSWORD = "s3cret"
CLEAN_ENV = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}


class SourceTopology(Topology):
    client_a = "198.51.100.2"
    client_b = "198.51.100.3"
    proxy_client_ip = "198.51.100.1"
    proxy_v4 = "203.0.113.1"
    proxy_v6 = "2001:db8:1::1"
    origin_v4 = "203.0.113.4"
    origin_v6 = "2001:db8:1::4"

    def build(self) -> None:
        self.client = self.add_host("client", ipv6=False)
        self.proxy = self.add_host("proxy")
        self.origin = self.add_host("origin")
        self.link(
            self.client,
            self.proxy,
            [f"{self.client_a}/24", f"{self.client_b}/24"],
            [f"{self.proxy_client_ip}/24"],
            b_ifname="client0",
        )
        self.link(
            self.origin,
            self.proxy,
            [f"{self.origin_v4}/24", f"{self.origin_v6}/64"],
            [f"{self.proxy_v4}/24", f"{FIXED_V4}/24", f"{self.proxy_v6}/64"],
            b_ifname="origin0",
        )
        self.route(self.client, "default", self.proxy_client_ip)
        self.route(self.origin, "default", self.proxy_v4)
        self.route(self.origin, "default", self.proxy_v6)
        # What the README tells a hosting customer to do with a routed /64.
        self.route(self.proxy, str(PREFIX), dev="lo", kind="local")
        self.wait_ready()


@dataclass
class Net:
    topo: SourceTopology
    kushi: Kushi
    origin: OriginProcess
    echo: UdpEcho
    workdir: Path

    def url(self, listener: str) -> str:
        return f"http://{self.topo.proxy_client_ip}:{PORTS[listener]}"


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Net]:
    reason = netns.netns_available()
    if reason is not None:
        pytest.skip(f"network namespaces unavailable: {reason}")
    workdir = tmp_path_factory.mktemp("source-netns")
    topo = SourceTopology()
    started: list[Any] = []
    try:
        topo.build()
        t = topo
        t.proxy.hosts(
            {
                "dual.test": [t.origin_v6, t.origin_v4],
                "v4.test": [t.origin_v4],
                "v6.test": [t.origin_v6],
            }
        )
        origin = spawn_origin(
            ["[::]:80", "0.0.0.0:80"], workdir / "origin.jsonl", ns=t.origin, name="origin"
        )
        started.append(origin)
        echo = UdpEcho(t.origin, t.origin_v6, UDP_PORT)
        started.append(echo)
        digest = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=4)).decode()
        htpasswd = workdir / "htpasswd"
        htpasswd.write_text("".join(f"{u}:{digest}\n" for u in ("alice", "bob", "carol", "dave")))
        common = {"allow": ["198.51.100.0/24"], "connect_ports": [80, 443, 7777]}

        def listener(name: str, **extra: Any) -> dict[str, Any]:
            return {"name": name, "listen": [f"{t.proxy_client_ip}:{PORTS[name]}"], **extra}

        config = workdir / "kushi.toml"
        write_toml(
            config,
            {
                "access_log_format": "json",
                "admin_listen": [f"{t.proxy_client_ip}:{ADMIN_PORT}"],
                "admin_allow": ["198.51.100.0/24"],
            },
            [
                listener("fixed", source=[FIXED_V4, str(PREFIX)], **common),
                listener("perconn", source=[str(PREFIX)], source_rotation="connection", **common),
                listener("perclient", source=[str(PREFIX)], source_rotation="client", **common),
                listener(
                    "peruser",
                    source=[str(PREFIX)],
                    source_rotation="user",
                    auth_file=str(htpasswd),
                    **common,
                ),
                listener(
                    "tcp",
                    mode="tcp",
                    backend=[f"[{t.origin_v6}]:80"],
                    source=[str(PREFIX)],
                    source_rotation="client",
                    allow=["198.51.100.0/24"],
                ),
            ],
        )
        with open(config, "a") as fh:
            fh.write(
                f'[users.carol]\nsource = ["{CAROL}"]\nsource_rotation = "none"\n'
                '[users.dave]\negress = "ipv4-only"\n'
                f'source = ["{FIXED_V4}"]\n'
            )
        kushi = Kushi(
            ["serve", "--config", str(config)],
            workdir,
            netns=t.proxy.ns,
            loopback_destinations=False,
        )
        started.append(kushi)
        kushi.wait_ready()
        yield Net(t, kushi, origin, echo, workdir)
    finally:
        for thing in reversed(started):
            if isinstance(thing, UdpEcho):
                thing.close()
            else:
                thing.stop()
        topo.close(raise_errors=False)


# --- helpers ---------------------------------------------------------------------------------


@dataclass
class Fetched:
    status: int
    headers: dict[str, str]
    body: bytes
    stderr: str


def curl(net: Net, url: str, *args: str, proxy: str | None = None, src: str = "") -> Fetched:
    """Real curl in the client namespace, from client address ``src`` (default A)."""
    argv = ["curl", "-sS", "--max-time", "20", "-D", "-", "--interface", src or net.topo.client_a]
    if proxy is not None:
        argv += ["-x", proxy]
    proc = netns.run(net.topo.client, [*argv, *args, url], text=False, env=CLEAN_ENV, timeout=30)
    out: bytes = proc.stdout
    heads = []
    while out.startswith(b"HTTP/"):
        raw, _, out = out.partition(b"\r\n\r\n")
        heads.append(raw.decode("latin-1"))
    assert heads, f"curl exit {proc.returncode}: {proc.stderr.decode(errors='replace')}"
    lines = heads[-1].split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
    return Fetched(int(lines[0].split()[1]), headers, out, proc.stderr.decode(errors="replace"))


def marker() -> str:
    return uuid.uuid4().hex[:12]


def seen(net: Net, mark: str, timeout: float = 5.0) -> dict[str, Any]:
    """The origin's record of the one request whose target carries ``mark``."""
    deadline = time.monotonic() + timeout
    while True:
        found = [r for r in net.origin.requests() if mark in r.get("target", "")]
        if found or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    assert len(found) == 1, found
    return found[0]


def fetch(
    net: Net, listener: str, host: str = "dual.test", src: str = "", user: str = ""
) -> tuple[dict[str, Any], Fetched]:
    """One request through ``listener`` (as ``user``, from client address ``src``): the
    origin's record of it and the response."""
    mark = marker()
    auth = ["--proxy-user", f"{user}:{PASSWORD}"] if user else []
    r = curl(net, f"http://{host}/1k?m={mark}", *auth, proxy=net.url(listener), src=src)
    assert r.status == 200 and r.body == ONE_K, (r.status, r.body[:300], r.stderr)
    return seen(net, mark), r


def log_record(net: Net, needle: str) -> dict[str, Any]:
    deadline = time.monotonic() + 5
    while True:
        found = [r for r in net.kushi.json_records() if needle in r["target"]]
        if found or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    assert len(found) == 1, found
    return found[0]


def proxy_status_source(r: Fetched) -> str | None:
    m = re.search(r';\s*source="([^"]*)"', r.headers["proxy-status"])
    return m.group(1) if m else None


# --- fixed sources ---------------------------------------------------------------------------


def test_fixed_source_per_family(net: Net) -> None:
    six, r6 = fetch(net, "fixed", "v6.test")
    assert (six["client"], six["family"]) == (FIXED_V6, "ipv6")
    four, r4 = fetch(net, "fixed", "v4.test")
    assert (four["client"], four["family"]) == (FIXED_V4, "ipv4")
    # Proxy-Status and the access log name the source next to the next hop.
    assert proxy_status_source(r6) == FIXED_V6
    assert f'next-hop="[{net.topo.origin_v6}]:80"' in r6.headers["proxy-status"]
    assert proxy_status_source(r4) == FIXED_V4
    assert log_record(net, six["target"])["source"] == FIXED_V6
    assert log_record(net, four["target"])["source"] == FIXED_V4


def test_an_ipv4_destination_is_reached_while_only_an_ipv6_source_is_set(net: Net) -> None:
    four, r = fetch(net, "perconn", "v4.test")
    # No IPv4 source: the host's default IPv4 address, said as such (no source given).
    assert (four["client"], four["family"]) == (net.topo.proxy_v4, "ipv4")
    assert proxy_status_source(r) is None
    record = log_record(net, four["target"])
    assert (record["family"], record["source"]) == ("ipv4", "")


# --- rotation --------------------------------------------------------------------------------


def test_rotation_connection_gives_each_connection_its_own_address(net: Net) -> None:
    sources = []
    for _ in range(6):
        origin, r = fetch(net, "perconn", "v6.test")
        assert proxy_status_source(r) == origin["client"]
        assert log_record(net, origin["target"])["source"] == origin["client"]
        sources.append(ipaddress.IPv6Address(origin["client"]))
    assert all(s in PREFIX for s in sources), sources
    assert len(set(sources)) == len(sources), sources


def test_rotation_client_is_sticky_per_client_address(net: Net) -> None:
    a = [fetch(net, "perclient", "v6.test")[0] for _ in range(2)]
    b = [fetch(net, "perclient", "v6.test", src=net.topo.client_b)[0] for _ in range(2)]
    a_src = {x["client"] for x in a}
    b_src = {x["client"] for x in b}
    assert len(a_src) == 1 and len(b_src) == 1 and a_src != b_src, (a_src, b_src)
    assert all(ipaddress.IPv6Address(s) in PREFIX for s in a_src | b_src)
    assert FIXED_V6 not in a_src | b_src  # a hash into the prefix, not its first address


def test_rotation_user_is_sticky_per_user_and_user_tables_apply(net: Net) -> None:
    def as_user(user: str, host: str = "v6.test", src: str = "") -> dict[str, Any]:
        return fetch(net, "peruser", host, src=src, user=user)[0]

    alice = {as_user("alice")["client"], as_user("alice", src=net.topo.client_b)["client"]}
    bob = {as_user("bob")["client"], as_user("bob")["client"]}
    # Sticky per user, whichever client address the user comes from.
    assert len(alice) == 1 and len(bob) == 1 and alice != bob, (alice, bob)
    assert all(ipaddress.IPv6Address(s) in PREFIX for s in alice | bob)
    # [users.carol]: her own fixed source; [users.dave]: ipv4-only from 203.0.113.11.
    carol = as_user("carol")
    assert carol["client"] == CAROL
    dave = as_user("dave", host="dual.test")
    assert (dave["client"], dave["family"]) == (FIXED_V4, "ipv4")
    record = log_record(net, dave["target"])
    assert (record["user"], record["source"], record["family"]) == ("dave", FIXED_V4, "ipv4")


def test_the_pool_never_hands_one_clients_source_to_another(net: Net) -> None:
    # perclient: A's pooled upstream connection is reused by A's next request (the pool
    # works) but never by B, whose request leaves on a new connection from B's address.
    a1, _ = fetch(net, "perclient", "v6.test")
    a2, _ = fetch(net, "perclient", "v6.test")
    b1, _ = fetch(net, "perclient", "v6.test", src=net.topo.client_b)
    assert a2["conn"] == a1["conn"] and a2["client"] == a1["client"]
    assert b1["conn"] != a1["conn"] and b1["client"] != a1["client"]
    # peruser: the same for two users behind one client address.
    u1 = fetch(net, "peruser", "v6.test", user="alice")[0]
    u2 = fetch(net, "peruser", "v6.test", user="bob")[0]
    assert u2["conn"] != u1["conn"] and u2["client"] != u1["client"]
    # fixed (rotation none): one source for everybody, so connections are shared.
    f1, _ = fetch(net, "fixed", "v6.test")
    f2, _ = fetch(net, "fixed", "v6.test", src=net.topo.client_b)
    assert f2["conn"] == f1["conn"] and f2["client"] == f1["client"] == FIXED_V6


# --- every mode: CONNECT, SOCKS5 CONNECT and UDP ASSOCIATE, TCP ------------------------------


def test_connect_socks5_and_tcp_mode_leave_from_the_source(net: Net) -> None:
    t = net.topo
    mark = marker()
    r = curl(net, f"http://v6.test/1k?m={mark}", "-p", proxy=net.url("fixed"))
    assert r.status == 200 and r.body == ONE_K
    assert seen(net, mark)["client"] == FIXED_V6
    record = net.kushi.records_until(lambda x: x["method"] == "CONNECT")[-1]
    assert record["source"] == FIXED_V6
    mark = marker()
    socks_url = f"socks5h://{t.proxy_client_ip}:{PORTS['fixed']}"
    r = curl(net, f"http://v4.test/1k?m={mark}", "--proxy", socks_url)
    assert r.status == 200 and r.body == ONE_K
    assert seen(net, mark)["client"] == FIXED_V4
    record = net.kushi.record_where(method="SOCKS5-CONNECT", target="v4.test:80")
    assert record["source"] == FIXED_V4
    mark = marker()
    r = curl(net, f"http://{t.proxy_client_ip}:{PORTS['tcp']}/1k?m={mark}")
    assert r.status == 200 and r.body == ONE_K
    tcp_source = seen(net, mark)["client"]
    assert ipaddress.IPv6Address(tcp_source) in PREFIX
    assert net.kushi.records_until(lambda x: x["mode"] == "tcp")[-1]["source"] == tcp_source


def test_socks5_udp_associate_leaves_from_the_source(net: Net) -> None:
    t = net.topo
    mark = marker().encode()

    def associate() -> socks.socksocket:
        sock = socks.socksocket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.set_proxy(socks.SOCKS5, t.proxy_client_ip, PORTS["fixed"], rdns=True)
        sock.settimeout(5)
        sock.bind((t.client_a, 0))
        return sock

    sock = t.client.call(associate)
    try:
        sock.sendto(b"udp-" + mark, ("v6.test", UDP_PORT))
        data, _ = sock.recvfrom(65535)
        assert data == b"echo:udp-" + mark
    finally:
        sock.close()
    assert (b"udp-" + mark, FIXED_V6) in net.echo.seen
    record = net.kushi.record_where(method="SOCKS5-UDP", timeout=10)
    assert record["source"] == FIXED_V6


# --- the status page, and the start-up check -------------------------------------------------


def test_the_status_page_shows_sources(net: Net) -> None:
    origin, _ = fetch(net, "perclient", "v6.test")
    url = f"http://{net.topo.proxy_client_ip}:{ADMIN_PORT}/api/status"
    r = curl(net, url)
    status = json.loads(r.body)
    recent = [x for x in status["recent"] if origin["target"] in x["target"]]
    assert recent and recent[0]["source"] == origin["client"]
    listeners = {x["name"]: x for x in status["config"]["listeners"]}
    assert listeners["perclient"]["source"] == [str(PREFIX)]
    assert listeners["perclient"]["source_rotation"] == "client"
    # User names are not shown (like the htpasswd file): the [users.NAME] tables neither.
    assert status["config"]["users"] == "(redacted)"
    # The start-up log line says which source each listener uses.
    assert f"source {PREFIX}, {FIXED_V4} (rotation none)" in net.kushi.stderr


@pytest.mark.parametrize(
    ("source", "message"),
    [
        (
            "2001:db8:1:5::/64",
            "kushi: listener forward: cannot use source 2001:db8:1:5::/64: 2001:db8:1:5::1 is "
            "not routed to this host (no route: Network is unreachable); add a local route: "
            "ip -6 route add local 2001:db8:1:5::/64 dev lo",
        ),
        (
            "203.0.113.99",
            "kushi: listener forward: cannot use source 203.0.113.99: not an address of this "
            "host (unicast route)",
        ),
    ],
)
def test_an_unusable_source_is_a_startup_error(net: Net, source: str, message: str) -> None:
    argv = [*KUSHI, "serve", "--listen", f"{net.topo.proxy_client_ip}:3199"]
    argv += ["--admin-listen", "off", "--source", source]
    proc = netns.run(net.topo.proxy, argv, timeout=30, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == 1, (proc.returncode, proc.stderr)
    assert proc.stderr.splitlines() == [message]


def test_config_check_finds_an_unusable_source(net: Net, tmp_path: Path) -> None:
    good, bad = tmp_path / "good.toml", tmp_path / "bad.toml"
    write_toml(good, {"source": [str(PREFIX), FIXED_V4]})
    write_toml(bad, {"source": [str(PREFIX), "203.0.113.99"]})
    ok = netns.run(net.topo.proxy, [*KUSHI, "config", "check", str(good)], timeout=30)
    assert ok.returncode == 0, ok.stderr
    proc = netns.run(net.topo.proxy, [*KUSHI, "config", "check", str(bad)], timeout=30)
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [
        "kushi: listener forward: cannot use source 203.0.113.99: not an address of this "
        "host (unicast route)"
    ]


def test_workers_agree_on_a_clients_address_and_a_bad_reload_keeps_the_source(
    net: Net, tmp_path: Path
) -> None:
    """The hash key is made before the workers are forked: each worker maps a client to
    the same address. A reload to a source that cannot be used is refused in one line
    and the running one stays."""
    t = net.topo
    port = 3150
    config = tmp_path / "kushi.toml"

    def write(source: str) -> None:
        write_toml(
            config,
            {
                "listen": [f"{t.proxy_client_ip}:{port}"],
                "allow": ["198.51.100.0/24"],
                "source": [source],
                "source_rotation": "client",
                "admin_listen": [],
                "access_log": "",
                "workers": 2,
                # No pooled upstream: every request opens its own connection, in
                # whichever worker accepted it.
                "limits": {"upstream_pool_size": 0},
            },
        )

    write(str(PREFIX))
    kushi = Kushi(["serve", "--config", str(config)], tmp_path, netns=t.proxy.ns)
    try:
        kushi.wait_ready()
        url = f"http://{t.proxy_client_ip}:{port}"

        def sources() -> set[str]:
            out = set()
            for _ in range(8):
                mark = marker()
                r = curl(net, f"http://v6.test/1k?m={mark}", proxy=url)
                assert r.status == 200, r.stderr
                out.add(seen(net, mark)["client"])
            return out

        before = sources()
        assert len(before) == 1 and ipaddress.IPv6Address(next(iter(before))) in PREFIX
        write("2001:db8:1:5::/64")
        kushi.signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while kushi.stderr.count("reload failed") < 2:  # each worker says so
            assert time.monotonic() < deadline, kushi.stderr
            time.sleep(0.05)
        line = next(x for x in kushi.stderr.splitlines() if "reload failed" in x)
        assert line.endswith(
            "reload failed, keeping the running config: listener forward: cannot use source "
            "2001:db8:1:5::/64: 2001:db8:1:5::1 is not routed to this host (no route: Network "
            "is unreachable); add a local route: ip -6 route add local 2001:db8:1:5::/64 dev lo"
        )
        assert sources() == before
    finally:
        kushi.stop()
