"""Reverse and TCP listeners on loopback (issue 3): the config forms and the CLI quick forms.

Clients (curl) reach kushi on ``[::1]``; kushi reaches origins (``support/origin.py``) on
``127.0.0.1`` -- the IPv6 -> IPv4 direction of reverse and TCP modes, without namespaces.
The end-to-end proof with an IPv6-only client and IPv4-only backends is in
``tests/e2e/test_reverse_tcp.py``.
"""

from __future__ import annotations

import shutil
import subprocess
import tomllib
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from support.kushi_proc import Kushi, free_port, run_kushi, write_toml
from support.origin import ONE_K, OriginProcess

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "reverse.toml"

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed"),
]

KushiFactory = Callable[[Sequence[str]], Kushi]
OriginFactory = Callable[..., OriginProcess]


@pytest.fixture
def kushi_factory(tmp_path: Path) -> Iterator[KushiFactory]:
    started: list[Kushi] = []

    def factory(argv: Sequence[str]) -> Kushi:
        with warnings.catch_warnings():  # Popen gets open() files that Kushi never closes
            warnings.simplefilter("ignore", ResourceWarning)
            kushi = Kushi(list(argv), tmp_path, loopback_destinations=False)
        started.append(kushi)
        kushi.wait_ready()
        return kushi

    yield factory
    codes = [k.stop() for k in started]
    assert codes == [0] * len(codes), [k.stderr[-2000:] for k in started]


def curl(*args: str) -> tuple[int, dict[str, str], bytes]:
    """Status, headers (lower-case names) and body of one request with curl."""
    noproxy = [] if "-x" in args else ["--noproxy", "*"]
    proc = subprocess.run(
        ["curl", "-sS", "-i", *noproxy, "--max-time", "20", *args],
        capture_output=True,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr.decode()
    head, _, body = proc.stdout.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(lines[0].split()[1]), headers, body


def header(request: dict[str, Any], name: str) -> list[str]:
    return [v for k, v in request["headers"] if k.lower() == name.lower()]


def test_one_process_serves_forward_reverse_and_tcp_listeners(
    kushi_factory: KushiFactory, origin_factory: OriginFactory, tmp_path: Path
) -> None:
    """One kushi, one TOML with a forward, a reverse and a tcp ``[[listener]]``: each answers
    in its own mode, and the shared JSON access log says which listener and mode."""
    origin = origin_factory(["[::1]:0", "127.0.0.1:0"])
    o = origin.port
    fwd, rev, tcp = free_port("127.0.0.1"), free_port("::1"), free_port("::1")
    path = tmp_path / "three.toml"
    write_toml(
        path,
        {"access_log_format": "json"},
        [
            {
                "name": "fwd",
                "mode": "forward",
                "listen": [f"127.0.0.1:{fwd}"],
                "allow_destinations": ["::1/128"],
            },
            {
                "name": "rev",
                "mode": "reverse",
                "listen": [f"[::1]:{rev}"],
                "backend": [f"http://127.0.0.1:{o}"],
            },
            {
                "name": "tcp",
                "mode": "tcp",
                "listen": [f"[::1]:{tcp}"],
                "backend": [f"127.0.0.1:{o}"],
            },
        ],
    )
    kushi = kushi_factory(["serve", "--config", str(path)])

    # forward: an IPv4 client, an absolute URL, IPv6 egress
    status, headers, _ = curl("-x", f"http://127.0.0.1:{fwd}", f"http://[::1]:{o}/headers?via=fwd")
    assert status == 200 and "ipv6" in headers["proxy-status"]
    # reverse: an IPv6 client, an origin-form request, IPv4 backend, X-Forwarded-For
    status, headers, _ = curl(f"http://[::1]:{rev}/headers?via=rev")
    assert status == 200 and f'next-hop="127.0.0.1:{o}"' in headers["proxy-status"]
    # tcp: the same HTTP bytes relayed untouched
    status, headers, _ = curl(f"http://[::1]:{tcp}/headers?via=tcp")
    assert status == 200 and "proxy-status" not in headers and "via" not in headers

    by_target = {r["target"].rsplit("=", 1)[1]: r for r in origin.wait_requests(3)}
    assert by_target["fwd"]["family"] == "ipv6" and by_target["fwd"]["client"] == "::1"
    assert header(by_target["fwd"], "X-Forwarded-For") == []
    assert by_target["rev"]["family"] == "ipv4"
    assert header(by_target["rev"], "X-Forwarded-For") == ["::1"]
    assert header(by_target["rev"], "Host") == [f"[::1]:{rev}"]
    assert by_target["tcp"]["family"] == "ipv4"
    assert header(by_target["tcp"], "X-Forwarded-For") == [] and not header(by_target["tcp"], "Via")
    assert header(by_target["tcp"], "Host") == [f"[::1]:{tcp}"]

    recs = kushi.wait_records(3)
    modes = {r["listener"]: (r["mode"], r["client"], r["family"]) for r in recs}
    assert modes == {
        "fwd": ("forward", "127.0.0.1", "ipv6"),
        "rev": ("reverse", "::1", "ipv4"),
        "tcp": ("tcp", "::1", "ipv4"),
    }


def test_cli_reverse_quick_form(kushi_factory: KushiFactory, origin_factory: OriginFactory) -> None:
    """``kushi reverse --listen [::1]:P --backend http://127.0.0.1:B`` needs nothing else."""
    origin = origin_factory(["127.0.0.1:0"])
    port = free_port("::1")
    kushi = kushi_factory(
        ["reverse", "--listen", f"[::1]:{port}", "--backend", f"http://127.0.0.1:{origin.port}"]
        + ["--access-log-format", "json"]
    )
    status, headers, body = curl(f"http://[::1]:{port}/1k")
    assert status == 200 and body == ONE_K
    assert f'next-hop="127.0.0.1:{origin.port}"' in headers["proxy-status"]
    (req,) = origin.wait_requests(1)
    assert req["family"] == "ipv4" and header(req, "X-Forwarded-For") == ["::1"]
    (rec,) = kushi.wait_records(1)
    assert (rec["mode"], rec["status"], rec["client"], rec["family"]) == (
        "reverse",
        200,
        "::1",
        "ipv4",
    )
    # A reverse listener is not a forward proxy.
    status, _, _ = curl("-x", f"http://[::1]:{port}", f"http://127.0.0.1:{origin.port}/1k")
    assert status == 403
    assert len(origin.requests()) == 1


def test_readme_reverse_and_tcp_examples_on_the_same_port(
    kushi_factory: KushiFactory, origin_factory: OriginFactory
) -> None:
    """The README's ``kushi reverse --listen [::]:8080 --backend http://127.0.0.1:8080``:
    an IPv6-only ``[::]`` listener does not cover 127.0.0.1 on its port, so the backend on
    the same port number is not a loop (it was answered 502 proxy_loop_detected). The tcp
    example likewise; a backend that really is kushi's own address stays a loop."""
    origin = origin_factory(["127.0.0.1:0"])
    port = origin.port
    kushi_factory(["reverse", "--listen", f"[::]:{port}", "--backend", f"http://127.0.0.1:{port}"])
    status, headers, body = curl(f"http://[::1]:{port}/1k")
    assert status == 200 and body == ONE_K, headers
    assert f'next-hop="127.0.0.1:{port}"' in headers["proxy-status"]

    # kushi tcp --listen [::]:443 --backend 127.0.0.1:443 --backend-proxy-protocol 2
    tcp_origin = origin_factory(["127.0.0.1:0"], proxy_protocol=True)
    tport = tcp_origin.port
    kushi_factory(
        ["tcp", "--listen", f"[::]:{tport}", "--backend", f"127.0.0.1:{tport}"]
        + ["--backend-proxy-protocol", "2"]
    )
    status, _, body = curl(f"http://[::1]:{tport}/1k")
    assert status == 200 and body == ONE_K
    (req,) = tcp_origin.wait_requests(1)
    assert req["proxy_protocol"]["version"] == 2 and req["proxy_protocol"]["src"] == "::1"

    # 0.0.0.0 covers 127.0.0.1: that backend is kushi itself.
    loop_port = free_port("127.0.0.1")
    kushi_factory(
        ["reverse", "--listen", f"0.0.0.0:{loop_port}"]
        + ["--backend", f"http://127.0.0.1:{loop_port}", "--allow", "127.0.0.0/8"]
    )
    status, headers, _ = curl(f"http://127.0.0.1:{loop_port}/1k")
    assert status == 502 and "proxy_loop_detected" in headers["proxy-status"]


def test_cli_tcp_quick_form(kushi_factory: KushiFactory, origin_factory: OriginFactory) -> None:
    """``kushi tcp --listen [::1]:P --backend 127.0.0.1:B`` relays bytes and logs one record
    per connection."""
    origin = origin_factory(["127.0.0.1:0"])
    port = free_port("::1")
    kushi = kushi_factory(
        ["tcp", "--listen", f"[::1]:{port}", "--backend", f"127.0.0.1:{origin.port}"]
        + ["--access-log-format", "json"]
    )
    status, headers, body = curl(f"http://[::1]:{port}/1k")
    assert status == 200 and body == ONE_K and "proxy-status" not in headers
    (req,) = origin.wait_requests(1)
    assert req["family"] == "ipv4" and header(req, "X-Forwarded-For") == []
    (rec,) = kushi.wait_records(1)
    assert rec["mode"] == "tcp" and rec["client"] == "::1" and rec["family"] == "ipv4"
    assert rec["upstream"] == f"127.0.0.1:{origin.port}"
    assert rec["bytes_in"] > 0 and rec["bytes_out"] > len(ONE_K)


def test_cli_reverse_and_tcp_need_a_backend() -> None:
    for mode in ("reverse", "tcp"):
        proc = run_kushi([mode, "--listen", "[::1]:1"])
        assert proc.returncode == 2 and "--backend" in proc.stderr, proc.stderr
    proc = run_kushi(["reverse", "--listen", "[::1]:1", "--backend", "https://127.0.0.1:1"])
    assert proc.returncode == 2 and "backend" in proc.stderr, proc.stderr


def test_example_reverse_toml_checks_and_runs(
    kushi_factory: KushiFactory, origin_factory: OriginFactory, tls_ca: Any, tmp_path: Path
) -> None:
    """``examples/reverse.toml`` is valid, and runs as shipped once its addresses point at
    loopback: round-robin over its two web backends, TLS passthrough on its tcp listener."""
    proc = run_kushi(["config", "check", str(EXAMPLE)])
    assert proc.returncode == 0, proc.stderr
    assert "web (reverse)" in proc.stdout and "https (tcp)" in proc.stdout

    web1 = origin_factory(["127.0.0.1:0"], name="web1")
    web2 = origin_factory(["127.0.0.1:0"], name="web2")
    tls = origin_factory(["127.0.0.1:0"], name="tls", tls=tls_ca)
    data = tomllib.loads(EXAMPLE.read_text())
    web, https = data.pop("listener")
    assert (web["mode"], len(web["backend"]), https["mode"]) == ("reverse", 2, "tcp")
    web_port, tls_port = free_port("::1"), free_port("::1")
    web.update(
        listen=[f"[::1]:{web_port}"],
        backend=[f"http://127.0.0.1:{web1.port}", f"http://127.0.0.1:{web2.port}"],
    )
    https.update(listen=[f"[::1]:{tls_port}"], backend=[f"127.0.0.1:{tls.port}"])
    path = tmp_path / "reverse.toml"
    write_toml(path, data, [web, https])
    kushi = kushi_factory(["serve", "--config", str(path)])

    names = [curl(f"http://[::1]:{web_port}/1k")[1]["x-origin-name"] for _ in range(4)]
    assert sorted(names) == ["web1", "web1", "web2", "web2"] and names[0] != names[1]
    status, _, body = curl("--cacert", str(tls_ca.ca_pem), f"https://[::1]:{tls_port}/1k")
    assert status == 200 and body == ONE_K
    assert tls.wait_requests(1)[0]["tls"] is True
    recs = kushi.wait_records(5)
    assert sorted(r["listener"] for r in recs) == ["https"] + ["web"] * 4
    assert {r["family"] for r in recs} == {"ipv4"}
