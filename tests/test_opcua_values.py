"""DataValue to Reading: quality from the severity bits, docs/contract.md §4 types, and which
DataValues become readings with which timestamp (ChangeFilter)."""

from __future__ import annotations

import datetime as dt
import math
import re
import uuid

import pytest
from asyncua import ua

from edge_agent.reading import MAX_TEXT_BYTES, Quality, RejectedValue
from edge_agent.sources.opcua.values import (
    BAD_NOT_CONNECTED,
    ChangeFilter,
    bad_reading,
    convert,
    datetime_ns,
    quality_of,
    to_value,
)

pytestmark = pytest.mark.unit

T0 = dt.datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=dt.UTC)
T0_NS = 1714979289_123456000
SEC = 1_000_000_000
UNCERTAIN = 0x40900000
BAD_SENSOR = 0x808D0000


def dv(
    value: object,
    code: int = 0,
    source: dt.datetime | None = T0,
    server: dt.datetime | None = None,
) -> ua.DataValue:
    return ua.DataValue(
        ua.Variant(value),
        ua.StatusCode(ua.UInt32(code)),
        SourceTimestamp=source,
        ServerTimestamp=server,
    )


def at(seconds: float) -> dt.datetime:
    return T0 + dt.timedelta(seconds=seconds)


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
    reading, issue, flagged, rejected, _ = ChangeFilter().accept("s", "p", data)
    assert reading is not None and issue is None
    assert (reading.value, reading.quality, reading.code, reading.ts_ns) == (
        None,
        Quality.BAD,
        code,
        T0_NS,
    )
    assert not flagged and rejected is not None and rejected.startswith(error)


def test_bad_value_is_none_and_code_is_kept() -> None:
    reading, _, _, rejected, _ = ChangeFilter().accept("s", "p", dv(99.0, 0x808D0000))
    assert reading is not None
    assert rejected is None  # the device said bad: nothing was refused
    assert (reading.value, reading.quality, reading.code, reading.ts_ns) == (
        None,
        Quality.BAD,
        0x808D0000,
        T0_NS,
    )


def test_the_source_timestamp_is_used_while_it_advances() -> None:
    changes = ChangeFilter()
    for second, value in enumerate((1.0, 2.0, 2.0, 3.0)):
        reading, issue, _, _, _ = changes.accept(
            "s", "p", dv(value, source=at(second), server=at(99))
        )
        assert reading is not None and issue is None  # a new source timestamp: a new sample
        assert reading.ts_ns == T0_NS + second * SEC
    assert datetime_ns(T0.replace(tzinfo=None)) == T0_NS


def test_changed_values_under_a_frozen_source_timestamp_are_all_sent() -> None:
    """The field case in miniature: 10.0 -> 24.0 under one source timestamp."""
    changes = ChangeFilter()
    sent = [changes.accept("s", "p", dv(float(v), server=at(v))) for v in range(10, 25)]
    assert [s.reading.value for s in sent if s.reading] == [float(v) for v in range(10, 25)]
    assert [s.issue for s in sent] == [None] + ["frozen"] * 14
    # the first carries the source timestamp, each change the server's, which advances
    assert [s.reading.ts_ns for s in sent if s.reading] == [T0_NS] + [
        T0_NS + v * SEC for v in range(11, 25)
    ]


def test_a_status_change_under_the_same_timestamp_and_value_is_sent() -> None:
    changes = ChangeFilter()
    codes = [0, UNCERTAIN, 0, BAD_SENSOR, BAD_SENSOR, 0]
    sent = [
        changes.accept("s", "p", dv(10.0, code, server=at(i)))[0] for i, code in enumerate(codes)
    ]
    assert [r.code if r else None for r in sent] == [0, UNCERTAIN, 0, BAD_SENSOR, None, 0]
    assert [r.value if r else None for r in sent] == [10.0, 10.0, 10.0, None, None, 10.0]


def test_a_source_timestamp_going_backwards_does_not_hide_the_change() -> None:
    changes = ChangeFilter()
    first, _, _, _, _ = changes.accept("s", "p", dv(1.0, source=at(10), server=at(10)))
    second, issue, _, _, _ = changes.accept("s", "p", dv(2.0, source=at(5), server=at(11)))
    assert first is not None and second is not None and issue == "backwards"
    assert second.ts_ns > first.ts_ns  # the latest reading by time is the latest value
    third, issue, _, _, _ = changes.accept("s", "p", dv(3.0, source=at(6), server=at(12)))
    assert third is not None and issue is None and third.ts_ns == T0_NS + 6 * SEC


def test_without_a_source_timestamp_changes_are_sent_and_repeats_are_not() -> None:
    changes = ChangeFilter()
    frozen_server = at(1)
    got = [
        changes.accept("s", "p", dv(v, source=None, server=frozen_server), now_ns=T0_NS + i * SEC)
        for i, v in enumerate((1.0, 1.0, 2.0, 2.0, 1.0))
    ]
    assert [r.value if r else None for r, _, _, _, _ in got] == [1.0, None, 2.0, None, 1.0]
    assert {issue for r, issue, _, _, _ in got if r} == {"missing"}
    # the server timestamp the first time; frozen after that, so the receive time
    assert [r.ts_ns for r, _, _, _, _ in got if r] == [
        T0_NS + SEC,
        T0_NS + 2 * SEC,
        T0_NS + 4 * SEC,
    ]


def test_exact_repeats_are_dropped_and_a_repeated_refused_value_is_not_a_change() -> None:
    changes = ChangeFilter()
    assert changes.accept("s", "p", dv(float("nan")))[0] is not None  # bad, value None
    assert changes.accept("s", "p", dv(float("nan"), source=at(1)))[0] is None  # still bad
    assert changes.accept("s", "p", dv(float("inf"), source=at(2)))[0] is None  # same code
    assert changes.accept("s", "p", dv(1.0))[0] is not None
    assert changes.accept("s", "p", dv(1.0))[0] is None
    assert changes.accept("s", "q", dv(True))[0] is not None
    assert changes.accept("s", "q", dv(1))[0] is not None  # True and 1 are different values


def test_after_a_disconnect_the_replayed_value_is_sent_with_its_own_timestamp() -> None:
    changes = ChangeFilter()
    assert changes.accept("s", "p", dv(5.0, source=at(1)))[0] is not None
    down = bad_reading("s", "p", BAD_NOT_CONNECTED, T0_NS + 60 * SEC)
    assert changes.accept_synthetic(down) == down
    assert changes.accept_synthetic(down) is None
    assert changes.codes() == {"p": BAD_NOT_CONNECTED}
    replay, issue, _, _, _ = changes.accept("s", "p", dv(5.0, source=at(1)))
    assert replay is not None and issue is None and replay.ts_ns == T0_NS + SEC


@pytest.mark.parametrize("source", [at(1), T0, None], ids=["advancing", "frozen", "missing"])
def test_a_refused_value_after_a_good_one_with_the_same_code_is_sent_as_bad(
    source: dt.datetime | None,
) -> None:
    """Good 2.5, then a Good NaN: the code is the same (0), the reading is not (good -> bad);
    dropping it as a repeat would leave 2.5 standing as the point's current good value. So is
    the good value after it, whatever the source timestamp does."""
    changes = ChangeFilter()
    first, _, _, _, _ = changes.accept("s", "p", dv(2.5, source=T0, server=at(1)))
    refused, _, _, rejected, _ = changes.accept(
        "s", "p", dv(math.nan, source=source, server=at(2)), now_ns=T0_NS + 3 * SEC
    )
    back, _, _, _, _ = changes.accept(
        "s", "p", dv(2.5, source=source, server=at(3)), now_ns=T0_NS + 4 * SEC
    )
    assert first is not None and refused is not None and back is not None
    assert [(r.value, r.quality, r.code) for r in (first, refused, back)] == [
        (2.5, Quality.GOOD, 0),
        (None, Quality.BAD, 0),
        (2.5, Quality.GOOD, 0),
    ]
    assert rejected == "Double value is NaN"
    assert first.ts_ns < refused.ts_ns < back.ts_ns


def test_cut_text_is_uncertain_and_a_change_past_the_cut_is_still_a_change() -> None:
    """Text over MAX_TEXT_BYTES is sent cut and uncertain, `truncated` set; the filter compares
    the whole text, so a change after the cut is sent (under a frozen source timestamp too), an
    exact repeat is not, and the cut prefix sent on its own is a change back to good."""
    head = "x" * MAX_TEXT_BYTES
    changes = ChangeFilter()
    first = changes.accept("s", "p", dv(head + "A", server=at(1)))
    assert first.truncated and first.reading is not None
    assert (first.reading.value, first.reading.quality) == (head, Quality.UNCERTAIN)
    repeat = changes.accept("s", "p", dv(head + "A", server=at(2)))
    assert repeat.reading is None and repeat.truncated  # dropped, still reported as cut
    tail = changes.accept("s", "p", dv(head + "B", server=at(3)))
    assert tail.reading is not None and tail.issue == "frozen" and tail.truncated
    assert (tail.reading.value, tail.reading.ts_ns) == (head, T0_NS + 3 * SEC)
    prefix = changes.accept("s", "p", dv(head, server=at(4)))
    assert prefix.reading is not None and not prefix.truncated
    assert (prefix.reading.value, prefix.reading.quality) == (head, Quality.GOOD)


def test_cut_text_keeps_an_uncertain_status_and_its_code() -> None:
    data = dv("é" * MAX_TEXT_BYTES, UNCERTAIN)  # two bytes each: twice the limit
    converted = to_value(data)
    assert converted.truncated and converted.quality is Quality.UNCERTAIN
    assert converted.value == "é" * (MAX_TEXT_BYTES // 2)
    reading = ChangeFilter().accept("s", "p", data).reading
    assert reading is not None and reading.code == UNCERTAIN
