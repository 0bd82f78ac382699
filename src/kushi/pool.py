"""A bounded pool of idle upstream connections, keyed by the request's own target.

The key is the target (host as written in the request, port, and the egress policy that
chose the address), never just "the last upstream": a request is only ever sent down a
connection that was opened for its own host. Idle connections expire after ``idle_timeout``
and are dropped if the upstream has closed them meanwhile.
"""

from __future__ import annotations

import time
from collections.abc import Hashable

from kushi.connector import Upstream


class UpstreamPool:
    def __init__(self, max_per_key: int = 32, idle_timeout: float = 30.0) -> None:
        self.max_per_key = max_per_key
        self.idle_timeout = idle_timeout
        self._idle: dict[Hashable, list[tuple[float, Upstream]]] = {}

    def get(self, key: Hashable) -> Upstream | None:
        entries = self._idle.get(key)
        now = time.monotonic()
        while entries:
            stamp, upstream = entries.pop()
            conn = upstream.conn
            if (
                now - stamp < self.idle_timeout
                and not conn.closed
                and not conn.at_eof
                and not conn.buf
            ):
                return upstream
            conn.abort()
        return None

    def put(self, key: Hashable, upstream: Upstream) -> None:
        entries = self._idle.setdefault(key, [])
        if len(entries) >= self.max_per_key or upstream.conn.closed:
            upstream.conn.close()
            return
        entries.append((time.monotonic(), upstream))

    def discard(self, key: Hashable) -> None:
        """Close and forget every idle connection under ``key``."""
        for _, upstream in self._idle.pop(key, []):
            upstream.conn.close()

    def sweep(self) -> None:
        now = time.monotonic()
        for key in list(self._idle):
            keep = []
            for stamp, upstream in self._idle[key]:
                if now - stamp < self.idle_timeout and not upstream.conn.at_eof:
                    keep.append((stamp, upstream))
                else:
                    upstream.conn.abort()
            if keep:
                self._idle[key] = keep
            else:
                del self._idle[key]

    def close(self) -> None:
        for entries in self._idle.values():
            for _, upstream in entries:
                upstream.conn.abort()
        self._idle.clear()

    def __len__(self) -> int:
        return sum(len(v) for v in self._idle.values())
