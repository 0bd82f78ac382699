"""A bounded soak: mixed load through one kushi, then its fds and memory must come back.

``make soak`` runs this for ``KUSHI_SOAK_SECONDS`` (default 60) seconds;
``tests/integration/test_soak_short.py`` runs the same thing for 8 seconds in ``make test``.

Sixteen client threads pick, at random, among: keep-alive small requests, requests with
``Connection: close``, 1 MiB downloads, chunked uploads, CONNECT tunnels to an echo server,
404s, a target that refuses connections (502 ``connection_refused``), malformed requests
(400), and clients that abort mid-download, mid-upload or mid-tunnel. Every answer is
checked; anything unexpected is a failure.

Measured on the kushi process: open fds (``/proc/PID/fd``) before any load, and RSS
(``VmRSS``) after a warm-up round of the same load. After the load stops, the origin and
the echo server are stopped (so the idle upstream connections kushi keeps pooled for reuse
are closed by their far end), a probe request to the origin's address lets the pool drop
them, and within 10 s the fd count must be back to its starting level (+-2) and RSS within
20 MiB of the warm-up level. kushi must then exit 0 with no traceback on stderr.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from support.kushi_proc import Kushi, free_port, write_toml
from support.origin import ONE_K, OriginProcess, pattern_bytes, pattern_chunks, pattern_sha256
from support.procstat import fd_count, rss_bytes, settled_fd_count
from support.tcpserver import ThreadedServer

SOAK_SECONDS = float(os.environ.get("KUSHI_SOAK_SECONDS", "60"))
WORKERS = 16
KiB, MiB = 1 << 10, 1 << 20
FD_SLACK = 2
RSS_SLACK = 20 * MiB


# --- measuring kushi ---------------------------------------------------------------------------


# --- the far ends --------------------------------------------------------------------------------


class EchoServer(ThreadedServer):
    """A TCP echo server on 127.0.0.1, the target of the CONNECT tunnels."""

    def __init__(self) -> None:
        super().__init__("127.0.0.1")

    def serve(self, conn: socket.socket, number: int) -> None:
        try:
            while data := conn.recv(256 * KiB):
                conn.sendall(data)
            conn.shutdown(socket.SHUT_WR)
        except OSError:
            pass


# --- one client's view -----------------------------------------------------------------------


class Unexpected(Exception):
    """An answer that is not what kushi should have sent."""


class Conn:
    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=20)
        self.buf = b""

    def __enter__(self) -> Conn:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def reset_on_close(self) -> None:
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00" * 2)

    def _fill(self) -> None:
        data = self.sock.recv(256 * KiB)
        if not data:
            raise Unexpected(f"connection closed early; buffered {self.buf[:120]!r}")
        self.buf += data

    def head(self) -> tuple[int, dict[str, str]]:
        while b"\r\n\r\n" not in self.buf:
            self._fill()
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        fields = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            fields[name.strip().lower()] = value.strip()
        return int(lines[0].split()[1]), fields

    def exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._fill()
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    def response(self) -> tuple[int, dict[str, str], bytes]:
        status, fields = self.head()
        return status, fields, self.exact(int(fields.get("content-length", "0")))

    def get(self, url: str, close: bool = False) -> tuple[int, dict[str, str], bytes]:
        extra = "Connection: close\r\n" if close else ""
        self.sock.sendall(f"GET {url} HTTP/1.1\r\nHost: x\r\n{extra}\r\n".encode())
        return self.response()

    def closed(self) -> bool:
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True


def expect(condition: bool, what: str) -> None:
    if not condition:
        raise Unexpected(what)


@dataclass
class Target:
    port: int
    origin: str  # http://[::1]:PORT
    echo_port: int
    refused_port: int


MALFORMED = [
    b"GARBAGE\r\n\r\n",
    b"GET http://[::1]:1/ HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
    b"GET http://[::1]:1/ HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
    b"Content-Length: 3\r\n\r\n",
    b"GET http://[::1]:1/ HTTP/1.1\r\nBad Header: x\r\n\r\n",
    b"GET http://[::1]:1/\x01 HTTP/1.1\r\nHost: x\r\n\r\n",
]
DOWNLOAD = MiB
DOWNLOAD_SHA = pattern_sha256(DOWNLOAD)
UPLOAD = 512 * KiB
UPLOAD_SHA = pattern_sha256(UPLOAD)


# Each scenario returns (requests made, expected error label or "").
def keepalive_small(t: Target, rng: random.Random) -> tuple[int, str]:
    with Conn(t.port) as c:
        for i in range(10):
            status, _, body = c.get(f"{t.origin}/1k?ka={i}")
            expect(status == 200 and body == ONE_K, f"keep-alive /1k: {status}")
    return 10, ""


def close_small(t: Target, rng: random.Random) -> tuple[int, str]:
    with Conn(t.port) as c:
        status, fields, body = c.get(f"{t.origin}/1k?close", close=True)
        expect(status == 200 and body == ONE_K, f"/1k close: {status}")
        expect(fields.get("connection") == "close" and c.closed(), "not closed after close")
    return 1, ""


def download(t: Target, rng: random.Random) -> tuple[int, str]:
    with Conn(t.port) as c:
        status, _, body = c.get(f"{t.origin}/bytes/{DOWNLOAD}")
        expect(status == 200, f"download: {status}")
        expect(hashlib.sha256(body).hexdigest() == DOWNLOAD_SHA, "download corrupted")
    return 1, ""


def chunked_upload(t: Target, rng: random.Random) -> tuple[int, str]:
    with Conn(t.port) as c:
        c.sock.sendall(
            f"POST {t.origin}/sha256 HTTP/1.1\r\nHost: x\r\n"
            "Transfer-Encoding: chunked\r\n\r\n".encode()
        )
        for piece in pattern_chunks(UPLOAD, 64 * KiB):
            c.sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
        c.sock.sendall(b"0\r\n\r\n")
        status, _, body = c.response()
        expect(status == 200, f"upload: {status}")
        expect(json.loads(body) == {"length": UPLOAD, "sha256": UPLOAD_SHA}, "upload corrupted")
    return 1, ""


def _connect(c: Conn, t: Target) -> None:
    authority = f"127.0.0.1:{t.echo_port}"
    c.sock.sendall(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
    status, _ = c.head()
    expect(status == 200, f"CONNECT: {status}")


def tunnel(t: Target, rng: random.Random) -> tuple[int, str]:
    with Conn(t.port) as c:
        _connect(c, t)
        for i in range(4):
            piece = pattern_bytes(64 * KiB + i)
            c.sock.sendall(piece)
            expect(c.exact(len(piece)) == piece, "tunnel echo corrupted")
        c.sock.shutdown(socket.SHUT_WR)
        expect(c.closed(), "tunnel not closed after both sides ended")
    return 1, ""


def not_found(t: Target, rng: random.Random) -> tuple[int, str]:
    with Conn(t.port) as c:
        status, _, _ = c.get(f"{t.origin}/no-such-page")
        expect(status == 404, f"404 expected, got {status}")
    return 1, "404"


def refused(t: Target, rng: random.Random) -> tuple[int, str]:
    with Conn(t.port) as c:
        status, fields, _ = c.get(f"http://127.0.0.1:{t.refused_port}/")
        expect(status == 502, f"502 expected, got {status}")
        expect("error=connection_refused" in fields.get("proxy-status", ""), str(fields))
    return 1, "502 connection_refused"


def malformed(t: Target, rng: random.Random) -> tuple[int, str]:
    with Conn(t.port) as c:
        c.sock.sendall(rng.choice(MALFORMED))
        status, _, _ = c.response()
        expect(status == 400, f"400 expected, got {status}")
        expect(c.closed(), "connection kept after a malformed request")
    return 1, "400"


def abort_download(t: Target, rng: random.Random) -> tuple[int, str]:
    with Conn(t.port) as c:
        c.sock.sendall(f"GET {t.origin}/bytes/{64 * MiB} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        status, _ = c.head()
        expect(status == 200, f"download: {status}")
        c.exact(256 * KiB)
        if rng.random() < 0.5:
            c.reset_on_close()
    return 1, "aborted"


def abort_upload(t: Target, rng: random.Random) -> tuple[int, str]:
    with Conn(t.port) as c:
        c.sock.sendall(
            f"POST {t.origin}/sha256 HTTP/1.1\r\nHost: x\r\n"
            f"Content-Length: {4 * MiB}\r\n\r\n".encode()
        )
        c.sock.sendall(pattern_bytes(MiB))
        if rng.random() < 0.5:
            c.reset_on_close()
    return 1, "aborted"


def abort_tunnel(t: Target, rng: random.Random) -> tuple[int, str]:
    with Conn(t.port) as c:
        _connect(c, t)
        c.sock.sendall(pattern_bytes(64 * KiB))
        if rng.random() < 0.5:
            c.reset_on_close()
    return 1, "aborted"


SCENARIOS: list[tuple[Callable[[Target, random.Random], tuple[int, str]], int]] = [
    (keepalive_small, 6),
    (close_small, 6),
    (download, 2),
    (chunked_upload, 2),
    (tunnel, 3),
    (not_found, 2),
    (refused, 2),
    (malformed, 2),
    (abort_download, 1),
    (abort_upload, 1),
    (abort_tunnel, 1),
]


@dataclass
class Tally:
    runs: Counter[str] = field(default_factory=Counter)
    requests: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def load(target: Target, seconds: float, tally: Tally, seed: int) -> None:
    """``WORKERS`` threads of mixed load for ``seconds``."""
    deadline = time.monotonic() + seconds
    funcs = [f for f, _ in SCENARIOS]
    weights = [w for _, w in SCENARIOS]

    def worker(index: int) -> None:
        rng = random.Random(seed * 100 + index)
        while time.monotonic() < deadline:
            func = rng.choices(funcs, weights)[0]
            try:
                requests, error = func(target, rng)
            except Exception as exc:  # any surprise is a failure, reported with the rest
                with tally.lock:
                    tally.failures.append(f"{func.__name__}: {type(exc).__name__}: {exc}")
                continue
            with tally.lock:
                tally.runs[func.__name__] += 1
                tally.requests += requests
                if error:
                    tally.errors[error] += 1

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(WORKERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


# --- the soak ----------------------------------------------------------------------------------


@dataclass
class SoakReport:
    seconds: float
    fds_start: int
    fds_warm: int
    fds_peak: int
    fds_loaded: int
    fds_end: int
    rss_start: int
    rss_warm: int
    rss_end: int
    tally: Tally
    kushi_errors: Counter[str]
    exit_code: int
    stderr: str

    def summary(self) -> str:
        t = self.tally
        lines = [
            f"soak: {self.seconds:g} s of mixed load, {WORKERS} client threads",
            f"  requests done: {t.requests} ({t.requests / self.seconds:.0f}/s); "
            f"scenario runs: {dict(sorted(t.runs.items()))}",
            f"  expected errors answered: {dict(t.errors)}; unexpected failures: {len(t.failures)}",
            f"  kushi access-log errors: {dict(self.kushi_errors)}",
            f"  open fds: start {self.fds_start}, after warm-up {self.fds_warm}, "
            f"peak sampled {self.fds_peak}, settled after the load {self.fds_loaded} "
            f"(idle pooled upstream connections included), end {self.fds_end}",
            f"  RSS: start {self.rss_start / MiB:.1f} MiB, after warm-up "
            f"{self.rss_warm / MiB:.1f} MiB, end {self.rss_end / MiB:.1f} MiB "
            f"({(self.rss_end - self.rss_warm) / MiB:+.1f} MiB)",
            f"  kushi exit code {self.exit_code}",
        ]
        return "\n".join(lines)

    def check(self) -> None:
        assert not self.tally.failures, self.tally.failures[:10]
        assert self.tally.requests > 0
        assert abs(self.fds_end - self.fds_start) <= FD_SLACK, self.summary()
        assert self.rss_end - self.rss_warm <= RSS_SLACK, self.summary()
        assert self.exit_code == 0, self.stderr[-3000:]
        for bad in ("Traceback", "exception was never retrieved", "Exception in callback"):
            assert bad not in self.stderr, self.stderr[-3000:]


def run_soak(
    workdir: Path,
    origin_factory: Callable[..., OriginProcess],
    seconds: float,
    warmup: float = 2.0,
) -> SoakReport:
    origin = origin_factory(("[::1]:0",), name="soak-origin")
    echo = EchoServer()
    port = free_port()
    config = workdir / "soak.toml"
    write_toml(
        config,
        {
            "listen": [f"127.0.0.1:{port}"],
            "access_log_format": "json",
            "admin_listen": [],
            "connect_ports": [echo.port],
            "limits": {"max_connections_per_client": 1000},
        },
    )
    kushi = Kushi(["serve", "--config", str(config)], workdir, [("127.0.0.1", port)])
    try:
        pid = kushi.proc.pid
        target = Target(port, origin.url("").rstrip("/"), echo.port, free_port())
        fds_start = settled_fd_count(pid)
        rss_start = rss_bytes(pid)

        warm = Tally()
        load(target, warmup, warm, seed=1)
        assert not warm.failures, warm.failures[:10]
        fds_warm = settled_fd_count(pid)
        rss_warm = rss_bytes(pid)

        tally = Tally()
        peak = [0]
        stop_sampling = threading.Event()

        def sample() -> None:
            while not stop_sampling.wait(0.2):
                peak[0] = max(peak[0], fd_count(pid))

        sampler = threading.Thread(target=sample)
        sampler.start()
        started = time.monotonic()
        try:
            load(target, seconds, tally, seed=2)
        finally:
            stop_sampling.set()
            sampler.join()
        elapsed = time.monotonic() - started

        fds_loaded = settled_fd_count(pid)
        # The far ends go away, so pooled idle upstream connections are closed by them; a
        # probe to the origin's address (refused now) makes the pool drop them at once.
        origin.stop()
        echo.close()
        deadline = time.monotonic() + 10
        while True:
            with Conn(port) as c:
                c.get(f"{target.origin}/probe", close=True)
            fds_end = settled_fd_count(pid)
            if abs(fds_end - fds_start) <= FD_SLACK or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        rss_end = rss_bytes(pid)
        kushi_errors = Counter(str(r["error"]) for r in kushi.json_records() if r.get("error"))
    finally:
        echo.close()
        exit_code = kushi.stop(timeout=30)
    return SoakReport(
        seconds=elapsed,
        fds_start=fds_start,
        fds_warm=fds_warm,
        fds_peak=peak[0],
        fds_loaded=fds_loaded,
        fds_end=fds_end,
        rss_start=rss_start,
        rss_warm=rss_warm,
        rss_end=rss_end,
        tally=tally,
        kushi_errors=kushi_errors,
        exit_code=exit_code,
        stderr=kushi.stderr,
    )


@pytest.mark.soak
@pytest.mark.timeout(SOAK_SECONDS + 180)
def test_soak(
    tmp_path: Path,
    origin_factory: Callable[..., OriginProcess],
    capsys: pytest.CaptureFixture[str],
) -> None:
    report = run_soak(tmp_path, origin_factory, SOAK_SECONDS)
    with capsys.disabled():
        print("\n" + report.summary())
    report.check()
