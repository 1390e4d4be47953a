"""`AckPublisher` (edge_agent/consumer/acks.py), the consumer's end-to-end acknowledgements of
`verify --ack-key`, on a private Mosquitto: what it publishes and where (retained, QoS 1, signed
with the consumer's key, `seqs` and `batches` as held), when (only after the state is durable,
only for streams that changed, at most one round per interval, all again after a reconnect),
and what it does on a failure (nothing claimed that is not on disk, nothing forgotten) or a
cancelled round (its save, still running, never beside the next one nor after it).

Batches are sealed by the real Sealer and accepted by the real Verifier, as `verify` does.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from helpers.wait import deadline, wait_for

from edge_agent.consumer import acks as acks_module
from edge_agent.consumer.acks import AckPublisher, save_state
from edge_agent.consumer.completeness import Completeness
from edge_agent.consumer.verify import Verifier, consumer_client
from edge_agent.demo.broker import Mosquitto
from edge_agent.reading import Quality, Reading
from edge_agent.seal.ack import Ack, AckOpener
from edge_agent.seal.envelope import Batch, Opener, Sealer

pytestmark = pytest.mark.integration

GATEWAY_KEY = Ed25519PrivateKey.generate()
CONSUMER_KEY = Ed25519PrivateKey.generate()
BATCH_TOPIC = "site/test/gw/batch"
ACK_TOPIC = "site/test/gw/ack"
"""Where the acknowledgements of gateway `gw` go: beside its batches."""
T0 = 1_780_000_000_000_000_000
_READERS = itertools.count()


class Consumer:
    """A Verifier and an AckPublisher over one tracker and state file, as `verify` has."""

    def __init__(self, state: Path, interval_s: float = 1.0) -> None:
        self.verifier = Verifier(Opener([GATEWAY_KEY.public_key()]))
        self.acks = AckPublisher(CONSUMER_KEY, self.verifier.tracker, state, interval_s=interval_s)
        self.sealers: dict[str, Sealer] = {}

    def receive(
        self, batch: int, first_seq: int, count: int, *, epoch: str = "e1",
        evicted: tuple[tuple[int, int], ...] = (),
    ) -> Batch:  # fmt: skip
        """Seal a batch of `count` readings from `first_seq`, verify it, hand it to the acks."""
        sealer = self.sealers.setdefault(epoch, Sealer(GATEWAY_KEY))
        readings = [Reading("plc", f"p{i}", T0 + i, float(i), Quality.GOOD) for i in range(count)]
        message = sealer.seal(gateway="gw", epoch=epoch, batch=batch, first_seq=first_seq,
                              readings=readings, sealed_ns=T0 + batch, evicted=evicted)  # fmt: skip
        accepted, _ = self.verifier.check(message)
        assert accepted is not None, self.verifier.result.last_error
        self.acks.accepted(accepted, BATCH_TOPIC)
        return accepted


def opened(message: aiomqtt.Message) -> Ack:
    """The acknowledgement `message` carries, its signature checked with the consumer's key."""
    assert isinstance(message.payload, bytes)
    return AckOpener([CONSUMER_KEY.public_key()]).open(message.payload)


@contextlib.asynccontextmanager
async def connected(broker: Mosquitto, name: str) -> AsyncIterator[aiomqtt.Client]:
    """A client as `verify` makes it (MQTT 5, a persistent session)."""
    async with consumer_client(broker.url, f"{name}-{broker.port}") as client:
        yield client


async def retained(broker: Mosquitto) -> Ack:
    """The acknowledgement the broker keeps on ACK_TOPIC, as a client that connects now gets it."""
    async with connected(broker, f"late-reader-{next(_READERS)}") as client:  # a new session
        await client.subscribe(ACK_TOPIC, qos=1)
        async with deadline(10, "the retained acknowledgement"):
            message = await anext(aiter(client.messages))
    assert message.retain, "sent as a retained message"
    return opened(message)


Received = asyncio.Queue[tuple[float, Ack, str | None]]
"""Acknowledgements as they arrive: (monotonic time, the ack, the state file's text then)."""


@contextlib.asynccontextmanager
async def watching(broker: Mosquitto, state: Path | None = None) -> AsyncIterator[Received]:
    """Every acknowledgement published from now on, with when it arrived and what the state
    file (`state`) held at that moment."""
    received: Received = asyncio.Queue()
    async with connected(broker, "watcher") as client:
        await client.subscribe(ACK_TOPIC, qos=1)

        async def collect() -> None:
            async for message in client.messages:
                if not message.retain:  # published now, not kept from before
                    text = state.read_text() if state is not None and state.exists() else None
                    received.put_nowait((time.monotonic(), opened(message), text))

        task = asyncio.create_task(collect())
        try:
            yield received
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def next_ack(received: Received) -> tuple[float, Ack, str | None]:
    async with deadline(10, "an acknowledgement"):
        return await received.get()


def held(state_text: str | None, epoch: str = "e1") -> list[list[int]]:
    """The seqs a state file's text holds for gateway `gw`, `epoch` ([] without a file)."""
    if state_text is None:
        return []
    stream = Completeness.from_json(json.loads(state_text)).streams.get(("gw", epoch))
    return stream.held() if stream is not None else []


async def test_an_ack_is_signed_retained_and_says_what_the_saved_state_holds(
    tmp_path: Path, broker: Mosquitto
) -> None:
    state = tmp_path / "state.json"
    consumer = Consumer(state)
    consumer.receive(1, 1, 0, evicted=((1, 5),))  # a declaration only: seqs 1..5 evicted
    consumer.receive(2, 6, 10)
    async with connected(broker, "acks") as client:
        assert not state.exists()
        assert await consumer.acks.flush(client) == 1
        assert await consumer.acks.flush(client) == 0, "nothing changed: nothing published"
    ack = await retained(broker)
    assert (ack.gateway, ack.epoch) == ("gw", "e1")
    assert ack.seqs == ((1, 15),), "received and declared evicted alike"
    assert ack.batches == ((1, 2),)
    assert ack.consumer == "verify"
    assert consumer.acks.published == 1
    stream = Completeness.from_json(json.loads(state.read_text())).streams[("gw", "e1")]
    assert stream.held() == [[1, 15]] and stream.batches.ranges() == [[1, 2]]
    assert not state.with_name("state.json.tmp").exists()


async def test_the_state_on_disk_covers_an_ack_when_it_arrives(
    tmp_path: Path, broker: Mosquitto
) -> None:
    state = tmp_path / "state.json"
    consumer = Consumer(state)
    async with watching(broker, state) as received, connected(broker, "acks") as client:
        for n in range(1, 4):
            consumer.receive(n, 10 * n - 9, 10)
            await consumer.acks.flush(client)
            _, ack, on_disk = await next_ack(received)
            assert ack.seqs == ((1, 10 * n),)
            assert held(on_disk) == [[1, 10 * n]], "saved before it was published"


async def test_each_changed_stream_is_acked_and_the_latest_stays_retained(
    tmp_path: Path, broker: Mosquitto
) -> None:
    """Two epochs of one gateway share its ack topic: the broker keeps the last one published,
    which is the stream most recently accepted."""
    consumer = Consumer(tmp_path / "state.json")
    consumer.receive(1, 1, 10, epoch="old")
    consumer.receive(1, 1, 20, epoch="new")
    async with watching(broker) as received, connected(broker, "acks") as client:
        assert await consumer.acks.flush(client) == 2
        assert [(await next_ack(received))[1].epoch for _ in range(2)] == ["old", "new"]
        assert (await retained(broker)).epoch == "new"
        consumer.receive(2, 11, 5, epoch="old")
        assert await consumer.acks.flush(client) == 1, "only the stream that changed"
        _, ack, _ = await next_ack(received)
        assert (ack.epoch, ack.seqs, ack.batches) == ("old", ((1, 15),), ((1, 2),))
    assert (await retained(broker)).epoch == "old"


async def test_nothing_is_acked_while_the_state_cannot_be_saved(
    tmp_path: Path, broker: Mosquitto, caplog: pytest.LogCaptureFixture
) -> None:
    """An ack must never claim what is not on disk: it waits, and says it all once saved."""
    state = tmp_path / "missing" / "state.json"
    consumer = Consumer(state)
    consumer.receive(1, 1, 10)
    async with watching(broker, state) as received, connected(broker, "acks") as client:
        with caplog.at_level(logging.ERROR, logger="edge_agent.consumer.acks"):
            assert await consumer.acks.flush(client) == 0
        assert consumer.acks.published == 0
        assert "Cannot save the state, so nothing is acknowledged" in caplog.text
        assert str(state) in caplog.text
        consumer.receive(2, 11, 10)
        state.parent.mkdir()
        assert await consumer.acks.flush(client) == 1
        _, ack, on_disk = await next_ack(received)
    assert ack.seqs == ((1, 20),), "the first ack seen is the one after the save: none before"
    assert held(on_disk) == [[1, 20]]


async def test_a_failed_publish_leaves_the_ack_pending(tmp_path: Path, broker: Mosquitto) -> None:
    consumer = Consumer(tmp_path / "state.json")
    consumer.receive(1, 1, 10)
    async with connected(broker, "acks") as gone:
        pass  # disconnected: a publish on it fails
    with pytest.raises(aiomqtt.MqttError):
        await consumer.acks.flush(gone)
    assert consumer.acks.published == 0
    async with connected(broker, "acks") as client:
        assert await consumer.acks.flush(client) == 1
    assert (await retained(broker)).seqs == ((1, 10),)


async def test_a_round_cancelled_while_saving_leaves_the_ack_pending(
    tmp_path: Path, broker: Mosquitto, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`verify` cancels the publishing task when the broker goes away or it stops, maybe while
    the state is being saved (fsyncs take a while); the next round, the last one at a stop,
    must still acknowledge what the cancelled round had not.

    The save is held at its start until the test has cancelled the round: the moment of a
    slow fsync, made certain. The save itself is the real one.
    """
    state = tmp_path / "state.json"
    consumer = Consumer(state)
    consumer.receive(1, 1, 10)
    saving, release = threading.Event(), threading.Event()

    def held_save(path: Path, data: str) -> None:
        saving.set()
        release.wait(10)
        save_state(path, data)

    monkeypatch.setattr(acks_module, "save_state", held_save)
    async with connected(broker, "acks") as client:
        round_ = asyncio.create_task(consumer.acks.flush(client))
        assert await asyncio.to_thread(saving.wait, 10), "the round never saved"
        round_.cancel()
        with pytest.raises(asyncio.CancelledError):
            await round_
        release.set()
        await wait_for(state.exists, 10, "the cancelled round's save (a thread) to end")
        monkeypatch.undo()
        assert await consumer.acks.flush(client) == 1, "the ack was forgotten"
    assert (await retained(broker)).seqs == ((1, 10),)


class SlowFirstSave:
    """A stand-in for `save_state` that makes a slow first save (an fsync on a busy disk) certain:
    the first call waits until `release()` before doing the real save; every call is the real
    save, and how many run at once is counted."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.first_ended = threading.Event()
        self._release = threading.Event()
        self._lock = threading.Lock()
        self._calls = self._running = self.most_at_once = 0

    def release(self) -> None:
        self._release.set()

    def __call__(self, path: Path, data: str) -> None:
        with self._lock:
            self._calls += 1
            first = self._calls == 1
            self._running += 1
            self.most_at_once = max(self.most_at_once, self._running)
        try:
            if first:
                self.started.set()
                self._release.wait(10)
            save_state(path, data)
        finally:
            with self._lock:
                self._running -= 1
            if first:
                self.first_ended.set()


async def cancel_while_saving_then_flush(
    consumer: Consumer, client: aiomqtt.Client, monkeypatch: pytest.MonkeyPatch
) -> tuple[SlowFirstSave, int]:
    """Batch 1's round, cancelled while its save is held (a disconnect); batch 2 received; the
    next round (the last one at a stop) started; then the held save let go at the worst moment:
    after every save the next round handed to a thread at once has ended. Return the stand-in
    and what the next round returned, once every save has ended."""
    slow = SlowFirstSave()
    monkeypatch.setattr(acks_module, "save_state", slow)
    loop = asyncio.get_running_loop()
    handed: list[asyncio.Future[Any]] = []  # what the loop hands to threads, in order
    run_in_executor = loop.run_in_executor

    def recording(executor: Any, func: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
        handed.append(run_in_executor(executor, func, *args))
        return handed[-1]

    monkeypatch.setattr(loop, "run_in_executor", recording)
    consumer.receive(1, 1, 10)
    cancelled = asyncio.create_task(consumer.acks.flush(client))
    assert await asyncio.to_thread(slow.started.wait, 10), "the round never saved"
    cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    consumer.receive(2, 11, 10)
    before = len(handed)
    next_round = asyncio.create_task(consumer.acks.flush(client))
    await asyncio.sleep(0)  # one step of the loop: the round runs up to its first wait
    async with deadline(10, "the saves the next round started at once"):
        if saved_at_once := handed[before:]:
            await asyncio.wait(saved_at_once)
    slow.release()
    async with deadline(10, "the next round"):
        flushed = await next_round
    assert await asyncio.to_thread(slow.first_ended.wait, 10), "the held save never ended"
    return slow, flushed


async def test_the_next_round_saves_only_once_the_cancelled_rounds_save_has_ended(
    tmp_path: Path, broker: Mosquitto, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cancelled round's save runs on in its thread: a save beside it would write the same
    `.tmp` file at the same time (one of them failing, or their bytes mixed)."""
    consumer = Consumer(tmp_path / "state.json")
    async with connected(broker, "acks") as client:
        slow, flushed = await cancel_while_saving_then_flush(consumer, client, monkeypatch)
    assert slow.most_at_once == 1, "two saves of the state ran at once"
    assert flushed == 1
    assert not (tmp_path / "state.json.tmp").exists()


async def test_the_state_on_disk_never_goes_back_to_an_older_one(
    tmp_path: Path, broker: Mosquitto, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cancelled round's (older) state must not replace the next round's, which its ack
    has already claimed."""
    state = tmp_path / "state.json"
    consumer = Consumer(state)
    async with connected(broker, "acks") as client:
        await cancel_while_saving_then_flush(consumer, client, monkeypatch)
    assert (await retained(broker)).seqs == ((1, 20),)
    assert held(state.read_text()) == [[1, 20]], "an older state replaced the acknowledged one"


async def test_after_a_reconnect_every_stream_is_acked_again(
    tmp_path: Path, broker: Mosquitto
) -> None:
    """A broker that lost its retained messages learns them again."""
    consumer = Consumer(tmp_path / "state.json")
    consumer.receive(1, 1, 10, epoch="old")
    consumer.receive(1, 1, 10, epoch="new")
    async with connected(broker, "acks") as client:
        assert await consumer.acks.flush(client) == 2
        await client.publish(ACK_TOPIC, b"", qos=1, retain=True)  # the retained ack forgotten
        assert await consumer.acks.flush(client) == 0
        consumer.acks.reconnected()
        assert await consumer.acks.flush(client) == 2
    assert (await retained(broker)).epoch == "new"


async def test_run_publishes_at_most_one_round_per_interval(
    tmp_path: Path, broker: Mosquitto
) -> None:
    """Batches accepted while a round waits out its interval go in the next round, together."""
    interval_s = 1.0
    consumer = Consumer(tmp_path / "state.json", interval_s=interval_s)
    async with watching(broker) as received, connected(broker, "acks") as client:
        running = asyncio.create_task(consumer.acks.run(client))
        try:
            consumer.receive(1, 1, 10)
            first_at, first, _ = await next_ack(received)
            assert first.seqs == ((1, 10),)
            consumer.receive(2, 11, 10)
            consumer.receive(3, 21, 10)
            second_at, second, _ = await next_ack(received)
            assert second.seqs == ((1, 30),), "one round for both batches"
            # Counted once the broker acknowledged it, which may be after the watcher has it.
            await wait_for(lambda: consumer.acks.published == 2, 10, "the second PUBACK")
        finally:
            running.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await running
    # The round's pause starts once the broker acknowledged the first publish, a little before
    # the watcher has it: allow that much.
    assert second_at - first_at > 0.8 * interval_s, f"{second_at - first_at:.3f}s apart"
