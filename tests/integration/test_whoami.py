"""``kushi whoami`` as a subprocess on [::1] and 127.0.0.1, driven by a real curl and by raw
sockets: each family is reported as the one the connection used, in text, HTML and JSON."""

from __future__ import annotations

import json
import re
import shutil
import signal
import socket
import subprocess
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

from support.kushi_proc import Kushi, free_port, run_kushi

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed"),
]

FAMILIES = [("[::1]", "::1", "ipv6"), ("127.0.0.1", "127.0.0.1", "ipv4")]
LOG_RE = re.compile(
    r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ (?P<client>\S+) (?P<family>ipv[46]) "
    r"(?P<method>\S+) (?P<target>\S+) (?P<status>\d{3})$"
)


def start_whoami(workdir: Path) -> tuple[Kushi, int]:
    """A whoami on [::1]:P and 127.0.0.1:P (another free port if P is taken on one family)."""
    for _ in range(5):
        port = free_port("::1")
        # Kushi hands open()-ed files to Popen without closing them (not whoami's doing).
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)
            proc = Kushi(
                ["whoami", "--listen", f"[::1]:{port}", "--listen", f"127.0.0.1:{port}"],
                workdir,
            )
        try:
            proc.wait_port("::1", port)
            proc.wait_port("127.0.0.1", port)
        except RuntimeError:
            proc.stop()
            if "already in use" in proc.stderr:
                continue
            raise
        return proc, port
    raise RuntimeError("no port free on both families")


@pytest.fixture
def whoami(tmp_path: Path) -> Iterator[tuple[Kushi, int]]:
    proc, port = start_whoami(tmp_path)
    yield proc, port
    proc.stop()


def curl(*args: str) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(
        ["curl", "-sS", "--noproxy", "*", "--max-time", "10", *args],
        capture_output=True,
        timeout=20,
    )
    # Decoded by hand: text=True would turn the CRLFs of a -D dump into LFs.
    return subprocess.CompletedProcess(
        res.args, res.returncode, res.stdout.decode(), res.stderr.decode()
    )


def split_response(raw: str) -> tuple[int, dict[str, str], str]:
    head, _, body = raw.partition("\r\n\r\n")
    lines = head.split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(lines[0].split()[1]), headers, body


def log_entries(proc: Kushi, wait_for: int = 0) -> list[dict[str, str]]:
    """The parsed stdout log (waiting up to 5 s for ``wait_for`` lines: a line is written
    just after its response, so it can lag behind the client)."""
    deadline = time.monotonic() + 5
    while len(proc.log_lines()) < wait_for and time.monotonic() < deadline:
        time.sleep(0.02)
    out = []
    for line in proc.log_lines():
        m = LOG_RE.match(line)
        assert m is not None, f"unexpected stdout line {line!r}"
        out.append(m.groupdict())
    return out


@pytest.mark.parametrize(("host", "client", "family"), FAMILIES)
def test_each_format_reports_the_family_used(
    whoami: tuple[Kushi, int], host: str, client: str, family: str
) -> None:
    proc, port = whoami
    url = f"http://{host}:{port}/where?x=1"

    # curl's default Accept (*/*): plain text.
    res = curl("-D", "-", "-H", "X-Probe: hello", url)
    assert res.returncode == 0, res.stderr
    status, headers, body = split_response(res.stdout)
    assert status == 200
    assert headers["content-type"] == "text/plain; charset=utf-8"
    assert int(headers["content-length"]) == len(body.encode())
    assert f"You came over {family.replace('ip', 'IP')}." in body
    assert f"client:  {client}\n" in body
    assert f"family:  {family}\n" in body
    assert "request: GET /where?x=1 HTTP/1.1\n" in body
    assert "X-Probe: hello\n" in body
    assert f"Host: {host}:{port}\n" in body

    # A browser's Accept: HTML.
    browser_accept = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"
    res = curl("-D", "-", "-H", f"Accept: {browser_accept}", url)
    status, headers, body = split_response(res.stdout)
    assert status == 200 and headers["content-type"] == "text/html; charset=utf-8"
    label = family.replace("ip", "IP")
    assert f'<h1>You came over <span class="{family[2:]}">{label}</span></h1>' in body
    assert f"<code>{client}</code>" in body
    assert "<tr><th>Accept</th><td>text/html,application/xhtml+xml" in body

    # JSON on Accept: application/json.
    res = curl("-D", "-", "-H", "Accept: application/json", "-H", "X-Probe: hello", url)
    status, headers, body = split_response(res.stdout)
    assert status == 200 and headers["content-type"] == "application/json"
    info = json.loads(body)
    assert info["client"] == client
    assert info["family"] == family
    assert isinstance(info["port"], int) and info["port"] > 0
    assert info["local"] == f"{host}:{port}"
    assert (info["method"], info["target"], info["version"]) == ("GET", "/where?x=1", "HTTP/1.1")
    assert info["server"] == "kushi whoami"
    assert ["X-Probe", "hello"] in info["headers"]
    assert ["Host", f"{host}:{port}"] in info["headers"]
    assert info["headers"][0][0] == "Host"  # as received, in order

    # ?format= overrides Accept; HEAD gets the head only.
    res = curl("-H", "Accept: text/html", f"{url}&format=json")
    assert json.loads(res.stdout)["family"] == family
    res = curl("-I", url)
    assert res.stdout.startswith("HTTP/1.1 200 OK\r\n")
    assert "content-length:" in res.stdout.lower()

    entries = log_entries(proc, wait_for=5)
    assert len(entries) == 5
    for entry in entries:
        assert entry["client"] == client and entry["family"] == family
        assert entry["target"] == "/where?x=1" or entry["target"].startswith("/where?x=1&")
        assert entry["status"] == "200"
    assert [e["method"] for e in entries] == ["GET", "GET", "GET", "GET", "HEAD"]


def test_keep_alive_with_bodies(whoami: tuple[Kushi, int]) -> None:
    """Pipelined requests on one connection, with a Content-Length and a chunked body that
    are read and discarded; the connection stays open until Connection: close."""
    proc, port = whoami
    requests = (
        b"POST /one HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"
        b"PUT /two HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
        b"Accept: application/json\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
        b"GET /three HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    with socket.create_connection(("::1", port), timeout=5) as s:
        s.sendall(requests)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    responses = data.split(b"HTTP/1.1 ")[1:]
    assert len(responses) == 3
    assert all(r.startswith(b"200 OK\r\n") for r in responses)
    assert b"request: POST /one HTTP/1.1" in responses[0]
    second = json.loads(responses[1].split(b"\r\n\r\n", 1)[1])
    assert second["method"] == "PUT" and ["Transfer-Encoding", "chunked"] in second["headers"]
    assert b"\r\nConnection: close" in responses[2].split(b"\r\n\r\n")[0]
    # One TCP connection: the same client port each time.
    text_ports = [re.search(rb"\nport: +(\d+)\n", r) for r in (responses[0], responses[2])]
    ports = {int(m.group(1)) for m in text_ports if m is not None} | {second["port"]}
    assert len(ports) == 1 and all(text_ports)

    # curl reuses the connection for two URLs in one run.
    res = curl("-w", "%{num_connects}\n", "-o", "/dev/null", "-o", "/dev/null",
               f"http://127.0.0.1:{port}/a", f"http://127.0.0.1:{port}/b")  # fmt: skip
    assert res.stdout.split() == ["1", "0"]
    targets = [e["target"] for e in log_entries(proc, wait_for=5)]
    assert targets == ["/one", "/two", "/three", "/a", "/b"]


@pytest.mark.parametrize(
    ("request_bytes", "details"),
    [
        (b"GET / HTTP/1.1\r\nHost: x\r\nBad Name: y\r\n\r\n", "invalid header field name"),
        (
            b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
            "both Content-Length and Transfer-Encoding",
        ),  # fmt: skip
        (b"GET / HTTP/1.1\r\n\r\n", "without a Host header"),
        (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "chunk size"),
    ],
)
def test_bad_input_gets_400_with_proxy_status(
    whoami: tuple[Kushi, int], request_bytes: bytes, details: str
) -> None:
    proc, port = whoami
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(request_bytes)
        data = b""
        while chunk := s.recv(65536):  # the server closes after the error
            data += chunk
    status, headers, body = split_response(data.decode("latin-1"))
    assert status == 400
    assert headers["proxy-status"].startswith("kushi; error=http_request_error; details=")
    assert details in headers["proxy-status"]
    assert headers["connection"] == "close"
    assert int(headers["content-length"]) == len(body)
    entries = log_entries(proc, wait_for=1)
    assert len(entries) == 1
    assert entries[-1]["status"] == "400" and entries[-1]["family"] == "ipv4"


def test_port_in_use_is_one_line_and_exit_1(whoami: tuple[Kushi, int]) -> None:
    _, port = whoami
    res = run_kushi(["whoami", "--listen", f"127.0.0.1:{port}"])
    assert res.returncode == 1
    assert res.stderr == (
        f"kushi whoami: cannot listen on 127.0.0.1:{port}: address already in use\n"
    )
    res = run_kushi(["whoami", "--listen", "[::1:80"])
    assert res.returncode == 2 and "missing ']'" in res.stderr


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signals_exit_0(tmp_path: Path, sig: int) -> None:
    proc, port = start_whoami(tmp_path)
    # An idle keep-alive connection must not hold the exit up.
    with socket.create_connection(("::1", port), timeout=5) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert s.recv(65536).startswith(b"HTTP/1.1 200 OK")
        proc.signal(sig)
        assert proc.proc.wait(10) == 0
    assert "listening on [::1]:" in proc.stderr
