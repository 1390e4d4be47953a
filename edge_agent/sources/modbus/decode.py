"""Registers to values: every point type in all four byte orders, scale and offset.

Word order (the order of registers in a multi-register value) is pymodbus'
`convert_from_registers`; byte order within a register is a swap done here first, because
pymodbus has no such option. Golden tests pin every type and order against known bytes.

    ABCD = byte_order big,    word_order big      (Modbus standard, "big-endian")
    CDAB = byte_order big,    word_order little   ("word swap", most PLCs that differ)
    BADC = byte_order little, word_order big      ("byte swap")
    DCBA = byte_order little, word_order little   ("little-endian")
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Literal

from pymodbus.client.mixin import ModbusClientMixin

from edge_agent.reading import RejectedValue, Value, check_number, clean_text

DataType = ModbusClientMixin.DATATYPE
_DATATYPES: dict[str, DataType] = {
    "int16": DataType.INT16, "uint16": DataType.UINT16,
    "int32": DataType.INT32, "uint32": DataType.UINT32,
    "int64": DataType.INT64, "uint64": DataType.UINT64,
    "float32": DataType.FLOAT32, "float64": DataType.FLOAT64,
    "string": DataType.STRING,
}  # fmt: skip

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
        value = ModbusClientMixin.convert_from_registers(regs, _DATATYPES[type_], word_order)
        assert isinstance(value, int | float)
        check_number(value)
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
