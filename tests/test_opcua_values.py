"""DataValue to Reading: quality from the severity bits, docs/contract.md §4 types, timestamps."""

from __future__ import annotations

import datetime as dt
import uuid

import pytest
from asyncua import ua

from edge_agent.reading import Quality
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


def test_bad_value_is_none_and_code_is_kept() -> None:
    data = ua.DataValue(ua.Variant(99.0), ua.StatusCode(ua.UInt32(0x808D0000)), SourceTimestamp=T0)
    reading, _ = to_reading("s", "p", data)
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
