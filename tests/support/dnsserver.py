"""A small authoritative DNS server for tests, on real UDP and TCP sockets.

Built on dnspython's message API (``dns.message.from_wire`` / ``make_response``), so every
answer is a real DNS message. Records live in a zone (a dict, or a JSON file read again
whenever it changes) of this shape::

    {"v6slow.test": {"AAAA": ["2001:db8::5"], "A": ["203.0.113.5"], "ttl": 30,
                     "delay": {"AAAA": 3.0}, "drop": ["A"]},
     "gone.test": {"rcode": "SERVFAIL"},
     "*": {"drop": ["AAAA", "A"]}}            # optional: every other name

A name that is not in the zone (and no ``"*"``) gets NXDOMAIN; a known name without records
of the asked type gets NOERROR with no answer (NODATA). Negative answers carry an SOA whose
minimum is ``negative_ttl`` (the zone's top-level ``"$negative_ttl"``, default 5 s).
``delay`` holds an answer for that many seconds, ``drop`` never answers, ``rcode`` answers
every query of the name with that RCODE. ``"$down": true`` drops every query.

Used in-process (``DNSServer(...).start_thread()``) by unit tests and as a program
(``python -m support.dnsserver --listen [::1]:53 --zone zone.json``) inside network
namespaces by end-to-end tests. Every query is appended to ``queries`` (and, as a program,
to ``--log``) as ``NAME TYPE``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import dns.rrset

Zone = dict[str, Any]


class DNSServer:
    def __init__(
        self, host: str, port: int = 0, zone: Zone | None = None, zone_file: str | None = None
    ) -> None:
        self.host = host
        self.port = port
        self.zone: Zone = zone if zone is not None else {}
        self.zone_file = zone_file
        self._stamp: float | None = None
        self.queries: list[str] = []
        self.log_file: str | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop: asyncio.Event | None = None

    # -- zone ----------------------------------------------------------------------------

    def _current(self) -> Zone:
        if self.zone_file:
            with contextlib.suppress(OSError, ValueError):
                stamp = os.stat(self.zone_file).st_mtime_ns
                if stamp != self._stamp:
                    self.zone = json.loads(Path(self.zone_file).read_text())
                    self._stamp = stamp
        return self.zone

    def answer(self, wire: bytes) -> tuple[float | None, bytes | None]:
        """(delay, response) for one query; a delay of None means: never answer."""
        try:
            query = dns.message.from_wire(wire)
        except Exception:  # noqa: BLE001 - garbage: no answer
            return None, None
        zone = self._current()
        if not query.question:
            return None, None
        question = query.question[0]
        name = question.name.to_text(omit_final_dot=True).lower()
        rdtype = dns.rdatatype.to_text(question.rdtype)
        self.queries.append(f"{name} {rdtype}")
        if self.log_file:
            with open(self.log_file, "a") as f:
                f.write(f"{time.time():.3f} {name} {rdtype}\n")
        if zone.get("$down"):
            return None, None
        entry = zone.get(name, zone.get("*"))
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        negative_ttl = int(zone.get("$negative_ttl", 5))
        if entry is None:
            response.set_rcode(dns.rcode.NXDOMAIN)
            self._soa(response, negative_ttl)
            return 0.0, response.to_wire()
        if rdtype in entry.get("drop", ()):
            return None, None
        delay = float(entry.get("delay", {}).get(rdtype, 0.0))
        if "rcode" in entry:
            response.set_rcode(dns.rcode.from_text(entry["rcode"]))
            return delay, response.to_wire()
        values = entry.get(rdtype, [])
        if values:
            rrset = dns.rrset.from_text_list(
                question.name, int(entry.get("ttl", 30)), "IN", rdtype, values
            )
            response.answer.append(rrset)
        else:
            self._soa(response, negative_ttl)
        return delay, response.to_wire()

    @staticmethod
    def _soa(response: dns.message.Message, ttl: int) -> None:
        response.authority.append(
            dns.rrset.from_text(
                "test.", ttl, "IN", "SOA", f"ns.test. admin.test. 1 3600 600 86400 {ttl}"
            )
        )

    # -- sockets -------------------------------------------------------------------------

    async def serve(self, ready: Callable[[], None] | None = None) -> None:
        loop = asyncio.get_running_loop()
        self.loop = loop
        self._stop = asyncio.Event()
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        tcp_sock, udp = self._bind(family)
        server = self

        class Udp(asyncio.DatagramProtocol):
            transport: Any = None

            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                self.transport = transport

            def datagram_received(self, data: bytes, addr: Any) -> None:
                delay, reply = server.answer(data)
                if reply is None or delay is None:
                    return
                loop.call_later(delay, self.transport.sendto, reply, addr)

        transport, _ = await loop.create_datagram_endpoint(Udp, sock=udp)

        async def tcp(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            with contextlib.suppress(Exception):
                while True:
                    size = int.from_bytes(await reader.readexactly(2), "big")
                    delay, reply = server.answer(await reader.readexactly(size))
                    if reply is None or delay is None:
                        continue
                    await asyncio.sleep(delay)
                    writer.write(len(reply).to_bytes(2, "big") + reply)
                    await writer.drain()
            writer.close()

        tcp_server = await asyncio.start_server(tcp, sock=tcp_sock)
        if ready is not None:
            ready()
        try:
            await self._stop.wait()
        finally:
            transport.close()
            tcp_server.close()

    def _bind(self, family: int) -> tuple[socket.socket, socket.socket]:
        """A TCP and a UDP socket on one port (``self.port``, or a free one for 0)."""
        for _ in range(50):
            tcp_sock = socket.socket(family, socket.SOCK_STREAM)
            tcp_sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            udp = socket.socket(family, socket.SOCK_DGRAM)
            try:
                tcp_sock.bind((self.host, self.port))
                udp.bind((self.host, tcp_sock.getsockname()[1]))
            except OSError:
                tcp_sock.close()
                udp.close()
                if self.port:
                    raise
                continue
            tcp_sock.listen(16)
            self.port = tcp_sock.getsockname()[1]
            return tcp_sock, udp
        raise OSError("no free port for the test DNS server")

    def start_thread(self) -> DNSServer:
        started = threading.Event()
        self._thread = threading.Thread(
            target=lambda: asyncio.run(self.serve(started.set)), daemon=True
        )
        self._thread.start()
        if not started.wait(10):
            raise RuntimeError("test DNS server did not start")
        return self

    def stop(self) -> None:
        if self.loop is not None and self._stop is not None:
            self.loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(5)

    def __enter__(self) -> DNSServer:
        return self.start_thread()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", required=True, help="HOST:PORT or [IPv6]:PORT")
    parser.add_argument("--zone", required=True, help="JSON zone file, read on every change")
    parser.add_argument("--log", help="append every query here")
    args = parser.parse_args()
    host, _, port = args.listen.rpartition(":")
    server = DNSServer(host.strip("[]"), int(port), zone_file=args.zone)
    server.log_file = args.log
    asyncio.run(server.serve(lambda: print("ready", flush=True)))


if __name__ == "__main__":
    main()
