"""Tests for kushi.proxyproto: the sans-IO PROXY protocol v1/v2 parser and builders."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kushi.errors import ProxyProtocolError
from kushi.proxyproto import (
    MAX_HEADER_SIZE,
    V1_SIGNATURE,
    V2_MAX_LENGTH,
    V2_SIGNATURE,
    ProxyHeader,
    _crc32c,
    build,
    build_v1,
    build_v2,
    build_v2_local,
    parse,
)

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def v2(ver_cmd: int, fam: int, payload: bytes, length: int | None = None) -> bytes:
    """A hand-made v2 header (section 2.2 layout), optionally lying about its length."""
    size = len(payload) if length is None else length
    return V2_SIGNATURE + struct.pack("!BBH", ver_cmd, fam, size) + payload


def parsed(data: bytes) -> tuple[ProxyHeader, int]:
    result = parse(data)
    assert result is not None
    return result


def feed_bytewise(data: bytes) -> tuple[ProxyHeader, int]:
    """Feed ``data`` one byte at a time; every strict prefix must ask for more."""
    for end in range(len(data)):
        assert parse(data[:end]) is None, f"prefix of {end} bytes"
    return parsed(data)


# --- the specification's examples ---------------------------------------------------


def test_spec_v1_example_before_http_request() -> None:
    line = b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n"
    rest = b"GET / HTTP/1.1\r\nHost: 192.168.0.11\r\n\r\n"
    header, consumed = parsed(line + rest)
    assert consumed == len(line)
    assert header == ProxyHeader(1, "PROXY", "ipv4", "192.168.0.1", 56324, "192.168.0.11", 443)


FULL_V6 = b":".join([b"ffff"] * 8)


@pytest.mark.parametrize(
    ("line", "length"),
    [
        (b"PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n", 56),
        (b"PROXY TCP6 " + FULL_V6 + b" " + FULL_V6 + b" 65535 65535\r\n", 104),
        (b"PROXY UNKNOWN\r\n", 15),
        (b"PROXY UNKNOWN " + FULL_V6 + b" " + FULL_V6 + b" 65535 65535\r\n", 107),
    ],
)
def test_spec_v1_maximum_line_lengths(line: bytes, length: int) -> None:
    assert len(line) == length
    _, consumed = parsed(line + b"x")
    assert consumed == length


def test_spec_v1_tcp6_fields() -> None:
    line = b"PROXY TCP6 " + FULL_V6 + b" ::1 65535 0\r\n"
    header, _ = parsed(line)
    assert header.family == "ipv6"
    assert header.src == "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
    assert (header.src_port, header.dst, header.dst_port) == (65535, "::1", 0)


def test_v2_haproxy_capture() -> None:
    # A TCP4 header as sent by haproxy with send-proxy-v2, followed by an HTTP request.
    data = bytes.fromhex("0d0a0d0a000d0a515549540a2111000cac130001ac130003a6520050") + b"GET /"
    header, consumed = parsed(data)
    assert consumed == 28
    assert header == ProxyHeader(2, "PROXY", "ipv4", "172.19.0.1", 42578, "172.19.0.3", 80)


def test_v2_signature_constant() -> None:
    assert V2_SIGNATURE == bytes.fromhex("0d0a0d0a000d0a515549540a")
    assert V1_SIGNATURE == b"PROXY "
    assert MAX_HEADER_SIZE == 16 + V2_MAX_LENGTH


# --- round trips ---------------------------------------------------------------------


ROUND_TRIPS = [
    # (src, dst, expected family, expected src text, expected dst text)
    ("192.0.2.1", "198.51.100.7", "ipv4", "192.0.2.1", "198.51.100.7"),
    ("2001:db8::1", "2001:db8::2", "ipv6", "2001:db8::1", "2001:db8::2"),
    ("2001:DB8:0:0:0:0:0:1", "::", "ipv6", "2001:db8::1", "::"),
    ("::ffff:192.0.2.1", "::ffff:198.51.100.7", "ipv4", "192.0.2.1", "198.51.100.7"),
    ("::ffff:192.0.2.1", "198.51.100.7", "ipv4", "192.0.2.1", "198.51.100.7"),
    # Mixed families: the IPv4 side is sent IPv4-mapped.
    ("2001:db8::1", "192.0.2.1", "ipv6", "2001:db8::1", "::ffff:192.0.2.1"),
    ("192.0.2.1", "2001:db8::1", "ipv6", "::ffff:192.0.2.1", "2001:db8::1"),
    ("::ffff:192.0.2.1", "2001:db8::1", "ipv6", "::ffff:192.0.2.1", "2001:db8::1"),
    # Zone identifiers cannot be carried and are dropped.
    ("fe80::1%eth0", "fe80::2", "ipv6", "fe80::1", "fe80::2"),
]


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize(("src", "dst", "family", "src_text", "dst_text"), ROUND_TRIPS)
def test_round_trip(
    version: int, src: str, dst: str, family: str, src_text: str, dst_text: str
) -> None:
    data = build(version, src, 51234, dst, 8080)
    header, consumed = parsed(data + b"payload")
    assert consumed == len(data)
    assert (header.version, header.command, header.family) == (version, "PROXY", family)
    assert ipaddress.ip_address(header.src or "") == ipaddress.ip_address(src_text)
    assert ipaddress.ip_address(header.dst or "") == ipaddress.ip_address(dst_text)
    assert (header.src_port, header.dst_port) == (51234, 8080)
    assert header.tlvs == ()


def test_build_v1_text() -> None:
    assert build_v1("192.0.2.1", 1, "192.0.2.2", 65535) == (
        b"PROXY TCP4 192.0.2.1 192.0.2.2 1 65535\r\n"
    )
    assert build_v1("2001:db8::1", 0, "192.0.2.2", 80) == (
        b"PROXY TCP6 2001:db8::1 ::ffff:c000:202 0 80\r\n"
    )
    assert build_v1("::ffff:10.0.0.1", 5, "::ffff:10.0.0.2", 6) == (
        b"PROXY TCP4 10.0.0.1 10.0.0.2 5 6\r\n"
    )


def test_build_v2_bytes() -> None:
    assert build_v2("172.19.0.1", 42578, "172.19.0.3", 80) == bytes.fromhex(
        "0d0a0d0a000d0a515549540a2111000cac130001ac130003a6520050"
    )
    six = build_v2("2001:db8::1", 1, "::ffff:192.0.2.1", 2)
    assert six[12:16] == b"\x21\x21\x00\x24"
    assert six[16:32] == ipaddress.IPv6Address("2001:db8::1").packed
    assert six[32:48] == ipaddress.IPv6Address("::ffff:192.0.2.1").packed
    assert six[48:] == b"\x00\x01\x00\x02"


def test_build_v2_local() -> None:
    data = build_v2_local()
    assert data == V2_SIGNATURE + b"\x20\x00\x00\x00"
    assert parsed(data + b"GET") == (ProxyHeader(2, "LOCAL", "unspec", None, None, None, None), 16)


@pytest.mark.parametrize(
    "call",
    [
        lambda: build(3, "192.0.2.1", 1, "192.0.2.2", 2),
        lambda: build_v1("192.0.2.1", 65536, "192.0.2.2", 2),
        lambda: build_v1("192.0.2.1", -1, "192.0.2.2", 2),
        lambda: build_v2("192.0.2.1", 1, "192.0.2.2", True),
        lambda: build_v2("example.com", 1, "192.0.2.2", 2),
        lambda: build_v1("192.0.2.1", 1, "", 2),
        lambda: build_v2("192.0.2.1", 1, "192.0.2.2", 2, tlvs=[(256, b"")]),
        lambda: build_v2("192.0.2.1", 1, "192.0.2.2", 2, tlvs=[(1, b"x" * 65536)]),
    ],
)
def test_build_rejects_bad_arguments(call: object) -> None:
    assert callable(call)
    with pytest.raises(ValueError):
        call()


# --- consumed count, incremental feeding ---------------------------------------------


@pytest.mark.parametrize(
    "header",
    [
        build_v1("192.0.2.1", 1, "192.0.2.2", 2),
        build_v1("2001:db8::1", 1, "2001:db8::2", 2),
        build_v2("192.0.2.1", 1, "192.0.2.2", 2),
        build_v2("2001:db8::1", 1, "2001:db8::2", 2, tlvs=[(0x05, b"id"), (0xE0, b"")]),
        build_v2("2001:db8::1", 1, "2001:db8::2", 2, checksum=True),
        build_v2_local(),
        b"PROXY UNKNOWN\r\n",
        b"PROXY UNKNOWN whatever the sender put here\r\n",
        v2(0x21, 0x00, b"ignored address information"),
    ],
)
def test_incremental_then_consumed(header: bytes) -> None:
    result = feed_bytewise(header)
    assert result[1] == len(header)
    # Data after the header, even something that looks like another header, is not read.
    assert parsed(header + header + b"\r\n\r\n")[1] == len(header)


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_accepts_bytes_like(kind: type) -> None:
    data = build_v2("192.0.2.1", 1, "192.0.2.2", 2) + b"rest"
    header, consumed = parsed(kind(data))
    assert (header.src, consumed) == ("192.0.2.1", 28)


def test_empty_buffer_needs_more() -> None:
    assert parse(b"") is None


# --- LOCAL, UNSPEC, TLVs -------------------------------------------------------------


def test_v1_unknown_is_local() -> None:
    assert parsed(b"PROXY UNKNOWN\r\n") == (
        ProxyHeader(1, "LOCAL", "unspec", None, None, None, None),
        15,
    )


def test_v2_local_ignores_family_and_address_block() -> None:
    # Section 2.2: for LOCAL the receiver discards the block "including the family".
    payload = bytes(12) + b"\x03\x00\x01x"
    for fam in (0x11, 0x12, 0x21, 0x31):
        header, consumed = parsed(v2(0x20, fam, payload) + b"data")
        assert (header.command, header.family, header.src, header.tlvs) == (
            "LOCAL",
            "unspec",
            None,
            (),
        )
        assert consumed == 16 + len(payload)
    # Even a LOCAL header whose announced block is shorter than its family's addresses.
    assert parsed(v2(0x20, 0x21, b""))[1] == 16


def test_v2_proxy_unspec_is_accepted_without_address() -> None:
    header, consumed = parsed(v2(0x21, 0x00, b"\x01\x02\x03"))
    assert header == ProxyHeader(2, "PROXY", "unspec", None, None, None, None)
    assert consumed == 19


def test_tlvs_preserved_in_order() -> None:
    tlvs = [(0x01, b"h2"), (0x02, b"example.com"), (0x04, b""), (0x01, b"http/1.1")]
    data = build_v2("2001:db8::1", 443, "2001:db8::2", 8443, tlvs=tlvs)
    header, consumed = parsed(data)
    assert header.tlvs == tuple(tlvs)
    assert consumed == len(data)


def test_tlvs_hand_made() -> None:
    addresses = bytes([10, 0, 0, 1, 10, 0, 0, 2]) + struct.pack("!HH", 1, 2)
    header, _ = parsed(v2(0x21, 0x11, addresses + b"\xe0\x00\x03abc\x30\x00\x00"))
    assert header.tlvs == ((0xE0, b"abc"), (0x30, b""))


def test_crc32c() -> None:
    assert _crc32c(b"123456789") == 0xE3069283  # RFC 3720 / iSCSI check value
    data = build_v2("192.0.2.1", 1, "192.0.2.2", 2, tlvs=[(0x05, b"id")], checksum=True)
    header, _ = parsed(data)
    assert [kind for kind, _ in header.tlvs] == [0x05, 0x03]
    corrupted = data[:-1] + bytes([data[-1] ^ 1])
    with pytest.raises(ProxyProtocolError, match="CRC32C"):
        parse(corrupted)
    wrong_port = data[:26] + b"\x00\x09" + data[28:]
    with pytest.raises(ProxyProtocolError, match="CRC32C"):
        parse(wrong_port)


# --- malformed headers ---------------------------------------------------------------


def raises(data: bytes, match: str | None = None) -> None:
    with pytest.raises(ProxyProtocolError, match=match):
        parse(data)


def test_error_is_a_kushi_error() -> None:
    with pytest.raises(ProxyProtocolError) as info:
        parse(b"GET / HTTP/1.1\r\n")
    assert info.value.close and info.value.details


@pytest.mark.parametrize(
    "data",
    [
        b"G",
        b"GET / HTTP/1.1\r\n\r\n",
        b"\x16\x03\x01\x02\x00",  # a TLS ClientHello
        b"\x00",
        b"PROXX",
        b"proxy ",
        b"PROXY\t",
        b"PROXY  TCP4",
        b"\r\n\r\n\x00\r\nQUIX",
        b"\r\r",
        b"\r\n\r\n\x01",
    ],
)
def test_wrong_signature_rejected_early(data: bytes) -> None:
    raises(data)


def test_truncated_stays_none_until_proven_wrong() -> None:
    good = build_v2("192.0.2.1", 1, "192.0.2.2", 2)
    for end in range(len(good)):
        assert parse(good[:end]) is None
    bad = v2(0x31, 0x11, bytes(12))  # version 3
    for end in range(13):
        assert parse(bad[:end]) is None
    raises(bad[:13], "version 3")
    line = b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2\r\n"
    for end in range(len(line)):
        assert parse(line[:end]) is None
    raises(b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2\n", "bare")


@pytest.mark.parametrize("ver_cmd", [0x11, 0x01, 0x31, 0xF1, 0x21 | 0x10])
def test_v2_bad_version(ver_cmd: int) -> None:
    raises(v2(ver_cmd, 0x11, bytes(12))[:13], "version")


@pytest.mark.parametrize("ver_cmd", [0x22, 0x2F])
def test_v2_bad_command(ver_cmd: int) -> None:
    raises(v2(ver_cmd, 0x11, bytes(12))[:13], "command")


@pytest.mark.parametrize("fam", [0x01, 0x10, 0x13, 0x41, 0xFF])
def test_v2_unknown_family_or_protocol(fam: int) -> None:
    raises(v2(0x21, fam, bytes(36))[:14], "family")
    raises(v2(0x20, fam, bytes(36))[:14], "family")  # unassigned even for LOCAL


@pytest.mark.parametrize("fam", [0x12, 0x22, 0x31, 0x32])
def test_v2_udp_and_unix_refused(fam: int) -> None:
    raises(v2(0x21, fam, bytes(216))[:14], "not TCP")


@pytest.mark.parametrize(("fam", "length"), [(0x11, 11), (0x11, 0), (0x21, 35), (0x21, 12)])
def test_v2_length_shorter_than_address_block(fam: int, length: int) -> None:
    # Decided from the fixed 16 bytes, without waiting for the announced payload.
    raises(v2(0x21, fam, b"", length=length), "shorter")


def test_v2_length_over_maximum() -> None:
    raises(v2(0x21, 0x11, b"", length=V2_MAX_LENGTH + 1), "limit")
    raises(v2(0x21, 0x11, b"", length=0xFFFF), "limit")
    assert parse(v2(0x21, 0x11, b"", length=V2_MAX_LENGTH)) is None
    with pytest.raises(ProxyProtocolError, match="limit"):
        parse(v2(0x21, 0x11, b"", length=100), max_v2_length=99)


@pytest.mark.parametrize(
    "tail",
    [
        b"\x01",  # one byte: not even a TLV header
        b"\x01\x00",
        b"\x01\x00\x02a",  # value shorter than announced
        b"\x03\x00\x02ab",  # CRC32C of the wrong size
    ],
)
def test_v2_malformed_tlvs(tail: bytes) -> None:
    raises(v2(0x21, 0x11, bytes(12) + tail), "TLV")


@pytest.mark.parametrize(
    "line",
    [
        b"PROXY TCP4 192.0.2.1 192.0.2.2 65536 80\r\n",
        b"PROXY TCP4 192.0.2.1 192.0.2.2 80 99999\r\n",
        b"PROXY TCP4 192.0.2.1 192.0.2.2 080 80\r\n",
        b"PROXY TCP4 192.0.2.1 192.0.2.2 -1 80\r\n",
        b"PROXY TCP4 192.0.2.1 192.0.2.2 80 \r\n",
        b"PROXY TCP4 192.0.2.1 192.0.2.2 80 +8\r\n",
        b"PROXY TCP4 192.0.2.1 192.0.2.2 123456 80\r\n",
    ],
)
def test_v1_bad_port(line: bytes) -> None:
    raises(line)


@pytest.mark.parametrize(
    "line",
    [
        b"PROXY TCP6 192.0.2.1 192.0.2.2 1 2\r\n",  # IPv4 addresses in a TCP6 line
        b"PROXY TCP6 2001:db8::1 192.0.2.2 1 2\r\n",
        b"PROXY TCP4 2001:db8::1 2001:db8::2 1 2\r\n",  # IPv6 addresses in a TCP4 line
        b"PROXY TCP4 192.0.2.1 192.0.2.256 1 2\r\n",
        b"PROXY TCP4 192.0.2.01 192.0.2.2 1 2\r\n",  # heading zero
        b"PROXY TCP4 192.0.2 192.0.2.2 1 2\r\n",
        b"PROXY TCP4 192..0.2.1 192.0.2.2 1 2\r\n",
        b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n",  # zone identifier
        b"PROXY TCP6 [::1] ::1 1 2\r\n",
        b"PROXY TCP6 1:2:3:4:5:6:7:8:9 ::1 1 2\r\n",
        b"PROXY TCP6 12345:: ::1 1 2\r\n",
        b"PROXY TCP6 ::1 :: 1\r\n",
    ],
)
def test_v1_address_not_valid_for_family(line: bytes) -> None:
    raises(line)


@pytest.mark.parametrize(
    "line",
    [
        b"PROXY TCP4  192.0.2.1 192.0.2.2 1 2\r\n",  # extra spaces
        b"PROXY TCP4 192.0.2.1  192.0.2.2 1 2\r\n",
        b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2 \r\n",
        b"PROXY TCP4 192.0.2.1 192.0.2.2 1\r\n",  # missing field
        b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2 3\r\n",  # one too many
        b"PROXY TCP4\r\n",
        b"PROXY TCP4 \r\n",
        b"PROXY \r\n",
        b"PROXY tcp4 192.0.2.1 192.0.2.2 1 2\r\n",
        b"PROXY TCP5 192.0.2.1 192.0.2.2 1 2\r\n",
        b"PROXY UNKNOWNX\r\n",
        b"PROXY TCP4 192.0.2.1\t192.0.2.2 1 2\r\n",
        b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2\r\r\n",
        b"PROXY UNKNOWN\n\r\n",  # bare LF
        b"PROXY UNKNOWN\rx\r\n",  # bare CR
    ],
)
def test_v1_bad_fields(line: bytes) -> None:
    raises(line)


@pytest.mark.parametrize(
    "partial",
    [
        b"PROXY TCP5",
        b"PROXY X",
        b"PROXY TCP4 192.0.2.1  ",
        b"PROXY TCP4 192.0.2.x",
        b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2 ",
        b"PROXY TCP4 192.0.2.1 192.0.2.2 65536 ",
        b"PROXY TCP4 192.0.2.1 192.0.2.2 01",
        b"PROXY TCP4 192.0.2.1 192.0.2.2 123456",
        b"PROXY TCP4 1234567890123456",
        b"PROXY TCP4 300.0.0.1 ",
        b"PROXY TCP6 192.0.2.1 ",
        b"PROXY TCP4 1.2.3.4\rx",
        b"PROXY TCP6 ::1%",
    ],
)
def test_v1_rejected_before_crlf(partial: bytes) -> None:
    raises(partial)


def test_v1_too_long_without_crlf() -> None:
    raises(b"PROXY UNKNOWN " + b"x" * 93, "CRLF")  # 107 bytes, no CRLF
    assert parse(b"PROXY UNKNOWN " + b"x" * 92) is None  # 106: the CRLF may still come
    raises(b"PROXY UNKNOWN " + b"x" * 92 + b"\r\n", "CRLF")  # CRLF ends at byte 108
    assert parse(b"PROXY UNKNOWN " + b"x" * 91 + b"\r\n") is not None  # ends at 107
    raises(b"PROXY TCP6 " + FULL_V6 + b" " + b"1" * 46, "field")  # 46 > 45 chars


# --- properties ----------------------------------------------------------------------


def expected_pair(a: Address, b: Address) -> tuple[Address, Address]:
    """The builders' family rule, stated independently of the implementation."""

    def unmap(x: Address) -> Address:
        if isinstance(x, ipaddress.IPv6Address) and x.ipv4_mapped is not None:
            return x.ipv4_mapped
        return x

    a, b = unmap(a), unmap(b)
    if a.version != b.version:
        a, b = (ipaddress.IPv6Address(f"::ffff:{x}") if x.version == 4 else x for x in (a, b))
    return a, b


addresses = st.ip_addresses(v=4) | st.ip_addresses(v=6)
ports = st.integers(0, 0xFFFF)
tlv_lists = st.lists(
    st.tuples(st.integers(0, 0xFF).filter(lambda t: t != 0x03), st.binary(max_size=40)),
    max_size=5,
)


@given(addresses, ports, addresses, ports, tlv_lists, st.booleans())
def test_build_v2_parse_round_trip(
    src: Address,
    src_port: int,
    dst: Address,
    dst_port: int,
    tlvs: list[tuple[int, bytes]],
    checksum: bool,
) -> None:
    data = build_v2(str(src), src_port, str(dst), dst_port, tlvs=tlvs, checksum=checksum)
    header, consumed = parsed(data + b"\r\n")
    assert consumed == len(data)
    want_src, want_dst = expected_pair(src, dst)
    assert header.family == ("ipv4" if want_src.version == 4 else "ipv6")
    assert ipaddress.ip_address(header.src or "") == want_src
    assert ipaddress.ip_address(header.dst or "") == want_dst
    assert (header.src_port, header.dst_port) == (src_port, dst_port)
    assert header.tlvs[: len(tlvs)] == tuple(tlvs)
    assert len(header.tlvs) == len(tlvs) + checksum


@given(addresses, ports, addresses, ports)
def test_build_v1_parse_round_trip(
    src: Address, src_port: int, dst: Address, dst_port: int
) -> None:
    data = build_v1(str(src), src_port, str(dst), dst_port)
    assert len(data) <= 104
    header, consumed = parsed(data + b"GET")
    assert consumed == len(data)
    want_src, want_dst = expected_pair(src, dst)
    assert ipaddress.ip_address(header.src or "") == want_src
    assert ipaddress.ip_address(header.dst or "") == want_dst
    assert (header.src_port, header.dst_port) == (src_port, dst_port)


@given(st.integers(1, 2), addresses, ports, addresses, ports, st.data())
def test_prefixes_of_valid_headers_need_more(
    version: int, src: Address, sp: int, dst: Address, dp: int, data: st.DataObject
) -> None:
    header = build(version, str(src), sp, str(dst), dp)
    end = data.draw(st.integers(0, len(header) - 1))
    assert parse(header[:end]) is None


def parse_or_error(data: bytes) -> None:
    try:
        result = parse(data)
    except ProxyProtocolError:
        return
    if result is not None:
        header, consumed = result
        assert 0 < consumed <= len(data)
        assert header.version in (1, 2)


@settings(max_examples=500)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_only_raise_proxy_protocol_error(data: bytes) -> None:
    parse_or_error(data)


@settings(max_examples=500)
@given(st.sampled_from([V2_SIGNATURE + b"\x21", V2_SIGNATURE + b"\x20"]), st.binary(max_size=80))
def test_arbitrary_v2_bodies_only_raise_proxy_protocol_error(sig: bytes, body: bytes) -> None:
    parse_or_error(sig + body)


@settings(max_examples=500)
@given(
    st.sampled_from([b"TCP4 ", b"TCP6 ", b"UNKNOWN", b""]),
    st.text(alphabet="0123456789abcdefABCDEF:. \r\n%x-", max_size=110),
)
def test_arbitrary_v1_lines_only_raise_proxy_protocol_error(protocol: bytes, rest: str) -> None:
    parse_or_error(V1_SIGNATURE + protocol + rest.encode())


@settings(max_examples=300)
@given(st.binary(min_size=1, max_size=120), st.data())
def test_rejection_is_stable_under_more_data(data: bytes, draw: st.DataObject) -> None:
    # Once bytes prove a header wrong, more bytes never make it right; and a complete
    # header stays complete with the same length.
    extra = draw.draw(st.binary(max_size=20))
    try:
        first = parse(data)
    except ProxyProtocolError:
        with pytest.raises(ProxyProtocolError):
            parse(data + extra)
        return
    if first is not None:
        assert parse(data + extra) == first
