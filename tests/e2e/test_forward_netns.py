"""The forward proxy (issue 2) end to end, in network namespaces.

Topology (``netns_topology``, see ``tests/support/netns.py``)::

    client 198.51.100.2 (IPv4 only)
      |
    proxy 198.51.100.1 | 203.0.113.1 + 2001:db8:1::1 (forwarding off)  <- kushi runs here
      |
    v6origin 2001:db8:1::6 (IPv6 only), v4origin 203.0.113.4 (IPv4 only),
    dualorigin 2001:db8:1::5 + 203.0.113.5, a blackhole router that drops 2001:db8:99::/64

The proxy namespace's ``/etc/hosts`` maps ``v6.test``, ``v4.test``, ``dual.test``,
``broken6.test`` (a blackholed IPv6 address plus the dual origin's IPv4 one) and ``dead6.test``
(the blackholed IPv6 address only); nothing resolves through DNS (resolv.conf points at
127.0.0.1, where nothing listens).  Real curl runs in the IPv4-only client namespace with
``-x http://198.51.100.1:PORT``; one kushi per egress policy runs in the proxy namespace with
``--access-log-format json``.  Every test checks what happened on the wire three ways: the
origin's request log (which address and family the request arrived from), kushi's JSON access
log, and the response curl got (status, ``Proxy-Status``, body).
"""

from __future__ import annotations

import os
import re
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from support import netns
from support.kushi_proc import Kushi, write_toml
from support.netns import StandardTopology
from support.origin import ONE_K, OriginProcess, spawn_origin

pytestmark = pytest.mark.timeout(60)

#: Where each kushi listens (all in the proxy namespace, on its client-side address).
PORTS = {"prefer-ipv6": 3128, "ipv6-only": 3129, "prefer-ipv4": 3130, "ipv4-only": 3131}
#: ``[timeouts] connect`` of the ipv6-only instance (the others keep the default, 10 s).
SHORT_CONNECT = 2.0
DEFAULT_CONNECT = 10.0
#: The Happy Eyeballs Connection Attempt Delay kushi uses by default (RFC 8305: 250 ms).
ATTEMPT_DELAY_MS = 250
CURL_MAX_TIME = 20

#: curl without any proxy settings from the environment (only ``-x`` counts).
CLEAN_ENV = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}


# --- curl ------------------------------------------------------------------------------------


@dataclass
class Head:
    status: int
    headers: list[tuple[str, str]]

    def get(self, name: str) -> str | None:
        values = [v for k, v in self.headers if k.lower() == name.lower()]
        assert len(values) <= 1, f"{name} appears {len(values)} times: {values}"
        return values[0] if values else None


@dataclass
class Response:
    returncode: int
    heads: list[Head]  # every head curl printed: the CONNECT answer (-p) first, then the final
    body: bytes
    stderr: str
    elapsed: float

    @property
    def final(self) -> Head:
        assert self.heads, f"curl got no response (exit {self.returncode}): {self.stderr}"
        return self.heads[-1]

    @property
    def status(self) -> int:
        return self.final.status

    def proxy_status(self, head: Head | None = None) -> ProxyStatus:
        value = (head or self.final).get("Proxy-Status")
        assert value is not None, f"no Proxy-Status in {(head or self.final).headers}"
        return ProxyStatus.parse(value)


def _parse_head(raw: bytes) -> Head:
    lines = raw.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = []
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers.append((name.strip(), value.strip()))
    return Head(status, headers)


def curl(ns: netns.Host, *args: str, proxy: str | None = None) -> Response:
    """Real curl in namespace ``ns``; ``-D -`` puts every response head before the body."""
    argv = ["curl", "-sS", "--max-time", str(CURL_MAX_TIME), "-D", "-"]
    if proxy is not None:
        argv += ["-x", proxy]
    start = time.monotonic()
    proc = netns.run(ns, [*argv, *args], text=False, env=CLEAN_ENV, timeout=CURL_MAX_TIME + 10)
    elapsed = time.monotonic() - start
    out: bytes = proc.stdout
    heads = []
    while out.startswith(b"HTTP/"):
        raw, sep, out = out.partition(b"\r\n\r\n")
        assert sep, f"unterminated response head: {raw!r}"
        heads.append(_parse_head(raw))
    return Response(proc.returncode, heads, out, proc.stderr.decode(errors="replace"), elapsed)


@dataclass
class ProxyStatus:
    """One Proxy-Status member (RFC 9209): the proxy's name and its parameters."""

    name: str
    params: dict[str, str]

    @classmethod
    def parse(cls, value: str) -> ProxyStatus:
        """Strict: exactly one member, every parameter a token or an sf-string."""
        m = re.match(r"\s*([A-Za-z*][A-Za-z0-9_.*:/%-]*)", value)
        assert m, value
        name, pos = m.group(1), m.end()
        params: dict[str, str] = {}
        param = re.compile(r'\s*;\s*([a-z*][a-z0-9_.*-]*)=("(?:[^"\\]|\\.)*"|[A-Za-z0-9_.:*/-]+)')
        while pos < len(value.rstrip()):
            m = param.match(value, pos)
            assert m, f"not one Proxy-Status member with parameters: {value!r} at {pos}"
            raw = m.group(2)
            params[m.group(1)] = re.sub(r"\\(.)", r"\1", raw[1:-1]) if raw[0] == '"' else raw
            pos = m.end()
        return cls(name, params)


# --- the setup: hosts, origins, one kushi per egress policy ----------------------------------


@dataclass
class Net:
    topo: StandardTopology
    ca_pem: Path
    v6: OriginProcess  # v6origin, HTTP on [::]:80
    v6tls: OriginProcess  # v6origin, HTTPS on [::]:443
    v4: OriginProcess  # v4origin, HTTP on 0.0.0.0:80
    dual: OriginProcess  # dualorigin, HTTP on [::]:80 and 0.0.0.0:80

    @property
    def origins(self) -> list[OriginProcess]:
        return [self.v6, self.v6tls, self.v4, self.dual]


def with_marker(origin: OriginProcess, marker: str) -> list[dict[str, Any]]:
    return [r for r in origin.requests() if marker in r.get("target", "")]


def wait_marker(origin: OriginProcess, marker: str, timeout: float = 5.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while not (found := with_marker(origin, marker)):
        assert time.monotonic() < deadline, f"{origin.name} never logged {marker}"
        time.sleep(0.02)
    assert len(found) == 1, found
    return found[0]


def new_marker() -> str:
    return uuid.uuid4().hex[:12]


@pytest.fixture(scope="module")
def net(
    netns_topology: StandardTopology, tls_ca: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Net]:
    t = netns_topology
    logs = tmp_path_factory.mktemp("forward-netns-origins")
    started: list[OriginProcess] = []

    def start(host: netns.Host, listen: list[str], name: str, **kw: Any) -> OriginProcess:
        origin = spawn_origin(listen, logs / f"{name}.jsonl", ns=host, name=name, **kw)
        started.append(origin)
        return origin

    try:
        # Before any kushi starts: `ip netns exec` shows this file as the proxy's /etc/hosts.
        t.proxy.hosts(
            {
                "v6.test": [t.v6origin_ip],
                "v4.test": [t.v4origin_ip],
                "dual.test": [t.dual_v6, t.dual_v4],
                "broken6.test": [t.blackhole_net_ip, t.dual_v4],  # Happy Eyeballs
                "dead6.test": [t.blackhole_net_ip],
            }
        )
        yield Net(
            t,
            tls_ca.ca_pem,
            v6=start(t.v6origin, ["[::]:80"], "v6origin"),
            v6tls=start(
                t.v6origin,
                ["[::]:443"],
                "v6origin-tls",
                tls_cert=tls_ca.cert_chain,
                tls_key=tls_ca.key,
            ),
            v4=start(t.v4origin, ["0.0.0.0:80"], "v4origin"),
            dual=start(t.dualorigin, ["[::]:80", "0.0.0.0:80"], "dualorigin"),
        )
    finally:
        for origin in started:
            origin.stop()
        t.proxy.hosts({})


@dataclass
class Proxy:
    policy: str
    kushi: Kushi
    url: str
    connect_timeout: float

    def record(self, needle: str, *, method: str = "GET", timeout: float = 5.0) -> dict[str, Any]:
        """The one access-log record of a request whose target contains ``needle``."""
        deadline = time.monotonic() + timeout
        while True:
            found = [
                r
                for r in self.kushi.json_records()
                if r["method"] == method and needle in r["target"]
            ]
            if found or time.monotonic() > deadline:
                break
            time.sleep(0.02)
        assert len(found) == 1, (found, self.kushi.log_lines()[-5:], self.kushi.stderr[-2000:])
        return found[0]


def start_proxy(
    net: Net, policy: str, workdir: Path, connect_timeout: float | None = None
) -> Proxy:
    t = net.topo
    port = PORTS[policy]
    argv = [
        "serve",
        "--listen",
        f"{t.proxy_client_ip}:{port}",
        "--allow",
        "198.51.100.0/24",
        "--access-log-format",
        "json",
        "--connect-ports",
        "443",
        "--egress",
        policy,
    ]
    if connect_timeout is not None:
        config = workdir / f"kushi-{policy}.toml"
        write_toml(config, {"timeouts": {"connect": connect_timeout}})
        argv += ["--config", str(config)]
    kushi = Kushi(
        argv,
        workdir,
        wait_for=[(t.proxy_client_ip, port)],
        netns=t.proxy.ns,
        loopback_destinations=False,  # nothing here is on loopback: keep the default refusals
    )
    return Proxy(
        policy,
        kushi,
        f"http://{t.proxy_client_ip}:{port}",
        connect_timeout if connect_timeout is not None else DEFAULT_CONNECT,
    )


def _proxy_fixture(
    name: str, policy: str, connect_timeout: float | None = None
) -> Callable[..., Any]:
    @pytest.fixture(scope="module", name=name)
    def fixture(net: Net, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
        workdir = tmp_path_factory.mktemp(f"kushi-{policy}")
        proxy = start_proxy(net, policy, workdir, connect_timeout)
        try:
            yield proxy
        finally:
            proxy.kushi.stop()

    return fixture


prefer6_fixture = _proxy_fixture("prefer6", "prefer-ipv6")
v6only_fixture = _proxy_fixture("v6only", "ipv6-only", SHORT_CONNECT)
prefer4_fixture = _proxy_fixture("prefer4", "prefer-ipv4")
v4only_fixture = _proxy_fixture("v4only", "ipv4-only")


def assert_ok(r: Response) -> None:
    assert r.returncode == 0, f"curl exit {r.returncode}: {r.stderr}"
    assert r.status == 200, (r.final, r.body[:500])
    assert r.body == ONE_K


def attempt_ms(text: str) -> int:
    m = re.search(r"after (\d+) ms", text)
    assert m, text
    return int(m.group(1))


# --- 1-3: IPv4-only client, IPv6 sites --------------------------------------------------------


def test_ipv4_client_fetches_ipv6_only_site(net: Net, prefer6: Proxy) -> None:
    t = net.topo
    marker = new_marker()
    r = curl(t.client, f"http://v6.test/1k?m={marker}", proxy=prefer6.url)
    assert_ok(r)
    assert r.final.get("X-Origin-Name") == "v6origin"
    ps = r.proxy_status()
    assert ps.name == "kushi"
    assert ps.params["next-hop"] == f"[{t.v6origin_ip}]:80"
    assert ps.params["received-status"] == "200"
    assert ps.params["details"] == "ipv6"  # no fallback happened

    seen = wait_marker(net.v6, marker)
    assert (seen["client"], seen["family"]) == (t.proxy_v6, "ipv6")
    assert ["Host", "v6.test"] in seen["headers"]

    rec = prefer6.record(marker)
    assert rec["client"] == t.client_ip
    assert rec["status"] == 200
    assert rec["family"] == "ipv6"
    assert rec["upstream"] == f"[{t.v6origin_ip}]:80"
    assert rec["attempts"] == [] and rec["error"] == ""
    assert rec["target"] == f"http://v6.test/1k?m={marker}"


def test_connect_tunnel_to_ipv6_only_site(net: Net, prefer6: Proxy) -> None:
    t = net.topo
    marker = new_marker()
    r = curl(
        t.client,
        "-p",
        "--cacert",
        str(net.ca_pem),
        f"https://v6.test/1k?m={marker}",
        proxy=prefer6.url,
    )
    assert_ok(r)
    assert len(r.heads) == 2, r.heads  # the proxy's "200 Connection established", then the site
    opened = r.heads[0]
    assert opened.status == 200
    ps = r.proxy_status(opened)
    assert ps.name == "kushi"
    assert ps.params["next-hop"] == f"[{t.v6origin_ip}]:443"
    assert ps.params["details"] == "ipv6"
    # The final response came through the tunnel untouched: kushi cannot add headers to it.
    assert r.final.get("Proxy-Status") is None
    assert r.final.get("X-Origin-Name") == "v6origin-tls"

    seen = wait_marker(net.v6tls, marker)
    assert (seen["client"], seen["family"]) == (t.proxy_v6, "ipv6")
    assert seen["tls"] is True and seen["sni"] == "v6.test"

    rec = prefer6.record("v6.test:443", method="CONNECT")
    assert rec["target"] == "v6.test:443"
    assert rec["status"] == 200
    assert rec["family"] == "ipv6"
    assert rec["upstream"] == f"[{t.v6origin_ip}]:443"
    assert rec["client"] == t.client_ip
    assert rec["bytes_out"] > len(ONE_K) and rec["bytes_in"] > 0  # TLS both ways


def test_prefer_ipv6_uses_ipv6_for_dual_stack_site(net: Net, prefer6: Proxy) -> None:
    t = net.topo
    marker = new_marker()
    r = curl(t.client, f"http://dual.test/1k?m={marker}", proxy=prefer6.url)
    assert_ok(r)
    ps = r.proxy_status()
    assert ps.params["next-hop"] == f"[{t.dual_v6}]:80"
    assert ps.params["details"] == "ipv6"
    seen = wait_marker(net.dual, marker)
    assert (seen["client"], seen["family"]) == (t.proxy_v6, "ipv6")
    rec = prefer6.record(marker)
    assert (rec["family"], rec["upstream"], rec["attempts"]) == ("ipv6", f"[{t.dual_v6}]:80", [])


# --- 4: ipv6-only ------------------------------------------------------------------------------


def test_ipv6_only_refuses_ipv4_only_site_at_once(net: Net, v6only: Proxy) -> None:
    t = net.topo
    marker = new_marker()
    before = len(net.v4.requests())
    r = curl(t.client, f"http://v4.test/1k?m={marker}", proxy=v6only.url)
    assert r.returncode == 0, r.stderr
    assert r.status == 502
    ps = r.proxy_status()
    assert ps.params["error"] == "destination_not_found"
    assert "next-hop" not in ps.params  # no connection was attempted
    text = r.body.decode()
    assert "v4.test has no IPv6 address" in text, text
    assert t.v4origin_ip in text and "ipv6-only" in text, text
    assert "destination_not_found" in text

    rec = v6only.record(marker)
    assert (rec["status"], rec["error"]) == (502, "destination_not_found")
    assert (rec["upstream"], rec["family"], rec["attempts"]) == ("", "", [])
    assert "v4.test has no IPv6 address" in rec["details"]
    # Refused before any connection: the IPv4 origin received nothing.
    assert len(net.v4.requests()) == before
    assert with_marker(net.v4, marker) == []


def test_ipv6_only_refuses_ipv4_literal(net: Net, v6only: Proxy) -> None:
    t = net.topo
    marker = new_marker()
    before = len(net.v4.requests())
    r = curl(t.client, f"http://{t.v4origin_ip}/1k?m={marker}", proxy=v6only.url)
    assert r.returncode == 0, r.stderr
    assert r.status == 502
    ps = r.proxy_status()
    assert ps.params["error"] == "destination_not_found"
    reason = ps.params["details"]
    assert f"{t.v4origin_ip} is an IPv4 address" in reason and "ipv6-only" in reason, reason
    assert reason in r.body.decode()
    rec = v6only.record(marker)
    assert (rec["status"], rec["error"], rec["upstream"]) == (502, "destination_not_found", "")
    assert len(net.v4.requests()) == before


def test_ipv6_only_still_serves_ipv6_sites(net: Net, v6only: Proxy) -> None:
    t = net.topo
    marker = new_marker()
    r = curl(t.client, f"http://dual.test/1k?m={marker}", proxy=v6only.url)
    assert_ok(r)
    assert r.proxy_status().params["next-hop"] == f"[{t.dual_v6}]:80"
    seen = wait_marker(net.dual, marker)
    assert (seen["client"], seen["family"]) == (t.proxy_v6, "ipv6")
    assert v6only.record(marker)["family"] == "ipv6"


def test_ipv6_only_unanswered_address_times_out(net: Net, v6only: Proxy) -> None:
    t = net.topo
    marker = new_marker()
    r = curl(t.client, f"http://dead6.test/1k?m={marker}", proxy=v6only.url)
    assert r.returncode == 0, r.stderr
    assert r.status == 504
    ps = r.proxy_status()
    assert ps.params["error"] == "connection_timeout"
    details = ps.params["details"]
    assert f"ipv6 [{t.blackhole_net_ip}]:80 timeout after" in details, details
    assert "no answer" in details
    # kushi waited for its connect timeout (2 s here), not for curl's or the kernel's.
    assert attempt_ms(details) >= SHORT_CONNECT * 1000 * 0.9
    assert r.elapsed < SHORT_CONNECT + 2, r.elapsed
    rec = v6only.record(marker)
    assert (rec["status"], rec["error"]) == (504, "connection_timeout")
    assert rec["details"] == details


# --- 5: Happy Eyeballs -----------------------------------------------------------------------


def test_happy_eyeballs_falls_back_to_ipv4_and_says_so(net: Net, prefer6: Proxy) -> None:
    t = net.topo
    marker = new_marker()
    r = curl(t.client, f"http://broken6.test/1k?m={marker}", proxy=prefer6.url)
    assert_ok(r)
    ps = r.proxy_status()
    assert ps.params["next-hop"] == f"{t.dual_v4}:80"
    details = ps.params["details"]
    # The winner's family first, then the attempt that lost: not a silent fallback.
    assert details.startswith("ipv4; "), details
    lost = f"ipv6 [{t.blackhole_net_ip}]:80 no answer after"
    assert lost in details, details

    seen = wait_marker(net.dual, marker)
    assert (seen["client"], seen["family"]) == (t.proxy_v4, "ipv4")

    rec = prefer6.record(marker)
    assert (rec["family"], rec["upstream"], rec["status"]) == ("ipv4", f"{t.dual_v4}:80", 200)
    assert len(rec["attempts"]) == 1 and rec["attempts"][0].startswith(lost), rec["attempts"]
    # The IPv6 attempt was given the 250 ms Connection Attempt Delay, not the 10 s connect
    # timeout: the IPv4 attempt started after the stagger and the answer came long before.
    waited = attempt_ms(rec["attempts"][0])
    assert ATTEMPT_DELAY_MS * 0.9 <= waited < prefer6.connect_timeout * 1000, waited
    assert r.elapsed < prefer6.connect_timeout, r.elapsed


# --- 6: IPv4 first and IPv4 only --------------------------------------------------------------


def test_prefer_ipv4_uses_ipv4_for_dual_stack_site(net: Net, prefer4: Proxy) -> None:
    t = net.topo
    marker = new_marker()
    r = curl(t.client, f"http://dual.test/1k?m={marker}", proxy=prefer4.url)
    assert_ok(r)
    ps = r.proxy_status()
    assert (ps.params["next-hop"], ps.params["details"]) == (f"{t.dual_v4}:80", "ipv4")
    seen = wait_marker(net.dual, marker)
    assert (seen["client"], seen["family"]) == (t.proxy_v4, "ipv4")
    rec = prefer4.record(marker)
    assert (rec["family"], rec["upstream"], rec["attempts"]) == ("ipv4", f"{t.dual_v4}:80", [])


def test_ipv4_only_refuses_ipv6_only_site(net: Net, v4only: Proxy) -> None:
    t = net.topo
    marker = new_marker()
    before = len(net.v6.requests())
    r = curl(t.client, f"http://v6.test/1k?m={marker}", proxy=v4only.url)
    assert r.returncode == 0, r.stderr
    assert r.status == 502
    ps = r.proxy_status()
    assert ps.params["error"] == "destination_not_found"
    assert "v6.test has no IPv4 address" in ps.params["details"], ps.params
    assert "v6.test has no IPv4 address" in r.body.decode()
    rec = v4only.record(marker)
    assert (rec["status"], rec["error"], rec["upstream"]) == (502, "destination_not_found", "")
    assert len(net.v6.requests()) == before

    # The same instance does reach IPv4 sites.
    marker = new_marker()
    r = curl(t.client, f"http://v4.test/1k?m={marker}", proxy=v4only.url)
    assert_ok(r)
    seen = wait_marker(net.v4, marker)
    assert (seen["client"], seen["family"]) == (t.proxy_v4, "ipv4")
    assert v4only.record(marker)["family"] == "ipv4"


# --- 7: the proxy is the only path ------------------------------------------------------------


def test_client_cannot_reach_origins_directly(net: Net, prefer6: Proxy) -> None:
    t = net.topo
    marker = new_marker()
    counts = [len(o.requests()) for o in net.origins]
    for ip in (t.v4origin_ip, t.dual_v4):
        # Routed to the proxy, which does not forward: dropped, so the connect hangs.
        with pytest.raises(OSError):
            t.client.connect(ip, 80, timeout=0.5).close()
    for ip in (t.v6origin_ip, t.dual_v6):
        # The client has no IPv6 address or route at all.
        with pytest.raises(OSError):
            t.client.connect(ip, 80, timeout=0.5).close()
    r = curl(t.client, "--connect-timeout", "1", f"http://{t.dual_v4}/1k?m={marker}")
    assert r.returncode != 0 and not r.heads, r
    r = curl(t.client, f"http://v6.test/1k?m={marker}")  # the name is unknown there, too
    assert r.returncode == 6 and not r.heads, r  # CURLE_COULDNT_RESOLVE_HOST
    assert [len(o.requests()) for o in net.origins] == counts
    # ... while the proxy's listener is reachable from the client.
    t.client.connect(t.proxy_client_ip, PORTS[prefer6.policy], timeout=2).close()


# --- 8: DNS failure ---------------------------------------------------------------------------


def test_dns_failure_is_reported(net: Net, prefer6: Proxy) -> None:
    """``nonexistent.test`` is not in the hosts file, so glibc asks the nameserver in the
    namespace's resolv.conf, 127.0.0.1, where nothing listens: the query is refused at once
    (ICMP port unreachable on loopback), getaddrinfo fails with EAI_AGAIN and kushi answers
    502 ``dns_error`` ("temporary failure") immediately -- not 504 ``dns_timeout``."""
    t = net.topo
    marker = new_marker()
    r = curl(t.client, f"http://nonexistent.test/1k?m={marker}", proxy=prefer6.url)
    assert r.returncode == 0, r.stderr
    assert r.status == 502
    ps = r.proxy_status()
    assert ps.params["error"] == "dns_error"
    assert "nonexistent.test" in ps.params["details"], ps.params
    assert "next-hop" not in ps.params
    assert "dns_error" in r.body.decode()
    rec = prefer6.record(marker)
    assert (rec["status"], rec["error"], rec["upstream"]) == (502, "dns_error", "")


def test_no_unexpected_errors_in_kushi(
    net: Net, prefer6: Proxy, v6only: Proxy, prefer4: Proxy, v4only: Proxy
) -> None:
    """Every instance is still running and logged no traceback."""
    for proxy in (prefer6, v6only, prefer4, v4only):
        assert proxy.kushi.proc.poll() is None, proxy.kushi.stderr[-2000:]
        assert "Traceback" not in proxy.kushi.stderr, proxy.kushi.stderr[-4000:]
