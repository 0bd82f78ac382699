"""TCP mode: a plain byte relay from each accepted connection to a backend.

The job 6tunnel does: HTTPS passthrough, SSH or anything else. The backend is reached
through the same connector (egress policy, attempts) as every other mode, optionally
preceded by a PROXY protocol header carrying the client's real address, and each
connection ends with one access record (client, backend and family, bytes each way,
duration).
"""

from __future__ import annotations

import asyncio
import logging
import time

from kushi.accesslog import AccessRecord
from kushi.backends import FailOver, proxy_header
from kushi.errors import KushiError
from kushi.netio import Conn
from kushi.routing import ClientInfo
from kushi.runtime import ListenerState, Services

log = logging.getLogger("kushi.tcp")


async def serve_tcp(
    services: Services, state: ListenerState, client: Conn, info: ClientInfo, listener: str
) -> None:
    started = time.time()
    record = AccessRecord(
        time=started, listener=listener, mode="tcp", client=info.address, method="TCP"
    )
    try:
        egress = state.egress(info.address)
        failover = FailOver(state.backends)
        while True:
            backend = failover.next()  # raises the last failure when none is left
            record.target = str(backend)
            try:
                upstream = await services.connector.connect(
                    backend.host, backend.port, egress.policy, source=egress.source
                )
            except KushiError as exc:
                if failover.failed(exc):
                    continue
                raise
            failover.connected()
            break
        record.upstream = upstream.next_hop
        record.family = upstream.family
        record.source = upstream.source
        record.attempts = [a.describe() for a in upstream.fallbacks]
        record.notes = upstream.report_notes
        record.connect_ms = round(upstream.connect_time * 1000, 3)
        preamble = proxy_header(state.cfg.backend_proxy_protocol, info)
        if preamble:
            upstream.conn.write(preamble)
        record.status = 200
        try:
            record.bytes_in, record.bytes_out = await services.relay(client, upstream.conn, record)
        except asyncio.CancelledError:
            # Shutdown's grace ran out: log the bytes that really passed, as aborted.
            record.error, record.aborted = "shutdown", True
            record.bytes_in = client.bytes_in
            record.bytes_out = client.bytes_out - client.write_buffer_size()
            raise
        upstream.conn.close()
    except KushiError as exc:
        record.status = exc.status
        record.error = exc.error_type
        record.details = exc.details
        record.attempts = record.attempts or list(exc.attempts)
        client.abort()
    finally:
        record.duration = time.time() - started
        services.record(state, record)
