"""The soak of ``tests/soak/test_soak.py`` for 8 seconds, so ``make test`` proves the bound:
after mixed load (with errors and aborted clients) kushi's fds return to their starting
level and its RSS stays within 20 MiB of the warm-up level."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from soak.test_soak import run_soak
from support.origin import OriginProcess


@pytest.mark.timeout(120)
def test_soak_short(
    tmp_path: Path,
    origin_factory: Callable[..., OriginProcess],
    capsys: pytest.CaptureFixture[str],
) -> None:
    report = run_soak(tmp_path, origin_factory, seconds=8, warmup=1.5)
    with capsys.disabled():
        print("\n" + report.summary())
    report.check()
