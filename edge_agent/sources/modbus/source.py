"""The Modbus source: one device (unit), polled on a drift-free schedule through a shared link.

Each poll runs the planned reads in order. A failure marks exactly the points of the failed read
bad (value None, the poll's timestamp), never a fabricated value:
- an exception response affects that read only; exception 2 on a read that bridged points makes
  the plan split it into smaller reads for good (logged once);
- a timeout or a lost connection means the unit is not answering: its remaining reads of this
  poll are skipped (marked bad too), so a dead unit holds a shared line for one timeout per poll.
Logs are one line per change of state (a read failing, failing differently, recovering; the
device going down or up), with the number of failures in between.
"""

from __future__ import annotations

import asyncio
import logging
import time

from edge_agent.config.modbus import ModbusSourceConfig
from edge_agent.reading import Quality, Reading
from edge_agent.sources.base import Emit, SourceState
from edge_agent.sources.modbus.deadband import ReportFilter
from edge_agent.sources.modbus.decode import DecodeError
from edge_agent.sources.modbus.link import (
    ExceptionReplyError,
    LinkDownError,
    ModbusLink,
    ReadError,
    ReadTimeoutError,
    acquire_link,
    release_link,
)
from edge_agent.sources.modbus.plan import ReadRequest, decode_response, plan_reads, split

log = logging.getLogger(__name__)

ReadKey = tuple[str, int, int]


class ModbusSource:
    """Polls one Modbus unit; `run` never raises except on cancellation."""

    def __init__(self, config: ModbusSourceConfig) -> None:
        self.name = config.name
        self.state = SourceState()
        self._config = config
        self._unit = config.unit_id
        self._points = list(config.points)
        self.plan: list[ReadRequest] = plan_reads(
            self._points,
            max_registers=config.max_registers_per_read,
            max_bits=config.max_bits_per_read,
            max_gap=config.max_gap,
        )
        slack = config.poll_interval / 2  # "at least every heartbeat", at poll granularity
        self._filters = [
            ReportFilter(p.deadband, max((p.heartbeat or config.heartbeat) - slack, 0.0))
            for p in self._points
        ]
        self._read_faults: dict[ReadKey, tuple[str, int]] = {}
        self._point_faults: dict[int, tuple[str, int]] = {}
        """Per point index: the value rule its last value broke, and how many polls in a row."""
        self._device = f"{config.name} ({config.describe()})"

    async def run(self, emit: Emit) -> None:
        link = acquire_link(self._config)
        log.info(
            "Modbus source started device=%s unit=%d link=%s points=%d requests=%d",
            self.name, self._unit, link.settings.where, len(self._points), len(self.plan),
        )  # fmt: skip
        try:
            await self._loop(link, emit)
        finally:
            release_link(self._config, link)

    async def _loop(self, link: ModbusLink, emit: Emit) -> None:
        loop = asyncio.get_running_loop()
        interval = self._config.poll_interval
        start, tick = loop.time(), 0
        while True:
            try:
                readings = await self.poll(link)
            except Exception as exc:  # a bug must not stop the daemon: log it, carry on
                log.exception("Modbus poll failed unexpectedly device=%s", self.name)
                self._set_down(f"internal error: {exc!r}")
                readings = []
            if readings:
                await emit(readings)
                self.state.readings += len(readings)
            tick += 1
            delay = start + tick * interval - loop.time()
            if delay < 0:  # the poll overran (timeouts): skip the missed ticks, don't burst
                tick += int(-delay // interval) + 1
                delay = start + tick * interval - loop.time()
            await asyncio.sleep(delay)

    async def poll(self, link: ModbusLink) -> list[Reading]:
        """One pass over the plan; the readings worth sending (see deadband)."""
        ts_ns = time.time_ns()
        now = asyncio.get_running_loop().time()
        out: list[Reading] = []
        answered = False
        unreachable: ReadError | None = None
        failures: list[str] = []
        i = 0
        while i < len(self.plan):
            request = self.plan[i]
            if unreachable is not None:
                self._bad(request, ts_ns, now, out)
                i += 1
                continue
            self.state.counts["requests"] += 1
            try:
                values = await link.read(
                    request, unit=self._unit, wait=self._config.timeout, device=self._device
                )
            except ReadError as exc:
                self.state.counts[exc.reason] += 1
                if isinstance(exc, ExceptionReplyError):
                    answered = True
                    if exc.code == 2 and self._split(i, request):
                        continue  # retry at once with the smaller reads
                if isinstance(exc, ReadTimeoutError | LinkDownError):
                    unreachable = exc
                else:
                    self._note_fault(request, str(exc))
                failures.append(str(exc))
                self._bad(request, ts_ns, now, out)
                i += 1
                continue
            answered = True
            self._note_recovery(request)
            for index, value in decode_response(request, self._points, values):
                if isinstance(value, DecodeError):
                    self.state.counts["rejected"] += 1
                    self._note_point_fault(index, str(value))
                    self._bad_point(index, ts_ns, now, out)
                    failures.append(f"{self._device}: point {self._points[index].name}: {value}")
                    continue
                self._note_point_recovery(index)
                if self._filters[index].admit(value, Quality.GOOD, now):
                    out.append(Reading(self.name, self._points[index].name, ts_ns, value,
                                       Quality.GOOD))  # fmt: skip
            i += 1
        self.state.errors += len(failures)
        if answered:
            self._set_up(failures)
        elif unreachable is not None:
            self._set_down(str(unreachable))
        return out

    def _split(self, index: int, request: ReadRequest) -> bool:
        """Replace a bridging read refused with exception 2 by smaller ones; False if it can't."""
        smaller = split(request, self._points)
        if len(smaller) <= 1:
            return False
        self.plan[index : index + 1] = smaller
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
        if self._filters[index].admit(None, Quality.BAD, now):
            out.append(Reading(self.name, self._points[index].name, ts_ns, None, Quality.BAD))

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
                        self.name, self._unit, self._points[index].name, error)  # fmt: skip
        self._point_faults[index] = (error, count + 1)

    def _note_point_recovery(self, index: int) -> None:
        fault = self._point_faults.pop(index, None) if self._point_faults else None
        if fault is not None:
            log.info("Modbus point value recovered device=%s unit=%d point=%s failed_polls=%d",
                     self.name, self._unit, self._points[index].name, fault[1])  # fmt: skip

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
