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


SCHEMA_BEFORE_CATALOGUES = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value) WITHOUT ROWID;
CREATE TABLE batches (
    id INTEGER PRIMARY KEY, first_seq INTEGER NOT NULL, last_seq INTEGER NOT NULL,
    readings INTEGER NOT NULL, bytes INTEGER NOT NULL, sealed_ns INTEGER NOT NULL,
    data BLOB NOT NULL, sent_ns INTEGER);
CREATE TABLE notices (
    id INTEGER PRIMARY KEY, readings INTEGER NOT NULL, bytes INTEGER NOT NULL,
    sealed_ns INTEGER NOT NULL, data BLOB NOT NULL, sent_ns INTEGER);
CREATE TABLE pending_evictions (first_seq INTEGER PRIMARY KEY, last_seq INTEGER NOT NULL);
CREATE TABLE eviction_reasons (first_seq INTEGER PRIMARY KEY, reason TEXT NOT NULL);
CREATE INDEX batches_unsent ON batches (id) WHERE sent_ns IS NULL;
CREATE INDEX batches_sent ON batches (sent_ns) WHERE sent_ns IS NOT NULL;
"""
"""The buffer's schema before point catalogues (store/sqlite.py at 269deb3, contract 2.3)."""
