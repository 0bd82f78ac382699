"""Two figures the side-by-side tables do not show: kushi's CPU time per request, and
the memory that 10,000 idle client connections cost.

    .venv/bin/python -m bench.profile [--seconds 5] [--idle 10000]

CPU time comes from /proc (user + system ticks of the kushi process while wrk drives
keep-alive 1 KiB requests through it), so it is steadier than a req/s figure on a busy
machine. The idle figure is kushi's RSS with that many client connections open and silent
(spread over 127.0.0.2 and up, since each address may hold at most 256).
"""

from __future__ import annotations

import argparse
import os
import resource
import socket
import subprocess
import time

from bench.procs import free_port, stop_all
from bench.run import WORK, prepare_www
from bench.servers import Env, _start_kushi, start_origin

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> tuple[float, float]:
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return int(fields[11]) / TICK, int(fields[12]) / TICK


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def wrk(url: str, proxy: str, seconds: int) -> int:
    script = WORK / "profile.lua"
    script.write_text(f'wrk.path = "{url}"\n')
    out = subprocess.run(
        ["wrk", "-t1", "-c20", f"-d{seconds}s", "-s", str(script), proxy],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for line in out.splitlines():
        if "requests in" in line:
            return int(line.split()[0])
    raise RuntimeError(out)


def spy(pid: int, url: str, proxy: str, seconds: int, out: str) -> None:
    """py-spy's collapsed stacks while wrk runs, and a top-20 by own (leaf) samples."""
    import collections
    import shutil
    import sys

    exe = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
    rec = subprocess.Popen(
        [exe, "record", "-r", "400", "-f", "raw", "-o", out, "-d", str(seconds), "-p", str(pid)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(0.5)
    wrk(url, proxy, seconds)
    rec.wait()
    own: collections.Counter[str] = collections.Counter()
    total = 0
    with open(out) as fh:
        for line in fh:
            stack, _, count = line.rstrip().rpartition(" ")
            leaf = stack.rsplit(";", 1)[-1]
            own[leaf] += int(count)
            total += int(count)
    print(f"py-spy: {total} samples; own time by function:")
    for name, count in own.most_common(25):
        print(f"  {100 * count / total:5.1f}%  {name}")


def main() -> int:
    parser = argparse.ArgumentParser(prog="bench.profile", description=__doc__)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--idle", type=int, default=10000)
    parser.add_argument(
        "--mode",
        choices=["forward", "reverse"],
        default="forward",
        help="profile a forward listener (absolute-form requests) or a reverse one",
    )
    parser.add_argument(
        "--spy",
        metavar="FILE",
        help="also sample kushi with py-spy during a second wrk run; write collapsed "
        "stacks to FILE and print the functions with the most own time",
    )
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    env = Env(work=WORK, www=WORK / "www")
    socks: list[socket.socket] = []
    try:
        WORK.mkdir(parents=True, exist_ok=True)
        prepare_www(env.www, 1)
        start_origin(env)
        port = free_port()
        common = 'access_log = ""\nlog_level = "warning"\nadmin_listen = []\nworkers = 1\n'
        if args.mode == "forward":
            toml = (
                f'listen = ["127.0.0.1:{port}"]\nallow = ["127.0.0.0/8"]\n'
                f'allow_destinations = ["::1/128 {env.origin_port}"]\n' + common
            )
            url = f"{env.origin_url}/1k"
        else:
            toml = (
                common + f'[[listener]]\nmode = "reverse"\nlisten = ["127.0.0.1:{port}"]\n'
                f'backend = ["{env.origin_url}"]\n'
            )
            url = "/1k"
        kushi = _start_kushi("kushi-profile", env, toml, port)
        assert kushi.managed is not None
        pid = kushi.managed.pid
        proxy = f"http://127.0.0.1:{port}"
        wrk(url, proxy, 1)  # warm-up
        user0, sys0 = cpu_seconds(pid)
        requests = wrk(url, proxy, args.seconds)
        user1, sys1 = cpu_seconds(pid)
        user, system = (user1 - user0) / requests * 1e6, (sys1 - sys0) / requests * 1e6
        print(
            f"CPU per keep-alive 1 KiB {args.mode} request: {user + system:.1f} us "
            f"(user {user:.1f}, system {system:.1f}) over {requests} requests"
        )
        if args.spy:
            spy(pid, url, proxy, args.seconds, args.spy)
        base = rss_mib(pid)
        for i in range(args.idle):
            s = socket.socket()
            s.bind((f"127.0.0.{2 + i // 200}", 0))
            s.connect(("127.0.0.1", port))
            socks.append(s)
        time.sleep(3)
        print(f"RSS: {base:.1f} MiB, with {len(socks)} idle connections {rss_mib(pid):.1f} MiB")
    finally:
        for s in socks:
            s.close()
        stop_all()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
