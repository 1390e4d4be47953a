"""The buffer: sealed batches in one SQLite file, the agent's write-ahead log.

Invariants (each holds after every committed transaction):
1. A batch is written whole, with the sequence and batch counters that follow it, in one
   transaction; `seq` and `batch` never go backwards and are never reused within an epoch.
2. A batch leaves the buffer only in four ways: deleted after the broker acknowledged it
   (`ack`, mqtt.ack: broker), deleted once a consumer's verified acknowledgement covers it
   (`consumer_ack`, either mode; docs/contract.md §4.10), evicted by retention, or evicted as
   undeliverable (the broker will never take it: too large for its packet limit). Marking a
   batch sent (`mark_sent`, mqtt.ack: end_to_end) keeps it, and retention and eviction treat it
   as any other batch. An evicted batch's `[first_seq, last_seq]` is recorded in
   `pending_evictions` in the same transaction, and an undeliverable one's reason in
   `eviction_reasons` (no row there means retention).
3. A pending eviction is removed only in the transaction that stores the signed batch that
   declares it; such declaring batches live in `notices`, are sent before older readings, and are
   never evicted themselves.
4. The epoch is made once, when the file is created; losing the file means a new epoch, and the
   new epoch's first batch says how the previous one ended (`previous_epoch`, kept in `meta`
   until a sealed batch carries it, like a pending eviction).

5. `sent_ns` (both tables) is NULL until the broker acknowledged the batch in end_to_end mode,
   then the time of its last PUBACK: `take_unacked` returns it again only once that is older
   than the ack timeout. Files made before the column existed get it at open (ALTER TABLE,
   NULL for every row: nothing counts as sent, so everything is sent once more).
6. Point catalogues (docs/contract.md §4.12). `batches.catalogue` is the digest of the catalogue
   a batch references (NULL: self-contained; declarations never reference one). Every digest
   there has its row in `catalogues`, written (INSERT OR IGNORE) in the transaction that stores
   the first batch referencing it. The newest catalogue (`meta` key `catalogue`: the digest the
   last batch that referenced one referenced) is kept even unreferenced, so that an agent
   restarted with the same points references it again instead of making a new one; any other
   unreferenced catalogue is deleted in the transaction that removed its last batch (ack,
   consumer acknowledgement, eviction) or at open. Files made before 2.4 get the column at open
   (NULL: self-contained, as they are).

The file runs in WAL mode with synchronous=FULL: with NORMAL, a power cut can roll back
transactions that were reported committed. When full, retention evicts the oldest batches first.

The batcher and the forwarder share one connection: every public method holds `_lock`, so one
caller's statements never run inside another's transaction (a second BEGIN would fail, a ROLLBACK
would undo the other's work, and a read would see rows not yet committed).

A full disk. In WAL mode every write, a delete too, first appends pages to the `-wal` file, and
the main file grows only when a checkpoint copies new pages into it: on a full disk, eviction
itself fails, and so does the checkpoint that would let the WAL be reused. Three measures keep
the buffer working there (measured on a 2 MiB tmpfs, see tests/test_store_faults.py):
- a reserve file, `PATH-reserve` (RESERVE_BYTES, allocated when there is room), that the store
  deletes on the first SQLITE_FULL: its room takes the checkpoint's growth and the WAL's;
- the WAL is checkpointed every WAL_CHECKPOINT_BYTES, and a transaction holds at most
  MAX_TRANSACTION_BYTES of batches (the batcher keeps to it), so that what a checkpoint must copy
  (at most their sum) always fits in the reserve;
- while the disk is full ("tight"), the file never grows: an append first evicts the oldest
  batches (at least a tenth of them) until SQLite's free pages can hold it, in the same
  transaction, and the WAL, never truncated, is reused from its start after each checkpoint.
  The buffer keeps its footprint; it leaves this state, and allocates its reserve again, once
  the file system has twice the reserve free.

A store that went bad at rest. At open, before anything is written, the file is checked on a
read-only connection (which never checkpoints, so the evidence is not changed): `PRAGMA
quick_check` must say ok, and the committed state must not have gone backwards. The second check
needs a witness outside the file: `PATH-committed` holds the epoch and counters of the last
committed append (overwritten in place after each commit, without fsync: it is never ahead of
what SQLite made durable, and a crash leaves the page cache written). A file whose counters are
behind it lost committed transactions (its `-wal` was removed after a crash, or its frames were
damaged): sequence numbers would be reused. A bad file is moved aside with its `-wal` and `-shm`
to `PATH.corrupt-<UTC time>`, kept, and a new epoch begins whose first batch declares the old
epoch's end (`previous_epoch`: its id and last committed seq, from the witness or the old file);
a missing file with a witness left is declared the same way. A healthy file, one after a crash
with its `-wal` present included, is never touched.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple, Protocol, TypeVar

import aiosqlite

from edge_agent.audit import audit
from edge_agent.errors import StoreError
from edge_agent.seal.ack import contains
from edge_agent.seal.envelope import RETENTION

log = logging.getLogger(__name__)

T = TypeVar("T")

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS batches (
    id INTEGER PRIMARY KEY, first_seq INTEGER NOT NULL, last_seq INTEGER NOT NULL,
    readings INTEGER NOT NULL, bytes INTEGER NOT NULL, sealed_ns INTEGER NOT NULL,
    data BLOB NOT NULL, sent_ns INTEGER, catalogue BLOB);
CREATE TABLE IF NOT EXISTS notices (
    id INTEGER PRIMARY KEY, readings INTEGER NOT NULL, bytes INTEGER NOT NULL,
    sealed_ns INTEGER NOT NULL, data BLOB NOT NULL, sent_ns INTEGER);
CREATE TABLE IF NOT EXISTS pending_evictions (
    first_seq INTEGER PRIMARY KEY, last_seq INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS eviction_reasons (
    first_seq INTEGER PRIMARY KEY, reason TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS catalogues (digest BLOB PRIMARY KEY, payload BLOB NOT NULL)
    WITHOUT ROWID;
"""

INDEXES = """
CREATE INDEX IF NOT EXISTS batches_unsent ON batches (id) WHERE sent_ns IS NULL;
CREATE INDEX IF NOT EXISTS batches_sent ON batches (sent_ns) WHERE sent_ns IS NOT NULL;
CREATE INDEX IF NOT EXISTS batches_catalogue ON batches (catalogue) WHERE catalogue IS NOT NULL;
"""
"""For `take_unacked`: batches never sent, and the oldest sent, without a scan of the buffer.
For the deletion of unreferenced catalogues: whether a batch still references one, without
reading the batches (`catalogue` follows `data`: reading it walks a batch's overflow pages)."""
NEWEST_CATALOGUE = "catalogue"
"""The `meta` key of the newest catalogue's digest (invariant 6)."""
ACK_WALK = 512
"""Batches read at a time while a consumer acknowledgement is applied."""

RESERVE_BYTES = 512 * 1024
"""Room kept in `PATH-reserve` for the first checkpoint and eviction on a full disk."""
WAL_CHECKPOINT_BYTES = 256 * 1024
"""The WAL is checkpointed past this (SQLite's default, 1000 pages, is 4 MiB)."""
MAX_TRANSACTION_BYTES = 192 * 1024
"""Batches per append, in bytes; one batch alone may exceed it. Kept by the batcher."""
EVICT_FRACTION = 0.1
"""Share of the batches evicted at a time when the disk itself is full."""
SPACE_CHECK_S = 1.0
"""While the disk is full: how often to look whether room came back."""
EVICTION_LOG_S = 10.0
"""Evictions in a row are logged once, then summed up at most this often."""
CORRUPTION = (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)
"""Primary result codes that mean the file's bytes are not a sound database."""


class CatalogueRow(Protocol):
    """A point catalogue as the store keeps it (`seal.catalogue.Catalogue` is one): its digest
    (16 bytes) and its message bytes."""

    @property
    def digest(self) -> bytes: ...

    @property
    def payload(self) -> bytes: ...


@dataclass(frozen=True)
class SealedBatch:
    """A batch ready to store: its signed bytes and the numbers it was sealed with.

    `declares` are the evicted ranges it declares; `ends_previous` says it carries the pending
    `previous_epoch`. Either makes it a declaration, kept in `notices`. `sealed_ns` is when it
    was sealed on the store's clock (`Store.now_ns`: the agent's age clock), not necessarily
    the `sealed` in its payload (the wall clock as read).
    """

    batch: int
    first_seq: int
    readings: int
    sealed_ns: int
    data: bytes
    declares: tuple[tuple[int, int], ...] = ()
    ends_previous: bool = False
    catalogue: CatalogueRow | None = None
    """The point catalogue the batch references (§4.12); None: self-contained."""


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
    resend: bool = False
    """end_to_end mode: PUBACKed before, and not acknowledged by a consumer since."""
    catalogue: bytes | None = None
    """The digest of the point catalogue the batch references (`Store.catalogue` gives its
    bytes); None: self-contained."""


@dataclass(frozen=True)
class Unacked:
    """Batches the broker acknowledged that no consumer has yet (end_to_end mode)."""

    batches: int
    readings: int
    oldest_sent_ns: int | None


@dataclass
class BufferStats:
    readings: int = 0
    bytes: int = 0
    batches: int = 0
    evicted_readings: int = 0


@dataclass(frozen=True)
class Quarantine:
    """A buffer file found bad at open and moved aside; shown in /status."""

    moved_to: str
    reason: str
    epoch: str | None
    last_seq: int | None
    at: float

    def to_json(self) -> dict[str, Any]:
        return {
            "moved_to": self.moved_to,
            "reason": self.reason,
            "epoch": self.epoch,
            "last_seq": self.last_seq,
            "at": self.at,
        }


@dataclass(frozen=True)
class CommittedMark:
    """The witness `PATH-committed`: the epoch and counters after the last committed append."""

    epoch: str
    next_batch: int
    next_seq: int

    def encode(self) -> bytes:
        """Always 75 bytes, so an overwrite in place never leaves a longer line's tail."""
        return f"{self.epoch[:32]:<32} {self.next_batch:020d} {self.next_seq:020d}\n".encode()

    @classmethod
    def decode(cls, data: bytes) -> CommittedMark | None:
        """None for anything but a well-formed line (a power cut can leave zeros)."""
        try:
            epoch, next_batch, next_seq = data.decode("ascii").split()
            return cls(epoch, int(next_batch), int(next_seq))
        except ValueError:
            return None


@dataclass
class _Evicted:
    """Batches one transaction evicted, for the statistics and one log line after commit."""

    readings: int = 0
    bytes: int = 0
    batches: int = 0
    ranges: list[tuple[int, int]] = field(default_factory=list)

    def add_all(self, other: _Evicted) -> None:
        self.readings += other.readings
        self.bytes += other.bytes
        self.batches += other.batches
        self.ranges.extend(other.ranges)

    def add(self, rows: Sequence[tuple[int, int, int, int, int]]) -> None:
        for _, first, last, readings, size in rows:
            self.readings += readings
            self.bytes += size
            self.batches += 1
            if readings > 0:
                self.ranges.append((first, last))


class Store:
    """Sealed batches on disk; one instance per file, used from one event loop."""

    def __init__(
        self,
        path: Path,
        *,
        max_bytes: int,
        max_age_s: float,
        now_ns: Callable[[], int] = time.time_ns,
    ) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.max_age_s = max_age_s
        self.now_ns = now_ns
        """The clock of the batches' `sealed_ns` here, in ns: the agent's age clock
        (`ClockWatch.age_ns`, which a step of the wall clock does not move), so that
        `max_age` and the oldest age in /status are true ages; the wall clock by default."""
        self.epoch = ""
        self.next_seq = 1
        self.next_batch = 1
        self.stats = BufferStats()
        self.quarantined: list[Quarantine] = []
        """Files moved aside by `open` (this process)."""
        self.disk_full = False
        """True from an SQLITE_FULL until the file system has room again ("tight" mode)."""
        self.failures: dict[str, str] = {}
        """The last error of each kind of operation, until that operation succeeds again."""
        self.reserve_path = Path(f"{path}-reserve")
        self.mark_path = Path(f"{path}-committed")
        self._mark_fd: int | None = None
        self._page_size = 4096
        self._next_space_check = 0.0
        self._next_eviction_log = 0.0
        self._unlogged_evictions = _Evicted()
        self._eviction_reason = ""
        self._db: aiosqlite.Connection | None = None
        self._lock = asyncio.Lock()
        self._meta: dict[str, Any] = {}

    async def open(self) -> None:
        """Open the buffer, or create it: check it first and quarantine it if it went bad.

        Raises StoreError, with the path and the cause, for anything that stops it opening
        (the worker thread is stopped first: a failed start must not hang the process).
        """
        try:
            await self._open()
        except BaseException as exc:
            await self._close_quietly()
            if isinstance(exc, StoreError):
                raise
            if isinstance(exc, sqlite3.Error | OSError | ValueError):
                raise StoreError(f"cannot open buffer {self.path}: {exc}") from exc
            raise

    async def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        mark = self._read_mark()
        previous: dict[str, Any] | None = None
        found = _size(self.path) > 0
        if found:
            previous = await self._check_or_quarantine(mark)
        elif _size(Path(f"{self.path}-wal")) > 0:
            # SQLite would replay it onto a new, empty file: pages of a database that is gone.
            previous = self._quarantine("a -wal file without its database file", mark, None)
        elif mark is not None:
            previous = _previous_epoch(
                mark.epoch, mark.next_seq - 1, "missing",
                f"{self.path} was missing; its witness {self.mark_path.name} remained",
            )  # fmt: skip
            log.error(
                "Buffer missing, its last committed state known path=%s epoch=%s last_seq=%d",
                self.path, mark.epoch, mark.next_seq - 1,
            )  # fmt: skip
        if _free_bytes(self.path) < RESERVE_BYTES and self.reserve_path.exists():
            # Opening needs room too (the -shm and -wal files): start tight, on the reserve.
            self.reserve_path.unlink()
            self.disk_full = True
            log.error(
                "Disk full at start: using the reserve, evicting the oldest readings to make "
                "room path=%s free=%d",
                self.path, _free_bytes(self.path),
            )  # fmt: skip
        self._db = await aiosqlite.connect(self.path, isolation_level=None)
        db = self._db
        await db.execute("PRAGMA journal_mode=WAL")
        await db.execute("PRAGMA synchronous=FULL")
        ((self._page_size,),) = await db.execute_fetchall("PRAGMA page_size")
        pages = max(1, WAL_CHECKPOINT_BYTES // self._page_size)
        await db.execute(f"PRAGMA wal_autocheckpoint={pages}")
        await db.executescript(SCHEMA)
        await self._migrate(db)
        await db.execute("BEGIN IMMEDIATE")
        rows = await db.execute_fetchall("SELECT key, value FROM meta")
        meta: dict[str, Any] = {row[0]: row[1] for row in rows}
        if "epoch" not in meta:
            meta = {"epoch": uuid.uuid4().hex, "next_seq": 1, "next_batch": 1}
            if previous is not None:
                meta["previous_epoch"] = json.dumps(previous)
            await db.executemany("INSERT INTO meta VALUES (?, ?)", meta.items())
            log.info("Created buffer path=%s epoch=%s", self.path, meta["epoch"])
        await db.execute("COMMIT")
        self.epoch = str(meta["epoch"])
        self.next_seq, self.next_batch = int(meta["next_seq"]), int(meta["next_batch"])
        self._meta = meta
        if mark is not None and mark.epoch != self.epoch and found and previous is None:
            await self._replaced(mark, meta)
        await self._load_stats()
        await self._tidy_catalogues()
        self._open_mark()
        self._write_mark(durable=True)
        if not self.disk_full and not self._allocate_reserve():
            self.disk_full = True
            log.error(
                "Disk full at start: no room for the buffer's reserve path=%s free=%d",
                self.reserve_path, _free_bytes(self.path),
            )  # fmt: skip

    async def _migrate(self, db: aiosqlite.Connection) -> None:
        """Bring a file of an older version up to SCHEMA: `sent_ns` (NULL: not sent),
        `batches.catalogue` (NULL: self-contained; the `catalogues` table itself comes with
        SCHEMA) and the indexes on them, in one transaction; a file already current is left as
        it is."""
        missing: list[tuple[str, str, str]] = []
        for table in _TABLES.values():
            columns = {row[1] for row in await db.execute_fetchall(f"PRAGMA table_info({table})")}
            if "sent_ns" not in columns:
                missing.append((table, "sent_ns", "INTEGER"))
            if table == "batches" and "catalogue" not in columns:
                missing.append((table, "catalogue", "BLOB"))
        await db.execute("BEGIN IMMEDIATE")
        try:
            for table, column, kind in missing:
                await db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
            for statement in filter(str.strip, INDEXES.split(";")):
                await db.execute(statement)
            await db.execute("COMMIT")
        except BaseException:
            await self._rollback()
            raise
        if missing:
            log.info(
                "Buffer upgraded path=%s added=%s", self.path,
                ",".join(f"{table}.{column}" for table, column, _ in missing),
            )  # fmt: skip

    async def _tidy_catalogues(self) -> None:
        """At open: delete the catalogues no batch references but the newest (invariant 6).

        Those are normally deleted with their last batch; this catches a file whose batches
        went otherwise. Best effort: on a full disk the open must not fail for it (the next
        acknowledgement or eviction tries again).
        """
        db = self.db
        try:
            await db.execute("BEGIN IMMEDIATE")
            dropped = await _drop_unreferenced_catalogues(db)
            await db.execute("COMMIT")
        except sqlite3.Error as exc:
            await self._rollback()
            log.warning("Could not delete unreferenced catalogues path=%s error=%s",
                        self.path, exc)  # fmt: skip
            return
        if dropped:
            log.info("Deleted unreferenced catalogues path=%s count=%d", self.path, dropped)

    async def _replaced(self, mark: CommittedMark, meta: dict[str, Any]) -> None:
        """The file holds another epoch than the witness: declare the witness's epoch ended."""
        pending = json.loads(meta["previous_epoch"]) if "previous_epoch" in meta else None
        if pending is not None and pending.get("epoch") == mark.epoch:
            return  # created by a quarantine whose witness was not rewritten yet
        record = _previous_epoch(
            mark.epoch, mark.next_seq - 1, "replaced",
            f"{self.path} holds epoch {self.epoch}, not the last committed one",
        )  # fmt: skip
        log.error(
            "Buffer replaced by another file path=%s epoch=%s previous_epoch=%s last_seq=%d",
            self.path, self.epoch, mark.epoch, mark.next_seq - 1,
        )  # fmt: skip
        await self.db.execute(
            "INSERT OR REPLACE INTO meta VALUES ('previous_epoch', ?)", (json.dumps(record),)
        )

    async def _check_or_quarantine(self, mark: CommittedMark | None) -> dict[str, Any] | None:
        """Check the existing file; when it is bad, move it aside and return what ended."""
        check = _Interruptible()
        try:
            problem, meta = await asyncio.to_thread(_check_file, self.path, check)
        except asyncio.CancelledError:
            check.interrupt()  # else the process waits for the whole check to exit
            raise
        if problem is None and meta is not None and mark is not None:
            problem = _went_backwards(meta, mark)
        if problem is None:
            return None
        return self._quarantine(problem, mark, meta)

    def _quarantine(
        self, problem: str, mark: CommittedMark | None, meta: dict[str, Any] | None
    ) -> dict[str, Any]:
        """Move the bad file aside, record it, and return the end of its epoch to declare."""
        epoch, last_seq = None, None
        if mark is not None:
            epoch, last_seq = mark.epoch, mark.next_seq - 1
        if meta is not None and "epoch" in meta and (epoch is None or meta["epoch"] == epoch):
            epoch = str(meta["epoch"])
            last_seq = max(last_seq or 0, int(meta.get("next_seq", 1)) - 1)
        try:
            moved_to = self._move_aside()
        except StoreError as exc:
            audit("store", "failure", action="quarantined", file=str(self.path), epoch=epoch,
                  reason=problem, error=str(exc.__cause__ or exc))  # fmt: skip
            raise
        audit("store", "success", action="quarantined", moved_to=str(moved_to), epoch=epoch,
              last_seq=last_seq, reason=problem)  # fmt: skip
        self.quarantined.append(Quarantine(str(moved_to), problem, epoch, last_seq, time.time()))
        log.error(
            "Quarantined a bad buffer, starting a new epoch path=%s moved_to=%s epoch=%s "
            "last_seq=%s error=%s",
            self.path, moved_to, epoch, last_seq, problem,
        )  # fmt: skip
        return _previous_epoch(epoch, last_seq, "quarantined", f"{problem}; kept as {moved_to}")

    def _move_aside(self) -> Path:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        target = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        n = 1
        while target.exists():
            target = self.path.with_name(f"{self.path.name}.corrupt-{stamp}-{n}")
            n += 1
        try:
            for suffix in ("-wal", "-shm", ""):  # the file last: a crash keeps the pair together
                source = Path(f"{self.path}{suffix}")
                if source.exists():
                    source.replace(Path(f"{target}{suffix}"))
            _fsync_directory(self.path.parent)
        except OSError as exc:
            raise StoreError(f"cannot move the bad buffer {self.path} aside: {exc}") from exc
        return target

    async def close(self) -> None:
        async with self._lock:
            self._log_evictions(now=True)
            if self._db is not None:
                await self._db.close()
                self._db = None
                if self.disk_full:
                    # Closing deleted the -wal and -shm files: keep their room for the next
                    # start, which needs it to open at all.
                    self._allocate_reserve(min(RESERVE_BYTES, _free_bytes(self.path)))
            self._close_mark()

    async def _close_quietly(self) -> None:
        """After a failed open: stop the connection's thread whatever state it is in."""
        if self._db is not None:
            db, self._db = self._db, None
            with contextlib.suppress(Exception):
                await db.close()
        self._close_mark()

    @property
    def db(self) -> aiosqlite.Connection:
        if self._db is None:
            raise StoreError("store is not open")
        return self._db

    def problems(self) -> list[str]:
        """What is wrong with the buffer now, for health: a full disk, failing operations.

        The disk counts as full from an SQLITE_FULL until there is room again, and also while
        its file system has less than RESERVE_BYTES free: the next write may be the one.
        """
        found = []
        free = _free_bytes(self.path)
        if self.disk_full:
            found.append(
                f"buffer disk full ({free} bytes free): the buffer keeps its size and evicts "
                "its oldest readings (declared) to take new ones"
            )
        elif free < RESERVE_BYTES:
            found.append(f"buffer disk nearly full ({free} bytes free)")
        found.extend(f"buffer cannot {what}: {error}" for what, error in self.failures.items())
        return found

    def _read_mark(self) -> CommittedMark | None:
        try:
            data = self.mark_path.read_bytes()
        except FileNotFoundError:
            return None
        mark = CommittedMark.decode(data)
        if mark is None:
            log.warning("Ignoring an unreadable witness path=%s", self.mark_path)
        return mark

    def _open_mark(self) -> None:
        self._mark_fd = os.open(self.mark_path, os.O_RDWR | os.O_CREAT, 0o600)

    def _close_mark(self) -> None:
        if self._mark_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._mark_fd)
            self._mark_fd = None

    def _write_mark(self, *, durable: bool = False) -> None:
        """Record the committed counters: called after the commit, so it is never ahead."""
        if self._mark_fd is None:
            return
        data = CommittedMark(self.epoch, self.next_batch, self.next_seq).encode()
        try:
            os.pwrite(self._mark_fd, data, 0)
            if durable:
                os.ftruncate(self._mark_fd, len(data))
                os.fsync(self._mark_fd)
        except OSError as exc:  # the file's one block exists: only its creation can fail
            log.warning("Could not write the witness path=%s error=%s", self.mark_path, exc)

    def _allocate_reserve(self, size: int = RESERVE_BYTES) -> bool:
        """Make sure the reserve holds `size` bytes; False when the disk has no room for it.

        What could be allocated stays: a part of the reserve is better than none.
        """
        if size <= 0:
            return False
        with contextlib.suppress(FileNotFoundError):
            if self.reserve_path.stat().st_size >= size:
                return True
        try:
            fd = os.open(self.reserve_path, os.O_WRONLY | os.O_CREAT, 0o600)
            try:
                os.posix_fallocate(fd, 0, size)
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError:
            return False
        return True

    async def _enter_tight_mode(self, error: sqlite3.Error) -> None:
        """SQLITE_FULL: free the reserve and checkpoint, so that the WAL can be reused."""
        if not self.disk_full:
            self.disk_full = True
            log.error(
                "Disk full: using the reserve, evicting the oldest readings to make room "
                "path=%s free=%d error=%s",
                self.path, _free_bytes(self.path), error,
            )  # fmt: skip
        with contextlib.suppress(FileNotFoundError):
            self.reserve_path.unlink()
        with contextlib.suppress(sqlite3.Error):
            await self.db.execute("PRAGMA wal_checkpoint(PASSIVE)")
        self._next_space_check = time.monotonic() + SPACE_CHECK_S

    def _check_space(self) -> None:
        """While tight: once the file system has twice the reserve free, allocate it again."""
        now = time.monotonic()
        if not self.disk_full or now < self._next_space_check:
            return
        self._next_space_check = now + SPACE_CHECK_S
        free = _free_bytes(self.path)
        if free >= 2 * RESERVE_BYTES and self._allocate_reserve():
            self._log_evictions(now=True)
            self.disk_full = False
            log.info("Disk space available again path=%s free=%d", self.path, free)

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
        """One transaction; on a first SQLITE_FULL, enter tight mode and try once more."""
        db = self.db
        async with self._lock:
            for attempt in (1, 2):
                try:
                    await db.execute("BEGIN IMMEDIATE")
                    result = await body(db)
                    await db.execute("COMMIT")
                except sqlite3.Error as exc:
                    await self._rollback()
                    full = getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL
                    if full and attempt == 1:
                        await self._enter_tight_mode(exc)
                        continue
                    self.failures[what] = str(exc)
                    raise StoreError(
                        f"cannot {what} in {self.path}: {exc}", disk_full=full
                    ) from exc
                except BaseException:
                    await self._rollback()
                    raise
                if self.failures.pop(what, None) is not None:
                    log.info("Buffer can %s again path=%s", what, self.path)
                on_commit(result)
                self._log_evictions()
                self._check_space()
                return result
            raise AssertionError("unreachable")  # pragma: no cover

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

    async def previous_epoch(self) -> dict[str, Any] | None:
        """How the previous epoch ended, until a sealed batch has carried it (invariant 4).

        A map of docs/contract.md §4 `previous_epoch`: `epoch` (text or None), `last_seq` (int
        or None), `ended` ("quarantined", "missing" or "replaced"), `detail` (text).
        """
        rows = await self._read(
            "read the previous epoch", "SELECT value FROM meta WHERE key = 'previous_epoch'"
        )
        if not rows:
            return None
        record: dict[str, Any] = json.loads(rows[0][0])
        return record

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
            await _drop_unreferenced_catalogues(db)
            return first, last, readings, size

        def on_commit(row: tuple[int, int, int, int] | None) -> None:
            if row is not None:  # no range: the caller logs and audits this eviction itself
                self._forget(_Evicted(readings=row[2], bytes=row[3], batches=1), "Undeliverable")

        row = await self._atomically("evict an undeliverable batch", body, on_commit)
        return None if row is None else row[:3]

    async def append(self, batches: Sequence[SealedBatch]) -> int:
        """Store sealed batches, advance the counters and apply retention, in one transaction.

        The caller numbered them from `next_batch` and `next_seq`; batches that declare evictions
        (or the previous epoch's end) are kept as declarations, and what they declare stops
        being pending. While the disk is full, the oldest batches are first evicted to make room.
        Returns the number of readings evicted (now pending declaration).
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
        adding = sum(len(b.data) for b in batches)

        async def body(_: aiosqlite.Connection) -> _Evicted:
            evicted = _Evicted()
            if self.disk_full:
                await self._make_room(batches, evicted)
            await self._insert(batches, expected_batch, expected_seq)
            await self._apply_retention(adding, evicted)
            if evicted.batches:
                await _drop_unreferenced_catalogues(self.db)
            return evicted

        def on_commit(evicted: _Evicted) -> None:
            self.next_batch, self.next_seq = expected_batch, expected_seq
            self._write_mark()
            for b in batches:
                self.stats.batches += 1
                self.stats.readings += b.readings
                self.stats.bytes += len(b.data)
            self._forget(evicted, "Buffer full or expired" if not self.disk_full else "Disk full")

        evicted = await self._atomically("write batches", body, on_commit)
        return evicted.readings

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
                None if b.catalogue is None else b.catalogue.digest,
            )
            for b in batches
            if not (b.declares or b.ends_previous)
        ]
        catalogues = {b.catalogue.digest: b.catalogue for b in batches if b.catalogue is not None}
        if catalogues:  # before the batches that reference them (invariant 6)
            await db.executemany(
                "INSERT OR IGNORE INTO catalogues (digest, payload) VALUES (?, ?)",
                [(digest, c.payload) for digest, c in catalogues.items()],
            )
            newest = [b.catalogue.digest for b in batches if b.catalogue is not None][-1]
            await db.execute(
                "INSERT OR REPLACE INTO meta VALUES (?, ?)", (NEWEST_CATALOGUE, newest)
            )
        if plain:
            await db.executemany(
                "INSERT INTO batches"
                " (id, first_seq, last_seq, readings, bytes, sealed_ns, data, catalogue)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                plain,
            )
        for b in batches:
            if b.declares or b.ends_previous:
                await db.execute(
                    "INSERT INTO notices (id, readings, bytes, sealed_ns, data)"
                    " VALUES (?, ?, ?, ?, ?)",
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
            if b.ends_previous:
                await db.execute("DELETE FROM meta WHERE key = 'previous_epoch'")
        await db.executemany(
            "UPDATE meta SET value = ? WHERE key = ?",
            [(next_seq, "next_seq"), (next_batch, "next_batch")],
        )

    async def _make_room(self, batches: Sequence[SealedBatch], evicted: _Evicted) -> None:
        """Tight mode: evict until SQLite's free pages hold `batches`, so the file stays put.

        Beyond that, EVICT_FRACTION of the buffered bytes go too (as when the disk filled up
        before), so that a full disk costs a declaration now and then, not one per append.
        """
        usable = self._page_size - 4  # an overflow page's payload
        sizes = [len(b.data) for b in batches]
        sizes.extend({c.digest: len(c.payload) for b in batches if (c := b.catalogue)}.values())
        need = sum(-(-size // usable) + 1 for size in sizes) + 8  # + b-tree pages, meta
        ((free,),) = await self.db.execute_fetchall("PRAGMA freelist_count")
        if free >= need:
            return
        budget = [
            (int(need) - int(free)) * self._page_size + int(self.stats.bytes * EVICT_FRACTION)
        ]

        def take(size: int, _: int) -> bool:
            budget[0] -= size
            return budget[0] + size > 0

        await self._evict_oldest_while(take, evicted)

    async def _apply_retention(self, adding: int, evicted: _Evicted) -> None:
        """Evict the oldest batches past max_bytes or max_age (beyond what already went)."""
        excess = self.stats.bytes - evicted.bytes + adding - self.max_bytes
        cutoff_ns = self.now_ns() - int(self.max_age_s * 1e9)
        budget = [excess]

        def expired(size: int, sealed_ns: int) -> bool:
            if budget[0] <= 0 and sealed_ns >= cutoff_ns:
                return False
            budget[0] -= size
            return True

        await self._evict_oldest_while(expired, evicted)

    async def _evict_oldest_while(
        self, take: Callable[[int, int], bool], evicted: _Evicted
    ) -> None:
        """Evict batches oldest first while `take(bytes, sealed_ns)` says so."""
        while True:
            rows = list(
                await self.db.execute_fetchall(
                    "SELECT id, first_seq, last_seq, readings, bytes, sealed_ns FROM batches"
                    " ORDER BY id LIMIT 64"
                )
            )
            chosen: list[tuple[int, int, int, int, int]] = []
            for row_id, first, last, readings, size, sealed_ns in rows:
                if not take(size, sealed_ns):
                    break
                chosen.append((row_id, first, last, readings, size))
            if not chosen:
                return
            await self._evict(chosen)
            evicted.add(chosen)
            if len(chosen) < len(rows):
                return

    async def _evict(self, rows: list[tuple[int, int, int, int, int]]) -> None:
        db = self.db
        await db.executemany("DELETE FROM batches WHERE id = ?", [(r[0],) for r in rows])
        ranges = [(first, last) for _, first, last, readings, _ in rows if readings > 0]
        await db.executemany("INSERT INTO pending_evictions VALUES (?, ?)", ranges)

    def _forget(self, evicted: _Evicted, why: str) -> None:
        """After the commit: count what was evicted and say so (a rollback says nothing)."""
        self.stats.readings -= evicted.readings
        self.stats.bytes -= evicted.bytes
        self.stats.batches -= evicted.batches
        self.stats.evicted_readings += evicted.readings
        if evicted.ranges:
            self._unlogged_evictions.add_all(evicted)
            self._eviction_reason = why
        self._log_evictions()

    def _log_evictions(self, *, now: bool = False) -> None:
        """One line for an eviction; while they follow each other (a full disk evicts at almost
        every append), one line per EVICTION_LOG_S sums them up. `now` flushes what is left."""
        unlogged = self._unlogged_evictions
        if not unlogged.ranges or (not now and time.monotonic() < self._next_eviction_log):
            return
        self._next_eviction_log = time.monotonic() + EVICTION_LOG_S
        log.warning(
            "%s: evicted unsent readings seq=%d..%d readings=%d batches=%d",
            self._eviction_reason, unlogged.ranges[0][0], unlogged.ranges[-1][1],
            unlogged.readings, unlogged.batches,
        )  # fmt: skip
        self._unlogged_evictions = _Evicted()

    async def evict_oldest(self, fraction: float = EVICT_FRACTION) -> int:
        """Make room when the disk itself is full: evict the oldest share of batches.

        Returns the number of readings evicted (now pending declaration); 0 when only
        declarations are left, which are never evicted.
        """
        count = max(1, int(self.stats.batches * fraction))

        async def body(db: aiosqlite.Connection) -> _Evicted:
            rows = await db.execute_fetchall(
                "SELECT id, first_seq, last_seq, readings, bytes FROM batches ORDER BY id LIMIT ?",
                (count,),
            )
            chosen = [(int(r[0]), int(r[1]), int(r[2]), int(r[3]), int(r[4])) for r in rows]
            evicted = _Evicted()
            if chosen:
                await self._evict(chosen)
                evicted.add(chosen)
                await _drop_unreferenced_catalogues(db)
            return evicted

        evicted = await self._atomically(
            "evict batches", body, lambda done: self._forget(done, "Disk full")
        )
        return evicted.readings

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
                StoredBatch(
                    BatchKey("readings", row_id), readings, sealed_ns, data, catalogue=catalogue
                )
                for row_id, readings, sealed_ns, data, catalogue in await self._read(
                    "read batches",
                    "SELECT id, readings, sealed_ns, data, catalogue FROM batches WHERE id > ?"
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
            if removed:
                await _drop_unreferenced_catalogues(db)
            return removed

        def on_commit(removed: list[tuple[int, int]]) -> None:
            self.stats.readings -= sum(r for r, _ in removed)
            self.stats.bytes -= sum(b for _, b in removed)
            self.stats.batches -= len(removed)

        await self._atomically("delete acknowledged batches", body, on_commit)

    async def mark_sent(self, keys: Sequence[BatchKey], sent_ns: int) -> None:
        """end_to_end mode: the broker acknowledged these batches at `sent_ns` (ns on the store's
        clock, `now_ns`, as `sealed_ns`); keep them until a consumer does. Unknown keys (deleted
        or evicted since) are ignored."""
        if not keys:
            return

        async def body(db: aiosqlite.Connection) -> None:
            for kind, table in _TABLES.items():
                ids = [(sent_ns, key.id) for key in keys if key.kind == kind]
                await db.executemany(
                    f"UPDATE {table} SET sent_ns = ? WHERE id = ?",  # noqa: S608  # nosec B608  # table names are literals
                    ids,
                )

        await self._atomically("mark batches sent", body, lambda _: None)

    async def take_unacked(
        self,
        limit: int,
        due_ns: int,
        exclude: Collection[BatchKey] = (),
        max_due: int | None = None,
        after: int = 0,
    ) -> list[StoredBatch]:
        """end_to_end mode: up to `limit` batches to send, declarations first, then batches of
        readings past the id `after`, oldest first; each never sent, or sent at or before
        `due_ns` (the store's clock, `now_ns`) and not acknowledged by a consumer since
        (`resend` True; at most `max_due` of those, None: no limit). Batches in `exclude` (in
        flight) are left out."""
        skip = {kind: [k.id for k in exclude if k.kind == kind] for kind in _TABLES}
        due_left = limit if max_due is None else max(0, max_due)
        taken: list[StoredBatch] = []
        for kind, table in _TABLES.items():
            room = limit - len(taken)
            if room <= 0:
                break
            marks = ",".join("?" * len(skip[kind]))
            catalogue = "catalogue" if table == "batches" else "NULL"
            columns = f"SELECT id, readings, sealed_ns, data, {catalogue} FROM {table} WHERE"  # noqa: S608  # nosec B608  # literals only
            tail = f" AND id > ? AND id NOT IN ({marks}) ORDER BY id LIMIT ?"
            lower = after if kind == "readings" and after > 0 else -1
            fresh = await self._read(
                "read batches to send",
                f"{columns} sent_ns IS NULL{tail}",
                [lower, *skip[kind], room],
            )
            due = []
            if due_left > 0:
                due = await self._read(
                    "read batches to send again",
                    f"{columns} sent_ns IS NOT NULL AND sent_ns <= ?{tail}",
                    [due_ns, lower, *skip[kind], min(room, due_left)],
                )
            found = sorted(
                [(row, False) for row in fresh] + [(row, True) for row in due],
                key=lambda item: item[0][0],
            )[:room]
            due_left -= sum(1 for _, again in found if again)
            taken.extend(
                StoredBatch(
                    BatchKey(kind, row_id),
                    readings,
                    sealed_ns,
                    data,
                    resend=again,
                    catalogue=catalogue,
                )
                for (row_id, readings, sealed_ns, data, catalogue), again in found
            )
        return taken

    async def consumer_ack(
        self, seqs: Sequence[tuple[int, int]], batches: Sequence[tuple[int, int]]
    ) -> list[BatchKey]:
        """Delete every batch a consumer's verified acknowledgement covers (§4.10): its batch
        number in `batches`, or, for a batch of readings, first_seq..last_seq whole in `seqs`
        (ranges sorted, disjoint, not adjacent). Returns the keys deleted, oldest first.

        Sent or not: a consumer that holds a batch never needs it again (an agent restarted
        learns so from the retained acknowledgement). Declarations are matched by batch number
        only. The walk reads batches in id order and stops past the highest seq and batch
        acknowledged, so an acknowledgement costs what it covers, not the buffer's size.
        """
        top_seq = seqs[-1][1] if seqs else -1
        top_batch = batches[-1][1] if batches else -1
        seq_ranges, batch_ranges = tuple(seqs), tuple(batches)
        if top_seq < 0 and top_batch < 0:
            return []

        async def body(db: aiosqlite.Connection) -> list[tuple[BatchKey, int, int]]:
            removed: list[tuple[BatchKey, int, int]] = []
            for row_id, readings, size in await db.execute_fetchall(
                "SELECT id, readings, bytes FROM notices WHERE id <= ? ORDER BY id", (top_batch,)
            ):
                if contains(batch_ranges, row_id, row_id):
                    removed.append((BatchKey("declaration", row_id), readings, size))
            after = -1
            while True:
                rows = list(
                    await db.execute_fetchall(
                        "SELECT id, first_seq, last_seq, readings, bytes FROM batches"
                        " WHERE id > ? ORDER BY id LIMIT ?",
                        (after, ACK_WALK),
                    )
                )
                for row_id, first, last, readings, size in rows:
                    if contains(batch_ranges, row_id, row_id) or (
                        readings > 0 and contains(seq_ranges, first, last)
                    ):
                        removed.append((BatchKey("readings", row_id), readings, size))
                if len(rows) < ACK_WALK:
                    break
                after, first_seq = rows[-1][0], rows[-1][1]
                if after > top_batch and first_seq > top_seq:
                    break
            for kind, table in _TABLES.items():
                ids = [(key.id,) for key, _, _ in removed if key.kind == kind]
                await db.executemany(f"DELETE FROM {table} WHERE id = ?", ids)  # noqa: S608  # nosec B608  # table names are literals
            if removed:
                await _drop_unreferenced_catalogues(db)
            return removed

        def on_commit(removed: list[tuple[BatchKey, int, int]]) -> None:
            self.stats.readings -= sum(r for _, r, _ in removed)
            self.stats.bytes -= sum(b for _, _, b in removed)
            self.stats.batches -= len(removed)

        removed = await self._atomically("delete batches a consumer holds", body, on_commit)
        return [key for key, _, _ in removed]

    async def unacked(self) -> Unacked:
        """The batches marked sent and not yet acknowledged by a consumer, for health."""
        rows = await self._read(
            "count unacknowledged batches",
            "SELECT count(*), coalesce(sum(readings), 0), min(sent_ns) FROM ("
            " SELECT readings, sent_ns FROM batches WHERE sent_ns IS NOT NULL"
            " UNION ALL SELECT readings, sent_ns FROM notices WHERE sent_ns IS NOT NULL)",
        )
        batches, readings, oldest = rows[0]
        return Unacked(int(batches), int(readings), None if oldest is None else int(oldest))

    async def newest_batch_id(self, sealed_before_ns: int) -> int:
        """The id of the newest buffered batch of readings sealed before `sealed_before_ns`
        (ns on the store's clock, `now_ns`, as `sealed_ns`); 0 when there is none. Walks back
        from the newest: costs the batches after it."""
        rows = await self._read(
            "read the newest batch",
            "SELECT id FROM batches WHERE sealed_ns < ? ORDER BY id DESC LIMIT 1",
            (sealed_before_ns,),
        )
        return int(rows[0][0]) if rows else 0

    async def oldest_sealed_ns(self) -> int | None:
        rows = await self._read(
            "read the oldest batch",
            "SELECT (SELECT sealed_ns FROM notices ORDER BY id LIMIT 1),"
            " (SELECT sealed_ns FROM batches ORDER BY id LIMIT 1)",
        )
        found = [v for v in rows[0] if v is not None] if rows else []
        return min(found) if found else None

    async def catalogue(self, digest: bytes) -> bytes | None:
        """The message bytes of the point catalogue `digest` (16 bytes), for the forwarder to
        publish before the batches that reference it; None when the buffer does not hold it
        (never for the digest of a buffered batch: invariant 6)."""
        rows = await self._read(
            "read a catalogue", "SELECT payload FROM catalogues WHERE digest = ?", (digest,)
        )
        return bytes(rows[0][0]) if rows else None

    async def newest_catalogue(self) -> tuple[bytes, bytes] | None:
        """The newest point catalogue as (digest, message bytes), for the encoder to resume
        from after a restart (invariant 6); None when no batch ever referenced one."""
        rows = await self._read(
            "read the newest catalogue",
            "SELECT c.digest, c.payload FROM meta m JOIN catalogues c ON c.digest = m.value"
            " WHERE m.key = ?",
            (NEWEST_CATALOGUE,),
        )
        return (bytes(rows[0][0]), bytes(rows[0][1])) if rows else None

    async def catalogue_count(self) -> int:
        """How many point catalogues the buffer holds (for tests and /status)."""
        rows = await self._read("count catalogues", "SELECT count(*) FROM catalogues")
        return int(rows[0][0])


class _Interruptible:
    """The connection of a check in a worker thread, which another thread may interrupt,
    before the connection exists too.

    `quick_check` reads the whole file (13 s at 512 MB from a cold cache): a stop during
    start-up cancels the open, and asyncio.run waits for its worker threads before the process
    exits. An interrupted check says nothing (an error that is not corruption); the open that
    asked for it is cancelled anyway. SQLite's interrupt is a no-op while no statement runs
    (while the check's statement is prepared, say: a cold schema read), so the connection's
    progress handler also stops a statement that starts after it.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None
        self._interrupted = False

    def attach(self, db: sqlite3.Connection | None) -> bool:
        """Make `db` the one to interrupt (None: none any more); False when interrupted.
        In the thread that uses `db` (it sets its progress handler)."""
        if db is not None:
            db.set_progress_handler(self._stop_now, 1)
        with self._lock:
            self._db = db
            return not self._interrupted

    def _stop_now(self) -> int:
        return 1 if self._interrupted else 0

    def interrupt(self) -> None:
        with self._lock:
            self._interrupted = True
            if self._db is not None:
                self._db.interrupt()


def _check_file(
    path: Path, check: _Interruptible | None = None
) -> tuple[str | None, dict[str, Any] | None]:
    """Check a buffer file: (what is wrong or None, its meta table or None if unreadable).

    Runs on a read-only connection of its own, in a worker thread: a read-only connection never
    checkpoints, so a bad file and its `-wal` are kept exactly as found. An error that does not
    say the bytes are bad (the file cannot be opened, is locked) is left to the real open, and
    so is a check `check` interrupted: (None, None).
    """
    check = check or _Interruptible()
    try:
        db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=1.0)
    except sqlite3.Error:
        return None, None
    if not check.attach(db):
        db.close()
        return None, None
    try:
        rows = db.execute("PRAGMA quick_check").fetchall()
        if rows != [("ok",)]:
            return "quick_check: " + "; ".join(str(row[0]) for row in rows[:3]), _meta(db)
        if not db.execute("SELECT 1 FROM sqlite_master WHERE name = 'meta'").fetchall():
            return None, {}
        return None, _meta(db)
    except sqlite3.Error as exc:
        code = getattr(exc, "sqlite_errorcode", 0) & 0xFF
        return (str(exc), _meta(db)) if code in CORRUPTION else (None, None)
    finally:
        check.attach(None)  # never interrupted once closed
        db.close()


def _meta(db: sqlite3.Connection) -> dict[str, Any] | None:
    """The meta table of a file that may be damaged elsewhere; None when it cannot be read."""
    try:
        return {row[0]: row[1] for row in db.execute("SELECT key, value FROM meta")}
    except sqlite3.Error:
        return None


async def _drop_unreferenced_catalogues(db: aiosqlite.Connection) -> int:
    """Delete the catalogues no batch references, but the newest (invariant 6), inside the
    caller's transaction; returns how many. One index probe per catalogue (`batches_catalogue`):
    a buffer holds one or two catalogues, not one per batch."""
    rows = await db.execute_fetchall(
        "DELETE FROM catalogues WHERE digest IS NOT (SELECT value FROM meta WHERE key = ?)"
        " AND NOT EXISTS (SELECT 1 FROM batches b WHERE b.catalogue = catalogues.digest)"
        " RETURNING digest",
        (NEWEST_CATALOGUE,),
    )
    return len(list(rows))


def _went_backwards(meta: dict[str, Any], mark: CommittedMark) -> str | None:
    """Why the file is behind the witness of its last commit, or None when it is not."""
    if "epoch" not in meta:
        return (
            f"the file holds no epoch, but epoch {mark.epoch} was committed up to seq "
            f"{mark.next_seq - 1}: committed transactions were lost (a removed -wal file?)"
        )
    if str(meta["epoch"]) != mark.epoch:
        return None  # another file altogether: see Store._replaced
    next_batch, next_seq = int(meta.get("next_batch", 1)), int(meta.get("next_seq", 1))
    if next_batch >= mark.next_batch and next_seq >= mark.next_seq:
        return None
    return (
        f"committed state went backwards: the file ends at batch {next_batch - 1} seq "
        f"{next_seq - 1}, but batch {mark.next_batch - 1} seq {mark.next_seq - 1} was committed "
        "(a removed or damaged -wal file?)"
    )


def _previous_epoch(
    epoch: str | None, last_seq: int | None, ended: str, detail: str
) -> dict[str, Any]:
    """The `previous_epoch` map of docs/contract.md §4."""
    return {"epoch": epoch, "last_seq": last_seq, "ended": ended, "detail": detail}


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _free_bytes(path: Path) -> int:
    """Bytes an unprivileged writer may still use on `path`'s file system."""
    try:
        stat = os.statvfs(path.parent)
    except OSError:
        return 0
    return stat.f_bavail * stat.f_frsize


def _fsync_directory(directory: Path) -> None:
    """Make renames in `directory` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
