"""Payload format 2 (docs/contract.md §4.9): a batch's readings as a table of columns.

Format 1 writes one CBOR map per reading, so every reading repeats its source and point names,
its timestamp, its quality and its `seq`. Format 2 writes each of those once per batch, and the
values of each point one after the other, so that a slowly changing value costs a small
difference instead of a whole number. It is lossless: every reading decodes to the same `seq`,
source, point, `ts`, value (bit for bit, NaN payloads and -0.0 included), quality and status
code it was sealed with. The payload map is then zstd-compressed and signed as format 1 is.

The layout, in short (§4.9 has every field):

- The points of the batch form a dictionary: source names, and point names split at `.` into
  parts kept once each (listed by layer: every first part, then every second part...). `idx`
  gives each reading's point; `pk` each point's type and decimal places.
- Readings are *grouped* by point (a stable sort by `idx`): the value columns are in that
  order, so one point's values are adjacent. A consumer recomputes the same order from `idx`.
- Timestamps: the batch's distinct timestamps, sorted, as differences; each reading's position
  among them (a poll shares one).
- Types: per point (`pk`), and per reading only for a point whose type changes in the batch
  (`tx`). Qualities and status codes: run-length encoded.
- Values by type: booleans one byte each; integers as each point's first value and then the
  differences between successive values of the point; floats likewise as decimals (an integer
  `m` and the point's decimal places `k`: the value is the double nearest to m / 10^k), and
  every float that is not such a decimal (noise, NaN, -0.0, beyond 2^53) as its 8 bytes XOR the
  point's previous such float; text as a CBOR array.
- Integer columns are packed with a frame of reference (the minimum, then each value minus it
  as an unsigned little-endian integer of 1, 2, 4 or 8 bytes) or zigzag (differences around
  0) and byte-shuffled (all first bytes, then all second bytes...), which lets zstd find the
  runs; `ti` in 1, 2 or 4 bits a value; a column whose range does not fit 8 bytes is a CBOR
  array instead.

Only the standard library (struct, array, itertools, operator) and cbor2 are used. The work per
reading is done by C loops (`map`, `zip`, `itemgetter`, `struct`, `array`, big-integer shifts
and XOR, `bytes.translate`), not by Python statements per reading, and what depends only on a
batch's list of points is kept between batches (`ColumnEncoder`): that is what makes sealing
cheaper than format 1's map per reading (docs/performance.md, "Bytes on the wire").
"""

from __future__ import annotations

import math
import struct
import sys
from array import array
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import accumulate, chain, compress, count, pairwise, repeat
from operator import (
    add,
    and_,
    eq,
    itemgetter,
    mul,
    ne,
    neg,
    not_,
    or_,
    rshift,
    sub,
    truediv,
    xor,
)  # fmt: skip
from typing import Any, Protocol, cast

from edge_agent.errors import EdgeAgentError, EnvelopeError
from edge_agent.reading import Quality, Reading, Value

FORMAT_VERSION = 2
MAX_READINGS = 100_000
"""Readings in one format-2 batch at most: the limit of `batch.max_readings` (contract §2)."""
MAX_DECIMALS = 15
"""Decimal places at most: 10^k is then an exact double, so m / 10^k is one correct rounding."""
RAW = 16
"""The decimal places (`k`) of a point whose floats are all sent raw (XOR column)."""
MAX_SIGNIFICANT = 12
"""Significant digits at most for a point's floats to be sent as decimals (a float32 has 9)."""
DECIMAL_LIMIT = 2**53
"""A point whose first float is this large (or larger) is sent raw: no decimal places to save."""

T_NULL, T_BOOL, T_INT, T_FLOAT, T_TEXT = range(5)
TYPE_CODE: Mapping[type, int] = {
    type(None): T_NULL,
    bool: T_BOOL,
    int: T_INT,
    float: T_FLOAT,
    str: T_TEXT,
}
QUALITY_TEXT: Mapping[Any, str] = {q: q.value for q in Quality} | {
    q.value: q.value for q in Quality
}
"""Wire text of a quality, for the enum members and their text alike."""
QUALITIES = frozenset(q.value for q in Quality)
_BIG_ENDIAN = sys.byteorder == "big"
SCALES = [10.0**k for k in range(MAX_DECIMALS + 1)] + [1.0]

_CODE = {1: "B", 2: "H", 4: "I", 8: "Q"}
"""struct codes of the widths of `pack_ints` (with `<`: standard sizes, little-endian)."""
_UNKNOWN = 255
_CACHE_LIMIT = 100_000
"""Points whose decimal places (or name parts) an encoder remembers; cleared past this."""
_CACHED_READINGS = 20_000
"""Batch shapes an encoder keeps, in readings (one per distinct list of points in a batch that
comes back; about 250 bytes a reading: 5 MB at most)."""
_SEEN = 64
"""Shapes an encoder remembers having seen once (by hash), to keep those that come back."""
_PLANS = 8
"""Plans a shape keeps: one per sequence of value types (a point that is null when it fails)."""
T_MIXED = 7
"""The type in `pk` of a point whose readings in the batch are of more than one type."""
INT_LIMIT = 2**1088
"""Integers of a format-2 payload (`seq`, `t0`, column bases and `[1, ...]` values) lie strictly
within +-INT_LIMIT: a decimal's `m` is at most the largest double (under 2^1024) and a difference
of two under 2^1025, while a bigger integer, repeated by accumulation for every reading, would
let a payload of kilobytes decode into gigabytes."""
MAX_NAME_CHARS = 2**26
"""Characters of a format-2 batch's point names and their sources' names at most, counted per
point: joining name parts named again and again could otherwise make gigabytes of names (and of
COPY rows) from a small payload. Format 1 carries each reading's names itself, so its 64 MiB
payload limit bounds them alike."""

DIGEST_BYTES = 16
"""Bytes of a point catalogue's digest (§4.12): the first 16 of SHA-256 over its payload."""
_DICTIONARY_KEYS = ("src", "ps", "tok", "pn", "pi")
"""The keys of a batch's own points dictionary, which a batch that references a point catalogue
(§4.12) has instead `cat` and `cp`."""


class PointTable(Protocol):
    """A point catalogue as the decoder needs it (`catalogue.Catalogue`): its points, in order,
    as (source, point name), each one's type and decimal places (a `pk` byte, §4.9), and its
    digest (16 bytes), which the decoder checks against the batch's `cat`."""

    @property
    def digest(self) -> bytes: ...

    @property
    def points(self) -> Sequence[tuple[str, str]]: ...

    @property
    def pk(self) -> bytes: ...


class CatalogueKeeper(Protocol):
    """What an encoder asks of the agent's point catalogues (`catalogue.Catalogues`)."""

    version: int
    """Changes whenever the current catalogue does."""

    def positions(self, points: Sequence[tuple[str, str]], pk: bytes) -> list[int]:
        """Each point's position in the current catalogue, made anew (the version changes) when
        a point is not in it or `pk` differs from its `pk` for more than a quarter of them.
        Raises CatalogueTooLargeError when no catalogue a consumer takes can hold them."""
        ...

    def digest(self) -> bytes:
        """The current catalogue's digest."""
        ...

    def pk(self) -> bytes:
        """The current catalogue's `pk`, one byte per point."""
        ...


class CatalogueMissingError(EnvelopeError):
    """A batch references a point catalogue (§4.12) the consumer has not received, or not yet.

    Raised after the signature was checked: the batch is authentic, it only cannot be decoded
    until the catalogue with `digest` (16 bytes) arrives. A consumer keeps it, never refuses it.
    """

    def __init__(self, digest: bytes) -> None:
        super().__init__(f"format 2: point catalogue {digest.hex()} not received (yet)")
        self.digest = digest


class CatalogueTooLargeError(EdgeAgentError, ValueError):
    """No point catalogue a consumer takes (§4.12: 16 MiB, §4.9: 2^26 characters of names) can
    hold a batch's points: the batch carries its own points dictionary instead."""


# --------------------------------------------------------------------------- integer columns


def pack_ints(values: Sequence[int]) -> list[Any]:
    """A column of integers as `[0, base, width, bytes]` (frame of reference), `[2, width,
    bytes]` (zigzag) or `[1, values]`.

    Frame of reference: `bytes` holds `value - base` for each value, `width` (0, 1, 2, 4 or 8)
    bytes each, unsigned, little-endian, byte-shuffled: the first byte of every value, then the
    second... Width 0 means every value equals `base`. Zigzag, for a column with negative values
    that it packs as narrow (differences around 0): each value as `2v` (v >= 0) or `-2v - 1`
    (v < 0), packed the same way (width 1, 2, 4 or 8), so that small differences of either sign
    stay small. A column whose range needs more than 8 bytes is a CBOR array. The reader knows
    the length from elsewhere.
    """
    if not values:
        return [0, 0, 0, b""]
    low, high = min(values), max(values)
    span = high - low
    if span == 0:
        return [0, low, 0, b""]
    if span >= 2**64:
        return [1, list(values)]
    width = _width(span)
    if low < 0:
        zigzag = max(2 * high, -2 * low - 1)
        if zigzag < 2**64 and _width(zigzag) <= width:
            width = _width(zigzag)
            return [2, width, _shuffle(_zigzag(values, width), width)]
    shifted = values if low == 0 else map(sub, values, repeat(low))
    return [0, low, width, _shuffle(struct.pack(f"<{len(values)}{_CODE[width]}", *shifted), width)]


def pack_bits(values: Sequence[int]) -> list[Any]:
    """`pack_ints`, or for a column whose span is under 16, `[3, base, bits, bytes]`: each
    value minus `base` in `bits` (1, 2 or 4) bits, 8 / bits values a byte, the first in the low
    bits, the last byte padded with zero bits. For columns of a few random small values (`ti`),
    where zstd's byte-wise coding leaves most of each byte unused."""
    if not values:
        return pack_ints(values)
    low = min(values)
    span = max(values) - low
    if not 0 < span < 16:
        return pack_ints(values)
    data = bytes(map(sub, values, repeat(low))) if low else bytes(values)
    bits = 1 if span < 2 else 2 if span < 4 else 4
    per = 8 // bits
    data += bytes(-len(data) % per)
    whole = 0
    for i in range(per):
        whole |= int.from_bytes(data[i::per].translate(_SHIFTED[bits * i]), "little")
    return [3, low, bits, whole.to_bytes(len(data) // per, "little")]


_SHIFTED = [bytes((b << shift) & 0xFF for b in range(256)) for shift in range(8)]
_FIELD = {
    bits: [
        bytes((b >> (bits * i)) & ((1 << bits) - 1) for b in range(256)) for i in range(8 // bits)
    ]
    for bits in (1, 2, 4)
}
"""For each width in bits, the tables giving the i-th field of a byte (`unpack_ints`)."""


def _unpack_bits(column: list[Any], length: int, name: str) -> list[int]:
    _, base, bits, data = column
    if type(base) is not int or bits not in (1, 2, 4) or not isinstance(data, bytes):
        raise EnvelopeError(f"format 2: {name} has a malformed base, bits or data")
    _check_int(base, f"{name} base")
    per = 8 // bits
    if len(data) != -(-length // per):
        raise EnvelopeError(f"format 2: {name} has {len(data)} bytes, not {length} x {bits} bits")
    fields = bytearray(len(data) * per)
    for i, table in enumerate(_FIELD[bits]):
        fields[i::per] = data.translate(table)
    if fields[length:].count(0) != len(fields) - length:
        raise EnvelopeError(f"format 2: {name} is padded with bits that are not zero")
    return list(fields[:length]) if not base else list(map(add, fields[:length], repeat(base)))


def _width(span: int) -> int:
    return 1 if span < 0x100 else 2 if span < 0x10000 else 4 if span < 2**32 else 8


_SIGNED = {1: "b", 2: "h", 4: "i", 8: "q"}
"""array codes of signed integers of 1, 2, 4 and 8 bytes."""
assert all(array(code).itemsize == width for width, code in _SIGNED.items())
_ZIGZAG_BYTE = bytes(2 * b if b < 128 else 511 - 2 * b for b in range(256))
"""A two's complement byte (v in -128..127) to its zigzag byte."""


def _zigzag(values: Sequence[int], width: int) -> bytes:
    """Each value as its zigzag (`2v`, or `-2v - 1` for v < 0) in `width` bytes, little-endian.

    In C loops: the values as two's complement (an array), then every lane of the column at
    once as one big integer: shifted left by one bit within its lane, XOR its sign spread over
    the lane. The values must fit (`-2^(8 width - 1) <= v < 2^(8 width - 1)`).
    """
    column = array(_SIGNED[width], values)
    if _BIG_ENDIAN:
        column.byteswap()
    data = column.tobytes()
    if width == 1:
        return data.translate(_ZIGZAG_BYTE)
    bits = 8 * width
    whole = int.from_bytes(data, "little")
    low = int.from_bytes((b"\xfe" + b"\xff" * (width - 1)) * len(values), "little")
    ones = int.from_bytes((b"\x01" + b"\x00" * (width - 1)) * len(values), "little")
    sign = (whole >> (bits - 1)) & ones
    folded = ((whole << 1) & low) ^ (sign * ((1 << bits) - 1))
    return folded.to_bytes(len(data), "little")


def _shuffle(data: bytes, width: int) -> bytes:
    """`data`, values of `width` bytes, byte-shuffled: all first bytes, all second bytes..."""
    return data if width == 1 else b"".join([data[i::width] for i in range(width)])


def _unshuffle(data: bytes, width: int, length: int) -> bytes:
    if width == 1:
        return data
    planes = bytearray(len(data))
    for i in range(width):
        planes[i::width] = data[i * length : (i + 1) * length]
    return bytes(planes)


def unpack_ints(column: object, length: int, name: str) -> list[int]:
    """The `length` integers of a `pack_ints` column; EnvelopeError names the column."""
    if not isinstance(column, list) or not column:
        raise EnvelopeError(f"format 2: {name} is not a packed integer column")
    method = column[0]
    if method == 1 and len(column) == 2:
        values = column[1]
        if not isinstance(values, list) or len(values) != length:
            raise EnvelopeError(f"format 2: {name} does not hold {length} integers")
        if not all(type(v) is int for v in values):
            raise EnvelopeError(f"format 2: {name} holds a value that is not an integer")
        if values and (min(values) <= -INT_LIMIT or max(values) >= INT_LIMIT):
            raise EnvelopeError(f"format 2: {name} holds an integer beyond +-2^1088")
        return values
    if method == 2 and len(column) == 3:
        _, width, data = column
        if width not in (1, 2, 4, 8) or not isinstance(data, bytes):
            raise EnvelopeError(f"format 2: {name} has a malformed zigzag width or data")
        if len(data) != length * width:
            raise EnvelopeError(f"format 2: {name} has {len(data)} bytes, not {length} x {width}")
        if not length:
            return []
        folded = struct.unpack(f"<{length}{_CODE[width]}", _unshuffle(data, width, length))
        return list(map(xor, map(rshift, folded, repeat(1)), map(neg, map(and_, folded,
                                                                          repeat(1)))))  # fmt: skip
    if method == 3 and len(column) == 4:
        return _unpack_bits(column, length, name)
    if method != 0 or len(column) != 4:
        raise EnvelopeError(f"format 2: {name} has an unknown packing {column[:1]!r}")
    _, base, width, data = column
    if type(base) is not int or width not in (0, 1, 2, 4, 8) or not isinstance(data, bytes):
        raise EnvelopeError(f"format 2: {name} has a malformed base, width or data")
    _check_int(base, f"{name} base")
    if len(data) != length * width:
        raise EnvelopeError(f"format 2: {name} has {len(data)} bytes, not {length} x {width}")
    if width == 0:
        return [base] * length
    unpacked = struct.unpack(f"<{length}{_CODE[width]}", _unshuffle(data, width, length))
    return list(unpacked) if base == 0 else list(map(add, unpacked, repeat(base)))


def _check_int(value: int, name: str) -> None:
    """EnvelopeError unless `value` lies strictly within +-INT_LIMIT (see there: why)."""
    if not -INT_LIMIT < value < INT_LIMIT:
        raise EnvelopeError(f"format 2: {name} is an integer beyond +-2^1088")


def _new_point(owners: Sequence[int]) -> list[bool]:
    """For elements 1..n-1 of a column grouped by point: whether a new point starts there."""
    return list(map(ne, owners[1:], owners[:-1]))


def pack_series(values: Sequence[int], owners: Sequence[int]) -> list[Any]:
    """Integers grouped by point as `[first values, differences]`, two `pack_ints` columns.

    `owners` gives each value's point (grouped: equal points adjacent). The first column holds
    each point's first value; the second, for every other value, its difference from the
    point's previous value.
    """
    return _Series(owners).pack(values)


def unpack_series(column: object, owners: Sequence[int], name: str) -> list[int]:
    """The values of a `pack_series` column whose elements belong to `owners` (grouped)."""
    if not isinstance(column, list) or len(column) != 2:
        raise EnvelopeError(f"format 2: {name} is not [first values, differences]")
    if not owners:
        unpack_ints(column[0], 0, name)
        unpack_ints(column[1], 0, name)
        return []
    starts = [i + 1 for i in compress(count(), _new_point(owners))]  # where each point starts
    firsts = unpack_ints(column[0], len(starts) + 1, f"{name} first values")
    diffs = unpack_ints(column[1], len(owners) - len(firsts), f"{name} differences")
    out: list[int] = []
    used = 0
    for first, begin, end in zip(firsts, [0, *starts], [*starts, len(owners)], strict=True):
        out.extend(accumulate(diffs[used : used + end - begin - 1], initial=first))
        used += end - begin - 1
    return out


# --------------------------------------------------------------------------- runs


def runs(column: Sequence[Any]) -> tuple[list[Any], list[int]]:
    """`column` run-length encoded: the value of each run and its length (`!=` ends a run)."""
    length = len(column)
    if not length:
        return [], []
    if column.count(column[0]) == length:
        return [column[0]], [length]
    bounds = [0, *compress(count(1), map(ne, column[1:], column[:-1])), length]
    return list(map(column.__getitem__, bounds[:-1])), list(map(sub, bounds[1:], bounds[:-1]))


def pack_runs(values: list[Any] | bytes, lengths: list[int]) -> list[Any]:
    """A run-length column as `[values, lengths]`: a CBOR array and a `pack_ints` column."""
    return [values, pack_ints(lengths)]


def unpack_runs(column: object, length: int, name: str, valid: Any) -> list[Any]:
    """The `length` values of a `pack_runs` column, each run's value checked by `valid`."""
    if not isinstance(column, list) or len(column) != 2:
        raise EnvelopeError(f"format 2: {name} is not [values, run lengths]")
    values, lengths = column[0], column[1]
    if not isinstance(values, list | bytes) or len(values) > length:
        raise EnvelopeError(f"format 2: {name} has no list of run values")
    lengths = unpack_ints(lengths, len(values), f"{name} run lengths")
    if (lengths and min(lengths) < 1) or sum(lengths) != length:
        raise EnvelopeError(f"format 2: the runs of {name} do not cover {length} readings")
    for value in values:
        if not valid(value):
            raise EnvelopeError(f"format 2: {name} holds an invalid value {value!r}")
    return list(chain.from_iterable(map(repeat, values, lengths)))


# --------------------------------------------------------------------------- floats


def decimals(value: float) -> int:
    """Decimal places of the shortest text of `value` (`23.45`: 2), or RAW: not a decimal.

    Not a decimal: more than MAX_DECIMALS places or more than MAX_SIGNIFICANT significant digits
    (a computed float64 such as 0.1 + 0.2 has 17: as an integer it would cost more than raw).
    """
    if not math.isfinite(value):
        return RAW
    mantissa, _, exponent = repr(value).lstrip("-").partition("e")
    whole, _, fraction = mantissa.partition(".")
    fraction = fraction.rstrip("0")
    significant = len((whole + fraction).strip("0")) if fraction else len(whole.strip("0"))
    places = len(fraction) - (int(exponent) if exponent else 0)
    if significant > MAX_SIGNIFICANT or places > MAX_DECIMALS or abs(value) >= DECIMAL_LIMIT:
        return RAW
    return max(places, 0)


def _float_bits(values: array[float]) -> array[int]:
    bits = array("Q")
    bits.frombytes(values.tobytes())
    return bits


def _as_decimals(floats: list[float], scales: list[float]) -> tuple[list[int], bytes]:
    """Each float as `m = round(f * scale)`, and a mask: 1 where m / scale is not f exactly.

    `m` is always a whole number that a double holds exactly (the rounded double itself), so
    m / scale is one IEEE division, the same on every platform. The inexact ones (noise, NaN,
    infinities, -0.0, a value with more places than its point) are sent raw. An empty mask
    means all are exact.
    """
    try:
        ints = list(map(round, map(mul, floats, scales)))
    except (ValueError, OverflowError):  # NaN or infinity: element by element
        ints = [
            round(f * s) if math.isfinite(f * s) else 0 for f, s in zip(floats, scales, strict=True)
        ]
    back = array("d", map(truediv, ints, scales))
    exact = array("d", floats)
    if back == exact and back.tobytes() == exact.tobytes():
        return ints, b""
    return ints, bytes(map(ne, _float_bits(back), _float_bits(exact)))


def pack_xor(values: Sequence[float], owners: Sequence[int]) -> bytes:
    """Floats as their 8 bytes XOR the previous float of the same point, byte-shuffled.

    The bytes are those of the IEEE 754 double, little-endian; a point's first float is XOR 0.
    """
    return _xor(values, _xor_mask(owners))


def _xor_mask(owners: Sequence[int]) -> int:
    """For `_xor`: 64 one bits at each element that continues its point (0 at point starts)."""
    lanes = bytes(map(eq, owners[1:], owners[:-1]))  # element i+1 continues element i's point
    if not lanes.count(1):
        return 0
    return int.from_bytes(b"\x00" * 8 + lanes.replace(b"\x01", b"\xff" * 8).replace(
        b"\x00", b"\x00" * 8), "little")  # fmt: skip


def _xor(values: Sequence[float], mask: int) -> bytes:
    """`pack_xor` of `values` given `_xor_mask` of their points: the whole column at once, as
    one big integer XOR itself shifted by one element (masked at each point's start)."""
    if not values:
        return b""
    column = array("d", values)
    if _BIG_ENDIAN:
        column.byteswap()
    data = column.tobytes()
    if mask:
        whole = int.from_bytes(data, "little")
        data = (whole ^ ((whole << 64) & mask)).to_bytes(len(data), "little")
    return b"".join([data[i::8] for i in range(8)])


def unpack_xor(data: object, owners: Sequence[int], name: str) -> list[float]:
    """The floats of a `pack_xor` column whose elements belong to `owners` (grouped)."""
    size = len(owners)
    if not isinstance(data, bytes) or len(data) != 8 * size:
        raise EnvelopeError(f"format 2: {name} does not hold {size} floats of 8 bytes")
    if not size:
        return []
    planes = bytearray(len(data))
    for i in range(8):
        planes[i::8] = data[i * size : (i + 1) * size]
    xored = struct.unpack(f"<{size}Q", planes)
    bits = [xored[0]]
    for x, new in zip(xored[1:], _new_point(owners), strict=True):
        bits.append(x if new else x ^ bits[-1])
    return list(struct.unpack(f"<{size}d", struct.pack(f"<{size}Q", *bits)))


# --------------------------------------------------------------------------- encoder


class _Series:
    """What a series column (`pack_series`) needs of its elements' points, found once: where
    each point starts, and which elements have a difference."""

    __slots__ = ("firsts", "keep", "single")

    def __init__(self, owners: Sequence[int]) -> None:
        new = _new_point(owners)
        self.single = all(new)
        """Every element starts a point: the column is all first values."""
        self.keep = list(map(not_, new))
        self.firsts = _getter([0, *compress(count(1), new)] if owners else [])

    def pack(self, values: Sequence[int]) -> list[Any]:
        if self.single:
            return [pack_ints(values), pack_ints(())]
        diffs = list(compress(map(sub, values[1:], values[:-1]), self.keep))
        return [pack_ints(self.firsts(values)), pack_ints(diffs)]


def _getter(positions: Sequence[int]) -> Callable[[Sequence[Any]], Sequence[Any]]:
    """A function giving the elements of a sequence at `positions`, as a tuple (a C loop)."""
    if len(positions) > 1:
        return itemgetter(*positions)
    if positions:
        position = positions[0]
        return lambda sequence: (sequence[position],)
    return lambda sequence: ()


class _Floats:
    """How a batch shape's floats are encoded for given decimal places of its points."""

    __slots__ = ("dec", "mask", "pk", "places", "raw", "scales", "series")

    def __init__(self, places: list[int], pk_types: bytes, owners: list[int]) -> None:
        self.places = places
        self.pk = bytes(map(or_, pk_types, places))
        flags = bytes(map(places.__getitem__, owners))  # each float's places
        raw = list(map(eq, flags, repeat(RAW)))
        decimal = list(map(not_, raw))
        self.dec = _getter(list(compress(count(), decimal)))
        self.raw = _getter(list(compress(count(), raw)))
        self.scales = list(map(SCALES.__getitem__, compress(flags, decimal)))
        self.series = _Series(list(compress(owners, decimal)))
        self.mask = _xor_mask(list(compress(owners, raw)))


class _Plan:
    """How a batch shape's values are split by type, for one sequence of value types."""

    __slots__ = (
        "bools",
        "convert",
        "encoded",
        "floats",
        "ints",
        "owners",
        "pk_types",
        "texts",
        "tx",
        "version",
    )  # fmt: skip

    def __init__(self, shape: _Shape, kinds: tuple[type, ...]) -> None:
        order, owners = shape.order, shape.owners
        codes = bytes(map(TYPE_CODE.__getitem__, map(kinds.__getitem__, order)))  # grouped
        pairs = dict(zip(owners, codes, strict=True))  # each point's last type
        point_types = list(map(pairs.__getitem__, range(len(shape.points))))
        mixed = bytes(map(ne, codes, map(point_types.__getitem__, owners)))
        if mixed.count(1):
            for p in set(compress(owners, mixed)):
                point_types[p] = T_MIXED
        self.tx = bytes(compress(codes, map(eq, map(point_types.__getitem__, owners),
                                            repeat(T_MIXED))))  # fmt: skip
        self.pk_types = bytes(t << 5 for t in point_types)
        by_code = {c: list(map(eq, codes, repeat(c))) for c in set(codes)}
        get = {c: _getter(list(compress(order, where))) for c, where in by_code.items()}
        self.bools, self.texts, self.floats = get.get(T_BOOL), get.get(T_TEXT), get.get(T_FLOAT)
        ints = by_code.get(T_INT)
        self.ints = (get[T_INT], _Series(list(compress(owners, ints)))) if ints else None
        floats = by_code.get(T_FLOAT)
        self.owners = list(compress(owners, floats)) if floats else []
        """The point of each float, in grouped order."""
        self.convert = False
        """The values must be made plain (an IntEnum as an int) before they are encoded."""
        self.version = -1
        self.encoded: _Floats | None = None


class _Shape:
    """What a batch's list of (source, point) determines: its points, their dictionary and
    `idx` (the head of the payload), the grouped order, and the plans of its value types."""

    __slots__ = ("catalogued", "head", "order", "owners", "plans", "points")

    def __init__(self, src: tuple[str, ...], pt: tuple[str, ...], head: Callable[..., Any]) -> None:
        first: dict[tuple[str, str], int] = {}  # point -> position of its first reading
        where = list(map(first.setdefault, zip(src, pt, strict=True), count()))
        number = {position: i for i, position in enumerate(first.values())}
        idx = list(map(number.__getitem__, where))
        self.points = list(first)
        self.order = sorted(range(len(idx)), key=idx.__getitem__)
        self.owners = sorted(idx)
        self.head = {**head(self.points), "idx": pack_ints(list(map(sub, idx, [0, *idx[:-1]])))}
        self.plans: dict[tuple[type, ...], _Plan] = {}
        self.catalogued: tuple[int, bytes, list[Any], bytes] | None = None
        """With a point catalogue: its version, digest, `cp` and `pk` for these points."""


class ColumnEncoder:
    """Encodes readings as format-2 columns (the fields of §4.9 after `v` ... `evicted`).

    It remembers, per point, the decimal places its floats need (23.45 needs 2: the point's
    resolution), as the most any of its values needed, up to MAX_DECIMALS; a point whose values
    are not short decimals is remembered as RAW. Each batch carries the places it used, so it
    decodes on its own; a value that needs more is sent raw and teaches the encoder for the next
    batch.

    The work per reading is done in C loops (`map`, `itemgetter`, `struct`, big-integer XOR).
    What depends only on a batch's list of points (its *shape*: the dictionary, `idx`, the
    grouped order) and on the types of its values (the split by type) is kept for the recent
    shapes: the same polls make the same lists of points, so a gateway whose polls fill whole
    batches encodes only its values, timestamps and qualities once warm (docs/performance.md).
    """

    def __init__(self, catalogues: CatalogueKeeper | None = None) -> None:
        """`catalogues`: reference the agent's point catalogues (§4.12) instead of writing the
        points dictionary into each batch; None: every batch carries its own."""
        self._catalogues = catalogues
        self.referenced = False
        """Whether the last batch encoded references the current point catalogue."""
        self._places: dict[tuple[str, str], int] = {}
        self._version = 0
        """Changes whenever `_places` does: the float plans made before are then remade."""
        self._shapes: dict[tuple[tuple[str, ...], tuple[str, ...]], _Shape] = {}
        """Recent shapes by their points' sources and names (tuples of text: cheap to hash,
        and not traversed by the garbage collector)."""
        self._cached = 0
        """Readings of the shapes kept."""
        self._seen: dict[int, None] = {}
        """Hashes of the shapes seen once, oldest first."""
        self._parts: dict[str, tuple[str, ...]] = {}
        """Each point name split at `.`."""

    def encode(self, readings: Sequence[Reading], first_seq: int) -> dict[str, Any]:
        """The format-2 fields of a payload for `readings` numbered from `first_seq`.

        Raises ValueError for more than MAX_READINGS readings or a quality that is not one of
        §4.4's, TypeError for a value of no reading type; text is checked by the CBOR encoder.
        """
        length = len(readings)
        if length > MAX_READINGS:
            raise ValueError(f"{length} readings in one batch; format 2 allows {MAX_READINGS}")
        self.referenced = False
        if not length:
            return _empty(first_seq)
        src, pt, ts, values, qualities, codes = zip(*readings, strict=True)
        shape = self._shape(src, pt)
        kinds = tuple(map(type, values))
        plan = shape.plans.get(kinds)
        if plan is None:
            plan = self._plan(shape, kinds, values)
        if plan.convert:
            values = tuple(map(_plain, values))
        t0 = ts[0]
        if ts.count(t0) == length:  # one poll: one timestamp
            times, positions = [t0], [0, 0, 0, b""]
        else:
            times = sorted(set(ts))
            where = list(map({t: i for i, t in enumerate(times)}.__getitem__, ts))
            positions = pack_bits(list(map(sub, where, [0, *where[:-1]])))
        columns = {
            "seq": first_seq,
            "n": length,
            **shape.head,
            "t0": times[0],
            "nt": len(times),
            "ts": pack_ints(list(map(sub, times[1:], times[:-1]))),
            "ti": positions,
            "pk": plan.pk_types,
            "tx": plan.tx,
            "q": _qualities(qualities),
            "sc": pack_runs(*runs(codes)),
            "bool": bytes(plan.bools(values)) if plan.bools else b"",
            "int": plan.ints[1].pack(plan.ints[0](values)) if plan.ints else _NO_SERIES,
            "float": _NO_FLOATS,
            "text": list(plan.texts(values)) if plan.texts else [],
        }
        if plan.floats:
            columns["float"], columns["pk"] = self._floats(plan, plan.floats(values), shape)
        if self._catalogues is not None:
            self._reference(columns, shape, self._catalogues)
        return columns

    def _reference(
        self, columns: dict[str, Any], shape: _Shape, catalogues: CatalogueKeeper
    ) -> None:
        """Make `columns` reference the current point catalogue (`cat`, `cp`, `pk` as XOR)."""
        pk = columns["pk"]
        cached = shape.catalogued
        if cached is not None and cached[0] == catalogues.version:
            delta = bytes(map(xor, pk, cached[3]))
            if (len(delta) - delta.count(0)) * 4 <= len(delta):
                columns["cat"], columns["cp"], columns["pk"] = cached[1], cached[2], delta
                self.referenced = True
                return
        try:
            positions = catalogues.positions(shape.points, pk)
        except CatalogueTooLargeError:  # the batch carries its own points (self-contained)
            columns.update(points_dictionary(shape.points, self._split(shape.points)))
            return
        base = bytes(map(catalogues.pk().__getitem__, positions))
        cp = pack_ints(list(map(sub, positions, [0, *positions[:-1]])))
        shape.catalogued = (catalogues.version, catalogues.digest(), cp, base)
        columns["cat"], columns["cp"], columns["pk"] = (
            shape.catalogued[1],
            cp,
            bytes(map(xor, pk, base)),
        )
        self.referenced = True

    def remember_places(self, points: Sequence[tuple[str, str]], pk: bytes) -> None:
        """Take the decimal places of each float (or mixed) point from `pk` (a catalogue's,
        resumed after a restart), as if its earlier floats had taught them."""
        for point, byte in zip(points, pk, strict=True):
            if byte >> 5 in (T_FLOAT, T_MIXED):
                self._places[point] = byte & 31
        self._version += 1

    def _shape(self, src: tuple[str, ...], pt: tuple[str, ...]) -> _Shape:
        """The shape of a batch of these sources and points: kept if it was seen before.

        A shape costs about 250 bytes a reading kept, so only a shape that comes back is kept
        (batches cut at varying places of the polls never do), and at most _CACHED_READINGS
        readings' worth of shapes, the oldest dropped first."""
        key = (src, pt)
        shape = self._shapes.get(key)
        if shape is not None:
            return shape
        shape = _Shape(src, pt, self._dictionary)
        digest = hash(key)
        if digest not in self._seen:
            if len(self._seen) >= _SEEN:
                self._seen.pop(next(iter(self._seen)))
            self._seen[digest] = None
            return shape
        size = len(src)
        if size <= _CACHED_READINGS:
            while self._shapes and self._cached + size > _CACHED_READINGS:
                dropped = self._shapes.pop(next(iter(self._shapes)))  # the oldest goes
                self._cached -= len(dropped.order)
            self._shapes[key] = shape
            self._cached += size
        return shape

    def _plan(self, shape: _Shape, kinds: tuple[type, ...], values: tuple[Any, ...]) -> _Plan:
        """The plan of `shape` for the value types `kinds` (made, and kept for the shape)."""
        if len(shape.plans) >= _PLANS:
            shape.plans.clear()
        if all(kind in TYPE_CODE for kind in set(kinds)):
            plan = _Plan(shape, kinds)
        else:
            plan = _Plan(shape, tuple(map(type, map(_plain, values))))
            plan.convert = True
        shape.plans[kinds] = plan
        return plan

    def _dictionary(self, points: list[tuple[str, str]]) -> dict[str, Any]:
        if self._catalogues is not None:  # the catalogue holds the names (`_reference`)
            return {"np": len(points)}
        return points_dictionary(points, self._split(points))

    def _split(self, points: list[tuple[str, str]]) -> list[tuple[str, ...]]:
        """Each point's name split at `.`, from the cache (filled for names not seen yet)."""
        parts = self._parts
        names = list(map(itemgetter(1), points))
        split = list(map(parts.get, names))
        if None in split:
            if len(parts) + len(names) > _CACHE_LIMIT:
                parts.clear()
            for name in names:
                if name not in parts:
                    parts[name] = tuple(name.split("."))
            split = list(map(parts.__getitem__, names))
        return cast(list[tuple[str, ...]], split)

    def _floats(
        self, plan: _Plan, floats: Sequence[float], shape: _Shape
    ) -> tuple[dict[str, Any], bytes]:
        """The `float` column and `pk`: the decimals as integers, the rest raw (XOR column).

        The usual case (every float of a decimal point is the decimal its places say) takes
        the plan's split as it is; otherwise the floats are split one by one (`_exceptions`).
        """
        encoded = plan.encoded
        if encoded is None or plan.version != self._version:
            encoded = plan.encoded = _Floats(
                self._places_of(floats, plan.owners, shape.points), plan.pk_types, plan.owners
            )
            plan.version = self._version
        decimal = encoded.dec(floats)
        if decimal:
            scales = encoded.scales
            try:
                ints = list(map(round, map(mul, decimal, scales)))
            except (ValueError, OverflowError):  # NaN or infinity
                return self._exceptions(plan, list(floats), shape, encoded)
            back = array("d", list(map(truediv, ints, scales)))  # from a list: one allocation
            if back.tobytes() != array("d", decimal).tobytes():  # bit for bit: -0.0 is not 0.0
                return self._exceptions(plan, list(floats), shape, encoded)
            dec = encoded.series.pack(ints)
        else:
            dec = _NO_SERIES
        return {"x": [], "dec": dec, "xor": _xor(encoded.raw(floats), encoded.mask)}, encoded.pk

    def _places_of(
        self, floats: Sequence[float], owners: list[int], points: list[tuple[str, str]]
    ) -> list[int]:
        """The decimal places of each point (0 for a point without floats), learnt from its
        first float for a point not seen before."""
        known = self._places
        places = [0] * len(points)
        for start in (0, *compress(count(1), _new_point(owners))):
            p = owners[start]
            k = known.get(points[p])
            if k is None:
                if len(known) >= _CACHE_LIMIT:
                    known.clear()
                k = known[points[p]] = decimals(floats[start])
                self._version += 1
            places[p] = k
        return places

    def _exceptions(
        self, plan: _Plan, floats: list[float], shape: _Shape, encoded: _Floats
    ) -> tuple[dict[str, Any], bytes]:
        """The `float` column when some floats of decimal points are not their decimals."""
        owners, places = plan.owners, encoded.places
        flags = bytes(map(places.__getitem__, owners))
        raw = list(map(eq, flags, repeat(RAW)))
        raw_floats, raw_owners = list(compress(floats, raw)), list(compress(owners, raw))
        kept = list(map(not_, raw))
        floats, owners = list(compress(floats, kept)), list(compress(owners, kept))
        scales = list(map(SCALES.__getitem__, compress(flags, kept)))
        ints, inexact = _as_decimals(floats, scales)
        inexact = inexact or bytes(len(floats))
        exceptions = list(compress(count(), inexact))
        self._learn([floats[i] for i in exceptions], [owners[i] for i in exceptions], shape.points)
        exact = list(map(not_, inexact))
        raw_floats, raw_owners = _merge(
            raw_floats, raw_owners, list(compress(floats, inexact)), list(compress(owners, inexact))
        )
        ints, owners = list(compress(ints, exact)), list(compress(owners, exact))
        column = {"x": exceptions, "dec": pack_series(ints, owners),
                  "xor": pack_xor(raw_floats, raw_owners)}  # fmt: skip
        return column, encoded.pk

    def _learn(self, values: list[float], owners: list[int], points: list[tuple[str, str]]) -> None:
        """More decimal places for a point whose value needed them, for the next batches; RAW
        for a point whose value is no short decimal (it is sent raw from then on)."""
        done: set[int] = set()
        for value, p in zip(values, owners, strict=True):
            if p in done:
                continue
            done.add(p)
            places = decimals(value)
            if places == RAW and not math.isfinite(value):
                continue  # a NaN now and then: the point stays decimal, the NaN an exception
            if places > self._places.get(points[p], 0):
                self._places[points[p]] = places
                self._version += 1


def _merge(first: list[float], first_owners: list[int], second: list[float],
           second_owners: list[int]) -> tuple[list[float], list[int]]:  # fmt: skip
    """Two columns grouped by point (of disjoint points) as one, grouped by point."""
    if not first:
        return second, second_owners
    tagged = sorted(
        [(p, 0, i) for i, p in enumerate(first_owners)]
        + [(p, 1, i) for i, p in enumerate(second_owners)]
    )
    values = [first[i] if side == 0 else second[i] for _, side, i in tagged]
    return values, [p for p, _, _ in tagged]


def _qualities(qualities: tuple[Any, ...]) -> list[Any]:
    values, lengths = runs(qualities)
    try:
        return pack_runs([QUALITY_TEXT[q] for q in values], lengths)
    except KeyError as exc:
        raise ValueError(f"quality {exc.args[0]!r} is not one of {sorted(QUALITIES)}") from None


def points_dictionary(
    points: list[tuple[str, str]], split: Sequence[Sequence[str]] | None = None
) -> dict[str, Any]:
    """The points dictionary: `src`, `ps` (each point's source), `tok`, `pn`, `pi` (names).

    Each point name is split at `.` into parts (`split`: the parts of each, if known); the
    distinct parts are `tok`, sorted (joined with newlines, or an array when a part holds a
    newline), `pn` the number of parts of each name and `pi` the position in `tok` of every
    part, by layer: the first part of every name, then the second part of every name that has
    one... (the equipment names together, then the measures: each layer has few distinct
    parts, which zstd codes in fewer bits than the parts mixed).
    """
    owners = list(map(itemgetter(0), points))
    sources = {name: i for i, name in enumerate(dict.fromkeys(owners))}
    if split is None:
        split = list(map(str.split, map(itemgetter(1), points), repeat(".")))
    flat = list(chain.from_iterable(split))
    tokens = {tok: i for i, tok in enumerate(sorted(set(flat)))}
    joined = "\n".join(tokens)
    by_layer = map(flat.__getitem__, _layers(list(map(len, split))))
    positions = list(map(tokens.__getitem__, by_layer))
    return {
        "np": len(points),
        "src": list(sources),
        "ps": pack_ints(list(map(sources.__getitem__, owners))),
        "tok": joined if tokens and joined.count("\n") == len(tokens) - 1 else list(tokens),
        "pn": pack_ints(list(map(len, split))),
        "pi": pack_ints(positions),
    }


def _layers(counts: list[int]) -> list[int]:
    """The parts of names of `counts` parts each (flattened, name after name) in layer order:
    the positions of every first part, then of every second part, and so on."""
    layer = list(chain.from_iterable(map(range, counts)))
    return sorted(range(len(layer)), key=layer.__getitem__)


def _empty(first_seq: int) -> dict[str, Any]:
    return {
        "seq": first_seq,
        "n": 0,
        **points_dictionary([]),
        "idx": pack_ints(()),
        "t0": 0,
        "nt": 0,
        "ts": pack_ints(()),
        "ti": pack_ints(()),
        "pk": b"",
        "tx": b"",
        "q": pack_runs([], []),
        "sc": pack_runs([], []),
        "bool": b"",
        "int": _NO_SERIES,
        "float": _NO_FLOATS,
        "text": [],
    }


_NO_SERIES: list[Any] = [[0, 0, 0, b""], [0, 0, 0, b""]]
_NO_FLOATS: dict[str, Any] = {"x": [], "dec": _NO_SERIES, "xor": b""}


def _plain(value: Any) -> Value:
    """A value of a subclass of a reading type (an IntEnum, a str subclass) as the plain type."""
    if value is None:
        return None
    for kind in (bool, int, float, str):
        if isinstance(value, kind):
            return kind(value)
    raise TypeError(f"a {type(value).__name__} is not a reading value")


# --------------------------------------------------------------------------- decoder


def _is_quality(value: object) -> bool:
    return isinstance(value, str) and value in QUALITIES


def _is_code(value: object) -> bool:
    return value is None or type(value) is int


_KEYS = (
    "seq", "n", "np", "src", "ps", "tok", "pn", "pi", "idx", "t0", "nt", "ts", "ti", "pk", "tx",
    "q", "sc", "bool", "int", "float", "text",
)  # fmt: skip
_KEYS_1_5 = (*_KEYS[:13], "types", *_KEYS[15:])
_KEYS_CATALOGUED = (*(key for key in _KEYS if key not in _DICTIONARY_KEYS), "cat", "cp")
"""The keys of a batch that references a point catalogue (§4.12, since 2.4)."""
"""The keys of the layout of contract 1.5-1.17 (§4.9, "Earlier layout"), still read: a buffer
sealed by an older agent drains through an upgraded consumer."""


@dataclass(frozen=True)
class Columns:
    """A format-2 batch's readings as columns, each in seq order (reading i has seq `first + i`).

    `src`, `pt`: text; `ts`: Unix ns; `values`: None, bool, int, float or text; `q`: quality
    text of §4; `sc`: status code or None. What `decode` turns into a map per reading, and what
    a consumer that writes columns (ingest's COPY rows) takes without the maps.
    """

    first: int
    src: list[str]
    pt: list[str]
    ts: list[int]
    values: list[Value]
    q: list[str]
    sc: list[int | None]

    def __len__(self) -> int:
        return len(self.ts)


def decode(
    body: Mapping[Any, Any], catalogues: Mapping[bytes, PointTable] | None = None
) -> list[dict[str, Any]]:
    """The readings of a format-2 payload map, as format 1 gives them (§4.4 maps, in seq order).

    `catalogues`: the point catalogues received (§4.12), by digest, for a batch that references
    one. Raises CatalogueMissingError when it references one not among them, and EnvelopeError
    naming the first thing that is not as §4.9 says; never another error.
    """
    return to_maps(decode_columns(body, catalogues))


def to_maps(columns: Columns) -> list[dict[str, Any]]:
    """The readings of `columns` as §4.4 maps (`sc` only where there is a status code)."""
    out: list[dict[str, Any]] = []
    append = out.append
    for i, (source, point, ts, value, quality, code) in enumerate(
        zip(
            columns.src, columns.pt, columns.ts, columns.values, columns.q, columns.sc, strict=True
        ),
        columns.first,
    ):
        reading = {"seq": i, "src": source, "pt": point, "ts": ts, "v": value, "q": quality}
        if code is not None:
            reading["sc"] = code
        append(reading)
    return out


def decode_columns(
    body: Mapping[Any, Any], catalogues: Mapping[bytes, PointTable] | None = None
) -> Columns:
    """The readings of a format-2 payload map as `Columns`; arguments and errors as `decode`'s."""
    try:
        return _decode(body, catalogues)
    except EnvelopeError:
        raise
    except (ValueError, TypeError, KeyError, IndexError, OverflowError, StopIteration) as exc:
        raise EnvelopeError(f"format 2: malformed columns: {type(exc).__name__}: {exc}") from None


def _decode(body: Mapping[Any, Any], catalogues: Mapping[bytes, PointTable] | None) -> Columns:
    earlier = "types" in body and "pk" not in body
    catalogued = "cat" in body
    keys = _KEYS_1_5 if earlier else _KEYS_CATALOGUED if catalogued else _KEYS
    missing = [key for key in keys if key not in body]
    if missing:
        raise EnvelopeError(f"format 2: payload lacks {', '.join(missing)}")
    if catalogued and any(key in body for key in _DICTIONARY_KEYS):
        raise EnvelopeError("format 2: a batch with cat has its own points dictionary too")
    length, first = body["n"], body["seq"]
    if type(length) is not int or not 0 <= length <= MAX_READINGS:
        raise EnvelopeError(f"format 2: reading count {length!r} is not 0..{MAX_READINGS}")
    if type(first) is not int:
        raise EnvelopeError(f"format 2: first seq {first!r} is not an integer")
    _check_int(first, "seq")
    base = None
    if catalogued:
        points, base = _catalogued_points(body, length, catalogues)
    else:
        points = decode_points(body, length, by_layer=not earlier)
    idx = list(accumulate(unpack_ints(body["idx"], length, "idx")))
    if length and (min(idx) < 0 or max(idx) >= len(points)):
        raise EnvelopeError(f"format 2: idx refers beyond the {len(points)} points")
    ts = _decode_times(body, length)
    order = sorted(range(length), key=idx.__getitem__)
    owners = sorted(idx)
    if earlier:
        types, places = _decode_types_1_5(body, length, len(points))
    else:
        types, places = _decode_types(body, owners, len(points), base)
    qualities = unpack_runs(body["q"], length, "q", _is_quality)
    codes = unpack_runs(body["sc"], length, "sc", _is_code)
    by_type: list[list[int]] = [[] for _ in range(T_TEXT + 1)]
    for kind, p in zip(types, owners, strict=True):
        by_type[kind].append(p)
    flags = body["bool"]
    if not isinstance(flags, bytes) or len(flags) != len(by_type[T_BOOL]):
        raise EnvelopeError(f"format 2: bool does not hold {len(by_type[T_BOOL])} bytes")
    if flags.strip(b"\x00\x01"):
        raise EnvelopeError("format 2: a bool byte is neither 0 nor 1")
    texts = body["text"]
    if not isinstance(texts, list) or len(texts) != len(by_type[T_TEXT]):
        raise EnvelopeError(f"format 2: text does not hold {len(by_type[T_TEXT])} strings")
    if not all(type(t) is str for t in texts):
        raise EnvelopeError("format 2: text holds a value that is not text")
    columns: list[Iterable[Value]] = [
        repeat(None),
        map(bool, flags),
        unpack_series(body["int"], by_type[T_INT], "int"),
        _decode_floats(body["float"], by_type[T_FLOAT], places, earlier=earlier),
        texts,
    ]
    streams = [iter(column) for column in columns]
    grouped = [next(streams[kind]) for kind in types]
    values: list[Value] = [None] * length
    for j, i in enumerate(order):  # grouped by point back to seq order
        values[i] = grouped[j]
    where = list(map(points.__getitem__, idx))
    return Columns(
        first,
        list(map(itemgetter(0), where)),
        list(map(itemgetter(1), where)),
        ts,
        values,
        qualities,
        codes,
    )


def decode_points(body: Mapping[Any, Any], length: int, *, by_layer: bool) -> list[tuple[str, str]]:
    """The (source, point name) of each point of a points dictionary (`np`, `src`, `ps`, `tok`,
    `pn`, `pi`: a batch's, or a catalogue's, §4.12) of at most `length` points; `by_layer`: `pi`
    lists the parts by layer (2.0 and later). Raises EnvelopeError naming what is wrong."""
    size, sources, tokens = body["np"], body["src"], body["tok"]
    if type(size) is not int or not 0 <= size <= length:
        raise EnvelopeError(f"format 2: np {size!r} is not 0..{length} (one point per reading)")
    if not isinstance(sources, list) or not all(type(s) is str for s in sources):
        raise EnvelopeError("format 2: src is not an array of source names")
    if isinstance(tokens, str):
        tokens = tokens.split("\n")
    elif not isinstance(tokens, list) or not all(type(t) is str for t in tokens):
        raise EnvelopeError("format 2: tok is neither text nor an array of name parts")
    owner = unpack_ints(body["ps"], size, "ps")
    if owner and (min(owner) < 0 or max(owner) >= len(sources)):
        raise EnvelopeError(f"format 2: ps refers beyond the {len(sources)} sources")
    parts = unpack_ints(body["pn"], size, "pn")
    if parts and (min(parts) < 1 or sum(parts) > MAX_READINGS * 64):
        raise EnvelopeError("format 2: pn gives a point name of no parts, or too many")
    where = unpack_ints(body["pi"], sum(parts), "pi")
    if where and (min(where) < 0 or max(where) >= len(tokens)):
        raise EnvelopeError(f"format 2: pi refers beyond the {len(tokens)} name parts")
    chars = sum(map(list(map(len, tokens)).__getitem__, where)) + len(where) - size
    chars += sum(map(list(map(len, sources)).__getitem__, owner))
    if chars > MAX_NAME_CHARS:
        raise EnvelopeError(
            f"format 2: the point names and their sources hold {chars} characters, more than"
            f" {MAX_NAME_CHARS}"
        )
    words: list[str] = list(map(tokens.__getitem__, where))
    if by_layer:
        words = _name_order(words, parts)
    ends = list(accumulate(parts))
    names = [".".join(words[end - count : end]) for count, end in zip(parts, ends, strict=True)]
    return list(zip(map(sources.__getitem__, owner), names, strict=True))


def _name_order(by_layer: list[str], counts: list[int]) -> list[str]:
    """The name parts `by_layer` (every first part, then every second...) name after name.

    Layer by layer over the names that still have a part there, rather than `_layers`' sort:
    a hostile `pn` of 6,400,000 parts would make the sort's 6,400,000 int objects (about
    250 MB); this keeps one int per name."""
    starts = list(accumulate(counts, initial=0))
    words = [""] * len(by_layer)
    alive = list(range(len(counts)))
    used = layer = 0
    while alive:
        if len(alive) == 1:  # the rest is one name's (a long name: no loop per layer)
            words[starts[alive[0]] + layer : starts[alive[0] + 1]] = by_layer[used:]
            break
        for p, word in zip(alive, by_layer[used : used + len(alive)], strict=True):
            words[starts[p] + layer] = word
        used += len(alive)
        layer += 1
        alive = [p for p in alive if counts[p] > layer]
    return words


def _decode_times(body: Mapping[Any, Any], length: int) -> list[int]:
    t0, distinct = body["t0"], body["nt"]
    if type(t0) is not int or type(distinct) is not int or not 0 <= distinct <= length:
        raise EnvelopeError(f"format 2: t0 {t0!r} or nt {distinct!r} is not as §4.9 says")
    if length and not distinct:
        raise EnvelopeError("format 2: readings without timestamps (nt 0)")
    _check_int(t0, "t0")
    times = list(accumulate(unpack_ints(body["ts"], max(distinct - 1, 0), "ts"), initial=t0))
    where = list(accumulate(unpack_ints(body["ti"], length, "ti")))
    if where and (min(where) < 0 or max(where) >= distinct):
        raise EnvelopeError(f"format 2: ti refers beyond the {distinct} timestamps")
    return list(map(times.__getitem__, where))


def _catalogued_points(
    body: Mapping[Any, Any], length: int, catalogues: Mapping[bytes, PointTable] | None
) -> tuple[list[tuple[str, str]], bytes]:
    """The points of a batch that references a point catalogue (§4.12), and the catalogue's
    `pk` byte of each (the batch's `pk` is its XOR with them)."""
    digest, size = body["cat"], body["np"]
    if not isinstance(digest, bytes) or len(digest) != DIGEST_BYTES:
        raise EnvelopeError(f"format 2: cat is not a digest of {DIGEST_BYTES} bytes")
    if type(size) is not int or not 0 <= size <= length:
        raise EnvelopeError(f"format 2: np {size!r} is not 0..{length} (one point per reading)")
    if not length:  # else a declaration could wait for ever, holding back its evicted ranges
        raise EnvelopeError("format 2: a batch of no readings references a point catalogue")
    table = None if catalogues is None else catalogues.get(digest)
    if table is None:
        raise CatalogueMissingError(digest)
    if table.digest != digest:  # a consumer's slip would otherwise give other points' names
        raise EnvelopeError(
            f"format 2: the catalogue kept as {digest.hex()} is {table.digest.hex()}"
        )
    known = table.points
    positions = list(accumulate(unpack_ints(body["cp"], size, "cp")))
    if positions and (min(positions) < 0 or max(positions) >= len(known)):
        raise EnvelopeError(
            f"format 2: cp refers beyond the {len(known)} points of catalogue {digest.hex()}"
        )
    points = list(map(known.__getitem__, positions))
    chars = sum(map(len, chain.from_iterable(points)))
    if chars > MAX_NAME_CHARS:
        raise EnvelopeError(
            f"format 2: the point names and their sources hold {chars} characters, more than"
            f" {MAX_NAME_CHARS}"
        )
    return points, bytes(map(table.pk.__getitem__, positions))


def check_pk(pk: bytes) -> tuple[bytes, bytes]:
    """The type (`pk >> 5`) and decimal places (`pk & 31`) of each point of a `pk` (§4.9).

    Raises EnvelopeError for an unknown type, places above RAW, or places of a point whose type
    is neither float nor mixed."""
    kinds = bytes(b >> 5 for b in pk)
    places = bytes(b & 31 for b in pk)
    if kinds.translate(None, bytes((*range(T_TEXT + 1), T_MIXED))):
        raise EnvelopeError("format 2: pk gives a point an unknown type")
    if places.translate(None, bytes(range(RAW + 1))):
        raise EnvelopeError(f"format 2: pk gives decimal places above {RAW}")
    if any(k and t not in (T_FLOAT, T_MIXED) for t, k in zip(kinds, places, strict=True)):
        raise EnvelopeError("format 2: pk gives decimal places to a point without floats")
    return kinds, places


def _decode_types(
    body: Mapping[Any, Any], owners: list[int], point_count: int, base: bytes | None = None
) -> tuple[bytes, bytes]:
    """The type code of each reading in grouped order, and the decimal places of each point
    (`base`: the catalogue's `pk` of each point, which the batch's is XORed with)."""
    pk, mixed = body["pk"], body["tx"]
    if not isinstance(pk, bytes) or len(pk) != point_count:
        raise EnvelopeError(f"format 2: pk does not hold {point_count} bytes")
    if base is not None:
        pk = bytes(map(xor, pk, base))
    kinds, places = check_pk(pk)
    types = bytearray(map(kinds.__getitem__, owners))
    where = list(compress(count(), map(eq, types, repeat(T_MIXED))))
    if not isinstance(mixed, bytes) or len(mixed) != len(where):
        raise EnvelopeError(f"format 2: tx does not hold {len(where)} bytes")
    if mixed.translate(None, bytes(range(T_TEXT + 1))):
        raise EnvelopeError("format 2: tx holds an unknown type")
    if mixed:
        pairs = set(zip(map(owners.__getitem__, where), mixed, strict=True))
        single = Counter(p for p, _ in pairs)
        if 1 in single.values():
            p = min(p for p, seen in single.items() if seen == 1)
            raise EnvelopeError(f"format 2: tx gives mixed point {p} one type only")
    for position, kind in zip(where, mixed, strict=True):
        types[position] = kind
    return bytes(types), places


def _decode_types_1_5(
    body: Mapping[Any, Any], length: int, point_count: int
) -> tuple[bytes, bytes]:
    """`_decode_types` for the layout of 1.5-1.17: `types` runs and the places in `float.k`."""
    types = bytes(unpack_runs(body["types"], length, "types", _is_type))
    column = body["float"]
    if not isinstance(column, dict) or set(column) != {"k", "x", "dec", "xor"}:
        raise EnvelopeError("format 2: float is not a map of k, x, dec and xor")
    places = column["k"]
    if not isinstance(places, bytes) or len(places) != point_count:
        raise EnvelopeError(f"format 2: float k does not hold {point_count} bytes")
    if places and max(places) > RAW:
        raise EnvelopeError(f"format 2: float k is above {RAW}")
    return types, places


def _is_type(value: object) -> bool:
    return type(value) is int and T_NULL <= value <= T_TEXT


def _decode_floats(
    column: object, owners: list[int], places: bytes, *, earlier: bool = False
) -> list[float]:
    if earlier and isinstance(column, dict):  # 1.5-1.17: `k` checked by _decode_types_1_5
        column = {key: value for key, value in column.items() if key != "k"}
    if not isinstance(column, dict) or set(column) != {"x", "dec", "xor"}:
        raise EnvelopeError("format 2: float is not a map of x, dec and xor")
    raw = bytearray(map(bytes(k == RAW for k in places).__getitem__, owners))
    exceptions = column["x"]
    if not isinstance(exceptions, list) or not all(type(x) is int for x in exceptions):
        raise EnvelopeError("format 2: float x is not an array of positions")
    if exceptions:
        decimal_positions = list(compress(count(), map(not_, raw)))
        if (
            exceptions[0] < 0
            or exceptions[-1] >= len(decimal_positions)
            or any(b <= a for a, b in pairwise(exceptions))
        ):
            raise EnvelopeError("format 2: float x is not ascending positions of decimal floats")
        for position in exceptions:
            raw[decimal_positions[position]] = 1
    decimal_owners = list(compress(owners, map(not_, raw)))
    ints = unpack_series(column["dec"], decimal_owners, "float dec")
    scales = list(map(SCALES.__getitem__, map(places.__getitem__, decimal_owners)))
    decimal = map(truediv, ints, scales)
    raws = iter(unpack_xor(column["xor"], list(compress(owners, raw)), "float xor"))
    return [next(raws) if r else next(decimal) for r in raw]
