"""The admin listener: ``/metrics``, the status page, ``/proxy.pac`` and ``/healthz``.

``admin_listen`` names the addresses (loopback by default); ``admin_allow`` the clients
that may use them (loopback by default; anyone else gets 403). Requests are read with
kushi's own strict HTTP/1.1 parser, and every bad request is answered by
``http1.render_error``, like on the proxy listeners.

=====================  ==============================================================
``/``                  the status page (``static/status.{html,css,js}``): the share of
                       IPv6 and IPv4 egress over time, recent requests, errors by type,
                       uptime and the config in force, refreshed from ``/api/status``
``/api/status``        the JSON the page draws
``/metrics``           Prometheus text format (``kushi.metrics``)
``/proxy.pac``         a proxy auto-config file pointing browsers at kushi
                       (``/wpad.dat`` is the same file, under the WPAD name)
``/healthz``           ``200 ok``; ``503 stopping`` once shutdown has begun
=====================  ==============================================================

Start-up happens in two steps. ``prepare(config)`` runs in the command-line process before
``server.serve``: it binds the admin sockets (so a port in use is a clean start-up error,
exit 1) and, with several workers, points prometheus-client at a fresh multiprocess
directory before any worker imports it. ``AdminPlan.serve_hooks()`` then gives ``serve``
the callables it runs inside the event loop: ``worker_start`` (every worker: count its
requests) and ``extra_start`` (one worker: answer the admin listener).

The admin listener keeps answering while the proxy listeners drain at shutdown (so
``/healthz`` can say 503) and closes when the server cancels its background tasks.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ipaddress
import json
import logging
import os
import re
import shutil
import socket
import sys
import tempfile
import time
import weakref
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field, fields, is_dataclass
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kushi import __version__, http1
from kushi.accesslog import AccessRecord
from kushi.acl import AllowList, client_address, client_key
from kushi.config import DERIVED_KEYS, Address, Config, DestinationRule
from kushi.errors import (
    KushiError,
    RequestDenied,
    RequestError,
    RequestTimeout,
    TooManyConnections,
)
from kushi.http1 import Header, RequestHead
from kushi.netio import Conn, serve_socket
from kushi.proxy import PROXY_NAME, read_head
from kushi.resolver import ip_literal
from kushi.server import Server, StartupError, bind

if TYPE_CHECKING:  # prometheus-client is imported only once the multiprocess mode is set
    from kushi.metrics import Metrics, Timeline

log = logging.getLogger("kushi.admin")

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
RECENT_LIMIT = 100
PAC_TYPE = b"application/x-ns-proxy-autoconfig"
#: The page's own files only: no CDN, no inline script, nothing framed.
CSP = (
    b"default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    b"img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
STATIC = {
    b"/": ("status.html", b"text/html; charset=utf-8"),
    b"/index.html": ("status.html", b"text/html; charset=utf-8"),
    b"/static/status.css": ("status.css", b"text/css; charset=utf-8"),
    b"/static/status.js": ("status.js", b"text/javascript; charset=utf-8"),
}
#: Config keys whose values are never shown (the page and /api/status redact them).
_SECRET_KEY_RE = re.compile(
    r"(^|_)(password|passwd|secret|token|credentials?|key|auth_file|htpasswd|users)($|_)"
)


class NotFound(KushiError):
    status = 404
    error_type = "http_request_error"


class MethodNotAllowed(KushiError):
    status = 405
    error_type = "http_request_error"


# --- pure parts: the PAC file, the config view, record views ----------------------------


def pac_script(proxy: str | None, socks: str | None = None, https: bool = False) -> str:
    """A PAC file sending everything but loopback names and addresses through ``proxy``
    (an HTTP proxy; ``HTTPS host:port`` with ``https``, a TLS forward listener, which
    Chromium and Firefox reach over TLS) and then ``socks`` (a SOCKS5 listener, Chromium
    and Firefox read ``SOCKS5 host:port``), whichever of them kushi has, in that order."""
    entries = [f"{'HTTPS' if https else 'PROXY'} {proxy}"] if proxy else []
    if socks:
        entries.append(f"SOCKS5 {socks}")
    return f"""// kushi proxy auto-config: IPv4-only clients reach IPv6 sites through kushi.
function FindProxyForURL(url, host) {{
  var h = host.toLowerCase();
  if (h.charAt(0) === "[") {{
    h = h.substring(1, h.length - 1);
  }}
  if (h === "localhost" || dnsDomainIs(h, ".localhost") || h === "::1" ||
      h === "0:0:0:0:0:0:0:1" || /^127\\.[0-9]+\\.[0-9]+\\.[0-9]+$/.test(h)) {{
    return "DIRECT";
  }}
  return {json.dumps("; ".join(entries))};
}}
"""


def pac_proxy(server: Server, local: tuple[str, int], mode: str = "forward") -> str | None:
    """``pac_proxy`` if set, else the first forward listener's address as the client sees it
    (with ``mode="socks"``: the first SOCKS listener's; ``pac_proxy`` names HTTP only).

    ``local`` is the admin connection's own address: when the listener is bound to a
    wildcard address, the address the client reached the admin listener on is the one it
    can reach the proxy on too."""
    config = server.config
    if config.pac_proxy and mode == "forward":
        return config.pac_proxy
    forward = [cfg for cfg in config.listeners if cfg.mode == mode]
    if not forward:
        return None
    bound: list[Address] = []
    for sock in server.sockets.get(forward[0].name, []):
        with contextlib.suppress(OSError):
            host, port = sock.getsockname()[:2]
            bound.append(Address(str(host), int(port)))
    bound = bound or list(forward[0].listen)
    local_host = _plain(local[0])
    local_v6 = ":" in local_host
    same = [a for a in bound if (":" in a.host) == local_v6]
    pick = (same or bound)[0]
    host = pick.host
    if host in ("0.0.0.0", "::"):
        host = local_host if same else ("::1" if host == "::" else "127.0.0.1")
    return str(Address(host, pick.port))


def _plain(host: str) -> str:
    addr = client_address(host)
    return str(addr) if addr is not None else host


def _jsonable(value: Any) -> Any:
    if isinstance(value, Address | DestinationRule | ipaddress.IPv4Network | ipaddress.IPv6Network):
        return str(value)
    if is_dataclass(value) and not isinstance(value, type):
        return {
            f.name: _jsonable(getattr(value, f.name))
            for f in fields(value)
            if f.name not in DERIVED_KEYS  # values built from keys shown already
        }
    if isinstance(value, frozenset | set):
        items = [_jsonable(v) for v in value]
        try:
            return sorted(items)
        except TypeError:
            return sorted(items, key=str)
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


def _redact(data: Any) -> Any:
    if isinstance(data, dict):
        out = {}
        for key, value in data.items():
            if _SECRET_KEY_RE.search(key) and value not in (None, "", [], {}):
                out[key] = "(redacted)"
            else:
                out[key] = _redact(value)
        return out
    if isinstance(data, list):
        return [_redact(v) for v in data]
    return data


def config_view(config: Config) -> dict[str, Any]:
    """The config in force as JSON, with every secret-looking key redacted."""
    data = _jsonable(config)
    assert isinstance(data, dict)
    redacted = _redact(data)
    assert isinstance(redacted, dict)
    return redacted


def record_view(record: AccessRecord, worker: int | None = None) -> dict[str, Any]:
    return {
        "time": round(record.time, 3),
        "worker": os.getpid() if worker is None else worker,
        "listener": record.listener,
        "mode": record.mode,
        "client": record.client,
        "method": record.method,
        "target": record.target[:300],
        "status": record.status,
        "upstream": record.upstream,
        "family": record.family,
        "source": record.source,
        "duration_ms": round(record.duration * 1000, 1),
        "bytes_out": record.bytes_out,
        "error": record.error,
        "details": record.details[:300],
        "tls": record.tls,
        "attempts": record.attempts,
    }


# --- per process: metrics hooks -------------------------------------------------------

_attached: weakref.WeakKeyDictionary[Server, Metrics] = weakref.WeakKeyDictionary()


def open_tunnels(server: Server) -> int | None:
    """Tunnels open now, when this build of the server counts them (``Services.open_tunnels``)."""
    value = getattr(server.services, "open_tunnels", None)
    return value if isinstance(value, int) else None


def attach(server: Server, multiprocess_dir: str | None = None) -> Metrics:
    """This process's ``Metrics``, counting every record the server writes (idempotent)."""
    metrics = _attached.get(server)
    if metrics is None:
        from kushi.metrics import Metrics

        metrics = Metrics(multiprocess_dir=multiprocess_dir)
        server.services.hooks.append(metrics.observe)
        server.services.resolver.observer = metrics
        _attached[server] = metrics
        set_listener_info(metrics, server.config)
        server.on_reload.append(lambda config: set_listener_info(metrics, config))
    return metrics


def set_listener_info(metrics: Metrics, config: Config) -> None:
    metrics.set_listeners((c.name, c.mode, c.tls_cert is not None) for c in config.listeners)


def _set_gauges(server: Server, metrics: Metrics) -> None:
    metrics.set_gauges(
        connections=len(server.connections),
        tunnels=open_tunnels(server),
        started=server.services.started,
    )


async def _sample_gauges(server: Server, metrics: Metrics) -> None:
    """In multiprocess mode each worker publishes its own gauges, its gathered counts and
    its recent requests once a second (and at exit); the admin sums and merges them."""
    published: AccessRecord | None = None
    try:
        while True:
            _set_gauges(server, metrics)
            recent = server.services.recent
            if recent and recent[-1] is not published and metrics.multiprocess_dir:
                published = recent[-1]
                publish_recent(metrics.multiprocess_dir, recent)
            await asyncio.sleep(1.0)
    finally:
        metrics.flush()


def publish_recent(directory: str, recent: Iterable[AccessRecord]) -> None:
    """This worker's newest requests, for the admin's status page (replaced atomically)."""
    views = [record_view(r) for r in recent][-RECENT_LIMIT:]
    path = os.path.join(directory, f"recent_{os.getpid()}.json")
    with contextlib.suppress(OSError):
        with open(path + ".tmp", "w", encoding="utf-8") as fh:
            json.dump(views, fh, separators=(",", ":"))
        os.replace(path + ".tmp", path)


def merged_recent(directory: str | None, own: Iterable[AccessRecord]) -> list[dict[str, Any]]:
    """The newest requests of this process (live) and of every other worker (as last
    published), newest first."""
    views = [record_view(r) for r in own]
    if directory:
        me = f"recent_{os.getpid()}.json"
        for path in Path(directory).glob("recent_*.json"):
            if path.name == me:
                continue
            with contextlib.suppress(OSError, ValueError):
                loaded = json.loads(path.read_text(encoding="utf-8"))
                if isinstance(loaded, list):
                    views.extend(v for v in loaded if isinstance(v, dict))
    views.sort(key=lambda v: float(v.get("time", 0.0)), reverse=True)
    return views[:RECENT_LIMIT]


# --- the listener ---------------------------------------------------------------------


def _load_static() -> dict[str, bytes]:
    root = files("kushi").joinpath("static")
    return {name: root.joinpath(name).read_bytes() for name, _ in STATIC.values()}


#: Connections the admin listener serves at once, in all and per client (an IPv6 /64 is
#: one client); more are answered 503 and closed.
ADMIN_MAX_CONNECTIONS = 128
ADMIN_PER_CLIENT = 16


def shutting_down(server: Server) -> bool:
    """True from the moment the proxy listeners stop accepting (SIGTERM/SIGINT)."""
    if server.services.stopping:
        return True
    return bool(server.servers) and not any(s.is_serving() for s in server.servers)


class Admin:
    def __init__(
        self,
        server: Server,
        metrics: Metrics,
        sockets: list[socket.socket],
        *,
        all_workers: bool = True,
    ) -> None:
        from kushi.metrics import Timeline

        self.server = server
        self.metrics = metrics
        self.sockets = sockets
        self.all_workers = all_workers
        self.admin_listen = server.config.admin_listen
        self.allow = AllowList(server.config.admin_allow)
        self.timeline: Timeline = Timeline()
        self.static = _load_static()
        self.own_names = _own_names()
        self.next_refresh = 0.0  # when to re-resolve the host names in admin_allow
        self.listeners: list[asyncio.Server] = []
        self.tasks: set[asyncio.Task[Any]] = set()
        self.per_client: collections.Counter[str] = collections.Counter()
        self.extra_names = frozenset(server.config.admin_names)
        server.on_reload.append(self.reloaded)

    async def start(self) -> None:
        for sock in self.sockets:
            self.listeners.append(await serve_socket(sock, self._handle, self.tasks, backlog=128))
        self.timeline.sample(time.time(), self.metrics.totals().requests)
        if self.allow.names:
            await self.allow.refresh(self.server.services.resolver)
            self.next_refresh = time.time() + 30.0
        self.server.background.append(asyncio.ensure_future(self._run()))
        log.info(
            "admin listener on %s: status page, /metrics, /proxy.pac, /healthz; allow %s",
            ", ".join(_sockname(s) for s in self.sockets),
            ", ".join(map(str, self.server.config.admin_allow)) or "nobody",
        )

    def reloaded(self, config: Config) -> None:
        self.metrics.reloads.inc()
        allow = AllowList(config.admin_allow)
        for name, addrs in self.allow.resolved.items():
            if name in allow.resolved:
                allow.resolved[name] = addrs
        self.allow = allow
        self.extra_names = frozenset(config.admin_names)
        self.next_refresh = 0.0  # resolve new names at the next tick
        if config.admin_listen != self.admin_listen:
            log.warning("reload: admin_listen changed; restart kushi to apply that part")

    async def _run(self) -> None:
        """Sample the chart's counters; re-resolve host names in admin_allow."""
        try:
            while True:
                await asyncio.sleep(self.timeline.step / 2)
                now = time.time()
                self.timeline.sample(now, self.metrics.totals().requests)
                if self.allow.names and now >= self.next_refresh:
                    self.next_refresh = now + 30.0
                    await self.allow.refresh(self.server.services.resolver)
        finally:
            self.close()

    def close(self) -> None:
        for listener in self.listeners:
            listener.close()
        for task in list(self.tasks):
            task.cancel()

    async def _handle(self, conn: Conn) -> None:
        who = client_key(_plain(conn.peer[0] or ""))
        if len(self.tasks) > ADMIN_MAX_CONNECTIONS or self.per_client[who] >= ADMIN_PER_CLIENT:
            # Like the proxy listeners: an admin page must not be a way to hold descriptors.
            exc = TooManyConnections(f"the admin listener is at its connection limit ({who})")
            with contextlib.suppress(ConnectionError, OSError):
                conn.write(http1.render_error(exc, proxy_name=PROXY_NAME, close=True))
                conn.write_eof()
            conn.close()
            await conn.wait_closed()
            return
        self.per_client[who] += 1
        try:
            await self._session(conn)
        except asyncio.CancelledError:
            conn.abort()
            raise
        except Exception:
            log.exception("admin: request from %s failed", conn.peer[0])
            conn.abort()
        finally:
            self.per_client[who] -= 1
            if self.per_client[who] <= 0:
                del self.per_client[who]
            await conn.wait_closed()

    async def _session(self, conn: Conn) -> None:
        peer = _plain(conn.peer[0])
        timeouts = self.server.config.timeouts
        limits = self.server.config.limits
        first = True
        while True:
            try:
                async with asyncio.timeout(
                    timeouts.header_read if first or conn.buf else timeouts.idle
                ):
                    head = await read_head(conn, limits.max_request_line, limits.max_header_bytes)
            except TimeoutError:
                if conn.buf:
                    await self._send(conn, self._error(RequestTimeout("no request head"), None))
                return
            except KushiError as exc:
                await self._send(conn, self._error(exc, None))
                return
            if head is None:
                return
            first = False
            req: RequestHead | None = None
            try:
                req = http1.parse_request_head(head)
                if not self.allow.allows(client_address(peer)):
                    raise RequestDenied(f"client {peer} is not in admin_allow")
                data, close = self.respond(req, conn), not req.keep_alive
            except KushiError as exc:
                data, close = self._error(exc, req)
            if not await self._send(conn, (data, close)) or close:
                return

    async def _send(self, conn: Conn, response: tuple[bytes, bool]) -> bool:
        data, close = response
        try:
            conn.write(data)
            await conn.drain()
        except (ConnectionError, OSError):
            return False
        if close:
            conn.write_eof()
        return True

    def _error(self, exc: KushiError, req: RequestHead | None) -> tuple[bytes, bool]:
        # An unread request body leaves the connection unusable: close it.
        close = (
            exc.close
            or req is None
            or not req.keep_alive
            or req.framing.kind != "none"
            or isinstance(exc, RequestDenied)
        )
        extra: list[Header] = []
        if isinstance(exc, MethodNotAllowed):
            extra.append((b"Allow", b"GET, HEAD"))
        data = http1.render_error(
            exc,
            proxy_name=PROXY_NAME,
            close=close,
            head_only=req is not None and req.method == b"HEAD",
            extra_headers=extra,
        )
        return data, close

    # --- endpoints ---------------------------------------------------------------------

    def respond(self, req: RequestHead, conn: Conn) -> bytes:
        if not req.target.startswith(b"/"):
            raise RequestError(
                "this is kushi's admin listener (/metrics, /proxy.pac, the status page); "
                "it does not proxy requests"
            )
        path = req.target.split(b"?", 1)[0]
        if req.method not in (b"GET", b"HEAD"):
            raise MethodNotAllowed(f"{req.method.decode('ascii', 'replace')} is not allowed here")
        if req.framing.kind != "none":
            raise RequestError("the admin listener takes no request body")
        if path in STATIC or path in (b"/api/status", b"/metrics"):
            self._check_host(req)
        if path in STATIC:
            name, ctype = STATIC[path]
            headers = [(b"Cache-Control", b"no-cache")]
            if name.endswith(".html"):
                headers += [
                    (b"Content-Security-Policy", CSP),
                    (b"X-Frame-Options", b"DENY"),
                    (b"Referrer-Policy", b"no-referrer"),
                ]
            return self._response(req, 200, ctype, self.static[name], headers)
        if path == b"/api/status":
            body = json.dumps(self.status(time.time()), separators=(",", ":")).encode()
            return self._response(req, 200, b"application/json", body)
        if path == b"/metrics":
            _set_gauges(self.server, self.metrics)
            from kushi.metrics import CONTENT_TYPE

            return self._response(req, 200, CONTENT_TYPE.encode(), self.metrics.render())
        if path in (b"/proxy.pac", b"/wpad.dat"):
            proxy = pac_proxy(self.server, conn.local)
            socks = pac_proxy(self.server, conn.local, "socks")
            if proxy is None and socks is None:
                raise NotFound("no forward or socks listener to advertise; set pac_proxy")
            forward = [c for c in self.server.config.listeners if c.mode == "forward"]
            https = bool(forward) and forward[0].tls_cert is not None
            return self._response(req, 200, PAC_TYPE, pac_script(proxy, socks, https).encode())
        if path == b"/healthz":
            if shutting_down(self.server):
                return self._response(req, 503, b"text/plain; charset=utf-8", b"stopping\n")
            return self._response(req, 200, b"text/plain; charset=utf-8", b"ok\n")
        raise NotFound(f"no admin page at {path.decode('ascii', 'replace')[:200]}")

    def _check_host(self, req: RequestHead) -> None:
        """The status page and /metrics answer only to an address, this machine's own
        names and ``admin_names``.

        Against DNS rebinding: a web page on ``attacker.example`` that re-points its name at
        127.0.0.1 must not be able to read the recent requests, the config or the traffic
        counters. /proxy.pac, /wpad.dat and /healthz answer to any name: WPAD fetches the
        file as ``wpad.<domain>``, and neither tells a page more than the address and port
        it rebinds to, which it knew already."""
        host = req.get(b"host")
        if host is None:
            return
        try:
            name, _ = http1.split_authority(host)
        except ValueError:
            raise RequestError("bad Host header") from None
        name = name.lower().rstrip(".")
        if ip_literal(name) is not None or name in self.own_names or name in self.extra_names:
            return
        if name == "localhost" or name.endswith(".localhost"):
            return
        raise RequestDenied(
            f"the status page and /metrics answer to this machine's addresses and names "
            f"(and admin_names), not {name!r} (protection against DNS rebinding)"
        )

    def _response(
        self,
        req: RequestHead,
        status: int,
        ctype: bytes,
        body: bytes,
        extra: list[Header] | None = None,
    ) -> bytes:
        headers: list[Header] = [
            (b"Content-Type", ctype),
            (b"Content-Length", str(len(body)).encode()),
            (b"X-Content-Type-Options", b"nosniff"),
        ]
        headers += extra or [(b"Cache-Control", b"no-store")]
        if not req.keep_alive:
            headers.append((b"Connection", b"close"))
        head = http1.serialize_response_head(status, b"", headers)
        return head if req.method == b"HEAD" else head + body

    def status(self, now: float) -> dict[str, Any]:
        server = self.server
        services = server.services
        _set_gauges(server, self.metrics)
        totals = self.metrics.totals()
        self.timeline.sample(now, totals.requests)
        workers = server.config.workers
        tunnels = open_tunnels(server)
        if workers <= 1:
            recent_scope = ""
        elif self.metrics.multiprocess_dir:
            recent_scope = f"all {workers} workers (the others' within a second)"
        else:
            recent_scope = f"served by worker 0 of {workers}"
        return {
            "version": __version__,
            "pseudonym": services.pseudonym,
            "now": now,
            "started": services.started,
            "uptime": max(0.0, now - services.started),
            "health": "stopping" if shutting_down(server) else "ok",
            "workers": workers,
            "counted": "all workers" if self.all_workers or workers <= 1 else "worker 0 only",
            "recent_scope": recent_scope,
            "reloads": int(totals.reloads),
            "open_connections": int(totals.open_connections),
            "open_tunnels": None if tunnels is None else int(totals.open_tunnels),
            "totals": {
                "requests": int(totals.request_count),
                "by_family": {k: int(v) for k, v in sorted(totals.requests.items())},
                "tunnels": int(totals.tunnels),
                "bytes_in": int(totals.bytes_in),
                "bytes_out": int(totals.bytes_out),
                "fallbacks": int(totals.fallbacks),
                "socks": {k: int(v) for k, v in sorted(totals.socks.items())},
                "socks_datagrams": int(totals.datagrams),
            },
            "errors": [
                {"type": name, "count": int(count)}
                for name, count in sorted(totals.errors.items(), key=lambda kv: (-kv[1], kv[0]))
            ],
            "timeline": self.timeline.series(now),
            "recent": merged_recent(self.metrics.multiprocess_dir, services.recent),
            "config": config_view(server.config),
        }


def _own_names() -> frozenset[str]:
    names = {socket.gethostname()}
    with contextlib.suppress(OSError):
        names.add(socket.getfqdn())
    return frozenset(n.lower().rstrip(".") for n in names if n)


def _sockname(sock: socket.socket) -> str:
    try:
        host, port = sock.getsockname()[:2]
    except OSError:
        return "?"
    return str(Address(str(host), int(port)))


# --- start-up -------------------------------------------------------------------------


def _default_admin_listen() -> object:
    return next(f.default for f in fields(Config) if f.name == "admin_listen")


@dataclass(eq=False)
class AdminPlan:
    """The admin sockets, bound before ``serve``, and how the workers count requests."""

    config: Config
    sockets: list[socket.socket] = field(default_factory=list)
    multiprocess_dir: str | None = None
    per_worker: bool = False

    def serve_hooks(self) -> dict[str, Callable[[Server], Awaitable[None] | None]]:
        """Keyword arguments for ``server.serve``."""
        if not self.sockets:
            return {}
        hooks: dict[str, Callable[[Server], Awaitable[None] | None]] = {
            "extra_start": self.start_admin
        }
        if self.per_worker:
            hooks["worker_start"] = self.start_worker
        return hooks

    def start_worker(self, server: Server) -> None:
        metrics = attach(server, self.multiprocess_dir)
        if self.multiprocess_dir is not None:
            server.background.append(asyncio.ensure_future(_sample_gauges(server, metrics)))

    async def start_admin(self, server: Server) -> None:
        metrics = attach(server, self.multiprocess_dir)
        all_workers = self.config.workers <= 1 or self.multiprocess_dir is not None
        await Admin(server, metrics, self.sockets, all_workers=all_workers).start()

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()
        if self.multiprocess_dir is not None:
            shutil.rmtree(self.multiprocess_dir, ignore_errors=True)
            if os.environ.get(MULTIPROC_ENV) == self.multiprocess_dir:
                del os.environ[MULTIPROC_ENV]


def prepare(config: Config) -> AdminPlan:
    """Bind the admin sockets and choose how workers share counters; call before ``serve``.

    Raises ``StartupError`` when an admin address cannot be bound, except the built-in
    default address: a second kushi on the same machine then runs without an admin
    listener (with a warning) rather than not at all."""
    plan = AdminPlan(config)
    if not config.admin_listen:
        return plan
    try:
        for addr in config.admin_listen:
            plan.sockets.append(bind(addr, backlog=128))
    except StartupError as exc:
        plan.close()
        plan.sockets.clear()
        if config.admin_listen != _default_admin_listen():
            raise StartupError(f"admin_listen: {exc}") from None
        log.warning("admin listener off: %s (set admin_listen to use another address)", exc)
        return plan
    plan.per_worker = True
    if config.workers > 1:
        if plan.per_worker and "prometheus_client" not in sys.modules:
            plan.multiprocess_dir = tempfile.mkdtemp(prefix="kushi-metrics-")
            os.environ[MULTIPROC_ENV] = plan.multiprocess_dir
        else:
            log.warning(
                "workers = %d: /metrics and the status page count worker 0's requests only",
                config.workers,
            )
    return plan
