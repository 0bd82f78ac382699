"""tunnel.relay_tunnel over real loopback TCP connections, in both event loops kushi runs
on (uvloop, and asyncio where uvloop is missing): splice when both ends are plain TCP,
the copy path when asked to or when one side speaks TLS, the same bytes either way."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import ssl
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
import uvloop

from kushi import tunnel
from kushi.netio import Conn
from kushi.tunnel import relay_tunnel, splice_capable

pytestmark = pytest.mark.timeout(60)

SIZE = 8 * 1024 * 1024 + 3
LOOPS: dict[str, Callable[[Coroutine[Any, Any, None]], None]] = {
    "uvloop": uvloop.run,
    "asyncio": asyncio.run,
}


async def _tcp_pair(
    server_ssl: ssl.SSLContext | None = None, client_ssl: ssl.SSLContext | None = None
) -> tuple[Conn, asyncio.StreamReader, asyncio.StreamWriter]:
    """A kushi ``Conn`` accepted on loopback, and the stream of the client that connected."""
    loop = asyncio.get_running_loop()
    accepted: asyncio.Future[Conn] = loop.create_future()
    server = await loop.create_server(
        lambda: Conn(accepted.set_result), "127.0.0.1", 0, ssl=server_ssl
    )
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=client_ssl, server_hostname="localhost" if client_ssl else None
    )
    conn = await accepted
    server.close()
    return conn, reader, writer


async def _send_then_eof(writer: asyncio.StreamWriter, data: bytes) -> None:
    for i in range(0, len(data), 1 << 20):
        writer.write(data[i : i + (1 << 20)])
        await writer.drain()
    if writer.can_write_eof():
        writer.write_eof()


async def _read_all(reader: asyncio.StreamReader) -> str:
    digest = hashlib.sha256()
    while chunk := await reader.read(1 << 20):
        digest.update(chunk)
    return digest.hexdigest()


async def _both_ways(a: Conn, ra: Any, wa: Any, b: Conn, rb: Any, wb: Any, splice: bool) -> Any:
    up, down = os.urandom(SIZE), os.urandom(SIZE - 1)
    relay = asyncio.ensure_future(relay_tunnel(a, b, 10.0, splice=splice))
    results = await asyncio.gather(
        _send_then_eof(wa, up), _send_then_eof(wb, down), _read_all(rb), _read_all(ra)
    )
    moved = await relay
    assert results[2] == hashlib.sha256(up).hexdigest()
    assert results[3] == hashlib.sha256(down).hexdigest()
    assert (moved.a_to_b, moved.b_to_a) == (SIZE, SIZE - 1)
    assert (a.bytes_in, b.bytes_out, b.bytes_in, a.bytes_out) == (SIZE, SIZE, SIZE - 1, SIZE - 1)
    await _close(a, b, wa, wb)
    return moved


async def _close(a: Conn, b: Conn, *writers: asyncio.StreamWriter) -> None:
    for w in writers:
        w.close()
        try:
            await w.wait_closed()
        except OSError:
            pass
    await a.wait_closed()
    await b.wait_closed()


@pytest.mark.parametrize("loop", sorted(LOOPS))
@pytest.mark.parametrize("splice", [True, False], ids=["splice", "copy"])
def test_both_directions_arrive_whole_and_are_counted(loop: str, splice: bool) -> None:
    async def main() -> None:
        a, ra, wa = await _tcp_pair()
        b, rb, wb = await _tcp_pair()
        assert splice_capable(a) and splice_capable(b)
        moved = await _both_ways(a, ra, wa, b, rb, wb, splice)
        assert moved.spliced is splice
        assert tunnel._enlarged == [0]  # the enlarged pipes' budget is given back

    LOOPS[loop](main())


@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_a_tls_side_is_never_spliced_and_still_relays(loop: str, tls_ca: Any) -> None:
    """A TLS transport has a socket too, but its bytes are ciphertext: splice would move
    them past the TLS layer. ``splice_capable`` says no, and the tunnel copies."""
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(tls_ca.cert_chain, tls_ca.key)
    client_ctx = ssl.create_default_context(cafile=str(tls_ca.ca_pem))

    async def main() -> None:
        a, ra, wa = await _tcp_pair(server_ctx, client_ctx)
        b, rb, wb = await _tcp_pair()
        assert a.transport is not None and a.transport.get_extra_info("socket") is not None
        assert not splice_capable(a) and splice_capable(b)
        up, down = os.urandom(SIZE), os.urandom(SIZE - 1)
        relay = asyncio.ensure_future(relay_tunnel(a, b, 10.0, splice=True))
        # TLS cannot half-close: the TLS client reads all it expects, then closes.
        wa.write(up)
        await _send_then_eof(wb, down)
        assert await ra.readexactly(len(down)) == down
        wa.close()
        assert await _read_all(rb) == hashlib.sha256(up).hexdigest()
        moved = await relay
        assert (moved.a_to_b, moved.b_to_a, moved.spliced) == (SIZE, SIZE - 1, False)
        await _close(a, b, wa, wb)

    LOOPS[loop](main())


def test_bytes_kushi_already_read_go_first() -> None:
    """What a side sent before the tunnel began (kushi already holds it in ``buf``) is
    written before the kernel takes over, and counted."""

    async def main() -> None:
        a, ra, wa = await _tcp_pair()
        b, rb, wb = await _tcp_pair()
        wa.write(b"early bytes")
        await wa.drain()
        while len(a.buf) < 11:
            await a.fill()
        relay = asyncio.ensure_future(relay_tunnel(a, b, 10.0, splice=True))
        wa.write(b" and late ones")
        wa.write_eof()
        wb.write_eof()
        assert await rb.read() == b"early bytes and late ones"
        assert await ra.read() == b""
        moved = await relay
        assert (moved.a_to_b, moved.b_to_a, moved.spliced) == (25, 0, True)
        await _close(a, b, wa, wb)

    uvloop.run(main())


def test_an_idle_spliced_tunnel_ends_at_its_timeout() -> None:
    async def main() -> None:
        a, _ra, wa = await _tcp_pair()
        b, _rb, wb = await _tcp_pair()
        loop = asyncio.get_running_loop()
        started = loop.time()
        moved = await relay_tunnel(a, b, 0.3, splice=True)
        assert 0.25 <= loop.time() - started < 3.0
        assert moved.spliced and a.closed and b.closed
        await _close(a, b, wa, wb)

    uvloop.run(main())


def test_splice_capable_refuses_what_is_not_tcp() -> None:
    async def main() -> None:
        ours, theirs = socket.socketpair()  # AF_UNIX
        ours.setblocking(False)
        _t, conn = await asyncio.get_running_loop().create_connection(Conn, sock=ours)
        assert not splice_capable(conn)
        await conn.wait_closed()
        theirs.close()

    uvloop.run(main())
