"""Registers to values: every point type in all four byte orders, scale and offset.

Byte order is the order of the two bytes within a register, word order the order of the
registers in a multi-register value. A value's registers are put in the standard order (bytes
swapped first for byte_order little, then registers reversed for word_order little) and read as
a big-endian C type with `struct`, which is what pymodbus' `convert_from_registers` does too;
golden tests pin every type and order against known bytes, and check the two against each other.

    ABCD = byte_order big,    word_order big      (Modbus standard, "big-endian")
    CDAB = byte_order big,    word_order little   ("word swap", most PLCs that differ)
    BADC = byte_order little, word_order big      ("byte swap")
    DCBA = byte_order little, word_order little   ("little-endian")

`BlockDecoder` decodes the answer to a whole planned read at once: the points whose bytes are in
one order throughout (ABCD or DCBA, and every 16-bit value) are read by one precompiled
`struct.Struct` per order straight from the answer's bytes, the others one by one through
`decode_registers`. It costs about a tenth of a call per point (bench/modbus_load.py,
docs/performance.md), and gives the same values (tests/test_modbus_decode.py).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from itertools import groupby
from typing import Literal, Protocol

from edge_agent.reading import RejectedValue, Value, check_number, clean_text, float_name

STRUCT_CODES: dict[str, str] = {
    "int16": "h", "uint16": "H", "int32": "i", "uint32": "I",
    "int64": "q", "uint64": "Q", "float32": "f", "float64": "d",
}  # fmt: skip
"""The C type of each numeric point type, as a `struct` format character."""

ORDERS: dict[str, tuple[Literal["big", "little"], Literal["big", "little"]]] = {
    "ABCD": ("big", "big"),
    "CDAB": ("big", "little"),
    "BADC": ("little", "big"),
    "DCBA": ("little", "little"),
}
"""Telegraf-style order names -> (byte_order, word_order)."""

NUMERIC_TYPES = ("int16", "uint16", "int32", "uint32", "int64", "uint64", "float32", "float64")


class DecodeError(RejectedValue):
    """The registers hold no value the rules of edge_agent.reading allow (NaN, text not UTF-8)."""


def swap_bytes(registers: Sequence[int]) -> list[int]:
    """Exchange the two bytes of every register (byte_order little)."""
    return [((r & 0xFF) << 8) | (r >> 8) for r in registers]


def decode_registers(
    registers: Sequence[int],
    type_: str,
    byte_order: Literal["big", "little"] = "big",
    word_order: Literal["big", "little"] = "big",
    bit: int | None = None,
) -> Value:
    """The raw value of `type_` held in `registers` (exactly the point's width).

    Text and numbers follow edge_agent.reading: a string ends at its first NUL, loses trailing
    spaces and 0xFF padding, and must be UTF-8; a float must be finite (devices send NaN or
    infinity to flag a failed sensor). Raises DecodeError, naming the type, otherwise.
    """
    regs = swap_bytes(registers) if byte_order == "little" else list(registers)
    if type_ == "bool":
        return bool((regs[0] >> bit) & 1) if bit is not None else regs[0] != 0
    try:
        if type_ == "string":
            return clean_text(string_bytes(regs, word_order))
        ordered = regs[::-1] if word_order == "little" else regs
        raw = struct.pack(f">{len(ordered)}H", *ordered)
        (unpacked,) = struct.unpack(">" + STRUCT_CODES[type_], raw)
        value = check_number(unpacked)
    except RejectedValue as exc:
        raise DecodeError(f"{type_}: {exc}") from None
    if type_ == "float32" and isinstance(value, float):
        return shortest_float32(value)
    return value


def string_bytes(registers: Sequence[int], word_order: Literal["big", "little"]) -> bytes:
    """The bytes of a string point, high byte of each register first (as pymodbus orders them).

    `word_order: little` reverses the registers, as pymodbus' own string conversion does.
    """
    ordered = reversed(registers) if word_order == "little" else registers
    return b"".join(r.to_bytes(2, "big") for r in ordered)


def shortest_float32(value: float) -> float:
    """The shortest decimal that is the same float32: 123.456, not 123.45600128173828."""
    exact = struct.pack(">f", value)
    for digits in range(6, 10):
        candidate = float(f"{value:.{digits}g}")
        if struct.pack(">f", candidate) == exact:
            return candidate
    return value


def scaled(raw: Value, scale: float, offset: float) -> Value:
    """`raw * scale + offset`; integers stay integers when no scaling is configured.

    The result is rounded to 15 significant digits: 629 * 0.1 is 62.9, not 62.900000000000006.
    Raises DecodeError when the result is not finite (a float64 near its limit, scaled up).
    """
    if (scale == 1.0 and offset == 0.0) or isinstance(raw, bool | str) or raw is None:
        return raw
    value = float(f"{raw * scale + offset:.15g}")
    try:
        return check_number(value)
    except RejectedValue as exc:
        raise DecodeError(f"scaled {exc} ({raw!r} * {scale!r} + {offset!r})") from None


class PointShape(Protocol):
    """What decoding needs of a point (config.modbus.ModbusPoint and plan.PointSpec have it)."""

    @property
    def address(self) -> int: ...
    @property
    def width(self) -> int: ...
    @property
    def type(self) -> str: ...
    @property
    def byte_order(self) -> Literal["big", "little"]: ...
    @property
    def word_order(self) -> Literal["big", "little"]: ...
    @property
    def bit(self) -> int | None: ...
    @property
    def scale(self) -> float: ...
    @property
    def offset(self) -> float: ...


def struct_order(point: PointShape) -> Literal[">", "<"] | None:
    """The `struct` byte order that reads `point` straight from the wire, or None if none does.

    A 16-bit value is big-endian, or little-endian with byte_order little (its one register's
    bytes swapped). A wider one is big-endian in ABCD and little-endian in DCBA (both swaps
    together reverse all its bytes); CDAB and BADC permute words or bytes: no C type reads them.
    """
    if point.width == 1:
        return "<" if point.byte_order == "little" else ">"
    if point.byte_order == point.word_order:
        return ">" if point.byte_order == "big" else "<"
    return None


def _counted(form: str) -> str:
    """A struct format with its runs counted (`>HHHH` -> `>4H`): the same layout, and `struct`
    keeps one code per run instead of one per value (5 KB less for a read of 125 registers)."""
    return form[0] + "".join(f"{len(list(run))}{code}" for code, run in groupby(form[1:]))


class _Lane:
    """Points read by one struct: one byte order, in address order, without overlap."""

    __slots__ = ("end", "format", "order", "positions")

    def __init__(self, order: str) -> None:
        self.order = order
        self.format = order
        self.end = 0
        self.positions: list[int] = []


class BlockDecoder:
    """Every point of one planned read, decoded from the answer's bytes at once.

    `points` are the read's points in the read's order, `start` its first address. `decode`
    takes the data bytes of the answer (2 per register, big-endian as on the wire; for coils and
    discrete inputs one bit per address, lowest first) and returns one entry per point in the
    same order: the scaled value, or the DecodeError that makes the point bad. Equal, point for
    point, to `decode_registers` followed by `scaled`.
    """

    __slots__ = ("_bits", "_count", "_float32", "_floats", "_one_struct", "_others", "_scaled",
                 "_structs", "may_refuse")  # fmt: skip

    def __init__(self, start: int, points: Sequence[PointShape], *, bits: bool = False) -> None:
        self._count = len(points)
        self._bits: tuple[int, ...] | None = None
        self._structs: list[tuple[struct.Struct, tuple[int, ...]]] = []
        self._one_struct: struct.Struct | None = None
        self._others: list[tuple[int, int, PointShape]] = []
        self._floats: list[tuple[int, str]] = []
        self._float32: list[int] = []
        self._scaled: list[tuple[int, float, float]] = []
        self.may_refuse = False
        """Whether `decode` can return a DecodeError (floats, text, scaling); else never."""
        if bits:
            self._bits = tuple(p.address - start for p in points)
            return
        lanes: list[_Lane] = []
        for position, point in enumerate(points):
            at = 2 * (point.address - start)
            order = struct_order(point) if point.type in STRUCT_CODES else None
            if order is None:
                self._others.append((position, at, point))
                self.may_refuse |= point.type == "string"
            else:
                lane = next((ln for ln in lanes if ln.order == order and ln.end <= at), None)
                if lane is None:
                    lane = _Lane(order)
                    lanes.append(lane)
                lane.format += ("x" * (at - lane.end)) + STRUCT_CODES[point.type]
                lane.end = at + 2 * point.width
                lane.positions.append(position)
                if point.type in ("float32", "float64"):
                    self._floats.append((position, point.type))
                    if point.type == "float32":
                        self._float32.append(position)
            if point.scale != 1.0 or point.offset != 0.0:
                self._scaled.append((position, point.scale, point.offset))
        self.may_refuse |= bool(self._floats or self._scaled)
        self._structs = [(struct.Struct(_counted(ln.format)), tuple(ln.positions)) for ln in lanes]
        if len(lanes) == 1 and not self._others and lanes[0].positions == list(range(len(points))):
            self._one_struct = self._structs[0][0]  # the common case: one struct, in order

    def decode(self, data: bytes) -> list[Value | DecodeError]:
        """One value (or DecodeError) per point, in the read's order; see the class docstring."""
        if self._bits is not None:
            return [bool(data[i >> 3] >> (i & 7) & 1) for i in self._bits]
        values: list[Value | DecodeError]
        if self._one_struct is not None:
            values = list(self._one_struct.unpack_from(data))
        else:
            values = [None] * self._count
            for unpacker, positions in self._structs:
                for position, value in zip(positions, unpacker.unpack_from(data), strict=True):
                    values[position] = value
        for position, type_ in self._floats:
            value = values[position]
            assert isinstance(value, float)
            if not math.isfinite(value):
                values[position] = DecodeError(f"{type_}: value is {float_name(value)}")
        for position in self._float32:
            value = values[position]
            if isinstance(value, float):
                values[position] = shortest_float32(value)
        for position, at, point in self._others:
            registers = struct.unpack_from(f">{point.width}H", data, at)
            try:
                values[position] = decode_registers(
                    registers, point.type, point.byte_order, point.word_order, point.bit
                )
            except DecodeError as exc:
                values[position] = exc
        for position, scale, offset in self._scaled:
            raw = values[position]
            if not isinstance(raw, DecodeError):
                try:
                    values[position] = scaled(raw, scale, offset)
                except DecodeError as exc:
                    values[position] = exc
        return values
