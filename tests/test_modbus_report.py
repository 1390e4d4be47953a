"""What the Modbus commands print, without a device: the probe's table of every type and order,
its arguments, and the plan report of `check-config --plan`."""

from __future__ import annotations

import io

import pytest

from edge_agent.cli import build_parser
from edge_agent.config import parse_config
from edge_agent.sources.modbus.plan_report import print_plans
from edge_agent.sources.modbus.probe import print_registers

pytestmark = pytest.mark.unit


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


def test_probe_arguments() -> None:
    args = build_parser().parse_args(
        ["probe", "modbus", "--serial-port", "/dev/ttyUSB0", "--baudrate", "9600",
         "--parity", "N", "--unit", "7", "--register", "input", "--address", "30", "--count", "4"]
    )  # fmt: skip
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
