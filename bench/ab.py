"""A/B: kushi's CPU time per request for several source trees (or configs), side by side.

    git worktree add /tmp/before HEAD~1
    .venv/bin/python -m bench.ab before=/tmp/before/src after=src
    .venv/bin/python -m bench.ab --no-keepalive off=src on=src@admin.toml
    .venv/bin/python -m bench.ab --auth plain=build/compiled auth=build/compiled@auth
    .venv/bin/python -m bench.ab --reverse before=/tmp/before/src after=src

``--auth`` sends ``Proxy-Authorization`` (user ``bench``) on every request, and a variant
whose TOML is the word ``auth`` gets an ``auth_file`` (bcrypt, cost 12) holding that user:
an authenticated listener against the same listener without it (issue 14's target).
``--reverse`` runs each variant as a reverse listener with the origin as its backend, and
wrk sends it origin-form requests.

Each VARIANT is NAME=SRC[@TOML]: SRC is a directory holding the ``kushi`` package (put on
PYTHONPATH), TOML an optional file of extra config lines (admin_listen, access_log, ... ;
kushi runs with one worker, the admin listener and access log off unless it sets them).
All variants run at once against one nginx origin; the rounds alternate between them, and
each round drives one variant with wrk (1 thread, 20 kept-alive connections; or ab -c 50
without keep-alive) and reads the process's CPU time from /proc. Medians are printed:
noise on a shared 2-core machine is a few µs, so a change smaller than that is not one.
"""

from __future__ import annotations

import argparse
import base64
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.procs import clean_env, free_port, port_open, stop_all
from bench.profile import cpu_seconds, wrk
from bench.run import WORK, prepare_www
from bench.servers import Env, start_origin


@dataclass
class Variant:
    name: str
    src: Path
    extra: str
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    samples: list[tuple[float, float, float]] = field(default_factory=list)  # user, sys, rate


def parse_variant(spec: str) -> Variant:
    name, sep, rest = spec.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"{spec!r}: expected NAME=SRC[@TOML]")
    src, _, toml = rest.partition("@")
    if not (Path(src) / "kushi").is_dir():
        raise argparse.ArgumentTypeError(f"{spec!r}: no kushi package in {src}")
    if toml == "auth":
        return Variant(name, Path(src).resolve(), f'auth_file = "{htpasswd()}"\n')
    return Variant(name, Path(src).resolve(), Path(toml).read_text() if toml else "")


AUTH_USER, AUTH_PASSWORD = "bench", "bench-password"


def htpasswd() -> Path:
    import bcrypt

    path = WORK / "ab-htpasswd"
    WORK.mkdir(parents=True, exist_ok=True)
    digest = bcrypt.hashpw(AUTH_PASSWORD.encode(), bcrypt.gensalt(12)).decode()
    path.write_text(f"{AUTH_USER}:{digest}\n")
    return path


def start(v: Variant, env: Env, reverse: bool = False) -> None:
    v.port = free_port()
    base = 'log_level = "warning"\nworkers = 1\n'
    if "admin_listen" not in v.extra:
        base += "admin_listen = []\n"
    if "access_log" not in v.extra:
        base += 'access_log = ""\n'
    if reverse:
        listener = f'[[listener]]\nmode = "reverse"\nlisten = ["127.0.0.1:{v.port}"]\n'
        listener += f'backend = ["{env.origin_url}"]\n'
        base = v.extra + "\n" + base + listener
    else:
        base = f'listen = ["127.0.0.1:{v.port}"]\nallow = ["127.0.0.0/8"]\n' + base
        base += f'allow_destinations = ["::1/128 {env.origin_port}"]\n' + v.extra
    cfg = WORK / f"ab-{v.name}.toml"
    cfg.write_text(base)
    v.proc = subprocess.Popen(
        [sys.executable, "-m", "kushi", "serve", "--config", str(cfg)],
        env=clean_env({"PYTHONPATH": str(v.src)}),
    )
    deadline = time.monotonic() + 20
    while not port_open("127.0.0.1", v.port):
        if v.proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"{v.name}: kushi did not start")
        time.sleep(0.1)


def drive(url: str, proxy: str, seconds: int, keepalive: bool, auth: bool = False) -> int:
    """Requests completed in ``seconds`` through ``proxy``."""
    if keepalive:
        headers = {}
        if auth:
            token = base64.b64encode(f"{AUTH_USER}:{AUTH_PASSWORD}".encode()).decode()
            headers["Proxy-Authorization"] = f"Basic {token}"
        return wrk(url, proxy, seconds, headers)
    argv = ["ab", "-q", "-c", "50", "-t", str(seconds), "-n", "10000000"]
    # An origin-form URL (--reverse) goes to the listener itself; else through it (-X).
    argv += [proxy + url] if url.startswith("/") else ["-X", proxy[7:], url]
    out = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for line in out.splitlines():
        if line.startswith("Complete requests:"):
            return int(line.split()[-1])
    raise RuntimeError(out)


def main() -> int:
    parser = argparse.ArgumentParser(prog="bench.ab", description=__doc__)
    parser.add_argument("variants", nargs="+", type=parse_variant, metavar="NAME=SRC[@TOML]")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--seconds", type=int, default=3)
    parser.add_argument("--no-keepalive", action="store_true", help="ab -c 50 instead of wrk")
    parser.add_argument(
        "--auth", action="store_true", help="send Proxy-Authorization (kept-alive runs only)"
    )
    parser.add_argument(
        "--reverse", action="store_true", help="reverse listeners, origin-form requests"
    )
    args = parser.parse_args()
    if args.auth and args.reverse:
        parser.error("--auth is about forward listeners (Proxy-Authorization)")
    if args.auth and args.no_keepalive:
        parser.error("--auth drives wrk (kept-alive); ab cannot send Proxy-Authorization")
    env = Env(work=WORK, www=WORK / "www")
    variants: list[Variant] = args.variants
    try:
        WORK.mkdir(parents=True, exist_ok=True)
        prepare_www(env.www, 1)
        start_origin(env)
        for v in variants:
            start(v, env, args.reverse)
        url = "/1k" if args.reverse else f"{env.origin_url}/1k"
        for r in range(args.rounds):
            for v in variants:
                assert v.proc is not None
                proxy = f"http://127.0.0.1:{v.port}"
                if r == 0:
                    drive(url, proxy, 1, not args.no_keepalive, args.auth)  # warm-up
                user0, sys0 = cpu_seconds(v.proc.pid)
                n = drive(url, proxy, args.seconds, not args.no_keepalive, args.auth)
                user1, sys1 = cpu_seconds(v.proc.pid)
                v.samples.append(
                    ((user1 - user0) / n * 1e6, (sys1 - sys0) / n * 1e6, n / args.seconds)
                )
        what = "kept-alive" if not args.no_keepalive else "no-keep-alive"
        print(f"CPU per {what} 1 KiB request, medians of {args.rounds} alternating rounds:")
        for v in variants:
            total = statistics.median(u + s for u, s, _ in v.samples)
            user = statistics.median(u for u, _, _ in v.samples)
            system = statistics.median(s for _, s, _ in v.samples)
            rate = statistics.median(x for _, _, x in v.samples)
            rounds = ", ".join(f"{u + s:.1f}" for u, s, _ in v.samples)
            print(
                f"  {v.name:12s} {total:6.1f} us (user {user:.1f}, system {system:.1f}), "
                f"{rate:,.0f} req/s; rounds: {rounds}"
            )
    finally:
        for v in variants:
            if v.proc is not None:
                v.proc.kill()
                v.proc.wait()
        stop_all()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
