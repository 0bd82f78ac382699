"""TLS next to plain HTTP on kushi's forward port, on loopback: ``python -m bench.tls_compare``.

One kushi (one worker, access log off) with two forward listeners: plain on 127.0.0.1 and
TLS (a self-signed P-256 certificate made with the ``openssl`` CLI) on 127.0.0.1; the origin
(``bench.socks_vs_http``'s, in a process of its own) listens on ``[::1]`` only and answers
``GET /1k`` (keep-alive) and ``GET /bulk`` (``--bulk-mib`` MiB from memory). Per door, the
median of ``--rounds``:

- keep-alive req/s: ``--concurrency`` clients, one connection each, ``GET
  http://[::1]:PORT/1k`` back to back through the proxy (forwarded, not tunnelled);
- CONNECT keep-alive req/s: the same inside ``--concurrency`` CONNECT tunnels;
- bulk GET and bulk CONNECT MB/s: curl downloads ``/bulk`` through the proxy (``-x
  http://`` vs ``-x https://`` with ``--proxy-cacert``; ``-p`` for CONNECT).

The request-rate clients are Python (uvloop, ``ssl``), so the absolute rates are the
client's as much as kushi's; the TLS / plain ratio is the figure to read.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.socks_vs_http import free_port, start_origin_and_kushi

Door = tuple[int, ssl.SSLContext | None]


async def _open(door: Door) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    port, ctx = door
    return await asyncio.open_connection(
        "127.0.0.1", port, ssl=ctx, server_hostname="localhost" if ctx else None
    )


async def _response(reader: asyncio.StreamReader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    await reader.readexactly(length)
    return int(head.split()[1])


async def keepalive_rps(door: Door, oport: int, conc: int, secs: float, tunnel: bool) -> float:
    conns = []
    for _ in range(conc):
        reader, writer = await _open(door)
        if tunnel:
            writer.write(f"CONNECT [::1]:{oport} HTTP/1.1\r\nHost: [::1]:{oport}\r\n\r\n".encode())
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200"), head
            request = b"GET /1k HTTP/1.1\r\nHost: origin\r\n\r\n"
        else:
            request = f"GET http://[::1]:{oport}/1k HTTP/1.1\r\nHost: [::1]:{oport}\r\n\r\n"
            request = request.encode()  # type: ignore[assignment]
        conns.append((reader, writer, request))
    done = 0
    end = time.monotonic() + secs

    async def worker(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, req: bytes
    ) -> None:
        nonlocal done
        while time.monotonic() < end:
            writer.write(req)
            assert await _response(reader) == 200
            done += 1
        writer.close()

    start = time.monotonic()
    await asyncio.gather(*(worker(r, w, q) for r, w, q in conns))  # type: ignore[arg-type]
    return done / (time.monotonic() - start)


def bulk_mbps(port: int, tls: bool, oport: int, cert: Path, tunnel: bool) -> float:
    scheme = "https" if tls else "http"
    via = ["-x", f"{scheme}://localhost:{port}", "--proxy-cacert", str(cert)]
    out = subprocess.run(
        ["curl", "-sS", "-g", "-o", "/dev/null", "-w", "%{speed_download}"]
        + (["-p"] if tunnel else [])
        + via
        + [f"http://[::1]:{oport}/bulk"],
        capture_output=True,
        text=True,
        check=True,
        env={k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")},
    )
    return float(out.stdout) / 1e6


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=float, default=3.0)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--bulk-mib", type=int, default=200)
    args = p.parse_args(argv)
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover
        pass
    oport, plain, tls = free_port("::1"), free_port(), free_port()
    work = Path(tempfile.mkdtemp(prefix="kushi-tls-bench-"))
    cert, key = work / "cert.pem", work / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"]
        + ["-nodes", "-days", "2", "-subj", "/CN=localhost", "-addext"]
        + ["subjectAltName=DNS:localhost", "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )
    config = work / "kushi.toml"
    config.write_text(
        f"""workers = 1
log_level = "info"
access_log = ""
admin_listen = []
allow_destinations = ["::1/128 {oport}"]
connect_ports = [{oport}]
http_ports = [{oport}]
[[listener]]
name = "plain"
listen = ["127.0.0.1:{plain}"]
[[listener]]
name = "tls"
listen = ["127.0.0.1:{tls}"]
tls_cert = "{cert}"
tls_key = "{key}"
"""
    )
    ctx = ssl.create_default_context(cafile=str(cert))
    doors: dict[str, Door] = {"plain": (plain, None), "tls": (tls, ctx)}
    procs = start_origin_and_kushi(oport, args.bulk_mib, config, work)
    try:
        keys = ("keepalive", "connect_keepalive", "bulk_get", "bulk_connect")
        figures = {door: {k: [] for k in keys} for door in doors}  # type: dict[str, dict[str, list[float]]]
        for rnd in range(args.rounds):
            for name in list(doors)[:: 1 if rnd % 2 == 0 else -1]:
                door, f = doors[name], figures[name]
                for tunnel, key in ((False, "keepalive"), (True, "connect_keepalive")):
                    f[key].append(
                        asyncio.run(
                            keepalive_rps(door, oport, args.concurrency, args.duration, tunnel)
                        )
                    )
                f["bulk_get"].append(bulk_mbps(door[0], name == "tls", oport, cert, False))
                f["bulk_connect"].append(bulk_mbps(door[0], name == "tls", oport, cert, True))
        med = {d: {k: statistics.median(v) for k, v in f.items()} for d, f in figures.items()}
        print(
            f"rounds {args.rounds}, {args.duration:g} s each, concurrency {args.concurrency}, "
            f"bulk {args.bulk_mib} MiB, cpus {os.cpu_count()}, load {os.getloadavg()[0]:.1f}"
        )
        print(
            "| door | keep-alive req/s | CONNECT keep-alive req/s | bulk GET MB/s "
            "| bulk CONNECT MB/s |"
        )
        print("| --- | ---: | ---: | ---: | ---: |")
        for name, label in (("plain", "plain HTTP listener"), ("tls", "TLS listener")):
            m = med[name]
            print(f"| {label} | " + " | ".join(f"{m[k]:,.0f}" for k in keys) + " |")
        print(
            "| TLS / plain | "
            + " | ".join(f"{med['tls'][k] / med['plain'][k]:.2f}" for k in keys)
            + " |"
        )
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
