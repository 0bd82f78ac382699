"""Run-time state built from the ``Config``: shared services and per-listener state.

``Services`` holds what one process shares across listeners (resolver, connector,
upstream pool, the recent-request ring for the status page). ``ListenerState`` is rebuilt
from a listener's config on start and on every reload; connections look it up per request,
so a reload applies to the next request without dropping any connection.
"""

from __future__ import annotations

import collections
import itertools
import logging
import secrets
import ssl
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Literal, Protocol

from kushi.accesslog import AccessLog, AccessRecord
from kushi.acl import AllowList, DestinationPolicy, forwards_by_client_choice, local_addresses
from kushi.auth import Htpasswd
from kushi.backends import BackendSet
from kushi.config import PROXY_MODES, Config, Listener, source_plan
from kushi.config import EgressPolicy as EgressMode
from kushi.connector import Connector, EgressPolicy, Upstream
from kushi.errors import LoopDetected
from kushi.forward import check_connect_port
from kushi.netio import Conn
from kushi.pool import UpstreamPool
from kushi.resolver import IPAddress, Nat64, Resolver, ResolverSettings, ip_literal
from kushi.source import Source, SourcePlan
from kushi.tunnel import relay_tunnel

log = logging.getLogger("kushi")


def egress_policy(cfg: Listener, config: Config, mode: EgressMode | None = None) -> EgressPolicy:
    return EgressPolicy(
        mode=cfg.egress if mode is None else mode,
        nat64=cfg.nat64,
        nat64_prefixes=cfg.nat64_prefixes,
        attempt_delay=config.timeouts.happy_eyeballs_delay,
        connect_timeout=config.timeouts.connect,
        resolution_delay=config.timeouts.resolution_delay,
    )


def resolver_settings(config: Config) -> ResolverSettings:
    return ResolverSettings(
        timeout=config.timeouts.dns,
        min_ttl=config.dns_cache_min_ttl,
        max_ttl=max(config.dns_cache_min_ttl, config.dns_cache_max_ttl),
        stale_ttl=config.dns_cache_stale_ttl,
        size=config.dns_cache_size,
        servers=config.dns_servers,
        resolv_conf=config.resolv_conf,
        hosts_file=config.hosts_file,
    )


@dataclass(frozen=True, slots=True)
class Egress:
    """How one group of requests leaves: the listener's settings, or a ``[users.NAME]``
    table's in their place (``tag`` tells the groups apart in the pool key)."""

    policy: EgressPolicy
    sources: SourcePlan
    tag: str


@dataclass(frozen=True, slots=True)
class EgressChoice:
    """The egress of one request: its policy, its source (None: the default addresses)
    and the pool key part that keeps its connections apart from other sources'."""

    policy: EgressPolicy
    source: Source | None
    pool_tag: Hashable  # (a part of a pool key)


#: Numbers every ListenerState built (start and each reload): part of the pool key, so a
#: connection pooled under one listener's rules is never handed out under another's.
_GENERATION = itertools.count(1)


class ListenerState:
    """One listener's immutable runtime snapshot: a reload builds a new one, and each
    request (or tunnel) holds the one it started with until it is logged. The snapshot's
    access log stays open until its last holder is done."""

    def __init__(self, cfg: Listener, config: Config, previous: ListenerState | None = None):
        self.cfg = cfg
        self.config = config
        self._holders = 0
        self._retired = False
        self.allow = AllowList(cfg.allow)
        if previous is not None:
            for name, addrs in previous.allow.resolved.items():
                if name in self.allow.resolved:
                    self.allow.resolved[name] = addrs
        self.policy = egress_policy(cfg, config)
        # Pooled connections are shared only within one listener and one build of its
        # rules (a reload starts a new generation); a string, so its hash is cached.
        self.pool_tag = f"{cfg.name}#{next(_GENERATION)}#{self.policy!r}"
        self.sources = cfg.source_plan
        self._plain = EgressChoice(self.policy, None, self.pool_tag)
        self._default = Egress(self.policy, self.sources, self.pool_tag)
        # [users.NAME]: each key a user's table sets replaces the listener's own.
        self._users: dict[str, Egress] = {}
        if cfg.auth_file is not None:
            for user in config.users:
                policy = egress_policy(cfg, config, user.egress)
                plan = self.sources
                if user.source is not None or user.source_rotation is not None:
                    plan = source_plan(
                        cfg.source if user.source is None else user.source,
                        user.source_rotation or cfg.source_rotation,
                    )
                tag = f"{self.pool_tag}#user={user.name}#{policy!r}"
                self._users[user.name] = Egress(policy, plan, tag)
        self.access_log = AccessLog(cfg.access_log, cfg.access_log_format)
        self.backends = BackendSet(cfg.backend_addresses, cfg.backend_retry)
        self.trusted = cfg.trusted_proxies
        self.proxy_protocol_from = cfg.proxy_protocol_from
        self.auth = Htpasswd(dict(cfg.auth_users), cfg.auth_file) if cfg.auth_file else None
        #: The TLS context of this build: a reload loads the config and so the files
        #: again, and handshakes from then on present the renewed certificate (kushi.tls).
        self.tls: ssl.SSLContext | None = cfg.tls_context
        # Only forward and SOCKS listeners connect where their clients say; reverse and
        # TCP backends are the owner's own choice.
        self.destinations: DestinationPolicy | None = (
            DestinationPolicy(
                cfg.allow_destinations,
                cfg.deny_destinations,
                cfg.private_destinations,
                nat64_prefixes=cfg.nat64_prefixes,
                own=local_addresses(),
            )
            if forwards_by_client_choice(cfg.mode)
            else None
        )

    def egress(self, client: str, user: str = "", session: int = 0) -> EgressChoice:
        """The egress of a request from ``client`` (an address) as ``user`` ('' when not
        authenticated) on client connection number ``session``."""
        if not self._users and not self.sources:
            return self._plain
        group = self._users.get(user, self._default) if user else self._default
        plan = group.sources
        if not plan:
            return EgressChoice(group.policy, None, group.tag)
        key = plan.key_for(client, user, session)
        return EgressChoice(
            group.policy, Source(plan, key), (group.tag, plan.pool_key(client, user, session))
        )

    def user_egress(self, user: str) -> Egress:
        """The egress settings ``user`` gets here (the listener's when no table names it)."""
        return self._users.get(user, self._default)

    def admission(self, allowed: bool) -> Literal["deny", "admit", "password"]:
        """What a client needs, given whether the allow list admits it: ``auth_combine``
        "both" asks a listed client for its password, "either" admits a listed client
        and asks the others (HTTP ``Proxy-Authorization`` and SOCKS5 RFC 1929 alike)."""
        if self.auth is None or self.cfg.mode not in PROXY_MODES:
            return "admit" if allowed else "deny"
        if not allowed and self.cfg.auth_combine == "both":
            return "deny"
        if allowed and self.cfg.auth_combine == "either":
            return "admit"
        return "password"

    def hold(self) -> None:
        """A request or tunnel starts using this snapshot."""
        self._holders += 1

    def release(self) -> None:
        self._holders -= 1
        if self._retired and self._holders <= 0:
            self.access_log.close()

    def retire(self) -> None:
        """Replaced by a reload: close the log once the requests still using it are done."""
        self._retired = True
        if self._holders <= 0:
            self.access_log.close()

    def close(self) -> None:
        self.access_log.close()


RecordHook = Callable[[AccessRecord], None]
Lifecycle = Literal["running", "draining", "stopped"]


class Idle(Protocol):
    def close_idle(self) -> None: ...


@dataclass(eq=False)
class Services:
    config: Config
    resolver: Resolver
    connector: Connector
    pool: UpstreamPool
    pseudonym: str = field(default_factory=lambda: "kushi-" + secrets.token_hex(3))
    own_addresses: set[tuple[IPAddress, int]] = field(default_factory=set)
    #: Every address of this host: a listener on 0.0.0.0 or [::] is reached at any of them.
    host_addresses: frozenset[IPAddress] = field(default_factory=local_addresses)
    recent: collections.deque[AccessRecord] = field(
        default_factory=lambda: collections.deque(maxlen=200)
    )
    hooks: list[RecordHook] = field(default_factory=list)
    started: float = field(default_factory=time.time)
    #: The process's one lifecycle state: running, then draining (SIGTERM: listeners
    #: closed, sessions finish their request and close), then stopped.
    lifecycle: Lifecycle = "running"
    open_tunnels: int = 0
    #: Client connections waiting for their next request head (closed at shutdown).
    idle: set[Idle] = field(default_factory=set)

    @property
    def stopping(self) -> bool:
        """Draining or stopped: no new request starts on a kept-alive connection."""
        return self.lifecycle != "running"

    @classmethod
    def build(cls, config: Config, pseudonym: str | None = None) -> Services:
        resolver = Resolver(settings=resolver_settings(config))
        nat64 = Nat64(
            mode=config.nat64_synthesis,
            prefix=config.nat64_prefix,
            interval=config.nat64_discovery_interval,
        )
        services = cls(
            config=config,
            resolver=resolver,
            connector=Connector(resolver, nat64=nat64),
            pool=UpstreamPool(config.limits.upstream_pool_size, idle_timeout=30.0),
        )
        if pseudonym:
            services.pseudonym = pseudonym
        services.connector.check = services.check_destination
        return services

    def check_destination(self, addr: IPAddress, port: int) -> str | None:
        """Raise ``LoopDetected`` for one of kushi's own listening sockets (a forwarding
        loop: RFC 9209 ``proxy_loop_detected``). An unspecified listener covers the
        loopback address of its own family only: ``[::]`` is bound IPv6-only (server.bind),
        so 127.0.0.1 on the same port is another program; ``0.0.0.0`` does not cover ::1."""
        for own, own_port in self.own_addresses:
            if own_port != port:
                continue
            if own == addr or (
                own.is_unspecified
                and own.version == addr.version
                and (addr.is_loopback or addr in self.host_addresses)
            ):
                raise LoopDetected(f"{addr} port {port} is this kushi's own listening address")
        return None

    def add_own(self, host: str, port: int) -> None:
        addr = ip_literal(host)
        if addr is not None:
            self.own_addresses.add((addr, port))

    async def open_tunnel(
        self, state: ListenerState, host: str, port: int, record: AccessRecord, what: str
    ) -> Upstream:
        """The upstream of a CONNECT tunnel (HTTP or SOCKS5, ``what``): ``connect_ports``
        first, then the one egress path; the record learns how it was reached."""
        check_connect_port(port, state.cfg.connect_ports, what)
        egress = state.egress(record.client, record.user)
        upstream = await self.connector.connect(
            host, port, egress.policy, state.destinations, egress.source
        )
        record.upstream = upstream.next_hop
        record.source = upstream.source
        record.family = upstream.family
        record.attempts = [a.describe() for a in upstream.fallbacks]
        record.notes = upstream.report_notes
        record.connect_ms = round(upstream.connect_time * 1000, 3)
        return upstream

    async def relay(self, a: Conn, b: Conn, record: AccessRecord | None = None) -> tuple[int, int]:
        """A tunnel (CONNECT, upgrade or TCP mode), counted while open. A tunnel that
        ended because either side reset its connection is marked aborted in ``record``
        (Squid's TCP_TUNNEL_ABORTED); a close from either side is a normal end."""
        self.open_tunnels += 1
        try:
            moved = await relay_tunnel(
                a, b, self.config.timeouts.tunnel_idle, splice=self.config.splice
            )
        finally:
            self.open_tunnels -= 1
        if record is not None:
            record.spliced = moved.spliced
            if a.reset or b.reset:
                record.aborted = True
        return moved.a_to_b, moved.b_to_a

    def record(self, listener: ListenerState, record: AccessRecord) -> None:
        listener.access_log.write(record)
        self.recent.append(record)
        for hook in self.hooks:
            try:
                hook(record)
            except Exception:  # pragma: no cover - a broken hook must not break traffic
                log.exception("record hook failed")
