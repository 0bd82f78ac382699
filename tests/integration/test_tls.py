"""TLS listeners (issue 11 item 6): an ``https://`` forward proxy and TLS termination in
front of a plain-HTTP backend, on loopback, with curl and Python's ``ssl`` as the clients.

Certificates come from the session's test CA (``tls_ca`` in conftest, made with
``trustme``, i.e. ``cryptography``). The namespace proof (IPv4-only client, dual-stack kushi,
IPv6-only origin, Chromium) is in ``tests/e2e/test_tls_netns.py``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
import urllib.request
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import bcrypt
import pytest

from support import socksclient
from support.kushi_proc import Kushi, free_port, run_kushi, write_toml
from support.origin import OriginProcess
from support.tcpserver import ThreadedServer

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed"),
]

KushiFactory = Callable[..., Kushi]
OriginFactory = Callable[..., OriginProcess]


@pytest.fixture
def kushi_factory(tmp_path: Path) -> Iterator[KushiFactory]:
    started: list[Kushi] = []

    def factory(argv: Sequence[str], **kw: Any) -> Kushi:
        with warnings.catch_warnings():  # Popen gets open() files that Kushi never closes
            warnings.simplefilter("ignore", ResourceWarning)
            kushi = Kushi(list(argv), tmp_path, **kw)
        started.append(kushi)
        kushi.wait_ready()
        return kushi

    yield factory
    codes = [k.stop() for k in started]
    assert codes == [0] * len(codes), [k.stderr[-2000:] for k in started]


def client_context(ca: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def tls_connect(port: int, ca: Path, host: str = "127.0.0.1") -> ssl.SSLSocket:
    raw = socket.create_connection((host, port), timeout=10)
    return client_context(ca).wrap_socket(raw, server_hostname="localhost")


def fingerprint(port: int, ca: Path) -> str:
    with tls_connect(port, ca) as sock:
        der = sock.getpeercert(binary_form=True)
    assert der is not None
    return hashlib.sha256(der).hexdigest()


def read_response(sock: socket.socket) -> tuple[int, bytes]:
    """One response with Content-Length (the head and the body)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk
        body += chunk
    return int(head.split()[1]), body


def curl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["curl", "-sS", "--max-time", "20", *args],
        capture_output=True,
        text=True,
        errors="surrogateescape",
        timeout=30,
    )


def scrape(admin_port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics", timeout=5) as resp:
        return str(resp.read().decode())


def tls_flags(tls_ca: Any) -> list[str]:
    return ["--tls-cert", str(tls_ca.cert_chain), "--tls-key", str(tls_ca.key)]


# --- the https:// forward proxy -----------------------------------------------------------


def test_https_proxy_forwards_http_and_connect_inside_tls(
    kushi_factory: KushiFactory, origin_factory: OriginFactory, tls_ca: Any
) -> None:
    """curl ``-x https://`` with ``--proxy-cacert``: a plain-HTTP request and a CONNECT
    tunnel (to a TLS origin) both travel inside the TLS connection to kushi, and the access
    log says the client came over TLS."""
    origin = origin_factory(["127.0.0.1:0"])
    tls_origin = origin_factory(["127.0.0.1:0"], tls=tls_ca, name="tls-origin")
    port = free_port()
    kushi = kushi_factory(
        [
            "serve",
            "--listen",
            f"127.0.0.1:{port}",
            *tls_flags(tls_ca),
            "--connect-ports",
            str(tls_origin.port),
            "--access-log-format",
            "json",
            "--admin-listen",
            "off",
        ]
    )
    proxy = ["-x", f"https://localhost:{port}", "--proxy-cacert", str(tls_ca.ca_pem)]
    plain = curl(*proxy, "-o", "/dev/null", "-w", "%{http_code}", origin.url("/1k"))
    assert plain.stdout == "200", plain.stderr
    tunnel = curl(*proxy, "--cacert", str(tls_ca.ca_pem), tls_origin.url("/bytes/300000"))
    assert tunnel.returncode == 0, tunnel.stderr
    assert len(tunnel.stdout.encode("utf-8", "surrogateescape")) == 300000
    get = kushi.record_where(method="GET")
    assert get["tls"].startswith("TLSv1.") and get["status"] == 200
    connect = kushi.record_where(method="CONNECT")
    assert connect["tls"].startswith("TLSv1.") and connect["status"] == 200
    assert connect["bytes_out"] > 300000
    # The origins were reached in clear (HTTP) and over the tunnel's own TLS.
    assert origin.requests()[0]["tls"] is False
    assert tls_origin.requests()[0]["tls"] is True
    # The same listener refuses curl's plain-HTTP proxying: it speaks only TLS.
    clear = curl("-x", f"http://127.0.0.1:{port}", "-o", "/dev/null", origin.url("/1k"))
    assert clear.returncode != 0
    assert len(origin.requests()) == 1


def test_proxy_authorization_over_tls(
    kushi_factory: KushiFactory, origin_factory: OriginFactory, tls_ca: Any, tmp_path: Path
) -> None:
    """``auth_file`` on a TLS listener: 407 without credentials, the origin reached with
    them; the password crossed the network only inside TLS (and is not logged)."""
    htpasswd = tmp_path / "users.htpasswd"
    hashed = bcrypt.hashpw(b"s3cret", bcrypt.gensalt(rounds=4)).decode()
    htpasswd.write_text(f"alice:{hashed}\n")
    origin = origin_factory(["127.0.0.1:0"])
    port = free_port()
    kushi = kushi_factory(
        [
            "serve",
            "--listen",
            f"127.0.0.1:{port}",
            *tls_flags(tls_ca),
            "--auth-file",
            str(htpasswd),
            "--access-log-format",
            "json",
            "--admin-listen",
            "off",
        ]
    )
    proxy = ["-x", f"https://localhost:{port}", "--proxy-cacert", str(tls_ca.ca_pem)]
    none = curl(*proxy, "-o", "/dev/null", "-w", "%{http_code}", origin.url("/1k"))
    assert none.stdout == "407"
    wrong = curl(*proxy, "-U", "alice:nope", "-o", "/dev/null", "-w", "%{http_code}", origin.url())
    assert wrong.stdout == "407"
    good = curl(*proxy, "-U", "alice:s3cret", "-o", "/dev/null", "-w", "%{http_code}", origin.url())
    assert good.stdout == "404"  # the origin's answer for "/": it was reached
    record = kushi.record_where(user="alice")
    assert record["tls"].startswith("TLSv1.")
    assert "s3cret" not in kushi.stdout + kushi.stderr
    assert len(origin.requests()) == 1


class _SayByeAndClose(ThreadedServer):
    """Reads a line, answers ``bye\\n`` and closes: the tunnel must end at the client."""

    def serve(self, conn: socket.socket, number: int) -> None:
        conn.recv(100)
        conn.sendall(b"bye\n")


def test_connect_tunnel_over_tls_ends_when_the_upstream_closes(
    kushi_factory: KushiFactory, tls_ca: Any
) -> None:
    """TLS has no TCP-style half-close in asyncio: kushi sends close_notify, and a tunnel
    whose upstream closes ends at the TLS client too, with every byte delivered."""
    server = _SayByeAndClose("127.0.0.1")
    try:
        port = free_port()
        kushi_factory(
            [
                "serve",
                "--listen",
                f"127.0.0.1:{port}",
                *tls_flags(tls_ca),
                "--connect-ports",
                str(server.port),
                "--admin-listen",
                "off",
            ]
        )
        with tls_connect(port, tls_ca.ca_pem) as sock:
            sock.sendall(f"CONNECT 127.0.0.1:{server.port} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            head = b""
            while b"\r\n\r\n" not in head:
                head += sock.recv(1)
            assert head.startswith(b"HTTP/1.1 200"), head
            sock.sendall(b"hello\n")
            started = time.monotonic()
            received = b""
            while True:
                chunk = sock.recv(100)
                if not chunk:
                    break
                received += chunk
            assert received == b"bye\n"
            assert time.monotonic() - started < 5
    finally:
        server.close()


def test_socks5_is_served_inside_tls(kushi_factory: KushiFactory, tls_ca: Any) -> None:
    """A forward TLS listener tells SOCKS5 from HTTP by the first byte inside TLS."""
    server = _SayByeAndClose("127.0.0.1")
    try:
        port = free_port()
        kushi_factory(
            [
                "serve",
                "--listen",
                f"127.0.0.1:{port}",
                *tls_flags(tls_ca),
                "--connect-ports",
                str(server.port),
                "--admin-listen",
                "off",
            ]
        )
        with tls_connect(port, tls_ca.ca_pem) as sock:
            assert socksclient.greet(sock) == b"\x05\x00"
            reply = socksclient.request(sock, "127.0.0.1", server.port)
            assert reply is not None and reply[0] == 0, reply
            sock.sendall(b"hi\n")
            assert socksclient.recv_exact(sock, 4) == b"bye\n"
    finally:
        server.close()


def test_tls_12_minimum_and_alpn_http11(kushi_factory: KushiFactory, tls_ca: Any) -> None:
    port = free_port()
    kushi_factory(
        ["serve", "--listen", f"127.0.0.1:{port}", *tls_flags(tls_ca), "--admin-listen", "off"]
    )
    with tls_connect(port, tls_ca.ca_pem) as sock:
        assert sock.selected_alpn_protocol() == "http/1.1"
    tls12 = client_context(tls_ca.ca_pem)
    tls12.maximum_version = ssl.TLSVersion.TLSv1_2
    with socket.create_connection(("127.0.0.1", port), 5) as raw:
        with tls12.wrap_socket(raw, server_hostname="localhost") as sock:
            assert sock.version() == "TLSv1.2"
    # A TLS 1.1 client (allowed to offer it at OpenSSL security level 0): kushi's own
    # protocol_version alert refuses it, not the client's library.
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old.check_hostname = False
    old.verify_mode = ssl.CERT_NONE
    old.set_ciphers("DEFAULT:@SECLEVEL=0")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        old.minimum_version = ssl.TLSVersion.TLSv1_1
        old.maximum_version = ssl.TLSVersion.TLSv1_1
    raw = socket.create_connection(("127.0.0.1", port), 5)
    with old.wrap_socket(raw, do_handshake_on_connect=False) as sock:
        with pytest.raises(ssl.SSLError) as refused:
            sock.do_handshake()
    assert "ALERT_PROTOCOL_VERSION" in str(refused.value), refused.value
    # A client offering only h2 is told no protocol (no ALPN in the answer): kushi does
    # not pretend to speak HTTP/2.
    h2 = client_context(tls_ca.ca_pem)
    h2.set_alpn_protocols(["h2"])
    with socket.create_connection(("127.0.0.1", port), 5) as raw:
        with h2.wrap_socket(raw, server_hostname="localhost") as sock:
            assert sock.selected_alpn_protocol() is None


# --- plain text and stalled clients on the TLS port ---------------------------------------


def test_plain_text_on_the_tls_port_is_never_forwarded(
    kushi_factory: KushiFactory, origin_factory: OriginFactory, tls_ca: Any
) -> None:
    """An HTTP request and garbage sent in clear to the TLS port: the handshake fails, the
    connection is closed, nothing reaches the origin, each is logged and counted."""
    origin = origin_factory(["127.0.0.1:0"])
    port, admin = free_port(), free_port()
    kushi = kushi_factory(
        [
            "serve",
            "--listen",
            f"127.0.0.1:{port}",
            *tls_flags(tls_ca),
            "--access-log-format",
            "json",
            "--admin-listen",
            f"127.0.0.1:{admin}",
        ]
    )
    # A port check (connect, close, nothing sent) is no handshake failure: not logged.
    socket.create_connection(("127.0.0.1", port), timeout=5).close()
    for data in (
        f"GET {origin.url('/1k')} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode(),
        os.urandom(600),
    ):
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(data)
            answer = b""
            try:
                while chunk := sock.recv(65536):
                    answer += chunk
            except ConnectionResetError:
                pass  # closed with unread bytes: a reset
            assert b"HTTP/" not in answer  # at most a TLS alert, never an HTTP answer
    records = kushi.wait_records(2)
    tls_errors = [r for r in records if r["method"] == "TLS"]
    assert len(tls_errors) == 2, records
    assert all(r["error"] == "tls_protocol_error" for r in tls_errors)
    assert origin.requests() == []
    # A real client for comparison: the status page says it came over TLS.
    ok = curl(
        "-x",
        f"https://localhost:{port}",
        "--proxy-cacert",
        str(tls_ca.ca_pem),
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        origin.url("/1k"),
    )
    assert ok.stdout == "200", ok.stderr
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/api/status", timeout=5) as resp:
        recent = json.loads(resp.read())["recent"]
    assert [r["tls"][:6] for r in recent if r["method"] == "GET"] == ["TLSv1."]
    metrics = scrape(admin)
    assert (
        'kushi_tls_handshake_failures_total{listener="forward",mode="forward",reason="failed"} 2.0'
        in metrics
    )
    assert 'kushi_listener_info{listener="forward",mode="forward",tls="yes"} 1.0' in metrics


def test_client_stopping_mid_handshake_is_closed_after_the_header_timeout(
    kushi_factory: KushiFactory, tls_ca: Any, tmp_path: Path
) -> None:
    """Half a ClientHello, then silence: closed at ``timeouts.header_read``; meanwhile
    other clients are served (a stalled handshake holds no worker)."""
    port = free_port()
    config = tmp_path / "kushi.toml"
    write_toml(
        config,
        {
            "listen": [f"127.0.0.1:{port}"],
            "tls_cert": str(tls_ca.cert_chain),
            "tls_key": str(tls_ca.key),
            "access_log_format": "json",
            "admin_listen": "off",
            "timeouts": {"header_read": 1.5},
        },
    )
    kushi = kushi_factory(["serve", "--config", str(config)])
    # A real ClientHello, cut in half.
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    hello = client_context(tls_ca.ca_pem).wrap_bio(incoming, outgoing, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        hello.do_handshake()
    client_hello = outgoing.read()
    stalled = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        stalled.sendall(client_hello[: len(client_hello) // 2])
        started = time.monotonic()
        for _ in range(3):  # served while the first one stalls
            assert fingerprint(port, tls_ca.ca_pem)
        assert stalled.recv(100) == b""
        waited = time.monotonic() - started
        assert 1.0 < waited < 6.0, waited
    finally:
        stalled.close()
    record = kushi.record_where(method="TLS")
    assert record["status"] == 408 and record["error"] == "tls_protocol_error"
    assert "header_read" in record["details"]


# --- reload: the certificate is re-read on SIGHUP --------------------------------------


def test_certificate_swapped_on_sighup(
    kushi_factory: KushiFactory, origin_factory: OriginFactory, tls_ca: Any, tmp_path: Path
) -> None:
    """New files at the same paths, then SIGHUP: new handshakes present the new certificate
    (its fingerprint), a connection opened before keeps working, the listener never stops.
    A broken key on the next SIGHUP keeps the running certificate and says so in one line."""
    origin = origin_factory(["127.0.0.1:0"])
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    first_cert, first_key = tls_ca.issue("localhost", "127.0.0.1", stem="first")
    second_cert, second_key = tls_ca.issue("localhost", "127.0.0.1", stem="second")
    shutil.copy(first_cert, cert)
    shutil.copy(first_key, key)
    port = free_port()
    kushi = kushi_factory(
        [
            "serve",
            "--listen",
            f"127.0.0.1:{port}",
            "--tls-cert",
            str(cert),
            "--tls-key",
            str(key),
            "--admin-listen",
            "off",
        ]
    )
    before = fingerprint(port, tls_ca.ca_pem)
    old = tls_connect(port, tls_ca.ca_pem)
    try:
        request = f"GET {origin.url('/1k')} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
        old.sendall(request)
        assert read_response(old)[0] == 200
        shutil.copy(second_cert, cert)
        shutil.copy(second_key, key)
        kushi.signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while "config reloaded" not in kushi.stderr and time.monotonic() < deadline:
            time.sleep(0.05)
        after = fingerprint(port, tls_ca.ca_pem)
        assert after != before
        with open(second_cert, "rb") as fh:
            pem = fh.read().decode()
        leaf = ssl.PEM_cert_to_DER_cert(pem[: pem.index("-----END CERTIFICATE-----") + 25])
        assert after == hashlib.sha256(leaf).hexdigest()
        # The connection accepted before the reload goes on, under the old certificate.
        old.sendall(request)
        assert read_response(old)[0] == 200
        # A key that does not match: the reload fails, the running certificate stays.
        shutil.copy(first_key, key)
        kushi.signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while "reload failed" not in kushi.stderr and time.monotonic() < deadline:
            time.sleep(0.05)
        failed = [line for line in kushi.stderr.splitlines() if "reload failed" in line]
        assert len(failed) == 1 and str(key) in failed[0] and "does not match" in failed[0]
        assert fingerprint(port, tls_ca.ca_pem) == after
        assert kushi.proc.poll() is None
    finally:
        old.close()


# --- reverse: TLS termination for IPv6 clients in front of a plain IPv4 backend ---------


def test_reverse_listener_terminates_tls_for_ipv6_clients(
    kushi_factory: KushiFactory, origin_factory: OriginFactory, tls_ca: Any
) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    origin = origin_factory(["127.0.0.1:0"])
    port = free_port("::1")
    kushi = kushi_factory(
        [
            "reverse",
            "--listen",
            f"[::1]:{port}",
            "--backend",
            f"http://127.0.0.1:{origin.port}",
            *tls_flags(tls_ca),
            "--access-log-format",
            "json",
            "--admin-listen",
            "off",
        ],
        loopback_destinations=False,
    )
    out = curl("--cacert", str(tls_ca.ca_pem), f"https://[::1]:{port}/headers")
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout)
    assert seen["family"] == "ipv4" and seen["tls"] is False  # plain HTTP over IPv4 behind
    request = origin.requests()[0]
    headers = {k.lower(): v for k, v in request["headers"]}
    assert headers["x-forwarded-proto"] == "https"
    assert "proto=https" in headers["forwarded"]
    assert headers["x-forwarded-for"] == "::1"
    record = kushi.record_where(method="GET")
    assert record["tls"].startswith("TLSv1.") and record["family"] == "ipv4"
    # Plain HTTP to the TLS port is not forwarded.
    clear = curl(f"http://[::1]:{port}/1k")
    assert clear.returncode != 0
    assert len(origin.requests()) == 1


# --- bad configuration ------------------------------------------------------------------


def test_bad_tls_files_are_one_line_config_errors(tls_ca: Any, tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    other_cert, other_key = tls_ca.issue("other.test", stem="other")
    encrypted = tmp_path / "encrypted.key"
    subprocess.run(
        [
            "openssl",
            "pkey",
            "-in",
            str(tls_ca.key),
            "-aes256",
            "-passout",
            "pass:x",
            "-out",
            str(encrypted),
        ],
        check=True,
        capture_output=True,
    )
    missing = tmp_path / "missing.pem"
    cert, key = str(tls_ca.cert_chain), str(tls_ca.key)
    cases = [
        (
            ["--tls-cert", str(missing), "--tls-key", key],
            ["tls_cert", str(missing), "no such file"],
        ),
        (
            ["--tls-cert", cert, "--tls-key", str(missing)],
            ["tls_key", str(missing), "no such file"],
        ),
        (["--tls-cert", str(garbage), "--tls-key", key], ["tls_cert", str(garbage)]),
        (["--tls-cert", cert, "--tls-key", str(garbage)], ["tls_key", str(garbage)]),
        (
            ["--tls-cert", cert, "--tls-key", str(other_key)],
            ["tls_key", str(other_key), "does not match"],
        ),
        (["--tls-cert", cert, "--tls-key", str(encrypted)], ["tls_key", "passphrase"]),
        (["--tls-cert", cert], ["tls_key", "tls_cert needs tls_key"]),
        (["--tls-cert", str(tmp_path), "--tls-key", key], ["tls_cert", "is a directory"]),
    ]
    for flags, words in cases:
        proc = run_kushi(["serve", "--listen", "127.0.0.1:0", *flags, "--admin-listen", "off"])
        assert proc.returncode == 2, (flags, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
        for word in words:
            assert word in lines[0], (word, lines[0])
    del other_cert


def test_tls_combinations_refused(tls_ca: Any, tmp_path: Path) -> None:
    """TLS on a socks or tcp listener, and TLS with proxy_protocol: config errors naming
    the keys."""
    config = tmp_path / "kushi.toml"
    write_toml(
        config,
        {"tls_cert": str(tls_ca.cert_chain), "tls_key": str(tls_ca.key)},
        [
            {
                "name": "lb",
                "mode": "reverse",
                "listen": ["127.0.0.1:0"],
                "backend": ["http://127.0.0.1:8080"],
                "proxy_protocol": True,
                "proxy_protocol_from": ["127.0.0.1"],
            }
        ],
    )
    proc = run_kushi(["config", "check", str(config)])
    assert proc.returncode == 2
    assert "listener lb: proxy_protocol" in proc.stderr and "tls_cert" in proc.stderr
    write_toml(
        config,
        {},
        [
            {
                "name": "s",
                "mode": "socks",
                "listen": ["127.0.0.1:0"],
                "tls_cert": str(tls_ca.cert_chain),
                "tls_key": str(tls_ca.key),
            }
        ],
    )
    proc = run_kushi(["config", "check", str(config)])
    assert proc.returncode == 2
    assert "listener s: tls_cert" in proc.stderr and "socks" in proc.stderr


def test_pac_file_says_https_for_a_tls_forward_listener(
    kushi_factory: KushiFactory, tls_ca: Any
) -> None:
    port, admin = free_port(), free_port()
    kushi_factory(
        [
            "serve",
            "--listen",
            f"127.0.0.1:{port}",
            *tls_flags(tls_ca),
            "--admin-listen",
            f"127.0.0.1:{admin}",
        ]
    )
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/proxy.pac", timeout=5) as resp:
        pac = resp.read().decode()
    assert f'"HTTPS 127.0.0.1:{port}"' in pac
    assert "PROXY" not in pac.split("return", 2)[-1]
