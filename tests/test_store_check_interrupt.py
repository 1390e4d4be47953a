"""The buffer's integrity check at open can be interrupted (a stop during start-up): its worker
thread must end at once, whenever the interrupt comes, or the process waits for the whole check
(13 s at 512 MB from a cold cache) before it can exit. tests/test_startup_stop.py stops the real
agent during the check; here the moments of the interrupt are chosen."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path

import pytest

from edge_agent.store.sqlite import SealedBatch, Store, _check_file, _Interruptible

pytestmark = pytest.mark.unit


def buffer(path: Path) -> Path:
    async def fill() -> None:
        store = Store(path, max_bytes=1 << 20, max_age_s=60.0)
        await store.open()
        await store.append([SealedBatch(1, 1, 1, time.time_ns(), b"x" * 100)])
        await store.close()

    asyncio.run(fill())
    return path


class _InterruptedWhenIdle(_Interruptible):
    """Interrupted once attached, before the check's statement runs: SQLite's own interrupt
    is a no-op then."""

    def attach(self, db: sqlite3.Connection | None) -> bool:
        attached = super().attach(db)
        if db is not None:
            self.interrupt()
        return attached


def test_an_uninterrupted_check_reads_the_meta(tmp_path: Path) -> None:
    problem, meta = _check_file(buffer(tmp_path / "b.db"), _Interruptible())
    assert problem is None and meta is not None and "epoch" in meta


def test_an_interrupt_before_the_connection_skips_the_check(tmp_path: Path) -> None:
    check = _Interruptible()
    check.interrupt()
    assert _check_file(buffer(tmp_path / "b.db"), check) == (None, None)


def test_an_interrupt_while_no_statement_runs_still_stops_the_check(tmp_path: Path) -> None:
    assert _check_file(buffer(tmp_path / "b.db"), _InterruptedWhenIdle()) == (None, None)
