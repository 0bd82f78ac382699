"""A UDP echo server inside a namespace that records every datagram and its source."""

from __future__ import annotations

import socket
import threading

from support import netns


class UdpEcho:
    """Answers each datagram with ``echo:`` + its bytes; ``seen`` holds (bytes, source)."""

    def __init__(self, host: netns.Host, address: str, port: int) -> None:
        self.sock = host.new_socket(socket.AF_INET6, socket.SOCK_DGRAM)
        self.sock.bind((address, port))
        self.seen: list[tuple[bytes, str]] = []
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while True:
            try:
                data, peer = self.sock.recvfrom(65535)
            except OSError:
                return
            self.seen.append((data, peer[0]))
            self.sock.sendto(b"echo:" + data, peer)

    def close(self) -> None:
        self.sock.close()
