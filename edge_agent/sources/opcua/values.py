"""OPC UA DataValues as Readings: status to quality, variant to a docs/contract.md §4 value,
time to ns.

No I/O, so the mapping is tested without a server. The rules:
- the StatusCode's two severity bits decide the quality (00 good, 01 uncertain, 1x bad) and the
  whole code is kept in `Reading.code`; a bad value is always sent as None, never as a number;
- numbers, booleans, text and DateTime (as Unix ns) pass as they are; anything else (arrays,
  structures, byte strings, node ids) becomes text and is *flagged* so the source logs it once;
- `ChangeFilter` decides which DataValues become readings and which timestamp each carries. It
  keys on what the device asserts, the value and the status, never on timestamps alone: a
  changed value or status is always sent, whatever its timestamps say (some PLC gateways and
  simulators freeze the source timestamp, some clocks step back, some servers send none).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

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


TimestampIssue = Literal["frozen", "backwards", "missing"]
"""Why a reading does not carry its source timestamp: it did not change with a changed value or
status, it went back in time, or the server sent none."""


def same_value(a: Value, b: Value) -> bool:
    """Equal as the device meant it: same type and value; NaN equals NaN (no change), True != 1."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


def _ns(stamp: datetime | None) -> int | None:
    return datetime_ns(stamp) if stamp is not None else None


@dataclass(slots=True)
class _Sample:
    """What was last seen of a point: its value and code, and the DataValue's own timestamps
    (the server's kept as given and converted only when needed: most readings never need it)."""

    value: Value
    code: int
    source_ns: int | None = None
    server: datetime | None = None


class ChangeFilter:
    """Which DataValues of each point become readings, and the timestamp each reading carries.

    A DataValue is sent when its value or StatusCode differs from the last reading sent for the
    point, or when it carries a source timestamp different from the previous one (the device
    says it sampled again). Otherwise it is an exact repeat (a poll of an unchanged value, the
    value a new subscription replays) and is dropped. A bad point is sent when its code changes,
    not on every poll. So a changed value is never dropped, whatever its timestamps.

    The reading's timestamp is the source timestamp, unless the source timestamp is unusable:
    - `missing`: the DataValue has none;
    - `frozen`: it equals the previous one although the value or status changed;
    - `backwards`: it is earlier than the previous one.
    Then the reading carries the server timestamp (OPC 10000-4 §7.11: when the server received
    the value or knew it to be accurate) if the server gave one that advanced, else the receive
    time on the gateway's clock; `accept` reports the issue so the source can log it (not a
    missing timestamp on a bad status: servers leave it out on the errors they report).
    """

    def __init__(self) -> None:
        self._sent: dict[str, _Sample] = {}
        """Per point: the value and code of the last reading sent (from the device or not)."""
        self._device: dict[str, _Sample] = {}
        """Per point: the last DataValue the device gave, with its timestamps."""

    def accept(
        self, src: str, pt: str, data: ua.DataValue, now_ns: int | None = None
    ) -> tuple[Reading | None, TimestampIssue | None, bool]:
        """(the reading or None for a repeat, the timestamp issue or None, flagged as text)."""
        code = status_code(data)
        quality = quality_of(code)
        value: Value = None
        flagged = False
        if quality is not Quality.BAD and data.Value is not None:
            value, flagged = convert(data.Value.Value)
        sample = _Sample(value, code, _ns(data.SourceTimestamp), data.ServerTimestamp)
        previous = self._device.get(pt)
        self._device[pt] = sample
        if not self._is_news(pt, sample, previous, quality):
            return None, None, flagged
        issue = _timestamp_issue(sample, previous)
        if issue is None:
            assert sample.source_ns is not None
            ts_ns = sample.source_ns
        else:
            server_ns = _server_ns_if_advanced(sample, previous)
            if server_ns is None:
                server_ns = time.time_ns() if now_ns is None else now_ns
            ts_ns = server_ns
        self._sent[pt] = sample
        if issue == "missing" and quality is Quality.BAD:
            issue = None  # a server omits timestamps on the bad status it made itself (§7.11)
        return Reading(src, pt, ts_ns, value, quality, code), issue, flagged

    def _is_news(
        self, pt: str, sample: _Sample, previous: _Sample | None, quality: Quality
    ) -> bool:
        sent = self._sent.get(pt)
        if sent is None or sent.code != sample.code:
            return True
        if quality is Quality.BAD:
            return False  # same bad code: value is None both times, nothing new
        if not same_value(sent.value, sample.value):
            return True
        return (
            sample.source_ns is not None
            and previous is not None
            and sample.source_ns != previous.source_ns
        )

    def accept_synthetic(self, reading: Reading) -> Reading | None:
        """A reading made here, not by the device (a bad code for a node that could not be
        monitored, BadNotConnected): sent when its value or code is news for the point."""
        sent = self._sent.get(reading.pt)
        code = reading.code or 0
        if sent is not None and sent.code == code and same_value(sent.value, reading.value):
            return None
        self._sent[reading.pt] = _Sample(reading.value, code)
        return reading

    def codes(self) -> dict[str, int]:
        """Per point that has sent a reading: the code of the last one."""
        return {pt: sample.code for pt, sample in self._sent.items()}


def _server_ns_if_advanced(sample: _Sample, previous: _Sample | None) -> int | None:
    """The sample's server timestamp, if it has one later than the previous sample's."""
    server = _ns(sample.server)
    if server is None or previous is None:
        return server
    before = _ns(previous.server)
    return server if before is None or server > before else None


def _timestamp_issue(sample: _Sample, previous: _Sample | None) -> TimestampIssue | None:
    if sample.source_ns is None:
        return "missing"
    if previous is None or previous.source_ns is None:
        return None
    if sample.source_ns < previous.source_ns:
        return "backwards"
    if sample.source_ns == previous.source_ns and (
        sample.code != previous.code or not same_value(sample.value, previous.value)
    ):
        return "frozen"
    return None


def bad_reading(src: str, pt: str, code: int, ts_ns: int | None = None) -> Reading:
    """A bad reading with no value: the point is unknown, unreadable or out of contact."""
    return Reading(src, pt, time.time_ns() if ts_ns is None else ts_ns, None, Quality.BAD, code)


def code_name(code: int) -> str:
    """`BadNodeIdUnknown (0x80340000)`: a name for logs and messages."""
    return f"{ua.StatusCode(ua.UInt32(code)).name} (0x{code:08X})"
