"""The probe command against a real device, and the read-only guarantee across a whole Modbus
session (what the commands print without a device: test_modbus_report.py)."""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import pytest
from helpers.modbus_devices import MOTOR_POINTS, TestUnit, motor_unit, tcp_server
from helpers.modbus_sources import running, source_config
from helpers.wait import deadline

pytestmark = [pytest.mark.integration, pytest.mark.timeout(30)]


async def test_probe_command_reads_a_real_device() -> None:
    unit = TestUnit(1, holding={100: [0xE979, 0x42F6]})
    async with tcp_server(unit) as server:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "edge_agent", "probe", "modbus", "--host", "127.0.0.1",
            "--port", str(server.port), "--address", "100", "--count", "2",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        async with deadline(20, "the probe command to finish"):
            stdout, stderr = await proc.communicate()
    assert proc.returncode == 0, stderr.decode()
    assert "123.456" in stdout.decode()
    assert {code for _, code, *_ in server.requests} == {3}


async def test_a_whole_session_sends_only_read_function_codes() -> None:
    """Values, faults, the fallback split, reconnects and the probe: only codes 1-4 arrive."""
    unit = motor_unit()
    sparse = TestUnit(2, holding={0: [1], 9: [2]})
    extra: list[dict[str, Any]] = [{"name": "x", "register": "holding", "address": 0},
                                   {"name": "y", "register": "holding", "address": 9}]  # fmt: skip
    async with tcp_server(unit, sparse) as server:
        configs = [source_config(server.port, MOTOR_POINTS),
                   source_config(server.port, extra, name="sparse", unit_id=2)]  # fmt: skip
        async with running(*configs) as (polls, sparse_polls):
            await polls.next()
            await sparse_polls.until(lambda b: b["x"].value == 1 and b["y"].value == 2)
            unit.exceptions[3] = 4
            await polls.until(lambda b: "current" in b and b["current"].value is None)
            unit.exceptions.clear()
            unit.set_silent(True)
            await polls.until(lambda b: b["c0"].value is None)
            unit.set_silent(False)
            await polls.until(lambda b: b.get("c0") and b["c0"].value is True)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "edge_agent", "probe", "modbus", "--host", "127.0.0.1",
            "--port", str(server.port), "--register", "coil", "--address", "0", "--count", "3",
            stdout=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        async with deadline(20, "the probe command to finish"):
            assert await proc.wait() == 0
    assert {code for _, code, *_ in server.requests} == {1, 2, 3, 4}
