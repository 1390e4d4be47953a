"""A group of decoded messages into PostgreSQL, in one transaction.

Why no reading is ever stored twice, with several workers at once: the `received` multirange of
each (gateway, epoch) says exactly which seqs `readings` holds, and grows in the same
transaction as the rows. A group reads it, copies only the readings outside it (COPY, no
per-row INSERT), then locks the ledger rows (`SELECT ... FOR UPDATE`, in key order so that two
workers never wait on each other in a cycle) and adds what it copied. The lock is taken *after*
the COPY, so that workers copy in parallel and hold the ledger only for its update and the
COMMIT: locked before the COPY, every group of a fleet (each holds batches of most gateways)
would wait for the previous one's whole COPY, and a second worker would add no throughput
(bench/ingest.py). The primary key, (stream, seq) with `stream` one to one with (gateway,
epoch), makes this exact: a reading that
another worker committed after our read makes our COPY fail (a unique violation; one still
uncommitted makes it wait for that worker's COMMIT first), and the group is written again from
a fresh read of the ledger (OVERLAP_RETRIES times at most). A replay finds its seqs already
received and writes nothing; a worker killed before COMMIT wrote nothing.

The ledger rows of new (gateway, epoch)s are created, empty, in a transaction of their own
before the group's: created in it, a second worker's first group of the same epoch would wait
for the whole of the first's. An empty row means nothing stored yet, as no row does.

Returns the ledger of every (gateway, epoch) written, as committed, for the acknowledgements.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import psycopg
from psycopg import errors as pg_errors

from edge_agent.consumer.completeness import Coverage
from edge_agent.consumer.ingest.decode import Accepted, Item, Rejection, Status
from edge_agent.consumer.ingest.rows import COPY_SQL
from edge_agent.seal.hwm import HighWaterMark

AConn = psycopg.AsyncConnection[tuple[object, ...]]
_RANGE = re.compile(r"\[(-?\d+),(-?\d+)\)")
OVERLAP_RETRIES = 5
"""Times a group is written again because another worker stored some of its readings first."""


def parse_multirange(text: str) -> list[tuple[int, int]]:
    """'{[1,11),[21,31)}' (PostgreSQL's canonical int8multirange) as inclusive ranges."""
    return [(int(a), int(b) - 1) for a, b in _RANGE.findall(text)]


def multirange(ranges: Sequence[tuple[int, int]]) -> str:
    """Inclusive ranges as an int8multirange literal."""
    return "{" + ",".join(f"[{a},{b + 1})" for a, b in ranges) + "}"


@dataclass
class _Stream:
    number: int
    received: Coverage
    new: list[tuple[int, int]] = field(default_factory=list)
    evicted: list[tuple[int, int]] = field(default_factory=list)
    batches: list[tuple[int, int]] = field(default_factory=list)
    readings: int = 0
    duplicates: int = 0


@dataclass(frozen=True)
class Ledger:
    """One (gateway, epoch) as committed: the seqs held (received or declared evicted) and the
    batch numbers held, as inclusive ranges, ascending."""

    gateway: str
    epoch: str
    seqs: list[tuple[int, int]]
    batches: list[tuple[int, int]]


@dataclass
class Written:
    """What a group's transaction did."""

    ledgers: list[Ledger] = field(default_factory=list)
    readings: int = 0
    duplicates: int = 0
    rejected: int = 0
    copy_s: float = 0.0
    """Time the COPY of the readings took."""


async def write_group(conn: AConn, items: Sequence[Item], rejected_keep: int) -> Written:
    """Write `items` in one transaction and commit; raise psycopg.Error (nothing written).

    Written again from a fresh read of the ledger when another worker committed some of the
    same readings meanwhile (or a deadlock between overlapping groups was broken), at most
    OVERLAP_RETRIES times; then the error is raised.
    """
    accepted = [i for i in items if isinstance(i, Accepted)]
    keys = sorted({(a.batch.gateway, a.batch.epoch) for a in accepted})
    if keys:
        async with conn.transaction():
            await conn.execute(
                # Only the rows missing: an INSERT that conflicts still draws a stream number,
                # and every group names the epochs it writes.
                "INSERT INTO coverage (gateway, epoch)"
                " SELECT g, e FROM unnest(%s::text[], %s::text[]) AS k(g, e)"
                " WHERE NOT EXISTS (SELECT 1 FROM coverage c WHERE c.gateway = k.g"
                " AND c.epoch = k.e) ORDER BY g, e ON CONFLICT DO NOTHING",
                ([k[0] for k in keys], [k[1] for k in keys]),
            )
    attempt = 0
    while True:
        try:
            return await _write_once(conn, items, accepted, keys, rejected_keep)
        except (pg_errors.UniqueViolation, pg_errors.DeadlockDetected):
            attempt += 1
            if attempt > OVERLAP_RETRIES:
                raise


async def _write_once(
    conn: AConn,
    items: Sequence[Item],
    accepted: list[Accepted],
    keys: list[tuple[str, str]],
    rejected_keep: int,
) -> Written:
    done = Written()
    async with conn.transaction():
        streams: dict[tuple[str, str], _Stream] = {}
        if keys:
            cursor = await conn.execute(
                "SELECT gateway, epoch, stream, received::text FROM coverage"
                " WHERE (gateway, epoch) IN (SELECT * FROM unnest(%s::text[], %s::text[]))",
                ([k[0] for k in keys], [k[1] for k in keys]),
            )
            for gateway, epoch, number, received in await cursor.fetchall():
                ranges = [list(r) for r in parse_multirange(str(received))]
                streams[(str(gateway), str(epoch))] = _Stream(int(str(number)), Coverage(ranges))
        copy: list[str] = []
        evictions: list[tuple[str, str, int, int, str, int]] = []
        ends: list[tuple[str, str, str | None, int | None, str, str]] = []
        for item in accepted:
            batch = item.batch
            stream = streams[(batch.gateway, batch.epoch)]
            stream.batches.append((batch.batch, batch.batch))
            if item.rows:
                first = item.first
                last = first + len(item.rows) - 1
                new = stream.received.add(first, last)
                stream.new.extend(new)
                head = f"{stream.number}\t"
                for a, b in new:
                    # Every row ends with a newline: the stream number joins them in C.
                    copy.append(head + head.join(item.rows[a - first : b - first + 1]))
                fresh = sum(b - a + 1 for a, b in new)
                stream.readings += fresh
                stream.duplicates += len(item.rows) - fresh
            for (a, b), reason in zip(batch.evicted, batch.evicted_reasons, strict=True):
                stream.evicted.append((a, b))
                evictions.append((batch.gateway, batch.epoch, a, b, reason, batch.batch))
            ended = batch.previous_epoch
            if ended is not None:
                ends.append((
                    batch.gateway, batch.epoch, ended.epoch, ended.last_seq, ended.ended,
                    ended.detail,
                ))  # fmt: skip
        if copy:
            began = time.perf_counter()
            async with conn.cursor().copy(COPY_SQL) as pipe:
                await pipe.write("".join(copy).encode())
            done.copy_s = time.perf_counter() - began
        if streams:
            await conn.execute(
                "SELECT 1 FROM coverage"
                " WHERE (gateway, epoch) IN (SELECT * FROM unnest(%s::text[], %s::text[]))"
                " ORDER BY gateway, epoch FOR UPDATE",
                ([k[0] for k in keys], [k[1] for k in keys]),
            )
            await _update_ledger(conn, streams, done)
        if evictions:
            await conn.cursor().executemany(
                "INSERT INTO evictions (gateway, epoch, first_seq, last_seq, reason, batch)"
                " VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
                sorted(evictions),
            )
        if ends:
            ends.sort(key=lambda e: (e[0], e[1]))
            await conn.cursor().executemany(
                "INSERT INTO epoch_ends (gateway, declared_epoch, ended_epoch, last_seq, ended,"
                " detail) VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
                ends,
            )
        await _small_items(conn, items, rejected_keep, done)
    return done


async def _update_ledger(
    conn: AConn, streams: dict[tuple[str, str], _Stream], done: Written
) -> None:
    keys = sorted(streams)
    rows = [
        (
            g,
            e,
            multirange(_merged(streams[(g, e)].new)),
            multirange(_merged(streams[(g, e)].evicted)),
            multirange(_merged(streams[(g, e)].batches)),
            streams[(g, e)].readings,
            streams[(g, e)].duplicates,
        )
        for g, e in keys
    ]
    columns = [list(c) for c in zip(*rows, strict=True)]
    cursor = await conn.execute(
        "UPDATE coverage c SET received = c.received + u.received::int8multirange,"
        " evicted = c.evicted + u.evicted::int8multirange,"
        " batches = c.batches + u.batches::int8multirange,"
        " readings = c.readings + u.readings, duplicates = c.duplicates + u.duplicates,"
        " updated = now()"
        " FROM unnest(%s::text[], %s::text[], %s::text[], %s::text[], %s::text[],"
        " %s::int8[], %s::int8[]) AS u(gateway, epoch, received, evicted, batches, readings,"
        " duplicates)"
        " WHERE c.gateway = u.gateway AND c.epoch = u.epoch"
        " RETURNING c.gateway, c.epoch, (c.received + c.evicted)::text, c.batches::text",
        columns,
    )
    for gateway, epoch, seqs, batches in await cursor.fetchall():
        done.ledgers.append(
            Ledger(
                str(gateway),
                str(epoch),
                parse_multirange(str(seqs)),
                parse_multirange(str(batches)),
            )
        )
    done.readings += sum(s.readings for s in streams.values())
    done.duplicates += sum(s.duplicates for s in streams.values())


def _merged(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    coverage = Coverage()
    for a, b in ranges:
        coverage.add(a, b)
    return [(a, b) for a, b in coverage.ranges()]


async def _small_items(
    conn: AConn, items: Sequence[Item], rejected_keep: int, done: Written
) -> None:
    """High-water marks, statuses and rejections of the group."""
    marks: dict[tuple[str, str], HighWaterMark] = {}
    statuses: dict[str, str] = {}
    rejections = []
    for item in items:
        if isinstance(item, HighWaterMark):
            key = (item.gateway, item.epoch)
            if key not in marks or marks[key].seq <= item.seq:
                marks[key] = item
        elif isinstance(item, Status):
            statuses[item.gateway] = item.text
        elif isinstance(item, Rejection):
            rejections.append(item)
    if marks:
        await conn.cursor().executemany(
            "INSERT INTO hwm (gateway, epoch, seq, batch, sealed_ns) VALUES (%s, %s, %s, %s, %s)"
            " ON CONFLICT (gateway, epoch) DO UPDATE SET seq = EXCLUDED.seq,"
            " batch = EXCLUDED.batch, sealed_ns = EXCLUDED.sealed_ns, received = now()"
            " WHERE hwm.seq <= EXCLUDED.seq",
            [(m.gateway, m.epoch, m.seq, m.batch, m.sealed_ns) for _, m in sorted(marks.items())],
        )
    if statuses:
        await conn.cursor().executemany(
            "INSERT INTO gateway_status (gateway, status) VALUES (%s, %s)"
            " ON CONFLICT (gateway) DO UPDATE SET status = EXCLUDED.status, received = now()",
            sorted(statuses.items()),
        )
    if rejections:
        await conn.cursor().executemany(
            "INSERT INTO rejected (topic, reason, detail, gateway, kid, payload_bytes, payload)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s)",
            [
                (r.topic, r.reason, r.detail[:2000], r.gateway, r.kid, r.payload_bytes, r.payload)
                for r in rejections
            ],
        )
        await conn.execute(
            "DELETE FROM rejected WHERE id <= (SELECT max(id) FROM rejected) - %s",
            (rejected_keep,),
        )
        done.rejected += len(rejections)
