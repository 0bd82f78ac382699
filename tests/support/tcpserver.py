"""The skeleton of the little in-process TCP servers the tests use as origins and CONNECT
targets: a listening socket on an ephemeral port and an accept loop that serves each
connection in a thread of its own. A subclass says what to do with one connection; the
connection is closed and forgotten when ``serve`` returns, so a long test (the soak) does
not pile up sockets."""

from __future__ import annotations

import socket
import threading


class ThreadedServer:
    def __init__(self, host: str = "::1", *, nodelay: bool = False) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))
        self.sock.listen(128)
        self.port: int = self.sock.getsockname()[1]
        self.nodelay = nodelay
        self.accepted = 0
        self.conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return  # closed
            self.accepted += 1
            if self.nodelay:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self.conns.add(conn)
            threading.Thread(target=self._run, args=(conn, self.accepted), daemon=True).start()

    def _run(self, conn: socket.socket, number: int) -> None:
        try:
            self.serve(conn, number)
        finally:
            with self._lock:
                self.conns.discard(conn)
            conn.close()

    def serve(self, conn: socket.socket, number: int) -> None:
        """Serve connection ``number`` (1, 2, ... in the order accepted)."""
        raise NotImplementedError

    def close(self) -> None:
        self.sock.close()
        with self._lock:
            conns = list(self.conns)
        for conn in conns:
            conn.close()


def read_head(conn: socket.socket, buf: bytes = b"") -> tuple[bytes, bytes] | None:
    """The next request head on ``conn`` (``buf``: bytes already read) and what followed it;
    None when the peer closed first."""
    while b"\r\n\r\n" not in buf:
        data = conn.recv(65536)
        if not data:
            return None
        buf += data
    head, _, rest = buf.partition(b"\r\n\r\n")
    return head, rest
