"""Forward mode's rules, without I/O: which requests a forward listener sends where.

A forward listener takes its target from the request: an absolute-form ``http://`` URL is
forwarded (to the ports in ``http_ports``), an authority-form CONNECT opens a tunnel (to
the ports in ``connect_ports``, for HTTP and SOCKS5 alike), and an origin-form request is
for kushi itself. An ``Upgrade`` turns the connection into a tunnel, so a forward
listener passes one on only where a CONNECT could go (or port 80).
"""

from __future__ import annotations

import functools

from kushi.config import Listener, in_port_ranges
from kushi.errors import RequestDenied, RequestError
from kushi.http1 import RequestHead, Target
from kushi.routing import Route


def route(target: Target, cfg: Listener, pool_tag: object) -> Route:
    """The route of an absolute-form request (RFC 9112 section 3.2.2)."""
    if target.scheme != "http":
        raise RequestError(
            f"kushi forwards http:// URLs; for {target.scheme}:// use a CONNECT tunnel"
        )
    if not _http_port(target.port, cfg.http_ports):
        # Squid's Safe_ports: HTTP sent to a mail or database port is an attack on that
        # service (cross-protocol), whoever the client is.
        raise RequestDenied(f"plain HTTP to port {target.port} is not allowed (http_ports)")
    return Route(
        host=target.host,
        port=target.port,
        host_header=target.authority.encode("ascii"),
        path=target.path,
        pool_key=("fwd", target.host, target.port, pool_tag),
    )


#: ``in_port_ranges`` for the few ports a forward listener sees, remembered.
_http_port = functools.lru_cache(maxsize=1024)(in_port_ranges)


def check_connect_port(port: int, connect_ports: frozenset[int], what: str) -> None:
    """A tunnel (HTTP CONNECT or SOCKS5 CONNECT, ``what``) only to ``connect_ports``."""
    if port not in connect_ports:
        allowed = ", ".join(str(p) for p in sorted(connect_ports))
        raise RequestDenied(f"{what} to port {port} is not allowed (allowed: {allowed})")


def upgrade_allowed(req: RequestHead, port: int, cfg: Listener) -> bool:
    """Whether the request's Upgrade is passed on (else it is dropped, as a hop-by-hop
    field, and the request goes on as a plain one). Only the protocols in
    ``upgrade_protocols`` (websocket by default); and since a 101 makes the connection a
    raw tunnel, a forward listener allows it only to the ports a CONNECT may reach (and
    80, the port the same request could reach as plain HTTP)."""
    if req.upgrade is None or req.framing.kind != "none":
        return False
    names = [p.split(b"/")[0].strip().lower() for p in req.upgrade.split(b",")]
    allowed = cfg.upgrade_protocols
    if not names or any(n.decode("ascii", "replace") not in allowed for n in names):
        return False
    if cfg.mode == "forward" and port != 80 and port not in cfg.connect_ports:
        raise RequestDenied(
            f"Upgrade to port {port} is not allowed: an upgraded connection is "
            "a tunnel, allowed only to connect_ports (and 80)"
        )
    return True
