"""Deterministic signals: the same config gives the same values, for demos, tests and benchmarks.

`signal_value` defines the signals; `SignalTable` computes a whole tick at once with the same
float operations in the same order (so the same values, bit for bit), without a call and a
config lookup per reading: the benchmark offers hundreds of thousands of readings a second.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Sequence

from edge_agent.config.simulated import SimulatedPoint, SimulatedSourceConfig
from edge_agent.reading import Quality, Reading, Value
from edge_agent.schedule import ticks
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


TWO_PI = 2 * math.pi
"""`2 * math.pi * phase` evaluates `2 * math.pi` first: the same product, computed once."""


class SignalTable:
    """The values of all points at one tick, group by group; equal to `signal_value` per point."""

    def __init__(self, points: Sequence[SimulatedPoint], interval: float) -> None:
        self._interval = interval
        self._count = len(points)
        grouped: dict[tuple[str, float], list[int]] = {}
        for index, point in enumerate(points):
            grouped.setdefault((point.signal, point.period), []).append(index)
        self._groups = [
            (
                signal,
                period,
                indices,
                [
                    (index / 17.0, points[index].offset, points[index].amplitude)
                    for index in indices
                ],
            )
            for (signal, period), indices in grouped.items()
        ]
        self._rng = random.Random()  # noqa: S311 - deterministic test signal, not crypto

    def values(self, tick: int) -> list[Value]:
        t = tick * self._interval
        if len(self._groups) == 1:
            signal, period, _, params = self._groups[0]
            return self._group(signal, period, params, indices=None, tick=tick, t=t)
        out: list[Value] = [None] * self._count
        for signal, period, indices, params in self._groups:
            computed = self._group(signal, period, params, indices=indices, tick=tick, t=t)
            for index, value in zip(indices, computed, strict=True):
                out[index] = value
        return out

    def _group(
        self,
        signal: str,
        period: float,
        params: list[tuple[float, float, float]],
        *,
        indices: list[int] | None,
        tick: int,
        t: float,
    ) -> list[Value]:
        base = t / period
        sin = math.sin
        if signal == "sine":
            return [off + amp * sin(TWO_PI * ((base + k) % 1.0)) for k, off, amp in params]
        if signal == "ramp":
            return [off + amp * ((base + k) % 1.0) for k, off, amp in params]
        if signal == "square":
            return [(base + k) % 1.0 < 0.5 for k, _, _ in params]
        if signal == "counter":
            return [tick] * len(params)
        if signal == "random":
            rng, seed = self._rng, tick * 7919
            found: list[Value] = []
            for index, (_, off, amp) in zip(indices or range(len(params)), params, strict=True):
                rng.seed(seed + index)  # as random.Random(seed + index), without a new object
                found.append(off + amp * rng.random())
            return found
        return [off for _, off, _ in params]


class SimulatedSource:
    """Yields one reading per point every interval, on a drift-free schedule."""

    def __init__(self, config: SimulatedSourceConfig) -> None:
        self.name = config.name
        self.state = SourceState()
        self._interval = config.interval
        self._points = config.point_list()
        self._table = SignalTable(self._points, self._interval)

    def readings(self, tick: int, ts_ns: int) -> list[Reading]:
        """One reading per point at `tick`, stamped `ts_ns`."""
        new, src, good = tuple.__new__, self.name, Quality.GOOD
        return [
            new(Reading, (src, point.name, ts_ns, value, good, None))
            for point, value in zip(self._points, self._table.values(tick), strict=True)
        ]

    async def run(self, emit: Emit) -> None:
        self.state.mark_up()
        # Ticks are data here (the counter signal counts them): a tick up to one interval late
        # still runs; one further behind (back-pressure) is skipped, never bunched.
        async for tick in ticks(self._interval, grace=self._interval):
            readings = self.readings(tick, time.time_ns())
            await emit(readings)
            self.state.readings += len(readings)
