"""OPC UA DataValues as Readings (docs/contract.md §4): status to quality, variant to value, time.

Pure functions, no I/O, so the mapping is tested without a server. The rules:
- the StatusCode's two severity bits decide the quality (00 good, 01 uncertain, 1x bad) and the
  whole code is kept in `Reading.code`; a bad value is always sent as None, never as a number;
- numbers, booleans, text and DateTime (as Unix ns) pass through the value rules every protocol
  obeys (edge_agent.reading): a NaN or infinite Float/Double, text that is not UTF-8 or a DateTime
  outside int64 ns makes the reading bad with value None, whatever the status said, and the
  device's code is kept; text is cut at its first NUL and loses trailing padding;
- anything else (arrays, structures, byte strings, node ids) becomes text and is *flagged* so the
  source logs it once;
- text over MAX_TEXT_BYTES is cut there and sent `uncertain`, marked `truncated` so the source
  logs it once per point and counts it;
- the timestamp is the source timestamp, else the server timestamp, else the local clock.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any, NamedTuple

from asyncua import ua

from edge_agent.reading import (
    Quality,
    Reading,
    RejectedValue,
    Value,
    check_number,
    check_time_ns,
    clean_text,
    float_name,
    limit_text,
)

_UNIX_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

BAD_NOT_CONNECTED = 0x808A0000
"""Reported for every point when the connection is lost, so no old value looks current."""


def quality_of(code: int) -> Quality:
    """Quality from the StatusCode's severity bits (OPC 10000-4 §7.39)."""
    severity = code >> 30
    if severity == 0:
        return Quality.GOOD
    if severity == 1:
        return Quality.UNCERTAIN
    return Quality.BAD


def datetime_ns(value: datetime) -> int:
    """Unix time in ns of an OPC UA DateTime (aware UTC on the wire; naive taken as UTC)."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    delta = value - _UNIX_EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000_000 + delta.microseconds * 1000


def convert(raw: Any) -> tuple[Value, bool]:
    """A plain value for the wire, and whether it had to be turned into text (flagged).

    Raises RejectedValue when the value breaks a rule of edge_agent.reading: a NaN or infinite
    float, text that is not UTF-8, a DateTime outside int64 Unix ns.
    """
    if raw is None or isinstance(raw, bool):
        return raw, False
    if isinstance(raw, str):
        return clean_text(raw), False
    if isinstance(raw, int):
        return check_number(int(raw)), False  # IntEnum (enumerations) become their number
    if isinstance(raw, float):
        return check_number(raw), False
    if isinstance(raw, datetime):
        return check_time_ns(datetime_ns(raw)), False
    if isinstance(raw, ua.LocalizedText):
        return (None if raw.Text is None else clean_text(raw.Text)), False
    return clean_text(as_text(raw)), True


def as_text(raw: Any) -> str:
    """A readable text form of a value that has no docs/contract.md §4 type."""
    if isinstance(raw, bytes | bytearray):
        return raw.hex()
    if isinstance(raw, list | tuple):
        return "[" + ", ".join(_item_text(item) for item in raw) + "]"
    if isinstance(raw, ua.NodeId | ua.QualifiedName):
        return str(raw.to_string())
    if isinstance(raw, ua.StatusCode):
        return raw.name
    return str(raw)


def _item_text(item: Any) -> str:
    """One array element in the array's text; a non-finite float is named (`NaN`), as text."""
    if isinstance(item, float):
        return float_name(item)
    value, _ = convert(item)
    if isinstance(value, str) and not isinstance(item, list | tuple):
        return repr(value)
    return str(value).lower() if isinstance(value, bool) else str(value)


def status_code(data: ua.DataValue) -> int:
    """The StatusCode as an int; an absent code means Good."""
    return int(data.StatusCode.value) if data.StatusCode is not None else 0


def timestamp_ns(data: ua.DataValue) -> int:
    """Source timestamp, else server timestamp, else now: the device's time where it gives one."""
    stamp = data.SourceTimestamp or data.ServerTimestamp
    return datetime_ns(stamp) if stamp is not None else time.time_ns()


class Converted(NamedTuple):
    """A DataValue as a Reading, with what the source logs about it."""

    reading: Reading
    flagged: bool = False
    """The value had no plain type and is sent as text."""
    rejected: str | None = None
    """Why a value with a good or uncertain status was refused (the reading is then bad)."""
    truncated: bool = False
    """The value was text over MAX_TEXT_BYTES, cut and sent as uncertain (edge_agent.reading)."""


def to_reading(src: str, pt: str, data: ua.DataValue) -> Converted:
    """The Reading for one DataValue; a refused value makes it bad, keeping the device's code."""
    code = status_code(data)
    quality = quality_of(code)
    value: Value = None
    flagged, rejected, truncated = False, None, False
    if quality is not Quality.BAD and data.Value is not None:
        try:
            value, flagged = convert(data.Value.Value)
        except RejectedValue as exc:
            quality, rejected = Quality.BAD, f"{data.Value.VariantType.name} {exc}"
        if isinstance(value, str):
            value, truncated = limit_text(value)
            if truncated:
                quality = Quality.UNCERTAIN
    reading = Reading(src, pt, timestamp_ns(data), value, quality, code)
    return Converted(reading, flagged, rejected, truncated)


def bad_reading(src: str, pt: str, code: int, ts_ns: int | None = None) -> Reading:
    """A bad reading with no value: the point is unknown, unreadable or out of contact."""
    return Reading(src, pt, time.time_ns() if ts_ns is None else ts_ns, None, Quality.BAD, code)


def code_name(code: int) -> str:
    """`BadNodeIdUnknown (0x80340000)`: a name for logs and messages."""
    return f"{ua.StatusCode(ua.UInt32(code)).name} (0x{code:08X})"
