"""``kushi whoami``: a test server that tells each client how it arrived.

Point a client at it over IPv6 and over IPv4 and it answers with the client's address, the
address family the connection really used (an IPv4-mapped IPv6 peer is shown as the IPv4
client it is) and the request's headers as received. That answers "did this go over
IPv6?" and "what did the proxy in between add?" without guessing.

The answer's format follows ``Accept`` (RFC 9110 section 12.5.1): ``application/json`` gets
JSON, ``text/html`` (a browser) gets a small page, anything else (curl) gets plain text.
``?format=json|html|text`` overrides it. The JSON answer is::

    {"client": "2001:db8::1", "port": 41234, "family": "ipv6", "local": "[::1]:8080",
     "method": "GET", "target": "/", "version": "HTTP/1.1",
     "headers": [["Host", "[::1]:8080"], ...], "server": "kushi whoami"}

Each request is logged as one line on stdout: time, client, family, method, target, status.

The server uses kushi's own HTTP layer: ``http1`` parses and frames (bad input gets a 400
with ``Proxy-Status`` from ``http1.render_error``), ``server.bind`` opens the sockets
(``[::]`` is IPv6 only, so the default listens on ``[::]:8080`` and ``0.0.0.0:8080``), and
``netio.Conn`` carries the bytes. Connections are kept alive; request bodies are read and
discarded. SIGINT and SIGTERM stop it with exit code 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import json
import signal
import socket
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, TextIO
from urllib.parse import parse_qs, urlsplit

from kushi import http1
from kushi.config import Address, parse_hostport
from kushi.errors import ConfigError, KushiError, RequestError, RequestTimeout
from kushi.netio import Conn, fmt_addr, serve_socket
from kushi.resolver import ip_literal

SERVER_NAME = "kushi whoami"
DEFAULT_LISTEN = ("[::]:8080", "0.0.0.0:8080")
MAX_LINE = 8192
MAX_HEAD = 65536
HEADER_TIMEOUT = 30.0
IDLE_TIMEOUT = 60.0

Format = Literal["text", "html", "json"]


@dataclass(frozen=True, slots=True)
class Whoami:
    """What the server saw of one request: the facts every format is rendered from."""

    client: str
    port: int
    family: Literal["ipv4", "ipv6"]
    local: str
    method: str
    target: str
    version: str
    headers: tuple[tuple[str, str], ...]

    def as_json(self) -> dict[str, object]:
        return {
            "client": self.client,
            "port": self.port,
            "family": self.family,
            "local": self.local,
            "method": self.method,
            "target": self.target,
            "version": self.version,
            "headers": [[k, v] for k, v in self.headers],
            "server": SERVER_NAME,
        }


# --- the sans-IO part: facts in, bytes out ------------------------------------------------


def peer_facts(host: str) -> tuple[str, Literal["ipv4", "ipv6"]]:
    """The client address as shown (IPv4-mapped becomes IPv4, no scope id) and its family."""
    plain = host.split("%")[0]
    addr = ip_literal(plain)
    if addr is None:
        return host, "ipv6" if ":" in host else "ipv4"
    return str(addr), "ipv6" if addr.version == 6 else "ipv4"


def choose_format(accept: bytes | None, target: bytes) -> Format:
    """``?format=`` wins; then the ``Accept`` entry with the highest q that we can serve."""
    query = urlsplit(target.decode("latin-1")).query
    wanted = parse_qs(query).get("format", [""])[-1].lower()
    if wanted in ("text", "html", "json"):
        return wanted  # type: ignore[return-value]
    if not accept:
        return "text"
    best: tuple[float, Format] = (0.0, "text")
    for item in accept.decode("latin-1").split(","):
        media, *params = (p.strip() for p in item.split(";"))
        q = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        media = media.lower()
        kind: Format | None = None
        if media in ("application/json", "application/*+json"):
            kind = "json"
        elif media in ("text/html", "application/xhtml+xml"):
            kind = "html"
        elif media == "text/plain":
            kind = "text"
        if kind is not None and q > best[0]:
            best = (q, kind)
    return best[1]


def render_body(facts: Whoami, fmt: Format) -> tuple[bytes, bytes]:
    """(Content-Type, body) for one format."""
    if fmt == "json":
        return b"application/json", render_json(facts.as_json()).encode()
    family = "IPv6" if facts.family == "ipv6" else "IPv4"
    request_line = f"{facts.method} {facts.target} {facts.version}"
    if fmt == "html":
        rows = "".join(
            f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>\n"
            for k, v in facts.headers
        )
        page = (
            "<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8>\n"
            f"<title>{family}: {html.escape(facts.client)}</title>\n"
            "<style>body{font-family:sans-serif;margin:2em}th{text-align:left;padding-right:1em}"
            "td,code{font-family:monospace}.v6{color:#070}.v4{color:#a50}</style></head>\n"
            f'<body><h1>You came over <span class="{facts.family[2:]}">{family}</span></h1>\n'
            f"<p>from <code>{html.escape(facts.client)}</code> port {facts.port} "
            f"to <code>{html.escape(facts.local)}</code></p>\n"
            f"<p><code>{html.escape(request_line)}</code></p>\n"
            f"<table>\n{rows}</table>\n<p><small>{SERVER_NAME}</small></p></body></html>\n"
        )
        return b"text/html; charset=utf-8", page.encode()
    lines = [
        f"You came over {family}.",
        "",
        f"client:  {facts.client}",
        f"port:    {facts.port}",
        f"family:  {facts.family}",
        f"server:  {facts.local}",
        f"request: {request_line}",
        "",
        *(f"{k}: {v}" for k, v in facts.headers),
        "",
    ]
    return b"text/plain; charset=utf-8", "\n".join(lines).encode()


def render_json(data: dict[str, object]) -> str:
    """Indented JSON with each ``[name, value]`` header pair on one line."""
    lines = []
    for key, value in data.items():
        if isinstance(value, list) and value:
            pairs = ",\n".join(f"    {json.dumps(item)}" for item in value)
            lines.append(f"  {json.dumps(key)}: [\n{pairs}\n  ]")
        else:
            lines.append(f"  {json.dumps(key)}: {json.dumps(value)}")
    return "{\n" + ",\n".join(lines) + "\n}\n"


def respond(facts: Whoami, req: http1.RequestHead) -> tuple[int, bytes]:
    """The status and the whole response (head and body) for one parsed request."""
    fmt = choose_format(req.get(b"accept"), req.target)
    ctype, body = render_body(facts, fmt)
    headers: list[http1.Header] = [
        (b"Content-Type", ctype),
        (b"Content-Length", str(len(body)).encode()),
        (b"Cache-Control", b"no-store"),
        (b"Vary", b"Accept"),
        (b"Server", SERVER_NAME.encode()),
    ]
    if not req.keep_alive:
        headers.append((b"Connection", b"close"))
    elif req.version == (1, 0):
        headers.append((b"Connection", b"keep-alive"))
    head = http1.serialize_response_head(200, b"OK", headers)
    return 200, head if req.method == b"HEAD" else head + body


def log_line(client: str, family: str, method: str, target: str, status: int) -> str:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
    return f"{stamp}Z {client} {family} {method} {target} {status}"


# --- the I/O shell ----------------------------------------------------------------------


class WhoamiServer:
    def __init__(self, out: TextIO = sys.stdout) -> None:
        self.out = out
        self.tasks: set[asyncio.Task[None]] = set()

    def log(self, client: str, family: str, method: str, target: str, status: int) -> None:
        self.out.write(log_line(client, family, method, target, status) + "\n")
        self.out.flush()

    async def handle(self, conn: Conn) -> None:
        try:
            await self.serve(conn)
        except (ConnectionError, OSError):
            conn.abort()
        finally:
            await conn.wait_closed()

    async def serve(self, conn: Conn) -> None:
        client, family = peer_facts(conn.peer[0])
        local = fmt_addr(*conn.local)
        first = True
        while True:
            try:
                head = await self.read_head(conn, IDLE_TIMEOUT if not first else HEADER_TIMEOUT)
                if head is None:
                    return
                first = False
                req = http1.parse_request_head(head)
            except KushiError as exc:
                conn.write(http1.render_error(exc, proxy_name="kushi", close=True))
                await conn.drain()
                self.log(client, family, "-", "-", exc.status)
                return
            facts = Whoami(
                client=client,
                port=conn.peer[1],
                family=family,
                local=local,
                # A target may carry raw non-ASCII bytes (obs-text): shown escaped, as \xNN.
                method=req.method.decode("ascii", "backslashreplace"),
                target=req.target.decode("ascii", "backslashreplace"),
                version=f"HTTP/{req.version[0]}.{req.version[1]}",
                headers=tuple((k.decode("latin-1"), v.decode("latin-1")) for k, v in req.headers),
            )
            if req.expect_continue and req.framing.kind != "none":
                conn.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            try:
                await self.discard_body(conn, req)
            except KushiError as exc:
                conn.write(http1.render_error(exc, proxy_name="kushi", close=True))
                await conn.drain()
                self.log(client, family, facts.method, facts.target, exc.status)
                return
            status, data = respond(facts, req)
            conn.write(data)
            await conn.drain()
            self.log(client, family, facts.method, facts.target, status)
            if not req.keep_alive:
                return

    @staticmethod
    async def read_head(conn: Conn, timeout: float) -> bytes | None:
        """The next request head, or None when the client closed between requests."""
        try:
            async with asyncio.timeout(timeout):
                while True:
                    # RFC 9112 section 2.2: empty lines before a request line are ignored.
                    while conn.buf.startswith(b"\r\n"):
                        del conn.buf[:2]
                    end = http1.find_head_end(conn.buf, MAX_LINE, MAX_HEAD)
                    if end >= 0:
                        head = bytes(conn.buf[:end])
                        del conn.buf[:end]
                        return head
                    if not await conn.fill():
                        if conn.buf:
                            raise RequestError("connection closed inside the request head")
                        return None
        except TimeoutError:
            if conn.buf:
                raise RequestTimeout("request head not complete in time") from None
            return None

    @staticmethod
    async def discard_body(conn: Conn, req: http1.RequestHead) -> None:
        reader = http1.body_reader(req.framing, RequestError)
        async with asyncio.timeout(IDLE_TIMEOUT):
            while True:
                event = reader.read(conn.buf)
                if isinstance(event, http1.EndOfMessage):
                    return
                if event is None and not await conn.fill():
                    raise RequestError("connection closed inside the request body")


def parse_listen(values: Sequence[str] | None) -> list[Address]:
    """``--listen`` values (default: both wildcards); raises ``ConfigError``."""
    return [parse_hostport(v, "listen") for v in (values or DEFAULT_LISTEN)]


async def _serve(sockets: list[socket.socket], out: TextIO) -> int:
    app = WhoamiServer(out)
    servers = [await serve_socket(sock, app.handle, app.tasks) for sock in sockets]
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    for server in servers:
        server.close()
    for task in list(app.tasks):
        task.cancel()
    if app.tasks:
        await asyncio.wait(set(app.tasks), timeout=2)
    for server in servers:
        with contextlib.suppress(Exception):
            await server.wait_closed()
    return 0


def run(listen: Sequence[str] | None, out: TextIO = sys.stdout) -> int:
    """Bind every address, then serve until SIGINT/SIGTERM. Exit codes: 0, 1, 2."""
    from kushi.server import StartupError, bind

    try:
        addrs = parse_listen(listen)
    except ConfigError as exc:
        print(f"kushi whoami: {exc}", file=sys.stderr)
        return 2
    sockets: list[socket.socket] = []
    try:
        for addr in addrs:
            sockets.append(bind(addr))
    except StartupError as exc:
        for sock in sockets:
            sock.close()
        print(f"kushi whoami: {exc}", file=sys.stderr)
        return 1
    names = ", ".join(fmt_addr(*s.getsockname()[:2]) for s in sockets)
    print(f"kushi whoami: listening on {names}", file=sys.stderr, flush=True)
    try:
        return asyncio.run(_serve(sockets, out))
    except KeyboardInterrupt:  # pragma: no cover - a second Ctrl-C during shutdown
        return 0
