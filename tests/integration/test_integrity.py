"""Nothing lost: hundreds of MiB through kushi at once, every byte checked at both ends.

- 8 clients download 32 MiB each (``/bytes/N``, Content-Length) while 8 more upload 32 MiB
  each with chunked encoding (``/sha256``), and 4 CONNECT tunnels carry 32 MiB each way at
  the same time to an echo server: 768 MiB through kushi. A download is checked against the
  pattern's SHA-256, an upload against the origin's own count and hash, a tunnel against
  what the echo server received and what came back.
- A graceful restart: SIGTERM while four 64 MiB downloads are in flight (their clients
  reading slowly, so the transfers are surely mid-way); a new kushi takes the port at once
  and serves, every old transfer completes intact, and the old kushi exits 0.
"""

from __future__ import annotations

import hashlib
import json
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from support.kushi_proc import Kushi, free_port, write_toml
from support.origin import OriginProcess, pattern_chunks, pattern_sha256
from support.tcpserver import ThreadedServer

pytestmark = [pytest.mark.timeout(90), pytest.mark.slow]

MiB = 1 << 20


def kushi_config(path: Path, port: int, connect_port: int | None = None) -> None:
    write_toml(
        path,
        {
            "listen": [f"127.0.0.1:{port}"],
            "access_log_format": "json",
            "admin_listen": [],
            "connect_ports": [connect_port or 443],
        },
    )


class HashingEcho(ThreadedServer):
    """A TCP echo server on 127.0.0.1 that hashes what it receives on each connection and
    half-closes after the client did."""

    def __init__(self) -> None:
        self.received: list[tuple[int, str]] = []  # (length, sha256) per finished connection
        self.lock = threading.Lock()
        super().__init__("127.0.0.1")

    def serve(self, conn: socket.socket, number: int) -> None:
        digest, length = hashlib.sha256(), 0
        buf = bytearray(MiB)
        view = memoryview(buf)
        try:
            while n := conn.recv_into(buf):
                digest.update(view[:n])
                length += n
                conn.sendall(view[:n])
            conn.shutdown(socket.SHUT_WR)
        except OSError:
            return
        with self.lock:
            self.received.append((length, digest.hexdigest()))


@pytest.fixture
def echo() -> Iterator[HashingEcho]:
    server = HashingEcho()
    yield server
    server.close()


@pytest.fixture
def origin(origin_factory: Callable[..., OriginProcess]) -> OriginProcess:
    return origin_factory(("[::1]:0",))


# --- clients -----------------------------------------------------------------------------------


def read_head(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """Status, header fields and the body bytes that came with the head."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        data = sock.recv(65536)
        assert data, f"connection closed inside the head: {buf[:200]!r}"
        buf += data
    head, _, rest = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    fields = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        fields[name.strip().lower()] = value.strip()
    return int(lines[0].split()[1]), fields, rest


def read_to_eof(sock: socket.socket, digest: Any, first: bytes = b"") -> int:
    digest.update(first)
    length = len(first)
    buf = bytearray(MiB)
    view = memoryview(buf)
    while n := sock.recv_into(buf):
        digest.update(view[:n])
        length += n
    return length


def download(
    port: int, url: str, pace: Callable[[int], None] | None = None
) -> tuple[int, int, str]:
    """GET ``url`` through kushi (Connection: close): (status, body length, body sha256).
    ``pace(received)`` is called after every read (to read slowly)."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        s.sendall(f"GET {url} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        status, fields, first = read_head(s)
        expected = int(fields["content-length"])
        digest = hashlib.sha256(first)
        length = len(first)
        buf = bytearray(MiB)
        view = memoryview(buf)
        while length < expected:
            if pace is not None:
                pace(length)
            n = s.recv_into(buf, min(MiB, expected - length) if pace is None else 64 * 1024)
            if not n:
                break
            digest.update(view[:n])
            length += n
        return status, length, digest.hexdigest()


def chunked_upload(port: int, url: str, n: int) -> tuple[int, dict[str, Any]]:
    """POST ``n`` pattern bytes with chunked encoding (256 KiB chunks) through kushi."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        s.sendall(
            f"POST {url} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
            "Content-Type: application/octet-stream\r\nConnection: close\r\n\r\n".encode()
        )
        for piece in pattern_chunks(n, 256 * 1024):
            s.sendall(b"%x\r\n" % len(piece))
            s.sendall(piece)
            s.sendall(b"\r\n")
        s.sendall(b"0\r\n\r\n")
        status, fields, body = read_head(s)
        length = int(fields["content-length"])
        while len(body) < length:
            data = s.recv(65536)
            assert data
            body += data
        return status, json.loads(body)


def tunnel_round_trip(port: int, target_port: int, n: int) -> tuple[int, str]:
    """CONNECT to the echo server, send ``n`` pattern bytes while reading the echo, half-close,
    read to the end: (bytes received back, their sha256)."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        authority = f"127.0.0.1:{target_port}"
        s.sendall(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
        status, _, first = read_head(s)
        assert status == 200

        def send() -> None:
            for piece in pattern_chunks(n, 256 * 1024):
                s.sendall(piece)
            s.shutdown(socket.SHUT_WR)

        sender = threading.Thread(target=send)
        sender.start()
        digest = hashlib.sha256()
        try:
            length = read_to_eof(s, digest, first)
        finally:
            sender.join()
        return length, digest.hexdigest()


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


# --- the tests ---------------------------------------------------------------------------------


def test_768_mib_of_concurrent_downloads_chunked_uploads_and_tunnels_arrive_intact(
    tmp_path: Path, origin: OriginProcess, echo: HashingEcho
) -> None:
    port = free_port()
    kushi_config(tmp_path / "kushi.toml", port, echo.port)
    kushi = Kushi(
        ["serve", "--config", str(tmp_path / "kushi.toml")], tmp_path, [("127.0.0.1", port)]
    )
    n = 32 * MiB
    want = pattern_sha256(n)
    try:
        start = time.monotonic()
        with ThreadPoolExecutor(20) as pool:
            downloads = [
                pool.submit(download, port, origin.url(f"/bytes/{n}?client={i}")) for i in range(8)
            ]
            uploads = [
                pool.submit(chunked_upload, port, origin.url(f"/sha256?client={i}"), n)
                for i in range(8)
            ]
            tunnels = [pool.submit(tunnel_round_trip, port, echo.port, n) for _ in range(4)]
            got_downloads = [f.result() for f in downloads]
            got_uploads = [f.result() for f in uploads]
            got_tunnels = [f.result() for f in tunnels]
        elapsed = time.monotonic() - start
        assert got_downloads == [(200, n, want)] * 8
        assert got_uploads == [(200, {"length": n, "sha256": want})] * 8
        assert got_tunnels == [(n, want)] * 4  # what came back ...
        assert sorted(echo.received) == [(n, want)] * 4  # ... and what the far end received
        records = kushi.wait_records(20)
        assert len(records) == 20 and all(not r.get("error") for r in records), records
        assert all(r["status"] == 200 for r in records)
        total = (8 + 8 + 4 * 2) * n
        print(
            f"\n{total // MiB} MiB through kushi in {elapsed:.1f} s "
            f"({total / MiB / elapsed:.0f} MiB/s), all SHA-256 equal"
        )
    finally:
        kushi.stop()
    assert kushi.proc.returncode == 0


def test_graceful_restart_with_transfers_in_flight(tmp_path: Path, origin: OriginProcess) -> None:
    port = free_port()
    kushi_config(tmp_path / "kushi.toml", port)
    old = Kushi(
        ["serve", "--config", str(tmp_path / "kushi.toml")], tmp_path, [("127.0.0.1", port)]
    )
    new: Kushi | None = None
    n = 64 * MiB
    fast = threading.Event()
    progress = [0] * 4

    def pace(index: int) -> Callable[[int], None]:
        def slow_until_released(received: int) -> None:
            progress[index] = received
            if not fast.is_set():
                time.sleep(0.02)  # about 3 MiB/s until the restart is done

        return slow_until_released

    try:
        with ThreadPoolExecutor(4) as pool:
            transfers = [
                pool.submit(download, port, origin.url(f"/bytes/{n}?restart={i}"), pace(i))
                for i in range(4)
            ]
            deadline = time.monotonic() + 10
            while min(progress) < MiB:
                assert time.monotonic() < deadline, f"transfers did not start: {progress}"
                assert not any(f.done() for f in transfers), [f.result() for f in transfers]
                time.sleep(0.02)
            old.signal(signal.SIGTERM)
            # The old kushi stops listening; a new one takes the same port and serves.
            deadline = time.monotonic() + 10
            while not refused(port):
                assert time.monotonic() < deadline, "the old kushi kept listening"
                time.sleep(0.02)
            new = Kushi(
                ["serve", "--config", str(tmp_path / "kushi.toml")],
                tmp_path,
                [("127.0.0.1", port)],
            )
            assert old.proc.poll() is None, "the old kushi quit with transfers in flight"
            assert all(p < n for p in progress), progress
            assert download(port, origin.url("/bytes/1000?via-new"))[:2] == (200, 1000)
            fast.set()
            results = [f.result() for f in transfers]
        assert results == [(200, n, pattern_sha256(n))] * 4
        assert old.proc.wait(20) == 0
        assert "Traceback" not in old.stderr
        records = old.wait_records(4)
        assert sorted(r["target"] for r in records) == sorted(
            origin.url(f"/bytes/{n}?restart={i}") for i in range(4)
        )
        assert all(r["status"] == 200 and not r.get("error") for r in records), records
    finally:
        fast.set()
        old.stop()
        if new is not None:
            new.stop()
