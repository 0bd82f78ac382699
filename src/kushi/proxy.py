"""The I/O shell of the HTTP handler shared by forward and reverse listeners.

One ``HttpSession`` per client connection drives one ``exchange.Exchange``: it feeds it
what happened on the client and upstream connections (bytes, end of stream, loss, write
back-pressure), the deadlines that fired and the results of what it waited for, and
executes the commands it returns. Every protocol decision is the exchange's; the session
owns the sockets, the timers, the connector and pool (``open_upstream``), the password
check, the tunnel relay and the access log (``Services.record``).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable
from typing import Any

from kushi import http1
from kushi.connector import Upstream
from kushi.errors import KushiError, RequestError, ResponseIncomplete
from kushi.exchange import (
    PROXY_NAME,
    ArmDeadline,
    AuthChecked,
    CancelDeadline,
    CheckAuth,
    ClientClosed,
    ClientData,
    ClientEnd,
    ClientPaused,
    ClientResumed,
    CloseClient,
    CloseUpstream,
    Command,
    DeadlineName,
    Event,
    Exchange,
    GraceExpired,
    OpenTunnel,
    OpenUpstream,
    ReleaseUpstream,
    SendClient,
    SendUpstream,
    StartTunnel,
    TimerFired,
    TunnelClosed,
    UpstreamConnected,
    UpstreamData,
    UpstreamEnd,
    UpstreamFailed,
    UpstreamLost,
    UpstreamPaused,
    UpstreamResumed,
    WriteLog,
)
from kushi.netio import Conn
from kushi.resolver import ip_literal
from kushi.routing import ClientInfo
from kushi.runtime import ListenerState, Services

__all__ = ["PROXY_NAME", "HttpSession", "read_head"]

#: Numbers client sessions for the lifetime of the process (unlike id(), never reused).
_SESSION_SERIAL = itertools.count(1)


async def read_head(
    conn: Conn,
    max_line: int,
    max_head: int,
    *,
    response: bool = False,
    deadline: float | None = None,
) -> bytes | None:
    """The next message head from ``conn``; None at a clean end of stream before any byte;
    ``TimeoutError`` when it is not complete by ``deadline`` (event-loop time). (For the
    admin listener's simple request loop.)"""
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
        self.loop = client.loop
        self.serial = next(_SESSION_SERIAL)
        self.exchange = Exchange(
            listener=listener,
            client=info,
            snapshot=get_state,
            pseudonym=services.pseudonym,
            serial=self.serial,
            clock=time.time,
            stopping=lambda: services.stopping,
        )
        self.upstream: Upstream | None = None  # the one in use by the current request
        self._private_keys: set[tuple[object, ...]] = set()
        self._done = False
        self._slow: list[Command] = []  # commands that wait (connect, password, tunnel)
        self._ready: Event | None = None  # the answer of one that had no need to wait
        # Deadlines by name (event-loop time) and the one lazily armed timer for them.
        self._deadlines: dict[DeadlineName, float] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._rearm = False
        # The parked task's wake-up (None while it runs or waits for a slow command).
        self._waiter: asyncio.Future[None] | None = None
        self._driving = False  # (a callback during _drive: the loop there sees it)
        self._scheduled = False  # (_drive_soon is due)
        # What has been reported to the exchange already.
        self._client_end = False
        self._client_closed = False
        self._client_paused = False
        self._up_end = False
        self._up_lost = False
        self._up_paused = False
        # The client's byte counters when the current request began (for its record).
        self._consumed_mark = 0
        self._sent_mark = 0

    def __repr__(self) -> str:
        return f"<HttpSession #{self.serial} {self.client!r}>"

    # --- the loop ------------------------------------------------------------------------

    async def run(self) -> None:
        self.client.on_wake = self._wake
        try:
            await self._run()
        except asyncio.CancelledError:
            # Shutdown's grace ran out while a request or tunnel was in flight.
            self._apply(self.exchange.receive(GraceExpired()))
            raise
        finally:
            self.client.on_wake = None
            self.services.idle.discard(self)
            if self._timer is not None:
                self._timer.cancel()
            if self.upstream is not None:
                self.upstream.conn.on_wake = None
                self.upstream.conn.abort()
                self.upstream = None
            # Backend connections that carry this client's PROXY header die with it.
            for key in self._private_keys:
                self.services.pool.discard(key)

    async def _run(self) -> None:
        self._apply(self.exchange.start())
        while not self._done:
            if self._slow:
                # (The connections' callbacks leave the exchange alone meanwhile: what
                # happens on them waits in their buffers and flags, as when parked.)
                await self._execute_slow(self._slow.pop(0))
                continue
            self._drive()
            if self._done or self._slow:
                continue
            # Parked: from now on the connections' callbacks have the exchange driven
            # from the event loop (``_wake``, ``_drive_soon``); the task is woken only for
            # what waits, the end, or an error.
            self._waiter = waiter = self.loop.create_future()
            try:
                await waiter
            finally:
                self._waiter = None

    def _drive(self) -> None:
        """Feed the exchange everything that happened, execute its commands, until
        nothing more did (or something must be waited for); then arm the timer."""
        self._driving = True
        try:
            deadlines = self._deadlines
            if self._timer is None and deadlines:
                self._fire_expired()
            while not self._done and not self._slow and self._pump():
                pass
            if self._rearm and deadlines:
                # (Lazy: a deadline later than the armed timer leaves it alone; the timer,
                # when it fires, finds what has expired and is armed again for the rest.)
                self._rearm = False
                earliest = min(deadlines.values())
                timer = self._timer
                if timer is None or self._timer_at > earliest:
                    if timer is not None:
                        timer.cancel()
                    self._timer = self.loop.call_at(earliest, self._on_timer)
                    self._timer_at = earliest
            if not self._done and self.exchange.idle:
                self.services.idle.add(self)
            else:
                self.services.idle.discard(self)
        finally:
            self._driving = False

    def _fire_expired(self) -> None:
        deadlines = self._deadlines
        self._rearm = True
        now = self.loop.time()
        for name, at in list(deadlines.items()):
            if at <= now and deadlines.get(name) == at:
                del deadlines[name]
                self._apply(self.exchange.receive(TimerFired(name)))
                if self._done:
                    return

    def _pump(self) -> bool:
        """Feed the exchange the next thing that happened; False when nothing did.
        Back-pressure first: the exchange must know a side stopped reading before it is
        given more to send that way. (The exchange says what it reads; a connection's
        bytes wait in its buffer until then, and its reading pauses when that is full.)"""
        client = self.client
        upstream = self.upstream
        conn = upstream.conn if upstream is not None else None
        receive = self.exchange.receive
        if client.write_paused is not self._client_paused:
            self._client_paused = paused = client.write_paused
            self._apply(receive(ClientPaused() if paused else ClientResumed()))
            return True
        if conn is not None and conn.write_paused is not self._up_paused:
            self._up_paused = paused = conn.write_paused
            self._apply(receive(UpstreamPaused() if paused else UpstreamResumed()))
            return True
        if client.buf and self.exchange.reading_client:
            self._apply(receive(ClientData(client.take())))
            return True
        if client.at_eof:  # (also when the connection is lost)
            if self.exchange.reading_client:
                if not self._client_end:
                    self._client_end = True
                    self._apply(receive(ClientEnd()))
                    return True
            elif client.lost and not self._client_closed:
                self._client_closed = True
                self._apply(receive(ClientClosed()))
                return True
        if conn is not None:
            if conn.buf and self.exchange.reading_upstream:
                self._apply(receive(UpstreamData(conn.take())))
                return True
            if conn.at_eof:
                if self.exchange.reading_upstream:
                    if not self._up_end:
                        self._up_end = True
                        self._apply(receive(UpstreamEnd()))
                        return True
                elif conn.lost and not self._up_lost:
                    self._up_lost = True
                    self._apply(receive(UpstreamLost()))
                    return True
        return False

    def _wake(self) -> None:
        """A connection's callback (bytes, end, loss, writing resumed) or the timer: while
        the task is parked the exchange is driven from the event loop (``_drive_soon``,
        once for however many callbacks came first: a burst of reads is handed on in one
        piece), with no task switch or future per read; while the task runs it sees it
        itself."""
        if self._waiter is None or self._driving or self._scheduled:
            return
        self._scheduled = True
        self.loop.call_soon(self._drive_soon)

    def _drive_soon(self) -> None:
        self._scheduled = False
        waiter = self._waiter
        if waiter is None or waiter.done():
            return
        try:
            self._drive()
        except Exception as exc:  # (the task raises it, as if it had driven)
            self._waiter = None
            waiter.set_exception(exc)
            return
        if self._done or self._slow:
            self._waiter = None
            waiter.set_result(None)

    def _on_timer(self) -> None:
        self._timer = None
        self._rearm = True
        self._wake()

    def close_idle(self) -> None:
        """Shutdown: a connection waiting for its next request with nothing buffered ends
        now (an idle keep-alive connection has nothing in flight to finish)."""
        if not self.client.buf and self.exchange.idle:
            self.client.close()

    # --- executing commands --------------------------------------------------------------

    def _apply(self, commands: list[Command]) -> None:
        run = _RUN_COMMAND
        while True:
            for cmd in commands:
                run[type(cmd)](self, cmd)
            # A command answered at once (a pooled upstream): its answer, after the batch.
            event = self._ready
            if event is None:
                return
            self._ready = None
            commands = self.exchange.receive(event)

    def _send_client(self, cmd: SendClient) -> None:
        self.client.write(cmd.data)

    def _send_upstream(self, cmd: SendUpstream) -> None:
        if self.upstream is not None:
            self.upstream.conn.write(cmd.data)

    def _arm_deadline(self, cmd: ArmDeadline) -> None:
        at = self.loop.time() + cmd.seconds
        self._deadlines[cmd.name] = at
        if self._timer is None or at < self._timer_at:
            self._rearm = True

    def _cancel_deadline(self, cmd: CancelDeadline) -> None:
        self._deadlines.pop(cmd.name, None)

    def _release_upstream(self, cmd: ReleaseUpstream) -> None:
        self._detach(cmd.upstream)
        self.services.pool.put(cmd.key, cmd.upstream)

    def _close_upstream(self, cmd: CloseUpstream) -> None:
        self._detach(cmd.upstream)
        if cmd.abort:
            cmd.upstream.conn.abort()
        else:
            cmd.upstream.conn.close()

    def _close_client(self, cmd: CloseClient) -> None:
        self._done = True
        self._slow.clear()
        self._ready = None
        if cmd.abort:
            self.client.abort()
        elif cmd.eof:
            self.client.write_eof()

    def _open_upstream(self, cmd: OpenUpstream) -> None:
        upstream = self._pooled(cmd)
        if upstream is not None:
            self._attach(upstream)
            self._ready = UpstreamConnected(upstream, True)
        else:
            self._slow.append(cmd)  # connect: after this batch

    def _check_auth(self, cmd: CheckAuth) -> None:
        auth = cmd.state.auth
        user = auth.remembered(cmd.header) if auth is not None else None
        if user is not None:
            self._ready = AuthChecked(user)  # (remembered: no bcrypt, nothing to wait for)
        else:
            self._slow.append(cmd)  # checked by bcrypt: after this batch

    def _later(self, cmd: Command) -> None:
        """What must be waited for (a tunnel's connect, the tunnel): after this batch."""
        self._slow.append(cmd)

    def _detach(self, upstream: Upstream) -> None:
        upstream.conn.on_wake = None
        if self.upstream is upstream:
            self.upstream = None

    def _attach(self, upstream: Upstream) -> None:
        self.upstream = upstream
        upstream.conn.on_wake = self._wake
        self._up_end = self._up_lost = self._up_paused = False

    def _write_log(self, cmd: WriteLog) -> None:
        record, client = cmd.record, self.client
        # What this request took from the client: its head, body or tunnel bytes.
        consumed = client.bytes_in - len(client.buf) - cmd.unused
        record.bytes_in = consumed - self._consumed_mark
        self._consumed_mark = consumed
        if record.aborted or (record.error and record.status == 200):
            # Cut short: what really left for the client (not what was queued).
            record.aborted = True
            record.bytes_out = client.bytes_out - self._sent_mark - client.write_buffer_size()
        self._sent_mark = client.bytes_out
        self.services.record(cmd.state, record)
        cmd.state.release()

    async def _execute_slow(self, cmd: Command) -> None:
        if isinstance(cmd, OpenUpstream):
            try:
                upstream, reused = await self.open_upstream(cmd)
            except KushiError as exc:
                self._apply(self.exchange.receive(UpstreamFailed(exc)))
                return
            self._attach(upstream)
            self._apply(self.exchange.receive(UpstreamConnected(upstream, reused)))
        elif isinstance(cmd, OpenTunnel):
            try:
                upstream = await self.services.open_tunnel(
                    cmd.state, cmd.host, cmd.port, cmd.record, "CONNECT"
                )
            except KushiError as exc:
                self._apply(self.exchange.receive(UpstreamFailed(exc)))
                return
            self._attach(upstream)
            self._apply(self.exchange.receive(UpstreamConnected(upstream, False)))
        elif isinstance(cmd, CheckAuth):
            assert cmd.state.auth is not None
            try:
                user = await cmd.state.auth.check(cmd.header, cmd.client)
            except KushiError as exc:
                self._apply(self.exchange.receive(AuthChecked(None, exc)))
                return
            self._apply(self.exchange.receive(AuthChecked(user)))
        elif isinstance(cmd, StartTunnel):
            await self._tunnel(cmd)

    def _pooled(self, cmd: OpenUpstream) -> Upstream | None:
        upstream = self.services.pool.get(cmd.route.pool_key)
        if upstream is not None:
            # A pooled connection obeys the rules in force now, as a new one would.
            if self._still_allowed(upstream, cmd.state):
                return upstream
            upstream.conn.abort()
        return None

    async def open_upstream(self, cmd: OpenUpstream) -> tuple[Upstream, bool]:
        """A new connection for ``cmd.route`` (a pooled one was not there)."""
        route, state = cmd.route, cmd.state
        upstream = await self.services.connector.connect(
            route.host, route.port, cmd.egress.policy, state.destinations, cmd.egress.source
        )
        if route.private:
            self._private_keys.add(route.pool_key)
        if cmd.preamble:
            upstream.conn.write(cmd.preamble)
        return upstream, False

    def _still_allowed(self, upstream: Upstream, state: ListenerState) -> bool:
        if upstream.allowed_under is state:
            return True  # (the same rules it passed when it was last handed out)
        # A NAT64 connection is checked as the IPv4 address it stands for.
        addr = ip_literal(upstream.via or upstream.address)
        if addr is None:
            return False
        checks = [c for c in (self.services.connector.check, state.destinations) if c]
        try:
            allowed = all(check(addr, upstream.port) is None for check in checks)
        except KushiError:
            return False
        if allowed:
            upstream.allowed_under = state
        return allowed

    async def _tunnel(self, cmd: StartTunnel) -> None:
        """CONNECT after its 200, or an upgrade after its 101: the bytes already buffered
        go first, then the relay until both ends are done."""
        upstream = cmd.upstream
        self._detach(upstream)
        self.upstream = upstream  # (still ours: closed at the end of the session)
        if cmd.to_upstream:
            upstream.conn.write(cmd.to_upstream)
        if cmd.to_client:
            self.client.write(cmd.to_client)
        _up, down = await self.services.relay(self.client, upstream.conn, cmd.record)
        self._apply(self.exchange.receive(TunnelClosed(_up, down)))


#: How each command is executed (one table for every session).
_RUN_COMMAND: dict[type, Callable[[HttpSession, Any], None]] = {
    SendClient: HttpSession._send_client,
    SendUpstream: HttpSession._send_upstream,
    ArmDeadline: HttpSession._arm_deadline,
    CancelDeadline: HttpSession._cancel_deadline,
    WriteLog: HttpSession._write_log,
    ReleaseUpstream: HttpSession._release_upstream,
    CloseUpstream: HttpSession._close_upstream,
    CloseClient: HttpSession._close_client,
    OpenUpstream: HttpSession._open_upstream,
    OpenTunnel: HttpSession._later,
    CheckAuth: HttpSession._check_auth,
    StartTunnel: HttpSession._later,
}
