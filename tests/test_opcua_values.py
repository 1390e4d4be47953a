"""DataValue to Reading: quality from the severity bits, docs/contract.md §4 types, timestamps."""

from __future__ import annotations

import datetime as dt
import math
import re
import uuid

import pytest
from asyncua import ua

from edge_agent.reading import Quality, RejectedValue
from edge_agent.sources.opcua.values import convert, datetime_ns, quality_of, to_reading

pytestmark = pytest.mark.unit

T0 = dt.datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=dt.UTC)
T0_NS = 1714979289_123456000


@pytest.mark.parametrize(
    ("code", "quality"),
    [
        (0x00000000, Quality.GOOD),
        (0x00A90000, Quality.GOOD),  # GoodLocalOverride
        (0x40900000, Quality.UNCERTAIN),  # UncertainLastUsableValue
        (0x80340000, Quality.BAD),  # BadNodeIdUnknown
        (0xC0000000, Quality.BAD),  # severity 11 is bad too
    ],
)
def test_quality_from_severity_bits(code: int, quality: Quality) -> None:
    assert quality_of(code) is quality


@pytest.mark.parametrize(
    ("raw", "value", "flagged"),
    [
        (True, True, False),
        (-5, -5, False),
        (2**63 + 1, 2**63 + 1, False),
        (1.25, 1.25, False),
        ("text", "text", False),
        (T0, T0_NS, False),
        (ua.LocalizedText("hello", "en"), "hello", False),
        (b"\x00\xff", "00ff", True),
        ([1, 2], "[1, 2]", True),
        (["a", True], "['a', true]", True),
        (ua.NodeId(5, 2), "ns=2;i=5", True),
        (uuid.UUID(int=1), "00000000-0000-0000-0000-000000000001", True),
        (None, None, False),
    ],
)
def test_values_map_to_contract_types(raw: object, value: object, flagged: bool) -> None:
    assert convert(raw) == (value, flagged)


@pytest.mark.parametrize(
    ("raw", "value"),
    [
        ("VNSE3\x00-0", "VNSE3"),  # text ends at the first NUL
        ("PUMP1   ", "PUMP1"),  # and loses its padding
        ("OK\udcff\udcff", "OK"),  # 0xFF padding, as asyncua decodes it (surrogateescape)
        (ua.LocalizedText("Mill 1\x00\x00", "en"), "Mill 1"),
        (ua.LocalizedText(None), None),
        (["a\x00b", "c"], "['a', 'c']"),
        ([1.0, math.nan, -math.inf], "[1.0, NaN, -Infinity]"),  # text naming them, flagged
        (2**64 - 1, 2**64 - 1),  # UInt64 max: a plain CBOR integer
        (-(2**63), -(2**63)),  # Int64 min
    ],
)
def test_values_follow_the_rules_every_protocol_obeys(raw: object, value: object) -> None:
    assert convert(raw)[0] == value


@pytest.mark.parametrize(
    ("raw", "error"),
    [
        (math.nan, "value is NaN"),
        (math.inf, "value is +Infinity"),
        (-math.inf, "value is -Infinity"),
        ("OK\udcc3(", "text is not UTF-8: byte 0xC3 at offset 2"),  # would crash CBOR encoding
        (ua.LocalizedText("\udcfe!", "en"), "text is not UTF-8: byte 0xFE at offset 0"),
        (dt.datetime(1601, 1, 1, tzinfo=dt.UTC), "outside what int64 Unix ns can hold"),
        (dt.datetime(9999, 12, 31, 23, 59, 59, tzinfo=dt.UTC), "outside what int64 Unix ns"),
    ],
)
def test_values_that_break_a_rule_are_refused(raw: object, error: str) -> None:
    with pytest.raises(RejectedValue, match=re.escape(error)):
        convert(raw)


@pytest.mark.parametrize(
    ("variant", "code", "error"),
    [
        (ua.Variant(math.nan, ua.VariantType.Double), 0, "Double value is NaN"),  # issue 8
        (ua.Variant(math.inf, ua.VariantType.Float), 0, "Float value is +Infinity"),  # issue 8
        (ua.Variant(-math.inf, ua.VariantType.Double), 0x40900000, "Double value is -Infinity"),
        (ua.Variant("OK\udcc3(", ua.VariantType.String), 0, "String text is not UTF-8"),
    ],
)
def test_a_refused_value_with_good_status_is_bad_with_its_code_kept(
    variant: ua.Variant, code: int, error: str
) -> None:
    data = ua.DataValue(variant, ua.StatusCode(ua.UInt32(code)), SourceTimestamp=T0)
    reading, flagged, rejected, _ = to_reading("s", "p", data)
    assert (reading.value, reading.quality, reading.code, reading.ts_ns) == (
        None,
        Quality.BAD,
        code,
        T0_NS,
    )
    assert not flagged and rejected is not None and rejected.startswith(error)


def test_bad_value_is_none_and_code_is_kept() -> None:
    data = ua.DataValue(ua.Variant(99.0), ua.StatusCode(ua.UInt32(0x808D0000)), SourceTimestamp=T0)
    reading, _, rejected, _ = to_reading("s", "p", data)
    assert rejected is None  # the device said bad: nothing was refused
    assert (reading.value, reading.quality, reading.code, reading.ts_ns) == (
        None,
        Quality.BAD,
        0x808D0000,
        T0_NS,
    )


def test_timestamp_fallbacks() -> None:
    server_only = ua.DataValue(ua.Variant(1.0), ServerTimestamp=T0)
    assert to_reading("s", "p", server_only)[0].ts_ns == T0_NS
    both = ua.DataValue(ua.Variant(1.0), SourceTimestamp=T0, ServerTimestamp=T0 + dt.timedelta(1))
    assert to_reading("s", "p", both)[0].ts_ns == T0_NS
    before = dt.datetime.now(dt.UTC)
    neither = to_reading("s", "p", ua.DataValue(ua.Variant(1.0)))[0]
    assert neither.ts_ns >= datetime_ns(before)
    assert datetime_ns(T0.replace(tzinfo=None)) == T0_NS
