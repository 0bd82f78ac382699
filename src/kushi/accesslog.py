"""One access-log record per request or tunnel, in Squid's native format or JSON lines.

The Squid-style line keeps Squid's first ten fields, so existing log tools read it, and
adds what a user checking IPv6 needs: the egress family, the bytes received from the client
and the attempts that lost (README.md shows examples).
"""

from __future__ import annotations

import json
import os
import sys
import threading
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
    user: str = ""
    connect_ms: float = 0.0  # 0 when a pooled connection was reused

    def to_json(self) -> str:
        # (dataclasses.asdict deep-copies every field: three times slower than this.)
        data = {name: getattr(self, name) for name in _FIELDS}
        data["time"] = round(self.time + self.duration, 6)
        data["duration_ms"] = round(self.duration * 1000, 3)
        del data["duration"]
        return _JSON.encode(data)

    def to_squid(self) -> str:
        if self.method == "CONNECT" or self.mode == "tcp":
            result = "TCP_TUNNEL"
        elif self.error:
            result = "TCP_MISS_ABORTED" if self.status in (0, 200) else "NONE_NONE"
        else:
            result = "TCP_MISS"
        hier = f"HIER_DIRECT/{self.upstream}" if self.upstream else "HIER_NONE/-"
        extra = []
        if self.error:
            extra.append(f"error={self.error}")
        if self.attempts:
            # "fallback" only when another address was really tried after a failed one
            # (a success after losers, or several failures); one failure is an attempt.
            followed = not self.error or len(self.attempts) > 1
            label = "fallback: " if followed else "attempt: "
            extra.append(label + "; ".join(self.attempts))
        if self.details and not self.attempts:
            extra.append(self.details)
        note = json.dumps(" ".join(extra)) if extra else "-"
        return (
            f"{self.time + self.duration:.3f} {round(self.duration * 1000):6d} {self.client} "
            f"{result}/{self.status:03d} {self.bytes_out} {self.method} {self.target} "
            f"{self.user or '-'} {hier} {self.content_type or '-'} {self.family or '-'} "
            f"up={self.bytes_in} {note}"
        )


_FIELDS = tuple(f.name for f in fields(AccessRecord))
_JSON = json.JSONEncoder(separators=(",", ":"))


class AccessLog:
    """Writes formatted records to a file (appending) or stdout (``-``); None is off."""

    _lock = threading.Lock()

    def __init__(self, path: str | None, fmt: Literal["squid", "json"] = "squid") -> None:
        self.path = path
        self.fmt = fmt
        self._stream: IO[str] | None = None
        if path == "-":
            self._stream = sys.stdout
        elif path:
            try:
                self._stream = open(path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115
            except OSError as exc:
                raise ConfigError("access_log", f"{path}: {exc.strerror}") from None

    def write(self, record: AccessRecord) -> None:
        if self._stream is None:
            return
        line = record.to_json() if self.fmt == "json" else record.to_squid()
        try:
            self._stream.write(line + "\n")
            if self._stream is sys.stdout:
                self._stream.flush()
        except (OSError, ValueError):
            pass

    def close(self) -> None:
        if self._stream is not None and self._stream is not sys.stdout:
            self._stream.close()
        self._stream = None


def describe_path(path: str | None) -> str:
    if path is None:
        return "off"
    return "stdout" if path == "-" else os.path.abspath(path)
