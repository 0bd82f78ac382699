"""Every start-up and reload mistake is one line and the right exit code (issue 15).

``BAD_INPUT`` is the table: each row is a bad (or suspicious) input, the exact line kushi
prints and its exit code. A row given as a config file runs twice, as ``kushi config
check FILE`` and as ``kushi serve --config FILE``: the check finds what serve would fail
on, with the same line. A row given as flags runs as that command line. Nothing may print
a traceback, and nothing but the expected line may appear on stderr.

Exit codes: 2 for a bad value (the line names the key), 0 with a ``warning:`` line for a
valid but suspicious one (``config check``; nginx's rule: refuse the impossible, warn about
the suspicious).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from support.kushi_proc import KUSHI, ROOT, Kushi, free_port, run_kushi
from support.origin import ONE_K, OriginProcess

pytestmark = pytest.mark.timeout(60)

CORES = os.cpu_count() or 1
OriginFactory = Callable[..., OriginProcess]


@dataclass(frozen=True)
class Bad:
    name: str
    expected: str  # the one stderr line; {tmp} and {file} are filled in
    code: int = 2
    toml: bytes | None = None  # a config file (checked and served) ...
    argv: tuple[str, ...] = ()  # ... or a command line
    unshare_net: bool = False  # resolve in an empty network namespace (no DNS query leaves)


BAD_INPUT: tuple[Bad, ...] = (
    Bad(
        "access_log in a missing directory",
        "kushi: config error: access_log: /nonexistent-kushi/access.log: "
        "directory /nonexistent-kushi does not exist",
        toml=b'access_log = "/nonexistent-kushi/access.log"\n',
    ),
    Bad(
        "access_log under a file",
        "kushi: config error: access_log: {tmp}/plain/access.log: {tmp}/plain is not a directory",
        toml=b'access_log = "{tmp}/plain/access.log"\n',
    ),
    Bad(
        "access_log is a directory",
        "kushi: config error: access_log: {tmp}: is a directory",
        toml=b'access_log = "{tmp}"\n',
    ),
    Bad(
        "access_log of a listener table",
        "kushi: config error: listener web: access_log: /nonexistent-kushi/web.log: "
        "directory /nonexistent-kushi does not exist",
        toml=b'[[listener]]\nname = "web"\nmode = "reverse"\nlisten = ["[::1]:0"]\n'
        b'backend = ["http://127.0.0.1:8080"]\naccess_log = "/nonexistent-kushi/web.log"\n',
    ),
    Bad(
        "a Latin-1 byte in a comment",
        "kushi: config error: config: {file}: line 2: byte 0xe9 is not UTF-8 "
        "(TOML files are UTF-8)",
        toml=b'listen = ["127.0.0.1:0"]\n# caf\xe9\n',
    ),
    Bad(
        "--listen with a host name that does not resolve",
        "kushi: config error: listen: kushi-nowhere.invalid:3128: "
        "host name 'kushi-nowhere.invalid' does not resolve",
        argv=("serve", "--listen", "kushi-nowhere.invalid:3128"),
        unshare_net=True,
    ),
    Bad(
        "max_connections = 0",
        "kushi: config error: limits.max_connections: must be more than 0, got 0",
        toml=b"[limits]\nmax_connections = 0\n",
    ),
    Bad(
        "max_connections_per_client = 0",
        "kushi: config error: limits.max_connections_per_client: must be more than 0, got 0",
        toml=b"[limits]\nmax_connections_per_client = 0\n",
    ),
    Bad(
        "timeouts.connect = 0",
        "kushi: config error: timeouts.connect: must be more than 0, got 0",
        toml=b"[timeouts]\nconnect = 0\n",
    ),
    Bad(
        "--allow with host bits set",
        "kushi: config error: allow: '10.0.0.1/8' has host bits set: "
        "write 10.0.0.0/8 for the network or 10.0.0.1 for the one address",
        argv=("serve", "--listen", "127.0.0.1:0", "--allow", "10.0.0.1/8"),
    ),
    Bad(
        "trusted_proxies with host bits set",
        "kushi: config error: trusted_proxies: '192.0.2.1/24' has host bits set: "
        "write 192.0.2.0/24 for the network or 192.0.2.1 for the one address",
        toml=b'trusted_proxies = ["192.0.2.1/24"]\n',
    ),
    Bad(
        "the same destination allowed and denied",
        "kushi: config error: listener forward: deny_destinations: '10.1.0.0/16' is also "
        "allowed by allow_destinations (10.0.0.0/8), which is checked first: "
        "the denial never applies",
        argv=("serve", "--allow-destination", "10.0.0.0/8", "--deny-destination", "10.1.0.0/16"),
    ),
    Bad(
        "two listeners on one address",
        "kushi: config error: listener b: listen: 127.0.0.1:3128 overlaps 0.0.0.0:3128 "
        "of listener a",
        toml=b'[[listener]]\nname = "a"\nlisten = ["0.0.0.0:3128"]\nallow = ["127.0.0.1"]\n'
        b'[[listener]]\nname = "b"\nlisten = ["127.0.0.1:3128"]\n',
    ),
    Bad(
        "a listener and the admin listener on one address",
        "kushi: config error: admin_listen: 127.0.0.1:3128 overlaps 127.0.0.1:3128 "
        "of listener forward",
        toml=b'listen = ["127.0.0.1:3128"]\nadmin_listen = ["127.0.0.1:3128"]\n',
    ),
    Bad(
        "a reverse backend with a path",
        "kushi: config error: listener reverse: backend: 'http://127.0.0.1:8080/app': "
        "a path (/app) is not supported; a backend is http://HOST[:PORT] and gets each "
        "request's own path",
        argv=("reverse", "--listen", "[::1]:0", "--backend", "http://127.0.0.1:8080/app"),
    ),
    Bad(
        "a tcp backend with http://",
        "kushi: config error: listener tcp: backend: 'http://127.0.0.1:8080': "
        "a tcp backend is HOST:PORT, without http://",
        argv=("tcp", "--listen", "[::1]:0", "--backend", "http://127.0.0.1:8080"),
    ),
    Bad(
        "tls_cert that does not exist",
        "kushi: config error: listener forward: tls_cert: {tmp}/none.pem: no such file",
        toml=b'tls_cert = "{tmp}/none.pem"\ntls_key = "{tmp}/none.key"\n',
    ),
    Bad(
        "tls_key without tls_cert",
        "kushi: config error: listener forward: tls_cert: tls_key needs tls_cert too",
        toml=b'tls_key = "{tmp}/none.key"\n',
    ),
    Bad(
        "TLS on a tcp listener",
        "kushi: config error: listener t: tls_cert: a tcp listener cannot terminate TLS "
        "(forward and reverse can)",
        toml=b'[[listener]]\nname = "t"\nmode = "tcp"\nlisten = ["[::1]:0"]\n'
        b'backend = ["127.0.0.1:9"]\ntls_cert = "{tmp}/c.pem"\ntls_key = "{tmp}/k.pem"\n',
    ),
    Bad(
        "TLS with the PROXY protocol",
        "kushi: config error: listener lb: proxy_protocol: cannot be combined with tls_cert: "
        "a TLS listener does not read PROXY headers",
        toml=b'[[listener]]\nname = "lb"\nmode = "reverse"\nlisten = ["[::1]:0"]\n'
        b'backend = ["http://127.0.0.1:8080"]\nproxy_protocol = true\n'
        b'proxy_protocol_from = ["::1"]\ntls_cert = "{tmp}/c.pem"\ntls_key = "{tmp}/k.pem"\n',
    ),
    Bad(
        "kushi config alone",
        "usage: kushi config [-h] {{check,example,unit}} ...\n"
        "kushi config: choose a subcommand: check FILE, example or unit",
        argv=("config",),
    ),
    Bad(
        "workers far above the cores (a warning)",
        f"kushi: warning: workers: {64 * CORES} worker processes on {CORES} cores; "
        "more than one per core only adds memory and context switches",
        code=0,
        argv=("config", "check", "{file}"),
        toml=f"workers = {64 * CORES}\n".encode(),
    ),
)


def _run(argv: list[str], unshare_net: bool = False) -> subprocess.CompletedProcess[str]:
    if not unshare_net:
        return run_kushi(argv)
    return subprocess.run(
        ["unshare", "--net", *KUSHI, *argv], capture_output=True, text=True, timeout=15, cwd=ROOT
    )


@pytest.mark.parametrize("bad", BAD_INPUT, ids=[b.name for b in BAD_INPUT])
def test_bad_input_is_one_line_and_the_right_exit(bad: Bad, tmp_path: Path) -> None:
    (tmp_path / "plain").write_text("a file, not a directory\n")
    path = tmp_path / "kushi.toml"
    fill = {"tmp": str(tmp_path), "file": str(path)}
    runs: list[list[str]] = []
    if bad.toml is not None:
        path.write_bytes(bad.toml.replace(b"{tmp}", str(tmp_path).encode()))
        if not bad.argv:
            runs = [["config", "check", str(path)], ["serve", "--config", str(path)]]
    if bad.argv:
        runs = [[a.format(**fill) for a in bad.argv]]
    expected = bad.expected.format(**fill)
    for argv in runs:
        proc = _run(argv, bad.unshare_net)
        assert (proc.returncode, proc.stderr.rstrip("\n")) == (bad.code, expected), argv
        if bad.code == 0:
            assert proc.stdout.startswith(f"{path}: OK"), proc.stdout


def test_reload_with_an_unwritable_log_is_one_line_and_keeps_serving(
    tmp_path: Path, origin_factory: OriginFactory
) -> None:
    """SIGHUP with access_log pointing into a missing directory: "reload failed" in one
    line, no traceback, and the running config keeps answering."""
    origin = origin_factory(["127.0.0.1:0"])
    port = free_port("::1")
    path = tmp_path / "reverse.toml"
    good = (
        f'mode = "reverse"\nlisten = ["[::1]:{port}"]\n'
        f'backend = ["http://127.0.0.1:{origin.port}"]\naccess_log = "{tmp_path}/access.log"\n'
    )
    path.write_text(good)
    kushi = Kushi(["serve", "--config", str(path)], tmp_path)
    try:
        kushi.wait_ready()
        path.write_text(good.replace(str(tmp_path), "/nonexistent-kushi"))
        kushi.signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while "reload failed" not in kushi.stderr and time.monotonic() < deadline:
            time.sleep(0.05)
        (line,) = [x for x in kushi.stderr.splitlines() if "reload failed" in x]
        assert line.endswith(
            "ERROR reload failed, keeping the running config: config error: access_log: "
            "/nonexistent-kushi/access.log: directory /nonexistent-kushi does not exist"
        )
        assert "Traceback" not in kushi.stderr
        out = subprocess.run(
            ["curl", "-s", "--noproxy", "*", f"http://[::1]:{port}/1k"],
            capture_output=True,
            timeout=20,
        )
        assert out.stdout == ONE_K
        log_file = tmp_path / "access.log"
        while "/1k" not in log_file.read_text() and time.monotonic() < deadline + 5:
            time.sleep(0.05)
        assert "/1k" in log_file.read_text()
    finally:
        assert kushi.stop() == 0, kushi.stderr


def test_check_json_into_a_closed_pipe_exits_quietly(origin_factory: OriginFactory) -> None:
    """``kushi check --json URL | head -c 0``: the reader is gone before kushi writes; kushi
    says nothing and exits 141 (128 + SIGPIPE) like a Unix tool stopped by the same pipe.
    (The read end is closed before kushi starts, so its write always finds no reader.)"""
    origin = origin_factory(["[::1]:0"])
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        with subprocess.Popen(
            [*KUSHI, "check", "--json", "--no-ipv4", f"http://[::1]:{origin.port}/1k"],
            stdout=write_end,
            stderr=subprocess.PIPE,
            cwd=ROOT,
        ) as proc:
            assert proc.stderr is not None
            err = proc.stderr.read().decode()
            code = proc.wait(timeout=20)
    finally:
        os.close(write_end)
    assert (code, err) == (141, "")


def test_a_worker_that_keeps_dying_stops_the_supervisor(tmp_path: Path) -> None:
    """A worker that exits again and again makes the supervisor stop after five fast
    failures with the reason, exit 1 (systemd's Restart=on-failure then sees it), instead
    of restarting it forever."""
    kushi = Kushi(["serve", "--listen", "127.0.0.1:0", "--workers", "2"], tmp_path)
    try:
        kushi.wait_ready()
        killed: set[int] = set()
        deadline = time.monotonic() + 20
        while kushi.proc.poll() is None and time.monotonic() < deadline:
            children = Path(f"/proc/{kushi.proc.pid}/task/{kushi.proc.pid}/children")
            pids = {int(p) for p in children.read_text().split()} if children.exists() else set()
            for pid in pids - killed:
                killed.add(pid)
                os.kill(pid, signal.SIGKILL)
            time.sleep(0.02)
        assert kushi.proc.wait(timeout=10) == 1
    finally:
        kushi.stop()
    assert "Traceback" not in kushi.stderr
    (gave_up,) = [x for x in kushi.stderr.splitlines() if "worker failures in 10 s" in x]
    assert "was killed by signal 9; 5 worker failures in 10 s: stopping kushi" in gave_up
    assert kushi.stderr.splitlines()[-1].endswith("INFO stopped")
