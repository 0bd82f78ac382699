"""A raw HTTP/1.1 client on one socket to kushi on 127.0.0.1: for what curl cannot show."""

from __future__ import annotations

import socket


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
