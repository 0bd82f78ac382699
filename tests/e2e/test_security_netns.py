"""Destination policy cases that need addresses other than loopback, in network namespaces.

``proxy`` (2001:db8:70::1/64, 198.51.100.1/24) runs kushi; its only route out is a veth to
``sink``, which neither forwards nor answers for other addresses: no packet can leave the
machine. Denied targets (NAT64, 6to4, Teredo, IPv4-compatible, private) are only attempted
targets: the TCP ``ActiveOpens`` counter of the proxy namespace shows that kushi did not
even try to connect. ``client`` (three addresses in 2001:db8:71::/64) tests the /64 limit.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from support import netns
from support.kushi_proc import Kushi, write_toml
from support.netns import Topology

pytestmark = [pytest.mark.netns, pytest.mark.timeout(120)]

PORT = 3128


class Setup:
    topo: Topology
    proxy: netns.Host
    client: netns.Host


@pytest.fixture(scope="module")
def topo() -> Iterator[Setup]:
    reason = netns.netns_available()
    if reason:
        pytest.skip(reason)
    with Topology() as t:
        s = Setup()
        s.topo = t
        s.proxy = t.add_host("proxy")
        sink = t.add_host("sink")
        s.client = t.add_host("client", ipv4=False)
        t.link(
            s.proxy,
            sink,
            ["2001:db8:70::1/64", "198.51.100.1/24"],
            ["2001:db8:70::2/64", "198.51.100.2/24"],
        )
        t.route(s.proxy, "default", "2001:db8:70::2")
        t.route(s.proxy, "default", "198.51.100.2")
        t.link(
            s.client,
            s.proxy,
            ["2001:db8:71::10/64", "2001:db8:71::11/64", "2001:db8:71::12/64"],
            ["2001:db8:71::1/64"],
        )
        t.wait_ready()
        yield s


def active_opens(host: netns.Host) -> int:
    text = host.call(lambda: Path("/proc/thread-self/net/snmp").read_text())
    lines = [line.split() for line in text.splitlines() if line.startswith("Tcp:")]
    return int(lines[1][lines[0].index("ActiveOpens")])


def start(tmp_path: Path, s: Setup, **top: object) -> Kushi:
    config = tmp_path / "k.toml"
    write_toml(
        config,
        {
            "listen": [f"127.0.0.1:{PORT}", f"[2001:db8:71::1]:{PORT}", f"[::]:{PORT + 1}"],
            "allow": ["127.0.0.0/8", "2001:db8:71::/64"],
            "access_log_format": "json",
            "admin_listen": [],
            "connect_ports": [443, PORT + 1],
            "timeouts": {"connect": 3.0},
            **top,
        },
    )
    kushi = Kushi(
        ["serve", "--config", str(config)], tmp_path, netns=s.proxy.ns, loopback_destinations=False
    )
    kushi.wait_ready()
    return kushi


def ask(s: Setup, request: bytes) -> bytes:
    def run() -> bytes:
        with socket.create_connection(("127.0.0.1", PORT), timeout=10) as sock:
            sock.sendall(request)
            data = b""
            while b"\r\n\r\n" not in data and (chunk := sock.recv(65536)):
                data += chunk
            return data

    return s.proxy.call(run)


TARGETS = [
    "[64:ff9b::a00:5]",  # NAT64 well-known prefix, 10.0.0.5
    "[64:ff9b::a9fe:a9fe]",  # 169.254.169.254 (metadata)
    "[64:ff9b:1::a00:5]",  # local-use NAT64 prefix
    "[2002:a00:5::1]",  # 6to4 of 10.0.0.5
    "[::7f00:1]",  # IPv4-compatible 127.0.0.1
    "[2001:0:cb00:7101::f5ff:fffa]",  # Teredo, client 10.0.0.5 (inverted bits)
    "[3fff:1:2::a00:5]",  # the configured NAT64 prefix 3fff:1:2::/96
    "10.0.0.5",  # private, denied by default
    "100.100.100.200",  # CGNAT (a cloud metadata address)
    "[fd00::5]",  # ULA
]


@pytest.fixture(scope="module")
def kushi(topo: Setup, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kushi]:
    k = start(
        tmp_path_factory.mktemp("secns"),
        topo,
        deny_destinations=["10.0.0.0/8", "169.254.0.0/16"],
        nat64_prefixes=["64:ff9b::/96", "3fff:1:2::/96"],
        limits={"max_connections_per_client": 2},
    )
    yield k
    k.stop()


@pytest.mark.parametrize("target", TARGETS)
def test_embedded_and_private_addresses_refused_before_any_connect(
    topo: Setup, kushi: Kushi, target: str
) -> None:
    before = active_opens(topo.proxy)
    began = time.monotonic()
    answer = ask(topo, f"GET http://{target}/ HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
    assert answer.startswith(b"HTTP/1.1 502 "), answer[:300]
    assert b"error=destination_ip_prohibited" in answer, answer[:600]
    assert time.monotonic() - began < 2.0  # well under the 3 s connect timeout
    # Our own client connection is one active open; kushi made none.
    assert active_opens(topo.proxy) - before == 1


def test_own_address_refused_by_default(topo: Setup, kushi: Kushi) -> None:
    """A service of the host bound to [::] and 0.0.0.0 is not reachable through the proxy
    at the host's addresses; a CONNECT to kushi's own [::] listener at the host's address
    is refused too (it used to nest tunnels)."""
    service = [topo.proxy.listen("::", PORT + 2), topo.proxy.listen("0.0.0.0", PORT + 2)]
    try:
        for addr in ("[2001:db8:70::1]", "198.51.100.1"):
            target = f"{addr}:{PORT + 2}"
            answer = ask(topo, f"GET http://{target}/ HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
            assert answer.startswith(b"HTTP/1.1 502 "), answer[:300]
            assert b"error=destination_ip_prohibited" in answer, answer[:600]
            assert b"this host" in answer
        for sock in service:
            sock.setblocking(False)
            with pytest.raises(BlockingIOError):
                sock.accept()
    finally:
        for sock in service:
            sock.close()
    target = f"[2001:db8:70::1]:{PORT + 1}"
    answer = ask(topo, f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
    assert answer.startswith(b"HTTP/1.1 502 "), answer[:300]
    assert b"error=proxy_loop_detected" in answer


def test_per_client_limit_counts_an_ipv6_slash_64(topo: Setup, kushi: Kushi) -> None:
    def run() -> bytes:
        held = []
        try:
            for source in ("2001:db8:71::10", "2001:db8:71::11"):
                sock = socket.socket(socket.AF_INET6)
                sock.bind((source, 0))
                sock.connect(("2001:db8:71::1", PORT))
                held.append(sock)
            time.sleep(0.2)
            third = socket.socket(socket.AF_INET6)
            third.settimeout(5)
            third.bind(("2001:db8:71::12", 0))
            third.connect(("2001:db8:71::1", PORT))
            held.append(third)
            third.sendall(b"GET http://[2001:db8:70::2]/ HTTP/1.1\r\nHost: x\r\n\r\n")
            return third.recv(4096)
        finally:
            for sock in held:
                sock.close()

    answer = topo.client.call(run)
    assert answer.startswith(b"HTTP/1.1 503 "), answer[:300]
    assert b"connection_limit_reached" in answer
