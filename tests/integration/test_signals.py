"""Operating a running kushi: SIGTERM drains, SIGHUP reloads, a bad reload changes nothing.

kushi runs from a config file (``--config``) so SIGHUP has something to re-read; the client
is a raw socket on 127.0.0.1 kept open across the signal; the origin is bound to ``[::1]``.
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from support.kushi_proc import Kushi, free_port, write_toml
from support.origin import OriginProcess, pattern_sha256, spawn_origin
from support.rawhttp import Raw

pytestmark = pytest.mark.timeout(60)


@dataclass
class Running:
    kushi: Kushi
    port: int
    config: Path
    settings: dict[str, Any]

    def rewrite(self, **changes: Any) -> None:
        self.settings.update(changes)
        write_toml(self.config, self.settings)

    def wait_stderr(self, text: str, timeout: float = 10.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            lines = [line for line in self.kushi.stderr.splitlines() if text in line]
            if lines:
                return lines[-1]
            assert time.monotonic() < deadline, f"no {text!r} in: {self.kushi.stderr[-2000:]}"
            time.sleep(0.02)


@pytest.fixture(scope="module")
def origin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OriginProcess]:
    o = spawn_origin(["[::1]:0"], tmp_path_factory.mktemp("origin") / "origin.jsonl")
    yield o
    o.stop()


@pytest.fixture
def running(tmp_path: Path) -> Iterator[Running]:
    port = free_port()
    settings: dict[str, Any] = {
        "listen": [f"127.0.0.1:{port}"],
        "access_log_format": "json",
        "allow": ["127.0.0.0/8"],
        "egress": "prefer-ipv6",
    }
    path = tmp_path / "kushi.toml"
    write_toml(path, settings)
    kushi = Kushi(["serve", "--config", str(path)], tmp_path, wait_for=[("127.0.0.1", port)])
    yield Running(kushi, port, path, settings)
    kushi.stop()


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


# --- SIGTERM ---------------------------------------------------------------------------------


def test_sigterm_lets_a_download_in_flight_finish_refuses_new_connections_exits_0(
    running: Running, origin: OriginProcess
) -> None:
    n = 64 * 1024 * 1024
    url = origin.url(f"/bytes/{n}?sigterm")
    with Raw(running.port) as c:
        c.sock.sendall(f"GET {url} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        status, fields = c.head()
        assert status == 200 and fields["content-length"] == str(n)
        digest = hashlib.sha256()
        first = c.rfile.read(1024 * 1024)  # the client reads slowly: 1 MiB, then nothing
        digest.update(first)

        running.kushi.signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        while not refused(running.port):  # new connections are refused ...
            assert time.monotonic() < deadline, "kushi still accepts after SIGTERM"
            time.sleep(0.02)
        # ... while the download, 63 MiB short, keeps kushi running.
        assert running.kushi.proc.poll() is None

        rest = n - len(first)
        while rest:
            data = c.rfile.read1(min(rest, 1 << 20))
            assert data, f"download cut short with {rest} bytes to go"
            digest.update(data)
            rest -= len(data)
        assert c.rfile.read() == b""  # then kushi closes (Connection: close)
    assert digest.hexdigest() == pattern_sha256(n)
    assert running.kushi.proc.wait(20) == 0
    (record,) = [r for r in running.kushi.json_records() if r["target"] == url]
    assert record["status"] == 200 and record["bytes_out"] > n and record["error"] == ""
    assert "stopping" in running.kushi.stderr


def test_sigterm_closes_idle_keepalive_connections_without_waiting_the_grace(
    tmp_path: Path, origin: OriginProcess
) -> None:
    """The grace period is for requests in flight; an idle keep-alive connection is closed."""
    port = free_port()
    path = tmp_path / "kushi.toml"
    write_toml(path, {"listen": [f"127.0.0.1:{port}"], "timeouts": {"shutdown_grace": 300}})
    kushi = Kushi(["serve", "--config", str(path)], tmp_path, wait_for=[("127.0.0.1", port)])
    try:
        with Raw(port) as c:
            status, _, _ = c.get(origin.url("/1k"))
            assert status == 200
            kushi.signal(signal.SIGTERM)
            # kushi should close the idle connection at once (EOF). The 5 s are not a
            # measurement: the alternative is the 300 s grace period.
            c.sock.settimeout(5)
            try:
                tail: bytes | None = c.rfile.read()
            except TimeoutError:
                tail = None
        assert tail == b"", "the idle keep-alive connection was still open after SIGTERM"
        assert kushi.proc.wait(30) == 0
    finally:
        kushi.stop()


# --- SIGHUP ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "status", "error_type", "kept"),
    [
        # A client no request of which can pass is closed after its 403 (issue 16).
        ({"allow": ["203.0.113.9/32"]}, 403, "http_request_denied", False),
        ({"egress": "ipv4-only"}, 502, "destination_not_found", True),
    ],
    ids=["allow-list", "egress"],
)
def test_sighup_applies_changed_config_to_the_next_request_on_open_connection(
    running: Running,
    origin: OriginProcess,
    change: dict[str, Any],
    status: int,
    error_type: str,
    kept: bool,
) -> None:
    with Raw(running.port) as c:
        before, fields, _ = c.get(origin.url("/1k"))
        assert before == 200 and fields["proxy-status"].startswith("kushi; next-hop=")
        running.rewrite(**change)
        running.kushi.signal(signal.SIGHUP)
        running.wait_stderr("config reloaded")
        # The same keep-alive connection: still open, now under the new config.
        after, fields, body = c.get(origin.url("/1k"))
        assert after == status
        assert f"error={error_type}" in fields["proxy-status"]
        assert error_type.encode() in body
        if kept:
            again, _, _ = c.get(origin.url("/1k"))
            assert again == status  # and it is still usable
        else:
            assert fields.get("connection") == "close"
            assert c.rfile.read() == b""
    with Raw(running.port) as fresh:
        assert fresh.get(origin.url("/1k"))[0] == status
    assert running.kushi.proc.poll() is None


def test_sighup_with_broken_file_is_logged_and_old_config_keeps_working(
    running: Running, origin: OriginProcess
) -> None:
    with Raw(running.port) as c:
        assert c.get(origin.url("/1k"))[0] == 200
        running.config.write_text('egress = "ipv5"\nallow = ["203.0.113.9/32"]\n')
        running.kushi.signal(signal.SIGHUP)
        line = running.wait_stderr("reload failed")
        assert "egress" in line and "keeping the running config" in line
        status, fields, _ = c.get(origin.url("/1k"))
        assert status == 200 and f'next-hop="[::1]:{origin.port}"' in fields["proxy-status"]
    with Raw(running.port) as fresh:
        assert fresh.get(origin.url("/1k"))[0] == 200
    running.config.write_text("this is not = = toml\n")
    running.kushi.signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while running.kushi.stderr.count("reload failed") < 2:
        assert time.monotonic() < deadline, running.kushi.stderr[-2000:]
        time.sleep(0.02)
    with Raw(running.port) as fresh:
        assert fresh.get(origin.url("/1k"))[0] == 200
    assert running.kushi.proc.poll() is None


def _status_via(port: int, url: str) -> int:
    """One request on a new client connection (so any worker may take it)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(f"GET {url} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        return int(s.recv(4096).split(b" ", 2)[1])


def test_workers_share_the_listener_and_all_reload_and_stop(
    tmp_path: Path, origin: OriginProcess
) -> None:
    """workers = 2: both serve, SIGHUP reaches both, SIGTERM stops both and exits 0."""
    port = free_port()
    config = tmp_path / "kushi.toml"
    top = {
        "listen": [f"127.0.0.1:{port}"],
        "allow": ["127.0.0.0/8"],
        "allow_destinations": ["::1/128"],
        "access_log": "",
        "admin_listen": [],
        "workers": 2,
    }
    write_toml(config, top)
    kushi = Kushi(["serve", "--config", str(config)], tmp_path, [("127.0.0.1", port)])
    try:
        # The port accepts as soon as it is bound, which is before the workers fork.
        children = Path(f"/proc/{kushi.proc.pid}/task/{kushi.proc.pid}/children")
        deadline = time.monotonic() + 10
        while len(children.read_text().split()) != 2:
            assert time.monotonic() < deadline, "two workers never started"
            time.sleep(0.02)
        url = origin.url("/1k")
        assert [_status_via(port, url) for _ in range(20)] == [200] * 20
        write_toml(config, {**top, "allow": ["203.0.113.9/32"]})
        kushi.signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while _status_via(port, url) != 403:
            assert time.monotonic() < deadline, "no worker applied the reload"
            time.sleep(0.05)
        # Every worker has reloaded: 20 new connections, whichever worker takes them, get 403.
        time.sleep(0.3)
        assert [_status_via(port, url) for _ in range(20)] == [403] * 20
    finally:
        assert kushi.stop() == 0
    assert kushi.stderr.count("config reloaded") == 2
    assert kushi.stderr.count("stopping: no new connections") == 2


@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_while_starting_is_a_graceful_stop(tmp_path: Path, workers: int) -> None:
    """SIGTERM sent as soon as the port accepts (the workers may not be up, the event loop
    may have no handlers yet) stops kushi gracefully: exit 0, nothing left running. Before
    the signals were held during start-up, a stop that reached the supervisor before its
    workers forked was lost and kushi ran on."""
    for attempt in range(5):
        port = free_port()
        config = tmp_path / f"kushi-{attempt}.toml"
        write_toml(
            config,
            {
                "listen": [f"127.0.0.1:{port}"],
                "allow": ["127.0.0.0/8"],
                "access_log": "",
                "admin_listen": [],
                "workers": workers,
            },
        )
        kushi = Kushi(["serve", "--config", str(config)], tmp_path, [("127.0.0.1", port)])
        kushi.proc.send_signal(signal.SIGTERM)
        try:
            code = kushi.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            kushi.proc.kill()
            kushi.proc.wait()
            raise AssertionError(f"attempt {attempt}: SIGTERM at start-up was ignored") from None
        assert code == 0, kushi.stderr


def test_sigterm_with_workers_refuses_new_clients_and_logs_what_the_grace_cut(
    tmp_path: Path, origin: OriginProcess
) -> None:
    """workers = 2, shutdown_grace = 1, a download and a CONNECT tunnel whose client stops
    reading: new clients are refused as soon as draining starts (the supervisor's copies
    of the listening sockets were accepting them into a queue nobody served); when the
    grace is over both transfers are cut and logged as Squid logs them, TCP_MISS_ABORTED/200
    and TCP_TUNNEL_ABORTED/200 with the bytes that really left, not the full length; one
    line says how many connections were dropped, and a last one that kushi stopped."""
    port = free_port()
    path = tmp_path / "kushi.toml"
    write_toml(
        path,
        {
            "listen": [f"127.0.0.1:{port}"],
            "workers": 2,
            "connect_ports": [origin.port],
            "allow_destinations": ["::1/128"],
            "timeouts": {"shutdown_grace": 1},
        },
    )
    kushi = Kushi(["serve", "--config", str(path)], tmp_path, loopback_destinations=False)
    kushi.wait_ready()
    n = 256 * 1024 * 1024
    url = origin.url(f"/bytes/{n}?grace")
    with Raw(port) as download, Raw(port) as tunnel:
        download.sock.sendall(f"GET {url} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert download.head()[0] == 200
        got_download = len(download.rfile.read(1 << 20))
        assert tunnel.connect(f"[::1]:{origin.port}")[0] == 200
        tunnel.sock.sendall(f"GET /bytes/{n} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        got_tunnel = len(tunnel.rfile.read(1 << 20))

        kushi.signal(signal.SIGTERM)
        began = time.monotonic()
        while not refused(port):
            assert time.monotonic() - began < 0.9, "kushi still accepts after SIGTERM"
            time.sleep(0.02)
        assert kushi.proc.wait(20) == 0
    lines = kushi.log_lines()
    (cut,) = [line.split() for line in lines if url in line]
    (tunnelled,) = [line.split() for line in lines if " CONNECT " in line]
    assert cut[3] == "TCP_MISS_ABORTED/200" and got_download < int(cut[4]) < n, cut
    assert tunnelled[3] == "TCP_TUNNEL_ABORTED/200" and got_tunnel < int(tunnelled[4]) < n
    stderr = kushi.stderr.splitlines()
    dropped = [line for line in stderr if "shutdown grace of 1 s over" in line]
    assert [line.split("over: ")[1] for line in dropped] in (
        ["dropping 2 connections still open"],
        ["dropping 1 connections still open"] * 2,  # one in each worker
    ), dropped
    assert stderr[-1].endswith("INFO stopped"), stderr[-3:]


def test_a_client_that_leaves_mid_download_is_logged_aborted(
    running: Running, origin: OriginProcess
) -> None:
    """The client closes after 1 MiB of 64: the JSON record says ``aborted`` with the
    bytes that left kushi, far fewer than the length."""
    n = 64 * 1024 * 1024
    url = origin.url(f"/bytes/{n}?leaves")
    with Raw(running.port) as c:
        c.sock.sendall(f"GET {url} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert c.head()[0] == 200
        c.rfile.read(1 << 20)
    deadline = time.monotonic() + 10
    while not (records := [r for r in running.kushi.json_records() if r["target"] == url]):
        assert time.monotonic() < deadline, running.kushi.log_lines()[-3:]
        time.sleep(0.05)
    (record,) = records
    assert (record["status"], record["aborted"], record["error"]) == (200, True, "client_closed")
    assert 1 << 20 < record["bytes_out"] < n // 2, record


def _open_files(pid: int) -> list[str]:
    out = []
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            out.append(os.readlink(fd))
        except FileNotFoundError:
            pass  # closed while we looked
    return out


def test_many_reloads_leave_one_log_open_and_nothing_accumulates(
    running: Running, origin: OriginProcess, tmp_path: Path
) -> None:
    """Each reload to a new access log: the old snapshot's log is closed once its last
    request is logged, and the process's open files and threads stay where they were."""
    pid = running.kushi.proc.pid
    with Raw(running.port) as c:
        assert c.get(origin.url("/1k"))[0] == 200
    base_fds = len([f for f in _open_files(pid) if not f.startswith("socket:")])
    base_threads = len(os.listdir(f"/proc/{pid}/task"))
    logs = [tmp_path / f"access-{i}.log" for i in range(20)]
    for i, log in enumerate(logs):
        running.rewrite(access_log=str(log))
        running.kushi.signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while running.kushi.stderr.count("config reloaded") < i + 1:
            assert time.monotonic() < deadline, running.kushi.stderr[-2000:]
            time.sleep(0.02)
        with Raw(running.port) as c:  # one request logged under each snapshot
            assert c.get(origin.url(f"/1k?n={i}"))[0] == 200
    deadline = time.monotonic() + 5
    while not logs[-1].exists() or not logs[-1].read_text().strip():
        assert time.monotonic() < deadline, "the last log got no record"
        time.sleep(0.02)
    for i, log in enumerate(logs):
        assert f"n={i}" in log.read_text(), f"{log.name} lost its record"
    files = _open_files(pid)
    open_logs = [f for f in files if "/access-" in f]
    assert open_logs == [str(logs[-1])]
    # Sockets come and go with the connections; every other open file stays (+1: the
    # log file that replaced the default, stdout).
    assert len([f for f in files if not f.startswith("socket:")]) <= base_fds + 1
    assert len(os.listdir(f"/proc/{pid}/task")) <= base_threads
