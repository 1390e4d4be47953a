"""The Modbus source: one device (unit), polled on a drift-free schedule through a shared link.

Each poll runs the planned reads in order. A failure marks exactly the points of the failed read
bad (value None, the poll's timestamp), never a fabricated value:
- an exception response affects that read only; exception 2 on a read that bridged points makes
  the plan split it into smaller reads for good (logged once);
- a timeout or a lost connection means the unit is not answering: its remaining reads of this
  poll are skipped (marked bad too), so a dead unit holds a shared line for one timeout per poll;
- an answer that does not match its request is never data (link.py); on a serial line it also
  ends the unit's poll, since the unit is out of step, and the next poll waits until the link
  has let the unit settle (`ModbusLink.settle`).
What the link threw away instead of reading it (late answers, line noise) is counted (`late`,
`framing`) and logged when it starts and when it stops. A value the value rules refuse
(edge_agent.reading: NaN, text not UTF-8, ...) makes its point bad, is counted (`rejected`)
and logged when it starts, changes reason and stops.
Logs are one line per change of state (a read failing, failing differently, recovering; the
device going down or up), with the number of failures in between.
"""

from __future__ import annotations

import asyncio
import logging
import marshal
import sys
import time
from collections.abc import Callable, Iterable
from itertools import repeat
from typing import Any, NamedTuple, cast

from edge_agent.config.fresh import fresh_copy
from edge_agent.config.modbus import ModbusSourceConfig
from edge_agent.reading import Quality, Reading, Value
from edge_agent.schedule import ticks
from edge_agent.sources.base import Emit, SourceState
from edge_agent.sources.modbus.deadband import ReportFilter
from edge_agent.sources.modbus.decode import BlockDecoder, DecodeError
from edge_agent.sources.modbus.link import (
    ExceptionReplyError,
    LinkDownError,
    LinkPool,
    ModbusLink,
    ReadError,
    ReadTimeoutError,
)
from edge_agent.sources.modbus.plan import (
    PointSpec,
    PointTable,
    ReadRequest,
    decoder_of,
    plan_reads,
    shared_indexes,
    split,
)

log = logging.getLogger(__name__)

DISCARD_TEXT = {"late": "late reply discarded", "framing": "framing error, noise discarded"}
"""Log wording per kind of discarded bytes (the counters of the same names)."""

ReadKey = tuple[str, int, int]

_tuple_new = cast(Callable[[type[Reading], tuple[Any, ...]], Reading], tuple.__new__)
"""`_tuple_new(Reading, fields)`: a Reading without NamedTuple's Python-level __new__."""


class _Read(NamedTuple):
    """What a planned read needs on every poll, built on its first poll."""

    decoder: BlockDecoder
    names: tuple[str, ...]
    """The names of the read's points, in the read's order."""
    filtered: bool
    """Whether a point of the read has a deadband (its good values may be held back)."""


class ModbusSource:
    """Polls one Modbus unit; `run` never raises except on cancellation.

    `links` is the pool of the agent (or benchmark, or test) that runs the source: sources
    built with the same pool share a link when their `link_key` is the same.
    """

    def __init__(
        self, config: ModbusSourceConfig, links: LinkPool, points: object | None = None
    ) -> None:
        """`points`: the points as `prepare_source` made them (a `PointTable`), for a `config`
        without them; None: the config's own `points`."""
        self.name = config.name
        self.state = SourceState()
        if points is None:
            points = PointTable(PointSpec.of(p) for p in config.points)
        if not isinstance(points, PointTable):
            raise TypeError(f"source {config.name!r}: expected a PointTable, got {points!r}")
        self._points = points
        """The points by column: the source keeps no pydantic model, nor a tuple, per point."""
        self._config = config.model_copy(update={"points": []})
        self._links = links
        self._unit = config.unit_id
        self.plan: list[ReadRequest] = plan_reads(
            self._points,
            max_registers=config.max_registers_per_read,
            max_bits=config.max_bits_per_read,
            max_gap=config.max_gap,
        )
        self._reads: dict[ReadRequest, _Read] = {}
        slack = config.poll_interval / 2  # "at least every heartbeat", at poll granularity
        self._slack = slack
        self._filters = {
            i: ReportFilter(p.deadband, max((p.heartbeat or config.heartbeat) - slack, 0.0))
            for i, p in enumerate(self._points)
            if p.deadband is not None
        }
        """Points with a deadband (report by exception): what each last sent, and when."""
        self._bad_sent: dict[int, float] = {}
        """Points without a deadband last sent as bad: when (re-sent once per heartbeat)."""
        self._read_faults: dict[ReadKey, tuple[str, int]] = {}
        self._point_faults: dict[int, tuple[str, int]] = {}
        """Per point index: the value rule its last value broke, and how many polls in a row."""
        self._discarding: dict[str, int] = {}
        self._device = f"{config.name} ({config.describe()})"

    def compact(self) -> None:
        """Remake the points and the plan as fresh objects, once the validated config is freed.

        They were made while the configuration was read and validated, in memory shared with
        its far larger transient structures, which they would keep from going back to the
        system; their copies are made once that is freed (about 4 MB less RSS for 10 x 1,000
        points, docs/performance.md). The copies are equal to the originals.
        """
        data = marshal.dumps(
            (  # fresh text and numbers come back, shared ones stay shared
                self._points.parts(),
                [(r.kind, r.address, r.count, r.points) for r in self.plan],
            )
        )
        parts, plan = marshal.loads(data)  # noqa: S302  # nosec B302  # our own bytes, above
        parts[0][:] = map(sys.intern, parts[0])  # devices of one model share their names
        self._points = PointTable.from_parts(parts)
        self.plan = [ReadRequest(k, a, c, shared_indexes(p)) for k, a, c, p in plan]
        self._config = fresh_copy(self._config)
        self.name = self._config.name
        self._device = f"{self.name} ({self._config.describe()})"
        self.state.since = fresh_copy(self.state.since)
        self._reads.clear()

    async def run(self, emit: Emit) -> None:
        link = self._links.acquire(self._config)
        log.info(
            "Modbus source started device=%s unit=%d link=%s points=%d requests=%d",
            self.name, self._unit, link.settings.where, len(self._points), len(self.plan),
        )  # fmt: skip
        try:
            await self._loop(link, emit)
        finally:
            self._links.release(self._config, link)

    async def _loop(self, link: ModbusLink, emit: Emit) -> None:
        async for _ in ticks(self._config.poll_interval):  # an overrun skips ticks, no burst
            try:
                readings = await self.poll(link)
            except Exception as exc:  # a bug must not stop the daemon: log it, carry on
                log.exception("Modbus poll failed unexpectedly device=%s", self.name)
                self._set_down(f"internal error: {exc!r}")
                readings = []
            if readings:
                await emit(readings)
                self.state.readings += len(readings)

    async def poll(self, link: ModbusLink) -> list[Reading]:
        """One pass over the plan; the readings worth sending (see deadband)."""
        await link.settle(self._unit)  # after a failed RTU exchange: one timeout of quiet first
        ts_ns = time.time_ns()
        now = asyncio.get_running_loop().time()
        out: list[Reading] = []
        answered = skip = False
        unreachable: ReadError | None = None
        failures: list[str] = []
        i = 0
        while i < len(self.plan):
            request = self.plan[i]
            if skip:
                self._bad(request, ts_ns, now, out)
                i += 1
                continue
            self.state.counts["requests"] += 1
            try:
                data = await link.read_data(
                    request, unit=self._unit, wait=self._config.timeout, device=self._device
                )
            except ReadError as exc:
                self.state.counts[exc.reason] += 1
                if isinstance(exc, ReadTimeoutError | LinkDownError):
                    unreachable, skip = exc, True
                else:  # it answered, if not with this read's values
                    answered = True
                    refused = isinstance(exc, ExceptionReplyError) and exc.code == 2
                    if refused and self._split(i, request):
                        continue  # retry at once with the smaller reads
                    self._note_fault(request, str(exc))
                    skip = exc.desync
                failures.append(str(exc))
                self._bad(request, ts_ns, now, out)
                i += 1
                continue
            answered = True
            self._note_recovery(request)
            failures += self._take(request, data, ts_ns, now, out)
            i += 1
        self._note_discarded(link.take_discarded(self._unit), answered)
        self.state.errors += len(failures)
        if answered:
            self._set_up(failures)
        elif unreachable is not None:
            self._set_down(str(unreachable))
        return out

    def _compiled(self, request: ReadRequest) -> _Read:
        read = self._reads.get(request)
        if read is None:
            read = self._reads[request] = _Read(
                decoder_of(request, self._points),
                tuple(map(self._points.names.__getitem__, request.points)),
                any(i in self._filters for i in request.points),
            )
        return read

    def _take(
        self, request: ReadRequest, data: bytes, ts_ns: int, now: float, out: list[Reading]
    ) -> list[str]:
        """The points of an answered read into `out`: good values, or bad where the value rules
        refuse them; returns a failure message per refused value."""
        read = self._compiled(request)
        values = read.decoder.decode(data)
        refused = read.decoder.may_refuse and any(type(v) is DecodeError for v in values)
        if not (refused or read.filtered or self._bad_sent or self._point_faults):
            # Every value good and sent: the readings are built in C, without a call per point.
            out.extend(map(_tuple_new, repeat(Reading), zip(
                repeat(self.name), read.names, repeat(ts_ns), values, repeat(Quality.GOOD),
                repeat(None),
            )))  # fmt: skip
            return []
        return self._take_each(request.points, values, ts_ns, now, out)

    def _take_each(
        self,
        indexes: Iterable[int],
        values: list[Value | DecodeError],
        ts_ns: int,
        now: float,
        out: list[Reading],
    ) -> list[str]:
        """`_take` point by point: refused values, deadbands, points recovering from bad."""
        failures: list[str] = []
        for index, value in zip(indexes, values, strict=True):
            if isinstance(value, DecodeError):
                self.state.counts["rejected"] += 1
                self._note_point_fault(index, str(value))
                self._bad_point(index, ts_ns, now, out)
                failures.append(f"{self._device}: point {self._points.names[index]}: {value}")
                continue
            self._note_point_recovery(index)
            filt = self._filters.get(index)
            if filt is None:
                self._bad_sent.pop(index, None)
            elif not filt.admit(value, Quality.GOOD, now):
                continue
            out.append(Reading(self.name, self._points.names[index], ts_ns, value, Quality.GOOD))
        return failures

    def _split(self, index: int, request: ReadRequest) -> bool:
        """Replace a bridging read refused with exception 2 by smaller ones; False if it can't."""
        smaller = split(request, self._points)
        if len(smaller) <= 1:
            return False
        self.plan[index : index + 1] = smaller
        self._reads.pop(request, None)
        log.warning(
            "Modbus device refused a coalesced read (exception 2, illegal data address); "
            "reading its points separately from now on device=%s unit=%d read=%s requests=%d",
            self.name, self._unit, request.describe(), len(smaller),
        )  # fmt: skip
        return True

    def _bad(self, request: ReadRequest, ts_ns: int, now: float, out: list[Reading]) -> None:
        for index in request.points:
            self._bad_point(index, ts_ns, now, out)

    def _bad_point(self, index: int, ts_ns: int, now: float, out: list[Reading]) -> None:
        """A bad reading for the point when it turns bad, then once per heartbeat."""
        filt = self._filters.get(index)
        if filt is None:
            sent = self._bad_sent.get(index)
            if sent is not None and now - sent < self._bad_heartbeat(index):
                return
            self._bad_sent[index] = now
        elif not filt.admit(None, Quality.BAD, now):
            return
        out.append(Reading(self.name, self._points.names[index], ts_ns, None, Quality.BAD))

    def _bad_heartbeat(self, index: int) -> float:
        """How often a bad point without a deadband is sent again (as ReportFilter would)."""
        heartbeat = self._points[index].heartbeat or self._config.heartbeat
        return max(heartbeat - self._slack, 0.0)

    def _note_fault(self, request: ReadRequest, error: str) -> None:
        key = (request.kind, request.address, request.count)
        previous, count = self._read_faults.get(key, ("", 0))
        if error != previous:
            log.warning("Modbus read failed device=%s unit=%d read=%s error=%s",
                        self.name, self._unit, request.describe(), error)  # fmt: skip
        self._read_faults[key] = (error, count + 1)

    def _note_recovery(self, request: ReadRequest) -> None:
        fault = self._read_faults.pop((request.kind, request.address, request.count), None)
        if fault is not None:
            log.info("Modbus read recovered device=%s unit=%d read=%s failed_polls=%d",
                     self.name, self._unit, request.describe(), fault[1])  # fmt: skip

    def _note_point_fault(self, index: int, error: str) -> None:
        """A value refused by edge_agent.reading: logged when it starts or its reason changes."""
        previous, count = self._point_faults.get(index, ("", 0))
        if error != previous:
            log.warning("Modbus point value rejected device=%s unit=%d point=%s error=%s",
                        self.name, self._unit, self._points.names[index], error)  # fmt: skip
        self._point_faults[index] = (error, count + 1)

    def _note_point_recovery(self, index: int) -> None:
        fault = self._point_faults.pop(index, None) if self._point_faults else None
        if fault is not None:
            log.info("Modbus point value recovered device=%s unit=%d point=%s failed_polls=%d",
                     self.name, self._unit, self._points.names[index], fault[1])  # fmt: skip

    def _note_discarded(self, discarded: dict[str, tuple[int, str]], answered: bool) -> None:
        """Count what the link threw away for this unit; log when it starts and when it stops."""
        for kind, (count, detail) in discarded.items():
            self.state.counts[kind] += count
            if kind in self._discarding:
                self._discarding[kind] += count
                continue
            self._discarding[kind] = count
            log.warning("Modbus %s device=%s unit=%d link=%s detail=%s",
                        DISCARD_TEXT.get(kind, kind), self.name, self._unit,
                        self._config.link_key[1], detail)  # fmt: skip
        if not answered:
            return
        for kind in [k for k in self._discarding if k not in discarded]:
            log.info("Modbus line clean again device=%s unit=%d kind=%s discarded=%d",
                     self.name, self._unit, kind, self._discarding.pop(kind))  # fmt: skip

    def _set_up(self, failures: list[str]) -> None:
        """The unit answered; last_error keeps the first partial failure, if any."""
        error = failures[0] if failures else None
        if not self.state.up:
            self.state.up, self.state.since = True, time.time()
            log.info("Modbus device up device=%s unit=%d link=%s",
                     self.name, self._unit, self._config.link_key[1])  # fmt: skip
        self.state.last_error = error

    def _set_down(self, error: str) -> None:
        if self.state.up or self.state.last_error != error:
            log.warning("Modbus device down device=%s unit=%d error=%s",
                        self.name, self._unit, error)  # fmt: skip
        if self.state.up:
            self.state.since = time.time()
        self.state.up, self.state.last_error = False, error
