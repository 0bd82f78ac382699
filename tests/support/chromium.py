"""Headless Chromium for the tests that need a real browser (status page, PAC, SOCKS5)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence

import pytest

from support import netns

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"

#: ``pytestmark`` entry for modules (or a decorator for tests) that need Chromium.
needs_chromium = pytest.mark.skipif(
    not os.access(CHROMIUM, os.X_OK),
    reason="chromium is not installed (make test installs the Debian package)",
)

CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
)


def chromium(
    args: Sequence[str], ns: netns.Host | None = None, timeout: float = 60.0
) -> subprocess.CompletedProcess[str]:
    """Run headless Chromium once with a fresh profile; returns its output."""
    with tempfile.TemporaryDirectory(prefix="kushi-chromium-") as profile:
        argv = [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args]
        env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
        env["HOME"] = profile
        result = netns.run(ns, argv, timeout=timeout, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    return result
