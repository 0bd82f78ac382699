"""kushi's own CPU per MiB a CONNECT tunnel carries, spliced and copied, side by side.

    .venv/bin/python -m bench.tunnel_cpu [--rounds 5] [--mib 512]

A Python server on [::1] sends ``--mib`` MiB down each tunnel and a Python client reads
it into memory (no file in the way, unlike the report's curl rows). Two kushi processes
run at once, one with ``splice = true`` and one with ``splice = false``, and the rounds
alternate between them. Printed: the medians of MB/s and of kushi's user + system CPU
time per MiB (from /proc/PID/stat), and the same download read directly from the server.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from bench.procs import free_port, port_open
from bench.servers import KUSHI

TICK = os.sysconf("SC_CLK_TCK")
BLOCK = os.urandom(1 << 20)


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def serve(server: socket.socket, mib: int) -> None:
    def one(conn: socket.socket) -> None:
        with conn:
            conn.recv(16)  # "go": the client is ready
            for _ in range(mib):
                conn.sendall(BLOCK)

    while True:
        conn, _ = server.accept()
        threading.Thread(target=one, args=(conn,), daemon=True).start()


def download(sock: socket.socket, leftover: bytes = b"") -> tuple[int, float]:
    began = time.monotonic()
    sock.sendall(b"go")
    got = len(leftover)
    buf = bytearray(1 << 20)
    while n := sock.recv_into(buf):
        got += n
    return got, time.monotonic() - began


def through(port: int, target: int) -> tuple[int, float]:
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(f"CONNECT [::1]:{target} HTTP/1.1\r\nHost: [::1]:{target}\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            head += sock.recv(4096)
        assert head.startswith(b"HTTP/1.1 200"), head
        return download(sock, head.partition(b"\r\n\r\n")[2])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--mib", type=int, default=512)
    args = parser.parse_args()
    server = socket.socket(socket.AF_INET6)
    server.bind(("::1", 0))
    server.listen(16)
    target = server.getsockname()[1]
    threading.Thread(target=serve, args=(server, args.mib), daemon=True).start()
    work = Path(tempfile.mkdtemp(prefix="kushi-tunnel-cpu-"))
    procs: dict[str, tuple[subprocess.Popen[bytes], int]] = {}
    try:
        for name, splice in (("spliced", "true"), ("copied", "false")):
            port = free_port()
            conf = work / f"{name}.toml"
            conf.write_text(
                f'listen = ["127.0.0.1:{port}"]\nconnect_ports = [{target}]\n'
                f'allow_destinations = ["::1/128"]\nsplice = {splice}\nworkers = 1\n'
                'admin_listen = []\nlog_level = "warning"\naccess_log = ""\n'
            )
            proc = subprocess.Popen([str(KUSHI), "serve", "--config", str(conf)])
            procs[name] = (proc, port)
        for _, port in procs.values():
            deadline = time.monotonic() + 10
            while not port_open("127.0.0.1", port):
                assert time.monotonic() < deadline, "kushi did not start"
                time.sleep(0.05)
        results: dict[str, list[tuple[float, float]]] = {"direct": [], **{n: [] for n in procs}}
        want = args.mib << 20
        for _ in range(args.rounds):
            with socket.create_connection(("::1", target)) as sock:
                got, took = download(sock)
            assert got == want
            results["direct"].append((got / took / 1e6, 0.0))
            for name, (proc, port) in procs.items():
                before = cpu_seconds(proc.pid)
                got, took = through(port, target)
                time.sleep(0.1)
                assert got == want, (name, got)
                cpu = (cpu_seconds(proc.pid) - before) / args.mib * 1e6
                results[name].append((got / took / 1e6, cpu))
        print(f"{args.mib} MiB per download, {args.rounds} rounds, medians")
        direct = statistics.median(r[0] for r in results["direct"])
        for name, rows in results.items():
            rate = statistics.median(r[0] for r in rows)
            line = f"{name:8s} {rate:8.0f} MB/s  {rate / direct:5.2f} of direct"
            if name != "direct":
                line += f"  kushi CPU {statistics.median(r[1] for r in rows):6.0f} us/MiB"
            print(line)
    finally:
        for proc, _ in procs.values():
            proc.terminate()
            proc.wait(10)


if __name__ == "__main__":
    main()
