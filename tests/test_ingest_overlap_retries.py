"""A group that meets another worker's commit more often than write.py retries it.

`write_group` writes a group again at most OVERLAP_RETRIES times when another worker committed
some of its seqs after its read, then raises OverlapError. The worker must then neither crash,
nor record the batch as unstorable, nor PUBACK it: it waits and writes the group again (its
`_retrying`), and the second writing finds the batch stored. Real database (the session's
PostgreSQL); the overlap is made certain as in test_ingest_concurrency.py: a third session
holds the ledger row while both writers copy, and the other writer reaches the lock first.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import psycopg
import pytest
from helpers.fleet import Fleet
from helpers.ingest_fleet import prepare_database
from helpers.wait import wait_for

from edge_agent.consumer.ingest import keystore, write
from edge_agent.consumer.ingest.decode import Accepted, Decoder
from edge_agent.consumer.ingest.settings import IngestSettings
from edge_agent.consumer.ingest.worker import Worker

pytestmark = pytest.mark.integration


async def test_overlap_retries_used_up_the_worker_waits_and_writes_again(
    tmp_path: Path, postgres_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(write, "OVERLAP_RETRIES", 0)  # the first overlap uses them all up
    fleet = Fleet(tmp_path / "fleet", gateways=1, payload_format=2, points=10)
    prepare_database(postgres_dsn, fleet)
    gateway = fleet.members[0]
    message = gateway.seal(100)
    with psycopg.connect(postgres_dsn) as conn:
        item = Decoder(keystore.load_trust(conn), fleet.prefix).decode(
            message.topic, message.payload
        )
        conn.execute(
            "INSERT INTO coverage (gateway, epoch) VALUES (%s, %s)",
            (gateway.gateway_id, gateway.epoch),
        )
    assert isinstance(item, Accepted)
    worker = Worker(IngestSettings(dsn=postgres_dsn, topic_prefix=fleet.prefix))

    holder = await psycopg.AsyncConnection.connect(postgres_dsn)
    other = await psycopg.AsyncConnection.connect(postgres_dsn)
    watcher = psycopg.connect(postgres_dsn, autocommit=True)

    def waiting_at_the_lock(count: int) -> bool:
        row = watcher.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND wait_event_type = 'Lock' AND query LIKE '%FOR UPDATE'"
        ).fetchone()
        return row == (count,)

    try:
        await holder.execute(
            "SELECT 1 FROM coverage WHERE gateway = %s AND epoch = %s FOR UPDATE",
            (gateway.gateway_id, gateway.epoch),
        )
        first = asyncio.create_task(write.write_group(other, [item], 100))
        await wait_for(lambda: waiting_at_the_lock(1), 10, "the other writer at the lock")
        ours = asyncio.create_task(worker._write([item]))
        await wait_for(lambda: waiting_at_the_lock(2), 10, "the worker at the lock, second")
        await holder.rollback()
        stored = await first
        written = await asyncio.wait_for(ours, 30)
    finally:
        for conn in (holder, other):
            await conn.close()
        watcher.close()
        await worker._db.reset()

    assert stored.readings == 100
    assert worker.stats.db_retries == 1  # OverlapError: waited, then written again
    assert (written.readings, written.duplicates, written.rejected) == (0, 100, 0)
    with psycopg.connect(postgres_dsn) as conn:
        assert conn.execute("SELECT count(*) FROM rejected").fetchone() == (0,)
        assert conn.execute("SELECT count(*), count(DISTINCT seq) FROM readings").fetchone() == (
            100,
            100,
        )
