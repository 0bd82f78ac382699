"""An access log people can trust (issue 15): durations from the request's first byte,
timestamps at its end (Squid's), ``fallback:`` only where another address really followed.

Real kushi processes, a real origin (``support/origin.py``) and the raw client of
``support/rawhttp.py``; records read from kushi's stdout log.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from support import netns
from support.kushi_proc import Kushi, free_port
from support.origin import ONE_K, OriginProcess
from support.rawhttp import Raw

pytestmark = pytest.mark.timeout(60)

OriginFactory = Callable[..., OriginProcess]
KushiFactory = Callable[..., tuple[Kushi, int]]


@pytest.fixture
def kushi_factory(tmp_path: Path) -> Iterator[KushiFactory]:
    """``kushi_factory(*flags, fmt="json") -> (kushi, port)``: a forward proxy on 127.0.0.1."""
    started: list[Kushi] = []

    def start(*flags: str, fmt: str = "json") -> tuple[Kushi, int]:
        port = free_port()
        argv: Sequence[str] = ["serve", "--listen", f"127.0.0.1:{port}", "--access-log-format"]
        kushi = Kushi([*argv, fmt, *flags], tmp_path)
        started.append(kushi)
        kushi.wait_ready()
        return kushi, port

    yield start
    for kushi in started:
        assert kushi.stop() == 0, kushi.stderr[-2000:]


def squid_lines(kushi: Kushi, count: int, timeout: float = 5.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while True:
        lines = [line for line in kushi.log_lines() if line[:1].isdigit()]
        if len(lines) >= count or time.monotonic() > deadline:
            return lines
        time.sleep(0.02)


def test_keep_alive_idle_time_is_not_in_the_next_requests_duration(
    kushi_factory: KushiFactory, origin_factory: OriginFactory
) -> None:
    """Two requests on one connection with 1.5 s of silence between them: the second is
    logged with its own (short) duration, and its timestamp is when it ended, after the
    first's. (It was logged at ~1,500 ms, stamped when the idle wait began.)"""
    origin = origin_factory(["127.0.0.1:0"])
    kushi, port = kushi_factory()
    url = f"http://127.0.0.1:{origin.port}/1k"
    with Raw(port) as c:
        assert c.get(url + "?n=1")[2] == ONE_K
        time.sleep(1.5)
        sent = time.time()
        assert c.get(url + "?n=2")[2] == ONE_K
        done = time.time()
    first, second = kushi.wait_records(2)
    assert second["duration_ms"] < 500, second
    # The timestamp is the end of the request: after it was sent, not before the pause.
    assert sent - 0.05 <= second["time"] <= done + 0.05, (sent, second["time"], done)
    assert second["time"] - first["time"] >= 1.4


def _get(host: netns.Host, port: int, url: str) -> bytes:
    """One GET through the proxy on ``host``'s 127.0.0.1:``port``: the status line."""
    with host.connect("127.0.0.1", port) as sock:
        sock.sendall(f"GET {url} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return data.split(b"\r\n", 1)[0]


def test_fallback_is_written_only_when_another_address_followed(
    tmp_path: Path, origin_factory: OriginFactory
) -> None:
    """In a namespace whose hosts file gives ``dual.test`` ::1 and 127.0.0.1, with the
    origin on 127.0.0.1 only: under prefer-ipv6 the refused ::1 is followed by 127.0.0.1,
    ``fallback:``; under ipv6-only the refused ::1 is all there is, ``attempt:`` and never
    ``fallback:`` (it was "fallback:" before every failure)."""
    reason = netns.netns_available()
    if reason is not None:
        pytest.skip(f"network namespaces unavailable: {reason}")
    with netns.Topology() as topo:
        box = topo.add_host("box")
        box.hosts({"dual.test": ["::1", "127.0.0.1"]})
        origin = origin_factory(["127.0.0.1:0"], ns=box)
        p = origin.port
        lines = []
        for egress, status in (("prefer-ipv6", b"200"), ("ipv6-only", b"502")):
            port = free_port()
            kushi = Kushi(
                ["serve", "--listen", f"127.0.0.1:{port}", "--egress", egress],
                tmp_path,
                netns=box.ns,
            )
            try:
                kushi.wait_ready()
                assert status in _get(box, port, f"http://dual.test:{p}/1k")
                (line,) = squid_lines(kushi, 1)
                lines.append(line)
            finally:
                assert kushi.stop() == 0, kushi.stderr[-2000:]
    fell_back, single = lines
    refused = rf"ipv6 \[::1\]:{p} refused after \d+ ms \(connection refused\)"
    assert re.search(rf' ipv4 up=\d+ "fallback: {refused}"$', fell_back), fell_back
    assert "fallback" not in single, single
    assert re.search(rf' "error=connection_refused attempt: {refused}"$', single), single
