"""The access log writer: batches within an event-loop turn, nothing lost on close."""

from __future__ import annotations

import asyncio
from pathlib import Path

from kushi.accesslog import AccessLog, AccessRecord


def test_access_log_writes_one_batch_per_loop_turn_and_loses_nothing_on_close(
    tmp_path: Path,
) -> None:
    """The first record of a turn of the event loop is written at once, the ones after it in
    the same turn together at its end; close writes what is still queued (shutdown, or a
    reloaded snapshot's last request)."""

    def record(n: int) -> AccessRecord:
        return AccessRecord(
            time=1.0, listener="l", mode="forward", client="127.0.0.1", target=f"/r{n}"
        )

    path = tmp_path / "access.log"

    async def main() -> None:
        log = AccessLog(str(path))
        for n in range(3):
            log.write(record(n))
        # Still this turn: the first line is out, the other two wait for its end.
        assert [line.split()[6] for line in path.read_text().splitlines()] == ["/r0"]
        await asyncio.sleep(0)
        assert [line.split()[6] for line in path.read_text().splitlines()] == ["/r0", "/r1", "/r2"]
        log.write(record(3))  # a new turn: written at once
        log.write(record(4))
        log.close()  # no turn of the loop in between: close writes the queued one
        assert path.read_text().splitlines()[-1].split()[6] == "/r4"
        log.write(record(5))  # after close: off
        await asyncio.sleep(0)

    asyncio.run(main())
    assert len(path.read_text().splitlines()) == 5
