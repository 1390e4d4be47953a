"""The buffer in mqtt.ack: end_to_end mode (docs/contract.md §4.10), on a real SQLite file:
PUBACKed batches are kept (marked sent) until a consumer acknowledges them, sent again after the
ack timeout, bounded and evicted as any other; files of older versions open and work."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest

from edge_agent.store.sqlite import BatchKey, SealedBatch, Store

pytestmark = pytest.mark.unit

NOW = time.time_ns()

OLD_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value) WITHOUT ROWID;
CREATE TABLE batches (
    id INTEGER PRIMARY KEY, first_seq INTEGER NOT NULL, last_seq INTEGER NOT NULL,
    readings INTEGER NOT NULL, bytes INTEGER NOT NULL, sealed_ns INTEGER NOT NULL,
    data BLOB NOT NULL);
CREATE TABLE notices (
    id INTEGER PRIMARY KEY, readings INTEGER NOT NULL, bytes INTEGER NOT NULL,
    sealed_ns INTEGER NOT NULL, data BLOB NOT NULL);
CREATE TABLE pending_evictions (first_seq INTEGER PRIMARY KEY, last_seq INTEGER NOT NULL);
CREATE TABLE eviction_reasons (first_seq INTEGER PRIMARY KEY, reason TEXT NOT NULL);
"""
"""The schema of the buffer before `sent_ns` (contract 1.9)."""


async def filled(path: Path, count: int, *, max_bytes: int = 1 << 26) -> Store:
    """A store with `count` batches of 10 readings each (batch n holds seqs 10n-9..10n)."""
    store = Store(path, max_bytes=max_bytes, max_age_s=86400)
    await store.open()
    await store.append(
        [
            SealedBatch(n, 10 * n - 9, 10, NOW + n, b"x" * 100)
            for n in range(store.next_batch, store.next_batch + count)
        ]
    )
    return store


def ids(batches: list) -> list[int]:  # type: ignore[type-arg]
    return [b.key.id for b in batches]


async def test_sent_batches_wait_for_the_consumer_and_come_back_after_the_timeout(
    tmp_path: Path,
) -> None:
    store = await filled(tmp_path / "b.db", 6)
    first = await store.take_unacked(4, due_ns=0)
    assert ids(first) == [1, 2, 3, 4]
    await store.mark_sent([b.key for b in first[:3]], sent_ns=100)
    # Batch 4 is still in flight: excluded by the caller.
    assert ids(await store.take_unacked(10, 50, exclude=[BatchKey("readings", 4)])) == [5, 6]
    # Past the timeout, the sent ones are due again, oldest first, within the limit.
    assert ids(await store.take_unacked(4, 100, exclude=[BatchKey("readings", 4)])) == [1, 2, 3, 5]
    # At most `max_due` of them again at once: the fresh ones still come.
    paced = await store.take_unacked(4, 100, exclude=[BatchKey("readings", 4)], max_due=1)
    assert [(b.key.id, b.resend) for b in paced] == [(1, True), (5, False), (6, False)]
    assert store.stats.batches == 6  # nothing deleted by marking
    unacked = await store.unacked()
    assert (unacked.batches, unacked.readings, unacked.oldest_sent_ns) == (3, 30, 100)
    await store.close()


async def test_fresh_batches_come_first_and_sent_ones_only_once_due(tmp_path: Path) -> None:
    # The forwarder's end_to_end order (Forwarder._take_unacked): batches past the connection's
    # boundary first (`after`), then the rest; in each, first sends and due re-sends by id.
    store = await filled(tmp_path / "b.db", 6)
    await store.mark_sent([BatchKey("readings", n) for n in (1, 2, 5)], sent_ns=100)
    # Not due yet: a batch PUBACKed less than the timeout ago is not taken again.
    assert ids(await store.take_unacked(10, 99, after=3)) == [4, 6]
    assert ids(await store.take_unacked(10, 99)) == [3, 4, 6]
    # Due: the fresh part, then the backlog part, each oldest first.
    fresh = await store.take_unacked(10, 100, after=3)
    assert [(b.key.id, b.resend) for b in fresh] == [(4, False), (5, True), (6, False)]
    rest = await store.take_unacked(10, 100, exclude=[b.key for b in fresh])
    assert [(b.key.id, b.resend) for b in rest] == [(1, True), (2, True), (3, False)]
    await store.close()


async def test_a_consumer_ack_deletes_what_it_covers_by_seq_or_batch_number(tmp_path: Path) -> None:
    store = await filled(tmp_path / "b.db", 8)
    await store.mark_sent([BatchKey("readings", n) for n in range(1, 9)], sent_ns=1)
    # seqs 1..25 cover batches 1 and 2 whole, batch 3 (21..30) only in part; batch 6 by number.
    removed = await store.consumer_ack([(1, 25)], [(6, 6)])
    assert [k.id for k in removed] == [1, 2, 6]
    assert store.stats.batches == 5 and store.stats.readings == 50
    assert ids(await store.take_unacked(10, due_ns=1)) == [3, 4, 5, 7, 8]
    # The same ack again deletes nothing more; unsent batches are deleted too when held.
    assert await store.consumer_ack([(1, 25)], [(6, 6)]) == []
    assert [k.id for k in await store.consumer_ack([(21, 80)], [])] == [3, 4, 5, 7, 8]
    assert store.stats.batches == 0 and (await store.unacked()).batches == 0
    await store.close()


async def test_a_consumer_ack_covers_declarations_by_batch_number_only(tmp_path: Path) -> None:
    store = await filled(tmp_path / "b.db", 2, max_bytes=1024 * 1024)
    await store.append([SealedBatch(3, 21, 0, NOW, b"d" * 50, declares=((1, 10),))])
    taken = await store.take_unacked(10, due_ns=0)
    assert [b.key for b in taken][0] == BatchKey("declaration", 3)
    assert await store.consumer_ack([(1, 20)], []) == [BatchKey("readings", 1),
                                                        BatchKey("readings", 2)]  # fmt: skip
    assert await store.consumer_ack([], [(3, 3)]) == [BatchKey("declaration", 3)]
    assert store.stats.batches == 0
    await store.close()


async def test_sent_unacknowledged_batches_are_evicted_and_declared_like_any_other(
    tmp_path: Path,
) -> None:
    store = await filled(tmp_path / "b.db", 5, max_bytes=1024 * 1024)
    await store.mark_sent([BatchKey("readings", n) for n in range(1, 6)], sent_ns=1)
    store.max_bytes = 250  # the bound shrinks: the oldest, sent or not, go first
    await store.append([SealedBatch(6, 51, 10, NOW, b"y" * 100)])
    assert await store.pending_evictions() == [(1, 10), (11, 20), (21, 30), (31, 40)]
    assert ids(await store.take_unacked(10, due_ns=1)) == [5, 6]
    await store.close()


async def test_a_buffer_of_the_previous_version_opens_and_works(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    db.executescript(OLD_SCHEMA)
    db.executemany(
        "INSERT INTO meta VALUES (?, ?)", [("epoch", "e-old"), ("next_seq", 21), ("next_batch", 3)]
    )
    db.executemany(
        "INSERT INTO batches VALUES (?, ?, ?, ?, ?, ?, ?)",
        [(1, 1, 10, 10, 4, 1, b"aaaa"), (2, 11, 20, 10, 4, 2, b"bbbb")],
    )
    db.execute("INSERT INTO notices VALUES (?, ?, ?, ?, ?)", (0, 0, 3, 0, b"ddd"))
    db.commit()
    db.close()

    store = Store(path, max_bytes=1 << 26, max_age_s=86400 * 365 * 100)
    await store.open()
    assert (store.epoch, store.next_seq, store.next_batch) == ("e-old", 21, 3)
    assert store.stats.batches == 3
    # Nothing counts as sent: broker mode takes everything, end_to_end mode too.
    assert [b.key.id for b in await store.take(10)] == [0, 1, 2]
    assert ids(await store.take_unacked(10, due_ns=0)) == [0, 1, 2]
    await store.append([SealedBatch(3, 21, 10, 3, b"cccc")])
    await store.mark_sent([BatchKey("readings", 1), BatchKey("readings", 3)], 7)
    assert ids(await store.take_unacked(10, due_ns=0)) == [0, 2]
    assert [k.id for k in await store.consumer_ack([(1, 20)], [(0, 0)])] == [0, 1, 2]
    await store.ack([BatchKey("readings", 3)])
    assert store.stats.batches == 0
    await store.close()

    store = Store(path, max_bytes=1 << 26, max_age_s=86400)  # opens again, already upgraded
    await store.open()
    assert store.epoch == "e-old" and store.stats.batches == 0
    await store.close()
