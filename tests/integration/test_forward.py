"""kushi's forward proxy (issue 2), end to end on loopback with real sockets.

Topology: the client (curl, or a raw socket where curl cannot say it) on 127.0.0.1 talks to a
kushi subprocess on 127.0.0.1, which forwards to origins bound to ``[::1]`` only
(``tests/support/origin.py``). An origin bound to ``[::1]`` only can only have been reached
over IPv6, so every forwarded request proves IPv6 egress; the tests also check it in the
origin's request log (``family``/``client``), in kushi's JSON access log and in the
``Proxy-Status`` response header.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from support.kushi_proc import Kushi, free_port
from support.origin import ONE_K, pattern_bytes, pattern_sha256, spawn_origin

CURL_TIMEOUT = 60

pytestmark = pytest.mark.timeout(60)


# --- processes -------------------------------------------------------------------------------


class Origin:
    """An origin (``support.origin.spawn_origin``) and lookups in its request log by marker."""

    def __init__(
        self,
        workdir: Path,
        name: str,
        listen: Sequence[str] = ("[::1]:0",),
        tls: tuple[Path, Path] | None = None,
    ) -> None:
        self.name = name
        self.process = spawn_origin(
            list(listen),
            workdir / f"origin-{name}-{uuid.uuid4().hex[:8]}.jsonl",
            name=name,
            tls_cert=tls[0] if tls else None,
            tls_key=tls[1] if tls else None,
        )
        self.bound = self.process.addresses
        self.port = self.process.port

    @property
    def hop(self) -> str:
        """The next-hop kushi reports for this origin."""
        return f"[::1]:{self.port}"

    def url(self, path: str) -> str:
        return f"http://[::1]:{self.port}{path}"

    def find(self, marker: str) -> list[dict[str, Any]]:
        return [r for r in self.process.requests() if marker in r.get("target", "")]

    def wait_for(self, marker: str, count: int = 1, timeout: float = 10.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while True:
            found = self.find(marker)
            if len(found) >= count or time.monotonic() > deadline:
                return found
            time.sleep(0.02)

    def stop(self) -> None:
        self.process.stop()


def start_kushi(argv: Sequence[str], workdir: Path, port: int) -> Kushi:
    """A kushi subprocess listening on 127.0.0.1:``port`` (loopback destinations allowed)."""
    return Kushi(argv, workdir, wait_for=[("127.0.0.1", port)])


def kushi_record(kushi: Kushi, marker: str, timeout: float = 10.0) -> dict[str, Any]:
    """The JSON access record whose target contains ``marker`` (waits for it)."""
    deadline = time.monotonic() + timeout
    while True:
        found = [r for r in kushi.json_records() if marker in r["target"]]
        if found:
            return found[-1]
        if time.monotonic() > deadline:
            raise AssertionError(f"no access record for {marker}: {kushi.log_lines()[-5:]}")
        time.sleep(0.02)


def marker() -> str:
    return "id=" + uuid.uuid4().hex[:12]


# --- a raw HTTP/1.1 client -------------------------------------------------------------------


@dataclass
class Response:
    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes = b""
    trailers: list[tuple[str, str]] = field(default_factory=list)
    version: str = "HTTP/1.1"

    def get_all(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]

    def get(self, name: str) -> str | None:
        values = self.get_all(name)
        return values[0] if values else None

    def json(self) -> Any:
        return json.loads(self.body)


class Raw:
    """A client socket that writes exact bytes and parses responses strictly."""

    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = 30.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.rfile = self.sock.makefile("rb")

    def __enter__(self) -> Raw:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.rfile.close()
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _line(self) -> bytes:
        line = self.rfile.readline(65537)
        if not line.endswith(b"\r\n"):
            raise AssertionError(f"bad or missing line: {line!r}")
        return line[:-2]

    def _fields(self) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        while True:
            line = self._line()
            if not line:
                return out
            name, _, value = line.decode("latin-1").partition(":")
            out.append((name, value.strip()))

    def head(self) -> Response:
        """One response head (interim ones included)."""
        version, status, reason = self._line().decode("latin-1").split(" ", 2)
        return Response(int(status), reason, self._fields(), version=version)

    def response(self, method: str = "GET", interim: list[Response] | None = None) -> Response:
        """The next final response with its body, framed as RFC 9112 section 6.3 says."""
        resp = self.head()
        while 100 <= resp.status < 200 and resp.status != 101:
            if interim is not None:
                interim.append(resp)
            resp = self.head()
        if method == "HEAD" or resp.status in (204, 304) or resp.status < 200:
            return resp
        te = resp.get("transfer-encoding")
        if te is not None:
            assert te.lower() == "chunked", te
            body = bytearray()
            while True:
                size = int(self._line().split(b";")[0], 16)
                if size == 0:
                    break
                body += self.read_exactly(size)
                assert self._line() == b""
            resp.trailers = self._fields()
            resp.body = bytes(body)
        elif resp.get("content-length") is not None:
            resp.body = self.read_exactly(int(resp.get("content-length") or 0))
        else:
            resp.body = self.read_to_eof()
        return resp

    def read_exactly(self, n: int) -> bytes:
        data = self.rfile.read(n)
        assert data is not None and len(data) == n, f"short body: {len(data or b'')} of {n}"
        return data

    def read_to_eof(self) -> bytes:
        return self.rfile.read()

    def at_eof(self) -> bool:
        return self.rfile.read(1) == b""


def request(
    method: str, target: str, headers: Sequence[tuple[str, str]] = (), body: bytes = b""
) -> bytes:
    """A request head (Host taken from an absolute-form target) and body."""
    lines = [f"{method} {target} HTTP/1.1"]
    if not any(k.lower() == "host" for k, _ in headers):
        m = re.match(r"[a-z]+://([^/?]+)", target)
        lines.append(f"Host: {m.group(1) if m else 'localhost'}")
    lines += [f"{k}: {v}" for k, v in headers]
    if body and not any(k.lower() in ("content-length", "transfer-encoding") for k, _ in headers):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


# --- curl ------------------------------------------------------------------------------------


@dataclass
class CurlResult:
    returncode: int
    blocks: list[Response]  # every header block: interim responses, the final one
    body: bytes
    stderr: str
    stdout: str

    @property
    def final(self) -> Response:
        return self.blocks[-1]


def curl(proxy_port: int | None, workdir: Path, *args: str) -> CurlResult:
    """Run curl through kushi; headers and body are captured to files and parsed."""
    tag = uuid.uuid4().hex[:8]
    hdr, out = workdir / f"curl-{tag}.hdr", workdir / f"curl-{tag}.body"
    argv = ["curl", "-sS", "--max-time", str(CURL_TIMEOUT), "-D", str(hdr), "-o", str(out)]
    if proxy_port is not None:
        argv += ["-x", f"http://127.0.0.1:{proxy_port}"]
    proc = subprocess.run([*argv, *args], capture_output=True, text=True, timeout=CURL_TIMEOUT + 10)
    blocks = parse_header_blocks(hdr.read_bytes() if hdr.exists() else b"")
    body = out.read_bytes() if out.exists() else b""
    for path in (hdr, out):
        if path.exists():
            path.unlink()
    return CurlResult(proc.returncode, blocks, body, proc.stderr, proc.stdout)


def parse_header_blocks(data: bytes) -> list[Response]:
    blocks: list[Response] = []
    for chunk in data.decode("latin-1").split("\r\n\r\n"):
        lines = [line for line in chunk.split("\r\n") if line]
        if not lines:
            continue
        if lines[0].startswith("HTTP/"):
            version, status, *reason = lines[0].split(" ", 2)
            fields = [tuple(x.strip() for x in line.split(":", 1)) for line in lines[1:]]
            blocks.append(
                Response(
                    int(status), " ".join(reason), [(k, v) for k, v in fields], version=version
                )
            )
        elif blocks:  # trailers after a chunked body
            blocks[-1].trailers += [
                (k.strip(), v.strip()) for k, v in (line.split(":", 1) for line in lines)
            ]
    return blocks


def proxy_status(resp: Response) -> dict[str, str]:
    """The kushi member of Proxy-Status as {param: value} (``name`` holds the member)."""
    value = resp.get("proxy-status")
    assert value is not None, f"no Proxy-Status in {resp.headers}"
    params: dict[str, str] = {}
    parts = re.findall(r'(?:[^;"]|"(?:[^"\\]|\\.)*")+', value)
    params["name"] = parts[0].strip()
    for part in parts[1:]:
        key, _, val = part.strip().partition("=")
        if val.startswith('"'):
            val = val[1:-1].replace('\\"', '"').replace("\\\\", "\\")
        params[key] = val
    return params


def assert_forwarded(resp: Response, origin: Origin, status: int) -> None:
    """The response came from ``origin`` over IPv6, and kushi says so in Proxy-Status."""
    assert resp.status == status
    ps = proxy_status(resp)
    assert ps["name"] == "kushi"
    assert ps["next-hop"] == origin.hop
    assert ps["received-status"] == str(status)
    assert "error" not in ps
    assert resp.get("x-origin-name") == origin.name


def assert_error(resp: Response, status: int, error_type: str) -> dict[str, str]:
    assert resp.status == status, (resp.status, resp.headers, resp.body[:300])
    ps = proxy_status(resp)
    assert ps["name"] == "kushi"
    assert ps["error"] == error_type
    assert ps.get("details"), "an error's Proxy-Status says what happened"
    return ps


def header_names(record: dict[str, Any]) -> set[str]:
    return {k.lower() for k, _ in record["headers"]}


def header_values(record: dict[str, Any], name: str) -> list[str]:
    return [v for k, v in record["headers"] if k.lower() == name.lower()]


# --- fixtures --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("forward")


@pytest.fixture(scope="module")
def origin(workdir: Path) -> Iterator[Origin]:
    o = Origin(workdir, "alpha")
    yield o
    o.stop()


@pytest.fixture(scope="module")
def origin_b(workdir: Path) -> Iterator[Origin]:
    o = Origin(workdir, "beta")
    yield o
    o.stop()


@pytest.fixture(scope="module")
def dual_origin(workdir: Path) -> Iterator[Origin]:
    """One origin on [::1]:P and 127.0.0.1:P (the same port for both families)."""
    o = Origin(workdir, "dual", ("[::1]:0", "127.0.0.1:0"))
    ports = {b.rsplit(":", 1)[1] for b in o.bound}
    if len(ports) != 1:
        o.stop()
        pytest.skip(f"could not bind one port for both families: {o.bound}")
    yield o
    o.stop()


@dataclass
class Proxy:
    proc: Kushi
    port: int


@pytest.fixture(scope="module")
def kushi(workdir: Path) -> Iterator[Proxy]:
    port = free_port()
    k = start_kushi(
        ["serve", "--listen", f"127.0.0.1:{port}", "--access-log-format", "json"], workdir, port
    )
    yield Proxy(k, port)
    assert k.stop() == 0


@pytest.fixture
def own_kushi(tmp_path: Path) -> Iterator[Any]:
    """Start a kushi with extra flags for one test: ``own_kushi(*flags) -> Proxy``."""
    started: list[Kushi] = []

    def start(*flags: str, fmt: str = "json") -> Proxy:
        port = free_port()
        argv = ["serve", "--listen", f"127.0.0.1:{port}", *flags]
        if fmt:
            argv += ["--access-log-format", fmt]
        k = start_kushi(argv, tmp_path, port)
        started.append(k)
        return Proxy(k, port)

    yield start
    for k in started:
        k.stop()


# --- HTTP forwarding -------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"])
def test_http_forwarding_absolute_form_methods(
    method: str, kushi: Proxy, origin: Origin, workdir: Path
) -> None:
    mark = marker()
    args = ["-I"] if method == "HEAD" else ["-X", method]
    res = curl(kushi.port, workdir, *args, origin.url(f"/headers?{mark}"))
    assert res.returncode == 0, res.stderr
    assert_forwarded(res.final, origin, 200)
    if method != "HEAD":
        seen = json.loads(res.body)
        assert seen["method"] == method
        assert seen["target"] == f"/headers?{mark}"  # origin-form towards the origin
    (got,) = origin.wait_for(mark)
    assert got["method"] == method
    assert got["family"] == "ipv6" and got["client"] == "::1"
    rec = kushi_record(kushi.proc, mark)
    assert rec["method"] == method and rec["status"] == 200
    assert rec["upstream"] == origin.hop and rec["family"] == "ipv6"
    assert rec["client"] == "127.0.0.1"


def test_request_body_content_length_arrives_intact(
    kushi: Proxy, origin: Origin, workdir: Path
) -> None:
    body = os.urandom(3 * 1024 * 1024 + 17)
    path = workdir / "upload.bin"
    path.write_bytes(body)
    mark = marker()
    res = curl(
        kushi.port,
        workdir,
        "-H",
        "Expect:",
        "--data-binary",
        f"@{path}",
        origin.url(f"/sha256?{mark}"),
    )
    assert res.returncode == 0, res.stderr
    assert_forwarded(res.final, origin, 200)
    want = hashlib.sha256(body).hexdigest()
    assert json.loads(res.body) == {"length": len(body), "sha256": want}
    (got,) = origin.wait_for(mark)
    assert got["body_sha256"] == want and got["error"] is None
    assert header_values(got, "content-length") == [str(len(body))]


def test_request_body_chunked_with_trailers_arrives_intact(kushi: Proxy, origin: Origin) -> None:
    pieces = [os.urandom(n) for n in (1, 1000, 65536, 300_000, 7)]
    body = b"".join(pieces)
    mark = marker()
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces)
    chunked += b"0\r\nX-Checksum: " + hashlib.sha256(body).hexdigest().encode() + b"\r\n\r\n"
    with Raw(kushi.port) as c:
        c.send(
            request(
                "POST",
                origin.url(f"/sha256?{mark}"),
                [("Transfer-Encoding", "chunked"), ("Trailer", "X-Checksum")],
            )
            + chunked
        )
        resp = c.response("POST")
    assert_forwarded(resp, origin, 200)
    assert resp.json() == {"length": len(body), "sha256": hashlib.sha256(body).hexdigest()}
    (got,) = origin.wait_for(mark)
    assert got["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert header_values(got, "transfer-encoding") == ["chunked"]
    assert got["trailers"] == [["X-Checksum", hashlib.sha256(body).hexdigest()]]


def test_response_body_content_length_arrives_intact(
    kushi: Proxy, origin: Origin, workdir: Path
) -> None:
    n = 5 * 1024 * 1024 + 3
    res = curl(kushi.port, workdir, origin.url(f"/bytes/{n}?{marker()}"))
    assert res.returncode == 0, res.stderr
    assert_forwarded(res.final, origin, 200)
    assert res.final.get("content-length") == str(n)
    assert hashlib.sha256(res.body).hexdigest() == pattern_sha256(n)


def test_response_body_chunked_with_trailers_arrives_intact(kushi: Proxy, origin: Origin) -> None:
    n = 1_234_567
    with Raw(kushi.port) as c:
        c.send(request("GET", origin.url(f"/chunked/{n}?{marker()}"), [("TE", "trailers")]))
        resp = c.response()
    assert_forwarded(resp, origin, 200)
    assert resp.get("transfer-encoding") == "chunked"
    assert hashlib.sha256(resp.body).hexdigest() == pattern_sha256(n)
    assert resp.trailers == [("X-Trailer", "done")]
    # The field announcing the trailer section goes on with it (RFC 9110 section 6.6.2).
    assert resp.get_all("trailer") == ["X-Trailer"]


def test_response_body_read_until_close_arrives_intact(kushi: Proxy, origin: Origin) -> None:
    n = 2 * 1024 * 1024 + 1
    with Raw(kushi.port) as c:
        c.send(request("GET", origin.url(f"/close/{n}?{marker()}")))
        resp = c.response()
        # A 1.1 client gets the close-delimited body re-framed (chunked) ...
        assert resp.get("transfer-encoding") == "chunked"
        assert hashlib.sha256(resp.body).hexdigest() == pattern_sha256(n)
        # ... and the client connection stays usable.
        c.send(request("GET", origin.url(f"/1k?{marker()}")))
        again = c.response()
    assert_forwarded(resp, origin, 200)
    assert_forwarded(again, origin, 200)
    assert again.body == ONE_K


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.mark.slow
def test_streaming_200mib_download_keeps_rss_small(kushi: Proxy, origin: Origin) -> None:
    n = 200 * 1024 * 1024
    pid = kushi.proc.proc.pid
    with Raw(kushi.port) as c:  # warm up: first request, imports, buffers
        c.send(request("GET", origin.url(f"/bytes/{1024 * 1024}?{marker()}")))
        c.response()
    baseline = rss_kib(pid)
    peak = baseline
    samples = 0
    digest = hashlib.sha256()
    with Raw(kushi.port) as c:
        c.send(request("GET", origin.url(f"/bytes/{n}?{marker()}")))
        resp = c.head()
        assert_forwarded(resp, origin, 200)
        remaining = int(resp.get("content-length") or 0)
        assert remaining == n
        while remaining:
            data = c.rfile.read1(min(remaining, 1 << 20))
            assert data, "download cut short"
            digest.update(data)
            remaining -= len(data)
            if samples * 4 * 1024 * 1024 <= n - remaining:  # one sample every 4 MiB read
                peak = max(peak, rss_kib(pid))
                samples += 1
    assert digest.hexdigest() == pattern_sha256(n)
    assert samples >= 40, "RSS was sampled throughout the transfer"
    growth = peak - baseline
    print(f"kushi RSS baseline {baseline} KiB, peak {peak} KiB, growth {growth} KiB")
    assert growth < 64 * 1024, f"kushi RSS grew by {growth} KiB during a 200 MiB download"


def test_client_that_stops_reading_holds_the_download_back(kushi: Proxy, origin: Origin) -> None:
    """Back-pressure: while the client reads nothing, kushi stops reading the origin
    instead of queueing the whole response for it (a slow reader cannot fill memory)."""
    n = 256 * 1024 * 1024
    pid = kushi.proc.proc.pid
    with Raw(kushi.port) as c:  # warm up
        c.send(request("GET", origin.url(f"/bytes/{1024 * 1024}?{marker()}")))
        c.response()
    baseline = rss_kib(pid)
    with Raw(kushi.port) as c:
        c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        c.send(request("GET", origin.url(f"/bytes/{n}?{marker()}")))
        resp = c.head()
        assert resp.status == 200
        time.sleep(2.0)  # not one byte read: the origin could have sent all 256 MiB by now
        growth = rss_kib(pid) - baseline
        digest = hashlib.sha256()
        remaining = n
        while remaining:
            data = c.rfile.read1(min(remaining, 1 << 20))
            assert data, "download cut short"
            digest.update(data)
            remaining -= len(data)
    assert digest.hexdigest() == pattern_sha256(n)
    print(f"kushi RSS grew by {growth} KiB while the client read nothing")
    assert growth < 32 * 1024, f"kushi queued {growth} KiB for a client that was not reading"


def test_http10_client_gets_correct_response(kushi: Proxy, origin: Origin, workdir: Path) -> None:
    mark = marker()
    res = curl(kushi.port, workdir, "-0", origin.url(f"/1k?{mark}"))
    assert res.returncode == 0, res.stderr
    assert_forwarded(res.final, origin, 200)
    assert res.body == ONE_K
    assert res.final.get("content-length") == "1024"
    assert res.final.get("transfer-encoding") is None
    (got,) = origin.wait_for(mark)
    assert got["family"] == "ipv6"
    # RFC 9110 section 7.6.3: Via names the protocol kushi received.
    assert any(v.startswith("1.0 kushi") for v in header_values(got, "via"))


def test_http10_client_gets_chunked_origin_response_close_delimited(
    kushi: Proxy, origin: Origin
) -> None:
    n = 777_777
    with Raw(kushi.port) as c:
        c.send(f"GET {origin.url(f'/chunked/{n}?{marker()}')} HTTP/1.0\r\n\r\n".encode())
        resp = c.head()
        body = c.read_to_eof()
    assert_forwarded(resp, origin, 200)
    assert resp.get("transfer-encoding") is None  # a 1.0 client cannot read chunked
    assert resp.get("content-length") is None
    assert (resp.get("connection") or "").lower() == "close"
    assert hashlib.sha256(body).hexdigest() == pattern_sha256(n)


def test_persistent_connection_two_requests_reuse_it(
    kushi: Proxy, origin: Origin, workdir: Path
) -> None:
    m1, m2 = marker(), marker()
    res = curl(
        kushi.port,
        workdir,
        "-w",
        "%{num_connects}\n",
        origin.url(f"/1k?{m1}"),
        "-o",
        "/dev/null",  # the helper's -o takes the first URL's body, this one the second's
        origin.url(f"/1k?{m2}"),
    )
    assert res.returncode == 0, res.stderr
    # curl opened one connection to kushi for the first URL and none for the second.
    assert res.stdout.split() == ["1", "0"]
    assert [b.status for b in res.blocks] == [200, 200]
    for block in res.blocks:
        assert_forwarded(block, origin, 200)
    (a,) = origin.wait_for(m1)
    (b,) = origin.wait_for(m2)
    # kushi kept its upstream connection too: both arrived on one origin connection.
    assert a["conn"] == b["conn"] and b["seq"] == a["seq"] + 1


def test_concurrent_clients_reuse_upstream_connections_without_churn(
    kushi: Proxy, origin: Origin
) -> None:
    """64 kept-alive clients in lockstep, 8 requests each: every upstream connection kushi
    opens is pooled and reused, so the origin sees at most one connection per client. (A
    pool capped below the concurrency closes connections that the next round reopens: with
    the old cap of 32 this saw well over 64.)"""
    clients, rounds = 64, 8
    tag = marker()
    barrier = threading.Barrier(clients)
    failures: list[str] = []

    def client(i: int) -> None:
        try:
            with Raw(kushi.port) as c:
                for r in range(rounds):
                    barrier.wait(timeout=30)
                    c.send(request("GET", origin.url(f"/1k?{tag}-{i}-{r}")))
                    resp = c.response()
                    if resp.status != 200 or resp.body != ONE_K:
                        failures.append(f"client {i} round {r}: {resp.status}")
        except Exception as exc:  # reported below; a broken barrier stops the others
            failures.append(f"client {i}: {exc!r}")
            barrier.abort()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not failures, failures[:5]
    records = origin.wait_for(tag, count=clients * rounds)
    assert len(records) == clients * rounds
    assert len({r["conn"] for r in records}) <= clients


def test_pipelining_three_requests_in_one_write_answered_in_order(
    kushi: Proxy, origin: Origin
) -> None:
    marks = [marker() for _ in range(3)]
    data = (
        request("GET", origin.url(f"/slow-headers/300?{marks[0]}"))
        + request("GET", origin.url(f"/headers?{marks[1]}"))
        + request("GET", origin.url(f"/bytes/5000?{marks[2]}"))
    )
    with Raw(kushi.port) as c:
        c.send(data)  # one write: all three requests
        first, second, third = c.response(), c.response(), c.response()
    assert first.body == b"slow\n"
    assert second.json()["target"] == f"/headers?{marks[1]}"
    assert third.body == pattern_bytes(5000)
    for resp in (first, second, third):
        assert_forwarded(resp, origin, 200)


@pytest.mark.parametrize("pipelined", [False, True], ids=["sequential", "pipelined"])
def test_second_request_same_connection_other_host_goes_to_that_host(
    pipelined: bool, kushi: Proxy, origin: Origin, origin_b: Origin
) -> None:
    ma, mb = marker(), marker()
    req_a = request("GET", origin.url(f"/headers?{ma}"))
    req_b = request("GET", origin_b.url(f"/headers?{mb}"))
    with Raw(kushi.port) as c:
        if pipelined:
            c.send(req_a + req_b)
            first, second = c.response(), c.response()
        else:
            c.send(req_a)
            first = c.response()
            c.send(req_b)
            second = c.response()
    assert_forwarded(first, origin, 200)
    assert_forwarded(second, origin_b, 200)
    assert first.json()["target"] == f"/headers?{ma}"
    assert second.json()["target"] == f"/headers?{mb}"
    assert len(origin.wait_for(ma)) == 1 and len(origin_b.wait_for(mb)) == 1
    assert origin.find(mb) == [] and origin_b.find(ma) == []


def test_expect_100_continue_curl_large_post(kushi: Proxy, origin: Origin, workdir: Path) -> None:
    body = os.urandom(2 * 1024 * 1024)
    path = workdir / "expect.bin"
    path.write_bytes(body)
    mark = marker()
    res = curl(
        kushi.port,
        workdir,
        "-H",
        "Expect: 100-continue",
        "--data-binary",
        f"@{path}",
        origin.url(f"/sha256?{mark}"),
    )
    assert res.returncode == 0, res.stderr
    assert [b.status for b in res.blocks] == [100, 200]
    assert_forwarded(res.final, origin, 200)
    assert json.loads(res.body)["sha256"] == hashlib.sha256(body).hexdigest()
    (got,) = origin.wait_for(mark)
    assert header_values(got, "expect") == ["100-continue"]


def test_expect_100_continue_interim_arrives_before_the_body_is_sent(
    kushi: Proxy, origin: Origin
) -> None:
    body = os.urandom(100_000)
    with Raw(kushi.port) as c:
        c.send(
            request(
                "POST",
                origin.url(f"/sha256?{marker()}"),
                [("Content-Length", str(len(body))), ("Expect", "100-continue")],
            )
        )
        interim = c.head()  # blocks until kushi relays the origin's 100 (no body sent yet)
        assert interim.status == 100
        c.send(body)
        resp = c.response("POST")
    assert_forwarded(resp, origin, 200)
    assert resp.json()["sha256"] == hashlib.sha256(body).hexdigest()


def test_head_204_304_without_bodies_and_connection_stays_usable(
    kushi: Proxy, origin: Origin
) -> None:
    with Raw(kushi.port) as c:
        c.send(request("HEAD", origin.url(f"/bytes/100000?{marker()}")))
        head = c.response("HEAD")
        c.send(request("GET", origin.url(f"/status/204?{marker()}")))
        no_content = c.response()
        c.send(request("GET", origin.url(f"/status/304?{marker()}")))
        not_modified = c.response()
        c.send(request("GET", origin.url(f"/1k?{marker()}")))
        last = c.response()
    assert_forwarded(head, origin, 200)
    assert head.get("content-length") == "100000"
    assert_forwarded(no_content, origin, 204)
    assert no_content.get("content-length") is None
    assert no_content.get("transfer-encoding") is None
    assert_forwarded(not_modified, origin, 304)
    assert not_modified.get("transfer-encoding") is None
    # Had any of them carried a body, these bytes would be misparsed.
    assert_forwarded(last, origin, 200)
    assert last.body == ONE_K


def test_hop_by_hop_headers_removed(kushi: Proxy, origin: Origin) -> None:
    mark = marker()
    hop = [
        ("Connection", "X-Foo, Keep-Alive"),
        ("X-Foo", "bar"),
        ("Keep-Alive", "timeout=5"),
        ("TE", "trailers"),
        ("Trailer", "X-Whatever"),
        ("Proxy-Authorization", "Basic dXNlcjpwYXNz"),
        ("Proxy-Connection", "keep-alive"),
    ]
    with Raw(kushi.port) as c:
        c.send(request("GET", origin.url(f"/headers?{mark}"), [*hop, ("X-End-To-End", "kept")]))
        resp = c.response()
    assert_forwarded(resp, origin, 200)
    names = {k.lower() for k, _ in resp.json()["headers"]}
    for name, _ in hop:
        assert name.lower() not in names, f"{name} reached the origin"
    assert "x-end-to-end" in names
    (got,) = origin.wait_for(mark)
    assert not header_names(got) & {k.lower() for k, _ in hop}


def test_via_added_on_request_and_response(kushi: Proxy, origin: Origin) -> None:
    mark = marker()
    with Raw(kushi.port) as c:
        c.send(request("GET", origin.url(f"/headers?{mark}"), [("Via", "1.1 upstream-cache")]))
        resp = c.response()
    assert_forwarded(resp, origin, 200)
    sent = [v for k, v in resp.json()["headers"] if k.lower() == "via"]
    # The client's Via is kept and kushi's hop appended (RFC 9110 section 7.6.3).
    assert sent[0] == "1.1 upstream-cache"
    assert re.fullmatch(r"1\.1 kushi-[0-9a-f]+", sent[-1])
    assert resp.get_all("via")[-1] == sent[-1]


@pytest.mark.parametrize("method", ["TRACE", "OPTIONS"])
def test_max_forwards_zero_answered_by_kushi(method: str, kushi: Proxy, origin: Origin) -> None:
    mark = marker()
    with Raw(kushi.port) as c:
        c.send(request(method, origin.url(f"/headers?{mark}"), [("Max-Forwards", "0")]))
        resp = c.response(method)
        # Then a normal request on the same connection, to know the origin is caught up.
        after = marker()
        c.send(request("GET", origin.url(f"/1k?{after}")))
        c.response()
    assert resp.status == 200
    assert resp.get("x-origin-name") is None
    ps = proxy_status(resp)
    assert "next-hop" not in ps and "Max-Forwards" in ps["details"]
    if method == "TRACE":
        assert resp.get("content-type") == "message/http"
        assert resp.body.startswith(f"TRACE {origin.url(f'/headers?{mark}')} ".encode())
    assert origin.wait_for(after) and origin.find(mark) == []
    assert kushi_record(kushi.proc, mark)["status"] == 200


@pytest.mark.parametrize("method", ["TRACE", "OPTIONS"])
def test_max_forwards_three_forwarded_with_two(method: str, kushi: Proxy, origin: Origin) -> None:
    mark = marker()
    with Raw(kushi.port) as c:
        c.send(request(method, origin.url(f"/headers?{mark}"), [("Max-Forwards", "3")]))
        resp = c.response(method)
    assert_forwarded(resp, origin, 200)
    (got,) = origin.wait_for(mark)
    assert header_values(got, "max-forwards") == ["2"]


def test_request_looping_back_into_kushi_refused_as_loop(kushi: Proxy) -> None:
    mark = marker()
    with Raw(kushi.port) as c:
        c.send(request("GET", f"http://127.0.0.1:{kushi.port}/?{mark}"))
        resp = c.response()
    assert_error(resp, 502, "proxy_loop_detected")
    assert kushi_record(kushi.proc, mark)["error"] == "proxy_loop_detected"
    # One record: the request never came back in through kushi's own listener.
    assert len([r for r in kushi.proc.json_records() if mark in r["target"]]) == 1


def test_request_with_own_via_is_refused_as_loop(kushi: Proxy, origin: Origin) -> None:
    with Raw(kushi.port) as c:
        c.send(request("GET", origin.url(f"/1k?{marker()}")))
        pseudonym = c.response().get_all("via")[-1].split()[1]
        mark = marker()
        c.send(request("GET", origin.url(f"/1k?{mark}"), [("Via", f"1.1 {pseudonym}")]))
        resp = c.response()
    assert_error(resp, 502, "proxy_loop_detected")
    assert kushi_record(kushi.proc, mark)["error"] == "proxy_loop_detected"
    assert origin.find(mark) == []


def ws_frame(opcode: int, payload: bytes, mask: bytes) -> bytes:
    assert len(payload) < 126
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes([0x80 | opcode, 0x80 | len(payload)]) + mask + masked


def test_websocket_upgrade_relayed(own_kushi: Any, origin: Origin) -> None:
    # An upgraded connection is a tunnel: the origin's port must be a CONNECT port.
    kushi = own_kushi("--connect-ports", f"443,{origin.port}")
    key = base64.b64encode(os.urandom(16)).decode()
    mark = marker()
    with Raw(kushi.port) as c:
        c.send(
            request(
                "GET",
                origin.url(f"/ws?{mark}"),
                [
                    ("Upgrade", "websocket"),
                    ("Connection", "Upgrade"),
                    ("Sec-WebSocket-Key", key),
                    ("Sec-WebSocket-Version", "13"),
                ],
            )
        )
        resp = c.head()
        assert resp.status == 101, resp
        assert (resp.get("upgrade") or "").lower() == "websocket"
        assert "upgrade" in (resp.get("connection") or "").lower()
        accept = hashlib.sha1((key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest()
        assert resp.get("sec-websocket-accept") == base64.b64encode(accept).decode()
        assert proxy_status(resp)["next-hop"] == origin.hop
        c.send(ws_frame(0x1, b"hello over IPv6", os.urandom(4)))
        assert c.read_exactly(2) == bytes([0x81, len(b"hello over IPv6")])
        assert c.read_exactly(len(b"hello over IPv6")) == b"hello over IPv6"
        c.send(ws_frame(0x8, (1000).to_bytes(2, "big"), os.urandom(4)))
        assert c.read_exactly(4) == b"\x88\x02\x03\xe8"
        assert c.at_eof()
    (got,) = origin.wait_for(mark)
    assert got["family"] == "ipv6"
    assert header_values(got, "upgrade") == ["websocket"]


def test_origin_form_request_gets_kushi_own_page(kushi: Proxy, workdir: Path) -> None:
    res = curl(None, workdir, f"http://127.0.0.1:{kushi.port}/")
    assert res.returncode == 0, res.stderr
    assert res.final.status == 200
    assert b"This address is a proxy, not a web site" in res.body
    assert proxy_status(res.final)["details"] == "answered by kushi itself"
    other = curl(None, workdir, f"http://127.0.0.1:{kushi.port}/favicon.ico")
    assert other.final.status == 404


# --- Proxy-Status ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "status"),
    [("/1k", 200), ("/nothing-here", 404), ("/status/204", 204), ("/status/503", 503)],
)
def test_proxy_status_on_every_forwarded_response(
    path: str, status: int, kushi: Proxy, origin: Origin
) -> None:
    with Raw(kushi.port) as c:
        c.send(request("GET", origin.url(f"{path}?{marker()}")))
        resp = c.response()
    assert_forwarded(resp, origin, status)
    assert proxy_status(resp)["details"] == "ipv6"


def test_proxy_status_on_errors(kushi: Proxy, origin: Origin) -> None:
    closed = free_port("::1")
    cases = [
        (request("GET", f"http://[::1]:{closed}/?{marker()}"), 502, "connection_refused"),
        (request("GET", f"https://[::1]:{origin.port}/?{marker()}"), 400, "http_request_error"),
        (request("CONNECT", f"[::1]:{origin.port}", [("Host", "x")]), 403, "http_request_denied"),
        (b"GET nonsense HTTP/1.1\r\nHost: x\r\n\r\n", 400, "http_request_error"),
    ]
    for data, status, error_type in cases:
        with Raw(kushi.port) as c:
            c.send(data)
            resp = c.response()
        ps = assert_error(resp, status, error_type)
        assert resp.body.decode().startswith(f"{status} ")
        assert error_type in resp.body.decode()
        if error_type == "connection_refused":
            assert f"[::1]:{closed}" in ps["details"] and "refused" in ps["details"]


# --- egress policy ---------------------------------------------------------------------------


def test_egress_ipv6_only_refuses_ipv4_literal(own_kushi: Any, dual_origin: Origin) -> None:
    k = own_kushi("--egress", "ipv6-only")
    mark = marker()
    with Raw(k.port) as c:
        c.send(request("GET", f"http://127.0.0.1:{dual_origin.port}/headers?{mark}"))
        resp = c.response()
        c.send(request("GET", dual_origin.url(f"/headers?{marker()}")))
        ok = c.response()
    ps = assert_error(resp, 502, "destination_not_found")
    assert ps["details"] == "127.0.0.1 is an IPv4 address; egress policy is ipv6-only"
    assert "127.0.0.1 is an IPv4 address; egress policy is ipv6-only" in resp.body.decode()
    assert dual_origin.find(mark) == []
    assert_forwarded(ok, dual_origin, 200)
    assert kushi_record(k.proc, mark)["error"] == "destination_not_found"


def test_egress_ipv4_only_refuses_ipv6_literal(own_kushi: Any, dual_origin: Origin) -> None:
    k = own_kushi("--egress", "ipv4-only")
    mark = marker()
    with Raw(k.port) as c:
        c.send(request("GET", dual_origin.url(f"/headers?{mark}")))
        resp = c.response()
        c.send(request("GET", f"http://127.0.0.1:{dual_origin.port}/headers?{marker()}"))
        ok = c.response()
    ps = assert_error(resp, 502, "destination_not_found")
    assert ps["details"] == "::1 is an IPv6 address; egress policy is ipv4-only"
    assert dual_origin.find(mark) == []
    assert ok.status == 200 and proxy_status(ok)["next-hop"] == f"127.0.0.1:{dual_origin.port}"
    assert ok.json()["family"] == "ipv4"


def localhost_addresses() -> set[str]:
    return {str(info[4][0]) for info in socket.getaddrinfo("localhost", 80, 0, socket.SOCK_STREAM)}


def test_localhost_name_resolution_follows_the_system_resolver(
    kushi: Proxy, dual_origin: Origin
) -> None:
    """/etc/hosts decides: on this machine localhost may be 127.0.0.1 only."""
    addrs = localhost_addresses()
    family, hop = ("ipv6", f"[::1]:{dual_origin.port}")
    if "::1" not in addrs:
        family, hop = ("ipv4", f"127.0.0.1:{dual_origin.port}")
    mark = marker()
    with Raw(kushi.port) as c:
        c.send(request("GET", f"http://localhost:{dual_origin.port}/headers?{mark}"))
        resp = c.response()
    assert resp.status == 200
    assert proxy_status(resp)["next-hop"] == hop
    assert proxy_status(resp)["details"].startswith(family)
    assert resp.json()["family"] == family
    assert resp.json()["headers"][0] == ["Host", f"localhost:{dual_origin.port}"]
    rec = kushi_record(kushi.proc, mark)
    assert rec["family"] == family and rec["upstream"] == hop


def test_localhost_without_ipv6_address_under_ipv6_only(
    own_kushi: Any, dual_origin: Origin
) -> None:
    addrs = localhost_addresses()
    if any(":" in a for a in addrs):
        pytest.skip(f"localhost has an IPv6 address here: {sorted(addrs)}")
    k = own_kushi("--egress", "ipv6-only")
    with Raw(k.port) as c:
        c.send(request("GET", f"http://localhost:{dual_origin.port}/?{marker()}"))
        resp = c.response()
    ps = assert_error(resp, 502, "destination_not_found")
    assert ps["details"].startswith("localhost has no IPv6 address (only 127.0.0.1)")
    assert "egress policy is ipv6-only" in ps["details"]


# --- who may use it --------------------------------------------------------------------------


def test_client_not_in_allow_list_is_denied(own_kushi: Any, origin: Origin) -> None:
    k = own_kushi("--allow", "203.0.113.9/32")
    mark = marker()
    with Raw(k.port) as c:
        c.send(request("GET", origin.url(f"/headers?{mark}")))
        resp = c.response()
    ps = assert_error(resp, 403, "http_request_denied")
    assert "127.0.0.1" in ps["details"] and "allow list" in ps["details"]
    rec = kushi_record(k.proc, mark)
    assert rec["status"] == 403 and rec["error"] == "http_request_denied"
    assert rec["upstream"] == ""
    assert origin.find(mark) == []


# --- access log ------------------------------------------------------------------------------


def test_access_log_squid_format(own_kushi: Any, origin: Origin) -> None:
    k = own_kushi(fmt="")
    mark = marker()
    url = origin.url(f"/1k?{mark}")
    with Raw(k.port) as c:
        c.send(request("GET", url))
        resp = c.response()
    assert resp.status == 200
    deadline = time.monotonic() + 10
    while not (lines := [line for line in k.proc.log_lines() if mark in line]):
        assert time.monotonic() < deadline, k.proc.log_lines()
        time.sleep(0.02)
    fields = lines[0].split()
    # time elapsed client result/status bytes method URL user hierarchy type family up=N note
    assert re.fullmatch(r"\d+\.\d{3}", fields[0])
    assert fields[1].isdigit()
    assert fields[2] == "127.0.0.1"
    assert fields[3] == "TCP_MISS/200"
    assert int(fields[4]) > 1024  # head and body sent to the client
    assert fields[5:7] == ["GET", url]
    assert fields[7] == "-"
    assert fields[8] == "HIER_DIRECT/::1"  # Squid's hierarchy field: the address, no port
    assert fields[9] == "text/plain"
    assert fields[10] == "ipv6"
    assert re.fullmatch(r"up=\d+", fields[11])


def test_access_log_json_fields(kushi: Proxy, origin: Origin) -> None:
    mark = marker()
    url = origin.url(f"/bytes/4096?{mark}")
    with Raw(kushi.port) as c:
        c.send(request("GET", url))
        resp = c.response()
    rec = kushi_record(kushi.proc, mark)
    assert {
        "time",
        "listener",
        "mode",
        "client",
        "method",
        "target",
        "status",
        "bytes_in",
        "bytes_out",
        "duration_ms",
        "upstream",
        "family",
        "error",
        "details",
        "content_type",
        "attempts",
    } <= set(rec)
    assert rec["mode"] == "forward" and rec["listener"] == "forward"
    assert rec["client"] == "127.0.0.1" and rec["method"] == "GET" and rec["target"] == url
    assert rec["status"] == 200 and rec["error"] == ""
    assert rec["upstream"] == origin.hop and rec["family"] == "ipv6"
    assert rec["content_type"] == "application/octet-stream"
    assert resp.body == pattern_bytes(4096)
    assert rec["bytes_out"] > 4096 and rec["bytes_in"] > 0
    assert rec["attempts"] == []
    assert rec["duration_ms"] >= 0 and abs(rec["time"] - time.time()) < 600
