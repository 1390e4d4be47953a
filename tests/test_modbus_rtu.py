"""RTU over a real serial line: a socat PTY pair, three units on one bus, one of them dead.

(How units on one port share its link, without a line: test_modbus_link_sharing.py.)"""

from __future__ import annotations

import asyncio
import shutil

import pytest
from helpers.modbus_devices import TestUnit, serial_server, socat_pty_pair
from helpers.modbus_sources import rtu_config, running

from edge_agent.reading import Quality

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(30),
    pytest.mark.skipif(shutil.which("socat") is None, reason="socat is not installed"),
]


async def test_three_units_on_one_line_and_a_dead_one_blocks_nobody() -> None:
    units = [TestUnit(u, holding={0: [0x42F6, 0xE979]}, input={5: [u * 100]}) for u in (1, 2, 3)]
    with socat_pty_pair() as (device_end, agent_end):
        async with serial_server(device_end, *units) as server:
            configs = [rtu_config(agent_end, u.unit) for u in units]
            async with running(*configs) as polls:
                for unit, poll in zip(units, polls, strict=True):
                    batch = await poll.next()
                    assert batch["level"].value == 123.456
                    assert batch["count"].value == unit.unit * 100
                units[2].set_silent(True)  # unit 3 dies
                await polls[2].until(lambda b: b["level"].quality == Quality.BAD)
                loop = asyncio.get_running_loop()
                started = loop.time()
                for _ in range(4):
                    for index in (0, 1):
                        batch = await polls[index].next()
                        assert batch["level"].quality == Quality.GOOD
                # each 100ms poll costs at most one 150ms timeout of unit 3 on the line
                assert loop.time() - started < 4 * (0.1 + 0.15) + 0.5
                state = polls[2].source.state
                assert not state.up
                assert state.last_error is not None
                assert "unit 3 holding 0..1 (2 registers): no answer within 0.15s" in (
                    state.last_error
                )
                assert polls[0].source.state.up and polls[1].source.state.up
                units[2].set_silent(False)
                await polls[2].until(lambda b: b["level"].quality == Quality.GOOD)
        # strictly one request at a time: the server saw whole frames for all three units
        assert {unit for unit, *_ in server.requests} == {1, 2, 3}
