"""OPC UA DataValues as Readings (docs/contract.md §4): status to quality, variant to value, time.

No I/O, so the mapping is tested without a server. The rules:
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
- `ChangeFilter` decides which DataValues become readings and which timestamp each carries. It
  keys on what the device asserts, the value and the status (and whether the value was refused),
  never on timestamps alone: a changed value or status is always sent, whatever its timestamps
  say (some PLC gateways and simulators freeze the source timestamp, some clocks step back, some
  servers send none).
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal, NamedTuple

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


TimestampIssue = Literal["frozen", "backwards", "missing"]
"""Why a reading does not carry its source timestamp: it did not change with a changed value or
status, it went back in time, or the server sent none."""


def same_value(a: Value, b: Value) -> bool:
    """Equal as the device meant it: same type and value (True != 1). Floats here are finite:
    the value rules refuse NaN and infinities before a value is compared."""
    return type(a) is type(b) and a == b


def _ns(stamp: datetime | None) -> int | None:
    return datetime_ns(stamp) if stamp is not None else None


@dataclass(slots=True)
class _Sample:
    """What was last seen of a point: its value, code and whether it is bad (a refused value is
    bad under a good code), and the DataValue's own timestamps (the server's kept as given and
    converted only when needed: most readings never need it)."""

    value: Value
    code: int
    bad: bool
    source_ns: int | None = None
    server: datetime | None = None
    whole: bytes | None = None
    """The digest of the whole text when `value` is cut text (see `Converted.whole`)."""

    def same_as(self, other: _Sample) -> bool:
        """Same value, code and quality: nothing the device asserts has changed."""
        return self.code == other.code and self.bad == other.bad and self.same_value_as(other)

    def same_value_as(self, other: _Sample) -> bool:
        """Same value; for cut text, the same whole text too."""
        return same_value(self.value, other.value) and self.whole == other.whole


class Accepted(NamedTuple):
    """What `ChangeFilter.accept` made of a DataValue, with what the source logs about it."""

    reading: Reading | None
    """The reading to send, or None for a repeat."""
    issue: TimestampIssue | None = None
    """Why the reading does not carry the source timestamp, when it does not."""
    flagged: bool = False
    """The value had no plain type and is sent as text."""
    rejected: str | None = None
    """Why a value with a good or uncertain status was refused (the reading is then bad)."""
    truncated: bool = False
    """The value was text over MAX_TEXT_BYTES, cut and sent as uncertain (edge_agent.reading);
    reported for a repeat too, like `flagged`."""


class Converted(NamedTuple):
    """What `to_value` made of one DataValue's value and status."""

    value: Value
    """The value for the wire; None when the status is bad or the value was refused."""
    quality: Quality
    """From the status; bad for a refused value, uncertain (if it was good) for cut text."""
    flagged: bool = False
    """The value had no plain type and is sent as text."""
    rejected: str | None = None
    """Why a value with a good or uncertain status was refused (`Double value is NaN`)."""
    truncated: bool = False
    """The value was text over MAX_TEXT_BYTES: `value` is its first MAX_TEXT_BYTES bytes."""
    whole: bytes | None = None
    """For cut text, a digest of the whole text, so that a change past the cut is still a
    change to ChangeFilter; None otherwise."""


def to_value(data: ua.DataValue) -> Converted:
    """The value and quality of one DataValue: a bad status gives None; a value the rules refuse
    (`convert` raised RejectedValue) makes it bad with None, and `rejected` says why; text over
    MAX_TEXT_BYTES is cut there and made uncertain (edge_agent.reading). The caller keeps the
    device's code either way."""
    quality = quality_of(status_code(data))
    if quality is Quality.BAD or data.Value is None:
        return Converted(None, quality)
    try:
        value, flagged = convert(data.Value.Value)
    except RejectedValue as exc:
        return Converted(None, Quality.BAD, rejected=f"{data.Value.VariantType.name} {exc}")
    if isinstance(value, str):
        cut, truncated = limit_text(value)
        if truncated:
            whole = hashlib.blake2b(value.encode("utf-8", "surrogatepass"), digest_size=16)
            return Converted(cut, Quality.UNCERTAIN, flagged, None, True, whole.digest())
    return Converted(value, quality, flagged)


class ChangeFilter:
    """Which DataValues of each point become readings, and the timestamp each reading carries.

    A DataValue is sent when its value, StatusCode or quality differs from the last reading sent
    for the point (so a refused value after a good one with the same code is sent, as bad; for
    text cut at MAX_TEXT_BYTES, the whole text is compared, so a change past the cut counts), or
    when it carries a source timestamp different from the previous one (the device says it
    sampled again). Otherwise it is an exact repeat (a poll of an unchanged value, the value a
    new subscription replays) and is dropped. A bad point (bad status or refused value) is sent
    when it turns bad or its code changes, not on every poll. So a changed value is never
    dropped, whatever its timestamps.

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
        """Per point: the value, code and quality of the last reading sent (device or not)."""
        self._device: dict[str, _Sample] = {}
        """Per point: the last DataValue the device gave, with its timestamps."""

    def accept(self, src: str, pt: str, data: ua.DataValue, now_ns: int | None = None) -> Accepted:
        """The reading for one DataValue of point `pt` (None for a repeat), its timestamp issue,
        and whether its value was flagged, refused or cut (see `to_value`). `now_ns` stands in
        for the receive time (tests)."""
        code = status_code(data)
        value, quality, flagged, rejected, truncated, whole = to_value(data)
        bad = quality is Quality.BAD
        sample = _Sample(value, code, bad, _ns(data.SourceTimestamp), data.ServerTimestamp, whole)
        previous = self._device.get(pt)
        self._device[pt] = sample
        if not self._is_news(pt, sample, previous):
            return Accepted(None, None, flagged, rejected, truncated)
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
        if issue == "missing" and quality_of(code) is Quality.BAD:
            issue = None  # a server omits timestamps on the bad status it made itself (§7.11)
        reading = Reading(src, pt, ts_ns, value, quality, code)
        return Accepted(reading, issue, flagged, rejected, truncated)

    def _is_news(self, pt: str, sample: _Sample, previous: _Sample | None) -> bool:
        sent = self._sent.get(pt)
        if sent is None or sent.code != sample.code or sent.bad != sample.bad:
            return True
        if sample.bad:
            return False  # same bad code: value is None both times, nothing new
        if not sample.same_value_as(sent):
            return True
        return (
            sample.source_ns is not None
            and previous is not None
            and sample.source_ns != previous.source_ns
        )

    def accept_synthetic(self, reading: Reading) -> Reading | None:
        """A reading made here, not by the device (a bad code for a node that could not be
        monitored, BadNotConnected): sent when its value or code is news for the point."""
        sample = _Sample(reading.value, reading.code or 0, reading.quality is Quality.BAD)
        sent = self._sent.get(reading.pt)
        if sent is not None and sent.same_as(sample):
            return None
        self._sent[reading.pt] = sample
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
    if sample.source_ns == previous.source_ns and not sample.same_as(previous):
        return "frozen"
    return None


def bad_reading(src: str, pt: str, code: int, ts_ns: int | None = None) -> Reading:
    """A bad reading with no value: the point is unknown, unreadable or out of contact."""
    return Reading(src, pt, time.time_ns() if ts_ns is None else ts_ns, None, Quality.BAD, code)


def code_name(code: int) -> str:
    """`BadNodeIdUnknown (0x80340000)`: a name for logs and messages."""
    return f"{ua.StatusCode(ua.UInt32(code)).name} (0x{code:08X})"
