"""socks5.py without sockets: bytes in, events and replies out (RFC 1928, RFC 1929)."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kushi import errors
from kushi.socks5 import (
    AddressType,
    Command,
    Credentials,
    Datagram,
    Method,
    MethodSelected,
    Reply,
    Requested,
    ServerHandshake,
    build_reply,
    build_udp,
    parse_udp,
    reply_for,
)

NO_AUTH = (Method.NO_AUTH,)
PASSWORD = (Method.USERPASS,)


def feed(machine: ServerHandshake, data: bytes) -> list[object]:
    """Every event ``data`` yields, answering credentials as correct."""
    buf = bytearray(data)
    events: list[object] = []
    while (event := machine.next_event(buf)) is not None:
        events.append(event)
        if isinstance(event, Credentials):
            machine.auth_result(True)
        if machine.state in ("done", "closed"):
            break
    return events


def request(cmd: int, atyp: int, addr: bytes, port: int) -> bytes:
    return bytes((5, cmd, 0, atyp)) + addr + struct.pack("!H", port)


def domain(name: bytes) -> bytes:
    return bytes((len(name),)) + name


# --- RFC 1928 section 3: method negotiation ----------------------------------------------


def test_no_auth_greeting_then_connect_by_name() -> None:
    machine = ServerHandshake(offer=NO_AUTH)
    events = feed(machine, b"\x05\x01\x00" + request(1, 3, domain(b"v6.test"), 443))
    assert events == [
        MethodSelected(Method.NO_AUTH, b"\x05\x00"),
        Requested(Command.CONNECT, "v6.test", 443, AddressType.DOMAIN),
    ]
    assert machine.state == "done"


def test_the_address_types() -> None:
    v4 = request(1, 1, bytes([203, 0, 113, 4]), 80)
    v6 = request(1, 4, ipaddress.IPv6Address("2001:db8:1::6").packed, 22)
    mapped = request(1, 4, ipaddress.IPv6Address("::ffff:203.0.113.4").packed, 22)
    literal_as_name = request(1, 3, domain(b"2001:db8::1"), 443)
    got = [feed(ServerHandshake(offer=NO_AUTH), b"\x05\x01\x00" + r)[1] for r in (v4, v6)]
    assert [(e.host, e.port, e.target) for e in got] == [  # type: ignore[attr-defined]
        ("203.0.113.4", 80, "203.0.113.4:80"),
        ("2001:db8:1::6", 22, "[2001:db8:1::6]:22"),
    ]
    assert feed(ServerHandshake(offer=NO_AUTH), b"\x05\x01\x00" + mapped)[1].host == (  # type: ignore[attr-defined]
        "203.0.113.4"
    )
    assert feed(ServerHandshake(offer=NO_AUTH), b"\x05\x01\x00" + literal_as_name)[1].host == (  # type: ignore[attr-defined]
        "2001:db8::1"
    )


def test_byte_at_a_time_is_the_same_as_all_at_once() -> None:
    data = b"\x05\x02\x00\x02" + request(3, 1, b"\x00\x00\x00\x00", 0)
    machine = ServerHandshake(offer=NO_AUTH)
    buf = bytearray()
    events = []
    for byte in data:
        buf.append(byte)
        event = machine.next_event(buf)
        if event is not None:
            events.append(event)
    assert events == [
        MethodSelected(Method.NO_AUTH, b"\x05\x00"),
        Requested(Command.UDP_ASSOCIATE, "0.0.0.0", 0, AddressType.IPV4),
    ]
    assert not buf


def test_bytes_after_the_request_stay_for_the_tunnel() -> None:
    machine = ServerHandshake(offer=NO_AUTH)
    buf = bytearray(b"\x05\x01\x00" + request(1, 1, bytes(4), 443) + b"\x16\x03\x01")
    assert machine.next_event(buf) is not None
    assert machine.next_event(buf) is not None
    assert bytes(buf) == b"\x16\x03\x01"


def test_no_acceptable_method_is_0xff() -> None:
    machine = ServerHandshake(offer=PASSWORD)
    events = feed(machine, b"\x05\x01\x00")
    assert events == [MethodSelected(Method.NO_ACCEPTABLE, b"\x05\xff")]
    assert machine.state == "closed"


def test_password_method_preferred_when_offered() -> None:
    machine = ServerHandshake(offer=PASSWORD)
    buf = bytearray(b"\x05\x02\x00\x02")
    assert machine.next_event(buf) == MethodSelected(Method.USERPASS, b"\x05\x02")
    assert machine.state == "auth"


# --- RFC 1929 ----------------------------------------------------------------------------


def test_username_password_and_both_answers() -> None:
    machine = ServerHandshake(offer=PASSWORD)
    buf = bytearray(b"\x05\x01\x02\x01\x05alice\x06s3cr3t")
    machine.next_event(buf)
    creds = machine.next_event(buf)
    assert creds == Credentials("alice", b"s3cr3t")
    assert "s3cr3t" not in repr(creds)
    assert machine.auth_result(False) == b"\x01\x01"
    assert machine.state == "closed"
    with pytest.raises(errors.SocksRequestError):
        machine.next_event(bytearray(request(1, 1, bytes(4), 443)))

    machine = ServerHandshake(offer=PASSWORD)
    buf = bytearray(b"\x05\x01\x02\x01\x05alice\x06s3cr3t")
    machine.next_event(buf)
    machine.next_event(buf)
    assert machine.auth_result(True) == b"\x01\x00"
    assert machine.state == "request"


def test_credentials_not_answered_twice() -> None:
    with pytest.raises(errors.SocksRequestError):
        ServerHandshake(offer=NO_AUTH).auth_result(True)


@pytest.mark.parametrize(
    "data, words",
    [
        (b"\x05\x01\x02\x02\x05alice\x00", "username/password version 2"),
        (b"\x05\x01\x02\x01\x00\x01x", "empty SOCKS5 username"),
    ],
)
def test_bad_userpass(data: bytes, words: str) -> None:
    with pytest.raises(errors.SocksRequestError, match=words):
        feed(ServerHandshake(offer=PASSWORD), data)


# --- malformed input: typed errors, each with its reply ------------------------------------


@pytest.mark.parametrize(
    "data, error, reply, words",
    [
        (b"\x04\x01\x00\x50", errors.SocksRequestError, 0x01, "unknown SOCKS version 4"),
        (b"GET / HTTP/1.1\r\n", errors.SocksRequestError, 0x01, "unknown SOCKS version 71"),
        (b"\x05\x00", errors.SocksRequestError, 0x01, "offers no authentication"),
        (
            b"\x05\x01\x00" + request(2, 1, bytes(4), 80),
            errors.SocksCommandNotSupported,
            0x07,
            "BIND is not supported",
        ),
        (
            b"\x05\x01\x00" + request(9, 1, bytes(4), 80),
            errors.SocksCommandNotSupported,
            0x07,
            "command 9",
        ),
        (
            b"\x05\x01\x00\x05\x01\x00\x07\x00",
            errors.SocksAddressTypeNotSupported,
            0x08,
            "address type 7",
        ),
        (
            b"\x05\x01\x00" + request(1, 3, domain(b"a" * 254), 443),
            errors.SocksRequestError,
            0x01,
            "254 octets is longer than 253",
        ),
        (
            b"\x05\x01\x00" + request(1, 3, domain(b"a" * 64 + b".test"), 443),
            errors.SocksRequestError,
            0x01,
            "is not a host name",
        ),
        (
            b"\x05\x01\x00" + request(1, 3, domain(b"evil.test\x00.x"), 443),
            errors.SocksRequestError,
            0x01,
            "is not a host name",
        ),
        (
            b"\x05\x01\x00" + request(1, 3, domain(b""), 443),
            errors.SocksRequestError,
            0x01,
            "empty SOCKS5 domain name",
        ),
        (
            b"\x05\x01\x00\x04\x01\x00\x01" + bytes(6),
            errors.SocksRequestError,
            0x01,
            "request with version 4",
        ),
    ],
)
def test_malformed_input_raises_typed_errors(
    data: bytes, error: type[errors.SocksRequestError], reply: int, words: str
) -> None:
    with pytest.raises(error, match=words) as caught:
        feed(ServerHandshake(offer=NO_AUTH), data)
    assert reply_for(caught.value) == reply
    assert caught.value.error_type == "http_request_error"


def test_a_full_length_name_is_accepted() -> None:
    name = b".".join([b"a" * 63] * 3 + [b"b" * 61])  # 253 octets
    assert len(name) == 253
    event = feed(ServerHandshake(offer=NO_AUTH), b"\x05\x01\x00" + request(1, 3, domain(name), 1))
    assert event[1].host == name.decode()  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "state_data, words",
    [
        (b"", None),
        (b"\x05", "greeting"),
        (b"\x05\x02\x00", "greeting"),
        (b"\x05\x01\x00\x05\x01", "request"),
        (b"\x05\x01\x00\x05\x01\x00\x03\x10v6", "request"),
    ],
)
def test_end_of_stream_means_truncated_unless_nothing_came(
    state_data: bytes, words: str | None
) -> None:
    machine = ServerHandshake(offer=NO_AUTH)
    buf = bytearray(state_data)
    while machine.next_event(buf) is not None:
        pass
    exc = machine.eof(buf)
    if words is None:
        assert exc is None
    else:
        assert exc is not None and words in exc.details


def test_truncated_password_exchange() -> None:
    machine = ServerHandshake(offer=PASSWORD)
    buf = bytearray(b"\x05\x01\x02\x01\x05ali")
    machine.next_event(buf)
    assert machine.next_event(buf) is None
    exc = machine.eof(buf)
    assert exc is not None and "username/password" in exc.details


@given(st.binary(max_size=300))
def test_any_bytes_give_an_event_more_bytes_or_a_typed_error(data: bytes) -> None:
    machine = ServerHandshake(offer=NO_AUTH)
    buf = bytearray(data)
    try:
        for _ in range(3):
            if machine.next_event(buf) is None or machine.state in ("done", "closed"):
                break
    except errors.SocksRequestError:
        pass


# --- replies and the error mapping (RFC 1928 section 6) -----------------------------------


@pytest.mark.parametrize(
    "exc, reply",
    [
        (errors.RequestDenied("allow list"), Reply.NOT_ALLOWED),
        (errors.ProxyAuthRequired("password"), Reply.NOT_ALLOWED),
        (errors.DestinationProhibited("loopback"), Reply.NOT_ALLOWED),
        (errors.LoopDetected("own port"), Reply.NOT_ALLOWED),
        (errors.DestinationNotFound("no AAAA; ipv6-only"), Reply.NETWORK_UNREACHABLE),
        (errors.DestinationUnroutable("no route"), Reply.NETWORK_UNREACHABLE),
        (errors.DNSError("nxdomain"), Reply.HOST_UNREACHABLE),
        (errors.DNSTimeout("slow"), Reply.HOST_UNREACHABLE),
        (errors.ConnectionRefused("rst"), Reply.CONNECTION_REFUSED),
        (errors.ConnectionTimeout("no answer"), Reply.TTL_EXPIRED),
        (errors.SocksCommandNotSupported("BIND"), Reply.COMMAND_NOT_SUPPORTED),
        (errors.SocksAddressTypeNotSupported("7"), Reply.ADDRESS_TYPE_NOT_SUPPORTED),
        (errors.TooManyConnections("limit"), Reply.GENERAL_FAILURE),
        (errors.RequestTimeout("slow client"), Reply.GENERAL_FAILURE),
        (errors.KushiError("internal"), Reply.GENERAL_FAILURE),
    ],
)
def test_reply_codes(exc: errors.KushiError, reply: Reply) -> None:
    assert reply_for(exc) == reply


def test_build_reply() -> None:
    assert build_reply(Reply.NOT_ALLOWED) == b"\x05\x02\x00\x01\x00\x00\x00\x00\x00\x00"
    assert build_reply(Reply.SUCCEEDED, "2001:db8::1", 1080) == (
        b"\x05\x00\x00\x04" + ipaddress.IPv6Address("2001:db8::1").packed + b"\x04\x38"
    )
    assert build_reply(Reply.SUCCEEDED, "fe80::1%eth0", 1) == (
        b"\x05\x00\x00\x04" + ipaddress.IPv6Address("fe80::1").packed + b"\x00\x01"
    )


# --- RFC 1928 section 7: the UDP header --------------------------------------------------


def test_udp_header_round_trip_and_fragments() -> None:
    packet = build_udp("2001:db8:1::6", 53, b"query")
    assert packet[:4] == b"\x00\x00\x00\x04"
    assert parse_udp(packet) == Datagram("2001:db8:1::6", 53, b"query")
    assert parse_udp(b"\x00\x00\x00" + b"\x03\x07v6.test\x00\x35" + b"q") == Datagram(
        "v6.test", 53, b"q"
    )
    assert parse_udp(b"\x00\x00\x01" + packet[3:]) is None  # FRAG 1: dropped


@pytest.mark.parametrize(
    "packet, words",
    [
        (b"\x00\x00", "shorter than"),
        (b"\x00\x00\x00\x01\x01\x02", "shorter than"),
        (b"\x00\x01\x00\x01" + bytes(6), "RSV"),
        (b"\x00\x00\x00\x09" + bytes(6), "address type 9"),
    ],
)
def test_bad_udp_headers(packet: bytes, words: str) -> None:
    with pytest.raises(errors.SocksRequestError, match=words):
        parse_udp(packet)


@given(
    st.one_of(
        st.ip_addresses().map(str),
        st.from_regex(r"\A[a-z0-9]{1,20}(\.[a-z0-9]{1,20}){0,3}\Z"),
    ),
    st.integers(0, 65535),
    st.binary(max_size=100),
)
def test_udp_round_trip(host: str, port: int, data: bytes) -> None:
    parsed = parse_udp(build_udp(host, port, data))
    assert parsed is not None
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        mapped = addr.ipv4_mapped if isinstance(addr, ipaddress.IPv6Address) else None
        host = str(mapped or addr)
    assert (parsed.host, parsed.port, parsed.data) == (host, port, data)
