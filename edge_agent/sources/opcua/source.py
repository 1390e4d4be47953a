"""The OPC UA source: monitored items or polled reads, a secured session, recovery on its own.

One session at a time, built from scratch on every (re)connect: endpoint discovery, server
certificate check, secure channel, session, then the subscription or the read plan. asyncua 2.1
has its own auto-reconnect, but it drops a monitored item that fails to come back without telling
the caller and re-validates nothing it did not create; owning the loop keeps one code path for the
first connect and every later one, a per-node status each time, and one log line per change of
state. asyncua's supervisor is still used to *detect* a lost link: it probes the server state and
counts any publish response, data or keep-alive, as a sign of life (a busy server sends no
keep-alives, and that must not look like a dead one).

What a consumer sees:
- every DataValue as a Reading with the source timestamp (server timestamp, then local clock, as
  fallbacks), the quality from the StatusCode's severity and the code itself in `Reading.code`;
- a bad status with value None, never an old value passed off as good;
- an exact repeat of a sample (same timestamp, same code) is not sent again, so a poll of a
  value that has not changed, or the initial value a new subscription replays, is not re-sent as
  fresh; a bad point is reported when it turns bad, not on every poll;
- when the connection is lost, one `BadNotConnected` reading per point that had reported, so the
  last value is visibly no longer current; after the reconnect each point reports its current
  value again with its own (possibly older) source timestamp: order a point's readings by `seq`.

Only discovery, session, subscription and Read services are used: no Write, Call, AddNodes or
DeleteNodes request is ever sent (docs/contract.md §5; tests record the server's requests to prove
it).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from contextlib import suppress
from typing import Any, Literal

from asyncua import ua
from asyncua.client.client import Client
from asyncua.common.subscription import (
    DataChangeEvent,
    OverflowPolicy,
    StatusChangeEvent,
    Subscription,
)
from asyncua.ua.attribute_ids import AttributeIds
from asyncua.ua.uaerrors import UaStatusCodeError

from edge_agent.audit import audit
from edge_agent.config.opcua import Deadband, OpcuaSourceConfig
from edge_agent.errors import EdgeAgentError
from edge_agent.logs import quiet_unless_configured
from edge_agent.reading import MAX_TEXT_BYTES, Quality, Reading
from edge_agent.schedule import Backoff, ticks
from edge_agent.sources.base import Emit, SourceState
from edge_agent.sources.opcua.security import UntrustedCertificateError, configure_client
from edge_agent.sources.opcua.values import (
    BAD_NOT_CONNECTED,
    bad_reading,
    code_name,
    to_reading,
)

log = logging.getLogger(__name__)

MAX_NODES_PER_READ = 1000
"""Reads are split at this size; servers commonly limit MaxNodesPerRead near it."""
_DRAIN_MAX = 10_000
"""Notifications taken from the subscription queue per emit, so one emit carries a publish."""


class ConnectionLostError(EdgeAgentError):
    """The session or its subscription is gone; the run loop reconnects."""


class OpcuaSource:
    """Readings from one OPC UA server; reconnects forever and never raises out of `run`."""

    def __init__(self, config: OpcuaSourceConfig) -> None:
        self.name = config.name
        self.state = SourceState()
        self._config = config
        self._last: dict[str, tuple[int, int, bool]] = {}
        """Per point: (ts_ns, code, bad) of the last reading sent, to drop exact repeats."""
        self._node_faults: dict[str, str] = {}
        """Per point: the last fault logged (bad code or refused value), logged once per change."""
        self._flagged: set[str] = set()
        self._truncated: set[str] = set()
        """Points whose text was cut (logged once each; every cut is counted)."""
        quiet_unless_configured("asyncua")  # it logs every publish response (edge_agent.logs)

    async def run(self, emit: Emit) -> None:
        """Connect, stream, and on any failure mark down, back off and start over."""
        cfg = self._config
        backoff = Backoff(cfg.reconnect_min, cfg.reconnect_max)
        while True:
            try:
                await self._session(emit)
                error = "the session ended"
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - a failure must stay inside the source
                error = describe(exc)
                refusal = security_refusal(exc)
            else:
                refusal = None
            was_up, first = self.state.up, self.state.errors == 0
            if self.state.mark_down(error):
                if refusal is not None:
                    audit(refusal, "refused" if refusal == "certificate" else "failure",
                          source=self.name, endpoint=cfg.endpoint, error=error)  # fmt: skip
                state = "is down" if was_up or first else "is still down, for a new reason"
                log.warning(
                    "OPC UA source %s; source=%s endpoint=%s error=%s",
                    state,
                    self.name,
                    cfg.endpoint,
                    error,
                )
            await self._report_disconnected(emit)
            if was_up:
                backoff.reset()
            await asyncio.sleep(backoff.next())

    async def _session(self, emit: Emit) -> None:
        cfg = self._config
        client = Client(
            cfg.endpoint,
            timeout=cfg.timeout,
            watchdog_intervall=min(5.0, max(cfg.timeout / 2, 0.5)),
        )
        client.session_timeout = max(60_000, int(cfg.reconnect_max * 4000))
        try:
            async with asyncio.timeout(cfg.timeout * 2):
                await configure_client(client, cfg.security, cfg.auth)
                await client.connect()
            if cfg.mode == "subscribe":
                await self._subscribe(client, emit)
            else:
                await self._poll(client, emit)
        finally:
            with suppress(Exception):
                async with asyncio.timeout(2.0):
                    await client.disconnect()

    def _mark_up(self) -> None:
        if self.state.mark_up():
            log.info(
                "OPC UA source is up; source=%s endpoint=%s mode=%s nodes=%d",
                self.name,
                self._config.endpoint,
                self._config.mode,
                len(self._config.nodes),
            )

    # -- subscribe ---------------------------------------------------------------------------

    async def _subscribe(self, client: Client, emit: Emit) -> None:
        cfg = self._config
        params = ua.CreateSubscriptionParameters()
        params.RequestedPublishingInterval = cfg.interval * 1000
        params.RequestedMaxKeepAliveCount = cfg.keepalive_count
        params.RequestedLifetimeCount = cfg.keepalive_count * 3
        params.MaxNotificationsPerPublish = 0
        params.PublishingEnabled = True
        params.Priority = 0
        queue_size = max(10_000, 4 * sum(n.queue_size or cfg.queue_size for n in cfg.nodes))
        # DISCONNECT, not DROP_OLDEST: if we fall that far behind, a visible reconnect beats
        # silently lost notifications.
        sub = await client.create_subscription(
            params, None, queue_maxsize=queue_size, overflow=OverflowPolicy.DISCONNECT
        )
        requests = [self._item_request(index, node) for index, node in enumerate(cfg.nodes)]
        names = {index + 1: node.name for index, node in enumerate(cfg.nodes)}
        results = await sub.create_monitored_items(requests)
        failed = [
            bad_reading(self.name, cfg.nodes[i].name, int(r.value))
            for i, r in enumerate(results)
            if isinstance(r, ua.StatusCode)
        ]
        if len(failed) == len(cfg.nodes):
            raise ConnectionLostError(
                f"no node could be monitored; first: {code_name(failed[0].code or 0)}"
            )
        self._mark_up()
        await self._emit([r for r in (self._accept(r) for r in failed) if r is not None], emit)
        await self._consume(client, sub, names, emit)

    def _item_request(self, index: int, node: Any) -> ua.MonitoredItemCreateRequest:
        cfg = self._config
        item = ua.MonitoredItemCreateRequest()
        item.ItemToMonitor = ua.ReadValueId()
        item.ItemToMonitor.NodeId = ua.NodeId.from_string(node.node_id)
        item.ItemToMonitor.AttributeId = AttributeIds.Value
        item.MonitoringMode = ua.MonitoringMode.Reporting
        params = ua.MonitoringParameters()
        params.ClientHandle = index + 1
        sampling = node.sampling_interval or cfg.sampling_interval or cfg.interval
        params.SamplingInterval = sampling * 1000
        params.QueueSize = node.queue_size or cfg.queue_size
        params.DiscardOldest = True
        deadband = node.deadband or cfg.deadband
        if deadband is not None:
            params.Filter = data_change_filter(deadband)
        item.RequestedParameters = params
        return item

    async def _consume(
        self, client: Client, sub: Subscription, names: dict[int, str], emit: Emit
    ) -> None:
        # asyncua 2.1 exposes only one-at-a-time iteration; draining its queue directly turns a
        # publish of 1,000 notifications into one emit instead of 1,000.
        queue: asyncio.Queue[Any] | None = sub._event_queue
        assert queue is not None
        idle = max(self._config.timeout, self._config.interval * 2)
        while True:
            if queue.empty():
                try:
                    event = await sub.next_event(timeout=idle)
                except StopAsyncIteration:
                    raise ConnectionLostError("the subscription was closed") from None
                if event is None:
                    if client.uaclient.state.value != "connected":
                        raise ConnectionLostError("the connection was lost")
                    continue
                events = [event]
            else:
                events = []
            while not queue.empty() and len(events) < _DRAIN_MAX:
                events.append(queue.get_nowait())
            readings: list[Reading] = []
            for event in events:
                if isinstance(event, DataChangeEvent):
                    name = names.get(event.data.monitored_item.ClientHandle)
                    if name is not None:
                        reading = self._convert(name, event.data.monitored_item.Value)
                        if reading is not None:
                            readings.append(reading)
                elif isinstance(event, StatusChangeEvent):
                    status = event.notification.Status
                    if not status.is_good():
                        await self._emit(readings, emit)
                        raise ConnectionLostError(f"subscription status {status.name}")
                elif event is None:
                    await self._emit(readings, emit)
                    raise ConnectionLostError("the subscription was closed")
            await self._emit(readings, emit)

    # -- poll --------------------------------------------------------------------------------

    async def _poll(self, client: Client, emit: Emit) -> None:
        cfg = self._config
        chunks: list[tuple[list[str], ua.ReadParameters]] = []
        for start in range(0, len(cfg.nodes), MAX_NODES_PER_READ):
            nodes = cfg.nodes[start : start + MAX_NODES_PER_READ]
            params = ua.ReadParameters()
            params.MaxAge = 0
            params.TimestampsToReturn = ua.TimestampsToReturn.Both
            for node in nodes:
                read = ua.ReadValueId()
                read.NodeId = ua.NodeId.from_string(node.node_id)
                read.AttributeId = AttributeIds.Value
                params.NodesToRead.append(read)
            chunks.append(([n.name for n in nodes], params))
        async for _ in ticks(cfg.interval):  # a slow read or back-pressure skips ticks, no burst
            readings: list[Reading] = []
            for names, params in chunks:
                async with asyncio.timeout(cfg.timeout):
                    values = await client.uaclient.read(params)
                for name, value in zip(names, values, strict=True):
                    reading = self._convert(name, value)
                    if reading is not None:
                        readings.append(reading)
            self._mark_up()
            await self._emit(readings, emit)

    # -- readings ----------------------------------------------------------------------------

    def _convert(self, name: str, value: ua.DataValue) -> Reading | None:
        reading, flagged, rejected, truncated = to_reading(self.name, name, value)
        if truncated:
            self.state.counts["truncated"] += 1
            if name not in self._truncated:
                self._truncated.add(name)
                log.warning(
                    "OPC UA node text cut to its first %d bytes, sent as uncertain; source=%s "
                    "node=%s",
                    MAX_TEXT_BYTES,
                    self.name,
                    name,
                )
        if flagged and name not in self._flagged:
            self._flagged.add(name)
            log.warning(
                "OPC UA node value has no plain type and is sent as text; source=%s "
                "node=%s type=%s",
                self.name,
                name,
                value.Value.VariantType.name if value.Value is not None else "?",
            )
        return self._accept(reading, rejected)

    def _accept(self, reading: Reading, rejected: str | None = None) -> Reading | None:
        """The reading if it is news: not an exact repeat, not a repeat of the same bad code.

        `rejected` is why a value with a good or uncertain status was refused (the reading is
        bad, with the device's code): logged once per change, like a bad status.
        """
        code = reading.code or 0
        bad = reading.quality is Quality.BAD
        self._log_node(reading.pt, bad, code, rejected)
        last = self._last.get(reading.pt)
        if last is not None:
            if last == (reading.ts_ns, code, bad):
                return None
            if bad and last[1:] == (code, True):
                return None
        self._last[reading.pt] = (reading.ts_ns, code, bad)
        return reading

    def _log_node(self, name: str, bad: bool, code: int, rejected: str | None) -> None:
        previous = self._node_faults.get(name)
        fault = rejected or (code_name(code) if bad and code != BAD_NOT_CONNECTED else None)
        if fault is not None:
            if previous != fault:
                self._node_faults[name] = fault
                node_id = next(n.node_id for n in self._config.nodes if n.name == name)
                if rejected is None:
                    log.warning(
                        "OPC UA node is bad; source=%s node=%s node_id=%s status=%s",
                        self.name,
                        name,
                        node_id,
                        fault,
                    )
                else:
                    log.warning(
                        "OPC UA node value rejected, sent as bad; source=%s node=%s "
                        "node_id=%s status=%s error=%s",
                        self.name,
                        name,
                        node_id,
                        code_name(code),
                        rejected,
                    )
        elif previous is not None and not bad:
            del self._node_faults[name]
            log.info("OPC UA node recovered; source=%s node=%s", self.name, name)

    async def _emit(self, readings: Sequence[Reading], emit: Emit) -> None:
        if readings:
            await emit(readings)
            self.state.readings += len(readings)

    async def _report_disconnected(self, emit: Emit) -> None:
        """One BadNotConnected per point that had reported, so no old value looks current."""
        now = time.time_ns()
        readings = [
            bad_reading(self.name, name, BAD_NOT_CONNECTED, now)
            for name, (_, code, _) in self._last.items()
            if code != BAD_NOT_CONNECTED
        ]
        for reading in readings:
            self._last[reading.pt] = (now, BAD_NOT_CONNECTED, True)
        await self._emit(readings, emit)


def data_change_filter(deadband: Deadband) -> ua.DataChangeFilter:
    """A filter reporting status or value changes beyond the deadband (OPC 10000-4 §7.22.2)."""
    flt = ua.DataChangeFilter()
    flt.Trigger = ua.DataChangeTrigger.StatusValue
    flt.DeadbandType = 1 if deadband.type == "absolute" else 2
    flt.DeadbandValue = deadband.value
    return flt


AUTH_FAILURES = frozenset({
    0x801F0000,  # BadUserAccessDenied
    0x80200000,  # BadIdentityTokenInvalid
    0x80210000,  # BadIdentityTokenRejected
})  # fmt: skip
"""Status codes with which a server refuses our identity (OPC 10000-4 §5.6.3 ActivateSession)."""
CERTIFICATE_FAILURES = frozenset(range(0x80120000, 0x801F0000, 0x10000))
"""BadCertificateInvalid (0x8012) .. BadCertificateIssuerRevoked (0x801E), with
BadSecurityChecksFailed (0x8013): the server refused our certificate or its chain."""


def security_refusal(exc: BaseException) -> Literal["certificate", "authentication"] | None:
    """The audit category of a connection refused on security grounds, else None."""
    if isinstance(exc, UntrustedCertificateError):
        return "certificate"
    if isinstance(exc, UaStatusCodeError):
        code = int(exc.code)
        if code in AUTH_FAILURES:
            return "authentication"
        if code in CERTIFICATE_FAILURES:
            return "certificate"
    return None


def describe(exc: BaseException) -> str:
    """A one-line reason for logs and /status: the status name for OPC UA errors."""
    if isinstance(exc, UaStatusCodeError):
        return code_name(int(exc.code))
    if isinstance(exc, TimeoutError):
        return "timed out"
    text = str(exc) or type(exc).__name__
    if isinstance(exc, OSError) and exc.strerror:
        text = exc.strerror
    return text
