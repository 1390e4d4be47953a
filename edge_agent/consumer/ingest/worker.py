"""One `ingest run` worker: MQTT 5 shared subscription in, PostgreSQL out, acknowledgements back.

The loop, for each group of messages (as many as are waiting, at most `max_group`):

1. decode: verify each batch against the enrolled keys (refreshed every `keys_refresh`, and at
   once when an unknown key id shows up), decode it, make its COPY rows;
2. write: everything of the group in one transaction (write.py), COMMIT;
3. PUBACK each message of the group (paho's manual acknowledgement: a message is acknowledged to
   the broker only once what it carried is committed, so a worker killed before that loses
   nothing, the broker sends the message again);
4. publish the end-to-end acknowledgement of each (gateway, epoch) written, retained, QoS 1, at
   most once per `ack_interval` for each, from the ledger as committed *at publish time*: its
   coverage row is read again (one query for all the acknowledgements due) right before, so
   that what one worker publishes includes what the others committed meanwhile, and a retained
   acknowledgement is never replaced by an older one that a slower worker computed from its own
   last COMMIT (the gateway would keep, and after a restart re-send, more than it needs).
   `issued` is taken before that read: a later `issued` means a later read, so a larger ledger.
   While that read fails, nothing is published (the next flush tries again): a worker never
   publishes a ledger older than the database's.

Point catalogues (contract §4.12) come on `{prefix}/+/catalogue/+`, a subscription of each
worker's own (not shared: every worker needs every catalogue; the broker sends the retained
ones at subscribe). A worker loads the stored catalogues at start, adds each one it receives to
its book as it decodes it (the batches after it need it), and stores it with its group. A batch
whose catalogue is not in the book, nor in the database, is parked with its group and PUBACKed;
it is written once the catalogue is stored, by the worker that finds both (parking.py says why
none stays parked): after each group that parked batches or stored catalogues, at start, and
every PARKED_SWEEP_S seconds.

Decoding the next group overlaps with writing the previous one. Refused messages (decode.py)
are recorded in `rejected` and acknowledged to the broker like the others, so that they are not
delivered again forever; they are never acknowledged end to end.

While PostgreSQL is unreachable the worker retries the group (backoff up to 5 s), acknowledges
nothing, and takes no more messages: the broker holds them (its in-flight window is full), and
agents in end_to_end mode keep their batches. A group the database refuses for its content
(a constraint, a value it cannot store) is written message by message; a message that still
fails is recorded as rejected (`unstorable`) so that it cannot block the stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import ssl
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit

import aiomqtt
import psycopg
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from psycopg import errors as pg_errors

from edge_agent.consumer.ingest import keystore, parking, schema
from edge_agent.consumer.ingest.decode import (
    Accepted,
    CatalogueItem,
    Decoder,
    Item,
    Parked,
    Rejection,
)
from edge_agent.consumer.ingest.settings import IngestSettings
from edge_agent.consumer.ingest.signed import AckSigner
from edge_agent.consumer.ingest.write import (
    Ledger,
    OverlapError,
    Written,
    parse_multirange,
    refuse_parked,
    write_group,
    write_parked,
)
from edge_agent.errors import EdgeAgentError
from edge_agent.seal.catalogue import Catalogue, CatalogueError
from edge_agent.seal.keys import load_private_key
from edge_agent.secret_file import read_secret_file

log = logging.getLogger(__name__)

T = TypeVar("T")
RETRY_MAX_S = 5.0
SESSION_EXPIRY_S = 7 * 86400
"""The worker's session outlives a restart by this much: what was sent to it and not
acknowledged is sent again when it comes back with the same client id."""
UNKNOWN_KEY_RELOAD_S = 1.0
"""An unknown key id reloads the keys at most this often."""
PARKING_LOGGED = 10_000
"""Digests remembered as logged ("Ingest parks batches"); beyond, logged again."""


@dataclass
class WorkerStats:
    """Running totals of one worker (logged on exit, read by tests and the benchmark)."""

    messages: int = 0
    batches: int = 0
    readings: int = 0
    duplicates: int = 0
    rejected: int = 0
    acks: int = 0
    groups: int = 0
    db_retries: int = 0
    catalogues: int = 0
    """Point catalogues this worker stored first (every worker receives each one)."""
    parked: int = 0
    """Batches parked: their catalogue unknown when they came."""
    unparked: int = 0
    """Parked batches this worker wrote once their catalogue was there (any worker's)."""
    seconds: dict[str, float] = field(default_factory=dict)
    """Wall time by stage: `open` (verify and decode envelopes), `rows` (value rules and COPY
    rows), `copy` (the COPY statements), `write` (whole transactions, COPY included)."""


@dataclass
class _Group:
    messages: list[aiomqtt.Message]
    items: list[Item]


class _Database:
    """The worker's PostgreSQL connections: one for writing, one (autocommit) for reading keys
    and ledgers; remade when lost."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self._write: psycopg.AsyncConnection[tuple[object, ...]] | None = None
        self._keys: psycopg.AsyncConnection[tuple[object, ...]] | None = None

    async def keys_generation(self) -> int:
        """The value of `gateway_keys_generation`: it changes with every key change."""
        rows = await self._read(keystore.GENERATION_SQL, ())
        return int(str(rows[0][0])) if rows else 0

    async def ledgers(self, keys: Sequence[tuple[str, str]]) -> list[Ledger]:
        """The committed ledger of each (gateway, epoch) of `keys` that has a coverage row."""
        rows = await self._read(
            "SELECT gateway, epoch, (received + evicted)::text, batches::text FROM coverage"
            " WHERE (gateway, epoch) IN (SELECT * FROM unnest(%s::text[], %s::text[]))",
            ([k[0] for k in keys], [k[1] for k in keys]),
        )
        return [
            Ledger(str(g), str(e), parse_multirange(str(seqs)), parse_multirange(str(batches)))
            for g, e, seqs, batches in rows
        ]

    async def _read(
        self, sql: str, params: tuple[object, ...] | dict[str, object]
    ) -> list[tuple[object, ...]]:
        """The rows of one query on the reading connection (autocommit: committed data only)."""
        try:
            if self._keys is None or self._keys.closed:
                self._keys = await psycopg.AsyncConnection.connect(
                    self.dsn, connect_timeout=10, autocommit=True
                )
            cursor = await self._keys.execute(sql, params)
            return await cursor.fetchall()
        except psycopg.Error:
            if self._keys is not None:
                await self._keys.close()
            self._keys = None
            raise

    async def catalogues(self, digests: Sequence[bytes] | None) -> list[tuple[bytes, bytes]]:
        """(digest, payload) of the stored catalogues (of `digests`, or the newest
        START_CATALOGUES), oldest first."""
        rows = await self._read(
            parking.CATALOGUES_SQL,
            {
                "d": None if digests is None else list(digests),
                "n": parking.START_CATALOGUES if digests is None else len(digests),
            },
        )
        return [(bytes(d), bytes(p)) for d, p in rows]  # type: ignore[call-overload]

    async def writer(self) -> psycopg.AsyncConnection[tuple[object, ...]]:
        if self._write is None or self._write.closed:
            self._write = await psycopg.AsyncConnection.connect(self.dsn, connect_timeout=10)
        return self._write

    async def reset(self) -> None:
        for conn in (self._write, self._keys):
            if conn is not None:
                with contextlib.suppress(psycopg.Error):
                    await conn.close()
        self._write = self._keys = None

    async def load_trust(self) -> keystore.GatewayTrust:
        async with await psycopg.AsyncConnection.connect(
            self.dsn, connect_timeout=10, autocommit=True
        ) as conn:
            cursor = await conn.execute(keystore.KEYS_SQL)
            return keystore.trust_from_rows(await cursor.fetchall())

    async def version(self) -> int:
        async with await psycopg.AsyncConnection.connect(
            self.dsn, connect_timeout=10, autocommit=True
        ) as conn:
            cursor = await conn.execute("SELECT to_regclass('schema_version') IS NOT NULL")
            row = await cursor.fetchone()
            if not row or not row[0]:
                return 0
            cursor = await conn.execute("SELECT coalesce(max(version), 0) FROM schema_version")
            row = await cursor.fetchone()
            return int(str(row[0])) if row else 0


class Worker:
    """One worker. `run(stop)` returns once `stop` is set and the group in hand is written."""

    def __init__(self, settings: IngestSettings) -> None:
        self.settings = settings
        self.stats = WorkerStats()
        self.ready = asyncio.Event()
        """Set once subscribed (a test or the benchmark may then publish)."""
        self._db = _Database(settings.dsn)
        self._signer = _ack_signer(settings)
        self._password = _read_password(settings.password_file)
        self._decoder: Decoder | None = None
        self._keys_loaded = 0.0
        self._generation = -1
        self._stop = asyncio.Event()
        self._dirty: dict[tuple[str, str], Ledger] = {}
        self._last_ack: dict[tuple[str, str], float] = {}
        self._parking: set[bytes] = set()
        """Digests this worker said it parks batches for (logged once each)."""

    async def run(self, stop: asyncio.Event) -> None:
        """Consume until `stop`; raise RuntimeError when the database's schema is not ours.

        A stop while PostgreSQL is away returns at once: what was not committed was not
        acknowledged, and the broker keeps it.
        """
        self._stop = stop
        try:
            await self._start()
        except StoppedWaitingError:
            return
        await self._consume(stop)

    async def _start(self) -> None:
        version = await self._retrying(self._db.version)
        if version != schema.VERSION:
            raise RuntimeError(
                f"database schema version {version}, this worker needs {schema.VERSION}: "
                "run `edge-agent ingest migrate`"
                if version < schema.VERSION
                else f"database schema version {version} is newer than this worker's "
                f"{schema.VERSION}: upgrade edge-agent"
            )
        self._decoder = Decoder(
            await self._retrying(self._db.load_trust), self.settings.topic_prefix
        )
        self._keys_loaded = time.monotonic()
        await self._retrying(lambda: self._load_book(None))
        await self._sweep()  # what a worker left parked, its catalogue stored meanwhile

    async def _load_book(self, digests: Sequence[bytes] | None) -> int:
        """Add the stored catalogues (of `digests`, or the newest) that the book lacks; how
        many. The book keeps what fits (decode.RecentCatalogues): the newest, loaded last.

        Raises psycopg.Error when the database cannot be read. A stored catalogue that does
        not parse (the table changed by hand) is logged and left out.
        """
        assert self._decoder is not None
        book = self._decoder.book
        added = 0
        for digest, payload in await self._db.catalogues(digests):
            if digest in book:
                continue
            try:
                book[digest] = Catalogue.parse(payload, digest)
            except CatalogueError as exc:
                log.error(
                    "Ingest cannot use a stored catalogue digest=%s error=%s", digest.hex(), exc
                )
                continue
            added += 1
        return added

    async def _consume(self, stop: asyncio.Event) -> None:
        s = self.settings
        try:
            while not stop.is_set():
                client = mqtt_client(s, self._password)
                # PUBACK only after COMMIT (paho's manual acknowledgement; aiomqtt does not
                # expose it, so it is set on its paho client before connecting; pinned in
                # tests/test_library_internals.py).
                client._client.manual_ack_set(True)
                try:
                    async with client:
                        await self._session(client, stop)
                except* aiomqtt.MqttError as group:
                    log.warning(
                        "Ingest lost the broker error=%s; reconnecting", group.exceptions[0]
                    )
                    self.ready.clear()
                    # A transaction cut short by the teardown leaves its connection unusable:
                    # start afresh (it was rolled back; its messages were never acknowledged).
                    await self._db.reset()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), 1.0)
        finally:
            await self._db.reset()

    async def _session(self, client: aiomqtt.Client, stop: asyncio.Event) -> None:
        prefix, group = self.settings.topic_prefix, self.settings.group
        for kind in ("batch", "hwm", "status"):
            await client.subscribe(f"$share/{group}/{prefix}/+/{kind}", qos=1)
        # Not shared: every worker needs every catalogue (and the retained ones come only to
        # a subscription of one's own, MQTT 5 §4.8.2).
        await client.subscribe(f"{prefix}/+/catalogue/+", qos=1)
        self.ready.set()
        log.info(
            "Ingest subscribed group=%s client_id=%s topics=%s/+/batch|hwm|status|catalogue/+",
            group, self.settings.mqtt_client_id(), prefix,
        )  # fmt: skip
        groups: asyncio.Queue[_Group | None] = asyncio.Queue(maxsize=1)
        async with asyncio.TaskGroup() as tasks:
            writer = tasks.create_task(self._write_loop(client, groups))
            acker = tasks.create_task(self._ack_loop(client, stop))
            try:
                await self._read_loop(client, groups, stop)
            finally:
                await groups.put(None)
            await writer
            acker.cancel()
            await self._flush_acks(client, every=True)

    async def _read_loop(
        self, client: aiomqtt.Client, groups: asyncio.Queue[_Group | None], stop: asyncio.Event
    ) -> None:
        messages = client.messages
        while not stop.is_set():
            getter = asyncio.ensure_future(anext(messages))
            stopper = asyncio.ensure_future(stop.wait())
            try:
                await asyncio.wait({getter, stopper}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                stopper.cancel()
            if not getter.done():
                getter.cancel()
                return
            batch = [getter.result()]
            while len(messages) and len(batch) < self.settings.max_group:
                batch.append(await anext(messages))
            await groups.put(await self._decode(batch))

    async def _decode(self, messages: list[aiomqtt.Message]) -> _Group:
        assert self._decoder is not None
        try:
            generation = await self._db.keys_generation()
        except psycopg.Error:
            generation = self._generation  # the write below waits for the database
        if (
            generation != self._generation
            or time.monotonic() - self._keys_loaded > self.settings.keys_refresh
        ):
            self._generation = generation
            await self._reload_keys()
        items: list[Item] = []
        for message in messages:
            payload = message.payload if isinstance(message.payload, bytes) else b""
            item = self._decoder.decode(str(message.topic), payload)
            if (
                isinstance(item, Rejection)
                and item.reason == "unknown_key"
                and time.monotonic() - self._keys_loaded > UNKNOWN_KEY_RELOAD_S
            ):
                await self._reload_keys()
                item = self._decoder.decode(str(message.topic), payload)
            if item is not None:
                items.append(item)
        if any(isinstance(item, Parked) for item in items):
            items = await self._decode_parked(items)
        self.stats.seconds.update(self._decoder.seconds)
        return _Group(messages, items)

    async def _decode_parked(self, items: list[Item]) -> list[Item]:
        """`items` with their parked batches decoded again where the book now has their
        catalogue: one that came later in the group, or that another worker stored (this
        worker's own copy of the message not in yet); the database is asked once for those."""
        assert self._decoder is not None
        book = self._decoder.book
        missing = sorted({i.digest for i in items if isinstance(i, Parked)} - book.keys())
        if missing:
            with contextlib.suppress(psycopg.Error):  # unreadable: parked, the write waits
                await self._load_book(missing)
        return [
            again
            if isinstance(item, Parked)
            and item.digest in book
            and (again := self._decoder.decode(item.topic, item.payload)) is not None
            else item
            for item in items
        ]

    async def _reload_keys(self) -> None:
        assert self._decoder is not None
        try:
            self._decoder.set_trust(await self._db.load_trust())
        except psycopg.Error as exc:
            log.warning("Ingest could not reload the gateway keys error=%s", exc)
        self._keys_loaded = time.monotonic()

    async def _write_loop(
        self, client: aiomqtt.Client, groups: asyncio.Queue[_Group | None]
    ) -> None:
        abandoned = False
        sweep = time.monotonic() + parking.PARKED_SWEEP_S
        while True:
            try:
                group = await asyncio.wait_for(groups.get(), max(0.0, sweep - time.monotonic()))
            except TimeoutError:
                if not abandoned:
                    try:
                        await self._sweep()
                    except StoppedWaitingError:
                        abandoned = True
                    except psycopg.Error as exc:  # not the connection: again at the next one
                        log.error("Ingest could not look for parked batches error=%s", exc)
                sweep = time.monotonic() + parking.PARKED_SWEEP_S
                continue
            if group is None:
                return
            if abandoned:
                continue  # stopping while the database is away: never acknowledged, kept
            began = time.perf_counter()
            try:
                written = await self._write(group.items)
            except StoppedWaitingError:
                abandoned = True
                continue
            seconds = self.stats.seconds
            seconds["write"] = seconds.get("write", 0.0) + time.perf_counter() - began
            seconds["copy"] = seconds.get("copy", 0.0) + written.copy_s
            for message in group.messages:  # only now: everything they carried is committed
                if message.qos > 0:
                    client._client.ack(message.mid, message.qos)
            self.stats.messages += len(group.messages)
            self.stats.groups += 1
            self.stats.readings += written.readings
            self.stats.duplicates += written.duplicates
            self.stats.rejected += written.rejected
            self.stats.batches += sum(1 for i in group.items if isinstance(i, Accepted))
            self.stats.catalogues += len(written.catalogues)
            self.stats.parked += written.parked
            for ledger in written.ledgers:
                self._dirty[(ledger.gateway, ledger.epoch)] = ledger
            self._log_catalogues(group.items, written)
            if written.unsure:
                sweep = time.monotonic()  # the look after the COMMIT failed: the sweep's, now
            if written.ready:
                try:
                    await self._unpark(written.ready)
                except StoppedWaitingError:
                    abandoned = True  # parked and committed: the next start's sweep takes them

    def _log_catalogues(self, items: Sequence[Item], written: Written) -> None:
        """A line for each catalogue this worker stored first, and for each digest it parks
        batches for, the first time (not a line a group while a catalogue stays away)."""
        for item in items:
            if isinstance(item, CatalogueItem) and item.catalogue.digest in written.catalogues:
                log.info(
                    "Ingest stored a point catalogue gateway=%s digest=%s points=%d",
                    item.gateway, item.catalogue.digest.hex(), len(item.catalogue.points),
                )  # fmt: skip
            elif isinstance(item, Parked) and item.digest not in self._parking:
                if len(self._parking) >= PARKING_LOGGED:
                    self._parking.clear()
                self._parking.add(item.digest)
                log.warning(
                    "Ingest parks batches gateway=%s catalogue=%s (not received yet); they are"
                    " written once it is", item.gateway, item.digest.hex(),
                )  # fmt: skip

    async def _sweep(self) -> None:
        """Write the parked batches whose catalogue is stored (any worker's). Raises
        StoppedWaitingError when told to stop while the database is away."""
        digests = await self._retrying(self._ready_digests)
        if digests:
            await self._unpark(digests)

    async def _ready_digests(self) -> list[bytes]:
        return await parking.ready(await self._db.writer())

    async def _unpark(self, digests: Sequence[bytes]) -> None:
        """Write the batches parked for `digests` (their catalogues stored), `max_group` a
        transaction, until none is left that this worker can take. Raises StoppedWaitingError
        when told to stop while the database is away."""
        assert self._decoder is not None
        decoder = self._decoder
        for digest in digests:
            if digest not in decoder.book:
                await self._retrying(lambda d=digest: self._load_book([d]))  # type: ignore[misc]
                if digest not in decoder.book:
                    continue  # stored but unusable (logged): parked it stays
            limit = self.settings.max_group
            total = 0
            while True:
                try:
                    written = await self._retrying(
                        lambda d=digest, n=limit: self._write_parked_once(d, n)  # type: ignore[misc]
                    )
                except psycopg.Error as exc:  # the content: one at a time, then refused
                    if limit > 1:
                        log.warning("Ingest parked batches refused error=%s; one by one", exc)
                        limit = 1
                        continue
                    log.error(
                        "Ingest cannot store a parked batch error=%s; recorded as rejected", exc
                    )
                    detail = str(exc)[:2000]
                    await self._retrying(
                        lambda d=digest, x=detail: self._refuse_parked_once(d, x)  # type: ignore[misc]
                    )
                    continue
                if not written.unparked:
                    break
                total += written.unparked
                self.stats.unparked += written.unparked
                self.stats.readings += written.readings
                self.stats.duplicates += written.duplicates
                self.stats.rejected += written.rejected
                for ledger in written.ledgers:
                    self._dirty[(ledger.gateway, ledger.epoch)] = ledger
            if total:
                log.info("Ingest wrote parked batches=%d catalogue=%s", total, digest.hex())

    async def _write_parked_once(self, digest: bytes, limit: int) -> Written:
        assert self._decoder is not None
        conn = await self._db.writer()
        try:
            return await write_parked(
                conn, digest, self._decoder.decode, self.settings.rejected_keep, limit
            )
        except (pg_errors.DeadlockDetected, pg_errors.SerializationFailure, OverlapError) as exc:
            raise TransactionRetryError(str(exc)) from exc

    async def _refuse_parked_once(self, digest: bytes, detail: str) -> None:
        await refuse_parked(await self._db.writer(), digest, detail, self.settings.rejected_keep)

    async def _write(self, items: Sequence[Item]) -> Written:
        """Write the group, retrying while the database is away; split it when it refuses."""
        try:
            return await self._retrying(lambda: self._write_once(items))
        except psycopg.Error as exc:  # the content, not the connection: one message at a time
            if len(items) > 1:
                log.warning("Ingest group refused error=%s; writing its messages one by one", exc)
                total = Written()
                for item in items:
                    one = await self._write([item])
                    total.ledgers.extend(one.ledgers)
                    total.readings += one.readings
                    total.duplicates += one.duplicates
                    total.rejected += one.rejected
                return total
            log.error("Ingest cannot store a message error=%s; recorded as rejected", exc)
            topic = getattr(items[0], "topic", "") if items else ""
            refusal = Rejection(str(topic), "unstorable", str(exc)[:2000], None, None, 0, b"")
            return await self._retrying(lambda: self._write_once([refusal]))

    async def _write_once(self, items: Sequence[Item]) -> Written:
        conn = await self._db.writer()
        try:
            return await write_group(conn, items, self.settings.rejected_keep)
        except (pg_errors.DeadlockDetected, pg_errors.SerializationFailure, OverlapError) as exc:
            raise TransactionRetryError(str(exc)) from exc

    async def _retrying(self, attempt: Callable[[], Awaitable[T]]) -> T:
        """`attempt()` until it does not fail for the connection or for concurrency; raise
        StoppedWaitingError when the worker is told to stop meanwhile."""
        delay = 0.2
        failed = False
        while True:
            try:
                result = await attempt()
            except (psycopg.OperationalError, psycopg.InterfaceError, TransactionRetryError) as exc:
                self.stats.db_retries += 1
                if not isinstance(exc, TransactionRetryError):
                    if not failed or delay >= RETRY_MAX_S:
                        log.warning("Ingest waits for PostgreSQL error=%s", str(exc).strip())
                    failed = True
                    await self._db.reset()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), delay)
                if self._stop.is_set():
                    raise StoppedWaitingError from exc
                delay = min(RETRY_MAX_S, delay * 2)
            else:
                if failed:
                    log.warning("Ingest reached PostgreSQL again")
                return result

    async def _ack_loop(self, client: aiomqtt.Client, stop: asyncio.Event) -> None:
        interval = max(self.settings.ack_interval, 0.05)
        while True:
            await asyncio.sleep(interval)
            await self._flush_acks(client)

    async def _flush_acks(self, client: aiomqtt.Client, *, every: bool = False) -> None:
        """Publish the acknowledgements due (`every`: all pending, at a stop)."""
        if self._signer is None or not self._dirty:
            self._dirty.clear()
            return
        now = time.monotonic()
        due = [
            key
            for key in self._dirty
            if every or now - self._last_ack.get(key, -1e9) >= self.settings.ack_interval
        ]
        if not due:
            return
        ledgers = {key: self._dirty.pop(key) for key in due}
        issued = time.time_ns()  # before the read: a later `issued` never says less
        try:
            for fresh in await self._db.ledgers(sorted(ledgers)):
                ledgers[(fresh.gateway, fresh.epoch)] = fresh
        except psycopg.Error as exc:  # never an older ledger: again at the next flush
            log.warning("Ingest cannot read the ledgers to acknowledge error=%s", exc)
            for key, ledger in ledgers.items():
                self._dirty.setdefault(key, ledger)
            return
        sends = []
        for key, ledger in sorted(ledgers.items()):
            self._last_ack[key] = now
            try:
                payload = self._signer.sign(
                    ledger.gateway, ledger.epoch, ledger.seqs, ledger.batches, issued
                )
            except ValueError as exc:  # a name the codec refuses: stored, not acknowledgeable
                log.warning("Ingest cannot acknowledge gateway=%s error=%s", ledger.gateway, exc)
                continue
            topic = f"{self.settings.topic_prefix}/{ledger.gateway}/ack"
            sends.append(client.publish(topic, payload, qos=1, retain=True))
        await asyncio.gather(*sends)
        self.stats.acks += len(sends)
        if len(self._last_ack) > 100_000:
            self._last_ack = {k: t for k, t in self._last_ack.items() if now - t < 60}


class StoppedWaitingError(EdgeAgentError):
    """Told to stop while waiting for PostgreSQL."""


class TransactionRetryError(EdgeAgentError):
    """A transaction the server aborted for concurrency (deadlock, serialisation): retry it."""


def mqtt_client(settings: IngestSettings, password: str | None) -> aiomqtt.Client:
    """The worker's MQTT 5 client: persistent session, TLS for mqtts:// (verified), and a
    Receive Maximum of 4 groups, which bounds the messages held unacknowledged in memory."""
    parts = urlsplit(settings.url)
    tls = ssl.create_default_context(cafile=settings.ca_file) if parts.scheme == "mqtts" else None
    properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    properties.SessionExpiryInterval = SESSION_EXPIRY_S
    properties.ReceiveMaximum = min(65535, 4 * settings.max_group)
    return aiomqtt.Client(
        parts.hostname or "127.0.0.1",
        parts.port or (8883 if tls else 1883),
        identifier=settings.mqtt_client_id(),
        protocol=aiomqtt.ProtocolVersion.V5,
        clean_start=False,
        properties=properties,
        tls_context=tls,
        username=settings.username,
        password=password,
        max_queued_incoming_messages=0,  # bounded by Receive Maximum, never dropped
    )


def _file_problem(exc: OSError | ValueError) -> str:
    """An unusable file's problem in one line: `PATH: No such file or directory`, or the text
    of a key's check (which names the file)."""
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.filename}: {exc.strerror}"
    return str(exc)


def _ack_signer(settings: IngestSettings) -> AckSigner | None:
    """The signer of end-to-end acknowledgements, None without `ack_key`.

    Raises ValueError (`ack_key: ...`) when the key file cannot be used: missing, unreadable,
    not a private Ed25519 key, or failing the checks of a signing key (security.md).
    """
    if not settings.ack_key:
        return None
    try:
        key = load_private_key(Path(settings.ack_key))
    except (OSError, ValueError) as exc:
        raise ValueError(f"ack_key: {_file_problem(exc)}") from None
    return AckSigner(key, f"ingest:{settings.mqtt_client_id()}")


def _read_password(path: str | None) -> str | None:
    """The MQTT password from its file (read once, at start), or None.

    Raises ValueError (`password_file: ...`) when the file cannot be read as text.
    """
    if not path:
        return None
    try:
        return read_secret_file(Path(path))
    except (OSError, ValueError) as exc:
        raise ValueError(f"password_file: {_file_problem(exc)}") from None


def run_worker(settings: IngestSettings) -> int:
    """`edge-agent ingest run`: a worker until SIGTERM or SIGINT; the exit status.

    0 after a clean stop, 1 when the database is not migrated to this version, 2 (one line on
    stderr, before anything is connected) when the ack key or the password file is unusable.
    """
    try:
        worker = Worker(settings)
    except ValueError as exc:
        print(f"ingest run: {exc}", file=sys.stderr)
        return 2

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await worker.run(stop)

    try:
        asyncio.run(main())
    except RuntimeError as exc:
        log.error("%s", exc)
        return 1
    s = worker.stats
    log.warning(
        "Ingest stopped messages=%d readings=%d duplicates=%d rejected=%d acks=%d "
        "catalogues=%d parked=%d unparked=%d "
        "open_s=%.2f rows_s=%.2f copy_s=%.2f write_s=%.2f cpu_s=%.2f",
        s.messages, s.readings, s.duplicates, s.rejected, s.acks,
        s.catalogues, s.parked, s.unparked,
        *(s.seconds.get(k, 0.0) for k in ("open", "rows", "copy", "write")),
        time.process_time(),
    )  # fmt: skip
    return 0
