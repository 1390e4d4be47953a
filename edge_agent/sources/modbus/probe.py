"""`edge-agent probe modbus`: read one block and show it under every type and byte order.

The commonest Modbus question is "which byte order?". An engineer who knows what the HMI shows
(say 123.4 A) reads the block once and finds that number in the table: its row is the address,
its column the order, which the footer translates into byte_order and word_order settings.
Decoding goes through the agent's own decoder, so what the probe shows is what the agent sends.
The probe only reads (function codes 1-4), like the agent.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from typing import TextIO

from edge_agent.config.modbus import ModbusSourceConfig
from edge_agent.sources.modbus.decode import ORDERS, DecodeError, decode_registers
from edge_agent.sources.modbus.link import LinkPool, ReadError
from edge_agent.sources.modbus.plan import ReadRequest

WIDE_TYPES = ("int32", "uint32", "float32", "int64", "uint64", "float64")


def run_probe(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    """Read the block and print the table; 0 on success, 1 when the device did not answer."""
    if not args.host and not args.serial_port:
        print("probe modbus: give --host (TCP) or --serial-port (RTU)", file=sys.stderr)
        return 2
    kind = args.register
    limit = 2000 if kind in ("coil", "discrete") else 125
    if not 1 <= args.count <= limit:
        print(f"probe modbus: --count must be 1..{limit} for {kind}", file=sys.stderr)
        return 2
    config = ModbusSourceConfig.model_validate({
        "type": "modbus", "name": "probe",
        "transport": "rtu" if args.serial_port else "tcp",
        "host": args.host, "port": args.port, "serial_port": args.serial_port,
        "baudrate": args.baudrate, "parity": args.parity, "stopbits": args.stopbits,
        "unit_id": args.unit, "timeout": args.timeout,
        "points": [{"name": "block", "register": kind, "address": args.address,
                    "type": "bool" if kind in ("coil", "discrete") else "uint16"}],
    })  # fmt: skip
    request = ReadRequest(kind, args.address, args.count, ())
    try:
        values = asyncio.run(_read(config, request))
    except ReadError as exc:
        print(f"probe modbus: {exc}", file=sys.stderr)
        return 1
    print(f"{config.describe()}: {request.describe()}", file=out)
    if kind in ("coil", "discrete"):
        print_bits(args.address, [bool(v) for v in values], out)
    else:
        print_registers(args.address, [int(v) for v in values], out)
    return 0


async def _read(config: ModbusSourceConfig, request: ReadRequest) -> Sequence[int | bool]:
    links = LinkPool()
    link = links.acquire(config)
    try:
        return list(await link.read(request, unit=config.unit_id, wait=config.timeout,
                                    device=config.describe()))  # fmt: skip
    finally:
        links.release(config, link)


def print_bits(address: int, bits: list[bool], out: TextIO) -> None:
    for start in range(0, len(bits), 16):
        row = " ".join("1" if b else "0" for b in bits[start : start + 16])
        print(f"{address + start:>6}  {row}", file=out)


def print_registers(address: int, registers: list[int], out: TextIO) -> None:
    """The raw block, then every wide type at every start address under the four orders."""
    print(f"\n{'address':>7}  {'hex':>6}  {'uint16 AB':>10}  {'int16 AB':>9}  "
          f"{'uint16 BA':>10}  {'int16 BA':>9}  text", file=out)  # fmt: skip
    for offset, reg in enumerate(registers):
        swapped = ((reg & 0xFF) << 8) | (reg >> 8)
        text = "".join(chr(b) if 32 <= b < 127 else "." for b in reg.to_bytes(2, "big"))
        print(f"{address + offset:>7}  0x{reg:04X}  {reg:>10}  {_signed(reg):>9}  "
              f"{swapped:>10}  {_signed(swapped):>9}  {text}", file=out)  # fmt: skip
    for type_ in WIDE_TYPES:
        width = 2 if type_.endswith("32") else 4
        if len(registers) < width:
            continue
        print(f"\n{type_:>7}  " + "  ".join(f"{name:>22}" for name in ORDERS), file=out)
        for offset in range(len(registers) - width + 1):
            regs = registers[offset : offset + width]
            cells = [_cell(regs, type_, *orders) for orders in ORDERS.values()]
            print(f"{address + offset:>7}  " + "  ".join(f"{c:>22}" for c in cells), file=out)
    print(file=out)
    for name, orders in ORDERS.items():
        print(f" string {name}: {_cell(registers, 'string', *orders)}", file=out)
    print(file=out)
    for name, (byte_order, word_order) in ORDERS.items():
        print(f"{name} = byte_order: {byte_order}, word_order: {word_order}", file=out)


def _signed(value: int) -> int:
    return value - 0x10000 if value & 0x8000 else value


def _cell(registers: list[int], type_: str, byte_order: str, word_order: str) -> str:
    try:
        value = decode_registers(registers, type_, byte_order, word_order)  # type: ignore[arg-type]
    except DecodeError:
        return "nan/inf" if "float" in type_ else "(not UTF-8 text)"
    if isinstance(value, float):
        return f"{value:.6g}"
    return repr(value) if isinstance(value, str) else str(value)
