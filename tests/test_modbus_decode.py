"""Golden tests: every type in every byte/word order against registers written out by hand.

pymodbus has had word-order bugs (#2675, #2623); these vectors pin what the agent reports for
each setting. The agent decodes with `struct` itself (a whole read at once, `BlockDecoder`);
pymodbus' `convert_from_registers` is kept here as an independent check. Order names follow
Telegraf: the letters are the value's bytes, most significant first, in the order they travel
on the wire.
"""

from __future__ import annotations

import math
import random
import struct
from typing import Any, Literal

import pytest

from edge_agent.config.modbus import ModbusPoint
from edge_agent.sources.modbus.decode import (
    ORDERS,
    BlockDecoder,
    DecodeError,
    decode_registers,
    scaled,
    shortest_float32,
    swap_bytes,
)
from edge_agent.sources.modbus.plan import decode_response, plan_reads

pytestmark = pytest.mark.unit

# type, value, {order: registers as they arrive}
GOLDEN = [
    ("int16", -2, {"AB": [0xFFFE], "BA": [0xFEFF]}),
    ("uint16", 0x1234, {"AB": [0x1234], "BA": [0x3412]}),
    ("int32", -123456789, {  # f8 a4 32 eb
        "ABCD": [0xF8A4, 0x32EB], "CDAB": [0x32EB, 0xF8A4],
        "BADC": [0xA4F8, 0xEB32], "DCBA": [0xEB32, 0xA4F8]}),
    ("uint32", 3000000000, {  # b2 d0 5e 00
        "ABCD": [0xB2D0, 0x5E00], "CDAB": [0x5E00, 0xB2D0],
        "BADC": [0xD0B2, 0x005E], "DCBA": [0x005E, 0xD0B2]}),
    ("float32", 123.456, {  # 42 f6 e9 79
        "ABCD": [0x42F6, 0xE979], "CDAB": [0xE979, 0x42F6],
        "BADC": [0xF642, 0x79E9], "DCBA": [0x79E9, 0xF642]}),
    ("int64", -1234567890123456789, {  # ee dd ef 0b 82 16 7e eb
        "ABCD": [0xEEDD, 0xEF0B, 0x8216, 0x7EEB], "CDAB": [0x7EEB, 0x8216, 0xEF0B, 0xEEDD],
        "BADC": [0xDDEE, 0x0BEF, 0x1682, 0xEB7E], "DCBA": [0xEB7E, 0x1682, 0x0BEF, 0xDDEE]}),
    ("uint64", 0x0102030405060708, {
        "ABCD": [0x0102, 0x0304, 0x0506, 0x0708], "CDAB": [0x0708, 0x0506, 0x0304, 0x0102],
        "BADC": [0x0201, 0x0403, 0x0605, 0x0807], "DCBA": [0x0807, 0x0605, 0x0403, 0x0201]}),
    ("float64", 123.456, {  # 40 5e dd 2f 1a 9f be 77
        "ABCD": [0x405E, 0xDD2F, 0x1A9F, 0xBE77], "CDAB": [0xBE77, 0x1A9F, 0xDD2F, 0x405E],
        "BADC": [0x5E40, 0x2FDD, 0x9F1A, 0x77BE], "DCBA": [0x77BE, 0x9F1A, 0x2FDD, 0x5E40]}),
    ("string", "ABCDE", {  # 41 42 43 44 45 00, length 3
        "ABCD": [0x4142, 0x4344, 0x4500], "CDAB": [0x4500, 0x4344, 0x4142],
        "BADC": [0x4241, 0x4443, 0x0045], "DCBA": [0x0045, 0x4443, 0x4241]}),
]  # fmt: skip

SHORT = {"AB": ("big", "big"), "BA": ("little", "big")}


def _cases() -> list[tuple[str, object, str, list[int]]]:
    return [(t, v, order, regs) for t, v, table in GOLDEN for order, regs in table.items()]


@pytest.mark.parametrize(("type_", "expected", "order", "registers"), _cases())
def test_golden_vectors(type_: str, expected: object, order: str, registers: list[int]) -> None:
    byte_order, word_order = ORDERS.get(order) or SHORT[order]
    assert decode_registers(registers, type_, byte_order, word_order) == expected


def test_every_type_has_all_four_orders() -> None:
    for type_, value, table in GOLDEN:
        if type_ in ("int16", "uint16"):
            assert set(table) == {"AB", "BA"}
            # word order has no meaning for one register: both settings decode the same
            for word in ("big", "little"):
                assert decode_registers(table["BA"], type_, "little", word) == value
        else:
            assert set(table) == set(ORDERS), type_


@pytest.mark.parametrize("order", list(ORDERS))
def test_orders_agree_with_an_independent_struct_reference(order: str) -> None:
    """The same value through a hand-rolled permutation of struct bytes, for many values."""
    byte_order, word_order = ORDERS[order]
    fmt = {"int32": ">i", "uint32": ">I", "float32": ">f", "int64": ">q", "uint64": ">Q",
           "float64": ">d"}  # fmt: skip
    samples = [0, 1, -1, 255, 65535, 65536, 2**31 - 1, -(2**31), 12345678]
    for type_, code in fmt.items():
        for sample in samples:
            value: float | int = float(sample) if code in (">f", ">d") else sample
            if type_.startswith("uint"):
                value = abs(int(value))
            if type_.endswith("32") and not -(2**31) <= value < 2**32:
                continue
            raw = struct.pack(code, value)
            words = [raw[i : i + 2] for i in range(0, len(raw), 2)]
            if byte_order == "little":
                words = [w[::-1] for w in words]
            if word_order == "little":
                words.reverse()
            registers = [int.from_bytes(w, "big") for w in words]
            got = decode_registers(registers, type_, byte_order, word_order)
            want = struct.unpack(code, raw)[0]
            assert got == (shortest_float32(want) if code == ">f" else want), (type_, sample)


def test_bool_bit_of_a_register() -> None:
    assert decode_registers([0b1000], "bool", bit=3) is True
    assert decode_registers([0b1000], "bool", bit=2) is False
    assert decode_registers([0x8000], "bool", bit=15) is True
    # byte_order little swaps the register before the bit is taken
    assert decode_registers([0x0080], "bool", "little", bit=15) is True
    assert decode_registers([0], "bool") is False
    assert decode_registers([7], "bool") is True


def test_float32_is_reported_as_its_shortest_decimal() -> None:
    assert decode_registers([0x3DCC, 0xCCCD], "float32") == 0.1
    assert shortest_float32(struct.unpack(">f", struct.pack(">f", 1 / 3))[0]) == 0.33333334


@pytest.mark.parametrize(
    ("float32", "float64", "name"),
    [
        ([0x7FC0, 0], [0x7FF8, 0, 0, 0], "NaN"),
        ([0x7F80, 0], [0x7FF0, 0, 0, 0], r"\+Infinity"),
        ([0xFF80, 0], [0xFFF0, 0, 0, 0], "-Infinity"),
    ],
    ids=["nan", "+inf", "-inf"],
)
def test_non_finite_floats_are_errors_not_values(
    float32: list[int], float64: list[int], name: str
) -> None:
    with pytest.raises(DecodeError, match=f"float32: value is {name}"):
        decode_registers(float32, "float32")
    with pytest.raises(DecodeError, match=f"float64: value is {name}"):
        decode_registers(float64, "float64")


def test_invalid_text_is_an_error() -> None:
    with pytest.raises(DecodeError, match="string: text is not UTF-8: byte 0xFF at offset 0"):
        decode_registers([0xFFFE], "string")


@pytest.mark.parametrize(
    ("registers", "byte_order", "word_order", "text"),
    [
        ([0x4142, 0x00FF, 0xFFFF], "big", "big", "AB"),  # issue 8: read bad, with no log line
        ([0x564E, 0x5345, 0x3300, 0x2D30], "big", "big", "VNSE3"),  # issue 8: "VNSE3\0-0"
        ([0x4E56, 0x4553, 0x0033, 0x302D], "little", "big", "VNSE3"),  # the HMI byte swap
        ([0x2D30, 0x3300, 0x5345, 0x564E], "big", "little", "VNSE3"),  # registers reversed
        ([0x5055, 0x4D50, 0x3120, 0x2020], "big", "big", "PUMP1"),  # space padding
        ([0x5055, 0x4D50, 0x31FF, 0xFFFF], "big", "big", "PUMP1"),  # erased-flash padding
        ([0x0000, 0x4142], "big", "big", ""),  # an empty C string, whatever follows
    ],
)
def test_text_ends_at_the_first_nul_and_loses_its_padding(
    registers: list[int], byte_order: Literal["big", "little"],
    word_order: Literal["big", "little"], text: str,
) -> None:  # fmt: skip
    assert decode_registers(registers, "string", byte_order, word_order) == text


def test_a_scaled_value_that_overflows_is_an_error_not_infinity() -> None:
    """A finite float64 near its limit times a scale is infinite: refused, not sent as good."""
    near_max = list(struct.unpack(">4H", struct.pack(">d", 1.5e308)))
    raw = decode_registers(near_max, "float64")
    assert raw == 1.5e308
    with pytest.raises(DecodeError, match=r"scaled value is \+Infinity"):
        scaled(raw, 10.0, 0.0)
    point = ModbusPoint.model_validate(
        {"name": "flow", "register": "input", "address": 0, "type": "float64", "scale": 10}
    )
    request = plan_reads([point])[0]
    ((index, value),) = decode_response(request, [point], near_max)
    assert index == 0 and isinstance(value, DecodeError)


def test_scale_and_offset() -> None:
    assert scaled(1234, 0.1, 0.0) == pytest.approx(123.4)
    assert scaled(100, 1.0, -40.0) == 60.0
    assert scaled(7, 1.0, 0.0) == 7 and isinstance(scaled(7, 1.0, 0.0), int)
    assert scaled(True, 2.0, 1.0) is True


# The block decoder: a whole read at once, equal to decode_registers + scaled point by point.

ALL_ORDERS = [("big", "big"), ("big", "little"), ("little", "big"), ("little", "little")]
NUMERIC = ("int16", "uint16", "int32", "uint32", "int64", "uint64", "float32", "float64")


def _point(
    name: str, address: int, type_: str, orders: tuple[str, str], **extra: Any
) -> ModbusPoint:
    return ModbusPoint.model_validate({
        "name": name, "register": "holding", "address": address, "type": type_,
        "byte_order": orders[0], "word_order": orders[1], **extra,
    })  # fmt: skip


def _one_by_one(points: list[ModbusPoint], start: int, registers: list[int]) -> list[object]:
    """The reference: each point through decode_registers and scaled, errors as their text."""
    out: list[object] = []
    for p in points:
        regs = registers[p.address - start : p.address - start + p.width]
        try:
            out.append(scaled(decode_registers(regs, p.type, p.byte_order, p.word_order, p.bit),
                              p.scale, p.offset))  # fmt: skip
        except DecodeError as exc:
            out.append(f"error: {exc}")
    return out


def _block(points: list[ModbusPoint], start: int, registers: list[int]) -> list[object]:
    data = struct.pack(f">{len(registers)}H", *registers)
    return [f"error: {v}" if isinstance(v, DecodeError) else v
            for v in BlockDecoder(start, points).decode(data)]  # fmt: skip


def _random_registers(rng: random.Random, count: int) -> list[int]:
    # Every tenth register a NaN or infinity pattern, so the checks on floats run too.
    specials = [0x7FC0, 0x7F80, 0xFF80, 0x7FF8, 0x7FF0, 0xFFF0, 0, 0xFFFF]
    return [rng.choice(specials) if rng.random() < 0.1 else rng.randrange(0x10000)
            for _ in range(count)]  # fmt: skip


@pytest.mark.parametrize("orders", ALL_ORDERS, ids=["ABCD", "CDAB", "BADC", "DCBA"])
def test_the_block_decoder_equals_decoding_point_by_point_in_every_order(
    orders: tuple[str, str],
) -> None:
    rng = random.Random(f"{orders}")
    for _ in range(200):
        points, address = [], 10
        for i in range(rng.randrange(1, 30)):
            type_ = rng.choice([*NUMERIC, "string", "bool"])
            extra: dict[str, Any] = {}
            if type_ == "string":
                extra["length"] = rng.randrange(1, 4)
            elif type_ == "bool":
                extra["bit"] = rng.choice([None, rng.randrange(16)])
            elif rng.random() < 0.3:
                extra["scale"], extra["offset"] = (
                    rng.choice([0.1, 2.5, 1e300]),
                    rng.choice([0, -40]),
                )
            point = _point(f"p{i}", address, type_, orders, **extra)
            points.append(point)
            address += point.width + rng.choice([0, 0, 0, 1, 3])  # gaps the read bridges
        registers = _random_registers(rng, address - 10)
        assert _block(points, 10, registers) == _one_by_one(points, 10, registers)


def test_the_block_decoder_handles_mixed_orders_and_overlapping_points() -> None:
    """Points of both struct orders in one read, and points that share registers."""
    points = [
        _point("a", 0, "float32", ("big", "big")),
        _point("b", 0, "uint16", ("big", "big")),  # overlaps a
        _point("c", 2, "int32", ("little", "little")),
        _point("d", 2, "uint32", ("big", "little")),  # overlaps c, CDAB
        _point("e", 4, "bool", ("big", "big"), bit=3),
        _point("f", 4, "uint16", ("little", "big"), scale=0.5),
    ]
    registers = [0x42F6, 0xE979, 0x1234, 0x5678, 0x0809]
    assert _block(points, 0, registers) == _one_by_one(points, 0, registers)
    assert _block(points, 0, registers)[:2] == [123.456, 0x42F6]


def test_the_block_decoder_reads_bit_tables() -> None:
    points = [ModbusPoint.model_validate({"name": f"c{i}", "register": "coil", "address": a,
                                          "type": "bool"})
              for i, a in enumerate([5, 6, 12, 20])]  # fmt: skip
    data = bytes([0b1000_0010, 0b1000_0000])  # offsets 1, 7 and 15 (coils 6, 12, 20) set
    assert BlockDecoder(5, points, bits=True).decode(data) == [False, True, True, True]


@pytest.mark.parametrize("orders", ALL_ORDERS, ids=["ABCD", "CDAB", "BADC", "DCBA"])
def test_decoding_agrees_with_pymodbus_convert_from_registers(orders: tuple[str, str]) -> None:
    """pymodbus' own conversion (after our byte swap) as an independent check of every type."""
    from pymodbus.client.mixin import ModbusClientMixin

    byte_order, word_order = orders
    rng = random.Random(f"pymodbus {orders}")
    for type_ in NUMERIC:
        width = {"16": 1, "32": 2, "64": 4}[type_[-2:]]
        data_type = getattr(ModbusClientMixin.DATATYPE, type_.upper())
        for _ in range(300):
            registers = [rng.randrange(0x10000) for _ in range(width)]
            swapped = swap_bytes(registers) if byte_order == "little" else registers
            theirs = ModbusClientMixin.convert_from_registers(swapped, data_type, word_order)
            assert isinstance(theirs, int | float)
            point = _point("p", 0, type_, orders)
            (ours,) = BlockDecoder(0, [point]).decode(struct.pack(f">{width}H", *registers))
            if isinstance(theirs, float) and not math.isfinite(theirs):
                assert isinstance(ours, DecodeError)
            elif type_ == "float32":
                assert ours == shortest_float32(theirs)
            else:
                assert ours == theirs, (type_, registers)
