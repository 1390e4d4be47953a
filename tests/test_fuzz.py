"""Hostile input, fuzzed with Hypothesis: the configuration loader, Modbus frames, decoding and
the request planner, and OPC UA value mapping (the envelope decoder is fuzzed in
test_envelope_hostile.py, the health endpoint in test_health_endpoint.py).

For each: no crash (only the documented error types), no hang (a deadline per example), and
every rejection is a clear error: a located ConfigProblem, a FrameError naming the mismatch, a
DecodeError naming the type. Whatever is accepted obeys the value rules of edge_agent.reading.
"""

from __future__ import annotations

import datetime as dt
import math
from typing import Any

import pytest
import yaml
from asyncua import ua
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_agent.config import Config, parse_config
from edge_agent.config.modbus import ModbusPoint, overlap_problems
from edge_agent.errors import ConfigError
from edge_agent.reading import INT_MAX, INT_MIN, MAX_TEXT_BYTES, Quality
from edge_agent.sources.modbus.decode import DecodeError, decode_registers
from edge_agent.sources.modbus.frames import (
    ExceptionAnswer,
    MismatchedAnswerError,
    TcpFramingError,
    check_answer,
    crc16,
    find_rtu_answer,
    next_tcp_frame,
)
from edge_agent.sources.modbus.plan import FUNCTION_CODES, decode_response, plan_reads
from edge_agent.sources.opcua.values import ChangeFilter, to_value

pytestmark = pytest.mark.unit

FUZZ = settings(max_examples=250, deadline=1000, suppress_health_check=[HealthCheck.too_slow])

# -- configuration ------------------------------------------------------------------------------


def refused_or_valid(text: str) -> Config | None:
    """parse_config's verdict; anything but Config or a located ConfigError fails the test."""
    try:
        return parse_config(text, "fuzz.yaml")
    except ConfigError as exc:
        assert exc.problems, "a refusal lists its problems"
        for problem in exc.problems:
            assert problem.message.strip()
            assert problem.path or problem.line is not None or problem.message, problem
            assert "Traceback" not in problem.message
        return None


@FUZZ
@given(st.text(max_size=400))
def test_fuzz_config_text(text: str) -> None:
    refused_or_valid(text)


YAML_TOKENS = st.sampled_from([
    "gateway:", "  id: g", "sources:", "  - type: modbus", "    name: p", "    host: h",
    "    points:", "      - {name: a, register: holding, address: 1}", "&a [1]", "*a",
    "!!python/object:os.system x", "!!binary AAAA", "? [a]\n: b", "- ", "{", "}", "[", "]",
    "mqtt: {url: 'mqtt://u:p@h'}", "health: {listen: ':0'}", "store: {max_bytes: 1e400}",
    "  - type: opcua", "    endpoint: opc.tcp://h:1", "    security: {policy: None}",
    "    nodes: [{name: n, node_id: 'ns=2;s=x'}]", "!!int 0x", "\t", "%YAML 1.1", "---", "...",
    "batch: {max_delay: 1ms}", "signing: {key_file: /dev/null}", "\x00", "\ufeff", "'", '"',
])  # fmt: skip


@FUZZ
@given(st.lists(YAML_TOKENS, max_size=12))
def test_fuzz_config_from_yaml_fragments(lines: list[str]) -> None:
    refused_or_valid("\n".join(lines))


SCALARS = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
KEYS = st.sampled_from([
    "type", "name", "host", "port", "points", "register", "address", "bit", "length", "scale",
    "id", "url", "password", "password_file", "interval", "nodes", "node_id", "security",
    "policy", "max_bytes", "listen", "unknown", "poll_interval", "unit_id",
])  # fmt: skip
TREES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(KEYS, inner, max_size=5),
    max_leaves=25,
)


@settings(FUZZ, max_examples=100)
@given(
    gateway=TREES,
    sources=st.lists(
        st.fixed_dictionaries(
            {"type": st.sampled_from(["modbus", "opcua", "simulated", "x"]), "name": SCALARS},
            optional={
                "host": SCALARS,
                "points": TREES,
                "nodes": TREES,
                "port": SCALARS,
                "endpoint": SCALARS,
                "security": TREES,
            },  # fmt: skip
        ),
        max_size=3,
    ),
    extra=st.dictionaries(KEYS, TREES, max_size=3),
)
def test_fuzz_config_structures(gateway: Any, sources: list[Any], extra: dict[str, Any]) -> None:
    text = yaml.safe_dump({"gateway": gateway, "sources": sources, **extra})
    refused_or_valid(text)


# -- Modbus -------------------------------------------------------------------------------------

TYPES = ["bool", "int16", "uint16", "int32", "uint32", "int64", "uint64", "float32", "float64"]
WIDTH = {"bool": 1, "int16": 1, "uint16": 1, "int32": 2, "uint32": 2, "int64": 4, "uint64": 4,
         "float32": 2, "float64": 4}  # fmt: skip
ORDER = st.sampled_from(["big", "little"])
REGISTER = st.integers(0, 0xFFFF)


@FUZZ
@given(type_=st.sampled_from([*TYPES, "string"]), data=st.data(), byte=ORDER, word=ORDER)
def test_fuzz_decode_registers(type_: str, data: st.DataObject, byte: Any, word: Any) -> None:
    width = data.draw(st.integers(1, 125)) if type_ == "string" else WIDTH[type_]
    registers = data.draw(st.lists(REGISTER, min_size=width, max_size=width))
    bit = data.draw(st.none() | st.integers(0, 15)) if type_ == "bool" else None
    try:
        value = decode_registers(registers, type_, byte, word, bit)
    except DecodeError as exc:
        assert type_ in str(exc), "the error names the type"
        return
    if isinstance(value, float):
        assert math.isfinite(value)
    elif isinstance(value, int) and not isinstance(value, bool):
        assert INT_MIN <= value <= INT_MAX
    elif isinstance(value, str):
        assert "\0" not in value and len(value.encode()) <= 2 * width


@FUZZ
@given(pdu=st.binary(max_size=260), function=st.integers(1, 4), count=st.integers(1, 2000))
def test_fuzz_check_answer(pdu: bytes, function: int, count: int) -> None:
    try:
        values = check_answer(pdu, function, count)
    except ExceptionAnswer as exc:
        assert pdu[0] == function | 0x80 and exc.code == pdu[1]
        return
    except MismatchedAnswerError as exc:
        assert exc.reason in ("short", "malformed") and str(exc)
        return
    assert len(values) == count, "an answer is data only when it holds exactly what was asked"
    assert pdu[0] == function


@FUZZ
@given(noise=st.binary(max_size=300), function=st.integers(1, 4), registers=st.binary(max_size=20))
def test_fuzz_rtu_framer_finds_only_frames_with_a_valid_crc(
    noise: bytes, function: int, registers: bytes
) -> None:
    body = bytes((1, function, len(registers))) + registers
    frame = body + crc16(body).to_bytes(2, "little")
    for buf in (noise, noise + frame, frame[:-1] + noise):
        found = find_rtu_answer(buf)
        if found is not None:
            start, end = found
            assert crc16(buf[start : end - 2]) == int.from_bytes(buf[end - 2 : end], "little")
    found = find_rtu_answer(noise + frame)
    assert found is not None, "a valid frame after noise is found"


@FUZZ
@given(st.binary(max_size=300))
def test_fuzz_tcp_framer(buf: bytes) -> None:
    try:
        frame = next_tcp_frame(buf)
    except TcpFramingError as exc:
        assert "MBAP" in str(exc) or "protocol id" in str(exc)
        return
    if frame is not None:
        _, _, pdu, used = frame
        assert used <= len(buf) and len(pdu) == used - 7


KINDS = st.sampled_from(["coil", "discrete", "holding", "input"])


@st.composite
def points(draw: st.DrawFn) -> list[ModbusPoint]:
    result = []
    for index in range(draw(st.integers(1, 24))):
        kind = draw(KINDS)
        bits = kind in ("coil", "discrete")
        type_ = "bool" if bits else draw(st.sampled_from([*TYPES, "string"]))
        fields: dict[str, Any] = {"name": f"p{index}", "register": kind, "type": type_,
                                  "address": draw(st.integers(0, 65400))}  # fmt: skip
        if type_ == "string":
            fields["length"] = draw(st.integers(1, 20))
        if type_ == "bool" and not bits and draw(st.booleans()):
            fields["bit"] = draw(st.integers(0, 15))
        result.append(ModbusPoint.model_validate(fields))
    return result


@settings(FUZZ, max_examples=100)
@given(points=points(), max_registers=st.integers(20, 125), max_bits=st.integers(1, 2000),
       max_gap=st.integers(0, 125), data=st.data())  # fmt: skip
def test_fuzz_planner_reads_every_point_once_within_the_limits(
    points: list[ModbusPoint], max_registers: int, max_bits: int, max_gap: int, data: st.DataObject
) -> None:
    requests = plan_reads(points, max_registers=max_registers, max_bits=max_bits, max_gap=max_gap)
    served = sorted(i for r in requests for i in r.points)
    assert served == list(range(len(points))), "every point read exactly once"
    for request in requests:
        assert request.function_code == FUNCTION_CODES[request.kind] in (1, 2, 3, 4)
        limit = max_bits if request.kind in ("coil", "discrete") else max_registers
        assert 1 <= request.count <= limit
        for index in request.points:
            point = points[index]
            assert point.kind == request.kind
            assert request.address <= point.address
            assert point.address + point.width <= request.end
        values: list[Any] = data.draw(st.lists(
            st.booleans() if request.kind in ("coil", "discrete") else REGISTER,
            min_size=request.count, max_size=request.count))  # fmt: skip
        for index, value in decode_response(request, points, values):
            assert index in request.points
            assert not isinstance(value, float) or math.isfinite(value)


@settings(FUZZ, max_examples=150)
@given(points())
def test_fuzz_overlap_check_agrees_with_a_brute_force_one(points: list[ModbusPoint]) -> None:
    def clash(a: ModbusPoint, b: ModbusPoint) -> bool:
        if a.kind != b.kind or a.address >= b.address + b.width or b.address >= a.address + a.width:
            return False
        return not (a.bit is not None and b.bit is not None and a.bit != b.bit)

    later = {j for j in range(len(points)) for i in range(j) if clash(points[i], points[j])}
    found = {loc[1] for loc, _ in overlap_problems(points)}
    assert found <= later, "only a point that overlaps an earlier one is reported"
    assert bool(found) == bool(later), "overlaps are found exactly when there are some"


# -- OPC UA -------------------------------------------------------------------------------------

INTS = {
    ua.VariantType.SByte: (-(2**7), 2**7 - 1), ua.VariantType.Byte: (0, 2**8 - 1),
    ua.VariantType.Int16: (-(2**15), 2**15 - 1), ua.VariantType.UInt16: (0, 2**16 - 1),
    ua.VariantType.Int32: (-(2**31), 2**31 - 1), ua.VariantType.UInt32: (0, 2**32 - 1),
    ua.VariantType.Int64: (-(2**63), 2**63 - 1), ua.VariantType.UInt64: (0, 2**64 - 1),
}  # fmt: skip
TEXT = st.text(st.characters(codec="utf-8"), max_size=50) | st.text(max_size=3000).map(
    lambda t: t * 3
)
SCALAR_VARIANTS = st.one_of(
    st.booleans().map(lambda v: ua.Variant(v, ua.VariantType.Boolean)),
    *[st.integers(lo, hi).map(lambda v, t=t: ua.Variant(v, t)) for t, (lo, hi) in INTS.items()],
    st.floats(width=32).map(lambda v: ua.Variant(v, ua.VariantType.Float)),
    st.floats().map(lambda v: ua.Variant(v, ua.VariantType.Double)),
    TEXT.map(lambda v: ua.Variant(v, ua.VariantType.String)),
    st.binary(max_size=3000).map(lambda v: ua.Variant(v, ua.VariantType.ByteString)),
    st.datetimes(timezones=st.just(dt.UTC)).map(lambda v: ua.Variant(v, ua.VariantType.DateTime)),
    st.uuids().map(lambda v: ua.Variant(v, ua.VariantType.Guid)),
    TEXT.map(lambda v: ua.Variant(ua.LocalizedText(v), ua.VariantType.LocalizedText)),
    st.integers(0, 2**32 - 1).map(lambda v: ua.Variant(ua.NodeId(v, 2), ua.VariantType.NodeId)),
    st.lists(st.floats(), max_size=600).map(lambda v: ua.Variant(v, ua.VariantType.Double)),
    st.lists(TEXT, max_size=20).map(lambda v: ua.Variant(v, ua.VariantType.String)),
)
STATUS = st.sampled_from([0, 0x00A90000, 0x40900000, 0x80340000, 0xC0000000]) | st.integers(
    0, 2**32 - 1
)


@FUZZ
@given(variant=SCALAR_VARIANTS, code=STATUS, stamp=st.none() | st.datetimes(
    min_value=dt.datetime(1601, 1, 1), timezones=st.just(dt.UTC)))  # fmt: skip
def test_fuzz_opcua_values_obey_the_value_rules(
    variant: ua.Variant, code: int, stamp: dt.datetime | None
) -> None:
    data = ua.DataValue(variant, ua.StatusCode(code), SourceTimestamp=stamp)
    accepted = ChangeFilter().accept("src", "pt", data)
    reading = accepted.reading
    assert reading is not None, "the first DataValue of a point is always news"
    assert reading.code == code
    if reading.quality is Quality.BAD:
        assert reading.value is None, "a bad reading never carries a value"
    value = reading.value
    if isinstance(value, float):
        assert math.isfinite(value)
    elif isinstance(value, int) and not isinstance(value, bool):
        assert INT_MIN <= value <= INT_MAX
    elif isinstance(value, str):
        assert len(value.encode("utf-8")) <= MAX_TEXT_BYTES
        assert "\0" not in value
        if accepted.truncated:
            assert reading.quality is Quality.UNCERTAIN, "a cut text is never sent as good"
    else:
        assert value is None or isinstance(value, bool)
    assert isinstance(reading.ts_ns, int)


def test_text_over_the_limit_is_cut_and_uncertain_never_silently() -> None:
    long = "é" * MAX_TEXT_BYTES  # two bytes each: twice the limit
    converted = to_value(ua.DataValue(ua.Variant(long, ua.VariantType.String)))
    assert converted.truncated
    assert converted.quality is Quality.UNCERTAIN
    assert converted.value == "é" * (MAX_TEXT_BYTES // 2)
    blob = ua.DataValue(ua.Variant(b"\x01" * MAX_TEXT_BYTES, ua.VariantType.ByteString))
    assert to_value(blob).truncated, "another instance: a byte string shown as hex"
    short = to_value(ua.DataValue(ua.Variant("ok", ua.VariantType.String)))
    assert not short.truncated and short.quality is Quality.GOOD
    # what the source sends: the reading itself is cut and uncertain, and says it was cut
    accepted = ChangeFilter().accept("s", "p", ua.DataValue(ua.Variant(long)))
    assert accepted.truncated and accepted.reading is not None
    assert (accepted.reading.value, accepted.reading.quality) == (
        converted.value,
        Quality.UNCERTAIN,
    )
