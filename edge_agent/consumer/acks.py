"""`verify --ack-key`: the consumer's side of the end-to-end acknowledgement (contract §4.10).

After batches are accepted, the state file is written atomically and made durable (the file and
its directory fsynced); only then is an acknowledgement signed with the consumer's key and
published, retained at QoS 1, on `{prefix}/{gateway}/ack` for each (gateway, epoch) that
changed: `seqs` the seqs held (received or declared evicted), `batches` the batch numbers held.
At most one round per ACK_INTERVAL_S, one more when the consumer stops, and one for every stream
on each reconnect (a broker that lost its retained messages learns them again).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from pathlib import Path

import aiomqtt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge_agent.consumer.completeness import Completeness
from edge_agent.seal.ack import seal_ack
from edge_agent.seal.envelope import Batch

log = logging.getLogger(__name__)

ACK_INTERVAL_S = 1.0
"""Acknowledgements at most this often per (gateway, epoch)."""


def save_state(path: Path, data: str) -> None:
    """Replace `path` with `data` atomically and durably: a crash leaves the old state or the
    new, and once this returns the new one survives a power cut. Raises OSError."""
    partial = path.with_name(path.name + ".tmp")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    partial.replace(path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


class AckPublisher:
    """Saves `tracker` to `state` and publishes signed acknowledgements of what it holds."""

    def __init__(
        self,
        key: Ed25519PrivateKey,
        tracker: Completeness,
        state: Path,
        *,
        consumer: str = "verify",
        interval_s: float = ACK_INTERVAL_S,
    ) -> None:
        self._key = key
        self._tracker = tracker
        self._state = state
        self._consumer = consumer
        self._interval_s = interval_s
        self._topics: dict[tuple[str, str], str] = {}
        """The ack topic of each (gateway, epoch) seen, from the topic its batches came on."""
        self._dirty: dict[tuple[str, str], None] = {}
        self._ready = asyncio.Event()
        self._last_issued = 0
        self._saving: asyncio.Future[None] | None = None
        """The latest save of the state, in its thread; it runs on when its round is cancelled."""
        self.published = 0
        """Acknowledgements published (and acknowledged by the broker) so far."""

    def accepted(self, batch: Batch, topic: str) -> None:
        """A batch was accepted (new or a duplicate): its stream is to be acknowledged."""
        stream = (batch.gateway, batch.epoch)
        self._topics[stream] = topic.rsplit("/", 1)[0] + "/ack"
        self._dirty.pop(stream, None)
        self._dirty[stream] = None  # the most recent last: its ack is the one left retained
        self._ready.set()

    def reconnected(self) -> None:
        """Acknowledge every known stream again (the broker may have lost retained ones)."""
        for stream in self._topics:
            self._dirty.setdefault(stream, None)
        if self._dirty:
            self._ready.set()

    async def run(self, client: aiomqtt.Client) -> None:
        """Publish rounds while connected, at most one per interval; cancelled on disconnect.

        A failed round (state not saved, a publish not acknowledged) is logged and tried again
        at the next one: what it would have said stays pending.
        """
        while True:
            await self._ready.wait()
            try:
                await self.flush(client)
            except aiomqtt.MqttError as exc:
                log.debug("Acknowledgement not published, will retry error=%s", exc)
                self._ready.set()
            await asyncio.sleep(self._interval_s)

    async def flush(self, client: aiomqtt.Client) -> int:
        """Save the state durably, then publish the pending acknowledgements; return how many.

        When the state cannot be saved, nothing is published (an ack must never claim what is
        not on disk): the error is logged, the acknowledgements stay pending, and 0 is returned.
        Raises aiomqtt.MqttError when a publish fails; they stay pending for the next round, as
        they do when the round is cancelled.

        One save at a time: a round cancelled while saving (`verify` cancels it on a disconnect
        or a stop) cannot stop its thread, so the next round waits for that save to end before
        taking its own snapshot. Otherwise the two would write the same `.tmp` file at once
        (one failing, or their bytes mixed) and the older state could replace the newer one.
        """
        self._ready.clear()
        if self._saving is not None and not self._saving.done():
            await asyncio.wait([self._saving])  # neither cancels it nor raises its error
        if not self._dirty:
            return 0
        pending = list(self._dirty)
        snapshot = json.dumps(self._tracker.to_json())  # on the loop: nothing changes under it
        messages = [(self._topics[s], self._seal(*s)) for s in pending]
        self._dirty.clear()
        loop = asyncio.get_running_loop()
        self._saving = loop.run_in_executor(None, save_state, self._state, snapshot)
        try:
            await asyncio.shield(self._saving)  # a cancelled round leaves the save running
        except OSError as exc:
            for stream in pending:
                self._dirty.setdefault(stream, None)
            log.error("Cannot save the state, so nothing is acknowledged path=%s error=%s",
                      self._state, exc)  # fmt: skip
            return 0
        except BaseException:  # cancelled (a disconnect, a stop): the next round says them
            for stream in pending:
                self._dirty.setdefault(stream, None)
            raise
        try:
            for topic, payload in messages:
                await client.publish(topic, payload, qos=1, retain=True)
                self.published += 1
        except BaseException:
            for stream in pending:
                self._dirty.setdefault(stream, None)
            raise
        return len(messages)

    def _seal(self, gateway: str, epoch: str) -> bytes:
        stream = self._tracker.streams[(gateway, epoch)]
        self._last_issued = max(time.time_ns(), self._last_issued + 1)
        return seal_ack(
            self._key,
            gateway=gateway,
            epoch=epoch,
            seqs=stream.held(),
            batches=stream.batches.ranges(),
            issued_ns=self._last_issued,
            consumer=self._consumer,
        )
