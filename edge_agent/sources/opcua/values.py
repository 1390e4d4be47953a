"""OPC UA DataValues as Readings (docs/contract.md §4): status to quality, variant to value, time.

Pure functions, no I/O, so the mapping is tested without a server. The rules:
- the StatusCode's two severity bits decide the quality (00 good, 01 uncertain, 1x bad) and the
  whole code is kept in `Reading.code`; a bad value is always sent as None, never as a number;
- numbers, booleans, text and DateTime (as Unix ns) pass as they are; anything else (arrays,
  structures, byte strings, node ids) becomes text and is *flagged* so the source logs it once;
- the timestamp is the source timestamp, else the server timestamp, else the local clock.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

from asyncua import ua

from edge_agent.reading import Quality, Reading, Value

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
    """A plain value for the wire, and whether it had to be turned into text (flagged)."""
    if raw is None or isinstance(raw, bool | str):
        return raw, False
    if isinstance(raw, int):
        return int(raw), False  # IntEnum (enumerations) become their number
    if isinstance(raw, float):
        return raw, False
    if isinstance(raw, datetime):
        return datetime_ns(raw), False
    if isinstance(raw, ua.LocalizedText):
        return raw.Text, False
    return as_text(raw), True


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


def to_reading(src: str, pt: str, data: ua.DataValue) -> tuple[Reading, bool]:
    """The Reading for one DataValue, and whether its value was flagged (sent as text)."""
    code = status_code(data)
    quality = quality_of(code)
    value: Value = None
    flagged = False
    if quality is not Quality.BAD and data.Value is not None:
        value, flagged = convert(data.Value.Value)
    return Reading(src, pt, timestamp_ns(data), value, quality, code), flagged


def bad_reading(src: str, pt: str, code: int, ts_ns: int | None = None) -> Reading:
    """A bad reading with no value: the point is unknown, unreadable or out of contact."""
    return Reading(src, pt, time.time_ns() if ts_ns is None else ts_ns, None, Quality.BAD, code)


def code_name(code: int) -> str:
    """`BadNodeIdUnknown (0x80340000)`: a name for logs and messages."""
    return f"{ua.StatusCode(ua.UInt32(code)).name} (0x{code:08X})"
