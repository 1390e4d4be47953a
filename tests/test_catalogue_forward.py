"""Point catalogues on the wire (docs/contract.md §4.12), the agent's side, with real parts: a
real Mosquitto, the buffer on a real SQLite file, the real batcher and forwarder (or the real
`edge-agent run`), and a consumer that subscribes to the batches and to
`{prefix}/+/catalogue/+` and decodes with `Opener(keys, catalogues=book)`.

What must hold: a consumer gets every catalogue before the first batch that references it, on
every connection (also after a broker restart that lost the retained ones, and after an agent
restart); one that subscribes late gets it retained; and every batch decodes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import aiomqtt
import cbor2
import pytest
import zstandard
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from helpers.fault_proxy import FaultProxy
from helpers.store import SCHEMA_BEFORE_CATALOGUES
from helpers.wait import deadline, wait_for

from edge_agent.config.schema import MqttConfig
from edge_agent.demo.broker import Mosquitto
from edge_agent.forward.client import AckingClient
from edge_agent.forward.mqtt import Forwarder
from edge_agent.metrics import Metrics
from edge_agent.reading import Quality, Reading
from edge_agent.seal.batcher import Batcher
from edge_agent.seal.catalogue import Catalogue, CatalogueMissingError, parse_catalogue_topic
from edge_agent.seal.envelope import Batch, Opener, Sealer, Sign1
from edge_agent.store.sqlite import Store

pytestmark = pytest.mark.integration

PREFIX = "t"
GATEWAY = "gw"
BATCH_TOPIC = f"{PREFIX}/{GATEWAY}/batch"
CATALOGUE_TOPICS = f"{PREFIX}/+/catalogue/+"


def referenced(message: bytes) -> bytes | None:
    """The digest of the catalogue a sealed batch references (`cat`), None when it has none.
    Read straight from the payload: `Batch` does not say."""
    signed = Sign1.parse(message)
    payload = signed.payload
    if signed.header.get("enc") == "zstd":
        payload = zstandard.ZstdDecompressor().decompress(payload, max_output_size=1 << 24)
    body = cbor2.loads(payload)
    digest = body.get("cat")
    return digest if isinstance(digest, bytes) else None


@dataclass
class Consumer:
    """What one consumer received, in order, and what it decoded (batches by number)."""

    opener: Opener
    arrivals: list[tuple[str, bytes | None]] = field(default_factory=list)
    """("catalogue", digest) or ("batch", the digest it references or None), as they came."""
    retained: list[bytes] = field(default_factory=list)
    """Digests of the catalogues that arrived as retained messages."""
    batches: dict[int, Batch] = field(default_factory=dict)
    parked: list[bytes] = field(default_factory=list)
    """Batches that raised CatalogueMissingError, kept until their catalogue comes."""
    missing: list[bytes] = field(default_factory=list)
    """The digests CatalogueMissingError named, each time."""
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def take(self, topic: str, payload: bytes, *, retain: bool) -> None:
        named = parse_catalogue_topic(topic)
        if named is not None:
            catalogue = Catalogue.parse(payload, named[1])
            self.opener.catalogues[catalogue.digest] = catalogue
            self.arrivals.append(("catalogue", catalogue.digest))
            if retain:
                self.retained.append(catalogue.digest)
            parked, self.parked = self.parked, []
            for message in parked:
                self._open(message)
        else:
            self.arrivals.append(("batch", referenced(payload)))
            self._open(payload)
        self.changed.set()

    def _open(self, message: bytes) -> None:
        try:
            batch = self.opener.open(message)
        except CatalogueMissingError as exc:
            self.missing.append(exc.digest)
            self.parked.append(message)
            return
        self.batches[batch.batch] = batch

    def seqs(self) -> set[int]:
        return {int(r["seq"]) for b in self.batches.values() for r in b.readings}

    def catalogue_first(self) -> None:
        """Each batch that references a catalogue came after that catalogue."""
        seen: set[bytes] = set()
        for kind, digest in self.arrivals:
            if kind == "catalogue" and digest is not None:
                seen.add(digest)
            elif digest is not None:
                assert digest in seen, f"a batch came before its catalogue {digest.hex()}"

    async def until(self, done: object, what: str, timeout: float = 30.0) -> None:
        async with deadline(timeout, what):
            while not callable(done) or not done():
                self.changed.clear()
                await self.changed.wait()


@asynccontextmanager
async def consuming(
    broker: Mosquitto, consumer: Consumer, topics: Sequence[str], name: str
) -> AsyncIterator[aiomqtt.Client]:
    """A real MQTT 5 client feeding `consumer`, subscribed to `topics` (QoS 1) on entry."""
    client = aiomqtt.Client("127.0.0.1", broker.port, identifier=name,
                            protocol=aiomqtt.ProtocolVersion.V5)  # fmt: skip
    async with client:
        for topic in topics:
            await client.subscribe(topic, qos=1)

        async def receive() -> None:
            async for message in client.messages:
                payload = message.payload
                assert isinstance(payload, bytes)
                consumer.take(str(message.topic), payload, retain=bool(message.retain))

        task = asyncio.create_task(receive())
        try:
            yield client
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def points_readings(names: Sequence[str], first_ts: int, polls: int) -> list[Reading]:
    """`polls` polls of the points `names` (integers: their type never changes)."""
    return [
        Reading("plc", name, first_ts + poll, poll * 10 + i, Quality.GOOD)
        for poll in range(polls)
        for i, name in enumerate(names)
    ]


@dataclass
class Agent:
    """The agent's real parts on one buffer: store, batcher (format 2, catalogue) and forwarder."""

    store: Store
    batcher: Batcher
    forwarder: Forwarder
    key: Ed25519PrivateKey
    metrics: Metrics
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    @property
    def public(self) -> list[Ed25519PublicKey]:
        return [self.key.public_key()]

    async def emit(self, readings: list[Reading]) -> None:
        """Hand readings over as a source does and wait until they are sealed into the store."""
        target = self.batcher.sealed_readings + len(readings)
        await self.batcher.emit(readings)
        async with deadline(10, "the readings sealed"):
            while self.batcher.sealed_readings < target:
                self.batcher.sealed.clear()
                await self.batcher.sealed.wait()

    async def drained(self, timeout: float = 30.0) -> None:
        async with deadline(timeout, f"the buffer drained ({self.store.stats.batches} left)"):
            while self.store.stats.batches:
                self.forwarder.acked.clear()
                if self.store.stats.batches:
                    await self.forwarder.acked.wait()

    def start_forwarder(self) -> None:
        self.tasks.append(asyncio.create_task(self.forwarder.run()))

    async def stop_forwarder(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        self.tasks.clear()


@asynccontextmanager
async def agent_parts(
    path: Path, url: str, *, key: Ed25519PrivateKey | None = None, forward: bool = True,
    ack_keys: list[Ed25519PublicKey] | None = None, **mqtt: object,
) -> AsyncIterator[Agent]:  # fmt: skip
    """The batcher and forwarder wired as agent.py wires them, on the buffer at `path`."""
    key = key or Ed25519PrivateKey.generate()
    store = Store(path, max_bytes=64 * 1024 * 1024, max_age_s=86400)
    await store.open()
    metrics = Metrics()
    sealer = Sealer(key, payload_format=2, catalogue=True)
    batcher = Batcher(store, sealer, metrics, gateway=GATEWAY, max_readings=20, max_delay=0.02,
                      capacity=10_000)  # fmt: skip
    settings: dict[str, object] = {"reconnect_min": 0.1, "reconnect_max": 0.5, **mqtt}
    config = MqttConfig(url=url, topic_prefix=PREFIX, **settings)  # type: ignore[arg-type]
    forwarder = Forwarder(config, GATEWAY, store, batcher.sealed, metrics,
                          on_evicted=batcher.declare_pending,
                          on_payload_limit=batcher.set_max_bytes, ack_keys=ack_keys)  # fmt: skip
    agent = Agent(store, batcher, forwarder, key, metrics)
    batching = asyncio.create_task(batcher.run())
    if forward:
        agent.start_forwarder()
    try:
        yield agent
    finally:
        await agent.stop_forwarder()
        batcher.stop()
        await batching
        await store.close()


def sample(metrics: Metrics, name: str) -> float:
    value = metrics.registry.get_sample_value(f"{name}_total")
    assert value is not None, f"no metric {name}_total"
    return value


POINTS = [f"p{i}" for i in range(8)]


@pytest.mark.parametrize(("protocol", "broker_inflight"), [("5", 2), ("5", 0), ("3.1.1", 0)])
async def test_each_catalogue_arrives_before_the_first_batch_referencing_it_and_all_decode(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, protocol: str, broker_inflight: int
) -> None:
    """(a) Two catalogues (a point added midway). A catalogue holds a place in the window: with
    the broker's Receive Maximum at 2, at most 2 publishes are ever in flight (counted around
    the real client: Mosquitto does not enforce it for QoS 1)."""
    in_flight, peak = 0, 0
    original = AckingClient.publish_acked

    async def counted(
        self: AckingClient, topic: str, payload: bytes, *, retain: bool = False
    ) -> int:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        try:
            return await original(self, topic, payload, retain=retain)
        finally:
            in_flight -= 1

    monkeypatch.setattr(AckingClient, "publish_acked", counted)
    directory = tmp_path / "broker"
    directory.mkdir()
    limit = f"max_inflight_messages {broker_inflight}\n"
    with Mosquitto(directory=directory, extra_config=limit) as broker:
        consumer = Consumer(Opener([]))
        async with agent_parts(tmp_path / "b.db", broker.url, protocol=protocol) as agent:
            consumer.opener = Opener(agent.public, catalogues=consumer.opener.catalogues)
            async with consuming(broker, consumer, [BATCH_TOPIC, CATALOGUE_TOPICS], "c"):
                await agent.emit(points_readings(POINTS, 0, 10))
                await agent.emit(points_readings([*POINTS, "added"], 100, 10))
                await agent.drained()
                sealed = set(range(1, agent.store.next_seq))
                await consumer.until(lambda: consumer.seqs() == sealed, "every reading decoded")
            assert await agent.store.catalogue_count() == 1, "the first one went with its batches"
            connects = sample(agent.metrics, "edge_agent_mqtt_connects")
    catalogues = [d for kind, d in consumer.arrivals if kind == "catalogue"]
    assert len(set(catalogues)) == 2, "a new point makes a new catalogue"
    consumer.catalogue_first()
    assert not consumer.missing, "no batch ever came before its catalogue"
    assert all(d is not None for kind, d in consumer.arrivals if kind == "batch")
    assert connects == 1, "no connection was lost"
    assert peak <= (broker_inflight or 32)


async def test_a_consumer_that_subscribes_late_gets_the_catalogue_retained(
    tmp_path: Path, broker: Mosquitto
) -> None:
    """(b) Subscribed to the batches only, the consumer parks them all (authentic, not yet
    decodable); once it subscribes to the catalogues, the retained one decodes every batch."""
    consumer = Consumer(Opener([]))
    async with agent_parts(tmp_path / "b.db", broker.url) as agent:
        consumer.opener = Opener(agent.public)
        async with consuming(broker, consumer, [BATCH_TOPIC], "late") as client:
            await agent.emit(points_readings(POINTS, 0, 10))
            await agent.drained()
            batches = agent.store.next_batch - 1
            await consumer.until(lambda: len(consumer.parked) == batches, "every batch parked")
            assert not consumer.batches
            await client.subscribe(CATALOGUE_TOPICS, qos=1)
            sealed = set(range(1, agent.store.next_seq))
            await consumer.until(lambda: consumer.seqs() == sealed, "every reading decoded")
    assert consumer.retained, "the catalogue came as a retained message"
    assert not consumer.parked


async def test_a_broker_restarted_without_its_retained_catalogue_gets_it_again(
    tmp_path: Path,
) -> None:
    """(c) The broker loses everything (no persistence file) while batches are buffered; on the
    next connection the agent publishes the catalogue again, before those batches: a fresh
    consumer decodes them, and one subscribing after that finds it retained on the new broker.

    The agent reaches the broker through a proxy held silent while the broker restarts, so that
    the fresh consumer subscribes before the agent's new connection gets through."""
    directory = tmp_path / "broker"
    directory.mkdir()
    broker = Mosquitto(directory=directory)
    broker.start()
    try:
        async with FaultProxy(broker.port) as proxy:
            url = f"mqtt://127.0.0.1:{proxy.port}"
            async with agent_parts(tmp_path / "b.db", url) as agent:
                first = Consumer(Opener(agent.public))
                async with consuming(broker, first, [BATCH_TOPIC, CATALOGUE_TOPICS], "first"):
                    await agent.emit(points_readings(POINTS, 0, 5))
                    await agent.drained()
                    before = agent.store.next_seq
                    await first.until(lambda: first.seqs() == set(range(1, before)), "decoded")
                broker.stop()
                (directory / "mosquitto.db").unlink()  # restarted without its retained messages
                await wait_for(lambda: not agent.forwarder.state.connected and
                               not proxy.connections, 10, "the agent disconnected")  # fmt: skip
                proxy.silence()  # the agent's next attempts wait in the proxy
                await agent.emit(points_readings(POINTS, 100, 5))  # buffered
                assert agent.store.stats.batches > 0
                broker.start()
                fresh = Consumer(Opener(agent.public))
                async with consuming(broker, fresh, [BATCH_TOPIC, CATALOGUE_TOPICS], "fresh"):
                    assert not fresh.arrivals, "the new broker holds no catalogue"
                    proxy.restore()
                    await agent.drained()
                    buffered = set(range(before, agent.store.next_seq))
                    await fresh.until(lambda: buffered <= fresh.seqs(), "the buffered decoded")
                late = Consumer(Opener(agent.public))
                async with consuming(broker, late, [CATALOGUE_TOPICS], "late"):
                    await late.until(lambda: late.retained, "the catalogue retained again")
    finally:
        broker.stop()
    fresh.catalogue_first()
    assert not fresh.missing
    assert fresh.arrivals[0][0] == "catalogue"
    assert late.retained == [d for kind, d in fresh.arrivals if kind == "catalogue"]


async def test_a_restarted_agent_resumes_its_catalogue_and_publishes_it_from_the_buffer(
    tmp_path: Path, broker: Mosquitto
) -> None:
    """(d) Batches sealed while the broker is away survive a restart with their catalogues; the
    restarted agent makes no new catalogue for points its newest one holds (its first batches
    have fewer points than that one: a fresh start would make one of just those), and publishes
    the buffered ones on its first connection, each before its batches."""
    path, key = tmp_path / "b.db", Ed25519PrivateKey.generate()
    unreachable = "mqtt://127.0.0.1:9"  # discard: refused
    async with agent_parts(path, unreachable, key=key, forward=False) as agent:
        await agent.emit(points_readings(POINTS, 0, 5))
        await agent.emit(points_readings([*POINTS, "added"], 100, 5))
        newest = await agent.store.newest_catalogue()
    assert newest is not None
    digest = newest[0]
    with sqlite3.connect(path) as db:
        made = {row[0] for row in db.execute("SELECT digest FROM catalogues")}
        referenced_before = [row[0] for row in db.execute("SELECT catalogue FROM batches")]
    assert len(made) == 2, "one catalogue, then one with the point added"
    assert referenced_before[-1] == digest
    async with agent_parts(path, unreachable, key=key, forward=False) as agent:
        await agent.emit(points_readings(POINTS, 200, 5))
        assert await agent.store.catalogue_count() == 2, "no new catalogue after the restart"
    with sqlite3.connect(path) as db:
        after = [row[0] for row in db.execute("SELECT catalogue FROM batches ORDER BY id")]
    assert after[len(referenced_before) :] == [digest] * (len(after) - len(referenced_before))
    consumer = Consumer(Opener([key.public_key()]))
    async with consuming(broker, consumer, [BATCH_TOPIC, CATALOGUE_TOPICS], "c"):
        async with agent_parts(path, broker.url, key=key) as agent:
            await agent.drained()
            sealed = set(range(1, agent.store.next_seq))
        await consumer.until(lambda: consumer.seqs() == sealed, "every reading decoded")
    assert consumer.arrivals[0] == ("catalogue", referenced_before[0])
    assert {d for kind, d in consumer.arrivals if kind == "catalogue"} == made
    consumer.catalogue_first()
    assert not consumer.missing
    with sqlite3.connect(path) as db:
        kept = db.execute("SELECT digest FROM catalogues").fetchall()
    assert kept == [(digest,)], "drained: only the newest catalogue is kept"


async def test_a_key_rotation_keeps_the_catalogue(tmp_path: Path, broker: Mosquitto) -> None:
    """A new sealer (a reload with a new signing key) resumes the current catalogue: its first
    batch, of fewer points than that catalogue holds, makes no new one."""
    async with agent_parts(tmp_path / "b.db", broker.url, forward=False) as agent:
        await agent.emit(points_readings([*POINTS, "added"], 0, 3))
        rotated = Sealer(Ed25519PrivateKey.generate(), payload_format=2, catalogue=True)
        agent.batcher.use_sealer(rotated)
        await agent.emit(points_readings(POINTS, 100, 3))
        assert await agent.store.catalogue_count() == 1
        assert rotated.catalogue is not None
        newest = await agent.store.newest_catalogue()
        assert newest is not None
        assert rotated.catalogue.digest == newest[0]


def old_buffer(path: Path, key: Ed25519PrivateKey, batches: int) -> int:
    """A buffer as the agent before 2.4 left it: its schema, self-contained format-2 batches of
    10 readings sealed by the real sealer, in WAL mode. Returns the next seq."""
    sealer = Sealer(key, payload_format=2)
    epoch = "0123456789abcdef0123456789abcdef"
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA journal_mode=WAL")
        db.executescript(SCHEMA_BEFORE_CATALOGUES)
        for n in range(1, batches + 1):
            seq = (n - 1) * 10 + 1
            data = sealer.seal(gateway=GATEWAY, epoch=epoch, batch=n, first_seq=seq,
                               readings=points_readings(POINTS[:5], n * 100, 2),
                               sealed_ns=time.time_ns())  # fmt: skip
            db.execute("INSERT INTO batches VALUES (?, ?, ?, 10, ?, ?, ?, NULL)",
                       (n, seq, seq + 9, len(data), time.time_ns(), data))  # fmt: skip
        meta = [("epoch", epoch), ("next_seq", batches * 10 + 1), ("next_batch", batches + 1)]
        db.executemany("INSERT INTO meta VALUES (?, ?)", meta)
    return batches * 10 + 1


async def test_a_buffer_of_before_catalogues_opens_and_drains_beside_new_batches(
    tmp_path: Path, broker: Mosquitto
) -> None:
    """(e) The old batches (self-contained) and the new ones (referencing a catalogue) all
    reach a consumer and decode."""
    path, key = tmp_path / "b.db", Ed25519PrivateKey.generate()
    next_seq = old_buffer(path, key, batches=6)
    consumer = Consumer(Opener([key.public_key()]))
    async with consuming(broker, consumer, [BATCH_TOPIC, CATALOGUE_TOPICS], "c"):
        async with agent_parts(path, broker.url, key=key) as agent:
            assert agent.store.next_seq == next_seq
            await agent.emit(points_readings(POINTS, 1000, 5))
            await agent.drained()
            sealed = set(range(1, agent.store.next_seq))
        await consumer.until(lambda: consumer.seqs() == sealed, "every reading decoded")
    batches = [digest for kind, digest in consumer.arrivals if kind == "batch"]
    assert batches[:6] == [None] * 6, "the old batches are sent as they were sealed"
    assert batches[6:] and None not in batches[6:]
    consumer.catalogue_first()
    assert not consumer.missing


async def test_a_refused_catalogue_keeps_its_batches_buffered_degraded_until_allowed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The broker's ACL denies the catalogue topic (PUBACK 0x87): no batch that needs it is
    published, the forwarder is degraded naming the catalogue and backs off; once allowed,
    everything goes, catalogue first."""
    caplog.set_level(logging.INFO, logger="edge_agent")
    acl = tmp_path / "acl"
    acl.write_text(f"topic readwrite {PREFIX}/{GATEWAY}/status\ntopic readwrite {BATCH_TOPIC}\n"
                   f"topic read {PREFIX}/{GATEWAY}/catalogue/#\n")  # fmt: skip
    directory = tmp_path / "broker"
    directory.mkdir()
    with Mosquitto(directory=directory, extra_config=f"acl_file {acl}\n") as broker:
        consumer = Consumer(Opener([]))
        async with agent_parts(tmp_path / "b.db", broker.url, reconnect_min=0.05,
                               reconnect_max_stalled=0.8) as agent:  # fmt: skip
            consumer.opener = Opener(agent.public)
            async with consuming(broker, consumer, [BATCH_TOPIC, CATALOGUE_TOPICS], "c"):
                await agent.emit(points_readings(POINTS, 0, 5))
                batches = agent.store.stats.batches
                await wait_for(lambda: sample(agent.metrics, "edge_agent_publish_rejected") >= 2,
                               10, "the catalogue refused twice")  # fmt: skip
                assert agent.store.stats.batches == batches
                degraded = agent.forwarder.state.degraded or ""
                assert "point catalogue" in degraded and "0x87" in degraded
                assert not consumer.arrivals, "no batch went without its catalogue"
                acl.write_text(f"topic readwrite {PREFIX}/{GATEWAY}/#\n")
                broker.reload()
                await agent.drained()
                sealed = set(range(1, agent.store.next_seq))
                await consumer.until(lambda: consumer.seqs() == sealed, "every reading decoded")
                assert agent.forwarder.state.degraded is None
    consumer.catalogue_first()
    refusals = [r.getMessage() for r in caplog.records
                if r.name == "edge_agent.forward.mqtt" and "0x87" in r.getMessage()]  # fmt: skip
    assert len(refusals) == 1, f"logged once: {refusals}"


async def test_end_to_end_sends_the_catalogue_again_with_batches_sent_again(
    tmp_path: Path, broker: Mosquitto
) -> None:
    """mqtt.ack: end_to_end, and no consumer acknowledges: the batches go again after
    `ack_timeout` on the same connection, each wave preceded by the catalogue again (a consumer
    that did not acknowledge may lack it)."""
    consumer = Consumer(Opener([]))
    nobody = [Ed25519PrivateKey.generate().public_key()]
    async with agent_parts(tmp_path / "b.db", broker.url, ack="end_to_end", ack_timeout=0.5,
                           ack_keys=nobody) as agent:  # fmt: skip
        consumer.opener = Opener(agent.public, catalogues=consumer.opener.catalogues)
        async with consuming(broker, consumer, [BATCH_TOPIC, CATALOGUE_TOPICS], "c"):
            await agent.emit(points_readings(POINTS, 0, 3))
            batches = agent.store.next_batch - 1
            await consumer.until(
                lambda: sum(kind == "batch" for kind, _ in consumer.arrivals) >= 2 * batches,
                "every batch sent twice",
            )
        assert sample(agent.metrics, "edge_agent_mqtt_connects") == 1
        assert sample(agent.metrics, "edge_agent_batches_resent") >= batches
    catalogues = [i for i, (kind, _) in enumerate(consumer.arrivals) if kind == "catalogue"]
    assert len(catalogues) >= 2, "published again on the same connection"
    second_wave = [i for i, (kind, _) in enumerate(consumer.arrivals) if kind == "batch"][batches]
    assert any(first < i < second_wave for first in catalogues[:1] for i in catalogues[1:])
    consumer.catalogue_first()
