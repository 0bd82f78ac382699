"""Hardening: authentication, destination policy, limits, timeouts and upstream faults.

Real kushi processes, real curl and raw sockets, and a misbehaving origin written here
(``FaultyOrigin``) that answers each path with a specific fault.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import bcrypt
import pytest

from support.kushi_proc import Kushi, free_port
from support.tcpserver import ThreadedServer

pytestmark = pytest.mark.timeout(60)


class FaultyOrigin(ThreadedServer):
    """An origin on [::1] whose paths misbehave: /reset, /hang, /badstatus, /badchunk,
    /conflict (two Content-Lengths), /cut (closes mid-body), /ok."""

    def __init__(self) -> None:
        self.requests: list[bytes] = []
        super().__init__("::1")

    def serve(self, conn: socket.socket, number: int) -> None:
        data = b""
        try:
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                data += chunk
        except OSError:
            return
        self.requests.append(data)
        path = data.split(b" ", 2)[1]
        replies = {
            b"/ok": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok",
            b"/badstatus": b"HTTP/1.1 2OO OK\r\nContent-Length: 2\r\n\r\nok",
            b"/badchunk": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"zz\r\nok\r\n0\r\n\r\n",
            b"/conflict": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok",
            b"/tecl": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
            b"/cut": b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly-a-part",
        }
        try:
            if path == b"/reset":
                conn.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
                )
                conn.close()
                return
            if path == b"/hang":
                time.sleep(5)
                return
            conn.sendall(replies.get(path, b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"))
            if path == b"/cut":
                conn.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        finally:
            conn.close()


@pytest.fixture(scope="module")
def faulty() -> Iterator[FaultyOrigin]:
    origin = FaultyOrigin()
    yield origin
    origin.close()


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Kushi, int]]:
    work = tmp_path_factory.mktemp("hard")
    port = free_port()
    (work / "k.toml").write_text(
        f'listen = ["127.0.0.1:{port}"]\naccess_log_format = "json"\n'
        "[timeouts]\nupstream_header = 1.5\nheader_read = 2\n"
        "[limits]\nmax_request_line = 1024\nmax_header_bytes = 4096\n"
        "max_connections_per_client = 200\n"
    )
    kushi = Kushi(["serve", "--config", str(work / "k.toml")], work, [("127.0.0.1", port)])
    yield kushi, port
    kushi.stop()


def curl(port: int, *args: str) -> tuple[int, str]:
    out = subprocess.run(
        ["curl", "-s", "-D", "-", "-o", "/dev/null", "-x", f"http://127.0.0.1:{port}", *args],
        capture_output=True,
        text=True,
        timeout=20,
    )
    lines = out.stdout.splitlines()
    status = int(lines[0].split()[1]) if lines else 0
    return status, out.stdout


@pytest.mark.parametrize(
    ("path", "status", "error"),
    [
        ("/badstatus", 502, "http_protocol_error"),
        ("/conflict", 502, "http_protocol_error"),
        ("/tecl", 502, "http_protocol_error"),
        ("/reset", 502, "connection_terminated"),
        ("/hang", 504, "http_response_timeout"),
    ],
)
def test_upstream_faults_answered(
    proxy: tuple[Kushi, int], faulty: FaultyOrigin, path: str, status: int, error: str
) -> None:
    _, port = proxy
    got, headers = curl(port, f"http://[::1]:{faulty.port}{path}")
    assert got == status, headers
    assert f"error={error}" in headers


def test_upstream_bad_chunking_and_cut_body_are_not_passed_on_as_valid(
    proxy: tuple[Kushi, int], faulty: FaultyOrigin
) -> None:
    _, port = proxy
    for path in ("/badchunk", "/cut"):
        out = subprocess.run(
            ["curl", "-s", "-x", f"http://127.0.0.1:{port}", f"http://[::1]:{faulty.port}{path}"],
            capture_output=True,
            timeout=20,
        )
        # The head had gone out: the only honest signal left is an incomplete transfer,
        # which curl reports as CURLE_PARTIAL_FILE (18): a closed connection, not a reset.
        assert out.returncode == 18, (path, out.returncode, out.stderr)


def test_kushi_stays_up_after_faults(proxy: tuple[Kushi, int], faulty: FaultyOrigin) -> None:
    _, port = proxy
    got, _ = curl(port, f"http://[::1]:{faulty.port}/ok")
    assert got == 200


def test_slowloris_does_not_starve_a_normal_client(
    proxy: tuple[Kushi, int], faulty: FaultyOrigin
) -> None:
    kushi, port = proxy
    slow = []
    try:
        for _ in range(150):
            s = socket.create_connection(("127.0.0.1", port))
            s.sendall(b"GET http://[::1]:1/ HTTP/1.1\r\nHost: x\r\n")
            slow.append(s)
        start = time.monotonic()
        got, _ = curl(port, f"http://[::1]:{faulty.port}/ok")
        elapsed = time.monotonic() - start
        assert got == 200
        assert elapsed < 2.0, f"normal client took {elapsed:.2f}s with 150 slow clients held"
        # The slow clients are cut off by the header read timeout (2 s here) with 408.
        slow[0].settimeout(5)
        answer = slow[0].recv(4096)
        assert answer.startswith(b"HTTP/1.1 408"), answer[:80]
    finally:
        for s in slow:
            s.close()


def test_uri_too_long_and_header_section_too_large(proxy: tuple[Kushi, int]) -> None:
    _, port = proxy
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"GET http://[::1]:1/" + b"a" * 2000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        assert s.recv(4096).startswith(b"HTTP/1.1 414")
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(
            b"GET http://[::1]:1/ HTTP/1.1\r\nHost: x\r\n" + b"X-A: " + b"b" * 5000 + b"\r\n\r\n"
        )
        assert s.recv(4096).startswith(b"HTTP/1.1 431")


def test_destination_policy_refuses_loopback_by_default(
    tmp_path: Path, faulty: FaultyOrigin
) -> None:
    port = free_port()
    kushi = Kushi(
        ["serve", "--listen", f"127.0.0.1:{port}", "--access-log-format", "json"],
        tmp_path,
        [("127.0.0.1", port)],
        loopback_destinations=False,
    )
    try:
        before = len(faulty.requests)
        for url in (
            f"http://[::1]:{faulty.port}/ok",
            f"http://localhost:{faulty.port}/ok",
            f"http://[::ffff:127.0.0.1]:{faulty.port}/ok",
            "http://169.254.169.254/",
        ):
            got, headers = curl(port, url)
            assert got == 502, (url, headers)
            assert "error=destination_ip_prohibited" in headers, headers
        assert len(faulty.requests) == before
    finally:
        kushi.stop()


def test_proxy_authentication(tmp_path: Path, faulty: FaultyOrigin) -> None:
    htpasswd = tmp_path / "users"
    digest = bcrypt.hashpw(b"s3cret", bcrypt.gensalt(rounds=4)).decode()
    htpasswd.write_text(f"alice:{digest}\n")
    port = free_port()
    kushi = Kushi(
        [
            "serve",
            "--listen",
            f"127.0.0.1:{port}",
            "--auth-file",
            str(htpasswd),
            "--access-log-format",
            "json",
        ],
        tmp_path,
        [("127.0.0.1", port)],
    )
    try:
        url = f"http://[::1]:{faulty.port}/ok"
        got, headers = curl(port, url)
        assert got == 407 and 'Proxy-Authenticate: Basic realm="kushi"' in headers
        got, _ = curl(port, "--proxy-user", "alice:wrong", url)
        assert got == 407
        got, _ = curl(port, "--proxy-user", "alice:s3cret", url)
        assert got == 200
        # Never forwarded, never logged.
        assert not any(b"proxy-authorization" in r.lower() for r in faulty.requests)
        assert "s3cret" not in kushi.stdout and "YWxpY2U6czNjcmV0" not in kushi.stdout
        assert any(r.get("user") == "alice" for r in kushi.wait_records(3))
    finally:
        kushi.stop()


def test_clear_text_htpasswd_is_a_config_error(tmp_path: Path) -> None:
    htpasswd = tmp_path / "users"
    htpasswd.write_text("bob:plaintext\n")
    out = subprocess.run(
        [sys.executable, "-m", "kushi", "serve", "--auth-file", str(htpasswd)],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert out.returncode == 2
    assert "auth_file" in out.stderr and "bcrypt" in out.stderr
    assert "Traceback" not in out.stderr
