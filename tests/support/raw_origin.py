"""A tiny in-process origin that records exactly the bytes it receives on each connection.

It exists so a test can prove what did, or did not, reach the upstream side of kushi: every
accepted connection gets a ``RawConnection`` holding every byte read from it, in order.

It answers one request per connection and then asks for the connection to be closed
(``Connection: close``), so the proxy cannot reuse it and each upstream connection holds at
most one request; anything after that request (a smuggled second request) stays visible in
``RawConnection.data``. The request is framed with a deliberately small, independent
reader: a single ``Content-Length`` or ``Transfer-Encoding: chunked`` (what a proxy that
normalises framing must send), otherwise no body. When the bytes cannot be framed the
origin does not answer; it just keeps recording until the peer closes.

Use it as a context manager::

    with RawOrigin() as origin:        # listens on [::1], port chosen by the kernel
        ... origin.port, origin.connections, origin.wait_connections(n)
"""

from __future__ import annotations

import contextlib
import re
import socket
import ssl
import threading
from dataclasses import dataclass, field
from types import TracebackType

RESPONSE_MARKER = b"X-Raw-Origin"


@dataclass(eq=False)
class RawConnection:
    number: int
    peer: tuple[str, int]
    data: bytearray = field(default_factory=bytearray)
    answered: bool = False
    closed: threading.Event = field(default_factory=threading.Event)

    def snapshot(self) -> bytes:
        return bytes(self.data)


def request_end(data: bytes) -> int | None:
    """Offset just past the first complete request in ``data``, or None if not complete.

    Frames by one exact ``Content-Length`` or by ``Transfer-Encoding: chunked``; anything
    else counts as no body (this origin is a witness, not a validator)."""
    head_end = data.find(b"\r\n\r\n")
    if head_end < 0:
        return None
    body_start = head_end + 4
    lines = data[:head_end].split(b"\r\n")[1:]
    fields = [line.partition(b":") for line in lines]
    te = [v.strip().lower() for k, _, v in fields if k.lower() == b"transfer-encoding"]
    cl = [v.strip() for k, _, v in fields if k.lower() == b"content-length"]
    if te == [b"chunked"]:
        pos = body_start
        while True:
            eol = data.find(b"\r\n", pos)
            if eol < 0:
                return None
            size_text = data[pos:eol].split(b";", 1)[0].strip()
            if not re.fullmatch(rb"[0-9A-Fa-f]{1,15}", size_text):
                return None
            size = int(size_text, 16)
            pos = eol + 2
            if size == 0:
                # Trailer section: lines until an empty one.
                while True:
                    eol = data.find(b"\r\n", pos)
                    if eol < 0:
                        return None
                    empty = eol == pos
                    pos = eol + 2
                    if empty:
                        return pos
            if len(data) < pos + size + 2:
                return None
            pos += size + 2
    if len(cl) == 1 and cl[0].isdigit():
        end = body_start + int(cl[0])
        return end if len(data) >= end else None
    return body_start


class RawOrigin:
    """Listens on ``host`` (default ``::1``), records each connection, answers 200."""

    def __init__(self, host: str = "::1") -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))
        self.sock.listen(128)
        self.host = host
        self.port: int = self.sock.getsockname()[1]
        self.connections: list[RawConnection] = []
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._threads: list[threading.Thread] = []
        self._sockets: list[socket.socket] = []
        self._stopping = False
        self._acceptor = threading.Thread(target=self._accept_loop, daemon=True)
        self._acceptor.start()

    @property
    def authority(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def count(self) -> int:
        with self._lock:
            return len(self.connections)

    def since(self, mark: int) -> list[RawConnection]:
        with self._lock:
            return list(self.connections[mark:])

    def wait_closed(self, conns: list[RawConnection], timeout: float = 10.0) -> None:
        """Wait until kushi has closed each of ``conns`` (so their data is final)."""
        for conn in conns:
            conn.closed.wait(timeout)

    def _accept_loop(self) -> None:
        number = 0
        while True:
            try:
                sock, peer = self.sock.accept()
            except OSError:
                return
            number += 1
            conn = RawConnection(number, (str(peer[0]), int(peer[1])))
            with self._changed:
                if self._stopping:
                    sock.close()
                    return
                self.connections.append(conn)
                self._sockets.append(sock)
                self._changed.notify_all()
            thread = threading.Thread(target=self._serve, args=(sock, conn), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve(self, sock: socket.socket, conn: RawConnection) -> None:
        try:
            sock.settimeout(30.0)
            while True:
                try:
                    chunk = sock.recv(256 * 1024)
                except OSError:
                    break
                if not chunk:
                    break
                with self._lock:
                    conn.data += chunk
                    data = bytes(conn.data)
                if conn.answered:
                    continue
                end = request_end(data)
                if end is None:
                    continue
                head = data[: data.find(b"\r\n")]
                body = b"raw origin connection %d\n" % conn.number
                response = (
                    b"HTTP/1.1 200 OK\r\n"
                    b"Content-Type: text/plain\r\n"
                    b"Content-Length: %d\r\n"
                    b"%s: %d\r\n"
                    b"Connection: close\r\n\r\n" % (len(body), RESPONSE_MARKER, conn.number)
                )
                if not head.startswith(b"HEAD "):
                    response += body
                conn.answered = True
                try:
                    sock.sendall(response)
                except OSError:
                    break
                # Keep reading: whatever else arrives on this connection is recorded.
        finally:
            conn.closed.set()

    def close(self) -> None:
        with self._changed:
            self._stopping = True
            sockets = list(self._sockets)
        # shutdown() wakes the thread blocked in accept() (Linux); close() alone does not.
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._acceptor.join(5.0)
        self.sock.close()
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for thread in self._threads:
            thread.join(5.0)
        for sock in sockets:
            sock.close()

    def __enter__(self) -> RawOrigin:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


# --- the client side: raw bytes in, one parsed response out ---------------------------------


@dataclass
class RawResponse:
    """One response read off a raw socket; ``status`` 0 when none arrived at all."""

    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes
    #: True when the proxy closed the connection after the response (EOF or reset).
    closed: bool
    raw: bytes

    def get(self, name: bytes) -> bytes | None:
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None

    @property
    def proxy_status(self) -> str:
        value = self.get(b"proxy-status")
        return value.decode("latin-1") if value is not None else ""


def _send_all(sock: socket.socket, data: bytes) -> None:
    try:
        sock.sendall(data)
    except OSError:
        pass  # the proxy refused and closed early; what it answered is what counts


def exchange(
    address: tuple[str, int],
    head: bytes,
    body: bytes = b"",
    *,
    head_request: bool = False,
    expect_close: bool = False,
    timeout: float = 15.0,
    tls: ssl.SSLContext | None = None,
) -> RawResponse:
    """Send ``head`` + ``body`` (a large body from a helper thread, so a proxy that answers
    early cannot deadlock us) and read one response framed by Content-Length.

    With ``expect_close``, when the response says ``Connection: close``, it then reads on
    until the proxy closes the connection; ``closed`` says whether it did before ``timeout``.
    ``raw`` is every byte received. With ``tls``, the exchange runs inside a TLS
    connection (server name ``localhost``); a large body is then sent from this thread,
    as one TLS connection cannot be written and read from two threads at once."""
    family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
    received = bytearray()
    eof = False
    with contextlib.ExitStack() as stack:
        sock = stack.enter_context(socket.socket(family, socket.SOCK_STREAM))
        sock.settimeout(timeout)
        sock.connect(address)
        if tls is not None:
            sock = stack.enter_context(tls.wrap_socket(sock, server_hostname="localhost"))
        sender: threading.Thread | None = None
        if len(body) <= 64 * 1024 or tls is not None:
            _send_all(sock, head + body)
        else:
            _send_all(sock, head)
            sender = threading.Thread(target=_send_all, args=(sock, body), daemon=True)
            sender.start()

        def fill() -> bool:
            nonlocal eof
            try:
                chunk = sock.recv(256 * 1024)
            except (ConnectionResetError, BrokenPipeError, ssl.SSLError):
                chunk = b""
            except TimeoutError:
                return False
            if not chunk:
                eof = True
                return False
            received.extend(chunk)
            return True

        try:
            while b"\r\n\r\n" not in received:
                if not fill():
                    return RawResponse(0, [], b"", eof, bytes(received))
            head_end = received.index(b"\r\n\r\n")
            lines = bytes(received[:head_end]).split(b"\r\n")
            status = int(lines[0].split(b" ")[1])
            headers = []
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                headers.append((name, value.strip(b" \t")))
            length = 0
            if not head_request and status >= 200 and status not in (204, 304):
                for name, value in headers:
                    if name.lower() == b"content-length":
                        length = int(value)
            body_start = head_end + 4
            while len(received) < body_start + length and fill():
                pass
            body_in = bytes(received[body_start : body_start + length])
            announced = any(
                k.lower() == b"connection" and b"close" in v.lower() for k, v in headers
            )
            if expect_close and announced:
                while fill():
                    pass
            return RawResponse(status, headers, body_in, eof, bytes(received))
        finally:
            if sender is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sender.join(timeout)
