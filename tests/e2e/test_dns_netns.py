"""Issue 12 items 1-3 end to end: resolution from the DNS up, and NAT64 through tayga.

Resolution topology (``dnsnet``)::

    proxy 2001:db8:53::1 + 203.0.113.1   <- kushi, curl and the test DNS server
      |                                     (support/dnsserver.py on 127.0.0.1:53, which the
    origin 2001:db8:53::2 + 203.0.113.2    namespace's resolv.conf names; no /etc/hosts entry)
           2001:db8:53::3 + 203.0.113.3

The DNS server delays or drops AAAA and A answers per name and is told a new zone while
kushi runs (it reads its zone file again on every change). The resolver timeout is 4 s;
every fault below is answered without waiting on the slower family, in well under 1 s.

NAT64 topology (``natnet``)::

    v6proxy 2001:db8:46::2 (no IPv4 at all, not even 127.0.0.1)  <- kushi, curl, DNS on ::1
      |
    nat64 2001:db8:46::1 | 203.0.113.1   <- tayga: 2001:db8:64:ff9b::/96 <-> 198.51.100.0/24
      |
    v4origin 203.0.113.10 (IPv4 only)

kushi discovers the prefix from ipv4only.arpa (RFC 7050; the test DNS server plays DNS64's
part for that one name) because its namespace has no IPv4 route, and reaches the IPv4-only
origin by name (A records only) and by IPv4 literal.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from support import netns
from support.kushi_proc import Kushi, write_toml
from support.netns import Topology
from support.origin import ONE_K, OriginProcess, spawn_origin

pytestmark = [
    pytest.mark.timeout(90),
    pytest.mark.netns,
    pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed"),
]

DNS_SERVER = Path(__file__).resolve().parents[1] / "support" / "dnsserver.py"
CLEAN_ENV = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
#: The resolver timeout (resolv.conf ``timeout:4 attempts:1``, ``[timeouts] dns = 4``).
DNS_TIMEOUT = 4.0
#: How long the slow family's answer takes; the fast family must not wait for it.
SLOW = 3.0
FAST = 1.0

ORIGIN6, ORIGIN4 = "2001:db8:53::2", "203.0.113.2"
OTHER6, OTHER4 = "2001:db8:53::3", "203.0.113.3"
NOBODY4 = "203.0.113.99"
STARTED = time.monotonic()

ZONE: dict[str, Any] = {
    "$negative_ttl": 60,
    "dual.test": {"AAAA": [ORIGIN6], "A": [ORIGIN4]},
    "slow6.test": {"AAAA": [ORIGIN6], "A": [ORIGIN4], "delay": {"AAAA": SLOW}},
    "lost6.test": {"AAAA": [ORIGIN6], "A": [ORIGIN4], "drop": ["AAAA"]},
    "slow4.test": {"AAAA": [ORIGIN6], "A": [ORIGIN4], "delay": {"A": SLOW}},
    "moving.test": {"A": [ORIGIN4], "ttl": 2},
    # The A record points at an address on the link where no host answers (the attempt
    # hangs in ARP); the AAAA answer comes 0.5 s later and must join the race.
    "join6.test": {"AAAA": [ORIGIN6], "A": [NOBODY4], "delay": {"AAAA": 0.5}},
    "stale.test": {"AAAA": [ORIGIN6], "ttl": 1},
    "broken.test": {"rcode": "SERVFAIL"},
}


class DNSProcess:
    """support/dnsserver.py as a program inside a namespace, with its zone file."""

    def __init__(self, ns: netns.Host, listen: str, workdir: Path, zone: dict[str, Any]):
        self.ns = ns
        self.listen = listen
        self.zone_path = workdir / f"zone-{ns.name}.json"
        self.log_path = workdir / f"queries-{ns.name}.log"
        self.proc: subprocess.Popen[str] | None = None
        self.set_zone(zone)
        self.start()

    def set_zone(self, zone: dict[str, Any]) -> None:
        tmp = self.zone_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(zone))
        tmp.replace(self.zone_path)
        self.zone = zone

    def start(self) -> None:
        self.proc = self.ns.popen(
            [
                sys.executable,
                str(DNS_SERVER),
                "--listen",
                self.listen,
                "--zone",
                str(self.zone_path),
                "--log",
                str(self.log_path),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line.strip() == "ready", (line, self.proc.stderr.read() if self.proc.stderr else "")

    def stop(self) -> None:
        if self.proc is not None:
            netns.stop_process(self.proc)
            self.proc = None

    def queries(self, name: str) -> list[str]:
        text = self.log_path.read_text() if self.log_path.exists() else ""
        return [line.rsplit(" ", 1)[1] for line in text.splitlines() if f" {name} " in line]


@dataclass
class Result:
    returncode: int
    status: int
    headers: dict[str, str]
    body: bytes
    elapsed: float
    stderr: str


def curl(ns: netns.Host, proxy: str, url: str) -> Result:
    argv = ["curl", "-sS", "--max-time", "20", "-D", "-", "-x", proxy, url]
    start = time.monotonic()
    proc = ns.run(argv, text=False, env=CLEAN_ENV, timeout=30)
    elapsed = time.monotonic() - start
    raw, _, body = proc.stdout.partition(b"\r\n\r\n")
    lines = raw.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1]) if lines[0].startswith("HTTP/") else 0
    headers = {}
    for line in lines[1:]:
        key, _, value = line.partition(":")
        headers[key.strip().lower()] = value.strip()
    return Result(proc.returncode, status, headers, body, elapsed, proc.stderr.decode())


def kushi_records(kushi: Kushi, needle: str, timeout: float = 5.0) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        found = [r for r in kushi.json_records() if needle in r["target"]]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.02)


# --- resolution ---------------------------------------------------------------------------


@dataclass
class DnsNet:
    topo: Topology
    proxy: netns.Host
    dns: DNSProcess
    origin: OriginProcess
    kushi: Kushi
    url: str


@pytest.fixture(scope="module")
def dnsnet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DnsNet]:
    reason = netns.netns_available()
    if reason is not None:
        pytest.skip(f"network namespaces unavailable: {reason}")
    work = tmp_path_factory.mktemp("dns-netns")
    with Topology() as topo:
        proxy = topo.add_host("proxy")
        origin = topo.add_host("origin")
        topo.link(
            proxy,
            origin,
            ["2001:db8:53::1/64", "203.0.113.1/24"],
            [f"{ORIGIN6}/64", f"{ORIGIN4}/24", f"{OTHER6}/64", f"{OTHER4}/24"],
        )
        topo.wait_ready()
        Path(f"/etc/netns/{proxy.ns}/resolv.conf").write_text(
            f"nameserver 127.0.0.1\noptions timeout:{DNS_TIMEOUT:g} attempts:1\n"
        )
        dns = DNSProcess(proxy, "127.0.0.1:53", work, ZONE)
        server = spawn_origin(
            ["[::]:80", "0.0.0.0:80"], work / "origin.jsonl", ns=origin, name="origin"
        )
        config = work / "kushi.toml"
        write_toml(config, {"timeouts": {"dns": DNS_TIMEOUT}})
        kushi = Kushi(
            [
                "serve",
                "--config",
                str(config),
                "--listen",
                "127.0.0.1:3128",
                "--access-log-format",
                "json",
            ],
            work,
            wait_for=[("127.0.0.1", 3128)],
            netns=proxy.ns,
            loopback_destinations=False,
        )
        try:
            yield DnsNet(topo, proxy, dns, server, kushi, "http://127.0.0.1:3128")
        finally:
            kushi.stop()
            server.stop()
            dns.stop()


def fetch(net: DnsNet, name: str, path: str = "/1k") -> Result:
    return curl(net.proxy, net.url, f"http://{name}{path}")


def test_slow_aaaa_is_not_waited_for(dnsnet: DnsNet) -> None:
    r = fetch(dnsnet, "slow6.test", "/1k?slow6")
    assert (r.returncode, r.status, r.body) == (0, 200, ONE_K), r.stderr
    assert r.elapsed < FAST, f"{r.elapsed:.2f} s: waited for the {SLOW:g} s AAAA answer"
    (record,) = kushi_records(dnsnet.kushi, "slow6.test")
    assert record["family"] == "ipv4"
    assert record["upstream"] == f"{ORIGIN4}:80"


def test_lost_aaaa_is_not_waited_for(dnsnet: DnsNet) -> None:
    r = fetch(dnsnet, "lost6.test", "/1k?lost6")
    assert (r.returncode, r.status, r.body) == (0, 200, ONE_K), r.stderr
    assert r.elapsed < FAST, f"{r.elapsed:.2f} s: waited for the lost AAAA answer"
    (record,) = kushi_records(dnsnet.kushi, "lost6.test")
    assert record["family"] == "ipv4"


def test_slow_a_does_not_delay_ipv6(dnsnet: DnsNet) -> None:
    r = fetch(dnsnet, "slow4.test", "/1k?slow4")
    assert (r.returncode, r.status, r.body) == (0, 200, ONE_K), r.stderr
    assert r.elapsed < FAST, f"{r.elapsed:.2f} s: waited for the {SLOW:g} s A answer"
    (record,) = kushi_records(dnsnet.kushi, "slow4.test")
    assert record["family"] == "ipv6"
    assert record["upstream"] == f"[{ORIGIN6}]:80"


def test_a_late_aaaa_answer_joins_the_race(dnsnet: DnsNet) -> None:
    r = fetch(dnsnet, "join6.test", "/1k?join6")
    assert (r.returncode, r.status, r.body) == (0, 200, ONE_K), r.stderr
    assert r.elapsed < 1.5, f"{r.elapsed:.2f} s"
    (record,) = kushi_records(dnsnet.kushi, "join6.test")
    assert record["family"] == "ipv6"
    assert any(a.startswith(f"ipv4 {NOBODY4}:80 no answer") for a in record["attempts"]), record


def test_a_record_change_is_picked_up_after_its_ttl(dnsnet: DnsNet) -> None:
    # /close/N: the origin closes after each response, so no pooled connection hides the
    # address kushi resolves for the next request.
    first = fetch(dnsnet, "moving.test", "/close/64?moving1")
    assert first.status == 200 and first.headers["proxy-status"].find(ORIGIN4) > 0
    dnsnet.dns.set_zone({**dnsnet.dns.zone, "moving.test": {"A": [OTHER4], "ttl": 2}})
    cached = fetch(dnsnet, "moving.test", "/close/64?moving2")
    assert f'next-hop="{ORIGIN4}:80"' in cached.headers["proxy-status"]  # within the TTL
    time.sleep(2.5)
    moved = fetch(dnsnet, "moving.test", "/close/64?moving3")
    assert moved.status == 200
    assert f'next-hop="{OTHER4}:80"' in moved.headers["proxy-status"]


def test_negative_answers_are_cached_and_carry_the_rcode(dnsnet: DnsNet) -> None:
    for i in range(3):
        r = fetch(dnsnet, "missing.test", f"/?missing{i}")
        assert r.status == 502
        assert "error=dns_error" in r.headers["proxy-status"]
        assert 'rcode="NXDOMAIN"' in r.headers["proxy-status"]
    # One AAAA and one A query, then the SOA minimum (60 s) answered the rest.
    assert sorted(dnsnet.dns.queries("missing.test")) == ["A", "AAAA"]
    records = kushi_records(dnsnet.kushi, "missing.test")
    assert len(records) == 3 and all(r["error"] == "dns_error" for r in records)


def test_servfail_reaches_proxy_status(dnsnet: DnsNet) -> None:
    r = fetch(dnsnet, "broken.test", "/?broken")
    assert r.status == 502
    assert 'rcode="SERVFAIL"' in r.headers["proxy-status"]


def test_stale_answer_when_the_resolver_is_down(dnsnet: DnsNet) -> None:
    first = fetch(dnsnet, "stale.test", "/close/1024?stale1")  # nothing pooled
    assert first.status == 200
    time.sleep(1.5)  # past the 1 s TTL
    dnsnet.dns.stop()
    try:
        r = fetch(dnsnet, "stale.test", "/close/1024?stale2")
        assert (r.returncode, r.status, len(r.body)) == (0, 200, 1024), r.stderr
        assert "stale DNS answer for stale.test" in r.headers["proxy-status"]
        (record,) = kushi_records(dnsnet.kushi, "stale2")
        assert any("stale DNS answer" in note for note in record["notes"]), record
        assert "nameservers unreachable" in " ".join(record["notes"])
        assert "using stale AAAA answer for stale.test" in dnsnet.kushi.stderr
        # A name kushi never saw has no stale answer: the error says the resolver failed.
        down = fetch(dnsnet, "never-seen.test", "/?never")
        assert down.status in (502, 504)
        assert "error=dns_" in down.headers["proxy-status"]
    finally:
        dnsnet.dns.start()


def test_no_unexpected_errors_in_kushi(dnsnet: DnsNet) -> None:
    """The queries left behind (the lost AAAA, answers after the race was won) ended
    quietly: nothing unretrieved, no traceback."""
    time.sleep(max(0.0, DNS_TIMEOUT + 0.5 - (time.monotonic() - STARTED)))
    assert dnsnet.kushi.proc.poll() is None
    assert "Traceback" not in dnsnet.kushi.stderr, dnsnet.kushi.stderr[-3000:]
    assert "never retrieved" not in dnsnet.kushi.stderr


# --- NAT64 --------------------------------------------------------------------------------

PREFIX = "2001:db8:64:ff9b::/96"
V4ORIGIN = "203.0.113.10"
POOL = "198.51.100.0/24"


@dataclass
class NatNet:
    v6proxy: netns.Host
    origin: OriginProcess
    kushi: Kushi
    url: str


@pytest.fixture(scope="module")
def natnet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatNet]:
    reason = netns.netns_available()
    if reason is not None:
        pytest.skip(f"network namespaces unavailable: {reason}")
    if shutil.which("tayga") is None:
        pytest.skip("tayga is not installed (make sysdeps)")
    work = tmp_path_factory.mktemp("nat64-netns")
    with Topology() as topo:
        v6proxy = topo.add_host("v6proxy", ipv4=False)
        nat64 = topo.add_host("nat64", forwarding=True)
        v4origin = topo.add_host("v4origin", ipv6=False)
        topo.link(v6proxy, nat64, ["2001:db8:46::2/64"], ["2001:db8:46::1/64"])
        topo.link(nat64, v4origin, ["203.0.113.1/24"], [f"{V4ORIGIN}/24"])
        topo.route(v6proxy, "default", "2001:db8:46::1")
        topo.route(v4origin, "default", "203.0.113.1")
        # No IPv4 at all in kushi's namespace, not even on loopback.
        netns.run(None, ["ip", "-n", v6proxy.ns, "addr", "del", "127.0.0.1/8", "dev", "lo"])
        conf = work / "tayga.conf"
        conf.write_text(
            f"tun-device nat64t\nipv4-addr 198.51.100.1\nprefix {PREFIX}\n"
            f"dynamic-pool {POOL}\ndata-dir {work}/tayga\n"
        )
        (work / "tayga").mkdir()
        nat64.run(["tayga", "--mktun", "-c", str(conf)], check=True)
        for argv in (
            ["ip", "link", "set", "nat64t", "up"],
            ["ip", "route", "add", POOL, "dev", "nat64t"],
            ["ip", "route", "add", PREFIX, "dev", "nat64t"],
        ):
            nat64.run(argv, check=True)
        tayga = nat64.popen(
            ["tayga", "-d", "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        topo.wait_ready()
        Path(f"/etc/netns/{v6proxy.ns}/resolv.conf").write_text(
            "nameserver ::1\noptions timeout:2 attempts:1\n"
        )
        Path(f"/etc/netns/{v6proxy.ns}/hosts").write_text("::1 localhost\n")
        dns = DNSProcess(
            v6proxy,
            "[::1]:53",
            work,
            {
                # The DNS64 answer for the well-known name (RFC 7050 section 2.2).
                "ipv4only.arpa": {"AAAA": ["2001:db8:64:ff9b::c000:aa"]},
                "a4.test": {"A": [V4ORIGIN]},
            },
        )
        origin = spawn_origin(["0.0.0.0:80"], work / "origin.jsonl", ns=v4origin, name="v4")
        config = work / "kushi.toml"
        write_toml(config, {"admin_listen": [], "egress": "ipv6-only"})
        kushi = Kushi(
            [
                "serve",
                "--config",
                str(config),
                "--listen",
                "[::1]:3128",
                "--allow",
                "::1/128",
                "--access-log-format",
                "json",
            ],
            work,
            wait_for=[("::1", 3128)],
            netns=v6proxy.ns,
            loopback_destinations=False,
        )
        try:
            yield NatNet(v6proxy, origin, kushi, "http://[::1]:3128")
        finally:
            kushi.stop()
            origin.stop()
            dns.stop()
            netns.stop_process(tayga)


def test_nat64_prefix_is_discovered_at_start(natnet: NatNet) -> None:
    # (The listening socket is bound before the worker starts: wait for its log line.)
    natnet.kushi.wait_ready()
    assert f"NAT64 prefix {PREFIX} (from ipv4only.arpa)" in natnet.kushi.stderr


@pytest.mark.parametrize("host", ["a4.test", V4ORIGIN])
def test_ipv4_only_origin_through_nat64(natnet: NatNet, host: str) -> None:
    marker = f"nat64-{host}"
    r = curl(natnet.v6proxy, natnet.url, f"http://{host}/1k?{marker}")
    assert (r.returncode, r.status, r.body) == (0, 200, ONE_K), (r.stderr, r.headers)
    status = r.headers["proxy-status"]
    assert 'next-hop="[2001:db8:64:ff9b::cb00:710a]:80"' in status
    assert f"nat64 (IPv4 {V4ORIGIN})" in status
    (record,) = kushi_records(natnet.kushi, marker)
    assert record["family"] == "nat64"
    assert f"IPv4 {V4ORIGIN} via NAT64" in record["notes"]
    # The origin saw tayga's IPv4 pool address: the request really crossed the translator.
    (seen,) = [r for r in natnet.origin.requests() if marker in r.get("target", "")]
    assert seen["family"] == "ipv4" and seen["client"].startswith("198.51.100.")
