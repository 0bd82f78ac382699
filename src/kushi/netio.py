"""The byte stream that the I/O shell reads and writes: one per socket, either side.

``Conn`` is an ``asyncio.Protocol`` that keeps what it receives in a ``bytearray``
(``buf``), which the sans-IO readers in ``http1`` consume in place, so a pipelined
request's bytes simply stay there for the next one. There is no StreamReader or
StreamWriter in between: ``data_received`` appends to ``buf`` and wakes the one task
waiting in ``fill``/``read_some``; ``drain`` waits only while the transport has paused
writing.

Flow control both ways: reading pauses while more than ``READ_HIGH`` bytes wait unread,
and writing pauses the writer above ``HIGH_WATER`` bytes queued in the transport.

TLS on kushi's own listeners (``accept_tls``) runs inside ``Conn``, over two memory BIOs
(``ssl.SSLObject``), on the plain TCP transport: the handshake is driven by the
connection's task under its deadline, exactly like reading a request head, whatever the
event loop (uvloop's ``start_tls`` on a just-accepted socket loses a ClientHello that
arrived first), and ``buf`` holds decrypted bytes, so everything above sees no difference.
``write_eof`` sends close_notify and then half-closes TCP, so a tunnel's directions end
one at a time as on a plain connection.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Callable, Coroutine
from typing import Any, cast

from kushi.errors import ConnectionLost

READ_SIZE = 256 * 1024
#: Write buffer high-water mark: ``drain`` waits while more than this is queued.
HIGH_WATER = 1024 * 1024
#: Reading pauses while this much received data waits unconsumed in ``buf``.
READ_HIGH = 1024 * 1024


class Conn(asyncio.Protocol):
    _ssl_in: ssl.MemoryBIO  # (set by accept_tls, read only once ``_ssl`` is set)
    _ssl_out: ssl.MemoryBIO

    def __init__(self, on_connect: Callable[[Conn], None] | None = None) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.at_eof = False
        self.bytes_in = 0
        self.bytes_out = 0
        self.peer: tuple[str, int] = ("", 0)
        self.local: tuple[str, int] = ("", 0)
        self._on_connect = on_connect
        self._waiter: asyncio.Future[None] | None = None
        self._drain_waiter: asyncio.Future[None] | None = None
        #: The transport asked us to stop writing (more than ``HIGH_WATER`` queued).
        self.write_paused = False
        self._read_paused = False
        self._lost = False
        self._tls = False
        # Server-side TLS (accept_tls): the TLS object (its two memory BIOs are made there:
        # a plain connection does not pay for them).
        self._ssl: ssl.SSLObject | None = None
        self._handshaking = False
        #: The TLS version of a connection accepted over TLS ("TLSv1.3"), else "".
        self.tls_version = ""
        #: Encrypted bytes received on it (``bytes_in`` counts the plaintext).
        self.tls_bytes_in = 0
        #: The peer reset the connection (or it failed), as opposed to a close.
        self.reset = False
        self._closed: asyncio.Future[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # The read deadline: one lazily re-armed timer per connection (see _wait_data).
        self._deadline: float | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        #: Called whenever something happens to this connection (bytes or end of stream
        #: arrived, it was lost, writing resumed): an event-driven owner's wake-up.
        self.on_wake: Callable[[], None] | None = None

    def __repr__(self) -> str:
        return f"<Conn {fmt_addr(*self.local)} <-> {fmt_addr(*self.peer)}>"

    # --- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # (uvloop's transports are not asyncio.Transport subclasses, but behave as one.)
        self.transport = cast(asyncio.Transport, transport)
        self._loop = loop = asyncio.get_running_loop()
        self._closed = loop.create_future()
        peer = transport.get_extra_info("peername") or ("", 0)
        local = transport.get_extra_info("sockname") or ("", 0)
        self.peer = (str(peer[0]), int(peer[1]))
        self.local = (str(local[0]), int(local[1]))
        # (TCP_NODELAY: uvloop and asyncio set it on every TCP transport they make.)
        self.transport.set_write_buffer_limits(high=HIGH_WATER)
        if self._on_connect is not None:
            self._on_connect(self)

    def data_received(self, data: bytes) -> None:
        if self._ssl is not None:
            self.tls_bytes_in += len(data)
            self._ssl_in.write(data)
            if self._handshaking:
                self._wake()
                return
            data = self._decrypt()
            if not data:
                self._wake()
                return
        self.bytes_in += len(data)
        self.buf += data
        if len(self.buf) > READ_HIGH and not self._read_paused and self.transport is not None:
            self._read_paused = True
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        if self._ssl is not None:
            self._ssl_in.write_eof()
        self.at_eof = True
        self._wake()
        # Keep the transport open: the other direction may still be writing. (A TLS
        # transport cannot half-close; asyncio warns when asked to, so it is not asked.)
        return not self._tls

    def connection_lost(self, exc: Exception | None) -> None:
        self.at_eof = True
        self._lost = True
        self.write_paused = False
        if exc is not None:
            self.reset = True
        self._wake()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        waiter, self._drain_waiter = self._drain_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(ConnectionLost("connection lost"))
            waiter.exception()  # retrieved here if nobody awaits it any more
        if self._closed is not None and not self._closed.done():
            self._closed.set_result(None)

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        waiter, self._drain_waiter = self._drain_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        if self.on_wake is not None:
            self.on_wake()

    def _wake(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        if self.on_wake is not None:
            self.on_wake()

    @property
    def lost(self) -> bool:
        """The connection is gone (closed by either side or failed)."""
        return self._lost

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The event loop this connection runs on (asking asyncio costs a system call)."""
        return self._loop or asyncio.get_running_loop()

    # --- reading -------------------------------------------------------------------------

    async def _wait_data(self, deadline: float | None = None) -> None:
        """Wait for the next bytes (or end of stream); ``TimeoutError`` at ``deadline``
        (event-loop time).

        The timer is lazy: a wait whose deadline is no earlier than the armed timer's
        leaves it alone, and the timer, when it fires, re-arms itself for the deadline of
        the wait then in progress (if any). A kept-alive connection thus arms about one
        timer per timeout period instead of one per request."""
        if self._read_paused and self.transport is not None and len(self.buf) < READ_HIGH:
            self._read_paused = False
            self.transport.resume_reading()
        if self._waiter is not None:
            # One reader at a time: a second one would take the first one's wake-up and
            # leave it waiting forever.
            raise RuntimeError(f"{self!r}: another task is already reading")
        loop = self.loop
        waiter = loop.create_future()
        self._waiter = waiter
        if deadline is not None:
            self._deadline = deadline
            timer = self._timer
            if timer is None or self._timer_at > deadline:
                if timer is not None:
                    timer.cancel()
                self._timer = loop.call_at(deadline, self._on_timer)
                self._timer_at = deadline
        try:
            await waiter
        finally:
            self._deadline = None
            if self._waiter is waiter:
                self._waiter = None

    def _on_timer(self) -> None:
        self._timer = None
        deadline, waiter = self._deadline, self._waiter
        if deadline is None or waiter is None or self._loop is None:
            return  # no wait with a deadline in progress: stay disarmed
        if self._loop.time() >= deadline:
            self._waiter = None
            if not waiter.done():
                waiter.set_exception(TimeoutError())
            return
        self._timer = self._loop.call_at(deadline, self._on_timer)
        self._timer_at = deadline

    async def fill(self, size: int = READ_SIZE, deadline: float | None = None) -> bool:
        """Wait for more bytes in ``buf``. False at end of stream (nothing more will come);
        ``TimeoutError`` if none came by ``deadline`` (event-loop time)."""
        _ = size  # (the transport decides how much arrives at once)
        before = len(self.buf)
        while len(self.buf) == before:
            if self.at_eof:
                return False
            await self._wait_data(deadline)
        return True

    async def read_some(self, size: int = READ_SIZE, deadline: float | None = None) -> bytes:
        """Buffered bytes first, else the next bytes to arrive (at most ``size``); b"" at
        the end of the stream; ``TimeoutError`` if none came by ``deadline``."""
        while not self.buf:
            if self.at_eof:
                return b""
            await self._wait_data(deadline)
        if len(self.buf) <= size:
            data = bytes(self.buf)
            self.buf.clear()
        else:
            data = bytes(self.buf[:size])
            del self.buf[:size]
        if self._read_paused and self.transport is not None and len(self.buf) < READ_HIGH:
            self._read_paused = False
            self.transport.resume_reading()
        return data

    def pause_reading(self) -> None:
        """Stop reading from the socket until the next ``fill`` or ``read_some`` (which
        resume it): a tunnel that splices leaves the socket's reading to the kernel."""
        transport = self.transport
        if not self._read_paused and transport is not None and not transport.is_closing():
            self._read_paused = True
            transport.pause_reading()

    def take(self) -> bytes:
        """Every buffered byte, at once (reading resumes if it had paused)."""
        data = bytes(self.buf)
        self.buf.clear()
        if self._read_paused and self.transport is not None:
            self._read_paused = False
            self.transport.resume_reading()
        return data

    # --- writing -------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        self.bytes_out += len(data)
        if self._ssl is not None:
            view = memoryview(data)
            try:
                while view:
                    # (Not ``view[self._ssl.write(view):]``: mypyc 2.4 evaluates a call in
                    # a bytearray's or memoryview's slice bound twice, writing it twice.)
                    written = self._ssl.write(view)
                    view = view[written:]
            except ssl.SSLError:
                self.reset = True
                self.transport.abort()
                return
            self._flush_tls()
            return
        self.transport.write(data)

    async def drain(self) -> None:
        if self._lost:
            raise ConnectionLost("connection lost")
        if not self.write_paused:
            return
        waiter = self.loop.create_future()
        self._drain_waiter = waiter
        await waiter

    def write_buffer_size(self) -> int:
        return self.transport.get_write_buffer_size() if self.transport is not None else 0

    def write_eof(self) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if self._ssl is not None:
            # RFC 8446 section 6.1: close_notify ends this direction; the peer may go on
            # sending, and TCP is half-closed after it as on a plain connection.
            self._close_notify()
        try:
            if transport.can_write_eof():
                transport.write_eof()
        except (OSError, RuntimeError):
            pass

    # --- closing -------------------------------------------------------------------------

    @property
    def encrypted(self) -> bool:
        """TLS runs between kushi and this socket (a TLS listener's client, or a
        ``start_tls`` upstream): the socket's bytes are not the stream's."""
        return self._tls or self._ssl is not None

    @property
    def closed(self) -> bool:
        return self.transport is None or self.transport.is_closing()

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            if self._ssl is not None:
                self._close_notify()
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    async def wait_closed(self) -> None:
        self.close()
        if self._closed is not None:
            await asyncio.shield(self._closed)

    # --- TLS (kushi check) ---------------------------------------------------------------

    async def start_tls(
        self,
        context: ssl.SSLContext,
        server_hostname: str,
        ssl_handshake_timeout: float | None = None,
    ) -> None:
        """Upgrade this connection to TLS in place (the client side)."""
        assert self.transport is not None
        loop = asyncio.get_running_loop()
        transport = await loop.start_tls(
            self.transport,
            self,
            context,
            server_hostname=server_hostname,
            ssl_handshake_timeout=ssl_handshake_timeout,
        )
        self.transport = cast(asyncio.Transport, transport)
        self._tls = True

    # --- TLS on kushi's listeners (the server side) ---------------------------------------

    async def accept_tls(self, context: ssl.SSLContext, deadline: float) -> None:
        """The server side of a TLS handshake, finished by ``deadline`` (event-loop time)
        or ``TimeoutError``; ``ssl.SSLError`` (after the alert is sent) or
        ``errors.ConnectionLost`` when the client goes. Bytes already received are the
        ClientHello's."""
        self._ssl_in = ssl.MemoryBIO()
        self._ssl_out = ssl.MemoryBIO()
        self._ssl = context.wrap_bio(self._ssl_in, self._ssl_out, server_side=True)
        self._handshaking = True
        if self.buf:
            self.tls_bytes_in += len(self.buf)
            self._ssl_in.write(bytes(self.buf))
            self.buf.clear()
        if self.at_eof:
            self._ssl_in.write_eof()
        try:
            while True:
                try:
                    self._ssl.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    self._flush_tls()
                if self._lost or (self.at_eof and not self._ssl_in.pending):
                    raise ConnectionLost("the client closed the connection in the handshake")
                await self._wait_data(deadline)
        except ssl.SSLError:
            self._flush_tls()  # the alert, then the connection is closed by the caller
            raise
        finally:
            self._handshaking = False
        self._flush_tls()
        self.tls_version = str(self._ssl.version() or "TLS")
        # Bytes that came with the client's Finished (a request sent at once).
        data = self._decrypt()
        if data:
            self.bytes_in += len(data)
            self.buf += data

    def _decrypt(self) -> bytes:
        """Everything the TLS object can decrypt now (b"" if nothing); close_notify is the
        end of the stream, a TLS error a reset."""
        assert self._ssl is not None
        chunks = []
        try:
            while True:
                chunk = self._ssl.read(READ_SIZE)
                if not chunk:
                    self.at_eof = True
                    break
                chunks.append(chunk)
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLZeroReturnError:
            self.at_eof = True  # close_notify
        except ssl.SSLEOFError:
            self.at_eof = True  # TCP closed without close_notify: the end all the same
        except ssl.SSLError:
            self.at_eof = True
            self.reset = True
            if self.transport is not None:
                self.transport.abort()
        self._flush_tls()  # (a TLS 1.3 key update or ticket may answer a read)
        return b"".join(chunks)

    def _flush_tls(self) -> None:
        out = self._ssl_out.read()
        if out and self.transport is not None and not self.transport.is_closing():
            self.transport.write(out)

    def _close_notify(self) -> None:
        assert self._ssl is not None
        if self._handshaking or not self.tls_version:
            return
        try:
            self._ssl.unwrap()
        except (ssl.SSLError, ValueError):
            pass  # close_notify is queued; the peer's has not come (nor need it)
        self._flush_tls()


async def serve_socket(
    sock: socket.socket,
    handler: Callable[[Conn], Coroutine[Any, Any, None]],
    tasks: set[asyncio.Task[None]],
    backlog: int = 1024,
) -> asyncio.Server:
    """Accept on a bound, listening socket; each connection runs ``handler`` in a task,
    which is in ``tasks`` while it runs (for limits and graceful shutdown)."""
    loop = asyncio.get_running_loop()

    def on_connect(conn: Conn) -> None:
        task = loop.create_task(handler(conn))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    return await loop.create_server(lambda: Conn(on_connect), sock=sock, backlog=backlog)


def fmt_addr(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
