"""The planner on awkward layouts: gaps, overlaps, limits, mixed tables, and the fallback split."""

from __future__ import annotations

from typing import Any

import pytest

from edge_agent.config import parse_config
from edge_agent.config.modbus import ModbusPoint, ModbusSourceConfig, shared_link_problems
from edge_agent.errors import ConfigError
from edge_agent.sources.modbus.plan import ReadRequest, decode_response, plan_reads, split

pytestmark = pytest.mark.unit


def pts(*specs: tuple[str, int, str] | tuple[str, int, str, int]) -> list[ModbusPoint]:
    """Points from (register, address, type[, length]) tuples, named p0, p1, ..."""
    out = []
    for i, spec in enumerate(specs):
        data: dict[str, Any] = {"name": f"p{i}", "register": spec[0], "address": spec[1],
                                "type": spec[2]}  # fmt: skip
        if len(spec) == 4:
            data["length"] = spec[3]
        out.append(ModbusPoint.model_validate(data))
    return out


def spans(requests: list[ReadRequest]) -> list[tuple[str, int, int]]:
    return [(r.kind, r.address, r.count) for r in requests]


def test_contiguous_points_become_one_read() -> None:
    points = pts(("holding", 0, "uint16"), ("holding", 1, "float32"), ("holding", 3, "int64"))
    assert spans(plan_reads(points)) == [("holding", 0, 7)]


def test_gaps_are_bridged_up_to_max_gap_only() -> None:
    points = pts(("holding", 0, "uint16"), ("holding", 5, "uint16"), ("holding", 20, "uint16"))
    assert spans(plan_reads(points, max_gap=4)) == [("holding", 0, 6), ("holding", 20, 1)]
    assert spans(plan_reads(points, max_gap=3)) == [
        ("holding", 0, 1), ("holding", 5, 1), ("holding", 20, 1)]  # fmt: skip
    assert spans(plan_reads(points, max_gap=14)) == [("holding", 0, 21)]


def test_the_125_register_limit_and_a_smaller_device_limit() -> None:
    points = pts(*[("input", a, "float32") for a in range(0, 300, 2)])
    assert spans(plan_reads(points)) == [("input", 0, 124), ("input", 124, 124),
                                         ("input", 248, 52)]  # fmt: skip
    small = plan_reads(points, max_registers=40)
    assert [r.count for r in small] == [40] * 7 + [20]
    # a float32 is never torn across two reads
    for request in small:
        for index in request.points:
            assert points[index].address + 2 <= request.end


def test_the_2000_bit_limit() -> None:
    points = pts(*[("coil", a, "bool") for a in range(0, 4500, 3)])
    requests = plan_reads(points, max_gap=2)
    assert [r.count for r in requests] == [1999, 1999, 496]
    assert all(r.function_code == 1 for r in requests)


def test_tables_are_never_mixed_and_come_in_function_code_order() -> None:
    points = pts(("input", 0, "uint16"), ("holding", 1, "uint16"), ("coil", 2, "bool"),
                 ("discrete", 3, "bool"), ("holding", 0, "uint16"))  # fmt: skip
    assert spans(plan_reads(points)) == [
        ("coil", 2, 1), ("discrete", 3, 1), ("holding", 0, 2), ("input", 0, 1)]  # fmt: skip
    assert [r.function_code for r in plan_reads(points)] == [1, 2, 3, 4]


def test_overlapping_points_share_a_read() -> None:
    points = pts(("holding", 10, "uint32"), ("holding", 10, "uint16"), ("holding", 11, "uint16"))
    points.append(
        ModbusPoint.model_validate(
            {"name": "b3", "register": "holding", "address": 11, "type": "bool", "bit": 3}
        )
    )
    (request,) = plan_reads(points)
    assert (request.address, request.count, sorted(request.points)) == (10, 2, [0, 1, 2, 3])


def test_a_wide_string_that_ends_past_the_limit_starts_a_new_read() -> None:
    points = pts(("holding", 0, "uint16"), ("holding", 100, "string", 50))
    assert spans(plan_reads(points, max_gap=125)) == [("holding", 0, 1), ("holding", 100, 50)]


def test_unsorted_input_and_duplicate_addresses() -> None:
    points = pts(("holding", 30, "uint16"), ("holding", 0, "uint16"), ("holding", 30, "int16"))
    assert spans(plan_reads(points)) == [("holding", 0, 1), ("holding", 30, 1)]


def test_split_reads_each_point_alone_but_keeps_overlaps_together() -> None:
    points = pts(("holding", 0, "uint16"), ("holding", 1, "uint32"), ("holding", 2, "uint16"),
                 ("holding", 9, "uint16"))  # fmt: skip
    (coalesced,) = plan_reads(points, max_gap=10)
    assert spans(split(coalesced, points)) == [("holding", 0, 1), ("holding", 1, 2),
                                               ("holding", 9, 1)]  # fmt: skip


def test_decode_response_slices_each_point() -> None:
    points = pts(("holding", 100, "uint16"), ("holding", 103, "float32"), ("holding", 102, "int16"))
    (request,) = plan_reads(points, max_gap=2)
    values = dict(decode_response(request, points, [7, 0, 0xFFFF, 0x42F6, 0xE979]))
    assert values == {0: 7, 1: 123.456, 2: -1}


def config(**overrides: Any) -> ModbusSourceConfig:
    data = {"type": "modbus", "name": "plc", "host": "127.0.0.1",
            "points": [{"name": "a", "register": "holding", "address": 0}]}  # fmt: skip
    data.update(overrides)
    return ModbusSourceConfig.model_validate(data)


def test_config_rejects_a_point_wider_than_the_device_limit() -> None:
    source = config(max_registers_per_read=10,
                    points=[{"name": "s", "register": "holding", "address": 0, "type": "string",
                             "length": 20}])  # fmt: skip
    assert source.problems() == [(("points", 0, "length"),
                                  "point needs 20 registers, more than one read may fetch "
                                  "(max_registers_per_read is 10)")]  # fmt: skip


def test_check_config_reports_modbus_problems_with_key_paths() -> None:
    text = """
gateway: {id: gw}
sources:
  - type: modbus
    name: plc
    host: 10.0.0.5
    max_registers_per_read: 126
    points:
      - {name: a, register: coil, address: 0, type: float32}
      - {name: b, register: holding, address: 0, type: bool, bit: 16}
      - {name: c, register: holding, address: 0, type: string}
      - {name: d, register: holding, address: 0, type: int16, deadband: -1}
"""
    with pytest.raises(ConfigError) as caught:
        parse_config(text)
    paths = {p.path for p in caught.value.problems}
    assert paths == {"sources[0].max_registers_per_read", "sources[0].points[0]",
                     "sources[0].points[1].bit", "sources[0].points[2]",
                     "sources[0].points[3].deadband"}  # fmt: skip


def test_sources_on_one_serial_line_must_agree_on_its_settings() -> None:
    base = {"type": "modbus", "transport": "rtu", "serial_port": "/dev/ttyUSB0",
            "points": [{"name": "a", "register": "holding", "address": 0}]}  # fmt: skip
    one = ModbusSourceConfig.model_validate({**base, "name": "one", "unit_id": 1})
    two = ModbusSourceConfig.model_validate({**base, "name": "two", "unit_id": 2,
                                             "baudrate": 9600})  # fmt: skip
    assert shared_link_problems([one, two]) == [
        (("sources", 1, "baudrate"),
         "baudrate differs from sources[0] on the same serial_port (9600 vs 19200)")]  # fmt: skip
    assert one.link_key == two.link_key == ("rtu", "/dev/ttyUSB0")


def test_a_compacted_source_keeps_equal_points_and_plan_in_fresh_objects() -> None:
    """`ModbusSource.compact` (after the config is freed) changes no point and no read."""
    from edge_agent.sources.modbus.link import LinkPool  # noqa: PLC0415
    from edge_agent.sources.modbus.source import ModbusSource  # noqa: PLC0415

    config = ModbusSourceConfig.model_validate({
        "type": "modbus", "name": "plc", "host": "127.0.0.1", "max_gap": 2,
        "points": [
            {"name": "line1.temp", "register": "holding", "address": 300, "type": "float32",
             "scale": 0.1, "deadband": 0.5},
            {"name": "line1.run", "register": "coil", "address": 7, "type": "bool"},
            {"name": "line1.count", "register": "input", "address": 1000, "type": "uint32",
             "byte_order": "little", "word_order": "little"},
            {"name": "tag", "register": "holding", "address": 303, "type": "string", "length": 4},
        ],
    })  # fmt: skip
    source = ModbusSource(config, LinkPool())
    points, plan = list(source._points), list(source.plan)
    source.compact()
    assert source._points == points and source.plan == plan
    assert [type(p) for p in source._points] == [type(p) for p in points]
