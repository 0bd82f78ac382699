"""Self-tests of the test infrastructure: the origin server (driven by a real curl) and the
network-namespace topologies."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import select
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from support import netns
from support.netns import ETC_NETNS_DIR, OWNER_DIR, StandardTopology, Topology, list_netns
from support.origin import (
    ONE_K,
    OriginProcess,
    pattern_bytes,
    pattern_chunks,
    pattern_sha256,
    spawn_origin,
)
from support.rawhttp import ws_client_frame, ws_read_frame

pytestmark = pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")


def curl(*args: str, ns: Any = None) -> subprocess.CompletedProcess[bytes]:
    """Run curl (inside ``ns`` when given); never through an environment proxy."""
    argv = ["curl", "-sS", "--noproxy", "*", "--max-time", "10", *args]
    return netns.run(ns, argv, text=False, timeout=20)


def curl_ok(*args: str, ns: Any = None) -> bytes:
    proc = curl(*args, ns=ns)
    assert proc.returncode == 0, proc.stderr.decode()
    return proc.stdout


def parse_head(raw: bytes) -> tuple[int, dict[str, str]]:
    """Status and headers (lower-cased names; the last value wins) of a curl -D dump: the last
    response head (skipping 100 Continue) plus any trailers dumped after it."""
    blocks = [b for b in raw.decode("latin-1").split("\r\n\r\n") if b.strip()]
    last = max(i for i, b in enumerate(blocks) if b.startswith("HTTP/"))
    lines = "\r\n".join(blocks[last:]).split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(lines[0].split()[1]), headers


def raw_exchange(host: str, port: int, data: bytes, wait: float = 2.0) -> bytes:
    """Send ``data`` and read until the server closes (or ``wait`` passes)."""
    with socket.create_connection((host, port), timeout=wait) as s:
        s.sendall(data)
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
        except TimeoutError:
            pass
        return out


# ---------------------------------------------------------------------------------------------
# The origin on loopback


@pytest.mark.parametrize("host", ["::1", "127.0.0.1"])
def test_origin_endpoints_with_curl(origin_factory: Any, tmp_path: Path, host: str) -> None:
    origin: OriginProcess = origin_factory(["[::1]:0", "127.0.0.1:0"], name="loop")
    assert len(origin.addresses) == 2
    # The second :0 listener takes the first one's port when it is free on 127.0.0.1 too;
    # when an ephemeral port of some other connection holds it, it gets its own (seen
    # once in a full run). Either way each endpoint is a real, distinct listener.
    ports = [port for _, port in origin.endpoints]
    assert all(port > 0 for port in ports), origin.endpoints
    base = origin.url("", host=host)
    hdrs = tmp_path / "headers.txt"

    body = curl_ok("-D", str(hdrs), f"{base}/1k")
    status, h = parse_head(hdrs.read_bytes())
    assert (status, body, h["content-length"]) == (200, ONE_K, "1024")
    assert h["content-type"] == "text/plain"
    assert h["server"] == "kushi-test-origin" and h["x-origin-name"] == "loop"

    body = curl_ok(f"{base}/bytes/300001")
    assert len(body) == 300001 and hashlib.sha256(body).hexdigest() == pattern_sha256(300001)

    body = curl_ok("-D", str(hdrs), f"{base}/chunked/25000")
    status, h = parse_head(hdrs.read_bytes())
    assert h["transfer-encoding"] == "chunked" and h["trailer"] == "X-Trailer"
    assert "content-length" not in h and h["x-trailer"] == "done"  # curl dumps trailers too
    assert body == pattern_bytes(25000)
    raw = curl_ok("--raw", f"{base}/chunked/25000")
    assert raw.startswith(b"2710\r\n") and raw.endswith(b"\r\n0\r\nX-Trailer: done\r\n\r\n")

    body = curl_ok("-D", str(hdrs), f"{base}/close/70000")
    status, h = parse_head(hdrs.read_bytes())
    assert "content-length" not in h and "transfer-encoding" not in h
    assert h["connection"] == "close" and body == pattern_bytes(70000)

    payload = os.urandom(100_000)
    (tmp_path / "payload").write_bytes(payload)
    body = curl_ok("-D", str(hdrs), "--data-binary", f"@{tmp_path / 'payload'}", f"{base}/echo")
    status, h = parse_head(hdrs.read_bytes())
    assert body == payload
    assert h["x-request-sha256"] == hashlib.sha256(payload).hexdigest()
    assert h["x-request-length"] == "100000"

    out = curl_ok(
        "-H",
        "Transfer-Encoding: chunked",
        "-H",
        "Expect: 100-continue",
        "--data-binary",
        f"@{tmp_path / 'payload'}",
        f"{base}/sha256",
    )
    assert json.loads(out) == {"length": 100000, "sha256": hashlib.sha256(payload).hexdigest()}

    out = curl_ok("-o", "/dev/null", "-w", "%{http_code} %{size_download}", f"{base}/status/204")
    assert out == b"204 0"
    assert curl_ok("-w", " %{http_code}", f"{base}/status/418") == b"status 418\n 418"
    assert curl_ok("-o", "/dev/null", "-w", "%{http_code}", f"{base}/nope") == b"404"

    info = json.loads(curl_ok("-H", "X-Test: yes", f"{base}/headers"))
    assert ["X-Test", "yes"] in info["headers"]
    assert info["client"] == host and info["family"] == ("ipv6" if ":" in host else "ipv4")

    head = curl_ok("-I", f"{base}/bytes/1000")
    status, h = parse_head(head)
    assert status == 200 and h["content-length"] == "1000"
    head = curl_ok("-I", f"{base}/chunked/1000")
    assert parse_head(head)[1]["transfer-encoding"] == "chunked"

    start = time.monotonic()
    assert curl_ok(f"{base}/slow-headers/300") == b"slow\n"
    assert time.monotonic() - start >= 0.3

    reqs = origin.wait_requests(14)
    family = "ipv6" if ":" in host else "ipv4"
    assert {(r["client"], r["family"], r["tls"]) for r in reqs} == {(host, family, False)}
    assert [r["target"] for r in reqs][:3] == ["/1k", "/bytes/300001", "/chunked/25000"]
    sha = next(r for r in reqs if r["target"] == "/sha256")
    assert sha["body_len"] == 100000 and sha["method"] == "POST"
    assert ["Expect", "100-continue"] in sha["headers"]
    assert all(r["proxy_protocol"] is None and r["error"] is None for r in reqs)


def test_origin_streams_large_bodies(origin_factory: Any, tmp_path: Path) -> None:
    origin: OriginProcess = origin_factory("127.0.0.1:0")
    n = 64 * 1024 * 1024 + 7
    out = curl_ok("-o", "/dev/null", "-w", "%{size_download}", origin.url(f"/bytes/{n}"))
    assert out == str(n).encode()
    big = tmp_path / "big"
    with big.open("wb") as f:
        for piece in pattern_chunks(n):
            f.write(piece)
    out = curl_ok("-T", str(big), origin.url("/sha256"))  # PUT, streamed from the file
    assert json.loads(out) == {"length": n, "sha256": pattern_sha256(n)}


def test_origin_keepalive_pipelining_and_chunked_trailers(origin_factory: Any) -> None:
    origin: OriginProcess = origin_factory("127.0.0.1:0")
    port = origin.port
    out = raw_exchange(
        "127.0.0.1",
        port,
        b"GET /1k HTTP/1.1\r\nHost: a\r\n\r\n"
        b"POST /echo HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Sum: 11\r\n\r\n"
        b"HEAD /bytes/7 HTTP/1.1\r\nHost: a\r\n\r\n"
        b"GET /status/304 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    assert out.count(b"HTTP/1.1 200 OK") == 3 and out.count(b"HTTP/1.1 304") == 1
    assert ONE_K in out and out.count(b"hello world") == 1
    assert out.endswith(b"\r\n\r\n")  # HEAD and 304 carry no body
    reqs = origin.wait_requests(4)
    assert {r["conn"] for r in reqs} == {reqs[0]["conn"]}
    assert [r["seq"] for r in reqs] == [1, 2, 3, 4]
    assert reqs[1]["trailers"] == [["X-Sum", "11"]] and reqs[1]["body_len"] == 11

    # HTTP/1.0: closes after the response, and /chunked falls back to close-delimited.
    out = raw_exchange("127.0.0.1", port, b"GET /chunked/20 HTTP/1.0\r\n\r\n")
    assert out.endswith(b"\r\n\r\n" + pattern_bytes(20)) and b"chunked" not in out.lower()
    # Malformed requests get a 400 and a closed connection.
    assert raw_exchange("127.0.0.1", port, b"BOGUS\r\n\r\n").startswith(b"HTTP/1.1 400")
    out = raw_exchange(
        "127.0.0.1",
        port,
        b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    )
    assert out.startswith(b"HTTP/1.1 400")
    assert "Transfer-Encoding" in origin.wait_requests(6)[-1]["error"]
    out = raw_exchange("127.0.0.1", port, b"GET /1k HTTP/1.1\r\n\r\n")  # no Host
    assert out.startswith(b"HTTP/1.1 400") and "Host" in origin.wait_requests(7)[-1]["error"]
    # Expect on a rejecting endpoint: final status without 100 Continue, then close.
    out = raw_exchange(
        "127.0.0.1",
        port,
        b"PUT /status/413 HTTP/1.1\r\nHost: a\r\nContent-Length: 9\r\nExpect: 100-continue\r\n\r\n",
    )
    assert out.startswith(b"HTTP/1.1 413") and b"100 Continue" not in out


def test_origin_websocket_echo(origin_factory: Any) -> None:
    origin: OriginProcess = origin_factory("[::1]:0")
    key = base64.b64encode(os.urandom(16)).decode()
    with socket.create_connection(("::1", origin.port), timeout=5) as s:
        s.sendall(
            f"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        f = s.makefile("rb")
        status = f.readline()
        head = b""
        while (line := f.readline()) != b"\r\n":
            head += line
        assert status.startswith(b"HTTP/1.1 101")
        accept = hashlib.sha1((key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest()
        assert b"Sec-WebSocket-Accept: " + base64.b64encode(accept) in head
        s.sendall(ws_client_frame(0x1, b"hello"))
        assert ws_read_frame(f.read) == (0x81, b"hello")
        big = os.urandom(70_000)
        s.sendall(ws_client_frame(0x2, big))
        assert ws_read_frame(f.read) == (0x82, big)
        s.sendall(ws_client_frame(0x9, b"ping"))
        assert ws_read_frame(f.read) == (0x8A, b"ping")
        s.sendall(ws_client_frame(0x8, (1000).to_bytes(2, "big")))
        assert ws_read_frame(f.read) == (0x88, (1000).to_bytes(2, "big"))
        assert f.read() == b""
        f.close()


def test_origin_ipv4_mapped_client_is_logged_as_ipv4(origin_factory: Any) -> None:
    origin: OriginProcess = origin_factory("[::]:0")  # alone: a dual-stack socket
    curl_ok(f"http://127.0.0.1:{origin.port}/1k", "-o", "/dev/null")
    curl_ok(f"http://[::1]:{origin.port}/1k", "-o", "/dev/null")
    reqs = origin.wait_requests(2)
    assert [(r["client"], r["family"]) for r in reqs] == [("127.0.0.1", "ipv4"), ("::1", "ipv6")]


def test_origin_tls_and_proxy_protocol(origin_factory: Any, tls_ca: Any) -> None:
    origin: OriginProcess = origin_factory(
        ["[::1]:0", "127.0.0.1:0"], tls=tls_ca, proxy_protocol=True, name="pp"
    )
    port = origin.port
    out = curl_ok(
        "--haproxy-protocol",
        "--cacert",
        str(tls_ca.ca_pem),
        f"https://localhost:{port}/headers",
        "--resolve",
        f"localhost:{port}:127.0.0.1",
    )
    info = json.loads(out)
    assert info["tls"] and info["sni"] == "localhost"
    assert info["proxy_protocol"]["version"] == 1 and info["proxy_protocol"]["src"] == "127.0.0.1"
    out = curl_ok("--haproxy-protocol", "--cacert", str(tls_ca.ca_pem), origin.url("/1k", 0))
    assert out == ONE_K

    ctx = ssl.create_default_context(cafile=str(tls_ca.ca_pem))
    v2 = (
        b"\r\n\r\n\x00\r\nQUIT\n\x21\x21\x00\x24"
        + socket.inet_pton(socket.AF_INET6, "2001:db8:2::2")
        + socket.inet_pton(socket.AF_INET6, "2001:db8:1::6")
        + (40000).to_bytes(2, "big")
        + (443).to_bytes(2, "big")
    )
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        raw.sendall(v2)
        with ctx.wrap_socket(raw, server_hostname="v6.test") as tls:
            tls.sendall(b"GET /status/200 HTTP/1.1\r\nHost: v6.test\r\nConnection: close\r\n\r\n")
            assert tls.recv(100).startswith(b"HTTP/1.1 200")
    pp = origin.wait_requests(3)[-1]["proxy_protocol"]
    assert pp == {
        "version": 2,
        "command": "PROXY",
        "protocol": "TCP6",
        "src": "2001:db8:2::2",
        "src_port": 40000,
        "dst": "2001:db8:1::6",
        "dst_port": 443,
        "tlvs": [],
    }

    # No PROXY header (TLS straight away) and a malformed one: connection closed, no request.
    assert (
        curl("--cacert", str(tls_ca.ca_pem), origin.url("/1k", 1, host="localhost")).returncode != 0
    )
    assert raw_exchange("127.0.0.1", port, b"PROXY TCP4 1.2.3.4 5.6.7.8 01 80\r\n") == b""
    assert len(origin.requests()) == 3
    errors = [e for e in origin.events() if e.get("event") == "proxy_protocol_error"]
    assert len(errors) == 2


# ---------------------------------------------------------------------------------------------
# Namespace topologies


@pytest.fixture(scope="module")
def topo_origins(
    netns_topology: StandardTopology, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, OriginProcess]]:
    """Origins on port 8080 in the v6, v4 and dual origin namespaces."""
    t = netns_topology
    logs = tmp_path_factory.mktemp("topo-origins")
    origins: dict[str, OriginProcess] = {}
    try:
        for host, listen in (
            (t.v6origin, ["[::]:8080"]),
            (t.v4origin, ["0.0.0.0:8080"]),
            (t.dualorigin, ["[::]:8080", "0.0.0.0:8080"]),
        ):
            origins[host.name] = spawn_origin(
                listen, logs / f"{host.name}.jsonl", ns=host, name=host.name
            )
        yield origins
    finally:
        for origin in origins.values():
            origin.stop()


def test_proxy_namespace_reaches_origins(
    netns_topology: StandardTopology, topo_origins: dict[str, OriginProcess]
) -> None:
    t = netns_topology
    cases = [
        ("v6origin", f"[{t.v6origin_ip}]", t.proxy_v6, "ipv6"),
        ("v4origin", t.v4origin_ip, t.proxy_v4, "ipv4"),
        ("dualorigin", f"[{t.dual_v6}]", t.proxy_v6, "ipv6"),
        ("dualorigin", t.dual_v4, t.proxy_v4, "ipv4"),
    ]
    netns.wait_port(t.proxy, t.v6origin_ip, 8080, timeout=5)
    for name, host, source, family in cases:
        origin = topo_origins[name]
        before = len(origin.requests())
        out = curl_ok("-D", "-", f"http://{host}:8080/1k", ns=t.proxy)
        assert out.endswith(ONE_K) and f"X-Origin-Name: {name}".encode() in out
        last = origin.wait_requests(before + 1)[-1]
        assert (last["client"], last["family"]) == (source, family)

    # Names from hosts() resolve for processes in the namespace, to every address given.
    t.proxy.hosts({"v6.test": [t.v6origin_ip], "dual.test": [t.dual_v6, t.dual_v4]})
    try:
        info = json.loads(curl_ok("http://v6.test:8080/headers", ns=t.proxy))
        assert ["Host", "v6.test:8080"] in info["headers"] and info["client"] == t.proxy_v6
        out = netns.run(t.proxy, ["getent", "ahostsv4", "dual.test"]).stdout
        assert t.dual_v4 in out
        out = netns.run(t.proxy, ["getent", "ahostsv6", "dual.test"]).stdout
        assert t.dual_v6 in out
    finally:
        t.proxy.hosts({})
    # Nothing resolves through DNS: resolv.conf points at 127.0.0.1, where nothing listens.
    assert netns.run(t.proxy, ["getent", "hosts", "example.com"], timeout=10).returncode != 0


def test_client_namespace_only_reaches_the_proxy(
    netns_topology: StandardTopology, topo_origins: dict[str, OriginProcess]
) -> None:
    t = netns_topology
    with t.proxy.listen(t.proxy_client_ip) as listener:
        t.client.connect(t.proxy_client_ip, listener.getsockname()[1], timeout=2).close()
    # IPv4 via the proxy: dropped there (forwarding is off), so the connect times out.
    with pytest.raises(OSError):
        t.client.connect(t.v4origin_ip, 8080, timeout=0.5).close()
    # No IPv6 at all on the client (besides ::1).
    with pytest.raises(OSError):
        t.client.connect(t.v6origin_ip, 8080, timeout=0.5).close()
    assert curl("--connect-timeout", "1", f"http://{t.dual_v4}:8080/1k", ns=t.client).returncode
    addrs = netns.run(t.client, ["ip", "-o", "addr"]).stdout
    assert t.client_ip in addrs and "2001:db8" not in addrs and "fe80" not in addrs


def test_blackhole_addresses_hang(netns_topology: StandardTopology) -> None:
    t = netns_topology
    targets = [t.blackhole_ip, t.blackhole_net_ip, t.blackhole_v4]
    socks = []
    try:
        for ip in targets:
            s = t.proxy.new_socket(socket.AF_INET6 if ":" in ip else socket.AF_INET)
            socks.append(s)
            s.setblocking(False)
            assert s.connect_ex((ip, 80)) == 115  # EINPROGRESS
        # Refused or unreachable would make the sockets writable with SO_ERROR set.
        _, writable, _ = select.select([], socks, [], 1.0)
        assert writable == []
        assert [s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) for s in socks] == [0, 0, 0]
    finally:
        for s in socks:
            s.close()


def test_reverse_topology(netns_reverse_topology: netns.ReverseTopology) -> None:
    t = netns_reverse_topology
    with t.proxy.listen(t.proxy_client_ip) as listener:
        conn = t.v6client.connect(t.proxy_client_ip, listener.getsockname()[1], timeout=2)
        peer, _ = listener.accept()
        assert peer.getpeername()[0] == t.v6client_ip
        peer.close()
        conn.close()
    for backend, ip in ((t.v4backend, t.v4backend_ip), (t.v4backend2, t.v4backend2_ip)):
        with backend.listen("0.0.0.0") as listener:
            t.proxy.connect(ip, listener.getsockname()[1], timeout=2).close()
    with pytest.raises(OSError):  # the IPv6-only client has no IPv4 route
        t.v6client.connect(t.v4backend_ip, 80, timeout=0.5)


def _require_netns() -> None:
    reason = netns.netns_available()
    if reason is not None:
        pytest.skip(f"network namespaces unavailable: {reason}")


@pytest.mark.netns
def test_topology_removed_even_when_the_body_raises() -> None:
    _require_netns()
    with pytest.raises(RuntimeError, match="boom"):
        with Topology() as topo:
            a = topo.add_host("a")
            b = topo.add_host("b", ipv6=False)
            topo.add_bridge(a, "br0", ["198.51.100.1/24"])
            topo.link(a, b, b_addrs=["198.51.100.2/24"], a_bridge="br0")
            proc = a.popen(["sleep", "60"])
            names = topo.namespaces()
            group = topo.group
            assert set(names) <= set(list_netns())
            assert (OWNER_DIR / group).exists()
            raise RuntimeError("boom")
    assert not set(names) & set(list_netns())
    assert not any((ETC_NETNS_DIR / n).exists() for n in names)
    assert not (OWNER_DIR / group).exists()
    assert proc.returncode is not None


@pytest.mark.netns
def test_stale_namespaces_of_dead_runs_are_removed() -> None:
    _require_netns()
    group = f"kt{os.getpid() % 10000}-9999"  # a serial this process never reaches
    name = f"{group}-leftover"
    OWNER_DIR.mkdir(parents=True, exist_ok=True)
    (OWNER_DIR / group).write_text(f"{os.getpid()} 0\n")  # start time 0: owner is gone
    subprocess.run(["ip", "netns", "add", name], check=True)
    (ETC_NETNS_DIR / name).mkdir(parents=True, exist_ok=True)
    try:
        assert group in netns.cleanup_stale()
        assert name not in list_netns()
        assert not (ETC_NETNS_DIR / name).exists() and not (OWNER_DIR / group).exists()
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
        shutil.rmtree(ETC_NETNS_DIR / name, ignore_errors=True)
        (OWNER_DIR / group).unlink(missing_ok=True)
