"""The systemd unit installs and runs as documented (issue 15).

The unit ships in the package (``kushi config unit`` prints it; ``examples/kushi.service``
is a link to the same file). Its paths are those of the documented install (a venv under
/opt/kushi); ``systemd-analyze verify`` accepts it and ``systemd-analyze security`` rates
it; and its ExecStart command line runs the way systemd would run it -- as an unprivileged
user whose only capability is the ambient CAP_NET_BIND_SERVICE, with no_new_privs -- in a
network namespace, where it binds port 80, proxies, reloads on ExecReload's SIGHUP and
stops cleanly on SIGTERM.
"""

from __future__ import annotations

import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from support import netns
from support.kushi_proc import ROOT, run_kushi
from support.origin import ONE_K, OriginProcess

pytestmark = pytest.mark.timeout(90)

UNIT = ROOT / "src" / "kushi" / "kushi.service"
VENV_KUSHI = Path(sys.executable).parent / "kushi"
INSTALL = "python3 -m venv /opt/kushi && /opt/kushi/bin/pip install ."
NOBODY = 65534


def unit_settings() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key, []).append(value)
    return out


def test_the_unit_ships_and_its_paths_match_the_documented_install() -> None:
    proc = run_kushi(["config", "unit"])
    assert proc.returncode == 0 and proc.stdout == UNIT.read_text()
    assert (ROOT / "examples" / "kushi.service").resolve() == UNIT
    unit = unit_settings()
    assert unit["ExecStart"] == ["/opt/kushi/bin/kushi serve --config /etc/kushi/kushi.toml"]
    assert unit["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert unit["AmbientCapabilities"] == ["CAP_NET_BIND_SERVICE"]
    assert "PrivateUsers" not in unit  # it would take the capability's effect away
    for text in (UNIT.read_text(), (ROOT / "README.md").read_text()):
        assert INSTALL in text


@pytest.fixture
def unit_copy(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at this checkout's kushi (systemd-analyze verify
    checks that the program exists)."""
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    path = tmp_path / "kushi.service"
    path.write_text(UNIT.read_text().replace("/opt/kushi/bin/kushi", str(VENV_KUSHI)))
    return path


def test_systemd_analyze_verify_accepts_the_unit(unit_copy: Path) -> None:
    proc = subprocess.run(
        ["systemd-analyze", "verify", str(unit_copy)], capture_output=True, text=True
    )
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", "")


def test_systemd_analyze_security_rates_the_unit_ok(unit_copy: Path) -> None:
    proc = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", str(unit_copy)],
        capture_output=True,
        text=True,
    )
    match = re.search(r"Overall exposure level for kushi\.service: ([\d.]+) (\w+)", proc.stdout)
    assert match, proc.stdout[-2000:] + proc.stderr
    # systemd's scale: 0 (sandboxed) to 10 (fully exposed); 1.5 when this was written.
    assert float(match.group(1)) < 2.0 and match.group(2) == "OK", match.group(0)


@pytest.fixture
def readable_dir() -> Iterator[Path]:
    """A directory the unprivileged user can read (pytest's tmp_path is root's only)."""
    path = Path(tempfile.mkdtemp(prefix="kushi-unit-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_the_units_command_line_binds_port_80_unprivileged_reloads_and_stops(
    readable_dir: Path, origin_factory: Callable[..., OriginProcess]
) -> None:
    reason = netns.netns_available()
    if reason is not None:
        pytest.skip(f"network namespaces unavailable: {reason}")
    config = readable_dir / "kushi.toml"
    example = run_kushi(["config", "example"]).stdout
    config.write_text(
        example.replace('listen = ["127.0.0.1:3128", "[::1]:3128"]', 'listen = ["127.0.0.1:80"]')
        .replace("allow_destinations = []", 'allow_destinations = ["::1/128"]')
        .replace('admin_listen = ["127.0.0.1:9128"]', "admin_listen = []")
        .replace("workers = 0", "workers = 1")
    )
    config.chmod(0o644)
    (exec_start,) = unit_settings()["ExecStart"]
    argv = shlex.split(exec_start.replace("/etc/kushi/kushi.toml", str(config)))
    argv[0] = str(VENV_KUSHI)
    caps = "-all,+net_bind_service"
    as_unit = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
    as_unit += [f"--inh-caps={caps}", f"--ambient-caps={caps}", f"--bounding-set={caps}"]
    as_unit += ["--no-new-privs"]
    with netns.Topology() as topo:
        box = topo.add_host("box")
        origin = origin_factory(["[::1]:0"], ns=box)
        # Without the capability the same command line cannot bind port 80.
        bare = box.run(
            [*as_unit[:4], "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs", *argv],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert bare.returncode == 1, bare.stderr
        assert bare.stderr.strip().endswith("cannot listen on 127.0.0.1:80: permission denied")

        err_path = readable_dir / "stderr"
        with open(err_path, "wb") as err:
            proc = box.popen([*as_unit, *argv], stdout=subprocess.DEVNULL, stderr=err)
        try:
            deadline = time.monotonic() + 20
            while "kushi ready" not in err_path.read_text():
                assert proc.poll() is None and time.monotonic() < deadline, err_path.read_text()
                time.sleep(0.05)
            url = f"http://[::1]:{origin.port}/1k"
            got = box.run(["curl", "-s", "-x", "http://127.0.0.1:80", url], text=False)
            assert got.stdout == ONE_K
            status = Path(f"/proc/{proc.pid}/status").read_text()
            assert re.search(rf"^Uid:\s+{NOBODY}\s", status, re.M), status
            proc.send_signal(signal.SIGHUP)  # ExecReload
            while "config reloaded" not in err_path.read_text():
                assert time.monotonic() < deadline, err_path.read_text()
                time.sleep(0.05)
            proc.send_signal(signal.SIGTERM)  # systemctl stop
            assert proc.wait(20) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    stderr = err_path.read_text()
    assert "Traceback" not in stderr and stderr.rstrip().endswith("INFO stopped"), stderr
