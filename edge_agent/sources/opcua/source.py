"""The OPC UA source: monitored items or polled reads, a secured session, recovery on its own.

One session at a time, built from scratch on every (re)connect: endpoint discovery, server
certificate check, secure channel, session, then the subscription or the read plan. asyncua 2.1
has its own auto-reconnect, but it drops a monitored item that fails to come back without telling
the caller and re-validates nothing it did not create; owning the loop keeps one code path for the
first connect and every later one, a per-node status each time, and one log line per change of
state. asyncua's supervisor is still used to *detect* a lost link: it probes the server state and
counts any publish response, data or keep-alive, as a sign of life (a busy server sends no
keep-alives, and that must not look like a dead one).

Each connect also reads the server's namespace table and resolves `nsu=` node ids against it
(namespaces.py): indexes may change when the server restarts. Before connecting after a lost
connection, the session that connection left on the server is taken over and closed
(session.py), so a server that allows one session takes the agent back at once.

What a consumer sees:
- every DataValue that is news as a Reading (values.ChangeFilter: a changed value or status is
  never dropped, an exact repeat is), with the source timestamp, or the server timestamp or the
  receive time when the source timestamp is missing, frozen or went backwards (logged once per
  node); the quality from the StatusCode's severity and the code itself in `Reading.code`;
- a bad status with value None, never an old value passed off as good; a value the value rules
  refuse (edge_agent.reading: NaN, text that is not UTF-8...) is bad with value None too, the
  device's code kept, and logged once per reason; a bad point is reported when it turns bad, not
  on every poll;
- text over MAX_TEXT_BYTES (edge_agent.reading) cut there and sent `uncertain`, logged once per
  node and counted (`truncated`);
- a node whose namespace URI the server does not have: BadNodeIdUnknown, logged with the URI;
- when the connection is lost, one `BadNotConnected` reading per point that had reported, so the
  last value is visibly no longer current; after the reconnect each point reports its current
  value again with its own (possibly older) source timestamp: order a point's readings by `seq`.

A connection the server refuses on security grounds (our certificate, or our identity) or whose
server certificate is not trusted is an audit event (edge_agent.audit), once per episode.

Only discovery, session, subscription and Read services are used: no Write, Call, AddNodes or
DeleteNodes request is ever sent (docs/contract.md §5; tests record the server's requests to
prove it).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
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
from edge_agent.config.opcua import Deadband, OpcuaNode, OpcuaSourceConfig
from edge_agent.errors import EdgeAgentError
from edge_agent.logs import quiet_unless_configured
from edge_agent.reading import MAX_TEXT_BYTES, Quality, Reading
from edge_agent.schedule import Backoff, ticks
from edge_agent.sources.base import Emit, SourceState
from edge_agent.sources.opcua.namespaces import UnknownNamespaceError, namespace_table, resolve
from edge_agent.sources.opcua.security import UntrustedCertificateError, configure_client
from edge_agent.sources.opcua.session import (
    LossWatch,
    SessionTicket,
    TakeOverError,
    close_session,
    describe_error,
    take_over,
)
from edge_agent.sources.opcua.values import (
    BAD_NOT_CONNECTED,
    ChangeFilter,
    TimestampIssue,
    bad_reading,
    code_name,
    status_code,
)

log = logging.getLogger(__name__)

MAX_NODES_PER_READ = 1000
"""Reads are split at this size; servers commonly limit MaxNodesPerRead near it."""
_DRAIN_MAX = 10_000
"""Notifications taken from the subscription queue per emit, so one emit carries a publish."""
BAD_NODE_ID_UNKNOWN = 0x80340000
"""Reported for a node whose namespace URI the server does not have."""
_TIMESTAMP_LOG_NODES = 10
"""Nodes logged per kind of timestamp issue; further ones are only counted (a gateway that
freezes timestamps usually freezes them on every node)."""
_TIMESTAMP_ISSUES: dict[TimestampIssue, tuple[str, str]] = {
    "frozen": (
        "OPC UA node's source timestamp did not change with its value",
        "source timestamps that do not change with their values",
    ),
    "backwards": ("OPC UA node's source timestamp went backwards", "source timestamps going back"),
    "missing": ("OPC UA node gives no source timestamp", "no source timestamps"),
}


class ConnectionLostError(EdgeAgentError):
    """The session or its subscription is gone; the run loop reconnects."""


class OpcuaSource:
    """Readings from one OPC UA server; reconnects forever and never raises out of `run`."""

    def __init__(self, config: OpcuaSourceConfig) -> None:
        self.name = config.name
        self.state = SourceState()
        self._config = config
        self._nodes = {node.name: node for node in config.nodes}
        self._changes = ChangeFilter()
        self._node_faults: dict[str, str] = {}
        """Per point: the last fault logged (bad code or refused value), logged once per change."""
        self._flagged: set[str] = set()
        self._truncated: set[str] = set()
        """Points whose text was cut (logged once each; every cut reading sent is counted)."""
        self._timestamp_logged: set[tuple[str, TimestampIssue]] = set()
        self._orphan: SessionTicket | None = None
        """The session a lost connection left on the server, to take over at the next connect."""
        self._loss: str | None = None
        """Why the last session's connection was lost, when it was."""
        quiet_unless_configured("asyncua")  # it logs every publish response (edge_agent.logs)

    async def run(self, emit: Emit) -> None:
        """Connect, stream, and on any failure mark down, back off and start over."""
        cfg = self._config
        backoff = Backoff(cfg.reconnect_min, cfg.reconnect_max)
        while True:
            self._loss = None
            try:
                await self._session(emit)
                error = "the session ended"
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - a failure must stay inside the source
                error = describe_error(exc)
                refusal = security_refusal(exc)
            else:
                refusal = None
            error = self._loss or error  # the cause, not asyncua's BadShutdown that follows it
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
        watchdog = min(5.0, max(cfg.timeout / 2, 0.5))
        client = Client(cfg.endpoint, timeout=cfg.timeout, watchdog_intervall=watchdog)
        client.session_timeout = int(cfg.session_timeout * 1000)
        watch = LossWatch(probe_timeout=min(cfg.session_timeout / 2, watchdog))
        ticket: SessionTicket | None = None
        try:
            try:
                async with asyncio.timeout(cfg.timeout * 3):
                    await configure_client(client, cfg.security, cfg.auth)
                    await self._take_over(client)
                    await client.connect()
            except TimeoutError:
                raise ConnectionLostError(f"no answer for {cfg.timeout:g}s") from None
            ticket = self._orphan = SessionTicket.of(client)
            watch.attach(client)
            table = await namespace_table(client)
            if cfg.mode == "subscribe":
                await self._subscribe(client, table, emit)
            else:
                await self._poll(client, table, emit)
        finally:
            self._loss = watch.reason
            watch.closing()
            if ticket is not None:  # the session lives on at the server until it times out
                self._orphan = ticket.renewed(client.session_timeout / 1000)
            if await close_session(client, wait=2.0):
                self._orphan = None

    async def _take_over(self, client: Client) -> None:
        """Close the session a lost connection left on the server, if it may still be there."""
        orphan, self._orphan = self._orphan, None
        if orphan is None or time.monotonic() > orphan.expires:
            return
        try:
            taken = await take_over(client, orphan)
        except TakeOverError as exc:
            log.warning(
                "OPC UA server refused to let the source take over the session its lost "
                "connection left; the server keeps it until it expires; source=%s endpoint=%s "
                "error=%s",
                self.name,
                self._config.endpoint,
                exc,
            )
            return
        except BaseException:
            self._orphan = orphan  # not reached this time: try again on the next attempt
            raise
        if taken:
            log.info(
                "OPC UA source closed the session its lost connection left on the server; "
                "source=%s endpoint=%s",
                self.name,
                self._config.endpoint,
            )

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

    async def _subscribe(self, client: Client, table: list[str], emit: Emit) -> None:
        cfg = self._config
        params = ua.CreateSubscriptionParameters()
        params.RequestedPublishingInterval = cfg.interval * 1000
        params.RequestedMaxKeepAliveCount = cfg.keepalive_count
        params.RequestedLifetimeCount = cfg.keepalive_count * 3
        params.MaxNotificationsPerPublish = 0
        params.PublishingEnabled = True
        params.Priority = 0
        queue_size = max(10_000, 4 * sum(n.queue_size or cfg.queue_size for n in cfg.nodes))
        resolved, failed = self._resolve(table)
        # DISCONNECT, not DROP_OLDEST: if we fall that far behind, a visible reconnect beats
        # silently lost notifications.
        sub = await client.create_subscription(
            params, None, queue_maxsize=queue_size, overflow=OverflowPolicy.DISCONNECT
        )
        indexes = list(resolved)
        requests = [self._item_request(i, cfg.nodes[i], resolved[i]) for i in indexes]
        names = {i + 1: cfg.nodes[i].name for i in indexes}
        results = await sub.create_monitored_items(requests) if requests else []
        for i, result in zip(indexes, results, strict=True):
            if isinstance(result, ua.StatusCode):
                failed[i] = (int(result.value), None)
        if len(failed) == len(cfg.nodes):
            raise ConnectionLostError(f"no node could be monitored; first: {self._why(failed)}")
        self._mark_up()
        await self._emit(self._bad_nodes(failed), emit)
        await self._consume(client, sub, names, emit)

    def _resolve(
        self, table: list[str]
    ) -> tuple[dict[int, ua.NodeId], dict[int, tuple[int, str | None]]]:
        """Per node index: its wire NodeId, or (bad code, reason) when its namespace is unknown."""
        resolved: dict[int, ua.NodeId] = {}
        failed: dict[int, tuple[int, str | None]] = {}
        for index, node in enumerate(self._config.nodes):
            try:
                resolved[index] = resolve(node.node_id, table)
            except UnknownNamespaceError as exc:
                failed[index] = (BAD_NODE_ID_UNKNOWN, str(exc))
        return resolved, failed

    def _why(self, failed: dict[int, tuple[int, str | None]]) -> str:
        index = min(failed)
        code, reason = failed[index]
        node = self._config.nodes[index]
        text = f"node={node.name} node_id={node.node_id} status={code_name(code)}"
        return f"{text} reason={reason}" if reason else text

    def _bad_nodes(self, failed: dict[int, tuple[int, str | None]]) -> list[Reading]:
        """Bad readings for the nodes that cannot be read at all, logged once per code."""
        readings: list[Reading] = []
        for index, (code, reason) in sorted(failed.items()):
            name = self._config.nodes[index].name
            reading = self._changes.accept_synthetic(bad_reading(self.name, name, code))
            self._log_node(name, True, code, None, reason)
            if reading is not None:
                readings.append(reading)
        return readings

    def _item_request(
        self, index: int, node: OpcuaNode, node_id: ua.NodeId
    ) -> ua.MonitoredItemCreateRequest:
        cfg = self._config
        item = ua.MonitoredItemCreateRequest()
        item.ItemToMonitor = ua.ReadValueId()
        item.ItemToMonitor.NodeId = node_id
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

    async def _poll(self, client: Client, table: list[str], emit: Emit) -> None:
        cfg = self._config
        resolved, failed = self._resolve(table)
        if len(failed) == len(cfg.nodes):
            raise ConnectionLostError(f"no node could be read; first: {self._why(failed)}")
        indexes = list(resolved)
        chunks: list[tuple[list[str], ua.ReadParameters]] = []
        for start in range(0, len(indexes), MAX_NODES_PER_READ):
            chunk = indexes[start : start + MAX_NODES_PER_READ]
            params = ua.ReadParameters()
            params.MaxAge = 0
            params.TimestampsToReturn = ua.TimestampsToReturn.Both
            for index in chunk:
                read = ua.ReadValueId()
                read.NodeId = resolved[index]
                read.AttributeId = AttributeIds.Value
                params.NodesToRead.append(read)
            chunks.append(([cfg.nodes[i].name for i in chunk], params))
        bad = self._bad_nodes(failed)  # sent with the first tick's readings
        async for _ in ticks(cfg.interval):  # a slow read or back-pressure skips ticks, no burst
            readings, bad = bad, []
            for names, params in chunks:
                try:
                    async with asyncio.timeout(cfg.timeout):
                        values = await client.uaclient.read(params)
                except TimeoutError:
                    raise ConnectionLostError(f"no answer for {cfg.timeout:g}s") from None
                for name, value in zip(names, values, strict=True):
                    reading = self._convert(name, value)
                    if reading is not None:
                        readings.append(reading)
            self._mark_up()
            await self._emit(readings, emit)

    # -- readings ----------------------------------------------------------------------------

    def _convert(self, name: str, value: ua.DataValue) -> Reading | None:
        reading, issue, flagged, rejected, truncated = self._changes.accept(self.name, name, value)
        if truncated and reading is not None:  # a repeat is neither sent nor counted
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
        if reading is None:
            if rejected is not None:  # refused again, maybe for a new reason: logged, not sent
                self._log_node(name, True, status_code(value), rejected)
            return None
        if issue is not None:
            self._timestamp_issue(name, issue, value)
        self._log_node(name, reading.quality is Quality.BAD, reading.code or 0, rejected)
        return reading

    def _timestamp_issue(self, name: str, issue: TimestampIssue, value: ua.DataValue) -> None:
        """Count a reading that carries a substitute timestamp; log the first of each kind."""
        self.state.counts[f"timestamp_{issue}"] += 1
        if (name, issue) in self._timestamp_logged:
            return
        logged = sum(1 for _, kind in self._timestamp_logged if kind == issue)
        self._timestamp_logged.add((name, issue))
        if logged > _TIMESTAMP_LOG_NODES:
            return
        if logged == _TIMESTAMP_LOG_NODES:
            log.warning(
                "More OPC UA nodes have %s; they are counted as timestamp_%s in /status, "
                "not logged; source=%s",
                _TIMESTAMP_ISSUES[issue][1],
                issue,
                self.name,
            )
            return
        stamp = value.SourceTimestamp
        log.warning(
            "%s; its readings carry the server timestamp, else the receive time, when that "
            "happens; source=%s node=%s node_id=%s source_ts=%s",
            _TIMESTAMP_ISSUES[issue][0],
            self.name,
            name,
            self._nodes[name].node_id,
            "none" if stamp is None else stamp.isoformat(),
        )

    def _log_node(
        self, name: str, bad: bool, code: int, rejected: str | None, reason: str | None = None
    ) -> None:
        """Log a node turning bad, once per fault (a bad code, or why a value was refused), and
        its recovery. `reason` adds why the node cannot be read at all (its namespace URI)."""
        previous = self._node_faults.get(name)
        fault = rejected or (code_name(code) if bad and code != BAD_NOT_CONNECTED else None)
        if fault is not None:
            if previous != fault:
                self._node_faults[name] = fault
                node_id = self._nodes[name].node_id
                if rejected is None:
                    log.warning(
                        "OPC UA node is bad; source=%s node=%s node_id=%s status=%s%s",
                        self.name,
                        name,
                        node_id,
                        fault,
                        f" reason={reason}" if reason else "",
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
            self._changes.accept_synthetic(bad_reading(self.name, name, BAD_NOT_CONNECTED, now))
            for name, code in self._changes.codes().items()
            if code != BAD_NOT_CONNECTED
        ]
        await self._emit([r for r in readings if r is not None], emit)


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
