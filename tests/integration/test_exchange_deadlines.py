"""Deadlines by phase, framing checked before forwarding, and reloads as one snapshot, through
real sockets against a real kushi (issue 13's faults, each one failing on the old code):

- an upload paced over longer than ``timeouts.upstream_header`` gets the origin's answer
  (the response-head deadline starts when the request body is complete);
- an origin that stalls in the middle of a response body is cut after
  ``timeouts.response_body_idle``, logged ``connection_read_timeout`` naming the deadline,
  and its connection is not reused;
- a client that stalls in the middle of its upload gets 408 after
  ``timeouts.request_body_idle``, and the origin's connection is closed (no partial body
  is completed);
- a chunked request whose first chunk-size line is already invalid when the head is read
  is answered 400 and never reaches the origin;
- a SIGHUP during a slow download keeps that request's access-log line in the log file it
  started with; the next request on the same kept-alive connection uses the new limits.
"""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from support.kushi_proc import Kushi, free_port, write_toml
from support.origin import OriginProcess
from support.raw_origin import RawOrigin
from support.rawhttp import Client
from support.tcpserver import ThreadedServer, read_head

pytestmark = pytest.mark.timeout(60)


def start_kushi(workdir: Path, **settings: Any) -> tuple[Kushi, int, Path]:
    port = free_port()
    top: dict[str, Any] = {
        "listen": [f"127.0.0.1:{port}"],
        "access_log_format": "json",
        "admin_listen": [],
        **settings,
    }
    path = workdir / f"kushi-{port}.toml"
    write_toml(path, top)
    kushi = Kushi(["serve", "--config", str(path)], workdir, [("127.0.0.1", port)])
    return kushi, port, path


class StallOrigin(ThreadedServer):
    """``/stall``: Content-Length 100000, 1000 bytes of it, then silence (the connection
    stays open). ``/slow``: Content-Length 20, one byte every 0.1 s. ``/ok``: ``200 ok``."""

    def __init__(self) -> None:
        self.closed_by_peer = threading.Event()
        super().__init__("::1", nodelay=True)

    def serve(self, conn: socket.socket, number: int) -> None:
        buf = b""
        try:
            while True:
                got = read_head(conn, buf)
                if got is None:
                    return
                head, buf = got
                path = head.split(b" ", 2)[1]
                if path == b"/stall":
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"x" * 1000)
                    conn.settimeout(30)
                    if conn.recv(1) == b"":
                        self.closed_by_peer.set()
                    return
                if path == b"/slow":
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 20\r\n\r\n")
                    for _ in range(20):
                        time.sleep(0.1)
                        conn.sendall(b"s")
                    continue
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        except OSError:
            pass


@pytest.fixture
def stall_origin() -> Iterator[StallOrigin]:
    server = StallOrigin()
    yield server
    server.close()


def test_slow_upload_longer_than_upstream_header_gets_the_origins_answer(
    tmp_path: Path, origin_factory: Any
) -> None:
    origin: OriginProcess = origin_factory(("[::1]:0",))
    kushi, port, _ = start_kushi(tmp_path, timeouts={"upstream_header": 1})
    try:
        with Client(port, timeout=20) as client:
            pieces = [b"%05d" % i * 200 for i in range(6)]  # 6 KB in 1 KB pieces
            total = sum(len(p) for p in pieces)
            client.sock.sendall(
                f"POST {origin.url('/sha256')} HTTP/1.1\r\nHost: x\r\n"
                f"Content-Length: {total}\r\n\r\n".encode()
            )
            began = time.monotonic()
            for piece in pieces:
                client.sock.sendall(piece)
                time.sleep(0.5)  # 3 s of upload against a 1 s upstream_header
            status, fields = client.read_head()
            body = json.loads(client.read_body(int(fields["content-length"])))
        assert time.monotonic() - began > 2.5
        assert status == 200, fields
        assert body["length"] == total
    finally:
        kushi.stop()


def test_origin_stalled_mid_body_is_cut_after_response_body_idle(
    tmp_path: Path, stall_origin: StallOrigin
) -> None:
    kushi, port, _ = start_kushi(tmp_path, timeouts={"response_body_idle": 1})
    try:
        with Client(port, timeout=20) as client:
            url = f"http://[::1]:{stall_origin.port}/stall"
            client.sock.sendall(f"GET {url} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            status, fields = client.read_head()
            assert status == 200 and fields["content-length"] == "100000"
            began = time.monotonic()
            got = client.read_body(100000)  # short: ends when kushi closes (or 20 s)
            waited = time.monotonic() - began
        assert len(got) == 1000, "kushi kept a stalled body open or passed on more"
        assert waited < 5, waited
        # The upstream connection was closed too, not kept or pooled.
        assert stall_origin.closed_by_peer.wait(5)
        (record,) = kushi.wait_records(1)
        assert record["error"] == "connection_read_timeout"
        assert "timeouts.response_body_idle" in record["details"]
        assert record["bytes_out"] < 100000
    finally:
        kushi.stop()


def test_client_stalled_mid_upload_gets_408_after_request_body_idle(tmp_path: Path) -> None:
    with RawOrigin() as origin:
        kushi, port, _ = start_kushi(
            tmp_path, timeouts={"request_body_idle": 1, "upstream_header": 30}
        )
        try:
            with Client(port, timeout=20) as client:
                client.sock.sendall(
                    f"POST http://{origin.authority}/up HTTP/1.1\r\nHost: x\r\n"
                    "Content-Length: 1000\r\n\r\n".encode()
                    + b"a" * 100
                )
                began = time.monotonic()
                status, fields = client.read_head()
                waited = time.monotonic() - began
                assert status == 408, fields
                assert client.closed_by_peer(timeout=5)
            assert 0.8 < waited < 5, waited
            conns = origin.since(0)
            origin.wait_closed(conns, timeout=5)
            assert all(c.closed.is_set() for c in conns)
            assert all(not c.answered for c in conns)  # the partial body never completed
            (record,) = kushi.wait_records(1)
            assert record["status"] == 408
            assert "timeouts.request_body_idle" in record["details"]
        finally:
            kushi.stop()


def test_bad_first_chunk_never_reaches_the_origin(tmp_path: Path) -> None:
    with RawOrigin() as origin:
        kushi, port, _ = start_kushi(tmp_path)
        try:
            with Client(port, timeout=10) as client:
                # Head and an invalid chunk-size line in one segment.
                client.sock.sendall(
                    f"POST http://{origin.authority}/c HTTP/1.1\r\nHost: x\r\n"
                    "Transfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n".encode()
                )
                status, _ = client.read_head()
            assert status == 400
            (record,) = kushi.wait_records(1)
            assert record["error"] == "http_request_error"
            time.sleep(0.2)
            assert origin.count() == 0, "the origin saw a request kushi refused"
        finally:
            kushi.stop()


def test_reload_during_slow_download_keeps_its_log_line_and_applies_new_limits_next(
    tmp_path: Path, stall_origin: StallOrigin
) -> None:
    old_log = tmp_path / "old.log"
    new_log = tmp_path / "new.log"
    kushi, port, path = start_kushi(tmp_path, access_log=str(old_log))
    try:
        with Client(port, timeout=20) as client:
            url = f"http://[::1]:{stall_origin.port}/slow"
            client.sock.sendall(f"GET {url} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            status, fields = client.read_head()
            assert status == 200
            # Reload mid-download: a new log file and a much smaller head limit.
            write_toml(
                path,
                {
                    "listen": [f"127.0.0.1:{port}"],
                    "access_log_format": "json",
                    "access_log": str(new_log),
                    "admin_listen": [],
                    "limits": {"max_header_bytes": 200},
                },
            )
            kushi.signal(signal.SIGHUP)
            deadline = time.monotonic() + 5
            while "config reloaded" not in kushi.stderr and time.monotonic() < deadline:
                time.sleep(0.05)
            assert "config reloaded" in kushi.stderr
            assert client.read_body(20) == b"s" * 20
            # The next request on this kept-alive connection: the new limit applies.
            big = "X-Pad: " + "p" * 400
            ok = f"http://[::1]:{stall_origin.port}/ok"
            client.sock.sendall(f"GET {ok} HTTP/1.1\r\nHost: x\r\n{big}\r\n\r\n".encode())
            status, _ = client.read_head()
            assert status == 431
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not (
            old_log.exists() and new_log.exists() and new_log.read_text().strip()
        ):
            time.sleep(0.05)
        old = [json.loads(line) for line in old_log.read_text().splitlines() if line]
        new = [json.loads(line) for line in new_log.read_text().splitlines() if line]
        assert [r["target"].rsplit("/", 1)[1] for r in old] == ["slow"]
        assert old[0]["status"] == 200 and old[0]["bytes_out"] > 20
        assert [r["status"] for r in new] == [431]
        assert "Traceback" not in kushi.stderr
    finally:
        kushi.stop()
