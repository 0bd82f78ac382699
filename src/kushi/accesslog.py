"""One access-log record per request or tunnel, in Squid's native format or JSON lines.

The Squid-style line keeps Squid's first ten fields, so existing log tools read it, and
adds what a user checking IPv6 needs: the egress family, the bytes received from the client
and the attempts that lost (README.md shows examples).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from dataclasses import dataclass, field, fields
from typing import IO, Literal

from kushi.errors import ConfigError


@dataclass(slots=True)
class AccessRecord:
    #: When the request's first byte arrived (or the connection was accepted); both
    #: formats write the time it ended (``time + duration``), as Squid does.
    time: float
    listener: str
    mode: str
    client: str
    method: str = "-"
    target: str = "-"
    status: int = 0
    bytes_in: int = 0  # from the client
    bytes_out: int = 0  # to the client
    duration: float = 0.0
    upstream: str = ""
    family: str = ""
    error: str = ""
    details: str = ""
    content_type: str = ""
    attempts: list[str] = field(default_factory=list)
    #: The connector's notes: the IPv4 address behind NAT64, a stale DNS answer used.
    notes: list[str] = field(default_factory=list)
    user: str = ""
    #: The configured source address the upstream connection left from ('' for the
    #: host's default address).
    source: str = ""
    connect_ms: float = 0.0  # 0 when a pooled connection was reused
    datagrams_in: int = 0  # SOCKS5 UDP ASSOCIATE: relayed from the client
    datagrams_out: int = 0  # and to it
    #: Cut short (by shutdown's grace limit, or either side) after the response began:
    #: ``bytes_out`` is what really left. Squid's ``_ABORTED`` tag suffix.
    aborted: bool = False
    #: The TLS version when the client came over TLS ("TLSv1.3"), else "".
    tls: str = ""
    #: A tunnel whose bytes splice(2) moved socket to socket in the kernel (``splice``).
    spliced: bool = False

    def __init__(
        self,
        time: float,
        listener: str,
        mode: str,
        client: str,
        *,
        method: str = "-",
        target: str = "-",
        status: int = 0,
        bytes_in: int = 0,
        bytes_out: int = 0,
        duration: float = 0.0,
        upstream: str = "",
        family: str = "",
        error: str = "",
        details: str = "",
        content_type: str = "",
        attempts: list[str] | None = None,
        notes: list[str] | None = None,
        user: str = "",
        source: str = "",
        connect_ms: float = 0.0,
        datagrams_in: int = 0,
        datagrams_out: int = 0,
        aborted: bool = False,
        tls: str = "",
        spliced: bool = False,
    ) -> None:
        self.time = time
        self.listener = listener
        self.mode = mode
        self.client = client
        self.method = method
        self.target = target
        self.status = status
        self.bytes_in = bytes_in
        self.bytes_out = bytes_out
        self.duration = duration
        self.upstream = upstream
        self.family = family
        self.error = error
        self.details = details
        self.content_type = content_type
        self.attempts = [] if attempts is None else attempts
        self.notes = [] if notes is None else notes
        self.user = user
        self.source = source
        self.connect_ms = connect_ms
        self.datagrams_in = datagrams_in
        self.datagrams_out = datagrams_out
        self.aborted = aborted
        self.tls = tls
        self.spliced = spliced

    def to_json(self) -> str:
        # (dataclasses.asdict deep-copies every field: three times slower than this.)
        data = {name: getattr(self, name) for name in _FIELDS}
        data["time"] = round(self.time + self.duration, 6)
        data["duration_ms"] = round(self.duration * 1000, 3)
        del data["duration"]
        return _JSON.encode(data)

    def to_squid(self) -> str:
        # Squid's result codes: refusals by policy are TCP_DENIED (whatever the method);
        # a transfer cut short keeps its tag with the _ABORTED suffix.
        if self.error in _DENIED and self.status in (403, 407):
            result = "TCP_DENIED"
        elif self.method in ("CONNECT", "SOCKS5-CONNECT") or self.mode == "tcp":
            result = "TCP_TUNNEL"
        elif self.error and not self.aborted and not self.upstream:
            result = "NONE_NONE"
        else:
            result = "TCP_MISS"
        if self.aborted:
            result += "_ABORTED"
        hier = f"HIER_DIRECT/{_host_only(self.upstream)}" if self.upstream else "HIER_NONE/-"
        extra = []
        if self.tls:
            extra.append(f"tls={self.tls}")
        if self.error:
            extra.append(f"error={self.error}")
        if self.source:
            extra.append(f"source={self.source}")
        if self.datagrams_in or self.datagrams_out:
            extra.append(f"datagrams={self.datagrams_in}/{self.datagrams_out}")
        if self.attempts:
            # "fallback" only when another address was really tried after a failed one
            # (a success after losers, or several failures); one failure is an attempt.
            followed = not self.error or len(self.attempts) > 1
            label = "fallback: " if followed else "attempt: "
            extra.append(label + "; ".join(self.attempts))
        if self.details and not self.attempts:
            extra.append(self.details)
        extra.extend(self.notes)
        note = json.dumps(" ".join(extra)) if extra else "-"
        return (
            f"{self.time + self.duration:.3f} {round(self.duration * 1000):6d} "
            f"{squid_field(self.client)} {result}/{self.status:03d} {self.bytes_out} "
            f"{squid_field(self.method)} "
            f"{squid_field(self.target)} {squid_field(self.user)} {squid_field(hier)} "
            f"{squid_field(self.content_type)} {self.family or '-'} up={self.bytes_in} {note}"
        )


#: Bytes a Squid-format field carries as they are: printable ASCII except space and "%".
_SAFE = frozenset(range(0x21, 0x7F)) - {0x25}


def squid_field(text: str) -> str:
    """One space-free field of the Squid line, escaped as Squid escapes URLs (rfc1738):
    space, "%", control bytes (C0, DEL and, as UTF-8, C1 such as NEL and CSI) and every
    other non-ASCII byte become %XX, so nothing a client or an origin sends can add a
    field, split the line or reach a terminal as a control sequence. Empty is "-"."""
    if not text:
        return "-"
    if text.isascii() and text.isprintable() and " " not in text and "%" not in text:
        return text
    raw = text.encode("utf-8", "surrogateescape")
    return "".join(chr(b) if b in _SAFE else f"%{b:02X}" for b in raw)


_FIELDS = tuple(f.name for f in fields(AccessRecord))
#: Error types of a request refused by kushi's own access rules (Squid: TCP_DENIED/403,
#: TCP_DENIED/407 when credentials are missing or wrong).
_DENIED = frozenset({"http_request_denied"})


def _host_only(hop: str) -> str:
    """``[2001:db8::1]:80`` -> ``2001:db8::1``: Squid's hierarchy field has no port."""
    host = hop.rpartition(":")[0] if hop.rpartition(":")[2].isdigit() else hop
    return host[1:-1] if host.startswith("[") else host


_JSON = json.JSONEncoder(separators=(",", ":"))


class AccessLog:
    """Writes formatted records to a file (appending) or stdout (``-``); None is off.

    Records are written in batches when they come fast: the first record of a turn of the
    event loop is written at once, and the ones that follow it in the same turn are
    formatted and written together (one ``write(2)``) at the end of that turn, after the
    responses that produced them went out. A quiet proxy's lines appear as before, one by
    one; under load, one write serves every request of a turn. ``close`` (shutdown, or the
    last request of a reloaded snapshot) writes what is queued first: nothing is lost."""

    #: A batch is written early once it holds this many records.
    BATCH_MAX = 256

    def __init__(self, path: str | None, fmt: Literal["squid", "json"] = "squid") -> None:
        self.path = path
        self.fmt = fmt
        self._stream: IO[str] | None = None
        self._pending: list[AccessRecord] = []
        self._turn_open = False  # a record was written in this turn of the loop
        if path == "-":
            self._stream = sys.stdout
        elif path:
            try:
                self._stream = open(path, "a", encoding="utf-8")  # noqa: SIM115
            except OSError as exc:
                raise ConfigError("access_log", f"{path}: {exc.strerror}") from None

    def write(self, record: AccessRecord) -> None:
        if self._stream is None:
            return
        if self._turn_open:
            self._pending.append(record)
            if len(self._pending) >= self.BATCH_MAX:
                self.flush()
            return
        self._emit([record])
        try:
            asyncio.get_running_loop().call_soon(self._end_turn)
        except RuntimeError:  # no loop: a tool or a test writing directly
            return
        self._turn_open = True

    def _end_turn(self) -> None:
        self._turn_open = False
        self.flush()

    def flush(self) -> None:
        """Write every queued record."""
        pending, self._pending = self._pending, []
        if pending:
            self._emit(pending)

    def _emit(self, records: list[AccessRecord]) -> None:
        if self._stream is None:
            return
        if self.fmt == "json":
            text = "".join([r.to_json() + "\n" for r in records])
        else:
            text = "".join([r.to_squid() + "\n" for r in records])
        try:
            self._stream.write(text)
            self._stream.flush()
        except (OSError, ValueError):
            pass

    def close(self) -> None:
        self.flush()
        if self._stream is not None and self._stream is not sys.stdout:
            self._stream.close()
        self._stream = None


def describe_path(path: str | None) -> str:
    if path is None:
        return "off"
    return "stdout" if path == "-" else os.path.abspath(path)
