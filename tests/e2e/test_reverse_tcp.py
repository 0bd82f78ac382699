"""Issue 3 end to end: reverse and TCP modes put IPv4-only services on IPv6.

Topology (``netns_reverse_topology``, built once per session)::

    v6client 2001:db8:2::2 (IPv6 only)
        |
    proxy 2001:db8:2::1 | 203.0.113.1      <- kushi runs here (``netns=topo.proxy.ns``)
        |
    v4backend 203.0.113.4, v4backend2 203.0.113.8 (IPv4 only; support/origin.py)

The client is a real ``curl`` (or a raw socket where curl cannot say it, e.g. PROXY headers
or malformed requests) inside ``v6client``; every backend is IPv4-only, so any answer at all
proves the IPv6 -> IPv4 bridge.  What reached a backend is read from the origin's request
log; what kushi did from its JSON access log (stdout) and its stderr.

Every test starts its own kushi and origins and stops them at teardown; kushi is ready when
its stderr says ``kushi ready`` (the listening sockets are bound before that line), so no
probe connection ever shows up in an access log.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import json
import os
import shutil
import socket
import struct
import subprocess
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from support import netns
from support.kushi_proc import Kushi, write_toml
from support.netns import ReverseTopology
from support.origin import ONE_K, OriginProcess, pattern_bytes, pattern_chunks, pattern_sha256
from support.rawhttp import ws_client_frame, ws_read_frame

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed"),
]

CLIENT = "2001:db8:2::2"  # v6client
PROXY = "2001:db8:2::1"  # kushi's client-side address
BACKEND = "203.0.113.4"  # v4backend
BACKEND2 = "203.0.113.8"  # v4backend2
HTTP_PORT = 8080
TLS_PORT = 8443
BIG = 50 * 1024 * 1024
WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
PP2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"

KushiFactory = Callable[..., Kushi]
OriginFactory = Callable[..., OriginProcess]


# --- processes -------------------------------------------------------------------------------


@pytest.fixture
def topo(netns_reverse_topology: ReverseTopology) -> ReverseTopology:
    return netns_reverse_topology


@pytest.fixture
def kushi_factory(topo: ReverseTopology, tmp_path: Path) -> Iterator[KushiFactory]:
    """``kushi_factory(argv)`` or ``kushi_factory(config={...})``: a kushi inside the proxy
    namespace, ready.  ``config`` is written as top-level keys of a TOML file (one listener,
    JSON access log to stdout).  All are stopped at teardown and must exit 0."""
    started: list[Kushi] = []
    counter = iter(range(1000))

    def factory(argv: Sequence[str] = (), *, config: dict[str, Any] | None = None) -> Kushi:
        argv = list(argv)
        if config is not None:
            path = tmp_path / f"kushi-{next(counter)}.toml"
            write_toml(path, {"access_log_format": "json", **config})
            argv = ["serve", "--config", str(path)]
        # Kushi hands open() files to Popen without closing them: the ResourceWarning comes
        # (and goes) inside the constructor.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)
            kushi = Kushi(argv, tmp_path, netns=topo.proxy.ns, loopback_destinations=False)
        started.append(kushi)
        kushi.wait_ready()
        return kushi

    yield factory
    codes = [k.stop() for k in started]
    assert codes == [0] * len(codes), [k.stderr[-2000:] for k in started]


# --- clients ---------------------------------------------------------------------------------


def curl(topo: ReverseTopology, *args: str) -> subprocess.CompletedProcess[bytes]:
    """curl inside the IPv6-only client namespace, never through an environment proxy (only
    through an explicit ``-x``)."""
    noproxy = [] if "-x" in args else ["--noproxy", "*"]
    argv = ["curl", "-sS", *noproxy, "--max-time", "30", *args]
    return netns.run(topo.v6client, argv, text=False, timeout=40)


class Response:
    def __init__(self, raw: bytes) -> None:
        while True:  # skip interim 1xx heads
            head, _, raw = raw.partition(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            self.status = int(lines[0].split()[1])
            if not 100 <= self.status < 200 or self.status == 101:
                break
        self.headers: dict[str, list[str]] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            self.headers.setdefault(name.strip().lower(), []).append(value.strip())
        self.body = raw

    def header(self, name: str) -> str | None:
        values = self.headers.get(name.lower())
        return values[-1] if values else None

    def json(self) -> Any:
        return json.loads(self.body)


def get(topo: ReverseTopology, url: str, *args: str) -> Response:
    proc = curl(topo, "-i", *args, url)
    assert proc.returncode == 0, proc.stderr.decode()
    return Response(proc.stdout)


def connect(topo: ReverseTopology, port: int, timeout: float = 10.0) -> socket.socket:
    """A TCP connection from the IPv6-only client to kushi."""
    return netns.ns_connect(topo.v6client, PROXY, port, timeout)


def read_until_close(sock: socket.socket) -> bytes:
    """Everything until the peer closes (a reset counts as a close)."""
    out = bytearray()
    try:
        while chunk := sock.recv(65536):
            out += chunk
    except ConnectionResetError:
        pass
    return bytes(out)


def recv_exact(sock: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            raise ConnectionError(f"closed after {len(out)} of {n} bytes")
        out += chunk
    return bytes(out)


def recv_head(sock: socket.socket) -> bytes:
    out = bytearray()
    while b"\r\n\r\n" not in out:
        chunk = sock.recv(1)
        if not chunk:
            raise ConnectionError(f"closed inside the response head: {bytes(out)!r}")
        out += chunk
    return bytes(out)


def read_response(sock: socket.socket) -> Response:
    """One response: its head, then a Content-Length body (or everything until close)."""
    resp = Response(recv_head(sock))
    length = resp.header("content-length")
    resp.body = recv_exact(sock, int(length)) if length is not None else read_until_close(sock)
    return resp


def raw_request(topo: ReverseTopology, port: int, data: bytes) -> bytes:
    with connect(topo, port) as sock:
        sock.sendall(data)
        return read_until_close(sock)


# --- logs ------------------------------------------------------------------------------------


def header_values(request: dict[str, Any], name: str) -> list[str]:
    return [v for k, v in request["headers"] if k.lower() == name.lower()]


def one_header(request: dict[str, Any], name: str) -> str:
    values = header_values(request, name)
    assert len(values) == 1, (name, request["headers"])
    return values[0]


def records(kushi: Kushi, n: int, timeout: float = 10.0) -> list[dict[str, Any]]:
    """At least ``n`` access records (TCP records are written when the connection ends)."""
    recs = kushi.wait_records(n, timeout)
    assert len(recs) >= n, (recs, kushi.stderr[-2000:])
    return recs


def forwarded(by: str, client: str, host: str) -> str:
    return f'by="[{by}]";for="[{client}]";proto=http;host="{host}"'


# --- PROXY protocol headers, built by hand from the spec ---------------------------------------


def pp1(src: str, dst: str, sport: int, dport: int) -> bytes:
    """A v1 line for TCP4 or TCP6."""
    proto = "TCP6" if ":" in src else "TCP4"
    return f"PROXY {proto} {src} {dst} {sport} {dport}\r\n".encode()


def pp2(src: str, dst: str, sport: int, dport: int) -> bytes:
    """A v2 PROXY command for TCP over IPv4 or IPv6, no TLVs."""
    a, b = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    family = 0x11 if a.version == 4 else 0x21
    body = a.packed + b.packed + struct.pack("!HH", sport, dport)
    return PP2_SIGNATURE + bytes([0x21, family]) + struct.pack("!H", len(body)) + body


# =============================================================================================
# Reverse mode


def test_reverse_ipv6_client_reaches_ipv4_backend(
    topo: ReverseTopology, kushi_factory: KushiFactory, origin_factory: OriginFactory
) -> None:
    """``kushi reverse`` on the IPv6 side, an IPv4-only origin behind: the origin sees kushi's
    IPv4 address and the client's IPv6 address in Forwarded / X-Forwarded-*; Host is kept."""
    origin = origin_factory(f"{BACKEND}:{HTTP_PORT}", ns=topo.v4backend, name="b1")
    kushi = kushi_factory(
        [
            "reverse",
            "--listen",
            f"[{PROXY}]:{HTTP_PORT}",
            "--backend",
            f"http://{BACKEND}:{HTTP_PORT}",
            "--access-log-format",
            "json",
        ]
    )
    authority = f"[{PROXY}]:{HTTP_PORT}"
    resp = get(topo, f"http://{authority}/headers")
    assert resp.status == 200
    assert resp.header("x-origin-name") == "b1"
    status = resp.header("proxy-status")
    assert status is not None
    assert status.startswith("kushi;"), status
    assert f'next-hop="{BACKEND}:{HTTP_PORT}"' in status, status
    assert "received-status=200" in status and "ipv4" in status, status
    assert resp.header("via") is not None

    resp2 = get(topo, f"http://{authority}/1k", "-H", "Host: www.example.test")
    assert resp2.status == 200 and resp2.body == ONE_K
    assert resp2.header("proxy-status") is not None

    first, second = origin.wait_requests(2)
    for req, host in ((first, authority), (second, "www.example.test")):
        assert req["client"] == topo.proxy_v4 and req["family"] == "ipv4"
        assert one_header(req, "Host") == host  # preserve_host defaults to true
        assert one_header(req, "X-Forwarded-For") == CLIENT
        assert one_header(req, "Forwarded") == forwarded(PROXY, CLIENT, host)
        assert one_header(req, "X-Forwarded-Proto") == "http"
        assert one_header(req, "X-Forwarded-Host") == host
        assert header_values(req, "Via")

    recs = records(kushi, 2)
    assert [r["target"] for r in recs] == ["/headers", "/1k"]
    for rec in recs:
        assert rec["mode"] == "reverse" and rec["status"] == 200
        assert rec["client"] == CLIENT
        assert rec["upstream"] == f"{BACKEND}:{HTTP_PORT}" and rec["family"] == "ipv4"


def test_reverse_preserve_host_false_rewrites_host(
    topo: ReverseTopology, kushi_factory: KushiFactory, origin_factory: OriginFactory
) -> None:
    """``preserve_host = false``: the backend gets its own authority in Host, and the Host
    the client asked for in X-Forwarded-Host and Forwarded host= (RFC 7239 section 5.4)."""
    origin = origin_factory(f"{BACKEND}:{HTTP_PORT}", ns=topo.v4backend)
    kushi_factory(
        config={
            "mode": "reverse",
            "listen": [f"[{PROXY}]:{HTTP_PORT}"],
            "backend": [f"http://{BACKEND}:{HTTP_PORT}"],
            "preserve_host": False,
        }
    )
    resp = get(topo, f"http://[{PROXY}]:{HTTP_PORT}/1k", "-H", "Host: www.example.test")
    assert resp.status == 200 and resp.body == ONE_K
    (req,) = origin.wait_requests(1)
    assert one_header(req, "Host") == f"{BACKEND}:{HTTP_PORT}"
    assert one_header(req, "X-Forwarded-Host") == "www.example.test"
    assert one_header(req, "Forwarded") == forwarded(PROXY, CLIENT, "www.example.test")
    assert one_header(req, "X-Forwarded-For") == CLIENT


def test_reverse_client_forwarding_headers_untrusted_and_trusted(
    topo: ReverseTopology, kushi_factory: KushiFactory, origin_factory: OriginFactory
) -> None:
    """Forwarding fields from an untrusted client are dropped and replaced; a client in
    ``trusted_proxies`` has its X-Forwarded-For and Forwarded extended, not replaced."""
    origin = origin_factory(f"{BACKEND}:{HTTP_PORT}", ns=topo.v4backend)
    backend = [f"http://{BACKEND}:{HTTP_PORT}"]
    kushi_factory(config={"mode": "reverse", "listen": [f"[{PROXY}]:8081"], "backend": backend})
    kushi_factory(
        config={
            "mode": "reverse",
            "listen": [f"[{PROXY}]:8082"],
            "backend": backend,
            "trusted_proxies": [f"{CLIENT}/128"],
        }
    )
    spoof = [
        "-H",
        "X-Forwarded-For: 192.0.2.66",
        "-H",
        "Forwarded: for=192.0.2.66;proto=https",
        "-H",
        "X-Forwarded-Proto: https",
        "-H",
        "X-Forwarded-Host: spoofed.example",
        "-H",
        "X-Real-IP: 192.0.2.66",
        "-H",
        "Host: www.example.test",
    ]
    assert get(topo, f"http://[{PROXY}]:8081/1k", *spoof).status == 200
    assert get(topo, f"http://[{PROXY}]:8082/1k", *spoof).status == 200
    untrusted, trusted = origin.wait_requests(2)

    assert not [h for h in untrusted["headers"] if "192.0.2.66" in h[1] or "spoofed" in h[1]]
    assert one_header(untrusted, "X-Forwarded-For") == CLIENT
    assert one_header(untrusted, "X-Forwarded-Proto") == "http"
    assert one_header(untrusted, "X-Forwarded-Host") == "www.example.test"
    assert one_header(untrusted, "Forwarded") == forwarded(PROXY, CLIENT, "www.example.test")
    assert header_values(untrusted, "X-Real-IP") == []

    assert one_header(trusted, "X-Forwarded-For") == f"192.0.2.66, {CLIENT}"
    assert one_header(trusted, "Forwarded") == (
        "for=192.0.2.66;proto=https, " + forwarded(PROXY, CLIENT, "www.example.test")
    )
    assert one_header(trusted, "X-Forwarded-Proto") == "https"
    assert one_header(trusted, "X-Forwarded-Host") == "spoofed.example"


def test_reverse_round_robin_and_failover(
    topo: ReverseTopology, kushi_factory: KushiFactory, origin_factory: OriginFactory
) -> None:
    """Two backends take turns; one that refuses connections is marked down (once) and every
    request keeps succeeding on the other."""
    b1 = origin_factory(f"{BACKEND}:{HTTP_PORT}", ns=topo.v4backend, name="b1")
    b2 = origin_factory(f"{BACKEND2}:{HTTP_PORT}", ns=topo.v4backend2, name="b2")
    kushi = kushi_factory(
        config={
            "mode": "reverse",
            "listen": [f"[{PROXY}]:{HTTP_PORT}"],
            "backend": [f"http://{BACKEND}:{HTTP_PORT}", f"http://{BACKEND2}:{HTTP_PORT}"],
            "backend_retry": 60.0,
        }
    )
    url = f"http://[{PROXY}]:{HTTP_PORT}/1k"
    names = []
    for _ in range(6):
        resp = get(topo, url)
        assert resp.status == 200 and resp.body == ONE_K
        names.append(resp.header("x-origin-name"))
    assert set(names) == {"b1", "b2"}
    assert all(a != b for a, b in zip(names, names[1:], strict=False)), names
    assert len(b1.wait_requests(3)) == 3 and len(b2.wait_requests(3)) == 3

    b2.stop()  # 203.0.113.8 now answers connects with a reset
    after = []
    for _ in range(6):
        resp = get(topo, url)
        assert resp.status == 200 and resp.body == ONE_K
        after.append(resp.header("x-origin-name"))
    assert after == ["b1"] * 6
    assert len(b1.wait_requests(9)) == 9
    down = [line for line in kushi.stderr.splitlines() if "marked down" in line]
    assert len(down) == 1 and f"{BACKEND2}:{HTTP_PORT}" in down[0], kushi.stderr
    recs = records(kushi, 12)
    assert [r["status"] for r in recs] == [200] * 12
    assert {r["upstream"] for r in recs[6:]} == {f"{BACKEND}:{HTTP_PORT}"}


def test_reverse_refuses_absolute_form_and_connect(
    topo: ReverseTopology, kushi_factory: KushiFactory, origin_factory: OriginFactory
) -> None:
    """A reverse listener is not an open proxy: absolute-form requests and CONNECT get 403
    from kushi and nothing reaches the backend."""
    origin = origin_factory(f"{BACKEND}:{HTTP_PORT}", ns=topo.v4backend)
    kushi = kushi_factory(
        ["reverse", "--listen", f"[{PROXY}]:{HTTP_PORT}", "--backend", f"http://{BACKEND}:8080"]
        + ["--access-log-format", "json"]
    )
    proxy = f"http://[{PROXY}]:{HTTP_PORT}"
    target = f"http://{BACKEND}:{HTTP_PORT}/1k"
    resp = get(topo, target, "-x", proxy)
    assert resp.status == 403
    assert resp.header("x-origin-name") is None
    assert "http_request_denied" in (resp.header("proxy-status") or "")

    proc = curl(topo, "-p", "-x", proxy, "-o", "/dev/null", "-w", "%{http_connect}", target)
    assert proc.returncode != 0  # curl gives up on the refused tunnel
    assert proc.stdout == b"403"

    with connect(topo, HTTP_PORT) as sock:
        authority = f"{BACKEND}:{HTTP_PORT}"
        sock.sendall(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
        assert read_response(sock).status == 403
    recs = records(kushi, 3)
    assert [r["status"] for r in recs] == [403, 403, 403]
    assert [r["method"] for r in recs] == ["GET", "CONNECT", "CONNECT"]
    assert all(r["upstream"] == "" for r in recs)
    assert origin.requests() == [] and origin.events() == []


def test_reverse_websocket_upgrade(
    topo: ReverseTopology, kushi_factory: KushiFactory, origin_factory: OriginFactory
) -> None:
    """A WebSocket handshake is passed through (101, Upgrade kept) and frames flow both ways
    from the IPv6 client to the IPv4 backend's echo endpoint."""
    origin = origin_factory(f"{BACKEND}:{HTTP_PORT}", ns=topo.v4backend)
    kushi = kushi_factory(
        ["reverse", "--listen", f"[{PROXY}]:{HTTP_PORT}", "--backend", f"http://{BACKEND}:8080"]
        + ["--access-log-format", "json"]
    )
    key = base64.b64encode(os.urandom(16)).decode()
    handshake = (
        f"GET /ws HTTP/1.1\r\nHost: [{PROXY}]:{HTTP_PORT}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )

    with connect(topo, HTTP_PORT) as sock:
        sock.sendall(handshake.encode())
        resp = Response(recv_head(sock))
        assert resp.status == 101
        assert resp.header("upgrade") == "websocket"
        assert "upgrade" in (resp.header("connection") or "").lower()
        expected = base64.b64encode(hashlib.sha1((key + WS_GUID).encode()).digest()).decode()
        assert resp.header("sec-websocket-accept") == expected
        assert resp.header("proxy-status") is not None

        def read(n: int) -> bytes:
            return recv_exact(sock, n)

        sock.sendall(ws_client_frame(0x1, b"hello from 2001:db8:2::2"))
        assert ws_read_frame(read) == (0x81, b"hello from 2001:db8:2::2")
        big = pattern_bytes(100_000)
        sock.sendall(ws_client_frame(0x2, big))
        assert ws_read_frame(read) == (0x82, big)
        sock.sendall(ws_client_frame(0x8, (1000).to_bytes(2, "big")))
        assert ws_read_frame(read) == (0x88, (1000).to_bytes(2, "big"))
        assert read_until_close(sock) == b""
    (req,) = origin.wait_requests(1)
    assert req["target"] == "/ws" and one_header(req, "Upgrade") == "websocket"
    assert one_header(req, "X-Forwarded-For") == CLIENT
    (rec,) = records(kushi, 1)
    assert rec["status"] == 101 and rec["family"] == "ipv4" and rec["client"] == CLIENT
    assert rec["bytes_in"] > 100_000 and rec["bytes_out"] > 100_000


BAD_REQUESTS = {
    "CL+TE": b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "two Content-Lengths": b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
    b"Content-Length: 6\r\n\r\nhello!",
    "obs-fold": b"GET /1k HTTP/1.1\r\nHost: x\r\nX-Folded: a\r\n b\r\n\r\n",
    "space before colon": b"GET /1k HTTP/1.1\r\nHost: x\r\nX-Bad : a\r\n\r\n",
    "two Host headers": b"GET /1k HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n",
    "TE not chunked": b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n",
}


def test_reverse_rejects_bad_requests(
    topo: ReverseTopology, kushi_factory: KushiFactory, origin_factory: OriginFactory
) -> None:
    """Ambiguous or malformed requests (request-smuggling material) get 400 from kushi and
    a closed connection; the backend never sees a byte of them."""
    origin = origin_factory(f"{BACKEND}:{HTTP_PORT}", ns=topo.v4backend)
    kushi = kushi_factory(
        ["reverse", "--listen", f"[{PROXY}]:{HTTP_PORT}", "--backend", f"http://{BACKEND}:8080"]
        + ["--access-log-format", "json"]
    )
    for name, data in BAD_REQUESTS.items():
        raw = raw_request(topo, HTTP_PORT, data)
        resp = Response(raw)
        assert resp.status == 400, (name, raw)
        assert resp.header("x-origin-name") is None, name
        assert "http_request_error" in (resp.header("proxy-status") or ""), (name, raw)
    recs = records(kushi, len(BAD_REQUESTS))
    assert [r["status"] for r in recs] == [400] * len(BAD_REQUESTS)
    assert all(r["upstream"] == "" for r in recs)
    assert origin.requests() == [] and origin.events() == []  # not a byte got through
    # A good request afterwards still works, and is the only thing the backend ever saw.
    assert get(topo, f"http://[{PROXY}]:{HTTP_PORT}/1k").body == ONE_K
    (req,) = origin.wait_requests(1)
    assert req["target"] == "/1k" and req["error"] is None
    assert origin.events() == []


# =============================================================================================
# TCP mode


def test_tcp_mode_tls_passthrough(
    topo: ReverseTopology,
    kushi_factory: KushiFactory,
    origin_factory: OriginFactory,
    tls_ca: Any,
) -> None:
    """``kushi tcp`` relays TLS untouched: curl verifies the IPv4 origin's certificate through
    kushi's IPv6 address; one access record per connection with client, backend, family,
    bytes each way and duration."""
    origin = origin_factory(f"{BACKEND}:{TLS_PORT}", ns=topo.v4backend, tls=tls_ca)
    kushi = kushi_factory(
        [
            "tcp",
            "--listen",
            f"[{PROXY}]:{TLS_PORT}",
            "--backend",
            f"{BACKEND}:{TLS_PORT}",
            "--access-log-format",
            "json",
        ]
    )
    resolve = ["--cacert", str(tls_ca.ca_pem), "--resolve", f"v4.test:{TLS_PORT}:[{PROXY}]"]
    for _ in range(3):
        resp = get(topo, f"https://v4.test:{TLS_PORT}/1k", *resolve)
        assert resp.status == 200 and resp.body == ONE_K
        assert resp.header("proxy-status") is None  # kushi never saw the HTTP inside
    reqs = origin.wait_requests(3)
    assert {(r["client"], r["family"], r["tls"], r["sni"]) for r in reqs} == {
        (topo.proxy_v4, "ipv4", True, "v4.test")
    }
    assert len({r["conn"] for r in reqs}) == 3
    recs = records(kushi, 3)
    assert len(recs) == 3
    for rec in recs:
        assert rec["mode"] == "tcp" and rec["method"] == "TCP" and rec["status"] == 200
        assert rec["client"] == CLIENT
        assert rec["upstream"] == f"{BACKEND}:{TLS_PORT}" and rec["family"] == "ipv4"
        assert rec["target"] == f"{BACKEND}:{TLS_PORT}"
        assert rec["bytes_in"] > 200  # a ClientHello at least
        assert rec["bytes_out"] > len(ONE_K)  # certificate chain and the encrypted body
        assert rec["duration_ms"] > 0
        assert rec["error"] == ""


def test_tcp_mode_half_close_and_exact_byte_counts(
    topo: ReverseTopology, kushi_factory: KushiFactory
) -> None:
    """The client half-closes after its upload; the backend sees EOF after exactly the bytes
    sent and its answer still reaches the client; the access log counts bytes exactly."""
    upload = pattern_bytes(300_000)
    reply_tail = pattern_bytes(200_000)
    seen: dict[str, Any] = {}
    listener = netns.ns_listen(topo.v4backend, BACKEND, 9000)

    def backend() -> None:
        try:
            listener.settimeout(20)
            conn, peer = listener.accept()
            with conn:
                conn.settimeout(20)
                h, n = hashlib.sha256(), 0
                while data := conn.recv(65536):
                    h.update(data)
                    n += len(data)
                seen.update(peer=peer[0], n=n, sha=h.hexdigest())
                conn.sendall(f"{n} {h.hexdigest()}\n".encode() + reply_tail)
        except OSError as e:
            seen["error"] = repr(e)

    thread = threading.Thread(target=backend, daemon=True)
    thread.start()
    try:
        kushi = kushi_factory(
            ["tcp", "--listen", f"[{PROXY}]:9000", "--backend", f"{BACKEND}:9000"]
            + ["--access-log-format", "json"]
        )
        with connect(topo, 9000, timeout=20) as sock:
            sock.sendall(upload)
            sock.shutdown(socket.SHUT_WR)
            reply = read_until_close(sock)
        thread.join(20)
    finally:
        listener.close()
    expected = f"{len(upload)} {hashlib.sha256(upload).hexdigest()}\n".encode() + reply_tail
    assert seen.get("error") is None, seen
    assert seen["peer"] == topo.proxy_v4 and seen["n"] == len(upload)
    assert reply == expected
    (rec,) = records(kushi, 1)
    assert rec["bytes_in"] == len(upload) and rec["bytes_out"] == len(expected)
    assert rec["client"] == CLIENT and rec["family"] == "ipv4"
    assert rec["upstream"] == f"{BACKEND}:9000"


# =============================================================================================
# PROXY protocol: sending to the backend


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("mode", ["reverse", "tcp"])
def test_backend_proxy_protocol(
    topo: ReverseTopology,
    kushi_factory: KushiFactory,
    origin_factory: OriginFactory,
    tls_ca: Any,
    mode: str,
    version: int,
) -> None:
    """``backend_proxy_protocol = 1|2``: the backend learns the client's real IPv6 address
    from the PROXY header -- for plain HTTP in reverse mode and for TLS passthrough in TCP
    mode -- and every client connection gets its own backend connection and header."""
    port = HTTP_PORT if mode == "reverse" else TLS_PORT
    origin = origin_factory(
        f"{BACKEND}:{port}",
        ns=topo.v4backend,
        tls=tls_ca if mode == "tcp" else None,
        proxy_protocol=True,
    )
    backend = f"http://{BACKEND}:{port}" if mode == "reverse" else f"{BACKEND}:{port}"
    kushi = kushi_factory(
        [mode, "--listen", f"[{PROXY}]:{port}", "--backend", backend]
        + ["--backend-proxy-protocol", str(version), "--access-log-format", "json"]
    )
    if mode == "reverse":
        url, extra = f"http://[{PROXY}]:{port}/headers", []
    else:
        url = f"https://v4.test:{port}/headers"
        extra = ["--cacert", str(tls_ca.ca_pem), "--resolve", f"v4.test:{port}:[{PROXY}]"]
    for _ in range(2):
        resp = get(topo, url, *extra)
        assert resp.status == 200
        assert resp.json()["proxy_protocol"]["src"] == CLIENT
    reqs = origin.wait_requests(2)
    assert len({r["conn"] for r in reqs}) == 2
    for req in reqs:
        pp = req["proxy_protocol"]
        assert pp["version"] == version and pp["command"] == "PROXY"
        assert pp["protocol"] == "TCP6"
        assert (pp["src"], pp["dst"], pp["dst_port"]) == (CLIENT, PROXY, port)
        assert req["client"] == topo.proxy_v4  # the TCP peer is still kushi
        assert req["tls"] is (mode == "tcp")
        if mode == "reverse":
            assert one_header(req, "X-Forwarded-For") == CLIENT
    assert origin.events() == []
    assert {r["family"] for r in records(kushi, 2)} == {"ipv4"}


# =============================================================================================
# PROXY protocol: accepting from a load balancer


PP_PORT = 8090
PP_UNTRUSTED_PORT = 8091
CLIENTS = 100  # sequential clients in the PROXY in-and-out test


def pp_config(port: int, senders: list[str], **extra: Any) -> dict[str, Any]:
    """A reverse listener that takes PROXY headers from ``senders`` only."""
    return {
        "mode": "reverse",
        "listen": [f"[{PROXY}]:{port}"],
        "backend": [f"http://{BACKEND}:{HTTP_PORT}"],
        "proxy_protocol": True,
        "proxy_protocol_from": senders,
        **extra,
    }


def test_accept_proxy_protocol_v1_and_v2(
    topo: ReverseTopology, kushi_factory: KushiFactory, origin_factory: OriginFactory
) -> None:
    """From a trusted sender, the address in a v1 or v2 header is the client: it is what the
    access log and X-Forwarded-For show.  LOCAL / UNKNOWN headers mean the sender itself."""
    origin = origin_factory(f"{BACKEND}:{HTTP_PORT}", ns=topo.v4backend)
    kushi = kushi_factory(config=pp_config(PP_PORT, [f"{CLIENT}/128"]))
    request = b"GET /headers HTTP/1.1\r\nHost: app.example\r\nConnection: close\r\n\r\n"
    cases = [
        (pp1("2001:db8:77::1", PROXY, 40001, PP_PORT), "2001:db8:77::1"),
        (pp1("198.51.100.77", "198.51.100.1", 40002, PP_PORT), "198.51.100.77"),
        (pp2("2001:db8:77::2", PROXY, 40003, PP_PORT), "2001:db8:77::2"),
        (pp2("198.51.100.78", "198.51.100.1", 40004, PP_PORT), "198.51.100.78"),
        (b"PROXY UNKNOWN\r\n", CLIENT),
        (PP2_SIGNATURE + b"\x20\x00\x00\x00", CLIENT),  # v2 LOCAL
    ]
    for header, _ in cases:
        raw = raw_request(topo, PP_PORT, header + request)
        assert Response(raw).status == 200, raw
    reqs = origin.wait_requests(len(cases))
    recs = records(kushi, len(cases))
    for (_, client), req, rec in zip(cases, reqs, recs, strict=True):
        assert one_header(req, "X-Forwarded-For") == client
        node = f'"[{client}]"' if ":" in client else client
        assert f"for={node};" in one_header(req, "Forwarded")
        assert rec["client"] == client and rec["status"] == 200


BAD_PROXY_HEADERS: dict[str, tuple[int, bytes, bool]] = {
    # name: (port, bytes sent, half-close after sending)
    "truncated v1, then EOF": (PP_PORT, b"PROXY TCP6 2001:db8:77::1 2001:db8:2::1 ", True),
    "truncated v2, then EOF": (PP_PORT, pp2("2001:db8:77::1", PROXY, 1, 2)[:30], True),
    "no header at all": (PP_PORT, b"GET /headers HTTP/1.1\r\nHost: x\r\n\r\n", False),
    "wrong v1 signature": (
        PP_PORT,
        b"PROXZ TCP6 2001:db8:77::1 2001:db8:2::1 1 2\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n",
        False,
    ),
    "wrong v2 signature": (
        PP_PORT,
        b"\r\n\r\n\x00\r\nQUIX\n" + pp2("2001:db8:77::1", PROXY, 1, 2)[12:] + b"GET / HTTP/1.1\r\n",
        False,
    ),
    "v2 length shorter than the addresses": (
        PP_PORT,
        PP2_SIGNATURE + b"\x21\x21\x00\x08" + bytes(8) + b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        False,
    ),
    "v2 length far too long": (
        PP_PORT,
        PP2_SIGNATURE + b"\x21\x21\xff\xff" + bytes(36),
        False,
    ),
    "v1 bad address": (
        PP_PORT,
        b"PROXY TCP4 300.1.1.1 198.51.100.1 1 2\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n",
        False,
    ),
    "valid header from an untrusted sender": (
        PP_UNTRUSTED_PORT,
        pp1("2001:db8:77::1", PROXY, 1, PP_UNTRUSTED_PORT) + b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        False,
    ),
}


def test_accept_proxy_protocol_rejects_bad_headers(
    topo: ReverseTopology, kushi_factory: KushiFactory, origin_factory: OriginFactory
) -> None:
    """Each bad PROXY header closes the connection without a byte of answer, nothing reaches
    the backend, and each is logged (access record and a warning)."""
    origin = origin_factory(f"{BACKEND}:{HTTP_PORT}", ns=topo.v4backend)
    kushi = kushi_factory(config=pp_config(PP_PORT, [f"{CLIENT}/128"]))
    # Another load balancer's listener: the test client is not among its senders.
    other = kushi_factory(
        config=pp_config(PP_UNTRUSTED_PORT, ["2001:db8:2::99/128", "192.0.2.0/24"])
    )
    for name, (port, data, half_close) in BAD_PROXY_HEADERS.items():
        with connect(topo, port) as sock:
            sock.sendall(data)
            if half_close:
                sock.shutdown(socket.SHUT_WR)
            assert read_until_close(sock) == b"", name
    for proc, proc_port in ((kushi, PP_PORT), (other, PP_UNTRUSTED_PORT)):
        expected = sum(port == proc_port for port, _, _ in BAD_PROXY_HEADERS.values())
        recs = records(proc, expected)
        assert len(recs) == expected
        for rec in recs:
            assert rec["method"] == "PROXY" and rec["error"] == "proxy_protocol_error", rec
            assert rec["status"] == 400 and rec["details"], rec
            assert rec["client"] == CLIENT and rec["upstream"] == "", rec
        logged = [line for line in proc.stderr.splitlines() if "closing connection" in line]
        assert len(logged) == expected, proc.stderr
    assert "untrusted" in other.stderr
    assert origin.requests() == [] and origin.events() == []  # not a byte got through
    # The listener still serves a good client, and that is all the backend ever saw.
    good = pp1("2001:db8:77::9", PROXY, 5, PP_PORT)
    good += b"GET /1k HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    assert Response(raw_request(topo, PP_PORT, good)).body == ONE_K
    (req,) = origin.wait_requests(1)
    assert one_header(req, "X-Forwarded-For") == "2001:db8:77::9"
    assert origin.events() == []


def test_accept_proxy_protocol_health_checks_are_not_errors(
    topo: ReverseTopology, kushi_factory: KushiFactory, origin_factory: OriginFactory
) -> None:
    """What HAProxy's ``check`` does with ``send-proxy-v2`` (a v2 LOCAL header, then a
    reset), and what a plain TCP health check does (connect, then reset or close without a
    byte), is no error: no access record, no warning."""
    origin_factory(f"{BACKEND}:{HTTP_PORT}", ns=topo.v4backend)
    kushi = kushi_factory(config=pp_config(PP_PORT, [f"{CLIENT}/128"]))
    local = PP2_SIGNATURE + b"\x20\x00\x00\x00"
    checks = [(local, True)] * 5 + [(b"", True), (b"", True), (b"", False), (local, False)]
    for data, reset in checks:
        sock = connect(topo, PP_PORT)
        if data:
            sock.sendall(data)
        if reset:  # as HAProxy ends its checks
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    # A real request afterwards; the checks, accepted before it, are over by its answer.
    good = local + b"GET /1k HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    assert Response(raw_request(topo, PP_PORT, good)).body == ONE_K
    recs = records(kushi, 1)
    assert [(r["method"], r["client"]) for r in recs] == [("GET", CLIENT)], recs
    assert "closing connection" not in kushi.stderr, kushi.stderr


def test_proxy_protocol_in_and_out_keeps_clients_apart(
    topo: ReverseTopology, kushi_factory: KushiFactory, origin_factory: OriginFactory
) -> None:
    """Accepting and sending together: the address from the incoming header is the one sent
    on, and clients behind the same load balancer never share a backend connection -- a
    reused one would carry the previous client's PROXY header.  Many short keep-alive
    clients one after the other, as a load balancer's connections come."""
    origin = origin_factory(f"{BACKEND}:{HTTP_PORT}", ns=topo.v4backend, proxy_protocol=True)
    kushi_factory(config=pp_config(PP_PORT, [f"{CLIENT}/128"], backend_proxy_protocol=2))
    clients = [f"2001:db8:77::{i:x}" if i % 2 else f"198.51.100.{i}" for i in range(1, CLIENTS + 1)]
    for i, client in enumerate(clients):
        data = pp2(client, PROXY if ":" in client else "198.51.100.1", 1000 + i, PP_PORT)
        data += b"GET /1k HTTP/1.1\r\nHost: x\r\n\r\n"  # keep-alive: the backend stays open
        with connect(topo, PP_PORT) as sock:
            sock.sendall(data)
            resp = read_response(sock)
            assert resp.status == 200 and resp.body == ONE_K
    reqs = origin.wait_requests(len(clients))
    shared = [
        (r["proxy_protocol"]["src"], x)
        for r, x in zip(reqs, clients, strict=True)
        if r["proxy_protocol"]["src"] != x
    ]
    assert shared == [], f"{len(shared)} of {len(clients)} requests went out as another client"
    assert [one_header(r, "X-Forwarded-For") for r in reqs] == clients
    assert len({r["conn"] for r in reqs}) == len(clients)


# =============================================================================================
# Integrity of large bodies


def test_integrity_50mib_reverse_upload_and_download(
    topo: ReverseTopology,
    kushi_factory: KushiFactory,
    origin_factory: OriginFactory,
    tmp_path: Path,
) -> None:
    """50 MiB up and 50 MiB down through reverse mode arrive byte for byte (SHA-256)."""
    origin = origin_factory(f"{BACKEND}:{HTTP_PORT}", ns=topo.v4backend)
    kushi = kushi_factory(
        ["reverse", "--listen", f"[{PROXY}]:{HTTP_PORT}", "--backend", f"http://{BACKEND}:8080"]
        + ["--access-log-format", "json"]
    )
    upload = tmp_path / "upload.bin"
    with upload.open("wb") as f:
        for piece in pattern_chunks(BIG, 1 << 20):
            f.write(piece)
    base = f"http://[{PROXY}]:{HTTP_PORT}"
    started = time.monotonic()
    proc = curl(
        topo,
        "--data-binary",
        f"@{upload}",
        "-H",
        "Content-Type: application/octet-stream",
        f"{base}/sha256",
    )
    up_seconds = time.monotonic() - started
    assert proc.returncode == 0, proc.stderr.decode()
    assert json.loads(proc.stdout) == {"length": BIG, "sha256": pattern_sha256(BIG)}
    upload.unlink()

    download = tmp_path / "download.bin"
    started = time.monotonic()
    proc = curl(topo, "-o", str(download), "-w", "%{http_code}", f"{base}/bytes/{BIG}")
    down_seconds = time.monotonic() - started
    assert proc.returncode == 0 and proc.stdout == b"200", proc.stderr.decode()
    assert download.stat().st_size == BIG
    assert sha256_file(download) == pattern_sha256(BIG)
    up_rec, down_rec = records(kushi, 2)
    assert up_rec["bytes_in"] >= BIG and down_rec["bytes_out"] >= BIG
    assert origin.wait_requests(2)[0]["body_sha256"] == pattern_sha256(BIG)
    print(
        f"reverse 50 MiB: upload {BIG / up_seconds / 2**20:.0f} MiB/s, "
        f"download {BIG / down_seconds / 2**20:.0f} MiB/s"
    )


def test_integrity_50mib_tcp_tls_download(
    topo: ReverseTopology,
    kushi_factory: KushiFactory,
    origin_factory: OriginFactory,
    tls_ca: Any,
    tmp_path: Path,
) -> None:
    """50 MiB over TLS through TCP mode arrives byte for byte (SHA-256)."""
    origin_factory(f"{BACKEND}:{TLS_PORT}", ns=topo.v4backend, tls=tls_ca)
    kushi = kushi_factory(
        ["tcp", "--listen", f"[{PROXY}]:{TLS_PORT}", "--backend", f"{BACKEND}:{TLS_PORT}"]
        + ["--access-log-format", "json"]
    )
    download = tmp_path / "download.bin"
    started = time.monotonic()
    proc = curl(
        topo,
        "--cacert",
        str(tls_ca.ca_pem),
        "--resolve",
        f"v4.test:{TLS_PORT}:[{PROXY}]",
        "-o",
        str(download),
        "-w",
        "%{http_code}",
        f"https://v4.test:{TLS_PORT}/bytes/{BIG}",
    )
    seconds = time.monotonic() - started
    assert proc.returncode == 0 and proc.stdout == b"200", proc.stderr.decode()
    assert download.stat().st_size == BIG
    assert sha256_file(download) == pattern_sha256(BIG)
    (rec,) = records(kushi, 1)
    assert rec["bytes_out"] > BIG and rec["family"] == "ipv4"
    print(f"tcp/tls 50 MiB: download {BIG / seconds / 2**20:.0f} MiB/s")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while piece := f.read(1 << 20):
            h.update(piece)
    return h.hexdigest()


def test_reverse_proxy_status_names_the_backend_used_on_a_keep_alive_connection(
    topo: ReverseTopology, kushi_factory: KushiFactory, origin_factory: OriginFactory
) -> None:
    """One keep-alive client connection, requests alternating over two backends whose
    responses end by closing (so every request gets a fresh backend connection): each
    response's Proxy-Status names the backend that actually answered it."""
    origin_factory(f"{BACKEND}:{HTTP_PORT}", ns=topo.v4backend, name="b1")
    origin_factory(f"{BACKEND2}:{HTTP_PORT}", ns=topo.v4backend2, name="b2")
    kushi = kushi_factory(
        ["reverse", "--listen", f"[{PROXY}]:{HTTP_PORT}", "--access-log-format", "json"]
        + ["--backend", f"http://{BACKEND}:{HTTP_PORT}", "--backend", f"http://{BACKEND2}:8080"]
    )
    n = 20
    urls = [f"http://[{PROXY}]:{HTTP_PORT}/close/{100 + i}" for i in range(n)]
    out = "%{num_connects} %header{x-origin-name} %header{proxy-status}\n"
    proc = curl(topo, "-w", out, *[arg for url in urls for arg in ("-o", "/dev/null", url)])
    assert proc.returncode == 0, proc.stderr.decode()
    lines = proc.stdout.decode().splitlines()
    assert len(lines) == n
    assert sum(int(line.split()[0]) for line in lines) == 1  # one client connection
    address = {"b1": f"{BACKEND}:{HTTP_PORT}", "b2": f"{BACKEND2}:{HTTP_PORT}"}
    names = [line.split()[1] for line in lines]
    assert all(a != b for a, b in zip(names, names[1:], strict=False)), names
    wrong = [line for line in lines if f'next-hop="{address[line.split()[1]]}"' not in line]
    assert wrong == [], wrong
    recs = records(kushi, n)
    assert [r["upstream"] for r in recs] == [address[x] for x in names]
