"""The backends of reverse and TCP listeners: round-robin with fail-over, and the PROXY
header sent to them. One place for both modes.

``BackendSet`` keeps the listener's backends and which of them are down; ``FailOver`` is
one connection's walk over them (sans-IO: the caller connects, and reports back).
``proxy_header`` is the PROXY protocol header (v1 or v2) naming the client, written first
on every new backend connection when ``backend_proxy_protocol`` is set.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass

from kushi.config import Address
from kushi.errors import (
    ConnectionRefused,
    ConnectionTimeout,
    DestinationUnavailable,
    DestinationUnroutable,
    KushiError,
)
from kushi.proxyproto import build as build_proxy_header
from kushi.routing import ClientInfo

log = logging.getLogger("kushi")

#: The failures after which the next backend is tried (the request never left kushi).
FAILOVER_ERRORS = (ConnectionRefused, ConnectionTimeout, DestinationUnroutable)


@dataclass(slots=True)
class Backend:
    host: str
    port: int
    down_until: float = 0.0

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


class BackendSet:
    """Round-robin over healthy backends; one that refuses is skipped for ``retry`` seconds."""

    def __init__(self, addresses: Iterable[Address], retry: float) -> None:
        self.backends = [Backend(addr.host, addr.port) for addr in addresses]
        self.retry = retry
        self._next = 0

    def candidates(self) -> list[Backend]:
        """Healthy backends in round-robin order (all of them if every one is down)."""
        now = time.monotonic()
        n = len(self.backends)
        if not n:
            raise DestinationUnavailable("no backend configured")
        start = self._next % n
        self._next += 1
        order = self.backends[start:] + self.backends[:start]
        healthy = [b for b in order if b.down_until <= now]
        return healthy or order

    def mark_down(self, backend: Backend) -> None:
        backend.down_until = time.monotonic() + self.retry
        log.warning("backend %s marked down for %g s", backend, self.retry)

    def mark_up(self, backend: Backend) -> None:
        backend.down_until = 0.0


class FailOver:
    """One connection's walk over the backends, in ``BackendSet.candidates`` order: the
    caller connects to ``next()``, then reports ``connected()`` or ``failed(exc)``; a
    backend that refused (or timed out, or had no route) is marked down and the next one
    is tried; when none is left, the last failure is the answer."""

    __slots__ = ("backends", "_order", "current", "last_error")

    def __init__(self, backends: BackendSet) -> None:
        self.backends = backends
        self._order = iter(backends.candidates())
        self.current: Backend | None = None
        self.last_error: KushiError | None = None

    def next(self) -> Backend:
        """The next backend to try; raises the last failure when every one failed."""
        backend = next(self._order, None)
        if backend is None:
            assert self.last_error is not None
            raise self.last_error
        self.current = backend
        return backend

    def failed(self, exc: KushiError) -> bool:
        """True when another backend may be tried after ``exc``."""
        if not isinstance(exc, FAILOVER_ERRORS) or self.current is None:
            return False
        self.backends.mark_down(self.current)
        self.last_error = exc
        return True

    def connected(self) -> None:
        if self.current is not None:
            self.backends.mark_up(self.current)


def proxy_header(version: int, client: ClientInfo) -> bytes:
    """The PROXY protocol header (``backend_proxy_protocol`` 1 or 2) naming ``client``;
    b"" when the listener sends none."""
    if not version:
        return b""
    return build_proxy_header(
        version, client.address, client.port, client.local_address, client.local_port
    )
