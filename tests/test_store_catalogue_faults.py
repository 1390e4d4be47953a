"""Point catalogues in a buffer on a full file system (a real 2 MiB tmpfs): a new catalogue
written with a batch must not be what makes the file grow or eviction fail, and every batch left
must still decode with the catalogues the buffer holds."""

from __future__ import annotations

import asyncio
import random
import string
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from helpers.disk import MiB, SmallDisk

from edge_agent.consumer.completeness import Completeness
from edge_agent.metrics import Metrics
from edge_agent.reading import Quality, Reading
from edge_agent.seal.batcher import Batcher
from edge_agent.seal.catalogue import Catalogue
from edge_agent.seal.envelope import Opener, Sealer
from edge_agent.store.sqlite import Store

pytestmark = pytest.mark.faults

POINTS = 200


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[SmallDisk]:
    disk = SmallDisk(tmp_path / "disk", 2 * MiB)
    yield disk
    disk.unmount()


def names(rng: random.Random) -> list[str]:
    """Long names zstd and the token dictionary cannot shrink: a catalogue of about 7 KB."""
    return ["".join(rng.choices(string.ascii_letters, k=30)) for _ in range(POINTS)]


def readings(rng: random.Random, points: list[str], count: int, call: int) -> list[Reading]:
    """Integers on even calls, floats on odd ones: every point's type (its `pk`) changes from
    one call to the next, so each call makes a new catalogue (docs/contract.md §4.12)."""
    now = time.time_ns()
    value = (lambda: rng.randrange(1 << 40)) if call % 2 == 0 else rng.random
    return [
        Reading("sim", points[i % POINTS], now + i // POINTS, value(), Quality.GOOD, None)
        for i in range(count)
    ]


async def feed(batcher: Batcher, rng: random.Random, points: list[str], calls: int) -> None:
    for call in range(calls):
        await batcher.emit(readings(rng, points, 1000, call))
        await batcher.seal_pending()


async def account(store: Store, key: Ed25519PrivateKey) -> Completeness:
    """Decode every batch left with the catalogues the buffer holds, as a consumer would."""
    opener = Opener([key.public_key()])
    tracker = Completeness()
    for batch in await store.take(1_000_000):
        if batch.catalogue is not None and batch.catalogue not in opener.catalogues:
            payload = await store.catalogue(batch.catalogue)
            assert payload is not None, "a buffered batch's catalogue is in the buffer"
            opener.catalogues[batch.catalogue] = Catalogue.parse(payload, batch.catalogue)
        opened = opener.open(batch.data)
        tracker.accept(opened.gateway, opened.epoch, opened.readings, opened.evicted)
    tracker.accept("gw", store.epoch, [], await store.pending_evictions())
    return tracker


async def test_a_full_disk_keeps_taking_batches_that_bring_new_catalogues(
    small_disk: SmallDisk,
) -> None:
    key, rng = Ed25519PrivateKey.generate(), random.Random(7)
    points = names(rng)
    store = Store(small_disk.path / "buffer.db", max_bytes=1024 * MiB, max_age_s=86400)
    await store.open()
    sealer = Sealer(key, payload_format=2, catalogue=True)
    batcher = Batcher(store, sealer, Metrics(), gateway="gw", max_readings=200, max_delay=0.05,
                      capacity=20_000)  # fmt: skip
    fed = 0
    while not store.disk_full:
        await feed(batcher, rng, points, 2)
        fed += 2000
        assert fed < 2_000_000, "the disk never filled up"
    size_when_full = store.path.stat().st_size
    made: set[bytes] = set()

    async def churn() -> None:
        for call in range(40):
            await batcher.emit(readings(rng, points, 1000, call))
            await batcher.seal_pending()
            newest = await store.newest_catalogue()
            assert newest is not None
            made.add(newest[0])

    await asyncio.wait_for(churn(), 60)
    fed += 40_000
    assert store.next_seq - 1 == fed, "every reading was sealed"
    assert len(made) >= 2, "new catalogues came while the disk was full"
    assert store.path.stat().st_size == size_when_full, "the file keeps its size while full"
    assert store.failures == {}
    assert await store.catalogue_count() <= 3, "catalogues leave with their batches"
    tracker = await account(store, key)
    assert tracker.holes() == {}, "every evicted reading is declared"
    [stream] = tracker.streams.values()
    assert stream.max_seq == fed
    await store.close()
