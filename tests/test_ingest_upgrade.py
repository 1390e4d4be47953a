"""`ingest migrate` from schema version 1, on a database holding data, with workers running.

Version 2 drops `readings`' primary key: uniqueness of (gateway, epoch, seq) then rests on the
ledger check that version-2 workers make under the ledger row's lock (write.py). A version-1
worker started before the migration checks the schema version only at its start, and keeps
writing as version 1 did: read the ledger, COPY, lock the ledger row, add what it copied,
COMMIT, relying on the primary key to refuse a reading another worker committed meanwhile.
These tests run on the real database (the session's PostgreSQL, a fresh database each), the
version-1 writer's statements issued one by one as its transaction issues them.
"""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest
from helpers.fleet import Fleet
from helpers.ingest import ingest

from edge_agent.consumer.ingest import keystore, schema
from edge_agent.consumer.ingest.decode import Accepted, Decoder
from edge_agent.consumer.ingest.rows import COPY_SQL
from edge_agent.consumer.ingest.write import write_group

pytestmark = pytest.mark.integration


def at_version_1(dsn: str, fleet: Fleet, version: int = 1) -> None:
    """The database as `ingest migrate` of schema version 1 (or `version`) left it, the
    fleet's keys in it."""
    steps = schema.migrations(False)[:version]
    assert [step.version for step in steps] == list(range(1, version + 1))
    with psycopg.connect(dsn) as conn:
        conn.execute(
            "CREATE TABLE schema_version (version int PRIMARY KEY, description text NOT NULL,"
            " applied timestamptz NOT NULL DEFAULT now())"
        )
        for step in steps:
            conn.execute(step.sql.encode())
            conn.execute(
                "INSERT INTO schema_version (version, description) VALUES (%s, %s)",
                (step.version, step.description),
            )
        for gateway, pem in fleet.key_files():
            keystore.add_key(conn, gateway, pem)


def decoded(dsn: str, fleet: Fleet, count: int) -> list[Accepted]:
    """`count` batches of 100 readings of the fleet's one gateway, decoded as a worker does."""
    gateway = fleet.members[0]
    messages = [gateway.seal(100) for _ in range(count)]
    with psycopg.connect(dsn) as conn:
        decoder = Decoder(keystore.load_trust(conn), fleet.prefix)
    items = [decoder.decode(m.topic, m.payload) for m in messages]
    assert all(isinstance(i, Accepted) for i in items), items
    return items  # type: ignore[return-value]


def rows_and_distinct(dsn: str) -> tuple[int, int]:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT count(*), count(DISTINCT (gateway, epoch, seq)) FROM readings"
        ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])  # type: ignore[call-overload]


async def test_migrate_from_version_1_with_data_keeps_every_reading(
    tmp_path: Path, postgres_dsn: str
) -> None:
    fleet = Fleet(tmp_path / "fleet", gateways=1, payload_format=2, points=10)
    at_version_1(postgres_dsn, fleet)
    items = decoded(postgres_dsn, fleet, 4)
    async with await psycopg.AsyncConnection.connect(postgres_dsn) as conn:
        await write_group(conn, items[:3], 100)  # written at version 1, under its primary key

    migrated = ingest("migrate", "--dsn", postgres_dsn)
    assert migrated.returncode == 0, migrated.stderr
    assert f"schema version 1 -> {schema.VERSION}" in migrated.stdout
    assert rows_and_distinct(postgres_dsn) == (300, 300)

    async with await psycopg.AsyncConnection.connect(postgres_dsn) as conn:
        again = await write_group(conn, items, 100)  # a replay, and one new batch
    assert (again.readings, again.duplicates) == (100, 300)
    assert rows_and_distinct(postgres_dsn) == (400, 400)
    report = ingest("report", "--dsn", postgres_dsn)
    assert report.returncode == 0, report.stdout
    assert "holes=0" in report.stdout


async def test_a_version_1_writer_still_running_after_migrate_stores_nothing_twice(
    tmp_path: Path, postgres_dsn: str
) -> None:
    """A version-1 worker's group reads the ledger and copies a batch; meanwhile a version-2
    worker stores the same batch (a redelivery) and commits; the version-1 group then locks
    the ledger row and adds its seqs, without the check version 2 makes. Its COMMIT must not
    go through: the seqs are held already (version 1 counted on the primary key for that,
    which the migration dropped). It must fail as version 1 retries (a serialisation failure:
    its retry reads the ledger afresh and copies nothing)."""
    fleet = Fleet(tmp_path / "fleet", gateways=1, payload_format=2, points=10)
    at_version_1(postgres_dsn, fleet)
    (item,) = decoded(postgres_dsn, fleet, 1)
    key = (item.batch.gateway, item.batch.epoch)
    with psycopg.connect(postgres_dsn) as conn:
        conn.execute("INSERT INTO coverage (gateway, epoch) VALUES (%s, %s)", key)
    migrated = ingest("migrate", "--dsn", postgres_dsn)
    assert migrated.returncode == 0, migrated.stderr

    old = await psycopg.AsyncConnection.connect(postgres_dsn)
    try:
        cursor = await old.execute(
            "SELECT stream, received::text FROM coverage WHERE gateway = %s AND epoch = %s", key
        )
        row = await cursor.fetchone()
        assert row is not None and row[1] == "{}"
        head = f"{row[0]}\t"
        async with old.cursor().copy(COPY_SQL) as pipe:
            await pipe.write((head + head.join(item.rows)).encode())

        async with await psycopg.AsyncConnection.connect(postgres_dsn) as new:
            stored = await write_group(new, [item], 100)  # not held up: no unique index
        assert stored.readings == 100

        await old.execute(
            "SELECT 1 FROM coverage WHERE gateway = %s AND epoch = %s FOR UPDATE", key
        )
        with pytest.raises(psycopg.errors.SerializationFailure):
            await old.execute(
                "UPDATE coverage SET received = received + '{[1,101)}',"
                " batches = batches + '{[1,2)}', readings = readings + 100"
                " WHERE gateway = %s AND epoch = %s",
                key,
            )
            await old.commit()
        await old.rollback()
    finally:
        await old.close()
    assert rows_and_distinct(postgres_dsn) == (100, 100)


async def test_migrate_from_version_2_keeps_the_gaps_the_view_gave(
    tmp_path: Path, postgres_dsn: str
) -> None:
    """Version 3 replaces the view `ingest_gaps` (parked batches are `pending`): on a database
    without any, it gives the rows version 2's gave, a hole and a tail."""
    fleet = Fleet(tmp_path / "fleet", gateways=1, payload_format=2, points=10)
    at_version_1(postgres_dsn, fleet, version=2)
    items = decoded(postgres_dsn, fleet, 4)  # seqs 1..400; the second batch never arrives
    async with await psycopg.AsyncConnection.connect(postgres_dsn) as conn:
        await write_group(conn, [items[0], items[2]], 100)
    gateway = fleet.members[0]
    with psycopg.connect(postgres_dsn) as conn:
        conn.execute(
            "INSERT INTO hwm (gateway, epoch, seq, batch, sealed_ns) VALUES (%s, %s, 400, 4, 1)",
            (gateway.gateway_id, gateway.epoch),
        )
    gaps = "SELECT kind, first_seq, last_seq, detail FROM ingest_gaps ORDER BY first_seq"
    with psycopg.connect(postgres_dsn) as conn:
        before = conn.execute(gaps).fetchall()
    assert [g[:3] for g in before] == [("hole", 101, 200), ("tail", 301, 400)]
    migrated = ingest("migrate", "--dsn", postgres_dsn)
    assert migrated.returncode == 0, migrated.stderr
    assert "schema version 2 -> 3" in migrated.stdout
    with psycopg.connect(postgres_dsn) as conn:
        assert conn.execute(gaps).fetchall() == before
