"""SOCKS5 next to HTTP CONNECT through one kushi, on loopback: ``python -m bench.socks_vs_http``.

wrk and ab do not speak SOCKS5, so this side-by-side has its own clients, the same for both
doors: kushi runs one forward listener (HTTP CONNECT) and one SOCKS listener (one worker,
access log off); the origin, in a process of its own, listens on ``[::1]`` only and answers
``GET /1k`` (keep-alive) and ``GET /bulk`` (``--bulk-mib`` MiB from memory). Three figures
per door, each the median of ``--rounds``:

- bulk: curl downloads ``/bulk`` through a tunnel (``-p -x http://`` vs ``--proxy
  socks5h://``), MB/s;
- tunnels/s: ``--concurrency`` asyncio clients each open a tunnel, fetch ``/1k`` once and
  close, for ``--duration`` seconds (handshake, connect, relay, teardown);
- keep-alive req/s: ``--concurrency`` tunnels, each fetching ``/1k`` back to back.

The clients are Python (uvloop), so the absolute request rates are the client's as much as
kushi's; the ratio between the doors is the figure to read.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KUSHI = REPO / ".venv" / "bin" / "kushi"
ONE_K = b"k" * 1024
RESPONSE_1K = b"HTTP/1.1 200 OK\r\nContent-Length: 1024\r\n\r\n" + ONE_K


def free_port(host: str = "127.0.0.1") -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


# --- the origin (run in a child process: python -m bench.socks_vs_http --origin PORT MIB) ---


def origin(port: int, bulk_mib: int) -> None:
    chunk = b"b" * (1 << 20)
    sock = socket.socket(socket.AF_INET6)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("::1", port))
    sock.listen(1024)

    def serve(conn: socket.socket) -> None:
        buf = b""
        with conn:
            while True:
                while b"\r\n\r\n" not in buf:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buf += data
                head, _, buf = buf.partition(b"\r\n\r\n")
                if head.startswith(b"GET /bulk"):
                    size = bulk_mib << 20
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
                    for _ in range(bulk_mib):
                        conn.sendall(chunk)
                else:
                    conn.sendall(RESPONSE_1K)

    print("ready", flush=True)
    while True:
        conn, _ = sock.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


# --- the clients ---------------------------------------------------------------------------


async def open_tunnel(
    door: str, proxy: int, port: int
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy)
    if door == "http":
        writer.write(f"CONNECT [::1]:{port} HTTP/1.1\r\nHost: [::1]:{port}\r\n\r\n".encode())
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head
    else:
        writer.write(b"\x05\x01\x00")
        assert await reader.readexactly(2) == b"\x05\x00"
        writer.write(b"\x05\x01\x00\x04" + socket.inet_pton(socket.AF_INET6, "::1"))
        writer.write(port.to_bytes(2, "big"))
        reply = await reader.readexactly(4)
        assert reply[1] == 0, reply
        await reader.readexactly(16 + 2 if reply[3] == 4 else 4 + 2)
    return reader, writer


async def get_1k(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(b"GET /1k HTTP/1.1\r\nHost: origin\r\n\r\n")
    await reader.readexactly(len(RESPONSE_1K))


async def tunnels_per_second(door: str, proxy: int, port: int, conc: int, secs: float) -> float:
    done = 0
    end = time.monotonic() + secs

    async def worker() -> None:
        nonlocal done
        while time.monotonic() < end:
            reader, writer = await open_tunnel(door, proxy, port)
            await get_1k(reader, writer)
            writer.close()
            await writer.wait_closed()
            done += 1

    start = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(conc)))
    return done / (time.monotonic() - start)


async def keepalive_rps(door: str, proxy: int, port: int, conc: int, secs: float) -> float:
    tunnels = [await open_tunnel(door, proxy, port) for _ in range(conc)]
    done = 0
    end = time.monotonic() + secs

    async def worker(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal done
        while time.monotonic() < end:
            await get_1k(reader, writer)
            done += 1
        writer.close()

    start = time.monotonic()
    await asyncio.gather(*(worker(r, w) for r, w in tunnels))
    return done / (time.monotonic() - start)


def bulk_mbps(door: str, proxy: int, port: int) -> float:
    url = f"http://[::1]:{port}/bulk"
    via = (
        ["-p", "-x", f"http://127.0.0.1:{proxy}"]
        if door == "http"
        else [
            "--proxy",
            f"socks5h://127.0.0.1:{proxy}",
        ]
    )
    out = subprocess.run(
        ["curl", "-sS", "-g", "-o", "/dev/null", "-w", "%{speed_download}", *via, url],
        capture_output=True,
        text=True,
        check=True,
        env={k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")},
    )
    return float(out.stdout) / 1e6


def start_origin_and_kushi(
    oport: int, bulk_mib: int, config: Path, work: Path
) -> list[subprocess.Popen[bytes]]:
    """This module's origin (``--origin``) and a kushi serving ``config``, both ready; the
    caller terminates them. (bench.tls_compare starts its pair the same way.)"""
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "bench.socks_vs_http", "--origin", str(oport), str(bulk_mib)],
            cwd=REPO,
            stdout=subprocess.PIPE,
        ),
        subprocess.Popen(
            [str(KUSHI), "serve", "--config", str(config)], stderr=(work / "kushi.log").open("wb")
        ),
    ]
    assert procs[0].stdout is not None and procs[0].stdout.readline() == b"ready\n"
    while "kushi ready" not in (work / "kushi.log").read_text():
        assert procs[1].poll() is None, (work / "kushi.log").read_text()
        time.sleep(0.05)
    return procs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=float, default=3.0)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--bulk-mib", type=int, default=200)
    p.add_argument("--origin", nargs=2, type=int, metavar=("PORT", "MIB"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.origin:
        origin(*args.origin)
        return 0
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover
        pass
    oport, http, socks = free_port("::1"), free_port(), free_port()
    work = Path(tempfile.mkdtemp(prefix="kushi-socks-bench-"))
    config = work / "kushi.toml"
    config.write_text(
        f"""workers = 1
log_level = "info"
access_log = ""
admin_listen = []
allow_destinations = ["::1/128 {oport}"]
connect_ports = [{oport}]
[[listener]]
name = "http"
mode = "forward"
listen = ["127.0.0.1:{http}"]
[[listener]]
name = "socks"
mode = "socks"
listen = ["127.0.0.1:{socks}"]
"""
    )
    procs = start_origin_and_kushi(oport, args.bulk_mib, config, work)
    try:
        figures: dict[str, dict[str, list[float]]] = {
            door: {"bulk": [], "tunnels": [], "keepalive": []} for door in ("http", "socks")
        }
        for rnd in range(args.rounds):
            for door, port in (("http", http), ("socks", socks))[:: 1 if rnd % 2 == 0 else -1]:
                f = figures[door]
                f["bulk"].append(bulk_mbps(door, port, oport))
                f["tunnels"].append(
                    asyncio.run(
                        tunnels_per_second(door, port, oport, args.concurrency, args.duration)
                    )
                )
                f["keepalive"].append(
                    asyncio.run(keepalive_rps(door, port, oport, args.concurrency, args.duration))
                )
        med = {d: {k: statistics.median(v) for k, v in f.items()} for d, f in figures.items()}
        print(
            f"rounds {args.rounds}, {args.duration:g} s each, concurrency {args.concurrency}, "
            f"bulk {args.bulk_mib} MiB, cpus {os.cpu_count()}, load {os.getloadavg()[0]:.1f}"
        )
        print("| door | bulk MB/s | tunnels/s (1 GET each) | keep-alive req/s in tunnels |")
        print("| --- | ---: | ---: | ---: |")
        for door, label in (("http", "HTTP CONNECT"), ("socks", "SOCKS5 CONNECT")):
            m = med[door]
            print(f"| {label} | {m['bulk']:,.0f} | {m['tunnels']:,.0f} | {m['keepalive']:,.0f} |")
        ratio = {k: med["socks"][k] / med["http"][k] for k in med["http"]}
        print(
            "| SOCKS5 / HTTP | "
            + " | ".join(f"{ratio[k]:.2f}" for k in ("bulk", "tunnels", "keepalive"))
            + " |"
        )
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
