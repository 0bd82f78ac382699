"""Benchmark kushi against Squid, tinyproxy, proxy.py, nginx and HAProxy on loopback.

Usage: ``python -m bench.run [--quick] [--only ROWS] [--rounds N] [--duration S] [--out DIR]``.
See bench/README.md for what each row and column means.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from bench import clients, plot, report
from bench.procs import (
    BenchError,
    CpuMeter,
    RssSampler,
    cpu_busy_percent,
    stop_all,
    tree_pids,
    tree_rss_kib,
)
from bench.servers import REPO, ROW_NAMES, ROWS, Env, Row, Running, start_origin

BENCH_DIR = Path(__file__).resolve().parent
WORK = BENCH_DIR / "work"
ONE_KIB = "1k"
# Warn when other work keeps the CPUs this busy (percent) before or after the run.
BUSY_WARN = 15.0


@dataclass
class Settings:
    quick: bool
    rounds: int
    duration: float
    warmup: float
    ab_requests: int
    ab_time_limit: float
    blob_mib: int
    out: str
    only: list[str]
    threads: int = clients.WRK_THREADS
    connections: int = clients.CONNECTIONS


@dataclass
class Blob:
    name: str
    size: int
    sha256: str


def parse_args(argv: list[str] | None) -> Settings:
    ap = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    ap.add_argument("--quick", action="store_true", help="1 round, 3 s runs, 20 MiB body")
    ap.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="ROWS",
        help=f"comma-separated rows to run (repeatable); rows: {', '.join(ROW_NAMES)}",
    )
    ap.add_argument("--rounds", type=int, help="rounds (default 3, quick 1)")
    ap.add_argument("--duration", type=float, help="seconds per wrk run (default 10, quick 3)")
    ap.add_argument(
        "--out", default=str(BENCH_DIR / "results"), help="results directory (bench/results)"
    )
    a = ap.parse_args(argv)
    only: list[str] = []
    for item in a.only:
        only += [x.strip() for x in item.split(",") if x.strip()]
    unknown = [x for x in only if x not in ROW_NAMES]
    if unknown:
        ap.error(f"unknown row(s) {', '.join(unknown)}; rows are {', '.join(ROW_NAMES)}")
    rounds = a.rounds if a.rounds is not None else (1 if a.quick else 3)
    duration = a.duration if a.duration is not None else (3.0 if a.quick else 10.0)
    if not 1 <= rounds <= 20:
        ap.error("--rounds must be between 1 and 20")
    if not 1 <= duration <= 300:
        ap.error("--duration must be between 1 and 300 seconds")
    return Settings(
        quick=a.quick,
        rounds=rounds,
        duration=duration,
        warmup=1.0,
        ab_requests=2000 if a.quick else 10000,
        ab_time_limit=5.0 if a.quick else 15.0,
        blob_mib=20 if a.quick else 100,
        out=a.out,
        only=only,
    )


def prepare_www(www: Path, blob_mib: int) -> Blob:
    """The 1 KiB document and the big body (random bytes, reused across runs)."""
    www.mkdir(parents=True, exist_ok=True)
    one_k = www / ONE_KIB
    if not one_k.exists() or one_k.stat().st_size != 1024:
        one_k.write_bytes(os.urandom(1024))
    name = f"blob-{blob_mib}m.bin"
    blob = www / name
    size = blob_mib * 1024 * 1024
    if not blob.exists() or blob.stat().st_size != size:
        tmp = blob.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            for _ in range(blob_mib):
                f.write(os.urandom(1024 * 1024))
        tmp.replace(blob)
    for p in (www, one_k, blob):  # nginx workers may run as nobody
        p.chmod(0o755 if p.is_dir() else 0o644)
    return Blob(name, size, clients.sha256_file(blob))


def _mib(kib: int) -> float:
    return kib / 1024


def wait_ready(row: Row, env: Env, running: Running) -> str:
    """Retry a request to /ip through the row until it works; returns what the origin saw."""
    proxy = running.hostport if row.kind == "forward" else None
    if row.kind in ("reverse", "tcp"):
        url = f"http://{running.hostport}/ip"
    else:
        url = f"{env.origin_url}/ip"
    last = ""
    for _ in range(40):  # bounded: about 20 s
        try:
            return clients.curl_get(url, proxy, timeout=5).strip()
        except BenchError as exc:
            last = str(exc)
            if running.managed is not None and not running.managed.alive():
                break
            time.sleep(0.5)
    tail = running.managed.log_tail(3).replace("\n", " / ") if running.managed else ""
    msg = f"{row.name} never answered a test request ({last})"
    raise BenchError(msg + (f"; its log ends: {tail}" if tail else ""))


def measure(row: Row, env: Env, s: Settings, blob: Blob) -> dict[str, Any]:
    """One round of one row: start it, check it, run its workloads, stop it."""
    running = row.start(env)
    res: dict[str, Any] = {"problems": []}
    problems: list[str] = res["problems"]
    try:
        saw = wait_ready(row, env, running)
        res["origin_saw"] = saw
        if saw != "::1":
            problems.append(f"origin saw {saw!r}, not ::1")
        root = running.managed.pid if running.managed else None
        res["procs"] = len(tree_pids(root)) if root else None
        forward = row.kind == "forward"
        proxy = running.hostport if forward else None

        if not row.bulk_only:  # a splice = false variant: its request rates are kushi's
            # 1. wrk, keep-alive, 1 KiB.
            script = WORK / f"wrk-{row.name}.lua"
            if forward:
                clients.write_wrk_script(
                    script, f"{env.origin_url}/{ONE_KIB}", host_header=env.origin_authority
                )
                url = f"http://{running.hostport}/"
            else:
                clients.write_wrk_script(script, f"/{ONE_KIB}", host_header=None)
                url = f"http://{running.hostport}/{ONE_KIB}"
            try:
                clients.wrk(url, script, s.warmup)
                if root:
                    with RssSampler(root, 0.1) as sampler, CpuMeter(root) as cpu:
                        w = clients.wrk(url, script, s.duration)
                    res["rss_load_mib"] = _mib(sampler.peak_kib)
                else:
                    with CpuMeter(None) as cpu:
                        w = clients.wrk(url, script, s.duration)
                res["wrk_busy_pct"] = cpu.busy_pct
                if cpu.tree_seconds is not None and w.requests:
                    res["wrk_proxy_us"] = cpu.tree_seconds / w.requests * 1e6
                res["wrk"] = w.as_dict()
                res["wrk_rps"] = w.rps
                res["wrk_p50_ms"] = w.p50_ms
                res["wrk_p99_ms"] = w.p99_ms
                if w.errors:
                    problems.append(f"wrk: {w.error_text()}")
                print(f"    wrk: {w.rps:,.0f} req/s, p99 {w.p99_ms:.2f} ms", flush=True)
            except BenchError as exc:
                problems.append(str(exc))
            # 2. ab, no keep-alive (forward proxies and the direct baseline).
            if row.kind in ("forward", "direct"):
                try:
                    a = clients.ab(
                        f"{env.origin_url}/{ONE_KIB}", proxy, s.ab_requests, s.ab_time_limit
                    )
                    res["ab"] = a.as_dict()
                    res["ab_rps"] = a.rps
                    if a.errors:
                        problems.append(f"ab: {a.error_text()}")
                    print(f"    ab:  {a.rps:,.0f} req/s ({a.complete} requests)", flush=True)
                except BenchError as exc:
                    problems.append(str(exc))

        if forward:
            try:
                via = clients.curl_get(f"{env.origin_url}/ip", proxy, tunnel=True).strip()
                res["origin_saw_connect"] = via
                if via != "::1":
                    problems.append(f"origin saw {via!r} through CONNECT, not ::1")
            except BenchError as exc:
                problems.append(f"CONNECT check: {exc}")

        # 3./4. curl: the big body through the proxy, then through a CONNECT tunnel
        # (reverse and tcp rows: from the row's own address, as a client would).
        dl = WORK / "download.bin"
        blob_url = f"{env.origin_url}/{blob.name}"
        if row.kind in ("reverse", "tcp"):
            blob_url = f"http://{running.hostport}/{blob.name}"
        tunnels = (False, True) if forward else (False,)
        for tunnel in tunnels:
            label = "connect" if tunnel else "get"
            if root:
                before = tree_rss_kib(root)
                with RssSampler(root, 0.01) as sampler:
                    c = clients.curl_download(blob_url, proxy, tunnel, dl, blob.size, blob.sha256)
                res[f"rss_{label}_before_mib"] = _mib(before)
                res[f"rss_{label}_delta_mib"] = _mib(max(sampler.peak_kib - before, 0))
            else:
                c = clients.curl_download(blob_url, proxy, tunnel, dl, blob.size, blob.sha256)
            res[f"curl_{label}"] = c.as_dict()
            if c.ok:
                res[f"{label}_mbps"] = c.mb_per_s
            else:
                problems.append(f"curl {label.upper()}: {c.problem}")
            print(f"    curl {label}: {c.mb_per_s:,.0f} MB/s {c.problem}", flush=True)
        if forward and row.name.startswith("kushi"):
            # kushi's forward port also speaks SOCKS5: the same body through a SOCKS5 tunnel.
            c = clients.curl_download(blob_url, proxy, True, dl, blob.size, blob.sha256, socks=True)
            res["curl_socks"] = c.as_dict()
            if c.ok:
                res["socks_mbps"] = c.mb_per_s
            else:
                problems.append(f"curl SOCKS5: {c.problem}")
            print(f"    curl socks5: {c.mb_per_s:,.0f} MB/s {c.problem}", flush=True)
        if row.kind == "direct":  # no tunnel; its GET is the baseline for both columns
            res["connect_mbps"] = res.get("get_mbps")
        return res
    finally:
        if running.managed is not None:
            running.managed.stop()


def _on_signal(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    s = parse_args(argv)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if inherited as ignored
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGHUP, _on_signal)
    started = time.strftime("%Y-%m-%d %H:%M")
    stamp = time.strftime("%Y-%m-%d-%H%M")
    t0 = time.monotonic()
    selected = [r for r in ROWS if not s.only or r.name in s.only]
    env = Env(work=WORK, www=WORK / "www")
    rounds: dict[str, list[dict[str, Any]]] = {r.name: [] for r in selected}
    notes: dict[str, list[str]] = {r.name: [] for r in selected}
    failures: dict[str, list[str]] = {r.name: [] for r in selected}
    skipped: set[str] = set()
    interrupted = False
    exit_code = 0
    busy_before: float | None = None
    busy_after: float | None = None
    try:
        WORK.mkdir(parents=True, exist_ok=True)
        print(f"bench: preparing {s.blob_mib} MiB body in {env.www}", flush=True)
        blob = prepare_www(env.www, s.blob_mib)
        busy_before = cpu_busy_percent(1.0)
        if busy_before > BUSY_WARN:
            print(
                f"bench: WARNING: the CPUs are already {busy_before:.0f}% busy before the "
                "run; other work on this machine will depress every figure",
                flush=True,
            )
        origin = start_origin(env)
        saw = clients.curl_get(f"{env.origin_url}/ip", None).strip()
        print(f"bench: nginx origin on {origin.hostport} (saw {saw})", flush=True)
        for row in selected:
            why = row.available(env)
            if why:
                notes[row.name].append(why)
                skipped.add(row.name)
                print(f"bench: skipping {row.name}: {why}", flush=True)
        active = [r for r in selected if r.name not in skipped]
        for rnd in range(s.rounds):
            k = rnd % len(active) if active else 0
            order = active[k:] + active[:k]
            for row in order:
                if row.name in skipped:
                    continue
                print(f"bench: round {rnd + 1}/{s.rounds}: {row.name}", flush=True)
                try:
                    result = measure(row, env, s, blob)
                except BenchError as exc:
                    msg = " / ".join(str(exc).splitlines())[:400]
                    print(f"bench: {row.name} failed to start: {exc}", flush=True)
                    failures[row.name].append(f"round {rnd + 1}: failed to start: {msg}")
                    skipped.add(row.name)
                    continue
                result["round"] = rnd + 1
                rounds[row.name].append(result)
                for p in result["problems"]:
                    print(f"    FLAG: {p}", flush=True)
        busy_after = cpu_busy_percent(1.0)
    except KeyboardInterrupt:
        interrupted = True
        exit_code = 130
        print("\nbench: interrupted; stopping servers", flush=True)
    except BenchError as exc:
        exit_code = 1
        print(f"bench: {exc}", flush=True)
    finally:
        stop_all()
    if exit_code == 1:
        return 1

    aggs = {
        name: report.aggregate(name, rounds[name], notes[name], failures[name], s.rounds)
        for name in rounds
    }
    mach = report.machine(env)
    settings = asdict(s)
    settings["elapsed_s"] = round(time.monotonic() - t0, 1)
    settings["cpu_busy_before_pct"] = None if busy_before is None else round(busy_before, 1)
    settings["cpu_busy_after_pct"] = None if busy_after is None else round(busy_after, 1)
    markdown = report.render(aggs, settings, mach, started, interrupted, BUSY_WARN)
    raw = {
        "started": started,
        "interrupted": interrupted,
        "settings": settings,
        "machine": mach,
        "rows": aggs,
    }
    print()
    print(markdown)
    out = Path(s.out)
    if not out.is_absolute():
        out = Path.cwd() / out
    svg = plot.render_svg(aggs, s.blob_mib, f"kushi benchmark, {started}")
    paths = report.write(out, stamp, markdown, raw, partial=interrupted, svg=svg)
    shown = ", ".join(str(p.relative_to(REPO)) if p.is_relative_to(REPO) else str(p) for p in paths)
    print(f"bench: wrote {shown} in {settings['elapsed_s']:.0f} s", flush=True)
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
