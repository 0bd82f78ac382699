"""SOCKS5 (issue 11) on loopback, through real sockets and real SOCKS clients.

One kushi process serves six listeners (see ``setup``): SOCKS listeners open, with RFC 1929
authentication, with the built-in destination refusals, and for an allow list that does
not admit loopback; a forward listener that also speaks SOCKS5 on its port; one with
``socks = false``. The origin listens on ``[::1]`` only, so every success proves IPv6
egress; refusals are made against a listening socket nothing accepts on, whose queue of
pending connections shows whether kushi touched it. Clients: curl (``socks5h://``,
``socks5://``), PySocks, ``nc -X 5`` (what ssh's ProxyCommand runs), ssh itself, and the
raw client in ``support/socksclient.py`` for exact bytes.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bcrypt
import pytest
import socks  # PySocks

from support import socksclient as sc
from support.kushi_proc import Kushi, free_port, write_toml
from support.origin import ONE_K, OriginProcess
from support.tcpserver import ThreadedServer

pytestmark = pytest.mark.timeout(60)

PASSWORD = "correct horse battery staple"
HEADER_READ = 1.0
CLEAN_ENV = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
LOOPBACK = ["127.0.0.0/8", "::1/128"]


class SshBanner(ThreadedServer):
    """Says what an SSH server says first (RFC 4253 section 4.2), reads the client's
    version line, then sends a packet of impossible length: ssh gives up at once ("Bad
    packet length") instead of waiting for a key exchange."""

    def serve(self, conn: socket.socket, number: int) -> None:
        conn.sendall(b"SSH-2.0-kushi_test_banner\r\n")
        conn.recv(4096)
        conn.sendall(b"\xff" * 64)
        while conn.recv(4096):
            pass


@dataclass
class Setup:
    kushi: Kushi
    origin: OriginProcess
    ports: dict[str, int]
    admin: int
    sink: socket.socket  # listening on [::1], never accepting: counts contacts
    sink_port: int
    closed_port: int
    ssh: SshBanner
    workdir: Path

    def proxy(self, name: str) -> tuple[str, int]:
        return ("127.0.0.1", self.ports[name])

    def records(self, needle: str, count: int = 1, timeout: float = 5.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while True:
            found = [r for r in self.kushi.json_records() if needle in r["target"]]
            if len(found) >= count or time.monotonic() > deadline:
                return found
            time.sleep(0.02)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    from support.origin import spawn_origin

    workdir = tmp_path_factory.mktemp("socks")
    # Both families on one port: "localhost" is 127.0.0.1 only on some machines (the
    # IPv6 egress of names is proven in tests/e2e/test_socks_netns.py).
    origin = spawn_origin(["[::1]:0", "127.0.0.1:0"], workdir / "origin.jsonl", name="origin")
    assert len({p for _, p in origin.endpoints}) == 1, origin.endpoints
    sink = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    sink.bind(("::1", 0))
    sink.listen(16)
    sink_port = sink.getsockname()[1]
    closed_port = free_port("::1")
    ssh = SshBanner("::1")
    ports = {
        name: free_port()
        for name in ("socks", "auth", "strict", "denied", "http", "httponly", "v6only")
    }
    admin = free_port()
    htpasswd = workdir / "htpasswd"
    digest = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=4)).decode()
    htpasswd.write_text(f"alice:{digest}\n")
    connect_ports = [origin.port, sink_port, closed_port, ssh.port]
    common = {"connect_ports": connect_ports, "allow_destinations": LOOPBACK}
    listeners = [
        {"name": "socks", "mode": "socks", "listen": [f"127.0.0.1:{ports['socks']}"], **common},
        {
            "name": "auth",
            "mode": "socks",
            "listen": [f"127.0.0.1:{ports['auth']}"],
            "auth_file": str(htpasswd),
            **common,
        },
        {
            "name": "strict",  # the built-in refusals: loopback is not a destination
            "mode": "socks",
            "listen": [f"127.0.0.1:{ports['strict']}"],
            "connect_ports": connect_ports,
        },
        {
            "name": "denied",
            "mode": "socks",
            "listen": [f"127.0.0.1:{ports['denied']}"],
            "allow": ["192.0.2.0/24"],
            **common,
        },
        {"name": "http", "mode": "forward", "listen": [f"127.0.0.1:{ports['http']}"], **common},
        {
            "name": "httponly",
            "mode": "forward",
            "listen": [f"127.0.0.1:{ports['httponly']}"],
            "socks": False,
            **common,
        },
        {
            "name": "v6only",
            "mode": "socks",
            "listen": [f"127.0.0.1:{ports['v6only']}"],
            "egress": "ipv6-only",
            **common,
        },
    ]
    config = workdir / "kushi.toml"
    write_toml(
        config,
        {
            "access_log_format": "json",
            "admin_listen": [f"127.0.0.1:{admin}"],
            "timeouts": {"header_read": HEADER_READ},
        },
        listeners,
    )
    kushi = Kushi(["serve", "--config", str(config)], workdir, loopback_destinations=False)
    try:
        kushi.wait_ready()
        yield Setup(kushi, origin, ports, admin, sink, sink_port, closed_port, ssh, workdir)
    finally:
        kushi.stop()
        origin.stop()
        sink.close()
        ssh.close()


def curl(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        ["curl", "-sS", "--max-time", "20", *args], capture_output=True, env=CLEAN_ENV, timeout=30
    )


def marker() -> str:
    return uuid.uuid4().hex[:12]


def origin_saw(setup: Setup, mark: str) -> dict[str, Any]:
    deadline = time.monotonic() + 5
    while not (found := [r for r in setup.origin.requests() if mark in r["target"]]):
        assert time.monotonic() < deadline, f"origin never saw {mark}"
        time.sleep(0.02)
    assert len(found) == 1
    return found[0]


# --- 1: CONNECT with each address type, through real clients ------------------------------


def test_curl_socks5h_sends_the_name_and_kushi_resolves_it(setup: Setup) -> None:
    mark = marker()
    port = setup.origin.port
    proxy = f"socks5h://127.0.0.1:{setup.ports['socks']}"
    r = curl("--proxy", proxy, f"http://localhost:{port}/1k?m={mark}")
    assert r.returncode == 0, r.stderr
    assert r.stdout == ONE_K
    seen = origin_saw(setup, mark)
    (record,) = setup.records(f"localhost:{port}")
    assert record["method"] == "SOCKS5-CONNECT"
    assert (record["mode"], record["listener"], record["status"]) == ("socks", "socks", 200)
    # Whatever localhost is here, kushi used the address the origin saw the request from.
    assert record["family"] == seen["family"]
    assert record["upstream"] in (f"[::1]:{port}", f"127.0.0.1:{port}")
    assert seen["client"] == record["upstream"].rpartition(":")[0].strip("[]")
    assert record["bytes_out"] > len(ONE_K) and record["bytes_in"] > 0


def test_curl_socks5_sends_an_ipv6_literal(setup: Setup) -> None:
    mark = marker()
    port = setup.origin.port
    r = curl(
        "--proxy", f"socks5://127.0.0.1:{setup.ports['socks']}", f"http://[::1]:{port}/1k?m={mark}"
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout == ONE_K
    assert origin_saw(setup, mark)["family"] == "ipv6"
    (record,) = setup.records(f"[::1]:{port}")
    assert record["status"] == 200 and record["family"] == "ipv6"


def _http_get(sock: socket.socket, path: str) -> bytes:
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    out = b""
    while chunk := sock.recv(65536):
        out += chunk
    return out


def test_pysocks_by_name_and_by_ipv4_literal_refused_by_family(setup: Setup) -> None:
    mark = marker()
    sock = socks.create_connection(
        ("localhost", setup.origin.port),
        timeout=10,
        proxy_type=socks.SOCKS5,
        proxy_addr="127.0.0.1",
        proxy_port=setup.ports["socks"],
        proxy_rdns=True,
    )
    with sock:
        response = _http_get(sock, f"/1k?m={mark}")
    assert response.startswith(b"HTTP/1.1 200") and response.endswith(ONE_K)
    origin_saw(setup, mark)
    # An IPv4 literal (ATYP 1) to the IPv6-only origin's port: refused, as the origin
    # listens on [::1] only.
    with pytest.raises(socks.GeneralProxyError, match="Connection refused"):
        socks.create_connection(
            ("127.0.0.1", setup.closed_port),
            timeout=10,
            proxy_type=socks.SOCKS5,
            proxy_addr="127.0.0.1",
            proxy_port=setup.ports["socks"],
        )


@pytest.mark.skipif(shutil.which("nc") is None, reason="netcat-openbsd (make test installs it)")
def test_nc_x5_as_ssh_proxycommand_runs_it(setup: Setup) -> None:
    mark = marker()
    request = f"GET /1k?m={mark} HTTP/1.0\r\nHost: localhost\r\n\r\n".encode()
    proc = subprocess.run(
        [
            "nc",
            "-X",
            "5",
            "-x",
            f"127.0.0.1:{setup.ports['socks']}",
            "localhost",
            str(setup.origin.port),
        ],
        input=request,
        capture_output=True,
        timeout=20,
    )
    assert proc.stdout.startswith(b"HTTP/1.1 200"), proc.stderr
    assert proc.stdout.endswith(ONE_K)
    origin_saw(setup, mark)
    # nc sent the name (ATYP 3), kushi resolved it: the record says the name it was given.
    records = setup.records(f"localhost:{setup.origin.port}", count=99, timeout=0.5)
    assert any(r["status"] == 200 and r["bytes_in"] > len(request) for r in records)


@pytest.mark.skipif(
    shutil.which("nc") is None or shutil.which("ssh") is None, reason="needs ssh and nc"
)
def test_ssh_with_proxycommand_nc_x5_reaches_the_server(setup: Setup) -> None:
    proxy = f"127.0.0.1:{setup.ports['socks']}"
    proc = subprocess.run(
        [
            "ssh",
            "-v",
            "-F",
            "/dev/null",
            "-o",
            f"ProxyCommand=nc -X 5 -x {proxy} %h %p",
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            f"UserKnownHostsFile={setup.workdir / 'known_hosts'}",
            "-o",
            "ConnectTimeout=10",
            "-p",
            str(setup.ssh.port),
            "nobody@::1",
            "true",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
    )
    # The fake server only says its version: ssh got that far through kushi, over IPv6.
    assert "remote software version kushi_test_banner" in proc.stderr, proc.stderr[-2000:]
    assert "Bad packet length" in proc.stderr, proc.stderr[-2000:]
    record = setup.kushi.record_where(target=f"[::1]:{setup.ssh.port}")
    assert record["family"] == "ipv6" and record["status"] == 200


# --- 2: refusals, each with its reply code, none contacting the destination ---------------


def _refused(setup: Setup, listener: str, host: str, port: int, command: int = 1) -> int:
    sock, reply = sc.connect(setup.proxy(listener), host, port, command=command)
    with sock:
        assert reply is not None
        assert sc.closed_by_peer(sock, 5.0)
    return reply[0]


def test_port_not_in_connect_ports_is_not_allowed(setup: Setup) -> None:
    assert _refused(setup, "socks", "::1", 8) == 0x02
    record = setup.kushi.record_where(target="[::1]:8")
    assert (record["error"], record["status"]) == ("http_request_denied", 403)
    assert "port 8 is not allowed" in record["details"]


def test_destination_policy_refuses_before_contact(setup: Setup) -> None:
    assert _refused(setup, "strict", "::1", setup.sink_port) == 0x02
    assert sc.pending_accepts(setup.sink) == 0
    record = setup.kushi.record_where(listener="strict", target=f"[::1]:{setup.sink_port}")
    assert record["error"] == "destination_ip_prohibited"
    assert "a loopback address" in record["details"]


def test_client_not_in_allow_list_is_not_allowed(setup: Setup) -> None:
    assert _refused(setup, "denied", "::1", setup.sink_port) == 0x02
    assert sc.pending_accepts(setup.sink) == 0
    record = setup.kushi.record_where(listener="denied")
    assert record["error"] == "http_request_denied"
    assert "not in this listener's allow list" in record["details"]


def test_ipv6_only_refuses_an_ipv4_literal_as_network_unreachable(setup: Setup) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    port = listener.getsockname()[1]
    with listener:
        start = time.monotonic()
        # (connect_ports does not list this port: the port check comes first, so use the
        # one the sink has and an IPv4 address.)
        code = _refused(setup, "v6only", "127.0.0.1", setup.sink_port)
        assert time.monotonic() - start < 1.0
        assert code == 0x03
        assert sc.pending_accepts(listener) == 0 and port
    record = setup.kushi.record_where(listener="v6only", target=f"127.0.0.1:{setup.sink_port}")
    assert record["error"] == "destination_not_found"
    assert "egress policy is ipv6-only" in record["details"]


def test_connection_refused(setup: Setup) -> None:
    assert _refused(setup, "socks", "::1", setup.closed_port) == 0x05
    record = setup.kushi.record_where(listener="socks", target=f"[::1]:{setup.closed_port}")
    assert record["error"] == "connection_refused"


def test_bind_and_unknown_address_type_are_not_supported(setup: Setup) -> None:
    assert _refused(setup, "socks", "::1", setup.sink_port, command=2) == 0x07
    with socket.create_connection(setup.proxy("socks"), 5) as sock:
        assert sc.greet(sock) == b"\x05\x00"
        sock.sendall(b"\x05\x01\x00\x09" + bytes(6))
        reply = sc.read_reply(sock)
        assert reply is not None and reply[0] == 0x08
        assert sc.closed_by_peer(sock, 5.0)
    assert sc.pending_accepts(setup.sink) == 0
    for reason in ("SOCKS5 BIND is not supported", "SOCKS5 address type 9 is not supported"):
        record = setup.kushi.record_where(listener="socks", details=reason)
        assert (record["status"], record["error"]) == (400, "http_request_error")


# --- 3: RFC 1929 ----------------------------------------------------------------------------


def test_username_password_with_curl(setup: Setup) -> None:
    mark = marker()
    proxy = f"socks5h://alice:{PASSWORD.replace(' ', '%20')}@127.0.0.1:{setup.ports['auth']}"
    r = curl("--proxy", proxy, f"http://localhost:{setup.origin.port}/1k?m={mark}")
    assert r.returncode == 0, r.stderr
    assert r.stdout == ONE_K
    origin_saw(setup, mark)
    record = setup.kushi.record_where(listener="auth", status=200)
    assert record["user"] == "alice"


def test_wrong_password_fails_and_closes(setup: Setup) -> None:
    with socket.create_connection(setup.proxy("auth"), 5) as sock:
        assert sc.greet(sock, b"\x00\x02") == b"\x05\x02"
        assert sc.login(sock, "alice", "not-the-password-7f3a") == b"\x01\x01"
        assert sc.closed_by_peer(sock, 5.0)
    record = setup.kushi.record_where(listener="auth", error="http_request_denied")
    assert "rejected for user 'alice'" in record["details"]
    assert record["user"] == ""
    everything = setup.kushi.stdout + setup.kushi.stderr
    assert "not-the-password-7f3a" not in everything
    assert PASSWORD not in everything


def test_no_acceptable_method_is_0xff(setup: Setup) -> None:
    with socket.create_connection(setup.proxy("auth"), 5) as sock:
        assert sc.greet(sock, b"\x00\x01") == b"\x05\xff"
        assert sc.closed_by_peer(sock, 5.0)
    r = curl("--proxy", f"socks5h://127.0.0.1:{setup.ports['auth']}", "http://localhost:1/")
    assert r.returncode == 97, r.stderr  # curl: "No authentication method was acceptable"
    assert b"authentication method" in r.stderr.lower() or b"auth" in r.stderr.lower()


# --- bad input ---------------------------------------------------------------------------


def test_truncated_greeting(setup: Setup) -> None:
    with socket.create_connection(setup.proxy("socks"), 5) as sock:
        sock.sendall(b"\x05\x02\x00")
        sock.shutdown(socket.SHUT_WR)
        assert sc.recv_exact(sock, 10) == b""
    record = setup.kushi.record_where(details="connection closed inside the SOCKS5 greeting")
    assert record["error"] == "http_request_error" and record["method"] == "SOCKS5"


def test_unknown_version_is_closed_unanswered(setup: Setup) -> None:
    with socket.create_connection(setup.proxy("socks"), 5) as sock:
        sock.sendall(b"\x04\x01\x00\x50\x7f\x00\x00\x01\x00")  # a SOCKS4 CONNECT
        assert sc.recv_exact(sock, 10) == b""
    record = setup.kushi.record_where(details="unknown SOCKS version 4 (kushi speaks SOCKS5)")
    assert record["error"] == "http_request_error"


def test_oversized_domain_name(setup: Setup) -> None:
    with socket.create_connection(setup.proxy("socks"), 5) as sock:
        assert sc.greet(sock) == b"\x05\x00"
        sock.sendall(b"\x05\x01\x00\x03\xfe" + b"a" * 254 + b"\x01\xbb")
        reply = sc.read_reply(sock)
        assert reply is not None and reply[0] == 0x01
        assert sc.closed_by_peer(sock, 5.0)
    setup.kushi.record_where(details="SOCKS5 domain name of 254 octets is longer than 253")


def test_client_that_stops_mid_handshake_is_closed_after_the_header_timeout(
    setup: Setup,
) -> None:
    with socket.create_connection(setup.proxy("socks"), 5) as sock:
        assert sc.greet(sock) == b"\x05\x00"
        start = time.monotonic()
        sock.sendall(b"\x05\x01\x00\x03")  # half a request, then nothing
        assert sc.closed_by_peer(sock, HEADER_READ + 5.0)
        elapsed = time.monotonic() - start
    assert HEADER_READ * 0.8 <= elapsed < HEADER_READ + 3.0
    record = setup.kushi.record_where(
        details=f"SOCKS5 handshake not complete within {HEADER_READ:g} s"
    )
    assert record["status"] == 408


# --- 4: SOCKS5 on the HTTP proxy port --------------------------------------------------------


def test_forward_port_serves_http_and_socks5(setup: Setup) -> None:
    port = setup.ports["http"]
    marks = marker(), marker()
    r = curl(
        "--proxy",
        f"socks5h://127.0.0.1:{port}",
        f"http://localhost:{setup.origin.port}/1k?m={marks[0]}",
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout == ONE_K
    r = curl(
        "--proxy", f"http://127.0.0.1:{port}", f"http://[::1]:{setup.origin.port}/1k?m={marks[1]}"
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout == ONE_K
    assert origin_saw(setup, marks[1])["family"] == "ipv6"
    socks_record = setup.kushi.record_where(listener="http", method="SOCKS5-CONNECT")
    assert socks_record["mode"] == "forward"
    assert socks_record["family"] == origin_saw(setup, marks[0])["family"]
    assert setup.kushi.record_where(listener="http", method="GET")["status"] == 200


def test_socks_false_serves_http_only(setup: Setup) -> None:
    port = setup.ports["httponly"]
    with socket.create_connection(("127.0.0.1", port), 5) as sock:
        sock.sendall(b"\x05\x01\x00")
        answer = sc.recv_exact(sock, 12)
    assert answer.startswith(b"HTTP/1.1 4"), answer  # an HTTP answer, not a SOCKS5 one
    r = curl("--proxy", f"socks5h://127.0.0.1:{port}", f"http://localhost:{setup.origin.port}/1k")
    assert r.returncode != 0
    assert not [
        r
        for r in setup.kushi.json_records()
        if r["listener"] == "httponly" and r["method"].startswith("SOCKS5")
    ]


# --- 7: metrics, status, PAC --------------------------------------------------------------


def _get(setup: Setup, path: str) -> bytes:
    with urllib.request.urlopen(f"http://127.0.0.1:{setup.admin}{path}", timeout=5) as resp:
        body: bytes = resp.read()
    return body


def _socks_sessions(metrics: str, **labels: str) -> float:
    """The kushi_socks_sessions_total samples with these labels, summed."""
    total = 0.0
    for line in metrics.splitlines():
        if line.startswith("kushi_socks_sessions_total{") and all(
            f'{k}="{v}"' in line for k, v in labels.items()
        ):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_metrics_status_and_pac_know_socks(setup: Setup) -> None:
    for listener in ("socks", "http"):
        r = curl(
            "--proxy",
            f"socks5h://127.0.0.1:{setup.ports[listener]}",
            f"http://[::1]:{setup.origin.port}/1k",
        )
        assert r.returncode == 0, r.stderr
    want = {
        # SOCKS5 on the forward port is counted under that listener and its mode.
        "http": {"listener": "http", "mode": "forward", "command": "connect", "family": "ipv6"},
        "socks": {"listener": "socks", "mode": "socks", "command": "connect", "family": "ipv6"},
    }
    # (The records, and so the counts, are written once kushi sees the tunnels end.)
    deadline = time.monotonic() + 5
    while True:
        metrics = _get(setup, "/metrics").decode()
        counts = {k: _socks_sessions(metrics, status_class="2xx", **v) for k, v in want.items()}
        if all(counts.values()) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert counts["http"] >= 1 and counts["socks"] >= 1, counts
    status = json.loads(_get(setup, "/api/status"))
    assert status["totals"]["socks"]["connect"] >= 2
    pac = _get(setup, "/proxy.pac").decode()
    assert (
        f'return "PROXY 127.0.0.1:{setup.ports["http"]}; SOCKS5 127.0.0.1:{setup.ports["socks"]}";'
        in pac
    )


def test_a_silent_connection_does_not_hold_up_shutdown(tmp_path: Path) -> None:
    """The first-byte wait on a forward port (HTTP or SOCKS5 next) is idle time: SIGTERM
    closes it at once instead of waiting out timeouts.shutdown_grace (30 s)."""
    port = free_port()
    kushi = Kushi(["serve", "--listen", f"127.0.0.1:{port}", "--admin-listen", "off"], tmp_path)
    try:
        kushi.wait_ready()
        with socket.create_connection(("127.0.0.1", port), 5) as sock:
            time.sleep(0.2)
            start = time.monotonic()
            kushi.signal(signal.SIGTERM)
            assert sc.closed_by_peer(sock, 10.0)
            assert kushi.proc.wait(10) == 0
            assert time.monotonic() - start < 5.0
    finally:
        kushi.stop()
