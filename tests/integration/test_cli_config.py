"""The command line and config file, run as a real ``python -m kushi`` process.

Bad input exits 2 with exactly one line on stderr naming the key (never a traceback); a
listener that cannot start exits non-zero with one clear line; the start-up log states the
listeners, egress policy and allow list.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from kushi.cli import build_parser
from support.kushi_proc import Kushi, free_port, run_kushi, write_toml

pytestmark = pytest.mark.timeout(60)


def one_line_error(res: subprocess.CompletedProcess[str], code: int = 2) -> str:
    assert res.returncode == code, (res.returncode, res.stdout, res.stderr)
    assert "Traceback" not in res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    return lines[0]


@pytest.fixture
def started() -> Iterator[list[Kushi]]:
    procs: list[Kushi] = []
    yield procs
    for proc in procs:
        proc.stop()


def start(procs: list[Kushi], argv: Sequence[str], workdir: Path, port: int) -> Kushi:
    proc = Kushi(argv, workdir, wait_for=[("127.0.0.1", port)])
    procs.append(proc)
    return proc


def startup_line(proc: Kushi) -> str:
    """The listener's start-up line (kushi listens a moment before it logs it)."""
    deadline = time.monotonic() + 10
    while not (lines := [x for x in proc.stderr.splitlines() if "forward listener '" in x]):
        assert time.monotonic() < deadline, proc.stderr
        time.sleep(0.02)
    (line,) = lines
    return line


# --- help ------------------------------------------------------------------------------------


def test_top_level_help_lists_the_commands() -> None:
    res = run_kushi(["--help"])
    assert res.returncode == 0, res.stderr
    for command in ("serve", "reverse", "tcp", "config"):
        assert command in res.stdout


def serve_flags() -> list[str]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    serve = sub.choices["serve"]
    return [opt for action in serve._actions for opt in action.option_strings]


def test_serve_help_lists_every_flag() -> None:
    res = run_kushi(["serve", "--help"])
    assert res.returncode == 0, res.stderr
    flags = serve_flags()
    for flag in (
        "--config",
        "--listen",
        "--egress",
        "--allow",
        "--access-log",
        "--access-log-format",
        "--connect-ports",
        "--open",
        "--nat64",
        "--workers",
        "--log-level",
    ):
        assert flag in flags
    for flag in flags:
        assert flag in res.stdout, f"{flag} missing from kushi serve --help"
    # Defaults are stated, IPv6 listen syntax is shown.
    assert "[::1]:3128" in res.stdout and "prefer-ipv6" in res.stdout


def test_version() -> None:
    res = run_kushi(["--version"])
    assert res.returncode == 0 and res.stdout.startswith("kushi ")


# --- bad flags -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "names"),
    [
        (["serve", "--frobnicate"], "--frobnicate"),
        (["serve", "--egress", "ipv5"], "--egress"),
        (["serve", "--listen", "nope"], "listen"),
        (["serve", "--listen", "::1:3128"], "listen"),
        (["serve", "--connect-ports", "0"], "connect_ports"),
        (["serve", "--allow", "300.0.0.0/8"], "allow"),
        (["serve", "--workers", "many"], "--workers"),
        (["--egress", "ipv5"], "--egress"),  # bare kushi is kushi serve
    ],
)
def test_bad_flag_or_value_exits_2_with_one_line_naming_the_key(
    argv: list[str], names: str
) -> None:
    line = one_line_error(run_kushi(argv))
    assert line.startswith("kushi: ")
    assert names in line


# --- config files ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("egress = \n", "config"),
        ('egres = "ipv6-only"\n', "egres"),
        ("egress = 6\n", "egress"),
        ('connect_ports = "all"\n', "connect_ports"),
        ('[timeouts]\nconnect = "soon"\n', "timeouts.connect"),
    ],
    ids=["bad-toml", "unknown-key", "wrong-type", "bad-ports", "bad-table-value"],
)
def test_bad_config_file_exits_2_naming_the_key(tmp_path: Path, text: str, key: str) -> None:
    path = tmp_path / "kushi.toml"
    path.write_text(text)
    line = one_line_error(run_kushi(["serve", "--config", str(path)]))
    assert f"config error: {key}: " in line
    assert one_line_error(run_kushi(["config", "check", str(path)])) == line


def test_config_check_ok(tmp_path: Path) -> None:
    path = tmp_path / "kushi.toml"
    write_toml(path, {"listen": ["127.0.0.1:3128", "[::1]:3128"], "egress": "ipv6-only"})
    res = run_kushi(["config", "check", str(path)])
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == f"{path}: OK; listeners: forward (forward)"


def test_config_check_missing_file(tmp_path: Path) -> None:
    line = one_line_error(run_kushi(["config", "check", str(tmp_path / "nope.toml")]))
    assert "no such file" in line


def test_flags_override_the_file(tmp_path: Path, started: list[Kushi]) -> None:
    port = free_port()
    path = tmp_path / "kushi.toml"
    write_toml(
        path,
        {
            "listen": [f"127.0.0.1:{port}"],
            "egress": "ipv4-only",
            "connect_ports": [443, 8443],
            "access_log_format": "json",
        },
    )
    proc = start(started, ["serve", "--config", str(path), "--egress", "ipv6-only"], tmp_path, port)
    line = startup_line(proc)
    assert "egress ipv6-only" in line  # the flag
    assert "CONNECT ports 443,8443" in line and "(json)" in line  # the file, where no flag
    # And it is what kushi does: an IPv4 literal is refused under ipv6-only.
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET http://127.0.0.1:9999/ HTTP/1.1\r\nHost: 127.0.0.1:9999\r\n\r\n")
        answer = sock.recv(65536)
    assert b"destination_not_found" in answer


# --- starting --------------------------------------------------------------------------------


def test_port_in_use_gives_a_clear_line_and_nonzero_exit() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        res = run_kushi(["serve", "--listen", f"127.0.0.1:{port}"])
    assert res.returncode != 0
    assert "Traceback" not in res.stderr
    lines = [line for line in res.stderr.splitlines() if line.startswith("kushi: ")]
    assert lines == [f"kushi: cannot listen on 127.0.0.1:{port}: address already in use"]


def test_startup_line_states_listeners_egress_and_allow_list(
    tmp_path: Path, started: list[Kushi]
) -> None:
    port, port6 = free_port(), free_port("::1")
    proc = start(
        started,
        [
            "serve",
            "--listen",
            f"127.0.0.1:{port}",
            "--listen",
            f"[::1]:{port6}",
            "--egress",
            "ipv6-only",
            "--allow",
            "127.0.0.1",
            "--allow",
            "2001:db8::/32",
            "--connect-ports",
            "443,563",
        ],
        tmp_path,
        port,
    )
    line = startup_line(proc)
    assert f"forward listener 'forward' on 127.0.0.1:{port}, [::1]:{port6}" in line
    assert "; egress ipv6-only;" in line
    assert "; allow 127.0.0.1/32, 2001:db8::/32;" in line
    assert "CONNECT ports 443,563" in line
    assert proc.proc.poll() is None
    assert proc.stop() == 0


def test_ready_line_says_which_form_runs(tmp_path: Path, started: list[Kushi]) -> None:
    """``make test``'s compiled pass (KUSHI_COMPILED=1) starts the compiled wheel, the
    other the source; the running process says which it is."""
    port = free_port()
    proc = start(started, ["serve", "--listen", f"127.0.0.1:{port}"], tmp_path, port)
    form = "mypyc-compiled" if os.environ.get("KUSHI_COMPILED") == "1" else "pure Python"
    deadline = time.monotonic() + 10
    while "kushi ready" not in proc.stderr:
        assert time.monotonic() < deadline, proc.stderr[-2000:]
        time.sleep(0.05)
    (ready,) = [line for line in proc.stderr.splitlines() if "kushi ready" in line]
    assert ready.endswith(f"kushi ready: 1 worker(s), uvloop event loop, {form}"), ready
    assert proc.stop() == 0


def test_refuses_open_proxy_without_open(tmp_path: Path, started: list[Kushi]) -> None:
    port = free_port("0.0.0.0")
    argv = ["serve", "--listen", f"0.0.0.0:{port}", "--allow", "0.0.0.0/0"]
    line = one_line_error(run_kushi(argv))
    assert "allow" in line and "--open" in line and f"0.0.0.0:{port}" in line
    proc = start(started, [*argv, "--open"], tmp_path, port)
    assert "allow 0.0.0.0/0 (open)" in startup_line(proc)
    assert proc.stop() == 0
