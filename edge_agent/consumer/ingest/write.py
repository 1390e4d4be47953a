"""A group of decoded messages into PostgreSQL, in one transaction.

Why no reading is ever stored twice, with several workers at once: the `received` multirange of
each (gateway, epoch) says exactly which seqs `readings` holds, and grows in the same
transaction as the rows, under the lock of its row. A group reads it, copies only the readings
outside it (COPY, no per-row INSERT), then locks the ledger rows (`SELECT ... FOR UPDATE`, in
key order so that two workers never wait on each other in a cycle), checks that the ledger as
now committed holds none of the seqs it copied, and adds them. Another worker that committed
some of the same seqs after our read has done so under that lock, so the check sees them: the
group is rolled back and written again from a fresh read of the ledger (OVERLAP_RETRIES times
at most). The lock is taken *after* the COPY, so that workers copy in parallel and hold the
ledger only for its check, its update and the COMMIT: locked before the COPY, every group of a
fleet (each holds batches of most gateways) would wait for the previous one's whole COPY, and a
second worker would add no throughput (bench/ingest.py). A replay finds its seqs already
received and writes nothing; a worker killed before COMMIT wrote nothing.

A batch whose readings fall under seqs already held is a duplicate only when it is the same
batch (contract §4.8, "Conflicts": a re-send is byte for byte the same message, so the same
batch number, which the ledger's `batches` holds). Under another batch number it is a conflict
(a forged replay by a holder of the key, a tamper, or a bug): the readings held first stay, the
batch is recorded in `rejected` (reason `conflict`, with its payload: it may be the genuine
one), and its readings under held seqs are not counted as duplicates. A conflict under the same
batch number (other content) is not seen: that would take a digest per batch.

So `readings` needs no unique index for this (schema.py: the ledger keeps (gateway, epoch,
seq) unique; a B-tree on it cost PostgreSQL about 40% of its CPU per reading). Where one exists
(TimescaleDB's (stream, seq, ts), or one a DBA added), a reading another worker stored and has
not committed yet makes our COPY wait for that COMMIT and then fail (a unique violation): the
group is written again in the same way.

The ledger rows of new (gateway, epoch)s are created, empty, in a transaction of their own
before the group's: created in it, a second worker's first group of the same epoch would wait
for the whole of the first's. An empty row means nothing stored yet, as no row does.

Returns the ledger of every (gateway, epoch) written, as committed, for the acknowledgements.

Point catalogues of the group are stored first, in a transaction of their own; batches that
wait for theirs are parked in the group's transaction (parking.py). After the COMMIT, `ready`
says which of those digests now have both a catalogue and parked batches: the caller then
writes them (`write_parked`: take, decode, write as a group, delete, in one transaction).
"""

from __future__ import annotations

import bisect
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import psycopg
from psycopg import errors as pg_errors

from edge_agent.consumer.completeness import Coverage
from edge_agent.consumer.ingest import parking
from edge_agent.consumer.ingest.decode import (
    MAX_REJECTED_PAYLOAD,
    Accepted,
    CatalogueItem,
    Item,
    Parked,
    Rejection,
    Status,
)
from edge_agent.consumer.ingest.rows import COPY_SQL
from edge_agent.errors import EdgeAgentError
from edge_agent.seal.hwm import HighWaterMark

AConn = psycopg.AsyncConnection[tuple[object, ...]]
_RANGE = re.compile(r"\[(-?\d+),(-?\d+)\)")
OVERLAP_RETRIES = 5
"""Times a group is written again because another worker stored some of its readings first."""


class OverlapError(EdgeAgentError):
    """Another worker committed some of the seqs this group copied, after the group read the
    ledger: the group's transaction is rolled back and the group written again."""


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
    read: str
    """`received` as read before the COPY (its text): unchanged at the lock means no overlap."""
    held: Coverage
    """The batch numbers held: as read, and those of the group so far."""
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
    retries: int = 0
    """Times the group was written again (another worker stored some of it first)."""
    copy_s: float = 0.0
    """Time the COPY of the readings took."""
    catalogues: list[bytes] = field(default_factory=list)
    """The digests of the point catalogues stored that were not yet."""
    parked: int = 0
    """Batches parked (their catalogue not known to the decoder)."""
    unparked: int = 0
    """Parked batches written (`write_parked`)."""
    ready: list[bytes] = field(default_factory=list)
    """Digests of the group's catalogues and parked batches that have, as committed after the
    group, both a catalogue stored and batches parked: to write with `write_parked`."""
    unsure: bool = False
    """The look for `ready` failed (the database, after the COMMIT): sweep soon instead."""


async def write_group(conn: AConn, items: Sequence[Item], rejected_keep: int) -> Written:
    """Write `items` in one transaction and commit; raise psycopg.Error (nothing written).

    Written again from a fresh read of the ledger when another worker committed some of the
    same readings meanwhile (or a deadlock between overlapping groups was broken), at most
    OVERLAP_RETRIES times; then the error is raised.
    """
    catalogues = [i for i in items if isinstance(i, CatalogueItem)]
    new = await parking.store_catalogues(conn, catalogues) if catalogues else []
    accepted = [i for i in items if isinstance(i, Accepted)]
    keys = sorted({(a.batch.gateway, a.batch.epoch) for a in accepted})
    if keys:
        async with conn.transaction():
            await _new_streams(conn, keys)
    attempt = 0
    while True:
        try:
            done = await _write_once(conn, items, accepted, keys, rejected_keep)
        except (OverlapError, pg_errors.UniqueViolation, pg_errors.DeadlockDetected):
            attempt += 1
            if attempt > OVERLAP_RETRIES:
                raise
        else:
            break
    done.retries = attempt
    done.catalogues = new
    digests = {c.catalogue.digest for c in catalogues}
    digests.update(i.digest for i in items if isinstance(i, Parked))
    if digests:  # after the COMMIT: see parking.py for why not before
        try:
            done.ready = await parking.ready(conn, sorted(digests))
        except psycopg.Error:  # the group is committed: not to be written again for this
            done.unsure = True
    return done


async def write_parked(
    conn: AConn,
    digest: bytes,
    decode: Callable[[str, bytes], Item | None],
    rejected_keep: int,
    limit: int,
) -> Written:
    """Write at most `limit` batches parked for catalogue `digest` and delete them from
    `parked`, in one transaction, committed; `unparked` says how many (0: none left that this
    worker can take now). `decode` is the worker's (`Decoder.decode`), whose book must hold the
    catalogue: a batch it still parks stays parked.

    The batches are taken FOR UPDATE SKIP LOCKED (another worker writing some of them, the
    others are taken) and written as a group is, ledger rules included: a batch stored already
    counts as a duplicate. Raises psycopg.Error as `write_group`; nothing is then written and
    nothing deleted.
    """
    attempt = 0
    while True:
        try:
            async with conn.transaction():
                taken = await parking.take(conn, digest, limit)
                ids, items = [], []
                for number, topic, payload in taken:
                    item = decode(topic, payload)
                    if item is not None and not isinstance(item, Parked | CatalogueItem):
                        ids.append(number)
                        items.append(item)
                accepted = [i for i in items if isinstance(i, Accepted)]
                keys = sorted({(a.batch.gateway, a.batch.epoch) for a in accepted})
                if keys:
                    await _new_streams(conn, keys)
                done = await _write_once(conn, items, accepted, keys, rejected_keep)
                if ids:
                    await parking.unpark(conn, ids)
        except (OverlapError, pg_errors.UniqueViolation, pg_errors.DeadlockDetected):
            attempt += 1
            if attempt > OVERLAP_RETRIES:
                raise
        else:
            done.retries = attempt
            done.unparked = len(ids)
            return done


async def refuse_parked(conn: AConn, digest: bytes, detail: str, rejected_keep: int) -> bool:
    """Move the oldest parked batch of `digest` that no worker holds to `rejected`, reason
    `unstorable` (the database refused its content: `detail`), in one transaction; whether
    there was one. So that a batch PostgreSQL cannot store does not come back at every sweep."""
    async with conn.transaction():
        cursor = await conn.execute(
            "SELECT id, topic, gateway, kid, payload FROM parked WHERE digest = %s"
            " ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED",
            (digest,),
        )
        row = await cursor.fetchone()
        if row is None:
            return False
        number, topic, gateway, kid, payload = row
        data = bytes(payload)  # type: ignore[call-overload]
        refusal = Rejection(
            str(topic), "unstorable", detail, str(gateway), None if kid is None else str(kid),
            len(data), data[:MAX_REJECTED_PAYLOAD],
        )  # fmt: skip
        await _small_items(conn, [refusal], rejected_keep, Written())
        await parking.unpark(conn, [int(str(number))])
    return True


async def _new_streams(conn: AConn, keys: list[tuple[str, str]]) -> None:
    """Create the ledger rows of `keys` that do not exist yet (in the caller's transaction)."""
    await conn.execute(
        # Only the rows missing: an INSERT that conflicts still draws a stream number, and
        # every group names the epochs it writes.
        "INSERT INTO coverage (gateway, epoch)"
        " SELECT g, e FROM unnest(%s::text[], %s::text[]) AS k(g, e)"
        " WHERE NOT EXISTS (SELECT 1 FROM coverage c WHERE c.gateway = k.g"
        " AND c.epoch = k.e) ORDER BY g, e ON CONFLICT DO NOTHING",
        ([k[0] for k in keys], [k[1] for k in keys]),
    )


async def _write_once(
    conn: AConn,
    items: Sequence[Item],
    accepted: list[Accepted],
    keys: list[tuple[str, str]],
    rejected_keep: int,
) -> Written:
    done = Written()
    async with conn.transaction():
        done.parked = await _park(conn, items)  # first: nothing of the group locks before
        streams: dict[tuple[str, str], _Stream] = {}
        if keys:
            cursor = await conn.execute(
                "SELECT gateway, epoch, stream, received::text, batches::text FROM coverage"
                " WHERE (gateway, epoch) IN (SELECT * FROM unnest(%s::text[], %s::text[]))",
                ([k[0] for k in keys], [k[1] for k in keys]),
            )
            for gateway, epoch, number, received, batches in await cursor.fetchall():
                ranges = [list(r) for r in parse_multirange(str(received))]
                held = [list(r) for r in parse_multirange(str(batches))]
                streams[(str(gateway), str(epoch))] = _Stream(
                    int(str(number)), Coverage(ranges), str(received), Coverage(held)
                )
        copy: list[str] = []
        evictions: list[tuple[str, str, int, int, str, int]] = []
        ends: list[tuple[str, str, str | None, int | None, str, str]] = []
        conflicts: list[Rejection] = []
        for item in accepted:
            batch = item.batch
            stream = streams[(batch.gateway, batch.epoch)]
            stream.batches.append((batch.batch, batch.batch))
            known = not stream.held.add(batch.batch, batch.batch)
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
                if fresh < len(item.rows) and not known:
                    conflicts.append(_conflict(item, len(item.rows) - fresh))
                else:
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
            await _lock_and_check(conn, keys, streams)
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
        await _small_items(conn, [*items, *conflicts], rejected_keep, done)
    return done


async def _park(conn: AConn, items: Sequence[Item]) -> int:
    """Park the group's batches that wait for their catalogue; how many."""
    parked = [i for i in items if isinstance(i, Parked)]
    if parked:
        await parking.park(conn, parked)
    return len(parked)


def _conflict(item: Accepted, held: int) -> Rejection:
    """The record of a batch `held` of whose readings fall under seqs held from other batches."""
    batch = item.batch
    last = item.first + len(item.rows) - 1
    return Rejection(
        item.topic,
        "conflict",
        f"batch {batch.batch} seqs {item.first}..{last}: {held} readings under seqs already"
        f" held from other batches (kept; these not stored), {len(item.rows) - held} stored",
        batch.gateway,
        batch.kid.hex() or None,
        len(item.payload),
        item.payload[:MAX_REJECTED_PAYLOAD],
    )


async def _lock_and_check(
    conn: AConn, keys: list[tuple[str, str]], streams: dict[tuple[str, str], _Stream]
) -> None:
    """Lock the ledger rows of `keys` (in key order) and raise OverlapError when one, as now
    committed, holds a seq that this group copied (READ COMMITTED: a row another transaction
    updated is read as that transaction committed it, once its lock is released)."""
    cursor = await conn.execute(
        "SELECT gateway, epoch, received::text FROM coverage"
        " WHERE (gateway, epoch) IN (SELECT * FROM unnest(%s::text[], %s::text[]))"
        " ORDER BY gateway, epoch FOR UPDATE",
        ([k[0] for k in keys], [k[1] for k in keys]),
    )
    for gateway, epoch, received in await cursor.fetchall():
        stream = streams[(str(gateway), str(epoch))]
        if not stream.new:
            continue
        now = str(received)
        if now != stream.read and _overlaps(parse_multirange(now), stream.new):
            raise OverlapError(f"{gateway} {epoch}: stored meanwhile by another worker")


def _overlaps(ranges: list[tuple[int, int]], new: list[tuple[int, int]]) -> bool:
    """Whether two lists of inclusive ranges (`ranges` ascending and disjoint) share a seq."""
    starts = [a for a, _ in ranges]
    for a, b in new:
        i = bisect.bisect_right(starts, b) - 1  # the last range starting at or before b
        if i >= 0 and ranges[i][1] >= a:
            return True
    return False


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
