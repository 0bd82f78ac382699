"""Faults on either side of kushi, and what is left of kushi afterwards.

Covered in test_hardening.py: an upstream that resets before the response head, one that
never answers, malformed and truncated responses. Here:

- the upstream resets in the middle of a Content-Length body: the client's transfer is cut
  (never completed as if valid) and kushi logs ``http_response_incomplete``;
- the upstream resets, or closes without answering, while the client is still uploading:
  502 ``connection_terminated``, and the body relay ends with the exchange;
- the upstream resets (or closes) its keep-alive connection right after a complete
  response: that connection is not reused and the next request still works;
- a name that does not exist: 502 ``dns_error``;
- a client that leaves in the middle of an upload: kushi closes the upstream connection
  (the origin sees a truncated body) and its open file descriptors return to the baseline;
- a client that leaves after 1 MiB of a 1 GiB download: kushi closes the upstream
  connection promptly and its file descriptors return to the baseline;
- a client that resets while kushi waits for the next piece of a slow body: logged as
  ``client_closed``, and that upstream connection is not reused;
- after all of that, kushi's stderr holds no traceback and no "Task exception was never
  retrieved", and it exits 0 on SIGTERM.

One kushi serves the whole module (the last test inspects what it wrote).
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from support.kushi_proc import Kushi, free_port, write_toml
from support.origin import OriginProcess, pattern_bytes, pattern_chunks
from support.procstat import fd_count, settled_fd_count, wait_for
from support.rawhttp import Client
from support.tcpserver import ThreadedServer, read_head

pytestmark = pytest.mark.timeout(60)

RST_LINGER = b"\x01\x00\x00\x00\x00\x00\x00\x00"  # struct linger {on, 0 s}: close sends RST


# --- helpers -----------------------------------------------------------------------------------


class FaultOrigin(ThreadedServer):
    """An origin on [::1] (one thread per connection, keep-alive) whose paths misbehave:

    - ``/half-rst/N``: Content-Length N, N/2 bytes of the body, then a reset;
    - ``/then-rst``, ``/then-fin``: a complete keep-alive ``200 ok``, then 0.2 s later a
      reset (or a plain close); ``after_response`` is set once that happened;
    - ``/upload-rst``: reads 256 KiB of the request body, then resets;
    - ``/close-mid-upload``: closes 0.1 s after the request head, without an answer;
    - ``/trickle/N``: Content-Length N, the body in 1 KiB pieces every 20 ms;
    - ``/ok``: a keep-alive ``200 ok``.
    """

    OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"

    def __init__(self) -> None:
        self.requests: list[tuple[int, bytes]] = []  # (connection number, path)
        self.after_response = threading.Event()
        super().__init__("::1", nodelay=True)

    def url(self, path: str) -> str:
        return f"http://[::1]:{self.port}{path}"

    def serve(self, conn: socket.socket, number: int) -> None:
        buf = path = b""
        try:
            while True:
                got = read_head(conn, buf)
                if got is None:
                    return
                head, buf = got
                path = head.split(b" ", 2)[1]
                self.requests.append((number, path))
                if path.startswith(b"/half-rst/"):
                    n = int(path.rsplit(b"/", 1)[1])
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % n)
                    conn.sendall(pattern_bytes(n // 2))
                    time.sleep(0.2)
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RST_LINGER)
                    return
                if path == b"/upload-rst":
                    got = len(buf)
                    while got < 256 * 1024:
                        got += len(conn.recv(65536))
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RST_LINGER)
                    return
                if path == b"/close-mid-upload":
                    time.sleep(0.1)
                    conn.shutdown(socket.SHUT_RDWR)
                    return
                if path.startswith(b"/trickle/"):
                    n = int(path.rsplit(b"/", 1)[1])
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % n)
                    for piece in pattern_chunks(n, 1024):
                        conn.sendall(piece)
                        time.sleep(0.02)
                    continue
                conn.sendall(self.OK)
                if path in (b"/then-rst", b"/then-fin"):
                    time.sleep(0.2)
                    if path == b"/then-rst":
                        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RST_LINGER)
                    else:
                        conn.shutdown(socket.SHUT_RDWR)
                    return
        except OSError:
            pass
        finally:
            conn.close()
            if path in (b"/then-rst", b"/then-fin"):
                self.after_response.set()


@pytest.fixture(scope="module")
def faults() -> Iterator[FaultOrigin]:
    origin = FaultOrigin()
    yield origin
    origin.close()


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Kushi, int]]:
    work = tmp_path_factory.mktemp("faults")
    port = free_port()
    write_toml(
        work / "kushi.toml",
        {"listen": [f"127.0.0.1:{port}"], "access_log_format": "json", "admin_listen": []},
    )
    kushi = Kushi(["serve", "--config", str(work / "kushi.toml")], work, [("127.0.0.1", port)])
    yield kushi, port
    kushi.stop()


def records_for(kushi: Kushi, target: str, timeout: float = 5.0) -> list[dict[str, object]]:
    deadline = time.monotonic() + timeout
    while True:
        found = [r for r in kushi.json_records() if r.get("target") == target]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.02)


# --- the upstream fails --------------------------------------------------------------------------


def test_upstream_reset_during_the_body_cuts_the_client_transfer(
    proxy: tuple[Kushi, int], faults: FaultOrigin
) -> None:
    kushi, port = proxy
    n = 1 << 20
    url = faults.url(f"/half-rst/{n}")
    with Client(port) as c:
        status, fields, body = c.get(url)
        assert status == 200 and fields["content-length"] == str(n)
        # The head had gone out: the transfer is cut short, never completed or padded.
        assert len(body) < n
        assert body == pattern_bytes(len(body))
        assert c.read_body(1) == b"", "kushi kept the client connection open"
    (record,) = records_for(kushi, url)
    assert record["error"] == "http_response_incomplete"


def test_upstream_reset_during_the_request_body_is_502(
    proxy: tuple[Kushi, int], faults: FaultOrigin
) -> None:
    kushi, port = proxy
    url = faults.url("/upload-rst")
    n = 16 << 20
    with Client(port) as c:
        c.sock.sendall(f"POST {url} HTTP/1.1\r\nHost: x\r\nContent-Length: {n}\r\n\r\n".encode())
        try:
            for piece in pattern_chunks(n):
                c.sock.sendall(piece)
        except OSError:
            pass  # kushi stopped reading the body and closed: expected
        answer = c.read_body(12)
    # When the answer outran the close, it is the 502; either way it is logged as one.
    assert answer in (b"", b"HTTP/1.1 502"), answer
    (record,) = records_for(kushi, url)
    assert record["status"] == 502 and record["error"] == "connection_terminated", record


def test_upstream_that_closes_while_the_client_is_still_uploading(
    proxy: tuple[Kushi, int], faults: FaultOrigin
) -> None:
    """The upstream gives up (no response) while the client pauses mid-body: 502, and the
    body relay ends with the exchange (no task left reading the client; the last test
    checks that nothing was left to report "Task exception was never retrieved")."""
    kushi, port = proxy
    url = faults.url("/close-mid-upload")
    with Client(port) as c:
        c.sock.sendall(
            f"POST {url} HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n".encode()
            + pattern_bytes(1024)
        )
        status, fields = c.read_head()
        assert status == 502
        assert "error=connection_terminated" in fields["proxy-status"]
        assert fields.get("connection") == "close"
    (record,) = records_for(kushi, url)
    assert record["error"] == "connection_terminated"


@pytest.mark.parametrize("how", ["rst", "fin"])
def test_upstream_that_drops_its_keep_alive_connection_after_the_response(
    proxy: tuple[Kushi, int], faults: FaultOrigin, how: str
) -> None:
    kushi, port = proxy
    faults.after_response.clear()
    with Client(port) as c:
        status, _, body = c.get(faults.url(f"/then-{how}"))
        assert status == 200 and body == b"ok"
        assert faults.after_response.wait(5)
        first_conn = faults.requests[-1][0]
        # The dead connection is not reused: the next request, on the same client
        # connection, goes out on a new upstream connection and succeeds.
        status, fields, body = c.get(faults.url(f"/ok?after-{how}"))
        assert status == 200 and body == b"ok", fields
        assert faults.requests[-1] == (faults.accepted, f"/ok?after-{how}".encode())
        assert faults.requests[-1][0] != first_conn
    (record,) = records_for(kushi, faults.url(f"/ok?after-{how}"))
    assert record["status"] == 200 and not record.get("error")


def test_name_that_does_not_exist_is_502_dns_error(proxy: tuple[Kushi, int]) -> None:
    kushi, port = proxy
    url = "http://nonexistent.invalid/"
    with Client(port) as c:
        status, fields, body = c.get(url)
    assert status == 502
    assert "error=dns_error" in fields["proxy-status"]
    assert b"nonexistent.invalid" in body
    (record,) = records_for(kushi, url)
    assert record["error"] == "dns_error"


# --- the client leaves ---------------------------------------------------------------------------


def test_client_that_leaves_mid_upload(
    proxy: tuple[Kushi, int], origin_factory: Callable[..., OriginProcess]
) -> None:
    kushi, port = proxy
    origin = origin_factory(("[::1]:0",))
    base = settled_fd_count(kushi.proc.pid)
    n = 8 << 20
    url = origin.url("/sha256?leaves-mid-upload")
    with Client(port) as c:
        c.sock.sendall(
            f"POST {url} HTTP/1.1\r\nHost: x\r\nContent-Length: {n}\r\n"
            "Content-Type: application/octet-stream\r\n\r\n".encode()
        )
        c.sock.sendall(pattern_bytes(n // 2))
    # kushi must not complete (or pad) the body: the origin sees its connection end early.
    wait_for(
        lambda: any(r["target"].endswith("leaves-mid-upload") for r in origin.requests()),
        5,
        "the origin to see the truncated upload",
    )
    (logged,) = [r for r in origin.requests() if r["target"].endswith("leaves-mid-upload")]
    assert logged["error"], logged
    assert logged["body_len"] <= n // 2
    wait_for(lambda: fd_count(kushi.proc.pid) <= base, 5, f"kushi's fds back to {base}")
    # Logged as what happened: the client left (the upstream did nothing wrong).
    (record,) = records_for(kushi, url)
    assert record["error"] == "client_closed", record


def test_client_that_leaves_mid_download(
    proxy: tuple[Kushi, int], origin_factory: Callable[..., OriginProcess]
) -> None:
    kushi, port = proxy
    origin = origin_factory(("[::1]:0",))
    base = settled_fd_count(kushi.proc.pid)
    n = 1 << 30
    url = origin.url(f"/bytes/{n}")
    with Client(port) as c:
        c.sock.sendall(f"GET {url} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        status, fields = c.read_head()
        assert status == 200 and fields["content-length"] == str(n)
        body = c.read_body(1 << 20)
        assert body == pattern_bytes(1 << 20)
        left_at = time.monotonic()
    # The origin's connection is closed (its next write fails) rather than kushi reading
    # the remaining gigabyte into the void.
    wait_for(
        lambda: any(e.get("event") == "client_gone" for e in origin.events()),
        5,
        "the origin to see its connection closed",
    )
    closed_after = time.monotonic() - left_at
    wait_for(lambda: fd_count(kushi.proc.pid) <= base, 5, f"kushi's fds back to {base}")
    (request,) = origin.requests()
    assert request["target"] == f"/bytes/{n}"
    (record,) = records_for(kushi, url)
    assert record["error"] == "client_closed"
    assert record["bytes_out"] < n // 4
    print(f"\nupstream closed {closed_after * 1000:.0f} ms after the client left a 1 GiB download")


def test_client_that_resets_mid_download_while_kushi_waits_for_the_upstream(
    proxy: tuple[Kushi, int], faults: FaultOrigin
) -> None:
    """The client's reset arrives while kushi waits for the next piece of a slow body: the
    next write to the client must end the exchange as ``client_closed``, not blow up as an
    internal error (uvloop raises RuntimeError when writing to a closed transport)."""
    kushi, port = proxy
    n = 1 << 20
    url = faults.url(f"/trickle/{n}")
    with Client(port) as c:
        c.sock.sendall(f"GET {url} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        status, _ = c.read_head()
        assert status == 200
        assert c.read_body(4096) == pattern_bytes(4096)
        c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RST_LINGER)
    (record,) = records_for(kushi, url)
    assert record["error"] == "client_closed", record
    assert "Traceback" not in kushi.stderr, kushi.stderr[-3000:]
    # kushi stays usable, and the slow upstream connection was not put back in the pool.
    with Client(port) as c:
        status, _, body = c.get(faults.url("/ok?after-trickle"))
        assert status == 200 and body == b"ok"
    (trickle_conn,) = [conn for conn, path in faults.requests if path == f"/trickle/{n}".encode()]
    assert faults.requests[-1] == (faults.accepted, b"/ok?after-trickle")
    assert faults.accepted != trickle_conn


def test_no_tracebacks_and_a_clean_exit_after_all_of_that(proxy: tuple[Kushi, int]) -> None:
    kushi, _ = proxy
    assert kushi.stop() == 0
    stderr = kushi.stderr
    for bad in ("Traceback", "exception was never retrieved", "Exception in callback"):
        assert bad not in stderr, stderr[-3000:]
    assert json.loads(kushi.log_lines()[-1])  # the access log is intact to its last line
