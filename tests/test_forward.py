"""The forwarder against a real Mosquitto: delete only after a successful PUBACK, keep within the
broker's limits, and never let one batch the broker will not take stop the stream."""

from __future__ import annotations

import asyncio
import logging
import random
import string
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from helpers.store import filled_store
from helpers.wait import deadline

from edge_agent.config.schema import MqttConfig
from edge_agent.consumer.completeness import Stream
from edge_agent.consumer.verify import Verifier, consume, consumer_client
from edge_agent.demo.broker import Mosquitto
from edge_agent.forward.client import AckingClient, publish_packet_size
from edge_agent.forward.mqtt import DROPS_TO_EVICT, Forwarder
from edge_agent.metrics import Metrics
from edge_agent.reading import Quality, Reading
from edge_agent.seal.batcher import Batcher
from edge_agent.seal.envelope import Opener, Sealer
from edge_agent.store.sqlite import Store

pytestmark = pytest.mark.integration


def sample(metrics: Metrics, name: str) -> float:
    """A counter's value as /metrics shows it (`name` without the `_total` suffix)."""
    value = metrics.registry.get_sample_value(f"{name}_total")
    assert value is not None, f"no metric {name}_total"
    return value


async def all_acknowledged(forwarder: Forwarder, store: Store, timeout: float = 30.0) -> None:
    """Wait, on the forwarder's `acked` event, until the store holds no batch."""
    async with deadline(timeout, f"every batch acknowledged ({store.stats.batches} left)"):
        while store.stats.batches:
            forwarder.acked.clear()
            if store.stats.batches:  # an ack between the check and the clear is not missed
                await forwarder.acked.wait()


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
async def test_acknowledged_batches_are_deleted(
    tmp_path: Path, broker: Mosquitto, protocol: str
) -> None:
    store, sealed = await filled_store(tmp_path / "b.db", batches=50)
    metrics = Metrics()
    config = MqttConfig(url=broker.url, topic_prefix="t", protocol=protocol)  # type: ignore[arg-type]
    forwarder = Forwarder(config, "gw", store, sealed, metrics)
    task = asyncio.create_task(forwarder.run())
    await all_acknowledged(forwarder, store)
    assert sample(metrics, "edge_agent_readings_sent") == 500
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await store.close()


async def test_a_small_window_sends_every_batch_with_declarations_first(
    tmp_path: Path, broker: Mosquitto
) -> None:
    """Declarations are taken ahead of readings; the window must still send every batch once."""
    store = Store(tmp_path / "b.db", max_bytes=1024 * 1024, max_age_s=86400)
    await store.open()
    batcher = Batcher(store, Sealer(Ed25519PrivateKey.generate(), compress=False), Metrics(),
                      gateway="gw", max_readings=1000, max_delay=1, capacity=10_000)  # fmt: skip
    for start in range(0, 40_000, 1000):
        await batcher.emit(
            [Reading("s", "p", i, i, Quality.GOOD) for i in range(start, start + 1000)]
        )
        await batcher.seal_pending()
    declarations = len([b for b in await store.take(1000) if b.key.kind == "declaration"])
    assert declarations > 1
    batches = store.stats.batches
    metrics = Metrics()
    config = MqttConfig(url=broker.url, topic_prefix="t", max_inflight=2)
    forwarder = Forwarder(config, "gw", store, batcher.sealed, metrics)
    task = asyncio.create_task(forwarder.run())
    await all_acknowledged(forwarder, store)
    assert sample(metrics, "edge_agent_batches_sent") == batches
    assert sample(metrics, "edge_agent_mqtt_connects") == 1, "no batch waited for a reconnect"
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await store.close()


# --- Limits the broker advertises or enforces (issue 8, field case 7) -------------------------


def random_text(length: int) -> str:
    """Text zstd cannot shrink, so that a batch's size is what the test says."""
    return "".join(random.choices(string.ascii_letters, k=length))  # noqa: S311 - test data


def readings(first: int, count: int, value: Callable[[int], Any] = lambda i: i) -> list[Reading]:
    return [Reading("s", "p", i, value(i), Quality.GOOD) for i in range(first, first + count)]


@dataclass
class Pipeline:
    """The agent's real parts on a real broker, and the reference verifier subscribed to it."""

    store: Store
    batcher: Batcher
    forwarder: Forwarder
    metrics: Metrics
    verifier: Verifier
    arrived: asyncio.Event

    def stream(self) -> Stream:
        [stream] = self.verifier.tracker.streams.values()
        return stream

    async def emit(self, batch: list[Reading]) -> None:
        """Hand readings over as a source does; the running batcher seals them."""
        await self.batcher.emit(batch)
        self.batcher.sealed.clear()
        async with deadline(10, "the readings sealed"):
            await self.batcher.sealed.wait()

    async def until_complete(self, timeout: float = 30) -> Stream:
        """Wait until the verifier accounts for every sealed seq and the buffer is empty."""
        sealed = self.store.next_seq - 1

        def done() -> bool:
            streams = self.verifier.tracker.streams
            return (
                self.store.stats.batches == 0
                and len(streams) == 1
                and self.stream().max_seq == sealed
                and not self.stream().holes()
            )

        async with deadline(timeout, "every sealed seq verified or declared, the buffer empty"):
            while True:  # a batch verified, or one deleted after its PUBACK, may complete it
                self.arrived.clear()
                self.forwarder.acked.clear()
                if done():
                    return self.stream()
                waits = {
                    asyncio.ensure_future(e.wait()) for e in (self.arrived, self.forwarder.acked)
                }
                try:
                    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for wait in waits:
                        wait.cancel()


@asynccontextmanager
async def pipeline(
    tmp_path: Path, broker: Mosquitto, config: MqttConfig, backlog: list[list[Reading]]
) -> AsyncIterator[Pipeline]:
    """Seal `backlog` (one batch per list) before the forwarder starts, as after an outage;
    then run the batcher and the forwarder wired as agent.py wires them."""
    key = Ed25519PrivateKey.generate()
    store = Store(tmp_path / "b.db", max_bytes=64 * 1024 * 1024, max_age_s=86400)
    await store.open()
    metrics = Metrics()
    batcher = Batcher(store, Sealer(key), metrics, gateway="gw", max_readings=10,
                      max_delay=0.05, capacity=10_000)  # fmt: skip
    for batch in backlog:
        await batcher.emit(batch)
        await batcher.seal_pending()
    forwarder = Forwarder(config, "gw", store, batcher.sealed, metrics,
                          on_evicted=batcher.declare_pending,
                          on_payload_limit=batcher.set_max_bytes)  # fmt: skip
    verifier = Verifier(Opener([key.public_key()]))
    arrived, stop, subscribed = asyncio.Event(), asyncio.Event(), asyncio.Event()
    consumer = asyncio.create_task(
        consume(
            verifier,
            lambda: consumer_client(broker.url, "verifier"),
            "t/gw/batch",
            lambda batch, fresh: arrived.set(),
            stop,
            subscribed=subscribed,
        )  # fmt: skip
    )
    async with deadline(10, "the verifier subscribed"):
        await subscribed.wait()
    batching = asyncio.create_task(batcher.run())
    forwarding = asyncio.create_task(forwarder.run())
    try:
        yield Pipeline(store, batcher, forwarder, metrics, verifier, arrived)
    finally:
        forwarding.cancel()
        batcher.stop()
        await asyncio.gather(forwarding, batching, return_exceptions=True)
        stop.set()
        await consumer
        await store.close()


def backlog_with_one_large_batch() -> list[list[Reading]]:
    """Field case 7: six batches of about 330 bytes sealed, the third about 740 bytes."""
    batches = [readings(first, 10) for first in range(0, 60, 10)]
    batches[2][0] = batches[2][0]._replace(value=random_text(480))
    return batches


def broker_with(tmp_path: Path, config: str) -> Mosquitto:
    directory = tmp_path / "broker"
    directory.mkdir()
    return Mosquitto(directory=directory, extra_config=config)


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
async def test_a_batch_over_the_brokers_packet_limit_is_evicted_declared_and_the_stream_goes_on(
    tmp_path: Path, protocol: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Mosquitto `max_packet_size 550` and one sealed batch of ~740 bytes among ~330-byte ones.

    MQTT 5: the broker advertises its limit in CONNACK; the batch is evicted before it is sent.
    MQTT 3.1.1: nothing is advertised, the broker just closes the connection; the batches that
    were in flight are re-sent one at a time, and the one it closes on DROPS_TO_EVICT times is
    evicted. Either way its range is
    declared with its reason, what follows is delivered, and the verifier proves completeness.
    """
    caplog.set_level(logging.INFO, logger="edge_agent")
    config = MqttConfig(url="mqtt://127.0.0.1", topic_prefix="t", protocol=protocol,  # type: ignore[arg-type]
                        reconnect_min=0.1)  # fmt: skip
    with broker_with(tmp_path, "max_packet_size 550\n") as broker:
        config = config.model_copy(update={"url": broker.url})
        async with pipeline(tmp_path, broker, config, backlog_with_one_large_batch()) as run:
            await run.emit(readings(60, 30))  # sealed while the forwarder runs
            stream = await run.until_complete()
            oversize = broker.log_path.read_text().count("oversize packet")
    reason = "too_large" if protocol == "5" else "undeliverable"
    assert stream.evicted.ranges() == [[21, 30]]
    assert stream.evicted_by_reason == {reason: 10}
    assert stream.readings == 80, "everything but the evicted batch arrived"
    assert sample(run.metrics, "edge_agent_batches_undeliverable") == 1
    connects = sample(run.metrics, "edge_agent_mqtt_connects")
    if protocol == "5":
        assert (connects, oversize) == (1, 0), "evicted before it was ever sent"
        assert "over the limit of 550 (advertised by the broker)" in caplog.text
    else:
        # One loss with the window in flight, then DROPS_TO_EVICT with the batch alone.
        assert oversize == DROPS_TO_EVICT + 1
        assert connects == DROPS_TO_EVICT + 2
        assert "without a DISCONNECT reason" in caplog.text
    assert f"reason={reason}" in caplog.text
    assert "Declared evicted readings ranges=[[21, 30, '%s']]" % reason in caplog.text  # noqa: UP031


async def test_batches_are_sealed_within_the_configured_packet_limit(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """MQTT 3.1.1 cannot advertise a limit: `mqtt.max_packet_size` tells the batcher, which seals
    smaller batches, so none is too large, none is evicted and the connection never drops."""
    with broker_with(tmp_path, "max_packet_size 550\n") as broker:
        config = MqttConfig(url=broker.url, topic_prefix="t", protocol="3.1.1",
                            max_packet_size=550)  # type: ignore[arg-type]  # fmt: skip
        async with pipeline(tmp_path, broker, config, []) as run:
            await run.emit(readings(0, 100, lambda i: random_text(40 + i % 20)))
            stream = await run.until_complete()
            sizes = [len(b.data) for b in await run.store.take(1)]  # emptied: nothing left
    assert sizes == []
    assert stream.readings == 100
    assert stream.evicted_count == 0
    assert sample(run.metrics, "edge_agent_mqtt_connects") == 1
    assert sample(run.metrics, "edge_agent_batches_sent") > 10, (
        "batches held fewer than max_readings"
    )
    assert "oversize" not in broker.log_path.read_text()
    assert run.batcher.max_bytes == 550 - publish_packet_size("t/gw/batch", 0, v5=False) - 3


async def test_batches_sealed_while_the_broker_is_away_fit_its_last_advertised_limit(
    tmp_path: Path,
) -> None:
    """The limit a broker advertised is kept in the store: after a restart with the link down,
    batches are sealed to fit it before any CONNACK, and none is evicted once it is back."""
    with broker_with(tmp_path, "max_packet_size 550\n") as broker:
        config = MqttConfig(url=broker.url, topic_prefix="t", reconnect_min=0.1,
                            reconnect_max=0.2)  # fmt: skip
        store, sealed = await filled_store(tmp_path / "b.db", batches=1)
        forwarder = Forwarder(config, "gw", store, sealed, Metrics())
        task = asyncio.create_task(forwarder.run())
        await all_acknowledged(forwarder, store)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await store.close()
        broker.stop()

        store = Store(tmp_path / "b.db", max_bytes=64 * 1024 * 1024, max_age_s=86400)
        await store.open()
        metrics = Metrics()
        batcher = Batcher(store, Sealer(Ed25519PrivateKey.generate()), metrics, gateway="gw",
                          max_readings=10, max_delay=1, capacity=1000)  # fmt: skip
        forwarder = Forwarder(config, "gw", store, batcher.sealed, metrics,
                              on_evicted=batcher.declare_pending,
                              on_payload_limit=batcher.set_max_bytes)  # fmt: skip
        task = asyncio.create_task(forwarder.run())
        try:
            await batcher.emit(readings(10, 100, lambda i: random_text(40)))
            await batcher.seal_pending()
            assert sample(metrics, "edge_agent_mqtt_connects") == 0, "the broker is away"
            assert batcher.max_bytes == 550 - publish_packet_size("t/gw/batch", 0, v5=True) - 3
            assert all(len(b.data) <= batcher.max_bytes for b in await store.take(100))
            broker.start()
            await all_acknowledged(forwarder, store)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await store.close()
    assert sample(metrics, "edge_agent_readings_sent") == 100
    assert sample(metrics, "edge_agent_batches_undeliverable") == 0
    assert "oversize" not in broker.log_path.read_text()


async def test_a_message_over_the_brokers_size_limit_is_evicted_on_its_puback(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Another instance of the kind: Mosquitto's `message_size_limit` is not advertised, and a
    larger message gets PUBACK 0x95 under MQTT 5 (a code the standard does not give PUBACK, and
    that paho would take for a malformed packet and drop the connection on). The batch is
    evicted at once, declared `too_large`, and the connection stays up."""
    caplog.set_level(logging.INFO, logger="edge_agent")
    with broker_with(tmp_path, "message_size_limit 500\n") as broker:
        config = MqttConfig(url=broker.url, topic_prefix="t", reconnect_min=0.1)
        async with pipeline(tmp_path, broker, config, backlog_with_one_large_batch()) as run:
            stream = await run.until_complete()
    assert run.forwarder.state.limits.max_packet_size is None, "not advertised"
    assert stream.evicted.ranges() == [[21, 30]]
    assert stream.evicted_by_reason == {"too_large": 10}
    assert stream.readings == 50
    assert sample(run.metrics, "edge_agent_mqtt_connects") == 1
    assert "reason=too_large cause=PUBACK reason=0x95 Packet too large" in caplog.text


async def test_a_denied_topic_is_degraded_health_with_a_growing_backoff_not_a_tight_loop(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Mosquitto answers an ACL-denied publish with PUBACK 0x87 under MQTT 5: the batches stay,
    the forwarder says why (degraded, a named log line) and backs off further each time; once
    the ACL allows the topic, the backlog goes and the health is clear again."""
    caplog.set_level(logging.INFO, logger="edge_agent")
    acl = tmp_path / "acl"
    acl.write_text("topic readwrite t/gw/status\ntopic read t/gw/batch\n")
    with broker_with(tmp_path, f"acl_file {acl}\n") as broker:
        store, sealed = await filled_store(tmp_path / "b.db", batches=3)
        metrics = Metrics()
        config = MqttConfig(url=broker.url, topic_prefix="t", reconnect_min=0.05,
                            reconnect_max_stalled=0.8)  # fmt: skip
        forwarder = Forwarder(config, "gw", store, sealed, metrics)
        task = asyncio.create_task(forwarder.run())
        try:
            await asyncio.sleep(3.0)  # the measured window: how often it retries in 3 s
            connects = sample(metrics, "edge_agent_mqtt_connects")
            assert store.stats.batches == 3
            assert sample(metrics, "edge_agent_readings_sent") == 0
            assert connects - 1 <= sample(metrics, "edge_agent_publish_rejected") <= connects
            # 0.05 s doubling to 0.8 s, with jitter: at most 8 attempts in 3 s; a backoff reset
            # by every CONNACK would make about 80.
            assert 3 <= connects <= 8
            assert "PUBACK reason=0x87 Not authorized" in (forwarder.state.degraded or "")
            forwarder_lines = [r.getMessage() for r in caplog.records
                               if r.name == "edge_agent.forward.mqtt"]  # fmt: skip
            said = [m for m in forwarder_lines if "reason=0x87 Not authorized" in m]
            assert len(said) == 1, f"logged once: {said}"
            audits = [r for r in caplog.records if r.name == "edge_agent.audit"]
            refused = [r for r in audits if "0x87" in r.getMessage()]
            assert len(refused) == 1, "one audit event for the episode, not one per attempt"

            acl.write_text("topic readwrite t/gw/#\n")
            broker.reload()
            await all_acknowledged(forwarder, store)
            assert forwarder.state.degraded is None
            assert "Forwarding again" in caplog.text
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await store.close()


@pytest.mark.parametrize(("broker_inflight", "most"), [(2, 2), (0, 32)])
async def test_the_window_stays_within_the_brokers_receive_maximum(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, broker_inflight: int, most: int
) -> None:
    """Mosquitto advertises `max_inflight_messages` as Receive Maximum; with 0 it sets none and
    `max_inflight` (32) rules. The publishes in flight are counted around the real client."""
    in_flight, peak = 0, 0
    original = AckingClient.publish_acked

    async def counted(self: AckingClient, topic: str, payload: bytes) -> int:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        try:
            return await original(self, topic, payload)
        finally:
            in_flight -= 1

    monkeypatch.setattr(AckingClient, "publish_acked", counted)
    with broker_with(tmp_path, f"max_inflight_messages {broker_inflight}\n") as broker:
        store, sealed = await filled_store(tmp_path / "b.db", batches=200)
        metrics = Metrics()
        forwarder = Forwarder(MqttConfig(url=broker.url, topic_prefix="t"), "gw", store, sealed,
                              metrics)  # fmt: skip
        task = asyncio.create_task(forwarder.run())
        try:
            await all_acknowledged(forwarder, store)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await store.close()
    assert forwarder.state.limits.receive_maximum == (broker_inflight or None)
    assert sample(metrics, "edge_agent_batches_sent") == 200
    assert 1 < peak <= most
    if broker_inflight == 0:
        assert peak > 2, "without the broker's limit the window does fill"


async def test_the_first_batch_after_an_outage_waits_at_most_reconnect_max(
    tmp_path: Path, broker: Mosquitto
) -> None:
    """However long the outage, attempts are `reconnect_max` apart at most: the backoff towards
    a broker that does not answer stops there (`reconnect_max_stalled` is for one that does)."""
    store = Store(tmp_path / "b.db", max_bytes=64 * 1024 * 1024, max_age_s=86400)
    await store.open()
    batcher = Batcher(store, Sealer(Ed25519PrivateKey.generate()), Metrics(), gateway="gw",
                      max_readings=10, max_delay=1, capacity=1000)  # fmt: skip
    config = MqttConfig(url=broker.url, topic_prefix="t", reconnect_min=0.1, reconnect_max=0.5,
                        reconnect_max_stalled=30)  # fmt: skip
    forwarder = Forwarder(config, "gw", store, batcher.sealed, Metrics())
    task = asyncio.create_task(forwarder.run())
    loop = asyncio.get_running_loop()
    try:
        forwarder.acked.clear()
        await batcher.emit(readings(0, 10))
        await batcher.seal_pending()
        async with deadline(10, "the first batch acknowledged"):
            await forwarder.acked.wait()
        broker.stop()
        await batcher.emit(readings(10, 10))  # buffered during the outage
        await batcher.seal_pending()
        await asyncio.sleep(4.0)  # the outage: its length is the fault
        forwarder.acked.clear()
        broker.start()
        back = loop.time()
        async with deadline(10, "the batch buffered during the outage acknowledged"):
            await forwarder.acked.wait()
        assert loop.time() - back < 1.0, "within reconnect_max (0.5 s) and a connection"
        assert store.stats.batches == 0
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await store.close()
