"""Run a real kushi process for a test: config written to a file, ports found, logs read."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
KUSHI = [sys.executable, "-m", "kushi"]


def free_port(host: str = "127.0.0.1") -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(value)


def write_toml(path: Path, top: dict[str, Any], listeners: Sequence[dict[str, Any]] = ()) -> None:
    lines = []
    tables = {k: v for k, v in top.items() if isinstance(v, dict)}
    for key, value in top.items():
        if not isinstance(value, dict):
            lines.append(f"{key} = {toml_value(value)}")
    for name, table in tables.items():
        lines.append(f"[{name}]")
        lines.extend(f"{k} = {toml_value(v)}" for k, v in table.items())
    for listener in listeners:
        lines.append("[[listener]]")
        lines.extend(f"{k} = {toml_value(v)}" for k, v in listener.items())
    path.write_text("\n".join(lines) + "\n")


#: Test origins listen on loopback, which a forward listener refuses by default
#: (destination policy); tests that start ``kushi serve`` allow it explicitly.
LOOPBACK_DESTINATIONS = ["--allow-destination", "127.0.0.0/8", "--allow-destination", "::1/128"]


def _serves(argv: Sequence[str]) -> bool:
    return not argv or argv[0] in ("serve", "socks", "reverse", "tcp") or argv[0].startswith("-")


def _sets_workers(argv: Sequence[str]) -> bool:
    if "--workers" in argv:
        return True
    if "--config" in argv:
        path = Path(argv[argv.index("--config") + 1])
        text = path.read_text() if path.exists() else ""
        return any(line.strip().startswith("workers") for line in text.splitlines())
    return False


#: Every Kushi started, so a test that fails before stopping its kushi does not leave it
#: running (holding ports, such as the default admin 127.0.0.1:9128, that later tests bind).
STARTED: list[Kushi] = []


class Kushi:
    """A kushi subprocess. ``argv`` is the command line after ``kushi``.

    For ``serve``, ``socks`` (or bare flags), ``loopback_destinations`` adds ``--allow-destination``
    for 127.0.0.0/8 and ::1/128 so the proxy may reach test origins on loopback."""

    def __init__(
        self,
        argv: Sequence[str],
        workdir: Path,
        wait_for: Sequence[tuple[str, int]] = (),
        netns: str | None = None,
        env: dict[str, str] | None = None,
        loopback_destinations: bool = True,
    ) -> None:
        argv = list(argv)
        proxies = ("serve", "socks")
        if loopback_destinations and (not argv or argv[0] in proxies or argv[0].startswith("-")):
            argv = [*argv, *LOOPBACK_DESTINATIONS]
        if _serves(argv) and not _sets_workers(argv):
            # One worker unless a test asks for more: every access record and counter is
            # then in this one process (kushi's own default is one per core).
            argv = [*argv, "--workers", "1"]
        self.workdir = workdir
        self.stdout_path = workdir / f"kushi-{os.getpid()}-{id(self)}.out"
        self.stderr_path = workdir / f"kushi-{os.getpid()}-{id(self)}.err"
        cmd = [*KUSHI, *argv]
        if netns:
            cmd = ["ip", "netns", "exec", netns, *cmd]
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=err, cwd=workdir, env=full_env)
        STARTED.append(self)
        self.netns = netns
        for host, port in wait_for:
            self.wait_port(host, port)

    def wait_ready(self, timeout: float = 15.0) -> None:
        """Until kushi logs ``kushi ready``: its sockets are bound and listening and its
        signal handlers in place by then, and no probe connection ends up in an access log
        (a TCP listener would relay it)."""
        deadline = time.monotonic() + timeout
        while "kushi ready" not in self.stderr:
            if self.proc.poll() is not None:
                raise RuntimeError(f"kushi exited with {self.proc.returncode}: {self.stderr}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"kushi not ready after {timeout}s: {self.stderr}")
            time.sleep(0.02)

    def wait_port(self, host: str, port: int, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"kushi exited with {self.proc.returncode}: {self.stderr}")
            if self.netns:
                probe = subprocess.run(
                    [
                        "ip",
                        "netns",
                        "exec",
                        self.netns,
                        sys.executable,
                        "-c",
                        f"import socket; socket.create_connection(({host!r}, {port}), 1).close()",
                    ],
                    capture_output=True,
                )
                if probe.returncode == 0:
                    return
            else:
                try:
                    socket.create_connection((host, port), 0.5).close()
                    return
                except OSError:
                    pass
            time.sleep(0.05)
        raise RuntimeError(f"kushi did not listen on {host}:{port}: {self.stderr}")

    @property
    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def log_lines(self) -> list[str]:
        """Complete lines only: kushi may be writing the last one as we read."""
        text = self.stdout
        text = text[: text.rfind("\n") + 1]
        return [line for line in text.splitlines() if line.strip()]

    def json_records(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log_lines():
            if line.startswith("{"):
                out.append(json.loads(line))
        return out

    def wait_records(self, count: int, timeout: float = 5.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while True:
            records = self.json_records()
            if len(records) >= count or time.monotonic() > deadline:
                return records
            time.sleep(0.02)

    def records_until(
        self, keep: Callable[[dict[str, Any]], bool], timeout: float = 5.0
    ) -> list[dict[str, Any]]:
        """The JSON access records ``keep`` accepts, waiting up to ``timeout`` for at least
        one (a tunnel's record is written when kushi sees it end, after the client has)."""
        deadline = time.monotonic() + timeout
        while True:
            found = [r for r in self.json_records() if keep(r)]
            if found or time.monotonic() > deadline:
                return found
            time.sleep(0.02)

    def record_where(self, timeout: float = 5.0, **want: Any) -> dict[str, Any]:
        """The one JSON access record whose fields equal ``want``, waiting up to ``timeout``
        for it to be written."""
        deadline = time.monotonic() + timeout
        while True:
            found = [r for r in self.json_records() if all(r.get(k) == v for k, v in want.items())]
            if found or time.monotonic() > deadline:
                assert len(found) == 1, (want, found, self.log_lines()[-6:])
                return found[0]
            time.sleep(0.02)

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 10.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def run_kushi(argv: Sequence[str], timeout: float = 15.0) -> subprocess.CompletedProcess[str]:
    """Run a kushi command that exits by itself (config check, bad flags)."""
    return subprocess.run(
        [*KUSHI, *argv], capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )
