"""The report's figures as one SVG: a horizontal bar chart per workload, kushi beside
Squid, nginx and a direct connection (written by hand: no plotting library to install).

Each panel shows the medians of one column of the report for the rows that ran it, with
the value at the end of each bar and, for kushi's rows, the ratio to the panel's anchor
(direct for the bulk panels, Squid for the forward request rates, nginx for reverse).
"""

from __future__ import annotations

from html import escape
from typing import Any

#: (title, metric key, unit, rows in order, the anchor row the ratios are to)
PANELS: tuple[tuple[str, str, str, tuple[str, ...], str], ...] = (
    (
        "forward, keep-alive 1 KiB",
        "wrk_rps",
        "req/s",
        ("direct", "squid", "kushi", "kushi-w2"),
        "squid",
    ),
    (
        "forward, no keep-alive 1 KiB (ab)",
        "ab_rps",
        "req/s",
        ("direct", "squid", "kushi", "kushi-w2"),
        "squid",
    ),
    (
        "reverse, keep-alive 1 KiB",
        "wrk_rps",
        "req/s",
        ("direct", "nginx-reverse", "haproxy", "kushi-reverse"),
        "nginx-reverse",
    ),
    (
        "bulk GET {mib} MiB",
        "get_mbps",
        "MB/s",
        (
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
        ),
        "direct",
    ),
    (
        "bulk CONNECT {mib} MiB",
        "connect_mbps",
        "MB/s",
        ("direct", "squid", "kushi", "kushi-w2", "kushi-copy"),
        "direct",
    ),
    (
        "bulk SOCKS5 {mib} MiB",
        "socks_mbps",
        "MB/s",
        ("direct", "kushi", "kushi-w2", "kushi-copy"),
        "direct",
    ),
)

WIDTH = 760
LABEL_W = 130
BAR_H = 18
GAP = 6
PANEL_GAP = 34
COLOURS = {"kushi": "#2b7bba", "anchor": "#8a8a8a", "other": "#c9c9c9"}


def _value(aggs: dict[str, dict[str, Any]], row: str, key: str) -> float | None:
    agg = aggs.get(row)
    if not agg or not agg.get("ran"):
        return None
    value = agg["median"].get(key)
    if row == "direct" and key in ("connect_mbps", "socks_mbps"):
        value = agg["median"].get("get_mbps")  # no tunnel: its GET is the baseline
    return float(value) if isinstance(value, int | float) else None


def render_svg(aggs: dict[str, dict[str, Any]], blob_mib: int, title: str) -> str:
    parts: list[str] = []
    y = 40
    bar_max = WIDTH - LABEL_W - 150
    for name, key, unit, rows, anchor in PANELS:
        values = [(row, _value(aggs, row, key)) for row in rows]
        shown = [(row, v) for row, v in values if v is not None]
        if not shown:
            continue
        top = max(v for _, v in shown) or 1.0
        base = _value(aggs, anchor, key) if anchor else None
        heading = f"{name.format(mib=blob_mib)}, {unit}"
        parts.append(f'<text x="10" y="{y}" class="h">{escape(heading)}</text>')
        y += 10
        for row, v in shown:
            width = max(1.0, bar_max * v / top)
            kind = "kushi" if row.startswith("kushi") else "anchor" if row == anchor else "other"
            label = f"{v:,.0f}"
            if base and row.startswith("kushi"):
                label += f"  ({v / base:.2f}× {anchor})"
            parts += [
                f'<text x="{LABEL_W - 8}" y="{y + BAR_H - 5}" class="r">{escape(row)}</text>',
                f'<rect x="{LABEL_W}" y="{y}" width="{width:.1f}" height="{BAR_H}" '
                f'fill="{COLOURS[kind]}"/>',
                f'<text x="{LABEL_W + width + 6:.1f}" y="{y + BAR_H - 5}">{escape(label)}</text>',
            ]
            y += BAR_H + GAP
        y += PANEL_GAP
    height = y
    head = (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" '
        f'viewBox="0 0 {WIDTH} {height}" font-family="sans-serif" font-size="12">\n'
        "<style>.h{font-weight:bold;font-size:13px}.r{text-anchor:end}"
        ".t{font-size:15px;font-weight:bold}</style>\n"
        f'<rect width="{WIDTH}" height="{height}" fill="white"/>\n'
        f'<text x="10" y="20" class="t">{escape(title)}</text>\n'
    )
    return head + "\n".join(parts) + "\n</svg>\n"
