"""Bad input from clients, end to end: a real kushi, raw sockets, a recording origin.

One test per bad-input case. Each asserts the status, the ``Proxy-Status`` error type (RFC
9209) and, from the bytes the origin (``support.raw_origin``) recorded, that nothing reached
upstream; then that kushi is still up and forwards a normal request. The forward listener may
reach the origin on ``[::1]`` (``--allow-destination ::1/128``; loopback is refused by default);
a second kushi admits only 203.0.113.9/32, a documentation address no test client has.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from support.kushi_proc import Kushi, free_port, write_toml
from support.raw_origin import RESPONSE_MARKER, RawOrigin, RawResponse, exchange, request_end

pytestmark = pytest.mark.timeout(60)


@dataclass
class Stack:
    origin: RawOrigin
    kushi: Kushi
    proxy: tuple[str, int]
    acl_kushi: Kushi
    acl_proxy: tuple[str, int]

    def send(self, head: bytes, body: bytes = b"", **kw: bool) -> RawResponse:
        return exchange(self.proxy, head, body, **kw)

    def url(self, path: str = "/ok") -> str:
        return f"http://{self.origin.authority}{path}"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    workdir: Path = tmp_path_factory.mktemp("bad-input")
    proxy = ("127.0.0.1", free_port("127.0.0.1"))
    acl_proxy = ("127.0.0.1", free_port("127.0.0.1"))
    config = workdir / "kushi.toml"
    # A short upstream wait, so a request kushi wrongly leaves hanging fails in seconds.
    write_toml(config, {"timeouts": {"upstream_header": 5.0}})
    common = ["--allow-destination", "::1/128", "--access-log-format", "json"]
    with RawOrigin("::1") as origin:
        kushi = Kushi(
            ["serve", "--config", str(config), "--listen", f"{proxy[0]}:{proxy[1]}", *common],
            workdir,
            wait_for=[proxy],
        )
        try:
            acl_kushi = Kushi(
                ["serve", "--listen", f"{acl_proxy[0]}:{acl_proxy[1]}", *common]
                + ["--allow", "203.0.113.9/32"],
                workdir,
                wait_for=[acl_proxy],
            )
            try:
                yield Stack(origin, kushi, proxy, acl_kushi, acl_proxy)
            finally:
                acl_kushi.stop()
        finally:
            kushi.stop()


def assert_refused(resp: RawResponse, status: int, error_type: str, *, close: bool = True) -> None:
    assert resp.status == status, resp.raw[:600]
    assert resp.proxy_status.startswith(f"kushi; error={error_type}; details="), resp.proxy_status
    assert resp.get(RESPONSE_MARKER) is None
    assert int(resp.get(b"content-length") or b"-1") == len(resp.body)
    if close:
        assert resp.get(b"connection") == b"close"
        assert resp.closed, "kushi kept the connection open after a 400"


def assert_still_serving(stack: Stack) -> None:
    """kushi is up and forwards a plain GET; the origin sees exactly that request."""
    assert stack.kushi.proc.poll() is None, stack.kushi.stderr
    mark = stack.origin.count()
    head = f"GET {stack.url('/after')} HTTP/1.1\r\nHost: {stack.origin.authority}\r\n\r\n"
    resp = stack.send(head.encode())
    assert resp.status == 200, resp.raw[:600]
    assert resp.get(RESPONSE_MARKER) is not None
    # (An upstream connection that an earlier refusal cut may still be accepted late.)
    arrived = [c for c in stack.origin.since(mark) if c.answered]
    assert len(arrived) == 1
    assert arrived[0].snapshot().startswith(b"GET /after HTTP/1.1\r\n")


def refused_upstream_silent(
    stack: Stack,
    head: bytes,
    status: int,
    error_type: str = "http_request_error",
    *,
    body: bytes = b"",
    close: bool = True,
) -> RawResponse:
    mark = stack.origin.count()
    resp = stack.send(head, body, expect_close=close)
    assert_refused(resp, status, error_type, close=close)
    assert stack.origin.since(mark) == [], "the origin received bytes for a refused request"
    assert_still_serving(stack)
    return resp


def post(stack: Stack, *fields: str, version: str = "HTTP/1.1") -> bytes:
    lines = [f"POST {stack.url('/upload')} {version}", f"Host: {stack.origin.authority}"]
    lines.extend(fields)
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


# --- the cases -----------------------------------------------------------------------------


def test_normal_request_is_forwarded(stack: Stack) -> None:
    assert_still_serving(stack)


@pytest.mark.parametrize(
    "line",
    [b"GET  / HTTP/1.1", b"GET /", b"GET / HTTP/1.1 extra", b"G@T / HTTP/1.1", b"\x16\x03\x01"],
)
def test_malformed_request_line_is_400(stack: Stack, line: bytes) -> None:
    refused_upstream_silent(stack, line + b"\r\nHost: a\r\n\r\n", 400)


def test_uri_too_long_is_414(stack: Stack) -> None:
    # The default max_request_line is 8192 bytes.
    head = f"GET {stack.url('/' + 'a' * 9000)} HTTP/1.1\r\nHost: a\r\n\r\n".encode()
    resp = refused_upstream_silent(stack, head, 414)
    assert b"URI Too Long" in resp.raw.split(b"\r\n", 1)[0]


def test_header_section_too_large_is_431(stack: Stack) -> None:
    # The default max_header_bytes is 65536.
    fields = [f"X-Pad-{i}: {'p' * 1000}" for i in range(70)]
    refused_upstream_silent(stack, post(stack, *fields), 431)


def test_content_length_with_transfer_encoding_is_400_and_closes(stack: Stack) -> None:
    head = post(stack, "Content-Length: 5", "Transfer-Encoding: chunked")
    resp = refused_upstream_silent(stack, head, 400, body=b"0\r\n\r\n")
    assert b"both Content-Length and Transfer-Encoding" in resp.body


def test_two_different_content_lengths_are_400(stack: Stack) -> None:
    head = post(stack, "Content-Length: 5", "Content-Length: 6")
    resp = refused_upstream_silent(stack, head, 400, body=b"hello")
    assert b"more than one Content-Length value" in resp.body


@pytest.mark.parametrize("value", ["chunked, gzip", "gzip", "chunked, chunked", "identity"])
def test_transfer_encoding_other_than_final_chunked_is_400(stack: Stack, value: str) -> None:
    head = post(stack, f"Transfer-Encoding: {value}")
    resp = refused_upstream_silent(stack, head, 400, body=b"0\r\n\r\n")
    assert b"does not end in a single chunked" in resp.body


def test_invalid_chunk_size_is_400_and_upstream_never_gets_a_complete_request(
    stack: Stack,
) -> None:
    # The head is valid, so kushi forwards it and streams the body; the bad chunk size is
    # found mid-body. kushi must then answer 400 and cut the upstream connection, so the
    # origin holds the head and at most the chunks before the bad one, never a whole request.
    mark = stack.origin.count()
    head = post(stack, "Transfer-Encoding: chunked")
    resp = stack.send(head, b"5\r\nhello\r\nzz\r\nworld\r\n0\r\n\r\n", expect_close=True)
    arrived = stack.origin.since(mark)
    stack.origin.wait_closed(arrived)
    assert len(arrived) <= 1
    for conn in arrived:
        data = conn.snapshot()
        assert data.startswith(b"POST /upload HTTP/1.1\r\n")
        assert request_end(data) is None, f"the origin got a complete request: {data!r}"
        assert not conn.answered
    assert_refused(resp, 400, "http_request_error")
    assert b"invalid chunk size" in resp.body
    assert_still_serving(stack)


@pytest.mark.parametrize(
    "fields",
    [["X-Folded: a", " b"], ["X-Folded: a", "\tb"]],
    ids=["space", "tab"],
)
def test_obs_fold_is_400(stack: Stack, fields: list[str]) -> None:
    resp = refused_upstream_silent(stack, post(stack, *fields), 400)
    assert b"obs-fold" in resp.body


def test_nul_in_a_header_is_400(stack: Stack) -> None:
    refused_upstream_silent(stack, post(stack, "X-Nul: a\x00b"), 400)
    refused_upstream_silent(stack, post(stack, "X-Nul\x00: ab"), 400)


def test_whitespace_before_colon_is_400(stack: Stack) -> None:
    refused_upstream_silent(stack, post(stack, "Content-Length : 0"), 400)
    refused_upstream_silent(stack, post(stack, "X-Custom\t: 0"), 400)


def test_http2_request_line_is_505(stack: Stack) -> None:
    head = f"GET {stack.url()} HTTP/2.0\r\nHost: {stack.origin.authority}\r\n\r\n".encode()
    resp = refused_upstream_silent(stack, head, 505)
    assert resp.raw.startswith(b"HTTP/1.1 505 HTTP Version Not Supported\r\n")


def test_connect_to_a_disallowed_port_is_403(stack: Stack) -> None:
    # The origin really listens on this port, so "nothing upstream" means something.
    authority = stack.origin.authority
    head = f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode()
    resp = refused_upstream_silent(stack, head, 403, "http_request_denied", close=False)
    assert f"CONNECT to port {stack.origin.port} is not allowed" in resp.proxy_status


def test_client_outside_the_allow_list_is_403(stack: Stack) -> None:
    mark = stack.origin.count()
    head = f"GET {stack.url()} HTTP/1.1\r\nHost: {stack.origin.authority}\r\n\r\n".encode()
    for _ in range(2):  # and it keeps answering
        resp = exchange(stack.acl_proxy, head)
        assert_refused(resp, 403, "http_request_denied", close=False)
        assert "client 127.0.0.1 is not in this listener's allow list" in resp.proxy_status
    assert stack.origin.since(mark) == []
    assert stack.acl_kushi.proc.poll() is None
    assert_still_serving(stack)


def test_absolute_form_https_url_is_400(stack: Stack) -> None:
    authority = stack.origin.authority
    head = f"GET https://{authority}/x HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode()
    resp = refused_upstream_silent(stack, head, 400)
    assert "use a CONNECT tunnel" in resp.proxy_status


def test_refusals_are_logged(stack: Stack) -> None:
    # A refusal is one access-log record naming its status, error type and details.
    before = len(stack.kushi.json_records())
    head = f"GET {stack.url()} HTTP/1.1\r\nHost: a\r\nX-Logged-Bad : 1\r\n\r\n".encode()
    refused_upstream_silent(stack, head, 400)  # then one normal request: two records
    records = stack.kushi.wait_records(before + 2)[before:]
    refusals = [r for r in records if "X-Logged-Bad " in r.get("details", "")]
    assert len(refusals) == 1, records
    assert refusals[0]["status"] == 400
    assert refusals[0]["error"] == "http_request_error"
    assert refusals[0]["client"] == "127.0.0.1"
