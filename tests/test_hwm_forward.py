"""The forwarder's high-water mark against a real Mosquitto (docs/contract.md §4.11): retained on
`{prefix}/{gateway}/hwm` at every connect and every `mqtt.heartbeat`, naming exactly what the
store holds sealed, after a restart too, and counted in the publish window so that the broker's
Receive Maximum holds while a backlog drains.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import aiomqtt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from helpers.wait import deadline, wait_for

from edge_agent.config.schema import MqttConfig
from edge_agent.demo.broker import Mosquitto
from edge_agent.forward.client import AckingClient
from edge_agent.forward.mqtt import Forwarder
from edge_agent.metrics import Metrics
from edge_agent.reading import Quality, Reading
from edge_agent.seal.batcher import Batcher
from edge_agent.seal.envelope import Sealer
from edge_agent.seal.hwm import HighWaterMark, open_mark
from edge_agent.seal.trust import TrustSet
from edge_agent.store.sqlite import Store

pytestmark = pytest.mark.integration

KEY = Ed25519PrivateKey.generate()
TRUST = TrustSet.of([KEY.public_key()])


async def sealed_store(path: Path, batches: int) -> tuple[Store, Batcher]:
    """An open store with `batches` sealed batches of 10 readings, and its batcher."""
    store = Store(path, max_bytes=64 * 1024 * 1024, max_age_s=86400)
    await store.open()
    batcher = Batcher(store, Sealer(KEY), Metrics(), gateway="gw", max_readings=10, max_delay=1,
                      capacity=100_000)  # fmt: skip
    if batches:
        await batcher.emit([Reading("s", "p", i, i, Quality.GOOD) for i in range(10 * batches)])
        await batcher.seal_pending()
    return store, batcher


def sample(metrics: Metrics, name: str) -> float:
    return metrics.registry.get_sample_value(f"{name}_total") or 0.0


async def retained_mark(broker: Mosquitto) -> HighWaterMark:
    """The mark a consumer subscribing now is handed (the retained one), verified."""
    async with aiomqtt.Client("127.0.0.1", broker.port) as client:
        await client.subscribe("t/gw/hwm", qos=1)
        async with deadline(10, "the retained mark"):
            message = await anext(aiter(client.messages))
    assert message.retain
    assert isinstance(message.payload, bytes)
    return open_mark(message.payload, TRUST)


async def test_the_mark_is_retained_at_connect_and_heartbeat_and_survives_a_restart(
    tmp_path: Path, broker: Mosquitto
) -> None:
    store, batcher = await sealed_store(tmp_path / "b.db", batches=7)
    metrics = Metrics()
    config = MqttConfig(url=broker.url, topic_prefix="t", heartbeat=1)
    forwarder = Forwarder(config, "gw", store, batcher.sealed, metrics,
                          mark=batcher.high_water_mark)  # fmt: skip
    task = asyncio.create_task(forwarder.run())
    try:
        await wait_for(lambda: sample(metrics, "edge_agent_hwm_published") >= 3, 10,
                       "a mark at connect and two heartbeats")  # fmt: skip
        mark = await retained_mark(broker)
        assert (mark.gateway, mark.epoch, mark.seq, mark.batch) == ("gw", store.epoch, 70, 7)
        assert mark.kid == Sealer(KEY).kid
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await store.close()
    epoch = store.epoch

    # A restart: the mark says the same from the store's counters, before any new seal.
    broker.stop()
    broker.start()  # the retained mark survives in the broker's persistence; replace it anyway
    store, batcher = await sealed_store(tmp_path / "b.db", batches=0)
    metrics = Metrics()
    forwarder = Forwarder(config, "gw", store, batcher.sealed, metrics,
                          mark=batcher.high_water_mark)  # fmt: skip
    task = asyncio.create_task(forwarder.run())
    try:
        await wait_for(lambda: sample(metrics, "edge_agent_hwm_published") >= 1, 10, "a mark")
        mark = await retained_mark(broker)
        assert (mark.epoch, mark.seq, mark.batch) == (epoch, 70, 7)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await store.close()


async def test_marks_hold_a_place_in_the_window_within_the_receive_maximum(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Mosquitto `max_inflight_messages 2` (its Receive Maximum): batches and marks together
    never have more than 2 publishes unacknowledged, counted around the real client."""
    in_flight, peak, marks = 0, 0, 0
    original = AckingClient.publish_acked

    async def counted(
        self: AckingClient, topic: str, payload: bytes, *, retain: bool = False
    ) -> int:
        nonlocal in_flight, peak, marks
        in_flight += 1
        marks += topic.endswith("/hwm")
        peak = max(peak, in_flight)
        try:
            return await original(self, topic, payload, retain=retain)
        finally:
            in_flight -= 1

    monkeypatch.setattr(AckingClient, "publish_acked", counted)
    (tmp_path / "broker").mkdir()
    with Mosquitto(directory=tmp_path / "broker", extra_config="max_inflight_messages 2\n") as mq:
        store, batcher = await sealed_store(tmp_path / "b.db", batches=300)
        metrics = Metrics()
        config = MqttConfig(url=mq.url, topic_prefix="t", heartbeat=1)
        forwarder = Forwarder(config, "gw", store, batcher.sealed, metrics,
                              mark=batcher.high_water_mark)  # fmt: skip
        task = asyncio.create_task(forwarder.run())
        try:
            await wait_for(lambda: store.stats.batches == 0, 30, "the backlog sent")
            await wait_for(lambda: marks >= 2, 10, "a mark at connect and at a heartbeat")
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await store.close()
    assert sample(metrics, "edge_agent_batches_sent") == 300
    # Whether both places are ever taken at once is the local broker's timing (test_forward.py
    # shows the window fills); what must hold is the limit, marks included.
    assert 1 <= peak <= 2, "marks and batches together never beyond the broker's limit"


async def test_a_broker_that_refuses_the_mark_never_holds_the_batches_back(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An ACL that denies `.../hwm` (MQTT 5: PUBACK 0x87 for the mark): every batch still goes,
    the forwarder is not degraded, and the refusal is logged once, not per heartbeat."""
    caplog.set_level(logging.INFO, logger="edge_agent")
    acl = tmp_path / "acl"
    acl.write_text("topic readwrite t/gw/status\ntopic readwrite t/gw/batch\n")
    (tmp_path / "broker").mkdir()
    with Mosquitto(directory=tmp_path / "broker", extra_config=f"acl_file {acl}\n") as mq:
        store, batcher = await sealed_store(tmp_path / "b.db", batches=50)
        metrics = Metrics()
        config = MqttConfig(url=mq.url, topic_prefix="t", heartbeat=1)
        forwarder = Forwarder(config, "gw", store, batcher.sealed, metrics,
                              mark=batcher.high_water_mark)  # fmt: skip
        task = asyncio.create_task(forwarder.run())
        try:
            await wait_for(lambda: store.stats.batches == 0, 30, "the backlog sent")
            refused = "Broker refused the high-water mark"
            await wait_for(lambda: refused in caplog.text, 10, "the refusal logged")
            connects = sample(metrics, "edge_agent_mqtt_connects")
            await asyncio.sleep(2.5)  # two more heartbeats, measured: no new line, no reconnect
            assert caplog.text.count(refused) == 1
            assert "reason=0x87" in caplog.text
            assert sample(metrics, "edge_agent_mqtt_connects") == connects == 1
            assert forwarder.state.degraded is None and forwarder.state.connected
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await store.close()
    assert sample(metrics, "edge_agent_batches_sent") == 50
    assert sample(metrics, "edge_agent_hwm_published") == 0
