"""Payload format 2 (docs/contract.md §4.9): a batch's readings as a table of columns.

Format 1 writes one CBOR map per reading, so every reading repeats its source and point names,
its timestamp, its quality and its `seq`. Format 2 writes each of those once per batch, and the
values of each point one after the other, so that a slowly changing value costs a small
difference instead of a whole number. It is lossless: every reading decodes to the same `seq`,
source, point, `ts`, value (bit for bit, NaN payloads and -0.0 included), quality and status
code it was sealed with. The payload map is then zstd-compressed and signed as format 1 is.

The layout, in short (§4.9 has every field):

- The points of the batch form a dictionary: source names, and point names split at `.` into
  parts kept once each. `idx` gives each reading's point.
- Readings are *grouped* by point (a stable sort by `idx`): the value, type, quality and status
  columns are in that order, so one point's values are adjacent. A consumer recomputes the same
  order from `idx`.
- Timestamps: the batch's distinct timestamps, sorted, as differences; each reading's position
  among them (a poll shares one).
- Types, qualities and status codes: run-length encoded.
- Values by type: booleans one byte each; integers as each point's first value and then the
  differences between successive values of the point; floats likewise as decimals (an integer
  `m` and the point's decimal places `k`: the value is the double nearest to m / 10^k), and
  every float that is not such a decimal (noise, NaN, -0.0, beyond 2^53) as its 8 bytes XOR the
  point's previous such float; text as a CBOR array.
- Integer columns are packed with a frame of reference (the minimum, then each value minus it
  as an unsigned little-endian integer of 1, 2, 4 or 8 bytes) and byte-shuffled (all first
  bytes, then all second bytes...), which lets zstd find the runs; a column whose range does
  not fit 8 bytes is a CBOR array instead.

Only the standard library (struct, array, itertools, operator) and cbor2 are used. The work per
reading is done by C loops (`map`, `zip`, `sorted`, `struct.pack`), not by Python statements per
reading: that is what makes sealing cheaper than format 1's map per reading (docs/performance.md).
"""

from __future__ import annotations

import math
import struct
from array import array
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import accumulate, chain, compress, count, pairwise, repeat
from operator import add, eq, itemgetter, mul, ne, not_, sub, truediv, xor
from typing import Any, cast

from edge_agent.errors import EnvelopeError
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
SCALES = [10.0**k for k in range(MAX_DECIMALS + 1)] + [1.0]

_CODE = {1: "B", 2: "H", 4: "I", 8: "Q"}
"""struct codes of the widths of `pack_ints` (with `<`: standard sizes, little-endian)."""
_UNKNOWN = 255
_CACHE_LIMIT = 100_000
"""Points whose decimal places (or name parts) an encoder remembers; cleared past this."""
_DICTIONARIES = 16
"""Points dictionaries an encoder keeps: one per distinct list of points in a batch."""


# --------------------------------------------------------------------------- integer columns


def pack_ints(values: Sequence[int]) -> list[Any]:
    """A column of integers as `[0, base, width, bytes]` (frame of reference), or `[1, values]`.

    `bytes` holds `value - base` for each value, `width` (0, 1, 2, 4 or 8) bytes each, unsigned,
    little-endian, byte-shuffled: the first byte of every value, then the second... Width 0 means
    every value equals `base`. A column whose range needs more than 8 bytes is a CBOR array.
    The reader knows the length from elsewhere.
    """
    if not values:
        return [0, 0, 0, b""]
    low, high = min(values), max(values)
    span = high - low
    if span == 0:
        return [0, low, 0, b""]
    if span >= 2**64:
        return [1, list(values)]
    width = 1 if span < 0x100 else 2 if span < 0x10000 else 4 if span < 2**32 else 8
    shifted = values if low == 0 else map(sub, values, repeat(low))
    data = struct.pack(f"<{len(values)}{_CODE[width]}", *shifted)
    if width > 1:
        data = b"".join([data[i::width] for i in range(width)])
    return [0, low, width, data]


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
        return values
    if method != 0 or len(column) != 4:
        raise EnvelopeError(f"format 2: {name} has an unknown packing {column[:1]!r}")
    _, base, width, data = column
    if type(base) is not int or width not in (0, 1, 2, 4, 8) or not isinstance(data, bytes):
        raise EnvelopeError(f"format 2: {name} has a malformed base, width or data")
    if len(data) != length * width:
        raise EnvelopeError(f"format 2: {name} has {len(data)} bytes, not {length} x {width}")
    if width == 0:
        return [base] * length
    if width > 1:
        planes = bytearray(len(data))
        for i in range(width):
            planes[i::width] = data[i * length : (i + 1) * length]
        data = bytes(planes)
    unpacked = struct.unpack(f"<{length}{_CODE[width]}", data)
    return list(unpacked) if base == 0 else list(map(add, unpacked, repeat(base)))


def _new_point(owners: Sequence[int]) -> list[bool]:
    """For elements 1..n-1 of a column grouped by point: whether a new point starts there."""
    return list(map(ne, owners[1:], owners[:-1]))


def pack_series(values: Sequence[int], owners: Sequence[int]) -> list[Any]:
    """Integers grouped by point as `[first values, differences]`, two `pack_ints` columns.

    `owners` gives each value's point (grouped: equal points adjacent). The first column holds
    each point's first value; the second, for every other value, its difference from the
    point's previous value.
    """
    if not values:
        return [pack_ints(()), pack_ints(())]
    new = _new_point(owners)
    diffs = list(compress(map(sub, values[1:], values[:-1]), map(not_, new)))
    firsts = [values[0], *compress(values[1:], new)]
    return [pack_ints(firsts), pack_ints(diffs)]


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


def pack_xor(values: list[float], owners: Sequence[int]) -> bytes:
    """Floats as their 8 bytes XOR the previous float of the same point, byte-shuffled.

    The bytes are those of the IEEE 754 double, little-endian; a point's first float is XOR 0.
    """
    if not values:
        return b""
    size = len(values)
    bits = struct.unpack(f"<{size}Q", struct.pack(f"<{size}d", *values))
    xored = [bits[0], *map(xor, bits[1:], bits[:-1])]
    for i in compress(count(1), _new_point(owners)):
        xored[i] = bits[i]
    data = struct.pack(f"<{size}Q", *xored)
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


class ColumnEncoder:
    """Encodes readings as format-2 columns (the fields of §4.9 after `v` ... `evicted`).

    It remembers, per point, the decimal places its floats need (23.45 needs 2: the point's
    resolution), as the most any of its values needed, up to MAX_DECIMALS; a point whose values
    are not short decimals is remembered as RAW. Each batch carries the places it used, so it
    decodes on its own; a value that needs more is sent raw and teaches the encoder for the next
    batch. It also keeps the points dictionaries of recent batches (the same polls make the same
    lists of points: a gateway whose polls fill whole batches reuses them every poll) and each
    point name's parts: building a dictionary was half the cost of sealing (docs/performance.md).
    """

    def __init__(self) -> None:
        self._places: dict[tuple[str, str], int] = {}
        self._dictionaries: dict[tuple[tuple[str, ...], tuple[str, ...]], dict[str, Any]] = {}
        """Recent dictionaries by their points' sources and names (tuples of text: cheap to
        hash, and not traversed by the garbage collector)."""
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
        if not length:
            return _empty(first_seq)
        src, pt, ts, values, qualities, codes = zip(*readings, strict=True)
        first: dict[tuple[str, str], int] = {}  # point -> position of its first reading
        where = list(map(first.setdefault, zip(src, pt, strict=True), count()))
        number = {position: i for i, position in enumerate(first.values())}
        idx = list(map(number.__getitem__, where))
        order = sorted(range(length), key=idx.__getitem__)
        owners = sorted(idx)
        grouped = list(map(values.__getitem__, order))
        types = list(map(type, grouped))
        type_values, type_lengths = runs(types)
        if not all(t in TYPE_CODE for t in type_values):
            grouped = [_plain(v) for v in grouped]
            type_values, type_lengths = runs(list(map(type, grouped)))
        points = list(first)
        times = sorted(set(ts))
        columns: dict[str, Any] = {
            "seq": first_seq,
            "n": length,
            **self._points(points, (src, pt) if len(points) == length else None),
            "idx": pack_ints(list(map(sub, idx, [0, *idx[:-1]]))),
            "t0": times[0],
            "nt": len(times),
            "ts": pack_ints(list(map(sub, times[1:], times[:-1]))),
            "ti": pack_ints(_positions(times, ts)),
            "types": pack_runs(bytes(map(TYPE_CODE.__getitem__, type_values)), type_lengths),
            "q": _qualities(qualities),
            "sc": pack_runs(*runs(codes)),
        }  # fmt: skip
        parts = _by_type(type_values, type_lengths, grouped, owners)
        booleans = parts.get(bool)
        columns["bool"] = bytes(booleans[0]) if booleans else b""
        integers = parts.get(int)
        columns["int"] = pack_series(*integers) if integers else pack_series((), ())
        floats = parts.get(float)
        columns["float"] = self._floats(*floats, points) if floats else _no_floats(len(points))
        texts = parts.get(str)
        columns["text"] = texts[0] if texts else []
        return columns

    def _points(
        self, points: list[tuple[str, str]], key: tuple[tuple[str, ...], tuple[str, ...]] | None
    ) -> dict[str, Any]:
        """The dictionary of `points`; `key`: their sources and names as two tuples, if known."""
        if key is None:
            key = (tuple(map(itemgetter(0), points)), tuple(map(itemgetter(1), points)))
        encoded = self._dictionaries.get(key)
        if encoded is None:
            if len(self._dictionaries) >= _DICTIONARIES:  # the oldest goes
                del self._dictionaries[next(iter(self._dictionaries))]
            encoded = self._dictionaries[key] = _dictionary(points, self._split(points))
        return encoded

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
        self, floats: list[float], owners: list[int], points: list[tuple[str, str]]
    ) -> dict[str, Any]:
        """The `float` column: decimal places per point, exceptions, decimals, raw floats."""
        known = self._places
        places = list(map(known.get, points, repeat(_UNKNOWN)))
        if _UNKNOWN in places:  # points not seen before: their first float tells
            if len(known) >= _CACHE_LIMIT:
                known.clear()
            for start in (0, *compress(count(1), _new_point(owners))):
                p = owners[start]
                if places[p] == _UNKNOWN:
                    places[p] = known[points[p]] = decimals(floats[start])
            places = [0 if k == _UNKNOWN else k for k in places]
        flags = bytes(map(places.__getitem__, owners))  # each float's places
        raw_floats: list[float] = []
        raw_owners: list[int] = []
        if RAW in flags:  # floats of raw points go to the XOR column as they are
            raw = list(map(eq, flags, repeat(RAW)))
            raw_floats, raw_owners = list(compress(floats, raw)), list(compress(owners, raw))
            kept = list(map(not_, raw))
            floats, owners = list(compress(floats, kept)), list(compress(owners, kept))
            flags = bytes(compress(flags, kept))
        scales = list(map(SCALES.__getitem__, flags))
        ints, inexact = _as_decimals(floats, scales)
        exceptions: list[int] = []
        if inexact:
            exceptions = list(compress(count(), inexact))
            self._learn([floats[i] for i in exceptions], [owners[i] for i in exceptions], points)
            exact = list(map(not_, inexact))
            raw_floats, raw_owners = _merge(
                raw_floats, raw_owners, list(compress(floats, inexact)),
                list(compress(owners, inexact)),
            )  # fmt: skip
            ints, owners = list(compress(ints, exact)), list(compress(owners, exact))
        return {
            "k": bytes(places),
            "x": exceptions,
            "dec": pack_series(ints, owners),
            "xor": pack_xor(raw_floats, raw_owners),
        }

    def _learn(self, values: list[float], owners: list[int], points: list[tuple[str, str]]) -> None:
        """More decimal places for a point whose value needed them, for the next batches."""
        done: set[int] = set()
        for value, p in zip(values, owners, strict=True):
            if p in done:
                continue
            done.add(p)
            places = decimals(value)
            if places < RAW and places > self._places.get(points[p], 0):
                self._places[points[p]] = places


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


def _positions(times: list[int], ts: tuple[int, ...]) -> list[int]:
    """Each timestamp's position among the distinct ones, as differences from the previous."""
    if len(times) == 1:
        return [0] * len(ts)
    where = list(map({t: i for i, t in enumerate(times)}.__getitem__, ts))
    return list(map(sub, where, [0, *where[:-1]]))


def _dictionary(
    points: list[tuple[str, str]], split: Sequence[Sequence[str]] | None = None
) -> dict[str, Any]:
    """The points dictionary: `src`, `ps` (each point's source), `tok`, `pn`, `pi` (names).

    Each point name is split at `.` into parts (`split`: the parts of each, if known); the
    distinct parts are `tok` (joined with newlines, or an array when a part holds a newline),
    `pn` the number of parts of each name and `pi` the position in `tok` of every part, name
    after name.
    """
    owners = list(map(itemgetter(0), points))
    sources = {name: i for i, name in enumerate(dict.fromkeys(owners))}
    if split is None:
        split = list(map(str.split, map(itemgetter(1), points), repeat(".")))
    tokens = {tok: i for i, tok in enumerate(dict.fromkeys(chain.from_iterable(split)))}
    joined = "\n".join(tokens)
    positions = list(map(tokens.__getitem__, chain.from_iterable(split)))
    return {
        "np": len(points),
        "src": list(sources),
        "ps": pack_ints(list(map(sources.__getitem__, owners))),
        "tok": joined if tokens and joined.count("\n") == len(tokens) - 1 else list(tokens),
        "pn": pack_ints(list(map(len, split))),
        "pi": pack_ints(positions),
    }


def _empty(first_seq: int) -> dict[str, Any]:
    return {
        "seq": first_seq,
        "n": 0,
        **_dictionary([]),
        "idx": pack_ints(()),
        "t0": 0,
        "nt": 0,
        "ts": pack_ints(()),
        "ti": pack_ints(()),
        "types": pack_runs([], []),
        "q": pack_runs([], []),
        "sc": pack_runs([], []),
        "bool": b"",
        "int": pack_series((), ()),
        "float": _no_floats(0),
        "text": [],
    }


def _no_floats(points: int) -> dict[str, Any]:
    return {"k": bytes(points), "x": [], "dec": pack_series((), ()), "xor": b""}


def _plain(value: Any) -> Value:
    """A value of a subclass of a reading type (an IntEnum, a str subclass) as the plain type."""
    if value is None:
        return None
    for kind in (bool, int, float, str):
        if isinstance(value, kind):
            return kind(value)
    raise TypeError(f"a {type(value).__name__} is not a reading value")


def _by_type(
    kinds: list[type], lengths: list[int], grouped: list[Any], owners: list[int]
) -> dict[type, tuple[list[Any], list[int]]]:
    """The grouped values and their points, split by type along the type runs."""
    spans: dict[type, list[tuple[int, int]]] = {}
    start = 0
    for kind, size in zip(kinds, lengths, strict=True):
        spans.setdefault(kind, []).append((start, start + size))
        start += size
    out: dict[type, tuple[list[Any], list[int]]] = {}
    for kind, slices in spans.items():
        if len(slices) == 1:
            ((start, end),) = slices
            out[kind] = (grouped[start:end], owners[start:end])
        else:
            out[kind] = (
                list(chain.from_iterable(grouped[s:e] for s, e in slices)),
                list(chain.from_iterable(owners[s:e] for s, e in slices)),
            )
    return out


# --------------------------------------------------------------------------- decoder


def _is_quality(value: object) -> bool:
    return isinstance(value, str) and value in QUALITIES


def _is_code(value: object) -> bool:
    return value is None or type(value) is int


def _is_type(value: object) -> bool:
    return type(value) is int and T_NULL <= value <= T_TEXT


_KEYS = (
    "seq", "n", "np", "src", "ps", "tok", "pn", "pi", "idx", "t0", "nt", "ts", "ti", "types",
    "q", "sc", "bool", "int", "float", "text",
)  # fmt: skip


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


def decode(body: Mapping[Any, Any]) -> list[dict[str, Any]]:
    """The readings of a format-2 payload map, as format 1 gives them (§4.4 maps, in seq order).

    Raises EnvelopeError naming the first thing that is not as §4.9 says, never another error.
    """
    return to_maps(decode_columns(body))


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


def decode_columns(body: Mapping[Any, Any]) -> Columns:
    """The readings of a format-2 payload map as `Columns`; errors as `decode`'s."""
    try:
        return _decode(body)
    except EnvelopeError:
        raise
    except (ValueError, TypeError, KeyError, IndexError, OverflowError, StopIteration) as exc:
        raise EnvelopeError(f"format 2: malformed columns: {type(exc).__name__}: {exc}") from None


def _decode(body: Mapping[Any, Any]) -> Columns:
    missing = [key for key in _KEYS if key not in body]
    if missing:
        raise EnvelopeError(f"format 2: payload lacks {', '.join(missing)}")
    length, first = body["n"], body["seq"]
    if type(length) is not int or not 0 <= length <= MAX_READINGS:
        raise EnvelopeError(f"format 2: reading count {length!r} is not 0..{MAX_READINGS}")
    if type(first) is not int:
        raise EnvelopeError(f"format 2: first seq {first!r} is not an integer")
    points = _decode_points(body, length)
    idx = list(accumulate(unpack_ints(body["idx"], length, "idx")))
    if length and (min(idx) < 0 or max(idx) >= len(points)):
        raise EnvelopeError(f"format 2: idx refers beyond the {len(points)} points")
    ts = _decode_times(body, length)
    order = sorted(range(length), key=idx.__getitem__)
    owners = sorted(idx)
    types = unpack_runs(body["types"], length, "types", _is_type)
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
        _decode_floats(body["float"], by_type[T_FLOAT], len(points)),
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


def _decode_points(body: Mapping[Any, Any], length: int) -> list[tuple[str, str]]:
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
    words = list(map(tokens.__getitem__, where))
    ends = list(accumulate(parts))
    names = [".".join(words[end - count : end]) for count, end in zip(parts, ends, strict=True)]
    return list(zip(map(sources.__getitem__, owner), names, strict=True))


def _decode_times(body: Mapping[Any, Any], length: int) -> list[int]:
    t0, distinct = body["t0"], body["nt"]
    if type(t0) is not int or type(distinct) is not int or not 0 <= distinct <= length:
        raise EnvelopeError(f"format 2: t0 {t0!r} or nt {distinct!r} is not as §4.9 says")
    if length and not distinct:
        raise EnvelopeError("format 2: readings without timestamps (nt 0)")
    times = list(accumulate(unpack_ints(body["ts"], max(distinct - 1, 0), "ts"), initial=t0))
    where = list(accumulate(unpack_ints(body["ti"], length, "ti")))
    if where and (min(where) < 0 or max(where) >= distinct):
        raise EnvelopeError(f"format 2: ti refers beyond the {distinct} timestamps")
    return list(map(times.__getitem__, where))


def _decode_floats(column: object, owners: list[int], point_count: int) -> list[float]:
    if not isinstance(column, dict) or set(column) != {"k", "x", "dec", "xor"}:
        raise EnvelopeError("format 2: float is not a map of k, x, dec and xor")
    places = column["k"]
    if not isinstance(places, bytes) or len(places) != point_count:
        raise EnvelopeError(f"format 2: float k does not hold {point_count} bytes")
    if places and max(places) > RAW:
        raise EnvelopeError(f"format 2: float k is above {RAW}")
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
