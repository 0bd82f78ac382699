"""Byte relay between two connections: CONNECT tunnels, upgrades and TCP mode.

Each direction runs on its own: bytes already buffered go first, then everything read is
written to the other side with backpressure, and end-of-stream on one side is passed on as
a half-close (``shutdown(SHUT_WR)``) while the other direction keeps flowing. The relay ends
when both directions have ended, or when neither has carried a byte for ``idle_timeout``
seconds.

Two ways to move the bytes:

- **splice** (Linux, both ends plain TCP sockets, ``splice = true``): the bytes never
  enter user space. Both transports stop reading, their write buffers drain, and each
  direction moves data socket -> pipe -> socket with ``splice(2)`` (``SPLICE_F_MOVE |
  SPLICE_F_NONBLOCK``) on ``os.dup()``'d descriptors (an event loop refuses to watch the
  descriptor a transport owns; a dup is a descriptor of its own on the same socket),
  watched through an epoll instance of the tunnel's own that the event loop watches. A
  direction reads while its pipe is empty and writes while it is not, so a slow receiver
  stops the sender's reads (the kernel's socket buffers and the pipe, ``PIPE_SIZE``, are
  the only buffers). A kernel that refuses
  (``EINVAL``, ``ENOSYS``) before the first byte moved sends the tunnel down the other way.
- **copy** (TLS on either side, other systems, ``splice = false``): the transports read and
  write as usual, ``READ_SIZE`` at a time, waiting on ``drain`` above the high-water mark.

Both keep the ``Conn`` byte counters (``bytes_in`` of the side read, ``bytes_out`` of the
side written) true, so the access log and the metrics count the same either way.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import os
import select
import socket
import sys
import time
from dataclasses import dataclass

from kushi.errors import ConnectionLost
from kushi.netio import READ_SIZE, Conn

#: Bytes a splice pipe holds (F_SETPIPE_SZ; the default is 64 KiB, unprivileged processes
#: may raise it up to /proc/sys/fs/pipe-max-size, 1 MiB by default). Measured on loopback:
#: 1 MiB moves a bulk tunnel with 0.55-0.7 of the CPU per byte of 256 KiB and 64 KiB.
PIPE_SIZE = 1024 * 1024


def _pipe_budget() -> int:
    """Bytes of enlarged pipes this process may hold at once: a quarter of the user's
    soft limit on pipe buffers (fs.pipe-user-pages-soft, 64 MiB by default). Past that
    limit Linux gives an unprivileged user's new pipes 2 pages, so enlarging every pipe
    would starve the tunnels that come later; beyond the budget pipes keep 64 KiB."""
    try:
        with open("/proc/sys/fs/pipe-user-pages-soft") as fh:
            pages = int(fh.read())
    except (OSError, ValueError):
        pages = 16384
    return (pages or 1 << 30) * 4096 // 4


_PIPE_BUDGET = _pipe_budget() if sys.platform == "linux" else 0
_enlarged = [0]  # bytes of enlarged pipes open now
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
#: errno values that mean "this kernel or file cannot splice": use the copy path.
_UNSUPPORTED = frozenset({errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP})


@dataclass(slots=True)
class Relayed:
    """What one relay moved: bytes each way, and whether ``splice(2)`` carried them."""

    a_to_b: int = 0
    b_to_a: int = 0
    spliced: bool = False


async def relay(a: Conn, b: Conn, idle_timeout: float, splice: bool = False) -> tuple[int, int]:
    """Relay until both directions end. Returns (bytes a->b, bytes b->a)."""
    moved = await relay_tunnel(a, b, idle_timeout, splice=splice)
    return moved.a_to_b, moved.b_to_a


async def relay_tunnel(a: Conn, b: Conn, idle_timeout: float, *, splice: bool) -> Relayed:
    """Relay until both directions end (or ``idle_timeout`` without a byte), by splice when
    ``splice`` is set and both ends allow it, else by copying."""
    activity = [time.monotonic()]
    moved = Relayed()
    if splice and splice_capable(a) and splice_capable(b):
        if await _splice_relay(a, b, idle_timeout, activity, moved):
            return moved
    up, down = await _copy_relay(a, b, idle_timeout, activity)
    moved.a_to_b += up
    moved.b_to_a += down
    return moved


def splice_capable(conn: Conn) -> bool:
    """A plain TCP socket on Linux, still open: no TLS between kushi and the socket."""
    transport = conn.transport
    if sys.platform != "linux" or not hasattr(os, "splice"):
        return False
    if transport is None or transport.is_closing():
        return False
    if conn.encrypted:  # TLS in kushi (a TLS listener): the socket carries records
        return False
    if transport.get_extra_info("sslcontext") is not None:
        return False
    if transport.get_extra_info("ssl_object") is not None:
        return False
    sock = transport.get_extra_info("socket")
    if sock is None or sock.type != socket.SOCK_STREAM:
        return False
    return sock.family in (socket.AF_INET, socket.AF_INET6)


# --- copy ------------------------------------------------------------------------------------


async def _pump(src: Conn, dst: Conn, activity: list[float]) -> int:
    moved = 0
    try:
        while True:
            data = await src.read_some(READ_SIZE)
            if not data:
                break
            moved += len(data)
            activity[0] = time.monotonic()
            dst.write(data)
            await dst.drain()
    except ConnectionLost:
        src.abort()
        dst.abort()
    finally:
        dst.write_eof()
    return moved


async def _copy_relay(
    a: Conn, b: Conn, idle_timeout: float, activity: list[float]
) -> tuple[int, int]:
    up = asyncio.ensure_future(_pump(a, b, activity))
    down = asyncio.ensure_future(_pump(b, a, activity))
    try:
        while True:
            remaining = activity[0] + idle_timeout - time.monotonic()
            if remaining <= 0:
                a.abort()
                b.abort()
                break
            pending = {t for t in (up, down) if not t.done()}
            if not pending:
                break
            await asyncio.wait(pending, timeout=remaining)
    finally:
        for task in (up, down):
            if not task.done():
                task.cancel()
        await asyncio.gather(up, down, return_exceptions=True)
    a_to_b = up.result() if not up.cancelled() else 0
    b_to_a = down.result() if not down.cancelled() else 0
    return a_to_b, b_to_a


# --- splice ----------------------------------------------------------------------------------

_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)


_READ_EVENTS = select.EPOLLIN | select.EPOLLERR | select.EPOLLHUP
_WRITE_EVENTS = select.EPOLLOUT | select.EPOLLERR | select.EPOLLHUP


class _Direction:
    """One direction of a spliced tunnel: ``src``'s socket -> a pipe -> ``dst``'s socket."""

    def __init__(
        self,
        splicer: _Splicer,
        src: Conn,
        dst: Conn,
        rfd: int,
        wfd: int,
    ) -> None:
        self.splicer = splicer
        self.src, self.dst = src, dst
        self.rfd, self.wfd = rfd, wfd
        self.pipe_r, self.pipe_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.enlarged = 0
        if _enlarged[0] + PIPE_SIZE <= _PIPE_BUDGET:
            try:
                fcntl.fcntl(self.pipe_w, _F_SETPIPE_SZ, PIPE_SIZE)
                self.enlarged = PIPE_SIZE
                _enlarged[0] += PIPE_SIZE
            except OSError:
                pass  # the default pipe size still works, in smaller steps
        self.in_pipe = 0
        self.moved = 0
        self.done = False
        self.reading = False
        self.writing = False

    def start(self) -> None:
        if self.src.at_eof:
            self._finish()  # the stream already ended (before the tunnel): pass it on
        else:
            self._want_read()

    def _want_read(self) -> None:
        self.reading, self.writing = True, False
        self.splicer.watch(self.rfd)
        self.splicer.watch(self.wfd)

    def _want_write(self) -> None:
        self.reading, self.writing = False, True
        self.splicer.watch(self.rfd)
        self.splicer.watch(self.wfd)

    def stop(self) -> None:
        self.reading = self.writing = False

    def _on_readable(self) -> None:
        try:
            n = os.splice(self.rfd, self.pipe_w, PIPE_SIZE, flags=_FLAGS)
        except BlockingIOError:
            return
        except OSError as exc:
            self.splicer.failed(exc, self.src)
            return
        if n == 0:
            self.src.at_eof = True
            self._finish()
            return
        self.src.bytes_in += n
        self.in_pipe += n
        self.splicer.activity[0] = time.monotonic()
        self._on_writable()

    def _on_writable(self) -> None:
        while self.in_pipe:
            try:
                n = os.splice(self.pipe_r, self.wfd, self.in_pipe, flags=_FLAGS)
            except BlockingIOError:
                self._want_write()
                return
            except OSError as exc:
                self.splicer.failed(exc, self.dst)
                return
            self.in_pipe -= n
            self.moved += n
            self.dst.bytes_out += n
        self.splicer.activity[0] = time.monotonic()
        self._want_read()

    def _finish(self) -> None:
        """End of stream from ``src`` (nothing left in the pipe): half-close ``dst``."""
        self.stop()
        self.splicer.watch(self.rfd)
        self.splicer.watch(self.wfd)
        self.done = True
        sock = socket.socket(fileno=self.wfd)  # a view of the dup, detached below
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the peer is gone already; its own direction reports that
        finally:
            sock.detach()
        self.splicer.direction_done()

    def leftover(self) -> bytes:
        """What is still in the pipe (a fallback to copying sends it on)."""
        out = b""
        while self.in_pipe:
            try:
                chunk = os.read(self.pipe_r, self.in_pipe)
            except OSError:
                break
            if not chunk:
                break
            out += chunk
            self.in_pipe -= len(chunk)
        return out

    def close(self) -> None:
        self.stop()
        os.close(self.pipe_r)
        os.close(self.pipe_w)
        _enlarged[0] -= self.enlarged
        self.enlarged = 0


class _Splicer:
    """Both directions of one spliced tunnel.

    The two dup'd sockets are watched through an epoll instance of the tunnel's own, and
    the event loop watches that one descriptor: epoll reports a socket's error (a reset)
    even to a direction that is not waiting on it, where libuv (uvloop) would instead
    stop an ``add_reader`` watch without a word."""

    def __init__(self, a: Conn, b: Conn, activity: list[float]) -> None:
        self.loop = asyncio.get_running_loop()
        self.a, self.b = a, b
        self.activity = activity
        self.finished: asyncio.Future[None] = self.loop.create_future()
        self.error: OSError | None = None
        self.fds: list[int] = []
        self.directions: list[_Direction] = []
        self.masks: dict[int, int] = {}
        self.epoll = select.epoll()
        try:
            fa = self._dup(a)
            fb = self._dup(b)
            self.directions.append(_Direction(self, a, b, fa, fb))
            self.directions.append(_Direction(self, b, a, fb, fa))
        except OSError:  # out of descriptors: nothing is left open, the caller copies
            self.close()
            raise
        self.loop.add_reader(self.epoll.fileno(), self._on_events)

    def watch(self, fd: int) -> None:
        """(Re-)register ``fd`` for what the directions now wait for on it."""
        mask = 0
        for d in self.directions:
            if d.reading and d.rfd == fd:
                mask |= select.EPOLLIN
            if d.writing and d.wfd == fd:
                mask |= select.EPOLLOUT
        old = self.masks.get(fd)
        if old == mask:
            return
        if old is None:
            self.epoll.register(fd, mask)
        else:
            self.epoll.modify(fd, mask)
        self.masks[fd] = mask

    def _on_events(self) -> None:
        for fd, events in self.epoll.poll(0):
            if self.finished.done():
                return
            handled = False
            for d in self.directions:
                if d.reading and d.rfd == fd:
                    handled = True
                    if events & _READ_EVENTS:
                        d._on_readable()
                elif d.writing and d.wfd == fd:
                    handled = True
                    if events & _WRITE_EVENTS:
                        d._on_writable()
            if not handled and events & (select.EPOLLERR | select.EPOLLHUP):
                self._idle_socket_event(fd, events)

    def _idle_socket_event(self, fd: int, events: int) -> None:
        """An error or hang-up on a socket no direction waits on right now."""
        conn = self.a if fd == self.fds[0] else self.b
        err = socket.socket(fileno=fd)
        try:
            code = err.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        finally:
            err.detach()
        if code:
            self.failed(OSError(code, os.strerror(code)), conn)
        else:  # a hang-up without an error: nothing more to hear from it
            self.epoll.unregister(fd)
            self.masks.pop(fd, None)

    def _dup(self, conn: Conn) -> int:
        assert conn.transport is not None
        sock = conn.transport.get_extra_info("socket")
        fd = os.dup(sock.fileno())
        self.fds.append(fd)
        return fd

    def start(self) -> None:
        for direction in self.directions:
            direction.start()

    @property
    def moved(self) -> int:
        return sum(d.moved for d in self.directions)

    def failed(self, exc: OSError, conn: Conn) -> None:
        for direction in self.directions:
            direction.stop()
        if exc.errno in _UNSUPPORTED and self.moved == 0:
            self.error = exc
        else:
            conn.reset = True  # the peer reset (ECONNRESET, EPIPE) or the socket failed
        if not self.finished.done():
            self.finished.set_result(None)

    def direction_done(self) -> None:
        if all(d.done for d in self.directions) and not self.finished.done():
            self.finished.set_result(None)

    def close(self) -> None:
        if not self.epoll.closed:
            self.loop.remove_reader(self.epoll.fileno())
            self.epoll.close()
        for direction in self.directions:
            direction.close()
        self.directions = []  # (each points back here: no cycle left for the collector)
        for fd in self.fds:
            os.close(fd)
        self.fds = []


async def _flushed(conns: tuple[Conn, ...], deadline_of: list[float], idle: float) -> bool:
    """Wait until every transport's write buffer is empty (bytes kushi still holds in user
    space go first). False if the tunnel went idle or a connection closed meanwhile."""
    while any(c.write_buffer_size() for c in conns):
        if any(c.closed for c in conns) or time.monotonic() > deadline_of[0] + idle:
            return False
        await asyncio.sleep(0.002)
    return not any(c.closed for c in conns)


async def _splice_relay(
    a: Conn, b: Conn, idle_timeout: float, activity: list[float], moved: Relayed
) -> bool:
    """Relay by splice. True when the tunnel is over; False to carry on by copying (the
    kernel refused, or a side closed while the buffers drained)."""
    for conn in (a, b):
        conn.pause_reading()
    # What either side sent before the tunnel started (and kushi already read) goes first.
    for src, dst in ((a, b), (b, a)):
        if src.buf:
            data = bytes(src.buf)
            src.buf.clear()
            dst.write(data)
            if src is a:
                moved.a_to_b += len(data)
            else:
                moved.b_to_a += len(data)
    if not await _flushed((a, b), activity, idle_timeout) or not (
        splice_capable(a) and splice_capable(b)
    ):
        return False
    try:
        splicer = _Splicer(a, b, activity)
    except OSError:
        return False
    up, down = splicer.directions
    try:
        splicer.start()
        while not splicer.finished.done():
            remaining = activity[0] + idle_timeout - time.monotonic()
            if remaining <= 0:
                a.abort()
                b.abort()
                break
            await asyncio.wait({splicer.finished}, timeout=remaining)
        if splicer.error is not None:
            # Refused before the first byte: the copy path takes over, pipes emptied first.
            for direction in splicer.directions:
                rest = direction.leftover()
                if rest:
                    direction.dst.write(rest)
                    direction.moved += len(rest)
        moved.a_to_b += up.moved
        moved.b_to_a += down.moved
        if splicer.error is not None:
            return False
        moved.spliced = True
        if a.reset or b.reset:
            a.abort()
            b.abort()
        return True
    finally:
        splicer.close()
