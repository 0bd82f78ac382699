"""The state of one client connection's HTTP exchanges, without I/O: events in, commands out.

An ``Exchange`` is made per client connection of a forward or reverse listener. The I/O
shell (``proxy.HttpSession``) feeds it what happened -- bytes from the client or the
upstream, an end of stream, a deadline that fired, an upstream connected or failed, a
password checked, a tunnel ended -- and executes the commands it returns, in order:
send bytes, open, release or close the upstream, arm or cancel a named deadline, check a
password, start a tunnel, write the access record, close the client. Every decision
about an exchange is made here and nowhere else:

- the request head is found and parsed here (``http1``, strictly), then the allow list
  and authentication, the target (``forward``, ``reverse``, ``backends.FailOver``), the
  ``Via`` loop check and ``Max-Forwards``;
- body bytes already received are validated before the head goes upstream; the request
  body is re-framed on its way up, the response body on its way down, 1xx interim
  responses pass to HTTP/1.1 clients (``100-continue`` is the origin's to answer);
- which deadline is armed: ``header_read`` or ``idle`` for the next head,
  ``request_body_idle`` while the request body flows, ``upstream_header`` from the end
  of the request body to the final response head, ``response_body_idle`` while the
  response body flows (none of the idle ones while the other side holds us back);
- keep-alive and pipelining (the next request's bytes wait in ``buffer`` until this
  response is done), whether the upstream connection goes back to the pool, and the
  one retry of an idempotent request on a pooled connection the server had closed;
- the error answers (``http1.render_error``, with ``Proxy-Status``), or a cut connection
  once a response has begun;
- CONNECT and a 101 to an allowed ``Upgrade`` hand both connections to the tunnel, with
  the bytes already buffered on either side.

The shell tells the exchange which connection to read through ``reading_client`` and
``reading_upstream`` (flow control: nothing is read that cannot be passed on), and
reports write back-pressure as ``ClientPaused``/``UpstreamPaused`` events. The one clock
is the ``clock`` callable given at construction (wall time, for the access record).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, get_args

from kushi import forward, http1, reverse
from kushi.accesslog import AccessRecord
from kushi.acl import client_address, client_key
from kushi.backends import FailOver, proxy_header
from kushi.config import Timeouts
from kushi.connector import Upstream, describe_fallbacks
from kushi.errors import (
    ClientNotAllowed,
    ConnectionReadTimeout,
    ConnectionTerminated,
    KushiError,
    LoopDetected,
    ProxyAuthRequired,
    RequestError,
    RequestTimeout,
    ResponseIncomplete,
    ResponseTimeout,
    UpstreamError,
)
from kushi.http1 import Data, EndOfMessage, RequestHead, ResponseHead, Target
from kushi.routing import (
    ClientInfo,
    Route,
    downstream_response_headers,
    max_forwards,
    seen_via,
    upstream_request_headers,
)
from kushi.runtime import EgressChoice, ListenerState

log = logging.getLogger("kushi.proxy")
PROXY_NAME = "kushi"

#: RFC 9110 section 9.2.2: the methods a proxy may send again on its own.
IDEMPOTENT_METHODS = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})
#: How long a client may take to finish its request body after the response is complete
#: (an origin that answered early, e.g. 413), before both connections are closed.
BODY_FINISH_GRACE = 1.0

DeadlineName = Literal[
    "header_read",
    "idle",
    "request_body_idle",
    "upstream_header",
    "response_body_idle",
    "request_body_finish",
]


# --- events (what happened) --------------------------------------------------------------
#
# Events and commands are dataclasses (equality and repr for the playbook tests). Those
# made for every request have an ``__init__`` of their own and are not frozen: the
# ``__init__`` a dataclass generates stays interpreted in the mypyc-compiled form, and a
# frozen one sets each field through ``object.__setattr__``; a written one is compiled.
# Nothing changes an event or a command once it is made.


@dataclass(slots=True)
class ClientData:
    data: bytes

    def __init__(self, data: bytes) -> None:
        self.data = data


@dataclass(frozen=True, slots=True)
class ClientEnd:
    """The client sent end of stream (or its connection is gone) while being read."""


@dataclass(frozen=True, slots=True)
class ClientClosed:
    """The client connection is gone: nothing more can be sent to it."""


@dataclass(frozen=True, slots=True)
class ClientPaused:
    """The client stopped reading: its write buffer is full."""


@dataclass(frozen=True, slots=True)
class ClientResumed:
    pass


@dataclass(slots=True)
class UpstreamConnected:
    upstream: Upstream
    reused: bool

    def __init__(self, upstream: Upstream, reused: bool) -> None:
        self.upstream = upstream
        self.reused = reused


@dataclass(frozen=True, slots=True)
class UpstreamFailed:
    error: KushiError


@dataclass(slots=True)
class UpstreamData:
    data: bytes

    def __init__(self, data: bytes) -> None:
        self.data = data


@dataclass(frozen=True, slots=True)
class UpstreamEnd:
    """The upstream sent end of stream (or its connection is gone) while being read."""


@dataclass(frozen=True, slots=True)
class UpstreamLost:
    """The upstream connection is gone while it was not being read."""


@dataclass(frozen=True, slots=True)
class UpstreamPaused:
    pass


@dataclass(frozen=True, slots=True)
class UpstreamResumed:
    pass


@dataclass(frozen=True, slots=True)
class TimerFired:
    name: DeadlineName


@dataclass(slots=True)
class AuthChecked:
    user: str | None
    error: KushiError | None = None

    def __init__(self, user: str | None, error: KushiError | None = None) -> None:
        self.user = user
        self.error = error


@dataclass(frozen=True, slots=True)
class TunnelClosed:
    up: int  # bytes relayed client -> upstream
    down: int  # and back


@dataclass(frozen=True, slots=True)
class GraceExpired:
    """Shutdown's grace ran out while this connection was busy."""


Event = (
    ClientData
    | ClientEnd
    | ClientClosed
    | ClientPaused
    | ClientResumed
    | UpstreamConnected
    | UpstreamFailed
    | UpstreamData
    | UpstreamEnd
    | UpstreamLost
    | UpstreamPaused
    | UpstreamResumed
    | TimerFired
    | AuthChecked
    | TunnelClosed
    | GraceExpired
)


# --- commands (what the shell does) ------------------------------------------------------


@dataclass(slots=True)
class OpenUpstream:
    """Take a pooled connection under ``route.pool_key``, or connect; answer with
    ``UpstreamConnected`` or ``UpstreamFailed``. ``preamble`` is written first on a new
    connection (a PROXY header)."""

    state: ListenerState
    route: Route
    #: The policy and source address this request leaves with (its pool tag is in
    #: ``route.pool_key``).
    egress: EgressChoice
    preamble: bytes = b""

    def __init__(
        self, state: ListenerState, route: Route, egress: EgressChoice, preamble: bytes = b""
    ) -> None:
        self.state = state
        self.route = route
        self.egress = egress
        self.preamble = preamble


@dataclass(frozen=True, slots=True)
class OpenTunnel:
    """Connect for a CONNECT tunnel (``Services.open_tunnel``, as SOCKS5 does; never
    pooled); answer with ``UpstreamConnected`` or ``UpstreamFailed``."""

    state: ListenerState
    host: str
    port: int
    record: AccessRecord


@dataclass(slots=True)
class SendClient:
    data: bytes

    def __init__(self, data: bytes) -> None:
        self.data = data


@dataclass(slots=True)
class SendUpstream:
    data: bytes

    def __init__(self, data: bytes) -> None:
        self.data = data


@dataclass(slots=True)
class ReleaseUpstream:
    """Back to the pool, under ``key``: it may carry the next request for that target."""

    upstream: Upstream
    key: tuple[object, ...]

    def __init__(self, upstream: Upstream, key: tuple[object, ...]) -> None:
        self.upstream = upstream
        self.key = key


@dataclass(slots=True)
class CloseUpstream:
    upstream: Upstream
    abort: bool = False

    def __init__(self, upstream: Upstream, abort: bool = False) -> None:
        self.upstream = upstream
        self.abort = abort


@dataclass(frozen=True, slots=True)
class ArmDeadline:
    """Fire ``TimerFired(name)`` in ``seconds`` unless cancelled or re-armed first."""

    name: DeadlineName
    seconds: float


@dataclass(frozen=True, slots=True)
class CancelDeadline:
    name: DeadlineName


@dataclass(slots=True)
class CheckAuth:
    """Check ``header`` against the snapshot's password file; answer ``AuthChecked``."""

    state: ListenerState
    header: bytes | None
    client: str

    def __init__(self, state: ListenerState, header: bytes | None, client: str) -> None:
        self.state = state
        self.header = header
        self.client = client


@dataclass(frozen=True, slots=True)
class StartTunnel:
    """Relay bytes both ways until both ends are done; answer ``TunnelClosed``. The bytes
    already buffered go first: ``to_upstream`` from the client, ``to_client`` from the
    upstream."""

    upstream: Upstream
    record: AccessRecord
    to_upstream: bytes = b""
    to_client: bytes = b""


@dataclass(slots=True)
class WriteLog:
    """The request is done: log ``record`` under the snapshot it started with (and let go
    of that snapshot)."""

    state: ListenerState
    record: AccessRecord
    #: Client bytes received but not part of this request (the next one's, pipelined).
    unused: int = 0

    def __init__(self, state: ListenerState, record: AccessRecord, unused: int = 0) -> None:
        self.state = state
        self.record = record
        self.unused = unused


@dataclass(slots=True)
class CloseClient:
    """The connection is done: ``eof`` half-closes first (an error answer was the last
    word), ``abort`` resets it (a response was cut short); else it is simply closed."""

    eof: bool = False
    abort: bool = False

    def __init__(self, eof: bool = False, abort: bool = False) -> None:
        self.eof = eof
        self.abort = abort


Command = (
    OpenUpstream
    | OpenTunnel
    | SendClient
    | SendUpstream
    | ReleaseUpstream
    | CloseUpstream
    | ArmDeadline
    | CancelDeadline
    | CheckAuth
    | StartTunnel
    | WriteLog
    | CloseClient
)

_CANCELS: dict[DeadlineName, CancelDeadline] = {
    name: CancelDeadline(name) for name in get_args(DeadlineName)
}

Phase = Literal["head", "auth", "connect", "exchange", "drain", "tunnel", "closed"]


class _ClientGone(Exception):
    """The client closed its connection; nothing more can be sent to it."""


class Exchange:
    """One client connection's exchanges: see the module docstring."""

    def __init__(
        self,
        *,
        listener: str,
        client: ClientInfo,
        snapshot: Callable[[], ListenerState],
        pseudonym: str,
        serial: int,
        clock: Callable[[], float],
        stopping: Callable[[], bool] = lambda: False,
    ) -> None:
        self.listener = listener
        self.client = client
        self.snapshot = snapshot
        self.pseudonym = pseudonym
        self.serial = serial
        self.clock = clock
        self.stopping = stopping
        self.client_ip = client_address(client.address)
        self._client_key = ""  # (acl.client_key, for the password check: made once)
        #: Client bytes received and not yet used (a partial head, pipelined requests).
        self.buffer = bytearray()
        self.phase: Phase = "head"
        self._out: list[Command] = []
        self._first = True
        #: The snapshot the allow list was last checked under, and what it answered.
        self._acl: tuple[ListenerState, str] | None = None
        self._client_paused = False
        self._upstream_paused = False
        self._state = snapshot()
        self._head_deadline: DeadlineName = "header_read"
        self._started = 0.0
        self._pipelined = False
        self._arms: dict[DeadlineName, ArmDeadline] = {}
        self._arms_for: ListenerState | None = None
        # Per request, set where they are first needed (and read only after that):
        self._reused = False  # the upstream came from the pool
        self._upgrade = False  # the request's Upgrade was passed on
        self._up_head = b""  # the request head as it goes upstream
        self._up_received = 0  # bytes from the upstream for this request
        self._req_reader: http1.BodyReader | None = None
        self._req_chunked = False
        self._out_chunked = False  # the response is chunked towards the client
        self._client_keep = False  # the client connection stays open after it
        self._local_answer = b""  # an answer of kushi's own, sent after the body
        self._local_keep = False
        #: Upstream bytes received and not yet used.
        self._ubuf = bytearray()
        self._reset_request()

    def _reset_request(self) -> None:
        self.req: RequestHead | None = None
        self.record: AccessRecord | None = None
        self.upstream: Upstream | None = None
        self._route: Route | None = None
        self._route_egress: EgressChoice | None = None
        self._failover: FailOver | None = None
        self._attempt = 0
        self._body_done = True
        self._resp: ResponseHead | None = None
        self._resp_reader: http1.BodyReader | None = None
        self._resp_done = False
        self._up_ended = False
        self._finish_waiting = False

    # --- what the shell reads ------------------------------------------------------------

    @property
    def reading_client(self) -> bool:
        """The next client bytes can be used now (a head, or a body that can go on)."""
        phase = self.phase
        if phase == "head" or phase == "drain":
            return True
        return phase == "exchange" and not self._body_done and not self._upstream_paused

    @property
    def reading_upstream(self) -> bool:
        return (
            self.phase == "exchange"
            and self.upstream is not None
            and not self._resp_done
            and not self._client_paused
        )

    @property
    def idle(self) -> bool:
        """Waiting for a request with nothing of it received (shutdown may close it)."""
        return self.phase == "head" and not self.buffer

    # --- driving it ----------------------------------------------------------------------

    def start(self) -> list[Command]:
        """The commands before the first event: the header-read deadline."""
        self._next_request()
        return self.receive_pending()

    def receive_pending(self) -> list[Command]:
        while self._pipelined:
            self._pipelined = False
            self._guarded(None)
        return self._take()

    def receive(self, event: Event) -> list[Command]:
        """Feed one event; returns the commands to execute, in order."""
        try:
            if self.phase == "closed":
                self._after_close(event)
            else:
                _ON_EVENT[type(event)](self, event)
        except KushiError as exc:
            self._fail(exc)
        except _ClientGone:
            self._client_gone()
        except Exception as exc:  # never a traceback to the client
            log.exception("internal error handling %s", self.record.target if self.record else "-")
            self._fail(KushiError(f"internal error: {type(exc).__name__}"))
        while self._pipelined:
            # The next request is already buffered (pipelining): its head now.
            self._pipelined = False
            self._guarded(None)
        out = self._out
        self._out = []
        return out

    def _guarded(self, event: Event | None) -> None:
        try:
            if event is None:
                self._head_data(b"")
            elif self.phase == "closed":
                self._after_close(event)
            else:
                _ON_EVENT[type(event)](self, event)
        except KushiError as exc:
            self._fail(exc)
        except _ClientGone:
            self._client_gone()
        except Exception as exc:  # never a traceback to the client
            log.exception("internal error handling %s", self.record.target if self.record else "-")
            self._fail(KushiError(f"internal error: {type(exc).__name__}"))

    def _take(self) -> list[Command]:
        out, self._out = self._out, []
        return out

    def _after_close(self, event: Event) -> None:
        """The connection is done: an upstream that connected meanwhile is let go."""
        if type(event) is UpstreamConnected:
            self._out.append(CloseUpstream(event.upstream, abort=True))

    def _on_client_data(self, event: ClientData) -> None:
        phase = self.phase
        if phase == "head":
            self._head_data(event.data)
        elif phase == "exchange" or phase == "drain":
            self._request_body(event.data)
        else:
            self.buffer += event.data

    def _on_upstream_data(self, event: UpstreamData) -> None:
        if self.upstream is not None and self.phase == "exchange":
            self._upstream_data(event.data)

    def _on_timer(self, event: TimerFired) -> None:
        self._timer(event.name)

    def _on_connected(self, event: UpstreamConnected) -> None:
        self._connected(event.upstream, event.reused)

    def _on_failed(self, event: UpstreamFailed) -> None:
        self._connect_failed(event.error)

    def _on_auth(self, event: AuthChecked) -> None:
        self._auth_checked(event.user, event.error)

    def _on_tunnel_closed(self, event: TunnelClosed) -> None:
        self._tunnel_closed(event.up, event.down)

    def _on_client_paused(self, event: ClientPaused) -> None:
        self._client_paused = True
        if self.phase == "exchange" and self._resp is not None and not self._resp_done:
            self._cancel("response_body_idle")

    def _on_client_resumed(self, event: ClientResumed) -> None:
        self._client_paused = False
        if self.phase == "exchange" and self._resp is not None and not self._resp_done:
            self._arm("response_body_idle")
        if self._finish_waiting:
            self._finish_waiting = False
            self._finish(True)

    def _on_upstream_paused(self, event: UpstreamPaused) -> None:
        self._upstream_paused = True
        if self.phase == "exchange" and not self._body_done:
            self._cancel("request_body_idle")

    def _on_upstream_resumed(self, event: UpstreamResumed) -> None:
        self._upstream_paused = False
        if self.phase == "exchange" and not self._body_done:
            self._arm("request_body_idle")

    # --- deadlines -----------------------------------------------------------------------

    def _arm(self, name: DeadlineName) -> None:
        """Arm ``name`` for the time the request's snapshot gives it (0: never)."""
        if self._arms_for is not self._state:
            self._arms = _arms(self._state.config.timeouts)
            self._arms_for = self._state
        cmd = self._arms.get(name)
        if cmd is not None:
            self._out.append(cmd)

    def _cancel(self, name: DeadlineName) -> None:
        self._out.append(_CANCELS[name])

    def _timer(self, name: DeadlineName) -> None:
        timeouts = self._state.config.timeouts
        phase = self.phase
        if name == "header_read" or name == "idle":
            if phase != "head":
                return
            if not self.buffer:
                self._close_client()
                return
            timeout = timeouts.header_read if name == "header_read" else timeouts.idle
            self._begin_record()
            raise RequestTimeout(
                f"request head not complete within {timeout:g} s (timeouts.{name})"
            )
        if phase != "exchange" and phase != "drain":
            return
        if name == "request_body_idle" and not self._body_done:
            idle = timeouts.request_body_idle
            raise RequestTimeout(
                f"no byte of the request body for {idle:g} s (timeouts.request_body_idle)"
            )
        upstream = self.upstream
        if upstream is None:
            return
        if name == "upstream_header" and self._resp is None:
            raise ResponseTimeout(
                f"upstream {upstream.next_hop} sent no response head within "
                f"{timeouts.upstream_header:g} s (timeouts.upstream_header)"
            )
        if name == "response_body_idle" and self._resp is not None and not self._resp_done:
            idle = timeouts.response_body_idle
            raise ConnectionReadTimeout(
                f"upstream {upstream.next_hop} sent no byte of the response body for "
                f"{idle:g} s (timeouts.response_body_idle)"
            )
        if name == "request_body_finish" and self._resp_done:
            self._finish(False)

    # --- the request head ----------------------------------------------------------------

    def _next_request(self) -> None:
        """Between requests: the next one's head is read under the limits and timeouts in
        force now (a reload applies to the next request of a kept-alive connection)."""
        self._reset_request()
        self.phase = "head"
        self._state = self.snapshot()
        if self.stopping() and not self.buffer:
            self._close_client()
            return
        if self._first or self.buffer:
            self._head_deadline = "header_read"
            self._arm("header_read")
        else:
            self._head_deadline = "idle"
            self._arm("idle")
        # A pipelined request began when the one before it ended; a kept-alive one with
        # its first byte (Squid's duration).
        self._started = self.clock() if self.buffer else 0.0
        self._pipelined = bool(self.buffer)

    def _head_data(self, data: bytes) -> None:
        buf = self.buffer
        limits = self._state.config.limits
        try:
            if data and not buf:
                # The usual case: a whole head arrives into an empty buffer (no copy).
                if not self._started:
                    self._started = self.clock()
                end = http1.find_head_end(data, limits.max_request_line, limits.max_header_bytes)
                if end < 0:
                    buf += data
                    return
                if end == len(data):
                    head = data
                else:
                    head = data[:end]
                    buf += data[end:]
            else:
                buf += data
                end = http1.find_head_end(buf, limits.max_request_line, limits.max_header_bytes)
                if end < 0:
                    return
                head = bytes(buf[:end])
                del buf[:end]
        except KushiError:
            self._cancel(self._head_deadline)
            self._begin_record()
            raise
        self._cancel(self._head_deadline)
        self._first = False
        # The request's snapshot of the runtime (ACL, egress, limits, timeouts, log),
        # taken once when its head is complete and used throughout.
        self._state = state = self.snapshot()
        record = self._begin_record()
        req = http1.parse_request_head(head)
        self.req = req
        record.method = req.method.decode("ascii", "replace")
        record.target = req.target.decode("ascii", "replace")[:2048]
        self._body_done = req.framing.kind == "none"
        self._authorize(req, state)

    def _begin_record(self) -> AccessRecord:
        if self.record is None:
            state = self._state
            state.hold()
            self.record = AccessRecord(
                time=self._started or self.clock(),
                listener=self.listener,
                mode=state.cfg.mode,
                client=self.client.address,
                tls=self.client.tls,
            )
        return self.record

    def _authorize(self, req: RequestHead, state: ListenerState) -> None:
        """The allow list and proxy authentication, combined as ``auth_combine`` says."""
        acl = self._acl
        if acl is None or acl[0] is not state or state.allow.names:
            acl = self._acl = (state, state.admission(state.allow.allows(self.client_ip)))
        need = acl[1]
        if need == "deny":
            raise ClientNotAllowed(
                f"client {self.client.address} is not in this listener's allow list"
            )
        if need == "admit" or state.auth is None:
            self._route_request(req, state)
            return
        self.phase = "auth"
        if not self._client_key:
            self._client_key = client_key(self.client.address)
        self._out.append(CheckAuth(state, req.get(b"proxy-authorization"), self._client_key))

    def _auth_checked(self, user: str | None, error: KushiError | None) -> None:
        if self.phase != "auth" or self.req is None:
            return
        if error is not None:
            raise error
        if user is None:
            raise ProxyAuthRequired("proxy authentication required (Basic)")
        assert self.record is not None
        self.record.user = user
        self._route_request(self.req, self._state)

    def _route_request(self, req: RequestHead, state: ListenerState) -> None:
        target = http1.parse_target(req.method, req.target)
        if seen_via(req, self.pseudonym):
            raise LoopDetected("this request has already passed through this kushi (Via)")
        cfg = state.cfg
        if cfg.mode == "forward":
            if target.form == "authority":
                self._connect_tunnel(target, state)
                return
            if target.form != "absolute":
                self._self_page(req)
                return
            egress = self._egress(state)
            self._forward(req, forward.route(target, cfg, egress.pool_tag), state, egress)
            return
        reverse.check_target(target)
        self._failover = FailOver(state.backends)
        self._forward_reverse(req, target, state)

    def _forward_reverse(self, req: RequestHead, target: Target, state: ListenerState) -> None:
        assert self._failover is not None
        backend = self._failover.next()  # raises the last failure when none is left
        egress = self._egress(state)
        route = reverse.route(req, target, backend, state.cfg, egress.pool_tag, self.serial)
        self._forward(req, route, state, egress)

    def _egress(self, state: ListenerState) -> EgressChoice:
        """This request's policy and source: the listener's, or its user's ``[users.NAME]``."""
        user = self.record.user if self.record is not None else ""
        return state.egress(self.client.address, user, self.serial)

    # --- forwarding a request ------------------------------------------------------------

    def _forward(
        self, req: RequestHead, route: Route, state: ListenerState, egress: EgressChoice
    ) -> None:
        if max_forwards(req) == 0:
            self._answer_max_forwards(req)
            return
        self._upgrade = forward.upgrade_allowed(req, route.port, state.cfg)
        headers = upstream_request_headers(
            req,
            host=route.host_header,
            pseudonym=self.pseudonym,
            reverse=self.client if state.cfg.mode != "forward" else None,
            keep_upgrade=self._upgrade,
        )
        framing = req.framing.kind
        if framing == "chunked":
            headers.append((b"Transfer-Encoding", b", ".join((*req.codings, b"chunked"))))
        elif framing == "length":
            headers.append((b"Content-Length", str(req.framing.length).encode()))
        elif req.method in (b"POST", b"PUT", b"PATCH"):
            headers.append((b"Content-Length", b"0"))
        self._up_head = http1.serialize_request_head(req.method, route.path, headers)
        # Body bytes already here are validated first: a request whose chunking is already
        # known to be bad never reaches the origin.
        http1.check_buffered_body(req.framing, self.buffer)
        self._route, self._route_egress = route, egress
        self._open(route, state, egress)

    def _open(self, route: Route, state: ListenerState, egress: EgressChoice) -> None:
        self.phase = "connect"
        preamble = b""
        if state.cfg.mode != "forward":
            preamble = proxy_header(state.cfg.backend_proxy_protocol, self.client)
        self._out.append(OpenUpstream(state, route, egress, preamble))

    def _connect_failed(self, error: KushiError) -> None:
        if self.phase != "connect":
            return
        if self._failover is not None and self._failover.failed(error):
            assert self.req is not None
            target = http1.parse_target(self.req.method, self.req.target)
            self._forward_reverse(self.req, target, self._state)
            return
        raise error

    def _connected(self, upstream: Upstream, reused: bool) -> None:
        if self.phase != "connect":
            self._out.append(CloseUpstream(upstream, abort=True))
            return
        if self._failover is not None:
            self._failover.connected()
        req, record = self.req, self.record
        assert req is not None and record is not None
        self.upstream = upstream
        self._reused = reused
        record.upstream = upstream.next_hop
        record.family = upstream.family
        record.source = upstream.source
        record.notes = upstream.report_notes
        # A pooled connection's attempts belong to the request that opened it (the
        # record's own are none, its connect time 0).
        if not reused:
            record.attempts = [a.describe() for a in upstream.fallbacks]
            record.connect_ms = round(upstream.connect_time * 1000, 3)
        if self._route is None:  # CONNECT
            self._tunnel_established(upstream, record)
            return
        self.phase = "exchange"
        self._up_received = 0
        if self._ubuf:
            self._ubuf = bytearray()  # (a retry: nothing of the stale connection stays)
        self._out.append(SendUpstream(self._up_head))
        if req.framing.kind == "none":
            self._body_done = True
            self._arm("upstream_header")
            return
        self._body_done = False
        self._req_reader = http1.body_reader(req.framing, RequestError)
        self._req_chunked = req.framing.kind == "chunked"
        self._arm("request_body_idle")
        if self.buffer:
            self._request_body(b"")

    # --- the request body ----------------------------------------------------------------

    def _request_body(self, data: bytes) -> None:
        if self._body_done:
            self.buffer += data
            return
        reader = self._req_reader
        assert reader is not None
        buf = self.buffer
        sending = self.phase == "exchange"
        chunked = self._req_chunked
        out = self._out
        if (
            data
            and not buf
            and type(reader) is http1.ContentLengthReader
            and 0 < len(data) <= reader.remaining
        ):
            reader.remaining -= len(data)
            if sending:
                out.append(SendUpstream(data))
            data = b""
        else:
            buf += data
        while True:
            event = reader.read(buf)
            if event is None:
                break
            if type(event) is Data:
                if sending and event.data:
                    out.append(
                        SendUpstream(http1.encode_chunk(event.data) if chunked else event.data)
                    )
                continue
            assert isinstance(event, EndOfMessage)
            if sending and chunked:
                trailers = [(k, v) for k, v in event.trailers if k.lower() not in http1.HOP_BY_HOP]
                out.append(SendUpstream(http1.encode_last_chunk(trailers)))
            self._body_complete()
            return
        # The body's idle deadline restarts with every byte.
        self._arm("request_body_idle")

    def _body_complete(self) -> None:
        self._body_done = True
        self._cancel("request_body_idle")
        if self.phase == "drain":
            self._send_local_answer()
            return
        if self._resp is None:
            # The response head's deadline starts only now: a slow upload is not cut by it.
            self._arm("upstream_header")
        elif self._resp_done:
            self._cancel("request_body_finish")
            self._finish(True)

    # --- the response --------------------------------------------------------------------

    def _upstream_data(self, data: bytes) -> None:
        self._up_received += len(data)
        if self._resp is None:
            if self._ubuf:
                self._ubuf += data
                data = b""
            if not self._response_head(data) or self.phase != "exchange":
                return
            data = b""
        self._response_body(data)

    def _response_head(self, data: bytes = b"") -> bool:
        """The response head from ``_ubuf``, or from ``data`` when it is empty (the usual
        case: the head, and often the whole body, in one read, parsed without a copy).
        True when a body follows it (``_response_body`` goes on); False when the head is
        not all here yet, or the response is already done or became a tunnel."""
        req, record, upstream = self.req, self.record, self.upstream
        assert req is not None and record is not None and upstream is not None
        limits = self._state.config.limits
        ubuf = self._ubuf
        tail = b""  # (the bytes after a head parsed from ``data``; ``ubuf`` is empty)
        while True:
            if data:
                end = http1.find_head_end(
                    data, limits.max_request_line, limits.max_header_bytes, response=True
                )
                if end < 0:
                    ubuf += data
                    return False
                head = data if end == len(data) else data[:end]
                tail = data[end:]
                data = b""
            else:
                if tail:
                    ubuf += tail
                    tail = b""
                end = http1.find_head_end(
                    ubuf, limits.max_request_line, limits.max_header_bytes, response=True
                )
                if end < 0:
                    return False
                head = bytes(ubuf[:end])
                del ubuf[:end]
            resp = http1.parse_response_head(head, req.method)
            if resp.status >= 200 or resp.status == 101:
                break
            # 1xx interim responses (100 Continue, 103 Early Hints) go to 1.1 clients.
            if req.version == (1, 1):
                headers = downstream_response_headers(
                    resp,
                    pseudonym=self.pseudonym,
                    proxy_status=self._status_value(upstream, resp.status),
                )
                self._out.append(
                    SendClient(http1.serialize_response_head(resp.status, resp.reason, headers))
                )
        self._cancel("upstream_header")
        self._resp = resp
        n = resp.framing.length
        if tail and not (resp.framing.kind == "length" and len(tail) >= n and resp.status != 101):
            ubuf += tail  # (anything but a whole length-framed body goes on from ``ubuf``)
            tail = b""
        record.status = resp.status
        ctype = resp.get(b"content-type")
        record.content_type = ctype.decode("latin-1").split(";")[0] if ctype else ""
        status_value = self._status_value(upstream, resp.status)
        switching = resp.status == 101 and self._upgrade
        headers = downstream_response_headers(
            resp, pseudonym=self.pseudonym, proxy_status=status_value, keep_upgrade=switching
        )
        if switching:
            headers.append((b"Connection", b"upgrade"))
            out_head = http1.serialize_response_head(101, resp.reason, headers)
            self._out.append(SendClient(out_head))
            record.bytes_out += len(out_head)
            # The upstream's first bytes after its 101 came with the head: they are part
            # of what the tunnel carries to the client.
            pending = bytes(ubuf)
            ubuf.clear()
            record.bytes_out += len(pending)
            self._start_tunnel(upstream, record, pending)
            return False
        if resp.status == 101:
            raise UpstreamError("upstream switched protocols without an upgrade request")
        client_11 = req.version == (1, 1)
        framing = resp.framing.kind
        if framing == "none":
            out_framing = "none"
            if (req.method == b"HEAD" or resp.status == 304) and resp.get(b"content-length"):
                headers.append((b"Content-Length", resp.get(b"content-length") or b"0"))
            elif resp.status not in (204, 304) and req.method != b"HEAD":
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
        self._out_chunked = out_framing == "chunked"
        keep = req.keep_alive and out_framing != "close" and not self.stopping()
        self._client_keep = keep
        if not keep:
            headers.append((b"Connection", b"close"))
        elif not client_11:
            headers.append((b"Connection", b"keep-alive"))
        out_head = http1.serialize_response_head(resp.status, resp.reason, headers)
        record.bytes_out += len(out_head)
        if framing == "none":
            self._out.append(SendClient(out_head))
            self._response_done()
            return False
        if tail:
            # The whole body came with the head (small responses): one write, one segment.
            if len(tail) == n:
                body = tail
            else:
                body = tail[:n]
                ubuf += tail[n:]
            self._out.append(SendClient(out_head + body))
            record.bytes_out += n
            self._response_done()
            return False
        if framing == "length" and len(ubuf) >= n:
            # The whole body is already here (small responses): one write, one segment.
            body = bytes(ubuf[:n])
            del ubuf[:n]
            self._out.append(SendClient(out_head + body))
            record.bytes_out += n
            self._response_done()
            return False
        self._out.append(SendClient(out_head))
        self._resp_reader = http1.body_reader(resp.framing, UpstreamError)
        self._arm("response_body_idle")
        return True

    def _response_body(self, data: bytes) -> None:
        reader = self._resp_reader
        record = self.record
        assert reader is not None and record is not None
        out = self._out
        ubuf = self._ubuf
        chunked = self._out_chunked
        kind = type(reader)
        if data and not ubuf and kind is not http1.ChunkedReader:
            if kind is http1.UntilCloseReader:
                events: list[http1.BodyEvent] = [Data(data)]
            else:
                assert isinstance(reader, http1.ContentLengthReader)
                n = min(len(data), reader.remaining)
                reader.remaining -= n
                events = [Data(data if n == len(data) else data[:n])]
                if n < len(data):
                    ubuf += data[n:]
                if not reader.remaining:
                    events.append(EndOfMessage())
            data = b""
        else:
            if data:
                ubuf += data
            events = []
            while True:
                event = reader.read(ubuf)
                if event is None:
                    break
                events.append(event)
                if type(event) is EndOfMessage:
                    break
        for event in events:
            if type(event) is Data:
                assert isinstance(event, Data)
                piece = http1.encode_chunk(event.data) if chunked else event.data
                if piece:
                    out.append(SendClient(piece))
                    record.bytes_out += len(piece)
                continue
            assert isinstance(event, EndOfMessage)
            if chunked:
                trailers = [(k, v) for k, v in event.trailers if k.lower() not in http1.HOP_BY_HOP]
                piece = http1.encode_last_chunk(trailers)
                out.append(SendClient(piece))
                record.bytes_out += len(piece)
            self._response_done()
            return
        self._arm("response_body_idle")

    def _response_done(self) -> None:
        self._resp_done = True
        if self._resp_reader is not None:
            self._cancel("response_body_idle")
        if self._body_done:
            if self._client_paused:
                # The last of the response is still queued for the client: the request
                # ends (and is logged) when it has gone.
                self._finish_waiting = True
                return
            self._finish(True)
            return
        # The upstream answered before reading the whole body (e.g. 413): give the client
        # a moment to finish; otherwise close both connections.
        self._arm("request_body_finish")

    def _upstream_end(self) -> None:
        upstream, req = self.upstream, self.req
        if self.phase != "exchange" or upstream is None or req is None:
            return
        self._up_ended = True
        if self._resp is None:
            if self._ubuf.strip(b"\r\n"):
                raise ResponseIncomplete("upstream closed the connection inside the response head")
            if not self._up_received and self._may_retry(req):
                self._retry(upstream)
                return
            if self._reused and not self._up_received:
                raise ConnectionTerminated("upstream closed the connection")
            raise ConnectionTerminated(
                f"upstream {upstream.next_hop} closed the connection without a response"
            )
        if self._resp_done:
            return
        reader = self._resp_reader
        assert reader is not None
        reader.eof()  # raises ResponseIncomplete if the body was cut short
        if self._out_chunked:
            record = self.record
            assert record is not None
            piece = http1.encode_last_chunk()
            self._out.append(SendClient(piece))
            record.bytes_out += len(piece)
        self._response_done()

    def _may_retry(self, req: RequestHead) -> bool:
        """Retry once on a fresh connection only when nothing of the request can have been
        consumed: a pooled connection the server had closed, not one byte of a response,
        no body, and an idempotent method (RFC 9110 section 9.2.2)."""
        return (
            self._reused
            and self._attempt == 0
            and req.framing.kind == "none"
            and req.method in IDEMPOTENT_METHODS
        )

    def _retry(self, upstream: Upstream) -> None:
        self._out.append(CloseUpstream(upstream, abort=True))
        self._cancel("upstream_header")
        self.upstream = None
        self._attempt += 1
        assert self._route is not None and self._route_egress is not None
        self._open(self._route, self._state, self._route_egress)

    def _upstream_lost(self) -> None:
        """The upstream went away while not being read: after its response, during the
        client's last body bytes; the request body cannot complete."""
        if self.phase == "exchange" and self._resp_done and not self._body_done:
            self._finish(False)

    def _finish(self, body_complete: bool) -> None:
        """The response is done: the upstream goes back to the pool if it can carry
        another request, the record is written, and the next request may start."""
        upstream, resp = self.upstream, self._resp
        assert resp is not None and upstream is not None
        reusable = (
            resp.keep_alive
            and resp.framing.kind != "close"
            and body_complete
            and not self._up_ended
            and self._route is not None
            # Bytes beyond the response: whatever they are, the connection is not clean.
            and not self._ubuf
        )
        if reusable:
            assert self._route is not None
            self._out.append(ReleaseUpstream(upstream, self._route.pool_key))
        else:
            self._out.append(CloseUpstream(upstream))
        self.upstream = None
        keep = self._client_keep and body_complete
        self._end_request()
        if keep:
            self._next_request()
        else:
            self._close_client()

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

    # --- CONNECT and upgrades ------------------------------------------------------------

    def _connect_tunnel(self, target: Target, state: ListenerState) -> None:
        forward.check_connect_port(target.port, state.cfg.connect_ports, "CONNECT")
        self.phase = "connect"
        assert self.record is not None
        self._out.append(OpenTunnel(state, target.host, target.port, self.record))

    def _tunnel_established(self, upstream: Upstream, record: AccessRecord) -> None:
        record.status = 200
        head = http1.serialize_response_head(
            200, b"Connection established", [(b"Proxy-Status", self._status_value(upstream, None))]
        )
        self._out.append(SendClient(head))
        record.bytes_out += len(head)
        self._start_tunnel(upstream, record, b"")

    def _start_tunnel(self, upstream: Upstream, record: AccessRecord, to_client: bytes) -> None:
        # Bytes the client sent after its head go first.
        to_upstream = bytes(self.buffer)
        self.buffer.clear()
        self.phase = "tunnel"
        self.upstream = upstream
        self._out.append(StartTunnel(upstream, record, to_upstream, to_client))

    def _tunnel_closed(self, up: int, down: int) -> None:
        if self.phase != "tunnel":
            return
        record, upstream = self.record, self.upstream
        assert record is not None and upstream is not None
        record.bytes_out += down
        self._out.append(CloseUpstream(upstream))
        self.upstream = None
        self._end_request()
        self._close_client(eof=False)

    # --- answered by kushi itself --------------------------------------------------------

    def _self_page(self, req: RequestHead) -> None:
        body = SELF_PAGE.format(pseudonym=self.pseudonym).encode()
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
        self._answer_locally(req, status, data)

    def _answer_max_forwards(self, req: RequestHead) -> None:
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
        self._answer_locally(req, 200, http1.serialize_response_head(200, b"", headers) + body)

    def _answer_locally(self, req: RequestHead, status: int, data: bytes) -> None:
        """Answer after reading (and dropping) the request body."""
        assert self.record is not None
        self.record.status = status
        self._local_answer = data
        self._local_keep = req.keep_alive
        if req.framing.kind == "none":
            self._send_local_answer()
            return
        self.phase = "drain"
        self._body_done = False
        self._req_reader = http1.body_reader(req.framing, RequestError)
        self._arm("request_body_idle")
        if self.buffer:
            self._request_body(b"")

    def _send_local_answer(self) -> None:
        record = self.record
        assert record is not None
        self._out.append(SendClient(self._local_answer))
        record.bytes_out += len(self._local_answer)
        self._end_request()
        if self._local_keep:
            self._next_request()
        else:
            self._close_client()

    # --- endings -------------------------------------------------------------------------

    def _end_request(self) -> None:
        record = self.record
        if record is None:
            return
        record.duration = self.clock() - record.time
        self._out.append(WriteLog(self._state, record, len(self.buffer)))
        self.record = None

    def _close_client(self, *, eof: bool = False, abort: bool = False) -> None:
        # (Every deadline ends with the connection.)
        self.phase = "closed"
        self._out.append(CloseClient(eof=eof, abort=abort))

    def _drop_upstream(self) -> None:
        upstream, self.upstream = self.upstream, None
        if upstream is not None:
            self._out.append(CloseUpstream(upstream, abort=True))

    def _fail(self, exc: KushiError) -> None:
        """The one error path: answer with ``http1.render_error`` (with Proxy-Status) if
        nothing of a response went out yet, else cut the connection."""
        if self.phase == "closed":
            return
        record = self._begin_record()
        req = self.req
        next_hop = self.upstream.next_hop if self.upstream is not None else None
        source = (self.upstream.source or None) if self.upstream is not None else None
        self._drop_upstream()
        if not record.bytes_out:
            record.status = exc.status  # (once a head went out, its status is what was sent)
        record.error = exc.error_type
        record.details = exc.details
        record.attempts = record.attempts or list(exc.attempts)
        if record.bytes_out:
            # The response had started: the only honest signal left is to cut the connection.
            self._end_request()
            self._close_client(abort=True)
            return
        close = (
            exc.close
            or req is None
            or not req.keep_alive
            or self.phase == "tunnel"
            # An unread request body makes the connection unusable for the next request.
            or (req.framing.kind != "none" and (not self._body_done or bool(self.buffer)))
        )
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
            source=source,
        )
        self._out.append(SendClient(data))
        record.bytes_out += len(data)
        self._end_request()
        if close:
            self._close_client(eof=True)
        else:
            self._next_request()

    def _client_end(self) -> None:
        phase = self.phase
        if phase == "head":
            if self.buffer.strip(b"\r\n"):
                self._cancel(self._head_deadline)
                self._begin_record()
                raise RequestError("connection closed inside the request head")
            self._close_client()
            return
        if (phase == "exchange" or phase == "drain") and not self._body_done:
            # The client left mid-upload: the upstream must not take a partial body.
            raise _ClientGone()

    def _client_closed(self) -> None:
        if self.phase == "head" and self.record is None:
            self._close_client()
            return
        raise _ClientGone()

    def _client_gone(self) -> None:
        if self.phase == "closed":
            return
        self._drop_upstream()
        if self.record is not None:
            self.record.error = self.record.error or "client_closed"
            self.record.aborted = True
        self._end_request()
        self._close_client()

    def _grace_expired(self) -> None:
        """Shutdown's grace ran out while this request or tunnel was in flight."""
        if self.phase == "closed":
            return
        self._drop_upstream()
        if self.record is not None:
            self.record.error = self.record.error or "shutdown"
            self.record.aborted = True
        self._end_request()
        self._close_client(abort=True)


#: Which method of an exchange takes which event (one table for every exchange).
_ON_EVENT: dict[type, Callable[[Exchange, Any], None]] = {
    ClientData: Exchange._on_client_data,
    UpstreamData: Exchange._on_upstream_data,
    TimerFired: Exchange._on_timer,
    UpstreamConnected: Exchange._on_connected,
    UpstreamFailed: Exchange._on_failed,
    AuthChecked: Exchange._on_auth,
    TunnelClosed: Exchange._on_tunnel_closed,
    ClientPaused: Exchange._on_client_paused,
    ClientResumed: Exchange._on_client_resumed,
    UpstreamPaused: Exchange._on_upstream_paused,
    UpstreamResumed: Exchange._on_upstream_resumed,
    UpstreamEnd: lambda x, _: x._upstream_end(),
    UpstreamLost: lambda x, _: x._upstream_lost(),
    ClientEnd: lambda x, _: x._client_end(),
    ClientClosed: lambda x, _: x._client_closed(),
    GraceExpired: lambda x, _: x._grace_expired(),
}

#: The deadline commands for each set of timeouts (commands are not changed once made,
#: so every exchange under one snapshot's timeouts shares them; a reload adds a set).
_ARMS: dict[Timeouts, dict[DeadlineName, ArmDeadline]] = {}


def _arms(t: Timeouts) -> dict[DeadlineName, ArmDeadline]:
    arms = _ARMS.get(t)
    if arms is None:
        if len(_ARMS) >= 16:
            _ARMS.clear()
        seconds: dict[DeadlineName, float] = {
            "header_read": t.header_read,
            "idle": t.idle,
            "request_body_idle": t.request_body_idle,
            "upstream_header": t.upstream_header,
            "response_body_idle": t.response_body_idle,
            "request_body_finish": BODY_FINISH_GRACE,
        }
        arms = _ARMS[t] = {k: ArmDeadline(k, v) for k, v in seconds.items() if v}
    return arms


SELF_PAGE = """kushi: an HTTP proxy that bridges IPv4 and IPv6 ({pseudonym})

This address is a proxy, not a web site. Point your client at it:

  curl -x http://THIS-HOST:3128 http://example.com/
  curl -p -x http://THIS-HOST:3128 https://example.com/    (CONNECT tunnel)

or set it as the HTTP and HTTPS proxy in your browser or OS settings.
Every response carries a Proxy-Status header whose next-hop names the address kushi
connected to, and the access log records the family (ipv6, ipv4 or nat64) of each one.
"""
