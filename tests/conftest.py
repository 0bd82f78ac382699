"""Shared fixtures: a real origin server, namespace topologies and TLS material.

Test modules import the helpers as ``support.origin`` / ``support.netns`` (this directory is put
on ``sys.path`` below).
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

TESTS_DIR = Path(__file__).resolve().parent
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))

import trustme  # noqa: E402

from support.netns import (  # noqa: E402
    ReverseTopology,
    StandardTopology,
    Topology,
    netns_available,
)
from support.origin import OriginProcess, spawn_origin  # noqa: E402

NETNS_FIXTURES = frozenset({"netns_topology", "netns_reverse_topology"})

#: Names in the default server certificate of ``tls_ca``.
TLS_NAMES = (
    "v6.test",
    "dual.test",
    "v4.test",
    "localhost",
    "127.0.0.1",
    "::1",
    "2001:db8:1::6",
    "2001:db8:1::5",
    "203.0.113.4",
    "203.0.113.5",
)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--run-soak", action="store_true", default=False, help="run tests marked soak (make soak)"
    )


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Tests marked ``soak`` run only with ``--run-soak``."""
    if item.get_closest_marker("soak") and not item.config.getoption("--run-soak"):
        pytest.skip("soak test: run with --run-soak (make soak)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests that use a namespace topology get the ``netns`` marker automatically."""
    for item in items:
        if NETNS_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.netns)


# ---------------------------------------------------------------------------------------------
# Origin servers


OriginFactory = Callable[..., OriginProcess]


@pytest.fixture(autouse=True)
def _stop_leftover_kushi() -> Iterator[None]:
    """Stop every kushi a test started and left running (it failed before its own stop).
    Those of wider-scoped fixtures were started before this and are left to them."""
    from support.kushi_proc import STARTED

    before = len(STARTED)
    yield
    started, STARTED[before:] = STARTED[before:], []
    for kushi in started:
        kushi.stop()


@pytest.fixture
def origin_factory(tmp_path: Path) -> Iterator[OriginFactory]:
    """``origin_factory(listen=("[::1]:0", "127.0.0.1:0"), *, ns=None, name="origin",
    tls=None, proxy_protocol=False, extra_args=())`` starts ``support/origin.py`` (inside
    namespace ``ns`` -- a ``Host`` or a name -- when given), waits for READY and returns an
    :class:`support.origin.OriginProcess` (``.addresses``, ``.endpoints``, ``.port``,
    ``.url(path)``, ``.log_path``, ``.requests()``, ``.wait_requests(n)``, ``.events()``,
    ``.stop()``).  ``tls`` is a :class:`TLSFiles` or a ``(cert_chain, key)`` pair.  Every
    origin started is stopped at teardown."""
    started: list[OriginProcess] = []
    counter = itertools.count()

    def factory(
        listen: Sequence[str] | str = ("[::1]:0", "127.0.0.1:0"),
        *,
        ns: Any = None,
        name: str = "origin",
        tls: TLSFiles | tuple[Path | str, Path | str] | None = None,
        proxy_protocol: bool = False,
        extra_args: Sequence[str] = (),
    ) -> OriginProcess:
        cert: Path | str | None = None
        key: Path | str | None = None
        if isinstance(tls, TLSFiles):
            cert, key = tls.cert_chain, tls.key
        elif tls is not None:
            cert, key = tls
        origin = spawn_origin(
            [listen] if isinstance(listen, str) else list(listen),
            tmp_path / f"{name}-{next(counter)}.jsonl",
            ns=ns,
            name=name,
            tls_cert=cert,
            tls_key=key,
            proxy_protocol=proxy_protocol,
            extra_args=extra_args,
        )
        started.append(origin)
        return origin

    yield factory
    for origin in started:
        origin.stop()


# ---------------------------------------------------------------------------------------------
# Network namespaces


def _skip_without_netns() -> None:
    reason = netns_available()
    if reason is not None:
        pytest.skip(f"network namespaces unavailable: {reason}")


@pytest.fixture(scope="session")
def netns_topology() -> Iterator[StandardTopology]:
    """The standard topology (IPv4-only client, dual-stack proxy, IPv6/IPv4/dual origins,
    blackhole addresses), shared by the whole session; skips when namespaces don't work."""
    _skip_without_netns()
    with Topology.standard() as topo:
        yield topo


@pytest.fixture(scope="session")
def netns_reverse_topology() -> Iterator[ReverseTopology]:
    """IPv6-only client, proxy, two IPv4-only backends; shared by the whole session."""
    _skip_without_netns()
    with Topology.reverse() as topo:
        yield topo


# ---------------------------------------------------------------------------------------------
# TLS


@dataclass
class TLSFiles:
    """A test CA and a server certificate, as PEM files."""

    ca: trustme.CA
    ca_pem: Path  # the CA certificate, for clients' trust stores (curl --cacert)
    cert_chain: Path  # server certificate followed by its chain
    key: Path  # server private key
    names: tuple[str, ...]
    directory: Path

    def issue(self, *names: str, stem: str | None = None) -> tuple[Path, Path]:
        """Another server certificate from the same CA: returns ``(cert_chain, key)``."""
        stem = stem or "cert-" + "-".join(n.replace(":", "_") for n in names)[:60]
        cert = self.ca.issue_cert(*names)
        chain = self.directory / f"{stem}.pem"
        key = self.directory / f"{stem}.key"
        chain.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
        cert.private_key_pem.write_to_path(str(key))
        return chain, key


@pytest.fixture(scope="session")
def tls_ca(tmp_path_factory: pytest.TempPathFactory) -> TLSFiles:
    """A trustme CA and one server certificate for :data:`TLS_NAMES`, written to a tmp dir."""
    directory = tmp_path_factory.mktemp("tls")
    ca = trustme.CA()
    ca_pem = directory / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_pem))
    files = TLSFiles(
        ca, ca_pem, directory / "server.pem", directory / "server.key", TLS_NAMES, directory
    )
    files.issue(*TLS_NAMES, stem="server")
    return files
