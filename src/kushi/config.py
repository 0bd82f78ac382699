"""The one configuration object.

``load_config()`` builds a frozen ``Config`` once: defaults, then the TOML file (read with
``tomllib``), then command-line flags. Every flag has a key of the same name in the file
(``--connect-ports`` is ``connect_ports``). Validation happens here and nowhere else: a bad
value raises ``ConfigError`` naming the key, which the command line turns into one line and
exit code 2.

File layout::

    listen = ["127.0.0.1:3128"]        # top-level keys: the default listener, and the
    egress = "prefer-ipv6"              # defaults every [[listener]] table inherits
    [timeouts]
    connect = 10.0
    [[listener]]
    mode = "reverse"
    listen = ["[::]:8080"]
    backend = ["http://127.0.0.1:8080"]
"""

from __future__ import annotations

import ipaddress
import os
import socket
import ssl
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal, cast

from kushi.errors import ConfigError
from kushi.source import ROTATIONS, Rotation, SourcePlan
from kushi.tls import server_context

Mode = Literal["forward", "reverse", "tcp", "socks"]
EgressPolicy = Literal["prefer-ipv6", "ipv6-only", "prefer-ipv4", "ipv4-only"]
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
#: An allow-list entry: a client network, or a host name re-resolved at run time.
AllowEntry = IPNetwork | str

MODES: tuple[Mode, ...] = ("forward", "reverse", "tcp", "socks")
EGRESS_POLICIES: tuple[EgressPolicy, ...] = ("prefer-ipv6", "ipv6-only", "prefer-ipv4", "ipv4-only")
LOG_FORMATS = ("squid", "json")
LOG_LEVELS = ("debug", "info", "warning", "error")
LOOPBACK_ONLY: tuple[AllowEntry, ...] = (
    ipaddress.IPv4Network("127.0.0.0/8"),
    ipaddress.IPv6Network("::1/128"),
)
EVERYONE: tuple[AllowEntry, ...] = (
    ipaddress.IPv4Network("0.0.0.0/0"),
    ipaddress.IPv6Network("::/0"),
)
#: Modes that connect where their clients say (allow list, destination policy, open-proxy
#: guard); reverse and TCP listeners connect only to their configured backends.
PROXY_MODES = ("forward", "socks")
#: CONNECT ports by mode. A SOCKS listener is what ssh, git over ssh, mail clients and
#: browsers use, so it also reaches ssh (22), HTTP (80) and the mail submission and
#: retrieval ports over TLS (465, 587, 993, 995) -- never 25: an open relay to port 25
#: is how spam leaves.
#: RFC 6052 section 2.2: the lengths a NAT64 prefix may have.
NAT64_LENGTHS = (96, 64, 56, 48, 40, 32)
DEFAULT_CONNECT_PORTS = {
    "forward": frozenset({443}),
    "socks": frozenset({22, 80, 443, 465, 587, 993, 995}),
}
#: Squid's default Safe_ports without the ports of schemes kushi does not forward (21 ftp,
#: 70 gopher, 210 wais): HTTP to any other port (25 SMTP, 22 SSH, ...) is refused.
DEFAULT_HTTP_PORTS: tuple[tuple[int, int], ...] = (
    (80, 80),
    (280, 280),
    (443, 443),
    (488, 488),
    (591, 591),
    (777, 777),
    (1025, 65535),
)


@dataclass(frozen=True, slots=True)
class Address:
    """A host and port; IPv6 literals are kept without brackets."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_hostport(text: str, key: str, default_port: int | None = None) -> Address:
    """Parse ``HOST:PORT`` / ``[V6]:PORT`` (``default_port`` when the port may be left out)."""
    text = text.strip()
    host: str
    port_text: str | None
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ConfigError(key, f"{text!r}: missing ']' after the IPv6 address")
        host, rest = text[1:end], text[end + 1 :]
        if rest and not rest.startswith(":"):
            raise ConfigError(key, f"{text!r}: expected ':PORT' after ']'")
        port_text = rest[1:] if rest else None
        try:
            ipaddress.IPv6Address(host.split("%")[0])
        except ValueError:
            raise ConfigError(key, f"{text!r}: {host!r} is not an IPv6 address") from None
    else:
        if text.count(":") > 1:
            raise ConfigError(key, f"{text!r}: put IPv6 addresses in brackets, as [::1]:3128")
        host, sep, port_text_ = text.partition(":")
        port_text = port_text_ if sep else None
    if not host:
        raise ConfigError(key, f"{text!r}: no host")
    if port_text is None:
        if default_port is None:
            raise ConfigError(key, f"{text!r}: no port (expected HOST:PORT)")
        return Address(host, default_port)
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ConfigError(key, f"{text!r}: port must be a number from 0 to 65535")
    return Address(host, int(port_text))


#: Where a listener listens when no ``listen`` is given (loopback only): 3128 is the
#: HTTP proxy port (Squid's), 1080 the SOCKS port (RFC 1928 section 3).
DEFAULT_LISTEN: dict[str, tuple[Address, ...]] = {
    "forward": (Address("127.0.0.1", 3128), Address("::1", 3128)),
    "socks": (Address("127.0.0.1", 1080), Address("::1", 1080)),
}


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Seconds. ``happy_eyeballs_delay`` is RFC 8305's Connection Attempt Delay.

    Each phase of an exchange has its own deadline, armed when the phase starts:
    ``header_read`` (the request head), ``request_body_idle`` (no byte of the request body
    for that long), ``upstream_header`` (the response head, counted from the end of the
    request body, so a slow upload is never cut by it), ``response_body_idle`` (no byte of
    the response body), ``idle`` (keep-alive between requests), ``tunnel_idle`` and
    ``shutdown_grace``. The access log names the one that fired."""

    connect: float = 10.0
    happy_eyeballs_delay: float = 0.25
    dns: float = 5.0
    #: RFC 8305 section 3: how long an A answer waits for the AAAA answer.
    resolution_delay: float = 0.05
    header_read: float = 30.0
    idle: float = 60.0
    request_body_idle: float = 60.0
    upstream_header: float = 60.0
    response_body_idle: float = 60.0
    tunnel_idle: float = 600.0
    shutdown_grace: float = 30.0


@dataclass(frozen=True, slots=True)
class Limits:
    max_request_line: int = 8192
    max_header_bytes: int = 65536
    max_connections: int = 10000
    max_connections_per_client: int = 256
    upstream_pool_size: int = 256


@dataclass(frozen=True, slots=True)
class Listener:
    """One ``[[listener]]``: its mode, addresses and per-listener options."""

    name: str
    mode: Mode
    listen: tuple[Address, ...]
    #: Client networks, and host names re-resolved at run time.
    allow: tuple[AllowEntry, ...]
    open: bool = False
    egress: EgressPolicy = "prefer-ipv6"
    nat64: Literal["allow", "refuse"] = "allow"
    nat64_prefixes: tuple[ipaddress.IPv6Network, ...] = (ipaddress.IPv6Network("64:ff9b::/96"),)
    connect_ports: frozenset[int] = frozenset({443})
    #: A forward listener also serves SOCKS5 clients on its port (told apart by the first
    #: byte, 0x05); false turns that off.
    socks: bool = True
    access_log: str | None = "-"
    access_log_format: Literal["squid", "json"] = "squid"
    backend: tuple[str, ...] = ()
    #: The backends' addresses, parsed from ``backend`` when the config is loaded.
    backend_addresses: tuple[Address, ...] = field(default=(), repr=False)
    preserve_host: bool = True
    trusted_proxies: tuple[IPNetwork, ...] = ()
    proxy_protocol: bool = False
    proxy_protocol_from: tuple[IPNetwork, ...] = ()
    backend_proxy_protocol: int = 0
    backend_retry: float = 10.0
    allow_destinations: tuple[DestinationRule, ...] = ()
    deny_destinations: tuple[DestinationRule, ...] = ()
    private_destinations: Literal["allow", "deny"] = "deny"
    #: Ports plain-HTTP forwarding may reach (Squid's Safe_ports for http): (low, high).
    http_ports: tuple[tuple[int, int], ...] = DEFAULT_HTTP_PORTS
    #: Upgrade protocols (RFC 9110 7.8) passed on; any other Upgrade is dropped.
    upgrade_protocols: frozenset[str] = frozenset({"websocket"})
    auth_file: str | None = None
    auth_combine: Literal["both", "either"] = "both"
    #: The users and bcrypt hashes of ``auth_file``, read once when the config is loaded
    #: (and again on every reload).
    auth_users: tuple[tuple[str, bytes], ...] = field(default=(), repr=False)
    #: Local addresses upstream connections leave from: at most one address or prefix
    #: per family (kushi.source); a family without one uses the host's default.
    source: tuple[IPNetwork, ...] = ()
    source_rotation: Rotation = "none"
    #: TLS on this listener (forward and reverse): the certificate chain and its key,
    #: PEM files, re-read on every reload (``kushi.tls``).
    tls_cert: str | None = None
    tls_key: str | None = None
    #: The TLS server context built from them when the config is loaded (and on reload).
    tls_context: ssl.SSLContext | None = field(default=None, repr=False, compare=False)

    @property
    def source_plan(self) -> SourcePlan:
        return source_plan(self.source, self.source_rotation)


@dataclass(frozen=True, slots=True)
class UserEgress:
    """One ``[users.NAME]`` table: what replaces the listener's egress settings for that
    authenticated user (None: the listener's own value stands)."""

    name: str
    egress: EgressPolicy | None = None
    source: tuple[IPNetwork, ...] | None = None
    source_rotation: Rotation | None = None


def source_plan(source: tuple[IPNetwork, ...], rotation: Rotation) -> SourcePlan:
    v4 = next((n for n in source if isinstance(n, ipaddress.IPv4Network)), None)
    v6 = next((n for n in source if isinstance(n, ipaddress.IPv6Network)), None)
    return SourcePlan(v4=v4, v6=v6, rotation=rotation)


@dataclass(frozen=True, slots=True)
class Config:
    listeners: tuple[Listener, ...]
    log_level: str = "info"
    #: Worker processes sharing the listeners; one per core unless set.
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    #: Tunnels between two plain TCP sockets move their bytes with splice(2) (Linux),
    #: never through user space; false copies them as TLS tunnels are.
    splice: bool = True
    #: Record TTLs are clamped to [min, max]; an expired answer is kept ``stale_ttl``
    #: longer for when no nameserver answers (RFC 8767).
    dns_cache_min_ttl: float = 0.0
    dns_cache_max_ttl: float = 3600.0
    dns_cache_stale_ttl: float = 86400.0
    dns_cache_size: int = 4096
    #: Nameservers instead of resolv.conf's, as (address, port).
    dns_servers: tuple[tuple[str, int], ...] = ()
    resolv_conf: str = "/etc/resolv.conf"
    hosts_file: str = "/etc/hosts"
    #: NAT64 synthesis: auto (only without an IPv4 route), on, off; the prefix ("" means
    #: discover it from ipv4only.arpa, RFC 7050) and how often discovery runs again.
    nat64_synthesis: Literal["auto", "on", "off"] = "auto"
    nat64_prefix: ipaddress.IPv6Network | None = None
    nat64_discovery_interval: float = 600.0
    timeouts: Timeouts = field(default_factory=Timeouts)
    limits: Limits = field(default_factory=Limits)
    admin_listen: tuple[Address, ...] = (Address("127.0.0.1", 9128),)
    admin_allow: tuple[AllowEntry, ...] = LOOPBACK_ONLY
    pac_proxy: str = ""
    #: Host names (besides this machine's own) the status page and /metrics answer to.
    admin_names: tuple[str, ...] = ()
    source: str | None = None
    #: ``[users.NAME]`` tables: per-user egress policy and source (with authentication).
    users: tuple[UserEgress, ...] = ()
    #: Values that are valid but suspicious, one line each (the command line prints them
    #: as warnings; nginx's "worker_connections exceed open file resource limit" kind).
    warnings: tuple[str, ...] = ()

    def listener(self, name: str) -> Listener:
        for item in self.listeners:
            if item.name == name:
                return item
        raise KeyError(name)

    def user(self, name: str) -> UserEgress | None:
        for item in self.users:
            if item.name == name:
                return item
        return None


# Keys that may appear at the top level and in a [[listener]] table.
#: Derived at load, never set by hand.
DERIVED_KEYS = frozenset({"auth_users", "tls_context", "backend_addresses"})
LISTENER_KEYS = {f.name for f in fields(Listener)} - {"name"} - DERIVED_KEYS
GLOBAL_KEYS = {
    "log_level",
    "workers",
    "splice",
    "dns_cache_min_ttl",
    "dns_cache_max_ttl",
    "dns_cache_stale_ttl",
    "dns_cache_size",
    "dns_servers",
    "resolv_conf",
    "hosts_file",
    "nat64_synthesis",
    "nat64_prefix",
    "nat64_discovery_interval",
    "admin_listen",
    "admin_allow",
    "admin_names",
    "pac_proxy",
}
TABLE_KEYS = {"timeouts": Timeouts, "limits": Limits}
#: Keys a ``[users.NAME]`` table may set.
USER_KEYS = ("egress", "source", "source_rotation")


def parse_server(text: str) -> tuple[str, int]:
    """A nameserver: ``IP``, ``IP:PORT`` or ``[IPv6]:PORT`` (raises ValueError)."""
    host, port = text, "53"
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        if rest:
            if not rest.startswith(":"):
                raise ValueError(text)
            port = rest[1:]
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
    ipaddress.ip_address(host)
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(text)
    return host, int(port)


def _str(key: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ConfigError(key, f"expected a string, got {value!r}")
    return value


def _str_list(key: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(key, f"expected a list of strings, got {value!r}")
    return tuple(cast(list[str], value))


def _bool(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(key, f"expected true or false, got {value!r}")
    return value


def _choice(key: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ConfigError(key, f"{value!r} is not one of {', '.join(choices)}")
    return cast(str, value)


def _number(key: str, value: Any, *, integer: bool = False, minimum: float = 0) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(key, f"expected a number, got {value!r}")
    if integer and not isinstance(value, int):
        raise ConfigError(key, f"expected a whole number, got {value!r}")
    if value < minimum:
        raise ConfigError(key, f"must be at least {minimum}, got {value!r}")
    return value


def parse_network(key: str, text: str) -> IPNetwork:
    """An address or CIDR network; host bits set (``10.0.0.1/8``) are an error, as in
    ``ipaddress`` strict mode: which of the two was meant cannot be guessed."""
    try:
        net = ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        raise ConfigError(key, f"{text!r} is not an address or CIDR network") from None
    if net.network_address != ipaddress.ip_interface(text.strip()).ip:
        raise ConfigError(
            key,
            f"{text.strip()!r} has host bits set: write {net} for the network "
            f"or {ipaddress.ip_interface(text.strip()).ip} for the one address",
        )
    return unmap_network(net)


def unmap_network(net: IPNetwork) -> IPNetwork:
    """An IPv4-mapped IPv6 network (``::ffff:0:0/96`` and inside it) is the IPv4 network."""
    if isinstance(net, ipaddress.IPv6Network) and net.prefixlen >= 96:
        mapped = net.network_address.ipv4_mapped
        if mapped is not None:
            return ipaddress.IPv4Network(f"{mapped}/{net.prefixlen - 96}")
    return net


@dataclass(frozen=True, slots=True)
class DestinationRule:
    """One ``allow_destinations`` / ``deny_destinations`` entry: a network and the ports it
    covers (empty: every port)."""

    network: IPNetwork
    ports: frozenset[int] = frozenset()

    def covers(self, addr: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int) -> bool:
        if addr.version != self.network.version or addr not in self.network:
            return False
        return not self.ports or port in self.ports

    def __str__(self) -> str:
        if not self.ports:
            return str(self.network)
        return f"{self.network} {','.join(map(str, sorted(self.ports)))}"


def parse_destination_rule(key: str, text: str) -> DestinationRule:
    """``CIDR`` or ``CIDR PORT[,PORT...]``: a network and the ports it covers (empty: all)."""
    net_text, _, ports_text = text.strip().partition(" ")
    net = parse_network(key, net_text)
    ports = _ports(key, ports_text.strip()) if ports_text.strip() else frozenset()
    return DestinationRule(net, ports)


def _allow_entries(key: str, value: Any) -> tuple[AllowEntry, ...]:
    """CIDRs become networks; anything else must be a host name (re-resolved at run time)."""
    out: list[AllowEntry] = []
    for entry in _str_list(key, value):
        entry = entry.strip()
        if "/" in entry or _ip(entry) is not None:
            out.append(parse_network(key, entry))
            continue
        try:
            out.append(parse_network(key, entry))
        except ConfigError:
            if not _is_hostname(entry):
                raise ConfigError(key, f"{entry!r} is neither a CIDR nor a host name") from None
            out.append(entry.lower().rstrip("."))
    return tuple(out)


def _is_hostname(text: str) -> bool:
    labels = text.rstrip(".").split(".")
    return (
        bool(text)
        and len(text) <= 253
        and all(
            0 < len(label) <= 63
            and label[0] != "-"
            and label[-1] != "-"
            and all(c.isalnum() or c == "-" for c in label)
            and label.isascii()
            for label in labels
        )
        and not labels[-1].isdigit()
    )


def _ports(key: str, value: Any) -> frozenset[int]:
    if isinstance(value, str):
        items: list[Any] = [p.strip() for p in value.split(",") if p.strip()]
    elif isinstance(value, list):
        items = value
    else:
        raise ConfigError(key, f"expected a list of ports, got {value!r}")
    ports = set()
    for item in items:
        text = str(item)
        if not text.isdigit() or not 1 <= int(text) <= 65535:
            raise ConfigError(key, f"{item!r} is not a port from 1 to 65535")
        ports.add(int(text))
    return frozenset(ports)


def _port_ranges(key: str, value: Any) -> tuple[tuple[int, int], ...]:
    """A list of ports and ``"LOW-HIGH"`` ranges: ``[80, 443, "1025-65535"]``."""
    items = value if isinstance(value, list) else [value]
    out = []
    for item in items:
        text = str(item).strip() if not isinstance(item, bool) else ""
        low, sep, high = text.partition("-")
        if not low.isdigit() or (sep and not high.isdigit()):
            raise ConfigError(key, f"{item!r} is not a port or a LOW-HIGH port range")
        lo, hi = int(low), int(high) if sep else int(low)
        if not 1 <= lo <= hi <= 65535:
            raise ConfigError(key, f"{item!r} is not a port range within 1 to 65535")
        out.append((lo, hi))
    return tuple(sorted(out))


def in_port_ranges(port: int, ranges: tuple[tuple[int, int], ...]) -> bool:
    return any(lo <= port <= hi for lo, hi in ranges)


def _listener_value(key: str, value: Any) -> Any:
    """Parse one listener key from its file or flag form to its ``Listener`` field type."""
    if key == "mode":
        return _choice(key, value, MODES)
    if key == "listen":
        addrs = tuple(parse_hostport(v, key) for v in _str_list(key, value))
        if not addrs:
            raise ConfigError(key, "needs at least one HOST:PORT")
        for addr in addrs:
            _check_listen_host(key, addr)
        return addrs
    if key == "allow":
        return _allow_entries(key, value)
    if key in ("open", "preserve_host", "proxy_protocol", "socks"):
        return _bool(key, value)
    if key == "egress":
        return _choice(key, value, EGRESS_POLICIES)
    if key == "nat64":
        return _choice(key, value, ("allow", "refuse"))
    if key == "nat64_prefixes":
        nets = []
        for text in _str_list(key, value):
            net = parse_network(key, text)
            if not isinstance(net, ipaddress.IPv6Network) or net.prefixlen > 96:
                raise ConfigError(key, f"{text!r} is not an IPv6 prefix of /96 or shorter")
            nets.append(net)
        return tuple(nets)
    if key == "connect_ports":
        return _ports(key, value)
    if key == "access_log":
        text = _str(key, value)
        if text and text != "-":
            check_writable(key, text)
        return text or None
    if key == "access_log_format":
        return _choice(key, value, LOG_FORMATS)
    if key == "backend":
        return _str_list(key, value)
    if key in ("trusted_proxies", "proxy_protocol_from"):
        return tuple(parse_network(key, v) for v in _str_list(key, value))
    if key == "backend_proxy_protocol":
        if value not in (0, 1, 2) or isinstance(value, bool):
            raise ConfigError(key, f"expected 0 (off), 1 or 2, got {value!r}")
        return value
    if key == "backend_retry":
        return float(_number(key, value))
    if key in ("allow_destinations", "deny_destinations"):
        return tuple(parse_destination_rule(key, entry) for entry in _str_list(key, value))
    if key == "private_destinations":
        return _choice(key, value, ("allow", "deny"))
    if key == "http_ports":
        return _port_ranges(key, value)
    if key == "upgrade_protocols":
        protocols = _str_list(key, value)
        for name in protocols:
            if not name or not all(c.isalnum() or c in "-._~+!#$%&'*^`|" for c in name):
                raise ConfigError(key, f"{name!r} is not a protocol name (a token)")
        return frozenset(p.lower() for p in protocols)
    if key == "auth_file":
        return _str(key, value) or None
    if key == "auth_combine":
        return _choice(key, value, ("both", "either"))
    if key == "source":
        return _sources(key, value)
    if key == "source_rotation":
        return _choice(key, value, ROTATIONS)
    if key in ("tls_cert", "tls_key"):
        return _str(key, value) or None
    raise ConfigError(key, "unknown key")  # pragma: no cover - callers check the key set


def _sources(key: str, value: Any) -> tuple[IPNetwork, ...]:
    """At most one unicast address or prefix per family: ``["203.0.113.7",
    "2001:db8:1:2::/64"]``."""
    nets: list[IPNetwork] = []
    for text in _str_list(key, value):
        net = parse_network(key, text)
        first = net.network_address
        if first.is_unspecified or first.is_multicast or net.prefixlen == 0:
            raise ConfigError(key, f"{text!r} is not a unicast address or prefix")
        if first.is_link_local:
            raise ConfigError(
                key, f"{text!r}: a link-local source needs an interface; not supported"
            )
        if any(other.version == net.version for other in nets):
            raise ConfigError(
                key, f"{text!r}: at most one IPv{net.version} address or prefix per listener"
            )
        nets.append(net)
    return tuple(nets)


def parse_backends(name: str, mode: Mode, backends: tuple[str, ...]) -> tuple[Address, ...]:
    """Each ``backend`` entry checked and parsed: ``http://HOST[:PORT]`` for reverse
    listeners, ``HOST:PORT`` for tcp ones."""
    key = f"listener {name}: backend"
    if mode in PROXY_MODES:
        if backends:
            raise ConfigError(key, f"a {mode} listener has no backend (its clients name targets)")
        return ()
    if not backends:
        raise ConfigError(key, f"a {mode} listener needs at least one backend")
    out = []
    for item in backends:
        scheme, sep, rest = item.partition("://")
        if mode == "reverse":
            if not sep or scheme != "http":
                raise ConfigError(key, f"{item!r}: expected http://HOST[:PORT]")
            authority, slash, path = rest.partition("/")
            if path:
                raise ConfigError(
                    key,
                    f"{item!r}: a path (/{path}) is not supported; a backend is "
                    "http://HOST[:PORT] and gets each request's own path",
                )
            out.append(parse_hostport(authority, key, default_port=80))
        else:
            if sep:
                raise ConfigError(key, f"{item!r}: a tcp backend is HOST:PORT, without {scheme}://")
            out.append(parse_hostport(item, key))
    return tuple(out)


def _build_listener(name: str, values: Mapping[str, Any]) -> Listener:
    mode = cast(Mode, values.get("mode", "forward"))
    listen = values.get("listen", DEFAULT_LISTEN.get(mode))
    if listen is None:
        raise ConfigError(f"listener {name}: listen", f"a {mode} listener needs listen addresses")
    allow = values.get("allow", LOOPBACK_ONLY if mode in PROXY_MODES else EVERYONE)
    kwargs = {k: v for k, v in values.items() if k not in ("mode", "listen", "allow")}
    if mode in DEFAULT_CONNECT_PORTS:
        kwargs.setdefault("connect_ports", DEFAULT_CONNECT_PORTS[mode])
    listener = Listener(name=name, mode=mode, listen=listen, allow=allow, **kwargs)
    listener = replace(listener, backend_addresses=parse_backends(name, mode, listener.backend))
    if listener.mode in PROXY_MODES and not listener.open:
        public = [a for a in listener.listen if not _is_loopback(a.host)]
        guarded = listener.auth_file is not None and listener.auth_combine == "both"
        if public and admits_everyone(listener.allow) and not guarded:
            raise ConfigError(
                f"listener {name}: allow",
                f"admits every address on {public[0]}: that is an open proxy; "
                "narrow allow or pass --open (open = true)",
            )
    if listener.auth_file is not None:
        users = read_htpasswd(listener.auth_file, f"listener {name}: auth_file")
        listener = replace(listener, auth_users=users)
    if listener.proxy_protocol and not listener.proxy_protocol_from:
        raise ConfigError(
            f"listener {name}: proxy_protocol_from",
            "proxy_protocol = true needs the trusted load balancers' addresses",
        )
    _check_dead_denials(name, listener)
    if listener.source_rotation == "user" and listener.auth_file is None:
        raise ConfigError(
            f"listener {name}: source_rotation",
            "user needs authentication (auth_file): there is no user to key on",
        )
    return _with_tls(name, listener)


BCRYPT_PREFIXES = (b"$2y$", b"$2b$", b"$2a$")


def read_htpasswd(path: str, key: str = "auth_file") -> tuple[tuple[str, bytes], ...]:
    """The users and bcrypt hashes of an htpasswd file. Only bcrypt entries (``htpasswd -B``)
    are accepted; anything else is a ``ConfigError`` naming the line."""
    try:
        with open(path, "rb") as fh:
            lines = fh.read().splitlines()
    except OSError as exc:
        raise ConfigError(key, f"{path}: {exc.strerror}") from None
    users: dict[str, bytes] = {}
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith(b"#"):
            continue
        user, sep, digest = line.partition(b":")
        if not sep or not user:
            raise ConfigError(key, f"{path} line {number}: expected user:bcrypt-hash")
        if not digest.startswith(BCRYPT_PREFIXES):
            raise ConfigError(
                key,
                f"{path} line {number}: user {user.decode('utf-8', 'replace')!r} is not a "
                "bcrypt entry (clear-text and MD5 are refused; use htpasswd -B)",
            )
        users[user.decode("utf-8", "replace")] = digest.replace(b"$2y$", b"$2b$", 1)
    if not users:
        raise ConfigError(key, f"{path}: no users")
    return tuple(users.items())


#: Modes that can terminate TLS: both serve HTTP, which is what runs inside it.
TLS_MODES = ("forward", "reverse")


def _with_tls(name: str, listener: Listener) -> Listener:
    """Both files or neither, on a forward or reverse listener, without the PROXY protocol
    (its header would come before the handshake, in clear text: not supported); the
    files are loaded once, here (and again on every reload), so a bad one is a config
    error naming it."""
    if listener.tls_cert is None and listener.tls_key is None:
        return listener
    if listener.tls_cert is None or listener.tls_key is None:
        missing = "tls_cert" if listener.tls_cert is None else "tls_key"
        other = "tls_key" if missing == "tls_cert" else "tls_cert"
        raise ConfigError(f"listener {name}: {missing}", f"{other} needs {missing} too")
    if listener.mode not in TLS_MODES:
        raise ConfigError(
            f"listener {name}: tls_cert",
            f"a {listener.mode} listener cannot terminate TLS (forward and reverse can)",
        )
    if listener.proxy_protocol:
        raise ConfigError(
            f"listener {name}: proxy_protocol",
            "cannot be combined with tls_cert: a TLS listener does not read PROXY headers",
        )
    context = server_context(listener.tls_cert, listener.tls_key, f"listener {name}: ")
    return replace(listener, tls_context=context)


def _check_dead_denials(name: str, listener: Listener) -> None:
    """A ``deny_destinations`` rule wholly inside an ``allow_destinations`` one never
    applies (allow is checked first): the same destination both allowed and denied."""
    for deny in listener.deny_destinations:
        net, ports = deny.network, deny.ports
        for allow in listener.allow_destinations:
            allow_net, allow_ports = allow.network, allow.ports
            covered = net.version == allow_net.version and net.subnet_of(allow_net)  # type: ignore[arg-type]
            if covered and (not allow_ports or (ports and ports <= allow_ports)):
                raise ConfigError(
                    f"listener {name}: deny_destinations",
                    f"{str(deny)!r} is also allowed by allow_destinations "
                    f"({allow_net}), which is checked first: the denial never applies",
                )


def _check_listen_host(key: str, addr: Address) -> None:
    """A listen host name must resolve now (nginx: "host not found in listen")."""
    if _ip(addr.host) is not None:
        return
    try:
        socket.getaddrinfo(addr.host, addr.port, 0, socket.SOCK_STREAM, 0, socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError):
        raise ConfigError(key, f"{addr}: host name {addr.host!r} does not resolve") from None


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        return None


def check_writable(key: str, path: str) -> None:
    """A log file kushi will append to: its directory exists and the file can be opened
    for writing (checked when the config is loaded, so ``config check``, start-up and
    reload all say so in one line)."""
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.exists(directory):
        raise ConfigError(key, f"{path}: directory {directory} does not exist")
    if not os.path.isdir(directory):
        raise ConfigError(key, f"{path}: {directory} is not a directory")
    if os.path.isdir(path):
        raise ConfigError(key, f"{path}: is a directory")
    target = path if os.path.exists(path) else directory
    if not os.access(target, os.W_OK):
        raise ConfigError(key, f"{path}: permission denied")


def _check_addresses(config: Config) -> None:
    """Two listeners (or the admin listener) on one address: ``serve`` could not bind
    both, so the config is refused here. A wildcard address overlaps every address of
    its family on the same port; port 0 (any free port) never collides."""
    seen: list[tuple[str, Address]] = []
    owners = [(f"listener {c.name}: listen", a) for c in config.listeners for a in c.listen]
    owners += [("admin_listen", a) for a in config.admin_listen]
    for key, addr in owners:
        for other_key, other in seen:
            if addr.port and addr.port == other.port and _overlap(addr.host, other.host):
                where = "this listener" if key == other_key else other_key.rsplit(":", 1)[0]
                raise ConfigError(key, f"{addr} overlaps {other} of {where}")
        seen.append((key, addr))


def _overlap(a: str, b: str) -> bool:
    ia, ib = _ip(a), _ip(b)
    if ia is None or ib is None:
        return a.lower() == b.lower()
    if ia.version != ib.version:
        return False
    return ia == ib or ia.is_unspecified or ib.is_unspecified


#: The share of a family's address space an allow list may cover before kushi calls it
#: open: half (0.0.0.0/1 alone is half of every IPv4 host on the internet).
OPEN_SHARE = 0.5
_GLOBAL_V6 = ipaddress.IPv6Network("2000::/3")  # every routed IPv6 address (RFC 4291)


def admits_everyone(allow: tuple[AllowEntry, ...]) -> bool:
    """Whether the allow networks together cover the whole internet of one family, or a
    large share of it (``OPEN_SHARE``): their union is computed, so ``0.0.0.0/1`` plus
    ``128.0.0.0/1`` is caught like ``0.0.0.0/0``. For IPv6 the share is of ``2000::/3``."""
    nets = [entry for entry in allow if not isinstance(entry, str)]  # names: a few addresses
    v4 = list(ipaddress.collapse_addresses(n for n in nets if n.version == 4))
    if sum(n.num_addresses for n in v4) >= OPEN_SHARE * 2**32:
        return True
    v6 = list(ipaddress.collapse_addresses(n for n in nets if n.version == 6))
    covered = 0
    for net in v6:
        if net.overlaps(_GLOBAL_V6):
            inner = net if net.prefixlen >= _GLOBAL_V6.prefixlen else _GLOBAL_V6
            covered += inner.num_addresses
    return covered >= OPEN_SHARE * _GLOBAL_V6.num_addresses


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def read_file(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError("config", f"{path}: no such file") from None
    except OSError as exc:
        raise ConfigError("config", f"{path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("config", f"{path}: not valid TOML: {exc}") from None
    except UnicodeDecodeError as exc:
        line = exc.object[: exc.start].count(b"\n") + 1
        raise ConfigError(
            "config",
            f"{path}: line {line}: byte 0x{exc.object[exc.start]:02x} is not UTF-8 "
            "(TOML files are UTF-8)",
        ) from None


def load_config(
    path: str | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Defaults, then the file at ``path``, then ``overrides`` (flags, keyed like the file)."""
    data: dict[str, Any] = read_file(path) if path else {}
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    for key in data:
        if key not in LISTENER_KEYS | GLOBAL_KEYS | set(TABLE_KEYS) | {
            "listener",
            "users",
            "dns_cache_ttl",
        }:
            raise ConfigError(key, "unknown key")

    top: dict[str, Any] = {}
    for key in LISTENER_KEYS:
        if key in data:
            top[key] = _listener_value(key, data[key])
    tables = data.get("listener", [])
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise ConfigError("listener", "expected [[listener]] tables")
    for key, value in overrides.items():
        if key in LISTENER_KEYS:
            if tables and key in ("listen", "backend", "mode"):
                raise ConfigError(
                    key, f"--{key.replace('_', '-')} cannot be combined with [[listener]] tables"
                )
            top[key] = _listener_value(key, value)

    listeners: list[Listener] = []
    if not tables:
        listeners.append(_build_listener(str(top.get("mode", "forward")), top))
    for index, table in enumerate(tables):
        name = table.get("name", f"{table.get('mode', 'forward')}{index}")
        if not isinstance(name, str) or not name:
            raise ConfigError(f"listener[{index}].name", "expected a non-empty string")
        # A table inherits the top-level keys except its own identity (mode, listen,
        # backend); flags override the file, tables included.
        values = {k: v for k, v in top.items() if k not in ("listen", "backend", "mode")}
        for key, value in table.items():
            if key == "name":
                continue
            if key not in LISTENER_KEYS:
                raise ConfigError(f"listener {name}: {key}", "unknown key")
            try:
                values[key] = _listener_value(key, value)
            except ConfigError as exc:
                raise ConfigError(f"listener {name}: {key}", exc.problem) from None
        values.update({k: top[k] for k in overrides if k in LISTENER_KEYS})
        listeners.append(_build_listener(name, values))
    names = [item.name for item in listeners]
    if len(set(names)) != len(names):
        raise ConfigError("listener.name", "listener names must be unique")

    merged = {**{k: v for k, v in data.items() if k in GLOBAL_KEYS}, **overrides}
    if "dns_cache_ttl" in data:  # the name before record TTLs were used: the maximum
        merged.setdefault("dns_cache_max_ttl", data["dns_cache_ttl"])
    config = Config(listeners=tuple(listeners), source=path)
    for key in GLOBAL_KEYS:
        if key in merged:
            config = replace(config, **{key: _global_value(key, merged[key])})
    for table_name, cls in TABLE_KEYS.items():
        table = data.get(table_name, {})
        if not isinstance(table, dict):
            raise ConfigError(table_name, "expected a table")
        known = {f.name: f for f in fields(cls)}
        values = {}
        for key, value in table.items():
            if key not in known:
                raise ConfigError(f"{table_name}.{key}", "unknown key")
            integer = known[key].type in ("int", int)
            number = _number(f"{table_name}.{key}", value, integer=integer, minimum=0)
            if number == 0 and key not in ZERO_ALLOWED:
                raise ConfigError(f"{table_name}.{key}", f"must be more than 0, got {value!r}")
            values[key] = int(number) if integer else float(number)
        for key, value in overrides.items():
            if key.startswith(f"{table_name}.") and key.split(".", 1)[1] in known:
                values[key.split(".", 1)[1]] = value
        config = replace(config, **{table_name: cls(**values)})
    if config.admin_listen:
        _check_admin(config)
    _check_addresses(config)
    users, user_warnings = _users(data.get("users", {}), config.listeners)
    config = replace(config, users=users)
    return replace(config, warnings=_warnings(config) + user_warnings)


def _users(
    tables: Any, listeners: tuple[Listener, ...]
) -> tuple[tuple[UserEgress, ...], tuple[str, ...]]:
    """``[users.NAME]`` tables. A name that no listener's htpasswd file knows is a warning,
    not an error: the file is edited on its own (and re-read on reload), so the two may
    briefly disagree; the table simply applies once the user can log in."""
    if not isinstance(tables, dict) or not all(isinstance(t, dict) for t in tables.values()):
        raise ConfigError("users", "expected [users.NAME] tables")
    if not tables:
        return (), ()
    files = [c.auth_file for c in listeners if c.auth_file is not None]
    if not files:
        name = next(iter(tables))
        raise ConfigError(
            f"users.{name}", "per-user settings need authentication (auth_file) on a listener"
        )
    known = {user for c in listeners for user, _ in c.auth_users}
    out = []
    warnings = []
    for name, table in tables.items():
        values: dict[str, Any] = {}
        for key, value in table.items():
            where = f"users.{name}.{key}"
            if key not in USER_KEYS:
                raise ConfigError(where, f"unknown key (a user table sets {', '.join(USER_KEYS)})")
            try:
                values[key] = _listener_value(key, value)
            except ConfigError as exc:
                raise ConfigError(where, exc.problem) from None
        out.append(UserEgress(name=name, **values))
        if name not in known:
            warnings.append(
                f"users.{name}: no such user in {', '.join(dict.fromkeys(files))}; "
                "the table applies once that user exists"
            )
    return tuple(out), tuple(warnings)


#: Keys of [timeouts] and [limits] for which 0 means something (no pool, connect all
#: addresses at once, no grace); every other 0 would refuse or time out every request.
ZERO_ALLOWED = frozenset(
    {"upstream_pool_size", "happy_eyeballs_delay", "resolution_delay", "shutdown_grace"}
)


def _warnings(config: Config) -> tuple[str, ...]:
    out = []
    cores = os.cpu_count() or 1
    if config.workers > 4 * cores:
        out.append(
            f"workers: {config.workers} worker processes on {cores} cores; "
            "more than one per core only adds memory and context switches"
        )
    return tuple(out)


def _global_value(key: str, value: Any) -> Any:
    if key == "log_level":
        return _choice(key, value, LOG_LEVELS)
    if key == "workers":
        workers = int(_number(key, value, integer=True))
        return workers or (os.cpu_count() or 1)
    if key in ("dns_cache_min_ttl", "dns_cache_max_ttl", "dns_cache_stale_ttl"):
        return float(_number(key, value))
    if key == "splice":
        return _bool(key, value)
    if key == "nat64_discovery_interval":
        return float(_number(key, value, minimum=1))
    if key == "dns_cache_size":
        return int(_number(key, value, integer=True, minimum=1))
    if key == "dns_servers":
        servers = []
        for text in _str_list(key, value):
            try:
                servers.append(parse_server(text))
            except ValueError:
                raise ConfigError(key, f"{text!r} is not an IP address or IP:PORT") from None
        return tuple(servers)
    if key in ("resolv_conf", "hosts_file"):
        return _str(key, value)
    if key == "nat64_synthesis":
        return _choice(key, value, ("auto", "on", "off"))
    if key == "nat64_prefix":
        text = _str(key, value)
        if not text:
            return None
        net = parse_network(key, text)
        if not isinstance(net, ipaddress.IPv6Network) or net.prefixlen not in NAT64_LENGTHS:
            raise ConfigError(key, f"{text!r} is not an IPv6 prefix of /32 ... /96 (RFC 6052)")
        return net
    if key == "admin_listen":
        if value in ("", [], "off", [""], ["off"]):
            return ()
        return tuple(parse_hostport(v, key) for v in _str_list(key, value))
    if key == "admin_allow":
        return _allow_entries(key, value)
    if key == "pac_proxy":
        return _str(key, value)
    if key == "admin_names":
        names = _str_list(key, value)
        for name in names:
            if not _is_hostname(name):
                raise ConfigError(key, f"{name!r} is not a host name")
        return tuple(n.lower().rstrip(".") for n in names)
    raise ConfigError(key, "unknown key")  # pragma: no cover


def _check_admin(config: Config) -> None:
    public = [a for a in config.admin_listen if not _is_loopback(a.host)]
    if public and admits_everyone(config.admin_allow):
        raise ConfigError("admin_allow", f"admits every address on {public[0]}; narrow it")
