"""A conflicting batch (seqs already held, from another batch) under the contract's CONFLICT rule.

The gateway seals every seq once and re-sends a batch byte for byte (contract §4.8): the same
seqs in a batch of another number are a replay of forged content by a holder of the key, a
tamper, or a bug. The reference consumer counts such readings apart from duplicates and exits 3.
`ingest` keeps (gateway, epoch, seq) unique, so it stores the readings it held first; the
conflicting batch must not pass as a re-send: it is recorded in `rejected` (reason `conflict`,
with its payload, which may be the genuine one), and its readings under held seqs are not
counted as duplicates. Real database (the session's PostgreSQL, a fresh database each).
"""

from __future__ import annotations

import time
from pathlib import Path

import psycopg
import pytest
from helpers.fleet import Fleet, Message
from helpers.ingest_fleet import decoded, prepare_database

from edge_agent.consumer.ingest.write import write_group

pytestmark = pytest.mark.integration


async def test_a_batch_under_held_seqs_with_another_number_is_recorded_as_a_conflict(
    tmp_path: Path, postgres_dsn: str
) -> None:
    fleet = Fleet(tmp_path / "fleet", gateways=1, payload_format=2, points=10)
    prepare_database(postgres_dsn, fleet)
    gateway = fleet.members[0]
    genuine = [gateway.seal(50), gateway.seal(50)]  # batches 1 and 2: seqs 1..100
    forged = gateway.sealer.seal(
        gateway=gateway.gateway_id,
        epoch=gateway.epoch,
        batch=1001,
        first_seq=26,
        readings=gateway.readings(100, time.time_ns()),
        sealed_ns=time.time_ns(),
    )  # fmt: skip  (seqs 26..125: 75 of them held, 25 new)
    conflicting = Message(gateway.topic, forged, gateway.gateway_id, gateway.epoch, 1001, 26, 100)
    first, second, other = decoded(postgres_dsn, fleet, [*genuine, conflicting])

    async with await psycopg.AsyncConnection.connect(postgres_dsn) as conn:
        await write_group(conn, [first, second], 100)
        resent = await write_group(conn, [second], 100)  # byte for byte: a duplicate
        assert (resent.duplicates, resent.rejected) == (50, 0)
        written = await write_group(conn, [other], 100)

    assert (written.readings, written.duplicates, written.rejected) == (25, 0, 1)
    with psycopg.connect(postgres_dsn) as conn:
        rejected = conn.execute(
            "SELECT reason, gateway, kid, payload_bytes, payload, detail FROM rejected"
        ).fetchall()
        ledger = conn.execute(
            "SELECT received::text, readings, duplicates FROM coverage"
        ).fetchone()
        rows = conn.execute("SELECT count(*), count(DISTINCT seq) FROM readings").fetchone()
    assert len(rejected) == 1
    reason, name, kid, size, payload, detail = rejected[0]
    assert (reason, name, kid, size) == (
        "conflict",
        gateway.gateway_id,
        gateway.kid.hex(),
        len(forged),
    )
    assert payload == forged
    assert "batch 1001" in str(detail) and "75" in str(detail), detail
    assert ledger == ("{[1,126)}", 125, 50)
    assert rows == (125, 125)
