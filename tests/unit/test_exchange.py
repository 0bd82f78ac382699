"""Playbooks for the sans-IO exchange (kushi.exchange), mitmproxy style: feed one event,
assert the exact commands that come out. No sockets, no event loop, a fake clock.

Each test walks one path of an exchange: a keep-alive GET, ``Connection: close``,
chunked bodies both ways, the body idle deadlines, upstream failures, 100-continue,
pipelining, CONNECT, Upgrade, reverse fail-over, a framing error in mid-body, and the
responses that have no body.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from kushi.accesslog import AccessRecord
from kushi.config import EVERYONE, Config, Listener, Timeouts, parse_backends
from kushi.connector import Upstream
from kushi.errors import ConnectionRefused, ConnectionTimeout
from kushi.exchange import (
    ArmDeadline,
    CancelDeadline,
    ClientClosed,
    ClientData,
    ClientEnd,
    ClientPaused,
    ClientResumed,
    CloseClient,
    CloseUpstream,
    Command,
    Exchange,
    OpenTunnel,
    OpenUpstream,
    ReleaseUpstream,
    SendClient,
    SendUpstream,
    StartTunnel,
    TimerFired,
    TunnelClosed,
    UpstreamConnected,
    UpstreamData,
    UpstreamEnd,
    UpstreamFailed,
    UpstreamPaused,
    UpstreamResumed,
    WriteLog,
)
from kushi.netio import Conn
from kushi.routing import ClientInfo, Route
from kushi.runtime import EgressChoice, ListenerState

CLIENT = ClientInfo("2001:db8::7", 40000, local_address="2001:db8::1", local_port=3128)
HOP = "[2001:db8::80]:80"
VIA = b"Via: 1.1 kushi-test\r\n"
STATUS_200 = (
    b'Proxy-Status: kushi; next-hop="[2001:db8::80]:80"; received-status=200; details="ipv6"\r\n'
)
PUT_10 = (
    b"PUT http://[2001:db8::80]/f HTTP/1.1\r\nHost: [2001:db8::80]\r\nContent-Length: 10\r\n\r\n"
)
OK_BODY = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
OK_OUT = b"HTTP/1.1 200 OK\r\n" + VIA + STATUS_200 + b"Content-Length: 2\r\n\r\nok"


@dataclass
class Logged:
    """Matches a ``WriteLog`` whose record has these field values."""

    fields: dict[str, Any] = field(default_factory=dict)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, WriteLog):
            return NotImplemented
        record = other.record
        return all(getattr(record, k) == v for k, v in self.fields.items())


def logged(**fields: Any) -> Any:
    return Logged(fields)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Book:
    """One exchange and what it is fed."""

    def __init__(self, mode: str = "forward", **options: Any) -> None:
        timeouts = options.pop("timeouts", Timeouts())
        if mode == "reverse":
            options.setdefault("backend", ("http://[2001:db8::80]", "http://[2001:db8::81]"))
            options["backend_addresses"] = parse_backends("t", "reverse", options["backend"])
        self.cfg = Listener(
            name="t",
            mode=mode,  # type: ignore[arg-type]
            listen=(),
            allow=EVERYONE,
            access_log=None,
            **options,
        )
        self.state = ListenerState(self.cfg, Config(listeners=(self.cfg,), timeouts=timeouts))
        self.clock = Clock()
        self.ex = Exchange(
            listener="t",
            client=CLIENT,
            snapshot=lambda: self.state,
            pseudonym="kushi-test",
            serial=7,
            clock=self.clock,
        )
        self.started = self.ex.start()

    def __lshift__(self, event: Any) -> list[Command]:
        return self.ex.receive(event)

    @property
    def egress(self) -> EgressChoice:
        return self.state.egress(CLIENT.address)

    @property
    def key(self) -> tuple[object, ...]:
        return ("fwd", "2001:db8::80", 80, self.state.pool_tag)

    def route(self, path: bytes = b"/", port: int = 80) -> Route:
        host = b"[2001:db8::80]" if port == 80 else b"[2001:db8::80]:%d" % port
        return Route(
            "2001:db8::80", port, host, path, ("fwd", "2001:db8::80", port, self.state.pool_tag)
        )


def upstream(address: str = "2001:db8::80", port: int = 80) -> Upstream:
    return Upstream(Conn(), address, port, "ipv6", (), 0.002)


def get(path: str = "/", extra: str = "", version: str = "1.1") -> bytes:
    line = f"GET http://[2001:db8::80]{path} HTTP/{version}\r\n"
    return f"{line}Host: [2001:db8::80]\r\n{extra}\r\n".encode()


def up_head(path: bytes = b"/", extra: bytes = b"") -> bytes:
    return b"GET " + path + b" HTTP/1.1\r\nHost: [2001:db8::80]\r\n" + extra + VIA + b"\r\n"


def test_simple_get_keeps_the_connection_and_the_upstream() -> None:
    b = Book()
    assert b.started == [ArmDeadline("header_read", 30.0)]
    assert b.ex.reading_client and b.ex.idle
    assert b << ClientData(get("/a")) == [
        CancelDeadline("header_read"),
        OpenUpstream(b.state, b.route(b"/a"), b.egress),
    ]
    assert not b.ex.reading_client  # nothing more is read until the upstream is there
    up = upstream()
    assert b << UpstreamConnected(up, reused=False) == [
        SendUpstream(up_head(b"/a")),
        ArmDeadline("upstream_header", 60.0),
    ]
    assert b.ex.reading_upstream
    b.clock.now += 0.25
    assert b << UpstreamData(OK_BODY) == [
        CancelDeadline("upstream_header"),
        SendClient(OK_OUT),
        ReleaseUpstream(up, b.key),
        logged(
            method="GET",
            target="http://[2001:db8::80]/a",
            status=200,
            upstream=HOP,
            family="ipv6",
            bytes_out=len(OK_OUT),
            duration=0.25,
            time=1000.0,
            error="",
        ),
        ArmDeadline("idle", 60.0),  # kept alive: the next head may take timeouts.idle
    ]
    assert b.ex.idle
    # The idle deadline with nothing received ends the connection quietly.
    assert b << TimerFired("idle") == [CloseClient()]


def test_connection_close_from_the_client() -> None:
    b = Book()
    b << ClientData(get(extra="Connection: close\r\n"))
    up = upstream()
    assert b << UpstreamConnected(up, reused=False) == [
        SendUpstream(up_head()),
        ArmDeadline("upstream_header", 60.0),
    ]
    out = OK_OUT.replace(b"Content-Length: 2\r\n", b"Content-Length: 2\r\nConnection: close\r\n")
    assert b << UpstreamData(OK_BODY) == [
        CancelDeadline("upstream_header"),
        SendClient(out),
        ReleaseUpstream(up, b.key),  # the upstream said nothing of closing: reusable
        logged(status=200),
        CloseClient(),
    ]


def test_upstream_that_closes_is_not_reused() -> None:
    b = Book()
    b << ClientData(get())
    up = upstream()
    b << UpstreamConnected(up, reused=False)
    cmds = b << UpstreamData(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok")
    assert cmds[2] == CloseUpstream(up)
    assert cmds[-1] == ArmDeadline("idle", 60.0)  # the client's connection stays


def test_chunked_request_body_is_rechunked_and_response_head_deadline_waits_for_it() -> None:
    b = Book()
    head = (
        b"POST http://[2001:db8::80]/up HTTP/1.1\r\nHost: [2001:db8::80]\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    )
    assert b << ClientData(head + b"3\r\nabc\r\n") == [
        CancelDeadline("header_read"),
        OpenUpstream(b.state, b.route(b"/up"), b.egress),
    ]
    up = upstream()
    assert b << UpstreamConnected(up, reused=False) == [
        SendUpstream(
            b"POST /up HTTP/1.1\r\nHost: [2001:db8::80]\r\n"
            + VIA
            + b"Transfer-Encoding: chunked\r\n\r\n"
        ),
        ArmDeadline("request_body_idle", 60.0),
        SendUpstream(b"3\r\nabc\r\n"),  # what was buffered with the head goes on at once
        ArmDeadline("request_body_idle", 60.0),
    ]
    assert b.ex.reading_client
    # No upstream_header deadline while the upload runs: a slow upload is not cut by it.
    assert b << ClientData(b"2;ext=1\r\nde\r\n0\r\nX-Sum: 5\r\n\r\n") == [
        SendUpstream(b"2\r\nde\r\n"),
        SendUpstream(b"0\r\nX-Sum: 5\r\n\r\n"),
        CancelDeadline("request_body_idle"),
        ArmDeadline("upstream_header", 60.0),
    ]
    assert not b.ex.reading_client


def test_chunked_response_to_a_11_client_and_to_a_10_client() -> None:
    for version, framing, keep in (
        ("1.1", b"Transfer-Encoding: chunked\r\n", True),
        ("1.0", b"Connection: close\r\n", False),
    ):
        b = Book()
        b << ClientData(get(version=version, extra="Connection: keep-alive\r\n"))
        up = upstream()
        b << UpstreamConnected(up, reused=False)
        status = STATUS_200.replace(b"=200", b"=200")
        via = VIA if version == "1.1" else b"Via: 1.1 kushi-test\r\n"
        assert b << UpstreamData(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nwiki\r\n"
        ) == [
            CancelDeadline("upstream_header"),
            SendClient(b"HTTP/1.1 200 OK\r\n" + via + status + framing + b"\r\n"),
            ArmDeadline("response_body_idle", 60.0),
            SendClient(b"4\r\nwiki\r\n" if keep else b"wiki"),
            ArmDeadline("response_body_idle", 60.0),
        ]
        end = [SendClient(b"0\r\nX-T: 1\r\n\r\n")] if keep else []
        assert b << UpstreamData(b"0\r\nX-T: 1\r\n\r\n") == [
            *end,
            CancelDeadline("response_body_idle"),
            ReleaseUpstream(up, b.key),
            logged(status=200),
            ArmDeadline("idle", 60.0) if keep else CloseClient(),
        ]


def test_request_body_idle_deadline_answers_408_and_drops_the_upstream() -> None:
    b = Book(timeouts=Timeouts(request_body_idle=5.0))
    head = PUT_10
    b << ClientData(head + b"12345")
    up = upstream()
    assert b << UpstreamConnected(up, reused=False) == [
        SendUpstream(
            b"PUT /f HTTP/1.1\r\nHost: [2001:db8::80]\r\n" + VIA + b"Content-Length: 10\r\n\r\n"
        ),
        ArmDeadline("request_body_idle", 5.0),
        SendUpstream(b"12345"),
        ArmDeadline("request_body_idle", 5.0),
    ]
    cmds = b << TimerFired("request_body_idle")
    assert cmds[0] == CloseUpstream(up, abort=True)  # a partial body is never completed
    assert isinstance(cmds[1], SendClient)
    assert cmds[1].data.startswith(b"HTTP/1.1 408 Request Timeout\r\n")
    assert b"error=http_request_error" in cmds[1].data
    assert b"timeouts.request_body_idle" in cmds[1].data
    assert b"Connection: close\r\n" in cmds[1].data
    assert cmds[2:] == [logged(status=408, error="http_request_error"), CloseClient(eof=True)]


def test_response_body_idle_deadline_cuts_the_started_response() -> None:
    b = Book(timeouts=Timeouts(response_body_idle=7.0))
    b << ClientData(get())
    up = upstream()
    b << UpstreamConnected(up, reused=False)
    cmds = b << UpstreamData(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
    assert cmds[-2:] == [SendClient(b"abc"), ArmDeadline("response_body_idle", 7.0)]
    # Once a head went out, the only honest signal left is to cut the connection.
    assert b << TimerFired("response_body_idle") == [
        CloseUpstream(up, abort=True),
        logged(status=200, error="connection_read_timeout"),
        CloseClient(abort=True),
    ]
    assert b << UpstreamData(b"late") == []


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (ConnectionRefused("[2001:db8::80]:80 refused the connection"), b"502 Bad Gateway"),
        (ConnectionTimeout("no answer from [2001:db8::80]:80 within 10 s"), b"504 Gateway Timeout"),
    ],
)
def test_upstream_failure_is_answered_with_proxy_status(error: Exception, status: bytes) -> None:
    b = Book()
    b << ClientData(get())
    cmds = b << UpstreamFailed(error)  # type: ignore[arg-type]
    assert isinstance(cmds[0], SendClient)
    answer = cmds[0].data
    assert answer.startswith(b"HTTP/1.1 " + status + b"\r\n")
    kind = b"connection_refused" if b"502" in status else b"connection_timeout"
    assert b"Proxy-Status: kushi; error=" + kind in answer
    assert b"Connection: close" not in answer  # nothing unread: the client may go on
    assert cmds[1:] == [
        logged(status=int(status[:3]), error=kind.decode()),
        ArmDeadline("idle", 60.0),
    ]


def test_upstream_header_deadline_is_504() -> None:
    b = Book()
    b << ClientData(get())
    up = upstream()
    b << UpstreamConnected(up, reused=False)
    cmds = b << TimerFired("upstream_header")
    assert cmds[0] == CloseUpstream(up, abort=True)
    assert isinstance(cmds[1], SendClient)
    assert cmds[1].data.startswith(b"HTTP/1.1 504 Gateway Timeout\r\n")
    assert b'next-hop="[2001:db8::80]:80"' in cmds[1].data
    assert cmds[2] == logged(status=504, error="http_response_timeout")


def test_100_continue_goes_to_the_client_then_the_body_flows() -> None:
    b = Book()
    head = (
        b"POST http://[2001:db8::80]/c HTTP/1.1\r\nHost: [2001:db8::80]\r\n"
        b"Expect: 100-continue\r\nContent-Length: 4\r\n\r\n"
    )
    b << ClientData(head)
    up = upstream()
    assert b << UpstreamConnected(up, reused=False) == [
        SendUpstream(
            b"POST /c HTTP/1.1\r\nHost: [2001:db8::80]\r\nExpect: 100-continue\r\n"
            + VIA
            + b"Content-Length: 4\r\n\r\n"
        ),
        ArmDeadline("request_body_idle", 60.0),
    ]
    interim = (
        b"HTTP/1.1 100 Continue\r\n" + VIA + b'Proxy-Status: kushi; next-hop="[2001:db8::80]:80"; '
        b'received-status=100; details="ipv6"\r\n\r\n'
    )
    assert b << UpstreamData(b"HTTP/1.1 100 Continue\r\n\r\n") == [SendClient(interim)]
    assert b << ClientData(b"data") == [
        SendUpstream(b"data"),
        CancelDeadline("request_body_idle"),
        ArmDeadline("upstream_header", 60.0),
    ]
    assert b << UpstreamData(OK_BODY) == [
        CancelDeadline("upstream_header"),
        SendClient(OK_OUT),
        ReleaseUpstream(up, b.key),
        logged(status=200),
        ArmDeadline("idle", 60.0),
    ]


def test_interim_and_final_response_in_one_read_and_a_head_split_across_reads() -> None:
    b = Book()
    b << ClientData(get())
    up = upstream()
    b << UpstreamConnected(up, reused=False)
    interim = (
        b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>\r\n" + VIA + b"Proxy-Status: kushi; "
        b'next-hop="[2001:db8::80]:80"; received-status=103; details="ipv6"\r\n\r\n'
    )
    cmds = b << UpstreamData(b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>\r\n\r\n" + OK_BODY)
    assert cmds[:3] == [SendClient(interim), CancelDeadline("upstream_header"), SendClient(OK_OUT)]
    assert cmds[3] == ReleaseUpstream(up, b.key)
    # The next response's head arrives in two pieces, its body with the second.
    b << ClientData(get())
    b << UpstreamConnected(up, reused=True)
    assert b << UpstreamData(OK_BODY[:10]) == []
    assert b << UpstreamData(OK_BODY[10:]) == [
        CancelDeadline("upstream_header"),
        SendClient(OK_OUT),
        ReleaseUpstream(up, b.key),
        logged(status=200),
        ArmDeadline("idle", 60.0),
    ]


def test_pipelined_requests_are_answered_in_order() -> None:
    b = Book()
    assert b << ClientData(get("/1") + get("/2")) == [
        CancelDeadline("header_read"),
        OpenUpstream(b.state, b.route(b"/1"), b.egress),
    ]
    assert bytes(b.ex.buffer) == get("/2")  # waits until the first response is done
    up = upstream()
    b << UpstreamConnected(up, reused=False)
    assert b << UpstreamData(OK_BODY) == [
        CancelDeadline("upstream_header"),
        SendClient(OK_OUT),
        ReleaseUpstream(up, b.key),
        logged(target="http://[2001:db8::80]/1", bytes_out=len(OK_OUT)),
        # The next head is already here: header_read, and at once the next upstream.
        ArmDeadline("header_read", 30.0),
        CancelDeadline("header_read"),
        OpenUpstream(b.state, b.route(b"/2"), b.egress),
    ]
    assert b << UpstreamConnected(up, reused=True) == [
        SendUpstream(up_head(b"/2")),
        ArmDeadline("upstream_header", 60.0),
    ]


def test_pooled_connection_closed_by_the_server_is_retried_once() -> None:
    b = Book()
    b << ClientData(get())
    stale, fresh = upstream(), upstream()
    b << UpstreamConnected(stale, reused=True)
    assert b << UpstreamEnd() == [
        CloseUpstream(stale, abort=True),
        CancelDeadline("upstream_header"),
        OpenUpstream(b.state, b.route(), b.egress),
    ]
    assert b << UpstreamConnected(fresh, reused=False) == [
        SendUpstream(up_head()),
        ArmDeadline("upstream_header", 60.0),
    ]
    # A new connection that closes without a word is a 502, not another retry.
    cmds = b << UpstreamEnd()
    assert cmds[0] == CloseUpstream(fresh, abort=True)
    assert cmds[2] == logged(status=502, error="connection_terminated")


def test_connect_tunnel_hands_over_the_buffered_bytes() -> None:
    b = Book(connect_ports=frozenset({443}))
    head = b"CONNECT v6.example:443 HTTP/1.1\r\nHost: v6.example:443\r\n\r\n"
    cmds = b << ClientData(head + b"\x16\x03\x01hello")
    record = b.ex.record
    assert isinstance(record, AccessRecord)
    assert cmds == [
        CancelDeadline("header_read"),
        OpenTunnel(b.state, "v6.example", 443, record),  # never pooled
    ]
    up = upstream(port=443)
    cmds = b << UpstreamConnected(up, reused=False)
    assert cmds == [
        SendClient(
            b"HTTP/1.1 200 Connection established\r\n"
            b'Proxy-Status: kushi; next-hop="[2001:db8::80]:443"; details="ipv6"\r\n\r\n'
        ),
        StartTunnel(up, record, to_upstream=b"\x16\x03\x01hello"),
    ]
    assert b << TunnelClosed(up=100, down=5000) == [
        CloseUpstream(up),
        logged(method="CONNECT", status=200, family="ipv6"),
        CloseClient(),
    ]
    assert record.bytes_out == 5000 + len(cmds[0].data)  # type: ignore[union-attr]


def test_connect_to_a_port_not_allowed_is_403() -> None:
    b = Book()
    cmds = b << ClientData(b"CONNECT v6.example:25 HTTP/1.1\r\nHost: v6.example:25\r\n\r\n")
    assert isinstance(cmds[1], SendClient)
    assert cmds[1].data.startswith(b"HTTP/1.1 403 Forbidden\r\n")
    assert b"CONNECT to port 25 is not allowed" in cmds[1].data
    assert cmds[2] == logged(status=403, error="http_request_denied")


def test_websocket_upgrade_becomes_a_tunnel_with_the_upstreams_first_bytes() -> None:
    b = Book()
    request = get(
        "/ws", "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
    )
    b << ClientData(request)
    up = upstream()
    assert b << UpstreamConnected(up, reused=False) == [
        SendUpstream(
            up_head(b"/ws", b"Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n").replace(
                b"\r\n\r\n", b"\r\nConnection: upgrade\r\n\r\n"
            )
        ),
        ArmDeadline("upstream_header", 60.0),
    ]
    cmds = b << UpstreamData(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\n\r\n\x81\x02hi"
    )
    record = b.ex.record
    assert isinstance(record, AccessRecord)
    head = (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
        + VIA
        + STATUS_200.replace(b"=200", b"=101")
        + b"Connection: upgrade\r\n\r\n"
    )
    assert cmds == [
        CancelDeadline("upstream_header"),
        SendClient(head),
        StartTunnel(up, record, to_client=b"\x81\x02hi"),
    ]
    assert record.bytes_out == len(head) + 4


def test_reverse_fails_over_to_the_next_backend_with_forwarded() -> None:
    b = Book("reverse")
    assert b.ex.reading_client
    req = b"GET /r HTTP/1.1\r\nHost: www.example\r\n\r\n"
    cmds = b << ClientData(req)
    assert cmds[0] == CancelDeadline("header_read")
    assert isinstance(cmds[1], OpenUpstream)
    first = cmds[1].route
    assert (first.host_header, first.path) == (b"www.example", b"/r")  # preserve_host
    cmds = b << UpstreamFailed(ConnectionRefused("refused"))
    assert isinstance(cmds[0], OpenUpstream) and len(cmds) == 1
    second = cmds[0].route
    assert {first.host, second.host} == {"2001:db8::80", "2001:db8::81"}
    assert second.pool_key == ("rev", second.host, 80, b.state.pool_tag)
    up = upstream(second.host)
    cmds = b << UpstreamConnected(up, reused=False)
    assert cmds == [
        SendUpstream(
            b"GET /r HTTP/1.1\r\nHost: www.example\r\n"
            b'Forwarded: by="[2001:db8::1]";for="[2001:db8::7]";proto=http;host="www.example"\r\n'
            b"X-Forwarded-For: 2001:db8::7\r\nX-Forwarded-Proto: http\r\n"
            b"X-Forwarded-Host: www.example\r\n" + VIA + b"\r\n"
        ),
        ArmDeadline("upstream_header", 60.0),
    ]
    # The backend that refused is skipped by the next request while it is down.
    down = [be for be in b.state.backends.backends if be.host == first.host]
    assert down[0].down_until > 0


def test_reverse_with_every_backend_refusing_is_502() -> None:
    b = Book("reverse")
    b << ClientData(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    b << UpstreamFailed(ConnectionRefused("first refused"))
    cmds = b << UpstreamFailed(ConnectionRefused("second refused"))
    assert isinstance(cmds[0], SendClient)
    assert cmds[0].data.startswith(b"HTTP/1.1 502 Bad Gateway\r\n")
    assert b"second refused" in cmds[0].data


def test_reverse_with_proxy_protocol_sends_the_header_on_private_connections() -> None:
    b = Book("reverse", backend_proxy_protocol=1)
    cmds = b << ClientData(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert isinstance(cmds[1], OpenUpstream)
    assert cmds[1].preamble == b"PROXY TCP6 2001:db8::7 2001:db8::1 40000 3128\r\n"
    assert cmds[1].route.private and cmds[1].route.pool_key[-1] == 7


def test_framing_error_mid_body_closes_the_upstream_before_reuse() -> None:
    b = Book()
    head = (
        b"POST http://[2001:db8::80]/x HTTP/1.1\r\nHost: [2001:db8::80]\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    )
    b << ClientData(head)
    up = upstream()
    b << UpstreamConnected(up, reused=False)
    assert b << ClientData(b"2\r\nok\r\n") == [
        SendUpstream(b"2\r\nok\r\n"),
        ArmDeadline("request_body_idle", 60.0),
    ]
    cmds = b << ClientData(b"zz\r\n")
    assert cmds[0] == CloseUpstream(up, abort=True)  # never released to the pool
    assert not any(isinstance(c, ReleaseUpstream) for c in cmds)
    assert isinstance(cmds[1], SendClient)
    assert cmds[1].data.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert b"Connection: close" in cmds[1].data
    assert cmds[2:] == [logged(status=400, error="http_request_error"), CloseClient(eof=True)]


def test_bad_first_chunk_never_reaches_the_upstream() -> None:
    b = Book()
    head = (
        b"POST http://[2001:db8::80]/x HTTP/1.1\r\nHost: [2001:db8::80]\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    )
    cmds = b << ClientData(head + b"zz\r\n")
    assert not any(isinstance(c, OpenUpstream) for c in cmds)
    assert isinstance(cmds[1], SendClient) and b" 400 " in cmds[1].data[:13]


@pytest.mark.parametrize(
    ("method", "response", "framing"),
    [
        ("HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n", b"Content-Length: 1234\r\n"),
        ("GET", b"HTTP/1.1 204 No Content\r\n\r\n", b""),
        (
            "GET",
            b"HTTP/1.1 304 Not Modified\r\nContent-Length: 99\r\n\r\n",
            b"Content-Length: 99\r\n",
        ),
    ],
)
def test_head_204_304_have_no_body(method: str, response: bytes, framing: bytes) -> None:
    b = Book()
    b << ClientData(get().replace(b"GET", method.encode(), 1))
    up = upstream()
    b << UpstreamConnected(up, reused=False)
    status_line = response.split(b"\r\n")[0] + b"\r\n"
    status = response[9:12]
    cmds = b << UpstreamData(response)
    assert cmds == [
        CancelDeadline("upstream_header"),
        SendClient(
            status_line + VIA + STATUS_200.replace(b"=200", b"=" + status) + framing + b"\r\n"
        ),
        ReleaseUpstream(up, b.key),  # no body to wait for: reusable at once
        logged(status=int(status)),
        ArmDeadline("idle", 60.0),
    ]


def test_client_that_leaves_mid_upload_aborts_the_upstream() -> None:
    b = Book()
    head = PUT_10
    b << ClientData(head + b"12")
    up = upstream()
    b << UpstreamConnected(up, reused=False)
    assert b << ClientEnd() == [
        CloseUpstream(up, abort=True),
        logged(error="client_closed", aborted=True),
        CloseClient(),
    ]


def test_client_gone_mid_download() -> None:
    b = Book()
    b << ClientData(get())
    up = upstream()
    b << UpstreamConnected(up, reused=False)
    b << UpstreamData(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nabc")
    assert b << ClientClosed() == [
        CloseUpstream(up, abort=True),
        logged(status=200, error="client_closed", aborted=True),
        CloseClient(),
    ]


def test_partial_head_at_header_read_deadline_is_408() -> None:
    b = Book()
    assert b << ClientData(b"GET http://x/ HTTP/1.1\r\nHost") == []
    cmds = b << TimerFired("header_read")
    assert isinstance(cmds[0], SendClient)
    assert cmds[0].data.startswith(b"HTTP/1.1 408 Request Timeout\r\n")
    assert b"timeouts.header_read" in cmds[0].data
    assert cmds[1:] == [logged(status=408, method="-"), CloseClient(eof=True)]


def test_self_page_for_origin_form_on_a_forward_listener() -> None:
    b = Book()
    cmds = b << ClientData(b"GET / HTTP/1.1\r\nHost: proxy\r\n\r\n")
    assert cmds[0] == CancelDeadline("header_read")
    assert isinstance(cmds[1], SendClient)
    assert cmds[1].data.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"This address is a proxy" in cmds[1].data
    assert cmds[2:] == [logged(status=200), ArmDeadline("idle", 60.0)]


def test_client_that_stops_reading_pauses_the_response_and_its_idle_deadline() -> None:
    b = Book()
    b << ClientData(get())
    up = upstream()
    b << UpstreamConnected(up, reused=False)
    b << UpstreamData(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nabc")
    assert b.ex.reading_upstream
    # The client's write buffer is full: nothing more is taken from the upstream, and
    # the upstream is not blamed for the wait (response_body_idle is off meanwhile).
    assert b << ClientPaused() == [CancelDeadline("response_body_idle")]
    assert not b.ex.reading_upstream
    assert b << ClientResumed() == [ArmDeadline("response_body_idle", 60.0)]
    assert b.ex.reading_upstream
    assert b << UpstreamData(b"def") == [
        SendClient(b"def"),
        CancelDeadline("response_body_idle"),
        ReleaseUpstream(up, b.key),
        logged(status=200, bytes_out=len(OK_OUT) - len(b"ok") + 6),
        ArmDeadline("idle", 60.0),
    ]


def test_upstream_that_stops_reading_pauses_the_upload() -> None:
    b = Book(timeouts=Timeouts(request_body_idle=5.0))
    b << ClientData(PUT_10)
    up = upstream()
    b << UpstreamConnected(up, reused=False)
    assert b.ex.reading_client
    assert b << UpstreamPaused() == [CancelDeadline("request_body_idle")]
    assert not b.ex.reading_client  # the client's bytes wait (and its socket fills)
    assert b << UpstreamResumed() == [ArmDeadline("request_body_idle", 5.0)]
    assert b.ex.reading_client


def test_upstream_that_sends_more_than_its_response_is_not_pooled() -> None:
    b = Book()
    b << ClientData(get())
    up = upstream()
    b << UpstreamConnected(up, reused=False)
    cmds = b << UpstreamData(OK_BODY + b"HTTP/1.1 200 OK\r\n")  # an unasked-for extra
    assert cmds[:3] == [CancelDeadline("upstream_header"), SendClient(OK_OUT), CloseUpstream(up)]


def test_early_response_waits_a_moment_for_the_rest_of_the_upload() -> None:
    b = Book()
    b << ClientData(PUT_10 + b"12")
    up = upstream()
    b << UpstreamConnected(up, reused=False)
    too_large = b"HTTP/1.1 413 Content Too Large\r\nContent-Length: 0\r\n\r\n"
    cmds = b << UpstreamData(too_large)
    assert isinstance(cmds[1], SendClient) and cmds[1].data.startswith(b"HTTP/1.1 413 ")
    assert cmds[2:] == [ArmDeadline("request_body_finish", 1.0)]
    assert b.ex.reading_client  # the rest of the body still goes on
    # It does not come: both connections end (the client's body is not read any more).
    assert b << TimerFired("request_body_finish") == [
        CloseUpstream(up),
        logged(status=413),
        CloseClient(),
    ]


def test_early_response_then_the_upload_completes_keeps_both() -> None:
    b = Book()
    b << ClientData(PUT_10 + b"12")
    up = upstream()
    b << UpstreamConnected(up, reused=False)
    b << UpstreamData(b"HTTP/1.1 413 Content Too Large\r\nContent-Length: 0\r\n\r\n")
    assert b << ClientData(b"34567890") == [
        SendUpstream(b"34567890"),
        CancelDeadline("request_body_idle"),
        CancelDeadline("request_body_finish"),
        ReleaseUpstream(up, b.key),
        logged(status=413),
        ArmDeadline("idle", 60.0),
    ]
