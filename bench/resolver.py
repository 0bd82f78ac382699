"""Per-request cost of resolution for cached names: this tree's resolver against another's.

Usage: ``python -m bench.resolver [--old REF] [-n N]`` (``make bench-resolver``).

What one request pays before its first connection attempt is ``Connector.candidates``
(resolve, order by the egress policy, destination check), so that is what is timed, N
times in a row on a warm cache, in a fresh process per tree:

- ``hosts``: ``cached.test``, one IPv6 and one IPv4 address in /etc/hosts (each child
  runs in a mount namespace of its own, ``unshare -m``, with a hosts file bind-mounted over
  /etc/hosts): the old resolver caches getaddrinfo's answer for 30 s, the new one reads
  the hosts file itself;
- ``literal``: ``2001:db8::1`` (nothing to resolve; what ``make bench``'s rows use);
- ``dns``: ``dns.test``, the same two addresses from a real DNS server on loopback
  (tests/support/dnsserver.py) with a TTL of an hour, so every look-up after the first is
  a cache hit (new tree only: the old resolver cannot be pointed at a test server, and its
  ``hosts`` figure is what any cached name costs it: one dict look-up of getaddrinfo's
  answer).

``--old REF`` (default ``main``) is exported with ``git archive`` to a temporary directory
and run with ``PYTHONPATH`` pointing there. The trees take turns (``--processes`` fresh
processes each, ``--rounds`` rounds of N look-ups in each); prints microseconds per
look-up of the fastest round, as other work on the machine only ever adds time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def child(n: int, rounds: int, with_dns: bool) -> dict[str, float]:
    from kushi.connector import Connector, EgressPolicy
    from kushi.resolver import Resolver

    def check(addr: object, port: int) -> str | None:
        return None

    async def measure(resolver: Resolver, name: str) -> float:
        connector = Connector(resolver, check=check)
        policy = EgressPolicy()
        await connector.candidates(name, 80, policy)  # warm the cache
        results = []
        for _ in range(rounds):
            start = time.perf_counter()
            for _ in range(n):
                await connector.candidates(name, 80, policy)
            results.append((time.perf_counter() - start) / n * 1e6)
        return min(results)

    out: dict[str, float] = {}
    out["hosts"] = asyncio.run(measure(Resolver(), "cached.test"))
    out["literal"] = asyncio.run(measure(Resolver(), "2001:db8::1"))
    if with_dns:
        sys.path.insert(0, str(REPO / "tests"))
        from kushi.resolver import ResolverSettings
        from support.dnsserver import DNSServer

        zone = {"dns.test": {"AAAA": ["2001:db8::1"], "A": ["203.0.113.1"], "ttl": 3600}}
        with DNSServer("127.0.0.1", 0, zone) as server:
            settings = ResolverSettings(servers=(("127.0.0.1", server.port),))
            out["dns"] = asyncio.run(measure(Resolver(settings=settings), "dns.test"))
    return out


HOSTS = "127.0.0.1 localhost\n::1 localhost\n2001:db8::1 cached.test\n203.0.113.1 cached.test\n"


def run_tree(src: Path, n: int, rounds: int, with_dns: bool, hosts: Path) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(src)}
    argv = [sys.executable, "-m", "bench.resolver", "--child", "-n", str(n)]
    argv += ["--rounds", str(rounds)] + (["--dns"] if with_dns else [])
    script = f'mount --bind {hosts} /etc/hosts && exec "$@"'
    argv = ["unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh", *argv]
    proc = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, check=True)
    result: dict[str, float] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", default="main", help="git ref to compare with (default main)")
    parser.add_argument("-n", type=int, default=20000, help="look-ups per round")
    parser.add_argument("--rounds", type=int, default=5, help="rounds per process")
    parser.add_argument("--processes", type=int, default=4, help="processes per tree")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--dns", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.n, args.rounds, args.dns)))
        return
    with tempfile.TemporaryDirectory(prefix="kushi-old-") as tmp:
        hosts = Path(tmp) / "hosts"
        hosts.write_text(HOSTS)
        archive = subprocess.run(
            ["git", "-C", str(REPO), "archive", args.old, "src"], capture_output=True, check=True
        )
        subprocess.run(["tar", "-x", "-C", tmp], input=archive.stdout, check=True)
        # The two trees take turns, a fresh process each, and the fastest round counts:
        # on a shared machine, other work only ever adds time.
        olds, news = [], []
        for _ in range(args.processes):
            olds.append(run_tree(Path(tmp) / "src", args.n, args.rounds, False, hosts))
            news.append(run_tree(REPO / "src", args.n, args.rounds, True, hosts))
        old = {k: min(r[k] for r in olds) for k in olds[0]}
        new = {k: min(r[k] for r in news) for k in news[0]}
    rounds = args.rounds * args.processes
    print(f"Connector.candidates on a cached name, µs per look-up (fastest of {rounds} rounds)")
    print(f"| name | {args.old} | this tree |")
    print("| --- | --- | --- |")
    print(f"| cached.test (/etc/hosts) | {old['hosts']:.2f} | {new['hosts']:.2f} |")
    print(f"| dns.test (DNS cache, TTL 3600) | - | {new['dns']:.2f} |")
    print(f"| 2001:db8::1 (a literal) | {old['literal']:.2f} | {new['literal']:.2f} |")


if __name__ == "__main__":
    main()
