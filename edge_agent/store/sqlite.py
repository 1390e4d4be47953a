"""The buffer: sealed batches in one SQLite file, the agent's write-ahead log.

Invariants (each holds after every committed transaction):
1. A batch is written whole, with the sequence and batch counters that follow it, in one
   transaction; `seq` and `batch` never go backwards and are never reused within an epoch.
2. A batch leaves the buffer only in three ways: deleted after the broker acknowledged it,
   evicted by retention, or evicted as undeliverable (the broker will never take it: too large
   for its packet limit); an evicted batch's `[first_seq, last_seq]` is recorded in
   `pending_evictions` in the same transaction, and an undeliverable one's reason in
   `eviction_reasons` (no row there means retention).
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
import contextlib
import logging
import sqlite3
import time
import uuid
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple, TypeVar

import aiosqlite

from edge_agent.errors import StoreError
from edge_agent.seal.envelope import RETENTION

log = logging.getLogger(__name__)

T = TypeVar("T")

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
CREATE TABLE IF NOT EXISTS eviction_reasons (
    first_seq INTEGER PRIMARY KEY, reason TEXT NOT NULL);
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


BatchKind = Literal["declaration", "readings"]
"""A declaration (a batch that declares evicted readings: sent first, never evicted) or an
ordinary batch of readings."""

_TABLES: dict[BatchKind, str] = {"declaration": "notices", "readings": "batches"}


class BatchKey(NamedTuple):
    """Which stored batch: its kind, and its id among batches of that kind (the batch number)."""

    kind: BatchKind
    id: int


@dataclass(frozen=True)
class StoredBatch:
    """A batch taken from the buffer for sending; `key` is what `ack` takes back."""

    key: BatchKey
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
        self._meta: dict[str, Any] = {}

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
            self._meta = meta
            await self._load_stats()
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(f"cannot open buffer {self.path}: {exc}") from exc

    async def close(self) -> None:
        async with self._lock:
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

    async def _read(self, what: str, sql: str, args: Sequence[Any] = ()) -> list[Any]:
        async with self._lock:
            try:
                return list(await self.db.execute_fetchall(sql, args))
            except sqlite3.Error as exc:
                raise StoreError(f"cannot {what} in {self.path}: {exc}") from exc

    async def _atomically(
        self, what: str, body: Callable[[aiosqlite.Connection], Awaitable[T]],
        on_commit: Callable[[T], None],
    ) -> T:  # fmt: skip
        """Run `body` as one transaction that a cancellation cannot split.

        aiosqlite finishes a statement even when its awaiter is cancelled, so a cancel between
        BEGIN and COMMIT could leave the connection inside a transaction for good. The whole
        transaction (and the bookkeeping after its commit) runs in a shielded task; a cancelled
        caller waits for it to commit or roll back, then sees the cancellation.
        """
        task = asyncio.ensure_future(self._transaction(what, body, on_commit))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            await asyncio.wait({task})
            raise

    async def _transaction(
        self, what: str, body: Callable[[aiosqlite.Connection], Awaitable[T]],
        on_commit: Callable[[T], None],
    ) -> T:  # fmt: skip
        db = self.db
        async with self._lock:
            try:
                await db.execute("BEGIN IMMEDIATE")
                result = await body(db)
                await db.execute("COMMIT")
            except sqlite3.Error as exc:
                await self._rollback()
                full = getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL
                raise StoreError(f"cannot {what} in {self.path}: {exc}", disk_full=full) from exc
            except BaseException:
                await self._rollback()
                raise
            on_commit(result)
            return result

    async def _rollback(self) -> None:
        """Roll back if a transaction is still open: SQLite ends one itself on SQLITE_FULL."""
        if self.db.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                await self.db.execute("ROLLBACK")

    async def pending_evictions(self) -> list[tuple[int, int]]:
        """Evicted ranges not yet declared: `(first_seq, last_seq)`, oldest first."""
        rows = await self._read(
            "read pending evictions",
            "SELECT first_seq, last_seq FROM pending_evictions ORDER BY first_seq",
        )
        return [(int(a), int(b)) for a, b in rows]

    def recall(self, key: str) -> Any:
        """A value `remember` kept, as of the last open or since; None if never."""
        return self._meta.get(key)

    async def remember(self, key: str, value: int | str | None) -> None:
        """Keep a small fact across restarts (the broker's last advertised packet limit)."""

        async def body(db: aiosqlite.Connection) -> None:
            await db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

        await self._atomically(f"remember {key}", body, lambda _: self._meta.update({key: value}))

    async def pending_declarations(self) -> list[tuple[int, int, str]]:
        """What the next declaration must say: the pending evictions with their reasons,
        `(first_seq, last_seq, reason)`, oldest first (reason `retention` unless recorded)."""
        rows = await self._read(
            "read pending evictions",
            "SELECT p.first_seq, p.last_seq, coalesce(r.reason, ?) FROM pending_evictions p"
            " LEFT JOIN eviction_reasons r USING (first_seq) ORDER BY p.first_seq",
            (RETENTION,),
        )
        return [(int(a), int(b), str(reason)) for a, b, reason in rows]

    async def evict_undeliverable(self, key: BatchKey, reason: str) -> tuple[int, int, int] | None:
        """Evict one batch of readings the broker will never accept, pending declaration with
        `reason` (`too_large`, `undeliverable`: contract §4.7).

        Returns `(first_seq, last_seq, readings)`, or None when `key` is not a batch of readings
        still buffered (declarations are never evicted: invariant 3).
        """
        if key.kind != "readings":
            return None
        row_id = key.id

        async def body(db: aiosqlite.Connection) -> tuple[int, int, int, int] | None:
            rows = list(
                await db.execute_fetchall(
                    "DELETE FROM batches WHERE id = ?"
                    " RETURNING first_seq, last_seq, readings, bytes",
                    (row_id,),
                )
            )
            if not rows:
                return None
            first, last, readings, size = (int(v) for v in rows[0])
            if readings:
                await db.execute("INSERT INTO pending_evictions VALUES (?, ?)", (first, last))
                await db.execute("INSERT INTO eviction_reasons VALUES (?, ?)", (first, reason))
            return first, last, readings, size

        def on_commit(row: tuple[int, int, int, int] | None) -> None:
            if row is not None:
                self._forget([(row[2], row[3], 1)])

        row = await self._atomically("evict an undeliverable batch", body, on_commit)
        return None if row is None else row[:3]

    async def append(self, batches: Sequence[SealedBatch]) -> int:
        """Store sealed batches, advance the counters and apply retention, in one transaction.

        The caller numbered them from `next_batch` and `next_seq`; batches that declare evictions
        are kept as declarations, and the evictions they declare stop being pending. Returns the
        number of readings retention evicted (now pending declaration).
        """
        if not batches:
            return 0
        expected_batch, expected_seq = self.next_batch, self.next_seq
        for b in batches:
            if b.batch != expected_batch or b.first_seq != expected_seq:
                raise StoreError(
                    f"batch {b.batch} seq {b.first_seq} out of order: "
                    f"expected batch {expected_batch} seq {expected_seq}"
                )
            expected_batch, expected_seq = b.batch + 1, b.first_seq + b.readings

        async def body(_: aiosqlite.Connection) -> list[tuple[int, int, int]]:
            await self._insert(batches, expected_batch, expected_seq)
            return await self._apply_retention(sum(len(b.data) for b in batches))

        def on_commit(evicted: list[tuple[int, int, int]]) -> None:
            self.next_batch, self.next_seq = expected_batch, expected_seq
            for b in batches:
                self.stats.batches += 1
                self.stats.readings += b.readings
                self.stats.bytes += len(b.data)
            self._forget(evicted)

        evicted = await self._atomically("write batches", body, on_commit)
        return sum(readings for readings, _, _ in evicted)

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
                    "DELETE FROM eviction_reasons WHERE first_seq = ?",
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

    def _forget(self, evicted: list[tuple[int, int, int]]) -> None:
        for readings, size, count in evicted:
            self.stats.readings -= readings
            self.stats.bytes -= size
            self.stats.batches -= count
            self.stats.evicted_readings += readings

    async def evict_oldest(self, fraction: float = 0.1) -> int:
        """Make room when the disk itself is full: evict the oldest share of batches.

        Returns the number of readings evicted (now pending declaration); 0 when only
        declarations are left, which are never evicted.
        """
        count = max(1, int(self.stats.batches * fraction))

        async def body(db: aiosqlite.Connection) -> list[tuple[int, int, int, int, int]]:
            rows = await db.execute_fetchall(
                "SELECT id, first_seq, last_seq, readings, bytes FROM batches ORDER BY id LIMIT ?",
                (count,),
            )
            chosen = [(int(r[0]), int(r[1]), int(r[2]), int(r[3]), int(r[4])) for r in rows]
            if chosen:
                await self._evict(chosen)
            return chosen

        chosen = await self._atomically(
            "evict batches", body, lambda rows: self._forget([(r[3], r[4], 1) for r in rows])
        )
        return sum(r[3] for r in chosen)

    async def take(
        self, limit: int, after: int = 0, skip_declarations: Collection[int] = ()
    ) -> list[StoredBatch]:
        """Up to `limit` batches to send: declarations first (but those whose id is in
        `skip_declarations`), then batches of readings oldest first, past the id `after`."""
        skip = list(skip_declarations)
        marks = ",".join("?" * len(skip))
        taken = [
            StoredBatch(BatchKey("declaration", row_id), readings, sealed_ns, data)
            for row_id, readings, sealed_ns, data in await self._read(
                "read declarations",
                f"SELECT id, readings, sealed_ns, data FROM notices WHERE id NOT IN ({marks})"  # noqa: S608  # nosec B608  # placeholders only
                " ORDER BY id LIMIT ?",
                [*skip, limit],
            )
        ]
        if len(taken) < limit:
            taken.extend(
                StoredBatch(BatchKey("readings", row_id), readings, sealed_ns, data)
                for row_id, readings, sealed_ns, data in await self._read(
                    "read batches",
                    "SELECT id, readings, sealed_ns, data FROM batches WHERE id > ?"
                    " ORDER BY id LIMIT ?",
                    (after, limit - len(taken)),
                )
            )
        return taken

    async def ack(self, keys: Sequence[BatchKey]) -> None:
        """Delete batches the broker acknowledged; unknown keys (already evicted) are ignored."""
        if not keys:
            return

        async def body(db: aiosqlite.Connection) -> list[tuple[int, int]]:
            removed: list[tuple[int, int]] = []
            for kind, table in _TABLES.items():
                ids = [key.id for key in keys if key.kind == kind]
                for start in range(0, len(ids), 500):
                    chunk = ids[start : start + 500]
                    marks = ",".join("?" * len(chunk))
                    rows = await db.execute_fetchall(
                        f"DELETE FROM {table} WHERE id IN ({marks})"  # noqa: S608  # nosec B608  # table names are literals
                        " RETURNING readings, bytes",
                        chunk,
                    )
                    removed.extend((int(r), int(b)) for r, b in rows)
            return removed

        def on_commit(removed: list[tuple[int, int]]) -> None:
            self.stats.readings -= sum(r for r, _ in removed)
            self.stats.bytes -= sum(b for _, b in removed)
            self.stats.batches -= len(removed)

        await self._atomically("delete acknowledged batches", body, on_commit)

    async def oldest_sealed_ns(self) -> int | None:
        rows = await self._read(
            "read the oldest batch",
            "SELECT (SELECT sealed_ns FROM notices ORDER BY id LIMIT 1),"
            " (SELECT sealed_ns FROM batches ORDER BY id LIMIT 1)",
        )
        found = [v for v in rows[0] if v is not None] if rows else []
        return min(found) if found else None
