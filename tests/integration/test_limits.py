"""Every configured limit, answered correctly, with real sockets against a real kushi.

Covered elsewhere: a half-sent request head gets 408 and slowloris with 150 clients
(test_hardening.py), the upstream response-head timeout (504, test_hardening.py) and the
connect timeout (a connect that hangs needs a black hole: tests/e2e/test_forward_netns.py).

Here: the idle keep-alive timeout, a client that sends nothing at all, the CONNECT tunnel
idle timeout (a silent tunnel ends, a busy one keeps going), ``max_connections`` and
``max_connections_per_client`` (503 ``connection_limit_reached`` for the one over the
limit while the others keep working), and a normal client's latency while 300 slowloris
connections from another address are held open.

Clients connect from distinct loopback addresses (all of 127/8 is local) by binding the
client socket before ``connect``.
"""

from __future__ import annotations

import socket
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from support.kushi_proc import Kushi, free_port, write_toml
from support.origin import ONE_K, OriginProcess
from support.procstat import fd_count, settled_fd_count, wait_for
from support.rawhttp import Client
from support.tcpserver import ThreadedServer, read_head

pytestmark = pytest.mark.timeout(90)


# --- helpers -----------------------------------------------------------------------------------


def start_kushi(workdir: Path, **settings: Any) -> tuple[Kushi, int]:
    """kushi on 127.0.0.1 with a JSON access log, no admin listener, and ``settings``
    (``timeouts={...}``, ``limits={...}`` become tables)."""
    port = free_port()
    top: dict[str, Any] = {
        "listen": [f"127.0.0.1:{port}"],
        "access_log_format": "json",
        "admin_listen": [],
        **settings,
    }
    path = workdir / f"kushi-{port}.toml"
    write_toml(path, top)
    return Kushi(["serve", "--config", str(path)], workdir, [("127.0.0.1", port)]), port


class EchoServer(ThreadedServer):
    """A TCP echo server on 127.0.0.1 (a CONNECT target); one thread per connection."""

    def __init__(self) -> None:
        super().__init__("127.0.0.1")

    def serve(self, conn: socket.socket, number: int) -> None:
        try:
            while data := conn.recv(65536):
                conn.sendall(data)
            conn.shutdown(socket.SHUT_WR)
        except OSError:
            pass


class QuickOrigin(ThreadedServer):
    """A keep-alive origin on [::1] that answers every request head with one ``sendall`` of
    ``200 ok`` and sets TCP_NODELAY, so a latency figure measures kushi, not the origin."""

    RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n\r\nok"

    def __init__(self) -> None:
        super().__init__("::1", nodelay=True)

    def serve(self, conn: socket.socket, number: int) -> None:
        buf = b""
        try:
            while True:
                got = read_head(conn, buf)
                if got is None:
                    return
                buf = got[1]
                conn.sendall(self.RESPONSE)
        except OSError:
            pass


@pytest.fixture
def echo() -> Iterator[EchoServer]:
    server = EchoServer()
    yield server
    server.close()


@pytest.fixture
def origin(origin_factory: Callable[..., OriginProcess]) -> OriginProcess:
    return origin_factory(("[::1]:0",))


def open_tunnel(port: int, target_port: int) -> Client:
    client = Client(port)
    authority = f"127.0.0.1:{target_port}"
    client.sock.sendall(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
    status, _ = client.read_head()
    assert status == 200
    return client


# --- timeouts ----------------------------------------------------------------------------------


def test_idle_keep_alive_connection_is_closed_after_idle_timeout(
    tmp_path: Path, origin: OriginProcess
) -> None:
    kushi, port = start_kushi(tmp_path, timeouts={"idle": 1, "header_read": 30})
    try:
        with Client(port) as c:
            status, fields, body = c.get(origin.url("/1k"))
            assert status == 200 and body == ONE_K
            assert fields.get("connection") != "close"
            # Still a keep-alive connection: a second request on it is served.
            status, _, body = c.get(origin.url("/1k"))
            assert status == 200 and body == ONE_K
            start = time.monotonic()
            # Open for a while, then closed by the idle timer (1 s; header_read is 30 s).
            assert not c.closed_by_peer(0.3), "closed at once, not after the idle timeout"
            assert c.closed_by_peer(10), "idle keep-alive connection not closed"
            print(f"\nidle keep-alive connection closed after {time.monotonic() - start:.2f} s")
        records = kushi.wait_records(2)
        assert [r["status"] for r in records] == [200, 200]
    finally:
        kushi.stop()


def test_client_that_sends_nothing_is_closed_without_a_response(tmp_path: Path) -> None:
    kushi, port = start_kushi(tmp_path, timeouts={"header_read": 1, "idle": 30})
    try:
        with Client(port) as c:
            assert not c.closed_by_peer(0.3), "closed at once, not after header_read"
            assert c.closed_by_peer(10), "silent client not disconnected after header_read"
            # Nothing was sent to it, and nothing is logged: there was no request.
            assert c.buf == b""
        assert kushi.stop() == 0
        assert kushi.json_records() == []
    finally:
        kushi.stop()


def test_silent_tunnel_is_closed_after_tunnel_idle_while_a_busy_one_keeps_going(
    tmp_path: Path, echo: EchoServer
) -> None:
    kushi, port = start_kushi(
        tmp_path, connect_ports=[echo.port], timeouts={"tunnel_idle": 1, "idle": 30}
    )
    try:
        with open_tunnel(port, echo.port) as silent, open_tunnel(port, echo.port) as busy:
            start = time.monotonic()
            silent_closed_at: float | None = None
            pings = 0
            # Keep the busy tunnel talking every 0.2 s until 2 s after the silent one closed.
            while silent_closed_at is None or time.monotonic() < silent_closed_at + 2.0:
                assert time.monotonic() - start < 15, "silent tunnel never closed"
                message = b"ping %d\n" % pings
                busy.sock.sendall(message)
                assert busy.read_exact(len(message)) == message
                pings += 1
                if silent_closed_at is None and silent.closed_by_peer(0.2):
                    silent_closed_at = time.monotonic()
                elif silent_closed_at is not None:
                    time.sleep(0.2)
            assert not busy.closed_by_peer(0), "the busy tunnel was closed too"
            busy.sock.sendall(b"last\n")
            assert busy.read_exact(5) == b"last\n"
        records = kushi.wait_records(2)
        assert [r["status"] for r in records] == [200, 200]
    finally:
        kushi.stop()


# --- connection limits -------------------------------------------------------------------------


def test_max_connections(tmp_path: Path, origin: OriginProcess) -> None:
    kushi, port = start_kushi(
        tmp_path, limits={"max_connections": 20, "max_connections_per_client": 100}
    )
    url = origin.url("/1k")
    clients: list[Client] = []
    try:
        for _ in range(20):
            clients.append(Client(port))
            status, _, _ = clients[-1].get(url)  # served, so kushi holds it now
            assert status == 200
        with Client(port) as extra:
            status, fields, body = extra.get(url)
            assert status == 503
            assert "error=connection_limit_reached" in fields["proxy-status"]
            assert fields.get("connection") == "close"
            assert b"limit of 20 connections" in body
            assert extra.closed_by_peer(5)
        # The twenty keep working.
        for c in clients:
            status, _, body = c.get(url)
            assert status == 200 and body == ONE_K
        # One leaves: a new connection is admitted again (once kushi has seen it go).
        clients.pop().close()

        def admitted() -> bool:
            with Client(port) as again:
                return again.get(url)[0] == 200

        wait_for(admitted, 5, "a connection to be admitted after one closed")
        refused = [r for r in kushi.json_records() if r.get("error") == "connection_limit_reached"]
        assert refused and refused[0]["status"] == 503
    finally:
        for c in clients:
            c.close()
        kushi.stop()


def test_max_connections_per_client(tmp_path: Path, origin: OriginProcess) -> None:
    kushi, port = start_kushi(tmp_path, limits={"max_connections_per_client": 5})
    url = origin.url("/1k")
    clients: list[Client] = []
    try:
        for _ in range(5):
            clients.append(Client(port, "127.0.0.1"))
            assert clients[-1].get(url)[0] == 200
        with Client(port, "127.0.0.1") as sixth:
            status, fields, body = sixth.get(url)
            assert status == 503
            assert "error=connection_limit_reached" in fields["proxy-status"]
            assert b"client 127.0.0.1 has 5 connections open already" in body
        # Another client address is not affected.
        with Client(port, "127.0.0.2") as other:
            status, _, body = other.get(url)
            assert status == 200 and body == ONE_K
        for c in clients:
            assert c.get(url)[0] == 200
        records = kushi.wait_records(12)
        refused = [r for r in records if r.get("error") == "connection_limit_reached"]
        assert [r["client"] for r in refused] == ["127.0.0.1"]
        assert any(r["client"] == "127.0.0.2" and r["status"] == 200 for r in records)
    finally:
        for c in clients:
            c.close()
        kushi.stop()


def test_normal_client_is_served_while_300_slowloris_connections_are_held(
    tmp_path: Path,
) -> None:
    kushi, port = start_kushi(
        tmp_path,
        timeouts={"header_read": 60},
        limits={"max_connections_per_client": 1000},
    )
    quick = QuickOrigin()
    url = f"http://[::1]:{quick.port}/"
    slow: list[Client] = []

    def latencies(n: int) -> list[float]:
        out = []
        for _ in range(n):
            start = time.monotonic()
            with Client(port) as c:
                status, _, body = c.get(url, close=True)
            out.append(time.monotonic() - start)
            assert status == 200 and body == b"ok"
        return out

    try:
        latencies(3)  # the first requests pay for imports and the first upstream connect
        quiet = latencies(20)
        base = settled_fd_count(kushi.proc.pid)
        for i in range(300):
            c = Client(port, "127.0.0.3")
            slow.append(c)
            c.sock.sendall(b"GET http://[::1]:1/ HTTP/1.1\r\nHost: x\r\nX-Slow-%d: " % i)
        wait_for(
            lambda: fd_count(kushi.proc.pid) >= base + 300,
            10,
            "kushi to hold the 300 slow connections",
        )
        loaded = latencies(20)
        # Still held (no 408 yet: the header read timeout is 60 s).
        assert not any(c.closed_by_peer(0) for c in slow[:10])
        print(
            "\nnormal request latency, median/max: "
            f"{statistics.median(quiet) * 1000:.2f}/{max(quiet) * 1000:.2f} ms alone, "
            f"{statistics.median(loaded) * 1000:.2f}/{max(loaded) * 1000:.2f} ms "
            "with 300 slowloris connections held"
        )
        assert max(loaded) < 5.0
    finally:
        for c in slow:
            c.close()
        quick.close()
        kushi.stop()
