"""A small simulated Modbus TCP device for `edge-agent demo`: a motor with changing values.

Holding registers: 0-1 motor current (float32, word order little, i.e. CDAB, the commonest
"awkward" PLC layout), 2 a uint16 counter, 3 a temperature in tenths of a degree (int16),
4 status bits (bit 0 running, bit 3 alarm); 10-12 the tag "MOTOR1". Input register 0 is a
pressure in mbar (uint16). Coils 0-1: running, fan. Values are computed from the clock each time
the agent reads them, so the device needs no task of its own.
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable
from typing import Any

from pymodbus.client.mixin import ModbusClientMixin
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

_TAG = [0x4D4F, 0x544F, 0x5231]  # "MOTOR1"


def modbus_points() -> list[dict[str, Any]]:
    """The agent's `points` for this device."""
    return [
        {"name": "motor_current", "register": "holding", "address": 0, "type": "float32",
         "word_order": "little", "unit": "A", "deadband": 0.05, "heartbeat": "10s"},
        {"name": "cycle_count", "register": "holding", "address": 2, "type": "uint16"},
        {"name": "winding_temp", "register": "holding", "address": 3, "type": "int16",
         "scale": 0.1, "unit": "degC"},
        {"name": "running", "register": "holding", "address": 4, "type": "bool", "bit": 0},
        {"name": "alarm", "register": "holding", "address": 4, "type": "bool", "bit": 3},
        {"name": "motor_tag", "register": "holding", "address": 10, "type": "string",
         "length": 3},
        {"name": "pressure", "register": "input", "address": 0, "type": "uint16",
         "scale": 0.001, "unit": "bar"},
        {"name": "fan_on", "register": "coil", "address": 1, "type": "bool"},
    ]  # fmt: skip


def _holding(t: float) -> list[int]:
    current = 12.0 + 3.0 * math.sin(t / 7.0)
    words = ModbusClientMixin.convert_to_registers(
        current, ModbusClientMixin.DATATYPE.FLOAT32, word_order="little"
    )
    temp = round(650 + 80 * math.sin(t / 30.0)) & 0xFFFF
    alarm = 8 if temp > 720 else 0
    return [*words, int(t) & 0xFFFF, temp, 1 | alarm, 0, 0, 0, 0, 0, *_TAG]


async def _refresh(  # noqa: PLR0917 - the signature pymodbus calls
    function_code: int, start: int, address: int, count: int,
                   registers: list[int], values: object) -> None:  # fmt: skip
    """SimDevice action: recompute the block just before each read is answered."""
    t = time.time()
    if function_code == 3:
        block = _holding(t)
        registers[: len(block)] = block
    elif function_code == 4:
        registers[0] = int(1013 + 200 * math.sin(t / 11.0))


async def start_modbus_device(
    host: str = "127.0.0.1", port: int = 0, unit: int = 1
) -> tuple[int, Callable[[], Awaitable[None]]]:
    """Serve the device; returns the bound port and a coroutine function that stops it."""
    device = SimDevice(
        id=unit,
        simdata=(
            [SimData(0, values=[True, True], datatype=DataType.BITS)],
            [SimData(0, values=[False], datatype=DataType.BITS)],
            [SimData(0, values=_holding(time.time()), datatype=DataType.REGISTERS)],
            [SimData(0, values=[1013], datatype=DataType.REGISTERS)],
        ),
        action=_refresh,
    )
    server: Any = ModbusTcpServer([device], address=(host, port))
    await server.serve_forever(background=True)
    bound = int(server.transport.sockets[0].getsockname()[1])

    async def stop() -> None:
        await server.shutdown()

    return bound, stop
