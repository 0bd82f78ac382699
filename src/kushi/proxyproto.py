"""The HAProxy PROXY protocol, versions 1 and 2, without any I/O.

Reference: "The PROXY protocol, Versions 1 & 2" (haproxy doc/proxy-protocol.txt, 2020/03/05
revision; the 2.9 copy is the same text). Section numbers in comments refer to it.

Design (in the style of h11): this module never touches a socket. The receiving side hands
:func:`parse` whatever bytes it has read so far and gets back one of three answers:

* ``(ProxyHeader, consumed)``: a complete, valid header occupies ``buffer[:consumed]``;
  everything after it is the proxied stream and belongs to the caller.
* ``None``: the bytes so far are a valid *prefix* of a header; read more and call again with
  the longer buffer (parsing restarts from the beginning, which is cheap for headers this
  small). We return ``None`` rather than raising a ``NeedMoreData`` exception so that the
  only exception a caller has to handle is the error one.
* :class:`~kushi.errors.ProxyProtocolError`: the bytes cannot be (the start of) a valid
  header. The decision is made as early as the bytes allow: a first byte that starts neither
  signature, an unknown v1 protocol word, a v1 character that cannot appear in the declared
  family's line, a bad v2 version, command, family or length are all rejected before the
  rest of the header arrives (section 2.1: "It is recommended to abort the connection as
  soon as possible").

A caller never needs to buffer more than :data:`MAX_HEADER_SIZE` bytes (with the default
``max_v2_length``) before :func:`parse` gives a definite answer.

What is accepted: v1 ``TCP4``, ``TCP6`` and ``UNKNOWN`` lines; v2 ``PROXY`` commands for TCP
over IPv4 or IPv6 (``\\x11``, ``\\x21``) and for ``UNSPEC`` (``\\x00``), and v2 ``LOCAL``
commands. UDP and UNIX families with the PROXY command raise: kushi only relays TCP.
Headers that carry no usable address (v1 ``UNKNOWN``, v2 ``LOCAL``, v2 ``PROXY`` with
``UNSPEC``) parse to ``family="unspec"`` with ``None`` addresses: the receiver must then use
the real connection endpoints (sections 2.1 and 2.2). v1 ``UNKNOWN`` is reported with
``command="LOCAL"`` since that is what it means to the receiver.

TLVs (section 2.2) of v2 TCP headers are returned verbatim, in order, as ``(type, value)``
pairs; the block must be exactly a sequence of well-formed TLVs. A ``PP2_TYPE_CRC32C`` TLV,
when present, is verified (section 2.2.3). For LOCAL and UNSPEC the whole announced block is
skipped unread, TLVs included, as section 2.2 says to ignore it; a LOCAL header may thus
name any assigned family (even UDP or UNIX) and need not carry that family's addresses.

Strictness choices: a v1 line must be exactly the section 2.1 grammar (single spaces, no
heading zeroes, ports in range, addresses of the declared family, IPv6 without a zone); a
CR or LF anywhere but in the final CRLF is refused, even in the ignored tail of an
``UNKNOWN`` line.

The builders take the client-side connection of the proxy (client address and port, and the
proxy's own listening address and port) and emit a header describing it. Both addresses
come from one connection so they normally share a family; defensively, mixed families are
sent as IPv6 with the IPv4 one IPv4-mapped, and two IPv4-mapped (or IPv4) addresses are sent
as plain IPv4 (``TCP4`` / ``AF_INET``). IPv6 zone identifiers (``%eth0``) cannot be carried
by the protocol and are dropped. Bad builder arguments raise :class:`ValueError`: they are
programming errors, not protocol errors.
"""

from __future__ import annotations

import ipaddress
import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from kushi.errors import ProxyProtocolError

__all__ = [
    "MAX_HEADER_SIZE",
    "V1_MAX_LINE",
    "V1_SIGNATURE",
    "V2_MAX_LENGTH",
    "V2_SIGNATURE",
    "ProxyHeader",
    "build",
    "build_v1",
    "build_v2",
    "build_v2_local",
    "parse",
]

Command = Literal["PROXY", "LOCAL"]
Family = Literal["ipv4", "ipv6", "unspec"]
Buffer = bytes | bytearray | memoryview

# Section 2.1: "PROXY" followed by exactly one space starts a version 1 line.
V1_SIGNATURE = b"PROXY "
# Section 2.1: the worst case line ("PROXY UNKNOWN" with two full IPv6 addresses and ports)
# is 107 bytes including the CRLF; no CRLF within 107 bytes makes the line invalid.
V1_MAX_LINE = 107
# Section 2.2: the constant 12-byte block that starts a version 2 header.
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
# Section 2.2: sig[12], ver_cmd, fam, len (network order): the fixed 16-byte part.
_V2_FIXED = 16
# The v2 length field can announce up to 65535 bytes. Addresses take at most 216 and the
# registered TLVs are short (section 2.2.5 caps a unique ID at 128 bytes), so anything far
# beyond is refused rather than buffered. Callers may pass another limit to parse().
V2_MAX_LENGTH = 4096
MAX_HEADER_SIZE = _V2_FIXED + V2_MAX_LENGTH

# Section 2.2, 13th byte: high nibble version (must be 2), low nibble command.
_V2_VERSION = 0x2
_CMD_LOCAL = 0x0
_CMD_PROXY = 0x1
# Section 2.2, 14th byte: family (high nibble) and transport protocol (low nibble).
_FAM_UNSPEC = 0x00
_FAM_TCP4 = 0x11
_FAM_TCP6 = 0x21
# Every assigned family/protocol byte and the size of its address block ("In practice, the
# following protocol bytes are expected"): UDP (0x12, 0x22) and UNIX (0x31, 0x32) are
# assigned but refused with the PROXY command, and skipped with LOCAL.
_V2_ADDRESS_LENGTHS = {0x00: 0, 0x11: 12, 0x12: 12, 0x21: 36, 0x22: 36, 0x31: 216, 0x32: 216}

# Section 2.2.3.
PP2_TYPE_CRC32C = 0x03

_V1_PROTOCOLS = (b"TCP4", b"TCP6", b"UNKNOWN")
# Section 2.1: the characters a TCP4 / TCP6 line can hold after the protocol word (the
# fields and their separating spaces). IPv6 allows an embedded dotted quad.
_V1_TCP4_CHARS = frozenset(b"0123456789. ")
_V1_TCP6_CHARS = frozenset(b"0123456789abcdefABCDEF:. ")
# Longest text of one field: a dotted quad, an IPv6 address (39 for eight full groups, 45
# with an embedded dotted quad), a port.
_V1_MAX_ADDRESS = {b"TCP4": 15, b"TCP6": 45}
_V1_MAX_PORT = 5
# Section 2.1: integers in [0..255], no heading zeroes, exactly one dot between them.
_V1_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9][0-9]|[0-9])"
_V1_IPV4 = re.compile(rf"{_V1_OCTET}(?:\.{_V1_OCTET}){{3}}")
# Section 2.1: ports in [0..65535], no heading zeroes.
_V1_PORT = re.compile(r"0|[1-9][0-9]{0,4}")


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """One parsed PROXY header.

    ``command`` is ``"LOCAL"`` for v2 LOCAL and for v1 UNKNOWN: the receiver must use the
    real connection endpoints. ``family`` is ``"unspec"`` (and the four address fields are
    ``None``) whenever the header carries no usable address. Addresses are text as
    :mod:`ipaddress` prints them; IPv6 without brackets.
    """

    version: int
    command: Command
    family: Family
    src: str | None
    src_port: int | None
    dst: str | None
    dst_port: int | None
    tlvs: tuple[tuple[int, bytes], ...] = ()


# --- parsing ---------------------------------------------------------------------------


def parse(buffer: Buffer, *, max_v2_length: int = V2_MAX_LENGTH) -> tuple[ProxyHeader, int] | None:
    """Parse a PROXY header (either version) at the start of ``buffer``.

    Returns ``(header, consumed)`` when a complete header is present, where ``consumed`` is
    the header's length in bytes (data after it is left alone), or ``None`` when ``buffer``
    is a valid prefix of a header and more bytes are needed. Raises
    :class:`~kushi.errors.ProxyProtocolError` as soon as the bytes cannot be a valid header;
    v2 headers whose length field exceeds ``max_v2_length`` are refused.
    """
    # Section 2.2 ("Identifying the protocol version is easy"): the two signatures differ
    # from the first byte ("P" versus CR), so the first byte picks the version and every
    # further byte of the signature either matches or proves the header wrong.
    head = bytes(buffer[: len(V2_SIGNATURE)])
    if not head:
        return None
    if V1_SIGNATURE.startswith(head[: len(V1_SIGNATURE)]):
        if len(head) < len(V1_SIGNATURE):
            return None
        return _parse_v1(bytes(buffer[:V1_MAX_LINE]))
    if V2_SIGNATURE.startswith(head):
        if len(head) < len(V2_SIGNATURE):
            return None
        return _parse_v2(buffer, max_v2_length)
    raise ProxyProtocolError(f"not a PROXY protocol header: starts with {head[:16]!r}")


def _parse_v1(data: bytes) -> tuple[ProxyHeader, int] | None:
    """Section 2.1. ``data`` starts with ``"PROXY "`` and holds at most 107 bytes."""
    end = data.find(b"\r\n")
    if end < 0:
        if len(data) >= V1_MAX_LINE:
            raise ProxyProtocolError(f"PROXY v1 line without CRLF in its first {V1_MAX_LINE} bytes")
        _check_v1_prefix(data[len(V1_SIGNATURE) :])
        return None
    line = data[len(V1_SIGNATURE) : end]
    if b"\n" in line or b"\r" in line:
        raise ProxyProtocolError("PROXY v1 line with a bare CR or LF")
    protocol, sep, rest = line.partition(b" ")
    consumed = end + 2
    if protocol == b"UNKNOWN":
        # "the receiver must ignore anything presented before the CRLF is found".
        return ProxyHeader(1, "LOCAL", "unspec", None, None, None, None), consumed
    if protocol not in (b"TCP4", b"TCP6"):
        raise ProxyProtocolError(f"PROXY v1 unknown protocol {protocol[:16]!r}")
    if not sep:
        raise ProxyProtocolError(f"PROXY v1 {protocol.decode()} line without addresses")
    fields = rest.split(b" ")
    if len(fields) != 4:
        raise ProxyProtocolError(
            f"PROXY v1 line needs 4 fields separated by single spaces, got {rest[:100]!r}"
        )
    src, dst = (_v1_address(protocol, field) for field in fields[:2])
    src_port, dst_port = (_v1_port(field) for field in fields[2:])
    family: Family = "ipv4" if protocol == b"TCP4" else "ipv6"
    return ProxyHeader(1, "PROXY", family, src, src_port, dst, dst_port), consumed


def _check_v1_prefix(partial: bytes) -> None:
    """Raise if ``partial`` (a v1 line after ``"PROXY "``, no CRLF yet) cannot be completed.

    Complete fields are validated fully; the field still arriving is only checked for its
    characters and length, so a valid line fed one byte at a time is never rejected.
    """
    if b"\n" in partial or b"\r" in partial[:-1]:
        # Section 2.1: "The receiver must not tolerate a single CR or LF character to end
        # the line"; a CR is fine only as the last byte, where its LF may still come.
        raise ProxyProtocolError("PROXY v1 line with a bare CR or LF")
    cut = min(i for i in (partial.find(b" "), partial.find(b"\r"), len(partial)) if i >= 0)
    protocol = partial[:cut]
    if cut == len(partial):
        if not any(known.startswith(protocol) for known in _V1_PROTOCOLS):
            raise ProxyProtocolError(f"PROXY v1 unknown protocol {protocol[:16]!r}")
        return
    if protocol not in _V1_PROTOCOLS:
        raise ProxyProtocolError(f"PROXY v1 unknown protocol {protocol[:16]!r}")
    if protocol == b"UNKNOWN":
        return  # anything may follow until the CRLF
    rest = partial[cut:]
    if rest[:1] != b" ":
        raise ProxyProtocolError(f"PROXY v1 {protocol.decode()} line without addresses")
    rest = rest[1:]
    if rest.endswith(b"\r"):
        rest = rest[:-1]  # possibly the start of the CRLF
    allowed = _V1_TCP4_CHARS if protocol == b"TCP4" else _V1_TCP6_CHARS
    bad = set(rest) - allowed
    if bad:
        raise ProxyProtocolError(
            f"PROXY v1 {protocol.decode()} line with unexpected byte {bytes([min(bad)])!r}"
        )
    fields = rest.split(b" ")
    if len(fields) > 4:
        raise ProxyProtocolError("PROXY v1 line with more than 4 fields or extra spaces")
    *complete, pending = fields
    for index, field in enumerate(complete):
        if index < 2:
            _v1_address(protocol, field)
        else:
            _v1_port(field)
    limit = _V1_MAX_ADDRESS[protocol] if len(complete) < 2 else _V1_MAX_PORT
    if len(pending) > limit or (len(complete) >= 2 and not pending.isdigit() and pending):
        raise ProxyProtocolError(f"PROXY v1 field {pending[:50]!r} cannot be valid")
    if len(complete) >= 2 and pending.startswith(b"0") and len(pending) > 1:
        raise ProxyProtocolError(f"PROXY v1 port {pending!r} has a heading zero")


def _v1_address(protocol: bytes, field: bytes) -> str:
    """Validate one v1 address for ``protocol`` (section 2.1) and return its text."""
    text = field.decode("ascii", "replace")
    if protocol == b"TCP4":
        if _V1_IPV4.fullmatch(text) is None:
            raise ProxyProtocolError(f"PROXY v1 TCP4 address {text[:50]!r} is not IPv4")
        return text
    # IPv6: anything but hex digits, colons and an embedded dotted quad (for example a
    # "%zone" suffix, which ipaddress would accept) is refused before ipaddress sees it.
    if not field or set(field) - _V1_TCP6_CHARS or b" " in field:
        raise ProxyProtocolError(f"PROXY v1 TCP6 address {text[:50]!r} is not IPv6")
    try:
        return str(ipaddress.IPv6Address(text))
    except ValueError:
        raise ProxyProtocolError(f"PROXY v1 TCP6 address {text[:50]!r} is not IPv6") from None


def _v1_port(field: bytes) -> int:
    """Validate one v1 port (section 2.1: decimal, [0..65535], no heading zeroes)."""
    text = field.decode("ascii", "replace")
    if _V1_PORT.fullmatch(text) is None or int(text) > 0xFFFF:
        raise ProxyProtocolError(f"PROXY v1 port {text[:50]!r} is not in 0..65535")
    return int(text)


def _parse_v2(buffer: Buffer, max_length: int) -> tuple[ProxyHeader, int] | None:
    """Section 2.2. ``buffer`` starts with the full 12-byte signature."""
    fixed = bytes(buffer[:_V2_FIXED])
    if len(fixed) > 12:
        # 13th byte: "The highest four bits contains the version ... the receiver must only
        # accept this value", and "Receivers must drop connections presenting unexpected
        # values" for the command.
        version, command = fixed[12] >> 4, fixed[12] & 0x0F
        if version != _V2_VERSION:
            raise ProxyProtocolError(f"PROXY v2 header with version {version}")
        if command not in (_CMD_LOCAL, _CMD_PROXY):
            raise ProxyProtocolError(f"PROXY v2 header with unknown command {command:#x}")
    if len(fixed) > 13:
        # 14th byte: unassigned family or protocol values "must be rejected as invalid".
        family_byte = fixed[13]
        if family_byte not in _V2_ADDRESS_LENGTHS:
            raise ProxyProtocolError(
                f"PROXY v2 header with unknown family/protocol {family_byte:#04x}"
            )
        if fixed[12] & 0x0F == _CMD_PROXY and family_byte not in (
            _FAM_UNSPEC,
            _FAM_TCP4,
            _FAM_TCP6,
        ):
            raise ProxyProtocolError(
                f"PROXY v2 family/protocol {family_byte:#04x} is not TCP over IPv4 or IPv6"
            )
    if len(fixed) < _V2_FIXED:
        return None
    command, family_byte = fixed[12] & 0x0F, fixed[13]
    (length,) = struct.unpack_from("!H", fixed, 14)
    if length > max_length:
        raise ProxyProtocolError(f"PROXY v2 length {length} is over the limit of {max_length}")
    address_length = _V2_ADDRESS_LENGTHS[family_byte]
    if command == _CMD_PROXY and length < address_length:
        raise ProxyProtocolError(
            f"PROXY v2 length {length} is shorter than the {address_length}-byte address block"
        )
    total = _V2_FIXED + length
    if len(buffer) < total:
        return None
    if command == _CMD_LOCAL or family_byte == _FAM_UNSPEC:
        # LOCAL: "discard the protocol block including the family which is ignored".
        # UNSPEC: "The receiver should ignore address information." Either way the whole
        # announced length is skipped ("Receivers MUST always consider this field").
        name: Command = "LOCAL" if command == _CMD_LOCAL else "PROXY"
        return ProxyHeader(2, name, "unspec", None, None, None, None), total
    header = bytes(buffer[:total])
    if family_byte == _FAM_TCP4:
        src_raw, dst_raw, src_port, dst_port = struct.unpack_from("!4s4sHH", header, _V2_FIXED)
        src = str(ipaddress.IPv4Address(src_raw))
        dst = str(ipaddress.IPv4Address(dst_raw))
        family: Family = "ipv4"
    else:
        src_raw, dst_raw, src_port, dst_port = struct.unpack_from("!16s16sHH", header, _V2_FIXED)
        src = str(ipaddress.IPv6Address(src_raw))
        dst = str(ipaddress.IPv6Address(dst_raw))
        family = "ipv6"
    tlvs = _parse_tlvs(header, _V2_FIXED + address_length)
    return ProxyHeader(2, "PROXY", family, src, src_port, dst, dst_port, tlvs), total


def _parse_tlvs(header: bytes, offset: int) -> tuple[tuple[int, bytes], ...]:
    """Split ``header[offset:]`` into TLVs (section 2.2: type, 16-bit length, value)."""
    tlvs: list[tuple[int, bytes]] = []
    crc_at: int | None = None
    while offset < len(header):
        if offset + 3 > len(header):
            raise ProxyProtocolError("PROXY v2 TLV block ends inside a TLV header")
        kind, size = struct.unpack_from("!BH", header, offset)
        start, offset = offset + 3, offset + 3 + size
        if offset > len(header):
            raise ProxyProtocolError(f"PROXY v2 TLV {kind:#04x} runs past the header")
        if kind == PP2_TYPE_CRC32C:
            if size != 4 or crc_at is not None:
                raise ProxyProtocolError("PROXY v2 CRC32C TLV is malformed or repeated")
            crc_at = start
        tlvs.append((kind, header[start:offset]))
    if crc_at is not None:
        # Section 2.2.3: zero the checksum field, compute CRC32c over the whole header.
        expected = int.from_bytes(header[crc_at : crc_at + 4], "big")
        zeroed = header[:crc_at] + b"\x00\x00\x00\x00" + header[crc_at + 4 :]
        if _crc32c(zeroed) != expected:
            raise ProxyProtocolError("PROXY v2 header fails its CRC32C checksum")
    return tuple(tlvs)


def _make_crc32c_table() -> tuple[int, ...]:
    # CRC-32C (Castagnoli), reflected polynomial 0x82F63B78, as in RFC 4960 appendix B.
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_CRC32C_TABLE = _make_crc32c_table()


def _crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC32C_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


# --- building --------------------------------------------------------------------------

_Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def _address_pair(src: str, dst: str) -> tuple[_Address, _Address]:
    """Parse both addresses and bring them to one family (see the module docstring)."""

    def plain(text: str) -> _Address:
        address = ipaddress.ip_address(text)
        if isinstance(address, ipaddress.IPv6Address):
            if address.ipv4_mapped is not None:
                return address.ipv4_mapped
            if address.scope_id is not None:
                return ipaddress.IPv6Address(int(address))  # drop the zone
        return address

    def mapped(address: _Address) -> ipaddress.IPv6Address:
        if isinstance(address, ipaddress.IPv6Address):
            return address
        return ipaddress.IPv6Address(b"\x00" * 10 + b"\xff\xff" + address.packed)

    a, b = plain(src), plain(dst)
    if a.version != b.version:
        a, b = mapped(a), mapped(b)
    return a, b


def _check_port(port: int) -> int:
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 0xFFFF:
        raise ValueError(f"port {port!r} is not an integer in 0..65535")
    return port


def _v1_text(address: _Address) -> str:
    """Section 2.1 text: dotted quad, or IPv6 as colon-separated hex groups only."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        # Some Python versions print mapped addresses with a dotted quad; the spec's IPv6
        # format is hex groups, so spell out ::ffff:hhhh:hhhh ourselves.
        low = int(address) & 0xFFFFFFFF
        return f"::ffff:{low >> 16:x}:{low & 0xFFFF:x}"
    return str(address)


def build_v1(src: str, src_port: int, dst: str, dst_port: int) -> bytes:
    """A version 1 line (section 2.1) for a TCP connection from ``src`` to ``dst``."""
    a, b = _address_pair(src, dst)
    protocol = "TCP4" if a.version == 4 else "TCP6"
    ports = f"{_check_port(src_port)} {_check_port(dst_port)}"
    return f"PROXY {protocol} {_v1_text(a)} {_v1_text(b)} {ports}\r\n".encode("ascii")


def build_v2(
    src: str,
    src_port: int,
    dst: str,
    dst_port: int,
    *,
    tlvs: Iterable[tuple[int, bytes]] = (),
    checksum: bool = False,
) -> bytes:
    """A version 2 header (section 2.2), command PROXY, TCP over IPv4 or IPv6.

    ``tlvs`` are appended in order as ``(type, value)`` pairs. With ``checksum`` a
    ``PP2_TYPE_CRC32C`` TLV is appended last and filled in (section 2.2.3).
    """
    a, b = _address_pair(src, dst)
    family_byte = _FAM_TCP4 if a.version == 4 else _FAM_TCP6
    block = a.packed + b.packed + struct.pack("!HH", _check_port(src_port), _check_port(dst_port))
    extra = list(tlvs)
    if checksum:
        extra.append((PP2_TYPE_CRC32C, b"\x00\x00\x00\x00"))
    for kind, value in extra:
        if not 0 <= kind <= 0xFF or len(value) > 0xFFFF:
            raise ValueError(f"TLV type {kind!r} or its {len(value)}-byte value does not fit")
        block += struct.pack("!BH", kind, len(value)) + bytes(value)
    if len(block) > 0xFFFF:
        raise ValueError(f"PROXY v2 header payload of {len(block)} bytes does not fit")
    ver_cmd = (_V2_VERSION << 4) | _CMD_PROXY
    header = V2_SIGNATURE + struct.pack("!BBH", ver_cmd, family_byte, len(block)) + block
    if checksum:
        header = header[:-4] + _crc32c(header).to_bytes(4, "big")
    return header


def build_v2_local() -> bytes:
    """A version 2 LOCAL header: UNSPEC family, no address (section 2.2)."""
    ver_cmd = (_V2_VERSION << 4) | _CMD_LOCAL
    return V2_SIGNATURE + struct.pack("!BBH", ver_cmd, _FAM_UNSPEC, 0)


def build(version: int, src: str, src_port: int, dst: str, dst_port: int) -> bytes:
    """A PROXY header of ``version`` 1 or 2 for a TCP connection from ``src`` to ``dst``."""
    if version == 1:
        return build_v1(src, src_port, dst, dst_port)
    if version == 2:
        return build_v2(src, src_port, dst, dst_port)
    raise ValueError(f"PROXY protocol version {version!r} is not 1 or 2")
