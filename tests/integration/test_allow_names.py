"""An allow-list entry may be a host name (the owner's dynamic-DNS name at home)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from support.kushi_proc import Kushi, free_port
from support.origin import OriginProcess

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def origin(origin_factory: object) -> Iterator[OriginProcess]:
    yield origin_factory(listen=["[::1]:0"])  # type: ignore[operator]


def curl_status(port: int, url: str) -> int:
    out = subprocess.run(
        [
            "curl",
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-x",
            f"http://127.0.0.1:{port}",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=20,
    )
    return int(out.stdout or 0)


def test_a_host_name_in_the_allow_list_admits_its_addresses(
    tmp_path: Path, origin: OriginProcess
) -> None:
    port = free_port()
    kushi = Kushi(
        ["serve", "--listen", f"127.0.0.1:{port}", "--allow", "localhost", "--admin-listen", "off"],
        tmp_path,
        [("127.0.0.1", port)],
    )
    try:
        assert curl_status(port, origin.url("/1k")) == 200
        assert len(origin.requests()) == 1
    finally:
        assert kushi.stop() == 0


def test_a_host_name_that_is_not_the_client_is_refused(
    tmp_path: Path, origin: OriginProcess
) -> None:
    port = free_port()
    kushi = Kushi(
        [
            "serve",
            "--listen",
            f"127.0.0.1:{port}",
            "--allow",
            "nonexistent.invalid",
            "--admin-listen",
            "off",
        ],
        tmp_path,
        [("127.0.0.1", port)],
    )
    try:
        assert curl_status(port, origin.url("/1k")) == 403
        assert origin.requests() == []
        assert "could not resolve nonexistent.invalid" in kushi.stderr
    finally:
        assert kushi.stop() == 0
