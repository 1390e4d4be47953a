"""Ships sealed batches from the store to the broker, a window at a time: declarations first,
then the batches sealed since the connection was made, then the backlog, oldest first.

A batch is deleted from the store only after a PUBACK whose reason code is a success. A sliding
window keeps up to `max_inflight` publishes outstanding, never more than the broker's Receive
Maximum: sending N and waiting for all N stalls on delayed TCP acknowledgements. On any
connection problem the window is abandoned and the backlog is re-sent from the oldest
unacknowledged batch after a backoff with jitter (duplicates are possible and are dropped by the
consumer by `seq`).

Fresh data is never held behind a backlog: after an outage the batches sealed since the
connection was made, or in the FRESH_BEFORE_CONNECT x `reconnect_max` before it (while the broker
may have been back already, waiting for the next attempt; measured on the store's age clock,
`Store.now_ns`, which a step of the wall clock does not move), take the first free places in the
window, and the backlog fills the rest (oldest first), so readings sealed now reach the broker
within a round trip while an hour of backlog drains beside them. While a loss is being explained
(a window of one) all goes oldest first.

The broker's limits are honoured (MQTT 5 §3.2.2.3, from its CONNACK): no more publishes in
flight than its Receive Maximum; no topic aliases at all, so any Topic Alias Maximum holds; and
no PUBLISH larger than its Maximum Packet Size or `mqtt.max_packet_size`, whichever is smaller.
The batcher is told that limit and seals batches within it (the limit the broker last advertised
is kept in the store, for batches sealed before the next CONNACK); a batch sealed before the
limit was known and too large for it is evicted before it is sent, declared `too_large`.

A broker may enforce a limit it does not advertise (MQTT 3.1.1 cannot advertise one): it closes
the connection when the batch arrives, often with a TCP reset that also discards the PUBACKs of
the batches before it, so the oldest batch in flight is not necessarily the culprit. After a
loss with several batches in flight, those batches are therefore re-sent one at a time (a
window of one) until each is acknowledged; a loss with a single batch in flight names it. Named
DROPS_TO_EVICT times in a row (or once with a DISCONNECT saying 0x95 Packet too large), it is
evicted and declared, reason `undeliverable` (or `too_large`), the stream goes on, and new
batches are sealed smaller than it was. Declarations are never evicted: one the broker will not
take is held back and reported, and the rest flows.

PUBACK reason codes >= 0x80 (MQTT 5 §3.4.2.1), decided per code:
- 0x95 Packet too large (not a PUBACK code in the standard, but Mosquitto 2.0 sends it for a
  message over its `message_size_limit`): permanent for that batch, whose size will not change.
  It is evicted and declared, reason `too_large`, and the stream goes on without reconnecting.
- 0x87 Not authorized, 0x90 Topic Name invalid, 0x99 Payload format invalid: the broker's
  configuration, which an operator can fix. 0x80 Unspecified error, 0x83 Implementation specific
  error, 0x91 Packet Identifier in use, 0x97 Quota exceeded, and any other: may pass. None of
  these is the batch's fault, so it stays buffered (never deleted): the forwarder reports itself
  degraded (`mqtt.degraded` in /status) naming the code, and reconnects after a backoff that
  grows until a batch gets through.

End-to-end acknowledgement (`mqtt.ack: end_to_end`, docs/contract.md §4.10). A PUBACK only says
the broker holds the batch, in memory: a broker killed before its next autosave loses it. In
this mode a PUBACKed batch is marked sent, not deleted, and is deleted only once a consumer's
signed acknowledgement covers it; one not covered within `mqtt.ack_timeout` of its PUBACK is sent
again, oldest first, through the same window. Sending again is paced so that a consumer away for
long does not multiply the traffic by its backlog: at most `max_inflight` batches are sent again
per `ack_timeout`, and the next ones as soon as an acknowledgement shows the consumer keeping up.
The forwarder subscribes to `{prefix}/{gw}/ack` at QoS 1 on every connect; the retained
acknowledgement arrives at once, so an agent that restarts learns what the consumer already holds
without sending it all again. An acknowledgement is accepted only when it verifies against a key
of `mqtt.ack_keys`, names this gateway and the buffer's epoch, and is not older than the newest
accepted from its key (`seal/ack.py`); any other is refused, counted by reason, logged and
audited once per reason, and changes nothing.

The backoff (`schedule.Backoff`, with its second ceiling) doubles (with jitter) from
`reconnect_min` after every connection that moved no data, and resets only on progress: a batch
acknowledged or evicted, or nothing left to send; a CONNACK alone proves nothing. While the
broker cannot be reached it waits at most `reconnect_max`, so the first batch after an outage
leaves within seconds; while the broker accepts connections but takes nothing, up to
`reconnect_max_stalled`, sparing it a tight loop.

The signed high-water mark (seal/hwm.py) goes out retained on `{prefix}/{gateway}/hwm` at every
connect and every `mqtt.heartbeat`, through the same window as the batches: it takes one place
in it for one round trip, so the broker's Receive Maximum holds and no batch waits for it beyond
that. A refusal of the mark (PUBACK >= 0x80, an ACL say) is logged once and never ends the
connection: the batches are what must flow.

Point catalogues (docs/contract.md §4.12). A batch that references a catalogue is published only
once the broker has acknowledged that catalogue on the same connection: before the first such
batch of a connection, the pump publishes the catalogue (from the store) on
`{prefix}/{gateway}/catalogue/{digest}`, QoS 1, retained (not retained when the CONNACK said
Retain Available 0), and awaits its PUBACK. It holds a place in the window meanwhile (the batch
waiting for it is not yet published, so the broker's Receive Maximum holds), and costs one round
trip per catalogue per connection. A catalogue is published again on every connection (a broker
restarted without persistence has lost the retained one), and, in end_to_end mode, with a batch
sent again once its PUBACK on this connection is `ack_timeout` old (a consumer that did not
acknowledge may lack it: it needs no retained copy then). A catalogue's refusal (PUBACK >= 0x80,
0x95 included: the catalogue's size is not the batch's fault) or one over the packet limit is
handled as a refused batch: the batches stay buffered, the forwarder is degraded and backs off.

A broker that stops answering without closing the connection (frozen, or a half-open path) is
watched by `AnswerClock` (forward/stall.py): once a publish has waited `mqtt.ack_stall` with no
PUBACK at all, the forwarder says it is stalled (`state.stalled`, degraded health, one log line);
once it has waited a keep-alive period, the connection is dropped (paho alone would wait two) and
made again by the usual backoff. The batches in flight are then judged as after any other loss
(below), as they were when paho's own keep-alive check dropped the connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiomqtt
from aiomqtt.exceptions import MqttConnectError
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

from edge_agent.audit import audit
from edge_agent.config.schema import MqttConfig
from edge_agent.errors import EdgeAgentError, StoreError
from edge_agent.forward.client import (
    PACKET_TOO_LARGE,
    AckingClient,
    BrokerLimits,
    protocol_version,
    publish_packet_size,
    tls_context,
)
from edge_agent.forward.drain import DrainMeter
from edge_agent.metrics import Metrics
from edge_agent.schedule import Backoff
from edge_agent.seal import hwm
from edge_agent.seal.ack import REASONS, AckError, AckJudge, AckOpener, Reason
from edge_agent.seal.catalogue import catalogue_topic
from edge_agent.seal.envelope import TOO_LARGE, UNDELIVERABLE
from edge_agent.store.sqlite import BatchKey, Store, StoredBatch

log = logging.getLogger(__name__)

REJECTION = 0x80
AUTH_REFUSALS = frozenset({4, 5, 0x86, 0x87, 0x8C})
"""CONNACK codes refusing our identity: 3.1.1 bad user name or password (4), not authorised
(5); MQTT 5 bad user name or password (0x86), not authorized (0x87), bad authentication
method (0x8C)."""
CONFIGURATION_REJECTIONS = frozenset({0x87, 0x90, 0x99})
"""PUBACK codes that name the broker's configuration (ACL, topic rules), not a passing state."""
DROPS_TO_EVICT = 3
"""Connection losses in a row with one batch alone in flight that make it undeliverable."""
MIN_LEARNED_PAYLOAD = 256
"""Floor of the batch size learned from an undeliverable batch: a declaration still fits."""
ACK_RETRY_S = 1.0
RESEND_CHECK_S = 1.0
"""end_to_end: how often, at most, batches due to be sent again are looked for while idle."""
MAX_QUEUED_ACKS = 1000
"""Acknowledgements waiting to be verified; a flood beyond this is dropped by the client."""
FRESH_BEFORE_CONNECT = 2.0
"""Batches sealed within this many `reconnect_max` before a connection are sent as fresh."""
ADVERTISED_LIMIT = "broker_max_packet_size"
"""The store's `meta` key for the Maximum Packet Size the broker last advertised."""


class PublishRejectedError(EdgeAgentError):
    """The broker refused a batch (PUBACK reason >= 0x80), or the point catalogue a batch needs
    (`what`); the batch stays in the store."""

    def __init__(self, code: int, topic: str, what: str = "batch") -> None:
        self.code = code
        self.topic = topic
        kind = "configuration" if code in CONFIGURATION_REJECTIONS else "transient"
        tail = (
            "it stays buffered" if what == "batch" else "the batches referencing it stay buffered"
        )
        super().__init__(
            f"broker rejected {what} with PUBACK reason=0x{code:02x} {reason_name(code)}"
            f" ({kind}) topic={topic}; {tail}"
        )


class CatalogueOverLimitError(PublishRejectedError):
    """A point catalogue over the packet limit: the batches referencing it cannot be decoded
    without it, so they stay buffered (never evicted for it) and the forwarder is degraded."""

    def __init__(self, size: int, limit: int, source: str, topic: str) -> None:
        self.code = PACKET_TOO_LARGE
        self.topic = topic
        EdgeAgentError.__init__(
            self,
            f"point catalogue packet of {size} bytes over the limit of {limit} ({source})"
            f" topic={topic}; the batches referencing it stay buffered: raise the broker's limit"
            " or set batch.catalogue: false",
        )


def reason_name(code: int, packet: int = PacketTypes.PUBACK) -> str:
    """The MQTT 5 name of a reason code, or `unknown` for one the packet type does not define."""
    try:
        return ReasonCode(packet, identifier=code).getName()
    except (KeyError, ValueError):
        return "unknown"


@dataclass
class AckState:
    """Consumer acknowledgements (docs/contract.md §4.10), for /status and /metrics."""

    mode: str = "broker"
    accepted: int = 0
    refused: dict[str, int] = field(default_factory=lambda: dict.fromkeys(REASONS, 0))
    deleted_batches: int = 0
    """Batches deleted because a consumer acknowledged them."""
    last_accepted: float | None = None
    """Unix time of the last acknowledgement accepted."""
    consumer: str | None = None
    """The `consumer` name of the last acknowledgement accepted."""


@dataclass
class ForwarderState:
    connected: bool = False
    last_error: str | None = None
    since: float = 0.0
    degraded: str | None = None
    """Why batches are not moving although the broker answers; None while they move."""
    limits: BrokerLimits = field(default_factory=BrokerLimits)
    """The limits the broker advertised on the last connection."""
    ack: AckState = field(default_factory=AckState)
    stalled: str | None = None
    """Why batches are stuck on a connection that is up: PUBACKs overdue `mqtt.ack_stall` or
    more; None while they come (or while not connected)."""
    drain: DrainMeter = field(default_factory=DrainMeter)
    """Acknowledgements over the recent window: the drain rate and time to drain."""


@dataclass
class _Session:
    """What one connection did, to judge it once it has ended."""

    connected: bool = False
    progressed: bool = False
    rejected: bool = False
    in_flight: list[StoredBatch] = field(default_factory=list)
    """The batches unacknowledged when the connection was lost, in the order they were sent."""

    @property
    def stalled(self) -> bool:
        """Connected, but batches were refused or lost in flight and none got through."""
        return self.connected and not self.progressed and (self.rejected or bool(self.in_flight))


@dataclass
class _Suspect:
    key: BatchKey
    drops: int = 1


class Forwarder:
    def __init__(
        self,
        config: MqttConfig,
        gateway_id: str,
        store: Store,
        new_batches: asyncio.Event,
        metrics: Metrics,
        *,
        on_evicted: Callable[[], None] | None = None,
        on_payload_limit: Callable[[int | None], None] | None = None,
        ack_keys: list[Ed25519PublicKey] | None = None,
        mark: Callable[[], bytes] | None = None,
    ) -> None:
        """`on_evicted` is called after a batch was evicted (the batcher declares it);
        `on_payload_limit` with the largest batch, in bytes, the link takes (None: no limit),
        first from here; `mark` makes the signed high-water mark to publish (None: none is).
        `store` must be open. `ack_keys` are the consumer public keys of `mqtt.ack_keys`
        (end_to_end mode; ValueError when that mode has none)."""
        self._config = config
        self._store = store
        self._new_batches = new_batches
        self._metrics = metrics
        self._on_evicted = on_evicted
        self._on_payload_limit = on_payload_limit
        self.batch_topic = f"{config.topic_prefix}/{gateway_id}/batch"
        self._gateway_id = gateway_id
        self.status_topic = f"{config.topic_prefix}/{gateway_id}/status"
        self._init_consumer_acks(gateway_id, ack_keys)
        self.hwm_topic = hwm.topic(config.topic_prefix, gateway_id)
        self._mark = mark
        self._mark_due = asyncio.Event()
        """Set when a high-water mark is to be published (at connect, at every heartbeat)."""
        self._mark_refused: int | None = None
        """The reason code of the broker's last refusal of a mark, logged once."""
        self._client_id = config.client_id or f"edge-agent-{gateway_id}"
        self.state = ForwarderState(ack=AckState(mode=config.ack))
        self._to_ack: list[StoredBatch] = []
        self._ack_ready = asyncio.Event()
        self.acked = asyncio.Event()
        """Set whenever acknowledged batches have been deleted from the store."""
        self._backoff = Backoff(
            config.reconnect_min, config.reconnect_max, stalled_cap=config.reconnect_max_stalled
        )
        self._suspect: _Suspect | None = None
        """The batch that was alone in flight when the connection was lost."""
        self._probation: list[BatchKey] = []
        """Batches in flight at a loss, re-sent one at a time until each is acknowledged."""
        self._held: set[int] = set()
        """Ids of declarations too large for the broker: kept, not sent."""
        self._learned_payload: int | None = None
        """Below the size of the last batch evicted as undeliverable: what new batches keep to."""
        self._failures = 0
        """Connections lost since the last progress."""
        self._logged_error: str | None = None
        self._payload_limit: int | None = None
        self._stalled = False
        """The last connection was accepted but moved nothing (its successor logs quietly)."""
        self._catalogues_logged: set[bytes] = set()
        """Digests of the catalogues whose publication was logged at info (once each)."""
        # The broker's last advertised limit, kept in the (open) store: batches sealed before
        # the first CONNACK, with the link down at boot, fit it as well.
        self._report_payload_limit(BrokerLimits(max_packet_size=self._recalled_limit()))

    def _init_consumer_acks(self, gateway_id: str, ack_keys: list[Ed25519PublicKey] | None) -> None:
        """The end_to_end acknowledgement's state (§4.10); ValueError when that mode has no
        consumer keys."""
        config = self._config
        self.ack_topic = f"{config.topic_prefix}/{gateway_id}/ack"
        self.end_to_end = config.ack == "end_to_end"
        if self.end_to_end and not ack_keys:
            raise ValueError("mqtt.ack: end_to_end needs the consumer keys of mqtt.ack_keys")
        self._ack_opener = AckOpener(ack_keys or [])
        self._ack_judge = AckJudge(gateway_id)
        self._refusals_logged: set[str] = set()
        self._settling: set[BatchKey] = set()
        """end_to_end: batches PUBACKed whose mark is not yet committed (not to be taken)."""
        self._subscription_refused = False
        self._resend_budget = config.max_inflight
        """Batches that may still be sent again until the next refill (`_refill_resends`)."""
        self._resend_refill_at = 0.0
        for reason in REASONS:  # every reason shows in /metrics, at 0 until it happens
            self._metrics.acks_refused.labels(reason=reason)

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
            max_queued_incoming_messages=MAX_QUEUED_ACKS,
        )

    async def run(self) -> None:
        """Connect, forward, and reconnect with backoff, until cancelled."""
        while True:
            client = self._client()
            session = _Session()
            try:
                async with client:
                    session.connected = True
                    self._connected(client)
                    await self._remember_limit(client.limits)
                    await client.publish(
                        self.status_topic, json.dumps({"state": "online"}), qos=1, retain=True
                    )
                    loops = [self._pump(client, session), self._acker(), self._watch(client)]
                    if self.end_to_end:
                        granted = await client.subscribe(self.ack_topic, qos=1)
                        self._check_subscription(granted)
                        loops.append(self._consumer_acks(client))
                    if self._mark is not None:
                        self._mark_due.set()  # on every connect
                        loops.append(self._heartbeat())
                    try:
                        await _until_one_fails(*loops)
                    except asyncio.CancelledError:
                        await self._goodbye(client)
                        raise
            except PublishRejectedError as exc:
                session.rejected = True
                self.state.degraded = str(exc)
                self._audit_once(exc, str(exc))
                self._lost(str(exc))
            except aiomqtt.MqttError as exc:
                # A refused CONNACK says why in the error itself; paho's disconnect that
                # follows it would only say "protocol error".
                connect_refused = isinstance(exc, MqttConnectError)
                error = str(exc) if connect_refused else client.disconnect_cause or str(exc)
                self._audit_once(exc, error)
                self._lost(error)
            except (StoreError, OSError) as exc:
                self._lost(str(exc) or type(exc).__name__)
            await self._flush_acks()
            with contextlib.suppress(StoreError):  # logged; the batch is judged again later
                await self._judge(session, client)
            self._stalled = session.stalled
            wait = self._backoff.next(stalled=session.stalled)
            log.debug("Reconnecting in %.1fs stalled=%s", wait, session.stalled)
            await asyncio.sleep(wait)

    async def _heartbeat(self) -> None:
        """Ask for a high-water mark every `mqtt.heartbeat` seconds (the pump publishes it)."""
        while True:
            await asyncio.sleep(self._config.heartbeat)
            self._mark_due.set()

    async def _watch(self, client: AckingClient) -> None:
        """Say when PUBACKs are overdue `ack_stall` (`state.stalled`), and drop the connection
        once they are overdue a keep-alive period (raising MqttError: the connection is lost)."""
        ack_stall, keepalive = self._config.ack_stall, self._config.keepalive
        tick = min(0.5, ack_stall / 4, keepalive / 8)
        try:
            while True:
                await asyncio.sleep(tick)
                overdue = client.answers.overdue(time.monotonic())
                if overdue is None or overdue < ack_stall:
                    self._unstalled(client, dropped=False)
                    continue
                waiting = client.answers.waiting
                if self.state.stalled is None:
                    self._metrics.mqtt_stalls.inc()
                    log.warning(
                        "Broker not acknowledging: no PUBACK for %.1fs with batches=%d waiting"
                        " (mqtt.ack_stall %gs); the connection is dropped if this lasts"
                        " keepalive=%gs url=%s",
                        overdue, waiting, ack_stall, keepalive, self._config.url,
                    )  # fmt: skip
                self.state.stalled = f"no PUBACK for {overdue:.1f}s with {waiting} batches waiting"
                self._metrics.mqtt_stalled.set(1)
                if overdue >= keepalive:
                    cause = (
                        f"the broker answered nothing for {overdue:.1f}s (keepalive"
                        f" {keepalive:g}s) with {waiting} batches awaiting their PUBACK;"
                        " connection dropped as silent"
                    )
                    client.abort(cause)
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(2.0):  # paho reads the end at once
                            await client.lost.wait()
                    raise aiomqtt.MqttError(cause)
        finally:
            self._unstalled(client, dropped=True)

    def _unstalled(self, client: AckingClient, *, dropped: bool) -> None:
        """The stall is over: PUBACKs come again (one log line), or the connection is gone."""
        if self.state.stalled is None:
            return
        was, self.state.stalled = self.state.stalled, None
        self._metrics.mqtt_stalled.set(0)
        if not dropped:
            log.info("Broker acknowledging again url=%s after=%r waiting=%d",
                     self._config.url, was, client.answers.waiting)  # fmt: skip

    async def _goodbye(self, client: AckingClient) -> None:
        """On a clean stop: delete what was acknowledged, publish a last high-water mark (after
        the last seal: exact), and say "offline" (the will would not)."""
        await self._flush_acks()
        if self._mark is not None:  # within the agent's GOODBYE_S with the status below
            with contextlib.suppress(aiomqtt.MqttError, TimeoutError):
                await client.publish(self.hwm_topic, self._mark(), qos=1, retain=True, timeout=1.0)
        with contextlib.suppress(aiomqtt.MqttError, TimeoutError):
            await client.publish(
                self.status_topic,
                json.dumps({"state": "offline"}),
                qos=1,
                retain=True,
                timeout=2.0,
            )
        self._set_connected(connected=False, error=None)
        log.info("Disconnected from broker url=%s", self._config.url)

    def _audit_once(self, exc: BaseException, error: str) -> None:
        """An audit event for a refusal on security grounds (credentials, certificate, ACL),
        once per episode like its log line (`_lost`): not again while the same error repeats."""
        if error == self._logged_error:
            return
        broker = f"{self._config.host}:{self._config.port}"
        if isinstance(exc, PublishRejectedError):
            audit("publish", "refused", broker=broker, topic=exc.topic, error=error)
        elif isinstance(exc, MqttConnectError) and _code(exc.rc) in AUTH_REFUSALS:
            audit("authentication", "failure", broker=broker, user=self._config.username,
                  error=error)  # fmt: skip
        elif "CERTIFICATE_VERIFY_FAILED" in error or "Hostname mismatch" in error:
            audit("certificate", "refused", broker=broker, error=error)

    def _set_connected(self, *, connected: bool, error: str | None) -> None:
        if connected != self.state.connected or error != self.state.last_error:
            self.state.since = time.time()
        self.state.connected, self.state.last_error = connected, error
        self._metrics.mqtt_connected.set(1 if connected else 0)

    def _connected(self, client: AckingClient) -> None:
        """A CONNACK: take the broker's limits; one log line, unless retrying the same failure."""
        self._set_connected(connected=True, error=None)
        self._metrics.mqtt_connects.inc()
        self.state.limits = client.limits
        self._report_payload_limit(client.limits)
        level = logging.DEBUG if self._stalled else logging.INFO
        log.log(level, "Connected to broker url=%s topic=%s limits=%s",
                self._config.url, self.batch_topic, client.limits.describe())  # fmt: skip

    def _lost(self, error: str) -> None:
        """The connection ended: log the cause when it differs from the last one logged."""
        self._set_connected(connected=False, error=error)
        self._failures += 1
        if error == self._logged_error:
            log.debug("Broker connection lost again url=%s failed_attempts=%d error=%s",
                      self._config.url, self._failures, error)  # fmt: skip
            return
        self._logged_error = error
        log.warning("Broker connection lost url=%s error=%s", self._config.url, error)

    def _progress(self, session: _Session) -> None:
        """Data moved: the backoff starts over and the failures are history."""
        session.progressed = True
        self._backoff.reset()
        if self._failures and self._logged_error is not None:
            log.info("Forwarding again url=%s after failed_attempts=%d",
                     self._config.url, self._failures)  # fmt: skip
        self._failures, self._logged_error = 0, None
        self.state.degraded = self._held_back()

    def _held_back(self) -> str | None:
        """What stays degraded after progress: declarations too large for the broker."""
        if not self._held:
            return None
        return f"declarations too large for the broker held back: ids={sorted(self._held)}"

    def _packet_limit(self, limits: BrokerLimits) -> tuple[int | None, str]:
        """The smaller of the configured and the advertised Maximum Packet Size, and its source."""
        known = [
            (int(size), source)
            for size, source in (
                (self._config.max_packet_size, "mqtt.max_packet_size"),
                (limits.max_packet_size, "advertised by the broker"),
            )
            if size is not None
        ]
        return min(known) if known else (None, "")

    async def _remember_limit(self, limits: BrokerLimits) -> None:
        if limits.max_packet_size == self._recalled_limit():
            return
        try:
            await self._store.remember(ADVERTISED_LIMIT, limits.max_packet_size)
        except StoreError as exc:  # only a guess for the next start is lost
            log.debug("Could not keep the broker's packet limit error=%s", exc)

    def _recalled_limit(self) -> int | None:
        value = self._store.recall(ADVERTISED_LIMIT)
        return int(value) if value is not None else None

    def _report_payload_limit(self, limits: BrokerLimits) -> None:
        """Tell the batcher the largest batch the link takes (payload bytes)."""
        packet, _ = self._packet_limit(limits)
        v5 = self._config.protocol == "5"
        known = [self._learned_payload] if self._learned_payload is not None else []
        if packet is not None:
            # The remaining length may take up to 4 bytes; publish_packet_size counted 1.
            known.append(packet - publish_packet_size(self.batch_topic, 0, v5=v5) - 3)
        limit = min(known) if known else None
        if limit != self._payload_limit and self._on_payload_limit is not None:
            self._on_payload_limit(limit)
        self._payload_limit = limit

    def _window_size(self, client: AckingClient) -> int:
        """`max_inflight` within the broker's Receive Maximum; 1 while a loss is unexplained."""
        if self._suspect is not None or self._probation:
            return 1
        return min(self._config.max_inflight, client.limits.receive_maximum or 65535)

    async def _pump(self, client: AckingClient, session: _Session) -> None:
        """Keep the window of batches published and unacknowledged, in the order of `_take`."""
        window = _Window(self._window_size(client), boundary=await self._backlog_end())
        look = True  # whether the store may hold batches to send that the window has not
        v5 = self._config.protocol == "5"
        limit, source = self._packet_limit(client.limits)
        try:
            while True:
                window.size = self._window_size(client)
                self._publish_mark(client, window, limit, v5=v5)
                if window.room() and look:
                    self._new_batches.clear()
                    wanted = window.room()
                    taken = await self._take(window)
                    look = len(taken) == wanted  # a full take: there may be more
                    evicted = False
                    for batch in taken:
                        size = publish_packet_size(self.batch_topic, len(batch.data), v5=v5)
                        if limit is not None and size > limit:
                            cause = f"packet of {size} bytes over the limit of {limit} ({source})"
                            await self._evict(batch, TOO_LARGE, cause, session)
                            evicted = True
                            continue
                        if batch.catalogue is not None and not await self._catalogue_ready(
                            client, window, batch, session
                        ):
                            evicted = True
                            continue
                        window.start(batch, client.publish_acked(self.batch_topic, batch.data))
                    if not taken and not window.in_flight:
                        self._progress(session)  # caught up: nothing left to send
                    elif evicted:
                        continue  # its place in the window is free: take the next one first
                wakes = [self._new_batches, self._mark_due] if window.room() else []
                idle = RESEND_CHECK_S if self.end_to_end and window.room() else None
                results, problem = await window.completed(wakes, client.lost, idle_s=idle)
                self._marks_settled(window)
                # Woken only by a mark (a heartbeat, a mark's PUBACK) after the store was found
                # empty: no query, the store has nothing new. end_to_end: batches come due to be
                # sent again with time alone, so the store is looked at after every wake.
                look = look or bool(results) or self._new_batches.is_set() or self.end_to_end
                # Successes first: a rejection in the same round must not hold them back.
                for batch, code in sorted(results, key=lambda result: result[1] >= REJECTION):
                    await self._settle(batch, code, session)
                if problem is not None:
                    session.in_flight = list(window.in_flight.values())
                    raise aiomqtt.MqttError(client.disconnect_cause or problem)
        finally:
            window.cancel()

    async def _catalogue_ready(
        self, client: AckingClient, window: _Window, batch: StoredBatch, session: _Session
    ) -> bool:
        """Make sure the broker acknowledged `batch`'s point catalogue on this connection,
        publishing it first if not (see the module docstring); False when the batch was evicted
        instead (its catalogue is not in the buffer: it could never be decoded).

        Raises PublishRejectedError for a catalogue refused or over the packet limit, and
        MqttError when the connection is lost meanwhile (the batches in flight are judged as
        after any loss).
        """
        digest = batch.catalogue
        assert digest is not None
        acked_at = window.catalogues.get(digest)
        now = time.monotonic()
        if acked_at is not None and not (
            batch.resend and now - acked_at >= self._config.ack_timeout
        ):
            return True
        payload = await self._store.catalogue(digest)
        if payload is None:
            cause = f"its point catalogue {digest.hex()} is not in the buffer"
            log.error("A batch references a catalogue the buffer lacks; evicted batch=%d"
                      " catalogue=%s", batch.key.id, digest.hex())  # fmt: skip
            await self._evict(batch, UNDELIVERABLE, cause, session)
            return False
        topic = catalogue_topic(self._config.topic_prefix, self._gateway_id, digest)
        limit, source = self._packet_limit(client.limits)
        size = publish_packet_size(topic, len(payload), v5=self._config.protocol == "5")
        if limit is not None and size > limit:
            raise CatalogueOverLimitError(size, limit, source, topic)
        retain = client.limits.retains
        try:
            code = await client.publish_acked(topic, payload, retain=retain)
        except aiomqtt.MqttError as exc:
            session.in_flight = list(window.in_flight.values())
            raise aiomqtt.MqttError(client.disconnect_cause or str(exc)) from exc
        if code >= REJECTION:
            self._metrics.publish_rejected.inc()
            raise PublishRejectedError(code, topic, what="point catalogue")
        window.catalogues[digest] = time.monotonic()
        self._metrics.catalogues_published.inc()
        level = logging.INFO if digest not in self._catalogues_logged else logging.DEBUG
        self._catalogues_logged.add(digest)
        log.log(level, "Published point catalogue digest=%s bytes=%d retained=%s topic=%s",
                digest.hex(), len(payload), retain, topic)  # fmt: skip
        return True

    async def _take(self, window: _Window) -> list[StoredBatch]:
        """What fills the window's free places: declarations, then batches sealed since the
        connection was made (past `window.boundary`), then the backlog oldest first; with a
        window of one, simply oldest first.

        broker mode: batches not yet published on this connection (`_take_first`). end_to_end
        mode: batches not in flight and either never PUBACKed or PUBACKed `ack_timeout` ago or
        more without a consumer's acknowledgement since, sent again at most `_resend_budget`
        (`_take_unacked`); a batch PUBACKed and not yet due is never taken.
        """
        if self.end_to_end:
            return await self._take_unacked(window)
        return await self._take_first(window)

    async def _take_first(self, window: _Window) -> list[StoredBatch]:
        """broker mode's `_take`: the window's cursors say what this connection published."""
        room, skip = window.room(), window.declarations | self._held
        if window.size == 1:
            after = max(window.cursor, window.fresh_cursor)
            return await self._store.take(room, after=after, skip_declarations=skip)
        after = max(window.boundary, window.fresh_cursor)
        taken = await self._store.take(room, after=after, skip_declarations=skip)
        if len(taken) < room and window.cursor < window.boundary:
            skip = skip | {batch.key.id for batch in taken if batch.key.kind == "declaration"}
            older = await self._store.take(room - len(taken), after=window.cursor,
                                           skip_declarations=skip)  # fmt: skip
            backlog = [b for b in older if b.key.kind == "readings" and b.key.id <= window.boundary]
            if len(backlog) < room - len(taken):
                window.cursor = window.boundary  # the backlog is all published (or gone)
            taken.extend(backlog)
        return taken

    async def _take_unacked(self, window: _Window) -> list[StoredBatch]:
        """end_to_end mode's `_take`, in the same order: declarations, then the batches past
        `window.boundary`, then the rest oldest first; within each, first sends and re-sends
        by id. In flight, awaiting `mark_sent` (`_settling`) or held: left out. Due means
        PUBACKed at or before now - `ack_timeout` on the store's age clock (as `sent_ns`), so a
        step of the wall clock neither makes every batch due nor none."""
        exclude = {b.key for b in window.in_flight.values()} | self._settling
        exclude.update(BatchKey("declaration", held) for held in self._held)
        if time.monotonic() >= self._resend_refill_at:
            self._refill_resends()
        due_ns = self._store.now_ns() - int(self._config.ack_timeout * 1e9)
        room = window.room()
        after = 0 if window.size == 1 else window.boundary
        taken = await self._store.take_unacked(
            room, due_ns, exclude, max_due=self._resend_budget, after=after
        )
        again = sum(1 for batch in taken if batch.resend)
        if len(taken) < room and after > 0:
            exclude.update(batch.key for batch in taken)
            older = await self._store.take_unacked(
                room - len(taken), due_ns, exclude, max_due=self._resend_budget - again
            )
            again += sum(1 for batch in older if batch.resend)
            taken.extend(older)
        if again:
            self._resend_budget -= again
            self._metrics.batches_resent.inc(again)
            log.debug("Sending again batches no consumer has acknowledged count=%d", again)
        return taken

    def _refill_resends(self) -> None:
        """Allow another `max_inflight` batches to be sent again: once per `ack_timeout`, or
        as soon as a consumer's acknowledgement deleted something (it is there, and keeps up)."""
        self._resend_budget = self._config.max_inflight
        self._resend_refill_at = time.monotonic() + self._config.ack_timeout

    def _publish_mark(
        self, client: AckingClient, window: _Window, limit: int | None, *, v5: bool
    ) -> None:
        """Start publishing the high-water mark if one is due and the window has room."""
        if self._mark is None or not self._mark_due.is_set() or not window.room():
            return
        self._mark_due.clear()
        data = self._mark()
        size = publish_packet_size(self.hwm_topic, len(data), v5=v5)
        if limit is not None and size > limit:  # about 250 bytes: only an absurd limit
            log.debug("High-water mark larger than the packet limit bytes=%d limit=%d",
                      size, limit)  # fmt: skip
            return
        window.start_mark(client.publish_acked(self.hwm_topic, data, retain=True))

    def _marks_settled(self, window: _Window) -> None:
        """Count the marks acknowledged; log a refusal once per reason code."""
        for code in window.settled_marks():
            if code < REJECTION:
                self._metrics.hwm_published.inc()
                self._mark_refused = None
            elif code != self._mark_refused:
                self._mark_refused = code
                log.warning(
                    "Broker refused the high-water mark; consumers cannot see what is sealed"
                    " and not yet sent reason=0x%02x %s topic=%s",
                    code, reason_name(code), self.hwm_topic,
                )  # fmt: skip

    async def _backlog_end(self) -> int:
        """Id of the newest batch of readings sealed more than FRESH_BEFORE_CONNECT x
        `reconnect_max` ago (0 if none): the end of the backlog, for a connection made now.
        Measured on the store's age clock (`Store.now_ns`, as its `sealed_ns`), so a step of the
        wall clock makes no fresh batch backlog, nor the backlog fresh."""
        fresh_ns = int(self._config.reconnect_max * FRESH_BEFORE_CONNECT * 1e9)
        return await self._store.newest_batch_id(self._store.now_ns() - fresh_ns)

    async def _settle(self, batch: StoredBatch, code: int, session: _Session) -> None:
        """A PUBACK arrived: queue the batch for deletion, evict it (0x95), or keep it (other
        reasons >= 0x80, which end the connection)."""
        if code == PACKET_TOO_LARGE:
            cause = f"PUBACK reason=0x{code:02x} {reason_name(code)}"
            await self._evict(batch, TOO_LARGE, cause, session)
            return
        if code >= REJECTION:
            self._metrics.publish_rejected.inc()
            raise PublishRejectedError(code, self.batch_topic)
        self._to_ack.append(batch)
        if self.end_to_end:
            self._settling.add(batch.key)
        self._ack_ready.set()
        self._metrics.ack_latency.observe(max(0.0, (self._store.now_ns() - batch.sealed_ns) / 1e9))
        self._cleared(batch.key)
        self._progress(session)

    def _cleared(self, key: BatchKey) -> None:
        """`key` was delivered or evicted: it is no longer under suspicion."""
        if key in self._probation:
            self._probation.remove(key)
        if self._suspect is not None and self._suspect.key == key:
            log.info("Suspected batch delivered alone; the connection losses were not its doing"
                     " batch=%s", key.id)  # fmt: skip
            self._suspect = None

    async def _judge(self, session: _Session, client: AckingClient) -> None:
        """After a loss with batches in flight: find the one it happens on, evict it if proven."""
        cause = client.disconnect_cause or "connection lost"
        if len(session.in_flight) > 1:
            self._probation = [batch.key for batch in session.in_flight]
            log.info("Connection lost with batches in flight; re-sending them one at a time"
                     " batches=%d cause=%s", len(session.in_flight), cause)  # fmt: skip
            return
        if not session.in_flight:
            return
        [batch] = session.in_flight
        if self._suspect is not None and self._suspect.key == batch.key:
            self._suspect.drops += 1
        else:
            self._suspect = _Suspect(batch.key)
        drops = self._suspect.drops
        said_too_large = client.disconnect_code == PACKET_TOO_LARGE
        if said_too_large or drops >= DROPS_TO_EVICT:
            reason = TOO_LARGE if said_too_large else UNDELIVERABLE
            cause = f"the connection was lost each time it was sent alone, {drops} times: {cause}"
            self._suspect = None
            await self._evict(batch, reason, cause, session)
            if reason == UNDELIVERABLE and batch.key.kind == "readings":
                self._learn_payload_limit(len(batch.data))
            return
        what = "declaration" if batch.key.kind == "declaration" else "batch"
        self.state.degraded = f"the broker closes the connection when {what} {batch.key.id} is sent"
        log.warning(
            "Connection lost with one %s alone in flight; it is evicted if that happens"
            " %d times in a row %s=%d drops=%d bytes=%d cause=%s",
            what, DROPS_TO_EVICT, what, batch.key.id, drops, len(batch.data), cause,
        )  # fmt: skip

    def _learn_payload_limit(self, size: int) -> None:
        learned = max(MIN_LEARNED_PAYLOAD, size - 1)
        if self._learned_payload is None or learned < self._learned_payload:
            self._learned_payload = learned
            log.warning(
                "New batches are sealed smaller than the undeliverable one max_bytes=%d; set"
                " mqtt.max_packet_size to the broker's limit so none is sealed too large",
                learned,
            )
            self._report_payload_limit(self.state.limits)

    async def _evict(self, batch: StoredBatch, reason: str, cause: str, session: _Session) -> None:
        """Evict a batch the broker will never take, for the batcher to declare; or hold a
        declaration (never evicted) so that it no longer blocks the rest."""
        kind, row_id = batch.key
        if kind == "declaration":
            self._cleared(batch.key)
            if row_id not in self._held:
                self._held.add(row_id)
                log.error(
                    "Declaration too large for the broker held back (kept, not sent); raise the"
                    " broker's limit to deliver it declaration=%d bytes=%d cause=%s",
                    row_id, len(batch.data), cause,
                )  # fmt: skip
            self.state.degraded = self._held_back()
            return
        try:
            evicted = await self._store.evict_undeliverable(batch.key, reason)
        except StoreError as exc:
            self._metrics.store_errors.inc()
            log.error("Could not evict an undeliverable batch, will retry error=%s", exc)
            raise
        self._cleared(batch.key)
        if evicted is None:
            return  # gone already (retention took it)
        first, last, readings = evicted
        self._metrics.readings_evicted.inc(readings)
        self._metrics.batches_undeliverable.inc()
        log.warning(
            "Evicted a batch the broker will not take; its readings are declared evicted"
            " batch=%d seq=%d..%d readings=%d bytes=%d reason=%s cause=%s",
            row_id, first, last, readings, len(batch.data), reason, cause,
        )  # fmt: skip
        audit("eviction", "success", readings=readings, reason=reason, first_seq=first,
              last_seq=last, epoch=self._store.epoch)  # fmt: skip
        if self._on_evicted is not None:
            self._on_evicted()
        self._progress(session)

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
        keys = [batch.key for batch in acked]
        try:
            if self.end_to_end:
                await self._store.mark_sent(keys, self._store.now_ns())
            else:
                await self._store.ack(keys)
        except StoreError as exc:
            # Not deleting only means re-sending later (a duplicate); never a loss.
            self._to_ack = acked + self._to_ack
            self._ack_ready.set()
            self._metrics.store_errors.inc()
            log.error("Could not delete acknowledged batches, will retry error=%s", exc)
            return False
        self._settling.difference_update(keys)
        readings = sum(batch.readings for batch in acked)
        self._metrics.batches_sent.inc(len(acked))
        self._metrics.readings_sent.inc(readings)
        if not self.end_to_end:  # end_to_end: the buffer drains at the consumer's acknowledgement
            self.state.drain.acked(
                readings, len(acked), self._store.stats.readings, time.monotonic()
            )
        self.acked.set()
        return True

    async def unsent_batches(self) -> int:
        """Batches still to be published: all buffered ones in broker mode; in end_to_end mode
        those not yet PUBACKed (the others wait for the consumer, not for us)."""
        if not self.end_to_end:
            return self._store.stats.batches
        return self._store.stats.batches - (await self._store.unacked()).batches

    def _check_subscription(self, granted: object) -> None:
        """The broker refused the ack topic's subscription (its ACL): no acknowledgement can
        arrive, so batches stay buffered until evicted. Said once, loudly, not silently."""
        codes = [_code(code) for code in granted] if isinstance(granted, list | tuple) else []
        refused = [c for c in codes if c is not None and c >= REJECTION]
        if not refused:
            self._subscription_refused = False
            return
        if not self._subscription_refused:
            self._subscription_refused = True
            log.error(
                "The broker refused the subscription to the acknowledgement topic; no batch can"
                " be acknowledged by a consumer topic=%s reason=0x%02x",
                self.ack_topic, refused[0],
            )  # fmt: skip
            audit("acknowledgement", "refused", topic=self.ack_topic,
                  reason=f"subscribe 0x{refused[0]:02x}")  # fmt: skip

    async def _consumer_acks(self, client: AckingClient) -> None:
        """end_to_end: verify each message on the ack topic and apply the accepted ones."""
        async for message in client.messages:
            if message.topic.matches(self.ack_topic):
                await self.consumer_ack(message.payload)

    async def consumer_ack(self, payload: object) -> int:
        """Judge one message of the ack topic; delete what an accepted one covers.

        Returns the number of batches deleted (0 for a refusal). Raises StoreError when the
        deletion fails (the connection is made again, and the retained acknowledgement with
        it).
        """
        ack_state = self.state.ack
        try:
            ack = self._ack_opener.open(payload)
            self._ack_judge.judge(ack, self._store.epoch)
        except AckError as exc:
            self._refused(exc.reason, str(exc), exc.kid)
            return 0
        ack_state.accepted += 1
        ack_state.last_accepted = time.time()
        ack_state.consumer = ack.consumer
        self._metrics.acks_accepted.inc()
        buffered = self._store.stats.readings
        try:
            removed = await self._store.consumer_ack(ack.seqs, ack.batches)
        except StoreError:
            self._metrics.store_errors.inc()
            raise
        if removed:
            left = self._store.stats.readings  # a seal meanwhile makes this an estimate
            self.state.drain.acked(max(0, buffered - left), len(removed), left, time.monotonic())
        ack_state.deleted_batches += len(removed)
        if removed:
            self._refill_resends()
        self._metrics.batches_consumer_acked.inc(len(removed))
        log.debug(
            "Consumer acknowledgement accepted consumer=%s kid=%s epoch=%s deleted=%d",
            ack.consumer, ack.kid.hex(), ack.epoch, len(removed),
        )  # fmt: skip
        if removed:
            self.acked.set()
        return len(removed)

    def _refused(self, reason: Reason, error: str, kid: bytes | None) -> None:
        """Count a refused acknowledgement; the first of each reason is logged and audited."""
        self.state.ack.refused[reason] = self.state.ack.refused.get(reason, 0) + 1
        self._metrics.acks_refused.labels(reason=reason).inc()
        if reason in self._refusals_logged:
            log.debug("Consumer acknowledgement refused again reason=%s error=%s", reason, error)
            return
        self._refusals_logged.add(reason)
        audit("acknowledgement", "refused", reason=reason, kid=kid, topic=self.ack_topic,
              error=error)  # fmt: skip


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
    """The publishes of one connection that await their PUBACK, in the order they were sent."""

    def __init__(self, size: int, boundary: int = 0) -> None:
        self.size = size
        self.in_flight: dict[asyncio.Future[int], StoredBatch] = {}
        self.boundary = boundary
        """Id of the newest batch of readings sealed well before the connection was made: the
        backlog ends there, and batches past it are fresh."""
        self.cursor = 0
        """Highest id of a backlog batch (at most `boundary`) published on this connection."""
        self.fresh_cursor = 0
        """Highest id of a fresh batch (past `boundary`) published on this connection."""
        self.declarations: set[int] = set()
        """Ids of declarations published on this connection (they are taken first on every call)."""
        self.marks: set[asyncio.Future[int]] = set()
        """High-water marks awaiting their PUBACK."""
        self.catalogues: dict[bytes, float] = {}
        """Digests of the point catalogues the broker acknowledged on this connection, with the
        time of that PUBACK (time.monotonic)."""

    def room(self) -> int:
        return max(0, self.size - len(self.in_flight) - len(self.marks))

    def start_mark(self, publish: Coroutine[Any, Any, int]) -> None:
        """Publish a high-water mark: it holds a place in the window until its PUBACK."""
        self.marks.add(asyncio.ensure_future(publish))

    def settled_marks(self) -> list[int]:
        """The reason codes of the marks acknowledged since the last call (a mark lost with the
        connection is forgotten: the next connect publishes a new one)."""
        codes = []
        for future in [f for f in self.marks if f.done()]:
            self.marks.discard(future)
            if not future.cancelled() and future.exception() is None:
                codes.append(future.result())
        return codes

    def start(self, batch: StoredBatch, publish: Coroutine[Any, Any, int]) -> None:
        """Publish `batch` (never one already published on this connection)."""
        if batch.key.kind == "declaration":
            self.declarations.add(batch.key.id)
        elif batch.key.id > self.boundary:
            self.fresh_cursor = max(self.fresh_cursor, batch.key.id)
        else:
            self.cursor = max(self.cursor, batch.key.id)
        task = asyncio.ensure_future(publish)
        self.in_flight[task] = batch

    async def completed(
        self,
        wakes: Sequence[asyncio.Event],
        lost: asyncio.Event,
        *,
        idle_s: float | None = None,
    ) -> tuple[list[tuple[StoredBatch, int]], str | None]:
        """Wait for a PUBACK (of a batch or a mark), for one of `wakes` or for `lost` (at most
        `idle_s` seconds, when given): the (batch, reason code) pairs acknowledged, oldest
        first, and what went wrong if the connection did.

        PUBACKs read just before a loss are returned too, so that the batch the broker closed
        the connection on, not one it acknowledged, is the oldest left in flight.
        """
        waiters: set[asyncio.Future[Any]] = set(self.in_flight) | self.marks
        events = [asyncio.ensure_future(e.wait()) for e in (*wakes, lost)]
        waiters.update(events)
        try:
            await asyncio.wait(waiters, timeout=idle_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for event in events:
                event.cancel()
        results: list[tuple[StoredBatch, int]] = []
        problem = "Connection lost" if lost.is_set() else None
        for future, batch in list(self.in_flight.items()):
            if not future.done():
                continue
            if future.cancelled() or future.exception() is not None:
                problem = problem or str(future.exception() or "publish cancelled")
                continue
            results.append((batch, future.result()))
            del self.in_flight[future]
        return results, problem

    def cancel(self) -> None:
        for future in [*self.in_flight, *self.marks]:
            future.cancel()
        self.in_flight.clear()
        self.marks.clear()
