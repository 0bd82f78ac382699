"""kushi's Squid-format access log read by a real Squid log analyser (issue 15).

``calamaris`` (Debian's Squid log report generator) parses the log of a real kushi that
served a mix of requests: forwarded GETs, one to a closed port, a CONNECT tunnel and a
CONNECT kushi refuses. Its report must count every line as valid and each request under
Squid's own tags: TCP_MISS, TCP_TUNNEL, TCP_DENIED, HIER_DIRECT. kushi's extra fields
follow Squid's ten standard ones, where analysers ignore them.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from support.kushi_proc import Kushi, free_port
from support.origin import ONE_K, OriginProcess
from support.rawhttp import Raw

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(shutil.which("calamaris") is None, reason="calamaris is not installed"),
]


def test_calamaris_counts_every_request_of_a_kushi_log(
    tmp_path: Path, origin_factory: Callable[..., OriginProcess]
) -> None:
    origin = origin_factory(["[::1]:0"])
    closed = free_port("::1")
    port = free_port()
    log = tmp_path / "access.log"
    kushi = Kushi(
        ["serve", "--listen", f"127.0.0.1:{port}", "--access-log", str(log)]
        + ["--connect-ports", str(origin.port)],
        tmp_path,
    )
    try:
        kushi.wait_ready()
        for _ in range(3):
            with Raw(port) as c:
                assert c.get(origin.url("/1k"))[2] == ONE_K
        with Raw(port) as c:
            assert c.get(f"http://[::1]:{closed}/")[0] == 502
        with Raw(port) as c:
            assert c.connect(f"[::1]:{closed}")[0] == 403  # not in connect_ports
        with Raw(port) as c:
            assert c.connect(f"[::1]:{origin.port}")[0] == 200
            c.sock.sendall(b"GET /1k HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert c.rfile.read().endswith(ONE_K)
        deadline = time.monotonic() + 10
        while len(log.read_text().splitlines()) < 6:
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
    finally:
        assert kushi.stop() == 0, kushi.stderr[-2000:]
    text = log.read_text()
    tags = [line.split()[3] for line in text.splitlines()]
    assert tags == ["TCP_MISS/200"] * 3 + ["NONE_NONE/502", "TCP_DENIED/403", "TCP_TUNNEL/200"]
    assert re.search(r" HIER_DIRECT/::1 text/plain ipv6 up=\d+ -$", text, re.M), text

    report = subprocess.run(
        ["calamaris", "-a"], input=text, capture_output=True, text=True, timeout=30, check=True
    ).stdout

    def count(label: str) -> int:
        match = re.search(rf"^{re.escape(label)}\s+(?:\S+\s+)??(\d+)\s", report, re.M)
        assert match, f"{label!r} not in the calamaris report:\n{report}"
        return int(match.group(1))

    assert count("lines parsed:") == 6
    assert count("invalid lines:") == 0
    assert count("Total amount:") == 6
    assert count(" TCP_MISS") == 3
    assert count(" TCP_TUNNEL") == 1
    assert count(" TCP_DENIED") == 1
    assert count(" HIER_DIRECT") == 3
    assert count("GET") == 4
