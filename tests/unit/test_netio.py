"""netio.Conn over real socket pairs: reads, deadlines (the lazy timer) and end of stream."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
import uvloop

from kushi.errors import ConnectionLost, KushiError
from kushi.netio import Conn


async def _pair() -> tuple[Conn, socket.socket]:
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    _transport, conn = await asyncio.get_running_loop().create_connection(Conn, sock=ours)
    return conn, theirs


def _run(coro_fn: Callable[[], Coroutine[Any, Any, None]]) -> None:
    uvloop.run(coro_fn())


def test_fill_times_out_at_its_deadline() -> None:
    async def main() -> None:
        conn, peer = await _pair()
        loop = asyncio.get_running_loop()
        start = loop.time()
        with pytest.raises(TimeoutError):
            await conn.fill(deadline=start + 0.2)
        assert 0.18 <= loop.time() - start < 0.6
        await conn.wait_closed()
        peer.close()

    _run(main)


def test_a_later_deadline_reuses_the_timer_and_still_expires() -> None:
    """Waits with ever later deadlines (a kept-alive connection) share one timer, which
    re-arms itself for the wait in progress when it fires early."""

    async def main() -> None:
        conn, peer = await _pair()
        loop = asyncio.get_running_loop()
        start = loop.time()
        peer.send(b"a")
        assert await conn.fill(deadline=start + 0.1)  # arms the timer at +0.1
        conn.buf.clear()
        timer = conn._timer
        assert timer is not None
        with pytest.raises(TimeoutError):
            await conn.fill(deadline=start + 0.4)  # later: the same timer, re-armed at +0.1
        elapsed = loop.time() - start
        assert 0.38 <= elapsed < 0.9, elapsed
        await conn.wait_closed()
        peer.close()

    _run(main)


def test_an_earlier_deadline_replaces_the_armed_timer() -> None:
    async def main() -> None:
        conn, peer = await _pair()
        loop = asyncio.get_running_loop()
        start = loop.time()
        peer.send(b"a")
        assert await conn.fill(deadline=start + 30)  # arms a timer 30 s out
        conn.buf.clear()
        with pytest.raises(TimeoutError):
            await conn.fill(deadline=start + 0.15)
        assert loop.time() - start < 1.0
        await conn.wait_closed()
        peer.close()

    _run(main)


def test_a_timer_firing_between_waits_does_not_touch_the_next_wait() -> None:
    async def main() -> None:
        conn, peer = await _pair()
        loop = asyncio.get_running_loop()
        peer.send(b"a")
        assert await conn.fill(deadline=loop.time() + 0.05)
        conn.buf.clear()
        await asyncio.sleep(0.15)  # the timer fires with no wait in progress
        assert conn._timer is None
        loop.call_later(0.1, peer.send, b"b")
        assert await conn.fill()  # no deadline: data, not a stale TimeoutError
        assert bytes(conn.buf) == b"b"
        await conn.wait_closed()
        peer.close()

    _run(main)


def test_end_of_stream_and_close_cancel_the_timer() -> None:
    async def main() -> None:
        conn, peer = await _pair()
        loop = asyncio.get_running_loop()
        peer.send(b"xyz")
        peer.shutdown(socket.SHUT_WR)
        assert await conn.fill(deadline=loop.time() + 60)
        assert bytes(conn.buf) == b"xyz"
        conn.buf.clear()
        assert not await conn.fill(deadline=loop.time() + 60)
        await conn.wait_closed()
        assert conn._timer is None  # a closed connection holds no timer (nor is held by one)
        peer.close()

    _run(main)


def test_tcp_connections_have_nodelay_without_kushi_setting_it() -> None:
    """Conn relies on the event loop setting TCP_NODELAY on every TCP transport (uvloop and
    asyncio both do): a small response must not wait for the peer's delayed ACK."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        accepted: list[Conn] = []

        def factory() -> Conn:
            conn = Conn()
            accepted.append(conn)
            return conn

        server = await loop.create_server(factory, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        _transport, client = await loop.create_connection(Conn, "127.0.0.1", port)
        await asyncio.sleep(0.05)
        for conn in (client, *accepted):
            assert conn.transport is not None
            sock = conn.transport.get_extra_info("socket")
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        assert accepted
        for conn in (client, *accepted):
            await conn.wait_closed()
        server.close()
        await server.wait_closed()

    _run(main)


def test_a_peer_reset_is_connection_lost_for_a_blocked_and_a_later_drain() -> None:
    """The OS's connection errors become kushi's ConnectionLost at this boundary: a drain
    waiting on a full socket when the peer resets, and any drain after that."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        accepted: list[Conn] = []

        def factory() -> Conn:
            conn = Conn()
            accepted.append(conn)
            return conn

        server = await loop.create_server(factory, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        peer = socket.create_connection(("127.0.0.1", port))
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        while not accepted:
            await asyncio.sleep(0.01)
        conn = accepted[0]
        while not conn.write_paused:  # the peer reads nothing: the buffers fill
            conn.write(b"x" * 65536)
            await asyncio.sleep(0)
        blocked = asyncio.ensure_future(conn.drain())
        await asyncio.sleep(0.01)
        assert not blocked.done()
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        peer.close()  # linger 0: an RST
        with pytest.raises(ConnectionLost) as caught:
            await asyncio.wait_for(blocked, 5)
        assert isinstance(caught.value, KushiError)
        assert caught.value.error_type == "connection_terminated"
        with pytest.raises(ConnectionLost):
            await conn.drain()
        server.close()
        await server.wait_closed()

    _run(main)


def test_a_second_concurrent_reader_is_refused_not_left_hanging() -> None:
    async def main() -> None:
        conn, peer = await _pair()
        first = asyncio.ensure_future(conn.fill())
        await asyncio.sleep(0.01)
        with pytest.raises(RuntimeError, match="already reading"):
            await conn.fill()
        peer.send(b"x")
        assert await asyncio.wait_for(first, 2)
        await conn.wait_closed()
        peer.close()

    _run(main)


def test_read_some_times_out_at_its_deadline() -> None:
    async def main() -> None:
        conn, peer = await _pair()
        loop = asyncio.get_running_loop()
        with pytest.raises(TimeoutError):
            await conn.read_some(deadline=loop.time() + 0.1)
        peer.send(b"y")
        assert await conn.read_some(deadline=loop.time() + 1) == b"y"
        await conn.wait_closed()
        peer.close()

    _run(main)


# --- server-side TLS (accept_tls) ------------------------------------------------------


def _tls_contexts(tmp_path: Any) -> tuple[Any, Any]:
    import ssl

    import trustme

    from kushi.tls import server_context

    ca = trustme.CA()
    cert = ca.issue_cert("localhost")
    chain, key = tmp_path / "chain.pem", tmp_path / "key.pem"
    chain.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    cert.private_key_pem.write_to_path(str(key))
    client = ssl.create_default_context()
    ca.configure_trust(client)
    return server_context(str(chain), str(key)), client


def test_accept_tls_takes_a_client_hello_already_buffered(tmp_path: Any) -> None:
    """The ClientHello arrived before the handler started TLS (uvloop reads a new socket
    at once): it is fed to the handshake, not lost, and ``buf`` then holds plaintext."""
    import threading

    server_ctx, client_ctx = _tls_contexts(tmp_path)

    async def main() -> None:
        conn, peer = await _pair()
        got: list[bytes] = []

        def client() -> None:
            with client_ctx.wrap_socket(peer, server_hostname="localhost") as tls:
                tls.sendall(b"GET / HTTP/1.1\r\n\r\n")
                got.append(tls.recv(100))

        thread = threading.Thread(target=client)
        thread.start()
        loop = asyncio.get_running_loop()
        assert await conn.fill(deadline=loop.time() + 5)  # the ClientHello, in buf
        assert conn.buf[:1] == b"\x16"  # a TLS handshake record
        await conn.accept_tls(server_ctx, loop.time() + 5)
        assert conn.tls_version.startswith("TLSv1.")
        while b"\r\n\r\n" not in conn.buf:
            assert await conn.fill(deadline=loop.time() + 5)
        assert bytes(conn.buf) == b"GET / HTTP/1.1\r\n\r\n"
        conn.write(b"hello")
        await asyncio.to_thread(thread.join, 5)
        assert got == [b"hello"]
        await conn.wait_closed()

    _run(main)


def test_write_eof_over_tls_is_close_notify_and_the_peer_may_go_on(tmp_path: Any) -> None:
    """``write_eof`` ends kushi's direction with close_notify (the client reads the end),
    while the client's direction still flows, as a TCP half-close would let it."""
    import threading

    server_ctx, client_ctx = _tls_contexts(tmp_path)

    async def main() -> None:
        conn, peer = await _pair()
        seen: list[bytes] = []

        def client() -> None:
            tls = client_ctx.wrap_socket(peer, server_hostname="localhost")
            data = b""
            while chunk := tls.recv(100):
                data += chunk
            seen.append(data)  # ended by close_notify: recv returned b""
            tls.sendall(b"after")
            tls.close()

        thread = threading.Thread(target=client)
        thread.start()
        loop = asyncio.get_running_loop()
        await conn.accept_tls(server_ctx, loop.time() + 5)
        conn.write(b"last words")
        conn.write_eof()
        while b"after" not in conn.buf:
            assert await conn.fill(deadline=loop.time() + 5), bytes(conn.buf)
        await asyncio.to_thread(thread.join, 5)
        assert seen == [b"last words"]
        await conn.wait_closed()

    _run(main)


def test_accept_tls_refuses_plain_text_and_times_out_a_silent_client(tmp_path: Any) -> None:
    import ssl

    server_ctx, _client_ctx = _tls_contexts(tmp_path)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        conn, peer = await _pair()
        peer.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        with pytest.raises(ssl.SSLError):
            await conn.accept_tls(server_ctx, loop.time() + 5)
        assert conn.buf == bytearray()  # nothing of it reached the reader
        conn.abort()
        peer.close()
        conn, peer = await _pair()
        start = loop.time()
        with pytest.raises(TimeoutError):
            await conn.accept_tls(server_ctx, start + 0.3)
        assert loop.time() - start < 2
        conn.abort()
        peer.close()

    _run(main)
