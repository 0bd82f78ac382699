"""Property tests of kushi.http1 (hypothesis).

* Robustness: no input makes the parser raise anything but a ``KushiError`` (so the shell
  can always answer with ``render_error``): arbitrary bytes, and bytes built from HTTP-ish
  pieces so the deeper branches are reached too.
* Round trip: a request head the parser accepts, serialised again the way kushi sends it
  upstream, parses to the same method, target, fields and framing.
* The field section: a head is accepted exactly when its fields follow RFC 9112's
  ``field-line`` grammar (a regex of it here is the reference), and each field comes out as
  that grammar reads it, whether or not its name was seen before.
* Chunked coding: ``encode_chunk``/``encode_last_chunk`` then ``ChunkedReader`` gives back
  the same data and trailers, however the bytes are split on the way.
"""

from __future__ import annotations

import re

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from kushi import http1
from kushi.errors import KushiError, RequestError, UpstreamError, VersionNotSupported
from kushi.http1 import ChunkedReader, EndOfMessage, Header

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

pytestmark = pytest.mark.timeout(30)


# --- strategies --------------------------------------------------------------------------

TCHAR = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
tokens = st.text(alphabet=TCHAR, min_size=1, max_size=12).map(str.encode)
# A field value: visible ASCII and obs-text, with single spaces or tabs inside.
value_chars = st.sampled_from([bytes([b]) for b in [*range(0x21, 0x7F), *range(0x80, 0x100)]])
value_words = st.lists(value_chars, min_size=1, max_size=8).map(b"".join)
field_values = st.lists(value_words, max_size=4).flatmap(
    lambda words: st.lists(
        st.sampled_from([b" ", b"\t", b" \t "]), min_size=len(words), max_size=len(words)
    ).map(  # fmt: skip
        lambda seps: b"".join(w + s for w, s in zip(words, seps, strict=True)).rstrip(b" \t")
    )
)
FRAMING_NAMES = {b"content-length", b"transfer-encoding", b"host"}
plain_fields = st.tuples(tokens, field_values).filter(lambda f: f[0].lower() not in FRAMING_NAMES)

targets = st.one_of(
    st.text(alphabet=TCHAR + "/?=&:@", max_size=20).map(lambda t: b"/" + t.encode()),
    st.sampled_from(
        [b"*", b"http://example.com/", b"http://[2001:db8::1]:8080/x", b"example.com:443"]
    ),
)
hosts = st.sampled_from([b"example.com", b"example.com:8080", b"[2001:db8::1]", b""])


@st.composite
def request_heads(draw: st.DrawFn) -> bytes:
    """Mostly valid request heads, with the framing fields drawn separately."""
    method = draw(st.sampled_from([b"GET", b"POST", b"PUT", b"OPTIONS", b"CONNECT"]) | tokens)
    version = draw(st.sampled_from([b"HTTP/1.1", b"HTTP/1.0"]))
    fields: list[Header] = draw(st.lists(plain_fields, max_size=6))
    if draw(st.booleans()) or version == b"HTTP/1.1":
        fields.insert(draw(st.integers(0, len(fields))), (b"Host", draw(hosts)))
    framing = draw(st.sampled_from(["none", "cl", "te", "te2"]))
    if framing == "cl":
        fields.append((b"Content-Length", str(draw(st.integers(0, 10**6))).encode()))
    elif framing == "te2":
        fields.append((b"Transfer-Encoding", b"gzip, chunked"))
    elif framing == "te":
        fields.append((b"Transfer-Encoding", draw(st.sampled_from([b"chunked", b"Chunked"]))))
    lines = [method + b" " + draw(targets) + b" " + version]
    for name, value in fields:
        ows = draw(st.sampled_from([b"", b" ", b"\t", b"  "]))
        lines.append(name + b":" + ows + value + draw(st.sampled_from([b"", b" ", b"\t"])))
    return b"\r\n".join(lines) + b"\r\n\r\n"


# Bytes assembled from pieces of HTTP, so parsers get past their first check.
PIECES = [
    b"GET ",
    b"POST ",
    b"CONNECT ",
    b"/",
    b"*",
    b"http://",
    b"[::1]",
    b":80",
    b" HTTP/1.1",
    b" HTTP/1.0",
    b" HTTP/2.0",
    b"\r\n",
    b"\n",
    b"\r",
    b"\r\n\r\n",
    b"Host: a",
    b"Content-Length: ",
    b"Transfer-Encoding: ",
    b"chunked",
    b"gzip, ",
    b",",
    b":",
    b" ",
    b"\t",
    b"\x00",
    b"\x7f",
    b"\xff",
    b"0",
    b"5",
    b"ffffffffffffffff",
    b";ext=1",
    b"hello",
    b"Connection: close",
    b"Expect: 100-continue",
]
httpish = st.lists(st.sampled_from(PIECES) | st.binary(max_size=4), max_size=40).map(b"".join)
any_bytes = st.binary(max_size=300) | httpish


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    """``data`` cut at the given offsets (those past the end are ignored)."""
    bounds = sorted(c for c in cuts if c < len(data))
    return [data[a:b] for a, b in zip([0, *bounds], [*bounds, len(data)], strict=True)]


# --- robustness --------------------------------------------------------------------------


@SETTINGS
@given(data=any_bytes)
def test_parse_request_head_raises_only_kushi_errors(data: bytes) -> None:
    try:
        head = http1.parse_request_head(data)
    except KushiError as exc:
        assert isinstance(exc, RequestError)
        assert exc.status in (400, 505)
        return
    assert head.method and head.target


@SETTINGS
@given(data=any_bytes)
def test_parse_response_head_raises_only_kushi_errors(data: bytes) -> None:
    try:
        http1.parse_response_head(data, b"GET")
    except KushiError as exc:
        assert isinstance(exc, UpstreamError)


# --- the field section against RFC 9112's grammar -----------------------------------------

# field-line = field-name ":" OWS field-value OWS; field-name = token; the value's bytes
# are VCHAR, obs-text, SP and HTAB; every line ends in CRLF.
REFERENCE_LINE = re.compile(
    rb"([" + re.escape(TCHAR.encode()) + rb"]+):[ \t]*((?:[\x21-\x7e\x80-\xff]+[ \t]+)*"
    rb"[\x21-\x7e\x80-\xff]+)?[ \t]*"
)
GOOD_NAME = [b"Host", b"x-Y", b"a", b"_", b"Content-Type"]
GOOD_VALUE = [b"v/1", b"a", b" ", b"\t", b"\x80\xff", b":", b"(", b"\x7f"]
BAD = [b"\x00", b"\x01", b"\x0b", b"\r", b"\n", b"\r\n ", b" ", b"(", b":", b"\x7f"]
# Mostly well-formed field lines, each piece now and then one of the bad bytes or gaps.
field_names = st.lists(st.sampled_from(GOOD_NAME * 12 + BAD), max_size=3).map(b"".join)
field_values_raw = st.lists(st.sampled_from(GOOD_VALUE * 8 + BAD), max_size=5).map(b"".join)
field_lines = st.tuples(field_names, st.sampled_from([b":"] * 19 + [b""]), field_values_raw)
field_pieces = st.lists(field_lines.map(b"".join), max_size=5).map(
    lambda lines: b"".join(line + b"\r\n" for line in lines)[:-2]
)


def reference_fields(block: bytes) -> list[Header] | None:
    """The fields of ``block`` (field lines, each ending in CRLF) by the grammar, or None."""
    if not block:
        return []
    if not block.endswith(b"\r\n"):
        return None
    fields = []
    for line in block[:-2].split(b"\r\n"):
        m = REFERENCE_LINE.fullmatch(line)
        if m is None:
            return None
        fields.append((m.group(1), m.group(2) or b""))
    return fields


@SETTINGS
@given(block=field_pieces)
# The whitespace around a value that the usual "Name: value" reading must not keep:
@example(block=b"a: v\t")
@example(block=b"a:  v")
@example(block=b"a: \tv")
@example(block=b"a: v ")
@example(block=b"a:")
@example(block=b"a: ")
@example(block=b"Host: x\r\nhOST:\tx")
def test_field_section_is_read_as_rfc_9112_reads_it(block: bytes) -> None:
    want = reference_fields(block + b"\r\n" if block else block)
    head = b"HTTP/1.1 200 OK\r\n" + block + (b"\r\n\r\n" if block else b"\r\n")
    for _seen_before in range(2):  # the second time, its names are known spellings
        try:
            got = http1.parse_response_head(head, b"HEAD")
        except UpstreamError:
            assert want is None, f"refused a valid field section {block!r}"
            continue
        assert want is not None, f"accepted an invalid field section {block!r}"
        assert got.headers == want
        for name in http1.INDEXED:  # the fields looked up by name, whatever their spelling
            assert got.get_all(name) == [v for n, v in want if n.lower() == name]


# --- the first lines against RFC 9112's grammar ------------------------------------------

# status-line = HTTP-version SP status-code [ SP [ reason-phrase ] ] (the bare "HTTP/1.1 200"
# accepted too); reason-phrase = *( HTAB / SP / VCHAR / obs-text ).
REFERENCE_STATUS = re.compile(rb"HTTP/([0-9])\.([0-9]) ([0-9]{3})(?: ([\t\x20-\x7e\x80-\xff]*))?")
STATUS_PIECES = [b"HTTP/1.1", b"HTTP/1.0", b"HTTP/1.", b"HTTP/2.0", b"HTTP/", b"http/1.1"]
STATUS_PIECES += [b" ", b"  ", b"\t", b"200", b"099", b"20", b"2000", b"1", b"x"]
STATUS_PIECES += [b"OK", b"Not Found", b"\x80\xff", b"\x00", b"\x7f", b"\x0b", b"\r", b"\n"]
status_lines = st.lists(st.sampled_from(STATUS_PIECES), max_size=6).map(b"".join)


@SETTINGS
@given(line=status_lines)
@example(line=b"HTTP/1.1 200 OK")
@example(line=b"HTTP/1.0 404 Not Found")
@example(line=b"HTTP/1.1 200")
@example(line=b"HTTP/1.1 200 ")
@example(line=b"HTTP/1.1 200  \tx\x80")
@example(line=b"HTTP/1.1 200 O\x7fK")
@example(line=b"HTTP/1.1 099 x")
@example(line=b"HTTP/1.1 20x OK")
@example(line=b"HTTP/1.1 2000")
@example(line=b"HTTP/2.0 200 OK")
@example(line=b"HTTP/1.1\t200 OK")
def test_status_line_is_read_as_rfc_9112_reads_it(line: bytes) -> None:
    m = REFERENCE_STATUS.fullmatch(line)
    ok = m is not None and m.group(1) == b"1" and int(m.group(3)) >= 100
    try:
        got = http1.parse_response_head(line + b"\r\nContent-Length: 0\r\n\r\n", b"GET")
    except UpstreamError:
        assert not ok, f"refused a valid status line {line!r}"
        return
    assert ok and m is not None, f"accepted an invalid status line {line!r}"
    assert got.status == int(m.group(3))
    assert got.reason == (m.group(4) or b"")
    assert got.version == ((1, 0) if m.group(2) == b"0" else (1, 1))


# request-line = method SP request-target SP HTTP-version; method = token; the target's
# bytes are visible ASCII and obs-text (what servers in the wild accept).
REFERENCE_REQUEST = re.compile(
    rb"([" + re.escape(TCHAR.encode()) + rb"]+) ([\x21-\x7e\x80-\xff]+) HTTP/([0-9])\.([0-9])"
)
REQUEST_PIECES = [b"GET", b"OPTIONS", b"get", b"M-SEARCH", b"(", b"", b" ", b"  ", b"\t"]
REQUEST_PIECES += [b"/", b"/a?b=c", b"*", b"\x80", b"\x7f", b"\x00", b"\r", b"\n"]
REQUEST_PIECES += [b"HTTP/1.1", b"HTTP/1.0", b"HTTP/1.2", b"HTTP/2.0", b"HTTP/1", b"http/1.1"]
request_lines = st.lists(st.sampled_from(REQUEST_PIECES), max_size=7).map(b"".join)


@SETTINGS
@given(line=request_lines)
@example(line=b"GET / HTTP/1.1")
@example(line=b"get /\x80 HTTP/1.0")
@example(line=b"GET / HTTP/1.2")
@example(line=b"GET / HTTP/2.0")
@example(line=b"GET /\x7f HTTP/1.1")
@example(line=b"GET /\tx HTTP/1.1")
@example(line=b"G(T / HTTP/1.1")
@example(line=b"GET  / HTTP/1.1")
@example(line=b"GET / HTTP/1.1 ")
@example(line=b"GET / / HTTP/1.1")
@example(line=b"GET  HTTP/1.1")
def test_request_line_is_read_as_rfc_9112_reads_it(line: bytes) -> None:
    m = REFERENCE_REQUEST.fullmatch(line)
    try:
        got = http1.parse_request_head(line + b"\r\nHost: a\r\n\r\n")
    except VersionNotSupported:
        assert m is not None and m.group(3) != b"1", f"refused {line!r} for its version"
        return
    except RequestError:
        assert m is None, f"refused a valid request line {line!r}"
        return
    assert m is not None, f"accepted an invalid request line {line!r}"
    assert m.group(3) == b"1"
    assert (got.method, got.target) == (m.group(1), m.group(2))
    assert got.version == ((1, 0) if m.group(4) == b"0" else (1, 1))


@SETTINGS
@given(data=any_bytes, max_line=st.integers(1, 200), max_head=st.integers(1, 400))
def test_find_head_end_raises_only_kushi_errors(data: bytes, max_line: int, max_head: int) -> None:
    for response in (False, True):
        try:
            end = http1.find_head_end(data, max_line, max_head, response=response)
        except KushiError as exc:
            assert exc.status in ((502,) if response else (414, 431))
            continue
        if end >= 0:
            assert data.find(b"\r\n\r\n") == end - 4  # (the first one)
            assert end <= max_head + 4
            assert data.find(b"\r\n") <= max_line
        else:
            assert b"\r\n\r\n" not in data[: max_head + 4]


@SETTINGS
@given(data=any_bytes, cuts=st.lists(st.integers(0, 300), max_size=6))
def test_chunked_reader_raises_only_kushi_errors(data: bytes, cuts: list[int]) -> None:
    reader = ChunkedReader(max_line=64)
    buf = bytearray()
    pieces = split_at(data, cuts)
    try:
        for piece in pieces:
            buf += piece
            while True:
                event = reader.read(buf)
                if event is None or isinstance(event, EndOfMessage):
                    break
                assert event.data
            if isinstance(event, EndOfMessage):
                break
        reader.eof()
    except KushiError:
        pass


@SETTINGS
@given(data=any_bytes)
def test_parse_target_raises_only_kushi_errors(data: bytes) -> None:
    for method in (b"GET", b"CONNECT", b"OPTIONS"):
        try:
            target = http1.parse_target(method, data)
        except KushiError as exc:
            assert isinstance(exc, RequestError)
            continue
        assert 0 <= target.port <= 65535


# --- round trip --------------------------------------------------------------------------


def _upstream_form(head: http1.RequestHead) -> bytes:
    """The head serialised as kushi sends it: fields as parsed, then one framing field."""
    fields = [
        (k, v)
        for k, v in head.headers
        if k.lower() not in (b"content-length", b"transfer-encoding")
    ]
    if head.framing.kind == "chunked":
        fields.append((b"Transfer-Encoding", b"chunked"))
    elif head.framing.kind == "length":
        fields.append((b"Content-Length", str(head.framing.length).encode()))
    return http1.serialize_request_head(head.method, head.target, fields)


@SETTINGS
@given(data=request_heads() | httpish)
def test_accepted_requests_survive_reserialising(data: bytes) -> None:
    try:
        first = http1.parse_request_head(data)
    except KushiError:
        assume(False)
        return
    # serialize_request_head always writes HTTP/1.1, which needs Host.
    assume(first.version == (1, 1) or first.get(b"host") is not None)
    plain = http1.serialize_request_head(first.method, first.target, first.headers)
    again = http1.parse_request_head(plain)
    assert (again.method, again.target) == (first.method, first.target)
    assert again.headers == first.headers
    assert again.framing == first.framing
    assert again.expect_continue == first.expect_continue
    assert again.upgrade == first.upgrade

    normalised = _upstream_form(first)
    upstream = http1.parse_request_head(normalised)
    assert (upstream.method, upstream.target, upstream.framing) == (
        first.method,
        first.target,
        first.framing,
    )
    assert _upstream_form(upstream) == normalised


@settings(max_examples=50, deadline=None)
@given(data=request_heads())
def test_generated_heads_are_mostly_accepted(data: bytes) -> None:
    # Guards the round trip above against testing nothing: valid heads must parse.
    if b" HTTP/1.1" in data.split(b"\r\n", 1)[0] and not data.startswith(b"CONNECT"):
        head = http1.parse_request_head(data)
        assert head.version == (1, 1)


# --- chunked round trip --------------------------------------------------------------------

trailer_fields = st.lists(
    st.tuples(tokens, field_values).filter(lambda f: f[0].lower() not in http1.HOP_BY_HOP),
    max_size=3,
)


@SETTINGS
@given(
    # encode_chunk(b"") would be the last-chunk marker, so chunks are never empty.
    chunks=st.lists(st.binary(min_size=1, max_size=200), max_size=8),
    trailers=trailer_fields,
    cuts=st.lists(st.integers(0, 3000), max_size=8),
    tail=st.binary(max_size=10),
)
def test_chunked_round_trip(
    chunks: list[bytes], trailers: list[Header], cuts: list[int], tail: bytes
) -> None:
    wire = b"".join(http1.encode_chunk(c) for c in chunks) + http1.encode_last_chunk(trailers)
    stream = wire + tail
    reader = ChunkedReader()
    buf = bytearray()
    out = bytearray()
    end: EndOfMessage | None = None
    pieces = split_at(stream, cuts)
    fed = 0
    for piece in pieces:
        buf += piece
        fed += len(piece)
        while end is None:
            event = reader.read(buf)
            if event is None:
                break
            if isinstance(event, EndOfMessage):
                end = event
            else:
                out += event.data
        if end is not None:
            break
    assert end is not None
    assert bytes(out) == b"".join(chunks)
    assert end.trailers == trailers
    # Whatever followed the body is left for the next message, byte for byte.
    assert bytes(buf) + stream[fed:] == tail
