"""A finished connection is freed by reference counting alone: the session, the exchange,
their connections and commands leave no reference cycles for the garbage collector.

A cycle per connection is not a leak (the collector frees it), but it is a cost on every
connection: each young-generation collection walks them, and the no-keep-alive rate fell
by a sixth while the session and the exchange kept tables of their own bound methods.

kushi runs in this process here (``Server`` on uvloop, real sockets on 127.0.0.1), so the
collector can be asked what it would have had to free: with ``gc.DEBUG_SAVEALL`` every
object a collection finds unreachable is kept in ``gc.garbage`` instead."""

from __future__ import annotations

import asyncio
import base64
import gc
import socket
from collections import Counter
from pathlib import Path

import bcrypt
import pytest
import uvloop

from kushi.config import load_config
from kushi.server import Server, bind_all

BODY = b"x" * 1024
RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 1024\r\n\r\n" + BODY


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def origin() -> tuple[asyncio.Server, int]:
    """A keep-alive origin that answers every request head with RESPONSE."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while await reader.readuntil(b"\r\n\r\n"):
                writer.write(RESPONSE)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


AUTH = b"Proxy-Authorization: Basic " + base64.b64encode(b"owner:secret") + b"\r\n"


async def one_request(port: int, target: str, requests: int = 1, how: str = "forward") -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    host = target.split("/")[2]
    extra = AUTH if how == "auth" else b""
    if how == "connect":
        writer.write(f"CONNECT {host} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200 ")
        target = "/1k"  # (origin-form inside the tunnel)
    if how == "socks":
        port_number = int(host.rsplit(":", 1)[1])
        writer.write(b"\x05\x01\x00")
        assert await reader.readexactly(2) == b"\x05\x00"
        writer.write(b"\x05\x01\x00\x01\x7f\x00\x00\x01" + port_number.to_bytes(2, "big"))
        assert (await reader.readexactly(10))[:2] == b"\x05\x00"
        target = "/1k"
    for i in range(requests):
        last = i == requests - 1
        writer.write(
            f"GET {target} HTTP/1.1\r\nHost: {host}\r\n".encode()
            + extra
            + (b"Connection: close\r\n" if last else b"")
            + b"\r\n"
        )
        if last and how in ("connect", "socks"):
            writer.write_eof()  # (the origin keeps the tunnel alive; the client ends it)
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 "), head
        assert await reader.readexactly(len(BODY)) == BODY
    assert await reader.read() == b""  # kushi closed after the last
    writer.close()
    await writer.wait_closed()


def kushi_garbage(tmp: Path, how: str) -> Counter[str]:
    """The kushi objects a collection would free after 40 connections (one request each,
    then 10 more with 5 kept-alive requests each), by type name. ``how``: plain forward
    requests, with a password (``auth``), or inside CONNECT (``connect``) or SOCKS5
    (``socks``) tunnels."""

    async def main() -> Counter[str]:
        origin_server, origin_port = await origin()
        port = free_port()
        cfg = tmp / "kushi.toml"
        text = (
            f'listen = ["127.0.0.1:{port}"]\nallow = ["127.0.0.0/8"]\n'
            f'allow_destinations = ["127.0.0.1/32 {origin_port}"]\n'
            f"connect_ports = [{origin_port}]\nsocks = true\n"
            'access_log = ""\nadmin_listen = []\nlog_level = "warning"\n'
        )
        if how == "auth":
            digest = bcrypt.hashpw(b"secret", bcrypt.gensalt(4)).decode()
            (tmp / "htpasswd").write_text(f"owner:{digest}\n")
            text += f'auth_file = "{tmp / "htpasswd"}"\nauth_combine = "both"\n'
        cfg.write_text(text)
        config = load_config(str(cfg))
        server = Server(config, bind_all(config))
        await server.start()
        target = f"http://127.0.0.1:{origin_port}/1k"
        try:
            await one_request(port, target, how=how)  # the first one builds the caches
            gc.collect()
            gc.set_debug(gc.DEBUG_SAVEALL)
            try:
                for _ in range(40):
                    await one_request(port, target, how=how)
                for _ in range(10):
                    await one_request(port, target, requests=5, how=how)
                await asyncio.sleep(0.1)  # the sessions' tasks finish
                gc.collect()
                found = Counter(
                    type(obj).__qualname__
                    for obj in gc.garbage
                    if (type(obj).__module__ or "").startswith("kushi")
                )
            finally:
                gc.set_debug(0)
                gc.garbage.clear()
        finally:
            await server.shutdown()
            origin_server.close()
            await origin_server.wait_closed()
        return found

    return uvloop.run(main())


@pytest.mark.parametrize("how", ["forward", "auth", "connect", "socks"])
def test_finished_connections_leave_no_reference_cycles(tmp_path: Path, how: str) -> None:
    found = kushi_garbage(tmp_path, how)
    assert not found, f"kushi objects only the garbage collector could free: {dict(found)}"
