"""The buffer: sealed batches in one SQLite file, the agent's write-ahead log.

Invariants (each holds after every committed transaction):
1. A batch is written whole, with the sequence and batch counters that follow it, in one
   transaction; `seq` and `batch` never go backwards and are never reused within an epoch.
2. A batch leaves the buffer only in two ways: deleted after the broker acknowledged it, or
   evicted by retention, in which case its `[first_seq, last_seq]` is recorded in
   `pending_evictions` in the same transaction.
3. A pending eviction is removed only in the transaction that stores the signed batch that
   declares it; such declaring batches live in `notices`, are sent before older readings, and are
   never evicted themselves.
4. The epoch is made once, when the file is created; losing the file means a new epoch.

The file runs in WAL mode with synchronous=FULL: with NORMAL, a power cut can roll back
transactions that were reported committed. When full, retention evicts the oldest batches first.

The batcher and the forwarder share one connection: every public method holds `_lock`, so one
caller's statements never run inside another's transaction (a second BEGIN would fail, a ROLLBACK
would undo the other's work, and a read would see rows not yet committed).
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiosqlite

from edge_agent.errors import StoreError

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS batches (
    id INTEGER PRIMARY KEY, first_seq INTEGER NOT NULL, last_seq INTEGER NOT NULL,
    readings INTEGER NOT NULL, bytes INTEGER NOT NULL, sealed_ns INTEGER NOT NULL,
    data BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS notices (
    id INTEGER PRIMARY KEY, readings INTEGER NOT NULL, bytes INTEGER NOT NULL,
    sealed_ns INTEGER NOT NULL, data BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS pending_evictions (
    first_seq INTEGER PRIMARY KEY, last_seq INTEGER NOT NULL);
"""


@dataclass(frozen=True)
class SealedBatch:
    """A batch ready to store: its signed bytes and the numbers it was sealed with."""

    batch: int
    first_seq: int
    readings: int
    sealed_ns: int
    data: bytes
    declares: tuple[tuple[int, int], ...] = ()


@dataclass(frozen=True)
class StoredBatch:
    """A batch taken from the buffer for sending; `key` is what `ack` takes back."""

    key: tuple[str, int]
    readings: int
    sealed_ns: int
    data: bytes


@dataclass
class BufferStats:
    readings: int = 0
    bytes: int = 0
    batches: int = 0
    evicted_readings: int = 0


class Store:
    """Sealed batches on disk; one instance per file, used from one event loop."""

    def __init__(self, path: Path, *, max_bytes: int, max_age_s: float) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.max_age_s = max_age_s
        self.epoch = ""
        self.next_seq = 1
        self.next_batch = 1
        self.stats = BufferStats()
        self._db: aiosqlite.Connection | None = None
        self._lock = asyncio.Lock()

    async def open(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = await aiosqlite.connect(self.path, isolation_level=None)
            db = self._db
            await db.execute("PRAGMA journal_mode=WAL")
            await db.execute("PRAGMA synchronous=FULL")
            await db.executescript(SCHEMA)
            await db.execute("BEGIN IMMEDIATE")
            rows = await db.execute_fetchall("SELECT key, value FROM meta")
            meta: dict[str, Any] = {row[0]: row[1] for row in rows}
            if "epoch" not in meta:
                meta = {"epoch": uuid.uuid4().hex, "next_seq": 1, "next_batch": 1}
                await db.executemany("INSERT INTO meta VALUES (?, ?)", meta.items())
                log.info("Created buffer path=%s epoch=%s", self.path, meta["epoch"])
            await db.execute("COMMIT")
            self.epoch = str(meta["epoch"])
            self.next_seq, self.next_batch = int(meta["next_seq"]), int(meta["next_batch"])
            await self._load_stats()
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(f"cannot open buffer {self.path}: {exc}") from exc

    async def close(self) -> None:
        if self._db is not None:
            await self._db.close()
            self._db = None

    @property
    def db(self) -> aiosqlite.Connection:
        if self._db is None:
            raise StoreError("store is not open")
        return self._db

    async def _load_stats(self) -> None:
        rows = await self.db.execute_fetchall(
            "SELECT (SELECT count(*) FROM batches) + (SELECT count(*) FROM notices),"
            " (SELECT coalesce(sum(readings), 0) FROM batches)"
            " + (SELECT coalesce(sum(readings), 0) FROM notices),"
            " (SELECT coalesce(sum(bytes), 0) FROM batches)"
            " + (SELECT coalesce(sum(bytes), 0) FROM notices)"
        )
        batches, readings, size = next(iter(rows))
        self.stats.batches, self.stats.readings, self.stats.bytes = batches, readings, size

    async def pending_evictions(self) -> list[tuple[int, int]]:
        async with self._lock:
            rows = await self.db.execute_fetchall(
                "SELECT first_seq, last_seq FROM pending_evictions ORDER BY first_seq"
            )
        return [(int(a), int(b)) for a, b in rows]

    async def append(self, batches: Sequence[SealedBatch]) -> int:
        """Store sealed batches, advance the counters and apply retention, in one transaction.

        The caller numbered them from `next_batch` and `next_seq`; batches that declare evictions
        go to `notices`, and the evictions they declare stop being pending. Returns the number of
        readings retention evicted (now pending declaration).
        """
        if not batches:
            return 0
        db = self.db
        expected_batch, expected_seq = self.next_batch, self.next_seq
        for b in batches:
            if b.batch != expected_batch or b.first_seq != expected_seq:
                raise StoreError(
                    f"batch {b.batch} seq {b.first_seq} out of order: "
                    f"expected batch {expected_batch} seq {expected_seq}"
                )
            expected_batch, expected_seq = b.batch + 1, b.first_seq + b.readings
        try:
            async with self._lock:
                await db.execute("BEGIN IMMEDIATE")
                try:
                    await self._insert(batches, expected_batch, expected_seq)
                    evicted = await self._apply_retention(sum(len(b.data) for b in batches))
                    await db.execute("COMMIT")
                except BaseException:
                    await db.execute("ROLLBACK")
                    raise
        except sqlite3.Error as exc:
            raise StoreError(f"cannot write buffer {self.path}: {exc}") from exc
        self.next_batch, self.next_seq = expected_batch, expected_seq
        for b in batches:
            self.stats.batches += 1
            self.stats.readings += b.readings
            self.stats.bytes += len(b.data)
        return self._forget(evicted)

    async def _insert(self, batches: Sequence[SealedBatch], next_batch: int, next_seq: int) -> None:
        db = self.db
        plain = [
            (
                b.batch,
                b.first_seq,
                b.first_seq + b.readings - 1,
                b.readings,
                len(b.data),
                b.sealed_ns,
                b.data,
            )
            for b in batches
            if not b.declares
        ]
        if plain:
            await db.executemany("INSERT INTO batches VALUES (?, ?, ?, ?, ?, ?, ?)", plain)
        for b in batches:
            if b.declares:
                await db.execute(
                    "INSERT INTO notices VALUES (?, ?, ?, ?, ?)",
                    (b.batch, b.readings, len(b.data), b.sealed_ns, b.data),
                )
                await db.executemany(
                    "DELETE FROM pending_evictions WHERE first_seq = ?",
                    [(first,) for first, _ in b.declares],
                )
        await db.executemany(
            "UPDATE meta SET value = ? WHERE key = ?",
            [(next_seq, "next_seq"), (next_batch, "next_batch")],
        )

    async def _apply_retention(self, adding: int) -> list[tuple[int, int, int]]:
        """Evict the oldest batches past max_bytes or max_age; return (readings, bytes, batches)."""
        excess = self.stats.bytes + adding - self.max_bytes
        cutoff_ns = time.time_ns() - int(self.max_age_s * 1e9)
        evicted: list[tuple[int, int, int]] = []
        while True:
            rows = list(
                await self.db.execute_fetchall(
                    "SELECT id, first_seq, last_seq, readings, bytes, sealed_ns FROM batches"
                    " ORDER BY id LIMIT 64"
                )
            )
            chosen = []
            for row_id, first, last, readings, size, sealed_ns in rows:
                if excess <= 0 and sealed_ns >= cutoff_ns:
                    break
                excess -= size
                chosen.append((row_id, first, last, readings, size))
            if not chosen:
                return evicted
            await self._evict(chosen)
            evicted.extend((readings, size, 1) for _, _, _, readings, size in chosen)
            if len(chosen) < len(rows):
                return evicted

    async def _evict(self, rows: list[tuple[int, int, int, int, int]]) -> None:
        db = self.db
        await db.executemany("DELETE FROM batches WHERE id = ?", [(r[0],) for r in rows])
        ranges = [(first, last) for _, first, last, readings, _ in rows if readings > 0]
        await db.executemany("INSERT INTO pending_evictions VALUES (?, ?)", ranges)
        if ranges:
            log.warning(
                "Buffer full or expired: evicted unsent readings seq=%d..%d batches=%d",
                ranges[0][0],
                ranges[-1][1],
                len(rows),
            )

    def _forget(self, evicted: list[tuple[int, int, int]]) -> int:
        for readings, size, count in evicted:
            self.stats.readings -= readings
            self.stats.bytes -= size
            self.stats.batches -= count
            self.stats.evicted_readings += readings
        return sum(readings for readings, _, _ in evicted)

    async def evict_oldest(self, fraction: float = 0.1) -> int:
        """Make room when the disk itself is full: evict the oldest share of batches.

        Returns the number of readings evicted (now pending declaration)."""
        count = max(1, int(self.stats.batches * fraction))
        async with self._lock:
            rows = await self.db.execute_fetchall(
                "SELECT id, first_seq, last_seq, readings, bytes FROM batches ORDER BY id LIMIT ?",
                (count,),
            )
            chosen = [tuple(r) for r in rows]
            if not chosen:
                return 0
            await self.db.execute("BEGIN IMMEDIATE")
            try:
                await self._evict(chosen)
                await self.db.execute("COMMIT")
            except BaseException:
                await self.db.execute("ROLLBACK")
                raise
        return self._forget([(r[3], r[4], 1) for r in chosen])

    async def take(self, limit: int, after: int = 0) -> list[StoredBatch]:
        """Up to `limit` batches to send: notices first, then readings oldest first past `after`."""
        db = self.db
        async with self._lock:
            taken = [
                StoredBatch(("notices", row_id), readings, sealed_ns, data)
                for row_id, readings, sealed_ns, data in await db.execute_fetchall(
                    "SELECT id, readings, sealed_ns, data FROM notices ORDER BY id LIMIT ?",
                    (limit,),
                )
            ]
            if len(taken) < limit:
                taken.extend(
                    StoredBatch(("batches", row_id), readings, sealed_ns, data)
                    for row_id, readings, sealed_ns, data in await db.execute_fetchall(
                        "SELECT id, readings, sealed_ns, data FROM batches WHERE id > ?"
                        " ORDER BY id LIMIT ?",
                        (after, limit - len(taken)),
                    )
                )
        return taken

    async def ack(self, keys: Sequence[tuple[str, int]]) -> None:
        """Delete batches the broker acknowledged; unknown keys (already evicted) are ignored."""
        if not keys:
            return
        db = self.db
        removed: list[tuple[int, int]] = []
        async with self._lock:
            await db.execute("BEGIN IMMEDIATE")
            try:
                for table in ("batches", "notices"):
                    ids = [row_id for name, row_id in keys if name == table]
                    for start in range(0, len(ids), 500):
                        chunk = ids[start : start + 500]
                        marks = ",".join("?" * len(chunk))
                        removed.extend(
                            await db.execute_fetchall(  # type: ignore[arg-type]
                                f"DELETE FROM {table} WHERE id IN ({marks})"  # noqa: S608 - literals
                                " RETURNING readings, bytes",
                                chunk,
                            )
                        )
                await db.execute("COMMIT")
            except BaseException:
                await db.execute("ROLLBACK")
                raise
        self.stats.readings -= sum(r for r, _ in removed)
        self.stats.bytes -= sum(b for _, b in removed)
        self.stats.batches -= len(removed)

    async def oldest_sealed_ns(self) -> int | None:
        async with self._lock:
            rows = list(
                await self.db.execute_fetchall(
                    "SELECT (SELECT sealed_ns FROM notices ORDER BY id LIMIT 1),"
                    " (SELECT sealed_ns FROM batches ORDER BY id LIMIT 1)"
                )
            )
        found = [v for v in rows[0] if v is not None] if rows else []
        return min(found) if found else None
