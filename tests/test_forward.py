"""The forwarder against a real Mosquitto: delete only after a successful PUBACK."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from helpers.store import filled_store
from helpers.wait import deadline, wait_for

from edge_agent.config.schema import MqttConfig
from edge_agent.demo.broker import Mosquitto
from edge_agent.forward.mqtt import Forwarder
from edge_agent.metrics import Metrics
from edge_agent.reading import Quality, Reading
from edge_agent.seal.batcher import Batcher
from edge_agent.seal.envelope import Sealer
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
        await wait_for(  # no event announces a rejection: rejected, backed off, retried
            lambda: sample(metrics, "edge_agent_publish_rejected") >= 2, 10, "two rejections"
        )
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert store.stats.batches == 3
        assert sample(metrics, "edge_agent_readings_sent") == 0
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
    await all_acknowledged(forwarder, store)
    assert sample(metrics, "edge_agent_batches_sent") == batches
    assert sample(metrics, "edge_agent_mqtt_connects") == 1, "no batch waited for a reconnect"
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await store.close()
