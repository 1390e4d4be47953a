"""Benchmark of `edge-agent ingest`: agent batches already at the broker -> rows committed.

All parts real: a private Mosquitto (edge_agent.demo.broker, persistence on), a private
PostgreSQL 15 (tests/helpers/postgres.py, `fsync=on`: commits are durable), the fleet of
tests/helpers/fleet.py (each gateway its own Ed25519 key and real Sealer: byte for byte what
agents send), and 1 or 2 `edge-agent ingest run` worker processes of one shared subscription.

One run, per worker count:
  1. a fresh database, migrated, the fleet's keys enrolled;
  2. the shared subscription's sessions made first, one per worker (MQTT 5, Session Expiry one
     hour), so that the broker queues what the fleet publishes: GATEWAYS x BATCHES batches of
     READINGS readings each, published at QoS 1 and acknowledged by the broker;
  3. the workers started; timed from the moment the broker logs their subscriptions to the
     moment the ledger (`coverage`) holds every reading; each reading is checked stored once.

Measured: readings/s (drain), CPU seconds per 100,000 readings of the workers
(utime+stime, /proc/PID/stat) and of PostgreSQL (all its processes), repeated `--repeat` times
(the machine is shared: the spread is reported). `--split` then times, in this process on the
same batches, the worker's three costs one after the other: verify (signature), decode
(decompress, CBOR, rows) and COPY (one transaction per group, as the worker writes).

    .venv/bin/python bench/ingest.py                   # 1 and 2 workers, 3 runs each, ~2 min
    .venv/bin/python bench/ingest.py --quick           # a smoke run, ~20 s
    .venv/bin/python bench/ingest.py --workers 1 --repeat 1 --profile   # cProfile of a worker
    .venv/bin/python bench/ingest.py --catalogue       # batches that reference point catalogues

`--catalogue` seals with `Sealer(key, payload_format=2, catalogue=True)` (contract §4.12), each
gateway with point names of its own (so a catalogue of its own), and publishes each gateway's
catalogue once, retained, before its batches; the workers' sessions are made with their
catalogue subscription too, so the broker queues the catalogue in each session ahead of the
batches, as it does for workers that ran before (none is parked).

Results and their reading: docs/performance.md, "Ingest".
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the tests' helpers: one fleet, one PostgreSQL

import psycopg  # noqa: E402
import psycopg.sql  # noqa: E402
from helpers.fleet import Fleet, Message, Publisher, persistent_session  # noqa: E402
from helpers.ingest_catalogue import catalogues_of, use_catalogues  # noqa: E402
from helpers.ingest_fleet import FleetWorker, prepare_database  # noqa: E402
from helpers.postgres import PostgresServer  # noqa: E402

from edge_agent.consumer.ingest import keystore  # noqa: E402
from edge_agent.consumer.ingest.decode import Accepted, Decoder  # noqa: E402
from edge_agent.consumer.ingest.write import write_group  # noqa: E402
from edge_agent.demo.broker import Mosquitto  # noqa: E402
from edge_agent.seal.catalogue import Catalogue  # noqa: E402
from edge_agent.seal.envelope import Opener, Sign1  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")
PREFIX = "bench/ingest"


def cpu_s(pid: int) -> float:
    """utime + stime of process `pid` in seconds (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def run_delay_s(pid: int) -> float:
    """Seconds process `pid` (its main thread) has waited on a run queue: runnable, but
    another process had the CPU (/proc/PID/schedstat; 0 once it is gone)."""
    try:
        return int(Path(f"/proc/{pid}/schedstat").read_text().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0


def server_cpu_s(postmaster: int) -> float:
    """CPU seconds of the PostgreSQL server: the postmaster and every process it started."""
    total = cpu_s(postmaster)
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(stat[1]) == postmaster:
                total += (int(stat[11]) + int(stat[12])) / CLK_TCK
    return total


@dataclass
class Run:
    """One drain: the broker's queue of batches into the database by `workers` workers."""

    workers: int
    readings: int
    batches: int
    publish_s: float
    drain_s: float
    startup_s: float
    worker_cpu_s: float
    db_cpu_s: float
    broker_cpu_s: float
    load: float
    """The machine's 1-minute load average after the run (2 cores: above 2, others competed)."""
    stops: list[str]
    """Each worker's last log line (its totals: messages, readings, seconds by stage)."""

    @property
    def rate(self) -> float:
        return self.readings / self.drain_s

    def per_100k(self, cpu: float) -> float:
        return cpu / self.readings * 100_000


def drain(
    server: PostgresServer,
    broker: Mosquitto,
    fleet: Fleet,
    messages: list[Message],
    workers: int,
    name: str,
    directory: Path,
    *,
    profile: bool = False,
    max_group: int = 64,
    sql: str | None = None,
    timeout: float = 300.0,
    sample_waits: bool = False,
    catalogues: list[Message] | None = None,
    park: bool = False,
) -> Run:
    """Steps 1-3 of the module docstring, once; raises when a reading is missing or twice.
    `catalogues`: published once each, retained, before the batches (`--catalogue`); `park`:
    the sessions made without the catalogue subscription (`--park`)."""
    dsn = server.create_database(name)
    prepare_database(dsn, fleet)
    if sql:  # an experiment (--sql): what an index, say, costs the ingest
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(sql.encode())
    group = name
    ids = [f"{name}-w{i}" for i in range(workers)]
    for client_id in ids:
        persistent_session(broker.url, client_id, f"$share/{group}/{PREFIX}/+/batch")
        if catalogues and not park:  # as the worker subscribes: each session gets them all
            persistent_session(broker.url, client_id, f"{PREFIX}/+/catalogue/+")
    began = time.monotonic()
    with Publisher(broker.url) as publisher:
        for catalogue in catalogues or []:
            publisher.publish_retained(catalogue.topic, catalogue.payload)
        for start in range(0, len(messages), 500):
            publisher.publish(messages[start : start + 500], timeout=timeout)
    publish_s = time.monotonic() - began
    total = sum(m.count for m in messages)

    procs = [
        FleetWorker(
            broker, dsn, directory, client_id=cid, group=group, topic_prefix=PREFIX,
            extra=("--max-group", str(max_group)),
            python_args=("-m", "cProfile", "-o", str(directory / f"{cid}.prof")) if profile else (),
        )
        for cid in ids
    ]  # fmt: skip
    db_before = server_cpu_s(server.postmaster_pid() or 0)
    broker_before = cpu_s(broker.pid or 0)
    # The workers start while the broker is frozen (SIGSTOP): each one loads, connects to
    # PostgreSQL and opens its TCP connection to the broker, which then answers nobody. Once
    # every worker is that far, the broker goes on (SIGCONT) and the clock starts: all of
    # them get their share of the queue from the same moment, and their start-up (imports,
    # connections, ~0.25 s of CPU each) is neither timed nor counted in their CPU.
    spawned = time.monotonic()
    broker_pid = broker.pid or 0
    os.kill(broker_pid, signal.SIGSTOP)
    try:
        for proc in procs:
            proc.start(timeout=60, wait=False)
        waiting: dict[str, float] = {}  # client id: its CPU when seen connecting to the broker
        while len(waiting) < len(procs):
            for proc in procs:
                pid = proc.process.pid if proc.process is not None else 0
                if proc.client_id not in waiting and connects_to(pid, broker.port):
                    waiting[proc.client_id] = cpu_s(pid)
                if not proc.alive():
                    raise RuntimeError(f"worker {proc.client_id} exited:\n{proc.log()[-3000:]}")
            if time.monotonic() > spawned + 60:
                raise TimeoutError("the workers did not reach the broker within 60 s")
            time.sleep(0.01)  # /proc is the only signal a frozen broker leaves
    finally:
        os.kill(broker_pid, signal.SIGCONT)
    subscribed = time.monotonic()
    worker_before = sum(waiting.values())
    pids = [p.process.pid for p in procs if p.process is not None]
    delay_before = sum(map(run_delay_s, pids))
    end = subscribed + timeout
    # One connection for the polling (a connection each time is a backend started each time:
    # PostgreSQL CPU that the run would count).
    waits: dict[str, int] = {}
    with psycopg.connect(dsn, autocommit=True) as poll:
        while (stored := _stored(poll)) < total:
            if sample_waits:
                for (what,) in poll.execute(_WAITS_SQL).fetchall():
                    waits[str(what)] = waits.get(str(what), 0) + 1
            if time.monotonic() > end:
                raise TimeoutError(f"{stored} of {total} readings stored after {timeout:g}s")
            if not all(p.alive() for p in procs):
                raise RuntimeError("a worker died:\n" + "\n".join(p.log()[-3000:] for p in procs))
            time.sleep(0.02)  # the database's ledger: no event to await from here
    finished = time.monotonic()
    delay = sum(map(run_delay_s, pids)) - delay_before
    worker_cpu = sum(cpu_s(p.process.pid) for p in procs if p.process is not None) - worker_before
    db_cpu = server_cpu_s(server.postmaster_pid() or 0) - db_before
    broker_cpu = cpu_s(broker.pid or 0) - broker_before
    for proc in procs:
        proc.stop()
    stops = [proc.log().strip().rsplit("\n", 1)[-1] for proc in procs]
    stops.append(
        f"the workers waited {delay:.2f} s in all on a run queue (runnable, another process on"
        f" the CPU) during the {finished - subscribed:.2f} s"
    )
    if waits:
        samples = sum(waits.values())
        stops.append(
            "the workers' backends, sampled: "
            + ", ".join(
                f"{k} {v / samples:.0%}" for k, v in sorted(waits.items(), key=lambda kv: -kv[1])
            )
        )
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT count(*), count(DISTINCT (gateway, epoch, seq)) FROM readings")
        count, distinct = row.fetchone() or (0, 0)
    if count != total or distinct != total:
        raise AssertionError(f"{count} rows, {distinct} distinct, {total} published")
    return Run(
        workers, total, len(messages), publish_s, finished - subscribed, subscribed - spawned,
        worker_cpu, db_cpu, broker_cpu, os.getloadavg()[0], stops,
    )  # fmt: skip


SHOWN = (
    "fsync", "synchronous_commit", "full_page_writes", "shared_buffers", "wal_buffers",
    "max_wal_size", "checkpoint_timeout", "wal_compression",
)  # fmt: skip
"""The server settings the benchmark prints: durability first, then what sizing may change."""


def configure(server: PostgresServer, settings: list[str]) -> str:
    """Apply `NAME=VALUE` settings (ALTER SYSTEM, restart); return the SHOWN ones as a line."""
    if settings:
        with psycopg.connect(server.dsn, autocommit=True) as conn:
            for setting in settings:
                name, _, value = setting.partition("=")
                conn.execute(
                    psycopg.sql.SQL("ALTER SYSTEM SET {} = {}").format(
                        psycopg.sql.Identifier(name.strip()), psycopg.sql.Literal(value.strip())
                    )
                )
        server.restart()
    with psycopg.connect(server.dsn) as conn:
        shown = [f"{n}={conn.execute(f'SHOW {n}').fetchone()[0]}" for n in SHOWN]  # type: ignore[index]
    return " ".join(shown)


_WAITS_SQL = (
    "SELECT CASE WHEN state = 'active' AND wait_event IS NULL THEN 'running'"
    " ELSE coalesce(state, '?') || ':' || coalesce(wait_event_type || '/' || wait_event, '-') END"
    " FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
    " AND backend_type = 'client backend'"
)
"""What each of the workers' backends is doing (`running`: on a CPU or waiting for one)."""


def connects_to(pid: int, port: int) -> bool:
    """Whether process `pid` has a TCP connection to 127.0.0.1:`port` (its /proc fds against
    /proc/net/tcp; the kernel completes the handshake even while the server is frozen)."""
    try:
        inodes = {
            target[8:-1]
            for fd in Path(f"/proc/{pid}/fd").iterdir()
            if (target := os.readlink(fd)).startswith("socket:[")
        }
    except OSError:
        return False
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        remote_port = int(fields[2].rsplit(":", 1)[1], 16)
        if remote_port == port and fields[3] == "01" and fields[9] in inodes:
            return True
    return False


def _stored(conn: psycopg.Connection[tuple[object, ...]]) -> int:
    """Readings the ledger says are stored (as helpers.ingest_fleet.stored_readings)."""
    row = conn.execute("SELECT coalesce(sum(readings), 0) FROM coverage").fetchone()
    return int(str(row[0])) if row else 0


def cost_split(
    server: PostgresServer,
    fleet: Fleet,
    messages: list[Message],
    max_group: int,
    catalogues: list[Message] | None = None,
) -> list[str]:
    """The worker's costs one after the other, in this process, on `messages`: CPU seconds per
    100,000 readings of verify (COSE parse + Ed25519), decode (zstd, CBOR, the readings' maps;
    format 2: the columns), rows (COPY text lines), and COPY (`write_group`: one transaction
    per `max_group` messages, as the worker writes, wall time; PostgreSQL's CPU beside it)."""
    dsn = server.create_database("bench_split")
    prepare_database(dsn, fleet)
    with psycopg.connect(dsn) as conn:
        trust = keystore.load_trust(conn)
    keys = {k.kid: k.key for k in trust.trust.keys.values()}
    book = {c.digest: c for c in (Catalogue.parse(m.payload) for m in catalogues or [])}
    decoder = Decoder(trust, PREFIX, book)
    opener = Opener(trust.trust.public_keys(), columns=True, catalogues=book)
    maps_opener = Opener(trust.trust.public_keys(), catalogues=book)
    total = sum(m.count for m in messages)
    per = 100_000 / total

    began = time.process_time()
    for m in messages:
        signed = Sign1.parse(m.payload)
        signed.check(keys)
    verify = time.process_time() - began

    # The path before the columns were taken as they are: a map per reading, a line per map.
    began = time.process_time()
    mapped = [maps_opener.open(m.payload) for m in messages]
    maps_opened = time.process_time() - began
    began = time.process_time()
    for b in mapped:
        decoder.rows.rows(b.gateway, b.epoch, b.readings)
    maps_made = time.process_time() - began
    del mapped

    began = time.process_time()
    batches = [opener.open(m.payload) for m in messages]
    opened = time.process_time() - began

    began = time.process_time()
    rows = [
        decoder.rows.column_rows(b.gateway, b.epoch, b.columns)
        if b.columns is not None
        else decoder.rows.rows(b.gateway, b.epoch, b.readings)
        for b in batches
    ]
    made = time.process_time() - began
    items = [
        Accepted(b, r, b.columns.first if b.columns is not None else b.readings[0]["seq"])
        for b, r in zip(batches, rows, strict=True)
    ]

    async def write() -> float:
        async with await psycopg.AsyncConnection.connect(dsn) as conn:
            began = time.perf_counter()
            for start in range(0, len(items), max_group):
                await write_group(conn, items[start : start + max_group], 1000)
            return time.perf_counter() - began

    db_before = server_cpu_s(server.postmaster_pid() or 0)
    cpu_before = time.process_time()
    wall = asyncio.run(write())
    client_cpu = time.process_time() - cpu_before
    db_cpu = server_cpu_s(server.postmaster_pid() or 0) - db_before
    return [
        f"\ncost split, one process, {total:,} readings, per 100,000 readings:",
        f"  verify (COSE parse, Ed25519)       {verify * per:.3f} s CPU",
        f"  decode (zstd, CBOR, columns)       {(opened - verify) * per:.3f} s CPU",
        f"  rows (COPY text lines, by column)  {made * per:.3f} s CPU",
        f"  [before: decode to a map per reading {(maps_opened - verify) * per:.3f} s,"
        f" a line per map {maps_made * per:.3f} s]",
        f"  COPY + ledger, {max_group} messages a transaction: {wall * per:.3f} s wall "
        f"(client CPU {client_cpu * per:.3f} s, PostgreSQL CPU {db_cpu * per:.3f} s)",
    ]


def spread(values: list[float]) -> str:
    """`median (min-max)` of a series."""
    if len(values) == 1:
        return f"{values[0]:,.0f}"
    return f"{statistics.median(values):,.0f} ({min(values):,.0f}-{max(values):,.0f})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gateways", type=int, default=20)
    parser.add_argument("--batches", type=int, default=40, help="per gateway")
    parser.add_argument("--readings", type=int, default=1000, help="per batch")
    parser.add_argument(
        "--format", type=int, default=2, choices=(0, 1, 2), help="payload format; 0: mixed"
    )
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="fewer batches, one run each")
    parser.add_argument("--profile", action="store_true", help="cProfile the workers")
    parser.add_argument("--split", action="store_true", help="time verify, decode, COPY apart")
    parser.add_argument("--max-group", type=int, default=64, help="messages per transaction")
    parser.add_argument(
        "--sql", help="experiment: run this SQL after `migrate` (e.g. CREATE INDEX ...)"
    )
    parser.add_argument(
        "--catalogue",
        action="store_true",
        help="format 2 batches that reference point catalogues (one per gateway, published"
        " once, retained)",
    )
    parser.add_argument(
        "--park",
        action="store_true",
        help="with --catalogue: the workers' sessions made without their catalogue"
        " subscription, so the queued batches reach them before the retained catalogues (a"
        " first start on a backlog): batches parked, then written",
    )
    parser.add_argument("--json", type=Path, help="write the runs here")
    parser.add_argument("--verbose", action="store_true", help="print each worker's totals")
    parser.add_argument(
        "--pg-set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a PostgreSQL setting (ALTER SYSTEM, then a restart); repeatable",
    )
    args = parser.parse_args()
    if args.quick:
        args.batches, args.repeat = 10, 1
    counts = [int(n) for n in args.workers.split(",")]

    directory = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    if args.catalogue and args.format != 2:
        parser.error("--catalogue needs --format 2")
    if args.park and not args.catalogue:
        parser.error("--park needs --catalogue")
    fleet = Fleet(
        directory / "fleet", gateways=args.gateways, payload_format=args.format, prefix=PREFIX
    )
    if args.catalogue:
        for member in fleet.members:  # each its own names: its own catalogue
            member.points = [(src, f"{member.gateway_id}.{pt}") for src, pt in member.points]
            use_catalogues(member)
    began = time.monotonic()
    messages = fleet.seal_rounds(args.batches, args.readings)
    sealed_s = time.monotonic() - began
    catalogues = catalogues_of(fleet) if args.catalogue else None
    size = sum(len(m.payload) for m in messages)
    total = sum(m.count for m in messages)
    print(
        f"fleet: {args.gateways} gateways x {args.batches} batches x {args.readings} readings "
        f"(format {args.format or 'mixed'}"
        + (", with point catalogues" if catalogues else "")
        + f") = {total:,} readings, {size / len(messages):,.0f} bytes a batch"
        f" ({size / total:.2f} a reading), sealed in {sealed_s:.1f} s"
        + (
            f"; {len(catalogues)} catalogues of {len(catalogues[0].payload):,} bytes"
            if catalogues
            else ""
        )
    )
    runs: list[Run] = []
    with (
        PostgresServer(durable=True) as server,
        Mosquitto(directory=_mkdir(directory / "broker")) as broker,
    ):
        print("PostgreSQL: " + configure(server, args.pg_set), flush=True)
        for workers in counts:
            for n in range(args.repeat):
                run = drain(
                    server, broker, fleet, messages, workers, f"bench_w{workers}_r{n}",
                    directory / "workers", profile=args.profile, max_group=args.max_group,
                    sql=args.sql, sample_waits=args.verbose, catalogues=catalogues,
                    park=args.park,
                )  # fmt: skip
                runs.append(run)
                print(
                    f"  {workers} worker(s), run {n + 1}: {run.rate:,.0f} readings/s "
                    f"({run.readings:,} in {run.drain_s:.2f} s; start-up {run.startup_s:.2f} s), "
                    f"CPU per 100,000 readings: workers {run.per_100k(run.worker_cpu_s):.2f} s, "
                    f"PostgreSQL {run.per_100k(run.db_cpu_s):.2f} s, "
                    f"Mosquitto {run.per_100k(run.broker_cpu_s):.3f} s; load {run.load:.1f}",
                    flush=True,
                )
                if args.verbose:
                    print("\n".join(f"    {line}" for line in run.stops))
        if args.split:
            for line in cost_split(server, fleet, messages, args.max_group, catalogues):
                print(line)
    print("\nsummary (median (min-max) over runs):")
    for workers in counts:
        mine = [r for r in runs if r.workers == workers]
        worker_cpu = statistics.median(r.per_100k(r.worker_cpu_s) for r in mine)
        db_cpu = statistics.median(r.per_100k(r.db_cpu_s) for r in mine)
        broker_cpu = statistics.median(r.per_100k(r.broker_cpu_s) for r in mine)
        print(
            f"  {workers} worker(s): {spread([r.rate for r in mine])} readings/s; CPU per "
            f"100,000 readings: workers {worker_cpu:.2f} s, PostgreSQL {db_cpu:.2f} s, "
            f"Mosquitto {broker_cpu:.3f} s; load {min(r.load for r in mine):.1f}-"
            f"{max(r.load for r in mine):.1f}"
        )
    if len(counts) > 1:
        one = statistics.median(r.rate for r in runs if r.workers == counts[0])
        for workers in counts[1:]:
            more = statistics.median(r.rate for r in runs if r.workers == workers)
            print(f"  {workers} workers / {counts[0]}: {more / one:.2f}x")
    if args.profile:
        print(f"profiles: {directory / 'workers'}/*.prof (remove {directory} after reading)")
    else:
        shutil.rmtree(directory, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps([asdict(r) | {"rate": r.rate} for r in runs], indent=1))
    return 0


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


if __name__ == "__main__":
    raise SystemExit(main())
