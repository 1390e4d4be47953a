"""The simulated source's fast path gives exactly the values `signal_value` defines."""

from __future__ import annotations

import struct

import pytest

from edge_agent.config.simulated import SimulatedPoint, SimulatedSourceConfig
from edge_agent.reading import Quality, Reading
from edge_agent.sources.simulated import SignalTable, SimulatedSource, signal_value

pytestmark = pytest.mark.unit


def exact(value: object) -> object:
    """Floats by their bits (so -0.0 != 0.0 and any rounding difference shows), others as is."""
    return (float, struct.pack(">d", value)) if isinstance(value, float) else (type(value), value)


MIXED = [
    SimulatedPoint(name="a"),
    SimulatedPoint(name="b", signal="ramp", period=7.5, amplitude=3.0, offset=-1.0),
    SimulatedPoint(name="c", signal="square", period=2.0),
    SimulatedPoint(name="d", signal="counter"),
    SimulatedPoint(name="e", signal="random", amplitude=10.0, offset=5.0),
    SimulatedPoint(name="f", signal="constant", offset=42.5),
    SimulatedPoint(name="g", signal="sine", period=0.3, amplitude=2.0, offset=1.0),
    SimulatedPoint(name="h", signal="random"),
    SimulatedPoint(name="i", signal="sine", period=60.0, amplitude=-1.5),
]


def test_table_matches_signal_value_bit_for_bit() -> None:
    for interval in (0.1, 0.013, 1.0):
        table = SignalTable(MIXED, interval)
        for tick in [*range(200), 10**6 + 7, 2**31]:
            expected = [exact(signal_value(p, tick, interval, i)) for i, p in enumerate(MIXED)]
            assert [exact(v) for v in table.values(tick)] == expected, (interval, tick)


def test_one_group_of_many_points_matches() -> None:
    points = [SimulatedPoint(name=f"p{i}") for i in range(500)]
    table = SignalTable(points, 0.1)
    for tick in (0, 1, 599, 600, 12345):
        expected = [exact(signal_value(p, tick, 0.1, i)) for i, p in enumerate(points)]
        assert [exact(v) for v in table.values(tick)] == expected


def test_readings_are_plain_readings() -> None:
    source = SimulatedSource(
        SimulatedSourceConfig(type="simulated", name="sim", interval=0.1, points=MIXED)
    )
    readings = source.readings(3, 123)
    assert all(type(r) is Reading for r in readings)
    assert readings[0] == Reading("sim", "a", 123, signal_value(MIXED[0], 3, 0.1, 0), Quality.GOOD)
    assert [r.pt for r in readings] == [p.name for p in MIXED]
    assert all(r.code is None and r.quality is Quality.GOOD for r in readings)
