"""Bulk tunnels through kushi, both ways at once, by splice(2) and by copying.

One kushi with ``splice = true`` and one with ``splice = false``, each with a forward
listener (CONNECT and SOCKS5 on one port) and a tcp-mode listener, relay to an in-process
server on ``[::1]`` that checks what arrives (length and sha256) and sends its own payload
back. Every test runs against both processes: the bytes, the half-close in each
direction, the idle timeout, resets and the byte counts of the access record must be the
same whichever way the kernel moved them; the record's ``spliced`` field and the
``kushi_tunnel_splice_total`` counter say which way it was.
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import struct
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from support import socksclient
from support.kushi_proc import Kushi, free_port, write_toml
from support.procstat import settled_fd_count
from support.tcpserver import ThreadedServer

pytestmark = pytest.mark.timeout(120)

MIB = 1024 * 1024
SIZE = 64 * MIB
IDLE = 2.0
#: The request header the bulk server reads first: a tag, the lengths each way, an order.
HEADER = struct.Struct("!16sQQB")
CONCURRENT, CLIENT_CLOSES_FIRST, SERVER_CLOSES_FIRST, SERVER_RESETS = range(4)


@dataclass
class Seen:
    length: int = 0
    sha256: str = ""
    done: threading.Event = field(default_factory=threading.Event)


class BulkServer(ThreadedServer):
    """Reads HEADER, then sends ``down`` bytes of its payload and reads until EOF, in the
    order asked for; records what it read under the client's tag."""

    def __init__(self, payload: bytes) -> None:
        super().__init__("::1")
        self.payload = payload
        self.seen: dict[bytes, Seen] = {}

    def serve(self, conn: socket.socket, number: int) -> None:
        head = socksclient.recv_exact(conn, HEADER.size)
        if len(head) < HEADER.size:
            return
        tag, _up, down, order = HEADER.unpack(head)
        seen = self.seen.setdefault(tag, Seen())

        def send() -> None:
            try:
                view = memoryview(self.payload)[:down]
                for i in range(0, down, MIB):
                    conn.sendall(view[i : i + MIB])
                if order == SERVER_RESETS:
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    conn.close()
                else:
                    conn.shutdown(socket.SHUT_WR)
            except OSError:
                pass

        def receive() -> None:
            digest = hashlib.sha256()
            try:
                while chunk := conn.recv(MIB):
                    digest.update(chunk)
                    seen.length += len(chunk)
            except OSError:
                pass
            seen.sha256 = digest.hexdigest()

        try:
            if order == SERVER_RESETS:
                send()
            elif order == CLIENT_CLOSES_FIRST:
                receive()
                send()
            elif order == SERVER_CLOSES_FIRST:
                send()
                receive()
            else:
                sender = threading.Thread(target=send, daemon=True)
                sender.start()
                receive()
                sender.join()
        finally:
            seen.done.set()


@dataclass
class Proxy:
    kushi: Kushi
    port: int  # forward listener: CONNECT and SOCKS5
    tcp_port: int  # tcp-mode listener to the bulk server
    admin: int
    splice: bool

    def mark(self) -> int:
        """How many records there are now (the tests of a module run one at a time)."""
        return len(self.kushi.json_records())

    def new_record(self, mark: int, timeout: float = 10.0) -> dict[str, Any]:
        """The one record written since ``mark``."""
        deadline = time.monotonic() + timeout
        while len(records := self.kushi.json_records()) <= mark:
            assert time.monotonic() < deadline, f"no record: {self.kushi.stderr[-1000:]}"
            time.sleep(0.02)
        time.sleep(0.05)
        records = self.kushi.json_records()
        assert len(records) == mark + 1, records[mark:]
        return records[mark]

    def spliced_total(self) -> float:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin}/metrics", timeout=10) as r:
            text = r.read().decode()
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("kushi_tunnel_splice_total{")
        )


@dataclass
class Setup:
    server: BulkServer
    up: bytes  # what clients upload
    up_sha256: str
    down_sha256: str
    proxies: dict[bool, Proxy]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    workdir = tmp_path_factory.mktemp("bulk")
    down = os.urandom(SIZE)
    up = os.urandom(SIZE)
    server = BulkServer(down)
    proxies: dict[bool, Proxy] = {}
    try:
        for splice in (True, False):
            port, tcp_port, admin = free_port(), free_port(), free_port()
            path = workdir / f"splice-{splice}.toml"
            common = {"access_log_format": "json"}
            write_toml(
                path,
                {
                    "splice": splice,
                    "admin_listen": [f"127.0.0.1:{admin}"],
                    "timeouts": {"tunnel_idle": IDLE},
                },
                [
                    {
                        "name": "forward",
                        "mode": "forward",
                        "listen": [f"127.0.0.1:{port}"],
                        "connect_ports": [server.port],
                        "allow_destinations": ["::1/128"],
                        **common,
                    },
                    {
                        "name": "tcp",
                        "mode": "tcp",
                        "listen": [f"127.0.0.1:{tcp_port}"],
                        "backend": [f"[::1]:{server.port}"],
                        **common,
                    },
                ],
            )
            kushi = Kushi(["serve", "--config", str(path)], workdir, loopback_destinations=False)
            proxies[splice] = Proxy(kushi, port, tcp_port, admin, splice)
            kushi.wait_ready()
        yield Setup(
            server,
            up,
            hashlib.sha256(up).hexdigest(),
            hashlib.sha256(down).hexdigest(),
            proxies,
        )
        for proxy in proxies.values():
            assert proxy.kushi.stop() == 0, proxy.kushi.stderr[-2000:]
    finally:
        for proxy in proxies.values():
            proxy.kushi.stop()
        server.close()


# --- a client that counts every byte -------------------------------------------------------


@dataclass
class Client:
    sock: socket.socket
    sent: int = 0
    received: int = 0

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)
        self.sent += len(data)

    def recv_exact(self, n: int) -> bytes:
        data = socksclient.recv_exact(self.sock, n)
        self.received += len(data)
        return data


def open_tunnel(proxy: Proxy, how: str, server: BulkServer) -> Client:
    if how == "tcp":
        return Client(socket.create_connection(("127.0.0.1", proxy.tcp_port), timeout=30))
    c = Client(socket.create_connection(("127.0.0.1", proxy.port), timeout=30))
    if how == "connect":
        c.send(
            f"CONNECT [::1]:{server.port} HTTP/1.1\r\nHost: [::1]:{server.port}\r\n\r\n".encode()
        )
        head = b""
        while not head.endswith(b"\r\n\r\n"):
            head += c.recv_exact(1)
        assert head.startswith(b"HTTP/1.1 200 "), head
    else:
        c.send(b"\x05\x01\x00")
        assert c.recv_exact(2) == b"\x05\x00"
        c.send(b"\x05\x01\x00" + socksclient.address("::1", server.port))
        reply = c.recv_exact(4)
        assert reply[:2] == b"\x05\x00", reply
        c.recv_exact({1: 4, 4: 16}[reply[3]] + 2)
    return c


def transfer(c: Client, tag: bytes, up: bytes, down: int, order: int) -> tuple[int, str]:
    """Send the header and ``up``, read to EOF; returns (bytes read, their sha256)."""
    c.send(HEADER.pack(tag, len(up), down, order))
    got = hashlib.sha256()
    length = 0

    def upload() -> None:
        view = memoryview(up)
        for i in range(0, len(up), MIB):
            c.send(view[i : i + MIB])
        c.sock.shutdown(socket.SHUT_WR)

    def download() -> None:
        nonlocal length
        while chunk := c.sock.recv(MIB):
            got.update(chunk)
            length += len(chunk)
        c.received += length

    if order == CLIENT_CLOSES_FIRST:
        upload()
        download()
    elif order == SERVER_CLOSES_FIRST:
        download()
        upload()
    else:
        uploader = threading.Thread(target=upload, daemon=True)
        uploader.start()
        download()
        uploader.join()
    return length, got.hexdigest()


def eof_or_reset(sock: socket.socket) -> str:
    """Read to the end: "eof" or "reset"."""
    try:
        while sock.recv(MIB):
            pass
    except ConnectionResetError:
        return "reset"
    return "eof"


# --- tests -----------------------------------------------------------------------------------

BOTH_WAYS = pytest.mark.parametrize("splice", [True, False], ids=["splice", "copy"])


@BOTH_WAYS
@pytest.mark.parametrize("how", ["connect", "socks5", "tcp"])
def test_64_mib_each_way_at_once_arrive_intact_and_are_counted(
    setup: Setup, splice: bool, how: str
) -> None:
    proxy = setup.proxies[splice]
    mark, spliced_before = proxy.mark(), proxy.spliced_total()
    c = open_tunnel(proxy, how, setup.server)
    tag = uuid.uuid4().bytes
    length, sha256 = transfer(c, tag, setup.up, SIZE, CONCURRENT)
    c.sock.close()
    assert (length, sha256) == (SIZE, setup.down_sha256)
    seen = setup.server.seen[tag]
    assert seen.done.wait(10)
    assert (seen.length, seen.sha256) == (SIZE, setup.up_sha256)
    rec = proxy.new_record(mark)
    # Every byte the client sent (its CONNECT or SOCKS5 handshake included) and every byte
    # it received (the 200 or the SOCKS5 replies included), exactly.
    assert (rec["bytes_in"], rec["bytes_out"]) == (c.sent, c.received)
    assert rec["status"] == 200 and rec["error"] == "" and rec["aborted"] is False
    assert rec["spliced"] is splice
    assert proxy.spliced_total() == spliced_before + (1 if splice else 0)


@BOTH_WAYS
@pytest.mark.parametrize("how", ["connect", "socks5"])
@pytest.mark.parametrize(
    "order", [CLIENT_CLOSES_FIRST, SERVER_CLOSES_FIRST], ids=["client-eof", "server-eof"]
)
def test_half_close_in_each_direction(setup: Setup, splice: bool, how: str, order: int) -> None:
    """One side ends its stream (shutdown(SHUT_WR)) first; the other direction still
    carries all its bytes afterwards, and then ends too."""
    proxy = setup.proxies[splice]
    mark = proxy.mark()
    c = open_tunnel(proxy, how, setup.server)
    tag = uuid.uuid4().bytes
    up = setup.up[: 4 * MIB + 5]
    length, sha256 = transfer(c, tag, up, 4 * MIB + 7, order)
    c.sock.close()
    assert (length, sha256) == (
        4 * MIB + 7,
        hashlib.sha256(setup.server.payload[: 4 * MIB + 7]).hexdigest(),
    )
    seen = setup.server.seen[tag]
    assert seen.done.wait(10)
    assert (seen.length, seen.sha256) == (len(up), hashlib.sha256(up).hexdigest())
    rec = proxy.new_record(mark)
    assert (rec["bytes_in"], rec["bytes_out"]) == (c.sent, c.received)
    assert rec["aborted"] is False and rec["spliced"] is splice


@BOTH_WAYS
@pytest.mark.parametrize("how", ["connect", "tcp"])
def test_an_idle_tunnel_is_closed_after_tunnel_idle(setup: Setup, splice: bool, how: str) -> None:
    proxy = setup.proxies[splice]
    mark = proxy.mark()
    c = open_tunnel(proxy, how, setup.server)
    c.sock.settimeout(IDLE + 20)
    started = time.monotonic()
    assert eof_or_reset(c.sock) in ("eof", "reset")
    waited = time.monotonic() - started
    c.sock.close()
    assert IDLE * 0.75 <= waited < IDLE + 15, waited
    rec = proxy.new_record(mark)
    assert rec["status"] == 200 and rec["bytes_in"] == c.sent and rec["bytes_out"] == c.received
    assert rec["spliced"] is splice


@BOTH_WAYS
def test_a_client_reset_mid_transfer_is_logged_aborted(setup: Setup, splice: bool) -> None:
    proxy = setup.proxies[splice]
    mark = proxy.mark()
    c = open_tunnel(proxy, "connect", setup.server)
    c.send(HEADER.pack(uuid.uuid4().bytes, 0, SIZE, CONCURRENT))
    c.recv_exact(MIB)
    c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    c.sock.close()
    rec = proxy.new_record(mark)
    assert rec["aborted"] is True and rec["status"] == 200
    assert c.received <= rec["bytes_out"] < SIZE
    assert rec["bytes_in"] == c.sent
    assert rec["spliced"] is splice


@BOTH_WAYS
def test_an_upstream_reset_mid_transfer_is_logged_aborted(setup: Setup, splice: bool) -> None:
    proxy = setup.proxies[splice]
    mark = proxy.mark()
    c = open_tunnel(proxy, "socks5", setup.server)
    replies = c.received
    c.send(HEADER.pack(uuid.uuid4().bytes, 0, 8 * MIB, SERVER_RESETS))
    c.sock.settimeout(30)
    assert eof_or_reset(c.sock) in ("eof", "reset")
    c.sock.close()
    rec = proxy.new_record(mark)
    assert rec["aborted"] is True, rec
    assert rec["bytes_out"] <= replies + 8 * MIB  # at most what the server sent
    assert rec["spliced"] is splice


@BOTH_WAYS
def test_tunnels_leave_no_descriptor_behind(setup: Setup, splice: bool) -> None:
    """Dups and pipes of the splice path are closed at the end of every tunnel, whether it
    ended normally, by a reset or by the idle timeout."""
    proxy = setup.proxies[splice]
    pid = proxy.kushi.proc.pid
    before = settled_fd_count(pid)
    for how in ("connect", "socks5", "tcp"):
        c = open_tunnel(proxy, how, setup.server)
        transfer(c, uuid.uuid4().bytes, setup.up[:MIB], MIB, CONCURRENT)
        c.sock.close()
        c = open_tunnel(proxy, how, setup.server)
        c.send(HEADER.pack(uuid.uuid4().bytes, 0, SIZE, CONCURRENT))
        c.recv_exact(MIB)
        c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        c.sock.close()
    assert settled_fd_count(pid) == before


def open_tunnels_gauge(proxy: Proxy) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{proxy.admin}/metrics", timeout=10) as r:
        text = r.read().decode()
    (line,) = [x for x in text.splitlines() if x.startswith("kushi_open_tunnels ")]
    return float(line.split()[1])


@BOTH_WAYS
def test_sigterm_counts_open_tunnels_and_cuts_them_at_the_grace_deadline(
    setup: Setup, tmp_path: Path, splice: bool
) -> None:
    """A tunnel whose client stopped reading is open at SIGTERM: it is counted in
    ``kushi_open_tunnels``, kept for ``shutdown_grace``, then cut and logged aborted with
    the bytes that really left; kushi exits 0."""
    port, admin = free_port(), free_port()
    path = tmp_path / "kushi.toml"
    write_toml(
        path,
        {
            "listen": [f"127.0.0.1:{port}"],
            "connect_ports": [setup.server.port],
            "allow_destinations": ["::1/128"],
            "access_log_format": "json",
            "admin_listen": [f"127.0.0.1:{admin}"],
            "splice": splice,
            "timeouts": {"shutdown_grace": 1},
        },
    )
    kushi = Kushi(["serve", "--config", str(path)], tmp_path, loopback_destinations=False)
    try:
        kushi.wait_ready()
        proxy = Proxy(kushi, port, 0, admin, splice)
        c = open_tunnel(proxy, "connect", setup.server)
        c.send(HEADER.pack(uuid.uuid4().bytes, 0, SIZE, CONCURRENT))
        c.recv_exact(MIB)  # then stops reading: the tunnel stays open, full
        assert open_tunnels_gauge(proxy) == 1
        kushi.signal(signal.SIGTERM)
        started = time.monotonic()
        assert kushi.proc.wait(20) == 0
        assert 0.8 <= time.monotonic() - started < 15
        c.sock.close()
        (rec,) = kushi.json_records()
        assert rec["method"] == "CONNECT" and rec["aborted"] is True
        assert MIB <= rec["bytes_out"] < SIZE
        assert any("dropping 1 connections" in line for line in kushi.stderr.splitlines())
    finally:
        kushi.stop()
