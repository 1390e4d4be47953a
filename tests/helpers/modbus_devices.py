"""Real Modbus devices for the tests: pymodbus servers over TCP and over a socat PTY pair.

`TestUnit` describes one unit: register maps (unmapped addresses answer exception 2), and
switches a test flips to make it answer an exception code or stop answering. Every server
records the function codes it receives in RECEIVED_CODES, and its context manager asserts on
exit that no write function code ever arrived (docs/contract.md §5), so every Modbus test checks it.
`motor_unit` and `MOTOR_POINTS` are one device with every table and type, and the points to read it.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import selectors
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from pymodbus.constants import ExcCodes
from pymodbus.framer import FramerType
from pymodbus.server import ModbusSerialServer, ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

WRITE_CODES = frozenset({5, 6, 15, 16, 22, 23})
RECEIVED_CODES: list[int] = []
"""Every function code any test device in this process received."""

_TABLE_OF_CODE = {1: "coils", 2: "discrete", 3: "holding", 4: "input"}


@dataclass
class TestUnit:
    """One simulated unit; maps are {first address: [values...]} blocks."""

    __test__ = False  # not a pytest class

    unit: int = 1
    holding: dict[int, list[int]] = field(default_factory=dict)
    input: dict[int, list[int]] = field(default_factory=dict)
    coils: dict[int, list[bool]] = field(default_factory=dict)
    discrete: dict[int, list[bool]] = field(default_factory=dict)
    exceptions: dict[int, int] = field(default_factory=dict)
    """Function code -> exception code the unit answers reads of that table with."""
    silent: bool = False
    """When set, requests get no answer at all (a dead or unplugged unit)."""
    _pending: dict[tuple[str, int], int] = field(default_factory=dict)
    _wake: asyncio.Event = field(default_factory=asyncio.Event)

    def set_register(self, table: str, address: int, value: int) -> None:
        """Change a holding or input register; applied before the next read is answered."""
        self._pending[(table, address)] = value

    def set_silent(self, silent: bool) -> None:
        """A silent unit drops requests; the dropped ones stay unanswered even after it wakes."""
        self.silent = silent

    def release(self) -> None:
        """Let dropped requests finish when the server stops (they send nothing useful)."""
        self._wake.set()

    def sim_device(self) -> SimDevice:
        def registers(blocks: dict[int, list[int]]) -> list[SimData]:
            return [
                SimData(a, values=list(v), datatype=DataType.REGISTERS)
                for a, v in sorted(blocks.items())
            ] or [_UNUSED]

        def bits(blocks: dict[int, list[bool]]) -> list[SimData]:
            return [
                SimData(a, values=list(v), datatype=DataType.BITS)
                for a, v in sorted(blocks.items())
            ] or [_UNUSED_BITS]

        return SimDevice(
            id=self.unit,
            simdata=(
                bits(self.coils),
                bits(self.discrete),
                registers(self.holding),
                registers(self.input),
            ),
            action=self._action,
        )

    async def _action(
        self,
        function_code: int,
        start: int,
        address: int,
        count: int,
        registers: list[int],
        values: object,
    ) -> ExcCodes | None:
        table = _TABLE_OF_CODE.get(function_code)
        for (name, at), value in list(self._pending.items()):
            if name == table:
                registers[at - start] = value
                del self._pending[(name, at)]
        if self.silent:
            # pymodbus' server would answer a late reply with the id of the newest request,
            # so a dropped request is held until shutdown rather than answered late.
            await self._wake.wait()
            return ExcCodes.DEVICE_BUSY
        if function_code in self.exceptions:
            return ExcCodes(self.exceptions[function_code])
        return None


_UNUSED = SimData(60000, datatype=DataType.INVALID)
_UNUSED_BITS = SimData(60000, values=[False], datatype=DataType.BITS)


def motor_unit(unit: int = 1) -> TestUnit:
    """A motor drive's map: every table, and every type MOTOR_POINTS reads from it."""
    return TestUnit(
        unit,
        holding={0: [0xE979, 0x42F6, 42, 0xFF83]  # float32 CDAB 123.456, uint16, int16 -125
                 + [0] * 6 + [0x5055, 0x4D50, 0x3100]  # 10: "PUMP1"
                 + [0] * 7 + [0b1000]},                # 20: bit 3 set
        input={0: [0xFFFF, 0xFFFE]},                # int32 -2
        coils={0: [True, False, True]},
        discrete={0: [True]},
    )  # fmt: skip


MOTOR_POINTS: list[dict[str, Any]] = [
    {"name": "current", "register": "holding", "address": 0, "type": "float32",
     "word_order": "little", "unit": "A"},
    {"name": "counter", "register": "holding", "address": 2, "type": "uint16"},
    {"name": "temp", "register": "holding", "address": 3, "type": "int16", "scale": 0.1},
    {"name": "tag", "register": "holding", "address": 10, "type": "string", "length": 3},
    {"name": "running", "register": "holding", "address": 20, "type": "bool", "bit": 3},
    {"name": "power", "register": "input", "address": 0, "type": "int32"},
    {"name": "c0", "register": "coil", "address": 0, "type": "bool"},
    {"name": "c2", "register": "coil", "address": 2, "type": "bool"},
    {"name": "door", "register": "discrete", "address": 0, "type": "bool"},
]  # fmt: skip
"""The points of `motor_unit`, one per table and type; read in four requests."""


@dataclass
class RunningServer:
    server: ModbusTcpServer | ModbusSerialServer
    port: int = 0
    codes: list[int] = field(default_factory=list)
    requests: list[tuple[int, int, int, int]] = field(default_factory=list)
    """(unit, function code, address, count) of every request received."""
    connections: int = 0


def _tracer(running: RunningServer):  # type: ignore[no-untyped-def]
    def trace_pdu(sending: bool, pdu):  # type: ignore[no-untyped-def]
        if not sending:
            running.codes.append(pdu.function_code)
            running.requests.append(
                (
                    pdu.dev_id,
                    pdu.function_code,
                    getattr(pdu, "address", -1),
                    getattr(pdu, "count", -1),
                )
            )
            RECEIVED_CODES.append(pdu.function_code)
        return pdu

    def trace_connect(connected: bool) -> None:
        if connected:
            running.connections += 1

    return trace_pdu, trace_connect


@contextlib.asynccontextmanager
async def tcp_server(
    *units: TestUnit, port: int = 0, mangle: Callable[[bytes], bytes] | None = None
) -> AsyncIterator[RunningServer]:
    """A pymodbus TCP server for `units` on 127.0.0.1 (a free port unless given).

    `mangle` rewrites every frame the server sends: how a test makes a real server answer
    short or malformed frames, which pymodbus' server cannot be asked to do otherwise.
    """
    running = RunningServer(server=None)  # type: ignore[arg-type]
    trace_pdu, trace_connect = _tracer(running)

    def trace_packet(sending: bool, data: bytes) -> bytes:
        return mangle(data) if sending and mangle is not None else data

    server = ModbusTcpServer(
        [u.sim_device() for u in units],
        address=("127.0.0.1", port),
        trace_pdu=trace_pdu,
        trace_connect=trace_connect,
        trace_packet=trace_packet,
    )
    running.server = server
    await server.serve_forever(background=True)
    running.port = server.transport.sockets[0].getsockname()[1]
    try:
        yield running
    finally:
        await _stop_and_check_read_only(running, units)


async def _stop_and_check_read_only(running: RunningServer, units: tuple[TestUnit, ...]) -> None:
    """Stop a test server; every test that used it also proves no write code arrived."""
    for unit in units:
        unit.release()
    await running.server.shutdown()
    assert not WRITE_CODES & set(running.codes), f"write codes received: {running.codes}"


@contextlib.asynccontextmanager
async def serial_server(pty: str, *units: TestUnit) -> AsyncIterator[RunningServer]:
    """A pymodbus RTU server for `units` on one end of a PTY pair (one RS-485 line)."""
    running = RunningServer(server=None)  # type: ignore[arg-type]
    trace_pdu, _ = _tracer(running)
    server = ModbusSerialServer(
        [u.sim_device() for u in units],
        framer=FramerType.RTU,
        port=pty,
        baudrate=115200,
        trace_pdu=trace_pdu,
    )
    running.server = server
    await server.serve_forever(background=True)
    try:
        yield running
    finally:
        await _stop_and_check_read_only(running, units)


_PTY_LINE = re.compile(rb"PTY is (\S+)")


@contextlib.contextmanager
def socat_pty_pair(timeout: float = 10.0) -> Iterator[tuple[str, str]]:
    """Two PTYs joined by socat: a null-modem cable. Names come from socat's own stderr.

    Raises RuntimeError if socat exits, or does not report both PTYs within `timeout` s.
    """
    proc = subprocess.Popen(
        ["socat", "-d", "-d", "pty,raw,echo=0", "pty,raw,echo=0"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        bufsize=0,  # unbuffered: select() then sees every line that has not been read yet
    )
    assert proc.stderr is not None
    names: list[str] = []
    seen: list[bytes] = []
    end = time.monotonic() + timeout
    try:
        with selectors.DefaultSelector() as selector:
            selector.register(proc.stderr, selectors.EVENT_READ)
            while True:
                if not selector.select(timeout=max(0.0, end - time.monotonic())):
                    raise RuntimeError(f"socat did not open its PTYs within {timeout:g}s: {seen}")
                line = proc.stderr.readline()
                if not line:
                    raise RuntimeError(f"socat exited before opening its PTYs: {seen}")
                seen.append(line)
                if match := _PTY_LINE.search(line):
                    names.append(match.group(1).decode())
                if b"starting data transfer loop" in line:
                    break
        assert len(names) == 2, names
        yield names[0], names[1]
    finally:
        proc.terminate()
        proc.wait(timeout=5)
        proc.stderr.close()
