"""Blocks: one configuration entry that stands for a run of points, as register maps list them.

A Modbus point or an OPC UA node with `count: N` is a block of N entries written once. Its
`name` (and an OPC UA node's `node_id`) is a pattern with placeholders:

- `{n}`: the point's number in the block, `n_from` (default 1) for the first point, then +1;
- `{address}`: the point's Modbus address (Modbus only);
- either with a zero-padded width, `{n:03}` giving `001`, `002`, ... (`{n:03d}` is accepted
  too); a number wider than the width is written in full, never cut.

Nothing else is a placeholder: the pattern is parsed by a regular expression and filled in by
this module with the two integers, never handed to `str.format`, so no attribute or index of
anything is reachable from a configuration file. `{{` and `}}` stand for literal braces (of
use in node ids only: names cannot contain braces).

A block expands to exactly the points that writing them out would give, in order, where it
stands in the list. Problems found in an expanded point are located at the block entry plus
the point's index in the block, counted from 0 like every index in a key path:
`sources[0].points[3][57].name` is the 58th point of the block written as `points[3]`.

The number of points a configuration may declare is bounded (MAX_POINTS), and checked on the
raw data before anything is expanded (`declared_points`), so that a short file cannot make the
agent build millions of points.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from edge_agent.config.types import NAME_PATTERN, NAME_RULE, Loc, Problem

MAX_POINTS = 100_000
"""Points (Modbus points, OPC UA nodes, simulated points) one configuration may declare."""

MAX_BLOCK = 65_536
"""Points one block may hold: a Modbus table has 65,536 addresses."""

PLACEHOLDER_HELP = "use {n} or {address}, optionally zero-padded as {n:03}"

_TOKEN = re.compile(r"\{\{|\}\}|\{([^{}]*)\}|[{}]")
_SPEC = re.compile(r"^([a-z]+)(?::0([1-9][0-9]?)d?)?$")

T = TypeVar("T")


@dataclass(frozen=True)
class Pattern:
    """A parsed pattern: literal text and (field, width) placeholders, in order."""

    parts: tuple[str | tuple[str, int], ...]

    @property
    def fields(self) -> frozenset[str]:
        """The placeholder names used (`n`, `address`)."""
        return frozenset(part[0] for part in self.parts if isinstance(part, tuple))

    @property
    def literal(self) -> str:
        """The pattern's fixed text, braces unescaped."""
        return "".join(part for part in self.parts if isinstance(part, str))

    def fill(self, n: int, address: int = 0) -> str:
        """The text for one point: each placeholder replaced by its decimal value, padded."""
        values = {"n": n, "address": address}
        return "".join(
            part if isinstance(part, str) else str(values[part[0]]).zfill(part[1])
            for part in self.parts
        )


def has_placeholder(text: str) -> bool:
    """Whether `text` would be read as a pattern (it has a brace) rather than a plain value."""
    return "{" in text or "}" in text


def parse_pattern(text: str, fields: Iterable[str]) -> Pattern:
    """Parse `text`, allowing only the placeholders named in `fields`.

    Raises ValueError naming the first thing wrong: an unknown placeholder, a format other
    than a zero-padded width, or a lone brace.
    """
    allowed = tuple(fields)
    parts: list[str | tuple[str, int]] = []
    position = 0
    for match in _TOKEN.finditer(text):
        if match.start() > position:
            parts.append(text[position : match.start()])
        position = match.end()
        token = match.group(0)
        if token in ("{{", "}}"):
            parts.append(token[0])
            continue
        if token in ("{", "}"):
            raise ValueError(f"unmatched {token!r} in {text!r}: {_help(allowed)}")
        spec = _SPEC.match(match.group(1))
        if spec is None or spec.group(1) not in allowed:
            raise ValueError(f"unknown placeholder {token} in {text!r}: {_help(allowed)}")
        parts.append((spec.group(1), int(spec.group(2) or 1)))
    if position < len(text):
        parts.append(text[position:])
    merged: list[str | tuple[str, int]] = []
    for part in parts:  # `{{` splits literal text; join it up again
        if isinstance(part, str) and merged and isinstance(merged[-1], str):
            merged[-1] += part
        else:
            merged.append(part)
    return Pattern(tuple(merged))


def _help(fields: Sequence[str]) -> str:
    if "address" in fields:
        return PLACEHOLDER_HELP
    return "use {n}, optionally zero-padded as {n:03}"


class Expanded(list[T]):
    """Points with their blocks expanded, remembering which entry each point came from.

    `starts[e]` is the index of entry `e`'s first point; `blocks` holds the entries that are
    blocks. A list that is not `Expanded` maps each point to the entry of the same index.
    """

    def __init__(self, items: Iterable[T], starts: Sequence[int], blocks: frozenset[int]) -> None:
        super().__init__(items)
        self.starts = tuple(starts)
        self.blocks = blocks

    def entry_of(self, index: int) -> tuple[int, int | None]:
        """(entry index, index in the block or None) of point `index`."""
        low, high = 0, len(self.starts) - 1
        while low < high:  # the last entry whose first point is at or before `index`
            middle = (low + high + 1) // 2
            if self.starts[middle] <= index:
                low = middle
            else:
                high = middle - 1
        return low, (index - self.starts[low] if low in self.blocks else None)


class BlockEntry(Protocol):
    """An entry of a point or node list: a block when `count` is set."""

    @property
    def count(self) -> int | None: ...


E = TypeVar("E", bound=BlockEntry)


def expand(entries: list[E], noun: str, members: Callable[[E], Iterable[E]]) -> list[E]:
    """The items `entries` stand for, in order: each block replaced by `members(block)`.

    Returns `entries` itself when it has no block, else an `Expanded` list that maps items back
    to entries. ValueError when the items would number more than MAX_POINTS (counted before
    anything is built), naming them as `noun` ("points", "nodes").
    """
    if all(entry.count is None for entry in entries):
        return entries
    total = sum(entry.count or 1 for entry in entries)
    if total > MAX_POINTS:
        raise ValueError(f"{total:,} {noun}, more than the {MAX_POINTS:,} a configuration may have")
    items: list[E] = []
    starts: list[int] = []
    blocks: set[int] = set()
    for index, entry in enumerate(entries):
        starts.append(len(items))
        if entry.count is None:
            items.append(entry)
        else:
            blocks.add(index)
            items.extend(members(entry))
    return Expanded(items, starts, frozenset(blocks))


def where(points: Sequence[Any], list_key: str, index: int) -> Loc:
    """The key path of point `index`: `(list_key, entry)` or `(list_key, entry, i)` in a block."""
    if isinstance(points, Expanded):
        entry, within = points.entry_of(index)
        return (list_key, entry) if within is None else (list_key, entry, within)
    return (list_key, index)


def path_text(loc: Loc) -> str:
    """A key path as problems print it: `sources[0].points[3][57].name`."""
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def duplicates(
    values: Sequence[str], points: Sequence[Any], list_key: str, field: str
) -> list[Problem]:
    """One problem per repeated value, at the repeat, naming where it first occurred.

    Repeats inside one block are reported once with how many more there are (`collapse`).
    """
    first: dict[str, int] = {}
    found: list[tuple[Loc, str, str]] = []
    for index, value in enumerate(values):
        if value in first:
            also = path_text(where(points, list_key, first[value]))
            loc = (*where(points, list_key, index), field)
            found.append((loc, f"duplicate {field} {value!r} (also {also})", "duplicate"))
        else:
            first[value] = index
    return collapse(found)


def collapse(found: Iterable[tuple[Loc, str, str]]) -> list[Problem]:
    """Keep the first problem of each kind per block entry, saying how many more there are.

    `found` holds (location, message, kind). A location with a block index is
    `(..., list_key, entry, i, field)`; the problems of one kind in one entry differ only in `i`,
    so thousands of them say one thing.
    """
    kept: dict[tuple[Any, ...], list[Any]] = {}
    result: list[list[Any]] = []
    for loc, message, kind in found:
        if len(loc) >= 3 and isinstance(loc[-2], int) and isinstance(loc[-3], int):
            key = (*loc[:-2], loc[-1], kind)
            if key in kept:
                kept[key][2] += 1
                continue
            kept[key] = [loc, message, 0]
            result.append(kept[key])
        else:
            result.append([loc, message, 0])
    return [(loc, message if more == 0 else f"{message}{_more(loc, more)}")
            for loc, message, more in result]  # fmt: skip


def _more(loc: Loc, more: int) -> str:
    """`, and 3 more points of this block` (or nodes: the list's key names them)."""
    noun = str(loc[-4]).removesuffix("s")
    return f", and {more} more {noun}{'s' if more > 1 else ''} of this block"


def declared_points(data: Any) -> Iterator[tuple[Loc, int]]:
    """(location, running total) per point entry of raw, unvalidated configuration data.

    Counts what validation would build: a simulated source's `points: N` is N points, an entry
    with `count: N` is N, any other list item is one. Values validation would refuse count as
    one; what is counted is never less than what could be built.
    """
    sources = data.get("sources") if isinstance(data, dict) else None
    if not isinstance(sources, list):
        return
    total = 0
    for index, source in enumerate(sources):
        if not isinstance(source, dict):
            continue
        for key in ("points", "nodes"):
            entries = source.get(key)
            if isinstance(entries, list):
                for position, entry in enumerate(entries):
                    count = entry.get("count") if isinstance(entry, dict) else None
                    total += max(_as_count(count), 1)
                    yield ("sources", index, key, position), total
            elif entries is not None and not isinstance(entries, dict):
                total += _as_count(entries)
                yield ("sources", index, key), total


def _as_count(value: object) -> int:
    """The integer validation could make of `value` (lax mode: 5, 5.0, "5"), else 1."""
    if isinstance(value, bool) or value is None:
        return 1
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and len(value) < 32:
        try:
            return int(value)
        except ValueError:
            return 1
    return 1


_NAME = re.compile(NAME_PATTERN)
_NAME_TEXT = re.compile(r"^[A-Za-z0-9_.-]*$")


def check_name_or_pattern(value: str, placeholders: Sequence[str]) -> str:
    """`value` if it is a point name, or a name pattern whose text besides its placeholders is
    what a name may hold; ValueError (pydantic's message for a name) otherwise."""
    if not has_placeholder(value):
        if not _NAME.match(value):
            raise ValueError(NAME_RULE)
        return value
    if not _NAME_TEXT.match(parse_pattern(value, placeholders).literal):
        raise ValueError(
            f"name pattern {value!r}: besides placeholders, a name has only letters, "
            "digits, '_', '.' and '-'"
        )
    return value
