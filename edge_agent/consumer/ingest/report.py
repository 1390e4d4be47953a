"""`edge-agent ingest report`: completeness, from the database, for a person.

The view `ingest_gaps` (schema.py) lists, per gateway and epoch, every seq range the database
does not hold, of three kinds:

- `hole`  missing below the highest seq held or declared, and no eviction explains it: a reading
          that was sealed and is not here. The report exits 4 (as `verify` does for a gap).
- `tail`  above the highest seq held, up to the gateway's signed high-water mark: sealed, not yet
          received (normal while the gateway is catching up; a loss if it never comes).
- `lost`  the gateway declared the epoch ended (`previous_epoch`: its buffer was quarantined,
          missing or replaced): explained, reported with the reason, not a failure. An epoch
          declared ended whose id the gateway no longer knew is reported as LOST, unknown.
- `pending` (schema version 3) received in a batch that is parked: authentic, waiting for
          the point catalogue it references (contract §4.12), stored as soon as that arrives.
          Not a failure while it waits; a catalogue that never comes (its retained message
          deleted from the broker, say) keeps them parked, which the `PARKED` lines show with
          the digest and since when.

Readings declared evicted (retention, too large, undeliverable) are explained and counted.
"""

from __future__ import annotations

import json
from typing import Any

import psycopg

EXIT_GAP = 4
MAX_LISTED = 20
"""Ranges listed per (gateway, epoch) and kind; the count says how many there are in all."""

_STREAMS = """
SELECT c.gateway, c.epoch, c.readings, c.duplicates,
       coalesce(upper(c.received + c.evicted) - 1, 0) AS top, h.seq AS hwm,
       coalesce((SELECT sum(upper(r) - lower(r)) FROM unnest(c.evicted) r), 0) AS evicted
FROM coverage c LEFT JOIN hwm h USING (gateway, epoch)
ORDER BY c.gateway, c.first_at, c.epoch
"""
_GAPS = """
SELECT gateway, epoch, kind, first_seq, last_seq, detail FROM ingest_gaps
ORDER BY gateway, epoch, first_seq
"""
_REJECTED = "SELECT reason, count(*), max(received) FROM rejected GROUP BY reason ORDER BY reason"
_PARKED = """
SELECT gateway, encode(digest, 'hex'), count(*), sum(readings), min(received),
       EXISTS (SELECT 1 FROM catalogues c WHERE c.digest = p.digest),
       EXISTS (SELECT 1 FROM rejected r WHERE r.reason = 'catalogue'
               AND r.topic LIKE '%/catalogue/' || encode(p.digest, 'hex'))
FROM parked p GROUP BY gateway, digest ORDER BY gateway, min(received)
"""
_UNKNOWN_ENDS = """
SELECT gateway, declared_epoch, ended, detail FROM epoch_ends WHERE ended_epoch IS NULL
ORDER BY gateway, declared_epoch
"""


def collect(conn: psycopg.Connection[tuple[Any, ...]]) -> dict[str, Any]:
    """The report as data: streams, gaps by kind, rejections by reason."""
    with conn.transaction():
        streams = conn.execute(_STREAMS).fetchall()
        gaps = conn.execute(_GAPS).fetchall()
        rejected = conn.execute(_REJECTED).fetchall()
        unknown = conn.execute(_UNKNOWN_ENDS).fetchall()
        parked = conn.execute(_PARKED).fetchall()
    return {
        "streams": [
            {
                "gateway": g, "epoch": e, "readings": int(n), "duplicates": int(d),
                "max_seq": int(top), "hwm": None if hwm is None else int(hwm),
                "evicted": int(ev),
            }
            for g, e, n, d, top, hwm, ev in streams
        ],
        "gaps": [
            {"gateway": g, "epoch": e, "kind": k, "first": int(a), "last": int(b), "detail": x}
            for g, e, k, a, b, x in gaps
        ],
        "rejected": {reason: int(n) for reason, n, _ in rejected},
        "unknown_ends": [
            {"gateway": g, "declared_in": e, "ended": x, "detail": d} for g, e, x, d in unknown
        ],
        "parked": [
            {"gateway": g, "catalogue": digest, "batches": int(n), "readings": int(r),
             "since": since.isoformat(), "catalogue_stored": bool(known),
             "catalogue_refused": bool(refused)}
            for g, digest, n, r, since, known, refused in parked
        ],
    }  # fmt: skip


def render(data: dict[str, Any]) -> tuple[int, list[str]]:
    """The exit status (0, or 4 on an unexplained hole) and the lines for a person."""
    lines = []
    by_stream: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for gap in data["gaps"]:
        by_stream.setdefault((gap["gateway"], gap["epoch"]), []).append(gap)
    for s in data["streams"]:
        gaps = by_stream.get((s["gateway"], s["epoch"]), [])
        holes = sum(1 for g in gaps if g["kind"] == "hole")
        lines.append(
            f"gateway={s['gateway']} epoch={s['epoch'][:8]} readings={s['readings']} "
            f"max_seq={s['max_seq']} hwm={s['hwm'] if s['hwm'] is not None else '-'} "
            f"duplicates={s['duplicates']} evicted={s['evicted']} holes={holes}"
        )
    for (gateway, epoch), gaps in by_stream.items():
        for kind, word in (
            ("hole", "HOLE"), ("pending", "PENDING"), ("tail", "NOT YET RECEIVED"),
            ("lost", "LOST"),
        ):  # fmt: skip
            ranges = [g for g in gaps if g["kind"] == kind]
            if not ranges:
                continue
            count = sum(g["last"] - g["first"] + 1 for g in ranges)
            shown = ", ".join(f"{g['first']}..{g['last']}" for g in ranges[:MAX_LISTED])
            more = f" (+{len(ranges) - MAX_LISTED} more ranges)" if len(ranges) > MAX_LISTED else ""
            lines.append(
                f"{word}: gateway={gateway} epoch={epoch} readings={count} seq {shown}{more}: "
                f"{ranges[0]['detail']}"
            )
    lines.extend(
        f"LOST: gateway={end['gateway']} epoch=unknown readings=unknown: the gateway declared "
        f"an epoch ended whose id it no longer knew ({end['ended']}: {end['detail']})"
        for end in data.get("unknown_ends", [])
    )
    lines.extend(
        f"PARKED {park['batches']} batches ({park['readings']} readings) of gateway="
        f"{park['gateway']} wait for point catalogue {park['catalogue']} since "
        f"{park['since']}"
        + (
            " (the catalogue is stored: a worker writes them at its next sweep)"
            if park["catalogue_stored"]
            else " (a catalogue under this digest was refused: see `rejected`, reason catalogue)"
            if park.get("catalogue_refused")
            else " (not received: the gateway publishes it, retained, before its batches)"
        )
        for park in data.get("parked", [])
    )
    for reason, count in sorted(data["rejected"].items()):
        lines.append(f"REJECTED {count} messages: {reason} (see the table `rejected`)")
    if any(g["kind"] == "hole" for g in data["gaps"]):
        lines.append("INCOMPLETE: readings missing that no eviction explains")
        return EXIT_GAP, lines
    lines.append(f"OK: {len(data['streams'])} streams complete but for what is said above")
    return 0, lines


def to_json(data: dict[str, Any]) -> str:
    """The report as strict JSON."""
    return json.dumps(data, allow_nan=False, default=str)
