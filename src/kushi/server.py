"""Listeners, connections, signals, reload, workers and graceful shutdown.

One ``Server`` per process serves every configured listener. Sockets are bound once (in
the parent when ``workers > 1``, then inherited by each worker process), so all modes
share one accept path: connection limits, the PROXY protocol header (or, on a TLS
listener, the TLS handshake: ``kushi.tls``), the allow list, then the mode's handler
(``proxy.HttpSession`` for forward and reverse, ``tcpmode.serve_tcp``).

Signals: SIGTERM/SIGINT stop accepting, let open requests and tunnels finish for up to
``timeouts.shutdown_grace`` seconds, then cancel what is left and exit 0. SIGHUP re-reads
the config file; a bad file is reported and the running config kept. Listen addresses
cannot change on reload (that needs a restart); everything else applies to the next
request (a TLS listener's certificate and key to the next handshake).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import functools
import gc
import importlib
import logging
import os
import resource
import signal
import socket
import ssl
import sys
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import replace
from typing import Any

from kushi import http1
from kushi.accesslog import AccessRecord, describe_path
from kushi.acl import client_address, client_key, in_networks
from kushi.config import Address, Config, Listener, load_config
from kushi.errors import (
    ConfigError,
    ConnectionLost,
    KushiError,
    ProxyProtocolError,
    RequestDenied,
    TLSHandshakeError,
    TLSHandshakeTimeout,
    TooManyConnections,
)
from kushi.netio import Conn, serve_socket
from kushi.proxy import PROXY_NAME, HttpSession
from kushi.proxyproto import parse as parse_proxy_header
from kushi.resolver import Nat64
from kushi.routing import ClientInfo
from kushi.runtime import ListenerState, Services
from kushi.socks5 import VERSION as SOCKS_VERSION
from kushi.socksmode import serve_socks
from kushi.source import SourceUnusable, check_usable
from kushi.tcpmode import serve_tcp

log = logging.getLogger("kushi")
#: Stop (TERM, INT) and reload (HUP): relayed to every worker.
CONTROL_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGHUP})
#: The supervisor gives up after this many worker exits within FAST_FAILURE_WINDOW s.
FAST_FAILURES = 5
FAST_FAILURE_WINDOW = 10.0


class StartupError(Exception):
    """A listener could not be started: one clear line, exit code 1."""


def bind(addr: Address, backlog: int = 1024) -> socket.socket:
    family = socket.AF_INET6 if ":" in addr.host else socket.AF_INET
    try:
        infos = socket.getaddrinfo(
            addr.host, addr.port, family, socket.SOCK_STREAM, 0, socket.AI_PASSIVE
        )
    except socket.gaierror:
        try:
            infos = socket.getaddrinfo(
                addr.host, addr.port, 0, socket.SOCK_STREAM, 0, socket.AI_PASSIVE
            )
        except (socket.gaierror, UnicodeError):
            raise StartupError(f"cannot listen on {addr}: host name does not resolve") from None
    fam, _, _, _, sockaddr = infos[0]
    sock = socket.socket(fam, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if fam == socket.AF_INET6:
            # [::] means IPv6 only; list 0.0.0.0 too for IPv4, as the defaults do.
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(sockaddr)
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise StartupError(f"cannot listen on {addr}: address already in use") from None
        if exc.errno == errno.EADDRNOTAVAIL:
            raise StartupError(f"cannot listen on {addr}: no such local address") from None
        if exc.errno == errno.EACCES:
            raise StartupError(f"cannot listen on {addr}: permission denied") from None
        raise StartupError(f"cannot listen on {addr}: {exc.strerror}") from None
    return sock


def check_sources(config: Config) -> None:
    """Every configured source address or prefix is delivered to this host (an address
    of it, or inside a ``local`` route): otherwise kushi does not start (one line naming
    it, exit 1) rather than fail each connection from it later."""
    checks = [
        (f"listener {c.name}: cannot use source", n) for c in config.listeners for n in c.source
    ]
    checks += [
        (f"users.{u.name}: cannot use source", n) for u in config.users for n in u.source or ()
    ]
    for what, net in checks:
        try:
            check_usable(net, what)
        except SourceUnusable as exc:
            raise StartupError(str(exc)) from None


def close_listening(sockets: dict[str, list[socket.socket]]) -> None:
    """Close this process's copies of the listening sockets (the kernel stops accepting
    once every process holding one has closed it)."""
    for socks in sockets.values():
        for sock in socks:
            sock.close()


def bind_all(config: Config) -> dict[str, list[socket.socket]]:
    bound: dict[str, list[socket.socket]] = {}
    try:
        for listener in config.listeners:
            bound[listener.name] = [bind(addr) for addr in listener.listen]
    except StartupError:
        for socks in bound.values():
            for sock in socks:
                sock.close()
        raise
    return bound


def describe_listener(cfg: Listener, socks: list[socket.socket]) -> str:
    addrs = ", ".join(_sockname(s) for s in socks)
    parts = [f"{cfg.mode} listener {cfg.name!r} on {addrs}", f"egress {cfg.egress}"]
    if cfg.source:
        parts.append(f"source {cfg.source_plan.describe()}")
    allow = ", ".join(map(str, cfg.allow)) or "nobody"
    parts.append(f"allow {allow}" + (" (open)" if cfg.open else ""))
    if cfg.mode in ("forward", "socks"):
        parts.append("CONNECT ports " + ",".join(str(p) for p in sorted(cfg.connect_ports)))
        if cfg.mode == "forward" and cfg.socks:
            parts.append("SOCKS5 on the same port" + (" (inside TLS)" if cfg.tls_cert else ""))
    else:
        parts.append("backend " + ", ".join(cfg.backend))
    if cfg.tls_cert:
        parts.append(f"TLS with {cfg.tls_cert}")
    if cfg.proxy_protocol:
        parts.append("accepts PROXY protocol from " + ", ".join(map(str, cfg.proxy_protocol_from)))
    if cfg.backend_proxy_protocol:
        parts.append(f"sends PROXY protocol v{cfg.backend_proxy_protocol}")
    parts.append(f"access log {describe_path(cfg.access_log)} ({cfg.access_log_format})")
    return "; ".join(parts)


def _sockname(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class _Silent:
    """A new connection that has not sent its first byte yet: idle, for shutdown."""

    __slots__ = ("conn",)

    def __init__(self, conn: Conn) -> None:
        self.conn = conn

    def close_idle(self) -> None:
        if not self.conn.buf:
            self.conn.close()


class Server:
    def __init__(
        self,
        config: Config,
        sockets: dict[str, list[socket.socket]],
        pseudonym: str | None = None,
    ) -> None:
        self.config = config
        self.sockets = sockets
        self.services = Services.build(config, pseudonym)
        self.states: dict[str, ListenerState] = {
            cfg.name: ListenerState(cfg, config) for cfg in config.listeners
        }
        for socks in sockets.values():
            for sock in socks:
                host, port = sock.getsockname()[:2]
                self.services.add_own(host, port)
        self.servers: list[asyncio.Server] = []
        self.connections: set[asyncio.Task[None]] = set()
        self.per_client: Counter[str] = Counter()
        self.background: list[asyncio.Task[None]] = []
        #: Allow-list refreshes started by reloads, while they run.
        self.refreshes: set[asyncio.Future[None]] = set()
        self.reloads = 0
        self.on_reload: list[Callable[[Config], None]] = []

    async def start(self) -> None:
        # Host names in allow lists are resolved before the first client is accepted.
        for state in self.states.values():
            if state.allow.names:
                await state.allow.refresh(self.services.resolver)
        # NAT64: the IPv4 route is checked and the prefix discovered (RFC 7050) before
        # the first client, then again on a timer.
        nat64 = self.services.connector.nat64
        if nat64 is not None and nat64.mode != "off":
            await nat64.refresh(self.services.resolver)
            self.background.append(asyncio.ensure_future(self._nat64(nat64)))
        for cfg in self.config.listeners:
            for sock in self.sockets[cfg.name]:
                server = await serve_socket(sock, self._handler(cfg.name), self.connections)
                self.servers.append(server)
        self.background.append(asyncio.ensure_future(self._housekeeping()))

    async def _nat64(self, nat64: Nat64) -> None:
        while True:
            await asyncio.sleep(nat64.interval)
            await nat64.refresh(self.services.resolver)

    def _handler(self, name: str) -> Callable[[Conn], Coroutine[Any, Any, None]]:
        async def handle(conn: Conn) -> None:
            await self.serve_connection(name, conn)

        return handle

    async def serve_connection(self, name: str, client: Conn) -> None:
        state = self.states[name]
        if not client.peer[0]:
            # The peer reset the connection before it could be served (HAProxy ends its
            # health checks so): no address to check, nobody to answer, nothing to log.
            client.abort()
            await client.wait_closed()
            return
        info = ClientInfo(
            address=_plain(client.peer[0]),
            port=client.peer[1],
            local_address=_plain(client.local[0]),
            local_port=client.local[1],
        )
        try:
            if state.cfg.proxy_protocol:
                with_header = await self._read_proxy_header(state, client, info)
                if with_header is None:
                    return  # closed before its first byte: a load balancer's health check
                info = with_header
            who = client_key(info.address)  # an IPv6 /64 is one client
            limit_error = self._over_limit(who)
            self.per_client[who] += 1
            try:
                if limit_error is not None:
                    await self._refuse(state, client, info, limit_error)
                    return
                if state.tls is not None:
                    version = await self._accept_tls(state, client, info)
                    if version is None:
                        return
                    scheme = "https" if state.cfg.mode == "reverse" else info.scheme
                    info = replace(info, tls=version, scheme=scheme)
                peer = client_address(info.address)
                if peer is not None and state.trusted and in_networks(peer, state.trusted):
                    info = replace(info, trusted=True)
                if state.cfg.mode == "tcp":
                    if not state.allow.allows(peer):
                        await self._refuse(
                            state,
                            client,
                            info,
                            RequestDenied(
                                f"client {info.address} is not in this listener's allow list"
                            ),
                        )
                        return
                    state.hold()  # the tunnel keeps the snapshot it started with
                    try:
                        await serve_tcp(self.services, state, client, info, name)
                    finally:
                        state.release()
                elif state.cfg.mode == "socks":
                    await serve_socks(self.services, name, lambda: self.states[name], client, info)
                else:
                    if state.cfg.mode == "forward" and state.cfg.socks:
                        first = await self._first_byte(client)
                        if first is None:
                            return  # nothing within the header timeout, or closed
                        if first == SOCKS_VERSION:
                            await serve_socks(
                                self.services, name, lambda: self.states[name], client, info
                            )
                            return
                    session = HttpSession(
                        self.services, name, lambda: self.states[name], client, info
                    )
                    await session.run()
            finally:
                self.per_client[who] -= 1
                if self.per_client[who] <= 0:
                    del self.per_client[who]
        except ProxyProtocolError as exc:
            log.warning(
                "listener %s: closing connection from %s: %s", name, info.address, exc.details
            )
            self.services.record(
                state,
                AccessRecord(
                    time=time.time(),
                    listener=name,
                    mode=state.cfg.mode,
                    client=info.address,
                    method="PROXY",
                    status=400,
                    error="proxy_protocol_error",
                    details=exc.details,
                ),
            )
            client.abort()
        except asyncio.CancelledError:
            client.abort()
            raise
        except Exception:
            log.exception("listener %s: connection from %s failed", name, info.address)
            client.abort()
        finally:
            await client.wait_closed()

    async def _accept_tls(self, state: ListenerState, client: Conn, info: ClientInfo) -> str | None:
        """The TLS handshake, the first phase of a TLS listener's connection, under
        ``timeouts.header_read``: its version, or None when it failed (logged with
        ``tls_protocol_error`` and counted; nothing of what the client sent is read)."""
        assert state.tls is not None
        timeout = self.config.timeouts.header_read
        started = time.time()
        waiting = _Silent(client)
        self.services.idle.add(waiting)  # shutdown closes it, as an idle keep-alive
        exc: KushiError
        try:
            await client.accept_tls(state.tls, client.loop.time() + timeout)
            return client.tls_version
        except TimeoutError:
            exc = TLSHandshakeTimeout(
                f"no TLS handshake within timeouts.header_read ({timeout:g} s)"
            )
        except (ssl.SSLError, ConnectionLost) as err:
            if not client.tls_bytes_in:
                return None  # closed before its first byte: a health check or a port scan
            reason = err.reason if isinstance(err, ssl.SSLError) else err.details
            exc = TLSHandshakeError(f"TLS handshake failed: {reason or err}")
        finally:
            self.services.idle.discard(waiting)
        self.services.record(
            state,
            AccessRecord(
                time=started,
                listener=state.cfg.name,
                mode=state.cfg.mode,
                client=info.address,
                method="TLS",
                status=exc.status,
                error=exc.error_type,
                details=exc.details,
                duration=time.time() - started,
            ),
        )
        return None

    async def _first_byte(self, client: Conn) -> int | None:
        """The client's first byte, without consuming it (0x05 starts a SOCKS5 greeting, an
        HTTP request starts with a letter); None when nothing came within the header
        timeout (the connection is then closed, as an HTTP session would close it)."""
        if not client.buf:
            deadline = client.loop.time() + self.config.timeouts.header_read
            waiting = _Silent(client)
            self.services.idle.add(waiting)  # shutdown closes it, as an idle keep-alive
            try:
                with contextlib.suppress(TimeoutError):
                    await client.fill(deadline=deadline)
            finally:
                self.services.idle.discard(waiting)
        return client.buf[0] if client.buf else None

    async def _read_proxy_header(
        self, state: ListenerState, client: Conn, info: ClientInfo
    ) -> ClientInfo | None:
        """The client as the PROXY header names it; None when the connection ended (or was
        reset) before sending a single byte -- a TCP health check, not a protocol error."""
        peer = client_address(info.address)
        if peer is None or not in_networks(peer, state.proxy_protocol_from):
            raise ProxyProtocolError(f"PROXY header from untrusted address {info.address}")
        async with asyncio.timeout(self.config.timeouts.header_read):
            while True:
                parsed = parse_proxy_header(bytes(client.buf))
                if parsed is not None:
                    header, used = parsed
                    del client.buf[:used]
                    break
                if not await client.fill(536):
                    if not client.buf:
                        return None
                    raise ProxyProtocolError("connection closed inside the PROXY header")
        if header.command == "LOCAL" or header.src is None:
            return info
        return replace(
            info,
            address=_plain(header.src),
            port=header.src_port or 0,
            local_address=_plain(header.dst or info.local_address),
            local_port=header.dst_port or info.local_port,
        )

    def _over_limit(self, address: str) -> KushiError | None:
        limits = self.config.limits
        if len(self.connections) > limits.max_connections:
            return TooManyConnections(
                f"kushi is at its limit of {limits.max_connections} connections"
            )
        if self.per_client[address] >= limits.max_connections_per_client:
            return TooManyConnections(
                f"client {address} has {limits.max_connections_per_client} connections open already"
            )
        return None

    async def _refuse(
        self, state: ListenerState, client: Conn, info: ClientInfo, exc: KushiError
    ) -> None:
        record = AccessRecord(
            time=time.time(),
            listener=state.cfg.name,
            mode=state.cfg.mode,
            client=info.address,
            status=exc.status,
            error=exc.error_type,
            details=exc.details,
        )
        if state.cfg.mode in ("forward", "reverse") and state.tls is None:
            # (TCP, SOCKS and TLS before the handshake: just closed)
            data = http1.render_error(exc, proxy_name=PROXY_NAME, close=True)
            with contextlib.suppress(ConnectionLost):
                client.write(data)
                await client.drain()
            record.bytes_out = len(data)
        self.services.record(state, record)

    async def _housekeeping(self) -> None:
        while True:
            for state in list(self.states.values()):
                if state.allow.names:
                    await state.allow.refresh(self.services.resolver)
            self.services.pool.sweep()
            await asyncio.sleep(30.0 if any(s.allow.names for s in self.states.values()) else 10.0)

    # --- reload and shutdown -------------------------------------------------------------

    def reload(self, path: str | None, overrides: dict[str, object]) -> bool:
        try:
            new = load_config(path, overrides)
        except ConfigError as exc:
            log.error("reload failed, keeping the running config: %s", exc)
            return False
        try:
            check_sources(new)
        except StartupError as exc:
            log.error("reload failed, keeping the running config: %s", exc)
            return False
        old_listen = {c.name: c.listen for c in self.config.listeners}
        new_listen = {c.name: c.listen for c in new.listeners}
        if old_listen != new_listen:
            log.warning("reload: listener addresses changed; restart kushi to apply that part")
        # Build every new listener state first: one that cannot be built (an access log
        # that cannot be opened) leaves the running config wholly in place.
        built: dict[str, ListenerState] = {}
        try:
            for cfg in new.listeners:
                if cfg.name in self.states and cfg.listen == self.states[cfg.name].cfg.listen:
                    built[cfg.name] = ListenerState(cfg, new, previous=self.states[cfg.name])
        except (OSError, KushiError) as exc:
            for state in built.values():
                state.close()
            reason: object = exc
            if isinstance(exc, OSError):
                reason = f"{exc.filename or 'access log'}: {exc.strerror or exc}"
            log.error("reload failed, keeping the running config: %s", reason)
            return False
        for name, state in built.items():
            old = self.states[name]
            self.states[name] = state
            old.retire()  # its log stays open until its last request is logged
            if state.allow.names:
                # Held until done, then dropped: nothing accumulates per reload.
                task = asyncio.ensure_future(state.allow.refresh(self.services.resolver))
                self.refreshes.add(task)
                task.add_done_callback(self.refreshes.discard)
        # Idle upstream connections were opened under the old rules: none is reused.
        self.services.pool.close()
        self.services.connector.forget()
        self.config = replace(new, listeners=tuple(self.states[n].cfg for n in self.states))
        self.services.config = self.config
        self.reloads += 1
        for hook in self.on_reload:
            hook(self.config)
        log.info("config reloaded from %s", path or "flags")
        return True

    async def shutdown(self) -> None:
        # Listening stops first, so new clients are refused at once instead of waiting in
        # the accept queue of a process that will not accept them (nginx, Squid).
        for server in self.servers:
            server.close()
        close_listening(self.sockets)
        self.services.lifecycle = "draining"
        for session in list(self.services.idle):
            session.close_idle()
        grace = self.config.timeouts.shutdown_grace
        if self.connections:
            log.info(
                "shutting down: waiting up to %g s for %d connections", grace, len(self.connections)
            )
            # Idle keep-alive connections end at once; requests in flight finish.
            await asyncio.wait(set(self.connections), timeout=grace)
        dropped = len(self.connections)
        if dropped:
            # Each one is logged as aborted, with the bytes that really passed.
            log.warning(
                "shutdown grace of %g s over: dropping %d connections still open", grace, dropped
            )
        for task in list(self.connections):
            task.cancel()
        if self.connections:
            await asyncio.wait(set(self.connections), timeout=2)
        for job in [*self.background, *self.refreshes]:
            job.cancel()
        self.services.pool.close()
        for state in self.states.values():
            state.close()
        self.services.lifecycle = "stopped"


@functools.lru_cache(maxsize=4096)
def _plain(host: str) -> str:
    """``::ffff:a.b.c.d`` is the IPv4 client it is; scope ids are dropped."""
    addr = client_address(host)
    return str(addr) if addr is not None else host


def raise_fd_limit() -> None:
    """Lift the soft open-files limit to the hard one (as nginx and Squid do): every
    client connection costs a descriptor, and so does its upstream."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def settle_garbage_collector() -> None:
    """Move everything alive after start-up (modules, config, metrics) out of the
    collector's sight, so a full collection under load walks only what requests made: the
    p99 latency no longer carries the cost of scanning the whole program. (Raising the
    young-generation threshold was measured too: it made requests slower, not faster.)"""
    gc.collect()
    gc.freeze()


#: The modules a wheel build compiles with mypyc (pyproject.toml's hooks.mypyc include).
COMPILED_MODULES = (
    "http1",
    "routing",
    "exchange",
    "proxy",
    "forward",
    "accesslog",
    "runtime",
    "pool",
    "netio",
    "auth",
    "acl",
    "backends",
    "reverse",
)


def build_form() -> str:
    """``mypyc-compiled`` when the request path's modules are C extensions (a wheel
    install), ``pure Python`` when they run from source (an editable install)."""
    compiled = [
        name
        for name in COMPILED_MODULES
        if not str(importlib.import_module(f"kushi.{name}").__file__).endswith(".py")
    ]
    if not compiled:
        return "pure Python"
    if len(compiled) == len(COMPILED_MODULES):
        return "mypyc-compiled"
    return f"mypyc-compiled in part ({', '.join(compiled)})"


def install_event_loop() -> str:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return "asyncio"
    uvloop.install()
    return "uvloop"


async def run_server(
    config: Config,
    sockets: dict[str, list[socket.socket]],
    overrides: dict[str, object],
    pseudonym: str | None = None,
    extra_start: Callable[[Server], object] | None = None,
    worker_start: Callable[[Server], object] | None = None,
    announce: Callable[[], None] | None = None,
) -> int:
    """Serve in this process: ``worker_start`` runs in every worker, ``extra_start`` (the
    admin listener) in the first one only."""
    server = Server(config, sockets, pseudonym)
    await server.start()
    for hook in (worker_start, extra_start):
        if hook is not None:
            result = hook(server)
            if asyncio.iscoroutine(result):
                await result
    settle_garbage_collector()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: server.reload(config.source, overrides))
    # A signal that came during start-up waited (see ``serve``); it is handled now.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, CONTROL_SIGNALS)
    if announce is not None:
        announce()
    await stop.wait()
    log.info("stopping: no new connections")
    await server.shutdown()
    log.info("stopped")
    return 0


def serve(
    config: Config,
    overrides: dict[str, object],
    extra_start: Callable[[Server], object] | None = None,
    worker_start: Callable[[Server], object] | None = None,
) -> int:
    """Bind, start workers (or serve in this process) and block until stopped.

    SIGTERM, SIGINT and SIGHUP are held from here until the process that will handle them
    is ready to (the event loop's handlers in a worker, the relay in the supervisor): a
    stop sent once the port accepts connections is then always a graceful one, even
    before the workers are up."""
    signal.pthread_sigmask(signal.SIG_BLOCK, CONTROL_SIGNALS)
    raise_fd_limit()
    check_sources(config)
    sockets = bind_all(config)
    loop_name = install_event_loop()
    pseudonym = Services.build(config).pseudonym

    def announce() -> None:
        # Said once the signal handlers are in place, so "ready" means SIGTERM is graceful.
        for cfg in config.listeners:
            log.info("%s", describe_listener(cfg, sockets[cfg.name]))
        log.info(
            "kushi ready: %d worker(s), %s event loop, %s",
            config.workers,
            loop_name,
            build_form(),
        )

    if config.workers <= 1:
        return asyncio.run(
            run_server(config, sockets, overrides, pseudonym, extra_start, worker_start, announce)
        )
    return _supervise(config, sockets, overrides, pseudonym, extra_start, worker_start, announce)


def _supervise(
    config: Config,
    sockets: dict[str, list[socket.socket]],
    overrides: dict[str, object],
    pseudonym: str,
    extra_start: Callable[[Server], object] | None,
    worker_start: Callable[[Server], object] | None,
    announce: Callable[[], None],
) -> int:
    """Fork ``workers`` processes that share the listening sockets; relay signals to them."""
    children: dict[int, int] = {}

    def spawn(index: int) -> None:
        # The child starts with the signals held; run_server releases them once its
        # handlers are in place. The parent holds them until the child is in ``children``.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, CONTROL_SIGNALS)
        pid = os.fork()
        if pid == 0:
            for sig in CONTROL_SIGNALS:
                signal.signal(sig, signal.SIG_DFL)
            code = 1
            try:
                install_event_loop()
                code = asyncio.run(
                    run_server(
                        config,
                        sockets,
                        overrides,
                        pseudonym,
                        extra_start if index == 0 else None,
                        worker_start,
                    )
                )
            except ConfigError as exc:
                log.error("worker %d cannot start: %s", index, exc)
                code = 2
            except StartupError as exc:
                log.error("worker %d cannot start: %s", index, exc)
            except BaseException:
                log.exception("worker %d failed", index)
            finally:
                os._exit(code)
        children[pid] = index
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)

    stopping = False

    def forward(sig: int, _frame: object) -> None:
        nonlocal stopping
        if sig in (signal.SIGTERM, signal.SIGINT):
            stopping = True
            # No worker will be started again: the supervisor's copies of the listening
            # sockets must not keep accepting clients that nobody serves.
            close_listening(sockets)
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM if sig == signal.SIGINT else sig)

    for sig in CONTROL_SIGNALS:
        signal.signal(sig, forward)
    for i in range(config.workers):
        spawn(i)
    announce()
    # A stop or reload that came while the workers started is relayed to them now.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, CONTROL_SIGNALS)
    status = 0
    failures: collections.deque[float] = collections.deque(maxlen=FAST_FAILURES)
    while children:
        try:
            pid, wait_status = os.wait()
        except ChildProcessError:
            break
        except InterruptedError:  # pragma: no cover
            continue
        index = children.pop(pid, None)
        if index is None:
            continue
        code = os.waitstatus_to_exitcode(wait_status)
        how = f"was killed by signal {-code}" if code < 0 else f"exited with {code}"
        if stopping:
            if code != 0:
                status = 1
            continue
        failures.append(time.monotonic())
        if len(failures) == FAST_FAILURES and failures[-1] - failures[0] < FAST_FAILURE_WINDOW:
            # A worker that cannot stay up will not start the next time either: give up
            # with its reason (its own log line above) instead of a restart loop that
            # systemd's Restart=on-failure would never see.
            log.error(
                "worker %d %s; %d worker failures in %g s: stopping kushi",
                index,
                how,
                FAST_FAILURES,
                FAST_FAILURE_WINDOW,
            )
            stopping = True
            status = code if code > 0 else 1
            for other in children:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(other, signal.SIGTERM)
            continue
        log.error("worker %d (pid %d) %s; starting a new one", index, pid, how)
        time.sleep(0.5)
        spawn(index)
    log.info("stopped")
    return status


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s kushi[%(process)d] %(levelname)s %(message)s",
        stream=sys.stderr,
    )
