"""Deterministic signals: the same config gives the same values, for demos, tests and benchmarks."""

from __future__ import annotations

import asyncio
import math
import random
import time

from edge_agent.config.simulated import SimulatedPoint, SimulatedSourceConfig
from edge_agent.reading import Quality, Reading, Value
from edge_agent.sources.base import Emit, SourceState


def signal_value(point: SimulatedPoint, tick: int, interval: float, index: int) -> Value:
    """The value of `point` at `tick`; a pure function of its arguments."""
    t = tick * interval
    phase = (t / point.period + index / 17.0) % 1.0
    if point.signal == "sine":
        return point.offset + point.amplitude * math.sin(2 * math.pi * phase)
    if point.signal == "ramp":
        return point.offset + point.amplitude * phase
    if point.signal == "square":
        return phase < 0.5
    if point.signal == "counter":
        return tick
    if point.signal == "random":
        return point.offset + point.amplitude * random.Random(tick * 7919 + index).random()  # noqa: S311
    return point.offset


class SimulatedSource:
    """Yields one reading per point every interval, on a drift-free schedule."""

    def __init__(self, config: SimulatedSourceConfig) -> None:
        self.name = config.name
        self.state = SourceState()
        self._interval = config.interval
        if isinstance(config.points, int):
            self._points = [SimulatedPoint(name=f"p{i}") for i in range(config.points)]
        else:
            self._points = list(config.points)

    async def run(self, emit: Emit) -> None:
        loop = asyncio.get_running_loop()
        start = loop.time()
        tick = 0
        self.state.mark_up()
        while True:
            ts_ns = time.time_ns()
            readings = [
                Reading(
                    self.name, p.name, ts_ns, signal_value(p, tick, self._interval, i), Quality.GOOD
                )
                for i, p in enumerate(self._points)
            ]
            await emit(readings)
            self.state.readings += len(readings)
            tick += 1
            delay = start + tick * self._interval - loop.time()
            if delay < -self._interval:  # fell behind (back-pressure): skip, don't burst
                skipped = int(-delay // self._interval)
                tick += skipped
                delay += skipped * self._interval
            await asyncio.sleep(max(delay, 0.0))
