"""Processes the harness starts: free ports, start/wait/stop, and RSS of a process tree."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

# Environment for every child: no proxy variables may leak into curl and friends.
_PROXY_VARS = {
    "http_proxy",
    "https_proxy",
    "all_proxy",
    "no_proxy",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "ALL_PROXY",
    "NO_PROXY",
}


def clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _PROXY_VARS}
    if extra:
        env.update(extra)
    return env


class BenchError(Exception):
    """A row or workload could not be measured; the message goes into the report."""


# ---------------------------------------------------------------------------------------------
# Ports


_taken: set[int] = set()


def free_port() -> int:
    """A TCP port that is free on both 127.0.0.1 and ::1 (and not handed out before)."""
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s4:
            s4.bind(("127.0.0.1", 0))
            port = int(s4.getsockname()[1])
            if port in _taken:
                continue
            try:
                with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s6:
                    s6.bind(("::1", port))
            except OSError:
                continue
        _taken.add(port)
        return port
    raise BenchError("no free port found")


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect((host, port))
        except OSError:
            return False
        return True


# ---------------------------------------------------------------------------------------------
# Managed processes


@dataclass
class Managed:
    """One long-running server the harness started (in its own process group)."""

    name: str
    argv: list[str]
    cwd: Path
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    pidfile: Path | None = None
    extra_pids: list[int] = field(default_factory=list)

    def start(self, env: dict[str, str] | None = None) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "wb") as logf:  # one start per file: the tail is this run's
            try:
                self.proc = subprocess.Popen(
                    self.argv,
                    cwd=self.cwd,
                    stdin=subprocess.DEVNULL,
                    stdout=logf,
                    stderr=subprocess.STDOUT,
                    env=env if env is not None else clean_env(),
                    start_new_session=True,
                )
            except OSError as exc:
                raise BenchError(f"{self.name}: cannot start {self.argv[0]}: {exc}") from exc
        _running.append(self)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, n: int = 12) -> str:
        try:
            lines = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        kept = [line.strip() for line in lines if line.strip()]
        return "\n".join(kept[-n:])

    def wait_port(self, host: str, port: int, timeout: float = 20.0) -> None:
        """Wait until ``host:port`` accepts connections; on failure stop the process."""
        try:
            self._wait_port(host, port, timeout)
        except BenchError:
            self.stop()
            raise

    def _wait_port(self, host: str, port: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                code = self.proc.returncode if self.proc else None
                tail = self.log_tail()
                raise BenchError(
                    f"{self.name} exited with code {code} before listening on {host}:{port}"
                    + (f": {tail}" if tail else f" (see {self.log})")
                )
            if port_open(host, port):
                return
            time.sleep(0.1)
        raise BenchError(f"{self.name} did not listen on {host}:{port} within {timeout:.0f}s")

    def stop(self, timeout: float = 8.0) -> None:
        if self.proc is None:
            return
        pids = tree_pids(self.proc.pid) if self.alive() else []
        if self.alive():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(timeout=5)
        # Children that left the group (daemons double-forking) are killed by pid.
        for pid in [*pids, *self.extra_pids]:
            if pid != self.proc.pid and _pid_alive(pid):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
        # Anything still in the process group (e.g. a worker that ignored SIGTERM).
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        if self in _running:
            _running.remove(self)


_running: list[Managed] = []


def stop_all() -> None:
    """Stop everything still running, newest first (used on exit, error and Ctrl-C)."""
    for m in reversed(list(_running)):
        try:
            m.stop()
        except Exception as exc:  # keep stopping the rest
            print(f"bench: could not stop {m.name}: {exc}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def run(
    argv: Sequence[str], timeout: float, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a client command to completion (bounded by ``timeout``)."""
    try:
        return subprocess.run(
            list(argv),
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=clean_env(),
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"{argv[0]} timed out after {timeout:.0f}s") from exc
    except FileNotFoundError as exc:
        raise BenchError(f"{argv[0]} is not installed") from exc


# ---------------------------------------------------------------------------------------------
# RSS


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out.extend(int(x) for x in f.read().split())
        except OSError:
            continue
    return out


def tree_pids(root: int) -> list[int]:
    """``root`` and all its descendants (bounded walk)."""
    seen: list[int] = []
    todo = [root]
    while todo and len(seen) < 4096:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.append(pid)
        todo.extend(_children(pid))
    return seen


def vmrss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def tree_rss_kib(root: int) -> int:
    return sum(vmrss_kib(p) for p in tree_pids(root))


class RssSampler:
    """Samples the summed VmRSS of a process tree in a thread until stopped."""

    def __init__(self, root: int, interval: float) -> None:
        self.root = root
        self.interval = interval
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        # Bounded: at most one hour of samples even if stop() were never called.
        limit = int(3600 / self.interval)
        for _ in range(limit):
            self.samples.append(tree_rss_kib(self.root))
            if self._stop.wait(self.interval):
                break

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    @property
    def peak_kib(self) -> int:
        return max(self.samples, default=0)


def tree_cpu_seconds(root: int) -> float:
    """User + system CPU seconds used so far by ``root`` and its descendants."""
    ticks = 0
    for pid in tree_pids(root):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue  # (exited meanwhile)
        ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """How busy all CPUs were while the block ran, and the CPU seconds a process tree
    (the proxy) used meanwhile: whether a row was limited by the proxy or by the machine."""

    def __init__(self, root: int | None) -> None:
        self.root = root
        self.busy_pct = 0.0
        self.tree_seconds: float | None = None

    def __enter__(self) -> CpuMeter:
        self._total, self._idle = _cpu_times()
        self._tree = tree_cpu_seconds(self.root) if self.root else 0.0
        return self

    def __exit__(self, *exc: object) -> None:
        total, idle = _cpu_times()
        span = total - self._total
        if span > 0:
            self.busy_pct = 100.0 * (span - (idle - self._idle)) / span
        if self.root:
            self.tree_seconds = tree_cpu_seconds(self.root) - self._tree


def _cpu_times() -> tuple[int, int]:
    with open("/proc/stat") as f:
        values = [int(x) for x in f.readline().split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    return sum(values), idle


def cpu_busy_percent(interval: float = 1.0) -> float:
    """How busy all CPUs are over ``interval`` seconds (before the harness loads them)."""
    total0, idle0 = _cpu_times()
    time.sleep(interval)
    total1, idle1 = _cpu_times()
    total = total1 - total0
    return 100.0 * (total - (idle1 - idle0)) / total if total > 0 else 0.0
