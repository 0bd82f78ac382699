"""Byte relay between two connections: CONNECT tunnels, upgrades and TCP mode.

Each direction runs on its own: bytes already buffered go first, then everything read is
written to the other side with backpressure (``drain``), and end-of-stream on one side is
passed on as a half-close (``write_eof``) while the other direction keeps flowing. The
relay ends when both directions have ended, or when neither has carried a byte for
``idle_timeout`` seconds.
"""

from __future__ import annotations

import asyncio
import time

from kushi.netio import READ_SIZE, Conn


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
    except (ConnectionError, OSError):
        src.abort()
        dst.abort()
    finally:
        dst.write_eof()
    return moved


async def relay(a: Conn, b: Conn, idle_timeout: float) -> tuple[int, int]:
    """Relay until both directions end. Returns (bytes a->b, bytes b->a)."""
    activity = [time.monotonic()]
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
