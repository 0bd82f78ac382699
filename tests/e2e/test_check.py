"""``kushi check`` end to end, in network namespaces (the standard topology).

Direct checks run in the ``proxy`` namespace: it is dual-stack and sits on the bridge with
the origins, so it plays the dual-stack user. ``--via`` runs in the IPv4-only ``client``
namespace through a kushi forward proxy in the ``proxy`` namespace. Names come from
``/etc/netns/<ns>/hosts``: ``v6.test`` (AAAA only), ``v4.test`` (A only) and ``dual.test``
(both). The sites:

* ``https://dual.test:18443`` and ``https://v6.test`` (443): ``support/origin.py`` with a
  certificate from the ``tls_ca`` test CA;
* ``http://v4.test:18081``: ``support/origin.py``, IPv4 only;
* ``http://dual.test:18080``: a small page server written here (pages that load resources
  from other hosts, and redirects).
"""

from __future__ import annotations

import json
import os
import pty
import socket
import subprocess
import sys
import threading
import warnings
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from support import netns
from support.kushi_proc import Kushi, run_kushi
from support.netns import StandardTopology
from support.origin import OriginProcess, spawn_origin

pytestmark = [pytest.mark.netns, pytest.mark.timeout(120)]

PAGE_PORT = 18080
V4_PORT = 18081
TLS_PORT = 18443
PROXY_PORT = 3128

#: Loads from dual.test (script, via <base>), v6.test and dual.test:18443 -- all IPv6.
GOOD_PAGE = """<!doctype html>
<html><head><base href="http://dual.test:18080/static/">
<link rel="stylesheet" href="https://v6.test/style.css">
<link rel="icon" href="http://v4.test:18081/favicon.ico">
<script src="app.js"></script></head>
<body><img srcset="https://v6.test/a.png 1x, https://dual.test:18443/b.png 2x" alt="">
<a href="http://v4.test:18081/">links are not resources</a>
<img src="data:image/gif;base64,R0lGODlhAQABAAAAACw=" alt="">
<iframe src="https://dual.test:18443/frame"></iframe>
<script src="//dual.test:18080/lib.js"></script>
</body></html>
"""
#: The same with one image from an IPv4-only host.
BAD_PAGE = GOOD_PAGE.replace(
    "</body>", '<img src="http://v4.test:18081/logo.png" alt="logo"></body>'
)
#: For --via (the proxy allows CONNECT to 443 only): v6.test, dual.test and v4.test.
VIA_PAGE = """<!doctype html><html><head>
<link rel=stylesheet href="https://v6.test/style.css"><script src="/app.js"></script>
</head><body><img src="http://v4.test:18081/logo.png"></body></html>
"""

PAGES: dict[str, tuple[int, dict[str, str], bytes]] = {
    "/good.html": (200, {"Content-Type": "text/html; charset=utf-8"}, GOOD_PAGE.encode()),
    "/bad.html": (200, {"Content-Type": "text/html; charset=utf-8"}, BAD_PAGE.encode()),
    "/via.html": (200, {"Content-Type": "text/html"}, VIA_PAGE.encode()),
    "/to-tls": (301, {"Location": "https://dual.test:18443/1k"}, b""),
    "/to-v4": (302, {"Location": "http://v4.test:18081/1k"}, b""),
    "/loop": (302, {"Location": "/loop"}, b""),
}


class PageHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        self.answer(body=True)

    def do_HEAD(self) -> None:
        self.answer(body=False)

    def answer(self, body: bool) -> None:
        status, headers, data = PAGES.get(
            self.path.split("?")[0], (200, {"Content-Type": "text/plain"}, b"resource\n")
        )
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class PageServer(ThreadingHTTPServer):
    """An http.server on a socket bound inside a namespace (``netns.ns_listen``)."""

    daemon_threads = True

    def __init__(self, sock: Any) -> None:
        super().__init__(sock.getsockname()[:2], PageHandler, bind_and_activate=False)
        self.socket.close()
        self.socket = sock
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
        self.thread.join(5)


class NoDataDNS:
    """A DNS server on 127.0.0.1:53 (the namespaces' resolv.conf) that answers every query
    with NOERROR and no records, as a real name server does for the AAAA of an IPv4-only
    name. Without it the resolver, having found only an A line in the hosts file, asks DNS
    for the AAAA, gets no answer and reports a temporary failure instead of "no records"."""

    def __init__(self, ns: Any) -> None:
        self.sock = netns.ns_socket(ns, socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 53))
        self.sock.settimeout(0.1)
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self) -> None:
        while not self.stopping.is_set():
            try:
                query, peer = self.sock.recvfrom(4096)
            except TimeoutError:
                continue
            end = 12
            while end < len(query) and query[end]:
                end += query[end] + 1
            end += 5  # the root label, QTYPE and QCLASS
            if len(query) < end:
                continue
            # ID, QR + the query's opcode and RD, RA + RCODE 0, one question, no records.
            head = query[:2] + bytes([0x80 | (query[2] & 0x79), 0x80]) + b"\0\1" + b"\0" * 6
            self.sock.sendto(head + query[12:end], peer)

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(5)
        self.sock.close()


def host_map(t: StandardTopology) -> dict[str, list[str]]:
    return {
        "v6.test": [t.v6origin_ip],
        "v4.test": [t.v4origin_ip],
        "dual.test": [t.dual_v6, t.dual_v4],
    }


@pytest.fixture(scope="module")
def sites(
    netns_topology: StandardTopology, tls_ca: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    t = netns_topology
    logs = tmp_path_factory.mktemp("check-sites")
    origins: dict[str, OriginProcess] = {}
    pages: list[PageServer] = []
    resolvers: list[NoDataDNS] = []
    tls = (tls_ca.cert_chain, tls_ca.key)
    try:
        resolvers += [NoDataDNS(t.proxy), NoDataDNS(t.client)]
        for name, host, listen, cert in (
            ("dual-tls", t.dualorigin, [f"[{t.dual_v6}]:{TLS_PORT}", f"{t.dual_v4}:{TLS_PORT}"],
             tls),
            ("v6-tls", t.v6origin, [f"[{t.v6origin_ip}]:443"], tls),
            ("v4", t.v4origin, [f"{t.v4origin_ip}:{V4_PORT}"], None),
        ):  # fmt: skip
            origins[name] = spawn_origin(
                listen,
                logs / f"{name}.jsonl",
                ns=host,
                name=name,
                tls_cert=cert[0] if cert else None,
                tls_key=cert[1] if cert else None,
            )
        for ip in (t.dual_v6, t.dual_v4):
            pages.append(PageServer(netns.ns_listen(t.dualorigin, ip, PAGE_PORT)))
        yield {"origins": origins, "ca": str(tls_ca.ca_pem)}
    finally:
        for page in pages:
            page.stop()
        for resolver in resolvers:
            resolver.stop()
        for origin in origins.values():
            origin.stop()


@pytest.fixture
def topo(netns_topology: StandardTopology, sites: dict[str, Any]) -> Iterator[StandardTopology]:
    """The topology with the test names in the proxy's and the client's hosts files."""
    t = netns_topology
    for host in (t.proxy, t.client):
        host.hosts(host_map(t))
    yield t
    for host in (t.proxy, t.client):
        host.hosts({})


def kushi_check(ns: Any, *args: str) -> tuple[int, str, str]:
    res = netns.run(ns, [sys.executable, "-m", "kushi", "check", *args], timeout=60)
    return res.returncode, res.stdout, res.stderr


def check_json(ns: Any, *args: str) -> tuple[int, dict[str, Any]]:
    code, out, err = kushi_check(ns, "--json", *args)
    assert out, err
    # Not a stray line on stderr (no asyncio warning from a TLS stream, no traceback).
    assert err == "", err
    report = json.loads(out)
    assert report["schema"] == "kushi-check/1"
    assert report["ok"] is (code == 0)
    return code, report


def is_ms(value: Any) -> bool:
    return isinstance(value, float | int) and value >= 0


def assert_leg_ok(
    leg: dict[str, Any], address: str, *, tls: bool, redirects: list[dict[str, Any]]
) -> None:
    assert leg["ok"] is True
    assert leg["path"] == "direct" and leg["via"] is None
    assert leg["address"] == address
    assert is_ms(leg["connect_ms"])
    if tls:
        assert is_ms(leg["tls_ms"]) and leg["tls_valid"] is True
    else:
        assert leg["tls_ms"] is None and leg["tls_valid"] is None
    assert leg["status"] == 200
    assert is_ms(leg["ttfb_ms"])
    assert leg["redirects"] == redirects
    assert leg["error"] is None


def test_dual_stack_site_passes(topo: StandardTopology, sites: dict[str, Any]) -> None:
    t = topo
    origin = sites["origins"]["dual-tls"]
    before = len(origin.requests())
    code, report = check_json(
        t.proxy,
        "--ca-file",
        sites["ca"],
        f"https://dual.test:{TLS_PORT}/1k",
        f"http://dual.test:{PAGE_PORT}/to-tls",
    )
    assert code == 0
    direct, redirected = report["results"]

    assert direct["url"] == f"https://dual.test:{TLS_PORT}/1k"
    assert (direct["host"], direct["port"]) == ("dual.test", TLS_PORT)
    assert direct["a"] == [t.dual_v4]
    assert direct["aaaa"] == [t.dual_v6]
    assert direct["dns_error"] is None
    assert_leg_ok(direct["ipv6"], f"[{t.dual_v6}]:{TLS_PORT}", tls=True, redirects=[])
    assert_leg_ok(direct["ipv4"], f"{t.dual_v4}:{TLS_PORT}", tls=True, redirects=[])
    assert direct["page"] is None
    assert direct["ok"] is True

    # http://dual.test:18080/to-tls redirects to the https site; each family follows it.
    assert redirected["url"] == f"http://dual.test:{PAGE_PORT}/to-tls"
    for family, here in (("ipv6", f"[{t.dual_v6}]"), ("ipv4", t.dual_v4)):
        hop = {
            "url": f"http://dual.test:{PAGE_PORT}/to-tls",
            "status": 301,
            "location": f"https://dual.test:{TLS_PORT}/1k",
            "address": f"{here}:{PAGE_PORT}",
        }
        assert_leg_ok(redirected[family], f"{here}:{TLS_PORT}", tls=True, redirects=[hop])
    assert redirected["ok"] is True

    # The origin saw kushi-check's GETs: two per family, from the proxy namespace's addresses.
    reqs = origin.wait_requests(before + 4)[before:]
    assert sorted((r["family"], r["client"]) for r in reqs) == [
        ("ipv4", t.proxy_v4),
        ("ipv4", t.proxy_v4),
        ("ipv6", t.proxy_v6),
        ("ipv6", t.proxy_v6),
    ]
    for r in reqs:
        headers = {k.lower(): v for k, v in r["headers"]}
        assert (r["method"], r["target"], r["tls"], r["sni"]) == ("GET", "/1k", True, "dual.test")
        assert headers["host"] == f"dual.test:{TLS_PORT}"
        assert headers["user-agent"] == "kushi-check"
        assert headers["connection"] == "close"

    # The same as text: a table, no colour when stdout is not a terminal.
    code, out, _ = kushi_check(t.proxy, "--ca-file", sites["ca"], f"https://dual.test:{TLS_PORT}/")
    assert code == 1  # "/" is a 404 on the origin: a final status >= 400 fails the leg
    lines = out.splitlines()
    assert lines[0] == f"https://dual.test:{TLS_PORT}/  FAIL"
    assert lines[1] == f"  DNS    A     {t.dual_v4}"
    assert lines[2] == f"         AAAA  {t.dual_v6}"
    assert lines[3].startswith(f"  IPv6   FAIL  [{t.dual_v6}]:{TLS_PORT}  connect ")
    assert "(certificate valid)  HTTP 404  first byte " in lines[3]
    assert lines[4] == f"               https://dual.test:{TLS_PORT}/ answered 404"
    assert lines[5].startswith(f"  IPv4   FAIL  {t.dual_v4}:{TLS_PORT}  connect ")
    assert lines[-1] == "1 of 1 URL checked do not work over IPv6"
    assert "\x1b" not in out


def test_ipv4_only_site_fails_on_the_ipv6_leg(
    topo: StandardTopology, sites: dict[str, Any]
) -> None:
    t = topo
    code, report = check_json(
        t.proxy,
        f"http://v4.test:{V4_PORT}/1k",
        f"http://dual.test:{PAGE_PORT}/to-v4",
        f"http://dual.test:{PAGE_PORT}/loop",
        f"https://dual.test:{TLS_PORT}/1k",  # no --ca-file: the certificate is not trusted
    )
    assert code == 1
    v4, to_v4, loop, untrusted = report["results"]

    assert (v4["a"], v4["aaaa"], v4["dns_error"]) == ([t.v4origin_ip], [], None)
    assert v4["ipv6"] == {
        "ok": False,
        "path": "direct",
        "via": None,
        "address": None,
        "connect_ms": None,
        "tls_ms": None,
        "tls_valid": None,
        "status": None,
        "ttfb_ms": None,
        "redirects": [],
        "error": "v4.test has no AAAA record",
    }
    assert_leg_ok(v4["ipv4"], f"{t.v4origin_ip}:{V4_PORT}", tls=False, redirects=[])
    assert v4["ok"] is False

    # A redirect to an IPv4-only host fails the IPv6 leg, naming the host; IPv4 follows it.
    leg6 = to_v4["ipv6"]
    assert leg6["ok"] is False
    assert leg6["error"] == (
        f"redirected to http://v4.test:{V4_PORT}/1k: v4.test has no AAAA record"
    )
    assert leg6["redirects"] == [
        {
            "url": f"http://dual.test:{PAGE_PORT}/to-v4",
            "status": 302,
            "location": f"http://v4.test:{V4_PORT}/1k",
            "address": f"[{t.dual_v6}]:{PAGE_PORT}",
        }
    ]
    assert leg6["address"] is None and leg6["status"] is None
    hop4 = {**leg6["redirects"][0], "address": f"{t.dual_v4}:{PAGE_PORT}"}
    assert_leg_ok(to_v4["ipv4"], f"{t.v4origin_ip}:{V4_PORT}", tls=False, redirects=[hop4])
    assert to_v4["ok"] is False

    # Redirects are followed 5 times at most.
    for family in ("ipv6", "ipv4"):
        assert loop[family]["ok"] is False
        assert loop[family]["error"] == "more than 5 redirects"
        assert len(loop[family]["redirects"]) == 5
        assert loop[family]["status"] == 302

    # A certificate the system does not trust: tls_valid false, the leg fails.
    for family in ("ipv6", "ipv4"):
        leg = untrusted[family]
        assert leg["ok"] is False and leg["tls_valid"] is False and leg["status"] is None
        assert leg["error"].startswith("dual.test: certificate not valid: ")
        assert is_ms(leg["connect_ms"])
    assert untrusted["ok"] is False


def test_page_with_an_ipv4_only_image_host_fails(
    topo: StandardTopology, sites: dict[str, Any]
) -> None:
    t = topo
    code, report = check_json(
        t.proxy,
        "--page",
        "--ca-file",
        sites["ca"],
        f"http://dual.test:{PAGE_PORT}/good.html",
        f"http://dual.test:{PAGE_PORT}/bad.html",
    )
    assert code == 1
    good, bad = report["results"]
    expected_ok = [
        ("v6.test", "https", 443, [t.v6origin_ip], f"[{t.v6origin_ip}]:443"),
        ("dual.test", "http", PAGE_PORT, [t.dual_v6], f"[{t.dual_v6}]:{PAGE_PORT}"),
        ("dual.test", "https", TLS_PORT, [t.dual_v6], f"[{t.dual_v6}]:{TLS_PORT}"),
    ]
    for result in (good, bad):
        assert result["ipv6"]["ok"] is True and result["ipv4"]["ok"] is True
        page = result["page"]
        assert page["url"] == result["url"] and page["truncated"] is False
        for host, (name, scheme, port, aaaa, address) in zip(
            page["hosts"], expected_ok, strict=False
        ):
            assert (host["host"], host["scheme"], host["port"]) == (name, scheme, port)
            assert host["aaaa"] == aaaa and host["address"] == address
            assert host["ok"] is True and host["error"] is None and is_ms(host["connect_ms"])

    assert len(good["page"]["hosts"]) == 3
    assert good["page"]["ok"] is True and good["page"]["error"] is None
    assert good["ok"] is True

    assert len(bad["page"]["hosts"]) == 4
    v4host = bad["page"]["hosts"][3]
    assert v4host == {
        "host": "v4.test",
        "scheme": "http",
        "port": V4_PORT,
        "aaaa": [],
        "ok": False,
        "address": None,
        "connect_ms": None,
        "error": "v4.test has no AAAA record",
    }
    assert bad["page"]["ok"] is False
    assert bad["page"]["error"] == "resources from hosts that do not work over IPv6: v4.test"
    assert bad["ok"] is False

    # The text report names the host too.
    code, out, _ = kushi_check(
        t.proxy, "--page", "--ca-file", sites["ca"], f"http://dual.test:{PAGE_PORT}/bad.html"
    )
    assert code == 1
    assert "  page   FAIL  4 resource hosts on http://dual.test:18080/bad.html\n" in out
    lines = out.splitlines()
    start = lines.index("  page   FAIL  4 resource hosts on http://dual.test:18080/bad.html")
    rows = [line.split(None, 2) for line in lines[start + 1 : start + 6]]
    assert rows[0][:2] == ["ok", "v6.test"]
    assert rows[0][2].startswith(f"[{t.v6origin_ip}]:443  connect ")
    assert rows[1][:2] == ["ok", f"dual.test:{PAGE_PORT}"]
    assert rows[2][:2] == ["ok", f"dual.test:{TLS_PORT}"]
    assert rows[3] == ["FAIL", f"v4.test:{V4_PORT}", "v4.test has no AAAA record"]
    assert rows[4] == ["resources", "from", "hosts that do not work over IPv6: v4.test"]


def test_via_a_kushi_from_the_ipv4_only_client(
    topo: StandardTopology, sites: dict[str, Any], tmp_path: Path
) -> None:
    t = topo
    # Kushi hands open()-ed files to Popen without closing them (not check's doing).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        proxy = Kushi(
            [
                "serve",
                "--listen",
                f"{t.proxy_client_ip}:{PROXY_PORT}",
                "--allow",
                "198.51.100.0/24",
                "--connect-ports",
                "443",
            ],
            tmp_path,
            netns=t.proxy.ns,
            wait_for=[(t.proxy_client_ip, PROXY_PORT)],
        )
    try:
        via = f"http://{t.proxy_client_ip}:{PROXY_PORT}"
        code, report = check_json(
            t.client,
            "--via",
            via,
            "--no-ipv4",  # the client cannot reach the origins directly at all
            "--page",
            "--ca-file",
            sites["ca"],
            "https://v6.test/1k",
            f"http://dual.test:{PAGE_PORT}/via.html",
            f"http://v4.test:{V4_PORT}/1k",
        )
        assert code == 1
        v6, page, v4 = report["results"]

        # The client's own resolver still answers; the IPv6 leg goes through the proxy.
        assert (v6["a"], v6["aaaa"]) == ([], [t.v6origin_ip])
        leg = v6["ipv6"]
        assert leg["ok"] is True and leg["error"] is None
        assert (leg["path"], leg["via"]) == ("via", via)
        assert leg["address"] == f"[{t.v6origin_ip}]:443"  # the proxy's next hop
        assert is_ms(leg["connect_ms"]) and is_ms(leg["tls_ms"]) and is_ms(leg["ttfb_ms"])
        assert (leg["tls_valid"], leg["status"], leg["redirects"]) == (True, 200, [])
        assert v6["ipv4"]["path"] == "skipped" and v6["ipv4"]["ok"] is False
        assert v6["ok"] is True

        # The page through the proxy: dual.test over IPv6 (the proxy prefers it), v6.test by
        # CONNECT, and v4.test, which the proxy can only reach over IPv4.
        assert page["ipv6"]["ok"] is True
        assert page["ipv6"]["address"] == f"[{t.dual_v6}]:{PAGE_PORT}"
        hosts = {(h["host"], h["port"]): h for h in page["page"]["hosts"]}
        assert set(hosts) == {("v6.test", 443), ("dual.test", PAGE_PORT), ("v4.test", V4_PORT)}
        assert hosts[("v6.test", 443)]["ok"] is True
        assert hosts[("v6.test", 443)]["address"] == f"[{t.v6origin_ip}]:443"
        assert hosts[("dual.test", PAGE_PORT)]["ok"] is True
        v4host = hosts[("v4.test", V4_PORT)]
        assert v4host["ok"] is False and v4host["address"] == f"{t.v4origin_ip}:{V4_PORT}"
        assert v4host["error"] == (
            f"the proxy reached v4.test over IPv4: next hop {t.v4origin_ip}:{V4_PORT}"
        )
        assert page["page"]["error"] == "resources from hosts that do not work over IPv6: v4.test"
        assert page["ok"] is False

        # An IPv4-only site: the proxy answers, but its next hop is IPv4.
        leg = v4["ipv6"]
        assert leg["ok"] is False and leg["status"] == 200
        assert leg["address"] == f"{t.v4origin_ip}:{V4_PORT}"
        assert leg["error"] == (
            f"the proxy reached v4.test over IPv4: next hop {t.v4origin_ip}:{V4_PORT}"
        )
        assert v4["ok"] is False

        # The proxy saw the requests: CONNECT for https, absolute-form for http.
        records = proxy.log_lines()
        assert any("CONNECT" in line and "v6.test:443" in line for line in records)
        assert any(f"http://v4.test:{V4_PORT}/1k" in line for line in records)

        # Text output says which way each leg went; an IPv4 leg is direct (here v6.test has
        # no A record, so it fails at once instead of waiting for the unroutable network).
        code, out, err = kushi_check(
            t.client, "--via", via, "--ca-file", sites["ca"], "https://v6.test/"
        )
        # Nothing on stderr but the report's own lines: no asyncio warning about the
        # TLS stream inside the tunnel.
        assert err == "", err
        lines = out.splitlines()
        assert lines[3].startswith(f"  IPv6   FAIL  via {via}  next hop [{t.v6origin_ip}]:443")
        assert lines[5] == "  IPv4   FAIL  direct  v6.test has no A record"
    finally:
        proxy.stop()


def test_terminal_gets_colour_and_a_progress_line(
    topo: StandardTopology, sites: dict[str, Any]
) -> None:
    """With stdout and stderr on a terminal: ANSI colours, and "n/m checks done" on stderr,
    erased before the report."""
    master, slave = pty.openpty()
    try:
        proc = netns.popen(
            topo.proxy,
            [sys.executable, "-m", "kushi", "check", "--ca-file", sites["ca"],
             f"https://dual.test:{TLS_PORT}/1k", f"http://v4.test:{V4_PORT}/1k"],
            stdout=slave,
            stderr=slave,
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
        os.close(slave)
        slave = -1
        out = b""
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            out += data
        assert proc.wait(30) == 1
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)
    text = out.decode()
    assert "\r\x1b[Kkushi check: 4/4 checks done\r\x1b[K" in text
    assert f"\x1b[1mhttps://dual.test:{TLS_PORT}/1k\x1b[0m  \x1b[32mPASS\x1b[0m" in text
    assert "  IPv6   \x1b[31;1mFAIL\x1b[0m  \x1b[31;1mv4.test has no AAAA record\x1b[0m" in text


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["ftp://example.test/"], "only http and https URLs can be checked"),
        (["http://[::1/"], "'http://[::1/': Invalid IPv6 URL"),
        (["http://example.test:99999/"], "invalid port"),
        (["--via", "https://proxy.test:3128", "http://x.test/"], "expected http://HOST:PORT"),
        (["--timeout", "0", "http://x.test/"], "--timeout must be more than 0 seconds"),
        (["--ca-file", "/nonexistent.pem", "http://x.test/"], "no such file"),
        ([], "the following arguments are required: URL"),
    ],
)
def test_bad_arguments_exit_2(args: list[str], message: str) -> None:
    res = run_kushi(["check", *args])
    assert res.returncode == 2
    assert message in res.stderr
    assert res.stdout == ""
