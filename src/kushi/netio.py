"""The byte stream that the I/O shell reads and writes: one per socket, either side.

A ``Conn`` wraps an asyncio stream pair with a receive buffer (a ``bytearray`` that the
sans-IO readers in ``http1`` consume in place), the peer address, and byte counters.
OS errors are mapped to kushi's errors where a caller needs to tell them apart.
"""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass, field

READ_SIZE = 256 * 1024
#: Pause reading from the other side while this much is waiting to be written.
HIGH_WATER = 1024 * 1024


@dataclass(eq=False, slots=True)
class Conn:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    peer: tuple[str, int]
    local: tuple[str, int]
    buf: bytearray = field(default_factory=bytearray)
    at_eof: bool = False
    bytes_in: int = 0
    bytes_out: int = 0

    def __repr__(self) -> str:
        return f"<Conn {fmt_addr(*self.local)} <-> {fmt_addr(*self.peer)}>"

    @classmethod
    def from_streams(cls, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> Conn:
        sock = writer.get_extra_info("socket")
        peer = writer.get_extra_info("peername") or ("", 0)
        local = writer.get_extra_info("sockname") or ("", 0)
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        return cls(reader, writer, (str(peer[0]), int(peer[1])), (str(local[0]), int(local[1])))

    async def fill(self, size: int = READ_SIZE) -> bool:
        """Read more into ``buf``. False at end of stream."""
        if self.at_eof:
            return False
        try:
            data = await self.reader.read(size)
        except (ConnectionError, OSError):
            data = b""
        if not data:
            self.at_eof = True
            return False
        self.bytes_in += len(data)
        if self.buf:
            self.buf += data
        else:
            self.buf = bytearray(data)
        return True

    async def read_some(self, size: int = READ_SIZE) -> bytes:
        """Buffered bytes first, then at most ``size`` fresh bytes; b"" at end of stream."""
        if self.buf:
            data = bytes(self.buf)
            self.buf.clear()
            return data
        if self.at_eof:
            return b""
        try:
            data = await self.reader.read(size)
        except (ConnectionError, OSError):
            data = b""
        if not data:
            self.at_eof = True
        self.bytes_in += len(data)
        return data

    def write(self, data: bytes) -> None:
        self.bytes_out += len(data)
        self.writer.write(data)

    async def drain(self) -> None:
        await self.writer.drain()

    async def send(self, data: bytes) -> None:
        self.write(data)
        transport = self.writer.transport
        if transport.get_write_buffer_size() > HIGH_WATER:
            await self.writer.drain()

    def write_eof(self) -> None:
        try:
            if self.writer.can_write_eof() and not self.writer.is_closing():
                self.writer.write_eof()
        except (OSError, RuntimeError):
            pass

    @property
    def closed(self) -> bool:
        return self.writer.is_closing()

    def close(self) -> None:
        if not self.writer.is_closing():
            self.writer.close()

    def abort(self) -> None:
        self.writer.transport.abort()

    async def wait_closed(self) -> None:
        self.close()
        try:
            await self.writer.wait_closed()
        except (ConnectionError, OSError):
            pass


def fmt_addr(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
