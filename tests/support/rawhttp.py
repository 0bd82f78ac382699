"""A raw HTTP/1.1 client on one socket to kushi on 127.0.0.1: for what curl cannot show."""

from __future__ import annotations

import os
import select
import socket
from collections.abc import Callable


class Raw:
    def __init__(self, port: int, timeout: float = 60.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.rfile = self.sock.makefile("rb")

    def __enter__(self) -> Raw:
        return self

    def __exit__(self, *exc: object) -> None:
        self.rfile.close()
        self.sock.close()

    def head(self) -> tuple[int, dict[str, str]]:
        """The status and the fields (lower-case names) of the next response head."""
        status_line = self.rfile.readline()
        assert status_line.startswith(b"HTTP/1.1 "), status_line
        fields: dict[str, str] = {}
        while (line := self.rfile.readline()) != b"\r\n":
            assert line.endswith(b"\r\n"), line
            name, _, value = line.decode("latin-1").partition(":")
            fields[name.lower()] = value.strip()
        return int(status_line.split()[1]), fields

    def body(self, fields: dict[str, str]) -> bytes:
        return self.rfile.read(int(fields["content-length"]))

    def get(self, url: str, *headers: str) -> tuple[int, dict[str, str], bytes]:
        """An absolute-form GET through the proxy: status, fields and body."""
        host = url.split("/")[2]
        lines = [f"GET {url} HTTP/1.1", f"Host: {host}", *headers]
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        status, fields = self.head()
        return status, fields, self.body(fields)

    def connect(self, target: str) -> tuple[int, dict[str, str]]:
        self.sock.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
        return self.head()


class Client:
    """A raw client connection to kushi on 127.0.0.1, from loopback address ``source``
    (loopback answers on all of 127/8, so tests can be several clients)."""

    def __init__(self, port: int, source: str = "127.0.0.1", timeout: float = 10.0) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            self.sock.bind((source, 0))
            self.sock.settimeout(timeout)
            self.sock.connect(("127.0.0.1", port))
        except BaseException:
            self.sock.close()
            raise
        self.buf = b""

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def _fill(self) -> bool:
        """Read more; False at the end of the stream (or a reset)."""
        try:
            data = self.sock.recv(1 << 20)
        except ConnectionResetError:
            data = b""
        self.buf += data
        return bool(data)

    def read_head(self) -> tuple[int, dict[str, str]]:
        while b"\r\n\r\n" not in self.buf:
            assert self._fill(), f"closed inside the response head: {self.buf[:200]!r}"
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        fields: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            fields[name.strip().lower()] = value.strip()
        return int(lines[0].split()[1]), fields

    def read_body(self, n: int) -> bytes:
        """Up to ``n`` bytes: fewer only when the connection ends first."""
        while len(self.buf) < n and self._fill():
            pass
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    def read_exact(self, n: int) -> bytes:
        data = self.read_body(n)
        if len(data) < n:
            raise EOFError(f"connection closed after {len(data)} of {n} bytes")
        return data

    def get(self, url: str, *, close: bool = False) -> tuple[int, dict[str, str], bytes]:
        """An absolute-form GET: status, fields, and the body (short if it was cut)."""
        host = url.split("/")[2]
        extra = "Connection: close\r\n" if close else ""
        self.sock.sendall(f"GET {url} HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n".encode())
        status, fields = self.read_head()
        return status, fields, self.read_body(int(fields.get("content-length", "0")))

    def closed_by_peer(self, timeout: float) -> bool:
        """True when kushi closes the connection (EOF or reset) within ``timeout`` with
        nothing more sent; False when still open then."""
        ready, _, _ = select.select([self.sock], [], [], timeout)
        if not ready:
            return False
        try:
            data = self.sock.recv(65536)
        except ConnectionResetError:
            return True
        assert data == b"", f"kushi sent {data[:200]!r} instead of closing"
        return True


# --- WebSocket frames (RFC 6455 section 5.2), as a client sends and reads them -------------


def ws_client_frame(opcode: int, payload: bytes) -> bytes:
    """A final, masked client frame (a client must mask every frame)."""
    mask = os.urandom(4)
    n = len(payload)
    if n < 126:
        head = bytes([0x80 | opcode, 0x80 | n])
    elif n < 65536:
        head = bytes([0x80 | opcode, 0x80 | 126]) + n.to_bytes(2, "big")
    else:
        head = bytes([0x80 | opcode, 0x80 | 127]) + n.to_bytes(8, "big")
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def ws_read_frame(read: Callable[[int], bytes]) -> tuple[int, bytes]:
    """(first byte, payload) of the next server frame; ``read(n)`` returns n bytes."""
    b0, b1 = read(2)
    assert not b1 & 0x80, "server frames are not masked"
    n = b1 & 0x7F
    if n == 126:
        n = int.from_bytes(read(2), "big")
    elif n == 127:
        n = int.from_bytes(read(8), "big")
    return b0, read(n)
