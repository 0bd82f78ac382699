"""SOCKS5 (issue 11) end to end, in network namespaces: an IPv4-only client reaches IPv6.

The standard topology (``tests/support/netns.py``): the ``client`` namespace has IPv4 only
(198.51.100.2), kushi runs dual-stack in ``proxy`` (198.51.100.1 towards the client,
203.0.113.1 and 2001:db8:1::1 towards the origins), ``v6origin`` has IPv6 only
(2001:db8:1::6), ``v4origin`` IPv4 only (203.0.113.4); ``dead6.test`` is an IPv6 address
that never answers. Only the proxy namespace can resolve the ``.test`` names (its
``/etc/hosts``); nothing resolves through DNS.

One kushi with two SOCKS listeners (prefer-ipv6 on :1080, ipv6-only on :1081, connect
timeout 2 s) and an admin listener serving the PAC file. Clients, all in the client
namespace: curl (``socks5h://``, ``socks5://`` with an IPv6 literal), ``nc -X 5``,
PySocks (TCP and UDP ASSOCIATE), headless Chromium (``--proxy-server=socks5://`` and the
PAC file's ``SOCKS5`` entry). Refusals are checked against listening sockets nothing
accepts on: their queues show whether kushi made contact.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import socks  # PySocks

from support import netns
from support import socksclient as sc
from support.chromium import chromium, needs_chromium
from support.kushi_proc import Kushi, write_toml
from support.netns import StandardTopology
from support.origin import ONE_K, OriginProcess, spawn_origin
from support.udpecho import UdpEcho

pytestmark = pytest.mark.timeout(90)

PROXY_PORT = 1080
V6ONLY_PORT = 1081
ADMIN_PORT = 9128
UDP_PORT = 7777
CONNECT_TIMEOUT = 2.0
CLEAN_ENV = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}


@dataclass
class Net:
    topo: StandardTopology
    kushi: Kushi
    v6: OriginProcess
    echo: UdpEcho
    sinks: dict[str, socket.socket] = field(default_factory=dict)

    @property
    def proxy(self) -> tuple[str, int]:
        return (self.topo.proxy_client_ip, PROXY_PORT)


@pytest.fixture(scope="module")
def net(
    netns_topology: StandardTopology, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Net]:
    t = netns_topology
    workdir = tmp_path_factory.mktemp("socks-netns")
    t.proxy.hosts(
        {"v6.test": [t.v6origin_ip], "v4.test": [t.v4origin_ip], "dead6.test": [t.blackhole_net_ip]}
    )
    v6 = spawn_origin(["[::]:80"], workdir / "v6origin.jsonl", ns=t.v6origin, name="v6origin")
    echo = UdpEcho(t.v6origin, t.v6origin_ip, UDP_PORT)
    sinks = {
        "v4": t.v4origin.listen(t.v4origin_ip, 22),
        "v6": t.v6origin.listen(t.v6origin_ip, 22),
    }
    common = {"allow": ["198.51.100.0/24"], "connect_ports": [22, 80, 443]}
    config = workdir / "kushi.toml"
    write_toml(
        config,
        {
            "access_log_format": "json",
            "admin_listen": [f"{t.proxy_client_ip}:{ADMIN_PORT}"],
            "admin_allow": ["198.51.100.0/24"],
            "timeouts": {"connect": CONNECT_TIMEOUT},
        },
        [
            {
                "name": "socks",
                "mode": "socks",
                "listen": [f"{t.proxy_client_ip}:{PROXY_PORT}"],
                **common,
            },
            {
                "name": "v6only",
                "mode": "socks",
                "listen": [f"{t.proxy_client_ip}:{V6ONLY_PORT}"],
                "egress": "ipv6-only",
                **common,
            },
        ],
    )
    kushi = Kushi(
        ["serve", "--config", str(config)],
        workdir,
        netns=t.proxy.ns,
        loopback_destinations=False,
    )
    try:
        kushi.wait_ready()
        yield Net(t, kushi, v6, echo, sinks)
    finally:
        kushi.stop()
        v6.stop()
        echo.close()
        for sink in sinks.values():
            sink.close()
        t.proxy.hosts({})


def curl(net: Net, *args: str) -> subprocess.CompletedProcess[bytes]:
    return netns.run(
        net.topo.client,
        ["curl", "-sS", "--max-time", "20", *args],
        text=False,
        env=CLEAN_ENV,
        timeout=30,
    )


def marker() -> str:
    return uuid.uuid4().hex[:12]


def origin_saw(origin: OriginProcess, mark: str) -> dict[str, Any]:
    deadline = time.monotonic() + 5
    while not (found := [r for r in origin.requests() if mark in r["target"]]):
        assert time.monotonic() < deadline, f"{origin.name} never saw {mark}"
        time.sleep(0.02)
    assert len(found) == 1
    return found[0]


# --- an IPv4-only client reaches an IPv6-only origin ---------------------------------------


def test_socks5h_name_reaches_the_ipv6_only_origin(net: Net) -> None:
    t, mark = net.topo, marker()
    r = curl(
        net, "--proxy", f"socks5h://{t.proxy_client_ip}:{PROXY_PORT}", f"http://v6.test/1k?m={mark}"
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout == ONE_K
    seen = origin_saw(net.v6, mark)
    assert (seen["client"], seen["family"]) == (t.proxy_v6, "ipv6")
    record = net.kushi.record_where(target="v6.test:80")
    assert (record["method"], record["status"], record["family"]) == ("SOCKS5-CONNECT", 200, "ipv6")
    assert record["client"] == t.client_ip
    assert record["upstream"] == f"[{t.v6origin_ip}]:80"


def test_ipv6_literal_from_the_ipv4_only_client(net: Net) -> None:
    t, mark = net.topo, marker()
    url = f"http://[{t.v6origin_ip}]/1k?m={mark}"
    r = curl(net, "--proxy", f"socks5://{t.proxy_client_ip}:{PROXY_PORT}", url)
    assert r.returncode == 0, r.stderr
    assert r.stdout == ONE_K
    assert origin_saw(net.v6, mark)["family"] == "ipv6"
    # The same through PySocks, the library many Python programs use.
    mark = marker()

    def fetch() -> bytes:
        sock = socks.create_connection(
            (t.v6origin_ip, 80),
            timeout=10,
            proxy_type=socks.SOCKS5,
            proxy_addr=t.proxy_client_ip,
            proxy_port=PROXY_PORT,
        )
        with sock:
            sock.sendall(f"GET /1k?m={mark} HTTP/1.0\r\nHost: v6\r\n\r\n".encode())
            out = b""
            while chunk := sock.recv(65536):
                out += chunk
        return out

    assert t.client.call(fetch).endswith(ONE_K)
    assert origin_saw(net.v6, mark)["family"] == "ipv6"


@pytest.mark.skipif(shutil.which("nc") is None, reason="netcat-openbsd (make test installs it)")
def test_nc_x5_by_name(net: Net) -> None:
    t, mark = net.topo, marker()
    proc = netns.run(
        t.client,
        ["nc", "-X", "5", "-x", f"{t.proxy_client_ip}:{PROXY_PORT}", "v6.test", "80"],
        input=f"GET /1k?m={mark} HTTP/1.0\r\nHost: v6.test\r\n\r\n".encode(),
        text=False,
        timeout=20,
    )
    assert proc.stdout.endswith(ONE_K), proc.stderr
    assert origin_saw(net.v6, mark)["family"] == "ipv6"


# --- refusals: the right reply code, fast, and no contact ---------------------------------


def _refusal(net: Net, port: int, host: str, dest_port: int) -> tuple[int, float]:
    def run() -> tuple[int, float]:
        start = time.monotonic()
        sock, reply = sc.connect((net.topo.proxy_client_ip, port), host, dest_port)
        with sock:
            assert reply is not None
            assert sc.closed_by_peer(sock, 5.0)
        return reply[0], time.monotonic() - start

    return net.topo.client.call(run)


def test_ipv6_only_and_an_a_only_name_fail_fast_with_network_unreachable(net: Net) -> None:
    code, elapsed = _refusal(net, V6ONLY_PORT, "v4.test", 22)
    assert code == 0x03
    assert elapsed < 1.0  # no connection attempt, no timeout: nothing to wait for
    assert sc.pending_accepts(net.sinks["v4"]) == 0
    record = net.kushi.record_where(listener="v6only", target="v4.test:22")
    assert record["error"] == "destination_not_found"
    assert "v4.test has no IPv6 address" in record["details"]


def test_unknown_name_is_host_unreachable(net: Net) -> None:
    code, _ = _refusal(net, PROXY_PORT, "nowhere.test", 22)
    assert code == 0x04
    assert net.kushi.record_where(target="nowhere.test:22")["error"] == "dns_error"


def test_connect_timeout_is_ttl_expired(net: Net) -> None:
    code, elapsed = _refusal(net, PROXY_PORT, "dead6.test", 80)
    assert code == 0x06
    assert CONNECT_TIMEOUT * 0.8 < elapsed < CONNECT_TIMEOUT + 3
    assert net.kushi.record_where(target="dead6.test:80")["error"] == "connection_timeout"


def test_port_not_allowed_before_contact(net: Net) -> None:
    code, _ = _refusal(net, PROXY_PORT, net.topo.v6origin_ip, 25)
    assert code == 0x02
    record = net.kushi.record_where(target=f"[{net.topo.v6origin_ip}]:25")
    assert record["error"] == "http_request_denied"


def test_destination_policy_before_contact(net: Net) -> None:
    # The proxy's own loopback: refused by the built-in destination policy.
    code, _ = _refusal(net, PROXY_PORT, "::1", 22)
    assert code == 0x02
    assert "a loopback address" in net.kushi.record_where(target="[::1]:22")["details"]


def test_the_sinks_do_count_contact(net: Net) -> None:
    """The control for the no-contact checks: a CONNECT kushi does make shows up."""
    t = net.topo

    def run() -> tuple[int, str, int] | None:
        sock, reply = sc.connect((t.proxy_client_ip, V6ONLY_PORT), t.v6origin_ip, 22)
        sock.close()
        return reply

    reply = t.client.call(run)
    assert reply is not None and reply[0] == 0x00
    assert reply[1] == t.proxy_v6  # BND.ADDR: the address kushi connected from
    assert sc.pending_accepts(net.sinks["v6"]) == 1


# --- UDP ASSOCIATE over IPv6 ----------------------------------------------------------------


def test_udp_associate_relays_over_ipv6_only_for_its_client(net: Net) -> None:
    t = net.topo
    mark = marker().encode()

    def associate() -> socks.socksocket:
        sock = socks.socksocket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.set_proxy(socks.SOCKS5, t.proxy_client_ip, PROXY_PORT, rdns=True)
        sock.settimeout(5)
        sock.bind((t.client_ip, 0))
        return sock

    sock = t.client.call(associate)
    relay = socket.socket.getpeername(sock)  # where PySocks sends its datagrams
    try:
        sock.sendto(b"literal-" + mark, (t.v6origin_ip, UDP_PORT))
        data, source = sock.recvfrom(65535)
        assert data == b"echo:literal-" + mark
        assert source[:2] == (t.v6origin_ip, UDP_PORT)
        sock.sendto(b"name-" + mark, ("v6.test", UDP_PORT))
        data, _ = sock.recvfrom(65535)
        assert data == b"echo:name-" + mark

        # The same relay, addressed from another port of the client and from another
        # host: dropped, never reaching the origin.
        packet = sc.udp_packet(t.v6origin_ip, UDP_PORT, b"intruder-" + mark)
        other = t.client.new_socket(socket.AF_INET, socket.SOCK_DGRAM)
        stranger = t.proxy.new_socket(socket.AF_INET, socket.SOCK_DGRAM)
        with other, stranger:
            other.sendto(packet, relay)
            stranger.sendto(packet, relay)
            # And a fragment from the client itself (FRAG 1): dropped too.
            fragment = sc.udp_packet(t.v6origin_ip, UDP_PORT, b"fragment-" + mark, frag=1)
            socket.socket.send(sock, fragment)
            sock.sendto(b"after-" + mark, (t.v6origin_ip, UDP_PORT))
            assert sock.recvfrom(65535)[0] == b"echo:after-" + mark
    finally:
        sock.close()
    seen = [(d, src) for d, src in net.echo.seen if mark in d]
    assert seen == [
        (b"literal-" + mark, t.proxy_v6),
        (b"name-" + mark, t.proxy_v6),
        (b"after-" + mark, t.proxy_v6),
    ]
    # The association ended with its TCP connection: its record is written then.
    record = net.kushi.record_where(method="SOCKS5-UDP", client=t.client_ip, timeout=10)
    assert record["status"] == 200 and record["family"] == "ipv6"
    assert (record["datagrams_in"], record["datagrams_out"]) == (3, 3)
    assert record["bytes_in"] == 3 * len(mark) + len(b"literal-name-after-")
    assert "3 datagrams dropped" in record["details"]
    assert record["upstream"] == f"[{t.v6origin_ip}]:{UDP_PORT}"
    # ... and the metrics count the datagrams by direction and family.
    url = f"http://{t.proxy_client_ip}:{ADMIN_PORT}/metrics"

    def scrape() -> str:
        with urllib.request.urlopen(url, timeout=5) as resp:
            text: str = resp.read().decode()
        return text

    samples = {
        line.split("{")[1].split("}")[0]: float(line.rsplit(" ", 1)[1])
        for line in t.client.call(scrape).splitlines()
        if line.startswith("kushi_socks_udp_datagrams_total{")
    }
    labels = 'direction="{}",family="ipv6",listener="socks",mode="socks"'
    assert samples[labels.format("client_to_upstream")] >= 3
    assert samples[labels.format("upstream_to_client")] >= 3


# --- Chromium, directly and through the PAC file ---------------------------------------------


@needs_chromium
def test_chromium_through_socks5_and_the_pac_file(net: Net) -> None:
    t = net.topo
    for args in (
        [f"--proxy-server=socks5://{t.proxy_client_ip}:{PROXY_PORT}"],
        [f"--proxy-pac-url=http://{t.proxy_client_ip}:{ADMIN_PORT}/proxy.pac"],
    ):
        mark = marker()
        result = chromium(
            [*args, "--virtual-time-budget=5000", "--dump-dom", f"http://v6.test/1k?m={mark}"],
            ns=t.client,
        )
        assert ONE_K.decode().splitlines()[0] in result.stdout, result.stdout[:2000]
        seen = origin_saw(net.v6, mark)
        assert (seen["client"], seen["family"]) == (t.proxy_v6, "ipv6")
    records = [r for r in net.kushi.json_records() if r["target"] == "v6.test:80"]
    assert len(records) >= 2 and {r["method"] for r in records} == {"SOCKS5-CONNECT"}
