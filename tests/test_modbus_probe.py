"""The probe, the plan report, and the read-only guarantee across a whole Modbus session."""

from __future__ import annotations

import argparse
import asyncio
import io
import sys
from typing import Any

import pytest
from modbus_devices import WRITE_CODES, TestUnit, tcp_server
from test_modbus_source import MOTOR_POINTS, motor_unit, running, source_config

from edge_agent.cli import build_parser
from edge_agent.config import parse_config
from edge_agent.sources.modbus.plan_report import print_plans
from edge_agent.sources.modbus.probe import print_registers

pytestmark = pytest.mark.timeout(30)


def test_probe_table_puts_a_known_value_under_its_order() -> None:
    out = io.StringIO()
    print_registers(100, [0xE979, 0x42F6, 0x4142, 0x4344], out)
    text = out.getvalue()
    float_row = next(line for line in text.splitlines() if line.strip().startswith("100")
                     and "123.456" in line)  # fmt: skip
    header = next(line for line in text.splitlines() if line.strip().startswith("float32"))
    # 123.456 sits in the CDAB column of the float32 table
    assert float_row.index("123.456") + len("123.456") == header.index("CDAB") + len("CDAB")
    assert " string ABCD: 'y\\x00'" not in text  # garbage is not passed off as text
    assert "CDAB = byte_order: big, word_order: little" in text


async def test_probe_command_reads_a_real_device() -> None:
    unit = TestUnit(1, holding={100: [0xE979, 0x42F6]})
    async with tcp_server(unit) as server:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "edge_agent", "probe", "modbus", "--host", "127.0.0.1",
            "--port", str(server.port), "--address", "100", "--count", "2",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        stdout, stderr = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 0, stderr.decode()
    assert "123.456" in stdout.decode()
    assert {code for _, code, *_ in server.requests} == {3}


def test_probe_arguments() -> None:
    args = build_parser().parse_args(
        ["probe", "modbus", "--serial-port", "/dev/ttyUSB0", "--baudrate", "9600",
         "--parity", "N", "--unit", "7", "--register", "input", "--address", "30", "--count", "4"]
    )  # fmt: skip
    assert isinstance(args, argparse.Namespace)
    assert (args.serial_port, args.baudrate, args.parity, args.unit) == (
        "/dev/ttyUSB0",
        9600,
        "N",
        7,
    )


PLAN_CONFIG = """
gateway: {id: gw}
sources:
  - type: modbus
    name: crusher
    host: 10.0.0.5
    max_gap: 4
    max_registers_per_read: 60
    points:
      - {name: a, register: holding, address: 0, type: float32}
      - {name: b, register: holding, address: 4, type: uint16}
      - {name: c, register: holding, address: 40, type: string, length: 30}
      - {name: d, register: coil, address: 7, type: bool}
      - {name: e, register: coil, address: 9, type: bool}
"""


def test_check_config_plan_lists_requests_per_device() -> None:
    out = io.StringIO()
    print_plans(parse_config(PLAN_CONFIG), out)
    assert out.getvalue().splitlines()[1:] == [
        "crusher (tcp 10.0.0.5:502 unit 1), every 1s: 5 points in 3 requests per poll "
        "(5 without coalescing; max_gap 4, max 60 registers / 2000 bits)",
        "  FC1 coil 7..9 (3 bits), 1 unused: d, e",
        "  FC3 holding 0..4 (5 registers), 2 unused: a, b",
        "  FC3 holding 40..69 (30 registers): c",
    ]


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
        assert await asyncio.wait_for(proc.wait(), 20) == 0
    codes = {code for _, code, *_ in server.requests}
    assert codes <= {1, 2, 3, 4} and codes == {1, 2, 3, 4}
    assert not WRITE_CODES & codes
