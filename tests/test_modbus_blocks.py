"""A source whose points are written as blocks (`count`) against a real pymodbus device: the same
requests and the same readings as the same points written out one by one.

(Expansion, its problems and its bounds, without a device: test_config_blocks.py.)
"""

from __future__ import annotations

import struct
from typing import Any

import pytest
from helpers.modbus_devices import TestUnit, tcp_server
from helpers.modbus_sources import running, source_config

from edge_agent.reading import Quality

pytestmark = [pytest.mark.integration, pytest.mark.timeout(30)]


def float_registers(values: list[float]) -> list[int]:
    """float32 values as registers, low word first (word_order little)."""
    out = []
    for value in values:
        high, low = struct.unpack(">HH", struct.pack(">f", value))
        out += [low, high]
    return out


FLOWS = [round(0.25 * i - 3.0, 2) for i in range(50)]


def plant_unit() -> TestUnit:
    """50 float32 at holding 0-99, 150 uint16 at 100-249, 100 int16 inputs, 40 coils."""
    return TestUnit(
        holding={0: float_registers(FLOWS) + [(i * 977) & 0xFFFF for i in range(150)]},
        input={0: [(-i * 131) & 0xFFFF for i in range(100)]},
        coils={0: [i % 3 == 0 for i in range(40)]},
    )


BLOCKS: list[dict[str, Any]] = [
    {"name": "ft{n:02}", "register": "holding", "address": 0, "type": "float32",
     "word_order": "little", "count": 50},
    {"name": "hr{address}", "register": "holding", "address": 100, "count": 50, "stride": 3},
    {"name": "tt{n:03}", "register": "input", "address": 0, "type": "int16", "scale": 0.1,
     "count": 100, "n_from": 0},
    {"name": "q{n}", "register": "coil", "address": 0, "type": "bool", "count": 40},
]  # fmt: skip

WRITTEN_OUT: list[dict[str, Any]] = (
    [{"name": f"ft{n:02}", "register": "holding", "address": 2 * (n - 1), "type": "float32",
      "word_order": "little"} for n in range(1, 51)]
    + [{"name": f"hr{a}", "register": "holding", "address": a} for a in range(100, 250, 3)]
    + [{"name": f"tt{n:03}", "register": "input", "address": n, "type": "int16", "scale": 0.1}
       for n in range(100)]
    + [{"name": f"q{n}", "register": "coil", "address": n - 1, "type": "bool"}
       for n in range(1, 41)]
)  # fmt: skip


async def test_a_block_source_reads_what_the_written_out_source_reads() -> None:
    async with tcp_server(plant_unit()) as server:
        async with running(source_config(server.port, BLOCKS, name="blocks")) as (polls,):
            from_blocks = await polls.next()
            block_plan = polls.source.plan
        block_requests = list(server.requests)
        server.requests.clear()
        async with running(source_config(server.port, WRITTEN_OUT, name="points")) as (polls,):
            written = await polls.next()
            written_plan = polls.source.plan
        written_requests = list(server.requests)

    assert len(from_blocks) == 240
    assert {n: (r.value, r.quality) for n, r in from_blocks.items()} == {
        n: (r.value, r.quality) for n, r in written.items()
    }
    assert {r.quality for r in from_blocks.values()} == {Quality.GOOD}
    assert [from_blocks[f"ft{n:02}"].value for n in range(1, 51)] == FLOWS
    assert from_blocks["hr103"].value == 3 * 977
    assert from_blocks["tt001"].value == pytest.approx(-13.1)
    assert [from_blocks[f"q{n}"].value for n in (1, 2, 4)] == [True, False, True]
    assert block_plan == written_plan
    poll = len(block_plan)
    assert block_requests[:poll] == written_requests[:poll]
