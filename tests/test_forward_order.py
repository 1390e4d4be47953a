"""After an outage, fresh readings go ahead of the backlog (a real Mosquitto, the real forwarder,
batcher, store and verifier): a reading sealed now does not wait for an hour of backlog."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from helpers.wait import deadline

from edge_agent.config.schema import MqttConfig
from edge_agent.consumer.verify import Verifier, consume, consumer_client
from edge_agent.demo.broker import Mosquitto
from edge_agent.forward.mqtt import Forwarder
from edge_agent.metrics import Metrics
from edge_agent.reading import Quality, Reading
from edge_agent.seal.batcher import Batcher
from edge_agent.seal.envelope import Batch, Opener, Sealer
from edge_agent.store.sqlite import Store

pytestmark = pytest.mark.integration

BACKLOG = 400
"""Batches of 10 readings sealed before the forwarder starts."""


async def test_a_batch_sealed_during_the_drain_overtakes_the_backlog(
    tmp_path: Path, broker: Mosquitto
) -> None:
    key = Ed25519PrivateKey.generate()
    store = Store(tmp_path / "b.db", max_bytes=64 * 1024 * 1024, max_age_s=86400)
    await store.open()
    batcher = Batcher(store, Sealer(key), Metrics(), gateway="gw", max_readings=10,
                      max_delay=0.05, capacity=100_000)  # fmt: skip
    await batcher.emit([Reading("s", "p", i, i, Quality.GOOD) for i in range(10 * BACKLOG)])
    await batcher.seal_pending()
    backlog_last_seq = store.next_seq - 1

    arrivals: list[int] = []
    """First seq of each batch of readings, in the order the consumer received them."""
    first_arrived, all_arrived = asyncio.Event(), asyncio.Event()

    def received(batch: Batch, _fresh: object) -> None:
        if batch.readings:
            arrivals.append(batch.readings[0]["seq"])
            first_arrived.set()
        if len(arrivals) >= BACKLOG + 1:
            all_arrived.set()

    verifier = Verifier(Opener([key.public_key()]))
    stop, subscribed = asyncio.Event(), asyncio.Event()
    consumer = asyncio.create_task(
        consume(
            verifier,
            lambda: consumer_client(broker.url, "verifier"),
            "t/gw/batch",
            received,
            stop,
            subscribed=subscribed,
        )  # fmt: skip
    )
    # reconnect_max 1 ms: only batches sealed after the connection (or 2 ms before) are fresh.
    config = MqttConfig(url=broker.url, topic_prefix="t", max_inflight=4, reconnect_max=0.001,
                        reconnect_min=0.001)  # fmt: skip
    forwarder = Forwarder(config, "gw", store, batcher.sealed, Metrics())
    try:
        async with deadline(10, "the verifier subscribed"):
            await subscribed.wait()
        batching = asyncio.create_task(batcher.run())
        forwarding = asyncio.create_task(forwarder.run())
        async with deadline(10, "the first backlog batch"):
            await first_arrived.wait()
        await batcher.emit([Reading("s", "p", 10**12, -1, Quality.GOOD)])
        async with deadline(30, "every batch"):
            await all_arrived.wait()
    finally:
        stop.set()
        forwarding.cancel()
        batcher.stop()
        await asyncio.gather(forwarding, batching, return_exceptions=True)
        await consumer
        await store.close()

    fresh_at = arrivals.index(backlog_last_seq + 1)
    behind_it = sum(seq <= backlog_last_seq for seq in arrivals[fresh_at:])
    assert behind_it > BACKLOG // 2, (
        f"the fresh batch arrived {fresh_at}th, with only {behind_it} backlog batches after it"
    )
    backlog_order = [seq for seq in arrivals if seq <= backlog_last_seq]
    assert backlog_order == sorted(backlog_order), "the backlog itself goes oldest first"
    [stream] = verifier.tracker.streams.values()
    assert stream.holes() == [] and stream.readings == 10 * BACKLOG + 1
