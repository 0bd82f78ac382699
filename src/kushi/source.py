"""Source addresses: which local address an upstream connection leaves from.

A listener (or a ``[users.NAME]`` table) may name at most one source per family: an
address (``203.0.113.7``) or a prefix (``2001:db8:1:2::/64``), with a rotation:

``none``
    a fixed address: the address itself, or a prefix's first usable address
    (``2001:db8:1:2::1``: the all-zero interface ID is the subnet-router anycast address,
    RFC 4291 section 2.6.1).
``connection``
    a fresh random address from the prefix for every upstream connection.
``client``
    the same address for the same client address: a keyed hash (HMAC-SHA256) of the
    client address into the prefix.
``user``
    the same for the same authenticated user (clients admitted without a password share
    one address).

The hash key is random and made once per kushi process before any worker is forked, so
every worker and every reload agrees on a client's address, and nobody outside can tell
from an address which client it belongs to; a restart picks a new key (the mapping
changes). A family with no source leaves from the host's default address for that family,
so an IPv6 source never breaks an IPv4 destination and the other way round.

Sockets are bound with ``IP_FREEBIND`` / ``IPV6_FREEBIND``, so an address of a prefix routed
to this host as ``local`` (AnyIP: ``ip -6 route add local PREFIX dev lo``) is usable without
a host-wide sysctl. ``check_usable`` is the start-up check: each source must be delivered
locally (a ``RTM_GETROUTE`` query, what ``ip route get`` prints), else kushi does not start.
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import ipaddress
import os
import secrets
import socket
import struct
from dataclasses import dataclass
from typing import Literal

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

Rotation = Literal["none", "connection", "client", "user"]
ROTATIONS: tuple[Rotation, ...] = ("none", "connection", "client", "user")
SourceNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

#: Linux socket options (not all are in the ``socket`` module).
IP_FREEBIND = 15
IPV6_FREEBIND = 78
IP_BIND_ADDRESS_NO_PORT = 24

#: The per-process hash key (see the module docstring); inherited by forked workers.
_KEY = secrets.token_bytes(32)


@dataclass(frozen=True, slots=True)
class SourcePlan:
    """The configured sources (at most one per family) and their rotation."""

    v4: ipaddress.IPv4Network | None = None
    v6: ipaddress.IPv6Network | None = None
    rotation: Rotation = "none"

    def __bool__(self) -> bool:
        return self.v4 is not None or self.v6 is not None

    def covers(self, version: int) -> bool:
        """Whether destinations of IP ``version`` leave from a configured source."""
        return (self.v6 if version == 6 else self.v4) is not None

    @property
    def networks(self) -> tuple[SourceNetwork, ...]:
        return tuple(n for n in (self.v6, self.v4) if n is not None)

    def describe(self) -> str:
        if not self:
            return "default"
        nets = ", ".join(_show(n) for n in self.networks)
        rotates = any(n.num_addresses > 1 for n in self.networks)
        return f"{nets} (rotation {self.rotation})" if rotates else nets

    def key_for(self, client: str, user: str, session: int) -> str | None:
        """What addresses are derived from: None for a fresh one per connection. The
        same key always gives the same address (``none``: one key for everybody)."""
        if self.rotation == "connection":
            return None
        if self.rotation == "client":
            return "client " + str(_unmapped(client))
        if self.rotation == "user":
            return "user " + user if user else "user"
        return ""

    def pool_key(self, client: str, user: str, session: int) -> object:
        """Part of the upstream pool key: connections are shared only between requests
        that would leave from the same address (``connection``: one client connection's
        requests only, so no client ever gets another's address)."""
        if not self:
            return None
        if self.rotation == "connection":
            return ("session", session)
        return self.key_for(client, user, session)

    def address(self, version: int, key: str | None) -> IPAddress | None:
        """The source for a destination of IP ``version`` (None: the default address)."""
        net = self.v6 if version == 6 else self.v4
        if net is None:
            return None
        return pick(net, key)


def pick(net: SourceNetwork, key: str | None, secret: bytes = _KEY) -> IPAddress:
    """An address of ``net``: its first usable one for the key "", a keyed hash of ``key``
    into its usable range, or (key None) a random one."""
    first, count = usable_range(net)
    if count == 1 or key == "":
        return net.network_address + first
    if key is None:
        index = secrets.randbelow(count)
    else:
        digest = hmac.new(secret, f"{net}|{key}".encode(), hashlib.sha256).digest()
        index = int.from_bytes(digest[:16], "big") % count
    return net.network_address + first + index


def usable_range(net: SourceNetwork) -> tuple[int, int]:
    """(offset of the first usable address, how many there are). A single address is
    itself; IPv4 leaves out the network and broadcast addresses (above /31); IPv6 leaves
    out the subnet-router anycast address (all zeros) and, in a /64 or larger, the
    reserved subnet anycast addresses at the top (RFC 2526: the highest 128)."""
    n = net.num_addresses
    if n <= 2:
        return 0, n
    if net.version == 4:
        return 1, n - 2
    top = 128 if net.prefixlen <= 64 else 0
    return 1, n - 1 - top


@dataclass(frozen=True, slots=True)
class Source:
    """The sources of one request: a plan and the key its addresses are derived from."""

    plan: SourcePlan
    key: str | None

    def address(self, version: int) -> IPAddress | None:
        return self.plan.address(version, self.key)


def bound_socket(src: IPAddress, kind: int = socket.SOCK_STREAM) -> socket.socket:
    """A non-blocking socket bound to ``src`` (port chosen by the kernel), with FREEBIND so
    an AnyIP address of a locally routed prefix is accepted; a TCP socket picks its port
    only at connect (``IP_BIND_ADDRESS_NO_PORT``), so one fixed source reuses ports across
    destinations instead of running out of them."""
    family = socket.AF_INET6 if src.version == 6 else socket.AF_INET
    sock = socket.socket(family, kind)
    try:
        sock.setblocking(False)
        if src.version == 6:
            sock.setsockopt(socket.IPPROTO_IPV6, IPV6_FREEBIND, 1)
        else:
            sock.setsockopt(socket.IPPROTO_IP, IP_FREEBIND, 1)
        if kind == socket.SOCK_STREAM:
            sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        sock.bind((str(src), 0))
    except BaseException:
        sock.close()
        raise
    return sock


class SourceUnusable(Exception):
    """A configured source this host cannot send from (a start-up error)."""


def check_usable(net: SourceNetwork, what: str) -> None:
    """Raise ``SourceUnusable`` unless every probe address of ``net`` (an address: itself;
    a prefix: its first, last and one random usable address) is delivered locally, i.e.
    is on this host or in a ``local`` route. ``what`` names the setting in the message."""
    first, count = usable_range(net)
    probes = {first, first + count - 1, first + secrets.randbelow(count)}
    for offset in sorted(probes):
        addr = net.network_address + offset
        try:
            kind = route_type(addr)
        except OSError as exc:
            raise SourceUnusable(
                f"{what} {_show(net)}: cannot look up the route to {addr}: {exc.strerror or exc}"
            ) from None
        if kind == "local":
            continue
        if net.num_addresses == 1:
            raise SourceUnusable(f"{what} {_show(net)}: not an address of this host ({kind})")
        family = "-6 " if net.version == 6 else ""
        raise SourceUnusable(
            f"{what} {_show(net)}: {addr} is not routed to this host ({kind}); "
            f"add a local route: ip {family}route add local {net} dev lo"
        )


# Netlink (rtnetlink(7)): one RTM_GETROUTE request, as `ip route get ADDR` sends.
_RTM_NEWROUTE, _RTM_GETROUTE, _NLMSG_ERROR = 24, 26, 2
_NLM_F_REQUEST = 1
_RTA_DST = 1
_RTN_NAMES = {
    1: "unicast route",
    2: "local",
    3: "broadcast",
    5: "multicast",
    6: "blackhole route",
    7: "unreachable route",
    8: "prohibit route",
}


def route_type(addr: IPAddress) -> str:
    """The kernel's route type for ``addr`` ("local" when it is delivered to this host),
    or the reason there is no route (e.g. "no route: Network is unreachable")."""
    family = socket.AF_INET6 if addr.version == 6 else socket.AF_INET
    packed = addr.packed
    rtattr = struct.pack("=HH", 4 + len(packed), _RTA_DST) + packed
    rtmsg = struct.pack("=BBBBBBBBI", family, len(packed) * 8, 0, 0, 0, 0, 0, 0, 0)
    body = rtmsg + rtattr
    header = struct.pack("=IHHII", 16 + len(body), _RTM_GETROUTE, _NLM_F_REQUEST, 1, 0)
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as nl:
        nl.settimeout(2.0)
        nl.bind((0, 0))
        nl.send(header + body)
        reply = nl.recv(65536)
    _length, kind = struct.unpack_from("=IH", reply, 0)
    if kind == _NLMSG_ERROR:
        (code,) = struct.unpack_from("=i", reply, 16)
        if code == 0:  # pragma: no cover - an acknowledgement, not an answer
            return "no answer"
        return f"no route: {os.strerror(-code)}" if -code != errno.EPERM else "not permitted"
    if kind != _RTM_NEWROUTE:  # pragma: no cover - the kernel answers one of the two
        return f"unexpected netlink message {kind}"
    rtm_type = reply[16 + 7]
    return _RTN_NAMES.get(rtm_type, f"route type {rtm_type}")


def _unmapped(text: str) -> str:
    try:
        addr = ipaddress.ip_address(text.split("%")[0])
    except ValueError:
        return text
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    return str(addr)


def _show(net: SourceNetwork) -> str:
    return str(net.network_address) if net.num_addresses == 1 else str(net)


__all__ = [
    "ROTATIONS",
    "Rotation",
    "Source",
    "SourcePlan",
    "SourceUnusable",
    "bound_socket",
    "check_usable",
    "pick",
    "route_type",
    "usable_range",
]
