"""The SOCKS5 shell: executes ``socks5.ServerHandshake`` on one client connection.

A SOCKS listener (``mode = "socks"``) and a forward listener whose client's first byte is
0x05 both end up here. The handshake must be complete within ``timeouts.header_read``.
The client is admitted as an HTTP client would be (the allow list and, per
``auth_combine``, the htpasswd file through RFC 1929), the CONNECT port is checked against
``connect_ports``, and every connection goes out through ``services.connector`` (egress
policy, Happy Eyeballs, destination policy): each refusal is answered with its RFC 1928
reply code before kushi contacts the destination. A tunnel is relayed by
``services.relay``; each session ends with one access record (``SOCKS5-CONNECT``,
``SOCKS5-UDP``, or ``SOCKS5`` when it ended before its request).

UDP ASSOCIATE (RFC 1928 section 7): kushi opens a relay socket on the address the client
reached it on and answers with it. Datagrams are accepted from the client's own address
only (and from one port: the one the request named, else the first one used); each one's
destination goes through the same egress order and destination policy as a CONNECT
(``Connector.datagram_target``). Answers are relayed back only from the addresses the
client sent to. The association ends when its TCP connection does, or after
``timeouts.tunnel_idle`` without a datagram. Its outgoing socket of each family is bound
to the listener's (or the user's) source address of that family, chosen once per
association (so ``source_rotation = connection`` gives each association its own).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import time
from collections.abc import Callable

from kushi.accesslog import AccessRecord
from kushi.acl import client_address, client_key
from kushi.connector import datagram_socket
from kushi.errors import (
    AuthRateLimited,
    ConnectionLost,
    KushiError,
    ProxyAuthRequired,
    RequestDenied,
    RequestTimeout,
    SocksRequestError,
)
from kushi.netio import Conn, fmt_addr
from kushi.resolver import IPAddress, ip_literal
from kushi.routing import ClientInfo
from kushi.runtime import ListenerState, Services
from kushi.socks5 import (
    Command,
    Credentials,
    Method,
    MethodSelected,
    Reply,
    Requested,
    ServerHandshake,
    build_reply,
    build_udp,
    parse_udp,
    reply_for,
)

log = logging.getLogger("kushi.socks")
#: Datagrams waiting for their destination to be resolved; more are dropped.
UDP_QUEUE = 256


class SocksSession:
    def __init__(
        self,
        services: Services,
        listener: str,
        get_state: Callable[[], ListenerState],
        client: Conn,
        info: ClientInfo,
    ) -> None:
        self.services = services
        self.state = get_state()
        self.client = client
        self.info = info
        self.record = AccessRecord(
            time=time.time(),
            listener=listener,
            mode=self.state.cfg.mode,
            client=info.address,
            method="SOCKS5",
            tls=info.tls,
        )
        #: Whether a failure may still be answered with a reply (RFC 1928 section 6):
        #: only once the method negotiation (and RFC 1929) succeeded.
        self.may_reply = False

    def __repr__(self) -> str:
        return f"<SocksSession {self.info.address} {self.record.method} {self.record.target}>"

    async def run(self) -> None:
        record = self.record
        udp: UdpAssociation | None = None
        self.state.hold()  # the session keeps the snapshot it started with (reload)
        try:
            request = await self.handshake()
            if request is None:
                return  # closed before its first byte: nothing to answer or log
            record.target = request.target
            if request.command == Command.CONNECT:
                await self.connect(request)
            else:
                udp = UdpAssociation(self, request)
                await udp.run()
        except ConnectionLost:
            record.error = record.error or "client_closed"
        except KushiError as exc:
            await self.fail(exc)
        finally:
            if udp is not None:
                udp.close()
            else:
                record.bytes_in = self.client.bytes_in - len(self.client.buf)
                record.bytes_out = self.client.bytes_out
            if record.method != "SOCKS5" or record.error:
                record.duration = time.time() - record.time
                self.services.record(self.state, record)
            self.state.release()

    # --- the handshake ---------------------------------------------------------------------

    async def handshake(self) -> Requested | None:
        state = self.state
        need = state.admission(state.allow.allows(client_address(self.info.address)))
        # A client kushi will refuse anyway is not asked for a password: its request is
        # answered "not allowed by ruleset" (0x02).
        offer = (Method.USERPASS,) if need == "password" else (Method.NO_AUTH,)
        machine = ServerHandshake(offer=offer)
        client = self.client
        deadline = client.loop.time() + self.services.config.timeouts.header_read
        while True:
            try:
                event = machine.next_event(client.buf)
            finally:
                self.may_reply = machine.state in ("request", "done")
            if event is None:
                try:
                    more = await client.fill(deadline=deadline)
                except TimeoutError:
                    raise RequestTimeout(
                        f"SOCKS5 handshake not complete within "
                        f"{self.services.config.timeouts.header_read:g} s"
                    ) from None
                if not more:
                    exc = machine.eof(client.buf)
                    if exc is None:
                        return None
                    raise exc
            elif isinstance(event, MethodSelected):
                await self.send(event.data)
                if event.method == Method.NO_ACCEPTABLE:
                    raise ProxyAuthRequired(
                        "no acceptable SOCKS5 authentication method offered "
                        "(this listener needs username/password, RFC 1929)"
                    )
            elif isinstance(event, Credentials):
                try:
                    user = await self._verify(event)
                except AuthRateLimited:
                    # Refused without a bcrypt check: a failure status, then closed.
                    await self.send(machine.auth_result(False))
                    raise
                await self.send(machine.auth_result(user is not None))
                if user is None:
                    raise ProxyAuthRequired(
                        f"SOCKS5 username/password rejected for user {event.username!r}"
                    )
                self.record.user = user
            else:
                self.may_reply = True
                if need == "deny":
                    self.record.target = event.target
                    raise RequestDenied(
                        f"client {self.info.address} is not in this listener's allow list"
                    )
                return event

    async def _verify(self, creds: Credentials) -> str | None:
        auth = self.state.auth
        if auth is None:
            return None
        return await auth.verify(creds.username, creds.password, client_key(self.info.address))

    async def send(self, data: bytes) -> None:
        """Write to the client; ``ConnectionLost`` when it is gone."""
        self.client.write(data)
        await self.client.drain()

    async def fail(self, exc: KushiError) -> None:
        record = self.record
        record.status = exc.status
        record.error = exc.error_type
        record.details = exc.details
        record.attempts = record.attempts or list(exc.attempts)
        if self.may_reply and not self.client.closed:
            with contextlib.suppress(ConnectionLost):
                await self.send(build_reply(reply_for(exc)))
        if isinstance(exc, SocksRequestError | ProxyAuthRequired | RequestTimeout):
            log.debug("SOCKS5 client %s: %s", self.info.address, exc.details)
        # RFC 1928 section 6: on a failure the server terminates the TCP connection.
        self.client.write_eof()
        self.client.close()

    # --- CONNECT ---------------------------------------------------------------------------

    async def connect(self, request: Requested) -> None:
        state, record = self.state, self.record
        record.method = "SOCKS5-CONNECT"
        upstream = await self.services.open_tunnel(
            state, request.host, request.port, record, "SOCKS5 CONNECT"
        )
        bound = upstream.conn.local
        try:
            await self.send(build_reply(Reply.SUCCEEDED, bound[0], bound[1]))
        except ConnectionLost:
            upstream.conn.abort()
            raise
        record.status = 200
        await self.services.relay(self.client, upstream.conn, record)
        upstream.conn.close()


class _Endpoint(asyncio.DatagramProtocol):
    def __init__(self, on_datagram: Callable[[bytes, tuple[str, int]], None]) -> None:
        self.on_datagram = on_datagram

    def datagram_received(self, data: bytes, addr: tuple[str | object, int]) -> None:
        self.on_datagram(data, (str(addr[0]), int(addr[1])))

    def error_received(self, exc: Exception) -> None:
        log.debug("SOCKS5 UDP relay: %s", exc)


class UdpAssociation:
    """One UDP ASSOCIATE: a relay socket for the client, one per family for the far side."""

    def __init__(self, session: SocksSession, request: Requested) -> None:
        self.session = session
        self.record = session.record
        self.client_ip = client_address(session.info.address)
        declared = ip_literal(request.host)
        # The port the request named is the one datagrams come from, when it names the
        # client's own address (or none); a client behind NAT cannot know either.
        self.client_port: int | None = None
        if request.port and (
            declared is None or declared.is_unspecified or declared == self.client_ip
        ):
            self.client_port = request.port
        self.client_addr: tuple[str, int] | None = None
        self.queue: asyncio.Queue[bytes] = asyncio.Queue(UDP_QUEUE)
        self.relay: asyncio.DatagramTransport | None = None
        self.outgoing: dict[int, asyncio.DatagramTransport] = {}
        self.peers: set[tuple[IPAddress, int]] = set()
        self.dropped = 0
        self.last_drop = ""
        self.last_activity = 0.0
        self.worker: asyncio.Task[None] | None = None
        self.egress = session.state.egress(session.info.address, session.record.user)
        self.sources: dict[int, str] = {}

    async def run(self) -> None:
        session, record = self.session, self.record
        record.method = "SOCKS5-UDP"
        client = session.client
        loop = client.loop
        local = client.local[0]
        try:
            transport, _ = await loop.create_datagram_endpoint(
                lambda: _Endpoint(self.from_client),
                local_addr=(local, 0),
                family=socket.AF_INET6 if ":" in local else socket.AF_INET,
            )
        except OSError as exc:  # (out of descriptors or ports: answered 0x01)
            raise KushiError(f"cannot open a UDP relay socket: {exc.strerror or exc}") from None
        self.relay = transport
        bound = transport.get_extra_info("sockname")
        await session.send(build_reply(Reply.SUCCEEDED, str(bound[0]), int(bound[1])))
        record.status = 200
        self.worker = asyncio.ensure_future(self.forward())
        idle = session.services.config.timeouts.tunnel_idle
        self.last_activity = loop.time()
        # RFC 1928 section 7: the association ends when its TCP connection does.
        while True:
            client.buf.clear()  # nothing more is defined on the TCP connection
            try:
                if not await client.fill(deadline=self.last_activity + idle):
                    break
            except TimeoutError:
                if loop.time() >= self.last_activity + idle:
                    break

    def close(self) -> None:
        if self.worker is not None:
            self.worker.cancel()
        for transport in (self.relay, *self.outgoing.values()):
            if transport is not None:
                transport.close()
        if self.dropped:
            note = f"{self.dropped} datagrams dropped (last: {self.last_drop})"
            self.record.details = "; ".join(x for x in (self.record.details, note) if x)

    def drop(self, why: str) -> None:
        self.dropped += 1
        self.last_drop = why

    # --- client -> destination -----------------------------------------------------------

    def from_client(self, data: bytes, addr: tuple[str, int]) -> None:
        source = client_address(addr[0])
        if source is None or source != self.client_ip:
            self.drop(f"datagram from {addr[0]}, not from the client")
            return
        if self.client_port is not None and addr[1] != self.client_port:
            self.drop(f"datagram from port {addr[1]}, not the client's {self.client_port}")
            return
        self.client_port = addr[1]
        self.client_addr = addr
        try:
            self.queue.put_nowait(data)
        except asyncio.QueueFull:
            self.drop("too many datagrams waiting")

    async def forward(self) -> None:
        session, record = self.session, self.record
        state = session.state
        connector = session.services.connector
        while True:
            packet = await self.queue.get()
            try:
                datagram = parse_udp(packet)
                if datagram is None:
                    self.drop("a fragment (FRAG != 0; kushi does not reassemble)")
                    continue
                addr, family = await connector.datagram_target(
                    datagram.host, datagram.port, self.egress.policy, state.destinations
                )
            except KushiError as exc:
                self.drop(f"{exc.error_type}: {exc.details}")
                continue
            transport = await self._outgoing(addr)
            transport.sendto(datagram.data, (str(addr), datagram.port))
            self.peers.add((addr, datagram.port))
            self.last_activity = session.client.loop.time()
            record.datagrams_in += 1
            record.bytes_in += len(datagram.data)
            if not record.upstream:
                record.target = fmt_addr(datagram.host, datagram.port)
                record.upstream = fmt_addr(str(addr), datagram.port)
                record.family = family
                record.source = self.sources.get(addr.version, "")

    async def _outgoing(self, addr: IPAddress) -> asyncio.DatagramTransport:
        """One socket per IP version (NAT64 addresses are IPv6 too), opened on first use."""
        transport = self.outgoing.get(addr.version)
        if transport is None:
            loop = self.session.client.loop
            v6 = addr.version == 6
            # (An IPv4-mapped destination goes through a dual-stack socket, unbound.)
            mapped = isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None
            sock = None if mapped else datagram_socket(addr.version, self.egress.source)
            if sock is not None:
                transport, _ = await loop.create_datagram_endpoint(
                    lambda: _Endpoint(self.from_remote), sock=sock
                )
                self.sources[addr.version] = str(transport.get_extra_info("sockname")[0])
            else:
                transport, _ = await loop.create_datagram_endpoint(
                    lambda: _Endpoint(self.from_remote),
                    local_addr=("::" if v6 else "0.0.0.0", 0),
                    family=socket.AF_INET6 if v6 else socket.AF_INET,
                )
            self.outgoing[addr.version] = transport
        return transport

    # --- destination -> client -----------------------------------------------------------

    def from_remote(self, data: bytes, addr: tuple[str, int]) -> None:
        source = client_address(addr[0])
        if source is None or (source, addr[1]) not in self.peers:
            self.drop(f"datagram from {fmt_addr(addr[0], addr[1])}, which the client never sent to")
            return
        if self.relay is None or self.client_addr is None:
            return
        self.relay.sendto(build_udp(str(source), addr[1], data), self.client_addr)
        self.last_activity = self.session.client.loop.time()
        self.record.datagrams_out += 1
        self.record.bytes_out += len(data)


async def serve_socks(
    services: Services,
    listener: str,
    get_state: Callable[[], ListenerState],
    client: Conn,
    info: ClientInfo,
) -> None:
    await SocksSession(services, listener, get_state, client, info).run()
