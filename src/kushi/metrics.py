"""Counters for Prometheus and the status page, fed by access records.

Every finished request or tunnel produces one ``AccessRecord``; ``Metrics.observe`` turns
it into counter increments (requests by listener, mode, egress family and status class;
tunnels; bytes each way; error types; Happy Eyeballs fallbacks; upstream connect time).
The per-request counts are gathered in a plain dict and added to the prometheus counters
by ``flush``: before every scrape and read-back, and once a second in each worker, so
another worker's latest requests reach ``/metrics`` within a second.
Gauges that describe the present (open connections and tunnels, uptime) are set by the
admin listener just before it answers a scrape.

The record is the only input, so everything here can be tested by feeding records. The
helpers that read a record (``status_class``, ``family_label``, ``fallback_of``,
``connect_seconds``) are pure functions, and so is ``Timeline``, the per-family request
history the status page draws: it is sampled from the counter totals with an explicit
time, never from a clock of its own.

Worker processes: prometheus-client keeps each counter in a memory-mapped file per process
when ``PROMETHEUS_MULTIPROC_DIR`` is set before it is imported (``kushi.admin.prepare``
does that in the parent, before the workers fork). ``Metrics(multiprocess_dir=...)`` then
answers scrapes from every worker's files, so ``/metrics`` counts the traffic of all
workers.
"""

from __future__ import annotations

import collections
import os
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

from kushi import __version__
from kushi.accesslog import AccessRecord
from kushi.auth import LIMITS as AUTH_LIMITS

#: Egress families, in the order the status page shows them; "none" means no upstream.
FAMILIES = ("ipv6", "ipv4", "nat64")
CONNECT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
#: What Prometheus is told it receives (the classic text format, which every scraper reads).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_ATTEMPT_FAMILY_RE = re.compile(r"(ipv6|ipv4|nat64) ")


def status_class(status: int) -> str:
    """``2xx``, ``4xx``...; ``none`` when no status was sent (the client left first)."""
    return f"{status // 100}xx" if 100 <= status <= 599 else "none"


def family_label(family: str) -> str:
    return family or "none"


def is_tunnel(record: AccessRecord) -> bool:
    """A CONNECT tunnel (HTTP or SOCKS5) or a TCP-mode connection that reached its upstream."""
    return (record.method in TUNNEL_METHODS or record.mode == "tcp") and bool(record.upstream)


TUNNEL_METHODS = frozenset({"CONNECT", "SOCKS5-CONNECT"})


def socks_command(record: AccessRecord) -> str | None:
    """``connect``, ``udp`` or ``handshake`` (ended before its request) for a SOCKS5
    session's record, None for any other record."""
    method = record.method
    if not method.startswith("SOCKS5"):
        return None
    return {"SOCKS5-CONNECT": "connect", "SOCKS5-UDP": "udp"}.get(method, "handshake")


def fallback_of(record: AccessRecord) -> tuple[str, str] | None:
    """``(from_family, to_family)`` when an attempt of another family lost to the winner.

    ``record.attempts`` lists the attempts that did not win, as ``Attempt.describe()``
    wrote them (``"ipv6 [2001:db8::1]:80 no answer after 250 ms"``); the first one of a
    family other than the winning ``record.family`` is the family kushi fell back from."""
    if not record.family or not record.attempts:
        return None
    for attempt in record.attempts:
        match = _ATTEMPT_FAMILY_RE.match(attempt)
        if match and match.group(1) != record.family:
            return match.group(1), record.family
    return None


def connect_seconds(record: AccessRecord) -> float | None:
    """How long the upstream connect took, if the record says (``connect_ms``), else None.

    Records for requests sent down a reused connection carry no connect time."""
    value = getattr(record, "connect_ms", None)
    if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
        return float(value) / 1000.0
    return None


@dataclass(slots=True)
class Totals:
    """Counter totals read back from the registry (all workers in multiprocess mode)."""

    requests: dict[str, float] = field(default_factory=dict)  # by family label
    tunnels: float = 0.0
    errors: dict[str, float] = field(default_factory=dict)  # by error type
    bytes_in: float = 0.0  # client to upstream
    bytes_out: float = 0.0  # upstream to client
    fallbacks: float = 0.0
    socks: dict[str, float] = field(default_factory=dict)  # SOCKS5 sessions by command
    datagrams: float = 0.0  # SOCKS5 UDP datagrams relayed, both ways
    reloads: float = 0.0
    open_connections: float = 0.0
    open_tunnels: float = 0.0

    @property
    def request_count(self) -> float:
        return sum(self.requests.values())


class Metrics:
    """The counters kushi exports, in a registry of their own."""

    def __init__(self, *, multiprocess_dir: str | None = None) -> None:
        self.multiprocess_dir = multiprocess_dir
        self._children: dict[tuple[Any, ...], Any] = {}
        # Per-request counts gather here and reach the prometheus counters in ``flush``
        # (before every scrape or read-back, and once a second from each worker):
        # a dict increment instead of three locked counter updates per request.
        self._pending: dict[tuple[Any, ...], float] = {}
        registry = self.registry = CollectorRegistry()
        self.requests = Counter(
            "kushi_requests",
            "Requests and tunnels handled, by egress family (none: no upstream was used).",
            ["listener", "mode", "family", "status_class"],
            registry=registry,
        )
        self.tunnels = Counter(
            "kushi_tunnels",
            "CONNECT tunnels and TCP-mode connections that reached their upstream.",
            ["listener", "mode", "family"],
            registry=registry,
        )
        self.spliced = Counter(
            "kushi_tunnel_splice",
            "Tunnels whose bytes splice(2) moved socket to socket in the kernel (config "
            "splice; both ends plain TCP).",
            ["listener", "mode"],
            registry=registry,
        )
        self.socks = Counter(
            "kushi_socks_sessions",
            "SOCKS5 sessions (on SOCKS and forward listeners), by command (connect, udp, or "
            "handshake: ended before its request), egress family and status class.",
            ["listener", "mode", "command", "family", "status_class"],
            registry=registry,
        )
        self.datagrams = Counter(
            "kushi_socks_udp_datagrams",
            "UDP datagrams relayed for SOCKS5 UDP ASSOCIATE, by direction and egress family.",
            ["listener", "mode", "direction", "family"],
            registry=registry,
        )
        self.connect_time = Histogram(
            "kushi_upstream_connect_seconds",
            "Time to connect to the upstream (including Happy Eyeballs attempts), by family.",
            ["family"],
            buckets=CONNECT_BUCKETS,
            registry=registry,
        )
        self.dns_lookup_time = Histogram(
            "kushi_dns_lookup_seconds",
            "Time of DNS queries sent to the nameservers (cache hits not included), by "
            "record type (AAAA, A).",
            ["type"],
            buckets=CONNECT_BUCKETS,
            registry=registry,
        )
        self.dns_cache_results = Counter(
            "kushi_dns_cache",
            "DNS cache look-ups by result: hit, miss (a query was sent) or stale (an expired "
            "answer used because no nameserver answered, RFC 8767).",
            ["result"],
            registry=registry,
        )
        self.fallbacks = Counter(
            "kushi_happy_eyeballs_fallbacks",
            "Requests whose upstream was reached in another family after an attempt failed "
            "or did not answer in time.",
            ["from_family", "to_family"],
            registry=registry,
        )
        self.bytes = Counter(
            "kushi_bytes",
            "Bytes relayed, by direction and egress family.",
            ["direction", "family"],
            registry=registry,
        )
        self.errors = Counter(
            "kushi_errors",
            "Requests that ended in an error, by Proxy-Status error type (RFC 9209).",
            ["error_type"],
            registry=registry,
        )
        self.auth_refusals = Counter(
            "kushi_auth_refusals",
            "Requests refused by proxy authentication: 407 (no or wrong credentials) and "
            "429 (too many failed attempts from one client, answered without a bcrypt check).",
            ["status"],
            registry=registry,
        )
        self.auth_limits = Gauge(
            "kushi_auth_limit",
            "The proxy-authentication limits in force (see SECURITY.md).",
            ["limit"],
            multiprocess_mode="max",
            registry=registry,
        )
        for name, value in AUTH_LIMITS.items():
            self.auth_limits.labels(limit=name).set(value)
        self.reloads = Counter(
            "kushi_config_reloads",
            "Successful configuration reloads (SIGHUP).",
            registry=registry,
        )
        self.open_connections = Gauge(
            "kushi_open_connections",
            "Client connections open now.",
            multiprocess_mode="livesum",
            registry=registry,
        )
        self.open_tunnels = Gauge(
            "kushi_open_tunnels",
            "CONNECT tunnels and TCP-mode relays open now.",
            multiprocess_mode="livesum",
            registry=registry,
        )
        self.uptime = Gauge(
            "kushi_uptime_seconds",
            "Seconds since this kushi process started.",
            multiprocess_mode="livemax",
            registry=registry,
        )
        self.info = Gauge(
            "kushi_info",
            "Always 1; the version is in the label.",
            ["version"],
            multiprocess_mode="max",
            registry=registry,
        )
        self.info.labels(version=__version__).set(1)
        self.listener_info = Gauge(
            "kushi_listener_info",
            "Always 1, one per listener: its mode and whether it speaks TLS (tls=yes/no).",
            ["listener", "mode", "tls"],
            multiprocess_mode="max",
            registry=registry,
        )
        self.tls_failures = Counter(
            "kushi_tls_handshake_failures",
            "Connections to a TLS listener whose handshake failed or timed out (plain text "
            "or garbage sent to the TLS port, no common protocol, a client that stopped): "
            "closed without reading anything of them.",
            ["listener", "mode", "reason"],
            registry=registry,
        )
        for a, b in (("ipv6", "ipv4"), ("ipv4", "ipv6"), ("nat64", "ipv4"), ("ipv4", "nat64")):
            self.fallbacks.labels(from_family=a, to_family=b)
        self._sources: list[Collector]
        if multiprocess_dir is None:
            ProcessCollector(registry=registry)
            self.serving = registry
            self._sources = [
                self.requests,
                self.tunnels,
                self.spliced,
                self.socks,
                self.datagrams,
                self.tls_failures,
                self.errors,
                self.bytes,
                self.fallbacks,
                self.reloads,
                self.open_connections,
                self.open_tunnels,
            ]
        else:
            self.serving = CollectorRegistry()
            collector = MultiProcessCollector(  # type: ignore[no-untyped-call]
                self.serving, path=multiprocess_dir
            )
            self._sources = [collector]

    def _child(self, metric: Any, *values: str) -> Any:
        """``metric.labels(*values)``, looked up once per label set (labels() is slow)."""
        key = (id(metric), *values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*values)
        return child

    def observe(self, record: AccessRecord) -> None:
        """Count one finished request or tunnel (a ``Services.hooks`` callable)."""
        family = family_label(record.family)
        pending = self._pending
        key: tuple[Any, ...] = (
            self.requests,
            record.listener,
            record.mode,
            family,
            status_class(record.status),
        )
        pending[key] = pending.get(key, 0) + 1
        if is_tunnel(record):
            key = (self.tunnels, record.listener, record.mode, family)
            pending[key] = pending.get(key, 0) + 1
            if record.spliced:
                key = (self.spliced, record.listener, record.mode)
                pending[key] = pending.get(key, 0) + 1
        command = socks_command(record)
        if command is not None:
            key = (
                self.socks,
                record.listener,
                record.mode,
                command,
                family,
                status_class(record.status),
            )
            pending[key] = pending.get(key, 0) + 1
            for direction, count in (
                ("client_to_upstream", record.datagrams_in),
                ("upstream_to_client", record.datagrams_out),
            ):
                if count:
                    key = (self.datagrams, record.listener, record.mode, direction, family)
                    pending[key] = pending.get(key, 0) + count
        if record.bytes_in:
            key = (self.bytes, "client_to_upstream", family)
            pending[key] = pending.get(key, 0) + record.bytes_in
        if record.bytes_out:
            key = (self.bytes, "upstream_to_client", family)
            pending[key] = pending.get(key, 0) + record.bytes_out
        if record.method == "TLS" and record.error:
            reason = "timeout" if record.status == 408 else "failed"
            key = (self.tls_failures, record.listener, record.mode, reason)
            pending[key] = pending.get(key, 0) + 1
        if record.error:
            self.errors.labels(error_type=record.error).inc()
            if record.status in (407, 429):
                self.auth_refusals.labels(status=str(record.status)).inc()
        seconds = connect_seconds(record)
        if seconds is not None:
            # Only a new connection has attempts of its own (connect_ms is 0 on a reused one).
            self.connect_time.labels(family=family).observe(seconds)
            fallback = fallback_of(record)
            if fallback is not None:
                self.fallbacks.labels(from_family=fallback[0], to_family=fallback[1]).inc()

    def set_listeners(self, listeners: Iterable[tuple[str, str, bool]]) -> None:
        """``kushi_listener_info`` for the listeners in force: (name, mode, tls)."""
        self.listener_info.clear()
        for name, mode, tls in listeners:
            self.listener_info.labels(listener=name, mode=mode, tls="yes" if tls else "no").set(1)

    def dns_lookup(self, rdtype: str, seconds: float) -> None:
        """One DNS query answered (or given up) after ``seconds`` (a resolver observer)."""
        self._child(self.dns_lookup_time, rdtype).observe(seconds)

    def dns_cache(self, result: str, count: int = 1) -> None:
        """``count`` cache look-ups: ``hit``, ``miss`` or ``stale`` (a resolver observer)."""
        key = (self.dns_cache_results, result)
        self._pending[key] = self._pending.get(key, 0) + count

    def flush(self) -> None:
        """Add the counts gathered since the last flush to the prometheus counters."""
        pending, self._pending = self._pending, {}
        for (metric, *labels), amount in pending.items():
            self._child(metric, *labels).inc(amount)

    def set_gauges(self, *, connections: int, tunnels: int | None, started: float) -> None:
        self.flush()
        self.open_connections.set(connections)
        if tunnels is not None:
            self.open_tunnels.set(tunnels)
        self.uptime.set(max(0.0, time.time() - started))

    def prune_dead_workers(self) -> None:
        """Forget the live gauges of worker processes that have exited (multiprocess mode)."""
        if self.multiprocess_dir is None:
            return
        pids: set[int] = set()
        for path in Path(self.multiprocess_dir).glob("gauge_live*_*.db"):
            text = path.stem.rpartition("_")[2]
            if text.isdigit():
                pids.add(int(text))
        for pid in pids:
            if not _alive(pid):
                mark_process_dead(pid, self.multiprocess_dir)  # type: ignore[no-untyped-call]

    def render(self) -> bytes:
        """The Prometheus text exposition of every counter (all workers' in multiprocess)."""
        self.flush()
        self.prune_dead_workers()
        return generate_latest(self.serving)

    def totals(self) -> Totals:
        """Read the counters back (summed over every worker in multiprocess mode)."""
        self.flush()
        self.prune_dead_workers()
        out = Totals()
        for source in self._sources:
            for family in source.collect():
                self._add(out, family.samples)
        return out

    @staticmethod
    def _add(out: Totals, samples: Iterable[Sample]) -> None:
        for name, labels, value, *_ in samples:
            if name == "kushi_requests_total":
                key = labels.get("family", "none")
                out.requests[key] = out.requests.get(key, 0.0) + value
            elif name == "kushi_tunnels_total":
                out.tunnels += value
            elif name == "kushi_socks_sessions_total":
                key = labels.get("command", "")
                out.socks[key] = out.socks.get(key, 0.0) + value
            elif name == "kushi_socks_udp_datagrams_total":
                out.datagrams += value
            elif name == "kushi_errors_total":
                key = labels.get("error_type", "")
                out.errors[key] = out.errors.get(key, 0.0) + value
            elif name == "kushi_bytes_total":
                if labels.get("direction") == "client_to_upstream":
                    out.bytes_in += value
                else:
                    out.bytes_out += value
            elif name == "kushi_happy_eyeballs_fallbacks_total":
                out.fallbacks += value
            elif name == "kushi_config_reloads_total":
                out.reloads += value
            elif name == "kushi_open_connections":
                out.open_connections += value
            elif name == "kushi_open_tunnels":
                out.open_tunnels += value


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover - someone else's process reusing the pid
        return True
    return True


class Timeline:
    """Requests per egress family in fixed time buckets: the status page's chart.

    ``sample(now, totals)`` adds what the per-family counters grew by since the previous
    sample to the bucket holding ``now``. Sampling counters rather than records keeps the
    chart right with several workers (the counters are summed across them); a request is
    placed at most one sampling interval late."""

    def __init__(self, step: float = 10.0, size: int = 90) -> None:
        self.step = step
        self.size = size
        self._buckets: collections.OrderedDict[int, dict[str, float]] = collections.OrderedDict()
        self._last: dict[str, float] | None = None

    def sample(self, now: float, totals: Mapping[str, float]) -> None:
        if self._last is None:
            self._last = dict(totals)
            return
        delta = {k: v - self._last.get(k, 0.0) for k, v in totals.items()}
        self._last = dict(totals)
        delta = {k: v for k, v in delta.items() if v > 0}
        if not delta:
            return
        index = int(now // self.step)
        bucket = self._buckets.setdefault(index, {})
        for key, value in delta.items():
            bucket[key] = bucket.get(key, 0.0) + value
        oldest = index - self.size + 1
        while self._buckets and next(iter(self._buckets)) < oldest:
            self._buckets.popitem(last=False)

    def series(self, now: float, families: Iterable[str] = FAMILIES) -> dict[str, object]:
        """``{"step", "end", "buckets": [[start_time, n_family1, n_family2, ...], ...]}``,
        oldest first, ``size`` buckets ending with the one that holds ``now``."""
        names = list(families)
        last = int(now // self.step)
        rows: list[list[float]] = []
        for index in range(last - self.size + 1, last + 1):
            bucket = self._buckets.get(index, {})
            rows.append([index * self.step, *(bucket.get(name, 0.0) for name in names)])
        return {
            "step": self.step,
            "end": (last + 1) * self.step,
            "families": names,
            "buckets": rows,
        }
