"""CONNECT tunnels through kushi, on loopback with real sockets.

The client is curl (``-p -x``) or a raw socket on 127.0.0.1; kushi listens on 127.0.0.1 with
``--connect-ports`` naming the origins' ports; the origins are bound to ``[::1]`` only, one of
them speaking TLS with a certificate from the ``tls_ca`` fixture. Every tunnel therefore
proves IPv6 egress, which the tests also read from the origin's log, kushi's JSON access log
and the ``Proxy-Status`` header of the ``200`` that opens the tunnel.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import struct
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from support.kushi_proc import Kushi, free_port
from support.origin import OriginProcess, pattern_sha256, spawn_origin
from support.rawhttp import Raw

pytestmark = pytest.mark.timeout(90)


@dataclass
class Setup:
    kushi: Kushi
    port: int
    plain: OriginProcess  # HTTP on [::1], CONNECT allowed
    tls: OriginProcess  # HTTPS on [::1], CONNECT allowed
    other: OriginProcess  # HTTP on [::1], CONNECT not allowed
    workdir: Path
    ca_pem: Path

    def connect_records(self, target: str) -> list[dict[str, Any]]:
        return [
            r
            for r in self.kushi.json_records()
            if r["method"] == "CONNECT" and r["target"] == target
        ]

    def wait_connect_records(self, target: str, count: int) -> list[dict[str, Any]]:
        deadline = time.monotonic() + 10
        while len(found := self.connect_records(target)) < count:
            assert time.monotonic() < deadline, self.kushi.log_lines()[-5:]
            time.sleep(0.02)
        return found


def hop(origin: OriginProcess) -> str:
    return f"[::1]:{origin.port}"


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, tls_ca: Any) -> Iterator[Setup]:
    workdir = tmp_path_factory.mktemp("connect")
    origins: list[OriginProcess] = []
    kushi: Kushi | None = None
    try:
        for name, tls in (("plain", None), ("tls", tls_ca), ("other", None)):
            origins.append(
                spawn_origin(
                    ["[::1]:0"],
                    workdir / f"{name}.jsonl",
                    name=name,
                    tls_cert=tls.cert_chain if tls else None,
                    tls_key=tls.key if tls else None,
                )
            )
        plain, tls_origin, other = origins
        port = free_port()
        kushi = Kushi(
            [
                "serve",
                "--listen",
                f"127.0.0.1:{port}",
                "--access-log-format",
                "json",
                "--connect-ports",
                f"{plain.port},{tls_origin.port}",
            ],
            workdir,
            wait_for=[("127.0.0.1", port)],
        )
        yield Setup(kushi, port, plain, tls_origin, other, workdir, tls_ca.ca_pem)
        assert kushi.stop() == 0
    finally:
        if kushi is not None:
            kushi.stop()
        for origin in origins:
            origin.stop()


# --- a raw client ----------------------------------------------------------------------------


def proxy_status(fields: dict[str, str]) -> dict[str, str]:
    parts = re.findall(r'(?:[^;"]|"(?:[^"\\]|\\.)*")+', fields["proxy-status"])
    out = {"name": parts[0].strip()}
    for part in parts[1:]:
        key, _, value = part.strip().partition("=")
        out[key] = value.strip('"')
    return out


def curl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["curl", "-sS", "--max-time", "60", *args], capture_output=True, text=True, timeout=80
    )


# --- tests -----------------------------------------------------------------------------------


def test_connect_to_allowed_port_tunnels(setup: Setup) -> None:
    target = hop(setup.plain)
    before = len(setup.connect_records(target))
    mark = uuid.uuid4().hex
    with Raw(setup.port) as c:
        status, fields = c.connect(target)
        assert status == 200
        ps = proxy_status(fields)
        assert ps["name"] == "kushi" and ps["next-hop"] == target
        assert "received-status" not in ps  # nothing was received from a next hop
        # The same connection now reaches the origin itself: send it an origin-form request.
        c.sock.sendall(f"GET /headers?{mark} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
        status, fields = c.head()
        seen = json.loads(c.body(fields))
    assert status == 200 and fields["x-origin-name"] == "plain"
    assert "via" not in fields and "proxy-status" not in fields  # a tunnel is not rewritten
    assert seen["target"] == f"/headers?{mark}" and seen["family"] == "ipv6"
    assert seen["client"] == "::1"
    rec = setup.wait_connect_records(target, before + 1)[-1]
    assert rec["status"] == 200 and rec["error"] == ""
    assert rec["upstream"] == target and rec["family"] == "ipv6"
    assert rec["bytes_in"] > 0 and rec["bytes_out"] > 0


def test_connect_tls_origin_with_curl_proxytunnel(setup: Setup) -> None:
    mark = uuid.uuid4().hex
    url = f"https://[::1]:{setup.tls.port}/headers?{mark}"
    headers, body = setup.workdir / "tls.hdr", setup.workdir / "tls.body"
    res = curl(
        "-p",
        "-x",
        f"http://127.0.0.1:{setup.port}",
        "--cacert",
        str(setup.ca_pem),
        "-D",
        str(headers),
        "-o",
        str(body),
        url,
    )
    assert res.returncode == 0, res.stderr
    blocks = [b for b in headers.read_bytes().decode().split("\r\n\r\n") if b]
    # curl shows the CONNECT answer first, then the origin's response from inside TLS.
    assert blocks[0].startswith("HTTP/1.1 200")
    assert f'next-hop="{hop(setup.tls)}"' in blocks[0]
    assert blocks[1].startswith("HTTP/1.1 200") and "X-Origin-Name: tls" in blocks[1]
    assert "Proxy-Status" not in blocks[1]  # kushi cannot see or touch what is inside TLS
    seen = json.loads(body.read_bytes())
    assert seen["tls"] is True and seen["family"] == "ipv6"
    assert seen["target"] == f"/headers?{mark}"
    (got,) = [r for r in setup.tls.requests() if mark in r["target"]]
    assert got["tls"] is True and got["client"] == "::1"


def test_connect_to_port_not_allowed_is_denied(setup: Setup) -> None:
    target = hop(setup.other)
    with Raw(setup.port) as c:
        status, fields = c.connect(target)
        body = c.body(fields).decode()
    assert status == 403
    ps = proxy_status(fields)
    assert ps["error"] == "http_request_denied"
    assert f"port {setup.other.port} is not allowed" in ps["details"]
    assert "http_request_denied" in body
    rec = setup.wait_connect_records(target, 1)[-1]
    assert rec["status"] == 403 and rec["error"] == "http_request_denied"
    assert rec["upstream"] == ""
    assert setup.other.requests() == []
    # curl reports the refusal as such.
    res = curl("-p", "-x", f"http://127.0.0.1:{setup.port}", f"http://{target}/1k")
    assert res.returncode != 0 and "403" in res.stderr


@pytest.mark.slow
def test_connect_large_upload_and_download_keep_sha256(setup: Setup) -> None:
    size = 64 * 1024 * 1024
    upload = setup.workdir / "upload-64m.bin"
    digest = hashlib.sha256()
    with open(upload, "wb") as fh:
        for _ in range(64):
            block = os.urandom(1024 * 1024)
            digest.update(block)
            fh.write(block)
    proxy = ["-p", "-x", f"http://127.0.0.1:{setup.port}"]
    base = f"http://{hop(setup.plain)}"
    up = curl(*proxy, "-H", "Expect:", "--data-binary", f"@{upload}", f"{base}/sha256")
    assert up.returncode == 0, up.stderr
    assert json.loads(up.stdout) == {"length": size, "sha256": digest.hexdigest()}
    download = setup.workdir / "download-64m.bin"
    down = curl(*proxy, "-o", str(download), f"{base}/bytes/{size}")
    assert down.returncode == 0, down.stderr
    got = hashlib.sha256()
    with open(download, "rb") as fh:
        while block := fh.read(1024 * 1024):
            got.update(block)
    assert got.hexdigest() == pattern_sha256(size)
    assert download.stat().st_size == size
    records = setup.wait_connect_records(hop(setup.plain), 2)
    assert any(r["bytes_in"] > size for r in records)
    assert any(r["bytes_out"] > size for r in records)
    upload.unlink()
    download.unlink()


def test_connect_half_close_client_still_gets_the_full_answer(setup: Setup) -> None:
    body = os.urandom(4 * 1024 * 1024 + 5)
    target = hop(setup.plain)
    with Raw(setup.port) as c:
        status, _ = c.connect(target)
        assert status == 200
        request = f"POST /sha256 HTTP/1.1\r\nHost: {target}\r\nContent-Length: {len(body)}\r\n"
        c.sock.sendall(request.encode() + b"\r\n" + body)
        c.sock.shutdown(socket.SHUT_WR)  # no more from the client; its read side stays open
        answer = c.rfile.read()  # everything up to EOF
    head, _, payload = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert json.loads(payload) == {"length": len(body), "sha256": hashlib.sha256(body).hexdigest()}


def test_a_tunnel_reset_by_the_client_is_logged_aborted(tmp_path: Path) -> None:
    """The client resets its CONNECT tunnel in the middle of a download: the record is
    TCP_TUNNEL_ABORTED/200 (Squid's tag) with the bytes that passed, logged at once."""
    origin = spawn_origin(["[::1]:0"], tmp_path / "origin.jsonl")
    port = free_port()
    kushi = Kushi(
        ["serve", "--listen", f"127.0.0.1:{port}", "--connect-ports", str(origin.port)],
        tmp_path,
    )
    try:
        kushi.wait_ready()
        n = 256 * 1024 * 1024
        with Raw(port) as c:
            assert c.connect(f"[::1]:{origin.port}")[0] == 200
            c.sock.sendall(f"GET /bytes/{n} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            c.rfile.read(1 << 20)
            c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        deadline = time.monotonic() + 5
        while not (lines := [x for x in kushi.log_lines() if " CONNECT " in x]):
            assert time.monotonic() < deadline, "no record 5 s after the reset"
            time.sleep(0.02)
        fields = lines[0].split()
        assert fields[3] == "TCP_TUNNEL_ABORTED/200" and 1 << 20 < int(fields[4]) < n, fields
    finally:
        assert kushi.stop() == 0, kushi.stderr[-2000:]
        origin.stop()
