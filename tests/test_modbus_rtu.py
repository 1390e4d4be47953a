"""RTU over a real serial line: a socat PTY pair, three units on one bus, one of them dead."""

from __future__ import annotations

import asyncio
import shutil

import pytest
from modbus_devices import TestUnit, serial_server, socat_pty_pair
from test_modbus_source import running

from edge_agent.config.modbus import ModbusSourceConfig
from edge_agent.reading import Quality
from edge_agent.sources.modbus.link import LinkPool, LinkSettings

pytestmark = [
    pytest.mark.timeout(30),
    pytest.mark.skipif(shutil.which("socat") is None, reason="socat is not installed"),
]


def rtu_config(pty: str, unit: int) -> ModbusSourceConfig:
    return ModbusSourceConfig.model_validate({
        "type": "modbus", "name": f"unit{unit}", "transport": "rtu", "serial_port": pty,
        "baudrate": 115200, "parity": "N", "unit_id": unit, "poll_interval": "100ms",
        "timeout": "150ms", "points": [
            {"name": "level", "register": "holding", "address": 0, "type": "float32"},
            {"name": "count", "register": "input", "address": 5, "type": "uint16"},
        ],
    })  # fmt: skip


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


async def test_units_on_one_port_share_one_link_with_the_inter_frame_silence() -> None:
    one, two = rtu_config("/dev/ttyUSB9", 1), rtu_config("/dev/ttyUSB9", 2)
    links = LinkPool()
    link = links.acquire(one)
    try:
        assert links.acquire(two) is link
        links.release(two, link)
    finally:
        links.release(one, link)
    again = links.acquire(one)
    assert again is not link  # the last user closed it; a new one opens afresh
    links.release(one, again)
    # 3.5 characters of 10 bits at 9600 baud; a fixed 1.75ms above 19200 baud
    slow = LinkSettings.of(one.model_copy(update={"baudrate": 9600}))
    assert slow.silence == pytest.approx(3.5 * 10 / 9600)
    assert LinkSettings.of(one).silence == pytest.approx(0.00175)
