"""The buffer on a real SQLite file: counters survive restarts, retention is declared."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from helpers.wait import deadline

from edge_agent.consumer.completeness import Completeness
from edge_agent.metrics import Metrics
from edge_agent.reading import Quality, Reading
from edge_agent.seal.batcher import Batcher
from edge_agent.seal.envelope import Opener, Sealer
from edge_agent.store.sqlite import MAX_TRANSACTION_BYTES, BatchKey, SealedBatch, Store

pytestmark = pytest.mark.unit

MiB = 1024 * 1024


def readings(count: int, start: int = 0) -> list[Reading]:
    return [
        Reading("sim", f"p{i % 10}", 1_700_000_000_000_000_000 + i, float(i), Quality.GOOD)
        for i in range(start, start + count)
    ]


async def open_store(path: Path, max_bytes: int = 64 * MiB, max_age_s: float = 86400) -> Store:
    store = Store(path, max_bytes=max_bytes, max_age_s=max_age_s)
    await store.open()
    return store


def make_batcher(store: Store, key: Ed25519PrivateKey, max_readings: int = 100) -> Batcher:
    return Batcher(
        store,
        Sealer(key, compress=False),
        Metrics(),
        gateway="gw",
        max_readings=max_readings,
        max_delay=0.05,
        capacity=10_000,
    )


async def test_wal_and_full_sync_are_in_force(tmp_path: Path) -> None:
    store = await open_store(tmp_path / "b.db")
    assert (await store.db.execute_fetchall("PRAGMA journal_mode"))[0][0] == "wal"
    assert (await store.db.execute_fetchall("PRAGMA synchronous"))[0][0] == 2  # FULL
    await store.close()


async def test_epoch_and_counters_survive_a_restart(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    store = await open_store(tmp_path / "b.db")
    epoch = store.epoch
    batcher = make_batcher(store, key)
    await batcher.emit(readings(250))
    await batcher.seal_pending()
    assert (store.next_seq, store.next_batch) == (251, 4)
    await store.close()

    store = await open_store(tmp_path / "b.db")
    assert store.epoch == epoch
    assert (store.next_seq, store.next_batch) == (251, 4)
    assert store.stats.readings == 250
    assert store.stats.batches == 3
    await store.close()


async def test_new_file_means_new_epoch(tmp_path: Path) -> None:
    first = await open_store(tmp_path / "a.db")
    second = await open_store(tmp_path / "b.db")
    assert first.epoch != second.epoch
    await first.close()
    await second.close()


async def test_take_and_ack_delete_only_acknowledged(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    store = await open_store(tmp_path / "b.db")
    batcher = make_batcher(store, key)
    await batcher.emit(readings(500))
    await batcher.seal_pending()
    taken = await store.take(10)
    assert len(taken) == 5
    await store.ack([taken[0].key, taken[2].key])
    remaining = await store.take(10)
    assert [b.key for b in remaining] == [taken[1].key, taken[3].key, taken[4].key]
    assert store.stats.readings == 300
    seqs = []
    opener = Opener([key.public_key()])
    for batch in remaining:
        seqs += [r["seq"] for r in opener.open(batch.data).readings]
    assert seqs == list(range(101, 201)) + list(range(301, 501))
    await store.close()


async def test_out_of_order_append_is_refused(tmp_path: Path) -> None:
    store = await open_store(tmp_path / "b.db")
    with pytest.raises(Exception, match="out of order"):
        await store.append([SealedBatch(5, 1, 1, 0, b"x")])
    await store.close()


async def test_retention_evicts_oldest_and_the_next_batch_declares_it(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    store = await open_store(tmp_path / "b.db", max_bytes=1 * MiB)
    batcher = make_batcher(store, key, max_readings=1000)
    for start in range(0, 60_000, 1000):
        await batcher.emit(readings(1000, start))
        await batcher.seal_pending()
    # The limit holds for readings; a declaration sealed after the last eviction may sit on top.
    assert store.stats.bytes <= 1 * MiB + 64 * 1024
    assert store.stats.evicted_readings > 0

    tracker = Completeness()
    opener = Opener([key.public_key()])
    taken = await store.take(1000)
    assert taken[0].key.kind == "declaration", "the declaration is sent before older readings"
    for batch in taken:
        opened = opener.open(batch.data)
        tracker.accept(opened.gateway, opened.epoch, opened.readings, opened.evicted)
    # Everything not still buffered (or declared by a later seal) is declared evicted.
    await batcher.emit(readings(1, 60_000))
    await batcher.seal_pending()
    for batch in await store.take(1000):
        opened = opener.open(batch.data)
        tracker.accept(opened.gateway, opened.epoch, opened.readings, opened.evicted)
    assert tracker.holes() == {}
    assert not await store.pending_evictions()
    await store.close()


async def test_max_age_evicts_old_batches(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    store = await open_store(tmp_path / "b.db", max_age_s=0.05)
    batcher = make_batcher(store, key)
    await batcher.emit(readings(100))
    await batcher.seal_pending()
    await asyncio.sleep(0.1)  # the batch must be older than max_age: time itself is the input
    await batcher.emit(readings(100, 100))
    await batcher.seal_pending()
    opener = Opener([key.public_key()])
    declared = [opener.open(b.data).evicted for b in await store.take(10)]
    assert [(1, 100)] in declared
    assert await store.pending_evictions() == []
    await store.close()


async def test_pending_eviction_survives_a_restart_until_declared(tmp_path: Path) -> None:
    """Retention records what it dropped in the same transaction, so a crash cannot hide it."""
    store = await open_store(tmp_path / "b.db", max_bytes=1 * MiB)
    blob = bytes(300 * 1024)
    now = time.time_ns()
    batches = [SealedBatch(n, (n - 1) * 10 + 1, 10, now, blob) for n in range(1, 6)]
    await store.append(batches)  # the agent "crashes" before sealing a declaration
    pending = await store.pending_evictions()
    assert pending == [(1, 10), (11, 20)]
    await store.close()
    store = await open_store(tmp_path / "b.db", max_bytes=1 * MiB)
    assert await store.pending_evictions() == pending
    declaration = SealedBatch(6, 51, 0, now, b"declares", declares=tuple(pending))
    await store.append([declaration])
    assert await store.pending_evictions() == []
    assert (await store.take(1))[0].key == ("declaration", 6)
    await store.close()


async def test_batcher_seals_on_delay_and_on_size(tmp_path: Path) -> None:
    store = await open_store(tmp_path / "b.db")
    batcher = make_batcher(store, Ed25519PrivateKey.generate(), max_readings=100)
    task = asyncio.create_task(batcher.run())
    await batcher.emit(readings(250))
    async with deadline(5, "250 readings sealed, the last 50 on the delay"):
        await batcher.sealed.wait()
        while store.stats.readings < 250:
            batcher.sealed.clear()
            if store.stats.readings < 250:  # a seal between the check and the clear counts
                await batcher.sealed.wait()
    assert store.stats.batches == 3
    await batcher.emit(readings(5, 250))
    batcher.stop()
    await task
    assert store.stats.readings == 255, "stopping seals what is pending"
    await store.close()


async def test_file_is_a_plain_sqlite_database(tmp_path: Path) -> None:
    store = await open_store(tmp_path / "b.db")
    await store.close()
    with sqlite3.connect(tmp_path / "b.db") as db:
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master")}
    assert {"meta", "batches", "notices", "pending_evictions"} <= tables


async def test_disk_full_evicts_the_oldest_and_declares_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite's own page limit stands in for a full disk: the same SQLITE_FULL, no root needed."""
    monkeypatch.setattr("edge_agent.seal.batcher.STORE_RETRY_S", 0.01)
    key = Ed25519PrivateKey.generate()
    store = await open_store(tmp_path / "b.db", max_bytes=1024 * MiB)
    batcher = make_batcher(store, key, max_readings=1000)
    await batcher.emit(readings(5000))
    await batcher.seal_pending()
    (pages,) = (await store.db.execute_fetchall("PRAGMA page_count"))[0]
    await store.db.execute(f"PRAGMA max_page_count = {pages + 64}")
    for start in range(5000, 40_000, 1000):
        await batcher.emit(readings(1000, start))
        await asyncio.wait_for(batcher.seal_pending(), 30)
    assert store.stats.evicted_readings > 0, "the disk filled up and the oldest made room"
    assert store.next_seq == 40_001, "every reading was sealed"
    tracker = Completeness()
    opener = Opener([key.public_key()])
    for batch in await store.take(10_000):
        opened = opener.open(batch.data)
        tracker.accept(opened.gateway, opened.epoch, opened.readings, opened.evicted)
    pending = await store.pending_evictions()
    for first, last in pending:
        tracker.accept("gw", store.epoch, [], [(first, last)])
    assert tracker.holes() == {}, "every dropped reading is declared (or about to be)"
    await store.close()


async def test_a_cancelled_write_leaves_the_store_consistent(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    store = await open_store(tmp_path / "b.db")
    for delay_turns in range(6):
        batcher = make_batcher(store, key)
        await batcher.emit(readings(300, (store.next_seq - 1)))
        task = asyncio.create_task(batcher.seal_pending())
        for _ in range(delay_turns):
            await asyncio.sleep(0)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    batcher = make_batcher(store, key)
    await batcher.emit(readings(10, store.next_seq - 1))
    await batcher.seal_pending()  # the connection is not stuck inside a transaction
    (count, total) = (await store.db.execute_fetchall(
        "SELECT count(*), coalesce(sum(readings), 0) FROM batches"))[0]  # fmt: skip
    assert (store.stats.batches, store.stats.readings) == (count, total)
    (next_seq,) = (await store.db.execute_fetchall(
        "SELECT value FROM meta WHERE key = 'next_seq'"))[0]  # fmt: skip
    assert store.next_seq == next_seq == total + 1
    await store.close()


async def test_an_undeliverable_batch_is_evicted_and_declared_with_its_reason(
    tmp_path: Path,
) -> None:
    """The forwarder evicts a batch the broker will never take; the reason survives a restart
    and goes out in the declaration, and declarations themselves are never evicted."""
    key = Ed25519PrivateKey.generate()
    store = await open_store(tmp_path / "b.db")
    batcher = make_batcher(store, key, max_readings=10)
    await batcher.emit(readings(30))
    await batcher.seal_pending()
    assert await store.evict_undeliverable(BatchKey("readings", 2), "too_large") == (11, 20, 10)
    assert await store.evict_undeliverable(BatchKey("readings", 2), "too_large") is None, (
        "gone already"
    )
    assert (store.stats.batches, store.stats.readings, store.stats.evicted_readings) == (2, 20, 10)
    await store.close()

    store = await open_store(tmp_path / "b.db")
    assert await store.pending_declarations() == [(11, 20, "too_large")]
    batcher = make_batcher(store, key, max_readings=10)
    batcher.declare_pending()
    await batcher.seal_pending()
    assert await store.pending_declarations() == []
    [declaration] = [b for b in await store.take(10) if b.key.kind == "declaration"]
    opened = Opener([key.public_key()]).open(declaration.data)
    assert (opened.evicted, opened.evicted_reasons) == ([(11, 20)], ["too_large"])
    assert await store.evict_undeliverable(declaration.key, "too_large") is None
    assert (await store.take(1))[0].key == declaration.key, "a declaration is never evicted"
    await store.close()


async def test_batches_are_sealed_within_max_bytes(tmp_path: Path) -> None:
    """Fewer readings per batch when they would not fit; one reading too large alone is sealed
    alone (the forwarder evicts and declares it); every seq is used once, in order."""
    key = Ed25519PrivateKey.generate()
    store = await open_store(tmp_path / "b.db")
    batcher = make_batcher(store, key, max_readings=100)
    batcher.set_max_bytes(600)
    values = [f"{i:04d}" * 10 for i in range(250)]
    values[120] = "x" * 1000
    await batcher.emit([r._replace(value=v) for r, v in zip(readings(250), values, strict=True)])
    await batcher.seal_pending()
    opener = Opener([key.public_key()])
    taken = [(len(b.data), opener.open(b.data)) for b in await store.take(1000)]
    seqs = [r["seq"] for _, batch in taken for r in batch.readings]
    assert seqs == list(range(1, 251))
    too_large = [(size, batch.readings[0]["seq"]) for size, batch in taken if size > 600]
    assert [seq for _, seq in too_large] == [121], "only the reading that cannot fit"
    assert len(taken[0][1].readings) < 100
    assert sum(size for size, _ in taken if size <= 600) / (len(taken) - 1) > 400, "well filled"
    await store.close()


async def test_declarations_are_merged_and_split_to_fit_max_bytes(tmp_path: Path) -> None:
    """Adjacent ranges with one reason are declared as one; many ranges go out in several
    declarations, each within max_bytes, together covering them all."""
    key = Ed25519PrivateKey.generate()
    store = await open_store(tmp_path / "b.db")
    batcher = make_batcher(store, key, max_readings=1)
    await batcher.emit(readings(120))
    await batcher.seal_pending()
    for batch_no in [*range(1, 11), *range(21, 120, 2)]:  # 1..10 touch; the rest do not
        await store.evict_undeliverable(BatchKey("readings", batch_no), "too_large")
    batcher.set_max_bytes(400)
    batcher.declare_pending()
    await batcher.seal_pending()
    opener = Opener([key.public_key()])
    declarations = [b for b in await store.take(1000) if b.key.kind == "declaration"]
    declared = [r for b in declarations for r in opener.open(b.data).evicted]
    assert len(declarations) > 1
    assert all(len(b.data) <= 400 for b in declarations)
    assert declared[0] == (1, 10)
    assert declared[1:] == [(n, n) for n in range(21, 120, 2)]
    assert await store.pending_declarations() == []
    await store.close()


async def test_the_payload_budget_and_the_transaction_cap_hold_together(tmp_path: Path) -> None:
    """Every batch within the link's `max_bytes`, every transaction within the store's
    MAX_TRANSACTION_BYTES (past it by one batch at most), the previous epoch's end in the first
    declaration, and every seq once, in order."""
    key = Ed25519PrivateKey.generate()
    path = tmp_path / "b.db"
    old = await open_store(path)
    await old.append([SealedBatch(1, 1, 10, time.time_ns(), bytes(100))])
    old_epoch = old.epoch
    await old.close()
    for suffix in ("", "-wal", "-shm"):  # the file lost, its witness left
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    store = await open_store(path)
    appended: list[int] = []
    append = store.append

    async def recording(batches: Sequence[SealedBatch]) -> int:
        appended.append(sum(len(b.data) for b in batches))
        return await append(batches)

    store.append = recording  # type: ignore[method-assign]
    batcher = make_batcher(store, key, max_readings=100)
    batcher.set_max_bytes(4096)
    texts = [f"value-{i:08d}-" * 4 for i in range(6000)]
    await batcher.emit([r._replace(value=t) for r, t in zip(readings(6000), texts, strict=True)])
    batcher.stop()
    await batcher.run()

    assert len(appended) > 2 and max(appended) <= MAX_TRANSACTION_BYTES + 4096
    opener = Opener([key.public_key()])
    taken = await store.take(10_000)
    assert all(len(b.data) <= 4096 for b in taken)
    first = opener.open(taken[0].data)
    assert taken[0].key.kind == "declaration" and first.previous_epoch is not None
    assert (first.previous_epoch.epoch, first.previous_epoch.last_seq) == (old_epoch, 10)
    assert first.previous_epoch.ended == "missing"
    seqs = [r["seq"] for b in taken[1:] for r in opener.open(b.data).readings]
    assert seqs == list(range(1, 6001))
    assert await store.previous_epoch() is None
    await store.close()
