"""The buffer's point catalogues (store/sqlite.py invariant 6) on a real SQLite file: written with
the first batch that references them, given back to the forwarder by digest, deleted with the
last batch that references them however it leaves (acknowledged, acknowledged by a consumer,
evicted), the newest kept for the encoder to resume from."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest
from helpers.store import SCHEMA_BEFORE_CATALOGUES

from edge_agent.seal.catalogue import Catalogue
from edge_agent.store.sqlite import SealedBatch, Store

pytestmark = pytest.mark.unit

ONE = Catalogue.build([("plc", "a"), ("plc", "b")], bytes(2))
TWO = Catalogue.build([("plc", "a"), ("plc", "b"), ("plc", "c")], bytes(3))


async def opened(path: Path, max_bytes: int = 1 << 30) -> Store:
    store = Store(path, max_bytes=max_bytes, max_age_s=86400)
    await store.open()
    return store


async def append(
    store: Store, catalogue: Catalogue | None, count: int = 1, size: int = 100
) -> None:
    """`count` batches of 10 readings referencing `catalogue`, one transaction."""
    batch, seq = store.next_batch, store.next_seq
    await store.append([
        SealedBatch(batch + i, seq + 10 * i, 10, time.time_ns(), bytes(size), catalogue=catalogue)
        for i in range(count)
    ])  # fmt: skip


def rows(path: Path, sql: str) -> list[tuple[object, ...]]:
    with sqlite3.connect(path) as db:
        return db.execute(sql).fetchall()


async def test_a_catalogue_is_kept_with_its_first_batch_and_named_by_each_batch(
    tmp_path: Path,
) -> None:
    path = tmp_path / "b.db"
    store = await opened(path)
    assert await store.newest_catalogue() is None
    await append(store, None)
    await append(store, ONE, count=3)
    await store.append([SealedBatch(store.next_batch, store.next_seq, 0, 1, b"d", ((1, 1),))])
    taken = await store.take(10)
    assert [b.catalogue for b in taken] == [None, None, ONE.digest, ONE.digest, ONE.digest]
    assert taken[0].key.kind == "declaration", "a declaration never references one"
    assert await store.catalogue(ONE.digest) == ONE.payload
    assert await store.catalogue(TWO.digest) is None
    assert await store.newest_catalogue() == (ONE.digest, ONE.payload)
    assert rows(path, "SELECT digest, payload FROM catalogues") == [(ONE.digest, ONE.payload)]
    await store.close()


async def test_the_newest_catalogue_survives_a_restart_and_the_older_goes_with_its_batches(
    tmp_path: Path,
) -> None:
    path = tmp_path / "b.db"
    store = await opened(path)
    await append(store, ONE, count=2)
    await append(store, TWO, count=2)
    assert await store.catalogue_count() == 2
    await store.close()
    store = await opened(path)
    assert await store.newest_catalogue() == (TWO.digest, TWO.payload)
    taken = await store.take(10)
    await store.ack([taken[0].key])
    assert await store.catalogue_count() == 2, "ONE is still referenced"
    await store.ack([taken[1].key])
    assert await store.catalogue(ONE.digest) is None, "deleted with its last batch"
    await store.ack([b.key for b in taken[2:]])
    assert await store.newest_catalogue() == (TWO.digest, TWO.payload), "the newest stays"
    await store.close()


async def test_consumer_acknowledgements_and_evictions_delete_unreferenced_catalogues(
    tmp_path: Path,
) -> None:
    store = await opened(tmp_path / "b.db")
    await append(store, ONE)
    await append(store, TWO)
    await append(store, ONE)  # back to ONE: TWO is now the older
    await store.consumer_ack([(11, 20)], [])
    assert await store.catalogue(TWO.digest) is None
    assert await store.catalogue(ONE.digest) == ONE.payload
    await append(store, TWO)
    [first, *_] = await store.take(10)
    assert await store.evict_undeliverable(first.key, "undeliverable") is not None
    assert await store.catalogue_count() == 2, "ONE still has a batch"
    await store.evict_oldest(fraction=0.5)
    assert await store.catalogue(ONE.digest) is None
    assert await store.catalogue_count() == 1
    await store.close()


async def test_retention_deletes_the_catalogue_of_the_batches_it_evicts(tmp_path: Path) -> None:
    store = await opened(tmp_path / "b.db", max_bytes=1024 * 1024)
    await append(store, ONE, count=4, size=256 * 1024)
    await append(store, TWO, count=4, size=256 * 1024)  # evicts every batch of ONE
    assert [b.catalogue for b in await store.take(10)] == [TWO.digest] * 4
    assert await store.catalogue(ONE.digest) is None
    assert store.stats.evicted_readings == 40
    await store.close()


async def test_open_deletes_a_catalogue_no_batch_references_but_keeps_the_newest(
    tmp_path: Path,
) -> None:
    path = tmp_path / "b.db"
    store = await opened(path)
    await append(store, TWO)
    await store.ack([b.key for b in await store.take(10)])
    await store.close()
    with sqlite3.connect(path) as db:  # left behind, as by a version that did not delete it
        db.execute("INSERT INTO catalogues VALUES (?, ?)", (ONE.digest, ONE.payload))
    store = await opened(path)
    assert rows(path, "SELECT digest FROM catalogues") == [(TWO.digest,)]
    assert await store.newest_catalogue() == (TWO.digest, TWO.payload)
    await store.close()


async def test_a_buffer_made_before_catalogues_is_upgraded_at_open(tmp_path: Path) -> None:
    path = tmp_path / "b.db"
    with sqlite3.connect(path) as db:
        db.executescript(SCHEMA_BEFORE_CATALOGUES)
        db.executemany("INSERT INTO meta VALUES (?, ?)",
                       [("epoch", "e" * 32), ("next_seq", 21), ("next_batch", 3)])  # fmt: skip
        db.executemany(
            "INSERT INTO batches VALUES (?, ?, ?, 10, 4, ?, ?, NULL)",
            [(1, 1, 10, time.time_ns(), b"old1"), (2, 11, 20, time.time_ns(), b"old2")],
        )
    store = await opened(path)
    columns = [row[1] for row in rows(path, "PRAGMA table_info(batches)")]
    assert columns[-1] == "catalogue"
    await append(store, ONE)
    assert [b.catalogue for b in await store.take(10)] == [None, None, ONE.digest]
    await store.close()
