"""Real Modbus devices for the tests: pymodbus servers over TCP and over a socat PTY pair.

Devices that misbehave on purpose (late answers, noise around frames, bad CRCs) are small fakes
of the tests' own, `MisbehavingRtuDevice` and `MisbehavingTcpDevice`: pymodbus' servers cannot
be made to do those things.

`TestUnit` describes one unit: register maps (unmapped addresses answer exception 2), and
switches a test flips to make it answer an exception code or stop answering. Every server
records the function codes it receives in RECEIVED_CODES, and its context manager asserts on
exit that no write function code ever arrived (docs/contract.md §5), so every Modbus test checks it.
`motor_unit` and `MOTOR_POINTS` are one device with every table and type, and the points to read it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import selectors
import struct
import subprocess
import time
import tty
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from pymodbus.constants import ExcCodes
from pymodbus.framer import FramerRTU, FramerType
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


@dataclass
class Misbehaviour:
    """What a misbehaving device does to its answers; a test flips these while it runs."""

    latency: float = 0.0
    """Seconds every answer takes (a real device is not instant; 0 answers at once)."""
    late: dict[tuple[int, int], float] = field(default_factory=dict)
    """(unit, address) -> seconds: the next read of that unit and address is answered this late;
    the requests that arrive meanwhile are answered after it, in order, like a real device."""
    prefix: bytes = b""
    """Bytes sent before every answer frame (line noise, a driver's stray byte)."""
    suffix: bytes = b""
    """Bytes sent after every answer frame."""
    bad_crc: int = 0
    """The next this many answers go out with a wrong CRC (then it counts down to 0)."""
    late_overlapped: list[int] = field(default_factory=list)
    """Units whose request was waiting when a late answer went out: that answer landed in
    another request's wait (what a shared-line test needs to have happened)."""


def _answer_pdu(unit: TestUnit, function: int, address: int, count: int) -> bytes:
    """A read's answer PDU from a TestUnit's maps, built with pymodbus-independent code here."""
    table = {1: unit.coils, 2: unit.discrete, 3: unit.holding, 4: unit.input}[function]
    cells = {a + i: v for a, values in table.items() for i, v in enumerate(values)}
    wanted = range(address, address + count)
    if function in unit.exceptions or any(a not in cells for a in wanted):
        code = unit.exceptions.get(function, 2)
        return bytes((function | 0x80, code))
    if function in (1, 2):
        data = bytearray((count + 7) // 8)
        for i, a in enumerate(wanted):
            if cells[a]:
                data[i // 8] |= 1 << (i % 8)
        return bytes((function, len(data))) + bytes(data)
    data = b"".join(int(cells[a]).to_bytes(2, "big") for a in wanted)
    return bytes((function, len(data))) + data


def _rtu_crc(body: bytes) -> bytes:
    return FramerRTU.compute_CRC(body).to_bytes(2, "big")  # pymodbus' own CRC, not the agent's


class MisbehavingRtuDevice:
    """RTU units on one end of a PTY pair that answer in order and misbehave on purpose.

    A fake of the tests' own, allowed because the real part cannot produce these faults:
    pymodbus' serial server cannot answer one request late and the rest in order after it,
    put noise before or after a frame, or send a bad CRC. Well-behaved RTU tests use
    `serial_server`. Only reads (function codes 1-4) are answered, from TestUnit maps; requests
    for units it does not serve are ignored, as on a real bus; every request is recorded, and
    the context manager checks that no write code arrived.
    """

    def __init__(self, path: str, *units: TestUnit) -> None:
        self.path = path
        self.units = {u.unit: u for u in units}
        self.misbehave = Misbehaviour()
        self.requests: list[tuple[int, int, int, int]] = []
        self.codes: list[int] = []
        self._queue: asyncio.Queue[tuple[int, int, int, int]] = asyncio.Queue()
        self._waiting: list[int] = []
        self._buffer = bytearray()
        self._fd = -1

    async def __aenter__(self) -> MisbehavingRtuDevice:
        self._fd = os.open(self.path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        tty.setraw(self._fd)
        loop = asyncio.get_running_loop()
        loop.add_reader(self._fd, self._readable)
        self._worker = asyncio.create_task(self._answer_in_order())
        return self

    async def __aexit__(self, *exc: object) -> None:
        asyncio.get_running_loop().remove_reader(self._fd)
        self._worker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._worker
        os.close(self._fd)
        assert not WRITE_CODES & set(self.codes), f"write codes received: {self.codes}"

    def _readable(self) -> None:
        with contextlib.suppress(BlockingIOError):
            self._buffer += os.read(self._fd, 1024)
        while len(self._buffer) >= 8:  # every read request is 8 bytes
            frame = bytes(self._buffer[:8])
            if _rtu_crc(frame[:6]) != frame[6:]:
                del self._buffer[:1]  # hunt for the next request
                continue
            del self._buffer[:8]
            unit, function = frame[0], frame[1]
            address, count = struct.unpack(">HH", frame[2:6])
            self.codes.append(function)
            RECEIVED_CODES.append(function)
            self.requests.append((unit, function, address, count))
            if unit in self.units:
                self._waiting.append(unit)
                self._queue.put_nowait((unit, function, address, count))

    async def _answer_in_order(self) -> None:
        while True:
            unit, function, address, count = await self._queue.get()
            self._waiting.remove(unit)
            how = self.misbehave
            delay = how.late.pop((unit, address), 0.0)
            await asyncio.sleep(how.latency + delay)
            if delay:
                how.late_overlapped.extend(self._waiting)
            body = bytes((unit,)) + _answer_pdu(self.units[unit], function, address, count)
            crc = _rtu_crc(body)
            if how.bad_crc:
                how.bad_crc -= 1
                crc = bytes((crc[0] ^ 0xFF, crc[1]))
            os.write(self._fd, how.prefix + body + crc + how.suffix)


class MisbehavingTcpDevice:
    """A Modbus TCP device that answers in order with the right transaction ids, some late.

    A fake of the tests' own: pymodbus' TCP server answers a late request with the transaction
    id of the newest one (see TestUnit.set_silent), so it cannot show a late answer that carries
    its own, stale, id. Reads only; the context manager checks that no write code arrived.
    """

    def __init__(self, *units: TestUnit) -> None:
        self.units = {u.unit: u for u in units}
        self.misbehave = Misbehaviour()
        self.requests: list[tuple[int, int, int, int]] = []
        self.codes: list[int] = []
        self.port = 0

    async def __aenter__(self) -> MisbehavingTcpDevice:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._server.close()
        await self._server.wait_closed()
        assert not WRITE_CODES & set(self.codes), f"write codes received: {self.codes}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        queue: asyncio.Queue[bytes] = asyncio.Queue()
        answering = asyncio.create_task(self._answer_in_order(queue, writer))
        try:
            while True:
                header = await reader.readexactly(7)
                body = await reader.readexactly(struct.unpack(">H", header[4:6])[0] - 1)
                queue.put_nowait(header + body)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            answering.cancel()
            writer.close()

    async def _answer_in_order(self, queue: asyncio.Queue[bytes], writer: Any) -> None:
        while True:
            frame = await queue.get()
            tid, unit, function = struct.unpack(">H", frame[:2])[0], frame[6], frame[7]
            address, count = struct.unpack(">HH", frame[8:12])
            self.codes.append(function)
            RECEIVED_CODES.append(function)
            self.requests.append((unit, function, address, count))
            delay = self.misbehave.late.pop((unit, address), 0.0)
            await asyncio.sleep(self.misbehave.latency + delay)
            pdu = _answer_pdu(self.units[unit], function, address, count)
            writer.write(struct.pack(">HHHB", tid, 0, len(pdu) + 1, unit) + pdu)
