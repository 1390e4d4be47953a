"""A real SQLite buffer holding sealed batches, for the forwarder tests."""

from __future__ import annotations

import asyncio
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge_agent.metrics import Metrics
from edge_agent.reading import Quality, Reading
from edge_agent.seal.batcher import Batcher
from edge_agent.seal.envelope import Sealer
from edge_agent.store.sqlite import Store


async def filled_store(path: Path, batches: int) -> tuple[Store, asyncio.Event]:
    """An open store at `path` with `batches` sealed batches of 10 readings each.

    Returns the store and the batcher's `sealed` event (what a Forwarder waits on).
    """
    store = Store(path, max_bytes=64 * 1024 * 1024, max_age_s=86400)
    await store.open()
    batcher = Batcher(store, Sealer(Ed25519PrivateKey.generate()), Metrics(), gateway="gw",
                      max_readings=10, max_delay=1, capacity=1000)  # fmt: skip
    await batcher.emit([Reading("s", "p", i, i, Quality.GOOD) for i in range(10 * batches)])
    await batcher.seal_pending()
    return store, batcher.sealed
