"""Scale-out behind HAProxy: the shipped ``examples/haproxy.cfg``, run by the real
``haproxy`` binary, in front of two kushi reverse instances.

Topology (``netns_reverse_topology``)::

    v6client 2001:db8:2::2 --curl--> haproxy [2001:db8:2::1]:80 (proxy namespace)
        --PROXY v2--> kushi1 127.0.0.1:P1 \\
        --PROXY v2--> kushi2 127.0.0.1:P2  --> origin 203.0.113.4:8080 (IPv4 only)

The example's addresses are replaced (and each replacement must match exactly once, so the
test breaks loudly when the example changes shape); everything else in it runs as shipped.
"""

from __future__ import annotations

import shutil
import subprocess
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from support import netns
from support.kushi_proc import Kushi, write_toml
from support.netns import ReverseTopology
from support.origin import ONE_K, OriginProcess

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "haproxy.cfg"
CLIENT = "2001:db8:2::2"
PROXY = "2001:db8:2::1"
BACKEND = "203.0.113.4"
KUSHI_PORTS = (9081, 9082)  # in the proxy namespace, on its own loopback
HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed"),
    pytest.mark.skipif(
        not Path(HAPROXY).exists(), reason="haproxy is not installed (apt-get install haproxy)"
    ),
]


def replace_once(text: str, old: str, new: str) -> str:
    assert text.count(old) == 1, f"{EXAMPLE.name} should contain {old!r} exactly once"
    return text.replace(old, new)


def haproxy_config(frontend: str, kushi_ports: tuple[int, int]) -> str:
    """``examples/haproxy.cfg`` with the test's frontend address and kushi ports."""
    text = EXAMPLE.read_text()
    text = replace_once(text, "bind [2001:db8::80]:80 ", f"bind {frontend} ")
    text = replace_once(
        text, "server kushi1 127.0.0.1:8081 ", f"server kushi1 127.0.0.1:{kushi_ports[0]} "
    )
    # Health checks every 100 ms instead of 2 s, so that several happen during the test.
    assert text.count(" check inter 2s\n") == 2
    text = text.replace(" check inter 2s\n", " check inter 100ms\n")
    text = replace_once(
        text, "server kushi2 127.0.0.1:8082 ", f"server kushi2 127.0.0.1:{kushi_ports[1]} "
    )
    return text


@pytest.fixture
def kushi_instances(
    netns_reverse_topology: ReverseTopology, tmp_path: Path
) -> Iterator[list[tuple[Kushi, int]]]:
    """Two kushi reverse instances on 127.0.0.1 in the proxy namespace, taking PROXY headers
    from loopback only (as the example's comment says), JSON access logs on stdout."""
    topo = netns_reverse_topology
    instances: list[tuple[Kushi, int]] = []
    try:
        for i, port in enumerate(KUSHI_PORTS, 1):
            path = tmp_path / f"kushi{i}.toml"
            write_toml(
                path,
                {
                    "mode": "reverse",
                    "listen": [f"127.0.0.1:{port}"],
                    "backend": [f"http://{BACKEND}:8080"],
                    "proxy_protocol": True,
                    "proxy_protocol_from": ["127.0.0.1/32", "::1/128"],
                    "access_log_format": "json",
                },
            )
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ResourceWarning)
                kushi = Kushi(
                    ["serve", "--config", str(path)],
                    tmp_path,
                    netns=topo.proxy.ns,
                    loopback_destinations=False,
                )
            instances.append((kushi, port))
            kushi.wait_ready()
        yield instances
    finally:
        codes = [k.stop() for k, _ in instances]
    assert codes == [0, 0], [k.stderr[-2000:] for k, _ in instances]


def curl(topo: ReverseTopology, *args: str) -> subprocess.CompletedProcess[bytes]:
    argv = ["curl", "-sS", "--noproxy", "*", "--max-time", "20", *args]
    return netns.run(topo.v6client, argv, text=False, timeout=30)


def test_haproxy_example_spreads_clients_over_kushi_instances(
    netns_reverse_topology: ReverseTopology,
    kushi_instances: list[tuple[Kushi, int]],
    origin_factory: Callable[..., OriginProcess],
    tmp_path: Path,
) -> None:
    """HAProxy (``send-proxy-v2``) -> two kushi instances -> IPv4-only backend: the backend
    sees the IPv6 client's real address, kushi's access logs name it, and the requests are
    spread over both instances."""
    topo = netns_reverse_topology
    origin = origin_factory(f"{BACKEND}:8080", ns=topo.v4backend)
    (kushi1, port1), (kushi2, port2) = kushi_instances
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(haproxy_config(f"[{PROXY}]:80", (port1, port2)))
    check = netns.run(topo.proxy, [HAPROXY, "-c", "-f", str(cfg)], timeout=20)
    assert check.returncode == 0, check.stdout + check.stderr

    with open(tmp_path / "haproxy.out", "wb") as out:
        haproxy = netns.popen(
            topo.proxy, [HAPROXY, "-db", "-f", str(cfg)], stdout=out, stderr=subprocess.STDOUT
        )
        try:
            netns.wait_port(topo.v6client, PROXY, 80)
            n = 8
            for i in range(n):
                proc = curl(topo, "-i", f"http://[{PROXY}]/1k?n={i}")
                assert proc.returncode == 0, proc.stderr.decode()
                head, _, body = proc.stdout.partition(b"\r\n\r\n")
                assert head.startswith(b"HTTP/1.1 200 "), head
                assert body == ONE_K
                assert b"Proxy-Status: kushi;" in head  # answered through kushi
            reqs = origin.wait_requests(n)
            time.sleep(0.5)  # a few more health checks, for the no-errors check below
        finally:
            netns.stop_process(haproxy)
    haproxy_log = (tmp_path / "haproxy.out").read_text(errors="replace")

    assert len(reqs) == n
    for req in reqs:
        assert req["client"] == topo.proxy_v4 and req["family"] == "ipv4"
        xff = [v for k, v in req["headers"] if k.lower() == "x-forwarded-for"]
        assert xff == [CLIENT], req["headers"]
        fwd = [v for k, v in req["headers"] if k.lower() == "forwarded"]
        assert len(fwd) == 1 and f'for="[{CLIENT}]"' in fwd[0], fwd

    counts = []
    for kushi in (kushi1, kushi2):
        recs: list[dict[str, Any]] = kushi.json_records()
        served = [r for r in recs if r["method"] == "GET" and r["target"].startswith("/1k?n=")]
        assert all(r["client"] == CLIENT and r["status"] == 200 for r in served), served
        counts.append(len(served))
    print(f"haproxy -> kushi instances: {counts[0]} + {counts[1]} of {n} requests")
    assert sum(counts) == n and min(counts) > 0, (counts, haproxy_log)
    # HAProxy's health checks (a PROXY v2 LOCAL header, then a reset) are no errors.
    for kushi in (kushi1, kushi2):
        assert [r for r in kushi.json_records() if r["error"]] == [], kushi.stdout
        assert "closing connection" not in kushi.stderr, kushi.stderr
