"""TLS listeners (issue 11 item 6) end to end, in network namespaces.

Forward (the standard topology, ``tests/support/netns.py``): the ``client`` namespace has
IPv4 only (198.51.100.2), kushi runs dual-stack in ``proxy`` with two TLS forward listeners
on 198.51.100.1 (:3129 open to the client network, :3130 with a password), ``v6origin`` has
IPv6 only (2001:db8:1::6, HTTP on :80 and HTTPS on :443). Only the proxy resolves the
``.test`` names. The clients are curl (``-x https://`` with ``--proxy-cacert``) and headless
Chromium (``--proxy-server=https://`` and the PAC file's ``HTTPS`` entry), which trusts
exactly the proxy's key (``--ignore-certificate-errors-spki-list``, no blanket switch).

Reverse (the reverse topology): an IPv6-only client reaches a TLS reverse listener in front
of an IPv4-only plain-HTTP backend.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bcrypt
import pytest

from support import netns
from support.chromium import chromium, needs_chromium
from support.kushi_proc import Kushi, write_toml
from support.netns import ReverseTopology, StandardTopology
from support.origin import ONE_K, OriginProcess, spawn_origin

pytestmark = pytest.mark.timeout(120)

TLS_PORT = 3129
AUTH_PORT = 3130
ADMIN_PORT = 9129
CLEAN_ENV = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}


@dataclass
class Net:
    topo: StandardTopology
    kushi: Kushi
    v6: OriginProcess
    v6tls: OriginProcess
    ca: Path
    spki: str

    @property
    def proxy(self) -> str:
        return f"https://{self.topo.proxy_client_ip}:{TLS_PORT}"


def spki_hash(cert_pem: Path) -> str:
    """base64(sha256(SubjectPublicKeyInfo)): what Chromium's SPKI allow list takes."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    cert = x509.load_pem_x509_certificate(cert_pem.read_bytes())
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(hashlib.sha256(spki).digest()).decode()


@pytest.fixture(scope="module")
def net(
    netns_topology: StandardTopology, tmp_path_factory: pytest.TempPathFactory, tls_ca: Any
) -> Iterator[Net]:
    t = netns_topology
    workdir = tmp_path_factory.mktemp("tls-netns")
    t.proxy.hosts({"v6.test": [t.v6origin_ip], "v4.test": [t.v4origin_ip]})
    cert, key = tls_ca.issue("proxy.test", t.proxy_client_ip, stem="netns-proxy")
    htpasswd = workdir / "users.htpasswd"
    htpasswd.write_text(f"alice:{bcrypt.hashpw(b's3cret', bcrypt.gensalt(rounds=4)).decode()}\n")
    v6 = spawn_origin(["[::]:80"], workdir / "v6.jsonl", ns=t.v6origin, name="v6origin")
    v6tls = spawn_origin(
        ["[::]:443"],
        workdir / "v6tls.jsonl",
        ns=t.v6origin,
        name="v6tls",
        tls_cert=tls_ca.cert_chain,
        tls_key=tls_ca.key,
    )
    common = {
        "allow": ["198.51.100.0/24"],
        "connect_ports": [443],
        "tls_cert": str(cert),
        "tls_key": str(key),
    }
    config = workdir / "kushi.toml"
    write_toml(
        config,
        {
            "access_log_format": "json",
            "admin_listen": [f"{t.proxy_client_ip}:{ADMIN_PORT}"],
            "admin_allow": ["198.51.100.0/24"],
        },
        [
            {"name": "tls", "listen": [f"{t.proxy_client_ip}:{TLS_PORT}"], **common},
            {
                "name": "tls-auth",
                "listen": [f"{t.proxy_client_ip}:{AUTH_PORT}"],
                "auth_file": str(htpasswd),
                **common,
            },
        ],
    )
    kushi = Kushi(
        ["serve", "--config", str(config)], workdir, netns=t.proxy.ns, loopback_destinations=False
    )
    try:
        kushi.wait_ready()
        yield Net(t, kushi, v6, v6tls, tls_ca.ca_pem, spki_hash(cert))
    finally:
        kushi.stop()
        v6.stop()
        v6tls.stop()


def marker() -> str:
    return uuid.uuid4().hex[:12]


def origin_saw(origin: OriginProcess, mark: str) -> dict[str, Any]:
    deadline = time.monotonic() + 5
    while not (found := [r for r in origin.requests() if mark in r["target"]]):
        assert time.monotonic() < deadline, f"{origin.name} never saw {mark}"
        time.sleep(0.02)
    assert len(found) == 1
    return found[0]


def curl(net: Net, *args: str) -> Any:
    return net.topo.client.run(
        ["curl", "-sS", "--max-time", "20", "--proxy-cacert", str(net.ca), *args], env=CLEAN_ENV
    )


def test_curl_https_proxy_reaches_the_ipv6_only_origin(net: Net) -> None:
    t, mark = net.topo, marker()
    r = curl(
        net, "-x", net.proxy, "-o", "/dev/null", "-w", "%{http_code}", f"http://v6.test/1k?m={mark}"
    )
    assert r.stdout == "200", r.stderr
    seen = origin_saw(net.v6, mark)
    assert (seen["client"], seen["family"]) == (t.proxy_v6, "ipv6")
    record = net.kushi.record_where(target=f"http://v6.test/1k?m={mark}")
    assert record["tls"].startswith("TLSv1.") and record["client"] == t.client_ip
    assert record["family"] == "ipv6"


def test_connect_inside_tls_to_an_https_ipv6_origin(net: Net) -> None:
    """TLS inside TLS: curl's tunnel to https://v6.test through the https:// proxy."""
    mark = marker()
    r = curl(net, "-x", net.proxy, "--cacert", str(net.ca), f"https://v6.test/headers?m={mark}")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["tls"] is True
    seen = origin_saw(net.v6tls, mark)
    assert seen["family"] == "ipv6" and seen["sni"] == "v6.test"
    tunnels = net.kushi.records_until(lambda r: r["target"] == "v6.test:443")
    assert tunnels and all(t["tls"].startswith("TLSv1.") for t in tunnels)


def test_proxy_authorization_inside_tls(net: Net) -> None:
    t = net.topo
    proxy = f"https://{t.proxy_client_ip}:{AUTH_PORT}"
    mark = marker()
    r = curl(
        net, "-x", proxy, "-o", "/dev/null", "-w", "%{http_code}", f"http://v6.test/1k?m={mark}"
    )
    assert r.stdout == "407"
    r = curl(
        net,
        "-x",
        proxy,
        "-U",
        "alice:s3cret",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        f"http://v6.test/1k?m={mark}",
    )
    assert r.stdout == "200", r.stderr
    assert origin_saw(net.v6, mark)["family"] == "ipv6"


def test_plain_http_proxying_to_the_tls_port_is_refused(net: Net) -> None:
    mark = marker()
    r = net.topo.client.run(
        [
            "curl",
            "-sS",
            "--max-time",
            "10",
            "-x",
            f"http://{net.topo.proxy_client_ip}:{TLS_PORT}",
            f"http://v6.test/1k?m={mark}",
        ],
        env=CLEAN_ENV,
    )
    assert r.returncode != 0
    time.sleep(0.2)
    assert not [x for x in net.v6.requests() if mark in x["target"]]


@needs_chromium
def test_chromium_through_the_https_proxy_and_the_pac_file(net: Net) -> None:
    t = net.topo
    with urlopen_in(t.client, f"http://{t.proxy_client_ip}:{ADMIN_PORT}/proxy.pac") as pac:
        assert f"HTTPS {t.proxy_client_ip}:{TLS_PORT}" in pac
    for args in (
        [f"--proxy-server=https://{t.proxy_client_ip}:{TLS_PORT}"],
        [f"--proxy-pac-url=http://{t.proxy_client_ip}:{ADMIN_PORT}/proxy.pac"],
    ):
        mark = marker()
        result = chromium(
            [
                *args,
                f"--ignore-certificate-errors-spki-list={net.spki}",
                "--virtual-time-budget=5000",
                "--dump-dom",
                f"http://v6.test/1k?m={mark}",
            ],
            ns=t.client,
        )
        assert ONE_K.decode().splitlines()[0] in result.stdout, result.stdout[:2000]
        seen = origin_saw(net.v6, mark)
        assert (seen["client"], seen["family"]) == (t.proxy_v6, "ipv6")
        record = net.kushi.record_where(target=f"http://v6.test/1k?m={mark}")
        assert record["tls"].startswith("TLSv1.")


class urlopen_in:
    """The body of one GET from inside a namespace (curl), as a context manager."""

    def __init__(self, host: netns.Host, url: str) -> None:
        self.result = host.run(["curl", "-sS", "--max-time", "10", url], env=CLEAN_ENV)

    def __enter__(self) -> str:
        assert self.result.returncode == 0, self.result.stderr
        return str(self.result.stdout)

    def __exit__(self, *exc: object) -> None:
        return None


# --- reverse: TLS for IPv6 clients, plain HTTP to an IPv4-only backend --------------------


def test_reverse_tls_termination_for_an_ipv6_client(
    netns_reverse_topology: ReverseTopology, tmp_path: Path, tls_ca: Any
) -> None:
    t = netns_reverse_topology
    cert, key = tls_ca.issue("www.test", t.proxy_client_ip, stem="netns-reverse")
    backend = spawn_origin(
        [f"{t.v4backend_ip}:8080"], tmp_path / "backend.jsonl", ns=t.v4backend, name="v4backend"
    )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)
            kushi = Kushi(
                [
                    "reverse",
                    "--listen",
                    f"[{t.proxy_client_ip}]:443",
                    "--backend",
                    f"http://{t.v4backend_ip}:8080",
                    "--tls-cert",
                    str(cert),
                    "--tls-key",
                    str(key),
                    "--access-log-format",
                    "json",
                    "--admin-listen",
                    "off",
                ],
                tmp_path,
                netns=t.proxy.ns,
                loopback_destinations=False,
            )
        try:
            kushi.wait_ready()
            r = t.v6client.run(
                [
                    "curl",
                    "-sS",
                    "--max-time",
                    "20",
                    "--cacert",
                    str(tls_ca.ca_pem),
                    "--resolve",
                    f"www.test:443:[{t.proxy_client_ip}]",
                    "https://www.test/headers",
                ],
                env=CLEAN_ENV,
            )
            assert r.returncode == 0, r.stderr
            seen = json.loads(r.stdout)
            assert seen["family"] == "ipv4" and seen["tls"] is False
            headers = {k.lower(): v for k, v in seen["headers"]}
            assert headers["x-forwarded-proto"] == "https"
            assert headers["x-forwarded-for"] == t.v6client_ip
            record = kushi.record_where(method="GET")
            assert record["tls"].startswith("TLSv1.") and record["client"] == t.v6client_ip
        finally:
            assert kushi.stop() == 0, kushi.stderr[-2000:]
    finally:
        backend.stop()
