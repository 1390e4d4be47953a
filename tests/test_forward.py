"""The forwarder against a real Mosquitto: delete only after a successful PUBACK."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge_agent.config.schema import MqttConfig
from edge_agent.demo.broker import Mosquitto
from edge_agent.forward.mqtt import Forwarder
from edge_agent.metrics import Metrics
from edge_agent.reading import Quality, Reading
from edge_agent.seal.batcher import Batcher
from edge_agent.seal.envelope import Sealer
from edge_agent.store.sqlite import Store


async def filled_store(path: Path, batches: int) -> tuple[Store, asyncio.Event]:
    store = Store(path, max_bytes=64 * 1024 * 1024, max_age_s=86400)
    await store.open()
    batcher = Batcher(store, Sealer(Ed25519PrivateKey.generate()), Metrics(), gateway="gw",
                      max_readings=10, max_delay=1, capacity=1000)  # fmt: skip
    await batcher.emit([Reading("s", "p", i, i, Quality.GOOD) for i in range(10 * batches)])
    await batcher.seal_pending()
    return store, batcher.sealed


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
async def test_acknowledged_batches_are_deleted(
    tmp_path: Path, broker: Mosquitto, protocol: str
) -> None:
    store, sealed = await filled_store(tmp_path / "b.db", batches=50)
    metrics = Metrics()
    config = MqttConfig(url=broker.url, topic_prefix="t", protocol=protocol)  # type: ignore[arg-type]
    forwarder = Forwarder(config, "gw", store, sealed, metrics)
    task = asyncio.create_task(forwarder.run())
    while store.stats.batches:
        forwarder.acked.clear()
        await asyncio.wait_for(forwarder.acked.wait(), 10)
    assert metrics.readings_sent._value.get() == 500
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await store.close()


async def test_rejected_publish_keeps_the_batch(tmp_path: Path) -> None:
    """Mosquitto answers an ACL-denied publish with PUBACK 0x87: the batch must stay."""
    acl = tmp_path / "acl"
    acl.write_text("topic readwrite t/gw/status\ntopic read t/gw/batch\n")
    directory = tmp_path / "broker"
    directory.mkdir()
    with Mosquitto(directory=directory, extra_config=f"acl_file {acl}\n") as broker:
        store, sealed = await filled_store(tmp_path / "b.db", batches=3)
        metrics = Metrics()
        config = MqttConfig(url=broker.url, topic_prefix="t", reconnect_min=0.05)
        forwarder = Forwarder(config, "gw", store, sealed, metrics)
        task = asyncio.create_task(forwarder.run())
        while metrics.publish_rejected._value.get() < 2:  # rejected, backed off, retried
            await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert store.stats.batches == 3
        assert metrics.readings_sent._value.get() == 0
        assert "reason code 0x87" in (forwarder.state.last_error or "")
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
    while store.stats.batches:
        forwarder.acked.clear()
        await asyncio.wait_for(forwarder.acked.wait(), 10)
    assert metrics.batches_sent._value.get() == batches
    assert metrics.mqtt_connects._value.get() == 1, "no batch waited for a reconnect"
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await store.close()
