"""The cost of a source address per new upstream connection, on loopback.

    .venv/bin/python -m bench.source_connect

``Connector.connect`` to a loopback listener, N times in a row for each case: no source
(``loop.create_connection``), and a bound FREEBIND socket from a fixed address, a random
address of 127.0.0.0/8 per connection and a keyed-hash address per client. Best of 7
rounds, per connection; pooled connections cost nothing of this.
"""

from __future__ import annotations

import asyncio
import ipaddress
import time

import uvloop

from kushi.connector import Connector, EgressPolicy
from kushi.resolver import Resolver
from kushi.source import Source, SourcePlan

N = 1000
ROUNDS = 7
LOOPBACK = ipaddress.IPv4Network("127.0.0.0/8")


async def main() -> None:
    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    connector = Connector(Resolver())
    policy = EgressPolicy()
    cases: dict[str, Source | None] = {
        "no source": None,
        "fixed 127.0.0.2": Source(SourcePlan(v4=ipaddress.IPv4Network("127.0.0.2/32")), ""),
        "connection /8": Source(SourcePlan(v4=LOOPBACK, rotation="connection"), None),
        "client /8": Source(SourcePlan(v4=LOOPBACK, rotation="client"), "client 198.51.100.2"),
    }
    best = dict.fromkeys(cases, float("inf"))
    for _ in range(ROUNDS):
        for name, source in cases.items():
            start = time.perf_counter()
            for _ in range(N):
                upstream = await connector.connect("127.0.0.1", port, policy, source=source)
                upstream.conn.abort()
            best[name] = min(best[name], (time.perf_counter() - start) / N)
    server.close()
    for name, seconds in best.items():
        print(f"{name:16s} {seconds * 1e6:7.1f} us per connection (best of {ROUNDS} x {N})")


if __name__ == "__main__":
    uvloop.run(main())
