"""Unit tests of kushi.http1, the sans-IO HTTP/1.1 parser: bytes in, heads and events out.

No sockets: every rule is exercised by feeding bytes. Sections follow the module: request
line, versions, fields, Host, framing (Content-Length, Transfer-Encoding), head limits,
request targets, body readers, responses, serialisers and the error response.
"""

from __future__ import annotations

import pytest

from kushi import http1
from kushi.errors import (
    HeaderTooLarge,
    KushiError,
    RequestDenied,
    RequestError,
    ResponseHeaderTooLarge,
    ResponseIncomplete,
    UpstreamError,
    URITooLong,
    VersionNotSupported,
)
from kushi.http1 import (
    NO_BODY,
    ChunkedReader,
    ContentLengthReader,
    Data,
    EndOfMessage,
    Framing,
    UntilCloseReader,
    parse_request_head,
    parse_response_head,
    parse_target,
)

pytestmark = pytest.mark.timeout(30)


def req(*lines: bytes | str, version: str = "HTTP/1.1", host: bool = True) -> bytes:
    """A request head: ``GET / <version>``, a Host field, then ``lines``."""
    out = [f"GET / {version}".encode()]
    if host:
        out.append(b"Host: example.com")
    out.extend(line.encode("latin-1") if isinstance(line, str) else line for line in lines)
    return b"\r\n".join(out) + b"\r\n\r\n"


def resp(status_line: bytes, *lines: bytes) -> bytes:
    return b"\r\n".join([status_line, *lines]) + b"\r\n\r\n"


# --- request line ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "line, method, target",
    [
        (b"GET /index.html?q=1 HTTP/1.1", b"GET", b"/index.html?q=1"),
        (b"POST http://example.com/x HTTP/1.1", b"POST", b"http://example.com/x"),
        (b"CONNECT example.com:443 HTTP/1.1", b"CONNECT", b"example.com:443"),
        (b"OPTIONS * HTTP/1.1", b"OPTIONS", b"*"),
        (b"M-SEARCH /x HTTP/1.1", b"M-SEARCH", b"/x"),  # any token is a method
        (b"get / HTTP/1.1", b"get", b"/"),  # methods are case-sensitive: kept as sent
    ],
)
def test_request_line_forms(line: bytes, method: bytes, target: bytes) -> None:
    head = parse_request_head(line + b"\r\nHost: example.com\r\n\r\n")
    assert (head.method, head.target, head.version) == (method, target, (1, 1))
    assert head.headers == [(b"Host", b"example.com")]
    assert head.framing == NO_BODY


def test_leading_empty_lines_are_ignored() -> None:
    # RFC 9112 section 2.2: at least one empty line before the request-line is ignored.
    head = parse_request_head(b"\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n")
    assert head.method == b"GET"


def test_head_without_the_final_crlfcrlf_parses() -> None:
    assert parse_request_head(b"GET / HTTP/1.1\r\nHost: a").target == b"/"


@pytest.mark.parametrize(
    "line",
    [
        b"GET  / HTTP/1.1",  # two spaces
        b"GET / HTTP/1.1 ",  # trailing space
        b" GET / HTTP/1.1",
        b"GET /",  # no version
        b"GET",
        b"",
        b"GET / extra HTTP/1.1",
        b"GET\t/\tHTTP/1.1",
        b"G(T / HTTP/1.1",  # not a token
        b"GET /a\x00b HTTP/1.1",  # NUL in the target
        b"GET /a\x7fb HTTP/1.1",
    ],
)
def test_malformed_request_line_is_400(line: bytes) -> None:
    with pytest.raises(RequestError) as info:
        parse_request_head(line + b"\r\nHost: a\r\n\r\n")
    assert info.value.status == 400
    assert info.value.error_type == "http_request_error"
    assert info.value.close


# --- versions ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "version, parsed, keep_alive",
    [("HTTP/1.1", (1, 1), True), ("HTTP/1.0", (1, 0), False), ("HTTP/1.2", (1, 1), True)],
)
def test_supported_versions(version: str, parsed: tuple[int, int], keep_alive: bool) -> None:
    head = parse_request_head(req(version=version))
    assert head.version == parsed
    assert head.keep_alive is keep_alive


@pytest.mark.parametrize("version", ["HTTP/2.0", "HTTP/3.0", "HTTP/0.9"])
def test_other_major_versions_are_505(version: str) -> None:
    with pytest.raises(VersionNotSupported) as info:
        parse_request_head(req(version=version))
    assert info.value.status == 505
    assert info.value.error_type == "http_request_error"


@pytest.mark.parametrize(
    "version", ["HTTP/1", "HTTP/1.10", "HTTP/11", "http/1.1", "HTTP/1.x", "HTTPS/1.1", "XYZ"]
)
def test_garbage_versions_are_400(version: str) -> None:
    with pytest.raises(RequestError) as info:
        parse_request_head(req(version=version))
    assert info.value.status == 400


def test_http10_request_without_host_is_fine() -> None:
    head = parse_request_head(b"GET / HTTP/1.0\r\n\r\n")
    assert head.version == (1, 0)
    assert head.get(b"host") is None


@pytest.mark.parametrize(
    "version, connection, keep_alive",
    [
        ("HTTP/1.1", "close", False),
        ("HTTP/1.1", "Keep-Alive, Close", False),
        ("HTTP/1.1", "keep-alive", True),
        ("HTTP/1.0", "keep-alive", True),
        ("HTTP/1.0", "close", False),
    ],
)
def test_connection_decides_keep_alive(version: str, connection: str, keep_alive: bool) -> None:
    head = parse_request_head(req(f"Connection: {connection}", version=version))
    assert head.keep_alive is keep_alive


def test_expect_and_upgrade() -> None:
    head = parse_request_head(
        req("Expect: 100-Continue", "Connection: Upgrade", "Upgrade: websocket")
    )
    assert head.expect_continue
    assert head.upgrade == b"websocket"
    plain = parse_request_head(req("Upgrade: websocket"))  # not named in Connection
    assert plain.upgrade is None
    assert not plain.expect_continue


# --- header fields -------------------------------------------------------------------------


def test_fields_keep_order_case_and_strip_ows() -> None:
    head = parse_request_head(
        req("X-A:  one two \t", "x-b:\tv", "X-Empty:", "X-Empty2:   ", "X-Tab: a\tb")
    )
    assert head.headers[1:] == [
        (b"X-A", b"one two"),
        (b"x-b", b"v"),
        (b"X-Empty", b""),
        (b"X-Empty2", b""),
        (b"X-Tab", b"a\tb"),
    ]
    assert head.get(b"x-a") == b"one two"
    assert http1.get_all(head.headers, b"x-empty") == [b""]


def test_obs_text_in_a_value_is_allowed() -> None:
    head = parse_request_head(req(b"X-Latin: caf\xe9 \x85\x93\xa0"))
    assert head.get(b"x-latin") == b"caf\xe9 \x85\x93\xa0"


def test_tchar_names_are_allowed() -> None:
    name = b"My-Custom-Header.!#$%&'*+^_`|~0123456789"
    assert parse_request_head(req(name + b": v")).headers[1] == (name, b"v")


@pytest.mark.parametrize(
    "line",
    [
        "X-Folded: a\r\n b",  # obs-fold with SP
        "X-Folded: a\r\n\tb",  # obs-fold with HTAB
    ],
)
def test_obs_fold_is_rejected(line: str) -> None:
    with pytest.raises(RequestError, match="obs-fold"):
        parse_request_head(req(line))


def test_obs_fold_right_after_the_request_line_is_rejected() -> None:
    with pytest.raises(RequestError):
        parse_request_head(b"GET / HTTP/1.1\r\n Host: a\r\n\r\n")


@pytest.mark.parametrize(
    "line",
    ["Host : a", "Content-Length : 5", "X-A\t: b", "Transfer-Encoding \t: chunked"],
)
def test_whitespace_before_colon_is_rejected(line: str) -> None:
    # RFC 9112 section 5.1: a server MUST reject it with 400.
    with pytest.raises(RequestError, match="invalid header field name"):
        parse_request_head(b"GET / HTTP/1.1\r\n" + line.encode() + b"\r\nHost: b\r\n\r\n")


@pytest.mark.parametrize(
    "line",
    [
        b"X-A\x00: v",
        b"\x00X-A: v",
        b"X-\x01A: v",
        b"X-A\x7f: v",
        b"X-\xc3\xa9: v",  # non-ASCII in a name
        b"X(A): v",
        b": v",  # empty name
        b"X A: v",
    ],
)
def test_bad_bytes_in_a_name_are_rejected(line: bytes) -> None:
    with pytest.raises(RequestError):
        parse_request_head(req(line))


@pytest.mark.parametrize(
    "value",
    [b"a\x00b", b"\x00", b"a\x01", b"\x1fa", b"a\x7fb", b"a\x0bb", b"a\x0cb"],
)
def test_control_bytes_in_a_value_are_rejected(value: bytes) -> None:
    with pytest.raises(RequestError, match="invalid characters"):
        parse_request_head(req(b"X-A: " + value))


def test_line_without_colon_is_rejected() -> None:
    with pytest.raises(RequestError, match="without a colon"):
        parse_request_head(req("NoColonHere"))


@pytest.mark.parametrize(
    "head",
    [
        b"GET / HTTP/1.1\nHost: a\r\n\r\n",  # bare LF ends the request line
        b"GET / HTTP/1.1\r\nHost: a\nX: b\r\n\r\n",  # bare LF inside the fields
        b"GET / HTTP/1.1\r\nHost: a\rX: b\r\n\r\n",  # bare CR
        b"GET / HTTP/1.1\r\nX: a\rb\r\nHost: a\r\n\r\n",  # CR inside a value
        b"GET /a\rb HTTP/1.1\r\nHost: a\r\n\r\n",
    ],
)
def test_bare_cr_or_lf_is_rejected(head: bytes) -> None:
    with pytest.raises(RequestError):
        parse_request_head(head)


# --- Host ----------------------------------------------------------------------------------


def test_http11_without_host_is_400() -> None:
    with pytest.raises(RequestError, match="without a Host"):
        parse_request_head(req(host=False))


def test_two_host_fields_are_400() -> None:
    with pytest.raises(RequestError, match="more than one Host"):
        parse_request_head(req("Host: other.example"))
    with pytest.raises(RequestError, match="more than one Host"):
        parse_request_head(req("host: example.com"))  # even identical ones


@pytest.mark.parametrize(
    "host",
    [b"example.com", b"example.com:8080", b"[2001:db8::1]", b"[2001:db8::1]:443", b"127.0.0.1"],
)
def test_valid_host(host: bytes) -> None:
    assert parse_request_head(b"GET / HTTP/1.1\r\nHost: " + host + b"\r\n\r\n").get(b"host")


def test_empty_host_is_allowed() -> None:
    # RFC 9112 section 3.2: empty when the target has no authority.
    assert parse_request_head(b"GET / HTTP/1.1\r\nHost:\r\n\r\n").get(b"host") == b""


@pytest.mark.parametrize(
    "host",
    [
        b"exa mple.com",
        b"example.com:port",
        b"example.com:65536",
        b"example.com:123456",
        b"[2001:db8::1",
        b"[zz::1]",
        b"[::1]x",
        b"user@example.com",
        b"example.com/path",
        b":80",
    ],
)
def test_invalid_host_is_400(host: bytes) -> None:
    with pytest.raises(RequestError, match="invalid Host"):
        parse_request_head(b"GET / HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")


# --- Content-Length --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "lines, length",
    [
        (["Content-Length: 5"], 5),
        (["Content-Length:   5  "], 5),
        (["content-length: 007"], 7),
        (["Content-Length: 999999999999999999"], 999999999999999999),  # 18 digits
    ],
)
def test_content_length(lines: list[str], length: int) -> None:
    head = parse_request_head(req(*lines))
    assert head.framing == Framing("length", length)


@pytest.mark.parametrize(
    "lines", [["Content-Length: 5", "Content-Length: 5"], ["Content-Length: 5, 5"]]
)
def test_request_content_length_lists_are_refused(lines: list[str]) -> None:
    # The corpus rates "Content-Length: 1000,1000" Severe: a request carries one value.
    with pytest.raises(RequestError, match="more than one Content-Length"):
        parse_request_head(req(*lines))


def test_content_length_zero_is_no_body() -> None:
    assert parse_request_head(req("Content-Length: 0")).framing == NO_BODY


@pytest.mark.parametrize(
    "lines",
    [
        ["Content-Length: 5", "Content-Length: 6"],
        ["Content-Length: 5, 6"],
        ["Content-Length: 5,"],  # an empty list element is not a number
    ],
)
def test_differing_content_lengths_are_rejected(lines: list[str]) -> None:
    with pytest.raises(RequestError):
        parse_request_head(req(*lines))


@pytest.mark.parametrize(
    "value",
    [b"", b"+5", b"-1", b"0x10", b"1 000", b"1.0", b"5a", b"1e3", b"\xd9\xa5", b"1" + b"0" * 18],
)
def test_non_digit_content_length_is_rejected(value: bytes) -> None:
    with pytest.raises(RequestError, match="Content-Length"):
        parse_request_head(req(b"Content-Length: " + value))


# --- Transfer-Encoding -----------------------------------------------------------------------


@pytest.mark.parametrize("value", ["chunked", "Chunked", "CHUNKED", " chunked "])
def test_chunked_is_the_only_transfer_coding(value: str) -> None:
    head = parse_request_head(req(f"Transfer-Encoding: {value}"))
    assert head.framing == Framing("chunked")


@pytest.mark.parametrize(
    ("lines", "codings"),
    [
        (["Transfer-Encoding: gzip, chunked"], (b"gzip",)),
        (["Transfer-Encoding: gzip", "Transfer-Encoding: chunked"], (b"gzip",)),
        (["Transfer-Encoding: deflate, identity, chunked"], (b"deflate",)),
        (["Transfer-Encoding: chunked;ext=1"], ()),
    ],
)
def test_codings_before_a_final_chunked_travel_on(
    lines: list[str], codings: tuple[bytes, ...]
) -> None:
    head = parse_request_head(req(*lines))
    assert head.framing == Framing("chunked")
    assert head.codings == codings


def test_raw_non_ascii_target_is_accepted() -> None:
    head = parse_request_head(b"GET /\xc3\xa9 HTTP/1.1\r\nHost: a\r\n\r\n")
    assert head.target == b"/\xc3\xa9"


@pytest.mark.parametrize(
    "lines",
    [
        ["Transfer-Encoding: chunked, gzip"],
        ["Transfer-Encoding: chunked, chunked"],
        ["Transfer-Encoding: chunked", "Transfer-Encoding: chunked"],
        ["Transfer-Encoding: identity"],
        ["Transfer-Encoding: xchunked"],
        ["Transfer-Encoding:"],
    ],
)
def test_transfer_encoding_other_than_exactly_chunked_is_rejected(lines: list[str]) -> None:
    with pytest.raises(RequestError, match="Transfer-Encoding"):
        parse_request_head(req(*lines))


@pytest.mark.parametrize(
    "lines",
    [
        ["Transfer-Encoding: chunked", "Content-Length: 5"],
        ["Content-Length: 5", "Transfer-Encoding: chunked"],
        ["Content-Length: 0", "Transfer-Encoding: chunked"],
    ],
)
def test_transfer_encoding_with_content_length_is_rejected(lines: list[str]) -> None:
    with pytest.raises(RequestError, match="both Content-Length and Transfer-Encoding"):
        parse_request_head(req(*lines))


def test_transfer_encoding_in_http10_is_rejected() -> None:
    with pytest.raises(RequestError, match="HTTP/1.0"):
        parse_request_head(req("Transfer-Encoding: chunked", version="HTTP/1.0"))


# --- find_head_end -----------------------------------------------------------------------


def test_find_head_end_incomplete_and_complete() -> None:
    assert http1.find_head_end(b"", 100, 1000) == -1
    assert http1.find_head_end(b"GET / HTTP/1.1\r\nHost: a\r\n", 100, 1000) == -1
    data = b"GET / HTTP/1.1\r\nHost: a\r\n\r\nNEXT"
    assert http1.find_head_end(data, 100, 1000) == len(data) - 4
    assert http1.find_head_end(bytearray(data), 100, 1000) == len(data) - 4


def test_long_request_line_is_414_before_the_line_ends() -> None:
    line = b"GET /" + b"a" * 200
    assert http1.find_head_end(line[:100], 100, 1000) == -1
    with pytest.raises(URITooLong) as info:
        http1.find_head_end(line, 100, 1000)
    assert info.value.status == 414


def test_long_request_line_is_414_in_a_complete_head() -> None:
    head = b"GET /" + b"a" * 200 + b" HTTP/1.1\r\nHost: a\r\n\r\n"
    with pytest.raises(URITooLong):
        http1.find_head_end(head, 100, 1000)


def test_request_line_at_the_limit_is_fine() -> None:
    line = b"GET /" + b"a" * 86 + b" HTTP/1.1"
    assert len(line) == 100
    assert http1.find_head_end(line + b"\r\nHost: a\r\n\r\n", 100, 1000) > 0


def test_big_header_section_is_431() -> None:
    head = b"GET / HTTP/1.1\r\n" + b"X-Pad: " + b"p" * 2000 + b"\r\n"
    with pytest.raises(HeaderTooLarge) as info:
        http1.find_head_end(head, 100, 1000)
    assert info.value.status == 431
    # Complete but too big: the end is not searched past the limit.
    with pytest.raises(HeaderTooLarge):
        http1.find_head_end(head + b"\r\n", 100, 1000)


def test_response_head_limits_are_upstream_errors() -> None:
    with pytest.raises(ResponseHeaderTooLarge) as info:
        http1.find_head_end(b"HTTP/1.1 200 " + b"x" * 200, 100, 1000, response=True)
    assert info.value.status == 502
    with pytest.raises(ResponseHeaderTooLarge):
        http1.find_head_end(b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * 300, 100, 1000, response=True)


# --- request targets -----------------------------------------------------------------------


def test_origin_form() -> None:
    t = parse_target(b"GET", b"/a/b?c=d")
    assert (t.form, t.path, t.host) == ("origin", b"/a/b?c=d", "")


@pytest.mark.parametrize(
    "target, scheme, host, port, path, authority",
    [
        (b"http://example.com/x", "http", "example.com", 80, b"/x", "example.com"),
        (b"http://Example.COM", "http", "example.com", 80, b"/", "example.com"),
        (b"http://example.com?q=1", "http", "example.com", 80, b"/?q=1", "example.com"),
        (b"http://example.com:8080/", "http", "example.com", 8080, b"/", "example.com:8080"),
        (
            b"http://[2001:db8::1]:8080/x?y=[z]",
            "http",
            "2001:db8::1",
            8080,
            b"/x?y=[z]",
            "[2001:db8::1]:8080",
        ),
        (b"http://[::1]/", "http", "::1", 80, b"/", "[::1]"),
        (b"https://example.com/", "https", "example.com", 443, b"/", "example.com"),
        (b"HTTP://example.com/", "http", "example.com", 80, b"/", "example.com"),
        (b"http://example.com:/", "http", "example.com", 80, b"/", "example.com"),
        (b"http://h/a@b", "http", "h", 80, b"/a@b", "h"),  # '@' in the path is fine
    ],
)
def test_absolute_form(
    target: bytes, scheme: str, host: str, port: int, path: bytes, authority: str
) -> None:
    t = parse_target(b"GET", target)
    assert (t.form, t.scheme, t.host, t.port, t.path) == ("absolute", scheme, host, port, path)
    assert t.authority == authority


@pytest.mark.parametrize(
    "target, host, port",
    [
        (b"example.com:443", "example.com", 443),
        (b"[2001:db8::1]:8443", "2001:db8::1", 8443),
        (b"192.0.2.1:22", "192.0.2.1", 22),
    ],
)
def test_authority_form_for_connect(target: bytes, host: str, port: int) -> None:
    t = parse_target(b"CONNECT", target)
    assert (t.form, t.host, t.port, t.path) == ("authority", host, port, b"")
    assert t.authority == (f"[{host}]:{port}" if ":" in host else f"{host}:{port}")


@pytest.mark.parametrize(
    "target",
    [b"example.com", b"example.com:", b"example.com:0", b"[2001:db8::1]", b"/path", b"a:b:c"],
)
def test_connect_needs_host_and_port(target: bytes) -> None:
    with pytest.raises(RequestError):
        parse_target(b"CONNECT", target)


def test_asterisk_form() -> None:
    assert parse_target(b"OPTIONS", b"*").form == "asterisk"
    with pytest.raises(RequestError, match="asterisk"):
        parse_target(b"GET", b"*")


@pytest.mark.parametrize(
    "target",
    [b"http://user@example.com/", b"http://user:pass@example.com/", b"http://@example.com/"],
)
def test_userinfo_is_refused(target: bytes) -> None:
    with pytest.raises(RequestError, match="user information"):
        parse_target(b"GET", target)


@pytest.mark.parametrize(
    "target",
    [
        b"example.com/x",  # no scheme
        b"http:/example.com/",
        b"://example.com/",
        b"ht tp://example.com/",
        b"http:///x",  # empty host
        b"http://exa mple.com/",
        b"http://example.com:99999/",
        b"http://example.com:-1/",
        b"http://[2001:db8::1/",
        b"http://[2001:db8::g]/",
        b"http://2001:db8::1/",  # unbracketed IPv6
    ],
)
def test_invalid_targets(target: bytes) -> None:
    with pytest.raises(RequestError):
        parse_target(b"GET", target)


# --- ChunkedReader ---------------------------------------------------------------------------


def read_all(
    reader: ChunkedReader | ContentLengthReader, buf: bytearray
) -> tuple[bytes, list[http1.Header]]:
    """Feed ``buf`` until EndOfMessage: (data, trailers). Fails if more input is needed."""
    out = bytearray()
    while True:
        event = reader.read(buf)
        assert event is not None, "reader wants more input"
        if isinstance(event, EndOfMessage):
            return bytes(out), event.trailers
        out += event.data


@pytest.mark.parametrize(
    "wire, body",
    [
        (b"0\r\n\r\n", b""),
        (b"5\r\nhello\r\n0\r\n\r\n", b"hello"),
        (b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n", b"hello world"),
        (b"a\r\n0123456789\r\n0\r\n\r\n", b"0123456789"),
        (b"A\r\n0123456789\r\n0\r\n\r\n", b"0123456789"),
        (b"00005\r\nhello\r\n000\r\n\r\n", b"hello"),
        (b"5;ext=1\r\nhello\r\n0\r\n\r\n", b"hello"),
        (b'5 ; name="quoted value"\r\nhello\r\n0;last\r\n\r\n', b"hello"),
        (b"5\t;x\r\nhello\r\n0\r\n\r\n", b"hello"),
    ],
)
def test_chunked_sizes_and_extensions(wire: bytes, body: bytes) -> None:
    buf = bytearray(wire)
    data, trailers = read_all(ChunkedReader(), buf)
    assert data == body
    assert trailers == []
    assert buf == b""


def test_chunked_trailers_and_pipelined_bytes_stay_in_the_buffer() -> None:
    buf = bytearray(b"3\r\nabc\r\n0\r\nX-Sum: 1\r\nX-Other:  two \r\n\r\nGET / HTTP/1.1\r\n")
    reader = ChunkedReader()
    data, trailers = read_all(reader, buf)
    assert data == b"abc"
    assert trailers == [(b"X-Sum", b"1"), (b"X-Other", b"two")]
    assert buf == b"GET / HTTP/1.1\r\n"
    assert reader.read(buf) == EndOfMessage(trailers)  # done stays done
    assert reader.eof() == EndOfMessage(trailers)


@pytest.mark.parametrize(
    "wire",
    [
        b"\r\n",  # empty size
        b"g\r\n",
        b"-1\r\n",
        b"+5\r\n",
        b"0x5\r\n",
        b" 5\r\n",
        b"5 5\r\n",
        b"1000000000000000\r\n",  # 16 hex digits: too large
        b"5;\x00\r\n",  # control byte in an extension
        b"5\nhello\r\n",  # bare LF after the size
        b"5\rhello\r\n",
    ],
)
def test_invalid_chunk_sizes(wire: bytes) -> None:
    with pytest.raises(RequestError) as info:
        read_all(ChunkedReader(), bytearray(wire + b"hello\r\n0\r\n\r\n"))
    assert info.value.status == 400


@pytest.mark.parametrize(
    "wire",
    [
        b"3\r\nabcdef\r\n0\r\n\r\n",  # data longer than declared
        b"3\r\nabcX\r\n",
        b"3\r\nabc\n0\r\n\r\n",  # bare LF after the data
        b"3\r\nabc0\r\n\r\n",
    ],
)
def test_chunk_data_longer_than_declared(wire: bytes) -> None:
    with pytest.raises(RequestError):
        read_all(ChunkedReader(), bytearray(wire))


def test_bad_trailer_field_is_rejected() -> None:
    with pytest.raises(RequestError):
        read_all(ChunkedReader(), bytearray(b"0\r\nBad Name: x\r\n\r\n"))
    with pytest.raises(RequestError, match="obs-fold"):
        read_all(ChunkedReader(), bytearray(b"0\r\nX: a\r\n b\r\n\r\n"))


def test_overlong_chunk_line_is_rejected() -> None:
    reader = ChunkedReader(max_line=16)
    with pytest.raises(RequestError):
        reader.read(bytearray(b"5;" + b"e" * 40))


def test_trailer_section_is_limited() -> None:
    line = b"X-T: " + b"t" * 4000 + b"\r\n"
    with pytest.raises(RequestError, match="trailer section too large"):
        read_all(ChunkedReader(), bytearray(b"0\r\n" + line * 20 + b"\r\n"))


def test_chunked_error_class_is_configurable() -> None:
    with pytest.raises(UpstreamError):
        read_all(ChunkedReader(UpstreamError), bytearray(b"zz\r\n"))


def test_chunked_byte_by_byte() -> None:
    wire = b"5;x=y\r\nhello\r\n1\r\n \r\n0\r\nT: v\r\n\r\nNEXT"
    reader = ChunkedReader()
    buf = bytearray()
    data = bytearray()
    end: EndOfMessage | None = None
    for i, byte in enumerate(wire):
        buf.append(byte)
        while True:
            event = reader.read(buf)
            if event is None:
                break
            if isinstance(event, EndOfMessage):
                end = event
                break
            data += event.data
        if end is not None:
            rest = wire[i + 1 :]
            break
    assert end == EndOfMessage([(b"T", b"v")])
    assert data == b"hello "
    assert rest == b"NEXT"


def test_chunked_eof_in_the_middle_is_incomplete() -> None:
    reader = ChunkedReader()
    buf = bytearray(b"5\r\nhel")
    assert reader.read(buf) == Data(b"hel")
    assert reader.read(buf) is None
    with pytest.raises(ResponseIncomplete):
        reader.eof()


# --- ContentLengthReader and UntilCloseReader ------------------------------------------


def test_content_length_reader() -> None:
    reader = ContentLengthReader(5)
    buf = bytearray(b"he")
    assert reader.read(buf) == Data(b"he")
    assert reader.read(buf) is None
    buf += b"lloGET"
    assert reader.read(buf) == Data(b"llo")
    assert buf == b"GET"  # the next request stays
    assert reader.read(buf) == EndOfMessage()
    assert reader.eof() == EndOfMessage()


def test_content_length_reader_zero_and_eof() -> None:
    assert ContentLengthReader(0).read(bytearray(b"x")) == EndOfMessage()
    reader = ContentLengthReader(3)
    reader.read(bytearray(b"a"))
    with pytest.raises(ResponseIncomplete, match="2 body bytes missing"):
        reader.eof()


def test_until_close_reader() -> None:
    reader = UntilCloseReader()
    buf = bytearray(b"abc")
    assert reader.read(buf) == Data(b"abc")
    assert buf == b""
    assert reader.read(buf) is None
    assert reader.eof() == EndOfMessage()


def test_body_reader_dispatch() -> None:
    assert isinstance(http1.body_reader(Framing("chunked"), RequestError), ChunkedReader)
    assert isinstance(http1.body_reader(Framing("close"), UpstreamError), UntilCloseReader)
    length = http1.body_reader(Framing("length", 7), RequestError)
    assert isinstance(length, ContentLengthReader) and length.remaining == 7
    none = http1.body_reader(NO_BODY, RequestError)
    assert isinstance(none, ContentLengthReader) and none.remaining == 0


# --- responses -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "method, status_line, lines, framing",
    [
        (b"GET", b"HTTP/1.1 200 OK", [b"Content-Length: 5"], Framing("length", 5)),
        (b"GET", b"HTTP/1.1 200 OK", [b"Transfer-Encoding: chunked"], Framing("chunked")),
        (b"HEAD", b"HTTP/1.1 200 OK", [b"Content-Length: 5"], NO_BODY),
        (b"HEAD", b"HTTP/1.1 200 OK", [b"Transfer-Encoding: chunked"], NO_BODY),
        (b"GET", b"HTTP/1.1 204 No Content", [], NO_BODY),
        (b"GET", b"HTTP/1.1 304 Not Modified", [b"Content-Length: 99"], NO_BODY),
        (b"GET", b"HTTP/1.1 100 Continue", [], NO_BODY),
        (b"GET", b"HTTP/1.1 103 Early Hints", [b"Link: </a>"], NO_BODY),
        (b"GET", b"HTTP/1.1 101 Switching Protocols", [b"Upgrade: websocket"], NO_BODY),
        (b"CONNECT", b"HTTP/1.1 200 Connection established", [], NO_BODY),
        (b"CONNECT", b"HTTP/1.1 407 Auth", [b"Content-Length: 3"], Framing("length", 3)),
        (b"GET", b"HTTP/1.1 200 OK", [b"Content-Length: 5, 5"], Framing("length", 5)),
        (b"GET", b"HTTP/1.1 200 OK", [b"Content-Length: 0"], Framing("length", 0)),
    ],
)
def test_response_framing(
    method: bytes, status_line: bytes, lines: list[bytes], framing: Framing
) -> None:
    head = parse_response_head(resp(status_line, *lines), method)
    assert head.framing == framing
    assert head.keep_alive


@pytest.mark.parametrize(
    "lines",
    [[], [b"Transfer-Encoding: gzip"], [b"Transfer-Encoding: chunked, gzip"]],
)
def test_close_delimited_response(lines: list[bytes]) -> None:
    head = parse_response_head(resp(b"HTTP/1.1 200 OK", *lines), b"GET")
    assert head.framing == Framing("close")
    assert not head.keep_alive


def test_response_fields_and_keep_alive() -> None:
    head = parse_response_head(
        resp(b"HTTP/1.1 404 Not Found", b"Content-Length: 0", b"Connection: close"), b"GET"
    )
    assert (head.status, head.reason, head.version) == (404, b"Not Found", (1, 1))
    assert not head.keep_alive
    old = parse_response_head(resp(b"HTTP/1.0 200 OK", b"Content-Length: 1"), b"GET")
    assert old.version == (1, 0) and not old.keep_alive
    kept = parse_response_head(
        resp(b"HTTP/1.0 200 OK", b"Content-Length: 1", b"Connection: keep-alive"), b"GET"
    )
    assert kept.keep_alive
    bare = parse_response_head(resp(b"HTTP/1.1 200", b"Content-Length: 1"), b"GET")
    assert bare.reason == b""


@pytest.mark.parametrize(
    "status_line, lines",
    [
        (b"HTTP/1.1 200 OK", [b"Transfer-Encoding: chunked", b"Content-Length: 5"]),
        (b"HTTP/1.1 204 No Content", [b"Transfer-Encoding: chunked", b"Content-Length: 0"]),
        (b"HTTP/1.1 200 OK", [b"Content-Length: 5", b"Content-Length: 6"]),
        (b"HTTP/1.1 200 OK", [b"Content-Length: abc"]),
        (b"HTTP/1.1 304 Not Modified", [b"Content-Length: abc"]),
        (b"HTTP/1.1 200 OK", [b"Transfer-Encoding: gzip, chunked"]),  # not decodable
        (b"HTTP/1.0 200 OK", [b"Transfer-Encoding: chunked"]),
        (b"HTTP/2.0 200 OK", []),
        (b"HTTP/1.1 099 Low", []),
        (b"HTTP/1.1 20 OK", []),
        (b"HTTP/1.1  200 OK", []),
        (b"http/1.1 200 OK", []),
        (b"ICY 200 OK", []),
        (b"HTTP/1.1 200 OK", [b"Bad Name: x"]),
        (b"HTTP/1.1 200 OK", [b"X: a\x00b"]),
        (b"HTTP/1.1 200 OK", [b"X: a", b" folded"]),
        (b"HTTP/1.1 200 OK\nX: y", []),
    ],
)
def test_broken_responses_are_upstream_errors(status_line: bytes, lines: list[bytes]) -> None:
    with pytest.raises(UpstreamError) as info:
        parse_response_head(resp(status_line, *lines), b"GET")
    assert info.value.status == 502
    assert info.value.error_type == "http_protocol_error"


@pytest.mark.parametrize("status_line", [b"HTTP/1.1 2000 OK", b"HTTP/1.1 200OK"])
def test_status_code_must_be_followed_by_space(status_line: bytes) -> None:
    # RFC 9112 section 4: status-code SP reason; a 4-digit code must not read as 200.
    with pytest.raises(UpstreamError):
        parse_response_head(resp(status_line, b"Content-Length: 0"), b"GET")


# --- headers helpers and serialisers ---------------------------------------------------


def test_split_list_and_connection_tokens() -> None:
    assert http1.split_list([b" a, ,B ", b"c"]) == [b"a", b"b", b"c"]
    headers = [(b"Connection", b"Keep-Alive, X-Secret"), (b"connection", b"close")]
    assert http1.connection_tokens(headers) == {b"keep-alive", b"x-secret", b"close"}


def test_strip_hop_by_hop() -> None:
    headers = [
        (b"Host", b"a"),
        (b"Connection", b"X-Secret, upgrade"),
        (b"X-Secret", b"1"),
        (b"Keep-Alive", b"timeout=5"),
        (b"TE", b"trailers"),
        (b"Transfer-Encoding", b"chunked"),
        (b"Upgrade", b"websocket"),
        (b"Proxy-Authorization", b"Basic x"),
        (b"Accept", b"*/*"),
    ]

    def strip(keep: frozenset[bytes] = frozenset()) -> list[tuple[bytes, bytes]]:
        drop = http1.drop_set(headers, keep=keep)
        return [(k, v) for k, v in headers if k.lower() not in drop]

    assert strip() == [(b"Host", b"a"), (b"Accept", b"*/*")]
    kept = strip(frozenset({b"upgrade"}))
    assert (b"Upgrade", b"websocket") in kept


def test_serialisers() -> None:
    assert (
        http1.serialize_request_head(b"GET", b"/x", [(b"Host", b"a"), (b"X", b"")])
        == b"GET /x HTTP/1.1\r\nHost: a\r\nX: \r\n\r\n"
    )
    assert http1.serialize_response_head(204, b"", []) == b"HTTP/1.1 204 No Content\r\n\r\n"
    assert http1.serialize_response_head(299, b"", []) == b"HTTP/1.1 299 \r\n\r\n"
    assert http1.encode_chunk(b"x" * 26) == b"1a\r\n" + b"x" * 26 + b"\r\n"
    assert http1.encode_last_chunk() == b"0\r\n\r\n"
    assert http1.encode_last_chunk([(b"T", b"v")]) == b"0\r\nT: v\r\n\r\n"


# --- Proxy-Status and error responses ----------------------------------------------------


def test_proxy_status_members_and_escaping() -> None:
    assert http1.proxy_status("kushi") == b"kushi"
    value = http1.proxy_status(
        "kushi",
        error="dns_error",
        next_hop="[2001:db8::1]:80",
        received_status=503,
        details='say "hi" \\ bye\x00\n\xe9',
    )
    assert value == (
        b'kushi; error=dns_error; next-hop="[2001:db8::1]:80"; received-status=503; '
        b'details="say \\"hi\\" \\\\ bye???"'
    )
    assert http1.sf_string("") == '""'


def parse_error_response(data: bytes) -> tuple[int, dict[bytes, bytes], bytes]:
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ")[1])
    fields = {}
    for line in lines[1:]:
        name, _, value = line.partition(b": ")
        fields[name.lower()] = value
    return status, fields, body


@pytest.mark.parametrize(
    "exc",
    [
        RequestError('bad "thing"'),
        URITooLong("request line longer than 8192 bytes"),
        HeaderTooLarge("big"),
        VersionNotSupported("HTTP/2.0"),
        RequestDenied("client 203.0.113.9 is not allowed"),
        UpstreamError("broken"),
    ],
)
def test_render_error(exc: KushiError) -> None:
    data = http1.render_error(exc, proxy_name="kushi", close=True, next_hop="[::1]:80")
    status, fields, body = parse_error_response(data)
    assert data.startswith(b"HTTP/1.1 %d %s\r\n" % (exc.status, http1.REASONS[exc.status].encode()))
    assert status == exc.status
    details = http1.sf_string(exc.details).encode()
    assert fields[b"proxy-status"] == (
        b"kushi; error=" + exc.error_type.encode() + b'; next-hop="[::1]:80"; details=' + details
    )
    assert fields[b"connection"] == b"close"
    assert fields[b"cache-control"] == b"no-store"
    assert int(fields[b"content-length"]) == len(body)
    assert exc.error_type.encode() in body


def test_render_error_keep_alive_head_only_and_extra_headers() -> None:
    exc = RequestDenied("nope")
    data = http1.render_error(
        exc,
        proxy_name="kushi",
        close=False,
        head_only=True,
        extra_headers=[(b"Proxy-Authenticate", b'Basic realm="kushi"')],
    )
    status, fields, body = parse_error_response(data)
    assert status == 403
    assert b"connection" not in fields
    assert body == b""
    assert int(fields[b"content-length"]) > 0  # the length of the body a GET would get
    assert fields[b"proxy-status"] == b'kushi; error=http_request_denied; details="nope"'
    assert fields[b"proxy-authenticate"] == b'Basic realm="kushi"'


def test_render_error_without_details() -> None:
    data = http1.render_error(RequestError(), proxy_name="kushi", close=True)
    _, fields, _ = parse_error_response(data)
    assert fields[b"proxy-status"] == b"kushi; error=http_request_error"


def test_split_authority_caches_only_short_authorities() -> None:
    """Long authorities are parsed every time, so a client cannot fill the cache with junk."""
    long_name = b"a" * 400 + b".test:8080"
    assert http1.split_authority(long_name) == ("a" * 400 + ".test", 8080)
    before = http1._split_authority_cached.cache_info().currsize
    for i in range(50):
        http1.split_authority(b"x" * 500 + str(i).encode())
    assert http1._split_authority_cached.cache_info().currsize == before
    assert http1.split_authority(b"[2001:db8::1]:443") == ("2001:db8::1", 443)
    assert http1._split_authority_cached.cache_info().currsize <= before + 1


def test_absolute_targets_are_cached_by_origin_and_only_short_ones() -> None:
    """The scheme and authority of an absolute-form target are parsed once per origin:
    the same answer every time (and a new Target each time), errors with the whole target
    in their message and never kept, long authorities parsed every time."""
    http1._absolute_parts_cached.cache_clear()
    first = parse_target(b"GET", b"http://Cache.Example:8080/a?x")
    second = parse_target(b"GET", b"http://Cache.Example:8080/b")
    assert first is not second
    assert (second.host, second.port, second.path, second.authority) == (
        "cache.example",
        8080,
        b"/b",
        "cache.example:8080",
    )
    assert first.path == b"/a?x"
    assert http1._absolute_parts_cached.cache_info().currsize == 1
    for _ in range(2):
        with pytest.raises(RequestError, match=r"invalid host in request target 'http://a b/x'"):
            parse_target(b"GET", b"http://a b/x")
        with pytest.raises(RequestError, match=r"invalid request target 'ht tp://a/'"):
            parse_target(b"GET", b"ht tp://a/")
        with pytest.raises(RequestError, match="user information"):
            parse_target(b"GET", b"http://u@a/")
    long_host = b"a" * 400 + b".test"
    for i in range(20):
        t = parse_target(b"GET", b"http://" + long_host + b":%d/" % (1000 + i))
        assert t.authority == f"{long_host.decode()}:{1000 + i}"
    assert http1._absolute_parts_cached.cache_info().currsize == 1


def test_buffered_chunked_body_is_checked_before_forwarding() -> None:
    chunked = http1.Framing("chunked")
    # Valid so far (a chunk in progress), or complete: nothing raised, the buffer untouched.
    buf = bytearray(b"5\r\nhel")
    http1.check_buffered_body(chunked, buf)
    assert buf == b"5\r\nhel"
    http1.check_buffered_body(chunked, bytearray(b"5\r\nhello\r\n0\r\n\r\nGET / HTTP/1.1\r\n"))
    for bad in (b"zz\r\n", b"5\r\nhelloX\r\n", b"5;\nx"):
        with pytest.raises(RequestError):
            http1.check_buffered_body(chunked, bytearray(bad))
    # Content-Length bodies have nothing to check.
    http1.check_buffered_body(http1.Framing("length", 3), bytearray(b"zz\r\n"))


def test_known_field_names_are_bounded_and_do_not_change_the_result() -> None:
    """The table of field-name spellings already found valid holds at most 512 names of
    at most 40 bytes: what clients send cannot grow it further, and a name left out of it
    is still checked and lower-cased as before."""
    http1._NAMES.clear()  # (a cache: emptying it changes nothing but what it holds)
    long_name = b"X-" + b"L" * 200
    req = http1.parse_request_head(b"GET / HTTP/1.1\r\nHost: a\r\n" + long_name + b": v\r\n\r\n")
    assert req.headers[-1] == (long_name, b"v")
    assert long_name not in http1._NAMES
    for i in range(http1._NAMES_MAX + 100):
        http1.parse_request_head(b"GET / HTTP/1.1\r\nHOST: a\r\nX-Name-%d: v\r\n\r\n" % i)
    assert len(http1._NAMES) <= http1._NAMES_MAX
    req = http1.parse_request_head(b"GET / HTTP/1.1\r\nhOsT: b\r\nX-Unkept-Name: v\r\n\r\n")
    assert req.get(b"host") == b"b"
    assert req.headers == [(b"hOsT", b"b"), (b"X-Unkept-Name", b"v")]
    with pytest.raises(RequestError, match="invalid header field name"):
        http1.parse_request_head(b"GET / HTTP/1.1\r\nHost: a\r\nBad Name: v\r\n\r\n")


def test_connection_options_remembered_are_bounded_and_do_not_change_the_result() -> None:
    """The options of the single Connection values seen first are kept (at most 64 values
    of at most 64 bytes); any other value, or several fields, is split every time."""
    http1._TOKEN_SETS.clear()  # (a cache: emptying it changes nothing but what it holds)
    for _ in range(2):
        resp = http1.parse_response_head(
            b"HTTP/1.1 200 OK\r\nConnection: Keep-Alive, X-Foo\r\nContent-Length: 0\r\n\r\n", b"GET"
        )
        assert resp.connection == {b"keep-alive", b"x-foo"} and resp.keep_alive
        resp = http1.parse_response_head(
            b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n", b"GET"
        )
        assert resp.connection == {b"close"} and not resp.keep_alive
    two = http1.parse_request_head(
        b"GET / HTTP/1.1\r\nHost: a\r\nConnection: a\r\nConnection: b\r\n\r\n"
    )
    assert two.connection == {b"a", b"b"}
    for i in range(100):
        req = http1.parse_request_head(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: o%d\r\n\r\n" % i)
        assert req.connection == {b"o%d" % i}
    long_value = b"x" * 65
    req = http1.parse_request_head(
        b"GET / HTTP/1.1\r\nHost: a\r\nConnection: " + long_value + b"\r\n\r\n"
    )
    assert req.connection == {long_value}
    assert len(http1._TOKEN_SETS) <= 64 and long_value not in http1._TOKEN_SETS
