"""Two ingest workers merging ranges of one epoch at once: the ledger stays exact.

Against the real database (the session's PostgreSQL, a fresh database): two connections, as two
workers have, write groups of one gateway's batches with `write_group`, the worker's own
transaction. The first case makes them start *at once* for certain: a third session holds the
epoch's ledger row (created, not committed) while both writers block on it (PostgreSQL's
`pg_stat_activity` shows both waiting), then lets go. The second runs many groups of both
writers concurrently, with overlapping redeliveries, as a shared subscription spreads a
gateway's batches over workers in any order.
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import psycopg
import pytest
from helpers.fleet import Fleet
from helpers.ingest_fleet import decoded, prepare_database
from helpers.wait import wait_for

from edge_agent.consumer.ingest.decode import Accepted
from edge_agent.consumer.ingest.write import Written, parse_multirange, write_group

pytestmark = pytest.mark.integration


def ledger_row(dsn: str, gateway: str, epoch: str) -> tuple[list[tuple[int, int]], int, int, int]:
    """(received ranges, readings, duplicates, rows in `readings`) of one (gateway, epoch)."""
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT received::text, readings, duplicates FROM coverage"
            " WHERE gateway = %s AND epoch = %s",
            (gateway, epoch),
        ).fetchone()
        assert row is not None
        rows = conn.execute(
            "SELECT count(*), count(DISTINCT seq) FROM readings WHERE gateway = %s AND epoch = %s",
            (gateway, epoch),
        ).fetchone()
    assert rows is not None and rows[0] == rows[1]
    return parse_multirange(str(row[0])), int(row[1]), int(row[2]), int(rows[0])  # type: ignore[call-overload]


async def test_two_writers_blocked_on_one_epoch_then_released_at_once(
    tmp_path: Path, postgres_dsn: str
) -> None:
    fleet = Fleet(tmp_path / "fleet", gateways=1, payload_format=2, points=10)
    prepare_database(postgres_dsn, fleet)
    gateway = fleet.members[0]
    messages = [gateway.seal(100) for _ in range(6)]  # seqs 1..600
    items = decoded(postgres_dsn, fleet, messages)
    # Worker A has batches 1, 2, 3, 4; worker B has 3, 4 (redelivered), 5, 6: they overlap.
    group_a, group_b = items[0:4], items[2:6]

    holder = await psycopg.AsyncConnection.connect(postgres_dsn)
    a = await psycopg.AsyncConnection.connect(postgres_dsn)
    b = await psycopg.AsyncConnection.connect(postgres_dsn)
    watcher = psycopg.connect(postgres_dsn, autocommit=True)

    def both_writers_wait() -> bool:
        assert not any(w.done() for w in writes), "a writer did not wait for the ledger row"
        row = watcher.execute(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE datname = current_database() AND wait_event_type = 'Lock'"
        ).fetchone()
        return row == (2,)

    try:
        await holder.execute(
            "INSERT INTO coverage (gateway, epoch) VALUES (%s, %s)",
            (gateway.gateway_id, gateway.epoch),
        )  # not committed: both writers' ledger row is held by this transaction
        writes = [
            asyncio.create_task(write_group(a, group_a, 100)),
            asyncio.create_task(write_group(b, group_b, 100)),
        ]
        await wait_for(both_writers_wait, 10, "both writers waiting on the epoch's ledger row")
        await holder.commit()
        done: list[Written] = await asyncio.gather(*writes)
    finally:
        for conn in (holder, a, b):
            await conn.close()
        watcher.close()

    received, readings, duplicates, rows = ledger_row(
        postgres_dsn, gateway.gateway_id, gateway.epoch
    )
    assert received == [(1, 600)]
    assert (readings, rows) == (600, 600)
    assert duplicates == 200  # batches 3 and 4 arrived twice; stored once
    # Whichever went first stored 400 readings; the other found its overlap already received.
    assert sorted(w.readings for w in done) == [200, 400]
    assert sum(w.duplicates for w in done) == 200
    # Each writer's ledger is what it committed: the later one holds everything.
    final = [ledger for w in done for ledger in w.ledgers]
    assert max(len(ledger.seqs) for ledger in final) == 1
    assert [(1, 600)] in [ledger.seqs for ledger in final]


async def test_many_groups_of_one_epoch_from_two_writers_in_any_order(
    tmp_path: Path, postgres_dsn: str
) -> None:
    fleet = Fleet(tmp_path / "fleet", gateways=2, payload_format=0, points=10)
    prepare_database(postgres_dsn, fleet)
    messages = fleet.seal_rounds(60, readings=50)  # 2 gateways x 3,000 readings
    items = decoded(postgres_dsn, fleet, messages)
    rnd = random.Random(13)
    # A shared subscription hands each batch to one writer, in any order; a crash makes a
    # writer receive some again (redelivered), possibly while the other writes next to them.
    shares: list[list[Accepted]] = [[], []]
    for item in items:
        shares[rnd.randrange(2)].append(item)
    redelivered = rnd.sample(items, 30)
    for n, item in enumerate(redelivered):
        shares[n % 2].append(item)
    for share in shares:
        rnd.shuffle(share)

    async def writer(share: list[Accepted]) -> list[Written]:
        async with await psycopg.AsyncConnection.connect(postgres_dsn) as conn:
            out = []
            for start in range(0, len(share), 3):
                out.append(await write_group(conn, share[start : start + 3], 100))
            return out

    results = await asyncio.gather(writer(shares[0]), writer(shares[1]))
    for member in fleet.members:
        received, readings, duplicates, rows = ledger_row(
            postgres_dsn, member.gateway_id, member.epoch
        )
        assert received == [(1, 3000)], member.gateway_id
        assert (readings, rows) == (3000, 3000)
    total_duplicates = sum(w.duplicates for r in results for w in r)
    assert total_duplicates == 30 * 50


async def test_two_writers_copy_the_same_readings_and_the_ledger_check_keeps_one(
    tmp_path: Path, postgres_dsn: str
) -> None:
    """`readings` has no unique index: two writers that read the ledger before either
    committed both copy the readings they share; the check under the ledger row's lock rolls
    back whichever comes second, which writes again from a fresh read."""
    fleet = Fleet(tmp_path / "fleet", gateways=1, payload_format=2, points=10)
    prepare_database(postgres_dsn, fleet)
    gateway = fleet.members[0]
    messages = [gateway.seal(100) for _ in range(4)]  # seqs 1..400
    items = decoded(postgres_dsn, fleet, messages)
    group_a, group_b = items[0:3], items[1:4]  # batches 2 and 3 in both
    key = (gateway.gateway_id, gateway.epoch)
    with psycopg.connect(postgres_dsn) as setup:
        setup.execute("INSERT INTO coverage (gateway, epoch) VALUES (%s, %s)", key)
        indexes = setup.execute(
            "SELECT count(*) FROM pg_index WHERE indrelid = 'readings'::regclass AND indisunique"
        ).fetchone()
    assert indexes == (0,)

    holder = await psycopg.AsyncConnection.connect(postgres_dsn)
    a = await psycopg.AsyncConnection.connect(postgres_dsn)
    b = await psycopg.AsyncConnection.connect(postgres_dsn)
    watcher = psycopg.connect(postgres_dsn, autocommit=True)

    def both_copied_and_wait_at_the_ledger() -> bool:
        assert not any(w.done() for w in writes), "a writer did not wait for the ledger row"
        row = watcher.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND wait_event_type = 'Lock' AND query LIKE '%FOR UPDATE'"
        ).fetchone()
        return row == (2,)

    try:
        await holder.execute(
            "SELECT 1 FROM coverage WHERE gateway = %s AND epoch = %s FOR UPDATE", key
        )  # the ledger row locked: both writers read it, copy, and wait for its lock
        writes = [
            asyncio.create_task(write_group(a, group_a, 100)),
            asyncio.create_task(write_group(b, group_b, 100)),
        ]
        await wait_for(both_copied_and_wait_at_the_ledger, 10, "both writers at the lock")
        # Both COPYs done, neither committed:
        assert watcher.execute("SELECT count(*) FROM readings").fetchone() == (0,)
        await holder.rollback()
        done: list[Written] = await asyncio.gather(*writes)
    finally:
        for conn in (holder, a, b):
            await conn.close()
        watcher.close()

    received, readings, duplicates, rows = ledger_row(postgres_dsn, *key)
    assert received == [(1, 400)]
    assert (readings, rows) == (400, 400)  # and no seq twice (ledger_row checks it)
    assert duplicates == 200
    assert sorted(w.retries for w in done) == [0, 1]
    assert sorted(w.readings for w in done) == [100, 300]
