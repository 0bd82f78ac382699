"""Request time through kushi when the DNS misbehaves: this tree against another.

Usage: ``python -m bench.dns_faults [--old REF] [--runs N]`` (root: network namespaces).

One namespace runs kushi, curl and the test DNS server (tests/support/dnsserver.py on
127.0.0.1:53, the namespace's only nameserver, resolv.conf without options: glibc's
defaults, timeout 5 s and 2 attempts; kushi's ``[timeouts] dns`` is its default 5 s); a
second one runs a dual-stack origin. For each case curl fetches ``http://NAME/1k``
through kushi, with a new name every run (nothing cached): ``ok`` (both answers at once),
``slow-aaaa`` (AAAA 3 s late), ``lost-aaaa`` (AAAA never answered) and ``slow-a`` (A 3 s
late). ``--old REF`` (default ``main``) is exported with ``git archive`` and run with
``PYTHONPATH`` pointing at it. Prints the median time and the status per case.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from support import netns  # noqa: E402
from support.kushi_proc import Kushi  # noqa: E402
from support.netns import Topology  # noqa: E402
from support.origin import spawn_origin  # noqa: E402

ORIGIN6, ORIGIN4 = "2001:db8:53::2", "203.0.113.2"
CASES = {
    "ok": {},
    "slow-aaaa": {"delay": {"AAAA": 3.0}},
    "lost-aaaa": {"drop": ["AAAA"]},
    "slow-a": {"delay": {"A": 3.0}},
}
CLEAN_ENV = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}


def measure(src: Path, runs: int, work: Path) -> dict[str, tuple[float, str]]:
    zone: dict[str, object] = {}
    for case, faults in CASES.items():
        for i in range(runs):
            zone[f"{case}-{i}.{src.parent.name}.test"] = {
                "AAAA": [ORIGIN6],
                "A": [ORIGIN4],
                **faults,
            }
    zone_path = work / "zone.json"
    zone_path.write_text(json.dumps(zone))
    out: dict[str, tuple[float, str]] = {}
    with Topology() as topo:
        proxy = topo.add_host("proxy")
        origin = topo.add_host("origin")
        topo.link(
            proxy,
            origin,
            ["2001:db8:53::1/64", "203.0.113.1/24"],
            [f"{ORIGIN6}/64", f"{ORIGIN4}/24"],
        )
        topo.wait_ready()
        Path(f"/etc/netns/{proxy.ns}/resolv.conf").write_text("nameserver 127.0.0.1\n")
        dns = proxy.popen(
            [
                sys.executable,
                str(REPO / "tests/support/dnsserver.py"),
                "--listen",
                "127.0.0.1:53",
                "--zone",
                str(zone_path),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert dns.stdout is not None and dns.stdout.readline().strip() == "ready"
        server = spawn_origin(["[::]:80", "0.0.0.0:80"], work / "origin.jsonl", ns=origin)
        kushi = Kushi(
            ["serve", "--listen", "127.0.0.1:3128", "--access-log", ""],
            work,
            wait_for=[("127.0.0.1", 3128)],
            netns=proxy.ns,
            env={"PYTHONPATH": str(src)},
            loopback_destinations=False,
        )
        try:
            for case in CASES:
                times, statuses = [], []
                for i in range(runs):
                    name = f"{case}-{i}.{src.parent.name}.test"
                    start = time.monotonic()
                    proc = proxy.run(
                        [
                            "curl",
                            "-s",
                            "-o",
                            "/dev/null",
                            "-w",
                            "%{http_code}",
                            "--max-time",
                            "30",
                            "-x",
                            "http://127.0.0.1:3128",
                            f"http://{name}/1k",
                        ],
                        env=CLEAN_ENV,
                    )
                    times.append(time.monotonic() - start)
                    statuses.append(proc.stdout.strip())
                out[case] = (statistics.median(times), "/".join(sorted(set(statuses))))
        finally:
            kushi.stop()
            server.stop()
            netns.stop_process(dns)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", default="main", help="git ref to compare with (default main)")
    parser.add_argument("--runs", type=int, default=3, help="requests per case (median)")
    args = parser.parse_args()
    reason = netns.netns_available()
    if reason is not None:
        sys.exit(f"network namespaces unavailable: {reason}")
    with tempfile.TemporaryDirectory(prefix="kushi-dns-") as tmp:
        old_root = Path(tmp) / "old"
        new_root = Path(tmp) / "new"
        for root in (old_root, new_root):
            (root / "work").mkdir(parents=True)
        archive = subprocess.run(
            ["git", "-C", str(REPO), "archive", args.old, "src"], capture_output=True, check=True
        )
        subprocess.run(["tar", "-x", "-C", str(old_root)], input=archive.stdout, check=True)
        old = measure(old_root / "src", args.runs, old_root / "work")
        new = measure(REPO / "src", args.runs, new_root / "work")
    print(f"Request time through kushi, seconds (median of {args.runs}), HTTP status")
    print(f"| case | {args.old} | this tree |")
    print("| --- | --- | --- |")
    for case in CASES:
        (t_old, s_old), (t_new, s_new) = old[case], new[case]
        print(f"| {case} | {t_old:.3f} ({s_old}) | {t_new:.3f} ({s_new}) |")


if __name__ == "__main__":
    main()
