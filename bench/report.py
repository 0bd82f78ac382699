"""Aggregation over rounds, the markdown tables, the machine description, and the files."""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.servers import KUSHI, REPO, ROWS, Env, proxypy_bin

# Per-round numeric fields; the report shows the median over the rounds a row ran.
METRICS = (
    "wrk_rps",
    "wrk_p50_ms",
    "wrk_p99_ms",
    "wrk_busy_pct",
    "wrk_proxy_us",
    "ab_rps",
    "get_mbps",
    "connect_mbps",
    "socks_mbps",
    "rss_load_mib",
    "rss_get_before_mib",
    "rss_get_delta_mib",
    "rss_connect_delta_mib",
    "procs",
)


def aggregate(
    name: str,
    rounds: list[dict[str, Any]],
    notes: list[str],
    failures: list[str],
    total_rounds: int,
) -> dict[str, Any]:
    """Medians of each metric over the rounds a row ran, plus every problem seen in any round.

    ``notes`` say why a row never ran; ``failures`` are rounds in which a row that did run
    elsewhere failed to start (they flag the row).
    """
    median: dict[str, float | None] = {}
    for key in METRICS:
        values = [r[key] for r in rounds if isinstance(r.get(key), int | float)]
        median[key] = statistics.median(values) if values else None
    # The same problem in several rounds is listed once, with the rounds it was seen in
    # (counts differ between rounds, so they are compared with the digits blanked out).
    seen: dict[str, tuple[str, list[int]]] = {}
    for i, r in enumerate(rounds, 1):
        for p in r.get("problems", []):
            first, where = seen.setdefault(re.sub(r"\d+", "#", p), (p, []))
            where.append(int(r.get("round", i)))
    problems = [
        first
        + (f" [round {', '.join(map(str, where))} of {total_rounds}]" if total_rounds > 1 else "")
        for first, where in seen.values()
    ]
    if rounds:
        problems += failures
        if len(rounds) < total_rounds:
            problems.append(f"medians of {len(rounds)} of {total_rounds} rounds")
    else:
        notes = notes + failures
    saw = sorted({str(r["origin_saw"]) for r in rounds if r.get("origin_saw")})
    return {
        "row": name,
        "rounds": rounds,
        "median": median,
        "problems": problems,
        "origin_saw": saw,
        "notes": notes,
        "ran": bool(rounds),
    }


# ---------------------------------------------------------------------------------------------
# Formatting


def _num(v: float | None, digits: int = 0) -> str:
    if v is None:
        return "–"
    return f"{v:,.{digits}f}"


def _ratio(v: float | None, base: float | None) -> str:
    if v is None or not base:
        return "–"
    return f"{v / base:.2f}×"


def _cell(v: float | None, bases: Sequence[float | None], digits: int = 0) -> str:
    if v is None:
        return "–"
    return f"{_num(v, digits)} ({' / '.join(_ratio(v, b) for b in bases)})"


def _checks(agg: dict[str, Any]) -> str:
    if not agg["ran"]:
        return "skipped: " + "; ".join(agg["notes"]) if agg["notes"] else "skipped"
    parts = []
    if agg["problems"]:
        parts.append("**FLAGGED**: " + "; ".join(agg["problems"]))
    else:
        parts.append("ok")
    parts.extend(agg["notes"])
    return "; ".join(parts).replace("|", "\\|")


def _saw(agg: dict[str, Any]) -> str:
    return ", ".join(f"`{s}`" for s in agg["origin_saw"]) or "–"


def _cpu(m: dict[str, Any]) -> str:
    """How busy the machine was during the keep-alive run, and the proxy's CPU per
    request (user + system of its process tree): a row near 100% busy is limited by
    the machine (wrk and nginx share its cores), not by the proxy."""
    if m.get("wrk_busy_pct") is None:
        return "–"
    busy = f"{m['wrk_busy_pct']:.0f}%"
    return busy if m.get("wrk_proxy_us") is None else f"{busy} / {m['wrk_proxy_us']:.1f}"


def forward_table(aggs: dict[str, dict[str, Any]], blob_mib: int) -> str:
    def base(row: str, key: str) -> float | None:
        a = aggs.get(row)
        return a["median"][key] if a and a["ran"] else None

    head = (
        "| row | keep-alive 1 KiB req/s (×direct / ×squid) | p99 ms "
        "| CPU busy % / proxy µs per request, keep-alive "
        "| no keep-alive req/s, ab (×direct / ×squid) "
        f"| GET {blob_mib} MiB, MB/s (×direct / ×squid) "
        f"| CONNECT {blob_mib} MiB, MB/s (×direct / ×squid) "
        "| RSS under load, MiB | RSS Δ GET / CONNECT, MiB | procs | origin saw | checks |"
    )
    lines = [head, "|" + "---|" * 12]
    for row in ROWS:
        if row.kind in ("reverse", "tcp") or row.name not in aggs:
            continue
        a = aggs[row.name]
        m = a["median"]
        cells = [f"**{row.name}**"]
        cells.append(_cell(m["wrk_rps"], [base("direct", "wrk_rps"), base("squid", "wrk_rps")]))
        cells.append(_num(m["wrk_p99_ms"], 2))
        cells.append(_cpu(m))
        cells.append(_cell(m["ab_rps"], [base("direct", "ab_rps"), base("squid", "ab_rps")]))
        for key in ("get_mbps", "connect_mbps"):
            cells.append(_cell(m[key], [base("direct", key), base("squid", key)], 0))
        cells.append(_num(m["rss_load_mib"], 1))
        if m["rss_get_delta_mib"] is None and m["rss_connect_delta_mib"] is None:
            cells.append("–")
        else:
            cells.append(
                f"{_num(m['rss_get_delta_mib'], 1)} / {_num(m['rss_connect_delta_mib'], 1)}"
            )
        cells.append(_num(m["procs"]))
        cells.append(_saw(a))
        cells.append(_checks(a))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def socks_table(aggs: dict[str, dict[str, Any]], blob_mib: int) -> str:
    """kushi's forward port speaks SOCKS5 too: the same body through a SOCKS5 tunnel, next
    to the CONNECT tunnel of the same round (wrk and ab have no SOCKS5)."""
    lines = [
        f"| row | SOCKS5 CONNECT {blob_mib} MiB, MB/s | HTTP CONNECT, MB/s | SOCKS5 / CONNECT |",
        "|---|---|---|---|",
    ]
    for row in ROWS:
        a = aggs.get(row.name)
        if a is None or not a["ran"] or a["median"].get("socks_mbps") is None:
            continue
        m = a["median"]
        ratio = m["socks_mbps"] / m["connect_mbps"] if m.get("connect_mbps") else None
        cells = [
            f"**{row.name}**",
            _num(m["socks_mbps"], 0),
            _num(m["connect_mbps"], 0),
            "–" if ratio is None else f"{ratio:.2f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) if len(lines) > 2 else ""


#: Rows of the bulk table, and the share of a direct connection issue 14 asks of kushi's
#: tunnels: 0.8 with splice, 0.6 when they are copied.
BULK_ROWS = (
    "direct",
    "squid",
    "kushi",
    "kushi-w2",
    "kushi-copy",
    "nginx-reverse",
    "kushi-reverse",
    "haproxy-tcp",
    "kushi-tcp",
    "kushi-tcp-copy",
)
BULK_TARGET = {"kushi": 0.8, "kushi-w2": 0.8, "kushi-tcp": 0.8, "kushi-copy": 0.6}
BULK_TARGET["kushi-tcp-copy"] = 0.6


def bulk_table(aggs: dict[str, dict[str, Any]], blob_mib: int) -> str:
    """The big body by every way a row offers, each against the direct download of the
    same round set; kushi's tunnel rows with their target (CONNECT, or the tcp relay)."""
    direct = aggs.get("direct")
    base = direct["median"]["get_mbps"] if direct and direct["ran"] else None
    lines = [
        f"| row | GET {blob_mib} MiB, MB/s (×direct) | CONNECT (×direct) | SOCKS5 (×direct) "
        "| tunnel target |",
        "|---|---|---|---|---|",
    ]
    for name in BULK_ROWS:
        a = aggs.get(name)
        if a is None or not a["ran"]:
            continue
        m = a["median"]
        connect = m.get("connect_mbps") if name != "direct" else None
        cells = [f"**{name}**", _cell(m.get("get_mbps"), [base])]
        cells.append(_cell(connect, [base]) if connect is not None else "–")
        cells.append(_cell(m.get("socks_mbps"), [base]) if m.get("socks_mbps") else "–")
        target = BULK_TARGET.get(name)
        tunnel = m.get("get_mbps") if name.startswith("kushi-tcp") else connect
        if target is None or tunnel is None or not base:
            cells.append("–")
        else:
            verdict = "met" if tunnel / base >= target else "**not met**"
            cells.append(f"≥ {target:.1f}× direct: {verdict} ({tunnel / base:.2f}×)")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) if len(lines) > 2 else ""


def reverse_table(aggs: dict[str, dict[str, Any]], blob_mib: int) -> str:
    """Reverse proxies (against nginx) and TCP relays (against HAProxy in mode tcp)."""

    def base(row: str, key: str) -> float | None:
        a = aggs.get(row)
        return a["median"][key] if a and a["ran"] else None

    anchor = {"reverse": "nginx-reverse", "tcp": "haproxy-tcp", "direct": "nginx-reverse"}
    head = (
        "| row | keep-alive 1 KiB req/s (×direct / ×anchor) | p50 ms | p99 ms "
        "| CPU busy % / proxy µs per request, keep-alive "
        f"| GET {blob_mib} MiB, MB/s (×direct / ×anchor) | RSS under load, MiB | RSS Δ GET, MiB "
        "| procs | origin saw | checks |"
    )
    lines = [head, "|" + "---|" * 11]
    for row in ROWS:
        if row.kind == "forward" or row.name not in aggs:
            continue
        a = aggs[row.name]
        m = a["median"]
        other = anchor[row.kind]
        cells = [
            f"**{row.name}**",
            _cell(m["wrk_rps"], [base("direct", "wrk_rps"), base(other, "wrk_rps")]),
            _num(m["wrk_p50_ms"], 2),
            _num(m["wrk_p99_ms"], 2),
            _cpu(m),
            _cell(m["get_mbps"], [base("direct", "get_mbps"), base(other, "get_mbps")]),
            _num(m["rss_load_mib"], 1) if row.kind != "direct" else "–",
            _num(m["rss_get_delta_mib"], 1) if row.kind != "direct" else "–",
            _num(m["procs"]),
            _saw(a),
            _checks(a),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Machine description


def _first_line(argv: list[str]) -> str:
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return "not installed"
    text = (p.stdout.strip() or p.stderr.strip()).splitlines()
    return text[0].strip() if text else "?"


def machine(env: Env) -> dict[str, str]:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = "?"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
                break
    except OSError:
        pass
    distro = "?"
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                distro = line.split("=", 1)[1].strip('"')
    except OSError:
        pass
    git = _first_line(["git", "-C", str(REPO), "describe", "--always", "--dirty"])
    proxypy = proxypy_bin(env)
    return {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "cores_usable": str(len(os.sched_getaffinity(0))),
        "memory": mem,
        "kernel": platform.release(),
        "os": distro,
        "python": platform.python_version(),
        "kushi": _first_line([str(KUSHI), "--version"]) if KUSHI.exists() else "not installed",
        "kushi_commit": git,
        "kushi_build": _first_line(
            [sys.executable, "-c", "from kushi.server import build_form; print(build_form())"]
        ),
        "nginx": _first_line(["nginx", "-v"]),
        "squid": _first_line(["squid", "-v"]),
        "tinyproxy": _first_line(["tinyproxy", "-v"]),
        "haproxy": _first_line(["haproxy", "-v"]),
        "proxy.py": (
            _first_line([str(proxypy), "--version"]) if proxypy.exists() else "not installed"
        ),
        "wrk": _first_line(["wrk", "-v"]),
        "ab": _first_line(["ab", "-V"]),
        "curl": _first_line(["curl", "--version"]),
    }


# ---------------------------------------------------------------------------------------------
# The report


def render(
    aggs: dict[str, dict[str, Any]],
    settings: dict[str, Any],
    mach: dict[str, str],
    started: str,
    interrupted: bool,
    busy_warn: float = 15.0,
) -> str:
    blob_mib = int(settings["blob_mib"])
    title = f"# kushi benchmark, {started}" + (" (quick)" if settings["quick"] else "")
    out = [title, ""]
    if interrupted:
        out += ["**Interrupted: partial results.**", ""]
    busy = [settings.get("cpu_busy_before_pct"), settings.get("cpu_busy_after_pct")]
    if any(b is not None and b > busy_warn for b in busy):
        shown = " / ".join("?" if b is None else f"{b:.0f}%" for b in busy)
        out += [
            f"**Warning: other work was using the CPUs (busy in the second before / after "
            f"the run: {shown}); figures measured while it ran are depressed and the ratios "
            "are noisier.**",
            "",
        ]
    out += [
        f"{settings['rounds']} round(s), order rotated each round, medians shown. "
        f"wrk: {settings['threads']} threads, {settings['connections']} connections, "
        f"{settings['duration']:g} s (after a {settings['warmup']:g} s warm-up); "
        f"ab: -c {settings['connections']} -n {settings['ab_requests']} "
        f"(capped at {settings['ab_time_limit']:g} s), no keep-alive; "
        f"curl: one {blob_mib} MiB body, length and sha256 checked. "
        "Client → proxy over 127.0.0.1, proxy → nginx origin on [::1] only "
        "(1 worker, access log off). MB/s = 10^6 bytes/s.",
        "",
        "## Forward proxies",
        "",
        forward_table(aggs, blob_mib),
        "",
        "SOCKS5 on kushi's forward port (`curl --proxy socks5h://`):",
        "",
        socks_table(aggs, blob_mib) or "(no kushi forward row ran)",
        "",
        f"## Bulk: {blob_mib} MiB through each kind of tunnel",
        "",
        "kushi's tunnels between two plain TCP sockets are spliced (`splice(2)`, the kernel "
        "moves the bytes); the `-copy` rows run with `splice = false`, as a tunnel with TLS "
        "on one side would be. curl writes the body to a file in every row, direct included.",
        "",
        bulk_table(aggs, blob_mib) or "(no bulk row ran)",
        "",
        "## Reverse proxies and TCP relays",
        "",
        "The anchor is nginx for reverse rows and HAProxy in mode tcp for tcp rows.",
        "",
        reverse_table(aggs, blob_mib),
        "",
        "Rows:",
        "",
    ]
    for row in ROWS:
        if row.name in aggs:
            out.append(f"- **{row.name}**: {row.description}")
    out += ["", "## Machine", ""]
    out += [f"- {k}: {v}" for k, v in mach.items()]
    out.append(
        "- CPU busy (all cores) in the second before / after the run: "
        + " / ".join("?" if b is None else f"{b:.0f}%" for b in busy)
    )
    out.append(f"- run time: {settings.get('elapsed_s', 0):.0f} s")
    out.append("")
    return "\n".join(out)


def write(
    out_dir: Path,
    stamp: str,
    markdown: str,
    raw: dict[str, Any],
    partial: bool,
    svg: str | None = None,
) -> list[Path]:
    """STAMP.md, STAMP.json and the plot STAMP.svg, and latest.md / latest.json /
    latest.svg unless the run was partial."""
    out_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps(raw, indent=2, sort_keys=False) + "\n"
    if partial:
        stamp += "-interrupted"
    outputs = [("md", markdown), ("json", text)] + ([("svg", svg)] if svg else [])
    files = [(out_dir / f"{stamp}.{ext}", content) for ext, content in outputs]
    if not partial:
        files += [(out_dir / f"latest.{ext}", content) for ext, content in outputs]
    for path, content in files:
        path.write_text(content)
    return [path for path, _ in files]
