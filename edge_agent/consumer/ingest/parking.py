"""Point catalogues and the batches parked for theirs, in PostgreSQL (contract §4.12).

A worker keeps every catalogue it accepts in `catalogues` (by digest; the same catalogue from
every worker is one row), so that a worker that starts later or restarts has it. A batch whose
catalogue a worker does not have is authentic (its signature was checked) but cannot be decoded
yet: it is *parked* (`parked`, in its group's transaction: acknowledged to the broker only once
committed, as every message), and written as any batch, then deleted from `parked` in the same
transaction, once the catalogue is there (write.py, `write_parked`).

No batch stays parked once its catalogue is stored, whichever workers do what when. A worker
that parks batches asks, *after* its COMMIT, which of their digests have a catalogue (`ready`);
a worker that stores a catalogue asks, after its COMMIT, which of its digests have parked
batches (`ready` too). Of two such transactions, the one that commits second makes its read
after the other's COMMIT, so it sees what the other wrote: at least one of the two workers finds
the batch and its catalogue both stored. (A check *inside* the parking transaction would not
do: under READ COMMITTED it sees a catalogue only if that committed before the check, and the
catalogue's worker sees the parked rows only once they committed: each can miss the other.)
A worker killed between its COMMIT and that read leaves the work to the others' `sweep` (at
start, and every PARKED_SWEEP_S s): every digest that has both.

Parked rows are taken FOR UPDATE SKIP LOCKED: two workers unparking the same digest take
different batches, and one that dies mid-way rolls back, leaving its batches parked (and locked
no more) for the next sweep. Writing a batch that is already stored counts it as a duplicate
(the ledger's rules, write.py): unparking is idempotent.
"""

from __future__ import annotations

from collections.abc import Sequence

import psycopg

from edge_agent.consumer.ingest.decode import CatalogueItem, Parked

AConn = psycopg.AsyncConnection[tuple[object, ...]]

PARKED_SWEEP_S = 10.0
"""How often a worker looks for parked batches whose catalogue is stored."""


async def store_catalogues(conn: AConn, items: Sequence[CatalogueItem]) -> list[bytes]:
    """Store the catalogues of `items` (each digest once; one already stored stays as it is),
    in a transaction of their own, committed; the digests of those that were new.

    Their own transaction, short: every worker receives every catalogue at about the same
    moment, and a row inserted in a group's long transaction would make the others wait on
    its unique key for the whole of it (or deadlock with the ledger's locks).
    """
    unique = {item.catalogue.digest: item for item in items}
    ordered = sorted(unique.items())  # one order for every worker: no deadlock between them
    async with conn.transaction():
        cursor = await conn.execute(
            "INSERT INTO catalogues (digest, gateway, payload)"
            " SELECT * FROM unnest(%s::bytea[], %s::text[], %s::bytea[])"
            " ON CONFLICT (digest) DO NOTHING RETURNING digest",
            (
                [d for d, _ in ordered],
                [i.gateway for _, i in ordered],
                [i.catalogue.payload for _, i in ordered],
            ),
        )
        return sorted(bytes(row[0]) for row in await cursor.fetchall())  # type: ignore[call-overload]


async def park(conn: AConn, items: Sequence[Parked]) -> None:
    """Insert `items` into `parked` (in the caller's transaction), each (gateway, epoch,
    batch) once: a copy of a batch parked already (an end-to-end agent's re-send of a batch
    that nobody acknowledged, as parked ones are not) is left out."""
    await conn.cursor().executemany(
        "INSERT INTO parked (digest, topic, gateway, epoch, batch, seqs, readings, kid, payload)"
        " VALUES (%s, %s, %s, %s, %s, %s::int8multirange, %s, %s, %s)"
        " ON CONFLICT (gateway, epoch, batch) DO NOTHING",
        [
            (
                p.digest, p.topic, p.gateway, p.epoch, p.batch, _multirange(p.seqs), p.readings,
                p.kid, p.payload,
            )
            for p in items
        ],
    )  # fmt: skip


async def ready(conn: AConn, digests: Sequence[bytes] | None = None) -> list[bytes]:
    """The digests (of `digests`, or all) that have both a stored catalogue and parked batches,
    as committed now (its own transaction: call it after the COMMIT that parked or stored)."""
    async with conn.transaction():
        cursor = await conn.execute(
            "SELECT c.digest FROM catalogues c"
            " WHERE (%(d)s::bytea[] IS NULL OR c.digest = ANY(%(d)s::bytea[]))"
            " AND EXISTS (SELECT 1 FROM parked p WHERE p.digest = c.digest)"
            " ORDER BY c.digest",
            {"d": None if digests is None else list(digests)},
        )
        return [bytes(row[0]) for row in await cursor.fetchall()]  # type: ignore[call-overload]


async def take(conn: AConn, digest: bytes, limit: int) -> list[tuple[int, str, bytes]]:
    """(id, topic, payload) of at most `limit` parked batches of `digest`, oldest first, locked
    (in the caller's transaction) and skipping those another worker has locked."""
    cursor = await conn.execute(
        "SELECT id, topic, payload FROM parked WHERE digest = %s ORDER BY id LIMIT %s"
        " FOR UPDATE SKIP LOCKED",
        (digest, limit),
    )
    return [
        (int(str(i)), str(t), bytes(p))  # type: ignore[call-overload]
        for i, t, p in await cursor.fetchall()
    ]


async def unpark(conn: AConn, ids: Sequence[int]) -> None:
    """Delete the parked batches `ids` (in the caller's transaction: the one that wrote them)."""
    await conn.execute("DELETE FROM parked WHERE id = ANY(%s)", (list(ids),))


CATALOGUES_SQL = (
    "SELECT digest, payload FROM ("
    " SELECT digest, payload, received FROM catalogues"
    " WHERE %(d)s::bytea[] IS NULL OR digest = ANY(%(d)s::bytea[])"
    " ORDER BY received DESC LIMIT %(n)s) newest ORDER BY received"
)
"""The stored catalogues (`{"d": None}`: all; `{"d": [digest, ...]}`: those), the newest
`{"n": ...}` of them, oldest first, as (digest, payload) rows: what a worker's book is loaded
from (at start, the newest: those its gateways are likely to use)."""
START_CATALOGUES = 10_000
"""Catalogues a worker loads at start at most, the newest (its book keeps what fits)."""


def _multirange(ranges: Sequence[tuple[int, int]]) -> str:
    """Inclusive ranges as an int8multirange literal (empty ranges left out)."""
    return "{" + ",".join(f"[{a},{b + 1})" for a, b in ranges if a <= b) + "}"
