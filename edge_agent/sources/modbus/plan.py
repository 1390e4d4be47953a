"""Pure planning: a device's points -> the fewest read requests -> decoded values.

Points of one table (coils, discrete inputs, holding or input registers) are sorted by address
and grouped greedily: a point joins the current read while the read stays within the limit
(125 registers or 2000 bits by the spec, less where a device cannot serve that much) and the
unused addresses it has to bridge are no more than `max_gap`. Greedy is optimal here: every
read starts at the lowest point not yet covered, and extends as far as the limits allow.

Bridging a gap reads addresses nobody asked for; some devices answer that with exception 2
(illegal data address). `split` then replaces that read by one read per point (points that
overlap, such as bits of one register, still share one), and the source keeps the smaller reads.
"""

from __future__ import annotations

import struct
from array import array
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple, Protocol

from edge_agent.config.modbus import ModbusPoint, RegisterKind
from edge_agent.reading import Value
from edge_agent.sources.modbus.decode import BlockDecoder, DecodeError, PointShape

FUNCTION_CODES: dict[RegisterKind, int] = {"coil": 1, "discrete": 2, "holding": 3, "input": 4}
"""The only function codes the agent sends: reads. Writes (5, 6, 15, 16, 22, 23) never."""


class PointSpec(NamedTuple):
    """What a running source keeps of one configured point: a tuple, not a pydantic model.

    About 200 bytes a point instead of about 750 (the model, its dict and field set), so a
    gateway's memory grows little with its point count; the table, type and order names are
    the config's Literal values, one object each, shared by every point.
    """

    name: str
    kind: RegisterKind
    address: int
    width: int
    type: str
    byte_order: Literal["big", "little"]
    word_order: Literal["big", "little"]
    bit: int | None
    scale: float
    offset: float
    deadband: float | None
    heartbeat: float | None

    @property
    def is_bit_table(self) -> bool:
        return self.kind in ("coil", "discrete")

    @classmethod
    def of(cls, point: ModbusPoint) -> PointSpec:
        """The spec of a validated point."""
        return cls(
            point.name, point.kind, point.address, point.width, point.type,
            point.byte_order, point.word_order, point.bit,
            1.0 if point.scale == 1.0 else point.scale,
            0.0 if point.offset == 0.0 else point.offset,
            point.deadband, point.heartbeat,
        )  # fmt: skip


class PointTable(Sequence[PointSpec]):
    """A device's points, stored by column: what a running source keeps per point is its name,
    its address (4 bytes) and the number of its shape (4 bytes), about 80 bytes with the name.

    A shape is everything else of a `PointSpec` (table, type, orders, bit, scale, offset,
    deadband, heartbeat): points of one device mostly share a few, kept once each. Indexing
    makes the point's `PointSpec` (equal to the one it was made from); that happens when a read
    is planned or its decoder built, and when a point is named in a log, never per value.
    """

    __slots__ = ("_addresses", "_shape_of", "_shapes", "names")

    def __init__(self, points: Iterable[PointSpec]) -> None:
        self.names: list[str] = []
        """The points' names, in configuration order."""
        self._addresses = array("I")
        self._shape_of = array("I")
        self._shapes: list[tuple[object, ...]] = []
        numbers: dict[str, int] = {}
        for point in points:
            shape = (point.kind, *point[3:])
            # repr tells 1 from 1.0 and -0.0 from 0.0, which equality would merge
            number = numbers.setdefault(repr(shape), len(numbers))
            if number == len(self._shapes):
                self._shapes.append(shape)
            self.names.append(point.name)
            self._addresses.append(point.address)
            self._shape_of.append(number)

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: int) -> PointSpec:  # type: ignore[override]
        """The `PointSpec` of point `index`; IndexError beyond the table."""
        shape = self._shapes[self._shape_of[index]]
        return PointSpec._make((self.names[index], shape[0], self._addresses[index], *shape[1:]))

    def __iter__(self) -> Iterator[PointSpec]:
        return map(self.__getitem__, range(len(self.names)))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, PointTable | list | tuple):
            return list(self) == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def parts(self) -> tuple[list[str], bytes, bytes, list[tuple[object, ...]]]:
        """What the table holds (for `PointTable.from_parts`): names, addresses, shape numbers
        (both as the bytes of unsigned-int arrays) and shapes."""
        return self.names, self._addresses.tobytes(), self._shape_of.tobytes(), self._shapes

    @classmethod
    def from_parts(
        cls, parts: tuple[list[str], bytes, bytes, list[tuple[object, ...]]]
    ) -> PointTable:
        """The table of `parts()`."""
        table = cls(())
        table.names, table._shapes = parts[0], parts[3]
        table._addresses.frombytes(parts[1])
        table._shape_of.frombytes(parts[2])
        return table


_INDEXES: list[int] = []
"""Point indexes as shared int objects (beyond 256 each int is a 28-byte object of its own)."""


def shared_indexes(indexes: Sequence[int]) -> tuple[int, ...]:
    """`indexes` (non-negative) as a tuple of the int objects every device shares."""
    if indexes and max(indexes) >= len(_INDEXES):
        _INDEXES.extend(range(len(_INDEXES), max(indexes) + 1))
    return tuple(map(_INDEXES.__getitem__, indexes))


class PlannablePoint(PointShape, Protocol):
    """What planning needs of a point (ModbusPoint and PointSpec have it): what decoding needs,
    and its name and table."""

    @property
    def name(self) -> str: ...
    @property
    def kind(self) -> RegisterKind: ...
    @property
    def is_bit_table(self) -> bool: ...


@dataclass(frozen=True, slots=True)
class ReadRequest:
    """One Modbus read: `count` addresses of one table from `address`, serving some points."""

    kind: RegisterKind
    address: int
    count: int
    points: tuple[int, ...]
    """Indexes into the device's point list, in address order."""

    @property
    def function_code(self) -> int:
        return FUNCTION_CODES[self.kind]

    @property
    def end(self) -> int:
        """One past the last address read."""
        return self.address + self.count

    def describe(self) -> str:
        unit = "bit" if self.kind in ("coil", "discrete") else "register"
        plural = "" if self.count == 1 else "s"
        return f"{self.kind} {self.address}..{self.end - 1} ({self.count} {unit}{plural})"


def plan_reads(
    points: Sequence[PlannablePoint],
    *,
    max_registers: int = 125,
    max_bits: int = 2000,
    max_gap: int = 0,
) -> list[ReadRequest]:
    """The fewest requests that read every point, in function-code then address order."""
    requests: list[ReadRequest] = []
    for kind in FUNCTION_CODES:
        indexes = [i for i, p in enumerate(points) if p.kind == kind]
        limit = max_bits if kind in ("coil", "discrete") else max_registers
        requests.extend(_group(kind, indexes, points, limit, max_gap))
    return requests


def split(request: ReadRequest, points: Sequence[PlannablePoint]) -> list[ReadRequest]:
    """The same points read without bridging: only overlapping points still share a read."""
    return _group(request.kind, list(request.points), points, request.count, -1)


def naive_count(points: Sequence[PlannablePoint]) -> int:
    """Requests needed without coalescing: one per point (the baseline the planner beats)."""
    return len(points)


def _group(
    kind: RegisterKind,
    indexes: list[int],
    points: Sequence[PlannablePoint],
    limit: int,
    max_gap: int,
) -> list[ReadRequest]:
    """Greedy grouping of one table's points; `max_gap` -1 joins only overlapping points."""
    ordered = sorted(indexes, key=lambda i: (points[i].address, points[i].width))
    requests: list[ReadRequest] = []
    members: list[int] = []
    start = end = 0
    for index in ordered:
        point = points[index]
        if point.width > limit:
            raise ValueError(f"point {point.name!r} is wider ({point.width}) than a read ({limit})")
        point_end = point.address + point.width
        if members and point.address - end <= max_gap and max(end, point_end) - start <= limit:
            members.append(index)
            end = max(end, point_end)
            continue
        if members:
            requests.append(ReadRequest(kind, start, end - start, tuple(members)))
        members, start, end = [index], point.address, point_end
    if members:
        requests.append(ReadRequest(kind, start, end - start, tuple(members)))
    return requests


def decode_response(
    request: ReadRequest,
    points: Sequence[PlannablePoint],
    values: Sequence[int] | Sequence[bool],
) -> list[tuple[int, Value | DecodeError]]:
    """Each point's scaled value from a response, or the DecodeError that makes it bad.

    `values` must hold at least `request.count` registers or bits (the caller checks length:
    a short response is a device fault, not a decoding one). The values as ints or bools, for
    tests and tools; a source decodes the answer's bytes with the read's `decoder` instead.
    """
    decoder = decoder_of(request, points)
    if request.kind in ("coil", "discrete"):
        packed = bytearray((len(values) + 7) // 8)
        for i, bit in enumerate(values):
            if bit:
                packed[i >> 3] |= 1 << (i & 7)
        data = bytes(packed)
    else:
        data = struct.pack(f">{len(values)}H", *(int(v) for v in values))
    return list(zip(request.points, decoder.decode(data), strict=True))


def decoder_of(request: ReadRequest, points: Sequence[PlannablePoint]) -> BlockDecoder:
    """The decoder of the answer to `request` (built once per read, used on every poll)."""
    return BlockDecoder(
        request.address,
        [points[i] for i in request.points],
        bits=request.kind in ("coil", "discrete"),
    )
