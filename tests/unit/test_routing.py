"""Header rewriting on the way through (kushi.routing), fed parsed heads, no I/O."""

from __future__ import annotations

import pytest

from kushi.http1 import Header, RequestHead, parse_request_head, parse_response_head
from kushi.routing import (
    ClientInfo,
    downstream_response_headers,
    forwarding_headers,
    max_forwards,
    seen_via,
    upstream_request_headers,
    via_value,
)

pytestmark = pytest.mark.timeout(30)

PSEUDONYM = "kushi-abc123"


def req(*fields: str, method: str = "GET", version: str = "1.1", target: str = "") -> RequestHead:
    target = target or "http://example.test/path?q=1"
    lines = [f"{method} {target} HTTP/{version}"]
    if version == "1.1" and not any(f.lower().startswith("host:") for f in fields):
        lines.append("Host: example.test")
    lines += list(fields)
    return parse_request_head(("\r\n".join(lines) + "\r\n\r\n").encode())


def names(headers: list[Header]) -> list[str]:
    return [k.decode().lower() for k, _ in headers]


def values(headers: list[Header], name: str) -> list[str]:
    return [v.decode() for k, v in headers if k.decode().lower() == name]


def upstream(head: RequestHead, **kwargs: object) -> list[Header]:
    return upstream_request_headers(head, host=b"example.test", pseudonym=PSEUDONYM, **kwargs)  # type: ignore[arg-type]


# --- hop-by-hop ------------------------------------------------------------------------------


def test_hop_by_hop_fields_are_stripped() -> None:
    head = req(
        "Connection: X-Foo, keep-alive",
        "X-Foo: bar",
        "Keep-Alive: timeout=5",
        "TE: trailers",
        "Trailer: X-Sum",
        "Proxy-Authorization: Basic dXNlcjpwYXNz",
        "Proxy-Connection: keep-alive",
        "Upgrade: h2c",
        "Accept: */*",
        "X-Keep: 1",
    )
    out = upstream(head)
    assert names(out) == ["host", "accept", "x-keep", "via"]


def test_fields_named_in_connection_are_stripped_case_insensitively() -> None:
    head = req("Connection: x-one,  X-TWO ", "X-One: 1", "x-two: 2", "X-Three: 3")
    assert names(upstream(head)) == ["host", "x-three", "via"]


def test_framing_fields_and_host_are_left_to_the_caller() -> None:
    head = req("Content-Length: 5", method="POST", target="http://other.test/")
    out = upstream(head)
    assert out[0] == (b"Host", b"example.test")  # the host chosen by routing comes first
    assert "content-length" not in names(out)
    chunked = req("Transfer-Encoding: chunked", method="POST")
    assert "transfer-encoding" not in names(upstream(chunked))


def test_upgrade_kept_only_when_asked() -> None:
    head = req("Connection: Upgrade", "Upgrade: websocket", "Sec-WebSocket-Version: 13")
    assert "upgrade" not in names(upstream(head))
    out = upstream(head, keep_upgrade=True)
    assert values(out, "upgrade") == ["websocket"]
    assert values(out, "connection") == ["upgrade"]
    assert values(out, "sec-websocket-version") == ["13"]


def test_response_hop_by_hop_stripped_and_via_and_proxy_status_added() -> None:
    resp = parse_response_head(
        b"HTTP/1.1 200 OK\r\nConnection: X-Secret\r\nX-Secret: 1\r\nKeep-Alive: timeout=5\r\n"
        b"Proxy-Authenticate: Basic\r\nTransfer-Encoding: chunked\r\nTrailer: X-T\r\n"
        b"Content-Type: text/plain\r\n\r\n",
        b"GET",
    )
    out = downstream_response_headers(resp, pseudonym=PSEUDONYM, proxy_status=b"kushi; x")
    assert out == [
        (b"Content-Type", b"text/plain"),
        (b"Via", b"1.1 kushi-abc123"),
        (b"Proxy-Status", b"kushi; x"),
    ]


# --- Via -------------------------------------------------------------------------------------


def test_via_appended_with_the_received_protocol_version() -> None:
    assert values(upstream(req()), "via") == ["1.1 kushi-abc123"]
    assert values(upstream(req(version="1.0")), "via") == ["1.0 kushi-abc123"]
    assert via_value((1, 1), "kushi-x") == b"1.1 kushi-x"


def test_existing_via_kept_and_ours_last() -> None:
    out = upstream(req("Via: 1.0 fred, 1.1 p.example.net"))
    assert values(out, "via") == ["1.0 fred, 1.1 p.example.net", "1.1 kushi-abc123"]


def test_seen_via_detects_our_own_pseudonym_only() -> None:
    assert seen_via(req("Via: 1.1 other, 1.1 KUSHI-ABC123 (kushi)"), PSEUDONYM)
    assert seen_via(req("Via: 1.0 a", "Via: 1.1 kushi-abc123"), PSEUDONYM)
    assert not seen_via(req("Via: 1.1 kushi-abc1234"), PSEUDONYM)
    assert not seen_via(req("Via: kushi-abc123"), PSEUDONYM)
    assert not seen_via(req(), PSEUDONYM)


# --- Max-Forwards ----------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["TRACE", "OPTIONS"])
def test_max_forwards_decremented_for_trace_and_options(method: str) -> None:
    head = req("Max-Forwards: 3", method=method)
    assert max_forwards(head) == 3
    assert values(upstream(head), "max-forwards") == ["2"]
    assert values(upstream(req("Max-Forwards: 1", method=method)), "max-forwards") == ["0"]
    assert max_forwards(req("Max-Forwards: 0", method=method)) == 0


def test_max_forwards_ignored_for_other_methods() -> None:
    head = req("Max-Forwards: 3")
    assert max_forwards(head) is None
    assert values(upstream(head), "max-forwards") == ["3"]


def test_max_forwards_not_a_number_is_left_alone() -> None:
    head = req("Max-Forwards: many", method="OPTIONS")
    assert max_forwards(head) is None
    assert values(upstream(head), "max-forwards") == ["many"]


# --- Forwarded and X-Forwarded-* (reverse hops) ----------------------------------------------


def test_forwarded_quotes_and_brackets_ipv6() -> None:
    client = ClientInfo("2001:db8::1", 50000)
    out = upstream(req(), reverse=client)
    # RFC 7239 section 6: an IPv6 node is "[...]" and quoted.
    assert values(out, "forwarded") == ['for="[2001:db8::1]";proto=http;host="example.test"']
    assert values(out, "x-forwarded-for") == ["2001:db8::1"]
    assert values(out, "x-forwarded-proto") == ["http"]
    assert values(out, "x-forwarded-host") == ["example.test"]


def test_forwarded_ipv4_is_not_quoted_and_by_names_the_listener() -> None:
    client = ClientInfo("198.51.100.7", 50000, local_address="2001:db8::80", local_port=80)
    (fwd,) = values(upstream(req(), reverse=client), "forwarded")
    assert fwd == 'by="[2001:db8::80]";for=198.51.100.7;proto=http;host="example.test"'


def test_forwarded_none_for_a_forward_proxy() -> None:
    out = upstream(req("X-Forwarded-For: 203.0.113.1"))
    assert "forwarded" not in names(out)
    assert values(out, "x-forwarded-for") == ["203.0.113.1"]  # a forward proxy passes it on


def test_x_forwarded_for_from_untrusted_client_is_dropped() -> None:
    head = req(
        "X-Forwarded-For: 203.0.113.66",
        "Forwarded: for=203.0.113.66",
        "X-Forwarded-Proto: https",
        "X-Forwarded-Host: evil.test",
        "X-Real-IP: 203.0.113.66",
    )
    out = upstream(head, reverse=ClientInfo("2001:db8::1", 1, trusted=False))
    assert values(out, "x-forwarded-for") == ["2001:db8::1"]
    assert values(out, "forwarded") == ['for="[2001:db8::1]";proto=http;host="example.test"']
    assert values(out, "x-forwarded-proto") == ["http"]
    assert values(out, "x-forwarded-host") == ["example.test"]
    assert "x-real-ip" not in names(out)
    assert "203.0.113.66" not in repr(out)


def test_x_forwarded_for_from_trusted_proxy_is_extended() -> None:
    head = req(
        "X-Forwarded-For: 203.0.113.66, 198.51.100.9",
        "Forwarded: for=203.0.113.66",
        "X-Forwarded-Proto: https",
        "X-Forwarded-Host: www.example.test",
    )
    out = upstream(head, reverse=ClientInfo("2001:db8::1", 1, trusted=True))
    assert values(out, "x-forwarded-for") == ["203.0.113.66, 198.51.100.9, 2001:db8::1"]
    assert values(out, "forwarded") == [
        'for=203.0.113.66, for="[2001:db8::1]";proto=http;host="example.test"'
    ]
    # The trusted proxy saw the original scheme and host; kushi keeps them.
    assert values(out, "x-forwarded-proto") == ["https"]
    assert values(out, "x-forwarded-host") == ["www.example.test"]


def test_forwarding_headers_https_scheme_and_name_node() -> None:
    out = forwarding_headers(req(), b"example.test", ClientInfo("unknown-node", 0, scheme="https"))
    assert (b"Forwarded", b'for="unknown-node";proto=https;host="example.test"') in out
    assert (b"X-Forwarded-Proto", b"https") in out


def test_forwarding_fields_spelled_with_underscores_are_dropped_in_reverse() -> None:
    """X_Forwarded_For reads as X-Forwarded-For to gateways that map "_" to "-": from an
    untrusted client every such spelling is dropped, from a trusted proxy the rebuilt ones
    (which kushi extends only in their proper spelling)."""
    head = req("X_Forwarded_For: 203.0.113.66", "x_real_ip: 203.0.113.66", "X_Other: kept")
    out = upstream(head, reverse=ClientInfo("2001:db8::1", 1, trusted=False))
    assert "203.0.113.66" not in repr(out)
    assert values(out, "x_other") == ["kept"]
    assert values(out, "x-forwarded-for") == ["2001:db8::1"]
    out = upstream(head, reverse=ClientInfo("2001:db8::1", 1, trusted=True))
    assert values(out, "x-forwarded-for") == ["2001:db8::1"]
    assert "x_forwarded_for" not in names(out)
    assert values(out, "x_real_ip") == ["203.0.113.66"]  # (a trusted proxy's, passed on)


def test_forwarding_fields_made_once_per_client_are_not_shared() -> None:
    """An untrusted client's forwarding fields come from a cache: each caller gets its own
    list, and a different client, scheme or Host gets its own fields."""
    client = ClientInfo("198.51.100.7", 1, local_address="2001:db8::80")
    first = forwarding_headers(req(), b"example.test", client)
    first.append((b"X-Mine", b"1"))
    again = forwarding_headers(req(), b"example.test", client)
    assert (b"X-Mine", b"1") not in again
    assert again == [
        (b"Forwarded", b'by="[2001:db8::80]";for=198.51.100.7;proto=http;host="example.test"'),
        (b"X-Forwarded-For", b"198.51.100.7"),
        (b"X-Forwarded-Proto", b"http"),
        (b"X-Forwarded-Host", b"example.test"),
    ]
    other = forwarding_headers(req(), b"other.test", ClientInfo("198.51.100.8", 1, scheme="https"))
    assert other == [
        (b"Forwarded", b'for=198.51.100.8;proto=https;host="other.test"'),
        (b"X-Forwarded-For", b"198.51.100.8"),
        (b"X-Forwarded-Proto", b"https"),
        (b"X-Forwarded-Host", b"other.test"),
    ]
    long_host = b"a" * 300 + b".test"  # (not kept in the cache, made every time)
    assert (b"X-Forwarded-Host", long_host) in forwarding_headers(req(), long_host, client)
