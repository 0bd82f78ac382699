"""What the side-by-side tables do not show: kushi's CPU time per request, where it goes
(a py-spy flame graph), and the memory that 10,000 idle client connections cost.

    .venv/bin/python -m bench.profile [--seconds 5] [--idle 10000] [--no-flame]

CPU time comes from /proc (user + system ticks of the kushi process while wrk drives
keep-alive 1 KiB requests through it), so it is steadier than a req/s figure on a busy
machine. Then py-spy samples kushi during two more wrk runs of the same length: one
written as a flame graph (``bench/results/profile-MODE-STAMP.svg``, open it in a browser),
one as collapsed stacks (``.txt`` beside it) from which the functions with the most own
time are printed; ``profile-MODE-STAMP.md`` puts the CPU figure, that list and the flame
graph's path together (and ``profile-MODE-latest.*`` are copies of the last run). The idle
figure is kushi's RSS with that many client connections open and silent (spread over
127.0.0.2 and up, since each address may hold at most 256).
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import resource
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from bench.procs import free_port, stop_all
from bench.run import BENCH_DIR, WORK, prepare_www
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


def wrk(url: str, proxy: str, seconds: int, headers: dict[str, str] | None = None) -> int:
    script = WORK / "profile.lua"
    lines = [f'wrk.path = "{url}"']
    lines += [f'wrk.headers["{k}"] = "{v}"' for k, v in (headers or {}).items()]
    script.write_text("\n".join(lines) + "\n")
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


def py_spy() -> str:
    exe = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
    if not os.path.exists(exe):
        raise SystemExit("bench.profile: py-spy is not installed (make bench-profile installs it)")
    return exe


def compiled() -> bool:
    """kushi runs as the mypyc-compiled build here (``make bench-profile`` runs that)."""
    from kushi.server import build_form

    return build_form() == "mypyc-compiled"


def spy(pid: int, url: str, proxy: str, seconds: int, out: Path, fmt: str) -> None:
    """Sample kushi with py-spy (``fmt``: flamegraph or raw) while wrk runs. Compiled
    functions have no Python frames: py-spy then samples the native stacks too
    (``--native``, at a lower rate, since each sample unwinds C frames)."""
    argv = [py_spy(), "record", "-r", "400", "-f", fmt, "-o", str(out)]
    if compiled():
        argv[2:4] = ["--native", "-r", "200"]
    rec = subprocess.Popen(
        [*argv, "-d", str(seconds), "-p", str(pid)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(0.5)
    wrk(url, proxy, seconds)
    _, err = rec.communicate()
    if rec.returncode != 0 or not out.exists():
        raise SystemExit(f"bench.profile: py-spy failed: {err.strip()[-300:]}")


_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::\d+)?\)$")
#: A mypyc-compiled function's C name: ``CPyDef_exchange___Exchange____head_data`` is
#: ``Exchange._head_data`` in kushi/exchange.py (``CPyPy_`` is its Python-facing wrapper).
_COMPILED = re.compile(r"^CPy(?:Def|Py)_(?P<name>\w+)$")


def kushi_frame(func: str, file: str) -> tuple[str, str] | None:
    """(function, kushi file) for a frame of kushi's, Python or compiled; else None."""
    if file.startswith("kushi/"):
        return func, file
    m = _COMPILED.match(func)
    if m is None or "_mypyc" in func or "_mypyc_" in m["name"]:
        return None
    module, _, rest = m["name"].partition("___")
    if not rest:
        module, _, rest = m["name"].partition("__")
    return rest.replace("___", ".") or module, f"kushi/{module}.py, compiled"


def own_time(collapsed: Path, top: int = 15) -> list[str]:
    """The samples' own (leaf) time by function and by file, the time by the innermost
    kushi function (what it calls in C and in the kernel included: with the compiled
    build, the leaves are mostly CPython's and the kernel's), and the inclusive time of
    kushi's functions (each counted once per stack), as lines of text."""
    own: collections.Counter[str] = collections.Counter()
    files: collections.Counter[str] = collections.Counter()
    nearest: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    with open(collapsed) as fh:
        for line in fh:
            stack, _, count_text = line.rstrip().rpartition(" ")
            count = int(count_text)
            frames = []
            for frame in stack.split(";"):
                m = _FRAME.match(frame)
                frames.append((m["func"], m["file"]) if m else (frame, "?"))
            func, file = frames[-1]
            own[f"{func} ({file})"] += count
            files[file] += count
            ours = [k for k in (kushi_frame(f, p) for f, p in frames) if k is not None]
            if ours:
                nearest[f"{ours[-1][0]} ({ours[-1][1]})"] += count
            for name in {f"{f} ({p})" for f, p in ours}:
                inclusive[name] += count
            total += count
    total = max(total, 1)

    def block(title: str, counter: collections.Counter[str]) -> list[str]:
        out = [title]
        for name, count in counter.most_common(top):
            out.append(f"  {100 * count / total:5.1f}%  {name}")
        return out

    return [
        *block(f"py-spy: {total} samples; own time by function:", own),
        *block("own time by file:", files),
        *block("time by the innermost kushi function:", nearest),
        *block("inclusive time of kushi's functions:", inclusive),
    ]


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
        "--no-flame",
        action="store_true",
        help="skip the py-spy runs (no flame graph, no own-time list)",
    )
    parser.add_argument(
        "--out", default=str(BENCH_DIR / "results"), help="where the files go (bench/results)"
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
        cpu_line = (
            f"CPU per keep-alive 1 KiB {args.mode} request: {user + system:.1f} us "
            f"(user {user:.1f}, system {system:.1f}) over {requests} requests"
        )
        print(cpu_line, flush=True)
        if not args.no_flame:
            out = Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            stem = f"profile-{args.mode}-{time.strftime('%Y-%m-%d-%H%M')}"
            svg, collapsed, note = (out / f"{stem}.{ext}" for ext in ("svg", "txt", "md"))
            spy(pid, url, proxy, args.seconds, svg, "flamegraph")
            spy(pid, url, proxy, args.seconds, collapsed, "raw")
            top = own_time(collapsed)
            print("\n".join(top))
            note.write_text(
                f"# kushi profile, {args.mode}, {time.strftime('%Y-%m-%d %H:%M')}\n\n"
                f"{cpu_line}\n\nFlame graph (py-spy, {args.seconds} s of wrk -t1 -c20 "
                f"keep-alive 1 KiB): `{svg.name}`; collapsed stacks: `{collapsed.name}`.\n\n"
                "```\n" + "\n".join(top) + "\n```\n"
            )
            for path in (svg, collapsed, note):
                shutil.copyfile(path, out / f"profile-{args.mode}-latest{path.suffix}")
            print(f"flame graph: {svg}\nsummary: {note}", flush=True)
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
