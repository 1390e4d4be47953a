"""`edge-agent ingest` as the fleet tests and bench/ingest.py run it: workers, ledger, acks.

- `FleetWorker`: one real `edge-agent ingest run` process (its own MQTT client id in a shared
  subscription group), started, SIGKILLed and restarted by a test; ready once it logs its
  subscription (helpers/ingest.py's READY_LINE).
- `prepare_database`: `migrate` and the fleet's keys enrolled, through the ingest's own code.
- `Ledger`: per case, what the fleet took against what the database holds: `taken` (readings
  published), `verified` (distinct rows), `duplicates` (rows in excess: must be 0, the unique
  key forbids them), `declared` (seqs declared evicted), `lost` (taken, neither stored nor
  declared: must be 0); `line()` is the one line the tests print.
- `AckCollector`: every consumer acknowledgement published on `{prefix}/+/ack`, opened with the
  agent's own `AckOpener` (seal/ack.py) against the consumer's public key, with its arrival.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import psycopg
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edge_agent.consumer.ingest import keystore, schema
from edge_agent.consumer.ingest.decode import Accepted, Decoder
from edge_agent.demo.broker import Mosquitto
from edge_agent.seal.ack import AckError, AckOpener
from helpers.fleet import Fleet, Message
from helpers.ingest import READY_LINE
from helpers.processes import terminate
from helpers.wait import wait_for


class FleetWorker:
    """One `edge-agent ingest run` process of the group `group`, client id `client_id`."""

    def __init__(
        self,
        broker: Mosquitto,
        dsn: str,
        directory: Path,
        *,
        client_id: str,
        group: str = "ingest",
        topic_prefix: str,
        ack_key: Path | None = None,
        extra: tuple[str, ...] = (),
        python_args: tuple[str, ...] = (),
    ) -> None:
        self.broker = broker
        self.dsn = dsn
        self.client_id = client_id
        self.group = group
        self.topic_prefix = topic_prefix
        self.ack_key = ack_key
        self.extra = extra
        self.python_args = python_args
        """Interpreter options before `-m edge_agent` (the benchmark's `-m cProfile -o FILE`)."""
        directory.mkdir(parents=True, exist_ok=True)
        self.log_path = directory / f"{client_id}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        """The command line that starts the worker."""
        return [
            sys.executable, *self.python_args, "-m", "edge_agent", "ingest", "run",
            "--url", self.broker.url, "--dsn", self.dsn, "--group", self.group,
            "--topic-prefix", self.topic_prefix, "--client-id", self.client_id,
            *(["--ack-key", str(self.ack_key)] if self.ack_key else []),
            *self.extra,
        ]  # fmt: skip

    def start(self, timeout: float = 20.0, *, wait: bool = True) -> None:
        """Start the process; return once the broker has logged its subscription (`wait`).

        A worker subscribes only once its database answers: `wait=False` while it is down.
        Raises RuntimeError with the worker's log if it exits, TimeoutError after `timeout`.
        """
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self.command(),
                stdout=log,
                stderr=log,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        end = time.monotonic() + timeout
        while wait and time.monotonic() < end:
            if READY_LINE in self.log()[offset:]:
                return
            if self.process.poll() is not None:
                raise RuntimeError(f"ingest worker {self.client_id} exited:\n{self.log()}")
            time.sleep(0.05)  # a separate process: its log is the only signal it gives
        if wait:
            raise TimeoutError(f"ingest worker {self.client_id} not subscribed:\n{self.log()}")

    def kill(self) -> None:
        """SIGKILL: the worker dies wherever it is (mid-transaction, mid-acknowledgement)."""
        assert self.process is not None
        self.process.kill()
        self.process.wait()
        self.process = None

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM and wait; the exit status."""
        if self.process is None:
            return 0
        code = terminate(self.process, timeout)
        self.process = None
        return code

    def alive(self) -> bool:
        """Whether the process runs."""
        return self.process is not None and self.process.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def decoded(dsn: str, fleet: Fleet, messages: list[Message]) -> list[Accepted]:
    """The worker's own decoding of `messages` (the keys enrolled in `dsn`), each one accepted."""
    with psycopg.connect(dsn) as conn:
        decoder = Decoder(keystore.load_trust(conn), fleet.prefix)
    items = [decoder.decode(m.topic, m.payload) for m in messages]
    assert all(isinstance(i, Accepted) for i in items), items
    return items  # type: ignore[return-value]


def prepare_database(
    dsn: str, fleet: Fleet | None = None, keys: Iterable[tuple[str, Path]] = ()
) -> None:
    """Migrate the database and enrol the fleet's keys (and `keys`: (gateway, PEM) pairs)."""
    with psycopg.connect(dsn) as conn:
        schema.migrate(conn)
        for gateway, pem in [*(fleet.key_files() if fleet else []), *keys]:
            keystore.add_key(conn, gateway, pem)


def local_ports(pid: int) -> set[int]:
    """The local TCP ports of process `pid`'s sockets (its /proc fds against /proc/net/tcp)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[9] in inodes:
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


class CopyWatch:
    """Watches PostgreSQL for a process's COPY (one connection, kept: polled every few ms)."""

    def __init__(self, dsn: str) -> None:
        self._conn = psycopg.connect(dsn, autocommit=True)

    def copying(self, pid: int) -> bool:
        """Whether process `pid` has a COPY into PostgreSQL running right now: its group's
        transaction open, rows on their way (its connection found in pg_stat_activity by
        its port)."""
        rows = self._conn.execute(
            "SELECT client_port FROM pg_stat_activity"
            " WHERE state = 'active' AND query LIKE 'COPY%' AND client_port IS NOT NULL"
        ).fetchall()
        ports = {int(port) for (port,) in rows}  # type: ignore[call-overload]
        return bool(ports) and bool(ports & local_ports(pid))

    def close(self) -> None:
        self._conn.close()


async def kill_mid_copy(dsn: str, worker: FleetWorker, what: str, timeout: float = 30) -> None:
    """SIGKILL `worker` while PostgreSQL shows its COPY running: its group's transaction open,
    its messages neither committed nor PUBACKed. TimeoutError naming `what` if no COPY of it is
    seen within `timeout` s."""
    watch = CopyWatch(dsn)

    def killed() -> bool:
        assert worker.process is not None
        if not watch.copying(worker.process.pid):
            return False
        worker.kill()
        return True

    try:
        await wait_for(killed, timeout, what, interval=0)
    finally:
        watch.close()


def report(dsn: str) -> subprocess.CompletedProcess[str]:
    """`edge-agent ingest report --dsn DSN` as an operator runs it."""
    return subprocess.run(
        [sys.executable, "-m", "edge_agent", "ingest", "report", "--dsn", dsn],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def stored_readings(dsn: str, gateways: Iterable[str] | None = None) -> int:
    """Readings the ledger says are stored (sum over `coverage`, of `gateways` only if given):
    cheap to poll."""
    names = None if gateways is None else list(gateways)
    with psycopg.connect(dsn, connect_timeout=5) as conn:
        row = conn.execute(
            "SELECT coalesce(sum(readings), 0) FROM coverage"
            " WHERE %(names)s::text[] IS NULL OR gateway = ANY(%(names)s::text[])",
            {"names": names},
        ).fetchone()
        return int(row[0]) if row else 0  # type: ignore[call-overload]


@dataclass
class Ledger:
    """One case's account; `lost` and `duplicates` must be 0."""

    case: str
    taken: int
    verified: int
    duplicates: int
    declared: int
    """Seqs declared evicted by the gateways (never taken: no reading carried them)."""
    lost: int
    redelivered: int = 0
    """Readings the workers received again and recognised as already stored (the ledger's
    `coverage.duplicates`): what a redelivery after a crash cost, not an error."""
    missing: dict[tuple[str, str], int] = field(default_factory=dict)

    def line(self) -> str:
        """`case: taken / verified / duplicates / declared / lost` as the report prints it."""
        return (
            f"{self.case}: taken {self.taken} / verified {self.verified} / duplicates "
            f"{self.duplicates} / declared {self.declared} / lost {self.lost}"
            f" (redelivered and recognised: {self.redelivered})"
        )


def ledger(case: str, dsn: str, taken: Mapping[tuple[str, str], set[int]]) -> Ledger:
    """Compare what was taken (seqs per (gateway, epoch)) with the database's rows of those
    streams: `verified` counts the taken seqs stored, `duplicates` the rows stored twice,
    `declared` the seqs the ledger holds as declared evicted."""
    stored: dict[tuple[str, str], set[int]] = {}
    total = redelivered = declared = 0
    with psycopg.connect(dsn) as conn:
        for gateway, epoch in taken:
            seqs = conn.execute(
                "SELECT seq FROM readings WHERE gateway = %s AND epoch = %s", (gateway, epoch)
            ).fetchall()
            total += len(seqs)
            stored[(gateway, epoch)] = {int(s) for (s,) in seqs}  # type: ignore[call-overload]
            row = conn.execute(
                "SELECT duplicates, (SELECT coalesce(sum(upper(r) - lower(r)), 0)"
                " FROM unnest(evicted) AS r) FROM coverage WHERE gateway = %s AND epoch = %s",
                (gateway, epoch),
            ).fetchone()
            if row is not None:
                redelivered += int(row[0])  # type: ignore[call-overload]
                declared += int(row[1])  # type: ignore[call-overload]
    missing = {k: len(seqs - stored[k]) for k, seqs in taken.items()}
    return Ledger(
        case=case,
        taken=sum(len(s) for s in taken.values()),
        verified=sum(len(seqs & stored[k]) for k, seqs in taken.items()),
        duplicates=total - sum(len(s) for s in stored.values()),
        declared=declared,
        lost=sum(missing.values()),
        redelivered=redelivered,
        missing={k: n for k, n in missing.items() if n},
    )


@dataclass(frozen=True)
class Ack:
    """One verified consumer acknowledgement and when it arrived (time.monotonic())."""

    arrived: float
    gateway: str
    epoch: str
    seqs: list[tuple[int, int]]
    batches: list[tuple[int, int]]
    issued: int
    consumer: str | None


class AckCollector:
    """Subscribes to `{prefix}/+/ack` and keeps every acknowledgement that verifies against
    `key` (the consumer's public key); `refused` counts those that do not."""

    def __init__(self, broker: Mosquitto, prefix: str, key: Ed25519PublicKey) -> None:
        self.acks: list[Ack] = []
        self.refused = 0
        self._opener = AckOpener([key])
        self._lock = threading.Lock()
        subscribed = threading.Event()
        self._client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, f"acks-{broker.port}", protocol=mqtt.MQTTv5
        )
        self._client.on_message = self._on_message
        self._client.on_subscribe = lambda *_args: subscribed.set()
        self._client.connect("127.0.0.1", broker.port)
        self._client.loop_start()
        self._client.subscribe(f"{prefix}/+/ack", qos=1)
        if not subscribed.wait(10):
            self.close()
            raise TimeoutError("no SUBACK for the acknowledgements' topic")

    def _on_message(self, _c: Any, _u: Any, message: mqtt.MQTTMessage) -> None:
        try:
            opened = self._opener.open(message.payload)
        except AckError:  # counted: a test asserts there are none
            with self._lock:
                self.refused += 1
            return
        ack = Ack(
            time.monotonic(),
            opened.gateway,
            opened.epoch,
            [(a, b) for a, b in opened.seqs],
            [(a, b) for a, b in opened.batches],
            opened.issued_ns,
            opened.consumer,
        )
        with self._lock:
            self.acks.append(ack)

    def since(self, moment: float) -> list[Ack]:
        """The acknowledgements that arrived at or after `moment` (time.monotonic())."""
        with self._lock:
            return [a for a in self.acks if a.arrived >= moment]

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


def covered(ranges: Iterable[tuple[int, int]]) -> set[int]:
    """Every seq in inclusive `ranges`."""
    return {s for first, last in ranges for s in range(first, last + 1)}
