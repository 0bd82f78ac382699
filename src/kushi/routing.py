"""Header rewriting for the hop from client to upstream and back, without I/O.

What a proxy must change on the way through (RFC 9110 section 7.6): hop-by-hop fields are
removed (and every field the Connection header names), ``Via`` is appended,
``Max-Forwards`` is decremented for TRACE and OPTIONS, and in reverse mode the client's
address is passed on in ``Forwarded`` (RFC 7239) and the ``X-Forwarded-*`` fields.
The message framing fields are set by the caller to match how it re-frames the body.
"""

from __future__ import annotations

import functools
import ipaddress
from dataclasses import dataclass
from typing import Final

from kushi.http1 import (
    HOP_BY_HOP,
    Header,
    RequestHead,
    ResponseHead,
    drop_set,
    get_all,
    lower_name,
)

FORWARDING_FIELDS = frozenset(
    {b"forwarded", b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"x-real-ip"}
)
FRAMING_FIELDS = frozenset({b"content-length", b"transfer-encoding"})
# What never crosses kushi as it came: hop-by-hop fields (RFC 9110 section 7.6.1) and the
# framing fields, which the caller sets for the body as kushi re-frames it (and Host, which
# the request side sets for the target).
_RESPONSE_DROP = HOP_BY_HOP | FRAMING_FIELDS
_REQUEST_DROP = _RESPONSE_DROP | {b"host"}
_UPGRADE = frozenset({b"upgrade"})
_KEEP_NONE: frozenset[bytes] = frozenset()
_REBUILT_TRUSTED = frozenset({b"forwarded", b"x-forwarded-for"})


@functools.lru_cache(maxsize=64)
def via_value(version: tuple[int, int], pseudonym: str) -> bytes:
    """RFC 9110 section 7.6.3: received-protocol (the version we received) and our name."""
    proto = "1.0" if version == (1, 0) else "1.1"
    return f"{proto} {pseudonym}".encode("ascii")


def seen_via(head: RequestHead, pseudonym: str) -> bool:
    """True when our own pseudonym is already in Via: the request came round in a loop."""
    values = head.get_all(b"via")
    if not values:
        return False
    token = pseudonym.encode("ascii").lower()
    for value in values:
        for hop in value.split(b","):
            parts = hop.strip().split()
            if len(parts) >= 2 and parts[1].lower() == token:
                return True
    return False


def max_forwards(head: RequestHead) -> int | None:
    """The Max-Forwards value for TRACE and OPTIONS (RFC 9110 section 7.6.2), else None."""
    if head.method not in (b"TRACE", b"OPTIONS"):
        return None
    values = get_all(head.headers, b"max-forwards")
    if not values:
        return None
    text = values[0].strip()
    return int(text) if text.isdigit() and len(text) < 10 else None


@dataclass(slots=True)
class Route:
    """Where one request goes (decided by ``forward.route`` or ``reverse.route``): the
    host and port to connect to, the Host field and request target to send, and the key
    under which its upstream connection is pooled (``private``: never shared, since it
    carries this client's PROXY header)."""

    host: str
    port: int
    host_header: bytes
    path: bytes
    pool_key: tuple[object, ...]
    private: bool = False

    def __init__(
        self,
        host: str,
        port: int,
        host_header: bytes,
        path: bytes,
        pool_key: tuple[object, ...],
        private: bool = False,
    ) -> None:
        self.host = host
        self.port = port
        self.host_header = host_header
        self.path = path
        self.pool_key = pool_key
        self.private = private


@dataclass(frozen=True, slots=True)
class ClientInfo:
    """Who is on the other end of the client connection (after PROXY protocol)."""

    address: str
    port: int
    trusted: bool = False  # a configured trusted proxy: its X-Forwarded-* are kept
    scheme: str = "http"
    local_address: str = ""
    local_port: int = 0
    #: The TLS version when the client came over TLS (a TLS listener), else "".
    tls: str = ""


@functools.lru_cache(maxsize=4096)
def _forwarded_node(address: str) -> str:
    """RFC 7239 section 6: IPv6 nodes are bracketed and the value quoted."""
    try:
        addr = ipaddress.ip_address(address)
    except ValueError:
        return f'"{address}"'
    if addr.version == 6:
        return f'"[{addr}]"'
    return str(addr)


def upstream_request_headers(
    head: RequestHead,
    *,
    host: bytes,
    pseudonym: str,
    reverse: ClientInfo | None = None,
    keep_upgrade: bool = False,
) -> list[Header]:
    """The fields to send upstream, without framing fields (the caller adds them)."""
    drop = drop_set(
        head.headers, head.connection, _UPGRADE if keep_upgrade else _KEEP_NONE, _REQUEST_DROP
    )
    # Forwarded and X-Forwarded-For are rebuilt below (extending a trusted proxy's); the
    # rest of an untrusted client's forwarding fields are dropped.
    rebuilt: frozenset[bytes] | None = None
    if reverse is not None:
        rebuilt = _REBUILT_TRUSTED if reverse.trusted else FORWARDING_FIELDS
    out: list[Header] = [(b"Host", host)]
    for item in head.headers:
        lower = lower_name(item[0])
        if lower in drop:
            continue
        # X_Forwarded_For reads as X-Forwarded-For to gateways that map "_" to "-".
        if rebuilt is not None and (
            lower in rebuilt or (b"_" in lower and lower.replace(b"_", b"-") in rebuilt)
        ):
            continue
        out.append(item)
    mf = max_forwards(head)
    if mf is not None:
        out = [item for item in out if lower_name(item[0]) != b"max-forwards"]
        out.append((b"Max-Forwards", str(max(mf - 1, 0)).encode()))
    if reverse is not None:
        # Forwarded host= and X-Forwarded-Host carry the Host the client sent (RFC 7239
        # section 5.4), also when preserve_host = false rewrites Host for the backend.
        out.extend(forwarding_headers(head, head.get(b"host") or host, reverse))
    out.append((b"Via", via_value(head.version, pseudonym)))
    if keep_upgrade:
        out.append((b"Connection", b"upgrade"))
    return out


def forwarding_headers(head: RequestHead, host: bytes, client: ClientInfo) -> list[Header]:
    """Forwarded and X-Forwarded-* for a reverse hop, appended to trusted incoming ones."""
    if client.trusted:
        return _forwarding(host, client.address, client.scheme, client.local_address, head.headers)
    if len(host) <= _HOST_KEPT_LEN:
        # (The same for every request of a connection: made once, then looked up.)
        return list(_own_forwarding(host, client.address, client.scheme, client.local_address))
    return _forwarding(host, client.address, client.scheme, client.local_address, None)


#: The longest Host kept in ``_own_forwarding``'s cache (a DNS name and a port).
_HOST_KEPT_LEN: Final = 262


@functools.lru_cache(maxsize=1024)
def _own_forwarding(
    host: bytes, address: str, scheme: str, local_address: str
) -> tuple[Header, ...]:
    """The forwarding fields for an untrusted client (none of its own extended)."""
    return tuple(_forwarding(host, address, scheme, local_address, None))


def _forwarding(
    host: bytes, address: str, scheme: str, local_address: str, prior: list[Header] | None
) -> list[Header]:
    """The forwarding fields, extending those in ``prior`` (a trusted proxy's fields)."""
    forwarded = f"for={_forwarded_node(address)};proto={scheme}"
    if host:
        forwarded += f';host="{host.decode("latin-1")}"'
    if local_address:
        forwarded = f"by={_forwarded_node(local_address)};" + forwarded
    xff = address
    out: list[Header] = []
    if prior:
        prior_xff = get_all(prior, b"x-forwarded-for")
        if prior_xff:
            xff = ", ".join(v.decode("latin-1") for v in prior_xff) + ", " + xff
        prior_fwd = get_all(prior, b"forwarded")
        if prior_fwd:
            forwarded = ", ".join(v.decode("latin-1") for v in prior_fwd) + ", " + forwarded
    out.append((b"Forwarded", forwarded.encode("latin-1")))
    out.append((b"X-Forwarded-For", xff.encode("latin-1")))
    if not (prior and get_all(prior, b"x-forwarded-proto")):
        out.append((b"X-Forwarded-Proto", scheme.encode()))
    if host and not (prior and get_all(prior, b"x-forwarded-host")):
        out.append((b"X-Forwarded-Host", host))
    return out


def downstream_response_headers(
    resp: ResponseHead,
    *,
    pseudonym: str,
    proxy_status: bytes,
    keep_upgrade: bool = False,
) -> list[Header]:
    """The fields to send to the client, without framing and Connection fields."""
    drop = drop_set(
        resp.headers, resp.connection, _UPGRADE if keep_upgrade else _KEEP_NONE, _RESPONSE_DROP
    )
    headers = []
    for item in resp.headers:
        lower = lower_name(item[0])
        if lower in drop:
            continue
        if lower == b"proxy-status":
            # An upstream's member that carries kushi's name would read as kushi's own
            # proof (where it connected, over which family): only kushi writes those.
            kept = drop_members(item[1], PROXY_NAMES)
            if kept is None:
                continue
            item = (item[0], kept)
        headers.append(item)
    headers.append((b"Via", via_value(resp.version, pseudonym)))
    headers.append((b"Proxy-Status", proxy_status))
    return headers


#: The names kushi writes its Proxy-Status members under (RFC 9209 section 2).
PROXY_NAMES = frozenset({b"kushi"})


def split_members(value: bytes) -> list[bytes]:
    """The members of a structured-field list (RFC 8941 section 3.1), split at the commas
    outside quoted strings; each member keeps its parameters."""
    members: list[bytes] = []
    start = 0
    quoted = escaped = False
    for i, byte in enumerate(value):
        if escaped:
            escaped = False
        elif quoted and byte == 0x5C:  # backslash
            escaped = True
        elif byte == 0x22:  # double quote
            quoted = not quoted
        elif byte == 0x2C and not quoted:  # comma
            members.append(value[start:i].strip(b" \t"))
            start = i + 1
    members.append(value[start:].strip(b" \t"))
    return [m for m in members if m]


def member_name(member: bytes) -> bytes:
    name = member.split(b";", 1)[0].strip(b" \t")
    return name[1:-1] if name[:1] == b'"' and name[-1:] == b'"' else name


def drop_members(value: bytes, names: frozenset[bytes]) -> bytes | None:
    """``value`` without the members named in ``names`` (case-insensitively); None when
    nothing is left."""
    members = split_members(value)
    kept = [m for m in members if member_name(m).lower() not in names]
    if len(kept) == len(members):
        return value
    return b", ".join(kept) or None
