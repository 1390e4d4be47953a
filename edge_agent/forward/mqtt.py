"""Ships sealed batches from the store to the broker, oldest first, a window at a time.

A batch is deleted from the store only after a PUBACK whose reason code is a success. A sliding
window keeps `max_inflight` publishes outstanding: sending N and waiting for all N stalls on
delayed TCP acknowledgements. On any connection problem the window is abandoned and the backlog is
re-sent from the oldest unacknowledged batch after a backoff with jitter (duplicates are possible
and are dropped by the consumer by `seq`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

import aiomqtt
from aiomqtt.exceptions import MqttConnectError

from edge_agent.audit import audit
from edge_agent.config.schema import MqttConfig
from edge_agent.errors import EdgeAgentError, StoreError
from edge_agent.forward.client import AckingClient, protocol_version, tls_context
from edge_agent.metrics import Metrics
from edge_agent.schedule import Backoff
from edge_agent.store.sqlite import Store, StoredBatch

log = logging.getLogger(__name__)

REJECTION = 0x80
AUTH_REFUSALS = frozenset({4, 5, 0x86, 0x87, 0x8C})
"""CONNACK codes refusing our identity: 3.1.1 bad user name or password (4), not authorised
(5); MQTT 5 bad user name or password (0x86), not authorized (0x87), bad authentication
method (0x8C)."""
ACK_RETRY_S = 1.0


class PublishRejectedError(EdgeAgentError):
    """The broker refused a batch (PUBACK reason >= 0x80); it stays in the store."""


@dataclass
class ForwarderState:
    connected: bool = False
    last_error: str | None = None
    since: float = 0.0


class Forwarder:
    def __init__(
        self,
        config: MqttConfig,
        gateway_id: str,
        store: Store,
        new_batches: asyncio.Event,
        metrics: Metrics,
    ) -> None:
        self._config = config
        self._store = store
        self._new_batches = new_batches
        self._metrics = metrics
        self.batch_topic = f"{config.topic_prefix}/{gateway_id}/batch"
        self.status_topic = f"{config.topic_prefix}/{gateway_id}/status"
        self._client_id = config.client_id or f"edge-agent-{gateway_id}"
        self.state = ForwarderState()
        self._to_ack: list[StoredBatch] = []
        self._ack_ready = asyncio.Event()
        self.acked = asyncio.Event()
        """Set whenever acknowledged batches have been deleted from the store."""

    def _client(self) -> AckingClient:
        will = aiomqtt.Will(self.status_topic, json.dumps({"state": "offline"}), qos=1, retain=True)
        return AckingClient(
            self._config.host,
            self._config.port,
            username=self._config.username,
            password=self._config.password_value(),
            identifier=self._client_id,
            protocol=protocol_version(self._config),
            will=will,
            keepalive=int(self._config.keepalive),
            tls_context=tls_context(self._config),
            max_inflight_messages=self._config.max_inflight,
            timeout=max(self._config.keepalive, 10),
            logger=logging.getLogger("edge_agent.forward.paho"),
        )

    async def run(self) -> None:
        """Connect, forward, and reconnect with backoff, until cancelled."""
        backoff = Backoff(self._config.reconnect_min, self._config.reconnect_max)
        while True:
            try:
                async with self._client() as client:
                    self._mark(connected=True, error=None)
                    backoff.reset()
                    await client.publish(
                        self.status_topic, json.dumps({"state": "online"}), qos=1, retain=True
                    )
                    try:
                        await _until_one_fails(self._pump(client), self._acker())
                    except asyncio.CancelledError:
                        await self._goodbye(client)
                        raise
            except (aiomqtt.MqttError, PublishRejectedError, StoreError, OSError) as exc:
                error = str(exc) or type(exc).__name__
                if error != self.state.last_error:  # once per episode, like its log line
                    self._audit(exc, error)
                self._mark(connected=False, error=error)
            await self._flush_acks()
            wait = backoff.next()
            log.debug("Reconnecting in %.1fs", wait)
            await asyncio.sleep(wait)

    async def _goodbye(self, client: AckingClient) -> None:
        """On a clean stop: delete what was acknowledged and say "offline" (the will would not)."""
        await self._flush_acks()
        with contextlib.suppress(aiomqtt.MqttError, TimeoutError):
            await client.publish(
                self.status_topic,
                json.dumps({"state": "offline"}),
                qos=1,
                retain=True,
                timeout=2.0,
            )
        self._mark(connected=False, error=None)

    def _audit(self, exc: BaseException, error: str) -> None:
        """An audit event for a refusal on security grounds: credentials, certificate, ACL."""
        broker = f"{self._config.host}:{self._config.port}"
        if isinstance(exc, PublishRejectedError):
            audit("publish", "refused", broker=broker, topic=self.batch_topic, error=error)
        elif isinstance(exc, MqttConnectError) and _code(exc.rc) in AUTH_REFUSALS:
            audit("authentication", "failure", broker=broker, user=self._config.username,
                  error=error)  # fmt: skip
        elif "CERTIFICATE_VERIFY_FAILED" in error or "Hostname mismatch" in error:
            audit("certificate", "refused", broker=broker, error=error)

    def _mark(self, *, connected: bool, error: str | None) -> None:
        changed = connected != self.state.connected or error != self.state.last_error
        self.state.connected, self.state.last_error = connected, error
        self._metrics.mqtt_connected.set(1 if connected else 0)
        if not changed:
            return
        self.state.since = time.time()
        if connected:
            self._metrics.mqtt_connects.inc()
            log.info("Connected to broker url=%s topic=%s", self._config.url, self.batch_topic)
        elif error is None:
            log.info("Disconnected from broker url=%s", self._config.url)
        else:
            log.warning("Broker connection lost url=%s error=%s", self._config.url, error)

    async def _pump(self, client: AckingClient) -> None:
        """Keep `max_inflight` batches published and unacknowledged, oldest first."""
        window = _Window(self._config.max_inflight)
        try:
            while True:
                if window.room():
                    self._new_batches.clear()
                    taken = await self._store.take(
                        window.room(), after=window.cursor, skip_declarations=window.declarations
                    )
                    for batch in taken:
                        window.start(batch, client.publish_acked(self.batch_topic, batch.data))
                wake = self._new_batches if window.room() else None
                results = await window.completed(wake, client.lost)
                # Successes first: a rejection in the same round must not hold them back.
                for batch, code in sorted(results, key=lambda result: result[1] >= REJECTION):
                    self._settle(batch, code)
        finally:
            window.cancel()

    def _settle(self, batch: StoredBatch, code: int) -> None:
        """A PUBACK arrived: queue the batch for deletion, or refuse to (reason >= 0x80)."""
        if code >= REJECTION:
            self._metrics.publish_rejected.inc()
            raise PublishRejectedError(
                f"broker rejected batch (reason code 0x{code:02x}) topic={self.batch_topic}"
                "; it stays buffered"
            )
        self._to_ack.append(batch)
        self._ack_ready.set()
        self._metrics.ack_latency.observe(max(0.0, time.time() - batch.sealed_ns / 1e9))

    async def _acker(self) -> None:
        """Deletes acknowledged batches in groups: one transaction per burst of PUBACKs."""
        while True:
            await self._ack_ready.wait()
            if not await self._flush_acks():
                await asyncio.sleep(ACK_RETRY_S)

    async def _flush_acks(self) -> bool:
        """Delete what the broker acknowledged; on a store error keep them and say False."""
        self._ack_ready.clear()
        acked, self._to_ack = self._to_ack, []
        if not acked:
            return True
        try:
            await self._store.ack([batch.key for batch in acked])
        except StoreError as exc:
            # Not deleting only means re-sending later (a duplicate); never a loss.
            self._to_ack = acked + self._to_ack
            self._ack_ready.set()
            self._metrics.store_errors.inc()
            log.error("Could not delete acknowledged batches, will retry error=%s", exc)
            return False
        self._metrics.batches_sent.inc(len(acked))
        self._metrics.readings_sent.inc(sum(batch.readings for batch in acked))
        self.acked.set()
        return True


def _code(rc: object) -> int | None:
    """The number of a paho reason code or of a plain return code."""
    value = getattr(rc, "value", rc)
    return value if isinstance(value, int) else None


async def _until_one_fails(*coroutines: Coroutine[Any, Any, None]) -> None:
    """Run forever-loops side by side; the first to raise cancels the others and is re-raised."""
    tasks = [asyncio.ensure_future(c) for c in coroutines]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            task.result()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class _Window:
    """The publishes of one connection that await their PUBACK."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.in_flight: dict[asyncio.Future[int], StoredBatch] = {}
        self.cursor = 0
        """Highest id of a batch of readings published on this connection."""
        self.declarations: set[int] = set()
        """Ids of declarations published on this connection (they are taken first on every call)."""

    def room(self) -> int:
        return self.size - len(self.in_flight)

    def start(self, batch: StoredBatch, publish: Coroutine[Any, Any, int]) -> None:
        """Publish `batch` (never one already published on this connection)."""
        if batch.key.kind == "declaration":
            self.declarations.add(batch.key.id)
        else:
            self.cursor = max(self.cursor, batch.key.id)
        task = asyncio.ensure_future(publish)
        self.in_flight[task] = batch

    async def completed(
        self, wake: asyncio.Event | None, lost: asyncio.Event
    ) -> list[tuple[StoredBatch, int]]:
        """Wait for at least one PUBACK (or for `wake`); return (batch, reason code) pairs.

        Raises MqttError when `lost` is set: an idle window must notice a dropped connection.
        """
        waiters: set[asyncio.Future[Any]] = set(self.in_flight)
        events = [asyncio.ensure_future(e.wait()) for e in (wake, lost) if e is not None]
        waiters.update(events)
        try:
            done, _ = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for event in events:
                event.cancel()
        if lost.is_set():
            raise aiomqtt.MqttError("Connection lost")
        results = []
        for future in done:
            batch = self.in_flight.pop(future, None)
            if batch is not None:
                results.append((batch, future.result()))
        return results

    def cancel(self) -> None:
        for future in self.in_flight:
            future.cancel()
        self.in_flight.clear()
