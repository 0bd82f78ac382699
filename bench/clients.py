"""The load generators: wrk (keep-alive), ab (no keep-alive) and curl (bulk bodies)."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.procs import BenchError, run

WRK_THREADS = 2
CONNECTIONS = 50

# wrk's done() hook prints one JSON line; wrk runs LuaJIT, whose %d truncates numbers.
_WRK_DONE = r"""
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "BENCHJSON {\"requests\":%d,\"duration_us\":%d,\"bytes\":%d,\"connect\":%d," ..
    "\"read\":%d,\"write\":%d,\"status\":%d,\"timeout\":%d," ..
    "\"p50_us\":%d,\"p99_us\":%d,\"max_us\":%d}\n",
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write,
    e.status, e.timeout, latency:percentile(50), latency:percentile(99), latency.max))
end
"""


@dataclass
class WrkResult:
    rps: float
    requests: int
    p50_ms: float
    p99_ms: float
    max_ms: float
    bytes_per_request: float
    errors_connect: int
    errors_read: int
    errors_write: int
    errors_timeout: int
    non_2xx: int  # wrk counts responses with status > 399 here

    @property
    def errors(self) -> int:
        return (
            self.errors_connect
            + self.errors_read
            + self.errors_write
            + self.errors_timeout
            + self.non_2xx
        )

    @property
    def closes_every_response(self) -> bool:
        """One read error per request: the server closed each keep-alive connection after
        one response without saying ``Connection: close``, and wrk found out on its next
        write/read (it then reconnects, so the request count is still real)."""
        return (
            self.errors_read > 0
            and abs(self.errors_read - self.requests) <= CONNECTIONS
            and self.errors - self.errors_read == 0
        )

    def error_text(self) -> str:
        if self.closes_every_response:
            return (
                f"{self.errors_read} read errors, one per response: the connection is closed "
                "after every response without `Connection: close` (no keep-alive)"
            )
        parts = [
            f"{n} {what}"
            for n, what in (
                (self.non_2xx, "non-2xx"),
                (self.errors_connect, "connect"),
                (self.errors_read, "read"),
                (self.errors_write, "write"),
                (self.errors_timeout, "timeout"),
            )
            if n
        ]
        return ", ".join(parts)

    def as_dict(self) -> dict[str, object]:
        return {**asdict(self), "errors": self.errors}


def write_wrk_script(path: Path, request_path: str, host_header: str | None) -> Path:
    lines = [f'wrk.path = "{request_path}"']
    if host_header:
        lines.append(f'wrk.headers["Host"] = "{host_header}"')
    path.write_text("\n".join(lines) + "\n" + _WRK_DONE)
    return path


def wrk(url: str, script: Path, duration: float) -> WrkResult:
    """``wrk -t2 -c50 -dS --latency -s script url``; the script sets the request line."""
    argv = [
        "wrk",
        f"-t{WRK_THREADS}",
        f"-c{CONNECTIONS}",
        f"-d{max(1, round(duration))}s",
        "--timeout",
        "5s",
        "--latency",
        "-s",
        str(script),
        url,
    ]
    proc = run(argv, timeout=duration + 60)
    m = re.search(r"^BENCHJSON (\{.*\})$", proc.stdout, re.M)
    if proc.returncode != 0 or not m:
        tail = (proc.stderr or proc.stdout).strip()[-300:]
        raise BenchError(f"wrk failed (exit {proc.returncode}): {tail}")
    d = json.loads(m.group(1))
    requests = int(d["requests"])
    seconds = max(int(d["duration_us"]), 1) / 1e6
    return WrkResult(
        rps=requests / seconds,
        requests=requests,
        p50_ms=d["p50_us"] / 1000,
        p99_ms=d["p99_us"] / 1000,
        max_ms=d["max_us"] / 1000,
        bytes_per_request=d["bytes"] / requests if requests else 0.0,
        errors_connect=int(d["connect"]),
        errors_read=int(d["read"]),
        errors_write=int(d["write"]),
        errors_timeout=int(d["timeout"]),
        non_2xx=int(d["status"]),
    )


@dataclass
class AbResult:
    rps: float
    complete: int
    failed: int
    non_2xx: int
    exceptions: int
    seconds: float

    @property
    def errors(self) -> int:
        return self.failed + self.non_2xx + self.exceptions

    def error_text(self) -> str:
        parts = [
            f"{n} {what}"
            for n, what in (
                (self.failed, "failed"),
                (self.non_2xx, "non-2xx"),
                (self.exceptions, "exceptions"),
            )
            if n
        ]
        return ", ".join(parts)

    def as_dict(self) -> dict[str, object]:
        return {**asdict(self), "errors": self.errors}


def _ab_int(pattern: str, text: str, default: int = 0) -> int:
    m = re.search(pattern, text, re.M)
    return int(m.group(1)) if m else default


def ab(url: str, proxy: str | None, requests: int, time_limit: float) -> AbResult:
    """``ab -c 50 -n N [-X proxy] url``, no keep-alive; ``-t`` bounds the time."""
    # -t first: it sets an internal -n 50000 that the -n after it overrides.
    argv = ["ab", "-q", "-r", "-t", str(max(1, round(time_limit))), "-n", str(requests)]
    argv += ["-c", str(CONNECTIONS), "-s", "10"]
    if proxy:
        argv += ["-X", proxy]
    argv.append(url)
    proc = run(argv, timeout=time_limit + 60)
    out = proc.stdout
    rps_m = re.search(r"^Requests per second:\s+([\d.]+)", out, re.M)
    if proc.returncode != 0 or not rps_m:
        tail = (proc.stderr or out).strip()[-300:]
        raise BenchError(f"ab failed (exit {proc.returncode}): {tail}")
    secs_m = re.search(r"^Time taken for tests:\s+([\d.]+)", out, re.M)
    complete = _ab_int(r"^Complete requests:\s+(\d+)", out)
    failed = _ab_int(r"^Failed requests:\s+(\d+)", out)
    non2xx = _ab_int(r"^Non-2xx responses:\s+(\d+)", out)
    exceptions = _ab_int(r"Exceptions: (\d+)", out)
    return AbResult(
        rps=float(rps_m.group(1)),
        complete=complete,
        failed=failed,
        non_2xx=non2xx,
        exceptions=exceptions,
        seconds=float(secs_m.group(1)) if secs_m else 0.0,
    )


@dataclass
class CurlResult:
    mb_per_s: float
    bytes: int
    seconds: float
    http_code: int
    ok: bool
    problem: str

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def curl_args(proxy: str | None, tunnel: bool, socks: bool = False) -> list[str]:
    """Through an HTTP proxy (a CONNECT tunnel when ``tunnel``), or a SOCKS5 one."""
    if proxy is None:
        return ["--noproxy", "*"]
    if socks:
        return ["--proxy", f"socks5h://{proxy}"]
    return (["-p"] if tunnel else []) + ["-x", f"http://{proxy}"]


def curl_get(url: str, proxy: str | None, tunnel: bool = False, timeout: float = 10) -> str:
    """A small GET (used for the readiness and origin checks); returns the body."""
    argv = ["curl", "-sS", "-g", "--fail", "--max-time", str(timeout)]
    argv += curl_args(proxy, tunnel) + [url]
    proc = run(argv, timeout=timeout + 10)
    if proc.returncode != 0:
        raise BenchError(f"curl {url} failed: {proc.stderr.strip()[-200:]}")
    return proc.stdout


def curl_download(
    url: str,
    proxy: str | None,
    tunnel: bool,
    out: Path,
    size: int,
    digest: str,
    socks: bool = False,
) -> CurlResult:
    """Download a body through the proxy to a file, then check its length and sha256."""
    out.unlink(missing_ok=True)
    argv = ["curl", "-sS", "-g", "--max-time", "300", "-o", str(out)]
    argv += ["-w", "%{http_code} %{size_download} %{time_total}"]
    argv += curl_args(proxy, tunnel, socks) + [url]
    proc = run(argv, timeout=330)
    parts = proc.stdout.split()
    if proc.returncode != 0 or len(parts) != 3:
        problem = f"curl exit {proc.returncode}: {proc.stderr.strip()[-200:]}"
        out.unlink(missing_ok=True)
        return CurlResult(0.0, 0, 0.0, 0, False, problem)
    code, nbytes, secs = int(parts[0]), int(parts[1]), float(parts[2])
    problem = ""
    if code != 200:
        problem = f"HTTP {code}"
    elif nbytes != size or not out.exists() or out.stat().st_size != size:
        got = out.stat().st_size if out.exists() else 0
        problem = f"got {got} bytes, expected {size}"
    elif sha256_file(out) != digest:
        problem = "sha256 mismatch"
    out.unlink(missing_ok=True)
    mbps = nbytes / secs / 1e6 if secs > 0 else 0.0
    return CurlResult(mbps, nbytes, secs, code, not problem, problem)
