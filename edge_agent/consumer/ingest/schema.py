"""The database of `edge-agent ingest`: tables, views, and versioned migrations.

`migrate` applies, in order and each in its own transaction, the migrations the database has not
had (the `schema_version` table lists those it had). Running it again changes nothing. Two
`migrate` at once are serialised by an advisory lock. A worker refuses to start on a database
whose version is not `VERSION` (older: run `migrate`; newer: upgrade the worker).

Tables (docs/cloud.md describes each column for people who query them):

- `gateway_keys`   the gateways' public keys, several per gateway, with validity and retirement;
                   every change takes the next value of the sequence `gateway_keys_generation`,
                   which workers read before each group of messages (a change applies at once)
- `readings`       one row per reading, unique by (gateway, epoch, seq), which the ledger
                   keeps so (write.py; no unique index since version 2, see `_V2`);
                   `stream` is the number `coverage` gives each (gateway, epoch), one to one
- `coverage`       the ledger: per (gateway, epoch), its `stream` number, the seqs stored
                   (`received`), those declared
                   evicted (`evicted`), the batch numbers held (`batches`), as int8multirange
- `evictions`      each declared evicted range with its reason
- `epoch_ends`     each `previous_epoch` declaration: how a gateway's earlier epoch ended
- `hwm`            the newest signed high-water mark per (gateway, epoch)
- `gateway_status` the newest status message per gateway
- `rejected`       refused messages with the reason (the newest `rejected_keep`, 4 KiB of each)
- `catalogues`     the point catalogues received (contract §4.12), by digest (version 3)
- `parked`         authentic batches waiting for their catalogue (version 3, parking.py)

Views: `ingest_gaps` (completeness, see `report.py`; since version 3 it tells the seqs of
parked batches, `pending`, from holes).

Names (gateway, epoch, src, pt) are `text COLLATE "C"`: compared as bytes, which makes the
unique index about 1.4 times faster to fill than under a language's collation, and sorts them
in code-point order.

`readings.ts` is a `timestamptz` (microseconds; what Grafana's time macros expect), and
`readings.ts_ns` the reading's exact time in Unix nanoseconds as sealed. The value is in one of
`v_num` (numeric: integers of 64 bits and floats exactly), `v_bool`, `v_text`; all three are
null when the reading has no value (quality bad).

Plain PostgreSQL: a BRIN index on `ts` (time ranges) and no B-tree: neither the primary key
(stream, seq) that version 1 made (version 2 drops it: `_V2`) nor a per-point one, which
would cost about 40% of the COPY rate (docs/cloud.md says when to add `readings_point_ts`).
With the TimescaleDB extension created in the database before the first `migrate`,
`readings` is a hypertable on `ts` with a unique index (stream, seq, ts); the ledger keeps
(gateway, epoch, seq) unique by itself in both cases.
"""

from __future__ import annotations

from dataclasses import dataclass

import psycopg

ADVISORY_LOCK = 0x6564_6765_696E  # "edgein": serialises concurrent `migrate` runs


@dataclass(frozen=True)
class Migration:
    """One step of the schema: its number, a line for `schema_version`, and its SQL."""

    version: int
    description: str
    sql: str


_V1 = """
CREATE TABLE gateway_keys (
    kid         bytea PRIMARY KEY CHECK (length(kid) = 8),
    gateway     text COLLATE "C" NOT NULL,
    public_key  bytea NOT NULL UNIQUE CHECK (length(public_key) = 32),
    not_before  timestamptz,
    not_after   timestamptz,
    retired_at  timestamptz,
    added_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX gateway_keys_gateway ON gateway_keys (gateway);
CREATE SEQUENCE gateway_keys_generation;

CREATE TABLE readings (
    stream   int8 NOT NULL,
    gateway  text COLLATE "C" NOT NULL,
    epoch    text COLLATE "C" NOT NULL,
    seq      int8 NOT NULL,
    src      text COLLATE "C" NOT NULL,
    pt       text COLLATE "C" NOT NULL,
    ts       timestamptz NOT NULL,
    ts_ns    int8 NOT NULL,
    v_num    numeric,
    v_bool   boolean,
    v_text   text,
    q        text NOT NULL,
    sc       int8
);

CREATE TABLE coverage (
    gateway   text COLLATE "C" NOT NULL,
    epoch     text COLLATE "C" NOT NULL,
    stream    int8 GENERATED ALWAYS AS IDENTITY UNIQUE,
    received  int8multirange NOT NULL DEFAULT '{}',
    evicted   int8multirange NOT NULL DEFAULT '{}',
    batches   int8multirange NOT NULL DEFAULT '{}',
    readings  int8 NOT NULL DEFAULT 0,
    duplicates int8 NOT NULL DEFAULT 0,
    first_at  timestamptz NOT NULL DEFAULT now(),
    updated   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (gateway, epoch)
);

CREATE TABLE evictions (
    gateway   text COLLATE "C" NOT NULL,
    epoch     text COLLATE "C" NOT NULL,
    first_seq int8 NOT NULL,
    last_seq  int8 NOT NULL,
    reason    text NOT NULL,
    batch     int8 NOT NULL,
    PRIMARY KEY (gateway, epoch, first_seq, last_seq)
);

CREATE TABLE epoch_ends (
    gateway        text COLLATE "C" NOT NULL,
    declared_epoch text COLLATE "C" NOT NULL,
    ended_epoch    text COLLATE "C",
    last_seq       int8,
    ended          text NOT NULL,
    detail         text NOT NULL,
    PRIMARY KEY (gateway, declared_epoch)
);

CREATE TABLE hwm (
    gateway   text COLLATE "C" NOT NULL,
    epoch     text COLLATE "C" NOT NULL,
    seq       int8 NOT NULL,
    batch     int8 NOT NULL,
    sealed_ns int8 NOT NULL,
    received  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (gateway, epoch)
);

CREATE TABLE gateway_status (
    gateway  text COLLATE "C" PRIMARY KEY,
    status   text NOT NULL,
    received timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE rejected (
    id            bigserial PRIMARY KEY,
    received      timestamptz NOT NULL DEFAULT now(),
    topic         text NOT NULL,
    reason        text NOT NULL,
    detail        text NOT NULL,
    gateway       text COLLATE "C",
    kid           text,
    payload_bytes int8 NOT NULL,
    payload       bytea NOT NULL
);

CREATE VIEW ingest_gaps AS
WITH streams AS (
    SELECT gateway, epoch FROM coverage
    UNION SELECT gateway, epoch FROM hwm
    UNION SELECT gateway, ended_epoch FROM epoch_ends WHERE ended_epoch IS NOT NULL
), state AS (
    SELECT s.gateway, s.epoch,
           coalesce(c.received + c.evicted, '{}'::int8multirange) AS covered,
           coalesce(upper(c.received + c.evicted) - 1, 0) AS top,
           h.seq AS hwm,
           e.ended, e.detail, e.last_seq AS ended_last
    FROM streams s
    LEFT JOIN coverage c ON c.gateway = s.gateway AND c.epoch = s.epoch
    LEFT JOIN hwm h ON h.gateway = s.gateway AND h.epoch = s.epoch
    LEFT JOIN LATERAL (
        SELECT ended, detail, last_seq FROM epoch_ends x
        WHERE x.gateway = s.gateway AND x.ended_epoch = s.epoch
        ORDER BY last_seq DESC NULLS LAST LIMIT 1
    ) e ON true
), spans AS (
    SELECT *, greatest(top, coalesce(ended_last, 0)) AS upto FROM state
)
SELECT gateway, epoch, lower(r) AS first_seq, upper(r) - 1 AS last_seq,
       CASE WHEN ended IS NULL THEN 'hole' ELSE 'lost' END AS kind,
       CASE WHEN ended IS NULL THEN 'missing, no eviction declared'
            ELSE 'the gateway declared the epoch ended (' || ended || ': ' || detail || ')'
       END AS detail
FROM spans, unnest(int8multirange(int8range(1, upto + 1)) - covered) AS r
UNION ALL
SELECT gateway, epoch, lower(r), upper(r) - 1, 'tail',
       'sealed (high-water mark ' || hwm || '), not yet received'
FROM spans, unnest(int8multirange(int8range(upto + 1, hwm + 1)) - covered) AS r
WHERE ended IS NULL AND hwm > upto;
"""

_V1_PLAIN = """
ALTER TABLE readings ADD PRIMARY KEY (stream, seq);
CREATE INDEX readings_ts ON readings USING brin (ts);
"""

_V1_TIMESCALE = """
CREATE UNIQUE INDEX readings_seq ON readings (stream, seq, ts);
CREATE INDEX readings_point_ts ON readings (gateway, src, pt, ts);
SELECT create_hypertable('readings', 'ts');
"""


_V2 = """
ALTER TABLE readings DROP CONSTRAINT IF EXISTS readings_pkey;

CREATE FUNCTION coverage_received_once() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF (SELECT coalesce(sum(upper(r) - lower(r)), 0) FROM unnest(NEW.received) AS r)
       - (SELECT coalesce(sum(upper(r) - lower(r)), 0) FROM unnest(OLD.received) AS r)
       <> NEW.readings - OLD.readings THEN
        RAISE EXCEPTION USING ERRCODE = 'serialization_failure',
            MESSAGE = format('coverage of gateway %s epoch %s: %s readings added for %s new'
                ' seqs (another worker stored some of them first)', NEW.gateway, NEW.epoch,
                NEW.readings - OLD.readings,
                (SELECT coalesce(sum(upper(r) - lower(r)), 0) FROM unnest(NEW.received) AS r)
                - (SELECT coalesce(sum(upper(r) - lower(r)), 0) FROM unnest(OLD.received) AS r));
    END IF;
    RETURN NEW;
END $$;

CREATE TRIGGER coverage_received_once BEFORE UPDATE OF received, readings ON coverage
    FOR EACH ROW WHEN (NEW.readings IS DISTINCT FROM OLD.readings
                       OR NEW.received IS DISTINCT FROM OLD.received)
    EXECUTE FUNCTION coverage_received_once();
"""
"""Plain PostgreSQL: no B-tree on (stream, seq). The ledger keeps (gateway, epoch, seq) unique
(write.py checks it under the ledger row's lock); the key's B-tree cost PostgreSQL about 40%
of its CPU per reading (a descent and a leaf per row, bench/ingest.py). A hypertable keeps its
unique index (TimescaleDB's chunks keep it small).

The trigger `coverage_received_once` is the same check made by the database, for a writer that
does not make it: a version-1 worker started before this migration checks the version only at
its start and goes on adding what it copied to the ledger without looking, as the primary key
refused a reading stored twice; with the key gone, its COMMIT would store them twice. Every
writer, of either version, adds to `readings` (the count) exactly the rows it copied, and to
`received` their seqs: when the seqs that are new to `received` are fewer than the rows
counted, some were held already, and the update fails as a serialisation failure, which both
versions' workers retry from a fresh read of the ledger (so they copy nothing twice). One
check per ledger row a group updates, not per reading. It is made in the same transaction as
the key's drop: there is no moment without either."""


_V3 = """
CREATE TABLE catalogues (
    digest   bytea PRIMARY KEY CHECK (length(digest) = 16),
    gateway  text COLLATE "C" NOT NULL,
    payload  bytea NOT NULL,
    received timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE parked (
    id        bigserial PRIMARY KEY,
    digest    bytea NOT NULL,
    topic     text NOT NULL,
    gateway   text COLLATE "C" NOT NULL,
    epoch     text COLLATE "C" NOT NULL,
    batch     int8 NOT NULL,
    seqs      int8multirange NOT NULL,
    readings  int8 NOT NULL,
    kid       text,
    payload   bytea NOT NULL,
    received  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX parked_digest ON parked (digest);
CREATE UNIQUE INDEX parked_batch ON parked (gateway, epoch, batch);

CREATE OR REPLACE VIEW ingest_gaps AS
WITH streams AS (
    SELECT gateway, epoch FROM coverage
    UNION SELECT gateway, epoch FROM hwm
    UNION SELECT gateway, ended_epoch FROM epoch_ends WHERE ended_epoch IS NOT NULL
    UNION SELECT gateway, epoch FROM parked
), waiting AS (
    SELECT gateway, epoch, digest, range_agg(seqs) AS seqs
    FROM parked GROUP BY gateway, epoch, digest
), state AS (
    SELECT s.gateway, s.epoch,
           coalesce(c.received + c.evicted, '{}'::int8multirange) AS covered,
           coalesce(upper(c.received + c.evicted) - 1, 0) AS top,
           coalesce(w.seqs, '{}'::int8multirange) AS parked,
           h.seq AS hwm,
           e.ended, e.detail, e.last_seq AS ended_last
    FROM streams s
    LEFT JOIN coverage c ON c.gateway = s.gateway AND c.epoch = s.epoch
    LEFT JOIN hwm h ON h.gateway = s.gateway AND h.epoch = s.epoch
    LEFT JOIN LATERAL (
        SELECT range_agg(x.seqs) AS seqs FROM waiting x
        WHERE x.gateway = s.gateway AND x.epoch = s.epoch
    ) w ON true
    LEFT JOIN LATERAL (
        SELECT ended, detail, last_seq FROM epoch_ends x
        WHERE x.gateway = s.gateway AND x.ended_epoch = s.epoch
        ORDER BY last_seq DESC NULLS LAST LIMIT 1
    ) e ON true
), spans AS (
    SELECT *, greatest(top, coalesce(ended_last, 0), coalesce(upper(parked) - 1, 0)) AS upto
    FROM state
)
SELECT gateway, epoch, lower(r) AS first_seq, upper(r) - 1 AS last_seq,
       CASE WHEN ended IS NULL THEN 'hole' ELSE 'lost' END AS kind,
       CASE WHEN ended IS NULL THEN 'missing, no eviction declared'
            ELSE 'the gateway declared the epoch ended (' || ended || ': ' || detail || ')'
       END AS detail
FROM spans, unnest(int8multirange(int8range(1, upto + 1)) - covered - parked) AS r
UNION ALL
SELECT gateway, epoch, lower(r), upper(r) - 1, 'tail',
       'sealed (high-water mark ' || hwm || '), not yet received'
FROM spans, unnest(int8multirange(int8range(upto + 1, hwm + 1)) - covered - parked) AS r
WHERE ended IS NULL AND hwm > upto
UNION ALL
SELECT s.gateway, s.epoch, lower(r), upper(r) - 1, 'pending',
       'received, parked: waits for point catalogue ' || encode(w.digest, 'hex')
FROM spans s JOIN waiting w ON w.gateway = s.gateway AND w.epoch = s.epoch,
     unnest(w.seqs - s.covered) AS r;
"""
"""Point catalogues (contract §4.12, parking.py). `catalogues` keeps every catalogue a worker
accepted, so that a worker that starts later, or restarts, decodes the batches that reference
it; `parked` keeps an authentic batch (its signature checked) whose catalogue no worker had
when it arrived, with what its header says (its gateway, epoch, batch number, and `seqs`: the
seqs of its readings and of the evictions it declares), until the catalogue comes. A batch
parked is acknowledged to the broker (its COMMIT is what the broker's copy was kept for) but
not end to end: the ledger does not hold it until it is decoded and stored. A batch is parked
once (`parked_batch`): an agent in end-to-end mode sends a batch again while it is parked, as
it is not acknowledged, and the copies would pile up while the catalogue stays away.

`ingest_gaps` then tells the seqs of parked batches (`pending`, with the digest they wait for)
from holes and tails: they were received, and are stored as soon as the catalogue arrives."""


def migrations(timescale: bool) -> list[Migration]:
    """Every migration in order; `timescale`: make `readings` a TimescaleDB hypertable."""
    return [
        Migration(
            1,
            "readings, ledger, keys, hwm, rejected; ingest_gaps view"
            + (" (TimescaleDB hypertable)" if timescale else ""),
            _V1 + (_V1_TIMESCALE if timescale else _V1_PLAIN),
        ),
        Migration(
            2,
            "readings without a primary key: the ledger keeps (gateway, epoch, seq) unique",
            _V2,
        ),
        Migration(
            3,
            "point catalogues and the batches parked for theirs; ingest_gaps tells them pending",
            _V3,
        ),
    ]


VERSION = len(migrations(False))
"""The schema version this code writes to."""


def current_version(conn: psycopg.Connection[tuple[object, ...]]) -> int:
    """The database's schema version, 0 when it has never been migrated."""
    with conn.transaction():
        exists = conn.execute("SELECT to_regclass('schema_version') IS NOT NULL").fetchone()
        if not exists or not exists[0]:
            return 0
        row = conn.execute("SELECT coalesce(max(version), 0) FROM schema_version").fetchone()
    return int(row[0]) if row else 0  # type: ignore[call-overload]


def migrate(conn: psycopg.Connection[tuple[object, ...]]) -> tuple[int, int]:
    """Bring the database to `VERSION`; return (version before, version after).

    Each migration runs in its own transaction with its `schema_version` row, so a failure
    leaves the database at the last complete version. Raises psycopg.Error as the server does.
    """
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (ADVISORY_LOCK,))
        conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_version ("
            " version int PRIMARY KEY, description text NOT NULL,"
            " applied timestamptz NOT NULL DEFAULT now())"
        )
    before = current_version(conn)
    row = conn.execute("SELECT count(*) FROM pg_extension WHERE extname = 'timescaledb'").fetchone()
    conn.commit()
    timescale = bool(row and row[0])
    for step in migrations(timescale):
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (ADVISORY_LOCK,))
            done = conn.execute(
                "SELECT 1 FROM schema_version WHERE version = %s", (step.version,)
            ).fetchone()
            if done:
                continue
            conn.execute(step.sql.encode())
            conn.execute(
                "INSERT INTO schema_version (version, description) VALUES (%s, %s)",
                (step.version, step.description),
            )
    return before, current_version(conn)
