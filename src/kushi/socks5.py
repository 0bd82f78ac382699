"""SOCKS5 without I/O: the server side of RFC 1928 and RFC 1929, and the UDP header codec.

``ServerHandshake`` consumes bytes from the client's buffer (a ``bytearray``, consumed in
place like ``http1``'s readers) and returns one event at a time:

``MethodSelected``  the method kushi chose (RFC 1928 section 3), with the reply to send;
                    ``NO_ACCEPTABLE`` (0xFF) means: send it, then close.
``Credentials``     an RFC 1929 username/password sub-negotiation; the shell checks it and
                    calls ``auth_result(ok)`` for the bytes to send (a failure closes).
``Requested``       the request (RFC 1928 section 4): CONNECT or UDP ASSOCIATE and where.

``None`` means more bytes are needed; ``eof()`` says what an end of stream at this point
means. Malformed input raises a ``SocksRequestError`` (errors.py) carrying the reply code
to send, if any can be. ``reply_for`` maps every kushi error to the RFC 1928 reply code
that fits (section 6), ``build_reply`` writes the reply, and ``parse_udp`` /
``build_udp`` handle the UDP request header of section 7 (a fragment, FRAG != 0, is
dropped: kushi does not reassemble, which section 7 permits).
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Literal

from kushi.errors import (
    KushiError,
    SocksAddressTypeNotSupported,
    SocksCommandNotSupported,
    SocksRequestError,
)

VERSION = 5
#: RFC 1929 section 2: the sub-negotiation's own version number.
USERPASS_VERSION = 1


class Method(IntEnum):
    NO_AUTH = 0x00
    GSSAPI = 0x01
    USERPASS = 0x02
    NO_ACCEPTABLE = 0xFF


class Command(IntEnum):
    CONNECT = 0x01
    BIND = 0x02
    UDP_ASSOCIATE = 0x03


class AddressType(IntEnum):
    IPV4 = 0x01
    DOMAIN = 0x03
    IPV6 = 0x04


class Reply(IntEnum):
    """RFC 1928 section 6, the REP field."""

    SUCCEEDED = 0x00
    GENERAL_FAILURE = 0x01
    NOT_ALLOWED = 0x02
    NETWORK_UNREACHABLE = 0x03
    HOST_UNREACHABLE = 0x04
    CONNECTION_REFUSED = 0x05
    TTL_EXPIRED = 0x06
    COMMAND_NOT_SUPPORTED = 0x07
    ADDRESS_TYPE_NOT_SUPPORTED = 0x08


#: RFC 9209 error type -> the reply that tells a SOCKS client the same thing.
REPLY_FOR_ERROR_TYPE: dict[str, Reply] = {
    "http_request_denied": Reply.NOT_ALLOWED,  # allow list, password, connect_ports
    "destination_ip_prohibited": Reply.NOT_ALLOWED,  # the destination policy
    "proxy_loop_detected": Reply.NOT_ALLOWED,
    # No address of a family the egress policy allows (ipv6-only and an A-only name):
    "destination_not_found": Reply.NETWORK_UNREACHABLE,
    "destination_ip_unroutable": Reply.NETWORK_UNREACHABLE,
    "dns_error": Reply.HOST_UNREACHABLE,
    "dns_timeout": Reply.HOST_UNREACHABLE,
    "connection_refused": Reply.CONNECTION_REFUSED,
    "connection_timeout": Reply.TTL_EXPIRED,
}


def reply_for(exc: KushiError) -> Reply:
    """The RFC 1928 reply code for an error (general failure when nothing fits better)."""
    if isinstance(exc, SocksRequestError):
        return Reply(exc.reply)
    return REPLY_FOR_ERROR_TYPE.get(exc.error_type, Reply.GENERAL_FAILURE)


# --- events ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MethodSelected:
    method: Method
    data: bytes


@dataclass(frozen=True, slots=True)
class Credentials:
    username: str
    #: Never logged, never in a repr.
    password: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class Requested:
    command: Command
    host: str  # an IP literal (IPv6 without brackets) or a domain name
    port: int
    address_type: AddressType

    @property
    def target(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


Event = MethodSelected | Credentials | Requested
State = Literal["greeting", "auth", "auth-result", "request", "done", "closed"]


class ServerHandshake:
    """The server's side of one SOCKS5 handshake, from the greeting to the request."""

    def __init__(self, *, offer: tuple[Method, ...]) -> None:
        #: Methods kushi accepts for this client, best first (empty: deny everything).
        self.offer = offer
        self.state: State = "greeting"

    def next_event(self, buf: bytearray) -> Event | None:
        if self.state == "greeting":
            return self._greeting(buf)
        if self.state == "auth":
            return self._userpass(buf)
        if self.state == "request":
            return self._request(buf)
        raise SocksRequestError(f"unexpected bytes in SOCKS5 state {self.state}")

    def auth_result(self, ok: bool) -> bytes:
        """RFC 1929 section 2: STATUS 0x00 is success; anything else and the server "MUST
        close the connection"."""
        if self.state != "auth-result":
            raise SocksRequestError("no credentials to answer")
        self.state = "request" if ok else "closed"
        return bytes((USERPASS_VERSION, 0x00 if ok else 0x01))

    def eof(self, buf: bytearray) -> SocksRequestError | None:
        """What an end of stream now means: None before the first byte (a port probe),
        else a truncated handshake."""
        if self.state == "greeting" and not buf:
            return None
        where = {"greeting": "greeting", "auth": "username/password", "request": "request"}
        return SocksRequestError(
            f"connection closed inside the SOCKS5 {where.get(self.state, 'handshake')}"
        )

    # --- RFC 1928 section 3: VER NMETHODS METHODS ----------------------------------------

    def _greeting(self, buf: bytearray) -> MethodSelected | None:
        if not buf:
            return None
        if buf[0] != VERSION:
            raise SocksRequestError(f"unknown SOCKS version {buf[0]} (kushi speaks SOCKS5)")
        if len(buf) < 2:
            return None
        count = buf[1]
        if count == 0:
            raise SocksRequestError("SOCKS5 greeting offers no authentication method")
        if len(buf) < 2 + count:
            return None
        offered = set(buf[2 : 2 + count])
        del buf[: 2 + count]
        chosen = next((m for m in self.offer if m in offered), Method.NO_ACCEPTABLE)
        if chosen == Method.NO_AUTH:
            self.state = "request"
        elif chosen == Method.USERPASS:
            self.state = "auth"
        else:
            self.state = "closed"
        return MethodSelected(chosen, bytes((VERSION, chosen)))

    # --- RFC 1929 section 2: VER ULEN UNAME PLEN PASSWD -----------------------------------

    def _userpass(self, buf: bytearray) -> Credentials | None:
        if not buf:
            return None
        if buf[0] != USERPASS_VERSION:
            raise SocksRequestError(f"unknown username/password version {buf[0]} (RFC 1929: 1)")
        if len(buf) < 2:
            return None
        ulen = buf[1]
        if len(buf) < 3 + ulen:
            return None
        plen = buf[2 + ulen]
        end = 3 + ulen + plen
        if len(buf) < end:
            return None
        if ulen == 0:
            raise SocksRequestError("empty SOCKS5 username")
        username = bytes(buf[2 : 2 + ulen]).decode("utf-8", "replace")
        password = bytes(buf[3 + ulen : end])
        del buf[:end]
        self.state = "auth-result"
        return Credentials(username, password)

    # --- RFC 1928 section 4: VER CMD RSV ATYP DST.ADDR DST.PORT ---------------------------

    def _request(self, buf: bytearray) -> Requested | None:
        if not buf:
            return None
        if buf[0] != VERSION:
            raise SocksRequestError(f"SOCKS5 request with version {buf[0]}")
        if len(buf) < 4:
            return None
        cmd, atyp = buf[1], buf[3]
        parsed = parse_address(buf, 3)
        if parsed is None:
            return None
        host, port, used = parsed
        del buf[:used]
        self.state = "done"
        if cmd not in (Command.CONNECT, Command.UDP_ASSOCIATE):
            name = "BIND" if cmd == Command.BIND else f"command {cmd}"
            raise SocksCommandNotSupported(f"SOCKS5 {name} is not supported")
        return Requested(Command(cmd), host, port, AddressType(atyp))


def parse_address(buf: bytes | bytearray, offset: int) -> tuple[str, int, int] | None:
    """ATYP DST.ADDR DST.PORT starting at ``offset``: (host, port, end offset), or None
    when incomplete. Raises for an unknown address type or an unusable domain name."""
    if len(buf) <= offset:
        return None
    atyp = buf[offset]
    start = offset + 1
    if atyp == AddressType.IPV4:
        end = start + 4
        if len(buf) < end + 2:
            return None
        host = str(ipaddress.IPv4Address(bytes(buf[start:end])))
    elif atyp == AddressType.IPV6:
        end = start + 16
        if len(buf) < end + 2:
            return None
        addr6 = ipaddress.IPv6Address(bytes(buf[start:end]))
        host = str(addr6.ipv4_mapped or addr6)
    elif atyp == AddressType.DOMAIN:
        if len(buf) <= start:
            return None
        size = buf[start]
        end = start + 1 + size
        if len(buf) < end + 2:
            return None
        host = check_domain(bytes(buf[start + 1 : end]))
    else:
        raise SocksAddressTypeNotSupported(f"SOCKS5 address type {atyp} is not supported")
    (port,) = struct.unpack_from("!H", buf, end)
    return host, port, end + 2


_NAME_CHARS = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_")


def check_domain(raw: bytes) -> str:
    """A DOMAINNAME field as kushi will resolve it; refused unless it is a plausible host
    name (RFC 1035 section 2.3.4: 253 octets, labels of 1 to 63) or an IP literal."""
    if not raw:
        raise SocksRequestError("empty SOCKS5 domain name")
    text = raw.decode("ascii", "replace")
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        pass
    name = raw[:-1] if raw.endswith(b".") else raw
    if len(name) > 253:
        raise SocksRequestError(f"SOCKS5 domain name of {len(raw)} octets is longer than 253")
    labels = name.split(b".")
    if not all(0 < len(label) <= 63 and set(label) <= _NAME_CHARS for label in labels):
        raise SocksRequestError(f"SOCKS5 domain name {text[:80]!r} is not a host name")
    return name.decode("ascii")


def encode_address(host: str, port: int) -> bytes:
    """ATYP ADDR PORT for an IP literal or a domain name."""
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        raw = host.encode("ascii")
        if not raw or len(raw) > 255:
            raise ValueError(f"cannot encode domain name {host!r}") from None
        return bytes((AddressType.DOMAIN, len(raw))) + raw + struct.pack("!H", port)
    if addr.version == 4:
        return bytes((AddressType.IPV4,)) + addr.packed + struct.pack("!H", port)
    return bytes((AddressType.IPV6,)) + addr.packed + struct.pack("!H", port)


def build_reply(reply: Reply, host: str = "0.0.0.0", port: int = 0) -> bytes:
    """VER REP RSV ATYP BND.ADDR BND.PORT (RFC 1928 section 6)."""
    return bytes((VERSION, reply, 0)) + encode_address(host.split("%")[0], port)


# --- RFC 1928 section 7: the UDP request header -----------------------------------------


@dataclass(frozen=True, slots=True)
class Datagram:
    host: str
    port: int
    data: bytes


def parse_udp(packet: bytes) -> Datagram | None:
    """RSV(2) FRAG ATYP DST.ADDR DST.PORT DATA; None for a fragment (FRAG != 0), which is
    dropped. Raises ``SocksRequestError`` for a malformed header."""
    if len(packet) < 4:
        raise SocksRequestError("UDP datagram shorter than its SOCKS5 header")
    if packet[0] or packet[1]:
        raise SocksRequestError("UDP datagram with a non-zero RSV field")
    if packet[2]:
        return None
    parsed = parse_address(packet, 3)
    if parsed is None:
        raise SocksRequestError("UDP datagram shorter than its SOCKS5 header")
    host, port, used = parsed
    return Datagram(host, port, packet[used:])


def build_udp(host: str, port: int, data: bytes) -> bytes:
    return b"\x00\x00\x00" + encode_address(host, port) + data


__all__ = [
    "AddressType",
    "Command",
    "Credentials",
    "Datagram",
    "Method",
    "MethodSelected",
    "Reply",
    "Requested",
    "ServerHandshake",
    "build_reply",
    "build_udp",
    "parse_udp",
    "reply_for",
]
