#!/usr/bin/env python3
"""A real HTTP/1.1 origin server for kushi's tests (stdlib only).

Run it as a subprocess, possibly inside a network namespace::

    python tests/support/origin.py --listen [::]:8080 --listen 0.0.0.0:8080 \
        --log /tmp/origin.jsonl [--tls-cert C --tls-key K] [--proxy-protocol] [--name NAME]

When every socket is bound it prints ``READY ["[::]:8080", "0.0.0.0:8080"]`` (a JSON list of
the addresses actually bound, IPv6 in brackets) and flushes stdout.  Port 0 is allowed; a later
``:0`` listener tries to reuse the port the first ``:0`` listener got, so ``--listen [::1]:0
--listen 127.0.0.1:0`` normally ends up on one port for both families.  A wildcard ``[::]``
listener is dual-stack unless an IPv4 listener is given too.

Every request appends one JSON line to the log file (written with a single ``write`` on an
``O_APPEND`` descriptor, so readers never see half a line except at the very end)::

    {"client": "2001:db8:1::1", "port": 41234, "family": "ipv6", "local": ..., "local_port": ...,
     "method": "GET", "target": "/1k", "version": "HTTP/1.1", "headers": [[name, value], ...],
     "body_len": 0, "body_sha256": "...", "trailers": [], "proxy_protocol": null, "tls": false,
     "sni": null, "conn": 1, "seq": 1, "time": 1700000000.0, "error": null}

``client``/``port`` are the TCP peer (an IPv4-mapped peer is logged as plain IPv4, family
``ipv4``); ``conn`` numbers accepted connections and ``seq`` the requests on one connection, so
tests can see connection reuse.  ``error`` is set when the request was answered 400 (no or
several Host headers in HTTP/1.1, both Transfer-Encoding and Content-Length, a bad chunk) or
its body could not be read completely.  Connection-level problems (bad PROXY header, TLS
failure, unparsable request head, client gone) go to stderr as JSON lines with an ``event``.

Strictness: a request line or header that does not parse, obs-fold, TE+CL, a transfer-coding
other than plain ``chunked``, and differing Content-Lengths all get a 400 and a close.

Endpoints (GET endpoints also answer HEAD; other methods there get 405):

- ``/1k``: 1024 bytes of text/plain.
- ``/bytes/N``: N bytes of the pattern ``bytes(i % 251 ...)``, Content-Length, 64 KiB pieces.
- ``/chunked/N``: the same bytes chunked in 10 000 byte chunks, trailer ``X-Trailer: done``.
- ``/close/N``: the same bytes delimited by closing the connection (no length, no chunking).
- ``/echo`` (any method): the request body back, with Content-Length, ``X-Request-SHA256`` and
  ``X-Request-Length`` (bodies up to 64 MiB).
- ``/sha256`` (POST/PUT): ``{"length": N, "sha256": "..."}`` of a streamed body of any size.
- ``/status/CODE`` (any method): that status; 204 and 304 without a body.
- ``/headers`` (any method): JSON of the request as received.
- ``/ws``: WebSocket (RFC 6455) echo.
- ``/slow-headers/MS``: waits MS milliseconds, then answers 200.
- anything else: 404.

``Expect: 100-continue`` gets ``HTTP/1.1 100 Continue`` before the body is read, except on
``/status/CODE`` with CODE >= 400, which answers the final status at once and closes.

Use ``pattern_chunks(n)``, ``pattern_bytes(n)`` and ``pattern_sha256(n)`` from this module to
compute expected bodies, and ``spawn_origin(...)`` to run the server (returns an
``OriginProcess``).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import functools
import hashlib
import ipaddress
import json
import os
import select
import signal
import socket
import ssl
import subprocess
import sys
import time
import traceback
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from email.utils import formatdate
from http import HTTPStatus
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

# ---------------------------------------------------------------------------------------------
# The deterministic body pattern.

PATTERN_PERIOD = 251
PIECE = 64 * 1024
CHUNKED_CHUNK = 10_000
_PERIOD = bytes(range(PATTERN_PERIOD))
_BLOCK = _PERIOD * (PIECE // PATTERN_PERIOD + 2)

#: The body of ``/1k``: 16 lines of 64 bytes.
ONE_K = b"".join(
    (b"%02d kushi-test-origin " % i + b"abcdefghijklmnopqrstuvwxyz" * 2)[:63] + b"\n"
    for i in range(16)
)
assert len(ONE_K) == 1024


def _pattern_slice(start: int, size: int) -> bytes:
    """``size`` pattern bytes starting at absolute offset ``start``."""
    r = start % PATTERN_PERIOD
    if r + size <= len(_BLOCK):
        return _BLOCK[r : r + size]
    rotated = _PERIOD[r:] + _PERIOD[:r]
    return (rotated * (size // PATTERN_PERIOD + 1))[:size]


def pattern_chunks(n: int, chunk_size: int = PIECE) -> Iterator[bytes]:
    """The first ``n`` bytes of ``bytes(i % 251 for i in range(n))`` in pieces."""
    if n < 0 or chunk_size <= 0:
        raise ValueError("n must be >= 0 and chunk_size > 0")
    pos = 0
    while pos < n:
        size = min(chunk_size, n - pos)
        yield _pattern_slice(pos, size)
        pos += size


def pattern_bytes(n: int) -> bytes:
    """All ``n`` pattern bytes at once (for small ``n``)."""
    return _pattern_slice(0, n) if n else b""


@functools.lru_cache(maxsize=64)
def pattern_sha256(n: int) -> str:
    """Hex SHA-256 of the first ``n`` pattern bytes."""
    h = hashlib.sha256()
    for piece in pattern_chunks(n, 1024 * 1024):
        h.update(piece)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# PROXY protocol (v1 and v2) parsing, straight from the HAProxy spec.

PP2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


class ProxyProtocolError(Exception):
    pass


def _pp1_port(text: str) -> int:
    if not text.isdigit() or (len(text) > 1 and text[0] == "0") or int(text) > 65535:
        raise ProxyProtocolError(f"bad port {text!r}")
    return int(text)


def parse_proxy_v1(line: bytes) -> dict[str, Any]:
    """Parse a complete v1 line including its CRLF."""
    if not line.startswith(b"PROXY ") or not line.endswith(b"\r\n") or len(line) > 107:
        raise ProxyProtocolError("malformed v1 header")
    try:
        text = line[:-2].decode("ascii")
    except UnicodeDecodeError as e:
        raise ProxyProtocolError("non-ascii v1 header") from e
    parts = text.split(" ")
    if parts[1] == "UNKNOWN":
        return {
            "version": 1,
            "command": "PROXY",
            "protocol": "UNKNOWN",
            "src": None,
            "src_port": None,
            "dst": None,
            "dst_port": None,
        }
    if len(parts) != 6 or parts[1] not in ("TCP4", "TCP6"):
        raise ProxyProtocolError(f"malformed v1 header {text!r}")
    want = ipaddress.IPv4Address if parts[1] == "TCP4" else ipaddress.IPv6Address
    try:
        src, dst = want(parts[2]), want(parts[3])
    except ValueError as e:
        raise ProxyProtocolError(f"bad address in {text!r}") from e
    return {
        "version": 1,
        "command": "PROXY",
        "protocol": parts[1],
        "src": str(src),
        "src_port": _pp1_port(parts[4]),
        "dst": str(dst),
        "dst_port": _pp1_port(parts[5]),
    }


def parse_proxy_v2(header: bytes) -> dict[str, Any]:
    """Parse a complete v2 header (16 fixed bytes plus the announced length)."""
    if len(header) < 16 or header[:12] != PP2_SIGNATURE:
        raise ProxyProtocolError("bad v2 signature")
    ver_cmd, fam = header[12], header[13]
    length = int.from_bytes(header[14:16], "big")
    if len(header) != 16 + length:
        raise ProxyProtocolError("v2 length mismatch")
    if ver_cmd >> 4 != 2:
        raise ProxyProtocolError(f"bad v2 version {ver_cmd >> 4}")
    cmd = ver_cmd & 0x0F
    if cmd not in (0, 1):
        raise ProxyProtocolError(f"bad v2 command {cmd}")
    family, transport = fam >> 4, fam & 0x0F
    if family > 3 or transport > 2:
        raise ProxyProtocolError(f"bad v2 family byte {fam:#x}")
    body = header[16:]
    out: dict[str, Any] = {
        "version": 2,
        "command": "PROXY" if cmd else "LOCAL",
        "src": None,
        "src_port": None,
        "dst": None,
        "dst_port": None,
    }
    addr_len = {0: 0, 1: 12, 2: 36, 3: 216}[family]
    if len(body) < addr_len:
        raise ProxyProtocolError("v2 address block too short")
    out["protocol"] = {0: "UNSPEC", 1: "TCP4", 2: "TCP6", 3: "UNIX"}[family]
    if transport == 2:
        out["protocol"] = out["protocol"].replace("TCP", "UDP")
    if cmd == 1 and family in (1, 2):
        n = 4 if family == 1 else 16
        out["src"] = str(ipaddress.ip_address(body[0:n]))
        out["dst"] = str(ipaddress.ip_address(body[n : 2 * n]))
        out["src_port"] = int.from_bytes(body[2 * n : 2 * n + 2], "big")
        out["dst_port"] = int.from_bytes(body[2 * n + 2 : 2 * n + 4], "big")
    tlvs: list[list[Any]] = []
    rest = body[addr_len:]
    while rest:
        if len(rest) < 3:
            raise ProxyProtocolError("truncated v2 TLV")
        tlen = int.from_bytes(rest[1:3], "big")
        if len(rest) < 3 + tlen:
            raise ProxyProtocolError("truncated v2 TLV value")
        tlvs.append([rest[0], rest[3 : 3 + tlen].hex()])
        rest = rest[3 + tlen :]
    out["tlvs"] = tlvs
    return out


async def _recv_exact(loop: asyncio.AbstractEventLoop, sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        data = await loop.sock_recv(sock, n - len(buf))
        if not data:
            raise ProxyProtocolError("connection closed inside PROXY header")
        buf += data
    return buf


async def read_proxy_header(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> dict[str, Any]:
    """Read exactly one PROXY header from a raw socket (never a byte more)."""
    start = await _recv_exact(loop, sock, 5)
    if start == b"PROXY":
        line = start
        while not line.endswith(b"\r\n"):
            if len(line) >= 107:
                raise ProxyProtocolError("v1 header too long")
            line += await _recv_exact(loop, sock, 1)
        return parse_proxy_v1(line)
    if start == PP2_SIGNATURE[:5]:
        head = start + await _recv_exact(loop, sock, 11)
        if head[:12] != PP2_SIGNATURE:
            raise ProxyProtocolError("bad v2 signature")
        length = int.from_bytes(head[14:16], "big")
        return parse_proxy_v2(head + await _recv_exact(loop, sock, length))
    raise ProxyProtocolError(f"no PROXY header (got {start!r})")


# ---------------------------------------------------------------------------------------------
# HTTP/1.1

MAX_HEADERS = 200
MAX_ECHO = 64 * 1024 * 1024
WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_TOKEN = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


class BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class ClientGone(Exception):
    pass


@dataclass
class Request:
    method: str
    target: str
    version: str
    headers: list[tuple[str, str]]
    path: str = ""
    trailers: list[tuple[str, str]] = field(default_factory=list)

    def values(self, name: str) -> list[str]:
        name = name.lower()
        return [v for k, v in self.headers if k.lower() == name]

    def tokens(self, name: str) -> list[str]:
        return [t.strip().lower() for v in self.values(name) for t in v.split(",") if t.strip()]


@dataclass
class ConnInfo:
    client: str
    port: int
    family: str
    local: str
    local_port: int
    conn: int
    tls: bool = False
    sni: str | None = None
    proxy_protocol: dict[str, Any] | None = None


def _unmap(addr: str) -> tuple[str, str]:
    ip = ipaddress.ip_address(addr.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped), "ipv4"
    return str(ip), "ipv4" if ip.version == 4 else "ipv6"


async def _readline(reader: asyncio.StreamReader) -> bytes:
    """One line including its LF; b"" on a clean EOF; ClientGone on EOF inside a line."""
    try:
        return await reader.readuntil(b"\n")
    except asyncio.IncompleteReadError as e:
        if e.partial:
            raise ClientGone("EOF inside a line") from e
        return b""
    except asyncio.LimitOverrunError as e:
        raise BadRequest(431, "line too long") from e


def _parse_header_line(line: bytes) -> tuple[str, str]:
    text = line.rstrip(b"\r\n").decode("latin-1")
    if text[:1] in (" ", "\t"):
        raise BadRequest(400, "obsolete line folding")
    name, sep, value = text.partition(":")
    if not sep or not name or any(c not in _TOKEN for c in name):
        raise BadRequest(400, f"bad header line {text!r}")
    return name, value.strip(" \t")


async def read_request_head(reader: asyncio.StreamReader) -> Request | None:
    line = await _readline(reader)
    for _ in range(8):  # RFC 9112 2.2: ignore empty lines before the request line
        if line not in (b"\r\n", b"\n"):
            break
        line = await _readline(reader)
    if not line:
        return None
    parts = line.rstrip(b"\r\n").decode("latin-1").split(" ")
    if len(parts) != 3 or not parts[0] or not parts[1]:
        raise BadRequest(400, f"bad request line {line!r}")
    method, target, version = parts
    if any(c not in _TOKEN for c in method):
        raise BadRequest(400, "bad method")
    if version not in ("HTTP/1.1", "HTTP/1.0"):
        raise BadRequest(505 if version.startswith("HTTP/") else 400, f"bad version {version!r}")
    headers: list[tuple[str, str]] = []
    while True:
        hline = await _readline(reader)
        if not hline:
            raise ClientGone("EOF inside the request head")
        if hline in (b"\r\n", b"\n"):
            break
        headers.append(_parse_header_line(hline))
        if len(headers) > MAX_HEADERS:
            raise BadRequest(431, "too many headers")
    req = Request(method, target, version, headers)
    if target.startswith(("http://", "https://")):
        req.path = urlsplit(target).path or "/"
    elif target.startswith("/"):
        req.path = target.split("?", 1)[0]
    elif target == "*" and method == "OPTIONS":
        req.path = "*"
    else:
        raise BadRequest(400, f"bad request target {target!r}")
    return req


class Body:
    """The request body as an async iterator of pieces; records length, hash and trailers."""

    def __init__(self, reader: asyncio.StreamReader, req: Request) -> None:
        self.reader = reader
        self.req = req
        self.length = 0
        self.hash = hashlib.sha256()
        self.done = False
        te = req.tokens("transfer-encoding")
        cls = req.values("content-length")
        self.chunked = False
        self.remaining = 0
        if te:
            if cls:
                raise BadRequest(400, "both Transfer-Encoding and Content-Length")
            if te != ["chunked"]:
                raise BadRequest(501 if te[-1] == "chunked" else 400, f"transfer-coding {te}")
            self.chunked = True
        elif cls:
            values = {v.strip() for c in cls for v in c.split(",")}
            if len(values) != 1 or not next(iter(values)).isdigit():
                raise BadRequest(400, f"bad Content-Length {cls}")
            self.remaining = int(values.pop())
        self.present = self.chunked or self.remaining > 0
        if not self.present:
            self.done = True

    async def _read(self, n: int) -> bytes:
        data = await self.reader.read(n)
        if not data:
            raise ClientGone("EOF inside the request body")
        return data

    async def __aiter__(self) -> AsyncIterator[bytes]:
        if self.done:
            return
        if not self.chunked:
            while self.remaining:
                data = await self._read(min(self.remaining, PIECE))
                self.remaining -= len(data)
                yield self._count(data)
        else:
            while True:
                line = await _readline(self.reader)
                if not line:
                    raise ClientGone("EOF before a chunk size")
                size_text = line.rstrip(b"\r\n").split(b";", 1)[0].strip(b" \t")
                if not size_text or any(c not in b"0123456789abcdefABCDEF" for c in size_text):
                    raise BadRequest(400, f"bad chunk size line {line!r}")
                size = int(size_text, 16)
                if size == 0:
                    break
                while size:
                    data = await self._read(min(size, PIECE))
                    size -= len(data)
                    yield self._count(data)
                if await _readline(self.reader) not in (b"\r\n", b"\n"):
                    raise BadRequest(400, "chunk data not followed by CRLF")
            while True:
                tline = await _readline(self.reader)
                if not tline:
                    raise ClientGone("EOF inside the trailers")
                if tline in (b"\r\n", b"\n"):
                    break
                self.req.trailers.append(_parse_header_line(tline))
        self.done = True

    def _count(self, data: bytes) -> bytes:
        self.length += len(data)
        self.hash.update(data)
        return data


class Origin:
    def __init__(
        self,
        name: str,
        log_path: str | None,
        ssl_ctx: ssl.SSLContext | None,
        proxy_protocol: bool,
    ) -> None:
        self.name = name
        self.log_fd = (
            os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644) if log_path else None
        )
        self.ssl_ctx = ssl_ctx
        self.proxy_protocol = proxy_protocol
        self.conn_count = 0
        self.tasks: set[asyncio.Task[None]] = set()
        self.listeners: list[socket.socket] = []

    # -- plumbing ------------------------------------------------------------------------------

    def event(self, **fields: Any) -> None:
        sys.stderr.write(json.dumps({"time": time.time(), **fields}) + "\n")
        sys.stderr.flush()

    def log(self, record: dict[str, Any]) -> None:
        if self.log_fd is not None:
            os.write(self.log_fd, (json.dumps(record) + "\n").encode())

    async def accept_loop(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(sock)
            except OSError as e:
                self.event(event="accept_error", error=str(e))
                await asyncio.sleep(0.05)
                continue
            task = asyncio.create_task(self.handle_conn(conn))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def handle_conn(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        conn.setblocking(False)
        if conn.family in (socket.AF_INET, socket.AF_INET6):
            # A head and body written separately must not wait out a delayed ACK.
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.conn_count += 1
        try:
            peer = conn.getpeername()
            local = conn.getsockname()
        except OSError:
            conn.close()
            return
        client, family = _unmap(peer[0])
        info = ConnInfo(client, peer[1], family, _unmap(local[0])[0], local[1], self.conn_count)
        if self.proxy_protocol:
            try:
                info.proxy_protocol = await asyncio.wait_for(read_proxy_header(loop, conn), 10)
            except (ProxyProtocolError, TimeoutError, OSError) as e:
                self.event(event="proxy_protocol_error", client=client, port=peer[1], error=str(e))
                conn.close()
                return
        reader = asyncio.StreamReader(limit=PIECE)
        protocol = asyncio.StreamReaderProtocol(reader)
        try:
            transport, _ = await loop.connect_accepted_socket(
                lambda: protocol,
                conn,
                ssl=self.ssl_ctx,
                ssl_handshake_timeout=10 if self.ssl_ctx else None,
            )
        except (OSError, ssl.SSLError, TimeoutError) as e:
            self.event(event="tls_error", client=client, port=peer[1], error=repr(e))
            conn.close()
            return
        writer = asyncio.StreamWriter(transport, protocol, reader, loop)
        if self.ssl_ctx is not None:
            info.tls = True
            sslobj = transport.get_extra_info("ssl_object")
            info.sni = getattr(sslobj, "_kt_sni", None)
        try:
            seq = 0
            while True:
                seq += 1
                try:
                    req = await read_request_head(reader)
                except BadRequest as e:
                    self.event(event="bad_request", client=client, error=str(e))
                    await self.simple(writer, e.status, str(e).encode() + b"\n", close=True)
                    break
                if req is None:
                    break
                if not await self.handle_request(reader, writer, info, req, seq):
                    break
        except (ClientGone, ConnectionError, asyncio.IncompleteReadError) as e:
            self.event(event="client_gone", client=client, port=peer[1], error=str(e))
        except BadRequest as e:
            self.event(event="bad_request", client=client, error=str(e))
            with contextlib.suppress(Exception):
                await self.simple(writer, e.status, str(e).encode() + b"\n", close=True)
        except (ssl.SSLError, OSError) as e:
            self.event(event="connection_error", client=client, port=peer[1], error=repr(e))
        except Exception as e:  # a bug in this server: say so loudly, keep serving others
            self.event(event="internal_error", client=client, error=repr(e))
            traceback.print_exc()
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    # -- responses -----------------------------------------------------------------------------

    def head(
        self, status: int, headers: list[tuple[str, str]] | None = None, close: bool = False
    ) -> bytes:
        try:
            reason = HTTPStatus(status).phrase
        except ValueError:
            reason = "Unknown"
        lines = [f"HTTP/1.1 {status} {reason}"]
        lines += [
            "Server: kushi-test-origin",
            f"X-Origin-Name: {self.name}",
            f"Date: {formatdate(usegmt=True)}",
        ]
        lines += [f"{k}: {v}" for k, v in headers or []]
        if close:
            lines.append("Connection: close")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    async def simple(
        self,
        writer: asyncio.StreamWriter,
        status: int,
        body: bytes,
        *,
        close: bool = False,
        head_only: bool = False,
        ctype: str = "text/plain",
        extra: list[tuple[str, str]] | None = None,
    ) -> None:
        headers = list(extra or [])
        if status not in (204, 304) and not 100 <= status < 200:
            headers += [("Content-Type", ctype), ("Content-Length", str(len(body)))]
        else:
            body = b""
        writer.write(self.head(status, headers, close))
        if not head_only and body:
            writer.write(body)
        await writer.drain()

    # -- requests ------------------------------------------------------------------------------

    async def handle_request(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        info: ConnInfo,
        req: Request,
        seq: int,
    ) -> bool:
        """Answer one request; True when the connection may carry another one."""
        ctokens = req.tokens("connection")
        keep = "close" not in ctokens if req.version == "HTTP/1.1" else "keep-alive" in ctokens
        path, method = req.path, req.method
        is_head = method == "HEAD"
        record: dict[str, Any] = {
            "client": info.client,
            "port": info.port,
            "family": info.family,
            "local": info.local,
            "local_port": info.local_port,
            "method": method,
            "target": req.target,
            "version": req.version,
            "headers": [list(h) for h in req.headers],
            "body_len": 0,
            "body_sha256": hashlib.sha256().hexdigest(),
            "trailers": [],
            "proxy_protocol": info.proxy_protocol,
            "tls": info.tls,
            "sni": info.sni,
            "conn": info.conn,
            "seq": seq,
            "time": time.time(),
            "error": None,
        }
        try:
            if req.version == "HTTP/1.1" and len(req.values("host")) != 1:
                raise BadRequest(400, "an HTTP/1.1 request needs exactly one Host header")
            body = Body(reader, req)
        except BadRequest as e:  # logged too, so tests can see what reached the origin
            record["error"] = str(e)
            self.log(record)
            raise

        expect = [v.strip().lower() for v in req.values("expect")]
        if expect and body.present and req.version == "HTTP/1.1":
            if expect != ["100-continue"]:
                self.log(record)
                await self.simple(writer, 417, b"expectation failed\n", close=True)
                return False
            code = _int_suffix(path, "/status/")
            if code is not None and code >= 400:
                self.log(record)
                await self.simple(writer, code, b"rejected before the body\n", close=True)
                return False
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            await writer.drain()

        echo = bytearray() if path == "/echo" else None
        try:
            async for piece in body:
                if echo is not None:
                    if len(echo) + len(piece) > MAX_ECHO:
                        echo = None
                        path = "/too-large"
                    else:
                        echo += piece
        except (ClientGone, BadRequest, ConnectionError) as e:
            record.update(body_len=body.length, body_sha256=body.hash.hexdigest(), error=str(e))
            record["trailers"] = [list(t) for t in req.trailers]
            self.log(record)
            raise
        record.update(body_len=body.length, body_sha256=body.hash.hexdigest())
        record["trailers"] = [list(t) for t in req.trailers]
        self.log(record)

        get_like = method in ("GET", "HEAD")
        close = not keep
        ka = [("Connection", "keep-alive")] if keep and req.version == "HTTP/1.0" else []

        async def not_allowed(allow: str) -> bool:
            await self.simple(
                writer,
                405,
                b"method not allowed\n",
                close=close,
                head_only=is_head,
                extra=[("Allow", allow)] + ka,
            )
            return keep

        if path == "/too-large":
            await self.simple(writer, 413, b"echo body too large\n", close=True)
            return False
        if path == "/1k":
            if not get_like:
                return await not_allowed("GET, HEAD")
            await self.simple(writer, 200, ONE_K, close=close, head_only=is_head, extra=ka)
            return keep
        if (n := _int_suffix(path, "/bytes/")) is not None:
            if not get_like:
                return await not_allowed("GET, HEAD")
            headers = [("Content-Type", "application/octet-stream"), ("Content-Length", str(n))]
            writer.write(self.head(200, headers + ka, close))
            if not is_head:
                for piece in pattern_chunks(n):
                    writer.write(piece)
                    await writer.drain()
            await writer.drain()
            return keep
        if (n := _int_suffix(path, "/chunked/")) is not None:
            if not get_like:
                return await not_allowed("GET, HEAD")
            if req.version == "HTTP/1.0":  # no chunking for 1.0 clients: delimit by close
                writer.write(self.head(200, [("Content-Type", "application/octet-stream")], True))
                if not is_head:
                    for piece in pattern_chunks(n, CHUNKED_CHUNK):
                        writer.write(piece)
                        await writer.drain()
                await writer.drain()
                return False
            headers = [
                ("Content-Type", "application/octet-stream"),
                ("Transfer-Encoding", "chunked"),
                ("Trailer", "X-Trailer"),
            ]
            writer.write(self.head(200, headers, close))
            if not is_head:
                for piece in pattern_chunks(n, CHUNKED_CHUNK):
                    writer.write(b"%x\r\n" % len(piece) + piece + b"\r\n")
                    await writer.drain()
                writer.write(b"0\r\nX-Trailer: done\r\n\r\n")
            await writer.drain()
            return keep
        if (n := _int_suffix(path, "/close/")) is not None:
            if not get_like:
                return await not_allowed("GET, HEAD")
            writer.write(self.head(200, [("Content-Type", "application/octet-stream")], True))
            if not is_head:
                for piece in pattern_chunks(n):
                    writer.write(piece)
                    await writer.drain()
            await writer.drain()
            return False
        if path == "/echo":
            assert echo is not None
            ctype = req.values("content-type")
            extra = [
                ("X-Request-SHA256", body.hash.hexdigest()),
                ("X-Request-Length", str(body.length)),
            ]
            await self.simple(
                writer,
                200,
                bytes(echo),
                close=close,
                head_only=is_head,
                ctype=ctype[0] if ctype else "application/octet-stream",
                extra=extra + ka,
            )
            return keep
        if path == "/sha256":
            if method not in ("POST", "PUT"):
                return await not_allowed("POST, PUT")
            payload = json.dumps({"length": body.length, "sha256": body.hash.hexdigest()})
            await self.simple(
                writer, 200, payload.encode(), close=close, ctype="application/json", extra=ka
            )
            return keep
        if (code := _int_suffix(path, "/status/")) is not None:
            if not 200 <= code <= 599:
                await self.simple(
                    writer,
                    400,
                    b"status must be 200..599\n",
                    close=close,
                    head_only=is_head,
                    extra=ka,
                )
                return keep
            await self.simple(
                writer, code, f"status {code}\n".encode(), close=close, head_only=is_head, extra=ka
            )
            return keep
        if path == "/headers":
            payload = json.dumps(
                {
                    "method": method,
                    "target": req.target,
                    "version": req.version,
                    "headers": [list(h) for h in req.headers],
                    "client": info.client,
                    "port": info.port,
                    "family": info.family,
                    "proxy_protocol": info.proxy_protocol,
                    "tls": info.tls,
                    "sni": info.sni,
                }
            )
            await self.simple(
                writer,
                200,
                payload.encode(),
                close=close,
                head_only=is_head,
                ctype="application/json",
                extra=ka,
            )
            return keep
        if path == "/ws":
            if method != "GET":
                return await not_allowed("GET")
            return await self.websocket(reader, writer, req, close)
        if (ms := _int_suffix(path, "/slow-headers/")) is not None:
            if not get_like:
                return await not_allowed("GET, HEAD")
            await asyncio.sleep(ms / 1000)
            await self.simple(writer, 200, b"slow\n", close=close, head_only=is_head, extra=ka)
            return keep
        await self.simple(writer, 404, b"not found\n", close=close, head_only=is_head, extra=ka)
        return keep

    # -- WebSocket -----------------------------------------------------------------------------

    async def websocket(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        req: Request,
        close: bool,
    ) -> bool:
        key = req.values("sec-websocket-key")
        if (
            "websocket" not in req.tokens("upgrade")
            or "upgrade" not in req.tokens("connection")
            or len(key) != 1
            or req.values("sec-websocket-version") != ["13"]
        ):
            await self.simple(
                writer,
                400,
                b"not a websocket handshake\n",
                close=close,
                extra=[("Sec-WebSocket-Version", "13")],
            )
            return not close
        accept = base64.b64encode(hashlib.sha1((key[0].strip() + WS_GUID).encode()).digest())
        writer.write(
            self.head(
                101,
                [
                    ("Upgrade", "websocket"),
                    ("Connection", "Upgrade"),
                    ("Sec-WebSocket-Accept", accept.decode()),
                ],
            )
        )
        await writer.drain()
        while True:
            try:
                b0, b1 = await reader.readexactly(2)
            except asyncio.IncompleteReadError:
                return False
            fin_op, opcode = b0 & 0x80, b0 & 0x0F
            masked, length = b1 & 0x80, b1 & 0x7F
            if length == 126:
                length = int.from_bytes(await reader.readexactly(2), "big")
            elif length == 127:
                length = int.from_bytes(await reader.readexactly(8), "big")
            if not masked or b0 & 0x70 or length > 64 * 1024 * 1024:
                writer.write(_ws_frame(0x88, (1002).to_bytes(2, "big")))
                await writer.drain()
                return False
            mask = await reader.readexactly(4)
            data = await reader.readexactly(length)
            payload = _unmask(data, mask)
            if opcode == 0x8:
                writer.write(_ws_frame(0x88, payload[:2]))
                await writer.drain()
                return False
            if opcode == 0x9:
                writer.write(_ws_frame(0x8A, payload))
            elif opcode in (0x0, 0x1, 0x2):
                writer.write(_ws_frame(fin_op | opcode, payload))
            elif opcode != 0xA:
                writer.write(_ws_frame(0x88, (1002).to_bytes(2, "big")))
                await writer.drain()
                return False
            await writer.drain()


def _unmask(data: bytes, mask: bytes) -> bytes:
    n = len(data)
    key = int.from_bytes((mask * (n // 4 + 1))[:n], "big")
    return (int.from_bytes(data, "big") ^ key).to_bytes(n, "big")


def _ws_frame(b0: int, payload: bytes) -> bytes:
    n = len(payload)
    if n < 126:
        head = bytes([b0, n])
    elif n < 65536:
        head = bytes([b0, 126]) + n.to_bytes(2, "big")
    else:
        head = bytes([b0, 127]) + n.to_bytes(8, "big")
    return head + payload


def _int_suffix(path: str, prefix: str) -> int | None:
    if path.startswith(prefix):
        rest = path[len(prefix) :]
        if rest.isdigit() and len(rest) < 16:
            return int(rest)
    return None


# ---------------------------------------------------------------------------------------------
# Running the origin as a subprocess (for the test process; the server side never uses this)

SCRIPT = Path(__file__).resolve()


def _json_lines(path: Path) -> list[dict[str, Any]]:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    out = []
    for line in data.split(b"\n")[:-1]:  # a last line without newline is still being written
        if line.strip():
            try:
                out.append(json.loads(line))
            except ValueError:
                out.append({"raw": line.decode("utf-8", "replace")})
    return out


class OriginProcess:
    """A running origin subprocess (see :func:`spawn_origin`)."""

    def __init__(
        self,
        proc: subprocess.Popen[bytes],
        addresses: list[str],
        log_path: Path,
        stderr_path: Path,
        ns: str | None,
        tls: bool,
        name: str,
    ) -> None:
        self.proc = proc
        self.addresses = addresses  # as printed by READY, e.g. ["[::1]:41234", "127.0.0.1:41234"]
        self.log_path = log_path
        self.stderr_path = stderr_path
        self.ns = ns
        self.tls = tls
        self.name = name

    def __repr__(self) -> str:
        return f"OriginProcess({self.name!r}, ns={self.ns!r}, addresses={self.addresses!r})"

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def endpoints(self) -> list[tuple[str, int]]:
        """``[(host, port), ...]`` without brackets."""
        return [parse_listen(a) for a in self.addresses]

    @property
    def port(self) -> int:
        """The port of the first listener."""
        return self.endpoints[0][1]

    def url(self, path: str = "/", index: int = 0, host: str | None = None) -> str:
        """``http(s)://host:port/path`` for listener ``index``; a wildcard bind address is
        replaced by the loopback address of its family; ``host`` overrides the host part."""
        bound, port = self.endpoints[index]
        if host is None:
            host = {"::": "::1", "0.0.0.0": "127.0.0.1"}.get(bound, bound)
        scheme = "https" if self.tls else "http"
        return f"{scheme}://{format_hostport(host, port)}{path}"

    def requests(self) -> list[dict[str, Any]]:
        """The request log so far, one dict per request."""
        return _json_lines(self.log_path)

    def wait_requests(self, n: int, timeout: float = 5.0) -> list[dict[str, Any]]:
        """Wait until at least ``n`` requests are logged; returns them all."""
        deadline = time.monotonic() + timeout
        while True:
            reqs = self.requests()
            if len(reqs) >= n or time.monotonic() > deadline:
                if len(reqs) < n:
                    raise TimeoutError(f"{self.name}: {len(reqs)} requests logged, wanted {n}")
                return reqs
            time.sleep(0.02)

    def events(self) -> list[dict[str, Any]]:
        """Connection-level events the origin wrote to stderr (bad PROXY header, TLS error,
        bad request, client gone), one dict each."""
        return _json_lines(self.stderr_path)

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM, SIGKILL after ``timeout``; reaps the process and closes its pipe."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def spawn_origin(
    listen: Sequence[str],
    log_path: str | os.PathLike[str],
    *,
    ns: object | None = None,
    name: str = "origin",
    tls_cert: str | os.PathLike[str] | None = None,
    tls_key: str | os.PathLike[str] | None = None,
    proxy_protocol: bool = False,
    extra_args: Sequence[str] = (),
    stderr_path: str | os.PathLike[str] | None = None,
    python: str = sys.executable,
    ready_timeout: float = 10.0,
) -> OriginProcess:
    """Start this script (inside namespace ``str(ns)`` via ``ip netns exec`` when given) and
    wait for its READY line.  The caller must ``stop()`` it.  stderr goes to ``stderr_path``
    (default: the log path with suffix ``.stderr``)."""
    log = Path(log_path)
    err = Path(stderr_path) if stderr_path is not None else log.with_suffix(".stderr")
    argv = [python, str(SCRIPT), "--log", str(log), "--name", name]
    for spec in listen:
        argv += ["--listen", spec]
    if tls_cert is not None or tls_key is not None:
        argv += ["--tls-cert", str(tls_cert), "--tls-key", str(tls_key)]
    if proxy_protocol:
        argv.append("--proxy-protocol")
    argv += list(extra_args)
    if ns is not None:
        argv = ["ip", "netns", "exec", str(ns), *argv]
    with open(err, "ab") as errf:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=errf)
    assert proc.stdout is not None
    origin = OriginProcess(
        proc, [], log, err, None if ns is None else str(ns), tls_cert is not None, name
    )
    fd = proc.stdout.fileno()
    buf = b""
    deadline = time.monotonic() + ready_timeout
    try:
        while b"\n" not in buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                raise TimeoutError(f"origin {name} not READY after {ready_timeout}s")
            chunk = os.read(fd, 4096)
            if not chunk:
                raise RuntimeError(f"origin {name} exited early: {err.read_text()[-2000:]}")
            buf += chunk
        line = buf.split(b"\n", 1)[0].decode()
        if not line.startswith("READY "):
            raise RuntimeError(f"origin {name}: unexpected first line {line!r}")
        origin.addresses = json.loads(line[6:])
    except BaseException:
        origin.stop()
        raise
    return origin


# ---------------------------------------------------------------------------------------------
# Main


def parse_listen(spec: str) -> tuple[str, int]:
    """``[::]:8080`` / ``0.0.0.0:0`` / ``localhost:80`` -> (host, port)."""
    if spec.startswith("["):
        host, sep, rest = spec[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ValueError(f"bad listen address {spec!r}")
        port = rest[1:]
    else:
        host, sep, port = spec.rpartition(":")
        if not sep:
            raise ValueError(f"bad listen address {spec!r}")
    return host, int(port)


def format_hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def bind_all(specs: list[str]) -> list[socket.socket]:
    resolved: list[tuple[int, str, int]] = []
    for spec in specs:
        host, port = parse_listen(spec)
        family: int
        try:
            ip = ipaddress.ip_address(host)
            family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
        except ValueError:
            info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
            family, host = info[0], str(info[4][0])
        resolved.append((family, host, port))
    any_v4 = any(f == socket.AF_INET for f, _, _ in resolved)
    socks: list[socket.socket] = []
    shared_port: int | None = None
    for family, host, port in resolved:
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1 if any_v4 else 0)
        bound = False
        if port == 0 and shared_port is not None:
            with contextlib.suppress(OSError):
                sock.bind((host, shared_port))
                bound = True
        if not bound:
            sock.bind((host, port))
        if port == 0 and shared_port is None:
            shared_port = sock.getsockname()[1]
        sock.listen(512)
        sock.setblocking(False)
        socks.append(sock)
    return socks


async def amain(args: argparse.Namespace) -> None:
    ctx: ssl.SSLContext | None = None
    if args.tls_cert:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(args.tls_cert, args.tls_key)
        ctx.set_alpn_protocols(["http/1.1"])

        def on_sni(obj: Any, name: str | None, _ctx: ssl.SSLContext) -> None:
            with contextlib.suppress(AttributeError):
                obj._kt_sni = name

        ctx.sni_callback = on_sni
    origin = Origin(args.name, args.log, ctx, args.proxy_protocol)
    socks = bind_all(args.listen)
    bound = [format_hostport(*s.getsockname()[:2]) for s in socks]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    accepts = [asyncio.create_task(origin.accept_loop(s)) for s in socks]
    sys.stdout.write("READY " + json.dumps(bound) + "\n")
    sys.stdout.flush()
    await stop.wait()
    for task in accepts + list(origin.tasks):
        task.cancel()
    await asyncio.gather(*accepts, *origin.tasks, return_exceptions=True)
    for s in socks:
        s.close()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="kushi test origin server")
    p.add_argument("--listen", action="append", required=True, help="HOST:PORT, [V6]:PORT")
    p.add_argument("--log", help="JSON-lines request log")
    p.add_argument("--tls-cert", help="certificate chain (PEM)")
    p.add_argument("--tls-key", help="private key (PEM)")
    p.add_argument("--proxy-protocol", action="store_true", help="require a PROXY header")
    p.add_argument("--name", default="origin", help="value of X-Origin-Name")
    args = p.parse_args(argv)
    if bool(args.tls_cert) != bool(args.tls_key):
        p.error("--tls-cert and --tls-key go together")
    asyncio.run(amain(args))


if __name__ == "__main__":
    main()
