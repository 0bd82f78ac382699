"""Reverse mode's rules, without I/O: which requests a reverse listener takes, and the
route to one of its backends.

A reverse listener is an origin server to its clients: it takes origin-form (and
asterisk-form) requests only, and sends them to its backends (``backends.FailOver`` picks
which). The Host field is the client's (``preserve_host``) or the backend's; the client's
address goes on in ``Forwarded`` and ``X-Forwarded-*`` (``routing.forwarding_headers``).
"""

from __future__ import annotations

from kushi.backends import Backend
from kushi.config import Listener
from kushi.errors import NotProxied
from kushi.http1 import RequestHead, Target
from kushi.routing import Route


def check_target(target: Target) -> None:
    if target.form != "origin" and target.form != "asterisk":
        raise NotProxied("this is a reverse proxy: absolute-form and CONNECT requests are refused")


def route(
    req: RequestHead, target: Target, backend: Backend, cfg: Listener, pool_tag: object, serial: int
) -> Route:
    """The route of ``req`` to ``backend``. A connection that carries a PROXY header names
    one client, so it is pooled under a key of this client connection (``serial``) only."""
    host_header = req.get(b"host") or b""
    if not cfg.preserve_host or not host_header:
        host_header = str(backend).encode() if backend.port != 80 else backend.host.encode()
    key: tuple[object, ...] = ("rev", backend.host, backend.port, pool_tag)
    private = bool(cfg.backend_proxy_protocol)
    if private:
        key = (*key, serial)
    return Route(backend.host, backend.port, host_header, target.path, key, private)
