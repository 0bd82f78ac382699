"""The admin listener (issue 6): /metrics, /api/status, /proxy.pac, /healthz, admin_allow.

A real kushi subprocess forwards curl's requests to two real origins, one bound to ``[::1]``
only (so a request that reached it left kushi over IPv6) and one to ``127.0.0.1`` only. The
counters scraped from ``/metrics`` (parsed with prometheus-client's own parser) must equal,
per family, what curl itself measured: requests, status classes, bytes each way. The other
tests check the endpoints' answers and refusals byte for byte over raw sockets.

The pure helpers behind the counters (``fallback_of`` reading real ``Attempt.describe()``
text, ``Timeline``, the PAC file, config redaction) are checked at the end.
"""

from __future__ import annotations

import http.client
import json
import re
import signal
import socket
import subprocess
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import bcrypt
import pytest
from prometheus_client.parser import text_string_to_metric_families

from kushi import __version__
from kushi.accesslog import AccessRecord
from kushi.admin import config_view, pac_script
from kushi.config import load_config
from kushi.connector import Attempt
from kushi.metrics import Timeline, fallback_of, status_class
from support.kushi_proc import KUSHI, Kushi, free_port, write_toml
from support.origin import ONE_K

pytestmark = pytest.mark.timeout(60)

OriginFactory = Callable[..., Any]
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


# --- helpers ---------------------------------------------------------------------------


def start_kushi(config: Path, workdir: Path, port: int, admin: int) -> Kushi:
    """``Kushi`` hands open()-ed files to Popen; that ResourceWarning is not about kushi."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        return Kushi(
            ["serve", "--config", str(config)],
            workdir,
            wait_for=[("127.0.0.1", port), ("127.0.0.1", admin)],
        )


@dataclass
class Measured:
    """What curl saw: the bytes it sent and received, per request."""

    status: int
    header_bytes: int
    body_bytes: int
    request_bytes: int

    @property
    def received(self) -> int:
        return self.header_bytes + self.body_bytes


def curl(proxy_port: int, url: str, *extra: str) -> Measured:
    result = subprocess.run(
        [
            "curl",
            "-sS",
            "-o",
            "/dev/null",
            "--max-time",
            "20",
            "-x",
            f"http://127.0.0.1:{proxy_port}",
            "-w",
            "%{http_code} %{size_header} %{size_download} %{size_request}",
            *extra,
            url,
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    status, header, body, request = (int(x) for x in result.stdout.split())
    return Measured(status, header, body, request)


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes


def get(port: int, path: str, method: str = "GET") -> Response:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path)
        resp = conn.getresponse()
        body = resp.read()
        return Response(resp.status, {k.lower(): v for k, v in resp.getheaders()}, body)
    finally:
        conn.close()


def raw_exchange(port: int, data: bytes) -> bytes:
    """Send ``data``, read until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        chunks = []
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)


def scrape(admin: int) -> Samples:
    resp = get(admin, "/metrics")
    assert resp.status == 200, resp.body
    assert resp.headers["content-type"].startswith("text/plain")
    samples: Samples = {}
    for family in text_string_to_metric_families(resp.body.decode()):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum over every sample of ``name`` whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, lab), v in samples.items() if n == name and want <= lab)


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@dataclass
class Setup:
    kushi: Kushi
    port: int
    admin: int
    v6: Any  # support.origin.OriginProcess bound to [::1]
    v4: Any  # ... bound to 127.0.0.1
    config_path: Path
    top: dict[str, Any] = field(default_factory=dict)

    def records(self, count: int) -> list[dict[str, Any]]:
        records = self.kushi.wait_records(count)
        assert len(records) >= count, (records, self.kushi.stderr)
        return records


@pytest.fixture
def setup(tmp_path: Path, origin_factory: OriginFactory) -> Iterator[Setup]:
    v6 = origin_factory(listen=["[::1]:0"], name="v6")
    v4 = origin_factory(listen=["127.0.0.1:0"], name="v4")
    port, admin = free_port(), free_port()
    htpasswd = tmp_path / "users.htpasswd"
    hashed = bcrypt.hashpw(b"s3cret", bcrypt.gensalt(rounds=4)).decode()
    htpasswd.write_text(f"alice:{hashed}\n")
    top: dict[str, Any] = {
        "listen": [f"127.0.0.1:{port}"],
        "admin_listen": [f"127.0.0.1:{admin}"],
        "access_log_format": "json",
        "allow_destinations": ["127.0.0.0/8", "::1/128"],
        "connect_ports": [v6.port, v4.port],
        # Loopback clients pass on the allow list; the password file is there to be redacted.
        "auth_file": str(htpasswd),
        "auth_combine": "either",
        "timeouts": {"shutdown_grace": 20.0},
    }
    config = tmp_path / "kushi.toml"
    write_toml(config, top)
    kushi = start_kushi(config, tmp_path, port, admin)
    try:
        yield Setup(kushi, port, admin, v6, v4, config, top)
    finally:
        kushi.stop()


# --- /metrics ----------------------------------------------------------------------------


N6, N4 = 5, 3


def test_metrics_count_every_request_by_family(setup: Setup) -> None:
    v6_url = setup.v6.url("/1k")  # http://[::1]:PORT/1k
    v4_url = setup.v4.url("/1k")
    seen6 = [curl(setup.port, v6_url) for _ in range(N6)]
    seen4 = [curl(setup.port, v4_url) for _ in range(N4)]
    assert {m.status for m in seen6 + seen4} == {200}
    assert {m.body_bytes for m in seen6 + seen4} == {len(ONE_K)}
    # One tunnel (CONNECT, then GET inside it) and one refused connection.
    tunnel = curl(setup.port, v6_url, "--proxytunnel")
    assert tunnel.status == 200
    closed_port = free_port()
    refused = curl(setup.port, f"http://127.0.0.1:{closed_port}/")
    assert refused.status == 502

    records = setup.records(N6 + N4 + 2)
    # The origins saw exactly these requests, over the family each is bound to.
    assert len(setup.v6.wait_requests(N6 + 1)) == N6 + 1
    assert {r["family"] for r in setup.v6.requests()} == {"ipv6"}
    assert len(setup.v4.wait_requests(N4)) == N4

    m = scrape(setup.admin)
    fwd = {"listener": "forward", "mode": "forward"}
    assert value(m, "kushi_requests_total", **fwd, family="ipv6", status_class="2xx") == N6 + 1
    assert value(m, "kushi_requests_total", **fwd, family="ipv4", status_class="2xx") == N4
    assert value(m, "kushi_requests_total", **fwd, family="none", status_class="5xx") == 1
    assert total(m, "kushi_requests_total") == N6 + N4 + 2
    assert value(m, "kushi_tunnels_total", **fwd, family="ipv6") == 1
    assert total(m, "kushi_tunnels_total") == 1
    assert value(m, "kushi_errors_total", error_type="connection_refused") == 1
    assert total(m, "kushi_errors_total") == 1
    assert total(m, "kushi_happy_eyeballs_fallbacks_total") == 0

    # Bytes: for plain requests, exactly what curl sent and received ...
    plain6 = [r for r in records if r["family"] == "ipv6" and r["method"] == "GET"]
    assert sum(r["bytes_out"] for r in plain6) == sum(x.received for x in seen6)
    assert sum(r["bytes_in"] for r in plain6) == sum(x.request_bytes for x in seen6)
    tunnel_rec = next(r for r in records if r["method"] == "CONNECT")
    down6 = sum(x.received for x in seen6) + tunnel_rec["bytes_out"]
    up6 = sum(x.request_bytes for x in seen6) + tunnel_rec["bytes_in"]
    assert value(m, "kushi_bytes_total", direction="upstream_to_client", family="ipv6") == down6
    assert value(m, "kushi_bytes_total", direction="client_to_upstream", family="ipv6") == up6
    assert value(m, "kushi_bytes_total", direction="upstream_to_client", family="ipv4") == sum(
        x.received for x in seen4
    )
    assert value(m, "kushi_bytes_total", direction="client_to_upstream", family="ipv4") == sum(
        x.request_bytes for x in seen4
    )
    # ... and the 502 page kushi wrote itself, with no upstream.
    assert value(m, "kushi_bytes_total", direction="upstream_to_client", family="none") == (
        refused.received
    )

    # Connect times, when the records carry them (AccessRecord.connect_ms).
    timed = [r for r in records if (r.get("connect_ms") or 0) > 0]
    if any("connect_ms" in r for r in records):
        # Upstream connections are pooled: the first request to each origin and the tunnel
        # opened one; later requests may reuse it (and then carry no connect time).
        assert len([r for r in timed if r["family"] == "ipv6"]) >= 2
        assert len([r for r in timed if r["family"] == "ipv4"]) >= 1
        assert value(m, "kushi_upstream_connect_seconds_sum", family="ipv6") > 0
    for family in ("ipv6", "ipv4"):
        count = value(m, "kushi_upstream_connect_seconds_count", family=family)
        assert count == len([r for r in timed if r["family"] == family])

    # curl has closed its connections; kushi notices each end of stream.
    wait_for(lambda: value(scrape(setup.admin), "kushi_open_connections") == 0, "0 open")
    assert value(m, "kushi_open_tunnels") == 0
    assert value(m, "kushi_info", version=__version__) == 1
    assert value(m, "kushi_uptime_seconds") > 0
    assert value(m, "kushi_config_reloads_total") == 0
    assert value(m, "process_start_time_seconds") > 0


def test_metrics_bytes_on_a_keep_alive_connection(setup: Setup) -> None:
    url = setup.v4.url("/1k")
    result = subprocess.run(
        ["curl", "-sS", "-x", f"http://127.0.0.1:{setup.port}", "-o", "/dev/null", "-o"]
        + ["/dev/null", "-w", "%{size_request}\n", url, url],
        capture_output=True,
        text=True,
        timeout=30,
    )
    sent = sum(int(x) for x in result.stdout.split())
    setup.records(2)
    m = scrape(setup.admin)
    assert value(m, "kushi_bytes_total", direction="client_to_upstream", family="ipv4") == sent


def test_reload_is_counted_and_changes_the_pac_file(setup: Setup) -> None:
    pac = get(setup.admin, "/proxy.pac")
    assert f'return "PROXY 127.0.0.1:{setup.port}";' in pac.body.decode()
    write_toml(setup.config_path, {**setup.top, "pac_proxy": "proxy.example.net:3128"})
    setup.kushi.signal(signal.SIGHUP)
    wait_for(lambda: value(scrape(setup.admin), "kushi_config_reloads_total") == 1, "reload")
    pac = get(setup.admin, "/proxy.pac")
    assert 'return "PROXY proxy.example.net:3128";' in pac.body.decode()
    status = json.loads(get(setup.admin, "/api/status").body)
    assert status["reloads"] == 1
    assert status["config"]["pac_proxy"] == "proxy.example.net:3128"


# --- the other endpoints ------------------------------------------------------------------


def test_api_status_matches_the_traffic(setup: Setup) -> None:
    for _ in range(2):
        curl(setup.port, setup.v6.url("/1k?via=status"))
    curl(setup.port, setup.v4.url("/1k?via=status"))
    setup.records(3)
    resp = get(setup.admin, "/api/status")
    assert resp.status == 200
    assert resp.headers["content-type"] == "application/json"
    assert resp.headers["cache-control"] == "no-store"
    status = json.loads(resp.body)
    assert status["health"] == "ok"
    assert status["totals"]["requests"] == 3
    assert status["totals"]["by_family"] == {"ipv6": 2, "ipv4": 1}
    assert status["errors"] == []
    assert status["uptime"] > 0
    # The chart's series: three requests, split by family, somewhere in the window.
    timeline = status["timeline"]
    assert timeline["families"] == ["ipv6", "ipv4", "nat64"]
    assert sum(row[1] for row in timeline["buckets"]) == 2
    assert sum(row[2] for row in timeline["buckets"]) == 1
    # Recent requests, newest first.
    recent = status["recent"]
    assert [r["family"] for r in recent] == ["ipv4", "ipv6", "ipv6"]
    assert recent[0]["target"] == setup.v4.url("/1k?via=status")
    assert recent[0]["upstream"] == f"127.0.0.1:{setup.v4.port}"
    assert recent[1]["upstream"] == f"[::1]:{setup.v6.port}"
    assert all(r["client"] == "127.0.0.1" and r["status"] == 200 for r in recent)
    # The config in force, without the password file's path.
    config = status["config"]
    assert config["listeners"][0]["listen"] == [f"127.0.0.1:{setup.port}"]
    assert config["listeners"][0]["auth_file"] == "(redacted)"
    assert config["admin_listen"] == [f"127.0.0.1:{setup.admin}"]
    assert "users.htpasswd" not in resp.body.decode()


def test_status_page_and_its_files(setup: Setup) -> None:
    page = get(setup.admin, "/")
    assert page.status == 200
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    csp = page.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp
    html = page.body.decode()
    assert '<meta name="viewport"' in html
    assert 'src="static/status.js"' in html and 'href="static/status.css"' in html
    assert "http://" not in html.replace('href="api/status"', "")  # nothing from elsewhere
    js = get(setup.admin, "/static/status.js")
    assert js.status == 200 and js.headers["content-type"].startswith("text/javascript")
    assert b'fetch("api/status"' in js.body
    assert b"innerHTML" not in js.body
    css = get(setup.admin, "/static/status.css")
    assert css.status == 200 and css.headers["content-type"].startswith("text/css")


def test_healthz_and_503_while_shutting_down(setup: Setup) -> None:
    ok = get(setup.admin, "/healthz")
    assert (ok.status, ok.body) == (200, b"ok\n")
    # An open tunnel keeps kushi in its shutdown grace period.
    target = f"[::1]:{setup.v6.port}"
    with socket.create_connection(("127.0.0.1", setup.port), timeout=10) as tunnel:
        tunnel.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            head += tunnel.recv(4096)
        assert head.startswith(b"HTTP/1.1 200 ")
        m = scrape(setup.admin)
        assert value(m, "kushi_open_connections") == 1
        status = json.loads(get(setup.admin, "/api/status").body)
        assert status["open_connections"] == 1
        if status["open_tunnels"] is not None:  # counted once Services.open_tunnels exists
            assert status["open_tunnels"] == 1
            assert value(m, "kushi_open_tunnels") == 1
        setup.kushi.signal(signal.SIGTERM)
        wait_for(lambda: get(setup.admin, "/healthz").status == 503, "healthz 503")
        stopping = get(setup.admin, "/healthz")
        assert stopping.body == b"stopping\n"
        assert json.loads(get(setup.admin, "/api/status").body)["health"] == "stopping"
        # The tunnel still works during the grace period.
        tunnel.sendall(f"GET /1k HTTP/1.1\r\nHost: {target}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := tunnel.recv(65536):
            data += chunk
        assert data.endswith(ONE_K)
    assert setup.kushi.proc.wait(15) == 0
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", setup.admin), timeout=2).close()


def test_proxy_pac(setup: Setup) -> None:
    for path in ("/proxy.pac", "/wpad.dat"):
        resp = get(setup.admin, path)
        assert resp.status == 200
        assert resp.headers["content-type"] == "application/x-ns-proxy-autoconfig"
        text = resp.body.decode()
        assert text.startswith("// kushi proxy auto-config")
        assert "function FindProxyForURL(url, host) {" in text
        assert f'return "PROXY 127.0.0.1:{setup.port}";' in text
        assert 'return "DIRECT";' in text and 'h === "localhost"' in text


def test_bad_requests_are_answered_by_render_error(setup: Setup) -> None:
    # Unknown page, wrong method, a body, absolute form, a malformed head.
    resp = get(setup.admin, "/nope")
    assert resp.status == 404
    assert resp.headers["proxy-status"].startswith("kushi; error=http_request_error")
    resp = get(setup.admin, "/metrics", method="DELETE")
    assert resp.status == 405 and resp.headers["allow"] == "GET, HEAD"
    answer = raw_exchange(
        setup.admin, b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc"
    )
    assert answer.startswith(b"HTTP/1.1 405 ")
    answer = raw_exchange(setup.admin, b"GET http://example.com/ HTTP/1.1\r\nHost: x\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400 ") and b"does not proxy" in answer
    answer = raw_exchange(setup.admin, b"GET /metrics HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert b"Connection: close\r\n" in answer
    # HEAD: the same headers, no body.
    head = get(setup.admin, "/healthz", method="HEAD")
    assert (head.status, head.body, head.headers["content-length"]) == (200, b"", "3")
    # Keep-alive: three requests on one connection, answered in order.
    answer = raw_exchange(
        setup.admin,
        b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
        b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n"
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    statuses = re.findall(rb"HTTP/1\.1 ([0-9]{3}) ", answer)
    assert statuses == [b"200", b"404", b"200"]
    assert answer.endswith(b"ok\n")


def test_status_page_refuses_foreign_host_names(setup: Setup) -> None:
    """DNS rebinding: a page on attacker.example re-pointed at 127.0.0.1 reads nothing."""

    def with_host(path: str, host: str) -> bytes:
        request = f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
        return raw_exchange(setup.admin, request.encode())

    for path in ("/api/status", "/", "/static/status.js", "/metrics"):
        answer = with_host(path, f"attacker.example:{setup.admin}")
        assert answer.startswith(b"HTTP/1.1 403 "), answer[:200]
        assert b"DNS rebinding" in answer
        for host in (f"localhost:{setup.admin}", f"127.0.0.1:{setup.admin}", "[::1]"):
            assert with_host(path, host).startswith(b"HTTP/1.1 200 ")
    # WPAD fetches the PAC file as wpad.<domain>; neither it nor /healthz tells a page
    # more than the address and port it rebinds to.
    for path in ("/proxy.pac", "/wpad.dat", "/healthz"):
        assert with_host(path, "attacker.example").startswith(b"HTTP/1.1 200 ")


def test_admin_allow_refuses_other_clients(tmp_path: Path) -> None:
    port, admin = free_port(), free_port()
    config = tmp_path / "kushi.toml"
    write_toml(
        config,
        {
            "listen": [f"127.0.0.1:{port}"],
            "admin_listen": [f"127.0.0.1:{admin}"],
            "admin_allow": ["203.0.113.0/24"],
        },
    )
    kushi = start_kushi(config, tmp_path, port, admin)
    try:
        for path in ("/metrics", "/healthz", "/", "/proxy.pac", "/api/status"):
            answer = raw_exchange(admin, f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            head, _, body = answer.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 403 Forbidden\r\n"), answer
            assert b"Proxy-Status: kushi; error=http_request_denied" in head
            assert b"Connection: close" in head
            assert b"127.0.0.1 is not in admin_allow" in body
            assert b"kushi_requests_total" not in body
    finally:
        assert kushi.stop() == 0


def test_admin_port_in_use_is_a_startup_error(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        port = free_port()
        result = subprocess.run(
            [
                *KUSHI,
                "serve",
                "--listen",
                f"127.0.0.1:{port}",
                "--admin-listen",
                f"127.0.0.1:{busy}",
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert result.returncode == 1
    assert f"admin_listen: cannot listen on 127.0.0.1:{busy}: address already in use" in (
        result.stderr
    )


# --- several workers ----------------------------------------------------------------------


def test_metrics_add_up_across_workers(tmp_path: Path, origin_factory: OriginFactory) -> None:
    origin = origin_factory(listen=["[::1]:0"], name="v6")
    port, admin = free_port(), free_port()
    config = tmp_path / "kushi.toml"
    top = {
        "listen": [f"127.0.0.1:{port}"],
        "admin_listen": [f"127.0.0.1:{admin}"],
        "access_log_format": "json",
        "allow_destinations": ["::1/128"],
        "workers": 2,
    }
    write_toml(config, top)
    kushi = start_kushi(config, tmp_path, port, admin)
    try:
        n = 12
        for _ in range(n):
            assert curl(port, origin.url("/1k")).status == 200
        assert len(kushi.wait_records(n)) == n
        wait_for(
            lambda: total(scrape(admin), "kushi_requests_total", family="ipv6") == n,
            "the counters of both workers",
        )
        m = scrape(admin)
        assert value(m, "kushi_info", version=__version__) == 1
        # Each worker publishes its open connections once a second.
        wait_for(lambda: value(scrape(admin), "kushi_open_connections") == 0, "0 open")
        status = json.loads(get(admin, "/api/status").body)
        assert status["totals"]["by_family"] == {"ipv6": n}
        assert status["counted"] == "all workers"

        # The recent-requests table merges every worker's requests: send requests on new
        # connections (a unique path each) until both workers have served some; every
        # one of them must be in the table, newest first, whichever worker served it.
        def table() -> list[dict[str, Any]]:
            views: list[dict[str, Any]] = json.loads(get(admin, "/api/status").body)["recent"]
            return [v for v in views if "recent=" in v["target"]]

        sent: list[str] = []
        for i in range(60):
            path = f"/1k?recent={i}"
            assert curl(port, origin.url(path)).status == 200
            sent.append(path)
            if i % 10 == 9:
                wait_for(lambda: len(table()) == len(sent), "every worker's requests listed")
                if len({v["worker"] for v in table()}) == 2:
                    break
        views = table()
        assert len({v["worker"] for v in views}) == 2, "one worker served every request"
        assert [v["target"].split("/", 3)[3] for v in views] == [p[1:] for p in reversed(sent)]
        assert "all 2 workers" in json.loads(get(admin, "/api/status").body)["recent_scope"]
    finally:
        assert kushi.stop() == 0
    leftovers = list(Path("/tmp").glob(f"kushi-metrics-*/*_{kushi.proc.pid}.db"))
    assert leftovers == []


# --- pure helpers ---------------------------------------------------------------------------


def record(**kw: Any) -> AccessRecord:
    return AccessRecord(time=0.0, listener="l", mode="forward", client="127.0.0.1", **kw)


def test_fallback_of_reads_the_connector_attempt_text() -> None:
    lost6 = Attempt("2001:db8::1", 80, "ipv6", "abandoned", 0.25).describe()
    refused6 = Attempt("2001:db8::2", 80, "ipv6", "refused", 0.001, "ECONNREFUSED").describe()
    lost4 = Attempt("192.0.2.1", 80, "ipv4", "timeout", 10.0).describe()
    assert fallback_of(record(family="ipv4", attempts=[lost6])) == ("ipv6", "ipv4")
    assert fallback_of(record(family="ipv4", attempts=[refused6, lost6])) == ("ipv6", "ipv4")
    assert fallback_of(record(family="ipv6", attempts=[lost4])) == ("ipv4", "ipv6")
    # A loser of the winner's own family is not a fallback between families.
    assert fallback_of(record(family="ipv6", attempts=[lost6])) is None
    assert fallback_of(record(family="", attempts=[lost6])) is None
    assert fallback_of(record(family="ipv6")) is None


def test_status_class() -> None:
    assert [status_class(s) for s in (101, 200, 304, 403, 502, 0)] == [
        "1xx",
        "2xx",
        "3xx",
        "4xx",
        "5xx",
        "none",
    ]


def test_timeline_places_counter_growth_in_buckets() -> None:
    tl = Timeline(step=10.0, size=6)
    tl.sample(1000.0, {})  # the baseline
    tl.sample(1003.0, {"ipv6": 2.0})
    tl.sample(1008.0, {"ipv6": 3.0, "ipv4": 1.0})
    tl.sample(1021.0, {"ipv6": 3.0, "ipv4": 4.0, "none": 5.0})
    series = tl.series(1025.0)
    assert series["step"] == 10.0 and series["end"] == 1030.0
    assert series["buckets"] == [
        [970.0, 0.0, 0.0, 0.0],
        [980.0, 0.0, 0.0, 0.0],
        [990.0, 0.0, 0.0, 0.0],
        [1000.0, 3.0, 1.0, 0.0],
        [1010.0, 0.0, 0.0, 0.0],
        [1020.0, 0.0, 3.0, 0.0],
    ]
    # Old buckets fall out of the window.
    tl.sample(1095.0, {"ipv6": 4.0, "ipv4": 4.0})
    rows = tl.series(1095.0)["buckets"]
    assert isinstance(rows, list)
    assert [row[0] for row in rows if any(row[1:])] == [1090.0]


def test_pac_script_quotes_the_proxy() -> None:
    text = pac_script('[2001:db8::1]:3128"; alert(1); "')
    assert 'return "PROXY [2001:db8::1]:3128\\"; alert(1); \\"";' in text


def test_config_view_redacts_secrets(tmp_path: Path) -> None:
    htpasswd = tmp_path / "pw"
    htpasswd.write_text("bob:" + bcrypt.hashpw(b"x", bcrypt.gensalt(rounds=4)).decode() + "\n")
    config = load_config(overrides={"auth_file": str(htpasswd), "listen": ["127.0.0.1:3128"]})
    view = config_view(config)
    assert view["listeners"][0]["auth_file"] == "(redacted)"
    assert view["listeners"][0]["connect_ports"] == [443]
    assert view["timeouts"]["connect"] == 10.0
    assert str(htpasswd) not in json.dumps(view)
    # The users and hashes read from the file at load are never shown either.
    assert config.listeners[0].auth_users[0][0] == "bob"
    assert "$2b$" not in json.dumps(view) and "bob" not in json.dumps(view)
    unset = config_view(load_config(overrides={"listen": ["127.0.0.1:3128"]}))
    assert unset["listeners"][0]["auth_file"] is None
