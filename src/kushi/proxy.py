"""The HTTP handler shared by forward and reverse listeners.

One ``HttpSession`` per client connection reads requests one at a time (pipelined requests
wait in the buffer and are answered in order), decides the target (``route``), opens or
reuses an upstream connection for that target through the connector, streams the body
both ways with backpressure, and writes one access record per request. The modes differ
only in ``route``: a forward listener takes the target from the absolute-form URL or the
CONNECT authority; a reverse listener sends origin-form requests to its backends.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kushi import http1
from kushi.accesslog import AccessRecord
from kushi.acl import client_address, client_key
from kushi.config import in_port_ranges
from kushi.connector import Upstream, describe_fallbacks
from kushi.errors import (
    ClientNotAllowed,
    ConnectionReadTimeout,
    ConnectionRefused,
    ConnectionTerminated,
    ConnectionTimeout,
    DestinationUnroutable,
    KushiError,
    LoopDetected,
    NotProxied,
    ProxyAuthRequired,
    RequestDenied,
    RequestError,
    RequestTimeout,
    ResponseIncomplete,
    ResponseTimeout,
    UpstreamError,
)
from kushi.http1 import Data, EndOfMessage, RequestHead, ResponseHead, Target
from kushi.netio import READ_SIZE, Conn
from kushi.proxyproto import build as build_proxy_header
from kushi.resolver import ip_literal
from kushi.routing import (
    ClientInfo,
    downstream_response_headers,
    max_forwards,
    seen_via,
    upstream_request_headers,
)
from kushi.runtime import EgressChoice, ListenerState, Services

log = logging.getLogger("kushi.proxy")
PROXY_NAME = "kushi"
#: Numbers client sessions for the lifetime of the process (unlike id(), never reused).
_SESSION_SERIAL = itertools.count(1)


class ClientGone(Exception):
    """The client closed its connection; nothing more can be sent to it."""


@dataclass(slots=True)
class Route:
    host: str
    port: int
    host_header: bytes
    path: bytes
    pool_key: tuple[object, ...]
    #: The policy and source address this request leaves with (part of ``pool_key``).
    egress: EgressChoice


async def read_head(
    conn: Conn,
    max_line: int,
    max_head: int,
    *,
    response: bool = False,
    deadline: float | None = None,
) -> bytes | None:
    """The next message head from ``conn``; None at a clean end of stream before any byte;
    ``TimeoutError`` when it is not complete by ``deadline`` (event-loop time)."""
    while True:
        end = http1.find_head_end(conn.buf, max_line, max_head, response=response)
        if end >= 0:
            head = bytes(conn.buf[:end])
            del conn.buf[:end]
            return head
        if not await conn.fill(deadline=deadline):
            if conn.buf.strip(b"\r\n"):
                if response:
                    raise ResponseIncomplete(
                        "upstream closed the connection inside the response head"
                    )
                raise RequestError("connection closed inside the request head")
            return None


async def next_body_event(
    conn: Conn, reader: http1.BodyReader, idle: float | None = None
) -> http1.BodyEvent | None:
    """The next body event, or None when ``conn`` ended first. Large reads go straight
    through. ``TimeoutError`` when no byte arrived for ``idle`` seconds (the body's idle
    deadline: it restarts with every byte)."""
    while True:
        deadline = conn.loop.time() + idle if idle else None
        if not conn.buf and isinstance(reader, http1.ContentLengthReader) and reader.remaining:
            data = await conn.read_some(min(reader.remaining, READ_SIZE), deadline)
            if not data:
                return None
            reader.remaining -= len(data)
            return Data(data)
        if not conn.buf and isinstance(reader, http1.UntilCloseReader):
            data = await conn.read_some(READ_SIZE, deadline)
            return Data(data) if data else None
        event = reader.read(conn.buf)
        if event is not None:
            return event
        if not await conn.fill(deadline=deadline):
            return None


class HttpSession:
    def __init__(
        self,
        services: Services,
        listener: str,
        get_state: Callable[[], ListenerState],
        client: Conn,
        info: ClientInfo,
    ) -> None:
        self.services = services
        self.listener = listener
        self.get_state = get_state
        self.client = client
        self.info = info
        self.config = services.config
        self.loop = client.loop
        self.upstream: Upstream | None = None  # the one in use by the current request
        self._current_key: tuple[object, ...] | None = None
        self.serial = next(_SESSION_SERIAL)
        self._private_keys: set[tuple[object, ...]] = set()
        self.client_ip = client_address(info.address)
        self._acl: tuple[ListenerState, bool] | None = None
        self._body_done = True

    # --- the request loop ----------------------------------------------------------------

    async def run(self) -> None:
        try:
            await self._run()
        finally:
            # Backend connections that carry this client's PROXY header die with it.
            for key in self._private_keys:
                self.services.pool.discard(key)

    async def _run(self) -> None:
        first = True
        while True:
            # Limits and timeouts for reading the next head: those in force now (a reload
            # applies to the next request of a kept-alive connection).
            self.config = self.get_state().config
            limits = self.config.limits
            timeouts = self.config.timeouts
            timeout = timeouts.header_read if first or self.client.buf else timeouts.idle
            started = time.time()
            waiting = not self.client.buf
            if self.services.stopping and not self.client.buf:
                return
            consumed_before = self.client.bytes_in - len(self.client.buf)
            sent_before = self.client.bytes_out
            self.services.idle.add(self)
            try:
                head_bytes = await read_head(
                    self.client,
                    limits.max_request_line,
                    limits.max_header_bytes,
                    deadline=self.loop.time() + timeout,
                )
            except TimeoutError:
                if self.client.buf:
                    await self._fail_early(
                        RequestTimeout(
                            f"request head not complete within {timeout:g} s "
                            + ("(timeouts.header_read)" if first else "(timeouts.idle)")
                        ),
                        max(started, self.client.filled_at) if waiting else started,
                    )
                return
            except KushiError as exc:
                await self._fail_early(
                    exc, max(started, self.client.filled_at) if waiting else started
                )
                return
            finally:
                self.services.idle.discard(self)
            if head_bytes is None:
                return
            if waiting:
                # The request began with its first byte, not when the (keep-alive) wait
                # for it did: Squid's duration.
                started = max(started, self.client.filled_at)
            first = False
            # The request's snapshot of the runtime (ACL, egress, limits, timeouts, log),
            # taken once when its head is complete and used throughout.
            state = self.get_state()
            self.config = state.config
            state.hold()
            record = AccessRecord(
                time=started,
                listener=self.listener,
                mode=state.cfg.mode,
                client=self.info.address,
                tls=self.info.tls,
            )
            keep = False
            req: RequestHead | None = None
            try:
                req = http1.parse_request_head(head_bytes)
                record.method = req.method.decode("ascii", "replace")
                record.target = req.target.decode("ascii", "replace")[:2048]
                keep = await self.handle(req, state, record)
            except KushiError as exc:
                keep = await self._answer_error(exc, record, req)
            except ClientGone:
                keep = False
                record.error = record.error or "client_closed"
                record.aborted = True
            except asyncio.CancelledError:
                # Shutdown's grace ran out while this request or tunnel was in flight.
                record.error = record.error or "shutdown"
                record.aborted = True
                raise
            except Exception as exc:  # never a traceback to the client
                log.exception("internal error handling %s", record.target)
                keep = await self._answer_error(
                    KushiError(f"internal error: {type(exc).__name__}"), record, None
                )
            finally:
                self._release_upstream(False)
                # What this request took from the client: its head, body or tunnel bytes.
                record.bytes_in = self.client.bytes_in - len(self.client.buf) - consumed_before
                if record.aborted or (record.error and record.status == 200):
                    # Cut short: what really left for the client (not what was queued).
                    record.aborted = True
                    record.bytes_out = (
                        self.client.bytes_out - sent_before - self.client.write_buffer_size()
                    )
                record.duration = time.time() - started
                self.services.record(state, record)
                state.release()
            if not keep or self.client.closed:
                return

    def close_idle(self) -> None:
        """Shutdown: a connection waiting for its next request with nothing buffered ends
        now (an idle keep-alive connection has nothing in flight to finish)."""
        if not self.client.buf:
            self.client.close()

    async def _fail_early(self, exc: KushiError, started: float) -> None:
        state = self.get_state()
        record = AccessRecord(
            time=started,
            listener=self.listener,
            mode=state.cfg.mode,
            client=self.info.address,
            tls=self.info.tls,
        )
        await self._answer_error(exc, record, None)
        record.duration = time.time() - started
        self.services.record(state, record)

    async def _answer_error(
        self, exc: KushiError, record: AccessRecord, req: RequestHead | None
    ) -> bool:
        if not record.bytes_out:
            record.status = exc.status  # (once a head went out, its status is what was sent)
        record.error = exc.error_type
        record.details = exc.details
        record.attempts = record.attempts or list(exc.attempts)
        if record.bytes_out or self.client.closed:
            # The response had started: the only honest signal left is to cut the connection.
            self.client.abort()
            return False
        close = (
            exc.close
            or req is None
            or not req.keep_alive
            or bool(self.client.buf and req.framing.kind != "none")
        )
        # An unread request body makes the connection unusable for the next request.
        if req is not None and req.framing.kind != "none" and not self._body_done:
            close = True
        next_hop = self.upstream.next_hop if self.upstream else None
        extra = []
        if isinstance(exc, ProxyAuthRequired):
            extra.append((b"Proxy-Authenticate", b'Basic realm="kushi", charset="UTF-8"'))
        data = http1.render_error(
            exc,
            proxy_name=PROXY_NAME,
            close=close,
            next_hop=next_hop,
            head_only=req is not None and req.method == b"HEAD",
            extra_headers=extra,
            source=self.upstream.source or None if self.upstream else None,
        )
        try:
            self.client.write(data)
            await self.client.drain()
        except (ConnectionError, OSError):
            return False
        record.bytes_out += len(data)
        if close:
            self.client.write_eof()
        return not close

    # --- routing -------------------------------------------------------------------------

    async def handle(self, req: RequestHead, state: ListenerState, record: AccessRecord) -> bool:
        self._body_done = req.framing.kind == "none"
        await self.authorize(req, state, record)
        target = http1.parse_target(req.method, req.target)
        if seen_via(req, self.services.pseudonym):
            raise LoopDetected("this request has already passed through this kushi (Via)")
        mode = state.cfg.mode
        if mode == "forward":
            if target.form == "authority":
                return await self.connect_tunnel(req, target, state, record)
            if target.form != "absolute":
                return await self.self_page(req, record)
            if target.scheme != "http":
                raise RequestError(
                    f"kushi forwards http:// URLs; for {target.scheme}:// use a CONNECT tunnel"
                )
            if not in_port_ranges(target.port, state.cfg.http_ports):
                # Squid's Safe_ports: HTTP sent to a mail or database port is an attack on
                # that service (cross-protocol), whoever the client is.
                raise RequestDenied(f"plain HTTP to port {target.port} is not allowed (http_ports)")
            egress = state.egress(self.info.address, record.user, self.serial)
            route = Route(
                host=target.host,
                port=target.port,
                host_header=target.authority.encode("ascii"),
                path=target.path,
                pool_key=("fwd", target.host, target.port, egress.pool_tag),
                egress=egress,
            )
            return await self.forward(req, route, state, record, reverse=None)
        # reverse
        if target.form != "origin" and target.form != "asterisk":
            raise NotProxied(
                "this is a reverse proxy: absolute-form and CONNECT requests are refused"
            )
        return await self.forward_reverse(req, target, state, record)

    async def authorize(self, req: RequestHead, state: ListenerState, record: AccessRecord) -> None:
        """The allow list and proxy authentication, combined as ``auth_combine`` says."""
        if self._acl is None or self._acl[0] is not state or state.allow.names:
            self._acl = (state, state.allow.allows(self.client_ip))
        need = state.admission(self._acl[1])
        if need == "deny":
            raise ClientNotAllowed(
                f"client {self.info.address} is not in this listener's allow list"
            )
        if need == "admit" or state.auth is None:
            return
        user = await state.auth.check(
            req.get(b"proxy-authorization"), client_key(self.info.address)
        )
        if user is None:
            raise ProxyAuthRequired("proxy authentication required (Basic)")
        record.user = user

    async def forward_reverse(
        self, req: RequestHead, target: Target, state: ListenerState, record: AccessRecord
    ) -> bool:
        host_header = req.get(b"host") or b""
        last_error: KushiError | None = None
        egress = state.egress(self.info.address, record.user, self.serial)
        for backend in state.backends.candidates():
            if not state.cfg.preserve_host or not host_header:
                host_header = str(backend).encode() if backend.port != 80 else backend.host.encode()
            key: tuple[object, ...] = ("rev", backend.host, backend.port, egress.pool_tag)
            if state.cfg.backend_proxy_protocol:
                # The PROXY header names one client: never share that connection.
                key = (*key, self.serial)
                self._private_keys.add(key)
            route = Route(
                backend.host,
                backend.port,
                host_header,
                target.path,
                key,
                egress,
            )
            try:
                keep = await self.forward(req, route, state, record, reverse=self.info)
            except (ConnectionRefused, ConnectionTimeout, DestinationUnroutable) as exc:
                state.backends.mark_down(backend)
                last_error = exc
                continue
            state.backends.mark_up(backend)
            return keep
        assert last_error is not None
        raise last_error

    # --- forwarding one request ----------------------------------------------------------

    async def open_upstream(self, route: Route, state: ListenerState) -> tuple[Upstream, bool]:
        upstream = self.services.pool.get(route.pool_key)
        if upstream is not None:
            # A pooled connection obeys the rules in force now, as a new one would.
            if self._still_allowed(upstream, state):
                return upstream, True
            upstream.conn.abort()
        upstream = await self.services.connector.connect(
            route.host, route.port, route.egress.policy, state.destinations, route.egress.source
        )
        if state.cfg.mode != "forward" and state.cfg.backend_proxy_protocol:
            upstream.conn.write(
                build_proxy_header(
                    state.cfg.backend_proxy_protocol,
                    self.info.address,
                    self.info.port,
                    self.info.local_address,
                    self.info.local_port,
                )
            )
        return upstream, False

    def _still_allowed(self, upstream: Upstream, state: ListenerState) -> bool:
        # A NAT64 connection is checked as the IPv4 address it stands for.
        addr = ip_literal(upstream.via or upstream.address)
        if addr is None:
            return False
        checks = [c for c in (self.services.connector.check, state.destinations) if c]
        try:
            return all(check(addr, upstream.port) is None for check in checks)
        except KushiError:
            return False

    async def forward(
        self,
        req: RequestHead,
        route: Route,
        state: ListenerState,
        record: AccessRecord,
        reverse: ClientInfo | None,
    ) -> bool:
        mf = max_forwards(req)
        if mf == 0:
            return await self.answer_max_forwards(req, record)
        upgrade = self._upgrade_allowed(req, route, state)
        headers = upstream_request_headers(
            req,
            host=route.host_header,
            pseudonym=self.services.pseudonym,
            reverse=reverse,
            keep_upgrade=upgrade,
        )
        if req.framing.kind == "chunked":
            headers.append((b"Transfer-Encoding", b", ".join((*req.codings, b"chunked"))))
        elif req.framing.kind == "length":
            headers.append((b"Content-Length", str(req.framing.length).encode()))
        elif req.method in (b"POST", b"PUT", b"PATCH"):
            headers.append((b"Content-Length", b"0"))
        head = http1.serialize_request_head(req.method, route.path, headers)
        # Body bytes already here are validated first: a request whose chunking is already
        # known to be bad never reaches the origin.
        http1.check_buffered_body(req.framing, self.client.buf)

        for attempt in range(2):
            upstream, reused = await self.open_upstream(route, state)
            received_before = upstream.conn.bytes_in
            self.upstream = upstream
            self._current_key = route.pool_key
            record.upstream = upstream.next_hop
            record.family = upstream.family
            record.source = upstream.source
            # A pooled connection's attempts belong to the request that opened it.
            record.attempts = [] if reused else [a.describe() for a in upstream.fallbacks]
            record.notes = upstream.report_notes
            record.connect_ms = 0.0 if reused else round(upstream.connect_time * 1000, 3)
            try:
                upstream.conn.write(head)
                if req.framing.kind == "none":
                    await upstream.conn.drain()
                    resp = await self.read_response_head(req, upstream, record, expect_reuse=reused)
                    body_task = None
                else:
                    body_task = asyncio.ensure_future(self.send_request_body(req, upstream))
                    resp = await self._head_while_sending(req, upstream, record, body_task)
            except (_StaleConnection, ConnectionError, OSError) as exc:
                upstream.conn.abort()
                self.upstream = None
                # Retry once on a fresh connection only when nothing of the request can
                # have been consumed: no body, a pooled connection the server had closed,
                # not one byte of a response, and an idempotent method (RFC 9110 9.2.2).
                retry = (
                    (reused or isinstance(exc, _StaleConnection))
                    and req.framing.kind == "none"
                    and req.method in IDEMPOTENT_METHODS
                    and upstream.conn.bytes_in == received_before
                )
                if attempt == 0 and retry:
                    continue
                if not isinstance(exc, _StaleConnection):
                    raise ConnectionTerminated(
                        f"upstream {upstream.next_hop} closed the connection: {exc}"
                    ) from None
                raise ConnectionTerminated("upstream closed the connection") from None
            break
        else:  # pragma: no cover
            raise ConnectionTerminated("upstream closed the connection")
        try:
            return await self.relay_response(req, resp, upstream, body_task, record, upgrade)
        finally:
            if body_task is not None:
                if not body_task.done():
                    body_task.cancel()
                await asyncio.gather(body_task, return_exceptions=True)

    def _upgrade_allowed(self, req: RequestHead, route: Route, state: ListenerState) -> bool:
        """Whether the request's Upgrade is passed on (else it is dropped, as a hop-by-hop
        field, and the request goes on as a plain one). Only the protocols in
        ``upgrade_protocols`` (websocket by default); and since a 101 makes the connection
        a raw tunnel, a forward listener allows it only to the ports a CONNECT may reach
        (and 80, the port the same request could reach as plain HTTP)."""
        if req.upgrade is None or req.framing.kind != "none":
            return False
        names = [p.split(b"/")[0].strip().lower() for p in req.upgrade.split(b",")]
        allowed = state.cfg.upgrade_protocols
        if not names or any(n.decode("ascii", "replace") not in allowed for n in names):
            return False
        if state.cfg.mode == "forward" and route.port != 80:
            if route.port not in state.cfg.connect_ports:
                raise RequestDenied(
                    f"Upgrade to port {route.port} is not allowed: an upgraded connection is "
                    "a tunnel, allowed only to connect_ports (and 80)"
                )
        return True

    async def _head_while_sending(
        self,
        req: RequestHead,
        upstream: Upstream,
        record: AccessRecord,
        body_task: asyncio.Future[None],
    ) -> ResponseHead:
        """Wait for the response head while the body streams; a body that fails (bad
        chunking, client gone) ends the exchange at once and the upstream is dropped."""
        # The response head may come early (a 413 while the upload runs); its deadline,
        # ``upstream_header``, starts only when the request body is complete.
        head_task = asyncio.ensure_future(
            self.read_response_head(req, upstream, record, expect_reuse=False, timeout=None)
        )
        pending: set[asyncio.Future[Any]] = {body_task, head_task}
        try:
            await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            if not head_task.done() and body_task.done() and body_task.exception() is None:
                await asyncio.wait({head_task}, timeout=self.config.timeouts.upstream_header)
                if not head_task.done():
                    head_task.cancel()
                    await asyncio.gather(head_task, return_exceptions=True)
                    upstream.conn.abort()
                    self.upstream = None
                    raise self._response_timeout(upstream)
        except asyncio.CancelledError:
            head_task.cancel()
            raise
        failure = body_task.exception() if body_task.done() else None
        if failure is not None and not isinstance(failure, ConnectionTerminated):
            # A bad body or a client that left is the cause, whatever the upstream said.
            head_task.cancel()
            await asyncio.gather(head_task, return_exceptions=True)
            upstream.conn.abort()
            self.upstream = None
            raise failure
        try:
            return await head_task
        except BaseException:
            body_task.cancel()
            await asyncio.gather(body_task, return_exceptions=True)
            raise

    async def send_request_body(self, req: RequestHead, upstream: Upstream) -> None:
        reader = http1.body_reader(req.framing, RequestError)
        chunked = req.framing.kind == "chunked"
        conn = upstream.conn
        while True:
            event = await self._client_body_event(reader)
            if event is None:
                # The client left mid-upload: the upstream must not take a partial body.
                conn.abort()
                raise ClientGone()
            try:
                if isinstance(event, Data):
                    conn.write(http1.encode_chunk(event.data) if chunked else event.data)
                    await conn.drain()
                    continue
                if chunked:
                    trailers = [
                        (k, v) for k, v in event.trailers if k.lower() not in http1.HOP_BY_HOP
                    ]
                    conn.write(http1.encode_last_chunk(trailers))
                    await conn.drain()
            except (ConnectionError, OSError):
                raise ConnectionTerminated(
                    f"upstream {upstream.next_hop} closed the connection during the request body"
                ) from None
            self._body_done = True
            return

    async def _client_body_event(self, reader: http1.BodyReader) -> http1.BodyEvent | None:
        """The next piece of the request body, under the ``request_body_idle`` deadline."""
        idle = self.config.timeouts.request_body_idle
        try:
            return await next_body_event(self.client, reader, idle)
        except TimeoutError:
            raise RequestTimeout(
                f"no byte of the request body for {idle:g} s (timeouts.request_body_idle)"
            ) from None

    def _response_timeout(self, upstream: Upstream) -> ResponseTimeout:
        return ResponseTimeout(
            f"upstream {upstream.next_hop} sent no response head within "
            f"{self.config.timeouts.upstream_header:g} s (timeouts.upstream_header)"
        )

    async def read_response_head(
        self,
        req: RequestHead,
        upstream: Upstream,
        record: AccessRecord,
        *,
        expect_reuse: bool,
        timeout: float | None = -1.0,
    ) -> ResponseHead:
        """The final response head; interim 1xx heads go on to the client. ``timeout``:
        seconds from now (by default ``upstream_header``), or None for no deadline (the
        caller keeps it)."""
        limits = self.config.limits
        conn = upstream.conn
        if timeout is not None and timeout < 0:
            timeout = self.config.timeouts.upstream_header
        deadline = self.loop.time() + timeout if timeout is not None else None
        try:
            while True:
                before = conn.bytes_in
                head = await read_head(
                    conn,
                    limits.max_request_line,
                    limits.max_header_bytes,
                    response=True,
                    deadline=deadline,
                )
                if head is None:
                    if expect_reuse and before == 0 or (expect_reuse and conn.bytes_in == before):
                        raise _StaleConnection()
                    raise ConnectionTerminated(
                        f"upstream {upstream.next_hop} closed the connection without a response"
                    )
                resp = http1.parse_response_head(head, req.method)
                if resp.status >= 200 or resp.status == 101:
                    return resp
                # 1xx interim responses (100 Continue, 103 Early Hints) go to 1.1 clients.
                if req.version == (1, 1):
                    headers = downstream_response_headers(
                        resp,
                        pseudonym=self.services.pseudonym,
                        proxy_status=self._status_value(upstream, resp.status),
                    )
                    data = http1.serialize_response_head(resp.status, resp.reason, headers)
                    self.client.write(data)
                    await self._client_drain()
        except TimeoutError:
            raise self._response_timeout(upstream) from None

    async def _client_drain(self) -> None:
        try:
            await self.client.drain()
        except (ConnectionError, OSError):
            raise ClientGone() from None

    def _status_value(self, upstream: Upstream, status: int | None) -> bytes:
        """Proxy-Status for a response from ``upstream``: the next hop actually used, the
        family in ``details``, and any attempts that lost (a fallback is never silent)."""
        cached = upstream.proxy_status.get(status)
        if cached is not None:
            return cached
        details: str = upstream.label
        if upstream.fallbacks:
            details = f"{upstream.label}; {describe_fallbacks(upstream)}"
        if upstream.notes:
            details = "; ".join((details, *upstream.notes))
        value = http1.proxy_status(
            PROXY_NAME,
            next_hop=upstream.next_hop,
            received_status=status,
            details=details,
            source=upstream.source or None,
        )
        upstream.proxy_status[status] = value
        return value

    async def relay_response(
        self,
        req: RequestHead,
        resp: ResponseHead,
        upstream: Upstream,
        body_task: asyncio.Future[None] | None,
        record: AccessRecord,
        upgrade: bool,
    ) -> bool:
        record.status = resp.status
        ctype = resp.get(b"content-type")
        record.content_type = ctype.decode("latin-1").split(";")[0] if ctype else ""
        status_value = self._status_value(upstream, resp.status)
        switching = resp.status == 101 and upgrade
        headers = downstream_response_headers(
            resp,
            pseudonym=self.services.pseudonym,
            proxy_status=status_value,
            keep_upgrade=switching,
        )
        client_11 = req.version == (1, 1)
        framing = resp.framing.kind
        if switching:
            headers.append((b"Connection", b"upgrade"))
            self.client.write(http1.serialize_response_head(resp.status, resp.reason, headers))
            await self._client_drain()
            upstream.conn.buf, pending = bytearray(), bytes(upstream.conn.buf)
            if pending:
                # The upstream's first bytes after its 101 came with the head: they are
                # part of what the tunnel carried to the client.
                self.client.write(pending)
                record.bytes_out += len(pending)
            _up, down = await self.services.relay(self.client, upstream.conn, record)
            record.bytes_out += down
            upstream.conn.close()
            self.upstream = None
            return False
        if resp.status == 101:
            raise UpstreamError("upstream switched protocols without an upgrade request")

        if framing == "none":
            out_framing = "none"
            if (req.method == b"HEAD" or resp.status == 304) and resp.get(b"content-length"):
                headers.append((b"Content-Length", resp.get(b"content-length") or b"0"))
            elif resp.status not in (204, 304) and resp.status >= 200 and req.method != b"HEAD":
                headers.append((b"Content-Length", b"0"))
        elif framing == "length":
            out_framing = "length"
            headers.append((b"Content-Length", str(resp.framing.length).encode()))
        elif client_11:
            out_framing = "chunked"
            headers.append((b"Transfer-Encoding", b"chunked"))
            # The trailer section goes on (below), so does the field announcing it
            # (RFC 9110 section 6.6.2); with any other framing the trailers are dropped.
            announced = resp.get_all(b"trailer")
            if announced:
                headers.append((b"Trailer", b", ".join(announced)))
        else:
            out_framing = "close"

        client_keep = req.keep_alive and out_framing != "close" and not self.services.stopping
        if not client_keep:
            headers.append((b"Connection", b"close"))
        elif not client_11:
            headers.append((b"Connection", b"keep-alive"))
        head = http1.serialize_response_head(resp.status, resp.reason, headers)
        record.bytes_out += len(head)
        if out_framing == "length" and len(upstream.conn.buf) >= resp.framing.length:
            # The whole body is already here (small responses): one write, one segment.
            n = resp.framing.length
            body = bytes(upstream.conn.buf[:n])
            del upstream.conn.buf[:n]
            self.client.write(head + body)
            record.bytes_out += n
            framing = "none"
        else:
            self.client.write(head)

        reader = http1.body_reader(resp.framing, UpstreamError)
        idle = self.config.timeouts.response_body_idle
        if framing != "none":
            while True:
                try:
                    event = await next_body_event(upstream.conn, reader, idle)
                except TimeoutError:
                    raise ConnectionReadTimeout(
                        f"upstream {upstream.next_hop} sent no byte of the response body for "
                        f"{idle:g} s (timeouts.response_body_idle)"
                    ) from None
                if event is None:
                    event = reader.eof()  # raises ResponseIncomplete if the body was cut short
                if isinstance(event, Data):
                    data = (
                        http1.encode_chunk(event.data) if out_framing == "chunked" else event.data
                    )
                    self.client.write(data)
                    record.bytes_out += len(data)
                    if self.client.write_buffer_size() > 1 << 20:
                        await self._client_drain()
                    if self.client.closed:
                        raise ClientGone()
                    continue
                if out_framing == "chunked":
                    trailers = [
                        (k, v) for k, v in event.trailers if k.lower() not in http1.HOP_BY_HOP
                    ]
                    data = http1.encode_last_chunk(trailers)
                    self.client.write(data)
                    record.bytes_out += len(data)
                break
        await self._client_drain()

        body_complete = body_task is None
        if body_task is not None:
            if body_task.done():
                body_complete = body_task.exception() is None
            else:
                # The upstream answered before reading the whole body (e.g. 413): give the
                # client a moment to finish; otherwise close both connections.
                done, _ = await asyncio.wait({body_task}, timeout=1.0)
                body_complete = bool(done) and body_task.exception() is None
        reusable = (
            resp.keep_alive and framing != "close" and body_complete and not upstream.conn.at_eof
        )
        self._release_upstream(reusable)
        return client_keep and body_complete

    def _release_upstream(self, reusable: bool) -> None:
        upstream, self.upstream = self.upstream, None
        if upstream is None:
            return
        if reusable and self._current_key is not None:
            self.services.pool.put(self._current_key, upstream)
        else:
            upstream.conn.close()

    # --- CONNECT -------------------------------------------------------------------------

    async def connect_tunnel(
        self, req: RequestHead, target: Target, state: ListenerState, record: AccessRecord
    ) -> bool:
        upstream = await self.services.open_tunnel(
            state, target.host, target.port, record, "CONNECT"
        )
        record.status = 200
        headers = [(b"Proxy-Status", self._status_value(upstream, None))]
        head = http1.serialize_response_head(200, b"Connection established", headers)
        self.client.write(head)
        record.bytes_out += len(head)
        try:
            await self._client_drain()
        except ClientGone:
            upstream.conn.abort()
            raise
        _up, down = await self.services.relay(self.client, upstream.conn, record)
        record.bytes_out += down
        upstream.conn.close()
        return False

    # --- answered by kushi itself ---------------------------------------------------------

    async def self_page(self, req: RequestHead, record: AccessRecord) -> bool:
        body = SELF_PAGE.format(pseudonym=self.services.pseudonym).encode()
        status = 200 if req.target in (b"/", b"*") else 404
        headers = [
            (b"Content-Type", b"text/plain; charset=utf-8"),
            (b"Content-Length", str(len(body)).encode()),
            (b"Proxy-Status", http1.proxy_status(PROXY_NAME, details="answered by kushi itself")),
        ]
        if not req.keep_alive:
            headers.append((b"Connection", b"close"))
        data = http1.serialize_response_head(status, b"", headers)
        if req.method != b"HEAD":
            data += body
        await self._drain_request_body(req)
        self.client.write(data)
        await self._client_drain()
        record.status = status
        record.bytes_out += len(data)
        return req.keep_alive

    async def answer_max_forwards(self, req: RequestHead, record: AccessRecord) -> bool:
        """RFC 9110 section 7.6.2: Max-Forwards 0 means this recipient answers."""
        if req.method == b"TRACE":
            body = (
                req.method
                + b" "
                + req.target
                + b" HTTP/1.1\r\n"
                + http1.serialize_headers(
                    (k, v)
                    for k, v in req.headers
                    if k.lower() not in (b"proxy-authorization", b"cookie")
                )
            )
            ctype = b"message/http"
        else:
            body = b""
            ctype = b"text/plain"
        headers = [
            (b"Content-Type", ctype),
            (b"Content-Length", str(len(body)).encode()),
            (b"Allow", b"GET, HEAD, POST, PUT, DELETE, OPTIONS, TRACE, PATCH, CONNECT"),
            (b"Proxy-Status", http1.proxy_status(PROXY_NAME, details="Max-Forwards reached 0")),
        ]
        await self._drain_request_body(req)
        data = http1.serialize_response_head(200, b"", headers) + body
        self.client.write(data)
        await self._client_drain()
        record.status = 200
        record.bytes_out += len(data)
        return req.keep_alive

    async def _drain_request_body(self, req: RequestHead) -> None:
        if req.framing.kind == "none":
            return
        reader = http1.body_reader(req.framing, RequestError)
        while True:
            event = await self._client_body_event(reader)
            if event is None:
                raise ClientGone()
            if isinstance(event, EndOfMessage):
                self._body_done = True
                return


#: RFC 9110 section 9.2.2: the methods a proxy may send again on its own.
IDEMPOTENT_METHODS = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})


class _StaleConnection(Exception):
    """A reused upstream connection was already closed by the server: retry on a new one."""


SELF_PAGE = """kushi: an HTTP proxy that bridges IPv4 and IPv6 ({pseudonym})

This address is a proxy, not a web site. Point your client at it:

  curl -x http://THIS-HOST:3128 http://example.com/
  curl -p -x http://THIS-HOST:3128 https://example.com/    (CONNECT tunnel)

or set it as the HTTP and HTTPS proxy in your browser or OS settings.
Every response carries a Proxy-Status header whose next-hop names the address kushi
connected to, and the access log records the family (ipv6, ipv4 or nat64) of each one.
"""
