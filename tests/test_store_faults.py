"""The store under real faults: a full file system (a tmpfs of a few MiB) and bad files at start.

Everything here is real: a tmpfs mounted by the test (we run as root; unmounted in teardown),
files corrupted byte by byte, a process holding the store killed with SIGKILL. The promise under
test: the buffer keeps taking readings, every reading it drops is declared, and a store that went
bad is moved aside, never reused, and its end declared.
"""

from __future__ import annotations

import asyncio
import logging
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from helpers.disk import MiB, SmallDisk

from edge_agent.consumer.completeness import Completeness
from edge_agent.metrics import Metrics
from edge_agent.reading import Quality, Reading
from edge_agent.seal.batcher import Batcher
from edge_agent.seal.envelope import Opener, Sealer
from edge_agent.store.sqlite import RESERVE_BYTES, SealedBatch, Store

pytestmark = pytest.mark.faults


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[SmallDisk]:
    disk = SmallDisk(tmp_path / "disk", 2 * MiB)
    yield disk
    disk.unmount()


def random_readings(rng: random.Random, count: int, start: int = 0) -> list[Reading]:
    """Readings that compress like real measurements do (little): a full disk comes sooner."""
    now = time.time_ns()
    return [
        Reading("sim", f"p{i % 50}", now + i, rng.random(), Quality.GOOD, None)
        for i in range(start, start + count)
    ]


def make_batcher(store: Store, key: Ed25519PrivateKey) -> Batcher:
    return Batcher(
        store,
        Sealer(key),
        Metrics(),
        gateway="gw",
        max_readings=200,
        max_delay=0.05,
        capacity=20_000,
    )


async def account(store: Store, key: Ed25519PrivateKey, tracker: Completeness) -> None:
    """What a consumer would learn from the buffer as it stands, pending evictions included."""
    opener = Opener([key.public_key()])
    for batch in await store.take(1_000_000):
        opened = opener.open(batch.data)
        tracker.accept(opened.gateway, opened.epoch, opened.readings, opened.evicted)
    tracker.accept("gw", store.epoch, [], await store.pending_evictions())


async def feed(batcher: Batcher, rng: random.Random, readings: int, per_call: int = 1000) -> None:
    """Hand readings over as a source would, sealing as we go."""
    for start in range(0, readings, per_call):
        await batcher.emit(random_readings(rng, per_call, start))
        await batcher.seal_pending()


async def test_disk_full_keeps_taking_readings_evicts_declares_and_resumes(
    small_disk: SmallDisk,
) -> None:
    """The issue's case: the buffer alone fills a 2 MiB file system, nothing is acknowledged."""
    key, rng = Ed25519PrivateKey.generate(), random.Random(1)
    store = Store(small_disk.path / "buffer.db", max_bytes=1024 * MiB, max_age_s=86400)
    await store.open()
    batcher = make_batcher(store, key)
    assert store.reserve_path.stat().st_size == RESERVE_BYTES

    total = 0
    while not store.disk_full:
        await feed(batcher, rng, 1000)
        total += 1000
        assert total < 2_000_000, "the disk never filled up"
    assert "disk full" in " ".join(store.problems())
    assert not store.reserve_path.exists(), "the reserve made room for the first eviction"
    size_when_full = store.path.stat().st_size

    started = time.monotonic()
    await asyncio.wait_for(feed(batcher, rng, 100_000), 60)
    total += 100_000
    took = time.monotonic() - started
    assert store.next_seq - 1 == total, "every reading was sealed, none held back for long"
    assert store.stats.evicted_readings > 50_000, "the oldest made room for the newest"
    assert store.path.stat().st_size == size_when_full, "the file keeps its size while full"
    assert took < 30, f"100,000 readings took {took:.1f}s on a full disk"

    tracker = Completeness()
    await account(store, key, tracker)
    assert tracker.holes() == {}, "every evicted reading is declared"
    [stream] = tracker.streams.values()
    assert stream.max_seq == total

    small_disk.grow(8 * MiB)
    started = time.monotonic()
    while store.disk_full:
        await feed(batcher, rng, 200, per_call=200)
        assert time.monotonic() - started < 10, "the store did not notice the room"
    assert store.reserve_path.stat().st_size == RESERVE_BYTES, "the reserve is back"
    assert store.problems() == []
    evicted = store.stats.evicted_readings
    await feed(batcher, rng, 20_000)
    assert store.stats.evicted_readings == evicted, "with room, nothing more is evicted"
    await store.close()


async def test_acknowledged_batches_are_deleted_on_a_full_disk_or_reported(
    small_disk: SmallDisk,
) -> None:
    """Another instance: the disk fills with someone else's file; deleting needs room too."""
    key, rng = Ed25519PrivateKey.generate(), random.Random(2)
    store = Store(small_disk.path / "buffer.db", max_bytes=1024 * MiB, max_age_s=86400)
    await store.open()
    batcher = make_batcher(store, key)
    await feed(batcher, rng, 20_000)
    taken = await store.take(1000)
    filler = small_disk.fill()
    assert small_disk.free() < 64 * 1024
    assert any("disk nearly full" in p for p in store.problems()), "said before a write fails"

    await store.ack([batch.key for batch in taken[:20]])
    assert store.stats.readings == 20_000 - 20 * 200
    assert store.failures == {}

    # A reader pins the WAL (an operator's sqlite3 shell, say): it can neither be reused nor
    # grow. Without the reserve, deletes fail: the batches stay, and health says why.
    reader = sqlite3.connect(store.path, isolation_level=None)
    reader.execute("BEGIN")
    reader.execute("SELECT count(*) FROM batches").fetchall()
    store.reserve_path.unlink(missing_ok=True)
    small_disk.fill()
    problem = None
    for batch in taken[20:]:
        try:
            await store.ack([batch.key])
        except Exception as exc:  # noqa: BLE001 - the store's error is what we look for
            problem = exc
            break
    assert problem is not None and "disk is full" in str(problem)
    assert any("cannot delete acknowledged batches" in p for p in store.problems())
    assert store.disk_full
    reader.close()
    filler.unlink()
    await store.ack([batch.key for batch in taken[20:]])
    assert store.failures == {}, "the problem clears once a delete succeeds"
    assert store.stats.readings == 20_000 - len(taken) * 200
    await store.close()


async def test_restart_on_a_full_disk_opens_on_the_reserve(small_disk: SmallDisk) -> None:
    """Opening needs room too (-shm, -wal): a restart on a full disk uses the reserve."""
    key, rng = Ed25519PrivateKey.generate(), random.Random(3)
    path = small_disk.path / "buffer.db"
    store = Store(path, max_bytes=1024 * MiB, max_age_s=86400)
    await store.open()
    await feed(make_batcher(store, key), rng, 20_000)
    epoch = store.epoch
    await store.close()
    small_disk.fill()

    for _ in range(3):  # stopped and started again, the disk still full each time
        store = Store(path, max_bytes=1024 * MiB, max_age_s=86400)
        await store.open()
        assert store.disk_full and store.epoch == epoch
        sealed = store.next_seq - 1
        await asyncio.wait_for(feed(make_batcher(store, key), rng, 30_000), 60)
        assert store.next_seq - 1 == sealed + 30_000
        await store.close()

    store = Store(path, max_bytes=1024 * MiB, max_age_s=86400)
    await store.open()
    tracker = Completeness()
    await account(store, key, tracker)
    assert tracker.holes() == {}
    assert store.stats.evicted_readings > 0 or any(
        s.evicted_count for s in tracker.streams.values()
    )
    await store.close()


# --- bad files at start -------------------------------------------------------------------------

HOLDER = """
import asyncio, sys, time
from pathlib import Path
from edge_agent.store.sqlite import SealedBatch, Store

async def main():
    store = Store(Path(sys.argv[1]), max_bytes=1 << 30, max_age_s=86400)
    await store.open()
    for n in range(store.next_batch, store.next_batch + int(sys.argv[2])):
        seq = store.next_seq
        await store.append([SealedBatch(n, seq, 100, time.time_ns(), bytes(3000))])
    print(store.next_seq - 1, flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


def crash_holding(path: Path, batches: int) -> int:
    """A real process appends `batches` of 100 readings, then is killed with SIGKILL.

    Returns the last seq it committed. The -wal file keeps what no checkpoint copied yet.
    """
    process = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(path), str(batches)], stdout=subprocess.PIPE
    )
    assert process.stdout is not None
    last_seq = int(process.stdout.readline())
    process.send_signal(signal.SIGKILL)
    process.wait()
    return last_seq


async def reopen(path: Path) -> Store:
    store = Store(path, max_bytes=1024 * MiB, max_age_s=86400)
    await store.open()
    return store


async def sealed_announcement(store: Store) -> dict[str, object]:
    """Seal what the batcher has to say first in a new epoch, and open it as a consumer."""
    key = Ed25519PrivateKey.generate()
    batcher = make_batcher(store, key)
    task = asyncio.create_task(batcher.run())
    await asyncio.wait_for(batcher.sealed.wait(), 5)
    batcher.stop()
    await task
    first = (await store.take(1))[0]
    assert first.key.kind == "declaration", "the announcement is sent before anything else"
    opened = Opener([key.public_key()]).open(first.data)
    assert opened.epoch == store.epoch and opened.batch == 1 and opened.readings == []
    assert opened.previous_epoch is not None
    assert await store.previous_epoch() is None, "sealed, it is no longer pending"
    return {
        "epoch": opened.previous_epoch.epoch,
        "last_seq": opened.previous_epoch.last_seq,
        "ended": opened.previous_epoch.ended,
        "detail": opened.previous_epoch.detail,
    }


def quarantined_files(directory: Path) -> list[Path]:
    """The quarantined database files (their -wal and -shm, moved with them, aside)."""
    return sorted(
        p for p in directory.glob("buffer.db.corrupt-*") if not p.name.endswith(("-wal", "-shm"))
    )


def overwrite_pages(path: Path, pages: list[int]) -> None:
    rng = random.Random(4)
    with path.open("r+b") as file:
        for page in pages:
            file.seek(page * 4096)
            file.write(rng.randbytes(4096))


def truncate_half(path: Path) -> None:
    size = path.stat().st_size
    with path.open("r+b") as file:
        file.truncate(size // 2 // 4096 * 4096)


@pytest.mark.parametrize(
    ("fault", "damage"),
    [
        ("random bytes", lambda p: p.write_bytes(random.Random(5).randbytes(8192))),
        ("truncated", truncate_half),
        ("garbage pages", lambda p: overwrite_pages(p, [20, 21, 22])),
    ],
)
async def test_a_bad_file_is_moved_aside_and_a_new_epoch_declares_the_old_end(
    tmp_path: Path, fault: str, damage: Callable[[Path], object], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="edge_agent.audit")
    path = tmp_path / "buffer.db"
    store = await reopen(path)
    for n in range(1, 61):
        await store.append([SealedBatch(n, (n - 1) * 100 + 1, 100, time.time_ns(), bytes(3000))])
    old_epoch = store.epoch
    await store.close()
    damage(path)
    damaged = path.read_bytes()

    store = await reopen(path)
    assert store.epoch != old_epoch and store.next_seq == 1, f"{fault}: a new epoch began"
    [moved] = quarantined_files(tmp_path)
    assert moved.read_bytes() == damaged, "kept exactly as found"
    [record] = store.quarantined
    assert record.moved_to == str(moved) and record.epoch == old_epoch
    assert record.last_seq == 6000, "the witness knew the last committed seq"
    [event] = [r.audit for r in caplog.records if hasattr(r, "audit")]  # type: ignore[attr-defined]
    assert event["category"] == "store" and event["outcome"] == "success"
    assert (event["action"], event["moved_to"], event["epoch"]) == (
        "quarantined",
        str(moved),
        old_epoch,
    )
    assert event["reason"] == record.reason
    ended = await sealed_announcement(store)
    assert ended["epoch"] == old_epoch and ended["last_seq"] == 6000
    assert ended["ended"] == "quarantined" and str(moved) in str(ended["detail"])
    await store.close()

    store = await reopen(path)  # the new file is healthy: kept, nothing announced again
    assert len(quarantined_files(tmp_path)) == 1 and store.quarantined == []
    assert await store.previous_epoch() is None
    await store.close()


async def test_random_bytes_without_a_witness_end_an_unknown_epoch(tmp_path: Path) -> None:
    (tmp_path / "buffer.db").write_bytes(random.Random(6).randbytes(8192))
    store = await reopen(tmp_path / "buffer.db")
    assert "not a database" in store.quarantined[0].reason
    ended = await sealed_announcement(store)
    assert ended["epoch"] is None and ended["last_seq"] is None
    await store.close()


async def test_a_removed_wal_after_a_crash_is_recognised(tmp_path: Path) -> None:
    """The issue's case: the committed state went backwards; sequence numbers would repeat."""
    path = tmp_path / "buffer.db"
    last_seq = crash_holding(path, 200)
    wal = Path(f"{path}-wal")
    assert wal.stat().st_size > 0, "the crash left commits in the -wal"
    wal.unlink()

    store = await reopen(path)
    [record] = store.quarantined
    assert "went backwards" in record.reason and record.last_seq == last_seq == 20_000
    assert store.next_seq == 1
    ended = await sealed_announcement(store)
    assert ended["ended"] == "quarantined" and ended["last_seq"] == 20_000
    await store.close()


async def test_a_young_store_whose_wal_was_removed_is_recognised(tmp_path: Path) -> None:
    """Never checkpointed: without its -wal, the file does not even hold an epoch."""
    path = tmp_path / "buffer.db"
    last_seq = crash_holding(path, 5)
    Path(f"{path}-wal").unlink()
    store = await reopen(path)
    [record] = store.quarantined
    assert "holds no epoch" in record.reason and record.last_seq == last_seq == 500
    await store.close()


async def test_a_missing_store_with_its_witness_left_is_declared(tmp_path: Path) -> None:
    path = tmp_path / "buffer.db"
    last_seq = crash_holding(path, 30)
    store = await reopen(path)
    old_epoch = store.epoch
    await store.close()
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    store = await reopen(path)
    assert store.epoch != old_epoch and store.quarantined == []
    ended = await sealed_announcement(store)
    assert ended == {
        "epoch": old_epoch,
        "last_seq": last_seq,
        "ended": "missing",
        "detail": ended["detail"],
    }
    await store.close()


async def test_a_wal_left_without_its_database_is_moved_aside(tmp_path: Path) -> None:
    """Another instance: the file was deleted after a crash, its -wal left behind."""
    path = tmp_path / "buffer.db"
    last_seq = crash_holding(path, 30)
    wal = Path(f"{path}-wal").read_bytes()
    path.unlink()
    store = await reopen(path)
    [record] = store.quarantined
    assert "without its database" in record.reason and record.last_seq == last_seq
    assert Path(f"{record.moved_to}-wal").read_bytes() == wal, "kept as found"
    assert store.stats.batches == 0 and store.next_seq == 1
    ended = await sealed_announcement(store)
    assert ended["last_seq"] == last_seq and ended["ended"] == "quarantined"
    await store.close()


async def test_damage_without_a_witness_still_names_the_old_epoch(tmp_path: Path) -> None:
    """A store from before the witness existed: the damaged file's own meta table is read."""
    path = tmp_path / "buffer.db"
    store = await reopen(path)
    for n in range(1, 61):
        await store.append([SealedBatch(n, (n - 1) * 100 + 1, 100, time.time_ns(), bytes(3000))])
    old_epoch = store.epoch
    await store.close()
    store.mark_path.unlink()
    overwrite_pages(path, [30, 31])
    store = await reopen(path)
    [record] = store.quarantined
    assert record.epoch == old_epoch and record.last_seq == 6000
    await store.close()


async def test_a_buffer_replaced_by_another_file_declares_the_old_epoch(tmp_path: Path) -> None:
    """Another buffer file put in place (a restore, a copy): the witness's epoch ended."""
    path, other = tmp_path / "buffer.db", tmp_path / "other" / "buffer.db"
    last_seq = crash_holding(path, 20)
    store = await reopen(path)
    old_epoch = store.epoch
    await store.close()
    store = await reopen(other)
    new_epoch = store.epoch
    await store.close()
    shutil.copyfile(other, path)
    store = await reopen(path)
    assert store.epoch == new_epoch and store.quarantined == []
    ended = await sealed_announcement(store)
    assert (ended["epoch"], ended["last_seq"], ended["ended"]) == (old_epoch, last_seq, "replaced")
    await store.close()


async def test_a_healthy_store_after_a_crash_is_kept(tmp_path: Path) -> None:
    """A normal backlog and a normal crash (SIGKILL, -wal present): same epoch, nothing lost."""
    path = tmp_path / "buffer.db"
    crash_holding(path, 100)
    store = await reopen(path)
    epoch = store.epoch
    await store.close()
    last_seq = crash_holding(path, 150)  # the second process carries on the same file
    assert Path(f"{path}-wal").stat().st_size > 0
    before = {p.name for p in tmp_path.iterdir()}

    store = await reopen(path)
    assert store.epoch == epoch and store.quarantined == []
    assert store.next_seq - 1 == last_seq == 25_000
    assert store.stats.readings == 25_000 and store.stats.batches == 250
    assert await store.previous_epoch() is None
    assert quarantined_files(tmp_path) == []
    assert {p.name for p in tmp_path.iterdir()} >= before - {"buffer.db-shm"}
    await store.close()


async def test_a_file_that_cannot_be_checked_is_not_quarantined(tmp_path: Path) -> None:
    """Locked by another writer is not corrupt: the store must refuse to start, not move it."""
    path = tmp_path / "buffer.db"
    store = await reopen(path)
    await store.close()
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("PRAGMA locking_mode=EXCLUSIVE")
    holder.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(Exception, match="locked"):
            await reopen(path)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert quarantined_files(tmp_path) == []
