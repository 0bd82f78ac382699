"""A raw SOCKS5 client for tests that need exact bytes (RFC 1928, RFC 1929).

Written independently of ``kushi.socks5``: the tests check kushi against what the RFCs say,
not against its own encoder. Real client programs (curl, PySocks, nc -X 5, Chromium) are
used wherever a test is about what users run; this is for malformed input and for reading
reply codes byte for byte.
"""

from __future__ import annotations

import ipaddress
import select
import socket
import struct
import time


def recv_exact(sock: socket.socket, n: int) -> bytes:
    """``n`` bytes, or fewer if the peer closed first."""
    out = b""
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            break
        out += chunk
    return out


def address(host: str, port: int) -> bytes:
    """ATYP DST.ADDR DST.PORT: IPv4 (1), IPv6 (4) or a domain name (3)."""
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        raw = host.encode()
        return bytes((3, len(raw))) + raw + struct.pack("!H", port)
    atyp = 1 if addr.version == 4 else 4
    return bytes((atyp,)) + addr.packed + struct.pack("!H", port)


def greet(sock: socket.socket, methods: bytes = b"\x00") -> bytes:
    """Send the greeting; returns the server's two-byte method selection (b"" if closed)."""
    sock.sendall(bytes((5, len(methods))) + methods)
    return recv_exact(sock, 2)


def login(sock: socket.socket, user: str, password: str) -> bytes:
    """RFC 1929 sub-negotiation; returns VER STATUS (b"" if closed)."""
    u, p = user.encode(), password.encode()
    sock.sendall(bytes((1, len(u))) + u + bytes((len(p),)) + p)
    return recv_exact(sock, 2)


def read_reply(sock: socket.socket) -> tuple[int, str, int] | None:
    """(REP, BND.ADDR, BND.PORT), or None when the connection closed instead."""
    head = recv_exact(sock, 4)
    if len(head) < 4:
        return None
    atyp = head[3]
    if atyp == 1:
        raw = recv_exact(sock, 4)
        host = str(ipaddress.IPv4Address(raw))
    elif atyp == 4:
        raw = recv_exact(sock, 16)
        host = str(ipaddress.IPv6Address(raw))
    else:
        size = recv_exact(sock, 1)[0]
        host = recv_exact(sock, size).decode()
    (port,) = struct.unpack("!H", recv_exact(sock, 2))
    return head[1], host, port


def request(
    sock: socket.socket, host: str, port: int, command: int = 1
) -> tuple[int, str, int] | None:
    """Send CONNECT (1) / BIND (2) / UDP ASSOCIATE (3); returns ``read_reply``."""
    sock.sendall(bytes((5, command, 0)) + address(host, port))
    return read_reply(sock)


def connect(
    proxy: tuple[str, int],
    host: str,
    port: int,
    *,
    command: int = 1,
    auth: tuple[str, str] | None = None,
    timeout: float = 10.0,
) -> tuple[socket.socket, tuple[int, str, int] | None]:
    """Open a session through ``proxy``: greeting, optional login, request."""
    sock = socket.create_connection(proxy, timeout)
    selected = greet(sock, b"\x02" if auth else b"\x00")
    assert selected == (b"\x05\x02" if auth else b"\x05\x00"), selected
    if auth:
        assert login(sock, *auth) == b"\x01\x00"
    return sock, request(sock, host, port, command)


def closed_by_peer(sock: socket.socket, timeout: float) -> bool:
    """Whether the peer closes the connection (EOF or reset) within ``timeout``; bytes it
    sends first (a failure reply) are read and dropped."""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select([sock], [], [], left)
        if not ready:
            return False
        try:
            if sock.recv(4096) == b"":
                return True
        except ConnectionError:
            return True
    return False


def udp_packet(host: str, port: int, data: bytes, frag: int = 0) -> bytes:
    """RFC 1928 section 7: RSV RSV FRAG ATYP DST.ADDR DST.PORT DATA."""
    return bytes((0, 0, frag)) + address(host, port) + data


def pending_accepts(sock: socket.socket) -> int:
    """Connections waiting on a listening socket that nothing accepts: how many times the
    destination was contacted."""
    count = 0
    sock.setblocking(False)
    while True:
        try:
            conn, _ = sock.accept()
        except BlockingIOError:
            return count
        conn.close()
        count += 1
