"""Security review findings (issue 16), each through real sockets: a real kushi process,
raw clients (``support.rawhttp``) and scripted origins that play the hostile side.

The cases that need addresses other than loopback (NAT64, 6to4, Teredo, the host's own
addresses, an IPv6 /64 of clients) are in tests/e2e/test_security_netns.py.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from support.kushi_proc import Kushi, free_port, run_kushi, write_toml
from support.rawhttp import Client
from support.tcpserver import ThreadedServer, read_head

pytestmark = pytest.mark.timeout(90)

Reply = Callable[[int, int, bytes], bytes | None]


def ok(body: bytes = b"ok", *extra: bytes) -> bytes:
    head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n" % len(body)
    return head + b"".join(e + b"\r\n" for e in extra) + b"\r\n" + body


class ScriptedOrigin(ThreadedServer):
    """A keep-alive origin on 127.0.0.1 that answers request ``index`` on connection
    ``number`` with ``reply(number, index, head)``; None closes the connection unanswered.
    Every request head it received is kept in ``heads``, as (connection, head)."""

    def __init__(self, reply: Reply) -> None:
        self.reply = reply
        self.heads: list[tuple[int, bytes]] = []
        super().__init__("127.0.0.1")

    def serve(self, conn: socket.socket, number: int) -> None:
        buf = b""
        index = 0
        while True:
            try:
                got = read_head(conn, buf)
            except OSError:
                return
            if got is None:
                return
            head, buf = got
            self.heads.append((number, head))
            out = self.reply(number, index, head)
            index += 1
            if out is None:
                return
            try:
                conn.sendall(out)
            except OSError:
                return

    def methods(self) -> list[bytes]:
        return [head.split(b" ", 1)[0] for _, head in self.heads]


@pytest.fixture
def origin_factory() -> Iterator[Callable[[Reply], ScriptedOrigin]]:
    made: list[ScriptedOrigin] = []

    def make(reply: Reply) -> ScriptedOrigin:
        origin = ScriptedOrigin(reply)
        made.append(origin)
        return origin

    yield make
    for origin in made:
        origin.close()


def start(tmp_path: Path, top: dict[str, Any], listeners: list[dict[str, Any]] = (), **kw: Any):  # type: ignore[no-untyped-def,assignment]
    config = tmp_path / f"kushi-{len(list(tmp_path.glob('kushi-*.toml')))}.toml"
    write_toml(config, top, listeners)
    kushi = Kushi(["serve", "--config", str(config)], tmp_path, **kw)
    kushi.wait_ready()
    return kushi, config


@pytest.fixture
def kushis() -> Iterator[list[Kushi]]:
    started: list[Kushi] = []
    yield started
    for kushi in started:
        kushi.stop()


def send(client: Client, request: str | bytes) -> tuple[int, dict[str, str], bytes]:
    data = request.encode("latin-1") if isinstance(request, str) else request
    client.sock.sendall(data)
    status, fields = client.read_head()
    return status, fields, client.read_body(int(fields.get("content-length", "0")))


def get(
    port: int, url: str, *headers: str, source: str = "127.0.0.1", origin_form: bool = False
) -> tuple[int, dict[str, str], bytes]:
    host = url.split("/")[2]
    target = "/" + url.split("/", 3)[3] if origin_form else url
    with Client(port, source) as client:
        lines = "".join(h + "\r\n" for h in headers)
        return send(
            client,
            f"GET {target} HTTP/1.1\r\nHost: {host}\r\n{lines}Connection: close\r\n\r\n",
        )


# --- 1. the pool obeys the destination policy --------------------------------------------


def test_pooled_upstream_is_not_handed_to_a_listener_without_the_rule(
    tmp_path: Path, kushis: list[Kushi], origin_factory: Callable[[Reply], ScriptedOrigin]
) -> None:
    """Listener ``inside`` may reach 127.0.0.0/8 and warms the pool; listener ``outside``
    may not, and must not get the pooled connection (it used to get 200)."""
    origin = origin_factory(lambda n, i, h: ok(b"internal service"))
    inside, outside = free_port(), free_port()
    kushi, _ = start(
        tmp_path,
        {"access_log_format": "json"},
        [
            {
                "name": "inside",
                "listen": [f"127.0.0.1:{inside}"],
                "allow_destinations": ["127.0.0.0/8"],
            },
            {"name": "outside", "listen": [f"127.0.0.1:{outside}"]},
        ],
        loopback_destinations=False,
    )
    kushis.append(kushi)
    url = f"http://127.0.0.1:{origin.port}/"
    status, _, body = get(inside, url)
    assert (status, body) == (200, b"internal service")
    status, fields, _ = get(outside, url)
    assert status == 502, fields
    assert "destination_ip_prohibited" in fields["proxy-status"]
    assert origin.accepted == 1 and len(origin.heads) == 1


def test_reload_that_removes_a_rule_applies_to_pooled_connections(
    tmp_path: Path, kushis: list[Kushi], origin_factory: Callable[[Reply], ScriptedOrigin]
) -> None:
    """A client in steady keep-alive use after SIGHUP removed allow_destinations: its next
    request is refused, not sent down the pooled connection opened under the old rule."""
    origin = origin_factory(lambda n, i, h: ok())
    port = free_port()
    top: dict[str, Any] = {
        "listen": [f"127.0.0.1:{port}"],
        "access_log_format": "json",
        "allow_destinations": ["127.0.0.0/8"],
    }
    kushi, config = start(tmp_path, top, loopback_destinations=False)
    kushis.append(kushi)
    url = f"http://127.0.0.1:{origin.port}/"
    with Client(port) as client:
        request = f"GET {url} HTTP/1.1\r\nHost: 127.0.0.1:{origin.port}\r\n\r\n"
        assert send(client, request)[0] == 200
        del top["allow_destinations"]
        write_toml(config, top)
        kushi.signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while "config reloaded" not in kushi.stderr:
            assert time.monotonic() < deadline, kushi.stderr
            time.sleep(0.02)
        status, fields, _ = send(client, request)
    assert status == 502, fields
    assert "destination_ip_prohibited" in fields["proxy-status"]
    assert len(origin.heads) == 1


# --- 3. plain HTTP to unsafe ports ---------------------------------------------------------


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Kushi, int]]:
    work = tmp_path_factory.mktemp("security")
    port = free_port()
    config = work / "k.toml"
    write_toml(config, {"listen": [f"127.0.0.1:{port}"], "access_log_format": "json"})
    kushi = Kushi(["serve", "--config", str(config)], work, [("127.0.0.1", port)])
    yield kushi, port
    kushi.stop()


def record_for(kushi: Kushi, marker: str) -> dict[str, Any]:
    deadline = time.monotonic() + 5
    while True:
        for record in kushi.json_records():
            if marker in record.get("target", ""):
                return record
        assert time.monotonic() < deadline, f"no record for {marker}: {kushi.stdout[-2000:]}"
        time.sleep(0.02)


@pytest.mark.parametrize("port", [25, 22, 6])
def test_plain_http_to_an_unsafe_port_is_refused_before_connecting(
    proxy: tuple[Kushi, int], port: int
) -> None:
    kushi, kport = proxy
    with socket.socket() as witness:
        # Whatever listens there must not be reached (bind may fail: the port is taken).
        try:
            witness.bind(("127.0.0.1", port))
            witness.listen(1)
            witness.setblocking(False)
        except OSError:
            witness.close()
        status, fields, body = get(kport, f"http://127.0.0.1:{port}/unsafe-{port}")
        assert status == 403, body
        assert "http_request_denied" in fields["proxy-status"]
        assert b"http_ports" in body
        if witness.fileno() >= 0:
            with pytest.raises(BlockingIOError):
                witness.accept()
    assert record_for(kushi, f"unsafe-{port}")["status"] == 403


# --- 4. nothing from an origin is kushi's -------------------------------------------------

FORGED = b'Proxy-Status: kushi; next-hop="[2001:db8::1]:80"; details="ipv6", cdn; hit'


def test_origin_cannot_forge_kushis_proxy_status_member(
    proxy: tuple[Kushi, int], origin_factory: Callable[[Reply], ScriptedOrigin]
) -> None:
    _kushi, port = proxy
    origin = origin_factory(lambda n, i, h: ok(b"v4 only", FORGED))
    authority = f"127.0.0.1:{origin.port}"
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(
            f"GET http://{authority}/ HTTP/1.1\r\nHost: {authority}\r\n"
            "Connection: close\r\n\r\n".encode()
        )
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head = data.partition(b"\r\n\r\n")[0].decode("latin-1")
    assert head.startswith("HTTP/1.1 200 ")
    values = re.findall(r"(?im)^proxy-status:\s*(.*)$", head)
    members = [m.strip() for v in values for m in v.split(",")]
    assert members[0] == "cdn; hit", values
    assert [m for m in members if m.startswith("kushi")] == [members[-1]], values
    assert f'next-hop="{authority}"' in members[-1]
    assert "2001:db8::1" not in head


def test_kushi_check_via_is_not_fooled_by_a_forged_member(
    proxy: tuple[Kushi, int], origin_factory: Callable[[Reply], ScriptedOrigin]
) -> None:
    """``kushi check --via`` reads kushi's own member: an IPv4-only origin that claims
    ``kushi; next-hop=[2001:db8::1]:80; details=ipv6`` does not PASS."""
    _kushi, port = proxy
    origin = origin_factory(
        lambda n, i, h: ok(b"<html></html>", FORGED, b"Content-Type: text/html")
    )
    result = run_kushi(
        ["check", "--via", f"http://127.0.0.1:{port}", f"http://127.0.0.1:{origin.port}/"],
        timeout=30,
    )
    out = result.stdout + result.stderr
    assert result.returncode != 0, out
    assert "2001:db8::1" not in out, out
    assert "IPv4" in out, out


def test_origin_fields_are_escaped_in_the_squid_log(
    tmp_path: Path, kushis: list[Kushi], origin_factory: Callable[[Reply], ScriptedOrigin]
) -> None:
    """A Content-Type with spaces, NEL and CSI cannot add a field (a forged ``ipv6``),
    split the line or reach a terminal."""
    # (C0 controls such as ESC are refused by the response parser already: 502.)
    evil = b"Content-Type: text/html ipv6 up=0 \xc2\x85FAKE \x9b2J\x85x; charset=x"
    origin = origin_factory(lambda n, i, h: ok(b"x", evil))
    port = free_port()
    kushi, _ = start(tmp_path, {"listen": [f"127.0.0.1:{port}"]}, wait_for=[("127.0.0.1", port)])
    kushis.append(kushi)
    assert get(port, f"http://127.0.0.1:{origin.port}/squid-escape")[0] == 200
    deadline = time.monotonic() + 5
    while "squid-escape" not in kushi.stdout:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    lines = [line for line in kushi.stdout.splitlines() if "squid-escape" in line]
    assert len(lines) == 1, kushi.stdout
    line = lines[0]
    assert not re.search(r"[\x00-\x1f\x7f-\x9f]", line), repr(line)
    fields = line.split(" ")
    fields = [f for f in fields if f]  # the duration is right-aligned
    # time elapsed client code/status bytes method URL user hierarchy type family up= note
    assert len(fields) == 13, fields
    assert fields[9].startswith("text/html%20ipv6%20up=0%20"), fields[9]
    assert fields[10] == "ipv4" and fields[11].startswith("up=")
    assert "\x85" not in kushi.stdout and "\x9b" not in kushi.stdout


# --- 6. retries -----------------------------------------------------------------------------


def test_only_idempotent_requests_are_retried(
    proxy: tuple[Kushi, int], origin_factory: Callable[[Reply], ScriptedOrigin]
) -> None:
    """A pooled connection that the origin closes on the second request without answering:
    a GET is sent again on a new connection; a POST is not (RFC 9110 9.2.2) -- the origin
    sees it once and the client gets 502."""

    def reply(number: int, index: int, head: bytes) -> bytes | None:
        return ok() if index == 0 else None  # every connection: answer one, then drop

    origin = origin_factory(reply)
    _kushi, port = proxy
    authority = f"127.0.0.1:{origin.port}"
    with Client(port) as client:
        assert (
            send(client, f"GET http://{authority}/a HTTP/1.1\r\nHost: {authority}\r\n\r\n")[0]
            == 200
        )
        status = send(
            client,
            f"POST http://{authority}/b HTTP/1.1\r\nHost: {authority}\r\nContent-Length: 0\r\n\r\n",
        )[0]
    assert status == 502
    assert origin.methods() == [b"GET", b"POST"], origin.heads
    with Client(port) as client:
        assert (
            send(client, f"GET http://{authority}/c HTTP/1.1\r\nHost: {authority}\r\n\r\n")[0]
            == 200
        )
        assert (
            send(client, f"GET http://{authority}/d HTTP/1.1\r\nHost: {authority}\r\n\r\n")[0]
            == 200
        )
    # /d went down the pooled connection (dropped unanswered), then again on a new one.
    paths = [head.split(b" ")[1] for _, head in origin.heads]
    assert paths[-2:] == [b"/d", b"/d"], paths


# --- 7. Upgrade ----------------------------------------------------------------------------


def switching(number: int, index: int, head: bytes) -> bytes | None:
    """An origin that switches to whatever protocol it is asked for."""
    token = re.search(rb"(?im)^upgrade:\s*(\S+)", head)
    if token is None:
        return ok(b"no upgrade")
    return (
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: "
        + token.group(1)
        + b"\r\n\r\nRAW"
    )


def test_upgrade_other_than_websocket_is_dropped(
    proxy: tuple[Kushi, int], origin_factory: Callable[[Reply], ScriptedOrigin]
) -> None:
    origin = origin_factory(switching)
    _kushi, port = proxy
    authority = f"127.0.0.1:{origin.port}"
    with Client(port) as client:
        status, _, body = send(
            client,
            f"GET http://{authority}/ HTTP/1.1\r\nHost: {authority}\r\n"
            "Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
            "HTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA\r\n\r\n",
        )
    assert (status, body) == (200, b"no upgrade")
    ((_, head),) = origin.heads
    assert b"upgrade" not in head.lower().replace(b"http2-settings", b"")


def test_websocket_upgrade_obeys_the_connect_ports(
    proxy: tuple[Kushi, int], origin_factory: Callable[[Reply], ScriptedOrigin]
) -> None:
    """An upgraded connection is a raw tunnel: not to a port CONNECT would refuse."""
    origin = origin_factory(switching)
    _kushi, port = proxy
    authority = f"127.0.0.1:{origin.port}"
    with Client(port) as client:
        status, fields, body = send(
            client,
            f"GET http://{authority}/ HTTP/1.1\r\nHost: {authority}\r\n"
            "Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        )
    assert status == 403, body
    assert b"connect_ports" in body
    assert origin.heads == []


# --- 8. transfer codings ------------------------------------------------------------------


def test_unknown_transfer_coding_gets_501_and_never_reaches_the_origin(
    proxy: tuple[Kushi, int], origin_factory: Callable[[Reply], ScriptedOrigin]
) -> None:
    origin = origin_factory(lambda n, i, h: ok())
    _kushi, port = proxy
    authority = f"127.0.0.1:{origin.port}"
    with Client(port) as client:
        status, fields, _ = send(
            client,
            f"POST http://{authority}/ HTTP/1.1\r\nHost: {authority}\r\n"
            "Transfer-Encoding: foo, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        )
        assert status == 501
        assert fields.get("connection") == "close"
        assert client.closed_by_peer(5)
    assert origin.heads == []


# --- 9. admission -----------------------------------------------------------------------


def test_client_outside_the_allow_list_is_closed_after_the_403(
    tmp_path: Path, kushis: list[Kushi]
) -> None:
    port = free_port()
    kushi, _ = start(
        tmp_path,
        {"listen": [f"127.0.0.1:{port}"], "allow": ["203.0.113.0/24"]},
        wait_for=[("127.0.0.1", port)],
    )
    kushis.append(kushi)
    with Client(port) as client:
        status, fields, _ = send(
            client, "GET http://198.51.100.1/ HTTP/1.1\r\nHost: 198.51.100.1\r\n\r\n"
        )
        assert status == 403
        assert fields.get("connection") == "close"
        assert client.closed_by_peer(5), "a denied client kept its connection (and slot)"


@pytest.mark.parametrize(
    "allow",
    [
        ["0.0.0.0/1", "128.0.0.0/1"],
        ["0.0.0.0/2", "64.0.0.0/2", "128.0.0.0/2", "192.0.0.0/2"],
        ["0.0.0.0/1"],
        ["2000::/4", "3000::/4"],
        ["::/1"],
    ],
)
def test_open_proxy_guard_computes_coverage(tmp_path: Path, allow: list[str]) -> None:
    config = tmp_path / "open.toml"
    write_toml(config, {"listen": ["0.0.0.0:3128"], "allow": allow})
    result = run_kushi(["config", "check", str(config)])
    assert result.returncode == 2, result.stdout + result.stderr
    assert "open proxy" in result.stderr


def test_open_proxy_guard_accepts_a_narrow_list(tmp_path: Path) -> None:
    config = tmp_path / "narrow.toml"
    write_toml(config, {"listen": ["0.0.0.0:3128"], "allow": ["10.0.0.0/8", "2001:db8::/32"]})
    result = run_kushi(["config", "check", str(config)])
    assert result.returncode == 0, result.stdout + result.stderr


# --- 10 and issue 13 item 4: authentication -------------------------------------------------


def basic(user: str, password: bytes) -> str:
    import base64

    return (
        "Proxy-Authorization: Basic " + base64.b64encode(user.encode() + b":" + password).decode()
    )


@pytest.fixture
def auth_proxy(tmp_path: Path, kushis: list[Kushi]) -> Callable[[int], tuple[Kushi, int, int]]:
    import bcrypt

    def make(cost: int) -> tuple[Kushi, int, int]:
        htpasswd = tmp_path / f"htpasswd-{cost}"
        digest = bcrypt.hashpw(b"right", bcrypt.gensalt(rounds=cost)).decode()
        htpasswd.write_text(f"alice:{digest}\n")
        port, admin = free_port(), free_port()
        kushi, _ = start(
            tmp_path,
            {
                "listen": [f"127.0.0.1:{port}"],
                "allow": ["127.0.0.0/8"],
                "auth_file": str(htpasswd),
                "auth_combine": "both",
                "access_log_format": "json",
                "admin_listen": [f"127.0.0.1:{admin}"],
            },
            wait_for=[("127.0.0.1", port)],
        )
        kushis.append(kushi)
        return kushi, port, admin

    return make


def test_password_over_72_bytes_is_407_not_500(
    auth_proxy: Callable[[int], tuple[Kushi, int, int]],
) -> None:
    kushi, port, _ = auth_proxy(4)
    status, fields, _ = get(port, "http://198.51.100.1/long", basic("alice", b"x" * 100))
    assert status == 407
    assert "Traceback" not in kushi.stderr
    assert record_for(kushi, "/long")["status"] == 407


def timed(port: int, source: str, *headers: str) -> float:
    began = time.perf_counter()
    status = get(port, "http://198.51.100.1/t", *headers, source=source)[0]
    assert status == 407
    return time.perf_counter() - began


def test_unknown_user_costs_what_a_known_user_costs(
    auth_proxy: Callable[[int], tuple[Kushi, int, int]],
) -> None:
    """htpasswd -B writes cost 5; the dummy hash for unknown users has the file's cost,
    so the time does not tell whether a user exists (it used to be cost 10: 30x slower)."""
    _kushi, port, _ = auth_proxy(7)
    known, unknown = [], []
    for i in range(4):  # four failures per client address: under the rate limit
        known.append(timed(port, f"127.0.1.{i + 1}", basic("alice", b"wrong")))
        unknown.append(timed(port, f"127.0.2.{i + 1}", basic("mallory", b"wrong")))
    k, u = statistics.median(known), statistics.median(unknown)
    assert u < 3 * k + 0.02 and k < 3 * u + 0.02, (known, unknown)


def test_failed_attempts_are_rate_limited_per_client(
    auth_proxy: Callable[[int], tuple[Kushi, int, int]],
) -> None:
    kushi, port, admin = auth_proxy(4)
    statuses = [
        get(port, "http://198.51.100.1/rl", basic("alice", b"wrong"), source="127.0.3.1")[0]
        for _ in range(12)
    ]
    assert statuses[:10] == [407] * 10 and statuses[10:] == [429, 429], statuses
    # Another client is not affected, and the right password still works from it.
    assert (
        get(port, "http://198.51.100.1/rl", basic("alice", b"wrong"), source="127.0.3.2")[0] == 407
    )
    metrics = get(admin, f"http://127.0.0.1:{admin}/metrics", origin_form=True)
    text = metrics[2].decode()
    assert re.search(r'kushi_auth_refusals_total\{status="429"\} 2\.0', text), text
    assert 'kushi_auth_limit{limit="failures_allowed"} 10.0' in text


def test_authenticated_request_stays_fast_under_wrong_passwords(
    auth_proxy: Callable[[int], tuple[Kushi, int, int]],
    origin_factory: Callable[[Reply], ScriptedOrigin],
) -> None:
    """Four clients send wrong passwords as fast as they can (each from fresh addresses,
    so the rate limit does not stop them: every attempt costs a bcrypt check of cost 10).
    bcrypt runs off the event loop and a verified credential is remembered, so a user who
    authenticated once is answered about as fast as without the attack (it used to wait
    for every check in the queue: ~1.8 s)."""
    kushi, port, _ = auth_proxy(10)
    origin = origin_factory(lambda n, i, h: ok())
    url = f"http://127.0.0.1:{origin.port}/"
    good = basic("alice", b"right")

    def authed() -> float:
        began = time.perf_counter()
        with Client(port, "127.0.0.1") as client:
            host = url.split("/")[2]
            status = send(
                client, f"GET {url} HTTP/1.1\r\nHost: {host}\r\n{good}\r\nConnection: close\r\n\r\n"
            )[0]
        assert status == 200
        return time.perf_counter() - began

    authed()  # verified once (bcrypt), remembered from now on
    baseline = statistics.median(authed() for _ in range(10))
    stop = threading.Event()
    counter = iter(range(10**6))

    def attacker() -> None:
        while not stop.is_set():
            n = next(counter)
            source = f"127.{10 + n // 60000 % 200}.{n // 240 % 250}.{n % 240 + 2}"
            try:
                get(port, "http://198.51.100.1/x", basic("alice", b"wrong"), source=source)
            except OSError:
                pass

    threads = [threading.Thread(target=attacker, daemon=True) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(0.3)
        under_attack = statistics.median(authed() for _ in range(10))
    finally:
        stop.set()
        for thread in threads:
            thread.join(10)
    assert under_attack < max(10 * baseline, 0.15), (baseline, under_attack)
    assert "Traceback" not in kushi.stderr


# --- admin listener -------------------------------------------------------------------------


def test_admin_listener_limits_connections_per_client(tmp_path: Path, kushis: list[Kushi]) -> None:
    port, admin = free_port(), free_port()
    kushi, _ = start(
        tmp_path,
        {"listen": [f"127.0.0.1:{port}"], "admin_listen": [f"127.0.0.1:{admin}"]},
        wait_for=[("127.0.0.1", admin)],
    )
    kushis.append(kushi)
    held = [socket.create_connection(("127.0.0.1", admin), timeout=5) for _ in range(16)]
    try:
        time.sleep(0.2)
        with socket.create_connection(("127.0.0.1", admin), timeout=5) as extra:
            answer = extra.recv(4096)
        assert answer.startswith(b"HTTP/1.1 503 "), answer
        # Another client address still gets in.
        status = get(
            admin, f"http://127.0.0.1:{admin}/healthz", source="127.0.0.2", origin_form=True
        )[0]
        assert status == 200
    finally:
        for sock in held:
            sock.close()


# --- not yet reproduced: a reload that fails halfway -----------------------------------------


def test_reload_that_cannot_open_a_log_changes_nothing(
    tmp_path: Path, kushis: list[Kushi], origin_factory: Callable[[Reply], ScriptedOrigin]
) -> None:
    """Two listeners; the new file narrows the first one's allow list and gives the second
    an access log in a directory that does not exist. The reload must fail as a whole."""
    origin = origin_factory(lambda n, i, h: ok())
    one, two = free_port(), free_port()
    listeners: list[dict[str, Any]] = [
        {"name": "one", "listen": [f"127.0.0.1:{one}"]},
        {"name": "two", "listen": [f"127.0.0.1:{two}"]},
    ]
    kushi, config = start(tmp_path, {}, listeners, wait_for=[("127.0.0.1", one)])
    kushis.append(kushi)
    url = f"http://127.0.0.1:{origin.port}/"
    assert get(one, url)[0] == 200
    listeners[0]["allow"] = ["203.0.113.0/24"]
    listeners[1]["access_log"] = str(tmp_path / "no-such-dir" / "access.log")
    write_toml(config, {}, listeners)
    kushi.signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while "reload failed" not in kushi.stderr:
        assert time.monotonic() < deadline, kushi.stderr
        time.sleep(0.02)
    assert "no-such-dir" in kushi.stderr
    assert get(one, url)[0] == 200  # the old allow list is still in force
    assert get(two, url)[0] == 200
    assert kushi.proc.poll() is None


# --- not yet reproduced: kushi whoami and a non-ASCII target --------------------------------


def test_whoami_answers_a_non_ascii_target(tmp_path: Path, kushis: list[Kushi]) -> None:
    port = free_port()
    kushi = Kushi(["whoami", "--listen", f"127.0.0.1:{port}"], tmp_path, [("127.0.0.1", port)])
    kushis.append(kushi)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(
            b"GET /caf\xc3\xa9 HTTP/1.1\r\nHost: x\r\nAccept: application/json\r\n"
            b"Connection: close\r\n\r\n"
        )
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    assert data.startswith(b"HTTP/1.1 200 "), data[:300]
    body = json.loads(data.partition(b"\r\n\r\n")[2])
    assert "caf" in json.dumps(body)
