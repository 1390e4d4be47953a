"""CBOR from anyone: checked for its shape before cbor2 builds any Python object of it.

`cbor2.loads` builds whatever the bytes describe, and some of it costs far more than the bytes
(measured, contract §4.12's 16 MiB catalogue bound): 540 bytes of zstd holding 16 MiB of empty
arrays or maps became 1.2 GB of lists or dicts; a rational (tag 30) of two 1 MB integers took
43 s in the greatest common divisor; a 141-byte regular expression (tag 35) 3.8 s to compile; a
decimal fraction or bigfloat (tags 4, 5) with an exponent of 10^18 raised decimal.Overflow, an
ArithmeticError that no caller expected. None of that is needed to read a message whose shape
is known: `check` walks the bytes (one step per data item, string contents skipped) and refuses
tags not allowed, nesting deeper than allowed and more containers (arrays and maps) than
allowed, so that the objects cbor2 then builds are scalars in a few containers: at most about 20
times the bytes (a two-character text: 3 bytes of CBOR, 59 of Python).
"""

from __future__ import annotations

from typing import Any

import cbor2

from edge_agent.errors import EnvelopeError

_BREAK = 0xFF
_INDEFINITE = -1


class CBORShapeError(EnvelopeError):
    """CBOR that is malformed, or not of the shape allowed; the message says how."""


def loads(
    data: bytes,
    *,
    max_depth: int,
    max_containers: int,
    tags: frozenset[int] = frozenset(),
    simple: bool = True,
    max_items: int | None = None,
) -> Any:
    """`cbor2.loads(data)` once `check` has passed; CBORShapeError for anything wrong (never
    another error: what cbor2 still raises becomes one)."""
    check(
        data,
        max_depth=max_depth,
        max_containers=max_containers,
        tags=tags,
        simple=simple,
        max_items=max_items,
    )
    try:
        return cbor2.loads(data)
    except (cbor2.CBORError, ValueError, TypeError, OverflowError, RecursionError) as exc:
        raise CBORShapeError(f"not CBOR: {exc}") from None


def check(
    data: bytes,
    *,
    max_depth: int,
    max_containers: int,
    tags: frozenset[int] = frozenset(),
    simple: bool = True,
    max_items: int | None = None,
) -> None:
    """Raise CBORShapeError unless `data` is one well-formed CBOR data item with no tag
    outside `tags`, arrays and maps nested at most `max_depth` deep and at most
    `max_containers` of them, and (`simple` false) no float, boolean, null or other simple
    value, and (`max_items`) at most that many data items, tags and map keys included. Bytes
    after the item are refused too.

    Time: one loop step per data item (at most one per byte); memory: one int per open
    container.
    """
    size = len(data)
    pos = 0
    left = [1]  # data items still to read in each open container (_INDEFINITE: until a break)
    containers = 0
    items = 0
    limit = size if max_items is None else max_items  # an item takes a byte at least
    while left:
        if left[-1] == 0:
            left.pop()
            continue
        if pos >= size:
            raise CBORShapeError("CBOR ends inside a data item")
        if left[-1] == _INDEFINITE:
            if data[pos] == _BREAK:
                pos += 1
                left.pop()
                continue
        else:
            left[-1] -= 1
        items += 1
        if items > limit:
            raise CBORShapeError(f"CBOR holds more than {max_items} data items")
        major, pos, argument = _head(data, pos)
        if major == 6:
            if argument not in tags:
                raise CBORShapeError(f"CBOR tag {argument} is not allowed here")
            if left[-1] != _INDEFINITE:
                left[-1] += 1  # the tagged data item takes the tag's place
            continue
        if major in (2, 3):
            pos = _skip_string(data, pos, major, argument)
        elif major in (4, 5):
            containers += 1
            if containers > max_containers:
                raise CBORShapeError(f"CBOR holds more than {max_containers} arrays and maps")
            if len(left) > max_depth:
                raise CBORShapeError(f"CBOR nests arrays and maps over {max_depth} deep")
            if argument == _INDEFINITE:
                left.append(_INDEFINITE)
            else:
                left.append(argument if major == 4 else 2 * argument)
        elif major == 7:
            if argument == _INDEFINITE:
                raise CBORShapeError("CBOR has a break where none may be")
            if not simple:
                raise CBORShapeError("CBOR has a float or simple value where none may be")
    if pos != size:
        raise CBORShapeError(f"{size - pos} bytes after the CBOR data item")


def _head(data: bytes, pos: int) -> tuple[int, int, int]:
    """The major type, the position after the head and its argument (_INDEFINITE for info
    31) of the data item at `pos`."""
    initial = data[pos]
    pos += 1
    major, info = initial >> 5, initial & 31
    if info < 24:
        return major, pos, info
    if info == 31:
        if major in (0, 1, 6):
            raise CBORShapeError(f"CBOR major type {major} with indefinite length")
        return major, pos, _INDEFINITE
    if info > 27:
        raise CBORShapeError(f"CBOR reserved additional information {info}")
    width = 1 << (info - 24)
    if pos + width > len(data):
        raise CBORShapeError("CBOR ends inside a data item")
    return major, pos + width, int.from_bytes(data[pos : pos + width], "big")


def _skip_string(data: bytes, pos: int, major: int, length: int) -> int:
    """The position after a byte or text string's content (its chunks, when indefinite)."""
    if length != _INDEFINITE:
        if pos + length > len(data):
            raise CBORShapeError("CBOR ends inside a string")
        return pos + length
    while True:
        if pos >= len(data):
            raise CBORShapeError("CBOR ends inside a string")
        if data[pos] == _BREAK:
            return pos + 1
        chunk_major, pos, chunk = _head(data, pos)
        if chunk_major != major or chunk == _INDEFINITE:
            raise CBORShapeError("CBOR string chunk of another type or length")
        if pos + chunk > len(data):
            raise CBORShapeError("CBOR ends inside a string")
        pos += chunk
