"""The value types that flow from sources to the batcher, and the rules every value obeys.

A reading's value (docs/contract.md §4) is a number, a bool, text or null. Each protocol turns
its device's data into one of those at its decode boundary (Modbus `decode_registers`, OPC UA
`convert`) and passes it through these rules; a value that breaks one raises `RejectedValue`,
and the source sends the point as `bad` with value None (keeping the device's own status code,
if it has one) and logs the reason once per change. The batcher checks again before sealing, so
a source bug cannot put such a value in a signed batch either.

The rules:

- **Text** ends at the first NUL (as in C: a fixed-size buffer holds the text, then a terminator,
  then whatever was in memory); trailing padding is removed: spaces and 0xFF bytes (erased
  flash/EEPROM) after the text. The rest must be UTF-8: a byte that is not is *refused* (the
  point is bad, the log names the byte and its offset), not replaced with U+FFFD, because a
  replaced character is an altered value delivered as good, and different device strings would
  arrive as the same text. Leading spaces and other characters are kept as they are.
- **Floats** must be finite. NaN and ±Infinity are what devices send for a failed sensor or a
  value out of its range; they are not numbers a consumer can use, and strict JSON cannot hold
  them.
- **Integers** must lie in `INT_MIN..INT_MAX` = -2**63 .. 2**64-1: the union of the signed and
  unsigned 64-bit types of Modbus and OPC UA (Int64, UInt64). CBOR carries every such integer as
  a plain integer (major type 0 or 1); beyond it cbor2 would write a bignum tag that the contract
  does not allow. JSON output carries them exactly too; parsers that read every number as a
  double (JavaScript's JSON.parse) lose precision beyond ±2**53, which is theirs to handle.
- **Text length**: text over MAX_TEXT_BYTES (UTF-8) is cut there, at a character boundary, and
  the reading is sent `uncertain` (if it was `good`) and the source logs and counts it
  (`truncated`): a device or server that sends megabytes of text cannot blow up a batch, and
  a cut value never passes for the device's own. Modbus text is never that long (at most 125
  registers); OPC UA strings, byte strings and arrays shown as text may be.
- **Timestamps as values** (OPC UA DateTime) are Unix nanoseconds in a signed 64-bit integer,
  1677-09-21 .. 2262-04-11; OPC UA's "no date" (1601-01-01, encoded 0) and its maximum
  (9999-12-31) fall outside and are refused.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from enum import StrEnum
from typing import NamedTuple

from edge_agent.errors import EdgeAgentError

Value = float | int | bool | str | None


class Quality(StrEnum):
    """docs/contract.md §4 quality of one reading."""

    GOOD = "good"
    UNCERTAIN = "uncertain"
    BAD = "bad"


class Reading(NamedTuple):
    """One sampled value of one point; a NamedTuple because millions are made per minute."""

    src: str
    pt: str
    ts_ns: int
    value: Value
    quality: Quality
    code: int | None = None
    """The device's own status code where it has one (OPC UA StatusCode); sent as `sc`."""


MAX_TEXT_BYTES = 4096
"""Longest text value sent, in UTF-8 bytes; longer text is cut (see `limit_text`)."""
INT_MIN = -(2**63)
INT_MAX = 2**64 - 1
TIME_NS_MIN = -(2**63)
TIME_NS_MAX = 2**63 - 1
_PADDING = b" \xff"


class RejectedValue(EdgeAgentError, ValueError):  # noqa: N818 - a verdict, not a failure
    """A device value that breaks a rule of this module; the message says which, for logs."""


def clean_text(raw: bytes | bytearray | str) -> str:
    """Device text as the reading's text: cut at the first NUL, padding stripped, UTF-8.

    `raw` is the device's bytes, or text a protocol library already decoded (asyncua keeps
    bytes that are not UTF-8 as lone surrogates, "surrogateescape": they are turned back into
    those bytes first, so one rule applies). Raises RejectedValue naming the first byte that is
    not UTF-8 and its offset.
    """
    if isinstance(raw, str):
        try:
            data = raw.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError as exc:
            raise RejectedValue(
                f"text holds a lone surrogate U+{ord(raw[exc.start]):04X} at {exc.start}"
            ) from None
    else:
        data = bytes(raw)
    end = data.find(b"\0")
    if end >= 0:
        data = data[:end]
    data = data.rstrip(_PADDING)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RejectedValue(
            f"text is not UTF-8: byte 0x{data[exc.start]:02X} at offset {exc.start}"
        ) from None


def limit_text(text: str, limit: int = MAX_TEXT_BYTES) -> tuple[str, bool]:
    """`text` cut to at most `limit` UTF-8 bytes at a character boundary, and whether it was.

    The caller sends a cut value as `uncertain` and says so (logged and counted), never
    silently. Cheap for short text: only text that might be over the limit is encoded.
    """
    if len(text) * 4 <= limit:
        return text, False
    data = text.encode("utf-8", "surrogatepass")
    if len(data) <= limit:
        return text, False
    return data[:limit].decode("utf-8", "ignore"), True


def check_number(value: int | float) -> int | float:
    """`value` if it may be sent; RejectedValue for NaN, ±Infinity or an integer out of range."""
    if isinstance(value, float):
        if not math.isfinite(value):
            raise RejectedValue(f"value is {float_name(value)}")
    elif not isinstance(value, bool) and not INT_MIN <= value <= INT_MAX:
        raise RejectedValue(f"integer {value} is outside -2**63..2**64-1")
    return value


def check_time_ns(value: int) -> int:
    """Unix ns of a timestamp value if it fits int64 (1677..2262); RejectedValue otherwise."""
    if not TIME_NS_MIN <= value <= TIME_NS_MAX:
        raise RejectedValue(f"time {value} ns is outside what int64 Unix ns can hold (1677..2262)")
    return value


def checked(value: object) -> Value:
    """`value` as it may be sent: text cleaned (see clean_text), numbers checked; or raise.

    None, bool, int, float and str are the only reading types; anything else is refused too.
    Idempotent: a checked value passes unchanged.
    """
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int | float):
        return check_number(value)
    if isinstance(value, str):
        return clean_text(value)
    raise RejectedValue(f"a {type(value).__name__} is not a reading value")


def float_name(value: float) -> str:
    """`NaN`, `+Infinity` or `-Infinity` (the names strict JSON lacks), else repr."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Infinity" if value > 0 else "-Infinity"
    return repr(value)


def conforming(readings: Sequence[Reading]) -> tuple[list[Reading], list[tuple[Reading, str]]]:
    """`readings` with every value that breaks a rule made bad (value None, code kept).

    Returns the readings to send and the (original reading, reason) of each one changed. For
    the last check before sealing; sources apply the rules themselves, with a log per point.
    """
    out: list[Reading] = []
    changed: list[tuple[Reading, str]] = []
    for reading in readings:
        value = reading.value
        try:
            if checked(value) == value:
                out.append(reading)
                continue
            reason = "text not clean (a NUL, padding or bytes that are not UTF-8)"
        except RejectedValue as exc:
            reason = str(exc)
        changed.append((reading, reason))
        out.append(reading._replace(value=None, quality=Quality.BAD))
    return out, changed


def needs_check(readings: Sequence[Reading]) -> bool:
    """Whether a number in `readings` breaks a rule, or a value has no reading type: cheap.

    About 80 ns a reading, for the last check before sealing. Text is not scanned here: text
    CBOR cannot encode fails the encoder, and the batcher then applies `conforming`.
    """
    isfinite, low, high = math.isfinite, INT_MIN, INT_MAX
    for reading in readings:
        value = reading[3]
        if type(value) is float:
            if not isfinite(value):
                return True
        elif type(value) is int:
            if not low <= value <= high:
                return True
        elif type(value) is not str and type(value) is not bool and value is not None:
            return True
    return False
